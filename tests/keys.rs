//! Key rings: a key file may hold several keys; the first encrypts, every
//! one decrypts. A key added with `walsafe keygen FILE --add` and moved
//! first encrypts the WAL archived from then on (the running agent reads
//! the file again on SIGHUP), while what the old key encrypted stays
//! readable; a ring without a key that objects need is named as such by
//! `check` and refused by `wal-fetch`.
//!
//! `walsafe key-rotate` makes the added key current under a running agent,
//! `--rewrite` re-encrypts every object (WAL and a base backup) under it,
//! killed midway and run again without anything becoming unreadable, and
//! `--retire` removes the old key once nothing needs it; a restore with the
//! new key alone holds every row. On `file://` and on S3.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::Duration;

use common::pg::{PgCluster, PgOptions, RecoveryOutcome, TestDir};
use common::setup::{current_lsn, keygen, output_text as text, setup, setup_s3, Setup};
use common::walsafe::{complete_segments, restore_promoted, walsafe, Agent, Settings};
use walsafe::repository::envelope::read_header;
use walsafe::repository::key::{load_key_ring, KEY_FILE_TAG};

/// The key id (hex) a stored object names in its header.
fn key_of(object: &Path) -> String {
    hex::encode(read_header(&std::fs::read(object).unwrap()).unwrap().key_id)
}

/// The key lines of a key file.
fn key_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| l.starts_with(KEY_FILE_TAG))
        .map(str::to_string)
        .collect()
}

#[test]
fn a_key_added_and_made_current_encrypts_new_wal_and_the_old_one_still_decrypts() {
    let pg = PgCluster::start(&PgOptions {
        name: "key-ring".into(),
        ..Default::default()
    });
    let dir = TestDir::new("key-ring");
    let mut settings = Settings::new(dir.path(), &pg.conninfo());
    let ring = keygen(dir.path(), "repo.key");
    settings.key_file = Some(ring.clone());
    let config = settings.write(&dir.join("walsafe.toml"));
    let repo = std::path::PathBuf::from(settings.repo_url.strip_prefix("file://").unwrap());
    let a = load_key_ring(&ring).unwrap().current().key_id_hex();

    let agent = Agent::start(&config, settings.metrics_port);
    pg.psql("CREATE TABLE t (n int)");
    let base = dir.join("base");
    pg.base_backup(&base, "none");
    pg.psql("INSERT INTO t SELECT generate_series(1, 1000)");
    pg.psql("SELECT pg_switch_wal()");
    agent.wait_archived(current_lsn(&pg), Duration::from_secs(60));
    let old = complete_segments(&repo.join("wal"));

    // A second key, added, then moved first; the running agent reads the
    // key file again on SIGHUP.
    let o = walsafe(&config, &["keygen", ring.to_str().unwrap(), "--add"]);
    assert!(o.status.success(), "{}", text(&o));
    let lines = key_lines(&ring);
    assert_eq!(lines.len(), 2);
    assert_eq!(
        load_key_ring(&ring).unwrap().current().key_id_hex(),
        a,
        "--add keeps the current key"
    );
    std::fs::write(&ring, format!("{}\n{}\n", lines[1], lines[0])).unwrap();
    let b = load_key_ring(&ring).unwrap().current().key_id_hex();
    assert_ne!(a, b);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    assert!(
        common::walsafe::wait_until(Duration::from_secs(10), || agent
            .log()
            .contains(&format!("new objects are encrypted with key id {b}"))),
        "the agent must say which key encrypts now; log:\n{}",
        agent.log()
    );
    pg.psql("INSERT INTO t SELECT generate_series(1001, 2000)");
    pg.psql("SELECT pg_switch_wal()");
    agent.wait_archived(current_lsn(&pg), Duration::from_secs(60));
    let now = complete_segments(&repo.join("wal"));
    let new: Vec<&String> = now.iter().filter(|n| !old.contains(n)).collect();
    assert!(!new.is_empty());
    for n in &old {
        assert_eq!(key_of(&repo.join("wal").join(n)), a, "{n}");
    }
    for n in &new {
        assert_eq!(key_of(&repo.join("wal").join(n)), b, "{n}");
    }
    let c = text(&walsafe(&config, &["check"]));
    let item = c
        .lines()
        .find(|l| l.contains("repository key"))
        .unwrap_or_else(|| panic!("{c}"));
    assert!(!item.contains("FAILED") && item.contains(&b), "{c}");

    // A restore replays WAL under both keys.
    let restored = restore_promoted(
        &base,
        dir.path(),
        &config,
        &["recovery_target_timeline = 'latest'"],
        "restore across two keys",
    );
    assert_eq!(restored.psql("SELECT count(*) FROM t"), "2000");
    drop(restored);

    // Without the old key, what it encrypted cannot be read: said so.
    let b_only = dir.join("b-only.key");
    std::fs::write(&b_only, format!("{}\n", lines[1])).unwrap();
    common::pg::chown_postgres(&b_only);
    let mut without_a = settings.clone();
    without_a.key_file = Some(b_only);
    without_a.prefetch = 0;
    without_a.prefetch_dir = dir.join("prefetch-b");
    let without_a = without_a.write(&dir.join("without-a.toml"));
    let c = text(&walsafe(&without_a, &["check"]));
    let item = c
        .lines()
        .find(|l| l.contains("repository key"))
        .unwrap_or_else(|| panic!("{c}"));
    assert!(item.contains("FAILED") && item.contains(&a), "{c}");
    let dest = dir.join("out");
    let o = walsafe(&without_a, &["wal-fetch", &old[0], dest.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(126), "{}", text(&o));
    assert!(text(&o).contains(&a), "name the missing key: {}", text(&o));
    drop(agent);
}

/// `walsafe key-rotate ARGS…` with the failpoints in `failpoints` set.
fn key_rotate(config: &Path, args: &[&str], failpoints: Option<&str>) -> std::process::Output {
    let mut cmd = std::process::Command::new(common::walsafe::bin_copy(config.parent().unwrap()));
    common::pg::as_postgres(&mut cmd);
    cmd.arg("--config")
        .arg(config)
        .arg("key-rotate")
        .args(args)
        .env("AWS_EC2_METADATA_DISABLED", "true");
    if let Some(f) = failpoints {
        cmd.env("FAILPOINTS", f);
    }
    common::walsafe::retry_text_busy(|| cmd.output()).unwrap()
}

/// Objects per key id, as the repository's own census counts them.
fn census(config: &Path) -> std::collections::BTreeMap<String, u64> {
    let cfg = walsafe::config::Config::load(config).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let repo = walsafe::repository::Repository::open(&cfg.repositories[0]).unwrap();
        let c = walsafe::rekey::census(&repo).await.unwrap();
        c.per_key.into_iter().map(|(k, t)| (k, t.objects)).collect()
    })
}

