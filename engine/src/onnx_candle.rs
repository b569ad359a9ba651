//! ONNX graphs compiled into a plan of candle operations: how ONNX models run on a GPU, and on
//! the CPU with `onnx_backend = "candle"` (which is how this path is tested without a GPU).
//!
//! At load the graph is read once: initializers and `Constant` nodes become tensors (weights on
//! the device; small integer tensors, the sizes and indices of the graph's shape arithmetic, on
//! the host), every node becomes a step with its attributes parsed and checked, and each value
//! gets a slot that is dropped after its last use. A batch then walks the steps. Shape arithmetic
//! (`Shape`, `Gather` of a dimension, `Concat` of sizes, `Reshape` targets) stays on the host, so
//! the device never waits for the host to read a size back.
//!
//! The operators covered are those of PyTorch exports of MLPs, CNNs and BERT-style encoders. A
//! graph with any other (the ai.onnx.ml tree and linear models among them) is `Unsupported`,
//! naming every one, and the loader runs it on the CPU through tract instead.

use std::collections::HashMap;

use candle_core::{D, DType, Device as CDevice, Tensor as CTensor};
use tract_onnx::pb;
use tract_onnx::pb::tensor_shape_proto::dimension::Value as Dim;
use tract_onnx::prelude::Framework;

use crate::model::{Model, Signature, TensorSpec};
use crate::{DataType, Device, EngineError, Tensor as HostTensor, TensorData};

type CResult<T> = candle_core::Result<T>;

/// An ONNX graph as candle operations on one device.
pub struct CandleOnnx {
    signature: Signature,
    device: CDevice,
    /// Values known before any batch (initializers, constants), by slot; `None` for the rest.
    constants: Vec<Option<CTensor>>,
    inputs: Vec<usize>,
    outputs: Vec<usize>,
    steps: Vec<Step>,
}

struct Step {
    op: Op,
    /// The node's name, or its operator when it has none: errors name it.
    name: String,
    /// Slots of the inputs; `None` for an optional input left out.
    inputs: Vec<Option<usize>>,
    output: usize,
    /// Slots whose last use is this step.
    frees: Vec<usize>,
}

#[derive(Clone, Copy)]
enum Binary {
    Add,
    Sub,
    Mul,
    Div,
    Pow,
    Equal,
    Max,
    Min,
}

enum Op {
    Identity,
    Unary(fn(&CTensor) -> CResult<CTensor>),
    LeakyRelu(f64),
    Binary(Binary),
    /// `Pow` by a constant exponent, kept on the host.
    PowScalar(f64),
    Where,
    MatMul,
    Gemm {
        alpha: f64,
        beta: f64,
        trans_a: bool,
        trans_b: bool,
    },
    /// `coerce_2d`: opsets before 13 flatten to 2-D at the axis first.
    Softmax {
        axis: i64,
        coerce_2d: bool,
    },
    LayerNorm {
        axis: i64,
        eps: f64,
    },
    BatchNorm {
        eps: f64,
    },
    Flatten {
        axis: i64,
    },
    Reshape {
        allow_zero: bool,
    },
    Transpose {
        perm: Option<Vec<usize>>,
    },
    Unsqueeze {
        axes: Option<Vec<i64>>,
    },
    Squeeze {
        axes: Option<Vec<i64>>,
    },
    Shape {
        start: i64,
        end: Option<i64>,
    },
    Gather {
        axis: i64,
    },
    Concat {
        axis: i64,
    },
    Cast {
        to: DType,
        to_bool: bool,
    },
    ConstantOfShape {
        value: CTensor,
    },
    Slice,
    Expand,
    Conv {
        pads: [usize; 4],
        stride: usize,
        dilation: usize,
        groups: usize,
    },
    Pool {
        max: bool,
        kernel: (usize, usize),
        stride: (usize, usize),
    },
    GlobalAveragePool,
    Reduce {
        mean: bool,
        axes: Option<Vec<i64>>,
        keepdims: bool,
    },
    ArgMax {
        axis: i64,
        keepdims: bool,
    },
    Clip {
        min: Option<f64>,
        max: Option<f64>,
    },
}

/// Integer tensors of at most this many elements stay on the host: shapes, axes and indices.
const HOST_INTS: usize = 64;

impl CandleOnnx {
    /// Reads and checks an ONNX model, naming every operator the plan cannot run
    /// (`Unsupported`), and returns it with the bytes its weights take on a device.
    pub fn parse(bytes: &[u8]) -> Result<(pb::ModelProto, u64), EngineError> {
        let proto = tract_onnx::onnx()
            .proto_model_for_read(&mut &bytes[..])
            .map_err(|e| EngineError::InvalidModel(format!("not a readable ONNX file: {e}")))?;
        let graph = proto.graph.as_ref().ok_or_else(|| EngineError::InvalidModel("ONNX file has no graph".into()))?;
        let mut missing: Vec<String> = graph
            .node
            .iter()
            .filter(|n| !(n.domain.is_empty() || n.domain == "ai.onnx") || !SUPPORTED.contains(&n.op_type.as_str()))
            .map(|n| if n.domain.is_empty() { n.op_type.clone() } else { format!("{}:{}", n.domain, n.op_type) })
            .collect();
        missing.sort();
        missing.dedup();
        if !missing.is_empty() {
            return Err(EngineError::Unsupported(format!(
                "the candle plan has no operator {} (it runs the operators of PyTorch MLP, CNN and BERT-style exports)",
                missing.join(", ")
            )));
        }
        let bytes = graph.initializer.iter().map(|t| t.dims.iter().product::<i64>().max(0) as u64 * 4).sum();
        Ok((proto, bytes))
    }

