#!/usr/bin/env python3
"""Checks that the unmodified `tritonclient[http]` package gets correct outputs from AlgoLink,
in JSON and in binary, for a pushed model.

    python3 tests/python/tritonclient_check.py http://127.0.0.1:8000

Pushes tests/fixtures/torch_mlp.onnx and iris_logreg.onnx (as new versions) and compares the
outputs with the exporting libraries' references stored beside them. Exits non-zero on mismatch.
"""
import json
import os
import sys
import urllib.request

import numpy as np
import tritonclient.http as http

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures")


def push(url, name, fixture):
    with open(os.path.join(FIXTURES, fixture), "rb") as f:
        req = urllib.request.Request(f"{url}/v1/models/{name}/versions", data=f.read(), method="POST")
    with urllib.request.urlopen(req) as r:
        return json.load(r)


def check(client, name, reference, binary):
    ref = json.load(open(os.path.join(FIXTURES, reference + ".json")))
    inputs = []
    for t in ref["inputs"]:
        dtype = {"FP32": np.float32, "INT64": np.int64}[t["datatype"]]
        arr = np.array(t["data"], dtype=dtype).reshape(t["shape"])
        i = http.InferInput(t["name"], list(arr.shape), t["datatype"])
        i.set_data_from_numpy(arr, binary_data=binary)
        inputs.append(i)
    outputs = [http.InferRequestedOutput(o["name"], binary_data=binary) for o in ref["outputs"]]
    result = client.infer(name, inputs, outputs=outputs, request_id="tc-1")
    assert result.get_response()["id"] == "tc-1"
    for o in ref["outputs"]:
        got = result.as_numpy(o["name"])
        want = np.array(o["data"]).reshape(o["shape"])
        assert got.shape == want.shape, (name, o["name"], got.shape, want.shape)
        if o["datatype"] == "INT64":
            assert (got == want).all(), (name, o["name"], got, want)
        else:
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # no outputs named: tritonclient asks for every output in binary
    result = client.infer(name, inputs)
    for o in ref["outputs"]:
        assert result.as_numpy(o["name"]) is not None, (name, o["name"])
    print(f"ok: {name} ({'binary' if binary else 'JSON'})")


def main():
    url = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000"
    client = http.InferenceServerClient(url.split("://", 1)[1])
    assert client.is_server_live() and client.is_server_ready()
    for name, fixture, reference in [("tc-mlp", "torch_mlp.onnx", "torch_mlp"), ("tc-iris", "iris_logreg.onnx", "iris_logreg")]:
        push(url, name, fixture)
        assert client.is_model_ready(name)
        meta = client.get_model_metadata(name)
        assert meta["name"] == name, meta
        for binary in (False, True):
            check(client, name, reference, binary)
    stats = client.get_inference_statistics("tc-mlp")
    assert stats["model_stats"][0]["inference_stats"]["success"]["count"] >= 4, stats
    print("tritonclient: all checks passed")


if __name__ == "__main__":
    main()
