//! fetch: `walsafe wal-fetch NAME DEST`, PostgreSQL's `restore_command`.
//!
//! Contract with PostgreSQL (rules 4 and 7 of README's Guarantees):
//!
//! * exit 0: DEST holds the complete, verified file (temp file, fsync,
//!   rename: recovery never sees a torn file);
//! * exit 1: the file is not in the archive — PostgreSQL's normal
//!   end-of-archive probe — and only after a *consistent look* proved it
//!   absent (see below);
//! * exit 126: anything else, in archive recovery (corrupt, tampered or
//!   swapped object, wrong key, a gap inside a chunked segment, disagreeing
//!   chunks, a segment holding the start of a recorded gap, storage
//!   unreachable after retries, bad configuration or arguments, even a
//!   panic). PostgreSQL treats exit codes above 125 as fatal and stops
//!   recovery instead of promoting with lost WAL.
//!
//! **Two kinds of recovery.** [`RecoveryMode`] is read from the signal
//! files in `restore_command`'s working directory, the data directory:
//!
//! | mode | signal file | "could not look" ([`Failure::CouldNotLook`]) | untrustworthy object ([`Failure::Untrustworthy`]) |
//! | ---- | ----------- | ----------------- | -------------------- |
//! | archive recovery | `recovery.signal` | 126 | 126 |
//! | standby | `standby.signal` (wins over `recovery.signal`, as in PostgreSQL) | 1, logged as an ERROR naming the cause | 126 |
//! | none (a manual call) | neither | 126 | 126 |
//!
//! Exit 1 ends archive recovery, so there every failure must be fatal. A
//! standby never ends recovery on exit 1: it goes back to streaming from
//! its primary and asks again later, while ≥ 126 shuts it down. So for a
//! standby, a storage outage, an unreadable configuration or a missing
//! repository answer 1 — a streaming replica must not go down with the
//! archive — and only an object that must never be replayed (damaged,
//! tampered with, planted, another cluster's WAL) still stops it: the
//! repository that the next restore depends on is then wrong, and a
//! stopped standby is the alarm nobody can miss.
//!
//! **What is asked for.** NAME is parsed once, at the door: a segment, a
//! closed `.partial` (`wal/<name>.partial`), a timeline history file, or
//! a backup history file (`<segment>.<offset>.backup`, stored by
//! `wal-push` and `walsafe backup`); anything else is a wrong call (often
//! `%p %f` swapped) and a [`Failure::CouldNotLook`], never "not in the
//! archive".
//!
//! Where a segment is looked for, in order:
//!
//! 1. the prefetch cache, `<[fetch] dir>/<repository id>/<name>.<hash>`:
//!    segments the prefetcher downloaded, authenticated, decoded and
//!    validated ahead of recovery (two at a time, on the core PostgreSQL's
//!    replay does not use), kept as plaintext under the BLAKE3 hash of
//!    their name and bytes. Serving one checks the hash (a copy that went
//!    bad on local disk, or was put there under another name, is discarded
//!    and fetched again) and the page headers, then *renames* it to `%p`
//!    (a copy when the cache is on another file system): recovery does
//!    not wait for a download, a decryption or a decompression. The
//!    repository id (see [`prefetch_cache`]) keeps one repository's
//!    segments from ever being served for another that shares the
//!    directory;
//! 2. `wal/<name>` — the complete segment;
//! 3. `wal/<name>.partial` — the closed last segment of an ended timeline,
//!    or the segment closed at a recorded gap;
//! 4. `chunks/<name>/…` — a segment that was still filling when the
//!    primary died: chunks are assembled from offset 0 and the rest is
//!    zero-filled, which recovery reads as the end of WAL. Every stored
//!    chunk must agree byte for byte with what is served (chunks of two
//!    runs overlap); a chunk set that does not start at 0 or has a hole is
//!    a gap: fatal, never silently shortened.
//!
//! **A consistent look.** The agent stores a complete segment and then
//! deletes its chunks, so a look at `wal/` followed by an empty chunk
//! listing can miss a segment stored in between. "Not found" is therefore
//! answered only when, after an empty chunk listing, `wal/<name>` and
//! `wal/<name>.partial` are still absent and the chunks are still none;
//! when the picture changed, the look starts again, at most
//! [`CONSISTENT_LOOKS`] times, then it is an error (≥ 126), never exit 1.
//!
//! **Gaps.** A recorded gap (see `gap`) is WAL the archive will never
//! have. A segment inside a gap is refused. The segment holding a gap's
//! start is refused too when it is served from chunks or a closed partial
//! (its WAL ends at the gap, zero-padded): recovery would read the end of
//! WAL there, end and promote, and never reach the WAL stored after the
//! gap. The operator may opt in, for exactly that gap, with
//! `[fetch] recover_to_gap = "<timeline>:<gap start LSN>"`: then that
//! segment is served and recovery ends at the gap, deliberately. (A
//! complete `wal/<name>` is served even if a gap record says its end was
//! lost: somebody archived the WAL after all, and the next segment is
//! looked at again.)
//!
//! Every segment is also checked page by page against the repository's
//! pinned cluster before it is written.
//!
//! After a segment is served, a detached `walsafe wal-prefetch NAME`
//! downloads the next `[fetch] prefetch` segments, so that replay does not
//! pay a storage round trip per segment.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context};
use futures::{StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};
use tracing::{debug, warn};

use crate::config::Config;
use crate::gap::Gap;
use crate::pg::page::{validate_segment, PageError, SegmentCheck};
use crate::pg::walfile::{classify, NameKind};
use crate::pg::{ClusterIdentity, SegmentName};
use crate::report::{EXIT_FATAL, EXIT_NOT_FOUND};
use crate::repository::chunks::{self, Uncovered};
use crate::repository::descriptor::Descriptor;
use crate::repository::object::is_backup_history;
use crate::repository::{ObjectName, Repository, RepositoryError, SegmentFile};

