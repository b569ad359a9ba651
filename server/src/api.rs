//! HTTP routes: the Open Inference Protocol v2 (`/v2`), the management API (`/v1`), `/metrics`.

use std::sync::Arc;
use std::time::Instant;

use algolink_engine::{InferRequest, TensorSpec};
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::handler::Handler;
use axum::http::Method;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, MethodRouter};
use axum::{Extension, Router};
use bytes::Bytes;
use futures_util::TryStreamExt;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use algolink_registry::access::{Role, namespace_of};
use algolink_registry::lifecycle::rollout::{GateResult, check_gates};

use crate::auth::{Access, Caller};
use crate::error::ApiError;
use crate::lifecycle::now_ms;
use crate::oip;
use crate::state::{AppState, Servable};

pub const INFERENCE_HEADER: &str = "inference-header-content-length";
pub const EXTENSIONS: [&str; 4] = ["binary_tensor_data", "model_repository", "statistics", "schedule_policy"];

type St = State<Arc<AppState>>;

/// One route: method, path, who may call it (enforced by [`crate::auth::authorize`]), handler.
pub struct Route {
    pub method: Method,
    pub path: &'static str,
    pub access: Access,
    handler: MethodRouter<Arc<AppState>>,
}

fn r<H, T>(method: Method, path: &'static str, access: Access, handler: H) -> Route
where
    H: Handler<T, Arc<AppState>>,
    T: 'static,
{
    let filter = MethodFilter::try_from(method.clone()).expect("a routable method");
    Route { method, path, access, handler: axum::routing::on(filter, handler) }
}

/// Every route with its access rule: this list is the router, so no route exists without a
/// rule (and the role test walks it).
pub fn routes() -> Vec<Route> {
    use crate::auth as a;
    use Access::{Authenticated, Experiment, Handler, Model, Namespace, Owner, Public};
    use Method as M;
    use Role::{Admin, Predictor, Publisher, Viewer};
    vec![
        r(M::GET, "/v2", Public, server_metadata),
        r(M::GET, "/v2/health/live", Public, live),
        r(M::GET, "/v2/health/ready", Public, ready),
        r(M::GET, "/v2/models/stats", Authenticated, all_stats),
        r(M::GET, "/v2/models/{name}", Model(Viewer), model_metadata),
        r(M::GET, "/v2/models/{name}/ready", Model(Viewer), model_ready),
        r(M::POST, "/v2/models/{name}/infer", Model(Predictor), infer),
        r(M::GET, "/v2/models/{name}/stats", Model(Viewer), model_stats),
        r(M::GET, "/v2/models/{name}/versions/{version}", Model(Viewer), model_metadata_v),
        r(M::GET, "/v2/models/{name}/versions/{version}/ready", Model(Viewer), model_ready_v),
        r(M::POST, "/v2/models/{name}/versions/{version}/infer", Model(Predictor), infer_v),
        r(M::GET, "/v2/models/{name}/versions/{version}/stats", Model(Viewer), model_stats_v),
        r(M::POST, "/v2/repository/index", Authenticated, repository_index),
        r(M::POST, "/v2/repository/models/{name}/load", Model(Publisher), repository_load),
        r(M::POST, "/v2/repository/models/{name}/unload", Model(Publisher), repository_unload),
        r(M::GET, "/v1/models", Authenticated, list_models),
        r(M::GET, "/v1/models/{name}", Model(Viewer), get_model),
        r(M::POST, "/v1/models/{name}/versions", Model(Publisher), push_version),
        r(M::DELETE, "/v1/models/{name}/versions/{version}", Model(Admin), delete_version),
        r(M::PATCH, "/v1/models/{name}/versions/{version}", Model(Publisher), patch_version),
        r(M::PUT, "/v1/models/{name}/aliases/{alias}", Model(Publisher), set_alias),
        r(M::DELETE, "/v1/models/{name}/aliases/{alias}", Model(Publisher), delete_alias),
        r(M::GET, "/v1/models/{name}/live", Model(Viewer), model_live),
        r(M::GET, "/v1/models/{name}/policy", Model(Viewer), get_policy),
        r(M::PUT, "/v1/models/{name}/policy", Model(Publisher), put_policy),
        r(M::GET, "/v1/models/{name}/route", Model(Viewer), get_route),
        r(M::PUT, "/v1/models/{name}/route", Model(Publisher), put_route),
        r(M::DELETE, "/v1/models/{name}/route", Model(Publisher), delete_route),
        r(M::GET, "/v1/models/{name}/rollout", Model(Viewer), get_rollout),
        r(M::POST, "/v1/models/{name}/rollout", Model(Publisher), start_rollout),
        r(M::DELETE, "/v1/models/{name}/rollout", Model(Publisher), abort_rollout),
        r(M::POST, "/v1/models/{name}/rollout/promote", Model(Publisher), promote_rollout),
        r(M::POST, "/v1/models/{name}/experiments", Model(Publisher), start_experiment),
        r(M::GET, "/v1/experiments", Authenticated, list_experiments),
        r(M::GET, "/v1/experiments/{id}", Experiment(Viewer), get_experiment),
        r(M::POST, "/v1/experiments/{id}/stop", Experiment(Publisher), stop_experiment),
        r(M::POST, "/v1/experiments/{id}/conclude", Experiment(Publisher), conclude_experiment),
        r(M::POST, "/v1/feedback", Handler("predictor in the namespace of each item's model"), feedback),
        r(M::GET, "/v1/events", Authenticated, events),
        r(M::GET, "/metrics", Authenticated, metrics),
        r(M::GET, "/v1/whoami", Authenticated, a::whoami),
        r(M::GET, "/v1/namespaces", Authenticated, a::list_namespaces),
        r(M::POST, "/v1/namespaces", Owner, a::create_namespace),
        r(M::GET, "/v1/namespaces/{ns}/members", Namespace(Admin), a::members),
        r(M::PUT, "/v1/namespaces/{ns}/members/{user}", Namespace(Admin), a::set_member),
        r(M::DELETE, "/v1/namespaces/{ns}/members/{user}", Namespace(Admin), a::remove_member),
        r(M::POST, "/v1/users", Owner, a::create_user),
        r(
            M::POST,
            "/v1/tokens",
            Handler("for yourself; for a member of a namespace you administer, confined to it; for anyone: the owner"),
            a::create_token,
        ),
        r(M::GET, "/v1/tokens", Handler("your own; ?namespace=N: N's admins; ?all=true: the owner"), a::list_tokens),
        r(
            M::DELETE,
            "/v1/tokens/{id}",
            Handler("your own; one confined to a namespace you administer; any: the owner"),
            a::revoke_token,
        ),
        r(M::GET, "/ui", Public, crate::ui::index),
        r(M::GET, "/ui/app.js", Public, crate::ui::script),
        r(M::GET, "/ui/app.css", Public, crate::ui::style),
        r(M::POST, "/ui/login", Public, crate::ui::login), // the handler checks the token in the body
        r(M::POST, "/ui/logout", Public, crate::ui::logout),
    ]
}

pub fn router(state: Arc<AppState>) -> Router {
    let mut router = Router::new();
    for route in routes() {
        let check = axum::middleware::from_fn_with_state((state.clone(), route.access), crate::auth::authorize);
        router = router.route(route.path, route.handler.route_layer(check));
    }
    // Bodies are read with our own limits (inference) or streamed to disk (uploads).
    let routed = router.layer(DefaultBodyLimit::disable()).with_state(state);
    // `team/model` in a path becomes one segment before routing.
    Router::new().fallback_service(routed).layer(axum::middleware::from_fn(crate::auth::rewrite_namespaced))
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

/// OIP server metadata, plus which replica answered and whether it takes the lifecycle
/// decisions (behind a load balancer, ask each replica directly to find the leader).
async fn server_metadata(State(st): State<Arc<AppState>>) -> axum::Json<Value> {
    let replica = json!({
        "id": st.replicas.id,
        "shared_registry": st.replicas.shared,
        "leader": st.replicas.leader.load(std::sync::atomic::Ordering::Acquire),
    });
    axum::Json(json!({
        "name": "algolink",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": EXTENSIONS,
        "replica": replica,
    }))
}

/// A version number or an alias, as a path segment.
fn parse_version(st: &AppState, name: &str, version: &str) -> Result<u64, ApiError> {
    if let Ok(v) = version.parse::<u64>() {
        return Ok(v);
    }
    st.alias(name, version)
        .ok_or_else(|| ApiError::NotFound(format!("model {name:?} has no version or alias {version:?}")))
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
        "parameters": {
            "version": v.to_string(),
            "max_batch_size": s.scheduler.config().max_batch_size,
            "device": s.scheduler.model().device().to_string(),
            "instances": s.scheduler.instances(),
        },
    })))
}

