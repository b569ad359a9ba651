use std::collections::BTreeMap;
use std::sync::Arc;

use crate::model::{Model, Signature};
use crate::{Device, EngineError, Tensor};

/// The files of one model version by relative path: `model.onnx`, or `*.safetensors` with an
/// optional `config.json`; with `tokenizer.json` the model takes text (see [`crate::text`]); a
/// sentence-transformers directory also brings `modules.json`, `1_Pooling/config.json` and
/// `sentence_bert_config.json`.
pub type ModelFiles = BTreeMap<String, bytes::Bytes>;

/// The top-level files whose name ends with `suffix` (files in subdirectories, such as an
/// `onnx/` export beside the safetensors weights, are not model candidates).
fn find<'a>(files: &'a ModelFiles, suffix: &str) -> Vec<(&'a String, &'a bytes::Bytes)> {
    files.iter().filter(|(n, _)| n.ends_with(suffix) && !n.contains('/')).collect()
}

/// A JSON file of the version, if present.
fn json_file(files: &ModelFiles, name: &str) -> Result<Option<serde_json::Value>, EngineError> {
    files
        .get(name)
        .map(|b| serde_json::from_slice(b).map_err(|e| EngineError::InvalidModel(format!("{name}: {e}"))))
        .transpose()
}

/// What runs ONNX models.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnnxBackend {
    /// tract on the CPU, built in; on a GPU device, the candle plan when the graph's operators
    /// allow it, tract on the CPU otherwise.
    #[default]
    Tract,
    /// ONNX Runtime on the CPU, loaded at run time (needs the cargo feature `ort`; see `ort.rs`).
    Ort,
    /// The graph compiled into candle operations (`onnx_candle.rs`) on the configured device, the
    /// CPU included; a graph it cannot run is refused.
    Candle,
}

#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub device: Device,
    /// One batch of each of these sizes runs before the model is reported ready.
    pub warmup_batch_sizes: Vec<usize>,
    /// The largest batch the scheduler will form: what the model builds per batch size (tract's
    /// concrete plans) is built up to it at load.
    pub max_batch_size: usize,
    pub onnx_backend: OnnxBackend,
    /// The configuration said `auto`: a version that does not fit the GPU's free memory loads on
    /// the CPU instead of being refused.
    pub cpu_fallback: bool,
    /// Copies of the weights the GPU must have room for (this one and those loaded after it, see
    /// [`load_instances`]).
    pub copies: usize,
    /// The scheduler runs in adaptive mode, where a CPU model that runs faster in two lanes gets
    /// a pair of executors: measure it after warm-up ([`Model::measure_lanes`], up to a few
    /// hundred milliseconds).
    pub measure_lanes: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            device: Device::Cpu,
            warmup_batch_sizes: vec![1],
            max_batch_size: 64,
            onnx_backend: OnnxBackend::Tract,
            cpu_fallback: false,
            copies: 1,
            measure_lanes: false,
        }
    }
}

/// Prepares a model on its device: parses and checks the files, optimises the graph or places
/// the weights, then warms it up. Any problem with the files is an `InvalidModel` or
/// `Unsupported` error naming it, including a file that makes a third-party parser panic (tract
/// indexes maps with names taken from the file): an upload is untrusted input.
pub fn load_model(files: &ModelFiles, options: &LoadOptions) -> Result<Arc<dyn Model>, EngineError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| load_unguarded(files, options))).unwrap_or_else(|panic| {
        let why = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".into());
        Err(EngineError::InvalidModel(format!("the model's files broke the importer ({why}): the file is malformed")))
    })
}