    /// Compiles a parsed model onto `device`: weights are placed, attributes checked, slots given.
    pub fn build(proto: &pb::ModelProto, device: crate::Device) -> Result<CandleOnnx, EngineError> {
        let device = device.candle()?;
        let graph = proto.graph.as_ref().ok_or_else(|| EngineError::InvalidModel("ONNX file has no graph".into()))?;
        let opset =
            proto.opset_import.iter().find(|o| o.domain.is_empty() || o.domain == "ai.onnx").map_or(13, |o| o.version);

        let mut slots: HashMap<String, usize> = HashMap::new();
        let mut constants: Vec<Option<CTensor>> = Vec::new();
        let define = |name: &str, slots: &mut HashMap<String, usize>, constants: &mut Vec<Option<CTensor>>| {
            let slot = constants.len();
            constants.push(None);
            slots.insert(name.to_string(), slot);
            slot
        };
        for init in &graph.initializer {
            let slot = define(&init.name, &mut slots, &mut constants);
            constants[slot] = Some(place(tensor_of(init)?, &device)?);
        }
        let mut inputs = Vec::new();
        let mut input_specs = Vec::new();
        for value in graph.input.iter().filter(|i| !graph.initializer.iter().any(|t| t.name == i.name)) {
            input_specs.push(spec_of(value)?);
            inputs.push(define(&value.name, &mut slots, &mut constants));
        }
        let mut steps: Vec<Step> = Vec::new();
        for node in &graph.node {
            let name = if node.name.is_empty() { node.op_type.clone() } else { node.name.clone() };
            let invalid = |why: String| EngineError::InvalidModel(format!("node {name:?} ({}): {why}", node.op_type));
            let Some(output) = node.output.first().filter(|o| !o.is_empty()) else {
                return Err(invalid("no output".into()));
            };
            let attrs = Attrs(&node.attribute);
            if node.op_type == "Constant" {
                let value = constant_node(&attrs).map_err(invalid)?;
                let slot = define(output, &mut slots, &mut constants);
                constants[slot] = Some(place(value, &device)?);
                continue;
            }
            let args = node
                .input
                .iter()
                .map(|i| match i.as_str() {
                    "" => Ok(None),
                    i => slots.get(i).copied().map(Some).ok_or_else(|| {
                        invalid(format!(
                            "input {i:?} is not computed before it (or only by an output the plan does not keep)"
                        ))
                    }),
                })
                .collect::<Result<Vec<_>, _>>()?;
            let constant = |i: usize| args.get(i).copied().flatten().and_then(|s| constants[s].as_ref());
            let op = op_of(&node.op_type, &attrs, opset, constant).map_err(invalid)?;
            let slot = define(output, &mut slots, &mut constants);
            steps.push(Step { op, name, inputs: args, output: slot, frees: Vec::new() });
        }
        let mut outputs = Vec::new();
        let mut output_specs = Vec::new();
        for value in &graph.output {
            output_specs.push(spec_of(value)?);
            let slot = slots.get(&value.name).copied().ok_or_else(|| {
                EngineError::InvalidModel(format!("graph output {:?} is computed by no node", value.name))
            })?;
            outputs.push(slot);
        }
        for spec in &output_specs {
            if !matches!(
                spec.datatype,
                DataType::F32 | DataType::F64 | DataType::I64 | DataType::I32 | DataType::U8 | DataType::Bool
            ) {
                return Err(EngineError::Unsupported(format!(
                    "output {:?} is {}: the candle plan returns FP32, FP64, INT64, INT32, UINT8 and BOOL",
                    spec.name, spec.datatype
                )));
            }
        }
        // Each slot is dropped after the last step that reads it, unless the graph returns it.
        let mut last_use = HashMap::new();
        for (i, step) in steps.iter().enumerate() {
            for slot in step.inputs.iter().flatten() {
                last_use.insert(*slot, i);
            }
        }
        for (slot, i) in last_use {
            if !outputs.contains(&slot) {
                steps[i].frees.push(slot);
            }
        }
        let pad_to_longest = crate::onnx::paddable(&input_specs, &output_specs);
        Ok(CandleOnnx {
            signature: Signature {
                platform: "candle_onnx".into(),
                inputs: input_specs,
                outputs: output_specs,
                pad_to_longest,
            },
            device,
            constants,
            inputs,
            outputs,
            steps,
        })
    }
}

impl Model for CandleOnnx {
    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn device(&self) -> Device {
        Device::of(&self.device)
    }

    fn run(&self, inputs: Vec<HostTensor>) -> Result<Vec<HostTensor>, EngineError> {
        let mut values = self.constants.clone();
        for (&slot, t) in self.inputs.iter().zip(&inputs) {
            values[slot] = Some(to_candle(t, &self.device)?);
        }
        for step in &self.steps {
            let args: Vec<Option<&CTensor>> = step.inputs.iter().map(|s| s.and_then(|s| values[s].as_ref())).collect();
            let out = eval(&step.op, &args, &self.device)
                .map_err(|e| EngineError::Execution(format!("node {:?}: {e}", step.name)))?;
            for &slot in &step.frees {
                values[slot] = None;
            }
            values[step.output] = Some(out);
        }
        self.outputs
            .iter()
            .zip(&self.signature.outputs)
            .map(|(&slot, spec)| {
                let value =
                    values[slot].as_ref().ok_or_else(|| EngineError::Execution("an output was not computed".into()))?;
                to_host(value, spec.datatype)
                    .map_err(|e| EngineError::Execution(format!("output {:?}: {e}", spec.name)))
            })
            .collect()
    }
}

const SUPPORTED: &[&str] = &[
    "Abs",
    "Add",
    "ArgMax",
    "AveragePool",
    "BatchNormalization",
    "Cast",
    "Ceil",
    "Clip",
    "Concat",
    "Constant",
    "ConstantOfShape",
    "Conv",
    "Div",
    "Dropout",
    "Equal",
    "Erf",
    "Exp",
    "Expand",
    "Flatten",
    "Floor",
    "Gather",
    "Gelu",
    "Gemm",
    "GlobalAveragePool",
    "Identity",
    "LayerNormalization",
    "LeakyRelu",
    "Log",
    "MatMul",
    "Max",
    "MaxPool",
    "Min",
    "Mul",
    "Neg",
    "Pow",
    "Reciprocal",
    "ReduceMean",
    "ReduceSum",
    "Relu",
    "Reshape",
    "Shape",
    "Sigmoid",
    "Slice",
    "Softmax",
    "Sqrt",
    "Squeeze",
    "Sub",
    "Tanh",
    "Transpose",
    "Unsqueeze",
    "Where",
];