async fn model_metadata(State(st): St, Path(name): Path<String>) -> Result<axum::Json<Value>, ApiError> {
    metadata(&st, &name, None).await
}

async fn model_metadata_v(
    State(st): St,
    Path((name, version)): Path<(String, String)>,
) -> Result<axum::Json<Value>, ApiError> {
    let v = parse_version(&st, &name, &version)?;
    metadata(&st, &name, Some(v)).await
}

async fn model_ready(State(st): St, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    servable(&st, &name, None).await.map(|_| StatusCode::OK)
}

async fn model_ready_v(State(st): St, Path((name, version)): Path<(String, String)>) -> Result<StatusCode, ApiError> {
    let v = parse_version(&st, &name, &version)?;
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
    let v = match parse_version(&st, &name, &version) {
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

/// The header naming the routing key (a user, a session): the same key always gets the same variant.
pub const KEY_HEADER: &str = "x-algolink-key";
/// Response headers: the variant (as the route names it) and the version that answered.
pub const VARIANT_HEADER: &str = "x-algolink-variant";
pub const VERSION_HEADER: &str = "x-algolink-version";

/// An answered request, before encoding.
struct Answer {
    version: u64,
    servable: Arc<Servable>,
    call: oip::InferCall,
    outputs: Vec<algolink_engine::Tensor>,
}

/// Request bodies and outputs larger than this are parsed and encoded on the blocking pool: a
/// large JSON body takes milliseconds, which on the HTTP threads (one, on a two-core host) would
/// hold up every other connection's requests.
const OFFLOAD_BYTES: usize = 256 << 10;

/// Runs `f` on the blocking pool (for work over [`OFFLOAD_BYTES`]).
async fn off_http_threads<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ApiError::Internal(format!("request worker: {e}")))
}

