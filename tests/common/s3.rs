//! A real S3 server for integration tests: moto's server on loopback.
//!
//! [`S3Server::start`] runs `python3 -m moto.server` (or `moto_server`)
//! bound to 127.0.0.1 on a free port, waits until it answers, and creates
//! the bucket [`BUCKET`]. The server is killed when the value is dropped
//! (also while unwinding from a failed assertion) and, should the test
//! process die outright, by the kernel (`PR_SET_PDEATHSIG`).
//!
//! Clients get explicit test credentials ([`S3Server::repo_options`]) and
//! `AWS_EC2_METADATA_DISABLED=true` is set, so nothing ever tries a cloud
//! metadata endpoint.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The bucket every server starts with.
pub const BUCKET: &str = "walsafe-test";
/// Test credentials (moto accepts any).
pub const ACCESS_KEY_ID: &str = "walsafe-test-access-key";
pub const SECRET_ACCESS_KEY: &str = "walsafe-test-secret-key-do-not-leak";

/// A running moto S3 server.
pub struct S3Server {
    child: Option<Child>,
    port: u16,
    log: std::path::PathBuf,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .unwrap()
        .port()
}

/// One HTTP/1.1 request over a fresh connection; returns (status, body).
pub fn http(port: u16, method: &str, path: &str, body: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    s.write_all(body)?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let text = String::from_utf8_lossy(&resp);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body_at = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
        .unwrap_or(resp.len());
    Ok((status, resp[body_at..].to_vec()))
}

fn moto_command(port: u16) -> Command {
    let have_module = Command::new("python3")
        .args(["-c", "import moto.server"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let mut cmd = if have_module {
        let mut c = Command::new("python3");
        c.args(["-m", "moto.server"]);
        c
    } else if Command::new("moto_server")
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        Command::new("moto_server")
    } else {
        panic!("moto's S3 server is not available; install it: pip install 'moto[server]'");
    };
    cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
    cmd
}

impl S3Server {
    /// Starts a server with bucket [`BUCKET`]; panics with the fix when
    /// moto is missing or does not come up.
    pub fn start() -> S3Server {
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
        let port = free_port();
        let log =
            std::env::temp_dir().join(format!("walsafe-moto-{}-{port}.log", std::process::id()));
        let log_file = std::fs::File::create(&log).expect("create moto log");
        let mut cmd = moto_command(port);
        cmd.stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .env("AWS_EC2_METADATA_DISABLED", "true");
        // SAFETY: prctl is async-signal-safe; nothing else runs in the child.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn moto server");
        let mut server = S3Server {
            child: Some(child),
            port,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok((status, _)) = http(port, "GET", "/", b"") {
                if status != 0 {
                    break;
                }
            }
            if let Some(st) = server.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "moto server exited ({st}) before answering; log:\n{}\ninstall it: pip install 'moto[server]'",
                    std::fs::read_to_string(&server.log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "moto server on port {port} did not answer within 60 s; log:\n{}",
                std::fs::read_to_string(&server.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let (status, body) = http(port, "PUT", &format!("/{BUCKET}"), b"").expect("create bucket");
        assert_eq!(
            status,
            200,
            "creating bucket {BUCKET} failed: {}",
            String::from_utf8_lossy(&body)
        );
        server
    }

    /// The server's process id (to stop it with SIGSTOP: a hang).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// The server's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `s3://walsafe-test/<prefix>`.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{BUCKET}/{prefix}")
    }

    /// `[repository.options]` for this server: endpoint, plain HTTP,
    /// region, path-style requests and explicit test credentials.
    pub fn repo_options(&self) -> BTreeMap<String, String> {
        [
            ("aws_endpoint", self.endpoint()),
            ("aws_allow_http", "true".to_string()),
            ("aws_region", "us-east-1".to_string()),
            ("aws_access_key_id", ACCESS_KEY_ID.to_string()),
            ("aws_secret_access_key", SECRET_ACCESS_KEY.to_string()),
            ("aws_virtual_hosted_style_request", "false".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// [`S3Server::repo_options`] with another endpoint (a TCP front
    /// before the server, which a test takes down).
    pub fn repo_options_at(&self, endpoint: &str) -> BTreeMap<String, String> {
        let mut o = self.repo_options();
        o.insert("aws_endpoint".into(), endpoint.to_string());
        o
    }

    /// A raw `object_store` client for the bucket, to inspect and damage
    /// objects behind walsafe's back.
    pub fn raw_client(&self) -> object_store::aws::AmazonS3 {
        let mut b = object_store::aws::AmazonS3Builder::new().with_bucket_name(BUCKET);
        for (k, v) in self.repo_options() {
            b = b.with_config(k.parse().unwrap(), v);
        }
        b.build().expect("raw S3 client")
    }

    /// Kills the server now (storage outage).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(&self.log);
    }
}
