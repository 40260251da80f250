//! Several repositories (3-2-1): the agent ships to each independently. A
//! `file://` repository and an S3 one (moto behind a TCP front the test
//! takes down): both receive every object; while S3 is down the `file://`
//! one stays current and S3's backlog waits in the spool, up to a full
//! spool (backpressure, alarm naming S3), never dropped; when S3 is back
//! it catches up, and each repository serves every segment byte for byte
//! as `pg_receivewal` wrote it, with no gap.

mod common;

use std::time::{Duration, Instant};

use common::front::TcpFront;
use common::pg::{PgCluster, PgOptions, TestDir};
use common::s3::S3Server;
use common::setup::{current_lsn, output_text as text, write_wal};
use common::walsafe::{
    assert_no_gap, assert_served_as, complete_segments, wait_until, walsafe, Agent, MoreRepository,
    Settings,
};

const MB: u64 = 1 << 20;

/// A per-repository gauge of the agent (0 when absent).
fn of(agent: &Agent, metric: &str, repository: &str) -> f64 {
    agent.gauge(&format!("{metric}{{repository=\"{repository}\"}}"))
}

/// Complete segment files waiting in the spool.
fn spooled(spool: &std::path::Path) -> usize {
    complete_segments(spool).len()
}

#[test]
fn every_repository_gets_every_object_and_one_down_holds_up_none() {
    let s3 = S3Server::start();
    let mut front = TcpFront::start(s3.port());
    let pg = PgCluster::start(
        &PgOptions {
            name: "two-repos".into(),
            ..Default::default()
        }
        .segsize_mb(1)
        .conf("wal_sender_timeout = '5s'"),
    );
    let dir = TestDir::new("two-repos");
    let mut settings = Settings::new(dir.path(), &pg.conninfo());
    settings.key_file = Some(common::setup::keygen(dir.path(), "repo.key"));
    settings.spool_max_size = Some("8MB".into());
    settings.stall_alarm = "3s".into();
    settings.more_repositories = vec![MoreRepository {
        name: "offsite".into(),
        url: s3.url("offsite"),
        options: s3.repo_options_at(&front.endpoint()).into_iter().collect(),
        retries: 2,
        key_file: None,
    }];
    let local = settings.repo_url.clone();
    let config = settings.write(&dir.join("walsafe.toml"));
    // One configuration per repository, to read each alone.
    let mut only = settings.clone();
    only.more_repositories.clear();
    only.prefetch_dir = dir.join("prefetch-local");
    let only_local = only.write(&dir.join("local.toml"));
    only.repo_url = s3.url("offsite");
    only.repo_options = s3.repo_options().into_iter().collect();
    only.prefetch_dir = dir.join("prefetch-offsite");
    let only_offsite = only.write(&dir.join("offsite.toml"));

    // The independent reference: pg_receivewal on its own slot.
    pg.psql("SELECT pg_create_physical_replication_slot('recv', true)");
    let recv_dir = dir.subdir("receivewal");
    let mut recv = pg.spawn_pg_receivewal_opts(&recv_dir, Some("recv"), false);
    let mut agent = Agent::start(&config, settings.metrics_port);
    pg.psql("CREATE TABLE t (pad text)");
    write_wal(&pg, 2);
    agent.wait_archived(current_lsn(&pg), Duration::from_secs(30));

    // S3 down under load: the file:// repository stays current, S3's
    // backlog waits in the spool.
    front.down();
    let down = Instant::now();
    write_wal(&pg, 4);
    pg.psql("INSERT INTO t VALUES ('while S3 is down')");
    let during = current_lsn(&pg);
    let mut local_lag_max: f64 = 0.0;
    assert!(
        wait_until(Duration::from_secs(20), || {
            local_lag_max =
                local_lag_max.max(of(&agent, "walsafe_repository_archive_lag_seconds", &local));
            of(&agent, "walsafe_repository_archived_lsn_bytes", &local) >= during as f64
        }),
        "the file:// repository fell behind while S3 was down; log:\n{}",
        agent.log()
    );
    let local_caught_up = down.elapsed();
    assert!(
        of(&agent, "walsafe_repository_archived_lsn_bytes", "offsite") < during as f64,
        "S3 is down: it cannot be current"
    );
    assert!(
        spooled(&settings.spool) >= 2,
        "S3's backlog is not in the spool"
    );
    assert!(
        wait_until(Duration::from_secs(20), || of(
            &agent,
            "walsafe_repository_upload_stalled",
            "offsite"
        ) == 1.0),
        "S3's stall is not reported; log:\n{}",
        agent.log()
    );
    assert_eq!(of(&agent, "walsafe_repository_upload_stalled", &local), 0.0);
    // `check` and `status` report each repository.
    let c = text(&walsafe(&config, &["check"]));
    let item = |name: &str| {
        c.lines()
            .find(|l| l.contains(&format!("repository reachable [{name}]")))
            .unwrap_or_else(|| panic!("no item for {name}:\n{c}"))
            .to_string()
    };
    assert!(item("offsite").contains("FAILED"), "{c}");
    assert!(!item(&local).contains("FAILED"), "{c}");
    // The state file is rewritten once a second.
    let mut st = String::new();
    assert!(
        wait_until(Duration::from_secs(5), || {
            st = text(&walsafe(&config, &["status"]));
            st.contains("repository \"offsite\": archived") && st.contains("STALLED")
        }),
        "{st}"
    );
    assert!(
        agent.gauge("walsafe_archive_lag_seconds") > 0.0,
        "the worst lag shows S3's"
    );

    // Long enough to fill the spool: backpressure, and the alarm names S3.
    write_wal(&pg, 12);
    let end = current_lsn(&pg);
    let mut spool_peak: f64 = 0.0;
    assert!(
        wait_until(Duration::from_secs(60), || {
            spool_peak = spool_peak.max(agent.gauge("walsafe_spool_bytes"));
            agent.gauge("walsafe_spool_full") == 1.0
        }),
        "the spool never filled; log:\n{}",
        agent.log()
    );
    let full = agent.first_log_line("SPOOL FULL");
    assert!(full.contains("\"offsite\""), "name the repository: {full}");
    assert!(agent.is_running(), "walsafe exited; log:\n{}", agent.log());
    assert!(agent.gauge("walsafe_flushed_lsn_bytes") < end as f64);
    // What the spool took is in the file:// repository meanwhile.
    let flushed = agent.gauge("walsafe_flushed_lsn_bytes");
    assert!(
        wait_until(Duration::from_secs(20), || of(
            &agent,
            "walsafe_repository_archived_lsn_bytes",
            &local
        ) >= flushed),
        "the file:// repository waits for S3; log:\n{}",
        agent.log()
    );

    // S3 back: it catches up, the spool drains, nothing was dropped.
    let outage = down.elapsed();
    front.up();
    let back = Instant::now();
    agent.wait_archived(end, Duration::from_secs(120));
    let catch_up = back.elapsed();
    assert!(
        wait_until(Duration::from_secs(30), || spooled(&settings.spool) == 0),
        "stored in both, yet kept in the spool"
    );
    eprintln!(
        "REPORT outage {:.1} s: file:// lag max {local_lag_max:.2} s (current {:.2} s after the outage began), spool peak {:.1} MiB of 8 MiB, S3 caught up {:.1} s after it came back ({:.1} MiB)",
        outage.as_secs_f64(),
        local_caught_up.as_secs_f64(),
        spool_peak / MB as f64,
        catch_up.as_secs_f64(),
        (end - during) as f64 / MB as f64,
    );

    // Every segment, in each repository, as pg_receivewal wrote it.
    pg.psql("INSERT INTO t VALUES ('the last commit')");
    pg.psql("SELECT pg_switch_wal()");
    agent.wait_archived(current_lsn(&pg), Duration::from_secs(60));
    let names = common::walsafe::stop_receivewal_past(&mut recv, &recv_dir, end, MB);
    let v = walsafe(&config, &["wal-verify"]);
    assert_eq!(v.status.code(), Some(0), "{}", text(&v));
    assert!(text(&v).contains("repository \"offsite\""), "{}", text(&v));
    for config in [&only_local, &only_offsite] {
        assert_served_as(config, &recv_dir, &names, &dir.subdir("work"));
        assert_no_gap(&agent, &settings.spool, config);
    }
    drop(agent);
}

