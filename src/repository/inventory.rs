//! inventory: what the repository holds, per timeline, and every hole in
//! it (for `wal-verify`, `status`, and later backups and retention).
//!
//! For each timeline, the segments stored (`wal/<name>`, `wal/<name>.partial`
//! or chunks) must form one contiguous run from the first to the last. A
//! missing segment inside the run is a hole; so is a chunked segment whose
//! chunks do not start at offset 0 or have a hole, a chunked (still
//! filling) segment that is not the last of its timeline, and a `.partial`
//! that is not the last of its timeline (WAL after its end was lost).
//!
//! Timelines are followed through their history files: a timeline after
//! the first needs its `<TLI>.history`, and its parent must be archived up
//! to the segment holding the switch point, or recovery cannot cross from
//! one to the other. Gaps the agent recorded (`gaps/…`, WAL the server
//! removed before it was streamed, see [`crate::gap`]) are listed as holes
//! with their reason.
//!
//! A [`Hole`] is *computed* from what is stored; a [`crate::gap::Gap`] is a
//! loss the agent *recorded* when it happened. Every recorded gap shows up
//! as a hole, but not every hole was recorded (a deleted object, a broken
//! upload): that difference is what `wal-verify` exists to find.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::anyhow;
use serde::Serialize;

use crate::pg::{SegmentName, TimelineId};
use crate::repository::{chunks, ObjectName, Repository};

/// What is stored for one timeline.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct TimelineReport {
    pub timeline: u32,
    pub first: String,
    pub last: String,
    pub segments: usize,
    pub history: bool,
    pub gaps: Vec<Hole>,
}

/// A range of WAL missing from the repository, as computed from what is stored.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Hole {
    pub from: String,
    pub to: String,
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repository::{ClusterIdentity, Repository, Store};

    const SEG: u64 = 16 << 20;

    /// A file:// repository holding the given WAL objects (content is not
    /// looked at by verify, only names and history files).
    async fn repo_with(names: &[(&str, &[u8])]) -> (tempfile::TempDir, Repository) {
        let d = tempfile::tempdir().unwrap();
        let url = format!("file://{}", d.path().display());
        let store = Store::open(&url, &Default::default(), 1).unwrap();
        let repo = Repository::from_parts(store, None, crate::repository::Compression::Zstd, 1);
        repo.pin(&ClusterIdentity::new(42, 150000, SEG))
            .await
            .unwrap();
        for (n, body) in names {
            repo.put_wal(n, bytes::Bytes::copy_from_slice(body))
                .await
                .unwrap();
        }
        (d, repo)
    }

    #[tokio::test]
    async fn switch_on_a_segment_boundary_needs_the_parent_up_to_the_segment_before() {
        let (_d, repo) = repo_with(&[
            ("000000010000000000000001", b"x"),
            ("000000010000000000000002", b"x"),
            (
                "00000002.history",
                b"1\t0/3000000\tno recovery target specified\n",
            ),
            ("000000020000000000000003", b"x"),
        ])
        .await;
        let r = inventory(&repo).await.unwrap();
        assert!(r.iter().all(|t| t.gaps.is_empty()), "{r:?}");
    }

    #[tokio::test]
    async fn a_parent_short_of_the_switch_point_or_a_missing_history_is_a_gap() {
        let (_d, repo) = repo_with(&[
            ("000000010000000000000001", b"x"),
            (
                "00000002.history",
                b"1\t0/3800000\tno recovery target specified\n",
            ),
            ("000000020000000000000003", b"x"),
            ("000000030000000000000004", b"x"),
        ])
        .await;
        let r = inventory(&repo).await.unwrap();
        let tl2 = r.iter().find(|t| t.timeline == 2).unwrap();
        assert_eq!(tl2.gaps.len(), 1, "{tl2:?}");
        assert_eq!(tl2.gaps[0].from, "000000010000000000000002");
        assert_eq!(tl2.gaps[0].to, "000000010000000000000003");
        let tl3 = r.iter().find(|t| t.timeline == 3).unwrap();
        assert!(
            !tl3.history
                && tl3
                    .gaps
                    .iter()
                    .any(|g| g.reason.contains("history file missing")),
            "{tl3:?}"
        );
    }

    #[test]
    fn history_lines_give_the_last_switch() {
        let h = "1\t0/3000000\tno recovery target specified\n\n2\t0/5A00028\tafter promotion\n";
        assert_eq!(super::last_switch(h), Some((2, 0x5A00028)));
        assert_eq!(super::last_switch("# nothing\n"), None);
    }
}

#[derive(Debug, Default)]
struct Stored {
    full: BTreeSet<u64>,
    partial: BTreeSet<u64>,
    chunked: BTreeSet<u64>,
}

