#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(
        "invalid model name {0:?}: use 1-128 letters, digits, '_', '-' or '.', starting with a letter or digit, optionally after a namespace and a slash (team/model); the model part may not be a word of the API's paths (infer, versions, ...)"
    )]
    InvalidName(String),
    #[error("model {0:?} not found")]
    ModelNotFound(String),
    #[error("model {model:?} has no version {version}")]
    VersionNotFound { model: String, version: u64 },
    #[error("{0}")]
    InvalidPolicy(String),
    #[error("{0}")]
    Conflict(String),
    #[error("alias {alias:?} of model {model:?} not found")]
    AliasNotFound { model: String, alias: String },
    #[error("experiment {0} not found")]
    ExperimentNotFound(u64),
    #[error("invalid upload: {0}")]
    InvalidUpload(String),
    #[error("upload is larger than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("stored file {sha256} is corrupt: its content no longer matches its hash")]
    Corrupt { sha256: String },
    #[error("{0}")]
    InvalidAccess(String),
    #[error("namespace {0:?} not found")]
    NamespaceNotFound(String),
    #[error("user {0:?} not found")]
    UserNotFound(String),
    #[error("token {0:?} not found")]
    TokenNotFound(String),
    /// A lifecycle decision of a replica whose leader lease another replica has taken since.
    #[error(
        "this replica's leadership (epoch {epoch}) has ended: another replica took the lifecycle decisions over (epoch {now}); the decision was not written"
    )]
    Fenced { epoch: i64, now: i64 },
    /// The registry's backends are misconfigured (found at start-up).
    #[error("registry configuration: {0}")]
    Config(String),
    /// The object store failed (unreachable, refused, lost an object).
    #[error("object storage error: {0}")]
    Storage(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("storage error: {0}")]
    Io(#[from] std::io::Error),
}
