"""Time ferry's peers on one prompt pass: the same checkpoint, the same prompt and the same
VRAM budget as `ferry bench`, so that the numbers sit side by side.

Systems (--systems, comma-separated; default all but transformers-sdpa):

  transformers      the whole model on the GPU, eager attention (attention scores
                    materialized): the reference of DESIGN.md's table, when it fits.
  transformers-sdpa the same with scaled_dot_product_attention (transformers' default): the
                    compute floor.
  accelerate        accelerate's `cpu_offload`: every weight stays in (pageable) host memory
                    and each module's weights are copied to the GPU when it runs.
  diffusers         diffusers' `apply_group_offloading` (offload_type="block_level",
                    num_blocks_per_group=1, use_stream=True, record_stream=True, onload device
                    cuda, offload device cpu) applied to the decoder (`model.model`) and to the
                    head: the decoder layers (`model.model.layers`) are the blocks, one group
                    each, pinned in host memory and prefetched on a side stream; everything else
                    (embedding, final norm, head) is offloaded too, as a diffusion model's
                    embedders and output projection are under `pipe.enable_group_offload`, in
                    diffusers' "unmatched" groups, which it copies to the GPU when their module
                    runs and back after it, synchronously and from pageable memory.
  diffusers-layers  the same offloading of the decoder layers, with the embedding, final norm
                    and head kept on the GPU (the faster choice where the budget holds them).

Each system runs in its own process (a fresh CUDA context, nothing left over from the one
before). A pass is `model(input_ids, use_cache=True, logits_to_keep=1)` under
`torch.inference_mode()`: the prompt pass of generation (the KV cache filled, the last
position's logits), as ferry's prompt pass. The prompt is --prompt-tokens token ids from
ferry bench-cuda's generator (a 64-bit LCG, --seed), the same for every system and run.
Reported: the median of --runs timed passes after --warmup untimed ones, the peak of
torch.cuda.max_memory_allocated over the timed passes, the allocator's peak reserve, and the
driver's view (free memory at the start minus free memory after the passes:
torch.cuda.mem_get_info, which counts what the allocator holds, cuBLAS workspaces included,
but not the CUDA context).

The budget (--vram) is enforced with torch.cuda.set_per_process_memory_fraction, so a system
that needs more fails with an out-of-memory error and is reported as skipped (--no-cap only
measures). A system is also skipped, before it starts, when it plainly cannot fit: the
whole model on the GPU when its weights exceed the budget or the card, diffusers when its
pinned copies (PyTorch rounds each pinned allocation up to a power of two) exceed the host's
available memory, or when its package is missing.

    python3 bench/peers.py /tmp/ferry-llama-qwen2.5-7b --vram 2.6GiB --json peers.json
    python3 bench/peers.py --synthetic-in-memory qwen2.5-32b --vram 8GiB --systems accelerate
    python3 bench/peers.py /tmp/tiny --device cpu --prompt-tokens 64    # code paths, no GPU
    python3 bench/peers.py /tmp/tiny --prompt-tokens 64 --vram 1GiB --dry-run  # what would run

(/tmp/tiny from `ferry synth --preset tiny --out /tmp/tiny`.) bench/compare.sh runs this
beside ferry at each scale point.

--synthetic-in-memory PRESET builds the model in host memory with random bf16 weights (for
a model larger than the disk): the shapes of ferry's presets (`ferry synth --list`), one
random draw per distinct tensor shape (seeded) copied into every tensor of that shape. The
values do not change the time of a pass; each tensor has its own memory.

diffusers is not installed on the GPU machine and travels as a wheel (pure Python). Where pip
reaches PyPI, in the repository's root:

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 -d .whl \
        diffusers==0.42.1 huggingface_hub==1.33.0

Its other needs (filelock, numpy, regex, requests, safetensors>=0.8, Pillow) are on the
machine; huggingface-hub>=1.32 was too (1.33.0 on 2026-11-26), and bench/compare.sh installs
the hub wheel only where the machine's is older. Carry `.whl`; compare.sh installs the wheels
into /tmp/site (by hand: pip install --no-index --no-deps --target /tmp/site .whl/*.whl and
PYTHONPATH=/tmp/site).
"""

