//! A real small filesystem for the tests that fill one: a tmpfs of a
//! given size mounted on a directory (the tests run as root), owned by the
//! `postgres` user, unmounted when dropped (even when the test fails).

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct TmpFs {
    path: PathBuf,
}

impl TmpFs {
    /// Mounts a tmpfs of `size` (e.g. "6m") on `path` (created). Panics with
    /// the reason when mounting is impossible: the test needs a real full
    /// disk and must not pass without one.
    pub fn mount(path: &Path, size: &str) -> TmpFs {
        std::fs::create_dir_all(path).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(path)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "cannot mount a tmpfs on {} (the full-disk tests need root): {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        super::pg::chown_postgres(path);
        TmpFs {
            path: path.to_path_buf(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Fills the filesystem with one file of zeros (until ENOSPC).
    pub fn fill(&self) -> PathBuf {
        let f = self.path.join("filler");
        let _ = Command::new("dd")
            .args(["if=/dev/zero", "bs=64k"])
            .arg(format!("of={}", f.display()))
            .output();
        f
    }
}

impl Drop for TmpFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).output();
    }
}
