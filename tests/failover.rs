//! Following a failover (rule 8): the primary dies, an asynchronous
//! standby that was behind walsafe is promoted. walsafe holds WAL past the
//! new primary's fork point; it must keep that WAL archived under the old
//! timeline, never mix it into the new one, and go on archiving the new
//! timeline, without exiting and without a gap.

mod common;

use std::time::Duration;

use common::pg::{PgCluster, PgOptions, TestDir};
use common::setup::current_lsn;
use common::walsafe::{assert_no_gap, restore_promoted, wait_until, Agent, Settings};

#[test]
fn an_asynchronous_failover_to_a_standby_behind_walsafe_is_followed() {
    // Defect 10's setting: walsafe waits for a read-write server, then finds
    // the promoted standby (without the slot) by itself.
    asynchronous_failover("fo-rw", "target_session_attrs=read-write");
}

#[test]
fn an_asynchronous_failover_is_followed_through_a_standby_still_in_recovery() {
    // Without target_session_attrs walsafe reaches the standby while it is
    // still in recovery and behind walsafe: it waits there, then follows.
    asynchronous_failover("fo-any", "");
}

fn asynchronous_failover(name: &str, attrs: &str) {
    let primary = PgCluster::start(&PgOptions {
        name: name.into(),
        ..Default::default()
    });
    primary.psql("CREATE TABLE t (id int, pad text)");
    primary.psql("INSERT INTO t SELECT g, 'before' FROM generate_series(1, 100) g");
    let standby = primary.create_standby();
    let dir = TestDir::new(name);
    let backup = dir.join("base");
    primary.base_backup(&backup, "stream");

    // walsafe follows whichever of the two answers, primary first.
    let conninfo = format!(
        "host={},{} port={},{} user=postgres {attrs}",
        primary.socket_dir().display(),
        standby.socket_dir().display(),
        primary.port(),
        standby.port()
    );
    let settings = Settings::new(dir.path(), &conninfo);
    let config = settings.write(&dir.join("walsafe.toml"));
    let mut agent = Agent::start(&config, settings.metrics_port);
    agent.wait_archived(current_lsn(&primary), Duration::from_secs(30));

    // The standby falls behind: stopped while the primary goes on, and
    // walsafe gets WAL the standby never will.
    standby.stop_fast();
    primary
        .psql("INSERT INTO t SELECT g, 'lost in the failover' FROM generate_series(1001, 1100) g");
    primary.psql("SELECT pg_switch_wal()");
    primary.psql("INSERT INTO t SELECT g, 'lost too' FROM generate_series(1101, 1200) g");
    let walsafe_end = current_lsn(&primary);
    agent.wait_archived(walsafe_end, Duration::from_secs(30));

    // The primary dies; the standby comes back and is promoted.
    primary.stop_immediate();
    standby.start_again();
    let promoted = std::time::Instant::now();
    standby.promote();
    standby.wait_for("SELECT pg_is_in_recovery()", "f", Duration::from_secs(30));
    standby
        .psql("INSERT INTO t SELECT g, 'on the new timeline' FROM generate_series(2001, 2100) g");
    standby.psql("SELECT pg_switch_wal()");
    standby.psql("INSERT INTO t VALUES (3000, 'the last commit')");
    let end = current_lsn(&standby);

    archives_timeline_2_up_to(&mut agent, end, "the failover");
    eprintln!(
        "REPORT asynchronous failover ({}): archiving timeline 2 {:.1} s after the promotion; peak RSS {} KiB; log: {}",
        if attrs.is_empty() { "any host" } else { attrs },
        promoted.elapsed().as_secs_f64(),
        agent.peak_rss_kib(),
        agent.first_log_line("FAILOVER")
    );
    // It saw the fork for what it is, and said so.
    assert!(
        agent
            .log()
            .contains("FAILOVER: the server's timeline 2 forked off timeline 1"),
        "log:\n{}",
        agent.log()
    );
    // The repository holds both histories, consistently.
    assert_no_gap(&agent, &settings.spool, &config);
    // What walsafe held past the fork is archived under timeline 1: the
    // closed .partial is the old primary's own WAL up to where it ends,
    // and reaches at least what walsafe had archived before the failover.
    assert_partial_is_the_old_primary_s_wal(&config, &primary, walsafe_end);

    // A restore following the latest timeline is the new primary's history:
    // everything before the fork, everything after it on timeline 2, and
    // none of what only the old primary had.
    let restored = restore_promoted(
        &backup,
        dir.path(),
        &config,
        &["recovery_target_timeline = 'latest'"],
        "restore across the failover",
    );
    assert_eq!(
        restored.psql("SELECT count(*) FROM t WHERE pad = 'before'"),
        "100"
    );
    assert_eq!(
        restored.psql("SELECT count(*) FROM t WHERE pad = 'on the new timeline'"),
        "100"
    );
    assert_eq!(restored.psql("SELECT count(*) FROM t WHERE id = 3000"), "1");
    assert_eq!(
        restored.psql("SELECT count(*) FROM t WHERE id > 1000 AND id < 2000"),
        "0"
    );
    drop(agent);
}

