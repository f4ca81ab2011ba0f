#!/usr/bin/env bash
# Every GPU check, in one command, on a machine with an NVIDIA GPU and no Rust toolchain:
#   1. the CUDA test suites (tests/cuda.rs, tests/cuda_batch.rs) against the CPU reference;
#   2. `ferry run --device cuda` on a fixture, and the one-line error for a missing device;
#      `ferry bench --vram --timeline` on a fixture (an SVG is written);
#   3. streaming (tests/cuda_stream.rs: streamed = resident bit for bit at several budgets,
#      and host memory through the pinned staging ring = registered, bit for bit);
#   4. a Qwen2.5-7B-shaped random checkpoint (ferry synth): ferry's CUDA logits against
#      transformers bf16, streamed bit-identity, `ferry bench-cuda --vram` over prompt lengths ×
#      budgets, `ferry bench --vram --timeline` (copies drawn) (SKIP_RESIDENT_BENCH=1 stops
#      there), then `ferry bench-cuda` and transformers eager timed on it.
#
# Binaries come prebuilt (the GPU machine has no cargo): build them with
#   scripts/gpu_checks.sh --build      (puts stripped binaries in .gpu/, which git ignores:
#                                       carry it to the GPU machine, e.g. the device tool's carry)
# and run there with
#   scripts/gpu_checks.sh [OUT_DIR]    (logs and JSON under OUT_DIR, default ./gpu-out)
# Prompt attention v1 against v2 (bit-identity, then timing) runs apart: bench/attention_h200.sh.
# Set SKIP_DIT=1 to leave out the Z-Image DiT benchmarks (DIT_BUDGETS, DIT_BATCH choose them),
# SKIP_7B=1 to leave out step 3 (it writes 15 GB to $SYNTH_DIR, default /tmp), or
# SKIP_TRANSFORMERS=1 to time ferry alone.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--build" ]; then
    set -e
    cargo build --release --bins --tests
    mkdir -p .gpu
    test_bin=$(cargo test --release --test cuda --no-run --message-format=json 2>/dev/null \
        | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)
    strip -o .gpu/ferry target/release/ferry
    strip -o .gpu/cuda-tests "$test_bin"
    batch_bin=$(cargo test --release --test cuda_batch --no-run --message-format=json 2>/dev/null \
        | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)
    strip -o .gpu/cuda-batch-tests "$batch_bin"
    stream_bin=$(cargo test --release --test cuda_stream --no-run --message-format=json 2>/dev/null \
        | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)
    strip -o .gpu/cuda-stream-tests "$stream_bin"
    zimage_bin=$(cargo test --release --test cuda_z_image --no-run --message-format=json 2>/dev/null \
        | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)
    strip -o .gpu/cuda-z-image-tests "$zimage_bin"
    qwen_bin=$(cargo test --release --test cuda_qwen_image --no-run --message-format=json 2>/dev/null \
        | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)
    strip -o .gpu/cuda-qwen-image-tests "$qwen_bin"
    flux_bin=$(cargo test --release --test cuda_flux --no-run --message-format=json 2>/dev/null \
        | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)
    strip -o .gpu/cuda-flux-tests "$flux_bin"
    qvae_bin=$(cargo test --release --test cuda_qwen_image_vae --no-run --message-format=json 2>/dev/null \
        | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)
    strip -o .gpu/cuda-qwen-image-vae-tests "$qvae_bin"
    flux_text_bin=$(cargo test --release --test cuda_flux_text_encoder --no-run --message-format=json 2>/dev/null \
        | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)
    strip -o .gpu/cuda-flux-text-encoder-tests "$flux_text_bin"
    smol_bin=$(cargo test --release --test cuda_smollm2 --no-run --message-format=json 2>/dev/null \
        | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)
    strip -o .gpu/cuda-smollm2-tests "$smol_bin"
    attention_bin=$(cargo test --release --test cuda_attention --no-run --message-format=json 2>/dev/null \
        | sed -n 's/.*"executable":"\([^"]*\/cuda_attention-[^"]*\)".*/\1/p' | tail -1)
    strip -o .gpu/cuda-attention-tests "$attention_bin"
    cargo build --release --example attention_bench
    strip -o .gpu/attention-bench target/release/examples/attention_bench
    cp scripts/gpu_checks.sh bench/transformers_bench.py .gpu/
    pwd > .gpu/built_in  # the test binary finds fixtures under this path
    ls -la .gpu
    exit 0
