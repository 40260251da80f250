//! service: what `walsafe run` tells the world about itself, once a second:
//! metric gauges, the state file in the spool (for `walsafe status`), and
//! systemd (`Type=notify`: READY once streaming, STATUS lines, and
//! watchdog pings).
//!
//! The watchdog is pinged only while the pipeline is healthy — making
//! progress, or idle but alive:
//!
//! * the uploader's loop ran within [`STALL_LIMIT`] (it wakes every
//!   `partial_interval`);
//! * the receive side heard from the server (XLogData or keepalive; the
//!   server sends keepalives every `wal_sender_timeout / 2`) or made a
//!   reconnect attempt within [`STALL_LIMIT`];
//! * the spool is not stuck: received WAL beyond `flushed` does not wait
//!   more than [`STALL_LIMIT`] for an fsync to complete.
//!
//! A hung fsync, a deadlocked task or a dead connection loop thus stops the
//! pings, and systemd restarts the agent, which then resumes from what is
//! durable.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::positions::{now_ms, Positions};
use crate::state::AgentState;

/// Longest silence of any part of the pipeline before the watchdog stops.
pub const STALL_LIMIT: Duration = Duration::from_secs(60);
/// Gauge refresh period.
const REFRESH: Duration = Duration::from_millis(100);

/// Starts the monitor; it runs until `cancel`.
pub fn spawn_monitor(
    positions: Positions,
    spool_dir: PathBuf,
    cancel: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(REFRESH);
        let mut n = 0u64;
        let mut ready = false;
        let mut last_flushed = positions.flushed();
        let mut flushed_since = Instant::now();
        let watchdog = sd_notify::watchdog_enabled();
        let mut storage = crate::state::StorageHistory::starting(crate::positions::now_ms());
        while !cancel.is_cancelled() {
            crate::metrics::refresh_positions(&positions);
            n += 1;
            if n % 10 == 0 {
                let spool_bytes = crate::spool::usage_bytes_of(&spool_dir).unwrap_or(0);
                crate::metrics::set_spool(spool_bytes, positions.pending_segments());
                let gaps = crate::spool::gaps::load(&spool_dir).len();
                crate::metrics::set_gaps(gaps);
                let mut state = AgentState::snapshot(
                    &positions,
                    positions.connected(),
                    spool_bytes,
                    positions.pending_segments(),
                    gaps as u64,
                );
                state.storage = storage.window(state.updated_ms, crate::metrics::storage_totals());
                if spool_dir.is_dir() {
                    if let Err(e) = crate::state::write(&spool_dir, &state) {
                        warn!(
                            "cannot write the state file in {}: {e}",
                            spool_dir.display()
                        );
                    }
                }
                if !ready && positions.connected() {
                    ready = true;
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
                }
                let status = format!(
                    "{} timeline {}, flushed {}, archived {}, lag {:.1} s / {} bytes",
                    if state.connected {
                        "streaming"
                    } else {
                        "not connected"
                    },
                    state.timeline,
                    state.flushed_lsn,
                    state.archived_lsn,
                    state.archive_lag_seconds,
                    state.archive_lag_bytes
                );
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&status)]);
                let flushed = positions.flushed();
                if flushed != last_flushed || positions.received() <= flushed {
                    last_flushed = flushed;
                    flushed_since = Instant::now();
                }
                if watchdog.is_some() && healthy(&positions, flushed_since.elapsed()) {
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                }
            }
            tokio::select! { _ = tick.tick() => {}, _ = cancel.cancelled() => {} }
        }
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    })
}

/// The watchdog rule of the module doc.
pub fn healthy(p: &Positions, fsync_wait: Duration) -> bool {
    let age = |ms: u64| Duration::from_millis(now_ms().saturating_sub(ms));
    let uploader = age(p.upload_heartbeat_ms()) < STALL_LIMIT;
    let receiver = age(p.receive_heartbeat_ms()) < STALL_LIMIT;
    let spool = fsync_wait < STALL_LIMIT;
    uploader && receiver && spool
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_needs_every_part_alive() {
        let p = Positions::default();
        assert!(!healthy(&p, Duration::ZERO), "never heard from anyone");
        let archive = p.add_archive("repo");
        p.receive_heartbeat();
        assert!(!healthy(&p, Duration::ZERO), "the uploader never ran");
        archive.upload_heartbeat();
        assert!(healthy(&p, Duration::ZERO));
        assert!(!healthy(&p, STALL_LIMIT), "an fsync stuck for a minute");
    }
}
