//! retention: when a file may leave the spool.
//!
//! A spooled segment is the only copy of its WAL outside PostgreSQL (which
//! recycles it once the slot has moved on) until a repository stores it.
//! [`Retention`] is the one place that decides when that copy may go:
//! once **every** configured repository has reported the file stored. The
//! uploader reports; it never removes spool files itself.
//!
//! ```text
//! uploader(repo i) ── stored(file, i) ──▶ Retention ── all repositories? ──▶ Spool::remove_*
//! ```
//!
//! What is kept:
//!
//! * complete segments and closed `.partial`s until every repository has
//!   them;
//! * the segment being filled (never removed: the writer has it open);
//! * history files, always (they are small, and a restarted agent ships
//!   them again, create-only, so a repository added later gets them too).
//!
//! The record of which repository stored what lives in memory: after a
//! restart every spooled file is uploaded again to every repository, where
//! the create-only put finds it already stored (same plaintext) and reports
//! it stored at once.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use super::Spool;
use crate::pg::SegmentName;

/// A spool file retention decides about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SpoolFile {
    /// A complete segment.
    Complete(SegmentName),
    /// A closed `.partial` (the end of a timeline, or the segment before a gap).
    ClosedPartial(SegmentName),
}

/// What [`Retention::stored`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Released {
    /// Removed from the spool: every repository has it.
    Removed,
    /// Kept: this many repositories do not have it yet.
    Kept { waiting_for: usize },
}

/// The owner of "when may a file leave the spool".
pub struct Retention {
    spool: Arc<Spool>,
    repositories: usize,
    /// Per file, the repositories (by index) that stored it.
    stored: Mutex<BTreeMap<SpoolFile, Vec<bool>>>,
}

impl Retention {
    /// Retention for a spool shipped to `repositories` repositories (at least one).
    pub fn new(spool: Arc<Spool>, repositories: usize) -> Retention {
        Retention {
            spool,
            repositories: repositories.max(1),
            stored: Mutex::new(BTreeMap::new()),
        }
    }

    /// Records that repository `repository` stored `file`; when that makes
    /// every repository, removes the file from the spool (durably). Blocking
    /// I/O: call it off the async reactor.
    pub fn stored(&self, file: SpoolFile, repository: usize) -> io::Result<Released> {
        let waiting_for = {
            let mut all = self.stored.lock().unwrap_or_else(|e| e.into_inner());
            let have = all
                .entry(file)
                .or_insert_with(|| vec![false; self.repositories]);
            if let Some(slot) = have.get_mut(repository) {
                *slot = true;
            }
            have.iter().filter(|h| !**h).count()
        };
        if waiting_for > 0 {
            return Ok(Released::Kept { waiting_for });
        }
        match file {
            SpoolFile::Complete(seg) => self.spool.remove_complete(seg)?,
            SpoolFile::ClosedPartial(seg) => self.spool.remove_partial(seg)?,
        }
        self.stored
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&file);
        Ok(Released::Removed)
    }
}

/// One repository's side of [`Retention`]: what its uploader reports
/// stored files through.
#[derive(Clone)]
pub struct Release {
    retention: Arc<Retention>,
    repository: usize,
}

impl Release {
    /// Repository `repository` (its index in the configuration) of `retention`.
    pub fn new(retention: Arc<Retention>, repository: usize) -> Release {
        Release {
            retention,
            repository,
        }
    }

    /// [`Retention::stored`] for this repository.
    pub fn stored(&self, file: SpoolFile) -> io::Result<Released> {
        self.retention.stored(file, self.repository)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::durable::Fsync;
    use crate::pg::{Lsn, TimelineId};

    const SEG: u64 = 1 << 20;

    #[test]
    fn a_segment_leaves_only_once_every_repository_has_it() {
        let d = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(d.path(), SEG, Fsync::Off).unwrap();
        let mut w = spool.writer();
        let t = TimelineId(1);
        w.write(t, Lsn(0), &vec![1u8; SEG as usize]).unwrap();
        let done = w.flush().unwrap().completed;
        assert_eq!(done.len(), 1);
        let spool = Arc::new(spool);
        let r = Retention::new(spool.clone(), 2);
        let f = SpoolFile::Complete(done[0]);
        assert_eq!(r.stored(f, 1).unwrap(), Released::Kept { waiting_for: 1 });
        // The same repository reporting again changes nothing.
        assert_eq!(r.stored(f, 1).unwrap(), Released::Kept { waiting_for: 1 });
        assert!(spool.complete_path(done[0]).exists());
        assert_eq!(r.stored(f, 0).unwrap(), Released::Removed);
        assert!(!spool.complete_path(done[0]).exists());
    }
}
