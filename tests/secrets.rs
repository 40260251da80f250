//! No secret in anything walsafe prints, exports or leaves behind.
//!
//! The secrets: the replication role's password (SCRAM over TCP), the S3
//! secret access key, and the repository key (its 64 hex digits, any 16-digit
//! run of them, and the key bytes in base64). Every token is random per run
//! and distinctive, so a hit cannot be a coincidence.
//!
//! walsafe is made to talk, and to fail, in every way a user meets:
//!
//! 1. a working agent (TCP + password, S3, encryption), archiving; then
//!    `wal-fetch`, `wal-verify` (and `status`, `check` where the binary has
//!    them) against it;
//! 2. the same with the password in `PGPASSWORD` and the S3 credentials in
//!    `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` instead of the config;
//! 3. a wrong password (the agent must report the authentication failure);
//! 4. a wrong S3 secret (moto does not verify signatures, so this one
//!    cannot fail; its output is still searched for the wrong secret);
//! 5. `wal-fetch` with bad inputs: a bad name, an absent segment, an
//!    unwritable destination, the wrong key, a malformed conninfo and an
//!    invalid repository option next to the secrets;
//! 6. the S3 server stopped while the agent uploads (upload errors), and
//!    `wal-fetch` against the dead server.
//!
//! Then everything is searched: agent logs (debug level), command stdout
//! and stderr, the metrics exposition of every agent, and the state file
//! of every spool. The search itself is checked on the config and key
//! files, which must contain the secrets.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use base64::Engine;
use common::pg::{chown_postgres, PgCluster, PgOptions, TestDir};
use common::s3::S3Server;
use common::walsafe::{bin, wait_until, walsafe, Agent, Settings};

const ROLE: &str = "walsafe_repl";

fn token(what: &str) -> String {
    format!(
        "{what}{:016x}{:08x}",
        rand::random::<u64>(),
        rand::random::<u32>()
    )
}

/// A secret and the strings that must never be seen.
struct Secret {
    what: &'static str,
    needles: Vec<String>,
    /// Compare case-insensitively (hex).
    fold_case: bool,
}

impl Secret {
    fn plain(what: &'static str, value: &str) -> Secret {
        Secret {
            what,
            needles: vec![value.to_string()],
            fold_case: false,
        }
    }

    /// A repository key: the hex line, every 16-digit run of it, and the
    /// bytes in base64 (standard and URL-safe, padded or not).
    fn key(what: &'static str, hex_digits: &str) -> Vec<Secret> {
        let bytes = hex::decode(hex_digits).expect("64 hex digits");
        assert_eq!(bytes.len(), 32);
        let mut hexes: Vec<String> = (0..=hex_digits.len() - 16)
            .map(|i| hex_digits[i..i + 16].to_string())
            .collect();
        hexes.push(hex_digits.to_string());
        let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
        let b64url = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&bytes);
        vec![
            Secret {
                what,
                needles: hexes,
                fold_case: true,
            },
            Secret {
                what,
                needles: vec![b64.clone(), b64.trim_end_matches('=').to_string(), b64url],
                fold_case: false,
            },
        ]
    }

    /// The first needle found in `text`.
    fn find_in(&self, text: &str) -> Option<&str> {
        let hay = if self.fold_case {
            text.to_ascii_lowercase()
        } else {
            text.to_string()
        };
        self.needles
            .iter()
            .find(|n| {
                if self.fold_case {
                    hay.contains(&n.to_ascii_lowercase())
                } else {
                    hay.contains(n.as_str())
                }
            })
            .map(String::as_str)
    }
}

/// Everything walsafe emitted, by where it came from.
#[derive(Default)]
struct Evidence(Vec<(String, String)>);

impl Evidence {
    fn add(&mut self, where_: impl Into<String>, text: impl Into<String>) {
        self.0.push((where_.into(), text.into()));
    }

    fn output(&mut self, where_: &str, o: &std::process::Output) {
        self.add(
            format!("{where_} stdout"),
            String::from_utf8_lossy(&o.stdout),
        );
        self.add(
            format!("{where_} stderr"),
            String::from_utf8_lossy(&o.stderr),
        );
    }

