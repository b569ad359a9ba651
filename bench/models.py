#!/usr/bin/env python3
"""Writes the benchmark models and requests into a folder (numpy + onnx only, fixed seed):

- mlp.onnx: the MLP 256 -> 1024 -> 1024 -> 10 (ReLU) of the issue's measurements, batch axis dynamic
- wide.onnx: 512 -> 2048 -> 2048 -> 10, compute-bound enough that HTTP costs little beside it
- mlp.json, wide.json: infer requests with one row; mlp16.json, wide16.json: with 16 rows (what
  `perf_analyzer -b 16` sends); iris.json: one iris row for iris_logreg.onnx
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


def mlp(name, dims):
    """Writes NAME.onnx (MatMul + Add + Relu layers), NAME.json (a one-row request) and NAME16.json
    (a 16-row one)."""
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
        nodes, "mlp", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", dims[0]])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", dims[-1]])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, os.path.join(out, name + ".onnx"))
    for rows, suffix in [(1, ""), (16, "16")]:
        data = rng.standard_normal(rows * dims[0]).astype(np.float32).round(4).tolist()
        json.dump({"inputs": [{"name": "input", "shape": [rows, dims[0]], "datatype": "FP32", "data": data}]},
                  open(os.path.join(out, name + suffix + ".json"), "w"))


mlp("mlp", [256, 1024, 1024, 10])
mlp("wide", [512, 2048, 2048, 10])
json.dump({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [5.9, 3.0, 5.1, 1.8]}]},
          open(os.path.join(out, "iris.json"), "w"))
print("wrote", out)
