//! agent: `walsafe run`, the long-running service.
//!
//! Start-up order matters for safety:
//!
//! 1. open the repository (and key) — a bad URL or key fails before
//!    anything is streamed;
//! 2. connect, `IDENTIFY_SYSTEM`, learn the segment size and version;
//! 3. pin the repository to this cluster (refuse a stranger, rule 5);
//! 4. open the spool (lock, recover what is durable);
//! 5. choose where to stream from: the spool first (re-streaming the
//!    filling segment from its start), else the slot's restart position,
//!    else a new slot's reserved position — always a segment start.
//!    PostgreSQL 13 and 14 lack READ_REPLICATION_SLOT: there the slot is
//!    read from `pg_replication_slots` over SQL, its timeline from the
//!    server's history; without an SQL connection an existing slot's
//!    position is unknown, which is fine while the spool says where to
//!    resume and an error otherwise (streaming from the server's current
//!    position would skip the WAL the slot holds);
//! 6. start the spool writer thread, the uploader, the metrics refresher,
//!    then the receive loop, which reconnects on retryable errors and
//!    resumes at the end of what it queued to the spool.
//!
//! Shutdown (SIGTERM/SIGINT): stop reading, send a last status update,
//! let the writer write and fsync everything queued, let in-flight
//! uploads finish (bounded), exit 0. Whatever is not uploaded stays in the
//! spool and is shipped at next start.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::gap::Gap;
use crate::logging::ReopenableFile;
use crate::pg::error::PgError;
use crate::pg::lsn::timeline_of_point;
use crate::pg::page::ClusterIdentity;
use crate::pg::replication::{ReplicationConnection, SlotPosition};
use crate::pg::{Lsn, TimelineId, WAL_BLOCK_SIZE};
use crate::positions::Positions;
use crate::receive::{Receiver, StreamEnd};
use crate::repository::{ClusterIdentity as RepoIdentity, Repository};
use crate::spool::retention::Retention;
use crate::spool::{Publisher, Recovered, Spool, WriterHandle};
use crate::upload::Uploader;

/// First wait before reconnecting; doubles up to [`RECONNECT_MAX`].
pub const RECONNECT_MIN: Duration = Duration::from_millis(200);
/// Longest wait between reconnect attempts.
pub const RECONNECT_MAX: Duration = Duration::from_secs(10);

/// What the server told us at connection.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    pub system_identifier: u64,
    pub timeline: TimelineId,
    pub xlogpos: Lsn,
    pub segment_size: u64,
    pub version_num: u32,
}

/// Connects and identifies the server.
pub async fn connect(cfg: &Config) -> anyhow::Result<(ReplicationConnection, ServerInfo)> {
    let mut conn =
        ReplicationConnection::connect(&cfg.postgres.conninfo, &cfg.postgres.application_name)
            .await?;
    let id = conn.identify_system().await?;
    let segment_size = conn.segment_size().await?;
    let info = ServerInfo {
        system_identifier: id.systemid,
        timeline: id.timeline,
        xlogpos: id.xlogpos,
        segment_size,
        version_num: conn.server_version_num(),
    };
    Ok((conn, info))
}

fn is_retryable(e: &anyhow::Error) -> bool {
    e.chain()
        .find_map(|c| c.downcast_ref::<PgError>())
        .is_some_and(PgError::is_retryable)
}

/// The spool and its uploader, running.
struct Pipeline {
    spool: Arc<Spool>,
    recovered: Recovered,
    archived: tokio::sync::watch::Receiver<Lsn>,
    /// The spool's news, for the writer thread once streaming starts.
    publisher: Option<Publisher>,
    upload_cancel: CancellationToken,
    upload_task: tokio::task::JoinHandle<()>,
}

/// Opens the spool and starts shipping what it holds.
async fn start_pipeline(
    cfg: &Config,
    repo: &Arc<Repository>,
    positions: &Positions,
    segment_size: u64,
) -> anyhow::Result<Pipeline> {
    let dir = cfg.spool.dir.clone();
    let fsync = cfg.fsync;
    let (spool, recovered) =
        tokio::task::spawn_blocking(move || Spool::open(&dir, segment_size, fsync))
            .await?
            .with_context(|| format!("cannot open the spool {}", cfg.spool.dir.display()))?;
    let spool = Arc::new(spool);
    let (publisher, feed) = crate::spool::feed(recovered.durable(segment_size));
    positions.follow_durable(feed.durable.clone());
    let retention = Arc::new(Retention::new(spool.clone(), 1));
    let (uploader, archived) = Uploader::new(
        repo.clone(),
        spool.clone(),
        retention,
        positions.clone(),
        &recovered,
        cfg.archive.partial_interval,
        cfg.archive.upload_concurrency,
    );
    let upload_cancel = CancellationToken::new();
    let upload_task = tokio::spawn(uploader.run(feed, upload_cancel.clone()));
    Ok(Pipeline {
        spool,
        recovered,
        archived,
        publisher: Some(publisher),
        upload_cancel,
        upload_task,
    })
}

