//! check: `walsafe check [--switch-wal] [--pgdata DIR]`, the preflight a DBA runs before
//! (and after) starting the agent, in the spirit of `pgbackrest check` and
//! `barman check`.
//!
//! Every item ends as one line, `OK`, `WARNING`, `FAILED` or `SKIPPED`,
//! with a one-line explanation; a `FAILED` (and a `WARNING` with something
//! to do) is followed by a `fix:` line:
//!
//! ```text
//! FAILED  REPLICATION privilege: role "app" lacks the REPLICATION attribute; ...
//!         fix: as a superuser: ALTER ROLE app REPLICATION;
//! ```
//!
//! Every item runs even when an earlier one failed, so that one run shows
//! everything to fix; only an item that cannot run without a prerequisite
//! is `SKIPPED` and says which ("skipped: no connection"). Where one
//! connection fails, the other is used: a role without REPLICATION can
//! still open the SQL connection, so the slot and `max_wal_senders` are
//! still checked.
//!
//! The items, in order:
//!
//! | group      | item | how |
//! | ---------- | ---- | --- |
//! | PostgreSQL | connection, REPLICATION privilege | a walsender connection ([`ReplicationConnection::connect`]) |
//! |            | SQL connection | [`connect_sql`]; `walsafe run` does not need it, so failing it is a WARNING unless `--switch-wal` |
//! |            | wal_level | `SHOW wal_level` (replication connection, else SQL) |
//! |            | max_wal_senders | `pg_stat_replication` against the setting (this check's own walsender not counted) |
//! |            | replication slot, slot WAL | `pg_replication_slots`: exists, not active elsewhere, `wal_status`, WAL retained |
//! | repository | reachable, write, create-only writes, read back, delete | a probe object under `check/` |
//! |            | key | the key file loads; its id matches `walsafe.repo` |
//! |            | pinned cluster | `walsafe.repo` against IDENTIFY_SYSTEM (or `pg_control_system()`) |
//! | spool      | directory, writable, free space | probe file (create, fsync, remove); `statvfs` |
//! | end to end | switched segment (`--switch-wal`) | `pg_switch_wal()`, then wait for the segment in the repository |
//! | recovery   | restore_command mode (`--pgdata DIR`) | the signal files in DIR: what `wal-fetch` answers there when it cannot look (see `fetch::RecoveryMode`) |
//!
//! The slot active in another process is a failure, except when the
//! agent of this configuration is live (its state file is fresh and its
//! pid alive) and the walsender holding the slot announces the agent's
//! `application_name`: then it is the agent itself.
//!
//! This check's own connections announce `<application_name>-check`, so
//! that they are never mistaken for the agent (by
//! `synchronous_standby_names`, by monitoring, or by the slot item above).
//!
//! Side effects: one probe object in the repository and one probe file in
//! the spool, both removed; with `--switch-wal`, one WAL segment switch.
//! Nothing else is created (a missing spool directory is reported, not
//! made; a missing slot is reported, not created).
//!
//! Exit code: 0 when nothing FAILED, 1 otherwise.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;
use tokio_postgres::Client;

use crate::config::Config;
use crate::fetch::RecoveryMode;
use crate::pg::conninfo::ConnParams;
use crate::pg::error::PgError;
use crate::pg::replication::{parse_size_setting, AuthMethod, ReplicationConnection};
use crate::pg::sql::{connect_sql, current_wal_lsn, slot_state, switch_wal};
use crate::pg::{ClusterIdentity, Lsn, SegmentName, Server, TimelineId};
use crate::report::human_bytes;
use crate::repository::{
    key, Descriptor, KeyRing, ObjectName, PutResult, Repository, RepositoryConfig, RepositoryError,
    SegmentFile, Store, StoreError,
};

/// How long `--switch-wal` waits for the switched segment to be stored.
pub const SWITCH_WAL_TIMEOUT: Duration = Duration::from_secs(60);
/// How often `--switch-wal` looks for it.
const SWITCH_WAL_POLL: Duration = Duration::from_millis(500);
/// Free space in the spool below this many segments is a WARNING.
pub const SPOOL_WARN_SEGMENTS: u64 = 4;
/// Attempts per storage request during the check.
pub const CHECK_STORE_ATTEMPTS: u32 = 3;
/// Segment size assumed when neither the server nor the repository tells.
const DEFAULT_SEGMENT_SIZE: u64 = 16 << 20;

/// How one item ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Outcome {
    Ok,
    Warning,
    Failed,
    Skipped,
}

impl Outcome {
    /// The word printed at the start of the line.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "OK",
            Outcome::Warning => "WARNING",
            Outcome::Failed => "FAILED",
            Outcome::Skipped => "SKIPPED",
        }
    }
}

/// One checked item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Item {
    pub name: String,
    pub outcome: Outcome,
    /// One line: what was found.
    pub message: String,
    /// What to do, for failures (and warnings with something to do).
    pub fix: Option<String>,
}

impl Item {
    fn new(name: &str, outcome: Outcome, message: impl Into<String>) -> Item {
        Item {
            name: name.to_string(),
            outcome,
            message: message.into(),
            fix: None,
        }
    }
    fn ok(name: &str, message: impl Into<String>) -> Item {
        Item::new(name, Outcome::Ok, message)
    }
    fn warning(name: &str, message: impl Into<String>, fix: Option<String>) -> Item {
        Item {
            fix,
            ..Item::new(name, Outcome::Warning, message)
        }
    }
    fn failed(name: &str, message: impl Into<String>, fix: impl Into<String>) -> Item {
        Item {
            fix: Some(fix.into()),
            ..Item::new(name, Outcome::Failed, message)
        }
    }
    fn skipped(name: &str, why: &str) -> Item {
        Item::new(name, Outcome::Skipped, format!("skipped: {why}"))
    }

    /// The printed form: one line, plus a `fix:` line when there is a fix.
    pub fn render(&self) -> String {
        let mut s = format!(
            "{:<8}{}: {}\n",
            self.outcome.label(),
            self.name,
            self.message
        );
        if let Some(f) = &self.fix {
            s.push_str(&format!("{:<8}fix: {f}\n", ""));
        }
        s
    }
}

/// Every item of one run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub items: Vec<Item>,
}

impl Report {
    /// Items that ended with `outcome`.
    pub fn count(&self, outcome: Outcome) -> usize {
        self.items.iter().filter(|i| i.outcome == outcome).count()
    }

    /// The closing line.
    pub fn summary(&self) -> String {
        format!(
            "walsafe check: {} FAILED, {} WARNING, {} OK, {} skipped",
            self.count(Outcome::Failed),
            self.count(Outcome::Warning),
            self.count(Outcome::Ok),
            self.count(Outcome::Skipped)
        )
    }
}

/// Collects items and hands each to the printer as soon as it is known.
struct Run<'a> {
    report: Report,
    sink: &'a mut dyn FnMut(&Item),
}

impl Run<'_> {
    fn push(&mut self, item: Item) {
        (self.sink)(&item);
        self.report.items.push(item);
    }
}

