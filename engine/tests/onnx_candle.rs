//! ONNX graphs compiled into candle operations (the path ONNX models take on a GPU), run here on
//! the CPU: against the exporting library's outputs and against tract on the same batches.

mod common;

use algolink_engine::{DataType, EngineError, LoadOptions, Model, ModelFiles, OnnxBackend, Tensor, load_model};
use common::{fixtures, tensor};
use serde_json::Value;

fn load(name: &str, backend: OnnxBackend) -> Result<std::sync::Arc<dyn Model>, EngineError> {
    let bytes = std::fs::read(fixtures().join(format!("{name}.onnx"))).unwrap();
    let options = LoadOptions { onnx_backend: backend, ..LoadOptions::default() };
    load_model(&ModelFiles::from([("model.onnx".to_string(), bytes.into())]), &options)
}

fn assert_close(name: &str, got: &Tensor, want: &Tensor, tolerance: f32) {
    assert_eq!(got.shape, want.shape, "{name}: shape");
    assert_eq!(got.dtype, want.dtype, "{name}: datatype");
    if want.dtype == DataType::I64 {
        assert_eq!(got.to_i64().unwrap(), want.to_i64().unwrap(), "{name}");
        return;
    }
    for (g, w) in got.to_f32().unwrap().iter().zip(want.to_f32().unwrap()) {
        assert!((g - w).abs() <= tolerance * w.abs() + 1e-5, "{name}: got {g}, want {w}");
    }
}

#[test]
fn pytorch_exports_match_the_exporter_and_tract() {
    for name in ["torch_mlp", "torch_cnn", "torch_bert"] {
        let model = load(name, OnnxBackend::Candle).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(model.signature().platform, "candle_onnx");
        let tract = load(name, OnnxBackend::Tract).unwrap();
        assert_eq!(model.signature().inputs, tract.signature().inputs, "{name}: inputs");
        assert_eq!(model.signature().pad_to_longest, tract.signature().pad_to_longest, "{name}");
        let reference: Value =
            serde_json::from_str(&std::fs::read_to_string(fixtures().join(format!("{name}.json"))).unwrap()).unwrap();
        let inputs: Vec<Tensor> = reference["inputs"].as_array().unwrap().iter().map(tensor).collect();
        let outputs = model.run(inputs.clone()).unwrap();
        for want in reference["outputs"].as_array().unwrap() {
            let i = model.signature().output_index(want["name"].as_str().unwrap()).unwrap();
            assert_close(name, &outputs[i], &tensor(want), 1e-4);
        }
        // A batch three times as large, each request's rows in it, against tract.
        let batch: Vec<Tensor> = inputs.iter().map(|t| Tensor::concat(&[t, t, t], false).unwrap()).collect();
        let (ours, theirs) = (model.run(batch.clone()).unwrap(), tract.run(batch).unwrap());
        for (got, want) in ours.iter().zip(&theirs) {
            assert_close(name, got, want, 1e-4);
        }
    }
}

#[test]
fn a_graph_with_operators_the_plan_lacks_is_refused_naming_them() {
    let err = load("iris_logreg", OnnxBackend::Candle).err().expect("ai.onnx.ml operators are not in the plan");
    assert!(matches!(err, EngineError::Unsupported(_)), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("ai.onnx.ml:LinearClassifier") && text.contains("ai.onnx.ml:ZipMap"), "{text}");
    // The default backend serves it through tract.
    assert_eq!(load("iris_logreg", OnnxBackend::Tract).unwrap().signature().platform, "onnx_onnxv1");
}

#[test]
fn an_argmax_classifier_returns_its_labels() {
    // canary_fast: MatMul, Softmax and ArgMax (opset 17) with an INT64 output.
    let model = load("canary_fast", OnnxBackend::Candle).unwrap();
    let tract = load("canary_fast", OnnxBackend::Tract).unwrap();
    let x: Vec<f32> = (0..20).map(|i| ((i * 7 % 11) as f32 - 5.0) / 3.0).collect();
    let input = Tensor::from_f32(vec![5, 4], &x).unwrap();
    let (ours, theirs) = (model.run(vec![input.clone()]).unwrap(), tract.run(vec![input]).unwrap());
    assert_eq!(ours.len(), theirs.len());
    for (got, want) in ours.iter().zip(&theirs) {
        assert_close("canary_fast", got, want, 1e-5);
    }
}

/// Graphs built here, for the operators no fixture has, each against tract.
mod built {
    use super::*;
    use algolink_engine::onnx_candle::CandleOnnx;
    use prost::Message;
    use tract_onnx::pb;

    fn node(op: &str, inputs: &[&str], output: &str, attribute: Vec<pb::AttributeProto>) -> pb::NodeProto {
        pb::NodeProto {
            op_type: op.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            name: output.into(),
            attribute,
            ..Default::default()
        }
    }

