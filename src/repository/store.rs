//! Object storage, behind one small interface: create-only put, get, list,
//! delete, each retried by [`crate::retry`].
//!
//! The repository URL chooses the backend:
//!
//! | URL | backend |
//! | --- | --- |
//! | `file:///var/backups/walsafe` | local directory (see below) |
//! | `s3://bucket/prefix` | `object_store`'s `AmazonS3Builder::from_env()` + `[repository.options]` |
//! | `gs://bucket/prefix` | `GoogleCloudStorageBuilder::from_env()` + options |
//! | `az://container/prefix` (`azure://`) | `MicrosoftAzureBuilder::from_env()` + options |
//!
//! Keys passed to [`Store`] are relative to the URL's prefix (see
//! `layout`); the store adds and strips the prefix.
//!
//! Emulators: Azurite is reached with `azure_storage_endpoint =
//! "http://host:port/devstoreaccount1"` plus the account name and key, or
//! with `azure_storage_use_emulator` and `AZURITE_BLOB_STORAGE_URL`; both
//! together are refused, because `object_store` would then ignore the
//! endpoint. A GCS emulator is named by `gcs_base_url` (with
//! `disable_oauth`) in the service account key.
//!
//! # Invariants
//!
//! * **Create-only writes.** [`Store::put_if_absent`] never replaces an
//!   existing object. On S3 it is a PUT with `If-None-Match: *`
//!   (`object_store`'s default `S3ConditionalPut::ETagMatch`; AWS S3 honours
//!   it since 2024, MinIO and moto do too; a store that does not will fail
//!   the repository tests rather than silently overwrite). GCS uses
//!   `x-goog-if-generation-match: 0`, Azure `If-None-Match: *`.
//! * **Durable on `file://`.** `object_store`'s `LocalFileSystem` writes a
//!   staging file and hard-links it into place *without any fsync*, so a
//!   power cut could leave an empty or torn object under its final name —
//!   which a create-only writer could then never repair. walsafe therefore
//!   writes `file://` objects itself: staging file `<name>#<digits>` (a
//!   name `LocalFileSystem` hides from listings), write, fsync, hard link
//!   (fails if the name exists: create-only), fsync of the directory, remove
//!   the staging file. Directories it creates are fsynced into their parent.
//!   Reads, listings and deletes go through `LocalFileSystem` (with empty
//!   directory clean-up on delete).
//! * **One retry policy.** `object_store`'s own retries are turned off
//!   (`max_retries = 0`) so that [`crate::retry::retry`] is the only retry
//!   loop: `retries` attempts in total with capped, jittered exponential
//!   backoff, retrying only [`StoreError::is_retryable`] errors. A retried
//!   create whose first attempt did land reports `AlreadyExists`; the
//!   repository layer compares contents, so that is harmless.
//! * **No secrets in messages.** Errors carry text, not the backend's error
//!   values, and every message is scrubbed of credential values found in
//!   the options and in the cloud environment variables. `Debug` shows the
//!   URL only. URLs with a user or password are refused by [`check_url`].

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Write};
use std::path::{Path as FsPath, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, PutMode, PutOptions, PutPayload, RetryConfig};

use super::faults::{Faults, Op, Verdict};
use crate::durable::Fsync;
use crate::metrics::StorageTraffic;
use crate::retry::{retry, RetryPolicy};

/// Outcome of a create-only write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutResult {
    /// The object did not exist and now does.
    Created,
    /// An object already exists under that key; it was left untouched.
    AlreadyExists,
}

/// The version of an object a read saw, which [`Store::replace`] replaces
/// only if it is still there.
#[derive(Debug, Clone)]
pub struct Seen(object_store::UpdateVersion);

/// One listed object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Key relative to the repository prefix, e.g. `wal/000000010000000000000003`.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
}

/// Why a storage operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// One attempt failed in a way that may pass: connection refused or
    /// reset, timeout, 5xx, throttling. Retried; after the last attempt it
    /// becomes [`StoreError::Unreachable`].
    #[error("repository {url}: {op} {key} failed: {message}")]
    Transient {
        url: String,
        op: &'static str,
        key: String,
        message: String,
    },
    /// Storage kept failing with transient errors through every attempt.
    #[error("repository {url} is unreachable: {op} {key} failed {attempts} time(s), last error: {last_error}; check that the storage service is up and reachable (endpoint, network, DNS)")]
    Unreachable {
        url: String,
        op: &'static str,
        key: String,
        attempts: u32,
        last_error: String,
    },
    /// The credentials were refused or lack a permission.
    #[error("repository {url}: permission denied for {op} {key}: {message}; {fix}")]
    PermissionDenied {
        url: String,
        op: &'static str,
        key: String,
        message: String,
        fix: String,
    },
    /// The bucket, container or directory does not exist.
    #[error("repository {url}: the bucket or container does not exist ({message}); create it, or fix the URL")]
    BucketMissing { url: String, message: String },
    /// The URL or the options are wrong: unsupported scheme, unknown
    /// option, wrong region, conditional writes unavailable.
    #[error("repository {url} is misconfigured: {message}")]
    Misconfigured { url: String, message: String },
    /// Any other failure; not retried.
    #[error("repository {url}: {op} {key} failed: {message}")]
    Other {
        url: String,
        op: &'static str,
        key: String,
        message: String,
    },
}

impl StoreError {
    /// True for errors another attempt may cure (only [`StoreError::Transient`]).
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Transient { .. })
    }
}

/// Checks a repository URL without touching the network; the message says
/// what is wrong and how to write it.
pub fn check_url(url: &str) -> Result<(), String> {
    parse_url(url).map(|_| ())
}

/// A parsed repository URL.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Location {
    File { root: PathBuf },
    S3 { bucket: String, prefix: String },
    Gcs { bucket: String, prefix: String },
    Azure { container: String, prefix: String },
}

