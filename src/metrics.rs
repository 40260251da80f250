//! Metric names and recording helpers, all in one place.
//!
//! Every metric walsafe exports is named here with the `walsafe_` prefix and
//! its unit in the name, and described once in [`describe`]. Positions are
//! gauges refreshed from [`Positions`] by [`refresh_positions`] once a
//! second and on scrape; counters and histograms are recorded where the
//! event happens. Served by `metrics-exporter-prometheus` at
//! `http://<[metrics] listen>/metrics`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit,
};

use anyhow::Context;

use crate::pg::Lsn;
use crate::positions::Positions;

/// Kind of uploaded object, as labelled in metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Segment,
    Chunk,
    History,
    /// A closed `.partial` (end of a timeline); labelled "partial".
    ClosedPartial,
}

impl Kind {
    /// The `kind` label value.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Segment => "segment",
            Kind::Chunk => "chunk",
            Kind::History => "history",
            Kind::ClosedPartial => "partial",
        }
    }
}

pub const SERVER_LSN_BYTES: &str = "walsafe_server_lsn_bytes";
pub const RECEIVED_LSN_BYTES: &str = "walsafe_received_lsn_bytes";
pub const FLUSHED_LSN_BYTES: &str = "walsafe_flushed_lsn_bytes";
pub const ARCHIVED_LSN_BYTES: &str = "walsafe_archived_lsn_bytes";
pub const ARCHIVE_LAG_BYTES: &str = "walsafe_archive_lag_bytes";
pub const ARCHIVE_LAG_SECONDS: &str = "walsafe_archive_lag_seconds";
pub const ARCHIVE_GAPS: &str = "walsafe_archive_gaps";
pub const TIMELINE: &str = "walsafe_timeline";
pub const REPLICATION_CONNECTED: &str = "walsafe_replication_connected";
pub const LAST_ARCHIVED_TIMESTAMP_SECONDS: &str = "walsafe_last_archived_timestamp_seconds";
pub const LAST_BACKUP_TIMESTAMP_SECONDS: &str = "walsafe_last_backup_timestamp_seconds";
pub const LAST_DRILL_OK_SECONDS: &str = "walsafe_last_drill_success_timestamp_seconds";
pub const LAST_DRILL_RTO_SECONDS: &str = "walsafe_last_drill_rto_seconds";
pub const LAST_DRILL_RECOVERED_LAG_SECONDS: &str = "walsafe_last_drill_recovered_lag_seconds";
pub const UPLOADS_TOTAL: &str = "walsafe_uploads_total";
pub const UPLOAD_CONFLICTS_TOTAL: &str = "walsafe_upload_conflicts_total";
pub const UPLOAD_REFUSED_TOTAL: &str = "walsafe_upload_refused_total";
pub const UPLOAD_DURATION_SECONDS: &str = "walsafe_upload_duration_seconds";
pub const FSYNC_DURATION_SECONDS: &str = "walsafe_fsync_duration_seconds";
pub const RECONNECTS_TOTAL: &str = "walsafe_reconnects_total";
pub const UPLOAD_BYTES_TOTAL: &str = "walsafe_upload_bytes_total";
pub const SPOOL_BYTES: &str = "walsafe_spool_bytes";
pub const SPOOL_PENDING_SEGMENTS: &str = "walsafe_spool_pending_segments";
pub const SPOOL_FULL: &str = "walsafe_spool_full";
pub const UPLOAD_STALLED: &str = "walsafe_upload_stalled";
pub const REPOSITORY_ARCHIVED_LSN_BYTES: &str = "walsafe_repository_archived_lsn_bytes";
pub const REPOSITORY_ARCHIVE_LAG_BYTES: &str = "walsafe_repository_archive_lag_bytes";
pub const REPOSITORY_ARCHIVE_LAG_SECONDS: &str = "walsafe_repository_archive_lag_seconds";
pub const REPOSITORY_LAST_ARCHIVED: &str = "walsafe_repository_last_archived_timestamp_seconds";
pub const REPOSITORY_PENDING_SEGMENTS: &str = "walsafe_repository_pending_segments";
pub const REPOSITORY_UPLOAD_STALLED: &str = "walsafe_repository_upload_stalled";
pub const STORAGE_REQUESTS_TOTAL: &str = "walsafe_storage_requests_total";
pub const STORAGE_BYTES_TOTAL: &str = "walsafe_storage_bytes_total";

