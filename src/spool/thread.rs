//! The spool writer thread, and what the spool tells the rest of the agent.
//!
//! One OS thread owns the [`SpoolWriter`]. The receive loop hands it WAL
//! through a bounded queue ([`WriterHandle::write`]); when the queue is
//! full the receive loop waits, leaving the socket unread (backpressure:
//! PostgreSQL keeps the WAL in its slot). The thread writes what is queued,
//! then fsyncs once for the whole batch (group commit): while one fsync
//! runs, the next batch queues up.
//!
//! # One publisher
//!
//! The thread is the only publisher of what the spool holds durably:
//!
//! ```text
//! writer thread ──▶ Durable { timeline, flushed }   watch: latest value only
//!               └─▶ SpoolEvent::Completed(seg)      queue: every event, in order
//!                   SpoolEvent::TimelineEnded { closed, next }
//!                   SpoolEvent::History(tli)
//! ```
//!
//! `flushed` lives in the [`Durable`] watch and nowhere else: the receive
//! loop reads it for its standby status updates, [`crate::positions`]
//! reads it for metrics, and the uploader for the bytes it may ship. The
//! queue carries what a "latest value" cannot: which segments became
//! complete, which timeline ended where, which history file was written.
//!
//! Ordering rule: every event is queued *before* the [`Durable`] value
//! that covers it is published. A subscriber that first drains the queue
//! and then reads the watch therefore never sees `flushed` inside segment
//! N+1 without having seen that segment N completed.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};

use super::SpoolWriter;
use crate::pg::{Lsn, SegmentName, TimelineId};
pub use crate::positions::Durable;
use crate::positions::Positions;
use crate::retry::Backoff;

/// XLogData messages queued for the spool writer before the socket is left unread.
pub const WRITE_QUEUE_MESSAGES: usize = 32;
/// Bytes written before the writer fsyncs even if more is queued, bounding commit latency.
pub const MAX_BATCH_BYTES: usize = 4 << 20;

/// What changed in the spool, besides `flushed` (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpoolEvent {
    /// A segment is complete under its final name.
    Completed(SegmentName),
    /// A timeline ended (or a segment was closed at a gap); `closed` is the
    /// segment left `.partial` in the spool, holding WAL up to the end.
    TimelineEnded {
        closed: Option<SegmentName>,
        next: TimelineId,
    },
    /// A timeline history file was written.
    History(TimelineId),
}

/// The writer thread's side of the spool's news.
pub struct Publisher {
    durable: watch::Sender<Durable>,
    /// One queue per uploader (per repository).
    events: Vec<mpsc::UnboundedSender<SpoolEvent>>,
}

/// The subscribers' side: clone the watch as often as needed; each event
/// queue has one reader (a repository's uploader).
pub struct Feed {
    pub durable: watch::Receiver<Durable>,
    pub events: mpsc::UnboundedReceiver<SpoolEvent>,
}

/// A publisher and its feed, starting at `initial` (what the spool
/// recovered as durable).
pub fn feed(initial: Durable) -> (Publisher, Feed) {
    let (publisher, mut feeds) = feeds(initial, 1);
    (publisher, feeds.pop().expect("one feed"))
}

/// A publisher and `n` feeds (one per repository's uploader), each
/// receiving every event.
pub fn feeds(initial: Durable, n: usize) -> (Publisher, Vec<Feed>) {
    let (durable_tx, durable) = watch::channel(initial);
    let (senders, feeds) = (0..n.max(1))
        .map(|_| {
            let (tx, events) = mpsc::unbounded_channel();
            let feed = Feed {
                durable: durable.clone(),
                events,
            };
            (tx, feed)
        })
        .unzip();
    (
        Publisher {
            durable: durable_tx,
            events: senders,
        },
        feeds,
    )
}

impl Publisher {
    /// Another subscriber of the durable position.
    pub fn subscribe(&self) -> watch::Receiver<Durable> {
        self.durable.subscribe()
    }

