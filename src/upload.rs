//! upload: durable WAL from the spool to the repository, continuously.
//!
//! The uploader never touches WAL that is not fsynced: it learns what is
//! durable only from the spool's [`Feed`] (the [`Durable`] watch and the
//! [`SpoolEvent`] queue, published after each fsync batch), and reads the
//! bytes back from the spool files. It never removes a spool file: it
//! reports each stored file to [`Retention`], which decides.
//!
//! What it ships:
//!
//! * **complete segments**, one object each (`wal/<name>`), up to
//!   `upload_concurrency` at a time. A segment file leaves the spool only
//!   after its object is stored (or found already stored with the same
//!   content), when [`Retention`] says so; then the segment's chunk objects
//!   are deleted.
//! * **chunks** of the segment still filling: every `partial_interval`, the
//!   bytes fsynced since the last chunk (`chunks/<name>/<start>-<end>`), one
//!   chunk upload at a time so that a segment's chunks are contiguous from
//!   offset 0. After a restart the first chunk starts again at offset 0;
//!   overlapping chunks hold identical bytes and `wal-fetch` checks that.
//!   With ack mode `remote` a synchronous commit waits for its WAL to be
//!   stored, so chunks do not wait for the tick: newly durable bytes are
//!   shipped as soon as no chunk of the segment is in flight, and what
//!   becomes durable while one is in flight goes in the next, in one
//!   piece (group commit: a commit waits about one storage round trip,
//!   and a burst of commits costs one chunk per round trip, not one per
//!   commit). With ack `local` nothing waits for the store and the tick
//!   keeps chunks few and larger.
//! * **closed partial segments** (the last segment of a timeline that
//!   ended), as `wal/<name>.partial`, PostgreSQL's own convention.
//! * **timeline history files**, as `wal/<TLI>.history`.
//!
//! A failed upload is retried by the store (capped exponential backoff
//! with jitter), then re-queued here after [`REQUEUE_DELAY`]; it is never
//! dropped. An object that exists with *different* content is a conflict
//! (rule 3 of README's Guarantees): the local copy is kept, the error is logged and
//! counted, and the segment is not retried until restart.
//!
//! `archived` is the end of contiguously stored WAL: the start of the
//! oldest segment not yet stored, or the end of the chunks stored for the
//! filling segment, or the flushed end when nothing is pending.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::ArchiveConfig;
use crate::metrics::Kind;
use crate::pg::page::PageValidator;
use crate::pg::ClusterIdentity;
use crate::pg::{Lsn, SegmentName, TimelineId};
use crate::positions::{now_ms, Archive};
use crate::repository::envelope::{Frame, BLOCK_LEN};
use crate::repository::{ObjectName, PutOutcome, Repository, RepositoryError, SegmentFile};
use crate::retry::Backoff;
use crate::spool::retention::{Release, SpoolFile};
use crate::spool::{Durable, Feed, Recovered, Spool, SpoolEvent};

/// Wait before re-queueing an upload whose retries were exhausted.
pub const REQUEUE_DELAY: Duration = Duration::from_secs(5);
/// Resolution of the lag-in-seconds samples.
const LAG_SAMPLE_MS: u64 = 100;
/// At most this many lag samples are kept: during a long outage older ones
/// are thinned (every other one dropped), so memory stays bounded whatever
/// the outage's length, and the oldest sample, which sets the lag, stays.
const LAG_SAMPLES_MAX: usize = 4096;
/// A `file://` staging file this old is what a crash left, not a write in
/// progress.
const STALE_STAGING_AGE: Duration = Duration::from_secs(600);
/// Segments remembered as stored whole, to spot late chunks.
const WHOLE_REMEMBERED: usize = 64;
/// First wait after a failed chunk upload (the store already retried).
pub const CHUNK_RETRY_MIN: Duration = Duration::from_millis(500);
/// A chunk at least this long keeps its zstd frame for its segment's
/// object (compressed once); shorter ones compress poorly alone, so their
/// bytes are compressed again with the segment, in 1 MiB blocks.
const MIN_KEPT_FRAME: u64 = 64 << 10;
/// Plaintext bytes compressed ahead ([`Job::Frames`]) in this process,
/// for tests to see that it happens (its output is the same bytes either
/// way: zstd is deterministic).
pub(crate) static COMPRESSED_AHEAD: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(0);
/// After a tick held a chunk back, how often the uploader looks whether
/// the segment still grows (see [`Uploader::maybe_chunk`]).
const RECHECK_EVERY: Duration = Duration::from_millis(25);
/// How long shutdown waits for in-flight uploads.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// What a finished upload hands back: its outcome and, for a chunk, the
/// zstd frames its segment's object reuses.
type Stored = (PutOutcome, Vec<Frame>);

/// One upload. The order of the variants is the order jobs start in:
/// history files first (a timeline's WAL waits for its history, see
/// [`Uploader::waits_for_history`]), then segments oldest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Job {
    History(TimelineId),
    Segment(SegmentName),
    ClosedPartial(SegmentName),
    Chunk {
        seg: SegmentName,
        start: u64,
        end: u64,
    },
    /// Not an upload: compresses `[start, end)` of the filling segment
    /// into zstd frames ahead of its chunks and its object (see
    /// [`Uploader::maybe_frames`]). Never in [`Uploader::jobs`].
    Frames {
        seg: SegmentName,
        start: u64,
        end: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Queued,
    InFlight,
    Waiting,
    Conflict,
}

/// The segment still filling.
#[derive(Debug, Clone, Copy)]
struct Filling {
    seg: SegmentName,
    /// Offset up to which the spool is fsynced.
    flushed: u64,
    chunk_in_flight: bool,
    /// A [`Job::Frames`] of this segment is running: a chunk waits for it
    /// (`chunk_wanted`), so that frames are made once and in order.
    frames_in_flight: bool,
    chunk_wanted: bool,
    /// `flushed` at the previous chunk tick, and when that was (fill rate).
    at_last_tick: u64,
    last_tick: Instant,
}

/// The uploader task's state.
pub struct Uploader {
    repo: Arc<Repository>,
    /// The cluster the repository is pinned to: every spooled file is
    /// checked against it before it is shipped (rule 5).
    identity: ClusterIdentity,
    /// Segments found not to be this cluster's WAL: never shipped.
    refused: BTreeSet<SegmentName>,
    spool: Arc<Spool>,
    /// Where this repository reports what it stored.
    release: Release,
    /// This repository's progress, for metrics, status and alarms.
    progress: Archive,
    segment_size: u64,
    interval: Duration,
    /// Ack mode `remote`: chunks go out as soon as WAL is durable (see
    /// [`Uploader::chunk_now`]), not on the tick.
    eager: bool,
    concurrency: usize,
    jobs: BTreeMap<Job, State>,
    filling: Option<Filling>,
    /// Per segment not yet stored whole: the offset up to which its chunks are stored.
    chunked: BTreeMap<SegmentName, u64>,
    /// Segments recently stored whole (their late chunks are orphans).
    whole: BTreeSet<SegmentName>,
    /// Per segment not yet stored whole: zstd frames of its bytes (made by
    /// its chunks, or ahead), which its later chunks and its object reuse.
    /// At most a quarter of a segment per segment and half a segment in
    /// all (compressed bytes), dropped when its upload fails.
    frames: BTreeMap<SegmentName, Vec<Frame>>,
    /// The newest segment closed by the writer (end of a timeline, or before
    /// a gap): a durable position inside it or before it is old news.
    last_closed: Option<SegmentName>,
    /// The newest segment the spool said is complete: a durable position
    /// inside it, read after that, is old news (it must not make the
    /// segment the filling one again).
    last_completed: Option<SegmentName>,
    /// Every closed partial known to this run (recovered or closed since):
    /// while a timeline's history is not stored, the closed end of the
    /// timeline before it does not count as archived.
    closed: BTreeSet<SegmentName>,
    /// The spool's durable end, and its timeline: a new timeline starts
    /// again at its first segment's start, which may lie before the old
    /// timeline's end (always after a failover that forked off earlier).
    flushed: Lsn,
    flushed_timeline: TimelineId,
    /// (flushed position, unix ms when it became durable), oldest first.
    durable_times: VecDeque<(Lsn, u64)>,
    archived_tx: watch::Sender<Lsn>,
    last_chunk: Instant,
    /// A tick held a chunk back (the segment was filling fast): look again
    /// at this instant, and ship it if nothing became durable meanwhile,
    /// so that when a load stops its last WAL does not wait a whole tick.
    recheck: Option<(tokio::time::Instant, u64)>,
    /// After a failed chunk upload: no new chunk before this instant.
    chunk_not_before: Instant,
    /// Delays after chunk failures ([`CHUNK_RETRY_MIN`] doubling up to [`REQUEUE_DELAY`], jittered).
    chunk_backoff: Backoff,
    /// Uploads failed since the last success.
    failures: u32,
    /// When an upload last succeeded, or there was nothing to upload.
    last_progress: Instant,
    /// No progress for this long, while WAL waits, is an error (once).
    stall_alarm: Duration,
    /// The stall was reported and not yet resolved.
    stalled: bool,
}

