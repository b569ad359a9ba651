//! What the engine's test files share: the fixtures directory and the fixtures' JSON tensors.
#![allow(dead_code)] // each test binary uses its own part

use std::path::PathBuf;

use algolink_engine::Tensor;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// A tensor of a fixture's JSON (`{"name", "datatype", "shape", "data"}`).
pub fn tensor(v: &serde_json::Value) -> Tensor {
    let shape: Vec<usize> = v["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
    let data = v["data"].as_array().unwrap();
    match v["datatype"].as_str().unwrap() {
        "FP32" => Tensor::from_f32(shape, &data.iter().map(|x| x.as_f64().unwrap() as f32).collect::<Vec<_>>()),
        "INT64" => Tensor::from_i64(shape, &data.iter().map(|x| x.as_i64().unwrap()).collect::<Vec<_>>()),
        "BYTES" => Tensor::from_bytes(shape, data.iter().map(|x| x.as_str().unwrap().as_bytes().to_vec()).collect()),
        other => panic!("fixture datatype {other}"),
    }
    .unwrap()
}
