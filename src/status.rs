//! status: `walsafe status [--json]`, one screen for the DBA on call.
//!
//! What it gathers, and from where:
//!
//! | part            | source |
//! | --------------- | ------ |
//! | repository      | `walsafe.repo` (URL, pinned system identifier, PostgreSQL major version, segment size, key id) |
//! | archived range  | [`crate::verify::verify`]: per timeline first/last segment, segment count, gaps |
//! | last archived   | the agent's state file (`archived_lsn`, `last_archived_ms`); the newest stored segment otherwise |
//! | spool backlog   | a listing of `[spool] dir`: complete segments not yet stored, `.partial` files, history files |
//! | live positions  | `<spool>/walsafe.state` ([`crate::state`]) when fresh and its pid alive; else a scrape of `[metrics] listen` |
//!
//! Why the state file first: `status` often runs as another user or from a
//! shell where the metrics port is firewalled, while the spool is local.
//! The object store cannot tell when an object was written without an
//! extra request per object (walsafe's `Store::list` returns keys and sizes
//! only), so the age of the last archived WAL comes from the agent's own
//! clock; when no agent ever wrote a state file it is reported as unknown.
//!
//! The command only reads: it opens no spool lock, writes no object, and
//! works with a missing or wrong key (the descriptor and the listing are
//! readable without it; a key problem is shown, not fatal).
//!
//! Exit codes: 0 when the status could be read (whatever it says: a dead
//! agent or a gap is news, not an error of this command), 1 when it could
//! not (configuration, repository unreachable), with the cause on stderr.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::Config;
use crate::pg::walfile::{classify, NameKind};
use crate::pg::Lsn;
use crate::positions::now_ms;
use crate::repository::{key, Repository, Store};
use crate::state::{AgentState, STATE_FILE};
use crate::verify::Gap;

/// Attempts per storage request: a status screen should answer quickly
/// even when storage is down.
pub const STATUS_STORE_ATTEMPTS: u32 = 3;
/// How long the metrics endpoint may take to answer.
pub const METRICS_SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

/// Everything `walsafe status` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub repository: RepositoryStatus,
    pub timelines: Vec<TimelineStatus>,
    pub last_archived: LastArchived,
    pub spool: SpoolStatus,
    pub agent: AgentStatus,
}

/// The repository and what it is pinned to.
#[derive(Debug, Clone, Serialize)]
pub struct RepositoryStatus {
    pub url: String,
    /// False for a repository no agent has pinned yet (no `walsafe.repo`).
    pub pinned: bool,
    /// Decimal string (a u64 exceeds JSON's safe integers).
    pub system_identifier: Option<String>,
    pub pg_version_num: Option<u32>,
    pub segment_size: Option<u64>,
    pub encrypted: Option<bool>,
    /// Key id the repository is encrypted with.
    pub key_id: Option<String>,
    /// Key id of the configured key file, if it loads.
    pub configured_key_id: Option<String>,
    /// A problem with the configured key, if any (missing file, mismatch).
    pub key_problem: Option<String>,
    pub created_at: Option<String>,
}

/// What is stored for one timeline.
#[derive(Debug, Clone, Serialize)]
pub struct TimelineStatus {
    pub timeline: u32,
    pub first: String,
    pub last: String,
    pub segments: usize,
    pub history: bool,
    /// Number of gaps.
    pub gaps: usize,
    pub gap_ranges: Vec<GapRange>,
}

/// One gap (see [`crate::verify::Gap`]).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct GapRange {
    pub from: String,
    pub to: String,
    pub reason: String,
}

impl From<Gap> for GapRange {
    fn from(g: Gap) -> Self {
        GapRange {
            from: g.from,
            to: g.to,
            reason: g.reason,
        }
    }
}

/// The newest archived WAL.
#[derive(Debug, Clone, Serialize)]
pub struct LastArchived {
    /// The agent's archived position (end of WAL contiguously stored).
    pub lsn: Option<String>,
    /// When it last advanced (unix ms), by the agent's clock.
    pub at_ms: Option<u64>,
    pub age_seconds: Option<f64>,
    /// Newest segment stored on the newest timeline.
    pub newest_segment: Option<String>,
    /// Where `lsn` and `at_ms` come from: "agent state file",
    /// "metrics endpoint", or "unknown".
    pub source: String,
}

