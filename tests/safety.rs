//! Data-safety rules under attack: bad objects never reach recovery,
//! strangers are refused, timelines are followed, bad input is explained.

mod common;

use std::path::Path;
use std::time::Duration;

use common::pg::{PgCluster, PgOptions, RecoveryOutcome, TestDir};
use common::setup::{current_lsn, keygen, stderr, write_wal};
use common::walsafe::{restore, restore_promoted, walsafe, Agent, Settings};

fn stored_segments(repo: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(repo.join("wal"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.len() == 24)
        .collect();
    v.sort();
    v
}

/// Archives a cluster with an encrypted repository, then returns the
/// pieces: a base backup whose recovery needs the stored segments.
struct Archived {
    dir: TestDir,
    pg: PgCluster,
    settings: Settings,
    config: std::path::PathBuf,
    backup: std::path::PathBuf,
}

fn archived_cluster(name: &str, key: bool) -> Archived {
    let pg = PgCluster::start(&PgOptions {
        name: name.into(),
        ..Default::default()
    });
    let dir = TestDir::new(name);
    let mut settings = Settings::new(dir.path(), &pg.conninfo());
    settings.prefetch = 0;
    if key {
        settings.key_file = Some(keygen(dir.path(), "repo.key"));
    }
    let config = settings.write(&dir.join("walsafe.toml"));
    let mut agent = Agent::start(&config, settings.metrics_port);
    pg.psql("CREATE TABLE t (id int)");
    let backup = dir.join("backup");
    pg.base_backup(&backup, "none");
    for i in 0..3 {
        write_wal(&pg, 2);
        pg.psql(&format!("INSERT INTO t VALUES ({i})"));
        pg.psql("SELECT pg_switch_wal()");
    }
    agent.wait_archived(current_lsn(&pg), Duration::from_secs(60));
    assert!(
        agent.terminate().success(),
        "agent exit; log:\n{}",
        agent.log()
    );
    Archived {
        dir,
        pg,
        settings,
        config,
        backup,
    }
}

fn repo_dir(a: &Archived) -> std::path::PathBuf {
    a.settings.repo_url.strip_prefix("file://").unwrap().into()
}

fn fetch_code(config: &Path, name: &str, dir: &Path) -> (Option<i32>, String) {
    let dest = dir.join("out");
    let _ = std::fs::remove_file(&dest);
    let o = walsafe(config, &["wal-fetch", name, dest.to_str().unwrap()]);
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    (o.status.code(), stderr(&o))
}

#[test]
fn bad_objects_make_wal_fetch_fatal_and_recovery_stop() {
    let a = archived_cluster("badwal", true);
    let repo = repo_dir(&a);
    let segs = stored_segments(&repo);
    assert!(segs.len() >= 3, "{segs:?}");
    // The first segment recovery of the backup needs, and another one.
    let (victim, other) = (&segs[segs.len() - 3], &segs[segs.len() - 2]);
    let path = repo.join("wal").join(victim);
    let original = std::fs::read(&path).unwrap();
    let work = a.dir.subdir("work");

    // Sanity: intact, it restores; absent names are exit 1.
    assert_eq!(fetch_code(&a.config, victim, &work).0, Some(0));
    assert_eq!(
        fetch_code(&a.config, "0000000100000000000000F0", &work).0,
        Some(1)
    );
    assert_eq!(fetch_code(&a.config, "00000009.history", &work).0, Some(1));

    let mut flipped = original.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x01;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("corrupted", flipped),
        ("truncated", original[..original.len() / 2].to_vec()),
        ("last frame cut", original[..original.len() - 1].to_vec()),
        (
            "swapped",
            std::fs::read(repo.join("wal").join(other)).unwrap(),
        ),
        ("empty", Vec::new()),
    ];
    for (what, bytes) in &cases {
        std::fs::write(&path, bytes).unwrap();
        let (code, err) = fetch_code(&a.config, victim, &work);
        assert_eq!(code, Some(126), "{what} object: exit {code:?}, {err}");
        assert!(
            err.contains(victim.as_str()),
            "{what}: message names the file: {err}"
        );
        assert!(!work.join("out").exists(), "{what}: nothing may be written");
    }

    // A wrong key.
    std::fs::write(&path, &original).unwrap();
    let mut wrong = a.settings.clone();
    wrong.key_file = Some(keygen(a.dir.path(), "other.key"));
    let wrong_config = wrong.write(&a.dir.join("wrong.toml"));
    let (code, err) = fetch_code(&wrong_config, victim, &work);
    assert_eq!(code, Some(126), "wrong key: {err}");
    assert!(err.to_lowercase().contains("key"), "{err}");
    // No key at all, on an encrypted repository.
    let mut nokey = a.settings.clone();
    nokey.key_file = None;
    let nokey_config = nokey.write(&a.dir.join("nokey.toml"));
    assert_eq!(fetch_code(&nokey_config, victim, &work).0, Some(126));

    // A real recovery with the corrupted segment stops instead of promoting.
    std::fs::write(&path, &cases[0].1).unwrap();
    let restored = restore(&a.backup, a.dir.path(), &a.config, &[]);
    match restored.wait_recovery_end(Duration::from_secs(120)) {
        RecoveryOutcome::Failed(log) => {
            assert!(log.contains("126") || log.contains("FATAL"), "{log}")
        }
        other => panic!(
            "recovery with a corrupted segment ended {other:?}:\n{}",
            restored.log_tail()
        ),
    }
    drop(restored);

    // Intact again: the same backup recovers fully.
    std::fs::write(&path, &original).unwrap();
    let restored = restore_promoted(&a.backup, a.dir.path(), &a.config, &[], "intact backup");
    assert_eq!(restored.psql("SELECT count(*) FROM t"), "3");
}

