//! The spool: a crash-safe local copy of the WAL stream, the first durable
//! home of every byte walsafe receives.
//!
//! # What it owns
//!
//! One directory, holding WAL in PostgreSQL's own file naming, so that an
//! operator (or `pg_waldump`, or a restore done by hand) can read it
//! directly. The receive loop writes into it through the single
//! [`SpoolWriter`]; the uploader reads from it ([`Spool::read_range`],
//! [`Spool::read_complete`]) and removes what the repository has stored.
//! The spool is what makes the `flush` position reported to PostgreSQL
//! honest (data-safety rule 1) and what a restart resumes from (rule 6).
//!
//! # Words
//!
//! * **filling segment**: the segment the writer is writing, a `.partial`
//!   file that will become complete;
//! * **closed partial**: a `.partial` that will never grow again (a
//!   timeline ended inside it, or WAL after it was lost); shipped as
//!   `wal/<name>.partial`;
//! * **chunk**: the bytes of the filling segment fsynced since the last
//!   chunk, shipped every `[archive] partial_interval` (a contract key,
//!   hence its name) as `chunks/<name>/<start>-<end>`.
//!
//! # Directory format
//!
//! ```text
//! <[spool] dir>/
//!   walsafe.lock                       flock()ed by the running agent; holds its pid (text)
//!   backup.lock                        flock()ed by a running `walsafe backup` (one at a time)
//!   000000010000000A000000FD           complete segment: segment_size bytes, all fsynced
//!   000000010000000A000000FE.partial   segment being filled (pre-sized, zero-filled)
//!   000000010000000A000000FC.partial   closed end of an older timeline (switch point inside)
//!   00000002.history                   timeline history, written atomically
//!   walsafe.flushed                    hint: "<TLI 8 hex> <LSN 16 hex>\n", the last flushed end
//!   .<name>.walsafe-tmp.<pid>.<n>      temp file (pre-size, history); removed at open
//!
//! struct SegmentFile {                 // both complete and .partial
//!     wal: [u8; segment_size],         // byte i = WAL at segment_start + i, as PostgreSQL wrote it
//! }                                    // (a .partial: WAL up to the written end, zeros after)
//! ```
//!
//! # Invariants
//!
//! * A segment file is written from offset 0, contiguously. Past the
//!   written end, a `.partial` holds zeros (pre-size) or, after a crash,
//!   the previous run's unflushed bytes until re-streaming overwrites them;
//!   only bytes before `flushed` are ever read for upload. A closed
//!   `.partial` (end of a timeline) is zeroed past the switch point.
//! * Every segment file, complete or `.partial`, is exactly `segment_size`
//!   bytes long: a `.partial` is born full-size and zero-filled under a
//!   temporary name and durably renamed into place, so a crash during
//!   pre-sizing leaves only a temp file. [`Spool::open`] refuses a directory
//!   with segment files of another size (another cluster's spool).
//! * A complete name exists only after its bytes were fsynced:
//!   [`SpoolWriter::flush`] fdatasyncs first and then renames
//!   (`durable_rename`: fsync, rename, fsync directory), in segment order.
//! * Only `flushed` is reported. `written` (handed to the kernel) and
//!   `flushed` (fdatasynced, and every completed segment before it renamed)
//!   are distinct; [`SpoolWriter::flush`] is the only thing that moves
//!   `flushed`, and it never moves it past `written`.
//! * One agent per spool (the lock), one writer per agent
//!   ([`Spool::writer`] panics on a second live writer), used from one
//!   thread.
//! * The writer never creates a file whose complete name already exists
//!   (WAL already spooled is never silently rewritten).
//!
//! # Crash and restart
//!
//! After `kill -9` or a power cut, [`Spool::open`]:
//!
//! 1. takes the lock (the dead process's flock died with it);
//! 2. removes temp files (an interrupted pre-size or history write);
//! 3. lists complete segments (durable by construction: upload them),
//!    `.partial` files and history files;
//! 4. computes where streaming resumes. On the newest timeline, the
//!    `.partial` files form the unfinished run (normally one; several when
//!    the crash hit between crossing a segment boundary and the next group
//!    commit). The tail of a `.partial` cannot be trusted after a power cut
//!    (it was pre-sized, so its length says nothing, and fdatasync may not
//!    have run), so like `pg_receivewal` we re-stream the first of them
//!    from offset 0 and overwrite it with the same bytes. The later ones
//!    hold only WAL that was never reported as flushed (a flush renames
//!    segments in order before it reports), so they are removed. A
//!    `.partial` closed at a recorded gap (the segment holding the gap's
//!    start, see [`gaps`]) is a closed partial, not part of the run: WAL
//!    after the gap may be flushed and acknowledged in later segments.
//!    With no unfinished `.partial` on the newest timeline, streaming
//!    resumes at the end of its newest complete segment, or after the
//!    newest gap, whichever is later.
//!
//! The `walsafe.flushed` hint is rewritten in place (one `pwrite`, no
//! fsync) after every group commit. It is never ahead of durable WAL: it is
//! written only after the fdatasync it describes, so whatever version of it
//! survives a crash names WAL that was fsynced. It lets a restarted agent
//! ship the durable part of the unfinished `.partial` before any server is
//! reachable (after a disaster, that part may be the only copy of the last
//! commits); streaming itself still re-starts at the segment's offset 0.
//!
//! The slot's restart position is never ahead of what we reported flushed,
//! and the server keeps the whole segment holding it, so re-streaming a
//! segment from its start is always possible.
//!
//! # Why pre-size by writing zeros (not `posix_fallocate`, not growing)
//!
//! Measured on this project's machines (ext4, 16 MiB segment, 8 KiB
//! pwrite + fdatasync, 1500 rounds, three runs on a shared VM): fdatasync
//! into a zero-filled file took p50 0.15–3.7 ms, into a `posix_fallocate`d
//! file 0.26–3.8 ms, into a growing file 0.24–4.0 ms; in the quiet run zero
//! fill was about 1.7× faster than both (0.15 vs 0.26 ms). An fallocated
//! extent is "unwritten": the first write into each block must also commit
//! a metadata change to the journal at fdatasync time, as must every size
//! change of a growing file; a zero-filled file only flushes data. Zero fill
//! costs one 16 MiB write per segment (15–75 ms here), paid when the writer
//! enters a new segment, which PostgreSQL also pays (`wal_init_zero`) and
//! `pg_receivewal` too. A second reason: once a segment is pre-sized, writes
//! into it cannot fail with ENOSPC on a non-copy-on-write filesystem, so a
//! full disk shows up only when a new segment is created, where the writer
//! can stop cleanly (the temp file is removed, nothing moved) and be retried.

