//! upstream: the session with the PostgreSQL server walsafe streams from.
//!
//! One type owns each step between "a conninfo" and "stream from here":
//!
//! ```text
//! Upstream::connect ──▶ Session { conn, server }     connect, IDENTIFY_SYSTEM, settings
//!   Session::ensure_slot                             READ_REPLICATION_SLOT (13, 14: SQL), create when missing
//!   Session::start_position(recovered)               spool first, then the slot, then a new slot's reservation
//!   Session::follow(timeline, from)                  before every stream: where this server lets it go on
//!   Session::recreate_slot                           after the slot lost WAL: drop, create again
//! ```
//!
//! After a failover the server may be a new primary whose timeline forked
//! off walsafe's before the point walsafe reached (an asynchronous standby
//! that was behind). [`Session::follow`] reads the server's history and
//! says so ([`Continue::Forked`]): walsafe's WAL past the fork stays
//! archived under the old timeline only, and streaming goes on on the
//! server's timeline from the segment holding the fork point. A server
//! behind walsafe (a standby still in recovery, or on an older timeline) is
//! a state to wait out ([`ServerBehind`], `PgError::AheadOfServer`), never a
//! reason to stop.
//!
//! The agent's reconnect loop and its repair after lost WAL both go through
//! it, so that "where may streaming start" is answered in one place, always
//! at a segment start (a spool segment file is written from offset 0).
//!
//! Retries: [`Upstream::connect_until_ready`] waits out a server that is
//! not up yet (retryable errors, [`Backoff`] from [`RECONNECT_MIN`] to
//! [`RECONNECT_MAX`]); every other error is returned for the caller to
//! classify ([`is_retryable`]).

use std::time::Duration;

use anyhow::{bail, Context};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;
use crate::pg::conninfo::ConnParams;
use crate::pg::error::PgError;
use crate::pg::lsn::{branch_of, timeline_of_point, Branch};
use crate::pg::replication::{ReplicationConnection, SlotPosition};
use crate::pg::{Lsn, Server, TimelineId};
use crate::retry::Backoff;
use crate::spool::Recovered;

/// First wait before reconnecting; doubles up to [`RECONNECT_MAX`].
pub const RECONNECT_MIN: Duration = Duration::from_millis(200);
/// Longest wait between reconnect attempts.
pub const RECONNECT_MAX: Duration = Duration::from_secs(10);

/// The reconnect backoff.
pub fn reconnect_backoff() -> Backoff {
    Backoff::new(RECONNECT_MIN, RECONNECT_MAX)
}

/// Whether an error of a PostgreSQL connection may pass by itself. A
/// missing slot is: every reconnect creates it ([`Session::ensure_slot`]),
/// as after a failover to a server that never had it.
pub fn is_retryable(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.is::<ServerBehind>()
            || c.downcast_ref::<PgError>()
                .is_some_and(|p| p.is_retryable() || matches!(p, PgError::SlotMissing { .. }))
    })
}

/// The server is on an older timeline than the WAL walsafe holds: a
/// standby that has not followed the promotion yet, or the old primary.
#[derive(Debug, thiserror::Error)]
#[error("PostgreSQL at {target} is on timeline {server}, but walsafe already holds WAL of timeline {ours}; waiting for a server on timeline {ours} or later (is [postgres] conninfo pointing at the new primary?)")]
pub struct ServerBehind {
    pub target: String,
    pub server: TimelineId,
    pub ours: TimelineId,
}

/// Where streaming goes on, on this server (see [`Session::follow`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Continue {
    /// The server's history holds `timeline` up to the point walsafe
    /// reached: stream from there (timeline switches follow in the stream).
    Here,
    /// The server's timeline forked off at `fork`, before the point walsafe
    /// reached on its timeline: what walsafe holds past `fork` is not in
    /// this server's history. Streaming goes on at `next`, from the start
    /// of the segment holding `fork`.
    Forked { fork: Lsn, next: TimelineId },
}

/// Did streaming fail because the server no longer has the WAL we need?
pub fn wal_lost(e: &anyhow::Error) -> bool {
    e.chain()
        .find_map(|c| c.downcast_ref::<PgError>())
        .is_some_and(|r| {
            matches!(
                r,
                PgError::WalRemoved { .. } | PgError::SlotInvalidated { .. }
            )
        })
}