impl Uploader {
    /// Prepares the uploader with what the spool recovered at start-up.
    /// The newest `.partial` is where streaming resumes: it is not closed,
    /// but its durable part (as the spool recorded it) is shipped as a
    /// chunk right away, before any server is reachable.
    pub fn new(
        repo: Arc<Repository>,
        identity: ClusterIdentity,
        spool: Arc<Spool>,
        release: Release,
        progress: Archive,
        recovered: &Recovered,
        archive: &ArchiveConfig,
    ) -> (Self, watch::Receiver<Lsn>) {
        let segment_size = spool.segment_size();
        let mut jobs = BTreeMap::new();
        for s in &recovered.complete {
            jobs.insert(Job::Segment(*s), State::Queued);
        }
        let reopened = recovered
            .resume
            .map(|(t, l)| SegmentName::containing(t, l, segment_size));
        let mut closed = BTreeSet::new();
        for p in &recovered.partials {
            if Some(*p) != reopened {
                closed.insert(*p);
                jobs.insert(Job::ClosedPartial(*p), State::Queued);
            }
        }
        for t in &recovered.histories {
            jobs.insert(Job::History(*t), State::Queued);
        }
        let resume = recovered.resume.map_or(Lsn::INVALID, |(_, l)| l);
        let Durable {
            timeline: flushed_timeline,
            flushed,
        } = recovered.durable(segment_size);
        let mut filling = None;
        if let Some(seg) = reopened {
            let off = flushed.bytes_after(seg.start_lsn(segment_size));
            if off > 0 && off < segment_size {
                filling = Some(Filling {
                    seg,
                    flushed: off,
                    chunk_in_flight: false,
                    frames_in_flight: false,
                    chunk_wanted: false,
                    at_last_tick: off,
                    last_tick: Instant::now(),
                });
            }
        }
        let (archived_tx, archived_rx) = watch::channel(resume);
        let u = Uploader {
            repo,
            identity,
            refused: BTreeSet::new(),
            spool,
            release,
            progress,
            segment_size,
            interval: archive.partial_interval,
            eager: archive.ack == crate::config::AckMode::Remote,
            concurrency: archive.upload_concurrency,
            jobs,
            filling,
            chunked: BTreeMap::new(),
            frames: BTreeMap::new(),
            last_closed: None,
            last_completed: None,
            whole: BTreeSet::new(),
            closed,
            flushed,
            flushed_timeline,
            durable_times: VecDeque::new(),
            archived_tx,
            last_chunk: Instant::now(),
            recheck: None,
            chunk_not_before: Instant::now(),
            chunk_backoff: Backoff::new(CHUNK_RETRY_MIN, REQUEUE_DELAY),
            failures: 0,
            last_progress: Instant::now(),
            stall_alarm: archive.stall_alarm,
            stalled: false,
        };
        (u, archived_rx)
    }

    /// Runs until `cancel` fires and in-flight uploads have finished (or
    /// [`SHUTDOWN_GRACE`] passed); whatever is not stored stays in the spool
    /// for the next start.
    pub async fn run(mut self, feed: Feed, cancel: CancellationToken) {
        let Feed {
            mut durable,
            mut events,
        } = feed;
        let mut writer_alive = true;
        let mut tasks: JoinSet<(Job, Result<Stored, anyhow::Error>)> = JoinSet::new();
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut retry_tick = tokio::time::interval(REQUEUE_DELAY);
        self.spawn_cleanup();
        loop {
            if self.eager {
                self.chunk_now();
            }
            self.start_jobs(&mut tasks);
            self.maybe_frames(&mut tasks);
            self.publish();
            self.watch_progress();
            self.progress.upload_heartbeat();
            tokio::select! {
                _ = cancel.cancelled() => break,
                ev = events.recv() => match ev {
                    Some(ev) => self.on_event(ev),
                    None => break,
                },
                r = durable.changed(), if writer_alive => {
                    if r.is_err() {
                        writer_alive = false;
                        continue;
                    }
                    // Events are queued before the position that covers
                    // them is published: take them first.
                    while let Ok(ev) = events.try_recv() {
                        self.on_event(ev);
                    }
                    let d = *durable.borrow_and_update();
                    self.on_durable(d);
                }
                Some(done) = tasks.join_next(), if !tasks.is_empty() => match done {
                    Ok((job, result)) => self.on_done(job, result),
                    Err(e) => error!("upload task failed: {e}"),
                },
                _ = tick.tick() => self.maybe_chunk(),
                _ = sleep_until_some(self.recheck.map(|(at, _)| at)) => {
                    let (_, flushed) = self.recheck.take().expect("set when this branch runs");
                    match self.filling {
                        Some(f) if f.flushed == flushed => self.chunk_now(),
                        // Still growing: look again, until the next tick.
                        Some(f) if f.last_tick.elapsed() + RECHECK_EVERY < self.interval => {
                            self.recheck = Some((tokio::time::Instant::now() + RECHECK_EVERY, f.flushed));
                        }
                        _ => {}
                    }
                }
                _ = retry_tick.tick() => {
                    for st in self.jobs.values_mut() {
                        if *st == State::Waiting { *st = State::Queued; }
                    }
                }
            }
        }
        // Shutdown: no new uploads; let those in flight finish, bounded.
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        while !tasks.is_empty() {
            match tokio::time::timeout_at(deadline, tasks.join_next()).await {
                Ok(Some(Ok((job, result)))) => self.on_done(job, result),
                Ok(Some(Err(e))) => error!("upload task failed: {e}"),
                Ok(None) => break,
                Err(_) => {
                    warn!(
                        "{} upload(s) still running after {:?}; they resume at next start",
                        tasks.len(),
                        SHUTDOWN_GRACE
                    );
                    tasks.abort_all();
                    break;
                }
            }
        }
        self.publish();
    }

    fn on_event(&mut self, ev: SpoolEvent) {
        match ev {
            SpoolEvent::Completed(s) => {
                self.jobs.entry(Job::Segment(s)).or_insert(State::Queued);
                self.last_completed = self.last_completed.max(Some(s));
                if self.filling.is_some_and(|f| f.seg == s) {
                    self.filling = None;
                }
            }
            SpoolEvent::TimelineEnded { closed, next } => {
                info!(next = %next, closed = ?closed.map(|c| c.file_name(self.segment_size)), "timeline ended");
                if let Some(c) = closed {
                    self.jobs.insert(Job::ClosedPartial(c), State::Queued);
                    self.last_closed = self.last_closed.max(Some(c));
                    self.closed.insert(c);
                    if self.filling.is_some_and(|f| f.seg == c) {
                        self.filling = None;
                    }
                }
            }
            SpoolEvent::History(t) => {
                self.jobs.insert(Job::History(t), State::Queued);
            }
        }
    }

    fn on_durable(&mut self, d: Durable) {
        let Durable { timeline, flushed } = d;
        if timeline > self.flushed_timeline {
            // WAL on a new timeline: positions count from where it began,
            // and what of the old timeline is not stored yet keeps its age
            // (one sample at the new position: the lag errs high).
            self.flushed_timeline = timeline;
            self.flushed = Lsn::INVALID;
            if let Some((_, oldest)) = self.durable_times.front().copied() {
                self.durable_times = VecDeque::from([(flushed, oldest)]);
            }
        }
        if flushed > self.flushed {
            // One sample per 100 ms at most, so that a long outage does not
            // grow this queue per fsync batch. Extending the newest sample
            // keeps its older time: the reported lag errs high by < 100 ms,
            // never low.
            let now = now_ms();
            match self.durable_times.back_mut() {
                Some((lsn, t)) if now.saturating_sub(*t) < LAG_SAMPLE_MS => *lsn = flushed,
                _ => self.durable_times.push_back((flushed, now)),
            }
            if self.durable_times.len() > LAG_SAMPLES_MAX {
                self.durable_times = thin(std::mem::take(&mut self.durable_times));
            }
        }
        self.flushed = self.flushed.max(flushed);
        let off = flushed.segment_offset(self.segment_size);
        if off == 0 {
            return;
        }
        let seg = SegmentName::containing(timeline, flushed, self.segment_size);
        if self.last_closed.is_some_and(|c| seg <= c) {
            return; // closed already: shipped as a .partial
        }
        if self.last_completed.is_some_and(|c| seg <= c) {
            return; // complete already: shipped whole
        }
        match &mut self.filling {
            Some(f) if f.seg == seg => f.flushed = f.flushed.max(off),
            _ => {
                self.filling = Some(Filling {
                    seg,
                    flushed: off,
                    chunk_in_flight: false,
                    frames_in_flight: false,
                    chunk_wanted: false,
                    // A new segment: its growth so far counts from 0.
                    at_last_tick: 0,
                    last_tick: Instant::now(),
                })
            }
        }
    }

