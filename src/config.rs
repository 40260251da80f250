//! The configuration file (TOML), read and validated once at start-up.
//!
//! The keys of the documented contract (README's Configuration) keep their names; every other key has a default,
//! given here as a named constant. Relative paths are resolved against the
//! directory of the configuration file, so a config and its spool can move
//! together. Validation reports every problem at once, each with its fix.
//!
//! ```toml
//! [postgres]
//! conninfo = "host=/var/run/postgresql user=walsafe"
//! slot = "walsafe"
//! application_name = "walsafe"     # for synchronous_standby_names
//!
//! [spool]
//! dir = "/var/lib/walsafe/spool"
//! max_size = "64GB"                 # optional cap on the spool's files
//! min_free = "5%"                   # free space left on its filesystem (or e.g. "20GB");
//!                                   # default 5 %, at most 1 GiB
//!
//! [repository]
//! url = "file:///var/backups/walsafe"
//! key_file = "/etc/walsafe/repository.key"
//! compression = "zstd"
//! compression_level = 1
//! retries = 8
//! request_timeout = "60s"           # one storage request, then it is retried
//! [repository.options]              # passed to object_store, e.g.
//! aws_endpoint = "http://127.0.0.1:9000"
//!
//! [archive]
//! partial_interval = "200ms"
//! ack = "local"                     # or "remote"
//! upload_concurrency = 2
//! stall_alarm = "30s"               # no upload progress this long: an error
//!
//! [fetch]
//! prefetch = 8
//! dir = "/var/lib/walsafe/prefetch"
//! recover_to_gap = "1:0/5123456"   # optional, see FetchConfig::recover_to_gap
//!
//! [metrics]
//! listen = "127.0.0.1:9851"
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::durable::Fsync;
use crate::pg::replication::parse_size_setting;
use crate::pg::{Lsn, TimelineId};
use crate::repository::store::DEFAULT_REQUEST_TIMEOUT;
use crate::repository::{Compression, RepositoryConfig};
use crate::spool::{Limits, MinFree, DEFAULT_LIMITS};

/// Where the configuration is read from when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/walsafe/walsafe.toml";
/// Physical replication slot name when none is configured.
pub const DEFAULT_SLOT: &str = "walsafe";
/// `application_name` walsafe announces (name it in `synchronous_standby_names`).
pub const DEFAULT_APPLICATION_NAME: &str = "walsafe";
/// Interval between uploads of a still-filling segment's new bytes.
pub const DEFAULT_PARTIAL_INTERVAL: Duration = Duration::from_millis(200);
/// zstd level: 1 keeps pace with PostgreSQL's WAL rate on one core.
pub const DEFAULT_COMPRESSION_LEVEL: i32 = 1;
/// Time without upload progress, while WAL waits, after which it is an error.
pub const DEFAULT_STALL_ALARM: Duration = Duration::from_secs(30);
/// Uploads in flight at once.
pub const DEFAULT_UPLOAD_CONCURRENCY: usize = 2;
/// Attempts per storage operation before giving up (wal-fetch) or alarming (agent).
pub const DEFAULT_RETRIES: u32 = 8;
/// Segments wal-fetch downloads ahead of recovery.
pub const DEFAULT_PREFETCH: usize = 8;
/// How long `walsafe run` waits for the very first connection before giving up.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Metrics endpoint.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9851";

/// The whole configuration, validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// Path the configuration was read from.
    pub path: PathBuf,
    /// Whether the spool, the `file://` store and `wal-fetch` really fsync:
    /// always, except in tests that set `WALSAFE_UNSAFE_NO_FSYNC=1`.
    pub fsync: Fsync,
    pub postgres: PostgresConfig,
    pub spool: SpoolConfig,
    /// At least one; the first is where `backup` writes and where
    /// `wal-fetch` and `restore` look first.
    pub repositories: Vec<RepositoryConfig>,
    pub archive: ArchiveConfig,
    pub fetch: FetchConfig,
    pub metrics: MetricsConfig,
}