struct Attrs<'a>(&'a [pb::AttributeProto]);

impl Attrs<'_> {
    fn get(&self, name: &str) -> Option<&pb::AttributeProto> {
        self.0.iter().find(|a| a.name == name)
    }
    fn int(&self, name: &str, default: i64) -> i64 {
        self.get(name).map_or(default, |a| a.i)
    }
    fn float(&self, name: &str, default: f32) -> f32 {
        self.get(name).map_or(default, |a| a.f)
    }
    fn ints(&self, name: &str) -> Option<Vec<i64>> {
        self.get(name).map(|a| a.ints.clone())
    }
    fn string(&self, name: &str) -> Option<String> {
        self.get(name).map(|a| String::from_utf8_lossy(&a.s).into_owned())
    }
}

/// Parses one node into its operation; `constant(i)` is the node's i-th input when it is known at
/// load (exponents and clip bounds are folded into the operation).
fn op_of<'c>(
    op_type: &str,
    attrs: &Attrs,
    opset: i64,
    constant: impl Fn(usize) -> Option<&'c CTensor>,
) -> Result<Op, String> {
    let scalar = |i: usize| -> Result<Option<f64>, String> {
        constant(i).map(|t| host_f64(t).map_err(|e| e.to_string())).transpose()
    };
    let usize_pair = |name: &str, default: usize| -> Result<(usize, usize), String> {
        match attrs.ints(name).as_deref() {
            None => Ok((default, default)),
            Some(&[a, b]) if a >= 0 && b >= 0 => Ok((a as usize, b as usize)),
            Some(other) => Err(format!("{name} {other:?}: only 2-D windows are supported")),
        }
    };
    let unary = |f: fn(&CTensor) -> CResult<CTensor>| Ok(Op::Unary(f));
    match op_type {
        "Identity" | "Dropout" => Ok(Op::Identity),
        "Abs" => unary(|x| x.abs()),
        "Ceil" => unary(|x| x.ceil()),
        "Erf" => unary(|x| x.erf()),
        "Exp" => unary(|x| x.exp()),
        "Floor" => unary(|x| x.floor()),
        "Log" => unary(|x| x.log()),
        "Neg" => unary(|x| x.neg()),
        "Reciprocal" => unary(|x| x.recip()),
        "Relu" => unary(|x| x.relu()),
        "Sigmoid" => unary(candle_nn::ops::sigmoid),
        "Sqrt" => unary(|x| x.sqrt()),
        "Tanh" => unary(|x| x.tanh()),
        "Gelu" => match attrs.string("approximate").as_deref() {
            None | Some("none") => unary(|x| x.gelu_erf()),
            Some("tanh") => unary(|x| x.gelu()),
            Some(other) => Err(format!("approximate {other:?}")),
        },
        "LeakyRelu" => Ok(Op::LeakyRelu(attrs.float("alpha", 0.01) as f64)),
        "Add" => Ok(Op::Binary(Binary::Add)),
        "Sub" => Ok(Op::Binary(Binary::Sub)),
        "Mul" => Ok(Op::Binary(Binary::Mul)),
        "Div" => Ok(Op::Binary(Binary::Div)),
        "Equal" => Ok(Op::Binary(Binary::Equal)),
        "Max" => Ok(Op::Binary(Binary::Max)),
        "Min" => Ok(Op::Binary(Binary::Min)),
        "Pow" => Ok(match scalar(1)? {
            Some(e) if constant(1).is_some_and(|t| t.elem_count() == 1) => Op::PowScalar(e),
            _ => Op::Binary(Binary::Pow),
        }),
        "Where" => Ok(Op::Where),
        "MatMul" => Ok(Op::MatMul),
        "Gemm" => Ok(Op::Gemm {
            alpha: attrs.float("alpha", 1.0) as f64,
            beta: attrs.float("beta", 1.0) as f64,
            trans_a: attrs.int("transA", 0) != 0,
            trans_b: attrs.int("transB", 0) != 0,
        }),
        "Softmax" => {
            Ok(Op::Softmax { axis: attrs.int("axis", if opset >= 13 { -1 } else { 1 }), coerce_2d: opset < 13 })
        }
        "LayerNormalization" => {
            if attrs.int("stash_type", 1) != 1 {
                return Err("stash_type other than float".into());
            }
            Ok(Op::LayerNorm { axis: attrs.int("axis", -1), eps: attrs.float("epsilon", 1e-5) as f64 })
        }
        "BatchNormalization" => {
            if attrs.int("training_mode", 0) != 0 {
                return Err("training_mode".into());
            }
            Ok(Op::BatchNorm { eps: attrs.float("epsilon", 1e-5) as f64 })
        }
        "Flatten" => Ok(Op::Flatten { axis: attrs.int("axis", 1) }),
        "Reshape" => Ok(Op::Reshape { allow_zero: attrs.int("allowzero", 0) != 0 }),
        "Transpose" => {
            Ok(Op::Transpose { perm: attrs.ints("perm").map(|p| p.into_iter().map(|d| d.max(0) as usize).collect()) })
        }
        "Unsqueeze" => Ok(Op::Unsqueeze { axes: attrs.ints("axes") }),
        "Squeeze" => Ok(Op::Squeeze { axes: attrs.ints("axes") }),
        "Shape" => Ok(Op::Shape { start: attrs.int("start", 0), end: attrs.get("end").map(|a| a.i) }),
        "Gather" => Ok(Op::Gather { axis: attrs.int("axis", 0) }),
        "Concat" => Ok(Op::Concat { axis: attrs.int("axis", 0) }),
        "Cast" => {
            let to = attrs.int("to", 0);
            match to {
                9 => Ok(Op::Cast { to: DType::U8, to_bool: true }),
                _ => Ok(Op::Cast { to: dtype_of(to as i32).map_err(|e| format!("cast: {e}"))?, to_bool: false }),
            }
        }
        "ConstantOfShape" => {
            let value = match attrs.get("value").and_then(|a| a.t.as_ref()) {
                Some(t) => tensor_of(t).map_err(|e| e.to_string())?,
                None => CTensor::new(&[0f32], &CDevice::Cpu).map_err(|e| e.to_string())?,
            };
            if value.elem_count() != 1 {
                return Err("value must hold one element".into());
            }
            Ok(Op::ConstantOfShape {
                value: value.flatten_all().and_then(|v| v.squeeze(0)).map_err(|e| e.to_string())?,
            })
        }
        "Slice" => {
            if opset < 10 {
                return Err("Slice before opset 10 (attributes instead of inputs)".into());
            }
            Ok(Op::Slice)
        }
        "Expand" => Ok(Op::Expand),
        "Conv" => {
            match attrs.string("auto_pad").as_deref() {
                None | Some("NOTSET") | Some("VALID") => {}
                Some(other) => return Err(format!("auto_pad {other}: give explicit pads")),
            }
            let pads = match attrs.ints("pads").as_deref() {
                None => [0; 4],
                Some(&[b, e]) if b >= 0 && e >= 0 => [b as usize, 0, e as usize, 0],
                Some(&[hb, wb, he, we]) if [hb, wb, he, we].iter().all(|&p| p >= 0) => {
                    [hb as usize, wb as usize, he as usize, we as usize]
                }
                Some(other) => return Err(format!("pads {other:?}: only 1-D and 2-D convolutions are supported")),
            };
            let same = |name: &str| -> Result<usize, String> {
                match attrs.ints(name).as_deref() {
                    None => Ok(1),
                    Some(v) if !v.is_empty() && v.iter().all(|&s| s == v[0] && s > 0) => Ok(v[0] as usize),
                    Some(v) => Err(format!("{name} {v:?}: the same in every dimension is supported")),
                }
            };
            Ok(Op::Conv {
                pads,
                stride: same("strides")?,
                dilation: same("dilations")?,
                groups: attrs.int("group", 1).max(1) as usize,
            })
        }
        "MaxPool" | "AveragePool" => {
            if attrs.ints("pads").is_some_and(|p| p.iter().any(|&p| p != 0))
                || attrs.string("auto_pad").is_some_and(|p| p != "NOTSET" && p != "VALID")
            {
                return Err("padded pooling".into());
            }
            if attrs.int("ceil_mode", 0) != 0 || attrs.ints("dilations").is_some_and(|d| d.iter().any(|&d| d != 1)) {
                return Err("ceil_mode or dilations".into());
            }
            let kernel = usize_pair("kernel_shape", 1)?;
            let stride = usize_pair("strides", 1)?;
            Ok(Op::Pool { max: op_type == "MaxPool", kernel, stride })
        }
        "GlobalAveragePool" => Ok(Op::GlobalAveragePool),
        "ReduceMean" | "ReduceSum" => {
            if attrs.int("noop_with_empty_axes", 0) != 0 {
                return Err("noop_with_empty_axes".into());
            }
            Ok(Op::Reduce {
                mean: op_type == "ReduceMean",
                axes: attrs.ints("axes"),
                keepdims: attrs.int("keepdims", 1) != 0,
            })
        }
        "ArgMax" => {
            if attrs.int("select_last_index", 0) != 0 {
                return Err("select_last_index".into());
            }
            Ok(Op::ArgMax { axis: attrs.int("axis", 0), keepdims: attrs.int("keepdims", 1) != 0 })
        }
        "Clip" => {
            if opset < 11 {
                let min = attrs.get("min").map(|a| a.f as f64);
                let max = attrs.get("max").map(|a| a.f as f64);
                return Ok(Op::Clip { min, max });
            }
            Ok(Op::Clip { min: scalar(1)?, max: scalar(2)? })
        }
        other => Err(format!("operator {other} is not supported by the candle plan")),
    }
}

