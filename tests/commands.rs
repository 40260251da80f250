//! `walsafe status` and `walsafe check` against a real PostgreSQL 15 and the
//! walsafe binary (run as the postgres user, like production): a healthy
//! setup, a live and a killed agent, and one misconfiguration per test,
//! each asserting the FAILED line, its fix and the exit code.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::pg::{chown_postgres, PgCluster, PgOptions};
use common::setup::{parse_lsn, setup, Setup};
use common::walsafe::{wait_until, walsafe, Agent, Settings};
use walsafe::pg::ClusterIdentity;
use walsafe::repository::Compression;
use walsafe::repository::{Key, Repository, Store};

impl Setup {
    /// Rewrites the config after changing the settings.
    fn rewrite(&mut self, f: impl FnOnce(&mut Settings)) {
        f(&mut self.settings);
        self.config = self.settings.write(&self.dir.join("walsafe.toml"));
    }

    fn identity(&self) -> ClusterIdentity {
        ClusterIdentity::new(
            self.pg.system_identifier(),
            self.pg.psql("SHOW server_version_num").parse().unwrap(),
            self.pg.segment_size(),
        )
    }

    /// Pins the (file://) repository with the library, as another agent
    /// would have, and hands its files to postgres.
    fn pin_repository(&self, identity: ClusterIdentity, key: Option<Key>) {
        let repo_dir = self.dir.join("repo");
        std::fs::create_dir_all(&repo_dir).unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let store = Store::open(&self.settings.repo_url, &BTreeMap::new(), 1).unwrap();
            Repository::from_parts(store, key, Compression::Zstd, 1)
                .pin(&identity)
                .await
                .unwrap();
        });
        chown_postgres(&repo_dir);
    }
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `walsafe check`; asserts it failed, with `failed` on a FAILED line
/// and `fix` on the `fix:` line right after it. Returns the output.
fn check_fails_with(config: &Path, failed: &str, fix: &str) -> String {
    let out = walsafe(config, &["check"]);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    let so = stdout(&out);
    let lines: Vec<&str> = so.lines().collect();
    let i = lines
        .iter()
        .position(|l| l.starts_with("FAILED  ") && l.contains(failed))
        .unwrap_or_else(|| panic!("no FAILED line containing {failed:?}:\n{all}"));
    let next = lines.get(i + 1).copied().unwrap_or("");
    assert!(
        next.trim_start().starts_with("fix: ") && next.contains(fix),
        "the fix after {failed:?} should contain {fix:?}, got {next:?}:\n{all}"
    );
    assert!(
        so.lines()
            .last()
            .unwrap_or("")
            .starts_with("walsafe check: "),
        "summary line missing:\n{all}"
    );
    so
}

fn write_wal(pg: &PgCluster) {
    pg.psql("CREATE TABLE IF NOT EXISTS filler (id bigserial, pad text)");
    pg.psql(
        "INSERT INTO filler (pad) SELECT repeat(md5(g::text), 30) FROM generate_series(1, 2000) g",
    );
}

