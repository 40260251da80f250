//! `az://` against a real Azure Blob Storage server: Azurite 3.35.0 on
//! loopback (tests/common/azure.rs). The same checks as for S3
//! (tests/s3_archive.rs, tests/repository.rs): create-only writes and
//! conflicts that keep the original, verified reads that refuse damaged
//! and swapped blobs, error classes (missing container, wrong key,
//! outage), and end to end a real cluster archived by `walsafe run`,
//! fetched back byte for byte and restored, a conflict that keeps the local
//! copy, and an outage that the agent waits out with nothing lost.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use common::azure::{AzureServer, ACCOUNT_KEY};
use common::pg::{PgCluster, PgOptions, TestDir};
use common::setup::{current_lsn, keygen, stderr};
use common::walsafe::{restore_promoted, wait_until, walsafe, Agent, Settings};
use object_store::ObjectStore;
use walsafe::durable::Fsync;
use walsafe::pg::ClusterIdentity;
use walsafe::repository::envelope::EnvelopeError;
use walsafe::repository::faults::{Faults, Op};
use walsafe::repository::key::{write_key_file, Key};
use walsafe::repository::store::{PutResult, Store, StoreError};
use walsafe::repository::{Compression, ObjectName, RepositoryConfig, SegmentFile};
use walsafe::repository::{ErrorClass, PutOutcome, Repository, RepositoryError};

const SEG: &str = "000000010000000000000003";
fn sf(name: &str) -> SegmentFile {
    SegmentFile::parse(name).unwrap()
}

const SEG2: &str = "000000010000000000000004";
const PREFIX: &str = "cluster-a/wal-archive";

/// WAL-like test content of `len` bytes, distinct per `seed`.
fn wal(len: usize, seed: u8) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| (i as u8).wrapping_mul(seed) ^ ((i >> 9) as u8))
            .collect::<Vec<u8>>(),
    )
}

fn config(az: &AzureServer, key_file: Option<PathBuf>, retries: u32) -> RepositoryConfig {
    RepositoryConfig {
        name: "test".into(),
        retain_window: None,
        url: az.url(PREFIX),
        key_file,
        compression: Compression::Zstd,
        compression_level: 1,
        options: az.repo_options(),
        retries,
        request_timeout: std::time::Duration::from_secs(60),
        fsync: Fsync::Off,
    }
}

fn new_key(dir: &Path, tag: &str) -> (PathBuf, Key) {
    let p = dir.join(format!("{tag}.key"));
    let k = Key::generate();
    write_key_file(&p, &k).unwrap();
    (p, k)
}

/// A blob's bytes read behind walsafe's back (`key` relative to `prefix`).
async fn raw_get(az: &AzureServer, prefix: &str, key: &str) -> Option<Vec<u8>> {
    let path = object_store::path::Path::from(format!("{prefix}/{key}"));
    match az.raw_client().get(&path).await {
        Ok(r) => Some(r.bytes().await.unwrap().to_vec()),
        Err(object_store::Error::NotFound { .. }) => None,
        Err(e) => panic!("raw get {key}: {e}"),
    }
}

/// Overwrites a blob behind walsafe's back (damage, tampering).
async fn raw_put(az: &AzureServer, prefix: &str, key: &str, bytes: Vec<u8>) {
    let path = object_store::path::Path::from(format!("{prefix}/{key}"));
    az.raw_client().put(&path, bytes.into()).await.unwrap();
}

#[tokio::test]
async fn azurite_replace_swaps_only_the_blob_read_and_never_brings_one_back() {
    let az = AzureServer::start();
    let store = Store::open(&az.url(PREFIX), &az.repo_options(), 2).unwrap();
    store
        .put_if_absent("wal/r", Bytes::from_static(b"one"))
        .await
        .unwrap();
    let (_, seen) = store.get_versioned("wal/r").await.unwrap().unwrap();
    assert!(store
        .replace("wal/r", &seen, Bytes::from_static(b"two"))
        .await
        .unwrap());
    assert_eq!(raw_get(&az, PREFIX, "wal/r").await.unwrap(), b"two");
    // The ETag read is gone: refused (If-Match).
    assert!(!store
        .replace("wal/r", &seen, Bytes::from_static(b"three"))
        .await
        .unwrap());
    assert_eq!(raw_get(&az, PREFIX, "wal/r").await.unwrap(), b"two");
    let (_, seen) = store.get_versioned("wal/r").await.unwrap().unwrap();
    store.delete("wal/r").await.unwrap();
    assert!(!store
        .replace("wal/r", &seen, Bytes::from_static(b"four"))
        .await
        .unwrap());
    assert_eq!(raw_get(&az, PREFIX, "wal/r").await, None);
}