/// Chunk downloads in flight while assembling a segment.
const CHUNK_FETCH_CONCURRENCY: usize = 8;
/// Name of the lock that keeps one prefetcher per prefetch directory.
const PREFETCH_LOCK: &str = ".prefetch.lock";
/// What the prefetch cache holds (part of its directory's id: a cache of
/// another format is never read).
const PREFETCH_FORMAT: &str = "plaintext-blake3-1";
/// Bytes of a cached segment read at a time while it is checked.
const CHECK_BLOCK: usize = 1 << 20;
/// Segments the prefetcher downloads and decodes at once.
const PREFETCH_CONCURRENCY: usize = 2;
/// Looks at a segment's places before a picture that keeps changing is an
/// error (see the module doc).
pub const CONSISTENT_LOOKS: usize = 5;

/// What `wal-fetch` found.
#[derive(Debug, PartialEq, Eq)]
pub enum Fetched {
    Restored,
    NotFound,
}

/// Where the bytes of a segment were found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `wal/<name>`, downloaded or prefetched: the complete segment.
    Segment,
    /// `wal/<name>.partial`: WAL up to a timeline's end or a gap, then zeros.
    ClosedPartial,
    /// Assembled from chunks, zero-padded.
    Chunks,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Source::Segment => "the complete segment",
            Source::ClosedPartial => "a closed .partial",
            Source::Chunks => "chunks of a segment that was still filling",
        })
    }
}

/// Which recovery runs `restore_command`, from the signal files of the
/// data directory (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecoveryMode {
    /// `standby.signal`: a standby, which goes back to streaming on exit 1.
    Standby,
    /// `recovery.signal` alone: archive recovery (a restore, PITR), which
    /// ends and promotes on exit 1.
    ArchiveRecovery,
    /// Neither: not called by a recovering server (a manual call).
    NoRecovery,
}

impl RecoveryMode {
    /// The mode a server recovering in `data_dir` is in.
    pub fn of(data_dir: &Path) -> RecoveryMode {
        if data_dir.join("standby.signal").exists() {
            RecoveryMode::Standby
        } else if data_dir.join("recovery.signal").exists() {
            RecoveryMode::ArchiveRecovery
        } else {
            RecoveryMode::NoRecovery
        }
    }

    /// The mode of the working directory: PostgreSQL runs
    /// `restore_command` in the data directory.
    pub fn current() -> RecoveryMode {
        std::env::current_dir()
            .map(|d| Self::of(&d))
            .unwrap_or(RecoveryMode::NoRecovery)
    }

    /// What `wal-fetch` answers, in this mode, when it could not look.
    pub fn could_not_look_exit(self) -> u8 {
        match self {
            RecoveryMode::Standby => EXIT_NOT_FOUND,
            RecoveryMode::ArchiveRecovery | RecoveryMode::NoRecovery => EXIT_FATAL,
        }
    }

    /// One sentence for `walsafe check` and logs.
    pub fn describe(self) -> &'static str {
        match self {
            RecoveryMode::Standby => "standby (standby.signal): when wal-fetch cannot look (storage unreachable, configuration unreadable, no repository) it answers 1, \"not in the archive\", and the standby goes on streaming; only a damaged, tampered or foreign object exits 126 and stops it",
            RecoveryMode::ArchiveRecovery => "archive recovery (recovery.signal): every failure of wal-fetch exits 126 and stops recovery; exit 1 only when the file is proven absent, which ends recovery",
            RecoveryMode::NoRecovery => "no recovery (neither standby.signal nor recovery.signal): wal-fetch behaves as in archive recovery, every failure exits 126",
        }
    }
}

/// Why `wal-fetch` could not serve a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The archive could not be looked at: storage unreachable after
    /// retries, configuration, key file or arguments wrong, no repository,
    /// WAL missing from it, an internal error.
    CouldNotLook,
    /// An object that must never be replayed: damaged, tampered with,
    /// planted, or another cluster's.
    Untrustworthy,
}

impl Failure {
    /// The failure an error of [`wal_fetch`] is.
    pub fn of(e: &anyhow::Error) -> Failure {
        let untrustworthy = e.chain().any(|c| {
            c.is::<Untrustworthy>()
                || c.is::<PageError>()
                || c.downcast_ref::<RepositoryError>()
                    .is_some_and(RepositoryError::is_untrustworthy_object)
        });
        if untrustworthy {
            Failure::Untrustworthy
        } else {
            Failure::CouldNotLook
        }
    }
}

/// An object that must never be replayed, found by wal-fetch's own checks
/// (the repository's and the page validator's have their own types).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Untrustworthy(String);

/// Says why `wal-fetch` failed on stderr (which PostgreSQL writes to its
/// log) and returns the exit code for `mode`: `what` names the file and
/// the cause. Every failure is loud, even the ones a standby survives.
pub fn failed(mode: RecoveryMode, failure: Failure, what: &str) -> ExitCode {
    ExitCode::from(failed_code(mode, failure, what))
}

/// [`failed`], as the number (for `std::process::exit`).
pub fn failed_code(mode: RecoveryMode, failure: Failure, what: &str) -> u8 {
    if failure == Failure::CouldNotLook && mode == RecoveryMode::Standby {
        eprintln!(
            "walsafe wal-fetch: ERROR: {what}; answering \"not in the archive\" because this server is a standby (standby.signal): it goes on streaming from its primary and asks again later, but cannot catch up from the archive until the cause is fixed"
        );
        return mode.could_not_look_exit();
    }
    let why = match failure {
        Failure::Untrustworthy => {
            "this object must never be replayed; find out how it got there before restoring from this repository"
        }
        Failure::CouldNotLook => "fix the cause and start the server again",
    };
    eprintln!("walsafe wal-fetch: FATAL: {what}; recovery must stop here: {why}");
    EXIT_FATAL
}

