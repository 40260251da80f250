//! Page validation and the spool against WAL that a real PostgreSQL wrote.
//!
//! One fixture per test binary: a throwaway cluster archives a segment
//! ended by `pg_switch_wal()` (WAL pages, then the zero tail PostgreSQL
//! leaves after a switch), and a promoted standby provides the first
//! segment of timeline 2 (pages before the switch point carry timeline 1).
//! The clusters are stopped and removed as soon as the bytes are read.

mod common;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use walsafe::pg::page::{
    pg_major_of_magic, read_long_header, validate_segment, PageError, PageValidator,
    XLP_LONG_HEADER,
};
use walsafe::pg::ClusterIdentity;
use walsafe::pg::{Lsn, SegmentName, TimelineId, WAL_BLOCK_SIZE};
use walsafe::spool::Spool;

use common::pg::{PgCluster, PgOptions};

const SEG: u64 = 16 * 1024 * 1024;
const BS: usize = WAL_BLOCK_SIZE as usize;

struct Fixture {
    sysid: u64,
    /// `server_version_num / 10000`.
    major: u32,
    /// 000000010000000000000001 as archived after `pg_switch_wal()`.
    seg1: Vec<u8>,
    /// The first segment of timeline 2 on the promoted standby.
    tl2: (SegmentName, Vec<u8>),
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let primary = PgCluster::start(&PgOptions {
            name: "spool-pages".into(),
            ..PgOptions::default()
        });
        let arch = primary.test_dir().subdir("archive");
        primary.append_conf(&[
            "archive_mode = on",
            &format!("archive_command = 'cp %p {}/%f'", arch.display()),
        ]);
        primary.stop_fast();
        primary.start_again();
        primary.psql(
            "CREATE TABLE t AS SELECT g, repeat('x', 200) AS pad FROM generate_series(1, 20000) g",
        );
        primary.psql("SELECT pg_switch_wal()");
        let seg1_path = arch.join("000000010000000000000001");
        let deadline = Instant::now() + Duration::from_secs(60);
        while !seg1_path.exists() {
            assert!(
                Instant::now() < deadline,
                "segment 1 was not archived within 60 s:\n{}",
                primary.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        // cp may still be writing: wait for the full size.
        while std::fs::metadata(&seg1_path).unwrap().len() < SEG {
            assert!(Instant::now() < deadline, "archived segment 1 stays short");
            std::thread::sleep(Duration::from_millis(50));
        }
        let seg1 = std::fs::read(&seg1_path).unwrap();
        let sysid = primary.system_identifier();
        let major: u32 = primary
            .psql("SHOW server_version_num")
            .trim()
            .parse::<u32>()
            .unwrap()
            / 10000;

        let standby = primary.create_standby();
        // Some WAL after the base backup's own switch, so that the switch
        // point of the promotion lies inside a segment.
        primary.psql("CREATE TABLE before_promotion AS SELECT generate_series(1, 5000) AS g");
        let lsn = primary
            .psql("SELECT pg_current_wal_lsn()")
            .trim()
            .to_string();
        standby.wait_for(
            &format!("SELECT pg_last_wal_replay_lsn() >= '{lsn}'"),
            "t",
            Duration::from_secs(60),
        );
        standby.promote();
        standby.wait_for("SELECT pg_is_in_recovery()", "f", Duration::from_secs(60));
        let name = standby
            .psql("SELECT pg_walfile_name(pg_current_wal_lsn())")
            .trim()
            .to_string();
        standby.psql("CREATE TABLE after_promotion AS SELECT 1 AS x");
        // Complete the segment and read it at once: a checkpoint (even the
        // shutdown one) may recycle it once it is no longer current.
        standby.psql("SELECT pg_switch_wal()");
        let tl2_bytes = std::fs::read(standby.wal_file(&name)).unwrap();
        standby.stop_fast();
        let tl2_name = SegmentName::parse(&name, SEG).unwrap();
        assert_eq!(tl2_name.timeline, TimelineId(2), "{name}");
        Fixture {
            sysid,
            major,
            seg1,
            tl2: (tl2_name, tl2_bytes),
        }
    })
}

fn seg1_name() -> SegmentName {
    SegmentName {
        timeline: TimelineId(1),
        segno: 1,
    }
}

fn identity(f: &Fixture) -> ClusterIdentity {
    ClusterIdentity::new(f.sysid, 150000, SEG)
}

/// Feeds `bytes` (WAL from `start`) to a fresh validator in random pieces
/// of 1 byte to 200 KiB.
fn feed_randomly(
    id: ClusterIdentity,
    tli: TimelineId,
    start: Lsn,
    bytes: &[u8],
    seed: u64,
) -> Result<PageValidator, PageError> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = PageValidator::new(id, tli);
    let mut off = 0;
    while off < bytes.len() {
        let n = if rng.gen_bool(0.2) {
            rng.gen_range(1..=64)
        } else {
            rng.gen_range(1..=200 * 1024)
        }
        .min(bytes.len() - off);
        v.feed(start.plus(off as u64), &bytes[off..off + n])?;
        off += n;
    }
    Ok(v)
}