fn parse_url(raw: &str) -> Result<Location, String> {
    const EXAMPLES: &str = "write e.g. file:///var/backups/walsafe, s3://bucket/prefix, gs://bucket/prefix or az://container/prefix";
    if raw.trim().is_empty() {
        return Err(format!("the repository URL is empty; {EXAMPLES}"));
    }
    if raw.starts_with('/') {
        return Err(format!(
            "{raw:?} has no scheme; for a local directory write file://{raw}"
        ));
    }
    let url =
        url::Url::parse(raw).map_err(|e| format!("{raw:?} is not a URL ({e}); {EXAMPLES}"))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(
            "the repository URL must not contain credentials (user or password); remove them and use the cloud's environment variables or [repository.options] instead".to_string()
        );
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "{} must not have a query (?...) or fragment (#...); put settings in [repository.options]",
            redact_url(raw)
        ));
    }
    let scheme = url.scheme();
    match scheme {
        "file" => {
            match url.host_str() {
                None | Some("") | Some("localhost") => {}
                Some(h) => {
                    return Err(format!(
                        "{raw:?} names host {h:?}; a file:// URL needs an absolute path: file:///path (three slashes)"
                    ))
                }
            }
            let root = url.to_file_path().map_err(|_| {
                format!("{raw:?} is not a usable local path; write file:///absolute/path")
            })?;
            if root == FsPath::new("/") {
                return Err("file:/// would use the root directory as the repository; name a directory, e.g. file:///var/backups/walsafe".into());
            }
            Ok(Location::File { root })
        }
        "s3" | "gs" | "az" | "azure" => {
            let bucket = url.host_str().unwrap_or_default().to_string();
            let what = if scheme.starts_with("az") {
                "container"
            } else {
                "bucket"
            };
            if bucket.is_empty() {
                return Err(format!(
                    "{raw:?} has no {what}; write {scheme}://{what}/prefix"
                ));
            }
            if !bucket
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
            {
                return Err(format!(
                    "{what} name {bucket:?} in {raw:?} has invalid characters; use letters, digits, '-', '.' and '_'"
                ));
            }
            let prefix = url.path().trim_matches('/').to_string();
            if prefix.contains("//") {
                return Err(format!(
                    "{raw:?}: the prefix must not contain empty components (//)"
                ));
            }
            Ok(match scheme {
                "s3" => Location::S3 { bucket, prefix },
                "gs" => Location::Gcs { bucket, prefix },
                _ => Location::Azure {
                    container: bucket,
                    prefix,
                },
            })
        }
        other => Err(format!(
            "unsupported scheme {other:?} in {}; {EXAMPLES}",
            redact_url(raw)
        )),
    }
}

/// The URL for messages, with any user info removed.
fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut u) if !u.username().is_empty() || u.password().is_some() => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.to_string()
        }
        _ => raw.to_string(),
    }
}

/// Object storage for one repository URL.
#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    /// Prefix inside the bucket, without leading or trailing '/'; "" for none.
    prefix: String,
    /// The URL, for messages.
    url: String,
    /// Root directory for `file://`, where puts are written durably by hand.
    local_root: Option<PathBuf>,
    /// Whether `file://` writes are fsynced ([`Fsync::Off`] only in tests).
    fsync: Fsync,
    policy: RetryPolicy,
    /// Credential values to scrub from messages.
    secrets: Arc<Vec<String>>,
    /// Faults injected by tests (see [`super::faults`]); `None` otherwise.
    faults: Option<Arc<Faults>>,
    /// Longest one attempt may take; then it is a transient failure.
    request_timeout: Duration,
    /// `walsafe_storage_requests_total` and `_bytes_total` of this repository.
    traffic: StorageTraffic,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("url", &self.url)
            .field("attempts", &self.policy.attempts)
            .finish_non_exhaustive()
    }
}

/// Option names whose values are credentials.
pub(crate) fn is_secret_name(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    [
        "secret",
        "key",
        "token",
        "password",
        "sas",
        "credential",
        "signature",
    ]
    .iter()
    .any(|w| n.contains(w))
}

fn collect_secrets(options: &BTreeMap<String, String>) -> Vec<String> {
    let mut s: Vec<String> = options
        .iter()
        .filter(|(k, _)| is_secret_name(k))
        .map(|(_, v)| v.clone())
        .collect();
    for (k, v) in std::env::vars() {
        let cloud = k.starts_with("AWS_") || k.starts_with("GOOGLE_") || k.starts_with("AZURE_");
        if cloud && is_secret_name(&k) {
            s.push(v);
        }
    }
    // Short values ("true", "1") are settings, not secrets, and would make
    // scrubbing mangle ordinary text.
    s.retain(|v| v.len() >= 8);
    s.sort_by_key(|v| std::cmp::Reverse(v.len()));
    s.dedup();
    s
}

const LOCAL_FILE_MODE: u32 = 0o640;

/// Longest one attempt may take unless configured otherwise.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

impl Store {
    /// Opens the store for `url` with backend `options`; `retries` is the
    /// number of attempts per operation (at least 1). Creates the directory
    /// of a `file://` repository. Does not touch the network.
    pub fn open(
        url: &str,
        options: &BTreeMap<String, String>,
        retries: u32,
    ) -> Result<Store, StoreError> {
        Self::open_with_policy(url, options, RetryPolicy::new(retries.max(1)))
    }

