//! push: `walsafe wal-push PATH`, PostgreSQL's `archive_command`.
//!
//! Writes the same objects as the streaming agent, so the two can be used
//! together: a segment the stream already stored is found with identical
//! content and the push succeeds; different content under the same name is
//! refused (rule 3 of README's Guarantees) and archive_command fails, which PostgreSQL
//! retries and logs, keeping the file in pg_wal.
//!
//! Every file PostgreSQL hands to `archive_command` is accepted when it is
//! sound; one refused forever would stop archiving for good (PostgreSQL
//! retries the same file and never moves on):
//!
//! * **segments** are validated page by page before upload (rule 5): the
//!   long header must carry the repository's system identifier. The first
//!   push into an empty repository pins it to the segment's cluster.
//! * **the old timeline's `.partial`** (PostgreSQL renames the segment the
//!   old timeline ended in after a promotion). Only its bytes up to the
//!   switch point are WAL of that timeline; the rest is whatever the file
//!   held before (usually a recycled segment, whose pages carry other
//!   addresses). The switch point comes from the history file of the
//!   timeline that branched off, which PostgreSQL archives before the
//!   `.partial` and walsafe therefore reads from the repository. The
//!   `.partial` is validated up to there and stored, zeroed past the switch
//!   point, as the repository's closed partial (see [`closed_partial`]).
//! * **history files** and **backup history files**
//!   (`<segment>.<offset>.backup`) are stored as they are. They carry no
//!   system identifier; into a repository without a descriptor yet (a
//!   promotion archiving into a fresh repository: the history file comes
//!   first) the repository is pinned from a segment in the same directory
//!   (`pg_wal`, where `%p` points), whose long header names the cluster.
//!   Where the repository is pinned already, such a segment, if found, is
//!   checked against it, so another cluster's history file is refused too.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use tracing::{info, warn};

use crate::config::Config;
use crate::pg::lsn::history_entries;
use crate::pg::page::{pg_major_of_magic, read_long_header, validate_segment};
use crate::pg::walfile::{classify, history_file_name, NameKind};
use crate::pg::{ClusterIdentity, Lsn, SegmentName, TimelineId};
use crate::repository::object::is_backup_history;
use crate::repository::{ObjectName, PutOutcome, Repository, RepositoryConfig};

/// Stores the WAL file at `path` in every repository.
pub async fn wal_push(cfg: &Config, path: &Path) -> anyhow::Result<()> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| anyhow!("{} has no file name", path.display()))?
        .to_string();
    let kind = classify(&name);
    if kind.is_none() && !is_backup_history(&name) {
        bail!("{name} is not a WAL file name; archive_command must pass %p");
    }
    let data = tokio::fs::read(path)
        .await
        .with_context(|| format!("cannot read {}", path.display()))?;
    // Every repository gets the file; one that fails does not keep it
    // from the others, and fails archive_command (PostgreSQL keeps the
    // file and retries; those that stored it find it stored next time).
    let mut failures = Vec::new();
    for rc in &cfg.repositories {
        let r = push_into(rc, path, &name, kind, data.clone()).await;
        match r {
            Ok(()) => {}
            Err(e) if cfg.repositories.len() == 1 => return Err(e),
            Err(e) => {
                let e = e.context(format!("repository {:?}", rc.name));
                warn!("{}", crate::report::error_line(&e));
                failures.push(e);
            }
        }
    }
    match failures.into_iter().next() {
        None => Ok(()),
        Some(e) => Err(e),
    }
}

