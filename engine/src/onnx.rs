//! ONNX models on the CPU through tract.
//!
//! At load the graph is parsed, unknown dimensions become symbols (dim 0 is the batch `N`), the
//! model is optimised once into a plan, and every batch then runs that plan.
//!
//! scikit-learn exports end classifiers with `ZipMap`, which turns the probability tensor into a
//! sequence of maps that no tensor protocol can carry; we serve the tensor underneath it instead,
//! under the same output name.

use std::sync::Arc;

use tract_onnx::pb;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::{Factoid, ShapeFactoid};

use crate::model::{Model, Signature, TensorSpec};
use crate::{DataType, EngineError, Tensor as HostTensor, TensorData};

type Plan = Arc<TypedRunnableModel>;

pub struct OnnxModel {
    signature: Signature,
    /// The plan's run state, reused from batch to batch (one executor runs a model at a time, so
    /// the lock is uncontended; it saves re-allocating the state on every batch).
    state: std::sync::Mutex<TypedSimpleState>,
    per_batch: Option<std::sync::Arc<PerBatchPlans>>,
    input_dts: Vec<DatumType>,
}

/// Concrete-shape plans per batch size: built at warm-up for the warm-up sizes, and in the
/// background (one at a time) for a size first met while serving, which the symbolic plan serves
/// meanwhile (building one takes tens of milliseconds: the batch that meets a new size must not
/// pay for it). Each plan holds its own packed weights, so their number is bounded by
/// [`PLAN_MEMORY_BUDGET`] over the model's size.
struct PerBatchPlans {
    /// The parsed model with symbolic batch inputs, re-typed for each batch size.
    template: InferenceModel,
    plans: std::sync::Mutex<std::collections::HashMap<usize, Slot>>,
    max_plans: usize,
}

enum Slot {
    Building,
    Ready(TypedSimpleState),
    /// The concrete plan failed to build: the symbolic plan serves this size.
    Failed,
}

const PLAN_MEMORY_BUDGET: usize = 256 << 20;

impl PerBatchPlans {
    fn build(&self, batch: usize) -> Slot {
        self.plan_for(batch).map_or(Slot::Failed, Slot::Ready)
    }

    /// Builds the plan for `batch` now, unless there is one or the budget is spent.
    fn prepare(&self, batch: usize) {
        let known = self.plans.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&batch);
        if !known && self.plans.lock().unwrap_or_else(|p| p.into_inner()).len() < self.max_plans {
            let slot = self.build(batch);
            self.plans.lock().unwrap_or_else(|p| p.into_inner()).insert(batch, slot);
        }
    }

    /// Starts building the plan for `batch` on a thread of its own, unless there is one, one is
    /// being built, or the budget is spent.
    fn request(self: &std::sync::Arc<Self>, batch: usize) {
        let mut plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
        if plans.contains_key(&batch)
            || plans.len() >= self.max_plans
            || plans.values().any(|s| matches!(s, Slot::Building))
        {
            return;
        }
        plans.insert(batch, Slot::Building);
        let me = self.clone();
        let spawned = std::thread::Builder::new().name("algolink-plan".into()).spawn(move || {
            let slot = me.build(batch);
            me.plans.lock().unwrap_or_else(|p| p.into_inner()).insert(batch, slot);
        });
        if spawned.is_err() {
            plans.insert(batch, Slot::Failed);
        }
    }

    fn plan_for(&self, batch: usize) -> TractResult<TypedSimpleState> {
        let mut model = self.template.clone();
        for i in 0..model.inputs.len() {
            let mut fact = model.input_fact(i)?.clone();
            fact.shape.set_dim(0, batch.to_dim());
            model.set_input_fact(i, fact)?;
        }
        optimise(model)?.into_runnable()?.spawn()
    }
}