/// The spool directory's content.
#[derive(Debug, Clone, Serialize, Default)]
pub struct SpoolStatus {
    pub dir: PathBuf,
    pub exists: bool,
    /// Complete segments not yet stored in the repository (the uploader
    /// removes each once stored).
    pub complete_segments: u64,
    pub complete_bytes: u64,
    /// `.partial` files: the segment being filled, and closed ends of
    /// earlier timelines.
    pub partial_files: u64,
    pub partial_bytes: u64,
    pub history_files: u64,
    /// Every file in the directory.
    pub total_bytes: u64,
    /// Why the directory could not be listed, if it could not.
    pub error: Option<String>,
}

/// The agent's liveness and live positions.
#[derive(Debug, Clone, Serialize)]
pub struct AgentStatus {
    pub running: bool,
    /// "state file" or "metrics endpoint" when running.
    pub source: Option<String>,
    pub pid: Option<u32>,
    /// One line for humans: "running (pid 4242, state 0.4 s old)" or
    /// "agent not running (state file 37 s old, pid 4242 gone)".
    pub summary: String,
    pub positions: Option<LivePositions>,
}

/// Positions as the agent sees them.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LivePositions {
    pub connected: bool,
    pub timeline: u32,
    pub server_lsn: String,
    pub received_lsn: String,
    pub flushed_lsn: String,
    pub archived_lsn: String,
    pub archive_lag_bytes: u64,
    pub archive_lag_seconds: f64,
}

impl From<&AgentState> for LivePositions {
    fn from(s: &AgentState) -> Self {
        LivePositions {
            connected: s.connected,
            timeline: s.timeline,
            server_lsn: s.server_lsn.clone(),
            received_lsn: s.received_lsn.clone(),
            flushed_lsn: s.flushed_lsn.clone(),
            archived_lsn: s.archived_lsn.clone(),
            archive_lag_bytes: s.archive_lag_bytes,
            archive_lag_seconds: s.archive_lag_seconds,
        }
    }
}

/// Opens the repository for reading: the store with few attempts, and the
/// key when it loads (a key problem is returned, not raised).
fn open_repository(cfg: &Config) -> anyhow::Result<(Repository, Option<String>)> {
    let r = &cfg.repository;
    let store = Store::open(&r.url, &r.options, r.retries.min(STATUS_STORE_ATTEMPTS))
        .with_context(|| format!("cannot open the repository {}", r.url))?;
    let (key, problem) = match &r.key_file {
        Some(p) => match key::load_key_file(p) {
            Ok(k) => (Some(k), None),
            Err(e) => (None, Some(e.to_string())),
        },
        None => (None, None),
    };
    Ok((
        Repository::from_parts(store, key, r.compression, r.compression_level),
        problem,
    ))
}

/// Gathers the status. Errors only when the repository cannot be read.
pub async fn gather(cfg: &Config) -> anyhow::Result<Status> {
    let (repo, key_problem) = open_repository(cfg)?;
    let descriptor = repo
        .descriptor()
        .await
        .with_context(|| format!("cannot read the repository {}", repo.url()))?;
    let mut repository = RepositoryStatus {
        url: repo.url().to_string(),
        pinned: descriptor.is_some(),
        system_identifier: None,
        pg_version_num: None,
        segment_size: None,
        encrypted: None,
        key_id: None,
        configured_key_id: repo.key_id(),
        key_problem,
        created_at: None,
    };
    let mut timelines = Vec::new();
    if let Some(d) = &descriptor {
        repository.system_identifier = Some(d.system_identifier.to_string());
        repository.pg_version_num = Some(d.pg_version_num);
        repository.segment_size = Some(d.segment_size);
        repository.encrypted = Some(d.key_id.is_some());
        repository.key_id = d.key_id.clone();
        repository.created_at = Some(d.created_at.clone());
        if repository.key_problem.is_none() {
            if let Err(e) = repo.verify_descriptor(d, None) {
                repository.key_problem = Some(e.to_string());
            }
        }
        for t in crate::verify::verify(&repo)
            .await
            .with_context(|| format!("cannot list the archived WAL in {}", repo.url()))?
        {
            timelines.push(TimelineStatus {
                timeline: t.timeline,
                first: t.first,
                last: t.last,
                segments: t.segments,
                history: t.history,
                gaps: t.gaps.len(),
                gap_ranges: t.gaps.into_iter().map(GapRange::from).collect(),
            });
        }
    }
    let spool = spool_status(&cfg.spool.dir);
    let state = crate::state::read(&cfg.spool.dir);
    let scraped = match &state {
        Some(s) if s.is_live() => None,
        _ => match cfg.metrics.listen {
            Some(addr) => scrape_metrics(addr).await.ok(),
            None => None,
        },
    };
    let agent = agent_status(&cfg.spool.dir, state.as_ref(), scraped.as_ref(), cfg);
    let last_archived = last_archived(state.as_ref(), scraped.as_ref(), &timelines);
    Ok(Status {
        repository,
        timelines,
        last_archived,
        spool,
        agent,
    })
}

