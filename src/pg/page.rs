//! WAL page-header validation: the gate of data-safety rule 5, "never
//! archive a stranger's WAL".
//!
//! # What it owns
//!
//! Every WAL byte walsafe accepts, whether streamed ([`PageValidator`]) or
//! handed over as a whole segment file by `archive_command`
//! ([`validate_segment`]), passes through here first. Only page *headers* are
//! checked, never records: that is enough to tell PostgreSQL WAL of this
//! cluster, at this address, on this timeline, from anything else (another
//! cluster, a recycled segment, a file of zeros, a different PostgreSQL
//! build), and it is cheap (one header per 8 KiB).
//!
//! # On-disk format (PostgreSQL's `XLogPageHeaderData`, little-endian)
//!
//! Verified against `src/include/access/xlog_internal.h` and
//! `XLogReaderValidatePageHeader` (`src/backend/access/transam/xlogreader.c`)
//! of PostgreSQL 13 to 18, and against a segment written by PostgreSQL 15:
//!
//! ```text
//! every page (XLOG_BLCKSZ = 8192 bytes), at its start:
//! struct ShortHeader {            // SizeOfXLogShortPHD = MAXALIGN(20) = 24
//!     xlp_magic:    u16,          //  0  WAL format version, see KNOWN_MAGICS
//!     xlp_info:     u16,          //  2  XLP_* flag bits
//!     xlp_tli:      u32,          //  4  timeline of the first record on the page
//!     xlp_pageaddr: u64,          //  8  LSN of this page's first byte
//!     xlp_rem_len:  u32,          // 16  bytes of a record continued from the previous page
//!     _pad:         [u8; 4],      // 20
//! }
//! first page of every segment (xlp_info has XLP_LONG_HEADER):
//! struct LongHeader {             // SizeOfXLogLongPHD = 40
//!     std:             ShortHeader without padding (20 bytes) + 4 bytes of padding,
//!     xlp_sysid:       u64,       // 24  database system identifier (pg_control)
//!     xlp_seg_size:    u32,       // 32  wal_segment_size
//!     xlp_xlog_blcksz: u32,       // 36  XLOG_BLCKSZ
//! }
//! xlp_info bits (PostgreSQL 13–18; XLP_ALL_FLAGS = 0x000F):
//!     0x0001 XLP_FIRST_IS_CONTRECORD            page starts with a continued record
//!     0x0002 XLP_LONG_HEADER                    long header (segment start only)
//!     0x0004 XLP_BKP_REMOVABLE                  backup blocks on the page are optional
//!     0x0008 XLP_FIRST_IS_OVERWRITE_CONTRECORD  replaces a missing contrecord
//! ```
//!
//! (PostgreSQL's development branch after 18 drops `XLP_BKP_REMOVABLE` and
//! moves `XLP_FIRST_IS_OVERWRITE_CONTRECORD` to 0x0004, together with a new
//! magic; a new version is added here by adding its magic and, if needed,
//! its flag mask.)
//!
//! # The checks, per page (PostgreSQL's own, plus two)
//!
//! 1. `xlp_magic` is the page magic of a supported PostgreSQL release, and the
//!    same on every page of a stream or file (one cluster has one version);
//! 2. `xlp_info` has no bits outside `XLP_ALL_FLAGS`;
//! 3. the long header is present on every segment's first page and only
//!    there (PostgreSQL checks only the first half);
//! 4. long header: `xlp_sysid`, `xlp_seg_size` and `xlp_xlog_blcksz` equal
//!    the repository's [`ClusterIdentity`];
//! 5. `xlp_pageaddr` equals the page's own LSN (a recycled segment, or bytes
//!    written at the wrong offset, fail here);
//! 6. `xlp_tli` is between 1 and the timeline being read (walsafe's
//!    addition: a page from a *future* timeline is a stranger), and never
//!    decreases from one page to a later one (pages before a switch point
//!    legitimately carry the parent's, lower timeline). Like PostgreSQL, the
//!    "never decreases" check applies only to pages beyond the latest page
//!    seen, so re-reading a segment after a timeline switch is fine.
//!
//! A page that is all zeros is not a header: after an `XLOG_SWITCH` record
//! (`pg_switch_wal()`, `archive_timeout`) PostgreSQL leaves the rest of the
//! segment zeroed, on disk and in the replication stream alike (seen in a
//! PostgreSQL 15 segment: 634 pages of WAL, then 1388 zero pages). So the
//! first all-zero page of a segment (never its first page) starts a "zero
//! tail": every byte up to the segment end must then be zero, and the next
//! segment starts with a checked long header again.
//!
//! # Invariants of [`PageValidator`]
//!
//! * Calls to [`PageValidator::feed`] are contiguous; the first call (and the
//!   first after [`PageValidator::set_timeline`]) may start anywhere.
//! * Every page header whose bytes are fully covered by fed data has been
//!   checked when `feed` returns `Ok`; a header split across two calls is
//!   checked when its last byte arrives. A header that began before the
//!   first fed byte cannot be checked and is skipped.

use std::fmt;

use super::cluster::ClusterIdentity;
use super::lsn::{Lsn, TimelineId};
use super::walfile::{is_valid_segment_size, SegmentName};

/// `XLP_FIRST_IS_CONTRECORD`: the page starts with the rest of a record.
pub const XLP_FIRST_IS_CONTRECORD: u16 = 0x0001;
/// `XLP_LONG_HEADER`: the page has the long header (segment start).
pub const XLP_LONG_HEADER: u16 = 0x0002;
/// `XLP_BKP_REMOVABLE`: backup blocks starting on this page are optional.
pub const XLP_BKP_REMOVABLE: u16 = 0x0004;
/// `XLP_FIRST_IS_OVERWRITE_CONTRECORD`: replaces a missing continuation record.
pub const XLP_FIRST_IS_OVERWRITE_CONTRECORD: u16 = 0x0008;
/// Every defined `xlp_info` bit in PostgreSQL 13–18.
pub const XLP_ALL_FLAGS: u16 = 0x000F;