pub mod gaps;
pub mod inspect;
pub mod retention;
mod thread;
mod writer;

pub use thread::{feed, feeds, Durable, Feed, Publisher, SpoolEvent, WritePermit, WriterHandle};
pub use writer::{Flushed, SpoolWriter};

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::durable::Fsync;
use crate::pg::walfile::{history_file_name, is_valid_segment_size};
use crate::pg::{Lsn, SegmentName, TimelineId, WalFileName};

/// Name of the lock file inside the spool directory.
pub const LOCK_FILE: &str = "walsafe.lock";
/// Name of the flushed-position hint inside the spool directory.
pub const FLUSHED_HINT_FILE: &str = "walsafe.flushed";

pub(crate) fn format_hint(t: TimelineId, lsn: Lsn) -> String {
    format!("{:08X} {:016X}\n", t.0, lsn.0)
}

fn parse_hint(text: &str) -> Option<(TimelineId, Lsn)> {
    let (t, l) = text.trim().split_once(' ')?;
    let t = u32::from_str_radix(t, 16).ok().filter(|t| *t > 0)?;
    Some((TimelineId(t), Lsn(u64::from_str_radix(l, 16).ok()?)))
}

/// Marker in the names of temp files made by [`crate::durable::temp_path_for`].
const TEMP_MARKER: &str = ".walsafe-tmp.";

/// Size of the zero buffer used to pre-size segments.
pub(crate) const ZERO_CHUNK: usize = 1 << 20;

/// Errors of the spool.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// Another process holds the spool's lock: two agents must never write
    /// the same spool.
    #[error(
        "spool {} is in use by another walsafe (pid {}); stop it or set a different [spool] dir",
        dir.display(),
        pid.map_or_else(|| "unknown".to_string(), |p| p.to_string())
    )]
    Locked { dir: PathBuf, pid: Option<u32> },

    /// A filesystem operation failed (see [`SpoolError::is_disk_full`]).
    #[error("could not {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A write did not continue where the previous one ended.
    #[error("WAL written to the spool at {got} does not continue the previous write, which ended at {expected}; the stream skipped or repeated bytes")]
    NotContiguous { expected: Lsn, got: Lsn },

    /// The first write after start-up or a timeline switch did not start
    /// at a segment boundary (nor at the written end).
    #[error("WAL for timeline {timeline} must start at a segment boundary after start-up or a timeline switch, but started at {got}; start streaming at {segment_start}")]
    NotAtSegmentStart {
        timeline: TimelineId,
        got: Lsn,
        segment_start: Lsn,
    },

    /// A WAL file in the spool directory is not `segment_size` bytes long.
    #[error("spool file {} is {size} bytes, but WAL segments of this cluster are {expected} bytes; does [spool] dir belong to another cluster? move the file away and restart", file.display())]
    WrongSegmentSize {
        file: PathBuf,
        size: u64,
        expected: u64,
    },

    /// The writer was asked to write a segment that is already complete.
    #[error("the spool already holds the complete segment {}; refusing to write it again (at {start}); streaming must resume after it", file.display())]
    AlreadyComplete { file: PathBuf, start: Lsn },

    /// WAL of a lower timeline after a higher one.
    #[error("WAL of timeline {got} cannot follow timeline {current} in the spool; timelines only increase")]
    TimelineDecreased {
        current: TimelineId,
        got: TimelineId,
    },

    /// WAL of a new timeline while the old one still has an open segment.
    #[error("WAL of timeline {got} arrived while timeline {current} still has an open segment in the spool; end the old timeline first")]
    TimelineNotEnded {
        current: TimelineId,
        got: TimelineId,
    },

    /// An earlier fsync or rename failed; after a failed fsync the kernel
    /// may have dropped the dirty pages, so nothing written since the last
    /// good flush can be trusted.
    #[error("the spool writer stopped after an earlier failure ({reason}); restart walsafe: it resumes from what is durable and re-streams the rest")]
    Poisoned { reason: String },

    /// A new segment would break the spool's limits (`[spool] max_size`,
    /// `[spool] min_free`): treated like a full disk (backpressure, retry).
    #[error("the spool {} has no room for another segment: {reason}", dir.display())]
    Full { dir: PathBuf, reason: String },

    /// The segment size is not one PostgreSQL allows.
    #[error("{size} bytes is not a WAL segment size PostgreSQL supports (a power of two from 1 MiB to 1 GiB)")]
    InvalidSegmentSize { size: u64 },
}

impl SpoolError {
    fn io(op: &'static str, path: &Path, source: io::Error) -> Self {
        SpoolError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    /// The filesystem is full (ENOSPC) or the quota is exhausted (EDQUOT):
    /// stop reading from the server (backpressure), alarm, retry later.
    pub fn is_disk_full(&self) -> bool {
        match self {
            SpoolError::Full { .. } => true,
            SpoolError::Io { source, .. } => matches!(
                source.raw_os_error(),
                Some(libc::ENOSPC) | Some(libc::EDQUOT)
            ),
            _ => false,
        }
    }

    /// Whether the same operation may succeed later without a restart:
    /// a full disk (space may be freed) or a lock held by another agent
    /// (it may stop). Everything else is permanent or needs a restart.
    pub fn is_retryable(&self) -> bool {
        self.is_disk_full() || matches!(self, SpoolError::Locked { .. })
    }
}

/// How much room the spool may take (see [`Spool::with_limits`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// The spool's files never add up to more than this.
    pub max_size: Option<u64>,
    /// Free space of the spool's filesystem to leave for others (PostgreSQL
    /// among them, when it shares the disk). Checked whenever a new segment
    /// file is made.
    pub min_free: MinFree,
}

/// Free space to leave on the spool's filesystem.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MinFree {
    /// 5 % of the filesystem, at most 1 GiB: a margin for PostgreSQL and
    /// the system when the spool shares their disk, without holding back
    /// hundreds of gigabytes of a large one.
    Default,
    /// A fraction of the filesystem's size (0.05 = 5 %).
    Fraction(f64),
    /// A number of bytes.
    Bytes(u64),
}

/// The default: no size cap, keep 5 % of the filesystem (at most 1 GiB) free.
pub const DEFAULT_LIMITS: Limits = Limits {
    max_size: None,
    min_free: MinFree::Default,
};

impl Default for Limits {
    fn default() -> Self {
        DEFAULT_LIMITS
    }
}

