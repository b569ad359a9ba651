"""The client against a real AlgoLink server (started by `tests/tests/python_client.rs`, which sets
ALGOLINK_TEST_URL, ALGOLINK_TEST_TOKEN — a publisher in namespace `lab` — and ALGOLINK_FIXTURES)."""

import json
import os

import numpy as np
import pytest

from algolink import AlgoLinkError, Client, Prediction

URL = os.environ["ALGOLINK_TEST_URL"]
TOKEN = os.environ["ALGOLINK_TEST_TOKEN"]
FIXTURES = os.environ["ALGOLINK_FIXTURES"]


@pytest.fixture(scope="module")
def client():
    return Client(URL, token=TOKEN)


def reference(name):
    with open(os.path.join(FIXTURES, f"{name}.json")) as f:
        return json.load(f)


def reference_inputs(name):
    ref = reference(name)["inputs"][0]
    return np.asarray(ref["data"], dtype=np.float32).reshape(ref["shape"])


def test_push_a_file_and_predict_numpy(client):
    seen = []
    pushed = client.push(os.path.join(FIXTURES, "iris_logreg.onnx"), "lab/iris", on_progress=lambda s, t: seen.append((s, t)))
    assert pushed["version"] == 1 and pushed["state"] == "ready" and len(pushed["sha256"]) == 64
    assert seen and seen[-1][0] == seen[-1][1] == os.path.getsize(os.path.join(FIXTURES, "iris_logreg.onnx"))
    versions = client.versions("lab/iris")
    assert [v["version"] for v in versions] == [1] and versions[0]["sha256"] == pushed["sha256"]

    x = reference_inputs("iris_logreg")
    p = client.predict("lab/iris", x)
    assert isinstance(p, Prediction) and p.model == "lab/iris" and p.version == 1 and p.id
    want = {o["name"]: o for o in reference("iris_logreg")["outputs"]}
    assert set(p) == set(want)
    for name, o in want.items():
        assert isinstance(p[name], np.ndarray) and list(p[name].shape) == o["shape"]
        np.testing.assert_allclose(p[name].reshape(-1), np.asarray(o["data"]).reshape(-1), rtol=1e-5, atol=1e-6)
    # JSON and binary tensors give the same answer; a float64 array is cast to the model's FP32.
    j = client.predict("lab/iris", x.astype(np.float64), binary=False)
    for name in want:
        np.testing.assert_array_equal(p[name], j[name])


def test_push_a_scikit_learn_model_exported_on_the_fly(client):
    from sklearn.datasets import load_iris
    from sklearn.ensemble import GradientBoostingClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = load_iris(return_X_y=True)
    X = X.astype(np.float32)
    model = make_pipeline(StandardScaler(), GradientBoostingClassifier(n_estimators=20, random_state=0)).fit(X, y)
    pushed = client.push(model, "lab/iris-gb", sample=X[:1])
    assert pushed["state"] == "ready"
    # 150 rows, more than the model's max_batch_size (64): sent in three requests, joined again.
    p = client.predict("lab/iris-gb", X)
    label = next(v for v in p.values() if v.dtype == np.int64)
    proba = next(v for v in p.values() if v.dtype == np.float32)
    np.testing.assert_array_equal(label, model.predict(X))
    np.testing.assert_allclose(proba, model.predict_proba(X), atol=1e-5)


def test_push_a_pytorch_module_exported_on_the_fly(client):
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    x = torch.randn(5, 8)
    pushed = client.push(net, "lab/mlp", sample=x[:1])
    assert pushed["state"] == "ready"
    assert net.training, "the module is left as it was"
    p = client.predict("lab/mlp", x.numpy())
    assert list(p) == ["output"]
    with torch.no_grad():
        np.testing.assert_allclose(p["output"], net.eval()(x).numpy(), rtol=1e-4, atol=1e-5)


def test_split_feedback_and_experiment(client):
    client.push(os.path.join(FIXTURES, "iris_forest.onnx"), "lab/iris")
    assert [v["version"] for v in client.versions("lab/iris")] == [1, 2]
    route = client.route("lab/iris", {1: 50, 2: 50})
    assert [v["weight"] for v in route["route"]["variants"]] == [50, 50]
    assert [v["percent"] for v in client.route("lab/iris")["traffic"]["variants"]] == [50.0, 50.0]
    exp = client.experiment("lab/iris", goal="conversion", min_samples=10)
    x = reference_inputs("iris_logreg")[:1]
    served = {}
    for i in range(60):
        p = client.predict("lab/iris", x, key=f"user-{i}")
        served.setdefault(p.version, 0)
        served[p.version] += 1
        # Version 2 converts, version 1 does not: the report must see the difference.
        client.feedback(p, 1.0 if p.version == 2 else 0.0)
    assert set(served) == {1, 2}, served
    # A key always lands on the same variant.
    assert len({client.predict("lab/iris", x, key="user-7").version for _ in range(5)}) == 1
    report = client.experiment_report(exp["id"])
    by_version = {v["version"]: v for v in report["variants"]}
    assert sum(v["outcomes"] for v in by_version.values()) == 60
    assert by_version[2]["mean"] == 1.0 and by_version[1]["mean"] == 0.0
    assert [e["id"] for e in client.experiments("lab/iris")] == [exp["id"]]
    concluded = client.conclude(exp["id"], version=2)
    assert client.model("lab/iris")["aliases"]["champion"] == 2, concluded
    kinds = [e["kind"] for e in client.events("lab/iris")]
    assert "pushed" in kinds and "traffic" in kinds


def test_metadata_follows_new_versions(client):
    import io

    import torch

    # A client remembers a model's inputs; a new version names its input differently: the next
    # predict notices the refusal, asks again and succeeds.
    net = torch.nn.Sequential(torch.nn.Linear(4, 2)).eval()
    x = np.zeros((3, 4), np.float32)
    client.push(net, "lab/renamed", sample=x[:1])
    fresh = Client(URL, token=TOKEN)
    assert fresh.predict("lab/renamed", x)["output"].shape == (3, 2)
    buf = io.BytesIO()
    torch.onnx.export(net, (torch.zeros(1, 4),), buf, input_names=["features"], output_names=["output"],
                      dynamic_axes={"features": {0: "batch"}, "output": {0: "batch"}}, opset_version=17, dynamo=False)
    client.push(buf.getvalue(), "lab/renamed")
    assert fresh.predict("lab/renamed", x)["output"].shape == (3, 2)
    assert [i["name"] for i in fresh.metadata("lab/renamed")["inputs"]] == ["features"]


def test_bytes_that_json_cannot_carry_are_refused_clearly(client):
    with pytest.raises(ValueError, match="not UTF-8"):
        client.predict("lab/iris", np.array([b"\xff"], dtype=object), binary=False)


def test_errors_are_clear(client):
    with pytest.raises(AlgoLinkError) as e:
        client.predict("lab/nope", np.zeros((1, 4), np.float32))
    assert e.value.status == 404 and "nope" in e.value.message
    with pytest.raises(AlgoLinkError) as e:
        Client(URL, token="alk_0_bad").models()
    assert e.value.status == 401
    with pytest.raises(AlgoLinkError) as e:
        client.push(b"not a model", "lab/broken")
    assert e.value.status == 400
    with pytest.raises(TypeError, match="cannot push a dict"):
        client.push({"weights": 1}, "lab/x")
    with pytest.raises(AlgoLinkError) as e:
        Client("http://127.0.0.1:9", token=TOKEN, timeout=2).models()
    assert e.value.status == 0 and "cannot reach" in e.value.message
