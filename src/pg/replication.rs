//! PostgreSQL physical replication client (the walsender protocol), written
//! on `postgres-protocol` and tokio because `tokio-postgres` cannot open a
//! walsender connection.
//!
//! # Life of a connection
//!
//! ```text
//! connect ─ [SSLRequest ─ 'S' ─ TLS handshake] per sslmode (see super::tls)
//!         ─ StartupMessage{user, replication=true, application_name, [database]}
//!         ─ auth: trust | cleartext | MD5 | SCRAM-SHA-256 | SCRAM-SHA-256-PLUS
//!                 (channel binding tls-server-end-point, over TLS) | TLS client certificate
//!         ─ ParameterStatus… BackendKeyData ReadyForQuery
//! ReplicationConnection: simple-query commands, one at a time
//!   IDENTIFY_SYSTEM | SHOW x | READ_REPLICATION_SLOT s (PG15+) |
//!   CREATE_REPLICATION_SLOT "s" PHYSICAL RESERVE_WAL | TIMELINE_HISTORY n
//! START_REPLICATION [SLOT s] PHYSICAL X/Y TIMELINE n ─▶ CopyBothResponse
//! ReplicationStream (CopyBoth):
//!   server ─▶ CopyData{ 'w' XLogData | 'k' keepalive }
//!   client ─▶ CopyData{ 'r' standby status update }
//! end of timeline (the server's timeline became history, e.g. promotion):
//!   server CopyDone ─▶ client CopyDone ─▶ RowDescription DataRow(next_tli, next_tli_startpos)
//!   CommandComplete CommandComplete ReadyForQuery ─▶ back to ReplicationConnection
//! end of stream (server shutting down):
//!   CommandComplete without CopyDone, then the server closes the socket
//! ```
//!
//! Errors about the requested start position (WAL already removed, an
//! invalidated slot) may come after CopyBothResponse, when the walsender
//! first reads WAL: [`ReplicationStream::next_message`]'s first call then
//! returns them, classified like any other ([`PgError::WalRemoved`], …).
//!
//! If START_REPLICATION asks for exactly the end of a historic timeline the
//! server skips CopyBoth and answers with the next-timeline result set at
//! once; [`ReplicationStream::next_message`] then yields `EndOfTimeline`
//! first.
//!
//! # Invariants
//!
//! - [`ReplicationStream::next_message`] is cancel-safe: messages are read
//!   whole by a frame codec before anything acts on them, state changes are
//!   made synchronously after a whole message is in hand, and replies (our
//!   CopyDone) are queued synchronously and flushed at the start of the
//!   next call.
//! - No password is ever formatted: see [`super::conninfo::Password`].
//! - Every server error keeps its SQLSTATE ([`crate::pg::error::ServerError`]) and is
//!   classified into a [`PgError`] variant that says what to do.
//!
//! `application_name` passed to [`ReplicationConnection::connect`] is a
//! fallback, like libpq's `fallback_application_name`: one set in the
//! conninfo or in `PGAPPNAME` wins, so an operator can name the standby in
//! `synchronous_standby_names`.

mod base_backup;
mod wire;

pub use base_backup::{BackupEvent, BaseBackup, BaseBackupOptions, Tablespace};

use std::time::Duration;

use bytes::Bytes;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{
    ChannelBinding, ScramSha256, SCRAM_SHA_256, SCRAM_SHA_256_PLUS,
};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio_postgres::fallible_iterator::FallibleIterator;

use self::wire::{Backend, Wire};
use crate::pg::conninfo::REPLICATION_PASSFILE_DB;
pub use crate::pg::conninfo::{ConnParams, Host, Password, SslMode, Target};
use crate::pg::error::{classify, server_error, ErrorContext, PgError};
use crate::pg::lsn::{Lsn, TimelineId};
use crate::pg::session_attrs::{self, Session};
use crate::pg::transport::{self, Attempt, Failed};
use crate::pg::{ClusterIdentity, Server};

/// How long connecting plus authenticating may take when the conninfo sets
/// no `connect_timeout`: a server that accepts TCP but never answers must
/// not hang the agent.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long [`ReplicationStream::stop`] waits for the server to finish.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// The authentication method the server asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthMethod {
    /// No password asked (trust, peer, …).
    Trust,
    /// Password in clear text (`password` in pg_hba.conf).
    Cleartext,
    /// MD5 challenge.
    Md5,
    /// SCRAM-SHA-256 (with channel binding when
    /// [`ReplicationConnection::channel_binding`] says so).
    ScramSha256,
}

/// READ_REPLICATION_SLOT's answer for an existing physical slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotPosition {
    /// Oldest WAL the slot holds, `None` if it reserves none.
    pub restart_lsn: Option<Lsn>,
    /// Timeline of `restart_lsn` per the server's history.
    pub restart_tli: Option<TimelineId>,
}

/// What the server sends while streaming.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplMessage {
    /// WAL bytes starting at `start`; `server_end` is the server's WAL end.
    XLogData {
        start: Lsn,
        server_end: Lsn,
        data: Bytes,
    },
    /// Heartbeat; answer with [`ReplicationStream::send_status`] when
    /// `reply_requested`, or the server disconnects after wal_sender_timeout.
    Keepalive {
        server_end: Lsn,
        reply_requested: bool,
    },
    /// Server ended the timeline: CopyDone received, client CopyDone sent, the
    /// result set (next_tli, next_tli_startpos) and CommandComplete(s) consumed, up to ReadyForQuery.
    EndOfTimeline {
        next_timeline: TimelineId,
        switch_point: Lsn,
    },
    /// Streaming ended without a next timeline (e.g. server shutting down).
    EndOfStream,
}

