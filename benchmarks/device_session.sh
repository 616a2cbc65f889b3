#!/usr/bin/env bash
# The device calls that refresh everything RMSNorm's issue measures, in two parts (each fits a 10-minute call):
#   bash benchmarks/device_session.sh 1   GPU tests, then ak-tune for the 7 benchmark shapes; the cache is
#                                         written to $OUT/akc.tgz (copy it into .devcache/ and carry that)
#   bash benchmarks/device_session.sh 2   with .devcache/akc.tgz: host-cost profile, then the benchmark
#                                         (eager, Inductor, Liger, autokernel, and both with CUDA graphs)
# Run from the repo root on the device machine, with .whl (diskcache, liger-kernel) carried.
set -u
source benchmarks/device_setup.sh || exit 1
out=${OUT:-/tmp/ak-out}
mkdir -p "$out"
export AUTOKERNEL_CACHE_DIR=/tmp/akc
case "${1:-}" in
1)
  timeout 240 python3 -m pytest tests/test_gpu.py -m gpu -q -p no:cacheprovider -rf 2>&1 | tail -25 > "$out/gpu_tests.log"
  tail -8 "$out/gpu_tests.log"
  for s in 8192x8192 8192x4096 2048x1024 2048x4096 2048x8192 2048x16384 2048x32768; do
    ak-tune --pattern rms_norm --shape "$s" --dtype bf16 --budget 0.75 -q 2>&1 | grep -A1 "^pattern" | tail -1
  done | tee "$out/tune_summary.txt"
  tar czf "$out/akc.tgz" -C /tmp akc
  ;;
2)
  tar xzf .devcache/akc.tgz -C /tmp || exit 1
  timeout 150 python3 benchmarks/profile_rms_norm.py --shape 8192x8192 > "$out/profile.txt" 2>&1
  grep -E "latency" "$out/profile.txt"
  timeout 380 python3 benchmarks/bench_patterns.py --patterns rms_norm \
    --impls eager,inductor,liger,autokernel,inductor-cudagraphs,autokernel-cudagraphs --out "$out" 2>&1 | tail -20
  ;;
*)
  echo "usage: bash benchmarks/device_session.sh 1|2" >&2
  exit 2
  ;;
esac