    /// The exposition of a running agent, if it serves one.
    fn metrics(&mut self, where_: &str, port: u16) -> Option<String> {
        let text = exposition(port)?;
        self.add(format!("{where_} metrics"), text.clone());
        Some(text)
    }

    fn state_file(&mut self, where_: &str, spool: &Path) {
        if let Ok(t) = std::fs::read_to_string(spool.join("walsafe.state")) {
            self.add(format!("{where_} state file"), t);
        }
    }

    fn total_bytes(&self) -> usize {
        self.0.iter().map(|(_, t)| t.len()).sum()
    }
}

fn exposition(port: u16) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    Some(body)
}

fn current_lsn(pg: &PgCluster) -> u64 {
    let t = pg.psql("SELECT pg_current_wal_lsn()");
    let (hi, lo) = t.split_once('/').unwrap();
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

/// `walsafe keygen` into `path`; returns the key's hex digits.
fn keygen(path: &Path) -> String {
    let o = std::process::Command::new(bin())
        .arg("keygen")
        .arg(path)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "keygen: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    chown_postgres(path);
    let text = std::fs::read_to_string(path).unwrap();
    let hex_digits = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("walsafe-key-v1 "))
        .expect("a walsafe-key-v1 line")
        .trim()
        .to_string();
    assert_eq!(hex_digits.len(), 64, "{text}");
    hex_digits
}

/// The subcommands this binary offers (from `--help`).
fn has_command(name: &str) -> bool {
    let o = std::process::Command::new(bin())
        .arg("--help")
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .any(|l| l.trim_start().starts_with(&format!("{name} ")))
}

