//! rekey: which key protects which objects, and re-encrypting those under
//! older keys with the current one (`walsafe key-rotate`, `check`,
//! `status`).
//!
//! ```text
//! census   LIST wal/ chunks/ gaps/ backups/ drills/, then the first 23 bytes of each object: its key id
//! rewrite  per object: GET → verify and decompress, seal the compressed body under the current key
//!          (never compressing again), open it again → replace in one atomic step, conditional
//!          on the version read → GET, compare
//! ```
//!
//! # Invariants
//!
//! * **Never a moment without the object.** An object is replaced in one
//!   atomic step ([`crate::repository::Store::replace`]): its name holds
//!   the old object or the new one, never neither; both decrypt with the
//!   ring. A kill anywhere leaves every object readable; the next run
//!   finishes (objects already under the current key are passed over).
//! * **Same plaintext.** The old object is verified and decompressed; the
//!   new one carries the same compressed body, opened under the new key
//!   and compared before it is written, and read back after.
//! * **Never brings back what was deleted.** The replace is conditional on
//!   the object still being the one read: a chunk removed by the agent or
//!   a segment expired by `walsafe retain` meanwhile stays removed.
//! * **Backups stay restorable throughout.** A backup's record lists the
//!   BLAKE3 of each stored part, so a part is replaced only after the
//!   record accepts the new object too (`also`); the record then names
//!   the new object alone. A restore that read the record before reads it
//!   again when a part does not match (`backup::verify::check_part`). The
//!   parts of a backup without a record (taken right now, or abandoned)
//!   are left alone: their record will list them as written.
//! * Concurrent with a running agent: the agent only creates objects; one
//!   still encrypting under an old key (not yet reloaded) leaves objects
//!   the final census counts, and the summary says so.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;

use crate::backup::record::{BackupRecord, StoredForm};
use crate::backup::Progress;
use crate::repository::object::{
    BACKUPS_PREFIX, CHUNKS_PREFIX, DRILLS_PREFIX, GAPS_PREFIX, WAL_PREFIX,
};
use crate::repository::{Fetched, ObjectName, Replaced, Repository};

/// How an unencrypted object is counted.
pub const UNENCRYPTED: &str = "none";
/// Headers read at once by a census.
const PEEKS_AT_ONCE: usize = 16;
/// Objects re-encrypted at once (the CPU lanes bound the work anyway).
const REWRITES_AT_ONCE: usize = 4;

/// Objects and bytes protected by one key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    pub objects: u64,
    pub bytes: u64,
}

/// One object and the key its header names.
#[derive(Debug, Clone)]
pub struct Listed {
    pub name: ObjectName,
    pub size: u64,
    /// Hex key id, or [`UNENCRYPTED`].
    pub key: String,
}

/// Which key protects which objects.
#[derive(Debug, Clone, Default)]
pub struct Census {
    /// Per key id (hex, or [`UNENCRYPTED`]).
    pub per_key: BTreeMap<String, Tally>,
    pub objects: Vec<Listed>,
}

impl Census {
    /// What key `id` protects (zero when nothing).
    pub fn of(&self, id: &str) -> Tally {
        self.per_key.get(id).copied().unwrap_or_default()
    }

    /// What every key but `current` protects.
    pub fn not_under(&self, current: &str) -> Tally {
        self.per_key
            .iter()
            .filter(|(k, _)| *k != current)
            .fold(Tally::default(), |t, (_, x)| Tally {
                objects: t.objects + x.objects,
                bytes: t.bytes + x.bytes,
            })
    }

    /// The keys some object needs.
    pub fn keys(&self) -> Vec<String> {
        self.per_key
            .keys()
            .filter(|k| *k != UNENCRYPTED)
            .cloned()
            .collect()
    }
}

/// Counts the repository's objects per key: every object walsafe keeps
/// (WAL, chunks, gap records, backups, drill results), by its header.
/// An object whose header cannot be read is an error naming it.
pub async fn census(repo: &Repository) -> anyhow::Result<Census> {
    let mut listed = Vec::new();
    for prefix in [
        WAL_PREFIX,
        CHUNKS_PREFIX,
        GAPS_PREFIX,
        BACKUPS_PREFIX,
        DRILLS_PREFIX,
    ] {
        listed.extend(repo.list_named(prefix).await?);
    }
    let objects: Vec<Listed> = futures::stream::iter(listed)
        .map(|(name, size)| async move {
            let id = repo
                .peek_key_id(&name, size)
                .await
                .with_context(|| format!("cannot tell which key protects {name}"))?;
            anyhow::Ok(id.map(|id| Listed {
                key: id.map_or_else(|| UNENCRYPTED.to_string(), hex::encode),
                name,
                size,
            }))
        })
        .buffer_unordered(PEEKS_AT_ONCE)
        .try_filter_map(|l| async move { Ok(l) })
        .try_collect()
        .await?;
    let mut per_key: BTreeMap<String, Tally> = BTreeMap::new();
    for o in &objects {
        let t = per_key.entry(o.key.clone()).or_default();
        t.objects += 1;
        t.bytes += o.size;
    }
    Ok(Census { per_key, objects })
}

