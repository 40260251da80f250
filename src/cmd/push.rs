//! push: `walsafe wal-push PATH`, PostgreSQL's `archive_command`.
//!
//! Writes the same objects as the streaming agent, so the two can be used
//! together: a segment the stream already stored is found with identical
//! content and the push succeeds; different content under the same name is
//! refused (rule 3 of README's Guarantees) and archive_command fails, which PostgreSQL
//! retries and logs, keeping the file in pg_wal.
//!
//! A segment is validated page by page before upload (rule 5 of README's Guarantees): its
//! long header must carry the repository's system identifier. The first
//! push into an empty repository pins it to the segment's cluster.
//! History files, `.partial` segments and backup history files
//! (`<segment>.<offset>.backup`) are stored as they are.

use std::path::Path;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use tracing::info;

use crate::config::Config;
use crate::pg::page::{pg_major_of_magic, read_long_header, validate_segment};
use crate::pg::walfile::{classify, NameKind};
use crate::pg::{ClusterIdentity, SegmentName};
use crate::repository::{PutOutcome, Repository};

/// Is `name` a backup history file (`000000010000000000000002.00000028.backup`)?
fn is_backup_history(name: &str) -> bool {
    let b = name.as_bytes();
    name.len() == 40
        && name.ends_with(".backup")
        && b[24] == b'.'
        && b[..24].iter().chain(&b[25..33]).all(u8::is_ascii_hexdigit)
}

/// Stores the WAL file at `path` in the repository.
pub async fn wal_push(cfg: &Config, path: &Path) -> anyhow::Result<()> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| anyhow!("{} has no file name", path.display()))?
        .to_string();
    let kind = classify(&name);
    if kind.is_none() && !is_backup_history(&name) {
        bail!("{name} is not a WAL file name; archive_command must pass %p");
    }
    let data = tokio::fs::read(path)
        .await
        .with_context(|| format!("cannot read {}", path.display()))?;
    let repo = Repository::open(&cfg.repository)
        .with_context(|| format!("cannot open the repository {}", cfg.repository.url))?;
    if matches!(kind, Some(NameKind::Segment | NameKind::Partial)) {
        let header = read_long_header(&data)
            .with_context(|| format!("{name} does not start with a WAL segment header"))?;
        let major = pg_major_of_magic(header.magic).ok_or_else(|| {
            anyhow!(
                "{name} has WAL page magic {:#06X}, not of a PostgreSQL version walsafe knows",
                header.magic
            )
        })?;
        let descriptor = repo
            .pin(&ClusterIdentity::new(
                header.system_identifier,
                major * 10000,
                u64::from(header.segment_size),
            ))
            .await?;
        let ident = descriptor.identity();
        let seg = SegmentName::parse(&name[..24], descriptor.segment_size)
            .ok_or_else(|| anyhow!("{name} is not a valid segment name"))?;
        validate_segment(&ident, seg, &data)
            .with_context(|| format!("{name} failed validation and was not archived"))?;
    } else if repo.descriptor().await?.is_none() {
        bail!(
            "the repository {} has no descriptor yet; push a WAL segment (or start `walsafe run`) first",
            cfg.repository.url
        );
    }
    match repo.put_wal(&name, Bytes::from(data)).await? {
        PutOutcome::Stored => info!("stored {name}"),
        PutOutcome::AlreadyStored => info!("{name} was already stored with the same content"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backup_history_names() {
        assert!(is_backup_history(
            "000000010000000000000002.00000028.backup"
        ));
        assert!(!is_backup_history("000000010000000000000002.backup"));
        assert!(!is_backup_history(
            "00000001000000000000000G.00000028.backup"
        ));
    }
}
