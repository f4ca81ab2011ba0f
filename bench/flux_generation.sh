#!/usr/bin/env bash
# Whole Flux.1-dev generations on a GPU from the synthetic real-shaped pipeline (ferry synth
# --preset flux.1-dev-pipeline: about 31 GiB written to $SYNTH_DIR, default /tmp): 1024×1024 at
# each budget of BUDGETS, STEPS steps (default 28, the pipeline's) at the embedded guidance 3.5;
# each phase's seconds from `ferry image --json`, last a table.
# FLAGS: more ferry image flags for every run (e.g. --compress off).
# Run where the binaries are (BIN, default .gpu); JSON under OUT_DIR (default ./gpu-out), logs and
# PNGs under $WORK (default /tmp/flux-gen).
set -uo pipefail
OUT=${1:-gpu-out}
W=${WORK:-/tmp/flux-gen}
mkdir -p "$OUT" "$W"
BIN=${BIN:-.gpu}
SYNTH=${SYNTH_DIR:-/tmp}/ferry-flux-pipeline
STEPS=${STEPS:-28}
[ -f "$SYNTH/model_index.json" ] || { /usr/bin/time -f "synth %e s" "$BIN/ferry" synth --preset flux.1-dev-pipeline --out "$SYNTH" 2>&1 | tail -3; }
# Warm the page cache (a user's second run): read every file once.
cat "$SYNTH"/*/*.safetensors > /dev/null
# The first run encodes what streams (--compress auto) and keeps the encodings for the next
# loads; it is timed apart ("cold").
"$BIN/ferry" image --model "$SYNTH" --device cuda --vram 3GiB --size 1024x1024 --steps 1 --seed 1 \
    --prompt "a lighthouse on a cliff at night" --out "$W/cold.png" ${FLAGS:-} --json > "$OUT/f-cold-3GiB.json" 2> "$W/cold.log"
echo "cold rc=$?"; grep -E "encodings cache" "$W/cold.log" | sort | uniq -c | sort -rn | head -3
for vram in ${BUDGETS:-3GiB 12GiB}; do
    "$BIN/ferry" image --model "$SYNTH" --device cuda --vram "$vram" --size 1024x1024 \
        --steps "$STEPS" --seed 1 --prompt "a lighthouse on a cliff at night" ${FLAGS:-} \
        --out "$W/f-$vram.png" --stats --json > "$OUT/f-$vram.json" 2> "$W/f-$vram.log"
    echo "rc=$? vram=$vram"; grep -v "^\[" "$W/f-$vram.log" | tail -4
done
python3 - "$OUT" <<'PY'
import json, sys, glob, os
rows = []
for f in sorted(glob.glob(os.path.join(sys.argv[1], "f-*.json"))):
    try:
        j = json.load(open(f))
    except Exception as e:
        print(f, "unreadable", e); continue
    s = j["seconds"]; total = sum(s.values())
    first = s["load"] + s["text_encoder"]
    share = lambda k: 100 * s[k] / total
    rows.append((os.path.basename(f)[2:-5], s["load"], s["text_encoder"], share("text_encoder"), s["denoise"],
                 share("denoise"), s["denoise"] / j["steps"], s["vae"], share("vae"), total, j["vae"]["tiling"]))
print("| run | load s | text encoders s (share) | steps s (modulation incl.; share) | a step s | VAE s (share) | total s | VAE tiling |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    print("| %s | %.2f | %.2f (%.0f %%) | %.2f (%.0f %%) | %.3f | %.2f (%.0f %%) | %.2f | %s |" % r)
PY