/// `walsafe run`. `log_file` is reopened on SIGHUP.
pub async fn run(cfg: Config, log_file: Option<ReopenableFile>) -> anyhow::Result<()> {
    if let Some(listen) = cfg.metrics.listen {
        crate::metrics::install(listen)?;
    }
    let repo = Arc::new(
        Repository::open(&cfg.repository)
            .with_context(|| format!("cannot open the repository {}", cfg.repository.url))?,
    );
    let cancel = CancellationToken::new();
    spawn_signal_handler(cancel.clone(), log_file);
    let positions = Positions::default();
    if let Some(previous) = crate::state::read(&cfg.spool.dir) {
        positions.seed_last_archived_ms(previous.last_archived_ms);
    }
    let refresher =
        crate::service::spawn_monitor(positions.clone(), cfg.spool.dir.clone(), cancel.clone());

    // A pinned repository tells the segment size: ship what the spool holds
    // right away, even while PostgreSQL is unreachable (after a disaster, the
    // spool may hold the last second of WAL that exists anywhere).
    let mut pipeline = match repo.descriptor().await? {
        Some(d) => Some(start_pipeline(&cfg, &repo, &positions, d.segment_size).await?),
        None => None,
    };

    let result = stream_until_stopped(&cfg, &repo, &positions, &mut pipeline, &cancel).await;
    if let Err(e) = &result {
        error!("{}", crate::report::error_line(e));
    }
    cancel.cancel();
    if let Some(p) = pipeline {
        p.upload_cancel.cancel();
        let _ = p.upload_task.await;
    }
    let _ = refresher.await;
    crate::metrics::refresh_positions(&positions);
    info!(
        flushed = %positions.flushed(),
        archived = %positions.archived(),
        "stopped"
    );
    result
}