/// The storage operations counted in [`STORAGE_REQUESTS_TOTAL`], as its
/// `op` label. walsafe issues no HEAD today (existence is learnt from a
/// create-only put); the series is there so that a dashboard's sum over
/// `op` stays right if one ever does.
pub const STORAGE_OPS: [&str; 5] = ["put", "get", "list", "delete", "head"];

/// How long the metrics endpoint may take to answer a scrape.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

/// Buckets for fsync latency: 1 ms … 30 s.
const FSYNC_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Buckets for uploads: 5 ms … 60 s.
const UPLOAD_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Installs the Prometheus exporter on `listen` and describes every
/// metric; the per-repository series of `repositories` (their names)
/// start at 0.
pub fn install(listen: SocketAddr, repositories: &[String]) -> anyhow::Result<()> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    PrometheusBuilder::new()
        .with_http_listener(listen)
        .set_buckets_for_metric(Matcher::Full(FSYNC_DURATION_SECONDS.into()), FSYNC_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(UPLOAD_DURATION_SECONDS.into()), UPLOAD_BUCKETS)?
        .install()
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot serve metrics on {listen}: {e}; is another walsafe running? set [metrics] listen to a free address, or \"\" to turn metrics off"
            )
        })?;
    describe();
    // Counters exist from the start at 0, so that rate() and increase()
    // see their first event.
    for kind in [
        Kind::Segment,
        Kind::Chunk,
        Kind::History,
        Kind::ClosedPartial,
    ] {
        for result in ["ok", "error"] {
            for r in repositories {
                counter!(UPLOADS_TOTAL, "kind" => kind.label(), "result" => result, "repository" => r.clone())
                    .absolute(0);
            }
        }
    }
    for r in repositories {
        for c in [UPLOAD_CONFLICTS_TOTAL, UPLOAD_REFUSED_TOTAL] {
            counter!(c, "repository" => r.clone()).absolute(0);
        }
        gauge!(REPOSITORY_UPLOAD_STALLED, "repository" => r.clone()).set(0.0);
    }
    for c in [RECONNECTS_TOTAL, UPLOAD_BYTES_TOTAL] {
        counter!(c).absolute(0);
    }
    gauge!(ARCHIVE_GAPS).set(0.0);
    gauge!(SPOOL_FULL).set(0.0);
    gauge!(UPLOAD_STALLED).set(0.0);
    gauge!(REPLICATION_CONNECTED).set(0.0);
    Ok(())
}

