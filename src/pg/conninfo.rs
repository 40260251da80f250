//! libpq-style connection parameters, resolved once and shared by the
//! replication connection ([`super::replication`]) and the SQL connection
//! ([`super::sql`]).
//!
//! # Resolution order (as libpq does it)
//!
//! ```text
//! conninfo (key=value or postgres:// URL)      parsed by tokio_postgres::Config,
//!   │                                          except sslmode / sslrootcert / sslcert /
//!   │                                          sslkey / passfile / replication /
//!   │                                          target_session_attrs,
//!   │                                          which walsafe reads itself
//!   ▼ missing keys filled from the environment
//! PGHOST PGPORT PGUSER PGPASSWORD PGPASSFILE PGDATABASE PGSSLMODE PGSSLROOTCERT
//! PGSSLCERT PGSSLKEY PGAPPNAME PGCONNECT_TIMEOUT PGTARGETSESSIONATTRS
//!   ▼ then from built-in defaults
//! host = /var/run/postgresql   port = 5432   user = the OS user   sslmode = prefer
//! target_session_attrs = any
//! sslrootcert = ~/.postgresql/root.crt   sslcert = ~/.postgresql/postgresql.crt
//! sslkey = ~/.postgresql/postgresql.key
//! ```
//!
//! A password that is still missing when the server asks for one comes from
//! the password file (`passfile`, `PGPASSFILE` or `~/.pgpass`), one line per
//! entry:
//!
//! ```text
//! hostname:port:database:username:password     `*` matches anything in the first four,
//!                                              `\:` and `\\` escape, `#` starts a comment
//! ```
//!
//! The file is ignored (with a warning) when it is not a plain file or when
//! its group or others have any access, exactly like libpq. `localhost`
//! matches a Unix-socket connection to the default socket directory. For a
//! physical replication connection without a `dbname`, the database field
//! to match is `replication`, as the PostgreSQL docs describe.
//!
//! # Invariants
//!
//! - A password never reaches a `Debug`, `Display` or error text: it lives
//!   in [`Password`], whose `Debug` prints `<redacted>`, and [`ConnParams`]
//!   implements `Debug` by hand.
//! - Hosts that start with `/` are Unix-socket directories; the socket file
//!   is `<dir>/.s.PGSQL.<port>`.
//! - Several hosts are tried in order; ports are either one for all hosts or
//!   one per host. `target_session_attrs` says which of them a connection
//!   accepts ([`super::session_attrs`]).
//!
//! The TLS keys only name files here; what each `sslmode` does with them
//! (libpq's meaning, rustls underneath) is [`super::tls`]'s business.
//! `sslrootcert=system` (libpq 16) means the operating system's trusted
//! roots; it makes `verify-full` the default sslmode and refuses a weaker
//! one, as libpq does.

use std::fmt;
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

/// Default Unix-socket directory of Debian/Ubuntu PostgreSQL packages.
pub const DEFAULT_SOCKET_DIR: &str = "/var/run/postgresql";

/// PostgreSQL's default port.
pub const DEFAULT_PORT: u16 = 5432;

/// The database name a physical replication connection matches in the
/// password file when no `dbname` is given.
pub const REPLICATION_PASSFILE_DB: &str = "replication";

/// Errors in a connection string or its environment.
#[derive(Debug, thiserror::Error)]
pub enum ConninfoError {
    /// The conninfo text could not be parsed (syntax or an unknown key).
    #[error("invalid [postgres] conninfo: {reason}; expected libpq form such as \"host=/var/run/postgresql user=walsafe\" or postgresql://walsafe@host/db")]
    Syntax { reason: String },
    /// A value is present but not valid (e.g. a port that is not a number).
    #[error("invalid {key} value \"{value}\" in the [postgres] conninfo or environment: {reason}")]
    InvalidValue {
        key: &'static str,
        value: String,
        reason: String,
    },
}

/// How the client treats TLS; libpq's `sslmode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    /// Never TLS.
    Disable,
    /// Plain first, TLS if the server insists.
    Allow,
    /// TLS if the server offers it, else plain (libpq's default).
    Prefer,
    /// TLS without certificate checks.
    Require,
    /// TLS, certificate signed by a trusted CA.
    VerifyCa,
    /// TLS, certificate trusted and matching the host name.
    VerifyFull,
}

impl SslMode {
    /// Whether this mode can be satisfied without TLS.
    pub fn allows_plaintext(self) -> bool {
        matches!(self, SslMode::Disable | SslMode::Allow | SslMode::Prefer)
    }
}

impl FromStr for SslMode {
    type Err = ConninfoError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(ConninfoError::InvalidValue {
                    key: "sslmode",
                    value: other.to_string(),
                    reason: "expected disable, allow, prefer, require, verify-ca or verify-full"
                        .into(),
                })
            }
        })
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        })
    }
}

/// Which session a connection accepts when several hosts are given; libpq's
/// `target_session_attrs` (`PGTARGETSESSIONATTRS`). How each is decided is
/// [`super::session_attrs`]'s business.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TargetSessionAttrs {
    /// Any session (libpq's default).
    #[default]
    Any,
    /// A session that accepts read-write transactions by default: not in
    /// hot standby and `default_transaction_read_only` off.
    ReadWrite,
    /// The converse of `ReadWrite`.
    ReadOnly,
    /// A server not in hot standby (recovery).
    Primary,
    /// A server in hot standby.
    Standby,
    /// A standby if any host is one, else any host.
    PreferStandby,
}