    fn event(&self, e: SpoolEvent) {
        // An uploader may have stopped first at shutdown; nothing to tell then.
        for tx in &self.events {
            let _ = tx.send(e.clone());
        }
    }

    fn durable(&self, d: Durable) {
        self.durable.send_replace(d);
    }
}

/// Room for one write in the writer's queue (see [`WriterHandle::reserve`]).
pub struct WritePermit<'a>(mpsc::Permit<'a, WriteCmd>);

impl WritePermit<'_> {
    /// Queues WAL at `start` on `timeline`.
    pub fn write(self, timeline: TimelineId, start: Lsn, data: Bytes) {
        self.0.send(WriteCmd::Data {
            timeline,
            start,
            data,
        });
    }
}

enum WriteCmd {
    Data {
        timeline: TimelineId,
        start: Lsn,
        data: Bytes,
    },
    EndTimeline {
        next: TimelineId,
        reply: oneshot::Sender<anyhow::Result<()>>,
    },
    History {
        timeline: TimelineId,
        content: Bytes,
        reply: oneshot::Sender<anyhow::Result<()>>,
    },
}

/// Handle to the spool writer thread.
pub struct WriterHandle {
    tx: mpsc::Sender<WriteCmd>,
    durable: watch::Receiver<Durable>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl WriterHandle {
    /// Starts the writer thread. It runs until [`WriterHandle::finish`] (or
    /// the handle is dropped) and must finish its last fsync before the
    /// process exits, so shutdown waits for it.
    pub fn start(writer: SpoolWriter, publisher: Publisher, positions: Positions) -> Self {
        let (tx, rx) = mpsc::channel(WRITE_QUEUE_MESSAGES);
        let durable = publisher.subscribe();
        let thread = std::thread::Builder::new()
            .name("walsafe-spool".into())
            .spawn(move || writer_thread(writer, rx, publisher, positions))
            .expect("spawn spool writer thread");
        WriterHandle {
            tx,
            durable,
            thread: Some(thread),
        }
    }

    /// The durable end of the spool, as the thread publishes it.
    pub fn durable(&self) -> watch::Receiver<Durable> {
        self.durable.clone()
    }

    /// Queues WAL at `start` on `timeline`; waits while the queue is full.
    pub async fn write(&self, timeline: TimelineId, start: Lsn, data: Bytes) -> anyhow::Result<()> {
        self.send(WriteCmd::Data {
            timeline,
            start,
            data,
        })
        .await
    }

    /// Waits for room in the queue (cancel-safe: nothing is lost when the
    /// wait is abandoned), for one [`WritePermit::write`].
    pub async fn reserve(&self) -> anyhow::Result<WritePermit<'_>> {
        match self.tx.reserve().await {
            Ok(permit) => Ok(WritePermit(permit)),
            Err(_) => bail!("the spool writer stopped (see the error logged before this one)"),
        }
    }

    /// Flushes, then closes the segment being filled: it stays `.partial`
    /// (a timeline ended inside it, or WAL after it was lost), and the next
    /// write may start `next` at a segment boundary.
    pub async fn end_timeline(&self, next: TimelineId) -> anyhow::Result<()> {
        let (reply, done) = oneshot::channel();
        self.send(WriteCmd::EndTimeline { next, reply }).await?;
        done.await
            .map_err(|_| anyhow!("the spool writer stopped while closing a segment"))?
    }

    /// Writes `<timeline>.history` durably and announces it.
    pub async fn write_history(&self, timeline: TimelineId, content: Bytes) -> anyhow::Result<()> {
        let (reply, done) = oneshot::channel();
        self.send(WriteCmd::History {
            timeline,
            content,
            reply,
        })
        .await?;
        done.await
            .map_err(|_| anyhow!("the spool writer stopped while writing a history file"))?
    }

