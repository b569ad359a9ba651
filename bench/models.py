#!/usr/bin/env python3
"""Writes the benchmark models and requests into a folder (numpy + onnx only, fixed seed):

- mlp.onnx: the MLP 256 -> 1024 -> 1024 -> 10 (ReLU) of the issue's measurements, batch axis dynamic
- mlp.json: an infer request with one row; iris.json: one iris row for iris_logreg.onnx
"""
import json
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
rng = np.random.default_rng(0)
dims = [256, 1024, 1024, 10]
nodes, inits = [], []
x = "input"
for i, (a, b) in enumerate(zip(dims, dims[1:])):
    w = (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32)
    bias = (rng.standard_normal(b) * 0.01).astype(np.float32)
    inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(bias, f"b{i}")]
    y = "output" if i == len(dims) - 2 else f"h{i}"
    mm = f"mm{i}"
    nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [mm]))
    if y == "output":
        nodes.append(helper.make_node("Add", [mm, f"b{i}"], [y]))
    else:
        nodes.append(helper.make_node("Add", [mm, f"b{i}"], [f"a{i}"]))
        nodes.append(helper.make_node("Relu", [f"a{i}"], [y]))
    x = y
graph = helper.make_graph(
    nodes, "mlp", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 256])],
    [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 10])], inits)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 8
onnx.checker.check_model(model)
onnx.save(model, os.path.join(out, "mlp.onnx"))
row = rng.standard_normal(256).astype(np.float32).round(4).tolist()
json.dump({"inputs": [{"name": "input", "shape": [1, 256], "datatype": "FP32", "data": row}]},
          open(os.path.join(out, "mlp.json"), "w"))
json.dump({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [5.9, 3.0, 5.1, 1.8]}]},
          open(os.path.join(out, "iris.json"), "w"))
print("wrote", out)