async fn stream_until_stopped(
    cfg: &Config,
    repo: &Arc<Repository>,
    positions: &Positions,
    pipeline: &mut Option<Pipeline>,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    let Some((mut conn, server)) = connect_until_ready(cfg, cancel).await? else {
        return Ok(());
    };
    info!(
        system_identifier = server.system_identifier,
        timeline = %server.timeline,
        segment_size = server.segment_size,
        version = server.version_num,
        "connected"
    );
    repo.pin(&RepoIdentity {
        system_identifier: server.system_identifier,
        pg_version_num: server.version_num,
        segment_size: server.segment_size,
    })
    .await?;
    let identity = ClusterIdentity {
        system_identifier: server.system_identifier,
        segment_size: server.segment_size,
        block_size: WAL_BLOCK_SIZE,
    };
    if pipeline.is_none() {
        *pipeline = Some(start_pipeline(cfg, repo, positions, server.segment_size).await?);
    }
    let p = pipeline.as_mut().expect("started above");
    let (timeline, start) = start_position(cfg, &mut conn, &server, &p.recovered).await?;
    info!(%timeline, %start, "streaming starts here");
    positions.reset(timeline, start);
    let publisher = p
        .publisher
        .take()
        .expect("the spool writer starts once per pipeline");
    let spool = p.spool.clone();
    let writer = WriterHandle::start(spool.writer(), publisher, positions.clone());
    let mut receiver = Receiver {
        cfg,
        identity,
        writer: &writer,
        positions: positions.clone(),
        archived: p.archived.clone(),
        cancel: cancel.clone(),
        resume: (timeline, start),
    };
    // Histories of every timeline up to the current one (recovery probes them in order).
    for t in 2..=timeline.0 {
        if let Err(e) = receiver.fetch_history(&mut conn, TimelineId(t)).await {
            warn!(
                "could not fetch the history file of timeline {t}: {}",
                crate::report::error_line(&e)
            );
        }
    }

    let mut conn = Some(conn);
    let mut backoff = RECONNECT_MIN;
    let (mut tli, mut from) = (timeline, start);
    let outcome: anyhow::Result<()> = loop {
        let c = match conn.take() {
            Some(c) => c,
            None => match connect(cfg).await {
                Ok((c, info)) => {
                    if info.system_identifier != server.system_identifier {
                        break Err(anyhow!(
                            "after reconnecting, the server is database system {} instead of {}; [postgres] conninfo now reaches another cluster",
                            info.system_identifier,
                            server.system_identifier
                        ));
                    }
                    info!("reconnected");
                    backoff = RECONNECT_MIN;
                    c
                }
                Err(e) if is_retryable(&e) => {
                    positions.receive_heartbeat();
                    warn!("cannot reconnect yet: {}", crate::report::error_line(&e));
                    if sleep_or_cancel(cancel, &mut backoff).await {
                        break Ok(());
                    }
                    continue;
                }
                Err(e) => break Err(e),
            },
        };
        match receiver.stream(c, tli, from).await {
            Ok(StreamEnd::Cancelled) => break Ok(()),
            Ok(StreamEnd::ServerStopped) => {
                warn!("the server ended streaming (shutting down?); reconnecting");
            }
            Err(e) if is_retryable(&e) => warn!(
                "replication interrupted: {}; reconnecting",
                crate::report::error_line(&e)
            ),
            Err(e) if wal_lost(&e) => {
                error!("{}", crate::report::error_line(&e));
                match skip_lost_wal(cfg, repo, &spool, &receiver, server.segment_size).await {
                    Ok((t, l)) => {
                        tli = t;
                        from = l;
                        continue;
                    }
                    Err(e) => break Err(e),
                }
            }
            Err(e) => break Err(e),
        }
        crate::metrics::reconnect();
        (tli, from) = receiver.resume;
        if sleep_or_cancel(cancel, &mut backoff).await {
            break Ok(());
        }
    };
    // Orderly shutdown: stop reading, then let the writer write and fsync
    // everything queued before the uploader is told to stop.
    cancel.cancel();
    let writer_result = writer.finish().await;
    outcome?;
    writer_result
}

/// Did streaming fail because the server no longer has the WAL we need?
fn wal_lost(e: &anyhow::Error) -> bool {
    e.chain()
        .find_map(|c| c.downcast_ref::<PgError>())
        .is_some_and(|r| {
            matches!(
                r,
                PgError::WalRemoved { .. } | PgError::SlotInvalidated { .. }
            )
        })
}

/// WAL from the end of what we received is gone from the server (DESIGN
/// rule 2): close the spool segment, repair the slot, record the lost range
/// as a gap (spool, repository, metric, error log) and return where
/// streaming resumes: the start of the oldest segment the server still has
/// for our slot.
async fn skip_lost_wal(
    cfg: &Config,
    repo: &Repository,
    spool: &Arc<Spool>,
    receiver: &Receiver<'_>,
    segment_size: u64,
) -> anyhow::Result<(TimelineId, Lsn)> {
    let (timeline, lost_from) = receiver.resume;
    receiver.close_segment_for_gap(timeline).await?;

    let slot = &cfg.postgres.slot;
    let sql = crate::pg::sql::connect_sql(&cfg.postgres.conninfo, &cfg.postgres.application_name)
        .await
        .context("cannot open an SQL connection to repair the replication slot")?;
    let state = crate::pg::sql::slot_state(&sql, slot).await?;
    let usable = state.as_ref().and_then(|s| {
        (s.wal_status.as_deref() != Some("lost"))
            .then_some(s.restart_lsn)
            .flatten()
    });
    let (mut conn, info) = connect(cfg).await?;
    let restart = match usable {
        Some(l) if l.segment_start(segment_size) > lost_from => l,
        _ => {
            if state.is_some() {
                sql.execute("SELECT pg_drop_replication_slot($1)", &[slot])
                    .await
                    .with_context(|| {
                        format!("cannot drop the invalidated replication slot \"{slot}\"")
                    })?;
            }
            let reserved = conn
                .create_physical_slot(slot)
                .await
                .with_context(|| format!("cannot re-create replication slot \"{slot}\""))?;
            warn!(%slot, %reserved, "re-created the replication slot after it lost WAL");
            if reserved == Lsn::INVALID {
                info.xlogpos
            } else {
                reserved
            }
        }
    };
    let resume = restart.segment_start(segment_size);
    if resume <= lost_from {
        bail!("the server reports WAL at {lost_from} as removed, but slot \"{slot}\" still holds WAL from {restart}; refusing to guess where to resume");
    }
    let gap = Gap::new(
        timeline,
        lost_from,
        resume,
        "the server removed WAL before walsafe streamed it (replication slot invalidated, dropped, or max_slot_wal_keep_size exceeded)",
    );
    let (s, g) = (spool.clone(), gap.clone());
    tokio::task::spawn_blocking(move || s.record_gap(&g))
        .await?
        .with_context(|| format!("cannot record a gap in {}", cfg.spool.dir.display()))?;
    if let Err(e) = repo.record_gap(&gap).await {
        warn!("could not record the gap in the repository: {e}");
    }
    crate::metrics::set_gaps(crate::spool::gaps::load(&cfg.spool.dir).len());
    error!(
        %timeline, from = %lost_from, to = %resume, bytes = gap.len(),
        "GAP: WAL from {lost_from} to {resume} is lost and will never be in the repository; a restore cannot pass it: take a new base backup now (acknowledge by deleting {}/{})",
        cfg.spool.dir.display(), crate::spool::gaps::GAPS_FILE
    );
    for t in timeline.0 + 1..=info.timeline.0 {
        receiver.fetch_history(&mut conn, TimelineId(t)).await?;
    }
    Ok((info.timeline.max(timeline), resume))
}

