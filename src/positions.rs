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
//! * `archived`: the end of WAL contiguously stored in a repository, from
//!   the point where this agent began. Each repository has its own
//!   ([`Archive`], written by its uploader only); [`Positions::archived`]
//!   is the lowest of them, so that lag and age always describe the
//!   repository furthest behind. In ack mode `remote` the flush reported
//!   is at most the highest of them (see `agent`): WAL stored in any
//!   repository, and kept in the spool until every one has it.

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
    timeline: AtomicU32,
    /// Each repository's progress, in configuration order.
    archives: RwLock<Vec<Archive>>,
    /// The previous run's last-archived time (state file), a floor for
    /// every repository's.
    last_archived_seed_ms: AtomicU64,
    /// Unix time (ms) the receive side last showed life (a message from the
    /// server, or a reconnect attempt).
    receive_heartbeat_ms: AtomicU64,
    /// 1 while streaming.
    connected: AtomicU32,
    /// The key id each repository encrypts new objects with, by name.
    encrypting_keys: RwLock<std::collections::BTreeMap<String, String>>,
}

/// One repository's archive progress; its uploader is the only writer.
/// Cheap to clone.
#[derive(Clone, Default)]
pub struct Archive(Arc<ArchiveInner>);

#[derive(Default)]
struct ArchiveInner {
    /// The repository's name (`[[repository]] name`).
    name: String,
    archived: AtomicU64,
    /// Unix time (ms) of the oldest flushed WAL not yet archived; 0 when caught up.
    oldest_unarchived_ms: AtomicU64,
    /// Unix time (ms) when `archived` last advanced.
    last_archived_ms: AtomicU64,
    /// Unix time (ms) the uploader's loop last ran.
    upload_heartbeat_ms: AtomicU64,
    /// Complete segments in the spool not yet stored.
    pending_segments: AtomicU64,
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

    /// Seeds the last-archived time (from the previous run's state file).
    pub fn seed_last_archived_ms(&self, ms: u64) {
        self.0.last_archived_seed_ms.fetch_max(ms, Ordering::AcqRel);
        for a in self.archives().iter() {
            a.0.last_archived_ms.fetch_max(ms, Ordering::AcqRel);
        }
    }

    /// Registers repository `name`'s progress (its uploader's to write).
    pub fn add_archive(&self, name: &str) -> Archive {
        let a = Archive(Arc::new(ArchiveInner {
            name: name.to_string(),
            last_archived_ms: AtomicU64::new(self.0.last_archived_seed_ms.load(Ordering::Acquire)),
            ..Default::default()
        }));
        self.0
            .archives
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(a.clone());
        a
    }

    /// Records that repository `repo` encrypts new objects with key id
    /// `id` (for `walsafe key-rotate`, through the state file).
    pub fn set_encrypting_key(&self, repo: &str, id: Option<String>) {
        let mut keys = self
            .0
            .encrypting_keys
            .write()
            .unwrap_or_else(|e| e.into_inner());
        match id {
            Some(id) => keys.insert(repo.to_string(), id),
            None => keys.remove(repo),
        };
    }

    /// The key id repository `repo` encrypts with, if any.
    pub fn encrypting_key(&self, repo: &str) -> Option<String> {
        self.0
            .encrypting_keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(repo)
            .cloned()
    }

