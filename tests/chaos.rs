//! Chaos: for a while (`WALSAFE_CHAOS_SECS`, default 30), faults in a
//! seeded random order while a load commits rows, then everything catches
//! up and the outcome is checked. `scripts/soak.sh` runs the same test for
//! minutes in a release build, with a long storage outage.
//!
//! The scene:
//!
//! ```text
//!  load (rows, synchronous_commit on) ─┐          ┌─▶ standby (walreceiver, synchronous too)
//!  filler (bulk WAL, commit local) ────┴▶ primary ┼─▶ walsafe (synchronous, ack local) ─▶ front ─▶ moto (S3)
//!                                                 └─▶ pg_receivewal (slot "recv": the byte-exact reference)
//! ```
//!
//! walsafe's conninfo lists both servers with
//! `target_session_attrs=read-write`; so does the load's. The faults,
//! one at a time, each followed by a wait for walsafe to catch up:
//!
//! - the agent killed (SIGKILL) and started again;
//! - the agent stopped (SIGSTOP) and continued (SIGCONT);
//! - the storage down and up again on the same port, objects kept (the
//!   TCP front in front of moto, see `common::front` for why not moto
//!   itself); the soak adds one long outage under load;
//! - the primary restarted (fast or immediate shutdown);
//! - a failover: the primary stopped immediately, the standby promoted, the
//!   old primary re-cloned as the new standby (same port), so that the next
//!   failover goes back.
//!
//! Afterwards: no gap recorded and `wal-verify` clean; every complete
//! segment walsafe stored equals pg_receivewal's of the same name (those
//! pg_receivewal lacks are counted, most must overlap); a restore of the
//! base backup through every timeline holds every row whose commit
//! returned. A table per fault kind (first WARN/ERROR walsafe logged, bytes
//! lost, time to reconnect and to catch up, peak RSS) is printed; nothing
//! is asserted on timings.
//!
//! `WALSAFE_CHAOS_SEED` replays a run (the seed is printed first);
//! `WALSAFE_CHAOS_LONG_OUTAGE_SECS` adds the long storage outage midway.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use common::front::TcpFront;
use common::pg::{PgCluster, PgOptions, RecoveryOutcome, TestDir};
use common::s3::{S3Server, BUCKET};
use common::setup::{keygen, parse_lsn};
use common::walsafe::{restore, walsafe, Agent, Settings};

/// Both walsafe and the standby are synchronous standbys, so a commit
/// returns only once walsafe has it fsynced in its spool (ack `local`) and
/// the standby has flushed it: a failover to the standby then never loses
/// a commit that returned, and the restore must hold every recorded row.
/// Chosen over "wait until the standby replayed the primary's flush
/// position, then stop the primary": the load never pauses, so commits
/// returning between that check and the stop would be lost to the new
/// timeline (an asynchronous failover's known loss, not walsafe's).
/// `walreceiver` is the standby's default application_name.
const SYNC_BOTH: &str = "FIRST 2 (walsafe, walreceiver)";
/// While there is no standby (right after a failover, until the old primary
/// is re-cloned), walsafe alone.
const SYNC_WALSAFE: &str = "walsafe";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    AgentKill,
    AgentStopCont,
    StorageDownUp,
    StorageLongOutage,
    PgRestart,
    Failover,
}

impl Fault {
    fn label(self) -> &'static str {
        match self {
            Fault::AgentKill => "agent kill -9",
            Fault::AgentStopCont => "agent stop/cont",
            Fault::StorageDownUp => "storage down/up",
            Fault::StorageLongOutage => "storage long outage",
            Fault::PgRestart => "PostgreSQL restart",
            Fault::Failover => "failover",
        }
    }
}

