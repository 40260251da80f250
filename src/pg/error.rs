//! The error of every PostgreSQL connection, replication and SQL alike,
//! classified so that the caller knows whether to retry
//! ([`PgError::is_retryable`]) and the operator knows what to do (every
//! message names the fix).
//!
//! Server errors are mapped by SQLSTATE first and by message text second
//! (several distinct situations share one SQLSTATE, e.g. 55000). The
//! server's own error is kept in every variant that comes from the server
//! ([`ServerError`], with its SQLSTATE), so nothing is lost in translation.

use std::fmt;
use std::io;

use postgres_protocol::message::backend::{ErrorFields, ErrorResponseBody};
use tokio_postgres::fallible_iterator::FallibleIterator;

use crate::pg::conninfo::ConninfoError;
use crate::pg::conninfo::TargetSessionAttrs;
use crate::pg::lsn::{Lsn, TimelineId};
use crate::pg::tls::{io_error_is_transient, TlsError};

/// An ErrorResponse from the server, as sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerError {
    /// ERROR, FATAL or PANIC.
    pub severity: String,
    /// Five-character SQLSTATE.
    pub code: String,
    /// Primary message.
    pub message: String,
    /// Optional detail.
    pub detail: Option<String>,
    /// Optional hint.
    pub hint: Option<String>,
}

impl ServerError {
    /// Builds one from ErrorResponse/NoticeResponse fields (type byte, value).
    pub fn from_fields<'a>(fields: impl IntoIterator<Item = (u8, &'a [u8])>) -> Self {
        let mut e = ServerError {
            severity: String::new(),
            code: String::new(),
            message: String::new(),
            detail: None,
            hint: None,
        };
        for (t, v) in fields {
            let v = String::from_utf8_lossy(v).into_owned();
            match t {
                b'V' => e.severity = v,
                b'S' if e.severity.is_empty() => e.severity = v,
                b'C' => e.code = v,
                b'M' => e.message = v,
                b'D' => e.detail = Some(v),
                b'H' => e.hint = Some(v),
                _ => {}
            }
        }
        e
    }
}

/// The fields of an ErrorResponse or NoticeResponse, as (type byte, value).
pub fn error_fields(mut it: ErrorFields<'_>) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while let Ok(Some(f)) = it.next() {
        out.push((f.type_(), f.value_bytes().to_vec()));
    }
    out
}

/// The server's error in an ErrorResponse.
pub fn server_error(body: &ErrorResponseBody) -> ServerError {
    let fields = error_fields(body.fields());
    ServerError::from_fields(fields.iter().map(|(t, v)| (*t, &v[..])))
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} (SQLSTATE {})",
            self.severity, self.message, self.code
        )?;
        if let Some(d) = &self.detail {
            write!(f, "; DETAIL: {d}")?;
        }
        if let Some(h) = &self.hint {
            write!(f, "; HINT: {h}")?;
        }
        Ok(())
    }
}

