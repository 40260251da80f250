//! End-to-end benchmark against a real PostgreSQL: walsafe archiving to a
//! `file://` repository with `pg_receivewal` (the reference) streaming the
//! same server beside it, in the same run.
//!
//! `cargo bench --bench e2e` (release build). Scenarios:
//!
//! 1. **max rate**: PostgreSQL writes WAL as fast as two sessions can;
//!    report the server's WAL MB/s, how far behind each receiver is when
//!    the load stops and how long it takes to catch up, CPU seconds per GB
//!    and peak RSS of each process.
//! 2. **backlog**: both slots hold `BACKLOG_MB` of WAL before the receivers
//!    start; time to drain it, CPU per GB and peak RSS (walsafe's must stay
//!    small whatever the backlog).
//! 3. **RPO**: a steady single-row commit load; for each commit, the time
//!    from the commit's return until its WAL is stored in the repository
//!    (polled on disk every 2 ms): p50 / p99 / max.
//!
//! Figures are printed as absolute values and as walsafe / pg_receivewal
//! ratios, since these machines are noisy.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use common::pg::{PgCluster, PgOptions, TestDir};
use common::setup::parse_lsn;
use common::walsafe::{Agent, Settings};

const LOAD_SECONDS: u64 = 20;
const BACKLOG_MB: u64 = 512;
const RPO_COMMITS: usize = 300;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// (user+system CPU seconds, peak RSS in MiB) of a live process.
fn usage(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu = if fields.len() > 13 {
        (fields[11].parse::<f64>().unwrap_or(0.0) + fields[12].parse::<f64>().unwrap_or(0.0))
            / ticks
    } else {
        0.0
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    (cpu, hwm_kb / 1024.0)
}

fn receivewal_flush(pg: &PgCluster) -> u64 {
    let t = pg.psql("SELECT coalesce(flush_lsn, '0/0') FROM pg_stat_replication WHERE application_name = 'pg_receivewal'");
    if t.is_empty() {
        0
    } else {
        parse_lsn(&t)
    }
}

struct Pair {
    _dir: TestDir,
    pg: PgCluster,
    agent: Agent,
    recv: Child,
    repo: std::path::PathBuf,
}

fn start_pair(name: &str) -> (TestDir, PgCluster, Settings, std::path::PathBuf) {
    let pg = PgCluster::start(
        &PgOptions {
            name: name.into(),
            fsync: true,
            ..Default::default()
        }
        .conf("max_wal_size = '4GB'")
        .conf("checkpoint_timeout = '30min'")
        .conf("wal_compression = off"),
    );
    pg.psql("SELECT pg_create_physical_replication_slot('recv', true)");
    let dir = TestDir::new(name);
    let settings = Settings::new(dir.path(), &pg.conninfo());
    let config = settings.write(&dir.join("walsafe.toml"));
    (dir, pg, settings, config)
}

fn spawn_load(pg: &PgCluster, sessions: usize, seconds: u64) -> Vec<std::thread::JoinHandle<()>> {
    pg.psql("CREATE TABLE IF NOT EXISTS load (id bigserial, pad text)");
    (0..sessions)
        .map(|_| {
            let sock = pg.socket_dir().to_path_buf();
            let port = pg.port();
            std::thread::spawn(move || {
                let until = Instant::now() + Duration::from_secs(seconds);
                while Instant::now() < until {
                    let o = common::pg::as_postgres(&mut common::pg::pg_command("psql"))
                        .args(["-XAtq", "-h"])
                        .arg(&sock)
                        .args(["-p", &port.to_string(), "-U", "postgres", "-d", "postgres", "-c"])
                        .arg("INSERT INTO load (pad) SELECT repeat(md5(g::text), 4) FROM generate_series(1, 50000) g")
                        .output()
                        .unwrap();
                    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
                }
            })
        })
        .collect()
}

fn report_usage(label: &str, bytes: u64, agent_pid: u32, recv_pid: u32) {
    let (w_cpu, w_rss) = usage(agent_pid);
    let (r_cpu, r_rss) = usage(recv_pid);
    let gb = bytes as f64 / 1e9;
    println!(
        "{label}: CPU s/GB walsafe {:.2}, pg_receivewal {:.2} (ratio {:.2}); peak RSS walsafe {:.1} MiB, pg_receivewal {:.1} MiB (ratio {:.2})",
        w_cpu / gb,
        r_cpu / gb,
        (w_cpu / gb) / (r_cpu / gb).max(1e-9),
        w_rss,
        r_rss,
        w_rss / r_rss.max(1e-9)
    );
}

fn wait_both(pair: &Pair, end: u64, started: Instant) -> (f64, f64) {
    let mut walsafe_done = None;
    let mut recv_done = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    while (walsafe_done.is_none() || recv_done.is_none()) && Instant::now() < deadline {
        if walsafe_done.is_none() && pair.agent.gauge("walsafe_archived_lsn_bytes") as u64 >= end {
            walsafe_done = Some(started.elapsed().as_secs_f64());
        }
        if recv_done.is_none() && receivewal_flush(&pair.pg) >= end {
            recv_done = Some(started.elapsed().as_secs_f64());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    (
        walsafe_done.expect("walsafe did not catch up within 600 s"),
        recv_done.expect("pg_receivewal did not catch up within 600 s"),
    )
}

fn max_rate() {
    println!(
        "\n== scenario 1: PostgreSQL writing WAL as fast as it can ({LOAD_SECONDS} s, 2 sessions)"
    );
    let (dir, pg, settings, config) = start_pair("bench-rate");
    let pair = Pair::start(dir, pg, &settings, &config, true);
    let start = parse_lsn(&pair.pg.psql("SELECT pg_current_wal_lsn()"));
    let seconds = env_u64("WALSAFE_BENCH_SECONDS", LOAD_SECONDS);
    let t0 = Instant::now();
    for h in spawn_load(&pair.pg, 2, seconds) {
        h.join().unwrap();
    }
    let load_time = t0.elapsed().as_secs_f64();
    let end = parse_lsn(&pair.pg.psql("SELECT pg_current_wal_lsn()"));
    let behind_w = end.saturating_sub(pair.agent.gauge("walsafe_archived_lsn_bytes") as u64);
    let behind_r = end.saturating_sub(receivewal_flush(&pair.pg));
    let stop = Instant::now();
    let (w, r) = wait_both(&pair, end, stop);
    let bytes = end - start;
    println!(
        "server WAL: {:.0} MiB in {:.1} s = {:.1} MiB/s",
        bytes as f64 / 1048576.0,
        load_time,
        bytes as f64 / 1048576.0 / load_time
    );
    println!(
        "at load end, behind the server: walsafe (archived in the repository) {:.1} MiB, pg_receivewal (flushed locally) {:.1} MiB",
        behind_w as f64 / 1048576.0,
        behind_r as f64 / 1048576.0
    );
    println!("caught up after the load stopped: walsafe {w:.2} s (stored in the repository), pg_receivewal {r:.2} s (flushed locally)");
    report_usage("max rate", bytes, pair.agent_pid(), pair.recv.id());
    println!(
        "repository size: {:.0} MiB",
        dir_size(&pair.repo) as f64 / 1048576.0
    );
}

fn backlog() {
    let mb = env_u64("WALSAFE_BENCH_BACKLOG_MB", BACKLOG_MB);
    println!("\n== scenario 2: a backlog of {mb} MiB in the slots before the receivers start");
    let (dir, pg, settings, config) = start_pair("bench-backlog");
    pg.psql("SELECT pg_create_physical_replication_slot('walsafe', true)");
    pg.psql("CREATE TABLE load (id bigserial, pad text)");
    let start = parse_lsn(&pg.psql("SELECT pg_current_wal_lsn()"));
    while parse_lsn(&pg.psql("SELECT pg_current_wal_lsn()")) - start < mb << 20 {
        pg.psql("INSERT INTO load (pad) SELECT repeat(md5(g::text), 4) FROM generate_series(1, 100000) g");
    }
    let end = parse_lsn(&pg.psql("SELECT pg_current_wal_lsn()"));
    let t0 = Instant::now();
    let pair = Pair::start(dir, pg, &settings, &config, false);
    let (w, r) = wait_both(&pair, end, t0);
    let bytes = end - start;
    let mib = bytes as f64 / 1048576.0;
    println!(
        "drained {mib:.0} MiB: walsafe {w:.2} s ({:.0} MiB/s, into the repository), pg_receivewal {r:.2} s ({:.0} MiB/s, local disk); time ratio {:.2}",
        mib / w,
        mib / r,
        w / r
    );
    report_usage("backlog", bytes, pair.agent_pid(), pair.recv.id());
}

fn rpo() {
    let n = env_u64("WALSAFE_BENCH_COMMITS", RPO_COMMITS as u64) as usize;
    println!("\n== scenario 3: RPO under a steady single-row commit load ({n} commits, 10-250 ms apart, partial_interval 200ms)");
    let (dir, pg, settings, config) = start_pair("bench-rpo");
    let agent = Agent::start(&config, settings.metrics_port);
    let repo: std::path::PathBuf = settings.repo_url.trim_start_matches("file://").into();
    let seg = pg.segment_size();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let samples = rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(
            &format!(
                "host={} port={} user=postgres dbname=postgres",
                pg.socket_dir().display(),
                pg.port()
            ),
            tokio_postgres::NoTls,
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        client
            .batch_execute("CREATE TABLE rpo (id int, at timestamptz default now())")
            .await
            .unwrap();
        let mut samples = Vec::with_capacity(n);
        for i in 0..n {
            client
                .execute("INSERT INTO rpo (id) VALUES ($1)", &[&(i as i32)])
                .await
                .unwrap();
            let committed = Instant::now();
            let row = client
                .query_one("SELECT pg_current_wal_lsn()::text", &[])
                .await
                .unwrap();
            let at = parse_lsn(row.get::<_, &str>(0));
            while !stored(&repo, at, seg) {
                tokio::time::sleep(Duration::from_millis(2)).await;
                assert!(
                    committed.elapsed() < Duration::from_secs(30),
                    "commit {i} not stored after 30 s"
                );
            }
            samples.push(committed.elapsed().as_secs_f64() * 1000.0);
            // A pseudo-random gap (10-250 ms), so that commits do not lock
            // onto the phase of the chunk interval.
            tokio::time::sleep(Duration::from_millis(10 + (i as u64 * 7919) % 241)).await;
        }
        samples
    });
    let mut s = samples.clone();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| s[((s.len() as f64 * p) as usize).min(s.len() - 1)];
    println!(
        "commit -> stored in the repository: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        pct(0.50),
        pct(0.99),
        s[s.len() - 1]
    );
    let (cpu, rss) = usage(agent.pid());
    println!("walsafe during the RPO run: {cpu:.2} CPU s, peak RSS {rss:.1} MiB");
    drop(dir);
}

/// Is WAL up to `lsn` (exclusive end) stored in the file:// repository?
fn stored(repo: &Path, lsn: u64, seg: u64) -> bool {
    let segno = (lsn - 1) / seg;
    let name = format!(
        "{:08X}{:08X}{:08X}",
        1,
        segno / (0x1_0000_0000 / seg),
        segno % (0x1_0000_0000 / seg)
    );
    if repo.join("wal").join(&name).exists() {
        return true;
    }
    let need = lsn - segno * seg;
    std::fs::read_dir(repo.join("chunks").join(&name))
        .map(|d| {
            d.flatten().any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .split_once('-')
                    .and_then(|(_, end)| u64::from_str_radix(end, 16).ok())
                    .is_some_and(|end| end >= need)
            })
        })
        .unwrap_or(false)
}

