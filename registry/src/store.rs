//! Model and version metadata in SQL, files in the blob store.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::Serialize;
use sqlx::AnyPool;
use sqlx::Row;
use sqlx::any::AnyPoolOptions;

use crate::artifact::{ArtifactLimits, Format, unpack};
use crate::blob::{BlobStore, Staged};
use crate::{RegistryError, validate_model_name};

/// SQLite schema migrations, applied in order; `PRAGMA user_version` records how many ran. Never
/// edit one that shipped: append a new one (and its PostgreSQL twin to [`PG_MIGRATIONS`]).
const MIGRATIONS: [&str; 6] = [
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
    REPLICA_TRAFFIC,
];

/// Each replica's cumulative traffic counters per version (see `replicas.rs`); the same text on
/// both databases.
const REPLICA_TRAFFIC: &str = r#"
CREATE TABLE replica_traffic (
    replica         TEXT NOT NULL,
    model           TEXT NOT NULL,
    version         BIGINT NOT NULL,
    requests        BIGINT NOT NULL,
    errors          BIGINT NOT NULL,
    latency         TEXT NOT NULL,
    last_request_ms BIGINT,
    updated_ms      BIGINT NOT NULL,
    PRIMARY KEY (replica, model, version)
);
"#;

/// PostgreSQL schema migrations, applied in order under an advisory lock (replicas starting
/// together migrate once); `algolink_schema` records how many ran. The first is SQLite's five
/// in one. Text keys use the "C" collation so listings sort as they do on SQLite.
const PG_MIGRATIONS: [&str; 3] = [
    r#"
CREATE TABLE models (
    name          TEXT COLLATE "C" PRIMARY KEY,
    next_version  BIGINT NOT NULL DEFAULT 1,
    created_at_ms BIGINT NOT NULL
);
CREATE TABLE versions (
    model         TEXT COLLATE "C" NOT NULL REFERENCES models(name),
    version       BIGINT NOT NULL,
    sha256        TEXT NOT NULL,
    format        TEXT NOT NULL,
    size          BIGINT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    state         TEXT NOT NULL,
    reason        TEXT,
    expires_at_ms BIGINT,
    pushed_by     TEXT,
    PRIMARY KEY (model, version)
);
CREATE TABLE tags (
    model   TEXT COLLATE "C" NOT NULL,
    version BIGINT NOT NULL,
    tag     TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (model, version, tag),
    FOREIGN KEY (model, version) REFERENCES versions(model, version) ON DELETE CASCADE
);
CREATE TABLE aliases (
    model         TEXT COLLATE "C" NOT NULL REFERENCES models(name),
    alias         TEXT COLLATE "C" NOT NULL,
    version       BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL,
    PRIMARY KEY (model, alias)
);
CREATE TABLE policies (
    model         TEXT COLLATE "C" PRIMARY KEY REFERENCES models(name),
    doc           TEXT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);
CREATE TABLE experiments (
    id    BIGSERIAL PRIMARY KEY,
    model TEXT COLLATE "C" NOT NULL REFERENCES models(name),
    doc   TEXT NOT NULL,
    state TEXT NOT NULL
);
CREATE TABLE outcomes (
    experiment BIGINT NOT NULL REFERENCES experiments(id),
    request    TEXT NOT NULL,
    version    BIGINT NOT NULL,
    value      DOUBLE PRECISION NOT NULL,
    at_ms      BIGINT NOT NULL,
    PRIMARY KEY (experiment, request)
);
CREATE TABLE events (
    id      BIGSERIAL PRIMARY KEY,
    at_ms   BIGINT NOT NULL,
    model   TEXT COLLATE "C" NOT NULL,
    version BIGINT,
    kind    TEXT NOT NULL,
    message TEXT NOT NULL,
    detail  TEXT NOT NULL
);
CREATE INDEX events_by_model ON events(model, id);
CREATE TABLE webhook_cursors (
    url        TEXT PRIMARY KEY,
    last_event BIGINT NOT NULL
);
CREATE TABLE namespaces (
    name          TEXT COLLATE "C" PRIMARY KEY,
    created_at_ms BIGINT NOT NULL
);
INSERT INTO namespaces (name, created_at_ms) VALUES ('default', (EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT);
CREATE TABLE users (
    name          TEXT COLLATE "C" PRIMARY KEY,
    owner         BOOLEAN NOT NULL DEFAULT FALSE,
    created_at_ms BIGINT NOT NULL
);
CREATE TABLE members (
    namespace TEXT COLLATE "C" NOT NULL REFERENCES namespaces(name),
    "user"    TEXT COLLATE "C" NOT NULL REFERENCES users(name),
    role      TEXT NOT NULL,
    PRIMARY KEY (namespace, "user")
);
CREATE TABLE tokens (
    id            TEXT COLLATE "C" PRIMARY KEY,
    "user"        TEXT COLLATE "C" NOT NULL REFERENCES users(name),
    namespace     TEXT COLLATE "C" REFERENCES namespaces(name),
    description   TEXT NOT NULL,
    hash          BYTEA NOT NULL,
    created_at_ms BIGINT NOT NULL,
    expires_at_ms BIGINT,
    revoked_at_ms BIGINT,
    parent        TEXT COLLATE "C"
);
CREATE INDEX tokens_by_user ON tokens("user");
CREATE INDEX tokens_by_parent ON tokens(parent);
"#,
    REPLICA_TRAFFIC,
    // PostgreSQL only (SQLite has one process, always the leader): the leader lease's epoch, the
    // fencing token of lifecycle decisions (see `replicas.rs`).
    "CREATE TABLE leader_epoch (id INTEGER PRIMARY KEY, epoch BIGINT NOT NULL); \
     INSERT INTO leader_epoch (id, epoch) VALUES (1, 0);",
];

/// The advisory-lock key under which PostgreSQL migrations run ("algolink" in ASCII).
const PG_MIGRATION_LOCK: i64 = 0x616c_676f_6c69_6e6b;

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
    pub aliases: BTreeMap<String, u64>,
}