/// Loads `instances` copies of a version, one per executor (see [`Scheduler`](crate::Scheduler)):
/// each holds its own state (a GPU's weights and stream, candle's tensors), so none waits on
/// another; a model that runs batches side by side from one copy ([`Model::concurrent`]: tract's)
/// is loaded once and shared.
/// Copies after the first go where the first went, without falling back: a version whose copies
/// would not all fit the GPU is refused (or, `auto`, loads on the CPU) as a whole, before the
/// first copy is placed; a GPU version never runs half on the CPU.
pub fn load_instances(
    files: &ModelFiles,
    options: &LoadOptions,
    instances: usize,
) -> Result<Vec<Arc<dyn Model>>, EngineError> {
    let instances = instances.max(1);
    let first = load_model(files, &LoadOptions { copies: instances, ..options.clone() })?;
    if first.concurrent() {
        // One copy runs them all (tract: weights shared, a run state per batch in flight).
        return Ok(vec![first; instances]);
    }
    let rest = LoadOptions { device: first.device(), cpu_fallback: false, copies: 1, ..options.clone() };
    let mut all = vec![first];
    for _ in 1..instances {
        all.push(load_model(files, &rest)?);
    }
    Ok(all)
}

fn load_unguarded(files: &ModelFiles, options: &LoadOptions) -> Result<Arc<dyn Model>, EngineError> {
    let onnx = find(files, ".onnx");
    let weights = find(files, ".safetensors");
    let model: Arc<dyn Model> = match (onnx.as_slice(), weights.as_slice()) {
        ([(_, bytes)], []) => load_onnx(bytes, options)?,
        ([], [(_, bytes)]) => {
            let mut config = crate::safetensors::config_for(bytes, files.get("config.json").map(|b| &b[..]))?;
            crate::safetensors::apply_sentence_transformers(&mut config, files)?;
            let device = place(options, crate::safetensors::loaded_bytes(bytes)?)?;
            Arc::from(crate::safetensors::load(bytes, &config, device)?)
        }
        ([], []) => {
            return Err(EngineError::InvalidModel("no model file: expected a .onnx or a .safetensors file".into()));
        }
        _ => {
            return Err(EngineError::InvalidModel(
                "more than one model file: a version holds exactly one .onnx or .safetensors file".into(),
            ));
        }
    };
    let model = match files.get("tokenizer.json") {
        Some(tokenizer) => {
            let number = |file: Option<serde_json::Value>, key: &str| {
                file.and_then(|c| c.get(key).and_then(|v| v.as_u64())).map(|n| n as usize)
            };
            // Where sentence-transformers keeps its max_seq_length: sentence_bert_config.json up to
            // version 5, tokenizer_config.json's model_max_length from 6 (unset, Hugging Face
            // writes a huge sentinel there).
            let max_length = number(json_file(files, "sentence_bert_config.json")?, "max_seq_length").or_else(|| {
                let from_tokenizer = number(json_file(files, "tokenizer_config.json").ok()?, "model_max_length");
                from_tokenizer.filter(|&n| n <= 1 << 20)
            });
            let max_positions = number(json_file(files, "config.json")?, "max_position_embeddings");
            Arc::new(crate::text::TextModel::new(tokenizer, model, max_length, max_positions)?)
        }
        None => model,
    };
    model.prepare(options.max_batch_size);
    warm_up(model.as_ref(), &options.warmup_batch_sizes)?;
    if options.measure_lanes {
        model.measure_lanes(options.max_batch_size);
    }
    Ok(model)
}

/// An ONNX model on its backend. On a GPU, and anywhere with the `candle` backend, the graph is
/// compiled into candle operations; on a GPU, a graph with operators the plan lacks (the
/// ai.onnx.ml models among them), or one that does not fit and may fall back, runs on the CPU.
fn load_onnx(bytes: &[u8], options: &LoadOptions) -> Result<Arc<dyn Model>, EngineError> {
    let on_gpu = options.device != Device::Cpu;
    let backend = options.onnx_backend;
    if backend == OnnxBackend::Candle || (on_gpu && backend == OnnxBackend::Tract) {
        match crate::onnx_candle::CandleOnnx::parse(bytes) {
            Ok((proto, weight_bytes)) => {
                let device = place(options, weight_bytes)?;
                if device != Device::Cpu || backend == OnnxBackend::Candle {
                    return Ok(Arc::new(crate::onnx_candle::CandleOnnx::build(&proto, device)?));
                }
            }
            Err(EngineError::Unsupported(why)) if backend == OnnxBackend::Tract => {
                tracing::warn!("{why}: this model runs on the CPU through tract, not on {}", options.device);
            }
            Err(e) => return Err(e),
        }
    } else if on_gpu {
        tracing::warn!("ONNX Runtime runs on the CPU here; {} is not used for this model", options.device);
    }
    Ok(match backend {
        OnnxBackend::Tract | OnnxBackend::Candle => Arc::new(crate::onnx::OnnxModel::load(bytes)?),
        #[cfg(feature = "ort")]
        OnnxBackend::Ort => Arc::new(crate::ort::OrtModel::load(bytes)?),
        #[cfg(not(feature = "ort"))]
        OnnxBackend::Ort => {
            return Err(EngineError::Device("onnx_backend \"ort\" needs a build with the cargo feature `ort`".into()));
        }
    })
}