/// Bytes of the short header that carry data (`sizeof(XLogPageHeaderData)`
/// before MAXALIGN padding).
const SHORT_HEADER_DATA_LEN: usize = 20;
/// `SizeOfXLogShortPHD`.
pub const SHORT_HEADER_LEN: usize = 24;
/// `SizeOfXLogLongPHD`.
pub const LONG_HEADER_LEN: usize = 40;

/// `XLOG_PAGE_MAGIC` of each supported PostgreSQL major version, from
/// `src/include/access/xlog_internal.h` of each release branch.
pub const KNOWN_MAGICS: [(u16, u32); 6] = [
    (0xD106, 13),
    (0xD10D, 14),
    (0xD110, 15),
    (0xD113, 16),
    (0xD116, 17),
    (0xD118, 18),
];

/// The PostgreSQL major version whose WAL pages carry `magic`, if supported.
pub fn pg_major_of_magic(magic: u16) -> Option<u32> {
    KNOWN_MAGICS
        .iter()
        .find(|(m, _)| *m == magic)
        .map(|(_, major)| *major)
}

fn supported_versions() -> String {
    let first = KNOWN_MAGICS[0].1;
    let last = KNOWN_MAGICS[KNOWN_MAGICS.len() - 1].1;
    format!("PostgreSQL {first} to {last}")
}

/// Whether PostgreSQL supports `id`'s segment and block sizes.
fn check_geometry(id: &ClusterIdentity) -> Result<(), PageError> {
    let bs = id.block_size;
    let ok_block = bs.is_power_of_two() && (1024..=65536).contains(&bs);
    if ok_block && is_valid_segment_size(id.segment_size) && id.segment_size % bs == 0 {
        Ok(())
    } else {
        Err(PageError::UnsupportedGeometry {
            segment_size: id.segment_size,
            block_size: id.block_size,
        })
    }
}

/// Where a page is: its LSN, and its segment file and offset (for messages).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageAt {
    /// The page's first byte.
    pub lsn: Lsn,
    /// The segment file name holding the page (on the timeline being read).
    pub segment: String,
    /// Offset of the page inside that segment.
    pub offset: u64,
}

impl PageAt {
    fn new(lsn: Lsn, timeline: TimelineId, segment_size: u64) -> Self {
        PageAt {
            lsn,
            segment: SegmentName::containing(timeline, lsn, segment_size).file_name(segment_size),
            offset: lsn.segment_offset(segment_size),
        }
    }
}

impl fmt::Display for PageAt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "WAL page at {} (segment {}, offset {})",
            self.lsn, self.segment, self.offset
        )
    }
}

