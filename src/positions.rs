//! The pipeline's positions, shared between tasks and read by metrics and
//! status.
//!
//! Each position is an end-of-WAL byte address on the current timeline, and
//! they are ordered: `archived ≤ flushed ≤ written ≤ received ≤ server`.
//!
//! * `server`:   the end of WAL the server has told us about (keepalive or
//!   XLogData header). Nothing is promised about it.
//! * `received`: the end of WAL read from the socket.
//! * `written`:  the end of WAL handed to the spool files (page cache; lost
//!   on a power cut).
//! * `flushed`:  the end of WAL fsynced in the spool. Survives any crash.
//!   The only position that may be reported as `flush` to PostgreSQL in ack
//!   mode `local`. Its one publisher is the spool writer thread (a
//!   [`Durable`] watch); [`Positions`] only follows that watch
//!   ([`Positions::follow_durable`]), it never holds a copy of its own.
//! * `archived`: the end of WAL contiguously stored in the repository, from
//!   the point where this agent began. The only position that may be
//!   reported as `flush` in ack mode `remote`.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::watch;

use crate::pg::{Lsn, TimelineId};

/// The end of WAL durable in the spool, on the timeline being written, as
/// the spool writer thread publishes it (see `spool::thread`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Durable {
    pub timeline: TimelineId,
    /// Every byte before it is fsynced, and every segment before its
    /// segment is complete under its final name.
    pub flushed: Lsn,
}

/// Shared positions; cheap to clone.
#[derive(Clone, Default)]
pub struct Positions(Arc<Inner>);

#[derive(Default)]
struct Inner {
    server: AtomicU64,
    received: AtomicU64,
    written: AtomicU64,
    /// The spool's durable position, followed (see [`Positions::follow_durable`]).
    durable: RwLock<Option<watch::Receiver<Durable>>>,
    archived: AtomicU64,
    timeline: AtomicU32,
    /// Unix time (ms) of the oldest flushed WAL not yet archived; 0 when caught up.
    oldest_unarchived_ms: AtomicU64,
    /// Unix time (ms) when `archived` last advanced.
    last_archived_ms: AtomicU64,
    /// Unix time (ms) the receive side last showed life (a message from the
    /// server, or a reconnect attempt).
    receive_heartbeat_ms: AtomicU64,
    /// Unix time (ms) the uploader's loop last ran.
    upload_heartbeat_ms: AtomicU64,
    /// Complete segments in the spool not yet stored.
    pending_segments: AtomicU64,
    /// 1 while streaming.
    connected: AtomicU32,
    /// 1 while uploads make no progress although WAL waits.
    upload_stalled: AtomicU32,
}

macro_rules! position {
    ($get:ident, $set:ident, $field:ident) => {
        #[doc = concat!("Current `", stringify!($field), "` position.")]
        pub fn $get(&self) -> Lsn {
            Lsn(self.0.$field.load(Ordering::Acquire))
        }
        #[doc = concat!("Advances `", stringify!($field), "`; never moves it backwards.")]
        pub fn $set(&self, lsn: Lsn) {
            self.0.$field.fetch_max(lsn.0, Ordering::AcqRel);
        }
    };
}

impl Positions {
    position!(server, set_server, server);
    position!(received_this_run, set_received, received);
    position!(written_this_run, set_written, written);

    /// Current `received` position: the end of WAL this run read from the
    /// socket, but never below `flushed` (after a restart the spool holds
    /// durable WAL beyond the point streaming re-starts from).
    pub fn received(&self) -> Lsn {
        self.received_this_run().max(self.flushed())
    }

    /// Current `written` position, never below `flushed` (see [`Positions::received`]).
    pub fn written(&self) -> Lsn {
        self.written_this_run().max(self.flushed())
    }
    position!(archived, advance_archived, archived);

    /// Sets `archived` as the uploader computed it. The uploader is its only
    /// writer; it can be lower than before only at start-up, when segments
    /// recovered from the spool are still to be stored.
    pub fn set_archived(&self, lsn: Lsn) {
        self.0.archived.store(lsn.0, Ordering::Release);
    }

    /// Follows the spool's durable position from now on.
    pub fn follow_durable(&self, durable: watch::Receiver<Durable>) {
        *self.0.durable.write().unwrap_or_else(|e| e.into_inner()) = Some(durable);
    }

    /// Current `flushed` position: the spool's durable end (`0/0` before
    /// the spool is open).
    pub fn flushed(&self) -> Lsn {
        self.0
            .durable
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map_or(Lsn::INVALID, |d| d.borrow().flushed)
    }

