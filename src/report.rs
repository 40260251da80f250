//! report: how walsafe speaks to people and to the programs that call it.
//!
//! A leaf module (it imports nothing of walsafe's), so that every stage and
//! every command can use it without pulling the command line in:
//!
//! * the exit-code contract of the commands PostgreSQL and scripts rely on;
//! * [`error_line`]: an error and its causes on one line, for logs and stderr;
//! * [`LogFormat`]: plain text or JSON lines;
//! * [`human_bytes`] and [`human_age`]: sizes and ages for screens.
//!
//! | command      | exit codes |
//! | ------------ | ---------- |
//! | `wal-fetch`  | 0 restored, [`EXIT_NOT_FOUND`] proven absent, [`EXIT_FATAL`] anything else (PostgreSQL then aborts recovery rather than promote early) |
//! | `wal-verify` | 0 no gap, 1 gaps, [`EXIT_VERIFY_ERROR`] error |
//! | `status`     | 0 status read (whatever it says), 1 it could not be read (e.g. repository unreachable) |
//! | `check`      | 0 nothing FAILED, 1 at least one item FAILED |
//! | others       | 0 success, 1 failure |

/// Exit code of `wal-fetch` when the file is proven absent from the archive.
pub const EXIT_NOT_FOUND: u8 = 1;
/// Exit code of `wal-fetch` for anything that must abort recovery
/// (PostgreSQL treats exit codes above 125 as fatal).
pub const EXIT_FATAL: u8 = 126;
/// Exit code of `wal-verify` when it could not verify at all.
pub const EXIT_VERIFY_ERROR: u8 = 2;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Plain text, for journald (which adds time and unit).
    Plain,
    /// One JSON object per line.
    Json,
}

/// An error and its causes on one line, each cause once: error types that
/// already print their source in their own message are not repeated.
pub fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// Bytes for humans: "16.0 MiB".
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} bytes");
    }
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

/// Seconds for humans: "0.4 s", "3 min 7 s", "2 h 5 min".
pub fn human_age(secs: f64) -> String {
    if secs < 60.0 {
        return format!("{secs:.1} s");
    }
    let s = secs as u64;
    if s < 3600 {
        format!("{} min {} s", s / 60, s % 60)
    } else if s < 86400 {
        format!("{} h {} min", s / 3600, (s % 3600) / 60)
    } else {
        format!("{} d {} h", s / 86400, (s % 86400) / 3600)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_line_says_each_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("wrapped: {0}")]
        struct Wrapping(#[source] std::io::Error);
        let io = std::io::Error::other("key id a, configured b");
        let e = anyhow::Error::new(Wrapping(io)).context("fetching X");
        assert_eq!(
            error_line(&e),
            "fetching X: wrapped: key id a, configured b"
        );
    }

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(16 << 20), "16.0 MiB");
        assert_eq!(human_bytes(12), "12 bytes");
        assert_eq!(human_age(0.44), "0.4 s");
        assert_eq!(human_age(187.0), "3 min 7 s");
    }
}
