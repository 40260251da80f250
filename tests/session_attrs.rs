//! libpq's `target_session_attrs` against a real primary and a real
//! standby, for both connections walsafe opens (replication and SQL): the
//! standby is listed first in `host=…`, so "any" lands on it and every other
//! value has to look before it accepts a host. A failover (the primary
//! gone, the standby promoted) is followed by the same conninfo, and the
//! error while no host fits names every host, says why it was skipped, and
//! is retryable, so that the agent's reconnect loop waits it out.

mod common;

use common::pg::{PgCluster, PgOptions};
use walsafe::pg::error::PgError;
use walsafe::pg::replication::ReplicationConnection;
use walsafe::pg::sql;

const APP: &str = "walsafe-test";

/// The two-host conninfo, standby first.
fn conninfo(standby: &PgCluster, primary: &PgCluster, attrs: &str) -> String {
    format!(
        "host=127.0.0.1,127.0.0.1 port={},{} user=postgres sslmode=disable target_session_attrs={attrs}",
        standby.port(),
        primary.port()
    )
}

/// The port the replication connection reached (usable: IDENTIFY_SYSTEM works).
async fn replication_port(conninfo: &str) -> Result<u16, PgError> {
    let mut conn = ReplicationConnection::connect(conninfo, APP).await?;
    conn.identify_system().await.expect("IDENTIFY_SYSTEM");
    Ok(conn.show("port").await.unwrap().parse().unwrap())
}

/// The port the SQL connection reached.
async fn sql_port(conninfo: &str) -> Result<u16, PgError> {
    let client = sql::connect_sql(conninfo, APP).await?;
    let row = client.query_one("SHOW port", &[]).await.unwrap();
    Ok(row.get::<_, String>(0).parse().unwrap())
}

/// Both connections land on `want` with `attrs`.
async fn both_reach(standby: &PgCluster, primary: &PgCluster, attrs: &str, want: &PgCluster) {
    let c = conninfo(standby, primary, attrs);
    let got = replication_port(&c)
        .await
        .unwrap_or_else(|e| panic!("replication connection, {attrs}: {e}"));
    assert_eq!(got, want.port(), "replication connection, {attrs}");
    let got = sql_port(&c)
        .await
        .unwrap_or_else(|e| panic!("SQL connection, {attrs}: {e}"));
    assert_eq!(got, want.port(), "SQL connection, {attrs}");
}

