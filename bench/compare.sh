#!/usr/bin/env bash
# ferry against its peers on one GPU machine: the same checkpoint, the same prompt and the
# same VRAM budget for ferry's streamed pass and for bench/peers.py (transformers, accelerate
# cpu_offload, diffusers group offloading), one scale point at a time, each well inside a
# 10-minute call. Each point leaves one JSON file (and ferry's log and timeline, if any);
# `--report` turns every such file it finds into the comparison section of BENCHMARKS.md.
#
#   Here, with cargo:          bench/compare.sh --build         (binaries into .gpu/)
#                              plus the diffusers wheel in .whl/ (see bench/peers.py's notes)
#   On the GPU machine:        bench/compare.sh OUT_DIR POINT...
#   Anywhere with python3:     bench/compare.sh --report RESULTS_DIR [MARKDOWN_FILE]
#
# Points (one a call is safest; several run one after the other):
#   7b-full     transformers with the whole 7B-shaped model on the GPU (eager and sdpa
#               attention): the reference rows
#   7b-2.6GiB   ferry and the offloading peers at 2.6 GiB
#   7b-8GiB     the same at 8 GiB
#   32b-full    transformers with the whole 32B-shaped model on the GPU (65.5 GB)
#   32b-8GiB    ferry and the offloading peers at 8 GiB
#   32b-16GiB   the same at 16 GiB
#   tiny-1MiB   a tiny model, to check this script (PEERS_DEVICE=cpu runs it without a GPU)
#
# Models: the 7B point is `ferry synth --arch llama --preset qwen2.5-7b` (Llama architecture,
# Qwen2.5-7B shape, 15.23 GB, as DESIGN.md's peer numbers), written once to $SYNTH_DIR. The
# 32B point is the qwen2.5-32b preset made in host memory by each program (65.5 GB does not
# fit the 64 GB disk; the machine has 128 GB of RAM), in the preset's own architecture
# (qwen2), since ferry's in-memory synthetic models take the preset as it is.
#
# Environment: BIN (prebuilt binaries, default .gpu), SYNTH_DIR (default /tmp),
# PROMPT_TOKENS (4096), FERRY_RUNS (5), PEER_RUNS (3), SYSTEMS (which rows to run, default
# "ferry accelerate diffusers diffusers-layers"; for the *-full points "transformers
# transformers-sdpa"),
# PEERS_DEVICE (cuda), H2D_GBPS (55: the bound with nothing resident, where ferry's JSON
# gives none), DRY_RUN=1 (print the commands, run nothing but peers.py --dry-run).
# Split a slow point over calls with SYSTEMS, e.g. SYSTEMS="ferry accelerate" then
# SYSTEMS="diffusers diffusers-layers": each call's file is named after its systems and
# --report merges them. Seen on the H100 (2026-11-26): 7b-full 47 s; 7b-8GiB's three peers
# 105 s; 32b-16GiB's three peers 308 s (building 65.5 GB in memory takes each process
# 30-80 s, pinning included), so give the 32B points' ferry row a call of its own.
set -uo pipefail
cd "$(dirname "$0")/.."

BIN=${BIN:-.gpu}
SYNTH_DIR=${SYNTH_DIR:-/tmp}
PROMPT_TOKENS=${PROMPT_TOKENS:-4096}
FERRY_RUNS=${FERRY_RUNS:-5}
PEER_RUNS=${PEER_RUNS:-3}
PEERS_DEVICE=${PEERS_DEVICE:-cuda}
H2D_GBPS=${H2D_GBPS:-55}
DRY_RUN=${DRY_RUN:-}
# Every step ends by then (seconds from the start), so that a call stays inside its 10
# minutes and what was measured is written.
DEADLINE=$((SECONDS + ${TIME_LIMIT:-560}))
left() { local l=$((DEADLINE - SECONDS - ${1:-0})); echo $((l > 10 ? l : 10)); }