#[tokio::test]
async fn azurite_store_is_create_only_and_classifies_errors() {
    let az = AzureServer::start();
    let store = Store::open(&az.url(PREFIX), &az.repo_options(), 2).unwrap();
    assert_eq!(
        store
            .put_if_absent("probe/x", Bytes::from_static(b"first"))
            .await
            .unwrap(),
        PutResult::Created
    );
    // If the server ignored If-None-Match this would overwrite and report Created.
    assert_eq!(
        store
            .put_if_absent("probe/x", Bytes::from_static(b"second"))
            .await
            .unwrap(),
        PutResult::AlreadyExists
    );
    assert_eq!(store.get("probe/x").await.unwrap().unwrap(), &b"first"[..]);
    assert_eq!(raw_get(&az, PREFIX, "probe/x").await.unwrap(), b"first");
    assert_eq!(store.get("probe/none").await.unwrap(), None);
    // Listing and deleting, relative to the prefix; nothing outside it.
    raw_put(&az, "elsewhere", "probe/y", b"other".to_vec()).await;
    let l = store.list("probe/").await.unwrap();
    assert_eq!(l.len(), 1, "{l:?}");
    assert_eq!((l[0].key.as_str(), l[0].size), ("probe/x", 5));
    store.delete("probe/x").await.unwrap();
    store.delete("probe/x").await.unwrap();
    assert_eq!(store.get("probe/x").await.unwrap(), None);
    assert_eq!(raw_get(&az, PREFIX, "probe/x").await, None);

    // A container that does not exist: said so, for every operation, not retried.
    let counted = Faults::new();
    let missing = Store::open("az://no-such-container/p", &az.repo_options(), 3)
        .unwrap()
        .with_faults(counted.clone());
    let errors = [
        missing
            .put_if_absent("wal/x", Bytes::from_static(b"x"))
            .await
            .unwrap_err(),
        missing.get("wal/x").await.unwrap_err(),
        missing.list("wal/").await.unwrap_err(),
    ];
    for e in &errors {
        assert!(matches!(e, StoreError::BucketMissing { .. }), "{e}");
        assert!(!e.is_retryable());
        assert!(e.to_string().contains("no-such-container"), "{e}");
    }
    for op in [Op::Put, Op::Get, Op::List] {
        assert_eq!(counted.attempts(op), 1, "{op:?} was retried");
    }

    // A wrong account key: permission denied, not retried, key not shown.
    let wrong_key = "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXktd3Jvbmcta2V5LXdyb25n";
    let mut wrong = az.repo_options();
    wrong.insert("azure_storage_account_key".into(), wrong_key.into());
    let counted = Faults::new();
    let denied = Store::open(&az.url(PREFIX), &wrong, 3)
        .unwrap()
        .with_faults(counted.clone());
    for e in [
        denied.get("wal/x").await.unwrap_err(),
        denied
            .put_if_absent("wal/x", Bytes::from_static(b"x"))
            .await
            .unwrap_err(),
    ] {
        assert!(matches!(e, StoreError::PermissionDenied { .. }), "{e}");
        assert!(!e.is_retryable());
        let msg = e.to_string();
        assert!(msg.contains("Storage Blob Data Contributor"), "{msg}");
        assert!(
            !msg.contains(wrong_key) && !msg.contains(ACCOUNT_KEY),
            "{msg}"
        );
    }
    for op in [Op::Get, Op::Put] {
        assert_eq!(counted.attempts(op), 1, "{op:?} was retried");
    }

    // The emulator switch reaches Azurite through AZURITE_BLOB_STORAGE_URL
    // (one test per process under nextest: setting the variable is safe).
    std::env::set_var(
        "AZURITE_BLOB_STORAGE_URL",
        az.endpoint().replace("/devstoreaccount1", ""),
    );
    let mut emu = BTreeMap::new();
    emu.insert("azure_storage_use_emulator".to_string(), "true".to_string());
    let emulated = Store::open(&az.url("emulated"), &emu, 2).unwrap();
    emulated
        .put_if_absent("wal/x", Bytes::from_static(b"via the emulator switch"))
        .await
        .unwrap();
    assert_eq!(
        raw_get(&az, "emulated", "wal/x").await.unwrap(),
        b"via the emulator switch"
    );
    // With an endpoint as well, object_store would ignore the endpoint: refused.
    emu.insert("azure_storage_endpoint".to_string(), az.endpoint());
    let e = Store::open(&az.url("emulated"), &emu, 2).unwrap_err();
    assert!(matches!(e, StoreError::Misconfigured { .. }), "{e}");
}

