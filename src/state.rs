//! state: the running agent's live positions, as a small JSON file in the
//! spool, for `walsafe status` and `walsafe check` (which may run as
//! another process without access to the metrics endpoint).
//!
//! ```text
//! <spool>/walsafe.state    rewritten atomically once a second by `walsafe run`
//! {
//!   "pid": 4242, "updated_ms": 1763718000000,      // unix ms
//!   "connected": true, "timeline": 1,
//!   "server_lsn": "0/5000000", "received_lsn": "0/5000000",
//!   "flushed_lsn": "0/5000000", "archived_lsn": "0/4FFF000",
//!   "archive_lag_bytes": 4096, "archive_lag_seconds": 0.12,
//!   "last_archived_ms": 1763717999900,
//!   "spool_bytes": 16777216, "spool_pending_segments": 0,
//!   "gaps": 0
//! }
//! ```
//!
//! It is informational only: nothing in walsafe's safety depends on it, so
//! it is written without fsync. A state older than a few seconds, or whose
//! pid is gone, means the agent is not running.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::pg::Lsn;
use crate::positions::{now_ms, Positions};

/// File name inside the spool directory.
pub const STATE_FILE: &str = "walsafe.state";

/// What the agent publishes about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentState {
    pub pid: u32,
    pub updated_ms: u64,
    pub connected: bool,
    pub timeline: u32,
    pub server_lsn: String,
    pub received_lsn: String,
    pub flushed_lsn: String,
    pub archived_lsn: String,
    pub archive_lag_bytes: u64,
    pub archive_lag_seconds: f64,
    pub last_archived_ms: u64,
    pub spool_bytes: u64,
    pub spool_pending_segments: u64,
    pub gaps: u64,
    /// Storage traffic over the last hour (or since start, if sooner).
    #[serde(default)]
    pub storage: StorageWindow,
    /// Each repository's progress (the fields above show the one furthest
    /// behind).
    #[serde(default)]
    pub repositories: Vec<RepositoryProgress>,
}

/// One repository's archive progress, as its uploader left it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RepositoryProgress {
    pub name: String,
    pub archived_lsn: String,
    pub archive_lag_bytes: u64,
    pub archive_lag_seconds: f64,
    pub last_archived_ms: u64,
    pub pending_segments: u64,
    pub stalled: bool,
    /// The key id new objects are encrypted with (`None`: unencrypted, or
    /// an agent from before key rotation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encrypting_key_id: Option<String>,
}

/// What the agent sent to and received from storage over a window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StorageWindow {
    /// How long the window is (at most an hour).
    pub seconds: f64,
    pub put: u64,
    pub get: u64,
    pub list: u64,
    pub delete: u64,
    pub head: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

impl StorageWindow {
    pub fn of(t: &crate::metrics::StorageTotals, seconds: f64) -> StorageWindow {
        let [put, get, list, delete, head] = t.requests;
        StorageWindow {
            seconds,
            put,
            get,
            list,
            delete,
            head,
            bytes_up: t.bytes_up,
            bytes_down: t.bytes_down,
        }
    }

    pub fn requests(&self) -> u64 {
        self.put + self.get + self.list + self.delete + self.head
    }

    /// `n` scaled to an hour of this window (`None` before a minute).
    pub fn per_hour(&self, n: u64) -> Option<f64> {
        (self.seconds >= 60.0).then(|| n as f64 * 3600.0 / self.seconds)
    }
}

/// The agent's storage totals, sampled once a minute for an hour: the
/// window published in the state file.
#[derive(Debug, Default)]
pub struct StorageHistory {
    samples: std::collections::VecDeque<(u64, crate::metrics::StorageTotals)>,
}

impl StorageHistory {
    /// A history that starts at `now_ms` with nothing sent: everything
    /// this process sends from here is in the first hour's window.
    pub fn starting(now_ms: u64) -> StorageHistory {
        StorageHistory {
            samples: [(now_ms, crate::metrics::StorageTotals::default())].into(),
        }
    }

