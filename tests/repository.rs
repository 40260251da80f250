//! The repository layer against real storage: a file:// directory and a
//! real S3 server (moto on loopback). Every behaviour that matters for the
//! data-safety rules is checked on both: create-only writes, conflicts
//! that leave the original untouched, verified reads, descriptor pinning,
//! damaged objects, and a storage outage.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::s3::{S3Server, SECRET_ACCESS_KEY};
use object_store::ObjectStore;
use walsafe::durable::Fsync;
use walsafe::pg::ClusterIdentity;
use walsafe::repository::envelope::EnvelopeError;
use walsafe::repository::key::{write_key_file, Key};
use walsafe::repository::store::{PutResult, Store, StoreError};
use walsafe::repository::{Compression, ObjectName, RepositoryConfig, SegmentFile};
use walsafe::repository::{ErrorClass, PutOutcome, Repository, RepositoryError};

const SEG: &str = "000000010000000000000003";
const SEG2: &str = "000000010000000000000004";

fn sf(name: &str) -> SegmentFile {
    SegmentFile::parse(name).unwrap()
}

/// One storage backend under test, with raw access to its objects.
enum Backend {
    File {
        dir: tempfile::TempDir,
    },
    S3 {
        server: S3Server,
        prefix: String,
        keys: tempfile::TempDir,
    },
}

impl Backend {
    fn file() -> Backend {
        Backend::File {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn s3() -> Backend {
        Backend::S3 {
            server: S3Server::start(),
            prefix: "cluster-a/wal-archive".into(),
            keys: tempfile::tempdir().unwrap(),
        }
    }

    fn both() -> Vec<Backend> {
        vec![Backend::file(), Backend::s3()]
    }

    fn name(&self) -> &'static str {
        match self {
            Backend::File { .. } => "file",
            Backend::S3 { .. } => "s3",
        }
    }

    fn url(&self) -> String {
        match self {
            Backend::File { dir } => format!("file://{}/repo", dir.path().display()),
            Backend::S3 { server, prefix, .. } => server.url(prefix),
        }
    }

    fn options(&self) -> BTreeMap<String, String> {
        match self {
            Backend::File { .. } => BTreeMap::new(),
            Backend::S3 { server, .. } => server.repo_options(),
        }
    }

    fn config(&self, key_file: Option<PathBuf>, retries: u32) -> RepositoryConfig {
        RepositoryConfig {
            name: "test".into(),
            retain_window: None,
            url: self.url(),
            key_file,
            compression: Compression::Zstd,
            compression_level: 1,
            options: self.options(),
            retries,
            request_timeout: std::time::Duration::from_secs(60),
            fsync: Fsync::Off,
        }
    }

    /// A new key file in the test's temporary directory (removed on drop).
    fn key_file(&self, tag: &str) -> (PathBuf, Key) {
        let dir = match self {
            Backend::File { dir } => dir.path(),
            Backend::S3 { keys, .. } => keys.path(),
        };
        let p = dir.join(format!("{tag}.key"));
        let k = Key::generate();
        write_key_file(&p, &k).unwrap();
        (p, k)
    }

    async fn raw_get(&self, key: &str) -> Option<Vec<u8>> {
        match self {
            Backend::File { dir } => std::fs::read(dir.path().join("repo").join(key)).ok(),
            Backend::S3 { server, prefix, .. } => {
                let path = object_store::path::Path::from(format!("{prefix}/{key}"));
                match server.raw_client().get(&path).await {
                    Ok(r) => Some(r.bytes().await.unwrap().to_vec()),
                    Err(object_store::Error::NotFound { .. }) => None,
                    Err(e) => panic!("raw get {key}: {e}"),
                }
            }
        }
    }

    /// Overwrites an object behind walsafe's back (damage, tampering).
    async fn raw_put(&self, key: &str, bytes: Vec<u8>) {
        match self {
            Backend::File { dir } => {
                let p = dir.path().join("repo").join(key);
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(p, bytes).unwrap();
            }
            Backend::S3 { server, prefix, .. } => {
                let path = object_store::path::Path::from(format!("{prefix}/{key}"));
                server.raw_client().put(&path, bytes.into()).await.unwrap();
            }
        }
    }
}

/// WAL-like test content of `len` bytes, distinct per `seed`.
fn wal(len: usize, seed: u8) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| (i as u8).wrapping_mul(seed) ^ ((i >> 9) as u8))
            .collect::<Vec<u8>>(),
    )
}