impl FromStr for TargetSessionAttrs {
    type Err = ConninfoError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "any" => TargetSessionAttrs::Any,
            "read-write" => TargetSessionAttrs::ReadWrite,
            "read-only" => TargetSessionAttrs::ReadOnly,
            "primary" => TargetSessionAttrs::Primary,
            "standby" => TargetSessionAttrs::Standby,
            "prefer-standby" => TargetSessionAttrs::PreferStandby,
            other => {
                return Err(ConninfoError::InvalidValue {
                    key: "target_session_attrs",
                    value: other.to_string(),
                    reason:
                        "expected any, read-write, read-only, primary, standby or prefer-standby"
                            .into(),
                })
            }
        })
    }
}

impl fmt::Display for TargetSessionAttrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TargetSessionAttrs::Any => "any",
            TargetSessionAttrs::ReadWrite => "read-write",
            TargetSessionAttrs::ReadOnly => "read-only",
            TargetSessionAttrs::Primary => "primary",
            TargetSessionAttrs::Standby => "standby",
            TargetSessionAttrs::PreferStandby => "prefer-standby",
        })
    }
}

/// Where the certificates that may sign the server's certificate come from
/// (`sslrootcert`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RootCert {
    /// A PEM file of CA certificates. A missing file means "verify nothing"
    /// for sslmodes below verify-ca, like libpq.
    File(PathBuf),
    /// `sslrootcert=system`: the operating system's trusted roots.
    System,
}

impl fmt::Display for RootCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RootCert::File(p) => write!(f, "{}", p.display()),
            RootCert::System => f.write_str("the system's trusted roots (sslrootcert=system)"),
        }
    }
}

/// A password. `Debug` never shows it; read it with [`Password::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    /// Wraps a password.
    pub fn new(p: impl Into<String>) -> Self {
        Password(p.into())
    }
    /// The secret itself, for the authentication exchange only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Where to connect: a TCP host name or address, or a Unix-socket directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    /// Host name or IP address.
    Tcp(String),
    /// Directory holding the `.s.PGSQL.<port>` socket.
    Unix(PathBuf),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Tcp(h) => f.write_str(h),
            Host::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

/// One address to try: host, optional numeric address, port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub host: Host,
    /// libpq's `hostaddr`: connect here instead of resolving `host`.
    pub hostaddr: Option<IpAddr>,
    pub port: u16,
}

impl Target {
    /// The socket file of a Unix-socket target.
    pub fn socket_path(&self) -> Option<PathBuf> {
        match &self.host {
            Host::Unix(dir) => Some(dir.join(format!(".s.PGSQL.{}", self.port))),
            Host::Tcp(_) => None,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.host, self.hostaddr) {
            (Host::Unix(_), _) => write!(f, "{}", self.socket_path().unwrap().display()),
            (Host::Tcp(h), Some(a)) => write!(f, "{h} ({a}) port {}", self.port),
            (Host::Tcp(h), None) => write!(f, "{h} port {}", self.port),
        }
    }
}

/// Fully resolved connection parameters.
#[derive(Clone)]
pub struct ConnParams {
    /// Addresses to try, in order.
    pub targets: Vec<Target>,
    /// Role name.
    pub user: String,
    /// Password from the conninfo or `PGPASSWORD`; the password file is
    /// consulted only when this is `None` (see [`ConnParams::password_for`]).
    pub password: Option<Password>,
    /// Password file to consult (`passfile`, `PGPASSFILE`, `~/.pgpass`).
    pub passfile: Option<PathBuf>,
    /// Database, if given (`dbname`, `PGDATABASE`).
    pub dbname: Option<String>,
    /// `application_name`, if given (`application_name`, `PGAPPNAME`).
    pub application_name: Option<String>,
    /// `options` (command-line options sent to the server), if given.
    pub options: Option<String>,
    /// TLS policy.
    pub sslmode: SslMode,
    /// Trusted roots (`sslrootcert`, `PGSSLROOTCERT`, `~/.postgresql/root.crt`);
    /// `None` only when none is given and there is no home directory.
    pub sslrootcert: Option<RootCert>,
    /// Client certificate (`sslcert`, `PGSSLCERT`, `~/.postgresql/postgresql.crt`),
    /// used when the file exists.
    pub sslcert: Option<PathBuf>,
    /// Client key (`sslkey`, `PGSSLKEY`, `~/.postgresql/postgresql.key`).
    pub sslkey: Option<PathBuf>,
    /// Per-address connect timeout.
    pub connect_timeout: Option<Duration>,
    /// Which host's session to accept (`target_session_attrs`,
    /// `PGTARGETSESSIONATTRS`, default any).
    pub target_session_attrs: TargetSessionAttrs,
}

impl fmt::Debug for ConnParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnParams")
            .field("targets", &self.targets)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("passfile", &self.passfile)
            .field("dbname", &self.dbname)
            .field("application_name", &self.application_name)
            .field("options", &self.options)
            .field("sslmode", &self.sslmode)
            .field("sslrootcert", &self.sslrootcert)
            .field("sslcert", &self.sslcert)
            .field("sslkey", &self.sslkey)
            .field("connect_timeout", &self.connect_timeout)
            .field("target_session_attrs", &self.target_session_attrs)
            .finish()
    }
}

/// Why the password file was skipped, as libpq warns.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PassfileWarning {
    /// The path is not a regular file.
    #[error("password file \"{0}\" is not a plain file; ignoring it")]
    NotPlainFile(PathBuf),
    /// Group or others may access it.
    #[error("password file \"{0}\" has group or world access; permissions should be u=rw (0600) or less; ignoring it")]
    InsecurePermissions(PathBuf),
}

