//! Key rings: a key file may hold several keys; the first encrypts, every
//! one decrypts. A key added with `walsafe keygen FILE --add` and moved
//! first encrypts the WAL archived from then on (the running agent reads
//! the file again on SIGHUP), while what the old key encrypted stays
//! readable; a ring without a key that objects need is named as such by
//! `check` and refused by `wal-fetch`.

mod common;

use std::path::Path;
use std::time::Duration;

use common::pg::{PgCluster, PgOptions, TestDir};
use common::setup::{current_lsn, keygen, output_text as text};
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