/// Everything that can go wrong on a replication (or SQL) connection.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// The conninfo or the environment is invalid.
    #[error(transparent)]
    Conninfo(#[from] ConninfoError),

    /// TLS could not be set up as the sslmode demands (no TLS on the
    /// server, an untrusted or misnamed certificate, a bad key file, …).
    #[error(transparent)]
    Tls(#[from] TlsError),

    /// The TCP or Unix-socket connection could not be opened (refused,
    /// no such socket, unreachable, timed out).
    #[error("could not connect to PostgreSQL at {target}: {source}; is the server running and accepting connections there? (check [postgres] conninfo host/port, PGHOST/PGPORT)")]
    Connect {
        target: String,
        #[source]
        source: io::Error,
    },

    /// Reading or writing an established connection failed (reset, broken pipe).
    #[error("connection to {target} failed while {context}: {source}")]
    Io {
        target: String,
        context: String,
        #[source]
        source: io::Error,
    },

    /// The server closed the connection without a word.
    #[error("PostgreSQL at {target} closed the connection while {context}")]
    Closed { target: String, context: String },

    /// The server asked for a password and none is configured.
    #[error("PostgreSQL at {target} asks for a password for user \"{user}\" and none is configured; set password in [postgres] conninfo, PGPASSWORD or a line in the password file ({passfile})")]
    PasswordMissing {
        target: String,
        user: String,
        passfile: String,
    },

    /// The password (or the SCRAM exchange) was rejected.
    #[error("password authentication failed for user \"{user}\" at {target}; check [postgres] conninfo / PGPASSWORD / the password file ({server})")]
    AuthFailed {
        target: String,
        user: String,
        server: Box<ServerError>,
    },

    /// pg_hba.conf has no entry for, or rejects, this connection.
    #[error("pg_hba.conf has no replication entry for user \"{user}\" connecting to {target} ({server}); add `host replication {user} <walsafe's address>/32 scram-sha-256` (or `local replication {user} peer` for a Unix socket) to pg_hba.conf and reload PostgreSQL")]
    HbaRejected {
        target: String,
        user: String,
        server: Box<ServerError>,
    },

    /// The role does not exist or may not log in.
    #[error("role \"{user}\" cannot log in at {target} ({server}); create it with CREATE ROLE {user} LOGIN REPLICATION PASSWORD '...', or fix user in [postgres] conninfo")]
    RoleRejected {
        target: String,
        user: String,
        server: Box<ServerError>,
    },

    /// The role lacks the REPLICATION attribute.
    #[error("role \"{user}\" lacks the REPLICATION attribute; run ALTER ROLE {user} REPLICATION ({server})")]
    NotReplicationRole {
        user: String,
        server: Box<ServerError>,
    },

    /// The server asked for an authentication method walsafe cannot do.
    #[error("PostgreSQL at {target} asks for {method} authentication, which walsafe does not support; use scram-sha-256, md5, password or trust for this role in pg_hba.conf")]
    UnsupportedAuth { target: String, method: String },

    /// No host of the conninfo has the session `target_session_attrs` asks
    /// for: each was of the wrong kind (a standby where read-write is
    /// wanted, …) or could not be reached. Retryable while a host may still
    /// change (a standby being promoted, a primary coming back).
    #[error("no host in [postgres] conninfo has the session target_session_attrs={attrs} asks for: {}; will retry (a failover may be under way); if this persists, check the hosts in the conninfo and target_session_attrs", hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>().join("; "))]
    NoSuitableHost {
        attrs: TargetSessionAttrs,
        hosts: Vec<SkippedHost>,
    },

    /// All connection slots are taken (max_connections).
    #[error("PostgreSQL at {target} has no free connection slot ({server}); will retry; raise max_connections or close idle sessions if this persists")]
    TooManyConnections {
        target: String,
        server: Box<ServerError>,
    },

    /// All walsender slots are taken (max_wal_senders).
    #[error("PostgreSQL at {target} has no free WAL sender ({server}); will retry; raise max_wal_senders or stop other replication clients if this persists")]
    WalSendersExhausted {
        target: String,
        server: Box<ServerError>,
    },

    /// The server is starting up, shutting down, in crash recovery, or
    /// terminated the session (admin or crash shutdown).
    #[error("PostgreSQL at {target} is not available now ({server}); will retry")]
    ServerUnavailable {
        target: String,
        server: Box<ServerError>,
    },

    /// The slot is used by another process.
    #[error("replication slot \"{slot}\" is active for PID {}; is another walsafe running against this cluster? ({server})", pid.map(|p| p.to_string()).unwrap_or_else(|| "?".into()))]
    SlotActive {
        slot: String,
        pid: Option<u32>,
        server: Box<ServerError>,
    },

    /// The slot does not exist.
    #[error("replication slot \"{slot}\" does not exist ({server}); create it (walsafe creates its slot at start when missing) or fix [postgres] slot")]
    SlotMissing {
        slot: String,
        server: Box<ServerError>,
    },

    /// CREATE_REPLICATION_SLOT on a name that exists.
    #[error("replication slot \"{slot}\" already exists ({server})")]
    SlotExists {
        slot: String,
        server: Box<ServerError>,
    },

    /// The slot was invalidated (max_slot_wal_keep_size exceeded, idle too
    /// long, ...): it no longer protects WAL, which may or may not be gone.
    #[error("replication slot \"{slot}\" has been invalidated ({server}); walsafe re-creates it and streams on where it stopped if the server still has that WAL, else it records the lost range as a gap (then take a new base backup)")]
    SlotInvalidated {
        slot: String,
        server: Box<ServerError>,
    },

    /// The requested start position is in a segment the server already removed.
    #[error("the server has already removed WAL needed to stream from {start} on timeline {timeline} ({server}); the slot lost WAL or none was used, so a gap must be recorded and a new base backup taken; use a replication slot to prevent this")]
    WalRemoved {
        start: Lsn,
        timeline: TimelineId,
        server: Box<ServerError>,
    },

    /// START_REPLICATION beyond the end of the server's WAL: a standby that
    /// has not replayed as far as walsafe streamed (from the old primary),
    /// waiting to catch up or to be promoted.
    #[error("PostgreSQL at {target} has WAL only up to {}, but walsafe already holds WAL up to {start} on timeline {timeline} ({server}); waiting for the server to catch up or to be promoted (if it never will, [postgres] conninfo points at the wrong server)", flush.map_or("an unknown position".to_string(), |l| l.to_string()))]
    AheadOfServer {
        target: String,
        start: Lsn,
        timeline: TimelineId,
        flush: Option<Lsn>,
        server: Box<ServerError>,
    },

    /// START_REPLICATION at a point the server's history does not hold: the
    /// server's timeline forked off walsafe's timeline before that point
    /// (a failover to a server that was behind). The agent reads the
    /// server's history and continues on its timeline from the fork.
    #[error("the history of PostgreSQL at {target} forked off timeline {timeline} before {start}, where walsafe asked to stream from ({server}); walsafe continues on the server's timeline from the fork point")]
    NotInHistory {
        target: String,
        start: Lsn,
        timeline: TimelineId,
        server: Box<ServerError>,
    },

    /// wal_level is minimal.
    #[error("wal_level on the server is too low for replication ({server}); set wal_level = replica (or logical) and restart PostgreSQL")]
    WalLevelTooLow { server: Box<ServerError> },

    /// The server is too old for the command.
    #[error(
        "{what} needs PostgreSQL {needs} or later; the server is version {server_version_num}"
    )]
    Unsupported {
        what: &'static str,
        needs: &'static str,
        server_version_num: u32,
    },

    /// A slot name PostgreSQL would refuse.
    #[error("invalid replication slot name \"{0}\": use 1 to 63 characters from a-z, 0-9 and _")]
    InvalidSlotName(String),

    /// Any other error reported by the server.
    #[error("{context} failed at {target}: {server}")]
    Server {
        target: String,
        context: String,
        server: Box<ServerError>,
    },

    /// The server sent something the protocol does not allow here.
    #[error("protocol violation from {target} while {context}: {detail}")]
    Protocol {
        target: String,
        context: String,
        detail: String,
    },

    /// The API was used out of order (e.g. `into_connection` while streaming).
    #[error("replication connection misuse: {0}")]
    InvalidState(&'static str),

    /// An ordinary SQL connection failed below the PostgreSQL protocol
    /// (connect, I/O, or a client-side error of tokio-postgres).
    #[error("SQL connection to {target} failed while {context}: {source}")]
    Sql {
        target: String,
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

impl PgError {
    /// Whether waiting and trying again can succeed without anyone acting.
    pub fn is_retryable(&self) -> bool {
        match self {
            PgError::Tls(e) => e.is_retryable(),
            // A TLS failure inside the stream (an alert) repeats; resets do not.
            PgError::Io { source, .. } => io_error_is_transient(source),
            PgError::Connect { .. }
            | PgError::Closed { .. }
            | PgError::TooManyConnections { .. }
            | PgError::WalSendersExhausted { .. }
            | PgError::ServerUnavailable { .. }
            | PgError::AheadOfServer { .. }
            | PgError::NotInHistory { .. } => true,
            PgError::Server { server, .. } => sqlstate_is_transient(&server.code),
            PgError::NoSuitableHost { hosts, .. } => hosts.iter().any(SkippedHost::is_retryable),
            PgError::Sql { source, .. } => match source.as_db_error() {
                Some(db) => sqlstate_is_transient(db.code().code()),
                None => {
                    source.is_closed()
                        || std::error::Error::source(source)
                            .and_then(|s| s.downcast_ref::<io::Error>())
                            .is_some_and(io_error_is_transient)
                }
            },
            _ => false,
        }
    }

    /// The server's SQLSTATE, when the error came from the server.
    pub fn sqlstate(&self) -> Option<&str> {
        self.server_error().map(|s| s.code.as_str())
    }

    /// The server's error, when this came from the server.
    pub fn server_error(&self) -> Option<&ServerError> {
        match self {
            PgError::AuthFailed { server, .. }
            | PgError::HbaRejected { server, .. }
            | PgError::RoleRejected { server, .. }
            | PgError::NotReplicationRole { server, .. }
            | PgError::TooManyConnections { server, .. }
            | PgError::WalSendersExhausted { server, .. }
            | PgError::ServerUnavailable { server, .. }
            | PgError::SlotActive { server, .. }
            | PgError::SlotMissing { server, .. }
            | PgError::SlotExists { server, .. }
            | PgError::SlotInvalidated { server, .. }
            | PgError::WalRemoved { server, .. }
            | PgError::WalLevelTooLow { server }
            | PgError::Server { server, .. } => Some(server),
            _ => None,
        }
    }
}

/// SQLSTATEs after which a new attempt may succeed: connection exceptions,
/// insufficient resources, operator intervention (shutdown, cannot connect
/// now), serialization failures.
fn sqlstate_is_transient(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("53")
        || code.starts_with("57P")
        || code == "40001"
        || code == "40P01"
}

/// What the client was doing when the server answered with an error, so
/// that the error can name the slot, user or start position involved.
#[derive(Clone, Debug, Default)]
pub struct ErrorContext {
    /// Where we are connected.
    pub target: String,
    /// The role.
    pub user: String,
    /// The command or phase, e.g. `START_REPLICATION`.
    pub command: String,
    /// The slot the command names, if any.
    pub slot: Option<String>,
    /// The start position and timeline of START_REPLICATION.
    pub start: Option<(Lsn, TimelineId)>,
}

/// Turns a server error into the most specific [`PgError`].
pub fn classify(server: ServerError, ctx: &ErrorContext) -> PgError {
    let msg = server.message.clone();
    let msg = msg.as_str();
    let detail = server.detail.clone().unwrap_or_default();
    let code = server.code.clone();
    let server = Box::new(server);
    let slot = || {
        quoted_name(msg)
            .or_else(|| ctx.slot.clone())
            .unwrap_or_default()
    };
    let target = ctx.target.clone();
    let user = ctx.user.clone();
    match code.as_str() {
        "28P01" => PgError::AuthFailed {
            target,
            user,
            server,
        },
        "28000" if msg.contains("pg_hba.conf") => PgError::HbaRejected {
            target,
            user,
            server,
        },
        "28000" if msg.starts_with("role ") => PgError::RoleRejected {
            target,
            user,
            server,
        },
        "28000" => PgError::AuthFailed {
            target,
            user,
            server,
        },
        "42501"
            if msg.contains("walsender")
                || msg.contains("WAL sender")
                || msg.contains("replication role") =>
        {
            PgError::NotReplicationRole { user, server }
        }
        "53300" if msg.contains("max_wal_senders") => {
            PgError::WalSendersExhausted { target, server }
        }
        "53300" => PgError::TooManyConnections { target, server },
        "57P01" | "57P02" | "57P03" | "57P05" => PgError::ServerUnavailable { target, server },
        "55006" if msg.contains("replication slot") => PgError::SlotActive {
            slot: slot(),
            pid: pid_in(msg),
            server,
        },
        "58P01" if msg.contains("has already been removed") => {
            let (start, timeline) = ctx.start.unwrap_or((Lsn::INVALID, TimelineId(0)));
            PgError::WalRemoved {
                start,
                timeline,
                server,
            }
        }
        "42704" if msg.contains("replication slot") => PgError::SlotMissing {
            slot: slot(),
            server,
        },
        "42710" if msg.contains("replication slot") => PgError::SlotExists {
            slot: slot(),
            server,
        },
        "55000" if msg.contains("wal_level") => PgError::WalLevelTooLow { server },
        _ if msg.starts_with("requested starting point")
            && msg.contains("is ahead of the WAL flush position") =>
        {
            let (start, timeline) = ctx.start.unwrap_or((Lsn::INVALID, TimelineId(0)));
            PgError::AheadOfServer {
                target,
                start,
                timeline,
                flush: msg.split_whitespace().last().and_then(|l| l.parse().ok()),
                server,
            }
        }
        _ if msg.starts_with("requested starting point")
            && msg.contains("is not in this server's history") =>
        {
            let (start, timeline) = ctx.start.unwrap_or((Lsn::INVALID, TimelineId(0)));
            PgError::NotInHistory {
                target,
                start,
                timeline,
                server,
            }
        }
        "55000"
            if msg.contains("can no longer get changes from replication slot")
                || msg.contains("invalidated")
                || detail.contains("has been invalidated") =>
        {
            PgError::SlotInvalidated {
                slot: slot(),
                server,
            }
        }
        _ => PgError::Server {
            target,
            context: ctx.command.clone(),
            server,
        },
    }
}

/// The first double-quoted name in a server message.
fn quoted_name(msg: &str) -> Option<String> {
    let start = msg.find('"')? + 1;
    let len = msg[start..].find('"')?;
    Some(msg[start..start + len].to_string())
}

/// The number after "PID " in a server message.
fn pid_in(msg: &str) -> Option<u32> {
    let at = msg.find("PID ")? + 4;
    let digits: String = msg[at..].chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Why a reachable host was not taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mismatch {
    /// In recovery (hot standby), where read-write or primary was asked.
    InRecovery,
    /// Not in recovery, where standby was asked.
    NotInRecovery,
    /// Not in recovery but `default_transaction_read_only = on`, where
    /// read-write was asked.
    ReadOnly,
    /// Read-write by default, where read-only was asked.
    ReadWrite,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mismatch::InRecovery => "is in recovery",
            Mismatch::NotInRecovery => "is not in recovery",
            Mismatch::ReadOnly => "is read-only (default_transaction_read_only = on)",
            Mismatch::ReadWrite => "accepts read-write transactions",
        })
    }
}

