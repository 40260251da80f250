//! fetch: `walsafe wal-fetch NAME DEST`, PostgreSQL's `restore_command`.
//!
//! Contract with PostgreSQL (rule 4 of README's Guarantees):
//!
//! * exit 0: DEST holds the complete, verified file (temp file, fsync,
//!   rename: recovery never sees a torn file);
//! * exit 1: the file is not in the archive — PostgreSQL's normal
//!   end-of-archive probe;
//! * exit 126: anything else (corrupt, tampered or swapped object, wrong
//!   key, a gap inside a chunked segment, storage unreachable after
//!   retries, bad configuration, even a panic). PostgreSQL treats exit
//!   codes above 125 as fatal and stops recovery instead of promoting with
//!   lost WAL.
//!
//! Where a segment is looked for, in order:
//!
//! 1. the prefetch directory (`[fetch] dir`), which holds *raw repository
//!    objects*, so they are authenticated and checksummed exactly like a
//!    download; a bad prefetched file is discarded and fetched again;
//! 2. `wal/<name>` — the complete segment;
//! 3. `wal/<name>.partial` — the closed last segment of an ended timeline;
//! 4. `chunks/<name>/…` — a segment that was still filling when the
//!    primary died: chunks are assembled from offset 0 (overlaps must hold
//!    identical bytes) and the rest is zero-filled, which recovery reads as
//!    the end of WAL. A chunk set that does not start at 0 or has a hole is
//!    a gap: fatal, never silently shortened.
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
use tracing::{debug, warn};

use crate::config::Config;
use crate::pg::page::validate_segment;
use crate::pg::walfile::{classify, NameKind};
use crate::pg::SegmentName;
use crate::report::{EXIT_FATAL, EXIT_NOT_FOUND};
use crate::repository::chunks::{self, Uncovered};
use crate::repository::descriptor::Descriptor;
use crate::repository::{ObjectName, Repository, SegmentFile};

/// Chunk downloads in flight while assembling a segment.
const CHUNK_FETCH_CONCURRENCY: usize = 8;
/// Name of the lock that keeps one prefetcher per prefetch directory.
const PREFETCH_LOCK: &str = ".prefetch.lock";

/// What `wal-fetch` found.
#[derive(Debug, PartialEq, Eq)]
pub enum Fetched {
    Restored,
    NotFound,
}

/// `walsafe wal-fetch NAME DEST`, mapped to PostgreSQL's exit codes.
pub async fn wal_fetch_command(cfg: Config, name: String, dest: PathBuf) -> ExitCode {
    match wal_fetch(&cfg, &name, &dest).await {
        Ok(Fetched::Restored) => {
            if cfg.fetch.prefetch > 0 && classify(&name) == Some(NameKind::Segment) {
                spawn_prefetcher(&cfg, &name);
            }
            ExitCode::SUCCESS
        }
        Ok(Fetched::NotFound) => {
            eprintln!("walsafe wal-fetch: {name} is not in the archive");
            ExitCode::from(EXIT_NOT_FOUND)
        }
        Err(e) => {
            eprintln!(
                "walsafe wal-fetch: FATAL: {name}: {}; recovery must stop here: fix the cause and start the server again",
                crate::report::error_line(&e)
            );
            ExitCode::from(EXIT_FATAL)
        }
    }
}

