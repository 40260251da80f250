//! Shared harness for the integration tests: real PostgreSQL clusters
//! ([`pg`]), a real S3 server ([`s3`]) and the walsafe binary ([`walsafe`]).
#![allow(dead_code)]

pub mod pg;
pub mod s3;
pub mod setup;
pub mod walsafe;
