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
        let oldest = p.oldest_unarchived_ms();
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
            archive_lag_seconds: if oldest == 0 {
                0.0
            } else {
                now_ms().saturating_sub(oldest) as f64 / 1000.0
            },
            last_archived_ms: p.last_archived_ms(),
            spool_bytes,
            spool_pending_segments: pending,
            gaps,
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
