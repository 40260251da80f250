//! receive: the replication stream, validated, into the spool; durable
//! positions back to PostgreSQL.
//!
//! The receive loop (async) reads the walsender's CopyData messages,
//! validates every WAL page header ([`PageValidator`]) *before* the bytes
//! go anywhere, and hands XLogData to the spool writer thread
//! ([`WriterHandle`], owned by [`crate::spool`]) through its bounded queue.
//! When the queue is full the loop stops reading the socket: that is
//! backpressure, and PostgreSQL keeps the WAL in its slot. This module
//! speaks the protocol; the spool decides what is durable and says so
//! through its [`Durable`] watch.
//!
//! The receive loop sends a standby status update after every fsync batch
//! (so walsafe can serve as a synchronous standby), whenever the server asks
//! for one, and every [`STATUS_INTERVAL`]. The update reports
//! `write = received` and `flush = ack`, where `ack` is `flushed` (ack mode
//! `local`) or `min(flushed, archived)` (ack mode `remote`): **never a byte
//! that is not durable** (rule 1 of README's Guarantees). `apply` is reported as 0/0, as
//! `pg_receivewal` does: walsafe applies nothing, so it cannot serve
//! `synchronous_commit = remote_apply`.
//!
//! Streaming always starts at a segment boundary (a segment file in the
//! spool is written from offset 0), or at the spool writer's end after a
//! reconnect. At the end of a timeline the writer closes the segment as
//! `.partial`, the history file of the next timeline is fetched and spooled,
//! and streaming resumes on the next timeline from the start of the segment
//! holding the switch point, as `pg_receivewal` does.

use std::time::Duration;

use anyhow::{bail, Context};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{AckMode, Config};
use crate::pg::page::PageValidator;
use crate::pg::replication::{ReplMessage, ReplicationConnection, ReplicationStream};
use crate::pg::{ClusterIdentity, Lsn, TimelineId};
use crate::positions::Positions;
use crate::spool::{Durable, WritePermit, WriterHandle};

/// Interval of unsolicited status updates (PostgreSQL's `wal_receiver_status_interval` default).
pub const STATUS_INTERVAL: Duration = Duration::from_secs(10);
/// Interval of status updates while the socket is left unread (the spool
/// writer's queue is full): the server's keepalive requests go unseen
/// then, so walsafe speaks first, well within any `wal_sender_timeout`.
pub const WAITING_STATUS_INTERVAL: Duration = Duration::from_secs(1);

/// How one streaming session ended.
#[derive(Debug)]
pub enum StreamEnd {
    /// Shutdown was requested; the final status update was sent.
    Cancelled,
    /// The server ended streaming without a next timeline (it is shutting down).
    ServerStopped,
}

/// The receive side of the agent, for one server connection at a time.
pub struct Receiver<'a> {
    pub cfg: &'a Config,
    pub identity: ClusterIdentity,
    pub writer: &'a WriterHandle,
    pub positions: Positions,
    pub archived: watch::Receiver<Lsn>,
    pub cancel: CancellationToken,
    /// Where streaming must resume after an interruption: the timeline and
    /// the end of the WAL handed to the spool writer on it (the writer
    /// accepts only contiguous WAL). Unlike the monotonic `received`
    /// position, this moves back to the segment start after a timeline
    /// switch, where streaming really continues.
    pub resume: (TimelineId, Lsn),
    /// After a failover to a server whose timeline forked off before the
    /// end of what the spool held: that timeline and the fork point. Until
    /// the spool has flushed WAL of it, only WAL before the fork is durable
    /// *on that server's history*, and no more is reported to it.
    pub forked: Option<(TimelineId, Lsn)>,
}

