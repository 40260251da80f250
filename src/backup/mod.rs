//! backup: `walsafe backup`, a base backup over the replication protocol,
//! straight into the repository beside the WAL.
//!
//! ```text
//! PostgreSQL ──BASE_BACKUP──▶ events ──▶ part buffer (PART_SIZE) ──▶ envelope, PUT, BLAKE3 of what was stored
//!                              (archive, data, manifest)     ▲            (UPLOADS_IN_FLIGHT at once)
//!                                                            └── the socket is not read while
//!                                                                every upload slot is taken
//! then: WAL from start to stop in the repository (waited for) ──▶ backups/<name>/backup.json
//! ```
//!
//! # Invariants
//!
//! * **Bounded memory, no local copy.** The stream goes through a buffer of
//!   [`PART_SIZE`] bytes per archive; each full buffer becomes one part
//!   object, uploaded while the next fills, at most [`UPLOADS_IN_FLIGHT`]
//!   at once. When they are all busy the socket is left unread
//!   (backpressure, as in the WAL path). Nothing is written to local disk.
//! * **The record is written last**, after every part is stored and the
//!   WAL the backup needs (its start to its stop, see
//!   [`BackupRecord::wal_segments`]) is in the repository. A backup without
//!   its record is incomplete: `backup-list` flags it, no restore uses it,
//!   and the next backup removes it once a newer complete one exists.
//! * **Same guarantees as WAL.** Parts and record are enveloped objects
//!   (zstd, AES-256-GCM with the object name bound in, or a SHA-256
//!   trailer), written create-only; the repository is pinned to the
//!   cluster before the first byte, so a stranger's backup is refused like
//!   its WAL.
//! * **Tar archives end properly.** The server omits tar's two trailing
//!   zero blocks; each tablespace archive is stored with them, so a part
//!   sequence is a complete tar file (`cat` the parts, `tar x`).

pub mod record;
pub mod verify;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::config::Config;
use crate::pg::replication::{BackupEvent, BaseBackupOptions, ReplMessage, ReplicationConnection};
use crate::pg::{Lsn, SegmentName};
use crate::repository::{chunks, ObjectName, Repository, SegmentFile};
use record::{ArchiveRecord, BackupRecord, PartRecord, MANIFEST_ARCHIVE, RECORD_FORMAT};

/// Plaintext bytes per part object.
pub const PART_SIZE: usize = 8 << 20;
/// Part uploads at once (each holds one part and its encoded object).
pub const UPLOADS_IN_FLIGHT: usize = 2;
/// How often the repository is looked at while waiting for the WAL: soon
/// at first (the agent stores the stop segment within a few hundred
/// milliseconds), then less often, so that a long wait does not turn
/// into a stream of listings.
const WAL_POLL_FIRST: Duration = Duration::from_millis(100);
const WAL_POLL_MAX: Duration = Duration::from_secs(2);
/// tar's end of archive: two zero blocks.
const TAR_END: [u8; 1024] = [0; 1024];

/// How `walsafe backup` was asked to run.
#[derive(Debug, Clone)]
pub struct BackupArgs {
    pub label: Option<String>,
    pub fast_checkpoint: bool,
    /// The server's send limit, bytes per second.
    pub max_rate: Option<u64>,
    /// How long to wait for the WAL the backup needs to be archived.
    pub wal_timeout: Duration,
}

/// Progress, for a bar or log lines: bytes received, and the estimate.
pub trait Progress: Send {
    fn update(&mut self, done: u64, total: Option<u64>);
    /// A phase begins ("waiting for WAL", "writing the record").
    fn phase(&mut self, what: &str);
}

/// An archive being received.
struct Current {
    index: usize,
    buf: Vec<u8>,
    next_part: u32,
    tar: bool,
}

/// Part buffers given back by finished uploads, reused so that every part
/// does not cost a fresh 8 MiB mapping (page faults and the kernel's
/// zeroing were 5% of a backup's CPU).
#[derive(Clone, Default)]
struct Buffers(Arc<std::sync::Mutex<Vec<Vec<u8>>>>);

