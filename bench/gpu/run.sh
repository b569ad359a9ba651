#!/usr/bin/env bash
# The GPU check of #4 (acceptance 6), in one run of a few minutes on a machine with an NVIDIA GPU,
# the driver, and a Python with torch, transformers and safetensors (no Rust, no internet needed):
#
# 1. CUDA results against CPU results: `offline` with DEVICE=cuda:0 runs every batch on both and
#    prints the largest relative difference (want <= 1e-3), for the MLP 256-1024-1024-10 and a BERT
#    shaped like all-MiniLM-L6-v2 taking text, at batch 1, 8, 32 and 128; the MLP exported to ONNX
#    (the candle plan on the GPU against tract on the CPU).
# 2. Engine throughput and batch-1 latency on the GPU, against PyTorch eager on the same GPU
#    (want AlgoLink batch-1 <= 1.2x eager).
# 3. Served: the server on cuda:0, concurrency 1 and 64, against the best offline rate (want >= 0.9);
#    the MLP also on two executor instances (two streams), at concurrency 64.
# 4. The CPU half of 3 with the load generator on cores of its own (taskset; skipped below 6
#    cores): the MLP (ONNX, tract, 16-row requests) and the encoder (candle) on 2 cores.
#
# Prepare here (no GPU needed): bench/gpu/prepare.sh builds the cuda binaries with
# ../shared/gpu/build-cuda and packs them into bench/gpu/bin.tgz (ignored by git; carry it).
# Run there: bench/gpu/run.sh; every figure lands in $OUT (default bench/gpu/out): results.jsonl,
# summary.txt, the server log.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-$here/out}
mkdir -p "$out"
work=$(mktemp -d /tmp/algolink-gpu.XXXXXX)
export RUST_BACKTRACE=0
py=${PYTHON:-python3}
# part 4's cores (run below 6 cores only when ENGINE_CORES is given)
pinned=${ENGINE_CORES:+yes}
export ENGINE_CORES=${ENGINE_CORES:-0,1} CLIENT_CORES=${CLIENT_CORES:-2-5}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >"$out/gpu.txt" 2>&1 || true
# the CUDA libraries the binaries link: torch's own, when the system has none
cu=$("$py" -c 'import nvidia, os; print(os.path.join(os.path.dirname(nvidia.__path__[0]), "nvidia", "cu13", "lib"))' 2>/dev/null || true)
[[ -n $cu && -d $cu ]] && export LD_LIBRARY_PATH=$cu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
tar xzf "$here/bin.tgz" -C "$work"
bin=$work/bin

# One server at a time: serve CONFIG PORT LOG [CORES] starts it (pinned to CORES, if given) and
# waits until it is ready; push PORT NAME FILE; stop. (Called inside the pipeline below, a
# subshell: the server's pid and the trap that stops it live there.)
pid=""
stop() { [[ -n $pid ]] && { kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; }; pid=""; }
serve() {
  local pin=()
  [[ -n ${4:-} ]] && pin=(taskset -c "$4")
  "${pin[@]}" "$bin/algolink" serve --config "$1" --data "$1.data" --http "127.0.0.1:$2" >"$3" 2>&1 &
  pid=$!
  for _ in $(seq 300); do curl -sf "127.0.0.1:$2/v2/health/ready" >/dev/null && return; sleep 0.2; done
  echo "the server did not start; see $3" >&2
  return 1
}
push() { curl -sf --data-binary @"$3" "127.0.0.1:$1/v1/models/$2/versions" >/dev/null; }

