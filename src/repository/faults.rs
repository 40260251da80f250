//! Faults on demand: a seam in the store for tests that need storage to
//! fail, slow down or hang at a chosen moment, which a real server cannot
//! be made to do on cue (stopping one is the other way, used by the
//! outage tests).
//!
//! A [`Faults`] handle is attached to a [`super::Store`] with
//! `Store::with_faults`; before every attempt of an operation the store
//! asks it what to do. Nothing is attached outside tests.
//!
//! ```text
//! faults.set(Some(Op::Put), Fault::Hang);   // every put waits until cleared
//! faults.set(None, Fault::Fail(Some(3)));   // the next 3 attempts of anything fail (transient)
//! faults.set(Some(Op::Get), Fault::Delay(500 ms));
//! faults.clear();                           // all released, hung calls continue
//! ```

use std::sync::Mutex;
use std::time::Duration;

/// A storage operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Put,
    Get,
    List,
    Delete,
}

impl Op {
    /// The operation of a store call named `op` ("put", "get", ...).
    pub fn of(op: &str) -> Option<Op> {
        match op {
            "put" => Some(Op::Put),
            "get" => Some(Op::Get),
            "list" => Some(Op::List),
            "delete" => Some(Op::Delete),
            _ => None,
        }
    }
}

/// What an attempt meets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// A transient failure (as a dropped connection would give): for the
    /// next `n` attempts, or for every attempt with `None`.
    Fail(Option<u32>),
    /// The attempt starts only after this long.
    Delay(Duration),
    /// The attempt waits until the fault is cleared.
    Hang,
}

/// The injected faults, shared between the test and the store.
#[derive(Debug, Default)]
pub struct Faults {
    rules: Mutex<Vec<Rule>>,
    calls: Mutex<Vec<Op>>,
}

/// A fault and what it applies to.
#[derive(Debug, Clone)]
struct Rule {
    op: Option<Op>,
    /// Keys starting with this (every key with `None`).
    key_prefix: Option<String>,
    fault: Fault,
}

impl Rule {
    fn matches(&self, op: Op, key: &str) -> bool {
        self.op.is_none_or(|o| o == op)
            && self
                .key_prefix
                .as_deref()
                .is_none_or(|p| key.starts_with(p))
    }
}

/// What one attempt is to do.
pub(super) enum Verdict {
    Proceed,
    Fail,
}

impl Faults {
    /// No faults yet.
    pub fn new() -> std::sync::Arc<Faults> {
        std::sync::Arc::new(Faults::default())
    }

    /// Adds a fault for `op` (every operation with `None`).
    pub fn set(&self, op: Option<Op>, fault: Fault) {
        self.lock_rules().push(Rule {
            op,
            key_prefix: None,
            fault,
        });
    }

    /// Adds a fault for `op` on keys starting with `key_prefix` (relative
    /// to the repository's prefix, e.g. `wal/00000002.history`).
    pub fn set_for(&self, op: Option<Op>, key_prefix: &str, fault: Fault) {
        self.lock_rules().push(Rule {
            op,
            key_prefix: Some(key_prefix.to_string()),
            fault,
        });
    }

    /// Removes every fault; hung attempts continue.
    pub fn clear(&self) {
        self.lock_rules().clear();
    }

    /// How many attempts of `op` were made (faulty or not).
    pub fn attempts(&self, op: Op) -> usize {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|o| **o == op)
            .count()
    }

    fn lock_rules(&self) -> std::sync::MutexGuard<'_, Vec<Rule>> {
        self.rules.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies the faults to one attempt of `op`: waits as they say, then
    /// says whether the attempt fails.
    pub(super) async fn attempt(&self, op: Op, key: &str) -> Verdict {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(op);
        loop {
            let now = {
                let mut rules = self.lock_rules();
                let i = rules.iter().position(|r| r.matches(op, key));
                match i {
                    None => return Verdict::Proceed,
                    Some(i) => {
                        let fault = rules[i].fault;
                        if let Fault::Fail(Some(n)) = fault {
                            if n <= 1 {
                                rules.remove(i);
                            } else {
                                rules[i].fault = Fault::Fail(Some(n - 1));
                            }
                        }
                        fault
                    }
                }
            };
            match now {
                Fault::Fail(_) => return Verdict::Fail,
                Fault::Delay(d) => {
                    tokio::time::sleep(d).await;
                    return Verdict::Proceed;
                }
                Fault::Hang => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn counted_failures_run_out_and_hangs_release() {
        let f = Faults::new();
        f.set(Some(Op::Put), Fault::Fail(Some(2)));
        assert!(matches!(f.attempt(Op::Get, "k").await, Verdict::Proceed));
        assert!(matches!(f.attempt(Op::Put, "k").await, Verdict::Fail));
        assert!(matches!(f.attempt(Op::Put, "k").await, Verdict::Fail));
        assert!(matches!(f.attempt(Op::Put, "k").await, Verdict::Proceed));
        f.set(None, Fault::Hang);
        let f2 = f.clone();
        let hung = tokio::spawn(async move { f2.attempt(Op::List, "k").await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!hung.is_finished());
        f.clear();
        assert!(matches!(hung.await.unwrap(), Verdict::Proceed));
        assert_eq!(f.attempts(Op::Put), 3);
        f.set_for(Some(Op::Get), "wal/00000002", Fault::Fail(None));
        assert!(matches!(
            f.attempt(Op::Get, "wal/00000001.x").await,
            Verdict::Proceed
        ));
        assert!(matches!(
            f.attempt(Op::Get, "wal/00000002.history").await,
            Verdict::Fail
        ));
    }
}
