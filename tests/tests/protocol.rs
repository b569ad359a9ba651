//! The Open Inference Protocol surface against a real server: health, metadata, JSON and binary
//! inference, the repository and statistics extensions, metrics, and every error answer.

use algolink_tests::{TestServer, fixture, reference};
use serde_json::{Value, json};

fn iris_request(rows: usize) -> Value {
    let data: Vec<f32> = (0..rows).flat_map(|i| [5.1 + i as f32 * 0.1, 3.5, 1.4, 0.2]).collect();
    json!({ "inputs": [{ "name": "input", "shape": [rows, 4], "datatype": "FP32", "data": data }] })
}

#[tokio::test]
async fn health_metadata_and_json_inference() {
    let server = TestServer::default().await;
    assert_eq!(server.get("/v2/health/live").await.0, 200);
    assert_eq!(server.get("/v2/health/ready").await.0, 200);
    let (_, meta) = server.get("/v2").await;
    let meta: Value = serde_json::from_str(&meta).unwrap();
    assert_eq!(meta["name"], "algolink");
    assert!(meta["extensions"].as_array().unwrap().contains(&json!("binary_tensor_data")));
    assert!(meta["replica"]["id"].as_str().is_some_and(|id| !id.is_empty()), "{meta}");

    server.push("iris", "iris_logreg.onnx").await;
    let (status, meta) = server.get("/v2/models/iris").await;
    assert_eq!(status, 200, "{meta}");
    let meta: Value = serde_json::from_str(&meta).unwrap();
    assert_eq!(meta["platform"], "onnx_onnxv1");
    assert_eq!(meta["versions"], json!(["1"]));
    assert_eq!(meta["inputs"][0], json!({ "name": "input", "datatype": "FP32", "shape": [-1, 4] }));
    assert_eq!(meta["outputs"][1]["name"], "output_probability");
    assert_eq!(server.get("/v2/models/iris/ready").await.0, 200);
    assert_eq!(server.get("/v2/models/iris/versions/1/ready").await.0, 200);
    assert_eq!(server.get("/v2/models/iris/versions/1").await.0, 200);

    // nested data, `outputs` filter, no Content-Type (as tritonclient sends)
    let r = reference("iris_logreg");
    let rows: Vec<Value> = r["inputs"][0]["data"].as_array().unwrap().chunks(4).map(|c| json!(c)).collect();
    let body = json!({
        "inputs": [{ "name": "input", "shape": r["inputs"][0]["shape"], "datatype": "FP32", "data": rows }],
        "outputs": [{ "name": "output_label" }],
    });
    let (status, answer) = server.infer("/v2/models/iris/versions/1/infer", &body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["outputs"].as_array().unwrap().len(), 1);
    assert_eq!(answer["outputs"][0]["data"], r["outputs"][0]["data"]);
    assert_eq!(answer["model_name"], "iris");
    assert!(answer.get("id").is_none(), "no id sent, none echoed");
    server.stop().await;
}

