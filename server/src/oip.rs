//! Open Inference Protocol v2 request and response bodies: JSON tensors (flat or nested) and the
//! binary tensor extension in both directions.

use std::time::Duration;

use algolink_engine::tensor::numel;
use algolink_engine::{DataType, Signature, Tensor, TensorData};
use bytes::{BufMut, Bytes, BytesMut};
use serde::Deserialize;
use serde::ser::{Serialize, SerializeSeq, Serializer};
use serde_json::{Map, Value};

use crate::error::ApiError;

#[derive(Deserialize)]
struct RequestJson {
    id: Option<Value>,
    #[serde(default)]
    parameters: Map<String, Value>,
    inputs: Vec<InputJson>,
    #[serde(default)]
    outputs: Vec<OutputJson>,
}

#[derive(Deserialize)]
struct InputJson {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Map<String, Value>,
    data: Option<Value>,
}

#[derive(Deserialize)]
struct OutputJson {
    name: String,
    #[serde(default)]
    parameters: Map<String, Value>,
}

/// A request, checked against the model's signature.
#[derive(Debug)]
pub struct InferCall {
    pub id: Option<String>,
    /// In the signature's input order.
    pub inputs: Vec<Tensor>,
    /// `(output index, as binary)` in the order the response lists them.
    pub outputs: Vec<(usize, bool)>,
    pub priority: u32,
    pub timeout: Option<Duration>,
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::BadRequest(msg.into())
}

fn param_bool(p: &Map<String, Value>, key: &str) -> Result<Option<bool>, ApiError> {
    match p.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(bad(format!("parameter {key:?} must be a boolean, got {other}"))),
    }
}

fn param_u64(p: &Map<String, Value>, key: &str) -> Result<Option<u64>, ApiError> {
    match p.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| bad(format!("parameter {key:?} must be a non-negative integer, got {v}"))),
    }
}

