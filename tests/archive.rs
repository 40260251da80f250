//! End to end: a real PostgreSQL 15 streamed by `walsafe run` into a
//! repository, compared byte for byte with `pg_receivewal`, crashed, and
//! restored through `walsafe wal-fetch` as `restore_command`.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::pg::PgOptions;
use common::setup::{current_lsn, segment_name, setup, write_wal};
use common::walsafe::{complete_segments, fetch_bytes, restore_promoted, walsafe, Agent};

#[test]
fn archive_is_byte_exact_with_pg_receivewal() {
    let s = setup("exact", PgOptions::default());
    s.pg.psql("SELECT pg_create_physical_replication_slot('recv', true)");
    let recv_dir = s.dir.subdir("receivewal");
    let mut recv = s.pg.spawn_pg_receivewal(&recv_dir, Some("recv"));
    let agent = Agent::start(&s.config, s.settings.metrics_port);

    for _ in 0..4 {
        write_wal(&s.pg, 3);
        s.pg.psql("SELECT pg_switch_wal()");
    }
    write_wal(&s.pg, 1);
    let end = current_lsn(&s.pg);
    agent.wait_archived(end, Duration::from_secs(60));
    assert!(common::walsafe::wait_until(Duration::from_secs(30), || {
        complete_segments(&recv_dir).len() >= 4
    }));
    let _ = recv.kill();
    let _ = recv.wait();

    let names = complete_segments(&recv_dir);
    assert!(names.len() >= 4, "pg_receivewal wrote {names:?}");
    let work = s.dir.subdir("work");
    for (i, name) in names.iter().enumerate() {
        let theirs = std::fs::read(recv_dir.join(name)).unwrap();
        let ours = fetch_bytes(&s.config, name, &work);
        if i == 0 {
            // wal-fetch started a prefetcher: the next segment is downloaded
            // before recovery asks for it (and is verified when it does).
            // (The cache of a repository is `<[fetch] dir>/<repository id>/`,
            // each segment in it as `<name>.<hash>`.)
            let prefetched = || {
                std::fs::read_dir(&s.settings.prefetch_dir)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .any(|d| {
                        std::fs::read_dir(d.path())
                            .into_iter()
                            .flatten()
                            .flatten()
                            .any(|f| {
                                f.file_name()
                                    .to_string_lossy()
                                    .starts_with(&format!("{}.", names[1]))
                            })
                    })
            };
            assert!(
                common::walsafe::wait_until(Duration::from_secs(20), prefetched),
                "{} was not prefetched",
                names[1]
            );
        }
        assert!(
            ours == theirs,
            "segment {name} differs from pg_receivewal's"
        );
    }
    // Every complete segment left the spool once stored.
    let spooled: Vec<String> = std::fs::read_dir(&s.settings.spool)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| names.contains(n))
        .collect();
    assert!(
        spooled.is_empty(),
        "stored segments still spooled: {spooled:?}"
    );
    let verify = walsafe(&s.config, &["wal-verify"]);
    assert_eq!(
        verify.status.code(),
        Some(0),
        "wal-verify: {}",
        String::from_utf8_lossy(&verify.stdout)
    );
}

