//! gaps: WAL known to be lost, recorded, never skipped quietly (DESIGN
//! rule 2).
//!
//! A gap arises when the server no longer has WAL walsafe still needs: the
//! slot was invalidated (`max_slot_wal_keep_size`), dropped, or streaming
//! ran without one. The agent then records the lost range, logs it as an
//! error, exports it (`walsafe_archive_gaps`) and resumes from the oldest
//! WAL the server still has. A restore across a gap stops at it; a new base
//! backup is needed to restore past it.
//!
//! ```text
//! <spool>/walsafe.gaps           one JSON object per line, appended and fsynced
//! <repository>/gaps/<TLI 8 hex>-<from 16 hex>-<to 16 hex>
//!                                the same JSON, so wal-verify and status see it
//! {"timeline":1,"from":"0/3000000","to":"0/9000000",
//!  "detected_at":"2026-11-21T10:00:00Z","reason":"..."}
//! ```
//!
//! `walsafe_archive_gaps` counts the records in the spool's file. Once a
//! new base backup makes them irrelevant, acknowledge them by deleting
//! `walsafe.gaps` (the repository's records stay, as history).

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::pg::{Lsn, TimelineId};

/// File name inside the spool directory.
pub const GAPS_FILE: &str = "walsafe.gaps";
/// Prefix of gap records in the repository.
pub const GAPS_PREFIX: &str = "gaps/";

/// One lost range of WAL: `[from, to)` on `timeline`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gap {
    pub timeline: u32,
    pub from: String,
    pub to: String,
    pub detected_at: String,
    pub reason: String,
}

impl Gap {
    /// A gap detected now.
    pub fn new(timeline: TimelineId, from: Lsn, to: Lsn, reason: &str) -> Gap {
        Gap {
            timeline: timeline.0,
            from: from.to_string(),
            to: to.to_string(),
            detected_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            reason: reason.to_string(),
        }
    }

    /// The repository key of this record.
    pub fn object_key(&self) -> String {
        let p = |s: &str| s.parse::<Lsn>().map(|l| l.0).unwrap_or(0);
        format!(
            "{GAPS_PREFIX}{:08X}-{:016X}-{:016X}",
            self.timeline,
            p(&self.from),
            p(&self.to)
        )
    }

    /// Bytes of WAL lost.
    pub fn len(&self) -> u64 {
        let p = |s: &str| s.parse::<Lsn>().unwrap_or_default();
        p(&self.to).bytes_after(p(&self.from))
    }

    /// True for an empty range (never recorded).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The gaps recorded in a spool directory.
pub fn load(spool_dir: &Path) -> Vec<Gap> {
    std::fs::read_to_string(spool_dir.join(GAPS_FILE))
        .map(|t| {
            t.lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Appends a gap to the spool's record, durably.
pub fn record(spool_dir: &Path, gap: &Gap) -> std::io::Result<()> {
    let path = spool_dir.join(GAPS_FILE);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)?;
    let mut line = serde_json::to_string(gap).expect("serializable");
    line.push('\n');
    f.write_all(line.as_bytes())?;
    crate::durable::sync_all(&f)?;
    crate::durable::sync_dir(spool_dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_are_appended_and_reloaded() {
        let d = tempfile::tempdir().unwrap();
        assert!(load(d.path()).is_empty());
        let g = Gap::new(
            TimelineId(1),
            Lsn(0x3000000),
            Lsn(0x9000000),
            "slot invalidated",
        );
        record(d.path(), &g).unwrap();
        record(d.path(), &g).unwrap();
        assert_eq!(load(d.path()), vec![g.clone(), g.clone()]);
        assert_eq!(g.len(), 0x6000000);
        assert_eq!(
            g.object_key(),
            "gaps/00000001-0000000003000000-0000000009000000"
        );
    }
}