/// The server walsafe streams from, as configured.
pub struct Upstream<'a> {
    cfg: &'a Config,
}

/// A connection, identified.
pub struct Session<'a> {
    cfg: &'a Config,
    pub conn: ReplicationConnection,
    pub server: Server,
}

/// Where the slot holds WAL from, as far as start-up can tell.
pub enum SlotStart {
    /// The slot's restart position (segment start) with its timeline;
    /// `None` when it reserves no WAL.
    Known(Option<(TimelineId, Lsn)>),
    /// The slot exists but its position cannot be read (PostgreSQL 13 or
    /// 14 without an SQL connection); why, for the error if it is needed.
    Unknown(anyhow::Error),
}

impl<'a> Upstream<'a> {
    /// The upstream of `cfg`'s `[postgres]` section.
    pub fn new(cfg: &'a Config) -> Self {
        Upstream { cfg }
    }

    /// One attempt: connect, then identify the server.
    pub async fn connect(&self) -> anyhow::Result<Session<'a>> {
        let p = &self.cfg.postgres;
        let mut conn = ReplicationConnection::connect(&p.conninfo, &p.application_name).await?;
        let server = conn.identify_system().await?;
        Ok(Session {
            cfg: self.cfg,
            conn,
            server,
        })
    }

    /// Connects again after an interruption, refusing another cluster.
    pub async fn reconnect(&self, expected: &Server) -> anyhow::Result<Session<'a>> {
        let s = self.connect().await?;
        let (now, was) = (
            s.server.identity.system_identifier,
            expected.identity.system_identifier,
        );
        if now != was {
            bail!(
                "after reconnecting, the server is database system {now} instead of {was}; [postgres] conninfo now reaches another cluster"
            );
        }
        Ok(s)
    }

    /// Connects, retrying retryable errors with backoff for up to
    /// `[postgres] connect_timeout`; `None` if `cancel` came first.
    /// With `forever` (the repository is pinned to this cluster, so there
    /// is WAL to ship and the server is known), retryable errors are
    /// waited out without a limit, as after a disconnection (rule 8).
    pub async fn connect_until_ready(
        &self,
        cancel: &CancellationToken,
        forever: bool,
    ) -> anyhow::Result<Option<Session<'a>>> {
        let mut backoff = reconnect_backoff();
        let limit = self.cfg.postgres.connect_timeout;
        let give_up = (!forever).then(|| tokio::time::Instant::now() + limit);
        loop {
            let e = match self.connect().await {
                Ok(s) => return Ok(Some(s)),
                Err(e) => e,
            };
            if !is_retryable(&e) {
                return Err(e);
            }
            let delay = backoff.next_delay();
            if give_up.is_some_and(|g| tokio::time::Instant::now() + delay >= g) {
                return Err(e.context(format!(
                    "could not connect to PostgreSQL within {limit:?} ([postgres] connect_timeout)"
                )));
            }
            warn!("cannot connect yet: {}", crate::report::error_line(&e));
            if sleep_or_cancel(cancel, delay).await {
                return Ok(None);
            }
        }
    }
}

/// Sleeps `delay`, returning true if cancelled meanwhile.
pub async fn sleep_or_cancel(cancel: &CancellationToken, delay: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(delay) => false,
        _ = cancel.cancelled() => true,
    }
}

