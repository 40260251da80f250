//! walsafe's metrics against the truth: a real PostgreSQL streamed by the
//! real binary into a `file://` repository, the exposition scraped, and
//! every number checked against the others, the repository listing and
//! the spool directory.
//!
//! What is exactly true once the agent is idle (nothing in flight):
//!
//! * `archived == flushed == received == server`, `archive_lag_bytes ==
//!   server - archived` (0), `archive_lag_seconds == 0`,
//!   `spool_pending_segments == 0`.
//! * `archived` is the end of the WAL stored contiguously in the
//!   repository: complete `wal/<segment>` objects from the first one the
//!   agent stored, then the chunks of the next segment from offset 0.
//! * `uploads_total{kind="segment",result="ok"}` is the number of segment
//!   objects (the repository started empty; each segment is stored once),
//!   and the upload-duration histogram counts the same uploads (it is
//!   recorded for successful uploads only).
//! * `upload_bytes_total` counts every object walsafe created (not the
//!   descriptor, written separately), including chunks deleted once their
//!   segment was stored. So it is at least the size of what is stored now;
//!   a poller watching the repository during the run records every chunk
//!   it sees, and when it saw as many chunks as were uploaded the sum is
//!   exact.
//! * `spool_bytes` is the sum of the file sizes in the spool. The monitor
//!   measures the spool and then rewrites the state file, so the gauge
//!   holds the state file as of the previous rewrite; idle, that file's
//!   size does not change and the equality is exact.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::pg::{PgCluster, PgOptions};
use common::setup::setup;
use common::walsafe::{counter_sum, wait_until, Agent};

fn lsn(text: &str) -> u64 {
    let (hi, lo) = text.trim().split_once('/').expect("an LSN");
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

fn current_lsn(pg: &PgCluster) -> u64 {
    lsn(&pg.psql("SELECT pg_current_wal_lsn()"))
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// The raw Prometheus exposition text.
fn exposition(port: u16) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to metrics");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(
        head.starts_with("HTTP/1.") && head.contains(" 200"),
        "{head}"
    );
    body.to_string()
}

/// Samples of an exposition: `name{labels}` → value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').expect("name value");
            (k.to_string(), v.trim().parse().expect("a number"))
        })
        .collect()
}

/// One scrape, with named accessors.
#[derive(Clone, Debug)]
struct Scrape(BTreeMap<String, f64>);

impl Scrape {
    fn take(port: u16) -> Scrape {
        Scrape(samples(&exposition(port)))
    }
    fn get(&self, key: &str) -> f64 {
        *self
            .0
            .get(key)
            .unwrap_or_else(|| panic!("{key} is not exported; have: {:?}", self.0.keys()))
    }
    fn opt(&self, key: &str) -> Option<f64> {
        self.0.get(key).copied()
    }
    fn pos(&self, which: &str) -> u64 {
        self.get(&format!("walsafe_{which}_lsn_bytes")) as u64
    }
    /// (server, received, flushed, archived).
    fn positions(&self) -> (u64, u64, u64, u64) {
        (
            self.pos("server"),
            self.pos("received"),
            self.pos("flushed"),
            self.pos("archived"),
        )
    }
    /// A labelled sample, labels in any order.
    fn labelled(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.0.iter().find_map(|(k, v)| {
            let rest = k.strip_prefix(name)?.strip_prefix('{')?.strip_suffix('}')?;
            let have: BTreeSet<String> = rest.split(',').map(str::to_string).collect();
            let want: BTreeSet<String> =
                labels.iter().map(|(l, v)| format!("{l}=\"{v}\"")).collect();
            want.is_subset(&have).then_some(*v)
        })
    }
}

/// What the `file://` repository holds.
#[derive(Debug, Default, Clone)]
struct Listing {
    /// Complete segment objects: segment number → object size.
    segments: BTreeMap<u64, u64>,
    /// Other `wal/` objects (history, partial): name → size.
    other_wal: BTreeMap<String, u64>,
    /// Chunk objects: (segment number, start, end) → object size.
    chunks: BTreeMap<(u64, u64, u64), u64>,
}

