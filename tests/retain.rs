//! `walsafe retain` against a real PostgreSQL 15 and a `file://`
//! repository: three backups over a timeline switch, a window that holds
//! the newest only; the dry run deletes nothing, `--keep` holds the older
//! ones, an `--apply` that crashes midway leaves every kept backup
//! restorable, the next run finishes the job, and afterwards a restore to
//! the window's first instant and one to the end of the archive both hold
//! exactly their rows.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::pg::{PgOptions, TestDir};
use common::setup::{current_lsn, output_text as text, setup};
use common::timeline::{batches_after, Timeline2};
use common::walsafe::{bin_copy, walsafe, Agent};

/// `walsafe retain ARGS…` with the failpoints in `failpoints` set.
fn retain(config: &Path, args: &[&str], failpoints: Option<&str>) -> Output {
    let mut cmd = std::process::Command::new(bin_copy(config.parent().unwrap()));
    common::pg::as_postgres(&mut cmd);
    cmd.arg("--config").arg(config).arg("retain").args(args);
    if let Some(f) = failpoints {
        cmd.env("FAILPOINTS", f);
    }
    common::walsafe::retry_text_busy(|| cmd.output()).unwrap()
}

/// The backups listed: (name, complete, start time).
fn backups(config: &Path) -> Vec<(String, bool, String)> {
    let o = walsafe(config, &["backup-list", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_string(),
                b["complete"].as_bool().unwrap_or(false),
                b["start_time"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// Every file under `dir`, relative.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path().strip_prefix(dir).unwrap().to_path_buf());
            }
        }
    }
    out.sort();
    out
}

/// Seconds from `start` (RFC 3339) to now, plus one: a window that
/// begins just before that start.
fn window_from(start: &str) -> String {
    let t = chrono::DateTime::parse_from_rfc3339(start).unwrap();
    let secs = (chrono::Utc::now() - t.with_timezone(&chrono::Utc)).num_seconds() + 1;
    format!("{secs}s")
}