    /// Whether anything durable waits to be stored (conflicts and refused
    /// segments aside: they wait for the operator).
    fn has_work(&self) -> bool {
        let filling = self.filling.is_some_and(|f| {
            !self.refused.contains(&f.seg)
                && f.flushed > self.chunked.get(&f.seg).copied().unwrap_or(0)
        });
        filling || self.jobs.values().any(|s| *s != State::Conflict)
    }

    /// Escalates on time without progress, not on a count of attempts: a
    /// store that hangs fails few attempts, slowly, yet nothing is stored.
    fn watch_progress(&mut self) {
        if !self.has_work() {
            self.last_progress = Instant::now();
            return;
        }
        let quiet = self.last_progress.elapsed();
        if !self.stalled && quiet >= self.stall_alarm {
            self.stalled = true;
            self.progress.set_upload_stalled(true);
            error!(
                "no upload has succeeded for {quiet:.0?} to repository {:?} while WAL waits ({} failed attempts, {} segment(s) pending): WAL is accumulating in the spool and that repository is falling behind; check it ({})",
                self.progress.name(),
                self.failures,
                self.progress.pending_segments(),
                self.repo.url()
            );
        }
    }

    /// Starts the next chunk upload if `partial_interval` has passed and
    /// there are new durable bytes in the filling segment, unless:
    ///
    /// * a chunk upload failed recently (capped exponential backoff, so an
    ///   outage is not hammered every interval);
    /// * the segment is filling so fast that it will be complete before
    ///   the next tick: its full upload follows within one interval, and a
    ///   chunk now would only add an object (its bytes are compressed
    ///   ahead, see [`Uploader::maybe_frames`], and reused by the segment).
    ///   Every [`RECHECK_EVERY`] until the next tick, the uploader looks
    ///   again ([`Uploader::recheck`]): once nothing new became durable
    ///   (the load stopped), the chunk ships at once. The RPO stays within
    ///   two intervals.
    fn maybe_chunk(&mut self) {
        let Some(f) = &mut self.filling else { return };
        let now = Instant::now();
        let grown = f.flushed.saturating_sub(f.at_last_tick);
        let since = now.duration_since(f.last_tick).as_secs_f64();
        f.at_last_tick = f.flushed;
        f.last_tick = now;
        if self.last_chunk.elapsed() < self.interval / 2 {
            return;
        }
        let remaining = self.segment_size - f.flushed;
        let rate = grown as f64 / since.max(1e-3);
        if grown > 0 && (remaining as f64) < rate * self.interval.as_secs_f64() {
            self.recheck = Some((tokio::time::Instant::now() + RECHECK_EVERY, f.flushed));
            return;
        }
        self.chunk_now();
    }

    /// Queues a chunk of every durable byte of the filling segment not yet
    /// stored, unless one is in flight (it is followed by the next as soon
    /// as it completes), the segment is refused, or a failed chunk's
    /// backoff has not passed (the tick wakes the loop again). With ack
    /// mode `remote` this runs after every event, with no fill-rate or
    /// half-interval holdback (a commit is waiting for these bytes); with
    /// `local`, from the tick's [`Uploader::maybe_chunk`].
    fn chunk_now(&mut self) {
        let Some(f) = &mut self.filling else { return };
        let stored = self.chunked.get(&f.seg).copied().unwrap_or(0);
        if f.frames_in_flight && f.flushed > stored {
            f.chunk_wanted = true;
            return;
        }
        // One chunk upload at a time in all: a store that hangs would
        // otherwise collect one hanging chunk (and its object in memory)
        // per segment that fills meanwhile.
        let chunk_elsewhere = self
            .jobs
            .keys()
            .any(|j| matches!(j, Job::Chunk { seg, .. } if *seg != f.seg));
        if self.refused.contains(&f.seg)
            || f.chunk_in_flight
            || chunk_elsewhere
            || f.flushed <= stored
            || Instant::now() < self.chunk_not_before
        {
            return;
        }
        let job = Job::Chunk {
            seg: f.seg,
            start: stored,
            end: f.flushed,
        };
        f.chunk_in_flight = true;
        self.last_chunk = Instant::now();
        self.jobs.insert(job, State::Queued);
    }

    fn start_jobs(&mut self, tasks: &mut JoinSet<(Job, Result<Stored, anyhow::Error>)>) {
        let in_flight_bulk = self
            .jobs
            .iter()
            .filter(|(j, s)| **s == State::InFlight && !matches!(j, Job::Chunk { .. }))
            .count();
        let mut budget = self.concurrency.saturating_sub(in_flight_bulk);
        // Chunks carry the RPO: they do not count against the budget.
        let queued: Vec<Job> = self
            .jobs
            .iter()
            .filter(|(_, s)| **s == State::Queued)
            .map(|(j, _)| *j)
            .collect();
        for job in queued {
            if self.waits_for_history(job) {
                continue;
            }
            let is_chunk = matches!(job, Job::Chunk { .. });
            if !is_chunk {
                if budget == 0 {
                    continue;
                }
                budget -= 1;
            }
            self.jobs.insert(job, State::InFlight);
            let repo = self.repo.clone();
            let spool = self.spool.clone();
            let release = self.release.clone();
            let identity = self.identity;
            let frames = match job {
                Job::Segment(s) | Job::ClosedPartial(s) => self
                    .frames
                    .get(&s)
                    .into_iter()
                    .flatten()
                    .filter(|f| f.end - f.start >= MIN_KEPT_FRAME)
                    .cloned()
                    .collect(),
                Job::Chunk { seg, start, end } => self
                    .frames
                    .get(&seg)
                    .into_iter()
                    .flatten()
                    .filter(|f| f.start >= start && f.end <= end)
                    .cloned()
                    .collect(),
                _ => Vec::new(),
            };
            tasks.spawn(async move {
                let r = upload_one(&repo, &spool, &release, identity, job, frames).await;
                (job, r)
            });
        }
    }

    /// Whether `job` is WAL of a timeline whose history file (or an
    /// earlier timeline's) is not stored yet. A restore following
    /// `recovery_target_timeline = 'latest'` looks for the newest history
    /// file: WAL of a timeline stored before its history would be passed
    /// over, and recovery would end (and promote) at the switch point.
    fn waits_for_history(&self, job: Job) -> bool {
        let timeline = match job {
            Job::History(_) | Job::Frames { .. } => return false,
            Job::Segment(s) | Job::ClosedPartial(s) | Job::Chunk { seg: s, .. } => s.timeline,
        };
        self.jobs
            .keys()
            .any(|j| matches!(j, Job::History(t) if *t <= timeline))
    }

