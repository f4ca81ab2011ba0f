#!/usr/bin/env python3
"""Build a tiny random-weight diffusers FluxPipeline and record references for its text
encoders, its scheduler, its denoising loop and whole generations (latents to pixels).

Rerun (from the repository root, with the packages in scripts/requirements.txt, diffusers incl.;
after scripts/make_flux_text_fixture.py, whose components it takes):

    OMP_NUM_THREADS=1 python3 scripts/make_flux_pipeline_fixture.py            # (re)write
    OMP_NUM_THREADS=1 python3 scripts/make_flux_pipeline_fixture.py --verify   # re-check

No network access; weights and inputs come from fixed seeds (CPU, one thread). The DiT is
written in bf16 and every reference is computed from the pipeline reloaded from disk in
float32, so the references belong to the files. --verify recomputes every tensor and compares
(|a-b| <= 1e-5 * max(1, max|b|)).

Directory tests/fixtures/flux-pipeline/ (what FluxPipeline.save_pretrained writes):

    model_index.json        FluxPipeline
    scheduler/scheduler_config.json   black-forest-labs/FLUX.1-dev's FlowMatchEulerDiscreteScheduler
                            config (dynamic exponential shift, base/max seq len 256/4096, base/max
                            shift 0.5/1.15)
    text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/   byte-for-byte copies of
                            tests/fixtures/flux-text (CLIP-L-like hidden 32; T5 d_model 32)
    transformer/            FluxTransformer2DModel, bf16: 1 double block, 2 single blocks, 2 heads
                            of 16, axes (4, 6, 6), in_channels 64, joint_attention_dim 32,
                            pooled_projection_dim 32, guidance_embeds
    vae/                    a byte-for-byte copy of tests/fixtures/z-image/vae (AutoencoderKL,
                            16 latent channels, scaling 0.3611, shift 0.1159)
    reference.safetensors   the tensors below, f32
    expected.json           versions, the cases' settings, token ids, tensor shapes

Text encoder cases (pipeline.encode_prompt):
    te.{name}.t5       f32 [B, L, 32]  prompt_embeds (T5, padded to max_sequence_length)
    te.{name}.pooled   f32 [B, 32]     pooled_prompt_embeds (CLIP)

Schedules (scheduler.set_timesteps(sigmas=np.linspace(1, 1/steps, steps), mu=calculate_shift(n))):
    schedule.{steps}x{n}.sigmas f32 [steps + 1], schedule.{steps}x{n}.timesteps f32 [steps]

Denoising cases (FluxPipeline(..., latents=noise)):
    {case}.noise     f32 [B, (h/16)(w/16), 64]  the packed latents passed as latents=
    {case}.step{i}   f32 [B, (h/16)(w/16), 64]  the latents after step i
    {case}.latents   f32 [B, (h/16)(w/16), 64]  the final (packed) latents
    {case}.image     f32 [B, H, W, 3]  the same generation to pixels (output_type="np", in
                     [0, 1]; the pipeline's PNG bytes are round(255 x))
"""

import argparse
import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift  # noqa: E402
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "flux-pipeline"
TEXT = ROOT / "tests" / "fixtures" / "flux-text"
VAE = ROOT / "tests" / "fixtures" / "z-image" / "vae"

SEED_TRANSFORMER = 7001

TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=64,
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)
# black-forest-labs/FLUX.1-dev's scheduler/scheduler_config.json.
SCHEDULER_CONFIG = dict(
    base_image_seq_len=256,
    base_shift=0.5,
    max_image_seq_len=4096,
    max_shift=1.15,
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
)

TE_CASES = [
    dict(name="pair", prompts=["a red fox in the snow", "a tiny blue house beside a calm lake at dawn"],
         max_sequence_length=512),
    dict(name="cut", prompts=["an old map of islands, rivers and mountains drawn in ink"], max_sequence_length=8),
]
SCHEDULES = [(3, 12), (28, 4096), (50, 1024), (4, 6889)]
DENOISE_CASES = [
    dict(name="plain", prompt=["a red fox in the snow"], guidance_scale=3.5, height=64, width=48, steps=3,
         max_sequence_length=512, seed=8001),
    dict(name="short", prompt=["a lighthouse on a cliff at night"], guidance_scale=5.0, height=48, width=80,
         steps=2, max_sequence_length=16, seed=8002),
    dict(name="batch", prompt=["a red fox in the snow", "a lighthouse on a cliff at night, stars above"],
         guidance_scale=2.0, height=32, width=64, steps=2, max_sequence_length=64, seed=8003),
]


