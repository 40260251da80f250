//! demo: `walsafe demo`, the quick start.
//!
//! On a machine with nothing but PostgreSQL's binaries, it shows the whole
//! product in under a minute:
//!
//! 1. a throwaway cluster (initdb from the local binaries, Unix socket in
//!    the demo directory, a free port on 127.0.0.1);
//! 2. `walsafe run` archiving it into `file://<dir>/repository`;
//! 3. a base backup with `walsafe backup` (into the same repository; its
//!    WAL is archived by the agent, as in real life);
//! 4. a write workload while received / durable / archived positions and
//!    the live archive lag are printed once a second;
//! 5. a recovery target time between two batches of rows, then a disaster:
//!    the primary is stopped with `-m immediate` and the agent with SIGKILL;
//! 6. `walsafe restore --target-time … --start`: the backup extracted,
//!    recovery through `walsafe wal-fetch` followed to the target and
//!    reported with its RTO, and a check that the rows are exactly those
//!    committed before the target.
//!
//! Run as root, every PostgreSQL process and walsafe itself run as the
//! `postgres` user (PostgreSQL refuses root), from a copy of this binary
//! inside the demo directory so that `restore_command` can execute it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::restore::free_port;

/// Rows inserted per statement of the background load (padding to make WAL).
const PAD_ROWS: u32 = 400;

/// The account PostgreSQL and walsafe run as when the demo runs as root.
struct User {
    name: String,
    uid: u32,
    gid: u32,
    home: PathBuf,
}

fn lookup_user(name: &str) -> Option<User> {
    let pw = nix::unistd::User::from_name(name).ok()??;
    Some(User {
        name: pw.name,
        uid: pw.uid.as_raw(),
        gid: pw.gid.as_raw(),
        home: pw.dir,
    })
}

struct Env {
    bindir: PathBuf,
    /// Run commands as this user (postgres, when we are root).
    as_user: Option<User>,
}

impl Env {
    fn detect() -> anyhow::Result<Env> {
        let bindir = pg_bindir().context(
            "PostgreSQL's server binaries were not found (pg_config --bindir, /usr/lib/postgresql/*/bin); install them, e.g. `apt-get install postgresql`",
        )?;
        let as_user = if nix::unistd::geteuid().is_root() {
            Some(lookup_user("postgres").context(
                "running as root, but there is no `postgres` user to run PostgreSQL as; run the demo as an ordinary user, or install PostgreSQL from your distribution (it creates the user)",
            )?)
        } else {
            None
        };
        Ok(Env { bindir, as_user })
    }

    /// `program`, run as the PostgreSQL user when we are root. The user is
    /// switched in the child itself (no `runuser` in between), so that the
    /// child is the program: signals reach it, and killing it kills it.
    fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        use std::os::unix::process::CommandExt;
        let mut c = Command::new(program);
        if let Some(u) = &self.as_user {
            c.uid(u.uid)
                .gid(u.gid)
                .env("HOME", &u.home)
                .env("USER", &u.name)
                .env("LOGNAME", &u.name)
                .current_dir("/tmp");
        }
        c
    }

    fn pg(&self, tool: &str) -> Command {
        self.cmd(self.bindir.join(tool))
    }

    fn chown(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(u) = &self.as_user {
            run_cmd(Command::new("chown").args(["-R", &u.name]).arg(path))?;
        }
        Ok(())
    }
}

/// Finds PostgreSQL's server binaries.
pub fn pg_bindir() -> Option<PathBuf> {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if p.join("initdb").exists() {
            return Some(p);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, p)| p)
}

