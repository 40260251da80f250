//! `walsafe wal-fetch` as PostgreSQL's `restore_command`: exit 1 only for
//! WAL proven absent, ≥ 126 for everything else (argument errors, a log
//! file that cannot be opened, a segment holding the start of a recorded
//! gap), and a prefetch directory shared with another repository never
//! serves that repository's objects.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::pg::{chown_postgres, PgCluster, PgOptions, RecoveryOutcome, TestDir};
use common::setup::{current_lsn, output_text as text, segment_name, setup, write_wal};
use common::walsafe::{bin_copy, restore, wait_until, walsafe, Agent, Settings};
use walsafe::gap::Gap;
use walsafe::pg::{Lsn, TimelineId};
use walsafe::repository::{Compression, Repository, Store};

/// `walsafe ARGS…` without a --config of ours.
fn walsafe_raw(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(bin_copy(dir))
        .args(args)
        .env("WALSAFE_CONFIG", dir.join("walsafe.toml"))
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn wal_fetch_argument_errors_are_fatal() {
    let dir = TestDir::new("fetch-args");
    Settings::new(dir.path(), "host=/nonexistent").write(&dir.join("walsafe.toml"));
    for args in [
        vec!["wal-fetch"],
        vec!["wal-fetch", "000000010000000000000001"],
        vec![
            "wal-fetch",
            "000000010000000000000001",
            "pg_wal/RECOVERYXLOG",
            "extra",
        ],
        vec!["wal-fetch", "--no-such-option", "a", "b"],
    ] {
        let out = walsafe_raw(dir.path(), &args);
        let all = text(&out);
        assert_eq!(out.status.code(), Some(126), "{args:?}: {all}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("walsafe wal-fetch: FATAL") && err.contains("restore_command"),
            "{args:?}: {all}"
        );
    }
    // Other commands keep clap's usual exit code.
    let out = walsafe_raw(dir.path(), &["wal-push"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

#[test]
fn wal_fetch_with_an_unopenable_log_file_is_fatal() {
    let dir = TestDir::new("fetch-log");
    let config = Settings::new(dir.path(), "host=/nonexistent").write(&dir.join("walsafe.toml"));
    let dest = dir.join("out");
    let out = walsafe_raw(
        dir.path(),
        &[
            "--config",
            config.to_str().unwrap(),
            "--log-file",
            "/nonexistent-dir/walsafe.log",
            "wal-fetch",
            "000000010000000000000001",
            dest.to_str().unwrap(),
        ],
    );
    let all = text(&out);
    assert_eq!(out.status.code(), Some(126), "{all}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/nonexistent-dir/walsafe.log"),
        "{all}"
    );
}

/// The first `.partial`-free chunk end of `segment` in a file:// repository.
fn chunk_end(repo: &Path, segment: &str) -> u64 {
    std::fs::read_dir(repo.join("chunks").join(segment))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter_map(|n| u64::from_str_radix(n.split_once('-')?.1, 16).ok())
        .max()
        .expect("chunks of the filling segment")
}

/// A gap starting in the middle of a segment: the segment is stored only
/// up to the gap (chunks), and recovery reading it would stop there and
/// promote, never reaching the WAL after the gap. wal-fetch refuses it,
/// naming the gap and the setting, unless the operator set
/// `[fetch] recover_to_gap` to that gap's start.
#[test]
fn a_segment_holding_a_gap_start_is_refused_unless_the_operator_opts_in() {
    let s = setup("fetch-gap", PgOptions::default());
    let agent = Agent::start(&s.config, s.settings.metrics_port);
    s.pg.psql("CREATE TABLE t (v text)");
    s.pg.psql("INSERT INTO t VALUES ('before the backup')");
    let backup = s.dir.join("backup");
    s.pg.base_backup(&backup, "stream");
    for e in std::fs::read_dir(backup.join("pg_wal")).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::remove_file(e.path()).unwrap();
        }
    }
    write_wal(&s.pg, 2);
    s.pg.psql("SELECT pg_switch_wal()");
    s.pg.psql("INSERT INTO t VALUES ('before the gap')");
    let end = current_lsn(&s.pg);
    agent.wait_archived(end, Duration::from_secs(60));
    let mut agent = agent;
    agent.kill9();
    s.pg.psql("INSERT INTO t VALUES ('lost in the gap')");

    // The agent would record this gap when it found the WAL after `end`
    // gone; record it as it would.
    let seg_size = s.pg.segment_size();
    let segno = end / seg_size;
    let name = segment_name(1, segno);
    let repo_dir = s.dir.join("repo");
    assert!(
        !repo_dir.join("wal").join(&name).exists(),
        "{name} must be stored only as chunks"
    );
    let from = segno * seg_size + chunk_end(&repo_dir, &name);
    assert!(from % seg_size != 0, "the gap starts mid-segment");
    let gap = Gap::new(
        TimelineId(1),
        Lsn(from),
        Lsn((segno + 3) * seg_size),
        "test: slot invalidated",
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = Store::open(&s.settings.repo_url, &BTreeMap::new(), 1).unwrap();
        Repository::from_parts(store, None, Compression::Zstd, 1)
            .record_gap(&gap)
            .await
            .unwrap();
    });
    chown_postgres(&repo_dir);

    let dest = s.dir.join("out");
    let f = walsafe(&s.config, &["wal-fetch", &name, dest.to_str().unwrap()]);
    let all = text(&f);
    assert_eq!(f.status.code(), Some(126), "{all}");
    let err = String::from_utf8_lossy(&f.stderr);
    let setting = format!("recover_to_gap = \"1:{}\"", Lsn(from));
    assert!(
        err.contains(&format!("from {} to {} on timeline 1", Lsn(from), gap.to)),
        "{all}"
    );
    assert!(err.contains(&setting), "{all}");
    assert!(!dest.exists());

    // Recovery stops instead of promoting at the gap.
    let restored = restore(&backup, s.dir.path(), &s.config, &[]);
    match restored.wait_recovery_end(Duration::from_secs(120)) {
        RecoveryOutcome::Failed(log) => assert!(log.contains("recover_to_gap"), "{log}"),
        other => panic!(
            "recovery must stop at the gap, got {other:?}:\n{}",
            restored.log_tail()
        ),
    }
    drop(restored);

    // The operator opts in for exactly this gap: recovery ends at it.
    let other_gap = s.dir.join("other-gap.toml");
    let wrong = s.settings.to_toml().replace(
        "[fetch]\n",
        &format!("[fetch]\nrecover_to_gap = \"1:{}\"\n", Lsn(from + 8)),
    );
    std::fs::write(&other_gap, wrong).unwrap();
    chown_postgres(&other_gap);
    let f = walsafe(&other_gap, &["wal-fetch", &name, dest.to_str().unwrap()]);
    assert_eq!(
        f.status.code(),
        Some(126),
        "another gap start: {}",
        text(&f)
    );

    let opted = s.dir.join("opted-in.toml");
    let toml = s
        .settings
        .to_toml()
        .replace("[fetch]\n", &format!("[fetch]\n{setting}\n"));
    std::fs::write(&opted, toml).unwrap();
    chown_postgres(&opted);
    let f = walsafe(&opted, &["wal-fetch", &name, dest.to_str().unwrap()]);
    assert_eq!(f.status.code(), Some(0), "{}", text(&f));
    assert_eq!(std::fs::metadata(&dest).unwrap().len(), seg_size);
    let restored = restore(&backup, s.dir.path(), &opted, &[]);
    assert_eq!(
        restored.wait_recovery_end(Duration::from_secs(120)),
        RecoveryOutcome::Promoted,
        "{}",
        restored.log_tail()
    );
    assert_eq!(
        restored.psql("SELECT string_agg(v, ',' ORDER BY v) FROM t"),
        "before the backup,before the gap"
    );
}

