//! Progress of a long command (`backup`, `restore`): a bar on a terminal
//! (bytes, rate, ETA), a log line every [`LOG_EVERY`] otherwise.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use tracing::info;

use crate::backup::Progress;
use crate::report::human_bytes;

/// How often progress is logged when no terminal shows a bar.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// The progress of `what` ("base backup", "restore") on stderr.
pub fn on_stderr(what: &'static str) -> Box<dyn Progress> {
    if std::io::stderr().is_terminal() {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}",
            )
            .expect("a valid template"),
        );
        Box::new(Bar(bar))
    } else {
        Box::new(Lines {
            what,
            last: Instant::now(),
        })
    }
}

/// A bar on a terminal.
struct Bar(ProgressBar);

impl Progress for Bar {
    fn update(&mut self, done: u64, total: Option<u64>) {
        if let Some(t) = total {
            self.0.set_length(t.max(done));
        }
        self.0.set_position(done);
    }
    fn phase(&mut self, what: &str) {
        self.0.set_message(what.to_string());
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

/// Plain log lines, every [`LOG_EVERY`].
struct Lines {
    what: &'static str,
    last: Instant,
}

impl Progress for Lines {
    fn update(&mut self, done: u64, total: Option<u64>) {
        if self.last.elapsed() < LOG_EVERY {
            return;
        }
        self.last = Instant::now();
        let what = self.what;
        match total {
            Some(t) if t > 0 => info!(
                "{what}: {} of about {} ({:.0}%)",
                human_bytes(done),
                human_bytes(t),
                100.0 * done as f64 / t as f64
            ),
            _ => info!("{what}: {}", human_bytes(done)),
        }
    }
    fn phase(&mut self, what: &str) {
        info!("{}: {what}", self.what);
    }
}
