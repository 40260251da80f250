//! The walsafe binary under test: configuration files, the agent as a
//! child process (killed on drop), its metrics, and one-shot commands.
//!
//! Like in production (systemd `User=postgres`), walsafe runs as the user
//! PostgreSQL runs as, so that `restore_command` can read the repository
//! the agent wrote (its files are private to their owner).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The binary cargo built for this test run.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_walsafe"))
}

/// A copy of the binary inside `dir` (which the `postgres` user can
/// execute as restore_command even when the build tree is private).
pub fn bin_copy(dir: &Path) -> PathBuf {
    let dest = dir.join("walsafe");
    if !dest.exists() {
        // Copy under a temporary name, then rename: a half-written
        // executable is never visible (and never "text file busy").
        let tmp = dir.join(format!(".walsafe.{}", std::process::id()));
        std::fs::copy(bin(), &tmp).expect("copy walsafe binary");
        super::pg::chown_postgres(&tmp);
        std::fs::rename(&tmp, &dest).expect("rename walsafe binary");
    }
    dest
}

pub use super::pg::free_port;

/// What goes into a test's walsafe.toml.
#[derive(Clone, Debug)]
pub struct Settings {
    pub conninfo: String,
    pub slot: String,
    pub spool: PathBuf,
    pub repo_url: String,
    pub repo_options: Vec<(String, String)>,
    pub key_file: Option<PathBuf>,
    pub partial_interval: String,
    pub ack: String,
    pub prefetch_dir: PathBuf,
    pub prefetch: usize,
    pub metrics_port: u16,
    pub retries: u32,
    pub application_name: String,
    pub connect_timeout: String,
    /// `[spool] max_size` and `min_free`, when set.
    pub spool_max_size: Option<String>,
    pub spool_min_free: Option<String>,
    /// `[archive] stall_alarm` (short, so that outage tests see it soon).
    pub stall_alarm: String,
    /// Further `[[repository]]` tables after the first (`repo_url`).
    pub more_repositories: Vec<MoreRepository>,
}

/// A `[[repository]]` after the first.
#[derive(Clone, Debug)]
pub struct MoreRepository {
    pub name: String,
    pub url: String,
    pub options: Vec<(String, String)>,
    pub retries: u32,
    /// Its own key; `None` shares the first's.
    pub key_file: Option<PathBuf>,
}

impl Settings {
    /// Defaults for a test directory: spool, file:// repository and
    /// prefetch dir inside it, a free metrics port.
    pub fn new(dir: &Path, conninfo: &str) -> Settings {
        Settings {
            conninfo: conninfo.to_string(),
            slot: "walsafe".into(),
            spool: dir.join("spool"),
            repo_url: format!("file://{}", dir.join("repo").display()),
            repo_options: Vec::new(),
            key_file: None,
            partial_interval: "200ms".into(),
            ack: "local".into(),
            prefetch_dir: dir.join("prefetch"),
            prefetch: 4,
            metrics_port: free_port(),
            retries: 3,
            application_name: "walsafe".into(),
            connect_timeout: "20s".into(),
            spool_max_size: None,
            spool_min_free: None,
            stall_alarm: "5s".into(),
            more_repositories: Vec::new(),
        }
    }