/// Stores the file `name` (at `path`, holding `data`) in repository `rc`.
async fn push_into(
    rc: &RepositoryConfig,
    path: &Path,
    name: &str,
    kind: Option<NameKind>,
    mut data: Vec<u8>,
) -> anyhow::Result<()> {
    let name = name.to_string();
    let repo =
        Repository::open(rc).with_context(|| format!("cannot open the repository {}", rc.url))?;
    if matches!(kind, Some(NameKind::Segment | NameKind::Partial)) {
        let ident = identity_of_segment(&name, &data)?;
        let descriptor = repo.pin(&ident).await?;
        let ident = descriptor.identity();
        let seg = SegmentName::parse(&name[..24], descriptor.segment_size)
            .ok_or_else(|| anyhow!("{name} is not a valid segment name"))?;
        if kind == Some(NameKind::Partial) {
            let switch = switch_point(&repo, seg.timeline, path).await?;
            closed_partial(&name, seg, switch, &mut data, descriptor.segment_size)?;
        }
        validate_segment(&ident, seg, &data)
            .with_context(|| format!("{name} failed validation and was not archived"))?;
    } else {
        let dir = path.parent().unwrap_or(Path::new("."));
        match local_identity(dir) {
            Some(ident) => {
                // Pins a fresh repository; checks an existing one.
                repo.pin(&ident).await?;
            }
            None if repo.descriptor().await?.is_none() => bail!(
                "the repository {} has no descriptor yet and no WAL segment beside {} names the cluster; push a WAL segment (or start `walsafe run`) first",
                rc.url,
                path.display()
            ),
            None => {}
        }
    }
    match repo.put_wal(&name, Bytes::from(data)).await? {
        PutOutcome::Stored => info!("stored {name}"),
        PutOutcome::AlreadyStored => info!("{name} was already stored with the same content"),
    }
    Ok(())
}

/// The cluster a segment file's long header names.
fn identity_of_segment(name: &str, data: &[u8]) -> anyhow::Result<ClusterIdentity> {
    let header = read_long_header(data)
        .with_context(|| format!("{name} does not start with a WAL segment header"))?;
    let major = pg_major_of_magic(header.magic).ok_or_else(|| {
        anyhow!(
            "{name} has WAL page magic {:#06X}, not of a PostgreSQL version walsafe knows",
            header.magic
        )
    })?;
    Ok(ClusterIdentity::new(
        header.system_identifier,
        major * 10000,
        u64::from(header.segment_size),
    ))
}

/// The cluster that owns `dir` (pg_wal), from the newest segment there
/// that starts with a valid long header. Pre-allocated segments (zeros)
/// are skipped; recycled ones still carry this cluster's identifier.
fn local_identity(dir: &Path) -> Option<ClusterIdentity> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| matches!(classify(n), Some(NameKind::Segment | NameKind::Partial)))
        .collect();
    names.sort_unstable_by(|a, b| b.cmp(a));
    names.into_iter().find_map(|n| {
        let mut first = vec![0u8; crate::pg::WAL_BLOCK_SIZE as usize];
        std::fs::File::open(dir.join(&n))
            .and_then(|mut f| f.read_exact(&mut first))
            .ok()?;
        identity_of_segment(&n, &first).ok()
    })
}

/// The switch point recorded for `timeline` in history `text`.
fn switch_in_history(text: &str, timeline: TimelineId) -> Option<Lsn> {
    history_entries(text).find_map(|(t, at)| (t == timeline).then_some(at))
}

/// Where `timeline` ended, from the stored history files of later
/// timelines. Several timelines may have branched off it (a second
/// promotion from the same parent) at different points; then the history
/// file beside `partial` in pg_wal (the promoting server's own) decides.
async fn switch_point(
    repo: &Repository,
    timeline: TimelineId,
    partial: &Path,
) -> anyhow::Result<Lsn> {
    let mut found: BTreeMap<TimelineId, (Lsn, Vec<u8>)> = BTreeMap::new();
    for o in repo.list_wal().await? {
        let ObjectName::History(t) = o else { continue };
        if t <= timeline {
            continue;
        }
        let Some(text) = repo.get_wal(&history_file_name(t)).await? else {
            continue;
        };
        if let Some(at) = switch_in_history(&String::from_utf8_lossy(&text), timeline) {
            found.insert(t, (at, text));
        }
    }
    let name = partial.file_name().unwrap_or_default().to_string_lossy();
    let points: std::collections::BTreeSet<Lsn> = found.values().map(|(at, _)| *at).collect();
    match points.len() {
        0 => bail!(
            "{name}: no history file of a timeline after {timeline} is in the repository {}, so where timeline {timeline} ended is unknown; PostgreSQL archives the new timeline's history file before the .partial: push it (archive_command retries this file)",
            repo.url()
        ),
        1 => Ok(*points.first().expect("one point")),
        _ => {
            let dir = partial.parent().unwrap_or(Path::new("."));
            let local: std::collections::BTreeSet<Lsn> = found
                .iter()
                .filter(|(t, (_, text))| {
                    std::fs::read(dir.join(history_file_name(**t))).ok().as_ref() == Some(text)
                })
                .map(|(_, (at, _))| *at)
                .collect();
            if local.len() == 1 {
                return Ok(*local.first().expect("one point"));
            }
            bail!(
                "{name}: timeline {timeline} ended at several points according to the history files in the repository {} ({}), and no history file beside {} says which one this server followed; archive it by hand once you know which",
                repo.url(),
                points.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", "),
                partial.display()
            )
        }
    }
}

