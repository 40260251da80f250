//! `walsafe wal-verify [--json]`: every hole in the repository's WAL, per
//! timeline (see [`crate::repository::inventory`]).
//!
//! Exit codes: 0 no hole, 1 holes, 2 error (WAL-G's wal-verify exits 0
//! whatever it finds; walsafe's does not).

use std::process::ExitCode;

use crate::config::Config;
use crate::report::{error_line, EXIT_VERIFY_ERROR};
use crate::repository::inventory::inventory;
use crate::repository::Repository;

/// `walsafe wal-verify [--json]`: every repository, in order. The exit
/// code is the worst of them.
pub async fn command(cfg: Config, json: bool) -> ExitCode {
    let several = cfg.repositories.len() > 1;
    let mut worst = 0u8;
    let mut reports = Vec::new();
    let mut total = 0;
    for rc in &cfg.repositories {
        let result = async {
            let repo = Repository::open(rc)?;
            inventory(&repo).await
        }
        .await;
        if several && !json {
            println!("repository {:?} ({}):", rc.name, rc.url);
        }
        match result {
            Err(e) => {
                let at = if several {
                    format!("repository {:?}: ", rc.name)
                } else {
                    String::new()
                };
                eprintln!("walsafe wal-verify: {at}{}", error_line(&e));
                worst = worst.max(EXIT_VERIFY_ERROR);
                reports.push(serde_json::json!({ "name": rc.name, "error": error_line(&e) }));
            }
            Ok(report) => {
                let gaps: usize = report.iter().map(|t| t.gaps.len()).sum();
                total += gaps;
                worst = worst.max(u8::from(gaps > 0));
                if !json {
                    print(&report, gaps);
                }
                reports.push(
                    serde_json::json!({ "name": rc.name, "timelines": report, "gaps": gaps }),
                );
            }
        }
    }
    if json {
        if several {
            println!(
                "{}",
                serde_json::json!({ "repositories": reports, "gaps": total })
            );
        } else if let Some(mut r) = reports.pop().filter(|r| r.get("error").is_none()) {
            if let Some(o) = r.as_object_mut() {
                o.remove("name");
            }
            println!("{r}");
        }
    }
    ExitCode::from(worst)
}

fn print(report: &[crate::repository::inventory::TimelineReport], gaps: usize) {
    for t in report {
        println!(
            "timeline {}: {} .. {} ({} segments{})",
            t.timeline,
            t.first,
            t.last,
            t.segments,
            if t.history {
                ""
            } else {
                ", history file MISSING"
            }
        );
        for g in &t.gaps {
            println!("  GAP {} .. {}: {}", g.from, g.to, g.reason);
        }
    }
    println!("{gaps} gap(s)");
}