    /// [`Store::open`] with an explicit retry policy (tests shorten delays).
    pub fn open_with_policy(
        url: &str,
        options: &BTreeMap<String, String>,
        policy: RetryPolicy,
    ) -> Result<Store, StoreError> {
        let shown = redact_url(url);
        let secrets = Arc::new(collect_secrets(options));
        let misconfigured = |message: String| StoreError::Misconfigured {
            url: shown.clone(),
            message: scrub(&secrets, &message),
        };
        let location = parse_url(url).map_err(&misconfigured)?;
        // walsafe's retry loop is the only one.
        let no_retry = RetryConfig {
            max_retries: 0,
            retry_timeout: Duration::from_secs(60),
            ..Default::default()
        };
        let unknown = |backend: &str, k: &str| {
            misconfigured(format!(
                "unknown {backend} option {k:?} in [repository.options]; see the object_store documentation for valid keys"
            ))
        };
        let (inner, prefix, local_root): (Arc<dyn ObjectStore>, String, Option<PathBuf>) =
            match location {
                Location::File { root } => {
                    if !options.is_empty() {
                        return Err(misconfigured(
                            "[repository.options] is not used by file:// repositories; remove it"
                                .into(),
                        ));
                    }
                    Fsync::On.create_dir_all(&root).map_err(|e| {
                        let message =
                            format!("cannot create repository directory {}: {e}", root.display());
                        if e.kind() == io::ErrorKind::PermissionDenied {
                            StoreError::PermissionDenied {
                                url: shown.clone(),
                                op: "create directory",
                                key: String::new(),
                                message,
                                fix: format!(
                                    "make {} writable by the user walsafe runs as",
                                    root.display()
                                ),
                            }
                        } else {
                            misconfigured(message)
                        }
                    })?;
                    let fs = LocalFileSystem::new_with_prefix(&root)
                        .map_err(|e| misconfigured(e.to_string()))?
                        .with_automatic_cleanup(true);
                    (Arc::new(fs), String::new(), Some(root))
                }
                Location::S3 { bucket, prefix } => {
                    let mut b = AmazonS3Builder::from_env();
                    for (k, v) in options {
                        let key = AmazonS3ConfigKey::from_str(k).map_err(|_| unknown("S3", k))?;
                        b = b.with_config(key, v);
                    }
                    let s3 = b
                        .with_bucket_name(bucket)
                        .with_retry(no_retry)
                        .build()
                        .map_err(|e| misconfigured(e.to_string()))?;
                    (Arc::new(s3), prefix, None)
                }
                Location::Gcs { bucket, prefix } => {
                    let mut b = GoogleCloudStorageBuilder::from_env();
                    for (k, v) in options {
                        let key = GoogleConfigKey::from_str(k).map_err(|_| unknown("GCS", k))?;
                        b = b.with_config(key, v);
                    }
                    let gcs = b
                        .with_bucket_name(bucket)
                        .with_retry(no_retry)
                        .build()
                        .map_err(|e| misconfigured(e.to_string()))?;
                    (Arc::new(gcs), prefix, None)
                }
                Location::Azure { container, prefix } => {
                    let mut b = MicrosoftAzureBuilder::from_env();
                    for (k, v) in options {
                        let key = AzureConfigKey::from_str(k).map_err(|_| unknown("Azure", k))?;
                        b = b.with_config(key, v);
                    }
                    check_azure_emulator(&b).map_err(&misconfigured)?;
                    let az = b
                        .with_container_name(container)
                        .with_retry(no_retry)
                        .build()
                        .map_err(|e| {
                            misconfigured(format!(
                                "{e}; set AZURE_STORAGE_ACCOUNT_NAME (or azure_storage_account_name in [repository.options]) and credentials"
                            ))
                        })?;
                    (Arc::new(az), prefix, None)
                }
            };
        Ok(Store {
            inner,
            prefix,
            traffic: StorageTraffic::new(&shown),
            url: shown,
            local_root,
            fsync: Fsync::On,
            faults: None,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            policy,
            secrets,
        })
    }

    /// The same store, fsyncing `file://` writes as `fsync` says.
    pub fn with_fsync(mut self, fsync: Fsync) -> Store {
        self.fsync = fsync;
        self
    }

    /// The same store, giving up on an attempt after `timeout` (a
    /// transient failure, retried like any other).
    pub fn with_request_timeout(mut self, timeout: Duration) -> Store {
        self.request_timeout = timeout;
        self
    }

    /// The same store, meeting the faults of `faults` before every attempt.
    pub fn with_faults(mut self, faults: Arc<Faults>) -> Store {
        self.faults = Some(faults);
        self
    }

    /// The repository URL (without credentials), for messages.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Attempts per operation.
    pub fn attempts(&self) -> u32 {
        self.policy.attempts
    }

    fn path(&self, key: &str) -> Result<ObjPath, StoreError> {
        let key = key.trim_matches('/');
        let full = if self.prefix.is_empty() {
            key.to_string()
        } else if key.is_empty() {
            self.prefix.clone()
        } else {
            format!("{}/{key}", self.prefix)
        };
        ObjPath::parse(&full).map_err(|e| StoreError::Other {
            url: self.url.clone(),
            op: "build key",
            key: key.to_string(),
            message: e.to_string(),
        })
    }

    fn relative(&self, path: &ObjPath) -> String {
        let s = path.as_ref();
        if self.prefix.is_empty() {
            s.to_string()
        } else {
            s.strip_prefix(&self.prefix)
                .map(|r| r.trim_start_matches('/'))
                .unwrap_or(s)
                .to_string()
        }
    }

    /// Runs one operation under the retry policy; a retryable error left at
    /// the end becomes [`StoreError::Unreachable`].
    async fn retried<T, F, Fut>(&self, op: &'static str, key: &str, f: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let what = format!("{op} {key} at {}", self.url);
        let mut f = f;
        let attempt = || {
            let fut = f();
            async move {
                if let (Some(faults), Some(o)) = (&self.faults, Op::of(op)) {
                    if let Verdict::Fail = faults.attempt(o, key).await {
                        return Err(StoreError::Transient {
                            url: self.url.clone(),
                            op,
                            key: key.to_string(),
                            message: "injected fault".into(),
                        });
                    }
                }
                // Sent, whatever comes back: the store bills it.
                self.traffic.requests(op, 1);
                match tokio::time::timeout(self.request_timeout, fut).await {
                    Ok(r) => r,
                    Err(_) => Err(StoreError::Transient {
                        url: self.url.clone(),
                        op,
                        key: key.to_string(),
                        message: format!(
                            "no answer within {:?} ([repository] request_timeout)",
                            self.request_timeout
                        ),
                    }),
                }
            }
        };
        match retry(&self.policy, &what, StoreError::is_retryable, attempt).await {
            Err(StoreError::Transient { message, .. }) => Err(StoreError::Unreachable {
                url: self.url.clone(),
                op,
                key: key.to_string(),
                attempts: self.policy.attempts,
                last_error: message,
            }),
            r => r,
        }
    }

    /// Removes the staging files (`<name>#<digits>`) of `file://` writes
    /// older than `age`: what a crash between writing and linking leaves.
    /// Younger ones may belong to a write in progress (another process,
    /// `wal-push`) and stay. A no-op for cloud stores, whose uploads leave
    /// nothing half-done under a name. Returns how many were removed.
    pub async fn remove_stale_staging(&self, age: Duration) -> Result<usize, StoreError> {
        let Some(root) = self.local_root.clone() else {
            return Ok(0);
        };
        let fsync = self.fsync;
        tokio::task::spawn_blocking(move || remove_stale_staging_in(&root, age, fsync))
            .await
            .map_err(|e| io::Error::other(e.to_string()))
            .and_then(|r| r)
            .map_err(|e| self.io_error("clean", "staging files", e))
    }

    /// Stores `data` under `key` unless an object already exists there.
    pub async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<PutResult, StoreError> {
        Ok(match self.put_mode(key, data, PutMode::Create).await? {
            true => PutResult::Created,
            false => PutResult::AlreadyExists,
        })
    }