impl Buffers {
    fn take(&self) -> Vec<u8> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(PART_SIZE))
    }

    /// Takes back the buffer of `part` if nothing else holds it.
    fn give_back(&self, part: Bytes) {
        if let Ok(m) = part.try_into_mut() {
            let mut v: Vec<u8> = m.into();
            if v.capacity() >= PART_SIZE {
                v.clear();
                let mut pool = self.0.lock().unwrap_or_else(|e| e.into_inner());
                if pool.len() <= UPLOADS_IN_FLIGHT {
                    pool.push(v);
                }
            }
        }
    }
}

/// Where parts go: the repository, the backup, the upload slots.
struct Parts<'a> {
    repo: &'a Repository,
    backup: &'a str,
    slots: Arc<Semaphore>,
    uploads: JoinSet<anyhow::Result<(usize, PartRecord)>>,
    buffers: Buffers,
}

/// The lock one backup of a configuration holds while it runs.
pub const LOCK_FILE: &str = "backup.lock";

/// Takes the backup lock (`<spool dir>/backup.lock`): one backup at a
/// time per configuration. Two at once would each see the other as an
/// incomplete backup, and the cleanup (here and in `walsafe retain`)
/// removes an incomplete backup older than a complete one: the earlier
/// backup would lose its parts to the later.
fn lock(cfg: &Config) -> anyhow::Result<std::fs::File> {
    let dir = &cfg.spool.dir;
    if !dir.is_dir() {
        cfg.fsync
            .create_dir_all(dir)
            .with_context(|| format!("cannot create the spool directory {}", dir.display()))?;
        // Run as root before the agent ever ran: the spool belongs to whoever
        // owns its parent (postgres, under /var/lib/walsafe), not to root.
        if nix::unistd::geteuid().is_root() {
            use std::os::unix::fs::MetadataExt;
            if let Some(parent) = dir.parent().and_then(|p| std::fs::metadata(p).ok()) {
                nix::unistd::chown(
                    dir,
                    Some(nix::unistd::Uid::from_raw(parent.uid())),
                    Some(nix::unistd::Gid::from_raw(parent.gid())),
                )?;
            }
        }
    }
    let path = dir.join(LOCK_FILE);
    // Opened for reading (a lock needs no more), so that a lock file
    // created by root does not lock postgres out later; created, it is
    // given to the spool's owner.
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            if nix::unistd::geteuid().is_root() {
                use std::os::unix::fs::MetadataExt;
                let owner = std::fs::metadata(dir)?;
                nix::unistd::chown(
                    &path,
                    Some(nix::unistd::Uid::from_raw(owner.uid())),
                    Some(nix::unistd::Gid::from_raw(owner.gid())),
                )?;
            }
            f
        }
        Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
    };
    if !fs4::fs_std::FileExt::try_lock_exclusive(&file)? {
        bail!(
            "another walsafe backup with this configuration is running (it holds {}); wait for it to end, or stop it (systemctl stop walsafe-backup)",
            path.display()
        );
    }
    Ok(file)
}