/// `walsafe wal-fetch NAME DEST`, mapped to PostgreSQL's exit codes for
/// the recovery `mode`.
pub async fn wal_fetch_command(
    cfg: Config,
    mode: RecoveryMode,
    name: String,
    dest: PathBuf,
) -> ExitCode {
    match wal_fetch(&cfg, &name, &dest).await {
        Ok(Fetched::Restored) => ExitCode::SUCCESS,
        Ok(Fetched::NotFound) => {
            eprintln!("walsafe wal-fetch: {name} is not in the archive");
            ExitCode::from(EXIT_NOT_FOUND)
        }
        Err(e) => failed(
            mode,
            Failure::of(&e),
            &format!("{name}: {}", crate::report::error_line(&e)),
        ),
    }
}

/// Restores `name` into `dest`. `Err` means recovery must abort.
pub async fn wal_fetch(cfg: &Config, name: &str, dest: &Path) -> anyhow::Result<Fetched> {
    // Parse at the door: a name that is no file of the archive is a wrong
    // call (often %f and %p swapped), never "not in the archive", which
    // would let PostgreSQL end recovery without a single archived segment.
    let kind = classify(name);
    if kind.is_none() && !is_backup_history(name) {
        bail!(
            "{name:?} is not the name of a WAL segment, timeline history or backup history file; restore_command must be 'walsafe --config FILE wal-fetch %f %p' (%f the file name, then %p the path to write)"
        );
    }
    let mut first: Option<(String, Descriptor)> = None;
    let mut failures: Vec<anyhow::Error> = Vec::new();
    // Chunks of the segment being filled when the archive ends: the most
    // WAL any repository holds of it (a repository that fell behind holds
    // fewer chunks; recovery must not end at its end).
    let mut chunks: Option<(usize, Vec<u8>, String)> = None;
    for i in repository_order(cfg) {
        let r = &cfg.repositories[i];
        match wal_fetch_from(cfg, i, kind, name, dest, &mut first).await {
            Ok(Answer::Restored) => {
                unreachable_marker(cfg, r).map(std::fs::remove_file);
                return Ok(Fetched::Restored);
            }
            Ok(Answer::Absent) => continue,
            Ok(Answer::Chunks(data)) => {
                let held = data.iter().rposition(|b| *b != 0).map_or(0, |p| p + 1);
                if chunks.as_ref().is_none_or(|(h, ..)| held > *h) {
                    chunks = Some((held, data, r.name.clone()));
                }
            }
            Err(e) if cfg.repositories.len() == 1 => return Err(e),
            Err(e) => {
                let e = e.context(format!("repository {:?}", r.name));
                eprintln!(
                    "walsafe wal-fetch: WARNING: {name}: {}; trying the other repositories",
                    crate::report::error_line(&e)
                );
                if Failure::of(&e) == Failure::CouldNotLook {
                    note_unreachable(cfg, r);
                }
                failures.push(e);
            }
        }
    }
    if let Some((held, data, from)) = chunks {
        if let Some(e) = failures.first() {
            bail!(
                "only chunks of {name} were found (its first {held} bytes, in repository {from:?}), and {}; it may hold more of this segment, and recovery would end at the chunks' end: fix it, or remove it from the configuration to end recovery here",
                crate::report::error_line(e)
            );
        }
        let (dest, fsync) = (dest.to_path_buf(), cfg.fsync);
        tokio::task::spawn_blocking(move || fsync.write_atomically(&dest, &data, 0o600))
            .await?
            .with_context(|| format!("cannot write the restored file to {name}"))?;
        return Ok(Fetched::Restored);
    }
    // Absent only when every repository proved it absent; otherwise the
    // gravest failure (an object that must never be replayed) speaks.
    match failures
        .iter()
        .position(|e| Failure::of(e) == Failure::Untrustworthy)
    {
        _ if failures.is_empty() => Ok(Fetched::NotFound),
        Some(i) => Err(failures.swap_remove(i)),
        None => Err(failures.swap_remove(0)),
    }
}

/// How long a repository that could not be asked is tried after the
/// others: a replay from the second repository while the first is down
/// pays the first's retries once per minute, not once per segment.
const UNREACHABLE_FOR: std::time::Duration = std::time::Duration::from_secs(60);

/// The repositories in the order `wal-fetch` asks them: as configured,
/// except that one found unreachable in the last [`UNREACHABLE_FOR`]
/// comes after the others (it is still asked before "not found").
fn repository_order(cfg: &Config) -> Vec<usize> {
    let recently_down = |r| {
        unreachable_marker(cfg, r)
            .and_then(|m| std::fs::metadata(m).ok())
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age < UNREACHABLE_FOR)
    };
    let (down, up): (Vec<usize>, Vec<usize>) =
        (0..cfg.repositories.len()).partition(|&i| recently_down(&cfg.repositories[i]));
    up.into_iter().chain(down).collect()
}

/// Where `wal-fetch` notes that repository `r` could not be asked; `None`
/// with a single repository (there is no other to ask first).
fn unreachable_marker(cfg: &Config, r: &crate::repository::RepositoryConfig) -> Option<PathBuf> {
    if cfg.repositories.len() < 2 {
        return None;
    }
    let id = hex::encode(&Sha256::digest(format!("{}\0{}", r.name, r.url))[..8]);
    Some(cfg.fetch.dir.join(format!(".unreachable-{id}")))
}

fn note_unreachable(cfg: &Config, r: &crate::repository::RepositoryConfig) {
    if let Some(m) = unreachable_marker(cfg, r) {
        let _ = std::fs::create_dir_all(&cfg.fetch.dir);
        let _ = std::fs::write(m, r.url.as_bytes());
    }
}

/// What one repository had.
enum Answer {
    Restored,
    Absent,
    /// Only chunks of the segment (the last one being filled there): with
    /// several repositories another may hold more of it, or all of it.
    Chunks(Vec<u8>),
}

