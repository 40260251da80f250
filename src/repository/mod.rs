//! The repository: where WAL ends up, and the only door to storage: every
//! object walsafe writes or reads (WAL, chunks, history files, gap records,
//! `check`'s probes, the descriptor) goes through [`Repository`], by a typed
//! [`ObjectName`].
//!
//! ```text
//! Repository ── object (which key)      ObjectName: walsafe.repo, wal/…, chunks/…, gaps/…, check/…
//!            ── envelope (which bytes)  header + zstd + AES-256-GCM STREAM (or SHA-256 trailer)
//!            ── key                     the master key, its id
//!            ── descriptor              pins the repository to one cluster
//!            ── chunks                  which chunks rebuild a filling segment, and its holes
//!            ── inventory               what is stored per timeline, and every hole
//!            ── store                   object_store: file://, s3://, gs://, az://; create-only; retries
//!            ── faults                  failures, delays and hangs on demand (tests)
//! ```
//!
//! # Invariants (rules 3, 4 and 5 of README's Guarantees)
//!
//! * **Never overwrite different WAL.** Every object is written create-only.
//!   When the name is taken, the stored object is fetched, verified and
//!   compared: the same plaintext is success ([`PutOutcome::AlreadyStored`]);
//!   anything else is [`RepositoryError::Conflict`] (or
//!   [`RepositoryError::ExistingUnreadable`]) and the caller keeps its local
//!   copy and raises an alarm.
//! * **Never return unverified WAL.** [`Repository::get_wal`] and
//!   [`Repository::get_chunk`] return plaintext only after the envelope
//!   authenticated (with a key) or checksummed (without) it under the
//!   expected name. A missing object is `Ok(None)`, never an error; every
//!   error is something archive recovery must stop on (see [`ErrorClass`]).
//! * **Never archive a stranger's WAL.** [`Repository::pin`] creates
//!   `walsafe.repo` for the first cluster and refuses any other system
//!   identifier, segment size, major version or key afterwards.
//! * **Bounded CPU, with a lane for the RPO.** Compression and encryption
//!   run on the blocking pool in two lanes of one job each ([`Lane`], by
//!   the object's kind): whole segments, closed partials and history files
//!   in one; chunks of the filling segment, gap records and probes in the
//!   other.
//!   walsafe never takes more than two cores from the database, and a
//!   chunk — which is what the RPO waits for — never queues behind a 16 MiB
//!   segment being compressed.

pub mod chunks;
pub mod descriptor;
pub mod envelope;
pub mod faults;
pub mod inventory;
pub mod key;
pub mod object;
pub mod store;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::Semaphore;

pub use descriptor::{Descriptor, DescriptorError};
pub use envelope::{Compression, EnvelopeError};
pub use key::{Key, KeyError, KeyRing};
pub use object::{Lane, LayoutError, ObjectName, SegmentFile};
pub use store::{PutResult, Store, StoreError};

use crate::durable::Fsync;
use crate::gap::Gap;
use crate::pg::ClusterIdentity;

/// A repository as configured (`[repository]`).
#[derive(Debug, Clone)]
pub struct RepositoryConfig {
    /// What logs, metrics (`repository` label) and reports call it:
    /// `name = "..."`, by default its URL.
    pub name: String,
    /// `file:///path`, `s3://bucket/prefix`, `gs://bucket/prefix`, `az://container/prefix`.
    pub url: String,
    /// Repository key; `None` = no encryption (a checksum still guards integrity).
    pub key_file: Option<PathBuf>,
    pub compression: Compression,
    pub compression_level: i32,
    /// Extra `object_store` options (`aws_endpoint`, `aws_region`, ...).
    pub options: BTreeMap<String, String>,
    /// Attempts per storage operation.
    pub retries: u32,
    /// Longest one attempt may take before it counts as a (retryable)
    /// failure: a store that hangs is a store that is down.
    pub request_timeout: std::time::Duration,
    /// Whether a `file://` repository fsyncs its writes ([`Fsync::Off`]
    /// only in tests).
    pub fsync: Fsync,
    /// `retain_window`: this repository's recovery window for `walsafe
    /// retain`, instead of `--window` (an off-site copy kept longer).
    pub retain_window: Option<std::time::Duration>,
}

/// Envelope encode/decode jobs running at once, process-wide, per lane.
pub const CPU_PERMITS_PER_LANE: usize = 1;
/// Whole segments, `.partial` and `.history` files ([`Lane::Bulk`]).
static BULK_LANE: Semaphore = Semaphore::const_new(CPU_PERMITS_PER_LANE);
/// Chunks of the filling segment, gap records, probes ([`Lane::Small`]).
static SMALL_LANE: Semaphore = Semaphore::const_new(CPU_PERMITS_PER_LANE);

/// Runs CPU-heavy `f` on the blocking pool, within the lane of `name`.
async fn on_cpu_lane<T: Send + 'static>(
    name: &ObjectName,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, RepositoryError> {
    on_lane(name.lane(), || format!("{what} {name}"), f).await
}

/// Runs CPU-heavy `f` on the blocking pool, within `lane`.
async fn on_lane<T: Send + 'static>(
    lane: Lane,
    what: impl FnOnce() -> String,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, RepositoryError> {
    let lane = match lane {
        Lane::Bulk => &BULK_LANE,
        Lane::Small => &SMALL_LANE,
    };
    let _permit = lane
        .acquire()
        .await
        .expect("the CPU semaphore is never closed");
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| RepositoryError::Internal {
            what: what(),
            message: e.to_string(),
        })
}

/// Where the plaintext of an upload is, for comparing with an object
/// already stored under its name.
#[derive(Clone)]
enum Plain {
    Memory(Bytes),
    File(std::path::PathBuf),
    /// Bytes `[start, end)` of an open file.
    Range(Arc<std::fs::File>, u64, u64),
}

/// The frames of `[start, end)` of `file`: `made` where they fit (in
/// order, each starting where the one before ended), the rest compressed
/// now.
fn frames_of(
    file: &std::fs::File,
    start: u64,
    end: u64,
    level: i32,
    mut made: Vec<envelope::Frame>,
) -> std::io::Result<Vec<envelope::Frame>> {
    made.sort_by_key(|f| f.start);
    let mut frames = Vec::new();
    let mut pos = start;
    for f in made {
        if f.start < pos || f.end > end || f.start >= f.end {
            continue;
        }
        if f.start > pos {
            frames.extend(envelope::compress_range(file, pos, f.start, level)?);
        }
        pos = f.end;
        frames.push(f);
    }
    if pos < end || frames.is_empty() {
        frames.extend(envelope::compress_range(file, pos, end, level)?);
    }
    Ok(frames)
}

