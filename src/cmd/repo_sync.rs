//! `walsafe repo-sync --from A --to B`: completes repository B from
//! repository A (see [`crate::repo_sync`]), both named as in the
//! configuration's `[[repository]]` tables.
//!
//! Exit codes: 0 B holds everything A does; 1 some objects could not be
//! copied (each listed); 2 nothing could be compared (a repository
//! unreadable, B of another cluster, a name not configured).

use std::process::ExitCode;
use std::time::Instant;

use anyhow::anyhow;

use crate::config::Config;
use crate::report::error_line;
use crate::repository::Repository;

/// Failures listed in full; the rest are counted.
const FAILURES_SHOWN: usize = 20;

/// `walsafe repo-sync --from A --to B`.
pub async fn command(cfg: Config, from: String, to: String) -> ExitCode {
    let started = Instant::now();
    let result = async {
        let open = |name: &str| {
            let rc = cfg
                .repositories
                .iter()
                .find(|r| r.name == name)
                .ok_or_else(|| {
                    let names: Vec<&str> =
                        cfg.repositories.iter().map(|r| r.name.as_str()).collect();
                    anyhow!(
                        "no repository named {name:?} in {}; the configured ones are {names:?}",
                        cfg.path.display()
                    )
                })?;
            anyhow::Ok(Repository::open(rc)?)
        };
        if from == to {
            return Err(anyhow!("--from and --to name the same repository {from:?}"));
        }
        let (a, b) = (open(&from)?, open(&to)?);
        crate::repo_sync::sync(&a, &b).await
    }
    .await;
    let s = match result {
        Ok(s) => s,
        Err(e) => {
            eprintln!("walsafe repo-sync: {}", error_line(&e));
            return ExitCode::from(2);
        }
    };
    let copied: usize = s.copied.values().sum();
    let kinds: Vec<String> = s.copied.iter().map(|(k, n)| format!("{n} {k}")).collect();
    println!(
        "copied {copied} objects ({:.1} MiB) from {from:?} to {to:?} in {:.1} s{}; {} already there",
        s.bytes as f64 / (1 << 20) as f64,
        started.elapsed().as_secs_f64(),
        if kinds.is_empty() { String::new() } else { format!(": {}", kinds.join(", ")) },
        s.skipped
    );
    if s.failed.is_empty() {
        return ExitCode::SUCCESS;
    }
    eprintln!(
        "walsafe repo-sync: {} object(s) could not be copied; {to:?} is incomplete until they are (copy them from another repository with repo-sync --from, or find out why they are damaged):",
        s.failed.len()
    );
    for f in s.failed.iter().take(FAILURES_SHOWN) {
        eprintln!("  {f}");
    }
    if s.failed.len() > FAILURES_SHOWN {
        eprintln!("  … and {} more", s.failed.len() - FAILURES_SHOWN);
    }
    ExitCode::from(1)
}