/// The fix for a connection error, in one line.
pub fn fix_for(e: &PgError, user: &str) -> String {
    match e {
        PgError::Conninfo(_) => "correct [postgres] conninfo (libpq syntax, e.g. \"host=/var/run/postgresql user=walsafe\")".into(),
        PgError::Connect { .. } => "start PostgreSQL, or fix host/port in [postgres] conninfo (PGHOST/PGPORT)".into(),
        PgError::PasswordMissing { .. } => format!("add password=... to [postgres] conninfo, set PGPASSWORD, or add a line for role {user} to the password file of the user walsafe runs as"),
        PgError::AuthFailed { .. } => format!("put role {user}'s right password in [postgres] conninfo, PGPASSWORD or the password file, or reset it: ALTER ROLE {user} PASSWORD '...'"),
        PgError::HbaRejected { .. } => format!("add `host replication {user} <walsafe's address>/32 scram-sha-256` (or `local replication {user} peer`) to pg_hba.conf, then SELECT pg_reload_conf()"),
        PgError::RoleRejected { .. } => format!("CREATE ROLE {user} LOGIN REPLICATION PASSWORD '...', or fix user in [postgres] conninfo"),
        PgError::NotReplicationRole { .. } => format!("as a superuser: ALTER ROLE {user} REPLICATION;"),
        PgError::UnsupportedAuth { .. } => format!("use scram-sha-256, md5, password or trust for role {user} in pg_hba.conf"),
        PgError::TooManyConnections { .. } => "raise max_connections (restart) or close idle sessions".into(),
        PgError::WalSendersExhausted { .. } => "set max_wal_senders = 10 (with wal_level = replica) in postgresql.conf and restart PostgreSQL, or stop another replication client".into(),
        PgError::ServerUnavailable { .. } => "wait until PostgreSQL has started (or finished recovery), then run walsafe check again".into(),
        PgError::WalLevelTooLow { .. } => "set wal_level = replica in postgresql.conf and restart PostgreSQL".into(),
        PgError::NoSuitableHost { attrs, .. } => format!("wait for a failover to finish, start the host that should match, or list the right hosts / target_session_attrs (now {attrs}) in [postgres] conninfo"),
        _ => "see the message; fix it and run walsafe check again".into(),
    }
}

/// The fix for a storage error, in one line.
fn store_fix(e: &StoreError) -> String {
    match e {
        StoreError::Unreachable { .. } | StoreError::Transient { .. } => {
            "check that the storage service is up and reachable from this host (endpoint, network, DNS, proxy)".into()
        }
        StoreError::PermissionDenied { fix, .. } => fix.clone(),
        StoreError::BucketMissing { .. } => {
            "create the bucket (or directory), or fix [repository] url".into()
        }
        StoreError::Misconfigured { .. } => {
            "fix [repository] url and [repository.options]".into()
        }
        StoreError::Other { .. } => "see the message; fix it and run walsafe check again".into(),
    }
}

fn repository_error_fix(e: &RepositoryError) -> String {
    match e {
        RepositoryError::Store(s) => store_fix(s),
        RepositoryError::DescriptorInvalid { .. } => {
            "walsafe.repo is damaged or from a newer walsafe: upgrade walsafe, or restore the descriptor from a copy".into()
        }
        _ => "see the message; fix it and run walsafe check again".into(),
    }
}

/// Name of the user this process runs as (for "not writable by user X").
fn user_name() -> String {
    let uid = nix::unistd::geteuid();
    match nix::unistd::User::from_uid(uid) {
        Ok(Some(user)) => user.name,
        _ => format!("uid {uid}"),
    }
}

fn auth_name(m: AuthMethod) -> &'static str {
    match m {
        AuthMethod::Trust => "no password asked",
        AuthMethod::Cleartext => "password",
        AuthMethod::Md5 => "md5",
        AuthMethod::ScramSha256 => "scram-sha-256",
    }
}

fn version_text(num: u32) -> String {
    format!("{}.{}", num / 10000, num % 10000)
}

/// How the running agent of this configuration was seen, if it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AgentSeen {
    /// Its state file is fresh and names this live pid.
    StateFile(u32),
    /// No fresh state file (e.g. it started less than a second ago), but
    /// its metrics endpoint answers.
    Metrics,
}

impl AgentSeen {
    fn describe(self) -> String {
        match self {
            AgentSeen::StateFile(pid) => format!("pid {pid}"),
            AgentSeen::Metrics => "seen on its metrics endpoint".into(),
        }
    }
}

/// Is the agent of this configuration running?
async fn agent_seen(cfg: &Config) -> Option<AgentSeen> {
    if let Some(s) = crate::state::read(&cfg.spool.dir).filter(|s| s.is_live()) {
        return Some(AgentSeen::StateFile(s.pid));
    }
    match cfg.metrics.listen {
        Some(addr) if crate::metrics::scrape(addr).await.is_ok() => Some(AgentSeen::Metrics),
        _ => None,
    }
}

