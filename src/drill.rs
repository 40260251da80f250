//! drill: `walsafe drill`, a real restore that proves a backup restores.
//!
//! 1. **Restore** (with [`crate::restore`]) the chosen backup into a new
//!    directory under `--dir` (default `/var/tmp`), every tablespace
//!    inside it too, never at its original location.
//! 2. **Isolate** the copy: no archiving (a promoted drill must never push
//!    a timeline of its own into the repository), no TCP (Unix socket in
//!    the drill's private directory only), no synchronous standbys, no
//!    JIT; local connections trusted through a `pg_hba` of its own (a
//!    backup without its configuration, as on Debian, gets a minimal one
//!    from the restore).
//! 3. **Recover** to the end of the archive or the target, following the
//!    server's log ([`crate::restore::start`]); as root, PostgreSQL runs as
//!    `postgres`.
//! 4. **Query**: by default a row count of every table of every database
//!    (every heap page read back); or `--query SQL` in `postgres`.
//! 5. **Report and record**: the RTO (command start to end of recovery),
//!    the newest commit recovered and how long before the drill it was, the
//!    WAL replayed, the query's result; written into the repository as
//!    `drills/<time>.json` (enveloped like every object), where `walsafe
//!    status` and the agent's metrics read it. The server is stopped and
//!    the copy removed, whatever happened.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::backup::Progress;
use crate::config::Config;
use crate::pg::Lsn;
use crate::repository::{ObjectName, Repository};
use crate::restore::{PgCtl, RestoreArgs, Target};

/// The result format this code writes and reads.
pub const DRILL_FORMAT: u32 = 1;
/// Lines of a `--query` result kept in the report.
const RESULT_LINES: usize = 100;

/// What `walsafe drill` was asked.
#[derive(Debug, Clone)]
pub struct DrillArgs {
    pub backup: Option<String>,
    pub target: Target,
    pub query: Option<String>,
    pub port: Option<u16>,
    /// Where the throwaway copy goes (a new directory inside).
    pub parent: PathBuf,
    pub bindir: Option<PathBuf>,
}

/// `drills/<time>.json`: what a drill found.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DrillResult {
    pub format: u32,
    /// When the drill began (RFC 3339, UTC).
    pub started_at: String,
    pub success: bool,
    /// Why it failed.
    pub error: Option<String>,
    pub backup: Option<String>,
    /// The target, as asked ("end of the archive", "time 2026-…", …).
    pub target: String,
    /// From the start of the drill to the end of recovery.
    pub rto_seconds: Option<f64>,
    /// The newest commit recovered (PostgreSQL's "last completed
    /// transaction was at log time …").
    pub last_commit: Option<String>,
    /// How long before the drill began that commit was.
    pub recovered_lag_seconds: Option<f64>,
    /// The last position replayed.
    pub last_replayed: Option<String>,
    /// WAL replayed, from the backup's start.
    pub replayed_bytes: Option<u64>,
    /// The timeline recovery ended on.
    pub timeline: Option<u32>,
    pub query: String,
    pub result: Vec<String>,
}

/// Runs a drill (see the module doc). Its result is returned and, when
/// the repository can be written, stored there, failed or not.
pub async fn drill(
    cfg: &Config,
    args: &DrillArgs,
    progress: &mut dyn Progress,
) -> anyhow::Result<DrillResult> {
    let began = Instant::now();
    let now = chrono::Utc::now();
    let stamp = now.format("%Y%m%dT%H%M%S%3fZ").to_string();
    let mut result = DrillResult {
        format: DRILL_FORMAT,
        started_at: now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        success: false,
        error: None,
        backup: None,
        target: describe(&args.target),
        rto_seconds: None,
        last_commit: None,
        recovered_lag_seconds: None,
        last_replayed: None,
        replayed_bytes: None,
        timeline: None,
        query: args
            .query
            .clone()
            .unwrap_or_else(|| "row count of every table of every database".into()),
        result: Vec::new(),
    };
    let work = args
        .parent
        .join(format!("walsafe-drill-{stamp}-{}", std::process::id()));
    let outcome = run(cfg, args, &work, began, &mut result, progress).await;
    if let Err(e) = std::fs::remove_dir_all(&work) {
        if e.kind() != std::io::ErrorKind::NotFound {
            warn!("cannot remove the drill's copy {}: {e}", work.display());
        }
    }
    match outcome {
        Ok(()) => result.success = true,
        Err(e) => result.error = Some(crate::report::error_line(&e)),
    }
    let repo = Repository::open(cfg.repository())?;
    let json = serde_json::to_vec_pretty(&result).expect("a drill result serializes");
    repo.put(&ObjectName::drill(&stamp)?, Bytes::from(json))
        .await
        .with_context(|| format!("cannot store the drill's result in {}", repo.url()))?;
    Ok(result)
}