fn segno_of(name: &str, segsize: u64) -> Option<u64> {
    if name.len() != 24 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    assert_eq!(&name[..8], "00000001", "unexpected timeline in {name}");
    let log = u64::from_str_radix(&name[8..16], 16).ok()?;
    let seg = u64::from_str_radix(&name[16..24], 16).ok()?;
    Some(log * (0x1_0000_0000 / segsize) + seg)
}

fn list_repo(repo: &Path, segsize: u64) -> Listing {
    let mut l = Listing::default();
    if let Ok(rd) = std::fs::read_dir(repo.join("wal")) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(meta) = e.metadata() else { continue };
            if name.contains('#') {
                continue; // staging file
            }
            match segno_of(&name, segsize) {
                Some(n) => {
                    l.segments.insert(n, meta.len());
                }
                None => {
                    l.other_wal.insert(name, meta.len());
                }
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir(repo.join("chunks")) {
        for seg in rd.flatten() {
            let Some(n) = segno_of(&seg.file_name().to_string_lossy(), segsize) else {
                continue;
            };
            let Ok(chunks) = std::fs::read_dir(seg.path()) else {
                continue;
            };
            for c in chunks.flatten() {
                let name = c.file_name().to_string_lossy().into_owned();
                if name.contains('#') {
                    continue;
                }
                let Some((s, e)) = name.split_once('-') else {
                    panic!("unexpected chunk object {name}")
                };
                let Ok(meta) = c.metadata() else { continue };
                l.chunks.insert(
                    (
                        n,
                        u64::from_str_radix(s, 16).unwrap(),
                        u64::from_str_radix(e, 16).unwrap(),
                    ),
                    meta.len(),
                );
            }
        }
    }
    l
}

impl Listing {
    /// End of the WAL stored contiguously, from the first object stored.
    fn contiguous_end(&self, segsize: u64) -> Option<u64> {
        let first = self
            .segments
            .keys()
            .next()
            .copied()
            .or_else(|| self.chunks.keys().next().map(|k| k.0))?;
        let mut next = first;
        while self.segments.contains_key(&next) {
            next += 1;
        }
        let mut covered = 0;
        for &(seg, s, e) in self.chunks.keys() {
            if seg == next && s <= covered {
                covered = covered.max(e);
            }
        }
        Some(next * segsize + covered)
    }

    fn stored_bytes(&self) -> u64 {
        self.segments.values().sum::<u64>()
            + self.other_wal.values().sum::<u64>()
            + self.chunks.values().sum::<u64>()
    }
}

/// Chunk objects: (segment number, start, end) → object size.
type Chunks = BTreeMap<(u64, u64, u64), u64>;

/// Records every chunk object that appears in the repository, with its
/// size, until dropped.
struct ChunkWatcher {
    seen: Arc<Mutex<Chunks>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ChunkWatcher {
    fn start(repo: PathBuf, segsize: u64) -> ChunkWatcher {
        let seen = Arc::new(Mutex::new(BTreeMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, st2) = (seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !st2.load(Ordering::Relaxed) {
                let l = list_repo(&repo, segsize);
                s2.lock().unwrap().extend(l.chunks);
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        ChunkWatcher {
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn seen(&self) -> Chunks {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for ChunkWatcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The regular files directly in a spool directory.
#[derive(Debug)]
struct SpoolFiles {
    /// Size of the state file (0 when absent).
    state: u64,
    /// Sum of the sizes of every other file.
    others: u64,
    /// Every file and its size.
    list: Vec<(String, u64)>,
}

fn spool_files(dir: &Path) -> SpoolFiles {
    let mut state = 0;
    let mut others = 0;
    let mut list = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let Ok(m) = e.metadata() else { continue };
        if !m.is_file() {
            continue;
        }
        let name = e.file_name().to_string_lossy().into_owned();
        if name == "walsafe.state" {
            state = m.len();
        } else {
            others += m.len();
        }
        list.push((name, m.len()));
    }
    SpoolFiles {
        state,
        others,
        list,
    }
}

/// Writes about `mb` MiB of WAL.
fn write_wal(pg: &PgCluster, mb: u32) {
    pg.psql("CREATE TABLE IF NOT EXISTS filler (id bigserial, pad text)");
    for _ in 0..mb {
        pg.psql(
            "INSERT INTO filler (pad) SELECT repeat(md5(g::text), 30) FROM generate_series(1, 1000) g",
        );
    }
}

/// A scrape taken while nothing moves: two scrapes 1.2 s apart around a
/// repository listing and a spool listing agree on every position and
/// counter, the state file keeps its size, and the agent is
/// caught up with the server. Retries until `timeout` (PostgreSQL writes a
/// little WAL by itself after activity: a standby snapshot every 15 s).
fn idle_snapshot(
    agent: &Agent,
    repo: &Path,
    spool: &Path,
    segsize: u64,
    timeout: Duration,
) -> (Scrape, Listing, SpoolFiles) {
    let deadline = Instant::now() + timeout;
    loop {
        let state_before = spool_files(spool).state;
        let a = Scrape::take(agent.metrics_port);
        let listing = list_repo(repo, segsize);
        let files = spool_files(spool);
        // Longer than the monitor's 1 s spool/state period, so that `b`'s
        // spool_bytes was measured after `a` (with a state file written
        // after `state_before`).
        std::thread::sleep(Duration::from_millis(1200));
        let b = Scrape::take(agent.metrics_port);
        let (server, received, _, _) = b.positions();
        let still = a.positions() == b.positions()
            && a.opt("walsafe_spool_bytes") == b.opt("walsafe_spool_bytes")
            && a.opt("walsafe_upload_bytes_total") == b.opt("walsafe_upload_bytes_total")
            && a.0
                .iter()
                .filter(|(k, _)| k.starts_with("walsafe_uploads_total"))
                .eq(b
                    .0
                    .iter()
                    .filter(|(k, _)| k.starts_with("walsafe_uploads_total")))
            && spool_files(spool).state == files.state
            && state_before == files.state
            && server == received;
        if still {
            return (b, listing, files);
        }
        assert!(
            Instant::now() < deadline,
            "walsafe never settled within {timeout:?}: positions {:?} then {:?}; log:\n{}",
            a.positions(),
            b.positions(),
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Every relation of the module doc, on one idle snapshot.
fn assert_idle_consistency(s: &Scrape, listing: &Listing, spool: &SpoolFiles, segsize: u64) {
    let (server, received, flushed, archived) = s.positions();
    let ctx = format!(
        "server {server:#X} received {received:#X} flushed {flushed:#X} archived {archived:#X}"
    );
    assert!(
        archived <= flushed && flushed <= received && received <= server,
        "positions out of order: {ctx}"
    );
    assert_eq!(archived, flushed, "idle but not all archived: {ctx}");
    assert_eq!(flushed, received, "idle but not all flushed: {ctx}");
    assert_eq!(
        s.get("walsafe_archive_lag_bytes") as u64,
        server - archived,
        "archive_lag_bytes != server - archived: {ctx}"
    );
    assert_eq!(
        s.get("walsafe_archive_lag_seconds"),
        0.0,
        "caught up, yet archive_lag_seconds is not 0: {ctx}"
    );
    assert_eq!(s.get("walsafe_spool_pending_segments"), 0.0, "{ctx}");
    let repo_end = listing
        .contiguous_end(segsize)
        .expect("the repository holds WAL");
    assert_eq!(
        archived, repo_end,
        "walsafe_archived_lsn_bytes is {archived:#X}, but the repository holds WAL contiguously up to {repo_end:#X}: {ctx}\n{listing:?}"
    );
    let gauge = s.get("walsafe_spool_bytes") as u64;
    assert_eq!(
        gauge,
        spool.others + spool.state,
        "walsafe_spool_bytes {gauge} != the spool's files {:?} (sum {})",
        spool.list,
        spool.others + spool.state
    );
}

#[test]
fn metrics_agree_with_each_other_and_with_the_repository() {
    let s = setup("metrics", PgOptions::default());
    let segsize = s.pg.segment_size();
    let repo = s.dir.join("repo");
    let spool = s.settings.spool.clone();
    let started = now_secs();
    let agent = Agent::start(&s.config, s.settings.metrics_port);
    let watcher = ChunkWatcher::start(repo.clone(), segsize);

    // While WAL flows: ordering of every scrape, and the histograms fill.
    let stop = Arc::new(AtomicBool::new(false));
    let port = s.settings.metrics_port;
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut out = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if let Some(m) = common::walsafe::scrape(port) {
                    out.push(Scrape(m.into_iter().collect()));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            out
        })
    };
    for _ in 0..3 {
        write_wal(&s.pg, 3);
        s.pg.psql("SELECT pg_switch_wal()");
    }
    s.pg.psql("CREATE TABLE marks (i int)");
    for i in 0..5 {
        s.pg.psql(&format!("INSERT INTO marks VALUES ({i})"));
        std::thread::sleep(Duration::from_millis(300));
    }
    let end = current_lsn(&s.pg);
    agent.wait_archived(end, Duration::from_secs(90));
    stop.store(true, Ordering::Relaxed);
    let during = sampler.join().unwrap();

    let mut disorder = Vec::new();
    for sc in during
        .iter()
        .filter(|sc| sc.opt("walsafe_archived_lsn_bytes").is_some())
    {
        let (server, received, flushed, archived) = sc.positions();
        if !(archived <= flushed && flushed <= received && received <= server) {
            disorder.push(format!(
                "server {server:#X} received {received:#X} flushed {flushed:#X} archived {archived:#X}"
            ));
        }
    }
    assert!(
        during.len() > 20,
        "only {} scrapes while writing",
        during.len()
    );
    assert!(
        disorder.is_empty(),
        "{} of {} scrapes while WAL flowed had positions out of order (archived <= flushed <= received <= server):\n{}",
        disorder.len(),
        during.len(),
        disorder.join("\n")
    );

    // Fresh after the last commit.
    let m = Scrape::take(port);
    let last = m.get("walsafe_last_archived_timestamp_seconds");
    let now = now_secs();
    assert!(
        last >= started && last <= now + 1.0 && now - last < 10.0,
        "last_archived_timestamp_seconds {last} is not within 10 s before now ({now})"
    );
    assert_eq!(m.get("walsafe_timeline"), 1.0);
    assert_eq!(m.get("walsafe_replication_connected"), 1.0);

    let (m, listing, files) =
        idle_snapshot(&agent, &repo, &spool, segsize, Duration::from_secs(60));
    assert_idle_consistency(&m, &listing, &files, segsize);
    assert!(
        listing.segments.len() >= 3,
        "expected at least 3 complete segments, the repository has {:?}",
        listing.segments
    );

    // Upload counts against what is stored.
    let seg_ok = m
        .labelled(
            "walsafe_uploads_total",
            &[("kind", "segment"), ("result", "ok")],
        )
        .unwrap_or(0.0) as usize;
    assert_eq!(
        seg_ok,
        listing.segments.len(),
        "uploads_total{{segment,ok}} = {seg_ok}, but the (initially empty) repository holds {} segment objects",
        listing.segments.len()
    );
    let chunk_ok = m
        .labelled(
            "walsafe_uploads_total",
            &[("kind", "chunk"), ("result", "ok")],
        )
        .unwrap_or(0.0) as usize;
    assert!(
        chunk_ok >= listing.chunks.len() && chunk_ok > 0,
        "uploads_total{{chunk,ok}} = {chunk_ok}, chunks stored now: {}",
        listing.chunks.len()
    );
    for kind in ["segment", "chunk"] {
        let ok = m
            .labelled("walsafe_uploads_total", &[("kind", kind), ("result", "ok")])
            .unwrap_or(0.0);
        let count = m
            .labelled("walsafe_upload_duration_seconds_count", &[("kind", kind)])
            .unwrap_or(0.0);
        assert!(count > 0.0, "no upload duration samples for {kind}");
        assert_eq!(
            count, ok,
            "upload_duration_seconds_count{{kind={kind}}} = {count} but uploads_total{{kind={kind},result=ok}} = {ok}"
        );
    }
    assert!(
        m.get("walsafe_fsync_duration_seconds_count") > 0.0,
        "no fsync duration samples"
    );
    for (k, v) in &m.0 {
        if k.starts_with("walsafe_uploads_total") && k.contains("result=\"error\"") && *v > 0.0 {
            panic!("{k} = {v} on a healthy local repository");
        }
    }

    // Bytes: every object created in this run, deleted chunks included.
    let uploaded = m.get("walsafe_upload_bytes_total") as u64;
    let stored = listing.stored_bytes();
    assert!(
        uploaded >= stored,
        "upload_bytes_total {uploaded} < {stored} bytes stored in the repository"
    );
    let seen = watcher.seen();
    drop(watcher);
    let mut every_chunk = seen.clone();
    every_chunk.extend(listing.chunks.clone());
    let ever = listing.segments.values().sum::<u64>()
        + listing.other_wal.values().sum::<u64>()
        + every_chunk.values().sum::<u64>();
    eprintln!(
        "upload_bytes_total {uploaded}; stored now {stored}; chunks uploaded {chunk_ok}, seen {}, still stored {}",
        every_chunk.len(),
        listing.chunks.len()
    );
    if every_chunk.len() == chunk_ok {
        assert_eq!(
            uploaded, ever,
            "upload_bytes_total {uploaded} != the {} objects created in the run ({ever} bytes: segments {}, chunks {})",
            listing.segments.len() + every_chunk.len(),
            listing.segments.values().sum::<u64>(),
            every_chunk.values().sum::<u64>()
        );
    } else {
        // The watcher missed some short-lived chunks: a lower bound only.
        assert!(
            every_chunk.len() < chunk_ok && uploaded >= ever,
            "upload_bytes_total {uploaded}, objects seen {ever} bytes; chunks seen {} of {chunk_ok} uploaded",
            every_chunk.len()
        );
    }
}

/// Restarting PostgreSQL under a running agent: the connection gauge
/// drops, the agent reconnects and counts it, and archiving resumes with
/// consistent metrics.
#[test]
fn reconnect_is_counted_and_archiving_resumes() {
    let s = setup("metrics-reconnect", PgOptions::default());
    let segsize = s.pg.segment_size();
    let repo = s.dir.join("repo");
    let agent = Agent::start(&s.config, s.settings.metrics_port);
    s.pg.psql("CREATE TABLE marks (i int)");
    agent.wait_archived(current_lsn(&s.pg), Duration::from_secs(30));
    let before = agent.gauge("walsafe_reconnects_total");

    s.pg.stop_fast();
    assert!(
        wait_until(Duration::from_secs(20), || agent
            .gauge("walsafe_replication_connected")
            == 0.0),
        "walsafe_replication_connected stayed 1 with PostgreSQL stopped; log:\n{}",
        agent.log()
    );
    s.pg.start_again();
    agent.wait_connected(Duration::from_secs(60));
    let reconnects = agent.gauge("walsafe_reconnects_total");
    assert!(
        reconnects >= before + 1.0,
        "walsafe_reconnects_total went from {before} to {reconnects} across a server restart"
    );

    s.pg.psql("INSERT INTO marks VALUES (1)");
    agent.wait_archived(current_lsn(&s.pg), Duration::from_secs(30));
    let (m, listing, files) = idle_snapshot(
        &agent,
        &repo,
        &s.settings.spool,
        segsize,
        Duration::from_secs(60),
    );
    assert_idle_consistency(&m, &listing, &files, segsize);
    assert_eq!(m.get("walsafe_replication_connected"), 1.0);
    assert_eq!(m.get("walsafe_timeline"), 1.0);
}

/// `# HELP` and `# TYPE` for every family in the exposition, with the
/// type `src/metrics.rs` describes; and every metric that exists from the
/// start is there once the agent streams.
#[test]
fn every_metric_is_described_and_typed() {
    let src =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/metrics.rs")).unwrap();
    let konst =
        regex::Regex::new(r#"pub const ([A-Z0-9_]+): &str = "(walsafe_[a-z0-9_]+)";"#).unwrap();
    let consts: BTreeMap<String, String> = konst
        .captures_iter(&src)
        .map(|c| (c[1].to_string(), c[2].to_string()))
        .collect();
    let desc = regex::Regex::new(r"describe_(gauge|counter|histogram)!\(\s*([A-Z0-9_]+)").unwrap();
    let declared: BTreeMap<String, String> = desc
        .captures_iter(&src)
        .map(|c| (consts[&c[2]].clone(), c[1].to_string()))
        .collect();
    let undescribed: Vec<&String> = consts
        .values()
        .filter(|n| !declared.contains_key(*n))
        .collect();
    assert!(
        undescribed.is_empty(),
        "metrics without describe_*: {undescribed:?}"
    );

    let s = setup("metrics-help", PgOptions::default());
    let agent = Agent::start(&s.config, s.settings.metrics_port);
    s.pg.psql("CREATE TABLE t (i int)");
    s.pg.psql("SELECT pg_switch_wal()");
    s.pg.psql("INSERT INTO t VALUES (1)");
    agent.wait_archived(current_lsn(&s.pg), Duration::from_secs(60));
    // Gauges set once a second and histograms recorded at their first
    // event appear in their own time: wait until every one is exported
    // (the checks below then say what is missing, if it never is).
    let mut text = String::new();
    wait_until(Duration::from_secs(30), || {
        text = exposition(s.settings.metrics_port);
        declared
            .iter()
            .filter(|(_, t)| *t != "counter")
            .all(|(n, _)| text.contains(&format!("# TYPE {n} ")))
    });

    let mut help = BTreeSet::new();
    let mut types = BTreeMap::new();
    let mut families = BTreeSet::new();
    for l in text.lines() {
        if let Some(r) = l.strip_prefix("# HELP ") {
            let (name, text) = r.split_once(' ').unwrap_or((r, ""));
            assert!(!text.trim().is_empty(), "empty HELP for {name}");
            help.insert(name.to_string());
        } else if let Some(r) = l.strip_prefix("# TYPE ") {
            let (name, t) = r.split_once(' ').expect("TYPE name type");
            types.insert(name.to_string(), t.to_string());
        } else if !l.starts_with('#') && !l.is_empty() {
            let name = l.split(['{', ' ']).next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suf| {
                    name.strip_suffix(suf)
                        .filter(|b| types.get(*b).is_some_and(|t| t == "histogram"))
                })
                .unwrap_or(name);
            families.insert(family.to_string());
        }
    }
    let mut problems = Vec::new();
    for f in &families {
        if !help.contains(f) {
            problems.push(format!("{f}: no # HELP"));
        }
        match (types.get(f), declared.get(f)) {
            (None, _) => problems.push(format!("{f}: no # TYPE")),
            (Some(t), Some(d)) if t != d => problems.push(format!(
                "{f}: # TYPE {t}, but src/metrics.rs describes a {d}"
            )),
            (Some(_), None) => problems.push(format!("{f}: not a constant in src/metrics.rs")),
            _ => {}
        }
    }
    // Counters that only come into being at their first event (a
    // conflict, a reconnect) may be absent; every gauge and histogram of
    // a streaming, archiving agent must be there.
    let absent: Vec<&String> = declared
        .iter()
        .filter(|(n, t)| *t != "counter" && !families.contains(*n))
        .map(|(n, _)| n)
        .collect();
    if !absent.is_empty() {
        problems.push(format!("not exported by a streaming agent: {absent:?}"));
    }
    let lazy: Vec<&String> = declared.keys().filter(|n| !families.contains(*n)).collect();
    eprintln!("counters not yet exported (created at their first event): {lazy:?}");
    assert!(
        problems.is_empty(),
        "{}\nexposition:\n{text}",
        problems.join("\n")
    );
}

/// Storage requests and bytes are counted as the store sees them, and an
/// idle cluster costs no request at all: once PostgreSQL writes nothing
/// (its LSN stands still), the agent sends nothing, not even a chunk of
/// the bytes it already stored. The state file carries the hour's
/// figures for `walsafe status`.
#[test]
fn storage_requests_are_counted_and_an_idle_cluster_costs_none() {
    // Autovacuum's analyze of the tables written here would write WAL
    // within the idle window; walsafe ships that like any other.
    let s = setup(
        "metrics-idle",
        PgOptions {
            extra_conf: vec!["autovacuum = off".into()],
            ..Default::default()
        },
    );
    let agent = Agent::start(&s.config, s.settings.metrics_port);
    s.pg.psql("CREATE TABLE marks (i int)");
    for i in 0..5 {
        s.pg.psql(&format!("INSERT INTO marks VALUES ({i})"));
        std::thread::sleep(Duration::from_millis(300));
    }
    write_wal(&s.pg, 2);
    s.pg.psql("CHECKPOINT");
    agent.wait_archived(current_lsn(&s.pg), Duration::from_secs(30));
    let m = agent.metrics();
    let puts = counter_sum(&m, "walsafe_storage_requests_total", "op=\"put\"");
    let uploads = counter_sum(&m, "walsafe_uploads_total", "result=\"ok\"");
    let up = counter_sum(&m, "walsafe_storage_bytes_total", "direction=\"up\"");
    let uploaded = counter_sum(&m, "walsafe_upload_bytes_total", "");
    assert!(
        uploads > 0.0 && puts >= uploads,
        "every upload is a put: {puts} puts, {uploads} uploads"
    );
    assert!(
        up >= uploaded && uploaded > 0.0,
        "{up} bytes up, {uploaded} uploaded"
    );

    // Wait until PostgreSQL itself is quiet: its LSN unchanged for 20 s
    // (the background writer logs running transactions every 15 s while
    // anything happened since the last). Then 35 s without WAL must cost
    // nothing; a window in which PostgreSQL wrote a record of its own
    // anyway (walsafe ships it) is discarded and measured again.
    let mut idle_windows = 0;
    let mut after = agent.metrics();
    for _ in 0..3 {
        let mut quiet_from = (current_lsn(&s.pg), Instant::now());
        let settled = wait_until(Duration::from_secs(90), || {
            let now = current_lsn(&s.pg);
            if now != quiet_from.0 {
                quiet_from = (now, Instant::now());
            }
            quiet_from.1.elapsed() >= Duration::from_secs(20)
        });
        assert!(settled, "PostgreSQL kept writing WAL");
        agent.wait_archived(quiet_from.0, Duration::from_secs(30));
        let before = agent.metrics();
        std::thread::sleep(Duration::from_secs(35));
        after = agent.metrics();
        if current_lsn(&s.pg) != quiet_from.0 {
            continue;
        }
        idle_windows += 1;
        for op in ["put", "get", "list", "delete", "head"] {
            let label = format!("op=\"{op}\"");
            let (a, b) = (
                counter_sum(&before, "walsafe_storage_requests_total", &label),
                counter_sum(&after, "walsafe_storage_requests_total", &label),
            );
            assert_eq!(b - a, 0.0, "{} {op} requests in 35 idle seconds", b - a);
        }
        break;
    }
    assert_eq!(idle_windows, 1, "PostgreSQL wrote WAL in every window");

    let state = std::fs::read_to_string(s.settings.spool.join("walsafe.state")).unwrap();
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    let window = &state["storage"];
    assert!(window["seconds"].as_f64().unwrap() >= 60.0, "{window}");
    assert_eq!(window["put"].as_f64().unwrap(), puts_in(&after), "{window}");
}

/// Every put the agent made (its window is still its whole life).
fn puts_in(m: &std::collections::HashMap<String, f64>) -> f64 {
    counter_sum(m, "walsafe_storage_requests_total", "op=\"put\"")
}
