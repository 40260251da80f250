//! Golden objects: repositories written by an earlier walsafe, committed
//! under `tests/golden/v<N>/`, that every later build must read back byte
//! for byte. Round-trip tests (encode, then decode with the same code)
//! cannot see a change that makes old archives unreadable; these can.
//!
//! ```text
//! tests/golden/v1/
//!   repository.key                 the key of the encrypted repository
//!   plain/                         the plaintexts, as PostgreSQL wrote them
//!     000000010000000000000003     a whole segment (1 MiB segments)
//!     000000010000000000000004.chunk-00000000-00002000
//!     00000002.history
//!   encrypted-zstd/                a file:// repository: key, zstd
//!   plain-zstd/                    no key (SHA-256 trailer), zstd
//!   plain-none/                    no key, no compression
//!     walsafe.repo                 the descriptor (JSON; HMAC with a key)
//!     wal/000000010000000000000003
//!     wal/00000002.history
//!     chunks/000000010000000000000004/00000000-00002000
//! ```
//!
//! They are never rewritten: a new object format or layout adds its own
//! `v<N+1>` (written once with `WALSAFE_WRITE_GOLDEN=v<N+1> cargo test
//! --test golden -- --ignored`), and the old ones stay readable.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use walsafe::durable::Fsync;
use walsafe::pg::page::synthetic_wal;
use walsafe::pg::{ClusterIdentity, Lsn, TimelineId};
use walsafe::repository::envelope::{self, EnvelopeError};
use walsafe::repository::key::{load_key_file, write_key_file, Key};
use walsafe::repository::{Compression, Repository, RepositoryConfig, SegmentFile};

const SEGMENT_SIZE: u64 = 1 << 20;
const SEGMENT: &str = "000000010000000000000003";
const CHUNKED: &str = "000000010000000000000004";
const CHUNK_END: u64 = 0x2000;
const HISTORY: &str = "00000002.history";

/// The cluster the golden repositories are pinned to.
fn identity() -> ClusterIdentity {
    ClusterIdentity::new(7_300_000_000_000_000_001, 150_004, SEGMENT_SIZE)
}

fn golden(version: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(version)
}

/// The repositories of a version: (directory, encrypted, compression).
const REPOSITORIES: [(&str, bool, Compression); 3] = [
    ("encrypted-zstd", true, Compression::Zstd),
    ("plain-zstd", false, Compression::Zstd),
    ("plain-none", false, Compression::None),
];

fn config(dir: &Path, key_file: Option<PathBuf>, compression: Compression) -> RepositoryConfig {
    RepositoryConfig {
        name: "test".into(),
        retain_window: None,
        url: format!("file://{}", dir.display()),
        key_file,
        compression,
        compression_level: 1,
        options: Default::default(),
        retries: 1,
        request_timeout: Duration::from_secs(10),
        fsync: Fsync::Off,
    }
}

/// The plaintexts: (logical name, file under plain/).
fn plaintexts(version: &Path) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let read = |n: &str| {
        std::fs::read(version.join("plain").join(n))
            .unwrap_or_else(|e| panic!("golden plaintext {n}: {e}"))
    };
    (
        read(SEGMENT),
        read(&format!("{CHUNKED}.chunk-00000000-{CHUNK_END:08X}")),
        read(HISTORY),
    )
}

/// Every golden version's repositories read back as their plaintexts,
/// through the repository (layout, descriptor, envelope) and through the
/// envelope alone; and the name binding still refuses a renamed object.
#[tokio::test]
async fn every_golden_repository_still_reads_byte_for_byte() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut versions: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("tests/golden")
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    versions.sort();
    assert!(
        !versions.is_empty(),
        "no golden version under {}",
        root.display()
    );
    for version in versions {
        check_version(&version).await;
    }
}

