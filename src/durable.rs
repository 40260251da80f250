//! Durability primitives, in one place.
//!
//! Everything walsafe promises about crashes rests on these few calls, all
//! methods of [`Fsync`], the switch that says whether they really sync:
//!
//! * [`Fsync::sync_data`] / [`Fsync::sync_all`]: `fdatasync` / `fsync` of
//!   an open file;
//! * [`Fsync::sync_dir`]: `fsync` of a directory, which makes creations,
//!   renames and deletions inside it durable;
//! * [`Fsync::durable_rename`]: fsync the file, rename it, fsync the
//!   directory — after it returns the new name survives a power cut with its
//!   contents;
//! * [`Fsync::write_atomically`]: temp file, write, fsync, durable rename —
//!   a reader sees either the old file or the complete new one, never a torn
//!   one;
//! * [`Fsync::create_dir_all`]: every directory it creates, and the
//!   existing parent it creates them in, is fsynced into its parent.
//!
//! The switch is a value held by whoever writes (the spool, the `file://`
//! store, `wal-fetch`), never a process-wide flag: [`Fsync::On`] everywhere
//! except in tests that do not test durability, which pass [`Fsync::Off`]
//! (or set `WALSAFE_UNSAFE_NO_FSYNC=1` in the environment of a walsafe
//! process they start, read once by [`Fsync::from_env`]).
//!
//! # Failpoints
//!
//! Built with the `failpoints` feature, each primitive passes a failpoint
//! of the `fail` crate first, so that tests can make a real process meet
//! what a real disk rarely does on demand (a failed fsync, ENOSPC, EIO):
//!
//! | failpoint | where |
//! | --- | --- |
//! | `durable::sync_data` | before every `fdatasync` |
//! | `durable::sync_all` | before every `fsync` of a file |
//! | `durable::sync_dir` | before every `fsync` of a directory |
//! | `durable::rename` | before the rename of [`Fsync::durable_rename`] |
//!
//! A failpoint configured as `return(ENOSPC)` (or `EIO`, `EDQUOT`, any
//! errno name below, or a number) fails the call with that OS error.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Environment variable that turns fsync off in a walsafe process (tests only).
pub const NO_FSYNC_ENV: &str = "WALSAFE_UNSAFE_NO_FSYNC";

/// Whether the durability primitives really sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fsync {
    /// Every primitive syncs: the only setting for real use.
    #[default]
    On,
    /// Nothing is synced. For tests only: a crash of the machine (not of
    /// the process) may then lose acknowledged WAL.
    Off,
}

/// The OS error a failpoint's `return(...)` argument names.
pub fn failpoint_error(arg: Option<String>) -> io::Error {
    let code = match arg.as_deref().map(str::trim) {
        Some("ENOSPC") | None => libc::ENOSPC,
        Some("EIO") => libc::EIO,
        Some("EDQUOT") => libc::EDQUOT,
        Some("EACCES") => libc::EACCES,
        Some("EROFS") => libc::EROFS,
        Some(other) => other.parse().unwrap_or(libc::EIO),
    };
    io::Error::from_raw_os_error(code)
}

/// Fails with the failpoint's error when `name` is configured (a no-op
/// unless built with the `failpoints` feature).
macro_rules! failpoint {
    ($name:literal) => {
        fail::fail_point!($name, |arg| Err($crate::durable::failpoint_error(arg)))
    };
}

impl Fsync {
    /// [`Fsync::Off`] when `WALSAFE_UNSAFE_NO_FSYNC=1`, else [`Fsync::On`].
    pub fn from_env() -> Fsync {
        if std::env::var_os(NO_FSYNC_ENV).is_some_and(|v| v == "1") {
            Fsync::Off
        } else {
            Fsync::On
        }
    }

    fn on(self) -> bool {
        self == Fsync::On
    }

    /// `fdatasync`: the file's data (and the metadata needed to read it back).
    pub fn sync_data(self, file: &File) -> io::Result<()> {
        failpoint!("durable::sync_data");
        if !self.on() {
            return Ok(());
        }
        timed(|| file.sync_data())
    }

