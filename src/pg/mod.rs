//! Everything that speaks PostgreSQL: positions and names ([`lsn`],
//! [`walfile`]), WAL page headers ([`page`]), the replication protocol
//! client ([`replication`]) and the ordinary SQL connection ([`sql`]),
//! which pick their host the same way ([`session_attrs`]).

pub mod cluster;
pub mod conninfo;
pub mod error;
pub mod lsn;
pub mod page;
pub mod replication;
pub mod session_attrs;
pub mod sql;
pub mod tls;
pub mod transport;
pub mod walfile;

pub use cluster::{ClusterIdentity, Server};
pub use lsn::{Lsn, TimelineId};
pub use walfile::{SegmentName, WalFileName};

/// PostgreSQL's default WAL segment size (16 MiB).
pub const DEFAULT_SEGMENT_SIZE: u64 = 16 * 1024 * 1024;

/// WAL page size walsafe supports (PostgreSQL's default `XLOG_BLCKSZ`).
pub const WAL_BLOCK_SIZE: u64 = 8192;
