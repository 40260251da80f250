//! restore: `walsafe restore DIR`, a base backup from the repository into
//! a data directory, ready to recover to a target through `wal-fetch`.
//!
//! 1. **Refuse before touching anything**: `DIR` must be absent or empty,
//!    and so must every tablespace directory (its original location, or
//!    where `--tablespace-map OLD=NEW` sends it).
//! 2. **Pick the backup**: the one named, or the newest complete backup
//!    that can reach the target: it ends before a time or LSN target
//!    (recovery cannot go back), it lies on the target timeline's history
//!    (ended before its own timeline was left for the target's), and no
//!    recorded gap lies on the WAL between its end and the target. None
//!    fits: an error listing every backup considered and why it was
//!    rejected.
//! 3. **Extract** each archive streamed part by part (two archives at
//!    once; per archive, three parts fetched, hashed and decoded in
//!    parallel while one thread unpacks), every part checked
//!    against the record (stored size and BLAKE3) and authenticated before
//!    the tar reader sees it: `base.tar` into `DIR`, each `<oid>.tar` into
//!    its tablespace directory (the map rewritten in `tablespace_map`), the
//!    server's `backup_manifest` beside (for `pg_verifybackup`).
//! 4. **Recovery settings**: `recovery.signal`, and in
//!    `postgresql.auto.conf` a `restore_command` calling this walsafe by
//!    absolute path with this configuration, the target, the timeline
//!    (default `latest`) and the action; run as root, everything is handed
//!    to `postgres`, `DIR` mode 0700.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use futures::{StreamExt, TryStreamExt};
use tracing::{info, warn};

use crate::backup::record::{ArchiveRecord, BackupRecord, MANIFEST_ARCHIVE};
use crate::backup::verify::{feed, PartsReader};
use crate::backup::Progress;
use crate::config::Config;
use crate::pg::lsn::history_entries;
use crate::pg::{Lsn, TimelineId};
use crate::repository::{ObjectName, Repository};

/// Parts fetched ahead of the tar reader, per archive.
const PARTS_AHEAD: usize = 2;
/// Archives (tablespaces) extracted at once.
const ARCHIVES_AT_ONCE: usize = 2;

/// Where recovery is to stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The end of the archive (PostgreSQL's default).
    End,
    /// As soon as the backup is consistent.
    Immediate,
    /// A time, as given (passed to PostgreSQL), and its instant.
    Time(String, chrono::DateTime<chrono::FixedOffset>),
    Lsn(Lsn),
    Xid(String),
    /// A restore point created by `pg_create_restore_point`.
    Name(String),
}

impl Target {
    /// Parses `--target-time`: RFC 3339, or PostgreSQL's
    /// `YYYY-MM-DD HH:MM:SS[.ffffff][+TZ]`.
    pub fn time(text: &str) -> anyhow::Result<Target> {
        let t = text.trim();
        let parsed = chrono::DateTime::parse_from_rfc3339(t)
            .or_else(|_| chrono::DateTime::parse_from_str(t, "%Y-%m-%d %H:%M:%S%.f%#z"))
            .or_else(|_| chrono::DateTime::parse_from_str(t, "%Y-%m-%d %H:%M:%S%.f %#z"))
            .map_err(|_| {
                anyhow!("--target-time {text:?} is not a time with its zone; write e.g. \"2026-12-06 17:05:00+00\"")
            })?;
        Ok(Target::Time(t.to_string(), parsed))
    }
}

/// What `walsafe restore` was asked.
#[derive(Debug, Clone)]
pub struct RestoreArgs {
    pub dir: PathBuf,
    /// A backup name, or `None`/"latest" for the newest that fits.
    pub backup: Option<String>,
    pub target: Target,
    pub inclusive: Option<bool>,
    pub timeline: Option<String>,
    pub action: Option<String>,
    /// Tablespace location on the server → where to put it.
    pub tablespace_map: Vec<(PathBuf, PathBuf)>,
    /// `port` for the restored server (written with the settings).
    pub port: Option<u16>,
    /// Every tablespace not in `tablespace_map` goes to `<this>/<oid>`
    /// instead of its original location (a drill's throwaway copy).
    pub tablespaces_under: Option<PathBuf>,
}

/// What was restored.
#[derive(Debug, Clone)]
pub struct Restored {
    pub backup: BackupRecord,
    /// The lines written to `postgresql.auto.conf`.
    pub settings: Vec<String>,
}

