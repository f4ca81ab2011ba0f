#!/usr/bin/env bash
# Prompt attention v1 against v2 (kernels/attention_prefill.cu) on a GPU machine without cargo:
#   bench/attention_h200.sh --build   here: builds .gpu/cuda-attention-tests (tests/cuda_attention.rs)
#                                     and .gpu/attention-bench (examples/attention_bench.rs), stripped
#   bench/attention_h200.sh [OUT]     there: v2 == v1 bit for bit, then the timing; logs under OUT
#                                     (default ./attention-out), the table printed last
# About a minute on an H100/H200: kernels compile at first use (NVRTC, ~10 s), the test runs
# Z-Image's and a 4096-token prompt's shapes once per variant, the timing 6 shapes × 2 × 15.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--build" ]; then
    set -e
    mkdir -p .gpu
    test_bin=$(cargo test --release --test cuda_attention --no-run --message-format=json 2>/dev/null \
        | sed -n 's/.*"executable":"\([^"]*\/cuda_attention-[^"]*\)".*/\1/p' | tail -1)
    strip -o .gpu/cuda-attention-tests "$test_bin"
    cargo build --release --example attention_bench
    strip -o .gpu/attention-bench target/release/examples/attention_bench
    ls -la .gpu/cuda-attention-tests .gpu/attention-bench
    exit 0
fi

OUT=${1:-attention-out}
mkdir -p "$OUT"
BIN=${BIN:-.gpu}
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}:/usr/local/cuda/lib64
status=0
step() { echo; echo "== $*"; }

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv 2>&1 | tee "$OUT/device.txt"

# FERRY_PTXAS_VERBOSE: the log keeps each kernel's registers and spills as built there.
step "v2 == v1 bit for bit (tests/cuda_attention.rs)"
FERRY_PTXAS_VERBOSE=1 timeout 150 "$BIN/cuda-attention-tests" --test-threads 1 --nocapture > "$OUT/attention_tests.log" 2>&1 || status=1
grep -E "differ|test result|panicked|SKIPPED" "$OUT/attention_tests.log"
grep -A3 "attn_.*_v[12]' for" "$OUT/attention_tests.log" | grep -E "entry|registers|spill" | head -16 > "$OUT/registers.txt"

if [ -x "$BIN/cuda-tests" ]; then
    step "v2 against the CPU reference (tests/cuda.rs attention, FERRY_ATTENTION=v2)"
    FERRY_ATTENTION=v2 timeout 120 "$BIN/cuda-tests" attention --test-threads 1 --nocapture > "$OUT/cuda_attention_cpu.log" 2>&1 || status=1
    grep -E "relative L2|test result|panicked" "$OUT/cuda_attention_cpu.log" | tail -8
fi

step "timing (examples/attention_bench.rs)"
timeout 240 "$BIN/attention-bench" --runs 15 > "$OUT/attention_bench.md" 2> "$OUT/attention_bench.log" || { status=1; tail -5 "$OUT/attention_bench.log"; }
grep '^{' "$OUT/attention_bench.md" > "$OUT/attention_bench.json"

echo
cat "$OUT/registers.txt"
echo
grep -v '^{' "$OUT/attention_bench.md"
echo
echo "attention_h200: $([ $status -eq 0 ] && echo PASSED || echo FAILED)"
exit $status