/// Keys walsafe reads itself before handing the rest to tokio_postgres.
#[derive(Default)]
struct Extracted {
    sslmode: Option<String>,
    sslrootcert: Option<String>,
    sslcert: Option<String>,
    sslkey: Option<String>,
    passfile: Option<String>,
    target_session_attrs: Option<String>,
}

impl ConnParams {
    /// Parses `conninfo` and fills the gaps from the process environment.
    pub fn parse(conninfo: &str) -> Result<Self, ConninfoError> {
        Self::parse_with_env(conninfo, &|k| {
            std::env::var(k).ok().filter(|v| !v.is_empty())
        })
    }

    /// Like [`ConnParams::parse`], with `env` standing in for the process
    /// environment (used by tests).
    pub fn parse_with_env(
        conninfo: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConninfoError> {
        let (rest, extracted) = extract_own_keys(conninfo)?;
        let config = tokio_postgres::Config::from_str(&rest).map_err(|e| {
            // tokio_postgres errors never include values, so no secret leaks here.
            ConninfoError::Syntax {
                reason: e.to_string(),
            }
        })?;

        // Hosts.
        let mut hosts: Vec<Host> = config
            .get_hosts()
            .iter()
            .map(|h| match h {
                tokio_postgres::config::Host::Tcp(s) if s.is_empty() => {
                    Host::Unix(PathBuf::from(DEFAULT_SOCKET_DIR))
                }
                tokio_postgres::config::Host::Tcp(s) => Host::Tcp(s.clone()),
                tokio_postgres::config::Host::Unix(p) => Host::Unix(p.clone()),
            })
            .collect();
        let hostaddrs: Vec<IpAddr> = config.get_hostaddrs().to_vec();
        if hosts.is_empty() && hostaddrs.is_empty() {
            hosts = match env("PGHOST") {
                Some(v) => v.split(',').map(host_from_str).collect(),
                None => vec![Host::Unix(PathBuf::from(DEFAULT_SOCKET_DIR))],
            };
        }
        if hosts.is_empty() {
            hosts = hostaddrs.iter().map(|a| Host::Tcp(a.to_string())).collect();
        }
        if !hostaddrs.is_empty() && hostaddrs.len() != hosts.len() {
            return Err(ConninfoError::InvalidValue {
                key: "hostaddr",
                value: format!("{} addresses", hostaddrs.len()),
                reason: format!(
                    "{} hosts are given; give one hostaddr per host",
                    hosts.len()
                ),
            });
        }

        // Ports.
        let mut ports: Vec<u16> = config.get_ports().to_vec();
        if ports.is_empty() {
            if let Some(v) = env("PGPORT") {
                for p in v.split(',') {
                    ports.push(if p.trim().is_empty() {
                        DEFAULT_PORT
                    } else {
                        p.trim().parse().map_err(|_| ConninfoError::InvalidValue {
                            key: "PGPORT",
                            value: v.clone(),
                            reason: "not a port number".into(),
                        })?
                    });
                }
            }
        }
        if ports.is_empty() {
            ports.push(DEFAULT_PORT);
        }
        if ports.len() != 1 && ports.len() != hosts.len() {
            return Err(ConninfoError::InvalidValue {
                key: "port",
                value: format!("{} ports", ports.len()),
                reason: format!(
                    "{} hosts are given; give one port for all or one per host",
                    hosts.len()
                ),
            });
        }
        let targets = hosts
            .into_iter()
            .enumerate()
            .map(|(i, host)| Target {
                host,
                hostaddr: hostaddrs.get(i).copied(),
                port: if ports.len() == 1 { ports[0] } else { ports[i] },
            })
            .collect();

        let user = match config.get_user() {
            Some(u) => u.to_string(),
            None => env("PGUSER").unwrap_or_else(os_user_name),
        };
        let password = match config.get_password() {
            Some(p) => Some(Password(String::from_utf8(p.to_vec()).map_err(|_| {
                ConninfoError::InvalidValue {
                    key: "password",
                    value: "<redacted>".into(),
                    reason: "not valid UTF-8".into(),
                }
            })?)),
            None => env("PGPASSWORD").map(Password),
        };
        let passfile = extracted
            .passfile
            .or_else(|| env("PGPASSFILE"))
            .map(PathBuf::from)
            .or_else(|| home_dir(env).map(|h| h.join(".pgpass")));
        let dbname = config
            .get_dbname()
            .map(str::to_string)
            .or_else(|| env("PGDATABASE"));
        let application_name = config
            .get_application_name()
            .map(str::to_string)
            .or_else(|| env("PGAPPNAME"));
        let pg_dir = home_dir(env).map(|h| h.join(".postgresql"));
        let sslrootcert = match extracted.sslrootcert.or_else(|| env("PGSSLROOTCERT")) {
            Some(v) if v == "system" => Some(RootCert::System),
            Some(v) => Some(RootCert::File(PathBuf::from(v))),
            None => pg_dir.as_ref().map(|d| RootCert::File(d.join("root.crt"))),
        };
        let sslcert = extracted
            .sslcert
            .or_else(|| env("PGSSLCERT"))
            .map(PathBuf::from)
            .or_else(|| pg_dir.as_ref().map(|d| d.join("postgresql.crt")));
        let sslkey = extracted
            .sslkey
            .or_else(|| env("PGSSLKEY"))
            .map(PathBuf::from)
            .or_else(|| pg_dir.as_ref().map(|d| d.join("postgresql.key")));
        let sslmode = match extracted.sslmode.or_else(|| env("PGSSLMODE")) {
            Some(s) => s.parse()?,
            // libpq 16: the system's roots are only worth anything with
            // host name checks, so they make verify-full the default.
            None if sslrootcert == Some(RootCert::System) => SslMode::VerifyFull,
            None => SslMode::Prefer,
        };
        if sslrootcert == Some(RootCert::System) && sslmode != SslMode::VerifyFull {
            return Err(ConninfoError::InvalidValue {
                key: "sslmode",
                value: sslmode.to_string(),
                reason: "sslrootcert=system trusts every public CA, so only verify-full (which also checks the host name) is allowed with it, as in libpq; use sslmode=verify-full or name a CA file in sslrootcert".into(),
            });
        }
        let connect_timeout = match config.get_connect_timeout() {
            Some(d) => Some(*d),
            None => match env("PGCONNECT_TIMEOUT") {
                Some(v) => {
                    let secs: i64 = v.trim().parse().map_err(|_| ConninfoError::InvalidValue {
                        key: "PGCONNECT_TIMEOUT",
                        value: v.clone(),
                        reason: "expected whole seconds".into(),
                    })?;
                    // libpq: zero or negative means wait forever, 1 is raised to 2.
                    (secs > 0).then(|| Duration::from_secs(secs.max(2) as u64))
                }
                None => None,
            },
        };
        let target_session_attrs = match extracted
            .target_session_attrs
            .or_else(|| env("PGTARGETSESSIONATTRS"))
        {
            Some(v) => v.parse()?,
            None => TargetSessionAttrs::Any,
        };
        Ok(ConnParams {
            targets,
            user,
            password,
            passfile,
            dbname,
            application_name,
            options: config.get_options().map(str::to_string),
            sslmode,
            sslrootcert,
            sslcert,
            sslkey,
            connect_timeout,
            target_session_attrs,
        })
    }

    /// The password to send to `target` for database `dbname`: the explicit
    /// one, else the first matching password-file line. A skipped password
    /// file is reported through `warn`.
    pub fn password_for(
        &self,
        target: &Target,
        dbname: &str,
        warn: &mut dyn FnMut(PassfileWarning),
    ) -> Option<Password> {
        if let Some(p) = &self.password {
            return Some(p.clone());
        }
        let path = self.passfile.as_ref()?;
        let host = match &target.host {
            Host::Tcp(h) => h.clone(),
            Host::Unix(dir) => dir.to_string_lossy().into_owned(),
        };
        match password_from_file(path, &host, target.port, dbname, &self.user) {
            Ok(p) => p,
            Err(w) => {
                warn(w);
                None
            }
        }
    }
}

fn host_from_str(s: &str) -> Host {
    let s = s.trim();
    if s.is_empty() {
        Host::Unix(PathBuf::from(DEFAULT_SOCKET_DIR))
    } else if s.starts_with('/') {
        Host::Unix(PathBuf::from(s))
    } else {
        Host::Tcp(s.to_string())
    }
}

/// The effective OS user's name, libpq's default role name.
pub fn os_user_name() -> String {
    passwd_entry()
        .map(|(name, _)| name)
        .unwrap_or_else(|| std::env::var("USER").unwrap_or_else(|_| "postgres".to_string()))
}

fn home_dir(env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    env("HOME")
        .map(PathBuf::from)
        .or_else(|| passwd_entry().map(|(_, home)| home))
}

/// Name and home directory of the effective user, from the passwd database.
fn passwd_entry() -> Option<(String, PathBuf)> {
    let user = nix::unistd::User::from_uid(nix::unistd::geteuid()).ok()??;
    Some((user.name, user.dir))
}

/// libpq's password-file lookup: the password of the first line whose four
/// fields match, `Ok(None)` when none does or the file cannot be read, and a
/// warning when the file must be ignored for its type or permissions.
pub fn password_from_file(
    path: &Path,
    host: &str,
    port: u16,
    dbname: &str,
    user: &str,
) -> Result<Option<Password>, PassfileWarning> {
    if dbname.is_empty() || user.is_empty() {
        return Ok(None);
    }
    let host = if host.is_empty() || host == DEFAULT_SOCKET_DIR {
        "localhost"
    } else {
        host
    };
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(None);
    };
    if !meta.is_file() {
        return Err(PassfileWarning::NotPlainFile(path.to_path_buf()));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(PassfileWarning::InsecurePermissions(path.to_path_buf()));
    }
    let Ok(content) = std::fs::read(path) else {
        return Ok(None);
    };
    let content = String::from_utf8_lossy(&content);
    let port = port.to_string();
    Ok(search_passfile(&content, [host, &port, dbname, user]).map(Password))
}

