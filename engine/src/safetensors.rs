//! safetensors models on candle: a weights file plus a small JSON config naming the architecture.
//!
//! The config comes from `config.json` beside the weights, or from the safetensors metadata key
//! `algolink.config` (a JSON string). Its `architecture` (or Hugging Face's `model_type`) picks:
//! - `mlp`: layers inferred from the `*.weight` / `*.bias` tensors in natural name order,
//!   `activation` between layers (`relu`, `gelu`, `tanh`, `sigmoid`, `none`), optional
//!   `output_activation` (`softmax`, `sigmoid`, `none`). Input `input` FP32 [N, in], output
//!   `output` FP32 [N, out].
//! - `bert`: candle-transformers' BERT. Inputs `input_ids`, `attention_mask`, `token_type_ids`
//!   INT64 [N, S]; output `sentence_embedding` FP32 [N, hidden], pooled as sentence-transformers
//!   does it (`pooling`: `mean` over the attention mask (default), `cls`, or `max`) and
//!   L2-normalised when `normalize` is true (default). A sentence-transformers directory says both
//!   in its own files (`modules.json`, `1_Pooling/config.json`), which then take precedence.

use candle_core::{DType, Module, Tensor as CTensor};
use candle_nn::{Linear, VarBuilder};
use candle_transformers::models::bert::{BertModel, Config as BertConfig};
use serde::Deserialize;

use crate::model::{Model, Signature, TensorSpec};
use crate::{DataType, Device, EngineError, Tensor};

/// Reads the architecture config of a safetensors model.
pub fn config_for(weights: &[u8], config_json: Option<&[u8]>) -> Result<serde_json::Value, EngineError> {
    let (_, meta) = ::safetensors::SafeTensors::read_metadata(weights)
        .map_err(|e| EngineError::InvalidModel(format!("not a readable safetensors file: {e}")))?;
    let text = match config_json {
        Some(c) => {
            String::from_utf8(c.to_vec()).map_err(|_| EngineError::InvalidModel("config.json is not UTF-8".into()))?
        }
        None => meta.metadata().as_ref().and_then(|m| m.get("algolink.config").cloned()).ok_or_else(|| {
            EngineError::InvalidModel(
                "safetensors model needs a config: a config.json beside it, or the metadata key `algolink.config`"
                    .into(),
            )
        })?,
    };
    serde_json::from_str(&text).map_err(|e| EngineError::InvalidModel(format!("model config is not valid JSON: {e}")))
}

/// Bytes the weights take once loaded: every tensor is placed as f32.
pub fn loaded_bytes(weights: &[u8]) -> Result<u64, EngineError> {
    let (_, meta) = ::safetensors::SafeTensors::read_metadata(weights)
        .map_err(|e| EngineError::InvalidModel(format!("not a readable safetensors file: {e}")))?;
    Ok(meta.tensors().values().map(|t| t.shape.iter().product::<usize>() as u64 * 4).sum())
}

/// Reads a sentence-transformers directory's pooling and normalisation into the model config
/// (`pooling`, `normalize`); does nothing without `modules.json`.
pub fn apply_sentence_transformers(
    config: &mut serde_json::Value,
    files: &crate::ModelFiles,
) -> Result<(), EngineError> {
    let Some(modules) = files.get("modules.json") else { return Ok(()) };
    #[derive(Deserialize)]
    struct Module {
        #[serde(rename = "type")]
        kind: String,
        #[serde(default)]
        path: String,
    }
    let modules: Vec<Module> =
        serde_json::from_slice(modules).map_err(|e| EngineError::InvalidModel(format!("modules.json: {e}")))?;
    let normalize = modules.iter().any(|m| m.kind.ends_with(".Normalize"));
    let mut pooling = "mean";
    if let Some(module) = modules.iter().find(|m| m.kind.ends_with(".Pooling")) {
        let name = format!("{}/config.json", module.path.trim_end_matches('/'));
        let file = files
            .get(&name)
            .ok_or_else(|| EngineError::InvalidModel(format!("modules.json names {name}, which is missing")))?;
        let modes: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(file).map_err(|e| EngineError::InvalidModel(format!("{name}: {e}")))?;
        // sentence-transformers 6 writes `"pooling_mode": "mean"`; earlier versions one boolean
        // `pooling_mode_<mode>` per mode.
        let on: Vec<&str> = match modes.get("pooling_mode").and_then(|m| m.as_str()) {
            Some(mode) => vec![mode],
            None => modes
                .iter()
                .filter(|(k, v)| k.starts_with("pooling_mode_") && v.as_bool() == Some(true))
                .map(|(k, _)| k.trim_start_matches("pooling_mode_"))
                .collect(),
        };
        pooling = match on.as_slice() {
            ["mean" | "mean_tokens"] => "mean",
            ["cls" | "cls_token"] => "cls",
            ["max" | "max_tokens"] => "max",
            other => {
                return Err(EngineError::Unsupported(format!(
                    "{name}: pooling {other:?}; supported are mean, cls and max"
                )));
            }
        };
    }
    if let Some(c) = config.as_object_mut() {
        c.insert("pooling".into(), pooling.into());
        c.insert("normalize".into(), normalize.into());
    }
    Ok(())
}