/// Runs every check; each item goes to `sink` as soon as it is decided.
pub async fn run(
    cfg: &Config,
    switch: bool,
    pgdata: Option<&Path>,
    sink: &mut dyn FnMut(&Item),
) -> Report {
    let mut run = Run {
        report: Report::default(),
        sink,
    };
    let params = ConnParams::parse(&cfg.postgres.conninfo);
    let user = params
        .as_ref()
        .map(|p| p.user.clone())
        .unwrap_or_else(|_| "walsafe".into());
    let agent_app = params
        .as_ref()
        .ok()
        .and_then(|p| p.application_name.clone())
        .unwrap_or_else(|| cfg.postgres.application_name.clone());
    let own_app = format!("{}-check", cfg.postgres.application_name);
    let agent = agent_seen(cfg).await;

    // ---- PostgreSQL ----
    let repl = ReplicationConnection::connect(&cfg.postgres.conninfo, &own_app).await;
    let sql = connect_sql(&cfg.postgres.conninfo, &own_app).await;
    let (mut repl, repl_err) = match repl {
        Ok(c) => (Some(c), None),
        Err(e) => (None, Some(e)),
    };
    let (sql, sql_err) = match sql {
        Ok(c) => (Some(c), None),
        Err(e) => (None, Some(e)),
    };
    const CONN: &str = "PostgreSQL connection";
    match (&repl, &repl_err) {
        (Some(c), _) => run.push(Item::ok(
            CONN,
            format!(
                "replication connection to {} as role \"{user}\" ({}), PostgreSQL {}",
                c.target(),
                auth_name(c.auth_method()),
                version_text(c.server_version_num())
            ),
        )),
        (None, Some(e @ PgError::NotReplicationRole { .. })) => run.push(Item::ok(
            CONN,
            format!("authenticated as role \"{user}\", but the server refused the replication connection ({})", e.server_error().map(|s| s.message.as_str()).unwrap_or("")),
        )),
        (None, Some(e)) => run.push(Item::failed(CONN, e.to_string(), fix_for(e, &user))),
        (None, None) => unreachable!("a connection or its error"),
    }

    const PRIV: &str = "REPLICATION privilege";
    match (&repl, &repl_err) {
        (Some(_), _) => run.push(Item::ok(PRIV, format!("role \"{user}\" may stream WAL"))),
        (None, Some(e @ PgError::NotReplicationRole { .. })) => {
            run.push(Item::failed(PRIV, e.to_string(), fix_for(e, &user)))
        }
        _ => match &sql {
            Some(c) => match c
                .query_one(
                    "SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user",
                    &[],
                )
                .await
            {
                Ok(row) if row.get::<_, bool>(0) => run.push(Item::ok(
                    PRIV,
                    format!("role \"{user}\" has REPLICATION (seen over the SQL connection)"),
                )),
                Ok(_) => run.push(Item::failed(
                    PRIV,
                    format!("role \"{user}\" lacks the REPLICATION attribute"),
                    format!("as a superuser: ALTER ROLE {user} REPLICATION;"),
                )),
                Err(e) => run.push(Item::skipped(PRIV, &format!("cannot read pg_roles: {e}"))),
            },
            None => run.push(Item::skipped(PRIV, "no connection")),
        },
    }

    const SQL: &str = "SQL connection";
    match &sql_err {
        None => run.push(Item::ok(
            SQL,
            "ordinary connection works (slot state, pg_switch_wal)",
        )),
        Some(e) => {
            // The same refusal as the replication connection's: say so
            // once, not twice.
            let same = repl_err
                .as_ref()
                .is_some_and(|r| std::mem::discriminant(r) == std::mem::discriminant(e));
            let (msg, fix) = if same {
                (
                    "refused for the same reason as the replication connection (above)".to_string(),
                    None,
                )
            } else {
                (
                    format!("{e} (walsafe run does not need it; walsafe check uses it to read the slot and max_wal_senders)"),
                    Some(fix_for(e, &user).replace("host replication", "host all")),
                )
            };
            if switch {
                run.push(Item::failed(
                    SQL,
                    format!("{msg}; --switch-wal needs it for pg_switch_wal()"),
                    fix.unwrap_or_else(|| "fix the connection (above)".into()),
                ))
            } else {
                run.push(Item::warning(SQL, msg, fix))
            }
        }
    }

    // Identity: IDENTIFY_SYSTEM, else pg_control_system() over SQL.
    let mut identity = None;
    let mut identity_err = None;
    if let Some(c) = repl.as_mut() {
        match identify_repl(c).await {
            Ok(i) => identity = Some(i),
            Err(e) => identity_err = Some(e.to_string()),
        }
    }
    if identity.is_none() {
        if let Some(c) = &sql {
            match identify_sql(c).await {
                Ok(i) => identity = Some(i),
                Err(e) => identity_err = Some(e),
            }
        }
    }

    const WAL_LEVEL: &str = "wal_level";
    let level = match repl.as_mut() {
        Some(c) => c.show("wal_level").await.map_err(|e| e.to_string()),
        None => match &sql {
            Some(c) => sql_setting(c, "wal_level").await,
            None => Err("no connection".into()),
        },
    };
    match level {
        Ok(l) if l == "replica" || l == "logical" => {
            run.push(Item::ok(WAL_LEVEL, format!("wal_level = {l}")))
        }
        Ok(l) => run.push(Item::failed(
            WAL_LEVEL,
            format!("wal_level = {l}: the server writes too little WAL for archiving and refuses replication"),
            "set wal_level = replica and max_wal_senders = 10 in postgresql.conf, then restart PostgreSQL",
        )),
        Err(e) if e == "no connection" => run.push(Item::skipped(WAL_LEVEL, "no connection")),
        Err(e) => run.push(Item::failed(
            WAL_LEVEL,
            format!("cannot read wal_level: {e}"),
            "see the message",
        )),
    }

    const SENDERS: &str = "max_wal_senders";
    let own_pid = repl
        .as_ref()
        .and_then(|c| c.backend_pid())
        .map_or(0, |p| p as i32);
    match &sql {
        Some(c) => run.push(check_wal_senders(c, own_pid, agent.is_some()).await),
        None => match &repl_err {
            None => run.push(Item::ok(
                SENDERS,
                "a WAL sender was free (this check got one); cannot count the others without the SQL connection",
            )),
            Some(e @ PgError::WalSendersExhausted { .. }) => {
                run.push(Item::failed(SENDERS, e.to_string(), fix_for(e, &user)))
            }
            Some(_) => run.push(Item::skipped(SENDERS, "no connection")),
        },
    }

    match &sql {
        Some(c) => {
            for item in check_slot(c, &cfg.postgres.slot, agent, &agent_app).await {
                run.push(item);
            }
        }
        None => {
            let why = if repl.is_some() {
                "no SQL connection (pg_replication_slots is not readable over replication)"
            } else {
                "no connection"
            };
            run.push(Item::skipped("replication slot", why));
            run.push(Item::skipped("slot WAL", why));
        }
    }
    if let Some(c) = repl.take() {
        c.close().await;
    }

    // ---- repositories ----
    // Every repository is checked; with several, each item is named by
    // the repository it is about. The first one (where backups go) also
    // tells the spool's segment size and serves --switch-wal.
    let several = cfg.repositories.len() > 1;
    let mut descriptor: Option<Option<Descriptor>> = None;
    let mut repo_for_switch = None;
    for (i, rc) in cfg.repositories.iter().enumerate() {
        let (items, d, repo) =
            check_repository(rc, identity.as_ref(), identity_err.as_deref()).await;
        for mut item in items {
            if several {
                item.name = format!("{} [{}]", item.name, rc.name);
            }
            run.push(item);
        }
        if i == 0 {
            descriptor = d;
            repo_for_switch = repo;
        }
    }

    // ---- spool ----
    let segment_size = identity
        .map(|i| i.identity.segment_size)
        .or_else(|| {
            descriptor
                .as_ref()
                .and_then(|d| d.as_ref())
                .map(|d| d.segment_size)
        })
        .unwrap_or(DEFAULT_SEGMENT_SIZE);
    for item in check_spool(&cfg.spool.dir, segment_size, agent) {
        run.push(item);
    }

    // ---- end to end ----
    if switch {
        const SWITCH: &str = "switched segment";
        match (&sql, &identity, &repo_for_switch) {
            (Some(c), Some(id), Some(repo)) => {
                run.push(check_switch(c, id, repo, agent.is_some()).await)
            }
            (None, _, _) => run.push(Item::skipped(SWITCH, "no SQL connection")),
            (_, None, _) => run.push(Item::skipped(SWITCH, "cluster identity unknown")),
            (_, _, None) => run.push(Item::skipped(SWITCH, "repository cannot be opened")),
        }
    }

    // ---- recovery ----
    if let Some(dir) = pgdata {
        run.push(check_recovery_mode(dir));
    }
    run.report
}

/// What `wal-fetch` would answer, as `restore_command` of the server in
/// data directory `dir`, when it cannot look at the archive (see
/// [`RecoveryMode`]).
fn check_recovery_mode(dir: &Path) -> Item {
    const NAME: &str = "restore_command mode";
    if !dir.join("PG_VERSION").is_file() {
        return Item::failed(
            NAME,
            format!("{} is not a PostgreSQL data directory (no PG_VERSION)", dir.display()),
            "give --pgdata the data directory of the server whose restore_command runs walsafe wal-fetch",
        );
    }
    Item::ok(
        NAME,
        format!("{}: {}", dir.display(), RecoveryMode::of(dir).describe()),
    )
}

async fn identify_repl(c: &mut ReplicationConnection) -> Result<Server, PgError> {
    c.identify_system().await
}