fn page_count(bytes: &[u8]) -> (usize, usize) {
    let pages = bytes.chunks(BS);
    let zero = pages.clone().filter(|p| p.iter().all(|&b| b == 0)).count();
    (pages.count() - zero, zero)
}

#[test]
fn real_switched_segment_validates_whole_and_streamed() {
    let f = fixture();
    let (wal_pages, zero_pages) = page_count(&f.seg1);
    // The segment really has both WAL and a zero tail after the switch.
    assert!(
        wal_pages > 10 && zero_pages > 10,
        "{wal_pages} / {zero_pages}"
    );

    validate_segment(&identity(f), seg1_name(), &f.seg1).unwrap();
    for seed in 0..5 {
        let v = feed_randomly(identity(f), TimelineId(1), Lsn(SEG), &f.seg1, seed)
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        assert_eq!(v.magic().and_then(pg_major_of_magic), Some(f.major));
    }

    let h = read_long_header(&f.seg1).unwrap();
    assert_eq!(h.system_identifier, f.sysid);
    assert_eq!(u64::from(h.segment_size), SEG);
    assert_eq!(h.block_size as usize, BS);
    assert_eq!(h.pageaddr, Lsn(SEG));
    assert_eq!(h.pg_major(), Some(f.major));
    assert_ne!(h.info & XLP_LONG_HEADER, 0);
}

#[test]
fn another_clusters_segment_is_refused_naming_both_ids() {
    let f = fixture();
    let mut other = f.seg1.clone();
    let stranger = f.sysid ^ 0x5A5A_0000_0000_0001;
    other[24..32].copy_from_slice(&stranger.to_le_bytes());
    for e in [
        validate_segment(&identity(f), seg1_name(), &other).unwrap_err(),
        feed_randomly(identity(f), TimelineId(1), Lsn(SEG), &other, 7)
            .err()
            .unwrap(),
    ] {
        assert!(e.is_stranger(), "{e}");
        let msg = e.to_string();
        assert!(msg.contains(&stranger.to_string()), "{msg}");
        assert!(msg.contains(&f.sysid.to_string()), "{msg}");
        assert!(msg.contains("0/1000000"), "{msg}");
        assert!(msg.contains("000000010000000000000001"), "{msg}");
    }
}

#[test]
fn wrong_page_address_is_refused() {
    let f = fixture();
    let mut d = f.seg1.clone();
    let page = 5 * BS;
    d[page + 8..page + 16].copy_from_slice(&(7 * SEG + 5 * BS as u64).to_le_bytes());
    let e = feed_randomly(identity(f), TimelineId(1), Lsn(SEG), &d, 3)
        .err()
        .unwrap();
    match &e {
        PageError::WrongPageAddress { at, found } => {
            assert_eq!(at.lsn, Lsn(SEG + 5 * BS as u64));
            assert_eq!(at.offset, 5 * BS as u64);
            assert_eq!(*found, Lsn(7 * SEG + 5 * BS as u64));
        }
        e => panic!("unexpected {e}"),
    }
    assert!(e.to_string().contains("0/100A000"), "{e}");
    // The same file presented as another segment: every pageaddr is wrong.
    let seg2 = SegmentName {
        timeline: TimelineId(1),
        segno: 2,
    };
    assert!(matches!(
        validate_segment(&identity(f), seg2, &f.seg1),
        Err(PageError::WrongPageAddress { .. })
    ));
}

#[test]
fn decreasing_timeline_is_refused() {
    let f = fixture();
    let mut d = f.seg1.clone();
    // Page 10 claims timeline 2, page 11 goes back to 1.
    d[10 * BS + 4..10 * BS + 8].copy_from_slice(&2u32.to_le_bytes());
    let e = feed_randomly(identity(f), TimelineId(2), Lsn(SEG), &d, 11)
        .err()
        .unwrap();
    match e {
        PageError::TimelineDecreased {
            at,
            previous,
            found,
        } => {
            assert_eq!(at.lsn, Lsn(SEG + 11 * BS as u64));
            assert_eq!((previous, found), (TimelineId(2), TimelineId(1)));
        }
        e => panic!("unexpected {e}"),
    }
    // Read as timeline 1, page 10 is from the future.
    assert!(matches!(
        validate_segment(&identity(f), seg1_name(), &d),
        Err(PageError::TimelineOutOfRange { found: 2, .. })
    ));
}

