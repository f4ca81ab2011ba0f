r"""Time ferry's peers on one Z-Image or Flux DiT forward (= one denoising step), or on the
whole ZImagePipeline with --pipeline: diffusers 0.42.1 on random bf16 weights of the real
shapes, from a directory that `ferry synth --preset z-image-turbo` (or `--preset flux.1-dev`)
wrote.

DiT systems (--systems, comma-separated; default all), the rows of DESIGN.md's table:

  whole        the whole DiT on the GPU (ZImageTransformer2DModel.to("cuda")).
  group-block  diffusers group offloading, block level (one block a group), use_stream,
               record_stream: `transformer.enable_group_offload(onload_device=cuda,
               offload_device=cpu, offload_type="block_level", num_blocks_per_group=1,
               use_stream=True, record_stream=True)`. The blocks (layers, noise_refiner,
               context_refiner) are pinned in host memory and prefetched on a side stream;
               the embedders, pad tokens and final layer form diffusers' "unmatched" group.
  group-leaf   group offloading, leaf level, use_stream: every leaf module a group.
  accelerate   accelerate's `cpu_offload(transformer, execution_device=cuda)`: the weights in
               pageable host memory, each module's copied to the GPU when it runs.

Each system runs in its own process (a fresh CUDA context). A forward is what
ZImagePipeline's denoising loop calls once a step without guidance:
`transformer([latent[:, None]], t, [cap_feats], return_dict=False)` under
torch.inference_mode(), with latent [16, H/8, W/8] bf16 (1024×1024: [16, 128, 128], 4096
image tokens), t = 0.5 (f32, as the pipeline passes (1000 - timestep) / 1000) and cap_feats
[--caption-tokens, cap_feat_dim] bf16 (100 × 2560), all seeded normal noise. Reported: the
median of --runs timed forwards after --warmup untimed ones (group offloading learns the
block order in its first), the peak of torch.cuda.max_memory_allocated over the timed
forwards (the allocator's reserve and the driver's view beside it), the load time
(from_pretrained into host memory) and the set-up time (moving, pinning or hooking), and the
output's L2 norm (the same weights and inputs give about the same answer in every system).
The PCIe bound with nothing resident, the DiT's bytes / --h2d-gbps, heads the table.

A Flux DiT (FluxTransformer2DModel, from `ferry synth --preset flux.1-dev --out DIR`) gets what
FluxPipeline's loop passes it once a step: packed latents [1, (H/16)·(W/16), 64] bf16,
--caption-tokens T5 features [1, L, 4096] bf16 (the pipeline pads to 512: pass
--caption-tokens 512), CLIP's pooled [1, 768] bf16, timestep 0.5 (the pipeline's t / 1000),
guidance 3.5 (f32, where guidance_embeds), txt_ids zeros [L, 3] and img_ids (0, row, col).
The modulation is computed in every forward, as diffusers does; `ferry bench` precomputes it
by default (--modulation in-steps for the like-for-like row). --pipeline is Z-Image's alone.

--pipeline: the whole pipeline, prompt to PIL image at --size with --steps steps (8, as
Z-Image-Turbo) and guidance 0, `ZImagePipeline.from_pretrained(DIR, dtype=bf16)`, systems
  group-block  `pipe.enable_group_offload(...)` as above on every component (text encoder,
               DiT, VAE)
  whole        `pipe.to("cuda")`
timed from the call to the image, with each phase's share from forward hooks on the text
encoder, the DiT and the VAE's decoder (each synchronized at its start and end; "other" is
the rest: tokenizing, the scheduler, post-processing).

Peak memory is only read on a GPU; --device cpu runs the same code paths on the CPU (no
streams there: group offloading without use_stream) to check the script, e.g. with the tiny
preset:

    target/debug/ferry synth --preset z-image-tiny --out /tmp/zt
    OMP_NUM_THREADS=1 python3 bench/dit_peers.py /tmp/zt --device cpu --size 64x64 \
        --caption-tokens 8 --runs 3
    OMP_NUM_THREADS=1 python3 bench/dit_peers.py /tmp/zt --device cpu --size 64x64 --pipeline

On the GPU machine (torch 2.11, transformers 5.17, accelerate 1.15 are there; diffusers is
not and travels as a wheel, with the hub wheel it needs). Here, in the repository's root:

    cargo build --release && mkdir -p .gpu && strip -o .gpu/ferry target/release/ferry
    # .gpu/ and .whl/ are in .gitignore; the wheels (about 5 MB) and ferry travel in carry
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 -d .whl \
        diffusers==0.42.1 huggingface_hub==1.33.0

then device calls with carry [".gpu", ".whl"], each starting with

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit;

A machine is given back soon after a call, so each call writes its own directory first
(`ferry synth --only transformer`: the DiT's 12.3 GB, well inside the 64 GB disk, in about a
minute). Loading 12.3 GB, pinning it and timing a system takes one to two minutes, so two
systems a call stay inside the 10 minutes:

    .gpu/ferry synth --preset z-image-turbo --only transformer --out /tmp/zimage &&
    python3 bench/dit_peers.py /tmp/zimage --systems whole,group-block \
        --json $OUT/dit_peers_1.json
    ... the same with --systems group-leaf,accelerate --json $OUT/dit_peers_2.json

and the pipeline (every component, 20.5 GB; one system a call):

    .gpu/ferry synth --preset z-image-turbo --out /tmp/zimage-pipe &&
    python3 bench/dit_peers.py /tmp/zimage-pipe --pipeline --systems group-block \
        --json $OUT/dit_pipeline_group.json
    ... and --systems whole --json $OUT/dit_pipeline_whole.json

bench/peers.py is the same harness for language models.
"""

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import time