    fn ints(name: &str, v: &[i64]) -> pb::AttributeProto {
        pb::AttributeProto { name: name.into(), r#type: 7, ints: v.to_vec(), ..Default::default() }
    }

    fn int(name: &str, i: i64) -> pb::AttributeProto {
        pb::AttributeProto { name: name.into(), r#type: 2, i, ..Default::default() }
    }

    fn float(name: &str, f: f32) -> pb::AttributeProto {
        pb::AttributeProto { name: name.into(), r#type: 1, f, ..Default::default() }
    }

    fn f32s(name: &str, dims: &[i64]) -> pb::TensorProto {
        let n = dims.iter().product::<i64>() as usize;
        let float_data = (0..n).map(|i| ((i * 37 % 17) as f32 - 8.0) / 7.0).collect();
        pb::TensorProto { name: name.into(), dims: dims.to_vec(), data_type: 1, float_data, ..Default::default() }
    }

    fn f32_values(name: &str, dims: &[i64], float_data: Vec<f32>) -> pb::TensorProto {
        pb::TensorProto { name: name.into(), dims: dims.to_vec(), data_type: 1, float_data, ..Default::default() }
    }

    fn i64s(name: &str, dims: &[i64], int64_data: Vec<i64>) -> pb::TensorProto {
        pb::TensorProto { name: name.into(), dims: dims.to_vec(), data_type: 7, int64_data, ..Default::default() }
    }

    /// A tensor value with a symbolic batch dimension first.
    fn value(name: &str, elem_type: i32, dims: &[i64]) -> pb::ValueInfoProto {
        use pb::tensor_shape_proto::{Dimension, dimension::Value};
        let mut dim = vec![Dimension { value: Some(Value::DimParam("N".into())), ..Default::default() }];
        dim.extend(dims.iter().map(|&d| Dimension { value: Some(Value::DimValue(d)), ..Default::default() }));
        let tensor = pb::type_proto::Tensor { elem_type, shape: Some(pb::TensorShapeProto { dim }) };
        pb::ValueInfoProto {
            name: name.into(),
            r#type: Some(pb::TypeProto {
                value: Some(pb::type_proto::Value::TensorType(tensor)),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn model(
        node: Vec<pb::NodeProto>,
        initializer: Vec<pb::TensorProto>,
        input: Vec<pb::ValueInfoProto>,
        output: Vec<pb::ValueInfoProto>,
    ) -> Vec<u8> {
        pb::ModelProto {
            ir_version: 8,
            opset_import: vec![pb::OperatorSetIdProto { domain: String::new(), version: 17 }],
            graph: Some(pb::GraphProto { node, initializer, input, output, name: "g".into(), ..Default::default() }),
            ..Default::default()
        }
        .encode_to_vec()
    }

    fn against_tract(bytes: Vec<u8>, input: Tensor) {
        let files = ModelFiles::from([("model.onnx".to_string(), bytes.clone().into())]);
        let candle = LoadOptions { onnx_backend: OnnxBackend::Candle, ..LoadOptions::default() };
        let ours = load_model(&files, &candle).unwrap().run(vec![input.clone()]).unwrap();
        let theirs = load_model(&files, &LoadOptions::default()).unwrap().run(vec![input]).unwrap();
        assert_eq!(ours.len(), theirs.len());
        for (i, (got, want)) in ours.iter().zip(&theirs).enumerate() {
            assert_close(&format!("output {i}"), got, want, 1e-4);
        }
        // The plan can be compiled on its own, too.
        let (proto, weight_bytes) = CandleOnnx::parse(&bytes).unwrap();
        assert!(weight_bytes > 0);
        CandleOnnx::build(&proto, algolink_engine::Device::Cpu).unwrap();
    }

    #[test]
    fn convolution_normalisation_and_pooling() {
        let nodes = vec![
            // Asymmetric padding: top 1, left 0, bottom 0, right 1.
            node("Conv", &["x", "w", "b"], "conv", vec![ints("pads", &[1, 0, 0, 1]), ints("kernel_shape", &[3, 3])]),
            node("BatchNormalization", &["conv", "scale", "bias", "mean", "var"], "bn", vec![float("epsilon", 1e-3)]),
            node("Clip", &["bn", "lo", "hi"], "clip", vec![]),
            node("AveragePool", &["clip", ""], "pool", vec![ints("kernel_shape", &[2, 2]), ints("strides", &[2, 2])]),
            node("LeakyRelu", &["pool"], "leaky", vec![float("alpha", 0.1)]),
            node("MaxPool", &["conv"], "maxpool", vec![ints("kernel_shape", &[2, 1]), ints("strides", &[1, 1])]),
            node("GlobalAveragePool", &["leaky"], "gap", vec![]),
            node("Flatten", &["gap"], "y", vec![int("axis", 1)]),
        ];
        let mut nodes = nodes;
        nodes[3].input.truncate(1);
        let inits = vec![
            f32s("w", &[3, 2, 3, 3]),
            f32s("b", &[3]),
            f32s("scale", &[3]),
            f32s("bias", &[3]),
            f32s("mean", &[3]),
            f32_values("var", &[3], vec![0.5, 1.0, 2.0]),
            f32_values("lo", &[], vec![-0.5]),
            f32_values("hi", &[], vec![1.5]),
        ];
        let bytes = model(
            nodes,
            inits,
            vec![value("x", 1, &[2, 6, 6])],
            vec![value("y", 1, &[3]), value("maxpool", 1, &[3, 5, 6])],
        );
        let x: Vec<f32> = (0..3 * 72).map(|i| ((i * 13 % 29) as f32 - 14.0) / 9.0).collect();
        against_tract(bytes, Tensor::from_f32(vec![3, 2, 6, 6], &x).unwrap());
    }

    #[test]
    fn shape_arithmetic_reductions_and_selection() {
        let nodes = vec![
            // [N, 3, 4] built from the input's own batch size, on the host.
            node("Shape", &["x"], "shape", vec![]),
            node("Gather", &["shape", "zero"], "n", vec![]),
            node("Unsqueeze", &["n", "axis0"], "n1", vec![]),
            node("Concat", &["n1", "three", "four"], "target", vec![int("axis", 0)]),
            node("Unsqueeze", &["x", "axis1"], "xu", vec![]),
            node("Expand", &["xu", "target"], "e", vec![]),
            node("Mul", &["e", "w"], "ew", vec![]),
            node("Softmax", &["ew"], "sm", vec![int("axis", 1)]),
            node("Transpose", &["sm"], "t", vec![ints("perm", &[0, 2, 1])]),
            node("Reshape", &["t", "flat"], "r", vec![]),
            node("Slice", &["r", "starts", "ends", "axis1"], "sl", vec![]),
            node("ReduceMean", &["sl"], "m", vec![ints("axes", &[1]), int("keepdims", 1)]),
            node("Sub", &["sl", "m"], "d", vec![]),
            node("Pow", &["d", "two"], "p", vec![]),
            node("ReduceSum", &["p", "axis1"], "rs", vec![int("keepdims", 0)]),
            node("Sqrt", &["rs"], "sq", vec![]),
            node("Unsqueeze", &["sq", "axis1"], "spread", vec![]),
            node("Cast", &["x"], "xi", vec![int("to", 7)]),
            node("Equal", &["xi", "zero"], "is_zero", vec![]),
            node("Neg", &["x"], "negx", vec![]),
            node("Where", &["is_zero", "x", "negx"], "wh", vec![]),
            node("Max", &["wh", "half"], "mx", vec![]),
            node("Min", &["mx", "two"], "clamped", vec![]),
            node("ArgMax", &["ew"], "best", vec![int("axis", 2), int("keepdims", 0)]),
            node("Squeeze", &["m", "axis1"], "ms", vec![]),
            node("Sigmoid", &["ms"], "sg", vec![]),
            node("Tanh", &["sg"], "th", vec![]),
            node("Erf", &["th"], "squashed", vec![]),
            node(
                "ConstantOfShape",
                &["target"],
                "ones",
                vec![pb::AttributeProto {
                    name: "value".into(),
                    r#type: 4,
                    t: Some(f32_values("", &[1], vec![1.0])),
                    ..Default::default()
                }],
            ),
            node("Add", &["e", "ones"], "shifted", vec![]),
            node("LayerNormalization", &["shifted", "w", "w"], "normed", vec![int("axis", 1)]),
        ];
        let inits = vec![
            i64s("zero", &[], vec![0]),
            i64s("axis0", &[1], vec![0]),
            i64s("axis1", &[1], vec![1]),
            i64s("three", &[1], vec![3]),
            i64s("four", &[1], vec![4]),
            i64s("flat", &[2], vec![0, -1]),
            i64s("starts", &[1], vec![2]),
            i64s("ends", &[1], vec![-1]),
            f32s("w", &[3, 4]),
            f32_values("two", &[], vec![2.0]),
            f32_values("half", &[], vec![0.5]),
        ];
        let outputs = vec![
            value("spread", 1, &[1]),
            value("clamped", 1, &[4]),
            value("best", 7, &[3]),
            value("squashed", 1, &[]),
            value("normed", 1, &[3, 4]),
        ];
        let bytes = model(nodes, inits, vec![value("x", 1, &[4])], outputs);
        let x = [-1.5, 0.3, 2.2, 0.0, 1.0, -0.7, 3.5, -2.0, 0.9, 4.0, -0.2, 1.7];
        against_tract(bytes, Tensor::from_f32(vec![3, 4], &x).unwrap());
    }
}