#[test]
fn unknown_or_changing_magic_is_refused() {
    let f = fixture();
    let mut d = f.seg1.clone();
    d[0..2].copy_from_slice(&0xD101u16.to_le_bytes()); // PostgreSQL 12
    let e = validate_segment(&identity(f), seg1_name(), &d).unwrap_err();
    assert!(
        matches!(e, PageError::UnknownMagic { found: 0xD101, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("0xD101"), "{e}");
    assert!(read_long_header(&d).is_err());

    let mut d = f.seg1.clone();
    let other = if f.major == 16 { 0xD110u16 } else { 0xD113u16 };
    d[3 * BS..3 * BS + 2].copy_from_slice(&other.to_le_bytes());
    assert!(matches!(
        feed_randomly(identity(f), TimelineId(1), Lsn(SEG), &d, 5).err(),
        Some(PageError::MagicChanged { .. })
    ));
}

#[test]
fn wrong_segment_size_is_refused() {
    let f = fixture();
    let e = validate_segment(&identity(f), seg1_name(), &f.seg1[..f.seg1.len() - BS]).unwrap_err();
    assert!(matches!(e, PageError::WrongFileSize { .. }), "{e}");
    // A repository pinned to 64 MiB segments refuses this cluster's WAL.
    let big = ClusterIdentity::new(f.sysid, 150000, 64 * 1024 * 1024);
    let mut v = PageValidator::new(big, TimelineId(1));
    assert!(matches!(
        v.feed(Lsn(64 * 1024 * 1024), &f.seg1[..BS]),
        Err(PageError::WrongSegmentSize { .. })
    ));
}

#[test]
fn first_segment_of_a_promoted_timeline() {
    let f = fixture();
    let (name, bytes) = &f.tl2;
    let tlis: Vec<u32> = bytes
        .chunks(BS)
        .filter(|p| p.iter().any(|&b| b != 0))
        .map(|p| u32::from_le_bytes(p[4..8].try_into().unwrap()))
        .collect();
    // Pages before the switch point were copied from timeline 1.
    assert_eq!(tlis.first(), Some(&1), "{tlis:?}");
    assert_eq!(tlis.last(), Some(&2), "{tlis:?}");

    validate_segment(&identity(f), *name, bytes).unwrap();
    let start = name.start_lsn(SEG);
    feed_randomly(identity(f), TimelineId(2), start, bytes, 1).unwrap();
    // The same bytes read as timeline 1: pages of timeline 2 are strangers.
    let as_tl1 = SegmentName {
        timeline: TimelineId(1),
        segno: name.segno,
    };
    assert!(matches!(
        validate_segment(&identity(f), as_tl1, bytes),
        Err(PageError::TimelineOutOfRange { found: 2, .. })
    ));
    // Streamed like pg_receivewal does across a switch: the old timeline up
    // to somewhere in the segment, then the new one from the segment start.
    let mut v = PageValidator::new(identity(f), TimelineId(1));
    v.feed(start, &bytes[..2 * BS]).unwrap();
    v.set_timeline(TimelineId(2));
    v.feed(start, bytes).unwrap();
}

#[test]
fn real_wal_through_the_spool_survives_a_crash_byte_exact() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let start = Lsn(SEG);
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    {
        let (spool, rec) = Spool::open(dir.path(), SEG, walsafe::durable::Fsync::On).unwrap();
        assert_eq!(rec.resume, None);
        let mut w = spool.writer();
        let mut off = 0;
        while off < 3 * BS + 100 {
            let n = rng.gen_range(1..=3000);
            w.write(TimelineId(1), start.plus(off as u64), &f.seg1[off..off + n])
                .unwrap();
            off += n;
            if rng.gen_bool(0.3) {
                w.flush().unwrap();
            }
        }
        // "kill -9": the writer and the spool vanish without a last flush.
    }
    let (spool, rec) = Spool::open(dir.path(), SEG, walsafe::durable::Fsync::On).unwrap();
    assert_eq!(rec.resume, Some((TimelineId(1), start)));
    assert_eq!(rec.partials, vec![seg1_name()]);
    let mut w = spool.writer();
    let mut validator = PageValidator::new(identity(f), TimelineId(1));
    let mut off = 0;
    while off < f.seg1.len() {
        let n = rng.gen_range(1..=300_000).min(f.seg1.len() - off);
        let piece = &f.seg1[off..off + n];
        validator.feed(start.plus(off as u64), piece).unwrap();
        w.write(TimelineId(1), start.plus(off as u64), piece)
            .unwrap();
        off += n;
        if rng.gen_bool(0.5) {
            let flushed = w.flush().unwrap();
            assert!(flushed.flushed <= w.written());
        }
    }
    let done = w.flush().unwrap();
    assert_eq!(done.flushed, Lsn(2 * SEG));
    assert!(done.completed.is_empty() || done.completed == vec![seg1_name()]);
    let back = spool.read_complete(seg1_name()).unwrap();
    assert!(
        back == f.seg1,
        "the spooled segment differs from PostgreSQL's"
    );
    validate_segment(&identity(f), seg1_name(), &back).unwrap();
}