/// Describes every metric (after the recorder is installed).
pub fn describe() {
    describe_gauge!(
        SERVER_LSN_BYTES,
        Unit::Bytes,
        "Latest server WAL end seen (keepalive or XLogData)"
    );
    describe_gauge!(RECEIVED_LSN_BYTES, Unit::Bytes, "End of WAL received");
    describe_gauge!(
        FLUSHED_LSN_BYTES,
        Unit::Bytes,
        "End of WAL fsynced in the spool"
    );
    describe_gauge!(
        ARCHIVED_LSN_BYTES,
        Unit::Bytes,
        "End of WAL contiguously stored in the repository (with several, in the one furthest behind)"
    );
    describe_gauge!(
        ARCHIVE_LAG_BYTES,
        Unit::Bytes,
        "Server WAL end minus archived position (with several repositories, the largest)"
    );
    describe_gauge!(
        ARCHIVE_LAG_SECONDS,
        Unit::Seconds,
        "Age of the oldest WAL not yet stored (0 when caught up): the live RPO (with several repositories, the largest)"
    );
    describe_gauge!(
        REPOSITORY_ARCHIVED_LSN_BYTES,
        Unit::Bytes,
        "End of WAL contiguously stored, by repository (its name)"
    );
    describe_gauge!(
        REPOSITORY_ARCHIVE_LAG_BYTES,
        Unit::Bytes,
        "Server WAL end minus the repository's archived position, by repository"
    );
    describe_gauge!(
        REPOSITORY_ARCHIVE_LAG_SECONDS,
        Unit::Seconds,
        "Age of the oldest WAL not yet stored in the repository (0 when caught up), by repository"
    );
    describe_gauge!(
        REPOSITORY_LAST_ARCHIVED,
        Unit::Seconds,
        "Unix time when the repository last advanced, by repository"
    );
    describe_gauge!(
        REPOSITORY_PENDING_SEGMENTS,
        "Complete segments in the spool not yet stored in the repository, by repository"
    );
    describe_gauge!(
        REPOSITORY_UPLOAD_STALLED,
        "1 while no upload to the repository has succeeded for [archive] stall_alarm although WAL waits for it, by repository"
    );
    describe_gauge!(ARCHIVE_GAPS, "Ranges of WAL known to be missing from the repository (recorded in the spool's walsafe.gaps)");
    describe_gauge!(TIMELINE, "Timeline being streamed");
    describe_gauge!(REPLICATION_CONNECTED, "1 while streaming from PostgreSQL");
    describe_gauge!(
        LAST_ARCHIVED_TIMESTAMP_SECONDS,
        Unit::Seconds,
        "Unix time when the repository last advanced (with several, the one furthest behind)"
    );
    describe_counter!(
        UPLOADS_TOTAL,
        "Uploads by kind (segment, chunk, history, partial), result (ok, error) and repository"
    );
    describe_counter!(
        UPLOAD_CONFLICTS_TOTAL,
        "Uploads refused because different content exists under the same name, by repository"
    );
    describe_counter!(
        UPLOAD_REFUSED_TOTAL,
        "Spooled segments refused because they are not WAL of the repository's cluster (kept in the spool, never uploaded), by repository"
    );
    describe_histogram!(
        UPLOAD_DURATION_SECONDS,
        Unit::Seconds,
        "Duration of one upload, by kind and repository"
    );
    describe_histogram!(
        FSYNC_DURATION_SECONDS,
        Unit::Seconds,
        "Duration of spool fsyncs"
    );
    describe_counter!(RECONNECTS_TOTAL, "Replication reconnects");
    describe_counter!(
        UPLOAD_BYTES_TOTAL,
        Unit::Bytes,
        "Bytes stored in the repository (after compression and encryption)"
    );
    describe_gauge!(
        SPOOL_BYTES,
        Unit::Bytes,
        "Bytes used by the spool directory"
    );
    describe_gauge!(
        UPLOAD_STALLED,
        "1 while no upload has succeeded for [archive] stall_alarm although WAL waits to be stored"
    );
    describe_gauge!(
        SPOOL_FULL,
        "1 while the spool has no room for more WAL (disk full or its limits): walsafe is not reading from PostgreSQL"
    );
    describe_gauge!(
        SPOOL_PENDING_SEGMENTS,
        "Complete segments in the spool not yet stored"
    );
    describe_gauge!(
        LAST_BACKUP_TIMESTAMP_SECONDS,
        "Stop time of the newest complete base backup in the repository (Unix seconds; 0 when there is none), looked up at start, after each walsafe backup, drill or retain on this host, and hourly while WAL is archived"
    );
    describe_gauge!(
        LAST_DRILL_OK_SECONDS,
        "When the newest successful restore drill (walsafe drill) began (Unix seconds; 0 when none passed), looked up like the newest backup"
    );
    describe_gauge!(
        LAST_DRILL_RTO_SECONDS,
        "The newest successful drill's measured RTO: from its start to the end of recovery (0 when none passed)"
    );
    describe_gauge!(
        LAST_DRILL_RECOVERED_LAG_SECONDS,
        "How long before the newest successful drill began its newest recovered commit was (0 when none passed)"
    );
    describe_counter!(
        STORAGE_REQUESTS_TOTAL,
        "Requests sent to object storage, by op (put, get, list, delete, head) and repository (its URL): what the store bills; every attempt counts, retries included, and a listing counts one request per page"
    );
    describe_counter!(
        STORAGE_BYTES_TOTAL,
        Unit::Bytes,
        "Bytes of object bodies sent to storage (direction up: every put attempt) and received from it (down: every object read), by repository (its URL)"
    );
}

/// What one process sent to and received from storage, all repositories
/// together: the agent publishes its last hour in its state file
/// (`walsafe status`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StorageTotals {
    /// Requests per op, in the order of [`STORAGE_OPS`].
    pub requests: [u64; STORAGE_OPS.len()],
    pub bytes_up: u64,
    pub bytes_down: u64,
}

impl StorageTotals {
    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &StorageTotals) -> StorageTotals {
        StorageTotals {
            requests: std::array::from_fn(|i| self.requests[i].saturating_sub(earlier.requests[i])),
            bytes_up: self.bytes_up.saturating_sub(earlier.bytes_up),
            bytes_down: self.bytes_down.saturating_sub(earlier.bytes_down),
        }
    }
}