#[tokio::test]
async fn round_trip_already_stored_and_conflict_on_both_backends() {
    for b in Backend::both() {
        let (kf, _) = b.key_file("k");
        let r = Repository::open(&b.config(Some(kf), 3)).unwrap();
        let seg = wal(16 << 20, 3);
        assert_eq!(
            r.put_wal(SEG, seg.clone()).await.unwrap(),
            PutOutcome::Stored,
            "{}",
            b.name()
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
        assert_eq!(r.get_wal(SEG2).await.unwrap(), None, "{}", b.name());
        assert_eq!(
            r.list_wal().await.unwrap(),
            [SEG, "000000010000000000000005.partial", "00000002.history"]
                .map(|n| ObjectName::wal(n).unwrap())
                .to_vec()
        );

        // Same content again: success, nothing rewritten.
        let stored = b.raw_get(&format!("wal/{SEG}")).await.unwrap();
        assert_eq!(
            r.put_wal(SEG, seg.clone()).await.unwrap(),
            PutOutcome::AlreadyStored
        );
        // Different content: a conflict, and the original stays as it was.
        let mut other = seg.to_vec();
        other[8192 * 100 + 17] ^= 0xff;
        let e = r.put_wal(SEG, Bytes::from(other)).await.unwrap_err();
        assert!(
            matches!(e, RepositoryError::Conflict { ref name, .. } if name == SEG),
            "{}: {e}",
            b.name()
        );
        assert_eq!(e.class(), ErrorClass::Corrupt);
        assert_eq!(b.raw_get(&format!("wal/{SEG}")).await.unwrap(), stored);
        assert_eq!(r.get_wal(SEG).await.unwrap().unwrap(), seg.to_vec());
    }
}

#[tokio::test]
async fn replace_swaps_only_the_object_read_and_never_brings_one_back_on_both_backends() {
    for b in Backend::both() {
        let store = Store::open(&b.url(), &b.options(), 2).unwrap();
        store
            .put_if_absent("wal/r", Bytes::from_static(b"one"))
            .await
            .unwrap();
        let (_, seen) = store.get_versioned("wal/r").await.unwrap().unwrap();
        assert!(store
            .replace("wal/r", &seen, Bytes::from_static(b"two"))
            .await
            .unwrap());
        assert_eq!(b.raw_get("wal/r").await.unwrap(), b"two", "{}", b.name());
        if let Backend::S3 { .. } = b {
            // The version read is gone: the conditional write is refused
            // (file:// exchanges whatever is there, see Store::replace).
            assert!(!store
                .replace("wal/r", &seen, Bytes::from_static(b"three"))
                .await
                .unwrap());
            assert_eq!(b.raw_get("wal/r").await.unwrap(), b"two");
        }
        let (_, seen) = store.get_versioned("wal/r").await.unwrap().unwrap();
        store.delete("wal/r").await.unwrap();
        assert!(!store
            .replace("wal/r", &seen, Bytes::from_static(b"four"))
            .await
            .unwrap());
        assert_eq!(store.get("wal/r").await.unwrap(), None, "{}", b.name());
        assert!(store.list("wal/").await.unwrap().is_empty(), "{}", b.name());
    }
}

#[tokio::test]
async fn s3_server_honours_conditional_create() {
    let b = Backend::s3();
    let store = Store::open(&b.url(), &b.options(), 2).unwrap();
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
    assert_eq!(b.raw_get("probe/x").await.unwrap(), b"first");
    // Listing and deleting, relative to the prefix.
    let l = store.list("probe/").await.unwrap();
    assert_eq!(l.len(), 1);
    assert_eq!(l[0].key, "probe/x");
    assert_eq!(l[0].size, 5);
    store.delete("probe/x").await.unwrap();
    store.delete("probe/x").await.unwrap();
    assert_eq!(store.get("probe/x").await.unwrap(), None);
}

#[tokio::test]
async fn chunks_on_both_backends() {
    for b in Backend::both() {
        let r = Repository::open(&b.config(None, 3)).unwrap();
        let all = wal(0x30000, 5);
        let cuts = [0usize, 0x2000, 0x12000, 0x30000];
        for w in cuts.windows(2) {
            let out = r
                .put_chunk(&sf(SEG), w[0] as u64, all.slice(w[0]..w[1]))
                .await
                .unwrap();
            assert_eq!(out, PutOutcome::Stored);
        }
        r.put_chunk(&sf(SEG2), 0, wal(100, 1)).await.unwrap();
        // A re-upload of the same chunk is fine.
        assert_eq!(
            r.put_chunk(&sf(SEG), 0, all.slice(0..0x2000))
                .await
                .unwrap(),
            PutOutcome::AlreadyStored
        );
        assert_eq!(
            r.list_chunks(&sf(SEG)).await.unwrap(),
            vec![(0, 0x2000), (0x2000, 0x12000), (0x12000, 0x30000)],
            "{}",
            b.name()
        );
        assert!(b
            .raw_get("chunks/000000010000000000000003/00002000-00012000")
            .await
            .is_some());
        let mut assembled = Vec::new();
        for (s, e) in r.list_chunks(&sf(SEG)).await.unwrap() {
            assembled.extend(r.get_chunk(&sf(SEG), s, e).await.unwrap().unwrap());
        }
        assert_eq!(assembled, all.to_vec());
        assert_eq!(r.get_chunk(&sf(SEG), 0x30000, 0x31000).await.unwrap(), None);
        assert_eq!(
            r.list_chunked_segments().await.unwrap(),
            vec![sf(SEG), sf(SEG2)]
        );
        r.delete_chunks(&sf(SEG)).await.unwrap();
        assert!(r.list_chunks(&sf(SEG)).await.unwrap().is_empty());
        assert_eq!(r.list_chunks(&sf(SEG2)).await.unwrap(), vec![(0, 100)]);
        assert_eq!(r.list_chunked_segments().await.unwrap(), vec![sf(SEG2)]);
        // Chunks never show up as WAL.
        assert!(r.list_wal().await.unwrap().is_empty());
    }
}

#[tokio::test]
async fn descriptor_pins_the_repository_on_both_backends() {
    for b in Backend::both() {
        let (kf, key) = b.key_file("pin");
        let (other_kf, _) = b.key_file("other");
        let me = ClusterIdentity::new(7_301_234_567_890_123_456, 150007, 16 << 20);
        let r = Repository::open(&b.config(Some(kf.clone()), 3)).unwrap();
        assert_eq!(r.descriptor().await.unwrap(), None);
        let d = r.pin(&me).await.unwrap();
        assert_eq!(d.key_id.as_deref(), Some(key.key_id_hex().as_str()));
        assert_eq!(r.descriptor().await.unwrap().unwrap(), d);
        assert_eq!(r.pin(&me).await.unwrap(), d);
        let text = String::from_utf8(b.raw_get("walsafe.repo").await.unwrap()).unwrap();
        assert!(text.contains("\"7301234567890123456\""), "{text}");

        // Another cluster: refused, naming both identifiers and the fix.
        let stranger = ClusterIdentity {
            system_identifier: 7_400_000_000_000_000_001,
            ..me
        };
        let e = r.pin(&stranger).await.unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(e, RepositoryError::ClusterMismatch { .. }),
            "{msg}"
        );
        assert!(
            msg.contains("7301234567890123456") && msg.contains("7400000000000000001"),
            "{msg}"
        );
        assert!(msg.contains("another URL or prefix"), "{msg}");

        // Wrong key, no key.
        let wrong = Repository::open(&b.config(Some(other_kf), 3)).unwrap();
        let e = wrong.pin(&me).await.unwrap_err();
        assert!(
            matches!(e, RepositoryError::KeyMismatch { .. }),
            "{}: {e}",
            b.name()
        );
        let none = Repository::open(&b.config(None, 3)).unwrap();
        let e = none.pin(&me).await.unwrap_err();
        assert!(matches!(e, RepositoryError::KeyMissing { .. }), "{e}");
        assert!(e.to_string().contains(&key.key_id_hex()));

        // The descriptor is create-only: the stranger did not replace it.
        let text_after = String::from_utf8(b.raw_get("walsafe.repo").await.unwrap()).unwrap();
        assert_eq!(text, text_after);

        // Re-pinning by editing walsafe.repo without the key is detected.
        b.raw_put(
            "walsafe.repo",
            text.replace("7301234567890123456", "7400000000000000001")
                .into_bytes(),
        )
        .await;
        let e = r.pin(&stranger).await.unwrap_err();
        assert!(
            matches!(e, RepositoryError::DescriptorTampered { .. }),
            "{e}"
        );
    }
}

