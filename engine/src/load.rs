use std::collections::BTreeMap;
use std::sync::Arc;

use crate::model::{Model, Signature};
use crate::{Device, EngineError, Tensor};

/// The files of one model version by name: `model.onnx`, or `*.safetensors` with an optional
/// `config.json` (and, later, `tokenizer.json`).
pub type ModelFiles = BTreeMap<String, bytes::Bytes>;

/// The files whose name ends with `suffix`.
fn find<'a>(files: &'a ModelFiles, suffix: &str) -> Vec<(&'a String, &'a bytes::Bytes)> {
    files.iter().filter(|(n, _)| n.ends_with(suffix)).collect()
}

#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub device: Device,
    /// One batch of each of these sizes runs before the model is reported ready.
    pub warmup_batch_sizes: Vec<usize>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { device: Device::Cpu, warmup_batch_sizes: vec![1] }
    }
}

/// Prepares a model on its device: parses and checks the files, optimises the graph or places
/// the weights, then warms it up. Any problem with the files is an `InvalidModel` or
/// `Unsupported` error naming it.
pub fn load_model(files: &ModelFiles, options: &LoadOptions) -> Result<Arc<dyn Model>, EngineError> {
    let onnx = find(files, ".onnx");
    let weights = find(files, ".safetensors");
    let model: Arc<dyn Model> = match (onnx.as_slice(), weights.as_slice()) {
        ([(_, bytes)], []) => {
            if options.device != Device::Cpu {
                tracing::warn!("ONNX models run on the CPU backend; {} is not used for this one", options.device);
            }
            Arc::new(crate::onnx::OnnxModel::load(bytes)?)
        }
        ([], [(_, bytes)]) => {
            let config = crate::safetensors::config_for(bytes, files.get("config.json").map(|b| &b[..]))?;
            Arc::from(crate::safetensors::load(bytes, &config, options.device)?)
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
    warm_up(model.as_ref(), &options.warmup_batch_sizes)?;
    Ok(model)
}

/// Length given to variable non-batch dimensions (sequence lengths) of synthetic inputs.
pub const SYNTHETIC_SEQ_LEN: usize = 8;

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
                None => Tensor::from_bytes(shape, vec![Vec::new(); count]),
            }
        })
        .collect()
}

/// Runs one batch of zeros of each size through the model.
pub fn warm_up(model: &dyn Model, batch_sizes: &[usize]) -> Result<(), EngineError> {
    model.prepare(batch_sizes);
    for &n in batch_sizes {
        let inputs = zero_inputs(model.signature(), n)?;
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