impl Plain {
    /// The whole plaintext.
    fn read(&self) -> std::io::Result<Bytes> {
        use std::os::unix::fs::FileExt;
        Ok(match self {
            Plain::Memory(b) => b.clone(),
            Plain::File(p) => Bytes::from(std::fs::read(p)?),
            Plain::Range(f, start, end) => {
                let mut buf = vec![0u8; (end - start) as usize];
                f.read_exact_at(&mut buf, *start)?;
                Bytes::from(buf)
            }
        })
    }

    /// Whether the plaintext is `stored`, read a block at a time.
    fn matches(&self, stored: &[u8]) -> std::io::Result<bool> {
        use std::os::unix::fs::FileExt;
        let (file, start, len) = match self {
            Plain::Memory(b) => return Ok(b[..] == stored[..]),
            Plain::File(p) => {
                let f = std::fs::File::open(p)?;
                let len = f.metadata()?.len();
                (Arc::new(f), 0, len)
            }
            Plain::Range(f, start, end) => (f.clone(), *start, end - start),
        };
        if len != stored.len() as u64 {
            return Ok(false);
        }
        let mut block = vec![0u8; envelope::BLOCK_LEN.min(stored.len())];
        for (i, want) in stored.chunks(envelope::BLOCK_LEN).enumerate() {
            let got = &mut block[..want.len()];
            file.read_exact_at(got, start + (i * envelope::BLOCK_LEN) as u64)?;
            if got != want {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// Outcome of storing WAL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// Newly stored.
    Stored,
    /// The identical plaintext was already stored under that name.
    AlreadyStored,
}

/// How callers (wal-fetch's exit code, the agent's alarms) treat an error.
/// In archive recovery `wal-fetch` exits ≥ 126 for every class: only
/// `Ok(None)` means "not in the archive" (exit 1). A standby's `wal-fetch`
/// asks [`RepositoryError::is_untrustworthy_object`] instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The repository's content cannot be trusted or does not belong to
    /// us: integrity or authentication failure, wrong or missing key,
    /// tampering, conflicting content, another cluster's repository.
    Corrupt,
    /// Storage could not be used (unreachable after retries, permission
    /// denied, bucket missing, misconfigured).
    Unavailable,
    /// The request or local set-up is wrong: an invalid name, an unreadable
    /// key file, an internal failure.
    Invalid,
}

/// Why a repository operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RepositoryError {
    /// The storage layer failed (after its retries, where retryable).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The key file could not be loaded.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// A name is not a valid WAL, segment or chunk name.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// A stored object failed verification; it must not be used.
    #[error("repository {url}: object {key} cannot be used: {source}")]
    Envelope {
        url: String,
        key: String,
        source: EnvelopeError,
    },
    /// A different object already exists under the name: never overwritten.
    #[error("repository {url} already holds a different {name} at {key} ({detail}); walsafe never overwrites WAL, so the local copy is kept. Is another cluster, or a diverged timeline, writing to this repository? Investigate before deleting anything")]
    Conflict {
        url: String,
        name: String,
        key: String,
        detail: String,
    },
    /// An object exists under the name but cannot be read back to compare.
    #[error("repository {url} already holds an object at {key} that cannot be verified ({source}); walsafe will not overwrite it. If it is damaged, move it aside and the local copy will be uploaded again")]
    ExistingUnreadable {
        url: String,
        key: String,
        source: EnvelopeError,
    },
    /// `walsafe.repo` is unreadable or from a newer walsafe.
    #[error("repository {url}: {source}")]
    DescriptorInvalid {
        url: String,
        source: DescriptorError,
    },
    /// `walsafe.repo`'s HMAC does not verify under the configured key.
    #[error("repository {url}: walsafe.repo fails its integrity check under key {key_id}: it was modified without the key; do not use this repository until you know who changed it")]
    DescriptorTampered { url: String, key_id: String },
    /// The repository belongs to another cluster.
    #[error("repository {url} belongs to the cluster with system identifier {repository}, but this cluster's system identifier is {cluster}; walsafe refuses to mix two clusters' WAL. Give this cluster its own repository (another URL or prefix)")]
    ClusterMismatch {
        url: String,
        repository: u64,
        cluster: u64,
    },
    /// The repository holds WAL of another segment size.
    #[error("repository {url} holds WAL with {repository}-byte segments, but this cluster uses {cluster}-byte segments; use another URL or prefix")]
    SegmentSizeMismatch {
        url: String,
        repository: u64,
        cluster: u64,
    },
    /// The repository holds WAL of another PostgreSQL major version.
    #[error("repository {url} holds WAL of PostgreSQL {repository}, but this cluster runs {cluster}; after a major upgrade start a new repository (another URL or prefix)")]
    VersionMismatch {
        url: String,
        repository: u32,
        cluster: u32,
    },
    /// The repository is encrypted and no key is configured.
    #[error("repository {url} is encrypted with key id {key_id}, but no key_file is configured; set [repository] key_file to that key")]
    KeyMissing { url: String, key_id: String },
    /// The configured key is not the repository's key.
    #[error("repository {url} is encrypted with key id {repository}, but the configured key has id {configured}; configure the repository's key file")]
    KeyMismatch {
        url: String,
        repository: String,
        configured: String,
    },
    /// A key is configured for an unencrypted repository.
    #[error("repository {url} is not encrypted, but a key (id {configured}) is configured; remove key_file, or start an encrypted repository at another URL or prefix")]
    KeyUnexpected { url: String, configured: String },
    /// A record (e.g. a gap record) verified but does not parse.
    #[error("repository {url}: {key} cannot be used: {reason}")]
    BadRecord {
        url: String,
        key: String,
        reason: String,
    },
    /// The plaintext is larger than any WAL file.
    #[error("{name} is {len} bytes, more than the {limit}-byte limit of a repository object")]
    TooLarge { name: String, len: u64, limit: u64 },
    /// A background task failed (panicked or was cancelled).
    #[error("internal error while {what}: {message}")]
    Internal { what: String, message: String },
}

impl RepositoryError {
    /// The class callers map to exit codes and alarms.
    pub fn class(&self) -> ErrorClass {
        use RepositoryError::*;
        match self {
            Store(_) => ErrorClass::Unavailable,
            Envelope { .. }
            | Conflict { .. }
            | ExistingUnreadable { .. }
            | DescriptorInvalid { .. }
            | DescriptorTampered { .. }
            | ClusterMismatch { .. }
            | SegmentSizeMismatch { .. }
            | VersionMismatch { .. }
            | KeyMissing { .. }
            | KeyMismatch { .. }
            | KeyUnexpected { .. }
            | BadRecord { .. } => ErrorClass::Corrupt,
            Key(_) | Layout(_) | TooLarge { .. } | Internal { .. } => ErrorClass::Invalid,
        }
    }

