//! End to end against a real S3 server (moto on loopback): stream, crash,
//! restore through wal-fetch, and corrupted objects refused.

mod common;

use std::time::Duration;

use common::pg::{PgCluster, PgOptions, TestDir};
use common::s3::S3Server;
use common::setup::{current_lsn, keygen};
use common::walsafe::{restore_promoted, walsafe, Agent, Settings};

#[test]
fn s3_repository_streams_and_restores_to_the_last_commit() {
    let s3 = S3Server::start();
    let pg = PgCluster::start(&PgOptions {
        name: "s3e2e".into(),
        ..Default::default()
    });
    let dir = TestDir::new("s3e2e");
    let mut settings = Settings::new(dir.path(), &pg.conninfo());
    settings.repo_url = s3.url("cluster-a");
    settings.repo_options = s3.repo_options().into_iter().collect();
    settings.key_file = Some(keygen(dir.path(), "repo.key"));
    let config = settings.write(&dir.join("walsafe.toml"));
    let mut agent = Agent::start(&config, settings.metrics_port);

    pg.psql("CREATE TABLE t (id int, pad text)");
    let backup = dir.join("backup");
    pg.base_backup(&backup, "none");
    for i in 0..3 {
        pg.psql(&format!(
            "INSERT INTO t SELECT {i}, repeat(md5(g::text), 20) FROM generate_series(1, 5000) g"
        ));
        pg.psql("SELECT pg_switch_wal()");
    }
    pg.psql("INSERT INTO t VALUES (99, 'the last commit')");
    let end = current_lsn(&pg);
    agent.wait_archived(end, Duration::from_secs(60));
    pg.stop_immediate();
    agent.kill9();

    // The last commit lives only in chunks of a still-filling segment.
    let verify = walsafe(&config, &["wal-verify", "--json"]);
    assert_eq!(
        verify.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );

    let restored = restore_promoted(
        &backup,
        dir.path(),
        &config,
        &["recovery_target_timeline = 'latest'"],
        "restore",
    );
    assert_eq!(restored.psql("SELECT count(*) FROM t WHERE id = 99"), "1");
    assert_eq!(restored.psql("SELECT count(DISTINCT id) FROM t"), "4");
}

#[test]
fn storage_outage_is_escalated_and_nothing_leaves_the_spool() {
    let mut s3 = S3Server::start();
    let pg = PgCluster::start(&PgOptions {
        name: "s3out".into(),
        ..Default::default()
    });
    let dir = TestDir::new("s3out");
    let mut settings = Settings::new(dir.path(), &pg.conninfo());
    settings.repo_url = s3.url("outage");
    settings.repo_options = s3.repo_options().into_iter().collect();
    settings.retries = 2;
    let config = settings.write(&dir.join("walsafe.toml"));
    let mut agent = Agent::start(&config, settings.metrics_port);
    pg.psql("CREATE TABLE t (pad text)");
    agent.wait_archived(current_lsn(&pg), Duration::from_secs(30));
    let archived_before = agent.gauge("walsafe_archived_lsn_bytes") as u64;

    s3.stop();
    for _ in 0..3 {
        pg.psql("INSERT INTO t SELECT repeat(md5(g::text), 30) FROM generate_series(1, 10000) g");
        pg.psql("SELECT pg_switch_wal()");
    }
    let flushed_target = current_lsn(&pg);
    assert!(
        common::walsafe::wait_until(Duration::from_secs(60), || agent
            .log()
            .contains("no upload has succeeded")),
        "no escalation; log:\n{}",
        agent.log()
    );
    // Failed chunks back off (capped exponential): a 200 ms interval must
    // not turn into five failed uploads a second against a dead store.
    let chunk_errors = |a: &Agent| {
        common::walsafe::counter_sum(
            &a.metrics(),
            "walsafe_uploads_total",
            "kind=\"chunk\",result=\"error\"",
        )
    };
    pg.psql("INSERT INTO t VALUES ('a chunk that cannot be stored')");
    let before = chunk_errors(&agent);
    std::thread::sleep(Duration::from_secs(8));
    let during = chunk_errors(&agent) - before;
    assert!(during <= 6.0, "{during} chunk failures in 8 s: no backoff");

    // Still running, still receiving; the archive is honestly behind.
    assert!(
        agent.try_wait().is_none(),
        "the agent must not exit during an outage"
    );
    assert!(agent.gauge("walsafe_flushed_lsn_bytes") as u64 >= flushed_target - (16 << 20));
    assert!(agent.gauge("walsafe_archived_lsn_bytes") as u64 <= archived_before + (16 << 20));
    assert!(agent.gauge("walsafe_archive_lag_seconds") > 0.0);
    let pending = agent.gauge("walsafe_spool_pending_segments");
    assert!(
        pending >= 2.0,
        "complete segments wait in the spool: {pending}"
    );
    let errors: f64 = agent
        .metrics()
        .iter()
        .filter(|(k, _)| k.starts_with("walsafe_uploads_total") && k.contains("result=\"error\""))
        .map(|(_, v)| *v)
        .sum();
    assert!(errors >= 5.0, "errors counted: {errors}");
    let spooled = std::fs::read_dir(&settings.spool)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().len() == 24)
        .count();
    assert!(spooled >= 2, "the spool keeps what is not stored");

    // Restore during the outage: wal-fetch must not claim "not found".
    let dest = dir.join("out");
    let f = walsafe(
        &config,
        &[
            "wal-fetch",
            "000000010000000000000002",
            dest.to_str().unwrap(),
        ],
    );
    assert_eq!(
        f.status.code(),
        Some(126),
        "{}",
        String::from_utf8_lossy(&f.stderr)
    );

    // A clean stop during the outage still exits 0 and keeps the spool.
    assert!(agent.terminate().success());
    let after = std::fs::read_dir(&settings.spool)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().len() == 24)
        .count();
    assert_eq!(after, spooled);
}
