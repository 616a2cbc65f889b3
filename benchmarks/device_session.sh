#!/usr/bin/env bash
# The device calls that refresh the measurements (each fits a 10-minute call; run them back to back so
# the next finds the machine warm). Run from the repo root on the device machine, with .whl carried.
#   bash benchmarks/device_session.sh tests [FILES]   every GPU test (pytest -m gpu, 2 xdist workers on one GPU), or
#                                                those of FILES; on a GPU other than an H100, also the portability
#                                                run below
#   bash benchmarks/device_session.sh portability [BUNDLE]   serve a bundle tuned elsewhere (default
#                                                .akc-carry/h100.akc; carry .akc-carry) on this GPU, explain's verdict
#   bash benchmarks/device_session.sh patterns P1,P2   pattern benchmarks (headline shape, ak-tune first; SHAPES=a,b
#                                                other shapes, IMPLS= other impls, BENCH_TIMEOUT= seconds a pattern;
#                                                the default impls include Inductor max-autotune, as issue 3 asks;
#                                                its matmul autotuning at linear + CE's size was never timed alone)
#   bash benchmarks/device_session.sh e2e-tune MIN   ak-tune --model on the Llama step (a ~3-minute ranking, then
#                                                MIN minutes of tuning), then the step under autokernel alone
#   bash benchmarks/device_session.sh sweeps P   issue 3's TritonBench-like sweeps of P (softmax, cross_entropy or
#                                                rope): every size, tuned TUNE_MIN (0.2) minutes each first
#   bash benchmarks/device_session.sh e2e        the Llama step for every impl (IMPLS= others; inductor-max-autotune
#                                                alone in its call with a longer E2E_TIMEOUT: after two impls it
#                                                had not finished compiling when the default 440 s ran out)
#                                                with the cache as it is (carry
#                                                e2e-tune's cache.akc), then the cache exported, imported into a
#                                                fresh directory and served from there (portability); each
#                                                impl's GPU time by kernel category (bench_e2e --profile)
#   bash benchmarks/device_session.sh inference-tune MIN   ak-tune --model --inference (MIN minutes of tuning
#                                                after a ~4-minute ranking) of bench_inference's model, alone
#   bash benchmarks/device_session.sh inference PARTS   bench_inference's PARTS (decode and/or prefill, comma
#                                                list) with the cache as it is, the profiler's share of our
#                                                kernels in decode (decode alone takes ~7 minutes)
#   bash benchmarks/device_session.sh tuner MIN   ak-tune's search rate (candidates per minute) on RMSNorm
#                                                8192x4096 and softmax 8192x8192, MIN minutes each, cold
#   bash benchmarks/device_session.sh decode-kernels MIN   the kernels at decode shapes, each case tuned
#                                                forward-only for MIN minutes first
#   bash benchmarks/device_session.sh agent MIN  ak-tune --strategy both on RMSNorm 8192x4096 (MIN minutes of search),
#                                                its agent phase against a scripted Messages API server on
#                                                127.0.0.1; carry .whl-agent too (`pip download --only-binary=:all:
#                                                --python-version 3.12 --platform manylinux2014_x86_64 -d .whl-agent
#                                                anthropic`; git-excluded like .whl)
# Each pattern benchmark tunes its headline shape with ak-tune first (a short budget: the race against
# Inductor decides whether the cache serves our kernel), then times eager, Inductor, Liger and
# autokernel, with GPU time (CUDA-graph replay) beside the host-inclusive time. Results land in $OUT
# (copy the .json/.md into benchmarks/results/). A call brings back at most 8 files from $OUT, at most 2 folders
# down: a script chaining several modes (3-5 files each) must keep its total at 8.
# PATCHES="benchmarks/experiments/x.patch ..." applies those first (any mode), for a change not yet on main.
# FRESH=1 empties the cache directory first (a warm machine keeps the previous call's /tmp).
# A tuned cache outlives its machine: every mode ends with the cache exported to $OUT/cache.akc (and each tuning
# run's results.tsv in $OUT/runs.tgz), and a call that
# carries .akc-carry/ (git-excluded: `echo /.akc-carry/ >> .git/info/exclude`; copy the last call's cache.akc
# there, carry [".whl", ".akc-carry"]) imports it first, so one call can tune and the next measure.
set -u
source benchmarks/device_setup.sh || exit 1
# PATCHES="a.patch b.patch": apply these (in order) to the machine's copy first, to test or measure a change that is
# not on main (benchmarks/experiments/); the install is editable, so the patched code is what runs.
for patch in ${PATCHES:-}; do
  git apply "$patch" 2>/dev/null || patch -p1 --forward --quiet < "$patch" || { echo "could not apply $patch" >&2; exit 1; }
  echo "applied $patch"