async fn identify_sql(c: &Client) -> Result<Server, String> {
    let row = c
        .query_one(
            "SELECT (SELECT system_identifier FROM pg_control_system())::text, \
                    (SELECT timeline_id FROM pg_control_checkpoint())::text, \
                    current_setting('wal_segment_size'), current_setting('server_version_num'), \
                    (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
                          ELSE pg_current_wal_lsn() END)::text",
            &[],
        )
        .await
        .map_err(|e| format!("reading pg_control_system() over SQL: {e}"))?;
    let text = |i: usize| row.get::<_, Option<String>>(i).unwrap_or_default();
    let bad = |what: &str, v: String| format!("pg_control_system() gave a bad {what}: {v:?}");
    Ok(Server {
        identity: ClusterIdentity::new(
            text(0)
                .parse()
                .map_err(|_| bad("system identifier", text(0)))?,
            text(3)
                .parse()
                .map_err(|_| bad("server_version_num", text(3)))?,
            parse_size_setting(&text(2)).ok_or_else(|| bad("wal_segment_size", text(2)))?,
        ),
        timeline: TimelineId(text(1).parse().map_err(|_| bad("timeline", text(1)))?),
        xlogpos: text(4).parse().unwrap_or(Lsn::INVALID),
    })
}

async fn sql_setting(c: &Client, name: &str) -> Result<String, String> {
    c.query_one("SELECT current_setting($1)", &[&name])
        .await
        .map(|r| r.get(0))
        .map_err(|e| format!("current_setting('{name}'): {e}"))
}

async fn check_wal_senders(c: &Client, own_pid: i32, agent_live: bool) -> Item {
    const N: &str = "max_wal_senders";
    let row = match c
        .query_one(
            "SELECT current_setting('max_wal_senders')::int, \
                    count(*) FILTER (WHERE pid <> $1)::int, \
                    coalesce(string_agg(DISTINCT application_name, ', ') FILTER (WHERE pid <> $1), '') \
             FROM pg_stat_replication",
            &[&own_pid],
        )
        .await
    {
        Ok(r) => r,
        Err(e) => {
            return Item::failed(
                N,
                format!("cannot read pg_stat_replication: {e}"),
                "grant the role pg_monitor, or run check with a superuser conninfo",
            )
        }
    };
    let (max, used, apps): (i32, i32, String) = (row.get(0), row.get(1), row.get(2));
    let who = if apps.is_empty() {
        String::new()
    } else {
        format!(" ({apps})")
    };
    if max == 0 {
        return Item::failed(
            N,
            "max_wal_senders = 0: the server accepts no replication connection",
            "set max_wal_senders = 10 (it needs wal_level = replica) in postgresql.conf and restart PostgreSQL",
        );
    }
    if used >= max && !agent_live {
        return Item::failed(
            N,
            format!("all {max} WAL senders are in use{who}: walsafe cannot connect"),
            "raise max_wal_senders in postgresql.conf and restart PostgreSQL, or stop a replication client",
        );
    }
    Item::ok(
        N,
        format!(
            "{used} of {max} in use{who}{}",
            if agent_live {
                ", walsafe's among them"
            } else {
                ""
            }
        ),
    )
}

/// The slot items: "replication slot" (exists, who holds it) and
/// "slot WAL" (`wal_status`, WAL retained).
async fn check_slot(
    c: &Client,
    slot: &str,
    agent: Option<AgentSeen>,
    agent_app: &str,
) -> Vec<Item> {
    const SLOT: &str = "replication slot";
    const WAL: &str = "slot WAL";
    let state = match slot_state(c, slot).await {
        Ok(s) => s,
        Err(e) => {
            return vec![
                Item::failed(
                    SLOT,
                    format!("cannot read pg_replication_slots: {e}"),
                    "see the message",
                ),
                Item::skipped(WAL, "slot state unknown"),
            ]
        }
    };
    let Some(state) = state else {
        let free = c
            .query_one(
                "SELECT current_setting('max_replication_slots')::int - (SELECT count(*) FROM pg_replication_slots)::int",
                &[],
            )
            .await
            .map(|r| r.get::<_, i32>(0));
        let first = match free {
            Ok(n) if n <= 0 => Item::failed(
                SLOT,
                format!("slot \"{slot}\" does not exist and every replication slot is taken (max_replication_slots)"),
                "raise max_replication_slots (restart), or drop an unused slot: SELECT pg_drop_replication_slot('<name>')",
            ),
            _ => Item::warning(
                SLOT,
                format!("slot \"{slot}\" does not exist yet; walsafe run creates it at first start (physical, WAL reserved)"),
                None,
            ),
        };
        return vec![first, Item::skipped(WAL, "the slot does not exist yet")];
    };
    let mut items = Vec::new();
    match state.active_pid {
        None => items.push(Item::ok(
            SLOT,
            format!("slot \"{slot}\" exists, not in use"),
        )),
        Some(pid) => {
            let holder = c
                .query_opt(
                    "SELECT application_name, coalesce(client_addr::text, 'local socket') FROM pg_stat_replication WHERE pid = $1",
                    &[&pid],
                )
                .await
                .ok()
                .flatten()
                .map(|r| (r.get::<_, Option<String>>(0).unwrap_or_default(), r.get::<_, String>(1)));
            let app = holder.as_ref().map(|h| h.0.clone()).unwrap_or_default();
            let from = holder
                .as_ref()
                .map(|h| format!(", application_name \"{}\", from {}", h.0, h.1))
                .unwrap_or_default();
            if let (Some(agent), true) = (agent, app == agent_app) {
                items.push(Item::ok(
                    SLOT,
                    format!(
                        "slot \"{slot}\" is in use by the running walsafe agent ({}; walsender pid {pid})",
                        agent.describe()
                    ),
                ));
            } else {
                items.push(Item::failed(
                    SLOT,
                    format!("slot \"{slot}\" is active in another process (walsender pid {pid}{from}); walsafe cannot stream from it"),
                    format!("stop that client (SELECT pg_terminate_backend({pid}) ends its connection), or give walsafe a slot of its own in [postgres] slot"),
                ));
            }
        }
    }
    let retained = match (state.restart_lsn, current_wal_lsn(c).await) {
        (Some(r), Ok(cur)) => Some((r, cur.bytes_after(r))),
        _ => None,
    };
    let held = match retained {
        Some((r, b)) => format!("holds {} of WAL (restart_lsn {r})", human_bytes(b)),
        None => "restart_lsn not set".into(),
    };
    match state.wal_status.as_deref() {
        Some("lost") => items.push(Item::failed(
            WAL,
            "wal_status = lost: the server already removed WAL this slot protected, so the archive has a gap",
            format!("drop and recreate the slot (SELECT pg_drop_replication_slot('{slot}'); walsafe run creates it again), then take a new base backup"),
        )),
        Some("unreserved") => items.push(Item::warning(
            WAL,
            format!("wal_status = unreserved, {held}: past max_slot_wal_keep_size, the next checkpoint may remove WAL walsafe has not archived"),
            Some("start walsafe run now so it catches up, or raise max_slot_wal_keep_size".into()),
        )),
        Some(s) => items.push(Item::ok(WAL, format!("wal_status = {s}, {held}"))),
        None => items.push(Item::ok(WAL, held)),
    }
    items
}