/// Takes a base backup into the repository; returns its record (stored).
pub async fn take(
    cfg: &Config,
    args: &BackupArgs,
    progress: &mut dyn Progress,
) -> anyhow::Result<BackupRecord> {
    let _lock = lock(cfg)?;
    let repo = Repository::open(cfg.repository())
        .with_context(|| format!("cannot open the repository {}", cfg.repository().url))?;
    let app = format!("{}-backup", cfg.postgres.application_name);
    let mut conn = ReplicationConnection::connect(&cfg.postgres.conninfo, &app)
        .await
        .context("cannot connect to PostgreSQL for the base backup")?;
    let server = conn.identify_system().await?;
    let identity = server.identity;
    // Pinned before the first byte: another cluster's repository is refused.
    repo.pin(&identity).await?;
    remove_incomplete(&repo).await?;

    let name = unused_name(&repo).await?;
    let label = args
        .label
        .clone()
        .unwrap_or_else(|| format!("walsafe backup {name}"));
    let start_time = now();
    let opts = BaseBackupOptions {
        label: label.clone(),
        fast_checkpoint: args.fast_checkpoint,
        max_rate_kib: args
            .max_rate
            .map(|r| (r / 1024).clamp(32, 1_048_576) as u32),
    };
    info!(backup = %name, "base backup starting (checkpoint {})", if args.fast_checkpoint { "fast" } else { "spread" });
    let mut bb = conn.base_backup(&opts).await?;
    let (start_lsn, start_timeline) = bb.start();
    let total: Option<u64> = bb.tablespaces().iter().map(|t| t.size).sum();
    let tablespaces = bb.tablespaces().to_vec();

    let mut parts = Parts {
        repo: &repo,
        backup: &name,
        slots: Arc::new(Semaphore::new(UPLOADS_IN_FLIGHT)),
        uploads: JoinSet::new(),
        buffers: Buffers::default(),
    };
    let mut archives: Vec<ArchiveRecord> = Vec::new();
    let mut current: Option<Current> = None;
    let mut received = 0u64;
    let mut server_progress = None;
    // The start of base.tar, whose first entry is backup_label.
    let mut label_head: Vec<u8> = Vec::new();
    loop {
        let event = bb.next().await?;
        match event {
            Some(BackupEvent::Data(d)) => {
                let Some(c) = current.as_mut() else {
                    bail!("the server sent backup data before naming its archive");
                };
                received += d.len() as u64;
                if archives[c.index].name == "base.tar" && label_head.len() < LABEL_HEAD {
                    let n = (LABEL_HEAD - label_head.len()).min(d.len());
                    label_head.extend_from_slice(&d[..n]);
                }
                archives[c.index].size += d.len() as u64;
                parts.append(&archives[c.index].name, c, &d).await?;
                if server_progress.is_none() {
                    progress.update(received, total);
                }
            }
            Some(BackupEvent::Progress(p)) => {
                server_progress = Some(p);
                progress.update(p, total);
            }
            Some(e @ (BackupEvent::Archive { .. } | BackupEvent::Manifest)) => {
                if let Some(mut c) = current.take() {
                    parts.finish(&mut archives, &mut c).await?;
                }
                let (archive, location, tar) = match e {
                    BackupEvent::Archive { name, location } => (name, location, true),
                    _ => (MANIFEST_ARCHIVE.to_string(), None, false),
                };
                let oid = tablespaces
                    .iter()
                    .find(|t| t.location.is_some() && t.location == location)
                    .and_then(|t| t.oid);
                archives.push(ArchiveRecord {
                    name: archive,
                    oid,
                    location,
                    size: 0,
                    parts: Vec::new(),
                });
                current = Some(Current {
                    index: archives.len() - 1,
                    buf: parts.buffers.take(),
                    next_part: 0,
                    tar,
                });
            }
            None => break,
        }
        // Reap finished uploads as they come, so that a failure stops the
        // backup at once.
        while let Some(done) = parts.uploads.try_join_next() {
            let (i, part) = done??;
            archives[i].parts.push(part);
        }
    }
    if let Some(mut c) = current.take() {
        parts.finish(&mut archives, &mut c).await?;
    }
    while let Some(done) = parts.uploads.join_next().await {
        let (i, part) = done??;
        archives[i].parts.push(part);
    }
    let (stop_lsn, stop_timeline) = bb.end().ok_or_else(|| anyhow!("no stop position"))?;
    bb.into_connection().close().await;
    if !archives.iter().any(|a| a.name == MANIFEST_ARCHIVE) {
        bail!("the server sent no backup manifest");
    }
    progress.update(received, Some(received));

    let mut record = BackupRecord {
        format: RECORD_FORMAT,
        name: name.clone(),
        label,
        system_identifier: identity.system_identifier,
        pg_version_num: identity.pg_version_num,
        segment_size: identity.segment_size,
        start_lsn,
        start_timeline,
        stop_lsn,
        stop_timeline,
        start_time,
        stop_time: now(),
        wal_first: String::new(),
        wal_last: String::new(),
        backup_history: None,
        archives,
        size: 0,
        stored_size: 0,
    };
    let segments = record.wal_segments();
    record.wal_first = segments[0].file_name(identity.segment_size);
    record.wal_last = segments[segments.len() - 1].file_name(identity.segment_size);

    let agent_live = crate::state::read(&cfg.spool.dir).is_some_and(|s| s.is_live());
    if agent_live {
        progress.phase("waiting for the agent to archive the WAL the backup needs");
    } else if !missing_wal(&repo, &record).await?.is_empty() {
        // Nobody archives this cluster here: the backup ships its own WAL.
        progress.phase("no agent running: storing the WAL the backup needs itself");
        tokio::time::timeout(args.wal_timeout, ship_wal(cfg, &repo, &record))
            .await
            .map_err(|_| {
                anyhow!(
                    "storing the backup's WAL took longer than --wal-timeout {}",
                    crate::report::human_age(args.wal_timeout.as_secs_f64())
                )
            })??;
    }
    wait_for_wal(cfg, &repo, &record, args.wal_timeout).await?;

    // The backup history file, as PostgreSQL writes it beside the WAL
    // (archive_command would have stored the server's own: kept if there).
    match backup_history(&label_head, &record) {
        Some((file, content)) => {
            let n = ObjectName::BackupHistory(file.clone());
            if repo.get(&n).await?.is_none() {
                repo.put(&n, Bytes::from(content)).await?;
            }
            record.backup_history = Some(file);
        }
        None => warn!("base.tar does not start with backup_label: no backup history file stored"),
    }

    for a in &mut record.archives {
        a.parts.sort_by_key(|p| p.index);
    }
    record.size = record.archives.iter().map(|a| a.size).sum();
    record.stored_size = record
        .archives
        .iter()
        .flat_map(|a| &a.parts)
        .map(|p| p.stored_size)
        .sum();
    progress.phase("writing the backup record");
    repo.put(
        &ObjectName::backup_record(&name)?,
        Bytes::from(record.to_json()),
    )
    .await?;
    Ok(record)
}

