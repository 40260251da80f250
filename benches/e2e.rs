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
//! 4. **commit latency**: walsafe as the synchronous standby
//!    (`synchronous_standby_names` = its application_name), N single-row
//!    commits on one session: ack `remote` into `file://`, ack `remote` into
//!    S3 (moto on loopback), ack `local`, and `pg_receivewal --synchronous`
//!    (its own slot) as the reference. Prints p50 / p99 of commit latency,
//!    the store's PUT p50 (small chunk puts through walsafe's own
//!    repository code, timed in the same run) and the ratios.
//!
//! 5. **base backup**: a cluster of `WALSAFE_BENCH_BACKUP_SCALE` pgbench
//!    scale (default 130, about 2 GB); `walsafe backup` (encrypted, into
//!    `file://`, the agent archiving beside it) against `pg_basebackup -Ft
//!    --compress=zstd` and `-Ft -z` writing to local disk, in the same run:
//!    throughput, CPU seconds per GB and peak RSS (VmHWM, from wait4) of
//!    each client process.
//!
//! 6. **restore**: the same kind of cluster (`WALSAFE_BENCH_RESTORE_SCALE`,
//!    default 130); time to a running server. `walsafe restore --target
//!    immediate --target-action promote --start` from an encrypted
//!    `file://` repository, against extracting `pg_basebackup -Ft
//!    --compress=zstd -X fetch`'s archive (its WAL inside) with `tar -I
//!    zstd` and starting
//!    the server (`pg_ctl -w start`), in the same run; then walsafe from S3
//!    (moto on loopback). Wall time, CPU seconds per GB and peak RSS of the
//!    client process (walsafe; tar with its zstd children).
//!
//! 7. **replay**: about `WALSAFE_BENCH_REPLAY_MB` (default 900) of WAL
//!    from two INSERT sessions, archived by walsafe (zstd, a key,
//!    `file://`) and by `pg_receivewal` beside it; then a base backup taken
//!    before the load is recovered to the end of the archive, alternately
//!    with `restore_command = walsafe wal-fetch` and with `cp` from
//!    `pg_receivewal`'s directory (`WALSAFE_BENCH_REPLAY_ROUNDS`, default
//!    3, rounds each, cold prefetch cache, best of each kept); from S3
//!    (moto, a second agent), walsafe against one plain GET per segment
//!    into place (`curl`, of `pg_receivewal`'s segments stored as plain
//!    objects); and, when `WALSAFE_BENCH_WALRUS` names a built `walrus`
//!    binary (ClickHouse/wal-rus), its `wal-fetch` of the same segments
//!    `wal-push`ed into a `file://` store with zstd 1: replay MB/s and the
//!    ratios.
//!
//! 8. **ingest**: what walsafe costs the database host, as the operator
//!    runs it: a key (AES-256-GCM), zstd level 1, the default
//!    `partial_interval`, against `pg_receivewal --synchronous` on the same
//!    server. Two INSERT sessions for `WALSAFE_BENCH_INGEST_SECONDS`
//!    (default 10, about 1 GB here), once per ack mode (`local`, `remote`)
//!    and store (`file://`, S3 on moto): CPU seconds per GB, peak RSS
//!    (VmHWM from /proc) and the catch-up after the load stops, each beside
//!    pg_receivewal's, then a table of the ratios; beside them, the CPU
//!    per GB of the envelope alone (zstd 1 and AES-GCM on pg_receivewal's
//!    copy of the same WAL, in the bench process): the floor of walsafe's
//!    cost above pg_receivewal's.
//!    `WALSAFE_BENCH_INGEST_ONLY=remote,file` runs one of the four.
//!
//! 9. **outage**: the ingest load of scenario 8 (ack `local`, a key, S3 on
//!    moto behind a TCP front) for `WALSAFE_BENCH_OUTAGE_SECONDS` (default
//!    40); from the 5th second S3 hangs (moto stopped with SIGSTOP) for a
//!    third of that, then is down (the front refuses connections) for
//!    another third, then comes back. Peak RSS (VmHWM) and CPU of walsafe
//!    beside pg_receivewal's, the spool's peak, and how long the archive
//!    took to catch up once S3 was back.
//!
//! 10. **cost**: storage requests and bytes per hour into S3 (moto), from
//!     `walsafe_storage_requests_total` and `_bytes_total`, for an idle
//!     cluster, one small commit a second and bulk INSERTs, each for
//!     `WALSAFE_BENCH_COST_SECONDS` (default 45), at `partial_interval`
//!     200 ms and 1 s, with the WAL PostgreSQL wrote meanwhile.
//!
//! 11. **repositories**: two repositories, `file://` and S3 (moto behind
//!     a TCP front), under a steady load (one session, about 5 MB/s of
//!     WAL) for `WALSAFE_BENCH_REPOS_SECONDS` (default 180); S3 is down
//!     from the 10th second for `WALSAFE_BENCH_REPOS_DOWN_SECONDS`
//!     (default 120). Sampled every 100 ms: each repository's lag (p50,
//!     max), the spool's peak; then how long S3 took, once back, to reach
//!     what the server had written when it came back, the load going on.
//!
//! 12. **rotation**: key rotation of a real `file://` repository: a
//!     pgbench cluster of `WALSAFE_BENCH_ROTATE_SCALE` (default 30), its
//!     WAL and a base backup under key A, the agent running. Beside `cp -a`
//!     of the repository (the reference: reading and writing every byte
//!     once), `walsafe key-rotate --rewrite --apply` to key B: wall, CPU and
//!     peak RSS, objects and bytes; then `--retire A` and a restore with B
//!     alone to the end of the archive, its rows counted.
//!
//! Scenarios are chosen by the arguments (`cargo bench --bench e2e --
//! commit`) or `WALSAFE_BENCH=commit`; none runs all.
//!
//! Figures are printed as absolute values and as walsafe / pg_receivewal
//! ratios, since these machines are noisy.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use common::pg::{PgCluster, PgOptions, TestDir};
use common::s3::S3Server;
use common::setup::parse_lsn;
use common::walsafe::{counter_sum, Agent, Settings};

const LOAD_SECONDS: u64 = 20;
const BACKLOG_MB: u64 = 512;
const RPO_COMMITS: usize = 300;
const LATENCY_COMMITS: u64 = 300;
/// Small puts timed per store for its PUT p50.
const PUT_PROBES: usize = 60;

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
        let client = sql_client(&pg).await;
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