/// Why WAL was refused. Every variant is permanent: the same bytes will fail
/// the same way, so the caller must stop and alarm, not retry.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PageError {
    /// The page magic is not that of a PostgreSQL version walsafe supports
    /// (or the bytes are not WAL at all).
    #[error(
        "{at} has page magic 0x{found:04X}, which is not the WAL format of any version walsafe supports ({}); is this WAL from a supported PostgreSQL version?",
        supported_versions()
    )]
    UnknownMagic { at: PageAt, found: u16 },

    /// The page is WAL of another PostgreSQL major version than the
    /// cluster's (a repository or spool of the cluster before an upgrade).
    #[error(
        "{at} is WAL of PostgreSQL {} (page magic 0x{found:04X}), but the cluster runs PostgreSQL {expected}; WAL of another major version is never archived or restored here",
        fmt_major(*found)
    )]
    WrongVersion {
        at: PageAt,
        expected: u32,
        found: u16,
    },

    /// The magic changed within one stream or file: two PostgreSQL versions'
    /// WAL mixed together.
    #[error(
        "{at} has page magic 0x{found:04X} (PostgreSQL {}), but earlier pages had 0x{expected:04X} (PostgreSQL {}); WAL of two PostgreSQL versions is mixed up",
        fmt_major(*found), fmt_major(*expected)
    )]
    MagicChanged {
        at: PageAt,
        expected: u16,
        found: u16,
    },

    /// `xlp_info` has bits PostgreSQL never sets.
    #[error("{at} has invalid info bits 0x{found:04X} (valid bits: 0x{XLP_ALL_FLAGS:04X}); the page is corrupt or not WAL")]
    InvalidInfoBits { at: PageAt, found: u16 },

    /// A segment's first page lacks the long header.
    #[error("{at} starts a segment but has no long page header (info bits 0x{info:04X}); the segment is corrupt or not WAL")]
    MissingLongHeader { at: PageAt, info: u16 },

    /// A long header in the middle of a segment.
    #[error("{at} has a long page header, which PostgreSQL writes only at segment starts; the data is misplaced or the segment size is not {segment_size}")]
    UnexpectedLongHeader { at: PageAt, segment_size: u64 },

    /// The long header names another database system: a stranger's WAL.
    #[error("{at} belongs to database system {found}, but this repository is pinned to {expected}; is [postgres] conninfo pointing at the right cluster?")]
    WrongSystem {
        at: PageAt,
        expected: u64,
        found: u64,
    },

    /// The long header's segment size differs from the cluster's.
    #[error("{at} says its segment size is {found} bytes, but this repository is pinned to {expected}; is [postgres] conninfo pointing at the right cluster?")]
    WrongSegmentSize {
        at: PageAt,
        expected: u64,
        found: u64,
    },

    /// The long header's WAL block size differs from the cluster's.
    #[error("{at} says its WAL block size is {found} bytes, but this repository is pinned to {expected}; is [postgres] conninfo pointing at the right cluster?")]
    WrongBlockSize {
        at: PageAt,
        expected: u64,
        found: u64,
    },

    /// `xlp_pageaddr` is not the page's own position: a recycled segment or
    /// bytes at the wrong offset.
    #[error("{at} carries page address {found}; the bytes belong elsewhere in the WAL (a recycled segment, or data written at the wrong offset)")]
    WrongPageAddress { at: PageAt, found: Lsn },

    /// The page's timeline is 0 or later than the timeline being read.
    #[error("{at} carries timeline {found}, but it was read as part of timeline {timeline}; a page's timeline lies between 1 and the timeline it is read on")]
    TimelineOutOfRange {
        at: PageAt,
        timeline: TimelineId,
        found: u32,
    },

    /// The timeline went backwards from one page to a later one.
    #[error("{at} carries timeline {found}, after an earlier page of timeline {previous}; timelines never decrease along the WAL")]
    TimelineDecreased {
        at: PageAt,
        previous: TimelineId,
        found: TimelineId,
    },

    /// An all-zero header where WAL must be: not WAL, or WAL that was never written.
    #[error(
        "{at} is all zeros where a page header belongs; this is not WAL that PostgreSQL wrote"
    )]
    ZeroPage { at: PageAt },

    /// A non-zero page after the zero pages that end a segment's WAL.
    #[error("{at} holds data after zero pages that end the WAL of this segment (at {end}); a segment with a hole would end recovery early")]
    DataAfterEnd { at: PageAt, end: Lsn },

    /// A whole-segment file of the wrong size.
    #[error("WAL file {segment} is {size} bytes, but segments of this cluster are {expected} bytes; it is truncated or not a WAL segment of this cluster")]
    WrongFileSize {
        segment: String,
        size: u64,
        expected: u64,
    },

    /// Too few bytes to hold a long page header.
    #[error(
        "{len} bytes are too few for a WAL segment's long page header ({LONG_HEADER_LEN} bytes)"
    )]
    Truncated { len: usize },

    /// Fed data would end beyond the last position of the 64-bit WAL
    /// address space: the position is corrupt.
    #[error("{len} bytes of WAL at {start} would end beyond FFFFFFFF/FFFFFFFF, the end of the WAL address space; the position is corrupt")]
    BeyondWalSpace { start: Lsn, len: u64 },

    /// Fed data did not continue where the previous call ended.
    #[error("WAL fed for validation at {got} does not continue the previous data, which ended at {expected}")]
    NotContiguous { expected: Lsn, got: Lsn },

    /// The identity's sizes are not ones PostgreSQL allows.
    #[error("segment size {segment_size} / WAL block size {block_size} is not a geometry PostgreSQL supports (segments: power of two, 1 MiB to 1 GiB; blocks: power of two, 1 to 64 KiB)")]
    UnsupportedGeometry { segment_size: u64, block_size: u64 },
}

fn fmt_major(magic: u16) -> String {
    pg_major_of_magic(magic).map_or_else(|| "unknown".to_string(), |m| m.to_string())
}

impl PageError {
    /// Always false: the same bytes fail the same way. Kept so that callers
    /// classify every error type the same way.
    pub fn is_retryable(&self) -> bool {
        false
    }

    /// True when the WAL comes from another cluster (wrong system identifier,
    /// segment size or block size).
    pub fn is_stranger(&self) -> bool {
        matches!(
            self,
            PageError::WrongSystem { .. }
                | PageError::WrongSegmentSize { .. }
                | PageError::WrongBlockSize { .. }
                | PageError::WrongVersion { .. }
        )
    }
}

/// A segment's long page header, as found in a file (for identifying a
/// stranger's WAL: which cluster, which version, which address).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LongHeader {
    /// `xlp_magic`.
    pub magic: u16,
    /// `xlp_info`.
    pub info: u16,
    /// `xlp_tli`.
    pub timeline: TimelineId,
    /// `xlp_pageaddr`.
    pub pageaddr: Lsn,
    /// `xlp_rem_len`.
    pub rem_len: u32,
    /// `xlp_sysid`.
    pub system_identifier: u64,
    /// `xlp_seg_size`.
    pub segment_size: u32,
    /// `xlp_xlog_blcksz`.
    pub block_size: u32,
}

impl LongHeader {
    /// The PostgreSQL major version that wrote this header.
    pub fn pg_major(&self) -> Option<u32> {
        pg_major_of_magic(self.magic)
    }
}