/// Bytes of base.tar kept to read backup_label from (its first entry).
const LABEL_HEAD: usize = 8192;

/// The backup history file (`<start segment>.<offset>.backup`) of
/// `record`, built as PostgreSQL builds it at the end of a backup: the
/// `backup_label` (first entry of base.tar, in `head`) with the stop
/// location after the start location and the stop time and timeline at
/// the end. The stop time is walsafe's clock, in UTC.
fn backup_history(head: &[u8], record: &BackupRecord) -> Option<(String, Vec<u8>)> {
    use std::io::Read;
    let mut tar = tar::Archive::new(head);
    let mut first = tar.entries().ok()?.next()?.ok()?;
    if first.path().ok()?.as_os_str() != "backup_label" {
        return None;
    }
    let mut label = String::new();
    first.read_to_string(&mut label).ok()?;
    let size_of_seg = record.segment_size;
    let start_seg = SegmentName::containing(record.start_timeline, record.start_lsn, size_of_seg);
    let stop_seg = SegmentName::containing(record.stop_timeline, record.stop_lsn, size_of_seg);
    let mut out = String::new();
    for (i, line) in label.lines().enumerate() {
        out.push_str(line);
        out.push('\n');
        if i == 0 {
            out.push_str(&format!(
                "STOP WAL LOCATION: {} (file {})\n",
                record.stop_lsn,
                stop_seg.file_name(size_of_seg)
            ));
        }
    }
    let stop_time = chrono::DateTime::parse_from_rfc3339(&record.stop_time)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|_| record.stop_time.clone());
    out.push_str(&format!(
        "STOP TIME: {stop_time}\nSTOP TIMELINE: {}\n",
        record.stop_timeline.0
    ));
    let file = format!(
        "{}.{:08X}.backup",
        start_seg.file_name(size_of_seg),
        record.start_lsn.segment_offset(size_of_seg)
    );
    Some((file, out.into_bytes()))
}