/// Sleeps `backoff` (then doubles it), returning true if cancelled meanwhile.
async fn sleep_or_cancel(cancel: &CancellationToken, backoff: &mut Duration) -> bool {
    let d = *backoff;
    *backoff = (*backoff * 2).min(RECONNECT_MAX);
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = cancel.cancelled() => true,
    }
}

/// Connects, retrying while the error is retryable; `None` if shutdown came first.
async fn connect_until_ready(
    cfg: &Config,
    cancel: &CancellationToken,
) -> anyhow::Result<Option<(ReplicationConnection, ServerInfo)>> {
    let mut backoff = RECONNECT_MIN;
    let give_up = tokio::time::Instant::now() + cfg.postgres.connect_timeout;
    loop {
        match connect(cfg).await {
            Ok(r) => return Ok(Some(r)),
            Err(e) if is_retryable(&e) && tokio::time::Instant::now() + backoff < give_up => {
                warn!("cannot connect yet: {}", crate::report::error_line(&e));
                if sleep_or_cancel(cancel, &mut backoff).await {
                    return Ok(None);
                }
            }
            Err(e) if !is_retryable(&e) => return Err(e),
            Err(e) => {
                return Err(e.context(format!(
                    "could not connect to PostgreSQL within {:?} ([postgres] connect_timeout)",
                    cfg.postgres.connect_timeout
                )))
            }
        }
    }
}

/// Where the slot holds WAL from, as far as start-up can tell.
enum SlotStart {
    /// The slot's restart position (segment start) with its timeline;
    /// `None` when it reserves no WAL.
    Known(Option<(TimelineId, Lsn)>),
    /// The slot exists but its position cannot be read (PostgreSQL 13 or
    /// 14 without an SQL connection); why, for the error if it is needed.
    Unknown(anyhow::Error),
}

/// Spool first, then the slot's restart position, then a new slot's.
async fn start_position(
    cfg: &Config,
    conn: &mut ReplicationConnection,
    server: &ServerInfo,
    recovered: &Recovered,
) -> anyhow::Result<(TimelineId, Lsn)> {
    let seg = server.segment_size;
    let slot_start = find_or_create_slot(cfg, conn, server).await?;
    if let Some((t, l)) = recovered.resume {
        if t > server.timeline {
            bail!(
                "the spool {} holds WAL of timeline {t}, but the server is on timeline {}; is [postgres] conninfo pointing at the right server?",
                cfg.spool.dir.display(),
                server.timeline
            );
        }
        return Ok((t, l));
    }
    match slot_start {
        SlotStart::Known(start) => {
            Ok(start.unwrap_or((server.timeline, server.xlogpos.segment_start(seg))))
        }
        // Starting at the server's current position would skip, silently,
        // the WAL the slot holds for us (DESIGN rule 2).
        SlotStart::Unknown(e) => Err(e.context(format!(
            "the spool {} is empty and the position of replication slot \"{}\" is unknown; let walsafe's role connect to a database (pg_hba.conf) so that it can read pg_replication_slots, or drop the slot to start at the server's current position",
            cfg.spool.dir.display(),
            cfg.postgres.slot
        ))),
    }
}