/// The fields of a short header.
#[derive(Clone, Copy, Debug)]
struct ShortHeader {
    magic: u16,
    info: u16,
    tli: u32,
    pageaddr: u64,
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn parse_short(b: &[u8]) -> ShortHeader {
    ShortHeader {
        magic: le_u16(b, 0),
        info: le_u16(b, 2),
        tli: le_u32(b, 4),
        pageaddr: le_u64(b, 8),
    }
}

/// Reads the long header at the start of a segment file, checking only
/// that it is one (known magic, long-header bit); the caller compares the
/// fields with whatever it expects.
pub fn read_long_header(bytes: &[u8]) -> Result<LongHeader, PageError> {
    if bytes.len() < LONG_HEADER_LEN {
        return Err(PageError::Truncated { len: bytes.len() });
    }
    let s = parse_short(bytes);
    let h = LongHeader {
        magic: s.magic,
        info: s.info,
        timeline: TimelineId(s.tli),
        pageaddr: Lsn(s.pageaddr),
        rem_len: le_u32(bytes, 16),
        system_identifier: le_u64(bytes, 24),
        segment_size: le_u32(bytes, 32),
        block_size: le_u32(bytes, 36),
    };
    // Name the page by its own claims: that is all we know of a stranger's file.
    let at = || {
        let seg = u64::from(h.segment_size);
        let seg = if is_valid_segment_size(seg) {
            seg
        } else {
            super::DEFAULT_SEGMENT_SIZE
        };
        PageAt::new(h.pageaddr, TimelineId(h.timeline.0.max(1)), seg)
    };
    if bytes[..LONG_HEADER_LEN].iter().all(|&b| b == 0) {
        return Err(PageError::ZeroPage { at: at() });
    }
    if pg_major_of_magic(h.magic).is_none() {
        return Err(PageError::UnknownMagic {
            at: at(),
            found: h.magic,
        });
    }
    if h.info & XLP_LONG_HEADER == 0 {
        return Err(PageError::MissingLongHeader {
            at: at(),
            info: h.info,
        });
    }
    Ok(h)
}

/// The per-page checks, shared by the streaming and whole-file paths.
struct Checker {
    identity: ClusterIdentity,
    /// First magic seen; every later page must carry the same.
    magic: Option<u16>,
    /// PostgreSQL's `latestPagePtr` / `latestPageTLI`.
    latest: Option<(Lsn, TimelineId)>,
}

impl Checker {
    fn new(identity: ClusterIdentity) -> Self {
        Checker {
            identity,
            magic: None,
            latest: None,
        }
    }

    /// Bytes of header needed to check the page at `page`.
    fn needed(&self, page: Lsn) -> usize {
        if page.segment_offset(self.identity.segment_size) == 0 {
            LONG_HEADER_LEN
        } else {
            SHORT_HEADER_DATA_LEN
        }
    }

    /// Checks the header `hdr` (at least [`Checker::needed`] bytes) of the
    /// page at `page`, read as part of `timeline`.
    fn check(&mut self, page: Lsn, timeline: TimelineId, hdr: &[u8]) -> Result<(), PageError> {
        let id = self.identity;
        let at = || PageAt::new(page, timeline, id.segment_size);
        let needed = self.needed(page);
        debug_assert!(hdr.len() >= needed);
        if hdr[..needed].iter().all(|&b| b == 0) {
            return Err(PageError::ZeroPage { at: at() });
        }
        let h = parse_short(hdr);

        // 1. magic: known, and constant.
        if pg_major_of_magic(h.magic).is_none() {
            return Err(PageError::UnknownMagic {
                at: at(),
                found: h.magic,
            });
        }
        match self.magic {
            Some(m) if m != h.magic => {
                return Err(PageError::MagicChanged {
                    at: at(),
                    expected: m,
                    found: h.magic,
                })
            }
            Some(_) => {}
            None => {
                // The identity knows its major version (0 = not known).
                let major = id.major();
                if major != 0 && pg_major_of_magic(h.magic) != Some(major) {
                    return Err(PageError::WrongVersion {
                        at: at(),
                        expected: major,
                        found: h.magic,
                    });
                }
                self.magic = Some(h.magic)
            }
        }

        // 2. info bits.
        if h.info & !XLP_ALL_FLAGS != 0 {
            return Err(PageError::InvalidInfoBits {
                at: at(),
                found: h.info,
            });
        }

        // 3./4. long header exactly at segment starts, matching the identity.
        let segment_start = page.segment_offset(id.segment_size) == 0;
        let long = h.info & XLP_LONG_HEADER != 0;
        match (segment_start, long) {
            (true, false) => {
                return Err(PageError::MissingLongHeader {
                    at: at(),
                    info: h.info,
                })
            }
            (false, true) => {
                return Err(PageError::UnexpectedLongHeader {
                    at: at(),
                    segment_size: id.segment_size,
                })
            }
            (true, true) => {
                let sysid = le_u64(hdr, 24);
                let seg_size = u64::from(le_u32(hdr, 32));
                let blcksz = u64::from(le_u32(hdr, 36));
                if sysid != id.system_identifier {
                    return Err(PageError::WrongSystem {
                        at: at(),
                        expected: id.system_identifier,
                        found: sysid,
                    });
                }
                if seg_size != id.segment_size {
                    return Err(PageError::WrongSegmentSize {
                        at: at(),
                        expected: id.segment_size,
                        found: seg_size,
                    });
                }
                if blcksz != id.block_size {
                    return Err(PageError::WrongBlockSize {
                        at: at(),
                        expected: id.block_size,
                        found: blcksz,
                    });
                }
            }
            (false, false) => {}
        }

        // 5. the page is where it says it is.
        if h.pageaddr != page.0 {
            return Err(PageError::WrongPageAddress {
                at: at(),
                found: Lsn(h.pageaddr),
            });
        }

        // 6. timeline within range, and never decreasing along the WAL.
        if h.tli == 0 || h.tli > timeline.0 {
            return Err(PageError::TimelineOutOfRange {
                at: at(),
                timeline,
                found: h.tli,
            });
        }
        let tli = TimelineId(h.tli);
        if let Some((latest_page, latest_tli)) = self.latest {
            if page > latest_page && tli < latest_tli {
                return Err(PageError::TimelineDecreased {
                    at: at(),
                    previous: latest_tli,
                    found: tli,
                });
            }
        }
        self.latest = Some((page, tli));
        Ok(())
    }
}

/// Validates the page headers of a WAL stream as it arrives.
pub struct PageValidator {
    checker: Checker,
    /// The timeline being streamed: the highest a page may carry.
    timeline: TimelineId,
    /// End of the data fed so far; `None` before the first call and after a
    /// timeline switch.
    next: Option<Lsn>,
    /// Leading bytes of a page header split across calls (the page starts
    /// at `next - pending.len()`).
    pending: Vec<u8>,
    /// Set at the first all-zero page of a segment (PostgreSQL pads the
    /// rest of a segment with zeros after an `XLOG_SWITCH` record): the
    /// rest of that segment must be zeros.
    zero_tail: Option<Lsn>,
}

impl PageValidator {
    /// A validator for WAL of `identity`, streamed on `timeline`.
    pub fn new(identity: ClusterIdentity, timeline: TimelineId) -> Self {
        PageValidator {
            checker: Checker::new(identity),
            timeline,
            next: None,
            pending: Vec::with_capacity(LONG_HEADER_LEN),
            zero_tail: None,
        }
    }

