#!/usr/bin/env bash
# Side by side, in one run on this machine: AlgoLink against the peers our users would otherwise
# pick (../shared/peers: FastAPI + ONNX Runtime, and Triton's dynamic batcher through PyTriton), on
# the same models, with ratios from this run only (#4's acceptance 1, 2, 3 and 5):
#
# 1. iris logistic regression (JSON), concurrency 16: req/s and p99 against the best peer.
# 2. MLPs 256-1024-1024-10 and 512-2048-2048-10 (binary tensors): batched against unbatched at
#    concurrency 32, and served throughput at saturation against the engine's best offline rate:
#    one-row requests (static and adaptive batching), and 16-row ones as `perf_analyzer -b 16`
#    sends (adaptive; concurrency 8 and 16, i.e. two and four full batches in flight), these in
#    three rounds alternating with offline runs at the best batch sizes. Offline counts the CPU
#    pair's two lanes where the engine has them (see bench/src/bin/offline.rs).
# 3. all-MiniLM-L6-v2, 64 short sentences in turn, concurrency 16: AlgoLink takes strings and
#    tokenises; the peers get token ids. AlgoLink on candle (the safetensors directory) and on
#    ONNX Runtime (`onnx_backend = "ort"`, the peers' own engine); each peer with 1 and 2 ONNX
#    Runtime threads, the better counted. Embeddings are checked against sentence-transformers.
# 4. The MLP 256-1024-1024-10 at batch 128, offline: tract against ONNX Runtime.
#
#   bench/compare.sh            # JSON lines per run, then the ratios
#
# Environment: PEERS (default ../shared/peers), WINDOW_MS (default 2000), MINILM=0 skips part 3
# (it needs torch for the peers' ONNX export: TEXT_VENV, default ~/.cache/algolink-fixtures).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
peers=${PEERS:-$root/../shared/peers}
window=${WINDOW_MS:-2000}
work=$(mktemp -d /tmp/algolink-bench.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -- -"$p" 2>/dev/null || kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
export RUST_BACKTRACE=0

source "$root/bench/setup.sh"
bench_venv
"$venv/bin/python" "$root/bench/models.py" "$work" >&2
cp "$root/tests/fixtures/iris_logreg.onnx" "$work/iris.onnx"
build_release

serve() { # name port config
  printf '%s\n' "$3" >"$work/$1.toml"
  setsid "$bin/algolink" serve --config "$work/$1.toml" --data "$work/data-$1" --http "127.0.0.1:$2" >"$work/$1.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do curl -sf "127.0.0.1:$2/v2/health/ready" >/dev/null && return; sleep 0.1; done
  echo "algolink $1 did not start; see $work/$1.log" >&2; exit 1
}
push() { curl -sf --data-binary @"$3" "127.0.0.1:$1/v1/models/$2/versions" >/dev/null; }
load() { "$bin/algolink-bench" --url "http://127.0.0.1:$1" --model "$2" --request "$3" -c "$4" --window-ms "$window" --label "$5" "${@:6}"; }
peer() { # kind model name port [env...]: starts a peer and waits until its model is ready
  local pid
  pid=$(env "${@:5}" "$peers/start" "$1" "$2" "$3" "$4" | tail -n 1) || { echo "peer $1 failed to start" >&2; exit 1; }
  for _ in $(seq 120); do curl -sf "127.0.0.1:$4/v2/models/$3/ready" >/dev/null && break; sleep 0.5; done
  echo "$pid"
}
stop() { kill -- -"$1" 2>/dev/null || true; sleep 1; }
mean_batch() { # port model label
  curl -s "127.0.0.1:$1/v2/models/$2/stats" | "$venv/bin/python" -c 'import json,sys; s=json.load(sys.stdin)["model_stats"][0]; print(json.dumps({"label":sys.argv[1],"mean_batch":s["inference_count"]/s["execution_count"]}))' "$3"
}
offline() { # model-file sizes label [env...]
  env "${@:4}" "$bin/offline" "$1" "$2" 2 | "$venv/bin/python" -c 'import json,sys
best = max((json.loads(l) for l in sys.stdin), key=lambda r: r["rows_per_s"])
print(json.dumps({"label": sys.argv[1], "best_batch": best["batch"], "rows_per_s": best["rows_per_s"]}))' "$3"
}

warm=$(seq -s, 1 64)
{
  # (piped into tee, this block is a subshell: the servers it starts are in its own `pids`)
  trap cleanup EXIT
  # 1. iris
  serve batched 18000 $'[models.iris]\nwarmup_batch_sizes = [1, 16]'
  push 18000 iris "$work/iris.onnx"
  load 18000 iris "$work/iris.json" 16 algolink
  # (each peer on its own ports: Triton takes a while to let go of them)
  port=18020
  for kind in fastapi-ort pytriton; do
    p=$(peer $kind "$work/iris.onnx" iris $port); load $port iris "$work/iris.json" 16 "$kind"; stop "$p"
    port=$((port + 3))
  done

  # 2. MLPs: batched (every size warmed up) against max_batch_size 1; saturation against offline,
  # with one-row requests (static and adaptive batching) and 16-row ones (adaptive)
  serve unbatched 18001 $'[defaults]\nmax_batch_size = 1'
  serve adaptive 18002 "$(printf '[defaults]\nmode = "adaptive"\nlatency_slo_ms = 100\nwarmup_batch_sizes = [%s]' "$warm")"
  for m in mlp wide; do
    push 18000 $m "$work/$m.onnx"
    push 18001 $m "$work/$m.onnx"
    push 18002 $m "$work/$m.onnx"
    load 18000 $m "$work/$m.json" 32 "$m-batched" --binary
    mean_batch 18000 $m "$m-batched"
    load 18001 $m "$work/$m.json" 32 "$m-unbatched" --binary
    load 18000 $m "$work/$m.json" 128 "$m-saturated" --binary
    load 18002 $m "$work/$m.json" 128 "$m-saturated-adaptive" --binary
    offline "$work/$m.onnx" 1,8,16,32,64 "$m-offline" | tee "$work/$m-offline.json"
    # Offline and served alternate at the best batch size: this host's speed drifts by 10-20%
    # within a minute, so a ratio of runs minutes apart says more about the drift than the server.
    best=$("$venv/bin/python" -c 'import json,sys; print(json.load(open(sys.argv[1]))["best_batch"])' "$work/$m-offline.json")
    # (the sweep's best and the two largest sizes: its pick among close sizes is itself noise)
    sizes=$(printf '%s\n' "$best" 32 64 | sort -nu | paste -sd, -)
    for round in 1 2 3; do
      offline "$work/$m.onnx" "$sizes" "$m-offline-r$round"
      load 18002 $m "$work/${m}16.json" 8,16 "$m-16rows-r$round" --binary
    done
  done

  # 4. tract against ONNX Runtime, MLP at batch 128 (both on every core)
  # (alternately, three rounds: one pair of runs seconds apart read 1.14x and, later, 1.44x)
  for round in 1 2 3; do
    offline "$work/mlp.onnx" 128 "mlp128-tract-r$round" LANES=1
    offline "$work/mlp.onnx" 128 "mlp128-ort-r$round" ONNX_BACKEND=ort
  done

  # 3. MiniLM
  if [[ ${MINILM:-1} == 1 ]]; then
    text_models "$work"
    serve text 18010 "$(printf '[models.minilm]\nwarmup_batch_sizes = [1, 2, 4, 8, 16]\n[models.minilm-ort]\nonnx_backend = "ort"\nwarmup_batch_sizes = [1, 2, 4, 8, 16]')"
    push 18010 minilm "$work/minilm.tar"
    push 18010 minilm-ort "$work/minilm-onnx.tar"
    "$tv/bin/python" "$root/bench/text_models.py" check http://127.0.0.1:18010 "$work"
    load 18010 minilm "$work/minilm-text.json" 16 minilm-algolink
    mean_batch 18010 minilm minilm-algolink
    load 18010 minilm-ort "$work/minilm-text.json" 16 minilm-algolink-ort
    mean_batch 18010 minilm-ort minilm-algolink-ort
    load 18010 minilm "$work/minilm-text.json" 64 minilm-algolink-saturated
    load 18010 minilm-ort "$work/minilm-text.json" 64 minilm-algolink-ort-saturated
    for kind in fastapi-ort pytriton; do
      for t in 1 2; do
        p=$(peer $kind "$work/minilm.onnx" minilm $port ORT_THREADS=$t)
        load $port minilm "$work/minilm-ids.json" 16 "minilm-$kind-ort$t"
        stop "$p"
        port=$((port + 3))
      done
    done
    offline "$work/minilm.tar" 1,4,8,16,32 minilm-offline
    offline "$work/minilm-onnx.tar" 1,4,8,16,32 minilm-ort-offline ONNX_BACKEND=ort
  fi
} | tee "$work/results.jsonl"

"$venv/bin/python" - "$work/results.jsonl" <<'PY'
import json, statistics, sys
runs, multi = {}, {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    runs.setdefault(r["label"], {}).update(r)
    if "concurrency" in r:
        multi.setdefault(r["label"], {})[r["concurrency"]] = r

def line(r):
    return f"{r['rps']:.0f} req/s, p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms"

a = runs["algolink"]
best = max(["fastapi-ort", "pytriton"], key=lambda k: runs[k]["rps"])
print(f"[1] iris c=16: algolink {line(a)} | best peer {best} {line(runs[best])} | ratio {a['rps'] / runs[best]['rps']:.2f}x")
for m, dims in [("mlp", "256-1024-1024-10"), ("wide", "512-2048-2048-10")]:
    b, u, s, sa, o = (runs[f"{m}-{k}"] for k in ["batched", "unbatched", "saturated", "saturated-adaptive", "offline"])
    print(f"[2] {m} {dims} c=32: batched {line(b)} (mean batch {b['mean_batch']:.1f}) | unbatched {line(u)}"
          f" | ratio {b['rps'] / u['rps']:.2f}x")
    print(f"[3] {m} offline best {o['rows_per_s']:.0f} rows/s (batch {o['best_batch']}) | served, one-row requests c=128:"
          f" static {s['rps']:.0f} req/s = {s['rps'] / o['rows_per_s']:.2f},"
          f" adaptive {sa['rps']:.0f} req/s = {sa['rps'] / o['rows_per_s']:.2f}")
    for c in [8, 16]:
        ratios = [16 * multi[f"{m}-16rows-r{r}"][c]["rps"] / runs[f"{m}-offline-r{r}"]["rows_per_s"] for r in (1, 2, 3)]
        print(f"[3] {m} 16-row requests, adaptive, c={c}, against the best offline rate in alternate windows:"
              f" median {statistics.median(ratios):.2f} (rounds {', '.join(f'{x:.2f}' for x in ratios)})")
ms = {k: [1e3 * 128 / runs[f"mlp128-{k}-r{r}"]["rows_per_s"] for r in (1, 2, 3)] for k in ("tract", "ort")}
ratios = [t / o for t, o in zip(ms["tract"], ms["ort"])]
print(f"[5] mlp batch 128 offline, 3 alternated rounds: tract {', '.join(f'{x:.2f}' for x in ms['tract'])} ms"
      f" | onnxruntime {', '.join(f'{x:.2f}' for x in ms['ort'])} ms"
      f" | tract/ort time median {statistics.median(ratios):.2f}x (rounds {', '.join(f'{x:.2f}' for x in ratios)})")
if "minilm-algolink" in runs:
    c = runs["minilm-vs-sentence-transformers"]
    print(f"[2] minilm vs sentence-transformers: lowest cosine {c['min_cosine']:.7f} over {c['sentences']} sentences")
    peers = {k: v for k, v in runs.items() if k.startswith("minilm-fastapi") or k.startswith("minilm-pytriton")}
    bp = max(peers, key=lambda k: peers[k]["rps"])
    for k in ["minilm-algolink", "minilm-algolink-ort"]:
        r = runs[k]
        print(f"[2] minilm c=16 {k}: {line(r)} (mean batch {r['mean_batch']:.1f}) | best peer {bp}: {line(peers[bp])}"
              f" | ratio {r['rps'] / peers[bp]['rps']:.2f}x, p99 {r['p99_ms'] / peers[bp]['p99_ms']:.2f}x")
    for k, off in [("minilm-algolink-saturated", "minilm-offline"), ("minilm-algolink-ort-saturated", "minilm-ort-offline")]:
        s, o = runs[k], runs[off]
        print(f"[3] {k} c=64 {s['rps']:.0f} req/s | offline best {o['rows_per_s']:.0f} rows/s (batch {o['best_batch']})"
              f" | ratio {s['rps'] / o['rows_per_s']:.2f}")
PY