static TOTAL_REQUESTS: [AtomicU64; STORAGE_OPS.len()] =
    [const { AtomicU64::new(0) }; STORAGE_OPS.len()];
static TOTAL_BYTES_UP: AtomicU64 = AtomicU64::new(0);
static TOTAL_BYTES_DOWN: AtomicU64 = AtomicU64::new(0);

/// This process's storage traffic so far.
pub fn storage_totals() -> StorageTotals {
    StorageTotals {
        requests: std::array::from_fn(|i| TOTAL_REQUESTS[i].load(Ordering::Relaxed)),
        bytes_up: TOTAL_BYTES_UP.load(Ordering::Relaxed),
        bytes_down: TOTAL_BYTES_DOWN.load(Ordering::Relaxed),
    }
}

/// The traffic counters of one repository, registered at 0 when it is
/// opened so that `increase()` sees the first request.
#[derive(Clone)]
pub struct StorageTraffic {
    requests: std::sync::Arc<[metrics::Counter; STORAGE_OPS.len()]>,
    up: metrics::Counter,
    down: metrics::Counter,
}

impl StorageTraffic {
    /// The counters labelled `repository` (the URL as configured).
    pub fn new(repository: &str) -> StorageTraffic {
        let requests = STORAGE_OPS.map(|op| {
            let c = counter!(STORAGE_REQUESTS_TOTAL, "op" => op, "repository" => repository.to_string());
            c.increment(0);
            c
        });
        let bytes = |direction: &'static str| {
            let c = counter!(STORAGE_BYTES_TOTAL, "direction" => direction, "repository" => repository.to_string());
            c.increment(0);
            c
        };
        StorageTraffic {
            requests: std::sync::Arc::new(requests),
            up: bytes("up"),
            down: bytes("down"),
        }
    }

    /// Counts `n` requests of `op` (one of [`STORAGE_OPS`]; others are
    /// not storage requests and are ignored).
    pub fn requests(&self, op: &str, n: u64) {
        if let Some(i) = STORAGE_OPS.iter().position(|o| *o == op) {
            self.requests[i].increment(n);
            TOTAL_REQUESTS[i].fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Counts the body of a request sent.
    pub fn sent(&self, bytes: u64) {
        self.up.increment(bytes);
        TOTAL_BYTES_UP.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Counts the body of an answer received.
    pub fn received(&self, bytes: u64) {
        self.down.increment(bytes);
        TOTAL_BYTES_DOWN.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// Copies the shared positions into their gauges.
pub fn refresh_positions(p: &Positions) {
    // Read downstream first: each position only ever trails the one
    // before it, so one snapshot always shows archived ≤ flushed ≤
    // received ≤ server.
    let archived = p.archived();
    let flushed = p.flushed();
    let received = p.received();
    let server = p.server().max(received);
    gauge!(SERVER_LSN_BYTES).set(server.0 as f64);
    gauge!(RECEIVED_LSN_BYTES).set(received.0 as f64);
    gauge!(FLUSHED_LSN_BYTES).set(flushed.0 as f64);
    gauge!(ARCHIVED_LSN_BYTES).set(archived.0 as f64);
    gauge!(ARCHIVE_LAG_BYTES).set(server.bytes_after(archived) as f64);
    gauge!(ARCHIVE_LAG_SECONDS).set(p.archive_lag_seconds());
    gauge!(TIMELINE).set(f64::from(p.timeline().0));
    gauge!(UPLOAD_STALLED).set(if p.upload_stalled() { 1.0 } else { 0.0 });
    let last = p.last_archived_ms();
    if last > 0 {
        gauge!(LAST_ARCHIVED_TIMESTAMP_SECONDS).set(last as f64 / 1000.0);
    }
    for a in p.archives() {
        let r = || ("repository", a.name().to_string());
        let archived = a.archived();
        gauge!(REPOSITORY_ARCHIVED_LSN_BYTES, &[r()]).set(archived.0 as f64);
        gauge!(REPOSITORY_ARCHIVE_LAG_BYTES, &[r()]).set(server.bytes_after(archived) as f64);
        gauge!(REPOSITORY_ARCHIVE_LAG_SECONDS, &[r()]).set(a.archive_lag_seconds());
        gauge!(REPOSITORY_PENDING_SEGMENTS, &[r()]).set(a.pending_segments() as f64);
        gauge!(REPOSITORY_UPLOAD_STALLED, &[r()]).set(f64::from(u8::from(a.upload_stalled())));
        if a.last_archived_ms() > 0 {
            gauge!(REPOSITORY_LAST_ARCHIVED, &[r()]).set(a.last_archived_ms() as f64 / 1000.0);
        }
    }
}

/// Records one fsync's duration.
pub fn observe_fsync(d: Duration) {
    histogram!(FSYNC_DURATION_SECONDS).record(d.as_secs_f64());
}

/// Records whether the replication connection is streaming.
pub fn set_connected(connected: bool) {
    gauge!(REPLICATION_CONNECTED).set(if connected { 1.0 } else { 0.0 });
}

/// Counts a replication reconnect.
pub fn reconnect() {
    counter!(RECONNECTS_TOTAL).increment(1);
}

/// Counts one upload's result.
pub fn upload_result(kind: Kind, ok: bool, repository: &str) {
    let result = if ok { "ok" } else { "error" };
    counter!(UPLOADS_TOTAL, "kind" => kind.label(), "result" => result, "repository" => repository.to_string())
        .increment(1);
}

/// Records one upload's duration.
pub fn upload_duration(kind: Kind, d: Duration, repository: &str) {
    histogram!(UPLOAD_DURATION_SECONDS, "kind" => kind.label(), "repository" => repository.to_string())
        .record(d.as_secs_f64());
}

/// Number of recorded gaps.
pub fn set_gaps(n: usize) {
    gauge!(ARCHIVE_GAPS).set(n as f64);
}

/// The stop time of the newest complete base backup (Unix seconds; 0 for none).
pub fn set_last_backup(unix_seconds: f64) {
    gauge!(LAST_BACKUP_TIMESTAMP_SECONDS).set(unix_seconds);
}

/// The newest successful drill: when it began (Unix seconds), its RTO
/// and its recovered lag; all 0 when none passed.
pub fn set_last_drill(unix_seconds: f64, rto: f64, lag: f64) {
    gauge!(LAST_DRILL_OK_SECONDS).set(unix_seconds);
    gauge!(LAST_DRILL_RTO_SECONDS).set(rto);
    gauge!(LAST_DRILL_RECOVERED_LAG_SECONDS).set(lag);
}

/// Counts bytes newly stored in the repository.
pub fn upload_bytes(n: u64) {
    counter!(UPLOAD_BYTES_TOTAL).increment(n);
}

/// Spool usage and backlog.
pub fn set_spool(bytes: u64, pending_segments: u64) {
    gauge!(SPOOL_BYTES).set(bytes as f64);
    gauge!(SPOOL_PENDING_SEGMENTS).set(pending_segments as f64);
}

/// Whether the spool is full (the writer waits for room).
pub fn set_spool_full(full: bool) {
    gauge!(SPOOL_FULL).set(if full { 1.0 } else { 0.0 });
}

/// Counts a spooled segment refused as another cluster's WAL.
pub fn refused(repository: &str) {
    counter!(UPLOAD_REFUSED_TOTAL, "repository" => repository.to_string()).increment(1);
}

/// Counts a create-only conflict (different content under the same name).
pub fn conflict(repository: &str) {
    counter!(UPLOAD_CONFLICTS_TOTAL, "repository" => repository.to_string()).increment(1);
}

/// What a running agent's metrics endpoint says about its positions (for
/// `walsafe status` and `walsafe check`, which may run where the state file
/// cannot be read).
#[derive(Debug, Clone, PartialEq)]
pub struct Scraped {
    pub connected: bool,
    pub timeline: u32,
    pub server: Lsn,
    pub received: Lsn,
    pub flushed: Lsn,
    pub archived: Lsn,
    pub lag_bytes: u64,
    pub lag_seconds: f64,
    /// When the repository last advanced (unix ms), if it ever did.
    pub last_archived_ms: Option<u64>,
}

/// Scrapes `http://addr/metrics`, an agent's own endpoint on this machine:
/// straight to it, never through a proxy from the environment.
pub async fn scrape(addr: SocketAddr) -> anyhow::Result<Scraped> {
    let addr = if addr.ip().is_unspecified() {
        SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port())
    } else {
        addr
    };
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .context("cannot set up an HTTP client to scrape the metrics endpoint")?;
    let body = tokio::time::timeout(SCRAPE_TIMEOUT, async {
        client
            .get(format!("http://{addr}/metrics"))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await
    })
    .await
    .with_context(|| format!("metrics endpoint {addr} did not answer"))?
    .with_context(|| format!("cannot scrape the metrics endpoint {addr}"))?;
    parse_exposition(&body).with_context(|| format!("metrics endpoint {addr}"))
}

/// Reads walsafe's gauges from a Prometheus text exposition.
pub fn parse_exposition(text: &str) -> anyhow::Result<Scraped> {
    let get = |name: &str| -> Option<f64> {
        text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            (k == name).then(|| v.trim().parse().ok()).flatten()
        })
    };
    let lsn = |name: &str| Lsn(get(name).unwrap_or(0.0) as u64);
    let flushed = get(FLUSHED_LSN_BYTES).ok_or_else(|| {
        anyhow::anyhow!("no {FLUSHED_LSN_BYTES} gauge: is this walsafe's metrics endpoint?")
    })?;
    Ok(Scraped {
        connected: get(REPLICATION_CONNECTED) == Some(1.0),
        timeline: get(TIMELINE).unwrap_or(0.0) as u32,
        server: lsn(SERVER_LSN_BYTES),
        received: lsn(RECEIVED_LSN_BYTES),
        flushed: Lsn(flushed as u64),
        archived: lsn(ARCHIVED_LSN_BYTES),
        lag_bytes: get(ARCHIVE_LAG_BYTES).unwrap_or(0.0) as u64,
        lag_seconds: get(ARCHIVE_LAG_SECONDS).unwrap_or(0.0),
        last_archived_ms: get(LAST_ARCHIVED_TIMESTAMP_SECONDS)
            .filter(|s| *s > 0.0)
            .map(|s| (s * 1000.0) as u64),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_text_is_parsed() {
        let text = "# HELP walsafe_flushed_lsn_bytes x\n\
                    # TYPE walsafe_flushed_lsn_bytes gauge\n\
                    walsafe_flushed_lsn_bytes 83886080\n\
                    walsafe_server_lsn_bytes 83886080\n\
                    walsafe_received_lsn_bytes 83886080\n\
                    walsafe_archived_lsn_bytes 83882000\n\
                    walsafe_archive_lag_bytes 4080\n\
                    walsafe_archive_lag_seconds 0.25\n\
                    walsafe_timeline 2\n\
                    walsafe_replication_connected 1\n\
                    walsafe_last_archived_timestamp_seconds 1763718000.5\n\
                    walsafe_uploads_total{kind=\"chunk\",result=\"ok\"} 7\n";
        let s = parse_exposition(text).unwrap();
        assert_eq!(s.flushed.to_string(), "0/5000000");
        assert_eq!(s.archived, Lsn(83882000));
        assert_eq!(s.timeline, 2);
        assert!(s.connected);
        assert_eq!(s.lag_bytes, 4080);
        assert_eq!(s.last_archived_ms, Some(1763718000500));
        assert!(parse_exposition("something_else 1\n").is_err());
    }

    /// A one-shot endpoint on loopback that answers `response` (or nothing).
    async fn endpoint(response: Option<&'static str>) -> SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 1024];
            let _ = s.read(&mut request).await;
            match response {
                Some(r) => s.write_all(r.as_bytes()).await.unwrap(),
                None => tokio::time::sleep(SCRAPE_TIMEOUT * 2).await,
            }
        });
        addr
    }

    #[tokio::test]
    async fn scrape_reads_the_endpoint_and_explains_failures() {
        let addr = endpoint(Some(
            "HTTP/1.1 200 OK\r\nContent-Length: 28\r\nConnection: close\r\n\r\n\
             walsafe_flushed_lsn_bytes 7\n",
        ))
        .await;
        assert_eq!(scrape(addr).await.unwrap().flushed, Lsn(7));

        let addr = endpoint(Some(
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        ))
        .await;
        let e = format!("{:#}", scrape(addr).await.unwrap_err());
        assert!(
            e.contains("cannot scrape the metrics endpoint") && e.contains("404"),
            "{e}"
        );

        let addr = endpoint(None).await;
        let e = format!("{:#}", scrape(addr).await.unwrap_err());
        assert!(e.contains("did not answer"), "{e}");
    }
}