/// Why one host of the conninfo was not used (see [`super::session_attrs`]).
#[derive(Debug)]
pub enum SkipReason {
    /// It was reached, but its session is not what was asked for.
    Mismatch(Mismatch),
    /// Connecting or asking failed.
    Failed(Box<PgError>),
}

/// One host that was tried and not used.
#[derive(Debug)]
pub struct SkippedHost {
    /// Where (as [`Target`] prints it).
    pub target: String,
    /// Why.
    pub reason: SkipReason,
    /// The value that was asked for.
    pub attrs: TargetSessionAttrs,
}

impl SkippedHost {
    /// Whether this host may become usable without anyone acting.
    pub fn is_retryable(&self) -> bool {
        match &self.reason {
            SkipReason::Mismatch(_) => true,
            SkipReason::Failed(e) => e.is_retryable(),
        }
    }
}

impl fmt::Display for SkippedHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.reason {
            SkipReason::Mismatch(m) => write!(
                f,
                "host {} {m} (target_session_attrs={})",
                self.target, self.attrs
            ),
            SkipReason::Failed(e) => write!(f, "host {}: {e}", self.target),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(code: &str, msg: &str, detail: Option<&str>) -> ServerError {
        ServerError {
            severity: "ERROR".into(),
            code: code.into(),
            message: msg.into(),
            detail: detail.map(str::to_string),
            hint: None,
        }
    }