    /// `fsync`: the file's data and all its metadata.
    pub fn sync_all(self, file: &File) -> io::Result<()> {
        failpoint!("durable::sync_all");
        if !self.on() {
            return Ok(());
        }
        timed(|| file.sync_all())
    }

    /// `fsync` of a directory, making entries created, renamed or removed in it durable.
    pub fn sync_dir(self, dir: &Path) -> io::Result<()> {
        failpoint!("durable::sync_dir");
        if !self.on() {
            return Ok(());
        }
        let d = File::open(dir)?;
        timed(|| d.sync_all())
    }

    /// Renames `from` to `to` durably: fsync `from`, rename, fsync the
    /// directory (both directories when they differ).
    pub fn durable_rename(self, from: &Path, to: &Path) -> io::Result<()> {
        {
            let f = File::open(from)?;
            self.sync_all(&f)?;
        }
        failpoint!("durable::rename");
        std::fs::rename(from, to)?;
        self.sync_dir(parent_of(to))?;
        if parent_of(from) != parent_of(to) {
            self.sync_dir(parent_of(from))?;
        }
        Ok(())
    }

    /// Removes a file and makes the removal durable.
    pub fn durable_remove(self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)?;
        self.sync_dir(parent_of(path))
    }

    /// Writes `bytes` to `path` so that a crash leaves either the old file
    /// or the whole new one: temp file, write, fsync, durable rename.
    pub fn write_atomically(self, path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let tmp = temp_path_for(path);
        let result = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&tmp)?;
            f.write_all(bytes)?;
            self.sync_all(&f)?;
            drop(f);
            self.durable_rename(&tmp, path)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// Creates `dir` and its missing parents, each made durable in the
    /// directory that holds it: every newly created directory is fsynced
    /// into its parent, the pre-existing parent included.
    pub fn create_dir_all(self, dir: &Path) -> io::Result<()> {
        if dir.is_dir() {
            return Ok(());
        }
        let mut missing = Vec::new();
        let mut cur = dir;
        while !cur.is_dir() {
            missing.push(cur.to_path_buf());
            match cur.parent() {
                Some(p) if !p.as_os_str().is_empty() => cur = p,
                _ => break,
            }
        }
        for d in missing.iter().rev() {
            match std::fs::create_dir(d) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && d.is_dir() => {}
                Err(e) => return Err(e),
            }
            self.sync_dir(parent_of(d))?;
        }
        Ok(())
    }
}

fn timed(f: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
    let started = Instant::now();
    let r = f();
    crate::metrics::observe_fsync(started.elapsed());
    r
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// A temporary name beside `path`, unique within this process.
pub fn temp_path_for(path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    parent_of(path).join(format!(".{name}.walsafe-tmp.{}.{n}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomically_replaces_whole_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        Fsync::On.write_atomically(&p, b"one", 0o600).unwrap();
        Fsync::On.write_atomically(&p, b"two!", 0o600).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two!");
        // No temp files left behind.
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn durable_rename_moves() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        std::fs::write(&a, b"x").unwrap();
        Fsync::On.durable_rename(&a, &d.path().join("b")).unwrap();
        assert!(!a.exists());
        assert_eq!(std::fs::read(d.path().join("b")).unwrap(), b"x");
    }

    #[test]
    fn create_dir_all_makes_every_missing_level() {
        let d = tempfile::tempdir().unwrap();
        let deep = d.path().join("a/b/c");
        Fsync::On.create_dir_all(&deep).unwrap();
        assert!(deep.is_dir());
        // Existing: nothing to do, no error.
        Fsync::On.create_dir_all(&deep).unwrap();
        // A file in the way is an error, not a silent success.
        let f = d.path().join("file");
        std::fs::write(&f, b"x").unwrap();
        assert!(Fsync::On.create_dir_all(&f.join("sub")).is_err());
    }

    #[test]
    fn failpoint_errors_name_their_errno() {
        assert_eq!(
            failpoint_error(Some("ENOSPC".into())).raw_os_error(),
            Some(libc::ENOSPC)
        );
        assert_eq!(
            failpoint_error(Some("EIO".into())).raw_os_error(),
            Some(libc::EIO)
        );
        assert_eq!(failpoint_error(None).raw_os_error(), Some(libc::ENOSPC));
    }
}
