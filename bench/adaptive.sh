#!/usr/bin/env bash
# Adaptive batching against the static batcher, in one run on this machine (#4, acceptance 4):
# - concurrency 1: adaptive p50 against a batch-1 server (max_batch_size = 1);
# - saturation (concurrency 64): adaptive req/s against the best of a sweep of static
#   max_batch_size x max_queue_delay_us settings.
# Model: MODEL (default wide = MLP 512-2048-2048-10, compute-bound; or mlp = 256-1024-1024-10),
# binary tensors, one row per request.
#
#   bench/adaptive.sh          # JSON lines per run, then the ratios
#
# Environment: MODEL, WINDOW_MS (default 2000), SATURATION (default 64), SLO_MS (default 100).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
model=${MODEL:-wide}
window=${WINDOW_MS:-2000}
sat=${SATURATION:-64}
slo=${SLO_MS:-100}
work=$(mktemp -d /tmp/algolink-adaptive.XXXXXX)
pid=""
cleanup() { [[ -n $pid ]] && kill "$pid" 2>/dev/null || true; }
trap cleanup EXIT

venv=${BENCH_VENV:-$HOME/.cache/algolink-bench}
[[ -x $venv/bin/python ]] || { python3 -m venv "$venv" && "$venv/bin/pip" install -q numpy onnx; }
"$venv/bin/python" "$root/bench/models.py" "$work" >&2
(cd "$root" && cargo build -q --release -p algolink-server -p algolink-bench)
bin=$root/target/release

# Every batch size is warmed up at load: tract compiles one plan per batch size on first use
# (tens of ms each), which would otherwise be charged to whichever setting meets a size first.
warm="warmup_batch_sizes = [$(seq -s, 1 64)]"
# One server at a time, so that no idle server shares the two cores with the measured one.
run() { # label config concurrency
  cleanup
  printf '%s\n%s\n' "$2" "$warm" >"$work/$1.toml"
  rm -rf "$work/data-$1" # (a repeated label would restore the last run's version and add one)
  "$bin/algolink" serve --config "$work/$1.toml" --data "$work/data-$1" --http 127.0.0.1:18100 >"$work/$1.log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do curl -sf 127.0.0.1:18100/v2/health/ready >/dev/null && break; sleep 0.1; done
  curl -sf --data-binary @"$work/$model.onnx" "127.0.0.1:18100/v1/models/$model/versions" >/dev/null
  "$bin/algolink-bench" --url http://127.0.0.1:18100 --model "$model" --request "$work/$model.json" \
    -c "$3" --window-ms "$window" --label "$1" --binary
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
}

{
  trap cleanup EXIT # (a subshell, piped into tee: its own `pid`)
  run batch1 $'[defaults]\nmax_batch_size = 1' 1
  run adaptive-c1 "$(printf '[defaults]\nmode = "adaptive"\nlatency_slo_ms = %s\nmax_batch_size = 64' "$slo")" 1
  run adaptive-sat "$(printf '[defaults]\nmode = "adaptive"\nlatency_slo_ms = %s\nmax_batch_size = 64' "$slo")" "$sat"
  for mb in 8 32 64; do
    for delay in 0 500 2000; do
      run "static-$mb-$delay" "$(printf '[defaults]\nmax_batch_size = %s\nmax_queue_delay_us = %s' "$mb" "$delay")" "$sat"
    done
  done
} | tee "$work/results.jsonl"

# Runs vary by 10-30% here within minutes: the best static setting and adaptive mode run three
# times more, alternating, and the ratio is the median of the three pairs' own ratios (the sweep's
# runs, minutes apart, are only for choosing the setting).
best=$("$venv/bin/python" -c 'import json,sys
runs=[json.loads(l) for l in open(sys.argv[1])]
print(max((r for r in runs if r["label"].startswith("static-")), key=lambda r: r["rps"])["label"])' "$work/results.jsonl")
mb=$(cut -d- -f2 <<<"$best"); delay=$(cut -d- -f3 <<<"$best")
for i in 1 2 3; do
  run adaptive-sat "$(printf '[defaults]\nmode = "adaptive"\nlatency_slo_ms = %s\nmax_batch_size = 64' "$slo")" "$sat"
  run "$best" "$(printf '[defaults]\nmax_batch_size = %s\nmax_queue_delay_us = %s' "$mb" "$delay")" "$sat"
done | tee -a "$work/results.jsonl"

"$venv/bin/python" - "$work/results.jsonl" "$model" <<'PY'
import json, statistics, sys
runs, repeats = {}, {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    repeats.setdefault(r["label"], []).append(r)
static = {k: rs[0] for k, rs in repeats.items() if k.startswith("static-")}
best = max(static, key=lambda k: static[k]["rps"])
# The alternated pairs: the last three runs of adaptive mode and of the best static setting.
pairs = list(zip(repeats["adaptive-sat"][-3:], repeats[best][-3:]))
ratios = [a["rps"] / b["rps"] for a, b in pairs]
for label, rs in repeats.items():
    rs.sort(key=lambda r: r["rps"])
    runs[label] = rs[len(rs) // 2]  # the median run
b1, c1, sat = runs["batch1"], runs["adaptive-c1"], runs["adaptive-sat"]
print(f"{sys.argv[2]} c=1: adaptive p50 {c1['p50_ms']:.3f} ms vs batch-1 p50 {b1['p50_ms']:.3f} ms"
      f" | ratio {c1['p50_ms'] / b1['p50_ms']:.3f} (want <= 1.10)")
print(f"{sys.argv[2]} saturation, alternated pairs: adaptive " + ", ".join(f"{a['rps']:.0f}" for a, _ in pairs)
      + f" req/s vs best static {best} " + ", ".join(f"{b['rps']:.0f}" for _, b in pairs)
      + f" req/s | ratios {', '.join(f'{r:.3f}' for r in ratios)}, median {statistics.median(ratios):.3f} (want >= 0.95)"
      + f" | median p99 {sat['p99_ms']:.1f} ms vs {runs[best]['p99_ms']:.1f} ms")
print("the sweep (one run each):")
for k in sorted(static, key=lambda k: -static[k]["rps"]):
    print(f"  {k:<18} {static[k]['rps']:8.0f} req/s  p50 {static[k]['p50_ms']:6.2f} ms  p99 {static[k]['p99_ms']:6.2f} ms")
PY
