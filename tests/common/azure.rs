//! A real Azure Blob Storage server for integration tests: Azurite
//! (npm `azurite@3.35.0`, its blob service only) on loopback.
//!
//! [`AzureServer::start`] runs `azurite-blob` bound to 127.0.0.1 on a free
//! port, with its data in a temporary directory, telemetry off
//! (`--disableTelemetry`: Azurite otherwise reports to a cloud endpoint),
//! and creates the container [`CONTAINER`] with a SharedKey-signed request.
//! [`AzureServer::stop`] and [`AzureServer::restart`] make an outage and end
//! it: the same port, the same stored blobs.
//!
//! Where Azurite is looked for: `$WALSAFE_AZURITE` (the `azurite-blob`
//! script), else `<tools>/npm/node_modules/.bin/azurite-blob` where
//! `scripts/test.sh` installs it (see [`super::server::tools_dir`]), else
//! `azurite-blob` on `PATH`.
//!
//! Clients get Azurite's well-known development account and key,
//! explicitly ([`AzureServer::repo_options`]), and the account's endpoint
//! on loopback, so nothing ever tries Azure's instance metadata service.

use std::collections::BTreeMap;
use std::path::PathBuf;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::server::{request, tools_dir, ServerProcess};

/// The container every server starts with.
pub const CONTAINER: &str = "walsafe-test";
/// Azurite's well-known development account.
pub const ACCOUNT: &str = "devstoreaccount1";
/// Azurite's well-known development account key (public, documented).
pub const ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
/// Blob service REST version for the harness's own requests.
const API_VERSION: &str = "2021-08-06";

/// A running Azurite blob service.
pub struct AzureServer {
    process: ServerProcess,
    /// Azurite's workspace (blobs and metadata), kept across restarts.
    _data: tempfile::TempDir,
}

fn azurite_blob() -> PathBuf {
    if let Some(p) = std::env::var_os("WALSAFE_AZURITE") {
        return PathBuf::from(p);
    }
    let local = tools_dir().join("npm/node_modules/.bin/azurite-blob");
    if local.exists() {
        return local;
    }
    let on_path = std::process::Command::new("azurite-blob")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if on_path {
        return PathBuf::from("azurite-blob");
    }
    panic!(
        "Azurite is not installed; scripts/test.sh installs it, or: npm install --prefix {} azurite@3.35.0 (or set WALSAFE_AZURITE to its azurite-blob)",
        tools_dir().join("npm").display()
    );
}

impl AzureServer {
    /// Starts Azurite with container [`CONTAINER`]; panics with the fix
    /// when Azurite is missing or does not come up.
    pub fn start() -> AzureServer {
        let data = tempfile::tempdir().expect("Azurite workspace");
        let port = super::pg::free_port();
        let args = [
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            &port.to_string(),
            "--location",
            data.path().to_str().unwrap(),
            "--disableTelemetry",
            "--silent",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let process = ServerProcess::start_new("Azurite", azurite_blob(), args, port, "/");
        let server = AzureServer {
            process,
            _data: data,
        };
        let (status, body) = server.signed("PUT", CONTAINER, "restype=container");
        assert_eq!(
            status,
            201,
            "creating container {CONTAINER} failed: {}",
            String::from_utf8_lossy(&body)
        );
        server
    }

    /// A SharedKey-signed request without body to `/<account>/<path>?<query>`.
    fn signed(&self, method: &str, path: &str, query: &str) -> (u16, Vec<u8>) {
        let date = chrono::Utc::now()
            .format("%a, %d %b %Y %H:%M:%S GMT")
            .to_string();
        let mut resource = format!("/{ACCOUNT}/{ACCOUNT}/{path}");
        let mut params: Vec<(&str, &str)> =
            query.split('&').filter_map(|p| p.split_once('=')).collect();
        params.sort();
        for (k, v) in &params {
            resource += &format!("\n{k}:{v}");
        }
        let to_sign = format!(
            "{method}\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{API_VERSION}\n{resource}"
        );
        let key = base64::engine::general_purpose::STANDARD
            .decode(ACCOUNT_KEY)
            .unwrap();
        let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
        mac.update(to_sign.as_bytes());
        let signature =
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        let headers = [
            ("x-ms-date", date),
            ("x-ms-version", API_VERSION.to_string()),
            ("Authorization", format!("SharedKey {ACCOUNT}:{signature}")),
        ];
        let target = format!("/{ACCOUNT}/{path}?{query}");
        request(self.port(), method, &target, &headers, b"").expect("request to Azurite")
    }

    /// Creates another (empty) container.
    pub fn create_container(&self, name: &str) {
        let (status, body) = self.signed("PUT", name, "restype=container");
        assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
    }

    /// The server's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.process.port()
    }

    /// The account's blob endpoint, path style: `http://127.0.0.1:<port>/devstoreaccount1`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/{ACCOUNT}", self.port())
    }

    /// `az://walsafe-test/<prefix>`.
    pub fn url(&self, prefix: &str) -> String {
        format!("az://{CONTAINER}/{prefix}")
    }

    /// `[repository.options]` for this server: the account, its key and
    /// its endpoint on loopback over plain HTTP. (Not
    /// `azure_storage_use_emulator`: `object_store` then ignores the
    /// endpoint and connects to `AZURITE_BLOB_STORAGE_URL` or port 10000.)
    pub fn repo_options(&self) -> BTreeMap<String, String> {
        [
            ("azure_storage_account_name", ACCOUNT.to_string()),
            ("azure_storage_account_key", ACCOUNT_KEY.to_string()),
            ("azure_storage_endpoint", self.endpoint()),
            ("azure_allow_http", "true".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// A raw `object_store` client for the container, to inspect and damage
    /// blobs behind walsafe's back.
    pub fn raw_client(&self) -> object_store::azure::MicrosoftAzure {
        let mut b =
            object_store::azure::MicrosoftAzureBuilder::new().with_container_name(CONTAINER);
        for (k, v) in self.repo_options() {
            b = b.with_config(k.parse().unwrap(), v);
        }
        b.build().expect("raw Azure client")
    }

    /// Stops the server now (storage outage); the blobs stay.
    pub fn stop(&mut self) {
        self.process.stop();
    }

    /// Starts the stopped server again, same port, same blobs.
    pub fn restart(&mut self) {
        self.process.start();
    }

    /// Everything Azurite printed.
    pub fn log(&self) -> String {
        self.process.log()
    }
}
