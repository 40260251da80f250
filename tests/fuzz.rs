//! Hostile input: property-based fuzzing (proptest, stable Rust) of every
//! parser that reads bytes or text walsafe did not write itself.
//!
//! Each property states what must hold for *any* input of its kind, not
//! just "no panic":
//!
//! - **WAL pages** ([`walsafe::pg::page`]): arbitrary bytes and mutations of
//!   a valid synthetic segment never panic; valid WAL is accepted; a change
//!   to any byte a check covers is refused with a [`PageError`] that names
//!   the damaged page (or an earlier one) and its segment file; a change to
//!   bytes no check covers is accepted.
//! - **Envelopes** ([`walsafe::repository::envelope`]): every payload
//!   round-trips, with and without key and compression; arbitrary bytes,
//!   any mutation of a valid object, a wrong key or name are an
//!   [`EnvelopeError`], never a panic and never other plaintext.
//! - **Chunk planning** ([`walsafe::repository::chunks::plan`]): checked
//!   against a byte-map model of coverage (see `chunk_model`).
//! - **Conninfo** ([`ConnParams::parse_with_env`]): arbitrary text never
//!   panics and errors are explained; generated conninfos in key=value and
//!   URL form parse to exactly the values generated.
//! - **WAL file names** ([`walsafe::pg::walfile`]): classify/parse agree,
//!   and formatting round-trips.
//!
//! The replication message decoder is private to `pg::replication`; its
//! properties are in-module (`src/pg/replication/wire.rs`, tests named
//! `fuzz_*`).
//!
//! Case counts: each property has a default sized so that this file runs
//! in a few seconds in a debug build; `PROPTEST_CASES` overrides all of
//! them (see `scripts/fuzz.sh` for long runs).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::Config;

use walsafe::pg::cluster::ClusterIdentity;
use walsafe::pg::conninfo::{ConnParams, ConninfoError, Host, SslMode};
use walsafe::pg::page::{
    read_long_header, synthetic_wal, validate_segment, PageError, PageValidator, LONG_HEADER_LEN,
};
use walsafe::pg::walfile::{classify, NameKind, SegmentName, WalFileName};
use walsafe::pg::{Lsn, TimelineId};
use walsafe::repository::chunks::{plan, Uncovered};
use walsafe::repository::envelope::{self, EnvelopeError};
use walsafe::repository::{Compression, Key};

/// A config with `cases` cases unless `PROPTEST_CASES` is set.
fn cases(cases: u32) -> Config {
    let mut c = Config::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = cases;
    }
    // Failures become explicit #[test]s, not persisted seed files.
    c.failure_persistence = None;
    c
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..=max)
}

// ---------------------------------------------------------------------------
// WAL pages
// ---------------------------------------------------------------------------

const SEG: u64 = 1 << 20;
const BS: u64 = 8192;
const PAGES: u64 = SEG / BS;

fn identity(sysid: u64) -> ClusterIdentity {
    ClusterIdentity::new(sysid, 150000, SEG)
}

/// Segment numbers, the last one possible included.
fn segno() -> impl Strategy<Value = u64> {
    let last = u64::MAX / SEG;
    prop_oneof![
        0..1000u64,
        Just(last),
        (last - 1000)..=last,
        any::<u64>().prop_map(move |n| n % (last + 1)),
    ]
}

fn timeline() -> impl Strategy<Value = u32> {
    prop_oneof![1..5u32, 1..=u32::MAX]
}

/// A valid segment: `wal_pages` pages of synthetic WAL then zeros.
fn valid_segment(sysid: u64, tli: u32, segno: u64, wal_pages: u64) -> Vec<u8> {
    let start = Lsn(segno * SEG);
    let mut d = synthetic_wal(&identity(sysid), TimelineId(tli), start, wal_pages * BS);
    d.resize(SEG as usize, 0);
    d
}

/// The page a `PageError` names, as an offset in its segment, and its
/// segment file name.
fn error_page(e: &PageError) -> Option<(u64, &str)> {
    let at = match e {
        PageError::UnknownMagic { at, .. }
        | PageError::WrongVersion { at, .. }
        | PageError::MagicChanged { at, .. }
        | PageError::InvalidInfoBits { at, .. }
        | PageError::MissingLongHeader { at, .. }
        | PageError::UnexpectedLongHeader { at, .. }
        | PageError::WrongSystem { at, .. }
        | PageError::WrongSegmentSize { at, .. }
        | PageError::WrongBlockSize { at, .. }
        | PageError::WrongPageAddress { at, .. }
        | PageError::TimelineOutOfRange { at, .. }
        | PageError::TimelineDecreased { at, .. }
        | PageError::ZeroPage { at }
        | PageError::DataAfterEnd { at, .. } => at,
        _ => return None,
    };
    Some((at.offset, &at.segment))
}

/// What a one-byte change at `off` of a [`valid_segment`] with `wal_pages`
/// pages of WAL means to the validator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Covered {
    /// No check reads the byte (record data, `xlp_rem_len`, padding, the
    /// info bits PostgreSQL may set freely): the segment stays valid.
    No,
    /// A check reads it but a change may be legitimate (a lower timeline,
    /// as pages before a switch point carry).
    Maybe,
    /// Any change is refused.
    Yes,
}

fn covered(off: usize, xor: u8, wal_pages: u64) -> Covered {
    let page = off as u64 / BS;
    let in_page = off % BS as usize;
    if page >= wal_pages {
        return Covered::Yes; // inside the zero tail
    }
    let long = page == 0;
    match in_page {
        0 | 1 => Covered::Yes,                // xlp_magic
        2 if xor & 0xF2 != 0 => Covered::Yes, // XLP_LONG_HEADER, undefined bits
        2 => Covered::No,                     // CONTRECORD, BKP_REMOVABLE, OVERWRITE
        3 => Covered::Yes,                    // undefined info bits
        4..=7 => Covered::Maybe,              // xlp_tli
        8..=15 => Covered::Yes,               // xlp_pageaddr
        16..=23 => Covered::No,               // xlp_rem_len, padding
        24..=39 if long => Covered::Yes,      // sysid, seg_size, blcksz
        _ => Covered::No,                     // record bytes
    }
}