    fn on_done(&mut self, job: Job, result: Result<Stored, anyhow::Error>) {
        if let Job::Frames { seg, .. } = job {
            if let Some(f) = self.filling.as_mut().filter(|f| f.seg == seg) {
                f.frames_in_flight = false;
            }
            match result {
                Ok((_, frames)) => {
                    let n: u64 = frames.iter().map(|f| f.end - f.start).sum();
                    COMPRESSED_AHEAD.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                    self.keep_frames(seg, frames)
                }
                // The chunk or the segment compresses these bytes itself.
                Err(e) => debug!("compressing ahead in {seg:?} failed: {e:#}"),
            }
            if self.filling.is_some_and(|f| f.chunk_wanted) {
                if let Some(f) = &mut self.filling {
                    f.chunk_wanted = false;
                }
                self.chunk_now();
            }
            return;
        }
        let kind = match job {
            Job::Segment(_) => Kind::Segment,
            Job::ClosedPartial(_) => Kind::ClosedPartial,
            Job::History(_) => Kind::History,
            Job::Chunk { .. } | Job::Frames { .. } => Kind::Chunk,
        };
        crate::metrics::upload_result(kind, result.is_ok(), self.repo.name());
        match &result {
            Ok(_) => {
                if self.stalled {
                    info!(
                        "uploads succeed again after {:.0?} without progress ({} failed attempts)",
                        self.last_progress.elapsed(),
                        self.failures
                    );
                    self.stalled = false;
                    self.progress.set_upload_stalled(false);
                }
                self.failures = 0;
                self.last_progress = Instant::now();
            }
            Err(_) => self.failures += 1,
        }
        match result {
            Ok((outcome, frames)) => {
                debug!(?job, ?outcome, "stored");
                self.jobs.remove(&job);
                match job {
                    Job::Chunk { seg, end, .. } => {
                        self.keep_frames(seg, frames);
                        self.chunk_backoff.reset();
                        if let Some(f) = &mut self.filling {
                            if f.seg == seg {
                                f.chunk_in_flight = false;
                            }
                        }
                        if self.whole.contains(&seg) {
                            // The segment was stored whole while this chunk
                            // was in flight: it is an orphan, remove it too.
                            self.after_segment_stored(seg);
                        } else {
                            let stored = self.chunked.entry(seg).or_insert(0);
                            *stored = (*stored).max(end);
                        }
                    }
                    Job::Segment(seg) | Job::ClosedPartial(seg) => {
                        self.chunked.remove(&seg);
                        self.frames.remove(&seg);
                        self.whole.insert(seg);
                        while self.whole.len() > WHOLE_REMEMBERED {
                            self.whole.pop_first();
                        }
                        self.after_segment_stored(seg);
                    }
                    Job::History(_) | Job::Frames { .. } => {}
                }
                self.progress.touch_archived();
            }
            Err(e) => {
                let conflict = e
                    .downcast_ref::<RepositoryError>()
                    .is_some_and(|r| matches!(r, RepositoryError::Conflict { .. }));
                let stranger = e.downcast_ref::<Stranger>().is_some();
                if stranger {
                    error!("{}", crate::report::error_line(&e));
                    crate::metrics::refused(self.repo.name());
                    let seg = match job {
                        Job::Segment(s) | Job::ClosedPartial(s) | Job::Chunk { seg: s, .. } => {
                            Some(s)
                        }
                        Job::History(_) | Job::Frames { .. } => None,
                    };
                    self.refused.extend(seg);
                    self.jobs.insert(job, State::Conflict);
                    if let Some(s) = seg {
                        self.frames.remove(&s);
                    }
                } else if conflict {
                    error!("{}; the local copy is kept in the spool and this object will not be retried until restart", crate::report::error_line(&e));
                    crate::metrics::conflict(self.repo.name());
                    self.jobs.insert(job, State::Conflict);
                } else {
                    warn!(
                        "upload of {job:?} failed, will retry: {}",
                        crate::report::error_line(&e)
                    );
                    self.jobs.insert(job, State::Waiting);
                }
                if let Job::Segment(s) | Job::ClosedPartial(s) = job {
                    // Its retry compresses from the spool: storage that
                    // fails may fail for long, and frames cost memory.
                    self.frames.remove(&s);
                }
                if let Job::Chunk { seg, .. } = job {
                    // The next chunk (from the same offset, with whatever is
                    // new) waits, with capped exponential backoff.
                    self.chunk_not_before = Instant::now() + self.chunk_backoff.next_delay();
                    self.jobs.remove(&job);
                    if let Some(f) = &mut self.filling {
                        if f.seg == seg {
                            f.chunk_in_flight = false;
                        }
                    }
                }
            }
        }
    }

    /// Keeps frames made for `seg` (by a chunk, or ahead by
    /// [`Job::Frames`]) for its later chunks and its object, unless they
    /// are short (a chunk of a slowly filling segment: compressed again
    /// with its neighbours, for the segment's ratio), the segment is no
    /// longer waiting for them, they overlap frames kept already, or the
    /// segment's frames would pass a quarter of a segment.
    fn keep_frames(&mut self, seg: SegmentName, frames: Vec<Frame>) {
        let (Some(first), Some(last)) = (frames.first(), frames.last()) else {
            return;
        };
        let waiting = self.filling.is_some_and(|f| f.seg == seg)
            || self.jobs.contains_key(&Job::Segment(seg))
            || self.jobs.contains_key(&Job::ClosedPartial(seg));
        if last.end - first.start < MIN_KEPT_FRAME || self.whole.contains(&seg) || !waiting {
            return;
        }
        let kept = self.frames.entry(seg).or_default();
        let mut bytes: usize = kept.iter().map(|f| f.bytes.len()).sum();
        for f in frames {
            let overlaps = kept.iter().any(|k| k.start < f.end && f.start < k.end);
            if overlaps || (bytes + f.bytes.len()) as u64 > self.segment_size / 4 {
                continue;
            }
            bytes += f.bytes.len();
            kept.push(f);
        }
        kept.sort_by_key(|f| f.start);
        // Segments waiting for storage (an outage, a backlog) would keep
        // theirs for as long as it lasts: the oldest give theirs up first,
        // and are compressed again from the spool when their turn comes.
        while self.frames_bytes() > self.segment_size / 2 && self.frames.len() > 1 {
            self.frames.pop_first();
        }
    }

    /// Compressed bytes kept in frames, all segments together.
    fn frames_bytes(&self) -> u64 {
        self.frames
            .values()
            .flatten()
            .map(|f| f.bytes.len() as u64)
            .sum()
    }

    /// Compresses the filling segment ahead, one block at a time, while
    /// its chunks are held back (ack `local` under load): the frames are
    /// placed in the next chunk and in the segment's object, so when the
    /// load stops the chunk that follows has little left to compress, and
    /// no byte is compressed twice. Not while a chunk is in flight (it
    /// makes its own frames) or the segment's frames reach their cap.
    fn maybe_frames(&mut self, tasks: &mut JoinSet<(Job, Result<Stored, anyhow::Error>)>) {
        let Some(f) = self.filling else { return };
        if f.chunk_in_flight || f.frames_in_flight || self.refused.contains(&f.seg) {
            return;
        }
        let kept = self.frames.get(&f.seg);
        let framed = kept
            .and_then(|k| k.last())
            .map_or(0, |k| k.end)
            .max(self.chunked.get(&f.seg).copied().unwrap_or(0));
        let bytes: usize = kept.into_iter().flatten().map(|k| k.bytes.len()).sum();
        if self.frames_bytes() >= self.segment_size / 2 {
            return;
        }
        // A quarter of a small segment: with 1 MiB segments, blocks of a
        // whole segment would never be ahead of its end.
        let block = (BLOCK_LEN as u64).min(self.segment_size / 4);
        if f.flushed < framed + block || bytes as u64 >= self.segment_size / 4 {
            return;
        }
        let job = Job::Frames {
            seg: f.seg,
            start: framed,
            end: framed + block,
        };
        if let Some(f) = &mut self.filling {
            f.frames_in_flight = true;
        }
        let (repo, spool, release, identity) = (
            self.repo.clone(),
            self.spool.clone(),
            self.release.clone(),
            self.identity,
        );
        tasks.spawn(async move {
            let r = upload_one(&repo, &spool, &release, identity, job, Vec::new()).await;
            (job, r)
        });
    }

    /// A complete or closed segment is stored: its chunks go, in the background.
    fn after_segment_stored(&self, seg: SegmentName) {
        let repo = self.repo.clone();
        let name = SegmentFile::of(seg, self.segment_size);
        tokio::spawn(async move {
            if let Err(e) = repo.delete_chunks(&name).await {
                warn!(
                    "could not delete the chunks of {name} (they are removed at next start): {}",
                    e
                );
            }
        });
    }

    /// At start-up, what a crash left in the repository: chunks of segments
    /// whose full object is already stored (a crash between storing and
    /// deleting), and stale `file://` staging files.
    fn spawn_cleanup(&self) {
        let repo = self.repo.clone();
        tokio::spawn(async move {
            let r: anyhow::Result<()> = async {
                let n = repo.remove_stale_staging(STALE_STAGING_AGE).await?;
                if n > 0 {
                    info!("removed {n} staging file(s) a crash left in the repository");
                }
                let stored: BTreeSet<ObjectName> = repo.list_wal().await?.into_iter().collect();
                for seg in repo.list_chunked_segments().await? {
                    if stored.contains(&ObjectName::Segment(seg.clone()))
                        || stored.contains(&ObjectName::ClosedPartial(seg.clone()))
                    {
                        repo.delete_chunks(&seg).await?;
                    }
                }
                Ok(())
            }
            .await;
            if let Err(e) = r {
                warn!(
                    "start-up cleanup of superseded chunks failed: {}",
                    crate::report::error_line(&e)
                );
            }
        });
    }

