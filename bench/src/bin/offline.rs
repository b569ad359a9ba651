//! Offline engine throughput per batch size: the ceiling a server can reach for a model.
//!
//!     offline MODEL_FILE [BATCH_SIZES] [SECONDS_PER_SIZE]
//!
//! `ONNX_BACKEND=ort` runs ONNX models on ONNX Runtime (a build with `--features ort`).
//! MODEL_FILE is what a push takes: `.onnx`, `.safetensors` or a `.tar` of a model directory.
//! Feeds zeros (variable trailing dims get `SYNTHETIC_SEQ_LEN`; a text model gets
//! `SYNTHETIC_TEXT`, tokenised once beforehand) to the prepared model, one batch after another on
//! this thread, and prints JSON lines: batch size, batches/s, rows/s.

use std::time::{Duration, Instant};

use algolink_engine::{LoadOptions, ModelFiles, OnnxBackend, load_model, zero_inputs};
use algolink_registry::{ArtifactLimits, Format, unpack};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args.next().ok_or_else(|| anyhow::anyhow!("usage: offline MODEL_FILE [1,8,32] [2]"))?;
    let sizes: Vec<usize> =
        args.next().unwrap_or_else(|| "1,8,32,128".into()).split(',').map(str::parse).collect::<Result<_, _>>()?;
    let seconds: f64 = args.next().map_or(Ok(2.0), |s| s.parse())?;
    let name = std::path::Path::new(&path).file_name().and_then(|n| n.to_str()).unwrap_or("model.onnx").to_string();
    let data = bytes::Bytes::from(std::fs::read(&path)?);
    let files: ModelFiles = match Format::detect(&data) {
        Format::Tar => unpack(Format::Tar, data, ArtifactLimits::default())?,
        _ => ModelFiles::from([(name, data)]),
    };
    let onnx_backend = match std::env::var("ONNX_BACKEND").as_deref() {
        Ok("ort") => OnnxBackend::Ort,
        _ => OnnxBackend::Tract,
    };
    let options = LoadOptions { warmup_batch_sizes: sizes.clone(), onnx_backend, ..Default::default() };
    let model = load_model(&files, &options)?;
    for n in sizes {
        let inputs = model.preprocess(zero_inputs(model.signature(), n)?)?;
        let start = Instant::now();
        let mut batches = 0u64;
        while start.elapsed() < Duration::from_secs_f64(seconds) {
            model.run(inputs.clone())?;
            batches += 1;
        }
        let per_s = batches as f64 / start.elapsed().as_secs_f64();
        println!(
            "{}",
            serde_json::json!({ "model": path, "batch": n, "batches_per_s": per_s, "rows_per_s": per_s * n as f64 })
        );
    }
    Ok(())
}
