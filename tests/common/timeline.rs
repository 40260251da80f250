//! Restores for the restore and retention tests: one to a target whose
//! rows are read back ([`batches_after`]), and a second timeline — a
//! backup restored with `walsafe restore --start` to a point, promoted
//! onto timeline 2 and archived into the same repository by a second
//! agent ([`Timeline2`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::pg::{PgCluster, TestDir};
use super::setup::{output_text, parse_lsn, Setup};
use super::walsafe::{free_port, walsafe, Agent};

/// Stops the server `walsafe restore --start` started on `dir`, whatever
/// the test's outcome.
pub struct StopOnDrop {
    pub dir: PathBuf,
    pub pg_ctl: PathBuf,
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let mut c = std::process::Command::new(&self.pg_ctl);
        c.arg("-D").arg(&self.dir).args(["-m", "immediate", "stop"]);
        super::pg::as_postgres(&mut c);
        let _ = c.output();
    }
}

/// `walsafe restore DIR ARGS… --start --port P` with `config`: its
/// output, the port, and a guard that stops the server it started.
pub fn restore_started(
    pg: &PgCluster,
    config: &Path,
    dir: &Path,
    args: &[&str],
) -> (std::process::Output, u16, StopOnDrop) {
    let port = free_port();
    let port_s = port.to_string();
    let mut all = vec!["restore", dir.to_str().unwrap()];
    all.extend_from_slice(args);
    all.extend(["--start", "--port", &port_s]);
    let o = walsafe(config, &all);
    let stop = StopOnDrop {
        dir: dir.to_path_buf(),
        pg_ctl: pg.bins().program("pg_ctl"),
    };
    (o, port, stop)
}

/// psql on the server listening on `port` with `pg`'s socket directory
/// (a server restored from `pg`'s backup keeps its configuration).
pub fn psql_on(pg: &PgCluster, port: u16, sql: &str) -> String {
    let o = std::process::Command::new(pg.bins().program("psql"))
        .args(["-XAtq", "-h"])
        .arg(pg.socket_dir())
        .args(["-p", &port.to_string(), "-U", "postgres", "-c", sql])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", output_text(&o));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// Timeline 2, running, with its agent.
pub struct Timeline2<'a> {
    pub port: u16,
    pub config: PathBuf,
    pub agent: Agent,
    pg: &'a PgCluster,
    _stop: StopOnDrop,
}

impl<'a> Timeline2<'a> {
    /// Restores `backup` (or the newest that fits) of `s` into `work` to
    /// `lsn`, promotes it, and starts an agent archiving it into `s`'s
    /// repository. `s`'s own server and agent must be stopped.
    pub fn promote(s: &'a Setup, work: &TestDir, backup: Option<&str>, lsn: &str) -> Timeline2<'a> {
        let data = work.join("timeline-2");
        let mut args = vec!["--target-lsn", lsn, "--target-action", "promote"];
        if let Some(b) = backup {
            args.extend(["--backup", b]);
        }
        let (o, port, stop) = restore_started(&s.pg, &s.config, &data, &args);
        assert_eq!(o.status.code(), Some(0), "{}", output_text(&o));
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("timeline 2"),
            "{}",
            output_text(&o)
        );
        let mut settings = s.settings.clone();
        settings.conninfo = format!(
            "host={} port={port} user=postgres",
            s.pg.socket_dir().display()
        );
        settings.spool = work.join("spool-2");
        settings.metrics_port = free_port();
        let config = settings.write(&work.join("walsafe-2.toml"));
        let agent = Agent::start(&config, settings.metrics_port);
        Timeline2 {
            port,
            config,
            agent,
            pg: &s.pg,
            _stop: stop,
        }
    }

    pub fn psql(&self, sql: &str) -> String {
        psql_on(self.pg, self.port, sql)
    }

    /// Switches the segment and waits until the agent archived it.
    pub fn switch_and_archive(&self) {
        self.psql("SELECT pg_switch_wal()");
        let end = parse_lsn(&self.psql("SELECT pg_current_wal_lsn()"));
        self.agent.wait_archived(end, Duration::from_secs(60));
    }

    pub fn config(&self) -> &Path {
        &self.config
    }
}

/// Restores the newest backup `walsafe restore` picks for `args` (plus
/// `--target-action promote`) and returns the batches present after
/// recovery, with their row counts past one ("1,2×57,3").
pub fn batches_after(config: &std::path::Path, args: &[&str]) -> String {
    let work = TestDir::new("restore-target");
    let dir = work.join("data");
    let mut all = vec![
        "restore",
        dir.to_str().unwrap(),
        "--target-action",
        "promote",
    ];
    all.extend_from_slice(args);
    let o = walsafe(config, &all);
    assert_eq!(o.status.code(), Some(0), "{args:?}: {}", output_text(&o));
    let restored = super::pg::start_restore(&dir, &[]);
    assert_eq!(
        restored.wait_recovery_end(Duration::from_secs(120)),
        super::pg::RecoveryOutcome::Promoted,
        "{args:?}: {}",
        restored.log_tail()
    );
    restored.psql(
        "SELECT string_agg(batch || CASE WHEN n > 1 THEN '×' || n ELSE '' END, ',' ORDER BY batch) \
         FROM (SELECT batch, count(*) n FROM t GROUP BY batch) b",
    )
}
