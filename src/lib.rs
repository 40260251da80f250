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

#[cfg(any())] // WIP: enabled once the modules it uses have landed
pub mod agent;
#[cfg(any())] // WIP: enabled once the modules it uses have landed
pub mod cli;
pub mod config;
#[cfg(any())] // WIP: enabled once the modules it uses have landed
pub mod demo;
pub mod durable;
#[cfg(any())] // WIP: enabled once the modules it uses have landed
pub mod fetch;
pub mod metrics;
pub mod pg;
pub mod positions;
#[cfg(any())] // WIP: enabled once the modules it uses have landed
pub mod push;
#[cfg(any())] // WIP: enabled once the modules it uses have landed
pub mod receive;
pub mod repository;
pub mod retry;
pub mod spool;
#[cfg(any())] // WIP: enabled once the modules it uses have landed
pub mod upload;
#[cfg(any())] // WIP: enabled once the modules it uses have landed
pub mod verify;
