//! Every supported PostgreSQL major, end to end: a real server of 13, 14,
//! 15, 16, 17 and 18 streamed by `walsafe run`, every complete segment
//! fetched back with `walsafe wal-fetch` and compared byte for byte with
//! the server's own `pg_wal` file (and with `pg_receivewal`'s where the
//! major ships it), then a base backup restored with `wal-fetch` as
//! `restore_command` up to the last commit.
//!
//! 15 comes from the distribution; the others from the cache that
//! `scripts/install-pg-versions.sh` fills (scripts/test.sh runs it when
//! something is missing). A major that is not installed fails its test
//! with the command to run; it is never skipped.

mod common;

use std::path::Path;
use std::time::Duration;

use common::pg::{PgBins, PgCluster, PgOptions};
use common::setup::{current_lsn, segment_name, setup};
use common::walsafe::{restore_promoted, wait_until, walsafe, Agent};

/// Rows per load batch; each row is ~1 KiB, so a batch is ~16 MiB of WAL:
/// about one segment, crossing segment boundaries mid-record.
const ROWS_PER_BATCH: u32 = 15_000;

/// `walsafe wal-fetch NAME` into `dir`; returns the bytes.
fn fetch(config: &Path, name: &str, dir: &Path) -> Vec<u8> {
    let dest = dir.join(format!("fetched-{name}"));
    let out = walsafe(config, &["wal-fetch", name, dest.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "wal-fetch {name} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let data = std::fs::read(&dest).unwrap();
    std::fs::remove_file(&dest).unwrap();
    data
}

/// One load batch, committed: `ROWS_PER_BATCH` rows tagged `batch`.
fn load(pg: &PgCluster, batch: u32) {
    pg.psql(&format!(
        "INSERT INTO load (batch, pad) \
         SELECT {batch}, repeat(md5(g::text), 30) FROM generate_series(1, {ROWS_PER_BATCH}) g"
    ));
}

fn matrix(major: u32) {
    // Fails here, with the install command, when the major is missing.
    let bins = PgBins::major(major);
    let s = setup(&format!("pg{major}"), PgOptions::default().major(major));
    let version: u32 = s.pg.psql("SHOW server_version_num").parse().unwrap();
    assert_eq!(
        version / 10000,
        major,
        "{} runs the wrong major",
        bins.server.display()
    );
    let seg = s.pg.segment_size();
    // Keeps every segment in pg_wal for the comparison, whatever walsafe's
    // slot acknowledges (the load is too small to reach a checkpoint).
    s.pg.psql("SELECT pg_create_physical_replication_slot('hold', true)");
    // pg_receivewal as second reference where the major ships its own.
    let recv_dir = s.dir.subdir("receivewal");
    let mut recv = bins.has_own("pg_receivewal").then(|| {
        s.pg.psql("SELECT pg_create_physical_replication_slot('recv', true)");
        s.pg.spawn_pg_receivewal(&recv_dir, Some("recv"))
    });

    let mut agent = Agent::start(&s.config, s.settings.metrics_port);
    s.pg.psql("CREATE TABLE load (batch int, pad text)");
    s.pg.psql("CREATE TABLE marker (note text)");
    // Everything from here on is streamed: the backup's start is too.
    let first_seg = current_lsn(&s.pg) / seg;
    let backup = s.dir.join("backup");
    s.pg.base_backup(&backup, "none");

    load(&s.pg, 1);
    load(&s.pg, 2);
    // Restart from the spool (on 13 and 14 the slot is read over SQL:
    // they lack READ_REPLICATION_SLOT).
    agent.kill9();
    load(&s.pg, 3);
    s.pg.psql("SELECT pg_switch_wal()");
    agent = Agent::start(&s.config, s.settings.metrics_port);
    load(&s.pg, 4);
    s.pg.psql("INSERT INTO marker VALUES ('last commit')");
    let end = current_lsn(&s.pg);
    agent.wait_archived(end, Duration::from_secs(90));

    // Every complete segment, as stored, equals the server's own file.
    let last_seg = end / seg; // still filling: chunks only
    assert!(
        last_seg - first_seg >= 4,
        "the load filled only {} segments",
        last_seg - first_seg
    );
    let work = s.dir.subdir("work");
    for segno in first_seg..last_seg {
        let name = segment_name(1, segno);
        let ours = fetch(&s.config, &name, &work);
        let theirs = std::fs::read(s.pg.wal_file(&name))
            .unwrap_or_else(|e| panic!("PostgreSQL {major}: pg_wal/{name}: {e}"));
        assert!(
            ours == theirs,
            "PostgreSQL {major}: stored segment {name} differs from pg_wal's"
        );
    }
    if let Some(recv) = recv.as_mut() {
        let last_full = recv_dir.join(segment_name(1, last_seg - 1));
        assert!(
            wait_until(Duration::from_secs(30), || last_full.exists()),
            "PostgreSQL {major}: pg_receivewal did not complete {}",
            last_full.display()
        );
        let _ = recv.kill();
        let _ = recv.wait();
        let mut compared = 0;
        for segno in first_seg..last_seg {
            let name = segment_name(1, segno);
            let Ok(theirs) = std::fs::read(recv_dir.join(&name)) else {
                continue; // before pg_receivewal's start position
            };
            assert!(
                fetch(&s.config, &name, &work) == theirs,
                "PostgreSQL {major}: stored segment {name} differs from pg_receivewal's"
            );
            compared += 1;
        }
        assert!(compared >= 4, "only {compared} segments from pg_receivewal");
    }

    // The disaster: the primary crashes, walsafe is killed; the last
    // commit is in the repository as chunks of the filling segment only.
    s.pg.stop_immediate();
    agent.kill9();
    let restored = restore_promoted(
        &backup,
        s.dir.path(),
        &s.config,
        &["recovery_target_timeline = 'latest'"],
        &format!("PostgreSQL {major}"),
    );
    assert_eq!(restored.bins().major, major);
    assert_eq!(
        restored.psql("SELECT string_agg(batch || ':' || n, ',' ORDER BY batch) FROM (SELECT batch, count(*) AS n FROM load GROUP BY batch) b"),
        format!("1:{ROWS_PER_BATCH},2:{ROWS_PER_BATCH},3:{ROWS_PER_BATCH},4:{ROWS_PER_BATCH}"),
        "PostgreSQL {major}: rows after restore"
    );
    assert_eq!(
        restored.psql("SELECT note FROM marker"),
        "last commit",
        "PostgreSQL {major}: the last commit after restore"
    );
    let verify = walsafe(&s.config, &["wal-verify"]);
    assert_eq!(
        verify.status.code(),
        Some(0),
        "PostgreSQL {major}: wal-verify: {}",
        String::from_utf8_lossy(&verify.stdout)
    );
}

#[test]
fn postgresql_13() {
    matrix(13);
}

#[test]
fn postgresql_14() {
    matrix(14);
}

#[test]
fn postgresql_15() {
    matrix(15);
}

#[test]
fn postgresql_16() {
    matrix(16);
}

#[test]
fn postgresql_17() {
    matrix(17);
}

#[test]
fn postgresql_18() {
    matrix(18);
}

/// PostgreSQL 13 lacks READ_REPLICATION_SLOT and this role may not open an
/// SQL connection (pg_hba.conf admits it for replication only), so walsafe
/// cannot read where its slot holds WAL from. It creates the slot when
/// missing and resumes from its spool when the slot exists; with an empty
/// spool and an existing slot it stops with an error naming the slot
/// instead of skipping the WAL the slot holds.
#[test]
fn postgresql_13_without_sql_access() {
    let mut s = setup(
        "pg13nosql",
        PgOptions::default()
            .major(13)
            .hba("local all walsafe reject")
            .hba("host all walsafe 127.0.0.1/32 reject"),
    );
    s.pg.psql("CREATE ROLE walsafe LOGIN REPLICATION");
    s.settings.conninfo = s.pg.conninfo().replace("user=postgres", "user=walsafe");
    let config = s.settings.write(&s.config);
    s.pg.psql("CREATE TABLE t (n int)");

    // No slot yet: created over the replication connection.
    let mut agent = Agent::start(&config, s.settings.metrics_port);
    s.pg.psql("INSERT INTO t VALUES (1)");
    agent.wait_archived(current_lsn(&s.pg), Duration::from_secs(30));
    agent.kill9();

    // The slot exists, the spool says where to resume.
    s.pg.psql("INSERT INTO t VALUES (2)");
    let end = current_lsn(&s.pg);
    let mut agent = Agent::start(&config, s.settings.metrics_port);
    agent.wait_archived(end, Duration::from_secs(30));
    agent.kill9();
    assert!(
        agent
            .log()
            .contains("cannot read where the replication slot holds WAL from"),
        "the agent should have said why it cannot read the slot; log:\n{}",
        agent.log()
    );

    // Spool lost, slot kept: where to start is unknown, so walsafe stops.
    std::fs::remove_dir_all(&s.settings.spool).unwrap();
    let mut agent = Agent::spawn(&config, s.settings.metrics_port);
    let mut status = None;
    assert!(
        wait_until(Duration::from_secs(30), || {
            status = agent.try_wait();
            status.is_some()
        }),
        "walsafe kept running without knowing where its slot starts; log:\n{}",
        agent.log()
    );
    assert!(!status.unwrap().success());
    assert!(
        agent
            .log()
            .contains("the position of replication slot \"walsafe\" is unknown"),
        "log:\n{}",
        agent.log()
    );
}