pub fn load(weights: &[u8], config: &serde_json::Value, device: Device) -> Result<Box<dyn Model>, EngineError> {
    let arch = config
        .get("architecture")
        .or_else(|| config.get("model_type"))
        .and_then(|v| v.as_str())
        .ok_or_else(|| EngineError::InvalidModel("model config names no `architecture`".into()))?;
    let dev = device.candle()?;
    match arch {
        "mlp" => Ok(Box::new(MlpModel::load(weights, config, dev)?)),
        "bert" => Ok(Box::new(BertEncoder::load(weights, config, dev)?)),
        other => Err(EngineError::Unsupported(format!("unknown architecture {other:?}: known are mlp, bert"))),
    }
}

/// candle's message without the backtrace it appends when RUST_BACKTRACE is set.
fn message(e: candle_core::Error) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

fn candle_err(e: candle_core::Error) -> EngineError {
    EngineError::Execution(message(e))
}

fn invalid(e: candle_core::Error) -> EngineError {
    EngineError::InvalidModel(message(e))
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
enum Activation {
    None,
    Relu,
    Gelu,
    Tanh,
    Sigmoid,
    Softmax,
}

impl Activation {
    fn apply(self, x: CTensor) -> candle_core::Result<CTensor> {
        match self {
            Activation::None => Ok(x),
            Activation::Relu => x.relu(),
            Activation::Gelu => x.gelu_erf(),
            Activation::Tanh => x.tanh(),
            Activation::Sigmoid => candle_nn::ops::sigmoid(&x),
            Activation::Softmax => candle_nn::ops::softmax_last_dim(&x),
        }
    }
}

#[derive(Deserialize)]
struct MlpConfig {
    #[serde(default = "relu")]
    activation: Activation,
    #[serde(default = "none")]
    output_activation: Activation,
}

fn relu() -> Activation {
    Activation::Relu
}
fn none() -> Activation {
    Activation::None
}

/// Splits a tensor name into text and number runs so that `layers.10` sorts after `layers.2`.
fn natural_key(name: &str) -> Vec<(String, u64)> {
    let mut key = Vec::new();
    let mut text = String::new();
    let mut num: Option<u64> = None;
    for c in name.chars() {
        if let Some(d) = c.to_digit(10) {
            num = Some(num.unwrap_or(0).saturating_mul(10).saturating_add(d as u64));
        } else {
            if let Some(n) = num.take() {
                key.push((std::mem::take(&mut text), n));
            }
            text.push(c);
        }
    }
    key.push((text, num.unwrap_or(0)));
    key
}

pub struct MlpModel {
    layers: Vec<Linear>,
    activation: Activation,
    output_activation: Activation,
    device: candle_core::Device,
    signature: Signature,
}

impl MlpModel {
    fn load(weights: &[u8], config: &serde_json::Value, device: candle_core::Device) -> Result<MlpModel, EngineError> {
        let cfg: MlpConfig = serde_json::from_value(config.clone())
            .map_err(|e| EngineError::InvalidModel(format!("mlp config: {e}")))?;
        let tensors = candle_core::safetensors::load_buffer(weights, &device).map_err(invalid)?;
        let mut names: Vec<&String> =
            tensors.iter().filter(|(n, t)| n.ends_with(".weight") && t.rank() == 2).map(|(n, _)| n).collect();
        names.sort_by_key(|n| natural_key(n));
        if names.is_empty() {
            return Err(EngineError::InvalidModel("mlp has no 2-d `*.weight` tensors".into()));
        }
        let mut layers = Vec::new();
        let mut dims: Vec<usize> = Vec::new();
        for name in names {
            let w = tensors[name].to_dtype(DType::F32).map_err(invalid)?;
            let (out_dim, in_dim) = w.dims2().map_err(invalid)?;
            if let Some(&prev) = dims.last()
                && prev != in_dim
            {
                return Err(EngineError::InvalidModel(format!(
                    "mlp layer {name} takes {in_dim} features but the previous layer gives {prev}"
                )));
            }
            if dims.is_empty() {
                dims.push(in_dim);
            }
            dims.push(out_dim);
            let bias_name = format!("{}.bias", name.trim_end_matches(".weight"));
            let bias = match tensors.get(&bias_name) {
                Some(b) if b.dims() == [out_dim] => Some(b.to_dtype(DType::F32).map_err(invalid)?),
                Some(b) => {
                    return Err(EngineError::InvalidModel(format!(
                        "{bias_name} has shape {:?}, expected [{out_dim}]",
                        b.dims()
                    )));
                }
                None => None,
            };
            layers.push(Linear::new(w, bias));
        }
        let spec =
            |name: &str, n: usize| TensorSpec { name: name.into(), datatype: DataType::F32, shape: vec![-1, n as i64] };
        let signature = Signature {
            platform: "candle_safetensors".into(),
            inputs: vec![spec("input", dims[0])],
            outputs: vec![spec("output", *dims.last().expect("at least one layer"))],
            pad_to_longest: false,
        };
        Ok(MlpModel { layers, activation: cfg.activation, output_activation: cfg.output_activation, device, signature })
    }
}

impl Model for MlpModel {
    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn device(&self) -> Device {
        Device::of(&self.device)
    }

    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, EngineError> {
        let x = &inputs[0];
        let mut h = CTensor::from_raw_buffer(x.raw()?, DType::F32, &x.shape, &self.device).map_err(candle_err)?;
        let last = self.layers.len() - 1;
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward(&h).map_err(candle_err)?;
            let act = if i == last { self.output_activation } else { self.activation };
            h = act.apply(h).map_err(candle_err)?;
        }
        Ok(vec![to_host(&h)?])
    }
}

