//! The single writer of the spool: WAL in, segment files out, `flushed`
//! moved only by a group commit (see the invariants in [`super`]).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{format_hint, partial_name, Limits, Shared, SpoolError, FLUSHED_HINT_FILE, ZERO_CHUNK};
use crate::durable::{self, Fsync};
use crate::pg::walfile::history_file_name;
use crate::pg::{Lsn, SegmentName, TimelineId};

/// Result of a group commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flushed {
    /// End of WAL now durable on the writer's timeline.
    pub flushed: Lsn,
    /// Segments that became complete (renamed), in order.
    pub completed: Vec<SegmentName>,
}

/// A segment file the writer has open.
struct OpenSegment {
    name: SegmentName,
    path: PathBuf,
    file: File,
    /// Written since the last fdatasync.
    dirty: bool,
}

/// The single writer of the spool. Owns the positions:
///
/// * `written`: end of WAL handed to the kernel on the writer's timeline
///   (lost on a power cut);
/// * `flushed`: end of WAL fdatasynced, every segment before it complete
///   under its final name. `flushed <= written`. Only `flushed` may be
///   reported to PostgreSQL.
///
/// Dropping the writer without [`flush`](Self::flush) is what a crash
/// does: nothing is lost that was flushed.
pub struct SpoolWriter {
    dir: PathBuf,
    segment_size: u64,
    fsync: Fsync,
    limits: Limits,
    shared: Arc<Shared>,
    /// Timeline of the WAL written; `None` before the first write.
    timeline: Option<TimelineId>,
    /// True before the first write and after [`end_timeline`](Self::end_timeline):
    /// the next write may start at any segment boundary.
    ended: bool,
    written: Lsn,
    flushed: Lsn,
    /// The segment being filled.
    current: Option<OpenSegment>,
    /// Full segments awaiting fdatasync and rename, in order.
    closing: Vec<OpenSegment>,
    /// Set when an fsync or rename failed.
    poisoned: Option<String>,
    /// The flushed-position hint file, opened at the first flush.
    hint: Option<File>,
}

impl SpoolWriter {
    /// A writer that has written nothing yet (see [`super::Spool::writer`]).
    pub(super) fn new(
        dir: PathBuf,
        segment_size: u64,
        fsync: Fsync,
        limits: Limits,
        shared: Arc<Shared>,
    ) -> Self {
        SpoolWriter {
            dir,
            segment_size,
            fsync,
            limits,
            shared,
            timeline: None,
            ended: true,
            written: Lsn::INVALID,
            flushed: Lsn::INVALID,
            current: None,
            closing: Vec::new(),
            poisoned: None,
            hint: None,
        }
    }

    /// Writes WAL at `start` on `timeline`.
    ///
    /// The first write after open (or after [`end_timeline`](Self::end_timeline))
    /// must start at a segment boundary, or, on the same timeline, at the
    /// written end; later writes must be contiguous. Crossing a segment
    /// boundary moves the full file to the group waiting for the next
    /// [`flush`](Self::flush) (kept open until then) and opens the next one,
    /// pre-sized to `segment_size` with zeros (see the module doc for why).
    ///
    /// On error nothing after [`written`](Self::written) was written; the
    /// caller may retry the rest from there (a full disk is retryable).
    pub fn write(
        &mut self,
        timeline: TimelineId,
        start: Lsn,
        data: &[u8],
    ) -> Result<(), SpoolError> {
        self.check_poisoned()?;
        let seg_size = self.segment_size;
        match self.timeline {
            Some(current) if timeline < current => {
                return Err(SpoolError::TimelineDecreased {
                    current,
                    got: timeline,
                })
            }
            Some(current) if timeline == current && (!self.ended || start == self.written) => {
                if start != self.written {
                    return Err(SpoolError::NotContiguous {
                        expected: self.written,
                        got: start,
                    });
                }
            }
            Some(current)
                if timeline > current && (self.current.is_some() || !self.closing.is_empty()) =>
            {
                return Err(SpoolError::TimelineNotEnded {
                    current,
                    got: timeline,
                })
            }
            _ => {
                // Start-up, a new timeline, or a restart at a boundary.
                if start.segment_offset(seg_size) != 0 {
                    return Err(SpoolError::NotAtSegmentStart {
                        timeline,
                        got: start,
                        segment_start: start.segment_start(seg_size),
                    });
                }
                if self.timeline != Some(timeline) || start != self.written {
                    // A new position: close whatever is open (all flushed
                    // or empty, see the arms above) and start afresh.
                    if let Some(seg) = self.current.take() {
                        self.forget(seg.name);
                    }
                    self.written = start;
                    self.flushed = start;
                }
                self.timeline = Some(timeline);
            }
        }
        self.ended = false;

        let mut pos = start;
        let mut rest = data;
        while !rest.is_empty() {
            let offset = pos.segment_offset(seg_size);
            if self.current.is_none() {
                let seg = SegmentName::containing(timeline, pos, seg_size);
                self.current = Some(self.open_segment(seg, pos)?);
            }
            let cur = self.current.as_mut().expect("opened above");
            let n = rest.len().min((seg_size - offset) as usize);
            let write = || {
                fail::fail_point!("spool::write", |arg| Err(durable::failpoint_error(arg)));
                cur.file.write_all_at(&rest[..n], offset)
            };
            write().map_err(|e| SpoolError::io("write WAL to", &cur.path, e))?;
            cur.dirty = true;
            pos = pos.plus(n as u64);
            rest = &rest[n..];
            self.written = pos;
            if offset + n as u64 == seg_size {
                let full = self.current.take().expect("current segment");
                self.closing.push(full);
            }
        }
        Ok(())
    }