/// Finds the password for the four wanted fields in password-file text.
fn search_passfile(content: &str, wanted: [&str; 4]) -> Option<String> {
    for line in content.lines() {
        let line = line.trim_end_matches('\r');
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields = split_passfile_line(line);
        if fields.len() < 5 {
            continue;
        }
        let matches = fields[..4]
            .iter()
            .zip(wanted)
            .all(|((raw, value), want)| raw == "*" || value == want);
        if matches {
            // Everything after the fourth unescaped ':' is the password.
            return Some(fields[4].1.clone());
        }
    }
    None
}

/// Splits a password-file line into up to five fields, each as (raw text,
/// unescaped value); the fifth takes the rest of the line, colons included.
fn split_passfile_line(line: &str) -> Vec<(String, String)> {
    let mut fields = Vec::with_capacity(5);
    let mut raw = String::new();
    let mut value = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            raw.push(c);
            if let Some(next) = chars.next() {
                raw.push(next);
                value.push(next);
            }
        } else if c == ':' && fields.len() < 4 {
            fields.push((std::mem::take(&mut raw), std::mem::take(&mut value)));
        } else {
            raw.push(c);
            value.push(c);
        }
    }
    fields.push((raw, value));
    fields
}

/// Removes the keys walsafe handles itself (`sslmode`, `sslrootcert`,
/// `sslcert`, `sslkey`, `passfile`, `target_session_attrs`, `replication`) from a conninfo and returns the rest in a form
/// tokio_postgres parses.
fn extract_own_keys(conninfo: &str) -> Result<(String, Extracted), ConninfoError> {
    let mut ex = Extracted::default();
    let trimmed = conninfo.trim();
    if trimmed.starts_with("postgres://") || trimmed.starts_with("postgresql://") {
        let Some((base, query)) = trimmed.split_once('?') else {
            return Ok((trimmed.to_string(), ex));
        };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match percent_decode(k)?.as_str() {
                "sslmode" => ex.sslmode = Some(percent_decode(v)?),
                "sslrootcert" => ex.sslrootcert = Some(percent_decode(v)?),
                "sslcert" => ex.sslcert = Some(percent_decode(v)?),
                "sslkey" => ex.sslkey = Some(percent_decode(v)?),
                "passfile" => ex.passfile = Some(percent_decode(v)?),
                "target_session_attrs" => ex.target_session_attrs = Some(percent_decode(v)?),
                "replication" => {}
                _ => kept.push(pair),
            }
        }
        let rest = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return Ok((rest, ex));
    }
    let mut out = String::new();
    for (k, v) in tokenize_kv(conninfo)? {
        match k.as_str() {
            "sslmode" => ex.sslmode = Some(v),
            "sslrootcert" => ex.sslrootcert = Some(v),
            "sslcert" => ex.sslcert = Some(v),
            "sslkey" => ex.sslkey = Some(v),
            "passfile" => ex.passfile = Some(v),
            "target_session_attrs" => ex.target_session_attrs = Some(v),
            "replication" => {}
            _ => push_kv(&mut out, &k, &v, true),
        }
    }
    Ok((out, ex))
}