def init_weights(model: torch.nn.Module, seed: int) -> None:
    """Redraw every parameter from `seed` in sorted-name order: matrices N(0, 1/fan_in), norm
    weights 1 + 0.1 N(0, 1), biases 0.1 N(0, 1). Nothing is zero (diffusers zero-inits the
    output projections, which would make every step's velocity 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith("bias"):
                v = 0.1 * torch.randn(p.shape, generator=g)
            elif p.dim() == 1:
                v = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
            else:
                fan_in = p[0].numel()
                v = torch.randn(p.shape, generator=g) / fan_in**0.5
            p.copy_(v.to(p.dtype))


def write_pipeline(out: Path) -> None:
    transformer = FluxTransformer2DModel(**TRANSFORMER_CONFIG).eval()
    init_weights(transformer, SEED_TRANSFORMER)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=AutoencoderKL.from_pretrained(VAE),
        text_encoder=CLIPTextModel.from_pretrained(TEXT / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(TEXT / "tokenizer"),
        text_encoder_2=T5EncoderModel.from_pretrained(TEXT / "text_encoder_2"),
        tokenizer_2=T5TokenizerFast.from_pretrained(TEXT / "tokenizer_2"),
        transformer=transformer.to(torch.bfloat16),
    )
    pipe.save_pretrained(out, safe_serialization=True)
    # The components taken from other fixtures byte for byte as they are there.
    for name, src in [("vae", VAE)] + [(c, TEXT / c) for c in
                                        ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")]:
        dst = out / name
        shutil.rmtree(dst)
        shutil.copytree(src, dst)


def load_pipeline(d: Path) -> FluxPipeline:
    pipe = FluxPipeline.from_pretrained(d, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        m = getattr(pipe, name)
        m.eval()
        assert {p.dtype for p in m.parameters()} == {torch.float32}, name
    return pipe


def te_case(pipe, case, tensors, record):
    with torch.no_grad():
        t5, pooled, _ids = pipe.encode_prompt(case["prompts"], prompt_2=None, device="cpu",
                                              max_sequence_length=case["max_sequence_length"])
    tensors[f"te.{case['name']}.t5"] = t5.clone()
    tensors[f"te.{case['name']}.pooled"] = pooled.clone()
    n = case["max_sequence_length"]
    t5_ids = pipe.tokenizer_2(case["prompts"], padding="max_length", max_length=n, truncation=True).input_ids
    clip_ids = pipe.tokenizer(case["prompts"], padding="max_length", max_length=pipe.tokenizer_max_length,
                              truncation=True).input_ids
    record["text_encoder"][case["name"]] = dict(
        prompts=case["prompts"], max_sequence_length=n, t5_ids=t5_ids, clip_ids=clip_ids
    )


def schedule(steps, n, tensors):
    s = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
    c = s.config
    mu = calculate_shift(n, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    s.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    tensors[f"schedule.{steps}x{n}.sigmas"] = s.sigmas.float().clone()
    tensors[f"schedule.{steps}x{n}.timesteps"] = s.timesteps.float().clone()


def denoise_case(pipe, case, tensors, record):
    name, b = case["name"], len(case["prompt"])
    h, w = case["height"] // 8, case["width"] // 8
    g = torch.Generator().manual_seed(case["seed"])
    noise = FluxPipeline._pack_latents(torch.randn((b, 16, h, w), generator=g), b, 16, h, w)
    tensors[f"{name}.noise"] = noise.clone()

    def on_step_end(_pipe, i, _t, kwargs):
        tensors[f"{name}.step{i}"] = kwargs["latents"].clone()
        return {}

    args = dict(
        prompt=case["prompt"],
        guidance_scale=case["guidance_scale"],
        height=case["height"],
        width=case["width"],
        num_inference_steps=case["steps"],
        max_sequence_length=case["max_sequence_length"],
    )
    with torch.no_grad():
        out = pipe(**args, latents=noise.clone(), output_type="latent", callback_on_step_end=on_step_end).images
        tensors[f"{name}.latents"] = out.clone()
        image = pipe(**args, latents=noise.clone(), output_type="np").images
    tensors[f"{name}.image"] = torch.from_numpy(image.copy())
    record["denoise"][name] = {k: v for k, v in case.items() if k != "name"}


def compute(d: Path):
    pipe = load_pipeline(d)
    tensors, record = {}, {"text_encoder": {}, "denoise": {}}
    for case in TE_CASES:
        te_case(pipe, case, tensors, record)
    for steps, n in SCHEDULES:
        schedule(steps, n, tensors)
    for case in DENOISE_CASES:
        denoise_case(pipe, case, tensors, record)
    tensors = {k: v.float().contiguous() for k, v in tensors.items()}
    return tensors, record


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--verify", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.verify:
        got, _ = compute(OUT)
        want = load_file(OUT / "reference.safetensors")
        assert sorted(got) == sorted(want), (sorted(got), sorted(want))
        for k in want:
            a, b = got[k], want[k]
            tol = 1e-5 * max(1.0, b.abs().max().item())
            assert a.shape == b.shape and (a - b).abs().max().item() <= tol, k
        print(f"verified {len(want)} tensors")
        return
    if OUT.exists():
        shutil.rmtree(OUT)
    write_pipeline(OUT)
    tensors, record = compute(OUT)
    save_file(tensors, OUT / "reference.safetensors")
    record["versions"] = dict(torch=torch.__version__, diffusers=diffusers.__version__,
                              transformers=transformers.__version__)
    record["shapes"] = {k: list(v.shape) for k, v in sorted(tensors.items())}
    (OUT / "expected.json").write_text(json.dumps(record, indent=1) + "\n")
    for p in sorted(OUT.rglob("*")):
        if p.is_file():
            print(f"{p.stat().st_size:8d} {p.relative_to(OUT)}")


if __name__ == "__main__":
    main()