/// The result of a simple query: column names and text values.
struct QueryResult {
    columns: Vec<String>,
    rows: Vec<Vec<Option<Bytes>>>,
}

/// A walsender connection between commands.
pub struct ReplicationConnection {
    wire: Wire,
    user: String,
    server_version_num: u32,
    backend_pid: Option<u32>,
    auth_method: AuthMethod,
    encrypted: bool,
    channel_binding: bool,
}

impl std::fmt::Debug for ReplicationConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationConnection")
            .field("target", &self.wire.target)
            .field("user", &self.user)
            .field("server_version_num", &self.server_version_num)
            .field("backend_pid", &self.backend_pid)
            .field("auth_method", &self.auth_method)
            .field("encrypted", &self.encrypted)
            .field("channel_binding", &self.channel_binding)
            .finish()
    }
}

impl ReplicationConnection {
    /// Resolves `conninfo` (see [`ConnParams`]) and opens a physical
    /// replication connection to the first host that accepts it.
    pub async fn connect(conninfo: &str, application_name: &str) -> Result<Self, PgError> {
        let params = ConnParams::parse(conninfo)?;
        Self::connect_params(&params, application_name).await
    }

    /// Like [`ReplicationConnection::connect`], with resolved parameters:
    /// the first host whose session `target_session_attrs` accepts (see
    /// [`crate::pg::session_attrs`]).
    pub async fn connect_params(
        params: &ConnParams,
        application_name: &str,
    ) -> Result<Self, PgError> {
        session_attrs::connect_matching(params, application_name, "replication", |target| {
            Self::connect_target(params, target, application_name, &[])
        })
        .await
    }

    /// Connects to one host; `extra` are further startup parameters.
    async fn connect_target(
        params: &ConnParams,
        target: &Target,
        application_name: &str,
        extra: &[(&str, &str)],
    ) -> Result<Self, PgError> {
        let limit = params.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        transport::with_fallback(params, target, limit, |attempt| {
            Self::handshake(params, target, application_name, extra, attempt)
        })
        .await
    }

    /// One connection attempt: socket, TLS as `attempt` says, startup and
    /// authentication.
    async fn handshake(
        params: &ConnParams,
        target: &Target,
        application_name: &str,
        extra: &[(&str, &str)],
        attempt: Attempt,
    ) -> Result<Self, Failed> {
        let stream = transport::open(params, target, attempt).await?;
        let encrypted = stream.is_encrypted();
        let end_point = stream.tls_server_end_point();
        Self::startup(
            params,
            target,
            application_name,
            extra,
            Box::new(stream),
            end_point,
        )
        .await
        .map(|mut c| {
            c.encrypted = encrypted;
            c
        })
        .map_err(|error| Failed {
            error,
            tls_tried: encrypted,
        })
    }

    async fn startup(
        params: &ConnParams,
        target: &Target,
        application_name: &str,
        extra: &[(&str, &str)],
        transport: wire::BoxedTransport,
        tls_end_point: Option<Vec<u8>>,
    ) -> Result<Self, PgError> {
        let mut wire = Wire::new(transport, target.to_string());
        let app = params
            .application_name
            .as_deref()
            .unwrap_or(application_name);
        let mut startup: Vec<(&str, &str)> = vec![
            ("user", params.user.as_str()),
            ("replication", "true"),
            ("application_name", app),
        ];
        if let Some(db) = &params.dbname {
            startup.push(("database", db));
        }
        if let Some(o) = &params.options {
            startup.push(("options", o));
        }
        startup.extend_from_slice(extra);
        frontend::startup_message(startup.iter().copied(), wire.queue())
            .map_err(|e| wire.protocol("sending the startup message", e.to_string()))?;
        wire.flush("sending the startup message").await?;

        let ctx = ErrorContext {
            target: wire.target.clone(),
            user: params.user.clone(),
            command: "connecting".into(),
            ..ErrorContext::default()
        };
        let passfile_db = params.dbname.as_deref().unwrap_or(REPLICATION_PASSFILE_DB);
        let (auth_method, channel_binding) =
            authenticate(&mut wire, params, target, passfile_db, &ctx, tls_end_point).await?;

        let mut backend_pid = None;
        loop {
            match wire.recv("waiting for the server to be ready").await? {
                Backend::Msg(Message::BackendKeyData(k)) => {
                    backend_pid = u32::try_from(k.process_id()).ok()
                }
                Backend::Msg(Message::ReadyForQuery(_)) => break,
                Backend::Msg(Message::ErrorResponse(e)) => {
                    return Err(classify(server_error(&e), &ctx))
                }
                other => {
                    return Err(wire.protocol(
                        "waiting for the server to be ready",
                        format!("unexpected {}", wire::message_name(&other)),
                    ))
                }
            }
        }
        let server_version_num = wire
            .parameters
            .get("server_version")
            .map(|v| parse_server_version(v))
            .unwrap_or(0);
        Ok(ReplicationConnection {
            wire,
            user: params.user.clone(),
            server_version_num,
            backend_pid,
            auth_method,
            encrypted: false,
            channel_binding,
        })
    }