# ======================= ferry's streamed benchmark: ADJUST HERE =========================
# The one place that knows ferry's command line for a streamed pass within a VRAM budget
# (as of c157c3c: bench-cuda --vram, which times the prompt pass only).
#   $1 MODEL_ARGS  "--model DIR" or "--synthetic PRESET" (random weights made in memory)
#   $2 VRAM        the budget, as ferry's --vram takes it (2.6GiB)
#   $3 TOKENS      prompt tokens of the timed pass
#   $4 RUNS        timed runs (the median is reported)
#   $5 JSON_OUT    where the JSON result must end up
#   $6 SVG_OUT     where a timeline of one pass may be drawn (optional for the report)
# The JSON must hold the median pass time; read_ferry_json below also takes the peak VRAM,
# the bound, the efficiency, the bytes streamed and the card when present, under the names
# it lists (nested objects and a "results" list are searched too).
ferry_streamed_bench() {
    local model_args=$1 vram=$2 tokens=$3 runs=$4 json=$5 svg=$6
    # shellcheck disable=SC2086  # model_args is two words
    "$BIN/ferry" bench-cuda $model_args --device cuda --vram "$vram" --prompt-tokens "$tokens" \
        --runs "$runs" --json "$json" --timeline "$svg"
}
# =========================================================================================

log() { echo "[compare $(date -u +%H:%M:%S)] $*" >&2; }
need_ferry() {
    [ -x "$BIN/ferry" ] && return 0
    log "no $BIN/ferry: build it with bench/compare.sh --build where cargo is, carry .gpu"
    return 1
}

# The fields of ferry's JSON that the report uses, and the whole of it under "raw", as one
# JSON object on stdout.
read_ferry_json() {
    python3 - "$1" <<'EOF'
import json, sys
doc = json.load(open(sys.argv[1]))
flat = {}
# The median pass's statistics first; a cold first pass's never.
FIRST, SKIP = ("stats_median_pass", "median"), ("first_pass_stats", "stats_all", "first_pass")
def walk(x, prefix=""):
    if isinstance(x, dict):
        for k, v in sorted(x.items(), key=lambda kv: kv[0] not in FIRST):
            if k not in SKIP:
                walk(v, k)  # the last key is what counts
    elif isinstance(x, list) and x and isinstance(x[0], dict):
        walk(x[0], prefix)  # a "results" list: its first row
    else:
        flat.setdefault(prefix, x)
walk(doc)
def pick(*names, scale=1.0):
    for n in names:
        if isinstance(flat.get(n), (int, float)):
            return flat[n] * scale
    return None
out = dict(
    seconds=pick("prompt_seconds_median", "pass_seconds_median", "prompt_s", "pass_s",
                 "seconds_median") or pick("pass_ms", "prompt_ms", scale=1e-3),
    peak_vram_bytes=pick("ledger_peak_bytes", "peak_vram_bytes", "peak_device_bytes",
                         "allocated_peak", "device_bytes"),
    driver_bytes=pick("peak_device_bytes_driver"),
    bound_seconds=pick("bound_seconds", "bound_s", "prompt_bound_seconds")
                  or pick("bound_ms", scale=1e-3),
    efficiency=pick("efficiency", "prompt_efficiency"),
    streamed_bytes=pick("streamed_bytes", "bytes_streamed"),
    h2d_gbps=pick("h2d_gbps_measured", "h2d_gbps", "achieved_gbps"),
    stall_seconds=pick("stall_seconds", "stall_s") or pick("stall_ms", scale=1e-3),
    card=flat.get("card"),
)
if out["seconds"] is None:
    out["failed"] = ("no pass time in ferry's JSON (looked for prompt_seconds_median, pass_s, "
                     "pass_ms, ...): adjust read_ferry_json in bench/compare.sh")
out["raw"] = doc  # all of it, for whoever wants more than the report shows
print(json.dumps(out))
EOF
}

