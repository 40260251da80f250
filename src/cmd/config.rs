//! config: `walsafe config`, the effective configuration as the agent
//! will use it: every key with its value or default, what the environment
//! adds (PG* variables resolved into the connection parameters, cloud
//! credentials), secrets redacted. An invalid file never gets here: loading
//! it lists every problem and exits 1.

use std::fmt::Write;

use crate::config::{AckMode, Config};
use crate::durable::{Fsync, NO_FSYNC_ENV};
use crate::pg::conninfo::{redact_password, ConnParams, REDACTED};
use crate::repository::envelope::Compression;
use crate::repository::store::is_secret_name;
use crate::spool::MinFree;

/// `walsafe config`.
pub fn command(cfg: &Config) -> anyhow::Result<()> {
    print!("{}", render(cfg, &|k| std::env::var(k).ok()));
    Ok(())
}

/// The effective configuration as TOML, with comments for what was
/// resolved from the environment; `env` reads the environment.
pub fn render(cfg: &Config, env: &dyn Fn(&str) -> Option<String>) -> String {
    let mut o = String::new();
    let p = &cfg.postgres;
    let _ = writeln!(
        o,
        "# walsafe: effective configuration of {}",
        cfg.path.display()
    );
    let _ = writeln!(o, "\n[postgres]");
    let _ = writeln!(o, "conninfo = {:?}", redact_password(&p.conninfo));
    match ConnParams::parse_with_env(&p.conninfo, env) {
        Ok(c) => {
            let hosts: Vec<String> = c.targets.iter().map(ToString::to_string).collect();
            let _ = writeln!(o, "#   hosts: {}", hosts.join(", "));
            let _ = writeln!(
                o,
                "#   user: {}, dbname: {}, sslmode: {}, target_session_attrs: {}",
                c.user,
                c.dbname.as_deref().unwrap_or("(none)"),
                c.sslmode,
                c.target_session_attrs
            );
            let password = match (&c.password, &c.passfile) {
                (Some(_), _) => "set (conninfo or PGPASSWORD)".to_string(),
                (None, Some(f)) => {
                    format!("from the password file {}, if it has a line", f.display())
                }
                (None, None) => "none".to_string(),
            };
            let _ = writeln!(o, "#   password: {password}");
        }
        Err(e) => {
            let _ = writeln!(o, "#   cannot be resolved: {e}");
        }
    }
    let _ = writeln!(o, "slot = {:?}", p.slot);
    let _ = writeln!(o, "application_name = {:?}", p.application_name);
    let _ = writeln!(
        o,
        "connect_timeout = {:?}",
        humantime::format_duration(p.connect_timeout).to_string()
    );

    let s = &cfg.spool;
    let _ = writeln!(o, "\n[spool]");
    let _ = writeln!(o, "dir = {:?}", s.dir.display().to_string());
    match s.limits.max_size {
        Some(b) => {
            let _ = writeln!(o, "max_size = \"{b}B\"");
        }
        None => {
            let _ = writeln!(o, "# max_size: none (only min_free limits the spool)");
        }
    }
    let min_free = match s.limits.min_free {
        MinFree::Default => "5%\"  # default: 5 % of the filesystem, at most 1 GiB".to_string(),
        MinFree::Fraction(f) => format!("{}%\"", f * 100.0),
        MinFree::Bytes(b) => format!("{b}B\""),
    };
    let _ = writeln!(o, "min_free = \"{min_free}");

    let several = cfg.repositories.len() > 1;
    for r in &cfg.repositories {
        let (table, options) = if several {
            (
                "[[repository]]",
                "[repository.options]  # of the table above",
            )
        } else {
            ("[repository]", "[repository.options]")
        };
        let _ = writeln!(o, "\n{table}");
        let _ = writeln!(o, "name = {:?}", r.name);
        let _ = writeln!(o, "url = {:?}", r.url);
        match &r.key_file {
            Some(k) => {
                let _ = writeln!(o, "key_file = {:?}", k.display().to_string());
            }
            None => {
                let _ = writeln!(
                    o,
                    "# key_file: none (objects are checksummed, not encrypted)"
                );
            }
        }
        let compression = match r.compression {
            Compression::Zstd => "zstd",
            Compression::None => "none",
        };
        let _ = writeln!(o, "compression = {compression:?}");
        let _ = writeln!(o, "compression_level = {}", r.compression_level);
        let _ = writeln!(o, "retries = {}", r.retries);
        let _ = writeln!(
            o,
            "request_timeout = {:?}",
            humantime::format_duration(r.request_timeout).to_string()
        );
        if let Some(w) = r.retain_window {
            let _ = writeln!(
                o,
                "retain_window = {:?}",
                humantime::format_duration(w).to_string()
            );
        }
        if !r.options.is_empty() {
            let _ = writeln!(o, "\n{options}");
            for (k, v) in &r.options {
                let v = if is_secret_name(k) {
                    REDACTED
                } else {
                    v.as_str()
                };
                let _ = writeln!(o, "{k} = {v:?}");
            }
        }
        let cloud = cloud_environment(r.url.as_str(), env);
        if !cloud.is_empty() {
            let _ = writeln!(o, "# from the environment: {}", cloud.join(", "));
        }
    }

    let a = &cfg.archive;
    let _ = writeln!(o, "\n[archive]");
    let _ = writeln!(
        o,
        "partial_interval = {:?}",
        humantime::format_duration(a.partial_interval).to_string()
    );
    let ack = match a.ack {
        AckMode::Local => "local",
        AckMode::Remote => "remote",
    };
    let _ = writeln!(o, "ack = {ack:?}");
    let _ = writeln!(o, "upload_concurrency = {}", a.upload_concurrency);
    let _ = writeln!(
        o,
        "stall_alarm = {:?}",
        humantime::format_duration(a.stall_alarm).to_string()
    );

    let f = &cfg.fetch;
    let _ = writeln!(o, "\n[fetch]");
    let _ = writeln!(o, "prefetch = {}", f.prefetch);
    let _ = writeln!(o, "dir = {:?}", f.dir.display().to_string());
    if let Some((t, l)) = f.recover_to_gap {
        let _ = writeln!(o, "recover_to_gap = \"{t}:{l}\"");
    }

    let _ = writeln!(o, "\n[metrics]");
    let listen = cfg
        .metrics
        .listen
        .map(|a| a.to_string())
        .unwrap_or_default();
    let _ = writeln!(o, "listen = {listen:?}");
    if cfg.fsync == Fsync::Off {
        let _ = writeln!(
            o,
            "\n# WARNING: {NO_FSYNC_ENV} is set: nothing is fsynced, a power cut loses acknowledged WAL (tests only)"
        );
    }
    o
}

