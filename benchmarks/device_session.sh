#!/usr/bin/env bash
# The device calls that refresh every pattern's measurements, in two parts (each fits a 10-minute call;
# run them back to back so the second finds the machine warm):
#   bash benchmarks/device_session.sh 1   every GPU test, then rms_norm, add_rms_norm and softmax
#   bash benchmarks/device_session.sh 2   layer_norm, swiglu and cross_entropy
# Each benchmark tunes its headline shape with ak-tune first (a short budget: the race against Inductor
# decides whether the cache serves our kernel), then times eager, Inductor, Liger and autokernel, with
# GPU time (CUDA-graph replay) beside the host-inclusive time. Results land in $OUT (copy the .json/.md
# into benchmarks/results/). Run from the repo root on the device machine, with .whl carried.
set -u
source benchmarks/device_setup.sh || exit 1
out=${OUT:-/tmp/ak-out}
mkdir -p "$out"
export AUTOKERNEL_CACHE_DIR=/tmp/akc
bench() {  # pattern shape
  timeout 200 python3 benchmarks/bench_patterns.py --patterns "$1" --shapes "$2" --impls eager,inductor,liger,autokernel \
    --tune --tune-budget "${TUNE_MIN:-0.4}" --out "$out" 2>&1 | grep -E "^\| $2|miss:|error" | head -8
}
case "${1:-}" in
1)
  timeout 200 python3 -m pytest tests -m gpu -q -p no:cacheprovider -rf 2>&1 | tail -30 > "$out/gpu_tests.log"
  grep -E "passed|failed|FAILED|ERROR" "$out/gpu_tests.log" | head -20
  bench rms_norm 8192x8192
  bench add_rms_norm 8192x4096
  bench softmax 8192x8192
  ;;
2)
  bench layer_norm 8192x4096
  bench swiglu 8192x14336
  bench cross_entropy 8192x128256
  ;;
*)
  echo "usage: bash benchmarks/device_session.sh 1|2" >&2
  exit 2
  ;;
esac