/// The drill proper; the caller removes `work` afterwards.
async fn run(
    cfg: &Config,
    args: &DrillArgs,
    work: &Path,
    began: Instant,
    result: &mut DrillResult,
    progress: &mut dyn Progress,
) -> anyhow::Result<()> {
    if !args.parent.is_dir() {
        bail!(
            "{} is not a directory: give --dir a directory with room for a copy of the cluster",
            args.parent.display()
        );
    }
    let data = work.join("data");
    let port = match args.port {
        Some(p) => p,
        None => crate::restore::free_port()?,
    };
    let restore_args = RestoreArgs {
        dir: data.clone(),
        backup: args.backup.clone(),
        target: args.target.clone(),
        inclusive: None,
        timeline: None,
        action: (args.target != Target::End).then(|| "promote".to_string()),
        tablespace_map: Vec::new(),
        port: Some(port),
        tablespaces_under: Some(work.join("tablespaces")),
    };
    progress.phase("restoring");
    let restored = crate::restore::restore(cfg, &restore_args, progress).await?;
    result.backup = Some(restored.backup.name.clone());
    isolate(work, &data)?;
    progress.phase("recovering");
    let server = Server {
        data: data.clone(),
        pg_ctl: PgCtl::of(
            restored.backup.pg_version_num / 10000,
            args.bindir.as_deref(),
        )?,
    };
    let recovered =
        crate::restore::start(&restored.backup, &data, args.bindir.as_deref(), began).await;
    let recovered = match recovered {
        Ok(r) => r,
        Err(e) => {
            server.stop();
            return Err(e);
        }
    };
    result.rto_seconds = Some(recovered.rto.as_secs_f64());
    result.last_commit = recovered.last_commit.clone();
    result.recovered_lag_seconds = recovered
        .last_commit
        .as_deref()
        .and_then(|t| crate::restore::Target::time(t).ok())
        .and_then(|t| match t {
            Target::Time(_, at) => Some(at),
            _ => None,
        })
        .map(|at| {
            let started =
                chrono::DateTime::parse_from_rfc3339(&result.started_at).expect("written above");
            (started - at).num_milliseconds().max(0) as f64 / 1000.0
        });
    result.last_replayed = recovered.redo_done_at.clone();
    result.replayed_bytes = recovered
        .redo_done_at
        .as_deref()
        .and_then(|l| l.parse::<Lsn>().ok())
        .map(|l| l.0.saturating_sub(restored.backup.start_lsn.0));
    result.timeline = recovered.timeline;
    if args.target != Target::End && recovered.target_line.is_none() {
        server.stop();
        bail!(
            "recovery ended without reaching the target {}: the archive ends earlier (see {})",
            result.target,
            recovered.log.display()
        );
    }
    progress.phase("querying");
    let queried = query(work, port, args.query.as_deref()).await;
    server.stop();
    result.result = queried?;
    Ok(())
}

