//! `walsafe backup-verify [NAME|latest]`: proves a stored backup whole,
//! without a server and without writing it anywhere.
//!
//! 1. The record exists and parses (no record: the backup is incomplete).
//! 2. Every part of every archive is the object the record lists (its
//!    stored bytes have the recorded size and BLAKE3 hash), decrypts (or
//!    passes its checksum) under its name, and has the recorded plaintext
//!    size.
//! 3. The server's `backup_manifest` is intact (its own SHA-256
//!    `Manifest-Checksum`), and every tar archive, streamed part by part
//!    through a tar reader, holds exactly the files the manifest lists,
//!    each with its size and CRC-32C: what `pg_verifybackup` checks of a
//!    data directory, checked on the stored bytes.
//! 4. Every WAL segment from the backup's start to its stop is in the
//!    repository.
//!
//! Memory: one part being read, [`PARTS_AHEAD`] waiting for the reader and
//! [`PARTS_FETCHED`] being fetched and checked.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;

use anyhow::{anyhow, Context};
use bytes::Bytes;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::record::{ArchiveRecord, BackupRecord, MANIFEST_ARCHIVE};
use crate::repository::{ObjectName, Repository};

/// Parts fetched ahead of the tar reader.
const PARTS_AHEAD: usize = 2;
/// Parts fetched and checked at once.
pub const PARTS_FETCHED: usize = 3;

/// Files a backup's tar holds that its manifest does not list, as
/// `pg_verifybackup` ignores them.
const NOT_IN_MANIFEST: [&str; 1] = ["backup_manifest"];

/// What `backup-verify` found.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub backup: String,
    pub parts_checked: usize,
    pub files_checked: usize,
    pub wal_segments_checked: usize,
    pub problems: Vec<String>,
}

/// Verifies backup `name` (its record must exist to get this far: a
/// missing record is the caller's problem to report).
pub async fn verify(repo: &Repository, record: &BackupRecord) -> anyhow::Result<Report> {
    let mut report = Report {
        backup: record.name.clone(),
        ..Report::default()
    };
    // The manifest first: it is small, and the tar checks need it.
    let manifest_archive = record
        .archives
        .iter()
        .find(|a| a.name == MANIFEST_ARCHIVE)
        .ok_or_else(|| anyhow!("the record of {} lists no backup_manifest", record.name))?;
    let mut manifest_bytes = Vec::new();
    {
        let (tx, mut rx) = tokio::sync::mpsc::channel(PARTS_AHEAD);
        let producer = feed(
            repo.clone(),
            record.name.clone(),
            manifest_archive.clone(),
            tx,
        );
        let collect = async {
            while let Some(part) = rx.recv().await {
                manifest_bytes.extend_from_slice(&part);
            }
        };
        let (problems, ()) = tokio::join!(producer, collect);
        report.parts_checked += manifest_archive.parts.len();
        report.problems.extend(problems?);
    }
    let manifest = match Manifest::parse(&manifest_bytes) {
        Ok(m) => Some(m),
        Err(e) => {
            report.problems.push(format!("backup_manifest: {e}"));
            None
        }
    };

    let mut seen: BTreeSet<String> = BTreeSet::new();
    for archive in record
        .archives
        .iter()
        .filter(|a| a.name != MANIFEST_ARCHIVE)
    {
        let (tx, rx) = tokio::sync::mpsc::channel(PARTS_AHEAD);
        let producer = feed(repo.clone(), record.name.clone(), archive.clone(), tx);
        let prefix = match archive.oid {
            Some(oid) => format!("pg_tblspc/{oid}/"),
            None => String::new(),
        };
        let files = manifest.as_ref().map(|m| m.files.clone());
        let archive_name = archive.name.clone();
        let reader = tokio::task::spawn_blocking(move || {
            read_tar(PartsReader::new(rx), &archive_name, &prefix, files.as_ref())
        });
        let (problems, checked) = tokio::join!(producer, reader);
        report.parts_checked += archive.parts.len();
        report.problems.extend(problems?);
        let (files, found, tar_problems) = checked??;
        report.files_checked += files;
        report.problems.extend(tar_problems);
        seen.extend(found);
    }
    if let Some(m) = &manifest {
        for path in m.files.keys() {
            if !seen.contains(path) {
                report.problems.push(format!(
                    "{path}: listed in the manifest, missing from the backup"
                ));
            }
        }
    }

    let missing = super::missing_wal(repo, record).await?;
    report.wal_segments_checked = record.wal_segments().len();
    for m in missing {
        report.problems.push(format!(
            "WAL segment {m} (needed from {} to {}) is not in the repository",
            record.start_lsn, record.stop_lsn
        ));
    }
    Ok(report)
}

