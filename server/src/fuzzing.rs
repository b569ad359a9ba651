//! Entry points for the fuzzers in `fuzz/` (cargo fuzz) and for the test that replays their
//! corpora (`tests/tests/fuzz_corpus.rs`): one per input an outsider controls. Each must return
//! (an error is fine) and never panic, whatever the bytes.

use std::sync::LazyLock;

use algolink_engine::{DataType, Device, LoadOptions, Signature, TensorSpec};
use bytes::Bytes;

/// The signatures requests are parsed against: a tabular model (FP32 [-1, 4]), a text model
/// (BYTES [-1]) and a two-input encoder (INT64 [-1, -1] twice, padded batching).
static SIGNATURES: LazyLock<Vec<Signature>> = LazyLock::new(|| {
    let spec = |name: &str, datatype, shape: &[i64]| TensorSpec { name: name.into(), datatype, shape: shape.to_vec() };
    vec![
        Signature {
            platform: "onnx_onnxv1".into(),
            inputs: vec![spec("input", DataType::F32, &[-1, 4])],
            outputs: vec![spec("output_label", DataType::I64, &[-1])],
            pad_to_longest: false,
        },
        Signature {
            platform: "candle_safetensors".into(),
            inputs: vec![spec("text", DataType::Bytes, &[-1])],
            outputs: vec![spec("embedding", DataType::F32, &[-1, 8])],
            pad_to_longest: false,
        },
        Signature {
            platform: "onnx_onnxv1".into(),
            inputs: vec![spec("input_ids", DataType::I64, &[-1, -1]), spec("attention_mask", DataType::I64, &[-1, -1])],
            outputs: vec![spec("last_hidden_state", DataType::F32, &[-1, -1, 8])],
            pad_to_longest: true,
        },
    ]
});

/// An OIP JSON infer body; the first byte picks the signature.
pub fn oip_json(data: &[u8]) {
    let Some((&pick, body)) = data.split_first() else { return };
    let sig = &SIGNATURES[pick as usize % SIGNATURES.len()];
    let _ = crate::oip::parse_request(&Bytes::copy_from_slice(body), None, sig);
}

/// A binary-tensor infer body: the first byte picks the signature, the next two give
/// `Inference-Header-Content-Length` (possibly past the end).
pub fn oip_binary(data: &[u8]) {
    let [pick, a, b, body @ ..] = data else { return };
    let sig = &SIGNATURES[*pick as usize % SIGNATURES.len()];
    let header_len = usize::from(u16::from_le_bytes([*a, *b]));
    let _ = crate::oip::parse_request(&Bytes::copy_from_slice(body), Some(header_len), sig);
}

/// An uploaded model: what a push does before anything is stored (format detection, unpacking
/// with the default limits, loading and one warm-up batch on the CPU).
pub fn upload(data: &[u8]) {
    let format = algolink_registry::Format::detect(&data[..data.len().min(512)]);
    let limits = algolink_registry::ArtifactLimits { max_entries: 64, max_total_bytes: 64 << 20 };
    let Ok(files) = algolink_registry::unpack(format, Bytes::copy_from_slice(data), limits) else { return };
    // One plan (batches of one), not the serving ladder: the parse and checks are under test.
    let options = LoadOptions { device: Device::Cpu, max_batch_size: 1, ..LoadOptions::default() };
    let _ = algolink_engine::load_model(&files, &options);
}

/// A config file.
pub fn config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::Config::parse(text);
    }
}