/// Every object of the repository read back, verified and decoded (a
/// chunk deleted meanwhile passed over): the keys of the WAL and backup
/// objects among them.
fn read_all(config: &Path) -> std::collections::BTreeSet<String> {
    let cfg = walsafe::config::Config::load(config).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let repo = walsafe::repository::Repository::open(&cfg.repositories[0]).unwrap();
        let c = walsafe::rekey::census(&repo).await.unwrap();
        let mut kept = std::collections::BTreeSet::new();
        for o in c.objects {
            match repo.get(&o.name).await {
                Ok(Some(_)) => {
                    let key = o.name.key();
                    if key.starts_with("wal/") || key.starts_with("backups/") {
                        kept.insert(key);
                    }
                }
                Ok(None) => {}
                Err(e) => panic!("{}: {e}", o.name),
            }
        }
        kept
    })
}

/// Every object of a `file://` repository by the key its header names,
/// read straight from the files.
fn keys_on_disk(repo: &Path) -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![repo.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().unwrap() != "walsafe.repo" {
                *out.entry(key_of(&p)).or_insert(0) += 1;
            }
        }
    }
    out
}

/// The scenario of the module doc on `s` (its key file a ring of one);
/// the old key retired by a run of its own, or with the rewrite's end.
fn rotate_rewrite_kill_and_retire(s: &Setup, file_repo: Option<&Path>, retire_separately: bool) {
    let ring = s.settings.key_file.clone().unwrap();
    let a = load_key_ring(&ring).unwrap().current().key_id_hex();
    let agent = Agent::start(&s.config, s.settings.metrics_port);
    s.pg.psql("CREATE TABLE t (n int)");
    s.pg.psql("INSERT INTO t SELECT generate_series(1, 1000)");
    let o = walsafe(&s.config, &["backup"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    s.pg.psql("INSERT INTO t SELECT generate_series(1001, 2000)");
    s.pg.psql("SELECT pg_switch_wal()");
    agent.wait_archived(current_lsn(&s.pg), Duration::from_secs(60));
    let before = census(&s.config);
    assert_eq!(before.keys().collect::<Vec<_>>(), [&a], "{before:?}");
    let stored = read_all(&s.config);

    let o = walsafe(&s.config, &["keygen", ring.to_str().unwrap(), "--add"]);
    assert!(o.status.success(), "{}", text(&o));
    let b = load_key_ring(&ring).unwrap().ids_hex()[1].clone();

    // The dry run says what each key protects and what would be done.
    let o = key_rotate(&s.config, &["--rewrite"], None);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let out = text(&o);
    let line_a = out.lines().find(|l| l.contains(&a)).unwrap();
    assert!(line_a.contains(&format!("{} objects", before[&a])), "{out}");
    assert!(out.contains(&format!("makes key {b} current")), "{out}");
    assert!(out.contains("dry run"), "{out}");
    assert_eq!(load_key_ring(&ring).unwrap().current().key_id_hex(), a);
    assert_eq!(census(&s.config), before, "a dry run changes nothing");

    // The agent has published its state (key-rotate finds it there).
    assert!(common::walsafe::wait_until(Duration::from_secs(20), || s
        .settings
        .spool
        .join("walsafe.state")
        .exists()));
    // Retiring a key objects need is refused, and nothing changes.
    let o = key_rotate(&s.config, &["--retire", &a, "--apply"], None);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("still need it"), "{}", text(&o));
    assert_eq!(load_key_ring(&ring).unwrap().current().key_id_hex(), a);

    // The rewrite, killed (SIGKILL) right after its third replacement:
    // the new key is current, the agent encrypts with it, both keys hold
    // objects, and the backup still verifies.
    let o = key_rotate(
        &s.config,
        &["--rewrite", "--apply"],
        Some("rekey::replaced=2*off->return"),
    );
    assert_eq!(o.status.signal(), Some(9), "{}", text(&o));
    assert_eq!(load_key_ring(&ring).unwrap().current().key_id_hex(), b);
    assert!(
        common::walsafe::wait_until(Duration::from_secs(10), || agent
            .log()
            .contains(&format!("new objects are encrypted with key id {b}"))),
        "key-rotate: {}\nagent log:\n{}",
        text(&o),
        agent.log()
    );
    let midway = census(&s.config);
    assert!(midway[&a] > 0 && midway[&b] >= 3, "{midway:?}");
    assert!(
        read_all(&s.config).is_superset(&stored),
        "midway, every object reads back and none is lost"
    );
    let o = walsafe(&s.config, &["backup-verify", "latest"]);
    assert_eq!(o.status.code(), Some(0), "midway: {}", text(&o));
    // status and check say what each key protects.
    let st = text(&walsafe(&s.config, &["status"]));
    assert!(
        st.contains(&format!("key id {b} (current): {} objects", midway[&b]))
            && st.contains(&format!("key id {a}: {} objects", midway[&a])),
        "{st}"
    );
    let c = text(&walsafe(&s.config, &["check"]));
    let item = c.lines().find(|l| l.contains("keys in use")).unwrap();
    assert!(
        item.starts_with("OK") && item.contains(&format!("key id {a}: {} objects", midway[&a])),
        "{c}"
    );
    // A ring without the old key: check names it, object by object.
    let b_only = s.dir.join("b-only.key");
    let b_line = key_lines(&ring).into_iter().next().unwrap();
    std::fs::write(&b_only, format!("{b_line}\n")).unwrap();
    common::pg::chown_postgres(&b_only);
    let mut without_a = s.settings.clone();
    without_a.key_file = Some(b_only);
    let without_a = without_a.write(&s.dir.join("without-a.toml"));
    let c = text(&walsafe(&without_a, &["check"]));
    let item = c.lines().find(|l| l.contains("keys in use")).unwrap();
    assert!(item.starts_with("FAILED") && item.contains(&a), "{c}");

    // More WAL, under the new key; then the rewrite finishes and the old
    // key is retired.
    s.pg.psql("INSERT INTO t SELECT generate_series(2001, 3000)");
    s.pg.psql("SELECT pg_switch_wal()");
    agent.wait_archived(current_lsn(&s.pg), Duration::from_secs(60));
    // A restore now spans a backup and WAL under both keys.
    restore_counts(&s.config, "key-rotate-restore-midway", "3000");
    let o = if retire_separately {
        // The rewrite finished, the old key kept: the next run finds no
        // new key (the old one is not taken for one), then retires it.
        let o = key_rotate(&s.config, &["--rewrite", "--apply"], None);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
        let o = key_rotate(&s.config, &[], None);
        assert!(
            text(&o).contains(&format!("key {b} stays current")),
            "{}",
            text(&o)
        );
        key_rotate(&s.config, &["--retire", &a, "--apply"], None)
    } else {
        key_rotate(&s.config, &["--rewrite", "--retire", &a, "--apply"], None)
    };
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains(&format!("retired key id {a}")),
        "{}",
        text(&o)
    );
    assert_eq!(
        load_key_ring(&ring).unwrap().ids_hex(),
        std::slice::from_ref(&b)
    );
    let after = census(&s.config);
    assert_eq!(after.keys().collect::<Vec<_>>(), [&b], "{after:?}");
    assert!(
        read_all(&s.config).is_superset(&stored),
        "every object reads back with the new key alone, none lost"
    );
    assert!(after[&b] >= before[&a], "{after:?} {before:?}");
    if let Some(repo) = file_repo {
        assert_eq!(keys_on_disk(repo), after, "the files say the same");
        let d: serde_json::Value =
            serde_json::from_slice(&std::fs::read(repo.join("walsafe.repo")).unwrap()).unwrap();
        assert_eq!(d["key_ids"], serde_json::json!([b]), "{d}");
        assert_eq!(d["key_id"], serde_json::json!(b), "{d}");
    }
    let c = text(&walsafe(&s.config, &["check"]));
    assert!(c.contains(" 0 FAILED"), "{c}");
    let o = walsafe(&s.config, &["backup-verify", "latest"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    drop(agent);

    // A restore with the new key alone holds every row.
    restore_counts(&s.config, "key-rotate-restore", "3000");
}

/// Restores the newest backup to the end of the archive and checks the
/// row count of `t`.
fn restore_counts(config: &Path, name: &str, rows: &str) {
    let work = TestDir::new(name);
    let data = work.join("data");
    let o = walsafe(
        config,
        &[
            "restore",
            data.to_str().unwrap(),
            "--target-action",
            "promote",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let restored = common::pg::start_restore(&data, &[]);
    assert_eq!(
        restored.wait_recovery_end(Duration::from_secs(120)),
        RecoveryOutcome::Promoted,
        "{}",
        restored.log_tail()
    );
    assert_eq!(restored.psql("SELECT count(*) FROM t"), rows);
}

#[test]
#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "needs the failpoints feature: run scripts/test.sh, or cargo test --features failpoints"
)]
fn key_rotate_rewrites_everything_under_a_running_agent_survives_a_kill_and_retires_the_old_key() {
    let mut s = setup("key-rotate", PgOptions::default());
    s.settings.key_file = Some(keygen(s.dir.path(), "repo.key"));
    s.config = s.settings.write(&s.dir.join("walsafe.toml"));
    let repo = std::path::PathBuf::from(s.settings.repo_url.strip_prefix("file://").unwrap());
    rotate_rewrite_kill_and_retire(&s, Some(&repo), true);
}

#[test]
#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "needs the failpoints feature: run scripts/test.sh, or cargo test --features failpoints"
)]
fn key_rotate_on_s3() {
    let s3 = common::s3::S3Server::start();
    let s = setup_s3("key-rotate-s3", PgOptions::default(), &s3, "key-rotate");
    rotate_rewrite_kill_and_retire(&s, None, false);
}