#[tokio::test]
async fn binary_tensor_extension_both_ways() {
    let server = TestServer::default().await;
    server.push("mlp", "torch_mlp.onnx").await;
    let r = reference("torch_mlp");
    let x: Vec<f32> = r["inputs"][0]["data"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
    let header = json!({
        "id": "bin",
        "inputs": [{ "name": "input", "shape": r["inputs"][0]["shape"], "datatype": "FP32",
                     "parameters": { "binary_data_size": x.len() * 4 } }],
        "parameters": { "binary_data_output": true },
    });
    let raw: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    let resp = server.infer_binary("/v2/models/mlp/infer", &header, &raw).await;
    assert_eq!(resp.status(), 200);
    let n: usize = resp.headers()["inference-header-content-length"].to_str().unwrap().parse().unwrap();
    let bytes = resp.bytes().await.unwrap();
    let head: Value = serde_json::from_slice(&bytes[..n]).unwrap();
    assert_eq!(head["id"], "bin");
    let size = head["outputs"][0]["parameters"]["binary_data_size"].as_u64().unwrap() as usize;
    assert_eq!(bytes.len() - n, size);
    let got: Vec<f64> = bytes[n..].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect();
    let want: Vec<f64> = algolink_tests::floats(&r["outputs"][0]["data"]);
    algolink_tests::assert_close(&got, &want, 1e-4, 1e-5, "binary output");
    server.stop().await;
}

/// Bodies and outputs above 256 KiB are parsed and encoded on the blocking pool rather than on
/// the HTTP threads: same answers, same errors.
#[tokio::test]
async fn large_requests_are_answered_like_small_ones() {
    let server = TestServer::start("[models.iris]\nmax_batch_size = 25000\nmax_batch_tokens = 25000").await;
    server.push("iris", "iris_logreg.onnx").await;
    // ~0.5 MB of JSON in; 25,000 x 3 probabilities (300 KB as FP32) out
    let rows = 25_000;
    let (status, big) = server.infer("/v2/models/iris/infer", &iris_request(rows)).await;
    assert_eq!(status, 200, "{big}");
    let probabilities = big["outputs"][1]["data"].as_array().unwrap();
    assert_eq!(probabilities.len(), rows * 3);
    for i in [0, 1, 12_345, rows - 1] {
        let one = json!({ "inputs": [{ "name": "input", "shape": [1, 4], "datatype": "FP32",
                                       "data": [5.1 + i as f32 * 0.1, 3.5, 1.4, 0.2] }] });
        let (status, small) = server.infer("/v2/models/iris/infer", &one).await;
        assert_eq!(status, 200, "{small}");
        assert_eq!(big["outputs"][0]["data"][i], small["outputs"][0]["data"][0], "label of row {i}");
        let want = algolink_tests::floats(&small["outputs"][1]["data"]);
        let got = algolink_tests::floats(&json!(probabilities[3 * i..3 * i + 3]));
        algolink_tests::assert_close(&got, &want, 1e-5, 1e-6, &format!("probabilities of row {i}"));
    }
    let mut malformed = iris_request(rows).to_string().into_bytes();
    malformed.truncate(malformed.len() - 10);
    let r = server.client.post(server.url("/v2/models/iris/infer")).body(malformed).send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("malformed request JSON"));
    server.stop().await;
}

#[tokio::test]
async fn errors_are_4xx_with_a_message() {
    let server = TestServer::start("[server]\nmax_body_bytes = 4096").await;
    server.push("iris", "iris_logreg.onnx").await;
    let post = |path: &'static str, body: Vec<u8>| {
        let req = server.client.post(server.url(path)).body(body);
        async move {
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap())
        }
    };
    let cases: Vec<(&str, &'static str, Vec<u8>, u16, &str)> = vec![
        ("malformed JSON", "/v2/models/iris/infer", b"{\"inputs\": [".to_vec(), 400, "malformed request JSON"),
        (
            "wrong shape",
            "/v2/models/iris/infer",
            json!({"inputs":[{"name":"input","shape":[1,3],"datatype":"FP32","data":[1,2,3]}]})
                .to_string()
                .into_bytes(),
            400,
            "expected shape",
        ),
        (
            "wrong dtype",
            "/v2/models/iris/infer",
            json!({"inputs":[{"name":"input","shape":[1,4],"datatype":"INT64","data":[1,2,3,4]}]})
                .to_string()
                .into_bytes(),
            400,
            "expected datatype FP32",
        ),
        (
            "count mismatch",
            "/v2/models/iris/infer",
            json!({"inputs":[{"name":"input","shape":[2,4],"datatype":"FP32","data":[1,2,3,4]}]})
                .to_string()
                .into_bytes(),
            400,
            "needs 8 elements",
        ),
        ("unknown model", "/v2/models/nope/infer", iris_request(1).to_string().into_bytes(), 404, "not found"),
        (
            "unknown version",
            "/v2/models/iris/versions/7/infer",
            iris_request(1).to_string().into_bytes(),
            404,
            "no version 7",
        ),
        (
            "non-numeric version",
            "/v2/models/iris/versions/abc/infer",
            iris_request(1).to_string().into_bytes(),
            404,
            "no version",
        ),
        (
            "oversize body",
            "/v2/models/iris/infer",
            iris_request(200).to_string().into_bytes(),
            413,
            "larger than the limit",
        ),
    ];
    for (what, path, body, status, message) in cases {
        let (got, answer) = post(path, body).await;
        assert_eq!(got, status, "{what}: {answer}");
        let error = answer["error"].as_str().unwrap_or_else(|| panic!("{what}: no error message in {answer}"));
        assert!(error.contains(message), "{what}: {error:?} should mention {message:?}");
    }
    server.stop().await;
}

