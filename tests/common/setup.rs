//! Small pieces most end-to-end tests share: a cluster with a walsafe
//! configuration beside it, WAL positions, WAL generation, keys.

use std::path::{Path, PathBuf};

use super::pg::{PgCluster, PgOptions, TestDir};
use super::walsafe::Settings;

/// A cluster, a test directory and a walsafe configuration for it
/// (spool, `file://` repository and prefetch dir inside the directory).
pub struct Setup {
    pub dir: TestDir,
    pub pg: PgCluster,
    pub settings: Settings,
    pub config: PathBuf,
}

/// Starts a cluster named `name` and writes its walsafe.toml.
pub fn setup(name: &str, opts: PgOptions) -> Setup {
    let pg = PgCluster::start(&PgOptions {
        name: name.into(),
        ..opts
    });
    let dir = TestDir::new(name);
    let settings = Settings::new(dir.path(), &pg.conninfo());
    let config = settings.write(&dir.join("walsafe.toml"));
    Setup {
        dir,
        pg,
        settings,
        config,
    }
}

/// [`setup`] with its repository in `s3` under `prefix`, encrypted with
/// a new key.
pub fn setup_s3(name: &str, opts: PgOptions, s3: &super::s3::S3Server, prefix: &str) -> Setup {
    let mut s = setup(name, opts);
    s.settings.repo_url = s3.url(prefix);
    s.settings.repo_options = s3.repo_options().into_iter().collect();
    s.settings.key_file = Some(keygen(s.dir.path(), "repo.key"));
    s.config = s.settings.write(&s.dir.join("walsafe.toml"));
    s
}

/// Parses PostgreSQL's `X/Y` into bytes.
pub fn parse_lsn(text: &str) -> u64 {
    let (hi, lo) = text.trim().split_once('/').expect("an LSN");
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

/// `pg_current_wal_lsn()` in bytes.
pub fn current_lsn(pg: &PgCluster) -> u64 {
    parse_lsn(&pg.psql("SELECT pg_current_wal_lsn()"))
}

/// Writes about `mb` MiB of WAL into table `filler`.
pub fn write_wal(pg: &PgCluster, mb: u32) {
    pg.psql("CREATE TABLE IF NOT EXISTS filler (id bigserial, pad text)");
    for _ in 0..mb {
        pg.psql("INSERT INTO filler (pad) SELECT repeat(md5(g::text), 30) FROM generate_series(1, 1000) g");
    }
}

/// A 16 MiB segment's file name.
pub fn segment_name(tli: u32, segno: u64) -> String {
    format!("{tli:08X}{:08X}{:08X}", segno / 256, segno % 256)
}

/// `walsafe keygen DIR/NAME`, readable by the postgres user.
pub fn keygen(dir: &Path, name: &str) -> PathBuf {
    let key = dir.join(name);
    let out = std::process::Command::new(super::walsafe::bin())
        .arg("keygen")
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success(), "keygen: {}", stderr(&out));
    super::pg::chown_postgres(&key);
    key
}

/// The key ids of a key file (a ring), in its order.
#[allow(dead_code)]
pub fn key_ids(path: &Path) -> Vec<String> {
    walsafe::repository::key::load_key_ring(path)
        .unwrap()
        .ids_hex()
}

/// A finished command, for assertion messages: its exit code, stdout and
/// stderr.
pub fn output_text(o: &std::process::Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A command's stderr as text.
pub fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