/// Restores as described in the module doc, reporting the bytes
/// extracted to `progress`.
/// With several repositories, they are tried in order: one that holds no
/// backup reaching the target, or that fails (unreachable, a damaged
/// part: nothing is left behind), gives way to the next.
pub async fn restore(
    cfg: &Config,
    args: &RestoreArgs,
    progress: &mut dyn Progress,
) -> anyhow::Result<Restored> {
    refuse_unless_empty(&args.dir, "the data directory")?;
    let mut failures = Vec::new();
    for rc in &cfg.repositories {
        match restore_from(cfg, rc, args, progress).await {
            Ok(r) => return Ok(r),
            Err(e) if cfg.repositories.len() == 1 => return Err(e),
            Err(e) => {
                warn!(
                    "repository {:?} could not restore: {}; trying the next",
                    rc.name,
                    crate::report::error_line(&e)
                );
                failures.push(format!(
                    "repository {:?}: {}",
                    rc.name,
                    crate::report::error_line(&e)
                ));
            }
        }
    }
    Err(anyhow!(
        "no repository could restore:\n  {}",
        failures.join("\n  ")
    ))
}

/// [`restore`] from repository `rc`.
async fn restore_from(
    cfg: &Config,
    rc: &crate::repository::RepositoryConfig,
    args: &RestoreArgs,
    progress: &mut dyn Progress,
) -> anyhow::Result<Restored> {
    let repo =
        Repository::open(rc).with_context(|| format!("cannot open the repository {}", rc.url))?;
    let backup = choose(cfg, &repo, args).await?;
    // Every tablespace's destination, checked before anything is written.
    let mut destinations = Vec::new();
    for a in backup.archives.iter().filter(|a| a.oid.is_some()) {
        let original = PathBuf::from(a.location.clone().ok_or_else(|| {
            anyhow!(
                "the record of {} has tablespace {} without its location",
                backup.name,
                a.name
            )
        })?);
        let dest = args
            .tablespace_map
            .iter()
            .find(|(old, _)| *old == original)
            .map(|(_, new)| new.clone())
            .or_else(|| {
                args.tablespaces_under
                    .as_ref()
                    .map(|d| d.join(a.oid.unwrap_or(0).to_string()))
            })
            .unwrap_or_else(|| original.clone());
        refuse_unless_empty(
            &dest,
            &format!("tablespace {} ({})", a.oid.unwrap_or(0), original.display()),
        )?;
        destinations.push((a.name.clone(), a.oid, original, dest));
    }
    let created = Created::new(&args.dir, destinations.iter().map(|d| d.3.clone()));
    create_private(&args.dir)?;
    info!(backup = %backup.name, repository = %rc.name, "restoring into {}", args.dir.display());
    let done = Arc::new(AtomicU64::new(0));
    let total: u64 = backup.archives.iter().map(|a| a.size).sum();
    let mut jobs = Vec::new();
    for a in &backup.archives {
        let dest = if a.name == MANIFEST_ARCHIVE {
            Dest::Manifest(args.dir.join("backup_manifest"))
        } else if a.oid.is_none() {
            Dest::Tar(args.dir.clone())
        } else {
            let d = &destinations
                .iter()
                .find(|(n, ..)| *n == a.name)
                .expect("checked above")
                .3;
            create_private(d)?;
            Dest::Tar(d.clone())
        };
        jobs.push(extract(
            repo.clone(),
            backup.name.clone(),
            a.clone(),
            dest,
            done.clone(),
        ));
    }
    let work = futures::stream::iter(jobs)
        .buffer_unordered(ARCHIVES_AT_ONCE)
        .try_collect::<Vec<()>>();
    futures::pin_mut!(work);
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
    let extracted = loop {
        tokio::select! {
            r = &mut work => break r,
            _ = tick.tick() => progress.update(done.load(Ordering::Relaxed), Some(total)),
        }
    };
    if let Err(e) = extracted {
        created.remove();
        return Err(e.context(format!(
            "nothing was left in {} (restore again once the cause is fixed)",
            args.dir.display()
        )));
    }
    progress.update(total, Some(total));
    // The map PostgreSQL reads at the start of recovery.
    if !destinations.is_empty() {
        let map: String = destinations
            .iter()
            .map(|(_, oid, _, dest)| format!("{} {}\n", oid.unwrap_or(0), dest.display()))
            .collect();
        std::fs::write(args.dir.join("tablespace_map"), map)?;
    }
    let mut settings = recovery_settings(cfg, args)?;
    std::fs::write(args.dir.join("recovery.signal"), "")?;
    write_missing_configuration(&args.dir)?;
    // Recovery settings the backed-up server still carried (it was itself
    // restored, or a DBA left them): commented out in
    // postgresql.auto.conf, emptied when postgresql.conf sets them, so
    // that only this restore's target applies.
    let conf = std::fs::read_to_string(args.dir.join("postgresql.conf")).unwrap_or_default();
    for key in RECOVERY_TARGET_KEYS {
        let ours = settings.iter().any(|l| setting_key(l) == Some(key));
        if !ours && conf.lines().any(|l| setting_key(l) == Some(key)) {
            settings.push(format!("{key} = ''"));
        }
    }
    let auto = args.dir.join("postgresql.auto.conf");
    let mut text = without_settings(
        &std::fs::read_to_string(&auto).unwrap_or_default(),
        &settings,
    );
    text.push_str(&format!(
        "# walsafe restore of backup {} ({} .. {} on timeline {})\n",
        backup.name, backup.start_lsn, backup.stop_lsn, backup.stop_timeline
    ));
    for l in &settings {
        text.push_str(l);
        text.push('\n');
    }
    std::fs::write(&auto, text)?;
    if let Some(pg) = postgres_if_root()? {
        chown_tree(&args.dir, pg.uid, pg.gid)?;
        for (_, _, _, d) in &destinations {
            chown_tree(d, pg.uid, pg.gid)?;
        }
    }
    Ok(Restored { backup, settings })
}