/// [`wal_fetch`] from repository `index` alone. `first` is the first
/// descriptor read (and its repository's name): every repository must
/// archive the same cluster, or none of them is trusted.
async fn wal_fetch_from(
    cfg: &Config,
    index: usize,
    kind: Option<NameKind>,
    name: &str,
    dest: &Path,
    first: &mut Option<(String, Descriptor)>,
) -> anyhow::Result<Answer> {
    let rc = &cfg.repositories[index];
    let repo =
        Repository::open(rc).with_context(|| format!("cannot open the repository {}", rc.url))?;
    let descriptor = repo.descriptor().await?.ok_or_else(|| {
        anyhow!(
            "there is no walsafe repository at {} (no descriptor); check [repository] url in {}",
            rc.url,
            cfg.path.display()
        )
    })?;
    match first {
        None => *first = Some((rc.name.clone(), descriptor.clone())),
        Some((other, d))
            if d.system_identifier != descriptor.system_identifier
                || d.segment_size != descriptor.segment_size =>
        {
            bail!(Untrustworthy(format!(
                "repository {:?} archives cluster {} ({} MiB segments) but repository {other:?} archives cluster {} ({} MiB segments); every [[repository]] must hold the same cluster's archive",
                rc.name,
                descriptor.system_identifier,
                descriptor.segment_size >> 20,
                d.system_identifier,
                d.segment_size >> 20
            )));
        }
        Some(_) => {}
    }
    // The prefetcher starts once per served segment: after a segment
    // comes from the cache, or as soon as a complete segment's object is
    // in hand, so that it works on the next ones while this one is
    // decoded (recovery's first segments, which nothing prefetched).
    let mut started = false;
    let mut start_prefetcher = || {
        if !started && cfg.fetch.prefetch > 0 && kind == Some(NameKind::Segment) {
            started = true;
            spawn_prefetcher(cfg, index, name);
        }
    };
    if kind == Some(NameKind::Segment) && take_prefetched(cfg, &repo, &descriptor, name, dest).await
    {
        start_prefetcher();
        return Ok(Answer::Restored);
    }
    let data = match kind {
        Some(NameKind::History(_)) => repo.get_wal(name).await?,
        Some(NameKind::Segment) => {
            match fetch_segment(cfg, &repo, &descriptor, name, &mut start_prefetcher).await? {
                Some((data, Source::Chunks)) if cfg.repositories.len() > 1 => {
                    return Ok(Answer::Chunks(data))
                }
                found => found.map(|(data, _)| data),
            }
        }
        // A closed partial, stored as the agent (or wal-push) closed it.
        Some(NameKind::Partial) => {
            let file = SegmentFile::parse(name.trim_end_matches(".partial"))?;
            repo.get(&ObjectName::ClosedPartial(file)).await?
        }
        None => {
            repo.get(&ObjectName::BackupHistory(name.to_string()))
                .await?
        }
    };
    let Some(data) = data else {
        return Ok(Answer::Absent);
    };
    let dest = dest.to_path_buf();
    let fsync = cfg.fsync;
    tokio::task::spawn_blocking(move || fsync.write_atomically(&dest, &data, 0o600))
        .await?
        .with_context(|| format!("cannot write the restored file to {name}"))?;
    start_prefetcher();
    Ok(Answer::Restored)
}

/// Segment `name` from `repo`, checked, and where its bytes came from;
/// `None` when it is proven absent.
async fn fetch_segment(
    cfg: &Config,
    repo: &Repository,
    d: &Descriptor,
    name: &str,
    found_whole: &mut dyn FnMut(),
) -> anyhow::Result<Option<(Vec<u8>, Source)>> {
    let seg = SegmentName::parse(name, d.segment_size).ok_or_else(|| {
        anyhow!(
            "{name} is not a valid segment name for {} MiB segments",
            d.segment_size >> 20
        )
    })?;
    let file = SegmentFile::of(seg, d.segment_size);
    let found = look_up(repo, &file, d.segment_size, found_whole).await?;
    let Some((data, source)) = found else {
        refuse_if_in_gap(cfg, &repo.gaps().await?, seg, d.segment_size)?;
        return Ok(None);
    };
    if source != Source::Segment {
        refuse_if_gap_starts_in(cfg, &repo.gaps().await?, seg, d.segment_size, source)?;
    }
    if data.len() as u64 != d.segment_size {
        bail!(Untrustworthy(format!(
            "the archived {name} holds {} bytes, not the repository's segment size {}",
            data.len(),
            d.segment_size
        )));
    }
    let ident = d.identity();
    let data =
        tokio::task::spawn_blocking(move || validate_segment(&ident, seg, &data).map(|()| data))
            .await?
            .with_context(|| format!("the archived {name} is not valid WAL of this cluster"))?;
    Ok(Some((data, source)))
}

/// Looks for a segment in the repository (see the module doc: a
/// consistent look). `None` only when it is proven absent. `found_whole`
/// is called when the complete segment's object has been downloaded,
/// before it is decoded.
pub async fn look_up(
    repo: &Repository,
    file: &SegmentFile,
    segment_size: u64,
    found_whole: &mut dyn FnMut(),
) -> anyhow::Result<Option<(Vec<u8>, Source)>> {
    for look in 0..CONSISTENT_LOOKS {
        if look > 0 {
            debug!("{file}: the repository changed while it was looked at; looking again");
        }
        if let Some(found) = stored_whole(repo, file, found_whole).await? {
            return Ok(Some(found));
        }
        match assemble_chunks(repo, file, segment_size).await? {
            Assembled::Segment(buf) => return Ok(Some((buf, Source::Chunks))),
            Assembled::Changed => continue,
            Assembled::NoChunks => {
                // The segment may have been stored, and its chunks deleted,
                // between the look at wal/ and the listing: look again at
                // every place before calling it absent.
                if let Some(found) = stored_whole(repo, file, found_whole).await? {
                    return Ok(Some(found));
                }
                if repo.list_chunks(file).await?.is_empty() {
                    return Ok(None);
                }
            }
        }
    }
    bail!(
        "{file} kept changing in the repository while it was being read ({CONSISTENT_LOOKS} looks); is a second agent writing to it? Start the server again to retry"
    )
}

