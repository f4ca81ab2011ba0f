#!/usr/bin/env bash
# ferry serve under load against ferry's own batch bench, in one call on the GPU machine
# (issue 14's speed goal): the 7B shape streamed through --vram 2.6GiB, N concurrent
# streaming clients (bench/serve_bench.py), once with the prompt pieces a pass takes in at
# --prompt-chunk 128 (stop 19's measurement) and once at the default; then `ferry bench
# --batch 64`, whose decode pass time is the "one streamed pass" of the goal
# aggregate decode ≥ 0.85 × 64 / pass.
#
#   bench/serve_h200.sh SYNTH_DIR OUT_DIR     (SYNTH_DIR: ferry synth --arch qwen2 --preset qwen2.5-7b)
#
# Env: FERRY_BIN (default .gpu/ferry), CLIENTS (64), MAX_TOKENS (64), PROMPT_WORDS (16),
# CHUNKS ("128 default"), DEVICE_FLAGS ("--device cuda --vram 2.6GiB"; "--device cpu" to try
# the script on a fixture).
set -uo pipefail
cd "$(dirname "$0")/.."
SYNTH=$1
OUT=$2
mkdir -p "$OUT"
FERRY=${FERRY_BIN:-.gpu/ferry}
CLIENTS=${CLIENTS:-64}
MAX_TOKENS=${MAX_TOKENS:-64}
WORDS=${PROMPT_WORDS:-16}
PORT=18080
DEVICE=${DEVICE_FLAGS:---device cuda --vram 2.6GiB}
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}:/usr/local/cuda/lib64
card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '_')

for chunk in ${CHUNKS:-128 default}; do
    flags=(serve --model "$SYNTH" $DEVICE --max-batch "$CLIENTS" --context 256 --port "$PORT")
    [ "$chunk" = default ] || flags+=(--prompt-chunk "$chunk")
    "$FERRY" "${flags[@]}" > "$OUT/serve_$chunk.log" 2>&1 &
    pid=$!
    for _ in $(seq 1 240); do
        curl -sf "http://127.0.0.1:$PORT/health" > /dev/null 2>&1 && break
        kill -0 $pid 2>/dev/null || break
        sleep 1
    done
    grep "ferry serve:" "$OUT/serve_$chunk.log"
    python3 bench/serve_bench.py --url "http://127.0.0.1:$PORT" --clients "$CLIENTS" \
        --prompt-tokens "$WORDS" --max-tokens "$MAX_TOKENS" --card "$card" \
        --json "$OUT/serve_$chunk.json" > "$OUT/serve_bench_$chunk.log" 2>&1
    tail -8 "$OUT/serve_bench_$chunk.log"
    curl -s "http://127.0.0.1:$PORT/metrics" > "$OUT/metrics_$chunk.txt"
    kill -TERM $pid
    wait $pid
    echo "-- server exit status $?"
done

# The batch bench at the same shape: 64 sequences decoding at about the served context.
"$FERRY" bench --model "$SYNTH" $DEVICE --prompt-tokens 64 --batch 1,"$CLIENTS" \
    --decode-tokens 32 --runs 3 --json > "$OUT/bench_batch.json" 2> "$OUT/bench_batch.log"
grep -E "^\|" "$OUT/bench_batch.log" | tail -4

python3 - "$OUT" "$CLIENTS" <<'EOF'
import json, sys, glob, os
out, clients = sys.argv[1], int(sys.argv[2])
bench = json.load(open(os.path.join(out, "bench_batch.json")))
rows = bench if isinstance(bench, list) else bench.get("results", bench.get("rows", []))
decode = [r for r in rows if r.get("batch") == clients]
pass_s = clients / decode[0]["decode_tok_s"] if decode and decode[0].get("decode_tok_s") else float("nan")
print(f"\none streamed decode pass at batch {clients} (ferry bench): {pass_s:.4f} s → {clients / pass_s:.1f} tok/s")
print(f"{'prompt chunk':>14}{'wall s':>9}{'aggregate':>11}{'decode':>9}{'÷ bench':>9}{'TTFT p50':>10}{'p90':>8}{'ITL p50':>9}{'p99':>8}")
for f in sorted(glob.glob(os.path.join(out, "serve_*.json"))):
    r = json.load(open(f))
    name = os.path.basename(f)[6:-5]
    print(f"{name:>14}{r['wall_s']:>9.2f}{r['aggregate_tok_s']:>11.1f}{r['decode_tok_s']:>9.1f}"
          f"{r['aggregate_tok_s'] * pass_s / clients:>9.3f}{r['ttft_s']['p50']:>10.3f}{r['ttft_s']['p90']:>8.3f}"
          f"{r['itl_s']['p50']:>9.4f}{r['itl_s']['p99']:>8.4f}")
EOF
