//! The spool's record of gaps: `<spool>/walsafe.gaps`, one JSON [`Gap`]
//! per line, appended and fsynced.
//!
//! `walsafe_archive_gaps` counts its lines. Once a new base backup makes
//! them irrelevant, the operator acknowledges them by deleting the file
//! (the repository's records stay, as history).

use std::io::Write;
use std::path::Path;

use super::Spool;
use crate::gap::Gap;

/// File name inside the spool directory.
pub const GAPS_FILE: &str = "walsafe.gaps";

/// The gaps recorded in a spool directory (read without opening the spool).
pub fn load(spool_dir: &Path) -> Vec<Gap> {
    std::fs::read_to_string(spool_dir.join(GAPS_FILE))
        .map(|t| {
            t.lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect()
        })
        .unwrap_or_default()
}

impl Spool {
    /// Appends a gap to the spool's record, durably.
    pub fn record_gap(&self, gap: &Gap) -> std::io::Result<()> {
        let path = self.dir.join(GAPS_FILE);
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        let mut line = serde_json::to_string(gap).expect("serializable");
        line.push('\n');
        f.write_all(line.as_bytes())?;
        self.fsync.sync_all(&f)?;
        self.fsync.sync_dir(&self.dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::durable::Fsync;
    use crate::pg::{Lsn, TimelineId};

    #[test]
    fn gaps_are_appended_and_reloaded() {
        let d = tempfile::tempdir().unwrap();
        assert!(load(d.path()).is_empty());
        let (spool, _) = Spool::open(d.path(), 1 << 20, Fsync::On).unwrap();
        let g = Gap::new(
            TimelineId(1),
            Lsn(0x3000000),
            Lsn(0x9000000),
            "slot invalidated",
        );
        spool.record_gap(&g).unwrap();
        spool.record_gap(&g).unwrap();
        assert_eq!(load(d.path()), vec![g.clone(), g.clone()]);
    }
}