/// Lists the spool directory (without opening or locking it).
pub fn spool_status(dir: &Path) -> SpoolStatus {
    let mut s = SpoolStatus {
        dir: dir.to_path_buf(),
        ..SpoolStatus::default()
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return s,
        Err(e) => {
            s.exists = true;
            s.error = Some(format!("cannot list {}: {e}", dir.display()));
            return s;
        }
    };
    s.exists = true;
    for entry in entries.flatten() {
        let Ok(meta) = entry.metadata() else {
            continue; // removed by the uploader while we listed
        };
        if !meta.is_file() {
            continue;
        }
        let len = meta.len();
        s.total_bytes += len;
        match classify(&entry.file_name().to_string_lossy()) {
            Some(NameKind::Segment) => {
                s.complete_segments += 1;
                s.complete_bytes += len;
            }
            Some(NameKind::Partial) => {
                s.partial_files += 1;
                s.partial_bytes += len;
            }
            Some(NameKind::History(_)) => s.history_files += 1,
            None => {}
        }
    }
    s
}

fn pid_alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks for the process's existence.
    pid != 0
        && (unsafe { libc::kill(pid as i32, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM))
}

/// Decides whether the agent runs, and says why in one line.
fn agent_status(
    spool_dir: &Path,
    state: Option<&AgentState>,
    scraped: Option<&Scraped>,
    cfg: &Config,
) -> AgentStatus {
    if let Some(s) = state.filter(|s| s.is_live()) {
        return AgentStatus {
            running: true,
            source: Some("state file".into()),
            pid: Some(s.pid),
            summary: format!(
                "running (pid {}, state {:.1} s old)",
                s.pid,
                s.age_seconds()
            ),
            positions: Some(LivePositions::from(s)),
        };
    }
    let state_note = match state {
        None => format!("no {STATE_FILE} in {}", spool_dir.display()),
        Some(s) => format!(
            "state file {:.0} s old, pid {} {}",
            s.age_seconds(),
            s.pid,
            if pid_alive(s.pid) {
                "alive but not updating it (hung, or not walsafe any more?)"
            } else {
                "gone"
            }
        ),
    };
    if let Some(m) = scraped {
        return AgentStatus {
            running: true,
            source: Some("metrics endpoint".into()),
            pid: None,
            summary: format!(
                "running (metrics endpoint {} answers; {state_note})",
                cfg.metrics
                    .listen
                    .map(|a| a.to_string())
                    .unwrap_or_default()
            ),
            positions: Some(m.positions.clone()),
        };
    }
    let metrics_note = match cfg.metrics.listen {
        Some(a) if state.is_none() => format!(", metrics endpoint {a} not answering"),
        _ => String::new(),
    };
    AgentStatus {
        running: false,
        source: None,
        pid: state.map(|s| s.pid),
        summary: format!("agent not running ({state_note}{metrics_note})"),
        positions: None,
    }
}