impl Session<'_> {
    fn segment_size(&self) -> u64 {
        self.server.identity.segment_size
    }

    /// Where streaming starts: the spool first (it resumes exactly where
    /// durable WAL ends, re-streaming the filling segment from its start),
    /// else the slot's restart position, else a new slot's reservation.
    /// The slot is created when missing, whichever wins.
    pub async fn start_position(
        &mut self,
        recovered: &Recovered,
    ) -> anyhow::Result<(TimelineId, Lsn)> {
        let slot_start = self.ensure_slot().await?;
        if let Some(resume) = recovered.resume {
            // Whether this server can continue it is for `follow` to say.
            return Ok(resume);
        }
        match slot_start {
            SlotStart::Known(start) => Ok(start.unwrap_or((
                self.server.timeline,
                self.server.xlogpos.segment_start(self.segment_size()),
            ))),
            // Starting at the server's current position would skip, silently,
            // the WAL the slot holds for us (rule 2).
            SlotStart::Unknown(e) => Err(e.context(format!(
                "the spool {} is empty and the position of replication slot \"{}\" is unknown; let walsafe's role connect to a database (pg_hba.conf) so that it can read pg_replication_slots, or drop the slot to start at the server's current position",
                self.cfg.spool.dir.display(),
                self.cfg.postgres.slot
            ))),
        }
    }

    /// Where this server lets streaming go on from `from` on `timeline`,
    /// the end of what walsafe holds (see [`Continue`]). A server on an
    /// older timeline is [`ServerBehind`] (retryable); one whose history
    /// does not contain `timeline` at all descends from another branch of
    /// the cluster's history, which walsafe cannot follow.
    pub async fn follow(&mut self, timeline: TimelineId, from: Lsn) -> anyhow::Result<Continue> {
        let current = self.server.timeline;
        if current < timeline {
            return Err(ServerBehind {
                target: self.conn.target().to_string(),
                server: current,
                ours: timeline,
            }
            .into());
        }
        if current == timeline {
            return Ok(Continue::Here);
        }
        let (_, history) = self
            .conn
            .timeline_history(current)
            .await
            .with_context(|| format!("TIMELINE_HISTORY {current} failed"))?;
        match branch_of(&String::from_utf8_lossy(&history), timeline, current) {
            Branch::Current => Ok(Continue::Here),
            Branch::Ended { at, .. } if from <= at => Ok(Continue::Here),
            Branch::Ended { at, next } => Ok(Continue::Forked { fork: at, next }),
            Branch::Foreign => bail!(
                "PostgreSQL at {} is on timeline {current}, whose history does not contain timeline {timeline} that walsafe streamed until {from}: the server descends from another branch of this cluster's history; point [postgres] conninfo at the server that continues timeline {timeline}, or start a new spool and repository for this branch",
                self.conn.target()
            ),
        }
    }

    /// Reads the slot (READ_REPLICATION_SLOT; on PostgreSQL 13 and 14, which
    /// lack it, `pg_replication_slots` over SQL), creating it when missing.
    pub async fn ensure_slot(&mut self) -> anyhow::Result<SlotStart> {
        let slot = &self.cfg.postgres.slot;
        let seg = self.segment_size();
        let existing = match self.conn.read_replication_slot(slot).await {
            Ok(found) => Ok(found),
            Err(PgError::Unsupported { .. }) => self.slot_position_over_sql().await,
            Err(e) => {
                return Err(anyhow::Error::new(e)
                    .context(format!("cannot read replication slot \"{slot}\"")))
            }
        };
        let read_error = match existing {
            Ok(Some(pos)) => {
                return Ok(SlotStart::Known(pos.restart_lsn.map(|l| {
                    (
                        pos.restart_tli.unwrap_or(self.server.timeline),
                        l.segment_start(seg),
                    )
                })))
            }
            Ok(None) => None,
            Err(e) => Some(e),
        };
        match self.create_slot().await {
            Ok(reserved) => Ok(SlotStart::Known(Some((
                self.server.timeline,
                reserved.segment_start(seg),
            )))),
            // Only reached when the slot could not be read over SQL.
            Err(e)
                if read_error.is_some()
                    && e.chain()
                        .any(|c| matches!(c.downcast_ref(), Some(PgError::SlotExists { .. }))) =>
            {
                let e = read_error.expect("checked above");
                warn!(
                    %slot,
                    "cannot read where the replication slot holds WAL from: {}",
                    crate::report::error_line(&e)
                );
                Ok(SlotStart::Unknown(e))
            }
            Err(e) => Err(e),
        }
    }

    /// Creates the slot, reserving WAL; returns where it holds WAL from (the
    /// server's position when it reports none).
    async fn create_slot(&mut self) -> anyhow::Result<Lsn> {
        let slot = &self.cfg.postgres.slot;
        let reserved = self
            .conn
            .create_physical_slot(slot)
            .await
            .with_context(|| format!("cannot create replication slot \"{slot}\""))?;
        info!(%slot, %reserved, "created the replication slot");
        Ok(if reserved == Lsn::INVALID {
            self.server.xlogpos
        } else {
            reserved
        })
    }

    /// After the server reported WAL from `lost_from` as removed: where the
    /// slot (still, or once re-created) holds WAL from. A slot that still
    /// holds WAL after `lost_from` is kept; an invalidated one, or one that
    /// holds nothing usable, is dropped and created again.
    pub async fn recreate_slot(&mut self, lost_from: Lsn) -> anyhow::Result<Lsn> {
        let slot = self.cfg.postgres.slot.clone();
        let sql = self
            .sql()
            .await
            .context("cannot open an SQL connection to repair the replication slot")?;
        let state = crate::pg::sql::slot_state(&sql, &slot).await?;
        let usable = state.as_ref().and_then(|s| {
            (s.wal_status.as_deref() != Some("lost"))
                .then_some(s.restart_lsn)
                .flatten()
        });
        if let Some(l) = usable {
            if l.segment_start(self.segment_size()) > lost_from {
                return Ok(l);
            }
        }
        if state.is_some() {
            sql.execute("SELECT pg_drop_replication_slot($1)", &[&slot])
                .await
                .with_context(|| {
                    format!("cannot drop the invalidated replication slot \"{slot}\"")
                })?;
        }
        let reserved = self.create_slot().await?;
        warn!(%slot, %reserved, "re-created the replication slot after it lost WAL");
        Ok(reserved)
    }

    /// The start of the oldest WAL segment of `timeline` still in the
    /// server's pg_wal (`pg_ls_waldir()`, which needs superuser or
    /// pg_monitor); `None` when that cannot be read.
    pub async fn oldest_wal(&self, timeline: TimelineId) -> Option<Lsn> {
        let sql = self.sql().await.ok()?;
        let prefix = format!("{:08X}", timeline.0);
        let row = sql
            .query_one(
                "SELECT min(name) FROM pg_ls_waldir() WHERE name ~ '^[0-9A-F]{24}$' AND left(name, 8) = $1",
                &[&prefix],
            )
            .await
            .map_err(|e| tracing::debug!("cannot list pg_wal: {e}"))
            .ok()?;
        let name: Option<String> = row.get(0);
        let seg = crate::pg::SegmentName::parse(&name?, self.segment_size())?;
        Some(seg.start_lsn(self.segment_size()))
    }

    /// The ordinary SQL connection to the same server: with several hosts
    /// in the conninfo, the one this session's replication connection
    /// reached (another host would answer for another slot and pg_wal).
    async fn sql(&self) -> anyhow::Result<tokio_postgres::Client> {
        let p = &self.cfg.postgres;
        let mut params = ConnParams::parse(&p.conninfo)?;
        let here = self.conn.target();
        if params.targets.iter().any(|t| t.to_string() == here) {
            params.targets.retain(|t| t.to_string() == here);
        }
        Ok(crate::pg::sql::connect_sql_params(&params, &p.application_name).await?)
    }

    /// READ_REPLICATION_SLOT's answer for servers without the command: the
    /// slot's `restart_lsn` from `pg_replication_slots`, and its timeline
    /// from the server's history (what PostgreSQL 15 computes itself).
    /// `Err` when no SQL connection is possible (e.g. pg_hba.conf admits the
    /// role for replication only).
    async fn slot_position_over_sql(&mut self) -> anyhow::Result<Option<SlotPosition>> {
        let slot = self.cfg.postgres.slot.clone();
        let sql = self.sql().await.with_context(|| {
            format!(
                "PostgreSQL {} has no READ_REPLICATION_SLOT, and an SQL connection to read slot \"{slot}\" from pg_replication_slots failed",
                self.server.identity.major()
            )
        })?;
        let Some(state) = crate::pg::sql::slot_state(&sql, &slot).await? else {
            return Ok(None);
        };
        let timeline = self.server.timeline;
        let restart_tli = match state.restart_lsn {
            Some(l) if timeline.0 > 1 => {
                let (_, history) = self.conn.timeline_history(timeline).await?;
                Some(timeline_of_point(
                    &String::from_utf8_lossy(&history),
                    l,
                    timeline,
                ))
            }
            Some(_) => Some(timeline),
            None => None,
        };
        Ok(Some(SlotPosition {
            restart_lsn: state.restart_lsn,
            restart_tli,
        }))
    }
}