    /// Waits until everything queued is written and fsynced, then stops the thread.
    pub async fn finish(mut self) -> anyhow::Result<()> {
        let thread = self.thread.take();
        drop(self.tx);
        match thread {
            Some(t) => tokio::task::spawn_blocking(move || t.join())
                .await?
                .map_err(|_| anyhow!("spool writer thread panicked"))?,
            None => Ok(()),
        }
    }

    async fn send(&self, cmd: WriteCmd) -> anyhow::Result<()> {
        if self.tx.send(cmd).await.is_err() {
            bail!("the spool writer stopped (see the error logged before this one)");
        }
        Ok(())
    }
}

fn writer_thread(
    mut w: SpoolWriter,
    mut rx: mpsc::Receiver<WriteCmd>,
    publisher: Publisher,
    positions: Positions,
) -> anyhow::Result<()> {
    let mut timeline = w.timeline().unwrap_or_default();
    let result = (|| -> anyhow::Result<()> {
        while let Some(first) = rx.blocking_recv() {
            let mut next = Some(first);
            let mut batch = 0usize;
            while let Some(cmd) = next.take() {
                match cmd {
                    WriteCmd::Data {
                        timeline: t,
                        start,
                        data,
                    } => {
                        timeline = t;
                        if !write_when_there_is_room(
                            &mut w, t, start, &data, &publisher, &positions, &rx,
                        )? {
                            return Ok(()); // shutdown while the spool was full
                        }
                        positions.set_written(w.written());
                        batch += data.len();
                    }
                    WriteCmd::EndTimeline { next: nt, reply } => {
                        let r = (|| -> anyhow::Result<()> {
                            flush_and_publish(&mut w, timeline, &publisher)?;
                            let closed = w.end_timeline()?;
                            publisher.event(SpoolEvent::TimelineEnded { closed, next: nt });
                            Ok(())
                        })();
                        let failed = r.is_err();
                        let _ = reply.send(r);
                        if failed {
                            bail!("could not close timeline {timeline} in the spool");
                        }
                        batch = 0;
                    }
                    WriteCmd::History {
                        timeline: t,
                        content,
                        reply,
                    } => {
                        let r = w.write_history(t, &content).map_err(anyhow::Error::from);
                        if r.is_ok() {
                            publisher.event(SpoolEvent::History(t));
                        }
                        let _ = reply.send(r);
                    }
                }
                if batch >= MAX_BATCH_BYTES {
                    break;
                }
                next = rx.try_recv().ok();
            }
            if w.written() > w.flushed() {
                flush_and_publish(&mut w, timeline, &publisher)?;
            }
        }
        Ok(())
    })();
    if let Err(e) = &result {
        tracing::error!("spool writer stopped: {}", crate::report::error_line(e));
    }
    result
}

/// First wait after the spool found itself full; doubles up to [`FULL_RETRY_MAX`].
pub const FULL_RETRY_MIN: Duration = Duration::from_millis(100);
/// Longest wait between two looks for room in a full spool.
pub const FULL_RETRY_MAX: Duration = Duration::from_secs(2);

