//! candle models on a GPU give the exporting library's outputs (within 1e-3 relative, as #4 asks
//! of CUDA against CPU). Needs `--features cuda` and a GPU; never part of the default
//! `cargo test`. The GPU check script (bench/gpu/run.sh) compares larger models the same way.
#![cfg(feature = "cuda")]

use std::path::PathBuf;

use algolink_engine::{Device, DeviceRequest, LoadOptions, ModelFiles, Tensor, load_model};
/// The fixture's files: a safetensors file, or a tar of a model directory (one top folder).
fn unpack_fixture(name: &str) -> ModelFiles {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name);
    let data = std::fs::read(&path).unwrap();
    if !name.ends_with(".tar") {
        return ModelFiles::from([(name.to_string(), data.into())]);
    }
    let mut files = ModelFiles::new();
    for entry in tar::Archive::new(&data[..]).entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().into_owned();
        let name = path.components().skip(1).map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/");
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut bytes).unwrap();
        files.insert(name, bytes.into());
    }
    files
}

fn tensor(v: &serde_json::Value) -> Tensor {
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

#[test]
fn candle_models_on_cuda_match_their_references() {
    let device = DeviceRequest::Cuda(0).resolve().expect("this test needs a GPU (cuda:0)");
    assert_eq!(device, Device::Cuda(0));
    let options = LoadOptions { device, ..LoadOptions::default() };
    for (file, reference) in [("st_mlp.safetensors", "st_mlp"), ("st_bert.tar", "st_bert"), ("st_text.tar", "st_text")]
    {
        let model = load_model(&unpack_fixture(file), &options).unwrap_or_else(|e| panic!("{file}: {e}"));
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../tests/fixtures/{reference}.json"));
        let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let inputs = r["inputs"].as_array().unwrap().iter().map(tensor).collect();
        let outputs = model.run(model.preprocess(inputs).unwrap()).unwrap();
        let want = tensor(&r["outputs"][0]);
        assert_eq!(outputs[0].shape, want.shape, "{file}");
        for (g, w) in outputs[0].to_f32().unwrap().iter().zip(want.to_f32().unwrap()) {
            assert!((g - w).abs() <= 1e-3 * w.abs().max(1e-2), "{file}: cuda {g}, reference {w}");
        }
    }
}