import argparse
import datetime
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time

SYSTEMS = ("transformers", "transformers-sdpa", "accelerate", "diffusers", "diffusers-layers")
DEFAULT_SYSTEMS = ("transformers", "accelerate", "diffusers", "diffusers-layers")
RESULT_PREFIX = "PEERS_RESULT "

# The shapes of ferry's presets (src/synth/presets.rs): (arch, hidden, ffn, layers, heads,
# kv heads) and what differs from the family's defaults.
PRESETS = {
    "tiny": dict(
        arch="llama", shape=(64, 128, 2, 4, 2), vocab_size=512, max_position_embeddings=256,
        rope_theta=10000.0, rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=256,
    ),
    "qwen2.5-7b": dict(arch="qwen2", shape=(3584, 18944, 28, 28, 4), rms_norm_eps=1e-6),
    "qwen2.5-14b": dict(arch="qwen2", shape=(5120, 13824, 48, 40, 8), rms_norm_eps=1e-5),
    "qwen2.5-32b": dict(arch="qwen2", shape=(5120, 27648, 64, 40, 8), rms_norm_eps=1e-5),
    "qwen3-8b": dict(arch="qwen3", shape=(4096, 12288, 36, 32, 8)),
    "qwen3-32b": dict(arch="qwen3", shape=(5120, 25600, 64, 64, 8)),
    "llama-3.1-8b": dict(arch="llama", shape=(4096, 14336, 32, 32, 8)),
    "llama-3.1-70b": dict(arch="llama", shape=(8192, 28672, 80, 64, 8)),
    "mistral-7b": dict(arch="mistral", shape=(4096, 14336, 32, 32, 8)),
}
FAMILY = {
    "qwen2": dict(vocab_size=152064, rope_theta=1e6, max_position_embeddings=131072,
                  bos_token_id=151643, eos_token_id=151643),
    "qwen3": dict(vocab_size=151936, rope_theta=1e6, max_position_embeddings=40960,
                  rms_norm_eps=1e-6, head_dim=128, bos_token_id=151643, eos_token_id=151645),
    "llama": dict(vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072,
                  rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001,
                  rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                    high_freq_factor=4.0,
                                    original_max_position_embeddings=8192)),
    "mistral": dict(vocab_size=32768, rope_theta=1e6, max_position_embeddings=32768,
                    rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2),
}
ARCHS = ("llama", "qwen2", "qwen3", "mistral")
CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
           "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM"}


class UsageError(Exception):
    """A bad flag or input: printed on one line, exit status 2."""


# ---------------------------------------------------------------------------------------
# Sizes, prompt, model shape: no torch needed.

def parse_size(text, flag):
    """6GiB, 2.5GB, 512MiB → bytes (as ferry's --vram); 'none' → None."""
    if text is None or text.strip().lower() in ("none", "unlimited"):
        return None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]+)\s*", text)
    units = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10,
             "mib": 2**20, "gib": 2**30, "tib": 2**40}
    if not m or m.group(2).lower() not in units:
        raise UsageError(f"{flag}: {text!r} is not a size; expected a number and a unit, "
                         "like 6GiB, 2.5GB or 512MiB (or none)")
    return int(round(float(m.group(1)) * units[m.group(2).lower()]))


def human_bytes(b):
    if b is None:
        return "—"
    if b >= 2**30:
        return f"{b / 2**30:.2f} GiB"
    if b >= 2**20:
        return f"{b / 2**20:.1f} MiB"
    return f"{b / 2**10:.1f} KiB"


def prompt_ids(n, vocab, seed):
    """ferry bench-cuda's prompt: a 64-bit LCG, the high bits mod the vocabulary."""
    s, out = seed, []
    for _ in range(n):
        s = (s * 6364136223846793005 + 1442695040888963407) % 2**64
        out.append((s >> 33) % vocab)
    return out


