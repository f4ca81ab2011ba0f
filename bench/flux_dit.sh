#!/usr/bin/env bash
# Flux.1-dev's DiT on a GPU, ferry against diffusers on the same synthetic checkpoint, side by
# side in one call: one denoising step at 1024×1024 with the pipeline's 512 T5 tokens.
#   part 1 (PART=1): the Flux CUDA tests, `ferry image` on the tiny Flux pipeline on the GPU
#     (resident and streamed), then `ferry bench --synthetic flux.1-dev` (weights made in
#     memory) resident and at each budget of BUDGETS (precomputed modulation, the default),
#     and at 3 GiB with the modulation in every step (like for like with diffusers);
#   part 2 (PART=2): the DiT written to $SYNTH_DIR (default /tmp) by `ferry synth --only
#     transformer` and `bench/dit_peers.py` on it: diffusers' block-level group offloading
#     and the whole DiT on the GPU (diffusers travels as wheels in .whl/, see dit_peers.py).
# Run where the binaries are (BIN, default .gpu); each run's log and JSON under $WORK (default
# /tmp/flux-work), gathered at the end into a few files under OUT_DIR (default ./gpu-out):
# flux_bench.jsonl, flux_bench.log, the tests' logs, the 3 GiB step's timeline.
set -uo pipefail
OUT=${1:-gpu-out}
W=${WORK:-/tmp/flux-work}
mkdir -p "$OUT" "$W"
BIN=${BIN:-.gpu}
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}:/usr/local/cuda/lib64
status=0
if [ "${PART:-1}" = 1 ]; then
    built_in=$(cat "$BIN/built_in" 2>/dev/null || true)
    if [ -n "$built_in" ] && [ ! -d "$built_in/tests/fixtures" ]; then
        mkdir -p "$(dirname "$built_in")" && ln -sfn "$PWD" "$built_in"
    fi
    for t in cuda-flux-tests cuda-flux-text-encoder-tests; do
        echo "== $t"
        timeout 300 "$BIN/$t" --test-threads 1 --nocapture > "$OUT/$t.log" 2>&1 || status=1
        grep -E "^test |relative|vs f32|result" "$OUT/$t.log" | tail -12
    done
    "$BIN/ferry" image --model tests/fixtures/flux-pipeline --device cuda --size 64x48 --steps 3 --seed 1 \
        --prompt "a red fox in the snow" --out "$W/tiny.png" --json > "$W/tiny.json" 2> "$W/tiny.log" \
        && echo "tiny pipeline on the GPU: $(cat "$W/tiny.json")" || { status=1; tail -3 "$W/tiny.log"; }
    for vram in none ${BUDGETS:-3GiB 12GiB}; do
        flags=(--synthetic flux.1-dev --device cuda --batch 1 --runs 5 --json)
        [ "$vram" = none ] || flags+=(--vram "$vram")
        [ "$vram" = 3GiB ] && flags+=(--timeline "$OUT/flux_timeline_3GiB.svg")
        timeout 300 "$BIN/ferry" bench "${flags[@]}" > "$W/flux_$vram.json" 2> "$W/flux_$vram.log" || { status=1; tail -5 "$W/flux_$vram.log"; }
        grep -E "^\|" "$W/flux_$vram.log" | tail -2
    done
    timeout 300 "$BIN/ferry" bench --synthetic flux.1-dev --device cuda --batch 1 --runs 5 --json --vram 3GiB \
        --modulation in-steps > "$W/flux_3GiB_in_steps.json" 2> "$W/flux_3GiB_in_steps.log" || status=1
    grep -E "^\|" "$W/flux_3GiB_in_steps.log" | tail -2
    cat "$W"/flux_*.json > "$OUT/flux_bench.jsonl"
    for f in "$W"/flux_*.log; do echo "== $f"; grep -v "^\[" "$f" | tail -12; done > "$OUT/flux_bench.log"
else
    SYNTH=${SYNTH_DIR:-/tmp}/ferry-flux
    [ -f "$SYNTH/model_index.json" ] || /usr/bin/time -f "synth %e s" "$BIN/ferry" synth --preset flux.1-dev --only transformer --out "$SYNTH" 2>&1 | tail -2
    python3 bench/dit_peers.py "$SYNTH" --systems "${SYSTEMS:-group-block,whole}" --caption-tokens 512 --runs 3 \
        --json "$OUT/flux_peers.json" 2>&1 | tail -12 || status=1
fi
echo "flux_dit part ${PART:-1}: $([ $status -eq 0 ] && echo PASSED || echo FAILED)"
exit $status
