#!/usr/bin/env python3
"""Build a tiny random-weight diffusers QwenImagePipeline and record references for its text
encoder, its scheduler, its denoising loop and whole generations (latents to pixels).

Rerun (from the repository root, with the packages in scripts/requirements.txt, diffusers incl.):

    OMP_NUM_THREADS=1 python3 scripts/make_qwenimage_pipeline_fixture.py            # (re)write
    OMP_NUM_THREADS=1 python3 scripts/make_qwenimage_pipeline_fixture.py --verify   # re-check

No network access; weights and inputs come from fixed seeds (CPU, one thread). The text
encoder is written in bf16 and every reference is computed from the pipeline reloaded from
disk in float32, so the references belong to the files. --verify recomputes every tensor and
compares (|a-b| <= 1e-5 * max(1, max|b|)).

Directory tests/fixtures/qwen-image-pipeline/ (what QwenImagePipeline.save_pretrained writes):

    model_index.json        QwenImagePipeline
    scheduler/scheduler_config.json   Qwen/Qwen-Image's FlowMatchEulerDiscreteScheduler config
                            (dynamic exponential shift, base/max seq len 256/8192, base/max
                            shift 0.5/0.9, shift_terminal 0.02)
    text_encoder/{config.json,model.safetensors}   Qwen2_5_VLForConditionalGeneration, bf16:
                            the text model (2 layers, hidden 48, 3 heads of 16, 1 kv head,
                            q/k/v bias, mrope_section [2, 3, 3], rope_theta 1e6, vocab 448) in
                            the checkpoint names transformers writes (model.layers.*,
                            model.embed_tokens, model.norm, lm_head) and a 1-block vision
                            tower (visual.*) that ferry must ignore. config.json as
                            transformers 5 writes it: the text fields inside "text_config".
    tokenizer/{tokenizer.json,tokenizer_config.json}   the byte-level BPE of tests/fixtures/qwen3
                            (420 tokens, <|endoftext|>=0, <|im_start|>=1, <|im_end|>=2), class
                            Qwen2Tokenizer
    transformer/            a byte-for-byte copy of tests/fixtures/qwen-image/transformer
                            (joint_attention_dim 48 = the text encoder's hidden size)
    vae/                    a byte-for-byte copy of tests/fixtures/qwen-image/vae
                            (AutoencoderKLQwenImage, base_dim 8, z_dim 16)
    reference.safetensors   the tensors below, f32
    expected.json           versions, the cases' settings, token ids, tensor shapes

Text encoder cases (pipeline.encode_prompt on the list of prompts, as one padded batch):
    te.{name}.embeds   f32 [L_i, 48]  the valid rows of prompt_embeds for prompt i
    (the token ids of each prompt in its template are in expected.json)

Schedules (scheduler.set_timesteps(sigmas=np.linspace(1, 1/steps, steps), mu=calculate_shift(n))):
    schedule.{steps}x{n}.sigmas f32 [steps + 1], schedule.{steps}x{n}.timesteps f32 [steps]

Denoising cases (QwenImagePipeline(..., latents=noise, output_type="latent")):
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
import tempfile
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
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift  # noqa: E402
from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "qwen-image-pipeline"
DIT = ROOT / "tests" / "fixtures" / "qwen-image" / "transformer"
VAE = ROOT / "tests" / "fixtures" / "qwen-image" / "vae"
QWEN3_TOKENIZER = ROOT / "tests" / "fixtures" / "qwen3" / "tokenizer.json"

SEED_TEXT_ENCODER = 5001

TEXT_CONFIG = dict(
    vocab_size=448,
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=3,
    num_key_value_heads=1,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    rope_theta=1e6,
    rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
    bos_token_id=None,
    eos_token_id=2,
    pad_token_id=0,
)
VISION_CONFIG = dict(
    depth=1,
    hidden_size=16,
    num_heads=2,
    intermediate_size=32,
    out_hidden_size=48,
    patch_size=2,
    temporal_patch_size=2,
    spatial_merge_size=2,
    window_size=8,
    fullatt_block_indexes=[0],
)
# Qwen/Qwen-Image's scheduler/scheduler_config.json.
SCHEDULER_CONFIG = dict(
    base_image_seq_len=256,
    base_shift=0.5,
    invert_sigmas=False,
    max_image_seq_len=8192,
    max_shift=0.9,
    num_train_timesteps=1000,
    shift=1.0,
    shift_terminal=0.02,
    stochastic_sampling=False,
    time_shift_type="exponential",
    use_beta_sigmas=False,
    use_dynamic_shifting=True,
    use_exponential_sigmas=False,
    use_karras_sigmas=False,
)
TOKENIZER_CONFIG = {
    "add_prefix_space": False,
    "bos_token": None,
    "clean_up_tokenization_spaces": False,
    "eos_token": "<|im_end|>",
    "errors": "replace",
    "model_max_length": 131072,
    "pad_token": "<|endoftext|>",
    "split_special_tokens": False,
    "tokenizer_class": "Qwen2Tokenizer",
    "unk_token": None,
}

# Text encoder: two prompts of different lengths in one padded batch; a long prompt cut by
# max_sequence_length.
TE_CASES = [
    dict(name="pair", prompts=["a red fox in the snow", "a tiny blue house beside a calm lake at dawn, with mist"],
         max_sequence_length=512),
    dict(name="cut", prompts=["an old map of islands, rivers and mountains drawn in ink"], max_sequence_length=9),
]
SCHEDULES = [(3, 24), (4, 16), (50, 4096), (30, 6889)]
DENOISE_CASES = [
    dict(name="plain", prompt=["a red fox in the snow"], negative_prompt=None, true_cfg_scale=1.0,
         height=64, width=96, steps=3, seed=6001),
    dict(name="cfg", prompt=["a tiny blue house beside a calm lake at dawn"], negative_prompt=["blurry"],
         true_cfg_scale=4.0, height=96, width=64, steps=3, seed=6002),
    dict(name="batch", prompt=["a red fox in the snow", "a lighthouse on a cliff at night, stars above"],
         negative_prompt=["blurry, dark", "low quality"], true_cfg_scale=2.5, height=48, width=80, steps=2,
         seed=6003),
]


def init_weights(model: torch.nn.Module, seed: int) -> None:
    """Redraw every parameter from `seed` in sorted-name order: matrices N(0, 1/fan_in) (the
    embedding N(0, 1)), norm weights 1 + 0.1 N(0, 1), biases 0.1 N(0, 1). Nothing is zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith("bias"):
                v = 0.1 * torch.randn(p.shape, generator=g)
            elif p.dim() == 1:
                v = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
            elif "embed_tokens" in name:
                v = torch.randn(p.shape, generator=g)
            else:
                fan_in = p[0].numel()
                v = torch.randn(p.shape, generator=g) / fan_in**0.5
            p.copy_(v.to(p.dtype))