/// The complete segment or the closed partial, if stored.
async fn stored_whole(
    repo: &Repository,
    file: &SegmentFile,
    found_whole: &mut dyn FnMut(),
) -> anyhow::Result<Option<(Vec<u8>, Source)>> {
    let whole = ObjectName::Segment(file.clone());
    if let Some(raw) = repo.get_raw(&whole).await? {
        found_whole();
        return Ok(Some((repo.decode_raw(&whole, raw).await?, Source::Segment)));
    }
    Ok(repo
        .get(&ObjectName::ClosedPartial(file.clone()))
        .await?
        .map(|data| (data, Source::ClosedPartial)))
}

/// Whether the operator's `[fetch] recover_to_gap` names exactly `gap`.
fn opted_in(cfg: &Config, gap: &Gap) -> bool {
    cfg.fetch.recover_to_gap == Some((gap.timeline, gap.from))
}

/// The setting that opts in to ending recovery at `gap`, and where it goes.
fn opt_in_hint(cfg: &Config, gap: &Gap) -> String {
    format!(
        "to end recovery at the gap on purpose, losing every transaction after {from}, add recover_to_gap = \"{}:{from}\" to the [fetch] section of {} and start the server again; to recover past the gap, restore a base backup taken after {}",
        gap.timeline,
        cfg.path.display(),
        gap.to,
        from = gap.from,
    )
}

/// A missing segment inside a recorded gap is not the end of the archive:
/// WAL after the gap exists, and ending recovery here (exit 1) would make
/// PostgreSQL promote without it, silently. Stop recovery instead, and say
/// how to end it deliberately before the gap. The one exception: the
/// operator opted in to this gap and it starts exactly at this segment.
fn refuse_if_in_gap(
    cfg: &Config,
    gaps: &[Gap],
    seg: SegmentName,
    segment_size: u64,
) -> anyhow::Result<()> {
    for gap in gaps {
        if !gap.touches(seg, segment_size) {
            continue;
        }
        if opted_in(cfg, gap) && gap.from == seg.start_lsn(segment_size) {
            warn!(
                "{}: not in the archive; recovery ends at the recorded gap at {} as [fetch] recover_to_gap says",
                seg.file_name(segment_size),
                gap.from
            );
            continue;
        }
        bail!(
            "this segment lies in a recorded gap: WAL from {} to {} on timeline {} was lost before it was archived ({}, detected {}). Recovery cannot pass it; {}",
            gap.from,
            gap.to,
            gap.timeline,
            gap.reason,
            gap.detected_at,
            opt_in_hint(cfg, gap)
        );
    }
    Ok(())
}

/// A segment served from chunks or a closed partial ends where its stored
/// WAL ends. If a recorded gap starts inside it, recovery would take that
/// end for the end of the archive and promote, and never replay the WAL
/// stored after the gap: refuse, unless the operator opted in to this gap.
fn refuse_if_gap_starts_in(
    cfg: &Config,
    gaps: &[Gap],
    seg: SegmentName,
    segment_size: u64,
    source: Source,
) -> anyhow::Result<()> {
    let (start, end) = (seg.start_lsn(segment_size), seg.end_lsn(segment_size));
    for gap in gaps {
        if gap.timeline != seg.timeline || gap.from < start || gap.from >= end {
            continue;
        }
        if opted_in(cfg, gap) {
            warn!(
                "serving {} up to the recorded gap at {} on timeline {}: recovery ends there, as [fetch] recover_to_gap says; the WAL from {} on is not replayed",
                seg.file_name(segment_size),
                gap.from,
                gap.timeline,
                gap.from
            );
            continue;
        }
        bail!(
            "this segment holds the start of a recorded gap: WAL from {} to {} on timeline {} was lost before it was archived ({}, detected {}). The segment is stored only up to {} ({source}); recovery would read the end of WAL there and promote, and the WAL archived after the gap would never be replayed, so walsafe stops recovery here; {}",
            gap.from,
            gap.to,
            gap.timeline,
            gap.reason,
            gap.detected_at,
            gap.from,
            opt_in_hint(cfg, gap)
        );
    }
    Ok(())
}

/// The prefetch cache of one repository: `<[fetch] dir>/<id>/`, where `id`
/// is the first 16 hex digits of SHA-256 over the repository's URL and its
/// descriptor (pinned system identifier, creation time, key id). Two
/// configurations sharing a prefetch directory, or a repository re-created
/// at the same URL, never see each other's objects; within one, the file
/// name is the object's logical name, which its envelope binds.
pub fn prefetch_cache(cfg: &Config, repo: &Repository, d: &Descriptor) -> PathBuf {
    let mut h = Sha256::new();
    for part in [
        PREFETCH_FORMAT,
        repo.url(),
        &d.system_identifier.to_string(),
        &d.created_at,
        d.key_id.as_deref().unwrap_or("-"),
    ] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    cfg.fetch.dir.join(hex::encode(&h.finalize()[..8]))
}

/// The cache file name of segment `name` holding `data`: the name, then
/// the BLAKE3 hash of the name and the bytes.
pub fn prefetch_file_name(name: &str, data: &[u8]) -> String {
    let mut h = cache_hasher(name);
    h.update(data);
    cache_file_name(name, &h)
}

/// The hash of a cache file's name and bytes, before the bytes.
fn cache_hasher(name: &str) -> blake3::Hasher {
    let mut h = blake3::Hasher::new();
    h.update(name.as_bytes());
    h.update(&[0]);
    h
}

/// The cache file name of segment `name` whose bytes `h` has hashed.
fn cache_file_name(name: &str, h: &blake3::Hasher) -> String {
    format!("{name}.{}", h.finalize().to_hex())
}