/// Types and optimises a parsed model. Integer outputs computed from shapes (class labels) come
/// out as symbolic dims: they are cast to INT64.
fn optimise(model: InferenceModel) -> TractResult<TypedModel> {
    let mut typed = model.into_typed()?;
    let mut outlets = typed.output_outlets()?.to_vec();
    for (i, outlet) in outlets.iter_mut().enumerate() {
        if typed.outlet_fact(*outlet)?.datum_type == DatumType::TDim {
            let cast = tract_onnx::tract_core::ops::cast::cast(i64::datum_type());
            *outlet = typed.wire_node(format!("algolink.output{i}.to_i64"), cast, &[*outlet])?[0];
        }
    }
    typed.select_output_outlets(&outlets)?;
    typed.into_optimized()
}

/// Gives tract's matrix products a pool of `ALGOLINK_TRACT_THREADS` threads (default: every
/// core), once per process; tract otherwise runs every product on the calling thread. Products
/// too small to gain from threads still run inline (tract's own panel threshold).
fn use_all_cores() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let threads = std::env::var("ALGOLINK_TRACT_THREADS")
            .ok()
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        if threads > 1 {
            tract_linalg::multithread::set_default_executor(
                tract_linalg::multithread::Executor::multithread_with_name(threads, "algolink-tract"),
            );
        }
    });
}

impl OnnxModel {
    /// Parses, checks and optimises an ONNX model.
    pub fn load(bytes: &[u8]) -> Result<OnnxModel, EngineError> {
        use_all_cores();
        let mut onnx = tract_onnx::onnx();
        crate::onnx_ml::register(&mut onnx);
        let mut proto = onnx
            .proto_model_for_read(&mut &bytes[..])
            .map_err(|e| EngineError::InvalidModel(format!("not a readable ONNX file: {e}")))?;
        let graph = proto.graph.as_mut().ok_or_else(|| EngineError::InvalidModel("ONNX file has no graph".into()))?;
        if graph.node.is_empty() {
            return Err(EngineError::InvalidModel("ONNX graph has no nodes".into()));
        }
        strip_zipmap(graph);
        check_operators(&onnx, graph)?;

        let initializers: std::collections::HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
        let input_names: Vec<String> =
            graph.input.iter().filter(|i| !initializers.contains(i.name.as_str())).map(|i| i.name.clone()).collect();
        let output_names: Vec<String> = graph.output.iter().map(|o| o.name.clone()).collect();

        let mut model = onnx.model_for_proto_model(&proto).map_err(|e| classify(&e))?;
        // Unknown dims become symbols: tract needs them named to type the graph.
        let mut input_specs = Vec::new();
        let mut batch_only = true;
        for (i, name) in input_names.iter().enumerate() {
            let fact = model.input_fact(i).map_err(|e| classify(&e))?.clone();
            let dt = fact
                .datum_type
                .concretize()
                .ok_or_else(|| EngineError::InvalidModel(format!("input {name:?} has no element type")))?;
            let rank = fact
                .shape
                .rank()
                .concretize()
                .ok_or_else(|| EngineError::InvalidModel(format!("input {name:?} has no declared rank")))?
                as usize;
            let mut dims: TVec<TDim> = tvec![];
            let mut spec_shape = Vec::new();
            for d in 0..rank {
                match fact.shape.dim(d).and_then(|f| f.concretize()) {
                    Some(dim) if dim.as_i64().is_some() => {
                        spec_shape.push(dim.as_i64().unwrap_or(-1));
                        dims.push(dim);
                    }
                    Some(dim) => {
                        spec_shape.push(-1);
                        batch_only &= d == 0;
                        dims.push(dim);
                    }
                    None => {
                        spec_shape.push(-1);
                        batch_only &= d == 0;
                        let sym = if d == 0 { "N".to_string() } else { format!("in{i}_d{d}") };
                        dims.push(model.sym(&sym).into());
                    }
                }
            }
            model
                .set_input_fact(
                    i,
                    InferenceFact::dt_shape(dt, ShapeFactoid::closed(dims.into_iter().map(Into::into).collect())),
                )
                .map_err(|e| classify(&e))?;
            input_specs.push(TensorSpec { name: name.clone(), datatype: datatype_of(dt)?, shape: spec_shape });
        }
        // Plans with a concrete batch size run faster than the symbolic one (tract specialises
        // its kernels): when only the batch dim varies, batches of each size get their own plan.
        // (Models whose shapes are all fixed have nothing to specialise.)
        let symbolic_batch = input_specs.iter().any(|s| s.shape.first() == Some(&-1));
        let template = (batch_only && symbolic_batch).then(|| model.clone());
        let typed = optimise(model).map_err(|e| classify(&e))?;
        let mut output_specs = Vec::new();
        for (i, name) in output_names.iter().enumerate() {
            let fact = typed.output_fact(i).map_err(|e| classify(&e))?;
            let shape = fact.shape.dims().iter().map(|d| d.as_i64().unwrap_or(-1)).collect();
            let datatype =
                datatype_of(fact.datum_type).map_err(|e| EngineError::Unsupported(format!("output {name:?}: {e}")))?;
            output_specs.push(TensorSpec { name: name.clone(), datatype, shape });
        }
        let input_dts = input_specs.iter().map(|s| datum_of(s.datatype)).collect::<Result<_, _>>()?;
        let plan: Plan = typed.into_runnable().map_err(|e| classify(&e))?;
        let state = std::sync::Mutex::new(plan.spawn().map_err(|e| classify(&e))?);
        let max_plans = (PLAN_MEMORY_BUDGET / bytes.len().max(1)).min(64);
        let per_batch = template
            .filter(|_| max_plans > 0)
            .map(|template| std::sync::Arc::new(PerBatchPlans { template, plans: Default::default(), max_plans }));
        let pad_to_longest = paddable(&input_specs, &output_specs);
        Ok(OnnxModel {
            per_batch,
            signature: Signature {
                platform: "onnx_onnxv1".into(),
                inputs: input_specs,
                outputs: output_specs,
                pad_to_longest,
            },
            state,
            input_dts,
        })
    }
}

