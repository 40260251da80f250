//! logging: `tracing` to stderr (journald adds time and unit) or to a file
//! that SIGHUP reopens (for logrotate), as plain text or JSON lines.
//! Colour codes only on a terminal, and never with `NO_COLOR` set.
//!
//! Secrets never reach a log line: passwords live in types whose `Debug`
//! and `Display` redact them (see `pg::conninfo`), keys print only their
//! id, and object-store errors are scrubbed of credentials.

use std::fs::{File, OpenOptions};
use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use crate::report::LogFormat;

/// A log file that can be reopened in place (after logrotate moved it).
#[derive(Clone)]
pub struct ReopenableFile {
    path: PathBuf,
    file: Arc<Mutex<File>>,
}

impl ReopenableFile {
    /// Opens `path` for appending (creating it, mode 0640).
    pub fn open(path: &Path) -> io::Result<Self> {
        Ok(ReopenableFile {
            path: path.to_path_buf(),
            file: Arc::new(Mutex::new(Self::open_file(path)?)),
        })
    }

    fn open_file(path: &Path) -> io::Result<File> {
        use std::os::unix::fs::OpenOptionsExt;
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(path)
    }

    /// Reopens the file by name; on failure keeps writing to the old one.
    pub fn reopen(&self) -> io::Result<()> {
        let f = Self::open_file(&self.path)?;
        *self.file.lock().unwrap_or_else(|e| e.into_inner()) = f;
        Ok(())
    }
}

/// One write of a log line into the shared file.
pub struct FileGuard<'a>(std::sync::MutexGuard<'a, File>);

impl Write for FileGuard<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl<'a> MakeWriter<'a> for ReopenableFile {
    type Writer = FileGuard<'a>;
    fn make_writer(&'a self) -> Self::Writer {
        FileGuard(self.file.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Whether log lines carry colour codes: only for a person at a terminal
/// (never into PostgreSQL's server log, where `wal-fetch` and `wal-push`
/// write, nor into journald or a file), and never when `NO_COLOR` is set
/// to anything but the empty string (<https://no-color.org>).
fn colour(terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Installs the global subscriber. Returns the log file handle (if any),
/// for SIGHUP to reopen. `WALSAFE_LOG` sets the filter (default `info`).
pub fn init(format: LogFormat, file: Option<&Path>) -> io::Result<Option<ReopenableFile>> {
    let filter =
        || EnvFilter::try_from_env("WALSAFE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter());
    match file {
        None => {
            let b = builder.with_writer(io::stderr).with_ansi(colour(
                io::stderr().is_terminal(),
                std::env::var_os("NO_COLOR"),
            ));
            let _ = match format {
                LogFormat::Plain => b.try_init(),
                LogFormat::Json => b.json().try_init(),
            };
            Ok(None)
        }
        Some(path) => {
            let f = ReopenableFile::open(path)?;
            let b = builder.with_writer(f.clone()).with_ansi(false);
            let _ = match format {
                LogFormat::Plain => b.try_init(),
                LogFormat::Json => b.json().try_init(),
            };
            Ok(Some(f))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(colour(true, Some("".into())), "NO_COLOR empty is unset");
        assert!(!colour(true, Some("1".into())));
        assert!(!colour(false, None));
    }

    #[test]
    fn reopen_follows_a_rotated_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("walsafe.log");
        let f = ReopenableFile::open(&p).unwrap();
        f.make_writer().write_all(b"one\n").unwrap();
        std::fs::rename(&p, d.path().join("walsafe.log.1")).unwrap();
        f.make_writer().write_all(b"two\n").unwrap(); // still the old file
        f.reopen().unwrap();
        f.make_writer().write_all(b"three\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(d.path().join("walsafe.log.1")).unwrap(),
            "one\ntwo\n"
        );
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "three\n");
    }
}