    /// The TOML text.
    pub fn to_toml(&self) -> String {
        let mut s = format!(
            "[postgres]\nconninfo = {:?}\nslot = {:?}\napplication_name = {:?}\nconnect_timeout = {:?}\n\n[spool]\ndir = {:?}\n\n[repository]\nurl = {:?}\nretries = {}\n",
            self.conninfo, self.slot, self.application_name, self.connect_timeout, self.spool, self.repo_url, self.retries
        );
        if let Some(k) = &self.key_file {
            s += &format!("key_file = {:?}\n", k);
        }
        let spool_extra = [
            ("max_size", &self.spool_max_size),
            ("min_free", &self.spool_min_free),
        ]
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k} = {v:?}\n")))
        .collect::<String>();
        if !spool_extra.is_empty() {
            s = s.replacen(
                "\n\n[repository]",
                &format!("\n{spool_extra}\n[repository]"),
                1,
            );
        }
        if !self.repo_options.is_empty() {
            s += "[repository.options]\n";
            for (k, v) in &self.repo_options {
                s += &format!("{k} = {v:?}\n");
            }
        }
        for r in &self.more_repositories {
            s += &format!(
                "\n[[repository]]\nname = {:?}\nurl = {:?}\nretries = {}\n",
                r.name, r.url, r.retries
            );
            if let Some(k) = r.key_file.as_ref().or(self.key_file.as_ref()) {
                s += &format!("key_file = {:?}\n", k);
            }
            if !r.options.is_empty() {
                s += "[repository.options]\n";
                for (k, v) in &r.options {
                    s += &format!("{k} = {v:?}\n");
                }
            }
        }
        if !self.more_repositories.is_empty() {
            s = s.replacen("\n[repository]\n", "\n[[repository]]\n", 1);
        }
        s += &format!(
            "\n[archive]\npartial_interval = {:?}\nack = {:?}\nstall_alarm = {:?}\n\n[fetch]\ndir = {:?}\nprefetch = {}\n\n[metrics]\nlisten = \"127.0.0.1:{}\"\n",
            self.partial_interval, self.ack, self.stall_alarm, self.prefetch_dir, self.prefetch, self.metrics_port
        );
        s
    }

    /// Writes the config to `path` (readable by the postgres user).
    pub fn write(&self, path: &Path) -> PathBuf {
        std::fs::write(path, self.to_toml()).unwrap();
        super::pg::chown_postgres(path);
        path.to_path_buf()
    }
}

/// A running `walsafe run`.
pub struct Agent {
    pub config: PathBuf,
    pub metrics_port: u16,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Agent {
    /// Whether the process is still running (not exited, not killed).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Starts `walsafe --config CONFIG run` and waits until it streams.
    pub fn start(config: &Path, metrics_port: u16) -> Agent {
        let a = Self::spawn(config, metrics_port);
        a.wait_connected(Duration::from_secs(30));
        a
    }

    /// Starts the agent without waiting for anything.
    pub fn spawn(config: &Path, metrics_port: u16) -> Agent {
        let log = config.with_extension(format!("log.{}", std::process::id()));
        let logfile = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        // WALSAFE_TEST_WRAP (e.g. "heaptrack -o /tmp/agent") runs the
        // agent under a profiler; WALSAFE_TEST_LOG sets its log filter
        // (the benches run it at the default level, as operators do).
        let bin = bin_copy(config.parent().unwrap());
        let mut cmd = match std::env::var("WALSAFE_TEST_WRAP") {
            Ok(w) if !w.trim().is_empty() => {
                let mut words = w.split_whitespace();
                let mut c = Command::new(words.next().unwrap());
                c.args(words).arg(bin);
                c
            }
            _ => Command::new(bin),
        };
        super::pg::as_postgres(&mut cmd);
        let filter =
            std::env::var("WALSAFE_TEST_LOG").unwrap_or_else(|_| "walsafe=debug,info".into());
        cmd.arg("--config")
            .arg(config)
            .arg("run")
            .env("WALSAFE_LOG", filter)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logfile);
        let child = retry_text_busy(|| cmd.spawn()).expect("start walsafe run");
        Agent {
            config: config.to_path_buf(),
            metrics_port,
            log,
            child: Some(child),
        }
    }

    /// The agent's process id (0 once it is gone).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The agent's peak resident memory so far (VmHWM), in KiB (0 when gone).
    pub fn peak_rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// The first line the agent logged that contains `needle` ("" if none).
    pub fn first_log_line(&self, needle: &str) -> String {
        self.log()
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_default()
            .to_string()
    }

