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
    /// The symbolic plan, for batch sizes without a concrete one.
    states: States,
    per_batch: Option<PerBatchPlans>,
    input_dts: Vec<DatumType>,
    /// Set by [`Model::measure_lanes`]: see [`Model::side_by_side`].
    side_by_side: std::sync::OnceLock<bool>,
}

/// Concrete-shape plans for a ladder of batch sizes from 1 to the largest batch the scheduler
/// forms, all built by [`Model::prepare`] before the version takes traffic: nothing is built
/// later, so a version's memory is fixed once it serves (plans built on first use made RSS climb
/// for minutes under varied batch sizes). A batch runs on the smallest plan at least its size,
/// padded with zero rows (each step of the ladder is at most a third above the one below, so
/// padding is under a quarter of the batch), and on the symbolic plan when there is none. Each
/// plan packs its own weights: the ladder is thinned to fit [`PLAN_MEMORY_BUDGET`], measured
/// on the first plan built.
struct PerBatchPlans {
    /// The parsed model with symbolic batch inputs, re-typed for each batch size; taken (and
    /// freed) by `prepare`.
    template: std::sync::Mutex<Option<InferenceModel>>,
    /// Set once by `prepare`.
    ladder: std::sync::OnceLock<Ladder>,
}

struct Ladder {
    /// Ascending batch sizes, each with its plan.
    plans: Vec<(usize, States)>,
    /// Whether every output has the batch's rows along dim 0, so padded rows can be cut off;
    /// when not, a plan serves only batches of exactly its size.
    paddable: bool,
}

/// What the concrete plans of one model may hold in packed weights, all sizes together.
const PLAN_MEMORY_BUDGET: usize = 256 << 20;

/// At most this many concrete plans per model (each costs tens of milliseconds to build at load).
const MAX_PLANS: usize = 24;

impl PerBatchPlans {
    fn new(template: InferenceModel) -> PerBatchPlans {
        PerBatchPlans { template: std::sync::Mutex::new(Some(template)), ladder: std::sync::OnceLock::new() }
    }

    /// Builds the ladder of plans up to `largest`, once. A plan that fails to build is left out
    /// (the symbolic plan serves its sizes).
    fn prepare(&self, largest: usize) {
        let Some(template) = self.template.lock().unwrap_or_else(|p| p.into_inner()).take() else { return };
        let largest = largest.max(1);
        let mut ladder = Ladder { plans: Vec::new(), paddable: false };
        // The largest first: its size in memory says how many plans fit the budget.
        if let Ok(top) = plan_for(&template, largest) {
            ladder.paddable = (0..top.output_outlets().map_or(0, |o| o.len()))
                .all(|i| top.output_fact(i).is_ok_and(|f| f.shape.rank() > 0 && f.shape[0] == largest.to_dim()));
            let fits = (PLAN_MEMORY_BUDGET / plan_bytes(&top).max(1)).min(MAX_PLANS);
            if fits > 0 {
                let sizes = ladder_sizes(largest, fits);
                for &size in &sizes[..sizes.len() - 1] {
                    if let Ok(plan) = plan_for(&template, size).and_then(spawn) {
                        ladder.plans.push((size, plan));
                    }
                }
                if let Ok(plan) = spawn(top) {
                    ladder.plans.push((largest, plan));
                }
            }
        }
        let _ = self.ladder.set(ladder);
    }

    /// The plan that serves a batch of `rows`: the smallest at least as large, if padding to it
    /// adds under a third of the rows (a size the ladder was thinned around runs symbolic).
    fn for_rows(&self, rows: usize) -> Option<(usize, &States)> {
        let ladder = self.ladder.get()?;
        let (size, state) = ladder.plans.iter().find(|(size, _)| *size >= rows)?;
        (*size == rows || (ladder.paddable && 3 * *size < 4 * rows)).then_some((*size, state))
    }
}