/// What a rewrite did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Rewritten {
    /// Objects now under the current key that were not.
    pub objects: u64,
    /// Their stored bytes before.
    pub bytes: u64,
    /// Objects deleted meanwhile (chunks of a segment since stored,
    /// expired WAL): left deleted.
    pub gone: u64,
    /// Parts of backups without a record, left as they are.
    pub skipped: u64,
}

/// Re-encrypts every object of `census` that is not under the
/// repository's current key (see the module doc), telling `progress` the
/// stored bytes done of those to do.
pub async fn rewrite(
    repo: &Repository,
    census: &Census,
    progress: &mut dyn Progress,
) -> anyhow::Result<Rewritten> {
    let current = repo
        .key_id()
        .ok_or_else(|| anyhow!("{} is not encrypted: no key to rewrite under", repo.name()))?;
    let mut done = Rewritten::default();
    // Per backup: the keys of its objects under older keys, and their bytes.
    let mut backups: BTreeMap<String, (BTreeSet<String>, u64)> = BTreeMap::new();
    let mut plain = Vec::new();
    for o in &census.objects {
        match &o.name {
            ObjectName::BackupPart { backup, .. } | ObjectName::BackupRecord(backup) => {
                let (stale, bytes) = backups.entry(backup.clone()).or_default();
                if o.key != current {
                    stale.insert(o.name.key());
                    *bytes += o.size;
                }
            }
            _ if o.key != current => plain.push(o),
            _ => {}
        }
    }
    let total = census.not_under(&current).bytes;
    let mut passed = 0;
    progress.phase("re-encrypting base backups");
    for (backup, (stale, bytes)) in &backups {
        let r = rewrite_backup(repo, backup, stale)
            .await
            .with_context(|| format!("re-encrypting backup {backup}"))?;
        done.objects += r.objects;
        done.bytes += r.bytes;
        done.gone += r.gone;
        done.skipped += r.skipped;
        passed += bytes;
        progress.update(passed, Some(total));
    }
    progress.phase("re-encrypting WAL and the other objects");
    let mut outcomes = futures::stream::iter(plain)
        .map(|o| async move {
            let outcome = rewrite_object(repo, &o.name)
                .await
                .with_context(|| format!("re-encrypting {}", o.name))?;
            anyhow::Ok((outcome, o.size))
        })
        .buffer_unordered(REWRITES_AT_ONCE);
    while let Some(r) = outcomes.next().await {
        let (outcome, size) = r?;
        match outcome {
            Outcome::Rewritten => {
                done.objects += 1;
                done.bytes += size;
            }
            Outcome::Gone => done.gone += 1,
            Outcome::AlreadyCurrent => {}
        }
        passed += size;
        progress.update(passed, Some(total));
    }
    Ok(done)
}

/// What became of one object.
enum Outcome {
    Rewritten,
    AlreadyCurrent,
    Gone,
}

/// Re-encrypts one object that no record lists by hash.
async fn rewrite_object(repo: &Repository, name: &ObjectName) -> anyhow::Result<Outcome> {
    let Some(f) = repo.fetch_for_rewrite(name).await? else {
        return Ok(Outcome::Gone);
    };
    if repo.under_current_key(&f.raw) {
        return Ok(Outcome::AlreadyCurrent);
    }
    let rekeyed = repo.reencrypt(name, f.raw).await?;
    let outcome = match repo.replace(name, &f.seen, rekeyed).await? {
        Replaced::Ours => Outcome::Rewritten,
        Replaced::Gone => Outcome::Gone,
        // Re-encrypted by another key-rotate meanwhile.
        Replaced::Other(now) if repo.under_current_key(&now) => Outcome::AlreadyCurrent,
        Replaced::Other(_) => {
            bail!("{name} changed while it was being re-encrypted; run key-rotate again")
        }
    };
    fail::fail_point!("rekey::replaced", |_| {
        // A crash right after an object was replaced (tests).
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        Ok(Outcome::Rewritten)
    });
    Ok(outcome)
}