DIT_SYSTEMS = ("whole", "group-block", "group-leaf", "accelerate")
PIPELINE_SYSTEMS = ("whole", "group-block")
LABELS = {
    "whole": "whole on the GPU",
    "group-block": "group offloading block level, use_stream, record_stream",
    "group-leaf": "group offloading leaf level, use_stream",
    "accelerate": "accelerate cpu_offload",
}

# The process plumbing and formatting shared with the LLM peers (bench/peers.py, beside this
# file: only the standard library at import).
from peers import UsageError, human_bytes, one_line, strip_flags  # noqa: E402
from peers import run_system as run_peer_system  # noqa: E402

RESULT_PREFIX = "DIT_PEERS_RESULT "


def run_system(system, a, argv):
    """Run one system in a child process of this script; its result dict."""
    return run_peer_system(system, a, argv, script=__file__, prefix=RESULT_PREFIX)


# ---------------------------------------------------------------------------------------
# Sizes and the directory: no torch needed.

def human_count(n):
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def parse_image_size(text):
    """1024x1024 → (width, height), multiples of 16 (the VAE's 8 times the DiT's patch 2)."""
    m = re.fullmatch(r"\s*([0-9]+)\s*[xX]\s*([0-9]+)\s*", text)
    if not m:
        raise UsageError(f"--size: {text!r} is not WIDTHxHEIGHT (e.g. 1024x1024)")
    w, h = int(m.group(1)), int(m.group(2))
    if w <= 0 or h <= 0 or w % 16 or h % 16:
        raise UsageError(f"--size: {w}x{h}: width and height must be positive multiples of 16")
    return w, h