/// Writes `data` at `start`, waiting while the spool is full (ENOSPC,
/// EDQUOT, or its own limits): backpressure, never an exit. Meanwhile what
/// is written is flushed (so it is acknowledged and can be shipped, which
/// is what frees room), and the queue is not read, so the receive loop
/// stops reading the socket and PostgreSQL keeps the WAL in its slot.
/// Returns false when shutdown came while waiting (the WAL that did not
/// fit was never acknowledged; the next start re-streams it).
fn write_when_there_is_room(
    w: &mut SpoolWriter,
    timeline: TimelineId,
    start: Lsn,
    data: &[u8],
    publisher: &Publisher,
    positions: &Positions,
    rx: &mpsc::Receiver<WriteCmd>,
) -> anyhow::Result<bool> {
    let end = start.plus(data.len() as u64);
    let mut backoff = Backoff::new(FULL_RETRY_MIN, FULL_RETRY_MAX);
    let mut full_since: Option<Instant> = None;
    loop {
        // After a failed write, go on where it stopped.
        let at = match w.timeline() {
            Some(t) if t == timeline && w.written() > start && w.written() <= end => w.written(),
            _ => start,
        };
        let rest = &data[at.bytes_after(start) as usize..];
        match w.write(timeline, at, rest) {
            Ok(()) => {
                if let Some(since) = full_since {
                    tracing::info!(
                        "the spool has room again after {:.1?}; reading from PostgreSQL again",
                        since.elapsed()
                    );
                    crate::metrics::set_spool_full(false);
                }
                return Ok(true);
            }
            Err(e) if e.is_disk_full() => {
                if full_since.is_none() {
                    let behind = positions
                        .furthest_behind()
                        .map(|r| format!(" to repository {r:?}, the one furthest behind,"))
                        .unwrap_or_default();
                    tracing::error!(
                        "SPOOL FULL: {e}; walsafe stops reading WAL from PostgreSQL until uploads{behind} free room (the server keeps it in the replication slot, up to max_slot_wal_keep_size) and goes on by itself; free space or raise [spool] max_size"
                    );
                    crate::metrics::set_spool_full(true);
                    full_since = Some(Instant::now());
                }
                if w.written() > w.flushed() {
                    flush_and_publish(w, timeline, publisher)?;
                }
                if rx.is_closed() {
                    tracing::warn!(
                        "stopping with WAL from {} that did not fit in the full spool; it was never acknowledged and is streamed again at the next start",
                        w.written()
                    );
                    return Ok(false);
                }
                std::thread::sleep(backoff.next_delay());
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Group commit, then the news, in the order the module doc promises.
fn flush_and_publish(
    w: &mut SpoolWriter,
    timeline: TimelineId,
    publisher: &Publisher,
) -> anyhow::Result<()> {
    let f = w.flush()?;
    for seg in f.completed {
        publisher.event(SpoolEvent::Completed(seg));
    }
    publisher.durable(Durable {
        timeline,
        flushed: f.flushed,
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::durable::Fsync;
    use crate::spool::Spool;

    const SEG: u64 = 1 << 20;

    #[cfg_attr(
        not(feature = "failpoints"),
        ignore = "needs the failpoints feature: run scripts/test.sh, or cargo test --features failpoints"
    )]
    #[tokio::test]
    async fn after_a_failed_fsync_the_durable_position_stays_at_the_last_good_flush() {
        let _scenario = fail::FailScenario::setup();
        let d = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(d.path(), SEG, Fsync::On).unwrap();
        let (publisher, mut feed) = feed(Durable::default());
        let writer = WriterHandle::start(spool.writer(), publisher, Positions::default());
        let t = TimelineId(1);
        let start = Lsn(3 * SEG);
        writer
            .write(t, start, Bytes::from(vec![1u8; 4096]))
            .await
            .unwrap();
        let good = start.plus(4096);
        let mut durable = writer.durable();
        durable.wait_for(|d| d.flushed == good).await.unwrap();
        fail::cfg("durable::sync_data", "return(EIO)").unwrap();
        writer
            .write(t, good, Bytes::from(vec![2u8; 4096]))
            .await
            .unwrap();
        // The thread stops; the watch closes without ever passing `good`.
        while durable.changed().await.is_ok() {
            assert_eq!(durable.borrow().flushed, good);
        }
        assert_eq!(durable.borrow().flushed, good);
        let later = good.plus(4096);
        let e = loop {
            if let Err(e) = writer.write(t, later, Bytes::from(vec![3u8; 8])).await {
                break e;
            }
        };
        assert!(e.to_string().contains("spool writer stopped"), "{e}");
        assert!(writer.finish().await.is_err());
        // No completion was announced either.
        while let Ok(ev) = feed.events.try_recv() {
            assert!(!matches!(ev, SpoolEvent::Completed(_)), "{ev:?}");
        }
    }
}
