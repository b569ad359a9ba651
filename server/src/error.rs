//! One error type for every HTTP answer: each kind maps to one status, in one place.

use std::time::Duration;

use algolink_engine::EngineError;
use algolink_registry::RegistryError;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{message}")]
    Unavailable { message: String, retry_after: Option<Duration> },
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// Whether the failure is the version's own (counted against it by the health gates): not a
    /// refused input, a full queue or a client's deadline.
    pub fn is_version_fault(&self) -> bool {
        matches!(self, ApiError::Internal(_))
    }

    /// Whether another version might answer the request instead (a canary's control).
    pub fn is_retryable_elsewhere(&self) -> bool {
        matches!(self, ApiError::Internal(_) | ApiError::Unavailable { .. })
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::InvalidInput(_)
            | EngineError::InvalidModel(_)
            | EngineError::Unsupported(_)
            | EngineError::Device(_) => ApiError::BadRequest(e.to_string()),
            EngineError::QueueFull { retry_after, .. } | EngineError::WouldMissDeadline { retry_after, .. } => {
                ApiError::Unavailable { message: e.to_string(), retry_after: Some(retry_after) }
            }
            // The device's state, not the request, stands in the way: unloading a version there
            // (or choosing another device) lets the same push through.
            EngineError::DeviceMemory(_) => ApiError::Conflict(e.to_string()),
            EngineError::DeadlineExceeded { .. } => ApiError::Timeout(e.to_string()),
            EngineError::Unavailable(_) => {
                ApiError::Unavailable { message: e.to_string(), retry_after: Some(Duration::from_secs(1)) }
            }
            EngineError::Execution(_) => ApiError::Internal(e.to_string()),
        }
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::InvalidName(_)
            | RegistryError::InvalidUpload(_)
            | RegistryError::InvalidPolicy(_)
            | RegistryError::InvalidAccess(_) => ApiError::BadRequest(e.to_string()),
            RegistryError::Conflict(_) | RegistryError::Fenced { .. } => ApiError::Conflict(e.to_string()),
            RegistryError::ModelNotFound(_)
            | RegistryError::VersionNotFound { .. }
            | RegistryError::AliasNotFound { .. }
            | RegistryError::ExperimentNotFound(_)
            | RegistryError::NamespaceNotFound(_)
            | RegistryError::UserNotFound(_)
            | RegistryError::TokenNotFound(_) => ApiError::NotFound(e.to_string()),
            RegistryError::TooLarge { .. } => ApiError::TooLarge(e.to_string()),
            RegistryError::Corrupt { .. } => ApiError::Internal(e.to_string()),
            RegistryError::Storage(_) => {
                tracing::error!("registry: {e}");
                ApiError::Unavailable {
                    message: "the model store is unavailable (see the server log)".into(),
                    retry_after: Some(Duration::from_secs(1)),
                }
            }
            RegistryError::Database(_) | RegistryError::Io(_) | RegistryError::Config(_) => {
                tracing::error!("registry: {e}");
                ApiError::Internal("registry storage error (see the server log)".into())
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = serde_json::json!({ "error": self.to_string() }).to_string();
        let mut response =
            (status, [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], body).into_response();
        if let ApiError::Unavailable { retry_after: Some(d), .. } = &self {
            let secs = d.as_secs_f64().ceil().max(1.0) as u64;
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let ApiError::Unauthorized(_) = &self {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"algolink\""));
        }
        response
    }
}