    /// A conditional write: `Ok(false)` when its condition does not hold
    /// (`Create`: the name is taken; `Update`: the object is gone or
    /// changed), nothing written.
    async fn put_mode(&self, key: &str, data: Bytes, mode: PutMode) -> Result<bool, StoreError> {
        if let Some(root) = &self.local_root {
            let root = root.clone();
            let rel = key.trim_matches('/').to_string();
            let create = matches!(mode, PutMode::Create);
            return self
                .retried("put", key, || {
                    let (root, rel, data) = (root.clone(), rel.clone(), data.clone());
                    let fsync = self.fsync;
                    async move {
                        self.traffic.sent(data.len() as u64);
                        tokio::task::spawn_blocking(move || match create {
                            true => local_create(&root, &rel, &data, fsync),
                            false => local_replace(&root, &rel, &data, fsync),
                        })
                        .await
                        .map_err(|e| io::Error::other(e.to_string()))
                        .and_then(|r| r)
                        .map_err(|e| self.io_error("put", key, e))
                    }
                })
                .await;
        }
        let path = self.path(key)?;
        self.retried("put", key, || {
            let payload = PutPayload::from(data.clone());
            let path = &path;
            let len = data.len() as u64;
            let mode = mode.clone();
            async move {
                self.traffic.sent(len);
                let create = matches!(mode, PutMode::Create);
                let opts = PutOptions {
                    mode,
                    ..Default::default()
                };
                match self.inner.put_opts(path, payload, opts).await {
                    Ok(_) => Ok(true),
                    Err(object_store::Error::AlreadyExists { .. })
                    | Err(object_store::Error::Precondition { .. }) => Ok(false),
                    Err(object_store::Error::NotFound { .. }) if !create => Ok(false),
                    Err(e) => Err(self.classify("put", key, e)),
                }
            }
        })
        .await
    }

    /// The object under `key`; `None` when there is none.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        Ok(self.get_versioned(key).await?.map(|(bytes, _)| bytes))
    }

    /// The object under `key` and the version read (for
    /// [`Store::replace`]); `None` when there is none.
    pub async fn get_versioned(&self, key: &str) -> Result<Option<(Bytes, Seen)>, StoreError> {
        let path = self.path(key)?;
        self.retried("get", key, || {
            let path = &path;
            async move {
                let r = match self.inner.get(path).await {
                    Ok(r) => r,
                    Err(object_store::Error::NotFound { source, .. })
                        if !mentions_missing_bucket(&source.to_string()) =>
                    {
                        return Ok(None)
                    }
                    Err(e) => return Err(self.classify("get", key, e)),
                };
                let seen = Seen(object_store::UpdateVersion {
                    e_tag: r.meta.e_tag.clone(),
                    version: r.meta.version.clone(),
                });
                match r.bytes().await {
                    Ok(b) => {
                        self.traffic.received(b.len() as u64);
                        Ok(Some((b, seen)))
                    }
                    // Vanished between the response and the body (local
                    // file deleted): as if it had not been there.
                    Err(object_store::Error::NotFound { .. }) => Ok(None),
                    Err(e) => Err(self.classify("get", key, e)),
                }
            }
        })
        .await
    }

    /// The first `len` bytes of the object under `key` (fewer when it is
    /// shorter: `size` is its listed size); `None` when there is none.
    pub async fn get_head(
        &self,
        key: &str,
        len: u64,
        size: u64,
    ) -> Result<Option<Bytes>, StoreError> {
        let path = self.path(key)?;
        let end = len.min(size);
        if end == 0 {
            return Ok(Some(Bytes::new()));
        }
        self.retried("get", key, || {
            let path = &path;
            async move {
                match self.inner.get_range(path, 0..end).await {
                    Ok(b) => {
                        self.traffic.received(b.len() as u64);
                        Ok(Some(b))
                    }
                    Err(object_store::Error::NotFound { source, .. })
                        if !mentions_missing_bucket(&source.to_string()) =>
                    {
                        Ok(None)
                    }
                    Err(e) => Err(self.classify("get", key, e)),
                }
            }
        })
        .await
    }

    /// Replaces the object under `key`, exactly as [`Store::get_versioned`]
    /// saw it, with `data`, in one atomic step: `Ok(false)`, nothing
    /// written, when it is gone or changed since (a deleted object is never
    /// brought back). Cloud stores make the write conditional on the
    /// version read (S3 and Azure `If-Match`, GCS generation match);
    /// `file://` exchanges a durable staging file with the object, so the
    /// name holds the old bytes or the new ones at every instant. The one
    /// write walsafe makes over an existing object, and only with the same
    /// plaintext under another key (`walsafe key-rotate --rewrite`) or a
    /// re-signed descriptor.
    pub async fn replace(&self, key: &str, seen: &Seen, data: Bytes) -> Result<bool, StoreError> {
        self.put_mode(key, data, PutMode::Update(seen.0.clone()))
            .await
    }

    /// Every object whose key starts with the directory `prefix` (e.g.
    /// `"wal/"`), with keys relative to the repository prefix, sorted.
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        let dir = prefix.trim_matches('/');
        let path = if dir.is_empty() && self.prefix.is_empty() {
            None
        } else {
            Some(self.path(dir)?)
        };
        let mut out = self
            .retried("list", prefix, || {
                let path = path.clone();
                async move {
                    let stream = self.inner.list(path.as_ref());
                    match stream.try_collect::<Vec<_>>().await {
                        Ok(v) => {
                            self.count_list_pages(v.len());
                            Ok(v.into_iter()
                                .map(|m| ObjectInfo {
                                    key: self.relative(&m.location),
                                    size: m.size,
                                })
                                .collect::<Vec<_>>())
                        }
                        Err(object_store::Error::NotFound { source, .. })
                            if !mentions_missing_bucket(&source.to_string()) =>
                        {
                            Ok(Vec::new())
                        }
                        Err(e) => Err(self.classify("list", prefix, e)),
                    }
                }
            })
            .await?;
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// A listing of `objects` took one request per page of the backend's
    /// page size; [`Self::retried`] counted the first.
    fn count_list_pages(&self, objects: usize) {
        if self.local_root.is_none() {
            let page = Cloud::of(&self.url).list_page_size();
            let pages = objects.div_ceil(page).max(1);
            self.traffic.requests("list", pages as u64 - 1);
        }
    }

    /// Deletes `key`; a missing object is not an error.
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = self.path(key)?;
        self.retried("delete", key, || {
            let path = &path;
            async move {
                match self.inner.delete(path).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                    Err(e) => Err(self.classify("delete", key, e)),
                }
            }
        })
        .await
    }

    fn io_error(&self, op: &'static str, key: &str, e: io::Error) -> StoreError {
        let message = scrub(&self.secrets, &e.to_string());
        match e.kind() {
            io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => {
                StoreError::PermissionDenied {
                    url: self.url.clone(),
                    op,
                    key: key.to_string(),
                    message,
                    fix: "make the repository directory writable by the user walsafe runs as"
                        .into(),
                }
            }
            // Disk full, I/O errors, a directory removed under us: may pass.
            _ => StoreError::Transient {
                url: self.url.clone(),
                op,
                key: key.to_string(),
                message,
            },
        }
    }

    /// Maps an `object_store` error to a [`StoreError`], scrubbing secrets.
    fn classify(&self, op: &'static str, key: &str, e: object_store::Error) -> StoreError {
        let url = self.url.clone();
        let key_s = key.to_string();
        let message = scrub(&self.secrets, &e.to_string());
        let cloud = Cloud::of(&self.url);
        let fix = match self.local_root {
            Some(_) => {
                "make the repository directory readable and writable by the user walsafe runs as"
                    .to_string()
            }
            None => cloud.permission_fix().to_string(),
        };
        match &e {
            object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. } => StoreError::PermissionDenied {
                url,
                op,
                key: key_s,
                message,
                fix,
            },
            object_store::Error::NotImplemented | object_store::Error::NotSupported { .. } => {
                StoreError::Misconfigured {
                    url,
                    message: format!(
                        "{op} is not supported by this store ({message}); walsafe needs conditional create (If-None-Match) — do not set aws_conditional_put = \"disabled\""
                    ),
                }
            }
            object_store::Error::UnknownConfigurationKey { .. } => {
                StoreError::Misconfigured { url, message }
            }
            _ if mentions_missing_bucket(&message) => StoreError::BucketMissing { url, message },
            object_store::Error::NotFound { .. } => StoreError::Other {
                url,
                op,
                key: key_s,
                message,
            },
            object_store::Error::InvalidPath { .. } => StoreError::Other {
                url,
                op,
                key: key_s,
                message,
            },
            _ => {
                if let Some(io) = find_in_chain::<io::Error>(&e) {
                    if matches!(
                        io.kind(),
                        io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem
                    ) {
                        return StoreError::PermissionDenied {
                            url,
                            op,
                            key: key_s,
                            message,
                            fix,
                        };
                    }
                }
                if find_in_chain::<object_store::client::HttpError>(&e).is_some() {
                    // Connect, timeout, reset, interrupted body: transport trouble.
                    return StoreError::Transient {
                        url,
                        op,
                        key: key_s,
                        message,
                    };
                }
                match http_status(&message) {
                    Some(s) if s >= 500 || s == 408 || s == 429 => StoreError::Transient {
                        url,
                        op,
                        key: key_s,
                        message,
                    },
                    Some(301 | 307 | 400) => StoreError::Misconfigured {
                        url,
                        message: format!("{op} {key}: {message}; {}", cloud.bad_request_fix()),
                    },
                    Some(_) => StoreError::Other {
                        url,
                        op,
                        key: key_s,
                        message,
                    },
                    // No status and no transport error: the redirect-without-
                    // location case reads as a region problem; anything else
                    // unknown is retried (it is most likely transport).
                    None if message.contains("redirect") => StoreError::Misconfigured {
                        url,
                        message: format!("{op} {key}: {message}; check aws_region"),
                    },
                    None => StoreError::Transient {
                        url,
                        op,
                        key: key_s,
                        message,
                    },
                }
            }
        }
    }
}