/// Parses an infer body. `header_len` is `Inference-Header-Content-Length` when present: the
/// JSON is then the first `header_len` bytes and binary tensors follow.
pub fn parse_request(body: &Bytes, header_len: Option<usize>, sig: &Signature) -> Result<InferCall, ApiError> {
    let (json, mut binary) = match header_len {
        Some(n) if n > body.len() => {
            return Err(bad(format!(
                "Inference-Header-Content-Length {n} is larger than the body ({} bytes)",
                body.len()
            )));
        }
        Some(n) => (body.slice(..n), body.slice(n..)),
        None => (body.clone(), Bytes::new()),
    };
    let req: RequestJson = serde_json::from_slice(&json).map_err(|e| bad(format!("malformed request JSON: {e}")))?;
    let id = match req.id {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s),
        Some(other) => Some(other.to_string()),
    };

    let mut slots: Vec<Option<Tensor>> = vec![None; sig.inputs.len()];
    for input in req.inputs {
        let index = sig.input_index(&input.name).ok_or_else(|| {
            let names: Vec<&str> = sig.inputs.iter().map(|i| i.name.as_str()).collect();
            bad(format!("unknown input {:?}; the model's inputs are {names:?}", input.name))
        })?;
        if slots[index].is_some() {
            return Err(bad(format!("input {:?} is given twice", input.name)));
        }
        let dtype = DataType::parse(&input.datatype)
            .ok_or_else(|| bad(format!("input {:?}: unknown datatype {:?}", input.name, input.datatype)))?;
        let shape = input
            .shape
            .iter()
            .map(|&d| {
                usize::try_from(d)
                    .map_err(|_| bad(format!("input {:?}: negative dimension in shape {:?}", input.name, input.shape)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let tensor = match param_u64(&input.parameters, "binary_data_size")? {
            Some(size) => {
                if input.data.is_some() {
                    return Err(bad(format!("input {:?} has both binary_data_size and data", input.name)));
                }
                let size = size as usize;
                if size > binary.len() {
                    return Err(bad(format!(
                        "input {:?}: binary_data_size {size} exceeds the {} binary bytes left in the body",
                        input.name,
                        binary.len()
                    )));
                }
                let raw = binary.split_to(size);
                binary_to_tensor(&input.name, dtype, shape, &raw)?
            }
            None => {
                let data = input.data.as_ref().ok_or_else(|| bad(format!("input {:?} has no data", input.name)))?;
                json_to_tensor(&input.name, dtype, shape, data)?
            }
        };
        slots[index] = Some(tensor);
    }
    if !binary.is_empty() {
        return Err(bad(format!("{} binary bytes in the body belong to no input", binary.len())));
    }
    let inputs = slots
        .into_iter()
        .zip(&sig.inputs)
        .map(|(t, spec)| t.ok_or_else(|| bad(format!("missing input {:?}", spec.name))))
        .collect::<Result<Vec<_>, _>>()?;

    let binary_default = param_bool(&req.parameters, "binary_data_output")?.unwrap_or(false);
    let outputs = if req.outputs.is_empty() {
        (0..sig.outputs.len()).map(|i| (i, binary_default)).collect()
    } else {
        req.outputs
            .iter()
            .map(|o| {
                let index = sig.output_index(&o.name).ok_or_else(|| {
                    let names: Vec<&str> = sig.outputs.iter().map(|i| i.name.as_str()).collect();
                    bad(format!("unknown output {:?}; the model's outputs are {names:?}", o.name))
                })?;
                Ok((index, param_bool(&o.parameters, "binary_data")?.unwrap_or(binary_default)))
            })
            .collect::<Result<Vec<_>, ApiError>>()?
    };
    let priority = param_u64(&req.parameters, "priority")?.unwrap_or(0).min(u32::MAX as u64) as u32;
    let timeout = param_u64(&req.parameters, "timeout")?.filter(|&t| t > 0).map(Duration::from_micros);
    Ok(InferCall { id, inputs, outputs, priority, timeout })
}

fn binary_to_tensor(name: &str, dtype: DataType, shape: Vec<usize>, raw: &[u8]) -> Result<Tensor, ApiError> {
    if dtype == DataType::Bytes {
        let count = numel(&shape).ok_or_else(|| bad(format!("input {name:?}: shape {shape:?} overflows")))?;
        let mut values = Vec::with_capacity(count.min(raw.len() / 4));
        let mut rest = raw;
        while rest.len() >= 4 {
            let len = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
            rest = &rest[4..];
            if len > rest.len() {
                return Err(bad(format!("input {name:?}: BYTES element of {len} bytes runs past the tensor")));
            }
            values.push(rest[..len].to_vec());
            rest = &rest[len..];
        }
        if !rest.is_empty() {
            return Err(bad(format!("input {name:?}: {} trailing bytes after the last BYTES element", rest.len())));
        }
        return Tensor::from_bytes(shape, values).map_err(|e| bad(format!("input {name:?}: {e}")));
    }
    Tensor::from_raw(dtype, shape, raw.to_vec()).map_err(|e| bad(format!("input {name:?}: {e}")))
}

/// Converts JSON data, flat or nested, into a tensor of the declared type and shape.
fn json_to_tensor(name: &str, dtype: DataType, shape: Vec<usize>, data: &Value) -> Result<Tensor, ApiError> {
    let count = numel(&shape).ok_or_else(|| bad(format!("input {name:?}: shape {shape:?} overflows")))?;
    // Never reserve more than the request could hold: a huge shape with little data is refused below.
    let mut leaves: Vec<&Value> = Vec::with_capacity(count.min(4096));
    flatten(data, &mut leaves, count)
        .map_err(|()| bad(format!("input {name:?}: shape {shape:?} needs {count} elements, data has more")))?;
    if leaves.len() != count {
        return Err(bad(format!("input {name:?}: shape {shape:?} needs {count} elements, data has {}", leaves.len())));
    }
    let wrong = |i: usize, v: &Value| bad(format!("input {name:?}: element {i} ({v}) is not a valid {dtype}"));
    macro_rules! ints {
        ($t:ty) => {{
            let mut raw = Vec::with_capacity(count * std::mem::size_of::<$t>());
            for (i, v) in leaves.iter().enumerate() {
                let x = v
                    .as_i64()
                    .and_then(|x| <$t>::try_from(x).ok())
                    .or_else(|| v.as_u64().and_then(|x| <$t>::try_from(x).ok()))
                    .ok_or_else(|| wrong(i, v))?;
                raw.extend_from_slice(&x.to_le_bytes());
            }
            raw
        }};
    }
    let raw = match dtype {
        DataType::Bool => leaves
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::Bool(b) => Ok(*b as u8),
                Value::Number(n) if n.as_u64() == Some(0) || n.as_u64() == Some(1) => Ok(n.as_u64().unwrap_or(0) as u8),
                _ => Err(wrong(i, v)),
            })
            .collect::<Result<Vec<u8>, _>>()?,
        DataType::U8 => ints!(u8),
        DataType::U16 => ints!(u16),
        DataType::U32 => ints!(u32),
        DataType::U64 => ints!(u64),
        DataType::I8 => ints!(i8),
        DataType::I16 => ints!(i16),
        DataType::I32 => ints!(i32),
        DataType::I64 => ints!(i64),
        DataType::F32 => {
            let mut raw = Vec::with_capacity(count * 4);
            for (i, v) in leaves.iter().enumerate() {
                raw.extend_from_slice(&(v.as_f64().ok_or_else(|| wrong(i, v))? as f32).to_le_bytes());
            }
            raw
        }
        DataType::F64 => {
            let mut raw = Vec::with_capacity(count * 8);
            for (i, v) in leaves.iter().enumerate() {
                raw.extend_from_slice(&v.as_f64().ok_or_else(|| wrong(i, v))?.to_le_bytes());
            }
            raw
        }
        DataType::F16 | DataType::BF16 => {
            return Err(bad(format!(
                "input {name:?}: {dtype} has no JSON form; send it with the binary tensor extension"
            )));
        }
        DataType::Bytes => {
            let values = leaves
                .iter()
                .enumerate()
                .map(|(i, v)| v.as_str().map(|s| s.as_bytes().to_vec()).ok_or_else(|| wrong(i, v)))
                .collect::<Result<Vec<_>, _>>()?;
            return Tensor::from_bytes(shape, values).map_err(|e| bad(format!("input {name:?}: {e}")));
        }
    };
    Tensor::from_raw(dtype, shape, raw).map_err(|e| bad(format!("input {name:?}: {e}")))
}

/// Collects the scalar leaves of nested arrays in row-major order; stops past `limit`.
fn flatten<'a>(v: &'a Value, out: &mut Vec<&'a Value>, limit: usize) -> Result<(), ()> {
    match v {
        Value::Array(items) => {
            for item in items {
                flatten(item, out, limit)?;
            }
            Ok(())
        }
        leaf => {
            if out.len() >= limit {
                return Err(());
            }
            out.push(leaf);
            Ok(())
        }
    }
}

