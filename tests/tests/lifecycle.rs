//! Version swaps and batching under concurrent load, against a real server.

use std::sync::Arc;
use std::time::{Duration, Instant};

use algolink_tests::{TestServer, reference};
use serde_json::{Value, json};

fn iris_body() -> String {
    json!({ "inputs": [{ "name": "input", "shape": [1, 4], "datatype": "FP32", "data": [5.9, 3.0, 5.1, 1.8] }] })
        .to_string()
}

/// One response as a load client saw it: when it was sent, its status, the version that answered.
struct Seen {
    sent: Instant,
    status: u16,
    version: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn push_under_load_fails_no_request_and_switches_within_two_seconds() {
    let server = Arc::new(TestServer::default().await);
    server.push("iris", "iris_logreg.onnx").await;
    let stop_at = Instant::now() + Duration::from_secs(5);
    let mut clients = Vec::new();
    for _ in 0..32 {
        let server = server.clone();
        clients.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while Instant::now() < stop_at {
                let sent = Instant::now();
                let r = server.client.post(server.url("/v2/models/iris/infer")).body(iris_body()).send().await.unwrap();
                let status = r.status().as_u16();
                let body: Value = r.json().await.unwrap_or(Value::Null);
                seen.push(Seen { sent, status, version: body["model_version"].as_str().unwrap_or("").to_string() });
            }
            seen
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let pushed = server.push("iris", "iris_forest.onnx").await;
    let pushed_at = Instant::now();
    assert_eq!(pushed["version"], 2);
    let mut all = Vec::new();
    for c in clients {
        all.extend(c.await.unwrap());
    }
    algolink_tests::assert_none_failed(all.iter().map(|s| s.status));
    let before = all.iter().filter(|s| s.version == "1").count();
    let late_old: Vec<&Seen> =
        all.iter().filter(|s| s.sent > pushed_at + Duration::from_secs(2) && s.version != "2").collect();
    assert!(before > 0, "the old version served before the push");
    assert!(late_old.is_empty(), "{} requests sent 2 s after the push were not served by version 2", late_old.len());
    let after = all.iter().filter(|s| s.sent > pushed_at + Duration::from_secs(2)).count();
    assert!(after > 0, "load continued past the switch window");
    Arc::try_unwrap(server).ok().expect("clients done").stop().await;
}

fn encoder_request() -> String {
    let seq = 48;
    json!({ "inputs": [
        { "name": "input_ids", "shape": [1, seq], "datatype": "INT64", "data": (0..seq).map(|i| 1 + i % 100).collect::<Vec<_>>() },
        { "name": "attention_mask", "shape": [1, seq], "datatype": "INT64", "data": vec![1; seq] },
        { "name": "token_type_ids", "shape": [1, seq], "datatype": "INT64", "data": vec![0; seq] },
    ]})
    .to_string()
}

/// (rows, batches) executed so far by the encoder.
async fn executed(server: &TestServer) -> (f64, f64) {
    let (_, stats) = server.get("/v2/models/encoder/stats").await;
    let stats: Value = serde_json::from_str(&stats).unwrap();
    let s = &stats["model_stats"][0];
    (s["inference_count"].as_f64().unwrap(), s["execution_count"].as_f64().unwrap())
}

/// 32 clients send 15 requests each; returns the mean executed batch size.
async fn mean_batch_at_concurrency_32(server: &Arc<TestServer>) -> f64 {
    let body = encoder_request();
    let before = executed(server).await;
    let mut clients = Vec::new();
    for _ in 0..32 {
        let (server, body) = (server.clone(), body.clone());
        clients.push(tokio::spawn(async move {
            for _ in 0..15 {
                let r =
                    server.client.post(server.url("/v2/models/encoder/infer")).body(body.clone()).send().await.unwrap();
                assert_eq!(r.status(), 200);
            }
        }));
    }
    for c in clients {
        c.await.unwrap();
    }
    let after = executed(server).await;
    let (rows, batches) = (after.0 - before.0, after.1 - before.1);
    assert_eq!(rows, 32.0 * 15.0, "every request ran once (warm-up is not counted)");
    rows / batches
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_are_batched() {
    let server = Arc::new(TestServer::start("[models.encoder]\nmax_batch_size = 64").await);
    server.push("encoder", "torch_bert.onnx").await;
    let mean = mean_batch_at_concurrency_32(&server).await;
    println!("static: mean executed batch size {mean:.1} at concurrency 32");
    assert!(mean > 4.0, "mean executed batch size {mean:.1} at concurrency 32");
    Arc::try_unwrap(server).ok().expect("clients done").stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn adaptive_batching_runs_a_lone_request_at_once_and_grows_batches_under_load() {
    let config = "[models.encoder]\nmax_batch_size = 64\nmode = \"adaptive\"\nlatency_slo_ms = 5000";
    let server = Arc::new(TestServer::start(config).await);
    server.push("encoder", "torch_bert.onnx").await;
    // One client at a time: every request runs alone, without waiting for company.
    let body = encoder_request();
    let mut alone = Vec::new();
    for _ in 0..10 {
        let sent = Instant::now();
        let r = server.client.post(server.url("/v2/models/encoder/infer")).body(body.clone()).send().await.unwrap();
        assert_eq!(r.status(), 200);
        alone.push(sent.elapsed());
    }
    let (rows, batches) = executed(&server).await;
    assert_eq!(rows, batches, "a lone request is a batch of one");
    let mean = mean_batch_at_concurrency_32(&server).await;
    println!("adaptive: mean executed batch size {mean:.1} at concurrency 32; alone {:?}", alone.iter().max());
    assert!(mean > 4.0, "mean executed batch size {mean:.1} at concurrency 32");
    let (_, metrics) = server.get("/metrics").await;
    assert!(
        metrics.contains("algolink_shed_total{model=\"encoder\",version=\"1\"} 0")
            && metrics.contains("algolink_shed_late_total{model=\"encoder\",version=\"1\"} 0"),
        "nothing shed under a loose objective"
    );
    assert!(metrics.contains("algolink_batch_model_seconds{model=\"encoder\",version=\"1\",term=\"per_row\"}"));
    Arc::try_unwrap(server).ok().expect("clients done").stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_serve_one_version_with_batches_under_load() {
    let config = "[models.encoder]\ninstances = 2\nmode = \"adaptive\"\nlatency_slo_ms = 5000\n\
                  [models.iris]\ninstances = 3";
    let server = Arc::new(TestServer::start(config).await);
    server.push("encoder", "torch_bert.onnx").await;
    let (_, meta) = server.get("/v2/models/encoder").await;
    let meta: Value = serde_json::from_str(&meta).unwrap();
    assert_eq!((&meta["parameters"]["instances"], &meta["parameters"]["device"]), (&json!(2), &json!("cpu")), "{meta}");
    // Batches still form with two executors taking them (each a third of the rows in the system).
    let mean = mean_batch_at_concurrency_32(&server).await;
    println!("adaptive, 2 instances: mean executed batch size {mean:.1} at concurrency 32");
    assert!(mean > 2.0, "mean executed batch size {mean:.1} at concurrency 32");
    // Every copy answers alike: the reference's outputs, whichever instance ran them.
    server.push("iris", "iris_logreg.onnx").await;
    let r = reference("iris_logreg");
    let request = json!({ "inputs": r["inputs"] });
    let answers =
        futures_util::future::join_all((0..24).map(|_| server.infer("/v2/models/iris/infer", &request))).await;
    for (status, answer) in answers {
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["outputs"][0]["data"], r["outputs"][0]["data"]);
    }
    Arc::try_unwrap(server).ok().expect("clients done").stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn adaptive_batching_refuses_what_would_miss_the_objective() {
    // A 10 µs objective the encoder cannot meet: the first request runs (nothing is measured
    // yet); once it has measured itself, the next is refused at once with 503 + Retry-After.
    let config = "[models.encoder]\nmode = \"adaptive\"\nlatency_slo_ms = 0.01";
    let server = TestServer::start(config).await;
    server.push("encoder", "torch_bert.onnx").await;
    let (status, _) =
        server.infer("/v2/models/encoder/infer", &serde_json::from_str(&encoder_request()).unwrap()).await;
    assert_eq!(status, 200);
    let r = server.client.post(server.url("/v2/models/encoder/infer")).body(encoder_request()).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let body: Value = r.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("would miss its deadline"), "{body}");
    server.stop().await;
}

#[tokio::test]
async fn a_version_that_no_longer_loads_is_marked_failed_and_the_previous_one_serves() {
    let dir = tempfile::tempdir().unwrap();
    let mut base = algolink_server::Config::default();
    base.server.http = "127.0.0.1:0".into();
    base.server.data_dir = dir.path().to_path_buf();
    base.registry.backends_for_tests().await;
    let config = || base.clone();
    let client = reqwest::Client::new();
    let sha2 = {
        let running = algolink_server::start(config()).await.unwrap();
        let url = format!("http://{}", running.addr);
        for file in ["iris_logreg.onnx", "iris_forest.onnx"] {
            let body = std::fs::read(algolink_tests::fixture(file)).unwrap();
            let r = client.post(format!("{url}/v1/models/iris/versions")).body(body).send().await.unwrap();
            assert_eq!(r.status(), 201);
        }
        let model: Value = client.get(format!("{url}/v1/models/iris")).send().await.unwrap().json().await.unwrap();
        running.stop().await.unwrap();
        model["versions"][1]["sha256"].as_str().unwrap().to_string()
    };
    // The newest version's file goes bad while the server is down (in the object store too, when
    // the suite runs on one).
    let registry = algolink_registry::Registry::connect(dir.path(), &base.registry.backends()).await.unwrap();
    algolink_registry::testing::tamper(&registry, &sha2, b"bit rot").await.unwrap();
    registry.close().await;
    let running = algolink_server::start(config()).await.unwrap();
    let url = format!("http://{}", running.addr);
    let answer: Value = client
        .post(format!("{url}/v2/models/iris/infer"))
        .body(iris_body())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["model_version"], "1", "{answer}");
    let model: Value = client.get(format!("{url}/v1/models/iris")).send().await.unwrap().json().await.unwrap();
    assert_eq!(model["versions"][1]["state"], "failed", "{model}");
    assert!(model["versions"][1]["reason"].as_str().unwrap().contains("corrupt"), "{model}");
    assert_eq!(model["versions"][0]["state"], "ready", "{model}");
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_bad_request_does_not_fail_the_requests_batched_with_it() {
    // Both requests wait out the delay and run as one padded batch; the long one is beyond the
    // encoder's 64 positions.
    let server = Arc::new(TestServer::start("[models.bert]\nmax_queue_delay_us = 300000\nmax_batch_size = 8").await);
    server.push("bert", "st_bert.tar").await;
    let request = |seq: usize| {
        json!({ "inputs": [
            { "name": "input_ids", "shape": [1, seq], "datatype": "INT64", "data": vec![5; seq] },
            { "name": "attention_mask", "shape": [1, seq], "datatype": "INT64", "data": vec![1; seq] },
            { "name": "token_type_ids", "shape": [1, seq], "datatype": "INT64", "data": vec![0; seq] },
        ]})
    };
    let (short, long) = (request(6), request(100));
    let (good, bad) =
        tokio::join!(server.infer("/v2/models/bert/infer", &short), server.infer("/v2/models/bert/infer", &long));
    assert_eq!(good.0, 200, "{}", good.1);
    assert_eq!(good.1["outputs"][0]["shape"], json!([1, 32]));
    assert_ne!(bad.0, 200, "{}", bad.1);
    assert!(bad.1["error"].is_string(), "{}", bad.1);
    let (_, stats) = server.get("/v2/models/bert/stats").await;
    assert!(stats.contains("\"batch_size\":2"), "they did share a batch: {stats}");
    Arc::try_unwrap(server).ok().expect("requests done").stop().await;
}