impl Parts<'_> {
    /// Appends `data` to the current archive, uploading each full part.
    async fn append(
        &mut self,
        archive: &str,
        c: &mut Current,
        mut data: &[u8],
    ) -> anyhow::Result<()> {
        while !data.is_empty() {
            let n = (PART_SIZE - c.buf.len()).min(data.len());
            c.buf.extend_from_slice(&data[..n]);
            data = &data[n..];
            if c.buf.len() == PART_SIZE {
                let full = std::mem::replace(&mut c.buf, self.buffers.take());
                self.upload(archive, c, Bytes::from(full)).await?;
            }
        }
        Ok(())
    }

    /// Ends an archive: tar's end blocks, then the last (short) part.
    async fn finish(
        &mut self,
        archives: &mut [ArchiveRecord],
        c: &mut Current,
    ) -> anyhow::Result<()> {
        let archive = archives[c.index].name.clone();
        if c.tar {
            self.append(&archive, c, &TAR_END).await?;
            archives[c.index].size += TAR_END.len() as u64;
        }
        if !c.buf.is_empty() {
            let last = std::mem::take(&mut c.buf);
            self.upload(&archive, c, Bytes::from(last)).await?;
        }
        Ok(())
    }

    /// Starts the upload of one part (waiting for a slot: backpressure).
    async fn upload(&mut self, archive: &str, c: &mut Current, part: Bytes) -> anyhow::Result<()> {
        let permit = self.slots.clone().acquire_owned().await?;
        let name = ObjectName::backup_part(self.backup, archive, c.next_part)?;
        let index = c.next_part;
        c.next_part += 1;
        let (repo, i, buffers) = (self.repo.clone(), c.index, self.buffers.clone());
        self.uploads.spawn(async move {
            let size = part.len() as u64;
            let (stored_size, stored_blake3) = repo
                .put_digest(&name, part.clone())
                .await
                .with_context(|| format!("cannot store {name}"))?;
            buffers.give_back(part);
            drop(permit);
            Ok((
                i,
                PartRecord {
                    index,
                    size,
                    stored_size,
                    stored_blake3,
                    also: Vec::new(),
                },
            ))
        });
        Ok(())
    }
}

/// Streams the WAL from the backup's start segment to its stop position
/// from the server (no slot: the backup has just ended, so the server
/// still has it) and stores every segment `record` needs that the
/// repository lacks, each validated page by page first; the timeline's
/// history file goes first (rule 7). The stored objects are the same the
/// agent would store, so an agent started later finds them already there.
async fn ship_wal(cfg: &Config, repo: &Repository, record: &BackupRecord) -> anyhow::Result<()> {
    let size = record.segment_size;
    let identity =
        crate::pg::ClusterIdentity::new(record.system_identifier, record.pg_version_num, size);
    let app = format!("{}-backup", cfg.postgres.application_name);
    let mut conn = ReplicationConnection::connect(&cfg.postgres.conninfo, &app).await?;
    let tli = record.stop_timeline;
    if tli.0 > 1 {
        let name = ObjectName::History(tli);
        if repo.get(&name).await?.is_none() {
            let (_, content) = conn.timeline_history(tli).await?;
            repo.put(&name, content).await?;
        }
    }
    let needed = missing_wal(repo, record).await?;
    let segments = record.wal_segments();
    let first = segments[0];
    let last = segments[segments.len() - 1];
    let mut stream = conn
        .start_replication(None, first.start_lsn(size), tli)
        .await
        .with_context(|| {
            format!(
                "cannot stream the backup's WAL from {}",
                first.start_lsn(size)
            )
        })?;
    let mut seg = first;
    let mut buf: Vec<u8> = Vec::with_capacity(size as usize);
    loop {
        let msg = stream.next_message().await?;
        let (start, data) = match msg {
            ReplMessage::XLogData { start, data, .. } => (start, data),
            ReplMessage::Keepalive {
                reply_requested: true,
                server_end,
            } => {
                stream
                    .send_status(server_end, Lsn(0), Lsn(0), false)
                    .await?;
                continue;
            }
            ReplMessage::Keepalive { .. } => continue,
            other => bail!(
                "the server ended the stream ({other:?}) before the backup's WAL up to {} was received",
                record.stop_lsn
            ),
        };
        let expected = seg.start_lsn(size).plus(buf.len() as u64);
        if start != expected {
            bail!("the server sent WAL from {start}, expected {expected}");
        }
        let mut data = &data[..];
        while !data.is_empty() {
            let room = (size as usize) - buf.len();
            let n = room.min(data.len());
            buf.extend_from_slice(&data[..n]);
            data = &data[n..];
            if buf.len() as u64 == size {
                let name = seg.file_name(size);
                if needed.contains(&name) {
                    let whole = std::mem::replace(&mut buf, Vec::with_capacity(size as usize));
                    let ident = identity;
                    let whole = tokio::task::spawn_blocking(move || {
                        crate::pg::page::validate_segment(&ident, seg, &whole).map(|()| whole)
                    })
                    .await?
                    .with_context(|| {
                        format!("the server's {name} is not valid WAL of this cluster")
                    })?;
                    repo.put_wal(&name, Bytes::from(whole)).await?;
                    info!("stored {name} for the backup");
                } else {
                    buf.clear();
                }
                if seg == last {
                    let _ = stream.stop().await;
                    return Ok(());
                }
                seg = seg.next();
            }
        }
        // A backup of a standby does not switch segments: its stop segment
        // may never fill. What the backup needs of it is there once the
        // stream passed the stop position: store it as chunks.
        if seg == last && seg.start_lsn(size).plus(buf.len() as u64) >= record.stop_lsn {
            let name = seg.file_name(size);
            if needed.contains(&name) {
                let part = std::mem::take(&mut buf);
                let ident = identity;
                let part = tokio::task::spawn_blocking(move || {
                    // Validated as the segment it starts: zeros after it
                    // read as the end of WAL.
                    let mut padded = part.clone();
                    padded.resize(size as usize, 0);
                    crate::pg::page::validate_segment(&ident, seg, &padded).map(|()| part)
                })
                .await?
                .with_context(|| format!("the server's {name} is not valid WAL of this cluster"))?;
                repo.put_chunk(&SegmentFile::of(seg, size), 0, Bytes::from(part))
                    .await?;
                info!(
                    "stored {name} up to {} as a chunk for the backup",
                    record.stop_lsn
                );
            }
            let _ = stream.stop().await;
            return Ok(());
        }
    }
}