    /// Checks every page header covered by `data`, which is WAL starting at
    /// `start`. Consecutive calls must be contiguous (the first may start
    /// anywhere). On error the validator's state is unspecified: the
    /// stream must be abandoned.
    pub fn feed(&mut self, start: Lsn, data: &[u8]) -> Result<(), PageError> {
        check_geometry(&self.checker.identity)?;
        match self.next {
            Some(expected) if expected != start => {
                return Err(PageError::NotContiguous {
                    expected,
                    got: start,
                })
            }
            Some(_) => {}
            None => self.pending.clear(),
        }
        let bs = self.checker.identity.block_size;
        let seg_size = self.checker.identity.segment_size;
        let len = data.len() as u64;
        let Some(end) = start.0.checked_add(len).map(Lsn) else {
            return Err(PageError::BeyondWalSpace { start, len });
        };
        let mut pos = start;
        while pos < end {
            let from = (pos.0 - start.0) as usize;
            if let Some(zero_start) = self.zero_tail {
                // After an XLOG_SWITCH record the rest of the segment is
                // zeros: every byte up to the segment end must be zero.
                // (The last segment of the address space ends at u64::MAX.)
                let seg_end = Lsn(pos.segment_start(seg_size).0.saturating_add(seg_size));
                let upto = seg_end.min(end);
                let slice = &data[from..(upto.0 - start.0) as usize];
                if let Some(i) = slice.iter().position(|&b| b != 0) {
                    let at = pos.plus(i as u64);
                    return Err(PageError::DataAfterEnd {
                        at: PageAt::new(Lsn(at.0 - at.0 % bs), self.timeline, seg_size),
                        end: zero_start,
                    });
                }
                pos = upto;
                if pos == seg_end {
                    self.zero_tail = None;
                }
                continue;
            }
            let in_page = pos.0 % bs;
            let page = Lsn(pos.0 - in_page);
            let needed = self.checker.needed(page) as u64;
            // Header bytes are collected only when we saw the page's first
            // byte: either now (in_page == 0) or in an earlier call.
            if in_page < needed && in_page == self.pending.len() as u64 {
                let take = (needed - in_page).min(end.0 - pos.0);
                self.pending
                    .extend_from_slice(&data[from..from + take as usize]);
                pos = pos.plus(take);
                if self.pending.len() as u64 == needed {
                    let zero = self.pending.iter().all(|&b| b == 0);
                    if zero && page.segment_offset(seg_size) != 0 {
                        // The zeros that follow a WAL switch; the rest of
                        // this page is checked in zero-tail mode.
                        self.zero_tail = Some(page);
                        self.pending.clear();
                        continue;
                    }
                    let r = self.checker.check(page, self.timeline, &self.pending);
                    self.pending.clear();
                    r?;
                } else {
                    continue; // header incomplete: the data ended
                }
            } else {
                self.pending.clear();
            }
            pos = Lsn(page.0.saturating_add(bs));
        }
        self.next = Some(end);
        Ok(())
    }

    /// Switches to a new timeline (after the server ended the old one). The
    /// next [`feed`](Self::feed) may start anywhere, typically at the start
    /// of the segment holding the switch point; the "timeline never
    /// decreases" check continues across the switch.
    pub fn set_timeline(&mut self, t: TimelineId) {
        self.timeline = t;
        self.next = None;
        self.pending.clear();
        self.zero_tail = None;
    }

    /// The page magic seen first (tells the PostgreSQL version via
    /// [`pg_major_of_magic`]); `None` before any header was checked.
    pub fn magic(&self) -> Option<u16> {
        self.checker.magic
    }

    /// The timeline being validated.
    pub fn timeline(&self) -> TimelineId {
        self.timeline
    }
}

/// Validates a whole segment file (as `archive_command` hands it over):
/// exact segment size, every page header, and "end of WAL" only as trailing
/// all-zero pages after at least one valid page.
pub fn validate_segment(
    identity: &ClusterIdentity,
    segment: SegmentName,
    bytes: &[u8],
) -> Result<(), PageError> {
    let mut check = SegmentCheck::new(identity, segment)?;
    if bytes.len() as u64 != identity.segment_size {
        return Err(PageError::WrongFileSize {
            segment: segment.file_name(identity.segment_size),
            size: bytes.len() as u64,
            expected: identity.segment_size,
        });
    }
    check.feed(bytes)?;
    check.finish()
}

/// [`validate_segment`] over a segment read in pieces of whole pages, so
/// that a file is checked without holding all of it.
pub struct SegmentCheck {
    checker: Checker,
    segment: SegmentName,
    /// Bytes fed so far.
    seen: u64,
    /// Where the trailing zero pages began, once they did.
    end_of_wal: Option<Lsn>,
}

impl SegmentCheck {
    pub fn new(identity: &ClusterIdentity, segment: SegmentName) -> Result<Self, PageError> {
        check_geometry(identity)?;
        Ok(SegmentCheck {
            checker: Checker::new(*identity),
            segment,
            seen: 0,
            end_of_wal: None,
        })
    }