/// Serialises a tensor's elements as a flat JSON array without building `Value`s.
struct JsonData<'a>(&'a Tensor);

impl Serialize for JsonData<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let t = self.0;
        let mut seq = s.serialize_seq(Some(t.numel()))?;
        macro_rules! each {
            ($t:ty, $raw:expr) => {
                for c in $raw.chunks_exact(std::mem::size_of::<$t>()) {
                    seq.serialize_element(&<$t>::from_le_bytes(c.try_into().expect("element size")))?;
                }
            };
        }
        match &t.data {
            TensorData::Bytes(values) => {
                for v in values {
                    seq.serialize_element(&String::from_utf8_lossy(v))?;
                }
            }
            TensorData::Raw(raw) => match t.dtype {
                DataType::Bool => {
                    for b in raw {
                        seq.serialize_element(&(*b != 0))?;
                    }
                }
                DataType::U8 => each!(u8, raw),
                DataType::U16 => each!(u16, raw),
                DataType::U32 => each!(u32, raw),
                DataType::U64 => each!(u64, raw),
                DataType::I8 => each!(i8, raw),
                DataType::I16 => each!(i16, raw),
                DataType::I32 => each!(i32, raw),
                DataType::I64 => each!(i64, raw),
                DataType::F32 => each!(f32, raw),
                DataType::F64 => each!(f64, raw),
                DataType::F16 | DataType::BF16 | DataType::Bytes => {
                    return Err(serde::ser::Error::custom(format!("{} outputs need binary_data", t.dtype)));
                }
            },
        }
        seq.end()
    }
}

