use serde::Serialize;

use crate::{DataType, Device, EngineError, Tensor};

/// Name, type and shape of one input or output; `-1` marks a variable dimension.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TensorSpec {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<i64>,
}

/// What a prepared model takes and returns.
#[derive(Clone, Debug, PartialEq)]
pub struct Signature {
    /// `<project>_<format>` as the protocol suggests: `onnx_onnxv1`, `candle_safetensors`.
    pub platform: String,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    /// Whether requests with different trailing dimensions may share a batch after zero-padding
    /// (true for attention-masked encoders, false for models where padding changes results).
    pub pad_to_longest: bool,
}

impl Signature {
    pub fn input_index(&self, name: &str) -> Option<usize> {
        self.inputs.iter().position(|i| i.name == name)
    }

    pub fn output_index(&self, name: &str) -> Option<usize> {
        self.outputs.iter().position(|o| o.name == name)
    }

    /// Checks one request's inputs (in signature order) against the signature and returns their
    /// common number of rows along dim 0.
    pub fn check_inputs(&self, inputs: &[Tensor]) -> Result<usize, EngineError> {
        if inputs.len() != self.inputs.len() {
            return Err(EngineError::InvalidInput(format!(
                "expected {} inputs, got {}",
                self.inputs.len(),
                inputs.len()
            )));
        }
        let mut rows = None;
        for (spec, t) in self.inputs.iter().zip(inputs) {
            if spec.datatype != t.dtype {
                return Err(EngineError::InvalidInput(format!(
                    "input {:?}: expected datatype {}, got {}",
                    spec.name, spec.datatype, t.dtype
                )));
            }
            let fits = spec.shape.len() == t.shape.len()
                && spec.shape.iter().zip(&t.shape).all(|(&s, &d)| s < 0 || s as usize == d);
            if !fits {
                return Err(EngineError::InvalidInput(format!(
                    "input {:?}: expected shape {:?}, got {:?}",
                    spec.name, spec.shape, t.shape
                )));
            }
            match rows {
                None => rows = Some(t.rows()),
                Some(r) if r != t.rows() => {
                    return Err(EngineError::InvalidInput(format!(
                        "inputs disagree on the batch size: {r} and {} rows",
                        t.rows()
                    )));
                }
                Some(_) => {}
            }
        }
        let rows = rows.unwrap_or(0);
        if rows == 0 {
            return Err(EngineError::InvalidInput("a request needs at least one row".into()));
        }
        Ok(rows)
    }
}

/// A model prepared on its device, ready to run batch after batch.
///
/// A request's inputs (checked against the signature) go through `preprocess` on the request's
/// side, then are merged into a batch; `run` takes the batch's preprocessed inputs and returns
/// every output in signature order, each with the batch's rows along dim 0.
pub trait Model: Send + Sync {
    fn signature(&self) -> &Signature;
    /// Where it runs: a GPU version that did not fit (device `auto`) or whose operators the GPU
    /// plan lacks runs on the CPU.
    fn device(&self) -> Device {
        Device::Cpu
    }
    /// Builds whatever the model builds per batch size (tract's concrete plans) for batches of up
    /// to `max_batch_size` rows, once, before the version takes traffic; nothing is built later.
    fn prepare(&self, _max_batch_size: usize) {}
    /// Turns one request's inputs into what `run` takes (a tokenizer turns strings into token
    /// ids); the identity for most models. Never runs on the executor.
    fn preprocess(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, EngineError> {
        Ok(inputs)
    }
    /// A rough size of the work `preprocess` does for these inputs (bytes of text), so that the
    /// scheduler can move large requests off the async workers; 0 when there is none.
    fn preprocess_cost(&self, _inputs: &[Tensor]) -> usize {
        0
    }
    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, EngineError>;
    /// Whether one loaded copy runs several batches at once (from several threads, sharing its
    /// weights), so that the CPU scheduler may run batches side by side on it
    /// ([`Model::run_in_lane`]).
    fn concurrent(&self) -> bool {
        false
    }
    /// `run` on the `lane`-th of `lanes` equal shares of the cores, for a backend that otherwise
    /// spreads a batch over a pool of every core (tract): the scheduler runs `lanes` batches side
    /// by side. Others run as `run`.
    fn run_in_lane(&self, inputs: Vec<Tensor>, _lane: usize, _lanes: usize) -> Result<Vec<Tensor>, EngineError> {
        self.run(inputs)
    }
}