    /// The server's version as PostgreSQL's `server_version_num` (150018).
    pub fn server_version_num(&self) -> u32 {
        self.server_version_num
    }

    /// Process id of the walsender serving this connection.
    pub fn backend_pid(&self) -> Option<u32> {
        self.backend_pid
    }

    /// How the server authenticated us.
    pub fn auth_method(&self) -> AuthMethod {
        self.auth_method
    }

    /// Whether the connection is encrypted (TLS).
    pub fn is_encrypted(&self) -> bool {
        self.encrypted
    }

    /// Whether SCRAM bound the authentication to the TLS session
    /// (SCRAM-SHA-256-PLUS with tls-server-end-point).
    pub fn channel_binding(&self) -> bool {
        self.channel_binding
    }

    /// Where we are connected.
    pub fn target(&self) -> &str {
        &self.wire.target
    }

    fn ctx(&self, command: &str) -> ErrorContext {
        ErrorContext {
            target: self.wire.target.clone(),
            user: self.user.clone(),
            command: command.to_string(),
            ..ErrorContext::default()
        }
    }

    /// Runs one replication command with the simple query protocol.
    async fn simple_query(
        &mut self,
        sql: &str,
        ctx: &ErrorContext,
    ) -> Result<QueryResult, PgError> {
        let what = ctx.command.as_str();
        frontend::query(sql, self.wire.queue())
            .map_err(|e| self.wire.protocol(what, e.to_string()))?;
        self.wire.flush(what).await?;
        let mut result = QueryResult {
            columns: Vec::new(),
            rows: Vec::new(),
        };
        let mut error = None;
        loop {
            match self.wire.recv(what).await? {
                Backend::Msg(Message::RowDescription(d)) => {
                    let mut fields = d.fields();
                    while let Some(f) = fields
                        .next()
                        .map_err(|e| self.wire.protocol(what, e.to_string()))?
                    {
                        result.columns.push(f.name().to_string());
                    }
                }
                Backend::Msg(Message::DataRow(r)) => result.rows.push(
                    wire::row_values(&r).map_err(|e| self.wire.protocol(what, e.to_string()))?,
                ),
                Backend::Msg(Message::CommandComplete(_) | Message::EmptyQueryResponse) => {}
                Backend::Msg(Message::ErrorResponse(e)) => {
                    error.get_or_insert(server_error(&e));
                }
                Backend::Msg(Message::ReadyForQuery(_)) => break,
                other => {
                    return Err(self
                        .wire
                        .protocol(what, format!("unexpected {}", wire::message_name(&other))))
                }
            }
        }
        match error {
            Some(e) => Err(classify(e, ctx)),
            None => Ok(result),
        }
    }

    /// One row expected: its values as text.
    async fn single_row(
        &mut self,
        sql: &str,
        ctx: &ErrorContext,
    ) -> Result<Vec<Option<String>>, PgError> {
        let r = self.simple_query(sql, ctx).await?;
        if r.rows.len() != 1 {
            return Err(self.wire.protocol(
                &ctx.command,
                format!(
                    "expected one row, got {} (columns {:?})",
                    r.rows.len(),
                    r.columns
                ),
            ));
        }
        Ok(r.rows[0]
            .iter()
            .map(|v| v.as_ref().map(|b| String::from_utf8_lossy(b).into_owned()))
            .collect())
    }