async fn check_version(version: &Path) {
    let v = version.display();
    let key_file = version.join("repository.key");
    let key = load_key_file(&key_file).unwrap();
    let (segment, chunk, history) = plaintexts(version);
    for (dir, encrypted, compression) in REPOSITORIES {
        // Read from a copy: nothing may write into the committed files.
        let copy = tempfile::tempdir().unwrap();
        copy_tree(&version.join(dir), copy.path());
        let what = format!("{v}/{dir}");
        let r = Repository::open(&config(
            copy.path(),
            encrypted.then(|| key_file.clone()),
            compression,
        ))
        .unwrap();

        let d = r
            .descriptor()
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{what}: no descriptor"));
        r.verify_descriptor(&d, Some(&identity()))
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(d.identity(), identity(), "{what}");
        assert_eq!(d.key_id, encrypted.then(|| key.key_id_hex()), "{what}");
        if encrypted {
            assert!(d.mac_is_valid(&key), "{what}: descriptor HMAC");
        }

        let got = r.get_wal(SEGMENT).await.unwrap();
        assert!(
            got.as_deref() == Some(&segment[..]),
            "{what}: {SEGMENT} differs"
        );
        let got = r.get_wal(HISTORY).await.unwrap();
        assert!(
            got.as_deref() == Some(&history[..]),
            "{what}: {HISTORY} differs"
        );
        let file = SegmentFile::parse(CHUNKED).unwrap();
        assert_eq!(
            r.list_chunks(&file).await.unwrap(),
            vec![(0, CHUNK_END)],
            "{what}"
        );
        let got = r.get_chunk(&file, 0, CHUNK_END).await.unwrap();
        assert!(
            got.as_deref() == Some(&chunk[..]),
            "{what}: the chunk differs"
        );

        // The envelope alone, under each object's logical name.
        let k = encrypted.then_some(&key);
        let chunk_name = format!("{CHUNKED}/00000000-{CHUNK_END:08X}");
        for (path, name, plain) in [
            (format!("wal/{SEGMENT}"), SEGMENT, &segment),
            (format!("wal/{HISTORY}"), HISTORY, &history),
            (format!("chunks/{chunk_name}"), chunk_name.as_str(), &chunk),
        ] {
            let object = std::fs::read(copy.path().join(&path)).unwrap();
            let header = envelope::read_header(&object).unwrap();
            assert_eq!(header.name, name, "{what}/{path}");
            let decoded =
                envelope::decode(name, &object, k).unwrap_or_else(|e| panic!("{what}/{path}: {e}"));
            assert!(decoded == *plain, "{what}/{path}: differs");
            // Still bound to its name: under another it is refused.
            assert!(
                matches!(
                    envelope::decode("000000010000000000000009", &object, k),
                    Err(EnvelopeError::NameMismatch { .. })
                ),
                "{what}/{path}: accepted under another name"
            );
            if encrypted {
                assert!(
                    matches!(
                        envelope::decode(name, &object, None),
                        Err(EnvelopeError::KeyRequired { .. })
                    ),
                    "{what}/{path}"
                );
            }
        }
    }
}

fn copy_tree(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap_or_else(|e| panic!("{}: {e}", from.display())) {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&dest).unwrap();
            copy_tree(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), &dest).unwrap();
        }
    }
}

/// Writes `tests/golden/$WALSAFE_WRITE_GOLDEN` with today's code: once per
/// format version, never over an existing one.
#[tokio::test]
#[ignore = "writes a new golden version: WALSAFE_WRITE_GOLDEN=v<N> cargo test --test golden -- --ignored"]
async fn write_golden_version() {
    let version = std::env::var("WALSAFE_WRITE_GOLDEN")
        .expect("set WALSAFE_WRITE_GOLDEN to the new version's directory name, e.g. v2");
    let dir = golden(&version);
    assert!(
        !dir.exists(),
        "{} exists: golden objects are never rewritten",
        dir.display()
    );
    std::fs::create_dir_all(dir.join("plain")).unwrap();
    let key = Key::generate();
    let key_file = dir.join("repository.key");
    write_key_file(&key_file, &key).unwrap();

    let segment = synthetic_wal(
        &identity(),
        TimelineId(1),
        Lsn(3 * SEGMENT_SIZE),
        SEGMENT_SIZE,
    );
    let chunk = synthetic_wal(&identity(), TimelineId(1), Lsn(4 * SEGMENT_SIZE), CHUNK_END);
    let history = b"1\t0/4000000\tno recovery target specified\n".to_vec();
    let plain = dir.join("plain");
    std::fs::write(plain.join(SEGMENT), &segment).unwrap();
    std::fs::write(
        plain.join(format!("{CHUNKED}.chunk-00000000-{CHUNK_END:08X}")),
        &chunk,
    )
    .unwrap();
    std::fs::write(plain.join(HISTORY), &history).unwrap();

    for (name, encrypted, compression) in REPOSITORIES {
        let repo_dir = dir.join(name);
        std::fs::create_dir_all(&repo_dir).unwrap();
        let r = Repository::open(&config(
            &repo_dir,
            encrypted.then(|| key_file.clone()),
            compression,
        ))
        .unwrap();
        r.pin(&identity()).await.unwrap();
        r.put_wal(SEGMENT, Bytes::from(segment.clone()))
            .await
            .unwrap();
        r.put_wal(HISTORY, Bytes::from(history.clone()))
            .await
            .unwrap();
        r.put_chunk(
            &SegmentFile::parse(CHUNKED).unwrap(),
            0,
            Bytes::from(chunk.clone()),
        )
        .await
        .unwrap();
    }
}