/// What one fault did and cost.
struct Record {
    fault: Fault,
    detail: String,
    /// The first WARN or ERROR line walsafe logged from the fault's start
    /// until it caught up.
    first_log: Option<String>,
    /// Bytes of gaps recorded from the fault's start until it caught up.
    lost_bytes: u64,
    /// From the fault's end until walsafe_replication_connected = 1.
    reconnect: Option<Duration>,
    /// From the fault's end until walsafe_archived_lsn_bytes reached the
    /// server's position at the fault's end.
    caught_up: Option<Duration>,
    /// Peak VmRSS of the agent (kB) from the fault's start until it caught up.
    peak_rss_kb: u64,
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// VmRSS of a process, in kB.
fn vm_rss_kb(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Bytes of gaps recorded in the spool's `walsafe.gaps`, and its lines.
fn recorded_gaps(spool: &Path) -> (u64, Vec<String>) {
    let text = std::fs::read_to_string(spool.join("walsafe.gaps")).unwrap_or_default();
    let mut bytes = 0;
    let mut lines = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
        if let (Some(from), Some(to)) = (v["from"].as_str(), v["to"].as_str()) {
            bytes += parse_lsn(to).saturating_sub(parse_lsn(from));
        }
        lines.push(line.to_string());
    }
    (bytes, lines)
}

/// The first WARN or ERROR line in `log` from byte `from` on, without its
/// timestamp.
fn first_warning(log: &Path, from: u64) -> Option<String> {
    let mut f = std::fs::File::open(log).ok()?;
    f.seek(SeekFrom::Start(from)).ok()?;
    let mut text = String::new();
    f.read_to_string(&mut text).ok()?;
    // The log may carry ANSI colours around the level.
    let text = regex::Regex::new("\x1b\\[[0-9;]*m")
        .unwrap()
        .replace_all(&text, "");
    text.lines()
        .find(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .map(|l| {
            let l = l.trim();
            let l = l.split_once(' ').map_or(l, |(_, rest)| rest.trim_start());
            l.chars().take(160).collect()
        })
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// Complete segment names (24 hex digits) among `names`.
fn complete(names: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut v: Vec<String> = names
        .into_iter()
        .filter(|n| n.len() == 24 && n.bytes().all(|b| b.is_ascii_hexdigit()))
        .collect();
    v.sort();
    v
}

/// The complete segments stored under `<prefix>/wal/` in the bucket (the
/// front must be up).
fn stored_segments(port: u16, prefix: &str) -> Vec<String> {
    let key = regex::Regex::new(r"<Key>([^<]*)</Key>").unwrap();
    let token =
        regex::Regex::new(r"<NextContinuationToken>([^<]*)</NextContinuationToken>").unwrap();
    let mut names = Vec::new();
    let mut cont: Option<String> = None;
    loop {
        let mut path = format!("/{BUCKET}?list-type=2&prefix={prefix}/wal/");
        if let Some(c) = &cont {
            path += &format!(
                "&continuation-token={}",
                percent_encoding::utf8_percent_encode(c, percent_encoding::NON_ALPHANUMERIC)
            );
        }
        let (status, body) = common::s3::http(port, "GET", &path, b"").expect("list the bucket");
        let body = String::from_utf8_lossy(&body).into_owned();
        assert_eq!(status, 200, "listing the bucket: {body}");
        names.extend(
            key.captures_iter(&body)
                .map(|c| c[1].rsplit('/').next().unwrap().to_string()),
        );
        match token.captures(&body) {
            Some(c) => cont = Some(c[1].to_string()),
            None => break,
        }
    }
    complete(names)
}

/// A thread committing one row per transaction (synchronous_commit on)
/// and recording the id of every commit that returned.
fn spawn_rows(
    conninfo: String,
    stop: Arc<AtomicBool>,
    committed: Arc<Mutex<Vec<i64>>>,
    uncertain: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut next = 1i64;
            while !stop.load(Ordering::SeqCst) {
                let Ok((client, conn)) =
                    tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await
                else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let conn = tokio::spawn(conn);
                while !stop.load(Ordering::SeqCst) {
                    let id = next;
                    next += 1;
                    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&id];
                    let insert = client.execute("INSERT INTO chaos_rows (id) VALUES ($1)", &params);
                    match tokio::time::timeout(Duration::from_secs(60), insert).await {
                        Ok(Ok(_)) => committed.lock().unwrap().push(id),
                        // Failed or cut off: committed or not, nobody knows.
                        _ => {
                            uncertain.fetch_add(1, Ordering::SeqCst);
                            break;
                        }
                    }
                }
                conn.abort();
            }
        })
    })
}