/// A `Constant` node's value.
fn constant_node(attrs: &Attrs) -> Result<CTensor, String> {
    let err = |e: candle_core::Error| e.to_string();
    if let Some(t) = attrs.get("value").and_then(|a| a.t.as_ref()) {
        return tensor_of(t).map_err(|e| e.to_string());
    }
    if let Some(a) = attrs.get("value_float") {
        return CTensor::new(a.f, &CDevice::Cpu).map_err(err);
    }
    if let Some(a) = attrs.get("value_int") {
        return CTensor::new(a.i, &CDevice::Cpu).map_err(err);
    }
    if let Some(a) = attrs.get("value_floats") {
        return CTensor::new(a.floats.as_slice(), &CDevice::Cpu).map_err(err);
    }
    if let Some(a) = attrs.get("value_ints") {
        return CTensor::new(a.ints.as_slice(), &CDevice::Cpu).map_err(err);
    }
    Err("a Constant needs value, value_float(s) or value_int(s)".into())
}

/// The candle type a value of ONNX element type `t` is held in: integers widen to i64 and
/// booleans are bytes, so that arithmetic between them needs no casts.
fn dtype_of(t: i32) -> Result<DType, EngineError> {
    Ok(match t {
        1 => DType::F32,
        2 | 9 => DType::U8,
        3 | 4 | 5 | 6 | 7 | 12 => DType::I64,
        10 => DType::F16,
        11 => DType::F64,
        16 => DType::BF16,
        other => return Err(EngineError::Unsupported(format!("ONNX element type {other}"))),
    })
}