    /// Opens the `.partial` file for `seg`, to write at `at`; creates it,
    /// pre-sized with zeros, when it does not exist.
    fn open_segment(&mut self, seg: SegmentName, at: Lsn) -> Result<OpenSegment, SpoolError> {
        let complete = self.dir.join(seg.file_name(self.segment_size));
        if complete.exists() {
            return Err(SpoolError::AlreadyComplete {
                file: complete,
                start: at,
            });
        }
        let path = self.dir.join(partial_name(seg, self.segment_size));
        let file = match OpenOptions::new().write(true).open(&path) {
            Ok(f) => {
                let len = f
                    .metadata()
                    .map_err(|e| SpoolError::io("stat", &path, e))?
                    .len();
                if len != self.segment_size {
                    return Err(SpoolError::WrongSegmentSize {
                        file: path,
                        size: len,
                        expected: self.segment_size,
                    });
                }
                f
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if at.segment_offset(self.segment_size) != 0 {
                    // Continuing a segment that is gone: nothing to continue.
                    return Err(SpoolError::NotAtSegmentStart {
                        timeline: seg.timeline,
                        got: at,
                        segment_start: at.segment_start(self.segment_size),
                    });
                }
                self.create_presized(&path)?;
                OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|e| SpoolError::io("open", &path, e))?
            }
            Err(e) => return Err(SpoolError::io("open", &path, e)),
        };
        self.shared.open_set().insert(seg);
        Ok(OpenSegment {
            name: seg,
            path,
            file,
            dirty: false,
        })
    }

    /// Creates `path` full-size and zero-filled, durably: temp file, zeros,
    /// fsync, rename, fsync directory. A crash leaves at most a temp file.
    fn create_presized(&self, path: &Path) -> Result<(), SpoolError> {
        self.limits
            .check(&self.dir, self.segment_size)
            .map_err(|reason| SpoolError::Full {
                dir: self.dir.clone(),
                reason,
            })?;
        let tmp = durable::temp_path_for(path);
        let result = (|| {
            let f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| SpoolError::io("create", &tmp, e))?;
            let zeros = vec![0u8; ZERO_CHUNK];
            let mut off = 0u64;
            while off < self.segment_size {
                let n = (self.segment_size - off).min(ZERO_CHUNK as u64) as usize;
                let presize = || {
                    fail::fail_point!("spool::presize", |arg| Err(durable::failpoint_error(arg)));
                    f.write_all_at(&zeros[..n], off)
                };
                presize().map_err(|e| SpoolError::io("pre-size (zero-fill)", &tmp, e))?;
                off += n as u64;
            }
            drop(f);
            self.fsync
                .durable_rename(&tmp, path)
                .map_err(|e| SpoolError::io("durably rename into place", &tmp, e))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    fn forget(&self, seg: SegmentName) {
        self.shared.open_set().remove(&seg);
    }

    fn check_poisoned(&self) -> Result<(), SpoolError> {
        match &self.poisoned {
            Some(reason) => Err(SpoolError::Poisoned {
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    fn poison(&mut self, e: SpoolError) -> SpoolError {
        self.poisoned = Some(e.to_string());
        e
    }

    /// Group commit: fdatasyncs every file written since the last flush,
    /// then durably renames the completed segments to their final names, in
    /// order. Returns the new flushed end and the segments completed.
    ///
    /// A failure poisons the writer (every later call fails): after a failed
    /// fsync the kernel may have dropped the dirty pages, and retrying would
    /// report WAL as durable that is not. Restart and re-stream instead.
    pub fn flush(&mut self) -> Result<Flushed, SpoolError> {
        self.check_poisoned()?;
        let mut failure = None;
        for seg in self.closing.iter_mut().chain(self.current.as_mut()) {
            if seg.dirty {
                if let Err(e) = self.fsync.sync_data(&seg.file) {
                    failure = Some(SpoolError::io("fdatasync", &seg.path, e));
                    break;
                }
                seg.dirty = false;
            }
        }
        if let Some(err) = failure {
            return Err(self.poison(err));
        }
        let mut completed = Vec::with_capacity(self.closing.len());
        let mut closing = std::mem::take(&mut self.closing).into_iter();
        while let Some(OpenSegment {
            name, path, file, ..
        }) = closing.next()
        {
            drop(file);
            let to = self.dir.join(name.file_name(self.segment_size));
            let renamed = self.fsync.durable_rename(&path, &to);
            self.forget(name);
            if let Err(e) = renamed {
                for rest in closing {
                    self.forget(rest.name);
                }
                let err = SpoolError::io("durably rename the complete segment", &path, e);
                return Err(self.poison(err));
            }
            completed.push(name);
        }
        self.flushed = self.written;
        self.write_hint();
        Ok(Flushed {
            flushed: self.flushed,
            completed,
        })
    }

    /// Records `flushed` in the hint file (best effort: a failure only
    /// means a restart without a server ships less).
    fn write_hint(&mut self) {
        let Some(t) = self.timeline else { return };
        if self.hint.is_none() {
            let path = self.dir.join(FLUSHED_HINT_FILE);
            match OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
            {
                Ok(f) => self.hint = Some(f),
                Err(e) => {
                    tracing::warn!("cannot open {}: {e}", path.display());
                    return;
                }
            }
        }
        if let Some(f) = &self.hint {
            let _ = f.write_at(format_hint(t, self.flushed).as_bytes(), 0);
        }
    }

    /// Writes the history file of timeline `tli` durably (temp file, fsync,
    /// rename).
    pub fn write_history(&mut self, tli: TimelineId, content: &[u8]) -> Result<(), SpoolError> {
        let path = self.dir.join(history_file_name(tli));
        self.fsync
            .write_atomically(&path, content, 0o600)
            .map_err(|e| SpoolError::io("write the history file", &path, e))
    }

    /// End of WAL handed to the kernel (`0/0` before the first write).
    pub fn written(&self) -> Lsn {
        self.written
    }

    /// End of WAL durable in the spool (`0/0` before the first write).
    pub fn flushed(&self) -> Lsn {
        self.flushed
    }

    /// The timeline being written, once something was.
    pub fn timeline(&self) -> Option<TimelineId> {
        self.timeline
    }

    /// End of a timeline: flushes, then closes the open segment, which stays
    /// `.partial` (the switch point lies inside it), and returns it. The next
    /// write may start a new timeline at a segment boundary.
    ///
    /// The closed file is zeroed from the written end (the switch point) to
    /// its end and fdatasynced, so that it holds exactly this timeline's WAL
    /// even where an earlier run had written further (WAL the old primary
    /// sent past the point where the new timeline forked off).
    ///
    /// Call [`flush`](Self::flush) first to learn which segments completed:
    /// the flush done here reports only its position.
    ///
    /// Before the first write of this run, the segment the spool recovered
    /// as unfinished is the one closed (zeroed past its durable end): its
    /// timeline ended before streaming could resume in it.
    pub fn end_timeline(&mut self) -> Result<Option<SegmentName>, SpoolError> {
        self.flush()?;
        self.ended = true;
        let seg = match self.current.take() {
            Some(seg) => seg,
            None if self.timeline.is_none() => return self.close_unfinished(),
            None => return Ok(None),
        };
        self.forget(seg.name);
        let end = self.written.segment_offset(self.segment_size);
        self.zero_tail(&seg.file, &seg.path, end)?;
        Ok(Some(seg.name))
    }

    /// Closes the segment the spool recovered as unfinished (see
    /// [`end_timeline`](Self::end_timeline)).
    fn close_unfinished(&mut self) -> Result<Option<SegmentName>, SpoolError> {
        let taken = self
            .shared
            .unfinished
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some((name, end)) = taken else {
            return Ok(None);
        };
        let path = self.dir.join(partial_name(name, self.segment_size));
        let file = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|e| SpoolError::io("open", &path, e))?;
        let from = end.bytes_after(name.start_lsn(self.segment_size));
        self.zero_tail(&file, &path, from.min(self.segment_size))?;
        Ok(Some(name))
    }

    /// Zeroes `file` from `off` to the segment's end and fdatasyncs it.
    fn zero_tail(&mut self, file: &File, path: &Path, mut off: u64) -> Result<(), SpoolError> {
        let zeros = vec![0u8; ZERO_CHUNK];
        while off < self.segment_size {
            let n = (self.segment_size - off).min(ZERO_CHUNK as u64) as usize;
            file.write_all_at(&zeros[..n], off)
                .map_err(|e| SpoolError::io("zero the tail of", path, e))?;
            off += n as u64;
        }
        if let Err(e) = self.fsync.sync_data(file) {
            let err = SpoolError::io("fdatasync", path, e);
            return Err(self.poison(err));
        }
        Ok(())
    }
}

impl Drop for SpoolWriter {
    fn drop(&mut self) {
        let names: Vec<SegmentName> = self
            .closing
            .iter()
            .chain(self.current.as_ref())
            .map(|s| s.name)
            .collect();
        for n in names {
            self.forget(n);
        }
        self.shared.writer_alive.store(false, Ordering::Release);
    }
}