fi

OUT=${1:-gpu-out}
mkdir -p "$OUT"
BIN=${BIN:-.gpu}
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}:/usr/local/cuda/lib64
export FERRY_BIN=$BIN/ferry
built_in=$(cat "$BIN/built_in" 2>/dev/null || true)
if [ -n "$built_in" ] && [ ! -d "$built_in/tests/fixtures" ]; then
    mkdir -p "$(dirname "$built_in")" && ln -sfn "$PWD" "$built_in"
fi
status=0
step() { echo; echo "== $*"; }

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,temperature.gpu --format=csv 2>&1 | tee "$OUT/device.txt"

step "CUDA test suite (tests/cuda.rs)"
timeout 300 "$BIN/cuda-tests" --test-threads 1 2>&1 | tee "$OUT/tests.log" || status=1

step "batched passes on the GPU (tests/cuda_batch.rs)"
timeout 120 "$BIN/cuda-batch-tests" --test-threads 1 --nocapture 2>&1 | tee "$OUT/batch_tests.log" || status=1

step "streaming: streamed = resident bit for bit on every fixture, too-small budget, staged = registered host memory (tests/cuda_stream.rs)"
timeout 240 "$BIN/cuda-stream-tests" --test-threads 1 --nocapture 2>&1 | tee "$OUT/stream_tests.log" || status=1

step "Z-Image on the GPU: DiT bf16 vs diffusers, streamed = resident, ferry image streamed = resident, VAE peak memory estimate and tiles within the budget (tests/cuda_z_image.rs)"
timeout 600 "$BIN/cuda-z-image-tests" --test-threads 1 --nocapture 2>&1 | tee "$OUT/z_image_tests.log" || status=1

step "the Qwen-Image DiT on the GPU: bf16 vs diffusers on the masked batch, streamed = resident (tests/cuda_qwen_image.rs)"
timeout 600 "$BIN/cuda-qwen-image-tests" --test-threads 1 --nocapture 2>&1 | tee "$OUT/qwen_image_tests.log" || status=1
step "the Flux DiT on the GPU: bf16 vs diffusers on the batch, streamed = resident, precomputed modulation = computed (tests/cuda_flux.rs)"
timeout 600 "$BIN/cuda-flux-tests" --test-threads 1 --nocapture 2>&1 | tee "$OUT/flux_tests.log" || status=1
step "the Qwen-Image VAE decoder on the GPU against diffusers and the CPU (tests/cuda_qwen_image_vae.rs)"
timeout 300 "$BIN/cuda-qwen-image-vae-tests" --test-threads 1 --nocapture 2>&1 | tee "$OUT/qwen_image_vae_tests.log" || status=1
step "Flux.1's text encoders (T5, CLIP) on the GPU: bf16 vs transformers, ops vs the CPU, T5 streamed = resident (tests/cuda_flux_text_encoder.rs)"
timeout 300 "$BIN/cuda-flux-text-encoder-tests" --test-threads 1 --nocapture 2>&1 | tee "$OUT/flux_text_encoder_tests.log" || status=1

step "SmolLM2 GGUF on the GPU vs the CPU (tests/cuda_smollm2.rs; FERRY_SMOLLM2=FILE, skips without it)"
timeout 300 "$BIN/cuda-smollm2-tests" --nocapture 2>&1 | tee "$OUT/smollm2.log" || status=1

step "ferry run --device cuda"
"$BIN/ferry" run -m tests/fixtures/qwen2 -p "hello world" --max-tokens 16 --device cuda 2>&1 | tee "$OUT/run.log" || status=1
"$BIN/ferry" run -m tests/fixtures/qwen2 -p "hello world" --max-tokens 16 --device cuda --vram 260MiB --stats 2>&1 | tee -a "$OUT/run.log" || status=1
"$BIN/ferry" run -m tests/fixtures/qwen2 -p "hello world" --max-tokens 16 --device cuda --vram 260MiB --stats --host-memory staged 2>&1 | tee -a "$OUT/run.log" || status=1
"$BIN/ferry" run -m tests/fixtures/qwen2 -p "hello world" --max-tokens 16 --device cuda:7 2>&1 | tee -a "$OUT/run.log"
[ "${PIPESTATUS[0]}" -ne 0 ] || { echo "cuda:7 should fail"; status=1; }

