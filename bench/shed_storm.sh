#!/usr/bin/env bash
# Refusals that feed themselves in adaptive mode (README, after the admission paragraph):
# one server, all-MiniLM-L6-v2 from strings in adaptive mode, closed-loop clients (each sends its
# next request as soon as an answer, or a refusal, comes), short windows one after another. Per
# window: req/s, p99, refusals, how busy the model kept its instances (compute time over the
# window, from /metrics), and the planner's state (the admission correction
# `algolink_latency_prediction_ratio`, refusals so far, groups). Busy stays ~85-94% in and out of a
# storm: the refusals shrink the batches, not the time on the device.
#
# What it showed on the 2-core development VM (MODEL=minilm-ort, c=16, 100 ms objective): a few
# windows at ~330 req/s, p99 50-70 ms, no refusal; then a pause of the host lifts the correction
# to 3-4x and requests near the objective are refused. With refusals answered at once, each client
# asked again at once, the HTTP thread spent the cores on 4-13k refusals a window, answers landed
# later and the correction stayed high: 80-160 req/s answered. With refusals held while the work
# ahead runs (2026-12-07): 130-1160 refusals a window, 150-310 req/s answered, for as long as the
# correction remembered the pause (up to 30 s; the requests let in kept it up). With trials of a
# lower trust in the correction (2026-12-07, later): back to no refusal within 1-3 windows of a
# pause, 1.4k-5.5k refusals in 16 windows (3 runs). Static batching serves the same load at
# ~300 req/s, p99 ~80 ms, without a refusal.
#
#   bench/shed_storm.sh                 # MODEL=minilm-ort CONC=16 WINDOWS=12 SLO_MS=100
#
# Needs the text fixtures (TEXT_VENV, as bench/compare.sh) and, for minilm-ort, the bench venv's
# ONNX Runtime. Prints one line per window, then whether a storm came (exit status 0 either way).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
model=${MODEL:-minilm-ort}
conc=${CONC:-16}
windows=${WINDOWS:-12}
slo=${SLO_MS:-100}
port=${PORT:-18470}
work=$(mktemp -d /tmp/algolink-storm.XXXXXX)
pid=
cleanup() { [[ -n $pid ]] && kill -- -"$pid" 2>/dev/null || true; }
trap cleanup EXIT

source "$root/bench/setup.sh"
bench_venv
text_models "$work"
build_release

case $model in
  minilm-ort) file=$work/minilm-onnx.tar; backend='onnx_backend = "ort"' ;;
  minilm) file=$work/minilm.tar; backend= ;;
  *) echo "MODEL is minilm-ort or minilm" >&2; exit 2 ;;
esac
printf '[models.%s]\n%s\nwarmup_batch_sizes = [1, 2, 4, 8, 16]\nmode = "adaptive"\nlatency_slo_ms = %s\n' \
  "$model" "$backend" "$slo" >"$work/config.toml"
setsid "$bin/algolink" serve --config "$work/config.toml" --data "$work/data" --http "127.0.0.1:$port" >"$work/server.log" 2>&1 &
pid=$!
for _ in $(seq 100); do curl -sf "127.0.0.1:$port/v2/health/ready" >/dev/null && break; sleep 0.1; done
curl -sf --data-binary @"$file" "127.0.0.1:$port/v1/models/$model/versions" >/dev/null

compute() { curl -s "127.0.0.1:$port/metrics" | grep "^algolink_compute_duration_seconds_sum{model=\"$model\"" | awk '{print $2}'; }
storm=0
before=$(compute)
for w in $(seq "$windows"); do
  t0=$(date +%s.%N)
  r=$("$bin/algolink-bench" --url "http://127.0.0.1:$port" --model "$model" --request "$work/minilm-text.json" \
    -c "$conc" --window-ms 2000 --max-windows 1 --label "w$w")
  t1=$(date +%s.%N)
  state=$(curl -s "127.0.0.1:$port/metrics" | grep "model=\"$model\"" |
    grep -E '^algolink_(latency_prediction_ratio|shed_total|batch_groups)\{' |
    sed -E 's/^algolink_([a-z_]+)\{[^}]*\} /\1=/' | tr '\n' ' ')
  after=$(compute)
  # busy: the share of the window the model ran batches (summed over its instances).
  # (exit status 3: over 1000 refusals in the window)
  "$venv/bin/python" -c 'import json,sys; r=json.loads(sys.argv[1]); busy=(float(sys.argv[4])-float(sys.argv[3]))/(float(sys.argv[6])-float(sys.argv[5]))
print("%4s: %6.0f req/s answered, p99 %6.1f ms, %6d refused, busy %3.0f%% | %s" % (r["label"], r["rps"], r["p99_ms"], r["errors"], 100 * busy, sys.argv[2]))
sys.exit(3 if r["errors"] > 1000 else 0)' "$r" "$state" "$before" "$after" "$t0" "$t1" || storm=1
  before=$after
done
if ((storm)); then echo "storm: a window had over 1000 refusals"; else echo "no storm"; fi