/// The device a version of `weight_bytes` (as loaded) goes on: the requested one when it has the
/// room, else the CPU when the configuration allows it; otherwise a `DeviceMemory` error before
/// anything is allocated.
fn place(options: &LoadOptions, weight_bytes: u64) -> Result<Device, EngineError> {
    let copies = options.copies.max(1);
    let room = options.device.check_room(weight_bytes.saturating_mul(copies as u64)).map_err(|e| match e {
        EngineError::DeviceMemory(why) if copies > 1 => {
            EngineError::DeviceMemory(format!("{why} (weights of {copies} instances, each with its own copy)"))
        }
        e => e,
    });
    match room {
        Ok(()) => Ok(options.device),
        Err(EngineError::DeviceMemory(why)) if options.cpu_fallback => {
            tracing::warn!("{why}; loading on the CPU instead (device = \"auto\")");
            Ok(Device::Cpu)
        }
        Err(e) => Err(e),
    }
}

/// Length given to variable non-batch dimensions (sequence lengths) of synthetic inputs.
pub const SYNTHETIC_SEQ_LEN: usize = 8;

/// The string given to BYTES inputs of synthetic inputs: a short sentence (nine tokens with a
/// BERT vocabulary, special tokens included).
pub const SYNTHETIC_TEXT: &str = "the quick brown fox jumps high.";

/// Zero-filled inputs of `batch` rows for a signature; variable trailing dims get
/// [`SYNTHETIC_SEQ_LEN`]. Used for warm-up and for offline benchmarks.
pub fn zero_inputs(signature: &Signature, batch: usize) -> Result<Vec<Tensor>, EngineError> {
    signature
        .inputs
        .iter()
        .map(|spec| {
            let shape: Vec<usize> = spec
                .shape
                .iter()
                .enumerate()
                .map(|(i, &d)| match (d, i) {
                    (d, _) if d >= 0 => d as usize,
                    (_, 0) => batch,
                    _ => SYNTHETIC_SEQ_LEN,
                })
                .collect();
            let count = shape.iter().product::<usize>();
            match spec.datatype.size() {
                Some(size) => Tensor::from_raw(spec.datatype, shape, vec![0; count * size]),
                // Strings of SYNTHETIC_SEQ_LEN words, so that a text model sees a sequence.
                None => Tensor::from_bytes(shape, vec![SYNTHETIC_TEXT.as_bytes().to_vec(); count]),
            }
        })
        .collect()
}

/// Runs one batch of zeros of each size through the model.
pub fn warm_up(model: &dyn Model, batch_sizes: &[usize]) -> Result<(), EngineError> {
    for &n in batch_sizes {
        let inputs = model.preprocess(zero_inputs(model.signature(), n)?)?;
        let outputs =
            model.run(inputs).map_err(|e| EngineError::InvalidModel(format!("warm-up batch of {n} failed: {e}")))?;
        if outputs.len() != model.signature().outputs.len() {
            return Err(EngineError::InvalidModel(format!(
                "model returned {} outputs, its signature declares {}",
                outputs.len(),
                model.signature().outputs.len()
            )));
        }
    }
    Ok(())
}
