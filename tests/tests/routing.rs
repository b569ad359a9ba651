//! Traffic policies against a real server: weighted sticky splits, live split changes, aliases,
//! experiments fed by feedback, retirement by time-to-live, and webhooks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use algolink_tests::TestServer;
use serde_json::{Value, json};

fn iris(id: Option<&str>) -> Value {
    let mut body =
        json!({ "inputs": [{ "name": "input", "shape": [1, 4], "datatype": "FP32", "data": [5.9, 3.0, 5.1, 1.8] }] });
    if let Some(id) = id {
        body["id"] = json!(id);
    }
    body
}

/// One routed answer: status, the body's model_version, and the variant and version headers.
struct Routed {
    status: u16,
    version: String,
    header_version: String,
    variant: String,
}

async fn routed(server: &TestServer, key: Option<&str>, id: Option<&str>) -> Routed {
    let mut r = server.client.post(server.url("/v2/models/iris/infer")).body(iris(id).to_string());
    if let Some(k) = key {
        r = r.header("x-algolink-key", k);
    }
    let r = r.send().await.expect("infer");
    let status = r.status().as_u16();
    let header = |name: &str| r.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let (header_version, variant) = (header("x-algolink-version"), header("x-algolink-variant"));
    let body: Value = r.json().await.unwrap_or(Value::Null);
    Routed { status, version: body["model_version"].as_str().unwrap_or("").to_string(), header_version, variant }
}