#[derive(Debug, Clone)]
pub struct PostgresConfig {
    /// libpq-style connection string (key=value or postgres:// URL).
    pub conninfo: String,
    /// Physical replication slot; created when missing.
    pub slot: String,
    /// `application_name` of the replication connection.
    pub application_name: String,
    /// How long the first connection into a repository not yet pinned is
    /// retried before `walsafe run` gives up (once pinned, and after any
    /// disconnection, the server is waited for without limit).
    pub connect_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct SpoolConfig {
    /// Directory of spooled WAL; one agent per directory.
    pub dir: PathBuf,
    /// How much room the spool may take (`max_size`, `min_free`).
    pub limits: Limits,
}

/// When the flush position reported to PostgreSQL may advance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AckMode {
    /// Once WAL is fsynced in the spool.
    Local,
    /// Once WAL is stored in the repository.
    Remote,
}

#[derive(Debug, Clone)]
pub struct ArchiveConfig {
    pub partial_interval: Duration,
    pub ack: AckMode,
    pub upload_concurrency: usize,
    /// How long uploads may make no progress, while WAL waits, before it
    /// is an error (once) rather than warnings.
    pub stall_alarm: Duration,
}

#[derive(Debug, Clone)]
pub struct FetchConfig {
    /// Segments to download ahead; 0 disables prefetch.
    pub prefetch: usize,
    /// Where prefetched segments wait; default `<spool.dir>/prefetch`.
    pub dir: PathBuf,
    /// `recover_to_gap = "<timeline>:<LSN>"`: the operator's consent to end
    /// recovery at the recorded gap that starts at LSN on that timeline.
    /// Without it `wal-fetch` refuses (exit 126) the segment holding a
    /// gap's start, because recovery would end there and promote without
    /// the WAL archived after the gap. It names one gap exactly, as
    /// wal-fetch's refusal prints it, rather than being a blanket switch:
    /// consent given for one loss never lets recovery stop early at
    /// another gap recorded later, and a value that matches no gap changes
    /// nothing.
    pub recover_to_gap: Option<(TimelineId, Lsn)>,
}

#[derive(Debug, Clone)]
pub struct MetricsConfig {
    /// `None` when `listen = ""` (metrics off).
    pub listen: Option<SocketAddr>,
}

// ---- the file as written ----

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    postgres: Option<RawPostgres>,
    spool: Option<RawSpool>,
    repository: Option<RawRepositories>,
    #[serde(default)]
    archive: RawArchive,
    #[serde(default)]
    fetch: RawFetch,
    #[serde(default)]
    metrics: RawMetrics,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPostgres {
    conninfo: Option<String>,
    slot: Option<String>,
    application_name: Option<String>,
    connect_timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpool {
    dir: Option<PathBuf>,
    max_size: Option<String>,
    min_free: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRepository {
    name: Option<String>,
    url: Option<String>,
    key_file: Option<PathBuf>,
    compression: Option<Compression>,
    compression_level: Option<i32>,
    #[serde(default)]
    options: BTreeMap<String, String>,
    retries: Option<u32>,
    request_timeout: Option<String>,
    retain_window: Option<String>,
}

/// `[repository]` (one table) or `[[repository]]` (several), read by
/// hand so that a wrong key inside either keeps toml's message and line.
enum RawRepositories {
    One(RawRepository),
    Several(Vec<RawRepository>),
}

impl<'de> Deserialize<'de> for RawRepositories {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawRepositories;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a [repository] table or [[repository]] tables")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                RawRepository::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(RawRepositories::One)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                seq: A,
            ) -> Result<Self::Value, A::Error> {
                Vec::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))
                    .map(RawRepositories::Several)
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawArchive {
    partial_interval: Option<String>,
    ack: Option<AckMode>,
    upload_concurrency: Option<usize>,
    stall_alarm: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawFetch {
    prefetch: Option<usize>,
    dir: Option<PathBuf>,
    recover_to_gap: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<String>,
}

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error(
        "cannot read configuration file {path}: {source}; pass --config FILE or set WALSAFE_CONFIG"
    )]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown keys.
    #[error("configuration file {path} is not valid: {message}")]
    Syntax { path: PathBuf, message: String },
    /// The values are wrong; every problem is listed.
    #[error("configuration file {path} has {} problem(s):\n  - {}", problems.len(), problems.join("\n  - "))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
}