#[tokio::test]
async fn azurite_repository_round_trip_conflict_chunks_and_damage() {
    let az = AzureServer::start();
    let keys = tempfile::tempdir().unwrap();
    let (kf, key) = new_key(keys.path(), "k");
    let (other_kf, _) = new_key(keys.path(), "other");
    let r = Repository::open(&config(&az, Some(kf.clone()), 3)).unwrap();

    // Pinning: create-only, another cluster refused.
    let me = ClusterIdentity::new(7_301_234_567_890_123_456, 150007, 16 << 20);
    let d = r.pin(&me).await.unwrap();
    assert_eq!(d.key_id.as_deref(), Some(key.key_id_hex().as_str()));
    assert_eq!(r.pin(&me).await.unwrap(), d);
    let stranger = ClusterIdentity {
        system_identifier: 7_400_000_000_000_000_001,
        ..me
    };
    let e = r.pin(&stranger).await.unwrap_err();
    assert!(matches!(e, RepositoryError::ClusterMismatch { .. }), "{e}");
    let text = String::from_utf8(raw_get(&az, PREFIX, "walsafe.repo").await.unwrap()).unwrap();
    assert!(text.contains("\"7301234567890123456\""), "{text}");

    // Round trip of every kind of WAL file.
    let seg = wal(16 << 20, 3);
    assert_eq!(
        r.put_wal(SEG, seg.clone()).await.unwrap(),
        PutOutcome::Stored
    );
    let history = Bytes::from_static(b"1\t0/3000000\tno recovery target specified\n");
    r.put_wal("00000002.history", history.clone())
        .await
        .unwrap();
    let partial = wal(5000, 9);
    r.put_wal("000000010000000000000005.partial", partial.clone())
        .await
        .unwrap();
    assert_eq!(r.get_wal(SEG).await.unwrap().unwrap(), seg.to_vec());
    assert_eq!(
        r.get_wal("00000002.history").await.unwrap().unwrap(),
        history.to_vec()
    );
    assert_eq!(
        r.get_wal("000000010000000000000005.partial")
            .await
            .unwrap()
            .unwrap(),
        partial.to_vec()
    );
    assert_eq!(r.get_wal(SEG2).await.unwrap(), None);
    assert_eq!(
        r.list_wal().await.unwrap(),
        [SEG, "000000010000000000000005.partial", "00000002.history"]
            .map(|n| ObjectName::wal(n).unwrap())
            .to_vec()
    );

    // Same content again: success. Different content: a conflict, and the
    // stored blob stays as it was.
    let stored = raw_get(&az, PREFIX, &format!("wal/{SEG}")).await.unwrap();
    assert_eq!(
        r.put_wal(SEG, seg.clone()).await.unwrap(),
        PutOutcome::AlreadyStored
    );
    let mut other = seg.to_vec();
    other[8192 * 100 + 17] ^= 0xff;
    let e = r.put_wal(SEG, Bytes::from(other)).await.unwrap_err();
    assert!(
        matches!(e, RepositoryError::Conflict { ref name, .. } if name == SEG),
        "{e}"
    );
    assert_eq!(e.class(), ErrorClass::Corrupt);
    assert_eq!(
        raw_get(&az, PREFIX, &format!("wal/{SEG}")).await.unwrap(),
        stored
    );

    // Chunks of a filling segment: listed, assembled, deleted.
    let all = wal(0x30000, 5);
    for w in [0usize, 0x2000, 0x12000, 0x30000].windows(2) {
        r.put_chunk(&sf(SEG2), w[0] as u64, all.slice(w[0]..w[1]))
            .await
            .unwrap();
    }
    assert_eq!(
        r.put_chunk(&sf(SEG2), 0, all.slice(0..0x2000))
            .await
            .unwrap(),
        PutOutcome::AlreadyStored
    );
    let chunks = r.list_chunks(&sf(SEG2)).await.unwrap();
    assert_eq!(
        chunks,
        vec![(0, 0x2000), (0x2000, 0x12000), (0x12000, 0x30000)]
    );
    let mut assembled = Vec::new();
    for (s, e) in chunks {
        assembled.extend(r.get_chunk(&sf(SEG2), s, e).await.unwrap().unwrap());
    }
    assert_eq!(assembled, all.to_vec());
    assert_eq!(r.list_chunked_segments().await.unwrap(), vec![sf(SEG2)]);
    r.delete_chunks(&sf(SEG2)).await.unwrap();
    assert!(r.list_chunks(&sf(SEG2)).await.unwrap().is_empty());

    // Damaged blobs: flipped, truncated, swapped, wrong key.
    let small = wal(1 << 20, 7);
    let victim = "000000010000000000000006";
    let neighbour = "000000010000000000000007";
    r.put_wal(victim, small.clone()).await.unwrap();
    r.put_wal(neighbour, wal(1 << 20, 11)).await.unwrap();
    let key_of = |n: &str| format!("wal/{n}");
    let original = raw_get(&az, PREFIX, &key_of(victim)).await.unwrap();
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
    raw_put(&az, PREFIX, &key_of(victim), flipped).await;
    let e = corrupt(r.get_wal(victim).await.unwrap_err());
    assert!(
        matches!(e, EnvelopeError::AuthenticationFailed { .. }),
        "{e:?}"
    );
    raw_put(
        &az,
        PREFIX,
        &key_of(victim),
        original[..original.len() - 100].to_vec(),
    )
    .await;
    let e = corrupt(r.get_wal(victim).await.unwrap_err());
    assert!(matches!(e, EnvelopeError::Truncated { .. }), "{e:?}");
    let swapped = raw_get(&az, PREFIX, &key_of(neighbour)).await.unwrap();
    raw_put(&az, PREFIX, &key_of(victim), swapped).await;
    let e = corrupt(r.get_wal(victim).await.unwrap_err());
    assert!(
        matches!(e, EnvelopeError::NameMismatch { ref expected, ref found } if expected == victim && found == neighbour),
        "{e:?}"
    );
    raw_put(&az, PREFIX, &key_of(victim), original.clone()).await;
    assert_eq!(r.get_wal(victim).await.unwrap().unwrap(), small.to_vec());
    let wrong = Repository::open(&config(&az, Some(other_kf), 3)).unwrap();
    let e = corrupt(wrong.get_wal(victim).await.unwrap_err());
    assert!(matches!(e, EnvelopeError::WrongKey { .. }), "{e:?}");

    // A damaged blob under a name we want to write: not overwritten.
    let mut bad = original.clone();
    bad[200] ^= 0x10;
    raw_put(&az, PREFIX, &key_of(victim), bad.clone()).await;
    let e = r.put_wal(victim, small.clone()).await.unwrap_err();
    assert!(
        matches!(e, RepositoryError::ExistingUnreadable { .. }),
        "{e}"
    );
    assert_eq!(raw_get(&az, PREFIX, &key_of(victim)).await.unwrap(), bad);
}