/// The drill's copy cut off from everything: see the module doc.
fn isolate(work: &Path, data: &Path) -> anyhow::Result<()> {
    use std::io::Write;
    let hba = work.join("pg_hba.drill.conf");
    std::fs::write(
        &hba,
        "# walsafe drill: the socket is in a private directory\nlocal all all trust\n",
    )?;
    let mut auto = std::fs::OpenOptions::new()
        .append(true)
        .open(data.join("postgresql.auto.conf"))?;
    writeln!(
        auto,
        "# walsafe drill: isolated\narchive_mode = off\nlisten_addresses = ''\nunix_socket_directories = '{}'\nhba_file = '{}'\nsynchronous_standby_names = ''\njit = off\nlogging_collector = off",
        work.display(),
        hba.display()
    )?;
    drop(auto);
    if let Some(pg) = crate::restore::postgres_if_root()? {
        for p in [work, &hba] {
            nix::unistd::chown(p, Some(pg.uid), Some(pg.gid))?;
        }
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(work, std::fs::Permissions::from_mode(0o700))?;
    Ok(())
}

/// The drill's server, stopped when the drill ends.
struct Server {
    data: PathBuf,
    pg_ctl: PgCtl,
}

impl Server {
    fn stop(&self) {
        let stopped = self.pg_ctl.command().and_then(|mut cmd| {
            Ok(cmd
                .arg("-D")
                .arg(&self.data)
                .args(["-m", "fast", "-w", "stop"])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()?)
        });
        if !stopped.is_ok_and(|s| s.success()) {
            warn!(
                "pg_ctl stop of the drill's server on {} failed",
                self.data.display()
            );
        }
    }
}

/// Runs the drill's query; the result as lines.
async fn query(socket_dir: &Path, port: u16, sql: Option<&str>) -> anyhow::Result<Vec<String>> {
    let connect = |db: String| async move {
        let mut c = tokio_postgres::Config::new();
        c.host_path(socket_dir)
            .port(port)
            .user("postgres")
            .dbname(&db)
            .application_name("walsafe drill");
        let (client, conn) = c
            .connect(tokio_postgres::NoTls)
            .await
            .with_context(|| format!("cannot connect to database {db} of the drill's server"))?;
        tokio::spawn(conn);
        anyhow::Ok(client)
    };
    if let Some(sql) = sql {
        let client = connect("postgres".into()).await?;
        let mut lines = Vec::new();
        for m in client
            .simple_query(sql)
            .await
            .with_context(|| format!("the drill's query failed: {sql}"))?
        {
            if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
                let cells: Vec<&str> = (0..r.len()).map(|i| r.get(i).unwrap_or("")).collect();
                lines.push(cells.join("\t"));
            }
        }
        lines.truncate(RESULT_LINES);
        return Ok(lines);
    }
    let client = connect("postgres".into()).await?;
    let databases: Vec<String> = client
        .query(
            "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let (mut tables_total, mut rows_total) = (0u64, 0u64);
    let mut lines = Vec::new();
    for db in &databases {
        let c = connect(db.clone()).await?;
        let tables: Vec<String> = c
            .query(
                "SELECT c.oid::regclass::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.relkind IN ('r', 'm') AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
                 AND n.nspname NOT LIKE 'pg_toast%' ORDER BY 1",
                &[],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut rows = 0u64;
        for t in &tables {
            let n: i64 = c
                .query_one(&format!("SELECT count(*) FROM {t}"), &[])
                .await
                .with_context(|| format!("cannot read table {t} of database {db}"))?
                .get(0);
            rows += n as u64;
        }
        lines.push(format!("{db}: {} tables, {rows} rows", tables.len()));
        tables_total += tables.len() as u64;
        rows_total += rows;
    }
    lines.push(format!(
        "total: {} databases, {tables_total} tables, {rows_total} rows",
        databases.len()
    ));
    Ok(lines)
}

fn describe(t: &Target) -> String {
    match t {
        Target::End => "the end of the archive".into(),
        Target::Immediate => "immediate (the backup's consistency)".into(),
        Target::Time(text, _) => format!("time {text}"),
        Target::Lsn(l) => format!("LSN {l}"),
        Target::Xid(x) => format!("xid {x}"),
        Target::Name(n) => format!("restore point {n}"),
    }
}

/// The newest drill result, and the newest successful one.
pub async fn newest(
    repo: &Repository,
) -> anyhow::Result<(Option<DrillResult>, Option<DrillResult>)> {
    let mut newest = None;
    for n in repo.list_drills().await?.into_iter().rev() {
        let bytes = repo
            .get(&n)
            .await?
            .ok_or_else(|| anyhow!("{n} vanished while being read"))?;
        let r: DrillResult =
            serde_json::from_slice(&bytes).with_context(|| format!("{n} is not a drill result"))?;
        if r.success {
            return Ok((Some(newest.unwrap_or_else(|| r.clone())), Some(r)));
        }
        newest.get_or_insert(r);
    }
    Ok((newest, None))
}

/// Sets the `walsafe_last_drill_*` gauges from the newest successful
/// drill in the repository (all 0 when none passed); a failed look-up is
/// logged and leaves them as they were.
pub async fn refresh_metrics(repo: &Repository) {
    match newest(repo).await {
        Ok((_, ok)) => crate::metrics::set_last_drill(
            ok.as_ref()
                .and_then(|r| chrono::DateTime::parse_from_rfc3339(&r.started_at).ok())
                .map_or(0.0, |t| t.timestamp_millis() as f64 / 1000.0),
            ok.as_ref().and_then(|r| r.rto_seconds).unwrap_or(0.0),
            ok.as_ref()
                .and_then(|r| r.recovered_lag_seconds)
                .unwrap_or(0.0),
        ),
        Err(e) => warn!(
            "cannot look up the newest drill: {}",
            crate::report::error_line(&e)
        ),
    }
}
