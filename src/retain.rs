//! retain: `walsafe retain --window 7d [--keep N] [--apply]`, retention
//! by recovery window.
//!
//! 1. **Backups kept**: every complete backup that started inside the
//!    window, the newest one that started before it (so that the window's
//!    first instant stays restorable), and at least the `--keep` newest.
//!    Backups are ordered by their records (start time, then start LSN),
//!    never by object names.
//! 2. **WAL kept**: what a kept backup needs to reach the end of every
//!    timeline that descends from it: on its timeline and every descendant,
//!    each segment, closed partial, chunk and backup history file from the
//!    backup's first segment on, and the gap records there. Every history
//!    file is kept (they are tiny and tell recovery where timelines went).
//! 3. **Deleted**: the other complete backups, incomplete backups that a
//!    complete backup started after, the WAL no kept backup needs, and
//!    staging files left by interrupted `file://` writes.
//!
//! Without `--apply` nothing is deleted: the plan is printed with sizes.
//! With it, a backup goes record first (a half-deleted backup is an
//! incomplete one, never offered for a restore), then its parts; the WAL
//! goes only after every backup that needed it, oldest segment first, so
//! that a crash midway leaves every kept backup restorable and the archive
//! without holes; the next run finishes the job.
//!
//! Refused: a repository without its descriptor (unpinned: nothing in it
//! is known to be this cluster's) or without a complete backup (nothing
//! would anchor the window).

use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use chrono::{DateTime, Utc};
use serde::Serialize;
use tracing::info;

use crate::backup::record::BackupRecord;
use crate::pg::{SegmentName, TimelineId};
use crate::repository::{ObjectName, Repository};
use crate::restore::Histories;

/// Staging files of `file://` writes older than this are leftovers.
const STAGING_AGE: Duration = Duration::from_secs(3600);

/// What `walsafe retain` was asked.
#[derive(Debug, Clone)]
pub struct RetainArgs {
    pub window: Duration,
    /// Keep at least this many of the newest complete backups.
    pub keep: usize,
}

/// A backup kept, and why.
#[derive(Debug, Clone, Serialize)]
pub struct KeptBackup {
    pub name: String,
    pub start_time: String,
    pub stop_time: String,
    pub timeline: u32,
    pub stored_size: u64,
    pub why: String,
}

/// A backup to delete: its objects (the record first), and why.
#[derive(Debug, Clone, Serialize)]
pub struct DoomedBackup {
    pub name: String,
    pub complete: bool,
    pub stored_size: u64,
    pub why: String,
    #[serde(skip)]
    objects: Vec<ObjectName>,
}

/// The plan: what stays and what goes.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// The window's first instant (RFC 3339).
    pub window_start: String,
    pub kept: Vec<KeptBackup>,
    pub deleted_backups: Vec<DoomedBackup>,
    /// WAL-side objects to delete (keys), oldest first.
    pub deleted_wal: Vec<String>,
    pub deleted_wal_size: u64,
    pub kept_wal_objects: usize,
    pub kept_wal_size: u64,
    /// Per timeline, the first segment kept (what a restore can start from).
    pub first_kept_segment: Vec<String>,
    #[serde(skip)]
    wal_objects: Vec<ObjectName>,
}

impl Plan {
    /// Bytes the plan frees.
    pub fn freed(&self) -> u64 {
        self.deleted_wal_size
            + self
                .deleted_backups
                .iter()
                .map(|b| b.stored_size)
                .sum::<u64>()
    }
}

