"""The client: the Open Inference Protocol v2 (binary tensors by default) and AlgoLink's
management API, over the standard library's HTTP client."""

from __future__ import annotations

import http.client
import io
import json
import os
import struct
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any, Callable, Mapping, Optional, Union

import numpy as np

# OIP datatypes and their numpy dtypes (little-endian, as the binary extension sends them).
_DTYPES = {
    "BOOL": np.dtype("bool"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_DATATYPES = {dtype.newbyteorder("="): name for name, dtype in _DTYPES.items()}


class AlgoLinkError(Exception):
    """An error answer of the server (`status` is the HTTP status; 0 when it could not be reached)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}" if status else message)
        self.status = status
        self.message = message


class Prediction(dict):
    """The outputs of one inference by name (numpy arrays), with what identifies the request:
    `id` (for feedback), `model`, the `version` that answered, and the route's `variant`."""

    def __init__(self, outputs: Mapping[str, np.ndarray], *, model: str, id: str, version: Optional[int], variant: Optional[str]):
        super().__init__(outputs)
        self.model = model
        self.id = id
        self.version = version
        self.variant = variant

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {v.dtype}{list(v.shape)}" for k, v in self.items())
        return f"Prediction({self.model} v{self.version}, id={self.id!r}, {{{shapes}}})"


def _quote(name: str) -> str:
    """A model name in a path: `team/model` keeps its slash (the server expects it so)."""
    return "/".join(urllib.parse.quote(part, safe="") for part in str(name).split("/"))


def _is(obj: Any, package: str) -> bool:
    return any(c.__module__.split(".")[0] == package for c in type(obj).__mro__)


def to_onnx(model: Any, sample: Any, *, opset: Optional[int] = None) -> bytes:
    """Exports a scikit-learn estimator (with skl2onnx) or a PyTorch module (with torch.onnx) to
    ONNX bytes. `sample` is an example input (a batch of at least one row): it fixes the input's
    type and trailing shape; the batch dimension stays dynamic."""
    torch_module = _is(model, "torch")
    estimator = _is(model, "sklearn") or _is(model, "xgboost") or _is(model, "lightgbm")
    if not (torch_module or estimator):
        raise TypeError(
            f"cannot push a {type(model).__name__}: pass a file path, ONNX/safetensors bytes, "
            "a scikit-learn estimator or a torch.nn.Module"
        )
    if sample is None:
        raise ValueError("exporting a model to ONNX needs an example input: pass sample=X[:1]")
    if torch_module:
        import torch

        x = sample if isinstance(sample, torch.Tensor) else torch.as_tensor(np.asarray(sample, dtype=np.float32))
        buf = io.BytesIO()
        kwargs = dict(
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            opset_version=opset or 17,
        )
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                try:
                    torch.onnx.export(model, (x,), buf, dynamo=False, **kwargs)
                except TypeError:  # torch before 2.5 has no `dynamo` argument
                    torch.onnx.export(model, (x,), buf, **kwargs)
        finally:
            model.train(was_training)
        return buf.getvalue()
    try:
        from skl2onnx import to_onnx as skl_to_onnx
    except ImportError as e:
        raise ImportError("pushing a scikit-learn model needs skl2onnx: pip install 'algolink[sklearn]'") from e
    from sklearn.base import is_classifier

    from skl2onnx.common.data_types import FloatTensorType, Int64TensorType

    x = np.asarray(sample)
    # The input is called "input", as for a torch module, so versions of either kind are
    # interchangeable behind one route.
    kind = Int64TensorType if x.dtype.kind in "iu" else FloatTensorType
    initial_types = [("input", kind([None, *x.shape[1:]]))]
    options = {id(model): {"zipmap": False}} if is_classifier(model) else None
    onx = skl_to_onnx(model, initial_types=initial_types, options=options, target_opset=opset)
    return onx.SerializeToString()


class _Progress(io.RawIOBase):
    """A file read in chunks, telling `callback(sent, total)` as the upload goes."""

    def __init__(self, f, total: int, callback: Callable[[int, int], None]):
        self.f, self.total, self.callback, self.sent = f, total, callback, 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        chunk = self.f.read(n)
        self.sent += len(chunk)
        self.callback(self.sent, self.total)
        return chunk


class Client:
    """A connection to one AlgoLink server. `token` defaults to `$ALGOLINK_TOKEN`."""

    def __init__(self, url: str = "http://localhost:8000", token: Optional[str] = None, timeout: float = 60.0):
        self.url = url.rstrip("/")
        self.token = token if token is not None else os.environ.get("ALGOLINK_TOKEN")
        self.timeout = timeout
        self._metadata: dict = {}

    def __repr__(self) -> str:
        return f"Client({self.url!r})"

    # ---- plumbing ----

    def _call(self, method: str, path: str, body: Any = None, headers: Optional[dict] = None, raw: bool = False):
        h = {"accept": "application/json"}
        if self.token:
            h["authorization"] = f"Bearer {self.token}"
        if headers:
            h.update(headers)
        data = body
        if body is not None and not isinstance(body, (bytes, bytearray, memoryview, io.IOBase)):
            data = json.dumps(body).encode()
            h.setdefault("content-type", "application/json")
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                payload, answer_headers = r.read(), r.headers
        except urllib.error.HTTPError as e:
            text = e.read().decode(errors="replace")
            try:
                message = json.loads(text).get("error", text)
            except (ValueError, AttributeError):
                message = text or e.reason
            raise AlgoLinkError(e.code, f"{method} {path}: {message}") from None
        except urllib.error.URLError as e:
            raise AlgoLinkError(0, f"cannot reach {self.url}: {e.reason}") from None
        except TimeoutError:
            raise AlgoLinkError(0, f"{method} {path}: no answer within {self.timeout} s") from None
        except (ConnectionError, http.client.HTTPException) as e:
            raise AlgoLinkError(0, f"{method} {path}: the connection failed: {e}") from None
        if raw:
            return payload, answer_headers
        return json.loads(payload) if payload else None

    # ---- models and versions ----

    def push(
        self,
        model: Any,
        name: str,
        *,
        sample: Any = None,
        ttl_s: Optional[float] = None,
        tags: Optional[list] = None,
        on_progress: Optional[Callable[[int, int], None]] = None,
    ) -> dict:
        """Pushes a new version of `name` and returns it once it is stored, validated and loaded
        (`{"name", "version", "sha256", "state"}`). `model` is a file path (`.onnx`,
        `.safetensors`, a tar of a model directory), bytes, a scikit-learn estimator or a PyTorch
        module (exported to ONNX with `sample` as the example input)."""
        query = {}
        if ttl_s is not None:
            query["ttl_s"] = str(ttl_s)
        if tags:
            query["tags"] = ",".join(tags)
        path = f"/v1/models/{_quote(name)}/versions" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        headers = {"content-type": "application/octet-stream"}
        if isinstance(model, (str, os.PathLike)):
            size = os.path.getsize(model)
            headers["content-length"] = str(size)
            with open(model, "rb") as f:
                body = _Progress(f, size, on_progress) if on_progress else f
                return self._call("POST", path, body, headers)
        data = bytes(model) if isinstance(model, (bytes, bytearray, memoryview)) else to_onnx(model, sample)
        return self._call("POST", path, data, headers)

    def models(self) -> list:
        return self._call("GET", "/v1/models")

    def model(self, name: str) -> dict:
        """The model with its versions, aliases, serving version and traffic."""
        return self._call("GET", f"/v1/models/{_quote(name)}")

    def versions(self, name: str) -> list:
        """The versions of a model: number, state, format, size, sha256, creation time, tags."""
        return self.model(name)["versions"]

    def alias(self, name: str, alias: str, version: int) -> dict:
        return self._call("PUT", f"/v1/models/{_quote(name)}/aliases/{_quote(alias)}", {"version": int(version)})

    def policy(self, name: str, doc: Optional[dict] = None) -> dict:
        """Without `doc`: the model's policy (version policy, route, retirement, rollout). With it:
        replaces the policy (`{"version_policy": {"latest": 2}, "retirement": {"on_loss": true}}`)."""
        if doc is None:
            return self._call("GET", f"/v1/models/{_quote(name)}/policy")
        return self._call("PUT", f"/v1/models/{_quote(name)}/policy", doc)

    def metrics(self) -> str:
        """The Prometheus metrics the token may see, as text."""
        payload, _ = self._call("GET", "/metrics", raw=True)
        return payload.decode()

    def metadata(self, name: str, version: Optional[int] = None) -> dict:
        """The model's OIP metadata: its inputs and outputs with names, datatypes and shapes."""
        v = f"/versions/{version}" if version is not None else ""
        return self._call("GET", f"/v2/models/{_quote(name)}{v}")

    # ---- inference ----

    def _meta(self, name: str, version: Optional[int]) -> dict:
        key = (name, version)
        if key not in self._metadata:
            self._metadata[key] = self.metadata(name, version)
        return self._metadata[key]

    def predict(
        self,
        name: str,
        inputs: Any,
        *,
        version: Optional[int] = None,
        key: Optional[str] = None,
        outputs: Optional[list] = None,
        binary: bool = True,
        request_id: Optional[str] = None,
    ) -> Prediction:
        """Runs the model on `inputs` (an array for a one-input model, or a dict name → array;
        strings become BYTES) and returns its outputs as numpy arrays. `key` pins the request to
        a route variant (the same key, the same variant); `version` asks one version directly.
        More rows than the model's `max_batch_size` are sent in several requests, all on the
        variant of the first, and joined again. BYTES outputs are arrays of `bytes` objects."""
        try:
            return self._predict(name, inputs, version, key, outputs, binary, request_id)
        except AlgoLinkError as e:
            # The metadata this client remembered may be that of an older version (a new one
            # was pushed, with other inputs): ask again, and retry once if it changed.
            if e.status != 400 or (name, version) not in self._metadata:
                raise
            old = self._metadata.pop((name, version))
            if self._meta(name, version) == old:
                raise
            return self._predict(name, inputs, version, key, outputs, binary, request_id)

    def _predict(self, name, inputs, version, key, outputs, binary, request_id) -> Prediction:
        meta = self._meta(name, version)
        declared = meta["inputs"]
        if not isinstance(inputs, Mapping):
            if len(declared) != 1:
                names = [i["name"] for i in declared]
                raise ValueError(f"{name} has {len(declared)} inputs {names}: pass a dict of them")
            inputs = {declared[0]["name"]: inputs}
        types = {i["name"]: i["datatype"] for i in declared}
        arrays = {}
        for input_name, value in inputs.items():
            a = np.asarray(value)
            want = types.get(input_name)
            if want in _DTYPES and a.dtype.kind not in "OUS" and a.dtype != _DTYPES[want]:
                a = a.astype(_DTYPES[want])
            arrays[input_name] = a
        rid = request_id or uuid.uuid4().hex
        limit = int((meta.get("parameters") or {}).get("max_batch_size") or 0)
        rows = {a.shape[0] if a.ndim else 1 for a in arrays.values()}
        if limit <= 0 or len(rows) != 1 or max(rows) <= limit:
            return self._infer(name, arrays, rid, version, key, outputs, binary)
        n = rows.pop()
        parts = [
            self._infer(
                name,
                {k: a[start : start + limit] for k, a in arrays.items()},
                rid if start == 0 else f"{rid}-{start // limit}",
                version,
                key if key is not None else rid,
                outputs,
                binary,
            )
            for start in range(0, n, limit)
        ]
        joined = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        first = parts[0]
        return Prediction(joined, model=name, id=rid, version=first.version, variant=first.variant)

    def _infer(self, name, arrays, rid, version, key, outputs, binary) -> Prediction:
        tensors, blobs = [], []
        for input_name, a in arrays.items():
            if a.dtype.kind in "OUS":
                items = [s.encode() if isinstance(s, str) else bytes(s) for s in a.reshape(-1).tolist()]
                t = {"name": input_name, "shape": list(a.shape), "datatype": "BYTES"}
                if binary:
                    blob = b"".join(struct.pack("<I", len(s)) + s for s in items)
                else:
                    try:
                        t["data"] = [s.decode() for s in items]
                    except UnicodeDecodeError:
                        raise ValueError(
                            f"input {input_name!r} holds bytes that are not UTF-8: JSON cannot carry them, use binary=True"
                        ) from None
            else:
                datatype = _DATATYPES.get(a.dtype.newbyteorder("="))
                if datatype is None:
                    raise TypeError(f"input {input_name!r}: numpy dtype {a.dtype} has no OIP datatype")
                t = {"name": input_name, "shape": list(a.shape), "datatype": datatype}
                if binary:
                    blob = np.ascontiguousarray(a, dtype=_DTYPES[datatype]).tobytes()
                else:
                    t["data"] = a.reshape(-1).tolist()
            if binary:
                t["parameters"] = {"binary_data_size": len(blob)}
                blobs.append(blob)
            tensors.append(t)
        request: dict = {"id": rid, "inputs": tensors}
        if outputs:
            request["outputs"] = [{"name": o, "parameters": {"binary_data": binary}} for o in outputs]
        elif binary:
            request["parameters"] = {"binary_data_output": True}
        headers = {"content-type": "application/json"}
        if key is not None:
            headers["x-algolink-key"] = str(key)
        if binary:
            header = json.dumps(request).encode()
            body = header + b"".join(blobs)
            headers["inference-header-content-length"] = str(len(header))
            headers["content-type"] = "application/octet-stream"
        else:
            body = json.dumps(request).encode()
        v = f"/versions/{version}" if version is not None else ""
        payload, answer_headers = self._call("POST", f"/v2/models/{_quote(name)}{v}/infer", body, headers, raw=True)
        return self._prediction(name, rid, payload, answer_headers)

    @staticmethod
    def _prediction(name: str, rid: str, payload: bytes, headers) -> Prediction:
        n = headers.get("inference-header-content-length")
        header = json.loads(payload[: int(n)] if n is not None else payload)
        rest = memoryview(payload)[int(n) :] if n is not None else memoryview(b"")
        out, offset = {}, 0
        for o in header.get("outputs", []):
            shape, datatype = o["shape"], o["datatype"]
            if datatype != "BYTES" and datatype not in _DTYPES:
                raise AlgoLinkError(0, f"output {o['name']!r} has datatype {datatype!r}, which this client does not know")
            size = (o.get("parameters") or {}).get("binary_data_size")
            if size is not None:
                chunk = bytes(rest[offset : offset + size])
                offset += size
                if datatype == "BYTES":
                    items, i = [], 0
                    while i < len(chunk):
                        (length,) = struct.unpack_from("<I", chunk, i)
                        items.append(chunk[i + 4 : i + 4 + length])
                        i += 4 + length
                    array = np.array(items, dtype=object)
                else:
                    array = np.frombuffer(chunk, dtype=_DTYPES[datatype]).copy()
            elif datatype == "BYTES":
                # As in the binary form: bytes, whichever way they travelled.
                items = [d.encode() if isinstance(d, str) else bytes(d) for d in o.get("data", [])]
                array = np.empty(len(items), dtype=object)
                array[:] = items
            else:
                array = np.asarray(o.get("data", []), dtype=_DTYPES[datatype])
            out[o["name"]] = array.reshape(shape)
        version = header.get("model_version") or headers.get("x-algolink-version")
        return Prediction(
            out,
            model=name,
            id=header.get("id", rid),
            version=int(version) if version and str(version).isdigit() else version,
            variant=headers.get("x-algolink-variant"),
        )

    # ---- lifecycle ----

    def feedback(
        self,
        prediction: Union[Prediction, str],
        value: float,
        *,
        model: Optional[str] = None,
        version: Optional[int] = None,
    ) -> Any:
        """Records the business outcome of a prediction (a conversion 0/1 or a reward) for the
        model's running experiment. Pass the `Prediction`, or its request id with `model=`."""
        if isinstance(prediction, Prediction):
            model = model or prediction.model
            version = version if version is not None else prediction.version
            rid = prediction.id
        else:
            rid = str(prediction)
        if not model:
            raise ValueError("feedback by request id needs the model: feedback(id, value, model=...)")
        item: dict = {"model": model, "id": rid, "value": float(value)}
        if isinstance(version, int):
            item["version"] = version
        return self._call("POST", "/v1/feedback", item)

    def route(self, name: str, split: Optional[Mapping[Any, float]] = None, **options: Any) -> dict:
        """Without `split`: the model's route and current traffic. With it (`{target: weight}`,
        targets being versions or aliases): sets the split; `options` go into the route as they
        are (`shadow={"target": 7, "percent": 5}`, `strategy="thompson"`, ...)."""
        if split is None and not options:
            return self._call("GET", f"/v1/models/{_quote(name)}/route")
        body = dict(options)
        if split is not None:
            body["variants"] = [{"target": t, "weight": w} for t, w in split.items()]
        return self._call("PUT", f"/v1/models/{_quote(name)}/route", body)

    def clear_route(self, name: str) -> dict:
        return self._call("DELETE", f"/v1/models/{_quote(name)}/route")

    def experiment(self, name: str, goal: str = "conversion", **test: Any) -> dict:
        """Starts an experiment over the model's route (`goal`: "conversion" or "reward"; `test`:
        `min_effect`, `alpha`, `min_samples`, `max_samples`, ...)."""
        return self._call("POST", f"/v1/models/{_quote(name)}/experiments", {"goal": goal, **test})

    def experiments(self, name: Optional[str] = None) -> list:
        q = f"?model={urllib.parse.quote(name, safe='')}" if name else ""
        return self._call("GET", f"/v1/experiments{q}")

    def experiment_report(self, experiment_id: int) -> dict:
        """Per variant: traffic, errors, latency, outcomes, mean with its interval, p-value, verdict."""
        return self._call("GET", f"/v1/experiments/{int(experiment_id)}")

    def conclude(self, experiment_id: int, version: Optional[int] = None, alias: Optional[str] = None) -> dict:
        """Ends an experiment and moves the `champion` alias (or `alias`) to the winner (or to
        `version`)."""
        body: dict = {}
        if version is not None:
            body["winner"] = int(version)
        if alias is not None:
            body["alias"] = alias
        return self._call("POST", f"/v1/experiments/{int(experiment_id)}/conclude", body)

    def stop_experiment(self, experiment_id: int) -> dict:
        return self._call("POST", f"/v1/experiments/{int(experiment_id)}/stop")

    def rollout(self, name: str, canary: Optional[int] = None, **policy: Any) -> dict:
        """Without `canary`: the model's rollout status. With it: starts a canary rollout."""
        if canary is None:
            return self._call("GET", f"/v1/models/{_quote(name)}/rollout")
        body: dict = {"canary": int(canary)}
        if policy:
            body["policy"] = policy
        return self._call("POST", f"/v1/models/{_quote(name)}/rollout", body)

    def promote(self, name: str) -> dict:
        return self._call("POST", f"/v1/models/{_quote(name)}/rollout/promote")

    def events(self, model: Optional[str] = None, kind: Optional[str] = None, limit: int = 100, newest: bool = False) -> list:
        q = {"limit": str(limit)}
        if model:
            q["model"] = model
        if kind:
            q["kind"] = kind
        if newest:
            q["order"] = "newest"
        return self._call("GET", f"/v1/events?{urllib.parse.urlencode(q)}")

    def whoami(self) -> dict:
        return self._call("GET", "/v1/whoami")
