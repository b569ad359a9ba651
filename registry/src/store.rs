//! Model and version metadata in SQL, files in the blob store.

use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::Serialize;
use sqlx::Row;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};

use crate::artifact::{ArtifactLimits, Format, unpack};
use crate::blob::{BlobStore, LocalBlobStore, Staged};
use crate::{RegistryError, validate_model_name};

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran. Never edit
/// one that shipped: append a new one.
const MIGRATIONS: [&str; 5] = [
    r#"
CREATE TABLE IF NOT EXISTS models (
    name          TEXT PRIMARY KEY,
    next_version  INTEGER NOT NULL DEFAULT 1,
    created_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS versions (
    model         TEXT NOT NULL REFERENCES models(name),
    version       INTEGER NOT NULL,
    sha256        TEXT NOT NULL,
    format        TEXT NOT NULL,
    size          INTEGER NOT NULL,
    created_at_ms INTEGER NOT NULL,
    state         TEXT NOT NULL,
    reason        TEXT,
    PRIMARY KEY (model, version)
);
"#,
    r#"
ALTER TABLE versions ADD COLUMN expires_at_ms INTEGER;
CREATE TABLE tags (
    model   TEXT NOT NULL,
    version INTEGER NOT NULL,
    tag     TEXT NOT NULL,
    PRIMARY KEY (model, version, tag),
    FOREIGN KEY (model, version) REFERENCES versions(model, version) ON DELETE CASCADE
);
CREATE TABLE aliases (
    model         TEXT NOT NULL REFERENCES models(name),
    alias         TEXT NOT NULL,
    version       INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL,
    PRIMARY KEY (model, alias)
);
CREATE TABLE policies (
    model         TEXT PRIMARY KEY REFERENCES models(name),
    doc           TEXT NOT NULL,
    updated_at_ms INTEGER NOT NULL
);
CREATE TABLE experiments (
    id    INTEGER PRIMARY KEY AUTOINCREMENT,
    model TEXT NOT NULL REFERENCES models(name),
    doc   TEXT NOT NULL,
    state TEXT NOT NULL
);
CREATE TABLE outcomes (
    experiment INTEGER NOT NULL REFERENCES experiments(id),
    request    TEXT NOT NULL,
    version    INTEGER NOT NULL,
    value      REAL NOT NULL,
    at_ms      INTEGER NOT NULL,
    PRIMARY KEY (experiment, request)
);
CREATE TABLE events (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms   INTEGER NOT NULL,
    model   TEXT NOT NULL,
    version INTEGER,
    kind    TEXT NOT NULL,
    message TEXT NOT NULL,
    detail  TEXT NOT NULL
);
CREATE INDEX events_by_model ON events(model, id);
CREATE TABLE webhook_cursors (
    url        TEXT PRIMARY KEY,
    last_event INTEGER NOT NULL
);
"#,
    r#"
CREATE TABLE namespaces (
    name          TEXT PRIMARY KEY,
    created_at_ms INTEGER NOT NULL
);
INSERT INTO namespaces (name, created_at_ms) VALUES ('default', CAST(unixepoch('subsec') * 1000 AS INTEGER));
CREATE TABLE users (
    name          TEXT PRIMARY KEY,
    owner         BOOLEAN NOT NULL DEFAULT FALSE,
    created_at_ms INTEGER NOT NULL
);
CREATE TABLE members (
    namespace TEXT NOT NULL REFERENCES namespaces(name),
    user      TEXT NOT NULL REFERENCES users(name),
    role      TEXT NOT NULL,
    PRIMARY KEY (namespace, user)
);
CREATE TABLE tokens (
    id            TEXT PRIMARY KEY,
    user          TEXT NOT NULL REFERENCES users(name),
    namespace     TEXT REFERENCES namespaces(name),
    description   TEXT NOT NULL,
    hash          BLOB NOT NULL,
    created_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER,
    revoked_at_ms INTEGER
);
CREATE INDEX tokens_by_user ON tokens(user);
"#,
    "ALTER TABLE versions ADD COLUMN pushed_by TEXT;",
    // A console session records the token it was traded for, and dies with it.
    "ALTER TABLE tokens ADD COLUMN parent TEXT; CREATE INDEX tokens_by_parent ON tokens(parent);",
];

/// Lifecycle state of a version (TF Serving's harness: loading → ready → unloaded | failed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VersionState {
    /// Stored; being loaded and warmed up.
    Loading,
    /// Loaded and warmed up; may take traffic.
    Ready,
    /// Not loaded (superseded by the version policy); files kept.
    Unloaded,
    /// Loading failed; `reason` says why.
    Failed,
    /// Rolled back as a canary; `reason` says which gate failed. Not loaded again by the policy.
    Rejected,
    /// Taken out of service by a retirement rule; `reason` says which. Files kept until deleted.
    Retired,
}