/// The cloud behind a repository URL, for the fixes that error messages
/// suggest: each names that cloud's own settings and permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cloud {
    S3,
    Gcs,
    Azure,
}

impl Cloud {
    /// From the (redacted) repository URL; anything not gs:// or az:// is S3.
    fn of(url: &str) -> Cloud {
        if url.starts_with("gs://") {
            Cloud::Gcs
        } else if url.starts_with("az://") || url.starts_with("azure://") {
            Cloud::Azure
        } else {
            Cloud::S3
        }
    }

    /// Objects per page of a listing, as `object_store` asks for them (it
    /// sets no page size, so the service's default and maximum applies).
    fn list_page_size(self) -> usize {
        match self {
            Cloud::S3 | Cloud::Gcs => 1000,
            Cloud::Azure => 5000,
        }
    }

    /// What to check when the credentials are refused or lack a permission.
    fn permission_fix(self) -> &'static str {
        match self {
            Cloud::S3 => "check the credentials (environment or [repository.options]) and that they allow GetObject, PutObject, ListBucket and DeleteObject on this bucket and prefix",
            Cloud::Gcs => "check the credentials (GOOGLE_SERVICE_ACCOUNT, GOOGLE_APPLICATION_CREDENTIALS or [repository.options]) and that they allow storage.objects.get, create, list and delete on this bucket (roles/storage.objectUser grants them)",
            Cloud::Azure => "check the credentials (AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY, a SAS or a service principal, in the environment or [repository.options]) and that they may read, write, list and delete blobs in this container (the Storage Blob Data Contributor role grants it)",
        }
    }

    /// What to check when the service answers 400 or a redirect.
    fn bad_request_fix(self) -> &'static str {
        match self {
            Cloud::S3 => "check the region and endpoint options",
            Cloud::Gcs => "check the endpoint (gcs_base_url in the service account key) and that the server speaks the GCS XML API for uploads (PUT /<bucket>/<object>; fake-gcs-server does not)",
            Cloud::Azure => "check azure_storage_endpoint (for Azurite: http://<host>:<port>/devstoreaccount1) and azure_storage_account_name",
        }
    }
}

