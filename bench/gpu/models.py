#!/usr/bin/env python3
"""Models for the GPU check, generated on the spot (nothing large travels), and PyTorch eager
baselines on the same GPU:

    models.py OUT        # OUT/mlp.safetensors (256-1024-1024-10, config in its metadata), OUT/mlp.onnx,
                         # OUT/encoder.tar (a BERT with all-MiniLM-L6-v2's shape, random weights,
                         # a WordPiece tokenizer, sentence-transformers pooling files),
                         # OUT/mlp.json, OUT/mlp16.json, OUT/text.json (requests), and one JSON line per
                         # PyTorch eager batch-1 latency on cuda:0 on stdout
"""
import io
import json
import os
import sys
import tarfile
import time

import torch

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
torch.manual_seed(0)
SENTENCE = "the quick brown fox jumps over the lazy dog near the river bank"


def eager_ms(fn, *args):
    """Median of 200 timed calls after 20 warm-up calls, synchronised."""
    with torch.no_grad():
        for _ in range(20):
            fn(*args)
        torch.cuda.synchronize()
        times = []
        for _ in range(200):
            t = time.perf_counter()
            fn(*args)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2] * 1e3


def save_tensors(tensors, metadata=None):
    from safetensors.torch import save
    return save({k: v.contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)


# MLP 256-1024-1024-10
mlp = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024), torch.nn.ReLU(),
                          torch.nn.Linear(1024, 10)).eval()
meta = {"algolink.config": json.dumps({"architecture": "mlp", "activation": "relu"})}
with open(os.path.join(out, "mlp.safetensors"), "wb") as f:
    f.write(save_tensors(mlp.state_dict(), meta))
with open(os.path.join(out, "mlp.json"), "w") as f:
    json.dump({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 256],
                           "data": [((i * 7919) % 1000) / 1000 - 0.5 for i in range(256)]}]}, f)
# 16 rows, as `perf_analyzer -b 16` sends: the CPU half of acceptance 3 (run.sh, part 4).
with open(os.path.join(out, "mlp16.json"), "w") as f:
    json.dump({"inputs": [{"name": "input", "datatype": "FP32", "shape": [16, 256],
                           "data": [((i * 7919) % 1000) / 1000 - 0.5 for i in range(16 * 256)]}]}, f)
# The same MLP as ONNX: on cuda:0 it runs as a candle plan (engine/src/onnx_candle.rs). The
# TorchScript exporter needs no onnx package; a failure leaves the ONNX check out, not the rest.
try:
    torch.onnx.export(mlp, (torch.randn(1, 256),), os.path.join(out, "mlp.onnx"), input_names=["input"],
                      output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                      opset_version=17, dynamo=False)
except Exception as e:  # noqa: BLE001 - reported, and the rest of the check goes on
    print(f"mlp.onnx not exported: {e}", file=sys.stderr)
gpu_mlp = mlp.cuda()
print(json.dumps({"label": "torch-eager-mlp", "batch": 1,
                  "ms": eager_ms(gpu_mlp, torch.randn(1, 256, device="cuda"))}))

# A BERT shaped like all-MiniLM-L6-v2 (6 layers, 384 hidden, 12 heads), random weights
from transformers import BertConfig, BertModel, BertTokenizerFast

words = sorted(set(SENTENCE.split()))
chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789.,"))
vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars] + words
vocab += [f"[unused{i}]" for i in range(30522 - len(vocab))]
cfg = BertConfig(vocab_size=len(vocab), hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                 intermediate_size=1536, max_position_embeddings=512)
bert = BertModel(cfg, add_pooling_layer=False).eval()
tmp = os.path.join(out, "encoder")
os.makedirs(tmp, exist_ok=True)
with open(os.path.join(tmp, "vocab.txt"), "w") as f:
    f.write("\n".join(vocab) + "\n")
tok = BertTokenizerFast(vocab_file=os.path.join(tmp, "vocab.txt"), do_lower_case=True)
tok.save_pretrained(tmp)
buf = io.BytesIO()
files = {"model.safetensors": save_tensors(bert.state_dict()),
         "config.json": json.dumps(cfg.to_dict()).encode(),
         "modules.json": json.dumps([
             {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
             {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
             {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]).encode(),
         "1_Pooling/config.json": json.dumps({"word_embedding_dimension": 384, "pooling_mode_mean_tokens": True}).encode(),
         "sentence_bert_config.json": json.dumps({"max_seq_length": 256}).encode()}
for name in ["tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"]:
    path = os.path.join(tmp, name)
    if os.path.exists(path):
        files[name] = open(path, "rb").read()
with tarfile.open(os.path.join(out, "encoder.tar"), "w") as tar:
    for name, data in files.items():
        info = tarfile.TarInfo("encoder/" + name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
with open(os.path.join(out, "text.json"), "w") as f:
    json.dump({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [SENTENCE]}]}, f)

gpu_bert = bert.cuda()
enc = {k: v.cuda() for k, v in tok([SENTENCE], return_tensors="pt").items()}


def embed(enc):
    h = gpu_bert(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=1)


print(json.dumps({"label": "torch-eager-encoder", "batch": 1, "tokens": int(enc["input_ids"].shape[1]),
                  "ms": eager_ms(embed, enc)}))
