//! `walsafe drill` against a real PostgreSQL 15 and a `file://`
//! repository: a drill on a healthy repository passes, counts every row,
//! reports an RTO, stores its result (shown by `walsafe status` and the
//! agent's metrics) and leaves no copy behind; with a damaged WAL object
//! it fails naming that object, and the failure is stored too.

mod common;

use std::time::Duration;

use common::pg::{PgOptions, TestDir};
use common::setup::{current_lsn, output_text as text, setup};
use common::walsafe::{walsafe, Agent};

#[test]
fn a_drill_proves_the_backup_restores_and_a_damaged_segment_fails_it() {
    let s = setup("drill", PgOptions::default());
    let agent = Agent::start(&s.config, s.settings.metrics_port);
    s.pg.psql("CREATE TABLE t (batch int)");
    s.pg.psql("INSERT INTO t SELECT 1 FROM generate_series(1, 1000)");
    let o = walsafe(&s.config, &["backup"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    s.pg.psql("SELECT pg_switch_wal()");
    s.pg.psql("CREATE DATABASE other");
    s.pg.psql("INSERT INTO t SELECT 2 FROM generate_series(1, 234)");
    let after = s.pg.psql("SELECT pg_walfile_name(pg_current_wal_lsn())");
    s.pg.psql("SELECT pg_switch_wal()");
    agent.wait_archived(current_lsn(&s.pg), Duration::from_secs(60));

    let parent = TestDir::new("drill-copies");
    let o = walsafe(
        &s.config,
        &["drill", "--dir", parent.path().to_str().unwrap()],
    );
    let out = String::from_utf8_lossy(&o.stdout);
    eprintln!("DRILL REPORT:\n{out}");
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(out.contains("drill PASSED") && out.contains("RTO"), "{out}");
    // Every row committed before the end of the archive, in every database.
    assert!(out.contains("postgres: 1 tables, 1234 rows"), "{out}");
    assert!(out.contains("other: 0 tables, 0 rows"), "{out}");
    assert_eq!(
        std::fs::read_dir(parent.path()).unwrap().count(),
        0,
        "the drill's copy is removed"
    );
    // A query of one's own, as JSON.
    let o = walsafe(
        &s.config,
        &[
            "drill",
            "--dir",
            parent.path().to_str().unwrap(),
            "--query",
            "SELECT batch, count(*) FROM t GROUP BY 1 ORDER BY 1",
            "--json",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["success"], true, "{r}");
    assert_eq!(r["result"], serde_json::json!(["1\t1000", "2\t234"]), "{r}");
    assert!(r["rto_seconds"].as_f64().unwrap() > 0.0, "{r}");
    assert!(r["replayed_bytes"].as_u64().unwrap() > 0, "{r}");

    // Status and the running agent's gauges show it: the drill noted the
    // change in the spool, and the agent looked again (it lists the
    // repository on its own only hourly).
    let o = walsafe(&s.config, &["status"]);
    let status = String::from_utf8_lossy(&o.stdout);
    assert!(status.contains("passed: backup"), "{status}");
    assert!(common::walsafe::wait_until(Duration::from_secs(15), || {
        agent.gauge("walsafe_last_drill_success_timestamp_seconds") > 0.0
    }));
    assert!(agent.gauge("walsafe_last_drill_rto_seconds") > 0.0);

    // A damaged segment after the backup: the drill fails naming it.
    let object = s.dir.join("repo/wal").join(&after);
    let mut bytes = std::fs::read(&object).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&object, bytes).unwrap();
    let o = walsafe(
        &s.config,
        &["drill", "--dir", parent.path().to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("FAILED") && err.contains(&after), "{err}");
    assert_eq!(std::fs::read_dir(parent.path()).unwrap().count(), 0);
    let o = walsafe(&s.config, &["status"]);
    let status = String::from_utf8_lossy(&o.stdout);
    assert!(
        status.contains("FAILED") && status.contains("last passed"),
        "{status}"
    );
}