#[derive(serde::Serialize)]
struct OutputOut<'a> {
    name: &'a str,
    datatype: &'static str,
    shape: &'a [usize],
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<JsonData<'a>>,
}

#[derive(serde::Serialize)]
struct ResponseOut<'a> {
    model_name: &'a str,
    model_version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    outputs: Vec<OutputOut<'a>>,
}

/// Encodes a response. Returns the body and, when binary tensors follow the JSON, its length
/// for `Inference-Header-Content-Length`.
pub fn encode_response(
    model: &str,
    version: u64,
    call: &InferCall,
    sig: &Signature,
    outputs: &[Tensor],
) -> Result<(Bytes, Option<usize>), ApiError> {
    let mut binary_parts: Vec<&Tensor> = Vec::new();
    let mut outs = Vec::with_capacity(call.outputs.len());
    for &(index, as_binary) in &call.outputs {
        let t = &outputs[index];
        // FP16/BF16 have no JSON form: they always travel as binary.
        let as_binary = as_binary || matches!(t.dtype, DataType::F16 | DataType::BF16);
        let (parameters, data) = if as_binary {
            binary_parts.push(t);
            (Some(serde_json::json!({ "binary_data_size": binary_size(t) })), None)
        } else {
            (None, Some(JsonData(t)))
        };
        outs.push(OutputOut {
            name: &sig.outputs[index].name,
            datatype: t.dtype.as_str(),
            shape: &t.shape,
            parameters,
            data,
        });
    }
    let response =
        ResponseOut { model_name: model, model_version: version.to_string(), id: call.id.as_deref(), outputs: outs };
    let json = serde_json::to_vec(&response).map_err(|e| ApiError::Internal(format!("encoding the response: {e}")))?;
    if binary_parts.is_empty() {
        return Ok((Bytes::from(json), None));
    }
    let header_len = json.len();
    let mut body = BytesMut::with_capacity(header_len + binary_parts.iter().map(|t| binary_size(t)).sum::<usize>());
    body.put_slice(&json);
    for t in binary_parts {
        match &t.data {
            TensorData::Raw(raw) => body.put_slice(raw),
            TensorData::Bytes(values) => {
                for v in values {
                    body.put_u32_le(v.len() as u32);
                    body.put_slice(v);
                }
            }
        }
    }
    Ok((body.freeze(), Some(header_len)))
}

