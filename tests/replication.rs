//! The replication client against real PostgreSQL clusters: authentication
//! methods and their failures, replication commands, streaming bytes equal
//! to pg_wal on disk, keepalive replies, slots, and the end-of-timeline
//! sequence after promoting a standby.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::pg::{PgCluster, PgOptions};
use walsafe::pg::error::PgError;
use walsafe::pg::replication::{AuthMethod, ReplMessage, ReplicationConnection, ReplicationStream};
use walsafe::pg::sql;
use walsafe::pg::{Lsn, SegmentName, TimelineId};

const APP: &str = "walsafe-test";
const MB: u64 = 1 << 20;

async fn connect(conninfo: &str) -> ReplicationConnection {
    ReplicationConnection::connect(conninfo, APP)
        .await
        .unwrap_or_else(|e| panic!("connect {conninfo}: {e}"))
}

async fn connect_err(conninfo: &str) -> PgError {
    ReplicationConnection::connect(conninfo, APP)
        .await
        .expect_err("connection should have failed")
}

/// Next message within `secs` seconds.
async fn next(stream: &mut ReplicationStream, secs: u64) -> ReplMessage {
    tokio::time::timeout(Duration::from_secs(secs), stream.next_message())
        .await
        .expect("no message from the server in time")
        .expect("stream error")
}