/// Whether requests of different sequence lengths may share a zero-padded batch: an encoder whose
/// inputs are token tensors [batch, sequence] with an `attention_mask` (padding is then masked
/// out), and whose outputs have no sequence dimension ([batch, fixed]: pooled embeddings, logits),
/// so that a request's outputs do not depend on who it was batched with.
pub(crate) fn paddable(inputs: &[TensorSpec], outputs: &[TensorSpec]) -> bool {
    let tokens = |s: &TensorSpec| matches!(s.datatype, DataType::I64 | DataType::I32) && s.shape.len() == 2;
    inputs.iter().any(|s| s.name == "attention_mask")
        && inputs.iter().all(tokens)
        && outputs.iter().all(|s| s.shape.len() == 2 && s.shape[1] >= 0)
}

impl Model for OnnxModel {
    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn prepare(&self, batch_sizes: &[usize]) {
        if let Some(per_batch) = &self.per_batch {
            for &b in batch_sizes {
                per_batch.prepare(b);
            }
        }
    }

    fn run(&self, inputs: Vec<HostTensor>) -> Result<Vec<HostTensor>, EngineError> {
        let mut values: TVec<TValue> = tvec![];
        for (t, &dt) in inputs.iter().zip(&self.input_dts) {
            values.push(to_tract(t, dt)?.into_tvalue());
        }
        let exec = |e: TractError| EngineError::Execution(format!("{e:#}"));
        // The locks below ignore poisoning: a batch that panicked leaves nothing behind that the
        // next run depends on.
        if let Some(per_batch) = &self.per_batch {
            let batch = inputs.first().map_or(1, HostTensor::rows);
            let mut plans = per_batch.plans.lock().unwrap_or_else(|p| p.into_inner());
            match plans.get_mut(&batch) {
                Some(Slot::Ready(state)) => {
                    let outputs = state.run(values).map_err(exec)?;
                    return outputs.iter().map(from_tract).collect();
                }
                Some(Slot::Building | Slot::Failed) => {}
                None => {
                    drop(plans);
                    per_batch.request(batch);
                }
            }
        }
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let outputs = state.run(values).map_err(exec)?;
        outputs.iter().map(from_tract).collect()
    }
}