#[tokio::test]
async fn azurite_outage_is_unreachable_never_not_found_and_ends_with_the_server() {
    let mut az = AzureServer::start();
    let keys = tempfile::tempdir().unwrap();
    let (kf, _) = new_key(keys.path(), "outage");
    let r = Repository::open(&config(&az, Some(kf), 3)).unwrap();
    let seg = wal(100_000, 3);
    r.put_wal(SEG, seg.clone()).await.unwrap();
    az.stop();

    let e = r.get_wal(SEG).await.unwrap_err();
    match &e {
        RepositoryError::Store(StoreError::Unreachable { attempts, .. }) => {
            assert_eq!(*attempts, 3)
        }
        other => panic!("expected Unreachable, got {other}"),
    }
    assert_eq!(e.class(), ErrorClass::Unavailable);
    assert!(e.is_retryable());
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("az://walsafe-test/{PREFIX}"))
            && msg.contains("unreachable")
            && msg.contains(&format!("wal/{SEG}")),
        "{msg}"
    );
    // Missing must not be confused with unreachable (rule 4).
    let e2 = r.get_wal(SEG2).await.unwrap_err();
    assert!(
        matches!(e2, RepositoryError::Store(StoreError::Unreachable { .. })),
        "{e2}"
    );
    let e3 = r.put_wal(SEG2, wal(1000, 1)).await.unwrap_err();
    assert!(
        matches!(e3, RepositoryError::Store(StoreError::Unreachable { .. })),
        "{e3}"
    );
    let e4 = r.list_wal().await.unwrap_err();
    assert!(
        matches!(e4, RepositoryError::Store(StoreError::Unreachable { .. })),
        "{e4}"
    );
    for text in [e.to_string(), format!("{e4:?}"), format!("{r:?}")] {
        assert!(!text.contains(ACCOUNT_KEY), "{text}");
    }

    // The server is back, with everything it had.
    az.restart();
    assert_eq!(r.get_wal(SEG).await.unwrap().unwrap(), seg.to_vec());
    assert_eq!(
        r.put_wal(SEG2, wal(1000, 1)).await.unwrap(),
        PutOutcome::Stored
    );
    assert_eq!(
        r.list_wal().await.unwrap(),
        [SEG, SEG2].map(|n| ObjectName::wal(n).unwrap()).to_vec()
    );
}