fn last_archived(
    state: Option<&AgentState>,
    scraped: Option<&Scraped>,
    timelines: &[TimelineStatus],
) -> LastArchived {
    let newest_segment = timelines.last().map(|t| t.last.clone());
    let age = |ms: u64| now_ms().saturating_sub(ms) as f64 / 1000.0;
    // A live agent's state is newest; a dead agent's last state still tells
    // when it last archived something; the metrics endpoint comes next.
    if let Some(s) = state.filter(|s| s.is_live() || scraped.is_none()) {
        let at = (s.last_archived_ms > 0).then_some(s.last_archived_ms);
        return LastArchived {
            lsn: Some(s.archived_lsn.clone()),
            at_ms: at,
            age_seconds: at.map(age),
            newest_segment,
            source: "agent state file".into(),
        };
    }
    if let Some(m) = scraped {
        return LastArchived {
            lsn: Some(m.positions.archived_lsn.clone()),
            at_ms: m.last_archived_ms,
            age_seconds: m.last_archived_ms.map(age),
            newest_segment,
            source: "metrics endpoint".into(),
        };
    }
    LastArchived {
        lsn: None,
        at_ms: None,
        age_seconds: None,
        newest_segment,
        source: "unknown".into(),
    }
}

/// What the metrics endpoint said.
#[derive(Debug, Clone, PartialEq)]
pub struct Scraped {
    pub positions: LivePositions,
    pub last_archived_ms: Option<u64>,
}

/// Scrapes `http://addr/metrics` (HTTP/1.0, no keep-alive).
pub async fn scrape_metrics(addr: std::net::SocketAddr) -> anyhow::Result<Scraped> {
    let addr = if addr.ip().is_unspecified() {
        std::net::SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port())
    } else {
        addr
    };
    let body = tokio::time::timeout(METRICS_SCRAPE_TIMEOUT, async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut text = String::new();
        s.read_to_string(&mut text).await?;
        Ok::<_, std::io::Error>(text)
    })
    .await
    .with_context(|| format!("metrics endpoint {addr} did not answer"))?
    .with_context(|| format!("cannot scrape the metrics endpoint {addr}"))?;
    parse_metrics(&body).with_context(|| format!("metrics endpoint {addr}"))
}

/// Reads walsafe's gauges from a Prometheus text exposition.
pub fn parse_metrics(text: &str) -> anyhow::Result<Scraped> {
    use crate::metrics as m;
    let get = |name: &str| -> Option<f64> {
        text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            (k == name).then(|| v.trim().parse().ok()).flatten()
        })
    };
    let lsn = |name: &str| Lsn(get(name).unwrap_or(0.0) as u64).to_string();
    let flushed = get(m::FLUSHED_LSN_BYTES).ok_or_else(|| {
        anyhow::anyhow!(
            "no {} gauge: is this walsafe's metrics endpoint?",
            m::FLUSHED_LSN_BYTES
        )
    })?;
    Ok(Scraped {
        positions: LivePositions {
            connected: get(m::REPLICATION_CONNECTED) == Some(1.0),
            timeline: get(m::TIMELINE).unwrap_or(0.0) as u32,
            server_lsn: lsn(m::SERVER_LSN_BYTES),
            received_lsn: lsn(m::RECEIVED_LSN_BYTES),
            flushed_lsn: Lsn(flushed as u64).to_string(),
            archived_lsn: lsn(m::ARCHIVED_LSN_BYTES),
            archive_lag_bytes: get(m::ARCHIVE_LAG_BYTES).unwrap_or(0.0) as u64,
            archive_lag_seconds: get(m::ARCHIVE_LAG_SECONDS).unwrap_or(0.0),
        },
        last_archived_ms: get(m::LAST_ARCHIVED_TIMESTAMP_SECONDS)
            .filter(|s| *s > 0.0)
            .map(|s| (s * 1000.0) as u64),
    })
}

/// Bytes for humans: "16.0 MiB".
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} bytes");
    }
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

/// Seconds for humans: "0.4 s", "3 min 7 s", "2 h 5 min".
pub fn human_age(secs: f64) -> String {
    if secs < 60.0 {
        return format!("{secs:.1} s");
    }
    let s = secs as u64;
    if s < 3600 {
        format!("{} min {} s", s / 60, s % 60)
    } else if s < 86400 {
        format!("{} h {} min", s / 3600, (s % 3600) / 60)
    } else {
        format!("{} d {} h", s / 86400, (s % 86400) / 3600)
    }
}

