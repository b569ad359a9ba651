#!/usr/bin/env bash
# Side by side, in one run on this machine: AlgoLink against the FastAPI + ONNX Runtime server
# (../shared/peers), and AlgoLink with dynamic batching against itself without (two MLPs, binary
# tensors: 256-1024-1024-10, and the compute-bound 512-2048-2048-10).
#
#   bench/compare.sh            # prints JSON lines per run, then the ratios
#
# Environment: PEERS (default ../shared/peers), WINDOW_MS (default 2000), PYTRITON=1 to add Triton.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
peers=${PEERS:-$root/../shared/peers}
window=${WINDOW_MS:-2000}
work=$(mktemp -d /tmp/algolink-bench.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -- -"$p" 2>/dev/null || kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

venv=${BENCH_VENV:-$HOME/.cache/algolink-bench}
[[ -x $venv/bin/python ]] || { python3 -m venv "$venv" && "$venv/bin/pip" install -q numpy onnx; }
"$venv/bin/python" "$root/bench/models.py" "$work" >&2
cp "$root/tests/fixtures/iris_logreg.onnx" "$work/iris.onnx"

(cd "$root" && cargo build -q --release -p algolink-server -p algolink-bench)
bin=$root/target/release

serve() { # name port config
  printf '%s\n' "$3" >"$work/$1.toml"
  setsid "$bin/algolink" serve --config "$work/$1.toml" --data "$work/data-$1" --http "127.0.0.1:$2" >"$work/$1.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do curl -sf "127.0.0.1:$2/v2/health/ready" >/dev/null && return; sleep 0.1; done
  echo "algolink $1 did not start; see $work/$1.log" >&2; exit 1
}
push() { curl -sf --data-binary @"$3" "127.0.0.1:$1/v1/models/$2/versions" >/dev/null; }
load() { "$bin/algolink-bench" --url "http://127.0.0.1:$1" --model "$2" --request "$3" -c "$4" --window-ms "$window" --label "$5" "${@:6}"; }

serve batched 18000 ""
push 18000 iris "$work/iris.onnx"
push 18000 mlp "$work/mlp.onnx"
push 18000 wide "$work/wide.onnx"
serve unbatched 18001 $'[defaults]\nmax_batch_size = 1'
push 18001 mlp "$work/mlp.onnx"
push 18001 wide "$work/wide.onnx"
pids+=("$("$peers/start" fastapi-ort "$work/iris.onnx" iris 18002 | tail -n 1)")
if [[ ${PYTRITON:-0} == 1 ]]; then
  pids+=("$("$peers/start" pytriton "$work/iris.onnx" iris 18003 | tail -n 1)")
fi

{
  load 18000 iris "$work/iris.json" 16 algolink
  load 18002 iris "$work/iris.json" 16 fastapi-ort
  [[ ${PYTRITON:-0} == 1 ]] && load 18003 iris "$work/iris.json" 16 pytriton
  # binary tensors, as perf_analyzer sends them: the MLP's 256 inputs are not parsed from JSON
  for m in mlp wide; do
    load 18000 $m "$work/$m.json" 32 "$m-batched" --binary
    load 18001 $m "$work/$m.json" 32 "$m-unbatched" --binary
    curl -s 127.0.0.1:18000/v2/models/$m/stats | "$venv/bin/python" -c 'import json,sys; s=json.load(sys.stdin)["model_stats"][0]; print(json.dumps({"label":sys.argv[1],"mean_batch":s["inference_count"]/s["execution_count"]}))' "$m-batched"
  done
} | tee "$work/results.jsonl"

"$venv/bin/python" - "$work/results.jsonl" <<'PY'
import json, sys
runs = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    runs.setdefault(r["label"], {}).update(r)
a, f = runs["algolink"], runs["fastapi-ort"]
print(f"iris c=16: algolink {a['rps']:.0f} req/s p99 {a['p99_ms']:.2f} ms | fastapi-ort {f['rps']:.0f} req/s p99 {f['p99_ms']:.2f} ms"
      f" | ratio {a['rps'] / f['rps']:.2f}x")
if "pytriton" in runs:
    t = runs["pytriton"]
    print(f"iris c=16: pytriton {t['rps']:.0f} req/s p99 {t['p99_ms']:.2f} ms | algolink/pytriton {a['rps'] / t['rps']:.2f}x")
for m, dims in [("mlp", "256-1024-1024-10"), ("wide", "512-2048-2048-10")]:
    b, u = runs[m + "-batched"], runs[m + "-unbatched"]
    print(f"{m} {dims} c=32: batched {b['rps']:.0f} req/s p99 {b['p99_ms']:.1f} ms (mean batch {b['mean_batch']:.1f})"
          f" | unbatched {u['rps']:.0f} req/s p99 {u['p99_ms']:.1f} ms | ratio {b['rps'] / u['rps']:.2f}x")
PY