    /// True when an object itself must never be replayed: it is damaged,
    /// was altered or planted, or belongs to another cluster. False for
    /// everything a fix of the set-up cures (storage unreachable, the key
    /// file or its setting, a walsafe too old for the format): a standby's
    /// `wal-fetch` answers those "not in the archive" and keeps it running
    /// (see `fetch`), but stops it for these.
    pub fn is_untrustworthy_object(&self) -> bool {
        use RepositoryError::*;
        match self {
            Envelope { source, .. } => !matches!(
                source,
                EnvelopeError::WrongKey { .. }
                    | EnvelopeError::KeyRequired { .. }
                    | EnvelopeError::UnsupportedVersion { .. }
            ),
            // The key setting, not the content: a fix of the set-up.
            KeyMissing { .. } | KeyMismatch { .. } | KeyUnexpected { .. } => false,
            _ => self.class() == ErrorClass::Corrupt,
        }
    }

    /// True when trying again later may succeed (storage trouble only).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            RepositoryError::Store(StoreError::Unreachable { .. } | StoreError::Transient { .. })
        )
    }
}

/// A repository: a store, the key and the compression settings.
#[derive(Debug, Clone)]
pub struct Repository {
    store: Store,
    /// The keys, replaced whole when the key file is read again (SIGHUP):
    /// clones of a repository share them.
    keys: Arc<std::sync::RwLock<Keys>>,
    compression: Compression,
    level: i32,
    /// `[[repository]] name`, for metrics and messages (default its URL).
    name: Option<String>,
}

/// A repository's keys: `ring` holds every configured key, `key` its
/// current one, which encrypts; objects are decrypted with the key their
/// header names.
#[derive(Debug, Clone, Default)]
struct Keys {
    key: Option<Arc<Key>>,
    ring: Option<Arc<KeyRing>>,
}

fn compression_name(c: Compression) -> &'static str {
    match c {
        Compression::Zstd => "zstd",
        Compression::None => "none",
    }
}

impl Repository {
    /// Opens the repository of a configuration: the store (no network yet)
    /// and the key file, if any.
    pub fn open(cfg: &RepositoryConfig) -> Result<Repository, RepositoryError> {
        let store = Store::open(&cfg.url, &cfg.options, cfg.retries)?
            .with_fsync(cfg.fsync)
            .with_request_timeout(cfg.request_timeout);
        let ring = match &cfg.key_file {
            Some(p) => Some(key::load_key_ring(p)?),
            None => None,
        };
        let repo = Repository::from_parts(store, None, cfg.compression, cfg.compression_level)
            .with_name(&cfg.name);
        Ok(match ring {
            Some(r) => repo.with_ring(r),
            None => repo,
        })
    }

    /// Uses key ring `ring`: its first key encrypts, every key decrypts.
    pub fn with_ring(self, ring: KeyRing) -> Repository {
        self.set_ring(ring);
        self
    }

    /// Replaces the key ring (the key file was read again): new objects
    /// are encrypted with its first key from now on.
    pub fn set_ring(&self, ring: KeyRing) {
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Keys {
            key: Some(Arc::new(ring.current().clone())),
            ring: Some(Arc::new(ring)),
        };
    }

    /// The key that encrypts, if any.
    fn key(&self) -> Option<Arc<Key>> {
        self.keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .key
            .clone()
    }

    /// Every configured key, if any.
    fn ring(&self) -> Option<Arc<KeyRing>> {
        self.keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .ring
            .clone()
    }

    /// Names the repository (`[[repository]] name`).
    pub fn with_name(mut self, name: &str) -> Repository {
        self.name = Some(name.to_string());
        self
    }

