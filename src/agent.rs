//! agent: `walsafe run`, the long-running service.
//!
//! Start-up order matters for safety:
//!
//! 1. open the repository (and key) — a bad URL or key fails before
//!    anything is streamed;
//! 2. connect, `IDENTIFY_SYSTEM`, learn the segment size and version
//!    ([`crate::upstream`] owns the session: connect, identify, slot,
//!    start position);
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

use anyhow::{bail, Context};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::gap::Gap;
use crate::logging::ReopenableFile;
use crate::pg::{ClusterIdentity, Lsn, Server, TimelineId};
use crate::positions::{Archive, Positions};
use crate::receive::{Receiver, StreamEnd};
use crate::repository::{ObjectName, Repository, RepositoryError};
use crate::spool::retention::{Release, Retention};
use crate::spool::{Publisher, Recovered, Spool, WriterHandle};
use crate::upload::Uploader;
use crate::upstream::{self, Continue, Session, Upstream};

/// The spool and its uploaders (one per repository), running.
struct Pipeline {
    spool: Arc<Spool>,
    recovered: Recovered,
    /// The highest of the repositories' `archived`: WAL stored in at least
    /// one of them (and kept in the spool until every one has it), which
    /// ack mode `remote` may report as flushed.
    archived: watch::Receiver<Lsn>,
    /// The spool's news, for the writer thread once streaming starts.
    publisher: Option<Publisher>,
    upload_cancel: CancellationToken,
    upload_tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Opens the spool and starts shipping what it holds to every repository,
/// each with its own uploader: one repository down never holds up another,
/// its backlog waits in the spool ([`Retention`] keeps a file until every
/// repository has it).
async fn start_pipeline(
    cfg: &Config,
    repos: &[Arc<Repository>],
    positions: &Positions,
    identity: ClusterIdentity,
) -> anyhow::Result<Pipeline> {
    let segment_size = identity.segment_size;
    let dir = cfg.spool.dir.clone();
    let fsync = cfg.fsync;
    let (spool, recovered) =
        tokio::task::spawn_blocking(move || Spool::open(&dir, segment_size, fsync))
            .await?
            .with_context(|| format!("cannot open the spool {}", cfg.spool.dir.display()))?;
    let spool = Arc::new(spool.with_limits(cfg.spool.limits));
    let (publisher, feeds) = crate::spool::feeds(recovered.durable(segment_size), repos.len());
    positions.follow_durable(feeds[0].durable.clone());
    let retention = Arc::new(Retention::new(spool.clone(), repos.len()));
    let upload_cancel = CancellationToken::new();
    let mut archived = Vec::new();
    let mut upload_tasks = Vec::new();
    for (i, (repo, feed)) in repos.iter().zip(feeds).enumerate() {
        let progress = positions.add_archive(&cfg.repositories[i].name);
        let (uploader, a) = Uploader::new(
            repo.clone(),
            identity,
            spool.clone(),
            Release::new(retention.clone(), i),
            progress.clone(),
            &recovered,
            &cfg.archive,
        );
        archived.push(a);
        let (repo, cancel, stall_alarm) =
            (repo.clone(), upload_cancel.clone(), cfg.archive.stall_alarm);
        upload_tasks.push(tokio::spawn(async move {
            if pin(&repo, identity, &progress, stall_alarm, &cancel).await {
                uploader.run(feed, cancel).await;
            }
        }));
    }
    Ok(Pipeline {
        spool,
        recovered,
        archived: highest(archived),
        publisher: Some(publisher),
        upload_cancel,
        upload_tasks,
    })
}

/// Pins `repo` to the cluster before anything is shipped to it, waiting
/// as long as it takes: a repository that does not answer (or, until the
/// operator fixes it, one that refuses this cluster) keeps its WAL in the
/// spool, and holds up nothing else. False when cancelled first.
async fn pin(
    repo: &Repository,
    identity: ClusterIdentity,
    progress: &Archive,
    stall_alarm: std::time::Duration,
    cancel: &CancellationToken,
) -> bool {
    let mut backoff =
        crate::retry::Backoff::new(crate::upload::CHUNK_RETRY_MIN, crate::upload::REQUEUE_DELAY);
    let since = std::time::Instant::now();
    let mut told = false;
    loop {
        progress.upload_heartbeat();
        progress.set_upload_stalled(told && since.elapsed() >= stall_alarm);
        match repo.pin(&identity).await {
            Ok(_) => {
                if told {
                    info!(
                        "repository {:?} answers: shipping the WAL waiting for it",
                        progress.name()
                    );
                }
                progress.set_upload_stalled(false);
                return true;
            }
            Err(e) if !told => {
                told = true;
                match e {
                    RepositoryError::Store(_) => warn!(
                        "repository {:?} cannot be reached ({e}); its WAL waits in the spool and is shipped when it answers",
                        progress.name()
                    ),
                    _ => error!(
                        "repository {:?} cannot take this cluster's WAL: {e}; its WAL waits in the spool (which fills, then holds PostgreSQL back) until this is fixed",
                        progress.name()
                    ),
                }
            }
            Err(e) => tracing::debug!("repository {:?}: {e}", progress.name()),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay()) => {}
            _ = cancel.cancelled() => return false,
        }
    }
}