    /// IDENTIFY_SYSTEM (system identifier, timeline, WAL position) and the
    /// settings that complete the cluster's identity (segment size,
    /// version).
    pub async fn identify_system(&mut self) -> Result<Server, PgError> {
        let ctx = self.ctx("IDENTIFY_SYSTEM");
        let row = self.single_row("IDENTIFY_SYSTEM", &ctx).await?;
        let (systemid, timeline, xlogpos) = {
            let field = |i: usize| row.get(i).cloned().flatten();
            let bad = |what: &str, v: Option<String>| {
                self.wire
                    .protocol("IDENTIFY_SYSTEM", format!("bad {what}: {v:?}"))
            };
            let systemid = field(0)
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| bad("systemid", field(0)))?;
            let timeline = field(1)
                .and_then(|v| v.parse::<u32>().ok())
                .ok_or_else(|| bad("timeline", field(1)))?;
            let xlogpos = field(2)
                .and_then(|v| v.parse::<Lsn>().ok())
                .ok_or_else(|| bad("xlogpos", field(2)))?;
            (systemid, timeline, xlogpos)
        };
        let segment_size = self.segment_size().await?;
        Ok(Server {
            identity: ClusterIdentity::new(systemid, self.server_version_num(), segment_size),
            timeline: TimelineId(timeline),
            xlogpos,
        })
    }

    /// SHOW `name`: a server setting as text ("16MB").
    pub async fn show(&mut self, name: &str) -> Result<String, PgError> {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        {
            return Err(PgError::InvalidState("SHOW takes a plain setting name"));
        }
        let ctx = self.ctx(&format!("SHOW {name}"));
        let row = self.single_row(&format!("SHOW {name}"), &ctx).await?;
        row.into_iter()
            .next()
            .flatten()
            .ok_or_else(|| self.wire.protocol(&ctx.command, "NULL setting value"))
    }

    /// The server's WAL segment size in bytes.
    pub async fn segment_size(&mut self) -> Result<u64, PgError> {
        let text = self.show("wal_segment_size").await?;
        parse_size_setting(&text)
            .filter(|s| crate::pg::walfile::is_valid_segment_size(*s))
            .ok_or_else(|| {
                self.wire.protocol(
                    "SHOW wal_segment_size",
                    format!("\"{text}\" is not a valid WAL segment size"),
                )
            })
    }

    /// READ_REPLICATION_SLOT (PostgreSQL 15+): `None` if the slot does not
    /// exist; [`PgError::Unsupported`] on older servers.
    pub async fn read_replication_slot(
        &mut self,
        slot: &str,
    ) -> Result<Option<SlotPosition>, PgError> {
        check_slot_name(slot)?;
        if self.server_version_num < 150000 {
            return Err(PgError::Unsupported {
                what: "READ_REPLICATION_SLOT",
                needs: "15",
                server_version_num: self.server_version_num,
            });
        }
        let mut ctx = self.ctx("READ_REPLICATION_SLOT");
        ctx.slot = Some(slot.to_string());
        let row = self
            .single_row(
                &format!("READ_REPLICATION_SLOT {}", quote_ident(slot)),
                &ctx,
            )
            .await?;
        if row.first().cloned().flatten().is_none() {
            return Ok(None);
        }
        let restart_lsn = match row.get(1).cloned().flatten() {
            Some(v) => Some(
                v.parse::<Lsn>()
                    .map_err(|e| self.wire.protocol("READ_REPLICATION_SLOT", e.to_string()))?,
            ),
            None => None,
        };
        let restart_tli = match row.get(2).cloned().flatten() {
            Some(v) => Some(TimelineId(v.parse().map_err(|_| {
                self.wire
                    .protocol("READ_REPLICATION_SLOT", format!("bad restart_tli {v:?}"))
            })?)),
            None => None,
        };
        Ok(Some(SlotPosition {
            restart_lsn,
            restart_tli,
        }))
    }

    /// CREATE_REPLICATION_SLOT "slot" PHYSICAL RESERVE_WAL. Returns the
    /// position from which the slot holds WAL: the server reports 0/0 as
    /// consistent point for physical slots, so on PostgreSQL 15+ the slot's
    /// restart_lsn is read back; on older servers the consistent point is
    /// returned as is.
    pub async fn create_physical_slot(&mut self, slot: &str) -> Result<Lsn, PgError> {
        check_slot_name(slot)?;
        let mut ctx = self.ctx("CREATE_REPLICATION_SLOT");
        ctx.slot = Some(slot.to_string());
        let row = self
            .single_row(
                &format!(
                    "CREATE_REPLICATION_SLOT {} PHYSICAL RESERVE_WAL",
                    quote_ident(slot)
                ),
                &ctx,
            )
            .await?;
        let consistent = match row.get(1).cloned().flatten() {
            Some(v) => v
                .parse::<Lsn>()
                .map_err(|e| self.wire.protocol("CREATE_REPLICATION_SLOT", e.to_string()))?,
            None => Lsn::INVALID,
        };
        if consistent == Lsn::INVALID && self.server_version_num >= 150000 {
            if let Some(SlotPosition {
                restart_lsn: Some(l),
                ..
            }) = self.read_replication_slot(slot).await?
            {
                return Ok(l);
            }
        }
        Ok(consistent)
    }

    /// TIMELINE_HISTORY `tli`: the history file's name and raw content.
    pub async fn timeline_history(&mut self, tli: TimelineId) -> Result<(String, Bytes), PgError> {
        let ctx = self.ctx("TIMELINE_HISTORY");
        let r = self
            .simple_query(&format!("TIMELINE_HISTORY {}", tli.0), &ctx)
            .await?;
        match r.rows.as_slice() {
            [row] if row.len() >= 2 => match (&row[0], &row[1]) {
                (Some(name), Some(content)) => {
                    Ok((String::from_utf8_lossy(name).into_owned(), content.clone()))
                }
                _ => Err(self
                    .wire
                    .protocol("TIMELINE_HISTORY", "NULL filename or content")),
            },
            _ => Err(self.wire.protocol(
                "TIMELINE_HISTORY",
                format!("expected one row of two columns, got {} rows", r.rows.len()),
            )),
        }
    }

    /// START_REPLICATION [SLOT s] PHYSICAL start TIMELINE timeline.
    pub async fn start_replication(
        mut self,
        slot: Option<&str>,
        start: Lsn,
        timeline: TimelineId,
    ) -> Result<ReplicationStream, PgError> {
        let mut ctx = self.ctx("START_REPLICATION");
        ctx.start = Some((start, timeline));
        let mut sql = String::from("START_REPLICATION ");
        if let Some(s) = slot {
            check_slot_name(s)?;
            ctx.slot = Some(s.to_string());
            sql.push_str(&format!("SLOT {} ", quote_ident(s)));
        }
        sql.push_str(&format!("PHYSICAL {start} TIMELINE {}", timeline.0));
        frontend::query(&sql, self.wire.queue())
            .map_err(|e| self.wire.protocol("START_REPLICATION", e.to_string()))?;
        self.wire.flush("sending START_REPLICATION").await?;

        let mut next: Option<(TimelineId, Lsn)> = None;
        let mut error = None;
        loop {
            match self.wire.recv("starting replication").await? {
                Backend::CopyBothResponse => {
                    return Ok(ReplicationStream {
                        conn: Some(self),
                        state: StreamState::Streaming,
                        ctx,
                    })
                }
                // Start point at the very end of a historic timeline: no
                // CopyBoth, the next-timeline result set comes at once.
                Backend::Msg(Message::RowDescription(_)) => {}
                Backend::Msg(Message::DataRow(r)) => {
                    next = Some(self.parse_next_timeline(&r)?);
                }
                Backend::Msg(Message::CommandComplete(_)) => {}
                Backend::Msg(Message::ErrorResponse(e)) => {
                    error.get_or_insert(server_error(&e));
                }
                Backend::Msg(Message::ReadyForQuery(_)) => {
                    if let Some(e) = error {
                        return Err(classify(e, &ctx));
                    }
                    let Some((next_timeline, switch_point)) = next else {
                        return Err(self.wire.protocol(
                            "starting replication",
                            "START_REPLICATION ended without streaming or a next timeline",
                        ));
                    };
                    return Ok(ReplicationStream {
                        conn: Some(self),
                        state: StreamState::Ended {
                            pending: Some(ReplMessage::EndOfTimeline {
                                next_timeline,
                                switch_point,
                            }),
                            reusable: true,
                        },
                        ctx,
                    });
                }
                other => {
                    return Err(self.wire.protocol(
                        "starting replication",
                        format!("unexpected {}", wire::message_name(&other)),
                    ))
                }
            }
        }
    }

    fn parse_next_timeline(
        &self,
        row: &postgres_protocol::message::backend::DataRowBody,
    ) -> Result<(TimelineId, Lsn), PgError> {
        let what = "reading the end-of-timeline result";
        let values = wire::row_values(row).map_err(|e| self.wire.protocol(what, e.to_string()))?;
        let text = |i: usize| {
            values
                .get(i)
                .cloned()
                .flatten()
                .map(|b| String::from_utf8_lossy(&b).into_owned())
        };
        let tli = text(0)
            .and_then(|v| v.parse::<u32>().ok())
            .filter(|&t| t > 0)
            .ok_or_else(|| {
                self.wire
                    .protocol(what, format!("bad next_tli {:?}", text(0)))
            })?;
        let lsn = text(1).and_then(|v| v.parse::<Lsn>().ok()).ok_or_else(|| {
            self.wire
                .protocol(what, format!("bad next_tli_startpos {:?}", text(1)))
        })?;
        Ok((TimelineId(tli), lsn))
    }

    /// Closes the connection politely.
    pub async fn close(self) {
        self.wire.close().await
    }
}