    /// Every repository's progress, in configuration order.
    pub fn archives(&self) -> Vec<Archive> {
        self.0
            .archives
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The lowest of `f` over the repositories (`None` before any).
    fn lowest(&self, f: impl Fn(&Archive) -> u64) -> Option<u64> {
        self.archives().iter().map(f).min()
    }

    /// `archived` of the repository furthest behind (`0/0` before any).
    pub fn archived(&self) -> Lsn {
        Lsn(self.lowest(Archive::archived_raw).unwrap_or(0))
    }

    /// Unix ms of the oldest WAL flushed but not archived in some
    /// repository (0 = every repository is caught up).
    pub fn oldest_unarchived_ms(&self) -> u64 {
        self.lowest(|a| match a.oldest_unarchived_ms() {
            0 => u64::MAX,
            t => t,
        })
        .filter(|&t| t != u64::MAX)
        .unwrap_or(0)
    }

    /// The live RPO: seconds since the oldest WAL not yet archived in some
    /// repository became durable (0 when every repository is caught up).
    pub fn archive_lag_seconds(&self) -> f64 {
        seconds_since(self.oldest_unarchived_ms())
    }

    /// Unix ms when the repository furthest behind last advanced (0 = never).
    pub fn last_archived_ms(&self) -> u64 {
        self.lowest(Archive::last_archived_ms)
            .unwrap_or_else(|| self.0.last_archived_seed_ms.load(Ordering::Acquire))
    }

    /// When the slowest uploader last ran (unix ms, 0 = never).
    pub fn upload_heartbeat_ms(&self) -> u64 {
        self.lowest(Archive::upload_heartbeat_ms).unwrap_or(0)
    }

    /// The most complete segments any repository still awaits.
    pub fn pending_segments(&self) -> u64 {
        self.archives()
            .iter()
            .map(Archive::pending_segments)
            .max()
            .unwrap_or(0)
    }

    /// Whether some repository's uploads make no progress although WAL waits.
    pub fn upload_stalled(&self) -> bool {
        self.archives().iter().any(Archive::upload_stalled)
    }

    /// With several repositories, the one furthest behind (the one whose
    /// backlog fills the spool), for alarms; `None` with one.
    pub fn furthest_behind(&self) -> Option<String> {
        let all = self.archives();
        if all.len() < 2 {
            return None;
        }
        all.iter()
            .min_by_key(|a| a.archived_raw())
            .map(|a| a.name().to_string())
    }
}

impl Archive {
    /// The repository's name.
    pub fn name(&self) -> &str {
        &self.0.name
    }

    fn archived_raw(&self) -> u64 {
        self.0.archived.load(Ordering::Acquire)
    }

    /// The end of WAL contiguously stored in this repository.
    pub fn archived(&self) -> Lsn {
        Lsn(self.archived_raw())
    }

    /// Sets `archived` as the uploader computed it. The uploader is its only
    /// writer; it can be lower than before only at start-up, when segments
    /// recovered from the spool are still to be stored.
    pub fn set_archived(&self, lsn: Lsn) {
        self.0.archived.store(lsn.0, Ordering::Release);
    }

    /// Unix ms of the oldest WAL flushed but not archived (0 = none).
    pub fn oldest_unarchived_ms(&self) -> u64 {
        self.0.oldest_unarchived_ms.load(Ordering::Acquire)
    }

    /// This repository's live RPO: seconds since its oldest WAL not yet
    /// stored became durable (0 when caught up).
    pub fn archive_lag_seconds(&self) -> f64 {
        seconds_since(self.oldest_unarchived_ms())
    }

    /// Sets the age marker of the oldest unarchived WAL (0 = caught up).
    pub fn set_oldest_unarchived_ms(&self, ms: u64) {
        self.0.oldest_unarchived_ms.store(ms, Ordering::Release);
    }

    /// Unix ms when `archived` last advanced (0 = never).
    pub fn last_archived_ms(&self) -> u64 {
        self.0.last_archived_ms.load(Ordering::Acquire)
    }

    /// Records that `archived` advanced now.
    pub fn touch_archived(&self) {
        self.0.last_archived_ms.store(now_ms(), Ordering::Release);
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

    /// Records whether the replication connection is streaming.
    pub fn set_connected(&self, c: bool) {
        self.0.connected.store(u32::from(c), Ordering::Release);
    }

    /// Is the replication connection streaming?
    pub fn connected(&self) -> bool {
        self.0.connected.load(Ordering::Acquire) == 1
    }
}

/// Seconds from unix ms `at` to now; 0 for 0 ("none").
fn seconds_since(at: u64) -> f64 {
    if at == 0 {
        0.0
    } else {
        now_ms().saturating_sub(at) as f64 / 1000.0
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
