//! `walsafe retain`: the command-line side of [`crate::retain`].
//!
//! Exit codes: 0 planned (dry run) or applied; 1 refused or failed (what
//! was deleted before a failure is in the log; the next run finishes).

use std::process::ExitCode;

use crate::config::Config;
use crate::report::{error_line, human_bytes};
use crate::repository::Repository;
use crate::retain::{self, RetainArgs};

/// `walsafe retain`: every repository, each with its own `retain_window`
/// when it sets one (else `--window`). A repository refused or failed does
/// not stop the others; the exit code says whether any did.
pub async fn command(cfg: Config, args: RetainArgs, apply: bool, json: bool) -> ExitCode {
    let several = cfg.repositories.len() > 1;
    let mut failed = false;
    let mut plans = Vec::new();
    for rc in &cfg.repositories {
        let args = RetainArgs {
            window: rc.retain_window.unwrap_or(args.window),
            keep: args.keep,
        };
        if several && !json {
            println!("repository {:?} ({}):", rc.name, rc.url);
        }
        let result = async {
            let repo = Repository::open(rc)?;
            let plan = retain::plan(&repo, &args, chrono::Utc::now()).await?;
            if !json {
                print(&plan, &args);
            }
            if apply {
                let n = retain::apply(&repo, &plan).await;
                crate::state::note_repository_changed(&cfg.spool.dir);
                let n = n?;
                if !json {
                    println!("deleted {n} objects, {} freed", human_bytes(plan.freed()));
                }
            } else if !json {
                println!(
                    "dry run: nothing was deleted; run again with --apply to delete the above ({})",
                    human_bytes(plan.freed())
                );
            }
            anyhow::Ok(plan)
        }
        .await;
        match result {
            Ok(plan) => plans.push((rc.name.clone(), plan)),
            Err(e) => {
                failed = true;
                let at = if several {
                    format!("repository {:?}: ", rc.name)
                } else {
                    String::new()
                };
                eprintln!("walsafe retain: {at}{}", error_line(&e));
            }
        }
    }
    if json {
        let text = if several {
            let all: Vec<serde_json::Value> = plans
                .iter()
                .map(|(name, plan)| serde_json::json!({ "name": name, "plan": plan }))
                .collect();
            serde_json::to_string_pretty(&serde_json::json!({ "repositories": all }))
        } else {
            match plans.first() {
                Some((_, plan)) => serde_json::to_string_pretty(plan),
                None => Ok(String::new()),
            }
        };
        match text {
            Ok(t) if !t.is_empty() => println!("{t}"),
            Ok(_) => {}
            Err(e) => {
                eprintln!("walsafe retain: {e}");
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn print(plan: &retain::Plan, args: &RetainArgs) {
    println!(
        "window {} (from {}), keeping at least the {} newest",
        humantime::format_duration(args.window),
        plan.window_start,
        args.keep
    );
    println!("keeps {} backups:", plan.kept.len());
    for b in &plan.kept {
        println!(
            "  {}  started {}, timeline {}, {} stored: {}",
            b.name,
            b.start_time,
            b.timeline,
            human_bytes(b.stored_size),
            b.why
        );
    }
    if plan.deleted_backups.is_empty() {
        println!("deletes no backup");
    } else {
        println!("deletes {} backups:", plan.deleted_backups.len());
        for b in &plan.deleted_backups {
            println!(
                "  {}  {} stored: {}",
                b.name,
                human_bytes(b.stored_size),
                b.why
            );
        }
    }
    println!(
        "WAL: deletes {} objects ({}), keeps {} ({}); the oldest kept segment per timeline: {}",
        plan.deleted_wal.len(),
        human_bytes(plan.deleted_wal_size),
        plan.kept_wal_objects,
        human_bytes(plan.kept_wal_size),
        if plan.first_kept_segment.is_empty() {
            "none".to_string()
        } else {
            plan.first_kept_segment.join(", ")
        }
    );
}