impl Config {
    /// Reads and validates the configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses configuration text; `path` names it in errors and anchors relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            message: e.message().to_string()
                + &e.span()
                    .map(|s| format!(" (at line {})", line_of(text, s.start)))
                    .unwrap_or_default(),
        })?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let resolve = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        let mut problems = Vec::new();

        let pg = raw.postgres;
        let conninfo = pg.as_ref().and_then(|p| p.conninfo.clone());
        let conninfo = match conninfo {
            Some(c) => {
                if let Err(e) = crate::pg::conninfo::ConnParams::parse(&c) {
                    problems.push(format!(
                        "[postgres] conninfo is not a valid connection string ({e}); use libpq form, e.g. \"host=/var/run/postgresql user=walsafe\""
                    ));
                }
                c
            }
            None => {
                problems.push("[postgres] conninfo is missing; add e.g. conninfo = \"host=/var/run/postgresql user=walsafe\"".into());
                String::new()
            }
        };
        let slot = pg
            .as_ref()
            .and_then(|p| p.slot.clone())
            .unwrap_or_else(|| DEFAULT_SLOT.to_string());
        if slot.is_empty()
            || slot.len() > 63
            || !slot
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            problems.push(format!(
                "[postgres] slot \"{slot}\" is not a valid slot name; use up to 63 lower-case letters, digits and underscores"
            ));
        }
        let application_name = pg
            .as_ref()
            .and_then(|p| p.application_name.clone())
            .unwrap_or_else(|| DEFAULT_APPLICATION_NAME.to_string());

        let connect_timeout = match pg.as_ref().and_then(|p| p.connect_timeout.clone()) {
            Some(s) => humantime::parse_duration(&s).unwrap_or_else(|e| {
                problems.push(format!(
                    "[postgres] connect_timeout = \"{s}\" is not a duration ({e}); write e.g. \"30s\""
                ));
                DEFAULT_CONNECT_TIMEOUT
            }),
            None => DEFAULT_CONNECT_TIMEOUT,
        };

        let raw_spool = raw.spool.as_ref();
        let max_size = raw_spool.and_then(|s| s.max_size.as_deref()).and_then(|t| {
            let parsed = parse_size_setting(t);
            if parsed.is_none() {
                problems.push(format!(
                    "[spool] max_size = \"{t}\" is not a size; write e.g. \"64GB\" (units kB, MB, GB, TB)"
                ));
            }
            parsed
        });
        let min_free = match raw_spool.and_then(|s| s.min_free.as_deref()) {
            None => DEFAULT_LIMITS.min_free,
            Some(t) => match t.trim().strip_suffix('%') {
                Some(p) => match p.trim().parse::<f64>() {
                    Ok(f) if (0.0..100.0).contains(&f) => MinFree::Fraction(f / 100.0),
                    _ => {
                        problems.push(format!(
                            "[spool] min_free = \"{t}\" is not a percentage from 0 to 99; write e.g. \"5%\""
                        ));
                        DEFAULT_LIMITS.min_free
                    }
                },
                None => match parse_size_setting(t) {
                    Some(b) => MinFree::Bytes(b),
                    None => {
                        problems.push(format!(
                            "[spool] min_free = \"{t}\" is neither a percentage nor a size; write e.g. \"5%\" or \"20GB\""
                        ));
                        DEFAULT_LIMITS.min_free
                    }
                },
            },
        };
        let spool_dir = match raw.spool.and_then(|s| s.dir) {
            Some(d) => resolve(d),
            None => {
                problems.push(
                    "[spool] dir is missing; add e.g. dir = \"/var/lib/walsafe/spool\"".into(),
                );
                PathBuf::new()
            }
        };

        let fsync = Fsync::from_env();
        let repositories = repositories(raw.repository, &resolve, fsync, &mut problems);

        let partial_interval = match raw.archive.partial_interval {
            Some(s) => match humantime::parse_duration(&s) {
                Ok(d) if d >= Duration::from_millis(10) => d,
                Ok(_) => {
                    problems.push(format!(
                        "[archive] partial_interval = \"{s}\" is too short; use at least \"10ms\""
                    ));
                    DEFAULT_PARTIAL_INTERVAL
                }
                Err(e) => {
                    problems.push(format!(
                        "[archive] partial_interval = \"{s}\" is not a duration ({e}); write e.g. \"200ms\" or \"1s\""
                    ));
                    DEFAULT_PARTIAL_INTERVAL
                }
            },
            None => DEFAULT_PARTIAL_INTERVAL,
        };
        let stall_alarm = match raw.archive.stall_alarm.as_deref() {
            None => DEFAULT_STALL_ALARM,
            Some(t) => humantime::parse_duration(t).unwrap_or_else(|e| {
                problems.push(format!(
                    "[archive] stall_alarm = \"{t}\" is not a duration ({e}); write e.g. \"30s\""
                ));
                DEFAULT_STALL_ALARM
            }),
        };
        let upload_concurrency = raw
            .archive
            .upload_concurrency
            .unwrap_or(DEFAULT_UPLOAD_CONCURRENCY);
        if !(1..=64).contains(&upload_concurrency) {
            problems.push(format!(
                "[archive] upload_concurrency = {upload_concurrency} is out of range; use 1 to 64"
            ));
        }

        let fetch_dir = raw
            .fetch
            .dir
            .map(resolve)
            .unwrap_or_else(|| spool_dir.join("prefetch"));
        let recover_to_gap = raw.fetch.recover_to_gap.as_deref().and_then(|t| {
            let parsed = t.split_once(':').and_then(|(tli, lsn)| {
                let tli: u32 = tli.trim().parse().ok().filter(|&n| n > 0)?;
                Some((TimelineId(tli), lsn.parse::<Lsn>().ok()?))
            });
            if parsed.is_none() {
                problems.push(format!(
                    "[fetch] recover_to_gap = \"{t}\" does not name a gap start; write \"<timeline>:<LSN>\" exactly as wal-fetch's refusal prints it, e.g. \"1:0/5123456\""
                ));
            }
            parsed
        });

        let listen = match raw.metrics.listen.as_deref() {
            Some("") => None,
            Some(s) => match s.parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    problems.push(format!(
                        "[metrics] listen = \"{s}\" is not an address; write e.g. \"127.0.0.1:9851\", or \"\" to turn metrics off"
                    ));
                    None
                }
            },
            None => Some(DEFAULT_METRICS_LISTEN.parse().expect("valid default")),
        };

        if !problems.is_empty() {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                problems,
            });
        }
        Ok(Config {
            path: path.to_path_buf(),
            fsync,
            postgres: PostgresConfig {
                conninfo,
                slot,
                application_name,
                connect_timeout,
            },
            spool: SpoolConfig {
                dir: spool_dir,
                limits: Limits { max_size, min_free },
            },
            repositories,
            archive: ArchiveConfig {
                partial_interval,
                ack: raw.archive.ack.unwrap_or(AckMode::Local),
                upload_concurrency,
                stall_alarm,
            },
            fetch: FetchConfig {
                prefetch: raw.fetch.prefetch.unwrap_or(DEFAULT_PREFETCH),
                dir: fetch_dir,
                recover_to_gap,
            },
            metrics: MetricsConfig { listen },
        })
    }
}

