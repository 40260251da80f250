//! The ordinary SQL connection (tokio-postgres), for what the walsender
//! protocol cannot tell: slot state, the server's current WAL position,
//! forcing a segment switch.
//!
//! It resolves the same conninfo as the replication connection
//! ([`ConnParams`]), so host, port, user, password file and sslmode behave
//! identically. Like libpq, the database defaults to the user name; when
//! that database does not exist (SQLSTATE 3D000) and no database was
//! configured, walsafe falls back to `postgres`. Hosts are tried in order,
//! each with its own password-file lookup, until one has the session
//! `target_session_attrs` asks for ([`crate::pg::session_attrs`]).
//!
//! The socket and TLS come from [`crate::pg::transport::open`], exactly as for
//! the replication connection (same sslmode rules, same errors); the
//! negotiated stream is handed to tokio-postgres with `connect_raw`, over
//! TLS as `sslnegotiation=direct` with a pass-through connector
//! ([`Negotiated`]) so that tokio-postgres uses SCRAM channel binding.

use std::str::FromStr;

use tokio_postgres::config::{SslMode as PgSslMode, SslNegotiation};
use tokio_postgres::Client;

use crate::pg::conninfo::{ConnParams, Target};
use crate::pg::error::{classify, ErrorContext, PgError, ServerError};
use crate::pg::lsn::Lsn;
use crate::pg::session_attrs::{self, Session};
use crate::pg::tls;
use crate::pg::transport::{self, Failed, Negotiated};

/// Database tried when the default (the user's name) does not exist.
pub const FALLBACK_DBNAME: &str = "postgres";

/// A replication slot as `pg_replication_slots` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotState {
    /// Process streaming from the slot, if any.
    pub active_pid: Option<i32>,
    /// Oldest WAL the slot holds.
    pub restart_lsn: Option<Lsn>,
    /// `reserved`, `extended`, `unreserved` or `lost` (PG13+).
    pub wal_status: Option<String>,
}

/// Connects with tokio-postgres and spawns the connection task.
pub async fn connect_sql(conninfo: &str, application_name: &str) -> Result<Client, PgError> {
    let params = ConnParams::parse(conninfo)?;
    connect_sql_params(&params, application_name).await
}

/// Like [`connect_sql`], with resolved parameters: the first host whose
/// session `target_session_attrs` accepts (see [`crate::pg::session_attrs`]).
pub async fn connect_sql_params(
    params: &ConnParams,
    application_name: &str,
) -> Result<Client, PgError> {
    let session = session_attrs::connect_matching(params, application_name, "SQL", |target| {
        connect_target(params, target, application_name)
    })
    .await?;
    Ok(session.client)
}

/// An SQL session and the parameters its server reported at startup that
/// [`session_attrs`] reads.
struct SqlSession {
    client: Client,
    in_hot_standby: Option<String>,
    default_transaction_read_only: Option<String>,
}

impl Session for SqlSession {
    fn reported(&self, name: &str) -> Option<&str> {
        match name {
            "in_hot_standby" => self.in_hot_standby.as_deref(),
            "default_transaction_read_only" => self.default_transaction_read_only.as_deref(),
            _ => None,
        }
    }

    async fn show(&mut self, name: &str) -> Result<String, PgError> {
        let what = format!("SHOW {name}");
        let row = self
            .client
            .query_one(&what, &[])
            .await
            .map_err(|e| sql_error(e, &query_ctx(&what)))?;
        Ok(row.get(0))
    }

    async fn in_recovery(&mut self, _: &ConnParams, _: &Target, _: &str) -> Result<bool, PgError> {
        const WHAT: &str = "SELECT pg_catalog.pg_is_in_recovery()";
        let row = self
            .client
            .query_one(WHAT, &[])
            .await
            .map_err(|e| sql_error(e, &query_ctx(WHAT)))?;
        Ok(row.get(0))
    }

    async fn close(self) {}
}

/// Connects to one host: the configured database, else the user's and
/// then [`FALLBACK_DBNAME`].
async fn connect_target(
    params: &ConnParams,
    target: &Target,
    application_name: &str,
) -> Result<SqlSession, PgError> {
    match &params.dbname {
        Some(db) => connect_one(params, target, db, application_name).await,
        None => match connect_one(params, target, &params.user, application_name).await {
            Err(e) if e.sqlstate() == Some("3D000") => {
                connect_one(params, target, FALLBACK_DBNAME, application_name).await
            }
            other => other,
        },
    }
}

