//! `walsafe restore DIR` against a real PostgreSQL 15 and a `file://`
//! repository: a backup restored to a point in time (with its tablespace
//! moved by `--tablespace-map`) holds exactly the rows committed before
//! the target; wrong requests are refused with the reason, nothing
//! touched.

mod common;

use std::time::Duration;

use common::pg::{PgOptions, RecoveryOutcome, TestDir};
use common::setup::{current_lsn, output_text as text, setup};
use common::timeline::{batches_after, psql_on, restore_started, StopOnDrop, Timeline2};
use common::walsafe::{walsafe, Agent};

#[test]
fn a_restore_to_a_time_holds_exactly_the_rows_before_it_and_wrong_requests_are_refused() {
    let s = setup("restore-time", PgOptions::default());
    let agent = Agent::start(&s.config, s.settings.metrics_port);
    let ts = s.dir.subdir("tablespace");
    s.pg.psql(&format!(
        "CREATE TABLESPACE extra LOCATION '{}'",
        ts.display()
    ));
    s.pg.psql("CREATE TABLE t (batch int) TABLESPACE extra");
    let before_backup = s.pg.psql("SELECT clock_timestamp()");
    std::thread::sleep(Duration::from_millis(1100)); // backups are stamped by the second
    s.pg.psql("INSERT INTO t SELECT 1 FROM generate_series(1, 100)");
    let o = walsafe(&s.config, &["backup"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    s.pg.psql("INSERT INTO t SELECT 2 FROM generate_series(1, 100)");
    let target = s.pg.psql("SELECT clock_timestamp()");
    s.pg.psql("INSERT INTO t SELECT 3 FROM generate_series(1, 100)");
    s.pg.psql("SELECT pg_switch_wal()");
    agent.wait_archived(current_lsn(&s.pg), Duration::from_secs(60));

    let work = TestDir::new("restore-time-out");
    let dir = work.join("data");
    let moved = work.join("ts-moved");
    let map = format!("{}={}", ts.display(), moved.display());

    // Refused: a target before every backup; DIR not even created.
    let o = walsafe(
        &s.config,
        &[
            "restore",
            dir.to_str().unwrap(),
            "--target-time",
            &before_backup,
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no backup can reach the target"),
        "{}",
        text(&o)
    );
    assert!(!dir.exists());

    // Refused: a non-empty directory, left as it was.
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("keep-me"), "x").unwrap();
    common::pg::chown_postgres(&dir);
    let o = walsafe(&s.config, &["restore", dir.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("is not empty"),
        "{}",
        text(&o)
    );
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    std::fs::remove_dir_all(&dir).unwrap();

    // The restore to the target, the tablespace moved.
    let o = walsafe(
        &s.config,
        &[
            "restore",
            dir.to_str().unwrap(),
            "--target-time",
            &target,
            "--target-action",
            "promote",
            "--tablespace-map",
            &map,
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("recovery_target_time"), "{out}");
    assert!(dir.join("recovery.signal").exists());
    let tablespace_map = std::fs::read_to_string(dir.join("tablespace_map")).unwrap();
    assert!(
        tablespace_map.contains(moved.to_str().unwrap()),
        "{tablespace_map}"
    );
    assert!(
        std::fs::read_dir(&moved).unwrap().count() > 0,
        "the tablespace was extracted"
    );

    let restored = common::pg::start_restore(&dir, &[]);
    assert_eq!(
        restored.wait_recovery_end(Duration::from_secs(120)),
        RecoveryOutcome::Promoted,
        "{}",
        restored.log_tail()
    );
    assert_eq!(
        restored.psql("SELECT string_agg(DISTINCT batch::text, ',' ORDER BY batch::text) FROM t"),
        "1,2",
        "exactly the rows committed before the target"
    );
}

/// Every kind of target, and the backup each one needs: an LSN between
/// two backups restores the older one; a restore point, an xid and the
/// end of the archive use the newer; `--target immediate` with
/// `--backup` stops at that backup's consistency. The newer backup is
/// taken under a write load, every committed row of it restored.
#[test]
fn every_target_kind_restores_exactly_its_rows_from_the_right_backup() {
    let s = setup("restore-kinds", PgOptions::default());
    let agent = Agent::start(&s.config, s.settings.metrics_port);
    s.pg.psql("CREATE TABLE t (batch int)");
    s.pg.psql("INSERT INTO t VALUES (1)");
    let o = walsafe(&s.config, &["backup"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let older = walsafe(&s.config, &["backup-list", "--json"]);
    let older: serde_json::Value = serde_json::from_slice(&older.stdout).unwrap();
    let older = older[0]["name"].as_str().unwrap().to_string();
    s.pg.psql("INSERT INTO t VALUES (2)");
    let lsn_2 = s.pg.psql("SELECT pg_current_wal_lsn()");
    std::thread::sleep(Duration::from_millis(1100)); // backups are named by the second
                                                     // The newer backup is taken under a write load: a session committing
                                                     // a row of batch 2 every millisecond (pages torn under the copy, put
                                                     // right by WAL), cancelled once the backup is done.
    let mut load = s.pg.bins().command("psql");
    load.args(["-XAtq", "-h"])
        .arg(s.pg.socket_dir())
        .args(["-p", &s.pg.port().to_string(), "-U", "postgres", "-c"])
        .arg("DO $$ BEGIN LOOP INSERT INTO t VALUES (2); COMMIT; PERFORM pg_sleep(0.001); END LOOP; END $$")
        .env("PGAPPNAME", "load")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut load = load.spawn().unwrap();
    s.pg.wait_for(
        "SELECT count(*) > 10 FROM t WHERE batch = 2",
        "t",
        Duration::from_secs(30),
    );
    let o = walsafe(&s.config, &["backup"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    s.pg.psql(
        "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE application_name = 'load'",
    );
    load.wait().unwrap();
    let loaded = s.pg.psql("SELECT count(*) FROM t WHERE batch = 2");
    assert!(loaded.parse::<u64>().unwrap() > 20, "{loaded} rows of load");
    let twos = format!("2×{loaded}");
    s.pg.psql("INSERT INTO t VALUES (3)");
    s.pg.psql("SELECT pg_create_restore_point('after three')");
    let xid =
        s.pg.psql("INSERT INTO t VALUES (4) RETURNING pg_current_xact_id()");
    s.pg.psql("INSERT INTO t VALUES (5)");
    s.pg.psql("SELECT pg_switch_wal()");
    agent.wait_archived(current_lsn(&s.pg), Duration::from_secs(60));

    assert_eq!(batches_after(&s.config, &["--target-lsn", &lsn_2]), "1,2");
    assert_eq!(
        batches_after(&s.config, &["--target-name", "after three"]),
        format!("1,{twos},3")
    );
    assert_eq!(
        batches_after(&s.config, &["--target-xid", &xid]),
        format!("1,{twos},3,4")
    );
    assert_eq!(
        batches_after(&s.config, &["--target", "immediate", "--backup", &older]),
        "1"
    );
    assert_eq!(batches_after(&s.config, &[]), format!("1,{twos},3,4,5"));

    // An explicit backup that ends after the target is refused.
    let newest = walsafe(&s.config, &["backup-list", "--json"]);
    let newest: serde_json::Value = serde_json::from_slice(&newest.stdout).unwrap();
    let newest = newest[0]["name"].as_str().unwrap().to_string();
    let work = TestDir::new("restore-refused");
    let o = walsafe(
        &s.config,
        &[
            "restore",
            work.join("data").to_str().unwrap(),
            "--backup",
            &newest,
            "--target-lsn",
            &lsn_2,
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("after the target LSN"),
        "{}",
        text(&o)
    );
    assert!(!work.join("data").exists());
}

/// The batches in `t` of the restored server listening on `port` (its
/// socket in the directory of the cluster it was backed up from).
fn batches_on_port(pg: &common::pg::PgCluster, port: u16) -> String {
    psql_on(
        pg,
        port,
        "SELECT string_agg(batch::text, ',' ORDER BY batch) FROM t",
    )
}

/// `--start`: the restored server is started, recovery followed to the
/// target, and where it stopped is reported with the measured RTO; a
/// target past the end of the archive exits 1 with the server's words.
#[test]
fn restore_start_recovers_to_the_target_and_reports_it() {
    let s = setup("restore-start", PgOptions::default());
    let agent = Agent::start(&s.config, s.settings.metrics_port);
    s.pg.psql("CREATE TABLE t (batch int)");
    s.pg.psql("INSERT INTO t VALUES (1)");
    let o = walsafe(&s.config, &["backup"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    s.pg.psql("INSERT INTO t VALUES (2)");
    let target = s.pg.psql("SELECT clock_timestamp()");
    s.pg.psql("INSERT INTO t VALUES (3)");
    s.pg.psql("SELECT pg_switch_wal()");
    agent.wait_archived(current_lsn(&s.pg), Duration::from_secs(60));

    let work = TestDir::new("restore-start-out");
    let dir = work.join("data");
    let (o, port, _stop) = restore_started(
        &s.pg,
        &s.config,
        &dir,
        &["--target-time", &target, "--target-action", "promote"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    eprintln!("REPORT walsafe restore --start:\n{out}");
    assert!(out.contains("recovery ended: promoted"), "{out}");
    assert!(out.contains("target reached: recovery stopping"), "{out}");
    assert!(out.contains("timeline 2") && out.contains("RTO"), "{out}");
    assert_eq!(batches_on_port(&s.pg, port), "1,2");

    // A target the archive does not reach (an hour from now): recovery
    // stops short, and walsafe exits 1 quoting the server's log.
    let later = s.pg.psql("SELECT now() + interval '1 hour'");
    let short = work.join("short");
    let o = walsafe(
        &s.config,
        &[
            "restore",
            short.to_str().unwrap(),
            "--target-time",
            &later,
            "--start",
            "--port",
            &common::walsafe::free_port().to_string(),
        ],
    );
    let _stop_short = StopOnDrop {
        dir: short.clone(),
        pg_ctl: s.pg.bins().program("pg_ctl"),
    };
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("recovery ended before configured recovery target was reached"),
        "{}",
        text(&o)
    );
}

/// A recorded gap after the backup: a restore that would have to cross it
/// is refused with the gap named (recovery would stop there); a target
/// before the gap, or `immediate`, is fine.
#[test]
fn a_restore_across_a_recorded_gap_is_refused() {
    let s = setup("restore-gap", PgOptions::default());
    let agent = Agent::start(&s.config, s.settings.metrics_port);
    s.pg.psql("CREATE TABLE t (batch int)");
    let o = walsafe(&s.config, &["backup"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    s.pg.psql("INSERT INTO t VALUES (1)");
    let before_gap = s.pg.psql("SELECT pg_current_wal_lsn()");
    s.pg.psql("SELECT pg_switch_wal()");
    s.pg.psql("INSERT INTO t VALUES (2)");
    agent.wait_archived(current_lsn(&s.pg), Duration::from_secs(60));
    // As if WAL after `before_gap` had been lost before it was archived.
    let from = common::setup::parse_lsn(&before_gap) + 8;
    let gap = walsafe::gap::Gap::new(
        walsafe::pg::TimelineId(1),
        walsafe::pg::Lsn(from),
        walsafe::pg::Lsn(from + (16 << 20)),
        "test: slot invalidated",
    );
    let cfg = walsafe::config::Config::load(&s.config).unwrap();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async {
            walsafe::repository::Repository::open(cfg.repository())
                .unwrap()
                .record_gap(&gap)
                .await
        })
        .unwrap();
    // Written as root: hand it to the user walsafe runs as.
    common::pg::chown_postgres(&s.dir.join("repo"));

    let work = TestDir::new("restore-gap-out");
    let restore = |name: &str, extra: &[&str]| {
        let dir = work.join(name);
        let mut args = vec!["restore", dir.to_str().unwrap()];
        args.extend_from_slice(extra);
        (walsafe(&s.config, &args), dir)
    };
    let (o, dir) = restore("to-the-end", &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("was lost before it was archived") && err.contains("recover_to_gap"),
        "{err}"
    );
    assert!(!dir.exists());
    let (o, _) = restore("before-the-gap", &["--target-lsn", &before_gap]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let (o, _) = restore("immediate", &["--target", "immediate"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

/// PostgreSQL 18, an encrypted S3 repository (moto): restored with
/// `--start` using 18's own programs, to the end of the archive.
#[test]
fn a_postgresql_18_backup_in_s3_restores_and_starts() {
    let s3 = common::s3::S3Server::start();
    let s = common::setup::setup_s3(
        "restore-18-s3",
        PgOptions::default().major(18),
        &s3,
        "restore-18",
    );
    let config = s.config.clone();
    let agent = Agent::start(&config, s.settings.metrics_port);
    s.pg.psql("CREATE TABLE t (batch int)");
    s.pg.psql("INSERT INTO t VALUES (1)");
    let o = walsafe(&config, &["backup"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    s.pg.psql("INSERT INTO t VALUES (2)");
    s.pg.psql("SELECT pg_switch_wal()");
    agent.wait_archived(current_lsn(&s.pg), Duration::from_secs(60));

    let work = TestDir::new("restore-18-out");
    let dir = work.join("data");
    let port = common::walsafe::free_port();
    let bindir =
        s.pg.bins()
            .program("pg_ctl")
            .parent()
            .unwrap()
            .to_path_buf();
    let o = walsafe(
        &config,
        &[
            "restore",
            dir.to_str().unwrap(),
            "--target-action",
            "promote",
            "--start",
            "--port",
            &port.to_string(),
            "--pg-bindir",
            bindir.to_str().unwrap(),
        ],
    );
    let _stop = StopOnDrop {
        dir: dir.clone(),
        pg_ctl: bindir.join("pg_ctl"),
    };
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("recovery ended: promoted"), "{out}");
    assert!(out.contains("recovered to the end of the archive"), "{out}");
    assert_eq!(batches_on_port(&s.pg, port), "1,2");
}

/// The name of the newest backup in the repository.
fn newest_backup(config: &std::path::Path) -> String {
    let o = walsafe(config, &["backup-list", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    list[0]["name"].as_str().unwrap().to_string()
}

/// Across a timeline switch: backup `before` on timeline 1, then a
/// restore of it to `fork` promoted onto timeline 2 (and archived there by
/// a second agent), while backup `after` on timeline 1 ended past `fork`.
/// A restore to timeline 2 (the default, latest) picks `before` — `after`
/// is newer but not on timeline 2's history — and reaches timeline 2's
/// rows; `--target-timeline 1` picks `after`; `--backup after` with the
/// latest timeline is refused, naming the branch point.
#[test]
fn a_restore_onto_a_later_timeline_picks_the_backup_on_its_history() {
    let s = setup("restore-timeline", PgOptions::default());
    let agent = Agent::start(&s.config, s.settings.metrics_port);
    s.pg.psql("CREATE TABLE t (batch int)");
    s.pg.psql("INSERT INTO t VALUES (1)");
    let o = walsafe(&s.config, &["backup"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let before = newest_backup(&s.config);
    let fork = s.pg.psql("SELECT pg_current_wal_lsn()");
    std::thread::sleep(Duration::from_millis(1100)); // backups are named by the second
    s.pg.psql("INSERT INTO t VALUES (2)");
    let o = walsafe(&s.config, &["backup"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let after = newest_backup(&s.config);
    s.pg.psql("INSERT INTO t VALUES (3)");
    s.pg.psql("SELECT pg_switch_wal()");
    agent.wait_archived(current_lsn(&s.pg), Duration::from_secs(60));
    drop(agent);
    s.pg.stop_fast();

    // Timeline 2: `before` recovered to `fork` and promoted, archived by
    // a second agent into the same repository.
    let work = TestDir::new("restore-timeline-out");
    let tl2 = Timeline2::promote(&s, &work, Some(&before), &fork);
    assert_eq!(tl2.psql("SELECT string_agg(batch::text, ',') FROM t"), "1");
    tl2.psql("INSERT INTO t VALUES (4)");
    tl2.switch_and_archive();

    assert_eq!(batches_after(&s.config, &[]), "1,4");
    assert_eq!(
        batches_after(&s.config, &["--target-timeline", "1"]),
        "1,2,3"
    );
    let refused = work.join("refused");
    let o = walsafe(
        &s.config,
        &["restore", refused.to_str().unwrap(), "--backup", &after],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("after timeline 2 branched off at") && err.contains(&after),
        "{err}"
    );
    assert!(!refused.exists());
}

/// A part altered in the repository (one byte of the last part of
/// `base.tar`): the restore fails naming the part, after the tablespace
/// and the first parts were already extracted, and leaves nothing behind
/// — neither `DIR` nor the mapped tablespace directory.
#[test]
fn an_altered_part_fails_the_restore_and_leaves_nothing_behind() {
    let s = setup("restore-altered", PgOptions::default());
    let agent = Agent::start(&s.config, s.settings.metrics_port);
    let ts = s.dir.subdir("tablespace");
    s.pg.psql(&format!(
        "CREATE TABLESPACE extra LOCATION '{}'",
        ts.display()
    ));
    s.pg.psql("CREATE TABLE t TABLESPACE extra AS SELECT g, md5(g::text) FROM generate_series(1, 100000) g");
    // Enough in base.tar for several 8 MiB parts.
    s.pg.psql("CREATE TABLE big AS SELECT g, repeat(md5(g::text), 8) pad FROM generate_series(1, 100000) g");
    let o = walsafe(&s.config, &["backup"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    agent.wait_archived(current_lsn(&s.pg), Duration::from_secs(60));
    let name = newest_backup(&s.config);
    let mut parts: Vec<_> = std::fs::read_dir(s.dir.join("repo/backups").join(&name))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("base.tar.")
        })
        .collect();
    parts.sort();
    assert!(parts.len() >= 3, "{parts:?}");
    let last = parts.last().unwrap();
    let mut bytes = std::fs::read(last).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(last, bytes).unwrap();

    let work = TestDir::new("restore-altered-out");
    let dir = work.join("data");
    let moved = work.join("ts-moved");
    let o = walsafe(
        &s.config,
        &[
            "restore",
            dir.to_str().unwrap(),
            "--tablespace-map",
            &format!("{}={}", ts.display(), moved.display()),
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    let part = last.file_name().unwrap().to_string_lossy();
    assert!(
        err.contains(part.as_ref()) && err.contains("altered or replaced"),
        "{err}"
    );
    assert!(err.contains("nothing was left in"), "{err}");
    assert!(!dir.exists(), "{dir:?} removed");
    assert!(!moved.exists(), "{moved:?} removed");
}

/// A cluster that keeps its configuration outside the data directory (as
/// Debian does in /etc/postgresql): its backup holds no postgresql.conf,
/// pg_hba.conf or pg_ident.conf. `walsafe restore --start` writes minimal
/// ones, says so, and the server recovers.
#[test]
fn a_backup_without_configuration_files_restores_and_starts() {
    let s = setup("restore-noconf", PgOptions::default());
    let agent = Agent::start(&s.config, s.settings.metrics_port);
    s.pg.psql("CREATE TABLE t (batch int)");
    s.pg.psql("INSERT INTO t VALUES (1)");
    // The running server has read them; the backup will not find them.
    for f in ["postgresql.conf", "pg_hba.conf", "pg_ident.conf"] {
        std::fs::remove_file(s.pg.datadir().join(f)).unwrap();
    }
    let o = walsafe(&s.config, &["backup"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    s.pg.psql("INSERT INTO t VALUES (2)");
    s.pg.psql("SELECT pg_switch_wal()");
    agent.wait_archived(current_lsn(&s.pg), Duration::from_secs(60));

    let work = TestDir::new("restore-noconf-out");
    let dir = work.join("data");
    let (o, _, _stop) = restore_started(&s.pg, &s.config, &dir, &["--target-action", "promote"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("postgresql.conf, pg_hba.conf, pg_ident.conf"),
        "{err}"
    );
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("recovery ended: promoted"),
        "{}",
        text(&o)
    );
    let hba = std::fs::read_to_string(dir.join("pg_hba.conf")).unwrap();
    assert!(hba.contains("local all all peer"), "{hba}");
}