/// Where an archive goes.
enum Dest {
    /// A tar, unpacked into this directory.
    Tar(PathBuf),
    /// The server's manifest, written to this file.
    Manifest(PathBuf),
}

/// Extracts one archive: its parts fetched and checked ahead
/// ([`feed`]) while a blocking thread unpacks the plaintext in order,
/// counting the bytes consumed into `done`.
async fn extract(
    repo: Repository,
    backup: String,
    archive: ArchiveRecord,
    dest: Dest,
    done: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let (tx, rx) = tokio::sync::mpsc::channel(PARTS_AHEAD);
    let name = archive.name.clone();
    let producer = feed(repo, backup.clone(), archive, tx);
    let consumer = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let mut reader = Counted {
            inner: PartsReader::new(rx),
            done,
        };
        match dest {
            Dest::Tar(d) => {
                let mut tar = tar::Archive::new(reader);
                tar.set_preserve_permissions(true);
                tar.set_preserve_mtime(true);
                tar.unpack(&d)
                    .with_context(|| format!("cannot extract {name} into {}", d.display()))
            }
            Dest::Manifest(path) => {
                let mut f = std::fs::File::create(&path)
                    .with_context(|| format!("cannot create {}", path.display()))?;
                std::io::copy(&mut reader, &mut f)
                    .with_context(|| format!("cannot write {}", path.display()))?;
                Ok(())
            }
        }
    });
    let (problems, extracted) = tokio::join!(producer, consumer);
    let problems = problems?;
    if !problems.is_empty() {
        bail!(
            "backup {backup} cannot be restored: {}",
            problems.join("; ")
        );
    }
    extracted?
}

/// A reader that adds what it reads to a shared count.
struct Counted<R> {
    inner: R,
    done: Arc<AtomicU64>,
}

impl<R: std::io::Read> std::io::Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// What a restore created (`DIR` and the tablespace directories), to be
/// removed when it fails: each was absent or empty before (checked), so
/// nothing of anyone else's goes with it.
struct Created(Vec<(PathBuf, bool)>);

impl Created {
    fn new(dir: &Path, tablespaces: impl Iterator<Item = PathBuf>) -> Created {
        Created(
            std::iter::once(dir.to_path_buf())
                .chain(tablespaces)
                .map(|d| {
                    let existed = d.exists();
                    (d, existed)
                })
                .collect(),
        )
    }

    /// Empties each directory that was empty, removes each that was absent.
    fn remove(&self) {
        for (d, existed) in &self.0 {
            if *existed {
                if let Ok(entries) = std::fs::read_dir(d) {
                    for e in entries.flatten() {
                        let p = e.path();
                        let _ = if p.is_dir() && !p.is_symlink() {
                            std::fs::remove_dir_all(&p)
                        } else {
                            std::fs::remove_file(&p)
                        };
                    }
                }
            } else {
                let _ = std::fs::remove_dir_all(d);
            }
        }
    }
}

/// Where recovery ended, as the server's log tells it.
#[derive(Debug, Clone, Default)]
pub struct Recovered {
    /// "recovery stopping …" (the target was reached), as logged.
    pub target_line: Option<String>,
    /// The last replayed position ("redo done at …").
    pub redo_done_at: Option<String>,
    /// "last completed transaction was at log time …".
    pub last_commit: Option<String>,
    /// The new timeline, when the server promoted.
    pub timeline: Option<u32>,
    /// How recovery ended: "promoted", "paused at the target", "shut down at the target".
    pub outcome: String,
    /// From the start of `walsafe restore` to the end of recovery.
    pub rto: std::time::Duration,
    pub log: PathBuf,
}