/// Offsets to damage in the first `pages` pages: anywhere, and more often
/// in the headers (long header, info bits, timeline, page address).
fn flip_offset(pages: u64) -> impl Strategy<Value = usize> {
    let page = move || (0..pages as usize).prop_map(|p| p * BS as usize);
    prop_oneof![
        0..LONG_HEADER_LEN,
        0..(pages * BS) as usize,
        (page(), 0..24usize).prop_map(|(p, o)| p + o),
        page().prop_map(|p| p + 2),
        page().prop_map(|p| p + 4),
    ]
}

fn valid_cached() -> &'static Vec<u8> {
    static V: OnceLock<Vec<u8>> = OnceLock::new();
    V.get_or_init(|| valid_segment(SYSID, 3, 77, 40))
}
const SYSID: u64 = 7_312_345_678_901_234_567;
const SEG_77: SegmentName = SegmentName {
    timeline: TimelineId(3),
    segno: 77,
};

proptest! {
    #![proptest_config(cases(256))]

    /// Valid WAL of any cluster, timeline, segment and length is accepted,
    /// and its long header reads back as written.
    #[test]
    fn page_valid_segments_are_accepted(sysid in any::<u64>(), tli in timeline(), segno in segno(), wal_pages in 1..=PAGES) {
        let d = valid_segment(sysid, tli, segno, wal_pages);
        let seg = SegmentName { timeline: TimelineId(tli), segno };
        prop_assert_eq!(validate_segment(&identity(sysid), seg, &d), Ok(()));
        let h = read_long_header(&d).unwrap();
        prop_assert_eq!(h.system_identifier, sysid);
        prop_assert_eq!(h.timeline, TimelineId(tli));
        prop_assert_eq!(h.pageaddr, Lsn(segno * SEG));
        prop_assert_eq!(u64::from(h.segment_size), SEG);
        prop_assert_eq!(h.pg_major(), Some(15));
        // Read as part of a later timeline, it is still fine.
        if tli < u32::MAX {
            let later = SegmentName { timeline: TimelineId(tli + 1), segno };
            prop_assert_eq!(validate_segment(&identity(sysid), later, &d), Ok(()));
        }
    }

    /// Byte flips: a flip of a covered byte is refused, naming the damaged
    /// page (or an earlier one) and the segment; flips of bytes no check
    /// reads are accepted.
    #[test]
    fn page_flipped_bytes(flips in proptest::collection::btree_map(flip_offset(PAGES), 1..=255u8, 1..6)) {
        let mut d = valid_cached().clone();
        for (&off, &x) in &flips {
            d[off] ^= x;
        }
        let class: Vec<(Covered, u64)> = flips.iter().map(|(&o, &x)| (covered(o, x, 40), o as u64 / BS * BS)).collect();
        let r = validate_segment(&identity(SYSID), SEG_77, &d);
        let first_checked = class.iter().filter(|c| c.0 == Covered::Yes).map(|c| c.1).min();
        let first_touched = class.iter().filter(|c| c.0 != Covered::No).map(|c| c.1).min();
        match (&r, first_checked, first_touched) {
            (Ok(()), None, _) => {}
            (Ok(()), Some(p), _) => prop_assert!(false, "damage at page offset {p} accepted: {flips:?}"),
            (Err(e), _, None) => prop_assert!(false, "harmless change refused: {e} ({flips:?})"),
            (Err(e), checked, Some(touched)) => {
                let (at, segment) = error_page(e).unwrap_or_else(|| panic!("no page in {e:?}"));
                prop_assert_eq!(segment, "00000003000000000000004D");
                prop_assert!(at >= touched, "{e} is before every change ({flips:?})");
                if let Some(c) = checked {
                    prop_assert!(at <= c, "{e} is after the damage at {c} ({flips:?})");
                }
                prop_assert!(e.to_string().contains("00000003000000000000004D"), "{e}");
            }
        }
    }

    /// A field overwritten with any other value: magic, pageaddr, sysid,
    /// segment size and block size always refused; timeline refused unless
    /// it is a lower one on a page where that is allowed.
    #[test]
    fn page_wrong_header_fields(page in 0..40u64, field in 0..5usize, value in any::<u64>()) {
        let mut d = valid_cached().clone();
        let p = (page * BS) as usize;
        let (range, orig) = match field {
            0 => (p..p + 2, 0xD110u64),
            1 => (p + 8..p + 16, 77 * SEG + page * BS),
            2 => (24..32, SYSID),
            3 => (32..36, SEG),
            _ => (p + 4..p + 8, 3),
        };
        let len = range.len();
        let value = if len == 8 { value } else { value & ((1u64 << (8 * len)) - 1) };
        prop_assume!(value != orig);
        d[range].copy_from_slice(&value.to_le_bytes()[..len]);
        let r = validate_segment(&identity(SYSID), SEG_77, &d);
        match field {
            4 if (1..3).contains(&value) && page == 0 => prop_assert_eq!(r, Ok(())),
            4 if (1..3).contains(&value) => {
                prop_assert!(matches!(r, Err(PageError::TimelineDecreased { .. })), "{r:?}")
            }
            4 => prop_assert!(matches!(r, Err(PageError::TimelineOutOfRange { .. })), "{r:?}"),
            0 => prop_assert!(matches!(r, Err(PageError::UnknownMagic { .. } | PageError::WrongVersion { .. } | PageError::MagicChanged { .. } | PageError::ZeroPage { .. })), "{r:?}"),
            1 => prop_assert!(matches!(r, Err(PageError::WrongPageAddress { .. })), "{r:?}"),
            2 => {
                prop_assert!(matches!(r, Err(PageError::WrongSystem { .. })), "{r:?}");
                prop_assert!(r.unwrap_err().is_stranger());
            }
            _ => prop_assert!(matches!(r, Err(PageError::WrongSegmentSize { .. })), "{r:?}"),
        }
    }

    /// The wrong cluster, version or segment name, and any other length.
    #[test]
    fn page_wrong_identity_name_or_length(other in any::<u64>(), segno in segno(), tli in 1..3u32, len in 0..2 * SEG as usize) {
        let d = valid_cached();
        prop_assume!(other != SYSID);
        let e = validate_segment(&identity(other), SEG_77, d).unwrap_err();
        prop_assert!(matches!(e, PageError::WrongSystem { .. }) && e.is_stranger(), "{e}");
        let v16 = ClusterIdentity::new(SYSID, 160000, SEG);
        prop_assert!(matches!(validate_segment(&v16, SEG_77, d), Err(PageError::WrongVersion { expected: 16, .. })), "unexpected result");
        if segno != 77 {
            let name = SegmentName { timeline: TimelineId(3), segno };
            prop_assert!(matches!(validate_segment(&identity(SYSID), name, d), Err(PageError::WrongPageAddress { .. })), "unexpected result");
        }
        let name = SegmentName { timeline: TimelineId(tli), segno: 77 };
        prop_assert!(matches!(validate_segment(&identity(SYSID), name, d), Err(PageError::TimelineOutOfRange { found: 3, .. })), "unexpected result");
        if len != SEG as usize {
            let mut t = d.clone();
            t.resize(len, 0xA5);
            let e = validate_segment(&identity(SYSID), SEG_77, &t).unwrap_err();
            prop_assert_eq!(e, PageError::WrongFileSize { segment: "00000003000000000000004D".into(), size: len as u64, expected: SEG });
        }
    }

    /// Arbitrary bytes as a segment, and arbitrary first-page headers
    /// followed by zeros: never a panic; acceptance only of a header that
    /// names this cluster and segment.
    #[test]
    fn page_arbitrary_bytes(seed in any::<u64>(), head in bytes(64), zeros in any::<bool>()) {
        let mut d = vec![0u8; SEG as usize];
        if !zeros {
            // splitmix64: cheap enough for a debug build.
            let mut x = seed;
            for w in d.chunks_mut(8) {
                x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = x;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                w.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes());
            }
        }
        d[..head.len()].copy_from_slice(&head);
        match validate_segment(&identity(SYSID), SEG_77, &d) {
            Ok(()) => {
                let h = read_long_header(&d).unwrap();
                prop_assert_eq!(h.system_identifier, SYSID);
                prop_assert_eq!(h.pageaddr, Lsn(77 * SEG));
                prop_assert!((1..=3).contains(&h.timeline.0));
            }
            Err(e) => prop_assert!(e.to_string().contains("00000003000000000000004D"), "{e}"),
        }
    }

    /// read_long_header on any bytes: Truncated exactly below 40 bytes;
    /// when Ok, the fields are the little-endian bytes and the header is one.
    #[test]
    fn page_read_long_header_arbitrary(mut b in bytes(100), magic in prop::sample::select(vec![0xD106u16, 0xD110, 0xD118, 0]), long in any::<bool>()) {
        if b.len() >= 4 && magic != 0 {
            b[0..2].copy_from_slice(&magic.to_le_bytes());
            if long { b[2] |= 2 }
        }
        match read_long_header(&b) {
            Ok(h) => {
                prop_assert!(b.len() >= LONG_HEADER_LEN);
                prop_assert_eq!(h.magic, u16::from_le_bytes([b[0], b[1]]));
                prop_assert!(h.pg_major().is_some());
                prop_assert!(h.info & 2 != 0);
                prop_assert_eq!(h.pageaddr.0, u64::from_le_bytes(b[8..16].try_into().unwrap()));
                prop_assert_eq!(h.system_identifier, u64::from_le_bytes(b[24..32].try_into().unwrap()));
                prop_assert_eq!(h.block_size, u32::from_le_bytes(b[36..40].try_into().unwrap()));
            }
            Err(PageError::Truncated { len }) => prop_assert!(len == b.len() && len < LONG_HEADER_LEN),
            Err(e @ (PageError::ZeroPage { .. } | PageError::UnknownMagic { .. } | PageError::MissingLongHeader { .. })) => {
                prop_assert!(b.len() >= LONG_HEADER_LEN);
                prop_assert!(!e.to_string().is_empty());
            }
            Err(e) => prop_assert!(false, "unexpected {e:?}"),
        }
    }

    /// The streaming validator: valid WAL in random pieces is accepted from
    /// any segment start (the last segment of the LSN space included, but
    /// for its very last byte, whose end is not a position).
    #[test]
    fn page_stream_valid_in_pieces(segno in segno(), tli in timeline(), wal_pages in 1..=PAGES, cuts in proptest::collection::vec(1..20_000usize, 0..40)) {
        let mut d = valid_segment(SYSID, tli, segno, wal_pages);
        if segno == u64::MAX / SEG {
            d.pop();
        }
        let mut v = PageValidator::new(identity(SYSID), TimelineId(tli));
        let start = Lsn(segno * SEG);
        let mut off = 0;
        for c in cuts.iter().chain(std::iter::once(&usize::MAX)) {
            let n = (*c).min(d.len() - off);
            prop_assert_eq!(v.feed(start.plus(off as u64), &d[off..off + n]), Ok(()));
            off += n;
            if off == d.len() { break; }
        }
    }

    /// The streaming validator on damaged WAL: refuses exactly what
    /// validate_segment refuses (flips in covered bytes), and arbitrary
    /// bytes at any position never panic.
    #[test]
    fn page_stream_damaged_and_arbitrary(
        flips in proptest::collection::btree_map(flip_offset(41), 1..=255u8, 1..4),
        start in prop_oneof![Just(0u64), any::<u64>(), (u64::MAX - 100_000)..=u64::MAX],
        junk in bytes(200),
        cut in 1..(41 * BS) as usize,
    ) {
        let mut d = valid_cached()[..(41 * BS) as usize].to_vec();
        for (&off, &x) in &flips {
            d[off] ^= x;
        }
        let checked = flips.iter().any(|(&o, &x)| covered(o, x, 40) == Covered::Yes);
        let harmless = flips.iter().all(|(&o, &x)| covered(o, x, 40) == Covered::No);
        let mut v = PageValidator::new(identity(SYSID), TimelineId(3));
        let base = Lsn(77 * SEG);
        let r = v.feed(base, &d[..cut]).and_then(|()| v.feed(base.plus(cut as u64), &d[cut..]));
        if checked {
            prop_assert!(r.is_err(), "damage accepted: {flips:?}");
        }
        if harmless { prop_assert_eq!(r, Ok(())); }

        let mut v = PageValidator::new(identity(SYSID), TimelineId(3));
        let _ = v.feed(Lsn(start), &junk);
    }
}

