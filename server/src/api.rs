//! HTTP routes: the Open Inference Protocol v2 (`/v2`), the management API (`/v1`), `/metrics`.

use std::sync::Arc;
use std::time::Instant;

use algolink_engine::{InferRequest, TensorSpec};
use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use bytes::Bytes;
use futures_util::TryStreamExt;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::oip;
use crate::state::{AppState, Servable};

pub const INFERENCE_HEADER: &str = "inference-header-content-length";
pub const EXTENSIONS: [&str; 4] = ["binary_tensor_data", "model_repository", "statistics", "schedule_policy"];

type St = State<Arc<AppState>>;

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2/models/stats", get(all_stats))
        .route("/v2/models/{name}", get(model_metadata))
        .route("/v2/models/{name}/ready", get(model_ready))
        .route("/v2/models/{name}/infer", post(infer))
        .route("/v2/models/{name}/stats", get(model_stats))
        .route("/v2/models/{name}/versions/{version}", get(model_metadata_v))
        .route("/v2/models/{name}/versions/{version}/ready", get(model_ready_v))
        .route("/v2/models/{name}/versions/{version}/infer", post(infer_v))
        .route("/v2/models/{name}/versions/{version}/stats", get(model_stats_v))
        .route("/v2/repository/index", post(repository_index))
        .route("/v2/repository/models/{name}/load", post(repository_load))
        .route("/v2/repository/models/{name}/unload", post(repository_unload))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{name}", get(get_model))
        .route("/v1/models/{name}/versions", post(push_version))
        .route("/v1/models/{name}/versions/{version}", delete(delete_version))
        .route("/metrics", get(metrics))
        // Bodies are read with our own limits (inference) or streamed to disk (uploads).
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

async fn live() -> StatusCode {
    StatusCode::OK
}

async fn ready(State(st): St) -> Response {
    if st.is_ready() {
        StatusCode::OK.into_response()
    } else {
        ApiError::Unavailable { message: "server is still loading models".into(), retry_after: None }.into_response()
    }
}

async fn server_metadata() -> axum::Json<Value> {
    axum::Json(json!({ "name": "algolink", "version": env!("CARGO_PKG_VERSION"), "extensions": EXTENSIONS }))
}

fn parse_version(name: &str, version: &str) -> Result<u64, ApiError> {
    version.parse::<u64>().map_err(|_| ApiError::NotFound(format!("model {name:?} has no version {version:?}")))
}

/// The loaded version that answers, or the right error: 404 for what does not exist, 503 for
/// what exists but is not loaded.
async fn servable(st: &AppState, name: &str, version: Option<u64>) -> Result<(u64, Arc<Servable>), ApiError> {
    if let Some(found) = st.manager.get(name, version) {
        return Ok(found);
    }
    match version {
        Some(v) => st.registry.version(name, v).await.map(|_| ())?,
        None => st.registry.model(name).await.map(|_| ())?,
    }
    let what = version.map_or(format!("model {name:?}"), |v| format!("version {v} of model {name:?}"));
    Err(ApiError::Unavailable {
        message: format!("{what} is not loaded"),
        retry_after: Some(std::time::Duration::from_secs(1)),
    })
}

fn spec_json(s: &TensorSpec) -> Value {
    json!({ "name": s.name, "datatype": s.datatype.as_str(), "shape": s.shape })
}

async fn metadata(st: &AppState, name: &str, version: Option<u64>) -> Result<axum::Json<Value>, ApiError> {
    let (v, s) = servable(st, name, version).await?;
    let sig = s.scheduler.model().signature();
    let versions: Vec<String> = st.manager.loaded_versions(name).iter().map(u64::to_string).collect();
    Ok(axum::Json(json!({
        "name": name,
        "versions": versions,
        "platform": sig.platform,
        "inputs": sig.inputs.iter().map(spec_json).collect::<Vec<_>>(),
        "outputs": sig.outputs.iter().map(spec_json).collect::<Vec<_>>(),
        "parameters": { "version": v.to_string(), "max_batch_size": s.scheduler.config().max_batch_size },
    })))
}

