//! Colour codes (and progress bars) only where a person reads a terminal:
//! never in PostgreSQL's server log (where `wal-fetch` and `wal-push`
//! write), in journald (the agent's stderr) or in a file, and never with
//! `NO_COLOR`.

mod common;

use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::setup::{current_lsn, setup};
use common::walsafe::{bin_copy, free_port, Agent};

const ESC: u8 = 0x1B;

/// Runs `walsafe --config CONFIG ARGS…` with stderr into a file, debug
/// logging on; returns (exit code, what it wrote to stderr).
fn stderr_to_file(dir: &Path, config: &Path, args: &[&str], cwd: &Path) -> (Option<i32>, Vec<u8>) {
    let path = dir.join(format!("stderr-{}", args.join("-").replace('/', "_")));
    let status = Command::new(bin_copy(dir))
        .arg("--config")
        .arg(config)
        .args(args)
        .current_dir(cwd)
        .env("WALSAFE_LOG", "debug")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&path).unwrap())
        .status()
        .unwrap();
    (status.code(), std::fs::read(&path).unwrap())
}

/// `walsafe ARGS…` on a pseudo-terminal (util-linux `script`), with
/// `NO_COLOR` as given; what the terminal showed.
fn on_a_terminal(dir: &Path, config: &Path, args: &[&str], no_color: Option<&str>) -> Vec<u8> {
    let line = format!(
        "timeout -s INT 2 {} --config {} {}",
        bin_copy(dir).display(),
        config.display(),
        args.join(" ")
    );
    let mut cmd = Command::new("script");
    cmd.args(["-qec", &line, "/dev/null"])
        .env("WALSAFE_LOG", "debug")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null());
    if let Some(v) = no_color {
        cmd.env("NO_COLOR", v);
    }
    let out = cmd
        .output()
        .expect("util-linux `script` runs a command on a pseudo-terminal; install util-linux (bsdutils on Debian)");
    out.stdout
}

#[test]
fn no_colour_codes_unless_a_terminal_reads_them() {
    let s = setup("colour", Default::default());
    let agent = Agent::start(&s.config, s.settings.metrics_port);
    s.pg.psql("CREATE TABLE t (v text); INSERT INTO t VALUES ('x')");
    let seg = s.pg.psql("SELECT pg_walfile_name(pg_switch_wal())");
    agent.wait_archived(current_lsn(&s.pg), Duration::from_secs(60));

    let dir = s.dir.path();
    let dest = s.dir.join("fetched");
    let dest = dest.to_str().unwrap();
    let wal = s.pg.wal_file(&seg);
    let standby = s.dir.subdir("standby-data");
    std::fs::write(standby.join("standby.signal"), "").unwrap();
    let absent = s.dir.join("absent.toml");
    let restored = s.dir.join("restored");
    let restored = restored.to_str().unwrap();
    let mut logged = 0;
    for (config, args, cwd) in [
        (&s.config, vec!["wal-fetch", &seg, dest], dir),
        (&s.config, vec!["wal-push", wal.to_str().unwrap()], dir),
        (&absent, vec!["wal-fetch", &seg, dest], &standby),
        (&s.config, vec!["wal-verify"], dir),
        (&s.config, vec!["status"], dir),
        (&s.config, vec!["check"], dir),
        (&s.config, vec!["config"], dir),
        (&s.config, vec!["backup"], dir),
        (
            &s.config,
            vec!["restore", restored, "--target", "immediate"],
            dir,
        ),
    ] {
        let (code, err) = stderr_to_file(dir, config, &args, cwd);
        assert!(
            !err.contains(&ESC),
            "{args:?} (exit {code:?}) wrote colour codes into a file:\n{}",
            String::from_utf8_lossy(&err)
        );
        logged += err.len();
    }
    assert!(
        logged > 0,
        "the commands logged nothing: the test saw nothing"
    );
    assert!(
        std::path::Path::new(restored).join("backup_label").exists(),
        "the restore ran"
    );
    // A restore on a terminal shows its progress bar (bytes, rate, ETA);
    // into a file (above) it wrote no escape codes.
    let bar = s.dir.join("restored-on-a-terminal");
    let shown = on_a_terminal(
        dir,
        &s.config,
        &["restore", bar.to_str().unwrap(), "--target", "immediate"],
        None,
    );
    assert!(
        String::from_utf8_lossy(&shown).contains("ETA"),
        "no progress bar on a terminal:\n{}",
        String::from_utf8_lossy(&shown)
    );
    let agent_log = std::fs::read(&agent.log).unwrap();
    assert!(!agent_log.is_empty());
    assert!(
        !agent_log.contains(&ESC),
        "the agent wrote colour codes into its log (journald):\n{}",
        String::from_utf8_lossy(&agent_log)
    );

    // On a terminal, colour; with NO_COLOR set, none. The agent of a
    // second configuration logs its attempts to reach a server that is not
    // there for two seconds.
    let mut other = s.settings.clone();
    other.conninfo = format!("host=127.0.0.1 port={} user=postgres", free_port());
    other.spool = s.dir.join("spool-2");
    other.metrics_port = free_port();
    let other = other.write(&s.dir.join("other.toml"));
    let args = ["run"];
    let shown = on_a_terminal(dir, &other, &args, None);
    assert!(
        shown.contains(&ESC),
        "a terminal gets colour:\n{}",
        String::from_utf8_lossy(&shown)
    );
    let plain = on_a_terminal(dir, &other, &args, Some("1"));
    assert!(!plain.is_empty());
    assert!(
        !plain.contains(&ESC),
        "NO_COLOR=1 still coloured:\n{}",
        String::from_utf8_lossy(&plain)
    );
}