fn dir_size(p: &Path) -> u64 {
    let mut total = 0;
    if let Ok(d) = std::fs::read_dir(p) {
        for e in d.flatten() {
            let m = e.metadata().unwrap();
            total += if m.is_dir() {
                dir_size(&e.path())
            } else {
                m.len()
            };
        }
    }
    total
}

impl Pair {
    /// Starts pg_receivewal (slot `recv`) and walsafe side by side;
    /// `wait` waits until walsafe streams.
    fn start(dir: TestDir, pg: PgCluster, settings: &Settings, config: &Path, wait: bool) -> Pair {
        let recv_dir = dir.subdir("receivewal");
        let recv = pg.spawn_pg_receivewal(&recv_dir, Some("recv"));
        let agent = if wait {
            Agent::start(config, settings.metrics_port)
        } else {
            Agent::spawn(config, settings.metrics_port)
        };
        let repo = settings.repo_url.trim_start_matches("file://").into();
        Pair {
            _dir: dir,
            pg,
            agent,
            recv,
            repo,
        }
    }

    fn agent_pid(&self) -> u32 {
        self.agent.pid()
    }
}

fn main() {
    // `cargo bench` passes --bench; a filter may name scenarios.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let want = |s: &str| args.is_empty() || args.iter().any(|a| s.contains(a.as_str()));
    if want("rate") {
        max_rate();
    }
    if want("backlog") {
        backlog();
    }
    if want("rpo") {
        rpo();
    }
}