/// Commits a marker, then a disaster: the primary stops with `-m
/// immediate` and walsafe gets SIGKILL. A restore of the earlier base
/// backup must contain every marker. Rounds alternate between a kill as
/// soon as walsafe reports the marker archived (the chunk in the
/// repository is all a restore gets: what "archived" promises must be
/// enough) and an instant kill with walsafe as synchronous standby,
/// restarted afterwards with the primary still down (the spool holds the
/// marker and is shipped without any server). How soon a commit is
/// archived — the RPO — is measured in `benches/e2e.rs` (scenario 3), not
/// timed here.
#[test]
fn last_second_restore_recovers_the_marker() {
    let s = setup(
        "lastsec",
        PgOptions::default().conf("synchronous_standby_names = 'walsafe'"),
    );
    let mut agent = Agent::start(&s.config, s.settings.metrics_port);
    s.pg.psql("CREATE TABLE marker (round int, note text)");
    let backup = s.dir.join("backup");
    s.pg.base_backup(&backup, "none");

    for round in 1..=4 {
        write_wal(&s.pg, 1);
        let lsn_before = current_lsn(&s.pg);
        s.pg.psql(&format!("INSERT INTO marker VALUES ({round}, 'committed')"));
        let commit_lsn = current_lsn(&s.pg);
        assert!(commit_lsn > lsn_before);
        let offline_restart = round % 2 == 0;
        if !offline_restart {
            agent.wait_archived(commit_lsn, Duration::from_secs(30));
        }
        s.pg.stop_immediate();
        agent.kill9();

        if offline_restart {
            // No server: the agent ships the spool's durable tail by itself.
            agent = Agent::spawn(&s.config, s.settings.metrics_port);
            agent.wait_archived(commit_lsn, Duration::from_secs(30));
            agent.kill9();
        }

        let restored = restore_promoted(
            &backup,
            s.dir.path(),
            &s.config,
            &["recovery_target_timeline = 'latest'"],
            &format!("round {round}"),
        );
        let got = restored.psql("SELECT string_agg(round::text, ',' ORDER BY round) FROM marker");
        let want = (1..=round)
            .map(|r| r.to_string())
            .collect::<Vec<_>>()
            .join(",");
        assert_eq!(got, want, "round {round}: markers after restore");
        drop(restored);

        s.pg.start_again();
        agent = Agent::start(&s.config, s.settings.metrics_port);
    }
}

#[test]
fn pitr_to_a_time_keeps_exactly_the_rows_before_it() {
    let s = setup("pitr", PgOptions::default());
    let agent = Agent::start(&s.config, s.settings.metrics_port);
    s.pg.psql("CREATE TABLE t (id int, batch int)");
    let backup = s.dir.join("backup");
    s.pg.base_backup(&backup, "none");
    s.pg.psql("INSERT INTO t SELECT g, 1 FROM generate_series(1, 500) g");
    write_wal(&s.pg, 2);
    s.pg.psql("INSERT INTO t SELECT g, 1 FROM generate_series(501, 1000) g");
    std::thread::sleep(Duration::from_millis(300));
    let target =
        s.pg.psql("SELECT to_char(clock_timestamp(), 'YYYY-MM-DD HH24:MI:SS.US TZH:TZM')");
    std::thread::sleep(Duration::from_millis(300));
    s.pg.psql("INSERT INTO t SELECT g, 2 FROM generate_series(1001, 1500) g");
    s.pg.psql("SELECT pg_switch_wal()");
    s.pg.psql("INSERT INTO t VALUES (0, 3)");
    agent.wait_archived(current_lsn(&s.pg), Duration::from_secs(30));

    let restored = restore_promoted(
        &backup,
        s.dir.path(),
        &s.config,
        &[
            &format!("recovery_target_time = '{target}'"),
            "recovery_target_action = 'promote'",
        ],
        "PITR",
    );
    assert_eq!(
        restored.psql("SELECT count(*) FROM t WHERE batch = 1"),
        "1000"
    );
    assert_eq!(
        restored.psql("SELECT count(*) FROM t WHERE batch <> 1"),
        "0"
    );
}