impl Limits {
    /// Whether a new segment of `segment_size` bytes fits in `dir`; `Err`
    /// says why not. A filesystem that cannot be asked counts as roomy:
    /// the write itself will then say ENOSPC if it must.
    pub fn check(&self, dir: &Path, segment_size: u64) -> Result<(), String> {
        if let Some(max) = self.max_size {
            let used = usage_bytes_of(dir).unwrap_or(0);
            if used + segment_size > max {
                return Err(format!(
                    "it holds {used} bytes and another segment would pass [spool] max_size ({max} bytes)"
                ));
            }
        }
        if let Ok(st) = nix::sys::statvfs::statvfs(dir) {
            let frag = st.fragment_size();
            let total = st.blocks() * frag;
            let free = st.blocks_available() * frag;
            let keep = match self.min_free {
                MinFree::Default => ((total as f64 * 0.05) as u64).min(1 << 30),
                MinFree::Fraction(f) => (total as f64 * f) as u64,
                MinFree::Bytes(b) => b,
            };
            if free < keep + segment_size {
                return Err(format!(
                    "{free} bytes are free on its filesystem, and [spool] min_free keeps {keep} bytes free"
                ));
            }
        }
        Ok(())
    }
}

/// What [`Spool::open`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Sorted; complete segments awaiting upload.
    pub complete: Vec<SegmentName>,
    /// Sorted; every `.partial` file. The one at `resume` (if any) is the
    /// segment streaming continues in; the others are closed ends of old
    /// timelines.
    pub partials: Vec<SegmentName>,
    /// Sorted; timelines with a `.history` file.
    pub histories: Vec<TimelineId>,
    /// Where streaming resumes: the start of the newest timeline's unfinished
    /// `.partial` segment (its tail cannot be trusted after a crash; like
    /// `pg_receivewal` we re-stream it from offset 0), else the end of the
    /// newest complete segment. `None` for an empty spool.
    pub resume: Option<(TimelineId, Lsn)>,
    /// The last flushed end the writer recorded (see the module doc); never
    /// ahead of durable WAL, possibly behind it.
    pub flushed_hint: Option<(TimelineId, Lsn)>,
}

impl Recovered {
    /// What the spool holds durably, as far as it can tell before the writer
    /// runs: the flushed hint when it lies in the segment streaming resumes
    /// in, else the resume position (start of that segment, or the end of
    /// the newest complete one).
    pub fn durable(&self, segment_size: u64) -> Durable {
        let Some((t, resume)) = self.resume else {
            return Durable::default();
        };
        let seg = SegmentName::containing(t, resume, segment_size);
        let flushed = match self.flushed_hint {
            Some((ht, hint))
                if ht == t
                    && hint > resume
                    && SegmentName::containing(t, hint, segment_size) == seg =>
            {
                hint
            }
            _ => resume,
        };
        Durable {
            timeline: t,
            flushed,
        }
    }

    /// The `.partial` files that are closed (everything but the segment
    /// streaming resumes in).
    pub fn closed_partials(&self, segment_size: u64) -> Vec<SegmentName> {
        let live = self
            .resume
            .map(|(t, l)| SegmentName::containing(t, l, segment_size));
        self.partials
            .iter()
            .copied()
            .filter(|p| Some(*p) != live)
            .collect()
    }
}

/// State shared by the spool and its writer.
#[derive(Default)]
pub(crate) struct Shared {
    /// A [`SpoolWriter`] is alive.
    pub(crate) writer_alive: AtomicBool,
    /// `.partial` files the writer has open (may not be removed).
    pub(crate) open: Mutex<BTreeSet<SegmentName>>,
    /// The segment streaming resumes in after a restart, and the end of
    /// its durable WAL: if its timeline ends before anything is written
    /// (a failover found at start-up), the writer closes it.
    pub(crate) unfinished: Mutex<Option<(SegmentName, Lsn)>>,
}

impl Shared {
    pub(crate) fn open_set(&self) -> std::sync::MutexGuard<'_, BTreeSet<SegmentName>> {
        // A panic while holding this lock cannot leave the set inconsistent.
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The spool directory, locked for this process.
pub struct Spool {
    dir: PathBuf,
    segment_size: u64,
    /// Whether the spool really fsyncs ([`Fsync::Off`] only in tests).
    fsync: Fsync,
    /// How much room it may take.
    limits: Limits,
    shared: Arc<Shared>,
    /// Holds the flock for as long as the spool is open.
    _lock: File,
}

pub(crate) fn partial_name(seg: SegmentName, segment_size: u64) -> String {
    format!("{}.partial", seg.file_name(segment_size))
}

fn with_path(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("cannot {what} {}: {e}", path.display()))
}

impl Spool {
    /// Opens (creating it durably if needed) and locks the spool directory,
    /// cleans up after a crash and reports what is there.
    pub fn open(
        dir: &Path,
        segment_size: u64,
        fsync: Fsync,
    ) -> Result<(Spool, Recovered), SpoolError> {
        if !is_valid_segment_size(segment_size) {
            return Err(SpoolError::InvalidSegmentSize { size: segment_size });
        }
        fsync
            .create_dir_all(dir)
            .map_err(|e| SpoolError::io("create the spool directory", dir, e))?;
        let lock = lock_dir(dir)?;
        let spool = Spool {
            dir: dir.to_path_buf(),
            segment_size,
            fsync,
            limits: DEFAULT_LIMITS,
            shared: Arc::new(Shared::default()),
            _lock: lock,
        };
        let recovered = spool.recover()?;
        if let Some((t, l)) = recovered.resume {
            let seg = SegmentName::containing(t, l, segment_size);
            if recovered.partials.contains(&seg) {
                let end = recovered.durable(segment_size).flushed;
                *spool
                    .shared
                    .unfinished
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = Some((seg, end));
            }
        }
        Ok((spool, recovered))
    }