/// Serves segment `name` from the prefetch cache into `dest` (see the
/// module doc): true when it did. A cached copy that fails its hash or
/// its page headers is removed and the segment fetched again.
async fn take_prefetched(
    cfg: &Config,
    repo: &Repository,
    d: &Descriptor,
    name: &str,
    dest: &Path,
) -> bool {
    let Some(seg) = SegmentName::parse(name, d.segment_size) else {
        return false;
    };
    let cache = prefetch_cache(cfg, repo, d);
    let ident = d.identity();
    let (name, dest, fsync) = (name.to_string(), dest.to_path_buf(), cfg.fsync);
    tokio::task::spawn_blocking(move || {
        let prefix = format!("{name}.");
        let Some(path) = std::fs::read_dir(&cache).ok().and_then(|entries| {
            entries.flatten().map(|e| e.path()).find(|p| {
                p.file_name()
                    .is_some_and(|f| f.to_string_lossy().starts_with(&prefix))
            })
        }) else {
            return false;
        };
        let Ok(file) = std::fs::File::open(&path) else {
            return false;
        };
        if let Err(why) = check_cached(file, &path, &ident, seg, &name) {
            warn!("discarding prefetched {name}: {why}; fetching it from the repository");
            let _ = std::fs::remove_file(&path);
            return false;
        }
        // Verified: moved into place, or, when the cache is on another
        // file system, copied (and hashed again as it is read).
        if std::fs::rename(&path, &dest).is_ok() {
            return true;
        }
        let ok = std::fs::read(&path).is_ok_and(|data| {
            path.file_name().map(|f| f.to_string_lossy().into_owned())
                == Some(prefetch_file_name(&name, &data))
                && fsync.write_atomically(&dest, &data, 0o600).is_ok()
        });
        let _ = std::fs::remove_file(&path);
        ok
    })
    .await
    .unwrap_or(false)
}

/// Reads a cached segment once, in blocks, and checks it as a whole: its
/// size, the hash in its file name, and its page headers.
fn check_cached(
    mut file: std::fs::File,
    path: &Path,
    ident: &ClusterIdentity,
    seg: SegmentName,
    name: &str,
) -> Result<(), String> {
    use std::io::Read;
    let size = ident.segment_size;
    if file.metadata().map_err(|e| e.to_string())?.len() != size {
        return Err("its size is not the segment size".into());
    }
    let mut hash = cache_hasher(name);
    let mut pages = SegmentCheck::new(ident, seg).map_err(|e| e.to_string())?;
    let mut first_page_error = None;
    let mut block = vec![0; CHECK_BLOCK.min(size as usize)];
    let mut left = size as usize;
    while left > 0 {
        let n = block.len().min(left);
        file.read_exact(&mut block[..n])
            .map_err(|e| e.to_string())?;
        hash.update(&block[..n]);
        if first_page_error.is_none() {
            first_page_error = pages.feed(&block[..n]).err();
        }
        left -= n;
    }
    let expected = cache_file_name(name, &hash);
    if path.file_name().map(|f| f.to_string_lossy()) != Some(expected.as_str().into()) {
        return Err("its bytes do not match its hash".into());
    }
    match first_page_error {
        Some(e) => Err(e.to_string()),
        None => pages.finish().map_err(|e| e.to_string()),
    }
}

/// What a segment's chunks gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Assembled {
    /// The segment has no chunks.
    NoChunks,
    /// A listed chunk was gone when read (its segment was stored meanwhile).
    Changed,
    /// The segment: the chunks' WAL from offset 0, then zeros.
    Segment(Vec<u8>),
}

/// Assembles a segment from its chunks (see the module doc). Every listed
/// chunk is read and must agree with the assembled bytes, not only the
/// chunks of the chain that covers the segment.
pub async fn assemble_chunks(
    repo: &Repository,
    file: &SegmentFile,
    segment_size: u64,
) -> anyhow::Result<Assembled> {
    let chunks = repo.list_chunks(file).await?;
    if chunks.is_empty() {
        return Ok(Assembled::NoChunks);
    }
    let plan = chunks::plan(&chunks).map_err(|u| match u {
        Uncovered::MissingStart { first } => anyhow!(
            "the chunks of {file} do not start at offset 0 (first at {first:08X}): WAL at the start of this segment is missing from the repository"
        ),
        Uncovered::Hole { from, to } => anyhow!(
            "the chunks of {file} have a hole from {from:08X} to {to:08X}: WAL is missing from the repository"
        ),
    })?;
    if let Some(&(s, e)) = chunks.iter().find(|(_, e)| *e > segment_size) {
        bail!(Untrustworthy(format!(
            "chunk {s:08X}-{e:08X} of {file} reaches beyond the segment size {segment_size}"
        )));
    }
    let parts: Vec<Option<Vec<u8>>> = futures::stream::iter(chunks.iter().copied())
        .map(|(s, e)| repo.get_chunk(file, s, e))
        .buffered(CHUNK_FETCH_CONCURRENCY)
        .try_collect()
        .await?;
    if parts.iter().any(Option::is_none) {
        return Ok(Assembled::Changed);
    }
    let parts: Vec<((u64, u64), Vec<u8>)> = chunks
        .iter()
        .copied()
        .zip(parts.into_iter().map(|p| p.expect("checked above")))
        .collect();
    for ((start, end), part) in &parts {
        if part.len() as u64 != end - start {
            bail!(Untrustworthy(format!(
                "chunk {start:08X}-{end:08X} of {file} holds {} bytes",
                part.len()
            )));
        }
    }
    // With ack mode `remote` a segment may have thousands of chunks.
    let by_range: std::collections::HashMap<(u64, u64), &Vec<u8>> =
        parts.iter().map(|(r, p)| (*r, p)).collect();
    let mut buf = vec![0u8; segment_size as usize];
    let mut pos = 0u64;
    for range in &plan {
        let (start, end) = *range;
        let part = by_range
            .get(range)
            .expect("the plan is made of listed chunks");
        let overlap = (pos - start) as usize;
        buf[pos as usize..end as usize].copy_from_slice(&part[overlap..]);
        pos = end;
    }
    // Every stored chunk (the chain's overlaps, and chunks of another run
    // off the chain) must hold exactly the bytes served.
    for ((start, end), part) in &parts {
        if buf[*start as usize..*end as usize] != part[..] {
            let at = buf[*start as usize..*end as usize]
                .iter()
                .zip(part)
                .position(|(a, b)| a != b)
                .unwrap_or(0) as u64
                + start;
            bail!(Untrustworthy(format!(
                "overlapping chunks of {file} disagree: chunk {start:08X}-{end:08X} differs from the WAL assembled from the other chunks at offset {at:08X}; the repository holds two different versions of this WAL (two agents, or a diverged timeline, writing the same segment?). Investigate before restoring: walsafe will not pick one"
            )));
        }
    }
    debug!(
        "assembled {file} from {} chunk(s) ({} stored), {pos} bytes of WAL",
        plan.len(),
        parts.len()
    );
    Ok(Assembled::Segment(buf))
}