/// Which SQL database holds the metadata.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// Where a registry keeps its metadata and files (the server's `[registry]` section).
#[derive(Clone, Debug, Default)]
pub struct Backends {
    /// A `postgres://` URL; `None` keeps the metadata in SQLite at `data_dir/registry.db`.
    pub database: Option<String>,
    /// An `s3://bucket/prefix` URL (any S3-compatible store); `None` keeps model files in
    /// `data_dir/blobs`. With a store, `data_dir/blobs` is its local, hash-checked cache.
    pub storage: Option<String>,
    /// object_store's S3 options (`endpoint`, `region`, `allow_http`, …).
    pub storage_options: BTreeMap<String, String>,
}

#[derive(Clone, Debug)]
pub struct Registry {
    pub(crate) pool: AnyPool,
    dialect: Dialect,
    blobs: BlobStore,
    pub(crate) lease: crate::replicas::Lease,
}

/// Sets a version's state and reason, on the pool or inside a transaction.
pub(crate) async fn write_state<'e>(
    db: impl sqlx::Executor<'e, Database = sqlx::Any>,
    name: &str,
    version: u64,
    state: VersionState,
    reason: Option<&str>,
) -> Result<(), RegistryError> {
    let done = sqlx::query("UPDATE versions SET state = $1, reason = $2 WHERE model = $3 AND version = $4")
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

async fn migrate_sqlite(pool: &AnyPool) -> Result<(), RegistryError> {
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

async fn migrate_postgres(pool: &AnyPool) -> Result<(), RegistryError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(PG_MIGRATION_LOCK).execute(&mut *tx).await?;
    sqlx::raw_sql("CREATE TABLE IF NOT EXISTS algolink_schema (version BIGINT NOT NULL)").execute(&mut *tx).await?;
    let done: Option<i64> = sqlx::query("SELECT MAX(version) FROM algolink_schema").fetch_one(&mut *tx).await?.get(0);
    let done = done.unwrap_or(0).max(0) as usize;
    if done > PG_MIGRATIONS.len() {
        return Err(RegistryError::Config(format!(
            "the database's schema is version {done}, newer than this build knows ({}): upgrade this replica",
            PG_MIGRATIONS.len()
        )));
    }
    for sql in &PG_MIGRATIONS[done..] {
        sqlx::raw_sql(*sql).execute(&mut *tx).await?;
    }
    sqlx::query("DELETE FROM algolink_schema").execute(&mut *tx).await?;
    sqlx::query("INSERT INTO algolink_schema (version) VALUES ($1)")
        .bind(PG_MIGRATIONS.len() as i64)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// A `sqlite://` URL for a file path (`%`, `?` and `#` escaped, as the URL is percent-decoded).
fn sqlite_url(path: &Path) -> Result<String, RegistryError> {
    let text = path.to_str().ok_or_else(|| {
        RegistryError::Io(std::io::Error::other(format!("data directory {} is not valid UTF-8", path.display())))
    })?;
    let escaped = text.replace('%', "%25").replace('?', "%3F").replace('#', "%23");
    Ok(format!("sqlite://{escaped}?mode=rwc"))
}

impl Registry {
    /// Opens (creating if needed) the embedded registry in `data_dir`: `registry.db` (SQLite,
    /// WAL, synchronous=FULL so a commit survives a crash) and `blobs/`.
    pub async fn open(data_dir: &Path) -> Result<Registry, RegistryError> {
        Registry::connect(data_dir, &Backends::default()).await
    }

    /// Opens the registry on the given backends; `data_dir` holds what stays local (SQLite's
    /// file when no database URL is given, the model files or their cache, upload staging).
    pub async fn connect(data_dir: &Path, backends: &Backends) -> Result<Registry, RegistryError> {
        sqlx::any::install_default_drivers();
        std::fs::create_dir_all(data_dir)?;
        let data_dir = std::fs::canonicalize(data_dir)?;
        let (url, dialect) = match &backends.database {
            None => (sqlite_url(&data_dir.join("registry.db"))?, Dialect::Sqlite),
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                (url.clone(), Dialect::Postgres)
            }
            Some(url) => {
                let scheme = url.split(':').next().unwrap_or_default();
                return Err(RegistryError::Config(format!(
                    "database URL scheme {scheme:?} is not supported: use postgres://… (or leave it out for the embedded SQLite)"
                )));
            }
        };
        let options = match dialect {
            // A commit survives a crash (synchronous=FULL); readers do not block the writer (WAL).
            Dialect::Sqlite => AnyPoolOptions::new().max_connections(4).after_connect(|conn, _| {
                Box::pin(async move {
                    sqlx::raw_sql(
                        "PRAGMA busy_timeout = 10000; PRAGMA journal_mode = WAL; \
                         PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;",
                    )
                    .execute(conn)
                    .await?;
                    Ok(())
                })
            }),
            Dialect::Postgres => AnyPoolOptions::new().max_connections(16).acquire_timeout(Duration::from_secs(10)),
        };
        let pool = options.connect(&url).await?;
        match dialect {
            Dialect::Sqlite => migrate_sqlite(&pool).await?,
            Dialect::Postgres => migrate_postgres(&pool).await?,
        }
        let blobs = match &backends.storage {
            None => BlobStore::local(&data_dir)?,
            Some(url) => BlobStore::s3(&data_dir, url, &backends.storage_options)?,
        };
        Ok(Registry { pool, dialect, blobs, lease: Default::default() })
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    pub fn blobs(&self) -> &BlobStore {
        &self.blobs
    }

    /// Closes the database connections (waits for those in use to come back).
    pub async fn close(&self) {
        self.pool.close().await
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
        sqlx::query("INSERT INTO models (name, created_at_ms) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING")
            .bind(name)
            .bind(now as i64)
            .execute(&mut *tx)
            .await?;
        let version: i64 =
            sqlx::query("UPDATE models SET next_version = next_version + 1 WHERE name = $1 RETURNING next_version - 1")
                .bind(name)
                .fetch_one(&mut *tx)
                .await?
                .get(0);
        sqlx::query(
            "INSERT INTO versions (model, version, sha256, format, size, created_at_ms, state, pushed_by) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
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
        let mut versions: HashMap<String, Vec<VersionRecord>> = HashMap::new();
        for v in self.versions_of(None).await? {
            versions.entry(v.name.clone()).or_default().push(v);
        }
        let mut aliases: HashMap<String, BTreeMap<String, u64>> = HashMap::new();
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
        let row = sqlx::query("SELECT created_at_ms FROM models WHERE name = $1")
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
        const COLUMNS: &str = "SELECT model, version, sha256, format, size, created_at_ms, state, reason, \
            expires_at_ms, pushed_by FROM versions";
        let (rows, tag_rows) = match name {
            Some(n) => (
                sqlx::query(sqlx::AssertSqlSafe(format!("{COLUMNS} WHERE model = $1 ORDER BY model, version")))
                    .bind(n)
                    .fetch_all(&self.pool)
                    .await?,
                sqlx::query("SELECT model, version, tag FROM tags WHERE model = $1 ORDER BY tag")
                    .bind(n)
                    .fetch_all(&self.pool)
                    .await?,
            ),
            None => (
                sqlx::query(sqlx::AssertSqlSafe(format!("{COLUMNS} ORDER BY model, version")))
                    .fetch_all(&self.pool)
                    .await?,
                sqlx::query("SELECT model, version, tag FROM tags ORDER BY tag").fetch_all(&self.pool).await?,
            ),
        };
        let mut tags: HashMap<(String, i64), Vec<String>> = HashMap::new();
        for r in tag_rows {
            tags.entry((r.get(0), r.get(1))).or_default().push(r.get(2));
        }
        rows.into_iter()
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
                    tags: tags.remove(&(r.get(0), r.get(1))).unwrap_or_default(),
                })
            })
            .collect()
    }

    /// Deletes a version's row, and its file unless another version has the same bytes.
    pub async fn delete_version(&self, name: &str, version: u64) -> Result<VersionRecord, RegistryError> {
        let record = self.version(name, version).await?;
        let mut tx = self.pool.begin().await?;
        for sql in [
            "DELETE FROM aliases WHERE model = $1 AND version = $2",
            "DELETE FROM tags WHERE model = $1 AND version = $2",
            "DELETE FROM versions WHERE model = $1 AND version = $2",
        ] {
            sqlx::query(sql).bind(name).bind(version as i64).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        let still_used: i64 = sqlx::query("SELECT COUNT(*) FROM versions WHERE sha256 = $1")
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
    ) -> Result<BTreeMap<String, Bytes>, RegistryError> {
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
        let dir = crate::testing::Scratch::new().await.unwrap();
        let reg = dir.open().await.unwrap();
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
        let dir = crate::testing::Scratch::new().await.unwrap();
        let sha = {
            let reg = dir.open().await.unwrap();
            let v = reg
                .add_version("m", staged(&reg, b"weights").await, Format::Onnx, VersionState::Ready, None)
                .await
                .unwrap();
            reg.set_state("m", 1, VersionState::Failed, Some("boom")).await.unwrap();
            v.sha256
        };
        let reg = dir.open().await.unwrap();
        let v = reg.version("m", 1).await.unwrap();
        assert_eq!((v.state, v.reason.as_deref()), (VersionState::Failed, Some("boom")));
        let files = reg.files(&v, ArtifactLimits::default()).await.unwrap();
        assert_eq!(&files["model.onnx"][..], b"weights");
        // A bad local copy is fatal on local storage; with an object store it is fetched again.
        let local = dir.dir.path().join("blobs/sha256").join(&sha);
        std::fs::write(&local, b"tampered").unwrap();
        let again = reg.files(&v, ArtifactLimits::default()).await;
        if reg.blobs().remote_url().is_some() {
            assert_eq!(&again.unwrap()["model.onnx"][..], b"weights");
            assert_eq!(std::fs::read(&local).unwrap(), b"weights", "the cache is mended");
        } else {
            assert!(matches!(again, Err(RegistryError::Corrupt { .. })));
        }
        // Every copy bad: corrupt.
        crate::testing::tamper(&reg, &sha, b"tampered").await.unwrap();
        assert!(matches!(reg.files(&v, ArtifactLimits::default()).await, Err(RegistryError::Corrupt { .. })));
    }

    #[tokio::test]
    async fn a_replica_with_an_empty_cache_reads_from_the_shared_store() {
        let dir = crate::testing::Scratch::new().await.unwrap();
        if dir.backends.database.is_none() || dir.backends.storage.is_none() {
            return; // Only shared backends have replicas.
        }
        let reg = dir.open().await.unwrap();
        reg.add_version("m", staged(&reg, b"weights").await, Format::Onnx, VersionState::Ready, None).await.unwrap();
        let other_dir = tempfile::tempdir().unwrap();
        let other = Registry::connect(other_dir.path(), &dir.backends).await.unwrap();
        let v = other.version("m", 1).await.unwrap();
        assert_eq!(&other.files(&v, ArtifactLimits::default()).await.unwrap()["model.onnx"][..], b"weights");
        assert!(other_dir.path().join("blobs/sha256").join(&v.sha256).exists(), "fetched into the cache");
        other.delete_version("m", 1).await.unwrap();
        std::fs::remove_file(dir.dir.path().join("blobs/sha256").join(&v.sha256)).unwrap();
        assert!(matches!(reg.blobs().read(&v.sha256).await, Err(RegistryError::Storage(_))), "deleted everywhere");
    }

    #[tokio::test]
    async fn upload_limit_and_bad_names() {
        let dir = crate::testing::Scratch::new().await.unwrap();
        let reg = dir.open().await.unwrap();
        assert!(matches!(reg.blobs().stage(&b"0123456789"[..], 4).await, Err(RegistryError::TooLarge { .. })));
        let s = staged(&reg, b"x").await;
        assert!(matches!(
            reg.add_version("../x", s, Format::Onnx, VersionState::Ready, None).await,
            Err(RegistryError::InvalidName(_))
        ));
        assert_eq!(std::fs::read_dir(dir.dir.path().join("blobs/sha256")).unwrap().count(), 0);
    }
}
