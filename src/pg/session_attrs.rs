//! libpq's `target_session_attrs`: which of the conninfo's hosts a
//! connection accepts, shared by the replication connection
//! ([`super::replication`]) and the SQL connection ([`super::sql`]).
//!
//! # What each value accepts (libpq's meaning)
//!
//! ```text
//! any             every session (the default)
//! read-write      read-only = off     where read-only = default_transaction_read_only
//! read-only       read-only = on                        or in hot standby
//! primary         not in hot standby
//! standby         in hot standby
//! prefer-standby  pass 1: standby; no host is one → pass 2: any
//! ```
//!
//! `default_transaction_read_only = on` makes a primary read-only for
//! read-write/read-only, but not a standby for primary/standby.
//!
//! # How a session is judged
//!
//! ```text
//!                      PostgreSQL 14+ (ParameterStatus     older servers
//!                      at startup, no round trip)
//! read-only            default_transaction_read_only,      SHOW transaction_read_only
//!                      in_hot_standby
//! in hot standby       in_hot_standby                      SQL: SELECT pg_is_in_recovery()
//!                                                          walsender: see below
//! ```
//!
//! A physical walsender takes `SHOW` (PostgreSQL 10+) but no `SELECT`, and
//! PostgreSQL 13 reports no `in_hot_standby`. Its `SHOW` runs in a
//! transaction, whose `transaction_read_only` is
//! `default_transaction_read_only OR RecoveryInProgress()`, so:
//!
//! ```text
//! SHOW transaction_read_only = off                  → not in recovery
//! … = on, SHOW default_transaction_read_only = off  → in recovery
//! both on                                           → ask a second, short-lived
//!     session started with default_transaction_read_only=off (a startup
//!     parameter): its transaction_read_only is the recovery state
//! ```
//!
//! # Invariants
//!
//! - A host that does not match is closed and the next one tried, in
//!   order; a failed connection or check moves on too (as libpq does).
//! - When no host matches and at least one was skipped for what it is (not
//!   only unreachable), the error is [`PgError::NoSuitableHost`], naming
//!   every host and why it was skipped; it is retryable while any host
//!   may change (a standby being promoted, a primary coming back).
//!   Otherwise the last connection error is returned unchanged.

use std::future::Future;

use crate::pg::conninfo::{ConnParams, Target, TargetSessionAttrs};
use crate::pg::error::{Mismatch, PgError, SkipReason, SkippedHost};

/// What [`connect_matching`] needs to know of an open session.
pub(crate) trait Session: Sized {
    /// A parameter the server reported at startup (ParameterStatus).
    fn reported(&self, name: &str) -> Option<&str>;
    /// `SHOW name`, as text.
    fn show(&mut self, name: &str) -> impl Future<Output = Result<String, PgError>> + Send;
    /// Whether the server is in recovery; asked only when it did not
    /// report `in_hot_standby` (before PostgreSQL 14).
    fn in_recovery(
        &mut self,
        params: &ConnParams,
        target: &Target,
        application_name: &str,
    ) -> impl Future<Output = Result<bool, PgError>> + Send;
    /// Closes a session that is not wanted.
    fn close(self) -> impl Future<Output = ()> + Send;
}