fn run_cmd(c: &mut Command) -> anyhow::Result<String> {
    let out = c
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {c:?}"))?;
    if !out.status.success() {
        bail!(
            "{:?} failed ({}): {}",
            c,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

struct Server<'a> {
    env: &'a Env,
    data: PathBuf,
    port: u16,
    socket_dir: PathBuf,
    running: bool,
}

impl<'a> Server<'a> {
    fn start(&mut self, log: &Path) -> anyhow::Result<()> {
        run_cmd(
            self.env
                .pg("pg_ctl")
                .arg("-D")
                .arg(&self.data)
                .arg("-l")
                .arg(log)
                .args(["-w", "-t", "60", "start"]),
        )
        .context("the PostgreSQL server did not start (see its log)")?;
        self.running = true;
        Ok(())
    }

    fn stop(&mut self, mode: &str) {
        if self.running {
            let _ = run_cmd(
                self.env
                    .pg("pg_ctl")
                    .arg("-D")
                    .arg(&self.data)
                    .args(["-m", mode, "-w", "stop"]),
            );
            self.running = false;
        }
    }

    fn psql(&self, sql: &str) -> anyhow::Result<String> {
        Ok(run_cmd(
            self.env
                .pg("psql")
                .args(["-XAtq", "-v", "ON_ERROR_STOP=1", "-h"])
                .arg(&self.socket_dir)
                .args([
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "postgres",
                    "-d",
                    "postgres",
                    "-c",
                    sql,
                ]),
        )?
        .trim()
        .to_string())
    }

    fn conninfo(&self) -> String {
        format!(
            "host={} port={} user=postgres",
            self.socket_dir.display(),
            self.port
        )
    }
}

impl Drop for Server<'_> {
    fn drop(&mut self) {
        self.stop("immediate");
    }
}

struct Agent(Option<Child>);

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Reads one gauge from the agent's metrics endpoint.
/// The demo agent's positions, from its metrics endpoint.
async fn scrape(port: u16) -> Option<crate::metrics::Scraped> {
    crate::metrics::scrape(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .ok()
}

/// `walsafe demo`.
pub async fn run(dir: &Path, keep: bool, duration: Duration) -> anyhow::Result<()> {
    let env = Env::detect()?;
    if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
        bail!(
            "{} already exists and is not empty; remove it or pass --dir for another directory",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the demo directory {}", dir.display()))?;
    let mut dir = dir.canonicalize()?;
    env.chown(&dir)?;
    if let Some(u) = &env.as_user {
        // PostgreSQL runs as `postgres`, which cannot reach a directory
        // under a private parent (e.g. /root): use one under /tmp instead.
        if !env.cmd("test").arg("-w").arg(&dir).status()?.success() {
            let _ = std::fs::remove_dir(&dir);
            let fallback =
                std::env::temp_dir().join(format!("walsafe-demo-{}", std::process::id()));
            println!(
                "note: the `{}` user cannot write to {} (a parent directory is private); using {} instead",
                u.name,
                dir.display(),
                fallback.display()
            );
            std::fs::create_dir_all(&fallback)?;
            env.chown(&fallback)?;
            dir = fallback;
        }
    }
    let result = demo(&env, &dir, duration).await;
    if keep || result.is_err() {
        println!("\nthe demo's files are kept in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

async fn demo(env: &Env, dir: &Path, duration: Duration) -> anyhow::Result<()> {
    let step = |s: &str| println!("\n==> {s}");
    // A copy of this binary that the postgres user can execute (restore_command).
    let bin = dir.join("walsafe");
    std::fs::copy(std::env::current_exe()?, &bin).context("cannot copy the walsafe binary")?;
    env.chown(&bin)?;

    step("creating a throwaway PostgreSQL cluster");
    let data = dir.join("primary");
    let sockets = dir.join("sockets");
    std::fs::create_dir_all(&sockets)?;
    env.chown(&sockets)?;
    run_cmd(env.pg("initdb").args(["-D"]).arg(&data).args([
        "--auth=trust",
        "-U",
        "postgres",
        "--no-sync",
    ]))?;
    let port = free_port()?;
    append(
        &data.join("postgresql.conf"),
        &format!(
            "port = {port}\nlisten_addresses = ''\nunix_socket_directories = '{}'\nwal_level = replica\nmax_wal_senders = 5\nmax_replication_slots = 5\narchive_mode = off\nsynchronous_commit = on\n",
            sockets.display()
        ),
    )?;
    let mut primary = Server {
        env,
        data: data.clone(),
        port,
        socket_dir: sockets.clone(),
        running: false,
    };
    primary.start(&dir.join("primary.log"))?;
    println!(
        "    PostgreSQL {} on port {port}, data in {}",
        primary.psql("show server_version")?,
        data.display()
    );

    step("starting walsafe (walsafe run)");
    let metrics_port = free_port()?;
    let config = dir.join("walsafe.toml");
    std::fs::write(
        &config,
        format!(
            "[postgres]\nconninfo = \"{}\"\nslot = \"walsafe_demo\"\n\n[spool]\ndir = \"spool\"\n\n[repository]\nurl = \"file://{}/repository\"\n\n[archive]\npartial_interval = \"200ms\"\n\n[fetch]\ndir = \"prefetch\"\n\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n",
            primary.conninfo(),
            dir.display()
        ),
    )?;
    env.chown(&config)?;
    let mut agent = Agent(Some(
        env.cmd(&bin)
            .arg("--config")
            .arg(&config)
            .arg("run")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("walsafe.log"))?)
            .spawn()
            .context("cannot start walsafe run")?,
    ));
    wait_for(Duration::from_secs(30), || async {
        scrape(metrics_port).await.is_some_and(|m| m.connected)
    })
    .await
    .with_context(|| {
        format!(
            "walsafe did not start streaming within 30 s; see {}",
            dir.join("walsafe.log").display()
        )
    })?;
    println!(
        "    config {}, log {}",
        config.display(),
        dir.join("walsafe.log").display()
    );
    println!("    streaming into file://{}/repository", dir.display());

    step("taking a base backup (walsafe backup: streamed into the repository, its WAL archived by walsafe run)");
    primary.psql("create table demo (id bigserial primary key, batch int not null, at timestamptz not null default clock_timestamp(), pad text)")?;
    let out = run_cmd(env.cmd(&bin).arg("--config").arg(&config).arg("backup"))
        .context("walsafe backup failed")?;
    for l in out.lines() {
        println!("    {l}");
    }

    step(&format!(
        "writing for {duration:?} (batch 1), with the archive's live positions"
    ));
    println!(
        "    {:>14} {:>14} {:>14} {:>14} {:>9}",
        "server", "received", "durable", "archived", "lag"
    );
    let load_until = Instant::now() + duration;
    let mut last_print = Instant::now() - Duration::from_secs(1);
    while Instant::now() < load_until {
        primary.psql(&format!(
            "insert into demo (batch, pad) select 1, repeat(md5(g::text), 8) from generate_series(1, {PAD_ROWS}) g"
        ))?;
        if last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            if let Some(m) = scrape(metrics_port).await {
                println!(
                    "    {:>14} {:>14} {:>14} {:>14} {:>7.2} s",
                    m.server.to_string(),
                    m.received.to_string(),
                    m.flushed.to_string(),
                    m.archived.to_string(),
                    m.lag_seconds,
                );
            }
        }
    }
    let batch1 = primary.psql("select count(*) from demo")?;
    std::thread::sleep(Duration::from_millis(300));
    let target =
        primary.psql("select to_char(clock_timestamp(), 'YYYY-MM-DD HH24:MI:SS.US TZH:TZM')")?;
    std::thread::sleep(Duration::from_millis(300));
    primary.psql(
        "insert into demo (batch, pad) select 2, 'after the target' from generate_series(1, 100)",
    )?;
    primary
        .psql("insert into demo (batch, pad) values (3, 'the last commit before the disaster')")?;
    let end = primary.psql("select pg_current_wal_lsn()")?;
    println!("    batch 1: {batch1} rows; recovery target time: {target}; then 101 more rows, last commit at WAL {end}");

    let end_lsn: crate::pg::Lsn = end.parse()?;
    let waited = Instant::now();
    wait_for(Duration::from_secs(10), || async {
        scrape(metrics_port)
            .await
            .is_some_and(|m| m.archived >= end_lsn)
    })
    .await
    .context("walsafe did not archive the last commit within 10 s")?;
    println!(
        "    the last commit was in the repository {} ms after this check began",
        waited.elapsed().as_millis()
    );

    step("disaster: the primary is stopped with -m immediate and walsafe with SIGKILL");
    primary.stop("immediate");
    drop(agent.0.take().map(|mut c| {
        let _ = c.kill();
        c.wait()
    }));

    step(&format!(
        "restoring to {target}: walsafe restore --start (the newest backup before the target, WAL through walsafe wal-fetch)"
    ));
    let restored_data = dir.join("restored");
    let rport = free_port()?;
    let mut restored = Server {
        env,
        data: restored_data.clone(),
        port: rport,
        socket_dir: sockets.clone(),
        running: true,
    };
    let out = run_cmd(
        env.cmd(&bin)
            .arg("--config")
            .arg(&config)
            .arg("restore")
            .arg(&restored_data)
            .args([
                "--target-time",
                &target,
                "--target-action",
                "promote",
                "--start",
                "--port",
                &rport.to_string(),
                "--pg-bindir",
            ])
            .arg(&env.bindir),
    )
    .with_context(|| {
        format!(
            "walsafe restore failed; see {}",
            restored_data.join("walsafe-restore.log").display()
        )
    })?;
    for l in out.lines() {
        println!("    {l}");
    }
    let got =
        restored.psql("select count(*) filter (where batch = 1) || ' ' || count(*) from demo")?;
    let (b1, total) = got.split_once(' ').unwrap_or(("", ""));
    println!("    restored: {b1} rows of batch 1, {total} rows in all");
    restored.stop("fast");
    if b1 == batch1 && total == batch1 {
        println!("\nOK: the restore holds exactly the {batch1} rows committed before {target}, and none after.");
        Ok(())
    } else {
        bail!(
            "the restore holds {total} rows ({b1} of batch 1), expected exactly {batch1}; see {}",
            restored_data.join("walsafe-restore.log").display()
        )
    }
}

fn append(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(path)?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

async fn wait_for<F, Fut>(timeout: Duration, mut f: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = Instant::now() + timeout;
    while Instant::now() < until {
        if f().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("timed out after {timeout:?}")
}
