//! Shadow traffic against a real server: mirrored requests are measured and compared, never
//! returned, and the primary's latency does not move. Alone in its file so that no other test's
//! load skews the latency comparison.

use std::sync::Arc;
use std::time::{Duration, Instant};

use algolink_tests::TestServer;
use serde_json::{Value, json};

fn iris() -> String {
    json!({ "inputs": [{ "name": "input", "shape": [1, 4], "datatype": "FP32", "data": [5.9, 3.0, 5.1, 1.8] }] })
        .to_string()
}

/// Runs `clients` closed-loop clients for `for_`; returns every latency and every answering version.
async fn load(server: &Arc<TestServer>, clients: usize, for_: Duration) -> (Vec<Duration>, Vec<String>) {
    let stop_at = Instant::now() + for_;
    let mut tasks = Vec::new();
    for c in 0..clients {
        let server = server.clone();
        tasks.push(tokio::spawn(async move {
            let (mut lat, mut versions) = (Vec::new(), Vec::new());
            let mut i = 0;
            while Instant::now() < stop_at {
                let sent = Instant::now();
                let r = server
                    .client
                    .post(server.url("/v2/models/iris/infer"))
                    .header("x-algolink-key", format!("{c}-{i}"))
                    .body(iris())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                let body: Value = r.json().await.unwrap();
                lat.push(sent.elapsed());
                versions.push(body["model_version"].as_str().unwrap_or("").to_string());
                i += 1;
            }
            (lat, versions)
        }));
    }
    let (mut lat, mut versions) = (Vec::new(), Vec::new());
    for t in tasks {
        let (l, v) = t.await.unwrap();
        lat.extend(l);
        versions.extend(v);
    }
    (lat, versions)
}

fn p99(mut lat: Vec<Duration>) -> Duration {
    lat.sort_unstable();
    lat[(lat.len() * 99 / 100).min(lat.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shadow_is_recorded_never_returned_and_leaves_primary_latency_alone() {
    let server = TestServer::default().await;
    server.push("iris", "iris_logreg.onnx").await;
    server.push("iris", "iris_forest.onnx").await;
    let server = Arc::new(server);
    let plain = json!({ "variants": [{ "target": 1, "weight": 100 }] });
    let shadowed = json!({ "variants": [{ "target": 1, "weight": 100 }], "shadow": { "target": 2, "percent": 100 } });
    // Alternate phases so that drift in the machine's speed hits both alike.
    let (mut off, mut on) = (Vec::new(), Vec::new());
    let mut versions = Vec::new();
    load(&server, 8, Duration::from_millis(500)).await; // warm-up
    for phase in 0..6 {
        let with_shadow = phase % 2 == 1;
        let route = if with_shadow { &shadowed } else { &plain };
        server.ok("PUT", "/v1/models/iris/route", Some(route.clone())).await;
        let (lat, v) = load(&server, 8, Duration::from_millis(1500)).await;
        if with_shadow {
            on.extend(lat);
            versions.extend(v);
        } else {
            off.extend(lat);
        }
    }
    assert!(versions.iter().all(|v| v == "1"), "a shadow answer was returned");
    tokio::time::sleep(Duration::from_millis(200)).await; // the last mirrors finish
    let stats = server.ok("GET", "/v1/models/iris", None).await["traffic"]["shadow"]["stats"].clone();
    let mirrored = stats["requests"].as_u64().unwrap() + stats["dropped"].as_u64().unwrap();
    println!("shadow stats: {stats}");
    assert!(mirrored as usize >= versions.len() * 9 / 10, "{mirrored} mirrored of {}", versions.len());
    assert!(stats["compared"].as_u64().unwrap() > 0);
    assert_eq!(stats["errors"], 0);
    assert!(stats["max_abs_difference"].as_f64().unwrap() > 0.0, "logistic regression and forest disagree: {stats}");
    let (p_off, p_on) = (p99(off.clone()), p99(on.clone()));
    println!(
        "primary p99 without shadow {p_off:?} ({} requests), with shadow {p_on:?} ({} requests)",
        off.len(),
        on.len()
    );
    // Within noise: the shadow runs after the answer, off the request's path.
    assert!(p_on <= p_off * 3 / 2 + Duration::from_millis(2), "p99 {p_off:?} → {p_on:?}");
    Arc::try_unwrap(server).ok().expect("sole owner").stop().await;
}
