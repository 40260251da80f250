//! restore: `walsafe restore DIR …`, the command-line side of
//! [`crate::restore`]: the flags, the target they name, and the report.
//!
//! Exit codes: 0 restored (and, with `--start`, recovered to the target or
//! the end of the archive); 1 refused, failed, or recovery ended short of
//! a target.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::Config;
use crate::restore::{RestoreArgs, Target};

use super::report;

/// The flags of `walsafe restore`.
#[derive(Debug, clap::Args)]
pub struct RestoreOpts {
    /// The data directory to create.
    dir: PathBuf,
    /// The backup to restore: a name from backup-list, or "latest" (the newest that can reach the target).
    #[arg(long, default_value = "latest")]
    backup: String,
    #[command(flatten)]
    target: TargetOpts,
    /// Whether the target itself is included (PostgreSQL's default: true).
    #[arg(long)]
    target_inclusive: Option<bool>,
    /// The timeline to recover along: latest (default), current, or a number.
    #[arg(long, value_parser = parse_timeline)]
    target_timeline: Option<String>,
    /// What the server does at the target: promote, pause (PostgreSQL's default) or shutdown.
    #[arg(long, value_parser = ["promote", "pause", "shutdown"])]
    target_action: Option<String>,
    /// Put the tablespace at OLD (its location on the backed-up server) at NEW instead.
    #[arg(long, value_parser = parse_mapping)]
    tablespace_map: Vec<(PathBuf, PathBuf)>,
    /// Start PostgreSQL on DIR (as postgres when run as root), follow recovery and report where it stopped and the time it took (RTO).
    #[arg(long)]
    start: bool,
    /// The port of the restored server (written into postgresql.auto.conf).
    #[arg(long)]
    port: Option<u16>,
    /// PostgreSQL's programs for --start (default /usr/lib/postgresql/<the backup's major>/bin).
    #[arg(long)]
    pg_bindir: Option<PathBuf>,
}

/// The recovery target flags, shared by `restore` and `drill` (at most one).
#[derive(Debug, clap::Args)]
pub struct TargetOpts {
    /// Recover up to this time (e.g. "2026-12-06 17:05:00+00").
    #[arg(long, group = "target")]
    target_time: Option<String>,
    /// Recover up to this WAL position (e.g. 0/5000028).
    #[arg(long, group = "target")]
    target_lsn: Option<String>,
    /// Recover up to this transaction id.
    #[arg(long, group = "target")]
    target_xid: Option<String>,
    /// Recover up to this restore point (pg_create_restore_point).
    #[arg(long, group = "target")]
    target_name: Option<String>,
    /// "immediate": stop as soon as the backup is consistent.
    #[arg(long = "target", group = "target", value_parser = ["immediate"])]
    target_immediate: Option<String>,
}

impl TargetOpts {
    /// The recovery target the flags name.
    pub fn target(&self) -> anyhow::Result<Target> {
        if let Some(t) = &self.target_time {
            Target::time(t)
        } else if let Some(l) = &self.target_lsn {
            l.parse::<crate::pg::Lsn>()
                .map(Target::Lsn)
                .map_err(|_| anyhow::anyhow!("--target-lsn {l:?} is not an LSN (e.g. 0/5000028)"))
        } else if let Some(x) = &self.target_xid {
            Ok(Target::Xid(x.clone()))
        } else if let Some(n) = &self.target_name {
            Ok(Target::Name(n.clone()))
        } else if self.target_immediate.is_some() {
            Ok(Target::Immediate)
        } else {
            Ok(Target::End)
        }
    }
}

/// `OLD=NEW` of `--tablespace-map`.
fn parse_mapping(text: &str) -> Result<(PathBuf, PathBuf), String> {
    match text.split_once('=') {
        Some((old, new)) if old.starts_with('/') && new.starts_with('/') => {
            Ok((PathBuf::from(old), PathBuf::from(new)))
        }
        _ => Err(format!(
            "{text:?} is not OLD=NEW with two absolute paths (e.g. /srv/ts1=/restore/ts1)"
        )),
    }
}

/// `--target-timeline`: latest, current, or a timeline number (1 or more).
fn parse_timeline(text: &str) -> Result<String, String> {
    match text {
        "latest" | "current" => Ok(text.to_string()),
        n if n.parse::<u32>().is_ok_and(|n| n >= 1) => Ok(n.to_string()),
        _ => Err(format!(
            "{text:?} is not latest, current or a timeline number (e.g. 2)"
        )),
    }
}

/// `walsafe restore`.
pub async fn command(cfg: Config, o: RestoreOpts) -> ExitCode {
    let began = std::time::Instant::now();
    let target = match o.target.target() {
        Ok(t) => t,
        Err(e) => return report(Err(e)),
    };
    let targeted = target != Target::End;
    let args = RestoreArgs {
        dir: o.dir,
        backup: Some(o.backup),
        target,
        inclusive: o.target_inclusive,
        timeline: o.target_timeline,
        action: o.target_action,
        tablespace_map: o.tablespace_map,
        port: o.port,
        tablespaces_under: None,
    };
    let mut progress = super::progress::on_stderr("restore");
    let restored = crate::restore::restore(&cfg, &args, progress.as_mut()).await;
    drop(progress);
    let restored = match restored {
        Ok(r) => r,
        Err(e) => return report(Err(e)),
    };
    println!(
        "restored backup {} ({} .. {} on timeline {}) into {}; wrote recovery.signal and to postgresql.auto.conf:",
        restored.backup.name,
        restored.backup.start_lsn,
        restored.backup.stop_lsn,
        restored.backup.stop_timeline,
        args.dir.display()
    );
    for l in &restored.settings {
        println!("  {l}");
    }
    if !o.start {
        println!(
            "start the server on it (pg_ctl -D {} start) to recover",
            args.dir.display()
        );
        return ExitCode::SUCCESS;
    }
    let r = match crate::restore::start(&restored.backup, &args.dir, o.pg_bindir.as_deref(), began)
        .await
    {
        Ok(r) => r,
        Err(e) => return report(Err(e)),
    };
    println!(
        "recovery ended: {}; last replayed {}, last commit {}, timeline {}; RTO {} (log {})",
        r.outcome,
        r.redo_done_at.as_deref().unwrap_or("?"),
        r.last_commit.as_deref().unwrap_or("none replayed"),
        r.timeline
            .map_or("unchanged".to_string(), |t| t.to_string()),
        crate::report::human_age(r.rto.as_secs_f64()),
        r.log.display()
    );
    match &r.target_line {
        Some(l) => println!("target reached: {l}"),
        None if targeted => {
            eprintln!("walsafe restore: recovery ended before reaching the target: the archive ends earlier (see the log)");
            return ExitCode::FAILURE;
        }
        None => println!("recovered to the end of the archive"),
    }
    ExitCode::SUCCESS
}
