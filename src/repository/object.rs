//! Every object the repository holds, by a typed name: where it lives
//! (its key), what name the envelope binds into it, and which CPU lane
//! encodes it.
//!
//! ```text
//! <url prefix>/
//!   walsafe.repo                         Descriptor: pins the repository to one cluster (JSON, HMAC'd)
//!   wal/<TLI><LOG><SEG>                  Segment: a complete segment
//!   wal/<TLI><LOG><SEG>.partial          ClosedPartial: the last segment of an ended timeline,
//!                                        or the segment before a recorded gap
//!   wal/<TLI>.history                    History: a timeline history file
//!   wal/<SEGMENT>.<OFFSET>.backup        BackupHistory: a backup history file (`wal-push`)
//!   chunks/<TLI><LOG><SEG>/<start>-<end> Chunk: bytes [start, end) of a segment still filling;
//!                                        start and end are 8 upper-case hex digits
//!   gaps/<TLI>-<from>-<to>               Gap: a recorded loss (8, 16, 16 upper-case hex digits)
//!   check/<token>                        Probe: written and removed by `walsafe check`
//!   backups/<backup>/<archive>.<NNNNNN>  BackupPart: part NNNNNN (decimal, from 0) of one archive
//!                                        of a base backup (`base.tar`, `<oid>.tar`, `backup_manifest`)
//!   backups/<backup>/backup.json         BackupRecord: the backup's record, written last
//! ```
//!
//! The WAL part of every `wal/` key is exactly the name PostgreSQL's
//! `restore_command` asks for (`%f`), so `wal-fetch NAME` is one GET. Chunks
//! live apart from `wal/` so that listing the archived segments never walks
//! thousands of small objects, and so that deleting a segment's chunks once
//! the segment is stored is one prefix. Chunk offsets are 8 hex digits
//! because a segment is at most 1 GiB (2^30 < 2^32); upper case like WAL
//! file names; fixed width so that a lexical listing is in offset order.
//!
//! The envelope binds [`ObjectName::logical`] into every object as
//! associated data: the WAL file name for `wal/` objects, `<segment>/<start>-<end>`
//! for chunks (what walsafe has always bound, so old objects still read),
//! and the whole key for gap records and probes.

use std::fmt;

use crate::pg::walfile::{classify, history_file_name, NameKind};
use crate::pg::{Lsn, SegmentName, TimelineId};

/// Key of the repository descriptor.
pub const DESCRIPTOR_KEY: &str = "walsafe.repo";
/// Prefix of complete WAL files, closed partials and history files.
pub const WAL_PREFIX: &str = "wal/";
/// Prefix of chunks of still-filling segments.
pub const CHUNKS_PREFIX: &str = "chunks/";
/// Prefix of recorded gaps.
pub const GAPS_PREFIX: &str = "gaps/";
/// Prefix of `walsafe check`'s probe objects.
pub const PROBE_PREFIX: &str = "check/";
/// Prefix of base backups.
pub const BACKUPS_PREFIX: &str = "backups/";
/// Where `walsafe drill` records its results.
pub const DRILLS_PREFIX: &str = "drills/";
/// File name of a backup's record under its prefix.
pub const BACKUP_RECORD: &str = "backup.json";

/// Why a name is not a valid repository name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// Not a WAL segment, `.partial` or `.history` name.
    #[error("{name:?} is not a WAL file name (expected e.g. 000000010000000000000003, 00000002.history or 000000010000000000000003.partial)")]
    NotWalName { name: String },
    /// Not a 24-hex-digit segment name.
    #[error("{name:?} is not a WAL segment name (24 hex digits, e.g. 000000010000000000000003)")]
    NotSegmentName { name: String },
    /// A chunk range that is empty, reversed or beyond 4 GiB.
    #[error("invalid chunk range [{start}, {end}) of segment {segment}: {reason}")]
    BadChunkRange {
        segment: String,
        start: u64,
        end: u64,
        reason: &'static str,
    },
    /// A probe token with characters a key cannot hold.
    #[error("invalid probe name {token:?}: use letters, digits, '-' and '_'")]
    BadProbe { token: String },
    /// A backup or archive name with characters a key cannot hold.
    #[error("invalid backup object name {name:?}: use letters, digits, '-', '_' and '.'")]
    BadBackupName { name: String },
}

