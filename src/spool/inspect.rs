//! inspect: what a spool directory holds, read without opening or locking
//! it (for `walsafe status` and `walsafe check`, which must work while the
//! agent runs, and as another user).

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::pg::walfile::{classify, NameKind};

/// The spool directory's content.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Listing {
    pub dir: PathBuf,
    pub exists: bool,
    /// Complete segments not yet stored in the repository (the uploader
    /// removes each once stored).
    pub complete_segments: u64,
    pub complete_bytes: u64,
    /// `.partial` files: the segment being filled, and closed ends of
    /// earlier timelines.
    pub partial_files: u64,
    pub partial_bytes: u64,
    pub history_files: u64,
    /// Every file in the directory.
    pub total_bytes: u64,
    /// Why the directory could not be listed, if it could not.
    pub error: Option<String>,
}

/// Lists the spool directory (without opening or locking it).
pub fn list(dir: &Path) -> Listing {
    let mut s = Listing {
        dir: dir.to_path_buf(),
        ..Listing::default()
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return s,
        Err(e) => {
            s.exists = true;
            s.error = Some(format!("cannot list {}: {e}", dir.display()));
            return s;
        }
    };
    s.exists = true;
    for entry in entries.flatten() {
        let Ok(meta) = entry.metadata() else {
            continue; // removed by the uploader while we listed
        };
        if !meta.is_file() {
            continue;
        }
        let len = meta.len();
        s.total_bytes += len;
        match classify(&entry.file_name().to_string_lossy()) {
            Some(NameKind::Segment) => {
                s.complete_segments += 1;
                s.complete_bytes += len;
            }
            Some(NameKind::Partial) => {
                s.partial_files += 1;
                s.partial_bytes += len;
            }
            Some(NameKind::History(_)) => s.history_files += 1,
            None => {}
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spool_listing_counts_backlog() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("000000010000000000000003"), vec![0; 100]).unwrap();
        std::fs::write(d.path().join("000000010000000000000004"), vec![0; 100]).unwrap();
        std::fs::write(
            d.path().join("000000010000000000000005.partial"),
            vec![0; 50],
        )
        .unwrap();
        std::fs::write(d.path().join("00000002.history"), b"1\t0/3000000\tx\n").unwrap();
        std::fs::write(d.path().join("walsafe.lock"), b"1\n").unwrap();
        let s = list(d.path());
        assert!(s.exists && s.error.is_none());
        assert_eq!((s.complete_segments, s.complete_bytes), (2, 200));
        assert_eq!((s.partial_files, s.partial_bytes), (1, 50));
        assert_eq!(s.history_files, 1);
        assert_eq!(s.total_bytes, 200 + 50 + 14 + 2);
        let missing = list(&d.path().join("nope"));
        assert!(!missing.exists);
    }
}
