//! walsafe: PostgreSQL WAL, streamed over the replication protocol into a
//! crash-safe local spool and on to object storage with sub-second RPO.
//!
//! The data's path, module by module:
//!
//! ```text
//! pg::replication ─▶ receive ─▶ spool ─▶ upload ─▶ repository ─▶ fetch
//!   (protocol)      (loop,      (local   (chunks,   (layout,      (restore_command,
//!                    acks)       WAL)     segments)  envelope,     prefetch)
//!                                                    store)
//! ```

pub mod agent;
pub mod check;
pub mod cli;
pub mod config;
pub mod demo;
pub mod durable;
pub mod fetch;
pub mod gaps;
pub mod logging;
pub mod metrics;
pub mod pg;
pub mod positions;
pub mod push;
pub mod receive;
pub mod repository;
pub mod retry;
pub mod service;
pub mod spool;
pub mod state;
pub mod status;
pub mod upload;
pub mod verify;