async fn connect_one(
    params: &ConnParams,
    target: &Target,
    dbname: &str,
    application_name: &str,
) -> Result<SqlSession, PgError> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.user(&params.user).dbname(dbname).application_name(
        params
            .application_name
            .as_deref()
            .unwrap_or(application_name),
    );
    if let Some(o) = &params.options {
        cfg.options(o);
    }
    // tokio-postgres sends the password only if the server asks; the
    // password file is read up front (it is small and local).
    if let Some(pw) = params.password_for(target, dbname, &mut |w| tracing::warn!("{w}")) {
        cfg.password(pw.expose());
    }
    let ctx = ErrorContext {
        target: target.to_string(),
        user: params.user.clone(),
        command: format!("connecting to database \"{dbname}\""),
        ..ErrorContext::default()
    };
    let limit = params
        .connect_timeout
        .unwrap_or(crate::pg::replication::DEFAULT_CONNECT_TIMEOUT);
    transport::with_fallback(params, target, limit, |attempt| {
        let mut cfg = cfg.clone();
        let ctx = &ctx;
        async move {
            let stream = transport::open(params, target, attempt).await?;
            let encrypted = stream.is_encrypted();
            if encrypted {
                // Already negotiated: tokio-postgres must not send its own
                // SSLRequest, and must see the stream as TLS.
                cfg.ssl_mode(PgSslMode::Require)
                    .ssl_negotiation(SslNegotiation::Direct);
            } else {
                cfg.ssl_mode(PgSslMode::Disable);
            }
            let (client, connection) =
                cfg.connect_raw(stream, Negotiated)
                    .await
                    .map_err(|e| Failed {
                        error: sql_error(e, ctx),
                        tls_tried: encrypted,
                    })?;
            let reported = |name| connection.parameter(name).map(str::to_string);
            let session = SqlSession {
                client,
                in_hot_standby: reported("in_hot_standby"),
                default_transaction_read_only: reported("default_transaction_read_only"),
            };
            let t = target.to_string();
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::warn!(target = %t, "SQL connection ended: {e}");
                }
            });
            Ok(session)
        }
    })
    .await
}

/// Maps a tokio-postgres error: server errors through the same classifier
/// as the replication connection, everything else as [`PgError::Sql`].
/// A missing password becomes [`PgError::PasswordMissing`].
pub fn sql_error(e: tokio_postgres::Error, ctx: &ErrorContext) -> PgError {
    if let Some(db) = e.as_db_error() {
        let server = ServerError {
            severity: db.severity().to_string(),
            code: db.code().code().to_string(),
            message: db.message().to_string(),
            detail: db.detail().map(str::to_string),
            hint: db.hint().map(str::to_string),
        };
        return classify(server, ctx);
    }
    if let Some(alert) = std::error::Error::source(&e)
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .and_then(tls::alert_in)
    {
        return PgError::Tls(tls::TlsError::ServerAlert {
            target: ctx.target.clone(),
            context: ctx.command.clone(),
            alert,
        });
    }
    if e.to_string().contains("password missing") {
        return PgError::PasswordMissing {
            target: ctx.target.clone(),
            user: ctx.user.clone(),
            passfile: "PGPASSFILE or ~/.pgpass".into(),
        };
    }
    PgError::Sql {
        target: ctx.target.clone(),
        context: ctx.command.clone(),
        source: e,
    }
}

fn query_ctx(what: &str) -> ErrorContext {
    ErrorContext {
        target: "the SQL connection".into(),
        command: what.to_string(),
        ..ErrorContext::default()
    }
}

fn parse_lsn(text: Option<String>, what: &str) -> Result<Option<Lsn>, PgError> {
    text.map(|t| {
        Lsn::from_str(&t).map_err(|e| PgError::Protocol {
            target: "the SQL connection".into(),
            context: what.to_string(),
            detail: e.to_string(),
        })
    })
    .transpose()
}

/// The slot's state, `None` if no slot has that name.
pub async fn slot_state(client: &Client, slot: &str) -> Result<Option<SlotState>, PgError> {
    const WHAT: &str = "reading pg_replication_slots";
    let mut ctx = query_ctx(WHAT);
    ctx.slot = Some(slot.to_string());
    let row = client
        .query_opt(
            "SELECT active_pid, restart_lsn::text, wal_status::text \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| sql_error(e, &ctx))?;
    let Some(row) = row else { return Ok(None) };
    Ok(Some(SlotState {
        active_pid: row.get(0),
        restart_lsn: parse_lsn(row.get(1), WHAT)?,
        wal_status: row.get(2),
    }))
}

/// The server's current WAL position: `pg_current_wal_lsn()` on a primary;
/// on a standby the last received position (or the replayed one when
/// nothing was received by streaming).
pub async fn current_wal_lsn(client: &Client) -> Result<Lsn, PgError> {
    const WHAT: &str = "reading the current WAL position";
    let row = client
        .query_one(
            "SELECT CASE WHEN pg_is_in_recovery() \
                THEN coalesce(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn()) \
                ELSE pg_current_wal_lsn() END::text",
            &[],
        )
        .await
        .map_err(|e| sql_error(e, &query_ctx(WHAT)))?;
    parse_lsn(row.get(0), WHAT)?.ok_or_else(|| PgError::Protocol {
        target: "the SQL connection".into(),
        context: WHAT.into(),
        detail: "the server reported no WAL position".into(),
    })
}

/// `pg_switch_wal()`: closes the current segment; returns the end of the
/// switch record (primary only).
pub async fn switch_wal(client: &Client) -> Result<Lsn, PgError> {
    const WHAT: &str = "switching WAL segment (pg_switch_wal)";
    let row = client
        .query_one("SELECT pg_switch_wal()::text", &[])
        .await
        .map_err(|e| sql_error(e, &query_ctx(WHAT)))?;
    parse_lsn(row.get(0), WHAT)?.ok_or_else(|| PgError::Protocol {
        target: "the SQL connection".into(),
        context: WHAT.into(),
        detail: "pg_switch_wal returned NULL".into(),
    })
}
