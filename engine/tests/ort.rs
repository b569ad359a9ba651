//! The ONNX Runtime backend against the exporting libraries' outputs (the same references the
//! end-to-end tests use). Needs `--features ort` and an installed ONNX Runtime:
//!
//!     ORT_DYLIB_PATH=.../onnxruntime/capi/libonnxruntime.so.1.32.0 \
//!         cargo test -p algolink-engine --features ort --test ort
#![cfg(feature = "ort")]

mod common;

use algolink_engine::{DataType, LoadOptions, ModelFiles, OnnxBackend, Tensor, load_model};
use common::{fixtures, tensor};
use serde_json::Value;

#[test]
fn onnx_runtime_matches_the_exporters() {
    assert!(
        std::env::var_os("ORT_DYLIB_PATH").is_some(),
        "set ORT_DYLIB_PATH to an installed libonnxruntime (the onnxruntime wheel has one in onnxruntime/capi/)"
    );
    let options = LoadOptions { onnx_backend: OnnxBackend::Ort, ..LoadOptions::default() };
    for name in ["torch_mlp", "torch_cnn", "torch_bert", "xgb_regressor", "lgbm_regressor", "iris_logreg"] {
        let bytes = std::fs::read(fixtures().join(format!("{name}.onnx"))).unwrap();
        let model = load_model(&ModelFiles::from([("model.onnx".to_string(), bytes.into())]), &options)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(model.signature().platform, "onnxruntime_onnx");
        let reference: Value =
            serde_json::from_str(&std::fs::read_to_string(fixtures().join(format!("{name}.json"))).unwrap()).unwrap();
        let inputs: Vec<Tensor> = reference["inputs"].as_array().unwrap().iter().map(tensor).collect();
        let outputs = model.run(inputs).unwrap();
        for want in reference["outputs"].as_array().unwrap() {
            let Some(i) = model.signature().output_index(want["name"].as_str().unwrap()) else {
                // scikit-learn's ZipMap (a sequence of maps) is not served by this backend.
                assert_eq!((name, want["name"].as_str().unwrap()), ("iris_logreg", "output_probability"));
                continue;
            };
            let want = tensor(want);
            assert_eq!(outputs[i].shape, want.shape, "{name}: shape");
            if want.dtype == DataType::I64 {
                assert_eq!(outputs[i].to_i64().unwrap(), want.to_i64().unwrap(), "{name}: labels");
                continue;
            }
            for (g, w) in outputs[i].to_f32().unwrap().iter().zip(want.to_f32().unwrap()) {
                assert!((g - w).abs() <= 1e-4 * w.abs() + 1e-5, "{name}: got {g}, want {w}");
            }
        }
    }
}

#[test]
fn sequence_outputs_are_not_padded_together() {
    // torch_bert's output keeps the sequence dimension: a request's outputs would depend on the
    // longest request it was batched with.
    let options = LoadOptions { onnx_backend: OnnxBackend::Ort, ..LoadOptions::default() };
    let bert = std::fs::read(fixtures().join("torch_bert.onnx")).unwrap();
    let model = load_model(&ModelFiles::from([("model.onnx".to_string(), bert.into())]), &options).unwrap();
    assert!(!model.signature().pad_to_longest, "last_hidden_state depends on the padded length");
}