/// Connects (with `connect`) to each host of `params` in order and returns
/// the first session `params.target_session_attrs` accepts; `kind` names
/// the connection in logs.
pub(crate) async fn connect_matching<'a, S, F, Fut>(
    params: &'a ConnParams,
    application_name: &str,
    kind: &str,
    mut connect: F,
) -> Result<S, PgError>
where
    S: Session,
    F: FnMut(&'a Target) -> Fut,
    Fut: Future<Output = Result<S, PgError>>,
{
    use TargetSessionAttrs::*;
    let attrs = params.target_session_attrs;
    let single = [attrs];
    let passes: &[TargetSessionAttrs] = match attrs {
        PreferStandby => &[Standby, Any],
        _ => &single,
    };
    let several = params.targets.len() > 1;
    // The latest reason per host (prefer-standby tries each twice).
    let mut skipped: Vec<Option<SkippedHost>> = params.targets.iter().map(|_| None).collect();
    let mut any_mismatch = false;
    let mut last = None;
    for &want in passes {
        for (i, target) in params.targets.iter().enumerate() {
            let failed = |e: PgError| SkippedHost {
                target: target.to_string(),
                reason: SkipReason::Failed(Box::new(e)),
                attrs,
            };
            let mut session = match connect(target).await {
                Ok(s) => s,
                Err(e) => {
                    if several {
                        tracing::warn!(%target, "{kind} connection failed: {e}");
                    }
                    last = Some(i);
                    skipped[i] = Some(failed(e));
                    continue;
                }
            };
            match mismatch(&mut session, want, params, target, application_name).await {
                Ok(None) => return Ok(session),
                Ok(Some(m)) => {
                    session.close().await;
                    tracing::info!(%target, "{kind} connection: host {m}, skipped (target_session_attrs={attrs})");
                    any_mismatch = true;
                    skipped[i] = Some(SkippedHost {
                        target: target.to_string(),
                        reason: SkipReason::Mismatch(m),
                        attrs,
                    });
                }
                Err(e) => {
                    session.close().await;
                    tracing::warn!(%target, "{kind} connection: checking target_session_attrs={attrs} failed: {e}");
                    last = Some(i);
                    skipped[i] = Some(failed(e));
                }
            }
        }
    }
    if !any_mismatch {
        // Only unreachable hosts: the last error, as without target_session_attrs.
        return Err(match last.and_then(|i| skipped[i].take()) {
            Some(SkippedHost {
                reason: SkipReason::Failed(e),
                ..
            }) => *e,
            _ => PgError::InvalidState("the conninfo names no host"),
        });
    }
    let hosts = skipped.into_iter().flatten().collect();
    Err(PgError::NoSuitableHost { attrs, hosts })
}

/// Why `session` does not fit `want`, `None` when it does.
async fn mismatch<S: Session>(
    session: &mut S,
    want: TargetSessionAttrs,
    params: &ConnParams,
    target: &Target,
    application_name: &str,
) -> Result<Option<Mismatch>, PgError> {
    use TargetSessionAttrs::*;
    Ok(match want {
        Any => None,
        ReadWrite => {
            if !read_only(session).await? {
                None
            } else if in_hot_standby(session, params, target, application_name).await? {
                Some(Mismatch::InRecovery)
            } else {
                Some(Mismatch::ReadOnly)
            }
        }
        ReadOnly => (!read_only(session).await?).then_some(Mismatch::ReadWrite),
        Primary => in_hot_standby(session, params, target, application_name)
            .await?
            .then_some(Mismatch::InRecovery),
        Standby | PreferStandby => (!in_hot_standby(session, params, target, application_name)
            .await?)
            .then_some(Mismatch::NotInRecovery),
    })
}

/// Whether transactions are read-only by default in this session.
async fn read_only<S: Session>(session: &mut S) -> Result<bool, PgError> {
    match (
        session.reported("default_transaction_read_only"),
        session.reported("in_hot_standby"),
    ) {
        (Some(d), Some(h)) => Ok(d == "on" || h == "on"),
        _ => Ok(session.show("transaction_read_only").await? == "on"),
    }
}

/// Whether the server is in hot standby.
async fn in_hot_standby<S: Session>(
    session: &mut S,
    params: &ConnParams,
    target: &Target,
    application_name: &str,
) -> Result<bool, PgError> {
    match session.reported("in_hot_standby") {
        Some(h) => Ok(h == "on"),
        None => session.in_recovery(params, target, application_name).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A session whose answers are given; counts the questions.
    struct Fake {
        reported: HashMap<&'static str, &'static str>,
        shows: HashMap<&'static str, &'static str>,
        in_recovery: bool,
        asked: Vec<String>,
    }

    impl Fake {
        fn v14(in_hot_standby: bool, default_read_only: bool) -> Fake {
            let on = |b| if b { "on" } else { "off" };
            Fake {
                reported: HashMap::from([
                    ("in_hot_standby", on(in_hot_standby)),
                    ("default_transaction_read_only", on(default_read_only)),
                ]),
                shows: HashMap::new(),
                in_recovery: in_hot_standby,
                asked: Vec::new(),
            }
        }
        fn v13(in_recovery: bool, default_read_only: bool) -> Fake {
            let on = |b| if b { "on" } else { "off" };
            Fake {
                reported: HashMap::new(),
                shows: HashMap::from([
                    (
                        "transaction_read_only",
                        on(in_recovery || default_read_only),
                    ),
                    ("default_transaction_read_only", on(default_read_only)),
                ]),
                in_recovery,
                asked: Vec::new(),
            }
        }
    }

    impl Session for Fake {
        fn reported(&self, name: &str) -> Option<&str> {
            self.reported.get(name).copied()
        }
        async fn show(&mut self, name: &str) -> Result<String, PgError> {
            self.asked.push(format!("SHOW {name}"));
            Ok(self.shows[name].to_string())
        }
        async fn in_recovery(
            &mut self,
            _: &ConnParams,
            _: &Target,
            _: &str,
        ) -> Result<bool, PgError> {
            self.asked.push("in_recovery".into());
            Ok(self.in_recovery)
        }
        async fn close(self) {}
    }

    #[tokio::test]
    async fn libpq_decision_table() {
        use Mismatch::{InRecovery, NotInRecovery};
        use TargetSessionAttrs::{Any, Primary, Standby};
        const RO: Option<Mismatch> = Some(Mismatch::ReadOnly);
        const RW: Option<Mismatch> = Some(Mismatch::ReadWrite);
        let (read_write, read_only) = (TargetSessionAttrs::ReadWrite, TargetSessionAttrs::ReadOnly);
        let params = ConnParams::parse_with_env("host=h", &|_| None).unwrap();
        let target = params.targets[0].clone();
        // (in recovery, default_transaction_read_only) → expected per value.
        let cases = [
            ((false, false), [None, None, RW, None, Some(NotInRecovery)]),
            (
                (true, false),
                [None, Some(InRecovery), None, Some(InRecovery), None],
            ),
            ((false, true), [None, RO, None, None, Some(NotInRecovery)]),
            (
                (true, true),
                [None, Some(InRecovery), None, Some(InRecovery), None],
            ),
        ];
        for ((rec, dro), expected) in cases {
            for (want, exp) in [Any, read_write, read_only, Primary, Standby]
                .into_iter()
                .zip(expected)
            {
                for mut s in [Fake::v14(rec, dro), Fake::v13(rec, dro)] {
                    let old = s.reported.is_empty();
                    let got = mismatch(&mut s, want, &params, &target, "t").await.unwrap();
                    assert_eq!(got, exp, "{want} recovery={rec} read_only={dro} old={old}");
                    if !old {
                        assert!(s.asked.is_empty(), "14+ needs no round trip: {:?}", s.asked);
                    }
                }
            }
        }
    }

    #[test]
    fn skipped_hosts_read_well() {
        let h = SkippedHost {
            target: "b port 5433".into(),
            reason: SkipReason::Mismatch(Mismatch::InRecovery),
            attrs: TargetSessionAttrs::ReadWrite,
        };
        assert_eq!(
            h.to_string(),
            "host b port 5433 is in recovery (target_session_attrs=read-write)"
        );
        assert!(h.is_retryable());
        let e = PgError::NoSuitableHost {
            attrs: TargetSessionAttrs::ReadWrite,
            hosts: vec![
                h,
                SkippedHost {
                    target: "a port 5432".into(),
                    reason: SkipReason::Failed(Box::new(PgError::Connect {
                        target: "a port 5432".into(),
                        source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
                    })),
                    attrs: TargetSessionAttrs::ReadWrite,
                },
            ],
        };
        assert!(e.is_retryable());
        let text = e.to_string();
        assert!(
            text.contains("host b port 5433 is in recovery (target_session_attrs=read-write); host a port 5432: could not connect"),
            "{text}"
        );
    }
}