/// An initializer or constant as a host tensor.
fn tensor_of(t: &pb::TensorProto) -> Result<CTensor, EngineError> {
    let invalid = |why: String| EngineError::InvalidModel(format!("tensor {:?}: {why}", t.name));
    if t.data_location == Some(1) {
        return Err(EngineError::Unsupported(format!("tensor {:?} keeps its data in an external file", t.name)));
    }
    let dims = t
        .dims
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| invalid(format!("negative dimension {d}"))))
        .collect::<Result<Vec<_>, _>>()?;
    let n = crate::tensor::numel(&dims).ok_or_else(|| invalid("too many elements".into()))?;
    let cpu = &CDevice::Cpu;
    let check = |len: usize| if len == n { Ok(()) } else { Err(invalid(format!("{len} values for shape {dims:?}"))) };
    let unsupported = || EngineError::Unsupported(format!("tensor {:?}: ONNX element type {}", t.name, t.data_type));
    let tensor = if !t.raw_data.is_empty() || n == 0 {
        let (dtype, size) = match t.data_type {
            1 => (DType::F32, 4),
            11 => (DType::F64, 8),
            7 => (DType::I64, 8),
            6 => (DType::I32, 4),
            2 | 9 => (DType::U8, 1),
            _ => return Err(unsupported()),
        };
        check(t.raw_data.len() / size)?;
        CTensor::from_raw_buffer(&t.raw_data, dtype, &dims, cpu)
    } else {
        match t.data_type {
            1 => check(t.float_data.len()).map(|_| CTensor::from_slice(&t.float_data, dims.as_slice(), cpu))?,
            11 => check(t.double_data.len()).map(|_| CTensor::from_slice(&t.double_data, dims.as_slice(), cpu))?,
            7 => check(t.int64_data.len()).map(|_| CTensor::from_slice(&t.int64_data, dims.as_slice(), cpu))?,
            6 => check(t.int32_data.len()).map(|_| CTensor::from_slice(&t.int32_data, dims.as_slice(), cpu))?,
            2 | 9 => check(t.int32_data.len()).map(|_| {
                let bytes: Vec<u8> = t.int32_data.iter().map(|&v| v as u8).collect();
                CTensor::from_vec(bytes, dims.as_slice(), cpu)
            })?,
            _ => return Err(unsupported()),
        }
    };
    // 32-bit integers are held as i64, like every integer (see `dtype_of`).
    let tensor = tensor.and_then(|t| if t.dtype() == DType::I32 { t.to_dtype(DType::I64) } else { Ok(t) });
    tensor.map_err(|e| invalid(e.to_string()))
}

/// Where a value known at load lives: small integer tensors on the host, the rest on the device.
fn place(t: CTensor, device: &CDevice) -> Result<CTensor, EngineError> {
    if t.dtype() == DType::I64 && t.elem_count() <= HOST_INTS {
        return Ok(t);
    }
    t.to_device(device).map_err(|e| EngineError::Device(format!("placing a weight: {e}")))
}

/// A graph input's or output's declared name, type and shape (`-1` for a named or unknown dim).
fn spec_of(value: &pb::ValueInfoProto) -> Result<TensorSpec, EngineError> {
    let undeclared = || EngineError::Unsupported(format!("{:?} has no declared tensor type", value.name));
    let Some(pb::type_proto::Value::TensorType(t)) = value.r#type.as_ref().and_then(|t| t.value.as_ref()) else {
        return Err(undeclared());
    };
    let datatype = match t.elem_type {
        1 => DataType::F32,
        2 => DataType::U8,
        3 => DataType::I8,
        4 => DataType::U16,
        5 => DataType::I16,
        6 => DataType::I32,
        7 => DataType::I64,
        9 => DataType::Bool,
        10 => DataType::F16,
        11 => DataType::F64,
        12 => DataType::U32,
        13 => DataType::U64,
        16 => DataType::BF16,
        other => return Err(EngineError::Unsupported(format!("{:?}: ONNX element type {other}", value.name))),
    };
    let shape = t.shape.as_ref().ok_or_else(undeclared)?;
    let shape = shape
        .dim
        .iter()
        .map(|d| match d.value {
            Some(Dim::DimValue(v)) if v >= 0 => v,
            _ => -1,
        })
        .collect();
    Ok(TensorSpec { name: value.name.clone(), datatype, shape })
}

/// A request's tensor on the device, in the type the plan holds it in (see [`dtype_of`]).
fn to_candle(t: &HostTensor, device: &CDevice) -> Result<CTensor, EngineError> {
    let TensorData::Raw(raw) = &t.data else {
        return Err(EngineError::InvalidInput("the candle plan takes no BYTES inputs".into()));
    };
    let (dtype, widen) = match t.dtype {
        DataType::F32 => (DType::F32, false),
        DataType::F64 => (DType::F64, false),
        DataType::F16 => (DType::F16, false),
        DataType::BF16 => (DType::BF16, false),
        DataType::I64 => (DType::I64, false),
        DataType::I32 => (DType::I32, true),
        DataType::I16 => (DType::I16, true),
        DataType::U32 => (DType::U32, true),
        DataType::U8 | DataType::Bool => (DType::U8, false),
        other => return Err(EngineError::InvalidInput(format!("the candle plan takes no {other} inputs"))),
    };
    let err = |e: candle_core::Error| EngineError::InvalidInput(e.to_string());
    let mut x = CTensor::from_raw_buffer(raw, dtype, &t.shape, &CDevice::Cpu).map_err(err)?;
    if widen {
        x = x.to_dtype(DType::I64).map_err(err)?;
    }
    x.to_device(device).map_err(|e| EngineError::Execution(format!("copying an input to the device: {e}")))
}