/// Where a stream is in the CopyBoth life cycle.
enum StreamState {
    /// Both directions open.
    Streaming,
    /// The server sent CopyDone and our CopyDone is queued or sent; reading
    /// the result set up to ReadyForQuery.
    ServerDone { next: Option<(TimelineId, Lsn)> },
    /// Streaming is over; `pending` is the final message not yet returned.
    /// `reusable`: ReadyForQuery was seen, the connection can run commands.
    Ended {
        pending: Option<ReplMessage>,
        reusable: bool,
    },
    /// An error ended the stream; the connection is unusable.
    Failed,
}

/// A connection in CopyBoth mode, streaming WAL.
pub struct ReplicationStream {
    conn: Option<ReplicationConnection>,
    state: StreamState,
    ctx: ErrorContext,
}

impl std::fmt::Debug for ReplicationStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationStream")
            .field("conn", &self.conn)
            .field("start", &self.ctx.start)
            .field("slot", &self.ctx.slot)
            .finish()
    }
}

impl ReplicationStream {
    fn conn(&mut self) -> Result<&mut ReplicationConnection, PgError> {
        self.conn
            .as_mut()
            .ok_or(PgError::InvalidState("the replication stream is closed"))
    }

    /// The next message from the server.
    ///
    /// Cancel-safe: may be used in tokio::select! (whole messages are
    /// buffered internally; a cancelled call loses nothing).
    pub async fn next_message(&mut self) -> Result<ReplMessage, PgError> {
        loop {
            match &mut self.state {
                StreamState::Ended { pending, .. } => {
                    return pending
                        .take()
                        .ok_or(PgError::InvalidState("the replication stream has ended"));
                }
                StreamState::Failed => {
                    return Err(PgError::InvalidState(
                        "the replication stream failed earlier",
                    ))
                }
                _ => {}
            }
            let result = self.step().await;
            if let Err(e) = &result {
                // I/O and server errors end the stream for good; a
                // cancellation never reaches here.
                if !matches!(e, PgError::InvalidState(_)) {
                    self.state = StreamState::Failed;
                }
            }
            if let Some(m) = result? {
                return Ok(m);
            }
        }
    }