#[test]
fn unencrypted_objects_are_checksummed_and_prefetch_is_verified() {
    let a = archived_cluster("cksum", false);
    let repo = repo_dir(&a);
    let segs = stored_segments(&repo);
    let victim = &segs[segs.len() - 2];
    let path = repo.join("wal").join(victim);
    let original = std::fs::read(&path).unwrap();
    // The reference: the server's own copy of the segment.
    let server_copy = std::fs::read(a.pg.wal_file(victim))
        .unwrap_or_else(|e| panic!("{victim} is no longer in the server's pg_wal: {e}"));
    let work = a.dir.subdir("work");
    let mut flipped = original.clone();
    let at = flipped.len() - 40;
    flipped[at] ^= 0x80;
    std::fs::write(&path, &flipped).unwrap();
    let (code, err) = fetch_code(&a.config, victim, &work);
    assert_eq!(code, Some(126), "{err}");
    std::fs::write(&path, &original).unwrap();

    // A prefetched copy that went bad on local disk is discarded, and the
    // segment comes from the repository instead.
    // (The cache of this repository: `<[fetch] dir>/<repository id>/`.)
    let cfg = walsafe::config::Config::load(&a.config).unwrap();
    let cache = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let repo = walsafe::repository::Repository::open(cfg.repository()).unwrap();
        let d = repo.descriptor().await.unwrap().unwrap();
        walsafe::fetch::prefetch_cache(&cfg, &repo, &d)
    });
    // It is kept as plaintext under the hash of its name and bytes: one
    // bit flipped on disk, under the name of the good bytes.
    std::fs::create_dir_all(&cache).unwrap();
    let cached = cache.join(walsafe::fetch::prefetch_file_name(victim, &server_copy));
    let mut rotten = server_copy.clone();
    rotten[8192 + 100] ^= 0x01;
    std::fs::write(&cached, &rotten).unwrap();
    common::pg::chown_postgres(&a.settings.prefetch_dir);
    let (code, err) = fetch_code(&a.config, victim, &work);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        std::fs::read(work.join("out")).unwrap() == server_copy,
        "the segment served is not the server's {victim}: the bad prefetched copy was served"
    );
    assert!(!cached.exists(), "the bad prefetched copy is gone");
    // A copy whose hash matches but whose pages are not where they say
    // they are (two pages swapped before it was hashed) is discarded too.
    let mut swapped = server_copy.clone();
    let (first, second) = swapped.split_at_mut(3 * 8192);
    first[2 * 8192..].swap_with_slice(&mut second[..8192]);
    let misplaced = cache.join(walsafe::fetch::prefetch_file_name(victim, &swapped));
    std::fs::write(&misplaced, &swapped).unwrap();
    common::pg::chown_postgres(&a.settings.prefetch_dir);
    let (code, err) = fetch_code(&a.config, victim, &work);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        std::fs::read(work.join("out")).unwrap() == server_copy,
        "a prefetched copy with misplaced pages was served"
    );
    assert!(!misplaced.exists(), "the misplaced copy is gone");
    // An intact prefetched copy is served as it is (moved into place).
    std::fs::write(&cached, &server_copy).unwrap();
    common::pg::chown_postgres(&a.settings.prefetch_dir);
    let (code, err) = fetch_code(&a.config, victim, &work);
    assert_eq!(code, Some(0), "{err}");
    assert!(std::fs::read(work.join("out")).unwrap() == server_copy);
    assert!(!cached.exists(), "served by a move");
}