/// Turns PostgreSQL's `.partial` into the repository's closed partial:
/// the WAL of `seg`'s timeline up to `switch`, then zeros.
///
/// Why zeros and not the file as PostgreSQL left it: the bytes past the
/// switch point are not WAL of this timeline (they are whatever the file
/// held before: a recycled segment, or WAL the promoted server never
/// replayed), so nothing is lost by zeroing them, and
/// * the streaming agent stores exactly this (it receives the old timeline
///   up to the switch point and closes the segment with zeros): both
///   writers produce byte-identical objects, so the create-only compare
///   finds "already stored", never a conflict (rule 3);
/// * `wal-fetch` validates every page of what it serves: a recycled tail
///   fails that and would make the object unservable;
/// * recovery that reads this segment past the switch point (on the old
///   timeline) meets zeros, the unambiguous end of WAL, never records of
///   another segment.
fn closed_partial(
    name: &str,
    seg: SegmentName,
    switch: Lsn,
    data: &mut [u8],
    segment_size: u64,
) -> anyhow::Result<()> {
    let (start, end) = (seg.start_lsn(segment_size), seg.end_lsn(segment_size));
    if switch <= start || switch > end {
        bail!(
            "{name}: timeline {} ended at {switch} according to its history, which is not inside this segment ({start} to {end}); this .partial does not belong to that timeline's end, so it is not archived",
            seg.timeline
        );
    }
    if data.len() as u64 != segment_size {
        bail!(
            "{name} holds {} bytes, not the segment size {segment_size}",
            data.len()
        );
    }
    let keep = switch.bytes_after(start) as usize;
    if data[keep..].iter().any(|&b| b != 0) {
        warn!(
            "{name}: zeroing {} bytes past the switch point {switch} (not WAL of timeline {})",
            data.len() - keep,
            seg.timeline
        );
    }
    data[keep..].fill(0);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switch_points_from_history() {
        let h = "1\t0/5000028\tno recovery target specified\n\n2\t0/9000000\tx\n";
        assert_eq!(switch_in_history(h, TimelineId(1)), Some(Lsn(0x5000028)));
        assert_eq!(switch_in_history(h, TimelineId(2)), Some(Lsn(0x9000000)));
        assert_eq!(switch_in_history(h, TimelineId(3)), None);
    }

    #[test]
    fn closed_partial_keeps_wal_up_to_the_switch_and_zeros_the_rest() {
        let size = 16 << 20;
        let seg = SegmentName {
            timeline: TimelineId(1),
            segno: 5,
        };
        let mut data = vec![7u8; size as usize];
        closed_partial("x", seg, Lsn(0x5000028), &mut data, size).unwrap();
        assert!(data[..0x28].iter().all(|&b| b == 7));
        assert!(data[0x28..].iter().all(|&b| b == 0));
        let mut data = vec![7u8; size as usize];
        assert!(closed_partial("x", seg, Lsn(0x7000000), &mut data, size).is_err());
        assert!(closed_partial("x", seg, Lsn(0x5000000), &mut data, size).is_err());
        // Ending exactly at the segment's end keeps it whole.
        closed_partial("x", seg, Lsn(0x6000000), &mut data, size).unwrap();
        assert!(data.iter().all(|&b| b == 7));
    }
}
