//! The AlgoLink engine: devices, models and the dynamic batch scheduler.
//!
//! Architecture invariant: this crate knows no HTTP, no registry and no versions. It turns model
//! files into a prepared [`Model`] on a [`Device`], and runs batches of requests through it with a
//! [`Scheduler`].

mod device;
mod error;
mod load;
pub mod model;
pub mod onnx;
pub mod onnx_candle;
mod onnx_ml;
#[cfg(feature = "ort")]
pub mod ort;
pub mod safetensors;
pub mod scheduler;
pub mod stats;
pub mod tensor;
pub mod text;

pub use device::{Device, DeviceRequest};
pub use error::EngineError;
pub use load::{
    LoadOptions, ModelFiles, OnnxBackend, SYNTHETIC_SEQ_LEN, SYNTHETIC_TEXT, load_instances, load_model, warm_up,
    zero_inputs,
};
pub use model::{Model, Signature, TensorSpec};
pub use scheduler::{BatchConfig, CpuPair, InferRequest, Scheduler};
pub use stats::Stats;
pub use tensor::{DataType, Tensor, TensorData};