/// Restores `name` into `dest`. `Err` means recovery must abort.
pub async fn wal_fetch(cfg: &Config, name: &str, dest: &Path) -> anyhow::Result<Fetched> {
    let Some(kind) = classify(name) else {
        // Names walsafe never stores (e.g. backup history files): honestly absent.
        debug!("{name} is not a WAL segment or history file name");
        return Ok(Fetched::NotFound);
    };
    if kind == NameKind::Partial {
        return Ok(Fetched::NotFound);
    }
    let repo = Repository::open(&cfg.repository)
        .with_context(|| format!("cannot open the repository {}", cfg.repository.url))?;
    let descriptor = repo.descriptor().await?.ok_or_else(|| {
        anyhow!(
            "there is no walsafe repository at {} (no descriptor); check [repository] url in {}",
            cfg.repository.url,
            cfg.path.display()
        )
    })?;
    let data = match kind {
        NameKind::History(_) => repo.get_wal(name).await?,
        NameKind::Segment => fetch_segment(cfg, &repo, &descriptor, name).await?,
        NameKind::Partial => None,
    };
    let Some(data) = data else {
        return Ok(Fetched::NotFound);
    };
    let dest = dest.to_path_buf();
    let fsync = cfg.fsync;
    tokio::task::spawn_blocking(move || fsync.write_atomically(&dest, &data, 0o600))
        .await?
        .with_context(|| format!("cannot write the restored file to {name}"))?;
    Ok(Fetched::Restored)
}

async fn fetch_segment(
    cfg: &Config,
    repo: &Repository,
    d: &Descriptor,
    name: &str,
) -> anyhow::Result<Option<Vec<u8>>> {
    let seg = SegmentName::parse(name, d.segment_size).ok_or_else(|| {
        anyhow!(
            "{name} is not a valid segment name for {} MiB segments",
            d.segment_size >> 20
        )
    })?;
    let file = SegmentFile::of(seg, d.segment_size);
    let data = match from_prefetch(cfg, repo, &file).await {
        Some(data) => Some(data),
        None => match repo.get(&ObjectName::Segment(file.clone())).await? {
            Some(data) => Some(data),
            None => match repo.get(&ObjectName::ClosedPartial(file.clone())).await? {
                Some(data) => Some(data),
                None => assemble_chunks(repo, &file, d.segment_size).await?,
            },
        },
    };
    let Some(data) = data else {
        refuse_if_in_gap(repo, seg, d.segment_size).await?;
        return Ok(None);
    };
    if data.len() as u64 != d.segment_size {
        bail!(
            "the archived {name} holds {} bytes, not the repository's segment size {}",
            data.len(),
            d.segment_size
        );
    }
    let ident = d.identity();
    let data =
        tokio::task::spawn_blocking(move || validate_segment(&ident, seg, &data).map(|()| data))
            .await?
            .with_context(|| format!("the archived {name} is not valid WAL of this cluster"))?;
    Ok(Some(data))
}

/// A missing segment inside a recorded gap is not the end of the archive:
/// WAL after the gap exists, and ending recovery here (exit 1) would make
/// PostgreSQL promote without it, silently. Stop recovery instead, and say
/// how to end it deliberately before the gap.
async fn refuse_if_in_gap(
    repo: &Repository,
    seg: SegmentName,
    segment_size: u64,
) -> anyhow::Result<()> {
    for gap in repo.gaps().await? {
        if gap.touches(seg, segment_size) {
            bail!(
                "this segment lies in a recorded gap: WAL from {} to {} on timeline {} was lost before it was archived ({}, detected {}). Recovery cannot pass it; to end recovery just before it, set recovery_target_lsn = '{}' and recovery_target_action = 'promote', or restore a base backup taken after {}",
                gap.from, gap.to, gap.timeline, gap.reason, gap.detected_at, gap.from, gap.to
            );
        }
    }
    Ok(())
}

/// A prefetched raw object, decoded and verified; `None` when absent or bad.
async fn from_prefetch(cfg: &Config, repo: &Repository, file: &SegmentFile) -> Option<Vec<u8>> {
    let name = file.as_str();
    let path = cfg.fetch.dir.join(name);
    let raw = tokio::fs::read(&path).await.ok()?;
    let _ = tokio::fs::remove_file(&path).await;
    match repo
        .decode_raw(&ObjectName::Segment(file.clone()), raw.into())
        .await
    {
        Ok(data) => Some(data),
        Err(e) => {
            warn!("discarding prefetched {name}: {e}; fetching it from the repository");
            None
        }
    }
}

