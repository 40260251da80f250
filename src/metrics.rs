//! Metric names and recording helpers, all in one place.
//!
//! Every metric walsafe exports is named here with the `walsafe_` prefix and
//! its unit in the name, and described once in [`describe`].

use std::time::Duration;

/// Histogram of spool fsync durations.
pub const FSYNC_DURATION_SECONDS: &str = "walsafe_fsync_duration_seconds";

/// Records one fsync's duration.
pub fn observe_fsync(d: Duration) {
    metrics::histogram!(FSYNC_DURATION_SECONDS).record(d.as_secs_f64());
}

/// Describes every metric (call once, after installing the recorder).
pub fn describe() {
    metrics::describe_histogram!(
        FSYNC_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "Duration of spool fsyncs"
    );
}
