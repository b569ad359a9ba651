//! Authentication and authorisation: every route declares an [`Access`] rule (the route table in
//! `api.rs` cannot hold a route without one); [`authorize`] resolves the caller from its bearer
//! token and enforces the rule before the handler runs; handlers that list things filter them
//! with the [`Caller`] it leaves in the request's extensions.
//!
//! Tokens are resolved through the registry (sha256 hashes, constant-time comparison) and cached
//! for `auth.cache_ms`; any change made through this server clears the cache at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use algolink_registry::PATH_WORDS;
use algolink_registry::access::{Principal, Role, TokenRefusal, TokenRequest, namespace_of};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::api::parse_json_or_empty;
use crate::error::ApiError;
use crate::state::AppState;

/// What a route requires of its caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Anyone, token or not (health, server metadata).
    Public,
    /// Any valid token; what the answer holds is filtered by the caller's roles.
    Authenticated,
    /// A role in the namespace of the model named by the path's `{name}`.
    Model(Role),
    /// A role in the namespace named by the path's `{ns}`.
    Namespace(Role),
    /// A role in the namespace of the model that experiment `{id}` belongs to.
    Experiment(Role),
    /// The server's owner.
    Owner,
    /// Any valid token here; the handler checks the rest against what the body names (the
    /// text says what), because the path does not say which namespace is concerned.
    Handler(&'static str),
}

/// Who is calling, as the handlers see it.
#[derive(Clone, Debug)]
pub enum Caller {
    /// Auth is off: everything is allowed.
    Open,
    /// No (valid) token on a public route.
    Anonymous,
    User(Arc<Principal>),
}

impl Caller {
    pub fn role_in(&self, namespace: &str) -> Option<Role> {
        match self {
            Caller::Open => Some(Role::Admin),
            Caller::Anonymous => None,
            Caller::User(p) => p.role_in(namespace),
        }
    }

    pub fn is_owner(&self) -> bool {
        match self {
            Caller::Open => true,
            Caller::Anonymous => false,
            Caller::User(p) => p.is_owner(),
        }
    }

    /// The user's name (for the event log), when there is one.
    pub fn user(&self) -> Option<&str> {
        match self {
            Caller::User(p) => Some(&p.user),
            _ => None,
        }
    }

    /// Whether the caller may see what belongs to `model` (viewer in its namespace).
    pub fn sees(&self, model: &str) -> bool {
        self.role_in(namespace_of(model)).is_some()
    }

    /// A 401 for a caller without a token.
    pub fn require_token(&self) -> Result<(), ApiError> {
        match self {
            Caller::Anonymous => Err(ApiError::Unauthorized(
                "this needs a token: send the header \"Authorization: Bearer <token>\"".into(),
            )),
            _ => Ok(()),
        }
    }

    pub fn require(&self, namespace: &str, role: Role) -> Result<(), ApiError> {
        self.require_token()?;
        let Caller::User(p) = self else { return Ok(()) }; // auth off
        match p.role_in(namespace) {
            Some(have) if have >= role => Ok(()),
            have => Err(ApiError::Forbidden(format!(
                "user {:?} needs the role {role} in namespace {namespace:?}{}",
                p.user,
                match (have, &p.scope) {
                    (Some(h), _) => format!(" (holds {h})"),
                    (None, Some(s)) if s != namespace => format!(" (this token is confined to namespace {s:?})"),
                    (None, _) => " (holds no role there)".into(),
                }
            ))),
        }
    }

    pub fn require_owner(&self) -> Result<(), ApiError> {
        self.require_token()?;
        match self {
            Caller::User(p) if !p.is_owner() => {
                Err(ApiError::Forbidden(format!("user {:?} is not the server's owner", p.user)))
            }
            _ => Ok(()),
        }
    }
}

type Cached = (Instant, Result<Arc<Principal>, TokenRefusal>);

/// Auth's state in the server: whether it is on, the token cache, the denial counters.
pub struct Auth {
    pub enabled: bool,
    ttl: Duration,
    cache: Mutex<HashMap<[u8; 32], Cached>>,
    pub denied_unauthenticated: AtomicU64,
    pub denied_forbidden: AtomicU64,
}

