//! Text in, embeddings out: a sentence-transformers directory pushed with its tokenizer.json takes
//! strings, tokenised on the server, and returns what sentence-transformers' `encode` returns.

use algolink_tests::{TestServer, assert_close, floats, reference};
use serde_json::{Value, json};

fn text_request(texts: &[&str]) -> Value {
    json!({ "inputs": [{ "name": "text", "datatype": "BYTES", "shape": [texts.len()], "data": texts }] })
}

fn sentences() -> Vec<String> {
    reference("st_text")["inputs"][0]["data"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().into()).collect()
}

/// The reference embedding of sentence `i`.
fn want(i: usize) -> Vec<f64> {
    let r = reference("st_text");
    let dim = r["outputs"][0]["shape"][1].as_u64().unwrap() as usize;
    floats(&r["outputs"][0]["data"])[i * dim..(i + 1) * dim].to_vec()
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

#[tokio::test]
async fn strings_in_embeddings_out_whatever_the_batch() {
    // A queue delay makes concurrent requests of different lengths share padded batches.
    let server = TestServer::start("[defaults]\nmax_queue_delay_us = 20000\nwarmup_batch_sizes = [1, 4]").await;
    server.push("st", "st_text.tar").await;
    let meta = server.ok("GET", "/v2/models/st", None).await;
    assert_eq!(meta["inputs"], json!([{ "name": "text", "datatype": "BYTES", "shape": [-1] }]), "{meta}");
    assert_eq!(meta["outputs"][0]["shape"], json!([-1, 32]), "{meta}");

    let texts = sentences();
    // Each sentence alone, all at once (so that the batcher pads them together).
    let requests: Vec<Value> = texts.iter().map(|t| text_request(&[t.as_str()])).collect();
    let alone = futures_util::future::join_all(requests.iter().map(|r| server.infer("/v2/models/st/infer", r))).await;
    for (i, (status, answer)) in alone.iter().enumerate() {
        assert_eq!(*status, 200, "{answer}");
        let got = floats(&answer["outputs"][0]["data"]);
        assert_close(&got, &want(i), 1e-4, 1e-5, &format!("sentence {i} in a shared batch"));
        assert!(cosine(&got, &want(i)) >= 0.9999, "sentence {i}: cosine {}", cosine(&got, &want(i)));
    }
    let stats = server.ok("GET", "/v2/models/st/stats", None).await;
    let s = &stats["model_stats"][0];
    assert!(
        s["execution_count"].as_u64().unwrap() < s["inference_count"].as_u64().unwrap(),
        "the six requests shared batches: {s}"
    );

    // One request of several strings, sent as binary tensor data (4-byte little-endian lengths).
    let mut raw = Vec::new();
    for t in &texts {
        raw.extend_from_slice(&(t.len() as u32).to_le_bytes());
        raw.extend_from_slice(t.as_bytes());
    }
    let head = json!({
        "inputs": [{ "name": "text", "datatype": "BYTES", "shape": [texts.len()],
                     "parameters": { "binary_data_size": raw.len() } }],
    });
    let resp = server.infer_binary("/v2/models/st/infer", &head, &raw).await;
    assert_eq!(resp.status(), 200);
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer["outputs"][0]["shape"], json!([texts.len(), 32]));
    let all: Vec<f64> = (0..texts.len()).flat_map(want).collect();
    assert_close(&floats(&answer["outputs"][0]["data"]), &all, 1e-4, 1e-5, "binary strings, one request");
    server.stop().await;
}

#[tokio::test]
async fn bad_text_is_refused_with_the_reason() {
    let server = TestServer::start("[defaults]\nmax_batch_tokens = 20").await;
    server.push("st", "st_text.tar").await;
    let refused = |status: u16, answer: &Value, words: &str| {
        assert_eq!(status, 400, "{answer}");
        let msg = answer["error"].as_str().unwrap_or_default();
        assert!(msg.contains(words), "{words:?} not in {msg:?}");
    };

    // Not UTF-8 (binary data can carry any bytes).
    let raw = [1u32.to_le_bytes().as_slice(), b"a", 2u32.to_le_bytes().as_slice(), &[0xff, 0xfe]].concat();
    let head = json!({ "inputs": [{ "name": "text", "datatype": "BYTES", "shape": [2],
                                    "parameters": { "binary_data_size": raw.len() } }] });
    let resp = server.infer_binary("/v2/models/st/infer", &head, &raw).await;
    let status = resp.status().as_u16();
    refused(status, &resp.json().await.unwrap(), "element 1 is not UTF-8");

    // Numbers where strings belong.
    let (status, answer) = server
        .infer(
            "/v2/models/st/infer",
            &json!({ "inputs": [{ "name": "text", "datatype": "FP32", "shape": [1], "data": [1.0] }] }),
        )
        .await;
    refused(status, &answer, "expected datatype BYTES");

    // Two texts truncated to 16 tokens each: 32 padded tokens > max_batch_tokens 20.
    let long = sentences().last().unwrap().clone();
    let (status, answer) = server.infer("/v2/models/st/infer", &text_request(&[&long, &long])).await;
    refused(status, &answer, "max_batch_tokens 20");
    // One of them fits (16 tokens: truncation follows sentence_bert_config.json, not the 128 of
    // tokenizer.json), and an empty string is two special tokens.
    let (status, answer) = server.infer("/v2/models/st/infer", &text_request(&[&long])).await;
    assert_eq!(status, 200, "{answer}");
    assert_close(&floats(&answer["outputs"][0]["data"]), &want(5), 1e-4, 1e-5, "truncated sentence");
    let (status, answer) = server.infer("/v2/models/st/infer", &text_request(&[""])).await;
    assert_eq!(status, 200, "{answer}");
    assert_close(&floats(&answer["outputs"][0]["data"]), &want(2), 1e-4, 1e-5, "empty string");
    server.stop().await;
}