/// Runs a request on one version, recording its statistics.
async fn attempt(
    servable: &Arc<Servable>,
    body: &Bytes,
    header_len: Option<usize>,
    arrived: Instant,
) -> Result<Answer, ApiError> {
    let started = Instant::now();
    let result = async {
        let call = if body.len() > OFFLOAD_BYTES {
            let (body, model) = (body.clone(), servable.scheduler.model().clone());
            off_http_threads(move || oip::parse_request(&body, header_len, model.signature())).await??
        } else {
            oip::parse_request(body, header_len, servable.scheduler.model().signature())?
        };
        let outputs = servable
            .scheduler
            .infer(InferRequest {
                inputs: call.inputs.clone(),
                priority: call.priority,
                timeout: call.timeout,
                arrived: Some(arrived),
            })
            .await?;
        Ok(Answer { version: servable.version, servable: servable.clone(), call, outputs })
    }
    .await;
    let elapsed = started.elapsed();
    servable.stats().record_request(elapsed, result.is_ok());
    servable.traffic.record(elapsed, result.as_ref().err().is_some_and(ApiError::is_version_fault));
    result
}

/// The routing key of a request: the header, else the request's `id`.
fn routing_key(headers: &HeaderMap, body: &Bytes, header_len: Option<usize>) -> Option<String> {
    if let Some(k) = headers.get(KEY_HEADER).and_then(|v| v.to_str().ok()) {
        return Some(k.to_string());
    }
    #[derive(Deserialize)]
    struct IdOnly {
        id: Option<Value>,
    }
    let json = &body[..header_len.unwrap_or(body.len()).min(body.len())];
    match serde_json::from_slice::<IdOnly>(json).ok()?.id? {
        Value::String(s) => Some(s),
        other => Some(other.to_string()),
    }
}