#[tokio::test]
async fn damaged_objects_give_corrupt_errors_on_both_backends() {
    for b in Backend::both() {
        let (kf, _) = b.key_file("dmg");
        let (other_kf, _) = b.key_file("dmg-other");
        let r = Repository::open(&b.config(Some(kf), 3)).unwrap();
        let seg = wal(1 << 20, 7);
        r.put_wal(SEG, seg.clone()).await.unwrap();
        r.put_wal(SEG2, wal(1 << 20, 11)).await.unwrap();
        let original = b.raw_get(&format!("wal/{SEG}")).await.unwrap();

        let expect_corrupt = |e: RepositoryError, what: &str| -> EnvelopeError {
            assert_eq!(e.class(), ErrorClass::Corrupt, "{}: {what}: {e}", b.name());
            match e {
                RepositoryError::Envelope { source, .. } => source,
                other => panic!("{what}: expected an envelope error, got {other}"),
            }
        };

        // One flipped byte in the body.
        let mut flipped = original.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0x01;
        b.raw_put(&format!("wal/{SEG}"), flipped).await;
        let e = expect_corrupt(r.get_wal(SEG).await.unwrap_err(), "flipped byte");
        assert!(
            matches!(e, EnvelopeError::AuthenticationFailed { .. }),
            "{e:?}"
        );

        // Truncated.
        b.raw_put(
            &format!("wal/{SEG}"),
            original[..original.len() - 100].to_vec(),
        )
        .await;
        let e = expect_corrupt(r.get_wal(SEG).await.unwrap_err(), "truncated");
        assert!(matches!(e, EnvelopeError::Truncated { .. }), "{e:?}");

        // Another segment's object copied over this name.
        let seg2_obj = b.raw_get(&format!("wal/{SEG2}")).await.unwrap();
        b.raw_put(&format!("wal/{SEG}"), seg2_obj).await;
        let e = expect_corrupt(r.get_wal(SEG).await.unwrap_err(), "swapped");
        assert!(
            matches!(e, EnvelopeError::NameMismatch { ref expected, ref found } if expected == SEG && found == SEG2),
            "{e:?}"
        );

        // Restored, it reads again; with the wrong key it does not.
        b.raw_put(&format!("wal/{SEG}"), original.clone()).await;
        assert_eq!(r.get_wal(SEG).await.unwrap().unwrap(), seg.to_vec());
        let wrong = Repository::open(&b.config(Some(other_kf), 3)).unwrap();
        let e = expect_corrupt(wrong.get_wal(SEG).await.unwrap_err(), "wrong key");
        assert!(matches!(e, EnvelopeError::WrongKey { .. }), "{e:?}");
        let keyless = Repository::open(&b.config(None, 3)).unwrap();
        let e = expect_corrupt(keyless.get_wal(SEG).await.unwrap_err(), "no key");
        assert!(matches!(e, EnvelopeError::KeyRequired { .. }), "{e:?}");

        // A plaintext object planted in the encrypted repository is refused.
        let planted = keyless.url().to_string();
        assert_eq!(planted, b.url());
        let plain_repo = Repository::open(&b.config(None, 3)).unwrap();
        plain_repo
            .put_wal("000000010000000000000009", wal(1000, 2))
            .await
            .unwrap();
        let e = expect_corrupt(
            r.get_wal("000000010000000000000009").await.unwrap_err(),
            "planted",
        );
        assert!(
            matches!(e, EnvelopeError::UnencryptedWithKey { .. }),
            "{e:?}"
        );

        // A damaged object under a name we want to write: not overwritten.
        let mut bad = original.clone();
        bad[200] ^= 0x10;
        b.raw_put(&format!("wal/{SEG}"), bad.clone()).await;
        let e = r.put_wal(SEG, seg.clone()).await.unwrap_err();
        assert!(
            matches!(e, RepositoryError::ExistingUnreadable { .. }),
            "{e}"
        );
        assert_eq!(b.raw_get(&format!("wal/{SEG}")).await.unwrap(), bad);
    }
}

