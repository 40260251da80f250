//! BASE_BACKUP over a walsender connection: the server's archives (one tar
//! per tablespace, the data directory's `base.tar` among them) and its
//! backup manifest, as a stream of [`BackupEvent`]s that the caller reads
//! at its own pace (the socket is not read while it does not ask: that is
//! the backpressure).
//!
//! Two wire forms, chosen by the server's version:
//!
//! ```text
//! PostgreSQL 15+: BASE_BACKUP ( LABEL 'l', PROGRESS, CHECKPOINT 'fast', WAIT true,
//!                               MANIFEST 'yes', TABLESPACE_MAP, MAX_RATE n, TARGET 'client' )
//!   result set: start LSN, timeline
//!   result set: one row per tablespace (oid, location, size in KiB); the data directory's oid is NULL
//!   CopyOutResponse, then CopyData, each starting with a type byte:
//!     'n' archive name \0 tablespace location \0   a new archive begins
//!     'd' bytes                                    archive (or manifest) data
//!     'p' int8                                     bytes the server has sent so far
//!     'm'                                          the manifest begins
//!   CopyDone
//!   result set: stop LSN, timeline
//!
//! PostgreSQL 13, 14: BASE_BACKUP LABEL 'l' PROGRESS FAST MANIFEST 'yes' TABLESPACE_MAP MAX_RATE n
//!   the same two result sets, then one CopyOutResponse … CopyDone of raw
//!   tar per tablespace row, in row order (named "<oid>.tar", "base.tar"),
//!   then one more with the manifest, then the stop result set.
//! ```
//!
//! Both forms come out as the same events; progress is counted by the
//! caller for the old form. The tar data of the old form lacks the two
//! trailing zero blocks (the caller ends each archive properly).

use bytes::{Buf, Bytes};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;

use super::wire::{self, Backend};
use super::ReplicationConnection;
use crate::pg::error::{classify, server_error, ErrorContext, PgError, ServerError};
use crate::pg::lsn::{Lsn, TimelineId};

/// First major with the option-list syntax and the typed COPY stream.
const NEW_PROTOCOL: u32 = 150000;

/// How the backup is taken.
#[derive(Debug, Clone)]
pub struct BaseBackupOptions {
    /// The backup label (in `backup_label` and the backup history file).
    pub label: String,
    /// An immediate checkpoint (`fast`) rather than a spread one.
    pub fast_checkpoint: bool,
    /// The server's send rate limit, in KiB/s (32 .. 1048576).
    pub max_rate_kib: Option<u32>,
}

/// A tablespace the backup holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tablespace {
    /// Its OID; `None` for the data directory itself.
    pub oid: Option<u32>,
    /// Its directory on the server; `None` for the data directory.
    pub location: Option<String>,
    /// Approximate size in bytes (progress estimate).
    pub size: Option<u64>,
}

/// What the backup stream carries next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupEvent {
    /// An archive begins: its name (`base.tar`, `<oid>.tar`) and the
    /// tablespace's location (`None` for the data directory).
    Archive {
        name: String,
        location: Option<String>,
    },
    /// Bytes of the current archive, or of the manifest after
    /// [`BackupEvent::Manifest`].
    Data(Bytes),
    /// The backup manifest (JSON) begins.
    Manifest,
    /// The server has sent this many bytes of archives (new form only).
    Progress(u64),
}

/// Where the stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Inside the COPY (new form: the one COPY; old form: the `index`th).
    Copying { index: usize },
    /// Between COPYs or after the last: result sets until ReadyForQuery.
    Between { copies: usize },
    /// ReadyForQuery seen.
    Done,
}

/// A base backup being received.
pub struct BaseBackup {
    conn: ReplicationConnection,
    legacy: bool,
    start: (Lsn, TimelineId),
    end: Option<(Lsn, TimelineId)>,
    tablespaces: Vec<Tablespace>,
    state: State,
    pending: Option<BackupEvent>,
    error: Option<ServerError>,
    ctx: ErrorContext,
}