impl Config {
    /// The first repository: where `backup` writes, what `wal-fetch`,
    /// `restore` and the other commands read first.
    pub fn repository(&self) -> &RepositoryConfig {
        &self.repositories[0]
    }
}

/// The repositories as configured, validated; `problems` gets what is
/// wrong with each, named by its table (`[repository]`, or
/// `[[repository]] "name"` when there are several).
fn repositories(
    raw: Option<RawRepositories>,
    resolve: &dyn Fn(PathBuf) -> PathBuf,
    fsync: Fsync,
    problems: &mut Vec<String>,
) -> Vec<RepositoryConfig> {
    let (several, raws) = match raw {
        None => (false, Vec::new()),
        Some(RawRepositories::One(r)) => (false, vec![r]),
        Some(RawRepositories::Several(rs)) => (true, rs),
    };
    if raws.is_empty() {
        problems.push("[repository] url is missing; add e.g. [repository] with url = \"file:///var/backups/walsafe\" or \"s3://bucket/prefix\"".into());
        return vec![repository(
            None,
            "[repository]".into(),
            resolve,
            fsync,
            problems,
        )];
    }
    let mut out: Vec<RepositoryConfig> = Vec::new();
    for (i, r) in raws.into_iter().enumerate() {
        let label = if several {
            match r.name.as_deref().or(r.url.as_deref()) {
                Some(n) => format!("[[repository]] #{} ({n})", i + 1),
                None => format!("[[repository]] #{}", i + 1),
            }
        } else {
            "[repository]".to_string()
        };
        let c = repository(Some(r), label.clone(), resolve, fsync, problems);
        if let Some(o) = out.iter().find(|o| o.name == c.name) {
            problems.push(format!(
                "{label}: name \"{}\" is also the name of the repository at {}; give each repository its own name = \"...\"",
                c.name, o.url
            ));
        } else if let Some(o) = out
            .iter()
            .find(|o| !c.url.is_empty() && place(o) == place(&c))
        {
            problems.push(format!(
                "{label}: url {} is also repository \"{}\"; each [[repository]] must be a different place",
                c.url, o.name
            ));
        }
        out.push(c);
    }
    out
}

