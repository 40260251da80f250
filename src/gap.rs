//! gap: WAL known to be lost, recorded when the loss happened, never
//! skipped quietly (rule 2 in README's Guarantees).
//!
//! A gap arises when the server no longer has WAL walsafe still needs: the
//! slot was invalidated (`max_slot_wal_keep_size`), dropped, or streaming
//! ran without one. The agent then records the lost range, logs it as an
//! error, exports it (`walsafe_archive_gaps`) and resumes from the oldest
//! WAL the server still has. A restore across a gap stops at it; a new base
//! backup is needed to restore past it.
//!
//! A [`Gap`] is written twice: in the spool (`walsafe.gaps`, see
//! `spool::gaps`), which the agent's metric counts and the operator
//! acknowledges, and in the repository (`gaps/…`, see
//! `repository::object`), authenticated like every other object, which
//! `wal-fetch` and `wal-verify` read. Its JSON:
//!
//! ```text
//! {"timeline":1,"from":"0/3000000","to":"0/9000000",
//!  "detected_at":"2026-11-21T10:00:00Z","reason":"..."}
//! ```
//!
//! Not to be confused with a *hole* (`repository::inventory::Hole`): a
//! range `wal-verify` finds missing from what is stored, recorded or not.

use serde::{Deserialize, Serialize};

use crate::pg::{Lsn, SegmentName, TimelineId};

/// One lost range of WAL: `[from, to)` on `timeline`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gap {
    #[serde(with = "timeline_number")]
    pub timeline: TimelineId,
    #[serde(with = "lsn_text")]
    pub from: Lsn,
    #[serde(with = "lsn_text")]
    pub to: Lsn,
    /// RFC 3339, UTC.
    pub detected_at: String,
    pub reason: String,
}

impl Gap {
    /// A gap detected now.
    pub fn new(timeline: TimelineId, from: Lsn, to: Lsn, reason: &str) -> Gap {
        Gap {
            timeline,
            from,
            to,
            detected_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            reason: reason.to_string(),
        }
    }

    /// Bytes of WAL lost.
    pub fn len(&self) -> u64 {
        self.to.bytes_after(self.from)
    }

    /// True for an empty range (never recorded).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether any byte of `seg` lies in the gap.
    pub fn touches(&self, seg: SegmentName, segment_size: u64) -> bool {
        self.timeline == seg.timeline
            && self.from < seg.end_lsn(segment_size)
            && self.to > seg.start_lsn(segment_size)
    }
}

/// An LSN as PostgreSQL writes it (`0/2000028`), for serde.
pub(crate) mod lsn_text {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::pg::Lsn;

    pub fn serialize<S: Serializer>(l: &Lsn, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(l)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Lsn, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A timeline as its number, for serde.
pub(crate) mod timeline_number {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::pg::TimelineId;

    pub fn serialize<S: Serializer>(t: &TimelineId, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(t.0)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<TimelineId, D::Error> {
        u32::deserialize(d).map(TimelineId)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_keeps_its_shape() {
        let g = Gap::new(
            TimelineId(1),
            Lsn(0x3000000),
            Lsn(0x9000000),
            "slot invalidated",
        );
        let text = serde_json::to_string(&g).unwrap();
        assert!(
            text.starts_with(r#"{"timeline":1,"from":"0/3000000","to":"0/9000000","#),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<Gap>(&text).unwrap(), g);
        assert_eq!(g.len(), 0x6000000);
        let seg = |segno| SegmentName {
            timeline: TimelineId(1),
            segno,
        };
        let size = 16 << 20;
        assert!(!g.touches(seg(2), size));
        assert!(g.touches(seg(3), size));
        assert!(g.touches(seg(8), size));
        assert!(!g.touches(seg(9), size));
    }
}
