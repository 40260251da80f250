//! A storage emulator as a child process on 127.0.0.1, shared by the
//! Azurite ([`super::azure`]) and fake-gcs-server ([`super::gcs`]) harnesses.
//!
//! [`ServerProcess`] remembers its command line, so that [`ServerProcess::stop`]
//! followed by [`ServerProcess::start`] brings the same server back on the
//! same port over the same data directory: a storage outage and its end.
//! The child is killed when the value is dropped (also while unwinding from
//! a failed assertion) and, should the test thread die outright, by the
//! kernel (`PR_SET_PDEATHSIG`).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One HTTP/1.0 request to 127.0.0.1:`port` over a fresh connection
/// (HTTP/1.0, so that no server answers with a chunked body); returns
/// (status, body). Status 0 means no parsable answer.
pub fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut head = format!(
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head += &format!("{k}: {v}\r\n");
    }
    head += "\r\n";
    s.write_all(head.as_bytes())?;
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

/// A server started from a fixed command line, restartable.
pub struct ServerProcess {
    /// What it is, for messages ("Azurite").
    name: &'static str,
    program: PathBuf,
    args: Vec<String>,
    port: u16,
    /// Request path that any running server answers (any status).
    probe: &'static str,
    /// stdout and stderr of every run, appended.
    log: PathBuf,
    child: Option<Child>,
}

impl ServerProcess {
    /// Starts `program args…`, which must listen on 127.0.0.1:`port`, and
    /// waits until it answers `GET probe`.
    pub fn start_new(
        name: &'static str,
        program: PathBuf,
        args: Vec<String>,
        port: u16,
        probe: &'static str,
    ) -> ServerProcess {
        let log = std::env::temp_dir().join(format!(
            "walsafe-{}-{}-{port}.log",
            name.to_ascii_lowercase().replace(' ', "-"),
            std::process::id()
        ));
        let mut p = ServerProcess {
            name,
            program,
            args,
            port,
            probe,
            log,
            child: None,
        };
        p.start();
        p
    }

    /// The port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Everything the server printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// (Re)starts the server with the same command line and waits until
    /// it answers; panics with its log when it does not within 60 s.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open server log");
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .env("AWS_EC2_METADATA_DISABLED", "true");
        // SAFETY: prctl is async-signal-safe; nothing else runs in the child.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("start {} ({:?}): {e}", self.name, self.program));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok((status, _)) = request(self.port, "GET", self.probe, &[], b"") {
                if status != 0 {
                    return;
                }
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!(
                    "{} exited ({st}) before answering on 127.0.0.1:{}; log:\n{}",
                    self.name,
                    self.port,
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} on 127.0.0.1:{} did not answer within 60 s; log:\n{}",
                self.name,
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server now (a storage outage); its data stays. SIGTERM
    /// first, so that a server that keeps its metadata in memory (Azurite
    /// saves its database every 5 s) writes it out; SIGKILL after 15 s.
    pub fn stop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        // SAFETY: kill(2) on our own child's pid, which has not been reaped.
        unsafe {
            libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
    }

    /// Whether the server process is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Where `scripts/test.sh` installs test servers that do not come from the
/// distribution: `$WALSAFE_TEST_TOOLS`, else `$XDG_CACHE_HOME/walsafe-test-tools`,
/// else `~/.cache/walsafe-test-tools`.
pub fn tools_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("WALSAFE_TEST_TOOLS") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("walsafe-test-tools");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/walsafe-test-tools")
}
