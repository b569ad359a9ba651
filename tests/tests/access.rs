//! Teams, tokens and roles against a real server with auth on: every route answers each role
//! exactly as the table below says (and the table must name every route the server has), tokens
//! expire and are revoked, names are confined to namespaces, and no secret reaches the log.

use std::collections::BTreeSet;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use algolink_registry::access::Role;
use algolink_server::api::routes;
use algolink_tests::{TestServer, fixture, reference};
use serde_json::{Value, json};

/// What a route needs, as this test specifies it (independently of the server's table).
#[derive(Clone, Copy, Debug)]
enum Need {
    Anyone,
    Token,
    /// This role (or more) in namespace `team`, where the test's model lives.
    Role(Role),
    Owner,
}

/// Every route of the server, with what the test asks and what it needs.
fn table() -> Vec<(&'static str, &'static str, Need)> {
    use Need::{Anyone, Owner, Token};
    use Role::{Admin, Predictor, Publisher, Viewer};
    let role = Need::Role;
    vec![
        ("GET", "/v2", Anyone),
        ("GET", "/v2/health/live", Anyone),
        ("GET", "/v2/health/ready", Anyone),
        ("GET", "/v2/models/stats", Token),
        ("GET", "/v2/models/{name}", role(Viewer)),
        ("GET", "/v2/models/{name}/ready", role(Viewer)),
        ("POST", "/v2/models/{name}/infer", role(Predictor)),
        ("GET", "/v2/models/{name}/stats", role(Viewer)),
        ("GET", "/v2/models/{name}/versions/{version}", role(Viewer)),
        ("GET", "/v2/models/{name}/versions/{version}/ready", role(Viewer)),
        ("POST", "/v2/models/{name}/versions/{version}/infer", role(Predictor)),
        ("GET", "/v2/models/{name}/versions/{version}/stats", role(Viewer)),
        ("POST", "/v2/repository/index", Token),
        ("POST", "/v2/repository/models/{name}/load", role(Publisher)),
        ("POST", "/v2/repository/models/{name}/unload", role(Publisher)),
        ("GET", "/v1/models", Token),
        ("GET", "/v1/models/{name}", role(Viewer)),
        ("POST", "/v1/models/{name}/versions", role(Publisher)),
        ("DELETE", "/v1/models/{name}/versions/{version}", role(Admin)),
        ("PATCH", "/v1/models/{name}/versions/{version}", role(Publisher)),
        ("PUT", "/v1/models/{name}/aliases/{alias}", role(Publisher)),
        ("DELETE", "/v1/models/{name}/aliases/{alias}", role(Publisher)),
        ("GET", "/v1/models/{name}/live", role(Viewer)),
        ("GET", "/v1/models/{name}/policy", role(Viewer)),
        ("PUT", "/v1/models/{name}/policy", role(Publisher)),
        ("GET", "/v1/models/{name}/route", role(Viewer)),
        ("PUT", "/v1/models/{name}/route", role(Publisher)),
        ("DELETE", "/v1/models/{name}/route", role(Publisher)),
        ("GET", "/v1/models/{name}/rollout", role(Viewer)),
        ("POST", "/v1/models/{name}/rollout", role(Publisher)),
        ("DELETE", "/v1/models/{name}/rollout", role(Publisher)),
        ("POST", "/v1/models/{name}/rollout/promote", role(Publisher)),
        ("POST", "/v1/models/{name}/experiments", role(Publisher)),
        ("GET", "/v1/experiments", Token),
        ("GET", "/v1/experiments/{id}", role(Viewer)),
        ("POST", "/v1/experiments/{id}/stop", role(Publisher)),
        ("POST", "/v1/experiments/{id}/conclude", role(Publisher)),
        ("POST", "/v1/feedback", role(Predictor)),
        ("GET", "/v1/events", Token),
        ("GET", "/metrics", Token),
        ("GET", "/v1/whoami", Token),
        ("GET", "/v1/namespaces", Token),
        ("POST", "/v1/namespaces", Owner),
        ("GET", "/v1/namespaces/{ns}/members", role(Admin)),
        ("PUT", "/v1/namespaces/{ns}/members/{user}", role(Admin)),
        ("DELETE", "/v1/namespaces/{ns}/members/{user}", role(Admin)),
        ("POST", "/v1/users", Owner),
        // For yourself: anyone with a token.
        ("POST", "/v1/tokens", Token),
        ("GET", "/v1/tokens", Token),
        // The target is a token of another member, confined to `team`.
        ("DELETE", "/v1/tokens/{id}", role(Admin)),
        // The console's assets hold no data; its login checks the token it is given (and, like
        // logout, that the console's script sent it: see the session test).
        ("GET", "/ui", Anyone),
        ("GET", "/ui/app.js", Anyone),
        ("GET", "/ui/app.css", Anyone),
        ("POST", "/ui/login", Anyone),
        ("POST", "/ui/logout", Anyone),
    ]
}