/// Waits until every segment `record` needs is in the repository (whole,
/// or as chunks reaching the stop position), at most `timeout`.
async fn wait_for_wal(
    cfg: &Config,
    repo: &Repository,
    record: &BackupRecord,
    timeout: Duration,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut poll = WAL_POLL_FIRST;
    loop {
        let missing = missing_wal(repo, record).await?;
        if missing.is_empty() {
            return Ok(());
        }
        if started.elapsed() >= timeout {
            let agent = match crate::state::read(&cfg.spool.dir).filter(|s| s.is_live()) {
                Some(s) => format!("the walsafe agent (pid {}) is running but has not archived them: see `walsafe status`", s.pid),
                None => format!("no walsafe agent is running for {} (start `walsafe run`, or set archive_command to `walsafe wal-push %p`)", cfg.path.display()),
            };
            bail!(
                "the backup's WAL is not in the repository after {}: missing {}; {agent}. The backup is incomplete (no record written) and will not be used for a restore",
                crate::report::human_age(timeout.as_secs_f64()),
                missing.join(", ")
            );
        }
        tokio::time::sleep(poll).await;
        poll = (poll * 2).min(WAL_POLL_MAX);
    }
}

/// The segments of `record` not (yet) in the repository, by name.
pub async fn missing_wal(repo: &Repository, record: &BackupRecord) -> anyhow::Result<Vec<String>> {
    let size = record.segment_size;
    let stored: std::collections::BTreeSet<ObjectName> =
        repo.list_wal().await?.into_iter().collect();
    let mut missing = Vec::new();
    for seg in record.wal_segments() {
        let file = SegmentFile::of(seg, size);
        if stored.contains(&ObjectName::Segment(file.clone())) {
            continue;
        }
        // The stop segment may still be filling (a backup of a standby
        // does not switch segments): its chunks must reach the stop point.
        let needed = if seg.end_lsn(size) > record.stop_lsn {
            record.stop_lsn.segment_offset(size)
        } else {
            size
        };
        let covered = chunks::plan(&repo.list_chunks(&file).await?)
            .ok()
            .and_then(|p| p.last().map(|r| r.1))
            .unwrap_or(0);
        let partial = stored.contains(&ObjectName::ClosedPartial(file.clone()));
        if covered < needed && !(partial && needed < size) {
            missing.push(file.to_string());
        }
    }
    Ok(missing)
}