# The diffusers wheel (and huggingface_hub, only where the machine's is older than diffusers
# needs) into /tmp/site.
install_wheels() {
    if ! ls .whl/diffusers-*.whl >/dev/null 2>&1; then
        log "no .whl/diffusers-*.whl: diffusers rows will be skipped"
        return
    fi
    local wheels
    wheels=$(python3 - <<'EOF'
import glob, importlib.metadata as md
from packaging.version import Version
out = glob.glob(".whl/diffusers-*.whl")
hub = glob.glob(".whl/huggingface_hub-*.whl")
try:
    have = Version(md.version("huggingface_hub"))
except md.PackageNotFoundError:
    have = Version("0")
if hub and have < Version("1.32.0"):  # diffusers 0.42 needs huggingface-hub>=1.32
    out += hub
print(" ".join(out))
EOF
)
    log "installing $wheels into /tmp/site"
    # shellcheck disable=SC2086
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site $wheels || { log "wheel install failed"; return; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
}

# Card, driver, date and commit, as JSON.
machine_json() {
    local card driver commit
    card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
    driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)
    commit=$(cat "$BIN/commit" 2>/dev/null || git rev-parse --short HEAD 2>/dev/null || echo unknown)
    python3 -c 'import json, sys; c, d, date, commit = sys.argv[1:]
print(json.dumps(dict(card=c or None, driver=d or None, date=date, commit=commit)))' \
        "$card" "$driver" "$(date -u +%Y-%m-%d)" "$commit"
}

