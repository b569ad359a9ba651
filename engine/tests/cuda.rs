//! candle models on a GPU give the exporting library's outputs (within 1e-3 relative, as #4 asks
//! of CUDA against CPU). Needs `--features cuda` and a GPU; never part of the default
//! `cargo test`. The GPU check script (bench/gpu/run.sh) compares larger models the same way.
#![cfg(feature = "cuda")]

mod common;

use algolink_engine::{Device, DeviceRequest, LoadOptions, ModelFiles, load_instances, load_model};
use common::{fixtures, tensor};
/// The fixture's files: a safetensors file, or a tar of a model directory (one top folder).
fn unpack_fixture(name: &str) -> ModelFiles {
    let path = fixtures().join(name);
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

#[test]
fn candle_models_on_cuda_match_their_references() {
    let device = DeviceRequest::Cuda(0).resolve().expect("this test needs a GPU (cuda:0)");
    assert_eq!(device, Device::Cuda(0));
    let options = LoadOptions { device, ..LoadOptions::default() };
    for (file, reference) in [("st_mlp.safetensors", "st_mlp"), ("st_bert.tar", "st_bert"), ("st_text.tar", "st_text")]
    {
        let model = load_model(&unpack_fixture(file), &options).unwrap_or_else(|e| panic!("{file}: {e}"));
        let path = fixtures().join(format!("{reference}.json"));
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

/// An MLP of two 4096x4096 f32 layers (128 MiB of weights), built here.
fn big_mlp() -> ModelFiles {
    let weights = vec![0u8; 4096 * 4096 * 4];
    let view = || safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4096, 4096], &weights).unwrap();
    let config = serde_json::json!({"architecture": "mlp"}).to_string();
    let metadata = std::collections::HashMap::from([("algolink.config".to_string(), config)]);
    let bytes = safetensors::serialize([("l0.weight", view()), ("l1.weight", view())], Some(metadata)).unwrap();
    ModelFiles::from([("big.safetensors".to_string(), bytes.into())])
}

/// Free bytes on `device`.
fn free_on(device: Device) -> i64 {
    device.memory().unwrap().expect("a GPU reports its memory").0 as i64
}

fn mib(bytes: i64) -> i64 {
    bytes / (1 << 20)
}

#[test]
fn gpu_memory_is_checked_before_loading_and_given_back_on_unload() {
    let device = Device::Cuda(0);
    let free = || free_on(device);
    let options = LoadOptions { device, ..LoadOptions::default() };
    // The first load also sets up the context and cuBLAS, which stay: measure from the second.
    drop(load_model(&big_mlp(), &options).unwrap());
    let before = free();
    let model = load_model(&big_mlp(), &options).unwrap();
    let loaded = free();
    drop(model);
    let after = free();
    assert!(before - loaded >= 128 << 20, "loading took only {} MiB", mib(before - loaded));
    assert!((before - after).abs() <= 16 << 20, "unloading gave back all but {} MiB", mib(before - after));
    // More than the device has: refused before anything is allocated, with both figures named.
    let (_, total) = device.memory().unwrap().unwrap();
    let err = device.check_room(total).unwrap_err().to_string();
    assert!(err.contains("cuda:0 has") && err.contains("MiB free of"), "{err}");
    assert!((free() - after).abs() <= 16 << 20);
}

#[test]
fn onnx_exports_run_on_cuda_as_a_candle_plan() {
    // The default ONNX backend on a cuda device: the graph compiled into candle operations.
    let options = LoadOptions { device: Device::Cuda(0), ..LoadOptions::default() };
    for name in ["torch_mlp", "torch_cnn", "torch_bert"] {
        let files = unpack_fixture(&format!("{name}.onnx"));
        let model = load_model(&files, &options).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(model.signature().platform, "candle_onnx", "{name} runs on the GPU");
        let path = fixtures().join(format!("{name}.json"));
        let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let outputs = model.run(r["inputs"].as_array().unwrap().iter().map(tensor).collect()).unwrap();
        let want = tensor(&r["outputs"][0]);
        assert_eq!(outputs[0].shape, want.shape, "{name}");
        for (g, w) in outputs[0].to_f32().unwrap().iter().zip(want.to_f32().unwrap()) {
            assert!((g - w).abs() <= 1e-3 * w.abs().max(1e-2), "{name}: cuda {g}, reference {w}");
        }
    }
    // ai.onnx.ml models have no GPU plan: they run on the CPU through tract.
    let iris = load_model(&unpack_fixture("iris_logreg.onnx"), &options).unwrap();
    assert_eq!(iris.signature().platform, "onnx_onnxv1");
}

#[test]
fn instances_each_hold_their_weights_on_the_gpu_and_run_at_once() {
    let device = Device::Cuda(0);
    let free = || free_on(device);
    let options = LoadOptions { device, ..LoadOptions::default() };
    drop(load_model(&big_mlp(), &options).unwrap());
    let before = free();
    let instances = load_instances(&big_mlp(), &options, 2).unwrap();
    assert!(instances.iter().all(|m| m.device() == device));
    assert!(before - free() >= 256 << 20, "two copies took only {} MiB", mib(before - free()));
    // Both run a batch from their own threads (own per-thread streams) and agree.
    let x = algolink_engine::Tensor::from_f32(vec![8, 4096], &vec![0.5; 8 * 4096]).unwrap();
    let outputs: Vec<Vec<f32>> = std::thread::scope(|s| {
        let runs: Vec<_> = instances
            .iter()
            .map(|m| {
                let x = x.clone();
                s.spawn(move || m.run(vec![x]).unwrap()[0].to_f32().unwrap())
            })
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    assert_eq!(outputs[0], outputs[1]);
    // Copies that would not all fit are refused as a whole, naming the instances.
    let (_, total) = device.memory().unwrap().unwrap();
    let copies = (total / (128 << 20)) as usize + 1;
    let err = load_instances(&big_mlp(), &options, copies).err().expect("more copies than the GPU holds");
    assert!(err.to_string().contains(&format!("weights of {copies} instances")), "{err}");
    drop(instances);
    assert!((free() - before).abs() <= 16 << 20, "unloading both gave back all but {} MiB", mib(before - free()));
}
