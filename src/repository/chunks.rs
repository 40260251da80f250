//! Chunk coverage, computed in one place: which stored chunks of a segment
//! rebuild it from offset 0, and where they leave a hole.
//!
//! A segment still filling is stored as chunks `[start, end)`; after a
//! restart the first chunk starts again at 0, so chunks may overlap (their
//! common bytes must be identical; `wal-fetch` checks that while
//! assembling). A usable chunk set covers `[0, end)` without a hole: its
//! WAL is the first `end` bytes of the segment, and the rest is the end of
//! WAL as far as the repository knows. A set that does not start at 0, or
//! has a hole, means WAL is missing from the repository: `wal-fetch`
//! refuses it and `wal-verify` reports it.

/// Where a chunk set stops covering its segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Uncovered {
    /// No chunk starts at offset 0; the first starts at `first`.
    MissingStart { first: u64 },
    /// Nothing covers `[from, to)`, and a chunk starts at `to`.
    Hole { from: u64, to: u64 },
}

impl Uncovered {
    /// The missing range `[from, to)`.
    pub fn range(self) -> (u64, u64) {
        match self {
            Uncovered::MissingStart { first } => (0, first),
            Uncovered::Hole { from, to } => (from, to),
        }
    }
}

/// The chunks to read to rebuild the segment from offset 0, in order:
/// greedily, the chunk reaching furthest from the current position. Each
/// chunk of the plan starts at or before the end of the one before it.
/// `chunks` need not be sorted; an empty set has an empty plan.
pub fn plan(chunks: &[(u64, u64)]) -> Result<Vec<(u64, u64)>, Uncovered> {
    let mut sorted = chunks.to_vec();
    sorted.sort_unstable();
    let mut plan = Vec::new();
    let mut pos = 0u64;
    while let Some(best) = sorted
        .iter()
        .filter(|(s, e)| *s <= pos && *e > pos)
        .max_by_key(|(_, e)| *e)
        .copied()
    {
        plan.push(best);
        pos = best.1;
    }
    match sorted.first() {
        None => return Ok(plan),
        Some(&(first, _)) if plan.is_empty() => return Err(Uncovered::MissingStart { first }),
        _ => {}
    }
    if let Some(&(s, _)) = sorted.iter().find(|(s, _)| *s > pos) {
        return Err(Uncovered::Hole { from: pos, to: s });
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_picks_longest_contiguous_cover() {
        let c = [(0, 10), (10, 20), (0, 15), (20, 30)];
        assert_eq!(plan(&c).unwrap(), vec![(0, 15), (10, 20), (20, 30)]);
        assert_eq!(plan(&[]).unwrap(), vec![]);
    }

    #[test]
    fn plan_refuses_missing_start_and_holes() {
        assert_eq!(plan(&[(8, 10)]), Err(Uncovered::MissingStart { first: 8 }));
        assert_eq!(
            plan(&[(0, 10), (12, 20)]),
            Err(Uncovered::Hole { from: 10, to: 12 })
        );
        assert_eq!(Uncovered::Hole { from: 10, to: 12 }.range(), (10, 12));
    }
}