/// At most `count` batch sizes from 1 to `largest` (included), each at most a third above the one
/// below when `count` allows it, wider steps when it does not.
///
/// The steps are 1, 2, 3, then 4, 5 and 6 times each power of two (8, 10, 12, 16, 20, 24, 32, ...),
/// so that every power of two is a size of its own: batches come in those sizes (a group of 16,
/// 32 or 64 closed-loop clients, a `max_batch_size` of 32), and one size above a plan runs padded
/// to the next. With plain geometric steps of 4/3 (..., 22, 29, 38, 50, 64) a batch of 32 ran
/// on the plan for 38: the MLP 256-1024-1024-10 at 29.8k rows/s against 37.6k for 29 rows.
fn ladder_sizes(largest: usize, count: usize) -> Vec<usize> {
    if count < 2 {
        return vec![largest];
    }
    let steps = (0..).flat_map(|k| [4usize << k, 5 << k, 6 << k]);
    let mut sizes: Vec<usize> = [1, 2, 3].into_iter().chain(steps).take_while(|&s| s < largest).collect();
    sizes.push(largest);
    if sizes.len() <= count {
        return sizes;
    }
    let mut ratio = 4.0 / 3.0_f64 * 1.1;
    loop {
        let mut sizes = vec![1];
        while let Some(&last) = sizes.last().filter(|&&s| s < largest) {
            sizes.push(((last as f64 * ratio).floor() as usize).max(last + 1).min(largest));
        }
        if sizes.len() <= count {
            return sizes;
        }
        ratio *= 1.1;
    }
}

/// The model re-typed for a concrete batch size and optimised.
fn plan_for(template: &InferenceModel, batch: usize) -> TractResult<TypedModel> {
    let mut model = template.clone();
    for i in 0..model.inputs.len() {
        let mut fact = model.input_fact(i)?.clone();
        fact.shape.set_dim(0, batch.to_dim());
        model.set_input_fact(i, fact)?;
    }
    optimise(model)
}

fn spawn(model: TypedModel) -> TractResult<States> {
    States::new(model.into_runnable()?)
}

/// A plan and its run states, reused from batch to batch (allocating a state per batch costs):
/// one per batch running on the plan at once (the scheduler runs one batch per core on the CPU
/// when that is faster, all sharing the model's weights; see [`Model::concurrent`]). A second
/// state is made the first time two batches meet on a plan: scratch space (activations), not
/// weights, which is all a version's memory may still grow by once it serves.
struct States {
    plan: Plan,
    idle: std::sync::Mutex<Vec<TypedSimpleState>>,
}

impl States {
    fn new(plan: Plan) -> TractResult<States> {
        let state = plan.spawn()?;
        Ok(States { plan, idle: std::sync::Mutex::new(vec![state]) })
    }

    /// Runs the plan on an idle state, or a new one when every state is in use. (The lock ignores
    /// poisoning: a batch that panicked takes its state with it and leaves nothing behind.)
    fn run(&self, values: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut state = match idle {
            Some(state) => state,
            None => self.plan.spawn()?,
        };
        let outputs = state.run(values);
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).push(state);
        outputs
    }
}

/// Bytes of the constants an optimised model holds: constant tensors (folded weights) and the
/// packed weights that matrix products embed, each buffer counted once (layers that share a
/// weight share its packed copy).
fn plan_bytes(model: &TypedModel) -> usize {
    use tract_onnx::tract_core::internal::{DimLike, ExoticFact};
    use tract_onnx::tract_core::ops::konst::Const;
    use tract_onnx::tract_core::ops::matmul::optimized::{MatMulOperand, OptMatMul, ProtoFusedSpec};
    let exotic = |f: &dyn ExoticFact| f.mem_size().to_usize().unwrap_or(0);
    let mut seen = std::collections::HashSet::new();
    let mut bytes = 0;
    for node in &model.nodes {
        if let Some(c) = node.op_as::<Const>() {
            if seen.insert(Arc::as_ptr(c.val()) as usize) {
                bytes += match c.exotic_fact() {
                    Some(f) => exotic(f),
                    None => c.val().len() * c.val().datum_type().size_of(),
                };
            }
        } else if let Some(mm) = node.op_as::<OptMatMul>() {
            for spec in &mm.micro_ops {
                let ProtoFusedSpec::AddMatMul { a, b, .. } = spec else { continue };
                for operand in [a, b] {
                    // Packed ahead (no scratch buffer needed): the first panel's address names the buffer.
                    if let MatMulOperand::Const(value) = operand
                        && value.scratch_panel_buffer_layout().is_none()
                        && let Ok(panel) = value.panel_bytes(0, None)
                        && seen.insert(panel as usize)
                    {
                        bytes += exotic(value.exotic_fact());
                    }
                }
            }
        }
    }
    bytes
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

/// The threads tract's matrix products run on: `ALGOLINK_TRACT_THREADS`, by default every core.
fn tract_threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| {
        std::env::var("ALGOLINK_TRACT_THREADS")
            .ok()
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            .max(1)
    })
}