/// The cloud variables of the repository's provider that are set, secret
/// ones redacted.
fn cloud_environment(url: &str, env: &dyn Fn(&str) -> Option<String>) -> Vec<String> {
    let names: &[&str] = if url.starts_with("s3://") {
        &[
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_REGION",
            "AWS_DEFAULT_REGION",
            "AWS_ENDPOINT",
            "AWS_EC2_METADATA_DISABLED",
        ]
    } else if url.starts_with("gs://") {
        &[
            "GOOGLE_SERVICE_ACCOUNT",
            "GOOGLE_SERVICE_ACCOUNT_KEY",
            "GOOGLE_APPLICATION_CREDENTIALS",
        ]
    } else if url.starts_with("az://") {
        &[
            "AZURE_STORAGE_ACCOUNT_NAME",
            "AZURE_STORAGE_ACCOUNT_KEY",
            "AZURE_STORAGE_USE_EMULATOR",
        ]
    } else {
        &[]
    };
    names
        .iter()
        .filter_map(|n| {
            let v = env(n)?;
            let shown = if is_secret_name(n) {
                REDACTED.to_string()
            } else {
                v
            };
            Some(format!("{n}={shown}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show() {
        assert_eq!(
            redact_password("host=db password=s3cret user=walsafe"),
            "host=db password=<redacted> user=walsafe"
        );
        assert_eq!(
            redact_password("host=db password = 'a b\\' c' user=w"),
            "host=db password=<redacted> user=w"
        );
        assert_eq!(
            redact_password("passwordless=1 host=x"),
            "passwordless=1 host=x"
        );
        assert_eq!(
            redact_password("postgresql://walsafe:s3cret@db1:5432,db2/?sslmode=require&password=x"),
            "postgresql://walsafe:<redacted>@db1:5432,db2/?sslmode=require&password=<redacted>"
        );
        assert_eq!(redact_password("postgres://db/x"), "postgres://db/x");
    }

    #[test]
    fn the_effective_configuration_names_defaults_and_redacts_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("walsafe.toml");
        let cfg = Config::parse(
            "[postgres]\nconninfo = \"host=db1,db2 port=5432 user=walsafe password=hunter22 target_session_attrs=read-write\"\n\
             [spool]\ndir = \"spool\"\n\
             [repository]\nurl = \"s3://bucket/prefix\"\n[repository.options]\naws_secret_access_key = \"abcdefghijk\"\naws_endpoint = \"http://127.0.0.1:9000\"\n",
            &path,
        )
        .unwrap();
        let env = |k: &str| match k {
            "AWS_ACCESS_KEY_ID" => Some("AKIAEXAMPLE".to_string()),
            "AWS_SECRET_ACCESS_KEY" => Some("very-secret-value".to_string()),
            "PGSSLMODE" => Some("require".to_string()),
            _ => None,
        };
        let text = render(&cfg, &env);
        for secret in ["hunter22", "abcdefghijk", "very-secret-value"] {
            assert!(!text.contains(secret), "{secret} shown:\n{text}");
        }
        for expected in [
            "password=<redacted>",
            "hosts: db1 port 5432, db2 port 5432",
            "sslmode: require",
            "target_session_attrs: read-write",
            "password: set",
            "aws_secret_access_key = \"<redacted>\"",
            "aws_endpoint = \"http://127.0.0.1:9000\"",
            "AWS_ACCESS_KEY_ID=<redacted>",
            "AWS_SECRET_ACCESS_KEY=<redacted>",
            "slot = \"walsafe\"",
            "partial_interval = \"200ms\"",
            "ack = \"local\"",
            "min_free = \"5%\"",
        ] {
            assert!(text.contains(expected), "{expected} missing:\n{text}");
        }
        // What it prints is itself a valid configuration.
        let again = Config::parse(&text, &path).unwrap();
        assert_eq!(again.repository().url, cfg.repository().url);
        assert_eq!(again.archive.partial_interval, cfg.archive.partial_interval);
    }

    #[test]
    fn several_repositories_are_each_shown_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("walsafe.toml");
        let cfg = Config::parse(
            "[postgres]\nconninfo = \"host=db user=walsafe\"\n[spool]\ndir = \"spool\"\n\
             [[repository]]\nurl = \"file:///var/backups/walsafe\"\n\
             [[repository]]\nname = \"offsite\"\nurl = \"s3://bucket/prefix\"\nkey_file = \"k\"\nretain_window = \"30d\"\n\
             [repository.options]\naws_secret_access_key = \"abcdefghijk\"\n",
            &path,
        )
        .unwrap();
        let text = render(&cfg, &|_: &str| None);
        assert!(!text.contains("abcdefghijk"), "{text}");
        assert_eq!(text.matches("[[repository]]").count(), 2, "{text}");
        let again = Config::parse(&text, &path).unwrap();
        let names: Vec<_> = again.repositories.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["file:///var/backups/walsafe", "offsite"]);
        assert_eq!(again.repositories[1].key_file, cfg.repositories[1].key_file);
        assert_eq!(
            again.repositories[1].retain_window,
            Some(std::time::Duration::from_secs(30 * 86400))
        );
        assert_eq!(again.repositories[0].retain_window, None);
        assert!(again.repositories[0].options.is_empty());
    }
}