/// `object_store` connects an Azure client with `use_emulator` set to
/// `AZURITE_BLOB_STORAGE_URL` (default `http://127.0.0.1:10000`) and
/// silently ignores `azure_storage_endpoint`: WAL would go to a different
/// server than the one configured. That combination is refused, with the
/// two ways to say what is meant.
fn check_azure_emulator(b: &MicrosoftAzureBuilder) -> Result<(), String> {
    let emulator = b
        .get_config_value(&AzureConfigKey::UseEmulator)
        .is_some_and(|v| {
            matches!(
                v.to_ascii_lowercase().as_str(),
                "1" | "true" | "on" | "yes" | "y"
            )
        });
    match b.get_config_value(&AzureConfigKey::Endpoint) {
        Some(endpoint) if emulator => Err(format!(
            "azure_storage_use_emulator is set, and then object_store ignores azure_storage_endpoint ({endpoint}) and connects to AZURITE_BLOB_STORAGE_URL or http://127.0.0.1:10000; for an emulator at {endpoint}, either remove azure_storage_endpoint and set AZURITE_BLOB_STORAGE_URL={endpoint} in walsafe's environment, or remove azure_storage_use_emulator and set azure_storage_endpoint = \"{}/devstoreaccount1\", azure_storage_account_name, azure_storage_account_key and azure_allow_http = \"true\"",
            endpoint.trim_end_matches('/')
        )),
        _ => Ok(()),
    }
}

/// Replaces every known secret value in `s`.
fn scrub(secrets: &[String], s: &str) -> String {
    let mut out = s.to_string();
    for secret in secrets {
        if out.contains(secret.as_str()) {
            out = out.replace(secret.as_str(), "<redacted>");
        }
    }
    out
}

fn mentions_missing_bucket(msg: &str) -> bool {
    msg.contains("NoSuchBucket")
        || msg.contains("ContainerNotFound")
        || msg.contains("The specified bucket does not exist")
}

/// The HTTP status in an `object_store` error message ("status code: 503").
fn http_status(msg: &str) -> Option<u16> {
    let i = msg.find("status code: ")? + "status code: ".len();
    msg.get(i..i + 3)?.parse().ok()
}

fn find_in_chain<'a, T: std::error::Error + 'static>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<T>() {
            return Some(t);
        }
        cur = err.source();
    }
    None
}

/// Creates the missing directories from `root` down to `dir`, each made
/// durable in its parent.
fn ensure_dirs_durably(root: &FsPath, dir: &FsPath, fsync: Fsync) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut cur = dir;
    while cur != root && !cur.is_dir() {
        missing.push(cur.to_path_buf());
        match cur.parent() {
            Some(p) => cur = p,
            None => break,
        }
    }
    for d in missing.iter().rev() {
        match std::fs::create_dir(d) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        if let Some(parent) = d.parent() {
            fsync.sync_dir(parent)?;
        }
    }
    Ok(())
}

/// Whether a file name is a staging name of [`local_create`]: `<name>#<digits>`.
fn is_staging_name(name: &str) -> bool {
    name.rsplit_once('#').is_some_and(|(base, n)| {
        !base.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())
    })
}

fn remove_stale_staging_in(root: &FsPath, age: Duration, fsync: Fsync) -> io::Result<usize> {
    let mut removed = 0;
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                dirs.push(entry.path());
                continue;
            }
            let name = entry.file_name();
            let stale = meta
                .modified()
                .ok()
                .and_then(|m| m.elapsed().ok())
                .is_some_and(|a| a >= age);
            if stale && is_staging_name(&name.to_string_lossy()) {
                match std::fs::remove_file(entry.path()) {
                    Ok(()) => removed += 1,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
        if removed > 0 {
            fsync.sync_dir(&dir)?;
        }
    }
    Ok(removed)
}