/// The repository probe: write, create-only, read back, delete, all
/// through the repository (so the probe is encoded, and authenticated
/// under the key, like every object).
async fn probe_repository(repo: &Repository) -> Vec<Item> {
    const W: &str = "repository write";
    const C: &str = "create-only writes";
    const R: &str = "repository read-back";
    const D: &str = "repository delete";
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let probe = ObjectName::probe(&format!("probe-{}-{nanos:x}", std::process::id()))
        .expect("a valid probe name");
    let key = probe.key();
    let first = Bytes::from(format!("walsafe check probe {nanos:x} (first)"));
    let second = Bytes::from(format!("walsafe check probe {nanos:x} (second)"));
    let mut items = Vec::new();
    match repo.create(&probe, first.clone()).await {
        Ok(PutResult::Created) => items.push(Item::ok(W, format!("wrote {key}"))),
        Ok(PutResult::AlreadyExists) => {
            items.push(Item::failed(
                W,
                format!("the new probe object {key} was reported as already existing"),
                "the store answers create-only writes wrongly; do not use it for WAL",
            ));
            for n in [C, R, D] {
                items.push(Item::skipped(n, "the probe could not be written"));
            }
            return items;
        }
        Err(e) => {
            let fix = repository_error_fix(&e);
            items.push(Item::failed(W, e.to_string(), fix));
            for n in [C, R, D] {
                items.push(Item::skipped(n, "the probe could not be written"));
            }
            return items;
        }
    }
    match repo.create(&probe, second.clone()).await {
        Ok(PutResult::AlreadyExists) => items.push(Item::ok(
            C,
            "a second create of the same key was refused, as it must be",
        )),
        Ok(PutResult::Created) => items.push(Item::failed(
            C,
            "this store does not honour create-only writes; walsafe cannot guarantee never overwriting WAL",
            "use a store with conditional writes (S3 If-None-Match, a local filesystem), or for S3-compatible servers enable conditional PUT support",
        )),
        Err(e) => {
            let fix = repository_error_fix(&e);
            items.push(Item::failed(C, e.to_string(), fix));
        }
    }
    match repo.get(&probe).await {
        Ok(Some(b)) if b == first => items.push(Item::ok(R, "the probe reads back unchanged")),
        Ok(Some(b)) if b == second => items.push(Item::failed(
            R,
            "the probe reads back as the second write: the store silently overwrote it",
            "use a store with conditional writes; walsafe must never overwrite WAL",
        )),
        Ok(Some(b)) => items.push(Item::failed(
            R,
            format!("the probe reads back as {} different bytes", b.len()),
            "the store returns other data than was written: do not use it",
        )),
        Ok(None) => items.push(Item::failed(
            R,
            format!("the probe {key} is not found right after it was written"),
            "the store is not read-after-write consistent: do not use it for WAL",
        )),
        Err(e) => {
            let fix = repository_error_fix(&e);
            items.push(Item::failed(R, e.to_string(), fix));
        }
    }
    match repo.delete(&probe).await {
        Ok(()) => match repo.get_raw(&probe).await {
            Ok(None) => items.push(Item::ok(D, "the probe was deleted")),
            Ok(Some(_)) => items.push(Item::failed(
                D,
                format!("the probe {key} is still there after delete"),
                "grant delete permission (walsafe deletes chunks once their segment is stored), then remove the probe by hand",
            )),
            Err(e) => {
                let fix = repository_error_fix(&e);
                items.push(Item::failed(D, e.to_string(), fix));
            }
        },
        Err(e) => items.push(Item::failed(
            D,
            e.to_string(),
            format!(
                "grant delete permission (walsafe deletes chunks once their segment is stored), then remove {key} by hand"
            ),
        )),
    }
    items
}

/// The items [`probe_repository`] reports, skipped when it cannot run.
const WRITE_ITEMS: [&str; 4] = [
    "repository write",
    "create-only writes",
    "repository read-back",
    "repository delete",
];

/// The items of one repository: reachable, writes (create-only,
/// read-back, delete), key, pinned cluster; with its descriptor (`None`
/// when unreachable) and the opened repository.
async fn check_repository(
    rc: &RepositoryConfig,
    identity: Option<&Server>,
    identity_err: Option<&str>,
) -> (Vec<Item>, Option<Option<Descriptor>>, Option<Repository>) {
    let mut items = Vec::new();
    let store = Store::open(&rc.url, &rc.options, rc.retries.min(CHECK_STORE_ATTEMPTS));
    let key_result = rc.key_file.as_ref().map(|p| key::load_key_ring(p));
    let mut descriptor: Option<Option<Descriptor>> = None;
    let mut repo_for_switch = None;
    match store {
        Err(e) => {
            items.push(Item::failed(
                "repository reachable",
                e.to_string(),
                store_fix(&e),
            ));
            for n in WRITE_ITEMS {
                items.push(Item::skipped(n, "repository cannot be opened"));
            }
        }
        Ok(store) => {
            let ring = key_result.as_ref().and_then(|r| r.as_ref().ok()).cloned();
            let repo =
                Repository::from_parts(store.clone(), None, rc.compression, rc.compression_level);
            let repo = match ring {
                Some(r) => repo.with_ring(r),
                None => repo,
            };
            let reach = async {
                repo.list_probes().await?;
                repo.descriptor().await
            }
            .await;
            match reach {
                Ok(d) => {
                    items.push(Item::ok(
                        "repository reachable",
                        format!(
                            "{} listed and read; {}",
                            repo.url(),
                            match &d {
                                Some(d) =>
                                    format!("pinned to system identifier {}", d.system_identifier),
                                None => "empty (no walsafe.repo yet)".into(),
                            }
                        ),
                    ));
                    descriptor = Some(d);
                    for item in probe_repository(&repo).await {
                        items.push(item);
                    }
                }
                Err(e) => {
                    items.push(Item::failed(
                        "repository reachable",
                        e.to_string(),
                        repository_error_fix(&e),
                    ));
                    for n in WRITE_ITEMS {
                        items.push(Item::skipped(n, "repository unreachable"));
                    }
                }
            }
            repo_for_switch = Some(repo);
        }
    }

    items.push(check_key(rc, key_result.as_ref(), descriptor.as_ref()));
    if let (Some(repo), Some(Some(_)), Some(Ok(ring))) =
        (&repo_for_switch, &descriptor, key_result.as_ref())
    {
        items.push(check_keys_in_use(repo, ring).await);
    }

    const PIN: &str = "pinned cluster";
    match (&descriptor, identity) {
        (None, _) => items.push(Item::skipped(PIN, "repository unreachable")),
        (Some(_), None) => items.push(Item::skipped(
            PIN,
            &format!(
                "cluster identity unknown ({})",
                identity_err.unwrap_or("no connection")
            ),
        )),
        (Some(d), Some(id)) => items.push(check_pin(d.as_ref(), &id.identity)),
    }

    (items, descriptor, repo_for_switch)
}

