//! Shared harness for the integration tests: real PostgreSQL clusters
//! ([`pg`]), real storage servers on loopback — S3 ([`s3`], moto), Azure
//! Blob ([`azure`], Azurite) and GCS ([`gcs`], fake-gcs-server), the last two
//! over [`server`], with a TCP [`front`] to take one down and up again — and
//! the walsafe binary ([`walsafe`]), and a second timeline made by a
//! restore ([`timeline`]).
#![allow(dead_code)]

pub mod azure;
pub mod front;
pub mod gcs;
pub mod pg;
pub mod s3;
pub mod server;
pub mod setup;
pub mod timeline;
pub mod tmpfs;
pub mod walsafe;