/// Cached resolutions beyond this are dropped all at once (a flood of made-up tokens cannot
/// grow memory).
const CACHE_LIMIT: usize = 10_000;

impl Auth {
    pub fn new(enabled: bool, ttl: Duration) -> Auth {
        Auth {
            enabled,
            ttl,
            cache: Mutex::new(HashMap::new()),
            denied_unauthenticated: AtomicU64::new(0),
            denied_forbidden: AtomicU64::new(0),
        }
    }

    /// Forgets every resolved token (after a change to users, members or tokens).
    pub fn invalidate(&self) {
        self.cache.lock().expect("auth cache").clear();
    }

    pub(crate) async fn resolve(
        &self,
        st: &AppState,
        token: &str,
    ) -> Result<Result<Arc<Principal>, TokenRefusal>, ApiError> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = Instant::now();
        if let Some((at, found)) = self.cache.lock().expect("auth cache").get(&key)
            && now.duration_since(*at) < self.ttl
        {
            return Ok(match found {
                Ok(p) if p.expires_at_ms.is_some_and(|e| e <= crate::lifecycle::now_ms()) => Err(TokenRefusal::Expired),
                other => other.clone(),
            });
        }
        let found = st.registry.authenticate(token).await?.map(Arc::new);
        let mut cache = self.cache.lock().expect("auth cache");
        if cache.len() >= CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(key, (now, found.clone()));
        Ok(found)
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The caller of a request: `Open` with auth off, else the principal behind its bearer token or,
/// for the console, its session cookie. A session may change things only from the console's own
/// scripts ([`crate::ui::require_console`]): no cross-site request forgery.
async fn caller(st: &AppState, parts: &axum::http::request::Parts) -> Result<Caller, ApiError> {
    if !st.auth.enabled {
        return Ok(Caller::Open);
    }
    let token = match (bearer(&parts.headers), crate::ui::session(&parts.headers)) {
        (Some(token), _) => token,
        (None, Some(session)) => {
            if !parts.method.is_safe() {
                crate::ui::require_console(&parts.headers, "a console session changes things")?;
            }
            session
        }
        (None, None) => return Ok(Caller::Anonymous),
    };
    match st.auth.resolve(st, token).await? {
        Ok(p) => Ok(Caller::User(p)),
        Err(refusal) => Err(ApiError::Unauthorized(format!("the token is {}", refusal.as_str()))),
    }
}

tokio::task_local! {
    /// The user a request runs for, while its handler runs: the event log records it as `by`.
    pub static ACTOR: String;
}

/// The middleware every route passes through: resolves the caller, enforces the route's rule,
/// leaves the `Caller` for the handler, and counts denials.
pub async fn authorize(State((st, access)): State<(Arc<AppState>, Access)>, req: Request, next: Next) -> Response {
    let (mut parts, body) = req.into_parts();
    let response = match check(&st, access, &mut parts).await {
        Ok(caller) => {
            let user = caller.user().map(str::to_string);
            parts.extensions.insert(caller);
            let run = next.run(Request::from_parts(parts, body));
            match user {
                Some(u) => ACTOR.scope(u, run).await,
                None => run.await,
            }
        }
        Err(e) => e.into_response(),
    };
    match response.status() {
        StatusCode::UNAUTHORIZED => st.auth.denied_unauthenticated.fetch_add(1, Relaxed),
        StatusCode::FORBIDDEN => st.auth.denied_forbidden.fetch_add(1, Relaxed),
        _ => 0,
    };
    response
}

async fn check(st: &AppState, access: Access, parts: &mut axum::http::request::Parts) -> Result<Caller, ApiError> {
    let caller = match (caller(st, parts).await, access) {
        (Ok(c), _) => c,
        // A bad token does not shut anyone out of what is public.
        (Err(_), Access::Public) => Caller::Anonymous,
        (Err(e), _) => return Err(e),
    };
    // With auth off, or on a public route, there is nothing to check (and no path to read).
    if matches!(caller, Caller::Open) || access == Access::Public {
        return Ok(caller);
    }
    caller.require_token()?;
    let params = match access {
        Access::Model(_) | Access::Namespace(_) | Access::Experiment(_) => {
            axum::RequestPartsExt::extract::<Path<HashMap<String, String>>>(parts)
                .await
                .map(|Path(p)| p)
                .unwrap_or_default()
        }
        _ => HashMap::new(),
    };
    let param = |key: &str| params.get(key).map_or("", String::as_str);
    match access {
        Access::Public | Access::Authenticated | Access::Handler(_) => {}
        Access::Owner => caller.require_owner()?,
        Access::Model(role) => caller.require(namespace_of(param("name")), role)?,
        Access::Namespace(role) => caller.require(param("ns"), role)?,
        Access::Experiment(role) => {
            // An unknown experiment gets the handler's 404 only for the owner: the others learn
            // nothing from a refusal.
            let experiment = match param("id").parse() {
                Ok(id) => st.registry.experiment(id).await.ok(),
                Err(_) => None,
            };
            match experiment {
                Some(e) => caller.require(namespace_of(&e.model), role)?,
                None if caller.is_owner() => {}
                None => {
                    return Err(ApiError::Forbidden(format!("experiment {:?} is not one you may see", param("id"))));
                }
            }
        }
    }
    Ok(caller)
}

/// Model names may hold one slash (`team/fraud`), which clients (tritonclient among them) send
/// unescaped: `/v2/models/team/fraud/infer`. Before routing, such a path gets the slash escaped
/// (`team%2Ffraud`), so the routes see one segment. The second segment is a model name, not a
/// path word, whenever it is not one of the API's words (which model names may not be).
pub fn join_namespaced(uri: &Uri) -> Option<Uri> {
    let path = uri.path();
    let rest = ["/v2/models/", "/v1/models/", "/v2/repository/models/"]
        .iter()
        .find_map(|prefix| path.strip_prefix(prefix).map(|rest| (prefix, rest)));
    let (prefix, rest) = rest?;
    let mut segments = rest.splitn(3, '/');
    let (ns, model) = (segments.next()?, segments.next()?);
    if ns.is_empty() || model.is_empty() || PATH_WORDS.contains(&model) {
        return None;
    }
    let tail = segments.next().map(|t| format!("/{t}")).unwrap_or_default();
    let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    format!("{prefix}{ns}%2F{model}{tail}{query}").parse().ok()
}

pub async fn rewrite_namespaced(mut req: Request, next: Next) -> Response {
    if let Some(uri) = join_namespaced(req.uri()) {
        *req.uri_mut() = uri;
    }
    next.run(req).await
}

/// Creates the first owner when auth is on and the registry has none, writing its token to a
/// file only the server's user can read (never to the log).
pub async fn bootstrap_owner(st: &AppState, token_file: &std::path::Path) -> anyhow::Result<()> {
    if !st.auth.enabled || st.registry.owner_exists().await? {
        return Ok(());
    }
    st.registry.ensure_user("owner", true).await?;
    let req = TokenRequest { user: "owner".into(), description: "first owner token".into(), ..Default::default() };
    let (token, _) = st.registry.create_token(&req).await?;
    write_secret(token_file, &token)?;
    tracing::warn!(
        "auth is on and the registry had no owner: created user \"owner\"; its token is in {}",
        token_file.display()
    );
    Ok(())
}

/// Writes, fsyncs and renames into place, readable by the owner only.
fn write_secret(path: &std::path::Path, secret: &str) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options.open(&tmp)?;
    f.write_all(secret.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

// ---- the access API: namespaces, members, users, tokens ----

type St = State<Arc<AppState>>;

pub async fn whoami(axum::Extension(caller): axum::Extension<Caller>) -> axum::Json<Value> {
    axum::Json(match caller {
        Caller::User(p) => serde_json::to_value(&*p).unwrap_or(Value::Null),
        _ => json!({ "user": null, "auth": "off" }),
    })
}

pub async fn list_namespaces(
    State(st): St,
    axum::Extension(caller): axum::Extension<Caller>,
) -> Result<axum::Json<Value>, ApiError> {
    let list: Vec<Value> = st
        .registry
        .namespaces()
        .await?
        .into_iter()
        .filter_map(|ns| {
            let role = caller.role_in(&ns.name)?;
            let mut v = json!({ "name": ns.name, "created_at_ms": ns.created_at_ms, "role": role });
            if role >= Role::Admin {
                v["members"] = serde_json::to_value(&ns.members).unwrap_or(Value::Null);
            }
            Some(v)
        })
        .collect();
    Ok(axum::Json(Value::Array(list)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewNamespace {
    name: String,
}

pub async fn create_namespace(State(st): St, body: Bytes) -> Result<Response, ApiError> {
    let req: NewNamespace = parse_json_or_empty(&body, "namespace")?;
    let ns = st.registry.create_namespace(&req.name).await?;
    Ok((StatusCode::CREATED, axum::Json(ns)).into_response())
}

pub async fn members(State(st): St, Path(ns): Path<String>) -> Result<axum::Json<Value>, ApiError> {
    Ok(axum::Json(serde_json::to_value(st.registry.members(&ns).await?).unwrap_or(Value::Null)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Membership {
    role: Role,
}

pub async fn set_member(
    State(st): St,
    Path((ns, user)): Path<(String, String)>,
    body: Bytes,
) -> Result<axum::Json<Value>, ApiError> {
    let m: Membership =
        parse_json_or_empty(&body, "membership (want {\"role\": \"viewer|predictor|publisher|admin\"})")?;
    st.registry.set_member(&ns, &user, m.role).await?;
    st.auth.invalidate();
    Ok(axum::Json(json!({ "namespace": ns, "user": user, "role": m.role })))
}

pub async fn remove_member(
    State(st): St,
    Path((ns, user)): Path<(String, String)>,
) -> Result<axum::Json<Value>, ApiError> {
    st.registry.remove_member(&ns, &user).await?;
    st.auth.invalidate();
    Ok(axum::Json(json!({ "namespace": ns, "user": user, "removed": true })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewUser {
    name: String,
    #[serde(default)]
    owner: bool,
}

pub async fn create_user(State(st): St, body: Bytes) -> Result<Response, ApiError> {
    let req: NewUser = parse_json_or_empty(&body, "user")?;
    let user = st.registry.ensure_user(&req.name, req.owner).await?;
    st.auth.invalidate();
    Ok((StatusCode::CREATED, axum::Json(user)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewToken {
    /// Default: the caller.
    user: Option<String>,
    /// Confine the token to this namespace.
    namespace: Option<String>,
    #[serde(default)]
    description: String,
    /// Lifetime in seconds; none: until revoked.
    expires_in_s: Option<f64>,
}

/// A token for yourself (any user), for anyone (the owner), or, confined to namespace N, for a
/// member of N (N's admins).
pub async fn create_token(
    State(st): St,
    axum::Extension(caller): axum::Extension<Caller>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: NewToken = parse_json_or_empty(&body, "token request")?;
    let user = match (req.user, caller.user()) {
        (Some(u), _) => u,
        (None, Some(me)) => me.to_string(),
        (None, None) => return Err(ApiError::BadRequest("name the token's \"user\"".into())),
    };
    let ttl_ms = match req.expires_in_s {
        Some(s) if !(s.is_finite() && s > 0.0) => {
            return Err(ApiError::BadRequest(format!("expires_in_s must be a positive number of seconds, not {s}")));
        }
        s => s.map(|s| (s * 1000.0) as u64),
    };
    // A token made with a confined token is confined the same way: none reaches further than
    // the one that made it.
    let namespace = match (req.namespace, &caller) {
        (None, Caller::User(p)) => p.scope.clone(),
        (ns, _) => ns,
    };
    if caller.user() == Some(user.as_str()) {
        if let Some(ns) = &namespace {
            caller.require(ns, Role::Viewer)?;
        }
    } else if !caller.is_owner() {
        let Some(ns) = &namespace else {
            return Err(ApiError::Forbidden(
                "a token for another user must be confined to a namespace you administer (\"namespace\")".into(),
            ));
        };
        caller.require(ns, Role::Admin)?;
        if !st.registry.members(ns).await?.contains_key(&user) {
            return Err(ApiError::Forbidden(format!("{user:?} is not a member of namespace {ns:?}")));
        }
    }
    let request = TokenRequest { user, namespace, description: req.description, ttl_ms, parent: None };
    let (token, record) = st.registry.create_token(&request).await?;
    let mut body = serde_json::to_value(record).unwrap_or(Value::Null);
    body["token"] = Value::String(token);
    Ok((StatusCode::CREATED, axum::Json(body)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenQuery {
    namespace: Option<String>,
    /// The owner's view of every user's tokens.
    #[serde(default)]
    all: bool,
}

/// Your own tokens; a namespace's tokens for its admins; everything for the owner.
pub async fn list_tokens(
    State(st): St,
    axum::Extension(caller): axum::Extension<Caller>,
    q: Result<axum::extract::Query<TokenQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::Json<Value>, ApiError> {
    let q = crate::api::query(q)?;
    let list = if q.all {
        caller.require_owner()?;
        st.registry.tokens(None, q.namespace.as_deref()).await?
    } else if let Some(ns) = &q.namespace {
        caller.require(ns, Role::Admin)?;
        st.registry.tokens(None, Some(ns)).await?
    } else {
        st.registry.tokens(caller.user(), None).await?
    };
    Ok(axum::Json(serde_json::to_value(list).unwrap_or(Value::Null)))
}

/// Revokes your own token, one confined to a namespace you administer, or any (the owner).
pub async fn revoke_token(
    State(st): St,
    axum::Extension(caller): axum::Extension<Caller>,
    Path(id): Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    let token = st.registry.token(&id).await?;
    if caller.user() != Some(token.user.as_str()) && !caller.is_owner() {
        match &token.namespace {
            Some(ns) => caller.require(ns, Role::Admin)?,
            None => return Err(ApiError::Forbidden(format!("token {id:?} is not yours to revoke"))),
        }
    }
    let record = st.registry.revoke_token(&id).await?;
    st.auth.invalidate();
    Ok(axum::Json(serde_json::to_value(record).unwrap_or(Value::Null)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every word a route puts after `{name}` is one model names may not end with; else
    /// `/v1/models/m/WORD` would be read as model `m/WORD`.
    #[test]
    fn every_word_after_a_model_name_is_a_path_word() {
        for route in crate::api::routes() {
            if let Some((_, rest)) = route.path.split_once("{name}/") {
                let word = rest.split('/').next().unwrap_or_default();
                assert!(PATH_WORDS.contains(&word), "{} {}: add {word:?} to PATH_WORDS", route.method, route.path);
            }
        }
    }

    #[test]
    fn namespaced_paths_become_one_segment() {
        let cases = [
            ("/v2/models/team/fraud/infer", Some("/v2/models/team%2Ffraud/infer")),
            ("/v2/models/team/fraud", Some("/v2/models/team%2Ffraud")),
            ("/v2/models/team/fraud/versions/2/infer?x=1", Some("/v2/models/team%2Ffraud/versions/2/infer?x=1")),
            ("/v1/models/team/fraud/aliases/champion", Some("/v1/models/team%2Ffraud/aliases/champion")),
            ("/v2/repository/models/team/fraud/load", Some("/v2/repository/models/team%2Ffraud/load")),
            ("/v2/models/iris/infer", None),
            ("/v2/models/iris/versions/1", None),
            ("/v1/models/iris/versions", None),
            ("/v1/models/iris/rollout/promote", None),
            ("/v2/models/iris", None),
            ("/v1/models/iris/live", None),
            ("/v2/models/stats", None),
            ("/v2/health/ready", None),
            ("/v1/models", None),
        ];
        for (path, want) in cases {
            let got = join_namespaced(&path.parse().unwrap()).map(|u| u.to_string());
            assert_eq!(got.as_deref(), want, "{path}");
        }
    }
}