fn spawn_prefetcher(cfg: &Config, repository: usize, name: &str) {
    use std::os::unix::process::CommandExt;
    if prefetcher_running(&cfg.fetch.dir) {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let r = std::process::Command::new(exe)
        .arg("--config")
        .arg(&cfg.path)
        .arg("wal-prefetch")
        .arg(name)
        .arg("--repository")
        .arg(&cfg.repositories[repository].name)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn();
    if let Err(e) = r {
        debug!("could not start the prefetcher: {e}");
    }
}

/// Whether a prefetcher holds the prefetch directory's lock: then this
/// call starts none (it would find the lock taken and exit, having paid a
/// process start on the core recovery shares); the next call after it
/// finishes starts the next.
fn prefetcher_running(dir: &Path) -> bool {
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join(PREFETCH_LOCK))
        .is_ok_and(|f| matches!(fs4::fs_std::FileExt::try_lock_exclusive(&f), Ok(false)))
}

/// `walsafe wal-prefetch NAME`: downloads the raw objects of the segments
/// after NAME into this repository's prefetch cache, and drops those at or
/// before it. One prefetcher per directory at a time (lock file); a second
/// just exits.
pub async fn prefetch(cfg: &Config, repository: &str, name: &str) -> anyhow::Result<()> {
    let rc = cfg
        .repositories
        .iter()
        .find(|r| r.name == repository)
        .ok_or_else(|| {
            anyhow!(
                "no repository named {repository:?} in {}",
                cfg.path.display()
            )
        })?;
    let dir = &cfg.fetch.dir;
    cfg.fsync
        .create_dir_all(dir)
        .with_context(|| format!("cannot create the prefetch directory {}", dir.display()))?;
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(PREFETCH_LOCK))?;
    if !fs4::fs_std::FileExt::try_lock_exclusive(&lock)? {
        return Ok(());
    }
    let repo = Repository::open(rc)?;
    let d = repo
        .descriptor()
        .await?
        .ok_or_else(|| anyhow!("no repository at {}", rc.url))?;
    let seg = SegmentName::parse(name, d.segment_size)
        .ok_or_else(|| anyhow!("{name} is not a segment name"))?;
    let cache = prefetch_cache(cfg, &repo, &d);
    cfg.fsync
        .create_dir_all(&cache)
        .with_context(|| format!("cannot create the prefetch directory {}", cache.display()))?;
    // Files of the old layout (directly in the directory) are never
    // served any more: remove them.
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if classify(&n) == Some(NameKind::Segment) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    // Drop what recovery has passed.
    if let Ok(entries) = std::fs::read_dir(&cache) {
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            let passed = n
                .get(..24)
                .and_then(|s| SegmentName::parse(s, d.segment_size))
                .is_none_or(|s| s.segno <= seg.segno);
            if passed {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let cached: Vec<String> = std::fs::read_dir(&cache)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let mut wanted = Vec::new();
    let mut next = seg;
    for _ in 0..cfg.fetch.prefetch {
        next = next.next();
        wanted.push(next);
    }
    let ident = d.identity();
    let fetched = futures::stream::iter(wanted)
        .map(|s| {
            let (repo, cache, ident) = (&repo, &cache, ident);
            let n = s.file_name(d.segment_size);
            let have = cached.iter().any(|c| c.starts_with(&format!("{n}.")));
            async move {
                if have {
                    return anyhow::Ok(true);
                }
                let object = ObjectName::Segment(SegmentFile::of(s, d.segment_size));
                let Some(raw) = repo.get_raw(&object).await? else {
                    return Ok(false);
                };
                let data = repo.decode_raw(&object, raw).await?;
                let cache = cache.clone();
                tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                    validate_segment(&ident, s, &data)?;
                    // A cache: a copy torn by a crash fails its hash.
                    crate::durable::Fsync::Off.write_atomically(
                        &cache.join(prefetch_file_name(&n, &data)),
                        &data,
                        0o600,
                    )?;
                    Ok(())
                })
                .await??;
                Ok(true)
            }
        })
        .buffered(PREFETCH_CONCURRENCY);
    futures::pin_mut!(fetched);
    while let Some(r) = fetched.next().await {
        if !r? {
            break;
        }
    }
    drop(lock);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::time::Duration;

    use bytes::Bytes;

    use crate::durable::Fsync;
    use crate::pg::page::synthetic_wal;
    use crate::pg::{ClusterIdentity, Lsn, TimelineId};
    use crate::repository::faults::{Fault, Faults, Op};
    use crate::repository::{Compression, Store};

    const SEG: &str = "000000010000000000000003";
    const SIZE: u64 = 16 << 20;

    fn ident() -> ClusterIdentity {
        ClusterIdentity::new(7_000_000_000_000_000_001, 150004, SIZE)
    }

    /// The whole segment SEG as valid (synthetic) WAL.
    fn wal() -> Vec<u8> {
        synthetic_wal(&ident(), TimelineId(1), Lsn(3 * SIZE), SIZE)
    }

    fn config(dir: &Path) -> Config {
        let text = format!(
            "[postgres]\nconninfo = \"host=/tmp\"\n[spool]\ndir = {:?}\n[repository]\nurl = \"file://{}\"\n[fetch]\ndir = {:?}\n",
            dir.join("spool"),
            dir.join("repo").display(),
            dir.join("prefetch"),
        );
        Config::parse(&text, &dir.join("walsafe.toml")).unwrap()
    }

    fn repo(dir: &Path, faults: Option<std::sync::Arc<Faults>>) -> Repository {
        let url = format!("file://{}", dir.join("repo").display());
        let mut store = Store::open(&url, &BTreeMap::new(), 1)
            .unwrap()
            .with_fsync(Fsync::Off);
        if let Some(f) = faults {
            store = store.with_faults(f);
        }
        Repository::from_parts(store, None, Compression::Zstd, 1)
    }

    /// The agent stores the complete segment and deletes its chunks while
    /// wal-fetch is between its look at wal/ and its chunk listing: the
    /// listing comes back empty, but the segment is there.
    #[tokio::test]
    async fn a_segment_stored_while_its_chunks_are_listed_is_found() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("repo")).unwrap();
        let cfg = config(dir.path());
        let faults = Faults::new();
        let fetcher = repo(dir.path(), Some(faults.clone()));
        let agent = repo(dir.path(), None);
        let d = agent.pin(&ident()).await.unwrap();
        let file = SegmentFile::parse(SEG).unwrap();
        let full = wal();
        agent
            .put_chunk(&file, 0, Bytes::copy_from_slice(&full[..65536]))
            .await
            .unwrap();
        // The fetcher's chunk listing waits until the agent has stored the
        // segment and deleted its chunks (events, not timing).
        faults.set_for(Some(Op::List), "chunks/", Fault::Hang);
        let writer = {
            let agent = agent.clone();
            let full = full.clone();
            let file = file.clone();
            let faults = faults.clone();
            tokio::spawn(async move {
                while faults.attempts(Op::List) == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                agent.put_wal(SEG, Bytes::from(full)).await.unwrap();
                agent.delete_chunks(&file).await.unwrap();
                faults.clear();
            })
        };
        let mut found_whole = 0;
        let got = fetch_segment(&cfg, &fetcher, &d, SEG, &mut || found_whole += 1)
            .await
            .unwrap()
            .map(|(data, _)| data);
        writer.await.unwrap();
        assert!(got.is_some(), "the segment was stored: not absent");
        assert!(got.unwrap() == full, "the complete segment is served");
        assert_eq!(
            found_whole, 1,
            "the prefetcher starts once, when it is found"
        );
    }

    /// A standby stops only for objects that must never be replayed: a
    /// wrong key setting or an unreachable store is "could not look",
    /// however deep in the error's context it sits.
    #[test]
    fn only_untrustworthy_objects_are_failures_a_standby_stops_for() {
        use crate::repository::{EnvelopeError, StoreError};
        let envelope = |source| {
            anyhow::Error::new(RepositoryError::Envelope {
                url: "file:///r".into(),
                key: "wal/x".into(),
                source,
            })
            .context("fetching x")
        };
        let wrong_key = envelope(EnvelopeError::WrongKey {
            object_key_id: "a".into(),
            configured_key_id: "b".into(),
        });
        assert_eq!(Failure::of(&wrong_key), Failure::CouldNotLook);
        let tampered = envelope(EnvelopeError::AuthenticationFailed {
            frame: 1,
            frames: 2,
        });
        assert_eq!(Failure::of(&tampered), Failure::Untrustworthy);
        let planted = envelope(EnvelopeError::UnencryptedWithKey {
            configured_key_id: "b".into(),
        });
        assert_eq!(Failure::of(&planted), Failure::Untrustworthy);
        let down = anyhow::Error::new(RepositoryError::Store(StoreError::Unreachable {
            url: "s3://b".into(),
            op: "get",
            key: "wal/x".into(),
            attempts: 3,
            last_error: "connection refused".into(),
        }));
        assert_eq!(Failure::of(&down), Failure::CouldNotLook);
        let foreign = anyhow::Error::new(Untrustworthy("two versions".into())).context("x");
        assert_eq!(Failure::of(&foreign), Failure::Untrustworthy);
        assert_eq!(
            Failure::of(&anyhow!("no repository")),
            Failure::CouldNotLook
        );
    }

    /// Chunks of two runs: the chain served is (0, c), (a, b); the other
    /// run's (0, a) is off the chain, and holds different bytes.
    #[tokio::test]
    async fn a_stored_chunk_off_the_served_chain_must_agree() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("repo")).unwrap();
        let cfg = config(dir.path());
        let r = repo(dir.path(), None);
        let d = r.pin(&ident()).await.unwrap();
        let file = SegmentFile::parse(SEG).unwrap();
        let full = wal();
        let (a, c, b) = (40_000usize, 60_000usize, 100_000usize);
        r.put_chunk(&file, a as u64, Bytes::copy_from_slice(&full[a..b]))
            .await
            .unwrap();
        r.put_chunk(&file, 0, Bytes::copy_from_slice(&full[..c]))
            .await
            .unwrap();
        // Consistent chunks are served (and no complete segment was found
        // to start the prefetcher early for).
        let mut found_whole = false;
        let (got, _) = fetch_segment(&cfg, &r, &d, SEG, &mut || found_whole = true)
            .await
            .unwrap()
            .unwrap();
        assert!(got[..b] == full[..b] && got[b..].iter().all(|&x| x == 0));
        assert!(!found_whole);
        let mut other = full[..a].to_vec();
        other[30_000] ^= 0xFF;
        r.put_chunk(&file, 0, Bytes::from(other)).await.unwrap();
        let e = fetch_segment(&cfg, &r, &d, SEG, &mut || {})
            .await
            .expect_err("disagreeing chunks must be refused");
        let msg = crate::report::error_line(&e);
        assert!(msg.contains("disagree"), "{msg}");
        assert!(msg.contains("00000000-00009C40"), "{msg}");
    }
}
