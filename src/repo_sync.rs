//! repo-sync: `walsafe repo-sync --from A --to B` completes repository B
//! from repository A, so that a repository added to a running site (or
//! one that was down longer than the spool could hold its backlog) holds
//! the whole archive without a new base backup.
//!
//! ```text
//! A ──list──▶ what B lacks ──get (envelope verified, segments page-checked)──▶ put create-only ──▶ B
//!                                                                              └── read back, compared
//! ```
//!
//! Rules:
//!
//! * **Create-only.** Nothing in B is overwritten or removed. An object B
//!   holds is skipped (B is listed first); one written meanwhile with the
//!   same content (a running agent) is fine; different content under the
//!   same name is a conflict, reported and left alone.
//! * **Verified.** Every object is read from A through its envelope
//!   (authenticated with A's key, or checksummed), WAL segments are
//!   checked page by page against the cluster, backup parts against A's
//!   backup record; it is written to B through B's own envelope (B may have
//!   another key or compression) and read back from B and compared. A
//!   damaged object in A is reported and not copied; the others are.
//! * **Same cluster.** B is pinned to A's cluster; a B pinned to another
//!   one is refused before anything is copied.
//! * **Order.** History files first, then the WAL, gaps and chunks, then
//!   base backups (parts, then a record of B's own listing the objects as
//!   B stored them, written last: a sync stopped midway leaves an
//!   incomplete backup in B, which no restore uses and the next run
//!   completes), then drill results.
//! * **Idempotent.** A second run copies only what is still missing.

use std::collections::BTreeSet;

use anyhow::{anyhow, Context};
use bytes::Bytes;
use futures::StreamExt;

use crate::backup::record::PartRecord;
use crate::pg::page::validate_segment;
use crate::pg::ClusterIdentity;
use crate::repository::{ObjectName, Repository};

/// Objects copied at once (each holds up to a segment three times over).
const COPIES_IN_FLIGHT: usize = 2;

/// What a sync did.
#[derive(Debug, Default)]
pub struct Summary {
    /// Objects written to B, by kind (see [`kind_of`]).
    pub copied: std::collections::BTreeMap<&'static str, usize>,
    /// Plaintext bytes written to B.
    pub bytes: u64,
    /// Objects B already held.
    pub skipped: usize,
    /// Objects that could not be copied, each with why.
    pub failed: Vec<String>,
}

/// The kind an object is counted under.
fn kind_of(name: &ObjectName) -> &'static str {
    match name {
        ObjectName::Segment(_) | ObjectName::ClosedPartial(_) => "wal",
        ObjectName::History(_) | ObjectName::BackupHistory(_) => "history",
        ObjectName::Chunk { .. } => "chunks",
        ObjectName::Gap { .. } => "gaps",
        ObjectName::BackupPart { .. } => "backup parts",
        ObjectName::BackupRecord(_) => "backups",
        ObjectName::Drill(_) => "drills",
        ObjectName::Descriptor | ObjectName::Probe(_) => "other",
    }
}

/// The order objects are copied in (see the module doc).
fn rank(name: &ObjectName) -> u8 {
    match name {
        ObjectName::History(_) => 0,
        ObjectName::Segment(_) | ObjectName::ClosedPartial(_) | ObjectName::BackupHistory(_) => 1,
        ObjectName::Gap { .. } => 2,
        ObjectName::Chunk { .. } => 3,
        _ => 4,
    }
}

/// Copies into `to` what `from` holds and `to` lacks (see the module doc).
/// `Err` when nothing could be compared (a repository unreadable, B of
/// another cluster); objects that failed are in [`Summary::failed`].
pub async fn sync(from: &Repository, to: &Repository) -> anyhow::Result<Summary> {
    let d = from.descriptor().await?.ok_or_else(|| {
        anyhow!(
            "there is no walsafe repository at {} (no descriptor)",
            from.url()
        )
    })?;
    from.verify_descriptor(&d, None)?;
    let identity = d.identity();
    to.pin(&identity)
        .await
        .with_context(|| format!("repository {:?} cannot take this archive", to.name()))?;

    let mut have: BTreeSet<ObjectName> = BTreeSet::new();
    have.extend(to.list_wal_side().await?.0.into_iter().map(|(n, _)| n));
    have.extend(
        to.list_backup_objects(None)
            .await?
            .into_iter()
            .map(|(n, _)| n),
    );
    have.extend(to.list_drills().await?);

    let mut summary = Summary::default();
    let mut wal: Vec<ObjectName> = from
        .list_wal_side()
        .await?
        .0
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    wal.sort_by_key(|n| (rank(n), n.clone()));
    let drills = from.list_drills().await?;
    let mut plain = Vec::new();
    for n in wal.into_iter().chain(drills) {
        if have.contains(&n) {
            summary.skipped += 1;
        } else {
            plain.push(n);
        }
    }
    // History files go first, alone: WAL of a timeline never lands in B
    // before the history that leads to it.
    let (histories, rest): (Vec<_>, Vec<_>) = plain.into_iter().partition(|n| rank(n) == 0);
    for batch in [histories, rest] {
        let copies = futures::stream::iter(batch)
            .map(|n| async move {
                let r = copy(from, to, &n, identity).await;
                (n, r)
            })
            .buffered(COPIES_IN_FLIGHT);
        futures::pin_mut!(copies);
        while let Some((n, r)) = copies.next().await {
            summary.count_some(&n, r);
        }
    }

    for (backup, record, _, _) in crate::backup::list(from).await? {
        let Some(mut record) = record else {
            continue; // incomplete in A: nothing a restore could use
        };
        if have.contains(&ObjectName::backup_record(&backup)?) {
            summary.skipped += 1;
            continue;
        }
        match copy_backup(from, to, &mut record, &mut summary).await {
            Ok(()) => {
                let name = ObjectName::backup_record(&backup)?;
                let r = put_checked(to, &name, Bytes::from(record.to_json())).await;
                summary.count(&name, r);
            }
            Err(e) => summary.failed.push(format!(
                "backup {backup}: {}; its record was not written, so B holds it as incomplete",
                crate::report::error_line(&e)
            )),
        }
    }
    Ok(summary)
}