impl LayoutError {
    /// Always false: a bad name stays bad.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

/// A WAL segment's file name, `<TLI><LOG><SEG>` (24 hex digits, upper
/// case as PostgreSQL writes them): how the repository names a segment without knowing the
/// cluster's segment size.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentFile(String);

impl SegmentFile {
    /// Checks that `name` is a 24-hex-digit segment name.
    pub fn parse(name: &str) -> Result<SegmentFile, LayoutError> {
        match classify(name) {
            Some(NameKind::Segment) => Ok(SegmentFile(name.to_string())),
            _ => Err(LayoutError::NotSegmentName {
                name: name.to_string(),
            }),
        }
    }

    /// The file name of `seg` for `segment_size`-byte segments.
    pub fn of(seg: SegmentName, segment_size: u64) -> SegmentFile {
        SegmentFile(seg.file_name(segment_size))
    }

    /// The segment, for `segment_size`-byte segments.
    pub fn segment(&self, segment_size: u64) -> Option<SegmentName> {
        SegmentName::parse(&self.0, segment_size)
    }

    /// The 24 hex digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SegmentFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which CPU lane encodes and decodes an object (see the repository's
/// module doc): the RPO waits for the small ones, and they must never queue
/// behind a 16 MiB segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Whole segments, closed partials, history files.
    Bulk,
    /// Chunks, gap records, probes.
    Small,
}

/// A repository object, by what it is.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectName {
    /// `walsafe.repo`.
    Descriptor,
    /// A complete segment.
    Segment(SegmentFile),
    /// The closed last segment of an ended timeline (or the one before a gap).
    ClosedPartial(SegmentFile),
    /// A timeline history file.
    History(TimelineId),
    /// A backup history file (`000000010000000000000002.00000028.backup`),
    /// as PostgreSQL hands it to `archive_command` after a base backup.
    BackupHistory(String),
    /// Bytes `[start, end)` of a segment still filling.
    Chunk {
        segment: SegmentFile,
        start: u64,
        end: u64,
    },
    /// A recorded loss of WAL `[from, to)` on `timeline`.
    Gap {
        timeline: TimelineId,
        from: Lsn,
        to: Lsn,
    },
    /// A `walsafe check` probe.
    Probe(String),
    /// Part `index` of archive `archive` of base backup `backup`.
    BackupPart {
        backup: String,
        archive: String,
        index: u32,
    },
    /// The record of base backup `backup` (written last: no record, no backup).
    BackupRecord(String),
    /// The result of a restore drill, named by when it ran
    /// (`20261206T190233Z.json`).
    Drill(String),
}

impl ObjectName {
    /// The object of a PostgreSQL WAL file name (`%f` of `restore_command`):
    /// a segment, a `.partial` or a `.history` file.
    pub fn wal(name: &str) -> Result<ObjectName, LayoutError> {
        let bad = || LayoutError::NotWalName {
            name: name.to_string(),
        };
        if is_backup_history(name) {
            return Ok(ObjectName::BackupHistory(name.to_string()));
        }
        match classify(name).ok_or_else(bad)? {
            NameKind::Segment => Ok(ObjectName::Segment(SegmentFile::parse(name)?)),
            NameKind::Partial => {
                let base = name.strip_suffix(".partial").ok_or_else(bad)?;
                Ok(ObjectName::ClosedPartial(SegmentFile::parse(base)?))
            }
            NameKind::History(t) => Ok(ObjectName::History(t)),
        }
    }