#[tokio::test]
async fn bad_uploads_are_refused_and_leave_the_registry_unchanged() {
    let server = TestServer::default().await;
    server.push("m", "torch_mlp.onnx").await;
    let onnx = std::fs::read(fixture("torch_mlp.onnx")).unwrap();
    let st = std::fs::read(fixture("st_mlp.safetensors")).unwrap();
    let mut unknown_arch = Vec::new();
    {
        // a safetensors file whose config names an architecture we do not know
        let header = br#"{"__metadata__":{"algolink.config":"{\"architecture\":\"transformer-xl\"}"},"w.weight":{"dtype":"F32","shape":[1,1],"data_offsets":[0,4]}}"#;
        unknown_arch.extend_from_slice(&(header.len() as u64).to_le_bytes());
        unknown_arch.extend_from_slice(header);
        unknown_arch.extend_from_slice(&1f32.to_le_bytes());
    }
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", vec![], "empty upload"),
        ("garbage", b"this is not a model at all".to_vec(), "ONNX"),
        ("truncated onnx", onnx[..onnx.len() / 2].to_vec(), "model refused"),
        ("truncated safetensors", st[..st.len() - 10].to_vec(), "model refused"),
        (
            "bad safetensors header",
            {
                let mut b = 20u64.to_le_bytes().to_vec();
                b.extend_from_slice(b"{not json at all....");
                b
            },
            "safetensors",
        ),
        ("unknown architecture", unknown_arch, "unknown architecture \"transformer-xl\""),
    ];
    for (what, body, message) in cases {
        let (status, answer) = server.push_bytes("m", body).await;
        assert!((400..500).contains(&status), "{what}: status {status}, {answer}");
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(error.contains(message), "{what}: {error:?} should mention {message:?}");
    }
    let (status, bad_name) = server.push_bytes("../etc", onnx.clone()).await;
    assert!(status == 400 || status == 404, "bad name: {status} {bad_name}");
    let (status, bad_name) = server.push_bytes("bad%20name", onnx.clone()).await;
    assert!(status == 400 || status == 404, "bad name: {status} {bad_name}");
    let (_, models) = server.get("/v1/models").await;
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models.as_array().unwrap().len(), 1, "{models}");
    assert_eq!(models[0]["versions"].as_array().unwrap().len(), 1, "no bad version was stored: {models}");
    server.stop().await;
}

