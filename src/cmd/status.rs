//! status: `walsafe status [--json]`, one screen for the DBA on call.
//!
//! What it gathers, and from where:
//!
//! | part            | source |
//! | --------------- | ------ |
//! | repository      | `walsafe.repo` (URL, pinned system identifier, PostgreSQL major version, segment size, key id) |
//! | archived range  | [`crate::repository::inventory`]: per timeline first/last segment, segment count, gaps |
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

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use serde::Serialize;

use crate::config::Config;
use crate::metrics::Scraped;
use crate::positions::now_ms;
use crate::report::{error_line, human_age, human_bytes};
use crate::repository::inventory::Hole;
use crate::repository::{key, Repository, Store};
use crate::spool::inspect::Listing;
use crate::state::{AgentState, STATE_FILE};

/// Attempts per storage request: a status screen should answer quickly
/// even when storage is down.
pub const STATUS_STORE_ATTEMPTS: u32 = 3;

/// Everything `walsafe status` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub repository: RepositoryStatus,
    pub timelines: Vec<TimelineStatus>,
    pub last_archived: LastArchived,
    pub spool: Listing,
    pub agent: AgentStatus,
    pub backups: BackupsStatus,
    /// The newest restore drill, and the newest that passed.
    pub last_drill: Option<crate::drill::DrillResult>,
    pub last_passed_drill: Option<crate::drill::DrillResult>,
}

/// The base backups in the repository.
#[derive(Debug, Clone, Serialize)]
pub struct BackupsStatus {
    /// The newest complete backup: its name and stop time.
    pub newest: Option<String>,
    pub newest_stop_time: Option<String>,
    pub newest_age_seconds: Option<f64>,
    pub complete: usize,
    /// Backups without a record (interrupted, or running now).
    pub incomplete: usize,
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
    /// What each key protects, counted object by object (encrypted
    /// repositories; the configured current key first).
    pub keys: Vec<KeyUse>,
}

/// The objects and bytes one key protects.
#[derive(Debug, Clone, Serialize)]
pub struct KeyUse {
    pub key_id: String,
    pub objects: u64,
    pub bytes: u64,
    /// It encrypts new objects (the key file's first).
    pub current: bool,
    /// The key file holds it.
    pub in_key_file: bool,
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

/// One hole (see [`crate::repository::inventory::Hole`]).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct GapRange {
    pub from: String,
    pub to: String,
    pub reason: String,
}