def read_json(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UsageError(f"{path}: not found ({what})")
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: malformed JSON: {e}")


def weight_bytes(component_dir):
    """Bytes of tensor data of a component: its index's total_size, else the size of its
    single safetensors file less the header."""
    for stem in ("diffusion_pytorch_model", "model"):
        index = os.path.join(component_dir, f"{stem}.safetensors.index.json")
        if os.path.isfile(index):
            return read_json(index, "the shard index")["metadata"]["total_size"]
        single = os.path.join(component_dir, f"{stem}.safetensors")
        if os.path.isfile(single):
            with open(single, "rb") as f:
                header = int.from_bytes(f.read(8), "little")
            return os.path.getsize(single) - 8 - header
    raise UsageError(f"{component_dir}: no safetensors weights (expected "
                     "diffusion_pytorch_model.safetensors or its .index.json)")


def flux_params(c):
    """Parameters of a FluxTransformer2DModel config (counted by hand, as dit_params)."""
    d = c["num_attention_heads"] * c["attention_head_dim"]
    hd, ffn, pin = c["attention_head_dim"], 4 * d, c["in_channels"]
    out = c.get("out_channels") or pin
    mlp = 256 * d + d + d * d + d  # a TimestepEmbedding
    embed = mlp * (2 if c.get("guidance_embeds") else 1)
    embed += c["pooled_projection_dim"] * d + d + d * d + d  # text_embedder
    embed += pin * d + d + c["joint_attention_dim"] * d + d  # x_embedder, context_embedder
    double = 2 * (6 * d * d + 6 * d) + 2 * (4 * (d * d + d) + 2 * hd) + 2 * (2 * d * ffn + ffn + d)
    single = 3 * d * d + 3 * d + 3 * (d * d + d) + 2 * hd + d * ffn + ffn + (d + ffn) * d + d
    final = 2 * d * d + 2 * d + d * out + out
    return embed + c["num_layers"] * double + c["num_single_layers"] * single + final


DIT_CLASSES = ("ZImageTransformer2DModel", "FluxTransformer2DModel")


def is_flux(a):
    return a.config["_class_name"] == "FluxTransformer2DModel"


def dit_params(c):
    """Parameters of a ZImageTransformer2DModel config (diffusers' module tree, counted by
    hand so that the parent needs no torch)."""
    d, cap, pin = c["dim"], c["cap_feat_dim"], 4 * c["in_channels"]
    ffn, ada, hd = int(d / 3 * 8), min(d, 256), d // c["n_heads"]
    block = 4 * d * d + 4 * d + 3 * d * ffn + (2 * hd if c.get("qk_norm", True) else 0)
    adaln = 4 * d * ada + 4 * d
    embed = (256 * 1024 + 1024 + 1024 * ada + ada) + (pin * d + d) + (cap + cap * d + d) + 2 * d
    final = d * ada + d + pin * d + pin
    mod = c["n_layers"] + c["n_refiner_layers"]
    return embed + mod * (block + adaln) + c["n_refiner_layers"] * block + final


# ---------------------------------------------------------------------------------------
# Arguments.

def parse_args(argv):
    ap = argparse.ArgumentParser(
        description="Time diffusers (whole on the GPU, group offloading) and accelerate "
                    "cpu_offload on one Z-Image DiT forward, or the whole pipeline.",
        epilog="See the module docstring for what each system does and what is measured.")
    ap.add_argument("dir", help="a diffusers Z-Image directory (ferry synth --preset "
                                "z-image-turbo --out DIR); the DiT mode needs only its "
                                "transformer/")
    ap.add_argument("--pipeline", action="store_true",
                    help="time the whole pipeline (text encoder, --steps DiT steps, VAE "
                         "decode) instead of one DiT forward")
    ap.add_argument("--systems", help="comma-separated; DiT: "
                                      f"{', '.join(DIT_SYSTEMS)} (default all); --pipeline: "
                                      f"{', '.join(PIPELINE_SYSTEMS)} (default all)")
    ap.add_argument("--size", default="1024x1024", help="image WIDTHxHEIGHT (default "
                                                         "1024x1024: latent 128x128)")
    ap.add_argument("--caption-tokens", type=int, default=100,
                    help="caption features the DiT gets (default 100)")
    ap.add_argument("--steps", type=int, default=8, help="--pipeline: denoising steps")
    ap.add_argument("--prompt", default="a red fox sitting in the snow at sunset, soft light",
                    help="--pipeline: the prompt")
    ap.add_argument("--runs", type=int, default=5, help="timed runs (the median is reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    ap.add_argument("--seed", type=int, default=1, help="seed of the inputs")
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (to check the "
                                                     "code paths without a GPU)")
    ap.add_argument("--h2d-gbps", type=float, default=54.8,
                    help="host-to-device GB/s for the bound with nothing resident (default "
                         "54.8, the H200 machine's registered-memory copy)")
    ap.add_argument("--timeout", type=float, default=560.0,
                    help="seconds allowed for each system's process")
    ap.add_argument("--json", metavar="FILE", help="also write the results here")
    ap.add_argument("--dry-run", action="store_true",
                    help="print what would run; import no torch")
    ap.add_argument("--worker", choices=DIT_SYSTEMS, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    a.transformer_dir = os.path.join(a.dir, "transformer")
    if not os.path.isdir(a.transformer_dir):
        raise UsageError(f"{a.transformer_dir}: not found (expected a diffusers directory "
                         "with transformer/, e.g. from ferry synth --preset z-image-turbo)")
    a.config = read_json(os.path.join(a.transformer_dir, "config.json"),
                         "the transformer's config")
    if a.config.get("_class_name") not in DIT_CLASSES:
        raise UsageError(f"{a.transformer_dir}/config.json: _class_name "
                         f"{a.config.get('_class_name')!r}; expected one of "
                         + ", ".join(DIT_CLASSES))
    if a.pipeline and is_flux(a):
        raise UsageError("--pipeline: Z-Image's alone; a Flux DiT is timed one forward at a "
                         "time")
    if a.pipeline:
        index = os.path.join(a.dir, "model_index.json")
        cls = read_json(index, "--pipeline needs the whole pipeline: ferry synth without "
                               "--only").get("_class_name")
        if cls != "ZImagePipeline":
            raise UsageError(f"{index}: _class_name {cls!r}; expected ZImagePipeline")
        for c in ("text_encoder", "tokenizer", "vae", "scheduler"):
            if not os.path.isdir(os.path.join(a.dir, c)):
                raise UsageError(f"{os.path.join(a.dir, c)}: not found (--pipeline needs "
                                 "every component: ferry synth without --only)")
    a.width, a.height = parse_image_size(a.size)
    if a.caption_tokens < 1:
        raise UsageError("--caption-tokens: expected at least 1")
    if a.steps < 1:
        raise UsageError("--steps: expected at least 1")
    if a.runs < 1:
        raise UsageError("--runs: expected at least 1")
    if a.warmup < 1:
        raise UsageError("--warmup: expected at least 1 (group offloading learns the block "
                         "order in its first run)")
    if not a.h2d_gbps > 0:
        raise UsageError("--h2d-gbps: expected a positive rate")
    if not re.fullmatch(r"cpu|cuda(:[0-9]+)?", a.device):
        raise UsageError(f"--device: {a.device!r}; expected cuda, cuda:N or cpu")
    known = PIPELINE_SYSTEMS if a.pipeline else DIT_SYSTEMS
    a.system_list = [s.strip() for s in (a.systems or ",".join(known)).split(",") if s.strip()]
    unknown = [s for s in a.system_list if s not in known]
    if unknown or not a.system_list:
        raise UsageError(f"--systems: {','.join(unknown) or 'nothing'}; expected some of "
                         + ", ".join(known) + (" (with --pipeline)" if a.pipeline else ""))
    return a


# ---------------------------------------------------------------------------------------
# The parent: run each system in its own process, report.

def card_info(a):
    """(name, total bytes, driver) of the card from nvidia-smi, so that this process never
    touches CUDA; Nones where that fails or on the CPU."""
    if a.device == "cpu":
        return None, None, None
    index = a.device.split(":")[1] if ":" in a.device else "0"
    try:
        out = subprocess.run(["nvidia-smi", "-i", index,
                              "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout
        name, total, driver = [x.strip() for x in out.strip().split(",")]
        return name, int(total) * 2**20, driver
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None, None, None


def describe_model(a):
    c = a.config
    if is_flux(a):
        return dict(source=os.path.abspath(a.transformer_dir), class_name=c["_class_name"],
                    dim=c["num_attention_heads"] * c["attention_head_dim"],
                    num_layers=c["num_layers"], num_single_layers=c["num_single_layers"],
                    joint_attention_dim=c["joint_attention_dim"],
                    in_channels=c["in_channels"], parameters=flux_params(c),
                    weight_bytes=weight_bytes(a.transformer_dir))
    return dict(class_name=c["_class_name"], source=os.path.abspath(a.transformer_dir),
                dim=c["dim"], n_layers=c["n_layers"], n_refiner_layers=c["n_refiner_layers"],
                n_heads=c["n_heads"], cap_feat_dim=c["cap_feat_dim"],
                in_channels=c["in_channels"], parameters=dit_params(c),
                weight_bytes=weight_bytes(a.transformer_dir))


def table(report):
    """The results as a table for people."""
    m, lat = report["model"], report["latent_shape"]
    bound = report["bound_seconds"]
    if m["class_name"] == "FluxTransformer2DModel":
        shape = (f"dim {m['dim']}, {m['num_layers']} double + {m['num_single_layers']} single "
                 "blocks")
    else:
        shape = f"dim {m['dim']}, {m['n_layers']} layers + 2 × {m['n_refiner_layers']} refiners"
    lines = [
        f"model   {m['source']} ({m['class_name']}, {shape}, "
        f"{human_count(m['parameters'])} params, {human_bytes(m['weight_bytes'])})",
    ]
    if report["mode"] == "dit":
        lines.append(
            f"pass    one DiT forward: latent {lat} ({report['width']}x{report['height']}, "
            f"{report['image_tokens']} image tokens), {report['caption_tokens']} caption "
            f"tokens; median of {report['runs']} after {report['warmup']} warm-up")
    else:
        lines.append(
            f"pass    the pipeline, prompt to image: {report['width']}x{report['height']}, "
            f"{report['steps']} steps, guidance 0, {report.get('prompt_tokens', '?')} prompt "
            f"tokens (synthetic tokenizer); median of {report['runs']} after "
            f"{report['warmup']} warm-up")
    versions = ", ".join(f"{k} {report[k]}" for k in ("diffusers", "torch", "transformers",
                                                       "accelerate") if report.get(k))
    lines += [
        f"device  {report.get('card') or report['device']}"
        + (f" (driver {report['driver']})" if report.get("driver") else "")
        + f"; {report['date']}; {versions or 'no results'}",
        f"bound   {m['weight_bytes'] / 1e9:.3g} GB / {report['h2d_gbps']} GB/s = {bound:.3g} s "
        "a DiT forward with nothing resident",
    ]
    if report["device"] == "cpu":
        lines.append("note    --device cpu: each row's code path on the CPU (no streams, no "
                     "memory figures); only a check of this script")
    lines.append("")
    if report["mode"] == "dit":
        lines.append(f"{'system':<57} {'forward s':>9} {'min–max s':>15} {'peak alloc':>11} "
                     f"{'reserved':>11} {'setup s':>8} {'load s':>7} {'out L2':>9}")
    else:
        lines.append(f"{'system':<57} {'image s':>9} {'text enc.':>13} {'DiT steps':>13} "
                     f"{'VAE':>13} {'other':>6} {'peak alloc':>11} {'setup s':>8} "
                     f"{'load s':>7}")
    for r in report["results"]:
        label = LABELS.get(r["system"], r["system"])
        if r["status"] != "ok":
            lines.append(f"{label:<57} {r['status']:>9}  {r['reason']}")
            continue
        lo, hi = min(r["seconds_all"]), max(r["seconds_all"])
        if report["mode"] == "dit":
            lines.append(
                f"{label:<57} {r['seconds_median']:>9.4f} {f'{lo:.4f}–{hi:.4f}':>15} "
                f"{human_bytes(r.get('peak_allocated_bytes')):>11} "
                f"{human_bytes(r.get('peak_reserved_bytes')):>11} {r['setup_seconds']:>8.1f} "
                f"{r['load_seconds']:>7.1f} {r['output_l2']:>9.4g}")
        else:
            ph = r["phases_median"]
            total = r["seconds_median"]

            def share(k):
                return f"{ph[k]:.3f} ({100 * ph[k] / total:.0f}%)"
            lines.append(
                f"{label:<57} {total:>9.3f} {share('text_encoder'):>13} "
                f"{share('transformer'):>13} {share('vae'):>13} "
                f"{100 * ph['other'] / total:>5.0f}% "
                f"{human_bytes(r.get('peak_allocated_bytes')):>11} {r['setup_seconds']:>8.1f} "
                f"{r['load_seconds']:>7.1f}")
    return "\n".join(lines)


def parent(a, argv):
    card, card_bytes, driver = card_info(a)
    model = describe_model(a)
    h, w = a.height // 8, a.width // 8
    report = dict(
        tool="bench/dit_peers.py",
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        mode="pipeline" if a.pipeline else "dit", device=a.device, card=card,
        card_total_bytes=card_bytes, driver=driver, model=model,
        width=a.width, height=a.height,
        latent_shape=[1, a.config["in_channels"] // (4 if is_flux(a) else 1), h, w],
        image_tokens=(h // 2) * (w // 2), caption_tokens=a.caption_tokens, steps=a.steps,
        runs=a.runs, warmup=a.warmup, seed=a.seed, h2d_gbps=a.h2d_gbps,
        bound_seconds=model["weight_bytes"] / (a.h2d_gbps * 1e9), results=[])
    if a.pipeline:
        report.pop("caption_tokens")
        report["prompt"] = a.prompt
    else:
        report.pop("steps")
    for system in a.system_list:
        if a.dry_run:
            r = dict(system=system, status="dry-run",
                     reason="would run: " + " ".join(worker_command(system, argv)))
        else:
            print(f"[dit_peers] {system} …", file=sys.stderr, flush=True)
            r = run_system(system, a, argv)
        if r["status"] != "ok":
            print(f"[dit_peers] {system}: {r['status']}: {r['reason']}", file=sys.stderr)
        report["results"].append(r)
        for key in ("card", "cuda", "torch", "diffusers", "transformers", "accelerate",
                    "prompt_tokens"):
            if r.get(key):
                report[key] = report.get(key) or r[key]
        if a.json:  # after each system, so that a run cut short keeps what it measured
            with open(a.json, "w") as f:
                json.dump(report, f, indent=1)
                f.write("\n")
    print(table(report))
    return 0


# ---------------------------------------------------------------------------------------
# The child: one system, one process.

def worker(a):
    """Run one system; print its result as one JSON line."""
    result = dict(system=a.worker, label=LABELS[a.worker], status="ok")
    try:
        return measure(a, result)
    except Exception as e:  # a peer's failure is a row in the report, not a crash
        result.update(status="failed", reason=f"{type(e).__name__}: {one_line(e)}")
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        raise


def offload_kwargs(system, device, torch):
    """enable_group_offload's arguments for `system` (no streams on the CPU)."""
    stream = device.type == "cuda"
    kw = dict(onload_device=device, offload_device=torch.device("cpu"), use_stream=stream)
    if system == "group-block":
        kw.update(offload_type="block_level", num_blocks_per_group=1, record_stream=stream)
    else:
        kw.update(offload_type="leaf_level")
    return kw


def place(system, model, device, torch):
    """Put `model` (in host memory) where `system` runs it; a note on how."""
    if system == "whole":
        model.to(device)
        return f"whole on the {device.type.upper()}"
    if system == "accelerate":
        from accelerate import cpu_offload
        cpu_offload(model, execution_device=device)
        return "cpu_offload"
    kw = offload_kwargs(system, device, torch)
    model.enable_group_offload(**kw)
    return (f"enable_group_offload({kw['offload_type']}"
            + (", num_blocks_per_group=1" if "num_blocks_per_group" in kw else "")
            + (", use_stream" if kw["use_stream"] else ", no stream (CPU)")
            + (", record_stream" if kw.get("record_stream") else "") + ")")


def measure(a, result):
    """The body of `worker`: fills `result` and prints it."""
    system = a.worker

    def finish(status, reason):
        result.update(status=status, reason=reason)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return 0

    try:
        import torch
        import diffusers
        import transformers
    except ImportError as e:
        return finish("skipped", f"torch, diffusers or transformers not importable: {e}")
    result.update(torch=torch.__version__, diffusers=diffusers.__version__,
                  transformers=transformers.__version__, device=a.device)
    if system == "accelerate":
        try:
            import accelerate
        except ImportError as e:
            return finish("skipped", f"accelerate is not installed here ({e})")
        result["accelerate"] = accelerate.__version__

    cuda = a.device != "cpu"
    device = torch.device(a.device)
    if cuda and device.index is None:
        device = torch.device("cuda", 0)
    free0 = None
    if cuda:
        if not torch.cuda.is_available():
            return finish("skipped", "torch sees no CUDA device")
        torch.cuda.set_device(device)
        result.update(card=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
        free0, _ = torch.cuda.mem_get_info(device)

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    try:
        if a.pipeline:
            times = pipeline_runs(a, result, torch, device, sync)
        else:
            times = dit_runs(a, result, torch, device, sync)
    except torch.OutOfMemoryError as e:
        print(str(e), file=sys.stderr)
        what = ". ".join(one_line(e).split(". ")[:2]).rstrip(".")
        return finish("skipped", f"out of memory on the card: {what}")

    result.update(seconds_median=statistics.median(times), seconds_all=times)
    if cuda:
        result.update(peak_allocated_bytes=torch.cuda.max_memory_allocated(device),
                      peak_reserved_bytes=torch.cuda.max_memory_reserved(device),
                      driver_used_bytes=free0 - torch.cuda.mem_get_info(device)[0])
    return finish("ok", "")


def dit_runs(a, result, torch, device, sync):
    """Load, place and time the DiT; the timed forwards' seconds."""
    if is_flux(a):
        return flux_runs(a, result, torch, device, sync)
    from diffusers import ZImageTransformer2DModel

    t = time.perf_counter()
    model = ZImageTransformer2DModel.from_pretrained(a.transformer_dir,
                                                     dtype=torch.bfloat16).eval()
    result["load_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    result["note"] = place(a.worker, model, device, torch)
    sync()
    result["setup_seconds"] = time.perf_counter() - t

    c = a.config
    gen = torch.Generator().manual_seed(a.seed)
    latent = torch.randn(c["in_channels"], a.height // 8, a.width // 8, generator=gen)
    caption = torch.randn(a.caption_tokens, c["cap_feat_dim"], generator=gen)
    x = [latent.to(device, torch.bfloat16).unsqueeze(1)]  # [C, F=1, H, W] each
    cap_feats = [caption.to(device, torch.bfloat16)]
    timestep = torch.tensor([0.5], device=device)  # (1000 - t) / 1000, f32 as the pipeline's

    def forward():
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            out = model(x, timestep, cap_feats, return_dict=False)[0]
        sync()
        elapsed = time.perf_counter() - t
        result["output_l2"] = float(out[0].float().norm())
        result["output_shape"] = list(out[0].shape)
        del out
        return elapsed

    for _ in range(a.warmup):
        forward()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return [forward() for _ in range(a.runs)]


def flux_runs(a, result, torch, device, sync):
    """dit_runs for a Flux DiT: one forward as FluxPipeline's loop makes it."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    t = time.perf_counter()
    model = FluxTransformer2DModel.from_pretrained(a.transformer_dir,
                                                   dtype=torch.bfloat16).eval()
    result["load_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    result["note"] = place(a.worker, model, device, torch)
    sync()
    result["setup_seconds"] = time.perf_counter() - t

    c = a.config
    gen = torch.Generator().manual_seed(a.seed)
    h, w = a.height // 8, a.width // 8
    channels = c["in_channels"] // 4
    latent = torch.randn(1, channels, h, w, generator=gen)
    x = FluxPipeline._pack_latents(latent, 1, channels, h, w).to(device, torch.bfloat16)
    text = torch.randn(1, a.caption_tokens, c["joint_attention_dim"], generator=gen)
    text = text.to(device, torch.bfloat16)
    pooled = torch.randn(1, c["pooled_projection_dim"], generator=gen)
    pooled = pooled.to(device, torch.bfloat16)
    txt_ids = torch.zeros(a.caption_tokens, 3, device=device, dtype=torch.bfloat16)
    img_ids = FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, device, torch.bfloat16)
    timestep = torch.tensor([0.5], device=device, dtype=torch.bfloat16)  # t / 1000
    guidance = (torch.tensor([3.5], device=device, dtype=torch.float32)
                if c.get("guidance_embeds") else None)

    def forward():
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            out = model(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled,
                        timestep=timestep, img_ids=img_ids, txt_ids=txt_ids, guidance=guidance,
                        return_dict=False)[0]
        sync()
        elapsed = time.perf_counter() - t
        result["output_l2"] = float(out[0].float().norm())
        result["output_shape"] = list(out[0].shape)
        del out
        return elapsed

    for _ in range(a.warmup):
        forward()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return [forward() for _ in range(a.runs)]


def pipeline_runs(a, result, torch, device, sync):
    """Load, place and time the whole pipeline; the timed runs' seconds, with each phase's
    median in result["phases_median"]."""
    from diffusers import ZImagePipeline

    t = time.perf_counter()
    pipe = ZImagePipeline.from_pretrained(a.dir, dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    result["load_seconds"] = time.perf_counter() - t
    # As _encode_prompt templates it; the synthetic tokenizer makes more tokens of a prompt
    # than Qwen's would (few merges), and the DiT's cost grows with them.
    text = pipe.tokenizer.apply_chat_template([{"role": "user", "content": a.prompt}],
                                              tokenize=False, add_generation_prompt=True,
                                              enable_thinking=True)
    result["prompt_tokens"] = len(pipe.tokenizer(text).input_ids)
    t = time.perf_counter()
    if a.worker == "whole":
        pipe.to(device)
        result["note"] = f"pipe.to({device.type!r})"
    else:
        kw = offload_kwargs(a.worker, device, torch)
        pipe.enable_group_offload(**kw)
        result["note"] = ("pipe.enable_group_offload(block_level, num_blocks_per_group=1"
                          + (", use_stream, record_stream)" if kw["use_stream"]
                             else ", no stream (CPU))") + " on every component")
    sync()
    result["setup_seconds"] = time.perf_counter() - t

    # Each phase's time, from its module's forward: synchronized at both ends.
    phases = {"text_encoder": pipe.text_encoder, "transformer": pipe.transformer,
              "vae": pipe.vae.decoder}
    spent, started = dict.fromkeys(phases, 0.0), {}
    for name, module in phases.items():
        def pre(_m, _args, name=name):
            sync()
            started[name] = time.perf_counter()

        def post(_m, _args, _out, name=name):
            sync()
            spent[name] += time.perf_counter() - started.pop(name)
        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    def run(seed):
        for k in spent:
            spent[k] = 0.0
        sync()
        t = time.perf_counter()
        image = pipe(a.prompt, height=a.height, width=a.width, num_inference_steps=a.steps,
                     guidance_scale=0.0, generator=torch.Generator().manual_seed(seed)).images[0]
        sync()
        total = time.perf_counter() - t
        shares = dict(spent, other=total - sum(spent.values()))
        result["image_size"] = list(image.size)
        return total, shares

    for i in range(a.warmup):
        run(a.seed + i)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs = [run(a.seed) for _ in range(a.runs)]
    result["phases_all"] = [p for _, p in runs]
    result["phases_median"] = {k: statistics.median(p[k] for _, p in runs)
                               for k in runs[0][1]}
    result["dit_step_seconds_median"] = result["phases_median"]["transformer"] / a.steps
    return [t for t, _ in runs]


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        a = parse_args(argv)
    except UsageError as e:
        print(f"dit_peers.py: {e}", file=sys.stderr)
        return 2
    if a.worker:
        if a.pipeline and a.worker not in PIPELINE_SYSTEMS:
            print(f"dit_peers.py: --worker {a.worker}: not a --pipeline system", file=sys.stderr)
            return 2
        return worker(a)
    # The children get the same flags, less the parent's --json/--dry-run.
    child_argv = strip_flags(argv, {"--json": True, "--dry-run": False})
    return parent(a, child_argv)


if __name__ == "__main__":
    sys.exit(main())