#[test]
#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "needs the failpoints feature: run scripts/test.sh, or cargo test --features failpoints"
)]
fn retention_keeps_every_instant_of_the_window_restorable_even_when_stopped_midway() {
    let s = setup("retain", PgOptions::default());
    let agent = Agent::start(&s.config, s.settings.metrics_port);
    s.pg.psql("CREATE TABLE t (batch int)");
    s.pg.psql("INSERT INTO t VALUES (1)");
    let o = walsafe(&s.config, &["backup"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    // Enough WAL between the backups for segments that only the oldest needs.
    for _ in 0..3 {
        s.pg.psql("SELECT pg_switch_wal()");
        s.pg.psql("INSERT INTO t SELECT 2 WHERE false");
    }
    std::thread::sleep(Duration::from_millis(2100));
    s.pg.psql("INSERT INTO t VALUES (2)");
    let o = walsafe(&s.config, &["backup"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let anchor = backups(&s.config)[0].0.clone();
    s.pg.psql("INSERT INTO t VALUES (3)");
    let fork = s.pg.psql("SELECT pg_current_wal_lsn()");
    s.pg.psql("SELECT pg_switch_wal()");
    agent.wait_archived(current_lsn(&s.pg), Duration::from_secs(60));
    drop(agent);
    s.pg.stop_fast();

    // Timeline 2: the anchor recovered to `fork` and promoted, archived
    // by a second agent into the same repository.
    let work = TestDir::new("retain-out");
    let tl2 = Timeline2::promote(&s, &work, None, &fork);
    tl2.psql("INSERT INTO t VALUES (4)");
    std::thread::sleep(Duration::from_millis(3100));
    let o = walsafe(tl2.config(), &["backup"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    tl2.psql("INSERT INTO t VALUES (5)");
    tl2.switch_and_archive();
    let listed = backups(&s.config);
    assert_eq!(listed.len(), 3, "{listed:?}");
    let (newest, oldest) = (listed[0].clone(), listed[2].0.clone());
    assert_eq!(listed[1].0, anchor);
    let repo = s.dir.join("repo");
    let before = files(&repo);

    // A dry run deletes nothing, and names the oldest backup.
    let o = retain(&s.config, &["--window", &window_from(&newest.2)], None);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    eprintln!("DRY RUN:\n{out}");
    assert!(out.contains("dry run") && out.contains(&oldest), "{out}");
    assert!(out.contains("the newest backup before the window"), "{out}");
    assert_eq!(files(&repo), before, "a dry run deleted something");
    // --keep 3 holds all three.
    let o = retain(
        &s.config,
        &["--window", &window_from(&newest.2), "--keep", "3", "--json"],
        None,
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let plan: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(plan["kept"].as_array().unwrap().len(), 3, "{plan}");
    assert!(plan["deleted_backups"].as_array().unwrap().is_empty());

    // An --apply that crashes after five deletions (the oldest backup's
    // record and parts, then the first WAL).
    let o = retain(
        &s.config,
        &["--window", &window_from(&newest.2), "--apply"],
        Some("retain::delete=5*off->panic"),
    );
    assert_ne!(o.status.code(), Some(0), "{}", text(&o));
    let after_crash = files(&repo);
    assert!(after_crash.len() < before.len() && !after_crash.is_empty());
    let listed = backups(&s.config);
    assert!(
        listed
            .iter()
            .all(|(n, complete, _)| *n == oldest || *complete),
        "{listed:?}"
    );
    assert!(
        !listed
            .iter()
            .any(|(n, complete, _)| *n == oldest && *complete),
        "the oldest backup lost its record first: {listed:?}"
    );
    let o = walsafe(&s.config, &["wal-verify"]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "no hole in the archive: {}",
        text(&o)
    );
    // The kept backups restore: the anchor to the window's first instant.
    let first_instant = {
        let w = window_from(&newest.2);
        let secs: i64 = w.trim_end_matches('s').parse().unwrap();
        (chrono::Utc::now() - chrono::Duration::seconds(secs))
            .format("%Y-%m-%d %H:%M:%S+00")
            .to_string()
    };
    assert_eq!(
        batches_after(&s.config, &["--target-time", &first_instant]),
        "1,2,3,4"
    );

    // The next run finishes the job.
    let o = retain(
        &s.config,
        &["--window", &window_from(&newest.2), "--apply"],
        None,
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let listed = backups(&s.config);
    assert_eq!(
        listed.iter().map(|b| b.0.clone()).collect::<Vec<_>>(),
        vec![newest.0.clone(), anchor.clone()]
    );
    assert!(
        !files(&repo)
            .iter()
            .any(|f| f.starts_with(format!("backups/{oldest}"))),
        "the oldest backup is gone"
    );
    // Nothing older than the anchor's first segment is left on timeline 1.
    let anchor_first = {
        let o = walsafe(&s.config, &["backup-list", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v[1]["wal_first"].as_str().unwrap().to_string()
    };
    let old_wal: Vec<_> = files(&repo)
        .into_iter()
        .filter_map(|f| {
            let n = f.strip_prefix("wal").ok()?.to_string_lossy().into_owned();
            (n.len() >= 24 && n.starts_with("00000001") && n[..24] < anchor_first[..]).then_some(n)
        })
        .collect();
    assert!(
        old_wal.is_empty(),
        "left before {anchor_first}: {old_wal:?}"
    );
    let o = retain(&s.config, &["--window", &window_from(&newest.2)], None);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("deletes no backup") && out.contains("WAL: deletes 0 objects"),
        "{out}"
    );
    assert_eq!(batches_after(&s.config, &[]), "1,2,3,4,5");
    assert_eq!(
        batches_after(&s.config, &["--target-time", &first_instant]),
        "1,2,3,4"
    );
}

/// On S3 (moto), encrypted: two backups and a window of one second that
/// began after both, so the newer anchors it; the dry run lists the older
/// and its WAL, `--apply` deletes them, and a drill of what is left
/// passes.
#[test]
fn on_s3_retention_deletes_the_older_backup_and_a_drill_still_passes() {
    let s3 = common::s3::S3Server::start();
    let s = common::setup::setup_s3("retain-s3", PgOptions::default(), &s3, "retain");
    let config = s.config.clone();
    let agent = Agent::start(&config, s.settings.metrics_port);
    s.pg.psql("CREATE TABLE t (batch int)");
    s.pg.psql("INSERT INTO t VALUES (1)");
    let o = walsafe(&config, &["backup"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    for _ in 0..3 {
        s.pg.psql("SELECT pg_switch_wal()");
        s.pg.psql("INSERT INTO t SELECT 1 WHERE false");
    }
    std::thread::sleep(Duration::from_millis(2100));
    s.pg.psql("INSERT INTO t VALUES (2)");
    let o = walsafe(&config, &["backup"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    s.pg.psql("INSERT INTO t VALUES (3)");
    s.pg.psql("SELECT pg_switch_wal()");
    agent.wait_archived(current_lsn(&s.pg), Duration::from_secs(60));
    let listed = backups(&config);
    let (newer, older) = (listed[0].clone(), listed[1].0.clone());
    std::thread::sleep(Duration::from_millis(2100));
    let o = retain(&config, &["--window", "1s", "--keep", "1", "--json"], None);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let plan: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let doomed = plan["deleted_backups"].as_array().unwrap();
    assert_eq!(doomed.len(), 1, "{plan}");
    assert_eq!(doomed[0]["name"], older.as_str());
    let wal = plan["deleted_wal"].as_array().unwrap();
    assert!(
        wal.len() >= 3,
        "the segments only the older backup needed: {plan}"
    );
    assert_eq!(backups(&config).len(), 2, "a dry run deletes nothing");

    let o = retain(&config, &["--window", "1s", "--apply"], None);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(
        backups(&config)
            .into_iter()
            .map(|b| b.0)
            .collect::<Vec<_>>(),
        vec![newer.0.clone()]
    );
    let o = walsafe(&config, &["wal-verify"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let copies = TestDir::new("retain-s3-drill");
    let o = walsafe(
        &config,
        &["drill", "--dir", copies.path().to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("postgres: 1 tables, 3 rows"),
        "{}",
        text(&o)
    );
}

/// Nothing to anchor a window: an unpinned repository, then one with WAL
/// but no complete backup. Each refused with the reason, nothing deleted.
#[test]
fn retention_refuses_a_repository_without_a_descriptor_or_a_backup() {
    let s = setup("retain-refused", PgOptions::default());
    let o = retain(&s.config, &["--window", "1s", "--apply"], None);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("not pinned"), "{err}");
    let agent = Agent::start(&s.config, s.settings.metrics_port);
    s.pg.psql("SELECT pg_switch_wal()");
    s.pg.psql("CREATE TABLE t (batch int)");
    s.pg.psql("SELECT pg_switch_wal()");
    agent.wait_archived(current_lsn(&s.pg), Duration::from_secs(60));
    drop(agent); // nothing else writes to the repository from here on
    let before = files(&s.dir.join("repo"));
    let o = retain(&s.config, &["--window", "1s", "--apply"], None);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("no complete backup") && err.contains("walsafe backup"),
        "{err}"
    );
    assert_eq!(files(&s.dir.join("repo")), before);
}