#[test]
fn status_shows_the_live_agent_then_says_it_is_gone() {
    let s = setup("status", PgOptions::default());
    let mut agent = Agent::start(&s.config, s.settings.metrics_port);
    write_wal(&s.pg);
    s.pg.psql("SELECT pg_switch_wal()");
    write_wal(&s.pg);
    let end = parse_lsn(&s.pg.psql("SELECT pg_current_wal_lsn()"));
    agent.wait_archived(end, Duration::from_secs(60));
    // The state file is rewritten every second.
    assert!(wait_until(Duration::from_secs(5), || {
        walsafe::state::read(&s.settings.spool)
            .and_then(|st| st.archived())
            .is_some_and(|a| a.0 >= end)
    }));

    let out = walsafe(&s.config, &["status"]);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    let so = stdout(&out);
    let pid = agent.pid();
    assert!(so.contains(&format!("running (pid {pid}, state")), "{all}");
    assert!(so.contains("connected, timeline 1"), "{all}");
    for word in ["server ", "received ", "flushed ", "archived ", "lag "] {
        assert!(so.contains(word), "{word:?} missing:\n{all}");
    }
    assert!(
        so.contains("archived      timeline 1: 000000010000000000000001 .. "),
        "{all}"
    );
    assert!(so.contains("0 gaps"), "{all}");
    assert!(
        so.contains(&format!(
            "pinned to system identifier {}",
            s.pg.system_identifier()
        )),
        "{all}"
    );
    assert!(so.contains("not encrypted"), "{all}");
    assert!(so.contains(" ago (from the agent state file)"), "{all}");
    // The agent's storage traffic: it stored segments and chunks, and
    // the agent is younger than a minute, so counts, not a rate yet.
    let storage = so
        .lines()
        .find(|l| l.starts_with("storage"))
        .unwrap_or_else(|| panic!("no storage line:\n{all}"));
    assert!(
        storage.contains(" requests (put ") && storage.contains("since the agent started"),
        "{all}"
    );

    // JSON: parses, and agrees with the repository (wal-verify) and the agent.
    let out = walsafe(&s.config, &["status", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status --json is JSON");
    let verify = walsafe(&s.config, &["wal-verify", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&verify.stdout).unwrap();
    assert_eq!(
        j["timelines"][0]["first"], v["timelines"][0]["first"],
        "{j}"
    );
    assert_eq!(j["timelines"][0]["last"], v["timelines"][0]["last"], "{j}");
    assert_eq!(
        j["timelines"][0]["segments"], v["timelines"][0]["segments"],
        "{j}"
    );
    assert_eq!(j["timelines"][0]["gaps"], 0, "{j}");
    assert_eq!(
        j["repository"]["system_identifier"],
        s.pg.system_identifier().to_string(),
        "{j}"
    );
    assert_eq!(j["repository"]["segment_size"], 16 << 20, "{j}");
    assert_eq!(j["repository"]["encrypted"], false, "{j}");
    assert_eq!(j["agent"]["running"], true, "{j}");
    assert_eq!(j["agent"]["pid"], pid, "{j}");
    assert_eq!(j["agent"]["positions"]["connected"], true, "{j}");
    let puts = j["agent"]["storage"]["put"].as_u64().unwrap();
    let segments = j["timelines"][0]["segments"].as_u64().unwrap();
    assert!(
        puts > segments,
        "every stored segment was a put, chunks too: {j}"
    );
    let archived = parse_lsn(j["agent"]["positions"]["archived_lsn"].as_str().unwrap());
    let flushed = parse_lsn(j["agent"]["positions"]["flushed_lsn"].as_str().unwrap());
    assert!(archived >= end && flushed >= archived, "{j}");
    assert!(
        j["last_archived"]["age_seconds"].as_f64().unwrap() < 60.0,
        "{j}"
    );
    assert_eq!(j["spool"]["exists"], true, "{j}");

    // Killed: the state file stays behind, its pid is gone.
    agent.kill9();
    let out = walsafe(&s.config, &["status"]);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    let so = stdout(&out);
    assert!(so.contains("agent not running (state file "), "{all}");
    assert!(so.contains(&format!(" s old, pid {pid} gone)")), "{all}");
    assert!(!so.contains("connected, timeline"), "{all}");
    let out = walsafe(&s.config, &["status", "--json"]);
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["agent"]["running"], false, "{j}");
    assert!(j["agent"]["positions"].is_null(), "{j}");
}

#[test]
fn status_fails_when_the_repository_cannot_be_read() {
    let mut s = setup("status-unreach", PgOptions::default());
    // A port nobody listens on: every storage request is refused.
    let port = common::walsafe::free_port();
    s.rewrite(|st| {
        st.repo_url = "s3://nobucket/prefix".into();
        st.repo_options = vec![
            ("aws_endpoint".into(), format!("http://127.0.0.1:{port}")),
            ("aws_allow_http".into(), "true".into()),
            ("aws_access_key_id".into(), "x".into()),
            ("aws_secret_access_key".into(), "y".into()),
            ("aws_region".into(), "us-east-1".into()),
            ("aws_virtual_hosted_style_request".into(), "false".into()),
        ];
        st.retries = 1;
    });
    let out = walsafe(&s.config, &["status"]);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("walsafe status: cannot read the repository s3://nobucket/prefix"),
        "{all}"
    );
}

#[test]
fn check_passes_on_a_healthy_setup_and_sees_the_switched_segment_stored() {
    let s = setup("check-ok", PgOptions::default());
    let _agent = Agent::start(&s.config, s.settings.metrics_port);
    write_wal(&s.pg);

    let out = walsafe(&s.config, &["check"]);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    let so = stdout(&out);
    let items: Vec<&str> = so
        .lines()
        .filter(|l| !l.starts_with("walsafe check:"))
        .collect();
    assert!(items.len() >= 15, "{all}");
    for l in &items {
        assert!(l.starts_with("OK      "), "not OK: {l}\n{all}");
    }
    for name in [
        "PostgreSQL connection",
        "REPLICATION privilege",
        "wal_level",
        "max_wal_senders",
        "replication slot",
        "slot WAL",
        "repository reachable",
        "create-only writes",
        "repository key",
        "pinned cluster",
        "spool writable",
        "spool free space",
    ] {
        assert!(
            so.contains(&format!("OK      {name}: ")),
            "{name} missing:\n{all}"
        );
    }
    assert!(so.contains("in use by the running walsafe agent"), "{all}");
    // The probe object is gone.
    let probes = s.dir.join("repo").join("check");
    assert!(
        !probes.exists() || std::fs::read_dir(&probes).unwrap().next().is_none(),
        "probe left behind"
    );

    let out = walsafe(&s.config, &["check", "--switch-wal"]);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    let so = stdout(&out);
    let line = so
        .lines()
        .find(|l| l.starts_with("OK      switched segment: pg_switch_wal() closed "))
        .unwrap_or_else(|| panic!("no switched segment line:\n{all}"));
    assert!(line.contains("stored in the repository"), "{all}");
    let name = line
        .split("closed ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap();
    assert!(
        s.dir.join("repo").join("wal").join(name).exists(),
        "{name} not in the repository:\n{all}"
    );
}

#[test]
fn check_fails_for_a_role_without_replication() {
    let mut s = setup("check-norepl", PgOptions::default());
    s.pg.psql("CREATE ROLE norepl LOGIN");
    let conninfo = format!(
        "host={} port={} user=norepl",
        s.pg.socket_dir().display(),
        s.pg.port()
    );
    s.rewrite(|st| st.conninfo = conninfo);
    let so = check_fails_with(
        &s.config,
        "REPLICATION privilege: role \"norepl\" lacks the REPLICATION attribute",
        "as a superuser: ALTER ROLE norepl REPLICATION;",
    );
    // The SQL connection still works, so the other PostgreSQL items ran.
    assert!(
        so.contains("OK      wal_level: wal_level = replica"),
        "{so}"
    );
    assert!(so.contains("OK      max_wal_senders: "), "{so}");
    assert!(
        so.contains("WARNING replication slot: slot \"walsafe\" does not exist yet"),
        "{so}"
    );
}

#[test]
fn check_fails_for_wal_level_minimal() {
    let s = setup(
        "check-minimal",
        PgOptions::default()
            .conf("wal_level = minimal")
            .conf("max_wal_senders = 0"),
    );
    let so = check_fails_with(
        &s.config,
        "wal_level: wal_level = minimal",
        "set wal_level = replica and max_wal_senders = 10",
    );
    assert!(
        so.contains("FAILED  max_wal_senders: max_wal_senders = 0"),
        "{so}"
    );
    assert!(so.contains("FAILED  PostgreSQL connection: "), "{so}");
}

#[test]
fn check_fails_for_a_wrong_password() {
    let mut s = setup(
        "check-password",
        PgOptions::default()
            .hba("host all walsafe 127.0.0.1/32 scram-sha-256")
            .hba("host replication walsafe 127.0.0.1/32 scram-sha-256"),
    );
    s.pg.psql("CREATE ROLE walsafe LOGIN REPLICATION PASSWORD 'right horse'");
    let conninfo = s.pg.tcp_conninfo("walsafe", Some("wrong horse"));
    s.rewrite(|st| st.conninfo = conninfo);
    let so = check_fails_with(
        &s.config,
        "PostgreSQL connection: password authentication failed for user \"walsafe\"",
        "ALTER ROLE walsafe PASSWORD",
    );
    // Everything that needs no connection still ran.
    assert!(so.contains("OK      repository reachable: "), "{so}");
    assert!(so.contains("OK      spool directory: "), "{so}");
    assert!(
        so.contains("WARNING SQL connection: refused for the same reason"),
        "{so}"
    );
    assert!(
        so.contains("SKIPPED replication slot: skipped: no connection"),
        "{so}"
    );
}

#[test]
fn check_fails_when_another_process_holds_the_slot() {
    let s = setup("check-slot", PgOptions::default());
    s.pg.psql("SELECT pg_create_physical_replication_slot('walsafe', true)");
    let mut recv =
        s.pg.spawn_pg_receivewal(&s.dir.subdir("receivewal"), Some("walsafe"));
    s.pg.wait_for(
        "SELECT active_pid IS NOT NULL FROM pg_replication_slots WHERE slot_name = 'walsafe'",
        "t",
        Duration::from_secs(30),
    );
    let so = check_fails_with(
        &s.config,
        "replication slot: slot \"walsafe\" is active in another process",
        "pg_terminate_backend(",
    );
    assert!(so.contains("application_name \"pg_receivewal\""), "{so}");
    let _ = recv.kill();
    let _ = recv.wait();
}

#[test]
fn check_fails_for_a_repository_of_another_cluster() {
    let s = setup("check-stranger", PgOptions::default());
    let me = s.identity();
    let stranger = ClusterIdentity {
        system_identifier: me.system_identifier ^ 0x5a5a,
        ..me
    };
    s.pin_repository(stranger, None);
    check_fails_with(
        &s.config,
        &format!(
            "pinned cluster: the repository is pinned to system identifier {}, this cluster is {}",
            stranger.system_identifier, me.system_identifier
        ),
        "point [repository] url at this cluster's own repository",
    );
}

#[test]
fn check_fails_for_a_wrong_key() {
    let mut s = setup("check-key", PgOptions::default());
    let right = Key::generate();
    let wrong = Key::generate();
    let key_path = s.dir.join("wrong.key");
    walsafe::repository::key::write_key_file(&key_path, &wrong).unwrap();
    chown_postgres(&key_path);
    s.pin_repository(s.identity(), Some(right.clone()));
    s.rewrite(|st| st.key_file = Some(key_path));
    check_fails_with(
        &s.config,
        &format!(
            "repository key: the configured key file holds key id {}, the repository is encrypted with key id {}",
            wrong.key_id_hex(),
            right.key_id_hex()
        ),
        &format!("add the key with id {} to [repository] key_file", right.key_id_hex()),
    );
}

#[test]
fn check_fails_when_the_spool_is_not_writable() {
    use std::os::unix::fs::PermissionsExt;
    let mut s = setup("check-spool", PgOptions::default());
    // Owned by root (when the tests run as root), read-only for everyone
    // else: walsafe, running as postgres, cannot create files in it.
    let spool = s.dir.join("readonly-spool");
    std::fs::create_dir(&spool).unwrap();
    std::fs::set_permissions(&spool, std::fs::Permissions::from_mode(0o555)).unwrap();
    s.rewrite(|st| st.spool = spool.clone());
    check_fails_with(
        &s.config,
        &format!(
            "spool writable: cannot create a file in {} as user ",
            spool.display()
        ),
        &format!("chown postgres {}", spool.display()),
    );
}

/// `walsafe config`: the effective configuration, secrets redacted; an
/// invalid file lists every problem and exits 1.
#[test]
fn config_prints_the_effective_configuration_or_every_problem() {
    let dir = common::pg::TestDir::new("config-cmd");
    let settings = Settings::new(
        dir.path(),
        "host=127.0.0.1 port=1 user=walsafe password=not-for-your-eyes",
    );
    let config = settings.write(&dir.join("walsafe.toml"));
    let o = walsafe(&config, &["config"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!out.contains("not-for-your-eyes"), "{out}");
    assert!(out.contains("password=<redacted>"), "{out}");
    assert!(out.contains("hosts: 127.0.0.1 port 1"), "{out}");
    assert!(out.contains("stall_alarm = "), "{out}");

    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[postgres]\nslot = \"Bad-Slot\"\n[archive]\npartial_interval = \"soon\"\n",
    )
    .unwrap();
    let o = walsafe(&bad, &["config"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    for problem in [
        "5 problem(s)",
        "conninfo is missing",
        "\"Bad-Slot\" is not a valid slot name",
        "[spool] dir is missing",
        "[repository] url is missing",
        "partial_interval = \"soon\" is not a duration",
    ] {
        assert!(err.contains(problem), "{problem} missing:\n{err}");
    }
}