/// A plan value as a host tensor of the declared output type.
fn to_host(t: &CTensor, dtype: DataType) -> CResult<HostTensor> {
    let t = t.to_device(&CDevice::Cpu)?;
    let shape = t.dims().to_vec();
    let flat = t.flatten_all()?;
    let host = |r: Result<HostTensor, EngineError>| r.map_err(|e| candle_core::Error::Msg(e.to_string()));
    match dtype {
        DataType::F32 => host(HostTensor::from_f32(shape, &flat.to_dtype(DType::F32)?.to_vec1::<f32>()?)),
        DataType::F64 => host(HostTensor::from_f64(shape, &flat.to_dtype(DType::F64)?.to_vec1::<f64>()?)),
        DataType::I64 => host(HostTensor::from_i64(shape, &flat.to_dtype(DType::I64)?.to_vec1::<i64>()?)),
        DataType::I32 => host(HostTensor::from_i32(shape, &flat.to_dtype(DType::I32)?.to_vec1::<i32>()?)),
        DataType::U8 | DataType::Bool => {
            host(HostTensor::from_raw(dtype, shape, flat.to_dtype(DType::U8)?.to_vec1::<u8>()?))
        }
        other => Err(candle_core::Error::Msg(format!("{other} outputs are not supported"))),
    }
}

fn host_ints(t: &CTensor) -> CResult<Vec<i64>> {
    t.to_device(&CDevice::Cpu)?.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()
}

fn host_f64(t: &CTensor) -> CResult<f64> {
    let values = t.to_device(&CDevice::Cpu)?.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    values.first().copied().ok_or_else(|| candle_core::Error::Msg("an empty scalar".into()))
}

/// The axes of Unsqueeze, Squeeze and the reductions: an attribute before the opset that made
/// them the second input; `None` when the node has neither.
fn axes_of(attribute: &Option<Vec<i64>>, args: &[Option<&CTensor>]) -> CResult<Option<Vec<i64>>> {
    match (attribute, args.get(1).copied().flatten()) {
        (Some(a), _) => Ok(Some(a.clone())),
        (None, Some(t)) => host_ints(t).map(Some),
        (None, None) => Ok(None),
    }
}

fn axis_of(axis: i64, rank: usize) -> CResult<usize> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    if (0..rank.max(1) as i64).contains(&a) {
        Ok(a as usize)
    } else {
        Err(candle_core::Error::Msg(format!("axis {axis} out of range for rank {rank}")))
    }
}

/// Numpy's broadcast of two shapes.
fn broadcast(a: &[usize], b: &[usize]) -> CResult<Vec<usize>> {
    let rank = a.len().max(b.len());
    (0..rank)
        .map(|i| {
            let x = if i + a.len() >= rank { a[i + a.len() - rank] } else { 1 };
            let y = if i + b.len() >= rank { b[i + b.len() - rank] } else { 1 };
            match (x, y) {
                (x, y) if x == y => Ok(x),
                (1, y) => Ok(y),
                (x, 1) => Ok(x),
                _ => Err(candle_core::Error::Msg(format!("shapes {a:?} and {b:?} do not broadcast"))),
            }
        })
        .collect()
}

/// The arguments on one device: the plan's when any is there, else the host.
fn together<const N: usize>(args: [&CTensor; N], device: &CDevice) -> CResult<[CTensor; N]> {
    Ok(on_one_device(&args, device)?.try_into().unwrap_or_else(|_| unreachable!("N tensors")))
}

fn on_one_device(args: &[&CTensor], device: &CDevice) -> CResult<Vec<CTensor>> {
    let target = if args.iter().any(|t| !t.device().is_cpu()) { device.clone() } else { CDevice::Cpu };
    args.iter().map(|t| t.to_device(&target)).collect()
}

