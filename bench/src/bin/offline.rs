//! Offline engine throughput per batch size: the ceiling a server can reach for a model.
//!
//!     offline MODEL_FILE [BATCH_SIZES] [SECONDS_PER_SIZE]
//!
//! `ONNX_BACKEND=ort` runs ONNX models on ONNX Runtime (a build with `--features ort`).
//! `DEVICE=cuda:0` (a build with `--features cuda`) runs on that device and also runs every batch
//! on the CPU, printing the largest relative difference of the outputs (`max_rel_diff`), for
//! `bench/gpu/run.sh`.
//! MODEL_FILE is what a push takes: `.onnx`, `.safetensors` or a `.tar` of a model directory.
//! Feeds synthetic inputs (zeros for integers, a fixed pattern for floats; variable trailing dims
//! get `SYNTHETIC_SEQ_LEN`; a text model gets `SYNTHETIC_TEXT`, tokenised once beforehand) to the
//! prepared model, one batch after another on this thread, and prints JSON lines: batch size,
//! batches/s, rows/s, milliseconds per batch. A model that runs batches side by side on one copy
//! (tract) on two cores or more is also measured that way, as the CPU scheduler's pair runs them:
//! two threads, each on its lane (`"lanes": 2`); the best line of either is the ceiling. `LANES=1`
//! measures one lane only (a batch's own time, to compare with another engine's).

use std::time::{Duration, Instant};

use algolink_engine::{
    DataType, Device, DeviceRequest, LoadOptions, ModelFiles, OnnxBackend, Tensor, load_model, zero_inputs,
};
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
        Ok("candle") => OnnxBackend::Candle,
        _ => OnnxBackend::Tract,
    };
    let device = std::env::var("DEVICE").unwrap_or_else(|_| "cpu".into()).parse::<DeviceRequest>()?.resolve()?;
    let max_batch_size = sizes.iter().copied().max().unwrap_or(1);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let one_lane = std::env::var("LANES").is_ok_and(|l| l == "1");
    let options = LoadOptions {
        device,
        warmup_batch_sizes: sizes.clone(),
        max_batch_size,
        onnx_backend,
        cpu_fallback: false,
        copies: 1,
        // It measures both ways itself, for as long as it is asked to.
        measure_lanes: false,
    };
    let model = load_model(&files, &options)?;
    let cpu = match device {
        Device::Cpu => None,
        _ => Some(load_model(&files, &LoadOptions { device: Device::Cpu, ..options.clone() })?),
    };
    for n in sizes {
        let inputs = model.preprocess(pattern(zero_inputs(model.signature(), n)?)?)?;
        let max_rel_diff = match &cpu {
            Some(cpu) => Some(max_rel_diff(&model.run(inputs.clone())?, &cpu.run(inputs.clone())?)?),
            None => None,
        };
        let per_s = batches_per_second(seconds, 1, |_| model.run(inputs.clone()).map(drop));
        let two_lanes = (model.concurrent() && cores >= 2 && !one_lane)
            .then(|| batches_per_second(seconds, 2, |lane| model.run_in_lane(inputs.clone(), lane, 2).map(drop)));
        for (lanes, per_s) in [(1, Some(per_s)), (2, two_lanes)] {
            let Some(per_s) = per_s else { continue };
            let per_s = per_s?;
            println!(
                "{}",
                serde_json::json!({ "model": path, "device": device.to_string(), "batch": n, "lanes": lanes,
                                    "batches_per_s": per_s, "rows_per_s": per_s * n as f64,
                                    "ms_per_batch": 1e3 * lanes as f64 / per_s, "max_rel_diff": max_rel_diff })
            );
        }
    }
    Ok(())
}

/// Batches per second over `seconds`, `lanes` threads each running `run(lane)` batch after batch
/// (two lanes: [`algolink_engine::Model::run_in_lane`], as the CPU scheduler's pair runs them).
fn batches_per_second(
    seconds: f64,
    lanes: usize,
    run: impl Fn(usize) -> Result<(), algolink_engine::EngineError> + Sync,
) -> anyhow::Result<f64> {
    let start = Instant::now();
    let window = Duration::from_secs_f64(seconds);
    let batches = std::thread::scope(|s| {
        let threads: Vec<_> = (0..lanes)
            .map(|lane| {
                let run = &run;
                s.spawn(move || {
                    let mut batches = 0u64;
                    while start.elapsed() < window {
                        run(lane)?;
                        batches += 1;
                    }
                    Ok::<_, algolink_engine::EngineError>(batches)
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().expect("offline lane thread")).sum::<Result<u64, _>>()
    })?;
    Ok(batches as f64 / start.elapsed().as_secs_f64())
}

/// Float inputs get a fixed pattern in [-0.5, 0.5) (zeros would hide differences).
fn pattern(inputs: Vec<Tensor>) -> anyhow::Result<Vec<Tensor>> {
    inputs
        .into_iter()
        .map(|t| match t.dtype {
            DataType::F32 => {
                let values: Vec<f32> = (0..t.numel()).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
                Ok(Tensor::from_f32(t.shape, &values)?)
            }
            _ => Ok(t),
        })
        .collect()
}

/// The largest |a - b| / max(|b|, 1e-3) over every float output.
fn max_rel_diff(a: &[Tensor], b: &[Tensor]) -> anyhow::Result<f64> {
    let mut worst = 0f64;
    for (x, y) in a.iter().zip(b) {
        anyhow::ensure!(x.shape == y.shape, "shapes differ: {:?} and {:?}", x.shape, y.shape);
        if x.dtype == DataType::F32 {
            for (p, q) in x.to_f32()?.iter().zip(y.to_f32()?) {
                worst = worst.max(f64::from((p - q).abs()) / f64::from(q.abs()).max(1e-3));
            }
        } else {
            anyhow::ensure!(x == y, "{} outputs differ", x.dtype);
        }
    }
    Ok(worst)
}