    fn recover(&self) -> Result<Recovered, SpoolError> {
        let dir = &self.dir;
        let seg_size = self.segment_size;
        let mut complete = Vec::new();
        let mut partials = Vec::new();
        let mut histories = Vec::new();
        let entries = std::fs::read_dir(dir).map_err(|e| SpoolError::io("list", dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| SpoolError::io("list", dir, e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let path = entry.path();
            if name.starts_with('.') && name.contains(TEMP_MARKER) {
                self.fsync
                    .durable_remove(&path)
                    .map_err(|e| SpoolError::io("remove the leftover temp file", &path, e))?;
                tracing::info!(file = %path.display(), "removed a leftover temp file from the spool");
                continue;
            }
            let Some(wal_name) = WalFileName::parse(name, seg_size) else {
                if name != LOCK_FILE {
                    tracing::debug!(file = %path.display(), "ignoring a file that is not WAL");
                }
                continue;
            };
            let meta = entry
                .metadata()
                .map_err(|e| SpoolError::io("stat", &path, e))?;
            if !meta.is_file() {
                continue;
            }
            match wal_name {
                WalFileName::Segment(s) | WalFileName::Partial(s) => {
                    if meta.len() != seg_size {
                        return Err(SpoolError::WrongSegmentSize {
                            file: path,
                            size: meta.len(),
                            expected: seg_size,
                        });
                    }
                    if matches!(wal_name, WalFileName::Segment(_)) {
                        complete.push(s);
                    } else {
                        partials.push(s);
                    }
                }
                WalFileName::History(t) => histories.push(t),
            }
        }
        complete.sort();
        partials.sort();
        histories.sort();

        // The newest timeline holding any segment decides where we resume.
        let newest_tli = complete.iter().chain(&partials).map(|s| s.timeline).max();
        let mut resume = None;
        if let Some(t) = newest_tli {
            let last_complete = complete.iter().filter(|s| s.timeline == t).max().copied();
            // A segment closed at a recorded gap is a closed partial, not
            // part of the unfinished run: streaming went on after the gap.
            let gaps = gaps::load(dir);
            let gap_closing = |p: &SegmentName| {
                gaps.iter().find(|g| {
                    g.timeline == p.timeline
                        && g.from.segment_offset(seg_size) != 0
                        && SegmentName::containing(g.timeline, g.from, seg_size) == *p
                })
            };
            let after_gap = partials
                .iter()
                .filter(|p| p.timeline == t && last_complete.is_none_or(|c| p.segno > c.segno))
                .filter_map(|p| gap_closing(p).map(|g| g.to))
                .max();
            let unfinished: Vec<SegmentName> = partials
                .iter()
                .filter(|p| p.timeline == t && last_complete.is_none_or(|c| p.segno > c.segno))
                .filter(|p| gap_closing(p).is_none())
                .copied()
                .collect();
            if let Some(first) = unfinished.first() {
                resume = Some((t, first.start_lsn(seg_size)));
                // The rest of the run holds only WAL never reported flushed.
                for later in &unfinished[1..] {
                    let path = dir.join(partial_name(*later, seg_size));
                    self.fsync
                        .durable_remove(&path)
                        .map_err(|e| SpoolError::io("remove the unflushed segment", &path, e))?;
                    tracing::info!(file = %path.display(), "removed a segment that was never flushed; it will be re-streamed");
                    partials.retain(|p| p != later);
                }
            } else {
                resume = last_complete
                    .map(|c| c.end_lsn(seg_size))
                    .max(after_gap)
                    .map(|l| (t, l));
            }
        }
        let flushed_hint = std::fs::read_to_string(dir.join(FLUSHED_HINT_FILE))
            .ok()
            .and_then(|t| parse_hint(&t));
        Ok(Recovered {
            complete,
            partials,
            histories,
            resume,
            flushed_hint,
        })
    }

    /// The same spool, taking at most the room `limits` allow.
    pub fn with_limits(mut self, limits: Limits) -> Spool {
        self.limits = limits;
        self
    }

    /// The spool directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The WAL segment size of the cluster this spool holds.
    pub fn segment_size(&self) -> u64 {
        self.segment_size
    }

    /// The one writer of this spool, to be used from one dedicated thread.
    ///
    /// # Panics
    ///
    /// If another [`SpoolWriter`] of this spool is still alive: two writers
    /// would break every invariant of this module.
    pub fn writer(&self) -> SpoolWriter {
        let was = self.shared.writer_alive.swap(true, Ordering::AcqRel);
        assert!(
            !was,
            "a SpoolWriter for {} already exists",
            self.dir.display()
        );
        SpoolWriter::new(
            self.dir.clone(),
            self.segment_size,
            self.fsync,
            self.limits,
            self.shared.clone(),
        )
    }

    /// Path of a complete segment file.
    pub fn complete_path(&self, seg: SegmentName) -> PathBuf {
        self.dir.join(seg.file_name(self.segment_size))
    }

    /// Path of a `.partial` segment file.
    pub fn partial_path(&self, seg: SegmentName) -> PathBuf {
        self.dir.join(partial_name(seg, self.segment_size))
    }

    fn history_path(&self, tli: TimelineId) -> PathBuf {
        self.dir.join(history_file_name(tli))
    }

    /// Reads `[start, end)` (offsets inside the segment) of a segment,
    /// whether it is still `.partial` or already complete. The writer may
    /// rename it while we look: it only ever renames `.partial` to complete,
    /// so trying the `.partial` name first and then the complete one cannot
    /// miss it, and an open file keeps reading the same bytes across a
    /// rename. Bytes past the flushed end are not meaningful.
    pub fn read_range(&self, seg: SegmentName, start: u64, end: u64) -> io::Result<Vec<u8>> {
        let (file, path) = self.open_range(seg, start, end)?;
        let mut buf = vec![0u8; (end - start) as usize];
        file.read_exact_at(&mut buf, start)
            .map_err(|e| with_path(e, "read", &path))?;
        Ok(buf)
    }

    /// Opens `seg` to read `[start, end)` of it, as [`Spool::read_range`]
    /// finds it (`.partial` or complete): the file and the path it had.
    pub fn open_range(
        &self,
        seg: SegmentName,
        start: u64,
        end: u64,
    ) -> io::Result<(File, PathBuf)> {
        if start > end || end > self.segment_size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "cannot read [{start}, {end}) of segment {}: a segment has {} bytes",
                    seg.file_name(self.segment_size),
                    self.segment_size
                ),
            ));
        }
        let partial = self.partial_path(seg);
        match File::open(&partial) {
            Ok(f) => Ok((f, partial)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let complete = self.complete_path(seg);
                match File::open(&complete) {
                    Ok(f) => Ok((f, complete)),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!(
                            "segment {} is not in the spool {} (neither complete nor .partial)",
                            seg.file_name(self.segment_size),
                            self.dir.display()
                        ),
                    )),
                    Err(e) => Err(with_path(e, "open", &complete)),
                }
            }
            Err(e) => Err(with_path(e, "open", &partial)),
        }
    }

    /// Reads a complete segment.
    pub fn read_complete(&self, seg: SegmentName) -> io::Result<Vec<u8>> {
        let path = self.complete_path(seg);
        std::fs::read(&path).map_err(|e| with_path(e, "read", &path))
    }

    /// Removes a complete segment, durably (after the repository stored it).
    pub fn remove_complete(&self, seg: SegmentName) -> io::Result<()> {
        let path = self.complete_path(seg);
        self.fsync
            .durable_remove(&path)
            .map_err(|e| with_path(e, "remove", &path))
    }

    /// Removes a closed `.partial` (the end of an old timeline), durably,
    /// after upload. Refuses the segment the writer has open.
    pub fn remove_partial(&self, seg: SegmentName) -> io::Result<()> {
        let path = self.partial_path(seg);
        if self.shared.open_set().contains(&seg) {
            return Err(io::Error::other(format!(
                "cannot remove {}: the spool writer is still filling it",
                path.display()
            )));
        }
        self.fsync
            .durable_remove(&path)
            .map_err(|e| with_path(e, "remove", &path))
    }

    /// Reads a timeline history file.
    pub fn read_history(&self, tli: TimelineId) -> io::Result<Vec<u8>> {
        let path = self.history_path(tli);
        std::fs::read(&path).map_err(|e| with_path(e, "read", &path))
    }

    /// Removes a timeline history file durably.
    pub fn remove_history(&self, tli: TimelineId) -> io::Result<()> {
        let path = self.history_path(tli);
        self.fsync
            .durable_remove(&path)
            .map_err(|e| with_path(e, "remove", &path))
    }

    /// Bytes used by the files in the spool (their lengths; segments are
    /// pre-sized, so a `.partial` counts in full).
    pub fn usage_bytes(&self) -> io::Result<u64> {
        usage_bytes_of(&self.dir)
    }
}