/// A thread writing bulk WAL (commits wait for the local flush only), so
/// that segments fill and switch under the faults.
fn spawn_filler(conninfo: String, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let Ok((client, conn)) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await
                else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let conn = tokio::spawn(conn);
                if client.batch_execute("SET synchronous_commit = local").await.is_err() {
                    conn.abort();
                    continue;
                }
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    let sql = if n % 200 == 0 {
                        "TRUNCATE chaos_filler"
                    } else {
                        "INSERT INTO chaos_filler SELECT repeat(md5(g::text), 30) FROM generate_series(1, 400) g"
                    };
                    let r = tokio::time::timeout(Duration::from_secs(60), client.batch_execute(sql)).await;
                    if !matches!(r, Ok(Ok(()))) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                conn.abort();
            }
        })
    })
}

/// Everything the faults act on.
struct Chaos {
    rng: StdRng,
    dir: TestDir,
    /// Two clusters; `primary` indexes the current primary, the other is the
    /// standby (or being re-cloned into one).
    nodes: [PgCluster; 2],
    primary: usize,
    /// The standby streams synchronously and holds everything committed:
    /// a failover is safe now.
    standby_ready: bool,
    s3: S3Server,
    front: TcpFront,
    settings: Settings,
    config: PathBuf,
    agent: Agent,
    /// The agent's pid for the RSS sampler, and the peak it saw.
    rss_pid: Arc<AtomicU32>,
    rss_peak: Arc<AtomicU64>,
    recv: Option<Child>,
    recv_dir: PathBuf,
    recv_starts: u32,
    /// When pg_receivewal last ended (it is started again after a pause).
    recv_ended: Option<Instant>,
    records: Vec<Record>,
    failovers: u32,
}

impl Chaos {
    fn primary(&self) -> &PgCluster {
        &self.nodes[self.primary]
    }

    fn standby(&self) -> &PgCluster {
        &self.nodes[1 - self.primary]
    }

    /// The primary's current WAL position (retried while it starts).
    fn server_lsn(&self) -> u64 {
        for _ in 0..300 {
            if let Ok(t) = self.primary().try_psql("SELECT pg_current_wal_lsn()") {
                return parse_lsn(&t);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "the primary does not answer:\n{}",
            self.primary().log_tail()
        );
    }

    /// Panics when the agent exited by itself (rule 8: never exit).
    fn check_agent_alive(&mut self) {
        if let Some(st) = self.agent.try_wait() {
            panic!(
                "walsafe exited by itself ({st}); log tail:\n{}",
                tail(&self.agent.log(), 60)
            );
        }
    }

    /// pg_receivewal runs against the primary (restarted after it ended:
    /// it runs with --no-loop). When it cannot go on from the files it has,
    /// they are moved aside (`<name>.aside`, still compared), as an
    /// operator would: WAL the new primary never had (the old primary's
    /// past the fork: "not in this server's history") moves the newest file
    /// aside, one per try; a start the server no longer has ("already been
    /// removed", its own restarts fell behind its slot) moves all of them,
    /// so that it starts at its slot.
    fn keep_receiving(&mut self) {
        if let Some(c) = self.recv.as_mut() {
            if matches!(c.try_wait(), Ok(None)) {
                return;
            }
            let log = self.receivewal_log_tail();
            let mut files: Vec<String> = std::fs::read_dir(&self.recv_dir)
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.len() >= 24 && !n.ends_with(".aside") && !n.ends_with(".history"))
                .collect();
            files.sort();
            let aside: Vec<String> = if log.contains("not in this server's history") {
                files.pop().into_iter().collect()
            } else if log.contains("has already been removed") {
                files
            } else {
                Vec::new()
            };
            for name in &aside {
                let from = self.recv_dir.join(name);
                let _ = std::fs::rename(&from, self.recv_dir.join(format!("{name}.aside")));
            }
            if !aside.is_empty() {
                println!("chaos: pg_receivewal cannot go on; moved aside {aside:?}");
            }
            self.recv = None;
            self.recv_ended = Some(Instant::now());
        }
        if self
            .recv_ended
            .is_some_and(|t| t.elapsed() < Duration::from_millis(500))
        {
            return;
        }
        let primary = self.primary();
        if primary.try_psql("SELECT pg_is_in_recovery()").as_deref() != Ok("f") {
            return;
        }
        let child = primary.spawn_pg_receivewal(&self.recv_dir, Some("recv"));
        self.recv = Some(child);
        self.recv_starts += 1;
    }