/// Starts PostgreSQL (the backup's major: `bindir`, or
/// `/usr/lib/postgresql/<major>/bin`) on the restored `dir` — as
/// `postgres` when run as root — and follows its log until recovery ends:
/// promoted, paused, shut down, or failed (an error quoting the log).
pub async fn start(
    record: &BackupRecord,
    dir: &Path,
    bindir: Option<&Path>,
    started: std::time::Instant,
) -> anyhow::Result<Recovered> {
    let log = dir.join("walsafe-restore.log");
    let pg_ctl = PgCtl::of(record.pg_version_num / 10000, bindir)?;
    let mut cmd = pg_ctl.command()?;
    cmd.arg("-D")
        .arg(dir)
        .arg("-l")
        .arg(&log)
        .args(["-W", "start"]);
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", pg_ctl.0.display()))?;
    if !out.status.success() {
        bail!(
            "pg_ctl start failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut r = Recovered {
        log: log.clone(),
        ..Recovered::default()
    };
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        for line in text.lines() {
            let msg = line.split_once("LOG:  ").map(|(_, m)| m).unwrap_or(line);
            if msg.starts_with("recovery stopping") {
                r.target_line = Some(msg.to_string());
            } else if let Some(at) = msg.strip_prefix("redo done at ") {
                r.redo_done_at = Some(at.split_whitespace().next().unwrap_or(at).to_string());
            } else if let Some(t) = msg.strip_prefix("last completed transaction was at log time ")
            {
                r.last_commit = Some(t.to_string());
            } else if let Some(t) = msg.strip_prefix("selected new timeline ID: ") {
                r.timeline = t.trim().parse().ok();
            }
        }
        let promoted = text.contains("archive recovery complete")
            && text
                .rsplit("archive recovery complete")
                .next()
                .is_some_and(|after| {
                    after.contains("database system is ready to accept connections")
                });
        let outcome = if promoted {
            Some("promoted")
        } else if text.contains("recovery has paused")
            || text.contains("pausing at the end of recovery")
        {
            Some("paused at the target (SELECT pg_wal_replay_resume() to promote)")
        } else if r.target_line.is_some() && text.contains("database system is shut down") {
            Some("shut down at the target")
        } else {
            None
        };
        if let Some(o) = outcome {
            r.outcome = o.to_string();
            r.rto = started.elapsed();
            return Ok(r);
        }
        let alive = pg_ctl
            .command()?
            .arg("-D")
            .arg(dir)
            .arg("status")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !alive {
            let tail: Vec<&str> = text.lines().rev().take(12).collect();
            bail!(
                "PostgreSQL stopped during recovery; the end of its log ({}):\n{}",
                log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
}

/// When run as root: the `postgres` user, who owns what a restore writes
/// and runs PostgreSQL (which refuses root).
pub(crate) fn postgres_if_root() -> anyhow::Result<Option<nix::unistd::User>> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    let pg = nix::unistd::User::from_name("postgres")?.ok_or_else(|| {
        anyhow!("running as root, but there is no postgres user to own the restored files and run PostgreSQL")
    })?;
    Ok(Some(pg))
}

/// `pg_ctl` of one PostgreSQL major.
pub(crate) struct PgCtl(PathBuf);

impl PgCtl {
    /// `bindir`'s, or `/usr/lib/postgresql/<major>/bin`'s; an error naming
    /// `--pg-bindir` when it is not there.
    pub(crate) fn of(major: u32, bindir: Option<&Path>) -> anyhow::Result<PgCtl> {
        let bindir = match bindir {
            Some(b) => b.to_path_buf(),
            None => PathBuf::from(format!("/usr/lib/postgresql/{major}/bin")),
        };
        let pg_ctl = bindir.join("pg_ctl");
        if !pg_ctl.exists() {
            bail!(
                "{} not found: the backup is of PostgreSQL {major}; give its binaries with --pg-bindir",
                pg_ctl.display()
            );
        }
        Ok(PgCtl(pg_ctl))
    }

    /// A command running it, as `postgres` when run as root.
    pub(crate) fn command(&self) -> anyhow::Result<std::process::Command> {
        use std::os::unix::process::CommandExt;
        let mut cmd = std::process::Command::new(&self.0);
        if let Some(pg) = postgres_if_root()? {
            cmd.uid(pg.uid.as_raw())
                .gid(pg.gid.as_raw())
                .current_dir("/tmp");
        }
        Ok(cmd)
    }
}

/// A TCP port free on 127.0.0.1 now, for a restored server.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `path` must be absent or an empty directory.
fn refuse_unless_empty(path: &Path, what: &str) -> anyhow::Result<()> {
    match std::fs::read_dir(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(anyhow!("cannot read {what} {}: {e}", path.display())),
        Ok(mut entries) => {
            if entries.next().is_some() {
                bail!(
                    "{what} {} is not empty; walsafe restore writes only into an empty or new directory (nothing was changed): choose another, or empty it yourself",
                    path.display()
                );
            }
            Ok(())
        }
    }
}

/// Creates `dir` (and parents) with mode 0700.
fn create_private(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    Ok(())
}

fn chown_tree(dir: &Path, uid: nix::unistd::Uid, gid: nix::unistd::Gid) -> anyhow::Result<()> {
    nix::unistd::chown(dir, Some(uid), Some(gid))?;
    if dir.is_dir() && !dir.is_symlink() {
        for e in std::fs::read_dir(dir)? {
            let p = e?.path();
            if p.is_symlink() {
                nix::unistd::fchownat(
                    None,
                    &p,
                    Some(uid),
                    Some(gid),
                    nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                )?;
            } else {
                chown_tree(&p, uid, gid)?;
            }
        }
    }
    Ok(())
}

/// The backup to restore (see the module doc).
async fn choose(
    cfg: &Config,
    repo: &Repository,
    args: &RestoreArgs,
) -> anyhow::Result<BackupRecord> {
    let listed = crate::backup::list(repo).await?;
    let gaps = repo.gaps().await?;
    let histories = Histories::read(repo).await?;
    let mut considered = Vec::new();
    for (name, record, _, _) in &listed {
        if let Some(wanted) = args.backup.as_deref().filter(|b| *b != "latest") {
            if name != wanted {
                continue;
            }
        }
        let Some(r) = record else {
            considered.push(format!("{name}: incomplete (no record)"));
            continue;
        };
        let fits = reaches(r, &args.target)
            .and_then(|()| histories.path(r, args.timeline.as_deref()))
            .and_then(|path| no_gap_on(cfg, &path, &args.target, &gaps));
        match fits {
            Ok(()) => return Ok(r.clone()),
            Err(why) => considered.push(format!("{name}: {why}")),
        }
    }
    if considered.is_empty() {
        bail!(match args.backup.as_deref().filter(|b| *b != "latest") {
            Some(b) => format!(
                "there is no backup {b} in {}; see walsafe backup-list",
                repo.url()
            ),
            None => format!(
                "there is no base backup in {}; take one with walsafe backup",
                repo.url()
            ),
        });
    }
    bail!("no backup can reach the target: {}", considered.join("; "))
}

/// Whether recovery from `r` can reach `target`: a time or LSN target
/// must lie after the backup's stop.
/// The latest instant a backup stopped at, from its record's stop time:
/// records written before times carried milliseconds hold whole seconds,
/// and such a backup may have ended up to a second later (a target inside
/// that second is not reached by it: recovery cannot stop before the
/// backup is consistent).
fn latest_stop(
    text: &str,
) -> Result<chrono::DateTime<chrono::FixedOffset>, chrono::format::ParseError> {
    let t = chrono::DateTime::parse_from_rfc3339(text)?;
    Ok(if text.contains('.') {
        t
    } else {
        t + chrono::Duration::milliseconds(999)
    })
}

fn reaches(r: &BackupRecord, target: &Target) -> Result<(), String> {
    match target {
        Target::Lsn(l) if *l < r.stop_lsn => Err(format!(
            "it ends at {}, after the target LSN {l}",
            r.stop_lsn
        )),
        Target::Time(text, t) => {
            let stop = latest_stop(&r.stop_time)
                .map_err(|e| format!("its stop time {:?} is unreadable: {e}", r.stop_time))?;
            if stop > *t {
                Err(format!(
                    "it ends at {}, after the target time {text}",
                    r.stop_time
                ))
            } else {
                Ok(())
            }
        }
        _ => Ok(()),
    }
}

/// The timeline history files in the repository, by timeline.
pub(crate) struct Histories(std::collections::BTreeMap<TimelineId, String>);

/// One stretch of the WAL recovery replays: `timeline` from `from` up to
/// `to` (where its child begins), or to the end of it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stretch {
    timeline: TimelineId,
    from: Lsn,
    to: Option<Lsn>,
}

impl Histories {
    pub(crate) async fn read(repo: &Repository) -> anyhow::Result<Histories> {
        let mut out = std::collections::BTreeMap::new();
        for n in repo.list_wal().await? {
            if let ObjectName::History(t) = n {
                let name = crate::pg::walfile::history_file_name(t);
                if let Some(bytes) = repo.get_wal(&name).await? {
                    out.insert(t, String::from_utf8_lossy(&bytes).into_owned());
                }
            }
        }
        Ok(Histories(out))
    }

    /// Whether timeline `t` descends from `ancestor` (is it, or has it in
    /// its history). A timeline after the first whose history file is
    /// missing is taken to descend: the answer errs on keeping WAL.
    pub(crate) fn descends(&self, t: TimelineId, ancestor: TimelineId) -> bool {
        if t == ancestor {
            return true;
        }
        if t < ancestor {
            return false;
        }
        match self.0.get(&t) {
            Some(h) => history_entries(h).any(|(a, _)| a == ancestor),
            None => true,
        }
    }

    /// The timeline recovery from `r` follows for `--target-timeline`
    /// `spec`: `current` is the backup's; `latest` (the default) the
    /// newest one PostgreSQL finds by asking for `<TLI+1>.history` from
    /// the backup's timeline on, as it does.
    fn target(&self, r: &BackupRecord, spec: Option<&str>) -> Result<TimelineId, String> {
        match spec.unwrap_or("latest") {
            "current" => Ok(r.stop_timeline),
            "latest" => {
                let mut t = r.stop_timeline;
                while self.0.contains_key(&TimelineId(t.0 + 1)) {
                    t = TimelineId(t.0 + 1);
                }
                Ok(t)
            }
            n => n.parse().map(TimelineId).map_err(|_| {
                format!("--target-timeline {n:?} is not latest, current or a timeline number")
            }),
        }
    }

    /// The stretches of WAL recovery from `r` replays to reach the target
    /// timeline, or why that timeline cannot be reached from `r`: the
    /// backup must lie on its history, ending at or before the point where
    /// its own timeline was left (a backup on timeline 1 serves timeline 2
    /// when it ended before the promotion that began timeline 2).
    fn path(&self, r: &BackupRecord, spec: Option<&str>) -> Result<Vec<Stretch>, String> {
        let target = self.target(r, spec)?;
        let own = r.stop_timeline;
        if target == own {
            return Ok(vec![Stretch {
                timeline: own,
                from: r.stop_lsn,
                to: None,
            }]);
        }
        if target < own {
            return Err(format!(
                "it is on timeline {own}, after the target timeline {target}"
            ));
        }
        let history = self.0.get(&target).ok_or_else(|| {
            format!("the history file of timeline {target} is not in the repository: recovery cannot follow timeline {target}")
        })?;
        let ancestors: Vec<(TimelineId, Lsn)> = history_entries(history).collect();
        let Some(i) = ancestors.iter().position(|&(t, _)| t == own) else {
            return Err(format!(
                "its timeline {own} is not in the history of the target timeline {target}"
            ));
        };
        let left_at = ancestors[i].1;
        if r.stop_lsn > left_at {
            return Err(format!(
                "it ends at {} on timeline {own}, after timeline {target} branched off at {left_at}: that backup is not on timeline {target}'s history",
                r.stop_lsn
            ));
        }
        let mut path = vec![Stretch {
            timeline: own,
            from: r.stop_lsn,
            to: Some(left_at),
        }];
        for w in ancestors[i..].windows(2) {
            path.push(Stretch {
                timeline: w[1].0,
                from: w[0].1,
                to: Some(w[1].1),
            });
        }
        path.push(Stretch {
            timeline: target,
            from: ancestors.last().map_or(left_at, |&(_, at)| at),
            to: None,
        });
        Ok(path)
    }
}

/// Recovery along `path` towards `target` must not meet a recorded gap
/// (WAL lost before it was archived): `wal-fetch` would stop recovery
/// there. A gap the operator opted in to (`[fetch] recover_to_gap`) is
/// allowed; `immediate` needs no WAL past the backup's end.
fn no_gap_on(
    cfg: &Config,
    path: &[Stretch],
    target: &Target,
    gaps: &[crate::gap::Gap],
) -> Result<(), String> {
    if *target == Target::Immediate {
        return Ok(());
    }
    for g in gaps {
        let on_path = path.iter().any(|s| {
            s.timeline == g.timeline && g.to > s.from && s.to.is_none_or(|to| g.from < to)
        });
        let before_target = match target {
            Target::Lsn(l) => g.from < *l,
            _ => true,
        };
        let opted_in = cfg.fetch.recover_to_gap == Some((g.timeline, g.from));
        if on_path && before_target && !opted_in {
            return Err(format!(
                "WAL from {} to {} on timeline {} was lost before it was archived ({}); recovery from this backup stops there. Restore a backup taken after {}, or to end recovery at the gap on purpose add recover_to_gap = \"{}:{}\" to [fetch]",
                g.from, g.to, g.timeline, g.reason, g.to, g.timeline, g.from
            ));
        }
    }
    Ok(())
}

/// Debian and Ubuntu keep `postgresql.conf`, `pg_hba.conf` and
/// `pg_ident.conf` in `/etc/postgresql/<major>/<cluster>`, so a backup of
/// such a cluster has none and PostgreSQL would not start on it. Each
/// missing file is written, minimal (PostgreSQL's defaults, local
/// connections by peer authentication), saying so; a warning names them.
fn write_missing_configuration(dir: &Path) -> anyhow::Result<()> {
    let note = "# Written by walsafe restore: the backed-up cluster kept this file outside
# its data directory (Debian and Ubuntu keep it in /etc/postgresql/<major>/<cluster>).
# Copy your own here, or start the server with its configuration elsewhere
# (pg_ctlcluster, or postgres -c config_file=…).
";
    let mut written = Vec::new();
    for (file, body) in [
        ("postgresql.conf", ""),
        (
            "pg_hba.conf",
            "local all all peer
",
        ),
        ("pg_ident.conf", ""),
    ] {
        let path = dir.join(file);
        if !path.exists() {
            std::fs::write(&path, format!("{note}{body}"))
                .with_context(|| format!("cannot write {}", path.display()))?;
            written.push(file);
        }
    }
    if !written.is_empty() {
        tracing::warn!(
            "the backup holds no {}: the cluster kept its configuration outside the data directory; wrote minimal ones into {} (PostgreSQL's defaults, local connections by peer authentication)",
            written.join(", "),
            dir.display()
        );
    }
    Ok(())
}

/// The recovery target settings, one of which at most may be set.
const RECOVERY_TARGET_KEYS: [&str; 5] = [
    "recovery_target",
    "recovery_target_lsn",
    "recovery_target_name",
    "recovery_target_time",
    "recovery_target_xid",
];

/// The key a configuration line sets (`None` for comments and blanks).
fn setting_key(line: &str) -> Option<&str> {
    let l = line.trim_start();
    if l.starts_with('#') {
        return None;
    }
    let key = l.split(['=', ' ', '\t']).next()?.trim();
    (!key.is_empty()).then_some(key)
}

/// `text` (postgresql.auto.conf) with every line that sets a recovery
/// setting, or a key of `ours`, commented out.
fn without_settings(text: &str, ours: &[String]) -> String {
    let replaced = |key: &str| {
        key.starts_with("recovery_target")
            || key == "restore_command"
            || key == "recovery_end_command"
            || ours.iter().any(|l| setting_key(l) == Some(key))
    };
    text.lines()
        .map(|l| match setting_key(l) {
            Some(k) if replaced(k) => format!("# {l}  # replaced by walsafe restore\n"),
            _ => format!("{l}\n"),
        })
        .collect()
}

/// The lines for `postgresql.auto.conf`.
fn recovery_settings(cfg: &Config, args: &RestoreArgs) -> anyhow::Result<Vec<String>> {
    let exe = std::env::current_exe().context("cannot find this walsafe binary's path")?;
    let config = std::fs::canonicalize(&cfg.path)
        .with_context(|| format!("cannot resolve {}", cfg.path.display()))?;
    let q = |s: &str| format!("'{}'", s.replace('\'', "''"));
    let mut lines = vec![format!(
        "restore_command = {}",
        q(&format!(
            "{} --config {} wal-fetch %f %p",
            exe.display(),
            config.display()
        ))
    )];
    match &args.target {
        Target::End => {}
        Target::Immediate => lines.push("recovery_target = 'immediate'".into()),
        Target::Time(text, _) => lines.push(format!("recovery_target_time = {}", q(text))),
        Target::Lsn(l) => lines.push(format!("recovery_target_lsn = '{l}'")),
        Target::Xid(x) => lines.push(format!("recovery_target_xid = {}", q(x))),
        Target::Name(n) => lines.push(format!("recovery_target_name = {}", q(n))),
    }
    if let Some(i) = args.inclusive {
        lines.push(format!("recovery_target_inclusive = {i}"));
    }
    lines.push(format!(
        "recovery_target_timeline = {}",
        q(args.timeline.as_deref().unwrap_or("latest"))
    ));
    if let Some(a) = &args.action {
        lines.push(format!("recovery_target_action = {}", q(a)));
    }
    if let Some(p) = args.port {
        lines.push(format!("port = {p}"));
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_times_in_both_spellings() {
        let a = Target::time("2026-12-06 17:05:00+00").unwrap();
        let b = Target::time("2026-12-06T17:05:00Z").unwrap();
        match (a, b) {
            (Target::Time(_, x), Target::Time(_, y)) => assert_eq!(x, y),
            _ => unreachable!(),
        }
        assert!(Target::time("yesterday").is_err());
    }

    #[test]
    fn settings_a_restored_server_carried_are_commented_out() {
        let ours = vec![
            "restore_command = 'x'".to_string(),
            "recovery_target_timeline = 'latest'".to_string(),
            "port = 5433".to_string(),
        ];
        let auto = "# Do not edit this file manually!\nwork_mem = '8MB'\nrestore_command = '/old'\nrecovery_target_lsn = '0/5000110'\nrecovery_target_action = 'promote'\nport = 45331\n";
        let out = without_settings(auto, &ours);
        assert_eq!(
            out,
            "# Do not edit this file manually!\nwork_mem = '8MB'\n\
             # restore_command = '/old'  # replaced by walsafe restore\n\
             # recovery_target_lsn = '0/5000110'  # replaced by walsafe restore\n\
             # recovery_target_action = 'promote'  # replaced by walsafe restore\n\
             # port = 45331  # replaced by walsafe restore\n"
        );
        assert_eq!(
            setting_key("  recovery_target_xid='7'"),
            Some("recovery_target_xid")
        );
        assert_eq!(setting_key("#recovery_target_xid = '7'"), None);
    }

    fn record(timeline: u32, stop: u64) -> BackupRecord {
        let mut r: BackupRecord = serde_json::from_str(
            r#"{"format":1,"name":"b","label":"b","system_identifier":"1","pg_version_num":150000,
                "segment_size":16777216,"start_lsn":"0/1000028","start_timeline":1,"stop_lsn":"0/1000100",
                "stop_timeline":1,"start_time":"2026-12-06T17:05:01Z","stop_time":"2026-12-06T17:05:09Z",
                "wal_first":"000000010000000000000001","wal_last":"000000010000000000000001",
                "backup_history":"000000010000000000000001.00000028.backup","archives":[],
                "size":0,"stored_size":0}"#,
        )
        .unwrap();
        r.stop_timeline = TimelineId(timeline);
        r.start_timeline = TimelineId(timeline);
        r.stop_lsn = Lsn(stop);
        r
    }

    /// A backup that ended within the target's second, after it, does
    /// not reach it (whole-second stop times are read as the second's end).
    #[test]
    fn a_backup_ending_in_the_target_s_second_after_it_does_not_reach_it() {
        let at = |s: &str| {
            Target::Time(
                s.to_string(),
                chrono::DateTime::parse_from_rfc3339(s).unwrap(),
            )
        };
        let mut r = record(1, 0x1000100);
        r.stop_time = "2026-12-06T17:05:09Z".into();
        assert!(reaches(&r, &at("2026-12-06T17:05:09.045Z")).is_err());
        assert!(reaches(&r, &at("2026-12-06T17:05:10Z")).is_ok());
        r.stop_time = "2026-12-06T17:05:09.700Z".into();
        assert!(reaches(&r, &at("2026-12-06T17:05:09.045Z")).is_err());
        assert!(reaches(&r, &at("2026-12-06T17:05:09.800Z")).is_ok());
    }

    /// Timeline 2 branched off 1 at 0/5000000, timeline 3 off 2 at 0/9000000.
    fn histories() -> Histories {
        Histories(
            [
                (
                    TimelineId(2),
                    "1\t0/5000000\tno recovery target specified\n".to_string(),
                ),
                (
                    TimelineId(3),
                    "1\t0/5000000\tx\n2\t0/9000000\tx\n".to_string(),
                ),
            ]
            .into_iter()
            .collect(),
        )
    }

    #[test]
    fn a_backup_serves_a_later_timeline_only_when_it_ended_before_the_branch() {
        let h = histories();
        let stretch = |t, from, to: Option<u64>| Stretch {
            timeline: TimelineId(t),
            from: Lsn(from),
            to: to.map(Lsn),
        };
        // latest follows 2.history and 3.history from timeline 1.
        assert_eq!(
            h.path(&record(1, 0x4000000), None).unwrap(),
            vec![
                stretch(1, 0x4000000, Some(0x5000000)),
                stretch(2, 0x5000000, Some(0x9000000)),
                stretch(3, 0x9000000, None)
            ]
        );
        // Ending exactly at the branch point is still on the history.
        assert!(h.path(&record(1, 0x5000000), Some("2")).is_ok());
        let err = h.path(&record(1, 0x6000000), None).unwrap_err();
        assert!(
            err.contains("after timeline 3 branched off at 0/5000000"),
            "{err}"
        );
        // current and an explicit timeline 1 stay on timeline 1.
        for spec in ["current", "1"] {
            assert_eq!(
                h.path(&record(1, 0x6000000), Some(spec)).unwrap(),
                vec![stretch(1, 0x6000000, None)]
            );
        }
        let err = h.path(&record(3, 0xA000000), Some("2")).unwrap_err();
        assert!(err.contains("after the target timeline 2"), "{err}");
        let err = h.path(&record(2, 0x6000000), Some("4")).unwrap_err();
        assert!(err.contains("history file of timeline 4"), "{err}");
        // A backup on 2 past 3's branch point does not serve 3.
        let err = h.path(&record(2, 0x9000001), None).unwrap_err();
        assert!(err.contains("branched off at 0/9000000"), "{err}");
    }

    #[test]
    fn only_a_gap_on_the_path_to_the_target_refuses_the_backup() {
        let cfg = Config::parse(
            "[postgres]\nconninfo = \"host=/tmp\"\n[spool]\ndir = \"/tmp/s\"\n[repository]\nurl = \"file:///tmp/r\"\n",
            Path::new("/tmp/walsafe.toml"),
        )
        .unwrap();
        let gap = |t, from, to| crate::gap::Gap::new(TimelineId(t), Lsn(from), Lsn(to), "test");
        let path = histories().path(&record(1, 0x4000000), Some("2")).unwrap();
        // On timeline 1 after the branch: not replayed.
        assert!(no_gap_on(&cfg, &path, &Target::End, &[gap(1, 0x6000000, 0x7000000)]).is_ok());
        // On timeline 1 before the backup's end: not replayed.
        assert!(no_gap_on(&cfg, &path, &Target::End, &[gap(1, 0x1000000, 0x2000000)]).is_ok());
        // On timeline 3: not on the way to 2.
        assert!(no_gap_on(&cfg, &path, &Target::End, &[gap(3, 0xA000000, 0xB000000)]).is_ok());
        // Between the backup and the branch, and on timeline 2: refused.
        assert!(no_gap_on(&cfg, &path, &Target::End, &[gap(1, 0x4800000, 0x4900000)]).is_err());
        assert!(no_gap_on(&cfg, &path, &Target::End, &[gap(2, 0x6000000, 0x7000000)]).is_err());
        // Past an LSN target, or with immediate: no matter.
        let g = [gap(2, 0x6000000, 0x7000000)];
        assert!(no_gap_on(&cfg, &path, &Target::Lsn(Lsn(0x5800000)), &g).is_ok());
        assert!(no_gap_on(&cfg, &path, &Target::Immediate, &g).is_ok());
    }
}