    /// Reads and handles one message; `Some` when it is for the caller.
    async fn step(&mut self) -> Result<Option<ReplMessage>, PgError> {
        let conn = self.conn()?;
        if conn.wire.has_pending_writes() {
            conn.wire
                .flush("sending to the server while streaming")
                .await?;
        }
        let msg = conn.wire.recv("streaming WAL").await?;
        let conn = self.conn.as_mut().expect("checked above");
        match (&mut self.state, msg) {
            (StreamState::Streaming, Backend::Msg(Message::CopyData(body))) => {
                match wire::parse_copy_payload(body.into_bytes()) {
                    Ok(m) => Ok(Some(m)),
                    Err(detail) => Err(conn.wire.protocol("streaming WAL", detail)),
                }
            }
            (StreamState::Streaming, Backend::Msg(Message::CopyDone)) => {
                // The server has sent all of this timeline. Answer with our
                // CopyDone (queued now, flushed on the next step) and read
                // the next-timeline result.
                frontend::copy_done(conn.wire.queue());
                self.state = StreamState::ServerDone { next: None };
                Ok(None)
            }
            (StreamState::Streaming, Backend::Msg(Message::CommandComplete(_))) => {
                // The walsender finished without CopyDone: server shutdown.
                // It exits right after; no ReadyForQuery follows.
                self.state = StreamState::Ended {
                    pending: None,
                    reusable: false,
                };
                Ok(Some(ReplMessage::EndOfStream))
            }
            (StreamState::ServerDone { .. }, Backend::Msg(Message::CopyData(_))) => Ok(None),
            (StreamState::ServerDone { .. }, Backend::Msg(Message::RowDescription(_))) => Ok(None),
            (StreamState::ServerDone { next }, Backend::Msg(Message::DataRow(r))) => {
                *next = Some(conn.parse_next_timeline(&r)?);
                Ok(None)
            }
            (StreamState::ServerDone { .. }, Backend::Msg(Message::CommandComplete(_))) => Ok(None),
            (StreamState::ServerDone { next }, Backend::Msg(Message::ReadyForQuery(_))) => {
                let m = match next.take() {
                    Some((next_timeline, switch_point)) => ReplMessage::EndOfTimeline {
                        next_timeline,
                        switch_point,
                    },
                    None => ReplMessage::EndOfStream,
                };
                self.state = StreamState::Ended {
                    pending: None,
                    reusable: true,
                };
                Ok(Some(m))
            }
            (_, Backend::Msg(Message::ErrorResponse(e))) => {
                Err(classify(server_error(&e), &self.ctx))
            }
            (_, other) => Err(conn.wire.protocol(
                "streaming WAL",
                format!("unexpected {}", wire::message_name(&other)),
            )),
        }
    }

    /// Standby status update 'r' (write, flush, apply, now in µs since
    /// 2000-01-01, reply flag). Ignored once the server has ended the
    /// stream (nothing may be sent in CopyBoth after CopyDone). The message
    /// is queued whole before any await; if this call is cancelled, the
    /// rest is sent by the next call or by `next_message`.
    pub async fn send_status(
        &mut self,
        write: Lsn,
        flush: Lsn,
        apply: Lsn,
        reply_requested: bool,
    ) -> Result<(), PgError> {
        if !matches!(self.state, StreamState::Streaming) {
            tracing::debug!("standby status not sent: streaming has ended");
            return Ok(());
        }
        let payload = wire::status_update_payload(
            write,
            flush,
            apply,
            wire::pg_now_micros(),
            reply_requested,
        );
        let conn = self.conn()?;
        wire::put_copy_data(payload, conn.wire.queue())
            .map_err(|e| conn.wire.protocol("sending standby status", e.to_string()))?;
        conn.wire.flush("sending standby status").await
    }

    /// After ReplMessage::EndOfTimeline: the connection, ready for TIMELINE_HISTORY / START_REPLICATION.
    pub fn into_connection(mut self) -> Result<ReplicationConnection, PgError> {
        match self.state {
            StreamState::Ended { reusable: true, .. } => self
                .conn
                .take()
                .ok_or(PgError::InvalidState("the replication stream is closed")),
            _ => Err(PgError::InvalidState(
                "into_connection needs a stream that ended with EndOfTimeline",
            )),
        }
    }

    /// Clean stop: send CopyDone, drain to ReadyForQuery (bounded wait), close.
    pub async fn stop(mut self) -> Result<(), PgError> {
        let Some(mut conn) = self.conn.take() else {
            return Ok(());
        };
        let must_drain = match self.state {
            StreamState::Streaming => {
                frontend::copy_done(conn.wire.queue());
                true
            }
            StreamState::ServerDone { .. } => true,
            _ => false,
        };
        if must_drain {
            let drain = async {
                conn.wire.flush("stopping replication").await?;
                loop {
                    match conn.wire.recv("stopping replication").await? {
                        Backend::Msg(Message::ReadyForQuery(_)) => return Ok(()),
                        Backend::Msg(Message::ErrorResponse(e)) => {
                            return Err(classify(server_error(&e), &self.ctx))
                        }
                        _ => {}
                    }
                }
            };
            match tokio::time::timeout(STOP_TIMEOUT, drain).await {
                Ok(Ok(())) => {}
                Ok(Err(PgError::Closed { .. })) => return Ok(()),
                Ok(Err(e)) => return Err(e),
                Err(_) => tracing::warn!(
                    target = %conn.wire.target,
                    "server did not finish the replication stream within {STOP_TIMEOUT:?}; closing anyway"
                ),
            }
        }
        conn.close().await;
        Ok(())
    }
}