# One scale point: $1 name, $2 OUT_DIR.
run_point() {
    local point=$1 out=$2 model budget ferry_model peers_model label
    case $point in
        7b-*)
            model=$SYNTH_DIR/ferry-llama-qwen2.5-7b
            label="Qwen2.5-7B shape, llama architecture"
            label+=" (ferry synth --arch llama --preset qwen2.5-7b)"
            if [ ! -f "$model/config.json" ] && [ -z "$DRY_RUN" ]; then
                need_ferry || return 2
                log "synth → $model"
                timeout "$(left 60)" "$BIN/ferry" synth --arch llama --preset qwen2.5-7b \
                    --out "$model" --force 2>&1 | tail -2 >&2
            fi
            ferry_model="--model $model"; peers_model=$model ;;
        32b-*)
            label="Qwen2.5-32B shape, qwen2 architecture, random weights made in host memory"
            ferry_model="--synthetic qwen2.5-32b"; peers_model="--synthetic-in-memory qwen2.5-32b" ;;
        tiny-*)
            model=$SYNTH_DIR/ferry-tiny
            label="tiny (script check)"
            if [ ! -f "$model/config.json" ] && [ -z "$DRY_RUN" ]; then
                need_ferry || return 2
                "$BIN/ferry" synth --preset tiny --out "$model" --force >&2
            fi
            ferry_model="--model $model"; peers_model=$model ;;
        *) log "unknown point $point"; return 2 ;;
    esac
    budget=${point#*-}
    local tokens=$PROMPT_TOKENS
    [ "${point%%-*}" = tiny ] && tokens=$((PROMPT_TOKENS < 128 ? PROMPT_TOKENS : 128))

    local systems
    if [ "$budget" = full ]; then systems=${SYSTEMS:-transformers transformers-sdpa}; budget=none
    else systems=${SYSTEMS:-ferry accelerate diffusers diffusers-layers}; fi
    local tag=${systems// /.}
    [ -n "${SYSTEMS:-}" ] || [ "$budget" = none ] || tag=all
    local base=$out/$point.$tag
    local ferry_part=null peers_part=null

    if [[ " $systems " == *" ferry "* ]]; then
        log "$point: ferry at $budget"
        local args=("$ferry_model" "$budget" "$tokens" "$FERRY_RUNS" "$base.ferry.json" "$base.svg")
        if [ -n "$DRY_RUN" ]; then
            echo "would run: ferry_streamed_bench ${args[*]}"
        elif need_ferry; then
            rm -f "$base.ferry.json"
            export BIN
            export -f ferry_streamed_bench
            timeout "$(left 20)" bash -c 'ferry_streamed_bench "$@"' _ "${args[@]}" \
                >"$base.ferry.log" 2>&1
            local rc=$?
            grep -v "^JSON:" "$base.ferry.log" | tail -5 >&2
            if [ $rc -eq 0 ] && [ -f "$base.ferry.json" ]; then
                ferry_part=$(read_ferry_json "$base.ferry.json") && rm -f "$base.ferry.json" \
                    || ferry_part='{"failed": "its JSON did not parse; see the .ferry.json"}'
            else
                log "$point: ferry failed (status $rc), see $base.ferry.log"
                ferry_part="{\"failed\": \"status $rc; see $(basename "$base").ferry.log\"}"
            fi
        else
            ferry_part='{"failed": "no ferry binary"}'
        fi
        [ -n "$DRY_RUN" ] || write_point
    fi

    local peer_list
    peer_list=$(echo "$systems" | tr ' ' '\n' | grep -v '^ferry$' | paste -sd, -)
    if [ -n "$peer_list" ]; then
        log "$point: peers ($peer_list) at $budget"
        local dry=()
        [ -n "$DRY_RUN" ] && dry=(--dry-run)
        # shellcheck disable=SC2086  # peers_model may be two words
        PYTHONUNBUFFERED=1 timeout "$(left 5)" python3 bench/peers.py $peers_model \
            --vram "$budget" --prompt-tokens "$tokens" --runs "$PEER_RUNS" \
            --systems "$peer_list" --device "$PEERS_DEVICE" --timeout "$(left 15)" \
            --json "$base.peers.json" "${dry[@]}" >&2
        if [ -f "$base.peers.json" ]; then  # written after each system, so kept if cut short
            peers_part=$(cat "$base.peers.json"); rm -f "$base.peers.json"
        else
            log "$point: peers.py left no JSON"
        fi
    fi

    [ -n "$DRY_RUN" ] || write_point
}

# The point's file: what run_point knows so far (its locals ferry_part, peers_part, ...).
write_point() {
    python3 - "$base.json" "$point" "$label" "$budget" "$tokens" "$H2D_GBPS" "$(machine_json)" \
        "$ferry_part" "$peers_part" <<'EOF'
import json, sys
path, point, label, budget, tokens, h2d, machine, ferry, peers = sys.argv[1:]
doc = dict(compare_point=point, model=label, budget=budget, prompt_tokens=int(tokens),
           h2d_gbps_stated=float(h2d), machine=json.loads(machine), ferry=json.loads(ferry),
           peers=json.loads(peers))
json.dump(doc, open(path, "w"), indent=1)
print(f"wrote {path}", file=sys.stderr)
EOF
}

# The comparison section, from every point file under $1, into $2 (between markers,
# replacing an earlier section; appended if there is none) and on stdout.
report() {
    python3 - "$1" "${2:-}" <<'EOF'
import glob, json, os, sys

results_dir, md_path = sys.argv[1], sys.argv[2]
docs = []
for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
    try:
        d = json.load(open(path))
    except (OSError, json.JSONDecodeError):
        continue
    if isinstance(d, dict) and "compare_point" in d:
        d["_file"] = os.path.basename(path)
        docs.append(d)
if not docs:
    sys.exit(f"{results_dir}: no point files (*.json with compare_point)")

def gib(b):
    return "—" if b is None else f"{b / 2**30:.2f} GiB"

def gb(b):
    return "—" if b is None else f"{b / 1e9:.2f} GB"

def secs(s):
    return "—" if s is None else (f"{s:.3f} s" if s < 10 else f"{s:.1f} s")

NAMES = {
    "transformers": "transformers, whole model on the GPU (eager attention)",
    "transformers-sdpa": "transformers, whole model on the GPU (sdpa attention)",
    "accelerate": "accelerate `cpu_offload`",
    "diffusers": "diffusers `apply_group_offloading` (block level, stream, record_stream; "
                 "embedding/norm/head offloaded too)",
    "diffusers-layers": "diffusers `apply_group_offloading`, decoder layers only "
                        "(embedding/norm/head on the GPU)",
}

# Group: model family (7b/32b/tiny) → budget → merged rows.
models = {}
for d in docs:
    family = d["compare_point"].split("-")[0]
    m = models.setdefault(family, dict(label=d["model"], budgets={}, reference={},
                                       machines=[], tokens=d["prompt_tokens"]))
    machine = dict(d["machine"])
    if not machine.get("card") and d.get("ferry"):
        machine["card"] = d["ferry"].get("card")
    m["machines"].append(machine)
    peers = (d.get("peers") or {}).get("results", [])
    # Where several files hold a row, a measured one wins over a failure or a skip.
    def better(new, old):
        return old is None or not (new.get("failed") or new.get("status", "ok") != "ok") \
            or (old.get("failed") or old.get("status", "ok") != "ok")
    if d["budget"] == "none":
        for r in peers:
            if better(r, m["reference"].get(r["system"])):
                m["reference"][r["system"]] = dict(r, _peers=d["peers"])
        continue
    b = m["budgets"].setdefault(d["budget"], dict(ferry=None, peers={}, meta={}, h2d=None))
    if d.get("ferry") is not None and better(d["ferry"], b["ferry"]):
        b["ferry"] = d["ferry"]
    for r in peers:
        if better(r, b["peers"].get(r["system"])):
            b["peers"][r["system"]] = dict(r, _peers=d["peers"])
    b["h2d"] = d.get("h2d_gbps_stated")
    b["meta"] = d["peers"] or b["meta"]

def budget_key(s):
    units = {"MiB": 2**20, "GiB": 2**30, "GB": 1e9, "MB": 1e6}
    for u, f in units.items():
        if s.endswith(u):
            return float(s[: -len(u)]) * f
    return 0.0

lines = ["<!-- bench/compare.sh: begin (generated by bench/compare.sh --report) -->", ""]
cards = sorted({(m.get("card") or "?", m.get("driver") or "?") for mm in models.values()
                for m in mm["machines"]})
dates = sorted({m["date"] for mm in models.values() for m in mm["machines"]})
commits = sorted({m["commit"] for mm in models.values() for m in mm["machines"]})
lines.append(f"Card: {'; '.join(f'{c} (driver {d})' for c, d in cards)}. "
             f"Date: {', '.join(dates)}. Commit: {', '.join(commits)}. "
             "One prompt pass (KV cache filled, last position's logits), the same token ids "
             "for every system; ferry's time is the median of its runs, the peers' the "
             "median of 3 or more after a warm-up. Peak VRAM: ferry's ledger and, in "
             "brackets, the driver's view of its peak; for the peers "
             "torch.cuda.max_memory_allocated and, in brackets, the driver's view (free "
             "memory before minus after the passes). "
             "Command: `bench/compare.sh OUT_DIR POINT...` then `bench/compare.sh --report`.")
order = {"7b": 0, "32b": 1}
for family, m in sorted(models.items(), key=lambda fm: order.get(fm[0], 9)):
    ref = m["reference"]
    for budget in sorted(m["budgets"], key=budget_key):
        b = m["budgets"][budget]
        lines += ["", f"### {m['label']}: {budget} of VRAM, {m['tokens']}-token prompt", ""]
        f = b["ferry"]
        ferry_s = f.get("seconds") if f else None
        meta = b["meta"] or {}
        weight_bytes = (meta.get("model") or {}).get("weight_bytes")
        for r in ref.values():
            weight_bytes = weight_bytes or (r["_peers"].get("model") or {}).get("weight_bytes")
        lines += ["| system | pass time | peak VRAM | time ÷ ferry's | note |",
                  "|---|---|---|---|---|"]
        if f and f.get("failed"):
            lines.append(f"| **ferry** (streamed) | failed | — | — | {f['failed']} |")
        elif f:
            note = []
            if f.get("efficiency") is not None:
                note.append(f"{100 * f['efficiency']:.1f} % of the bound")
            if f.get("stall_seconds") is not None:
                note.append(f"stalls {1e3 * f['stall_seconds']:.1f} ms")
            vram = gib(f.get("peak_vram_bytes"))
            if f.get("driver_bytes") is not None:
                vram += f" ({gib(f['driver_bytes'])})"
            lines.append(f"| **ferry** (streamed) | **{secs(ferry_s)}** | {vram} | 1.00 | "
                         f"{'; '.join(note)} |")
        rows = list(b["peers"].values()) + list(ref.values())
        for r in rows:
            name = NAMES.get(r["system"], r["system"])
            if r in ref.values():
                name += ", no budget (reference)"
            if r["status"] != "ok":
                lines.append(f"| {name} | {r['status']} | — | — | {r['reason']} |")
                continue
            ratio = f"{r['seconds_median'] / ferry_s:.2f}" if ferry_s else "—"
            vram = gib(r.get("peak_allocated_bytes"))
            if r.get("driver_used_bytes") is not None:
                vram += f" ({gib(r['driver_used_bytes'])})"
            package = r["system"].split("-")[0]
            note = f"{package} {r.get(package, '?')}, torch {r.get('torch', '?')}, {r.get('attn')}"
            if r.get("over_budget"):
                note = "**over the budget**; " + note
            lines.append(f"| {name} | {secs(r['seconds_median'])} | {vram} | {ratio} | {note} |")
        # The PCIe bound: ferry's own, else everything streamed at the stated bandwidth.
        if f and f.get("bound_seconds") is not None:
            what = "max(compute, bytes streamed / H2D bandwidth)"
            if f.get("streamed_bytes") and f.get("h2d_gbps"):
                what = f"{gb(f['streamed_bytes'])} streamed at {f['h2d_gbps']:.1f} GB/s, or compute"
            bound, how = f["bound_seconds"], f"ferry's bound: {what}"
        elif weight_bytes:
            bound = weight_bytes / (b["h2d"] * 1e9)
            how = (f"nothing resident: {gb(weight_bytes)} / {b['h2d']:.0f} GB/s "
                   "(ferry's JSON gave no bound)")
        else:
            bound = None
        if bound is not None:
            ratio = f"{bound / ferry_s:.2f}" if ferry_s else "—"
            lines.append(f"| PCIe bound | {secs(bound)} | — | {ratio} | {how} |")
        # The same weights and prompt should give the same next token everywhere.
        tokens = {r["system"]: r["next_token"] for r in rows
                  if r.get("status") == "ok" and "next_token" in r}
        if len(set(tokens.values())) == 1:
            lines += ["", f"Every peer picked the same next token ({tokens.popitem()[1]})."]
        elif tokens:
            lines += ["", "Next tokens differ: " + ", ".join(f"{k} {v}" for k, v in tokens.items())
                      + " (bf16 near-ties, or a system computes something else)."]
lines += ["", "<!-- bench/compare.sh: end -->"]
section = "\n".join(lines) + "\n"
print(section)
if md_path:
    text = open(md_path).read() if os.path.exists(md_path) else ""
    begin, end = "<!-- bench/compare.sh: begin", "<!-- bench/compare.sh: end -->"
    if begin in text and end in text:
        i = text.index(begin)
        j = text.index(end) + len(end)
        text = text[:i] + section.rstrip("\n") + text[j:]
    else:
        text = (text.rstrip("\n") + "\n\n" if text else "") + \
            "## ferry against its peers (issue 6)\n\n" + section
    open(md_path, "w").write(text)
    print(f"wrote the comparison into {md_path}", file=sys.stderr)
EOF
}

case "${1:-}" in
    --build)
        set -e
        scripts/gpu_checks.sh --build
        commit=$(git rev-parse --short HEAD)
        git diff --quiet HEAD -- src Cargo.toml Cargo.lock || commit="$commit+changes"
        echo "$commit" > .gpu/commit
        echo "binaries of $commit in .gpu/; carry .gpu and .whl to the GPU machine"
        exit 0 ;;
    --report)
        [ -n "${2:-}" ] || { echo "usage: bench/compare.sh --report RESULTS_DIR [MARKDOWN_FILE]" >&2; exit 2; }
        report "$2" "${3:-}"
        exit $? ;;
    ""|-h|--help)
        sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'
        exit 0 ;;
esac

OUT=$1; shift
POINTS=("$@")
[ ${#POINTS[@]} -gt 0 ] || POINTS=(7b-2.6GiB)
mkdir -p "$OUT"
for point in "${POINTS[@]}"; do
    [[ $point =~ ^(7b|32b)-(full|[0-9.]+[GM]i?B)$|^tiny-[0-9.]+[GM]i?B$ ]] \
        || { echo "compare.sh: unknown point $point (see bench/compare.sh --help)" >&2; exit 2; }
done
[ -n "$DRY_RUN" ] || install_wheels
status=0
for point in "${POINTS[@]}"; do
    start=$SECONDS
    run_point "$point" "$OUT" || status=1
    log "$point: $((SECONDS - start)) s"
done
[ -n "$DRY_RUN" ] || report "$OUT" "$OUT/comparison.md" >/dev/null || status=1
exit $status