done
out=${OUT:-/tmp/ak-out}
mkdir -p "$out"
export AUTOKERNEL_CACHE_DIR=/tmp/akc
# A warm machine keeps /tmp, so an earlier call's cache is still here: FRESH=1 starts from an empty one (carried
# bundles still imported), e.g. for an e2e-tune meant to fill it from nothing; the count below says what is there.
[ "${FRESH:-0}" = 1 ] && rm -rf "$AUTOKERNEL_CACHE_DIR"
for bundle in .akc-carry/*.akc; do
  [ -e "$bundle" ] && ak-cache import "$bundle"
done
echo "cache $AUTOKERNEL_CACHE_DIR: $(ak-cache list --json 2>/dev/null | wc -l) entries for this GPU before this call"
# Each tuning run's results.tsv comes back too (why a candidate failed its checks lives only there).
# One archive, not a file per run: a call brings back only so many files, and a warm machine's cache holds the
# runs of every earlier call (`tar xzf runs.tgz` gives runs/<run>.tsv).
save_runs() {
  ak-cache export -o "$out/cache.akc" >/dev/null
  local staged
  staged=$(mktemp -d)
  mkdir -p "$staged/runs"
  for tsv in "$AUTOKERNEL_CACHE_DIR"/*/runs/*/results.tsv; do
    [ -e "$tsv" ] && cp "$tsv" "$staged/runs/$(basename "$(dirname "$tsv")").tsv"
  done
  [ -n "$(ls "$staged/runs")" ] && tar czf "$out/runs.tgz" -C "$staged" runs
  rm -rf "$staged"
}
trap save_runs EXIT
# Every mode's whole output, as it is printed: a call killed at its limit still brings back what ran (the
# terminal shows only the tail of each step).
log="$out/${1:-session}.log"
declare -A SHAPE=([rms_norm]=8192x8192 [add_rms_norm]=8192x4096 [softmax]=8192x8192 [layer_norm]=8192x4096
                  [swiglu]=8192x14336 [cross_entropy]=8192x128256 [rope]=4x32x4096x128
                  [linear_cross_entropy]=8192x4096-\>128256)
# Issue 3's TritonBench-like sweeps: softmax M=4096 N=256..32768, cross-entropy BT=8192 V=32000..128256, RoPE head
# dim 64/128/256. One pattern's sweep, each case tuned briefly first, fits a 10-minute call (H100, session 21, with
# max-autotune beside: softmax 381 s, cross-entropy ~300 s, RoPE ~250 s).
declare -A SWEEP=([softmax]=4096x256,4096x1024,4096x4096,4096x8192,4096x16384,4096x32768
                  [cross_entropy]=8192x32000,8192x50257,8192x128256 [rope]=4x32x4096x64,4x32x4096x128,4x32x4096x256)
# bench_pattern P SHAPES TUNE_MIN TIMEOUT: P's cases (comma list), each tuned TUNE_MIN minutes first; the table's rows
bench_pattern() {
  timeout "$4" python3 benchmarks/bench_patterns.py --patterns "$1" --shapes "$2" \
    --impls "${IMPLS:-eager,inductor,inductor-max-autotune,liger,autokernel}" --tune --tune-budget "$3" --out "$out" 2>&1 \
    | tee -a "$log" | grep -E "^\| (${2//,/|}) |miss:|error|Error" | head -30
}
case "${1:-}" in
tests)
  # The whole GPU suite, or the test files named after the mode (e.g. a patch's own tests, on a short budget).
  targets=("${@:2}")
  [ $# -ge 2 ] || targets=(tests)
  timeout 500 python3 -m pytest "${targets[@]}" -m gpu -q -p no:cacheprovider -rf -n 2 2>&1 | tee "$log" \
    | tail -40 > "$out/gpu_tests.log"
  grep -E "passed|failed|FAILED|ERROR" "$out/gpu_tests.log" | head -30
  # Machines of another GPU model come rarely (none can be asked for to this end): serve the H100 bundle there.
  if ! nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H100 && [ -e .akc-carry/h100.akc ]; then
    timeout 60 python3 benchmarks/bundle_portability.py .akc-carry/h100.akc --out "$out" 2>&1 | tail -8
  fi
  ;;
portability)
  timeout 120 python3 benchmarks/bundle_portability.py "${2:-.akc-carry/h100.akc}" --out "$out" 2>&1 | tee -a "$log" | tail -12
  ;;
patterns)
  for p in ${2//,/ }; do
    bench_pattern "$p" "${SHAPES:-${SHAPE[$p]}}" "${TUNE_MIN:-0.4}" "${BENCH_TIMEOUT:-280}"
  done
  ;;
sweeps)
  for p in ${2//,/ }; do
    [ -n "${SWEEP[$p]:-}" ] || { echo "no sweep for $p; known: ${!SWEEP[*]}" >&2; exit 2; }
    bench_pattern "$p" "${SWEEP[$p]}" "${TUNE_MIN:-0.2}" "${BENCH_TIMEOUT:-540}"
  done
  ;;
e2e-tune)
  timeout 560 python3 benchmarks/bench_e2e.py --impls autokernel --tune "${2:-3}" --out "$out" 2>&1 | tee -a "$log" | tail -22
  ;;
e2e)
  timeout "${E2E_TIMEOUT:-440}" python3 benchmarks/bench_e2e.py ${IMPLS:+--impls "$IMPLS"} --memory --profile --out "$out" 2>&1 \
    | tee -a "$log" | tail -90
  # The bundle served from a fresh directory: only where autokernel was among the impls (a call of
  # IMPLS=inductor-max-autotune alone needs its whole time for that compile).
  if [[ -z "${IMPLS:-}" || ",$IMPLS," == *",autokernel,"* ]]; then
    ak-cache export -o "$out/llama-step.akc" && AUTOKERNEL_CACHE_DIR=/tmp/akc-imported ak-cache import "$out/llama-step.akc"
    timeout 100 python3 benchmarks/bench_e2e.py --impls autokernel --iters 3 --cache-dir /tmp/akc-imported \
      --out "$out/imported" 2>&1 | grep -E "^\| autokernel"
  fi
  ;;
inference-tune)
  timeout 560 python3 benchmarks/bench_inference.py --skip decode,prefill,kernels --tune "${2:-2}" --out "$out" 2>&1 \
    | tee -a "$log" | tail -40
  ;;
inference)
  skip=kernels
  for part in decode prefill; do
    [[ ",${2:-decode,prefill}," == *",$part,"* ]] || skip+=",$part"
  done
  timeout 560 python3 benchmarks/bench_inference.py --skip "$skip" --profile --out "$out" 2>&1 | tee -a "$log" | tail -40
  ;;
tuner)
  timeout 560 python3 benchmarks/bench_tuner.py --budget "${2:-1}" --exhaust --out "$out" 2>&1 | tee -a "$log" | tail -12
  ;;
decode-kernels)
  timeout 580 python3 benchmarks/bench_inference.py --skip decode,prefill --tune-kernels "${2:-0.2}" --out "$out" 2>&1 \
    | tee -a "$log" | tail -30
  ;;
agent)
  # The agent extra's wheels (anthropic and its dependencies, for the device's Python: see the header) in a
  # folder of their own, ahead of nothing the machine has: only this mode puts them on the path.
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-agent .whl-agent/*.whl || exit 1
  PYTHONPATH=$PYTHONPATH:/tmp/site-agent timeout 560 python3 benchmarks/bench_agent.py --budget "${2:-1}" \
    --out "$out" 2>&1 | tee -a "$log" | tail -16
  ;;
*)
  echo "usage: bash benchmarks/device_session.sh tests [FILES] | patterns P1,P2 | sweeps P | e2e-tune MIN | e2e |" \
       "inference-tune MIN |" \
       "inference decode,prefill | tuner MIN | decode-kernels MIN | agent MIN | portability [BUNDLE]" >&2
  exit 2
  ;;
esac