impl Receiver<'_> {
    /// Streams from `start` on `timeline` until shutdown, server stop or error,
    /// following timeline switches. Returns the position streaming reached
    /// (to resume from after a reconnect) along with how it ended.
    pub async fn stream(
        &mut self,
        mut conn: ReplicationConnection,
        mut timeline: TimelineId,
        mut start: Lsn,
    ) -> anyhow::Result<StreamEnd> {
        let seg = self.identity.segment_size;
        self.resume = (timeline, start);
        loop {
            info!(%timeline, %start, slot = %self.cfg.postgres.slot, "starting replication");
            let stream = conn
                .start_replication(Some(&self.cfg.postgres.slot), start, timeline)
                .await
                .with_context(|| {
                    format!("START_REPLICATION at {start} on timeline {timeline} failed")
                })?;
            self.positions.set_timeline(timeline);
            self.positions.set_connected(true);
            crate::metrics::set_connected(true);
            let end = self.stream_timeline(stream, timeline, start).await;
            self.positions.set_connected(false);
            crate::metrics::set_connected(false);
            match end? {
                TimelineEnd::Stopped(e) => return Ok(e),
                TimelineEnd::Switched {
                    stream,
                    next,
                    switch_point,
                } => {
                    info!(from = %timeline, to = %next, %switch_point, "timeline switch");
                    self.writer.end_timeline(next).await?;
                    conn = (*stream).into_connection()?;
                    self.fetch_history(&mut conn, next).await?;
                    timeline = next;
                    start = switch_point.segment_start(seg);
                    self.resume = (timeline, start);
                }
            }
        }
    }

    /// After a failover to a server whose timeline `next` forked off the
    /// spool's timeline at `fork`, before the end of what the spool holds:
    /// closes the segment being filled as the old timeline's `.partial`
    /// (with everything the spool holds past the fork: it stays archived
    /// under the old timeline and is never mixed into the new one), spools
    /// the new timelines' history files up to the server's, and returns
    /// where streaming goes on: `next`, from the start of the segment
    /// holding the fork point.
    pub async fn leave_timeline(
        &mut self,
        conn: &mut ReplicationConnection,
        fork: Lsn,
        next: TimelineId,
        server_timeline: TimelineId,
    ) -> anyhow::Result<(TimelineId, Lsn)> {
        let (old, held) = self.resume;
        warn!(
            timeline = %old, %fork, %held, %next,
            "FAILOVER: the server's timeline {next} forked off timeline {old} at {fork}, but walsafe holds WAL up to {held} on timeline {old} (from the old primary); that WAL stays archived under timeline {old} only, and archiving goes on on timeline {next}",
        );
        self.writer.end_timeline(next).await?;
        self.forked = Some((next, fork));
        for t in next.0..=server_timeline.0 {
            self.fetch_history(conn, TimelineId(t)).await?;
        }
        let start = fork.segment_start(self.identity.segment_size);
        self.positions.reset(next, start);
        self.resume = (next, start);
        Ok(self.resume)
    }

    /// Closes the segment being filled (it stays `.partial` and is shipped
    /// as such), so that streaming can resume at a later segment boundary
    /// after WAL was lost (a recorded gap).
    pub async fn close_segment_for_gap(&self, timeline: TimelineId) -> anyhow::Result<()> {
        self.writer.end_timeline(timeline).await
    }

    /// Fetches `<tli>.history` from the server and spools it.
    pub async fn fetch_history(
        &self,
        conn: &mut ReplicationConnection,
        tli: TimelineId,
    ) -> anyhow::Result<()> {
        if tli.0 <= 1 {
            return Ok(());
        }
        let (_name, content) = conn
            .timeline_history(tli)
            .await
            .with_context(|| format!("TIMELINE_HISTORY {tli} failed"))?;
        self.writer
            .write_history(tli, content)
            .await
            .with_context(|| format!("could not spool the history file of timeline {tli}"))
    }

    async fn stream_timeline(
        &mut self,
        mut stream: ReplicationStream,
        timeline: TimelineId,
        start: Lsn,
    ) -> anyhow::Result<TimelineEnd> {
        let mut validator = PageValidator::new(self.identity, timeline);
        let mut expected = start;
        let mut durable = self.writer.durable();
        let mut archived = self.archived.clone();
        let mut tick = tokio::time::interval(STATUS_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let remote = self.cfg.archive.ack == AckMode::Remote;
        // The socket is read only with room in the writer's queue: a full
        // queue (the spool is slow, or full) leaves the socket unread, while
        // status updates still go out (PostgreSQL must not time us out).
        let writer = self.writer;
        let mut room: Option<WritePermit<'_>> = None;
        let mut waiting = tokio::time::interval(WAITING_STATUS_INTERVAL);
        waiting.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => {
                    // Final status update with what is durable, then a clean stop.
                    let _ = self.send_status(&mut stream, false).await;
                    if let Err(e) = stream.stop().await {
                        warn!("replication stream did not stop cleanly: {e}");
                    }
                    return Ok(TimelineEnd::Stopped(StreamEnd::Cancelled));
                }
                r = durable.changed() => {
                    if r.is_err() {
                        bail!("the spool writer stopped (see the error logged before this one)");
                    }
                    self.send_status(&mut stream, false).await?;
                }
                r = archived.changed(), if remote => {
                    if r.is_ok() {
                        self.send_status(&mut stream, false).await?;
                    }
                }
                permit = writer.reserve(), if room.is_none() => {
                    room = Some(permit?);
                }
                _ = waiting.tick(), if room.is_none() => {
                    // Not reading while the spool writer catches up.
                    self.positions.receive_heartbeat();
                    self.send_status(&mut stream, false).await?;
                }
                msg = stream.next_message(), if room.is_some() => {
                    self.positions.receive_heartbeat();
                    match msg? {
                        ReplMessage::XLogData { start: at, server_end, data } => {
                            if at != expected {
                                bail!("the server sent WAL at {at} but the stream was at {expected}; refusing a non-contiguous stream");
                            }
                            validator.feed(at, &data).with_context(|| {
                                format!("WAL received at {at} on timeline {timeline} failed validation; it was not spooled or uploaded")
                            })?;
                            expected = at.plus(data.len() as u64);
                            self.resume = (timeline, expected);
                            self.positions.set_received(expected);
                            self.positions.set_server(server_end.max(expected));
                            room.take().expect("read only with room").write(timeline, at, data);
                        }
                        ReplMessage::Keepalive { server_end, reply_requested } => {
                            self.positions.set_server(server_end);
                            if reply_requested {
                                self.send_status(&mut stream, true).await?;
                            }
                        }
                        ReplMessage::EndOfTimeline { next_timeline, switch_point } => {
                            return Ok(TimelineEnd::Switched { stream: Box::new(stream), next: next_timeline, switch_point });
                        }
                        ReplMessage::EndOfStream => {
                            let _ = self.send_status(&mut stream, false).await;
                            return Ok(TimelineEnd::Stopped(StreamEnd::ServerStopped));
                        }
                    }
                }
                _ = tick.tick() => {
                    self.send_status(&mut stream, false).await?;
                }
            }
        }
    }

    /// The flush position PostgreSQL may be told about.
    fn ack_position(&self) -> Lsn {
        let Durable { timeline, flushed } = *self.writer.durable().borrow();
        let ack = match self.cfg.archive.ack {
            AckMode::Local => flushed,
            AckMode::Remote => flushed.min(*self.archived.borrow()),
        };
        self.within_history(timeline, ack)
    }

    /// `lsn`, a position of WAL the spool holds on `timeline`, as far as it
    /// is in the history of the server after a failover (see
    /// [`Receiver::forked`]): no further than the fork point while the
    /// spool's WAL is still of the old timeline.
    fn within_history(&self, timeline: TimelineId, lsn: Lsn) -> Lsn {
        match self.forked {
            Some((next, fork)) if timeline < next => lsn.min(fork),
            _ => lsn,
        }
    }

    async fn send_status(
        &self,
        stream: &mut ReplicationStream,
        reply_requested: bool,
    ) -> anyhow::Result<()> {
        let ack = self.ack_position();
        // Copied out first: a watch borrow held while `received()` borrows
        // the same watch again deadlocks against the writer thread's update.
        let timeline = self.writer.durable().borrow().timeline;
        let received = self
            .within_history(timeline, self.positions.received())
            .max(ack);
        stream
            .send_status(received, ack, Lsn::INVALID, reply_requested)
            .await
            .context("could not send a standby status update")?;
        Ok(())
    }
}

enum TimelineEnd {
    Stopped(StreamEnd),
    Switched {
        stream: Box<ReplicationStream>,
        next: TimelineId,
        switch_point: Lsn,
    },
}
