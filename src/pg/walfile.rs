//! WAL file names, as PostgreSQL spells them.
//!
//! ```text
//! 000000010000000A000000FE          segment: <TLI 8 hex><LOG 8 hex><SEG 8 hex>
//! 000000010000000A000000FE.partial  segment still being filled (spool only)
//! 00000002.history                  timeline history file
//! ```
//!
//! `LOG` and `SEG` split the segment number: `segno = LOG *
//! segments_per_xlogid + SEG`, where `segments_per_xlogid = 2^32 /
//! segment_size`. The same name is
//! used in the spool, in the repository and by `restore_command`, so the
//! name is the one piece of identity every component agrees on.

use std::fmt;

use super::lsn::{Lsn, TimelineId};

/// Segment sizes PostgreSQL accepts: powers of two from 1 MiB to 1 GiB.
pub fn is_valid_segment_size(size: u64) -> bool {
    size.is_power_of_two() && (1 << 20..=1 << 30).contains(&size)
}

/// A segment's identity: timeline and segment number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentName {
    pub timeline: TimelineId,
    pub segno: u64,
}

impl SegmentName {
    /// The segment holding `lsn` on `timeline`.
    pub fn containing(timeline: TimelineId, lsn: Lsn, segment_size: u64) -> Self {
        SegmentName {
            timeline,
            segno: lsn.segment_no(segment_size),
        }
    }

    /// First byte of the segment.
    pub fn start_lsn(&self, segment_size: u64) -> Lsn {
        Lsn(self.segno * segment_size)
    }

    /// First byte after the segment.
    /// (The last segment of the WAL space ends at `FFFFFFFF/FFFFFFFF`, one
    /// byte short: its true end is not a position.)
    pub fn end_lsn(&self, segment_size: u64) -> Lsn {
        Lsn((self.segno + 1).saturating_mul(segment_size))
    }

    /// The next segment on the same timeline.
    pub fn next(&self) -> Self {
        SegmentName {
            timeline: self.timeline,
            segno: self.segno + 1,
        }
    }

    /// The 24-character file name for the given segment size.
    pub fn file_name(&self, segment_size: u64) -> String {
        let per_id = 0x1_0000_0000u64 / segment_size;
        format!(
            "{:08X}{:08X}{:08X}",
            self.timeline.0,
            self.segno / per_id,
            self.segno % per_id
        )
    }

    /// Parses a 24-character segment file name.
    pub fn parse(name: &str, segment_size: u64) -> Option<Self> {
        if name.len() != 24 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let tli = u32::from_str_radix(&name[0..8], 16).ok()?;
        let log = u64::from_str_radix(&name[8..16], 16).ok()?;
        let seg = u64::from_str_radix(&name[16..24], 16).ok()?;
        let per_id = 0x1_0000_0000u64 / segment_size;
        if tli == 0 || seg >= per_id {
            return None;
        }
        Some(SegmentName {
            timeline: TimelineId(tli),
            segno: log * per_id + seg,
        })
    }
}

/// Any file walsafe handles by WAL name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WalFileName {
    /// A complete segment.
    Segment(SegmentName),
    /// A segment still being filled (`.partial`).
    Partial(SegmentName),
    /// `<TLI>.history`.
    History(TimelineId),
}

/// What kind of name `restore_command` or a directory listing gave us,
/// before the segment size is known.
pub fn classify(name: &str) -> Option<NameKind> {
    if let Some(t) = name.strip_suffix(".history") {
        if t.len() == 8 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
            let tli = u32::from_str_radix(t, 16).ok()?;
            return (tli > 0).then_some(NameKind::History(TimelineId(tli)));
        }
        return None;
    }
    let (base, partial) = match name.strip_suffix(".partial") {
        Some(b) => (b, true),
        None => (name, false),
    };
    if base.len() == 24 && base.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Some(if partial {
            NameKind::Partial
        } else {
            NameKind::Segment
        });
    }
    None
}

/// Shape of a WAL file name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameKind {
    Segment,
    Partial,
    History(TimelineId),
}

impl WalFileName {
    /// Parses any WAL file name walsafe deals with.
    pub fn parse(name: &str, segment_size: u64) -> Option<Self> {
        match classify(name)? {
            NameKind::History(t) => Some(WalFileName::History(t)),
            NameKind::Segment => SegmentName::parse(name, segment_size).map(WalFileName::Segment),
            NameKind::Partial => {
                SegmentName::parse(&name[..24], segment_size).map(WalFileName::Partial)
            }
        }
    }

    /// The file name, formatted for the given segment size.
    pub fn to_name(&self, segment_size: u64) -> String {
        match self {
            WalFileName::Segment(s) => s.file_name(segment_size),
            WalFileName::Partial(s) => format!("{}.partial", s.file_name(segment_size)),
            WalFileName::History(t) => history_file_name(*t),
        }
    }
}

/// `<TLI>.history`.
pub fn history_file_name(t: TimelineId) -> String {
    format!("{:08X}.history", t.0)
}

impl fmt::Display for SegmentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Without a segment size we print the 16 MiB spelling, PostgreSQL's default.
        f.write_str(&self.file_name(crate::pg::DEFAULT_SEGMENT_SIZE))
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_last_segment_of_the_wal_space_has_an_end() {
        let seg = 16 << 20;
        let last = SegmentName::parse("00000001FFFFFFFF000000FF", seg).unwrap();
        assert_eq!(last.end_lsn(seg), Lsn(u64::MAX));
        assert!(last.start_lsn(seg) < last.end_lsn(seg));
    }

    use super::*;

    const MB16: u64 = 16 * 1024 * 1024;

    #[test]
    fn names_match_postgresql() {
        let s = SegmentName {
            timeline: TimelineId(1),
            segno: 0x0A * 256 + 0xFE,
        };
        assert_eq!(s.file_name(MB16), "000000010000000A000000FE");
        assert_eq!(
            SegmentName::parse("000000010000000A000000FE", MB16),
            Some(s)
        );
        // 1 GiB segments: four per xlogid.
        let g = SegmentName {
            timeline: TimelineId(3),
            segno: 9,
        };
        assert_eq!(g.file_name(1 << 30), "000000030000000200000001");
        assert_eq!(
            SegmentName::parse("000000030000000200000001", 1 << 30),
            Some(g)
        );
        // SEG beyond segments per xlogid is not a real name.
        assert_eq!(SegmentName::parse("000000010000000000000100", MB16), None);
        assert_eq!(SegmentName::parse("000000000000000000000001", MB16), None);
    }

    #[test]
    fn classify_names() {
        assert_eq!(
            WalFileName::parse("00000002.history", MB16),
            Some(WalFileName::History(TimelineId(2)))
        );
        assert!(matches!(
            WalFileName::parse("000000010000000000000003.partial", MB16),
            Some(WalFileName::Partial(_))
        ));
        assert_eq!(WalFileName::parse("00000002.history.tmp", MB16), None);
        assert_eq!(WalFileName::parse("../etc/passwd", MB16), None);
        assert_eq!(classify("0000000100000000000000ZZ"), None);
    }

    #[test]
    fn segment_bounds() {
        let s = SegmentName::containing(TimelineId(1), Lsn(5 * MB16 + 7), MB16);
        assert_eq!(s.segno, 5);
        assert_eq!(s.start_lsn(MB16), Lsn(5 * MB16));
        assert_eq!(s.end_lsn(MB16), Lsn(6 * MB16));
        assert_eq!(s.next().segno, 6);
    }
}
