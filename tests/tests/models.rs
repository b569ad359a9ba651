//! Every required export, pushed to a real server and checked against the exporting library's
//! own outputs (tolerance 1e-4 relative; labels exact).

use algolink_tests::{TestServer, assert_close, floats, reference};
use serde_json::json;

/// (registry name, fixture file, reference name)
const MODELS: &[(&str, &str, &str)] = &[
    ("iris-logreg", "iris_logreg.onnx", "iris_logreg"),
    ("iris-forest", "iris_forest.onnx", "iris_forest"),
    ("iris-scaled", "iris_scaled.onnx", "iris_scaled"),
    ("xgb", "xgb_regressor.onnx", "xgb_regressor"),
    ("lgbm", "lgbm_regressor.onnx", "lgbm_regressor"),
    ("torch-mlp", "torch_mlp.onnx", "torch_mlp"),
    ("torch-cnn", "torch_cnn.onnx", "torch_cnn"),
    ("torch-bert", "torch_bert.onnx", "torch_bert"),
    ("st-mlp", "st_mlp.safetensors", "st_mlp"),
    ("st-bert", "st_bert.tar", "st_bert"),
    // sentence-transformers directories with tokenizer.json: strings in (see text.rs)
    ("st-text", "st_text.tar", "st_text"),
    ("st-text-cls", "st_text_cls.tar", "st_text_cls"),
];

#[tokio::test]
async fn every_export_matches_its_reference() {
    let server = TestServer::default().await;
    for &(name, file, reference_name) in MODELS {
        let pushed = server.push(name, file).await;
        assert_eq!(pushed["version"], 1, "{name}: {pushed}");
        assert_eq!(pushed["state"], "ready", "{name}: {pushed}");
        let r = reference(reference_name);
        let request = json!({ "id": format!("req-{name}"), "inputs": r["inputs"] });
        let (status, answer) = server.infer(&format!("/v2/models/{name}/infer"), &request).await;
        assert_eq!(status, 200, "{name}: {answer}");
        assert_eq!(answer["id"], format!("req-{name}"), "{name}: id echoed");
        assert_eq!(answer["model_version"], "1");
        for want in r["outputs"].as_array().unwrap() {
            let got = answer["outputs"]
                .as_array()
                .unwrap()
                .iter()
                .find(|o| o["name"] == want["name"])
                .unwrap_or_else(|| panic!("{name}: no output {} in {answer}", want["name"]));
            assert_eq!(got["shape"], want["shape"], "{name}/{}: shape", want["name"]);
            assert_eq!(got["datatype"], want["datatype"], "{name}/{}: datatype", want["name"]);
            let what = format!("{name}/{}", want["name"]);
            if want["datatype"] == "INT64" {
                assert_eq!(got["data"], want["data"], "{what}: labels are exact");
            } else {
                assert_close(&floats(&got["data"]), &floats(&want["data"]), 1e-4, 1e-5, &what);
            }
        }
    }
    server.stop().await;
}