    /// Everything the agent logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `walsafe_replication_connected` is 1.
    pub fn wait_connected(&self, timeout: Duration) {
        let ok = wait_until(timeout, || {
            self.metrics().get("walsafe_replication_connected") == Some(&1.0)
        });
        assert!(ok, "walsafe did not start streaming; log:\n{}", self.log());
    }

    /// Scrapes the metrics endpoint (metric name with labels → value).
    pub fn metrics(&self) -> HashMap<String, f64> {
        scrape(self.metrics_port).unwrap_or_default()
    }

    /// A gauge's value (0 when absent).
    pub fn gauge(&self, name: &str) -> f64 {
        self.metrics().get(name).copied().unwrap_or(0.0)
    }

    /// Waits until the archived position reaches `lsn` (bytes).
    pub fn wait_archived(&self, lsn: u64, timeout: Duration) {
        let ok = wait_until(timeout, || {
            self.gauge("walsafe_archived_lsn_bytes") as u64 >= lsn
        });
        assert!(
            ok,
            "walsafe did not archive up to {lsn:#X} (archived {:#X}); log:\n{}",
            self.gauge("walsafe_archived_lsn_bytes") as u64,
            self.log()
        );
    }

    /// SIGKILL, no goodbye.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("agent running");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!(
                    "walsafe did not stop within 40 s of SIGTERM; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Has the process exited? (Some(status) if so.)
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().unwrap())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs `walsafe --config CONFIG ARGS…` to completion, as the user
/// PostgreSQL runs as (the repository's files are private to that user).
pub fn walsafe(config: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(bin_copy(config.parent().unwrap()));
    super::pg::as_postgres(&mut cmd);
    cmd.arg("--config")
        .arg(config)
        .args(args)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .stdin(Stdio::null());
    retry_text_busy(|| cmd.output()).expect("run walsafe")
}

/// Runs `f` (a spawn of the walsafe copy) again while it fails with
/// ETXTBSY: another thread of the test forking (psql, pg_ctl) while the
/// copy was being written leaves a child holding the file open for
/// writing until it execs, and exec of the copy fails meanwhile.
pub fn retry_text_busy<T>(mut f: impl FnMut() -> std::io::Result<T>) -> std::io::Result<T> {
    let mut tries = 0;
    loop {
        match f() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 100 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

/// `restore_command` for a config: the binary copy, run by postgres.
pub fn restore_command(dir: &Path, config: &Path) -> String {
    format!(
        "{} --config {} wal-fetch %f %p",
        bin_copy(dir).display(),
        config.display()
    )
}

/// Polls `f` every 50 ms until true or `timeout`.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The sum of a counter's series (from [`scrape`]) whose labels contain
/// `label` ("" for all of them).
pub fn counter_sum(m: &HashMap<String, f64>, name: &str, label: &str) -> f64 {
    m.iter()
        .filter(|(k, _)| {
            (k.as_str() == name || k.starts_with(&format!("{name}{{"))) && k.contains(label)
        })
        .map(|(_, v)| v)
        .sum()
}

/// Prometheus text from 127.0.0.1:port, as name{labels} → value.
pub fn scrape(port: u16) -> Option<HashMap<String, f64>> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    Some(
        body.lines()
            .filter(|l| l.starts_with("walsafe_"))
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.trim().parse().ok()?))
            })
            .collect(),
    )
}

/// Starts a cluster restored from `backup` with `walsafe wal-fetch` (using
/// `config`, binary copied into `dir`) as restore_command, plus `extra`
/// recovery settings. Does not wait: see [`restore_promoted`].
pub fn restore(backup: &Path, dir: &Path, config: &Path, extra: &[&str]) -> super::pg::PgCluster {
    let mut lines = vec![format!(
        "restore_command = '{}'",
        restore_command(dir, config)
    )];
    lines.extend(extra.iter().map(|l| l.to_string()));
    super::pg::start_restore(backup, &lines)
}