/// Assembles a segment from its chunks (see the module doc). `None` when
/// the segment has no chunks at all.
pub async fn assemble_chunks(
    repo: &Repository,
    file: &SegmentFile,
    segment_size: u64,
) -> anyhow::Result<Option<Vec<u8>>> {
    // A chunk listed and then gone means the complete segment was stored and
    // its chunks deleted meanwhile: look again, once.
    for attempt in 0..2 {
        if attempt > 0 {
            if let Some(full) = repo.get(&ObjectName::Segment(file.clone())).await? {
                return Ok(Some(full));
            }
        }
        let chunks = repo.list_chunks(file).await?;
        if chunks.is_empty() {
            return Ok(None);
        }
        let plan = chunks::plan(&chunks).map_err(|u| match u {
            Uncovered::MissingStart { first } => anyhow!(
                "the chunks of {file} do not start at offset 0 (first at {first:08X}): WAL at the start of this segment is missing from the repository"
            ),
            Uncovered::Hole { from, to } => anyhow!(
                "the chunks of {file} have a hole from {from:08X} to {to:08X}: WAL is missing from the repository"
            ),
        })?;
        let parts: Vec<Option<Vec<u8>>> = futures::stream::iter(plan.iter().copied())
            .map(|(s, e)| repo.get_chunk(file, s, e))
            .buffered(CHUNK_FETCH_CONCURRENCY)
            .try_collect()
            .await?;
        if parts.iter().any(Option::is_none) {
            continue;
        }
        let mut buf = vec![0u8; segment_size as usize];
        let mut pos = 0u64;
        for ((start, end), part) in plan.iter().zip(parts) {
            let part = part.expect("checked above");
            if part.len() as u64 != end - start || *end > segment_size {
                bail!(
                    "chunk {start:08X}-{end:08X} of {file} holds {} bytes",
                    part.len()
                );
            }
            let overlap = (pos - start) as usize;
            if buf[*start as usize..pos as usize] != part[..overlap] {
                bail!("overlapping chunks of {file} disagree at {start:08X}-{pos:08X}: the repository holds two different versions of this WAL");
            }
            buf[pos as usize..*end as usize].copy_from_slice(&part[overlap..]);
            pos = *end;
        }
        debug!(
            "assembled {file} from {} chunk(s), {pos} bytes of WAL",
            plan.len()
        );
        return Ok(Some(buf));
    }
    bail!("the chunks of {file} kept changing while it was being read; try again")
}

fn spawn_prefetcher(cfg: &Config, name: &str) {
    use std::os::unix::process::CommandExt;
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let r = std::process::Command::new(exe)
        .arg("--config")
        .arg(&cfg.path)
        .arg("wal-prefetch")
        .arg(name)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn();
    if let Err(e) = r {
        debug!("could not start the prefetcher: {e}");
    }
}

/// `walsafe wal-prefetch NAME`: downloads the raw objects of the segments
/// after NAME into the prefetch directory, and drops those at or before it.
/// One prefetcher per directory at a time (lock file); a second just exits.
pub async fn prefetch(cfg: &Config, name: &str) -> anyhow::Result<()> {
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
    let repo = Repository::open(&cfg.repository)?;
    let d = repo
        .descriptor()
        .await?
        .ok_or_else(|| anyhow!("no repository at {}", cfg.repository.url))?;
    let seg = SegmentName::parse(name, d.segment_size)
        .ok_or_else(|| anyhow!("{name} is not a segment name"))?;
    // Drop what recovery has passed.
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if let Some(s) = SegmentName::parse(&n, d.segment_size) {
                if s.segno <= seg.segno {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
    let mut next = seg;
    for _ in 0..cfg.fetch.prefetch {
        next = next.next();
        let n = next.file_name(d.segment_size);
        let path = dir.join(&n);
        if path.exists() {
            continue;
        }
        match repo
            .get_raw(&ObjectName::Segment(SegmentFile::of(next, d.segment_size)))
            .await?
        {
            Some(raw) => {
                let p = path.clone();
                let fsync = cfg.fsync;
                tokio::task::spawn_blocking(move || fsync.write_atomically(&p, &raw, 0o600))
                    .await??;
            }
            None => break,
        }
    }
    drop(lock);
    Ok(())
}