/// Bytes used by the files of a spool directory (for metrics and status,
/// which may look at a spool without opening it).
pub fn usage_bytes_of(dir: &Path) -> io::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).map_err(|e| with_path(e, "list", dir))? {
        let entry = entry.map_err(|e| with_path(e, "list", dir))?;
        match entry.metadata() {
            Ok(m) if m.is_file() => total += m.len(),
            Ok(_) => {}
            // Removed by the uploader while we were listing.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(with_path(e, "stat", &entry.path())),
        }
    }
    Ok(total)
}

/// Takes the spool's lock file (non-blocking) and writes our pid into it.
fn lock_dir(dir: &Path) -> Result<File, SpoolError> {
    let path = dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| SpoolError::io("open the lock file", &path, e))?;
    let locked = fs4::fs_std::FileExt::try_lock_exclusive(&file)
        .map_err(|e| SpoolError::io("lock", &path, e))?;
    if !locked {
        let mut text = String::new();
        let _ = file.read_to_string(&mut text);
        return Err(SpoolError::Locked {
            dir: dir.to_path_buf(),
            pid: text.trim().parse().ok(),
        });
    }
    // The pid is only for the message above: no fsync needed.
    file.set_len(0)
        .and_then(|()| file.write_all_at(format!("{}\n", std::process::id()).as_bytes(), 0))
        .map_err(|e| SpoolError::io("write the pid into", &path, e))?;
    let _ = file.flush();
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u64 = 1 << 20;
    const T1: TimelineId = TimelineId(1);
    const T2: TimelineId = TimelineId(2);

    /// Deterministic "WAL" bytes: a function of the position, so that any
    /// range can be checked and re-written identically.
    fn wal(start: Lsn, len: usize) -> Vec<u8> {
        (0..len as u64)
            .map(|i| {
                let p = start.0 + i;
                (p.wrapping_mul(2_654_435_761) >> 13) as u8 | 1
            })
            .collect()
    }

    fn seg(t: TimelineId, segno: u64) -> SegmentName {
        SegmentName { timeline: t, segno }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    fn open(dir: &Path) -> (Spool, Recovered) {
        Spool::open(dir, SEG, Fsync::On).unwrap()
    }

    #[test]
    fn writes_across_segment_boundaries_and_reads_back_exactly() {
        let d = tempfile::tempdir().unwrap();
        let (spool, rec) = open(d.path());
        assert_eq!(rec, Recovered::default());
        let mut w = spool.writer();
        let start = Lsn(5 * SEG);
        let total = (3 * SEG + 12345) as usize;
        let data = wal(start, total);
        // Pieces of odd sizes, some spanning a whole segment boundary.
        let mut off = 0;
        let mut step = 777usize;
        while off < total {
            let n = step.min(total - off);
            w.write(T1, start.plus(off as u64), &data[off..off + n])
                .unwrap();
            off += n;
            step = (step * 13 + 101) % (SEG as usize + 5000) + 1;
        }
        assert_eq!(w.written(), start.plus(total as u64));
        let f = w.flush().unwrap();
        assert_eq!(f.flushed, start.plus(total as u64));
        assert_eq!(f.completed, vec![seg(T1, 5), seg(T1, 6), seg(T1, 7)]);
        for (i, s) in f.completed.iter().enumerate() {
            let bytes = spool.read_complete(*s).unwrap();
            let o = i * SEG as usize;
            assert_eq!(bytes, &data[o..o + SEG as usize]);
        }
        // The filling segment: its WAL, then the zeros of the pre-size.
        let tail = spool.read_range(seg(T1, 8), 0, SEG).unwrap();
        assert_eq!(&tail[..12345], &data[3 * SEG as usize..]);
        assert!(tail[12345..].iter().all(|&b| b == 0));
        assert_eq!(
            names(d.path()),
            vec![
                "000000010000000000000005",
                "000000010000000000000006",
                "000000010000000000000007",
                "000000010000000000000008.partial",
                "walsafe.flushed",
                "walsafe.lock"
            ]
        );
        assert!(spool.usage_bytes().unwrap() >= 4 * SEG);
    }

    #[test]
    fn complete_names_appear_only_at_flush() {
        let d = tempfile::tempdir().unwrap();
        let (spool, _) = open(d.path());
        let mut w = spool.writer();
        let start = Lsn(0);
        w.write(T1, start, &wal(start, (2 * SEG + 10) as usize))
            .unwrap();
        // Segments 0 and 1 are full, but not fsynced: still .partial.
        assert_eq!(
            names(d.path()),
            vec![
                "000000010000000000000000.partial",
                "000000010000000000000001.partial",
                "000000010000000000000002.partial",
                "walsafe.lock"
            ]
        );
        assert_eq!(w.flushed(), start);
        let f = w.flush().unwrap();
        assert_eq!(f.completed, vec![seg(T1, 0), seg(T1, 1)]);
        assert_eq!(f.flushed, Lsn(2 * SEG + 10));
        assert_eq!(
            names(d.path()),
            vec![
                "000000010000000000000000",
                "000000010000000000000001",
                "000000010000000000000002.partial",
                "walsafe.flushed",
                "walsafe.lock"
            ]
        );
        // A second flush with nothing new completes nothing.
        assert_eq!(w.flush().unwrap().completed, vec![]);
    }

    #[test]
    fn crash_resumes_at_partial_start_and_rewrites_identically() {
        let d = tempfile::tempdir().unwrap();
        let start = Lsn(10 * SEG);
        let all = wal(start, (3 * SEG) as usize);
        {
            let (spool, _) = open(d.path());
            let mut w = spool.writer();
            w.write(T1, start, &all[..(SEG + 500) as usize]).unwrap();
            w.flush().unwrap(); // segment 10 complete, 11 has 500 flushed bytes
                                // Unflushed: the rest of 11 and some of 12, then "kill -9".
            let more = (SEG + 700) as usize;
            w.write(
                T1,
                Lsn(11 * SEG + 500),
                &all[(SEG + 500) as usize..(SEG + 500) as usize + more],
            )
            .unwrap();
            drop(w);
        }
        let (spool, rec) = open(d.path());
        assert_eq!(rec.complete, vec![seg(T1, 10)]);
        // 12.partial held only never-flushed WAL and is gone.
        assert_eq!(rec.partials, vec![seg(T1, 11)]);
        assert_eq!(rec.resume, Some((T1, Lsn(11 * SEG))));
        // The hint names exactly what was flushed, not what was only written.
        assert_eq!(rec.flushed_hint, Some((T1, Lsn(11 * SEG + 500))));
        assert!(rec.closed_partials(SEG).is_empty());
        assert!(!d.path().join("000000010000000000000012.partial").exists());

        let mut w = spool.writer();
        // Not at a boundary: refused.
        assert!(matches!(
            w.write(T1, Lsn(11 * SEG + 500), &[1]),
            Err(SpoolError::NotAtSegmentStart { .. })
        ));
        w.write(T1, Lsn(11 * SEG), &all[SEG as usize..]).unwrap();
        let f = w.flush().unwrap();
        assert_eq!(f.completed, vec![seg(T1, 11), seg(T1, 12)]);
        assert_eq!(
            spool.read_complete(seg(T1, 11)).unwrap(),
            &all[SEG as usize..2 * SEG as usize]
        );
        assert_eq!(
            spool.read_complete(seg(T1, 12)).unwrap(),
            &all[2 * SEG as usize..]
        );
        // Writing a complete segment again is refused.
        drop(w);
        let (spool, rec) = {
            drop(spool);
            open(d.path())
        };
        assert_eq!(rec.resume, Some((T1, Lsn(13 * SEG))));
        let mut w = spool.writer();
        assert!(matches!(
            w.write(T1, Lsn(12 * SEG), &[1]),
            Err(SpoolError::AlreadyComplete { .. })
        ));
    }

    #[test]
    fn end_timeline_leaves_closed_partial_and_new_timeline_starts_at_boundary() {
        let d = tempfile::tempdir().unwrap();
        let (spool, _) = open(d.path());
        let mut w = spool.writer();
        let start = Lsn(4 * SEG);
        let switch = Lsn(5 * SEG + 3000);
        let old = wal(start, (switch.0 - start.0) as usize);
        w.write(T1, start, &old).unwrap();
        w.flush().unwrap();
        assert_eq!(w.end_timeline().unwrap(), Some(seg(T1, 5)));
        // Timeline 2 must begin at a segment boundary.
        assert!(matches!(
            w.write(T2, switch, &[1]),
            Err(SpoolError::NotAtSegmentStart { .. })
        ));
        // The new timeline's copy of the switch segment, from its start.
        let new = wal(Lsn(5 * SEG), 5000);
        w.write(T2, Lsn(5 * SEG), &new).unwrap();
        let f = w.flush().unwrap();
        assert_eq!(f.flushed, Lsn(5 * SEG + 5000));
        assert!(matches!(
            w.write(T1, Lsn(5 * SEG + 5000), &[1]),
            Err(SpoolError::TimelineDecreased { .. })
        ));
        // The closed partial holds the old timeline's WAL, then zeros; it is
        // removable, the open one is not.
        let closed = spool.read_range(seg(T1, 5), 0, SEG).unwrap();
        assert_eq!(&closed[..3000], &old[SEG as usize..]);
        assert!(closed[3000..].iter().all(|&b| b == 0));
        assert!(spool.remove_partial(seg(T2, 5)).is_err());
        drop(w);
        drop(spool);
        let (spool, rec) = open(d.path());
        assert_eq!(rec.complete, vec![seg(T1, 4)]);
        assert_eq!(rec.partials, vec![seg(T1, 5), seg(T2, 5)]);
        assert_eq!(rec.resume, Some((T2, Lsn(5 * SEG))));
        assert_eq!(rec.closed_partials(SEG), vec![seg(T1, 5)]);
        spool.remove_partial(seg(T1, 5)).unwrap();
        assert!(!d.path().join("000000010000000000000005.partial").exists());
    }

    #[test]
    fn a_timeline_ended_right_after_a_restart_closes_the_recovered_segment() {
        // A failover found at start-up: the spool resumes in segment 5 of
        // timeline 1, but the new primary's timeline 2 forked off in
        // segment 4. Nothing was written this run, yet segment 5 must
        // become timeline 1's closed partial, holding what was flushed.
        let d = tempfile::tempdir().unwrap();
        let held = wal(Lsn(4 * SEG), SEG as usize + 3000);
        {
            let (spool, _) = open(d.path());
            let mut w = spool.writer();
            w.write(T1, Lsn(4 * SEG), &held).unwrap();
            w.flush().unwrap();
        }
        let (spool, rec) = open(d.path());
        assert_eq!(rec.resume, Some((T1, Lsn(5 * SEG))));
        let mut w = spool.writer();
        assert_eq!(w.end_timeline().unwrap(), Some(seg(T1, 5)));
        let closed = spool.read_range(seg(T1, 5), 0, SEG).unwrap();
        assert_eq!(&closed[..3000], &held[SEG as usize..]);
        assert!(closed[3000..].iter().all(|&b| b == 0));
        w.write(T2, Lsn(4 * SEG), &wal(Lsn(4 * SEG), 100)).unwrap();
        w.flush().unwrap();
        drop(w);
        drop(spool);
        let (_, rec) = open(d.path());
        assert_eq!(rec.resume, Some((T2, Lsn(4 * SEG))));
        assert_eq!(rec.closed_partials(SEG), vec![seg(T1, 5)]);
    }

    #[test]
    fn end_timeline_zeroes_stale_bytes_past_the_switch_point() {
        let d = tempfile::tempdir().unwrap();
        {
            // An earlier run received WAL past the later switch point.
            let (spool, _) = open(d.path());
            let mut w = spool.writer();
            w.write(T1, Lsn(0), &wal(Lsn(0), 9000)).unwrap();
            w.flush().unwrap();
        }
        let (spool, rec) = open(d.path());
        assert_eq!(rec.resume, Some((T1, Lsn(0))));
        let mut w = spool.writer();
        w.write(T1, Lsn(0), &wal(Lsn(0), 4000)).unwrap();
        assert_eq!(w.end_timeline().unwrap(), Some(seg(T1, 0)));
        let closed = spool.read_range(seg(T1, 0), 0, SEG).unwrap();
        assert_eq!(&closed[..4000], &wal(Lsn(0), 4000)[..]);
        assert!(closed[4000..].iter().all(|&b| b == 0));
    }

    #[test]
    fn new_timeline_without_ending_the_old_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let (spool, _) = open(d.path());
        let mut w = spool.writer();
        w.write(T1, Lsn(0), &[1, 2, 3]).unwrap();
        assert!(matches!(
            w.write(T2, Lsn(SEG), &[1]),
            Err(SpoolError::TimelineNotEnded { .. })
        ));
        assert!(matches!(
            w.write(T1, Lsn(4), &[1]),
            Err(SpoolError::NotContiguous {
                expected: Lsn(3),
                got: Lsn(4)
            })
        ));
    }

    #[test]
    fn same_timeline_may_continue_after_end_timeline() {
        let d = tempfile::tempdir().unwrap();
        let (spool, _) = open(d.path());
        let mut w = spool.writer();
        let data = wal(Lsn(0), 9000);
        w.write(T1, Lsn(0), &data[..4000]).unwrap();
        assert_eq!(w.end_timeline().unwrap(), Some(seg(T1, 0)));
        w.write(T1, Lsn(4000), &data[4000..]).unwrap();
        w.flush().unwrap();
        assert_eq!(spool.read_range(seg(T1, 0), 0, 9000).unwrap(), data);
    }

    #[test]
    fn second_open_fails_with_the_pid() {
        let d = tempfile::tempdir().unwrap();
        let (_spool, _) = open(d.path());
        let e = match Spool::open(d.path(), SEG, Fsync::On) {
            Err(e) => e,
            Ok(_) => panic!("a second open of a locked spool succeeded"),
        };
        assert!(e.is_retryable());
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("(pid {})", std::process::id())),
            "{msg}"
        );
        assert!(
            msg.contains("stop it or set a different [spool] dir"),
            "{msg}"
        );
        assert!(msg.contains(&d.path().display().to_string()), "{msg}");
    }

    #[test]
    fn lock_is_released_when_the_spool_is_dropped() {
        let d = tempfile::tempdir().unwrap();
        let (spool, _) = open(d.path());
        drop(spool);
        open(d.path());
    }

    #[test]
    fn read_range_follows_the_rename() {
        use std::sync::atomic::AtomicU64;
        let d = tempfile::tempdir().unwrap();
        let (spool, _) = open(d.path());
        let spool = Arc::new(spool);
        let flushed = Arc::new(AtomicU64::new(0));
        let mut w = spool.writer();
        let data = Arc::new(wal(Lsn(0), (20 * SEG) as usize));
        let reader = {
            let (spool, data, flushed) = (spool.clone(), data.clone(), flushed.clone());
            std::thread::spawn(move || {
                let mut reads = 0u64;
                for segno in 0..20u64 {
                    let o = (segno * SEG) as usize;
                    while flushed.load(Ordering::Acquire) < o as u64 + 4196 {
                        std::thread::yield_now();
                    }
                    // Read while the writer fills and renames the segment:
                    // every read must find it under one name or the other.
                    loop {
                        let done = spool.complete_path(seg(T1, segno)).exists();
                        let b = spool.read_range(seg(T1, segno), 100, 4196).unwrap();
                        assert!(b == data[o + 100..o + 4196], "segment {segno} differs");
                        reads += 1;
                        if done {
                            break;
                        }
                    }
                }
                reads
            })
        };
        for segno in 0..20u64 {
            let o = (segno * SEG) as usize;
            let mid = o + 8192;
            w.write(T1, Lsn(o as u64), &data[o..mid]).unwrap();
            flushed.store(w.flush().unwrap().flushed.0, Ordering::Release);
            w.write(T1, Lsn(mid as u64), &data[mid..o + SEG as usize])
                .unwrap();
            let f = w.flush().unwrap();
            assert_eq!(f.completed, vec![seg(T1, segno)]);
            flushed.store(f.flushed.0, Ordering::Release);
        }
        assert!(reader.join().unwrap() >= 20);
        let e = spool.read_range(seg(T1, 99), 0, 10).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().contains("000000010000000000000063"), "{e}");
        assert!(spool.read_range(seg(T1, 0), 10, SEG + 1).is_err());
    }

    #[test]
    fn leftover_temp_files_are_removed_and_foreign_sizes_refused() {
        let d = tempfile::tempdir().unwrap();
        let tmp = crate::durable::temp_path_for(&d.path().join("000000010000000000000003.partial"));
        std::fs::write(&tmp, b"half a pre-size").unwrap();
        std::fs::write(d.path().join("README"), b"not WAL").unwrap();
        {
            let (_spool, rec) = open(d.path());
            assert_eq!(rec, Recovered::default());
        }
        assert_eq!(names(d.path()), vec!["README", "walsafe.lock"]);

        std::fs::write(d.path().join("000000010000000000000003"), vec![0u8; 4096]).unwrap();
        match Spool::open(d.path(), SEG, Fsync::On) {
            Err(e @ SpoolError::WrongSegmentSize { .. }) => {
                assert!(e.to_string().contains("000000010000000000000003"), "{e}")
            }
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("a segment of the wrong size was accepted"),
        }
        assert!(matches!(
            Spool::open(d.path(), 3 << 20, Fsync::On),
            Err(SpoolError::InvalidSegmentSize { .. })
        ));
    }

    #[test]
    fn history_files_are_written_durably_and_recovered() {
        let d = tempfile::tempdir().unwrap();
        {
            let (spool, _) = open(d.path());
            let mut w = spool.writer();
            w.write_history(T2, b"1\t0/5000BB8\tno recovery target specified\n")
                .unwrap();
            w.write_history(TimelineId(3), b"x").unwrap();
            assert_eq!(
                spool.read_history(T2).unwrap(),
                b"1\t0/5000BB8\tno recovery target specified\n"
            );
            spool.remove_history(TimelineId(3)).unwrap();
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(d.path().join("00000002.history"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let (_spool, rec) = open(d.path());
        assert_eq!(rec.histories, vec![T2]);
        assert_eq!(rec.resume, None);
        assert_eq!(names(d.path()), vec!["00000002.history", "walsafe.lock"]);
    }

    #[test]
    fn resume_after_only_complete_segments() {
        let d = tempfile::tempdir().unwrap();
        {
            let (spool, _) = open(d.path());
            let mut w = spool.writer();
            w.write(T1, Lsn(2 * SEG), &wal(Lsn(2 * SEG), 2 * SEG as usize))
                .unwrap();
            assert_eq!(w.flush().unwrap().completed.len(), 2);
        }
        let (spool, rec) = open(d.path());
        assert_eq!(rec.resume, Some((T1, Lsn(4 * SEG))));
        assert!(rec.partials.is_empty());
        spool.remove_complete(seg(T1, 2)).unwrap();
        assert!(spool.read_complete(seg(T1, 2)).is_err());
        let mut w = spool.writer();
        w.write(T1, Lsn(4 * SEG), &[7; 10]).unwrap();
        assert_eq!(w.flush().unwrap().flushed, Lsn(4 * SEG + 10));
    }

    #[test]
    #[should_panic(expected = "already exists")]
    fn only_one_writer() {
        let d = tempfile::tempdir().unwrap();
        let (spool, _) = open(d.path());
        let _w = spool.writer();
        let _w2 = spool.writer();
    }

    #[test]
    fn writer_can_be_taken_again_after_drop() {
        let d = tempfile::tempdir().unwrap();
        let (spool, _) = open(d.path());
        drop(spool.writer());
        let mut w = spool.writer();
        w.write(T1, Lsn(0), &[1]).unwrap();
    }

    #[test]
    fn disk_full_is_classified() {
        let e = SpoolError::io(
            "pre-size (zero-fill)",
            Path::new("/x"),
            io::Error::from_raw_os_error(libc::ENOSPC),
        );
        assert!(e.is_disk_full());
        assert!(e.is_retryable());
        assert!(e.to_string().contains("/x"));
        let e = SpoolError::io(
            "write",
            Path::new("/x"),
            io::Error::from_raw_os_error(libc::EIO),
        );
        assert!(!e.is_disk_full());
        assert!(!e.is_retryable());
    }

    #[cfg_attr(
        not(feature = "failpoints"),
        ignore = "needs the failpoints feature: run scripts/test.sh, or cargo test --features failpoints"
    )]
    #[test]
    fn a_failed_fsync_poisons_the_writer_and_nothing_after_it_counts_as_flushed() {
        let _scenario = fail::FailScenario::setup();
        let d = tempfile::tempdir().unwrap();
        let start = Lsn(5 * SEG);
        let good = start.plus(1000);
        {
            let (spool, _) = open(d.path());
            let mut w = spool.writer();
            w.write(T1, start, &wal(start, 1000)).unwrap();
            assert_eq!(w.flush().unwrap().flushed, good);
            fail::cfg("durable::sync_data", "return(EIO)").unwrap();
            w.write(T1, good, &wal(good, 1000)).unwrap();
            let e = w.flush().unwrap_err();
            assert!(e.to_string().contains("fdatasync"), "{e}");
            assert_eq!(w.flushed(), good, "a failed fsync moved flushed");
            // Even once fsync works again: the kernel may have dropped the
            // dirty pages, so the writer must not report them durable.
            fail::cfg("durable::sync_data", "off").unwrap();
            assert!(matches!(w.flush(), Err(SpoolError::Poisoned { .. })));
            let next = good.plus(1000);
            assert!(matches!(
                w.write(T1, next, &wal(next, 10)),
                Err(SpoolError::Poisoned { .. })
            ));
        }
        // What a restart sees: the hint names the last good flush only, and
        // streaming resumes at the segment start (re-streamed from there).
        let (_, rec) = open(d.path());
        assert_eq!(rec.flushed_hint, Some((T1, good)));
        assert_eq!(rec.resume, Some((T1, start)));
    }

    #[cfg_attr(
        not(feature = "failpoints"),
        ignore = "needs the failpoints feature: run scripts/test.sh, or cargo test --features failpoints"
    )]
    #[test]
    fn a_full_disk_while_pre_sizing_leaves_nothing_behind_and_may_be_retried() {
        let _scenario = fail::FailScenario::setup();
        let d = tempfile::tempdir().unwrap();
        let (spool, _) = open(d.path());
        let mut w = spool.writer();
        let start = Lsn(2 * SEG);
        fail::cfg("spool::presize", "return(ENOSPC)").unwrap();
        let e = w.write(T1, start, &wal(start, 100)).unwrap_err();
        assert!(e.is_disk_full(), "{e}");
        assert_eq!(
            names(d.path()),
            vec!["walsafe.lock"],
            "temp file left behind"
        );
        fail::cfg("spool::presize", "off").unwrap();
        w.write(T1, start, &wal(start, 100)).unwrap();
        assert_eq!(w.flush().unwrap().flushed, start.plus(100));
    }

    #[test]
    fn a_segment_closed_at_a_gap_is_not_mistaken_for_the_unfinished_one() {
        let d = tempfile::tempdir().unwrap();
        let x = Lsn(3 * SEG);
        let lost_from = x.plus(5000);
        let y = Lsn(6 * SEG);
        {
            let (spool, _) = open(d.path());
            let mut w = spool.writer();
            w.write(T1, x, &wal(x, 5000)).unwrap();
            w.flush().unwrap();
            // WAL from 3.5000 to 6.0 was lost on the server: the segment is
            // closed, the gap recorded, streaming goes on at the next segment
            // the server still has.
            assert_eq!(w.end_timeline().unwrap(), Some(seg(T1, 3)));
            spool
                .record_gap(&crate::gap::Gap::new(T1, lost_from, y, "test"))
                .unwrap();
            w.write(T1, y, &wal(y, 7000)).unwrap();
            assert_eq!(w.flush().unwrap().flushed, y.plus(7000));
        }
        let (spool, rec) = open(d.path());
        assert_eq!(rec.resume, Some((T1, y)), "{rec:?}");
        assert_eq!(rec.closed_partials(SEG), vec![seg(T1, 3)]);
        // The flushed (acknowledged) WAL after the gap is still there.
        let kept = spool.read_range(seg(T1, 6), 0, 7000).unwrap();
        assert_eq!(kept, wal(y, 7000));
        drop(spool);

        // Crashed right after recording the gap, before streaming went on:
        // resume after the gap, never inside the closed segment.
        let d2 = tempfile::tempdir().unwrap();
        {
            let (spool, _) = open(d2.path());
            let mut w = spool.writer();
            w.write(T1, x, &wal(x, 5000)).unwrap();
            w.flush().unwrap();
            w.end_timeline().unwrap();
            spool
                .record_gap(&crate::gap::Gap::new(T1, lost_from, y, "test"))
                .unwrap();
        }
        let (_s, rec) = open(d2.path());
        assert_eq!(rec.resume, Some((T1, y)), "{rec:?}");
        assert_eq!(rec.closed_partials(SEG), vec![seg(T1, 3)]);
    }
}