/// A repository added to a running site gets new WAL from the agent at
/// once, and what came before (WAL, chunks, a base backup) from another
/// repository with `walsafe repo-sync`; then it restores on its own. A
/// damaged object is never copied: a third repository synced from the
/// damaged one lacks it, and is completed from the good one.
#[test]
fn a_repository_added_later_is_completed_by_repo_sync_and_restores() {
    let pg = PgCluster::start(
        &PgOptions {
            name: "add-repo".into(),
            ..Default::default()
        }
        .segsize_mb(1),
    );
    let dir = TestDir::new("add-repo");
    let mut settings = Settings::new(dir.path(), &pg.conninfo());
    settings.key_file = Some(common::setup::keygen(dir.path(), "repo.key"));
    let local = settings.repo_url.clone();
    let local_dir = std::path::PathBuf::from(local.strip_prefix("file://").unwrap());
    let config = settings.write(&dir.join("walsafe.toml"));
    let mut agent = Agent::start(&config, settings.metrics_port);
    pg.psql("CREATE TABLE t (n int)");
    let base = dir.join("base");
    pg.base_backup(&base, "none");
    pg.psql("INSERT INTO t SELECT generate_series(1, 1000)");
    write_wal(&pg, 3);
    let o = walsafe(&config, &["backup"]);
    assert!(o.status.success(), "{}", text(&o));
    pg.psql("INSERT INTO t SELECT generate_series(1001, 2000)");
    let between = pg.psql("SELECT clock_timestamp()");
    pg.psql("SELECT pg_switch_wal()");
    agent.wait_archived(current_lsn(&pg), Duration::from_secs(60));
    assert!(agent.terminate().success());

    // The off-site repository joins, with a key of its own.
    let offsite_dir = dir.subdir("offsite");
    settings.more_repositories = vec![MoreRepository {
        name: "offsite".into(),
        url: format!("file://{}", offsite_dir.display()),
        options: Vec::new(),
        retries: 2,
        key_file: Some(common::setup::keygen(dir.path(), "offsite.key")),
    }];
    let both = settings.write(&dir.join("walsafe.toml"));
    // The off-site copy keeps a longer recovery window than --window.
    let text_of = std::fs::read_to_string(&both).unwrap();
    std::fs::write(
        &both,
        text_of.replace(
            "name = \"offsite\"\n",
            "name = \"offsite\"\nretain_window = \"1d\"\n",
        ),
    )
    .unwrap();
    let agent = Agent::start(&both, settings.metrics_port);
    pg.psql("INSERT INTO t SELECT generate_series(2001, 3000)");
    pg.psql("SELECT pg_switch_wal()");
    // A second base backup (into the first repository, as always).
    let o = walsafe(&both, &["backup"]);
    assert!(o.status.success(), "{}", text(&o));
    pg.psql("INSERT INTO t VALUES (3001)");
    agent.wait_archived(current_lsn(&pg), Duration::from_secs(60));
    let base_settings = settings.clone();
    let alone = |name: &str, url: String, key: &str| {
        let mut s = base_settings.clone();
        s.more_repositories.clear();
        s.repo_url = url;
        s.key_file = Some(dir.join(key));
        s.prefetch_dir = dir.join(format!("prefetch-{name}"));
        s.write(&dir.join(format!("{name}.toml")))
    };
    let offsite = alone(
        "offsite",
        format!("file://{}", offsite_dir.display()),
        "offsite.key",
    );
    let o = walsafe(&offsite, &["backup-verify", "latest"]);
    assert!(
        !o.status.success(),
        "the backup is not there yet: {}",
        text(&o)
    );

    let sync = |config: &std::path::Path, from: &str, to: &str| {
        walsafe(config, &["repo-sync", "--from", from, "--to", to])
    };
    let o = sync(&both, &local, "offsite");
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let said = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(said.contains("backups") && said.contains("wal"), "{said}");
    // Complete on its own: no gap, the backup verifies, every segment is
    // the local repository's, and it restores every row.
    let v = walsafe(&offsite, &["wal-verify"]);
    assert_eq!(v.status.code(), Some(0), "{}", text(&v));
    let o = walsafe(&offsite, &["backup-verify", "latest"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let names = complete_segments(&local_dir.join("wal"));
    let only_local = alone("local", local.clone(), "repo.key");
    for n in &names {
        assert!(
            common::walsafe::fetch_bytes(&offsite, n, &dir.subdir("w1"))
                == common::walsafe::fetch_bytes(&only_local, n, &dir.subdir("w2")),
            "{n} differs between the repositories"
        );
    }
    let restored = common::walsafe::restore_promoted(
        &base,
        dir.path(),
        &offsite,
        &["recovery_target_timeline = 'latest'"],
        "restore from the synced repository",
    );
    assert_eq!(restored.psql("SELECT count(*) FROM t"), "3001");
    drop(restored);

    // Retention applies to each repository, with its own window: the
    // first keeps only the newest backup of a 1 s window, the off-site
    // copy both (1 day).
    std::thread::sleep(Duration::from_secs(2));
    let records = |d: &std::path::Path| {
        std::fs::read_dir(d.join("backups"))
            .map(|e| {
                e.flatten()
                    .filter(|b| b.path().join("backup.json").exists())
                    .count()
            })
            .unwrap_or(0)
    };
    assert_eq!((records(&local_dir), records(&offsite_dir)), (2, 2));
    let o = walsafe(&both, &["retain", "--window", "1s", "--apply"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(
        (records(&local_dir), records(&offsite_dir)),
        (1, 2),
        "{}",
        text(&o)
    );
    let names = complete_segments(&local_dir.join("wal"));
    // A restore to a time before the first repository's only backup comes
    // from the off-site copy: its backup, and the WAL the first deleted.
    let (o, port, _stop) = common::timeline::restore_started(
        &pg,
        &both,
        &dir.join("restored-between"),
        &["--target-time", &between, "--target-action", "promote"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("could not restore") && text(&o).contains("trying the next"),
        "say that the first repository gave way: {}",
        text(&o)
    );
    assert_eq!(
        common::timeline::psql_on(&pg, port, "SELECT count(*) FROM t"),
        "2000"
    );
    // Again: nothing left to copy.
    let o = sync(&both, &local, "offsite");
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("copied 0 objects"),
        "{}",
        text(&o)
    );

    // A damaged object is reported and not copied; another source completes it.
    let victim = &names[names.len() / 2];
    let path = local_dir.join("wal").join(victim);
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xFF;
    std::fs::write(&path, bytes).unwrap();
    let third_dir = dir.subdir("third");
    settings.more_repositories.push(MoreRepository {
        name: "third".into(),
        url: format!("file://{}", third_dir.display()),
        options: Vec::new(),
        retries: 2,
        key_file: None,
    });
    let three = settings.write(&dir.join("three.toml"));
    let o = sync(&three, &local, "third");
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains(victim.as_str()),
        "{}",
        text(&o)
    );
    assert!(
        !third_dir.join("wal").join(victim).exists(),
        "a damaged object was copied"
    );
    let o = sync(&three, "offsite", "third");
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let third = alone(
        "third",
        format!("file://{}", third_dir.display()),
        "repo.key",
    );
    let v = walsafe(&third, &["wal-verify"]);
    assert_eq!(v.status.code(), Some(0), "{}", text(&v));
    drop(agent);
}
