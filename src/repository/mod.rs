//! The repository: object layout, envelope and store.
pub mod store;