async fn model_metadata(State(st): St, Path(name): Path<String>) -> Result<axum::Json<Value>, ApiError> {
    metadata(&st, &name, None).await
}

async fn model_metadata_v(
    State(st): St,
    Path((name, version)): Path<(String, String)>,
) -> Result<axum::Json<Value>, ApiError> {
    let v = parse_version(&name, &version)?;
    metadata(&st, &name, Some(v)).await
}

async fn model_ready(State(st): St, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    servable(&st, &name, None).await.map(|_| StatusCode::OK)
}

async fn model_ready_v(State(st): St, Path((name, version)): Path<(String, String)>) -> Result<StatusCode, ApiError> {
    let v = parse_version(&name, &version)?;
    servable(&st, &name, Some(v)).await.map(|_| StatusCode::OK)
}

async fn infer(State(st): St, Path(name): Path<String>, headers: HeaderMap, body: Body) -> Response {
    run_infer(&st, &name, None, &headers, body).await.unwrap_or_else(IntoResponse::into_response)
}

async fn infer_v(
    State(st): St,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let v = match parse_version(&name, &version) {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    run_infer(&st, &name, Some(v), &headers, body).await.unwrap_or_else(IntoResponse::into_response)
}

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok())
}

async fn read_body(body: Body, headers: &HeaderMap, limit: usize) -> Result<Bytes, ApiError> {
    let too_large = || ApiError::TooLarge(format!("request body is larger than the limit of {limit} bytes"));
    if declared_length(headers).is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    axum::body::to_bytes(body, limit).await.map_err(|_| too_large())
}

async fn run_infer(
    st: &AppState,
    name: &str,
    version: Option<u64>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let (v, servable) = servable(st, name, version).await?;
    let result =
        async {
            let body = read_body(body, headers, st.config.server.max_body_bytes).await?;
            let header_len =
                match headers.get(INFERENCE_HEADER) {
                    None => None,
                    Some(h) => Some(h.to_str().ok().and_then(|s| s.trim().parse::<usize>().ok()).ok_or_else(|| {
                        ApiError::BadRequest("Inference-Header-Content-Length is not a number".into())
                    })?),
                };
            let sig = servable.scheduler.model().signature();
            let call = oip::parse_request(&body, header_len, sig)?;
            let outputs = servable
                .scheduler
                .infer(InferRequest { inputs: call.inputs.clone(), priority: call.priority, timeout: call.timeout })
                .await?;
            oip::encode_response(name, v, &call, sig, &outputs)
        }
        .await;
    servable.stats().record_request(started.elapsed(), result.is_ok());
    let (body, header_len) = result?;
    let mut response = Response::new(Body::from(body));
    let h = response.headers_mut();
    match header_len {
        Some(n) => {
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
            h.insert(INFERENCE_HEADER, HeaderValue::from(n));
        }
        None => {
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
    }
    Ok(response)
}

#[derive(Deserialize, Default)]
struct IndexRequest {
    #[serde(default)]
    ready: bool,
}

async fn repository_index(State(st): St, body: Bytes) -> Result<axum::Json<Value>, ApiError> {
    let req: IndexRequest = if body.is_empty() {
        IndexRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("malformed index request: {e}")))?
    };
    let mut out = Vec::new();
    for model in st.registry.models().await? {
        for v in model.versions {
            let loaded = st.manager.get(&model.name, Some(v.version)).is_some();
            if req.ready && !loaded {
                continue;
            }
            let state = if loaded { "READY" } else { "UNAVAILABLE" };
            out.push(json!({ "name": model.name, "version": v.version.to_string(), "state": state, "reason": v.reason.unwrap_or_default() }));
        }
    }
    Ok(axum::Json(Value::Array(out)))
}

async fn repository_load(State(st): St, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    st.load_model(&name).await.map(|_| StatusCode::OK)
}

async fn repository_unload(State(st): St, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    st.unload_model(&name).await.map(|_| StatusCode::OK)
}