/// [`restore`], then asserts that recovery ended with promotion (the
/// server log in the message when it did not).
pub fn restore_promoted(
    backup: &Path,
    dir: &Path,
    config: &Path,
    extra: &[&str],
    what: &str,
) -> super::pg::PgCluster {
    let restored = restore(backup, dir, config, extra);
    let outcome = restored.wait_recovery_end(Duration::from_secs(120));
    assert_eq!(
        outcome,
        super::pg::RecoveryOutcome::Promoted,
        "{what}: {}",
        restored.log_tail()
    );
    restored
}

/// The archive is whole: no gap recorded in the spool, and `wal-verify`
/// finds none in the repository (its report and the agent's log in the
/// message otherwise).
pub fn assert_no_gap(agent: &Agent, spool: &Path, config: &Path) {
    assert!(
        !spool.join("walsafe.gaps").exists(),
        "a gap was recorded; log:\n{}",
        agent.log()
    );
    let v = walsafe(config, &["wal-verify"]);
    assert_eq!(
        v.status.code(),
        Some(0),
        "{}\nlog:\n{}",
        String::from_utf8_lossy(&v.stdout),
        agent.log()
    );
}

/// Complete segment names (no `.partial`), sorted, in a directory: a
/// pg_receivewal directory, a server's pg_wal, a `file://` repository's
/// `wal/`.
pub fn complete_segments(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.len() == 24 && n.bytes().all(|b| b.is_ascii_hexdigit()))
        .collect();
    v.sort();
    v
}

/// Waits until `pg_receivewal` (`recv`, writing into `dir`, segments of
/// `segment_size`) holds every complete segment up to `end`, stops it, and
/// returns the names of the complete segments it wrote.
pub fn stop_receivewal_past(
    recv: &mut std::process::Child,
    dir: &Path,
    end: u64,
    segment_size: u64,
) -> Vec<String> {
    let per_log = 0x1_0000_0000 / segment_size;
    assert!(
        wait_until(Duration::from_secs(30), || {
            complete_segments(dir).last().is_some_and(|n| {
                let segno = u64::from_str_radix(&n[8..16], 16).unwrap() * per_log
                    + u64::from_str_radix(&n[16..24], 16).unwrap();
                (segno + 1) * segment_size >= end
            })
        }),
        "pg_receivewal did not get that far"
    );
    let _ = recv.kill();
    let _ = recv.wait();
    complete_segments(dir)
}

/// `walsafe wal-fetch NAME` into `dir`; returns the bytes.
pub fn fetch_bytes(config: &Path, name: &str, dir: &Path) -> Vec<u8> {
    let dest = dir.join(format!("fetched-{name}"));
    let out = walsafe(config, &["wal-fetch", name, dest.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "wal-fetch {name} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let data = std::fs::read(&dest).unwrap();
    std::fs::remove_file(&dest).unwrap();
    data
}

/// Each of `names` is served by `wal-fetch` byte for byte as the file of
/// that name in `reference` (pg_receivewal's directory, or the server's
/// pg_wal): nothing dropped or changed, proven without walsafe's own
/// bookkeeping.
pub fn assert_served_as(config: &Path, reference: &Path, names: &[String], work: &Path) {
    assert!(!names.is_empty(), "no segment to compare");
    for name in names {
        let theirs = std::fs::read(reference.join(name))
            .unwrap_or_else(|e| panic!("{name} in {}: {e}", reference.display()));
        let ours = fetch_bytes(config, name, work);
        let differs = ours.iter().zip(&theirs).position(|(a, b)| a != b);
        assert!(
            ours.len() == theirs.len() && differs.is_none(),
            "{name} served by wal-fetch differs from {} (at byte {differs:?}, {} vs {} bytes)",
            reference.display(),
            ours.len(),
            theirs.len()
        );
    }
}