    fn ctx() -> ErrorContext {
        ErrorContext {
            target: "/tmp/.s.PGSQL.5432".into(),
            user: "walsafe".into(),
            command: "START_REPLICATION".into(),
            slot: Some("walsafe".into()),
            start: Some((Lsn(0x1000000), TimelineId(1))),
        }
    }

    #[test]
    fn server_errors_map_to_specific_variants() {
        let c = ctx();
        let e = classify(
            err(
                "55006",
                "replication slot \"walsafe\" is active for PID 4242",
                None,
            ),
            &c,
        );
        assert!(
            matches!(&e, PgError::SlotActive { pid: Some(4242), slot, .. } if slot == "walsafe")
        );
        let text = e.to_string();
        assert!(text.starts_with("replication slot \"walsafe\" is active for PID 4242; is another walsafe running against this cluster?"), "{text}");
        assert_eq!(e.sqlstate(), Some("55006"));
        assert!(!e.is_retryable());

        let e = classify(
            err(
                "58P01",
                "requested WAL segment 000000010000000000000001 has already been removed",
                None,
            ),
            &c,
        );
        assert!(matches!(
            e,
            PgError::WalRemoved {
                start: Lsn(0x1000000),
                ..
            }
        ));
        assert!(e.to_string().contains("gap must be recorded"));
        assert!(!e.is_retryable());

        let e = classify(
            err("42704", "replication slot \"other\" does not exist", None),
            &c,
        );
        assert!(matches!(&e, PgError::SlotMissing { slot, .. } if slot == "other"));
        let e = classify(
            err("42710", "replication slot \"walsafe\" already exists", None),
            &c,
        );
        assert!(matches!(e, PgError::SlotExists { .. }));
        let e = classify(
            err(
                "55000",
                "replication slots can only be used if wal_level >= replica",
                None,
            ),
            &c,
        );
        assert!(matches!(e, PgError::WalLevelTooLow { .. }));
        assert!(e.to_string().contains("wal_level = replica"));
        let e = classify(
            err(
                "55000",
                "can no longer get changes from replication slot \"walsafe\"",
                Some(
                    "This slot has been invalidated because it exceeded the maximum reserved size.",
                ),
            ),
            &c,
        );
        assert!(matches!(e, PgError::SlotInvalidated { .. }));
        assert!(!e.is_retryable());

        // A failover: the server is a standby behind walsafe, or a new
        // primary whose history forked before walsafe's position. Both are
        // states to wait out or follow, never reasons to stop.
        let e = classify(
            err(
                "XX000",
                "requested starting point 0/5000000 is ahead of the WAL flush position of this server 0/4000A28",
                None,
            ),
            &c,
        );
        assert!(
            matches!(
                e,
                PgError::AheadOfServer {
                    flush: Some(Lsn(0x4000A28)),
                    start: Lsn(0x1000000),
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.is_retryable());
        assert!(e
            .to_string()
            .contains("waiting for the server to catch up or to be promoted"));
        let e = classify(
            err(
                "XX000",
                "requested starting point 0/5000000 on timeline 1 is not in this server's history",
                Some("This server's history forked from timeline 1 at 0/4000A28."),
            ),
            &c,
        );
        assert!(
            matches!(
                e,
                PgError::NotInHistory {
                    timeline: TimelineId(1),
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.is_retryable());

        let e = classify(
            err(
                "53300",
                "number of requested standby connections exceeds max_wal_senders (currently 1)",
                None,
            ),
            &c,
        );
        assert!(matches!(e, PgError::WalSendersExhausted { .. }));
        assert!(e.is_retryable());
        let e = classify(err("53300", "sorry, too many clients already", None), &c);
        assert!(matches!(e, PgError::TooManyConnections { .. }));
        assert!(e.is_retryable());
        for (code, msg) in [
            ("57P03", "the database system is starting up"),
            ("57P03", "the database system is shutting down"),
            (
                "57P01",
                "terminating connection due to administrator command",
            ),
        ] {
            let e = classify(err(code, msg, None), &c);
            assert!(matches!(e, PgError::ServerUnavailable { .. }), "{code}");
            assert!(e.is_retryable());
        }

        let e = classify(
            err(
                "42501",
                "must be superuser or replication role to start walsender",
                None,
            ),
            &c,
        );
        assert_eq!(
            e.to_string(),
            "role \"walsafe\" lacks the REPLICATION attribute; run ALTER ROLE walsafe REPLICATION \
             (ERROR: must be superuser or replication role to start walsender (SQLSTATE 42501))"
        );
        let e = classify(
            err("42501", "permission denied to start WAL sender", None),
            &c,
        );
        assert!(matches!(e, PgError::NotReplicationRole { .. }));

        let e = classify(
            err(
                "28P01",
                "password authentication failed for user \"walsafe\"",
                None,
            ),
            &c,
        );
        assert!(matches!(e, PgError::AuthFailed { .. }));
        assert!(!e.is_retryable());
        let e = classify(
            err("28000", "no pg_hba.conf entry for replication connection from host \"127.0.0.1\", user \"walsafe\", no encryption", None),
            &c,
        );
        assert!(matches!(e, PgError::HbaRejected { .. }));
        assert!(e.to_string().contains("host replication walsafe"));
        let e = classify(err("28000", "role \"walsafe\" does not exist", None), &c);
        assert!(matches!(e, PgError::RoleRejected { .. }));

        let e = classify(err("XX000", "something odd", None), &c);
        assert!(matches!(e, PgError::Server { .. }));
        assert!(!e.is_retryable());
        let e = classify(err("08006", "connection failure", None), &c);
        assert!(e.is_retryable());
    }

    #[test]
    fn server_error_from_fields_and_display() {
        let e = ServerError::from_fields([
            (b'S', &b"FEHLER"[..]),
            (b'V', b"ERROR"),
            (b'C', b"42704"),
            (b'M', b"replication slot \"x\" does not exist"),
            (b'H', b"create it"),
        ]);
        assert_eq!(e.severity, "ERROR");
        assert_eq!(
            e.to_string(),
            "ERROR: replication slot \"x\" does not exist (SQLSTATE 42704); HINT: create it"
        );
    }
}