    /// Its name: the configured one, else its URL.
    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or_else(|| self.url())
    }

    /// A repository from its parts (tests, tools).
    pub fn from_parts(
        store: Store,
        key: Option<Key>,
        compression: Compression,
        level: i32,
    ) -> Repository {
        let keys = Keys {
            ring: key.clone().map(|k| Arc::new(KeyRing::single(k))),
            key: key.map(Arc::new),
        };
        Repository {
            store,
            keys: Arc::new(std::sync::RwLock::new(keys)),
            compression,
            level,
            name: None,
        }
    }

    /// The repository URL, for messages.
    pub fn url(&self) -> &str {
        self.store.url()
    }

    /// The configured key's id (hex), if a key is configured.
    pub fn key_id(&self) -> Option<String> {
        self.key().as_deref().map(Key::key_id_hex)
    }

    fn url_s(&self) -> String {
        self.store.url().to_string()
    }

    /// Encodes on the blocking pool, within the CPU budget.
    pub async fn encode(
        &self,
        name: &ObjectName,
        plaintext: Bytes,
    ) -> Result<Bytes, RepositoryError> {
        if plaintext.len() as u64 > envelope::MAX_PLAIN_LEN {
            return Err(RepositoryError::TooLarge {
                name: name.logical(),
                len: plaintext.len() as u64,
                limit: envelope::MAX_PLAIN_LEN,
            });
        }
        let (logical, key, c, level) = (name.logical(), self.key(), self.compression, self.level);
        on_cpu_lane(name, "encoding", move || {
            Bytes::from(envelope::encode(
                &logical,
                &plaintext,
                c,
                level,
                key.as_deref(),
            ))
        })
        .await
    }

    /// Verifies and decodes on the blocking pool, within the CPU budget.
    async fn decode(
        &self,
        name: &ObjectName,
        object: Bytes,
    ) -> Result<Result<Vec<u8>, EnvelopeError>, RepositoryError> {
        let (logical, ring) = (name.logical(), self.ring());
        on_cpu_lane(name, "decoding", move || {
            let Some(ring) = ring else {
                return envelope::decode(&logical, &object, None);
            };
            envelope::decode(&logical, &object, Some(opening_key(&ring, &object)?))
        })
        .await
    }

    /// Encodes the file at `path` by streaming it through the envelope, so
    /// the plaintext is never held whole in memory.
    async fn encode_file(
        &self,
        name: &ObjectName,
        path: PathBuf,
        frames: Vec<envelope::Frame>,
    ) -> Result<Bytes, RepositoryError> {
        let (logical, key, c, level) = (name.logical(), self.key(), self.compression, self.level);
        on_cpu_lane(name, "encoding", move || -> std::io::Result<Bytes> {
            let mut f = std::fs::File::open(&path)?;
            let len = f.metadata()?.len();
            envelope::encode_from(&logical, len, &mut f, c, level, key.as_deref(), &frames)
                .map(Bytes::from)
        })
        .await?
        .map_err(|e| RepositoryError::Internal {
            what: format!("encoding {name}"),
            message: e.to_string(),
        })
    }

    /// Create-only write of `plaintext` as `name`. The same plaintext
    /// already stored is [`PutOutcome::AlreadyStored`]; anything else under
    /// the name is [`RepositoryError::Conflict`].
    pub async fn put(
        &self,
        name: &ObjectName,
        plaintext: Bytes,
    ) -> Result<PutOutcome, RepositoryError> {
        let encoded = self.encode(name, plaintext.clone()).await?;
        self.put_encoded(name, encoded, Plain::Memory(plaintext))
            .await
    }

    /// [`Repository::put`], returning what was stored: the object's length
    /// and the BLAKE3 hash of its bytes (for records that list the objects
    /// they wrote, like a base backup's parts: checked later on the raw
    /// object, before anything is decrypted or decompressed).
    pub async fn put_digest(
        &self,
        name: &ObjectName,
        plaintext: Bytes,
    ) -> Result<(u64, String), RepositoryError> {
        let encoded = self.encode(name, plaintext.clone()).await?;
        let stored = match self
            .put_encoded(name, encoded.clone(), Plain::Memory(plaintext))
            .await?
        {
            PutOutcome::Stored => encoded,
            // The same plaintext was there (a retried call): its bytes.
            PutOutcome::AlreadyStored => {
                self.store
                    .get(&name.key())
                    .await?
                    .ok_or_else(|| RepositoryError::Internal {
                        what: format!("storing {name}"),
                        message: "the object vanished after it was found stored".into(),
                    })?
            }
        };
        let len = stored.len() as u64;
        let digest = on_cpu_lane(name, "hashing", move || {
            blake3::hash(&stored).to_hex().to_string()
        })
        .await?;
        Ok((len, digest))
    }

    /// Create-only write of the file at `path` (a segment or closed
    /// partial), streamed through the envelope: memory holds the compressed
    /// object, never the whole plaintext.
    pub async fn put_file(
        &self,
        name: &ObjectName,
        path: PathBuf,
    ) -> Result<PutOutcome, RepositoryError> {
        self.put_file_with(name, path, Vec::new()).await
    }

    /// [`Repository::put_file`], placing `frames` (zstd frames of the
    /// file's bytes made earlier, see [`Repository::put_chunk_keeping`])
    /// in the body instead of compressing those bytes again.
    pub async fn put_file_with(
        &self,
        name: &ObjectName,
        path: PathBuf,
        frames: Vec<envelope::Frame>,
    ) -> Result<PutOutcome, RepositoryError> {
        let encoded = self.encode_file(name, path.clone(), frames).await?;
        self.put_encoded(name, encoded, Plain::File(path)).await
    }

    /// Create-only write of an encoded object; when the name is taken, the
    /// stored plaintext is compared with ours (`plain`).
    async fn put_encoded(
        &self,
        name: &ObjectName,
        encoded: Bytes,
        plain: Plain,
    ) -> Result<PutOutcome, RepositoryError> {
        let key = name.key();
        // The existing object can vanish between our put and our get (a
        // chunk deleted once its segment is stored); then put again.
        for _ in 0..3 {
            if self.store.put_if_absent(&key, encoded.clone()).await? == PutResult::Created {
                crate::metrics::upload_bytes(encoded.len() as u64);
                return Ok(PutOutcome::Stored);
            }
            let Some(existing) = self.store.get(&key).await? else {
                continue;
            };
            let reread = |e: String| RepositoryError::Internal {
                what: format!("re-reading {name}"),
                message: e,
            };
            return match self.decode(name, existing).await? {
                Ok(stored) => {
                    // Compared block by block: the file is not read whole
                    // beside the decoded object (a store that comes back
                    // after an outage answers many puts this way at once).
                    let stored = Arc::new(stored);
                    let (p, st) = (plain.clone(), stored.clone());
                    let same = tokio::task::spawn_blocking(move || p.matches(&st))
                        .await
                        .map_err(|e| reread(e.to_string()))?
                        .map_err(|e| reread(e.to_string()))?;
                    if same {
                        return Ok(PutOutcome::AlreadyStored);
                    }
                    let p = plain.clone();
                    let ours = tokio::task::spawn_blocking(move || p.read())
                        .await
                        .map_err(|e| reread(e.to_string()))?
                        .map_err(|e| reread(e.to_string()))?;
                    Err(RepositoryError::Conflict {
                        url: self.url_s(),
                        name: name.logical(),
                        key,
                        detail: describe_difference(&stored, &ours),
                    })
                }
                Err(source) => Err(RepositoryError::ExistingUnreadable {
                    url: self.url_s(),
                    key,
                    source,
                }),
            };
        }
        Err(RepositoryError::Store(StoreError::Other {
            url: self.url_s(),
            op: "put",
            key,
            message: "the object exists when written and is gone when read, three times over; is something deleting it?".into(),
        }))
    }

    /// Create-only write of `plaintext` as `name` that reports whether the
    /// name was taken, without comparing contents: for probes of the
    /// store's own semantics (`walsafe check`). WAL goes through [`Repository::put`].
    pub async fn create(
        &self,
        name: &ObjectName,
        plaintext: Bytes,
    ) -> Result<PutResult, RepositoryError> {
        let encoded = self.encode(name, plaintext).await?;
        Ok(self.store.put_if_absent(&name.key(), encoded).await?)
    }

    /// The probes `walsafe check` left (normally none).
    pub async fn list_probes(&self) -> Result<Vec<ObjectName>, RepositoryError> {
        Ok(self
            .store
            .list(object::PROBE_PREFIX)
            .await?
            .into_iter()
            .filter_map(|o| ObjectName::parse_key(&o.key))
            .collect())
    }

    /// `name`, verified and decoded; `None` when the repository does not
    /// have it.
    pub async fn get(&self, name: &ObjectName) -> Result<Option<Vec<u8>>, RepositoryError> {
        let Some(object) = self.store.get(&name.key()).await? else {
            return Ok(None);
        };
        self.decode_raw(name, object).await.map(Some)
    }

    /// The raw (still encoded, unverified) object of `name`; `None` when
    /// absent. For the prefetcher, which keeps objects as they are so that
    /// [`Repository::decode_raw`] verifies them exactly like a download.
    pub async fn get_raw(&self, name: &ObjectName) -> Result<Option<Bytes>, RepositoryError> {
        Ok(self.store.get(&name.key()).await?)
    }

    /// Verifies and decodes a raw object of `name` obtained earlier.
    pub async fn decode_raw(
        &self,
        name: &ObjectName,
        object: Bytes,
    ) -> Result<Vec<u8>, RepositoryError> {
        self.decode(name, object)
            .await?
            .map_err(|source| RepositoryError::Envelope {
                url: self.url_s(),
                key: name.key(),
                source,
            })
    }

    /// Deletes `name`; an absent object is not an error.
    pub async fn delete(&self, name: &ObjectName) -> Result<(), RepositoryError> {
        Ok(self.store.delete(&name.key()).await?)
    }

    /// Every object under the directory `prefix` (e.g. [`object::WAL_PREFIX`])
    /// that walsafe names, with its stored size.
    pub async fn list_named(
        &self,
        prefix: &str,
    ) -> Result<Vec<(ObjectName, u64)>, RepositoryError> {
        Ok(self
            .store
            .list(prefix)
            .await?
            .into_iter()
            .filter_map(|o| ObjectName::parse_key(&o.key).map(|n| (n, o.size)))
            .collect())
    }

    /// The key id `name`'s header names (`Some(None)`: not encrypted), read
    /// from its first bytes only (`size`: its listed size); `None` when it
    /// is gone. Nothing is verified: for counting objects per key.
    pub async fn peek_key_id(
        &self,
        name: &ObjectName,
        size: u64,
    ) -> Result<Option<Option<[u8; key::KEY_ID_LEN]>>, RepositoryError> {
        let Some(start) = self
            .store
            .get_head(&name.key(), envelope::KEY_ID_END as u64, size)
            .await?
        else {
            return Ok(None);
        };
        envelope::peek_key_id(&start)
            .map(Some)
            .map_err(|source| RepositoryError::Envelope {
                url: self.url_s(),
                key: name.key(),
                source,
            })
    }

    /// Whether the encoded object `raw` is encrypted with the key that
    /// encrypts now (or, in an unencrypted repository, is unencrypted).
    pub fn under_current_key(&self, raw: &[u8]) -> bool {
        let current = self.key().map(|k| k.key_id());
        matches!(envelope::peek_key_id(raw), Ok(id) if id == current)
    }

    /// `name` for rewriting it: its stored bytes and the version read;
    /// `None` when absent. Nothing is verified yet.
    pub async fn fetch_for_rewrite(
        &self,
        name: &ObjectName,
    ) -> Result<Option<Fetched>, RepositoryError> {
        Ok(self
            .store
            .get_versioned(&name.key())
            .await?
            .map(|(raw, seen)| Fetched { raw, seen }))
    }

    /// The stored object `raw` of `name` encrypted with the current key
    /// instead of the ring's key it names, its compressed body kept
    /// (see [`envelope::rekey`]: verified before, opened again after).
    pub async fn reencrypt(&self, name: &ObjectName, raw: Bytes) -> Result<Bytes, RepositoryError> {
        let (logical, ring) = (name.logical(), self.ring());
        let rekeyed = on_cpu_lane(name, "re-encrypting", move || {
            let Some(ring) = ring else {
                return Err(EnvelopeError::KeyRequired {
                    object_key_id: "none".into(),
                });
            };
            let old = opening_key(&ring, &raw)?;
            envelope::rekey(&logical, &raw, Some(old), ring.current()).map(Bytes::from)
        })
        .await?;
        rekeyed.map_err(|source| RepositoryError::Envelope {
            url: self.url_s(),
            key: name.key(),
            source,
        })
    }

    /// `plain` encoded as `name` under the current key, then decoded again
    /// and compared: an object proven to read back as `plain`.
    pub async fn encode_checked(
        &self,
        name: &ObjectName,
        plain: Bytes,
    ) -> Result<Bytes, RepositoryError> {
        let encoded = self.encode(name, plain.clone()).await?;
        let back = self.decode_raw(name, encoded.clone()).await?;
        if back != plain {
            return Err(RepositoryError::Internal {
                what: format!("re-encoding {name}"),
                message: "the new object does not read back as the old plaintext".into(),
            });
        }
        Ok(encoded)
    }

    /// Replaces `name`, as [`Repository::fetch_for_rewrite`] saw it, with
    /// `encoded` (from [`Repository::reencrypt`] or
    /// [`Repository::encode_checked`]) in one atomic step
    /// (see [`Store::replace`]), then reads it back: what the name holds
    /// afterwards.
    pub async fn replace(
        &self,
        name: &ObjectName,
        seen: &store::Seen,
        encoded: Bytes,
    ) -> Result<Replaced, RepositoryError> {
        let key = name.key();
        self.store.replace(&key, seen, encoded.clone()).await?;
        Ok(match self.store.get(&key).await? {
            None => Replaced::Gone,
            Some(now) if now == encoded => Replaced::Ours,
            Some(now) => Replaced::Other(now),
        })
    }

    /// Stores a WAL file by its PostgreSQL name (segment, `.partial` or
    /// `.history`), create-only.
    pub async fn put_wal(
        &self,
        name: &str,
        plaintext: Bytes,
    ) -> Result<PutOutcome, RepositoryError> {
        self.put(&ObjectName::wal(name)?, plaintext).await
    }

    /// A verified WAL file by its PostgreSQL name; `None` when the archive
    /// does not have it.
    pub async fn get_wal(&self, name: &str) -> Result<Option<Vec<u8>>, RepositoryError> {
        self.get(&ObjectName::wal(name)?).await
    }

    /// Stores bytes `[start, start + len)` of a still-filling segment.
    pub async fn put_chunk(
        &self,
        segment: &SegmentFile,
        start: u64,
        plaintext: Bytes,
    ) -> Result<PutOutcome, RepositoryError> {
        let end = start + plaintext.len() as u64;
        self.put(&ObjectName::chunk(segment, start, end)?, plaintext)
            .await
    }

    /// [`Repository::put_chunk`] of bytes `[start, end)` of `file` (the
    /// spool's segment), read and compressed block by block, so a chunk of
    /// a whole segment never sits in memory as plaintext. Returns with the
    /// outcome the chunk's zstd frames (when the repository compresses),
    /// for the segment's own object to reuse ([`Repository::put_file_with`]):
    /// its bytes are compressed once.
    ///
    /// `made` are frames of the range compressed earlier
    /// ([`Repository::compress_range`]): placed, not compressed again.
    pub async fn put_chunk_from(
        &self,
        segment: &SegmentFile,
        file: std::fs::File,
        start: u64,
        end: u64,
        made: Vec<envelope::Frame>,
    ) -> Result<(PutOutcome, Vec<envelope::Frame>), RepositoryError> {
        let name = ObjectName::chunk(segment, start, end)?;
        let file = Arc::new(file);
        let (logical, key, level, compression, f) = (
            name.logical(),
            self.key(),
            self.level,
            self.compression,
            file.clone(),
        );
        let encoded = on_cpu_lane(&name, "encoding", move || -> std::io::Result<_> {
            Ok(match compression {
                Compression::Zstd => {
                    let frames = frames_of(&f, start, end, level, made)?;
                    let object =
                        envelope::encode_frames(&logical, end - start, &frames, key.as_deref());
                    (Bytes::from(object), frames)
                }
                Compression::None => {
                    // The object holds the plaintext whole anyway.
                    let plain = Plain::Range(f, start, end).read()?;
                    let object =
                        envelope::encode(&logical, &plain, compression, level, key.as_deref());
                    (Bytes::from(object), Vec::new())
                }
            })
        })
        .await?
        .map_err(|e| RepositoryError::Internal {
            what: format!("encoding {name}"),
            message: e.to_string(),
        })?;
        let (object, frames) = encoded;
        let outcome = self
            .put_encoded(&name, object, Plain::Range(file, start, end))
            .await?;
        Ok((outcome, frames))
    }

    /// Bytes `[start, end)` of `file` as zstd frames of at most
    /// [`envelope::BLOCK_LEN`] (see [`envelope::compress_range`]), on the
    /// blocking pool within the CPU budget: made ahead of the chunks and
    /// the object that will hold them.
    pub async fn compress_range(
        &self,
        file: std::fs::File,
        start: u64,
        end: u64,
    ) -> Result<Vec<envelope::Frame>, RepositoryError> {
        let level = self.level;
        let what = || format!("compressing [{start}, {end}) ahead");
        on_lane(Lane::Small, what, move || {
            envelope::compress_range(&file, start, end, level)
        })
        .await?
        .map_err(|e| RepositoryError::Internal {
            what: format!("compressing [{start}, {end}) ahead"),
            message: e.to_string(),
        })
    }

    /// A verified chunk; `None` when absent.
    pub async fn get_chunk(
        &self,
        segment: &SegmentFile,
        start: u64,
        end: u64,
    ) -> Result<Option<Vec<u8>>, RepositoryError> {
        let r = self.get(&ObjectName::chunk(segment, start, end)?).await?;
        if let Some(p) = &r {
            // The name binds the range; a verified chunk has its length.
            debug_assert_eq!(p.len() as u64, end - start);
        }
        Ok(r)
    }

    /// The chunk ranges stored for `segment`, sorted by start.
    pub async fn list_chunks(
        &self,
        segment: &SegmentFile,
    ) -> Result<Vec<(u64, u64)>, RepositoryError> {
        let mut ranges = Vec::new();
        for o in self.store.list(&object::chunks_prefix(segment)).await? {
            match ObjectName::parse_key(&o.key) {
                Some(ObjectName::Chunk {
                    segment: s,
                    start,
                    end,
                }) if s == *segment => ranges.push((start, end)),
                _ => tracing::warn!(
                    "ignoring unexpected object {} in {} (not a walsafe chunk)",
                    o.key,
                    self.url()
                ),
            }
        }
        ranges.sort_unstable();
        Ok(ranges)
    }

    /// Deletes every chunk of `segment` (after the full segment is stored).
    pub async fn delete_chunks(&self, segment: &SegmentFile) -> Result<(), RepositoryError> {
        for o in self.store.list(&object::chunks_prefix(segment)).await? {
            self.store.delete(&o.key).await?;
        }
        Ok(())
    }

    /// Every WAL file under `wal/` (segments, closed partials, history
    /// files), sorted by key.
    pub async fn list_wal(&self) -> Result<Vec<ObjectName>, RepositoryError> {
        Ok(self
            .store
            .list(object::WAL_PREFIX)
            .await?
            .into_iter()
            .filter_map(|o| ObjectName::parse_key(&o.key))
            .collect())
    }

    /// Every object of the WAL side (`wal/`, `chunks/`, `gaps/`) with its
    /// stored size, and the keys there that are not walsafe's.
    pub async fn list_wal_side(
        &self,
    ) -> Result<(Vec<(ObjectName, u64)>, Vec<String>), RepositoryError> {
        let mut named = Vec::new();
        let mut foreign = Vec::new();
        for prefix in [
            object::WAL_PREFIX,
            object::CHUNKS_PREFIX,
            object::GAPS_PREFIX,
        ] {
            for o in self.store.list(prefix).await? {
                match ObjectName::parse_key(&o.key) {
                    Some(n) => named.push((n, o.size)),
                    None => foreign.push(o.key),
                }
            }
        }
        Ok((named, foreign))
    }

    /// Every object under `backups/` (parts and records of base backups),
    /// with its stored size, sorted by key; `backup` limits it to one.
    pub async fn list_backup_objects(
        &self,
        backup: Option<&str>,
    ) -> Result<Vec<(ObjectName, u64)>, RepositoryError> {
        let prefix = match backup {
            Some(b) => format!("{}{b}/", object::BACKUPS_PREFIX),
            None => object::BACKUPS_PREFIX.to_string(),
        };
        let mut v: Vec<(ObjectName, u64)> = self
            .store
            .list(&prefix)
            .await?
            .into_iter()
            .filter_map(|o| Some((ObjectName::parse_key(&o.key)?, o.size)))
            .collect();
        v.sort();
        Ok(v)
    }

    /// The drill results stored, oldest first (their names are the
    /// times they ran).
    pub async fn list_drills(&self) -> Result<Vec<ObjectName>, RepositoryError> {
        let mut v: Vec<ObjectName> = self
            .store
            .list(object::DRILLS_PREFIX)
            .await?
            .into_iter()
            .filter_map(|o| ObjectName::parse_key(&o.key))
            .filter(|n| matches!(n, ObjectName::Drill(_)))
            .collect();
        v.sort();
        Ok(v)
    }

    /// Segments that have chunks, sorted.
    pub async fn list_chunked_segments(&self) -> Result<Vec<SegmentFile>, RepositoryError> {
        let mut segs: Vec<SegmentFile> = self
            .store
            .list(object::CHUNKS_PREFIX)
            .await?
            .into_iter()
            .filter_map(|o| ObjectName::chunk_segment_of_key(&o.key))
            .collect();
        segs.dedup();
        Ok(segs)
    }

    /// Removes what crashed `file://` writes left (see
    /// [`Store::remove_stale_staging`]).
    pub async fn remove_stale_staging(
        &self,
        age: std::time::Duration,
    ) -> Result<usize, RepositoryError> {
        Ok(self.store.remove_stale_staging(age).await?)
    }

    /// Records a loss of WAL, authenticated like every other object.
    pub async fn record_gap(&self, gap: &Gap) -> Result<PutOutcome, RepositoryError> {
        let json = serde_json::to_vec(gap).expect("a gap serializes");
        self.put(&ObjectName::gap(gap), Bytes::from(json)).await
    }

    /// Every recorded gap. A record that fails verification is an error:
    /// a forged or damaged record must not pass unnoticed, and a dropped one
    /// would hide a loss.
    pub async fn gaps(&self) -> Result<Vec<Gap>, RepositoryError> {
        let mut out = Vec::new();
        for o in self.store.list(object::GAPS_PREFIX).await? {
            let Some(name) = ObjectName::parse_key(&o.key) else {
                tracing::warn!("ignoring unexpected object {} in {}", o.key, self.url());
                continue;
            };
            let Some(raw) = self.store.get(&o.key).await? else {
                continue; // deleted while we listed
            };
            // walsafe before the typed repository wrote gap records as bare
            // JSON. Honouring one can only stop a recovery, never let one
            // pass lost WAL, so they are still read.
            let bytes = if raw.first() == Some(&b'{') {
                tracing::debug!(
                    "{} is an unauthenticated gap record of an older walsafe",
                    o.key
                );
                raw.to_vec()
            } else {
                self.decode_raw(&name, raw).await?
            };
            let gap: Gap =
                serde_json::from_slice(&bytes).map_err(|e| RepositoryError::BadRecord {
                    url: self.url_s(),
                    key: o.key.clone(),
                    reason: format!("not a gap record ({e})"),
                })?;
            out.push(gap);
        }
        Ok(out)
    }

    /// `walsafe.repo`, parsed but not verified (see [`Repository::verify_descriptor`]);
    /// `None` for a repository nobody has pinned yet.
    pub async fn descriptor(&self) -> Result<Option<Descriptor>, RepositoryError> {
        let Some(bytes) = self.store.get(object::DESCRIPTOR_KEY).await? else {
            return Ok(None);
        };
        Descriptor::parse(&bytes)
            .map(Some)
            .map_err(|source| RepositoryError::DescriptorInvalid {
                url: self.url_s(),
                source,
            })
    }

    /// Re-signs `walsafe.repo` with the key that encrypts now, listing
    /// `key_ids` as the keys the repository's objects need (see
    /// [`Descriptor::signed_by`]); verified first, replaced atomically only
    /// if unchanged since read (else read again). Returns the new one.
    pub async fn record_keys(&self, key_ids: &[String]) -> Result<Descriptor, RepositoryError> {
        let key = self.key().ok_or_else(|| RepositoryError::Internal {
            what: "re-signing walsafe.repo".into(),
            message: "the repository has no key".into(),
        })?;
        for _ in 0..5 {
            let Some((bytes, seen)) = self.store.get_versioned(object::DESCRIPTOR_KEY).await?
            else {
                return Err(RepositoryError::Internal {
                    what: "re-signing walsafe.repo".into(),
                    message: "the repository has no descriptor: nothing was ever archived to it"
                        .into(),
                });
            };
            let d =
                Descriptor::parse(&bytes).map_err(|source| RepositoryError::DescriptorInvalid {
                    url: self.url_s(),
                    source,
                })?;
            self.verify_descriptor(&d, None)?;
            let new = d.signed_by(&key, key_ids);
            if new == d {
                return Ok(d);
            }
            let json = Bytes::from(new.to_json());
            self.store
                .replace(object::DESCRIPTOR_KEY, &seen, json.clone())
                .await?;
            if self.store.get(object::DESCRIPTOR_KEY).await?.as_ref() == Some(&json) {
                return Ok(new);
            }
        }
        Err(RepositoryError::Internal {
            what: "re-signing walsafe.repo".into(),
            message: "it kept changing while being rewritten; is another key-rotate running?"
                .into(),
        })
    }

    /// Checks a descriptor against the configured key and, when given,
    /// against the cluster's identity.
    pub fn verify_descriptor(
        &self,
        d: &Descriptor,
        cluster: Option<&ClusterIdentity>,
    ) -> Result<(), RepositoryError> {
        let url = self.url_s();
        let key = self.key();
        match (&d.key_id, key.as_deref()) {
            (Some(id), None) => {
                return Err(RepositoryError::KeyMissing {
                    url,
                    key_id: id.clone(),
                })
            }
            (None, Some(k)) => {
                return Err(RepositoryError::KeyUnexpected {
                    url,
                    configured: k.key_id_hex(),
                })
            }
            (Some(id), Some(_)) => {
                // The repository's key may have been rotated: any key of
                // the ring that has its id verifies it.
                let ring = self.ring();
                let ring = ring.as_deref().expect("a ring wherever a key is set");
                let Some(k) = ring.find_hex(id) else {
                    return Err(RepositoryError::KeyMismatch {
                        url,
                        repository: id.clone(),
                        configured: ring.ids_hex().join(", "),
                    });
                };
                if !d.mac_is_valid(k) {
                    return Err(RepositoryError::DescriptorTampered {
                        url,
                        key_id: id.clone(),
                    });
                }
            }
            (None, None) => {}
        }
        if let Some(c) = cluster {
            if d.system_identifier != c.system_identifier {
                return Err(RepositoryError::ClusterMismatch {
                    url,
                    repository: d.system_identifier,
                    cluster: c.system_identifier,
                });
            }
            if d.segment_size != c.segment_size {
                return Err(RepositoryError::SegmentSizeMismatch {
                    url,
                    repository: d.segment_size,
                    cluster: c.segment_size,
                });
            }
            if d.pg_version_num / 10000 != c.pg_version_num / 10000 {
                return Err(RepositoryError::VersionMismatch {
                    url,
                    repository: d.pg_version_num / 10000,
                    cluster: c.pg_version_num / 10000,
                });
            }
        }
        Ok(())
    }

    /// Pins the repository to `cluster`: creates `walsafe.repo` when absent,
    /// otherwise verifies it. Returns the descriptor in force.
    pub async fn pin(&self, cluster: &ClusterIdentity) -> Result<Descriptor, RepositoryError> {
        if let Some(d) = self.descriptor().await? {
            self.verify_descriptor(&d, Some(cluster))?;
            return Ok(d);
        }
        let key = self.key();
        let d = Descriptor::new(cluster, key.as_deref(), compression_name(self.compression));
        match self
            .store
            .put_if_absent(object::DESCRIPTOR_KEY, Bytes::from(d.to_json()))
            .await?
        {
            PutResult::Created => {
                tracing::info!(
                    "pinned repository {} to system identifier {}",
                    self.url(),
                    cluster.system_identifier
                );
                Ok(d)
            }
            // Another writer pinned it between our get and put: obey theirs.
            PutResult::AlreadyExists => match self.descriptor().await? {
                Some(theirs) => {
                    self.verify_descriptor(&theirs, Some(cluster))?;
                    Ok(theirs)
                }
                None => Err(RepositoryError::Store(StoreError::Other {
                    url: self.url_s(),
                    op: "get",
                    key: object::DESCRIPTOR_KEY.into(),
                    message: "walsafe.repo exists when written but is gone when read".into(),
                })),
            },
        }
    }
}