/// SIGKILL the agent again and again during heavy writes; afterwards every
/// segment of the range is stored and equal to pg_receivewal's.
#[test]
fn crash_anywhere_loses_nothing() {
    let s = setup("crash", PgOptions::default());
    s.pg.psql("SELECT pg_create_physical_replication_slot('recv', true)");
    let recv_dir = s.dir.subdir("receivewal");
    let mut recv = s.pg.spawn_pg_receivewal(&recv_dir, Some("recv"));
    s.pg.psql("CREATE TABLE filler (id bigserial, pad text)");

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let sock = s.pg.socket_dir().to_path_buf();
        let port = s.pg.port();
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let out = common::pg::as_postgres(&mut common::pg::pg_command("psql"))
                    .args(["-XAtq", "-h"])
                    .arg(&sock)
                    .args(["-p", &port.to_string(), "-U", "postgres", "-d", "postgres", "-c"])
                    .arg("INSERT INTO filler (pad) SELECT repeat(md5(g::text), 30) FROM generate_series(1, 2000) g")
                    .output()
                    .unwrap();
                assert!(out.status.success());
                n += 1;
            }
            n
        })
    };
    let started = Instant::now();
    let mut kills = 0;
    let mut rng_state = 0x2545F4914F6CDD1Du64;
    while kills < 6 {
        let mut agent = Agent::spawn(&s.config, s.settings.metrics_port);
        // Kill at a pseudo-random instant between 0.3 and 2.3 s.
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        std::thread::sleep(Duration::from_millis(300 + rng_state % 2000));
        agent.kill9();
        kills += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let batches = writer.join().unwrap();
    assert!(batches > 0);
    s.pg.psql("SELECT pg_switch_wal()");
    s.pg.psql("INSERT INTO filler (pad) VALUES ('end')");
    let end = current_lsn(&s.pg);
    let agent = Agent::start(&s.config, s.settings.metrics_port);
    agent.wait_archived(end, Duration::from_secs(60));
    // pg_receivewal must have completed the segment before the one holding `end`.
    let last_full = segment_name(1, end / s.pg.segment_size() - 1);
    assert!(common::walsafe::wait_until(Duration::from_secs(30), || {
        recv_dir.join(&last_full).exists()
    }));
    let _ = recv.kill();
    let _ = recv.wait();
    let names = complete_segments(&recv_dir);
    assert!(
        names.len() >= 2,
        "only {names:?} after {:?}",
        started.elapsed()
    );
    let work = s.dir.subdir("work");
    for name in &names {
        let theirs = std::fs::read(recv_dir.join(name)).unwrap();
        let ours = fetch_bytes(&s.config, name, &work);
        assert!(
            ours == theirs,
            "segment {name} differs from pg_receivewal's after {kills} kills"
        );
    }
    let verify = walsafe(&s.config, &["wal-verify"]);
    assert_eq!(
        verify.status.code(),
        Some(0),
        "wal-verify after kills: {}",
        String::from_utf8_lossy(&verify.stdout)
    );
}

/// With walsafe named in synchronous_standby_names, commits complete, and
/// each committed row is in the spool (fsynced) when its commit returns.
#[test]
fn synchronous_standby_commits_are_in_the_spool() {
    let s = setup(
        "sync",
        PgOptions::default().conf("synchronous_standby_names = 'walsafe'"),
    );
    let _agent = Agent::start(&s.config, s.settings.metrics_port);
    s.pg.psql("CREATE TABLE t (note text)");
    for i in 0..20 {
        let marker = format!("sync-marker-{i:04}-{}", std::process::id());
        let started = Instant::now();
        s.pg.psql(&format!("INSERT INTO t VALUES ('{marker}')"));
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "commit waited too long"
        );
        // The commit returned: the row's WAL must be in a spool file now.
        let found = std::fs::read_dir(&s.settings.spool)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("0000"))
            .any(|e| {
                let data = std::fs::read(e.path()).unwrap_or_default();
                data.windows(marker.len()).any(|w| w == marker.as_bytes())
            });
        assert!(found, "commit {i} returned but its row is not in the spool");
    }
    assert_eq!(
        s.pg.psql("SELECT sync_state FROM pg_stat_replication WHERE application_name = 'walsafe'"),
        "sync"
    );
}

/// Ack mode `remote` with walsafe as synchronous standby: a commit returns
/// only once its WAL is stored in the repository, so the row can be read
/// back through wal-fetch the moment the commit returns.
#[test]
fn ack_remote_commits_are_in_the_repository_when_they_return() {
    let mut s = setup(
        "ackremote",
        PgOptions::default().conf("synchronous_standby_names = 'walsafe'"),
    );
    s.settings.ack = "remote".into();
    s.settings.prefetch = 0;
    let config = s.settings.write(&s.dir.join("walsafe.toml"));
    let _agent = Agent::start(&config, s.settings.metrics_port);
    s.pg.psql("CREATE TABLE t (note text)");
    let work = s.dir.subdir("work");
    for i in 0..5 {
        let marker = format!("remote-ack-{i:03}-{}", std::process::id());
        s.pg.psql(&format!("INSERT INTO t VALUES ('{marker}')"));
        let name = s.pg.psql("SELECT pg_walfile_name(pg_current_wal_lsn())");
        let data = fetch_bytes(&config, &name, &work);
        assert!(
            data.windows(marker.len()).any(|w| w == marker.as_bytes()),
            "commit {i} returned but its row is not in the repository"
        );
    }
}

