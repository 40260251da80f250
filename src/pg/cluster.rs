//! Who a cluster is, and what a server says when walsafe connects.
//!
//! [`ClusterIdentity`] is the one description of a cluster's identity in
//! walsafe: what its WAL pages must carry (`pg::page` validates against
//! it), what a repository is pinned to (`repository::descriptor`), and what
//! `walsafe check` compares the two by. [`Server`] adds where the server
//! is now, as `IDENTIFY_SYSTEM` reports it.

use super::{Lsn, TimelineId, WAL_BLOCK_SIZE};

/// A cluster's identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClusterIdentity {
    /// The database system identifier (`IDENTIFY_SYSTEM`, `pg_controldata`).
    pub system_identifier: u64,
    /// `server_version_num`, e.g. 150007; only the major (`/ 10000`) is part
    /// of the identity, a minor upgrade keeps the same WAL format.
    pub pg_version_num: u32,
    /// `wal_segment_size` in bytes.
    pub segment_size: u64,
    /// `wal_block_size` (`XLOG_BLCKSZ`) in bytes, 8192 unless PostgreSQL was
    /// built otherwise.
    pub block_size: u64,
}

impl ClusterIdentity {
    /// An identity with PostgreSQL's default WAL block size.
    pub fn new(system_identifier: u64, pg_version_num: u32, segment_size: u64) -> Self {
        ClusterIdentity {
            system_identifier,
            pg_version_num,
            segment_size,
            block_size: WAL_BLOCK_SIZE,
        }
    }

    /// The PostgreSQL major version (15 for 150007).
    pub fn major(&self) -> u32 {
        self.pg_version_num / 10000
    }
}

/// A server as found on connecting: the cluster it belongs to, the
/// timeline it is on, and its WAL position (on a standby: replayed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Server {
    pub identity: ClusterIdentity,
    pub timeline: TimelineId,
    pub xlogpos: Lsn,
}