    /// The end of pg_receivewal's newest log (each start writes one, in the
    /// directory of the cluster it streams from).
    fn receivewal_log_tail(&self) -> String {
        let newest = self
            .nodes
            .iter()
            .flat_map(|n| std::fs::read_dir(n.test_dir().path()).into_iter().flatten())
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("pg_receivewal-")
            })
            .filter(|e| e.metadata().is_ok_and(|m| m.len() > 0))
            .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok());
        newest.map_or_else(
            || "(no pg_receivewal log)".into(),
            |e| tail(&std::fs::read_to_string(e.path()).unwrap_or_default(), 20),
        )
    }

    /// Sleeps `d`, keeping pg_receivewal running.
    fn idle(&mut self, d: Duration) {
        let until = Instant::now() + d;
        loop {
            self.keep_receiving();
            let now = Instant::now();
            if now >= until {
                return;
            }
            std::thread::sleep((until - now).min(Duration::from_millis(200)));
        }
    }

    /// Moves the standby's copies of the slots to where the primary's are
    /// (what Patroni does for permanent physical slots), so that the
    /// standby keeps the WAL both consumers need after a failover, and no
    /// more.
    fn sync_standby_slots(&self) {
        if !self.standby_ready {
            return;
        }
        for slot in ["walsafe", "recv"] {
            let Ok(lsn) = self.primary().try_psql(&format!(
                "SELECT restart_lsn FROM pg_replication_slots WHERE slot_name = '{slot}'"
            )) else {
                continue;
            };
            if !lsn.is_empty() {
                let _ = self.standby().try_psql(&format!(
                    "SELECT pg_replication_slot_advance('{slot}', '{lsn}')"
                ));
            }
        }
    }

    /// Waits until the standby is a synchronous standby holding everything
    /// the primary flushed when it became one.
    fn wait_standby_sync(&mut self) {
        let primary = self.primary();
        primary.wait_for(
            "SELECT count(*) FROM pg_stat_replication WHERE application_name = 'walreceiver' AND sync_state = 'sync'",
            "1",
            Duration::from_secs(60),
        );
        let flushed = primary.psql("SELECT pg_current_wal_flush_lsn()");
        primary.wait_for(
            &format!(
                "SELECT count(*) FROM pg_stat_replication WHERE application_name = 'walreceiver' AND flush_lsn >= '{flushed}'"
            ),
            "1",
            Duration::from_secs(60),
        );
        self.standby_ready = true;
    }

    fn set_sync_names(&self, names: &str) {
        let p = self.primary();
        p.psql(&format!(
            "ALTER SYSTEM SET synchronous_standby_names = '{names}'"
        ));
        p.psql("SELECT pg_reload_conf()");
    }

    /// Runs one fault, measures its recovery, records it.
    fn run(&mut self, fault: Fault, long_outage: Duration) {
        self.check_agent_alive();
        self.sync_standby_slots();
        let log_from = file_len(&self.agent.log);
        let (gaps_before, _) = recorded_gaps(&self.settings.spool);
        self.rss_peak.store(0, Ordering::SeqCst);
        let detail = match fault {
            Fault::AgentKill => {
                let down = Duration::from_millis(self.rng.gen_range(0..1500));
                self.agent.kill9();
                self.rss_pid.store(0, Ordering::SeqCst);
                self.idle(down);
                self.agent = Agent::spawn(&self.config, self.settings.metrics_port);
                self.rss_pid.store(self.agent.pid(), Ordering::SeqCst);
                format!("down {down:.1?}")
            }
            Fault::AgentStopCont => {
                let stopped = Duration::from_millis(self.rng.gen_range(300..3000));
                let pid = nix::unistd::Pid::from_raw(self.agent.pid() as i32);
                nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
                self.idle(stopped);
                nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
                format!("stopped {stopped:.1?}")
            }
            Fault::StorageDownUp | Fault::StorageLongOutage => {
                let down = if fault == Fault::StorageLongOutage {
                    long_outage
                } else {
                    Duration::from_millis(self.rng.gen_range(500..6000))
                };
                self.front.down();
                self.idle(down);
                self.front.up();
                format!("down {down:.1?}")
            }
            Fault::PgRestart => {
                let immediate = self.rng.gen_bool(0.5);
                let down = Duration::from_millis(self.rng.gen_range(0..1000));
                if immediate {
                    self.primary().stop_immediate();
                } else {
                    self.primary().stop_fast();
                }
                self.idle(down);
                self.primary().start_again();
                format!(
                    "{} stop, down {down:.1?}",
                    if immediate { "immediate" } else { "fast" }
                )
            }
            Fault::Failover => {
                assert!(self.standby_ready);
                let old = self.primary;
                self.nodes[old].stop_immediate();
                self.standby_ready = false;
                self.primary = 1 - old;
                let new = self.primary();
                new.promote();
                new.wait_for("SELECT pg_is_in_recovery()", "f", Duration::from_secs(60));
                self.set_sync_names(SYNC_WALSAFE);
                self.failovers += 1;
                format!(
                    "to node {}, timeline {}",
                    self.primary,
                    timeline(self.primary())
                )
            }
        };
        let ended = Instant::now();
        let target = self.server_lsn();
        let timeout = Duration::from_secs(60).max(long_outage * 2);
        let (mut reconnect, mut caught_up) = (None, None);
        while ended.elapsed() < timeout && caught_up.is_none() {
            self.keep_receiving();
            self.check_agent_alive();
            let m = self.agent.metrics();
            if reconnect.is_none() && m.get("walsafe_replication_connected") == Some(&1.0) {
                reconnect = Some(ended.elapsed());
            }
            if reconnect.is_some()
                && m.get("walsafe_archived_lsn_bytes").copied().unwrap_or(0.0) as u64 >= target
            {
                caught_up = Some(ended.elapsed());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let (gaps_after, _) = recorded_gaps(&self.settings.spool);
        let record = Record {
            fault,
            detail,
            first_log: first_warning(&self.agent.log, log_from),
            lost_bytes: gaps_after - gaps_before,
            reconnect,
            caught_up,
            peak_rss_kb: self.rss_peak.load(Ordering::SeqCst),
        };
        println!(
            "chaos: {:<20} {:<40} reconnect {:>8} caught up {:>8} peak RSS {:>6} MiB lost {} B | {}",
            fault.label(),
            record.detail,
            secs(record.reconnect),
            secs(record.caught_up),
            record.peak_rss_kb / 1024,
            record.lost_bytes,
            record.first_log.as_deref().unwrap_or("-")
        );
        self.records.push(record);
        if fault == Fault::Failover {
            // The old primary comes back as the new standby, on its own port
            // (walsafe's conninfo lists it), with copies of both slots.
            let old = 1 - self.primary;
            self.nodes[old].reclone_as_standby_of(&self.nodes[self.primary]);
            for slot in ["walsafe", "recv"] {
                self.nodes[old].psql(&format!(
                    "SELECT pg_create_physical_replication_slot('{slot}', true)"
                ));
            }
            self.set_sync_names(SYNC_BOTH);
            self.wait_standby_sync();
        }
    }
}

/// The server's current timeline (from the name of its current WAL file:
/// pg_control_checkpoint() lags behind a promotion until a checkpoint).
fn timeline(pg: &PgCluster) -> u32 {
    let name = pg.psql("SELECT pg_walfile_name(pg_current_wal_lsn())");
    u32::from_str_radix(&name[..8], 16).unwrap()
}

fn secs(d: Option<Duration>) -> String {
    d.map_or("never".into(), |d| format!("{:.2}s", d.as_secs_f64()))
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// One line per fault kind: how often, the first WARN/ERROR, bytes lost,
/// reconnect and catch-up times (median / max), peak RSS.
fn report(records: &[Record]) -> String {
    let mut by_kind: BTreeMap<Fault, Vec<&Record>> = BTreeMap::new();
    for r in records {
        by_kind.entry(r.fault).or_default().push(r);
    }
    let stat = |mut v: Vec<Option<Duration>>| -> String {
        let never = v.iter().filter(|d| d.is_none()).count();
        let mut d: Vec<Duration> = v.drain(..).flatten().collect();
        d.sort();
        if d.is_empty() {
            return "never".into();
        }
        let s = format!(
            "{:.2}/{:.2}s",
            d[d.len() / 2].as_secs_f64(),
            d[d.len() - 1].as_secs_f64()
        );
        if never > 0 {
            format!("{s} ({never} never)")
        } else {
            s
        }
    };
    let mut out = String::from(
        "=== chaos report ===\n\
         | fault | n | bytes lost | reconnect p50/max | caught up p50/max | peak RSS | first WARN/ERROR walsafe logged |\n\
         | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for (kind, rs) in by_kind {
        let first = rs
            .iter()
            .find_map(|r| r.first_log.clone())
            .unwrap_or_else(|| "(none)".into());
        out += &format!(
            "| {} | {} | {} | {} | {} | {} MiB | {} |\n",
            kind.label(),
            rs.len(),
            rs.iter().map(|r| r.lost_bytes).sum::<u64>(),
            stat(rs.iter().map(|r| r.reconnect).collect()),
            stat(rs.iter().map(|r| r.caught_up).collect()),
            rs.iter().map(|r| r.peak_rss_kb).max().unwrap_or(0) / 1024,
            first.replace('|', "/"),
        );
    }
    out
}

#[test]
fn chaos_loses_no_commit_and_matches_pg_receivewal() {
    let started = Instant::now();
    let seed = env_u64("WALSAFE_CHAOS_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    let chaos_secs = env_u64("WALSAFE_CHAOS_SECS").unwrap_or(30);
    let long_outage = Duration::from_secs(env_u64("WALSAFE_CHAOS_LONG_OUTAGE_SECS").unwrap_or(0));
    println!(
        "chaos: seed {seed} (replay with WALSAFE_CHAOS_SEED={seed}), {chaos_secs} s of faults, long outage {long_outage:?}"
    );

    // The primary, with a standby; reconnecting standbys retry quickly.
    let a = PgCluster::start(
        &PgOptions {
            name: "chaos-a".into(),
            ..Default::default()
        }
        .conf("wal_retrieve_retry_interval = '500ms'")
        .conf("max_wal_size = '256MB'"),
    );
    a.psql("CREATE TABLE chaos_rows (id bigint PRIMARY KEY)");
    a.psql("CREATE TABLE chaos_filler (pad text)");
    a.psql("SELECT pg_create_physical_replication_slot('recv', true)");
    let b = a.create_standby();
    for slot in ["walsafe", "recv"] {
        b.psql(&format!(
            "SELECT pg_create_physical_replication_slot('{slot}', true)"
        ));
    }

    let s3 = S3Server::start();
    let front = TcpFront::start(s3.port());
    let dir = TestDir::new("chaos");
    let hosts = format!(
        "host={},{} port={},{} user=postgres target_session_attrs=read-write",
        a.socket_dir().display(),
        b.socket_dir().display(),
        a.port(),
        b.port()
    );
    let conninfo = |extra: &str| format!("{hosts} {extra}");
    let mut settings = Settings::new(dir.path(), &conninfo(""));
    let prefix = "chaos";
    settings.repo_url = s3.url(prefix);
    settings.repo_options = s3.repo_options_at(&front.endpoint()).into_iter().collect();
    settings.key_file = Some(keygen(dir.path(), "repo.key"));
    settings.connect_timeout = "5s".into();
    let config = settings.write(&dir.join("walsafe.toml"));
    let agent = Agent::start(&config, settings.metrics_port);
    let backup = dir.join("base");
    a.base_backup(&backup, "none");

    let recv_dir = dir.subdir("receivewal");
    let rss_pid = Arc::new(AtomicU32::new(agent.pid()));
    let rss_peak = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (pid, peak, stop) = (rss_pid.clone(), rss_peak.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut overall = 0;
            while !stop.load(Ordering::SeqCst) {
                if let Some(kb) = vm_rss_kb(pid.load(Ordering::SeqCst)) {
                    peak.fetch_max(kb, Ordering::SeqCst);
                    overall = overall.max(kb);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            overall
        })
    };
    let mut chaos = Chaos {
        rng: StdRng::seed_from_u64(seed),
        dir,
        nodes: [a, b],
        primary: 0,
        standby_ready: false,
        s3,
        front,
        settings,
        config,
        agent,
        rss_pid,
        rss_peak,
        recv: None,
        recv_dir,
        recv_starts: 0,
        recv_ended: None,
        records: Vec::new(),
        failovers: 0,
    };
    chaos.set_sync_names(SYNC_BOTH);
    chaos.wait_standby_sync();
    chaos.keep_receiving();
    // pg_receivewal catches up before the faults begin.
    let lsn = chaos.primary().psql("SELECT pg_current_wal_flush_lsn()");
    chaos.primary().wait_for(
        &format!(
            "SELECT count(*) FROM pg_stat_replication WHERE application_name = 'pg_receivewal' AND flush_lsn >= '{lsn}'"
        ),
        "1",
        Duration::from_secs(60),
    );

    let committed = Arc::new(Mutex::new(Vec::new()));
    let uncertain = Arc::new(AtomicU64::new(0));
    let load_conninfo = conninfo("dbname=postgres connect_timeout=2");
    let rows = spawn_rows(
        load_conninfo.clone(),
        stop.clone(),
        committed.clone(),
        uncertain.clone(),
    );
    let filler = spawn_filler(load_conninfo, stop.clone());

    // Faults in rounds: every kind once per round in a random order (so a
    // short run meets each), until the time is up; a started round ends.
    let chaos_started = Instant::now();
    let max_failovers = (chaos_secs / 15).max(1) as u32;
    let mut long_outage_done = long_outage.is_zero();
    let kinds = [
        Fault::AgentKill,
        Fault::AgentStopCont,
        Fault::StorageDownUp,
        Fault::PgRestart,
        Fault::Failover,
    ];
    'rounds: while chaos_started.elapsed() < Duration::from_secs(chaos_secs) {
        let mut round = kinds.to_vec();
        round.shuffle(&mut chaos.rng);
        for fault in round {
            if !long_outage_done && chaos_started.elapsed() >= Duration::from_secs(chaos_secs) / 2 {
                chaos.run(Fault::StorageLongOutage, long_outage);
                long_outage_done = true;
            }
            if fault == Fault::Failover && chaos.failovers >= max_failovers {
                continue;
            }
            chaos.run(fault, long_outage);
            let pause = Duration::from_millis(chaos.rng.gen_range(200..1500));
            chaos.idle(pause);
            if chaos.records.len() > 10_000 {
                break 'rounds;
            }
        }
    }
    if !long_outage_done {
        chaos.run(Fault::StorageLongOutage, long_outage);
    }
    let chaos_time = chaos_started.elapsed();

    // Calm: the load stops, the last segment is switched, all catches up.
    stop.store(true, Ordering::SeqCst);
    rows.join().unwrap();
    filler.join().unwrap();
    let overall_peak_kb = sampler.join().unwrap();
    chaos.check_agent_alive();
    chaos.primary().psql("SELECT pg_switch_wal()");
    let end = chaos.server_lsn();
    let agent_ok = common::walsafe::wait_until(Duration::from_secs(120), || {
        chaos.agent.gauge("walsafe_archived_lsn_bytes") as u64 >= end
    });
    assert!(
        agent_ok,
        "walsafe did not catch up with {} after the chaos (archived {:X}); log tail:\n{}",
        lsn_text(end),
        chaos.agent.gauge("walsafe_archived_lsn_bytes") as u64,
        tail(&chaos.agent.log(), 80)
    );
    chaos.check_agent_alive();
    // pg_receivewal completes the segment before the current one.
    let tli = timeline(chaos.primary());
    let seg = chaos.primary().segment_size();
    let last_full = common::setup::segment_name(tli, end / seg - 1);
    let recv_done = {
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            chaos.keep_receiving();
            if chaos.recv_dir.join(&last_full).exists() || Instant::now() > until {
                break chaos.recv_dir.join(&last_full).exists();
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    if let Some(mut c) = chaos.recv.take() {
        let _ = c.kill();
        let _ = c.wait();
    }

    let committed = committed.lock().unwrap().clone();
    let report_text = report(&chaos.records);
    println!("{report_text}");
    println!(
        "chaos: seed {seed}; {:.0} s of faults, {} faults, {} failovers; {} commits returned, {} uncertain; \
         agent peak RSS overall {} MiB; pg_receivewal started {} times",
        chaos_time.as_secs_f64(),
        chaos.records.len(),
        chaos.failovers,
        committed.len(),
        uncertain.load(Ordering::SeqCst),
        overall_peak_kb / 1024,
        chaos.recv_starts
    );

    // No gap: nothing in this scenario loses WAL (the slots keep it, the
    // standby holds copies of them), so a recorded gap is a bug.
    let (lost, gap_lines) = recorded_gaps(&chaos.settings.spool);
    assert!(
        gap_lines.is_empty(),
        "seed {seed}: walsafe recorded gaps ({lost} bytes) although no WAL was lost:\n{}\nlog tail:\n{}",
        gap_lines.join("\n"),
        tail(&chaos.agent.log(), 80)
    );
    let verify = walsafe(&chaos.config, &["wal-verify"]);
    assert_eq!(
        verify.status.code(),
        Some(0),
        "seed {seed}: wal-verify:\n{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );

    // Byte-exact against pg_receivewal, segment by segment.
    assert!(
        recv_done,
        "seed {seed}: pg_receivewal never completed {last_full}; its last log:\n{}\nits directory: {:?}",
        chaos.receivewal_log_tail(),
        {
            let mut names: Vec<String> = std::fs::read_dir(&chaos.recv_dir)
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        }
    );
    let ours = stored_segments(chaos.front.port(), prefix);
    // pg_receivewal's complete segments, also those moved aside.
    let theirs: BTreeMap<String, PathBuf> = std::fs::read_dir(&chaos.recv_dir)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let file = e.file_name().to_string_lossy().into_owned();
            let name = file.strip_suffix(".aside").unwrap_or(&file).to_string();
            complete([name.clone()]).pop().map(|n| (n, e.path()))
        })
        .collect();
    let work = chaos.dir.subdir("work");
    let (mut compared, mut skipped, mut differ) = (0, Vec::new(), Vec::new());
    for name in &ours {
        let Some(their_path) = theirs.get(name) else {
            skipped.push(name.clone());
            continue;
        };
        let dest = work.join(name);
        let out = walsafe(&chaos.config, &["wal-fetch", name, dest.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "seed {seed}: wal-fetch {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if std::fs::read(&dest).unwrap() != std::fs::read(their_path).unwrap() {
            differ.push(name.clone());
        }
        std::fs::remove_file(&dest).unwrap();
        compared += 1;
    }
    println!(
        "chaos: {} complete segments stored, {compared} compared with pg_receivewal's, {} skipped (pg_receivewal lacks them: {:?})",
        ours.len(),
        skipped.len(),
        skipped
    );
    assert!(
        differ.is_empty(),
        "seed {seed}: segments differ from pg_receivewal's: {differ:?}"
    );
    assert!(
        compared * 4 >= ours.len() * 3 && compared > 0,
        "seed {seed}: too little overlap with pg_receivewal: {compared} of {} compared",
        ours.len()
    );

    // The restore through every timeline holds every commit that returned.
    // (A soak replays GBs of WAL: more time than restore_promoted's.)
    let restored = restore(
        &backup,
        chaos.dir.path(),
        &chaos.config,
        &["recovery_target_timeline = 'latest'"],
    );
    let outcome = restored.wait_recovery_end(Duration::from_secs(120 + chaos_secs * 2));
    assert_eq!(
        outcome,
        RecoveryOutcome::Promoted,
        "seed {seed}: restore after the chaos:\n{}",
        restored.log_tail()
    );
    let present: HashSet<i64> = restored
        .psql("SELECT id FROM chaos_rows")
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect();
    let missing: Vec<i64> = committed
        .iter()
        .copied()
        .filter(|id| !present.contains(id))
        .collect();
    assert!(
        missing.is_empty(),
        "seed {seed}: {} of {} rows whose commit returned are not in the restore (first: {:?})",
        missing.len(),
        committed.len(),
        &missing[..missing.len().min(20)]
    );
    assert!(!committed.is_empty(), "the load committed nothing");
    println!(
        "chaos: restore holds all {} committed rows; the test took {:.0} s",
        committed.len(),
        started.elapsed().as_secs_f64()
    );
    drop(restored);
    let _ = &chaos.s3;
}