/// Reads the slot (READ_REPLICATION_SLOT; on PostgreSQL 13 and 14, which
/// lack it, `pg_replication_slots` over SQL), creating it when missing.
async fn find_or_create_slot(
    cfg: &Config,
    conn: &mut ReplicationConnection,
    server: &ServerInfo,
) -> anyhow::Result<SlotStart> {
    let slot = &cfg.postgres.slot;
    let seg = server.segment_size;
    let existing = match conn.read_replication_slot(slot).await {
        Ok(found) => Ok(found),
        Err(PgError::Unsupported { .. }) => slot_position_over_sql(cfg, conn, server).await,
        Err(e) => {
            return Err(
                anyhow::Error::new(e).context(format!("cannot read replication slot \"{slot}\""))
            )
        }
    };
    let create_error = match existing {
        Ok(Some(pos)) => {
            return Ok(SlotStart::Known(pos.restart_lsn.map(|l| {
                (
                    pos.restart_tli.unwrap_or(server.timeline),
                    l.segment_start(seg),
                )
            })))
        }
        Ok(None) => None,
        Err(e) => Some(e),
    };
    match conn.create_physical_slot(slot).await {
        Ok(reserved) => {
            info!(%slot, %reserved, "created the replication slot");
            let at = if reserved == Lsn::INVALID {
                server.xlogpos
            } else {
                reserved
            };
            Ok(SlotStart::Known(Some((
                server.timeline,
                at.segment_start(seg),
            ))))
        }
        // Only reached when the slot could not be read over SQL.
        Err(PgError::SlotExists { .. }) if create_error.is_some() => {
            let e = create_error.expect("checked above");
            warn!(
                %slot,
                "cannot read where the replication slot holds WAL from: {}",
                crate::report::error_line(&e)
            );
            Ok(SlotStart::Unknown(e))
        }
        Err(e) => {
            Err(anyhow::Error::new(e).context(format!("cannot create replication slot \"{slot}\"")))
        }
    }
}

/// READ_REPLICATION_SLOT's answer for servers without the command: the
/// slot's `restart_lsn` from `pg_replication_slots`, and its timeline from
/// the server's history (what PostgreSQL 15 computes itself). `Err` when no
/// SQL connection is possible (e.g. pg_hba.conf admits the role for
/// replication only).
async fn slot_position_over_sql(
    cfg: &Config,
    conn: &mut ReplicationConnection,
    server: &ServerInfo,
) -> anyhow::Result<Option<SlotPosition>> {
    let slot = &cfg.postgres.slot;
    let sql = crate::pg::sql::connect_sql(&cfg.postgres.conninfo, &cfg.postgres.application_name)
        .await
        .with_context(|| {
            format!(
                "PostgreSQL {} has no READ_REPLICATION_SLOT, and an SQL connection to read slot \"{slot}\" from pg_replication_slots failed",
                server.version_num / 10000
            )
        })?;
    let Some(state) = crate::pg::sql::slot_state(&sql, slot).await? else {
        return Ok(None);
    };
    let restart_tli = match state.restart_lsn {
        Some(l) if server.timeline.0 > 1 => {
            let (_, history) = conn.timeline_history(server.timeline).await?;
            Some(timeline_of_point(
                &String::from_utf8_lossy(&history),
                l,
                server.timeline,
            ))
        }
        Some(_) => Some(server.timeline),
        None => None,
    };
    Ok(Some(SlotPosition {
        restart_lsn: state.restart_lsn,
        restart_tli,
    }))
}

/// SIGTERM/SIGINT: orderly shutdown. SIGHUP: reopen the log file.
fn spawn_signal_handler(cancel: CancellationToken, log_file: Option<ReopenableFile>) {
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) else {
            return;
        };
        loop {
            tokio::select! {
                _ = term.recv() => { info!("SIGTERM: shutting down"); break; }
                _ = int.recv() => { info!("SIGINT: shutting down"); break; }
                _ = hup.recv() => match &log_file {
                    Some(f) => match f.reopen() {
                        Ok(()) => info!("SIGHUP: log file reopened"),
                        Err(e) => warn!("SIGHUP: cannot reopen the log file: {e}"),
                    },
                    None => info!("SIGHUP: logging to stderr, nothing to reopen"),
                },
            }
        }
        cancel.cancel();
    });
}