fn binary_size(t: &Tensor) -> usize {
    match &t.data {
        TensorData::Raw(raw) => raw.len(),
        TensorData::Bytes(values) => values.iter().map(|v| 4 + v.len()).sum(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use algolink_engine::TensorSpec;

    fn sig() -> Signature {
        Signature {
            platform: "test".into(),
            inputs: vec![
                TensorSpec { name: "x".into(), datatype: DataType::F32, shape: vec![-1, 2] },
                TensorSpec { name: "s".into(), datatype: DataType::Bytes, shape: vec![-1] },
            ],
            outputs: vec![
                TensorSpec { name: "y".into(), datatype: DataType::F32, shape: vec![-1, 2] },
                TensorSpec { name: "z".into(), datatype: DataType::I64, shape: vec![-1] },
            ],
            pad_to_longest: false,
        }
    }

    #[test]
    fn nested_and_flat_data_agree() {
        let flat = r#"{"id":"1","inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[1,2,3,4]},
                      {"name":"s","shape":[2],"datatype":"BYTES","data":["a","b"]}]}"#;
        let nested = flat.replace("[1,2,3,4]", "[[1,2],[3,4]]");
        let a = parse_request(&Bytes::from(flat), None, &sig()).unwrap();
        let b = parse_request(&Bytes::from(nested), None, &sig()).unwrap();
        assert_eq!(a.inputs, b.inputs);
        assert_eq!(a.inputs[0].to_f32().unwrap(), vec![1., 2., 3., 4.]);
        assert_eq!(a.id.as_deref(), Some("1"));
        assert_eq!(a.outputs, vec![(0, false), (1, false)]);
    }

    #[test]
    fn binary_inputs_and_outputs() {
        let json = r#"{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","parameters":{"binary_data_size":8}},
                       {"name":"s","shape":[1],"datatype":"BYTES","parameters":{"binary_data_size":7}}],
                       "outputs":[{"name":"z"},{"name":"y","parameters":{"binary_data":true}}]}"#;
        let mut body = json.as_bytes().to_vec();
        body.extend_from_slice(&1.5f32.to_le_bytes());
        body.extend_from_slice(&2.5f32.to_le_bytes());
        body.extend_from_slice(&3u32.to_le_bytes());
        body.extend_from_slice(b"abc");
        let call = parse_request(&Bytes::from(body), Some(json.len()), &sig()).unwrap();
        assert_eq!(call.inputs[0].to_f32().unwrap(), vec![1.5, 2.5]);
        assert_eq!(call.inputs[1].data, TensorData::Bytes(vec![b"abc".to_vec()]));
        assert_eq!(call.outputs, vec![(1, false), (0, true)]);

        let y = Tensor::from_f32(vec![1, 2], &[0.5, 0.25]).unwrap();
        let z = Tensor::from_i64(vec![1], &[7]).unwrap();
        let (body, header_len) = encode_response("m", 3, &call, &sig(), &[y, z]).unwrap();
        let n = header_len.unwrap();
        let head: Value = serde_json::from_slice(&body[..n]).unwrap();
        assert_eq!(head["model_version"], "3");
        assert_eq!(head["outputs"][0]["data"], serde_json::json!([7]));
        assert_eq!(head["outputs"][1]["parameters"]["binary_data_size"], 8);
        assert_eq!(&body[n..], &[0.5f32.to_le_bytes(), 0.25f32.to_le_bytes()].concat()[..]);
    }

    #[test]
    fn errors_name_the_problem() {
        let cases = [
            (r#"{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1,2,3]}]}"#, "needs 2 elements"),
            (r#"{"inputs":[{"name":"q","shape":[1],"datatype":"FP32","data":[1]}]}"#, "unknown input"),
            (r#"{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP99","data":[1,2]}]}"#, "unknown datatype"),
            (r#"{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1,"a"]}]}"#, "not a valid FP32"),
            (r#"{"inputs":[{"name":"x","shape":[1,-2],"datatype":"FP32","data":[1,2]}]}"#, "negative dimension"),
            (r#"{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1,2]}]}"#, "missing input \"s\""),
            (r#"{"inputs": [}"#, "malformed request JSON"),
            (
                r#"{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1,2]},{"name":"s","shape":[1],"datatype":"BYTES","data":["a"]}],"outputs":[{"name":"w"}]}"#,
                "unknown output",
            ),
        ];
        for (body, want) in cases {
            let err = parse_request(&Bytes::from(body), None, &sig()).unwrap_err().to_string();
            assert!(err.contains(want), "{body}: {err}");
        }
    }
}