/// The key item.
fn check_key(
    rc: &RepositoryConfig,
    loaded: Option<&Result<KeyRing, key::KeyError>>,
    descriptor: Option<&Option<Descriptor>>,
) -> Item {
    const K: &str = "repository key";
    let key = match loaded {
        Some(Err(e)) => {
            let fix = match e {
                key::KeyError::Missing { path } => format!("point [repository] key_file at the repository's key, or create a key for a new repository: walsafe keygen {}", path.display()),
                key::KeyError::Unreadable { path, .. } => format!("chown {} {} && chmod 600 {}", user_name(), path.display(), path.display()),
                _ => "point [repository] key_file at the key file walsafe keygen wrote".into(),
            };
            return Item::failed(K, e.to_string(), fix);
        }
        Some(Ok(ring)) => Some(ring),
        None => None,
    };
    let Some(descriptor) = descriptor else {
        return match key {
            Some(k) => Item::ok(
                K,
                format!(
                    "key id {} loads; repository unreachable, so not compared",
                    k.current().key_id_hex()
                ),
            ),
            None => Item::skipped(K, "repository unreachable"),
        };
    };
    match (descriptor, key) {
        (None, Some(k)) => Item::ok(K, format!("key id {} loads; the new repository will be encrypted with it", k.current().key_id_hex())),
        (None, None) => Item::ok(K, "no key_file: WAL will be stored unencrypted (checksummed)"),
        (Some(d), None) => match &d.key_id {
            Some(id) => Item::failed(
                K,
                format!("the repository is encrypted with key id {id}, and no key_file is configured"),
                format!("set [repository] key_file to the key file with id {id} (written by walsafe keygen when the repository was created)"),
            ),
            None => Item::ok(K, "repository and configuration both unencrypted (checksummed)"),
        },
        (Some(d), Some(k)) => match &d.key_id {
            None => Item::failed(
                K,
                format!("key_file {} (key id {}) is configured, but the repository was created unencrypted", rc.key_file.as_deref().unwrap_or(Path::new("")).display(), k.current().key_id_hex()),
                "remove key_file from [repository], or use a new repository URL for encrypted WAL",
            ),
            Some(id) => match k.find_hex(id) {
                None => Item::failed(
                    K,
                    format!("the configured key file holds key id {}, the repository is encrypted with key id {id}", k.ids_hex().join(", ")),
                    format!("add the key with id {id} to [repository] key_file (one walsafe-key-v1 line per key), or point key_file at it"),
                ),
                Some(rk) if !d.mac_is_valid(rk) => Item::failed(
                    K,
                    format!("walsafe.repo names key id {id} but its HMAC does not verify: it was modified without the key"),
                    "investigate who can write to the repository; restore walsafe.repo from a copy",
                ),
                Some(_) if !k.lacking(d.keys_in_use()).is_empty() => {
                    let missing = k.lacking(d.keys_in_use());
                    Item::failed(
                        K,
                        format!("walsafe.repo lists key id(s) {} as needed by the repository's objects, and the key file lacks them", missing.join(", ")),
                        "add those keys back to [repository] key_file (one walsafe-key-v1 line per key) from your copy off this host",
                    )
                }
                Some(_) if k.current().key_id_hex() != *id => Item::ok(
                    K,
                    format!("key id {id} (the repository's first) is in the key file; new objects are encrypted with key id {}", k.current().key_id_hex()),
                ),
                Some(_) => Item::ok(K, format!("key id {id} matches the repository")),
            },
        },
    }
}

/// The "keys in use" item: what each key protects, counted object by
/// object ([`crate::rekey::census`]); FAILED when an object needs a key
/// the key file lacks.
async fn check_keys_in_use(repo: &Repository, ring: &KeyRing) -> Item {
    const K: &str = "keys in use";
    let census = match crate::rekey::census(repo).await {
        Ok(c) => c,
        Err(e) => {
            return Item::failed(
                K,
                crate::report::error_line(&e),
                "check that the repository is readable; an object named above may be damaged (walsafe wal-verify, backup-verify)",
            )
        }
    };
    let tally = |id: &str| {
        let t = census.of(id);
        format!("{} objects ({})", t.objects, human_bytes(t.bytes))
    };
    let missing = ring.lacking(census.keys());
    if !missing.is_empty() {
        let what: Vec<String> = missing
            .iter()
            .map(|id| format!("key id {id}: {}", tally(id)))
            .collect();
        return Item::failed(
            K,
            format!("objects are encrypted with keys the key file lacks ({})", what.join("; ")),
            "add those keys back to the key file (one walsafe-key-v1 line per key) from your copy off this host",
        );
    }
    let unencrypted = census.of(crate::rekey::UNENCRYPTED);
    if unencrypted.objects > 0 {
        return Item::failed(
            K,
            format!("{} in this encrypted repository are unencrypted: they will be refused", tally(crate::rekey::UNENCRYPTED)),
            "find out who wrote them (an agent without key_file?); walsafe never reads them while a key is configured",
        );
    }
    let current = ring.current().key_id_hex();
    let mut parts = vec![format!("key id {current} (current): {}", tally(&current))];
    let mut hints = Vec::new();
    for id in ring.ids_hex().into_iter().skip(1) {
        parts.push(format!("key id {id}: {}", tally(&id)));
        if census.of(&id).objects > 0 {
            hints.push(format!("`walsafe key-rotate --rewrite --apply` moves key id {id}'s objects under the current key"));
        } else {
            hints.push(format!("key id {id} protects nothing: `walsafe key-rotate --retire {id} --apply` removes it"));
        }
    }
    let mut message = parts.join("; ");
    if !hints.is_empty() {
        message = format!("{message}; {}", hints.join("; "));
    }
    Item::ok(K, message)
}

/// The pinned-cluster item.
fn check_pin(d: Option<&Descriptor>, c: &ClusterIdentity) -> Item {
    const P: &str = "pinned cluster";
    let Some(d) = d else {
        return Item::ok(
            P,
            format!(
                "fresh repository: will be pinned at first run to system identifier {} (PostgreSQL {}, {} segments)",
                c.system_identifier,
                c.pg_version_num / 10000,
                human_bytes(c.segment_size)
            ),
        );
    };
    let mut wrong = Vec::new();
    if d.system_identifier != c.system_identifier {
        wrong.push(format!(
            "the repository is pinned to system identifier {}, this cluster is {}",
            d.system_identifier, c.system_identifier
        ));
    }
    if d.segment_size != c.segment_size {
        wrong.push(format!(
            "its segment size is {}, this cluster's {}",
            human_bytes(d.segment_size),
            human_bytes(c.segment_size)
        ));
    }
    if d.pg_version_num / 10000 != c.pg_version_num / 10000 {
        wrong.push(format!(
            "it holds PostgreSQL {} WAL, this cluster is PostgreSQL {}",
            d.pg_version_num / 10000,
            c.pg_version_num / 10000
        ));
    }
    if wrong.is_empty() {
        Item::ok(
            P,
            format!(
                "repository belongs to this cluster (system identifier {}, PostgreSQL {}, {} segments)",
                c.system_identifier,
                c.pg_version_num / 10000,
                human_bytes(c.segment_size)
            ),
        )
    } else {
        Item::failed(
            P,
            wrong.join("; "),
            "point [repository] url at this cluster's own repository (a new prefix); clusters never share one, and a major upgrade starts a new one",
        )
    }
}

/// The nearest existing ancestor of `p`.
fn existing_ancestor(p: &Path) -> Option<PathBuf> {
    p.ancestors()
        .find(|a| !a.as_os_str().is_empty() && a.exists())
        .map(Path::to_path_buf)
}

/// Free bytes for an unprivileged user on the filesystem of `p`.
fn free_bytes(p: &Path) -> std::io::Result<u64> {
    let s = nix::sys::statvfs::statvfs(p)?;
    Ok(s.blocks_available() as u64 * s.fragment_size() as u64)
}