    /// Records `now`'s totals (kept once a minute) and returns the window
    /// from the oldest sample within the last hour to now.
    pub fn window(&mut self, now_ms: u64, now: crate::metrics::StorageTotals) -> StorageWindow {
        if self
            .samples
            .back()
            .is_none_or(|(at, _)| now_ms.saturating_sub(*at) >= 60_000)
        {
            self.samples.push_back((now_ms, now));
        }
        while self
            .samples
            .front()
            .is_some_and(|(at, _)| now_ms.saturating_sub(*at) > 3_600_000)
        {
            self.samples.pop_front();
        }
        let (at, then) = self.samples.front().copied().unwrap_or((now_ms, now));
        StorageWindow::of(&now.since(&then), now_ms.saturating_sub(at) as f64 / 1000.0)
    }
}

impl AgentState {
    /// A snapshot of the shared positions and counters.
    pub fn snapshot(
        p: &Positions,
        connected: bool,
        spool_bytes: u64,
        pending: u64,
        gaps: u64,
    ) -> Self {
        let repositories = p
            .archives()
            .iter()
            .map(|a| RepositoryProgress {
                name: a.name().to_string(),
                archived_lsn: a.archived().to_string(),
                archive_lag_bytes: p.server().bytes_after(a.archived()),
                archive_lag_seconds: a.archive_lag_seconds(),
                last_archived_ms: a.last_archived_ms(),
                pending_segments: a.pending_segments(),
                stalled: a.upload_stalled(),
                encrypting_key_id: p.encrypting_key(a.name()),
            })
            .collect();
        AgentState {
            pid: std::process::id(),
            updated_ms: now_ms(),
            connected,
            timeline: p.timeline().0,
            server_lsn: p.server().to_string(),
            received_lsn: p.received().to_string(),
            flushed_lsn: p.flushed().to_string(),
            archived_lsn: p.archived().to_string(),
            archive_lag_bytes: p.server().bytes_after(p.archived()),
            archive_lag_seconds: p.archive_lag_seconds(),
            last_archived_ms: p.last_archived_ms(),
            spool_bytes,
            spool_pending_segments: pending,
            gaps,
            storage: StorageWindow::default(),
            repositories,
        }
    }

    /// Age of this snapshot in seconds.
    pub fn age_seconds(&self) -> f64 {
        now_ms().saturating_sub(self.updated_ms) as f64 / 1000.0
    }

    /// Is the process that wrote it still alive (and the state fresh)?
    pub fn is_live(&self) -> bool {
        process_alive(self.pid) && self.age_seconds() < 10.0
    }

    /// The archived position, parsed.
    pub fn archived(&self) -> Option<Lsn> {
        self.archived_lsn.parse().ok()
    }
}

/// Rewritten by `walsafe backup`, `drill` and `retain --apply` when they
/// change the repository's backups or drills, so that the agent looks them
/// up again (it does not list the repository on a timer: an idle cluster
/// costs no requests). Informational, like the state file.
pub const CHANGED_FILE: &str = "repository.changed";

/// Notes in the spool that the repository's backups or drills changed (a
/// no-op without a spool here: the agent's hourly look finds it).
pub fn note_repository_changed(spool_dir: &Path) {
    if spool_dir.is_dir() {
        // Written aside and renamed over the last note: a note left by
        // another user (a run by hand as root) is replaced, not refused.
        let tmp = spool_dir.join(format!(".{CHANGED_FILE}.{}", std::process::id()));
        if std::fs::write(&tmp, now_ms().to_string()).is_ok()
            && std::fs::rename(&tmp, spool_dir.join(CHANGED_FILE)).is_err()
        {
            let _ = std::fs::remove_file(&tmp);
        }
    }
}

/// The last [`note_repository_changed`] mark, if any.
pub fn repository_changed_mark(spool_dir: &Path) -> Option<String> {
    std::fs::read_to_string(spool_dir.join(CHANGED_FILE)).ok()
}

