//! Log sequence numbers and timeline identifiers.
//!
//! An [`Lsn`] is a byte position in PostgreSQL's write-ahead log, printed the
//! way PostgreSQL prints it (`16/B374D848`: high and low 32 bits in hex).
//! A [`TimelineId`] names one history of the cluster; promotion of a standby
//! starts a new, higher one. A timeline's history file lists its
//! ancestors, one line each, `parentTLI<TAB>switchLSN<TAB>reason`: the
//! parent's WAL ends (exclusive) where the next timeline's begins.

use std::fmt;
use std::str::FromStr;

/// A position in the write-ahead log, in bytes from its very beginning.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    /// `0/0`, which PostgreSQL uses for "no position".
    pub const INVALID: Lsn = Lsn(0);

    /// Offset of this position inside its segment.
    pub fn segment_offset(self, segment_size: u64) -> u64 {
        self.0 % segment_size
    }

    /// The position rounded down to the start of its segment.
    pub fn segment_start(self, segment_size: u64) -> Lsn {
        Lsn(self.0 - self.0 % segment_size)
    }

    /// Number of the segment holding this position.
    pub fn segment_no(self, segment_size: u64) -> u64 {
        self.0 / segment_size
    }

    /// Byte distance from `earlier` to `self`, zero when `earlier` is ahead.
    pub fn bytes_after(self, earlier: Lsn) -> u64 {
        self.0.saturating_sub(earlier.0)
    }

    /// `self + n` bytes.
    pub fn plus(self, n: u64) -> Lsn {
        Lsn(self.0 + n)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// Error for text that is not an LSN.
#[derive(Debug, thiserror::Error)]
#[error("\"{0}\" is not a WAL position; expected the form 16/B374D848")]
pub struct ParseLsnError(String);

impl FromStr for Lsn {
    type Err = ParseLsnError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseLsnError(s.to_string());
        let (hi, lo) = s.trim().split_once('/').ok_or_else(err)?;
        let hi = u32::from_str_radix(hi, 16).map_err(|_| err())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| err())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

/// A timeline: one line of the cluster's history. Starts at 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct TimelineId(pub u32);

impl fmt::Display for TimelineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The entries of a timeline history file: each ancestor timeline and
/// the point where it ended (its child's first byte), oldest first. Lines
/// that do not parse (comments, blank) are skipped.
pub fn history_entries(history: &str) -> impl Iterator<Item = (TimelineId, Lsn)> + '_ {
    history.lines().filter_map(|l| {
        let mut f = l.split_whitespace();
        let tli = f.next()?.parse().ok()?;
        let switch: Lsn = f.next()?.parse().ok()?;
        Some((TimelineId(tli), switch))
    })
}

/// The timeline that holds `point`, per the history file of `current`
/// (what PostgreSQL's `tliOfPointInHistory` computes): the first ancestor
/// whose switch point lies beyond `point`, else `current`.
pub fn timeline_of_point(history: &str, point: Lsn, current: TimelineId) -> TimelineId {
    history_entries(history)
        .find(|&(_, switch)| point < switch)
        .map_or(current, |(tli, _)| tli)
}

/// Where `timeline` stands in the history of `current`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Branch {
    /// `timeline` is `current`.
    Current,
    /// `timeline` is an ancestor of `current`: it ended at `at`, where
    /// `next` began.
    Ended { at: Lsn, next: TimelineId },
    /// `timeline` is not in `current`'s history (another branch).
    Foreign,
}

/// Where `timeline` stands in `history`, the history file of `current`.
pub fn branch_of(history: &str, timeline: TimelineId, current: TimelineId) -> Branch {
    if timeline == current {
        return Branch::Current;
    }
    let entries: Vec<_> = history_entries(history).collect();
    match entries.iter().position(|&(t, _)| t == timeline) {
        Some(i) => Branch::Ended {
            at: entries[i].1,
            next: entries.get(i + 1).map_or(current, |&(t, _)| t),
        },
        None => Branch::Foreign,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_point_belongs_to_the_timeline_whose_range_holds_it() {
        let history = "1\t0/5000028\tno recovery target specified\n\n\
                       2\t0/9000000\tno recovery target specified\n";
        let of = |l: u64| timeline_of_point(history, Lsn(l), TimelineId(3));
        assert_eq!(of(0x1000000), TimelineId(1));
        assert_eq!(of(0x5000027), TimelineId(1));
        // The switch point itself is the child's first byte.
        assert_eq!(of(0x5000028), TimelineId(2));
        assert_eq!(of(0x8FFFFFF), TimelineId(2));
        assert_eq!(of(0x9000000), TimelineId(3));
        assert_eq!(
            timeline_of_point("# none\n", Lsn(1), TimelineId(1)),
            TimelineId(1)
        );
    }

    #[test]
    fn a_timeline_ends_where_its_child_begins() {
        let history = "1\t0/5000028\tno recovery target specified\n\n\
                       2\t0/9000000\tno recovery target specified\n";
        let b = |t: u32| branch_of(history, TimelineId(t), TimelineId(3));
        assert_eq!(b(3), Branch::Current);
        assert_eq!(
            b(1),
            Branch::Ended {
                at: Lsn(0x5000028),
                next: TimelineId(2)
            }
        );
        assert_eq!(
            b(2),
            Branch::Ended {
                at: Lsn(0x9000000),
                next: TimelineId(3)
            }
        );
        assert_eq!(b(4), Branch::Foreign);
        // Timeline 3 was created from 1, skipping 2 (2 forked elsewhere).
        let skipped = "1\t0/5000028\tno recovery target specified\n";
        assert_eq!(
            branch_of(skipped, TimelineId(1), TimelineId(3)),
            Branch::Ended {
                at: Lsn(0x5000028),
                next: TimelineId(3)
            }
        );
        assert_eq!(
            branch_of(skipped, TimelineId(2), TimelineId(3)),
            Branch::Foreign
        );
    }

    #[test]
    fn lsn_round_trips_through_text() {
        for v in [0u64, 1, 0x16_B374_D848, u64::MAX] {
            let l = Lsn(v);
            assert_eq!(l.to_string().parse::<Lsn>().unwrap(), l);
        }
        assert_eq!(Lsn(0x16_B374_D848).to_string(), "16/B374D848");
        assert!("16B374D848".parse::<Lsn>().is_err());
        assert!("x/1".parse::<Lsn>().is_err());
    }

    #[test]
    fn segment_arithmetic() {
        let seg = 16 * 1024 * 1024;
        let l = Lsn(3 * seg + 100);
        assert_eq!(l.segment_no(seg), 3);
        assert_eq!(l.segment_offset(seg), 100);
        assert_eq!(l.segment_start(seg), Lsn(3 * seg));
    }
}