    /// Bytes `[start, end)` of `segment`, checked.
    pub fn chunk(segment: &SegmentFile, start: u64, end: u64) -> Result<ObjectName, LayoutError> {
        let bad = |reason| LayoutError::BadChunkRange {
            segment: segment.to_string(),
            start,
            end,
            reason,
        };
        if end <= start {
            return Err(bad("end must be after start"));
        }
        if end > u32::MAX as u64 {
            return Err(bad("a segment is at most 1 GiB"));
        }
        Ok(ObjectName::Chunk {
            segment: segment.clone(),
            start,
            end,
        })
    }

    /// A probe named `token` (letters, digits, `-`, `_`).
    pub fn probe(token: &str) -> Result<ObjectName, LayoutError> {
        if token.is_empty()
            || !token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(LayoutError::BadProbe {
                token: token.to_string(),
            });
        }
        Ok(ObjectName::Probe(token.to_string()))
    }

    /// Part `index` of `archive` of `backup`, names checked.
    pub fn backup_part(backup: &str, archive: &str, index: u32) -> Result<ObjectName, LayoutError> {
        check_backup_name(backup)?;
        check_backup_name(archive)?;
        Ok(ObjectName::BackupPart {
            backup: backup.to_string(),
            archive: archive.to_string(),
            index,
        })
    }

    /// The record of `backup`, name checked.
    pub fn backup_record(backup: &str) -> Result<ObjectName, LayoutError> {
        check_backup_name(backup)?;
        Ok(ObjectName::BackupRecord(backup.to_string()))
    }

    /// The result of the drill that ran at `stamp`, name checked.
    pub fn drill(stamp: &str) -> Result<ObjectName, LayoutError> {
        check_backup_name(stamp)?;
        Ok(ObjectName::Drill(stamp.to_string()))
    }

    /// The record of `gap`.
    pub fn gap(gap: &crate::gap::Gap) -> ObjectName {
        ObjectName::Gap {
            timeline: gap.timeline,
            from: gap.from,
            to: gap.to,
        }
    }

    /// The key, relative to the repository's prefix.
    pub fn key(&self) -> String {
        match self {
            ObjectName::Descriptor => DESCRIPTOR_KEY.to_string(),
            ObjectName::Segment(_)
            | ObjectName::ClosedPartial(_)
            | ObjectName::History(_)
            | ObjectName::BackupHistory(_) => {
                format!("{WAL_PREFIX}{}", self.logical())
            }
            ObjectName::Chunk { .. } => format!("{CHUNKS_PREFIX}{}", self.logical()),
            ObjectName::Gap { timeline, from, to } => {
                format!(
                    "{GAPS_PREFIX}{:08X}-{:016X}-{:016X}",
                    timeline.0, from.0, to.0
                )
            }
            ObjectName::Probe(token) => format!("{PROBE_PREFIX}{token}"),
            ObjectName::BackupPart {
                backup,
                archive,
                index,
            } => format!("{BACKUPS_PREFIX}{backup}/{archive}.{index:06}"),
            ObjectName::BackupRecord(backup) => {
                format!("{BACKUPS_PREFIX}{backup}/{BACKUP_RECORD}")
            }
            ObjectName::Drill(stamp) => format!("{DRILLS_PREFIX}{stamp}.json"),
        }
    }

    /// The name the envelope binds into the object.
    pub fn logical(&self) -> String {
        match self {
            ObjectName::Segment(s) => s.to_string(),
            ObjectName::ClosedPartial(s) => format!("{s}.partial"),
            ObjectName::History(t) => history_file_name(*t),
            ObjectName::BackupHistory(n) => n.clone(),
            ObjectName::Chunk {
                segment,
                start,
                end,
            } => format!("{segment}/{start:08X}-{end:08X}"),
            ObjectName::Descriptor
            | ObjectName::Gap { .. }
            | ObjectName::Probe(_)
            | ObjectName::BackupPart { .. }
            | ObjectName::BackupRecord(_)
            | ObjectName::Drill(_) => self.key(),
        }
    }

    /// The CPU lane of this object.
    pub fn lane(&self) -> Lane {
        match self {
            ObjectName::Descriptor
            | ObjectName::Segment(_)
            | ObjectName::ClosedPartial(_)
            | ObjectName::History(_)
            | ObjectName::BackupPart { .. } => Lane::Bulk,
            ObjectName::Chunk { .. }
            | ObjectName::BackupHistory(_)
            | ObjectName::Gap { .. }
            | ObjectName::Probe(_)
            | ObjectName::BackupRecord(_)
            | ObjectName::Drill(_) => Lane::Small,
        }
    }

    /// What a key names; `None` for keys walsafe does not write.
    pub fn parse_key(key: &str) -> Option<ObjectName> {
        if key == DESCRIPTOR_KEY {
            return Some(ObjectName::Descriptor);
        }
        if let Some(name) = key.strip_prefix(WAL_PREFIX) {
            return ObjectName::wal(name).ok();
        }
        if let Some(rest) = key.strip_prefix(CHUNKS_PREFIX) {
            let (segment, range) = rest.split_once('/')?;
            let segment = SegmentFile::parse(segment).ok()?;
            let (s, e) = range.split_once('-')?;
            return ObjectName::chunk(&segment, hex_exact(s, 8)?, hex_exact(e, 8)?).ok();
        }
        if let Some(rest) = key.strip_prefix(GAPS_PREFIX) {
            let mut parts = rest.split('-');
            let timeline = TimelineId(u32::try_from(hex_exact(parts.next()?, 8)?).ok()?);
            let from = Lsn(hex_exact(parts.next()?, 16)?);
            let to = Lsn(hex_exact(parts.next()?, 16)?);
            return parts
                .next()
                .is_none()
                .then_some(ObjectName::Gap { timeline, from, to });
        }
        if let Some(token) = key.strip_prefix(PROBE_PREFIX) {
            return ObjectName::probe(token).ok();
        }
        if let Some(rest) = key.strip_prefix(DRILLS_PREFIX) {
            return ObjectName::drill(rest.strip_suffix(".json")?).ok();
        }
        if let Some(rest) = key.strip_prefix(BACKUPS_PREFIX) {
            let (backup, file) = rest.split_once('/')?;
            if file == BACKUP_RECORD {
                return ObjectName::backup_record(backup).ok();
            }
            let (archive, index) = file.rsplit_once('.')?;
            if index.len() != 6 || !index.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            return ObjectName::backup_part(backup, archive, index.parse().ok()?).ok();
        }
        None
    }

    /// The segment a chunk key belongs to, for any key under `chunks/`.
    pub fn chunk_segment_of_key(key: &str) -> Option<SegmentFile> {
        let rest = key.strip_prefix(CHUNKS_PREFIX)?;
        let (segment, _) = rest.split_once('/')?;
        SegmentFile::parse(segment).ok()
    }
}