/// Fetches the parts of `archive`, [`PARTS_FETCHED`] at once (a round
/// trip each on object storage), checks each against the record and
/// sends the plaintexts in order (stopping at the first bad part: what
/// follows it cannot be read as tar anyway). Returns the problems found.
pub(crate) async fn feed(
    repo: Repository,
    backup: String,
    archive: ArchiveRecord,
    tx: tokio::sync::mpsc::Sender<Bytes>,
) -> anyhow::Result<Vec<String>> {
    use futures::StreamExt;
    let checked = futures::stream::iter((0u32..).zip(archive.parts.clone()))
        .map(|(expected, part)| {
            let (repo, backup, archive) = (repo.clone(), backup.clone(), archive.name.clone());
            async move { check_part(&repo, &backup, &archive, expected, &part).await }
        })
        .buffered(PARTS_FETCHED);
    futures::pin_mut!(checked);
    while let Some(r) = checked.next().await {
        match r? {
            Ok(data) => {
                if tx.send(data).await.is_err() {
                    break;
                }
            }
            Err(problem) => return Ok(vec![problem]),
        }
    }
    Ok(Vec::new())
}

/// Whether the record of `backup`, read again, accepts the part as found:
/// `walsafe key-rotate --rewrite` replaced it (same plaintext, another
/// key) after our copy of the record was read.
async fn rewritten_since(
    repo: &Repository,
    backup: &str,
    archive: &str,
    index: u32,
    len: u64,
    hash: &str,
) -> bool {
    let Ok(Some(record)) = super::find_record(repo, backup).await else {
        return false;
    };
    record
        .archives
        .iter()
        .filter(|a| a.name == archive)
        .flat_map(|a| &a.parts)
        .any(|p| p.index == index && p.accepts(len, hash))
}

/// One part, fetched and checked: its plaintext, or the problem found
/// (the outer error: the repository could not be read).
pub(crate) async fn check_part(
    repo: &Repository,
    backup: &str,
    archive: &str,
    expected_index: u32,
    part: &super::record::PartRecord,
) -> anyhow::Result<Result<Bytes, String>> {
    let name = ObjectName::backup_part(backup, archive, part.index)?;
    if part.index != expected_index {
        return Ok(Err(format!(
            "{name}: the record's parts of {archive} are not numbered 0, 1, 2, …"
        )));
    }
    let raw = match repo.get_raw(&name).await {
        Ok(Some(d)) => d,
        Ok(None) => return Ok(Err(format!("{name}: missing from the repository"))),
        Err(e) => return Err(e).with_context(|| format!("cannot read {name}")),
    };
    let check = raw.clone();
    let hash =
        tokio::task::spawn_blocking(move || blake3::hash(&check).to_hex().to_string()).await?;
    if !part.accepts(raw.len() as u64, &hash)
        && !rewritten_since(repo, backup, archive, part.index, raw.len() as u64, &hash).await
    {
        return Ok(Err(format!(
            "{name}: the stored object has {} bytes and BLAKE3 {hash}, but the record lists {} bytes and {}: it was altered or replaced",
            raw.len(),
            part.stored_size,
            part.stored_blake3
        )));
    }
    let data = match repo.decode_raw(&name, raw).await {
        Ok(d) => d,
        Err(e) => return Ok(Err(format!("{name}: {e}"))),
    };
    if data.len() as u64 != part.size {
        return Ok(Err(format!(
            "{name}: {} bytes of plaintext, the record says {}",
            data.len(),
            part.size
        )));
    }
    Ok(Ok(Bytes::from(data)))
}

/// A `Read` over parts arriving on a channel (blocking side).
pub(crate) struct PartsReader {
    rx: tokio::sync::mpsc::Receiver<Bytes>,
    current: Bytes,
}

impl PartsReader {
    pub(crate) fn new(rx: tokio::sync::mpsc::Receiver<Bytes>) -> Self {
        PartsReader {
            rx,
            current: Bytes::new(),
        }
    }
}

impl Read for PartsReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(b) => self.current = b,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        bytes::Buf::advance(&mut self.current, n);
        Ok(n)
    }
}