/// Appends `k=v` to a key=value conninfo, the value quoted (always, or
/// only where it needs it) with libpq's escapes.
fn push_kv(out: &mut String, k: &str, v: &str, always_quote: bool) {
    if !out.is_empty() {
        out.push(' ');
    }
    out.push_str(k);
    out.push('=');
    let plain = !v.is_empty() && !v.contains(|c: char| c.is_whitespace() || c == '\'' || c == '\\');
    if plain && !always_quote {
        out.push_str(v);
        return;
    }
    out.push('\'');
    for c in v.chars() {
        if c == '\'' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
}

/// What stands in for a password in [`redact_password`].
pub const REDACTED: &str = "<redacted>";

/// `conninfo` with its password replaced by [`REDACTED`]: `password=…` of
/// the key=value form (read with the same tokenizer as the parser), the
/// `user:password@` and `password=` of a URL. A conninfo that does not
/// tokenize is replaced whole.
pub fn redact_password(conninfo: &str) -> String {
    let t = conninfo.trim();
    if let Some((scheme, rest)) = t
        .strip_prefix("postgresql://")
        .map(|r| ("postgresql", r))
        .or_else(|| t.strip_prefix("postgres://").map(|r| ("postgres", r)))
    {
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(authority_end);
        let authority = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => match userinfo.split_once(':') {
                Some((user, _)) => format!("{user}:{REDACTED}@{hosts}"),
                None => authority.to_string(),
            },
            None => authority.to_string(),
        };
        let tail = tail
            .split('&')
            .map(|kv| match kv.split_once('=') {
                // The first pair carries the path and '?' before its key.
                Some((k, _)) if k.rsplit('?').next() == Some("password") => {
                    format!("{k}={REDACTED}")
                }
                _ => kv.to_string(),
            })
            .collect::<Vec<_>>()
            .join("&");
        return format!("{scheme}://{authority}{tail}");
    }
    let Ok(pairs) = tokenize_kv(conninfo) else {
        return REDACTED.to_string();
    };
    let mut out = String::new();
    for (k, v) in pairs {
        if k == "password" {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str("password=");
            out.push_str(REDACTED);
        } else {
            push_kv(&mut out, &k, &v, false);
        }
    }
    out
}

