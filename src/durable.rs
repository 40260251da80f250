//! Durability primitives, in one place.
//!
//! Everything walsafe promises about crashes rests on these few calls:
//!
//! * [`sync_data`] / [`sync_all`]: `fdatasync` / `fsync` of an open file;
//! * [`sync_dir`]: `fsync` of a directory, which makes creations, renames
//!   and deletions inside it durable;
//! * [`durable_rename`]: fsync the file, rename it, fsync the directory —
//!   after it returns the new name survives a power cut with its contents;
//! * [`write_atomically`]: temp file, write, fsync, durable rename — a
//!   reader sees either the old file or the complete new one, never a torn
//!   one.
//!
//! Tests that do not test durability may switch fsync off with
//! [`set_fsync_enabled`] (or `WALSAFE_UNSAFE_NO_FSYNC=1` in the environment
//! of a process); nothing else may.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

static FSYNC_ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns fsync on or off for this process. Off is for tests only: with it,
/// a crash of the machine (not of the process) may lose acknowledged WAL.
pub fn set_fsync_enabled(enabled: bool) {
    FSYNC_ENABLED.store(enabled, Ordering::Relaxed);
}

/// Reads `WALSAFE_UNSAFE_NO_FSYNC` once at start-up.
pub fn init_from_env() {
    if std::env::var_os("WALSAFE_UNSAFE_NO_FSYNC").is_some_and(|v| v == "1") {
        set_fsync_enabled(false);
    }
}

fn enabled() -> bool {
    FSYNC_ENABLED.load(Ordering::Relaxed)
}

fn timed(f: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
    let started = Instant::now();
    let r = f();
    crate::metrics::observe_fsync(started.elapsed());
    r
}

/// `fdatasync`: the file's data (and the metadata needed to read it back).
pub fn sync_data(file: &File) -> io::Result<()> {
    if !enabled() {
        return Ok(());
    }
    timed(|| file.sync_data())
}

/// `fsync`: the file's data and all its metadata.
pub fn sync_all(file: &File) -> io::Result<()> {
    if !enabled() {
        return Ok(());
    }
    timed(|| file.sync_all())
}

/// `fsync` of a directory, making entries created, renamed or removed in it durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    if !enabled() {
        return Ok(());
    }
    let d = File::open(dir)?;
    timed(|| d.sync_all())
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Renames `from` to `to` durably: fsync `from`, rename, fsync the directory
/// (both directories when they differ).
pub fn durable_rename(from: &Path, to: &Path) -> io::Result<()> {
    {
        let f = File::open(from)?;
        sync_all(&f)?;
    }
    std::fs::rename(from, to)?;
    sync_dir(parent_of(to))?;
    if parent_of(from) != parent_of(to) {
        sync_dir(parent_of(from))?;
    }
    Ok(())
}

/// Removes a file and makes the removal durable.
pub fn durable_remove(path: &Path) -> io::Result<()> {
    std::fs::remove_file(path)?;
    sync_dir(parent_of(path))
}

/// A temporary name beside `path`, unique within this process.
pub fn temp_path_for(path: &Path) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    parent_of(path).join(format!(".{name}.walsafe-tmp.{}.{n}", std::process::id()))
}

/// Writes `bytes` to `path` so that a crash leaves either the old file or the
/// whole new one: temp file, write, fsync, durable rename.
pub fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = temp_path_for(path);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        sync_all(&f)?;
        drop(f);
        durable_rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Creates `dir` (and parents) and makes its entry durable.
pub fn create_dir_all_durably(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    sync_dir(parent_of(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomically_replaces_whole_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        write_atomically(&p, b"one", 0o600).unwrap();
        write_atomically(&p, b"two!", 0o600).unwrap();
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
        durable_rename(&a, &d.path().join("b")).unwrap();
        assert!(!a.exists());
        assert_eq!(std::fs::read(d.path().join("b")).unwrap(), b"x");
    }
}