    /// Resets the receive side's positions to `lsn` (start of streaming,
    /// or streaming going on at a fork point after a failover), where
    /// moving backwards is legitimate; `flushed` is the spool's to say and
    /// `archived` the uploader's (set here, it could pass `flushed`).
    pub fn reset(&self, timeline: TimelineId, lsn: Lsn) {
        for a in [&self.0.received, &self.0.written] {
            a.store(lsn.0, Ordering::Release);
        }
        self.0.server.fetch_max(lsn.0, Ordering::AcqRel);
        self.0.timeline.store(timeline.0, Ordering::Release);
    }

    /// Timeline being streamed (0 before the first connection).
    pub fn timeline(&self) -> TimelineId {
        TimelineId(self.0.timeline.load(Ordering::Acquire))
    }

    /// Records the timeline being streamed.
    pub fn set_timeline(&self, t: TimelineId) {
        self.0.timeline.store(t.0, Ordering::Release);
    }

    /// Unix ms of the oldest WAL flushed but not archived (0 = none).
    pub fn oldest_unarchived_ms(&self) -> u64 {
        self.0.oldest_unarchived_ms.load(Ordering::Acquire)
    }

    /// Sets the age marker of the oldest unarchived WAL (0 = caught up).
    pub fn set_oldest_unarchived_ms(&self, ms: u64) {
        self.0.oldest_unarchived_ms.store(ms, Ordering::Release);
    }

    /// Unix ms when `archived` last advanced (0 = never).
    pub fn last_archived_ms(&self) -> u64 {
        self.0.last_archived_ms.load(Ordering::Acquire)
    }

    /// Seeds the last-archived time (from the previous run's state file).
    pub fn seed_last_archived_ms(&self, ms: u64) {
        self.0.last_archived_ms.fetch_max(ms, Ordering::AcqRel);
    }

    /// Records that `archived` advanced now.
    pub fn touch_archived(&self) {
        self.0.last_archived_ms.store(now_ms(), Ordering::Release);
    }
}

impl Positions {
    /// Marks the receive side alive now.
    pub fn receive_heartbeat(&self) {
        self.0
            .receive_heartbeat_ms
            .store(now_ms(), Ordering::Release);
    }

    /// When the receive side last showed life (unix ms, 0 = never).
    pub fn receive_heartbeat_ms(&self) -> u64 {
        self.0.receive_heartbeat_ms.load(Ordering::Acquire)
    }

    /// Marks the uploader alive now.
    pub fn upload_heartbeat(&self) {
        self.0
            .upload_heartbeat_ms
            .store(now_ms(), Ordering::Release);
    }

    /// When the uploader last ran (unix ms, 0 = never).
    pub fn upload_heartbeat_ms(&self) -> u64 {
        self.0.upload_heartbeat_ms.load(Ordering::Acquire)
    }

    /// Records how many complete segments await upload.
    pub fn set_pending_segments(&self, n: u64) {
        self.0.pending_segments.store(n, Ordering::Release);
    }

    /// Complete segments awaiting upload.
    pub fn pending_segments(&self) -> u64 {
        self.0.pending_segments.load(Ordering::Acquire)
    }

    /// Records whether the replication connection is streaming.
    pub fn set_connected(&self, c: bool) {
        self.0.connected.store(u32::from(c), Ordering::Release);
    }

    /// Records whether uploads make no progress although WAL waits.
    pub fn set_upload_stalled(&self, stalled: bool) {
        self.0
            .upload_stalled
            .store(u32::from(stalled), Ordering::Release);
    }

    /// Whether uploads make no progress although WAL waits (see `upload`).
    pub fn upload_stalled(&self) -> bool {
        self.0.upload_stalled.load(Ordering::Acquire) == 1
    }

    /// Is the replication connection streaming?
    pub fn connected(&self) -> bool {
        self.0.connected.load(Ordering::Acquire) == 1
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_only_advance_except_on_reset() {
        let p = Positions::default();
        p.set_received(Lsn(100));
        p.set_received(Lsn(50));
        assert_eq!(p.received(), Lsn(100));
        p.reset(TimelineId(2), Lsn(10));
        assert_eq!(p.received(), Lsn(10));
        assert_eq!(p.timeline(), TimelineId(2));
    }

    #[test]
    fn flushed_follows_the_spool() {
        let p = Positions::default();
        assert_eq!(p.flushed(), Lsn::INVALID);
        let (tx, rx) = watch::channel(Durable {
            timeline: TimelineId(1),
            flushed: Lsn(0x100),
        });
        p.follow_durable(rx);
        assert_eq!(p.flushed(), Lsn(0x100));
        tx.send_replace(Durable {
            timeline: TimelineId(1),
            flushed: Lsn(0x200),
        });
        assert_eq!(p.flushed(), Lsn(0x200));
    }
}
