//! `walsafe wal-fetch` as the `restore_command` of a streaming standby and
//! of a point-in-time restore, against a real S3 server (moto behind a TCP
//! front that a test takes down):
//!
//! * a standby (`standby.signal`) is never shut down because the archive
//!   cannot be looked at: through a storage outage and an unreadable
//!   configuration file it keeps running and streaming, walsafe's reason
//!   in its log, and afterwards it catches up from the archive;
//! * the same outage during archive recovery (`recovery.signal`) stops
//!   recovery (exit 126) and never lets it promote.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::front::TcpFront;
use common::pg::{PgCluster, PgOptions, RecoveryOutcome, TestDir};
use common::s3::S3Server;
use common::setup::{current_lsn, write_wal};
use common::walsafe::{restore, restore_command, wait_until, Agent, Settings};

/// How long the storage stays down under the standby.
const OUTAGE: Duration = Duration::from_secs(60);
/// How often, during the outage, the standby's stream is cut so that it
/// goes back to `restore_command`.
const CUT_EVERY: Duration = Duration::from_secs(10);

/// A primary archived by the agent into S3 through a front that can go
/// down, and a second configuration for `restore_command`.
struct Rig {
    _s3: S3Server,
    front: TcpFront,
    dir: TestDir,
    primary: PgCluster,
    agent: Agent,
    /// The configuration `restore_command` reads (not the agent's, so that
    /// the test can take it away without touching the agent).
    fetch_config: PathBuf,
}

fn rig(name: &str) -> Rig {
    let s3 = S3Server::start();
    let front = TcpFront::start(s3.port());
    let primary = PgCluster::start(&PgOptions {
        name: name.into(),
        ..Default::default()
    });
    let dir = TestDir::new(name);
    let mut settings = Settings::new(dir.path(), &primary.conninfo());
    settings.repo_url = s3.url(name);
    settings.repo_options = s3.repo_options_at(&front.endpoint()).into_iter().collect();
    settings.retries = 2;
    let config = settings.write(&dir.join("walsafe.toml"));
    let fetch_config = settings.write(&dir.join("fetch.toml"));
    let agent = Agent::start(&config, settings.metrics_port);
    Rig {
        _s3: s3,
        front,
        dir,
        primary,
        agent,
        fetch_config,
    }
}

impl Rig {
    /// `restore_command` reading the fetch configuration.
    fn restore_command(&self) -> String {
        restore_command(self.dir.path(), &self.fetch_config)
    }

    /// Writes a row on the primary and waits until the agent archived it.
    fn commit_archived(&self, v: &str) {
        self.primary.psql(&format!("INSERT INTO t VALUES ('{v}')"));
        self.agent
            .wait_archived(current_lsn(&self.primary), Duration::from_secs(60));
    }
}

/// Waits until `standby` shows row `v` (it replayed it).
fn wait_row(standby: &PgCluster, v: &str, timeout: Duration) {
    standby.wait_for(
        &format!("SELECT count(*) FROM t WHERE v = '{v}'"),
        "1",
        timeout,
    );
}

/// Cuts the standby's replication connection on the primary: the standby's
/// startup process goes back to its sources, `restore_command` first.
fn cut_stream(primary: &PgCluster) {
    primary.psql(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_replication WHERE application_name <> 'walsafe'",
    );
}

/// Lines of walsafe's in the server log, after byte `from`.
fn walsafe_lines(log: &str, from: usize) -> Vec<String> {
    log.get(from..)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("walsafe wal-fetch"))
        .map(str::to_string)
        .collect()
}

fn assert_streaming(standby: &PgCluster, what: &str) {
    assert!(
        standby.is_running(),
        "{what}: the standby was shut down:\n{}",
        standby.log_tail()
    );
    standby.wait_for(
        "SELECT status FROM pg_stat_wal_receiver",
        "streaming",
        Duration::from_secs(60),
    );
}

/// The segment holding `lsn` (PostgreSQL's `X/Y`) on timeline 1.
fn segment_of(primary: &PgCluster, lsn: &str) -> String {
    primary.psql(&format!("SELECT pg_walfile_name('{lsn}')"))
}