async fn two_iris_versions(config: &str) -> Arc<TestServer> {
    let server = TestServer::start(config).await;
    server.push("iris", "iris_logreg.onnx").await;
    server.push("iris", "iris_forest.onnx").await;
    Arc::new(server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_90_10_split_is_observed_and_every_key_is_sticky() {
    let server = two_iris_versions("").await;
    let route = json!({ "variants": [{ "target": 1, "weight": 90 }, { "target": "2", "weight": 10 }] });
    server.ok("PUT", "/v1/models/iris/route", Some(route)).await;
    let keys: Vec<String> = (0..10_000).map(|i| format!("user-{i}")).collect();
    let first = assign(&server, &keys).await;
    let on_two = first.values().filter(|v| *v == "2").count();
    let share = on_two as f64 / keys.len() as f64 * 100.0;
    println!("90/10 split: version 2 answered {on_two} of {} requests ({share:.2}%)", keys.len());
    assert!((share - 10.0).abs() <= 2.0, "version 2 got {share:.2}%, want 10 ± 2");
    // Asked again, every key lands where it did.
    let again = assign(&server, &keys[..3000]).await;
    let moved = again.iter().filter(|(k, v)| first[*k] != **v).count();
    assert_eq!(moved, 0, "{moved} keys changed variant");
    // Without the header, the request id is the key.
    let by_id: Vec<String> = futures_util::future::join_all((0..3).map(|_| routed(&server, None, Some("order-77"))))
        .await
        .into_iter()
        .map(|r| r.version)
        .collect();
    assert!(by_id.iter().all(|v| *v == by_id[0]), "{by_id:?}");
    let listing = server.ok("GET", "/v1/models/iris", None).await;
    assert_eq!(listing["traffic"]["variants"][1]["percent"], 10.0, "{listing}");
    Arc::try_unwrap(server).ok().expect("sole owner").stop().await;
}

/// Sends one request per key, 32 at a time; returns key → version (checking the headers agree).
async fn assign(server: &Arc<TestServer>, keys: &[String]) -> HashMap<String, String> {
    let queue = Arc::new(Mutex::new(keys.to_vec()));
    let mut clients = Vec::new();
    for _ in 0..32 {
        let (server, queue) = (server.clone(), queue.clone());
        clients.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            loop {
                let Some(key) = queue.lock().unwrap().pop() else { break };
                let r = routed(&server, Some(&key), None).await;
                assert_eq!(r.status, 200);
                assert_eq!(r.version, r.header_version, "body and header name the same version");
                assert_eq!(r.variant, r.version, "variants named by version number");
                seen.push((key, r.version));
            }
            seen
        }));
    }
    let mut out = HashMap::new();
    for c in clients {
        out.extend(c.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn split_changes_under_load_fail_nothing_and_apply_at_once() {
    // `latest` keeps only version 2 loaded: version 1 serves only while a route names it, so each
    // change below also loads or unloads a version.
    let server = two_iris_versions("").await;
    let to = |weights: [u32; 2]| json!({ "variants": [{ "target": 1, "weight": weights[0] }, { "target": 2, "weight": weights[1] }] });
    server.ok("PUT", "/v1/models/iris/route", Some(to([100, 0]))).await;
    let start = Instant::now();
    let stop_at = start + Duration::from_millis(4500);
    let mut clients = Vec::new();
    for c in 0..16 {
        let server = server.clone();
        clients.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut i = 0;
            while Instant::now() < stop_at {
                let sent = Instant::now();
                let r = routed(&server, Some(&format!("c{c}-{i}")), None).await;
                seen.push((sent, r.status, r.version));
                i += 1;
            }
            seen
        }));
    }
    // (asked, answered) per change: a request sent between two changes sees the earlier one.
    let mut changed = Vec::new();
    let only = |v: u64| json!({ "variants": [{ "target": v, "weight": 100 }] });
    for (at, route) in [(1000, Some(to([50, 50]))), (2000, Some(only(2))), (3000, Some(only(1)))] {
        tokio::time::sleep_until((start + Duration::from_millis(at)).into()).await;
        let asked = Instant::now();
        server.ok("PUT", "/v1/models/iris/route", route).await;
        changed.push((asked, Instant::now()));
        if at == 2000 {
            let loaded = server.ok("GET", "/v1/models/iris", None).await["versions"][0]["state"].clone();
            assert_eq!(loaded, "unloaded", "no route or policy names version 1 any more");
        }
    }
    let mut all = Vec::new();
    for c in clients {
        all.extend(c.await.unwrap());
    }
    algolink_tests::assert_none_failed(all.iter().map(|s| s.1));
    let between = |from: Instant, to: Instant| all.iter().filter(move |s| s.0 > from && s.0 < to);
    // A request sent after the change answered is routed by the new split.
    let only_two: Vec<_> = between(changed[1].1, changed[2].0).filter(|s| s.2 != "2").collect();
    assert!(
        only_two.is_empty(),
        "{} requests after the switch to version 2 were answered by version 1",
        only_two.len()
    );
    let only_one: Vec<_> = between(changed[2].1, stop_at).filter(|s| s.2 != "1").collect();
    assert!(only_one.is_empty(), "{} requests after the switch back went to version 2", only_one.len());
    let reload = changed[2].1 - changed[2].0;
    println!("switching back to version 1 (unloaded meanwhile) took {reload:?}, loading included");
    let mixed = between(changed[0].1, changed[1].0);
    let (ones, total) = mixed.fold((0, 0), |(o, t), s| (o + usize::from(s.2 == "1"), t + 1));
    assert!(ones > total / 4 && ones < total * 3 / 4, "50/50 phase: {ones} of {total} on version 1");
    println!("live split changes: {} requests, none failed", all.len());
    Arc::try_unwrap(server).ok().expect("sole owner").stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn aliases_route_and_answer_by_name() {
    let server = two_iris_versions("").await;
    server.ok("PUT", "/v1/models/iris/aliases/champion", Some(json!({ "version": 1 }))).await;
    let (status, body) = server.infer("/v2/models/iris/versions/champion/infer", &iris(None)).await;
    assert_eq!((status, body["model_version"].as_str()), (200, Some("1")), "{body}");
    let (status, body) = server.infer("/v2/models/iris/versions/nobody/infer", &iris(None)).await;
    assert_eq!(status, 404);
    assert!(body["error"].as_str().unwrap().contains("no version or alias \"nobody\""), "{body}");
    let (status, body) = server.call("PUT", "/v1/models/iris/aliases/7", Some(json!({ "version": 1 }))).await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = server.call("PUT", "/v1/models/iris/aliases/champion", Some(json!({ "version": 9 }))).await;
    assert_eq!(status, 404);
    let (status, body) = server
        .call("PUT", "/v1/models/iris/route", Some(json!({ "variants": [{ "target": "ghost", "weight": 100 }] })))
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("no alias \"ghost\""), "{body}");
    let (status, body) =
        server.call("PUT", "/v1/models/iris/route", Some(json!({ "variants": [{ "target": 1, "weight": 60 }] }))).await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("sum to 100"), "{body}");
    // Routing by alias follows the alias when it moves.
    server
        .ok("PUT", "/v1/models/iris/route", Some(json!({ "variants": [{ "target": "champion", "weight": 100 }] })))
        .await;
    let r = routed(&server, Some("k"), None).await;
    assert_eq!((r.version.as_str(), r.variant.as_str()), ("1", "champion"));
    server.ok("PUT", "/v1/models/iris/aliases/champion", Some(json!(2))).await;
    assert_eq!(routed(&server, Some("k"), None).await.version, "2");
    let events = server.ok("GET", "/v1/events?model=iris&kind=alias", None).await;
    let messages: Vec<&str> = events.as_array().unwrap().iter().map(|e| e["message"].as_str().unwrap()).collect();
    assert_eq!(messages, ["alias champion now points at version 1", "alias champion now points at version 2 (was 1)"]);
    // Unloading the model through the repository API stops routed traffic too, until it loads.
    server.ok("POST", "/v2/repository/models/iris/unload", None).await;
    assert_eq!(routed(&server, Some("k"), None).await.status, 503);
    server.ok("POST", "/v2/repository/models/iris/load", None).await;
    assert_eq!(routed(&server, Some("k"), None).await.version, "2");
    Arc::try_unwrap(server).ok().expect("sole owner").stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_experiment_joins_feedback_and_concludes_by_moving_the_alias() {
    let server = two_iris_versions("").await;
    server.ok("PUT", "/v1/models/iris/aliases/champion", Some(json!(1))).await;
    server.ok("PUT", "/v1/models/iris/aliases/challenger", Some(json!(2))).await;
    let route =
        json!({ "variants": [{ "target": "champion", "weight": 50 }, { "target": "challenger", "weight": 50 }] });
    server.ok("PUT", "/v1/models/iris/route", Some(route)).await;
    let (status, e) = server
        .call("POST", "/v1/models/iris/experiments", Some(json!({ "goal": "conversion", "min_samples": 50 })))
        .await;
    assert_eq!(status, 201, "{e}");
    let id = e["id"].as_u64().unwrap();
    assert_eq!((e["control"].as_u64(), e["versions"].clone()), (Some(1), json!([1, 2])));
    let (status, _) = server.call("POST", "/v1/models/iris/experiments", Some(json!({}))).await;
    assert_eq!(status, 409, "one running experiment per model");
    // 600 requests; version 2 converts every other time, version 1 one time in ten.
    let mut feedback = Vec::new();
    for i in 0..600 {
        let rid = format!("r{i}");
        let r = routed(&server, None, Some(&rid)).await;
        assert_eq!(r.status, 200);
        let converted = if r.version == "2" { i % 2 == 0 } else { i % 10 == 0 };
        feedback.push(json!({ "model": "iris", "id": rid, "value": if converted { 1 } else { 0 } }));
    }
    for chunk in feedback.chunks(100) {
        let answer = server.ok("POST", "/v1/feedback", Some(Value::Array(chunk.to_vec()))).await;
        assert_eq!(answer["recorded"], 100);
    }
    let again = server.ok("POST", "/v1/feedback", Some(feedback[0].clone())).await;
    assert_eq!((again["recorded"].as_u64(), again["duplicates"].as_u64()), (Some(0), Some(1)));
    for (bad, status, says) in [
        (json!({ "model": "iris", "id": "never-sent", "value": 1 }), 404, "no record"),
        (json!({ "model": "iris", "id": "r1", "value": 0.5 }), 400, "not a valid conversion"),
        (json!({ "model": "iris", "id": "r1", "key": "u", "value": 1 }), 400, "exactly one"),
        (json!({ "model": "iris", "id": "r1", "value": 1, "colour": 2 }), 400, "unknown field"),
        (json!({ "model": "nope", "id": "r1", "value": 1 }), 409, "no running experiment"),
    ] {
        let (got, body) = server.call("POST", "/v1/feedback", Some(bad.clone())).await;
        assert_eq!(got, status, "{bad} → {body}");
        assert!(body["error"].as_str().unwrap_or("").contains(says), "{bad} → {body}");
    }
    let report = server.ok("GET", &format!("/v1/experiments/{id}"), None).await;
    let variants = report["variants"].as_array().unwrap();
    assert_eq!(variants[0]["outcomes"].as_u64().unwrap() + variants[1]["outcomes"].as_u64().unwrap(), 600);
    assert!(variants[0]["requests"].as_u64().unwrap() > 200, "{report}");
    assert_eq!(variants[1]["verdict"], "better", "{report}");
    assert!(variants[1]["p_value"].as_f64().unwrap() <= 0.05);
    println!("experiment report: {}", serde_json::to_string(&variants).unwrap());
    let (_, metrics) = server.get("/metrics").await;
    for line in [
        "algolink_route_share_percent{model=\"iris\",variant=\"champion\",version=\"1\"} 50",
        &format!(
            "algolink_experiment_outcomes_total{{model=\"iris\",experiment=\"{id}\",version=\"2\"}} {}",
            variants[1]["outcomes"]
        ),
    ] {
        assert!(metrics.lines().any(|l| l == line), "/metrics lacks {line}");
    }
    // The controller records the decision (it stands, across restarts too) and says so.
    server
        .wait_for("/v1/events?model=iris&kind=experiment", Duration::from_secs(10), |e| {
            e.as_array()
                .into_iter()
                .flatten()
                .any(|e| e["message"].as_str().unwrap_or("").contains("version 2 is better"))
        })
        .await;
    let decided = server.ok("GET", &format!("/v1/experiments/{id}"), None).await;
    assert_eq!(decided["decisions"]["2"]["verdict"], "better", "{decided}");
    let done = server.ok("POST", &format!("/v1/experiments/{id}/conclude"), None).await;
    assert_eq!(done["experiment"]["state"], "concluded");
    let model = server.ok("GET", "/v1/models/iris", None).await;
    assert_eq!(model["aliases"]["champion"], 2, "the winner takes the champion alias");
    let events = server.ok("GET", "/v1/events?model=iris&kind=experiment", None).await;
    let concluded = events.as_array().unwrap().last().unwrap()["message"].as_str().unwrap().to_string();
    assert!(concluded.contains("version 2 wins"), "{events}");
    let (status, _) = server.call("POST", &format!("/v1/experiments/{id}/stop"), None).await;
    assert_eq!(status, 409, "already concluded");
    Arc::try_unwrap(server).ok().expect("sole owner").stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_version_past_its_ttl_retires_but_the_last_serving_one_stays() {
    let server =
        TestServer::start("[server]\nlifecycle_interval_ms = 100\n[models.iris]\nversion_policy = { latest = 2 }\n")
            .await;
    server.push("iris", "iris_logreg.onnx").await;
    let body = std::fs::read(algolink_tests::fixture("iris_forest.onnx")).unwrap();
    let r = server
        .client
        .post(server.url("/v1/models/iris/versions?ttl_s=1&tags=forest,candidate"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r =
        server.client.post(server.url("/v1/models/solo/versions?ttl_s=0.3")).body(body.clone()).send().await.unwrap();
    assert_eq!(r.status(), 201);
    // Refused before anything is stored: no version 2 of solo appears.
    for query in ["ttl_s=1e300", "ttl_s=-1", "ttl_s=soon", "tags=a,,b%0Ac", "colour=red"] {
        let url = server.url(&format!("/v1/models/solo/versions?{query}"));
        let r = server.client.post(url).body(body.clone()).send().await.unwrap();
        assert_eq!(r.status(), 400, "{query}");
    }
    let (status, _) = server.call("PATCH", "/v1/models/solo/versions/1", Some(json!({ "ttl_s": 1e300 }))).await;
    assert_eq!(status, 400);
    assert_eq!(server.ok("GET", "/v1/models/solo", None).await["versions"].as_array().unwrap().len(), 1);
    let v2 = server.ok("GET", "/v1/models/iris", None).await["versions"][1].clone();
    assert_eq!(v2["tags"], json!(["candidate", "forest"]));
    assert!(v2["expires_at_ms"].as_u64().is_some());
    assert_eq!(routed(&server, None, None).await.version, "2", "the newest serves until it expires");
    // The registry records the retirement first, then traffic moves: wait for both.
    let model = server
        .wait_for("/v1/models/iris", Duration::from_secs(10), |m| {
            m["versions"][1]["state"] == "retired" && m["serving_version"] == 1
        })
        .await;
    assert!(model["versions"][1]["reason"].as_str().unwrap().contains("time-to-live"), "{model}");
    assert_eq!(routed(&server, None, None).await.version, "1");
    let events = server.ok("GET", "/v1/events?kind=retired", None).await;
    assert_eq!(events.as_array().unwrap().len(), 1, "only iris v2 retired: {events}");
    assert_eq!((events[0]["model"].as_str(), events[0]["version"].as_u64()), (Some("iris"), Some(2)));
    // solo's only version expired too, long ago by now: it keeps serving.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let solo = server.ok("GET", "/v1/models/solo", None).await;
    assert_eq!((solo["versions"][0]["state"].as_str(), solo["serving_version"].as_u64()), (Some("ready"), Some(1)));
    let (status, _) = server.infer("/v2/models/solo/infer", &iris(None)).await;
    assert_eq!(status, 200);
    server.stop().await;
}

/// A webhook receiver: the first delivery fails with a 500, the rest succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn webhooks_deliver_events_and_retry_after_a_failure() {
    type Received = Arc<Mutex<Vec<(u16, String, Value)>>>;
    let received: Received = Arc::default();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post({
            let received = received.clone();
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let received = received.clone();
                async move {
                    let mut r = received.lock().unwrap();
                    let status = if r.is_empty() { 500 } else { 200 };
                    let delivery =
                        headers.get("x-algolink-delivery").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
                    r.push((status, delivery, serde_json::from_slice(&body).unwrap_or(Value::Null)));
                    axum::http::StatusCode::from_u16(status).unwrap()
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let config = format!("[[webhooks]]\nurl = \"{hook_url}\"\nbackoff_ms = 100\nkinds = [\"pushed\", \"ready\"]\n");
    let server = TestServer::start(&config).await;
    server.push("iris", "iris_logreg.onnx").await;
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let got: Vec<String> = received
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.0 == 200)
            .map(|r| r.2["kind"].as_str().unwrap_or("").to_string())
            .collect();
        if got.len() >= 2 {
            assert_eq!(got, ["pushed", "ready"]);
            break;
        }
        assert!(Instant::now() < until, "deliveries so far: {:?}", received.lock().unwrap());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = received.lock().unwrap().clone();
    assert_eq!((r[0].0, r[0].1.ends_with("-1")), (500, true), "the first attempt failed: {r:?}");
    assert_eq!((r[1].0, r[1].1.ends_with("-2")), (200, true), "the same event, second attempt: {r:?}");
    assert_eq!(r[0].2["id"], r[1].2["id"]);
    assert_eq!(r[1].2["model"], "iris");
    assert_eq!(r[1].2["version"], 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thompson_routing_moves_traffic_to_the_variant_that_converts() {
    let server = two_iris_versions("[server]\nlifecycle_interval_ms = 100\n").await;
    let route = json!({ "variants": [{ "target": 1 }, { "target": 2 }], "strategy": "thompson", "floor": 5, "rebalance_s": 0.2 });
    server.ok("PUT", "/v1/models/iris/route", Some(route)).await;
    let (status, e) = server.call("POST", "/v1/models/iris/experiments", Some(json!({ "goal": "conversion" }))).await;
    assert_eq!(status, 201, "{e}");
    let share_of_two = |m: &Value| m["traffic"]["variants"][1]["percent"].as_f64().unwrap_or(0.0);
    let before = share_of_two(&server.ok("GET", "/v1/models/iris", None).await);
    assert!((40.0..=60.0).contains(&before), "no outcomes yet: about even, not {before}");
    // Version 2 converts 30% of the time, version 1 10%; outcomes arrive by routing key.
    let mut sent = 0;
    for round in 0..8 {
        let mut feedback = Vec::new();
        for i in 0..100 {
            let key = format!("u{round}-{i}");
            let r = routed(&server, Some(&key), None).await;
            let converted = if r.version == "2" { i % 10 < 3 } else { i % 10 == 0 };
            feedback.push(json!({ "model": "iris", "key": key, "value": u8::from(converted) }));
            sent += 1;
        }
        server.ok("POST", "/v1/feedback", Some(Value::Array(feedback))).await;
        tokio::time::sleep(Duration::from_millis(250)).await; // a few controller ticks
    }
    let model = server.ok("GET", "/v1/models/iris", None).await;
    let after = share_of_two(&model);
    println!("thompson: version 2's share went from {before}% to {after}% after {sent} requests");
    assert!(after >= 90.0, "{}", model["traffic"]);
    assert!(model["traffic"]["variants"][0]["percent"].as_f64().unwrap() >= 5.0, "the floor holds");
    Arc::try_unwrap(server).ok().expect("sole owner").stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_version_failing_its_gates_against_the_champion_retires() {
    let config = r#"
        [server]
        lifecycle_interval_ms = 100
        [models.m]
        version_policy = { latest = 2 }
        [models.m.retirement]
        on_loss = true
        gate_window_s = 0.5
        gates = { min_requests = 20 }
    "#;
    let server = Arc::new(TestServer::start(config).await);
    server.push("m", "canary_fast.onnx").await;
    server.push("m", "canary_broken.onnx").await;
    let route = json!({ "variants": [{ "target": 1, "weight": 50 }, { "target": 2, "weight": 50 }] });
    server.ok("PUT", "/v1/models/m/route", Some(route)).await;
    let body =
        json!({ "inputs": [{ "name": "input", "shape": [1, 4], "datatype": "FP32", "data": [0.5, -1.0, 2.0, 0.25] }] });
    // A failed answer names the version that failed, as a successful one does.
    let r =
        server.client.post(server.url("/v2/models/m/versions/2/infer")).body(body.to_string()).send().await.unwrap();
    assert_eq!(
        (r.status().as_u16(), r.headers().get("x-algolink-version").cloned()),
        (500, Some("2".parse().unwrap()))
    );
    let load = {
        let (server, body) = (server.clone(), body.clone());
        tokio::spawn(async move {
            let until = Instant::now() + Duration::from_secs(15);
            while Instant::now() < until {
                let (_, model) = server.call("GET", "/v1/models/m", None).await;
                if model["versions"][1]["state"] == "retired" {
                    break;
                }
                for _ in 0..20 {
                    server.infer("/v2/models/m/infer", &body).await;
                }
            }
        })
    };
    // Retired in the registry, and no longer in the route.
    let model = server
        .wait_for("/v1/models/m", Duration::from_secs(15), |m| {
            m["versions"][1]["state"] == "retired" && m["traffic"]["variants"].as_array().is_some_and(|v| v.len() == 1)
        })
        .await;
    load.await.unwrap();
    let reason = model["versions"][1]["reason"].as_str().unwrap();
    println!("retired: {reason}");
    assert!(reason.contains("failed its gates against version 1") && reason.contains("error rate"), "{reason}");
    let (status, answer) = server.infer("/v2/models/m/infer", &body).await;
    assert_eq!((status, answer["model_version"].as_str()), (200, Some("1")), "{answer}");
    Arc::try_unwrap(server).ok().expect("sole owner").stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn routes_aliases_experiments_and_outcomes_survive_a_restart() {
    let server = Arc::try_unwrap(two_iris_versions("").await).ok().expect("sole owner");
    server.ok("PUT", "/v1/models/iris/aliases/champion", Some(json!(1))).await;
    let route = json!({ "variants": [{ "target": "champion", "weight": 70 }, { "target": 2, "weight": 30 }] });
    server.ok("PUT", "/v1/models/iris/route", Some(route)).await;
    let (_, e) =
        server.call("POST", "/v1/models/iris/experiments", Some(json!({ "goal": "reward", "min_effect": 0.5 }))).await;
    let id = e["id"].as_u64().unwrap();
    let mut feedback = Vec::new();
    for i in 0..50 {
        let r = routed(&server, Some(&format!("k{i}")), None).await;
        feedback.push(json!({ "model": "iris", "key": format!("k{i}"), "value": i as f64 / 10.0 }));
        assert_eq!(r.status, 200);
    }
    assert_eq!(server.ok("POST", "/v1/feedback", Some(Value::Array(feedback))).await["recorded"], 50);
    let before: Vec<String> = futures_util::future::join_all((0..20).map(|i| {
        let server = &server;
        async move { routed(server, Some(&format!("k{i}")), None).await.version }
    }))
    .await;

    let server = server.restart().await;
    let model = server.ok("GET", "/v1/models/iris", None).await;
    assert_eq!(model["aliases"]["champion"], 1);
    assert_eq!(model["traffic"]["variants"][0]["percent"], 70.0, "{model}");
    let after: Vec<String> = futures_util::future::join_all((0..20).map(|i| {
        let server = &server;
        async move { routed(server, Some(&format!("k{i}")), None).await.version }
    }))
    .await;
    assert_eq!(before, after, "keys keep their variant across a restart");
    let report = server.ok("GET", &format!("/v1/experiments/{id}"), None).await;
    assert_eq!(report["state"], "running");
    let outcomes: u64 = report["variants"].as_array().unwrap().iter().map(|v| v["outcomes"].as_u64().unwrap()).sum();
    assert_eq!(outcomes, 50, "every acknowledged outcome is still counted: {report}");
    server.stop().await;
}

/// With `on_loss`, the loser of an experiment retires whichever side it is on: here the
/// challenger wins, so the control retires and the challenger takes all traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_control_beaten_by_its_challenger_retires_on_loss() {
    let config = r#"
        [server]
        lifecycle_interval_ms = 100
        [models.iris]
        version_policy = { latest = 2 }
        [models.iris.retirement]
        on_loss = true
    "#;
    let server = Arc::try_unwrap(two_iris_versions(config).await).ok().expect("sole owner");
    let route = json!({ "variants": [{ "target": 1, "weight": 50 }, { "target": 2, "weight": 50 }] });
    server.ok("PUT", "/v1/models/iris/route", Some(route)).await;
    let goal = json!({ "goal": "reward", "min_samples": 30, "min_effect": 0.1 });
    let e = server.ok("POST", "/v1/models/iris/experiments", Some(goal)).await;
    // Version 2's reward is about 1 higher, with noise: the test must find it.
    for round in 0..20 {
        let mut feedback = Vec::new();
        for i in 0..20 {
            let key = format!("k{round}-{i}");
            let r = routed(&server, Some(&key), None).await;
            if r.status != 200 {
                continue;
            }
            let noise = ((round * 20 + i) % 7) as f64 / 7.0 - 0.5;
            let value = if r.version == "2" { 1.0 + noise } else { noise };
            feedback.push(json!({ "model": "iris", "key": key, "value": value }));
        }
        server.ok("POST", "/v1/feedback", Some(Value::Array(feedback))).await;
        let (_, model) = server.call("GET", "/v1/models/iris", None).await;
        if model["versions"][0]["state"] == "retired" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let model = server
        .wait_for("/v1/models/iris", Duration::from_secs(10), |m| {
            m["versions"][0]["state"] == "retired" && m["traffic"]["variants"].as_array().is_some_and(|v| v.len() == 1)
        })
        .await;
    let reason = model["versions"][0]["reason"].as_str().unwrap();
    assert!(reason.contains("found version 2 better than it (difference"), "{reason}");
    assert_eq!(model["versions"][1]["state"], "ready");
    let events = server.ok("GET", "/v1/events?model=iris&kind=retired", None).await;
    assert_eq!(events[0]["version"], 1, "{events}");
    for _ in 0..10 {
        assert_eq!(routed(&server, None, None).await.version, "2", "the winner takes all traffic");
    }
    let report = server.ok("GET", &format!("/v1/experiments/{}", e["id"]), None).await;
    println!("{reason}\n{report}");
    server.stop().await;
}