/// Works out what to keep and what to delete, deleting nothing.
pub async fn plan(
    repo: &Repository,
    args: &RetainArgs,
    now: DateTime<Utc>,
) -> anyhow::Result<Plan> {
    if repo.descriptor().await?.is_none() {
        bail!(
            "{} has no descriptor (walsafe.repo): it is not pinned to a cluster, so nothing in it is known to be yours; start walsafe run (or take a walsafe backup) against it first",
            repo.url()
        );
    }
    let listed = crate::backup::list(repo).await?;
    // Every backup object, listed once: a deleted backup's objects, its
    // record first (a half-deleted backup is an incomplete one).
    let all_objects = repo.list_backup_objects(None).await?;
    let objects_of = |name: &str| -> Vec<ObjectName> {
        let mut v: Vec<ObjectName> = all_objects
            .iter()
            .filter(|(n, _)| match n {
                ObjectName::BackupRecord(b) | ObjectName::BackupPart { backup: b, .. } => b == name,
                _ => false,
            })
            .map(|(n, _)| n.clone())
            .collect();
        v.sort_by_key(|n| !matches!(n, ObjectName::BackupRecord(_)));
        v
    };
    let mut complete: Vec<(DateTime<Utc>, BackupRecord, u64)> = Vec::new();
    for (name, record, _, stored) in &listed {
        if let Some(r) = record {
            let start = parse_time(&r.start_time).with_context(|| {
                format!("the record of backup {name} has an unreadable start time")
            })?;
            complete.push((start, r.clone(), *stored));
        }
    }
    if complete.is_empty() {
        bail!(
            "there is no complete backup in {}: retention keeps what the oldest kept backup needs, so with none nothing anchors the window and nothing can be deleted safely; take one with walsafe backup",
            repo.url()
        );
    }
    // Newest first, by the records: start time, then start LSN.
    complete.sort_by_key(|(t, r, _)| std::cmp::Reverse((*t, r.start_lsn)));
    let window = chrono::Duration::from_std(args.window)
        .map_err(|_| anyhow!("the window {:?} is too long", args.window))?;
    let window_start = now - window;
    let anchor = complete.iter().position(|(t, ..)| *t < window_start);
    let mut kept = Vec::new();
    let mut deleted_backups = Vec::new();
    for (i, (start, r, stored)) in complete.iter().enumerate() {
        let why = if *start >= window_start {
            Some("started inside the window".to_string())
        } else if Some(i) == anchor {
            Some("the newest backup before the window: the window's first instant is restored from it".to_string())
        } else if i < args.keep {
            Some(format!("one of the {} newest (--keep)", args.keep))
        } else {
            None
        };
        match why {
            Some(why) => kept.push((
                r.clone(),
                KeptBackup {
                    name: r.name.clone(),
                    start_time: r.start_time.clone(),
                    stop_time: r.stop_time.clone(),
                    timeline: r.start_timeline.0,
                    stored_size: *stored,
                    why,
                },
            )),
            None => deleted_backups.push(DoomedBackup {
                name: r.name.clone(),
                complete: true,
                stored_size: *stored,
                why: format!(
                    "started {}, before the backup that anchors the window",
                    r.start_time
                ),
                objects: objects_of(&r.name),
            }),
        }
    }
    // Incomplete backups: interrupted (or abandoned) before their record,
    // once a complete backup has started after them. A backup still
    // running started after every complete one and stays.
    let newest_complete = complete[0].0;
    for (name, record, _, stored) in &listed {
        if record.is_some() {
            continue;
        }
        let started = chrono::NaiveDateTime::parse_from_str(name, "%Y%m%dT%H%M%SZ")
            .ok()
            .map(|t| t.and_utc());
        if started.is_some_and(|t| t < newest_complete) {
            deleted_backups.push(DoomedBackup {
                name: name.clone(),
                complete: false,
                stored_size: *stored,
                why: format!(
                    "incomplete (no record), and backup {} started after it",
                    complete[0].1.name
                ),
                objects: objects_of(name),
            });
        }
    }
    // Oldest first: a run stopped midway has removed the oldest.
    deleted_backups.reverse();

    let histories = Histories::read(repo).await?;
    let keepers: Vec<&BackupRecord> = kept.iter().map(|(r, _)| r).collect();
    let needs = |t: TimelineId, segno: u64| {
        keepers.iter().any(|r| {
            histories.descends(t, r.start_timeline) && segno >= r.start_lsn.0 / r.segment_size
        })
    };
    let segment_size = keepers[0].segment_size;
    let (objects, _foreign) = repo.list_wal_side().await?;
    let mut doomed: Vec<((TimelineId, u64, u8), ObjectName, u64)> = Vec::new();
    let (mut kept_wal_objects, mut kept_wal_size) = (0, 0);
    let mut first_kept: std::collections::BTreeMap<TimelineId, u64> = Default::default();
    for (n, size) in objects {
        // Where the object lies (timeline, segment, order within it), and
        // whether a kept backup needs it; unknown kinds are kept.
        let (at, needed) = match &n {
            ObjectName::Segment(f)
            | ObjectName::ClosedPartial(f)
            | ObjectName::Chunk { segment: f, .. } => match f.segment(segment_size) {
                Some(s) => ((s.timeline, s.segno, order(&n)), needs(s.timeline, s.segno)),
                None => ((TimelineId(0), 0, 0), true),
            },
            ObjectName::BackupHistory(name) => {
                match name
                    .get(..24)
                    .and_then(|s| SegmentName::parse(s, segment_size))
                {
                    Some(s) => ((s.timeline, s.segno, order(&n)), needs(s.timeline, s.segno)),
                    None => ((TimelineId(0), 0, 0), true),
                }
            }
            ObjectName::Gap { timeline, to, .. } => {
                let needed = keepers
                    .iter()
                    .any(|r| histories.descends(*timeline, r.start_timeline) && *to > r.start_lsn);
                ((*timeline, to.0 / segment_size, order(&n)), needed)
            }
            _ => ((TimelineId(0), 0, 0), true),
        };
        if needed {
            kept_wal_objects += 1;
            kept_wal_size += size;
            if matches!(n, ObjectName::Segment(_) | ObjectName::ClosedPartial(_)) {
                let e = first_kept.entry(at.0).or_insert(at.1);
                *e = (*e).min(at.1);
            }
        } else {
            doomed.push((at, n, size));
        }
    }
    // Per timeline, oldest segment first; within a segment the chunks
    // before the partial before the segment.
    doomed.sort_by_key(|(at, ..)| *at);
    let deleted_wal_size = doomed.iter().map(|(_, _, s)| s).sum();
    let mut wal_objects = Vec::new();
    let mut deleted_wal = Vec::new();
    for (_, n, _) in doomed {
        deleted_wal.push(n.key());
        wal_objects.push(n);
    }
    Ok(Plan {
        window_start: window_start.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        kept: kept.into_iter().map(|(_, k)| k).collect(),
        deleted_backups,
        deleted_wal,
        deleted_wal_size,
        kept_wal_objects,
        kept_wal_size,
        first_kept_segment: first_kept
            .into_iter()
            .map(|(t, segno)| SegmentName { timeline: t, segno }.file_name(segment_size))
            .collect(),
        wal_objects,
    })
}