#[test]
fn a_standby_rides_out_a_storage_outage_and_an_unreadable_config_then_catches_up_from_the_archive()
{
    let mut rig = rig("standby-outage");
    rig.primary.psql("CREATE TABLE t (v text)");
    rig.commit_archived("before the standby");
    let standby = rig.primary.create_standby();
    standby.append_conf(&[&format!("restore_command = '{}'", rig.restore_command())]);
    standby.stop_fast();
    standby.start_again();
    assert_streaming(&standby, "with the archive up");
    rig.commit_archived("archive up");
    wait_row(&standby, "archive up", Duration::from_secs(60));

    // 1. Storage down for a minute. The standby restarts and its stream is
    //    cut again and again: every time it asks restore_command first.
    rig.front.down();
    let log_from = standby.log().len();
    let started = Instant::now();
    standby.stop_fast();
    standby.start_again();
    let mut rows = 0;
    while started.elapsed() < OUTAGE {
        assert_streaming(&standby, "during the storage outage");
        rows += 1;
        let v = format!("outage {rows}");
        rig.primary.psql(&format!("INSERT INTO t VALUES ('{v}')"));
        wait_row(&standby, &v, Duration::from_secs(60));
        cut_stream(&rig.primary);
        std::thread::sleep(CUT_EVERY.min(OUTAGE.saturating_sub(started.elapsed())));
    }
    assert_streaming(&standby, "at the end of the storage outage");
    let lines = walsafe_lines(&standby.log(), log_from);
    assert!(
        lines.iter().any(|l| l.contains("walsafe wal-fetch: ERROR")
            && l.contains("unreachable")
            && l.contains("standby.signal")),
        "the standby's log must say why the archive was not used:\n{}",
        lines.join("\n")
    );
    assert!(
        !lines.iter().any(|l| l.contains("FATAL")),
        "{}",
        lines.join("\n")
    );
    rig.front.up();

    // 2. The configuration file is gone (storage up): the same.
    let moved = rig.dir.join("fetch.toml.moved");
    std::fs::rename(&rig.fetch_config, &moved).unwrap();
    let log_from = standby.log().len();
    standby.stop_fast();
    standby.start_again();
    assert_streaming(&standby, "with the configuration unreadable");
    rig.commit_archived("no config");
    wait_row(&standby, "no config", Duration::from_secs(60));
    cut_stream(&rig.primary);
    assert_streaming(&standby, "with the configuration unreadable, stream cut");
    assert!(
        wait_until(Duration::from_secs(30), || {
            walsafe_lines(&standby.log(), log_from)
                .iter()
                .any(|l| l.contains("walsafe wal-fetch: ERROR") && l.contains("fetch.toml"))
        }),
        "the standby's log must name the configuration file:\n{}",
        walsafe_lines(&standby.log(), log_from).join("\n")
    );
    std::fs::rename(&moved, &rig.fetch_config).unwrap();

    // 3. Catching up from the archive: the standby is down while the
    //    primary writes and recycles the WAL it would need; started again,
    //    it restores that WAL from the repository.
    let replayed = standby.psql("SELECT pg_last_wal_replay_lsn()");
    let needed = segment_of(&rig.primary, &replayed);
    standby.stop_fast();
    let log_from = standby.log().len();
    for _ in 0..10 {
        write_wal(&rig.primary, 20);
        rig.primary.psql("SELECT pg_switch_wal()");
        rig.primary.psql("CHECKPOINT");
        if !rig.primary.wal_file(&needed).exists() {
            break;
        }
    }
    assert!(
        !rig.primary.wal_file(&needed).exists(),
        "the primary still holds {needed}: the standby could catch up without the archive"
    );
    rig.commit_archived("while the standby was down");
    standby.start_again();
    wait_row(
        &standby,
        "while the standby was down",
        Duration::from_secs(120),
    );
    let log = standby.log();
    assert!(
        log[log_from..].contains(&format!("restored log file \"{needed}\" from archive")),
        "{needed} was not restored from the archive:\n{}",
        standby.log_tail()
    );
    assert_streaming(&standby, "after catching up");
}

#[test]
fn a_storage_outage_during_a_point_in_time_restore_stops_recovery_and_never_promotes() {
    let mut rig = rig("pitr-outage");
    rig.primary.psql("CREATE TABLE t (v text)");
    let backup = rig.dir.join("backup");
    rig.primary.base_backup(&backup, "none");
    for i in 0..3 {
        write_wal(&rig.primary, 2);
        rig.commit_archived(&format!("row {i}"));
        rig.primary.psql("SELECT pg_switch_wal()");
    }
    rig.commit_archived("the last commit");

    rig.front.down();
    let during = restore(&backup, rig.dir.path(), &rig.fetch_config, &[]);
    let outcome = during.wait_recovery_end(Duration::from_secs(120));
    assert!(
        matches!(outcome, RecoveryOutcome::Failed(_)),
        "recovery must stop, not {outcome:?}:\n{}",
        during.log_tail()
    );
    let log = during.log();
    assert!(
        log.contains("walsafe wal-fetch: FATAL") && log.contains("unreachable"),
        "{}",
        during.log_tail()
    );
    assert!(
        !log.contains("selected new timeline ID") && !log.contains("archive recovery complete"),
        "recovery promoted during the outage:\n{}",
        during.log_tail()
    );

    // The outage was the only reason: with storage back the same restore
    // reaches the last commit.
    rig.front.up();
    let after = restore(&backup, rig.dir.path(), &rig.fetch_config, &[]);
    assert_eq!(
        after.wait_recovery_end(Duration::from_secs(120)),
        RecoveryOutcome::Promoted,
        "{}",
        after.log_tail()
    );
    assert_eq!(after.psql("SELECT count(*) FROM t"), "4");
}