{
  trap stop EXIT
  "$py" "$here/models.py" "$work"
  for m in mlp.safetensors encoder.tar; do
    DEVICE=cuda:0 "$bin/offline" "$work/$m" 1,8,32,128 2
    "$bin/offline" "$work/$m" 1,8 1 | sed 's/"device":"cpu"/"device":"cpu","cpu_only":true/'
  done
  # The MLP as ONNX: the candle plan on cuda:0 against tract on the CPU.
  [[ -f $work/mlp.onnx ]] && DEVICE=cuda:0 "$bin/offline" "$work/mlp.onnx" 1,8,32,128 2

  printf '[defaults]\ndevice = "cuda:0"\nwarmup_batch_sizes = [1, 2, 4, 8, 16, 32, 64]\n[models.mlp2]\ninstances = 2\n' >"$work/gpu.toml"
  serve "$work/gpu.toml" 18500 "$out/server.log"
  push 18500 mlp "$work/mlp.safetensors"
  push 18500 encoder "$work/encoder.tar"
  push 18500 mlp2 "$work/mlp.safetensors"
  "$bin/algolink-bench" --url http://127.0.0.1:18500 --model mlp --request "$work/mlp.json" -c 1,64 --binary --label served-mlp
  "$bin/algolink-bench" --url http://127.0.0.1:18500 --model encoder --request "$work/text.json" -c 1,64 --label served-encoder
  "$bin/algolink-bench" --url http://127.0.0.1:18500 --model mlp2 --request "$work/mlp.json" -c 64 --binary --label served-mlp-2-instances
  stop

  # 4. The CPU half of acceptance 3 with the load generator off the engine's cores, which the
  #    2-core development VM cannot do: server and `offline` pinned to cores 0-1, algolink-bench to
  #    cores 2-5 (ENGINE_CORES, CLIENT_CORES); three rounds alternating offline and served windows,
  #    as bench/compare.sh.
  if command -v taskset >/dev/null && { (($(nproc) >= 6)) || [[ -n $pinned ]]; } && [[ -f $work/mlp.onnx ]]; then
    printf '[defaults]\ndevice = "cpu"\n[models.mlp]\nmode = "adaptive"\nlatency_slo_ms = 100\nwarmup_batch_sizes = [%s]\n[models.encoder]\nwarmup_batch_sizes = [1, 2, 4, 8, 16, 32]\n' \
      "$(seq -s, 1 64)" >"$work/cpu.toml"
    serve "$work/cpu.toml" 18501 "$out/server-cpu.log" "$ENGINE_CORES"
    push 18501 mlp "$work/mlp.onnx"
    push 18501 encoder "$work/encoder.tar"
    labelled() { sed "s/^{/{\"label\":\"$1\",/"; }
    for r in 1 2 3; do
      taskset -c "$ENGINE_CORES" "$bin/offline" "$work/mlp.onnx" 16,32,64 1.5 | labelled "cpu-offline-mlp-r$r"
      taskset -c "$CLIENT_CORES" "$bin/algolink-bench" --url http://127.0.0.1:18501 --model mlp --request "$work/mlp16.json" \
        -c 8,16 --binary --window-ms 2000 --label "cpu-served-mlp-r$r"
      taskset -c "$ENGINE_CORES" "$bin/offline" "$work/encoder.tar" 8,16,32 1.5 | labelled "cpu-offline-encoder-r$r"
      taskset -c "$CLIENT_CORES" "$bin/algolink-bench" --url http://127.0.0.1:18501 --model encoder --request "$work/text.json" \
        -c 64 --window-ms 2000 --label "cpu-served-encoder-r$r"
    done
    stop
  fi
} | tee "$out/results.jsonl"

"$py" - "$out/results.jsonl" <<'PY' | tee "$out/summary.txt"
import json, os, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
eager = {r["label"]: r["ms"] for r in rows if r.get("label", "").startswith("torch-eager")}
for model, key in [("mlp.safetensors", "mlp"), ("encoder.tar", "encoder")]:
    gpu = [r for r in rows if r.get("model", "").endswith(model) and r.get("device") == "cuda:0"]
    worst = max(r["max_rel_diff"] for r in gpu)
    best = max(gpu, key=lambda r: r["rows_per_s"])
    b1 = next(r for r in gpu if r["batch"] == 1)
    served = [r for r in rows if r.get("label") == f"served-{key}"]
    sat = max(served, key=lambda r: r["concurrency"])
    print(f"{key}: CUDA vs CPU largest relative difference {worst:.2e} (want <= 1e-3)")
    print(f"{key}: batch-1 {b1['ms_per_batch']:.3f} ms vs PyTorch eager {eager['torch-eager-' + key]:.3f} ms"
          f" = {b1['ms_per_batch'] / eager['torch-eager-' + key]:.2f}x (want <= 1.2)")
    print(f"{key}: served at c={sat['concurrency']} {sat['rps']:.0f} req/s vs offline best {best['rows_per_s']:.0f} rows/s"
          f" (batch {best['batch']}) = {sat['rps'] / best['rows_per_s']:.2f} (want >= 0.9)")
two = [r for r in rows if r.get("label") == "served-mlp-2-instances"]
one = [r for r in rows if r.get("label") == "served-mlp" and r["concurrency"] == 64]
if two and one:
    print(f"mlp on 2 instances: served at c=64 {two[0]['rps']:.0f} req/s vs 1 instance {one[0]['rps']:.0f} req/s"
          f" = {two[0]['rps'] / one[0]['rps']:.2f}x")
onnx = [r for r in rows if r.get("model", "").endswith("mlp.onnx") and r.get("device") == "cuda:0"]
if onnx:
    b1 = next(r for r in onnx if r["batch"] == 1)
    print(f"mlp.onnx (candle plan): CUDA vs CPU largest relative difference {max(r['max_rel_diff'] for r in onnx):.2e}"
          f" (want <= 1e-3); batch-1 {b1['ms_per_batch']:.3f} ms vs PyTorch eager {eager['torch-eager-mlp']:.3f} ms")
else:
    print("mlp.onnx: not run (see the export message above)")
for key, rows_per_request, conc in [("mlp", 16, (8, 16)), ("encoder", 1, (64,))]:
    for c in conc:
        ratios = []
        for r in (1, 2, 3):
            off = [x for x in rows if x.get("label") == f"cpu-offline-{key}-r{r}"]
            served = [x for x in rows if x.get("label") == f"cpu-served-{key}-r{r}" and x["concurrency"] == c]
            if off and served:
                ratios.append(rows_per_request * served[0]["rps"] / max(x["rows_per_s"] for x in off))
        if ratios:
            print(f"cpu {key}: served ({rows_per_request}-row requests, c={c}) against the best offline rate, engine on"
                  f" cores {os.environ.get('ENGINE_CORES')}, load generator on {os.environ.get('CLIENT_CORES')},"
                  f" 3 alternated rounds: {', '.join(f'{x:.2f}' for x in ratios)},"
                  f" median {sorted(ratios)[len(ratios) // 2]:.2f} (want >= 0.9)")
PY