/// A watch of the highest of `each` (itself when there is one); it ends
/// when one of them does (its uploader stopped).
fn highest(mut each: Vec<watch::Receiver<Lsn>>) -> watch::Receiver<Lsn> {
    if each.len() == 1 {
        return each.pop().expect("one");
    }
    let current = |each: &[watch::Receiver<Lsn>]| {
        each.iter()
            .map(|r| *r.borrow())
            .max()
            .unwrap_or(Lsn::INVALID)
    };
    let (tx, rx) = watch::channel(current(&each));
    tokio::spawn(async move {
        loop {
            let changed = {
                let waits = each.iter_mut().map(|r| Box::pin(r.changed()));
                futures::future::select_all(waits).await.0
            };
            if changed.is_err() {
                return;
            }
            let now = current(&each);
            tx.send_if_modified(|a| std::mem::replace(a, now) != now);
        }
    });
    rx
}

/// `walsafe run`. `log_file` is reopened on SIGHUP.
pub async fn run(cfg: Config, log_file: Option<ReopenableFile>) -> anyhow::Result<()> {
    if let Some(listen) = cfg.metrics.listen {
        let names: Vec<String> = cfg.repositories.iter().map(|r| r.name.clone()).collect();
        crate::metrics::install(listen, &names)?;
    }
    let repos = cfg
        .repositories
        .iter()
        .map(|rc| {
            Repository::open(rc)
                .map(Arc::new)
                .with_context(|| format!("cannot open the repository {}", rc.url))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let repo = repos[0].clone();
    let cancel = CancellationToken::new();
    let positions = Positions::default();
    for r in &repos {
        positions.set_encrypting_key(r.name(), r.key_id());
    }
    let key_files = repos
        .iter()
        .zip(&cfg.repositories)
        .filter_map(|(r, rc)| Some((r.clone(), rc.key_file.clone()?)))
        .collect();
    spawn_signal_handler(cancel.clone(), log_file, key_files, positions.clone());
    if let Some(previous) = crate::state::read(&cfg.spool.dir) {
        positions.seed_last_archived_ms(previous.last_archived_ms);
    }
    let refresher =
        crate::service::spawn_monitor(positions.clone(), cfg.spool.dir.clone(), cancel.clone());
    spawn_repository_watch(
        repo.clone(),
        cfg.spool.dir.clone(),
        positions.clone(),
        cancel.clone(),
    );

    // A pinned repository tells the segment size: ship what the spool holds
    // right away, even while PostgreSQL is unreachable (after a disaster, the
    // spool may hold the last second of WAL that exists anywhere).
    let mut pipeline = match repo.descriptor().await? {
        Some(d) => Some(start_pipeline(&cfg, &repos, &positions, d.identity()).await?),
        None => None,
    };

    let result = stream_until_stopped(&cfg, &repos, &positions, &mut pipeline, &cancel).await;
    if let Err(e) = &result {
        error!("{}", crate::report::error_line(e));
    }
    cancel.cancel();
    if let Some(p) = pipeline {
        p.upload_cancel.cancel();
        for t in p.upload_tasks {
            let _ = t.await;
        }
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
    repos: &[Arc<Repository>],
    positions: &Positions,
    pipeline: &mut Option<Pipeline>,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    let upstream = Upstream::new(cfg);
    // A pinned repository (the pipeline already runs): the server is known
    // and the spool is being shipped; wait for it as long as it takes.
    let pinned = pipeline.is_some();
    let Some(mut session) = upstream.connect_until_ready(cancel, pinned).await? else {
        return Ok(());
    };
    let server = session.server;
    let identity = server.identity;
    info!(
        system_identifier = identity.system_identifier,
        timeline = %server.timeline,
        segment_size = identity.segment_size,
        version = identity.pg_version_num,
        "connected"
    );
    let repo = &repos[0];
    repo.pin(&identity).await?;
    // The others are pinned now when they answer (a stranger's repository
    // is a configuration error, refused before streaming); one that does
    // not answer is pinned, and reported, by its pipeline once it does
    // (see `pin`).
    for (r, rc) in repos.iter().zip(&cfg.repositories).skip(1) {
        match r.pin(&identity).await {
            Ok(_) | Err(RepositoryError::Store(_)) => {}
            Err(e) => {
                return Err(e).with_context(|| format!("repository {:?}", rc.name));
            }
        }
    }
    if pipeline.is_none() {
        *pipeline = Some(start_pipeline(cfg, repos, positions, identity).await?);
    }
    let p = pipeline.as_mut().expect("started above");
    let (timeline, start) = session.start_position(&p.recovered).await?;
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
        forked: None,
    };
    // Histories of every timeline up to the current one (recovery probes
    // them in order, and stops at the first one missing). A server made by
    // pg_basebackup has only its own: those the spool or the repository
    // already hold are not asked for.
    for t in (2..=timeline.0).map(TimelineId) {
        if p.recovered.histories.contains(&t)
            || repo
                .get_raw(&ObjectName::History(t))
                .await
                .is_ok_and(|h| h.is_some())
        {
            continue;
        }
        if let Err(e) = receiver.fetch_history(&mut session.conn, t).await {
            warn!(
                "could not fetch the history file of timeline {t}, and the repository does not hold it: a restore with recovery_target_timeline = 'latest' stops looking for newer timelines there; copy {} from a server's pg_wal into the repository with walsafe wal-push: {}",
                crate::pg::walfile::history_file_name(t),
                crate::report::error_line(&e)
            );
        }
    }

    let mut session = Some(session);
    let mut backoff = upstream::reconnect_backoff();
    // Where streaming was last refused for lost WAL and the slot repaired.
    let mut retried_at: Option<(TimelineId, Lsn)> = None;
    let (mut tli, mut from) = (timeline, start);
    let outcome: anyhow::Result<()> = loop {
        let mut s = match session.take() {
            Some(s) => s,
            None => match reconnect(&upstream, &server).await {
                Ok(s) => {
                    info!(timeline = %s.server.timeline, target = s.conn.target(), "reconnected");
                    backoff.reset();
                    s
                }
                Err(e) if upstream::is_retryable(&e) => {
                    positions.receive_heartbeat();
                    warn!("cannot reconnect yet: {}", crate::report::error_line(&e));
                    if upstream::sleep_or_cancel(cancel, backoff.next_delay()).await {
                        break Ok(());
                    }
                    continue;
                }
                Err(e) => break Err(e),
            },
        };
        // A failover: the server may be a new primary whose timeline forked
        // off ours before what we hold, or a standby behind us (rule 8).
        let followed = match s.follow(tli, from).await {
            Ok(Continue::Here) => Ok(()),
            Ok(Continue::Forked { fork, next }) => {
                let server_timeline = s.server.timeline;
                receiver
                    .leave_timeline(&mut s.conn, fork, next, server_timeline)
                    .await
                    .map(|(t, l)| (tli, from) = (t, l))
            }
            Err(e) => Err(e),
        };
        match followed {
            Ok(()) => {}
            Err(e) if upstream::is_retryable(&e) => {
                positions.receive_heartbeat();
                warn!("{}", crate::report::error_line(&e));
                s.conn.close().await;
                if upstream::sleep_or_cancel(cancel, backoff.next_delay()).await {
                    break Ok(());
                }
                continue;
            }
            Err(e) => break Err(e),
        }
        match receiver.stream(s.conn, tli, from).await {
            Ok(StreamEnd::Cancelled) => break Ok(()),
            Ok(StreamEnd::ServerStopped) => {
                warn!("the server ended streaming (shutting down?); reconnecting");
            }
            Err(e) if upstream::is_retryable(&e) => warn!(
                "replication interrupted: {}; reconnecting",
                crate::report::error_line(&e)
            ),
            Err(e) if upstream::wal_lost(&e) => {
                // First repair the slot and try the same position again: an
                // invalidated slot does not mean the WAL is gone
                // (wal_keep_size, another slot, a slot invalidated for being
                // idle). Only a second refusal at the same point is a gap.
                let second = retried_at == Some(receiver.resume);
                if second {
                    error!("{}", crate::report::error_line(&e));
                } else {
                    warn!(
                        "{}; repairing the slot and trying {} again before recording anything as lost",
                        crate::report::error_line(&e),
                        receiver.resume.1
                    );
                }
                let repaired = async {
                    let mut s = reconnect(&upstream, &server).await?;
                    let at = if second {
                        skip_lost_wal(cfg, repos, &spool, &receiver, &mut s).await?
                    } else {
                        s.recreate_slot(receiver.resume.1).await?;
                        receiver.resume
                    };
                    anyhow::Ok((s, at))
                }
                .await;
                retried_at = (!second).then_some(receiver.resume);
                match repaired {
                    Ok((s, (t, l))) => {
                        session = Some(s);
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
        if upstream::sleep_or_cancel(cancel, backoff.next_delay()).await {
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

/// Connects again, refusing another cluster, and makes sure the slot
/// exists there: after a failover the new primary may never have had it.
async fn reconnect<'a>(upstream: &Upstream<'a>, server: &Server) -> anyhow::Result<Session<'a>> {
    let mut s = upstream.reconnect(server).await?;
    s.ensure_slot().await?;
    Ok(s)
}

/// WAL from the end of what we received is gone from the server (rule 2):
/// close the spool segment, repair the slot, record the lost range as a
/// gap (spool, repository, metric, error log) and return where streaming
/// resumes: the start of the oldest segment the server still has for our
/// slot.
async fn skip_lost_wal(
    cfg: &Config,
    repos: &[Arc<Repository>],
    spool: &Arc<Spool>,
    receiver: &Receiver<'_>,
    session: &mut Session<'_>,
) -> anyhow::Result<(TimelineId, Lsn)> {
    // What is lost starts where the spool's WAL ends, not where streaming
    // was to resume: after a restart that is the start of the segment the
    // spool was filling, whose durable part is safe (and shipped).
    let (timeline, lost_from) = receiver.held();
    receiver.close_segment_for_gap(timeline).await?;
    let restart = session.recreate_slot(lost_from).await?;
    let seg = session.server.identity.segment_size;
    // Record only what is really gone: the server may still hold WAL older
    // than the slot's new reservation (wal_keep_size, other slots).
    let oldest = session.oldest_wal(timeline).await;
    let resume = match oldest {
        Some(o) if o > lost_from && o < restart => o,
        _ => restart,
    }
    .segment_start(seg);
    if resume <= lost_from {
        bail!(
            "the server reports WAL at {lost_from} as removed, but slot \"{}\" still holds WAL from {restart}; refusing to guess where to resume",
            cfg.postgres.slot
        );
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
    for (repo, rc) in repos.iter().zip(&cfg.repositories) {
        if let Err(e) = repo.record_gap(&gap).await {
            warn!("could not record the gap in repository {:?}: {e}", rc.name);
        }
    }
    crate::metrics::set_gaps(crate::spool::gaps::load(&cfg.spool.dir).len());
    error!(
        %timeline, from = %lost_from, to = %resume, bytes = gap.len(),
        "GAP: WAL from {lost_from} to {resume} is lost and will never be in the repository; a restore cannot pass it: take a new base backup now (acknowledge by deleting {}/{})",
        cfg.spool.dir.display(), crate::spool::gaps::GAPS_FILE
    );
    let now = session.server.timeline;
    for t in timeline.0 + 1..=now.0 {
        receiver
            .fetch_history(&mut session.conn, TimelineId(t))
            .await?;
    }
    Ok((now.max(timeline), resume))
}

/// How often the agent looks at the spool for a note that the
/// repository's backups or drills changed (a local read, no request).
const WATCH_POLL: std::time::Duration = std::time::Duration::from_secs(5);
/// How often it lists them anyway while WAL is archived: records written
/// from another host (a drill run elsewhere) leave no note here.
const WATCH_FALLBACK: std::time::Duration = std::time::Duration::from_secs(3600);

/// Keeps the gauges that describe the repository's backups and drills
/// (`walsafe_last_backup_timestamp_seconds`, `walsafe_last_drill_*`) up
/// to date: looked up at start, whenever `walsafe backup`, `drill` or
/// `retain` notes a change in the spool, and every [`WATCH_FALLBACK`] in
/// which WAL was archived (an idle cluster costs no request), until
/// cancelled.
fn spawn_repository_watch(
    repo: Arc<Repository>,
    spool_dir: std::path::PathBuf,
    positions: Positions,
    cancel: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        crate::metrics::set_last_backup(0.0);
        loop {
            let seen = crate::state::repository_changed_mark(&spool_dir);
            let archived = positions.archived();
            crate::backup::refresh_metric(&repo).await;
            crate::drill::refresh_metrics(&repo).await;
            let since = std::time::Instant::now();
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(WATCH_POLL) => {}
                    _ = cancel.cancelled() => return,
                }
                if (since.elapsed() >= WATCH_FALLBACK && positions.archived() != archived)
                    || crate::state::repository_changed_mark(&spool_dir) != seen
                {
                    break;
                }
            }
        }
    })
}

/// Reads each repository's key file again; one that cannot be read keeps
/// the keys it had.
fn reload_keys(key_files: &[(Arc<Repository>, std::path::PathBuf)], positions: &Positions) {
    for (repo, path) in key_files {
        match crate::repository::key::load_key_ring(path) {
            Ok(ring) => {
                let (current, all) = (ring.current().key_id_hex(), ring.ids_hex().join(", "));
                repo.set_ring(ring);
                positions.set_encrypting_key(repo.name(), Some(current.clone()));
                info!(
                    "SIGHUP: repository {:?}: key file {} read again; new objects are encrypted with key id {current} (keys held: {all})",
                    repo.name(),
                    path.display()
                );
            }
            Err(e) => warn!(
                "SIGHUP: repository {:?}: cannot read the key file again ({e}); keeping the keys it had",
                repo.name()
            ),
        }
    }
}

/// SIGTERM/SIGINT: orderly shutdown. SIGHUP: reopen the log file, and
/// read every repository's key file again (a key rotated in: new objects
/// are encrypted with the ring's first key from then on).
fn spawn_signal_handler(
    cancel: CancellationToken,
    log_file: Option<ReopenableFile>,
    key_files: Vec<(Arc<Repository>, std::path::PathBuf)>,
    positions: Positions,
) {
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
                _ = hup.recv() => {
                    match &log_file {
                        Some(f) => match f.reopen() {
                            Ok(()) => info!("SIGHUP: log file reopened"),
                            Err(e) => warn!("SIGHUP: cannot reopen the log file: {e}"),
                        },
                        None => info!("SIGHUP: logging to stderr, nothing to reopen"),
                    }
                    reload_keys(&key_files, &positions);
                }
            }
        }
        cancel.cancel();
    });
}
