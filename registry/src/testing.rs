//! For test suites: the backends a test's registry should use. With `ALGOLINK_TEST_DATABASE_URL`
//! set (an administrator's URL of a PostgreSQL server), every call creates a fresh database
//! there; with `ALGOLINK_TEST_STORAGE_URL` (`s3://bucket`, the store's endpoint and keys in the
//! usual `AWS_*` variables), a fresh prefix in that bucket. `tests/with-shared-backends` sets
//! both; without them, the embedded SQLite and local files.

use crate::{Backends, RegistryError};

/// The variable that sends the test suites to PostgreSQL.
pub const DATABASE_ENV: &str = "ALGOLINK_TEST_DATABASE_URL";
/// The variable that sends the test suites' model files to an object store.
pub const STORAGE_ENV: &str = "ALGOLINK_TEST_STORAGE_URL";

/// Backends for one test: a new, empty database and storage prefix on the suite's backends.
pub async fn scratch_backends() -> Result<Backends, RegistryError> {
    let storage = std::env::var(STORAGE_ENV)
        .ok()
        .map(|bucket| format!("{}/test-{}", bucket.trim_end_matches('/'), hex::encode(rand::random::<[u8; 8]>())));
    Ok(Backends { database: scratch_database().await?, storage, storage_options: Default::default() })
}

/// Overwrites a stored model file with `bytes` (in the object store too), to test what a
/// corrupt file does.
pub async fn tamper(registry: &crate::Registry, sha256: &str, bytes: &[u8]) -> Result<(), RegistryError> {
    registry.blobs().tamper(sha256, bytes).await
}

async fn scratch_database() -> Result<Option<String>, RegistryError> {
    let Ok(admin) = std::env::var(DATABASE_ENV) else { return Ok(None) };
    sqlx::any::install_default_drivers();
    let name = format!("algolink_test_{}", hex::encode(rand::random::<[u8; 8]>()));
    let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&admin).await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut conn).await?;
    sqlx::Connection::close(conn).await?;
    // Same server and credentials, another database: replace the URL's path.
    let (base, query) = admin.split_once('?').map_or((admin.as_str(), None), |(b, q)| (b, Some(q)));
    let authority_at = base.find("://").map_or(0, |i| i + 3);
    let root = match base[authority_at..].find('/') {
        Some(slash) => &base[..authority_at + slash],
        None => base,
    };
    let url = match query {
        Some(q) => format!("{root}/{name}?{q}"),
        None => format!("{root}/{name}"),
    };
    Ok(Some(url))
}

/// A registry directory and backends for one test, opened as often as the test likes.
pub struct Scratch {
    pub dir: tempfile::TempDir,
    pub backends: Backends,
}

impl Scratch {
    pub async fn new() -> Result<Scratch, RegistryError> {
        Ok(Scratch { dir: tempfile::tempdir()?, backends: scratch_backends().await? })
    }

    pub async fn open(&self) -> Result<crate::Registry, RegistryError> {
        crate::Registry::connect(self.dir.path(), &self.backends).await
    }
}
