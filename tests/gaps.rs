//! Rule 2, "never drop WAL silently": WAL the server removed before
//! walsafe streamed it (an invalidated slot) is recorded as a gap, logged,
//! exported, reported by wal-verify, refused by wal-fetch — and archiving
//! goes on after it.

mod common;

use std::time::Duration;

use common::pg::{PgCluster, PgOptions, TestDir};
use common::setup::current_lsn;
use common::walsafe::{
    assert_no_gap, assert_served_as, complete_segments, restore_promoted, wait_until, walsafe,
    Agent, Settings,
};

#[test]
fn lost_wal_is_recorded_as_a_gap_and_archiving_goes_on() {
    let pg = PgCluster::start(
        &PgOptions {
            name: "gaps".into(),
            ..Default::default()
        }
        .conf("max_slot_wal_keep_size = '32MB'")
        .conf("min_wal_size = '32MB'")
        .conf("max_wal_size = '64MB'"),
    );
    let dir = TestDir::new("gaps");
    let settings = Settings::new(dir.path(), &pg.conninfo());
    let config = settings.write(&dir.join("walsafe.toml"));
    let mut agent = Agent::start(&config, settings.metrics_port);
    pg.psql("CREATE TABLE t (pad text)");
    pg.psql("INSERT INTO t SELECT repeat('x', 100) FROM generate_series(1, 1000)");
    let archived_before = current_lsn(&pg);
    agent.wait_archived(archived_before, Duration::from_secs(30));
    assert_eq!(agent.gauge("walsafe_archive_gaps"), 0.0);
    agent.kill9();

    // While walsafe is down, far more WAL than the slot may keep.
    for _ in 0..8 {
        pg.psql("INSERT INTO t SELECT repeat(md5(g::text), 30) FROM generate_series(1, 10000) g");
        pg.psql("SELECT pg_switch_wal()");
        pg.psql("CHECKPOINT");
    }
    assert_eq!(
        pg.psql("SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'walsafe'"),
        "lost",
        "the slot should have been invalidated"
    );

    let restarted = std::time::Instant::now();
    let agent = Agent::start(&config, settings.metrics_port);
    pg.psql("INSERT INTO t VALUES ('after the gap')");
    let end = current_lsn(&pg);
    agent.wait_archived(end, Duration::from_secs(60));
    eprintln!(
        "REPORT slot invalidated, WAL gone: archiving again {:.1} s after start; peak RSS {} KiB; log: {}",
        restarted.elapsed().as_secs_f64(),
        agent.peak_rss_kib(),
        agent.first_log_line("GAP: WAL from")
    );
    assert_eq!(
        agent.gauge("walsafe_archive_gaps"),
        1.0,
        "log:\n{}",
        agent.log()
    );
    assert!(
        agent.log().contains("GAP: WAL from"),
        "log:\n{}",
        agent.log()
    );

    // Recorded in the spool and in the repository.
    let spool_gaps = std::fs::read_to_string(settings.spool.join("walsafe.gaps")).unwrap();
    assert_eq!(spool_gaps.lines().count(), 1, "{spool_gaps}");
    let repo: std::path::PathBuf = settings.repo_url.strip_prefix("file://").unwrap().into();
    assert_eq!(std::fs::read_dir(repo.join("gaps")).unwrap().count(), 1);

    // wal-verify reports it and exits 1.
    let v = walsafe(&config, &["wal-verify"]);
    let out = String::from_utf8_lossy(&v.stdout);
    assert_eq!(v.status.code(), Some(1), "{out}");
    assert!(out.contains("recorded by the agent"), "{out}");

    // A segment inside the gap is not "the end of the archive": wal-fetch
    // stops recovery (126) instead of letting PostgreSQL promote early.
    let gap: serde_json::Value = serde_json::from_str(spool_gaps.lines().next().unwrap()).unwrap();
    let from = gap["from"].as_str().unwrap();
    let (hi, lo) = from.split_once('/').unwrap();
    let from = (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap();
    // Only what is really gone: the WAL walsafe had spooled (and archived)
    // before it was killed is not part of the gap.
    assert!(
        from >= archived_before,
        "the gap starts at {from:#X}, before {archived_before:#X}, which was archived: {spool_gaps}"
    );
    let inside = from / (16 << 20) + 1;
    let name = format!("00000001{:08X}{:08X}", inside / 256, inside % 256);
    let dest = dir.join("out");
    let f = walsafe(&config, &["wal-fetch", &name, dest.to_str().unwrap()]);
    assert_eq!(
        f.status.code(),
        Some(126),
        "{}",
        String::from_utf8_lossy(&f.stderr)
    );
    assert!(String::from_utf8_lossy(&f.stderr).contains("recorded gap"));

    // The slot works again and holds WAL for walsafe.
    assert_eq!(
        pg.psql(
            "SELECT wal_status <> 'lost' FROM pg_replication_slots WHERE slot_name = 'walsafe'"
        ),
        "t"
    );
}

/// An invalidated slot does not mean lost WAL: PostgreSQL 18 invalidates a
/// slot that stayed idle too long (`idle_replication_slot_timeout`) while
/// every byte it held is still in pg_wal. walsafe re-creates the slot and
/// streams on from where it stopped; no gap is recorded.
#[test]
fn an_invalidated_slot_whose_wal_is_still_there_is_no_gap() {
    let pg = PgCluster::start(
        &PgOptions {
            name: "idle-slot".into(),
            ..Default::default()
        }
        .major(18)
        .conf("wal_keep_size = '1GB'"),
    );
    let dir = TestDir::new("idle-slot");
    let settings = Settings::new(dir.path(), &pg.conninfo());
    let config = settings.write(&dir.join("walsafe.toml"));
    let mut agent = Agent::start(&config, settings.metrics_port);
    pg.psql("CREATE TABLE t (pad text)");
    let backup = dir.join("backup");
    pg.base_backup(&backup, "none");
    pg.psql("INSERT INTO t SELECT repeat('x', 100) FROM generate_series(1, 1000)");
    agent.wait_archived(current_lsn(&pg), Duration::from_secs(30));
    agent.kill9();

    // While walsafe is down: some WAL, then the slot is invalidated for
    // idleness; nothing is removed (wal_keep_size keeps it all).
    pg.psql("INSERT INTO t SELECT repeat(md5(g::text), 30) FROM generate_series(1, 20000) g");
    pg.append_conf(&["idle_replication_slot_timeout = '1s'"]);
    pg.reload();
    // Checkpoints invalidate idle slots: one after another until this one
    // is (the event, not a guess at how long the timeout takes).
    let invalidated = wait_until(Duration::from_secs(60), || {
        pg.psql("CHECKPOINT");
        pg.psql("SELECT invalidation_reason FROM pg_replication_slots WHERE slot_name = 'walsafe'")
            == "idle_timeout"
    });
    assert!(invalidated, "the slot should have been invalidated");
    pg.append_conf(&["idle_replication_slot_timeout = 0"]);
    pg.reload();

    let agent = Agent::start(&config, settings.metrics_port);
    pg.psql("INSERT INTO t VALUES ('after the invalidation')");
    let end = current_lsn(&pg);
    agent.wait_archived(end, Duration::from_secs(60));
    assert_eq!(
        agent.gauge("walsafe_archive_gaps"),
        0.0,
        "log:\n{}",
        agent.log()
    );
    assert_no_gap(&agent, &settings.spool, &config);
    assert_eq!(
        pg.psql(
            "SELECT wal_status <> 'lost' AND invalidation_reason IS NULL FROM pg_replication_slots WHERE slot_name = 'walsafe'"
        ),
        "t"
    );

    // Nothing dropped, proven against the server itself: every complete
    // segment in the repository is the server's pg_wal file (wal_keep_size
    // keeps them all), and a restore holds every row.
    let stored = complete_segments(&dir.join("repo").join("wal"));
    assert!(stored.len() >= 2, "{stored:?}");
    assert_served_as(
        &config,
        &pg.datadir().join("pg_wal"),
        &stored,
        &dir.subdir("work"),
    );
    let restored = restore_promoted(
        &backup,
        dir.path(),
        &config,
        &[],
        "restore across the invalidation",
    );
    assert_eq!(restored.psql("SELECT count(*) FROM t"), "21001");
    assert_eq!(
        restored.psql("SELECT count(*) FROM t WHERE pad = 'after the invalidation'"),
        "1"
    );
}