/// Builds the per-timeline report.
pub async fn inventory(repo: &Repository) -> anyhow::Result<Vec<TimelineReport>> {
    let d = repo
        .descriptor()
        .await?
        .ok_or_else(|| anyhow!("there is no walsafe repository here (no descriptor)"))?;
    let seg = d.segment_size;
    let mut tls: BTreeMap<TimelineId, Stored> = BTreeMap::new();
    let mut histories = BTreeSet::new();
    for name in repo.list_wal().await? {
        let (file, partial) = match name {
            ObjectName::History(t) => {
                histories.insert(t.0);
                continue;
            }
            ObjectName::Segment(f) => (f, false),
            ObjectName::ClosedPartial(f) => (f, true),
            _ => continue,
        };
        if let Some(s) = file.segment(seg) {
            let e = tls.entry(s.timeline).or_default();
            if partial {
                e.partial.insert(s.segno);
            } else {
                e.full.insert(s.segno);
            }
        }
    }
    let mut chunk_gaps: BTreeMap<SegmentName, String> = BTreeMap::new();
    for file in repo.list_chunked_segments().await? {
        let Some(s) = file.segment(seg) else {
            continue;
        };
        let e = tls.entry(s.timeline).or_default();
        if e.full.contains(&s.segno) || e.partial.contains(&s.segno) {
            continue; // superseded chunks, not yet deleted
        }
        e.chunked.insert(s.segno);
        if let Err(u) = chunks::plan(&repo.list_chunks(&file).await?) {
            let (from, to) = u.range();
            chunk_gaps.insert(
                s,
                format!("chunks missing from offset {from:08X} to {to:08X}"),
            );
        }
    }
    // Switch points from the history files: child timeline -> (parent, switch LSN).
    let mut switches: BTreeMap<u32, (u32, u64)> = BTreeMap::new();
    for &t in &histories {
        if let Some(content) = repo
            .get_wal(&crate::pg::walfile::history_file_name(TimelineId(t)))
            .await?
        {
            if let Some((parent, at)) = last_switch(&String::from_utf8_lossy(&content)) {
                switches.insert(t, (parent, at));
            }
        }
    }
    let recorded = repo.gaps().await?;
    let mut out = Vec::new();
    let ranges: BTreeMap<u32, (u64, u64)> = tls
        .iter()
        .filter_map(|(t, st)| {
            let all = st.full.iter().chain(&st.partial).chain(&st.chunked);
            Some((t.0, (*all.clone().min()?, *all.max()?)))
        })
        .collect();
    for (tli, st) in tls {
        let all: BTreeSet<u64> = st
            .full
            .iter()
            .chain(&st.partial)
            .chain(&st.chunked)
            .copied()
            .collect();
        let (Some(&first), Some(&last)) = (all.first(), all.last()) else {
            continue;
        };
        let name = |segno| {
            SegmentName {
                timeline: tli,
                segno,
            }
            .file_name(seg)
        };
        let mut gaps = Vec::new();
        let mut expect = first;
        for &n in &all {
            if n > expect {
                gaps.push(Hole {
                    from: name(expect),
                    to: name(n - 1),
                    reason: "segments missing".into(),
                });
            }
            expect = n + 1;
        }
        for &n in &st.chunked {
            let s = SegmentName {
                timeline: tli,
                segno: n,
            };
            if let Some(r) = chunk_gaps.get(&s) {
                gaps.push(Hole {
                    from: name(n),
                    to: name(n),
                    reason: r.clone(),
                });
            } else if n != last {
                gaps.push(Hole {
                    from: name(n),
                    to: name(n),
                    reason: "only chunks stored, but later segments exist: the complete segment is missing".into(),
                });
            }
        }
        for &n in &st.partial {
            if n != last && !st.full.contains(&n) {
                gaps.push(Hole {
                    from: name(n),
                    to: name(n),
                    reason: "segment stored only as .partial, but later segments exist: WAL after its end was lost".into(),
                });
            }
        }
        for g in recorded.iter().filter(|g| g.timeline == tli) {
            gaps.push(Hole {
                from: g.from.to_string(),
                to: g.to.to_string(),
                reason: format!("recorded by the agent at {}: {}", g.detected_at, g.reason),
            });
        }
        if let Some(&(parent, at)) = switches.get(&tli.0) {
            // The child's first segment holds the switch point; the parent's
            // last needed byte is the one just before it.
            let switch_seg = at / seg;
            let parent_needed = at.saturating_sub(1) / seg;
            if let Some(&(_, parent_last)) = ranges.get(&parent) {
                if parent_last < parent_needed {
                    gaps.push(Hole {
                        from: SegmentName { timeline: TimelineId(parent), segno: parent_last + 1 }.file_name(seg),
                        to: SegmentName { timeline: TimelineId(parent), segno: parent_needed }.file_name(seg),
                        reason: format!("timeline {parent} is not archived up to the switch to timeline {} at {}", tli.0, crate::pg::Lsn(at)),
                    });
                }
            }
            if first > switch_seg {
                gaps.push(Hole {
                    from: name(switch_seg),
                    to: name(first - 1),
                    reason: format!(
                        "timeline {} starts at {} but its first archived segment is later",
                        tli.0,
                        crate::pg::Lsn(at)
                    ),
                });
            }
        }
        gaps.sort_by(|a, b| a.from.cmp(&b.from));
        let history = tli.0 == 1 || histories.contains(&tli.0);
        if !history {
            let h = crate::pg::walfile::history_file_name(tli);
            gaps.push(Hole {
                from: h.clone(),
                to: h,
                reason: "timeline history file missing: recovery cannot follow this timeline"
                    .into(),
            });
        }
        out.push(TimelineReport {
            timeline: tli.0,
            first: name(first),
            last: name(last),
            segments: all.len(),
            history,
            gaps,
        });
    }
    Ok(out)
}

/// The last line of a history file: `parentTLI<TAB>switchLSN<TAB>reason`.
fn last_switch(content: &str) -> Option<(u32, u64)> {
    content
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .rev()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let parent = f.next()?.parse().ok()?;
            let at: crate::pg::Lsn = f.next()?.parse().ok()?;
            Some((parent, at.0))
        })
}