/// What a `file://` repository holds of each segment right now: the end
/// (segment offset) of the contiguous chunks from offset 0, or the segment
/// size when the whole segment (or its closed `.partial`) is stored.
fn stored_ends(repo: &Path, segment_size: u64) -> std::collections::BTreeMap<String, u64> {
    let mut ends = std::collections::BTreeMap::new();
    if let Ok(d) = std::fs::read_dir(repo.join("chunks")) {
        for seg in d.flatten() {
            let mut ranges: Vec<(u64, u64)> = std::fs::read_dir(seg.path())
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|c| {
                    let n = c.file_name().to_string_lossy().into_owned();
                    let (a, b) = n.split_once('-')?;
                    Some((
                        u64::from_str_radix(a, 16).ok()?,
                        u64::from_str_radix(b, 16).ok()?,
                    ))
                })
                .collect();
            ranges.sort();
            let mut end = 0;
            for (a, b) in ranges {
                if a <= end {
                    end = end.max(b);
                }
            }
            ends.insert(seg.file_name().to_string_lossy().into_owned(), end);
        }
    }
    if let Ok(d) = std::fs::read_dir(repo.join("wal")) {
        for f in d.flatten() {
            let n = f.file_name().to_string_lossy().into_owned();
            let seg = n.trim_end_matches(".partial");
            if seg.len() == 24 && seg.bytes().all(|b| b.is_ascii_hexdigit()) {
                ends.insert(seg.to_string(), segment_size);
            }
        }
    }
    ends
}

/// End LSN (bytes) of the COMMIT record of each transaction in `xids`, read
/// with pg_waldump from the server's own WAL between `from` and `to`.
fn commit_ends(
    pg: &common::pg::PgCluster,
    from: u64,
    to: u64,
    xids: &[u32],
) -> std::collections::BTreeMap<u32, u64> {
    let lsn = |l: u64| format!("{:X}/{:X}", l >> 32, l & 0xFFFF_FFFF);
    let out = pg
        .bins()
        .command("pg_waldump")
        .arg("-p")
        .arg(pg.datadir().join("pg_wal"))
        .args(["-s", &lsn(from), "-e", &lsn(to), "-r", "Transaction"])
        .output()
        .expect("run pg_waldump");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut ends = std::collections::BTreeMap::new();
    for line in text.lines().filter(|l| l.contains("desc: COMMIT")) {
        let field = |name: &str| {
            line.split(name)
                .nth(1)
                .map(|r| r.trim_start())
                .and_then(|r| r.split([',', ' ']).next())
                .map(str::to_string)
        };
        let tx: u32 = field("tx:").and_then(|t| t.parse().ok()).unwrap();
        let at = common::setup::parse_lsn(&field("lsn:").unwrap());
        let tot: u64 = line
            .split("len (rec/tot):")
            .nth(1)
            .and_then(|r| r.split('/').nth(1))
            .and_then(|t| t.split(',').next())
            .and_then(|t| t.trim().parse().ok())
            .unwrap();
        if xids.contains(&tx) {
            ends.insert(tx, at + tot);
        }
    }
    assert_eq!(
        ends.len(),
        xids.len(),
        "pg_waldump did not show every commit ({:?} of {xids:?}); stderr: {}",
        ends.keys().collect::<Vec<_>>(),
        String::from_utf8_lossy(&out.stderr)
    );
    ends
}