impl ReplicationConnection {
    /// Starts BASE_BACKUP: returns once the server has done its start
    /// checkpoint and begun sending.
    pub async fn base_backup(mut self, opts: &BaseBackupOptions) -> Result<BaseBackup, PgError> {
        let ctx = self.ctx("BASE_BACKUP");
        let legacy = self.server_version_num < NEW_PROTOCOL;
        let sql = command(opts, legacy);
        frontend::query(&sql, self.wire.queue())
            .map_err(|e| self.wire.protocol("BASE_BACKUP", e.to_string()))?;
        self.wire.flush("sending BASE_BACKUP").await?;
        let what = "starting the base backup";
        let mut results: Vec<Vec<Vec<Option<Bytes>>>> = Vec::new();
        let mut error = None;
        loop {
            match self.wire.recv(what).await? {
                Backend::Msg(Message::RowDescription(_)) => results.push(Vec::new()),
                Backend::Msg(Message::DataRow(r)) => {
                    let row = wire::row_values(&r)
                        .map_err(|e| self.wire.protocol(what, e.to_string()))?;
                    match results.last_mut() {
                        Some(rows) => rows.push(row),
                        None => {
                            return Err(self.wire.protocol(what, "a row before its description"))
                        }
                    }
                }
                Backend::Msg(Message::CommandComplete(_)) => {}
                Backend::Msg(Message::CopyOutResponse(_)) => break,
                Backend::Msg(Message::ErrorResponse(e)) => {
                    error.get_or_insert(server_error(&e));
                }
                Backend::Msg(Message::ReadyForQuery(_)) => {
                    return Err(match error {
                        Some(e) => classify(e, &ctx),
                        None => self
                            .wire
                            .protocol(what, "BASE_BACKUP ended before sending any data"),
                    })
                }
                other => {
                    return Err(self
                        .wire
                        .protocol(what, format!("unexpected {}", wire::message_name(&other))))
                }
            }
        }
        let text = |v: &Option<Bytes>| v.as_ref().map(|b| String::from_utf8_lossy(b).into_owned());
        let start = match results.first().and_then(|rows| rows.first()) {
            Some(row) if row.len() >= 2 => parse_position(text(&row[0]), text(&row[1])),
            _ => None,
        }
        .ok_or_else(|| self.wire.protocol(what, "no start position"))?;
        let tablespaces = results
            .get(1)
            .map(|rows| {
                rows.iter()
                    .map(|row| Tablespace {
                        oid: row.first().and_then(text).and_then(|v| v.parse().ok()),
                        location: row.get(1).and_then(text),
                        size: row
                            .get(2)
                            .and_then(text)
                            .and_then(|v| v.parse::<u64>().ok())
                            .map(|kib| kib * 1024),
                    })
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        let pending = if legacy {
            let first = tablespaces
                .first()
                .ok_or_else(|| self.wire.protocol(what, "no tablespace listed"))?;
            Some(archive_of(first))
        } else {
            None
        };
        Ok(BaseBackup {
            conn: self,
            legacy,
            start,
            end: None,
            tablespaces,
            state: State::Copying { index: 0 },
            pending,
            error,
            ctx,
        })
    }
}

/// The command text for `opts` in the server's syntax.
fn command(opts: &BaseBackupOptions, legacy: bool) -> String {
    let label = quote_literal(&opts.label);
    if legacy {
        let mut sql = format!("BASE_BACKUP LABEL {label} PROGRESS");
        if opts.fast_checkpoint {
            sql.push_str(" FAST");
        }
        if let Some(r) = opts.max_rate_kib {
            sql.push_str(&format!(" MAX_RATE {r}"));
        }
        sql.push_str(" TABLESPACE_MAP MANIFEST 'yes'");
        sql
    } else {
        let mut o = vec![
            format!("LABEL {label}"),
            "PROGRESS".to_string(),
            format!(
                "CHECKPOINT '{}'",
                if opts.fast_checkpoint {
                    "fast"
                } else {
                    "spread"
                }
            ),
            "WAIT true".to_string(),
            "MANIFEST 'yes'".to_string(),
            "TABLESPACE_MAP".to_string(),
            "TARGET 'client'".to_string(),
        ];
        if let Some(r) = opts.max_rate_kib {
            o.push(format!("MAX_RATE {r}"));
        }
        format!("BASE_BACKUP ( {} )", o.join(", "))
    }
}

/// A string literal for a replication command.
fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn parse_position(lsn: Option<String>, tli: Option<String>) -> Option<(Lsn, TimelineId)> {
    let lsn = lsn?.parse::<Lsn>().ok()?;
    let tli = tli?.parse::<u32>().ok().filter(|&t| t > 0)?;
    Some((lsn, TimelineId(tli)))
}

/// The archive event of a tablespace row (old form: the client names it).
fn archive_of(t: &Tablespace) -> BackupEvent {
    BackupEvent::Archive {
        name: match t.oid {
            Some(oid) => format!("{oid}.tar"),
            None => "base.tar".to_string(),
        },
        location: t.location.clone(),
    }
}

/// Reads a NUL-terminated string from `b`.
fn cstring(b: &mut Bytes) -> Option<String> {
    let at = b.iter().position(|&c| c == 0)?;
    let s = String::from_utf8_lossy(&b[..at]).into_owned();
    b.advance(at + 1);
    Some(s)
}

impl BaseBackup {
    /// Where the backup starts (its checkpoint's redo) and on which timeline.
    pub fn start(&self) -> (Lsn, TimelineId) {
        self.start
    }

    /// Where it ended; known once [`BaseBackup::next`] returned `None`.
    pub fn end(&self) -> Option<(Lsn, TimelineId)> {
        self.end
    }

    /// The tablespaces, as the server listed them.
    pub fn tablespaces(&self) -> &[Tablespace] {
        &self.tablespaces
    }

    /// Whether the server speaks the old (13, 14) form.
    pub fn is_legacy(&self) -> bool {
        self.legacy
    }

    /// The next event; `None` once the server reported the stop position
    /// and is ready again.
    pub async fn next(&mut self) -> Result<Option<BackupEvent>, PgError> {
        if let Some(e) = self.pending.take() {
            return Ok(Some(e));
        }
        let what = "receiving the base backup";
        loop {
            if self.state == State::Done {
                return Ok(None);
            }
            let msg = self.conn.wire.recv(what).await?;
            match (self.state, msg) {
                (State::Copying { .. }, Backend::Msg(Message::CopyData(d))) => {
                    let data = d.into_bytes();
                    if self.legacy {
                        return Ok(Some(BackupEvent::Data(data)));
                    }
                    if let Some(e) = self.typed(data)? {
                        return Ok(Some(e));
                    }
                }
                (State::Copying { index }, Backend::Msg(Message::CopyDone)) => {
                    self.state = State::Between { copies: index + 1 };
                }
                (State::Between { copies }, Backend::Msg(Message::CopyOutResponse(_)))
                    if self.legacy =>
                {
                    self.state = State::Copying { index: copies };
                    return Ok(Some(match self.tablespaces.get(copies) {
                        Some(t) => archive_of(t),
                        None => BackupEvent::Manifest,
                    }));
                }
                (State::Between { .. }, Backend::Msg(Message::RowDescription(_))) => {}
                (State::Between { .. }, Backend::Msg(Message::DataRow(r))) => {
                    let values = wire::row_values(&r)
                        .map_err(|e| self.conn.wire.protocol(what, e.to_string()))?;
                    let text = |i: usize| {
                        values
                            .get(i)
                            .cloned()
                            .flatten()
                            .map(|b| String::from_utf8_lossy(&b).into_owned())
                    };
                    self.end = parse_position(text(0), text(1));
                }
                (State::Between { .. }, Backend::Msg(Message::CommandComplete(_))) => {}
                (_, Backend::Msg(Message::ErrorResponse(e))) => {
                    self.error.get_or_insert(server_error(&e));
                    // An error inside COPY ends it: results follow.
                    if let State::Copying { index } = self.state {
                        self.state = State::Between { copies: index + 1 };
                    }
                }
                (_, Backend::Msg(Message::ReadyForQuery(_))) => {
                    self.state = State::Done;
                    if let Some(e) = self.error.take() {
                        return Err(classify(e, &self.ctx));
                    }
                    if self.end.is_none() {
                        return Err(self
                            .conn
                            .wire
                            .protocol(what, "the base backup ended without a stop position"));
                    }
                    return Ok(None);
                }
                (state, other) => {
                    return Err(self.conn.wire.protocol(
                        what,
                        format!("unexpected {} ({state:?})", wire::message_name(&other)),
                    ))
                }
            }
        }
    }

    /// Decodes one typed CopyData message of the new form.
    fn typed(&self, mut data: Bytes) -> Result<Option<BackupEvent>, PgError> {
        let what = "receiving the base backup";
        if data.is_empty() {
            return Err(self.conn.wire.protocol(what, "empty CopyData message"));
        }
        let kind = data[0];
        data.advance(1);
        Ok(Some(match kind {
            b'n' => {
                let name = cstring(&mut data);
                let location = cstring(&mut data);
                let (Some(name), Some(location)) = (name, location) else {
                    return Err(self
                        .conn
                        .wire
                        .protocol(what, "a new-archive message without its two strings"));
                };
                BackupEvent::Archive {
                    name,
                    location: (!location.is_empty()).then_some(location),
                }
            }
            b'd' => BackupEvent::Data(data),
            b'm' => BackupEvent::Manifest,
            b'p' if data.len() == 8 => BackupEvent::Progress(data.get_u64()),
            other => {
                return Err(self.conn.wire.protocol(
                    what,
                    format!("unknown base backup message type {:?}", other as char),
                ))
            }
        }))
    }

    /// The connection, once the backup is over (for a polite close).
    pub fn into_connection(self) -> ReplicationConnection {
        self.conn
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_syntaxes_carry_every_option() {
        let o = BaseBackupOptions {
            label: "it's daily".into(),
            fast_checkpoint: true,
            max_rate_kib: Some(2048),
        };
        assert_eq!(
            command(&o, false),
            "BASE_BACKUP ( LABEL 'it''s daily', PROGRESS, CHECKPOINT 'fast', WAIT true, MANIFEST 'yes', TABLESPACE_MAP, TARGET 'client', MAX_RATE 2048 )"
        );
        assert_eq!(
            command(&o, true),
            "BASE_BACKUP LABEL 'it''s daily' PROGRESS FAST MAX_RATE 2048 TABLESPACE_MAP MANIFEST 'yes'"
        );
        let spread = BaseBackupOptions {
            fast_checkpoint: false,
            max_rate_kib: None,
            ..o
        };
        assert!(command(&spread, false).contains("CHECKPOINT 'spread'"));
        assert!(!command(&spread, true).contains("FAST"));
    }

    #[test]
    fn archive_names_follow_pg_basebackup() {
        let t = |oid| Tablespace {
            oid,
            location: oid.map(|o| format!("/ts/{o}")),
            size: None,
        };
        assert_eq!(
            archive_of(&t(Some(16385))),
            BackupEvent::Archive {
                name: "16385.tar".into(),
                location: Some("/ts/16385".into())
            }
        );
        assert_eq!(
            archive_of(&t(None)),
            BackupEvent::Archive {
                name: "base.tar".into(),
                location: None
            }
        );
    }
}