def write_pipeline(out: Path) -> None:
    with tempfile.TemporaryDirectory() as t:
        tdir = Path(t) / "tokenizer"
        tdir.mkdir()
        shutil.copyfile(QWEN3_TOKENIZER, tdir / "tokenizer.json")
        (tdir / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
        tokenizer = AutoTokenizer.from_pretrained(tdir)
        torch.manual_seed(SEED_TEXT_ENCODER)
        config = Qwen2_5_VLConfig(text_config=TEXT_CONFIG, vision_config=VISION_CONFIG)
        te = Qwen2_5_VLForConditionalGeneration(config).eval()
        init_weights(te, SEED_TEXT_ENCODER)
        te = te.to(torch.bfloat16)
        transformer = QwenImageTransformer2DModel.from_pretrained(DIT, torch_dtype=torch.bfloat16)
        vae = AutoencoderKLQwenImage.from_pretrained(VAE)
        pipe = QwenImagePipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
            vae=vae,
            text_encoder=te,
            tokenizer=tokenizer,
            transformer=transformer,
        )
        pipe.save_pretrained(out, safe_serialization=True)
    # The DiT byte for byte as the qwen-image fixture has it (its dtype and layout).
    for f in DIT.iterdir():
        shutil.copyfile(f, out / "transformer" / f.name)
    for f in VAE.iterdir():
        shutil.copyfile(f, out / "vae" / f.name)
    tok = out / "tokenizer"
    for extra in tok.iterdir():
        if extra.name not in ("tokenizer.json", "tokenizer_config.json"):
            extra.unlink()
    (tok / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2, sort_keys=True) + "\n")
    shutil.copyfile(QWEN3_TOKENIZER, tok / "tokenizer.json")


def load_pipeline(d: Path) -> QwenImagePipeline:
    pipe = QwenImagePipeline.from_pretrained(d, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for name in ("transformer", "text_encoder", "vae"):
        m = getattr(pipe, name)
        m.eval()
        assert {p.dtype for p in m.parameters()} == {torch.float32}, name
    return pipe


def te_case(pipe, case, tensors, record):
    template = pipe.prompt_template_encode
    ids = [pipe.tokenizer(template.format(p)).input_ids for p in case["prompts"]]
    with torch.no_grad():
        embeds, mask = pipe.encode_prompt(case["prompts"], device="cpu",
                                          max_sequence_length=case["max_sequence_length"])
    lengths = [int(mask[i].sum()) for i in range(len(ids))] if mask is not None else [embeds.shape[1]] * len(ids)
    for i, n in enumerate(lengths):
        tensors[f"te.{case['name']}.{i}"] = embeds[i, :n].contiguous()
    record["text_encoder"][case["name"]] = dict(
        prompts=case["prompts"], max_sequence_length=case["max_sequence_length"], ids=ids, lengths=lengths
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
    noise = QwenImagePipeline._pack_latents(torch.randn((b, 16, h, w), generator=g), b, 16, h, w)
    tensors[f"{name}.noise"] = noise.clone()

    def on_step_end(_pipe, i, _t, kwargs):
        tensors[f"{name}.step{i}"] = kwargs["latents"].clone()
        return {}

    with torch.no_grad():
        out = pipe(
            prompt=case["prompt"],
            negative_prompt=case["negative_prompt"],
            true_cfg_scale=case["true_cfg_scale"],
            height=case["height"],
            width=case["width"],
            num_inference_steps=case["steps"],
            latents=noise.clone(),
            output_type="latent",
            callback_on_step_end=on_step_end,
        ).images
    tensors[f"{name}.latents"] = out.clone()
    with torch.no_grad():
        image = pipe(
            prompt=case["prompt"],
            negative_prompt=case["negative_prompt"],
            true_cfg_scale=case["true_cfg_scale"],
            height=case["height"],
            width=case["width"],
            num_inference_steps=case["steps"],
            latents=noise.clone(),
            output_type="np",
        ).images
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
        # tokenizer-slow/ is scripts/make_slow_tokenizer_fixture.py's.
        for p in OUT.iterdir():
            if p.name != "tokenizer-slow":
                shutil.rmtree(p) if p.is_dir() else p.unlink()
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
