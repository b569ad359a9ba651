//! ONNX models on ONNX Runtime (cargo feature `ort`), for users who want its CPU speed.
//!
//! ONNX Runtime is loaded at run time from an installed `libonnxruntime` (the `ort` crate's
//! `load-dynamic`): `ORT_DYLIB_PATH` names the library (the PyPI `onnxruntime` wheel ships one
//! in `onnxruntime/capi/`), else the system's `libonnxruntime.so` is used. Nothing is downloaded
//! at build time, and a build with the feature still runs (on tract) where no library is found:
//! only models asking for `onnx_backend = "ort"` fail, with the reason.
//!
//! Intra-op threads: `ALGOLINK_ORT_THREADS`, else every core (ONNX Runtime's spinning between
//! operators is kept: turning it off measured 20% slower for MiniLM served at concurrency 16).
//! One session per model version; the executor thread is its only caller.

use std::sync::{Mutex, OnceLock};

use ort::environment::Environment;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::{DynValue, Shape, Tensor as OrtTensor, TensorElementType, ValueType};

use crate::model::{Model, Signature, TensorSpec};
use crate::{DataType, EngineError, Tensor};

/// Loads the library and creates the environment once per process; later calls get the first
/// call's answer.
fn runtime() -> Result<&'static Environment, EngineError> {
    static LOADED: OnceLock<Result<Environment, String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            let path = std::env::var("ORT_DYLIB_PATH").unwrap_or_else(|_| "libonnxruntime.so".into());
            let env = ort::init_from(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| b.with_name("algolink").build().map_err(|e| e.to_string()))
                .map_err(|e| format!("cannot load ONNX Runtime from {path}: {e}"))?;
            tracing::info!(library = %path, "ONNX Runtime loaded");
            Ok(env)
        })
        .as_ref()
        .map_err(|e| EngineError::Device(e.clone()))
}

fn datatype(t: TensorElementType) -> Option<DataType> {
    Some(match t {
        TensorElementType::Float32 => DataType::F32,
        TensorElementType::Float64 => DataType::F64,
        TensorElementType::Int32 => DataType::I32,
        TensorElementType::Int64 => DataType::I64,
        _ => return None,
    })
}

fn invalid(e: ort::Error) -> EngineError {
    EngineError::InvalidModel(e.to_string())
}

pub struct OrtModel {
    session: Mutex<Session>,
    signature: Signature,
    /// Indices of the session's outputs that the signature serves (non-tensor outputs, such as
    /// scikit-learn's ZipMap, are left out).
    served_outputs: Vec<usize>,
}

impl OrtModel {
    pub fn load(bytes: &[u8]) -> Result<OrtModel, EngineError> {
        let env = runtime()?;
        let threads = std::env::var("ALGOLINK_ORT_THREADS")
            .ok()
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let setup = |e: ort::Error<_>| EngineError::Device(e.to_string());
        let session = Session::builder(env)
            .map_err(|e| EngineError::Device(e.to_string()))?
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .map_err(setup)?
            .with_intra_threads(threads)
            .map_err(setup)?
            .with_inter_threads(1)
            .map_err(setup)?
            .commit_from_memory(bytes)
            .map_err(invalid)?;
        let spec = |name: &str, ty: &ValueType| -> Result<Option<TensorSpec>, EngineError> {
            let ValueType::Tensor { ty, shape, .. } = ty else { return Ok(None) };
            let datatype = datatype(*ty).ok_or_else(|| {
                EngineError::Unsupported(format!(
                    "{name:?} is a {ty:?} tensor; the ort backend serves FP32, FP64, INT32, INT64"
                ))
            })?;
            Ok(Some(TensorSpec { name: name.to_string(), datatype, shape: shape.iter().map(|&d| d.max(-1)).collect() }))
        };
        let mut inputs = Vec::new();
        for i in session.inputs() {
            inputs.push(
                spec(i.name(), i.dtype())?
                    .ok_or_else(|| EngineError::Unsupported(format!("input {:?} is not a tensor", i.name())))?,
            );
        }
        let mut outputs = Vec::new();
        let mut served_outputs = Vec::new();
        for (index, o) in session.outputs().iter().enumerate() {
            if let Some(s) = spec(o.name(), o.dtype())? {
                outputs.push(s);
                served_outputs.push(index);
            }
        }
        if outputs.is_empty() {
            return Err(EngineError::Unsupported("the model has no tensor output".into()));
        }
        let pad_to_longest = crate::onnx::paddable(&inputs, &outputs);
        let signature = Signature { platform: "onnxruntime_onnx".into(), inputs, outputs, pad_to_longest };
        Ok(OrtModel { session: Mutex::new(session), signature, served_outputs })
    }
}

fn to_ort(t: Tensor) -> Result<DynValue, EngineError> {
    let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
    let value = match t.dtype {
        DataType::F32 => OrtTensor::from_array((shape, t.to_f32()?)).map(|v| v.into_dyn()),
        DataType::F64 => OrtTensor::from_array((shape, t.to_f64()?)).map(|v| v.into_dyn()),
        DataType::I32 => OrtTensor::from_array((shape, t.to_i32()?)).map(|v| v.into_dyn()),
        DataType::I64 => OrtTensor::from_array((shape, t.to_i64()?)).map(|v| v.into_dyn()),
        other => return Err(EngineError::InvalidInput(format!("the ort backend takes no {other} inputs"))),
    };
    value.map_err(|e| EngineError::Execution(e.to_string()))
}

fn from_ort(v: &DynValue, datatype: DataType) -> Result<Tensor, EngineError> {
    let e = |e: ort::Error| EngineError::Execution(e.to_string());
    let dims = |s: &Shape| s.iter().map(|&d| d as usize).collect::<Vec<_>>();
    match datatype {
        DataType::F32 => v.try_extract_tensor::<f32>().map_err(e).and_then(|(s, d)| Tensor::from_f32(dims(s), d)),
        DataType::F64 => v.try_extract_tensor::<f64>().map_err(e).and_then(|(s, d)| Tensor::from_f64(dims(s), d)),
        DataType::I32 => v.try_extract_tensor::<i32>().map_err(e).and_then(|(s, d)| Tensor::from_i32(dims(s), d)),
        _ => v.try_extract_tensor::<i64>().map_err(e).and_then(|(s, d)| Tensor::from_i64(dims(s), d)),
    }
}

impl Model for OrtModel {
    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, EngineError> {
        let named: Vec<(String, DynValue)> = self
            .signature
            .inputs
            .iter()
            .zip(inputs)
            .map(|(spec, t)| Ok((spec.name.clone(), to_ort(t)?)))
            .collect::<Result<_, EngineError>>()?;
        let mut session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        let outputs = session.run(named).map_err(|e| EngineError::Execution(e.to_string()))?;
        self.served_outputs
            .iter()
            .zip(&self.signature.outputs)
            .map(|(&i, spec)| from_ort(&outputs[i], spec.datatype))
            .collect()
    }
}