impl From<Hole> for GapRange {
    fn from(g: Hole) -> Self {
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
    /// The agent's storage requests and bytes over the last hour (from
    /// its state file).
    pub storage: Option<crate::state::StorageWindow>,
    /// Each repository's progress (from its state file; with several
    /// repositories, `positions` shows the one furthest behind).
    pub repositories: Vec<crate::state::RepositoryProgress>,
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

impl From<&Scraped> for LivePositions {
    fn from(m: &Scraped) -> Self {
        LivePositions {
            connected: m.connected,
            timeline: m.timeline,
            server_lsn: m.server.to_string(),
            received_lsn: m.received.to_string(),
            flushed_lsn: m.flushed.to_string(),
            archived_lsn: m.archived.to_string(),
            archive_lag_bytes: m.lag_bytes,
            archive_lag_seconds: m.lag_seconds,
        }
    }
}

/// Opens the repository for reading: the store with few attempts, and the
/// key when it loads (a key problem is returned, not raised).
fn open_repository(cfg: &Config) -> anyhow::Result<(Repository, Option<String>)> {
    let r = cfg.repository();
    let store = Store::open(&r.url, &r.options, r.retries.min(STATUS_STORE_ATTEMPTS))
        .with_context(|| format!("cannot open the repository {}", r.url))?;
    let (ring, problem) = match &r.key_file {
        Some(p) => match key::load_key_ring(p) {
            Ok(k) => (Some(k), None),
            Err(e) => (None, Some(e.to_string())),
        },
        None => (None, None),
    };
    let repo = Repository::from_parts(store, None, r.compression, r.compression_level);
    Ok((
        match ring {
            Some(ring) => repo.with_ring(ring),
            None => repo,
        },
        problem,
    ))
}

/// What each key protects: the key file's keys (current first), then any
/// key objects need that the key file lacks.
async fn key_uses(repo: &Repository, cfg: &Config) -> anyhow::Result<Vec<KeyUse>> {
    let census = crate::rekey::census(repo)
        .await
        .with_context(|| format!("cannot count the objects per key in {}", repo.url()))?;
    let ring_ids = cfg
        .repository()
        .key_file
        .as_deref()
        .and_then(|p| key::load_key_ring(p).ok())
        .map(|r| r.ids_hex())
        .unwrap_or_default();
    let mut ids = ring_ids.clone();
    ids.extend(census.keys().into_iter().filter(|k| !ring_ids.contains(k)));
    Ok(ids
        .into_iter()
        .map(|id| {
            let t = census.of(&id);
            KeyUse {
                current: ring_ids.first() == Some(&id),
                in_key_file: ring_ids.contains(&id),
                objects: t.objects,
                bytes: t.bytes,
                key_id: id,
            }
        })
        .collect())
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
        keys: Vec::new(),
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
        if d.key_id.is_some() {
            repository.keys = key_uses(&repo, cfg).await?;
        }
        for t in crate::repository::inventory::inventory(&repo)
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
    let spool = crate::spool::inspect::list(&cfg.spool.dir);
    let state = crate::state::read(&cfg.spool.dir);
    let scraped = match &state {
        Some(s) if s.is_live() => None,
        _ => match cfg.metrics.listen {
            Some(addr) => crate::metrics::scrape(addr).await.ok(),
            None => None,
        },
    };
    let agent = agent_status(&cfg.spool.dir, state.as_ref(), scraped.as_ref(), cfg);
    let last_archived = last_archived(state.as_ref(), scraped.as_ref(), &timelines);
    let listed = crate::backup::list(&repo)
        .await
        .with_context(|| format!("cannot list the backups in {}", repo.url()))?;
    let newest = listed.iter().find_map(|(_, r, _, _)| r.as_ref());
    let backups = BackupsStatus {
        newest: newest.map(|r| r.name.clone()),
        newest_stop_time: newest.map(|r| r.stop_time.clone()),
        newest_age_seconds: newest
            .and_then(|r| chrono::DateTime::parse_from_rfc3339(&r.stop_time).ok())
            .map(|t| {
                (chrono::Utc::now().timestamp_millis() - t.timestamp_millis()) as f64 / 1000.0
            }),
        complete: listed.iter().filter(|(_, r, _, _)| r.is_some()).count(),
        incomplete: listed.iter().filter(|(_, r, _, _)| r.is_none()).count(),
    };
    let (last_drill, last_passed_drill) = crate::drill::newest(&repo)
        .await
        .with_context(|| format!("cannot read the drill results in {}", repo.url()))?;
    Ok(Status {
        repository,
        timelines,
        last_archived,
        spool,
        agent,
        backups,
        last_drill,
        last_passed_drill,
    })
}

/// The agent's storage traffic, as an hourly rate once it has a minute of
/// history: what the store bills.
fn storage_line(w: &crate::state::StorageWindow) -> String {
    let ops = format!(
        "put {}, get {}, list {}, delete {}",
        w.put, w.get, w.list, w.delete
    ) + &if w.head > 0 {
        format!(", head {}", w.head)
    } else {
        String::new()
    };
    match w.per_hour(w.requests()) {
        Some(rate) => format!(
            "{rate:.0} requests/hour ({ops}), {}/hour up, {}/hour down, over the last {:.0} min",
            human_bytes(w.per_hour(w.bytes_up).unwrap_or(0.0) as u64),
            human_bytes(w.per_hour(w.bytes_down).unwrap_or(0.0) as u64),
            w.seconds / 60.0
        ),
        None => format!(
            "{} requests ({ops}) since the agent started {:.0} s ago",
            w.requests(),
            w.seconds
        ),
    }
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
            storage: Some(s.storage.clone()),
            repositories: s.repositories.clone(),
        };
    }
    let state_note = match state {
        None => format!("no {STATE_FILE} in {}", spool_dir.display()),
        Some(s) => format!(
            "state file {:.0} s old, pid {} {}",
            s.age_seconds(),
            s.pid,
            if crate::state::process_alive(s.pid) {
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
            positions: Some(LivePositions::from(m)),
            storage: None,
            repositories: Vec::new(),
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
        storage: None,
        repositories: Vec::new(),
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
            lsn: Some(m.archived.to_string()),
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
    for k in &r.keys {
        line(
            "",
            format!(
                "key id {}{}: {} objects, {}",
                k.key_id,
                match (k.current, k.in_key_file) {
                    (true, _) => " (current)",
                    (false, true) => "",
                    (false, false) => " (NOT IN THE KEY FILE)",
                },
                k.objects,
                human_bytes(k.bytes)
            ),
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
    let b = &s.backups;
    line(
        "backups",
        match (&b.newest, b.newest_age_seconds) {
            (Some(n), Some(age)) => format!(
                "newest complete {n}, finished {} ago; {} complete, {} incomplete",
                human_age(age.max(0.0)),
                b.complete,
                b.incomplete
            ),
            _ => format!(
                "no complete base backup ({} incomplete): run walsafe backup",
                b.incomplete
            ),
        },
    );
    line(
        "drills",
        match (&s.last_drill, &s.last_passed_drill) {
            (None, _) => "no restore drill yet: run walsafe drill".to_string(),
            (Some(d), passed) if !d.success => format!(
                "last drill {} FAILED: {}{}",
                d.started_at,
                d.error.as_deref().unwrap_or("?"),
                passed
                    .as_ref()
                    .map(|p| format!("; last passed {}", p.started_at))
                    .unwrap_or_else(|| "; none has passed".into())
            ),
            (Some(d), _) => format!(
                "last drill {} passed: backup {} to {}, RTO {}",
                d.started_at,
                d.backup.as_deref().unwrap_or("?"),
                d.target,
                human_age(d.rto_seconds.unwrap_or(0.0))
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
    if a.repositories.len() > 1 {
        for r in &a.repositories {
            line(
                "",
                format!(
                    "repository {:?}: archived {}, lag {}, {:.1} s, {} segment(s) waiting in the spool{}",
                    r.name,
                    r.archived_lsn,
                    human_bytes(r.archive_lag_bytes),
                    r.archive_lag_seconds,
                    r.pending_segments,
                    if r.stalled { ", STALLED (uploads fail)" } else { "" }
                ),
            );
        }
    }
    if let Some(w) = &a.storage {
        line("storage", storage_line(w));
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
            eprintln!("walsafe status: {}", error_line(&e));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
