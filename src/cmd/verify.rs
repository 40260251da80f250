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

/// `walsafe wal-verify [--json]`.
pub async fn command(cfg: Config, json: bool) -> ExitCode {
    let result = async {
        let repo = Repository::open(&cfg.repository)?;
        inventory(&repo).await
    }
    .await;
    match result {
        Err(e) => {
            eprintln!("walsafe wal-verify: {}", error_line(&e));
            ExitCode::from(EXIT_VERIFY_ERROR)
        }
        Ok(report) => {
            let gaps: usize = report.iter().map(|t| t.gaps.len()).sum();
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "timelines": report, "gaps": gaps })
                );
            } else {
                for t in &report {
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
            ExitCode::from(u8::from(gaps > 0))
        }
    }
}
