#!/usr/bin/env bash
# One device call that refreshes everything RMSNorm's issue measures (about 8 minutes on an H100):
#   GPU tests, ak-tune for the benchmark shapes, the benchmark (with CUDA-graph rows), the host-cost profile.
# Usage on the device machine, from the repo root, with .whl (diskcache, liger-kernel) carried:
#   bash benchmarks/device_session.sh            # results under $OUT (or /tmp/ak-out)
set -u
source benchmarks/device_setup.sh || exit 1
out=${OUT:-/tmp/ak-out}
mkdir -p "$out"
export AUTOKERNEL_CACHE_DIR=${AUTOKERNEL_CACHE_DIR:-/tmp/akc}
timeout 240 python3 -m pytest tests/test_gpu.py -m gpu -q -p no:cacheprovider -rf 2>&1 | tail -25 > "$out/gpu_tests.log"
tail -8 "$out/gpu_tests.log"
shapes="8192x8192 8192x4096 2048x1024 2048x4096 2048x8192 2048x16384 2048x32768"
for s in $shapes; do
  ak-tune --pattern rms_norm --shape "$s" --dtype bf16 --budget 0.75 -q 2>&1 | grep -A1 "^pattern" | tail -1
done | tee "$out/tune_summary.txt"
timeout 120 python3 benchmarks/profile_rms_norm.py --shape 8192x8192 > "$out/profile.txt" 2>&1
grep -E "latency" "$out/profile.txt"
timeout 300 python3 benchmarks/bench_patterns.py --patterns rms_norm \
  --impls eager,inductor,liger,autokernel,inductor-cudagraphs,autokernel-cudagraphs --out "$out" 2>&1 | tail -20
tar czf "$out/akc.tgz" -C "$(dirname "$AUTOKERNEL_CACHE_DIR")" "$(basename "$AUTOKERNEL_CACHE_DIR")"
