//! The model registry: immutable, sha256-addressed versions with their metadata, and the serving
//! manager that hands out ref-counted handles to loaded versions.
//!
//! Architecture invariant: this crate knows neither candle nor HTTP. What it serves is a type
//! parameter; metadata lives in SQL (SQLite embedded, or PostgreSQL shared by replicas: one set
//! of portable queries through sqlx's `Any` driver), files in a [`BlobStore`] (local disk, or an
//! S3-compatible object store with a local cache).

pub mod access;
mod artifact;
mod blob;
mod error;
pub mod lifecycle;
mod lifecycle_store;
mod manager;
mod names;
pub mod policy;
mod replicas;
mod store;
pub mod testing;

pub use artifact::{ArtifactLimits, Format, unpack};
pub use blob::{BlobStore, Staged};
pub use error::RegistryError;
pub use lifecycle::validate_alias;
pub use lifecycle_store::{Event, EventFilter};
pub use manager::Manager;
pub use names::{PATH_WORDS, validate_model_name};
pub use replicas::as_leader;
pub use store::{Backends, Dialect, ModelRecord, Registry, VersionRecord, VersionState};
