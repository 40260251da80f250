//! `walsafe drill`: the command-line side of [`crate::drill`].
//!
//! Exit codes: 0 the drill passed (its result stored); 1 it failed (the
//! cause printed, and stored when the repository could be written).

use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::Config;
use crate::drill::{self, DrillArgs};
use crate::report::{error_line, human_age, human_bytes};

use super::restore::TargetOpts;

/// The flags of `walsafe drill`.
#[derive(Debug, clap::Args)]
pub struct DrillOpts {
    /// The backup to restore: a name from backup-list, or "latest" (the newest that can reach the target).
    #[arg(long, default_value = "latest")]
    backup: String,
    #[command(flatten)]
    target: TargetOpts,
    /// SQL to run in the restored database "postgres" (default: a row count of every table of every database).
    #[arg(long)]
    query: Option<String>,
    /// The restored server's port (default: a free one; it listens on a Unix socket in the drill's directory only).
    #[arg(long)]
    port: Option<u16>,
    /// Where the throwaway copy goes (needs room for the whole cluster); removed afterwards.
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// PostgreSQL's programs (default /usr/lib/postgresql/<the backup's major>/bin).
    #[arg(long)]
    pg_bindir: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// `walsafe drill`.
pub async fn command(cfg: Config, o: DrillOpts) -> ExitCode {
    let target = match o.target.target() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("walsafe drill: {}", error_line(&e));
            return ExitCode::FAILURE;
        }
    };
    let args = DrillArgs {
        backup: Some(o.backup),
        target,
        query: o.query,
        port: o.port,
        parent: o.dir,
        bindir: o.pg_bindir,
    };
    let mut progress = super::progress::on_stderr("drill");
    let result = drill::drill(&cfg, &args, progress.as_mut()).await;
    drop(progress);
    let r = match result {
        Ok(r) => {
            crate::state::note_repository_changed(&cfg.spool.dir);
            r
        }
        Err(e) => {
            eprintln!("walsafe drill: {}", error_line(&e));
            return ExitCode::FAILURE;
        }
    };
    if o.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&r).expect("a drill result serializes")
        );
    } else {
        println!(
            "drill {}: backup {} to {}",
            if r.success { "PASSED" } else { "FAILED" },
            r.backup.as_deref().unwrap_or("(none chosen)"),
            r.target
        );
        if let Some(rto) = r.rto_seconds {
            println!(
                "  RTO {} (command start to end of recovery); replayed {} of WAL to {} on timeline {}",
                human_age(rto),
                human_bytes(r.replayed_bytes.unwrap_or(0)),
                r.last_replayed.as_deref().unwrap_or("?"),
                r.timeline.map_or("?".to_string(), |t| t.to_string())
            );
            println!(
                "  newest commit recovered: {}{}",
                r.last_commit.as_deref().unwrap_or("none replayed"),
                r.recovered_lag_seconds
                    .map(|l| format!(", {} before the drill began", human_age(l)))
                    .unwrap_or_default()
            );
        }
        if !r.result.is_empty() {
            println!("  {}:", r.query);
            for l in &r.result {
                println!("    {l}");
            }
        }
    }
    match &r.error {
        None => ExitCode::SUCCESS,
        Some(e) => {
            eprintln!("walsafe drill: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}
