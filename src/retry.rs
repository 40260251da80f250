//! Backoff, in one place: capped exponential delays with jitter, all from
//! `backon`.
//!
//! Two shapes of the same policy:
//!
//! * [`retry`] runs one operation until it succeeds, for every storage
//!   call (`repository::store`);
//! * [`Backoff`] hands out the delays of a loop that retries by itself and
//!   may reset on success: reconnecting to PostgreSQL (`upstream`), chunk
//!   uploads after a failure (`upload`).
//!
//! For [`retry`]:
//!
//! * at most [`RetryPolicy::attempts`] attempts in total (1 = no retry);
//! * between attempts, an exponentially growing delay starting at
//!   [`RetryPolicy::min_delay`], capped at [`RetryPolicy::max_delay`], with
//!   jitter (each delay is stretched by a random 0–100 %) so that many
//!   uploads failing together do not retry in lock-step;
//! * only errors the caller's classifier calls retryable are retried; a
//!   permanent error (permission denied, bad configuration, a conflict)
//!   returns at once.
//!
//! The helper returns the last error unchanged: when it is still retryable,
//! the attempts were exhausted, and the caller turns it into its own
//! "unreachable after N attempts" error (see
//! `repository::store::StoreError::Unreachable`).

use std::future::Future;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder, Retryable};

/// First delay between attempts.
pub const DEFAULT_MIN_DELAY: Duration = Duration::from_millis(100);
/// Longest delay between two attempts.
pub const DEFAULT_MAX_DELAY: Duration = Duration::from_secs(5);

/// How often and how patiently to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in total, the first included; 0 is treated as 1.
    pub attempts: u32,
    /// Delay before the second attempt.
    pub min_delay: Duration,
    /// Cap on any single delay.
    pub max_delay: Duration,
}

impl RetryPolicy {
    /// `attempts` attempts with the default delays.
    pub fn new(attempts: u32) -> Self {
        RetryPolicy {
            attempts,
            min_delay: DEFAULT_MIN_DELAY,
            max_delay: DEFAULT_MAX_DELAY,
        }
    }

    /// The total delay spent sleeping between attempts before jitter (which
    /// stretches each delay by up to 100 %), for messages and tests.
    pub fn max_total_delay(&self) -> Duration {
        let mut total = Duration::ZERO;
        let mut d = self.min_delay;
        for _ in 1..self.attempts.max(1) {
            total += d.min(self.max_delay);
            d = d.saturating_mul(2);
        }
        total
    }

    fn backoff(&self) -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_min_delay(self.min_delay)
            .with_max_delay(self.max_delay)
            .with_factor(2.0)
            .with_jitter()
            .with_max_times(self.attempts.max(1) as usize - 1)
    }
}

/// The delays of a retrying loop: `min`, doubling up to `max`, each
/// stretched by a random 0–100 % (jitter); never exhausted. [`Backoff::reset`]
/// after a success starts again from `min`.
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    current: backon::ExponentialBackoff,
}

impl Backoff {
    /// Delays from `min` doubling up to `max`.
    pub fn new(min: Duration, max: Duration) -> Backoff {
        let builder = ExponentialBuilder::default()
            .with_min_delay(min)
            .with_max_delay(max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        Backoff {
            current: builder.build(),
            builder,
        }
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        self.current
            .next()
            .expect("a backoff without max_times never ends")
    }

    /// Starts again from the first delay.
    pub fn reset(&mut self) {
        self.current = self.builder.build();
    }
}

/// Runs `op` until it succeeds, fails with an error `is_retryable` rejects,
/// or `policy.attempts` attempts have failed; returns the last result.
///
/// `what` names the operation in the log line written before each retry.
pub async fn retry<T, E, F, Fut>(
    policy: &RetryPolicy,
    what: &str,
    is_retryable: impl Fn(&E) -> bool,
    op: F,
) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    op.retry(policy.backoff())
        .sleep(tokio::time::sleep)
        .when(|e| is_retryable(e))
        .notify(|e, delay| {
            tracing::warn!("{what} failed ({e}); retrying in {delay:.1?}");
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn fast(attempts: u32) -> RetryPolicy {
        RetryPolicy {
            attempts,
            min_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(2),
        }
    }

    #[tokio::test]
    async fn retries_retryable_errors_up_to_the_attempt_count() {
        let calls = AtomicU32::new(0);
        let r: Result<(), String> = retry(
            &fast(4),
            "test op",
            |_| true,
            || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err("transient".to_string())
            },
        )
        .await;
        assert_eq!(r.unwrap_err(), "transient");
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn permanent_errors_return_at_once() {
        let calls = AtomicU32::new(0);
        let r: Result<(), String> = retry(
            &fast(5),
            "test op",
            |e: &String| e != "permanent",
            || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err("permanent".to_string())
            },
        )
        .await;
        assert!(r.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn success_after_failures_is_returned() {
        let calls = AtomicU32::new(0);
        let r: Result<u32, String> = retry(
            &fast(5),
            "test op",
            |_| true,
            || async {
                let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                if n < 3 {
                    Err(format!("fail {n}"))
                } else {
                    Ok(n)
                }
            },
        )
        .await;
        assert_eq!(r.unwrap(), 3);
    }

    #[tokio::test]
    async fn one_attempt_means_no_retry() {
        let calls = AtomicU32::new(0);
        let _ = retry(
            &fast(1),
            "test op",
            |_: &String| true,
            || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>("x".to_string())
            },
        )
        .await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn max_total_delay_is_capped_exponential() {
        let p = RetryPolicy {
            attempts: 5,
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(300),
        };
        // 100 + 200 + 300 + 300
        assert_eq!(p.max_total_delay(), Duration::from_millis(900));
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_and_resets() {
        let min = Duration::from_millis(100);
        let max = Duration::from_millis(400);
        let mut b = Backoff::new(min, max);
        let d: Vec<Duration> = (0..5).map(|_| b.next_delay()).collect();
        // Jitter stretches each delay by up to 100 %.
        for (got, base) in d.iter().zip([100, 200, 400, 400, 400]) {
            let base = Duration::from_millis(base);
            assert!(*got >= base && *got <= base * 2, "{d:?}");
        }
        b.reset();
        assert!(b.next_delay() <= min * 2);
    }
}
