//! `walsafe wal-push` as PostgreSQL's `archive_command`, through a whole
//! life of a cluster: a base backup (backup history file), load, the
//! promotion of a standby (history file, the old timeline's `.partial` with
//! a recycled tail), a second promotion; every file PostgreSQL hands over
//! must be accepted (pg_stat_archiver.failed_count stays 0 and archiving
//! catches up), and a restore from the repository with
//! recovery_target_timeline = 'latest' reaches the last commit.

mod common;

use std::path::Path;
use std::time::Duration;

use common::pg::{PgCluster, PgOptions, TestDir};
use common::setup::{current_lsn, parse_lsn, write_wal};
use common::walsafe::{bin_copy, restore_promoted, wait_until, walsafe, Settings};

/// postgresql.conf lines that archive through `walsafe wal-push`.
fn archive_conf(dir: &Path, config: &Path) -> Vec<String> {
    vec![
        "archive_mode = on".into(),
        format!(
            "archive_command = '{} --config {} wal-push %p'",
            bin_copy(dir).display(),
            config.display()
        ),
        "archive_timeout = 0".into(),
    ]
}

/// Asserts that nothing failed to archive and that the archiver has
/// archived `segment` (or something later).
fn wait_archived(pg: &PgCluster, segment: &str, what: &str) {
    let ok = wait_until(Duration::from_secs(60), || {
        pg.try_psql(&format!(
            "SELECT coalesce(last_archived_wal, '') >= '{segment}' FROM pg_stat_archiver"
        ))
        .as_deref()
            == Ok("t")
    });
    let stats =
        pg.psql("SELECT failed_count, last_failed_wal, last_archived_wal FROM pg_stat_archiver");
    assert!(
        ok,
        "{what}: {segment} was not archived in time ({stats})\nserver log:\n{}",
        pg.log_tail()
    );
    assert_failed_none(pg, what);
}

fn assert_failed_none(pg: &PgCluster, what: &str) {
    let stats =
        pg.psql("SELECT failed_count, last_failed_wal, last_archived_wal FROM pg_stat_archiver");
    assert!(
        stats.starts_with("0|"),
        "{what}: archive_command failed (failed_count|last_failed_wal|last_archived_wal = {stats})\nserver log:\n{}",
        pg.log_tail()
    );
}

/// Asserts that the server never logged a failed archive_command (its log
/// outlives it: this also covers a server that was stopped).
fn assert_no_archive_failure_logged(pg: &PgCluster, what: &str) {
    let failures: Vec<String> = pg
        .log()
        .lines()
        .filter(|l| l.contains("archive command failed") || l.contains("walsafe: "))
        .map(str::to_string)
        .collect();
    assert!(
        failures.is_empty(),
        "{what}: archive_command failed:\n{}",
        failures.join("\n")
    );
}

/// Switches to a new segment and returns the name of the one just closed.
fn switch(pg: &PgCluster) -> String {
    pg.psql("SELECT pg_walfile_name(pg_switch_wal())")
}