/// Gives tract's matrix products a pool of [`tract_threads`], once per process; tract otherwise
/// runs every product on the calling thread. Products too small to gain from threads still run
/// inline (tract's own panel threshold).
fn use_all_cores() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if tract_threads() > 1 {
            tract_linalg::multithread::set_default_executor(
                tract_linalg::multithread::Executor::multithread_with_name(tract_threads(), "algolink-tract"),
            );
        }
    });
}

/// What the `lane`-th of `lanes` batches side by side runs its products on: its share of
/// [`tract_threads`] (the calling thread alone for a share of one), each lane its own pool so
/// that none queues behind another's products. `None`: one lane, the default pool.
fn lane_executor(lane: usize, lanes: usize) -> Option<tract_linalg::multithread::Executor> {
    use tract_linalg::multithread::Executor;
    type Pools = std::collections::HashMap<usize, Vec<Executor>>;
    static POOLS: std::sync::Mutex<Option<Pools>> = std::sync::Mutex::new(None);
    if lanes <= 1 {
        return None;
    }
    let share = (tract_threads() / lanes).max(1);
    let mut pools = POOLS.lock().unwrap_or_else(|p| p.into_inner());
    let per_lane = pools.get_or_insert_with(Pools::new).entry(lanes).or_insert_with(|| {
        (0..lanes)
            .map(|l| match share {
                1 => Executor::SingleThread,
                n => Executor::multithread_with_name(n, &format!("algolink-tract-lane{l}")),
            })
            .collect()
    });
    per_lane.get(lane).cloned()
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
        let states = States::new(plan).map_err(|e| classify(&e))?;
        let per_batch = template.map(PerBatchPlans::new);
        let pad_to_longest = paddable(&input_specs, &output_specs);
        Ok(OnnxModel {
            per_batch,
            signature: Signature {
                platform: "onnx_onnxv1".into(),
                inputs: input_specs,
                outputs: output_specs,
                pad_to_longest,
            },
            states,
            input_dts,
            side_by_side: std::sync::OnceLock::new(),
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

    fn prepare(&self, max_batch_size: usize) {
        if let Some(per_batch) = &self.per_batch {
            per_batch.prepare(max_batch_size);
        }
    }

    fn measure_lanes(&self, rows: usize) {
        self.side_by_side.get_or_init(|| {
            if tract_threads() < 2 {
                return false;
            }
            let gain = crate::model::lanes_gain(self, rows.max(1));
            let faster = gain.is_some_and(|g| g >= crate::model::LANES_MARGIN);
            match gain {
                Some(g) => tracing::info!(
                    "two batches of {rows} side by side ran {g:.2}x as fast as one after another: {}",
                    if faster { "the CPU scheduler may run two lanes" } else { "one lane" }
                ),
                None => tracing::info!("batches of {rows} too slow to measure in lanes: one lane"),
            }
            faster
        });
    }

    fn concurrent(&self) -> bool {
        true
    }

    fn side_by_side(&self) -> bool {
        self.side_by_side.get().copied().unwrap_or(false)
    }

    fn run_in_lane(&self, inputs: Vec<HostTensor>, lane: usize, lanes: usize) -> Result<Vec<HostTensor>, EngineError> {
        let Some(executor) = lane_executor(lane, lanes) else { return self.run(inputs) };
        // The scope restores the thread's executor only when its closure returns: a panic is
        // caught inside and resumed outside, so that this thread's next batches on every core do
        // not stay on the lane's share.
        let run = std::panic::AssertUnwindSafe(|| self.run(inputs));
        match tract_linalg::multithread::multithread_tract_scope(executor, || std::panic::catch_unwind(run)) {
            Ok(outputs) => outputs,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    fn run(&self, inputs: Vec<HostTensor>) -> Result<Vec<HostTensor>, EngineError> {
        let exec = |e: TractError| EngineError::Execution(format!("{e:#}"));
        let rows = inputs.first().map_or(1, HostTensor::rows);
        // Only fixed-size inputs can be padded with zero rows.
        let raw = inputs.iter().all(|t| matches!(t.data, TensorData::Raw(_)));
        let concrete = self.per_batch.as_ref().and_then(|p| p.for_rows(rows)).filter(|&(size, _)| size == rows || raw);
        let padded = concrete.map_or(rows, |(size, _)| size);
        let mut values: TVec<TValue> = tvec![];
        for (t, &dt) in inputs.iter().zip(&self.input_dts) {
            values.push(to_tract(t, dt, padded)?.into_tvalue());
        }
        let states = concrete.map_or(&self.states, |(_, states)| states);
        let outputs = states.run(values).map_err(exec)?;
        outputs.iter().map(|v| from_tract(v, rows, padded)).collect()
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

/// A host tensor as tract's, with zero rows added up to `rows` along dim 0 (a padded batch).
fn to_tract(t: &HostTensor, dt: DatumType, rows: usize) -> Result<Tensor, EngineError> {
    let err = |e: TractError| EngineError::InvalidInput(format!("{e:#}"));
    match &t.data {
        TensorData::Raw(raw) => {
            let mut shape = t.shape.clone();
            if let Some(first) = shape.first_mut() {
                *first = (*first).max(rows);
            }
            let mut out = Tensor::zero_dt(dt, &shape).map_err(err)?;
            out.as_bytes_mut()[..raw.len()].copy_from_slice(raw);
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

/// A tract output as a host tensor; of a batch padded from `rows` to `padded`, the first `rows`.
fn from_tract(v: &TValue, rows: usize, padded: usize) -> Result<HostTensor, EngineError> {
    let mut shape = v.shape().to_vec();
    let dt = datatype_of(v.datum_type())?;
    if dt == DataType::Bytes {
        let view = v.to_plain_array_view::<String>().map_err(|e| EngineError::Execution(format!("{e:#}")))?;
        return HostTensor::from_bytes(shape, view.iter().map(|s| s.as_bytes().to_vec()).collect());
    }
    let mut bytes = v.as_bytes();
    if padded != rows && shape.first() == Some(&padded) {
        bytes = &bytes[..bytes.len() / padded * rows];
        shape[0] = rows;
    }
    HostTensor::from_raw(dt, shape, bytes.to_vec())
}

#[cfg(test)]
mod plan_tests {
    use super::*;

    #[test]
    fn the_ladder_pads_by_under_a_quarter_and_thins_to_its_budget() {
        assert_eq!(ladder_sizes(64, 24), [1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64]);
        assert_eq!(ladder_sizes(100, 24), [1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 100]);
        assert_eq!(ladder_sizes(2, 24), [1, 2]);
        assert_eq!(ladder_sizes(1, 24), [1]);
        for count in [2, 5, 9] {
            let sizes = ladder_sizes(64, count);
            assert!(sizes.len() <= count && sizes[0] == 1 && sizes.last() == Some(&64), "{count}: {sizes:?}");
        }
        assert_eq!(ladder_sizes(64, 1), [64]);
    }

    #[test]
    fn plan_memory_counts_weights_folded_at_load() {
        // canary_slow's 1024x1024 weight comes from a ConstantOfShape (the file is 32 KB): the
        // budget must see the 4 MiB the plan holds, not the file.
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/canary_slow.onnx");
        let bytes = std::fs::read(path).unwrap();
        let model = OnnxModel::load(&bytes).unwrap();
        let per_batch = model.per_batch.as_ref().unwrap();
        let template = per_batch.template.lock().unwrap().clone().unwrap();
        let held = plan_bytes(&plan_for(&template, 4).unwrap());
        assert!((4 << 20..16 << 20).contains(&held), "{held} bytes");
        model.prepare(8);
        let sizes: Vec<usize> = per_batch.ladder.get().unwrap().plans.iter().map(|(s, _)| *s).collect();
        assert_eq!(sizes, [1, 2, 3, 4, 5, 6, 8]);
        assert!(per_batch.for_rows(7).is_some_and(|(s, _)| s == 8));
        assert!(per_batch.for_rows(9).is_none());
    }
}