step "ferry bench --vram --timeline on a fixture"
rm -f "$OUT/bench_timeline_fixture.svg"
"$BIN/ferry" bench -m tests/fixtures/qwen2 --device cuda --vram 260MiB --prompt-tokens 4,16 --batch 1,3 --decode-tokens 4 \
    --runs 2 --timeline "$OUT/bench_timeline_fixture.svg" 2>&1 | tee "$OUT/bench_timeline.log" || status=1
grep -q "prompt pass of 3 × 16 tokens" "$OUT/bench_timeline_fixture.svg" || { echo "no timeline drawn"; status=1; }

if [ -z "${SKIP_DIT:-}" ]; then
    step "Z-Image-Turbo DiT (real shape, random bf16 weights in memory): one step at 1024x1024, 100 caption tokens"
    for vram in ${DIT_BUDGETS:-none 3GiB 8GiB}; do
        echo "-- --vram $vram"
        flags=(--synthetic z-image-turbo --device cuda --batch "${DIT_BATCH:-1,4}" --runs 5 --json)
        [ "$vram" = none ] || flags+=(--vram "$vram")
        [ "$vram" = 3GiB ] && flags+=(--timeline "$OUT/dit_timeline_3GiB.svg")
        timeout 300 "$BIN/ferry" bench "${flags[@]}" > "$OUT/dit_$vram.json" 2> "$OUT/dit_$vram.log" || { status=1; tail -5 "$OUT/dit_$vram.log"; }
        cat "$OUT/dit_$vram.json"
    done
    # Batch 1 alone, compressed and not, side by side: with --batch 1,4 the plan is made for
    # batch 4's compute-bound pass, where auto keeps the weights uncompressed.
    for c in on off; do
        echo "-- --vram 3GiB --batch 1 --compress $c"
        timeout 300 "$BIN/ferry" bench --synthetic z-image-turbo --device cuda --batch 1 --runs 5 --json --vram 3GiB --compress "$c" \
            --timeline "$OUT/dit_timeline_3GiB_b1_$c.svg" > "$OUT/dit_3GiB_$c.json" 2> "$OUT/dit_3GiB_$c.log" || { status=1; tail -5 "$OUT/dit_3GiB_$c.log"; }
        cat "$OUT/dit_3GiB_$c.json"
    done
fi

