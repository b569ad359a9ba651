//! The web console at `/ui`: three assets compiled into the binary (no build step, nothing
//! fetched at run time) that drive the JSON API, and a login that trades a token for a session.
//!
//! A session is a token of its own (the same user and confinement, `console session`, expiring
//! after [`SESSION_TTL_MS`], and revoked with the token it came from), carried in an `HttpOnly`,
//! `SameSite=Strict` cookie: revoking it or the user's membership ends it like any token, and
//! logging out revokes it.

use std::sync::Arc;

use algolink_registry::access::TokenRequest;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::json;

use crate::error::ApiError;
use crate::state::AppState;

pub const SESSION_COOKIE: &str = "algolink_session";
/// Sent by the console's scripts with every change they make (see `auth::caller`).
pub const CONSOLE_HEADER: &str = "x-algolink-console";
pub const SESSION_TTL_MS: u64 = 12 * 3600 * 1000;

const INDEX: &str = include_str!("../ui/index.html");
const SCRIPT: &str = include_str!("../ui/app.js");
const STYLE: &str = include_str!("../ui/app.css");

/// Only our own scripts and styles run on the console's pages.
const CSP: &str =
    "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = (StatusCode::OK, body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

pub async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX)
}

pub async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

pub async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

/// The session token in a request's cookies, if any.
pub fn session(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| pair.trim().strip_prefix(SESSION_COOKIE)?.strip_prefix('='))
        .filter(|t| !t.is_empty())
}

fn cookie(headers: &HeaderMap, value: &str, max_age_s: u64) -> HeaderValue {
    // Behind a TLS-terminating proxy the cookie never travels in clear.
    let secure = headers.get("x-forwarded-proto").is_some_and(|p| p.as_bytes().eq_ignore_ascii_case(b"https"));
    let value = format!(
        "{SESSION_COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age_s}{}",
        if secure { "; Secure" } else { "" }
    );
    HeaderValue::from_str(&value).expect("a token is a valid cookie value")
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Login {
    token: String,
}

/// Refuses a request that did not come from the console's own scripts: they send
/// [`CONSOLE_HEADER`], which another site's form or page cannot without a CORS grant we never
/// give. What a session changes, and logging in and out, go through here: no request forgery.
pub fn require_console(headers: &HeaderMap, what: &str) -> Result<(), ApiError> {
    if headers.contains_key(CONSOLE_HEADER) {
        Ok(())
    } else {
        Err(ApiError::Forbidden(format!("{what} only from the console (header {CONSOLE_HEADER:?})")))
    }
}

/// Checks the token and answers with a session cookie and who the user is.
pub async fn login(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    require_console(&headers, "log in")?;
    if !st.auth.enabled {
        return Ok(axum::Json(json!({ "user": null, "auth": "off" })).into_response());
    }
    let req: Login = crate::api::parse_json_or_empty(&body, "login (want {\"token\": \"alk_...\"})")?;
    let principal = match st.auth.resolve(&st, req.token.trim()).await? {
        Ok(p) => p,
        Err(refusal) => {
            return Err(ApiError::Unauthorized(format!("the token is {}", refusal.as_str())));
        }
    };
    let now = crate::lifecycle::now_ms();
    let ttl_ms = principal.expires_at_ms.map_or(SESSION_TTL_MS, |e| e.saturating_sub(now).min(SESSION_TTL_MS));
    let request = TokenRequest {
        user: principal.user.clone(),
        namespace: principal.scope.clone(),
        description: "console session".into(),
        ttl_ms: Some(ttl_ms.max(1)),
        // A session traded for a session still dies with the token the user typed.
        parent: Some(principal.parent.clone().unwrap_or_else(|| principal.token_id.clone())),
    };
    let (token, _) = st.registry.create_token(&request).await?;
    tracing::info!(user = principal.user, "console login");
    let mut response = axum::Json(&*principal).into_response();
    response.headers_mut().insert(header::SET_COOKIE, cookie(&headers, &token, ttl_ms / 1000));
    Ok(response)
}

/// Revokes the session's token and clears the cookie.
pub async fn logout(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Result<Response, ApiError> {
    require_console(&headers, "log out")?;
    if let Some(token) = session(&headers)
        && let Ok(Ok(p)) = st.auth.resolve(&st, token).await
    {
        st.registry.revoke_token(&p.token_id).await?;
        st.auth.invalidate();
    }
    let mut response = StatusCode::NO_CONTENT.into_response();
    response.headers_mut().insert(header::SET_COOKIE, cookie(&headers, "", 0));
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_session_among_cookies() {
        let mut h = HeaderMap::new();
        assert_eq!(session(&h), None);
        h.append(header::COOKIE, HeaderValue::from_static("a=1; algolink_session=alk_x_y; b=2"));
        assert_eq!(session(&h), Some("alk_x_y"));
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("algolink_sessionx=1; algolink_session="));
        assert_eq!(session(&h), None);
    }
}