/// Writes the state atomically (temp file + rename, no fsync: informational).
pub fn write(spool_dir: &Path, state: &AgentState) -> std::io::Result<()> {
    let path = spool_dir.join(STATE_FILE);
    let tmp = spool_dir.join(format!(".{STATE_FILE}.tmp"));
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(state).expect("serializable"),
    )?;
    std::fs::rename(&tmp, &path)
}

/// Reads the state file, if any.
pub fn read(spool_dir: &Path) -> Option<AgentState> {
    let text = std::fs::read(spool_dir.join(STATE_FILE)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Does process `pid` exist? `kill(pid, 0)` asks without signalling; EPERM
/// means it exists but belongs to another user, so it counts as alive. Pid 0
/// and pids beyond `i32::MAX` name process groups, not a process: never alive.
pub fn process_alive(pid: u32) -> bool {
    use nix::errno::Errno;
    match i32::try_from(pid) {
        Ok(pid) if pid > 0 => matches!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
            Ok(()) | Err(Errno::EPERM)
        ),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The window covers the last hour, sampled a minute apart: older
    /// traffic leaves it, and a young agent's window is its age.
    #[test]
    fn storage_window_is_the_last_hour() {
        use crate::metrics::StorageTotals;
        let totals = |put: u64| StorageTotals {
            requests: [put, 1, 0, 0, 0],
            bytes_up: put * 10,
            bytes_down: 5,
        };
        let mut h = StorageHistory::starting(1_000_000);
        let w = h.window(1_000_000, totals(100));
        assert_eq!((w.put, w.seconds), (100, 0.0), "what was sent before");
        assert_eq!(w.per_hour(w.put), None, "no rate before a minute");
        // Every 10 s for two hours, 3 puts each.
        let mut w = w;
        for i in 1..=720u64 {
            w = h.window(1_000_000 + i * 10_000, totals(100 + 3 * i));
        }
        assert!((3540.0..=3600.0).contains(&w.seconds), "{}", w.seconds);
        let rate = w.per_hour(w.put).unwrap();
        assert!(
            (rate - 1080.0).abs() < 1.0,
            "3 puts per 10 s is 1080 an hour: {rate}"
        );
        assert_eq!(w.bytes_up, w.put * 10);
        assert_eq!((w.get, w.bytes_down), (0, 0));
        assert!(h.samples.len() <= 61, "{} samples", h.samples.len());
    }

    /// Each note differs from the last and replaces it (renamed over it),
    /// leaving nothing aside.
    #[test]
    fn a_change_note_replaces_the_last() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(repository_changed_mark(dir.path()), None);
        note_repository_changed(dir.path());
        let first = repository_changed_mark(dir.path()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        note_repository_changed(dir.path());
        assert_ne!(repository_changed_mark(dir.path()).unwrap(), first);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no file left aside"
        );
        // No spool here: nothing is written.
        note_repository_changed(&dir.path().join("absent"));
        assert!(!dir.path().join("absent").exists());
    }

    #[test]
    fn process_liveness() {
        assert!(process_alive(std::process::id()));
        // pid 1 always exists; EPERM for an unprivileged caller still counts.
        assert!(process_alive(1));
        assert!(!process_alive(0));
        assert!(!process_alive(u32::MAX));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(!process_alive(pid));
    }

    #[test]
    fn state_round_trips() {
        let d = tempfile::tempdir().unwrap();
        let p = Positions::default();
        let (_tx, rx) = tokio::sync::watch::channel(crate::positions::Durable {
            timeline: crate::pg::TimelineId(1),
            flushed: Lsn(0x5000000),
        });
        p.follow_durable(rx);
        let s = AgentState::snapshot(&p, true, 1, 2, 0);
        write(d.path(), &s).unwrap();
        let r = read(d.path()).unwrap();
        assert_eq!(r, s);
        assert_eq!(r.flushed_lsn, "0/5000000");
        assert!(r.is_live());
    }
}
