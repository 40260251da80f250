//! walsafe: PostgreSQL WAL, streamed over the replication protocol into a
//! crash-safe local spool and on to object storage with sub-second RPO.
//!
//! The data's path, module by module:
//!
//! ```text
//! pg ─▶ upstream ─▶ receive ─▶ spool ─▶ upload ─▶ repository ─▶ fetch
//! (protocol,  (session:   (protocol  (local WAL,  (chunks,   (objects,      (restore_command,
//!  LSN, WAL    connect,    loop,      writer       segments)  envelope,      prefetch)
//!  files,      identify,   acks)      thread,                 store)
//!  pages)      slot)                  retention)
//! ```
//!
//! `agent` conducts the stages for `walsafe run`; `cmd` holds the other
//! commands and the command line. The shared pieces every stage may use:
//! `config`, `durable` (fsync primitives), `retry` (the one backoff
//! helper), `metrics`, `positions`, `gap` (recorded losses), `report`
//! (exit codes, error lines), `logging`, `service` (systemd), `state`.
//! Imports only ever point down this list: no stage imports a later one,
//! and nothing imports `cmd`.

pub mod agent;
pub mod backup;
pub mod cmd;
pub mod config;
pub mod drill;
pub mod durable;
pub mod fetch;
pub mod gap;
pub mod logging;
pub mod metrics;
pub mod pg;
pub mod positions;
pub mod receive;
pub mod rekey;
pub mod repo_sync;
pub mod report;
pub mod repository;
pub mod restore;
pub mod retain;
pub mod retry;
pub mod service;
pub mod spool;
pub mod state;
pub mod upload;
pub mod upstream;