fn to_host(t: &CTensor) -> Result<Tensor, EngineError> {
    let shape = t.dims().to_vec();
    let values = t.flatten_all().and_then(|f| f.to_vec1::<f32>()).map_err(candle_err)?;
    Tensor::from_f32(shape, &values)
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
enum Pooling {
    #[default]
    Mean,
    Cls,
    Max,
}

#[derive(Deserialize)]
struct PoolingConfig {
    #[serde(default)]
    pooling: Pooling,
    #[serde(default = "yes")]
    normalize: bool,
}

fn yes() -> bool {
    true
}

pub struct BertEncoder {
    model: BertModel,
    pooling: Pooling,
    normalize: bool,
    device: candle_core::Device,
    signature: Signature,
}

impl BertEncoder {
    fn load(
        weights: &[u8],
        config: &serde_json::Value,
        device: candle_core::Device,
    ) -> Result<BertEncoder, EngineError> {
        let cfg: BertConfig = serde_json::from_value(config.clone())
            .map_err(|e| EngineError::InvalidModel(format!("bert config: {e}")))?;
        let pooling: PoolingConfig = serde_json::from_value(config.clone())
            .map_err(|e| EngineError::InvalidModel(format!("bert pooling config: {e}")))?;
        let vb = VarBuilder::from_slice_safetensors(weights, DType::F32, &device).map_err(invalid)?;
        let model = BertModel::load(vb, &cfg).map_err(invalid)?;
        let ids = |name: &str| TensorSpec { name: name.into(), datatype: DataType::I64, shape: vec![-1, -1] };
        let signature = Signature {
            platform: "candle_safetensors".into(),
            inputs: vec![ids("input_ids"), ids("attention_mask"), ids("token_type_ids")],
            outputs: vec![TensorSpec {
                name: "sentence_embedding".into(),
                datatype: DataType::F32,
                shape: vec![-1, cfg.hidden_size as i64],
            }],
            pad_to_longest: true,
        };
        Ok(BertEncoder { model, pooling: pooling.pooling, normalize: pooling.normalize, device, signature })
    }
}

impl Model for BertEncoder {
    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn device(&self) -> Device {
        Device::of(&self.device)
    }

    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, EngineError> {
        let load =
            |t: &Tensor| CTensor::from_raw_buffer(t.raw()?, DType::I64, &t.shape, &self.device).map_err(candle_err);
        let (ids, mask, types) = (load(&inputs[0])?, load(&inputs[1])?, load(&inputs[2])?);
        if inputs[1].shape != inputs[0].shape || inputs[2].shape != inputs[0].shape {
            return Err(EngineError::InvalidInput(
                "input_ids, attention_mask and token_type_ids must have one shape".into(),
            ));
        }
        let run = || -> candle_core::Result<CTensor> {
            let hidden = self.model.forward(&ids, &types, Some(&mask))?;
            let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
            let pooled = match self.pooling {
                Pooling::Mean => {
                    let summed = hidden.broadcast_mul(&m)?.sum(1)?;
                    let counts = m.sum(1)?.clamp(1e-9, f64::MAX)?;
                    summed.broadcast_div(&counts)?
                }
                Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?,
                // Padding gets -1e9 first, as sentence-transformers does.
                Pooling::Max => {
                    let masked = hidden.broadcast_mul(&m)?.broadcast_add(&((m.affine(1e9, -1e9))?))?;
                    masked.max(1)?
                }
            };
            if self.normalize {
                let norm = pooled.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
                pooled.broadcast_div(&norm)
            } else {
                Ok(pooled)
            }
        };
        Ok(vec![to_host(&run().map_err(candle_err)?)?])
    }
}

#[cfg(test)]
mod tests {
    use super::natural_key;

    #[test]
    fn natural_order() {
        let mut names = vec!["layers.10.weight", "layers.2.weight", "head.weight", "layers.1.weight"];
        names.sort_by_key(|n| natural_key(n));
        assert_eq!(names, vec!["head.weight", "layers.1.weight", "layers.2.weight", "layers.10.weight"]);
    }
}
