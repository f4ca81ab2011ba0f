#!/usr/bin/env bash
# Whole Qwen-Image generations on a GPU from the synthetic real-shaped pipeline (ferry synth
# --preset qwen-image-pipeline: 52.5 GiB written to $SYNTH_DIR, default /tmp): 1024×1024 at
# each budget of BUDGETS, unguided and guided (true CFG with a negative prompt, both branches in
# one pass), STEPS steps; each phase's seconds from `ferry image --json`, last a table.
# FLAGS: more ferry image flags for every run (e.g. --compress off).
# Run where the binaries are (BIN, default .gpu); logs and JSON under OUT_DIR (default ./gpu-out).
set -uo pipefail
OUT=${1:-gpu-out}
mkdir -p "$OUT"
BIN=${BIN:-.gpu}
SYNTH=${SYNTH_DIR:-/tmp}/ferry-qwen-image
STEPS=${STEPS:-8}
[ -f "$SYNTH/model_index.json" ] || { /usr/bin/time -f "synth %e s" "$BIN/ferry" synth --preset qwen-image-pipeline --out "$SYNTH" 2>&1 | tail -3; }
# Warm the page cache (a user's second run): read every file once.
cat "$SYNTH"/*/*.safetensors > /dev/null
# The first run encodes what streams (--compress auto) and keeps the encodings for the next
# loads; it is timed apart ("cold").
"$BIN/ferry" image --model "$SYNTH" --device cuda --vram 3GiB --size 1024x1024 --steps 1 --seed 1 \
    --prompt "a lighthouse on a cliff at night" --out "$OUT/cold.png" ${FLAGS:-} --json > "$OUT/q-cold-3GiB.json" 2> "$OUT/cold.log"
echo "cold rc=$?"; grep -E "encodings cache" "$OUT/cold.log" | sort | uniq -c | sort -rn | head -3
for vram in ${BUDGETS:-3GiB 24GiB}; do
    for guided in no yes; do
        neg=(); [ "$guided" = yes ] && neg=(--negative-prompt "blurry, low quality")
        "$BIN/ferry" image --model "$SYNTH" --device cuda --vram "$vram" --size 1024x1024 \
            --steps "$STEPS" --seed 1 --prompt "a lighthouse on a cliff at night" "${neg[@]}" ${FLAGS:-} \
            --out "$OUT/q-$vram-$guided.png" --stats --json \
            > "$OUT/q-$vram-$guided.json" 2> "$OUT/q-$vram-$guided.log"
        echo "rc=$? vram=$vram guided=$guided"; tail -4 "$OUT/q-$vram-$guided.log"
    done
done
python3 - "$OUT" <<'PY'
import json, sys, glob, os
rows = []
for f in sorted(glob.glob(os.path.join(sys.argv[1], "q-*.json"))):
    try:
        j = json.load(open(f))
    except Exception as e:
        print(f, "unreadable", e); continue
    s = j["seconds"]; total = sum(s.values())
    first = s["load"] + s["text_encoder"]
    rows.append((os.path.basename(f)[2:-5], s["load"], s["text_encoder"], s["denoise"], s["denoise"] / j["steps"], s["vae"], total, j["vae"]["tiling"]))
print("| run | load s | text encoder s | steps s (modulation incl.) | a step s | VAE s | total s | VAE tiling |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    print("| %s | %.2f | %.2f | %.2f | %.3f | %.2f | %.2f | %s |" % r)
PY