    /// The end of contiguously stored WAL.
    fn archived(&self) -> Lsn {
        let mut archived = self.flushed;
        let stored_end = |s: &SegmentName| {
            s.start_lsn(self.segment_size)
                .plus(self.chunked.get(s).copied().unwrap_or(0))
        };
        for job in self.jobs.keys() {
            let end = match job {
                Job::Segment(s) | Job::ClosedPartial(s) => stored_end(s),
                Job::Chunk { seg, .. } | Job::Frames { seg, .. } => stored_end(seg),
                // The end of the timeline before `t` is not archived until
                // `t`'s history is: only up to the start of its last
                // (closed) segment.
                Job::History(t) => match self.closed.iter().rev().find(|c| c.timeline < *t) {
                    Some(c) => c.start_lsn(self.segment_size),
                    None => continue,
                },
            };
            archived = archived.min(end);
        }
        if let Some(f) = &self.filling {
            archived = archived.min(stored_end(&f.seg));
        }
        archived
    }

    fn publish(&mut self) {
        let pending = self
            .jobs
            .keys()
            .filter(|j| matches!(j, Job::Segment(_) | Job::ClosedPartial(_)))
            .count();
        self.progress.set_pending_segments(pending as u64);
        let archived = self.archived();
        self.progress.set_archived(archived);
        self.archived_tx.send_if_modified(|a| {
            let changed = *a != archived;
            *a = archived;
            changed
        });
        while self
            .durable_times
            .front()
            .is_some_and(|(lsn, _)| *lsn <= archived)
        {
            self.durable_times.pop_front();
        }
        self.progress
            .set_oldest_unarchived_ms(self.durable_times.front().map_or(0, |(_, t)| *t));
    }
}

async fn upload_one(
    repo: &Repository,
    spool: &Arc<Spool>,
    release: &Release,
    identity: ClusterIdentity,
    job: Job,
    frames: Vec<Frame>,
) -> anyhow::Result<Stored> {
    let segment_size = identity.segment_size;
    if let Job::Segment(seg)
    | Job::ClosedPartial(seg)
    | Job::Chunk { seg, .. }
    | Job::Frames { seg, .. } = job
    {
        let spool = spool.clone();
        tokio::task::spawn_blocking(move || check_spooled(&spool, identity, seg)).await??;
    }
    if let Job::Frames { seg, start, end } = job {
        let file = open_range(spool, seg, start, end).await?;
        let frames = repo.compress_range(file, start, end).await?;
        return Ok((PutOutcome::AlreadyStored, frames));
    }
    // Failpoints (feature `failpoints`): `upload::put` fails the upload
    // before it reaches the store; `upload::stored` fails it after the
    // object is stored but before the spool is told (a crash between the
    // two, which a restart must finish: the next put finds it stored).
    fail::fail_point!("upload::put", |arg| Err(anyhow::anyhow!(
        "failpoint upload::put: {}",
        arg.unwrap_or_default()
    )));
    let started = Instant::now();
    let mut made = Vec::new();
    let (kind, outcome) = match job {
        Job::Segment(seg) => {
            let name = ObjectName::Segment(SegmentFile::of(seg, segment_size));
            let o = repo
                .put_file_with(&name, spool.complete_path(seg), frames)
                .await?;
            fail::fail_point!("upload::stored", |_| Err(anyhow::anyhow!(
                "failpoint upload::stored"
            )));
            release_file(release, SpoolFile::Complete(seg)).await?;
            (Kind::Segment, o)
        }
        Job::ClosedPartial(seg) => {
            let name = ObjectName::ClosedPartial(SegmentFile::of(seg, segment_size));
            let o = repo
                .put_file_with(&name, spool.partial_path(seg), frames)
                .await?;
            release_file(release, SpoolFile::ClosedPartial(seg)).await?;
            (Kind::ClosedPartial, o)
        }
        Job::History(t) => {
            let data = {
                let spool = spool.clone();
                tokio::task::spawn_blocking(move || spool.read_history(t)).await??
            };
            let o = repo.put(&ObjectName::History(t), Bytes::from(data)).await?;
            (Kind::History, o)
        }
        Job::Chunk { seg, start, end } => {
            let file = open_range(spool, seg, start, end).await?;
            let (o, f) = repo
                .put_chunk_from(
                    &SegmentFile::of(seg, segment_size),
                    file,
                    start,
                    end,
                    frames,
                )
                .await?;
            made = f;
            (Kind::Chunk, o)
        }
        Job::Frames { .. } => unreachable!("compressing ahead returned above"),
    };
    crate::metrics::upload_duration(kind, started.elapsed(), repo.name());
    Ok((outcome, made))
}

/// [`Spool::open_range`] on the blocking pool.
async fn open_range(
    spool: &Arc<Spool>,
    seg: SegmentName,
    start: u64,
    end: u64,
) -> anyhow::Result<std::fs::File> {
    let spool = spool.clone();
    Ok(
        tokio::task::spawn_blocking(move || spool.open_range(seg, start, end))
            .await??
            .0,
    )
}

/// Completes at `at`; never when `at` is `None`.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Halves the lag samples by merging neighbours: each merged sample keeps
/// the later position and the earlier time, so the lag computed from them
/// errs high, never low.
fn thin(samples: VecDeque<(Lsn, u64)>) -> VecDeque<(Lsn, u64)> {
    let v: Vec<(Lsn, u64)> = samples.into();
    v.chunks(2)
        .map(|pair| (pair[pair.len() - 1].0, pair[0].1))
        .collect()
}

/// A spooled segment that is not WAL of the repository's cluster.
#[derive(Debug, thiserror::Error)]
#[error("the spool file {file} is not WAL of the cluster the repository is pinned to ({source}); it is kept in the spool and never uploaded. Is this spool left over from another cluster (a re-initdb) or from before a major upgrade? Move the file out of {dir}")]
pub struct Stranger {
    file: String,
    dir: String,
    #[source]
    source: crate::pg::page::PageError,
}

/// Checks the first page of a spooled segment against `identity`: system
/// identifier, PostgreSQL version, segment and block size, page address and
/// timeline. One page read per upload: the receive loop validated every
/// page of WAL it streamed, this catches files it did not stream.
fn check_spooled(spool: &Spool, identity: ClusterIdentity, seg: SegmentName) -> anyhow::Result<()> {
    let first = spool.read_range(seg, 0, identity.block_size.min(identity.segment_size))?;
    let mut v = PageValidator::new(identity, seg.timeline);
    v.feed(seg.start_lsn(identity.segment_size), &first)
        .map_err(|source| Stranger {
            file: seg.file_name(identity.segment_size),
            dir: spool.dir().display().to_string(),
            source,
        })?;
    Ok(())
}