/// A log sink shared with the test, to look for secrets in what the server wrote.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl Write for Log {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const AUTH_ON: &str = "[auth]\nmode = \"on\"\n";

async fn token_for(server: &TestServer, owner: &str, user: &str, extra: Value) -> String {
    let mut body = json!({ "user": user, "description": format!("{user}'s") });
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    let (status, t) = server.call_as(Some(owner), "POST", "/v1/tokens", Some(body.to_string().into_bytes())).await;
    assert_eq!(status, 201, "{t}");
    t["token"].as_str().unwrap().to_string()
}

async fn ok_as(server: &TestServer, token: &str, method: &str, path: &str, body: Value) -> Value {
    let (status, answer) = server.call_as(Some(token), method, path, Some(body.to_string().into_bytes())).await;
    assert!((200..300).contains(&status), "{method} {path}: {status} {answer}");
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_route_answers_every_role_as_the_table_says() {
    let log = Log::default();
    let sink = log.clone();
    let _ =
        tracing_subscriber::fmt().with_max_level(tracing::Level::DEBUG).with_writer(move || sink.clone()).try_init();

    // The table names exactly the server's routes: a new route fails here until it has a row.
    let served: BTreeSet<(String, String)> =
        routes().iter().map(|r| (r.method.to_string(), r.path.to_string())).collect();
    let specified: BTreeSet<(String, String)> =
        table().iter().map(|(m, p, _)| (m.to_string(), p.to_string())).collect();
    assert_eq!(served, specified, "the role table and the server's routes differ");

    let server = TestServer::start(AUTH_ON).await;
    let owner = server.owner_token();
    let iris = std::fs::read(fixture("iris_logreg.onnx")).unwrap();

    // No token: refused, with the header that says how to authenticate.
    let r = server.client.get(server.url("/v1/models")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer realm=\"algolink\"");

    for ns in ["team", "other"] {
        ok_as(&server, &owner, "POST", "/v1/namespaces", json!({ "name": ns })).await;
    }
    let members = [("viewer", Role::Viewer), ("predictor", Role::Predictor), ("publisher", Role::Publisher)];
    let members = members.into_iter().chain([("admin", Role::Admin), ("target", Role::Viewer)]);
    for (user, role) in members {
        ok_as(&server, &owner, "PUT", &format!("/v1/namespaces/team/members/{user}"), json!({ "role": role })).await;
    }
    ok_as(&server, &owner, "PUT", "/v1/namespaces/other/members/outsider", json!({ "role": "admin" })).await;

    let mut callers: Vec<(&str, Option<String>, Option<Role>)> = vec![("anonymous", None, None)];
    for (user, role) in [
        ("outsider", None),
        ("viewer", Some(Role::Viewer)),
        ("predictor", Some(Role::Predictor)),
        ("publisher", Some(Role::Publisher)),
        ("admin", Some(Role::Admin)),
    ] {
        callers.push((user, Some(token_for(&server, &owner, user, json!({})).await), role));
    }
    callers.push(("owner", Some(owner.clone()), Some(Role::Admin)));

    // The model lives in `team`; pushed by its publisher, with the slash unescaped in the URL.
    let publisher = callers[4].1.clone().unwrap();
    for _ in 0..2 {
        let r = server
            .client
            .post(server.url("/v1/models/team/iris/versions"))
            .bearer_auth(&publisher)
            .body(iris.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    }
    let split = json!({ "variants": [{ "target": 1, "weight": 50 }, { "target": 2, "weight": 50 }] });
    ok_as(&server, &publisher, "PUT", "/v1/models/team/iris/route", split).await;
    let experiment = ok_as(&server, &publisher, "POST", "/v1/models/team/iris/experiments", json!({})).await;
    let target_token = token_for(&server, &owner, "target", json!({ "namespace": "team" })).await;
    let target_id = target_token.split('_').nth(1).unwrap().to_string();
    let mut secrets = vec![owner.clone(), target_token.clone()];
    secrets.extend(callers.iter().filter_map(|c| c.1.clone()));

    let request = reference("iris_logreg");
    let infer = json!({ "inputs": request["inputs"] }).to_string().into_bytes();
    let mut denials = [1u64, 0]; // (401, 403), counting the one above
    for (method, pattern, need) in table() {
        let path = pattern
            .replace("{name}", "team/iris")
            .replace("{version}", "2")
            .replace("{alias}", "champion")
            .replace("{ns}", "team")
            .replace("{user}", "target")
            .replace(
                "{id}",
                &if pattern.starts_with("/v1/tokens") { target_id.clone() } else { experiment["id"].to_string() },
            );
        let body: Option<Vec<u8>> = match (method, pattern) {
            (_, p) if p.ends_with("/infer") => Some(infer.clone()),
            ("POST", "/v1/models/{name}/versions") => Some(iris.clone()),
            ("PUT", "/v1/models/{name}/aliases/{alias}") => Some(b"1".to_vec()),
            ("PATCH", _) => Some(json!({ "tags": ["t"] }).to_string().into_bytes()),
            ("PUT", "/v1/models/{name}/policy") => Some(json!({}).to_string().into_bytes()),
            ("PUT", "/v1/models/{name}/route") => {
                Some(json!({ "variants": [{ "target": 2, "weight": 1 }] }).to_string().into_bytes())
            }
            ("POST", "/v1/feedback") => {
                Some(json!({ "model": "team/iris", "id": "r1", "value": 1 }).to_string().into_bytes())
            }
            ("POST", "/v1/namespaces") => Some(json!({ "name": "made-by-test" }).to_string().into_bytes()),
            ("PUT", "/v1/namespaces/{ns}/members/{user}") => Some(json!({ "role": "viewer" }).to_string().into_bytes()),
            ("POST", "/v1/users") => Some(json!({ "name": "newcomer" }).to_string().into_bytes()),
            ("POST", "/v1/tokens") => Some(b"{}".to_vec()),
            _ => None,
        };
        for (who, token, role) in &callers {
            let allowed = match need {
                Need::Anyone => true,
                Need::Token => token.is_some(),
                Need::Role(r) => role.is_some_and(|have| have >= r),
                Need::Owner => *who == "owner",
            };
            let console: &[(&str, &str)] =
                if pattern.starts_with("/ui/log") { &[("x-algolink-console", "1")] } else { &[] };
            let (status, answer) = server.call_with(token.as_deref(), method, &path, body.clone(), console).await;
            if let Some(t) = answer.get("token").and_then(Value::as_str) {
                secrets.push(t.to_string());
            }
            let denied = matches!(status, 401 | 403);
            assert_eq!(
                !denied,
                allowed,
                "{method} {path} as {who}: {status} {answer} (the table says {})",
                if allowed { "allowed" } else { "denied" }
            );
            if denied {
                denials[usize::from(status == 403)] += 1;
                assert!(answer["error"].as_str().is_some_and(|e| !e.is_empty()), "a denial says why: {answer}");
                assert_eq!(status, if token.is_none() { 401 } else { 403 }, "{method} {path} as {who}");
            }
        }
    }

    // Listings are filtered: the outsider sees no model of `team`, its viewer does.
    let outsider = callers[1].1.clone().unwrap();
    let viewer = callers[2].1.clone().unwrap();
    let names =
        |v: &Value| v.as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap().to_string()).collect::<Vec<_>>();
    assert_eq!(names(&ok_as(&server, &outsider, "GET", "/v1/models", json!({})).await), Vec::<String>::new());
    assert_eq!(names(&ok_as(&server, &viewer, "GET", "/v1/models", json!({})).await), ["team/iris"]);
    assert_eq!(ok_as(&server, &outsider, "GET", "/v1/events", json!({})).await, json!([]));
    assert!(!ok_as(&server, &viewer, "GET", "/v1/events", json!({})).await.as_array().unwrap().is_empty());

    // Changes name who made them in the event log.
    let pushed = ok_as(&server, &viewer, "GET", "/v1/events?model=team/iris&kind=pushed", json!({})).await;
    assert_eq!(pushed[0]["detail"]["by"], "publisher", "{pushed}");

    // /metrics holds the series of the models the caller may see; the denials only for the owner.
    let metrics_as = |token: String| {
        let r = server.client.get(server.url("/metrics")).bearer_auth(token).send();
        async move { r.await.unwrap().text().await.unwrap() }
    };
    let (seen, unseen) = (metrics_as(viewer.clone()).await, metrics_as(outsider.clone()).await);
    assert!(seen.contains("algolink_requests_total{model=\"team/iris\"") && !seen.contains("auth_denied_total{"));
    assert!(!unseen.contains("team/iris"), "{unseen}");
    let metrics = metrics_as(owner.clone()).await;
    let count = |reason: &str| -> u64 {
        let line = format!("algolink_auth_denied_total{{reason=\"{reason}\"}} ");
        metrics.lines().find_map(|l| l.strip_prefix(&line)).and_then(|v| v.parse().ok()).unwrap_or(0)
    };
    assert_eq!([count("unauthenticated"), count("forbidden")], denials, "denials counted in /metrics");

    // No token and no token hash appears in anything the server logged.
    server.stop().await;
    let written = String::from_utf8_lossy(&log.0.lock().unwrap()).to_string();
    assert!(written.contains("listening on"), "the log was captured");
    for s in &secrets {
        let secret = s.rsplit('_').next().unwrap();
        let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(secret.as_bytes()));
        assert!(!written.contains(secret) && !written.contains(&hash), "a token or its hash is in the log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_expire_are_revoked_and_stay_in_their_namespace() {
    let server = TestServer::start(AUTH_ON).await;
    let owner = server.owner_token();
    for ns in ["team", "other"] {
        ok_as(&server, &owner, "POST", "/v1/namespaces", json!({ "name": ns })).await;
    }
    ok_as(&server, &owner, "PUT", "/v1/namespaces/team/members/ann", json!({ "role": "admin" })).await;
    ok_as(&server, &owner, "PUT", "/v1/namespaces/other/members/ann", json!({ "role": "admin" })).await;
    ok_as(&server, &owner, "PUT", "/v1/namespaces/team/members/bob", json!({ "role": "predictor" })).await;
    let ann = token_for(&server, &owner, "ann", json!({})).await;

    // Pushing into a namespace that does not exist says so.
    let (status, answer) =
        server.call_as(Some(&owner), "POST", "/v1/models/nowhere/m/versions", Some(b"x".to_vec())).await;
    assert_eq!(status, 404, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("namespace \"nowhere\""), "{answer}");

    // An expired token is refused and says so.
    let short = token_for(&server, &owner, "ann", json!({ "expires_in_s": 0.2 })).await;
    ok_as(&server, &short, "GET", "/v1/whoami", json!({})).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, answer) = server.call_as(Some(&short), "GET", "/v1/whoami", None).await;
    assert_eq!((status, answer["error"].as_str()), (401, Some("the token is expired")));

    // A revoked token is refused at once (the cache is cleared by the revocation).
    let doomed = token_for(&server, &owner, "ann", json!({})).await;
    let id = doomed.split('_').nth(1).unwrap();
    ok_as(&server, &doomed, "GET", "/v1/whoami", json!({})).await;
    ok_as(&server, &ann, "DELETE", &format!("/v1/tokens/{id}"), json!({})).await;
    let (status, answer) = server.call_as(Some(&doomed), "GET", "/v1/whoami", None).await;
    assert_eq!((status, answer["error"].as_str()), (401, Some("the token is revoked")));
    let (status, _) = server.call_as(Some("alk_garbage"), "GET", "/v1/whoami", None).await;
    assert_eq!(status, 401);

    // An admin of `team` makes bob a token confined to `team`, not an unconfined one.
    let (status, answer) =
        server.call_as(Some(&ann), "POST", "/v1/tokens", Some(json!({ "user": "bob" }).to_string().into_bytes())).await;
    assert_eq!(status, 403, "{answer}");
    let bob = token_for(&server, &ann, "bob", json!({ "namespace": "team" })).await;
    let who = ok_as(&server, &bob, "GET", "/v1/whoami", json!({})).await;
    assert_eq!((who["user"].as_str(), who["scope"].as_str()), (Some("bob"), Some("team")));
    // A confined token of ann's acts only in its namespace, though ann administers both.
    let confined = token_for(&server, &ann, "ann", json!({ "namespace": "other" })).await;
    let (status, _) = server.call_as(Some(&confined), "GET", "/v1/namespaces/team/members", None).await;
    assert_eq!(status, 403);
    ok_as(&server, &confined, "GET", "/v1/namespaces/other/members", json!({})).await;
    // ... and cannot mint a token reaching further than itself.
    let (status, _) = server
        .call_as(Some(&confined), "POST", "/v1/tokens", Some(json!({ "namespace": "team" }).to_string().into_bytes()))
        .await;
    assert_eq!(status, 403);
    let (status, made) = server.call_as(Some(&confined), "POST", "/v1/tokens", Some(b"{}".to_vec())).await;
    assert_eq!((status, made["namespace"].as_str()), (201, Some("other")), "{made}");

    // Removing bob from `team` revokes the tokens confined to it.
    ok_as(&server, &ann, "DELETE", "/v1/namespaces/team/members/bob", json!({})).await;
    let (status, _) = server.call_as(Some(&bob), "GET", "/v1/whoami", None).await;
    assert_eq!(status, 401);

    // The token list never shows a secret; the owner's first token survives a restart.
    let list = ok_as(&server, &ann, "GET", "/v1/tokens", json!({})).await;
    assert!(list.as_array().unwrap().len() >= 3 && !list.to_string().contains(ann.rsplit('_').next().unwrap()));
    let server = server.restart().await;
    ok_as(&server, &owner, "GET", "/v1/whoami", json!({})).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_console_session_is_a_token_in_a_strict_cookie() {
    let server = TestServer::start(AUTH_ON).await;
    let owner = server.owner_token();
    ok_as(&server, &owner, "POST", "/v1/namespaces", json!({ "name": "team" })).await;
    ok_as(&server, &owner, "PUT", "/v1/namespaces/team/members/ann", json!({ "role": "publisher" })).await;
    let ann = token_for(&server, &owner, "ann", json!({})).await;

    let login = |token: &str| {
        let r = server.client.post(server.url("/ui/login")).header("x-algolink-console", "1");
        r.json(&json!({ "token": token })).send()
    };
    // Only the console's script logs in: a form on another site cannot plant its token's session.
    let forged = server.client.post(server.url("/ui/login")).json(&json!({ "token": &ann })).send().await.unwrap();
    assert_eq!(forged.status(), 403);
    assert!(forged.headers().get("set-cookie").is_none());
    let r = login("alk_0_bad").await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().get("set-cookie").is_none());

    let r = login(&ann).await.unwrap();
    assert_eq!(r.status(), 200);
    let set = r.headers()["set-cookie"].to_str().unwrap().to_string();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=43200"] {
        assert!(set.contains(attribute), "{set}");
    }
    let who: Value = r.json().await.unwrap();
    assert_eq!(who["user"], "ann");
    let cookie = set.split(';').next().unwrap().to_string();
    let session = cookie.split_once('=').unwrap().1.to_string();
    assert_ne!(session, ann, "the session is a token of its own, not the one typed in");

    // Reads work with the cookie; changes only with the console's header (no cross-site forgery).
    let get = |path: &str| server.client.get(server.url(path)).header("cookie", &cookie).send();
    let who: Value = get("/v1/whoami").await.unwrap().json().await.unwrap();
    assert_eq!(who["user"], "ann");
    let put = server.client.put(server.url("/v1/models/team/iris/policy")).header("cookie", &cookie).body("{}");
    let r = put.send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("x-algolink-console"));
    let push = server
        .client
        .post(server.url("/v1/models/team/iris/versions"))
        .header("cookie", &cookie)
        .header("x-algolink-console", "1")
        .body(std::fs::read(fixture("iris_logreg.onnx")).unwrap());
    let r = push.send().await.unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let model = ok_as(&server, &owner, "GET", "/v1/models/team/iris", json!({})).await;
    assert_eq!(model["versions"][0]["pushed_by"], "ann", "the version records who pushed it");

    // The session shows in the user's token list, expiring; logging out revokes it.
    let tokens = ok_as(&server, &ann, "GET", "/v1/tokens", json!({})).await;
    let sessions: Vec<&Value> =
        tokens.as_array().unwrap().iter().filter(|t| t["description"] == "console session").collect();
    assert_eq!(sessions.len(), 1, "{tokens}");
    assert!(sessions[0]["expires_at_ms"].as_u64().is_some(), "{tokens}");
    let logout = server.client.post(server.url("/ui/logout")).header("cookie", &cookie);
    assert_eq!(logout.try_clone().unwrap().send().await.unwrap().status(), 403, "logout only from the console");
    let r = logout.header("x-algolink-console", "1").send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert!(r.headers()["set-cookie"].to_str().unwrap().contains("Max-Age=0"));
    assert_eq!(get("/v1/whoami").await.unwrap().status(), 401);
    ok_as(&server, &ann, "GET", "/v1/whoami", json!({})).await;

    // A session dies with the token it was traded for.
    let r = login(&ann).await.unwrap();
    let cookie = r.headers()["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_string();
    let get = |path: &str| server.client.get(server.url(path)).header("cookie", &cookie).send();
    assert_eq!(get("/v1/whoami").await.unwrap().status(), 200);
    let ann_id = ann.split('_').nth(1).unwrap();
    ok_as(&server, &ann, "DELETE", &format!("/v1/tokens/{ann_id}"), json!({})).await;
    let r = get("/v1/whoami").await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.text().await.unwrap().contains("revoked"));

    // The console itself is served to anyone (it holds no data), with a strict content policy.
    let page = server.client.get(server.url("/ui")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-security-policy"].to_str().unwrap().starts_with("default-src 'self'"));
    server.stop().await;
}