if [ -z "${SKIP_7B:-}" ]; then
    SYNTH=${SYNTH_DIR:-/tmp}/ferry-qwen2.5-7b
    step "synth qwen2.5-7b → $SYNTH"
    [ -f "$SYNTH/config.json" ] || timeout 300 "$BIN/ferry" synth --arch qwen2 --preset qwen2.5-7b --out "$SYNTH" 2>&1 | tail -3
    step "streaming on the 7B-shaped model: bit-identity at several budgets"
    FERRY_STREAM_7B="$SYNTH" timeout 400 "$BIN/cuda-stream-tests" qwen7b --nocapture 2>&1 | tee "$OUT/stream_7b.log" || status=1
    step "streaming: 4096-token prompt pass at --vram 2.6GiB, then the grid (tokens × budgets)"
    timeout 120 "$BIN/ferry" bench-cuda --model "$SYNTH" --vram 2.6GiB --prompt-tokens 4096 --runs 5 \
        --json "$OUT/stream_4096_2.6GiB.json" 2>&1 | tee "$OUT/stream_bench.log" || status=1
    step "compression (--compress off vs on): the 4096-token pass and batch-1 decode at --vram 2.6GiB, side by side"
    for c in off on; do
        timeout 300 "$BIN/ferry" bench --model "$SYNTH" --device cuda --vram 2.6GiB --prompt-tokens 4096 --batch 1 \
            --decode-tokens 32 --runs 3 --compress "$c" --json > "$OUT/compress_$c.json" 2> "$OUT/compress_$c.log" || status=1
        grep -E "^\|" "$OUT/compress_$c.log" | tail -4
    done
    GGUF=${SYNTH_DIR:-/tmp}/ferry-qwen2.5-7b-q4_k_m.gguf
    step "GGUF blocks streamed as stored: a Q4_K_M file of the same shape vs the bf16 checkpoint, 512-token pass at --vram 2.6GiB"
    [ -f "$GGUF" ] || timeout 300 "$BIN/ferry" synth --arch qwen2 --preset qwen2.5-7b --gguf Q4_K_M --out "$GGUF" 2>&1 | tail -2
    for run in "$SYNTH off" "$SYNTH on" "$GGUF auto"; do
        set -- $run
        name="gguf_$(basename "$1")_$2"
        timeout 300 "$BIN/ferry" bench --model "$1" --device cuda --vram 2.6GiB --prompt-tokens 512 --batch 1 \
            --decode-tokens 8 --runs 3 --compress "$2" --json > "$OUT/$name.json" 2> "$OUT/$name.log" || { status=1; tail -3 "$OUT/$name.log"; }
        echo "-- $1 --compress $2: $(cat "$OUT/$name.json")"
    done
    step "streaming through the pinned staging ring: the same pass with --host-memory staged"
    timeout 120 "$BIN/ferry" bench-cuda --model "$SYNTH" --vram 2.6GiB --prompt-tokens 4096 --runs 5 --host-memory staged \
        --json "$OUT/stream_4096_2.6GiB_staged.json" 2>&1 | tee "$OUT/stream_bench_staged.log" || status=1
    for tokens in ${STREAM_TOKENS:-512 4096 16384}; do
        for vram in ${STREAM_BUDGETS:-2.6GiB 6GiB 12GiB}; do
            echo "-- $tokens tokens, --vram $vram"
            rm -f "$OUT/cell.json"
            timeout 120 "$BIN/ferry" bench-cuda --model "$SYNTH" --vram "$vram" --prompt-tokens "$tokens" --runs 3 \
                --json "$OUT/cell.json" 2>&1 | grep -E "^\| |error" | tee -a "$OUT/stream_grid.log"
            [ -f "$OUT/cell.json" ] && cat "$OUT/cell.json" >> "$OUT/stream_grid.jsonl" && rm "$OUT/cell.json"
        done
    done
    step "ferry bench --vram 2.6GiB --timeline: the largest point's prompt pass drawn, copies included"
    rm -f "$OUT/bench_timeline_7b.svg"
    timeout 300 "$BIN/ferry" bench --model "$SYNTH" --device cuda --vram 2.6GiB --prompt-tokens 512,2048 --batch 1,2 \
        --decode-tokens 4 --runs 2 --timeline "$OUT/bench_timeline_7b.svg" 2>&1 | tee -a "$OUT/bench_timeline.log" || status=1
    grep -q 'class="ev copy' "$OUT/bench_timeline_7b.svg" || { echo "no copies drawn"; status=1; }
    [ -n "${SKIP_RESIDENT_BENCH:-}" ] && { echo; echo "gpu_checks: $([ $status -eq 0 ] && echo PASSED || echo FAILED) (resident bench skipped)"; exit $status; }
    step "ferry bench-cuda"
    timeout 300 "$BIN/ferry" bench-cuda --model "$SYNTH" --json "$OUT/ferry_bench.json" 2>&1 | tee "$OUT/bench.log" || status=1
    step "ferry bench-cuda, decode through cuBLASLt instead of gemv (for comparison)"
    FERRY_CUDA_NO_GEMV=1 timeout 300 "$BIN/ferry" bench-cuda --model "$SYNTH" --runs 3 --prompt-tokens 512 2>&1 | tail -4 | tee "$OUT/bench_no_gemv.log"
    if [ -n "${SKIP_TRANSFORMERS:-}" ]; then echo; echo "gpu_checks: $status (transformers skipped)"; exit $status; fi
    step "transformers eager on the same checkpoint (and reference logits)"
    PYTHONUNBUFFERED=1 timeout 400 python3 "$BIN/transformers_bench.py" "$SYNTH" --reference "$OUT/reference.json" 2>&1 \
        | tee "$OUT/transformers.log" || status=1
    step "ferry CUDA vs transformers logits"
    FERRY_TRANSFORMERS_REFERENCE="$OUT/reference.json" timeout 200 "$BIN/cuda-tests" transformers_reference 2>&1 \
        | tee "$OUT/reference.log" || status=1
fi
echo
echo "gpu_checks: $([ $status -eq 0 ] && echo PASSED || echo FAILED)"
exit $status