/// Reads one tar archive, checking each regular file against the
/// manifest. Returns (files checked, manifest paths seen, problems).
fn read_tar(
    reader: PartsReader,
    archive: &str,
    prefix: &str,
    files: Option<&BTreeMap<String, ManifestFile>>,
) -> anyhow::Result<(usize, Vec<String>, Vec<String>)> {
    let mut tar = tar::Archive::new(reader);
    let mut problems = Vec::new();
    let mut seen = Vec::new();
    let mut count = 0;
    let entries = match tar.entries() {
        Ok(e) => e,
        Err(e) => return Ok((0, seen, vec![format!("{archive}: not a tar archive: {e}")])),
    };
    for entry in entries {
        let mut entry = match entry {
            Ok(e) => e,
            Err(e) => {
                problems.push(format!("{archive}: the tar stream is damaged: {e}"));
                break;
            }
        };
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = format!("{prefix}{}", entry.path()?.display());
        let mut crc = 0u32;
        let mut size = 0u64;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match entry.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    problems.push(format!("{archive}: {path}: cannot be read: {e}"));
                    break;
                }
            };
            crc = crc32c::crc32c_append(crc, &buf[..n]);
            size += n as u64;
        }
        count += 1;
        let Some(files) = files else { continue };
        if NOT_IN_MANIFEST.contains(&path.as_str()) {
            continue;
        }
        match files.get(&path) {
            None => problems.push(format!("{path}: in {archive}, not in the manifest")),
            Some(f) => {
                seen.push(path.clone());
                if f.size != size {
                    problems.push(format!(
                        "{path}: {size} bytes, the manifest says {}",
                        f.size
                    ));
                } else if let Some(expected) = f.crc32c {
                    if expected != crc {
                        problems.push(format!(
                            "{path}: CRC-32C {crc:08x}, the manifest says {expected:08x}"
                        ));
                    }
                }
            }
        }
    }
    Ok((count, seen, problems))
}

/// One file of the manifest.
#[derive(Debug, Clone)]
struct ManifestFile {
    size: u64,
    /// `None` when the manifest uses another algorithm (size is still checked).
    crc32c: Option<u32>,
}

/// The parts of `backup_manifest` that are checked.
#[derive(Debug)]
struct Manifest {
    files: BTreeMap<String, ManifestFile>,
}

impl Manifest {
    fn parse(bytes: &[u8]) -> Result<Manifest, String> {
        // Its own checksum: SHA-256 of everything before the line that
        // holds it.
        let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_string())?;
        let key = "\"Manifest-Checksum\": \"";
        let at = text
            .rfind(key)
            .ok_or("no Manifest-Checksum: the manifest is truncated")?;
        let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
        let expected = &text[at + key.len()..];
        let expected = &expected[..expected.find('"').ok_or("bad Manifest-Checksum")?];
        let actual = hex::encode(Sha256::digest(&bytes[..line_start]));
        if !actual.eq_ignore_ascii_case(expected) {
            return Err(format!(
                "its Manifest-Checksum {expected} does not match its content ({actual}): it was altered"
            ));
        }
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let mut files = BTreeMap::new();
        for f in v["Files"].as_array().ok_or("no Files array")? {
            let path = f["Path"]
                .as_str()
                .ok_or("a file without a Path (encoded paths are not supported)")?;
            let size = f["Size"].as_u64().ok_or("a file without a Size")?;
            let crc32c = match f["Checksum-Algorithm"].as_str() {
                // The manifest spells the CRC's bytes as the server holds
                // them in memory (little-endian on every platform walsafe
                // runs on).
                Some("CRC32C") => f["Checksum"]
                    .as_str()
                    .and_then(|c| hex::decode(c).ok())
                    .and_then(|b| <[u8; 4]>::try_from(b).ok())
                    .map(u32::from_le_bytes),
                _ => None,
            };
            files.insert(path.to_string(), ManifestFile { size, crc32c });
        }
        Ok(Manifest { files })
    }
}

/// Reads backup `name` ("latest": the newest complete one) for verify.
pub async fn resolve(repo: &Repository, name: &str) -> anyhow::Result<Option<BackupRecord>> {
    if name == "latest" {
        super::newest_complete(repo).await
    } else {
        super::find_record(repo, name).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(files: &str) -> Vec<u8> {
        let body = format!(
            "{{ \"PostgreSQL-Backup-Manifest-Version\": 1,\n\"Files\": [\n{files}\n],\n\"WAL-Ranges\": [\n] ,\n"
        );
        let sum = hex::encode(Sha256::digest(body.as_bytes()));
        format!("{body}\"Manifest-Checksum\": \"{sum}\"}}\n").into_bytes()
    }

    #[test]
    fn the_manifest_checksum_guards_the_manifest() {
        let m = manifest(
            r#"{ "Path": "PG_VERSION", "Size": 3, "Last-Modified": "x", "Checksum-Algorithm": "CRC32C", "Checksum": "0a1b2c3d" }"#,
        );
        let parsed = Manifest::parse(&m).unwrap();
        assert_eq!(parsed.files["PG_VERSION"].size, 3);
        assert_eq!(parsed.files["PG_VERSION"].crc32c, Some(0x3d2c_1b0a));
        let altered = String::from_utf8(m)
            .unwrap()
            .replace("\"Size\": 3", "\"Size\": 4");
        assert!(Manifest::parse(altered.as_bytes())
            .unwrap_err()
            .contains("altered"));
    }
}