/// Found by `page_stream_damaged_and_arbitrary`: WAL fed in the last page
/// of the 64-bit LSN space overflowed the page arithmetic (a panic in a
/// debug build, a wrapped position in release).
#[test]
fn page_stream_in_the_last_page_of_the_lsn_space() {
    let mut v = PageValidator::new(identity(SYSID), TimelineId(3));
    // The page's header began before the data: nothing to check.
    v.feed(Lsn(u64::MAX - 8190), &[0]).unwrap();
    // The whole last segment but its last byte: valid WAL.
    let last = u64::MAX / SEG;
    let d = valid_segment(SYSID, 3, last, PAGES);
    let mut v = PageValidator::new(identity(SYSID), TimelineId(3));
    v.feed(Lsn(last * SEG), &d[..d.len() - 1]).unwrap();
    // Its zero tail, too.
    let d = valid_segment(SYSID, 3, last, 3);
    let mut v = PageValidator::new(identity(SYSID), TimelineId(3));
    v.feed(Lsn(last * SEG), &d[..d.len() - 1]).unwrap();
}

/// Found by `page_stream_damaged_and_arbitrary`: data whose end lies beyond
/// `FFFFFFFF/FFFFFFFF` is refused with a typed error, not an overflow.
#[test]
fn page_stream_beyond_the_lsn_space_is_refused() {
    let mut v = PageValidator::new(identity(SYSID), TimelineId(3));
    let e = v.feed(Lsn(u64::MAX - 1), &[0, 0, 0]).unwrap_err();
    assert_eq!(
        e,
        PageError::BeyondWalSpace {
            start: Lsn(u64::MAX - 1),
            len: 3
        }
    );
    assert!(e.to_string().contains("FFFFFFFF/FFFFFFFE"), "{e}");
}