/// Streaming from a standby (cascading replication): when that standby is
/// promoted, its walsender ends timeline 1 at the switch point and walsafe
/// goes on with timeline 2, as pg_receivewal does.
#[test]
fn streaming_from_a_standby_follows_its_promotion() {
    let primary = PgCluster::start(&PgOptions {
        name: "fo-upstream".into(),
        ..Default::default()
    });
    primary.psql("CREATE TABLE t (id int, pad text)");
    primary.psql("INSERT INTO t SELECT g, 'before' FROM generate_series(1, 100) g");
    let standby = primary.create_standby();
    let dir = TestDir::new("failover-cascade");
    let backup = dir.join("base");
    primary.base_backup(&backup, "stream");

    let settings = Settings::new(dir.path(), &standby.conninfo());
    let config = settings.write(&dir.join("walsafe.toml"));
    let mut agent = Agent::start(&config, settings.metrics_port);
    primary.psql("INSERT INTO t SELECT g, 'through the standby' FROM generate_series(101, 200) g");
    let lsn = current_lsn(&primary);
    standby.wait_for(
        &format!(
            "SELECT pg_last_wal_replay_lsn() >= '{:X}/{:X}'",
            lsn >> 32,
            lsn & 0xFFFF_FFFF
        ),
        "t",
        Duration::from_secs(30),
    );
    agent.wait_archived(lsn, Duration::from_secs(30));

    primary.stop_immediate();
    standby.promote();
    standby.wait_for("SELECT pg_is_in_recovery()", "f", Duration::from_secs(30));
    standby.psql("INSERT INTO t SELECT g, 'after the promotion' FROM generate_series(201, 300) g");
    let end = current_lsn(&standby);
    archives_timeline_2_up_to(&mut agent, end, "the standby's promotion");
    assert_no_gap(&agent, &settings.spool, &config);

    let restored = restore_promoted(
        &backup,
        dir.path(),
        &config,
        &["recovery_target_timeline = 'latest'"],
        "restore after the standby's promotion",
    );
    assert_eq!(restored.psql("SELECT count(*) FROM t"), "300");
    drop(agent);
}