    /// Checks the next piece, a whole number of pages.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), PageError> {
        let identity = self.checker.identity;
        let (block, seg_size) = (identity.block_size, identity.segment_size);
        let len = bytes.len() as u64;
        if len % block != 0 || self.seen + len > seg_size {
            return Err(PageError::WrongFileSize {
                segment: self.segment.file_name(seg_size),
                size: self.seen + len,
                expected: seg_size,
            });
        }
        let base = self.segment.start_lsn(seg_size).plus(self.seen);
        let first = self.seen / block;
        for (i, page) in bytes.chunks(block as usize).enumerate() {
            let lsn = base.plus(i as u64 * block);
            let all_zero = page.iter().all(|&b| b == 0);
            match (self.end_of_wal, all_zero) {
                (None, true) if first + i as u64 > 0 => self.end_of_wal = Some(lsn),
                (None, _) => self.checker.check(lsn, self.segment.timeline, page)?,
                (Some(_), true) => {}
                (Some(end), false) => {
                    return Err(PageError::DataAfterEnd {
                        at: PageAt::new(lsn, self.segment.timeline, seg_size),
                        end,
                    })
                }
            }
        }
        self.seen += len;
        Ok(())
    }

    /// The segment is whole.
    pub fn finish(self) -> Result<(), PageError> {
        let seg_size = self.checker.identity.segment_size;
        if self.seen != seg_size {
            return Err(PageError::WrongFileSize {
                segment: self.segment.file_name(seg_size),
                size: self.seen,
                expected: seg_size,
            });
        }
        Ok(())
    }
}