async fn run_infer(
    st: &AppState,
    name: &str,
    version: Option<u64>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    // The latency objective counts from here: reading and parsing the body are part of it.
    let arrived = Instant::now();
    enum Dispatch {
        Direct(Arc<Servable>),
        Routed(Arc<crate::lifecycle::Routing>),
    }
    let dispatch = match version.is_none().then(|| st.routing(name)).flatten() {
        Some(r) => Dispatch::Routed(r),
        None => Dispatch::Direct(servable(st, name, version).await?.1),
    };
    let body = read_body(body, headers, st.config.server.max_body_bytes).await?;
    let header_len = match headers.get(INFERENCE_HEADER) {
        None => None,
        Some(h) => Some(
            h.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .ok_or_else(|| ApiError::BadRequest("Inference-Header-Content-Length is not a number".into()))?,
        ),
    };
    let (answer, label) = match &dispatch {
        Dispatch::Direct(s) => match attempt(s, &body, header_len, arrived).await {
            Ok(answer) => (answer, None),
            Err(e) => return Ok(failed(e, s.version, None)),
        },
        Dispatch::Routed(r) => {
            let key = routing_key(headers, &body, header_len);
            let i = r.pick(name, key.as_deref());
            let mut served = i;
            let mut result = attempt(&r.variants[i].servable, &body, header_len, arrived).await;
            if let (Err(e), Some(f)) = (&result, r.fallback)
                && e.is_retryable_elsewhere()
                && f != i
            {
                tracing::warn!(
                    model = name,
                    version = r.variants[i].version,
                    "canary failed ({e}); answered by the control"
                );
                served = f;
                result = attempt(&r.variants[f].servable, &body, header_len, arrived).await;
            }
            let answer = match result {
                Ok(answer) => answer,
                Err(e) => return Ok(failed(e, r.variants[served].version, Some(&r.variants[served].label))),
            };
            if let Some(exp) = r.experiment {
                let mut a = st.assignments.lock().expect("assignments lock");
                for k in [answer.call.id.as_deref(), headers.get(KEY_HEADER).and_then(|v| v.to_str().ok())]
                    .into_iter()
                    .flatten()
                {
                    a.record(name, k, exp, answer.version);
                }
            }
            if let Some(shadow) = r.mirrors(name, key.as_deref()) {
                mirror(st, name, shadow, &answer);
            }
            (answer, Some(r.variants[served].label.as_str()))
        }
    };
    let version = answer.version;
    let encode = |name: &str, a: &Answer| {
        oip::encode_response(name, a.version, &a.call, a.servable.scheduler.model().signature(), &a.outputs)
    };
    let output_bytes: usize = answer.outputs.iter().map(|t| t.numel() * t.dtype.size().unwrap_or(16)).sum();
    let (body, header_len) = if output_bytes > OFFLOAD_BYTES {
        let name = name.to_string();
        off_http_threads(move || encode(&name, &answer)).await??
    } else {
        encode(name, &answer)?
    };
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
    name_version(h, version, label);
    Ok(response)
}

/// The error answer of a request that `version` (reached as route variant `label`) failed: it
/// names the version, as a successful answer does, so that a client can tell whose failure it was.
fn failed(e: ApiError, version: u64, label: Option<&str>) -> Response {
    let mut response = e.into_response();
    name_version(response.headers_mut(), version, label);
    response
}

fn name_version(h: &mut HeaderMap, version: u64, label: Option<&str>) {
    h.insert(VERSION_HEADER, HeaderValue::from(version));
    if let Some(label) = label.and_then(|l| HeaderValue::from_str(l).ok()) {
        h.insert(VARIANT_HEADER, label);
    }
}

/// Sends a copy of an answered request to the shadow version, off the request's path: its
/// answer is compared with the primary's and recorded, never returned. Dropped when too many
/// mirrors are in flight.
fn mirror(st: &AppState, name: &str, shadow: &crate::lifecycle::RoutedVariant, answer: &Answer) {
    let stats = st.shadow_for(name, shadow.version);
    let Ok(permit) = st.shadow_slots.clone().try_acquire_owned() else {
        stats.dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return;
    };
    let servable = shadow.servable.clone();
    let inputs = answer.call.inputs.clone();
    let primary = answer.outputs.clone();
    tokio::spawn(async move {
        let started = Instant::now();
        // The default (lowest) priority: a mirror never overtakes a live request in that queue.
        let request = InferRequest {
            inputs,
            priority: u32::MAX,
            timeout: Some(std::time::Duration::from_secs(10)),
            arrived: None,
        };
        let result = servable.scheduler.infer(request).await;
        stats.traffic.record(started.elapsed(), result.is_err());
        if let Ok(outputs) = result {
            stats.compare(&primary, &outputs);
        }
        drop(permit);
    });
}