impl fmt::Display for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key())
    }
}

/// Is `name` a backup history file (`000000010000000000000002.00000028.backup`:
/// the segment and offset where the backup started)?
pub fn is_backup_history(name: &str) -> bool {
    let b = name.as_bytes();
    name.len() == 40
        && name.ends_with(".backup")
        && b[24] == b'.'
        && b[..24].iter().chain(&b[25..33]).all(u8::is_ascii_hexdigit)
}

/// A backup or archive name: letters, digits, `-`, `_`, `.`; not empty,
/// not starting with a dot.
fn check_backup_name(name: &str) -> Result<(), LayoutError> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(LayoutError::BadBackupName {
            name: name.to_string(),
        })
    }
}

/// `chunks/<segment>/`: the prefix of one segment's chunks.
pub fn chunks_prefix(segment: &SegmentFile) -> String {
    format!("{CHUNKS_PREFIX}{segment}/")
}

/// A hex number of exactly `width` digits.
fn hex_exact(text: &str, width: usize) -> Option<u64> {
    (text.len() == width && text.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| u64::from_str_radix(text, 16).ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: &str = "000000010000000000000003";

    fn seg() -> SegmentFile {
        SegmentFile::parse(SEG).unwrap()
    }

    #[test]
    fn wal_keys() {
        let key = |n: &str| ObjectName::wal(n).map(|o| o.key());
        assert_eq!(key(SEG).unwrap(), "wal/000000010000000000000003");
        assert_eq!(key("00000002.history").unwrap(), "wal/00000002.history");
        assert_eq!(
            key("000000020000000000000003.partial").unwrap(),
            "wal/000000020000000000000003.partial"
        );
        assert!(key("../etc/passwd").is_err());
        assert!(key("00000001000000000000000").is_err());
        assert!(key("").is_err());
        assert_eq!(
            ObjectName::parse_key("wal/00000002.history"),
            Some(ObjectName::History(TimelineId(2)))
        );
        assert_eq!(ObjectName::parse_key("wal/junk"), None);
        let b = "000000010000000000000002.00000028.backup";
        assert_eq!(key(b).unwrap(), format!("wal/{b}"));
        assert_eq!(
            ObjectName::parse_key(&format!("wal/{b}")),
            Some(ObjectName::BackupHistory(b.into()))
        );
        assert!(!is_backup_history("000000010000000000000002.backup"));
        assert!(!is_backup_history(
            "00000001000000000000000G.00000028.backup"
        ));
        assert_eq!(ObjectName::parse_key("chunks/x"), None);
        let o = ObjectName::wal(SEG).unwrap();
        assert_eq!(ObjectName::parse_key(&o.key()), Some(o.clone()));
        assert_eq!(o.logical(), SEG);
        assert_eq!(o.lane(), Lane::Bulk);
    }

    #[test]
    fn chunk_keys_round_trip() {
        let c = ObjectName::chunk(&seg(), 0, 0x12000).unwrap();
        let k = c.key();
        assert_eq!(k, "chunks/000000010000000000000003/00000000-00012000");
        assert_eq!(ObjectName::parse_key(&k), Some(c.clone()));
        assert_eq!(c.logical(), "000000010000000000000003/00000000-00012000");
        assert_eq!(c.lane(), Lane::Small);
        assert_eq!(ObjectName::chunk_segment_of_key(&k), Some(seg()));
        assert_eq!(chunks_prefix(&seg()), "chunks/000000010000000000000003/");
        // Lexical order is offset order.
        let a = ObjectName::chunk(&seg(), 0x2000, 0x4000).unwrap().key();
        let b = ObjectName::chunk(&seg(), 0x10000, 0x12000).unwrap().key();
        assert!(a < b);
    }

    #[test]
    fn bad_chunks_are_refused() {
        assert!(ObjectName::chunk(&seg(), 10, 10).is_err());
        assert!(ObjectName::chunk(&seg(), 10, 5).is_err());
        assert!(ObjectName::chunk(&seg(), 0, 1 << 33).is_err());
        assert!(SegmentFile::parse("00000002.history").is_err());
        for bad in [
            "chunks/000000010000000000000003/0-1",
            "chunks/000000010000000000000003/00000002-00000001",
            "chunks/zz/00000000-00000001",
            "chunks/000000010000000000000003/00000000-0000000g",
        ] {
            assert_eq!(ObjectName::parse_key(bad), None, "{bad}");
        }
        assert_eq!(
            ObjectName::parse_key("wal/000000010000000000000003"),
            Some(ObjectName::Segment(seg()))
        );
    }

    #[test]
    fn gap_and_probe_keys_round_trip() {
        let g = ObjectName::Gap {
            timeline: TimelineId(1),
            from: Lsn(0x3000000),
            to: Lsn(0x9000000),
        };
        assert_eq!(g.key(), "gaps/00000001-0000000003000000-0000000009000000");
        assert_eq!(ObjectName::parse_key(&g.key()), Some(g.clone()));
        assert_eq!(g.logical(), g.key());
        let p = ObjectName::probe("probe-1-ab").unwrap();
        assert_eq!(p.key(), "check/probe-1-ab");
        assert_eq!(ObjectName::parse_key(&p.key()), Some(p));
        assert!(ObjectName::probe("../x").is_err());
        assert_eq!(
            ObjectName::parse_key("walsafe.repo"),
            Some(ObjectName::Descriptor)
        );
    }
}