/// Regular files under `dir` (recursively), lock files left out.
fn files_in(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .map(|e| {
                    let p = e.path();
                    if p.is_dir() {
                        files_in(&p)
                    } else {
                        usize::from(!e.file_name().to_string_lossy().starts_with('.'))
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

/// Two repositories, one prefetch directory: the objects prefetched for
/// one are never served for the other.
#[test]
fn a_prefetched_object_of_another_repository_is_not_served() {
    let shared = TestDir::new("fetch-shared");
    let prefetch = shared.subdir("prefetch");
    let mut archived = Vec::new();
    for name in ["fetch-a", "fetch-b"] {
        let dir = TestDir::new(name);
        let mut settings = Settings::new(dir.path(), "host=/nonexistent");
        settings.prefetch_dir = prefetch.clone();
        settings.prefetch = 3;
        let config = settings.write(&dir.join("walsafe.toml"));
        let pg = PgCluster::start(
            &PgOptions {
                name: name.into(),
                ..Default::default()
            }
            .conf("archive_mode = on")
            .conf(format!(
                "archive_command = '{} --config {} wal-push %p'",
                bin_copy(dir.path()).display(),
                config.display()
            )),
        );
        let mut last = String::new();
        for _ in 0..4 {
            write_wal(&pg, 1);
            last = pg.psql("SELECT pg_walfile_name(pg_switch_wal())");
        }
        pg.wait_for(
            &format!("SELECT last_archived_wal >= '{last}' FROM pg_stat_archiver"),
            "t",
            Duration::from_secs(60),
        );
        archived.push((dir, config, pg));
    }
    let (a_dir, a_config, _a_pg) = &archived[0];
    let (b_dir, b_config, b_pg) = &archived[1];
    let first = segment_name(1, 1);
    let second = segment_name(1, 2);

    // Recovery of A fetches segment 1; the prefetcher downloads A's 2, 3, 4.
    let dest = a_dir.join("out");
    let f = walsafe(a_config, &["wal-fetch", &first, dest.to_str().unwrap()]);
    assert_eq!(f.status.code(), Some(0), "{}", text(&f));
    assert!(
        wait_until(Duration::from_secs(30), || { files_in(&prefetch) >= 3 }),
        "nothing was prefetched"
    );
    std::thread::sleep(Duration::from_millis(500));

    // B asks for its segment 2: it gets B's, byte for byte.
    let dest = b_dir.join("out");
    let f = walsafe(b_config, &["wal-fetch", &second, dest.to_str().unwrap()]);
    assert_eq!(f.status.code(), Some(0), "{}", text(&f));
    let served = std::fs::read(&dest).unwrap();
    let own = std::fs::read(b_pg.wal_file(&second))
        .or_else(|_| {
            // Recycled already: compare with B's archive, fetched without prefetch.
            let mut s = Settings::new(b_dir.path(), "host=/nonexistent");
            s.prefetch = 0;
            s.prefetch_dir = b_dir.join("no-prefetch");
            let c = s.write(&b_dir.join("plain.toml"));
            let d = b_dir.join("plain-out");
            let f = walsafe(&c, &["wal-fetch", &second, d.to_str().unwrap()]);
            assert_eq!(f.status.code(), Some(0), "{}", text(&f));
            std::fs::read(&d)
        })
        .unwrap();
    assert!(served == own, "B was served another repository's {second}");
}

/// A backup history file, as PostgreSQL writes it beside the WAL.
const BACKUP_HISTORY: &str = "000000010000000000000001.00000028.backup";
const BACKUP_HISTORY_TEXT: &str = "START WAL LOCATION: 0/1000028 (file 000000010000000000000001)\nSTOP WAL LOCATION: 0/1000100 (file 000000010000000000000001)\n";

/// `wal-fetch` run in `data_dir` (as PostgreSQL runs `restore_command`),
/// with `WALSAFE_CONFIG` set to `config`.
fn fetch_in(data_dir: &Path, bin_dir: &Path, config: &Path, args: &[&str]) -> std::process::Output {
    Command::new(bin_copy(bin_dir))
        .args(args)
        .current_dir(data_dir)
        .env("WALSAFE_CONFIG", config)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// The exit code of every kind of failure in each recovery mode: a
/// standby (`standby.signal`, here beside `recovery.signal` as PostgreSQL
/// allows) is told "not in the archive" (1) whenever wal-fetch could not
/// look, loudly; only an object that must never be replayed stops it
/// (126). Archive recovery and a manual call keep 126 for every failure.
#[test]
fn a_standby_gets_exit_1_when_wal_fetch_cannot_look_and_126_for_an_untrustworthy_object() {
    const SIZE: u64 = 16 << 20;
    let dir = TestDir::new("fetch-modes");
    let repo_dir = dir.subdir("repo");
    let ident = walsafe::pg::cluster::ClusterIdentity::new(7_000_000_000_000_000_001, 150004, SIZE);
    let stranger =
        walsafe::pg::cluster::ClusterIdentity::new(7_000_000_000_000_000_002, 150004, SIZE);
    let seg = |n: u64| segment_name(1, n);
    let wal = |id: &walsafe::pg::cluster::ClusterIdentity, n: u64| {
        walsafe::pg::page::synthetic_wal(id, TimelineId(1), Lsn(n * SIZE), SIZE)
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let url = format!("file://{}", repo_dir.display());
        let store = Store::open(&url, &BTreeMap::new(), 1).unwrap();
        let r = Repository::from_parts(store, None, Compression::Zstd, 1);
        r.pin(&ident).await.unwrap();
        r.put_wal(&seg(1), wal(&ident, 1).into()).await.unwrap();
        // Another cluster's WAL under this repository's name.
        r.put_wal(&seg(2), wal(&stranger, 2).into()).await.unwrap();
        // A damaged object.
        r.put_wal(&seg(3), wal(&ident, 3).into()).await.unwrap();
        // A closed partial and a backup history file.
        let file = walsafe::repository::SegmentFile::parse(&seg(5)).unwrap();
        r.put(
            &walsafe::repository::ObjectName::ClosedPartial(file),
            wal(&ident, 5).into(),
        )
        .await
        .unwrap();
        r.put_wal(
            BACKUP_HISTORY,
            BACKUP_HISTORY_TEXT.as_bytes().to_vec().into(),
        )
        .await
        .unwrap();
    });
    let damaged = repo_dir.join("wal").join(seg(3));
    let mut bytes = std::fs::read(&damaged).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xFF;
    std::fs::write(&damaged, bytes).unwrap();

    let mut settings = Settings::new(dir.path(), "host=/nonexistent");
    settings.repo_url = format!("file://{}", repo_dir.display());
    settings.prefetch = 0;
    let good = settings.write(&dir.join("walsafe.toml"));
    settings.repo_url = format!("file://{}", dir.subdir("empty").display());
    let no_repo = settings.write(&dir.join("no-repo.toml"));
    let no_config = dir.join("absent.toml");

    let standby = dir.subdir("standby");
    std::fs::write(standby.join("standby.signal"), "").unwrap();
    std::fs::write(standby.join("recovery.signal"), "").unwrap();
    let archive = dir.subdir("archive");
    std::fs::write(archive.join("recovery.signal"), "").unwrap();
    let manual = dir.subdir("manual");

    let dest = dir.join("out");
    let dest = dest.to_str().unwrap();
    let (s1, s2, s3, s9) = (seg(1), seg(2), seg(3), seg(9));
    let (p5, p6) = (format!("{}.partial", seg(5)), format!("{}.partial", seg(6)));
    let absent_history = "000000010000000000000009.00000028.backup";
    // (what, config, args, standby's exit, others' exit)
    let cases: Vec<(&str, &Path, Vec<&str>, i32, i32)> = vec![
        ("restored", &good, vec!["wal-fetch", &s1, dest], 0, 0),
        ("restored", &good, vec!["wal-fetch", &p5, dest], 0, 0),
        (
            "restored",
            &good,
            vec!["wal-fetch", BACKUP_HISTORY, dest],
            0,
            0,
        ),
        ("proven absent", &good, vec!["wal-fetch", &s9, dest], 1, 1),
        ("proven absent", &good, vec!["wal-fetch", &p6, dest], 1, 1),
        (
            "proven absent",
            &good,
            vec!["wal-fetch", absent_history, dest],
            1,
            1,
        ),
        (
            "arguments swapped (%p %f)",
            &good,
            vec!["wal-fetch", "pg_wal/RECOVERYXLOG", &s1],
            1,
            126,
        ),
        (
            "no configuration file",
            &no_config,
            vec!["wal-fetch", &s1, dest],
            1,
            126,
        ),
        (
            "no repository",
            &no_repo,
            vec!["wal-fetch", &s1, dest],
            1,
            126,
        ),
        ("invalid arguments", &good, vec!["wal-fetch", &s1], 1, 126),
        (
            "another cluster's WAL",
            &good,
            vec!["wal-fetch", &s2, dest],
            126,
            126,
        ),
        (
            "a damaged object",
            &good,
            vec!["wal-fetch", &s3, dest],
            126,
            126,
        ),
    ];
    for (what, config, args, in_standby, elsewhere) in cases {
        for (mode, data_dir, expected) in [
            ("standby", &standby, in_standby),
            ("archive recovery", &archive, elsewhere),
            ("no recovery", &manual, elsewhere),
        ] {
            let _ = std::fs::remove_file(dest);
            let out = fetch_in(data_dir, dir.path(), config, &args);
            let all = text(&out);
            assert_eq!(out.status.code(), Some(expected), "{what}, {mode}: {all}");
            let err = String::from_utf8_lossy(&out.stderr);
            match expected {
                126 => assert!(
                    err.contains("walsafe wal-fetch: FATAL"),
                    "{what}, {mode}: {all}"
                ),
                1 if what != "proven absent" => assert!(
                    err.contains("walsafe wal-fetch: ERROR") && err.contains("standby.signal"),
                    "{what}, {mode}: the standby must be told why, loudly: {all}"
                ),
                _ => {}
            }
            assert_eq!(
                std::path::Path::new(dest).exists(),
                expected == 0,
                "{what}, {mode}: only a restored file is written"
            );
            if what.starts_with("arguments swapped") && expected == 126 {
                assert!(
                    err.contains("%f %p"),
                    "{what}, {mode}: say what the arguments should be: {all}"
                );
            }
            if expected == 0 {
                let want = match args[1] {
                    n if n == BACKUP_HISTORY => BACKUP_HISTORY_TEXT.as_bytes().to_vec(),
                    n if n == p5 => wal(&ident, 5),
                    _ => wal(&ident, 1),
                };
                assert!(
                    std::fs::read(dest).unwrap() == want,
                    "{what}, {mode}: {} differs",
                    args[1]
                );
            }
        }
    }
}

/// Several repositories: `wal-fetch` asks them in order and falls back on
/// absence or error. A file missing from the first (file://) comes from
/// the second (S3); a damaged copy in the first is passed over for the
/// second's good one; exit 1 only when every repository proved the file
/// absent; with the first unreachable and the second lacking the file,
/// 126, never 1; a second repository of another cluster is refused.
#[test]
fn wal_fetch_falls_back_through_the_repositories_in_order() {
    const SIZE: u64 = 16 << 20;
    let dir = TestDir::new("fetch-several");
    let s3 = common::s3::S3Server::start();
    let ident = walsafe::pg::cluster::ClusterIdentity::new(7_000_000_000_000_000_011, 150004, SIZE);
    let stranger =
        walsafe::pg::cluster::ClusterIdentity::new(7_000_000_000_000_000_012, 150004, SIZE);
    let seg = |n: u64| segment_name(1, n);
    let wal = |id: &walsafe::pg::cluster::ClusterIdentity, n: u64| {
        walsafe::pg::page::synthetic_wal(id, TimelineId(1), Lsn(n * SIZE), SIZE)
    };
    let first_dir = dir.subdir("first");
    let first_url = format!("file://{}", first_dir.display());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let fill = |url: &str, options: &BTreeMap<String, String>, id, segs: &[u64]| {
        rt.block_on(async {
            let store = Store::open(url, options, 1).unwrap();
            let r = Repository::from_parts(store, None, Compression::Zstd, 1);
            r.pin(id).await.unwrap();
            for &n in segs {
                r.put_wal(&seg(n), wal(id, n).into()).await.unwrap();
            }
        })
    };
    fill(&first_url, &BTreeMap::new(), &ident, &[1, 2]);
    fill(&s3.url("second"), &s3.repo_options(), &ident, &[1, 2, 3]);
    fill(&s3.url("stranger"), &s3.repo_options(), &stranger, &[3]);
    // The segments being filled when the archive ends: the first
    // repository fell behind and holds 1 MiB of chunks of each; the second
    // holds segment 4 whole and 2 MiB of chunks of segment 5.
    let chunk = |url: &str, options: &BTreeMap<String, String>, n: u64, len: usize| {
        rt.block_on(async {
            let store = Store::open(url, options, 1).unwrap();
            let r = Repository::from_parts(store, None, Compression::Zstd, 1);
            let file = walsafe::repository::SegmentFile::parse(&seg(n)).unwrap();
            let data = wal(&ident, n);
            r.put_chunk(&file, 0, data[..len].to_vec().into())
                .await
                .unwrap();
        })
    };
    chunk(&first_url, &BTreeMap::new(), 4, 1 << 20);
    chunk(&first_url, &BTreeMap::new(), 5, 1 << 20);
    fill(&s3.url("second"), &s3.repo_options(), &ident, &[4]);
    chunk(&s3.url("second"), &s3.repo_options(), 5, 2 << 20);
    // The first repository's copy of segment 2 is damaged.
    let damaged = first_dir.join("wal").join(seg(2));
    let mut bytes = std::fs::read(&damaged).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xFF;
    std::fs::write(&damaged, bytes).unwrap();

    let config = |name: &str, first: &str, second: &str| {
        let mut s = Settings::new(dir.path(), "host=/nonexistent");
        s.repo_url = first.to_string();
        s.retries = 1;
        s.prefetch = 0;
        s.more_repositories = vec![common::walsafe::MoreRepository {
            name: "offsite".into(),
            url: s3.url(second),
            options: s3.repo_options().into_iter().collect(),
            retries: 1,
            key_file: None,
        }];
        s.write(&dir.join(name))
    };
    let both = config("both.toml", &first_url, "second");
    let stranger_second = config("stranger.toml", &first_url, "stranger");
    // The first repository "could not be asked": S3 on a port where
    // nothing listens.
    let down_port = common::pg::free_port();
    let mut s = Settings::new(dir.path(), "host=/nonexistent");
    s.retries = 1;
    s.prefetch = 0;
    s.repo_url = s3.url("nowhere");
    s.repo_options = s3
        .repo_options_at(&format!("http://127.0.0.1:{down_port}"))
        .into_iter()
        .collect();
    s.more_repositories = vec![common::walsafe::MoreRepository {
        name: "offsite".into(),
        url: s3.url("second"),
        options: s3.repo_options().into_iter().collect(),
        retries: 1,
        key_file: None,
    }];
    s.prefetch_dir = dir.join("prefetch-down");
    let first_down = s.write(&dir.join("first-down.toml"));

    let archive = dir.subdir("archive");
    std::fs::write(archive.join("recovery.signal"), "").unwrap();
    let standby = dir.subdir("standby");
    std::fs::write(standby.join("standby.signal"), "").unwrap();
    let dest = dir.join("out");
    let fetch = |config: &Path, data_dir: &Path, n: u64| {
        let _ = std::fs::remove_file(&dest);
        let out = fetch_in(
            data_dir,
            dir.path(),
            config,
            &["wal-fetch", &seg(n), dest.to_str().unwrap()],
        );
        (out.status.code(), text(&out))
    };
    let restored = |n: u64| std::fs::read(&dest).unwrap() == wal(&ident, n);

    let (code, all) = fetch(&both, &archive, 1);
    assert!(code == Some(0) && restored(1), "{all}");
    assert!(!all.contains("WARNING"), "the first had it: {all}");
    let (code, all) = fetch(&both, &archive, 3);
    assert!(
        code == Some(0) && restored(3),
        "missing from the first: {all}"
    );
    let (code, all) = fetch(&both, &archive, 2);
    assert!(
        code == Some(0) && restored(2),
        "damaged in the first: {all}"
    );
    assert!(all.contains("WARNING") && all.contains(&seg(2)), "{all}");
    let (code, all) = fetch(&both, &archive, 9);
    assert_eq!(code, Some(1), "absent from both: {all}");
    // Never the chunks of a repository that fell behind, when another
    // holds more: recovery would end early.
    let (code, all) = fetch(&both, &archive, 4);
    assert!(code == Some(0) && restored(4), "the whole segment: {all}");
    let (code, all) = fetch(&both, &archive, 5);
    assert_eq!(code, Some(0), "{all}");
    let got = std::fs::read(&dest).unwrap();
    let whole = wal(&ident, 5);
    assert!(
        got[..2 << 20] == whole[..2 << 20] && got[2 << 20..].iter().all(|b| *b == 0),
        "the longest chunks (2 MiB), zero-padded"
    );

    let (code, all) = fetch(&first_down, &archive, 3);
    assert!(code == Some(0) && restored(3), "first down: {all}");
    assert!(
        all.contains("WARNING"),
        "say the first could not be asked: {all}"
    );
    // Found down a moment ago, the first is asked after the others.
    let (code, all) = fetch(&first_down, &archive, 3);
    assert!(code == Some(0) && restored(3), "{all}");
    assert!(!all.contains("WARNING"), "the second first now: {all}");
    let (code, all) = fetch(&first_down, &archive, 9);
    assert_eq!(
        code,
        Some(126),
        "the first could not say it lacks it: {all}"
    );
    assert!(all.contains("FATAL"), "{all}");
    let (code, all) = fetch(&first_down, &standby, 9);
    assert_eq!(code, Some(1), "a standby goes on streaming: {all}");
    assert!(all.contains("ERROR"), "{all}");

    let (code, all) = fetch(&stranger_second, &archive, 3);
    assert_eq!(code, Some(126), "another cluster's archive: {all}");
    assert!(all.contains("same cluster"), "{all}");
    assert!(!dest.exists());
}