// ---------------------------------------------------------------------------
// Envelopes
// ---------------------------------------------------------------------------

const NAME: &str = "000000010000000000000003";

fn key_of(seed: u8) -> Key {
    Key::from_bytes([seed; 32])
}

fn compression() -> impl Strategy<Value = Compression> {
    prop_oneof![Just(Compression::None), Just(Compression::Zstd)]
}

/// Payloads: random, compressible, empty, and around frame boundaries.
fn payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        bytes(3000),
        (0..200_000usize, any::<u8>())
            .prop_map(|(n, b)| (0..n).map(|i| b ^ (i / 97) as u8).collect()),
        (-3i64..=3, 1..3i64).prop_map(|(d, f)| vec![7u8; (f * 65536 + d) as usize]),
    ]
}

/// Cached valid objects (encoding is the slow part), by kind.
fn sample_object(kind: usize) -> &'static (Vec<u8>, Vec<u8>) {
    static OBJ: OnceLock<Vec<(Vec<u8>, Vec<u8>)>> = OnceLock::new();
    &OBJ.get_or_init(|| {
        let plain: Vec<u8> = (0..150_000u32)
            .map(|i| (i / 13) as u8 ^ (i % 7) as u8)
            .collect();
        let k = key_of(1);
        [
            (Compression::None, None),
            (Compression::Zstd, None),
            (Compression::None, Some(&k)),
            (Compression::Zstd, Some(&k)),
        ]
        .into_iter()
        .map(|(c, key)| (plain.clone(), envelope::encode(NAME, &plain, c, 1, key)))
        .collect()
    })[kind]
}