/// The key of `ring` that opens `object`: the one its header names; the
/// current one for an unencrypted object (which opening then refuses:
/// it may have been planted).
fn opening_key<'a>(ring: &'a KeyRing, object: &[u8]) -> Result<&'a Key, EnvelopeError> {
    let header = envelope::read_header(object)?;
    match header.encryption {
        envelope::Encryption::None => Ok(ring.current()),
        _ => ring
            .find(&header.key_id)
            .ok_or_else(|| EnvelopeError::WrongKey {
                object_key_id: hex::encode(header.key_id),
                configured_key_id: ring.ids_hex().join(", "),
            }),
    }
}

/// An object read for rewriting ([`Repository::fetch_for_rewrite`]).
pub struct Fetched {
    /// The stored bytes, not verified yet.
    pub raw: Bytes,
    /// The version read.
    pub seen: store::Seen,
}

/// What a name holds after [`Repository::replace`].
#[derive(Debug)]
pub enum Replaced {
    /// Our new object.
    Ours,
    /// Nothing: it was deleted meanwhile (and not brought back).
    Gone,
    /// Another object: rewritten by someone else meanwhile.
    Other(Bytes),
}

/// A short description of how two WAL images differ, for conflict messages.
fn describe_difference(stored: &[u8], ours: &[u8]) -> String {
    let first = stored.iter().zip(ours).position(|(a, b)| a != b);
    match first {
        Some(i) => format!(
            "stored {} bytes, ours {} bytes, first difference at byte {i}",
            stored.len(),
            ours.len()
        ),
        None => format!(
            "stored {} bytes, ours {} bytes, one a prefix of the other",
            stored.len(),
            ours.len()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn repo(dir: &std::path::Path, key: Option<Key>) -> Repository {
        let store = Store::open(&format!("file://{}", dir.display()), &BTreeMap::new(), 1)
            .unwrap()
            .with_fsync(Fsync::Off);
        Repository::from_parts(store, key, Compression::Zstd, 1)
    }

    const SEG: &str = "000000010000000000000003";

    fn sf() -> SegmentFile {
        SegmentFile::parse(SEG).unwrap()
    }

    #[tokio::test]
    async fn put_get_conflict() {
        let d = tempfile::tempdir().unwrap();
        let r = repo(d.path(), Some(Key::generate()));
        let wal = Bytes::from(vec![7u8; 100_000]);
        assert_eq!(
            r.put_wal(SEG, wal.clone()).await.unwrap(),
            PutOutcome::Stored
        );
        assert_eq!(
            r.put_wal(SEG, wal.clone()).await.unwrap(),
            PutOutcome::AlreadyStored
        );
        let mut other = wal.to_vec();
        other[500] = 8;
        let e = r.put_wal(SEG, Bytes::from(other)).await.unwrap_err();
        assert!(matches!(e, RepositoryError::Conflict { .. }), "{e}");
        assert_eq!(e.class(), ErrorClass::Corrupt);
        assert!(
            e.to_string().contains("first difference at byte 500"),
            "{e}"
        );
        assert_eq!(r.get_wal(SEG).await.unwrap().unwrap(), wal.to_vec());
        assert_eq!(r.get_wal("000000010000000000000004").await.unwrap(), None);
        assert_eq!(
            r.list_wal().await.unwrap(),
            vec![ObjectName::wal(SEG).unwrap()]
        );
        let e = r.put_wal("bogus", wal).await.unwrap_err();
        assert_eq!(e.class(), ErrorClass::Invalid);
    }

    #[tokio::test]
    async fn chunks() {
        let d = tempfile::tempdir().unwrap();
        let r = repo(d.path(), None);
        r.put_chunk(&sf(), 0, Bytes::from_static(b"aaaa"))
            .await
            .unwrap();
        r.put_chunk(&sf(), 4, Bytes::from_static(b"bb"))
            .await
            .unwrap();
        assert_eq!(r.list_chunks(&sf()).await.unwrap(), vec![(0, 4), (4, 6)]);
        assert_eq!(r.get_chunk(&sf(), 4, 6).await.unwrap().unwrap(), b"bb");
        assert_eq!(r.get_chunk(&sf(), 6, 8).await.unwrap(), None);
        assert_eq!(r.list_chunked_segments().await.unwrap(), vec![sf()]);
        r.delete_chunks(&sf()).await.unwrap();
        assert!(r.list_chunks(&sf()).await.unwrap().is_empty());
        assert!(r.list_chunked_segments().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn pin_and_refuse_strangers() {
        let d = tempfile::tempdir().unwrap();
        let k = Key::generate();
        let r = repo(d.path(), Some(k.clone()));
        let me = ClusterIdentity::new(111, 150004, 16 << 20);
        let desc = r.pin(&me).await.unwrap();
        assert_eq!(desc.system_identifier, 111);
        // Idempotent; a minor version upgrade is fine.
        r.pin(&ClusterIdentity {
            pg_version_num: 150007,
            ..me
        })
        .await
        .unwrap();
        let e = r
            .pin(&ClusterIdentity {
                system_identifier: 222,
                ..me
            })
            .await
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("111") && msg.contains("222") && msg.contains("prefix"),
            "{msg}"
        );
        assert!(matches!(
            r.pin(&ClusterIdentity {
                segment_size: 1 << 20,
                ..me
            })
            .await,
            Err(RepositoryError::SegmentSizeMismatch { .. })
        ));
        assert!(matches!(
            r.pin(&ClusterIdentity {
                pg_version_num: 160000,
                ..me
            })
            .await,
            Err(RepositoryError::VersionMismatch { .. })
        ));
        assert!(matches!(
            repo(d.path(), Some(Key::generate())).pin(&me).await,
            Err(RepositoryError::KeyMismatch { .. })
        ));
        assert!(matches!(
            repo(d.path(), None).pin(&me).await,
            Err(RepositoryError::KeyMissing { .. })
        ));
        // Tampering with the descriptor without the key is detected.
        let p = d.path().join("walsafe.repo");
        let text = std::fs::read_to_string(&p)
            .unwrap()
            .replace("\"111\"", "\"222\"");
        std::fs::write(&p, text).unwrap();
        assert!(matches!(
            r.pin(&ClusterIdentity {
                system_identifier: 222,
                ..me
            })
            .await,
            Err(RepositoryError::DescriptorTampered { .. })
        ));
    }

    #[tokio::test]
    async fn key_for_unencrypted_repository_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let me = ClusterIdentity::new(1, 150000, 16 << 20);
        repo(d.path(), None).pin(&me).await.unwrap();
        let e = repo(d.path(), Some(Key::generate()))
            .pin(&me)
            .await
            .unwrap_err();
        assert!(matches!(e, RepositoryError::KeyUnexpected { .. }), "{e}");
    }
}