/// Creates, fsyncs and removes a probe file in `dir`.
fn probe_dir(dir: &Path) -> std::io::Result<()> {
    let p = dir.join(format!(".walsafe-check.{}", std::process::id()));
    let r = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&p)?;
        f.write_all(&[0u8; 4096])?;
        f.sync_all()?;
        std::fs::remove_file(&p)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&p);
    }
    r
}

/// The spool items: directory, writable, free space.
fn check_spool(dir: &Path, segment_size: u64, agent: Option<AgentSeen>) -> Vec<Item> {
    const DIR: &str = "spool directory";
    const W: &str = "spool writable";
    const F: &str = "spool free space";
    let user = user_name();
    let mut items = Vec::new();
    let exists = match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {
            let lock = std::fs::read_to_string(dir.join(crate::spool::LOCK_FILE)).ok();
            let lock_pid = lock.as_deref().and_then(|t| t.trim().parse::<u32>().ok());
            let owner = match (agent, lock_pid) {
                (Some(a), _) => format!("; in use by the running agent ({})", a.describe()),
                (None, Some(pid)) if crate::state::process_alive(pid) => {
                    format!("; its lock names pid {pid}, which is alive but publishes no state")
                }
                (None, Some(pid)) => format!("; last used by pid {pid}, which is not running"),
                (None, None) => String::new(),
            };
            items.push(Item::ok(DIR, format!("{} exists{owner}", dir.display())));
            true
        }
        Ok(_) => {
            items.push(Item::failed(
                DIR,
                format!("{} exists but is not a directory", dir.display()),
                "set [spool] dir to a directory of its own",
            ));
            false
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            match existing_ancestor(dir) {
                Some(a) => match probe_dir(&a) {
                    Ok(()) => items.push(Item::ok(
                        DIR,
                        format!("{} does not exist yet; walsafe run will create it ({} is writable)", dir.display(), a.display()),
                    )),
                    Err(e) => items.push(Item::failed(
                        DIR,
                        format!("{} does not exist, and {} is not writable by user {user} ({e})", dir.display(), a.display()),
                        format!("create it for the user walsafe runs as: install -d -o {user} -m 700 {}", dir.display()),
                    )),
                },
                None => items.push(Item::failed(
                    DIR,
                    format!("{} does not exist and no parent does", dir.display()),
                    "fix [spool] dir",
                )),
            }
            false
        }
        Err(e) => {
            items.push(Item::failed(
                DIR,
                format!("cannot stat {} as user {user}: {e}", dir.display()),
                format!(
                    "give user {user} access to {} and its parents",
                    dir.display()
                ),
            ));
            false
        }
    };
    if exists {
        match probe_dir(dir) {
            Ok(()) => items.push(Item::ok(
                W,
                format!(
                    "created, fsynced and removed a file in {} as user {user}",
                    dir.display()
                ),
            )),
            Err(e) => items.push(Item::failed(
                W,
                format!(
                    "cannot create a file in {} as user {user}: {e}",
                    dir.display()
                ),
                format!(
                    "chown {user} {} (the user walsafe runs as), or choose another [spool] dir",
                    dir.display()
                ),
            )),
        }
    } else {
        items.push(Item::skipped(W, "the spool directory does not exist"));
    }
    let at = if exists {
        Some(dir.to_path_buf())
    } else {
        existing_ancestor(dir)
    };
    match at.map(|a| free_bytes(&a)) {
        Some(Ok(free)) => {
            let usage = crate::spool::inspect::list(dir);
            let used = format!(
                "{} free; the spool holds {} ({} complete segment(s) not yet stored, {} .partial)",
                human_bytes(free),
                human_bytes(usage.total_bytes),
                usage.complete_segments,
                usage.partial_files
            );
            if free < segment_size {
                items.push(Item::failed(
                    F,
                    format!(
                        "{used}: less than one {} segment",
                        human_bytes(segment_size)
                    ),
                    "free space on the spool's filesystem, or move [spool] dir to a larger one",
                ));
            } else if free < SPOOL_WARN_SEGMENTS * segment_size {
                items.push(Item::warning(
                    F,
                    format!("{used}: less than {SPOOL_WARN_SEGMENTS} segments of {}", human_bytes(segment_size)),
                    Some("free space on the spool's filesystem: when it fills, walsafe stops reading and WAL piles up on the server".into()),
                ));
            } else {
                items.push(Item::ok(F, used));
            }
        }
        Some(Err(e)) => items.push(Item::failed(
            F,
            format!("cannot read the free space of {}: {e}", dir.display()),
            "see the message",
        )),
        None => items.push(Item::skipped(F, "no existing directory")),
    }
    items
}

/// `--switch-wal`: switch, then wait for the closed segment in the repository.
async fn check_switch(c: &Client, id: &Server, repo: &Repository, agent_live: bool) -> Item {
    const S: &str = "switched segment";
    let seg = id.identity.segment_size;
    let lsn = match switch_wal(c).await {
        Ok(l) => l,
        Err(e) => {
            return Item::failed(
                S,
                e.to_string(),
                "run check with a role allowed to call pg_switch_wal() (a superuser, or GRANT EXECUTE ON FUNCTION pg_switch_wal() TO <role>)",
            )
        }
    };
    // The segment holding the last byte before the switch point.
    let seg_name = SegmentName::containing(id.timeline, Lsn(lsn.0.saturating_sub(1)), seg);
    let name = seg_name.file_name(seg);
    let started = Instant::now();
    let mut last_note = Instant::now();
    let mut last_err = None;
    eprintln!(
        "walsafe check: switched WAL at {lsn}; waiting up to {} s for {name} in the repository",
        SWITCH_WAL_TIMEOUT.as_secs()
    );
    while started.elapsed() < SWITCH_WAL_TIMEOUT {
        match repo.get_raw(&ObjectName::Segment(SegmentFile::of(seg_name, seg))).await {
            Ok(Some(_)) => {
                return Item::ok(
                    S,
                    format!("pg_switch_wal() closed {name} at {lsn}; stored in the repository after {:.1} s", started.elapsed().as_secs_f64()),
                )
            }
            Ok(None) => {}
            Err(e) => last_err = Some(e.to_string()),
        }
        if last_note.elapsed() >= Duration::from_secs(5) {
            eprintln!(
                "walsafe check: still waiting for {name} ({} s)",
                started.elapsed().as_secs()
            );
            last_note = Instant::now();
        }
        tokio::time::sleep(SWITCH_WAL_POLL).await;
    }
    let why = last_err
        .map(|e| format!(" (last error: {e})"))
        .unwrap_or_default();
    Item::failed(
        S,
        format!("{name} (closed by pg_switch_wal() at {lsn}) did not reach the repository within {} s{why}", SWITCH_WAL_TIMEOUT.as_secs()),
        if agent_live {
            "the agent runs but does not store WAL: read its log (walsafe run) for upload errors".to_string()
        } else {
            "start the agent (walsafe run), or set archive_command = 'walsafe wal-push %p'".to_string()
        },
    )
}

