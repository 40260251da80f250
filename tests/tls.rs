//! TLS to a real PostgreSQL 15 with `ssl = on` and certificates each test
//! generates (rcgen): every sslmode with libpq's meaning, for both the
//! replication connection and the SQL connection, certificate and host name
//! checks, client-certificate authentication, SCRAM channel binding, and
//! `walsafe run` archiving over verify-full. The server's own view
//! (`pg_stat_ssl`) confirms what is encrypted, and `hostnossl … reject`
//! lines in pg_hba.conf prove that a plain connection would not get in.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::pg::{chown_postgres, server_tls_conf, PgCluster, PgOptions, TestDir};
use common::walsafe::{Agent, Settings};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use tokio_postgres::Client;
use walsafe::pg::error::PgError;
use walsafe::pg::replication::{ReplMessage, ReplicationConnection};
use walsafe::pg::sql;
use walsafe::pg::tls::TlsError;
use walsafe::pg::{Lsn, TimelineId};

const APP: &str = "walsafe-tls-test";

/// A certificate authority made for one test.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, PEM.
struct Issued {
    cert: String,
    key: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Ca { issuer }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for `names` (DNS names or IP addresses).
    fn server(&self, names: &[&str]) -> Issued {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, &names[0]);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params)
    }

    /// A client certificate whose CN is the role name (pg_hba `cert`).
    fn client(&self, role: &str) -> Issued {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, role);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params)
    }

    fn issue(&self, params: CertificateParams) -> Issued {
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Issued {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// Writes a PEM file readable by the postgres user (the agent runs as it);
/// keys get 0600.
fn write_pem(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    chown_postgres(&p);
    p
}

/// A cluster with `ssl = on`, its certificate files in `files`.
fn ssl_cluster(
    name: &str,
    files: &TestDir,
    server: &Issued,
    client_ca: Option<&Ca>,
    hba: &[&str],
) -> PgCluster {
    let mut opts = PgOptions {
        name: name.into(),
        ..PgOptions::default()
    };
    let client_ca = client_ca.map(Ca::pem);
    for line in server_tls_conf(
        files.path(),
        &server.cert,
        &server.key,
        client_ca.as_deref(),
    ) {
        opts = opts.conf(line);
    }
    for line in hba {
        opts = opts.hba(*line);
    }
    PgCluster::start(&opts)
}

/// pg_hba.conf lines that refuse any unencrypted TCP connection.
const TLS_ONLY: [&str; 2] = [
    "hostnossl all all 127.0.0.1/32 reject",
    "hostnossl replication all 127.0.0.1/32 reject",
];

/// Hermetic TLS file settings: no stray ~/.postgresql files take part.
fn no_home_files(dir: &Path) -> String {
    format!(
        "sslrootcert={d}/absent-root.crt sslcert={d}/absent.crt sslkey={d}/absent.key",
        d = dir.display()
    )
}

async fn repl(conninfo: &str) -> Result<ReplicationConnection, PgError> {
    ReplicationConnection::connect(conninfo, APP).await
}

async fn sql_client(conninfo: &str) -> Result<Client, PgError> {
    sql::connect_sql(conninfo, APP).await
}

/// The server's pg_stat_ssl.ssl for a backend.
fn server_says_ssl(pg: &PgCluster, pid: u32) -> bool {
    match pg
        .psql(&format!("SELECT ssl FROM pg_stat_ssl WHERE pid = {pid}"))
        .as_str()
    {
        "t" => true,
        "f" => false,
        other => panic!("no pg_stat_ssl row for pid {pid}: {other:?}"),
    }
}

/// Connects both ways with `conninfo`, runs a command on each, and
/// returns whether each is encrypted, asserting that walsafe and the
/// server agree.
async fn both_encrypted(pg: &PgCluster, conninfo: &str) -> (bool, bool) {
    let mut c = repl(conninfo)
        .await
        .unwrap_or_else(|e| panic!("replication connection with {conninfo}: {e}"));
    let id = c.identify_system().await.unwrap();
    assert_eq!(id.identity.system_identifier, pg.system_identifier());
    let pid = c.backend_pid().unwrap();
    assert_eq!(c.is_encrypted(), server_says_ssl(pg, pid), "{conninfo}");
    let repl_tls = c.is_encrypted();

    let client = sql_client(conninfo)
        .await
        .unwrap_or_else(|e| panic!("SQL connection with {conninfo}: {e}"));
    let row = client
        .query_one(
            "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    let sql_tls: bool = row.get(0);
    if sql_tls {
        let version: Option<String> = row.get(1);
        assert!(version.unwrap().starts_with("TLSv1."));
    }
    (repl_tls, sql_tls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sslmode_against_an_ssl_server() {
    let files = TestDir::new("tls-files");
    let ca = Ca::new("walsafe test CA");
    let other_ca = Ca::new("someone else's CA");
    let server = ca.server(&["localhost", "127.0.0.1"]);
    let pg = ssl_cluster("tls-modes", &files, &server, None, &TLS_ONLY);
    let ca_file = write_pem(files.path(), "ca.crt", &ca.pem(), 0o644);
    let other_ca_file = write_pem(files.path(), "other-ca.crt", &other_ca.pem(), 0o644);
    let base = format!(
        "host=127.0.0.1 port={} user=postgres {}",
        pg.port(),
        no_home_files(files.path())
    );

    // disable: plain, which pg_hba.conf rejects.
    let e = repl(&format!("{base} sslmode=disable")).await.unwrap_err();
    assert!(matches!(e, PgError::HbaRejected { .. }), "{e:?}");
    assert!(e.to_string().contains("no encryption"), "{e}");
    let e = sql_client(&format!("{base} sslmode=disable"))
        .await
        .unwrap_err();
    assert!(matches!(e, PgError::HbaRejected { .. }), "{e:?}");

    // allow: plain is refused, so TLS; prefer and require: TLS at once.
    for mode in ["allow", "prefer", "require"] {
        let got = both_encrypted(&pg, &format!("{base} sslmode={mode}")).await;
        assert_eq!(got, (true, true), "sslmode={mode}");
    }
    // verify-ca and verify-full with the right CA; the IP address is in
    // the certificate, and so is "localhost".
    for (host, mode) in [
        ("127.0.0.1", "verify-ca"),
        ("127.0.0.1", "verify-full"),
        ("localhost", "verify-full"),
    ] {
        let conninfo = format!(
            "host={host} port={} user=postgres sslmode={mode} sslrootcert={}",
            pg.port(),
            ca_file.display()
        );
        assert_eq!(
            both_encrypted(&pg, &conninfo).await,
            (true, true),
            "{conninfo}"
        );
    }

    // Another CA: refused under verify-ca, and under require too, since a
    // root file that exists is used (libpq's rule).
    for mode in ["verify-ca", "verify-full", "require"] {
        let conninfo = format!(
            "{base} sslmode={mode} sslrootcert={}",
            other_ca_file.display()
        );
        for e in [
            repl(&conninfo).await.unwrap_err(),
            sql_client(&conninfo).await.unwrap_err(),
        ] {
            assert!(
                matches!(e, PgError::Tls(TlsError::CertificateRejected { .. })),
                "{mode}: {e:?}"
            );
            assert!(
                e.to_string()
                    .contains("is not signed by any of the trusted root certificates"),
                "{e}"
            );
            assert!(!e.is_retryable());
        }
    }
    // prefer with a root file that does not trust the server: libpq falls
    // back to plain text, which pg_hba.conf rejects here.
    let e = repl(&format!(
        "{base} sslmode=prefer sslrootcert={}",
        other_ca_file.display()
    ))
    .await
    .unwrap_err();
    assert!(matches!(e, PgError::HbaRejected { .. }), "{e:?}");

    // verify-ca without any root file.
    let e = repl(&format!("{base} sslmode=verify-ca"))
        .await
        .unwrap_err();
    assert!(
        matches!(e, PgError::Tls(TlsError::RootCertMissing { .. })),
        "{e:?}"
    );
    assert!(
        e.to_string().contains(&format!(
            "root certificate file {}/absent-root.crt does not exist",
            files.path().display()
        )),
        "{e}"
    );
    assert!(!e.is_retryable());

    // The environment names the files too.
    std::env::set_var("PGSSLROOTCERT", &ca_file);
    std::env::set_var("PGSSLMODE", "verify-full");
    let got = both_encrypted(
        &pg,
        &format!(
            "host=localhost port={} user=postgres sslcert={}/absent.crt",
            pg.port(),
            files.path().display()
        ),
    )
    .await;
    assert_eq!(got, (true, true));

    // A Unix socket never uses TLS, whatever the sslmode (as libpq).
    let got = both_encrypted(&pg, &format!("{} sslmode=verify-full", pg.conninfo())).await;
    assert_eq!(got, (false, false));
    std::env::remove_var("PGSSLROOTCERT");
    std::env::remove_var("PGSSLMODE");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_refuses_a_certificate_for_another_host_name() {
    let files = TestDir::new("tls-files");
    let ca = Ca::new("walsafe test CA");
    let server = ca.server(&["db.example"]);
    let pg = ssl_cluster("tls-name", &files, &server, None, &TLS_ONLY);
    let ca_file = write_pem(files.path(), "ca.crt", &ca.pem(), 0o644);
    let at = |host: &str, mode: &str| {
        format!(
            "{host} port={} user=postgres sslmode={mode} sslrootcert={}",
            pg.port(),
            ca_file.display()
        )
    };

    let conninfo = at("host=127.0.0.1", "verify-full");
    for e in [
        repl(&conninfo).await.unwrap_err(),
        sql_client(&conninfo).await.unwrap_err(),
    ] {
        assert!(
            matches!(e, PgError::Tls(TlsError::HostnameMismatch { .. })),
            "{e:?}"
        );
        let text = e.to_string();
        assert!(
            text.starts_with(&format!(
                "certificate for 127.0.0.1 port {} does not match host name \"127.0.0.1\"",
                pg.port()
            )),
            "{text}"
        );
        assert!(text.contains("db.example"), "{text}");
        assert!(text.contains("use sslmode=verify-ca"), "{text}");
        assert!(!e.is_retryable());
    }
    // verify-ca does not look at the name.
    let got = both_encrypted(&pg, &at("host=127.0.0.1", "verify-ca")).await;
    assert_eq!(got, (true, true));
    // verify-full checks `host`, while `hostaddr` says where to connect.
    let got = both_encrypted(
        &pg,
        &at("host=db.example hostaddr=127.0.0.1", "verify-full"),
    )
    .await;
    assert_eq!(got, (true, true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_without_ssl_prefer_falls_back_and_require_fails() {
    let pg = PgCluster::start(&PgOptions {
        name: "tls-none".into(),
        ..PgOptions::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let base = format!(
        "host=127.0.0.1 port={} user=postgres {}",
        pg.port(),
        no_home_files(dir.path())
    );
    for mode in ["disable", "allow", "prefer"] {
        let got = both_encrypted(&pg, &format!("{base} sslmode={mode}")).await;
        assert_eq!(got, (false, false), "sslmode={mode}");
    }
    for mode in ["require", "verify-ca", "verify-full"] {
        let conninfo = format!("{base} sslmode={mode}");
        for e in [
            repl(&conninfo).await.unwrap_err(),
            sql_client(&conninfo).await.unwrap_err(),
        ] {
            assert!(
                matches!(e, PgError::Tls(TlsError::ServerRefusedTls { .. })),
                "{mode}: {e:?}"
            );
            assert_eq!(
                e.to_string(),
                format!(
                    "PostgreSQL at 127.0.0.1 port {} does not support TLS but sslmode={mode}; \
                     enable ssl on the server (ssl = on, ssl_cert_file, ssl_key_file) or lower \
                     sslmode to prefer or disable",
                    pg.port()
                )
            );
            assert!(!e.is_retryable());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_scram_channel_binding_and_streaming_over_tls() {
    let files = TestDir::new("tls-files");
    let ca = Ca::new("walsafe test CA");
    let server = ca.server(&["localhost", "127.0.0.1"]);
    let pg = ssl_cluster(
        "tls-cert",
        &files,
        &server,
        Some(&ca),
        &[
            "hostssl replication certuser 127.0.0.1/32 cert",
            "hostssl all certuser 127.0.0.1/32 cert",
            "hostssl replication scramuser 127.0.0.1/32 scram-sha-256",
            "hostssl all scramuser 127.0.0.1/32 scram-sha-256",
            TLS_ONLY[0],
            TLS_ONLY[1],
        ],
    );
    pg.psql("CREATE ROLE certuser LOGIN REPLICATION");
    pg.psql("CREATE ROLE scramuser LOGIN REPLICATION PASSWORD 'scr4m-over-tls'");
    let ca_file = write_pem(files.path(), "ca.crt", &ca.pem(), 0o644);
    let client = ca.client("certuser");
    let crt = write_pem(files.path(), "certuser.crt", &client.cert, 0o644);
    let key = write_pem(files.path(), "certuser.key", &client.key, 0o600);
    let conninfo = format!(
        "host=localhost port={} user=certuser dbname=postgres sslmode=verify-full sslrootcert={} sslcert={} sslkey={}",
        pg.port(),
        ca_file.display(),
        crt.display(),
        key.display()
    );

    // Client certificate: IDENTIFY_SYSTEM, then stream some WAL.
    let mut c = repl(&conninfo).await.unwrap();
    assert!(c.is_encrypted());
    let pid = c.backend_pid().unwrap();
    assert!(server_says_ssl(&pg, pid));
    assert_eq!(
        pg.psql(&format!(
            "SELECT client_dn FROM pg_stat_ssl WHERE pid = {pid}"
        )),
        "/CN=certuser"
    );
    let id = c.identify_system().await.unwrap();
    let start = Lsn(id.xlogpos.0 - id.xlogpos.0 % 8192);
    let mut stream = c
        .start_replication(None, start, TimelineId(id.timeline.0))
        .await
        .unwrap();
    pg.psql("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g");
    let mut received = 0usize;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while received == 0 {
        let m = tokio::time::timeout_at(deadline, stream.next_message())
            .await
            .expect("no XLogData over TLS in time")
            .unwrap();
        if let ReplMessage::XLogData {
            start: at, data, ..
        } = m
        {
            assert_eq!(at, start);
            received += data.len();
        }
    }
    stream.stop().await.unwrap();

    // The SQL connection authenticates with the certificate too.
    let client_sql = sql_client(&conninfo).await.unwrap();
    let row = client_sql
        .query_one(
            "SELECT ssl, client_dn, current_user::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0));
    assert_eq!(
        row.get::<_, Option<String>>(1).as_deref(),
        Some("/CN=certuser")
    );
    assert_eq!(row.get::<_, String>(2), "certuser");

    // Without the certificate the server refuses (and says why).
    let without = format!(
        "host=localhost port={} user=certuser sslmode=verify-full sslrootcert={} sslcert={}/none.crt",
        pg.port(),
        ca_file.display(),
        files.path().display()
    );
    let e = repl(&without).await.unwrap_err();
    assert!(
        e.server_error()
            .is_some_and(|s| s.message.contains("requires a valid client certificate")),
        "{e:?}"
    );
    assert!(!e.is_retryable());

    // A certificate from a CA the server does not trust: the server ends
    // the TLS session with an alert.
    let stranger = Ca::new("stranger CA").client("certuser");
    let s_crt = write_pem(files.path(), "stranger.crt", &stranger.cert, 0o644);
    let s_key = write_pem(files.path(), "stranger.key", &stranger.key, 0o600);
    let conninfo_stranger = format!(
        "host=localhost port={} user=certuser sslmode=verify-full sslrootcert={} sslcert={} sslkey={}",
        pg.port(),
        ca_file.display(),
        s_crt.display(),
        s_key.display()
    );
    for e in [
        repl(&conninfo_stranger).await.unwrap_err(),
        sql_client(&conninfo_stranger).await.unwrap_err(),
    ] {
        assert!(
            matches!(e, PgError::Tls(TlsError::ServerAlert { .. })),
            "{e:?}"
        );
        assert!(e.to_string().contains("check sslcert/sslkey"), "{e}");
        assert!(!e.is_retryable());
    }

    // A key others can read is refused before anything is sent, like libpq.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = repl(&conninfo).await.unwrap_err();
    assert!(
        matches!(e, PgError::Tls(TlsError::KeyPermissions { .. })),
        "{e:?}"
    );
    assert!(e.to_string().contains(&key.display().to_string()), "{e}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

    // SCRAM over TLS binds to the TLS session (SCRAM-SHA-256-PLUS).
    let scram = format!(
        "host=127.0.0.1 port={} user=scramuser password=scr4m-over-tls dbname=postgres sslmode=require {}",
        pg.port(),
        no_home_files(files.path())
    );
    let c = repl(&scram).await.unwrap();
    assert!(c.is_encrypted());
    assert!(c.channel_binding());
    let s = sql_client(&scram).await.unwrap();
    let row = s
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0));
    let e = repl(&scram.replace("scr4m-over-tls", "wrong"))
        .await
        .unwrap_err();
    assert!(matches!(e, PgError::AuthFailed { .. }), "{e:?}");
}

#[test]
fn walsafe_run_archives_over_verify_full_tls() {
    let files = TestDir::new("tls-files");
    let ca = Ca::new("walsafe test CA");
    let server = ca.server(&["localhost"]);
    let pg = ssl_cluster("tls-run", &files, &server, None, &TLS_ONLY);
    let ca_file = write_pem(files.path(), "ca.crt", &ca.pem(), 0o644);
    let dir = TestDir::new("tls-run");
    // The TLS settings come from the environment the agent inherits
    // (PGSSLMODE, PGSSLROOTCERT), as libpq's would.
    std::env::set_var("PGSSLMODE", "verify-full");
    std::env::set_var("PGSSLROOTCERT", &ca_file);
    let conninfo = format!("host=localhost port={} user=postgres", pg.port());
    let settings = Settings::new(dir.path(), &conninfo);
    let config = settings.write(&dir.join("walsafe.toml"));
    let agent = Agent::start(&config, settings.metrics_port);

    pg.psql("CREATE TABLE filler AS SELECT g, repeat(md5(g::text), 20) AS pad FROM generate_series(1, 20000) g");
    pg.psql("SELECT pg_switch_wal()");
    pg.psql("INSERT INTO filler SELECT g, 'tail' FROM generate_series(1, 100) g");
    let text = pg.psql("SELECT pg_current_wal_lsn()");
    let (hi, lo) = text.split_once('/').unwrap();
    let end = (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap();
    agent.wait_archived(end, Duration::from_secs(60));

    // The server sees walsafe's walsender connection as encrypted.
    assert_eq!(
        pg.psql(
            "SELECT count(*), bool_and(s.ssl) FROM pg_stat_replication r \
             JOIN pg_stat_ssl s USING (pid) WHERE r.application_name = 'walsafe'"
        ),
        "1|t"
    );
    // Every plain TCP connection would have been rejected.
    assert!(
        !pg.log().contains("no encryption"),
        "a plain connection was attempted:\n{}",
        pg.log_tail()
    );
}