#[test]
fn ack_remote_concurrent_commits_each_return_only_once_their_commit_record_is_stored() {
    // Bursts of concurrent single-row commits, walsafe the synchronous
    // standby with ack remote: the moment each COMMIT returns, the
    // repository is looked at (a directory listing, microseconds), and
    // later pg_waldump says where each commit record ended. Every commit
    // must have been stored (contiguously from the segment's start) when
    // it returned. The number of chunk uploads is reported, not asserted:
    // how the commits coalesce depends on scheduling.
    const SESSIONS: usize = 12;
    const ROUNDS: usize = 4;
    let mut s = setup(
        "ackburst",
        PgOptions::default().conf("synchronous_standby_names = 'walsafe'"),
    );
    s.settings.ack = "remote".into();
    s.settings.prefetch = 0;
    let config = s.settings.write(&s.dir.join("walsafe.toml"));
    let agent = Agent::start(&config, s.settings.metrics_port);
    s.pg.wait_for(
        "SELECT sync_state FROM pg_stat_replication WHERE application_name = 'walsafe'",
        "sync",
        Duration::from_secs(30),
    );
    s.pg.psql("CREATE TABLE burst (session int, round int)");
    let repo: std::path::PathBuf = s.settings.repo_url.trim_start_matches("file://").into();
    let segment_size = s.pg.segment_size();
    let from = current_lsn(&s.pg);
    let chunks = |a: &Agent| {
        common::walsafe::counter_sum(
            &a.metrics(),
            "walsafe_uploads_total",
            "kind=\"chunk\",result=\"ok\"",
        )
    };
    let chunks_before = chunks(&agent);
    let conninfo = format!(
        "host={} port={} user=postgres dbname=postgres",
        s.pg.socket_dir().display(),
        s.pg.port()
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // (xid, what the repository held when its COMMIT returned)
    let seen: Vec<(u32, std::collections::BTreeMap<String, u64>)> = rt.block_on(async {
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(SESSIONS));
        let mut tasks = Vec::new();
        for session in 0..SESSIONS {
            let conninfo = conninfo.clone();
            let barrier = barrier.clone();
            let repo = repo.clone();
            tasks.push(tokio::spawn(async move {
                let (client, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
                    .await
                    .unwrap();
                tokio::spawn(conn);
                let mut seen = Vec::new();
                for round in 0..ROUNDS {
                    client.batch_execute("BEGIN").await.unwrap();
                    let row = client
                        .query_one(
                            "INSERT INTO burst VALUES ($1, $2) RETURNING pg_current_xact_id()::text",
                            &[&(session as i32), &(round as i32)],
                        )
                        .await
                        .unwrap();
                    let xid: u32 = row.get::<_, &str>(0).parse().unwrap();
                    barrier.wait().await;
                    client.batch_execute("COMMIT").await.unwrap();
                    seen.push((xid, stored_ends(&repo, segment_size)));
                }
                seen
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all
    });
    let to = parse_flush(&s.pg);
    let xids: Vec<u32> = seen.iter().map(|(x, _)| *x).collect();
    let ends = commit_ends(&s.pg, from, to, &xids);
    for (xid, stored) in &seen {
        let end = ends[xid];
        let segno = (end - 1) / segment_size;
        let name = segment_name(1, segno);
        let need = end - segno * segment_size;
        let have = stored.get(&name).copied().unwrap_or(0);
        assert!(
            have >= need,
            "the commit of transaction {xid} (its record ends at {:X}/{:X}) returned while the repository held {name} only up to offset {have:#X}: acknowledged before it was stored",
            end >> 32,
            end & 0xFFFF_FFFF
        );
    }
    let used = chunks(&agent) - chunks_before;
    eprintln!(
        "REPORT {} commits in {ROUNDS} bursts of {SESSIONS}: {used:.0} chunk uploads",
        seen.len()
    );
    // The commits are served through wal-fetch, the path recovery takes:
    // the segment holding the last commit, as assembled from what was
    // stored, is the server's own WAL up to that commit's end.
    let last = *ends.values().max().expect("commits");
    let segno = (last - 1) / segment_size;
    let name = segment_name(1, segno);
    let data = fetch_bytes(&config, &name, &s.dir.subdir("work"));
    assert!(data.len() as u64 == segment_size);
    let upto = (last - segno * segment_size) as usize;
    let server = std::fs::read(s.pg.wal_file(&name)).unwrap();
    let differs = data[..upto]
        .iter()
        .zip(&server[..upto])
        .position(|(a, b)| a != b);
    assert!(
        differs.is_none(),
        "{name} served by wal-fetch differs from the server's at offset {:#X}, before the last commit's end {upto:#X}",
        differs.unwrap_or(0)
    );
}

/// `pg_current_wal_flush_lsn()` in bytes.
fn parse_flush(pg: &common::pg::PgCluster) -> u64 {
    common::setup::parse_lsn(&pg.psql("SELECT pg_current_wal_flush_lsn()"))
}
