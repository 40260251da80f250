//! Where each object lives in the repository.
//!
//! ```text
//! <url prefix>/
//!   walsafe.repo                         the descriptor (JSON), pins the repository to one cluster
//!   wal/<TLI><LOG><SEG>                  a complete segment
//!   wal/<TLI>.history                    a timeline history file
//!   wal/<TLI><LOG><SEG>.partial          a closed partial segment (pushed by archive_command
//!                                        at a timeline switch)
//!   chunks/<TLI><LOG><SEG>/<start>-<end> bytes [start, end) of a segment still filling;
//!                                        start and end are 8 upper-case hex digits
//! ```
//!
//! The WAL part of every key is exactly the name PostgreSQL's
//! `restore_command` asks for (`%f`), so `wal-fetch NAME` is one GET. Chunks
//! live apart from `wal/` so that listing the archived segments never walks
//! thousands of small objects, and so that deleting a segment's chunks once
//! the segment is stored is one prefix. The envelope binds the *logical*
//! name (the key without `wal/` or `chunks/`) into every object.
//!
//! Chunk offsets are 8 hex digits because a segment is at most 1 GiB
//! (2^30 < 2^32); upper case like WAL file names; fixed width so that a
//! lexical listing is in offset order.

use crate::pg::walfile::{classify, NameKind};

/// Key of the repository descriptor.
pub const DESCRIPTOR_KEY: &str = "walsafe.repo";
/// Prefix of complete WAL files.
pub const WAL_PREFIX: &str = "wal/";
/// Prefix of chunks of still-filling segments.
pub const CHUNKS_PREFIX: &str = "chunks/";

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
}

impl LayoutError {
    /// Always false: a bad name stays bad.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

/// Checks that `name` is a 24-hex-digit segment name.
pub fn check_segment_name(name: &str) -> Result<(), LayoutError> {
    match classify(name) {
        Some(NameKind::Segment) => Ok(()),
        _ => Err(LayoutError::NotSegmentName {
            name: name.to_string(),
        }),
    }
}

/// Checks that `name` is a WAL segment, partial segment or history file name.
pub fn check_wal_name(name: &str) -> Result<(), LayoutError> {
    match classify(name) {
        Some(_) => Ok(()),
        None => Err(LayoutError::NotWalName {
            name: name.to_string(),
        }),
    }
}

/// `wal/<name>` for a segment, `.partial` or `.history` name.
pub fn wal_key(name: &str) -> Result<String, LayoutError> {
    check_wal_name(name)?;
    Ok(format!("{WAL_PREFIX}{name}"))
}

/// The WAL file name of a `wal/...` key (relative to the repository prefix).
pub fn parse_wal_key(key: &str) -> Option<&str> {
    let name = key.strip_prefix(WAL_PREFIX)?;
    classify(name).map(|_| name)
}

/// `chunks/<segment>/`: the prefix of one segment's chunks.
pub fn chunks_prefix(segment: &str) -> Result<String, LayoutError> {
    check_segment_name(segment)?;
    Ok(format!("{CHUNKS_PREFIX}{segment}/"))
}

/// The envelope name of a chunk: `<segment>/<start>-<end>`.
pub fn chunk_name(segment: &str, start: u64, end: u64) -> Result<String, LayoutError> {
    check_segment_name(segment)?;
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
    Ok(format!("{segment}/{start:08X}-{end:08X}"))
}

/// `chunks/<segment>/<start>-<end>`.
pub fn chunk_key(segment: &str, start: u64, end: u64) -> Result<String, LayoutError> {
    Ok(format!(
        "{CHUNKS_PREFIX}{}",
        chunk_name(segment, start, end)?
    ))
}

/// A chunk key, parsed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ChunkKey {
    pub segment: String,
    pub start: u64,
    pub end: u64,
}

impl ChunkKey {
    /// The envelope name: `<segment>/<start>-<end>`.
    pub fn name(&self) -> String {
        format!("{}/{:08X}-{:08X}", self.segment, self.start, self.end)
    }
}

/// Parses `chunks/<segment>/<start>-<end>` (relative to the repository prefix).
pub fn parse_chunk_key(key: &str) -> Option<ChunkKey> {
    let rest = key.strip_prefix(CHUNKS_PREFIX)?;
    let (segment, range) = rest.split_once('/')?;
    check_segment_name(segment).ok()?;
    let (s, e) = range.split_once('-')?;
    let hex8 = |t: &str| {
        (t.len() == 8 && t.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| u64::from_str_radix(t, 16).ok())
            .flatten()
    };
    let (start, end) = (hex8(s)?, hex8(e)?);
    (end > start).then(|| ChunkKey {
        segment: segment.to_string(),
        start,
        end,
    })
}

/// The segment name of any key under `chunks/`.
pub fn parse_chunk_segment(key: &str) -> Option<&str> {
    let rest = key.strip_prefix(CHUNKS_PREFIX)?;
    let (segment, _) = rest.split_once('/')?;
    check_segment_name(segment).ok()?;
    Some(segment)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: &str = "000000010000000000000003";

    #[test]
    fn wal_keys() {
        assert_eq!(wal_key(SEG).unwrap(), "wal/000000010000000000000003");
        assert_eq!(wal_key("00000002.history").unwrap(), "wal/00000002.history");
        assert_eq!(
            wal_key("000000020000000000000003.partial").unwrap(),
            "wal/000000020000000000000003.partial"
        );
        assert!(wal_key("../etc/passwd").is_err());
        assert!(wal_key("00000001000000000000000").is_err());
        assert!(wal_key("").is_err());
        assert_eq!(
            parse_wal_key("wal/00000002.history"),
            Some("00000002.history")
        );
        assert_eq!(parse_wal_key("wal/junk"), None);
        assert_eq!(parse_wal_key("chunks/x"), None);
        assert_eq!(parse_wal_key(&wal_key(SEG).unwrap()), Some(SEG));
    }

    #[test]
    fn chunk_keys_round_trip() {
        let k = chunk_key(SEG, 0, 0x12000).unwrap();
        assert_eq!(k, "chunks/000000010000000000000003/00000000-00012000");
        let p = parse_chunk_key(&k).unwrap();
        assert_eq!(
            p,
            ChunkKey {
                segment: SEG.into(),
                start: 0,
                end: 0x12000
            }
        );
        assert_eq!(p.name(), chunk_name(SEG, 0, 0x12000).unwrap());
        assert_eq!(parse_chunk_segment(&k), Some(SEG));
        assert_eq!(
            chunks_prefix(SEG).unwrap(),
            "chunks/000000010000000000000003/"
        );
        // Lexical order is offset order.
        let a = chunk_key(SEG, 0x2000, 0x4000).unwrap();
        let b = chunk_key(SEG, 0x10000, 0x12000).unwrap();
        assert!(a < b);
    }

    #[test]
    fn bad_chunks_are_refused() {
        assert!(chunk_key(SEG, 10, 10).is_err());
        assert!(chunk_key(SEG, 10, 5).is_err());
        assert!(chunk_key(SEG, 0, 1 << 33).is_err());
        assert!(chunk_key("00000002.history", 0, 1).is_err());
        assert_eq!(parse_chunk_key("chunks/000000010000000000000003/0-1"), None);
        assert_eq!(
            parse_chunk_key("chunks/000000010000000000000003/00000002-00000001"),
            None
        );
        assert_eq!(parse_chunk_key("chunks/zz/00000000-00000001"), None);
        assert_eq!(parse_chunk_key("wal/000000010000000000000003"), None);
        assert_eq!(
            parse_chunk_key("chunks/000000010000000000000003/00000000-0000000g"),
            None
        );
    }
}