#[tokio::test]
async fn repository_statistics_and_metrics() {
    let server = TestServer::default().await;
    server.push("iris", "iris_logreg.onnx").await;
    for _ in 0..3 {
        assert_eq!(server.infer("/v2/models/iris/infer", &iris_request(2)).await.0, 200);
    }
    let index: Value =
        server.client.post(server.url("/v2/repository/index")).send().await.unwrap().json().await.unwrap();
    assert_eq!(index, json!([{ "name": "iris", "version": "1", "state": "READY", "reason": "" }]));

    let (_, stats) = server.get("/v2/models/iris/stats").await;
    let stats: Value = serde_json::from_str(&stats).unwrap();
    let s = &stats["model_stats"][0];
    assert_eq!(s["inference_stats"]["success"]["count"], 3);
    assert_eq!(s["inference_count"], 6, "rows");

    let (_, metrics) = server.get("/metrics").await;
    assert!(
        metrics.contains("algolink_requests_total{model=\"iris\",version=\"1\",outcome=\"success\"} 3"),
        "{metrics}"
    );
    assert!(metrics.contains("algolink_batch_size_bucket{model=\"iris\",version=\"1\",le=\"2\"}"), "{metrics}");
    assert!(metrics.contains("# TYPE algolink_queue_duration_seconds histogram"));

    let unload = server.client.post(server.url("/v2/repository/models/iris/unload")).send().await.unwrap();
    assert_eq!(unload.status(), 200);
    let (status, answer) = server.infer("/v2/models/iris/infer", &iris_request(1)).await;
    assert_eq!(status, 503, "unloaded model: {answer}");
    assert_eq!(server.get("/v2/models/iris/ready").await.0, 503);
    let load = server.client.post(server.url("/v2/repository/models/iris/load")).send().await.unwrap();
    assert_eq!(load.status(), 200);
    assert_eq!(server.infer("/v2/models/iris/infer", &iris_request(1)).await.0, 200);
    server.stop().await;
}

#[tokio::test]
async fn deadline_in_queue_answers_504() {
    let server = TestServer::default().await;
    server.push("iris", "iris_logreg.onnx").await;
    // A 1 µs budget has always run out by the time the batcher looks at the request.
    let mut body = iris_request(1);
    body["parameters"] = json!({ "timeout": 1 });
    let (status, answer) = server.infer("/v2/models/iris/infer", &body).await;
    assert_eq!(status, 504, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("deadline exceeded"));
    let (_, metrics) = server.get("/metrics").await;
    assert!(metrics.contains("algolink_expired_total{model=\"iris\",version=\"1\"} 1"), "{metrics}");
    assert!(
        metrics.contains("algolink_inference_rows_total{model=\"iris\",version=\"1\"} 0"),
        "never reached the device"
    );
    server.stop().await;
}

#[tokio::test]
async fn full_queue_answers_503_with_retry_after() {
    // One waiting request fills the queue; it waits out a long batching delay.
    let server =
        TestServer::start("[models.iris]\nmax_queue_size = 1\nmax_queue_delay_us = 1500000\nmax_batch_size = 8").await;
    server.push("iris", "iris_logreg.onnx").await;
    let first = {
        let req = server.client.post(server.url("/v2/models/iris/infer")).body(iris_request(1).to_string());
        tokio::spawn(async move { req.send().await.unwrap().status().as_u16() })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let resp =
        server.client.post(server.url("/v2/models/iris/infer")).body(iris_request(1).to_string()).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    let answer: Value = resp.json().await.unwrap();
    assert!(answer["error"].as_str().unwrap().contains("queue is full"), "{answer}");
    assert_eq!(first.await.unwrap(), 200, "the queued request is still served");
    server.stop().await;
}

#[tokio::test]
async fn every_example_config_parses() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            algolink_server::Config::from_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            seen += 1;
        }
    }
    assert!(seen >= 2, "expected the example configs in {}", dir.display());
}

#[tokio::test]
async fn a_request_whose_client_left_never_reaches_the_device() {
    let server = TestServer::start("[models.iris]\nmax_queue_delay_us = 1000000\nmax_batch_size = 8").await;
    server.push("iris", "iris_logreg.onnx").await;
    // The client gives up long before the batching delay lets the request run.
    let gone = server
        .client
        .post(server.url("/v2/models/iris/infer"))
        .timeout(std::time::Duration::from_millis(200))
        .body(iris_request(1).to_string())
        .send()
        .await;
    assert!(gone.is_err(), "the client timed out");
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let (_, metrics) = server.get("/metrics").await;
    assert!(metrics.contains("algolink_cancelled_total{model=\"iris\",version=\"1\"} 1"), "{metrics}");
    assert!(metrics.contains("algolink_inference_rows_total{model=\"iris\",version=\"1\"} 0"), "{metrics}");
    server.stop().await;
}