/// Receives XLogData from `from` up to at least `until`, checking contiguity;
/// returns the bytes.
async fn receive_range(stream: &mut ReplicationStream, from: Lsn, until: Lsn) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut pos = from;
    while pos < until {
        match next(stream, 30).await {
            ReplMessage::XLogData { start, data, .. } => {
                assert_eq!(start, pos, "XLogData must be contiguous");
                pos = pos.plus(data.len() as u64);
                buf.extend_from_slice(&data);
            }
            ReplMessage::Keepalive { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    buf
}

/// Like [`receive_range`], but cancels `next_message` over and over with
/// tiny timeouts (as a `select!` in the receive loop would) while WAL is
/// being generated: nothing may be lost or duplicated. The end is known
/// when `until` delivers it.
async fn receive_range_cancelling(
    stream: &mut ReplicationStream,
    from: Lsn,
    mut until: tokio::sync::oneshot::Receiver<Lsn>,
) -> (Vec<u8>, u32, Lsn) {
    let mut buf = Vec::new();
    let mut pos = from;
    let mut cancelled = 0;
    let mut end = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while end.is_none_or(|e| pos < e) {
        assert!(tokio::time::Instant::now() < deadline, "timed out at {pos}");
        if end.is_none() {
            end = until.try_recv().ok();
        }
        match tokio::time::timeout(Duration::from_micros(200), stream.next_message()).await {
            Err(_) => cancelled += 1,
            Ok(Ok(ReplMessage::XLogData { start, data, .. })) => {
                assert_eq!(
                    start, pos,
                    "XLogData must be contiguous across cancellations"
                );
                pos = pos.plus(data.len() as u64);
                buf.extend_from_slice(&data);
            }
            Ok(Ok(ReplMessage::Keepalive { .. })) => {}
            Ok(other) => panic!("unexpected {other:?}"),
        }
    }
    (buf, cancelled, end.unwrap())
}

fn segment_bytes(cluster: &PgCluster, tli: TimelineId, lsn: Lsn) -> Vec<u8> {
    let seg = cluster.segment_size();
    let name = SegmentName::containing(tli, lsn, seg).file_name(seg);
    std::fs::read(cluster.wal_file(&name)).unwrap_or_else(|e| panic!("read {name}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_over_unix_socket_identify_system_and_settings() {
    let pg = PgCluster::start(&PgOptions::default().segsize_mb(1));
    let mut conn = connect(&pg.conninfo()).await;
    assert!(
        conn.server_version_num() >= 150000,
        "{}",
        conn.server_version_num()
    );
    assert_eq!(conn.auth_method(), AuthMethod::Trust);
    let id = conn.identify_system().await.unwrap();
    assert_eq!(id.identity.system_identifier, pg.system_identifier());
    assert_eq!(id.timeline, TimelineId(1));
    assert!(id.xlogpos > Lsn(0));
    assert_eq!(id.identity.segment_size, MB);
    assert_eq!(conn.show("wal_segment_size").await.unwrap(), "1MB");
    assert_eq!(conn.segment_size().await.unwrap(), MB);
    let e = conn.show("no_such_setting").await.unwrap_err();
    assert!(e.to_string().contains("no_such_setting"), "{e}");
    assert_eq!(e.sqlstate(), Some("42704"));
    // The connection is still usable after an error.
    assert_eq!(
        conn.identify_system()
            .await
            .unwrap()
            .identity
            .system_identifier,
        id.identity.system_identifier
    );

    // The walsender is visible with our application_name.
    let pid = conn.backend_pid().unwrap();
    assert_eq!(
        pg.psql(&format!(
            "SELECT application_name FROM pg_stat_activity WHERE pid = {pid}"
        )),
        APP
    );

    // Several hosts: the first one that answers wins.
    let multi = format!(
        "host=/nonexistent/dir,{} port={} user=postgres",
        pg.socket_dir().display(),
        pg.port()
    );
    let mut c2 = connect(&multi).await;
    assert_eq!(
        c2.identify_system()
            .await
            .unwrap()
            .identity
            .system_identifier,
        id.identity.system_identifier
    );

    // Nothing listening: a retryable connect error naming the socket.
    let e = connect_err("host=/nonexistent/dir port=5999 user=postgres").await;
    assert!(matches!(e, PgError::Connect { .. }), "{e:?}");
    assert!(e.is_retryable());
    assert!(
        e.to_string().contains("/nonexistent/dir/.s.PGSQL.5999"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_methods_over_tcp_and_failures() {
    let opts = PgOptions::default()
        .hba("host all scram_user 127.0.0.1/32 scram-sha-256")
        .hba("host replication scram_user 127.0.0.1/32 scram-sha-256")
        .hba("host replication md5_user 127.0.0.1/32 md5")
        .hba("host replication clear_user 127.0.0.1/32 password")
        .hba("host replication norepl_user 127.0.0.1/32 trust");
    let pg = PgCluster::start(&opts);
    pg.psql("CREATE ROLE scram_user LOGIN REPLICATION PASSWORD 'scr4m-s3cret'");
    pg.psql("SET password_encryption = 'md5'; CREATE ROLE md5_user LOGIN REPLICATION PASSWORD 'md5-s3cret'");
    assert!(pg
        .psql("SELECT rolpassword FROM pg_authid WHERE rolname = 'md5_user'")
        .starts_with("md5"));
    pg.psql("CREATE ROLE clear_user LOGIN REPLICATION PASSWORD 'cl34r-s3cret'");
    pg.psql("CREATE ROLE norepl_user LOGIN");

    let mut c = connect(&pg.tcp_conninfo("scram_user", Some("scr4m-s3cret"))).await;
    assert_eq!(c.auth_method(), AuthMethod::ScramSha256);
    assert_eq!(
        c.identify_system()
            .await
            .unwrap()
            .identity
            .system_identifier,
        pg.system_identifier()
    );

    let mut c = connect(&pg.tcp_conninfo("md5_user", Some("md5-s3cret"))).await;
    assert_eq!(c.auth_method(), AuthMethod::Md5);
    c.identify_system().await.unwrap();

    let mut c = connect(&pg.tcp_conninfo("clear_user", Some("cl34r-s3cret"))).await;
    assert_eq!(c.auth_method(), AuthMethod::Cleartext);
    c.identify_system().await.unwrap();

    for (user, wrong) in [
        ("scram_user", "wr0ng-scram-guess"),
        ("md5_user", "wr0ng-md5-guess"),
        ("clear_user", "wr0ng-clear-guess"),
    ] {
        let e = connect_err(&pg.tcp_conninfo(user, Some(wrong))).await;
        let text = e.to_string();
        assert!(matches!(e, PgError::AuthFailed { .. }), "{e:?}");
        assert_eq!(e.sqlstate(), Some("28P01"));
        assert!(!e.is_retryable());
        assert!(
            text.starts_with(&format!(
                "password authentication failed for user \"{user}\""
            )),
            "{text}"
        );
        assert!(
            text.contains("check [postgres] conninfo / PGPASSWORD / the password file"),
            "{text}"
        );
        let debug = format!("{e:?}");
        assert!(
            !text.contains(wrong) && !debug.contains(wrong),
            "secret leaked: {text} {debug}"
        );
    }

    let e = connect_err(&pg.tcp_conninfo("norepl_user", None)).await;
    assert!(matches!(e, PgError::NotReplicationRole { .. }), "{e:?}");
    assert!(
        e.to_string()
            .starts_with("role \"norepl_user\" lacks the REPLICATION attribute; run ALTER ROLE norepl_user REPLICATION"),
        "{e}"
    );
    assert_eq!(e.sqlstate(), Some("42501"));
    assert!(!e.is_retryable());

    let e = connect_err(&pg.tcp_conninfo("nobody_user", None)).await;
    assert!(matches!(e, PgError::RoleRejected { .. }), "{e:?}");
    assert_eq!(e.sqlstate(), Some("28000"));

    // The SQL connection shares the resolution, and falls back to database
    // "postgres" when the user's own database does not exist.
    let client = sql::connect_sql(&pg.tcp_conninfo("scram_user", Some("scr4m-s3cret")), APP)
        .await
        .unwrap();
    let row = client
        .query_one("SELECT current_database()", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "postgres");
    let e = sql::connect_sql(&pg.tcp_conninfo("scram_user", Some("nope-nope")), APP)
        .await
        .unwrap_err();
    assert!(matches!(e, PgError::AuthFailed { .. }), "{e:?}");
    assert!(!e.to_string().contains("nope-nope"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_pg_hba_entry_and_wal_senders_exhausted() {
    let mut opts = PgOptions::default().conf("max_wal_senders = 1");
    opts.default_replication_hba = false;
    let pg = PgCluster::start(&opts);
    let e = connect_err(&pg.tcp_conninfo("postgres", None)).await;
    assert!(matches!(e, PgError::HbaRejected { .. }), "{e:?}");
    assert_eq!(e.sqlstate(), Some("28000"));
    let text = e.to_string();
    assert!(
        text.contains("pg_hba.conf has no replication entry for user \"postgres\""),
        "{text}"
    );
    assert!(text.contains("host replication postgres"), "{text}");
    assert!(!e.is_retryable());

    // Allow replication over the socket only, then use up max_wal_senders = 1.
    std::fs::write(
        pg.datadir().join("pg_hba.conf"),
        "local all all trust\nlocal replication all trust\n",
    )
    .unwrap();
    common::pg::chown_postgres(&pg.datadir().join("pg_hba.conf"));
    pg.reload();
    // The reload has taken effect once the socket admits replication.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let _first = loop {
        match ReplicationConnection::connect(&pg.conninfo(), APP).await {
            Ok(c) => break c,
            Err(e) if std::time::Instant::now() < deadline => {
                assert!(matches!(e, PgError::HbaRejected { .. }), "{e:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("pg_hba.conf was not reloaded: {e}"),
        }
    };
    let e = connect_err(&pg.conninfo()).await;
    assert!(matches!(e, PgError::WalSendersExhausted { .. }), "{e:?}");
    assert_eq!(e.sqlstate(), Some("53300"));
    assert!(e.is_retryable());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_file_and_environment() {
    let opts = PgOptions::default().hba("host replication pf_user 127.0.0.1/32 scram-sha-256");
    let pg = PgCluster::start(&opts);
    pg.psql("CREATE ROLE pf_user LOGIN REPLICATION PASSWORD 'from-the-file'");
    let dir = tempfile::tempdir().unwrap();
    let passfile = dir.path().join("pgpass");
    std::fs::write(
        &passfile,
        format!(
            "# walsafe test\n127.0.0.1:{}:postgres:pf_user:wrong-db\n127.0.0.1:{}:replication:pf_user:from-the-file\n",
            pg.port(),
            pg.port()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&passfile, std::fs::Permissions::from_mode(0o600)).unwrap();
    // Each nextest test is its own process, so the environment is ours.
    std::env::remove_var("PGPASSWORD");
    std::env::set_var("PGPASSFILE", &passfile);

    let conninfo = pg.tcp_conninfo("pf_user", None);
    let mut c = connect(&conninfo).await;
    assert_eq!(c.auth_method(), AuthMethod::ScramSha256);
    c.identify_system().await.unwrap();

    // passfile= in the conninfo wins over PGPASSFILE.
    let other = dir.path().join("other");
    std::fs::write(&other, "*:*:*:*:nothing-matches\n").unwrap();
    std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o600)).unwrap();
    let e = connect_err(&format!("{conninfo} passfile={}", other.display())).await;
    assert!(matches!(e, PgError::AuthFailed { .. }), "{e:?}");

    // A group-readable file is ignored, like libpq does.
    std::fs::set_permissions(&passfile, std::fs::Permissions::from_mode(0o640)).unwrap();
    let e = connect_err(&conninfo).await;
    assert!(matches!(e, PgError::PasswordMissing { .. }), "{e:?}");
    assert!(
        e.to_string()
            .contains("asks for a password for user \"pf_user\""),
        "{e}"
    );

    // PGPASSWORD fills the gap.
    std::env::set_var("PGPASSWORD", "from-the-file");
    connect(&conninfo).await;
    // PGHOST/PGPORT/PGUSER fill a conninfo that names nothing.
    std::env::set_var("PGHOST", pg.socket_dir());
    std::env::set_var("PGPORT", pg.port().to_string());
    std::env::set_var("PGUSER", "postgres");
    let mut c = connect("").await;
    assert_eq!(
        c.identify_system()
            .await
            .unwrap()
            .identity
            .system_identifier,
        pg.system_identifier()
    );
    // Like libpq, sslmode is ignored over a Unix socket: no TLS, no error.
    let c = connect("sslmode=require").await;
    assert!(!c.is_encrypted());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_create_exists_read_and_active_elsewhere() {
    let pg = PgCluster::start(&PgOptions::default().segsize_mb(1));
    let mut conn = connect(&pg.conninfo()).await;
    let lsn = conn.create_physical_slot("walsafe_t").await.unwrap();
    assert!(lsn > Lsn(0), "{lsn}");
    let e = conn.create_physical_slot("walsafe_t").await.unwrap_err();
    assert!(
        matches!(e, PgError::SlotExists { ref slot, .. } if slot == "walsafe_t"),
        "{e:?}"
    );
    assert_eq!(e.sqlstate(), Some("42710"));
    let pos = conn
        .read_replication_slot("walsafe_t")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(pos.restart_lsn, Some(lsn));
    assert_eq!(pos.restart_tli, Some(TimelineId(1)));
    assert_eq!(
        conn.read_replication_slot("no_such_slot").await.unwrap(),
        None
    );
    assert!(matches!(
        conn.create_physical_slot("Bad-Name").await,
        Err(PgError::InvalidSlotName(_))
    ));

    let client = sql::connect_sql(&pg.conninfo(), APP).await.unwrap();
    let state = sql::slot_state(&client, "walsafe_t")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state.active_pid, None);
    assert_eq!(state.restart_lsn, Some(lsn));
    assert_eq!(state.wal_status.as_deref(), Some("reserved"));
    assert_eq!(
        sql::slot_state(&client, "no_such_slot").await.unwrap(),
        None
    );

    // A missing slot at START_REPLICATION.
    let e = connect(&pg.conninfo())
        .await
        .start_replication(Some("no_such_slot"), lsn.segment_start(MB), TimelineId(1))
        .await
        .unwrap_err();
    assert!(
        matches!(e, PgError::SlotMissing { ref slot, .. } if slot == "no_such_slot"),
        "{e:?}"
    );
    assert_eq!(e.sqlstate(), Some("42704"));

    // Streaming from the slot in one connection; a second one is refused
    // with the first one's PID.
    let first = connect(&pg.conninfo()).await;
    let first_pid = first.backend_pid().unwrap();
    let mut stream = first
        .start_replication(Some("walsafe_t"), lsn.segment_start(MB), TimelineId(1))
        .await
        .unwrap();
    next(&mut stream, 10).await;
    let e = connect(&pg.conninfo())
        .await
        .start_replication(Some("walsafe_t"), lsn.segment_start(MB), TimelineId(1))
        .await
        .unwrap_err();
    assert!(
        matches!(e, PgError::SlotActive { pid: Some(p), .. } if p == first_pid),
        "{e:?}"
    );
    assert!(
        e.to_string().starts_with(&format!(
            "replication slot \"walsafe_t\" is active for PID {first_pid}; is another walsafe running against this cluster?"
        )),
        "{e}"
    );
    assert_eq!(e.sqlstate(), Some("55006"));
    assert!(!e.is_retryable());
    let state = sql::slot_state(&client, "walsafe_t")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state.active_pid, Some(first_pid as i32));

    // A clean stop releases the slot.
    tokio::time::timeout(Duration::from_secs(10), stream.stop())
        .await
        .expect("stop took too long")
        .unwrap();
    for _ in 0..50 {
        if sql::slot_state(&client, "walsafe_t")
            .await
            .unwrap()
            .unwrap()
            .active_pid
            .is_none()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("slot still active after stop()");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_bytes_equal_pg_wal_on_disk() {
    let pg = PgCluster::start(&PgOptions::default().segsize_mb(1));
    let mut conn = connect(&pg.conninfo()).await;
    let seg = conn.segment_size().await.unwrap();
    let id = conn.identify_system().await.unwrap();
    let start = id.xlogpos.segment_start(seg);
    let mut stream = conn
        .start_replication(None, start, id.timeline)
        .await
        .unwrap();

    let client = sql::connect_sql(&pg.conninfo(), APP).await.unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let generator = tokio::spawn(async move {
        client
            .batch_execute("CREATE TABLE t (i int, s text)")
            .await
            .unwrap();
        for _ in 0..20 {
            client
                .batch_execute(
                    "INSERT INTO t SELECT g, repeat('x', 100) FROM generate_series(1, 200) g",
                )
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let switched = sql::switch_wal(&client).await.unwrap();
        assert!(sql::current_wal_lsn(&client).await.unwrap() >= switched);
        // The whole segment holding the switch record (and any before it).
        let end = switched
            .segment_start(seg)
            .plus(if switched.segment_offset(seg) == 0 {
                0
            } else {
                seg
            });
        tx.send(end).unwrap();
    });
    let (received, cancelled, end) = receive_range_cancelling(&mut stream, start, rx).await;
    generator.await.unwrap();
    assert!(end > id.xlogpos);
    assert!(received.len() as u64 >= end.0 - start.0);
    assert!(cancelled > 0, "the test did not cancel any read");

    let mut pos = start;
    while pos < end {
        let disk = segment_bytes(&pg, id.timeline, pos);
        assert_eq!(disk.len() as u64, seg);
        let off = (pos.0 - start.0) as usize;
        assert!(
            received[off..off + seg as usize] == disk[..],
            "segment at {pos} differs from pg_wal"
        );
        pos = pos.plus(seg);
    }
    stream.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_reply_requested_and_status_updates_advance_the_slot() {
    let pg = PgCluster::start(
        &PgOptions::default()
            .segsize_mb(1)
            .conf("wal_sender_timeout = '2s'"),
    );
    let mut conn = connect(&pg.conninfo()).await;
    let slot_lsn = conn.create_physical_slot("walsafe_k").await.unwrap();
    let id = conn.identify_system().await.unwrap();
    let start = slot_lsn.segment_start(MB);
    let mut stream = conn
        .start_replication(Some("walsafe_k"), start, id.timeline)
        .await
        .unwrap();
    pg.psql("CREATE TABLE k (i int); INSERT INTO k SELECT generate_series(1, 100)");
    let target = pg
        .psql("SELECT pg_current_wal_flush_lsn()")
        .parse::<Lsn>()
        .unwrap();

    let mut received = start;
    let mut replied = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while replied < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no reply-requested keepalive"
        );
        match next(&mut stream, 10).await {
            ReplMessage::XLogData { start, data, .. } => {
                assert_eq!(start, received);
                received = received.plus(data.len() as u64);
            }
            ReplMessage::Keepalive {
                reply_requested: true,
                ..
            } => {
                stream
                    .send_status(received, received, received, false)
                    .await
                    .unwrap();
                replied += 1;
            }
            ReplMessage::Keepalive { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(received >= target);
    // Two reply-requested keepalives answered: the server (wal_sender_timeout
    // 2s) kept us. The reported flush position is what the server shows and
    // what the slot holds from.
    pg.wait_for(
        "SELECT flush_lsn FROM pg_stat_replication WHERE application_name = 'walsafe-test'",
        &received.to_string(),
        Duration::from_secs(10),
    );
    pg.wait_for(
        "SELECT restart_lsn FROM pg_replication_slots WHERE slot_name = 'walsafe_k'",
        &received.to_string(),
        Duration::from_secs(10),
    );
    stream.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_of_timeline_after_promotion_then_history_and_next_timeline() {
    let primary = PgCluster::start(&PgOptions::default().segsize_mb(1));
    primary.psql("CREATE TABLE t (i int); INSERT INTO t VALUES (1)");
    let standby = primary.create_standby();

    let mut conn = connect(&standby.conninfo()).await;
    let id = conn.identify_system().await.unwrap();
    assert_eq!(id.timeline, TimelineId(1));
    let start = id.xlogpos.segment_start(MB);
    let mut stream = conn
        .start_replication(None, start, TimelineId(1))
        .await
        .unwrap();
    let mut received = start;
    // Catch up with what the standby has.
    while received < id.xlogpos {
        if let ReplMessage::XLogData { start: s, data, .. } = next(&mut stream, 30).await {
            assert_eq!(s, received);
            received = received.plus(data.len() as u64);
        }
    }

    standby.promote();
    let (next_timeline, switch_point) = loop {
        match next(&mut stream, 30).await {
            ReplMessage::XLogData { start: s, data, .. } => {
                assert_eq!(s, received);
                received = received.plus(data.len() as u64);
            }
            ReplMessage::Keepalive { .. } => {}
            ReplMessage::EndOfTimeline {
                next_timeline,
                switch_point,
            } => break (next_timeline, switch_point),
            ReplMessage::EndOfStream => panic!("EndOfStream instead of EndOfTimeline"),
        }
    };
    assert_eq!(next_timeline, TimelineId(2));
    assert!(
        switch_point >= id.xlogpos && switch_point <= received,
        "{switch_point} vs {received}"
    );
    // Status updates after the end are ignored, not sent.
    stream
        .send_status(received, received, received, false)
        .await
        .unwrap();
    assert!(matches!(
        stream.next_message().await,
        Err(PgError::InvalidState(_))
    ));

    let mut conn = stream.into_connection().unwrap();
    let (name, content) = conn.timeline_history(TimelineId(2)).await.unwrap();
    assert_eq!(name, "00000002.history");
    let text = String::from_utf8(content.to_vec()).unwrap();
    assert!(
        text.starts_with(&format!("1\t{switch_point}\t")),
        "{text:?}"
    );
    let on_disk = std::fs::read(standby.wal_file("00000002.history")).unwrap();
    assert_eq!(&content[..], &on_disk[..]);

    // Timeline 2 from the start of the segment holding the switch point.
    assert_eq!(
        conn.identify_system().await.unwrap().timeline,
        TimelineId(2)
    );
    let seg_start = switch_point.segment_start(MB);
    let mut stream = conn
        .start_replication(None, seg_start, TimelineId(2))
        .await
        .unwrap();
    standby.psql("INSERT INTO t VALUES (2)");
    let flushed = standby
        .psql("SELECT pg_current_wal_flush_lsn()")
        .parse::<Lsn>()
        .unwrap();
    let bytes = receive_range(&mut stream, seg_start, flushed).await;
    let disk = segment_bytes(&standby, TimelineId(2), seg_start);
    let n = (switch_point.0 - seg_start.0) as usize;
    // Up to the switch point, timeline 2's segment is a copy of timeline 1's.
    assert_eq!(&bytes[..n], &disk[..n]);
    stream.stop().await.unwrap();

    // Asking for exactly the end of timeline 1 skips streaming entirely.
    let conn = connect(&standby.conninfo()).await;
    let mut stream = conn
        .start_replication(None, switch_point, TimelineId(1))
        .await
        .unwrap();
    assert_eq!(
        next(&mut stream, 5).await,
        ReplMessage::EndOfTimeline {
            next_timeline: TimelineId(2),
            switch_point
        }
    );
    let mut conn = stream.into_connection().unwrap();
    conn.identify_system().await.unwrap();

    // SQL helpers on a standby versus a primary.
    let client = sql::connect_sql(&standby.conninfo(), APP).await.unwrap();
    assert!(sql::current_wal_lsn(&client).await.unwrap() >= flushed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_already_removed_is_its_own_error() {
    let pg = PgCluster::start(&PgOptions::default().segsize_mb(1));
    let mut conn = connect(&pg.conninfo()).await;
    let id = conn.identify_system().await.unwrap();
    let old = id.xlogpos.segment_start(MB);
    let old_name = SegmentName::containing(id.timeline, old, MB).file_name(MB);
    for i in 0..4 {
        pg.psql(&format!(
            "CREATE TABLE r{i} (i int); SELECT pg_switch_wal()"
        ));
    }
    pg.psql("CHECKPOINT");
    pg.psql("CHECKPOINT");
    assert!(
        !pg.wal_file(&old_name).exists(),
        "{old_name} should be gone"
    );

    // The walsender notices when it first reads the segment: after
    // CopyBothResponse, as the stream's first message.
    let e = match conn.start_replication(None, old, id.timeline).await {
        Err(e) => e,
        Ok(mut stream) => {
            let e = tokio::time::timeout(Duration::from_secs(10), stream.next_message())
                .await
                .expect("no answer")
                .expect_err("streaming removed WAL must fail");
            // The stream is unusable after an error.
            assert!(matches!(
                stream.next_message().await,
                Err(PgError::InvalidState(_))
            ));
            e
        }
    };
    assert!(
        matches!(e, PgError::WalRemoved { start, .. } if start == old),
        "{e:?}"
    );
    assert_eq!(e.sqlstate(), Some("58P01"));
    assert!(!e.is_retryable());
    assert!(e.to_string().contains("gap must be recorded"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_shutdown_ends_the_stream() {
    let pg = PgCluster::start(&PgOptions::default().segsize_mb(1));
    let mut conn = connect(&pg.conninfo()).await;
    let id = conn.identify_system().await.unwrap();
    let start = id.xlogpos.segment_start(MB);
    let mut stream = conn
        .start_replication(None, start, id.timeline)
        .await
        .unwrap();
    let stopper = std::thread::spawn({
        let datadir = pg.datadir().to_path_buf();
        move || {
            let out = common::pg::pg_command("pg_ctl")
                .arg("-D")
                .arg(datadir)
                .args(["-m", "fast", "-w", "stop"])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    });
    // The stream must keep flowing while the server shuts down (the
    // shutdown checkpoint is sent to us), then end cleanly.
    let mut pos = start;
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(60), stream.next_message())
            .await
            .expect("stream hung during shutdown")
        {
            Ok(ReplMessage::XLogData { start, data, .. }) => {
                assert_eq!(start, pos);
                pos = pos.plus(data.len() as u64);
            }
            Ok(ReplMessage::Keepalive {
                reply_requested, ..
            }) => {
                if reply_requested {
                    stream.send_status(pos, pos, pos, false).await.unwrap();
                }
            }
            other => break other,
        }
    };
    stopper.join().unwrap();
    assert!(matches!(end, Ok(ReplMessage::EndOfStream)), "{end:?}");
    assert!(stream.into_connection().is_err());
}

/// The harness end to end, as other suites use it: pg_receivewal as the
/// reference archive, a base backup without WAL, a restore through
/// restore_command that must reach the rows written after the backup, and
/// a restore that must fail (no restore_command).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_restore_from_pg_receivewal_archive() {
    let pg = PgCluster::start(&PgOptions::default().segsize_mb(1));
    let work = common::pg::TestDir::new("restore-work");
    let archive = work.subdir("archive");
    // A slot, or the backup's checkpoint may recycle WAL before
    // pg_receivewal has read it (wal_keep_size = 0).
    pg.psql("SELECT pg_create_physical_replication_slot('recv', true)");
    let mut receivewal = pg.spawn_pg_receivewal(&archive, Some("recv"));
    let backup = work.join("backup");
    pg.base_backup(&backup, "none");
    pg.psql("CREATE TABLE after_backup (i int); INSERT INTO after_backup SELECT generate_series(1, 500)");
    let switched = pg.psql("SELECT pg_switch_wal()").parse::<Lsn>().unwrap();
    let seg = pg.segment_size();
    let last = SegmentName::containing(TimelineId(1), Lsn(switched.0 - 1), seg).file_name(seg);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !archive.join(&last).exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "pg_receivewal did not write {last}: {:?}\n{}",
            std::fs::read_dir(&archive).unwrap().collect::<Vec<_>>(),
            std::fs::read_to_string(pg.test_dir().join("pg_receivewal-0.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // pg_receivewal's segment is byte-identical to the server's.
    assert_eq!(
        std::fs::read(archive.join(&last)).unwrap(),
        segment_bytes(&pg, TimelineId(1), Lsn(switched.0 - 1))
    );
    receivewal.kill().unwrap();
    receivewal.wait().unwrap();

    let restored = common::pg::start_restore(
        &backup,
        &[format!(
            "restore_command = 'cp {}/%f %p'",
            archive.display()
        )],
    );
    assert_eq!(
        restored.wait_recovery_end(Duration::from_secs(60)),
        common::pg::RecoveryOutcome::Promoted,
        "{}",
        restored.log_tail()
    );
    assert_eq!(restored.psql("SELECT count(*) FROM after_backup"), "500");
    assert_eq!(restored.system_identifier(), pg.system_identifier());
    drop(restored);

    let failed = common::pg::start_restore(&backup, &[]);
    match failed.wait_recovery_end(Duration::from_secs(30)) {
        common::pg::RecoveryOutcome::Failed(log) => {
            assert!(log.contains("restore_command"), "{log}")
        }
        other => panic!("recovery without restore_command must fail, got {other:?}"),
    }
}