#[test]
fn strangers_are_refused() {
    let a = archived_cluster("stranger", false);
    let repo = repo_dir(&a);
    let ours = stored_segments(&repo);

    // Another cluster pointed at the same repository.
    let other = PgCluster::start(&PgOptions {
        name: "stranger2".into(),
        ..Default::default()
    });
    let mut s = a.settings.clone();
    s.conninfo = other.conninfo();
    s.spool = a.dir.join("spool2");
    s.metrics_port = common::walsafe::free_port();
    let config = s.write(&a.dir.join("other.toml"));
    let mut agent = Agent::spawn(&config, s.metrics_port);
    assert!(common::walsafe::wait_until(Duration::from_secs(30), || {
        agent.try_wait().is_some()
    }));
    let log = agent.log();
    let mine = a.pg.system_identifier().to_string();
    let theirs = other.system_identifier().to_string();
    assert!(
        log.contains(&mine) && log.contains(&theirs),
        "names both identifiers: {log}"
    );
    assert_eq!(
        stored_segments(&repo),
        ours,
        "nothing of the stranger's was stored"
    );

    // WAL from another cluster given to wal-push.
    other.psql("SELECT pg_switch_wal()");
    let seg = other.wal_file("000000010000000000000001");
    let copy = a.dir.join("000000010000000000000001");
    std::fs::copy(&seg, &copy).unwrap();
    common::pg::chown_postgres(&copy);
    let o = walsafe(&a.config, &["wal-push", copy.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains(&theirs), "{}", stderr(&o));

    // Our own segment, already stored by the stream: idempotent success.
    let name = &ours[0];
    let fetched = a.dir.join(name);
    let f = walsafe(&a.config, &["wal-fetch", name, fetched.to_str().unwrap()]);
    assert!(f.status.success());
    let o = walsafe(&a.config, &["wal-push", fetched.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The same name with different (valid-looking, ours) content: refused,
    // and the stored object is untouched.
    let stored_before = std::fs::read(repo.join("wal").join(name)).unwrap();
    let mut bytes = std::fs::read(&fetched).unwrap();
    bytes[3 * 8192 + 100] ^= 0xFF; // inside a record, past the page header
    std::fs::write(&fetched, &bytes).unwrap();
    let o = walsafe(&a.config, &["wal-push", fetched.to_str().unwrap()]);
    assert!(
        !o.status.success(),
        "different content under a stored name must be refused"
    );
    assert!(
        stderr(&o).contains("already holds a different"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        std::fs::read(repo.join("wal").join(name)).unwrap(),
        stored_before
    );
}

#[test]
fn timeline_switch_is_archived_and_followed() {
    let primary = PgCluster::start(&PgOptions {
        name: "tl-primary".into(),
        ..Default::default()
    });
    primary.psql("CREATE TABLE t (id int, phase text)");
    let standby = primary.create_standby();
    let dir = TestDir::new("tl");
    let settings = Settings::new(dir.path(), &standby.conninfo());
    let config = settings.write(&dir.join("walsafe.toml"));
    let agent = Agent::start(&config, settings.metrics_port);
    let backup = dir.join("backup");
    standby.base_backup(&backup, "none");

    primary.psql("INSERT INTO t SELECT g, 'before' FROM generate_series(1, 100) g");
    write_wal(&primary, 2);
    let upto = primary.psql("SELECT pg_current_wal_lsn()");
    standby.wait_for(
        &format!("SELECT pg_last_wal_replay_lsn() >= '{upto}'"),
        "t",
        Duration::from_secs(60),
    );
    primary.stop_fast();
    standby.promote();
    standby.psql("INSERT INTO t SELECT g, 'after' FROM generate_series(1, 50) g");
    write_wal(&standby, 1);
    standby.psql("SELECT pg_switch_wal()");
    standby.psql("INSERT INTO t VALUES (0, 'last')");
    let end = current_lsn(&standby);
    agent.wait_archived(end, Duration::from_secs(60));
    assert_eq!(agent.gauge("walsafe_timeline"), 2.0);
    let repo: std::path::PathBuf = settings.repo_url.strip_prefix("file://").unwrap().into();
    assert!(repo.join("wal/00000002.history").exists());
    assert!(
        std::fs::read_dir(repo.join("wal"))
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("00000002")
                && e.file_name().len() == 24),
        "a timeline 2 segment is stored"
    );

    let restored = restore_promoted(
        &backup,
        dir.path(),
        &config,
        &["recovery_target_timeline = 'latest'"],
        "restore",
    );
    assert_eq!(
        restored.psql("SELECT count(*) FILTER (WHERE phase = 'before') || ',' || count(*) FILTER (WHERE phase = 'after') || ',' || count(*) FILTER (WHERE phase = 'last') FROM t"),
        "100,50,1"
    );
    let verify = walsafe(&config, &["wal-verify"]);
    assert_eq!(
        verify.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
}

#[test]
fn bad_input_gets_one_clear_line_and_no_panic() {
    let dir = TestDir::new("badinput");
    let check = |args: &[&str], config: &Path, expect: &[&str], code: i32| {
        let o = walsafe(config, args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(code), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        let last = err.trim().lines().last().unwrap_or("").to_string();
        for e in expect {
            assert!(err.contains(e), "{args:?}: {e:?} not in {err}");
        }
        assert!(!last.is_empty());
    };
    // Missing config.
    let missing = dir.join("nope.toml");
    check(&["run"], &missing, &["nope.toml", "--config"], 1);
    check(
        &["wal-fetch", "000000010000000000000001", "x"],
        &missing,
        &["nope.toml"],
        126,
    );
    check(&["wal-verify"], &missing, &["nope.toml"], 2);
    // Malformed TOML.
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[postgres\nconninfo = 'x'\n").unwrap();
    check(&["run"], &bad, &["bad.toml", "line"], 1);
    // Bad URL.
    let mut s = Settings::new(dir.path(), "host=/nonexistent port=1");
    s.repo_url = "ftp://example/x".into();
    let url = s.write(&dir.join("url.toml"));
    check(&["run"], &url, &["ftp://"], 1);
    // Unreadable / malformed key file.
    let mut s = Settings::new(dir.path(), "host=/nonexistent port=1");
    s.key_file = Some(dir.join("missing.key"));
    let nokey = s.write(&dir.join("nokey.toml"));
    check(&["run"], &nokey, &["missing.key"], 1);
    std::fs::write(dir.join("garbage.key"), "not a key\n").unwrap();
    s.key_file = Some(dir.join("garbage.key"));
    let garbage = s.write(&dir.join("garbage.toml"));
    check(&["run"], &garbage, &["garbage.key"], 1);
    // Unreachable server: gives up after connect_timeout with the cause.
    let port = common::walsafe::free_port();
    let mut s = Settings::new(
        dir.path(),
        &format!("host=127.0.0.1 port={port} user=walsafe"),
    );
    s.connect_timeout = "1s".into();
    let unreachable = s.write(&dir.join("unreachable.toml"));
    check(
        &["run"],
        &unreachable,
        &[&port.to_string(), "connect_timeout"],
        1,
    );
    // keygen never overwrites a key.
    let key = keygen(dir.path(), "k.key");
    let before = std::fs::read(&key).unwrap();
    let o = std::process::Command::new(common::walsafe::bin())
        .arg("keygen")
        .arg(&key)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert_eq!(std::fs::read(&key).unwrap(), before);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
}