proptest! {
    #![proptest_config(cases(128))]

    /// Any payload round-trips, with and without key and compression; the
    /// header reads back what was written.
    #[test]
    fn envelope_round_trip(
        p in payload(),
        c in compression(),
        key in prop::option::of(any::<u8>()),
        level in 1..4i32,
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
    ) {
        let key = key.map(key_of);
        let obj = envelope::encode(NAME, &p, c, level, key.as_ref());
        prop_assert_eq!(&envelope::decode(NAME, &obj, key.as_ref()).unwrap(), &p);
        let h = envelope::read_header(&obj).unwrap();
        prop_assert_eq!(h.plain_len, p.len() as u64);
        prop_assert_eq!(h.object_len(), obj.len() as u64);
        prop_assert_eq!(h.name, NAME);
        let mut reader = std::io::Cursor::new(&p[..]);
        let streamed = envelope::encode_from(NAME, p.len() as u64, &mut reader, c, level, key.as_ref(), &[]).unwrap();
        prop_assert_eq!(&envelope::decode(NAME, &streamed, key.as_ref()).unwrap(), &p);
        // Frames made earlier of any ranges (every other range between the
        // cuts), placed instead of compressed again: the same plaintext.
        let mut at: Vec<usize> = cuts.iter().map(|i| i.index(p.len() + 1)).collect();
        at.sort_unstable();
        let frames: Vec<envelope::Frame> = at
            .windows(2)
            .step_by(2)
            .map(|w| envelope::Frame {
                start: w[0] as u64,
                end: w[1] as u64,
                bytes: bytes::Bytes::from(envelope::compress(&p[w[0]..w[1]], level)),
            })
            .collect();
        let mut reader = std::io::Cursor::new(&p[..]);
        let placed = envelope::encode_from(NAME, p.len() as u64, &mut reader, c, level, key.as_ref(), &frames).unwrap();
        prop_assert_eq!(&envelope::decode(NAME, &placed, key.as_ref()).unwrap(), &p);
    }

    /// Any mutation of a valid object (flipped bytes, truncation, appended
    /// bytes, spliced garbage) is an error, whatever key is given.
    #[test]
    fn envelope_mutations_are_refused(
        kind in 0..4usize,
        flips in proptest::collection::vec((any::<prop::sample::Index>(), 1..=255u8), 0..4),
        cut in prop::option::of(any::<prop::sample::Index>()),
        tail in bytes(40),
        header_flip in prop::option::of((0..100usize, 1..=255u8)),
        with_key in any::<bool>(),
    ) {
        let (_plain, obj) = sample_object(kind);
        let mut m = obj.clone();
        // Distinct positions, so that no flip undoes another.
        let flips: std::collections::BTreeMap<usize, u8> = flips.iter().map(|(i, x)| (i.index(m.len()), *x)).collect();
        for (&i, &x) in &flips {
            m[i] ^= x;
        }
        if let Some((i, x)) = header_flip {
            m[i] ^= x;
        }
        if let Some(c) = cut {
            m.truncate(c.index(m.len()));
        }
        m.extend_from_slice(&tail);
        prop_assume!(&m != obj);
        let key = key_of(1);
        let r = envelope::decode(NAME, &m, with_key.then_some(&key));
        prop_assert!(r.is_err(), "mutated object decoded");
        prop_assert!(!r.unwrap_err().to_string().is_empty());
    }

    /// A valid object read with the wrong key, no key, a key where there
    /// was none, or under another name: the matching error.
    #[test]
    fn envelope_wrong_key_or_name(kind in 0..4usize, seed in 2..=255u8, name in "[0-9A-F]{24}") {
        let (plain, obj) = sample_object(kind);
        let encrypted = kind >= 2;
        let other = key_of(seed);
        let right = key_of(1);
        let r = envelope::decode(NAME, obj, Some(&other));
        if encrypted {
            prop_assert!(matches!(r, Err(EnvelopeError::WrongKey { .. })), "{r:?}");
            prop_assert!(matches!(envelope::decode(NAME, obj, None), Err(EnvelopeError::KeyRequired { .. })), "unexpected result");
            prop_assert_eq!(&envelope::decode(NAME, obj, Some(&right)).unwrap(), plain);
        } else {
            prop_assert!(matches!(r, Err(EnvelopeError::UnencryptedWithKey { .. })), "{r:?}");
            prop_assert_eq!(&envelope::decode(NAME, obj, None).unwrap(), plain);
        }
        if name != NAME {
            let r = envelope::decode(&name, obj, encrypted.then_some(&right));
            prop_assert!(matches!(r, Err(EnvelopeError::NameMismatch { .. })), "{r:?}");
        }
    }

    /// Arbitrary bytes, and arbitrary bytes behind a valid magic and
    /// version: an error, never a panic or a huge allocation.
    #[test]
    fn envelope_arbitrary_bytes(b in bytes(400), magic in any::<bool>(), key in prop::option::of(any::<u8>())) {
        let mut b = b;
        if magic {
            let mut m = envelope::MAGIC.to_vec();
            m.push(envelope::VERSION);
            m.extend_from_slice(&b);
            b = m;
        }
        let key = key.map(key_of);
        let r = envelope::decode(NAME, &b, key.as_ref());
        prop_assert!(r.is_err());
        let _ = envelope::read_header(&b);
    }

    /// A forged header (any field values, a correct checksum over them) on
    /// an unencrypted object is refused or decodes to exactly `plain_len`
    /// bytes: never a panic or an over-allocation.
    #[test]
    fn envelope_forged_unencrypted_headers(
        compression in 0..3u8,
        plain_len in prop_oneof![0..300u64, any::<u64>(), Just(envelope::MAX_PLAIN_LEN)],
        body in bytes(300),
        body_len_delta in -3i64..3,
        zstd in any::<bool>(),
    ) {
        use sha2::Digest;
        let body = if zstd { zstd::bulk::compress(&body, 1).unwrap() } else { body };
        let mut o = envelope::MAGIC.to_vec();
        o.push(envelope::VERSION);
        o.push(compression);
        o.push(0);
        o.extend_from_slice(&[0u8; 4 + 8 + 32 + 7]);
        o.extend_from_slice(&plain_len.to_be_bytes());
        let body_len = (body.len() as i64 + body_len_delta).max(0) as u64;
        o.extend_from_slice(&body_len.to_be_bytes());
        o.extend_from_slice(&(NAME.len() as u16).to_be_bytes());
        o.extend_from_slice(NAME.as_bytes());
        o.extend_from_slice(&body);
        let digest = sha2::Sha256::digest(&o);
        o.extend_from_slice(&digest);
        if let Ok(p) = envelope::decode(NAME, &o, None) {
            prop_assert_eq!(p.len() as u64, plain_len);
        }
    }
}