/// Who the synchronous standby is in one run of scenario 4.
#[derive(Clone, Copy, PartialEq)]
enum Standby {
    RemoteFile,
    RemoteS3,
    Local,
    Receivewal,
}

impl Standby {
    fn label(self) -> &'static str {
        match self {
            Standby::RemoteFile => "walsafe ack remote, file://",
            Standby::RemoteS3 => "walsafe ack remote, S3 (moto)",
            Standby::Local => "walsafe ack local",
            Standby::Receivewal => "pg_receivewal --synchronous",
        }
    }
}

struct Latency {
    p50: f64,
    p99: f64,
    /// The store's PUT p50 (ms), for the walsafe runs.
    put_p50: Option<f64>,
    /// Chunk objects walsafe stored during the commits.
    chunks: Option<f64>,
    commits: usize,
}

/// Percentile `p` (0..1) of `v` (sorted in place).
fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

/// p50 (ms) of `PUT_PROBES` small chunk puts through walsafe's repository
/// code (envelope, create-only put, fsync for `file://`), into `url`.
async fn put_p50(url: &str, options: &std::collections::BTreeMap<String, String>) -> f64 {
    use walsafe::pg::{SegmentName, TimelineId};
    use walsafe::repository::{object::SegmentFile, store::Store, Compression, Repository};
    let store = Store::open(url, options, 3)
        .unwrap()
        .with_fsync(walsafe::durable::Fsync::On);
    let repo = Repository::from_parts(store, None, Compression::Zstd, 1);
    let seg = SegmentFile::of(
        SegmentName {
            timeline: TimelineId(1),
            segno: 1,
        },
        16 << 20,
    );
    let mut times = Vec::with_capacity(PUT_PROBES);
    for i in 0..PUT_PROBES {
        // About what one single-row commit adds to the WAL.
        let data = bytes::Bytes::from(vec![(i % 251) as u8; 256]);
        let t = Instant::now();
        repo.put_chunk(&seg, i as u64 * 256, data).await.unwrap();
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    percentile(&mut times, 0.5)
}

/// Chunk uploads walsafe has stored so far.
fn chunks_stored(agent: &Agent) -> f64 {
    counter_sum(
        &agent.metrics(),
        "walsafe_uploads_total",
        "kind=\"chunk\",result=\"ok\"",
    )
}

fn commit_latency_run(who: Standby, n: u64, s3: &S3Server) -> Latency {
    let name = match who {
        Standby::RemoteFile => "bench-sync-rfile",
        Standby::RemoteS3 => "bench-sync-rs3",
        Standby::Local => "bench-sync-local",
        Standby::Receivewal => "bench-sync-recv",
    };
    let app = if who == Standby::Receivewal {
        "pg_receivewal"
    } else {
        "walsafe"
    };
    let pg = PgCluster::start(
        &PgOptions {
            name: name.into(),
            fsync: true,
            ..Default::default()
        }
        .conf(format!("synchronous_standby_names = '{app}'"))
        .conf("synchronous_commit = on"),
    );
    let dir = TestDir::new(name);
    let mut settings = Settings::new(dir.path(), &pg.conninfo());
    settings.prefetch = 0;
    let mut probe_url = format!("file://{}", dir.subdir("put-probe").display());
    let mut probe_options = std::collections::BTreeMap::new();
    match who {
        Standby::RemoteFile => settings.ack = "remote".into(),
        Standby::RemoteS3 => {
            settings.ack = "remote".into();
            settings.repo_url = s3.url(&format!("{name}-{}", std::process::id()));
            settings.repo_options = s3.repo_options().into_iter().collect();
            probe_url = s3.url(&format!("{name}-probe-{}", std::process::id()));
            probe_options = s3.repo_options();
        }
        Standby::Local | Standby::Receivewal => {}
    }
    let mut agent = None;
    let mut recv = None;
    if who == Standby::Receivewal {
        pg.psql("SELECT pg_create_physical_replication_slot('recv', true)");
        recv = Some(pg.spawn_pg_receivewal_opts(&dir.subdir("receivewal"), Some("recv"), true));
    } else {
        let config = settings.write(&dir.join("walsafe.toml"));
        agent = Some(Agent::start(&config, settings.metrics_port));
    }
    pg.wait_for(
        &format!("SELECT sync_state FROM pg_stat_replication WHERE application_name = '{app}'"),
        "sync",
        Duration::from_secs(60),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (mut samples, chunks) = rt.block_on(async {
        let client = sql_client(&pg).await;
        client
            .batch_execute("CREATE TABLE c (id int)")
            .await
            .unwrap();
        let insert = client.prepare("INSERT INTO c VALUES ($1)").await.unwrap();
        for i in 0..20 {
            client.execute(&insert, &[&i]).await.unwrap();
        }
        let chunks_before = agent.as_ref().map(chunks_stored);
        let mut samples = Vec::with_capacity(n as usize);
        for i in 0..n {
            let t = Instant::now();
            client.execute(&insert, &[&(i as i32)]).await.unwrap();
            samples.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        let chunks = agent
            .as_ref()
            .zip(chunks_before)
            .map(|(a, b)| chunks_stored(a) - b);
        (samples, chunks)
    });
    let put_p50 = match who {
        Standby::Receivewal => None,
        _ => Some(rt.block_on(put_p50(&probe_url, &probe_options))),
    };
    if let Some(mut r) = recv {
        let _ = r.kill();
        let _ = r.wait();
    }
    drop(agent);
    let commits = samples.len();
    Latency {
        p50: percentile(&mut samples, 0.5),
        p99: percentile(&mut samples, 0.99),
        put_p50,
        chunks,
        commits,
    }
}

fn commit_latency() {
    let n = env_u64("WALSAFE_BENCH_COMMITS", LATENCY_COMMITS);
    println!("\n== scenario 4: commit latency as a synchronous standby ({n} single-row commits, one session, partial_interval 200ms)");
    let s3 = S3Server::start();
    let runs = [
        Standby::RemoteFile,
        Standby::RemoteS3,
        Standby::Local,
        Standby::Receivewal,
    ];
    let results: Vec<(Standby, Latency)> = runs
        .iter()
        .map(|w| (*w, commit_latency_run(*w, n, &s3)))
        .collect();
    let reference = results
        .iter()
        .find(|(w, _)| *w == Standby::Receivewal)
        .map(|(_, l)| (l.p50, l.p99))
        .unwrap();
    for (who, l) in &results {
        let mut line = format!(
            "{:<32} commit p50 {:7.2} ms, p99 {:7.2} ms ({:.0} commits/s/session)",
            who.label(),
            l.p50,
            l.p99,
            1000.0 / l.p50
        );
        if let Some(put) = l.put_p50 {
            line += &format!("; store PUT p50 {put:.2} ms");
            if matches!(who, Standby::RemoteFile | Standby::RemoteS3) {
                line += &format!(" (commit p50 - PUT p50 = {:+.2} ms)", l.p50 - put);
            }
        }
        if let Some(c) = l.chunks {
            line += &format!("; {c:.0} chunks for {} commits", l.commits);
        }
        if *who != Standby::Receivewal {
            line += &format!(
                "; vs pg_receivewal p50 x{:.2}, p99 x{:.2}",
                l.p50 / reference.0,
                l.p99 / reference.1
            );
        }
        println!("{line}");
    }
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
    // The agents log at the default level, as an operator runs them.
    if std::env::var_os("WALSAFE_TEST_LOG").is_none() {
        std::env::set_var("WALSAFE_TEST_LOG", "info");
    }
    // `cargo bench` passes --bench; a filter may name scenarios.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let args: Vec<String> = match std::env::var("WALSAFE_BENCH") {
        Ok(v) if args.is_empty() => v.split(',').map(str::to_string).collect(),
        _ => args,
    };
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
    if want("commit latency") {
        commit_latency();
    }
    if want("base backup") {
        base_backup();
    }
    if want("restore") {
        restore();
    }
    if want("replay") {
        replay();
    }
    if want("ingest") {
        ingest();
    }
    if want("repositories") {
        repositories();
    }
    if want("outage") {
        outage();
    }
    if want("cost") {
        cost();
    }
    if want("rotation") {
        rotation();
    }
}

/// Files under `dir`, recursively.
fn file_count(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| {
                    if e.path().is_dir() {
                        file_count(&e.path())
                    } else {
                        1
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

/// Scenario 12: key rotation of a real repository (see the module doc).
fn rotation() {
    let scale = env_u64("WALSAFE_BENCH_ROTATE_SCALE", 30);
    println!("\n== scenario 12: key rotation of a file:// repository (pgbench scale {scale}, its WAL and a base backup), the agent running");
    let (dir, pg, mut settings, _) = start_pair("bench-rotate");
    let ring = common::setup::keygen(dir.path(), "repo.key");
    settings.key_file = Some(ring.clone());
    let config = settings.write(&dir.join("walsafe.toml"));
    let agent = Agent::start(&config, settings.metrics_port);
    let (_, _) = pgbench_cluster(&pg, scale, &agent);
    let rows: u64 = pg
        .psql("SELECT count(*) FROM pgbench_accounts")
        .parse()
        .unwrap();
    let bin = common::walsafe::bin_copy(dir.path());
    let walsafe_cmd = |args: &[&str]| {
        let mut cmd = std::process::Command::new(&bin);
        common::pg::as_postgres(&mut cmd);
        cmd.arg("--config").arg(&config).args(args);
        cmd
    };
    measured(&mut walsafe_cmd(&["backup"]), "walsafe backup");
    pg.psql("SELECT pg_switch_wal()");
    agent.wait_archived(
        parse_lsn(&pg.psql("SELECT pg_current_wal_lsn()")),
        Duration::from_secs(600),
    );
    let repo = dir.join("repo");
    let (objects, bytes) = (file_count(&repo), dir_size(&repo));
    let gib = bytes as f64 / (1u64 << 30) as f64;
    println!(
        "repository: {objects} objects, {:.1} MiB",
        bytes as f64 / (1 << 20) as f64
    );

    let copy = dir.join("repo-copy");
    let mut cp = std::process::Command::new("cp");
    cp.arg("-a").arg(&repo).arg(&copy);
    let (cp_wall, cp_cpu, cp_rss) = measured(&mut cp, "cp -a");
    let _ = std::fs::remove_dir_all(&copy);

    let o = walsafe_cmd(&["keygen", ring.to_str().unwrap(), "--add"])
        .output()
        .unwrap();
    assert!(o.status.success(), "keygen --add");
    let old = common::setup::key_ids(&ring)[0].clone();
    let (wall, cpu, rss) = measured(
        &mut walsafe_cmd(&["key-rotate", "--rewrite", "--apply"]),
        "key-rotate --rewrite --apply",
    );
    measured(
        &mut walsafe_cmd(&["key-rotate", "--retire", &old, "--apply"]),
        "key-rotate --retire",
    );
    let left = common::setup::key_ids(&ring);
    assert_eq!(left.len(), 1, "the old key retired");
    println!(
        "{:<36} {:>8} {:>9} {:>10} {:>9}",
        "", "wall s", "MiB/s", "CPU s/GiB", "RSS MiB"
    );
    for (label, w, c, r) in [
        ("cp -a (reference)", cp_wall, cp_cpu, cp_rss),
        ("walsafe key-rotate --rewrite", wall, cpu, rss),
    ] {
        println!(
            "{label:<36} {w:>8.2} {:>9.1} {:>10.2} {r:>9.1}",
            bytes as f64 / (1 << 20) as f64 / w,
            c / gib
        );
    }
    println!(
        "ratios key-rotate / cp -a: wall {:.2}x, CPU {:.2}x",
        wall / cp_wall,
        cpu / cp_cpu.max(0.01)
    );
    drop(agent);

    // A restore with the new key alone, to the end of the archive.
    let data = dir.subdir("restored");
    let port = common::walsafe::free_port();
    let mut cmd = walsafe_cmd(&["restore"]);
    cmd.arg(&data)
        .args(["--target-action", "promote", "--start"])
        .args(["--port", &port.to_string(), "--pg-bindir"])
        .arg(pg.bins().program("pg_ctl").parent().unwrap());
    let (rwall, _, _) = measured(&mut cmd, "walsafe restore --start");
    let mut q = pg.bins().command("psql");
    q.args(["-XAtq", "-h"])
        .arg(pg.socket_dir())
        .args(["-p", &port.to_string(), "-U", "postgres", "-c"])
        .arg("SELECT count(*) FROM pgbench_accounts");
    let restored: u64 = String::from_utf8_lossy(&q.output().unwrap().stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    stop_server(&pg, &data);
    println!(
        "restore with the new key alone: {rwall:.1} s, pgbench_accounts {restored} rows of {rows}"
    );
    assert_eq!(restored, rows);
}

/// Scenario 10: what the archive costs in storage requests and bytes, per
/// hour, for an idle cluster, one small commit a second and a busy
/// cluster, at the default `partial_interval` and at 1 s, into S3 (moto).
fn cost() {
    let seconds = env_u64("WALSAFE_BENCH_COST_SECONDS", 45);
    println!("\n== scenario 10: storage requests and bytes per hour into S3, {seconds} s per load");
    let s3 = S3Server::start();
    println!("| partial_interval | load | WAL written in the window | WAL MB/hour | PUT/hour | GET/hour | LIST/hour | DELETE/hour | MB up/hour |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for interval in ["200ms", "1s"] {
        let pg = PgCluster::start(&PgOptions {
            name: "bench-cost".into(),
            ..Default::default()
        });
        let dir = TestDir::new("bench-cost");
        let mut settings = Settings::new(dir.path(), &pg.conninfo());
        settings.key_file = Some(common::setup::keygen(dir.path(), "repo.key"));
        settings.partial_interval = interval.into();
        settings.repo_url = s3.url(&format!("cost-{interval}"));
        settings.repo_options = s3.repo_options().into_iter().collect();
        let config = settings.write(&dir.join("walsafe.toml"));
        let agent = Agent::start(&config, settings.metrics_port);
        pg.psql("CREATE TABLE small (i int)");
        agent.wait_archived(
            parse_lsn(&pg.psql("SELECT pg_current_wal_lsn()")),
            Duration::from_secs(60),
        );
        for load in ["idle", "one small commit a second", "busy (bulk INSERTs)"] {
            std::thread::sleep(Duration::from_secs(2));
            let before = agent.metrics();
            let lsn0 = parse_lsn(&pg.psql("SELECT pg_current_wal_lsn()"));
            let t0 = Instant::now();
            match load {
                "idle" => std::thread::sleep(Duration::from_secs(seconds)),
                "busy (bulk INSERTs)" => {
                    for h in spawn_load(&pg, 1, seconds) {
                        h.join().unwrap();
                    }
                }
                _ => {
                    for i in 0..seconds {
                        pg.psql(&format!("INSERT INTO small VALUES ({i})"));
                        let next = Duration::from_secs(i + 1);
                        std::thread::sleep(next.saturating_sub(t0.elapsed()));
                    }
                }
            }
            let lsn1 = parse_lsn(&pg.psql("SELECT pg_current_wal_lsn()"));
            agent.wait_archived(lsn1, Duration::from_secs(120));
            let after = agent.metrics();
            let hour = 3600.0 / t0.elapsed().as_secs_f64();
            let delta = |name: &str, label: &str| {
                (counter_sum(&after, name, label) - counter_sum(&before, name, label)) * hour
            };
            let req = |op: &str| delta("walsafe_storage_requests_total", &format!("op=\"{op}\""));
            println!(
                "| {interval} | {load} | {} bytes | {:.1} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} |",
                lsn1 - lsn0,
                (lsn1 - lsn0) as f64 * hour / 1e6,
                req("put"),
                req("get"),
                req("list"),
                req("delete"),
                delta("walsafe_storage_bytes_total", "direction=\"up\"") / 1e6,
            );
        }
        drop(agent);
        drop(pg);
    }
}

fn outage() {
    let seconds = env_u64("WALSAFE_BENCH_OUTAGE_SECONDS", 40);
    let third = Duration::from_secs(seconds / 3);
    println!(
        "\n== scenario 9: {seconds} s of 2 INSERT sessions; S3 hangs from the 5th second for {third:?}, then is down for {third:?}"
    );
    let s3 = S3Server::start();
    let mut front = common::front::TcpFront::start(s3.port());
    let (dir, pg, mut settings, _) = start_pair("bench-outage");
    settings.key_file = Some(common::setup::keygen(dir.path(), "repo.key"));
    settings.partial_interval = format!(
        "{}ms",
        walsafe::config::DEFAULT_PARTIAL_INTERVAL.as_millis()
    );
    settings.repo_url = s3.url("outage");
    settings.repo_options = s3.repo_options_at(&front.endpoint()).into_iter().collect();
    let config = settings.write(&dir.join("walsafe.toml"));
    let pair = Pair::start(dir, pg, &settings, &config, true);
    let start = parse_lsn(&pair.pg.psql("SELECT pg_current_wal_lsn()"));
    let load = spawn_load(&pair.pg, 2, seconds);
    let signal = |sig: i32| {
        // SAFETY: a signal to our own child process.
        unsafe { libc::kill(s3.pid() as i32, sig) };
    };
    std::thread::sleep(Duration::from_secs(5));
    signal(libc::SIGSTOP);
    std::thread::sleep(third);
    signal(libc::SIGCONT);
    front.down();
    std::thread::sleep(third);
    front.up();
    let back = Instant::now();
    for h in load {
        h.join().unwrap();
    }
    let end = parse_lsn(&pair.pg.psql("SELECT pg_current_wal_lsn()"));
    pair.agent.wait_archived(end, Duration::from_secs(600));
    let caught_up = back.elapsed().as_secs_f64();
    let gb = (end - start) as f64 / 1e9;
    let (w_cpu, w_rss) = usage(pair.agent_pid());
    let (r_cpu, r_rss) = usage(pair.recv.id());
    println!(
        "{gb:.2} GB; archive caught up {caught_up:.1} s after S3 came back ({:.0} s of it under load)",
        seconds.saturating_sub(5 + 2 * third.as_secs())
    );
    println!(
        "outage: CPU s/GB walsafe {:.2}, pg_receivewal {:.2} ({:.2}x); VmHWM walsafe {w_rss:.1} MiB, pg_receivewal {r_rss:.1} MiB ({:.2}x)",
        w_cpu / gb,
        r_cpu / gb,
        (w_cpu / gb) / (r_cpu / gb).max(1e-9),
        w_rss / r_rss.max(1e-9)
    );
}

fn repositories() {
    let seconds = env_u64("WALSAFE_BENCH_REPOS_SECONDS", 180);
    let down_for = env_u64("WALSAFE_BENCH_REPOS_DOWN_SECONDS", 120);
    println!(
        "\n== scenario 11: two repositories (file://, S3) under a steady load for {seconds} s; S3 down from the 10th second for {down_for} s"
    );
    let s3 = S3Server::start();
    let mut front = common::front::TcpFront::start(s3.port());
    let (dir, pg, mut settings, _) = start_pair("bench-repos");
    settings.key_file = Some(common::setup::keygen(dir.path(), "repo.key"));
    settings.partial_interval = format!(
        "{}ms",
        walsafe::config::DEFAULT_PARTIAL_INTERVAL.as_millis()
    );
    settings.more_repositories = vec![common::walsafe::MoreRepository {
        name: "offsite".into(),
        url: s3.url("repos"),
        options: s3.repo_options_at(&front.endpoint()).into_iter().collect(),
        retries: 8,
        key_file: None,
    }];
    let local = settings.repo_url.clone();
    let config = settings.write(&dir.join("walsafe.toml"));
    let pair = Pair::start(dir, pg, &settings, &config, true);
    pair.pg.psql("CREATE TABLE steady (id bigserial, pad text)");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (sock, port, stop) = (
            pair.pg.socket_dir().to_path_buf(),
            pair.pg.port(),
            stop.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let o = common::pg::as_postgres(&mut common::pg::pg_command("psql"))
                    .args(["-XAtq", "-h"])
                    .arg(&sock)
                    .args(["-p", &port.to_string(), "-U", "postgres", "-c"])
                    .arg("INSERT INTO steady (pad) SELECT repeat(md5(g::text), 10) FROM generate_series(1, 2000) g")
                    .output()
                    .unwrap();
                assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let gauge = |m: &std::collections::HashMap<String, f64>, name: &str, repo: &str| {
        m.get(&format!("{name}{{repository=\"{repo}\"}}"))
            .copied()
            .unwrap_or(0.0)
    };
    let started = Instant::now();
    let (mut local_lag, mut offsite_lag) = (Vec::new(), Vec::new());
    let mut spool_peak: f64 = 0.0;
    let mut down = false;
    let mut back: Option<(Instant, u64)> = None;
    let mut caught_up = None;
    let start_lsn = parse_lsn(&pair.pg.psql("SELECT pg_current_wal_lsn()"));
    while started.elapsed() < Duration::from_secs(seconds)
        || (back.is_some() && caught_up.is_none())
    {
        let t = started.elapsed().as_secs();
        if !down && back.is_none() && t >= 10 {
            front.down();
            down = true;
        }
        if down && t >= 10 + down_for {
            front.up();
            down = false;
            back = Some((
                Instant::now(),
                parse_lsn(&pair.pg.psql("SELECT pg_current_wal_lsn()")),
            ));
        }
        let m = pair.agent.metrics();
        local_lag.push(gauge(&m, "walsafe_repository_archive_lag_seconds", &local));
        offsite_lag.push(gauge(
            &m,
            "walsafe_repository_archive_lag_seconds",
            "offsite",
        ));
        spool_peak = spool_peak.max(m.get("walsafe_spool_bytes").copied().unwrap_or(0.0));
        if let (Some((at, target)), None) = (back, caught_up) {
            if gauge(&m, "walsafe_repository_archived_lsn_bytes", "offsite") >= target as f64 {
                caught_up = Some(at.elapsed().as_secs_f64());
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    load.join().unwrap();
    let end = parse_lsn(&pair.pg.psql("SELECT pg_current_wal_lsn()"));
    pair.agent.wait_archived(end, Duration::from_secs(600));
    let pct = |v: &mut Vec<f64>, p: f64| {
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(((v.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(0.0)
    };
    let (_, rss) = usage(pair.agent_pid());
    println!(
        "{:.2} GB of WAL; file:// lag p50 {:.2} s, max {:.2} s; S3 lag max {:.1} s; spool peak {:.0} MiB; S3 caught up {:.1} s after it came back; VmHWM {rss:.1} MiB",
        (end - start_lsn) as f64 / 1e9,
        pct(&mut local_lag, 0.5),
        pct(&mut local_lag, 1.0),
        pct(&mut offsite_lag, 1.0),
        spool_peak / (1 << 20) as f64,
        caught_up.unwrap_or(f64::NAN),
    );
}

/// One ingest run's figures: (CPU s/GB, VmHWM MiB, catch-up s) for
/// walsafe and for pg_receivewal.
struct Ingest {
    label: String,
    walsafe: (f64, f64, f64),
    receivewal: (f64, f64, f64),
    /// CPU s/GB of the envelope alone (zstd 1 and AES-GCM, in this
    /// process, one thread) on pg_receivewal's copy of the same WAL.
    envelope: f64,
}

/// CPU seconds per GB that encoding `dir`'s complete segments (zstd level
/// 1, a key) takes on this thread: the part of walsafe's cost that no
/// pipeline change removes, measured on the run's own WAL.
fn envelope_cost(dir: &Path) -> f64 {
    use walsafe::repository::envelope;
    let key = walsafe::repository::key::Key::generate();
    let thread_cpu = || {
        // SAFETY: rusage is plain data, filled for this thread.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        secs(ru.ru_utime) + secs(ru.ru_stime)
    };
    let (mut bytes, mut cpu) = (0u64, 0.0);
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.file_name().len() != 24 {
            continue;
        }
        let data = std::fs::read(e.path()).unwrap();
        let before = thread_cpu();
        let mut reader = std::io::Cursor::new(&data[..]);
        let name = e.file_name().to_string_lossy().into_owned();
        let o = envelope::encode_from(
            &name,
            data.len() as u64,
            &mut reader,
            envelope::Compression::Zstd,
            1,
            Some(&key),
            &[],
        )
        .unwrap();
        cpu += thread_cpu() - before;
        bytes += data.len() as u64;
        std::hint::black_box(o);
    }
    cpu / (bytes as f64 / 1e9).max(1e-9)
}

fn ingest() {
    let seconds = env_u64("WALSAFE_BENCH_INGEST_SECONDS", 10);
    println!(
        "\n== scenario 8: ingest cost, {seconds} s of 2 INSERT sessions; walsafe with a key, zstd 1, default partial_interval; pg_receivewal --synchronous"
    );
    let s3 = S3Server::start();
    let mut rows = Vec::new();
    for (ack, store) in [
        ("local", "file"),
        ("remote", "file"),
        ("local", "s3"),
        ("remote", "s3"),
    ] {
        // WALSAFE_BENCH_INGEST_ONLY="remote,file" runs one configuration.
        if let Ok(only) = std::env::var("WALSAFE_BENCH_INGEST_ONLY") {
            if only != format!("{ack},{store}") {
                continue;
            }
        }
        let (dir, pg, mut settings, _) = start_pair(&format!("bench-ingest-{ack}-{store}"));
        settings.key_file = Some(common::setup::keygen(dir.path(), "repo.key"));
        settings.ack = ack.into();
        settings.partial_interval = format!(
            "{}ms",
            walsafe::config::DEFAULT_PARTIAL_INTERVAL.as_millis()
        );
        if store == "s3" {
            settings.repo_url = s3.url(&format!("ingest-{ack}"));
            settings.repo_options = s3.repo_options().into_iter().collect();
        }
        let config = settings.write(&dir.join("walsafe.toml"));
        let pair = Pair::start(dir, pg, &settings, &config, true);
        let start = parse_lsn(&pair.pg.psql("SELECT pg_current_wal_lsn()"));
        for h in spawn_load(&pair.pg, 2, seconds) {
            h.join().unwrap();
        }
        let end = parse_lsn(&pair.pg.psql("SELECT pg_current_wal_lsn()"));
        let (w, r) = wait_both(&pair, end, Instant::now());
        let gb = (end - start) as f64 / 1e9;
        let (w_cpu, w_rss) = usage(pair.agent_pid());
        let (r_cpu, r_rss) = usage(pair.recv.id());
        let row = Ingest {
            label: format!("ack {ack}, {store}"),
            walsafe: (w_cpu / gb, w_rss, w),
            receivewal: (r_cpu / gb, r_rss, r),
            envelope: envelope_cost(&pair._dir.join("receivewal")),
        };
        println!(
            "{}: {:.2} GB; CPU s/GB walsafe {:.2}, pg_receivewal {:.2}; VmHWM {:.1} / {:.1} MiB; catch-up {:.2} / {:.2} s",
            row.label, gb, row.walsafe.0, row.receivewal.0, row.walsafe.1, row.receivewal.1, w, r
        );
        rows.push(row);
    }
    println!("\n| ingest | CPU s/GB walsafe / pg_receivewal | envelope alone (zstd 1 + AES), s/GB | VmHWM MiB walsafe / pg_receivewal | catch-up s walsafe / pg_receivewal (+ partial_interval) |");
    println!("| --- | --- | --- | --- | --- |");
    let interval = walsafe::config::DEFAULT_PARTIAL_INTERVAL.as_secs_f64();
    for r in &rows {
        println!(
            "| {} | {:.2} / {:.2} = {:.2}x | {:.2} ({:.2}x pg_receivewal's) | {:.1} / {:.1} = {:.2}x | {:.2} / {:.2} (+{interval}) {} |",
            r.label,
            r.walsafe.0,
            r.receivewal.0,
            r.walsafe.0 / r.receivewal.0.max(1e-9),
            r.envelope,
            r.envelope / r.receivewal.0.max(1e-9),
            r.walsafe.1,
            r.receivewal.1,
            r.walsafe.1 / r.receivewal.1.max(1e-9),
            r.walsafe.2,
            r.receivewal.2,
            if r.walsafe.2 <= r.receivewal.2 + interval { "within" } else { "OVER" }
        );
    }
}

/// Runs `cmd` to completion; (wall seconds, CPU seconds, peak RSS MiB)
/// from the kernel's own accounting of that process (wait4).
fn measured(cmd: &mut std::process::Command, what: &str) -> (f64, f64, f64) {
    let started = Instant::now();
    // Reaped by wait4 below, which also reports its resource usage.
    #[allow(clippy::zombie_processes)]
    let child = cmd
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 fills it for our own child.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    assert!(
        r > 0 && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{what} failed ({status})"
    );
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (
        started.elapsed().as_secs_f64(),
        secs(ru.ru_utime) + secs(ru.ru_stime),
        ru.ru_maxrss as f64 / 1024.0,
    )
}

/// Fills `pg` with `pgbench -i` at `scale`, checkpoints, waits until
/// `agent` archived it all; the cluster's size in bytes and GiB.
fn pgbench_cluster(pg: &PgCluster, scale: u64, agent: &Agent) -> (u64, f64) {
    let mut init = pg.bins().command("pgbench");
    init.args(["-i", "-q", "-s", &scale.to_string(), "-h"])
        .arg(pg.socket_dir())
        .args(["-p", &pg.port().to_string(), "-U", "postgres", "postgres"]);
    assert!(init.status().unwrap().success(), "pgbench -i");
    pg.psql("CHECKPOINT");
    let size: u64 = pg
        .psql("SELECT sum(pg_database_size(oid)) FROM pg_database")
        .parse()
        .unwrap();
    let gb = size as f64 / (1u64 << 30) as f64;
    println!("cluster: {gb:.2} GiB");
    agent.wait_archived(
        parse_lsn(&pg.psql("SELECT pg_current_wal_lsn()")),
        Duration::from_secs(600),
    );
    (size, gb)
}

fn base_backup() {
    let scale = env_u64("WALSAFE_BENCH_BACKUP_SCALE", 130);
    println!("\n== scenario 5: base backup of a pgbench scale {scale} cluster");
    let (dir, pg, mut settings, _) = start_pair("bench-backup");
    settings.key_file = Some(common::setup::keygen(dir.path(), "repo.key"));
    let config = settings.write(&dir.join("walsafe.toml"));
    let agent = Agent::start(&config, settings.metrics_port);
    let (size, gb) = pgbench_cluster(&pg, scale, &agent);

    let mut rows = Vec::new();
    for (label, args) in [
        (
            "pg_basebackup -Ft --compress=zstd",
            vec!["-Ft", "--compress=zstd"],
        ),
        ("pg_basebackup -Ft -z", vec!["-Ft", "-z"]),
    ] {
        let out = dir.join(format!("pgbb-{}", rows.len()));
        let mut cmd = pg.bins().command("pg_basebackup");
        cmd.arg("-D")
            .arg(&out)
            .args(&args)
            .args(["-X", "none", "--checkpoint=fast", "-h"])
            .arg(pg.socket_dir())
            .args(["-p", &pg.port().to_string(), "-U", "postgres"]);
        common::pg::as_postgres(&mut cmd);
        let (wall, cpu, rss) = measured(&mut cmd, label);
        rows.push((label.to_string(), wall, cpu, rss, dir_size(&out)));
        let _ = std::fs::remove_dir_all(&out);
    }
    let mut cmd = std::process::Command::new(common::walsafe::bin_copy(dir.path()));
    common::pg::as_postgres(&mut cmd);
    cmd.arg("--config").arg(&config).arg("backup");
    let (wall, cpu, rss) = measured(&mut cmd, "walsafe backup");
    let stored = dir_size(&dir.join("repo").join("backups"));
    rows.push((
        "walsafe backup (zstd + AES-256-GCM, file://)".into(),
        wall,
        cpu,
        rss,
        stored,
    ));

    println!(
        "{:<46} {:>8} {:>9} {:>10} {:>9} {:>10}",
        "", "wall s", "MiB/s", "CPU s/GB", "RSS MiB", "stored MiB"
    );
    for (label, wall, cpu, rss, stored) in &rows {
        println!(
            "{label:<46} {wall:>8.2} {:>9.1} {:>10.2} {rss:>9.1} {:>10.1}",
            size as f64 / (1 << 20) as f64 / wall,
            cpu / gb,
            *stored as f64 / (1 << 20) as f64
        );
    }
    let (w, c) = (rows[2].1, rows[2].2);
    println!(
        "ratios walsafe / pg_basebackup zstd: throughput {:.2}x, CPU per GB {:.2}x; / -z: throughput {:.2}x, CPU per GB {:.2}x",
        rows[0].1 / w,
        c / rows[0].2,
        rows[1].1 / w,
        c / rows[1].2
    );
    drop(agent);
}

fn replay() {
    let mb = env_u64("WALSAFE_BENCH_REPLAY_MB", 900);
    println!("\n== scenario 7: replay of {mb} MB of WAL through restore_command");
    let (dir, pg, mut settings, _) = start_pair("bench-replay");
    settings.key_file = Some(common::setup::keygen(dir.path(), "repo.key"));
    let config = settings.write(&dir.join("walsafe.toml"));
    let recv_dir = dir.join("receivewal");
    let base = dir.join("base");
    let scratch = dir.path().to_path_buf();
    let prefetch = settings.prefetch_dir.clone();
    let bin = common::walsafe::bin_copy(dir.path());
    // The same WAL into S3 (moto) by a second agent with its own slot.
    let s3 = S3Server::start();
    let mut s3_settings = settings.clone();
    s3_settings.repo_url = s3.url("replay");
    s3_settings.repo_options = s3.repo_options().into_iter().collect();
    s3_settings.spool = dir.join("spool-s3");
    s3_settings.prefetch_dir = dir.join("prefetch-s3");
    s3_settings.slot = "walsafe_s3".into();
    s3_settings.metrics_port = common::walsafe::free_port();
    let s3_config = s3_settings.write(&dir.join("walsafe-s3.toml"));
    let pair = Pair::start(dir, pg, &settings, &config, true);
    let s3_agent = Agent::start(&s3_config, s3_settings.metrics_port);
    pair.pg.base_backup(&base, "none");
    let start = parse_lsn(&pair.pg.psql("SELECT pg_current_wal_lsn()"));
    while parse_lsn(&pair.pg.psql("SELECT pg_current_wal_lsn()")) - start < mb << 20 {
        for h in spawn_load(&pair.pg, 2, 2) {
            h.join().unwrap();
        }
    }
    pair.pg.psql("SELECT pg_switch_wal()");
    let end = parse_lsn(&pair.pg.psql("SELECT pg_current_wal_lsn()"));
    wait_both(&pair, end, Instant::now());
    s3_agent.wait_archived(end, Duration::from_secs(600));
    let bytes = end - start;
    println!("WAL to replay: {:.0} MiB", bytes as f64 / 1048576.0);
    // The S3 reference: pg_receivewal's segments as plain objects, one
    // GET each into place.
    for e in std::fs::read_dir(&recv_dir).unwrap().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.len() == 24 {
            let (status, _) = common::s3::http(
                s3.port(),
                "PUT",
                &format!("/walsafe-test/plain/{n}"),
                &std::fs::read(e.path()).unwrap(),
            )
            .unwrap();
            assert_eq!(status, 200, "PUT {n}");
        }
    }
    // The peer, when built (`WALSAFE_BENCH_WALRUS=<path to walrus>`):
    // wal-rus's `wal-push` of pg_receivewal's segments into a `file://`
    // store (zstd level 1, as walsafe's), fetched by its `wal-fetch`,
    // which prefetches like walsafe's.
    let walrus = std::env::var_os("WALSAFE_BENCH_WALRUS").map(|path| {
        let exe = scratch.join("walrus");
        std::fs::copy(&path, &exe).expect("copy the walrus binary");
        common::pg::chown_postgres(&exe);
        let store = scratch.join("walrus-store");
        std::fs::create_dir_all(&store).unwrap();
        let env = format!(
            "WALG_FILE_PREFIX={} WALG_COMPRESSION_METHOD=zstd WALG_COMPRESSION_LEVEL=1",
            store.display()
        );
        let mut names: Vec<_> = std::fs::read_dir(&recv_dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.file_name().is_some_and(|n| n.len() == 24))
            .collect();
        names.sort();
        for path in names {
            let status = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "{env} {} wal-push {}",
                    exe.display(),
                    path.display()
                ))
                .status()
                .unwrap();
            assert!(status.success(), "walrus wal-push {}", path.display());
        }
        common::pg::chown_postgres(&store);
        format!("{env} {} wal-fetch %f %p", exe.display())
    });
    if walrus.is_none() {
        println!("(wal-rus not measured: set WALSAFE_BENCH_WALRUS to its binary)");
    }
    let mut times: Vec<(&str, f64)> = Vec::new();
    let mut variants: Vec<(&str, String)> = vec![
        (
            "walsafe wal-fetch",
            format!(
                "{} --config {} wal-fetch %f %p",
                bin.display(),
                config.display()
            ),
        ),
        ("cp", format!("cp {}/%f %p", recv_dir.display())),
        (
            "walsafe wal-fetch S3",
            format!(
                "{} --config {} wal-fetch %f %p",
                bin.display(),
                s3_config.display()
            ),
        ),
        (
            "curl GET S3",
            format!(
                "curl -sf --aws-sigv4 aws:amz:us-east-1:s3 --user {}:{} -o %p http://127.0.0.1:{}/walsafe-test/plain/%f",
                common::s3::ACCESS_KEY_ID,
                common::s3::SECRET_ACCESS_KEY,
                s3.port()
            ),
        ),
    ];
    if let Some(command) = walrus {
        variants.push(("wal-rus wal-fetch", command));
    }
    let rounds = env_u64("WALSAFE_BENCH_REPLAY_ROUNDS", 3) as usize;
    for round in 0..rounds * variants.len() {
        let (label, command) = variants[round % variants.len()].clone();
        let _ = std::fs::remove_dir_all(&prefetch);
        let _ = std::fs::remove_dir_all(&s3_settings.prefetch_dir);
        let t0 = Instant::now();
        let restored = common::pg::start_restore(
            &base,
            &[
                format!("restore_command = '{command}'"),
                "recovery_target_action = 'promote'".into(),
            ],
        );
        let outcome = restored.wait_recovery_end(Duration::from_secs(900));
        let secs = t0.elapsed().as_secs_f64();
        assert_eq!(
            outcome,
            common::pg::RecoveryOutcome::Promoted,
            "{label}: {}",
            restored.log_tail()
        );
        println!(
            "{label:<20} {secs:>7.2} s  {:>7.1} MB/s",
            bytes as f64 / 1e6 / secs
        );
        times.push((label, secs));
    }
    let best = |l: &str| {
        times
            .iter()
            .filter(|(x, _)| *x == l)
            .map(|(_, t)| *t)
            .fold(f64::MAX, f64::min)
    };
    println!(
        "replay speed (best of {rounds} each): walsafe / cp from file:// {:.2}x; walsafe / curl GET from S3 {:.2}x",
        best("cp") / best("walsafe wal-fetch"),
        best("curl GET S3") / best("walsafe wal-fetch S3"),
    );
    if times.iter().any(|(l, _)| *l == "wal-rus wal-fetch") {
        println!(
            "replay speed (best of {rounds} each): walsafe / wal-rus wal-fetch from file:// {:.2}x; wal-rus / cp {:.2}x",
            best("wal-rus wal-fetch") / best("walsafe wal-fetch"),
            best("cp") / best("wal-rus wal-fetch"),
        );
    }
    drop(s3_agent);
}

/// Stops the server on `data` (as postgres), whatever it is doing.
fn stop_server(pg: &PgCluster, data: &Path) {
    let mut c = pg.bins().command("pg_ctl");
    c.arg("-D").arg(data).args(["-m", "immediate", "stop"]);
    let _ = c.output();
}

fn restore() {
    let scale = env_u64("WALSAFE_BENCH_RESTORE_SCALE", 130);
    println!("\n== scenario 6: restore of a pgbench scale {scale} cluster, to a running server");
    let (dir, pg, mut settings, _) = start_pair("bench-restore");
    settings.key_file = Some(common::setup::keygen(dir.path(), "repo.key"));
    let config = settings.write(&dir.join("walsafe.toml"));
    let s3 = S3Server::start();
    let mut s3_settings = settings.clone();
    s3_settings.repo_url = s3.url("bench-restore");
    s3_settings.repo_options = s3.repo_options().into_iter().collect();
    s3_settings.spool = dir.join("spool-s3");
    s3_settings.slot = "walsafe_s3".into();
    s3_settings.metrics_port = common::walsafe::free_port();
    let s3_config = s3_settings.write(&dir.join("walsafe-s3.toml"));
    let agent = Agent::start(&config, settings.metrics_port);
    let (size, gb) = pgbench_cluster(&pg, scale, &agent);
    let bin = common::walsafe::bin_copy(dir.path());
    for c in [&config, &s3_config] {
        let mut cmd = std::process::Command::new(&bin);
        common::pg::as_postgres(&mut cmd);
        cmd.arg("--config").arg(c).arg("backup");
        measured(&mut cmd, "walsafe backup");
    }
    let pgbb = dir.subdir("pgbb");
    let mut cmd = pg.bins().command("pg_basebackup");
    cmd.arg("-D")
        .arg(&pgbb)
        .args([
            "-Ft",
            "--compress=zstd",
            "-X",
            "fetch",
            "--checkpoint=fast",
            "-h",
        ])
        .arg(pg.socket_dir())
        .args(["-p", &pg.port().to_string(), "-U", "postgres"]);
    measured(&mut cmd, "pg_basebackup");

    let mut rows = Vec::new();
    // The reference: tar and zstd, then the server started on it.
    let data = dir.subdir("restored-tar");
    let port = common::walsafe::free_port();
    let script = format!(
        "set -e; tar -I zstd -xf {pgbb}/base.tar.zst -C {d}; chmod 700 {d}; {pg_ctl} -D {d} -l {d}/log -o '-p {port}' -w -t 600 start",
        pgbb = pgbb.display(),
        d = data.display(),
        pg_ctl = pg.bins().program("pg_ctl").display()
    );
    let mut cmd = std::process::Command::new("sh");
    cmd.args(["-c", &script]);
    common::pg::as_postgres(&mut cmd);
    let (wall, cpu, rss) = measured(&mut cmd, "tar + pg_ctl start");
    stop_server(&pg, &data);
    rows.push(("tar -I zstd + pg_ctl start".to_string(), wall, cpu, rss));
    let _ = std::fs::remove_dir_all(&data);
    for (label, c) in [
        ("walsafe restore --start (file://)", &config),
        ("walsafe restore --start (S3, moto)", &s3_config),
    ] {
        let data = dir.subdir(&format!("restored-{}", rows.len()));
        let port = common::walsafe::free_port();
        let mut cmd = std::process::Command::new(&bin);
        common::pg::as_postgres(&mut cmd);
        cmd.arg("--config")
            .arg(c)
            .arg("restore")
            .arg(&data)
            .args([
                "--target",
                "immediate",
                "--target-action",
                "promote",
                "--start",
            ])
            .args(["--port", &port.to_string(), "--pg-bindir"])
            .arg(pg.bins().program("pg_ctl").parent().unwrap());
        let (wall, cpu, rss) = measured(&mut cmd, label);
        stop_server(&pg, &data);
        rows.push((label.to_string(), wall, cpu, rss));
        let _ = std::fs::remove_dir_all(&data);
    }
    println!(
        "{:<40} {:>8} {:>9} {:>10} {:>9}",
        "", "wall s", "MiB/s", "CPU s/GB", "RSS MiB"
    );
    for (label, wall, cpu, rss) in &rows {
        println!(
            "{label:<40} {wall:>8.2} {:>9.1} {:>10.2} {rss:>9.1}",
            size as f64 / (1 << 20) as f64 / wall,
            cpu / gb,
        );
    }
    println!(
        "ratios (speed, tar time / walsafe time): file:// {:.2}x, S3 {:.2}x; CPU per GB walsafe / tar: file:// {:.2}x, S3 {:.2}x",
        rows[0].1 / rows[1].1,
        rows[0].1 / rows[2].1,
        rows[1].2 / rows[0].2,
        rows[2].2 / rows[0].2,
    );
    drop(agent);
}

/// An SQL session to `pg` as postgres, its connection driven in the background.
async fn sql_client(pg: &PgCluster) -> tokio_postgres::Client {
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
}