#[tokio::test]
async fn deleting_the_serving_version_brings_back_the_previous_one() {
    let server = TestServer::default().await;
    server.push("iris", "iris_logreg.onnx").await;
    server.push("iris", "iris_forest.onnx").await;
    let (status, answer) = server.infer("/v2/models/iris/infer", &iris_request(1)).await;
    assert_eq!((status, answer["model_version"].as_str()), (200, Some("2")));
    let r = server.client.delete(server.url("/v1/models/iris/versions/2")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let (status, answer) = server.infer("/v2/models/iris/infer", &iris_request(1)).await;
    assert_eq!((status, answer["model_version"].as_str()), (200, Some("1")), "{answer}");
    let r = server.client.delete(server.url("/v1/models/iris/versions/2")).send().await.unwrap();
    assert_eq!(r.status(), 404, "already deleted");
    let (_, model) = server.get("/v1/models/iris").await;
    let model: Value = serde_json::from_str(&model).unwrap();
    assert_eq!(model["serving_version"], 1);
    assert_eq!(model["versions"][0]["state"], "ready");
    server.push("iris", "iris_forest.onnx").await;
    let (_, answer) = server.infer("/v2/models/iris/infer", &iris_request(1)).await;
    assert_eq!(answer["model_version"], "3", "a deleted number is not given again");
    server.stop().await;
}

#[tokio::test]
async fn oversize_upload_is_refused_with_413() {
    let server = TestServer::start("[server]\nmax_upload_bytes = 1000").await;
    let onnx = std::fs::read(fixture("torch_mlp.onnx")).unwrap();
    assert!(onnx.len() > 1000);
    let (status, answer) = server.push_bytes("m", onnx).await;
    assert_eq!(status, 413, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("larger than the limit of 1000 bytes"), "{answer}");
    // Streamed without a Content-Length, the upload is cut at the limit.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = (0..4).map(|_| Ok(vec![0u8; 400])).collect();
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let r = server.client.post(server.url("/v1/models/m/versions")).body(body).send().await.unwrap();
    assert_eq!(r.status(), 413);
    let (_, models) = server.get("/v1/models").await;
    assert_eq!(models, "[]");
    server.stop().await;
}

/// The Grafana dashboard in configs/ queries only metrics the server exports (a renamed metric
/// would leave a panel silently empty).
#[tokio::test]
async fn the_grafana_dashboard_queries_metrics_that_exist() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/grafana/algolink-dashboard.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let server = TestServer::default().await;
    server.push("iris", "iris_logreg.onnx").await;
    let (_, metrics) = server.get("/metrics").await;
    let families: std::collections::HashMap<&str, &str> =
        metrics.lines().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|l| l.split_once(' ')).collect();
    let panels = dashboard["panels"].as_array().unwrap();
    let mut ids = std::collections::HashSet::new();
    let mut queried = std::collections::BTreeSet::new();
    for panel in panels {
        assert!(ids.insert(panel["id"].as_u64().unwrap()), "panel ids are unique");
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(at) = rest.find("algolink_") {
                let name: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_' || c.is_ascii_digit())
                    .collect();
                rest = &rest[at + name.len()..];
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s).filter(|base| families.get(base) == Some(&"histogram")))
                    .unwrap_or(&name)
                    .to_string();
                assert!(
                    families.contains_key(family.as_str()),
                    "panel {:?} queries {name}, not exported",
                    panel["title"]
                );
                queried.insert(family);
            }
        }
    }
    // Every family the server exports has a panel.
    let missing: Vec<&&str> = families.keys().filter(|f| !queried.contains(**f)).collect();
    assert!(missing.is_empty(), "metrics without a panel: {missing:?}");
    server.stop().await;
}