/// A server that is down when walsafe starts, longer than
/// `[postgres] connect_timeout`, is waited for once the repository is
/// pinned to its cluster: exiting would stop the shipping of what the spool
/// holds, and under systemd only restart the wait.
#[test]
fn a_server_down_at_start_up_is_waited_for_once_the_repository_is_pinned() {
    let pg = PgCluster::start(&PgOptions {
        name: "down-at-start".into(),
        ..Default::default()
    });
    let dir = TestDir::new("down-at-start");
    let mut settings = Settings::new(dir.path(), &pg.conninfo());
    settings.connect_timeout = "1s".into();
    let config = settings.write(&dir.join("walsafe.toml"));
    let mut agent = Agent::start(&config, settings.metrics_port);
    pg.psql("CREATE TABLE t (id int)");
    agent.wait_archived(current_lsn(&pg), Duration::from_secs(30));
    agent.kill9();
    pg.stop_immediate();

    let mut agent = Agent::spawn(&config, settings.metrics_port);
    // The event: walsafe still retrying two connect_timeouts after its
    // first failed attempt (the log's own timestamps), or its exit.
    let retried_past_the_timeout = |log: &str| {
        let stamps: Vec<chrono::DateTime<chrono::FixedOffset>> = log
            .lines()
            .filter(|l| l.contains("cannot connect yet"))
            .filter_map(|l| chrono::DateTime::parse_from_rfc3339(l.split_whitespace().next()?).ok())
            .collect();
        stamps.len() >= 2 && *stamps.last().unwrap() - stamps[0] >= chrono::TimeDelta::seconds(2)
    };
    assert!(
        wait_until(Duration::from_secs(60), || agent.try_wait().is_some()
            || retried_past_the_timeout(&agent.log())),
        "log:\n{}",
        agent.log()
    );
    assert!(
        agent.try_wait().is_none(),
        "walsafe gave up on a pinned cluster's server after connect_timeout; log:\n{}",
        agent.log()
    );
    assert!(
        agent.log().contains("cannot connect yet"),
        "log:\n{}",
        agent.log()
    );
    pg.start_again();
    pg.psql("INSERT INTO t VALUES (1)");
    let end = current_lsn(&pg);
    agent.wait_archived(end, Duration::from_secs(60));
    assert!(agent.try_wait().is_none(), "log:\n{}", agent.log());
}

/// The one closed `.partial` of timeline 1 in the repository, decoded
/// through the library (wal-fetch never serves `.partial` names), equals
/// the old primary's pg_wal file byte for byte up to where its WAL ends
/// (zeros after), and that end is at or past `held`.
fn assert_partial_is_the_old_primary_s_wal(config: &std::path::Path, old: &PgCluster, held: u64) {
    use walsafe::repository::{ObjectName, Repository, SegmentFile};
    let cfg = walsafe::config::Config::load(config).unwrap();
    let wal_dir =
        std::path::PathBuf::from(cfg.repository().url.strip_prefix("file://").unwrap()).join("wal");
    let partials: Vec<String> = std::fs::read_dir(&wal_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("00000001") && n.ends_with(".partial"))
        .collect();
    assert_eq!(
        partials.len(),
        1,
        "timeline 1's closed .partial: {partials:?}"
    );
    let name = partials[0].trim_end_matches(".partial").to_string();
    let data = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let repo = Repository::open(cfg.repository()).unwrap();
        repo.get(&ObjectName::ClosedPartial(
            SegmentFile::parse(&name).unwrap(),
        ))
        .await
        .unwrap()
        .expect("the closed partial is stored")
    });
    let server = std::fs::read(old.wal_file(&name)).unwrap();
    assert_eq!(data.len(), server.len());
    // Records are MAXALIGNed (8 bytes): a record's last bytes may be zeros.
    let end = data
        .iter()
        .rposition(|&b| b != 0)
        .map_or(0, |i| (i + 1).next_multiple_of(8));
    let seg_start = u64::from_str_radix(&name[16..24], 16).unwrap() * server.len() as u64
        + (u64::from_str_radix(&name[8..16], 16).unwrap() << 32);
    assert!(
        seg_start + end as u64 >= held,
        "{name}.partial ends at offset {end:#X}, before what walsafe had archived ({held:X})"
    );
    let differs = data[..end]
        .iter()
        .zip(&server[..end])
        .position(|(a, b)| a != b);
    assert!(
        differs.is_none(),
        "{name}.partial differs from the old primary's WAL at offset {:#X} (its WAL ends at {end:#X})",
        differs.unwrap_or(0)
    );
}

/// Waits until walsafe, still running, archived timeline 2 up to `end`.
fn archives_timeline_2_up_to(agent: &mut Agent, end: u64, what: &str) {
    assert!(
        common::walsafe::wait_until(Duration::from_secs(90), || {
            agent.gauge("walsafe_timeline") == 2.0
                && agent.gauge("walsafe_archived_lsn_bytes") as u64 >= end
        }),
        "walsafe did not follow {what} to timeline 2 (archived {}); log:\n{}",
        agent.gauge("walsafe_archived_lsn_bytes"),
        agent.log()
    );
    assert!(
        agent.try_wait().is_none(),
        "walsafe exited; log:\n{}",
        agent.log()
    );
}
