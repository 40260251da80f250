//! `walsafe restore DIR` against a real PostgreSQL 15 and a `file://`
//! repository: a backup restored to a point in time (with its tablespace
//! moved by `--tablespace-map`) holds exactly the rows committed before
//! the target; wrong requests are refused with the reason, nothing
//! touched.

mod common;

use std::time::Duration;

use common::pg::{PgOptions, RecoveryOutcome, TestDir};
use common::setup::{current_lsn, setup};
use common::walsafe::{walsafe, Agent};

fn text(o: &std::process::Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

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