fn eval(op: &Op, args: &[Option<&CTensor>], device: &CDevice) -> CResult<CTensor> {
    let arg = |i: usize| -> CResult<&CTensor> {
        args.get(i).copied().flatten().ok_or_else(|| candle_core::Error::Msg(format!("input {i} is missing")))
    };
    let x = arg(0)?;
    match op {
        Op::Identity => Ok(x.clone()),
        Op::Unary(f) => f(x),
        Op::LeakyRelu(alpha) => x.maximum(&x.affine(*alpha, 0.0)?),
        &Op::Binary(kind) => {
            let [a, b] = together([x, arg(1)?], device)?;
            let b = if b.dtype() != a.dtype() { b.to_dtype(a.dtype())? } else { b };
            match kind {
                Binary::Add => a.broadcast_add(&b),
                Binary::Sub => a.broadcast_sub(&b),
                Binary::Mul => a.broadcast_mul(&b),
                Binary::Div => a.broadcast_div(&b),
                Binary::Pow => a.broadcast_pow(&b),
                Binary::Equal => a.broadcast_eq(&b),
                Binary::Max => a.broadcast_maximum(&b),
                Binary::Min => a.broadcast_minimum(&b),
            }
        }
        &Op::PowScalar(e) => {
            if e == 2.0 {
                x.sqr()
            } else if e == 0.5 {
                x.sqrt()
            } else {
                x.powf(e)
            }
        }
        Op::Where => {
            let [c, a, b] = together([x, arg(1)?, arg(2)?], device)?;
            let shape = broadcast(&broadcast(c.dims(), a.dims())?, b.dims())?;
            c.broadcast_as(shape.as_slice())?
                .where_cond(&a.broadcast_as(shape.as_slice())?, &b.broadcast_as(shape.as_slice())?)
        }
        Op::MatMul => {
            let [a, b] = together([x, arg(1)?], device)?;
            matmul(&a, &b)
        }
        &Op::Gemm { alpha, beta, trans_a, trans_b } => {
            let [a, b] = together([x, arg(1)?], device)?;
            let a = if trans_a { a.t()? } else { a };
            let b = if trans_b { b.t()? } else { b };
            let mut y = a.matmul(&b)?;
            if alpha != 1.0 {
                y = y.affine(alpha, 0.0)?;
            }
            if let Some(c) = args.get(2).copied().flatten() {
                let c = c.to_device(y.device())?;
                let c = if beta != 1.0 { c.affine(beta, 0.0)? } else { c };
                y = y.broadcast_add(&c)?;
            }
            Ok(y)
        }
        &Op::Softmax { axis, coerce_2d } => {
            let axis = axis_of(axis, x.rank())?;
            if coerce_2d {
                let dims = x.dims();
                let rows: usize = dims[..axis].iter().product();
                let flat = x.reshape((rows, x.elem_count() / rows.max(1)))?;
                candle_nn::ops::softmax_last_dim(&flat)?.reshape(dims)
            } else if axis + 1 == x.rank() {
                candle_nn::ops::softmax_last_dim(&x.contiguous()?)
            } else {
                candle_nn::ops::softmax(x, axis)
            }
        }
        &Op::LayerNorm { axis, eps } => {
            let axis = axis_of(axis, x.rank())?;
            let scale = arg(1)?.to_device(x.device())?;
            let bias = match args.get(2).copied().flatten() {
                Some(b) => b.to_device(x.device())?,
                None => scale.zeros_like()?,
            };
            if axis + 1 == x.rank() {
                candle_nn::ops::layer_norm(&x.contiguous()?, &scale, &bias, eps as f32)
            } else {
                let dims: Vec<usize> = (axis..x.rank()).collect();
                let centred = x.broadcast_sub(&x.mean_keepdim(dims.clone())?)?;
                let var = centred.sqr()?.mean_keepdim(dims)?;
                centred.broadcast_div(&var.affine(1.0, eps)?.sqrt()?)?.broadcast_mul(&scale)?.broadcast_add(&bias)
            }
        }
        &Op::BatchNorm { eps } => {
            let mut shape = vec![1; x.rank()];
            shape[1] = x.dim(1)?;
            let along = |i: usize| -> CResult<CTensor> { arg(i)?.to_device(x.device())?.reshape(shape.as_slice()) };
            let inv = along(4)?.affine(1.0, eps)?.sqrt()?.recip()?.broadcast_mul(&along(1)?)?;
            x.broadcast_sub(&along(3)?)?.broadcast_mul(&inv)?.broadcast_add(&along(2)?)
        }
        &Op::Flatten { axis } => {
            let axis = if axis < 0 { axis + x.rank() as i64 } else { axis }.clamp(0, x.rank() as i64) as usize;
            let rows: usize = x.dims()[..axis].iter().product();
            x.reshape((rows, x.elem_count() / rows.max(1)))
        }
        &Op::Reshape { allow_zero } => {
            let target = host_ints(arg(1)?)?;
            let mut dims = Vec::with_capacity(target.len());
            let mut hole = None;
            for (i, &d) in target.iter().enumerate() {
                dims.push(match d {
                    0 if !allow_zero => {
                        *x.dims().get(i).ok_or_else(|| candle_core::Error::Msg("0 past the input's rank".into()))?
                    }
                    -1 if hole.is_none() => {
                        hole = Some(i);
                        1
                    }
                    d if d >= 0 => d as usize,
                    d => return Err(candle_core::Error::Msg(format!("reshape to {d}"))),
                });
            }
            if let Some(h) = hole {
                let known: usize = dims.iter().product();
                dims[h] = x.elem_count() / known.max(1);
            }
            x.reshape(dims)
        }
        Op::Transpose { perm } => {
            let perm = perm.clone().unwrap_or_else(|| (0..x.rank()).rev().collect());
            x.permute(perm)
        }
        Op::Unsqueeze { axes } => {
            let axes = axes_of(axes, args)?.ok_or_else(|| candle_core::Error::Msg("Unsqueeze without axes".into()))?;
            let rank = x.rank() + axes.len();
            let mut axes = axes.iter().map(|&a| axis_of(a, rank)).collect::<CResult<Vec<_>>>()?;
            axes.sort_unstable();
            let mut y = x.clone();
            for a in axes {
                y = y.unsqueeze(a)?;
            }
            Ok(y)
        }
        Op::Squeeze { axes } => {
            let axes = match axes_of(axes, args)? {
                Some(a) => a,
                None => (0..x.rank() as i64).filter(|&d| x.dims()[d as usize] == 1).collect(),
            };
            let mut axes = axes.iter().map(|&a| axis_of(a, x.rank())).collect::<CResult<Vec<_>>>()?;
            axes.sort_unstable();
            let mut y = x.clone();
            for a in axes.into_iter().rev() {
                y = y.squeeze(a)?;
            }
            Ok(y)
        }
        &Op::Shape { start, end } => {
            let rank = x.rank() as i64;
            let clamp = |v: i64| if v < 0 { v + rank } else { v }.clamp(0, rank) as usize;
            let (s, e) = (clamp(start), clamp(end.unwrap_or(rank)));
            let dims: Vec<i64> = x.dims()[s..e.max(s)].iter().map(|&d| d as i64).collect();
            CTensor::new(dims.as_slice(), &CDevice::Cpu)
        }
        &Op::Gather { axis } => {
            let axis = axis_of(axis, x.rank())?;
            let indices = arg(1)?;
            let size = x.dim(axis)? as i64;
            let indices = if indices.device().is_cpu() {
                let fixed: Vec<i64> =
                    host_ints(indices)?.into_iter().map(|i| if i < 0 { i + size } else { i }).collect();
                CTensor::from_vec(fixed, indices.dims(), &CDevice::Cpu)?
            } else {
                indices.to_dtype(DType::I64)?
            };
            let [data, indices] = together([x, &indices], device)?;
            let mut shape = data.dims()[..axis].to_vec();
            shape.extend_from_slice(indices.dims());
            shape.extend_from_slice(&data.dims()[axis + 1..]);
            data.index_select(&indices.flatten_all()?, axis)?.reshape(shape)
        }
        &Op::Concat { axis } => {
            let parts: Vec<&CTensor> = args.iter().copied().flatten().collect();
            let parts = on_one_device(&parts, device)?;
            CTensor::cat(&parts, axis_of(axis, x.rank())?)
        }
        &Op::Cast { to, to_bool } => {
            if to_bool {
                x.ne(0.0)
            } else {
                x.to_dtype(to)
            }
        }
        Op::ConstantOfShape { value } => {
            let dims = host_ints(x)?.into_iter().map(|d| d.max(0) as usize).collect::<Vec<_>>();
            let filled = value.broadcast_as(dims.as_slice())?.contiguous()?;
            if filled.dtype() == DType::I64 && filled.elem_count() <= HOST_INTS {
                Ok(filled)
            } else {
                filled.to_device(device)
            }
        }
        Op::Slice => {
            let starts = host_ints(arg(1)?)?;
            let ends = host_ints(arg(2)?)?;
            let axes = match args.get(3).copied().flatten() {
                Some(a) => host_ints(a)?,
                None => (0..starts.len() as i64).collect(),
            };
            if let Some(steps) = args.get(4).copied().flatten()
                && host_ints(steps)?.iter().any(|&s| s != 1)
            {
                return Err(candle_core::Error::Msg("Slice with steps other than 1".into()));
            }
            let mut y = x.clone();
            for ((&start, &end), &axis) in starts.iter().zip(&ends).zip(&axes) {
                let axis = axis_of(axis, y.rank())?;
                let size = y.dim(axis)? as i64;
                let clamp = |v: i64| if v < 0 { v + size } else { v }.clamp(0, size);
                let (s, e) = (clamp(start), clamp(end));
                y = y.narrow(axis, s as usize, (e - s).max(0) as usize)?;
            }
            Ok(y)
        }
        Op::Expand => {
            let target = host_ints(arg(1)?)?.into_iter().map(|d| d.max(0) as usize).collect::<Vec<_>>();
            let shape = broadcast(x.dims(), &target)?;
            x.broadcast_as(shape)
        }
        &Op::Conv { pads, stride, dilation, groups } => {
            let w = arg(1)?.to_device(x.device())?;
            let mut y = match x.rank() {
                4 if pads[0] == pads[2] && pads[1] == pads[3] && pads[0] == pads[1] => {
                    x.conv2d(&w, pads[0], stride, dilation, groups)?
                }
                4 => x
                    .pad_with_zeros(2, pads[0], pads[2])?
                    .pad_with_zeros(3, pads[1], pads[3])?
                    .conv2d(&w, 0, stride, dilation, groups)?,
                3 if pads[0] == pads[2] => x.conv1d(&w, pads[0], stride, dilation, groups)?,
                3 => x.pad_with_zeros(2, pads[0], pads[2])?.conv1d(&w, 0, stride, dilation, groups)?,
                r => return Err(candle_core::Error::Msg(format!("Conv of rank {r}: 1-D and 2-D are supported"))),
            };
            if let Some(b) = args.get(2).copied().flatten() {
                let mut shape = vec![1; y.rank()];
                shape[1] = b.elem_count();
                y = y.broadcast_add(&b.to_device(y.device())?.reshape(shape)?)?;
            }
            Ok(y)
        }
        &Op::Pool { max, kernel, stride } => {
            if max {
                x.max_pool2d_with_stride(kernel, stride)
            } else {
                x.avg_pool2d_with_stride(kernel, stride)
            }
        }
        Op::GlobalAveragePool => x.mean_keepdim((2..x.rank()).collect::<Vec<_>>()),
        Op::Reduce { mean, axes, keepdims } => {
            let axes = axes_of(axes, args)?.unwrap_or_else(|| (0..x.rank() as i64).collect());
            let mut axes = axes.iter().map(|&a| axis_of(a, x.rank())).collect::<CResult<Vec<_>>>()?;
            axes.sort_unstable();
            axes.dedup();
            let mut y = if *mean { x.mean_keepdim(axes.clone())? } else { x.sum_keepdim(axes.clone())? };
            if !keepdims {
                for &a in axes.iter().rev() {
                    y = y.squeeze(a)?;
                }
            }
            Ok(y)
        }
        &Op::ArgMax { axis, keepdims } => {
            let axis = axis_of(axis, x.rank())?;
            let y = x.argmax_keepdim(axis)?.to_dtype(DType::I64)?;
            if keepdims { Ok(y) } else { y.squeeze(axis) }
        }
        &Op::Clip { min, max } => {
            let bound = |i: usize, folded: Option<f64>| -> CResult<Option<f64>> {
                match (folded, args.get(i).copied().flatten()) {
                    (Some(v), _) => Ok(Some(v)),
                    (None, Some(t)) => host_f64(t).map(Some),
                    (None, None) => Ok(None),
                }
            };
            let lo = bound(1, min)?.unwrap_or(f64::NEG_INFINITY);
            let hi = bound(2, max)?.unwrap_or(f64::INFINITY);
            x.clamp(lo, hi)
        }
    }
}

/// Numpy's matrix product: a vector operand gains and loses a unit dimension, a 2-D right operand
/// multiplies every row of the left one, and leading dimensions broadcast.
fn matmul(a: &CTensor, b: &CTensor) -> CResult<CTensor> {
    match (a.rank(), b.rank()) {
        (1, 1) => a.unsqueeze(0)?.matmul(&b.unsqueeze(1)?)?.reshape(()),
        (1, _) => {
            let y = matmul(&a.unsqueeze(0)?, b)?;
            y.squeeze(y.rank() - 2)
        }
        (_, 1) => matmul(a, &b.unsqueeze(1)?)?.squeeze(D::Minus1),
        (2, 2) => a.matmul(b),
        (r, 2) => {
            let mut dims = a.dims()[..r - 1].to_vec();
            let rows: usize = dims.iter().product();
            let y = a.reshape((rows, a.dim(D::Minus1)?))?.matmul(b)?;
            dims.push(b.dim(1)?);
            y.reshape(dims)
        }
        (ra, rb) if ra == rb && a.dims()[..ra - 2] == b.dims()[..rb - 2] => a.contiguous()?.matmul(&b.contiguous()?),
        _ => a.contiguous()?.broadcast_matmul(&b.contiguous()?),
    }
}
