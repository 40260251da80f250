//! Command line: `walsafe [--config FILE] <command>`.
//!
//! This module parses and dispatches; each command's work lives in its own
//! module (`cmd::*` for the tools, [`crate::agent`] for `walsafe run`,
//! [`crate::fetch`] for `wal-fetch`), and the exit-code contract in
//! [`crate::report`].

pub mod assets;
pub mod backup;
pub mod check;
pub mod config;
pub mod demo;
pub mod drill;
pub mod key_rotate;
pub mod progress;
pub mod push;
pub mod repo_sync;
pub mod restore;
pub mod retain;
pub mod status;
pub mod verify;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{Config, DEFAULT_CONFIG_PATH};
use crate::fetch::{Failure, RecoveryMode};
use crate::report::{error_line, LogFormat, EXIT_VERIFY_ERROR};

/// Streams PostgreSQL WAL into a crash-safe spool and on to object storage.
#[derive(Debug, Parser)]
#[command(name = "walsafe", version, about, propagate_version = true)]
pub struct Cli {
    /// Configuration file.
    #[arg(long, global = true, env = "WALSAFE_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,

    /// Log format: plain text for journald, or one JSON object per line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Plain)]
    pub log_format: LogFormat,

    /// Append logs to this file instead of stderr; SIGHUP reopens it (logrotate).
    #[arg(long, global = true, env = "WALSAFE_LOG_FILE")]
    pub log_file: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: stream WAL, spool it, upload it, serve metrics.
    Run,
    /// Restore one WAL file from the repository (restore_command = 'walsafe wal-fetch %f %p').
    WalFetch {
        /// WAL file name PostgreSQL asks for (%f).
        name: String,
        /// Where to write it (%p).
        dest: PathBuf,
    },
    /// Store one WAL file in the repository (archive_command = 'walsafe wal-push %p').
    WalPush {
        /// Path of the WAL file (%p).
        path: PathBuf,
    },
    /// Write a new repository key to FILE (mode 0600; never overwrites); with --add, append a new key to the key ring in FILE.
    Keygen {
        /// Where to write the key.
        file: PathBuf,
        /// Append a new key to the existing key file (a ring): it decrypts at once; it encrypts once its line is moved first.
        #[arg(long)]
        add: bool,
    },
    /// Key rotation: make the key added last (keygen --add) current; --rewrite re-encrypts the objects under older keys; --retire KEYID removes a key no object needs. A dry run, with the objects and bytes each key protects, without --apply.
    KeyRotate {
        /// Re-encrypt every object under an older key with the current one (atomic per object, safe to stop and run again, concurrent with the agent).
        #[arg(long)]
        rewrite: bool,
        /// Remove this key id from the key file and the descriptor; refused while an object needs it.
        #[arg(long, value_name = "KEYID")]
        retire: Option<String>,
        /// Do it; without it, only print what would be done.
        #[arg(long)]
        apply: bool,
    },
    /// Report every gap in the repository's WAL, per timeline.
    WalVerify {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// One screen: repository, archived range per timeline, last archived WAL and its age, spool backlog, the agent's live positions and lag.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Preflight of PostgreSQL, slot, repository, key and spool: every item OK, WARNING or FAILED with its fix; exit 0 only if nothing FAILED.
    Check {
        /// Also run pg_switch_wal() and wait (up to 60 s) until the closed segment is in the repository (needs a running agent or archive_command).
        #[arg(long)]
        switch_wal: bool,
        /// Also say how wal-fetch answers as restore_command of the server in this data directory: a standby (standby.signal) or archive recovery (recovery.signal).
        #[arg(long, env = "PGDATA")]
        pgdata: Option<PathBuf>,
    },
    /// Print the effective configuration (defaults filled in, what the environment adds, secrets redacted); an invalid file lists every problem and exits 1.
    Config,
    /// Quick start: archive a throwaway cluster, then restore it to a point in time.
    Demo {
        /// Directory for the demo's cluster, spool and repository.
        #[arg(long, default_value = "./walsafe-demo")]
        dir: PathBuf,
        /// Keep the directory afterwards instead of removing it.
        #[arg(long)]
        keep: bool,
        /// How long the write workload runs.
        #[arg(long, default_value = "8s", value_parser = humantime::parse_duration)]
        duration: std::time::Duration,
    },
    /// Complete one repository from another: copy what --to lacks (WAL, chunks, gaps, base backups, drill results), each object verified, create-only; exit 0 complete, 1 some objects failed, 2 error.
    RepoSync {
        /// The repository to copy from (its name in the configuration).
        #[arg(long)]
        from: String,
        /// The repository to complete.
        #[arg(long)]
        to: String,
    },
    /// Take a base backup over the replication protocol into the repository (its record is written last, once the WAL it needs is archived).
    Backup {
        /// A label for the backup (default: "walsafe backup <name>").
        #[arg(long)]
        label: Option<String>,
        /// The start checkpoint: fast (immediate, more I/O at once) or spread (as checkpoint_completion_target paces it).
        #[arg(long, value_enum, default_value_t = CheckpointMode::Fast)]
        checkpoint: CheckpointMode,
        /// Limit the server's send rate, e.g. 50MB (bytes per second; 32kB to 1GB).
        #[arg(long, value_parser = parse_rate)]
        max_rate: Option<u64>,
        /// How long to wait for the WAL from the backup's start to its stop to be archived.
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        wal_timeout: std::time::Duration,
    },
    /// Every backup in the repository, newest first: label, times, LSNs, sizes, the WAL it needs; incomplete ones flagged.
    BackupList {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Verify a backup: every part against its checksum, every file against the server's manifest, the WAL it needs present. Exit 0 good, 1 problems, 2 could not check.
    BackupVerify {
        /// The backup's name, or "latest".
        #[arg(default_value = "latest")]
        name: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Restore a base backup into DIR (empty or absent) with the recovery settings for a target; then start PostgreSQL on it.
    Restore(Box<restore::RestoreOpts>),
    /// Retention by recovery window: keep the backups that started inside it, the newest before it and the --keep newest, and the WAL they need; delete the rest (a dry run without --apply).
    Retain {
        /// The recovery window, e.g. 7d, 36h, 90s: every instant of it stays restorable.
        #[arg(long, value_parser = humantime::parse_duration)]
        window: std::time::Duration,
        /// Keep at least this many of the newest complete backups, even before the window.
        #[arg(long, default_value_t = 1)]
        keep: usize,
        /// Delete; without it, only print what would be deleted.
        #[arg(long)]
        apply: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Restore drill: restore a backup into a throwaway directory, recover, query it, remove it; report the RTO and store the result (walsafe status, metrics).
    Drill(Box<drill::DrillOpts>),
    /// Write the man pages and shell completions into DIR (for packaging).
    #[command(hide = true)]
    GenerateAssets {
        /// Where to write `man/` and `completions/`.
        dir: PathBuf,
    },
    /// Download segments following NAME into the prefetch directory (started by wal-fetch).
    #[command(hide = true)]
    WalPrefetch {
        /// The segment recovery just received.
        name: String,
        /// The repository (its name) to download from.
        #[arg(long)]
        repository: String,
    },
}

/// The start checkpoint of a base backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CheckpointMode {
    Fast,
    Spread,
}

/// A rate like `50MB`, `512kB` or `1048576` (bytes per second).
fn parse_rate(text: &str) -> Result<u64, String> {
    crate::pg::replication::parse_size_setting(text)
        .filter(|&r| (32 << 10..=1 << 30).contains(&r))
        .ok_or_else(|| {
            format!("{text:?} is not a rate between 32kB and 1GB per second (e.g. 50MB)")
        })
}

/// Keeps resident memory close to live memory.
///
/// walsafe's big allocations are short-lived 16 MiB segment buffers made
/// on several threads. By default glibc raises its mmap threshold each time
/// such a buffer is freed, so the next ones come from per-thread heap
/// arenas that are not given back: RSS then tracks the sum of every
/// thread's peak (measured: ~190 MiB while draining a backlog). A fixed
/// threshold keeps large buffers in mmap (returned on free) and two arenas
/// bound the rest.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Whether this process runs `wal-fetch`, known before the arguments are
/// parsed: for `restore_command` every failure, even of the arguments or
/// of opening the log file, must exit ≥ 126 (PostgreSQL takes exit 1 for
/// "not in the archive" and would end recovery early, and clap's 2 is not
/// fatal either).
fn invoked_as_wal_fetch() -> bool {
    std::env::args_os().skip(1).any(|a| a == "wal-fetch")
}

/// A clap error on one line (its text without the usage block).
fn one_line(e: &clap::Error) -> String {
    let text = e.to_string();
    let line = text
        .lines()
        .take_while(|l| !l.starts_with("Usage:"))
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    line.strip_prefix("error: ").unwrap_or(&line).to_string()
}

/// Parses arguments and runs the command.
pub fn main() -> ExitCode {
    tune_allocator();
    // Failpoints named in FAILPOINTS (tests of crashes midway; the
    // feature is never in a release build).
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let fetching = invoked_as_wal_fetch();
    // Whether a standby or archive recovery calls: it decides the exit
    // code of every failure below (see crate::fetch).
    let mode = RecoveryMode::current();
    if fetching {
        // A panic must never look like "not in the archive" to archive
        // recovery (exit 1 would let PostgreSQL end recovery early).
        std::panic::set_hook(Box::new(move |info| {
            let what = format!("internal error: {info}");
            let code = crate::fetch::failed_code(mode, Failure::CouldNotLook, &what);
            std::process::exit(i32::from(code));
        }));
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e)
            if fetching
                && !matches!(
                    e.kind(),
                    clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
                ) =>
        {
            return crate::fetch::failed(
                mode,
                Failure::CouldNotLook,
                &format!(
                    "invalid arguments: {}; restore_command must be 'walsafe --config FILE wal-fetch %f %p'",
                    one_line(&e)
                ),
            );
        }
        Err(e) => e.exit(),
    };
    let log_file = match crate::logging::init(cli.log_format, cli.log_file.as_deref()) {
        Ok(f) => f,
        Err(e) => {
            let file = cli
                .log_file
                .as_deref()
                .unwrap_or(std::path::Path::new(""))
                .display();
            if fetching {
                return crate::fetch::failed(
                    mode,
                    Failure::CouldNotLook,
                    &format!(
                        "cannot open the log file {file}: {e}; fix its directory's permissions or drop --log-file from restore_command"
                    ),
                );
            }
            eprintln!(
                "walsafe: cannot open the log file {file}: {e}; fix its directory's permissions or drop --log-file"
            );
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::WalFetch { ref name, ref dest } => {
            let cfg = match Config::load(&cli.config) {
                Ok(c) => c,
                Err(e) => return crate::fetch::failed(mode, Failure::CouldNotLook, &e.to_string()),
            };
            // One thread: recovery waits on this process, and a
            // prefetched segment is one blocking check and a rename.
            let rt = tokio::runtime::Builder::new_current_thread()
                .max_blocking_threads(8)
                .enable_all()
                .build()
                .expect("tokio runtime");
            rt.block_on(crate::fetch::wal_fetch_command(
                cfg,
                mode,
                name.clone(),
                dest.clone(),
            ))
        }
        Command::GenerateAssets { ref dir } => report(assets::generate(dir)),
        Command::Keygen { ref file, add } => {
            use crate::repository::key;
            let k = key::Key::generate();
            let written = if add {
                key::add_key(file, &k).map(|()| {
                    println!(
                        "added key id {} to the key ring {} (after the keys already there: it decrypts now, and encrypts once its walsafe-key-v1 line is moved first); keep a copy of the file somewhere safe",
                        k.key_id_hex(),
                        file.display()
                    );
                })
            } else {
                key::write_key_file(file, &k).map(|()| {
                    println!(
                        "wrote a new repository key to {} (key id {}); keep a copy somewhere safe: without it the repository cannot be read",
                        file.display(),
                        k.key_id_hex()
                    );
                })
            };
            report(written.map_err(anyhow::Error::from))
        }
        Command::Demo {
            ref dir,
            keep,
            duration,
        } => {
            let dir = dir.clone();
            runtime(move || async move { report(demo::run(&dir, keep, duration).await) })
        }
        _ => {
            let cfg = match Config::load(&cli.config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("walsafe: {e}");
                    return ExitCode::from(if matches!(cli.command, Command::WalVerify { .. }) {
                        EXIT_VERIFY_ERROR
                    } else {
                        1
                    });
                }
            };
            match cli.command {
                Command::Run => {
                    runtime(|| async move { report(crate::agent::run(cfg, log_file).await) })
                }
                Command::WalPush { path } => {
                    runtime(|| async move { report(push::wal_push(&cfg, &path).await) })
                }
                Command::WalVerify { json } => runtime(|| verify::command(cfg, json)),
                Command::Status { json } => runtime(|| status::command(cfg, json)),
                Command::Check { switch_wal, pgdata } => {
                    runtime(|| check::command(cfg, switch_wal, pgdata))
                }
                Command::Config => report(config::command(&cfg)),
                Command::Backup {
                    label,
                    checkpoint,
                    max_rate,
                    wal_timeout,
                } => runtime(|| {
                    backup::command(
                        cfg,
                        crate::backup::BackupArgs {
                            label,
                            fast_checkpoint: checkpoint == CheckpointMode::Fast,
                            max_rate,
                            wal_timeout,
                        },
                    )
                }),
                Command::BackupList { json } => runtime(|| backup::list_command(cfg, json)),
                Command::KeyRotate {
                    rewrite,
                    retire,
                    apply,
                } => runtime(|| {
                    key_rotate::command(
                        cfg,
                        key_rotate::Asked {
                            rewrite,
                            retire,
                            apply,
                        },
                    )
                }),
                Command::RepoSync { from, to } => runtime(|| repo_sync::command(cfg, from, to)),
                Command::Restore(opts) => runtime(|| restore::command(cfg, *opts)),
                Command::Drill(opts) => runtime(|| drill::command(cfg, *opts)),
                Command::Retain {
                    window,
                    keep,
                    apply,
                    json,
                } => runtime(|| {
                    retain::command(cfg, crate::retain::RetainArgs { window, keep }, apply, json)
                }),
                Command::BackupVerify { name, json } => {
                    runtime(|| backup::verify_command(cfg, name, json))
                }
                Command::WalPrefetch { name, repository } => runtime(|| async move {
                    report(crate::fetch::prefetch(&cfg, &repository, &name).await)
                }),
                Command::WalFetch { .. }
                | Command::Keygen { .. }
                | Command::Demo { .. }
                | Command::GenerateAssets { .. } => {
                    unreachable!("handled above")
                }
            }
        }
    }
}

fn runtime<F, Fut>(f: F) -> ExitCode
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ExitCode>,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(8)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(f())
}

pub(crate) fn report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("walsafe: {}", error_line(&e));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn fetch_takes_name_and_dest() {
        let c = Cli::try_parse_from([
            "walsafe",
            "--config",
            "x.toml",
            "wal-fetch",
            "00000002.history",
            "pg_wal/RECOVERYHISTORY",
        ])
        .unwrap();
        assert!(matches!(c.command, Command::WalFetch { .. }));
        assert_eq!(c.config, PathBuf::from("x.toml"));
    }
}