// ---------------------------------------------------------------------------
// Chunk planning
// ---------------------------------------------------------------------------

/// The model: a byte map of what the chunks cover, over a small segment.
///
/// * `end` = the first byte from 0 that no chunk covers: what can be rebuilt.
/// * An empty set plans nothing; else nothing covering byte 0 is
///   `MissingStart { first: lowest start }`; else a chunk starting beyond
///   `end` is `Hole { from: end, to: lowest such start }`; else `Ok`.
/// * An `Ok` plan: chunks of the set, the first at 0, each starting at or
///   before the previous end and reaching further, the last ending at
///   `end` (= the highest end of the set), and no longer than the fewest
///   chunks that can cover `[0, end)`.
fn chunk_model(chunks: &[(u64, u64)]) -> Result<u64, Uncovered> {
    let max = chunks.iter().map(|c| c.1).max().unwrap_or(0);
    let mut map = vec![false; max as usize + 1];
    for &(s, e) in chunks {
        for b in s..e {
            map[b as usize] = true;
        }
    }
    let end = map.iter().position(|&c| !c).unwrap() as u64;
    if chunks.is_empty() {
        return Ok(0);
    }
    if end == 0 {
        let first = chunks.iter().map(|c| c.0).min().unwrap();
        return Err(Uncovered::MissingStart { first });
    }
    if let Some(to) = chunks.iter().map(|c| c.0).filter(|&s| s > end).min() {
        return Err(Uncovered::Hole { from: end, to });
    }
    Ok(end)
}

/// Fewest chunks covering `[0, end)` (breadth-first over reachable ends).
fn fewest(chunks: &[(u64, u64)], end: u64) -> usize {
    let mut reach = 0u64;
    let mut steps = 0;
    while reach < end {
        let next = chunks
            .iter()
            .filter(|c| c.0 <= reach)
            .map(|c| c.1)
            .max()
            .unwrap();
        assert!(next > reach);
        reach = next;
        steps += 1;
    }
    steps
}

fn chunk_set() -> impl Strategy<Value = Vec<(u64, u64)>> {
    proptest::collection::vec((0..60u64, 1..20u64).prop_map(|(s, l)| (s, s + l)), 0..12)
}