/// Synthetic WAL for tests and benchmarks: `len` bytes from `start` (a
/// page boundary) whose page headers are what PostgreSQL 15 writes for
/// `identity` on `timeline`, and whose bodies are non-zero filler. It
/// passes [`PageValidator`]; it is not replayable.
pub fn synthetic_wal(
    identity: &ClusterIdentity,
    timeline: TimelineId,
    start: Lsn,
    len: u64,
) -> Vec<u8> {
    let bs = identity.block_size;
    assert_eq!(start.0 % bs, 0, "synthetic WAL starts at a page boundary");
    let pages = len.div_ceil(bs);
    let mut out = Vec::with_capacity((pages * bs) as usize);
    for p in 0..pages {
        let lsn = start.0 + p * bs;
        let mut page = vec![0xA5u8; bs as usize];
        let long = lsn % identity.segment_size == 0;
        page[0..2].copy_from_slice(&0xD110u16.to_le_bytes());
        let info = if long { XLP_LONG_HEADER } else { 0 } | XLP_BKP_REMOVABLE;
        page[2..4].copy_from_slice(&info.to_le_bytes());
        page[4..8].copy_from_slice(&timeline.0.to_le_bytes());
        page[8..16].copy_from_slice(&lsn.to_le_bytes());
        page[16..24].fill(0);
        if long {
            page[24..32].copy_from_slice(&identity.system_identifier.to_le_bytes());
            page[32..36].copy_from_slice(&(identity.segment_size as u32).to_le_bytes());
            page[36..40].copy_from_slice(&(bs as u32).to_le_bytes());
        }
        out.extend_from_slice(&page);
    }
    out.truncate(len as usize);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SYSID: u64 = 7_312_345_678_901_234_567;
    const SEG: u64 = 1 << 20; // 1 MiB segments keep synthetic tests small
    const BS: u64 = 8192;

    fn identity() -> ClusterIdentity {
        ClusterIdentity::new(SYSID, 150000, SEG)
    }

    /// Synthetic WAL: `pages` pages from `start`, headers as PostgreSQL 15
    /// writes them, body bytes non-zero.
    fn wal(start: Lsn, pages: u64, tli: u32) -> Vec<u8> {
        synthetic_wal(&identity(), TimelineId(tli), start, pages * BS)
    }

    #[test]
    fn magics_of_supported_versions() {
        assert_eq!(pg_major_of_magic(0xD106), Some(13));
        assert_eq!(pg_major_of_magic(0xD110), Some(15));
        assert_eq!(pg_major_of_magic(0xD118), Some(18));
        assert_eq!(pg_major_of_magic(0xD101), None); // PostgreSQL 12
        assert_eq!(pg_major_of_magic(0), None);
    }

    #[test]
    fn valid_stream_in_odd_pieces_including_split_headers() {
        let start = Lsn(3 * SEG);
        let data = wal(start, 2 * SEG / BS + 3, 1);
        let mut v = PageValidator::new(identity(), TimelineId(1));
        // Pieces of 1, 7, 13, ... bytes split headers everywhere.
        let mut off = 0usize;
        let mut step = 1usize;
        while off < data.len() {
            let n = step.min(data.len() - off);
            v.feed(start.plus(off as u64), &data[off..off + n]).unwrap();
            off += n;
            step = (step * 7 + 5) % 9001 + 1;
        }
        assert_eq!(v.magic(), Some(0xD110));
    }

    #[test]
    fn header_split_across_calls_is_still_checked() {
        let start = Lsn(SEG);
        let mut data = wal(start, 2, 1);
        // Corrupt the second page's pageaddr and split its header at byte 10.
        data[BS as usize + 9] ^= 0x40;
        let mut v = PageValidator::new(identity(), TimelineId(1));
        let cut = BS as usize + 10;
        v.feed(start, &data[..cut]).unwrap();
        let e = v.feed(start.plus(cut as u64), &data[cut..]).unwrap_err();
        assert!(matches!(e, PageError::WrongPageAddress { .. }), "{e}");
    }

    #[test]
    fn stream_starting_mid_page_skips_the_uncovered_header() {
        let start = Lsn(SEG);
        let data = wal(start, 3, 1);
        let mut v = PageValidator::new(identity(), TimelineId(1));
        v.feed(start.plus(100), &data[100..]).unwrap();
        assert_eq!(v.magic(), Some(0xD110)); // pages 2 and 3 were checked
    }

    #[test]
    fn wrong_system_names_both_identifiers() {
        let start = Lsn(3 * SEG);
        let data = wal(start, 2, 1);
        let other = ClusterIdentity::new(7_398_765_432_109_876_543, 150000, SEG);
        let mut v = PageValidator::new(other, TimelineId(1));
        let e = v.feed(start, &data).unwrap_err();
        assert!(e.is_stranger());
        let msg = e.to_string();
        assert!(msg.contains("0/300000"), "{msg}");
        assert!(msg.contains("7312345678901234567"), "{msg}");
        assert!(msg.contains("7398765432109876543"), "{msg}");
        assert!(msg.contains("[postgres] conninfo"), "{msg}");
    }

    #[test]
    fn another_major_version_is_a_stranger() {
        let start = Lsn(3 * SEG);
        let data = wal(start, 2, 1);
        let v16 = ClusterIdentity::new(identity().system_identifier, 160002, SEG);
        let e = PageValidator::new(v16, TimelineId(1))
            .feed(start, &data)
            .unwrap_err();
        assert!(
            matches!(e, PageError::WrongVersion { expected: 16, .. }),
            "{e}"
        );
        assert!(e.is_stranger());
        assert!(e.to_string().contains("PostgreSQL 15"), "{e}");
        // An identity that does not know its version checks everything else.
        let unknown = ClusterIdentity::new(identity().system_identifier, 0, SEG);
        PageValidator::new(unknown, TimelineId(1))
            .feed(start, &data)
            .unwrap();
    }

    #[test]
    fn each_check_fires() {
        let start = Lsn(SEG);
        let base = wal(start, 4, 2);
        let run = |data: &[u8], tli: u32| {
            PageValidator::new(identity(), TimelineId(tli)).feed(start, data)
        };
        run(&base, 2).unwrap();

        let mut d = base.clone();
        d[BS as usize..BS as usize + 2].copy_from_slice(&0xD101u16.to_le_bytes());
        assert!(matches!(
            run(&d, 2),
            Err(PageError::UnknownMagic { found: 0xD101, .. })
        ));

        let mut d = base.clone();
        d[BS as usize..BS as usize + 2].copy_from_slice(&0xD113u16.to_le_bytes());
        assert!(matches!(run(&d, 2), Err(PageError::MagicChanged { .. })));

        let mut d = base.clone();
        d[2 * BS as usize + 2] |= 0x10;
        assert!(matches!(run(&d, 2), Err(PageError::InvalidInfoBits { .. })));

        let mut d = base.clone();
        d[2] &= !(XLP_LONG_HEADER as u8);
        assert!(matches!(
            run(&d, 2),
            Err(PageError::MissingLongHeader { .. })
        ));

        let mut d = base.clone();
        d[BS as usize + 2] |= XLP_LONG_HEADER as u8;
        assert!(matches!(
            run(&d, 2),
            Err(PageError::UnexpectedLongHeader { .. })
        ));

        let mut d = base.clone();
        d[32..36].copy_from_slice(&(16u32 << 20).to_le_bytes());
        assert!(matches!(
            run(&d, 2),
            Err(PageError::WrongSegmentSize { .. })
        ));

        let mut d = base.clone();
        d[36..40].copy_from_slice(&16384u32.to_le_bytes());
        assert!(matches!(run(&d, 2), Err(PageError::WrongBlockSize { .. })));

        // A page from a later timeline than the one streamed.
        assert!(matches!(
            run(&base, 1),
            Err(PageError::TimelineOutOfRange { found: 2, .. })
        ));

        // Timeline going down from page 2 to page 3.
        let mut d = base.clone();
        d[3 * BS as usize + 4..3 * BS as usize + 8].copy_from_slice(&1u32.to_le_bytes());
        assert!(matches!(
            run(&d, 2),
            Err(PageError::TimelineDecreased { .. })
        ));

        // A zero header followed by data: not the zero tail of a WAL switch.
        let mut d = base.clone();
        d[2 * BS as usize..2 * BS as usize + 24].fill(0);
        assert!(matches!(run(&d, 2), Err(PageError::DataAfterEnd { .. })));

        // A segment never starts with zeros.
        let mut d = base.clone();
        d[..40].fill(0);
        assert!(matches!(run(&d, 2), Err(PageError::ZeroPage { .. })));
    }

    #[test]
    fn zero_tail_after_a_wal_switch_is_accepted_up_to_the_segment_end() {
        // Segment 1: 3 pages of WAL, then zeros; segment 2: WAL again.
        let start = Lsn(SEG);
        let mut d = wal(start, 3, 1);
        d.resize(SEG as usize, 0);
        d.extend_from_slice(&wal(Lsn(2 * SEG), 2, 1));
        let mut v = PageValidator::new(identity(), TimelineId(1));
        for (i, piece) in d.chunks(5000).enumerate() {
            v.feed(start.plus(i as u64 * 5000), piece).unwrap();
        }
        // A stray byte inside the zero tail is refused, wherever it is.
        for at in [
            3 * BS as usize + 30,
            3 * BS as usize + 5000,
            SEG as usize - 1,
        ] {
            let mut bad = d.clone();
            bad[at] = 1;
            let mut v = PageValidator::new(identity(), TimelineId(1));
            let e = v.feed(start, &bad).unwrap_err();
            match e {
                PageError::DataAfterEnd { end, .. } => assert_eq!(end, start.plus(3 * BS)),
                e => panic!("unexpected {e}"),
            }
        }
        // The next segment's header is still checked after the zero tail.
        let mut bad = d.clone();
        bad[SEG as usize + 8] ^= 1;
        let mut v = PageValidator::new(identity(), TimelineId(1));
        assert!(matches!(
            v.feed(start, &bad),
            Err(PageError::WrongPageAddress { .. })
        ));
    }

    #[test]
    fn old_timeline_pages_before_switch_point_are_accepted() {
        // Timeline 2's copy of the switch segment: pages 0..2 carry tli 1.
        let start = Lsn(SEG);
        let mut d = wal(start, 2, 1);
        d.extend_from_slice(&wal(start.plus(2 * BS), 2, 2));
        let mut v = PageValidator::new(identity(), TimelineId(1));
        v.feed(start, &d[..(2 * BS) as usize]).unwrap();
        v.set_timeline(TimelineId(2));
        // Re-streamed from the segment start on the new timeline.
        v.feed(start, &d).unwrap();
    }

    #[test]
    fn non_contiguous_feed_is_refused() {
        let start = Lsn(SEG);
        let d = wal(start, 2, 1);
        let mut v = PageValidator::new(identity(), TimelineId(1));
        v.feed(start, &d[..100]).unwrap();
        assert_eq!(
            v.feed(start.plus(200), &d[200..]),
            Err(PageError::NotContiguous {
                expected: start.plus(100),
                got: start.plus(200)
            })
        );
    }

    #[test]
    fn whole_segment_with_trailing_zero_pages() {
        let seg = SegmentName {
            timeline: TimelineId(1),
            segno: 5,
        };
        let start = seg.start_lsn(SEG);
        let mut d = wal(start, 10, 1);
        d.resize(SEG as usize, 0);
        validate_segment(&identity(), seg, &d).unwrap();

        // A hole: data after the zero pages.
        let mut h = d.clone();
        h[(20 * BS) as usize + 100] = 1;
        assert!(matches!(
            validate_segment(&identity(), seg, &h),
            Err(PageError::DataAfterEnd { .. })
        ));

        // Wrong size.
        let e = validate_segment(&identity(), seg, &d[..d.len() - 1]).unwrap_err();
        assert!(e.to_string().contains("000000010000000000000005"), "{e}");

        // All zeros.
        assert!(matches!(
            validate_segment(&identity(), seg, &vec![0u8; SEG as usize]),
            Err(PageError::ZeroPage { .. })
        ));

        // The file of another segment (recycled / misnamed).
        let other = SegmentName {
            timeline: TimelineId(1),
            segno: 6,
        };
        assert!(matches!(
            validate_segment(&identity(), other, &d),
            Err(PageError::WrongPageAddress { .. })
        ));
    }

    /// Fed in pieces of whole pages, a segment gets the verdict it gets
    /// whole, whatever the cut: a zero tail that starts in a later piece,
    /// data after it, a misplaced page, a short or an overlong file.
    #[test]
    fn a_segment_checked_in_pieces_as_whole() {
        let seg = SegmentName {
            timeline: TimelineId(1),
            segno: 5,
        };
        let mut good = wal(seg.start_lsn(SEG), 10, 1);
        good.resize(SEG as usize, 0);
        let mut hole = good.clone();
        hole[(20 * BS) as usize + 100] = 1;
        let mut misplaced = good.clone();
        misplaced[(3 * BS) as usize..(4 * BS) as usize].copy_from_slice(&wal(
            seg.start_lsn(SEG).plus(9 * BS),
            1,
            1,
        ));
        let cases: [(&str, &[u8]); 4] = [
            ("good", &good),
            ("hole", &hole),
            ("misplaced", &misplaced),
            ("short", &good[..good.len() - BS as usize]),
        ];
        for (what, bytes) in cases {
            let whole = validate_segment(&identity(), seg, bytes).map_err(|e| e.to_string());
            for piece in [BS as usize, 3 * BS as usize, 8 * BS as usize] {
                let mut check = SegmentCheck::new(&identity(), seg).unwrap();
                let pieces = bytes
                    .chunks(piece)
                    .try_for_each(|p| check.feed(p))
                    .and_then(|()| check.finish())
                    .map_err(|e| e.to_string());
                assert_eq!(pieces, whole, "{what}, pieces of {piece}");
            }
        }
        assert!(validate_segment(&identity(), seg, &misplaced).is_err());
        // More than a segment, or a piece that is not whole pages.
        let mut check = SegmentCheck::new(&identity(), seg).unwrap();
        check.feed(&good).unwrap();
        assert!(matches!(
            check.feed(&good[..BS as usize]),
            Err(PageError::WrongFileSize { .. })
        ));
        let mut check = SegmentCheck::new(&identity(), seg).unwrap();
        assert!(matches!(
            check.feed(&good[..100]),
            Err(PageError::WrongFileSize { .. })
        ));
    }

    #[test]
    fn long_header_of_a_file() {
        let d = wal(Lsn(7 * SEG), 1, 3);
        let h = read_long_header(&d).unwrap();
        assert_eq!(h.system_identifier, SYSID);
        assert_eq!(h.segment_size as u64, SEG);
        assert_eq!(h.block_size as u64, BS);
        assert_eq!(h.timeline, TimelineId(3));
        assert_eq!(h.pageaddr, Lsn(7 * SEG));
        assert_eq!(h.pg_major(), Some(15));
        assert!(matches!(
            read_long_header(&d[..39]),
            Err(PageError::Truncated { len: 39 })
        ));
        assert!(matches!(
            read_long_header(&wal(Lsn(7 * SEG + BS), 1, 3)),
            Err(PageError::MissingLongHeader { .. })
        ));
    }

    #[test]
    fn bad_geometry_is_refused() {
        let id = ClusterIdentity::new(1, 150000, 3 << 20);
        let mut v = PageValidator::new(id, TimelineId(1));
        assert!(matches!(
            v.feed(Lsn(0), &[0u8; 10]),
            Err(PageError::UnsupportedGeometry { .. })
        ));
    }
}