/// A chunk read from the spool's file (both compressions): it reads back
/// as the range, and a second put of the same range is already stored.
#[tokio::test]
async fn chunks_from_a_file_in_either_compression() {
    use std::io::Write;
    let all = wal(3 << 20, 21);
    let mut file = tempfile::tempfile().unwrap();
    file.write_all(&all).unwrap();
    for compression in [Compression::Zstd, Compression::None] {
        let b = Backend::file();
        let mut config = b.config(None, 3);
        config.compression = compression;
        let r = Repository::open(&config).unwrap();
        let (start, end) = (0x2000u64, (2 << 20) + 0x3000);
        let seg = sf(SEG);
        let chunk = |made| r.put_chunk_from(&seg, file.try_clone().unwrap(), start, end, made);
        let (out, frames) = chunk(Vec::new()).await.unwrap();
        assert_eq!(out, PutOutcome::Stored);
        assert_eq!(frames.is_empty(), compression == Compression::None);
        let got = r.get_chunk(&sf(SEG), start, end).await.unwrap().unwrap();
        assert!(
            got[..] == all[start as usize..end as usize],
            "{compression:?}"
        );
        let (again, _) = chunk(frames).await.unwrap();
        assert_eq!(again, PutOutcome::AlreadyStored, "{compression:?}");
    }
}

