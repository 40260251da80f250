//! `walsafe backup`, `walsafe backup-list` and `walsafe backup-verify`:
//! the command-line side of [`crate::backup`].
//!
//! | command | exit codes |
//! | ------- | ---------- |
//! | `backup` | 0 stored with its record; 1 failed or interrupted (nothing offered as a backup) |
//! | `backup-list` | 0 listed; 1 the repository could not be read |
//! | `backup-verify` | 0 all good; 1 problems found (each listed); 2 could not check |

use std::process::ExitCode;
use std::time::Instant;

use crate::backup::{self, verify, BackupArgs};
use crate::config::Config;
use crate::report::{error_line, human_age, human_bytes, EXIT_VERIFY_ERROR};
use crate::repository::Repository;

/// `walsafe backup`.
pub async fn command(cfg: Config, args: BackupArgs) -> ExitCode {
    let started = Instant::now();
    let mut progress = super::progress::on_stderr("base backup");
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("walsafe backup: cannot watch for SIGTERM: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = tokio::select! {
        r = backup::take(&cfg, &args, progress.as_mut()) => r,
        _ = term.recv() => Err(anyhow::anyhow!("stopped by SIGTERM")),
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("stopped by SIGINT")),
    };
    drop(progress);
    match result {
        Ok(r) => {
            crate::state::note_repository_changed(&cfg.spool.dir);
            let secs = started.elapsed().as_secs_f64();
            println!(
                "backup {} complete: {} ({} stored, {:.2}x), {} from {} to {} on timeline {}, {:.1} MiB/s; WAL {} .. {} in the repository",
                r.name,
                human_bytes(r.size),
                human_bytes(r.stored_size),
                r.stored_size as f64 / r.size.max(1) as f64,
                human_age(secs),
                r.start_lsn,
                r.stop_lsn,
                r.stop_timeline,
                r.size as f64 / (1 << 20) as f64 / secs.max(0.001),
                r.wal_first,
                r.wal_last,
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "walsafe backup: {}; no backup record was written, so nothing of this attempt is offered for a restore (its parts are removed by the next backup)",
                error_line(&e)
            );
            ExitCode::FAILURE
        }
    }
}

/// `walsafe backup-list [--json]`.
pub async fn list_command(cfg: Config, json: bool) -> ExitCode {
    let result = async {
        let repo = Repository::open(cfg.repository())?;
        backup::list(&repo).await
    }
    .await;
    let backups = match result {
        Ok(b) => b,
        Err(e) => {
            eprintln!("walsafe backup-list: {}", error_line(&e));
            return ExitCode::FAILURE;
        }
    };
    if json {
        let v: Vec<serde_json::Value> = backups
            .iter()
            .map(|(name, r, parts, stored)| match r {
                Some(r) => serde_json::json!({
                    "name": name, "complete": true, "label": r.label,
                    "start_time": r.start_time, "stop_time": r.stop_time,
                    "start_lsn": r.start_lsn.to_string(), "stop_lsn": r.stop_lsn.to_string(),
                    "timeline": r.stop_timeline.0, "size": r.size, "stored_size": r.stored_size,
                    "wal_first": r.wal_first, "wal_last": r.wal_last,
                    "restorable_from": r.stop_lsn.to_string(),
                }),
                None => serde_json::json!({
                    "name": name, "complete": false, "parts": parts, "stored_size": stored,
                }),
            })
            .collect();
        println!("{}", serde_json::Value::Array(v));
        return ExitCode::SUCCESS;
    }
    if backups.is_empty() {
        println!("no backups in {}", cfg.repository().url);
    }
    for (name, r, parts, stored) in &backups {
        match r {
            Some(r) => println!(
                "{name}  {}  {} .. {}  timeline {}  {} ({} stored)  WAL {} .. {}  restorable from {}  \"{}\"",
                r.start_time,
                r.start_lsn,
                r.stop_lsn,
                r.stop_timeline,
                human_bytes(r.size),
                human_bytes(r.stored_size),
                r.wal_first,
                r.wal_last,
                r.stop_lsn,
                r.label,
            ),
            None => println!(
                "{name}  INCOMPLETE: {parts} part(s), {} stored, no record (interrupted, or still running); never used for a restore",
                human_bytes(*stored)
            ),
        }
    }
    ExitCode::SUCCESS
}

/// `walsafe backup-verify [NAME|latest] [--json]`.
pub async fn verify_command(cfg: Config, name: String, json: bool) -> ExitCode {
    let result = async {
        let repo = Repository::open(cfg.repository())?;
        match verify::resolve(&repo, &name).await? {
            None => Ok(None),
            Some(record) => verify::verify(&repo, &record).await.map(Some),
        }
    }
    .await;
    let report = match result {
        Err(e) => {
            eprintln!("walsafe backup-verify: {}", error_line(&e));
            return ExitCode::from(EXIT_VERIFY_ERROR);
        }
        Ok(None) => {
            let problem = if name == "latest" {
                "there is no complete backup in the repository".to_string()
            } else {
                format!("backup {name} has no record: it is incomplete (interrupted, or still running) or does not exist; see walsafe backup-list")
            };
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "backup": name, "problems": [problem] })
                );
            } else {
                println!("PROBLEM {problem}");
            }
            return ExitCode::from(1);
        }
        Ok(Some(r)) => r,
    };
    if json {
        println!(
            "{}",
            serde_json::to_string(&report).expect("a report serialises")
        );
    } else {
        for p in &report.problems {
            println!("PROBLEM {p}");
        }
        println!(
            "backup {}: {} part(s), {} file(s) against the manifest, {} WAL segment(s): {}",
            report.backup,
            report.parts_checked,
            report.files_checked,
            report.wal_segments_checked,
            if report.problems.is_empty() {
                "all good".to_string()
            } else {
                format!("{} problem(s)", report.problems.len())
            }
        );
    }
    ExitCode::from(u8::from(!report.problems.is_empty()))
}