/// Durable create-only write of `root/rel`; `Ok(false)` when it exists.
fn local_create(root: &FsPath, rel: &str, data: &[u8], fsync: Fsync) -> io::Result<bool> {
    let target = root.join(rel);
    if target.exists() {
        return Ok(false);
    }
    let (tmp, dir) = local_staging(root, &target, data, fsync)?;
    let result = match std::fs::hard_link(&tmp, &target) {
        Ok(()) => fsync.sync_dir(&dir).map(|()| true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    };
    let _ = std::fs::remove_file(&tmp);
    result
}

/// Replaces the existing object `rel` with `data` in one step: a durable
/// staging file is exchanged with it (`renameat2(RENAME_EXCHANGE)`, which
/// fails when `rel` is gone), so the name holds the old object or the new
/// one at every instant and a deleted object is never brought back. The
/// old object, left under the staging name, is then removed. `Ok(false)`
/// when there was nothing to replace.
fn local_replace(root: &FsPath, rel: &str, data: &[u8], fsync: Fsync) -> io::Result<bool> {
    use nix::fcntl::{renameat2, RenameFlags};
    let target = root.join(rel);
    if !target.exists() {
        return Ok(false);
    }
    let (tmp, dir) = local_staging(root, &target, data, fsync)?;
    let result = match renameat2(None, &tmp, None, &target, RenameFlags::RENAME_EXCHANGE) {
        Ok(()) => fsync.sync_dir(&dir).map(|()| true),
        Err(nix::errno::Errno::ENOENT) => Ok(false),
        Err(e) => Err(io::Error::from(e)),
    };
    // The old object after an exchange, our copy otherwise.
    let _ = std::fs::remove_file(&tmp);
    result
}

/// Writes `data` durably to a new staging file beside `target`
/// (`<name>#<digits>`); returns it and its directory.
fn local_staging(
    root: &FsPath,
    target: &FsPath,
    data: &[u8],
    fsync: Fsync,
) -> io::Result<(PathBuf, PathBuf)> {
    use std::os::unix::fs::OpenOptionsExt;
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = target.parent().unwrap_or(root).to_path_buf();
    let file_name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // A concurrent delete may remove an empty directory between our mkdir
    // and our create; try again a few times.
    let mut tries = 0;
    let (tmp, mut file) = loop {
        ensure_dirs_durably(root, &dir, fsync)?;
        let n = ((std::process::id() as u64) << 32) | COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!("{file_name}#{n}"));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(LOCAL_FILE_MODE)
            .open(&tmp)
        {
            Ok(f) => break (tmp, f),
            Err(e) if e.kind() == io::ErrorKind::NotFound && tries < 5 => tries += 1,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && tries < 5 => tries += 1,
            Err(e) => return Err(e),
        }
    };
    let written = file.write_all(data).and_then(|()| fsync.sync_all(&file));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok((tmp, dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_urls() {
        assert_eq!(
            parse_url("file:///var/backups/walsafe").unwrap(),
            Location::File {
                root: "/var/backups/walsafe".into()
            }
        );
        assert_eq!(
            parse_url("s3://my-bucket/some/prefix/").unwrap(),
            Location::S3 {
                bucket: "my-bucket".into(),
                prefix: "some/prefix".into()
            }
        );
        assert_eq!(
            parse_url("s3://my-bucket").unwrap(),
            Location::S3 {
                bucket: "my-bucket".into(),
                prefix: "".into()
            }
        );
        assert!(matches!(parse_url("gs://b/p"), Ok(Location::Gcs { .. })));
        assert!(matches!(parse_url("az://c/p"), Ok(Location::Azure { .. })));
        assert!(matches!(
            parse_url("azure://c/p"),
            Ok(Location::Azure { .. })
        ));
    }

    #[test]
    fn refused_urls_say_why() {
        let cases = [
            ("", "empty"),
            ("/var/backups", "file:///var/backups"),
            ("http://example.com/x", "unsupported scheme"),
            ("s3://", "no bucket"),
            ("s3:///prefix", "no bucket"),
            ("az:///p", "no container"),
            (
                "s3://AKIA:secretvalue@bucket/p",
                "must not contain credentials",
            ),
            ("s3://bucket/p?x=1", "query"),
            ("file://relative/path", "three slashes"),
            ("file:///", "root directory"),
            ("s3://bucket/a//b", "empty components"),
            ("not a url", "not a URL"),
        ];
        for (url, want) in cases {
            let e = check_url(url).unwrap_err();
            assert!(e.contains(want), "{url:?}: {e}");
            assert!(!e.contains("secretvalue"), "{e}");
        }
    }

    #[test]
    fn scrubs_secrets_and_finds_status() {
        let mut o = BTreeMap::new();
        o.insert(
            "aws_secret_access_key".to_string(),
            "wJalrXUtnFEMI/K7MDENG".to_string(),
        );
        o.insert("aws_allow_http".to_string(), "true".to_string());
        let s = collect_secrets(&o);
        assert!(s.contains(&"wJalrXUtnFEMI/K7MDENG".to_string()));
        assert!(!s.contains(&"true".to_string()));
        assert_eq!(
            scrub(&s, "bad key wJalrXUtnFEMI/K7MDENG here, allow true"),
            "bad key <redacted> here, allow true"
        );
        assert_eq!(
            http_status("Server returned non-2xx status code: 503 Service Unavailable: x"),
            Some(503)
        );
        assert_eq!(http_status("connection refused"), None);
    }

    #[test]
    fn fixes_name_the_cloud_in_use() {
        let mut az = BTreeMap::new();
        az.insert("azure_storage_account_name".into(), "acct".into());
        az.insert(
            "azure_storage_account_key".into(),
            "a2V5a2V5a2V5a2V5".into(),
        );
        let stores = [
            Store::open("s3://b/p", &BTreeMap::new(), 1).unwrap(),
            Store::open("gs://b/p", &BTreeMap::new(), 1).unwrap(),
            Store::open("az://c/p", &az, 1).unwrap(),
        ];
        let denied = |s: &Store| {
            s.classify(
                "get",
                "wal/x",
                object_store::Error::PermissionDenied {
                    path: "p/wal/x".into(),
                    source: "403 Forbidden".into(),
                },
            )
        };
        // What fake-gcs-server answers to object_store's upload.
        let bad_request = |s: &Store| {
            s.classify(
                "put",
                "wal/x",
                object_store::Error::Generic {
                    store: "GCS",
                    source: "Error performing PUT http://127.0.0.1:1/b/p%2Fwal%2Fx - Server returned non-2xx status code: 400 Bad Request: invalid uploadType".into(),
                },
            )
        };
        let wants = [
            ("GetObject, PutObject", "check the region"),
            ("storage.objects.get", "GCS XML API for uploads"),
            ("Storage Blob Data Contributor", "azure_storage_endpoint"),
        ];
        for (s, (perm, bad)) in stores.iter().zip(wants) {
            let e = denied(s);
            assert!(matches!(e, StoreError::PermissionDenied { .. }), "{e}");
            assert!(!e.is_retryable());
            assert!(e.to_string().contains(perm), "{}: {e}", s.url());
            let e = bad_request(s);
            assert!(matches!(e, StoreError::Misconfigured { .. }), "{e}");
            assert!(e.to_string().contains(bad), "{}: {e}", s.url());
        }
    }

    #[tokio::test]
    async fn file_store_replace_swaps_an_existing_object_and_never_brings_one_back() {
        let d = tempfile::tempdir().unwrap();
        let url = format!("file://{}", d.path().join("repo").display());
        let s = Store::open(&url, &BTreeMap::new(), 2)
            .unwrap()
            .with_fsync(Fsync::Off);
        s.put_if_absent("wal/a", Bytes::from_static(b"old"))
            .await
            .unwrap();
        let (got, seen) = s.get_versioned("wal/a").await.unwrap().unwrap();
        assert_eq!(got, &b"old"[..]);
        assert_eq!(
            s.get_head("wal/a", 2, 3).await.unwrap().unwrap(),
            &b"ol"[..]
        );
        assert!(s
            .replace("wal/a", &seen, Bytes::from_static(b"new"))
            .await
            .unwrap());
        assert_eq!(s.get("wal/a").await.unwrap().unwrap(), &b"new"[..]);
        // Deleted meanwhile: stays deleted.
        s.delete("wal/a").await.unwrap();
        assert!(!s
            .replace("wal/a", &seen, Bytes::from_static(b"again"))
            .await
            .unwrap());
        assert_eq!(s.get("wal/a").await.unwrap(), None);
        // No staging file is left behind, and none is listed.
        assert!(s.list("wal/").await.unwrap().is_empty());
        let left: Vec<_> = std::fs::read_dir(d.path().join("repo/wal"))
            .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "{left:?}");
    }

    #[tokio::test]
    async fn file_store_create_only_get_list_delete() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("repo");
        let url = format!("file://{}", root.display());
        let s = Store::open(&url, &BTreeMap::new(), 2)
            .unwrap()
            .with_fsync(Fsync::Off);
        assert!(root.is_dir());
        assert_eq!(s.get("wal/a").await.unwrap(), None);
        assert_eq!(
            s.put_if_absent("wal/a", Bytes::from_static(b"one"))
                .await
                .unwrap(),
            PutResult::Created
        );
        assert_eq!(
            s.put_if_absent("wal/a", Bytes::from_static(b"two"))
                .await
                .unwrap(),
            PutResult::AlreadyExists
        );
        assert_eq!(s.get("wal/a").await.unwrap().unwrap(), &b"one"[..]);
        s.put_if_absent("chunks/x/1", Bytes::from_static(b"c1"))
            .await
            .unwrap();
        s.put_if_absent("chunks/x/2", Bytes::from_static(b"c22"))
            .await
            .unwrap();
        let l = s.list("chunks/").await.unwrap();
        assert_eq!(
            l,
            vec![
                ObjectInfo {
                    key: "chunks/x/1".into(),
                    size: 2
                },
                ObjectInfo {
                    key: "chunks/x/2".into(),
                    size: 3
                },
            ]
        );
        assert_eq!(s.list("nothing/").await.unwrap(), vec![]);
        s.delete("chunks/x/1").await.unwrap();
        s.delete("chunks/x/2").await.unwrap();
        s.delete("chunks/x/2").await.unwrap(); // missing: fine
        assert_eq!(s.list("chunks/").await.unwrap(), vec![]);
        // Empty chunk directories are cleaned up; a new put recreates them.
        assert!(!root.join("chunks/x").exists());
        s.put_if_absent("chunks/x/3", Bytes::from_static(b"c3"))
            .await
            .unwrap();
        assert_eq!(s.list("chunks/x/").await.unwrap().len(), 1);
        // No staging files left behind.
        let names: Vec<_> = std::fs::read_dir(root.join("wal"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["a".to_string()]);
    }

    #[tokio::test]
    async fn file_store_permission_denied_is_not_retried() {
        if unsafe { libc::geteuid() } == 0 {
            // Root ignores permissions: use a read-only bind instead? Not
            // available in tests; check the classification directly.
            let s = Store::open(
                &format!("file://{}", tempfile::tempdir().unwrap().path().display()),
                &BTreeMap::new(),
                3,
            )
            .unwrap();
            let e = s.io_error(
                "put",
                "wal/a",
                io::Error::from(io::ErrorKind::PermissionDenied),
            );
            assert!(matches!(e, StoreError::PermissionDenied { .. }));
            assert!(!e.is_retryable());
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(
            &format!("file://{}", d.path().display()),
            &BTreeMap::new(),
            3,
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o500)).unwrap();
        let e = s
            .put_if_absent("wal/a", Bytes::from_static(b"x"))
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::PermissionDenied { .. }), "{e}");
    }

    #[test]
    fn cloud_backends_construct_without_network() {
        let mut o = BTreeMap::new();
        o.insert("aws_region".to_string(), "us-east-1".to_string());
        o.insert(
            "aws_access_key_id".to_string(),
            "AKIDEXAMPLE123".to_string(),
        );
        o.insert(
            "aws_secret_access_key".to_string(),
            "secretsecretsecret".to_string(),
        );
        let s = Store::open("s3://bucket/prefix", &o, 1).unwrap();
        let dbg = format!("{s:?}");
        assert!(
            !dbg.contains("secretsecretsecret") && !dbg.contains("AKIDEXAMPLE123"),
            "{dbg}"
        );
        assert_eq!(s.path("wal/x").unwrap().as_ref(), "prefix/wal/x");
        assert_eq!(s.relative(&ObjPath::from("prefix/wal/x")), "wal/x");

        assert!(Store::open("gs://bucket/prefix", &BTreeMap::new(), 1).is_ok());

        let mut a = BTreeMap::new();
        a.insert(
            "azure_storage_account_name".to_string(),
            "devstoreaccount1".to_string(),
        );
        a.insert(
            "azure_storage_account_key".to_string(),
            "a2V5a2V5a2V5a2V5".to_string(),
        );
        assert!(Store::open("az://container/prefix", &a, 1).is_ok());

        // The emulator switch with an endpoint: object_store would ignore
        // the endpoint and connect to 127.0.0.1:10000 instead. Refused.
        let mut emu = BTreeMap::new();
        emu.insert("azure_storage_use_emulator".to_string(), "True".to_string());
        assert!(Store::open("az://container/prefix", &emu, 1).is_ok());
        emu.insert(
            "azure_storage_endpoint".to_string(),
            "http://127.0.0.1:41000/".to_string(),
        );
        let e = Store::open("az://container/prefix", &emu, 1).unwrap_err();
        assert!(matches!(e, StoreError::Misconfigured { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("AZURITE_BLOB_STORAGE_URL=http://127.0.0.1:41000/")
                && msg.contains("\"http://127.0.0.1:41000/devstoreaccount1\""),
            "{msg}"
        );
        emu.insert(
            "azure_storage_use_emulator".to_string(),
            "false".to_string(),
        );
        emu.insert("azure_storage_account_name".to_string(), "acct".to_string());
        emu.insert(
            "azure_storage_account_key".to_string(),
            "a2V5a2V5".to_string(),
        );
        assert!(Store::open("az://container/prefix", &emu, 1).is_ok());

        let mut bad = BTreeMap::new();
        bad.insert("aws_no_such_option".to_string(), "1".to_string());
        let e = Store::open("s3://bucket/p", &bad, 1).unwrap_err();
        assert!(matches!(e, StoreError::Misconfigured { .. }), "{e}");
        assert!(e.to_string().contains("aws_no_such_option"));
    }

    #[tokio::test]
    async fn stale_staging_files_of_a_crash_are_removed() {
        let d = tempfile::tempdir().unwrap();
        let url = format!("file://{}", d.path().display());
        let s = Store::open(&url, &BTreeMap::new(), 1)
            .unwrap()
            .with_fsync(Fsync::Off);
        s.put_if_absent("wal/a", Bytes::from_static(b"x"))
            .await
            .unwrap();
        let old = d.path().join("wal/000000010000000000000003#42");
        let young = d.path().join("wal/000000010000000000000004#43");
        let lookalike = d.path().join("wal/notes#draft");
        for f in [&old, &young, &lookalike] {
            std::fs::write(f, b"partial").unwrap();
        }
        let hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
        for f in [&old, &lookalike] {
            std::fs::File::options()
                .write(true)
                .open(f)
                .unwrap()
                .set_modified(hour_ago)
                .unwrap();
        }
        assert_eq!(
            s.remove_stale_staging(Duration::from_secs(600))
                .await
                .unwrap(),
            1
        );
        assert!(!old.exists());
        assert!(young.exists() && lookalike.exists());
        assert_eq!(
            s.get("wal/a").await.unwrap().unwrap(),
            Bytes::from_static(b"x")
        );
    }
}