#[tokio::test]
async fn unencrypted_repository_detects_damage() {
    for b in Backend::both() {
        let r = Repository::open(&b.config(None, 3)).unwrap();
        let seg = wal(1 << 20, 13);
        r.put_wal(SEG, seg.clone()).await.unwrap();
        let original = b.raw_get(&format!("wal/{SEG}")).await.unwrap();
        let mut flipped = original.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x01; // the checksum trailer
        b.raw_put(&format!("wal/{SEG}"), flipped).await;
        match r.get_wal(SEG).await.unwrap_err() {
            RepositoryError::Envelope {
                source: EnvelopeError::ChecksumMismatch,
                ..
            } => {}
            e => panic!("{}: expected checksum mismatch, got {e}", b.name()),
        }
    }
}

#[tokio::test]
async fn storage_outage_is_unreachable_after_the_retries_never_not_found() {
    let mut b = Backend::s3();
    let (kf, _) = b.key_file("outage");
    let r = Repository::open(&b.config(Some(kf), 3)).unwrap();
    r.put_wal(SEG, wal(100_000, 3)).await.unwrap();
    let Backend::S3 { server, .. } = &mut b else {
        unreachable!()
    };
    server.stop();

    let started = Instant::now();
    let e = r.get_wal(SEG).await.unwrap_err();
    let took = started.elapsed();
    match &e {
        RepositoryError::Store(StoreError::Unreachable { attempts, .. }) => {
            assert_eq!(*attempts, 3)
        }
        other => panic!("expected Unreachable, got {other}"),
    }
    assert_eq!(e.class(), ErrorClass::Unavailable);
    assert!(e.is_retryable());
    let msg = e.to_string();
    eprintln!("outage message: {msg}");
    assert!(
        msg.contains("s3://walsafe-test/cluster-a/wal-archive")
            && msg.contains("unreachable")
            && msg.contains(&format!("wal/{SEG}")),
        "{msg}"
    );
    // Two backoff delays of at most 100 ms + 200 ms, no long client timeouts.
    assert!(took < Duration::from_secs(10), "took {took:?}");
    // Missing must not be confused with unreachable (rule 4).
    let e = r.get_wal(SEG2).await.unwrap_err();
    assert!(
        matches!(e, RepositoryError::Store(StoreError::Unreachable { .. })),
        "{e}"
    );

    let e = r.put_wal(SEG2, wal(1000, 1)).await.unwrap_err();
    assert!(
        matches!(e, RepositoryError::Store(StoreError::Unreachable { .. })),
        "{e}"
    );
    let e = r.list_wal().await.unwrap_err();
    assert!(
        matches!(e, RepositoryError::Store(StoreError::Unreachable { .. })),
        "{e}"
    );

    // No credential in messages or Debug output.
    for text in [e.to_string(), format!("{e:?}"), format!("{r:?}")] {
        assert!(!text.contains(SECRET_ACCESS_KEY), "{text}");
    }
}

#[tokio::test]
async fn missing_bucket_is_reported_as_such() {
    let b = Backend::s3();
    let Backend::S3 { server, .. } = &b else {
        unreachable!()
    };
    let store = Store::open("s3://no-such-bucket/p", &server.repo_options(), 2).unwrap();
    let e = store
        .put_if_absent("wal/x", Bytes::from_static(b"x"))
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::BucketMissing { .. }), "{e}");
    assert!(!e.is_retryable());
    assert!(e.to_string().contains("no-such-bucket"), "{e}");
}