def preset_config(name, arch=None, layers=None):
    """config.json of a preset, as `ferry synth --preset NAME [--arch A] [--layers N]`
    writes it."""
    if name not in PRESETS:
        raise UsageError(f"--synthetic-in-memory: unknown preset {name!r}; expected one of "
                         + ", ".join(PRESETS))
    p = dict(PRESETS[name])
    own_arch = p.pop("arch")
    hidden, ffn, n_layers, heads, kv_heads = p.pop("shape")
    c = dict(FAMILY.get(own_arch if name != "tiny" else "", {}))
    c.setdefault("rms_norm_eps", 1e-6)
    c.update(p)
    arch = arch or own_arch
    if arch not in ARCHS:
        raise UsageError(f"--arch: {arch!r}; expected one of {', '.join(ARCHS)}")
    if layers is not None and layers < 1:
        raise UsageError("--layers: expected at least 1")
    c.update(
        architectures=[CLASSES[arch]], model_type=arch, hidden_size=hidden,
        intermediate_size=ffn, num_hidden_layers=layers or n_layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=c.pop("head_dim", hidden // heads), tie_word_embeddings=False,
        hidden_act="silu", mlp_bias=False, initializer_range=0.02,
        torch_dtype="bfloat16", ferry_synthetic={"preset": name},
    )
    c.setdefault("rope_scaling", None)
    if arch == "qwen2":
        c["use_sliding_window"] = False
    elif arch == "mistral":
        c["sliding_window"] = None
    else:
        c["attention_bias"] = False
    if c.get("bos_token_id") is None:
        c.pop("bos_token_id", None)
    return c


def weight_shapes(c):
    """(name, shape) of every weight of a Llama-family config.json, as transformers names
    them."""
    h, f, heads, kv = (c["hidden_size"], c["intermediate_size"], c["num_attention_heads"],
                       c["num_key_value_heads"])
    d = c.get("head_dim") or h // heads
    v, arch = c["vocab_size"], c["model_type"]
    qkv_bias = arch == "qwen2" or (arch in ("llama", "qwen3") and c.get("attention_bias"))
    out = [("model.embed_tokens.weight", (v, h))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (heads * d, h)),
                (p + "self_attn.k_proj.weight", (kv * d, h)),
                (p + "self_attn.v_proj.weight", (kv * d, h)),
                (p + "self_attn.o_proj.weight", (h, heads * d))]
        if qkv_bias:
            out += [(p + "self_attn.q_proj.bias", (heads * d,)),
                    (p + "self_attn.k_proj.bias", (kv * d,)),
                    (p + "self_attn.v_proj.bias", (kv * d,))]
        if arch == "llama" and c.get("attention_bias"):
            out.append((p + "self_attn.o_proj.bias", (h,)))
        if arch == "qwen3":
            out += [(p + "self_attn.q_norm.weight", (d,)), (p + "self_attn.k_norm.weight", (d,))]
        out += [(p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.up_proj.weight", (f, h)),
                (p + "mlp.down_proj.weight", (h, f))]
    out.append(("model.norm.weight", (h,)))
    if not c.get("tie_word_embeddings"):
        out.append(("lm_head.weight", (v, h)))
    return out


def weight_bytes(c, dtype_bytes=2):
    return sum(math.prod(s) for _, s in weight_shapes(c)) * dtype_bytes


def pinned_bytes(c, dtype_bytes=2):
    """Host memory of diffusers' pinned copies of the decoder layers' weights: PyTorch's
    caching host allocator rounds each allocation up to a power of two."""
    return sum(1 << (math.prod(s) * dtype_bytes - 1).bit_length()
               for name, s in weight_shapes(c) if name.startswith("model.layers."))


def resident_bytes(c, dtype_bytes=2):
    """Weights outside the decoder layers (embedding, final norm, head), bytes."""
    return sum(math.prod(s) for name, s in weight_shapes(c)
               if not name.startswith("model.layers.")) * dtype_bytes


def mem_available():
    """MemAvailable of /proc/meminfo, bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ---------------------------------------------------------------------------------------
# Arguments.

def parse_args(argv):
    ap = argparse.ArgumentParser(
        description="Time transformers, accelerate cpu_offload and diffusers group offloading "
                    "on one prompt pass at a VRAM budget.",
        epilog="See the module docstring for what each system does and what is measured.")
    ap.add_argument("checkpoint", nargs="?",
                    help="a checkpoint directory (config.json + safetensors, as ferry synth "
                         "writes it)")
    ap.add_argument("--synthetic-in-memory", metavar="PRESET",
                    help="build the model in host memory with random bf16 weights of a ferry "
                         f"preset's shape instead ({', '.join(PRESETS)})")
    ap.add_argument("--arch", help="with --synthetic-in-memory: llama, qwen2, qwen3 or "
                                    "mistral, if not the preset's own (as ferry synth --arch)")
    ap.add_argument("--layers", type=int,
                    help="with --synthetic-in-memory: decoder layers, if not the preset's")
    ap.add_argument("--vram", default="none",
                    help="VRAM budget (6GiB, 2.5GB, 512MiB) enforced on each system, or none "
                         "(default)")
    ap.add_argument("--no-cap", action="store_true",
                    help="measure only: do not cap the allocator at --vram (a system over "
                         "the budget is reported, not stopped)")
    ap.add_argument("--prompt-tokens", type=int, default=4096)
    ap.add_argument("--runs", type=int, default=3, help="timed passes (the median is "
                                                        "reported); at least 3")
    ap.add_argument("--warmup", type=int, default=1, help="untimed passes first")
    ap.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                    help=f"comma-separated, from {', '.join(SYSTEMS)}")
    ap.add_argument("--seed", type=int, default=1, help="prompt (and synthetic weights) seed")
    ap.add_argument("--attn", help="attention implementation for every system (eager, sdpa); "
                                   "default: eager for transformers, sdpa (transformers' "
                                   "default) for the others")
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (to check the "
                                                     "code paths without a GPU)")
    ap.add_argument("--host-memory", metavar="SIZE",
                    help="host memory free for the model, if not /proc/meminfo's MemAvailable "
                         "(on machines whose memory grows as it is used)")
    ap.add_argument("--timeout", type=float, default=540.0,
                    help="seconds allowed for each system's process")
    ap.add_argument("--json", metavar="FILE", help="also write the results here")
    ap.add_argument("--dry-run", action="store_true",
                    help="print what would run and the skips known in advance; import no torch")
    ap.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if (a.checkpoint is None) == (a.synthetic_in_memory is None):
        raise UsageError("give a checkpoint directory or --synthetic-in-memory PRESET "
                         "(one of the two)")
    if a.checkpoint is None:
        a.config = preset_config(a.synthetic_in_memory, a.arch, a.layers)
    else:
        if a.arch or a.layers:
            raise UsageError("--arch and --layers go with --synthetic-in-memory; a "
                             "checkpoint has its own config.json")
        path = os.path.join(a.checkpoint, "config.json")
        try:
            with open(path) as f:
                a.config = json.load(f)
        except FileNotFoundError:
            raise UsageError(f"{path}: not found (expected a checkpoint directory, e.g. "
                             "one written by ferry synth)")
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}: malformed JSON: {e}")
        if a.config.get("model_type") not in ARCHS:
            raise UsageError(f"{path}: model_type {a.config.get('model_type')!r}; expected "
                             f"one of {', '.join(ARCHS)}")
    a.budget = parse_size(a.vram, "--vram")
    a.host_memory = parse_size(a.host_memory, "--host-memory")
    if a.prompt_tokens < 1:
        raise UsageError("--prompt-tokens: expected at least 1")
    if a.prompt_tokens > a.config["max_position_embeddings"]:
        raise UsageError(f"--prompt-tokens: {a.prompt_tokens} is more than the model's "
                         f"max_position_embeddings ({a.config['max_position_embeddings']})")
    if a.runs < 3:
        raise UsageError("--runs: expected at least 3 (the median of 3 or more)")
    if a.warmup < 1:
        raise UsageError("--warmup: expected at least 1 (diffusers learns the layer order "
                         "in its first pass)")
    a.system_list = [s.strip() for s in a.systems.split(",") if s.strip()]
    unknown = [s for s in a.system_list if s not in SYSTEMS]
    if unknown or not a.system_list:
        raise UsageError(f"--systems: {','.join(unknown) or 'nothing'}; expected some of "
                         + ", ".join(SYSTEMS))
    if not re.fullmatch(r"cpu|cuda(:[0-9]+)?", a.device):
        raise UsageError(f"--device: {a.device!r}; expected cuda, cuda:N or cpu")
    return a


# ---------------------------------------------------------------------------------------
# The parent: decide, run each system in its own process, report.

def static_skip(system, a, card_bytes=None):
    """Why `system` cannot run, known before it starts; None if it may."""
    weights = weight_bytes(a.config)
    on_gpu = a.device != "cpu"
    if system.startswith("transformers") and on_gpu:
        if a.budget is not None and not a.no_cap and weights > a.budget:
            return (f"the whole model needs {human_bytes(weights)} of weights alone; the "
                    f"budget is {human_bytes(a.budget)}")
        if card_bytes is not None and weights > card_bytes:
            return f"{human_bytes(weights)} of weights exceed the card ({human_bytes(card_bytes)})"
    avail = a.host_memory or mem_available()
    if a.synthetic_in_memory and avail is not None and weights > avail:
        return (f"the synthetic model needs {human_bytes(weights)} of host memory; "
                f"{human_bytes(avail)} is available (--host-memory to say otherwise)")
    if system == "diffusers-layers" and on_gpu and a.budget is not None and not a.no_cap:
        layer = (weights - resident_bytes(a.config)) / a.config["num_hidden_layers"]
        need = resident_bytes(a.config) + 2 * layer
        if need > a.budget:
            return (f"embedding, norm and head ({human_bytes(resident_bytes(a.config))}) and two "
                    f"layers in flight need {human_bytes(need)}; the budget is "
                    f"{human_bytes(a.budget)}")
    if system.startswith("diffusers") and on_gpu and avail is not None:
        pinned = pinned_bytes(a.config)
        # A checkpoint's pages are page cache (they can be dropped); the pinned copies cannot.
        if pinned > 0.92 * avail:
            return (f"diffusers pins a copy of every weight: {human_bytes(pinned)} of host "
                    f"memory (each tensor rounded up to a power of two by PyTorch's pinned "
                    f"allocator); {human_bytes(avail)} is available (--host-memory to say otherwise)")
    return None


def worker_command(system, argv, script=__file__):
    return [sys.executable, os.path.abspath(script), *argv, "--worker", system]


def run_system(system, a, argv, script=__file__, prefix=RESULT_PREFIX):
    """Run one system in a child process of `script` (this file, or bench/dit_peers.py); its
    result dict, from the line its worker prints after `prefix`."""
    cmd = worker_command(system, argv, script)
    t = time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, env=env)
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr or b"")[-800:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        return dict(system=system, status="failed",
                    reason=f"no result within --timeout {a.timeout:.0f} s", log_tail=tail)
    sys.stderr.write(p.stderr)
    for line in p.stdout.splitlines():
        if line.startswith(prefix):
            r = json.loads(line[len(prefix):])
            r["wall_seconds"] = time.perf_counter() - t
            return r
    return dict(system=system, status="failed",
                reason=f"the process exited with status {p.returncode} and no result",
                log_tail=(p.stdout + p.stderr)[-1500:])


def card_info(a):
    """(total memory in bytes, driver version) of the card, read with nvidia-smi so that this
    process never touches CUDA; (None, None) where that fails."""
    if a.device == "cpu":
        return None, None
    index = a.device.split(":")[1] if ":" in a.device else "0"
    try:
        out = subprocess.run(["nvidia-smi", "-i", index,
                              "--query-gpu=memory.total,driver_version",
                              "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout
        total, driver = [x.strip() for x in out.strip().split(",")]
        return int(total) * 2**20, driver
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None, None


def describe_model(a):
    c = a.config
    src = (f"synthetic in memory: {a.synthetic_in_memory}" if a.synthetic_in_memory
           else os.path.abspath(a.checkpoint))
    return dict(source=src, arch=c["model_type"], hidden=c["hidden_size"],
                layers=c["num_hidden_layers"], heads=c["num_attention_heads"],
                kv_heads=c["num_key_value_heads"], ffn=c["intermediate_size"],
                vocab=c["vocab_size"], weight_bytes=weight_bytes(c))


def table(report):
    """The results as a table for people."""
    m = report["model"]
    lines = [
        f"model   {m['source']} ({m['arch']}, {m['layers']} layers, hidden {m['hidden']}, "
        f"{m['weight_bytes'] / 1e9:.2f} GB bf16)",
        f"pass    {report['prompt_tokens']} prompt tokens, KV cache filled, last logits; median "
        f"of {report['runs']} after {report['warmup']} warm-up; budget "
        f"{human_bytes(report['vram_budget_bytes'])}"
        + ("" if report["vram_budget_bytes"] is None else
           (" (enforced)" if report["cap"] and report["device"] != "cpu" else " (not enforced)")),
        f"device  {report.get('card') or report['device']}; {report['date']}",
        "",
        f"{'system':<17} {'pass s':>9} {'min–max s':>17} {'peak alloc':>11} {'reserved':>11} "
        f"{'driver':>11} {'token':>7}  note",
    ]
    for r in report["results"]:
        if r["status"] != "ok":
            lines.append(f"{r['system']:<17} {r['status']:>9}  {r['reason']}")
            continue
        lo, hi = min(r["seconds_all"]), max(r["seconds_all"])
        note = r.get("note", "")
        if r.get("over_budget"):
            note = ("OVER BUDGET; " + note).rstrip("; ")
        lines.append(
            f"{r['system']:<17} {r['seconds_median']:>9.4f} {f'{lo:.4f}–{hi:.4f}':>17} "
            f"{human_bytes(r.get('peak_allocated_bytes')):>11} "
            f"{human_bytes(r.get('peak_reserved_bytes')):>11} "
            f"{human_bytes(r.get('driver_used_bytes')):>11} {r.get('next_token', '—'):>7}  {note}")
    return "\n".join(lines)


def parent(a, argv):
    card_bytes, driver = card_info(a)
    report = dict(
        tool="bench/peers.py", date=datetime.datetime.now(datetime.timezone.utc)
        .strftime("%Y-%m-%d"), device=a.device, model=describe_model(a),
        prompt_tokens=a.prompt_tokens, logits="last", use_cache=True, seed=a.seed,
        runs=a.runs, warmup=a.warmup, vram_budget_bytes=a.budget,
        cap=a.budget is not None and not a.no_cap, driver=driver, results=[])
    for system in a.system_list:
        why = static_skip(system, a, card_bytes)
        if why:
            r = dict(system=system, status="skipped", reason=why)
        elif a.dry_run:
            r = dict(system=system, status="dry-run",
                     reason="would run: " + " ".join(worker_command(system, argv)))
        else:
            print(f"[peers] {system} …", file=sys.stderr, flush=True)
            r = run_system(system, a, argv)
        if r["status"] != "ok":
            print(f"[peers] {system}: {r['status']}: {r['reason']}", file=sys.stderr)
        report["results"].append(r)
        for key in ("card", "cuda", "torch", "transformers"):
            if r.get(key):
                report.setdefault(key, r[key])
        if a.json:  # after each system, so that a run cut short keeps what it measured
            with open(a.json, "w") as f:
                json.dump(report, f, indent=1)
                f.write("\n")
    print(table(report))
    return 0


# ---------------------------------------------------------------------------------------
# The child: one system, one process.

def build_in_memory(a, torch, pin_layers):
    """The model of a.config with random bf16 weights, built in host memory (the decoder
    layers' weights in pinned memory if `pin_layers`)."""
    import transformers

    cfg = transformers.AutoConfig.for_model(**a.config)
    cfg._attn_implementation = a.attn_impl
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(
            cfg, dtype=torch.bfloat16, attn_implementation=a.attn_impl)
    gen = torch.Generator().manual_seed(a.seed)
    drawn = {}  # one random draw per shape, copied into each tensor of that shape
    for mod_name, module in model.named_modules():
        for name, p in list(module.named_parameters(recurse=False)):
            pinned = pin_layers and mod_name.startswith("model.layers.")
            t = torch.empty(p.shape, dtype=torch.bfloat16, pin_memory=pinned)
            if name == "weight" and p.dim() == 1:
                t.fill_(1.0)  # norms
            else:
                key = tuple(p.shape)
                if key not in drawn:
                    drawn[key] = (torch.randn(key, generator=gen) * 0.02).to(torch.bfloat16)
                t.copy_(drawn[key])
            module._parameters[name] = torch.nn.Parameter(t, requires_grad=False)
    drawn.clear()
    # Buffers made at construction (the rotary inverse frequencies) are made again off the
    # meta device.
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=model.config)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if t.is_meta]
    assert not left, f"still on the meta device: {left[:5]}"
    return model.eval()