/// Runs a command that must fail, and keeps what it printed.
fn expect_failure(ev: &mut Evidence, label: &str, cfg: &Path, args: &[&str]) {
    let o = walsafe(cfg, args);
    assert!(
        !o.status.success(),
        "{label}: expected a failure, got success: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    ev.output(label, &o);
}

/// Waits until the agent's log contains `needle` (case-insensitive) or
/// the agent exits.
fn wait_log(agent: &mut Agent, needle: &str, timeout: Duration) -> bool {
    let needle = needle.to_ascii_lowercase();
    wait_until(timeout, || {
        agent.log().to_ascii_lowercase().contains(&needle) || agent.try_wait().is_some()
    }) && agent.log().to_ascii_lowercase().contains(&needle)
}

#[test]
fn no_secret_in_logs_metrics_errors_or_state() {
    let password = token("pwSecret");
    let wrong_password = token("pwWrong");
    let s3_secret = token("s3Secret");
    let wrong_s3_secret = token("s3Wrong");
    let access_key = token("AKIAwalsafe");

    let mut s3 = S3Server::start();
    let pg = PgCluster::start(&PgOptions {
        name: "secrets".into(),
        hba: vec![
            format!("host replication {ROLE} 127.0.0.1/32 scram-sha-256"),
            format!("host all {ROLE} 127.0.0.1/32 scram-sha-256"),
        ],
        default_replication_hba: false,
        extra_conf: vec!["password_encryption = 'scram-sha-256'".into()],
        ..Default::default()
    });
    pg.psql(&format!(
        "CREATE ROLE {ROLE} WITH LOGIN REPLICATION PASSWORD '{password}'"
    ));
    let dir = TestDir::new("secrets");
    let key_path = dir.join("repo.key");
    let key_hex = keygen(&key_path);
    let other_key_path = dir.join("other.key");
    let other_key_hex = keygen(&other_key_path);

    let mut secrets = vec![
        Secret::plain("the replication password", &password),
        Secret::plain("the wrong replication password", &wrong_password),
        Secret::plain("the S3 secret access key", &s3_secret),
        Secret::plain("the wrong S3 secret access key", &wrong_s3_secret),
        Secret::plain(
            "the harness's default S3 secret",
            common::s3::SECRET_ACCESS_KEY,
        ),
    ];
    secrets.extend(Secret::key("the repository key", &key_hex));
    secrets.extend(Secret::key("the other repository key", &other_key_hex));

    let s3_options = |secret: &str| -> Vec<(String, String)> {
        s3.repo_options()
            .into_iter()
            .map(|(k, v)| match k.as_str() {
                "aws_secret_access_key" => (k, secret.to_string()),
                "aws_access_key_id" => (k, access_key.clone()),
                _ => (k, v),
            })
            .collect()
    };
    let base = |name: &str, conninfo: String, s3_secret: &str| -> Settings {
        let mut st = Settings::new(dir.path(), &conninfo);
        st.spool = dir.join(format!("spool-{name}"));
        st.repo_url = s3.url("secrets");
        st.repo_options = s3_options(s3_secret);
        st.key_file = Some(key_path.clone());
        st.retries = 2;
        st.connect_timeout = "10s".into();
        st
    };
    let good_conninfo = pg.tcp_conninfo(ROLE, Some(&password));
    let mut ev = Evidence::default();
    let mut configs = Vec::new();

    // 1. Working agent.
    let good = base("good", good_conninfo.clone(), &s3_secret);
    let good_cfg = good.write(&dir.join("good.toml"));
    configs.push(good_cfg.clone());
    let mut agent = Agent::start(&good_cfg, good.metrics_port);
    pg.psql("CREATE TABLE t (i int)");
    pg.psql("INSERT INTO t VALUES (1)");
    pg.psql("SELECT pg_switch_wal()");
    pg.psql("INSERT INTO t VALUES (2)");
    agent.wait_archived(current_lsn(&pg), Duration::from_secs(60));
    let first_segment = format!("00000001{:016X}", 1u64);
    let fetch_dir = dir.subdir("fetched");
    let dest = fetch_dir.join("seg");
    let o = walsafe(
        &good_cfg,
        &["wal-fetch", &first_segment, dest.to_str().unwrap()],
    );
    assert!(
        o.status.success(),
        "wal-fetch of {first_segment}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    ev.output("wal-fetch (working)", &o);
    ev.output("wal-verify (working)", &walsafe(&good_cfg, &["wal-verify"]));
    for cmd in ["status", "check"] {
        if has_command(cmd) {
            ev.output(&format!("{cmd} (working)"), &walsafe(&good_cfg, &[cmd]));
        }
    }
    assert!(
        ev.metrics("working agent", good.metrics_port).is_some(),
        "no metrics from the working agent"
    );
    ev.state_file("working agent", &good.spool);
    let st = agent.terminate();
    assert!(st.success(), "SIGTERM exit: {st}; log:\n{}", agent.log());
    ev.add("working agent log", agent.log());

    // 2. Secrets from the environment instead of the config.
    let mut env_settings = base("env", pg.tcp_conninfo(ROLE, None), "");
    env_settings
        .repo_options
        .retain(|(k, _)| k != "aws_secret_access_key" && k != "aws_access_key_id");
    env_settings.spool = good.spool.clone();
    let env_cfg = env_settings.write(&dir.join("env.toml"));
    configs.push(env_cfg.clone());
    std::env::set_var("PGPASSWORD", &password);
    std::env::set_var("AWS_ACCESS_KEY_ID", &access_key);
    std::env::set_var("AWS_SECRET_ACCESS_KEY", &s3_secret);
    let mut agent = Agent::start(&env_cfg, env_settings.metrics_port);
    pg.psql("INSERT INTO t VALUES (3)");
    agent.wait_archived(current_lsn(&pg), Duration::from_secs(60));
    ev.metrics(
        "agent with secrets from the environment",
        env_settings.metrics_port,
    );
    ev.state_file("agent with secrets from the environment", &good.spool);
    ev.output(
        "wal-verify (environment)",
        &walsafe(&env_cfg, &["wal-verify"]),
    );
    agent.terminate();
    ev.add("agent with secrets from the environment log", agent.log());
    // A wrong password in the environment.
    std::env::set_var("PGPASSWORD", &wrong_password);
    let mut agent = Agent::spawn(&env_cfg, env_settings.metrics_port);
    let refused = wait_log(&mut agent, "authentication failed", Duration::from_secs(20));
    ev.metrics("agent with a wrong PGPASSWORD", env_settings.metrics_port);
    agent.kill9();
    ev.add("agent with a wrong PGPASSWORD log", agent.log());
    assert!(
        refused,
        "the agent with a wrong PGPASSWORD did not report the authentication failure; log:\n{}",
        agent.log()
    );
    for v in ["PGPASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] {
        std::env::remove_var(v);
    }

    // 3. Wrong password in the conninfo.
    let wrong = base(
        "wrong-password",
        pg.tcp_conninfo(ROLE, Some(&wrong_password)),
        &s3_secret,
    );
    let wrong_cfg = wrong.write(&dir.join("wrong-password.toml"));
    configs.push(wrong_cfg.clone());
    let mut agent = Agent::spawn(&wrong_cfg, wrong.metrics_port);
    let refused = wait_log(&mut agent, "authentication failed", Duration::from_secs(20));
    ev.metrics("agent with a wrong password", wrong.metrics_port);
    ev.state_file("agent with a wrong password", &wrong.spool);
    if has_command("check") {
        ev.output("check (wrong password)", &walsafe(&wrong_cfg, &["check"]));
    }
    agent.kill9();
    ev.add("agent with a wrong password log", agent.log());
    assert!(
        refused,
        "the agent with a wrong password did not report the authentication failure; log:\n{}",
        agent.log()
    );

    // 4. Wrong S3 secret (moto accepts any signature).
    let mut wrong_s3 = base("wrong-s3", good_conninfo.clone(), &wrong_s3_secret);
    wrong_s3.spool = good.spool.clone();
    let wrong_s3_cfg = wrong_s3.write(&dir.join("wrong-s3.toml"));
    configs.push(wrong_s3_cfg.clone());
    let mut agent = Agent::spawn(&wrong_s3_cfg, wrong_s3.metrics_port);
    wait_until(Duration::from_secs(20), || {
        common::walsafe::scrape(wrong_s3.metrics_port)
            .and_then(|m| m.get("walsafe_replication_connected").copied())
            == Some(1.0)
    });
    pg.psql("INSERT INTO t VALUES (4)");
    std::thread::sleep(Duration::from_secs(2));
    ev.metrics("agent with a wrong S3 secret", wrong_s3.metrics_port);
    ev.state_file("agent with a wrong S3 secret", &good.spool);
    ev.output(
        "wal-fetch (wrong S3 secret)",
        &walsafe(
            &wrong_s3_cfg,
            &["wal-fetch", &first_segment, dest.to_str().unwrap()],
        ),
    );
    agent.kill9();
    ev.add("agent with a wrong S3 secret log", agent.log());

    // 5. wal-fetch with bad inputs.
    expect_failure(
        &mut ev,
        "wal-fetch of a bad name",
        &good_cfg,
        &["wal-fetch", "not-a-wal-file", dest.to_str().unwrap()],
    );
    expect_failure(
        &mut ev,
        "wal-fetch of an absent segment",
        &good_cfg,
        &[
            "wal-fetch",
            "000000010000000A000000FF",
            dest.to_str().unwrap(),
        ],
    );
    expect_failure(
        &mut ev,
        "wal-fetch into a missing directory",
        &good_cfg,
        &["wal-fetch", &first_segment, "/nonexistent/dir/seg"],
    );
    let mut other_key = good.clone();
    other_key.key_file = Some(other_key_path.clone());
    other_key.spool = dir.join("spool-other-key");
    let other_key_cfg = other_key.write(&dir.join("other-key.toml"));
    configs.push(other_key_cfg.clone());
    expect_failure(
        &mut ev,
        "wal-fetch with the wrong key",
        &other_key_cfg,
        &["wal-fetch", &first_segment, dest.to_str().unwrap()],
    );
    let mut bad_conninfo = good.clone();
    bad_conninfo.conninfo =
        format!("host=127.0.0.1 port=notaport user={ROLE} password='{password}' sslmode=bogus");
    bad_conninfo.spool = dir.join("spool-bad-conninfo");
    let bad_conninfo_cfg = bad_conninfo.write(&dir.join("bad-conninfo.toml"));
    configs.push(bad_conninfo_cfg.clone());
    let mut agent = Agent::spawn(&bad_conninfo_cfg, bad_conninfo.metrics_port);
    wait_until(Duration::from_secs(15), || agent.try_wait().is_some());
    agent.kill9();
    ev.add("agent with a malformed conninfo log", agent.log());
    assert!(
        !agent.log().trim().is_empty(),
        "the agent with a malformed conninfo said nothing"
    );
    let mut bad_option = good.clone();
    bad_option
        .repo_options
        .push(("aws_no_such_option".into(), s3_secret.clone()));
    bad_option.spool = dir.join("spool-bad-option");
    let bad_option_cfg = bad_option.write(&dir.join("bad-option.toml"));
    configs.push(bad_option_cfg.clone());
    expect_failure(
        &mut ev,
        "wal-fetch with an unknown repository option",
        &bad_option_cfg,
        &["wal-fetch", &first_segment, dest.to_str().unwrap()],
    );

    // 6. Storage outage while the agent uploads.
    let mut agent = Agent::start(&good_cfg, good.metrics_port);
    s3.stop();
    pg.psql("INSERT INTO t SELECT g FROM generate_series(1, 1000) g");
    pg.psql("SELECT pg_switch_wal()");
    pg.psql("INSERT INTO t VALUES (5)");
    let failed = wait_until(Duration::from_secs(90), || {
        common::walsafe::scrape(good.metrics_port).is_some_and(|m| {
            m.iter().any(|(k, v)| {
                k.starts_with("walsafe_uploads_total") && k.contains("error") && *v > 0.0
            })
        })
    });
    ev.metrics("agent during a storage outage", good.metrics_port);
    ev.state_file("agent during a storage outage", &good.spool);
    let o = walsafe(
        &good_cfg,
        &["wal-fetch", &first_segment, dest.to_str().unwrap()],
    );
    let code = o.status.code();
    ev.output("wal-fetch during a storage outage", &o);
    ev.output(
        "wal-verify during a storage outage",
        &walsafe(&good_cfg, &["wal-verify"]),
    );
    for cmd in ["status", "check"] {
        if has_command(cmd) {
            ev.output(
                &format!("{cmd} during a storage outage"),
                &walsafe(&good_cfg, &[cmd]),
            );
        }
    }
    agent.kill9();
    ev.add("agent during a storage outage log", agent.log());
    assert!(
        failed,
        "no upload error counted with the S3 server stopped; log:\n{}",
        agent.log()
    );
    assert!(
        code.is_some_and(|c| c >= 126),
        "wal-fetch with storage down exited {code:?}, expected >= 126: {}",
        String::from_utf8_lossy(&o.stderr)
    );

    // The search works: the config and key files do hold the secrets.
    let configs_text: String = configs
        .iter()
        .map(|c| std::fs::read_to_string(c).unwrap())
        .collect();
    for (what, value) in [
        ("password", password.as_str()),
        ("wrong password", wrong_password.as_str()),
        ("S3 secret", s3_secret.as_str()),
        ("wrong S3 secret", wrong_s3_secret.as_str()),
    ] {
        let s = secrets
            .iter()
            .find(|s| s.needles.iter().any(|n| n == value))
            .unwrap();
        assert!(
            s.find_in(&configs_text).is_some(),
            "the search does not find the {what} in the config files"
        );
    }
    let key_text = std::fs::read_to_string(&key_path).unwrap();
    assert!(secrets
        .iter()
        .filter(|s| s.what == "the repository key" && s.fold_case)
        .all(|s| s.find_in(&key_text.to_uppercase()).is_some()));
    assert!(
        ev.0.len() > 30 && ev.total_bytes() > 10_000,
        "too little evidence gathered: {} sources, {} bytes",
        ev.0.len(),
        ev.total_bytes()
    );

    eprintln!(
        "searching {} outputs ({} bytes) for {} secrets",
        ev.0.len(),
        ev.total_bytes(),
        secrets.len()
    );
    let mut leaks = Vec::new();
    for (where_, text) in &ev.0 {
        for s in &secrets {
            if let Some(n) = s.find_in(text) {
                let at = text
                    .to_ascii_lowercase()
                    .find(&n.to_ascii_lowercase())
                    .unwrap();
                let from = text[..at]
                    .char_indices()
                    .rev()
                    .nth(80)
                    .map_or(0, |(i, _)| i);
                let to = (at + n.len() + 40).min(text.len());
                let to = (to..=text.len())
                    .find(|&i| text.is_char_boundary(i))
                    .unwrap();
                leaks.push(format!("{} in {where_}: …{}…", s.what, &text[from..to]));
            }
        }
    }
    assert!(
        leaks.is_empty(),
        "secrets leaked ({} finds):\n{}",
        leaks.len(),
        leaks.join("\n")
    );
}