/// Simulates what WAL recycling leaves in a segment file: from the page
/// after `end` (the end of WAL) on, the bytes of an older segment of the
/// same cluster, whose page addresses are not this segment's. Only bytes
/// past the end of WAL are touched (the server is stopped or only reads
/// up to `end`).
fn recycle_tail(pg: &PgCluster, tli: u32, end: u64) {
    let seg_size = pg.segment_size();
    let segno = end / seg_size;
    let name = common::setup::segment_name(tli, segno);
    let older = std::fs::read_dir(pg.datadir().join("pg_wal"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.len() == 24 && *n < name)
        .max()
        .expect("an older segment in pg_wal");
    let old = std::fs::read(pg.wal_file(&older)).unwrap();
    let path = pg.wal_file(&name);
    let mut data = std::fs::read(&path).unwrap();
    let from = ((end % seg_size) / 8192 + 1) as usize * 8192;
    assert!(from < data.len(), "no room after the end of WAL in {name}");
    data[from..].copy_from_slice(&old[from..]);
    std::fs::write(&path, data).unwrap();
}

/// Stops `old` (the primary, cleanly) once `standby` has replayed all of
/// it; gives the recycled tail to the segment the timeline ends in; then
/// promotes `standby`.
fn fail_over(old: &PgCluster, standby: &PgCluster, tli: u32) {
    let end = current_lsn(old);
    old.stop_fast();
    // The shutdown checkpoint is the last record: wait for the standby to
    // have replayed past `end`.
    assert!(
        wait_until(Duration::from_secs(30), || {
            standby
                .try_psql("SELECT pg_last_wal_replay_lsn()")
                .map(|l| parse_lsn(&l) > end)
                .unwrap_or(false)
        }),
        "the standby did not catch up"
    );
    let replayed = parse_lsn(&standby.psql("SELECT pg_last_wal_replay_lsn()"));
    recycle_tail(standby, tli, replayed);
    standby.promote();
    standby.wait_for("SELECT pg_is_in_recovery()", "f", Duration::from_secs(30));
}

#[test]
fn wal_push_archives_a_whole_life_with_backups_and_promotions() {
    let dir = TestDir::new("push-life");
    let settings = Settings::new(dir.path(), "host=/nonexistent");
    let config = settings.write(&dir.join("walsafe.toml"));
    let mut opts = PgOptions {
        name: "push-life".into(),
        ..Default::default()
    };
    for l in archive_conf(dir.path(), &config) {
        opts = opts.conf(l);
    }
    let primary = PgCluster::start(&opts);
    primary.psql("CREATE TABLE life (step text)");
    primary.psql("INSERT INTO life VALUES ('before the backup')");

    // A base backup: PostgreSQL archives a backup history file.
    let backup = dir.join("backup");
    primary.base_backup(&backup, "stream");
    for e in std::fs::read_dir(backup.join("pg_wal")).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::remove_file(e.path()).unwrap();
        }
    }
    write_wal(&primary, 3);
    primary.psql("INSERT INTO life VALUES ('on timeline 1')");
    let closed = switch(&primary);
    wait_archived(&primary, &closed, "timeline 1");
    let repo = dir.join("repo");
    let backups: Vec<String> = std::fs::read_dir(repo.join("wal"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".backup"))
        .collect();
    assert_eq!(backups.len(), 1, "the backup history file is stored");
    // ... and served back as PostgreSQL wrote it (exit 1 would claim it
    // absent while the repository holds it).
    let fetched = dir.join("fetched.backup");
    let f = walsafe(
        &config,
        &["wal-fetch", &backups[0], fetched.to_str().unwrap()],
    );
    assert_eq!(
        f.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&f.stderr)
    );
    assert_eq!(
        std::fs::read(&fetched).unwrap(),
        std::fs::read(primary.wal_file(&backups[0])).unwrap()
    );

    // First promotion: a standby becomes timeline 2 and archives too.
    let standby = primary.create_standby();
    write_wal(&primary, 2);
    primary.psql("INSERT INTO life VALUES ('last on timeline 1')");
    let closed = switch(&primary);
    wait_archived(&primary, &closed, "timeline 1 before the failover");
    primary.psql("INSERT INTO life VALUES ('in the partial of timeline 1')");
    fail_over(&primary, &standby, 1);
    assert_eq!(
        standby.psql("SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)"),
        "00000002"
    );
    standby.psql("INSERT INTO life VALUES ('on timeline 2')");
    write_wal(&standby, 2);
    let closed = switch(&standby);
    wait_archived(&standby, &closed, "timeline 2");
    assert!(repo.join("wal/00000002.history").exists());
    let partials = |tli: &str| {
        std::fs::read_dir(repo.join("wal"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(tli) && n.ends_with(".partial"))
            .count()
    };
    assert_eq!(partials("00000001"), 1, "timeline 1's .partial is stored");

    // Second promotion: a standby of timeline 2 becomes timeline 3.
    let standby2 = standby.create_standby();
    standby.psql("INSERT INTO life VALUES ('last on timeline 2')");
    fail_over(&standby, &standby2, 2);
    assert_eq!(
        standby2.psql("SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)"),
        "00000003"
    );
    standby2.psql("INSERT INTO life VALUES ('on timeline 3')");
    write_wal(&standby2, 1);
    standby2.psql("INSERT INTO life VALUES ('the last commit')");
    let closed = switch(&standby2);
    wait_archived(&standby2, &closed, "timeline 3");
    assert!(repo.join("wal/00000003.history").exists());
    assert_eq!(partials("00000002"), 1, "timeline 2's .partial is stored");
    // Over the whole life, on every server (the first two are stopped by
    // now: their logs say what their archivers did up to the end).
    for (pg, what) in [
        (&primary, "the original primary"),
        (&standby, "the first promoted"),
        (&standby2, "the second promoted"),
    ] {
        assert_no_archive_failure_logged(pg, what);
    }
    assert_failed_none(&standby2, "second promoted");

    // The repository is consistent, and a restore follows every timeline
    // to the last commit.
    let v = walsafe(&config, &["wal-verify"]);
    assert_eq!(
        v.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    let restored = restore_promoted(
        &backup,
        dir.path(),
        &config,
        &["recovery_target_timeline = 'latest'"],
        "restore through two promotions",
    );
    assert_eq!(
        restored.psql("SELECT count(*) FROM life WHERE step = 'the last commit'"),
        "1",
        "{}",
        restored.log_tail()
    );
    assert_eq!(restored.psql("SELECT count(*) FROM life"), "8");
}

/// A standby promoted into a repository nobody has written to yet: the
/// first file it archives is the new timeline's history file.
#[test]
fn wal_push_of_a_history_file_pins_a_fresh_repository() {
    let primary = PgCluster::start(&PgOptions {
        name: "push-fresh".into(),
        ..Default::default()
    });
    primary.psql("CREATE TABLE t (v text)");
    primary.psql("INSERT INTO t VALUES ('x')");
    let standby = primary.create_standby();
    let dir = TestDir::new("push-fresh");
    let settings = Settings::new(dir.path(), "host=/nonexistent");
    let config = settings.write(&dir.join("walsafe.toml"));
    let lines = archive_conf(dir.path(), &config);
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    standby.append_conf(&lines);
    standby.stop_fast();
    standby.start_again();
    standby.wait_for("SELECT pg_is_in_recovery()", "t", Duration::from_secs(30));
    primary.stop_fast();
    standby.promote();
    standby.wait_for("SELECT pg_is_in_recovery()", "f", Duration::from_secs(30));
    standby.psql("INSERT INTO t VALUES ('y')");
    let closed = switch(&standby);
    wait_archived(&standby, &closed, "promoted into a fresh repository");
    let repo = dir.join("repo");
    assert!(repo.join("wal/00000002.history").exists());
    let descriptor = std::fs::read_to_string(repo.join("walsafe.repo")).unwrap();
    assert!(
        descriptor.contains(&standby.system_identifier().to_string()),
        "pinned to this cluster: {descriptor}"
    );
}
