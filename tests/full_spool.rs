//! A full spool is a state walsafe waits out (rules 2 and 8): it stops
//! reading the socket, keeps the replication connection alive, keeps
//! uploading, alarms, and goes on by itself once uploads free room. Never
//! an exit, never a dropped byte.
//!
//! The spool lives on a real small filesystem (a tmpfs the test mounts),
//! and the repository on another one that the test fills, so that uploads
//! fail (storage "down") until the test frees it.

mod common;

use std::time::{Duration, Instant};

use common::pg::{PgCluster, PgOptions, TestDir};
use common::setup::{current_lsn, write_wal};
use common::tmpfs::TmpFs;
use common::walsafe::{
    assert_no_gap, assert_served_as, restore_promoted, wait_until, Agent, Settings,
};

const MB: u64 = 1 << 20;

/// Runs the scenario with `settings` adjusted by `limits` (the spool's
/// own limits, or none to meet ENOSPC for real).
fn spool_fills_waits_and_drains(name: &str, spool_fs_size: &str, limits: impl Fn(&mut Settings)) {
    let pg = PgCluster::start(
        &PgOptions {
            name: name.into(),
            ..Default::default()
        }
        .segsize_mb(1)
        // walsafe must keep talking while it does not read: a short
        // timeout proves it does.
        .conf("wal_sender_timeout = '5s'"),
    );
    let dir = TestDir::new(name);
    let spool_fs = TmpFs::mount(&dir.join("spool-fs"), spool_fs_size);
    let repo_fs = TmpFs::mount(&dir.join("repo-fs"), "64m");
    let mut settings = Settings::new(dir.path(), &pg.conninfo());
    settings.spool = spool_fs.path().join("spool");
    settings.repo_url = format!("file://{}", repo_fs.path().join("repo").display());
    limits(&mut settings);
    let config = settings.write(&dir.join("walsafe.toml"));
    // The independent reference: pg_receivewal on its own slot.
    pg.psql("SELECT pg_create_physical_replication_slot('recv', true)");
    let recv_dir = dir.subdir("receivewal");
    let mut recv = pg.spawn_pg_receivewal_opts(&recv_dir, Some("recv"), false);
    let mut agent = Agent::start(&config, settings.metrics_port);
    pg.psql("CREATE TABLE t (pad text)");
    let backup = dir.join("backup");
    pg.base_backup(&backup, "none");
    agent.wait_archived(current_lsn(&pg), Duration::from_secs(30));

    // Storage down: its disk is full, every upload fails.
    let filler = repo_fs.fill();
    write_wal(&pg, 12);
    let end = current_lsn(&pg);
    assert!(
        wait_until(Duration::from_secs(60), || agent
            .gauge("walsafe_spool_full")
            == 1.0),
        "the spool never reported itself full; log:\n{}",
        agent.log()
    );
    assert!(agent.log().contains("SPOOL FULL"), "log:\n{}", agent.log());
    // Longer than wal_sender_timeout: still alive, still connected.
    std::thread::sleep(Duration::from_secs(8));
    assert!(agent.is_running(), "walsafe exited; log:\n{}", agent.log());
    assert_eq!(
        agent.gauge("walsafe_replication_connected"),
        1.0,
        "log:\n{}",
        agent.log()
    );
    assert_eq!(
        agent.gauge("walsafe_reconnects_total"),
        0.0,
        "the server timed the connection out; log:\n{}",
        agent.log()
    );
    assert_eq!(
        pg.psql("SELECT count(*) FROM pg_stat_replication WHERE application_name = 'walsafe'"),
        "1"
    );
    assert!(
        agent.gauge("walsafe_flushed_lsn_bytes") < end as f64,
        "everything fit: the test did not fill the spool"
    );

    // Storage back: the backlog drains, the spool takes WAL again, nothing lost.
    let freed = Instant::now();
    std::fs::remove_file(&filler).unwrap();
    agent.wait_archived(end, Duration::from_secs(120));
    assert_eq!(agent.gauge("walsafe_spool_full"), 0.0);
    assert!(agent.log().contains("room again"), "log:\n{}", agent.log());
    let first = agent.first_log_line("SPOOL FULL");
    eprintln!(
        "REPORT {name}: drained {} MiB in {:.1} s after storage came back; peak RSS {} KiB; first log line: {first}",
        end / MB,
        freed.elapsed().as_secs_f64(),
        agent.peak_rss_kib(),
    );
    assert_no_gap(&agent, &settings.spool, &config);

    // Nothing dropped, proven without walsafe's own bookkeeping: every
    // complete segment pg_receivewal wrote is served byte for byte, and a
    // restore holds every row.
    pg.psql("INSERT INTO t VALUES ('the last commit')");
    pg.psql("SELECT pg_switch_wal()");
    let last = current_lsn(&pg);
    agent.wait_archived(last, Duration::from_secs(60));
    let names = common::walsafe::stop_receivewal_past(&mut recv, &recv_dir, end, MB);
    assert_served_as(&config, &recv_dir, &names, &dir.subdir("work"));
    let restored = restore_promoted(
        &backup,
        dir.path(),
        &config,
        &["recovery_target_timeline = 'latest'"],
        "restore after the full spool",
    );
    assert_eq!(
        restored.psql("SELECT count(*) FROM filler"),
        pg.psql("SELECT count(*) FROM filler")
    );
    assert_eq!(restored.psql("SELECT pad FROM t"), "the last commit");
    drop(agent);
}

#[test]
fn a_full_disk_under_the_spool_is_waited_out() {
    // 6 MiB: a few 1 MiB segments, then ENOSPC for real.
    spool_fills_waits_and_drains("full-disk", "6m", |s| {
        s.spool_min_free = Some("0".into());
    });
}

#[test]
fn the_spool_s_max_size_is_waited_out_like_a_full_disk() {
    spool_fills_waits_and_drains("max-size", "64m", |s| {
        s.spool_max_size = Some("4MB".into());
        s.spool_min_free = Some("0".into());
    });
}