/// A cluster and a walsafe configuration for an `az://` repository.
struct AzSetup {
    az: AzureServer,
    pg: PgCluster,
    dir: TestDir,
    settings: Settings,
    config: PathBuf,
}

fn az_setup(name: &str, prefix: &str, key: bool, retries: u32) -> AzSetup {
    let az = AzureServer::start();
    let pg = PgCluster::start(&PgOptions {
        name: name.into(),
        ..Default::default()
    });
    let dir = TestDir::new(name);
    let mut settings = Settings::new(dir.path(), &pg.conninfo());
    settings.repo_url = az.url(prefix);
    settings.repo_options = az.repo_options().into_iter().collect();
    settings.retries = retries;
    if key {
        settings.key_file = Some(keygen(dir.path(), "repo.key"));
    }
    let config = settings.write(&dir.join("walsafe.toml"));
    AzSetup {
        az,
        pg,
        dir,
        settings,
        config,
    }
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
fn az_repository_streams_fetches_byte_exact_and_restores_to_the_last_commit() {
    let s = az_setup("aze2e", "cluster-a", true, 3);
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
    let end = current_lsn(&s.pg);
    agent.wait_archived(end, Duration::from_secs(60));
    assert!(wait_until(Duration::from_secs(30), || complete_segments(
        &recv_dir
    )
    .len()
        >= 4));
    s.pg.stop_immediate();
    agent.kill9();
    let _ = recv.kill();
    let _ = recv.wait();

    // Every complete segment comes back exactly as pg_receivewal wrote it.
    let names = complete_segments(&recv_dir);
    assert!(names.len() >= 4, "pg_receivewal wrote {names:?}");
    let work = s.dir.subdir("work");
    for name in &names {
        let (code, ours, err) = fetch(&s.config, name, &work);
        assert_eq!(code, Some(0), "wal-fetch {name}: {err}");
        let theirs = std::fs::read(recv_dir.join(name)).unwrap();
        assert!(
            ours.unwrap() == theirs,
            "{name} differs from pg_receivewal's"
        );
    }
    assert_eq!(
        fetch(&s.config, "0000000100000000000000F0", &work).0,
        Some(1)
    );
    let verify = walsafe(&s.config, &["wal-verify", "--json"]);
    assert_eq!(
        verify.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );

    // A corrupted or swapped blob is refused (exit 126), nothing written.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (victim, other) = (&names[1], &names[2]);
    let original = rt
        .block_on(raw_get(&s.az, "cluster-a", &format!("wal/{victim}")))
        .unwrap();
    let mut flipped = original.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x01;
    let swapped = rt
        .block_on(raw_get(&s.az, "cluster-a", &format!("wal/{other}")))
        .unwrap();
    for (what, bytes) in [("corrupted", flipped), ("swapped", swapped)] {
        rt.block_on(raw_put(&s.az, "cluster-a", &format!("wal/{victim}"), bytes));
        let (code, data, err) = fetch(&s.config, victim, &work);
        assert_eq!(code, Some(126), "{what}: {err}");
        assert!(data.is_none(), "{what}: nothing may be written");
        assert!(err.contains(victim.as_str()), "{what}: {err}");
    }
    rt.block_on(raw_put(
        &s.az,
        "cluster-a",
        &format!("wal/{victim}"),
        original,
    ));

    // The last commit lives only in chunks of a still-filling segment.
    let restored = restore_promoted(
        &backup,
        s.dir.path(),
        &s.config,
        &["recovery_target_timeline = 'latest'"],
        "restore from az://",
    );
    assert_eq!(restored.psql("SELECT count(*) FROM t WHERE id = 99"), "1");
    assert_eq!(restored.psql("SELECT count(DISTINCT id) FROM t"), "4");
}

#[test]
fn az_conflict_keeps_the_local_copy_and_the_stored_blob() {
    let s = az_setup("azconf", "conflict", false, 2);
    let agent = Agent::start(&s.config, s.settings.metrics_port);
    s.pg.psql("CREATE TABLE t (pad text)");
    agent.wait_archived(current_lsn(&s.pg), Duration::from_secs(30));

    // Someone else's WAL under the name of the segment now filling.
    let filling = s.pg.psql("SELECT pg_walfile_name(pg_current_wal_lsn())");
    let repo = Repository::open(&RepositoryConfig {
        name: "test".into(),
        retain_window: None,
        url: s.settings.repo_url.clone(),
        key_file: None,
        compression: Compression::Zstd,
        compression_level: 1,
        options: s.az.repo_options(),
        retries: 2,
        request_timeout: std::time::Duration::from_secs(60),
        fsync: Fsync::Off,
    })
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let planted = wal(16 << 20, 5);
    rt.block_on(repo.put_wal(&filling, planted.clone()))
        .unwrap();
    let planted_blob = rt
        .block_on(raw_get(&s.az, "conflict", &format!("wal/{filling}")))
        .unwrap();

    s.pg.psql("INSERT INTO t SELECT repeat(md5(g::text), 30) FROM generate_series(1, 3000) g");
    s.pg.psql("SELECT pg_switch_wal()");
    s.pg.psql("INSERT INTO t VALUES ('after the conflict')");
    let conflicts = |a: &Agent| {
        common::walsafe::counter_sum(&a.metrics(), "walsafe_upload_conflicts_total", "")
    };
    assert!(
        wait_until(Duration::from_secs(30), || conflicts(&agent) >= 1.0),
        "no conflict counted; log:\n{}",
        agent.log()
    );
    let log = agent.log();
    assert!(
        log.contains(&filling) && log.contains("local copy is kept"),
        "{log}"
    );
    // The local copy stays in the spool; the stored blob is untouched.
    assert!(
        s.settings.spool.join(&filling).exists(),
        "{filling} left the spool"
    );
    assert_eq!(
        rt.block_on(raw_get(&s.az, "conflict", &format!("wal/{filling}")))
            .unwrap(),
        planted_blob
    );
    // The agent carries on: the archive is honestly stuck before the
    // conflicting segment, and the next segment's WAL is still shipped.
    assert!(agent.gauge("walsafe_replication_connected") == 1.0);
    assert!(
        wait_until(Duration::from_secs(10), || !rt
            .block_on(repo.list_chunked_segments())
            .unwrap()
            .is_empty()),
        "nothing shipped after the conflict; log:\n{}",
        agent.log()
    );
}

#[test]
fn az_storage_outage_keeps_wal_in_the_spool_then_drains_it_with_nothing_lost() {
    let mut s = az_setup("azout", "outage", true, 2);
    let mut agent = Agent::start(&s.config, s.settings.metrics_port);
    s.pg.psql("CREATE TABLE t (n int, pad text)");
    let backup = s.dir.join("backup");
    s.pg.base_backup(&backup, "none");
    agent.wait_archived(current_lsn(&s.pg), Duration::from_secs(30));
    let archived_before = agent.gauge("walsafe_archived_lsn_bytes") as u64;

    s.az.stop();
    for i in 0..3 {
        s.pg.psql(&format!(
            "INSERT INTO t SELECT {i}, repeat(md5(g::text), 30) FROM generate_series(1, 10000) g"
        ));
        s.pg.psql("SELECT pg_switch_wal()");
    }
    s.pg.psql("INSERT INTO t VALUES (99, 'written during the outage')");
    let end = current_lsn(&s.pg);
    let errors = |a: &Agent| -> f64 {
        a.metrics()
            .iter()
            .filter(|(k, _)| {
                k.starts_with("walsafe_uploads_total") && k.contains("result=\"error\"")
            })
            .map(|(_, v)| *v)
            .sum()
    };
    assert!(
        wait_until(Duration::from_secs(60), || agent
            .log()
            .contains("no upload has succeeded")
            && agent.gauge("walsafe_spool_pending_segments") >= 2.0),
        "no escalation or nothing pending; log:\n{}",
        agent.log()
    );
    assert!(errors(&agent) >= 5.0, "errors counted: {}", errors(&agent));
    // Still running and receiving; the archive is honestly behind, and the
    // spool keeps what is not stored.
    assert!(
        agent.try_wait().is_none(),
        "the agent must not exit during an outage"
    );
    assert!(agent.gauge("walsafe_flushed_lsn_bytes") as u64 >= end - (16 << 20));
    assert!(agent.gauge("walsafe_archived_lsn_bytes") as u64 <= archived_before + (16 << 20));
    assert!(agent.gauge("walsafe_archive_lag_seconds") > 0.0);
    let spooled = complete_segments(&s.settings.spool);
    assert!(
        spooled.len() >= 2,
        "the spool keeps what is not stored: {spooled:?}"
    );
    // wal-fetch during the outage: fatal, never "not found".
    let work = s.dir.subdir("work");
    let (code, _, err) = fetch(&s.config, &spooled[0], &work);
    assert_eq!(code, Some(126), "{err}");

    // Storage is back: the agent drains the spool, nothing is lost.
    s.az.restart();
    agent.wait_archived(end, Duration::from_secs(60));
    assert!(
        wait_until(Duration::from_secs(30), || complete_segments(
            &s.settings.spool
        )
        .is_empty()),
        "stored segments still spooled: {:?}",
        complete_segments(&s.settings.spool)
    );
    // The gauge is sampled once a second.
    assert!(
        wait_until(Duration::from_secs(5), || agent
            .gauge("walsafe_spool_pending_segments")
            == 0.0),
        "pending: {}",
        agent.gauge("walsafe_spool_pending_segments")
    );
    assert!(
        agent.log().contains("uploads succeed again"),
        "{}",
        agent.log()
    );
    for name in &spooled {
        let (code, _, err) = fetch(&s.config, name, &work);
        assert_eq!(code, Some(0), "{name}: {err}");
    }
    assert!(agent.terminate().success());
    s.pg.stop_immediate();
    let verify = walsafe(&s.config, &["wal-verify"]);
    assert_eq!(
        verify.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    let restored = restore_promoted(
        &backup,
        s.dir.path(),
        &s.config,
        &["recovery_target_timeline = 'latest'"],
        "restore after the outage",
    );
    assert_eq!(restored.psql("SELECT count(*) FROM t WHERE n < 3"), "30000");
    assert_eq!(restored.psql("SELECT count(*) FROM t WHERE n = 99"), "1");
}