/// Both connections fail with `attrs`; the errors, checked to be retryable.
async fn both_fail(standby: &PgCluster, primary: &PgCluster, attrs: &str) -> Vec<String> {
    let c = conninfo(standby, primary, attrs);
    let mut out = Vec::new();
    for (kind, result) in [
        ("replication", replication_port(&c).await),
        ("SQL", sql_port(&c).await),
    ] {
        let e = result.expect_err(&format!("{kind} connection with {attrs} should fail"));
        assert!(
            e.is_retryable(),
            "{kind} connection, {attrs}: must be retryable: {e}"
        );
        out.push(e.to_string());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_session_attrs_pick_the_right_host_and_follow_a_failover() {
    let primary = PgCluster::start(&PgOptions::default());
    let standby = primary.create_standby();

    both_reach(&standby, &primary, "any", &standby).await;
    both_reach(&standby, &primary, "read-write", &primary).await;
    both_reach(&standby, &primary, "primary", &primary).await;
    both_reach(&standby, &primary, "standby", &standby).await;
    both_reach(&standby, &primary, "read-only", &standby).await;
    both_reach(&standby, &primary, "prefer-standby", &standby).await;

    // prefer-standby with the standby down: the second pass takes the primary.
    standby.stop_fast();
    both_reach(&standby, &primary, "prefer-standby", &primary).await;
    for e in both_fail(&standby, &primary, "standby").await {
        assert!(e.contains(&format!("port {}", standby.port())), "{e}");
        assert!(e.contains(&format!("port {}", primary.port())), "{e}");
        assert!(e.contains("not in recovery"), "{e}");
    }
    standby.start_again();
    standby.wait_for(
        "SELECT pg_is_in_recovery()",
        "t",
        std::time::Duration::from_secs(30),
    );

    // The primary dies: read-write must not settle for the standby.
    primary.stop_immediate();
    for e in both_fail(&standby, &primary, "read-write").await {
        assert!(
            e.contains(&format!(
                "host 127.0.0.1 port {} is in recovery (target_session_attrs=read-write)",
                standby.port()
            )),
            "{e}"
        );
        assert!(
            e.contains(&format!("127.0.0.1 port {}", primary.port())),
            "{e}"
        );
        assert!(e.contains("could not connect"), "{e}");
    }
    both_fail(&standby, &primary, "primary").await;
    // Failover: the same conninfo now finds the promoted standby.
    standby.promote();
    both_reach(&standby, &primary, "read-write", &standby).await;
    both_reach(&standby, &primary, "primary", &standby).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_transaction_read_only_makes_a_primary_read_only_not_a_standby() {
    let primary = PgCluster::start(&PgOptions::default());
    let standby = primary.create_standby();
    primary.append_conf(&["default_transaction_read_only = on"]);
    primary.reload();
    primary.wait_for(
        "SHOW default_transaction_read_only",
        "on",
        std::time::Duration::from_secs(10),
    );
    // libpq: read-write/read-only look at the session, primary/standby at recovery.
    both_reach(&standby, &primary, "primary", &primary).await;
    both_reach(&standby, &primary, "standby", &standby).await;
    for e in both_fail(&standby, &primary, "read-write").await {
        assert!(
            e.contains(&format!(
                "host 127.0.0.1 port {} is read-only (default_transaction_read_only = on) (target_session_attrs=read-write)",
                primary.port()
            )),
            "{e}"
        );
    }
}

/// PostgreSQL 13 reports neither `in_hot_standby` nor
/// `default_transaction_read_only` at startup, and a physical walsender
/// takes no SELECT: the replication connection has to ask with SHOW.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_13_replication_connection_asks_the_server() {
    let opts = PgOptions::default().major(13);
    let primary = PgCluster::start(&opts);
    let standby = primary.create_standby();
    let version: u32 = primary.psql("SHOW server_version_num").parse().unwrap();
    assert_eq!(version / 10000, 13);

    let reach = |attrs: &'static str, want: u16| {
        let c = conninfo(&standby, &primary, attrs);
        async move {
            let got = replication_port(&c)
                .await
                .unwrap_or_else(|e| panic!("PG13 replication connection, {attrs}: {e}"));
            assert_eq!(got, want, "PG13 replication connection, {attrs}");
        }
    };
    reach("any", standby.port()).await;
    reach("read-write", primary.port()).await;
    reach("primary", primary.port()).await;
    reach("standby", standby.port()).await;
    reach("read-only", standby.port()).await;
    reach("prefer-standby", standby.port()).await;
    // The SQL connection can SELECT pg_is_in_recovery() on 13.
    let got = sql_port(&conninfo(&standby, &primary, "primary"))
        .await
        .unwrap();
    assert_eq!(got, primary.port());

    // A read-only primary is still a primary, not a standby.
    primary.append_conf(&["default_transaction_read_only = on"]);
    primary.reload();
    primary.wait_for(
        "SHOW default_transaction_read_only",
        "on",
        std::time::Duration::from_secs(10),
    );
    reach("primary", primary.port()).await;
    reach("standby", standby.port()).await;
    let e = replication_port(&conninfo(&standby, &primary, "read-write"))
        .await
        .expect_err("no read-write host");
    assert!(e.is_retryable(), "{e}");
    assert!(e.to_string().contains("is read-only"), "{e}");
    assert!(e.to_string().contains("is in recovery"), "{e}");

    // Failover on 13.
    primary.stop_immediate();
    let e = replication_port(&conninfo(&standby, &primary, "primary"))
        .await
        .expect_err("no primary");
    assert!(e.is_retryable(), "{e}");
    standby.promote();
    reach("primary", standby.port()).await;
}