def worker(a):
    """Run one system; print its result as one JSON line."""
    result = dict(system=a.worker, status="ok")
    try:
        return measure(a, result)
    except Exception as e:  # a peer's failure is a row in the report, not a crash
        result.update(status="failed", reason=f"{type(e).__name__}: {one_line(e)}")
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        raise


def one_line(e):
    return (str(e).strip().splitlines() or [""])[0][:300]


def measure(a, result):
    """The body of `worker`: fills `result` and prints it."""
    system = a.worker

    def finish(status, reason):
        result.update(status=status, reason=reason)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return 0

    try:
        import torch
        import transformers
    except ImportError as e:
        return finish("skipped", f"torch/transformers not importable: {e}")
    try:
        if system == "accelerate":
            import accelerate
            from accelerate import cpu_offload
            result["accelerate"] = accelerate.__version__
        if system.startswith("diffusers"):
            import diffusers
            from diffusers.hooks import apply_group_offloading
            result["diffusers"] = diffusers.__version__
    except ImportError as e:
        return finish("skipped", f"{system} is not installed here ({e})")

    cuda = a.device != "cpu"
    device = torch.device(a.device)
    if cuda and device.index is None:
        device = torch.device("cuda", 0)
    result.update(torch=torch.__version__, transformers=transformers.__version__,
                  device=a.device)
    a.attn_impl = a.attn or ("eager" if system == "transformers" else "sdpa")
    package = system.split("-")[0]
    result["attn"] = a.attn_impl
    free0 = None
    if cuda:
        if not torch.cuda.is_available():
            return finish("skipped", "torch sees no CUDA device")
        torch.cuda.set_device(device)
        result["card"] = torch.cuda.get_device_name(device)
        result["cuda"] = torch.version.cuda
        free0, total = torch.cuda.mem_get_info(device)
        result["card_total_bytes"] = total
        if a.budget is not None and not a.no_cap:
            torch.cuda.set_per_process_memory_fraction(min(1.0, a.budget / total), device)

    t = time.perf_counter()
    try:
        # Where the weights start: on the GPU for transformers, else in host memory (the
        # decoder layers pinned up front for diffusers, which would otherwise pin a second
        # copy of each).
        target = device if package == "transformers" else torch.device("cpu")
        pin = system.startswith("diffusers") and cuda
        if a.synthetic_in_memory:
            model = build_in_memory(a, torch, pin_layers=pin)
            model.to(target)
            result["weights"] = ("random bf16, built in memory"
                                 + (", decoder layers pinned" if pin else ""))
        else:
            # No device_map for host memory: it could leave accelerate hooks that the
            # offloading systems refuse.
            model = transformers.AutoModelForCausalLM.from_pretrained(
                a.checkpoint, dtype=torch.bfloat16, attn_implementation=a.attn_impl,
                device_map=str(target) if target.type == "cuda" else None).eval()
            result["weights"] = "checkpoint " + os.path.abspath(a.checkpoint)

        if package == "transformers":
            result["note"] = f"whole model on the {'GPU' if cuda else 'CPU'}, {a.attn_impl}"
        elif system == "accelerate":
            cpu_offload(model, execution_device=device)
            result["note"] = f"cpu_offload, {a.attn_impl}"
        elif system.startswith("diffusers"):
            offload = dict(onload_device=device, offload_device=torch.device("cpu"),
                           offload_type="block_level", num_blocks_per_group=1,
                           use_stream=cuda, record_stream=cuda)
            how = (f"group offload, block level, 1 layer a group, "
                   f"{'stream + record_stream' if cuda else 'no stream (CPU)'}")
            if system == "diffusers":
                # Applied to the decoder, whose ModuleList `layers` gives the blocks and whose
                # other children (embedding, final norm) diffusers' unmatched group, and to the
                # head on its own. (Applied once to the whole model, diffusers would find no
                # ModuleList among its children and move all of it at once; with
                # block_modules=["model"] its nested prefetch hooks collide in 0.42.1.)
                apply_group_offloading(model.model, **offload)
                apply_group_offloading(model.lm_head, **offload)
                result["note"] = f"{how}, embedding/norm/head offloaded too, {a.attn_impl}"
            else:
                # Applied to the decoder, whose other children would form an unmatched group
                # moved on and off the GPU each pass: hide the embedding and final norm while
                # the hooks are made, then put them (and the head) on the GPU for good.
                kept = {"embed_tokens": model.model.embed_tokens, "norm": model.model.norm}
                for name in kept:
                    setattr(model.model, name, torch.nn.Identity())
                apply_group_offloading(model.model, **offload)
                for name, module in kept.items():
                    setattr(model.model, name, module.to(device))
                model.lm_head.to(device)
                result["note"] = (f"{how}, embedding/norm/head on the "
                                  f"{'GPU' if cuda else 'CPU'}, {a.attn_impl}")
        result["setup_seconds"] = time.perf_counter() - t

        ids = torch.tensor([prompt_ids(a.prompt_tokens, a.config["vocab_size"], a.seed)],
                           device=device)

        def sync():
            if cuda:
                torch.cuda.synchronize(device)

        def one_pass():
            sync()
            t = time.perf_counter()
            with torch.inference_mode():
                out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
                next_token = out.logits[:, -1].argmax(-1)
            sync()
            elapsed = time.perf_counter() - t
            # The same weights and prompt give the same answer in every system.
            last = out.logits[0, -1].float()
            result.update(next_token=int(next_token[0]), last_logits_l2=float(last.norm()))
            del out, next_token, last
            return elapsed

        for _ in range(a.warmup):
            one_pass()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        times = [one_pass() for _ in range(a.runs)]
    except torch.OutOfMemoryError as e:
        cap = (f"under the {human_bytes(a.budget)} cap" if a.budget is not None
               and not a.no_cap else "on the card")
        # The first sentence ("CUDA out of memory. Tried to allocate 148.00 MiB."); the rest
        # is the allocator's state, on stderr.
        print(str(e), file=sys.stderr)
        what = ". ".join(one_line(e).split(". ")[:2]).rstrip(".")
        return finish("skipped", f"out of memory {cap}: {what}")

    result.update(seconds_median=statistics.median(times), seconds_all=times,
                  tokens_per_second=a.prompt_tokens / statistics.median(times))
    if cuda:
        result.update(peak_allocated_bytes=torch.cuda.max_memory_allocated(device),
                      peak_reserved_bytes=torch.cuda.max_memory_reserved(device),
                      driver_used_bytes=free0 - torch.cuda.mem_get_info(device)[0])
        if a.budget is not None:
            result["over_budget"] = result["peak_reserved_bytes"] > a.budget
    return finish("ok", "")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        a = parse_args(argv)
    except UsageError as e:
        print(f"peers.py: {e}", file=sys.stderr)
        return 2
    if a.worker:
        return worker(a)
    # The children get the same flags, less any --json/--dry-run of the parent's.
    child_argv = strip_flags(argv, {"--json": True, "--dry-run": False})
    return parent(a, child_argv)


def strip_flags(argv, flags):
    """argv without the given flags (flag → takes a value)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in flags:
            skip = flags[name] and "=" not in arg
            continue
        out.append(arg)
    return out


if __name__ == "__main__":
    sys.exit(main())