/// libpq's key=value syntax: values bare or single-quoted, `\` escapes.
fn tokenize_kv(s: &str) -> Result<Vec<(String, String)>, ConninfoError> {
    let syntax = |reason: String| ConninfoError::Syntax { reason };
    let mut out = Vec::new();
    let mut it = s.chars().peekable();
    loop {
        while it.peek().is_some_and(|c| c.is_whitespace()) {
            it.next();
        }
        if it.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(&c) = it.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            it.next();
        }
        if key.is_empty() {
            // tokio_postgres would stop parsing here and drop the rest.
            return Err(syntax("\"=\" without a parameter name before it".into()));
        }
        while it.peek().is_some_and(|c| c.is_whitespace()) {
            it.next();
        }
        if it.next() != Some('=') {
            return Err(syntax(format!("missing \"=\" after \"{key}\"")));
        }
        while it.peek().is_some_and(|c| c.is_whitespace()) {
            it.next();
        }
        let mut value = String::new();
        if it.peek() == Some(&'\'') {
            it.next();
            loop {
                match it.next() {
                    None => return Err(syntax(format!("unterminated quoted value for \"{key}\""))),
                    Some('\\') => {
                        if let Some(c) = it.next() {
                            value.push(c);
                        }
                    }
                    Some('\'') => break,
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(&c) = it.peek() {
                if c.is_whitespace() {
                    break;
                }
                it.next();
                if c == '\\' {
                    if let Some(n) = it.next() {
                        value.push(n);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        out.push((key, value));
    }
}

/// Decodes a percent-encoded URL parameter as libpq does: every `%` must
/// begin two hex digits, `%00` is refused, and the result must be UTF-8.
fn percent_decode(s: &str) -> Result<String, ConninfoError> {
    // percent_decode_str passes a malformed escape through as text, where
    // libpq refuses the whole conninfo: check the escapes first.
    let bytes = s.as_bytes();
    for (i, _) in s.match_indices('%') {
        match bytes.get(i + 1..i + 3) {
            Some(b"00") => {
                return Err(ConninfoError::Syntax {
                    reason: format!("forbidden value %00 in URL parameter \"{s}\""),
                })
            }
            Some(hex) if hex.iter().all(u8::is_ascii_hexdigit) => {}
            _ => {
                return Err(ConninfoError::Syntax {
                    reason: format!("invalid percent-encoding in URL parameter \"{s}\""),
                })
            }
        }
    }
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|decoded| decoded.into_owned())
        .map_err(|_| ConninfoError::Syntax {
            reason: format!("URL parameter \"{s}\" is not valid UTF-8"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::os::unix::fs::PermissionsExt;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn defaults_when_nothing_is_given() {
        let p = ConnParams::parse_with_env("", &env_of(&[("HOME", "/home/x")])).unwrap();
        assert_eq!(
            p.targets,
            vec![Target {
                host: Host::Unix(PathBuf::from(DEFAULT_SOCKET_DIR)),
                hostaddr: None,
                port: 5432
            }]
        );
        assert_eq!(p.user, os_user_name());
        assert!(p.password.is_none());
        assert_eq!(p.passfile, Some(PathBuf::from("/home/x/.pgpass")));
        assert_eq!(p.sslmode, SslMode::Prefer);
        assert_eq!(p.dbname, None);
        assert_eq!(
            p.sslrootcert,
            Some(RootCert::File("/home/x/.postgresql/root.crt".into()))
        );
        assert_eq!(
            p.sslcert,
            Some(PathBuf::from("/home/x/.postgresql/postgresql.crt"))
        );
        assert_eq!(
            p.sslkey,
            Some(PathBuf::from("/home/x/.postgresql/postgresql.key"))
        );
    }

    #[test]
    fn tls_files_from_conninfo_url_and_environment() {
        let env = env_of(&[
            ("HOME", "/home/x"),
            ("PGSSLROOTCERT", "/env/ca.crt"),
            ("PGSSLCERT", "/env/c.crt"),
            ("PGSSLKEY", "/env/c.key"),
        ]);
        let p = ConnParams::parse_with_env("host=h", &env).unwrap();
        assert_eq!(p.sslrootcert, Some(RootCert::File("/env/ca.crt".into())));
        assert_eq!(p.sslcert, Some(PathBuf::from("/env/c.crt")));
        assert_eq!(p.sslkey, Some(PathBuf::from("/env/c.key")));
        // The conninfo wins, and tokio_postgres never sees these keys.
        let p = ConnParams::parse_with_env(
            "host=h sslmode=verify-ca sslrootcert='/a b/ca.crt' sslcert=/c.crt sslkey=/c.key",
            &env,
        )
        .unwrap();
        assert_eq!(p.sslmode, SslMode::VerifyCa);
        assert_eq!(p.sslrootcert, Some(RootCert::File("/a b/ca.crt".into())));
        assert_eq!(p.sslcert, Some(PathBuf::from("/c.crt")));
        assert_eq!(p.sslkey, Some(PathBuf::from("/c.key")));
        let p = ConnParams::parse_with_env(
            "postgresql://u@h/db?sslrootcert=%2Fca.crt&sslcert=%2Fc.crt&sslkey=%2Fc.key&sslmode=require",
            &env,
        )
        .unwrap();
        assert_eq!(p.sslmode, SslMode::Require);
        assert_eq!(p.sslrootcert, Some(RootCert::File("/ca.crt".into())));
        assert_eq!(p.sslkey, Some(PathBuf::from("/c.key")));
        // sslrootcert=system makes verify-full the default.
        let p = ConnParams::parse_with_env("host=h sslrootcert=system", &env).unwrap();
        assert_eq!(p.sslrootcert, Some(RootCert::System));
        assert_eq!(p.sslmode, SslMode::VerifyFull);
        let dbg = format!("{p:?}");
        assert!(dbg.contains("sslrootcert: Some(System)"), "{dbg}");
    }

    #[test]
    fn url_parameters_are_percent_decoded_as_libpq_does() {
        assert_eq!(percent_decode("%2Fa%20b%2fc+d").unwrap(), "/a b/c+d");
        assert_eq!(percent_decode("caf%C3%A9").unwrap(), "café");
        for bad in ["%", "%2", "a%zz", "%+1", "%%41"] {
            let e = percent_decode(bad).unwrap_err().to_string();
            assert!(e.contains("invalid percent-encoding"), "{bad}: {e}");
        }
        let e = percent_decode("a%00b").unwrap_err().to_string();
        assert!(e.contains("forbidden value %00"), "{e}");
        let e = percent_decode("%C3%28").unwrap_err().to_string();
        assert!(e.contains("not valid UTF-8"), "{e}");
        let e = ConnParams::parse_with_env("postgresql://h/db?sslrootcert=%2", &env_of(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("invalid percent-encoding"), "{e}");
    }

    #[test]
    fn environment_fills_only_what_is_missing() {
        let env = env_of(&[
            ("PGHOST", "db1,/tmp/sock"),
            ("PGPORT", "6000"),
            ("PGUSER", "envuser"),
            ("PGPASSWORD", "envpw"),
            ("PGPASSFILE", "/etc/pgpass"),
            ("PGDATABASE", "envdb"),
            ("PGSSLMODE", "disable"),
            ("PGAPPNAME", "envapp"),
            ("PGCONNECT_TIMEOUT", "7"),
        ]);
        let p = ConnParams::parse_with_env("", &env).unwrap();
        assert_eq!(p.targets.len(), 2);
        assert_eq!(p.targets[0].host, Host::Tcp("db1".into()));
        assert_eq!(p.targets[1].host, Host::Unix("/tmp/sock".into()));
        assert!(p.targets.iter().all(|t| t.port == 6000));
        assert_eq!(p.user, "envuser");
        assert_eq!(p.password.as_ref().unwrap().expose(), "envpw");
        assert_eq!(p.passfile, Some(PathBuf::from("/etc/pgpass")));
        assert_eq!(p.dbname.as_deref(), Some("envdb"));
        assert_eq!(p.sslmode, SslMode::Disable);
        assert_eq!(p.application_name.as_deref(), Some("envapp"));
        assert_eq!(p.connect_timeout, Some(Duration::from_secs(7)));

        let p = ConnParams::parse_with_env(
            "host=h port=1 user=u password=p passfile=/pf dbname=d sslmode=allow application_name=a",
            &env,
        )
        .unwrap();
        assert_eq!(p.targets[0].host, Host::Tcp("h".into()));
        assert_eq!(p.targets[0].port, 1);
        assert_eq!(p.user, "u");
        assert_eq!(p.password.unwrap().expose(), "p");
        assert_eq!(p.passfile, Some(PathBuf::from("/pf")));
        assert_eq!(p.dbname.as_deref(), Some("d"));
        assert_eq!(p.sslmode, SslMode::Allow);
        assert_eq!(p.application_name.as_deref(), Some("a"));
    }

    #[test]
    fn url_form_and_quoted_values() {
        let env = env_of(&[]);
        let p = ConnParams::parse_with_env(
            "postgresql://walsafe:s%40cret@db.example:6543/mydb?sslmode=verify-full&application_name=x",
            &env,
        )
        .unwrap();
        assert_eq!(p.targets[0].host, Host::Tcp("db.example".into()));
        assert_eq!(p.targets[0].port, 6543);
        assert_eq!(p.user, "walsafe");
        assert_eq!(p.password.as_ref().unwrap().expose(), "s@cret");
        assert_eq!(p.dbname.as_deref(), Some("mydb"));
        assert_eq!(p.sslmode, SslMode::VerifyFull);
        assert_eq!(p.application_name.as_deref(), Some("x"));

        let p = ConnParams::parse_with_env(
            "host = /tmp/a\\ b port=5 password='it''s' user='o\\'neil'",
            &env,
        );
        // libpq does not accept '' as a quote inside quotes: the tokenizer ends
        // the value at the second quote and the next key is "s'".
        assert!(p.is_err());
        let p = ConnParams::parse_with_env(
            "host = /tmp/a\\ b port=5 password='it\\'s x' user='o\\'neil'",
            &env,
        )
        .unwrap();
        assert_eq!(p.targets[0].host, Host::Unix("/tmp/a b".into()));
        assert_eq!(p.password.unwrap().expose(), "it's x");
        assert_eq!(p.user, "o'neil");
    }

    #[test]
    fn multiple_hosts_and_ports() {
        let env = env_of(&[]);
        let p = ConnParams::parse_with_env("host=a,b,/s port=1,2,3", &env).unwrap();
        let ports: Vec<u16> = p.targets.iter().map(|t| t.port).collect();
        assert_eq!(ports, vec![1, 2, 3]);
        assert_eq!(
            p.targets[2].socket_path(),
            Some(PathBuf::from("/s/.s.PGSQL.3"))
        );
        assert!(ConnParams::parse_with_env("host=a,b,c port=1,2", &env).is_err());
        let p = ConnParams::parse_with_env("hostaddr=127.0.0.1 port=9", &env).unwrap();
        assert_eq!(p.targets[0].host, Host::Tcp("127.0.0.1".into()));
        assert_eq!(p.targets[0].hostaddr, Some("127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn bad_input_is_explained() {
        let env = env_of(&[]);
        let e = ConnParams::parse_with_env("host=a nonsense=1", &env).unwrap_err();
        assert!(e.to_string().contains("invalid [postgres] conninfo"), "{e}");
        let e = ConnParams::parse_with_env("sslmode=sometimes", &env).unwrap_err();
        assert!(e.to_string().contains("sometimes"), "{e}");
        let e = ConnParams::parse_with_env("host=a port", &env).unwrap_err();
        assert!(e.to_string().contains("missing \"=\""), "{e}");
        let e = ConnParams::parse_with_env("sslrootcert=system sslmode=require", &env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("only verify-full"), "{e}");
    }

    #[test]
    fn target_session_attrs_from_conninfo_url_and_environment() {
        use TargetSessionAttrs::*;
        let none = env_of(&[]);
        let p = ConnParams::parse_with_env("host=a,b", &none).unwrap();
        assert_eq!(p.target_session_attrs, Any);
        for (text, want) in [
            ("any", Any),
            ("read-write", ReadWrite),
            ("read-only", ReadOnly),
            ("primary", Primary),
            ("standby", Standby),
            ("prefer-standby", PreferStandby),
        ] {
            let p =
                ConnParams::parse_with_env(&format!("host=a,b target_session_attrs={text}"), &none)
                    .unwrap();
            assert_eq!(p.target_session_attrs, want, "{text}");
            assert_eq!(want.to_string(), text);
            let p = ConnParams::parse_with_env(
                &format!("postgresql://u@a:1,b:2/db?target_session_attrs={text}&sslmode=disable"),
                &none,
            )
            .unwrap();
            assert_eq!(p.target_session_attrs, want, "URL {text}");
            assert_eq!(p.targets.len(), 2);
            assert_eq!(p.sslmode, SslMode::Disable);
            let p =
                ConnParams::parse_with_env("host=a,b", &env_of(&[("PGTARGETSESSIONATTRS", text)]))
                    .unwrap();
            assert_eq!(p.target_session_attrs, want, "PGTARGETSESSIONATTRS={text}");
        }
        // The conninfo wins over the environment.
        let p = ConnParams::parse_with_env(
            "host=a target_session_attrs=primary",
            &env_of(&[("PGTARGETSESSIONATTRS", "standby")]),
        )
        .unwrap();
        assert_eq!(p.target_session_attrs, Primary);
        // An unknown value names the accepted ones.
        for (conninfo, env) in [
            ("host=a target_session_attrs=master", &none),
            ("postgresql://a/db?target_session_attrs=master", &none),
            ("host=a", &env_of(&[("PGTARGETSESSIONATTRS", "master")])),
        ] {
            let e = ConnParams::parse_with_env(conninfo, env)
                .unwrap_err()
                .to_string();
            assert!(e.contains("\"master\""), "{e}");
            assert!(
                e.contains("any, read-write, read-only, primary, standby or prefer-standby"),
                "{e}"
            );
        }
        let dbg = format!(
            "{:?}",
            ConnParams::parse_with_env("target_session_attrs=standby", &none).unwrap()
        );
        assert!(dbg.contains("target_session_attrs: Standby"), "{dbg}");
    }

    #[test]
    fn debug_never_shows_the_password() {
        let env = env_of(&[]);
        let p = ConnParams::parse_with_env("host=h user=u password=hunter2", &env).unwrap();
        let dbg = format!("{p:?} {:?}", p.password);
        assert!(!dbg.contains("hunter2"), "{dbg}");
        assert!(dbg.contains("<redacted>"));
    }

    #[test]
    fn passfile_matching_rules() {
        let content = "\
# comment line
db1:5432:*:alice:pw-one
*:*:replication:bob:pw\\:two\\\\x
localhost:5432:app:carol:pw:with:colons
ho\\:st:1:*:*:escaped-host
/tmp/sock:6000:*:dave:sockpw
*:*:*:*:fallback
";
        let s = |h, p, d, u| search_passfile(content, [h, p, d, u]);
        assert_eq!(s("db1", "5432", "x", "alice").as_deref(), Some("pw-one"));
        // Port must match exactly: falls through to the catch-all.
        assert_eq!(s("db1", "5433", "x", "alice").as_deref(), Some("fallback"));
        assert_eq!(
            s("any", "1", "replication", "bob").as_deref(),
            Some("pw:two\\x")
        );
        assert_eq!(
            s("localhost", "5432", "app", "carol").as_deref(),
            Some("pw:with:colons")
        );
        assert_eq!(s("ho:st", "1", "d", "u").as_deref(), Some("escaped-host"));
        assert_eq!(
            s("/tmp/sock", "6000", "d", "dave").as_deref(),
            Some("sockpw")
        );
        // A literal '*' in the wanted value does not make an escaped field match.
        assert_eq!(search_passfile("\\*:1:d:u:x\n", ["h", "1", "d", "u"]), None);
        assert_eq!(search_passfile("a:b:c\n", ["a", "b", "c", "d"]), None);
    }

    #[test]
    fn passfile_on_disk_permissions_and_localhost() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pgpass");
        std::fs::write(
            &path,
            "localhost:5432:replication:walsafe:sockpw\n127.0.0.1:6000:*:walsafe:tcppw\n",
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let got = |host: &str, port, db| {
            password_from_file(&path, host, port, db, "walsafe").map(|p| p.map(|p| p.0))
        };
        // The default socket directory matches "localhost".
        assert_eq!(
            got(DEFAULT_SOCKET_DIR, 5432, "replication")
                .unwrap()
                .as_deref(),
            Some("sockpw")
        );
        assert_eq!(got("/other/dir", 5432, "replication").unwrap(), None);
        assert_eq!(
            got("127.0.0.1", 6000, "postgres").unwrap().as_deref(),
            Some("tcppw")
        );

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(
            got("127.0.0.1", 6000, "postgres").unwrap_err(),
            PassfileWarning::InsecurePermissions(path.clone())
        );
        assert_eq!(
            password_from_file(dir.path(), "h", 1, "d", "u").unwrap_err(),
            PassfileWarning::NotPlainFile(dir.path().to_path_buf())
        );
        assert_eq!(
            password_from_file(&dir.path().join("missing"), "h", 1, "d", "u").unwrap(),
            None
        );

        // Through ConnParams: explicit password wins, else the file.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let pf = path.to_string_lossy().into_owned();
        let p = ConnParams::parse_with_env(
            "host=127.0.0.1 port=6000 user=walsafe",
            &env_of(&[("PGPASSFILE", &pf)]),
        )
        .unwrap();
        let mut warnings = Vec::new();
        let pw = p.password_for(&p.targets[0], "postgres", &mut |w| warnings.push(w));
        assert_eq!(pw.unwrap().expose(), "tcppw");
        let p = ConnParams::parse_with_env(
            "host=127.0.0.1 port=6000 user=walsafe",
            &env_of(&[("PGPASSFILE", &pf), ("PGPASSWORD", "explicit")]),
        )
        .unwrap();
        let pw = p.password_for(&p.targets[0], "postgres", &mut |w| warnings.push(w));
        assert_eq!(pw.unwrap().expose(), "explicit");
        assert!(warnings.is_empty());
    }
}