proptest! {
    #![proptest_config(cases(4000))]

    #[test]
    fn chunks_plan_matches_model(mut chunks in chunk_set(), from_zero in any::<bool>()) {
        if from_zero && !chunks.is_empty() {
            chunks[0].0 = 0;
        }
        let got = plan(&chunks);
        match (chunk_model(&chunks), got) {
            (Ok(end), Ok(p)) => {
                prop_assert_eq!(p.is_empty(), chunks.is_empty());
                if !p.is_empty() {
                    prop_assert_eq!(p[0].0, 0);
                    prop_assert_eq!(p.last().unwrap().1, end);
                    prop_assert_eq!(chunks.iter().map(|c| c.1).max().unwrap(), end);
                    for w in p.windows(2) {
                        prop_assert!(w[1].0 <= w[0].1 && w[1].1 > w[0].1, "{p:?}");
                    }
                    for c in &p {
                        prop_assert!(chunks.contains(c));
                    }
                    prop_assert_eq!(p.len(), fewest(&chunks, end), "{:?}", p);
                }
            }
            (want, got) => {
                prop_assert_eq!(want.map(|_| ()), got.clone().map(|_| ()), "{:?}", chunks);
                let (from, to) = got.unwrap_err().range();
                prop_assert!(from < to);
            }
        }
    }

    /// Any pairs at all (empty, reversed, huge; `ObjectName::chunk` never
    /// yields such, but a model must not be needed for safety): no panic,
    /// and an `Ok` plan still starts at 0 and advances.
    #[test]
    fn chunks_plan_any_ranges(chunks in proptest::collection::vec((any::<u64>(), any::<u64>()), 0..8)) {
        if let Ok(p) = plan(&chunks) {
            if let Some(f) = p.first() { prop_assert_eq!(f.0, 0) }
            for w in p.windows(2) {
                prop_assert!(w[1].0 <= w[0].1 && w[1].1 > w[0].1);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Conninfo
// ---------------------------------------------------------------------------

fn env_home() -> impl Fn(&str) -> Option<String> {
    |k| (k == "HOME").then(|| "/home/fuzz".to_string())
}

/// A generated conninfo: what it says, to compare with what parses.
#[derive(Debug, Clone)]
struct Gen {
    hosts: Vec<Host>,
    /// None, one for all, or one per host.
    ports: Vec<u16>,
    user: String,
    password: Option<String>,
    dbname: Option<String>,
    application_name: Option<String>,
    sslmode: Option<SslMode>,
    connect_timeout: Option<u32>,
}

fn host() -> impl Strategy<Value = Host> {
    prop_oneof![
        "[a-z][a-z0-9.-]{0,15}".prop_map(Host::Tcp),
        "(127\\.0\\.0\\.[0-9]{1,2})|(::1)".prop_map(Host::Tcp),
        "/[a-zA-Z0-9_. -]{0,15}".prop_map(|p| Host::Unix(PathBuf::from(p))),
    ]
}

/// Any text without NUL (libpq strings are C strings).
fn text() -> impl Strategy<Value = String> {
    "[^\u{0}]{1,12}"
}

fn sslmode() -> impl Strategy<Value = SslMode> {
    prop::sample::select(vec![
        SslMode::Disable,
        SslMode::Allow,
        SslMode::Prefer,
        SslMode::Require,
        SslMode::VerifyCa,
        SslMode::VerifyFull,
    ])
}

fn gen_conninfo() -> impl Strategy<Value = Gen> {
    (
        proptest::collection::vec(host(), 1..4),
        0..3usize,
        proptest::collection::vec(1..=u16::MAX, 3),
        text(),
        prop::option::of(text()),
        prop::option::of(text()),
        prop::option::of(text()),
        prop::option::of(sslmode()),
        prop::option::of(0..100_000u32),
    )
        .prop_map(
            |(
                hosts,
                nports,
                ports,
                user,
                password,
                dbname,
                application_name,
                sslmode,
                connect_timeout,
            )| {
                let ports = match nports {
                    0 => vec![],
                    1 => vec![ports[0]],
                    _ => ports.iter().cycle().take(hosts.len()).copied().collect(),
                };
                Gen {
                    hosts,
                    ports,
                    user,
                    password,
                    dbname,
                    application_name,
                    sslmode,
                    connect_timeout,
                }
            },
        )
}

/// Parameters tokio_postgres or walsafe know.
const KNOWN_KEYS: &[&str] = &[
    "user",
    "password",
    "dbname",
    "options",
    "application_name",
    "sslmode",
    "sslnegotiation",
    "host",
    "hostaddr",
    "port",
    "connect_timeout",
    "tcp_user_timeout",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_retries",
    "target_session_attrs",
    "channel_binding",
    "load_balance_hosts",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "passfile",
    "replication",
];

fn quote(v: &str) -> String {
    let mut s = String::from("'");
    for c in v.chars() {
        if c == '\'' || c == '\\' {
            s.push('\\');
        }
        s.push(c);
    }
    s.push('\'');
    s
}

fn key_value(g: &Gen) -> String {
    key_value_parts(g).join("  ")
}

/// The `key=value` parameters of a generated conninfo.
fn key_value_parts(g: &Gen) -> Vec<String> {
    let hosts: Vec<String> = g.hosts.iter().map(|h| h.to_string()).collect();
    let mut parts = vec![format!("host={}", quote(&hosts.join(",")))];
    if !g.ports.is_empty() {
        let p: Vec<String> = g.ports.iter().map(u16::to_string).collect();
        parts.push(format!("port={}", p.join(",")));
    }
    parts.push(format!("user = {}", quote(&g.user)));
    if let Some(p) = &g.password {
        parts.push(format!("password={}", quote(p)));
    }
    if let Some(d) = &g.dbname {
        parts.push(format!("dbname={}", quote(d)));
    }
    if let Some(a) = &g.application_name {
        parts.push(format!("application_name={}", quote(a)));
    }
    if let Some(m) = g.sslmode {
        parts.push(format!("sslmode={m}"));
    }
    if let Some(t) = g.connect_timeout {
        parts.push(format!("connect_timeout={t}"));
    }
    parts
}

fn pct(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

fn url(g: &Gen) -> String {
    let hosts: Vec<String> = g
        .hosts
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let h = match h {
                Host::Tcp(n) if n.contains(':') => format!("[{n}]"),
                Host::Tcp(n) => n.clone(),
                Host::Unix(p) => pct(&p.to_string_lossy()),
            };
            match g.ports.len() {
                0 => h,
                1 if i == 0 => format!("{h}:{}", g.ports[0]),
                1 => h,
                _ => format!("{h}:{}", g.ports[i]),
            }
        })
        .collect();
    let creds = match &g.password {
        Some(p) => format!("{}:{}", pct(&g.user), pct(p)),
        None => pct(&g.user),
    };
    let mut s = format!("postgresql://{creds}@{}", hosts.join(","));
    if let Some(d) = &g.dbname {
        s.push('/');
        s.push_str(&pct(d));
    }
    let mut q = vec![];
    if let Some(a) = &g.application_name {
        q.push(format!("application_name={}", pct(a)));
    }
    if let Some(m) = g.sslmode {
        q.push(format!("sslmode={m}"));
    }
    if let Some(t) = g.connect_timeout {
        q.push(format!("connect_timeout={t}"));
    }
    if !q.is_empty() {
        s.push('?');
        s.push_str(&q.join("&"));
    }
    s
}

fn check_parsed(g: &Gen, p: &ConnParams, url_form: bool) -> Result<(), TestCaseError> {
    let hosts: Vec<Host> = p.targets.iter().map(|t| t.host.clone()).collect();
    prop_assert_eq!(&hosts, &g.hosts);
    let ports: Vec<u16> = p.targets.iter().map(|t| t.port).collect();
    let want: Vec<u16> = match (g.ports.len(), url_form) {
        (0, _) => vec![5432; g.hosts.len()],
        // In a URL a port belongs to its host; the others get 5432.
        (1, true) => (0..g.hosts.len())
            .map(|i| if i == 0 { g.ports[0] } else { 5432 })
            .collect(),
        (1, false) => vec![g.ports[0]; g.hosts.len()],
        _ => g.ports.clone(),
    };
    prop_assert_eq!(ports, want);
    prop_assert_eq!(&p.user, &g.user);
    prop_assert_eq!(
        p.password.as_ref().map(|p| p.expose().to_string()),
        g.password.clone()
    );
    prop_assert_eq!(&p.dbname, &g.dbname);
    prop_assert_eq!(&p.application_name, &g.application_name);
    prop_assert_eq!(p.sslmode, g.sslmode.unwrap_or(SslMode::Prefer));
    let timeout = g
        .connect_timeout
        .filter(|&t| t > 0)
        .map(|t| Duration::from_secs(t.into()));
    prop_assert_eq!(p.connect_timeout, timeout);
    prop_assert!(p.targets.iter().all(|t| t.hostaddr.is_none()));
    Ok(())
}

fn check_error(e: &ConninfoError) -> Result<(), TestCaseError> {
    // Every error says it is about the conninfo (or the environment that
    // fills it) and why.
    let msg = e.to_string();
    prop_assert!(msg.contains("[postgres] conninfo"), "{msg}");
    Ok(())
}

proptest! {
    #![proptest_config(cases(512))]

    /// Generated key=value conninfos parse to what was generated.
    #[test]
    fn conninfo_key_value_round_trip(g in gen_conninfo()) {
        let s = key_value(&g);
        let p = ConnParams::parse_with_env(&s, &env_home()).map_err(|e| TestCaseError::fail(format!("{s}: {e}")))?;
        check_parsed(&g, &p, false)?;
    }

    /// Generated URL conninfos parse to what was generated.
    #[test]
    fn conninfo_url_round_trip(g in gen_conninfo()) {
        let s = url(&g);
        let p = ConnParams::parse_with_env(&s, &env_home()).map_err(|e| TestCaseError::fail(format!("{s}: {e}")))?;
        check_parsed(&g, &p, true)?;
    }

    /// A key=value conninfo with one piece of junk among valid parameters
    /// (a parameter without a name, an unknown parameter, a name without
    /// a value) is refused: never parsed with the junk, or what follows
    /// it, silently left out.
    #[test]
    fn conninfo_junk_is_refused(g in gen_conninfo(), junk in prop_oneof![
        "=[a-z0-9']{0,4}",
        "[a-z]{3,8}=1".prop_filter("a known key", |s| !KNOWN_KEYS.contains(&s.trim_end_matches("=1"))),
        "[a-z]{1,8}",
    ], at in any::<prop::sample::Index>()) {
        let mut parts = key_value_parts(&g);
        let i = at.index(parts.len() + 1);
        parts.insert(i, junk.clone());
        let s = parts.join(" ");
        match ConnParams::parse_with_env(&s, &env_home()) {
            Ok(p) => prop_assert!(false, "{s:?} parsed, junk {junk:?} ignored: {p:?}"),
            Err(e) => check_error(&e)?,
        }
    }

    /// Arbitrary text, and text made of conninfo pieces: never a panic,
    /// every error explained.
    #[test]
    fn conninfo_arbitrary_text(
        s in prop_oneof![
            any::<String>(),
            "(postgres(ql)?://)?[a-z@:/?&=%,.\\[\\]' \\\\0-9A-F]{0,40}",
            proptest::collection::vec(prop::sample::select(vec![
                "host", "port", "user", "password", "dbname", "sslmode", "sslrootcert", "hostaddr",
                "connect_timeout", "=", " ", "'", "\\", ",", "/", "system", "verify-full", "1", "-1",
                "::1", "%", "%2F", "?", "&", "@", ":", "postgresql://", "[", "]", "replication",
            ]), 0..14).prop_map(|v| v.concat()),
        ],
        env in proptest::collection::vec((prop::sample::select(vec!["PGHOST", "PGPORT", "PGUSER", "PGSSLMODE", "PGCONNECT_TIMEOUT", "PGSSLROOTCERT", "HOME"]), "[a-z0-9,/ -]{0,10}"), 0..3),
    ) {
        let env: HashMap<String, String> = env.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        match ConnParams::parse_with_env(&s, &|k| env.get(k).cloned()) {
            Ok(p) => {
                prop_assert!(!p.targets.is_empty());
                prop_assert!(p.targets.iter().all(|t| !matches!(&t.host, Host::Unix(d) if !d.is_absolute())));
            }
            Err(e) => check_error(&e)?,
        }
    }
}

/// Found by `conninfo_junk_is_refused`: a parameter without a name made
/// tokio_postgres stop parsing, so everything after it was silently
/// dropped (`host` and `user` here: the agent would connect to the default
/// socket as the OS user).
#[test]
fn conninfo_parameter_without_a_name_is_refused() {
    for s in ["='' host='a' user='u'", "host=a = user=u", "host=a =x"] {
        let e = ConnParams::parse_with_env(s, &env_home()).unwrap_err();
        assert!(matches!(e, ConninfoError::Syntax { .. }), "{s}: {e}");
        assert!(
            e.to_string().contains("without a parameter name"),
            "{s}: {e}"
        );
    }
}

// ---------------------------------------------------------------------------
// WAL file names
// ---------------------------------------------------------------------------

fn segment_size() -> impl Strategy<Value = u64> {
    (20..=30u32).prop_map(|b| 1u64 << b)
}

proptest! {
    #![proptest_config(cases(1000))]

    /// Names round-trip for every segment size and position, and
    /// classify/parse agree on any text.
    #[test]
    fn walfile_names(tli in 1..=u32::MAX, segno in any::<u64>(), size in segment_size(), junk in "[0-9A-Fa-fx.]{0,34}|\\PC{0,30}") {
        let segno = segno % (u64::MAX / size + 1);
        let s = SegmentName { timeline: TimelineId(tli), segno };
        let name = s.file_name(size);
        prop_assert_eq!(name.len(), 24);
        prop_assert_eq!(SegmentName::parse(&name, size), Some(s));
        prop_assert_eq!(classify(&name), Some(NameKind::Segment));
        for f in [WalFileName::Segment(s), WalFileName::Partial(s), WalFileName::History(TimelineId(tli))] {
            prop_assert_eq!(WalFileName::parse(&f.to_name(size), size), Some(f));
        }
        prop_assert_eq!(s.start_lsn(size).segment_no(size), segno);
        for text in [junk.clone(), format!("{junk}.partial"), format!("{junk}.history")] {
            let parsed = WalFileName::parse(&text, size);
            match classify(&text) {
                None => prop_assert_eq!(parsed, None),
                Some(NameKind::History(t)) => prop_assert_eq!(parsed, Some(WalFileName::History(t))),
                Some(_) => {}
            }
            if let Some(f) = parsed {
                prop_assert_eq!(f.to_name(size).to_ascii_uppercase(), text.to_ascii_uppercase());
            }
        }
    }
}