/// `walsafe check [--switch-wal]`.
pub async fn command(cfg: Config, switch: bool, pgdata: Option<PathBuf>) -> ExitCode {
    let mut stdout = std::io::stdout();
    let report = run(&cfg, switch, pgdata.as_deref(), &mut |item| {
        let _ = stdout.write_all(item.render().as_bytes());
        let _ = stdout.flush();
    })
    .await;
    println!("{}", report.summary());
    if report.count(Outcome::Failed) == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repository::Key;

    fn ident(sysid: u64) -> ClusterIdentity {
        ClusterIdentity::new(sysid, 150004, 16 << 20)
    }

    #[test]
    fn items_render_with_fix_lines() {
        let i = Item::failed(
            "wal_level",
            "wal_level = minimal",
            "set wal_level = replica",
        );
        assert_eq!(
            i.render(),
            "FAILED  wal_level: wal_level = minimal\n        fix: set wal_level = replica\n"
        );
        assert_eq!(Item::ok("x", "fine").render(), "OK      x: fine\n");
        assert_eq!(
            Item::skipped("y", "no connection").render(),
            "SKIPPED y: skipped: no connection\n"
        );
    }

    #[test]
    fn the_recovery_mode_of_a_data_directory_is_named() {
        let d = tempfile::tempdir().unwrap();
        let i = check_recovery_mode(d.path());
        assert_eq!(i.outcome, Outcome::Failed, "{i:?}");
        assert!(i.message.contains("no PG_VERSION"), "{i:?}");
        std::fs::write(d.path().join("PG_VERSION"), "15\n").unwrap();
        assert!(check_recovery_mode(d.path())
            .message
            .contains("no recovery"));
        std::fs::write(d.path().join("recovery.signal"), "").unwrap();
        let i = check_recovery_mode(d.path());
        assert!(i.message.contains("archive recovery"), "{i:?}");
        std::fs::write(d.path().join("standby.signal"), "").unwrap();
        let i = check_recovery_mode(d.path());
        assert_eq!(i.outcome, Outcome::Ok);
        assert!(i.message.contains("standby (standby.signal)"), "{i:?}");
    }

    #[test]
    fn pin_compares_identity() {
        let me = ident(7);
        assert_eq!(check_pin(None, &me).outcome, Outcome::Ok);
        let d = Descriptor::new(&me, None, "zstd");
        assert_eq!(check_pin(Some(&d), &me).outcome, Outcome::Ok);
        let other = Descriptor::new(&ident(8), None, "zstd");
        let i = check_pin(Some(&other), &me);
        assert_eq!(i.outcome, Outcome::Failed);
        assert!(
            i.message
                .contains("pinned to system identifier 8, this cluster is 7"),
            "{}",
            i.message
        );
        let v16 = Descriptor::new(
            &ClusterIdentity {
                pg_version_num: 160001,
                ..me
            },
            None,
            "zstd",
        );
        assert!(check_pin(Some(&v16), &me)
            .message
            .contains("PostgreSQL 16 WAL"));
    }

    fn cfg_with_key(dir: &Path, key: Option<&Path>) -> Config {
        let mut text = format!(
            "[postgres]\nconninfo = \"host=/tmp\"\n[spool]\ndir = \"{}\"\n[repository]\nurl = \"file://{}\"\n",
            dir.join("spool").display(),
            dir.join("repo").display()
        );
        if let Some(k) = key {
            text += &format!("key_file = \"{}\"\n", k.display());
        }
        Config::parse(&text, &dir.join("walsafe.toml")).unwrap()
    }

    #[test]
    fn key_item_covers_every_combination() {
        let d = tempfile::tempdir().unwrap();
        let k = Key::generate();
        let other = Key::generate();
        let c = cfg_with_key(d.path(), Some(&d.path().join("k")));
        let enc = Descriptor::new(&ident(1), Some(&k), "zstd");
        let plain = Descriptor::new(&ident(1), None, "zstd");
        let item = |loaded: Option<Result<Key, key::KeyError>>,
                    desc: Option<Option<Descriptor>>| {
            let loaded = loaded.map(|r| r.map(KeyRing::single));
            check_key(c.repository(), loaded.as_ref(), desc.as_ref())
        };
        assert_eq!(
            item(Some(Ok(k.clone())), Some(Some(enc.clone()))).outcome,
            Outcome::Ok
        );
        let wrong = item(Some(Ok(other.clone())), Some(Some(enc.clone())));
        assert_eq!(wrong.outcome, Outcome::Failed);
        assert!(wrong.fix.unwrap().contains(&k.key_id_hex()));
        assert_eq!(item(None, Some(Some(enc.clone()))).outcome, Outcome::Failed);
        assert_eq!(
            item(Some(Ok(k.clone())), Some(Some(plain.clone()))).outcome,
            Outcome::Failed
        );
        assert_eq!(item(None, Some(Some(plain))).outcome, Outcome::Ok);
        assert_eq!(item(Some(Ok(k.clone())), Some(None)).outcome, Outcome::Ok);
        let mut tampered = enc;
        tampered.system_identifier = 99;
        assert_eq!(
            item(Some(Ok(k)), Some(Some(tampered))).outcome,
            Outcome::Failed
        );
        let missing = item(
            Some(key::load_key_file(&d.path().join("absent"))),
            Some(None),
        );
        assert_eq!(missing.outcome, Outcome::Failed);
        assert!(missing.fix.unwrap().contains("walsafe keygen"));
    }

    #[test]
    fn spool_items() {
        let d = tempfile::tempdir().unwrap();
        let items = check_spool(&d.path().join("spool"), 16 << 20, None);
        assert_eq!(items[0].outcome, Outcome::Ok, "{items:?}");
        assert!(items[0].message.contains("does not exist yet"));
        assert_eq!(items[1].outcome, Outcome::Skipped);
        std::fs::create_dir(d.path().join("spool")).unwrap();
        let items = check_spool(&d.path().join("spool"), 16 << 20, None);
        assert!(items.iter().all(|i| i.outcome == Outcome::Ok), "{items:?}");
        assert_eq!(
            std::fs::read_dir(d.path().join("spool")).unwrap().count(),
            0,
            "probe removed"
        );
        // A segment larger than any disk: free space fails.
        let items = check_spool(&d.path().join("spool"), 1 << 60, None);
        assert_eq!(items[2].outcome, Outcome::Failed, "{items:?}");
    }

    #[tokio::test]
    async fn store_probe_on_a_local_repository() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(
            &format!("file://{}", d.path().display()),
            &Default::default(),
            1,
        )
        .unwrap()
        .with_fsync(crate::durable::Fsync::Off);
        let repo = Repository::from_parts(
            store,
            Some(Key::generate()),
            crate::repository::Compression::Zstd,
            1,
        );
        let items = probe_repository(&repo).await;
        assert_eq!(items.len(), 4);
        assert!(items.iter().all(|i| i.outcome == Outcome::Ok), "{items:?}");
        assert!(
            repo.list_probes().await.unwrap().is_empty(),
            "probe deleted"
        );
    }

    #[test]
    fn fixes_name_the_role() {
        let e = PgError::NotReplicationRole {
            user: "app".into(),
            server: Box::new(crate::pg::error::ServerError {
                severity: "FATAL".into(),
                code: "42501".into(),
                message: "must be superuser or replication role to start walsender".into(),
                detail: None,
                hint: None,
            }),
        };
        assert_eq!(
            fix_for(&e, "app"),
            "as a superuser: ALTER ROLE app REPLICATION;"
        );
    }
}
