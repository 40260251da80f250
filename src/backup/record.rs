//! The record of a base backup: `backups/<name>/backup.json`, enveloped
//! like every object (authenticated under the key, its name bound in).
//! It is written **last**: a backup without its record is incomplete,
//! never offered for a restore.
//!
//! ```json
//! {
//!   "format": 1,
//!   "name": "20261206T170501Z",
//!   "label": "walsafe backup 20261206T170501Z",
//!   "system_identifier": "7301234567890123456",
//!   "pg_version_num": 150004,
//!   "segment_size": 16777216,
//!   "start_lsn": "0/2000028", "start_timeline": 1,
//!   "stop_lsn": "0/2000100",  "stop_timeline": 1,
//!   "start_time": "2026-12-06T17:05:01Z", "stop_time": "2026-12-06T17:05:09Z",
//!   "wal_first": "000000010000000000000002", "wal_last": "000000010000000000000002",
//!   "backup_history": "000000010000000000000002.00000028.backup",
//!   "archives": [
//!     { "name": "base.tar", "oid": null, "location": null, "size": 31522816,
//!       "parts": [ { "index": 0, "size": 8388608, "stored_size": 1523310, "stored_blake3": "…" }, … ] },
//!     { "name": "backup_manifest", … }
//!   ],
//!   "size": 31703040, "stored_size": 4102232
//! }
//! ```
//!
//! `archives` holds one entry per tablespace tar (`base.tar` for the data
//! directory, `<oid>.tar` for the others, each ended with tar's two zero
//! blocks) and one for the server's `backup_manifest`; `stored_blake3` is
//! the BLAKE3 hash of the stored object's bytes, checked before anything
//! is decrypted or decompressed: the record's own proof of exactly what it
//! lists, on top of the envelope's authentication, at the cost of hashing
//! the compressed bytes only (a twentieth of the plaintext on a typical
//! cluster: the database host pays for it). `wal_first` ..= `wal_last` are the segments
//! (on the stop timeline) that recovery needs to reach consistency.

use serde::{Deserialize, Serialize};

use crate::pg::{Lsn, SegmentName, TimelineId};

/// The record format this code writes and reads.
pub const RECORD_FORMAT: u32 = 1;
/// The archive name of the server's backup manifest.
pub const MANIFEST_ARCHIVE: &str = "backup_manifest";

/// One stored part of an archive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartRecord {
    pub index: u32,
    /// Plaintext bytes.
    pub size: u64,
    /// Bytes of the stored object (compressed, encrypted).
    pub stored_size: u64,
    /// BLAKE3 of the stored object's bytes, hex.
    pub stored_blake3: String,
    /// The same part stored otherwise (under another key), accepted too:
    /// set only while `walsafe key-rotate --rewrite` replaces the part.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub also: Vec<StoredForm>,
}

/// A stored form of a part: the object's length and BLAKE3.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredForm {
    pub stored_size: u64,
    pub stored_blake3: String,
}

impl PartRecord {
    /// Whether a stored object of `len` bytes and BLAKE3 `hash` is this
    /// part as the record lists it.
    pub fn accepts(&self, len: u64, hash: &str) -> bool {
        (self.stored_size == len && self.stored_blake3 == hash)
            || self
                .also
                .iter()
                .any(|f| f.stored_size == len && f.stored_blake3 == hash)
    }
}

/// One archive of the backup (a tablespace's tar, or the manifest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveRecord {
    pub name: String,
    /// The tablespace's OID (`None` for the data directory and the manifest).
    pub oid: Option<u32>,
    /// The tablespace's directory on the server (`None` for the data directory).
    pub location: Option<String>,
    /// Plaintext bytes of the whole archive.
    pub size: u64,
    pub parts: Vec<PartRecord>,
}

/// `backup.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupRecord {
    pub format: u32,
    pub name: String,
    pub label: String,
    #[serde(with = "crate::repository::descriptor::u64_as_string")]
    pub system_identifier: u64,
    pub pg_version_num: u32,
    pub segment_size: u64,
    #[serde(with = "crate::gap::lsn_text")]
    pub start_lsn: Lsn,
    #[serde(with = "crate::gap::timeline_number")]
    pub start_timeline: TimelineId,
    #[serde(with = "crate::gap::lsn_text")]
    pub stop_lsn: Lsn,
    #[serde(with = "crate::gap::timeline_number")]
    pub stop_timeline: TimelineId,
    pub start_time: String,
    pub stop_time: String,
    pub wal_first: String,
    pub wal_last: String,
    /// The backup history file stored beside the WAL
    /// (`wal/<segment>.<offset>.backup`).
    #[serde(default)]
    pub backup_history: Option<String>,
    pub archives: Vec<ArchiveRecord>,
    pub size: u64,
    pub stored_size: u64,
}

impl BackupRecord {
    /// The segments recovery of this backup needs, first to last, on the
    /// stop timeline (the start timeline's name where they differ is not
    /// needed: a timeline switch during a backup ends it on the new one,
    /// whose history names the old).
    pub fn wal_segments(&self) -> Vec<SegmentName> {
        let first = SegmentName::containing(self.stop_timeline, self.start_lsn, self.segment_size);
        let last = SegmentName::containing(
            self.stop_timeline,
            Lsn(self.stop_lsn.0.saturating_sub(1).max(self.start_lsn.0)),
            self.segment_size,
        );
        (first.segno..=last.segno)
            .map(|segno| SegmentName {
                timeline: self.stop_timeline,
                segno,
            })
            .collect()
    }

    /// The JSON stored (pretty, trailing newline).
    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("a record serialises");
        v.push(b'\n');
        v
    }

    /// Parses a stored record.
    pub fn parse(bytes: &[u8]) -> Result<BackupRecord, String> {
        let r: BackupRecord = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if r.format != RECORD_FORMAT {
            return Err(format!(
                "record format {} is not supported (this walsafe reads {RECORD_FORMAT}); upgrade walsafe",
                r.format
            ));
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> BackupRecord {
        BackupRecord {
            format: RECORD_FORMAT,
            name: "20261206T170501Z".into(),
            label: "l".into(),
            system_identifier: 7_301_234_567_890_123_456,
            pg_version_num: 150004,
            segment_size: 16 << 20,
            start_lsn: Lsn(0x2000028),
            start_timeline: TimelineId(1),
            stop_lsn: Lsn(0x4000100),
            stop_timeline: TimelineId(1),
            start_time: "2026-12-06T17:05:01Z".into(),
            stop_time: "2026-12-06T17:05:09Z".into(),
            wal_first: "000000010000000000000002".into(),
            wal_last: "000000010000000000000004".into(),
            backup_history: None,
            archives: vec![],
            size: 0,
            stored_size: 0,
        }
    }

    #[test]
    fn a_record_round_trips_and_names_its_wal() {
        let r = record();
        assert_eq!(BackupRecord::parse(&r.to_json()).unwrap(), r);
        let names: Vec<String> = r
            .wal_segments()
            .iter()
            .map(|s| s.file_name(16 << 20))
            .collect();
        assert_eq!(
            names,
            [
                "000000010000000000000002",
                "000000010000000000000003",
                "000000010000000000000004"
            ]
        );
        let mut future = r.clone();
        future.format = 2;
        assert!(BackupRecord::parse(&future.to_json())
            .unwrap_err()
            .contains("upgrade walsafe"));
    }
}