/// The authentication exchange, up to AuthenticationOk: the method, and
/// whether SCRAM used channel binding.
async fn authenticate(
    wire: &mut Wire,
    params: &ConnParams,
    target: &Target,
    passfile_db: &str,
    ctx: &ErrorContext,
    tls_end_point: Option<Vec<u8>>,
) -> Result<(AuthMethod, bool), PgError> {
    const WHAT: &str = "authenticating";
    let password = |wire: &Wire| -> Result<Password, PgError> {
        params
            .password_for(target, passfile_db, &mut |w| tracing::warn!("{w}"))
            .ok_or_else(|| PgError::PasswordMissing {
                target: wire.target.clone(),
                user: params.user.clone(),
                passfile: params
                    .passfile
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "~/.pgpass".into()),
            })
    };
    let mut method = AuthMethod::Trust;
    let mut bound = false;
    loop {
        let msg = wire.recv(WHAT).await?;
        match msg {
            Backend::Msg(Message::AuthenticationOk) => return Ok((method, bound)),
            Backend::Msg(Message::AuthenticationCleartextPassword) => {
                method = AuthMethod::Cleartext;
                let pw = password(wire)?;
                frontend::password_message(pw.expose().as_bytes(), wire.queue())
                    .map_err(|e| wire.protocol(WHAT, e.to_string()))?;
                wire.flush(WHAT).await?;
            }
            Backend::Msg(Message::AuthenticationMd5Password(body)) => {
                method = AuthMethod::Md5;
                let pw = password(wire)?;
                let hash = md5_hash(params.user.as_bytes(), pw.expose().as_bytes(), body.salt());
                frontend::password_message(hash.as_bytes(), wire.queue())
                    .map_err(|e| wire.protocol(WHAT, e.to_string()))?;
                wire.flush(WHAT).await?;
            }
            Backend::Msg(Message::AuthenticationSasl(body)) => {
                let mut mechanisms = Vec::new();
                let mut it = body.mechanisms();
                while let Some(m) = it.next().map_err(|e| wire.protocol(WHAT, e.to_string()))? {
                    mechanisms.push(m.to_string());
                }
                let plus = mechanisms.iter().any(|m| m == SCRAM_SHA_256_PLUS);
                if !plus && !mechanisms.iter().any(|m| m == SCRAM_SHA_256) {
                    return Err(PgError::UnsupportedAuth {
                        target: wire.target.clone(),
                        method: format!("SASL ({})", mechanisms.join(", ")),
                    });
                }
                method = AuthMethod::ScramSha256;
                let pw = password(wire)?;
                // libpq's channel_binding=prefer: bind when the server offers
                // it over TLS; "y,," says we could have (so a man in the middle
                // cannot strip PLUS from the list); "n,," that we cannot.
                let (mechanism, binding) = match (&tls_end_point, plus) {
                    (Some(h), true) => (
                        SCRAM_SHA_256_PLUS,
                        ChannelBinding::tls_server_end_point(h.clone()),
                    ),
                    (Some(_), false) => (SCRAM_SHA_256, ChannelBinding::unrequested()),
                    (None, _) => (SCRAM_SHA_256, ChannelBinding::unsupported()),
                };
                bound = mechanism == SCRAM_SHA_256_PLUS;
                let mut scram = ScramSha256::new(pw.expose().as_bytes(), binding);
                frontend::sasl_initial_response(mechanism, scram.message(), wire.queue())
                    .map_err(|e| wire.protocol(WHAT, e.to_string()))?;
                wire.flush(WHAT).await?;
                match wire.recv(WHAT).await? {
                    Backend::Msg(Message::AuthenticationSaslContinue(c)) => {
                        scram
                            .update(c.data())
                            .map_err(|e| wire.protocol("SCRAM exchange", e.to_string()))?;
                    }
                    Backend::Msg(Message::ErrorResponse(e)) => {
                        return Err(classify(server_error(&e), ctx))
                    }
                    other => {
                        return Err(wire.protocol(
                            "SCRAM exchange",
                            format!("unexpected {}", wire::message_name(&other)),
                        ))
                    }
                }
                frontend::sasl_response(scram.message(), wire.queue())
                    .map_err(|e| wire.protocol(WHAT, e.to_string()))?;
                wire.flush(WHAT).await?;
                match wire.recv(WHAT).await? {
                    Backend::Msg(Message::AuthenticationSaslFinal(f)) => {
                        scram.finish(f.data()).map_err(|e| {
                            wire.protocol(
                                "verifying the server's SCRAM signature",
                                format!("{e}: the server did not prove it knows the password; is something impersonating it?"),
                            )
                        })?;
                    }
                    Backend::Msg(Message::ErrorResponse(e)) => {
                        return Err(classify(server_error(&e), ctx))
                    }
                    other => {
                        return Err(wire.protocol(
                            "SCRAM exchange",
                            format!("unexpected {}", wire::message_name(&other)),
                        ))
                    }
                }
            }
            Backend::Msg(Message::ErrorResponse(e)) => return Err(classify(server_error(&e), ctx)),
            Backend::Msg(
                Message::AuthenticationGss
                | Message::AuthenticationSspi
                | Message::AuthenticationKerberosV5
                | Message::AuthenticationGssContinue(_),
            ) => {
                return Err(PgError::UnsupportedAuth {
                    target: wire.target.clone(),
                    method: "GSSAPI/SSPI/Kerberos".into(),
                })
            }
            Backend::Msg(Message::AuthenticationScmCredential) => {
                return Err(PgError::UnsupportedAuth {
                    target: wire.target.clone(),
                    method: "SCM credential".into(),
                })
            }
            other => {
                return Err(
                    wire.protocol(WHAT, format!("unexpected {}", wire::message_name(&other)))
                )
            }
        }
    }
}

