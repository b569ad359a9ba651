//! For test suites: the backends a test's registry should use. With `ALGOLINK_TEST_DATABASE_URL`
//! set (an administrator's URL of a PostgreSQL server, as `tests/backends` sets it), every call
//! creates a fresh database there; without it, the embedded SQLite.

use crate::{Backends, RegistryError};

/// The variable that sends the test suites to PostgreSQL.
pub const DATABASE_ENV: &str = "ALGOLINK_TEST_DATABASE_URL";

/// Backends for one test: a new, empty database when the suite runs on PostgreSQL.
pub async fn scratch_backends() -> Result<Backends, RegistryError> {
    let Ok(admin) = std::env::var(DATABASE_ENV) else { return Ok(Backends::default()) };
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
    Ok(Backends { database: Some(url) })
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