/// Deletes what `plan` says, in the safe order (see the module doc).
/// Returns the number of objects deleted.
pub async fn apply(repo: &Repository, plan: &Plan) -> anyhow::Result<usize> {
    let mut deleted = 0;
    for b in &plan.deleted_backups {
        for n in &b.objects {
            delete(repo, n).await?;
            deleted += 1;
        }
        info!(backup = %b.name, "deleted backup ({})", b.why);
    }
    for n in &plan.wal_objects {
        delete(repo, n).await?;
        deleted += 1;
    }
    let staging = repo.remove_stale_staging(STAGING_AGE).await?;
    if staging > 0 {
        info!("removed {staging} staging files left by interrupted writes");
    }
    Ok(deleted + staging)
}

async fn delete(repo: &Repository, n: &ObjectName) -> anyhow::Result<()> {
    fail::fail_point!("retain::delete", |_| Err(anyhow!(
        "failpoint retain::delete before {n}"
    )));
    repo.delete(n)
        .await
        .with_context(|| format!("cannot delete {n}"))
}

fn parse_time(text: &str) -> anyhow::Result<DateTime<Utc>> {
    Ok(DateTime::parse_from_rfc3339(text)?.with_timezone(&Utc))
}

/// The order of deletion within one segment: the chunks before the
/// closed partial before the segment, then its backup history file and
/// the gap records ending in it.
fn order(n: &ObjectName) -> u8 {
    match n {
        ObjectName::Chunk { .. } => 0,
        ObjectName::ClosedPartial(_) => 1,
        ObjectName::Segment(_) => 2,
        ObjectName::BackupHistory(_) => 3,
        _ => 4,
    }
}
