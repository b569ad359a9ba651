#!/usr/bin/env bash
# Builds what bench/gpu/run.sh needs with the `cuda` feature (no GPU needed here: the recipe in
# ../shared/gpu/build-cuda; about 10 minutes cold on 2 cores) and packs it into bench/gpu/bin.tgz.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
shared=${SHARED:-$root/../shared}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target-cuda}
(cd "$root" && "$shared/gpu/build-cuda" --release -p algolink-server -p algolink-bench)
stage=$(mktemp -d)
mkdir "$stage/bin"
for b in algolink offline algolink-bench; do
  cp "$CARGO_TARGET_DIR/release/$b" "$stage/bin/"
  strip "$stage/bin/$b"
done
tar czf "$root/bench/gpu/bin.tgz" -C "$stage" bin
ls -la "$root/bench/gpu/bin.tgz"