/// The text screen.
pub fn render(s: &Status) -> String {
    let mut out = String::new();
    let mut line = |label: &str, text: String| {
        out.push_str(&format!("{label:<14}{text}\n"));
    };
    let r = &s.repository;
    line("repository", r.url.clone());
    if r.pinned {
        let seg = r.segment_size.unwrap_or(0);
        line(
            "",
            format!(
                "pinned to system identifier {}, PostgreSQL {}, {} segments",
                r.system_identifier.as_deref().unwrap_or("?"),
                r.pg_version_num.map(|v| v / 10000).unwrap_or(0),
                human_bytes(seg)
            ),
        );
        line(
            "",
            match &r.key_id {
                Some(id) => format!("encrypted (key id {id})"),
                None => "not encrypted (checksummed)".into(),
            },
        );
    } else {
        line(
            "",
            "not pinned yet (no walsafe.repo): the agent pins it to its cluster at first run"
                .into(),
        );
    }
    if let Some(p) = &r.key_problem {
        line("", format!("KEY PROBLEM: {p}"));
    }
    if s.timelines.is_empty() {
        line("archived", "nothing yet".into());
    }
    for (i, t) in s.timelines.iter().enumerate() {
        line(
            if i == 0 { "archived" } else { "" },
            format!(
                "timeline {}: {} .. {} ({} segments, {} gap{}{})",
                t.timeline,
                t.first,
                t.last,
                t.segments,
                t.gaps,
                if t.gaps == 1 { "" } else { "s" },
                if t.history {
                    ""
                } else {
                    ", history file missing"
                }
            ),
        );
        for g in &t.gap_ranges {
            line("", format!("  GAP {} .. {}: {}", g.from, g.to, g.reason));
        }
    }
    let la = &s.last_archived;
    line(
        "last archived",
        match (&la.lsn, la.age_seconds) {
            (Some(lsn), Some(age)) => {
                format!("{lsn}, {} ago (from the {})", human_age(age), la.source)
            }
            (Some(lsn), None) => {
                format!("{lsn}, time unknown (nothing archived by this agent run yet)")
            }
            (None, _) => format!(
                "{}; age unknown (no agent state)",
                la.newest_segment
                    .as_ref()
                    .map(|n| format!("segment {n}"))
                    .unwrap_or_else(|| "nothing".into())
            ),
        },
    );
    let sp = &s.spool;
    line(
        "spool",
        if let Some(e) = &sp.error {
            e.clone()
        } else if !sp.exists {
            format!("{} does not exist yet", sp.dir.display())
        } else {
            format!(
                "{}: {} complete segment{} not yet stored ({}), {} .partial ({}), {} in total",
                sp.dir.display(),
                sp.complete_segments,
                if sp.complete_segments == 1 { "" } else { "s" },
                human_bytes(sp.complete_bytes),
                sp.partial_files,
                human_bytes(sp.partial_bytes),
                human_bytes(sp.total_bytes)
            )
        },
    );
    let a = &s.agent;
    line("agent", a.summary.clone());
    if let Some(p) = &a.positions {
        line(
            "",
            format!(
                "{} timeline {}",
                if p.connected {
                    "connected,"
                } else {
                    "NOT connected to PostgreSQL,"
                },
                p.timeline
            ),
        );
        line(
            "",
            format!(
                "server {}  received {}  flushed {}  archived {}",
                p.server_lsn, p.received_lsn, p.flushed_lsn, p.archived_lsn
            ),
        );
        line(
            "",
            format!(
                "lag {}, {:.1} s",
                if p.archive_lag_bytes < 1024 {
                    human_bytes(p.archive_lag_bytes)
                } else {
                    format!(
                        "{} ({} bytes)",
                        human_bytes(p.archive_lag_bytes),
                        p.archive_lag_bytes
                    )
                },
                p.archive_lag_seconds
            ),
        );
    }
    out
}