/// A backup name from the clock (UTC, to the second), unused in the repository.
async fn unused_name(repo: &Repository) -> anyhow::Result<String> {
    loop {
        let name = chrono::Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
        if repo.list_backup_objects(Some(&name)).await?.is_empty() {
            return Ok(name);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Now, to the millisecond: a restore to a time decides by these whether
/// a backup ended before its target.
fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Removes the parts of incomplete backups (no record) older than the
/// newest complete one: they were interrupted (a running backup started
/// after the newest complete one is never touched).
async fn remove_incomplete(repo: &Repository) -> anyhow::Result<()> {
    let objects = repo.list_backup_objects(None).await?;
    let complete: Vec<&String> = objects
        .iter()
        .filter_map(|(n, _)| match n {
            ObjectName::BackupRecord(b) => Some(b),
            _ => None,
        })
        .collect();
    let Some(newest) = complete.iter().max() else {
        return Ok(());
    };
    for (n, _) in &objects {
        if let ObjectName::BackupPart { backup, .. } = n {
            if backup < *newest && !complete.contains(&backup) {
                warn!("removing {n}: part of an incomplete backup older than the complete backup {newest}");
                repo.delete(n).await?;
            }
        }
    }
    Ok(())
}

/// The stop time of the newest complete backup, Unix seconds (`None`
/// when there is none).
pub async fn newest_stop_time(repo: &Repository) -> anyhow::Result<Option<f64>> {
    let Some(r) = newest_complete(repo).await? else {
        return Ok(None);
    };
    let t = chrono::DateTime::parse_from_rfc3339(&r.stop_time)
        .map_err(|e| anyhow!("backup {}: stop_time {:?}: {e}", r.name, r.stop_time))?;
    Ok(Some(t.timestamp() as f64))
}

/// Sets `walsafe_last_backup_timestamp_seconds` from the repository (0
/// until a complete backup exists); a failed look-up is logged and leaves
/// the gauge as it was.
pub async fn refresh_metric(repo: &Repository) {
    match newest_stop_time(repo).await {
        Ok(t) => crate::metrics::set_last_backup(t.unwrap_or(0.0)),
        Err(e) => warn!(
            "cannot look up the newest base backup: {}",
            crate::report::error_line(&e)
        ),
    }
}

/// Every backup in the repository, newest first: its record, or `None`
/// for an incomplete one (parts without a record), with its parts' count
/// and stored bytes.
pub async fn list(
    repo: &Repository,
) -> anyhow::Result<Vec<(String, Option<BackupRecord>, usize, u64)>> {
    let objects = repo.list_backup_objects(None).await?;
    let mut by_name: std::collections::BTreeMap<String, (bool, usize, u64)> = Default::default();
    for (n, size) in &objects {
        match n {
            ObjectName::BackupRecord(b) => by_name.entry(b.clone()).or_default().0 = true,
            ObjectName::BackupPart { backup, .. } => {
                let e = by_name.entry(backup.clone()).or_default();
                e.1 += 1;
                e.2 += size;
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    for (name, (has_record, parts, stored)) in by_name.into_iter().rev() {
        let record = if has_record {
            Some(read_record(repo, &name).await?)
        } else {
            None
        };
        out.push((name, record, parts, stored));
    }
    Ok(out)
}

/// The record of backup `name`, verified and parsed.
pub async fn read_record(repo: &Repository, name: &str) -> anyhow::Result<BackupRecord> {
    find_record(repo, name)
        .await?
        .ok_or_else(|| anyhow!("backup {name} has no record: it is incomplete"))
}

/// The record of backup `name`, verified and parsed; `None` when it has
/// none (incomplete, or no such backup).
pub async fn find_record(repo: &Repository, name: &str) -> anyhow::Result<Option<BackupRecord>> {
    let n = ObjectName::backup_record(name)?;
    match repo.get(&n).await? {
        None => Ok(None),
        Some(bytes) => BackupRecord::parse(&bytes)
            .map(Some)
            .map_err(|e| anyhow!("{n}: {e}")),
    }
}

/// The newest complete backup's record (backup names sort by time);
/// `None` when there is none. Reads one record, not all of them.
pub async fn newest_complete(repo: &Repository) -> anyhow::Result<Option<BackupRecord>> {
    let newest = repo
        .list_backup_objects(None)
        .await?
        .into_iter()
        .filter_map(|(n, _)| match n {
            ObjectName::BackupRecord(b) => Some(b),
            _ => None,
        })
        .max();
    match newest {
        Some(name) => find_record(repo, &name).await,
        None => Ok(None),
    }
}