fn stats_json(name: &str, version: u64, s: &algolink_engine::Stats) -> Value {
    use std::sync::atomic::Ordering::Relaxed;
    let pair = |d: &algolink_engine::stats::Duration64| {
        let (count, ns) = d.get();
        json!({ "count": count, "ns": ns })
    };
    let batches: Vec<Value> = s
        .per_batch_size
        .lock()
        .expect("stats lock")
        .iter()
        .map(|(size, (count, ns))| json!({ "batch_size": size, "compute_infer": { "count": count, "ns": ns } }))
        .collect();
    json!({
        "name": name,
        "version": version.to_string(),
        "last_inference": s.last_inference_ms.load(Relaxed),
        "inference_count": s.rows.load(Relaxed),
        "execution_count": s.compute.get().0,
        "inference_stats": {
            "success": pair(&s.success),
            "fail": pair(&s.failure),
            "queue": pair(&s.queue),
            "compute_infer": pair(&s.compute),
        },
        "batch_stats": batches,
    })
}

fn stats_filtered(st: &AppState, name: Option<&str>, version: Option<u64>) -> axum::Json<Value> {
    let list: Vec<Value> = st
        .all_stats()
        .iter()
        .filter(|((n, v), _)| name.is_none_or(|x| x == n) && version.is_none_or(|x| x == *v))
        .map(|((n, v), s)| stats_json(n, *v, s))
        .collect();
    axum::Json(json!({ "model_stats": list }))
}

async fn all_stats(State(st): St) -> axum::Json<Value> {
    stats_filtered(&st, None, None)
}

async fn model_stats(State(st): St, Path(name): Path<String>) -> Result<axum::Json<Value>, ApiError> {
    st.registry.model(&name).await?;
    Ok(stats_filtered(&st, Some(&name), None))
}

async fn model_stats_v(
    State(st): St,
    Path((name, version)): Path<(String, String)>,
) -> Result<axum::Json<Value>, ApiError> {
    let v = parse_version(&name, &version)?;
    st.registry.version(&name, v).await?;
    Ok(stats_filtered(&st, Some(&name), Some(v)))
}

fn model_json(st: &AppState, m: &algolink_registry::ModelRecord) -> Value {
    json!({
        "name": m.name,
        "created_at_ms": m.created_at_ms,
        "serving_version": st.manager.default_version(&m.name),
        "versions": m.versions,
    })
}

async fn list_models(State(st): St) -> Result<axum::Json<Value>, ApiError> {
    let models = st.registry.models().await?;
    Ok(axum::Json(Value::Array(models.iter().map(|m| model_json(&st, m)).collect())))
}

async fn get_model(State(st): St, Path(name): Path<String>) -> Result<axum::Json<Value>, ApiError> {
    let m = st.registry.model(&name).await?;
    Ok(axum::Json(model_json(&st, &m)))
}

async fn push_version(
    State(st): St,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let limit = st.config.server.max_upload_bytes;
    if declared_length(&headers).is_some_and(|n| n > limit) {
        // Refuse before reading a byte; a body without Content-Length is cut at the limit instead.
        return Err(ApiError::TooLarge(format!("upload is larger than the limit of {limit} bytes")));
    }
    let stream = body.into_data_stream().map_err(std::io::Error::other);
    let reader = tokio_util::io::StreamReader::new(stream);
    let record = st.push(&name, reader).await?;
    let body =
        json!({ "name": record.name, "version": record.version, "sha256": record.sha256, "state": record.state });
    Ok((StatusCode::CREATED, axum::Json(body)).into_response())
}

async fn delete_version(
    State(st): St,
    Path((name, version)): Path<(String, String)>,
) -> Result<axum::Json<Value>, ApiError> {
    let v = parse_version(&name, &version)?;
    let record = st.delete_version(&name, v).await?;
    Ok(axum::Json(json!({ "name": record.name, "version": record.version, "deleted": true })))
}

async fn metrics(State(st): St) -> Response {
    let text = crate::metrics::render(&st);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}