/// Re-encrypts backup `backup`: its parts named in `stale`, each accepted
/// by the record before it is replaced, and the record itself.
async fn rewrite_backup(
    repo: &Repository,
    backup: &str,
    stale: &BTreeSet<String>,
) -> anyhow::Result<Rewritten> {
    let mut done = Rewritten::default();
    let record_name = ObjectName::backup_record(backup)?;
    let Some(f) = repo.fetch_for_rewrite(&record_name).await? else {
        // Being taken, or abandoned: its record will list what it wrote.
        done.skipped = stale.len() as u64;
        return Ok(done);
    };
    let mut record_seen = f.seen;
    let plain = repo.decode_raw(&record_name, f.raw.clone()).await?;
    let mut record = BackupRecord::parse(&plain).map_err(|e| anyhow!("{record_name}: {e}"))?;
    let mut dirty = !repo.under_current_key(&f.raw)
        || record
            .archives
            .iter()
            .any(|a| a.parts.iter().any(|p| !p.also.is_empty()));
    for a in 0..record.archives.len() {
        for p in 0..record.archives[a].parts.len() {
            let archive = record.archives[a].name.clone();
            let part = &record.archives[a].parts[p];
            let name = ObjectName::backup_part(backup, &archive, part.index)?;
            if !stale.contains(&name.key()) && part.also.is_empty() {
                continue;
            }
            let Some(pf) = repo.fetch_for_rewrite(&name).await? else {
                bail!("{name} is missing; run `walsafe backup-verify {backup}`")
            };
            let (len, hash) = stored_form(&pf.raw).await?;
            if !part.accepts(len, &hash) {
                bail!("{name} is not the object its record lists; run `walsafe backup-verify {backup}`")
            }
            let part = &mut record.archives[a].parts[p];
            if repo.under_current_key(&pf.raw) {
                // Replaced by a run that stopped before saying so.
                part.stored_size = len;
                part.stored_blake3 = hash;
                part.also.clear();
                dirty = true;
                continue;
            }
            let Fetched { raw, seen } = pf;
            let encoded = repo.reencrypt(&name, raw.clone()).await?;
            let (new_len, new_hash) = stored_form(&encoded).await?;
            part.also = vec![StoredForm {
                stored_size: new_len,
                stored_blake3: new_hash.clone(),
            }];
            // The record accepts the new object before it exists.
            record_seen = write_record(repo, &record_name, &record_seen, &record).await?;
            match repo.replace(&name, &seen, encoded).await? {
                Replaced::Ours => {}
                Replaced::Gone => bail!("{name} was deleted meanwhile (walsafe retain?)"),
                Replaced::Other(_) => bail!("{name} changed meanwhile; run key-rotate again"),
            }
            fail::fail_point!("rekey::replaced", |_| {
                let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
                Ok(done)
            });
            let part = &mut record.archives[a].parts[p];
            part.stored_size = new_len;
            part.stored_blake3 = new_hash;
            part.also.clear();
            done.objects += 1;
            done.bytes += raw.len() as u64;
            dirty = true;
        }
    }
    if dirty {
        let was_stale = stale.contains(&record_name.key());
        write_record(repo, &record_name, &record_seen, &record).await?;
        if was_stale {
            done.objects += 1;
            done.bytes += f.raw.len() as u64;
        }
    }
    Ok(done)
}

/// Replaces a backup's record (as `seen`) with `record` under the current
/// key; returns the version now stored.
async fn write_record(
    repo: &Repository,
    name: &ObjectName,
    seen: &crate::repository::store::Seen,
    record: &BackupRecord,
) -> anyhow::Result<crate::repository::store::Seen> {
    let encoded = repo
        .encode_checked(name, Bytes::from(record.to_json()))
        .await?;
    match repo.replace(name, seen, encoded).await? {
        Replaced::Ours => {}
        Replaced::Gone => bail!("{name} was deleted meanwhile (walsafe retain?)"),
        Replaced::Other(_) => bail!("{name} changed meanwhile; run key-rotate again"),
    }
    let f = repo
        .fetch_for_rewrite(name)
        .await?
        .ok_or_else(|| anyhow!("{name} was deleted meanwhile (walsafe retain?)"))?;
    Ok(f.seen)
}

/// A stored object's length and BLAKE3 (as a backup record lists it).
async fn stored_form(raw: &Bytes) -> anyhow::Result<(u64, String)> {
    let r = raw.clone();
    let hash = tokio::task::spawn_blocking(move || blake3::hash(&r).to_hex().to_string()).await?;
    Ok((raw.len() as u64, hash))
}