/// Replaces every `ZipMap` with an `Identity`, so the graph output carries the probability tensor.
fn strip_zipmap(graph: &mut pb::GraphProto) {
    let mut renamed = Vec::new();
    for node in &mut graph.node {
        if node.op_type == "ZipMap" {
            node.op_type = "Identity".into();
            node.domain.clear();
            node.attribute.clear();
            renamed.extend(node.output.iter().cloned());
        }
    }
    for out in &mut graph.output {
        if renamed.contains(&out.name) {
            out.r#type = None;
        }
    }
}

/// Names every operator tract cannot run, instead of failing on the first one deep in parsing.
fn check_operators(onnx: &tract_onnx::model::Onnx, graph: &pb::GraphProto) -> Result<(), EngineError> {
    let mut missing: Vec<String> = graph
        .node
        .iter()
        .filter(|n| !onnx.op_register.0.contains_key(&n.op_type))
        .map(|n| if n.domain.is_empty() { n.op_type.clone() } else { format!("{}:{}", n.domain, n.op_type) })
        .collect();
    missing.sort();
    missing.dedup();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(EngineError::Unsupported(format!("unsupported ONNX operator(s): {}", missing.join(", "))))
    }
}

fn classify(e: &TractError) -> EngineError {
    EngineError::InvalidModel(format!("{e:#}"))
}

fn datatype_of(dt: DatumType) -> Result<DataType, EngineError> {
    Ok(match dt {
        DatumType::Bool => DataType::Bool,
        DatumType::U8 => DataType::U8,
        DatumType::U16 => DataType::U16,
        DatumType::U32 => DataType::U32,
        DatumType::U64 => DataType::U64,
        DatumType::I8 => DataType::I8,
        DatumType::I16 => DataType::I16,
        DatumType::I32 => DataType::I32,
        DatumType::I64 => DataType::I64,
        DatumType::F16 => DataType::F16,
        DatumType::F32 => DataType::F32,
        DatumType::F64 => DataType::F64,
        DatumType::String => DataType::Bytes,
        other => return Err(EngineError::Unsupported(format!("tensor element type {other:?}"))),
    })
}

fn datum_of(dt: DataType) -> Result<DatumType, EngineError> {
    Ok(match dt {
        DataType::Bool => DatumType::Bool,
        DataType::U8 => DatumType::U8,
        DataType::U16 => DatumType::U16,
        DataType::U32 => DatumType::U32,
        DataType::U64 => DatumType::U64,
        DataType::I8 => DatumType::I8,
        DataType::I16 => DatumType::I16,
        DataType::I32 => DatumType::I32,
        DataType::I64 => DatumType::I64,
        DataType::F16 => DatumType::F16,
        DataType::F32 => DatumType::F32,
        DataType::F64 => DatumType::F64,
        DataType::Bytes => DatumType::String,
        DataType::BF16 => return Err(EngineError::Unsupported("BF16 inputs on the ONNX CPU backend".into())),
    })
}

fn to_tract(t: &HostTensor, dt: DatumType) -> Result<Tensor, EngineError> {
    let err = |e: TractError| EngineError::InvalidInput(format!("{e:#}"));
    match &t.data {
        TensorData::Raw(raw) => {
            let mut out = Tensor::zero_dt(dt, &t.shape).map_err(err)?;
            out.as_bytes_mut().copy_from_slice(raw);
            Ok(out)
        }
        TensorData::Bytes(values) => {
            let strings = values
                .iter()
                .map(|v| String::from_utf8(v.clone()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| EngineError::InvalidInput("BYTES input is not UTF-8".into()))?;
            tract_ndarray::ArrayD::from_shape_vec(t.shape.clone(), strings)
                .map(Tensor::from)
                .map_err(|e| EngineError::InvalidInput(e.to_string()))
        }
    }
}

fn from_tract(v: &TValue) -> Result<HostTensor, EngineError> {
    let shape = v.shape().to_vec();
    let dt = datatype_of(v.datum_type())?;
    if dt == DataType::Bytes {
        let view = v.to_plain_array_view::<String>().map_err(|e| EngineError::Execution(format!("{e:#}")))?;
        return HostTensor::from_bytes(shape, view.iter().map(|s| s.as_bytes().to_vec()).collect());
    }
    HostTensor::from_raw(dt, shape, v.as_bytes().to_vec())
}