/// Where a repository is: its URL, and the endpoint options that point
/// the same URL at another server (a test or on-premises S3).
fn place(r: &RepositoryConfig) -> (&str, Vec<(&String, &String)>) {
    let endpoints = r.options.iter().filter(|(k, _)| k.contains("endpoint"));
    (&r.url, endpoints.collect())
}

/// One repository table, validated.
fn repository(
    repo: Option<RawRepository>,
    label: String,
    resolve: &dyn Fn(PathBuf) -> PathBuf,
    fsync: Fsync,
    problems: &mut Vec<String>,
) -> RepositoryConfig {
    let repo = repo.as_ref();
    let url = match repo.and_then(|r| r.url.clone()) {
        Some(u) => {
            if let Err(e) = crate::repository::store::check_url(&u) {
                problems.push(format!("{label} url: {e}"));
            }
            u
        }
        None => {
            if repo.is_some() {
                problems.push(format!("{label} url is missing; add e.g. url = \"file:///var/backups/walsafe\" or \"s3://bucket/prefix\""));
            }
            String::new()
        }
    };
    let name = match repo.and_then(|r| r.name.clone()) {
        Some(n) if n.trim().is_empty() || n.chars().any(char::is_control) => {
            problems.push(format!(
                "{label} name = {n:?} is not a name; write e.g. name = \"offsite\""
            ));
            n
        }
        Some(n) => n,
        // URLs never hold credentials (check_url refuses them).
        None => url.clone(),
    };
    let key_file = repo.and_then(|r| r.key_file.clone()).map(resolve);
    let compression = repo
        .and_then(|r| r.compression)
        .unwrap_or(Compression::Zstd);
    let compression_level = repo
        .and_then(|r| r.compression_level)
        .unwrap_or(DEFAULT_COMPRESSION_LEVEL);
    if !(1..=19).contains(&compression_level) {
        problems.push(format!(
            "{label} compression_level = {compression_level} is out of range; use 1 (fast) to 19 (small)"
        ));
    }
    let options = repo.map(|r| r.options.clone()).unwrap_or_default();
    let retries = repo.and_then(|r| r.retries).unwrap_or(DEFAULT_RETRIES);
    if retries == 0 {
        problems.push(format!("{label} retries must be at least 1"));
    }
    let request_timeout = match repo.and_then(|r| r.request_timeout.as_deref()) {
        None => DEFAULT_REQUEST_TIMEOUT,
        Some(t) => match humantime::parse_duration(t) {
            Ok(d) if d >= Duration::from_millis(100) => d,
            Ok(_) => {
                problems.push(format!(
                    "{label} request_timeout = \"{t}\" is too short; use at least \"100ms\""
                ));
                DEFAULT_REQUEST_TIMEOUT
            }
            Err(e) => {
                problems.push(format!(
                    "{label} request_timeout = \"{t}\" is not a duration ({e}); write e.g. \"60s\""
                ));
                DEFAULT_REQUEST_TIMEOUT
            }
        },
    };
    let retain_window = repo.and_then(|r| r.retain_window.as_deref()).and_then(|t| {
        match humantime::parse_duration(t) {
            Ok(d) if d > Duration::ZERO => Some(d),
            _ => {
                problems.push(format!(
                    "{label} retain_window = \"{t}\" is not a duration; write e.g. \"30d\" (walsafe retain keeps this repository's recovery window instead of --window)"
                ));
                None
            }
        }
    });
    RepositoryConfig {
        name,
        url,
        key_file,
        retain_window,
        compression,
        compression_level,
        options,
        retries,
        request_timeout,
        fsync,
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[postgres]
conninfo = "host=/tmp user=walsafe"
[spool]
dir = "spool"
[repository]
url = "file:///tmp/repo"
"#;

    #[test]
    fn recover_to_gap_names_one_gap_start() {
        let p = Path::new("w.toml");
        assert_eq!(Config::parse(GOOD, p).unwrap().fetch.recover_to_gap, None);
        let with = |v: &str| format!("{GOOD}\n[fetch]\nrecover_to_gap = \"{v}\"\n");
        let c = Config::parse(&with("2:0/5123456"), p).unwrap();
        assert_eq!(
            c.fetch.recover_to_gap,
            Some((TimelineId(2), Lsn(0x5123456)))
        );
        for bad in ["0/5123456", "0:0/5123456", "x:0/1", "1:zz"] {
            let e = Config::parse(&with(bad), p).unwrap_err().to_string();
            assert!(e.contains("recover_to_gap"), "{bad}: {e}");
        }
    }

    #[test]
    fn defaults_and_relative_paths() {
        let c = Config::parse(GOOD, Path::new("/etc/walsafe/w.toml")).unwrap();
        assert_eq!(c.spool.dir, PathBuf::from("/etc/walsafe/spool"));
        assert_eq!(c.postgres.slot, DEFAULT_SLOT);
        assert_eq!(c.archive.partial_interval, DEFAULT_PARTIAL_INTERVAL);
        assert_eq!(c.archive.ack, AckMode::Local);
        assert_eq!(c.repository().compression, Compression::Zstd);
        assert_eq!(c.repositories.len(), 1);
        assert_eq!(c.repository().name, "file:///tmp/repo");
        assert_eq!(c.fetch.dir, PathBuf::from("/etc/walsafe/spool/prefetch"));
        assert_eq!(c.metrics.listen, Some("127.0.0.1:9851".parse().unwrap()));
    }

    #[test]
    fn all_problems_reported_at_once() {
        let text = r#"
[postgres]
slot = "Bad-Slot"
[repository]
url = "ftp://x"
compression_level = 40
[archive]
partial_interval = "soon"
"#;
        let e = Config::parse(text, Path::new("w.toml"))
            .unwrap_err()
            .to_string();
        for needle in [
            "conninfo is missing",
            "slot \"Bad-Slot\"",
            "[spool] dir is missing",
            "[repository] url",
            "compression_level = 40",
            "partial_interval = \"soon\"",
        ] {
            assert!(e.contains(needle), "{needle:?} not in {e}");
        }
    }

    #[test]
    fn tls_conninfo_keys_are_accepted() {
        let text = GOOD.replace(
            "host=/tmp user=walsafe",
            "host=db.example sslmode=verify-full sslrootcert=/etc/walsafe/ca.crt sslcert=/etc/walsafe/c.crt sslkey=/etc/walsafe/c.key",
        );
        Config::parse(&text, Path::new("w.toml")).unwrap();
        let bad = GOOD.replace("host=/tmp user=walsafe", "host=x sslmode=sometimes");
        let e = Config::parse(&bad, Path::new("w.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("conninfo"), "{e}");
    }

    const TWO: &str = r#"
[postgres]
conninfo = "host=/tmp user=walsafe"
[spool]
dir = "spool"
[[repository]]
url = "file:///tmp/repo"
[[repository]]
name = "offsite"
url = "s3://bucket/walsafe"
key_file = "offsite.key"
compression_level = 3
[repository.options]
aws_region = "eu-west-1"
"#;

    #[test]
    fn several_repositories_each_with_its_own_settings() {
        let c = Config::parse(TWO, Path::new("/etc/walsafe/w.toml")).unwrap();
        assert_eq!(c.repositories.len(), 2);
        let (first, offsite) = (&c.repositories[0], &c.repositories[1]);
        assert_eq!(c.repository().url, first.url);
        assert_eq!(first.name, "file:///tmp/repo");
        assert_eq!(first.key_file, None);
        assert!(first.options.is_empty());
        assert_eq!(offsite.name, "offsite");
        assert_eq!(
            offsite.key_file.as_deref(),
            Some(Path::new("/etc/walsafe/offsite.key"))
        );
        assert_eq!(offsite.compression_level, 3);
        assert_eq!(offsite.options["aws_region"], "eu-west-1");
    }

    #[test]
    fn several_repositories_must_differ_and_say_which_is_wrong() {
        let err = |text: &str| {
            Config::parse(text, Path::new("w.toml"))
                .unwrap_err()
                .to_string()
        };
        let same_name = TWO.replace("name = \"offsite\"", "name = \"file:///tmp/repo\"");
        let e = err(&same_name);
        assert!(
            e.contains("[[repository]] #2") && e.contains("its own name"),
            "{e}"
        );
        let same_url = TWO.replace("s3://bucket/walsafe", "file:///tmp/repo");
        let e = err(&same_url);
        assert!(e.contains("different place"), "{e}");
        let bad = TWO.replace("compression_level = 3", "compression_level = 30");
        let e = err(&bad);
        assert!(
            e.contains("[[repository]] #2 (offsite) compression_level = 30"),
            "{e}"
        );
        let no_url = TWO.replace("url = \"s3://bucket/walsafe\"", "");
        let e = err(&no_url);
        assert!(e.contains("#2 (offsite) url is missing"), "{e}");
        let typo = TWO.replace("compression_level = 3", "compresion_level = 3");
        let e = err(&typo);
        assert!(
            e.contains("compresion_level") && e.contains("line 12"),
            "{e}"
        );
        let none = GOOD.replace("[repository]\nurl = \"file:///tmp/repo\"\n", "");
        let e = err(&none);
        assert!(e.contains("[repository] url is missing"), "{e}");
    }

    #[test]
    fn unknown_key_names_line() {
        let e = Config::parse(
            "[postgres]\nconninfo='host=x'\nslto='a'\n",
            Path::new("w.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("slto") && e.contains("line 3"), "{e}");
    }
}