/// `walsafe status [--json]`.
pub async fn command(cfg: Config, json: bool) -> ExitCode {
    match gather(&cfg).await {
        Ok(s) => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&s).expect("serializable")
                );
            } else {
                print!("{}", render(&s));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("walsafe status: {}", crate::cli::error_line(&e));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_text_is_parsed() {
        let text = "# HELP walsafe_flushed_lsn_bytes x\n\
                    # TYPE walsafe_flushed_lsn_bytes gauge\n\
                    walsafe_flushed_lsn_bytes 83886080\n\
                    walsafe_server_lsn_bytes 83886080\n\
                    walsafe_received_lsn_bytes 83886080\n\
                    walsafe_archived_lsn_bytes 83882000\n\
                    walsafe_archive_lag_bytes 4080\n\
                    walsafe_archive_lag_seconds 0.25\n\
                    walsafe_timeline 2\n\
                    walsafe_replication_connected 1\n\
                    walsafe_last_archived_timestamp_seconds 1763718000.5\n\
                    walsafe_uploads_total{kind=\"chunk\",result=\"ok\"} 7\n";
        let s = parse_metrics(text).unwrap();
        assert_eq!(s.positions.flushed_lsn, "0/5000000");
        assert_eq!(s.positions.archived_lsn, Lsn(83882000).to_string());
        assert_eq!(s.positions.timeline, 2);
        assert!(s.positions.connected);
        assert_eq!(s.positions.archive_lag_bytes, 4080);
        assert_eq!(s.last_archived_ms, Some(1763718000500));
        assert!(parse_metrics("something_else 1\n").is_err());
    }

    #[test]
    fn spool_listing_counts_backlog() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("000000010000000000000003"), vec![0; 100]).unwrap();
        std::fs::write(d.path().join("000000010000000000000004"), vec![0; 100]).unwrap();
        std::fs::write(
            d.path().join("000000010000000000000005.partial"),
            vec![0; 50],
        )
        .unwrap();
        std::fs::write(d.path().join("00000002.history"), b"1\t0/3000000\tx\n").unwrap();
        std::fs::write(d.path().join("walsafe.lock"), b"1\n").unwrap();
        let s = spool_status(d.path());
        assert!(s.exists && s.error.is_none());
        assert_eq!((s.complete_segments, s.complete_bytes), (2, 200));
        assert_eq!((s.partial_files, s.partial_bytes), (1, 50));
        assert_eq!(s.history_files, 1);
        assert_eq!(s.total_bytes, 200 + 50 + 14 + 2);
        let missing = spool_status(&d.path().join("nope"));
        assert!(!missing.exists);
    }

    fn cfg(dir: &Path) -> Config {
        Config::parse(
            &format!(
                "[postgres]\nconninfo = \"host=/tmp\"\n[spool]\ndir = \"{}\"\n[repository]\nurl = \"file://{}\"\n[metrics]\nlisten = \"\"\n",
                dir.join("spool").display(),
                dir.join("repo").display()
            ),
            &dir.join("walsafe.toml"),
        )
        .unwrap()
    }

    #[test]
    fn a_dead_agent_is_named_with_its_pid() {
        let d = tempfile::tempdir().unwrap();
        let c = cfg(d.path());
        // A pid that cannot exist (above pid_max).
        let mut st = AgentState::snapshot(&crate::positions::Positions::default(), true, 0, 0, 0);
        st.pid = 0x3fff_fff0;
        st.updated_ms -= 37_000;
        let a = agent_status(&c.spool.dir, Some(&st), None, &c);
        assert!(!a.running);
        assert_eq!(
            a.summary,
            format!(
                "agent not running (state file 37 s old, pid {} gone)",
                st.pid
            )
        );
        let a = agent_status(&c.spool.dir, None, None, &c);
        assert!(
            !a.running
                && a.summary
                    .starts_with("agent not running (no walsafe.state in")
        );
        let live = AgentState::snapshot(&crate::positions::Positions::default(), true, 0, 0, 0);
        let a = agent_status(&c.spool.dir, Some(&live), None, &c);
        assert!(a.running, "{}", a.summary);
        assert_eq!(a.pid, Some(std::process::id()));
    }

    #[tokio::test]
    async fn fresh_repository_status_renders() {
        crate::durable::set_fsync_enabled(false);
        let d = tempfile::tempdir().unwrap();
        let c = cfg(d.path());
        std::fs::create_dir_all(d.path().join("repo")).unwrap();
        let s = gather(&c).await.unwrap();
        assert!(!s.repository.pinned);
        assert!(s.timelines.is_empty());
        let text = render(&s);
        assert!(text.contains("not pinned yet"), "{text}");
        assert!(text.contains("agent not running"), "{text}");
        assert!(text.contains("does not exist yet"), "{text}");
    }

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(16 << 20), "16.0 MiB");
        assert_eq!(human_bytes(12), "12 bytes");
        assert_eq!(human_age(0.44), "0.4 s");
        assert_eq!(human_age(187.0), "3 min 7 s");
    }
}