/// "15.8 (Debian 15.8-1)" → 150008; "9.6.24" → 90624; "16beta1" → 160000.
pub fn parse_server_version(v: &str) -> u32 {
    let numeric: String = v
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let parts: Vec<u32> = numeric
        .split('.')
        .filter(|p| !p.is_empty())
        .map(|p| p.parse().unwrap_or(0))
        .collect();
    match parts.as_slice() {
        [] => 0,
        [major] => major * 10000,
        [major, minor, ..] if *major >= 10 => major * 10000 + minor,
        [major, minor] => major * 10000 + minor * 100,
        [major, minor, patch, ..] => major * 10000 + minor * 100 + patch,
    }
}

/// A size setting as SHOW prints it ("16MB", "1GB", "8192", "64kB") in bytes.
pub fn parse_size_setting(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "kB" => 1 << 10,
        "MB" => 1 << 20,
        "GB" => 1 << 30,
        "TB" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// Slot names PostgreSQL accepts: 1–63 of `a-z0-9_`.
fn check_slot_name(slot: &str) -> Result<(), PgError> {
    let ok = !slot.is_empty()
        && slot.len() < 64
        && slot
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(PgError::InvalidSlotName(slot.to_string()))
    }
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// How [`session_attrs`] judges a walsender session: what it reported at
/// startup, SHOW, and (before PostgreSQL 14, which reports no
/// `in_hot_standby`) `transaction_read_only`, as that module describes.
impl Session for ReplicationConnection {
    fn reported(&self, name: &str) -> Option<&str> {
        self.wire.parameters.get(name).map(String::as_str)
    }

    async fn show(&mut self, name: &str) -> Result<String, PgError> {
        ReplicationConnection::show(self, name).await
    }

    async fn in_recovery(
        &mut self,
        params: &ConnParams,
        target: &Target,
        application_name: &str,
    ) -> Result<bool, PgError> {
        // SHOW runs in a transaction: transaction_read_only is
        // default_transaction_read_only OR RecoveryInProgress().
        if self.show("transaction_read_only").await? == "off" {
            return Ok(false);
        }
        if self.show("default_transaction_read_only").await? == "off" {
            return Ok(true);
        }
        // The default hides recovery: ask a session whose default is read-write.
        let mut probe = Self::connect_target(
            params,
            target,
            application_name,
            &[("default_transaction_read_only", "off")],
        )
        .await?;
        let read_only = probe.show("transaction_read_only").await;
        probe.wire.close().await;
        Ok(read_only? == "on")
    }

    async fn close(self) {
        self.wire.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_versions() {
        assert_eq!(
            parse_server_version("15.8 (Debian 15.8-1.pgdg120+1)"),
            150008
        );
        assert_eq!(parse_server_version("15.18"), 150018);
        assert_eq!(parse_server_version("16beta1"), 160000);
        assert_eq!(parse_server_version("9.6.24"), 90624);
        assert_eq!(parse_server_version("junk"), 0);
    }

    #[test]
    fn size_settings() {
        assert_eq!(parse_size_setting("16MB"), Some(16 << 20));
        assert_eq!(parse_size_setting("1GB"), Some(1 << 30));
        assert_eq!(parse_size_setting("64kB"), Some(64 << 10));
        assert_eq!(parse_size_setting("8192"), Some(8192));
        assert_eq!(parse_size_setting("16 MB"), Some(16 << 20));
        assert_eq!(parse_size_setting("16XB"), None);
        assert_eq!(parse_size_setting(""), None);
    }

    #[test]
    fn connection_stream_and_their_futures_are_send() {
        fn send<T: Send>(_: &T) {}
        fn send_type<T: Send>() {}
        send_type::<ReplicationConnection>();
        send_type::<ReplicationStream>();
        send_type::<PgError>();
        // Futures must be Send so the receive loop can run in tokio::spawn.
        let _ = |mut s: ReplicationStream| {
            send(&s.next_message());
            send(&s.send_status(Lsn(0), Lsn(0), Lsn(0), false));
            send(&s.stop());
        };
        let _ = |mut c: ReplicationConnection| {
            send(&c.identify_system());
            send(&c.start_replication(None, Lsn(0), TimelineId(1)));
        };
        send(&ReplicationConnection::connect("", "x"));
    }

    #[test]
    fn slot_names() {
        assert!(check_slot_name("walsafe_1").is_ok());
        for bad in ["", "Walsafe", "a-b", "a\"b", &"x".repeat(64)] {
            let e = check_slot_name(bad).unwrap_err();
            assert!(e.to_string().contains("invalid replication slot name"));
        }
        assert_eq!(quote_ident("walsafe"), "\"walsafe\"");
    }
}