/// Tells retention that this repository stored `file`.
async fn release_file(release: &Release, file: SpoolFile) -> anyhow::Result<()> {
    let release = release.clone();
    tokio::task::spawn_blocking(move || release.stored(file)).await??;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::durable::Fsync;
    use crate::positions::Positions;
    use crate::repository::envelope;
    use crate::repository::faults::{Fault, Faults, Op};
    use crate::repository::{Compression, Store};
    use crate::spool::retention::Retention;
    use crate::spool::WriterHandle;

    const SEG: u64 = 1 << 20;
    const SYSID: u64 = 7_300_000_000_000_000_001;

    fn me() -> ClusterIdentity {
        ClusterIdentity::new(SYSID, 150000, SEG)
    }

    /// WAL of this test's cluster: `len` bytes from `start` on `t`.
    fn wal(t: TimelineId, start: Lsn, len: u64) -> Bytes {
        Bytes::from(crate::pg::page::synthetic_wal(&me(), t, start, len))
    }

    /// A spool, its writer thread and an uploader to a `file://` repository
    /// (with `faults`, if any), running.
    struct Rig {
        _dir: tempfile::TempDir,
        spool: Arc<Spool>,
        repo: Arc<Repository>,
        positions: Positions,
        archived: watch::Receiver<Lsn>,
        cancel: CancellationToken,
        task: tokio::task::JoinHandle<()>,
        writer: WriterHandle,
    }

    fn rig(faults: Option<Arc<Faults>>) -> Rig {
        rig_with(
            faults,
            crate::config::AckMode::Local,
            Duration::from_millis(50),
            Duration::from_millis(300),
        )
    }

    /// [`rig`] with this ack mode, chunk interval and request timeout.
    fn rig_with(
        faults: Option<Arc<Faults>>,
        ack: crate::config::AckMode,
        interval: Duration,
        request_timeout: Duration,
    ) -> Rig {
        let d = tempfile::tempdir().unwrap();
        let Parts {
            spool,
            repo,
            positions,
            uploader,
            archived,
        } = parts(d.path(), faults, ack, interval, request_timeout);
        let (publisher, feed) = crate::spool::feed(Durable::default());
        positions.follow_durable(feed.durable.clone());
        let cancel = CancellationToken::new();
        let task = tokio::spawn(uploader.run(feed, cancel.clone()));
        let writer = WriterHandle::start(spool.writer(), publisher, positions.clone());
        Rig {
            _dir: d,
            spool,
            repo,
            positions,
            archived,
            cancel,
            task,
            writer,
        }
    }

    /// A durable position inside a segment already complete (read late,
    /// after the spool said the segment is complete) must not make it the
    /// filling segment again: with nothing new after it (a switch on an
    /// idle cluster, a spool full at a segment's end) its chunk would be
    /// stored and deleted every interval, forever, and the repository's
    /// archived position would never be final.
    #[tokio::test]
    async fn a_late_durable_position_inside_a_completed_segment_does_not_reopen_it() {
        let d = tempfile::tempdir().unwrap();
        let mut uploader = parts(
            d.path(),
            None,
            crate::config::AckMode::Local,
            Duration::from_millis(50),
            Duration::from_millis(300),
        )
        .uploader;
        let t = TimelineId(1);
        let seg = SegmentName {
            timeline: t,
            segno: 3,
        };
        uploader.on_durable(Durable {
            timeline: t,
            flushed: Lsn(3 * SEG + 4096),
        });
        assert!(uploader.filling.is_some_and(|f| f.seg == seg));
        uploader.on_event(SpoolEvent::Completed(seg));
        assert!(uploader.filling.is_none());
        uploader.on_durable(Durable {
            timeline: t,
            flushed: Lsn(3 * SEG + 8192),
        });
        assert!(
            uploader.filling.is_none(),
            "a completed segment is not filling"
        );
        // Also once it is stored whole and forgotten by the job table.
        uploader.jobs.clear();
        uploader.whole.insert(seg);
        uploader.on_durable(Durable {
            timeline: t,
            flushed: Lsn(3 * SEG + 9000),
        });
        assert!(uploader.filling.is_none());
    }

    /// A spool in `dir` and an uploader (not started) to a `file://`
    /// repository beside it, with `faults`, if any.
    struct Parts {
        spool: Arc<Spool>,
        repo: Arc<Repository>,
        positions: Positions,
        uploader: Uploader,
        archived: watch::Receiver<Lsn>,
    }

    fn parts(
        dir: &std::path::Path,
        faults: Option<Arc<Faults>>,
        ack: crate::config::AckMode,
        interval: Duration,
        request_timeout: Duration,
    ) -> Parts {
        let (spool, recovered) = Spool::open(&dir.join("spool"), SEG, Fsync::Off).unwrap();
        let spool = Arc::new(spool);
        let mut store = Store::open(
            &format!("file://{}", dir.join("repo").display()),
            &Default::default(),
            1,
        )
        .unwrap()
        .with_fsync(Fsync::Off)
        .with_request_timeout(request_timeout);
        if let Some(f) = faults {
            store = store.with_faults(f);
        }
        let repo = Arc::new(Repository::from_parts(store, None, Compression::Zstd, 1));
        let positions = Positions::default();
        let release = Release::new(Arc::new(Retention::new(spool.clone(), 1)), 0);
        let (uploader, archived) = Uploader::new(
            repo.clone(),
            me(),
            spool.clone(),
            release,
            positions.add_archive("test"),
            &recovered,
            &ArchiveConfig {
                partial_interval: interval,
                ack,
                upload_concurrency: 2,
                stall_alarm: Duration::from_millis(500),
            },
        );
        Parts {
            spool,
            repo,
            positions,
            uploader,
            archived,
        }
    }

    /// Stops a [`Rig`]'s uploader and writer, as the agent does.
    async fn shut_down(
        cancel: CancellationToken,
        writer: WriterHandle,
        task: tokio::task::JoinHandle<()>,
    ) {
        cancel.cancel();
        writer.finish().await.unwrap();
        task.await.unwrap();
    }

    /// Waits until `f` holds, for up to `secs`.
    async fn until(secs: u64, mut f: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            if f() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        f()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hanging_store_holds_neither_the_spool_writer_nor_its_acknowledgements() {
        let faults = Faults::new();
        faults.set(Some(Op::Put), Fault::Hang);
        let Rig {
            _dir,
            spool,
            repo,
            positions,
            archived,
            cancel,
            task,
            writer,
            ..
        } = rig(Some(faults.clone()));

        // Three and a half segments of WAL while every put hangs.
        let t = TimelineId(1);
        let start = Lsn(4 * SEG);
        let total = 3 * SEG + SEG / 2;
        let mut at = start;
        while at < start.plus(total) {
            writer.write(t, at, wal(t, at, 64 << 10)).await.unwrap();
            at = at.plus(64 << 10);
        }
        let end = at;
        let durable = writer.durable();
        assert!(
            until(10, || durable.borrow().flushed == end).await,
            "the spool writer waited for the store: flushed {}",
            durable.borrow().flushed
        );
        assert_eq!(positions.flushed(), end);
        assert!(faults.attempts(Op::Put) > 0, "no upload was even tried");
        assert_eq!(*archived.borrow(), start, "stored while every put hangs");
        for segno in 4..7 {
            let seg = SegmentName { timeline: t, segno };
            assert!(spool.complete_path(seg).exists(), "{seg:?} left the spool");
        }

        // Released: everything drains, and the stored segments leave the spool.
        faults.clear();
        assert!(
            until(20, || *archived.borrow() == end).await,
            "archived {} after the store came back, expected {}",
            *archived.borrow(),
            end
        );
        for segno in 4..7 {
            let seg = SegmentName { timeline: t, segno };
            assert!(
                until(5, || !spool.complete_path(seg).exists()).await,
                "{seg:?} stored but still in the spool"
            );
        }
        assert_eq!(repo.list_wal().await.unwrap().len(), 3);
        shut_down(cancel, writer, task).await;
    }

    #[cfg_attr(
        not(feature = "failpoints"),
        ignore = "needs the failpoints feature: run scripts/test.sh, or cargo test --features failpoints"
    )]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failure_between_storing_and_releasing_keeps_the_segment_until_a_retry_finds_it_stored(
    ) {
        let _scenario = fail::FailScenario::setup();
        fail::cfg("upload::stored", "1*return").unwrap();
        let Rig {
            _dir,
            spool,
            repo,
            archived,
            cancel,
            task,
            writer,
            ..
        } = rig(None);
        let t = TimelineId(1);
        let start = Lsn(2 * SEG);
        writer
            .write(t, start, wal(t, start, SEG + 100))
            .await
            .unwrap();
        let seg = SegmentName {
            timeline: t,
            segno: 2,
        };
        let object = ObjectName::Segment(SegmentFile::of(seg, SEG));
        assert!(
            until(10, || futures::executor::block_on(repo.get_raw(&object))
                .unwrap()
                .is_some())
            .await
        );
        // Stored, but the spool was never told: the segment stays, and
        // archived does not pass it.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(spool.complete_path(seg).exists());
        assert!(*archived.borrow() <= start);
        // The retry finds the same object stored and releases the segment.
        assert!(
            until(REQUEUE_DELAY.as_secs() + 10, || !spool
                .complete_path(seg)
                .exists())
            .await,
            "the segment never left the spool"
        );
        assert!(until(5, || *archived.borrow() == start.plus(SEG + 100)).await);
        shut_down(cancel, writer, task).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_timeline_ships_nothing_before_its_history_file() {
        let faults = Faults::new();
        faults.set_for(Some(Op::Put), "wal/00000002.history", Fault::Hang);
        let Rig {
            _dir,
            repo,
            archived,
            cancel,
            task,
            writer,
            ..
        } = rig(Some(faults.clone()));
        let (t1, t2) = (TimelineId(1), TimelineId(2));
        let start = Lsn(2 * SEG);
        let switch = start.plus(SEG + SEG / 2);
        writer
            .write(t1, start, wal(t1, start, SEG + SEG / 2))
            .await
            .unwrap();
        writer.end_timeline(t2).await.unwrap();
        writer
            .write_history(
                t2,
                Bytes::from(format!("1\t{switch}\tno recovery target specified\n")),
            )
            .await
            .unwrap();
        let t2_start = switch.segment_start(SEG);
        let end = t2_start.plus(2 * SEG + 4096);
        writer
            .write(t2, t2_start, wal(t2, t2_start, end.0 - t2_start.0))
            .await
            .unwrap();
        let durable = writer.durable();
        assert!(until(10, || durable.borrow().flushed == end).await);
        // Timeline 1 is stored (its complete segment and its closed
        // partial); nothing of timeline 2 while its history waits.
        let t1_closed = ObjectName::ClosedPartial(SegmentFile::of(
            SegmentName {
                timeline: t1,
                segno: 3,
            },
            SEG,
        ));
        assert!(
            until(10, || futures::executor::block_on(repo.get_raw(&t1_closed))
                .unwrap()
                .is_some())
            .await
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        let on_t2 = |names: Vec<ObjectName>| {
            names.into_iter().any(|n| match n {
                ObjectName::Segment(f) | ObjectName::ClosedPartial(f) => {
                    f.as_str().starts_with("00000002")
                }
                _ => false,
            })
        };
        assert!(
            !on_t2(repo.list_wal().await.unwrap()),
            "timeline 2 WAL stored before its history"
        );
        assert!(
            repo.list_chunked_segments()
                .await
                .unwrap()
                .iter()
                .all(|f| !f.as_str().starts_with("00000002")),
            "timeline 2 chunks stored before its history"
        );
        assert!(
            *archived.borrow() <= t2_start,
            "archived {} passed the switch segment {t2_start} before the history was stored",
            *archived.borrow()
        );
        faults.clear();
        assert!(
            until(20, || *archived.borrow() == end).await,
            "archived {}",
            *archived.borrow()
        );
        assert!(repo
            .get_raw(&ObjectName::History(t2))
            .await
            .unwrap()
            .is_some());
        assert!(on_t2(repo.list_wal().await.unwrap()));
        shut_down(cancel, writer, task).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn another_clusters_wal_in_the_spool_is_never_uploaded() {
        let Rig {
            _dir,
            spool,
            repo,
            archived,
            cancel,
            task,
            writer,
            ..
        } = rig(None);
        let t = TimelineId(1);
        // A segment left by another cluster (a re-initdb over the same
        // spool), then this cluster's WAL from the next segment on.
        let stranger = ClusterIdentity::new(SYSID + 1, 150000, SEG);
        let theirs = crate::pg::page::synthetic_wal(&stranger, t, Lsn(2 * SEG), SEG);
        writer
            .write(t, Lsn(2 * SEG), Bytes::from(theirs))
            .await
            .unwrap();
        let ours = Lsn(3 * SEG);
        writer
            .write(t, ours, wal(t, ours, SEG + 4096))
            .await
            .unwrap();
        let stored = |segno| {
            let o = ObjectName::Segment(SegmentFile::of(SegmentName { timeline: t, segno }, SEG));
            futures::executor::block_on(repo.get_raw(&o))
                .unwrap()
                .is_some()
        };
        assert!(until(10, || stored(3)).await, "our segment was not shipped");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!stored(2), "another cluster's segment was uploaded");
        let theirs_seg = SegmentName {
            timeline: t,
            segno: 2,
        };
        assert!(
            spool.complete_path(theirs_seg).exists(),
            "the stranger's file left the spool"
        );
        assert!(
            *archived.borrow() <= Lsn(2 * SEG),
            "archived passed the refused segment"
        );
        shut_down(cancel, writer, task).await;
    }

    /// The chunk objects stored for `seg`, as (start, end).
    async fn chunk_ranges(repo: &Repository, seg: SegmentName) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = repo.list_chunks(&SegmentFile::of(seg, SEG)).await.unwrap();
        v.sort();
        v
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ack_remote_ships_durable_wal_at_once_not_on_the_tick() {
        // A tick that never comes again (the first one fires at start,
        // before any WAL): only the eager path can ship these chunks.
        let Rig {
            _dir,
            repo,
            archived,
            cancel,
            task,
            writer,
            ..
        } = rig_with(
            None,
            crate::config::AckMode::Remote,
            Duration::from_secs(3600),
            Duration::from_secs(5),
        );
        let t = TimelineId(1);
        let start = Lsn(3 * SEG);
        let seg = SegmentName {
            timeline: t,
            segno: 3,
        };
        let mut at = start;
        for _ in 0..3 {
            writer.write(t, at, wal(t, at, 8192)).await.unwrap();
            at = at.plus(8192);
            assert!(
                until(10, || *archived.borrow() == at).await,
                "archived {} while {at} is durable: the chunk waited for the tick",
                *archived.borrow()
            );
        }
        // Contiguous from offset 0, each starting where the last ended.
        let ranges = chunk_ranges(&repo, seg).await;
        assert_eq!(ranges.first().map(|r| r.0), Some(0));
        assert!(ranges.windows(2).all(|w| w[0].1 == w[1].0), "{ranges:?}");
        assert_eq!(ranges.last().map(|r| r.1), Some(3 * 8192));
        shut_down(cancel, writer, task).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ack_remote_gathers_what_becomes_durable_during_a_chunk_upload_into_the_next() {
        // Every put takes 1 s: the WAL that becomes durable while the
        // first chunk is in flight goes in one second chunk, not one each.
        let faults = Faults::new();
        faults.set(Some(Op::Put), Fault::Delay(Duration::from_secs(1)));
        let Rig {
            _dir,
            repo,
            archived,
            cancel,
            task,
            writer,
            ..
        } = rig_with(
            Some(faults.clone()),
            crate::config::AckMode::Remote,
            Duration::from_secs(3600),
            Duration::from_secs(10),
        );
        let t = TimelineId(1);
        let start = Lsn(3 * SEG);
        let seg = SegmentName {
            timeline: t,
            segno: 3,
        };
        writer.write(t, start, wal(t, start, 8192)).await.unwrap();
        let mut at = start.plus(8192);
        assert!(until(10, || faults.attempts(Op::Put) >= 1).await);
        for _ in 0..8 {
            writer.write(t, at, wal(t, at, 8192)).await.unwrap();
            at = at.plus(8192);
        }
        let durable = writer.durable();
        assert!(until(10, || durable.borrow().flushed == at).await);
        assert!(
            until(20, || *archived.borrow() == at).await,
            "archived {}, expected {at}",
            *archived.borrow()
        );
        let ranges = chunk_ranges(&repo, seg).await;
        assert_eq!(ranges, vec![(0, 8192), (8192, 9 * 8192)]);
        shut_down(cancel, writer, task).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_segment_stored_after_its_chunks_reuses_their_compressed_frames() {
        let Rig {
            _dir,
            repo,
            archived,
            cancel,
            task,
            writer,
            ..
        } = untimed_rig(None, crate::config::AckMode::Remote);
        let t = TimelineId(1);
        let start = Lsn(3 * SEG);
        let seg = SegmentName {
            timeline: t,
            segno: 3,
        };
        let name = SegmentFile::of(seg, SEG).as_str().to_string();
        // Two chunks long enough to keep their frames, and between them
        // two short ones, whose bytes are compressed again as one frame.
        let lens = [
            MIN_KEPT_FRAME * 2,
            MIN_KEPT_FRAME / 4,
            MIN_KEPT_FRAME / 4,
            MIN_KEPT_FRAME * 3,
        ];
        let mut at = start;
        let mut bodies = Vec::new();
        for len in lens {
            writer.write(t, at, wal(t, at, len)).await.unwrap();
            let from = at.segment_offset(SEG);
            at = at.plus(len);
            assert!(until(10, || *archived.borrow() == at).await);
            let chunk = std::fs::read(_dir.path().join(format!(
                "repo/chunks/{name}/{from:08X}-{:08X}",
                at.segment_offset(SEG)
            )))
            .unwrap();
            let h = envelope::read_header(&chunk).unwrap();
            bodies.push((len, chunk[h.len()..h.len() + h.body_len as usize].to_vec()));
        }
        let rest = SEG - at.segment_offset(SEG);
        writer.write(t, at, wal(t, at, rest)).await.unwrap();
        let end = start.plus(SEG);
        assert!(until(10, || *archived.borrow() == end).await);
        let object = std::fs::read(_dir.path().join(format!("repo/wal/{name}"))).unwrap();
        for (len, body) in &bodies {
            let placed = object.windows(body.len()).any(|w| w == &body[..]);
            assert_eq!(
                placed,
                *len >= MIN_KEPT_FRAME,
                "a chunk of {len} bytes: its frame placed in the segment's object: {placed}"
            );
        }
        let stored = repo
            .get(&ObjectName::Segment(SegmentFile::of(seg, SEG)))
            .await
            .unwrap()
            .unwrap();
        let mut expected = Vec::new();
        let mut at = start;
        for len in lens.into_iter().chain([rest]) {
            expected.extend_from_slice(&wal(t, at, len));
            at = at.plus(len);
        }
        assert!(
            stored == expected,
            "the segment's object decodes to its WAL"
        );
        shut_down(cancel, writer, task).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_filling_segment_is_compressed_ahead_while_its_chunks_are_held_back() {
        // Ack local and no tick within the test: chunks wait, and the
        // durable part is compressed ahead a quarter segment at a time.
        let Rig {
            _dir,
            repo,
            archived,
            cancel,
            task,
            writer,
            ..
        } = untimed_rig(None, crate::config::AckMode::Local);
        let ahead = || COMPRESSED_AHEAD.load(std::sync::atomic::Ordering::Relaxed);
        let before = ahead();
        let t = TimelineId(1);
        let start = Lsn(3 * SEG);
        let seg = SegmentName {
            timeline: t,
            segno: 3,
        };
        let first = SEG / 2 + SEG / 8;
        writer.write(t, start, wal(t, start, first)).await.unwrap();
        assert!(
            until(10, || ahead() - before == SEG / 2).await,
            "compressed ahead: {} bytes",
            ahead() - before
        );
        assert!(chunk_ranges(&repo, seg).await.is_empty());
        // The segment completes: its object is made of those frames and
        // the rest, and reads back as the WAL written.
        let at = start.plus(first);
        writer.write(t, at, wal(t, at, SEG - first)).await.unwrap();
        let end = start.plus(SEG);
        assert!(until(10, || *archived.borrow() == end).await);
        let stored = repo
            .get(&ObjectName::Segment(SegmentFile::of(seg, SEG)))
            .await
            .unwrap()
            .unwrap();
        let mut expected = wal(t, start, first).to_vec();
        expected.extend_from_slice(&wal(t, at, SEG - first));
        assert!(
            stored == expected,
            "the segment's object decodes to its WAL"
        );
        shut_down(cancel, writer, task).await;
    }

    /// [`rig_with`] whose tick fires once, at start (before any WAL), and
    /// whose requests never time out within a test.
    fn untimed_rig(faults: Option<Arc<Faults>>, ack: crate::config::AckMode) -> Rig {
        rig_with(
            faults,
            ack,
            Duration::from_secs(3600),
            Duration::from_secs(600),
        )
    }

    /// An uploader that is not running, to drive its state by hand.
    fn idle_uploader() -> (tempfile::TempDir, Uploader) {
        let d = tempfile::tempdir().unwrap();
        let (spool, recovered) = Spool::open(&d.path().join("spool"), SEG, Fsync::Off).unwrap();
        let spool = Arc::new(spool);
        let store = Store::open(
            &format!("file://{}", d.path().join("repo").display()),
            &Default::default(),
            1,
        )
        .unwrap();
        let repo = Arc::new(Repository::from_parts(store, None, Compression::Zstd, 1));
        let release = Release::new(Arc::new(Retention::new(spool.clone(), 1)), 0);
        let (u, _) = Uploader::new(
            repo,
            me(),
            spool,
            release,
            Positions::default().add_archive("test"),
            &recovered,
            &ArchiveConfig {
                partial_interval: Duration::from_secs(3600),
                ack: crate::config::AckMode::Local,
                upload_concurrency: 2,
                stall_alarm: Duration::from_secs(60),
            },
        );
        (d, u)
    }

    #[test]
    fn frames_kept_for_segments_waiting_on_storage_stay_bounded() {
        let (_d, mut u) = idle_uploader();
        // Incompressible frames of a quarter segment's plaintext each, as
        // if compressed ahead; the segments wait for a store that hangs.
        let frame = |start: u64| Frame {
            start,
            end: start + SEG / 4,
            bytes: Bytes::from(
                (0..SEG / 8)
                    .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                    .collect::<Vec<u8>>(),
            ),
        };
        for segno in 10..60 {
            let seg = SegmentName {
                timeline: TimelineId(1),
                segno,
            };
            u.jobs.insert(Job::Segment(seg), State::InFlight);
            u.keep_frames(seg, vec![frame(0), frame(SEG / 4)]);
            assert!(
                u.frames_bytes() <= SEG / 2,
                "{} bytes of frames kept for {} segments",
                u.frames_bytes(),
                u.frames.len()
            );
            assert!(
                u.frames.contains_key(&seg),
                "the newest segment keeps its frames"
            );
        }
        // A failed upload gives its segment's frames up.
        let seg = *u.frames.keys().last().unwrap();
        u.on_done(Job::Segment(seg), Err(anyhow::anyhow!("store down")));
        assert!(!u.frames.contains_key(&seg));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hanging_store_collects_one_chunk_upload_not_one_per_segment() {
        let faults = Faults::new();
        faults.set(Some(Op::Put), Fault::Hang);
        let Rig {
            _dir,
            archived,
            cancel,
            task,
            writer,
            ..
        } = untimed_rig(Some(faults.clone()), crate::config::AckMode::Remote);
        // Three and a half segments while every put hangs: each segment
        // that fills would start a chunk of its own.
        let t = TimelineId(1);
        let start = Lsn(4 * SEG);
        let mut at = start;
        while at < start.plus(3 * SEG + SEG / 2) {
            writer.write(t, at, wal(t, at, 64 << 10)).await.unwrap();
            at = at.plus(64 << 10);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let durable = writer.durable();
        assert!(until(10, || durable.borrow().flushed == at).await);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            faults.attempts(Op::Put) <= 3,
            "{} uploads hang at once: more than two segments and one chunk",
            faults.attempts(Op::Put)
        );
        faults.clear();
        assert!(until(20, || *archived.borrow() == at).await);
        shut_down(cancel, writer, task).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_chunk_that_finishes_after_its_segment_was_stored_is_deleted() {
        // Chunk puts take 1.5 s; the segment completes and is stored whole
        // meanwhile (its chunks cleaned up: none yet). The late chunk then
        // lands: an orphan, which must not stay in the repository.
        let faults = Faults::new();
        faults.set_for(
            Some(Op::Put),
            "chunks/",
            Fault::Delay(Duration::from_millis(1500)),
        );
        let Rig {
            _dir,
            repo,
            archived,
            cancel,
            task,
            writer,
            ..
        } = rig_with(
            Some(faults.clone()),
            crate::config::AckMode::Remote,
            Duration::from_secs(3600),
            Duration::from_secs(10),
        );
        let t = TimelineId(1);
        let start = Lsn(3 * SEG);
        let seg = SegmentName {
            timeline: t,
            segno: 3,
        };
        writer.write(t, start, wal(t, start, 8192)).await.unwrap();
        assert!(until(10, || faults.attempts(Op::Put) >= 1).await);
        let rest = start.plus(8192);
        writer
            .write(t, rest, wal(t, rest, SEG - 8192))
            .await
            .unwrap();
        let end = start.plus(SEG);
        assert!(
            until(20, || *archived.borrow() == end).await,
            "archived {}, expected {end}",
            *archived.borrow()
        );
        // Past the late chunk's landing: it is gone again.
        tokio::time::sleep(Duration::from_millis(2000)).await;
        assert!(
            until(10, || futures::executor::block_on(chunk_ranges(&repo, seg))
                .is_empty())
            .await,
            "orphan chunks left: {:?}",
            chunk_ranges(&repo, seg).await
        );
        shut_down(cancel, writer, task).await;
    }

    #[test]
    fn thinning_lag_samples_errs_high() {
        let samples: VecDeque<(Lsn, u64)> = (1..=5).map(|i| (Lsn(i * 100), i * 10)).collect();
        let thinned = thin(samples);
        assert_eq!(
            thinned,
            VecDeque::from(vec![(Lsn(200), 10), (Lsn(400), 30), (Lsn(500), 50)])
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hanging_store_is_an_alarm_after_the_stall_time_not_after_attempts() {
        let faults = Faults::new();
        faults.set(Some(Op::Put), Fault::Hang);
        let Rig {
            _dir,
            positions,
            archived,
            cancel,
            task,
            writer,
            ..
        } = rig(Some(faults.clone()));
        let t = TimelineId(1);
        let start = Lsn(SEG);
        writer
            .write(t, start, wal(t, start, SEG + 8192))
            .await
            .unwrap();
        // Few attempts fail (each waits for its timeout), yet the stall is
        // reported once nothing has been stored for the stall time.
        assert!(
            until(5, || positions.upload_stalled()).await,
            "no alarm after {} put attempts",
            faults.attempts(Op::Put)
        );
        assert_eq!(*archived.borrow(), start);
        faults.clear();
        assert!(until(20, || *archived.borrow() == start.plus(SEG + 8192)).await);
        assert!(
            until(2, || !positions.upload_stalled()).await,
            "the alarm stayed up"
        );
        shut_down(cancel, writer, task).await;
    }
}