impl Summary {
    fn count(&mut self, name: &ObjectName, r: anyhow::Result<u64>) {
        self.count_some(name, r.map(Some));
    }

    /// [`Summary::count`] of a copy that may have found its object gone
    /// (`None`: deleted since the listing, as the agent deletes a
    /// segment's chunks once the segment is stored).
    fn count_some(&mut self, name: &ObjectName, r: anyhow::Result<Option<u64>>) {
        match r {
            Ok(None) => self.skipped += 1,
            Ok(Some(bytes)) => {
                *self.copied.entry(kind_of(name)).or_default() += 1;
                self.bytes += bytes;
            }
            Err(e) => self
                .failed
                .push(format!("{name}: {}", crate::report::error_line(&e))),
        }
    }
}

/// Copies one object: read from `from` (verified), written to `to`, read
/// back; its plaintext length, `None` when it is gone from `from` since
/// it was listed.
async fn copy(
    from: &Repository,
    to: &Repository,
    name: &ObjectName,
    identity: ClusterIdentity,
) -> anyhow::Result<Option<u64>> {
    let Some(data) = from.get(name).await? else {
        return Ok(None);
    };
    if let ObjectName::Segment(file) = name {
        let seg = file
            .segment(identity.segment_size)
            .ok_or_else(|| anyhow!("not a segment of {} MiB", identity.segment_size >> 20))?;
        let data = data.clone();
        tokio::task::spawn_blocking(move || validate_segment(&identity, seg, &data))
            .await?
            .context("not valid WAL of this cluster")?;
    }
    put_checked(to, name, Bytes::from(data)).await.map(Some)
}

/// Writes `data` as `name` into `to` (create-only), then reads it back and
/// compares; its length.
async fn put_checked(to: &Repository, name: &ObjectName, data: Bytes) -> anyhow::Result<u64> {
    to.put(name, data.clone()).await?;
    verify_copy(to, name, &data).await?;
    Ok(data.len() as u64)
}

async fn verify_copy(to: &Repository, name: &ObjectName, data: &[u8]) -> anyhow::Result<()> {
    let back = to
        .get(name)
        .await?
        .ok_or_else(|| anyhow!("written, but not found when read back"))?;
    if back != data {
        anyhow::bail!("read back from {} with other content", to.name());
    }
    Ok(())
}

/// Copies the parts of backup `record` (each checked against A's record),
/// and rewrites `record`'s parts as B stored them.
async fn copy_backup(
    from: &Repository,
    to: &Repository,
    record: &mut crate::backup::record::BackupRecord,
    summary: &mut Summary,
) -> anyhow::Result<()> {
    let backup = record.name.clone();
    let mut stored_total = 0;
    for archive in &mut record.archives {
        for (i, part) in archive.parts.iter_mut().enumerate() {
            let name = ObjectName::backup_part(&backup, &archive.name, part.index)?;
            let data =
                crate::backup::verify::check_part(from, &backup, &archive.name, i as u32, part)
                    .await?
                    .map_err(|problem| anyhow!("{problem}"))?;
            let (stored_size, stored_blake3) = to.put_digest(&name, data.clone()).await?;
            verify_copy(to, &name, &data).await?;
            *part = PartRecord {
                index: part.index,
                size: part.size,
                stored_size,
                stored_blake3,
                also: Vec::new(),
            };
            stored_total += stored_size;
            summary.count(&name, Ok(data.len() as u64));
        }
    }
    record.stored_size = stored_total;
    Ok(())
}