impl VersionState {
    pub fn as_str(self) -> &'static str {
        match self {
            VersionState::Loading => "loading",
            VersionState::Ready => "ready",
            VersionState::Unloaded => "unloaded",
            VersionState::Failed => "failed",
            VersionState::Rejected => "rejected",
            VersionState::Retired => "retired",
        }
    }

    /// Whether the version policy may load it.
    pub fn servable(self) -> bool {
        matches!(self, VersionState::Loading | VersionState::Ready | VersionState::Unloaded)
    }
}

impl FromStr for VersionState {
    type Err = RegistryError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "loading" => VersionState::Loading,
            "ready" => VersionState::Ready,
            "unloaded" => VersionState::Unloaded,
            "failed" => VersionState::Failed,
            "rejected" => VersionState::Rejected,
            "retired" => VersionState::Retired,
            other => return Err(RegistryError::InvalidUpload(format!("unknown state {other:?} in the database"))),
        })
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VersionRecord {
    pub name: String,
    pub version: u64,
    pub sha256: String,
    pub format: Format,
    pub size: u64,
    pub created_at_ms: u64,
    pub state: VersionState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The version's time-to-live, as an instant (ms since the epoch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
    pub tags: Vec<String>,
    /// The user who pushed it (when auth was on).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pushed_by: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelRecord {
    pub name: String,
    pub created_at_ms: u64,
    pub versions: Vec<VersionRecord>,
    /// Alias → version.
    pub aliases: std::collections::BTreeMap<String, u64>,
}

#[derive(Clone, Debug)]
pub struct Registry {
    pub(crate) pool: SqlitePool,
    blobs: BlobStore,
}

/// Sets a version's state and reason, on the pool or inside a transaction.
pub(crate) async fn write_state<'e>(
    db: impl sqlx::Executor<'e, Database = sqlx::Sqlite>,
    name: &str,
    version: u64,
    state: VersionState,
    reason: Option<&str>,
) -> Result<(), RegistryError> {
    let done = sqlx::query("UPDATE versions SET state = ?, reason = ? WHERE model = ? AND version = ?")
        .bind(state.as_str())
        .bind(reason)
        .bind(name)
        .bind(version as i64)
        .execute(db)
        .await?;
    found(done.rows_affected(), name, version)
}

/// `Ok` when a statement on (model, version) touched a row.
pub(crate) fn found(rows_affected: u64, name: &str, version: u64) -> Result<(), RegistryError> {
    if rows_affected == 0 {
        return Err(RegistryError::VersionNotFound { model: name.into(), version });
    }
    Ok(())
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

async fn migrate(pool: &SqlitePool) -> Result<(), RegistryError> {
    let mut conn = pool.acquire().await?;
    let done: i64 = sqlx::query("PRAGMA user_version").fetch_one(&mut *conn).await?.get(0);
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(done.max(0) as usize) {
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        sqlx::raw_sql(*sql).execute(&mut *tx).await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("PRAGMA user_version = {}", i + 1))).execute(&mut *tx).await?;
        tx.commit().await?;
    }
    Ok(())
}

impl Registry {
    /// Opens (creating if needed) the embedded registry in `data_dir`: `registry.db` (SQLite,
    /// WAL, synchronous=FULL so a commit survives a crash) and `blobs/`.
    pub async fn open(data_dir: &Path) -> Result<Registry, RegistryError> {
        std::fs::create_dir_all(data_dir)?;
        let options = SqliteConnectOptions::new()
            .filename(data_dir.join("registry.db"))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new().max_connections(4).connect_with(options).await?;
        migrate(&pool).await?;
        let blobs = BlobStore::Local(LocalBlobStore::open(data_dir)?);
        Ok(Registry { pool, blobs })
    }

    pub fn blobs(&self) -> &BlobStore {
        &self.blobs
    }