#[derive(Deserialize, Default)]
struct IndexRequest {
    #[serde(default)]
    ready: bool,
}

async fn repository_index(
    State(st): St,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<axum::Json<Value>, ApiError> {
    let req: IndexRequest = if body.is_empty() {
        IndexRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("malformed index request: {e}")))?
    };
    let mut out = Vec::new();
    for model in st.registry.models().await?.into_iter().filter(|m| caller.sees(&m.name)) {
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

/// A histogram as the console reads it: upper bounds, cumulative counts, count and sum.
fn histogram_json(h: &algolink_engine::stats::Histogram) -> Value {
    let (buckets, count, sum) = h.snapshot();
    let (le, cumulative): (Vec<f64>, Vec<u64>) = buckets.into_iter().unzip();
    json!({ "le": le, "cumulative": cumulative, "count": count, "sum": sum })
}

/// The cumulative counters and histograms of each loaded version of a model, for the console's
/// live charts (it takes the differences between two readings, as Prometheus' `rate` does).
async fn model_live(State(st): St, Path(name): Path<String>) -> Result<axum::Json<Value>, ApiError> {
    use std::sync::atomic::Ordering::Relaxed;
    st.registry.model(&name).await?;
    let versions: Vec<Value> = st
        .all_stats()
        .iter()
        .filter(|((n, _), _)| *n == name)
        .map(|((_, v), s)| {
            json!({
                "version": v,
                "success": s.success.get().0,
                "failure": s.failure.get().0,
                "rejected": s.rejected.load(Relaxed) + s.shed.load(Relaxed) + s.expired.load(Relaxed),
                "queue_depth": s.queue_depth.load(Relaxed),
                "request_seconds": histogram_json(&s.request_seconds),
                "queue_seconds": histogram_json(&s.queue_seconds),
                "batch_size": histogram_json(&s.batch_size),
            })
        })
        .collect();
    Ok(axum::Json(json!({ "model": name, "at_ms": crate::lifecycle::now_ms(), "versions": versions })))
}

/// The statistics of the (model, version) pairs `keep` accepts.
fn stats_filtered(st: &AppState, keep: impl Fn(&str, u64) -> bool) -> axum::Json<Value> {
    let list: Vec<Value> =
        st.all_stats().iter().filter(|((n, v), _)| keep(n, *v)).map(|((n, v), s)| stats_json(n, *v, s)).collect();
    axum::Json(json!({ "model_stats": list }))
}

async fn all_stats(State(st): St, Extension(caller): Extension<Caller>) -> axum::Json<Value> {
    stats_filtered(&st, |n, _| caller.sees(n))
}

async fn model_stats(State(st): St, Path(name): Path<String>) -> Result<axum::Json<Value>, ApiError> {
    st.registry.model(&name).await?;
    Ok(stats_filtered(&st, |n, _| n == name))
}

async fn model_stats_v(
    State(st): St,
    Path((name, version)): Path<(String, String)>,
) -> Result<axum::Json<Value>, ApiError> {
    let v = parse_version(&st, &name, &version)?;
    st.registry.version(&name, v).await?;
    Ok(stats_filtered(&st, |n, version| n == name && version == v))
}

fn model_json(st: &AppState, m: &algolink_registry::ModelRecord) -> Value {
    json!({
        "name": m.name,
        "created_at_ms": m.created_at_ms,
        "serving_version": st.serving_version(&m.name),
        "versions": m.versions,
        "aliases": m.aliases,
        "traffic": traffic_json(st, &m.name),
    })
}

/// Where unversioned requests go now: each variant's share, and the shadow.
fn traffic_json(st: &AppState, name: &str) -> Value {
    match st.routing(name) {
        None => {
            json!({ "variants": [{ "target": "latest", "version": st.manager.default_version(name), "percent": 100.0 }] })
        }
        Some(r) => {
            let variants: Vec<Value> = r
                .variants
                .iter()
                .zip(r.split.percents())
                .map(|(v, p)| json!({ "target": v.label, "version": v.version, "percent": p }))
                .collect();
            let shadow = r.shadow.as_ref().map(|(p, v)| {
                json!({ "target": v.label, "version": v.version, "percent": p, "stats": st.shadow_for(name, v.version).json() })
            });
            json!({ "variants": variants, "shadow": shadow, "experiment": r.experiment })
        }
    }
}

/// Query parameters, refused with a 400 that names the problem.
pub(crate) fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(t)| t).map_err(|e| ApiError::BadRequest(format!("bad query parameters: {}", e.body_text())))
}