    /// Makes a staged (already validated) upload the next version of `name`. The blob is durable
    /// before the row is inserted, and the row's commit is the acknowledgement.
    pub async fn add_version(
        &self,
        name: &str,
        staged: Staged,
        format: Format,
        state: VersionState,
        pushed_by: Option<&str>,
    ) -> Result<VersionRecord, RegistryError> {
        validate_model_name(name)?;
        let (sha256, size) = (staged.sha256.clone(), staged.size);
        self.blobs.commit(staged).await?;
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        sqlx::query("INSERT INTO models (name, created_at_ms) VALUES (?, ?) ON CONFLICT (name) DO NOTHING")
            .bind(name)
            .bind(now as i64)
            .execute(&mut *tx)
            .await?;
        let version: i64 =
            sqlx::query("UPDATE models SET next_version = next_version + 1 WHERE name = ? RETURNING next_version - 1")
                .bind(name)
                .fetch_one(&mut *tx)
                .await?
                .get(0);
        sqlx::query(
            "INSERT INTO versions (model, version, sha256, format, size, created_at_ms, state, pushed_by) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(name)
        .bind(version)
        .bind(&sha256)
        .bind(format.as_str())
        .bind(size as i64)
        .bind(now as i64)
        .bind(state.as_str())
        .bind(pushed_by)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(VersionRecord {
            name: name.into(),
            version: version as u64,
            sha256,
            format,
            size,
            created_at_ms: now,
            state,
            reason: None,
            expires_at_ms: None,
            tags: Vec::new(),
            pushed_by: pushed_by.map(String::from),
        })
    }

    pub async fn set_state(
        &self,
        name: &str,
        version: u64,
        state: VersionState,
        reason: Option<&str>,
    ) -> Result<(), RegistryError> {
        write_state(&self.pool, name, version, state, reason).await
    }

    /// Every model with its versions and aliases, in three queries whatever their number (the
    /// lifecycle controller reads this every tick).
    pub async fn models(&self) -> Result<Vec<ModelRecord>, RegistryError> {
        let rows = sqlx::query("SELECT name, created_at_ms FROM models ORDER BY name").fetch_all(&self.pool).await?;
        let mut versions: std::collections::HashMap<String, Vec<VersionRecord>> = std::collections::HashMap::new();
        for v in self.versions_of(None).await? {
            versions.entry(v.name.clone()).or_default().push(v);
        }
        let mut aliases: std::collections::HashMap<String, std::collections::BTreeMap<String, u64>> =
            std::collections::HashMap::new();
        for r in sqlx::query("SELECT model, alias, version FROM aliases").fetch_all(&self.pool).await? {
            aliases.entry(r.get(0)).or_default().insert(r.get(1), r.get::<i64, _>(2) as u64);
        }
        Ok(rows
            .into_iter()
            .map(|r| {
                let name: String = r.get(0);
                ModelRecord {
                    created_at_ms: r.get::<i64, _>(1) as u64,
                    versions: versions.remove(&name).unwrap_or_default(),
                    aliases: aliases.remove(&name).unwrap_or_default(),
                    name,
                }
            })
            .collect())
    }

    pub async fn model(&self, name: &str) -> Result<ModelRecord, RegistryError> {
        let row = sqlx::query("SELECT created_at_ms FROM models WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| RegistryError::ModelNotFound(name.into()))?;
        Ok(ModelRecord {
            name: name.into(),
            created_at_ms: row.get::<i64, _>(0) as u64,
            versions: self.versions_of(Some(name)).await?,
            aliases: self.aliases(name).await?,
        })
    }

    pub async fn version(&self, name: &str, version: u64) -> Result<VersionRecord, RegistryError> {
        self.model(name)
            .await?
            .versions
            .into_iter()
            .find(|v| v.version == version)
            .ok_or_else(|| RegistryError::VersionNotFound { model: name.into(), version })
    }

    /// Versions of one model, or of every model when `name` is `None`.
    async fn versions_of(&self, name: Option<&str>) -> Result<Vec<VersionRecord>, RegistryError> {
        const COLUMNS: &str = "SELECT model, version, sha256, format, size, created_at_ms, state, reason, expires_at_ms, pushed_by, \
            (SELECT group_concat(tag, char(10)) FROM (SELECT tag FROM tags t WHERE t.model = v.model \
            AND t.version = v.version ORDER BY tag)) FROM versions v";
        let (filtered, all) = (
            format!("{COLUMNS} WHERE model = ? ORDER BY model, version"),
            format!("{COLUMNS} ORDER BY model, version"),
        );
        let q = match name {
            Some(n) => sqlx::query(sqlx::AssertSqlSafe(filtered)).bind(n),
            None => sqlx::query(sqlx::AssertSqlSafe(all)),
        };
        q.fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(|r| {
                let format: String = r.get(3);
                let state: String = r.get(6);
                Ok(VersionRecord {
                    name: r.get(0),
                    version: r.get::<i64, _>(1) as u64,
                    sha256: r.get(2),
                    format: Format::parse(&format).ok_or_else(|| {
                        RegistryError::InvalidUpload(format!("unknown format {format:?} in the database"))
                    })?,
                    size: r.get::<i64, _>(4) as u64,
                    created_at_ms: r.get::<i64, _>(5) as u64,
                    state: state.parse()?,
                    reason: r.get(7),
                    expires_at_ms: r.get::<Option<i64>, _>(8).map(|v| v as u64),
                    pushed_by: r.get(9),
                    tags: r
                        .get::<Option<String>, _>(10)
                        .map(|t| t.split('\n').map(String::from).collect())
                        .unwrap_or_default(),
                })
            })
            .collect()
    }

    /// Deletes a version's row, and its file unless another version has the same bytes.
    pub async fn delete_version(&self, name: &str, version: u64) -> Result<VersionRecord, RegistryError> {
        let record = self.version(name, version).await?;
        let mut tx = self.pool.begin().await?;
        for sql in [
            "DELETE FROM aliases WHERE model = ? AND version = ?",
            "DELETE FROM tags WHERE model = ? AND version = ?",
            "DELETE FROM versions WHERE model = ? AND version = ?",
        ] {
            sqlx::query(sql).bind(name).bind(version as i64).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        let still_used: i64 = sqlx::query("SELECT COUNT(*) FROM versions WHERE sha256 = ?")
            .bind(&record.sha256)
            .fetch_one(&self.pool)
            .await?
            .get(0);
        if still_used == 0 {
            self.blobs.remove(&record.sha256).await?;
        }
        Ok(record)
    }

    /// The version's files, read back and checked against its sha256.
    pub async fn files(
        &self,
        record: &VersionRecord,
        limits: ArtifactLimits,
    ) -> Result<std::collections::BTreeMap<String, Bytes>, RegistryError> {
        let blob = self.blobs.read(&record.sha256).await?;
        unpack(record.format, blob, limits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn staged(reg: &Registry, data: &[u8]) -> Staged {
        reg.blobs().stage(data, 1 << 20).await.unwrap()
    }

    #[tokio::test]
    async fn versions_are_numbered_and_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path()).await.unwrap();
        let v1 = reg
            .add_version("m", staged(&reg, b"one").await, Format::Onnx, VersionState::Ready, Some("ada"))
            .await
            .unwrap();
        let v2 =
            reg.add_version("m", staged(&reg, b"two").await, Format::Onnx, VersionState::Loading, None).await.unwrap();
        assert_eq!((v1.version, v2.version), (1, 2));
        reg.delete_version("m", 2).await.unwrap();
        let v3 =
            reg.add_version("m", staged(&reg, b"three").await, Format::Onnx, VersionState::Ready, None).await.unwrap();
        assert_eq!(v3.version, 3, "a deleted number is not given again");
        let model = reg.model("m").await.unwrap();
        assert_eq!(model.versions[0].pushed_by.as_deref(), Some("ada"));
        assert_eq!(model.versions.iter().map(|v| v.version).collect::<Vec<_>>(), vec![1, 3]);
        assert!(matches!(reg.version("m", 2).await, Err(RegistryError::VersionNotFound { .. })));
        assert!(matches!(reg.model("nope").await, Err(RegistryError::ModelNotFound(_))));
    }

    #[tokio::test]
    async fn survives_reopen_and_detects_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let sha = {
            let reg = Registry::open(dir.path()).await.unwrap();
            let v = reg
                .add_version("m", staged(&reg, b"weights").await, Format::Onnx, VersionState::Ready, None)
                .await
                .unwrap();
            reg.set_state("m", 1, VersionState::Failed, Some("boom")).await.unwrap();
            v.sha256
        };
        let reg = Registry::open(dir.path()).await.unwrap();
        let v = reg.version("m", 1).await.unwrap();
        assert_eq!((v.state, v.reason.as_deref()), (VersionState::Failed, Some("boom")));
        let files = reg.files(&v, ArtifactLimits::default()).await.unwrap();
        assert_eq!(&files["model.onnx"][..], b"weights");
        std::fs::write(dir.path().join("blobs/sha256").join(&sha), b"tampered").unwrap();
        assert!(matches!(reg.files(&v, ArtifactLimits::default()).await, Err(RegistryError::Corrupt { .. })));
    }

    #[tokio::test]
    async fn upload_limit_and_bad_names() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path()).await.unwrap();
        assert!(matches!(reg.blobs().stage(&b"0123456789"[..], 4).await, Err(RegistryError::TooLarge { .. })));
        let s = staged(&reg, b"x").await;
        assert!(matches!(
            reg.add_version("../x", s, Format::Onnx, VersionState::Ready, None).await,
            Err(RegistryError::InvalidName(_))
        ));
        assert_eq!(std::fs::read_dir(dir.path().join("blobs/sha256")).unwrap().count(), 0);
    }
}