/// A JSON body, refused with a 400 that names the problem.
fn parse_json<T: DeserializeOwned>(body: &[u8], what: &str) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("malformed {what}: {e}")))
}

/// Like `parse_json`, an empty body read as `{}` (every field at its default).
pub(crate) fn parse_json_or_empty<T: DeserializeOwned>(body: &[u8], what: &str) -> Result<T, ApiError> {
    parse_json(if body.is_empty() { b"{}" } else { body }, what)
}

async fn list_models(State(st): St, Extension(caller): Extension<Caller>) -> Result<axum::Json<Value>, ApiError> {
    let models = st.registry.models().await?;
    Ok(axum::Json(Value::Array(models.iter().filter(|m| caller.sees(&m.name)).map(|m| model_json(&st, m)).collect())))
}

async fn get_model(State(st): St, Path(name): Path<String>) -> Result<axum::Json<Value>, ApiError> {
    let m = st.registry.model(&name).await?;
    Ok(axum::Json(model_json(&st, &m)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PushParams {
    /// The version retires this many seconds after the push.
    ttl_s: Option<f64>,
    /// Comma-separated tags.
    tags: Option<String>,
}

async fn push_version(
    State(st): St,
    Path(name): Path<String>,
    params: Result<Query<PushParams>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let params = query(params)?;
    let namespace = namespace_of(&name);
    if st.auth.enabled && !st.registry.namespace_exists(namespace).await? {
        return Err(ApiError::NotFound(format!(
            "namespace {namespace:?} does not exist: the owner creates it (POST /v1/namespaces)"
        )));
    }
    let limit = st.config.server.max_upload_bytes;
    if declared_length(&headers).is_some_and(|n| n > limit) {
        // Refuse before reading a byte; a body without Content-Length is cut at the limit instead.
        return Err(ApiError::TooLarge(format!("upload is larger than the limit of {limit} bytes")));
    }
    let patch = (params.ttl_s.is_some() || params.tags.is_some()).then(|| crate::control::VersionPatch {
        tags: params.tags.map(|t| t.split(',').filter(|t| !t.is_empty()).map(String::from).collect()),
        ttl_s: params.ttl_s.map(Some),
    });
    if let Some(p) = &patch {
        p.check()?; // before the upload is stored: a refused push leaves no version behind
    }
    let stream = body.into_data_stream().map_err(std::io::Error::other);
    let reader = tokio_util::io::StreamReader::new(stream);
    let record = st.push(&name, reader).await?;
    if let Some(patch) = patch {
        st.patch_version(&name, record.version, patch).await?;
    }
    let body =
        json!({ "name": record.name, "version": record.version, "sha256": record.sha256, "state": record.state });
    Ok((StatusCode::CREATED, axum::Json(body)).into_response())
}

async fn delete_version(
    State(st): St,
    Path((name, version)): Path<(String, String)>,
) -> Result<axum::Json<Value>, ApiError> {
    let v = parse_version(&st, &name, &version)?;
    let record = st.delete_version(&name, v).await?;
    Ok(axum::Json(json!({ "name": record.name, "version": record.version, "deleted": true })))
}

/// Each caller sees the series of the models it may see (a viewer's "metrics"); the owner (or
/// anyone, with auth off) sees everything, auth denials included.
async fn metrics(State(st): St, Extension(caller): Extension<Caller>) -> Response {
    let text = crate::metrics::render(&st, &|model| caller.sees(model), caller.is_owner());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn patch_version(
    State(st): St,
    Path((name, version)): Path<(String, String)>,
    body: Bytes,
) -> Result<axum::Json<Value>, ApiError> {
    let v = parse_version(&st, &name, &version)?;
    Ok(axum::Json(st.patch_version(&name, v, parse_json(&body, "version patch")?).await?))
}

#[derive(Deserialize)]
#[serde(untagged)]
enum AliasBody {
    Version(u64),
    Object { version: u64 },
}

async fn set_alias(
    State(st): St,
    Path((name, alias)): Path<(String, String)>,
    body: Bytes,
) -> Result<axum::Json<Value>, ApiError> {
    let version = match parse_json::<AliasBody>(&body, "alias (send {\"version\": N})")? {
        AliasBody::Version(v) | AliasBody::Object { version: v } => v,
    };
    Ok(axum::Json(st.set_alias(&name, &alias, version).await?))
}

async fn delete_alias(
    State(st): St,
    Path((name, alias)): Path<(String, String)>,
) -> Result<axum::Json<Value>, ApiError> {
    Ok(axum::Json(st.delete_alias(&name, &alias).await?))
}

async fn get_policy(State(st): St, Path(name): Path<String>) -> Result<axum::Json<Value>, ApiError> {
    st.registry.model(&name).await?;
    let policy = st.registry.policy(&name).await?;
    Ok(axum::Json(serde_json::to_value(policy).unwrap_or(Value::Null)))
}

async fn put_policy(State(st): St, Path(name): Path<String>, body: Bytes) -> Result<axum::Json<Value>, ApiError> {
    Ok(axum::Json(st.set_policy(&name, parse_json(&body, "policy")?, "").await?))
}

async fn get_route(State(st): St, Path(name): Path<String>) -> Result<axum::Json<Value>, ApiError> {
    st.registry.model(&name).await?;
    let policy = st.registry.policy(&name).await?;
    Ok(axum::Json(json!({ "model": name, "route": policy.route, "traffic": traffic_json(&st, &name) })))
}

async fn put_route(State(st): St, Path(name): Path<String>, body: Bytes) -> Result<axum::Json<Value>, ApiError> {
    Ok(axum::Json(st.set_route(&name, Some(parse_json(&body, "route")?)).await?))
}

async fn delete_route(State(st): St, Path(name): Path<String>) -> Result<axum::Json<Value>, ApiError> {
    Ok(axum::Json(st.set_route(&name, None).await?))
}

async fn get_rollout(State(st): St, Path(name): Path<String>) -> Result<axum::Json<Value>, ApiError> {
    st.registry.model(&name).await?;
    let policy = st.registry.policy(&name).await?;
    let mut out = json!({ "model": name, "rollout": policy.active_rollout, "policy": policy.rollout });
    // Progress of the current step, so that a canary that does not move says why.
    if let Some(r) = &policy.active_rollout
        && let Some((canary, control, mut windows)) = st.rollout_windows(&name, r)
    {
        windows["gates"] = json!(match check_gates(&r.policy.gates, &canary, &control) {
            GateResult::Pass => "pass".to_string(),
            GateResult::NotEnoughData => format!(
                "waiting for data: {} of the {} canary requests a step needs",
                canary.requests, r.policy.gates.min_requests
            ),
            GateResult::Fail(why) => format!("failing: {why}"),
        });
        windows["step_elapsed_s"] = json!(now_ms().saturating_sub(r.step_started_ms) as f64 / 1e3);
        out["step"] = windows;
    }
    Ok(axum::Json(out))
}

async fn start_rollout(State(st): St, Path(name): Path<String>, body: Bytes) -> Result<axum::Json<Value>, ApiError> {
    Ok(axum::Json(st.start_rollout(&name, parse_json(&body, "rollout")?).await?))
}

async fn abort_rollout(State(st): St, Path(name): Path<String>) -> Result<axum::Json<Value>, ApiError> {
    Ok(axum::Json(st.finish_rollout(&name, None, false, "rolled back by request", Value::Null).await?))
}

async fn promote_rollout(State(st): St, Path(name): Path<String>) -> Result<axum::Json<Value>, ApiError> {
    Ok(axum::Json(st.finish_rollout(&name, None, true, "promoted by request", Value::Null).await?))
}

async fn start_experiment(State(st): St, Path(name): Path<String>, body: Bytes) -> Result<Response, ApiError> {
    let spec = parse_json_or_empty(&body, "experiment")?;
    Ok((StatusCode::CREATED, axum::Json(st.start_experiment(&name, spec).await?)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExperimentQuery {
    model: Option<String>,
}

async fn list_experiments(
    State(st): St,
    Extension(caller): Extension<Caller>,
    q: Result<Query<ExperimentQuery>, QueryRejection>,
) -> Result<axum::Json<Value>, ApiError> {
    let q = query(q)?;
    let mut list = st.registry.experiments(q.model.as_deref()).await?;
    list.retain(|e| caller.sees(&e.model));
    Ok(axum::Json(serde_json::to_value(list).unwrap_or(Value::Null)))
}

fn parse_id(id: &str) -> Result<u64, ApiError> {
    id.parse().map_err(|_| ApiError::NotFound(format!("experiment {id:?} not found")))
}

async fn get_experiment(State(st): St, Path(id): Path<String>) -> Result<axum::Json<Value>, ApiError> {
    Ok(axum::Json(st.experiment_report(parse_id(&id)?).await?))
}

async fn stop_experiment(State(st): St, Path(id): Path<String>) -> Result<axum::Json<Value>, ApiError> {
    Ok(axum::Json(st.end_experiment(parse_id(&id)?, None).await?))
}

async fn conclude_experiment(
    State(st): St,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<axum::Json<Value>, ApiError> {
    let c = if body.is_empty() { crate::control::Conclusion::default() } else { parse_json(&body, "conclusion")? };
    Ok(axum::Json(st.end_experiment(parse_id(&id)?, Some(c)).await?))
}

async fn feedback(
    State(st): St,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<axum::Json<Value>, ApiError> {
    let items = match parse_json::<Value>(&body, "feedback")? {
        v @ Value::Array(_) => serde_json::from_value::<Vec<crate::control::Feedback>>(v),
        v => serde_json::from_value::<crate::control::Feedback>(v).map(|f| vec![f]),
    }
    .map_err(|e| ApiError::BadRequest(format!("malformed feedback: {e}")))?;
    for f in &items {
        caller.require(namespace_of(&f.model), Role::Predictor)?;
    }
    Ok(axum::Json(st.feedback(items).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventQuery {
    model: Option<String>,
    kind: Option<String>,
    after: Option<u64>,
    before: Option<u64>,
    #[serde(default)]
    order: Order,
    limit: Option<u32>,
}

#[derive(Default, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
enum Order {
    #[default]
    Oldest,
    /// The last events first (the console's view).
    Newest,
}

/// The event log, in order (or newest first); a caller sees the events of the models it may see.
async fn events(
    State(st): St,
    Extension(caller): Extension<Caller>,
    q: Result<Query<EventQuery>, QueryRejection>,
) -> Result<axum::Json<Value>, ApiError> {
    let q = query(q)?;
    if let Some(model) = &q.model {
        caller.require(namespace_of(model), Role::Viewer)?;
    }
    let limit = q.limit.unwrap_or(100).min(1000);
    let newest_first = q.order == Order::Newest;
    let mut filter = algolink_registry::EventFilter {
        model: q.model,
        kind: q.kind,
        after: q.after,
        before: q.before,
        newest_first,
        limit,
    };
    let mut list = Vec::new();
    // Filtering by namespace may thin a page out: read on until the page is full or the log ends.
    loop {
        let page = st.registry.events(&filter).await?;
        let (read, last) = (page.len(), page.last().map(|e| e.id));
        list.extend(page.into_iter().filter(|e| caller.sees(&e.model)));
        if read < filter.limit as usize || list.len() >= limit as usize {
            break;
        }
        if newest_first {
            filter.before = last;
        } else {
            filter.after = last;
        }
    }
    list.truncate(limit as usize);
    Ok(axum::Json(serde_json::to_value(list).unwrap_or(Value::Null)))
}
