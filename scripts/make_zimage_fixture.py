#!/usr/bin/env python3
"""Build a tiny random-weight diffusers Z-Image pipeline and record reference outputs.

Rerun (from the repository root, with the packages in scripts/requirements.txt, diffusers incl.):

    OMP_NUM_THREADS=1 python3 scripts/make_zimage_fixture.py            # (re)write the fixture
    OMP_NUM_THREADS=1 python3 scripts/make_zimage_fixture.py --verify   # re-check the committed one
    OMP_NUM_THREADS=1 python3 scripts/make_zimage_fixture.py --bf16     # (re)write reference_bf16.safetensors

reference_bf16.safetensors: the DiT run by diffusers in bfloat16 (weights, inputs and
activations; outputs widened to f32) on the inputs of reference.safetensors, the yardstick for a
bf16 backend ("at least as close to f32 as the reference's own bf16 run"):
    dit.output_bf16          f32 [16, 1, 6, 8]   the standalone forward (dit.x, dit.t, dit.cap_feats)
    cfg.model_output_bf16.0  f32 [2B, 16, h, w]  cfg's first step: B conditional samples, then B
                             unconditional ones (cfg.noise, cfg.dit_timestep[0], the embeddings)

No network access: the tokenizer is tests/fixtures/qwen3/tokenizer.json (made by
scripts/make_fixtures.py), the weights are drawn from fixed seeds. Reruns are byte-identical
(CPU, one thread, fixed seeds). Generation writes the pipeline, reloads it from disk in float32
and records everything from the reloaded pipeline, so the references belong to the files.
--verify recomputes every tensor and compares (floats: |a-b| <= 1e-5 * max(1, max|b|);
integers and token ids exactly; uint8 pixels within 1).

Directory tests/fixtures/z-image/ (what ZImagePipeline.save_pretrained writes, plus our files):

    model_index.json       ZImagePipeline: scheduler, text_encoder (transformers Qwen3Model),
                           tokenizer (Qwen2Tokenizer), transformer, vae
    scheduler/scheduler_config.json    FlowMatchEulerDiscreteScheduler
    text_encoder/{config.json,model.safetensors}                     Qwen3Model, bf16 weights
    tokenizer/{tokenizer.json,tokenizer_config.json}                 chat_template inside the config
    transformer/{config.json,diffusion_pytorch_model.safetensors}    ZImageTransformer2DModel, bf16
    vae/{config.json,diffusion_pytorch_model.safetensors}            AutoencoderKL, f32
    reference.safetensors  reference tensors (below), all computed in float32 on the CPU
    expected.json          scalar settings and results (below)
    turbo.png              the PIL image the pipeline returned for case "turbo" (for eyeballing)

The bf16 weights are upcast to f32 on load (dtype=float32); every reference number is
f32 math on those exact values, so an f32 implementation that upcasts the same way can match
to ~1e-6. bf16 only keeps the directory small (the DiT's t_embedder alone has 256x1024 +
1024x32 weights).

Components (all weights random, see init_weights: Linear/Conv weights N(0, gain^2/fan_in),
biases 0.1*N(0,1), every norm weight 1 + 0.1*N(0,1) (RMSNorm, q/k norms, GroupNorm), norm
biases 0.1*N(0,1), embeddings 0.5*N(0,1), the DiT pad tokens x_pad_token / cap_pad_token
0.5*N(0,1). Nothing is zero: the final layer and the adaLN linears are random too.)

  transformer  ZImageTransformer2DModel (bf16 on disk): dim 32, n_heads 2 (head_dim 16;
               n_kv_heads 2 is stored but unused by diffusers: no GQA), n_layers 2,
               n_refiner_layers 1 (one noise_refiner block with adaLN, one context_refiner block
               without), qk_norm (RMSNorm over head_dim, eps 1e-5), norm_eps 1e-5, in_channels 16,
               all_patch_size [2], all_f_patch_size [1] (weights all_x_embedder.2-1.*,
               all_final_layer.2-1.*), cap_feat_dim 64 (= text hidden size, != dim),
               rope_theta 256, t_scale 1000, axes_dims [4, 6, 6] (sum = head_dim, the real
               [32, 48, 48] split 1:1.5:1.5), axes_lens [1024, 512, 512]. FFN hidden
               int(32 / 3 * 8) = 85. t_embedder: 256 sinusoid -> Linear 1024 -> SiLU -> Linear 32
               (the 1024 is hard-coded in diffusers; adaLN width = min(dim, 256) = 32 here, 256 in
               the real model). Same size as diffusers' own Z-Image test (dim 32, 2 heads).
  text_encoder Qwen3Model (no lm_head; bf16 on disk; keys embed_tokens.*, layers.N.*, norm.*):
               hidden 64, 3 layers, 4 heads, 2 KV heads, head_dim 32 (!= 64/4), intermediate 128,
               rms_norm_eps 1e-6, rope_theta 1e6, vocab 448, max_position_embeddings 1024. The
               pipeline uses hidden_states[-2] = the output of decoder layer 1 (0-based), i.e. of
               the second-to-last layer, WITHOUT the final norm (hidden_states = [embeddings,
               layer0 out, layer1 out, norm(layer2 out)]); layer 2 and the final norm never reach
               the image.
  tokenizer    tests/fixtures/qwen3/tokenizer.json (byte-level BPE, 420 tokens, <|endoftext|>=0,
               <|im_start|>=1, <|im_end|>=2; Qwen NFC + split regex) as transformers re-saves it,
               tokenizer_class Qwen2Tokenizer, pad <|endoftext|> (id 0), eos <|im_end|>, padding
               right. chat_template (inside tokenizer_config.json): a reduced Qwen3 template (no
               tools / reasoning_content) whose generation prompt appends
               '<think>\\n\\n</think>\\n\\n' only when enable_thinking is false. The pipeline calls
               apply_chat_template([{"role": "user", "content": p}], tokenize=False,
               add_generation_prompt=True, enable_thinking=True), which gives
               "<|im_start|>user\\n{p}<|im_end|>\\n<|im_start|>assistant\\n" (no think block, no
               default system prompt), then tokenizer(text, padding="max_length", max_length=512,
               truncation=True). The empty negative prompt gives "<|im_start|>user\\n<|im_end|>..."
  vae          AutoencoderKL shaped like Flux's (f32 on disk): in/out 3 channels,
               latent_channels 16, 4 x DownEncoderBlock2D / UpDecoderBlock2D (so
               vae_scale_factor = 8 as in Flux), block_out_channels [8, 16, 16, 16] (decoder runs
               16, 16, 16, 8: up_blocks.3's first resnet has a 1x1 conv_shortcut),
               layers_per_block 1 (decoder up blocks have 2 resnets), norm_num_groups 4, eps 1e-6,
               act silu, mid_block_add_attention true (one head over 16 channels),
               use_quant_conv false, use_post_quant_conv false, force_upcast, scaling_factor 0.3611,
               shift_factor 0.1159, sample_size 64.
  scheduler    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0,
               use_dynamic_shifting=False), the values of Tongyi-MAI/Z-Image-Turbo's
               scheduler_config.json as ports of it quote them (not readable offline here), other
               keys at diffusers defaults. The pipeline passes sigmas = linspace(1, 1/S, S) (torch
               f32), the scheduler shifts them in f32: s' = 3 s / (1 + 2 s), appends 0;
               timesteps = s' * 1000. mu is computed but ignored without dynamic shifting.

Layouts: images and latents NCHW, row-major; "image" tensors HWC uint8 as the PIL image gives
them. Token ids int64. width/height are pixels, the latent is [B, 16, height/8, width/8], DiT
tokens are 2x2 latent patches (height/16 rows x width/16 columns, row-major).

reference.safetensors, for each case C in {turbo, cfg, trunc} (B = num_images_per_prompt,
h = height/8, w = width/8, L = valid prompt tokens, Ln = valid negative tokens, S = steps):

    C.input_ids                int64 [1, 512]  text-encoder input (templated prompt, right-padded with 0)
    C.attention_mask           int64 [1, 512]  1 for the L valid tokens
    C.negative_input_ids       int64 [1, 512]  (cfg, trunc) same for the negative prompt
    C.negative_attention_mask  int64 [1, 512]  (cfg, trunc)
    C.prompt_embeds            f32 [L, 64]     hidden_states[-2][mask]: what the DiT gets as cap_feats
    C.negative_prompt_embeds   f32 [Ln, 64]    (cfg, trunc)
    C.sigmas                   f32 [S+1]       scheduler.sigmas (shifted, terminal 0 appended)
    C.timesteps                f32 [S]         scheduler.timesteps = sigmas[:S] * 1000
    C.dit_timestep             f32 [S]         t given to the DiT: (1000 - timesteps) / 1000 in f32
                                               (~ 1 - sigma; 0 at the first step)
    C.noise                    f32 [B, 16, h, w] initial latents (passed as latents=)
    C.model_output.{i}         f32 [N_i, 16, 1, h, w]  raw DiT output list of step i, stacked. With
                               CFG at step i, N_i = 2B: items 0..B-1 positive, B..2B-1 negative
                               (the DiT batch is [pos x B, neg x B] on the same latents);
                               without, N_i = B.
    C.noise_pred.{i}           f32 [B, 16, h, w] what scheduler.step got: -(guided output)
    C.latents.{i}              f32 [B, 16, h, w] latents after step i (i = 0..S-1):
                               latents.{i-1} + (sigmas[i+1] - sigmas[i]) * noise_pred.{i}
    C.vae_input                f32 [B, 16, h, w] latents.{S-1} / 0.3611 + 0.1159 (vae.decode input)
    C.decoded                  f32 [B, 3, height, width] vae.decode output (about [-1, 1])
    C.image                    uint8 [B, height, width, 3] the pipeline's PIL output:
                               round(clamp(decoded * 0.5 + 0.5, 0, 1) * 255) in f32, numpy round
                               (half to even)

Standalone DiT forward on turbo's first step (x = turbo.noise[0][:, None], t = turbo.dit_timestep[0]
= 0, cap = turbo.prompt_embeds; 12 image tokens padded to Px = 32, L = 31 caption tokens padded
to Pc = 32, U = Px + Pc = 64), forward hooks:

    dit.x           f32 [16, 1, 6, 8]   input latent (C, F, H, W)
    dit.t           f32 [1]             input timestep
    dit.cap_feats   f32 [31, 64]        input caption features
    dit.t_emb       f32 [1, 32]         t_embedder(t * 1000) = adaln_input
    dit.t_emb_steps f32 [4, 32]         t_embedder(turbo.dit_timestep[i] * 1000) for every step
                                        (step 0 has t = 0, which hides frequency bugs)
    dit.x_patches   f32 [32, 64]        patchified image: row (h*4 + w) is the 2x2 patch at
                                        token (h, w), features in (ph, pw, c) order
                                        (c fastest); rows 12..31 repeat the last patch
    dit.x_embed     f32 [32, 32]        all_x_embedder["2-1"] output (pad rows not yet replaced)
    dit.noise_refiner_in  f32 [1, 32, 32]  after rows 12.. -> x_pad_token
    dit.noise_refiner.0   f32 [1, 32, 32]
    dit.cap_embed   f32 [32, 32]        cap_embedder (RMSNorm(64) + Linear 64->32) output over the
                                        padded caption (row 31 = copy of row 30's input, not replaced yet)
    dit.context_refiner_in f32 [1, 32, 32]  after pad rows -> cap_pad_token
    dit.context_refiner.0  f32 [1, 32, 32]
    dit.x_pos_ids   int32 [32, 3]       RoPE (axis0, axis1, axis2) of each image token:
                                        (Pc + 1, h, w); pad tokens (0, 0, 0)
    dit.cap_pos_ids int32 [32, 3]       (1 + k, 0, 0) for k = 0..Pc-1, pad tokens included
    dit.unified_in  f32 [1, 64, 32]     input of layers.0: cat(image tokens, caption tokens)
    dit.unified_freqs f32 [1, 64, 8, 2] RoPE (cos, sin) per token and complex pair as the layers
                                        get it: pairs 0-1 axis0, 2-4 axis1, 5-7 axis2
    dit.layers.0.attention    f32 [1, 64, 32]  attention output (before attention_norm2 and the gate)
    dit.layers.0.feed_forward f32 [1, 64, 32]  FFN output (before ffn_norm2 and the gate)
    dit.layers.{i}  f32 [1, 64, 32]     output of main block i (i = 0, 1)
    dit.final_layer f32 [1, 64, 64]     final layer output (64 = 2*2*16 per token)
    dit.output      f32 [16, 1, 6, 8]   unpatchified output (== turbo.model_output.0[0])

Text encoder detail for turbo's prompt:

    te.hidden_states f32 [4, 31, 64]    all hidden_states at the valid tokens (index 2 = prompt_embeds)

Standalone VAE decode of a random latent (z ~ N(0, 1), seed VAE_Z_SEED), forward hooks on vae.decoder:

    vae.z           f32 [1, 16, 3, 4]   vae.decode input (no scaling/shift here)
    vae.conv_in     f32 [1, 16, 3, 4]
    vae.mid_block   f32 [1, 16, 3, 4]
    vae.up_blocks.0 f32 [1, 16, 6, 8]
    vae.up_blocks.1 f32 [1, 16, 12, 16]
    vae.up_blocks.2 f32 [1, 16, 24, 32]
    vae.up_blocks.3 f32 [1, 8, 24, 32]  (no upsampler in the last block)
    vae.conv_norm_out f32 [1, 8, 24, 32] GroupNorm output (before SiLU and conv_out)
    vae.decoded     f32 [1, 3, 24, 32]  vae.decode(z).sample

expected.json:
    versions          {diffusers, transformers, torch}
    scheduler_config  the scheduler's full config
    vae               {scaling_factor, shift_factor, vae_scale_factor}
    cases.C           prompt, negative_prompt (null = pipeline default ""), width, height,
                      num_inference_steps, guidance_scale, cfg_normalization, cfg_truncation,
                      num_images_per_prompt, noise_seed, max_sequence_length, templated_prompt,
                      templated_negative_prompt, prompt_ids, negative_prompt_ids (valid ids only),
                      mu, sigmas, timesteps, dit_timestep, cfg_applied [S] (CFG ran at step i),
                      renorm_applied [S][B] (cfg_normalization rescaled image j at step i),
                      latent_shape, image_tokens (before padding), caption_tokens [L, Ln]
    dit               token counts before/after padding, t, t_embedder_input, t_emb_steps_inputs
    vae_check         z_seed, z_shape
    tensors           {name: [dtype, shape]} for every tensor in reference.safetensors
Floats are the f32 values written as Python floats (exact).

Cases:
    turbo  Z-Image-Turbo style: guidance_scale 0 (the pipeline runs CFG iff guidance_scale > 0),
           64 x 48 (w x h), 4 steps, batch 1.
    cfg    guidance_scale 3.0 with a negative prompt, num_images_per_prompt 2, 64 x 64, 3 steps,
           cfg_normalization False, cfg_truncation 1.0 (never truncates). The prompt has 69
           tokens (caption padded to 96) and the negative 28 (padded to 32), so the DiT batch of
           4 has two unified lengths (the pipeline masks the batch padding).
    trunc  guidance_scale 4.0, negative_prompt None (the pipeline then uses ""),
           cfg_normalization True (|pred| capped at 1.0 x |pos| per image; it triggers at steps
           0, 1), cfg_truncation 0.2: CFG is dropped (only the positive batch runs) at steps
           whose (1000 - t) / 1000 > 0.2, i.e. steps 2, 3. 80 x 112: 35 image tokens, padded to 64.
           4 steps, batch 1.
"""

import argparse
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from diffusers.models.normalization import RMSNorm  # noqa: E402
from transformers import AutoTokenizer, Qwen3Config, Qwen3Model  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "z-image"
QWEN3_TOKENIZER = ROOT / "tests" / "fixtures" / "qwen3" / "tokenizer.json"

SEED_TRANSFORMER = 2001
SEED_TEXT_ENCODER = 2002
SEED_VAE = 2003
VAE_Z_SEED = 2004
MAX_SEQUENCE_LENGTH = 512  # the pipeline's default

# Reduced Qwen3 chat template: the parts that decide the text for system / user / assistant
# messages and the generation prompt, including the enable_thinking switch.
QWEN3_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) "
    "or message.role == 'assistant' %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "    {%- if enable_thinking is defined and enable_thinking is false %}\n"
    "        {{- '<think>\\n\\n</think>\\n\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
)

TOKENIZER_CONFIG = {
    "add_prefix_space": False,
    "bos_token": None,
    "chat_template": QWEN3_TEMPLATE,
    "clean_up_tokenization_spaces": False,
    "eos_token": "<|im_end|>",
    "errors": "replace",
    "model_max_length": 131072,
    "pad_token": "<|endoftext|>",
    "split_special_tokens": False,
    "tokenizer_class": "Qwen2Tokenizer",
    "unk_token": None,
}

TRANSFORMER_CONFIG = dict(
    all_patch_size=(2,),
    all_f_patch_size=(1,),
    in_channels=16,
    dim=32,
    n_layers=2,
    n_refiner_layers=1,
    n_heads=2,
    n_kv_heads=2,
    norm_eps=1e-5,
    qk_norm=True,
    cap_feat_dim=64,
    rope_theta=256.0,
    t_scale=1000.0,
    axes_dims=[4, 6, 6],
    axes_lens=[1024, 512, 512],
)

TEXT_ENCODER_CONFIG = dict(
    vocab_size=448,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    hidden_act="silu",
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    tie_word_embeddings=False,
    attention_bias=False,
    bos_token_id=None,
    eos_token_id=2,
    pad_token_id=0,
)

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[8, 16, 16, 16],
    layers_per_block=1,
    act_fn="silu",
    latent_channels=16,
    norm_num_groups=4,
    sample_size=64,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    latents_mean=None,
    latents_std=None,
    force_upcast=True,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=True,
)

SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)

CASES = [
    dict(
        name="turbo",
        prompt="a red fox in the snow, photo",
        negative_prompt=None,
        width=64,
        height=48,
        num_inference_steps=4,
        guidance_scale=0.0,
        cfg_normalization=False,
        cfg_truncation=1.0,
        num_images_per_prompt=1,
        noise_seed=3001,
    ),
    dict(
        name="cfg",
        prompt=(
            "Once upon a time there was a little village by the sea, and every morning "
            "the fishermen went out in their boats"
        ),
        negative_prompt="blurry, low quality",
        width=64,
        height=64,
        num_inference_steps=3,
        guidance_scale=3.0,
        cfg_normalization=False,
        cfg_truncation=1.0,
        num_images_per_prompt=2,
        noise_seed=3002,
    ),
    dict(
        name="trunc",
        prompt="the old men sat in the shade",
        negative_prompt=None,
        width=80,
        height=112,
        num_inference_steps=4,
        guidance_scale=4.0,
        cfg_normalization=True,
        cfg_truncation=0.2,
        num_images_per_prompt=1,
        noise_seed=3003,
    ),
]

# Gains for the random weights (std = gain / sqrt(fan_in)); chosen so that activations stay
# O(1) and the decoded image is neither flat nor saturated.
LINEAR_GAIN = 1.0
ADALN_GAIN = 0.5  # scale / gate modulation: 1 + ~0.5, tanh(~0.5)
CONV_GAIN = 1.0
VAE_CONV_OUT_GAIN = 0.5
EMBED_STD = 0.5
PAD_TOKEN_STD = 0.5
BIAS_STD = 0.1


# ---------------------------------------------------------------------------------------
# Building the pipeline
# ---------------------------------------------------------------------------------------


def init_weights(model: torch.nn.Module, seed: int, special_gain=None) -> None:
    """Redraw every parameter from a fixed seed, in sorted-name order (see module docstring)."""
    special_gain = special_gain or {}
    g = torch.Generator().manual_seed(seed)
    owner = {}
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            owner[f"{mname}.{pname}" if mname else pname] = module
    norm_types = (RMSNorm, torch.nn.GroupNorm, torch.nn.LayerNorm)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            module = owner[name]
            kind = name.rsplit(".", 1)[-1]
            is_norm = isinstance(module, norm_types) or type(module).__name__.endswith("RMSNorm")
            if is_norm and kind == "weight":
                v = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
            elif kind == "bias":
                v = BIAS_STD * torch.randn(p.shape, generator=g)
            elif isinstance(module, torch.nn.Embedding):
                v = EMBED_STD * torch.randn(p.shape, generator=g)
            elif isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                fan_in = p[0].numel()
                gain = LINEAR_GAIN if isinstance(module, torch.nn.Linear) else CONV_GAIN
                for prefix, sg in special_gain.items():
                    if name.startswith(prefix) or f".{prefix}" in name:
                        gain = sg
                v = gain / fan_in**0.5 * torch.randn(p.shape, generator=g)
            elif name.endswith("pad_token"):
                v = PAD_TOKEN_STD * torch.randn(p.shape, generator=g)
            else:
                raise AssertionError(f"no init rule for {name} ({type(module).__name__})")
            p.copy_(v.to(p.dtype))


def build_tokenizer(tmp: Path):
    d = tmp / "tokenizer_src"
    d.mkdir()
    shutil.copyfile(QWEN3_TOKENIZER, d / "tokenizer.json")
    (d / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    return AutoTokenizer.from_pretrained(d)


def build_pipeline(tmp: Path) -> ZImagePipeline:
    tokenizer = build_tokenizer(tmp)

    torch.manual_seed(SEED_TRANSFORMER)
    transformer = ZImageTransformer2DModel(**TRANSFORMER_CONFIG).eval()
    init_weights(transformer, SEED_TRANSFORMER, special_gain={"adaLN_modulation": ADALN_GAIN})
    transformer = transformer.to(torch.bfloat16)

    torch.manual_seed(SEED_TEXT_ENCODER)
    text_encoder = Qwen3Model(Qwen3Config(**TEXT_ENCODER_CONFIG)).eval()
    init_weights(text_encoder, SEED_TEXT_ENCODER)
    text_encoder = text_encoder.to(torch.bfloat16)

    torch.manual_seed(SEED_VAE)
    vae = AutoencoderKL(**VAE_CONFIG).eval()
    init_weights(vae, SEED_VAE, special_gain={"decoder.conv_out": VAE_CONV_OUT_GAIN})

    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
    return ZImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )


def write_pipeline(out: Path) -> None:
    with tempfile.TemporaryDirectory() as t:
        pipe = build_pipeline(Path(t))
        pipe.save_pretrained(out, safe_serialization=True)
    # transformers writes the chat template to chat_template.jinja and adds loader state
    # (is_local, ...) to tokenizer_config.json; write our clean config with the template inside
    # (one file to read, like the other fixtures). tokenizer.json stays as transformers wrote it
    # (the qwen3 fixture's tokenizer; it spells continuing_subword_prefix / end_of_word_suffix
    # "" instead of null, as Hub Qwen tokenizer.json files do).
    tdir = out / "tokenizer"
    assert sorted(p.name for p in tdir.iterdir()) in (
        ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"],
        ["tokenizer.json", "tokenizer_config.json"],
    ), list(tdir.iterdir())
    (tdir / "chat_template.jinja").unlink(missing_ok=True)
    (tdir / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2, sort_keys=True) + "\n")
    tok = AutoTokenizer.from_pretrained(tdir)
    assert tok.chat_template == QWEN3_TEMPLATE
    msgs = [{"role": "user", "content": "hi"}]
    for thinking, tail in ((True, ""), (False, "<think>\n\n</think>\n\n")):
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=thinking)
        assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n" + tail, text


def load_pipeline(d: Path) -> ZImagePipeline:
    pipe = ZImagePipeline.from_pretrained(d, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for name in ("transformer", "text_encoder", "vae"):
        m = getattr(pipe, name)
        m.eval()
        dtypes = {p.dtype for p in m.parameters()}
        assert dtypes == {torch.float32}, (name, dtypes)
    return pipe


# ---------------------------------------------------------------------------------------
# Recording one pipeline call
# ---------------------------------------------------------------------------------------


def template(pipe, text: str) -> str:
    return pipe.tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True, enable_thinking=True
    )


def expected_sigmas(steps: int) -> np.ndarray:
    """FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=linspace(1, 1/steps, steps)), in f32."""
    s = np.array(torch.linspace(1.0, 1 / steps, steps).tolist()).astype(np.float32)
    shift = np.float32(SCHEDULER_CONFIG["shift"])
    s = shift * s / (np.float32(1) + (shift - np.float32(1)) * s)
    return np.concatenate([s, np.zeros(1, np.float32)]).astype(np.float32)


def run_case(pipe: ZImagePipeline, case: dict, raw_tok: Tokenizer):
    name = case["name"]
    B = case["num_images_per_prompt"]
    h, w = case["height"] // 8, case["width"] // 8
    cfg = case["guidance_scale"] > 0  # the pipeline's do_classifier_free_guidance
    noise = torch.randn((B, 16, h, w), generator=torch.Generator().manual_seed(case["noise_seed"]))

    te_calls, dit_calls, step_calls, latents_after, vae_calls = [], [], [], [], []

    def te_hook(_m, args, kwargs, out):
        te_calls.append((kwargs["input_ids"].clone(), kwargs["attention_mask"].clone(), out.hidden_states[-2].clone()))

    def dit_hook(_m, args, _kwargs, out):
        dit_calls.append(([a.clone() for a in args[0]], args[1].clone(), [c.clone() for c in args[2]],
                          [o.clone() for o in out[0]]))

    def vae_hook(_m, args, out):
        vae_calls.append((args[0].clone(), out.clone()))

    orig_step = pipe.scheduler.step

    def step(model_output, timestep, sample, *a, **kw):
        step_calls.append((model_output.clone(), timestep.clone(), sample.clone()))
        return orig_step(model_output, timestep, sample, *a, **kw)

    def on_step_end(_pipe, i, t, kwargs):
        latents_after.append(kwargs["latents"].clone())
        return kwargs

    hooks = [
        pipe.text_encoder.register_forward_hook(te_hook, with_kwargs=True),
        pipe.transformer.register_forward_hook(dit_hook, with_kwargs=True),
        pipe.vae.decoder.register_forward_hook(vae_hook),
    ]
    pipe.scheduler.step = step
    try:
        result = pipe(
            prompt=case["prompt"],
            negative_prompt=case["negative_prompt"],
            height=case["height"],
            width=case["width"],
            num_inference_steps=case["num_inference_steps"],
            guidance_scale=case["guidance_scale"],
            cfg_normalization=case["cfg_normalization"],
            cfg_truncation=case["cfg_truncation"],
            num_images_per_prompt=B,
            latents=noise.clone(),
            max_sequence_length=MAX_SEQUENCE_LENGTH,
            output_type="pil",
            callback_on_step_end=on_step_end,
        )
    finally:
        for hk in hooks:
            hk.remove()
        del pipe.scheduler.step
    images = result.images
    S = case["num_inference_steps"]

    # --- text: our own templating / tokenization / encoder call must equal what the pipeline did
    texts = [template(pipe, case["prompt"])]
    if cfg:
        texts.append(template(pipe, case["negative_prompt"] if case["negative_prompt"] is not None else ""))
    assert len(te_calls) == len(texts), len(te_calls)
    rec, info = {}, {}
    embeds = []
    for k, (text, (ids, mask, hs)) in enumerate(zip(texts, te_calls)):
        tk = pipe.tokenizer(text, padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True,
                            return_tensors="pt")
        assert torch.equal(tk.input_ids, ids) and torch.equal(tk.attention_mask.bool(), mask), name
        n = int(mask.sum())
        valid = ids[0, :n].tolist()
        assert raw_tok.encode(text, add_special_tokens=False).ids == valid, (name, text)
        assert mask[0, :n].all() and not mask[0, n:].any() and (ids[0, n:] == 0).all()  # right padding, pad id 0
        out = pipe.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        assert torch.equal(out.hidden_states[-2], hs)
        e = hs[0][mask[0]]
        embeds.append(e)
        pre = "" if k == 0 else "negative_"
        rec[f"{name}.{pre}input_ids"] = ids.to(torch.int64)
        rec[f"{name}.{pre}attention_mask"] = mask.to(torch.int64)
        rec[f"{name}.{pre}prompt_embeds"] = e
        info[f"templated_{pre}prompt"] = text
        info[f"{pre}prompt_ids"] = valid
        if k == 0 and name == "turbo":
            rec["te.hidden_states"] = torch.stack([x[0][mask[0]] for x in out.hidden_states])
    if not cfg:
        info["templated_negative_prompt"] = None
        info["negative_prompt_ids"] = None

    # --- scheduler
    sched = pipe.scheduler
    sig = expected_sigmas(S)
    assert np.array_equal(sched.sigmas.numpy(), sig), (sched.sigmas, sig)
    timesteps = sched.timesteps.clone()
    assert torch.equal(timesteps, torch.from_numpy(sig[:S]) * 1000)
    dit_t = (1000 - timesteps) / 1000
    rec[f"{name}.sigmas"] = sched.sigmas.clone()
    rec[f"{name}.timesteps"] = timesteps
    rec[f"{name}.dit_timestep"] = dit_t
    rec[f"{name}.noise"] = noise

    # --- denoising loop, recomputed from the recorded DiT outputs
    assert len(dit_calls) == S and len(step_calls) == S and len(latents_after) == S
    t_norms = ((1000 - timesteps.float()) / 1000).tolist()
    latents = noise
    cfg_applied, renorm_applied = [], []
    for i in range(S):
        x_list, t_in, caps, outs = dit_calls[i]
        g = case["guidance_scale"]
        if cfg and t_norms[i] > case["cfg_truncation"]:
            g = 0.0
        apply_cfg = cfg and g > 0
        cfg_applied.append(apply_cfg)
        n_items = 2 * B if apply_cfg else B
        assert len(x_list) == len(outs) == len(caps) == n_items
        want_caps = [embeds[0]] * B + ([embeds[1]] * B if apply_cfg else [])
        for c, wc in zip(caps, want_caps):
            assert torch.equal(c, wc)
        for j, x in enumerate(x_list):
            assert torch.equal(x, latents[j % B].unsqueeze(1))
        assert torch.equal(t_in, dit_t[i].expand(n_items))
        if apply_cfg:
            preds, ren = [], []
            for j in range(B):
                pos, neg = outs[j].float(), outs[B + j].float()
                pred = pos + g * (pos - neg)
                hit = False
                if case["cfg_normalization"] and float(case["cfg_normalization"]) > 0.0:
                    ori, new = torch.linalg.vector_norm(pos), torch.linalg.vector_norm(pred)
                    max_new = ori * float(case["cfg_normalization"])
                    if new > max_new:
                        pred = pred * (max_new / new)
                        hit = True
                preds.append(pred)
                ren.append(hit)
            noise_pred = torch.stack(preds)
            renorm_applied.append(ren)
        else:
            noise_pred = torch.stack([o.float() for o in outs])
            renorm_applied.append([False] * B)
        noise_pred = -noise_pred.squeeze(2)
        mo, t_step, sample = step_calls[i]
        assert torch.equal(mo, noise_pred), (name, i, float((mo - noise_pred).abs().max()))
        assert torch.equal(sample, latents) and torch.equal(t_step, timesteps[i])
        latents = latents + (sched.sigmas[i + 1] - sched.sigmas[i]) * noise_pred
        assert torch.equal(latents, latents_after[i]), (name, i)
        rec[f"{name}.model_output.{i}"] = torch.stack(outs)
        rec[f"{name}.noise_pred.{i}"] = noise_pred
        rec[f"{name}.latents.{i}"] = latents
    if case["cfg_normalization"]:
        assert any(any(r) for r in renorm_applied), "cfg_normalization never triggered"
    if cfg and case["cfg_truncation"] < 1.0:
        assert True in cfg_applied and False in cfg_applied, cfg_applied

    # --- VAE and postprocessing
    assert len(vae_calls) == 1
    vae_in = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    z, decoded = vae_calls[0]
    assert torch.equal(z, vae_in)
    img = ((decoded * 0.5 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1).numpy()
    img = (img * 255).round().astype("uint8")
    pil = np.stack([np.array(im) for im in images])
    assert pil.shape == (B, case["height"], case["width"], 3) and np.array_equal(img, pil), name
    rec[f"{name}.vae_input"] = vae_in
    rec[f"{name}.decoded"] = decoded
    rec[f"{name}.image"] = torch.from_numpy(pil)

    image_tokens = (h // 2) * (w // 2)
    info.update(
        {k: case[k] for k in ("prompt", "negative_prompt", "width", "height", "num_inference_steps",
                              "guidance_scale", "cfg_normalization", "cfg_truncation",
                              "num_images_per_prompt", "noise_seed")},
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        mu=float(diffusers.pipelines.z_image.pipeline_z_image.calculate_shift(image_tokens)),
        sigmas=[float(x) for x in sched.sigmas],
        timesteps=[float(x) for x in timesteps],
        dit_timestep=[float(x) for x in dit_t],
        cfg_applied=cfg_applied,
        renorm_applied=renorm_applied,
        latent_shape=[B, 16, h, w],
        image_tokens=image_tokens,
        caption_tokens=[len(e) for e in embeds],
    )
    return rec, info, images


# ---------------------------------------------------------------------------------------
# Standalone DiT and VAE checks
# ---------------------------------------------------------------------------------------


def dit_check(pipe, rec):
    tr = pipe.transformer
    x = rec["turbo.noise"][0].unsqueeze(1)  # [16, 1, h, w]
    t = rec["turbo.dit_timestep"][:1]
    cap = rec["turbo.prompt_embeds"]
    got, hooks = {}, []

    def out_hook(key):
        def f(_m, _a, out):
            got[key] = out.clone()
        return f

    def in_hook(key, with_freqs=False):
        def f(_m, args):
            got[key] = args[0].clone()
            if with_freqs:
                got[key + ".freqs"] = args[2].clone()
        return f

    hooks.append(tr.t_embedder.register_forward_hook(out_hook("dit.t_emb")))
    xe = tr.all_x_embedder["2-1"]
    hooks.append(xe.register_forward_pre_hook(in_hook("dit.x_patches")))
    hooks.append(xe.register_forward_hook(out_hook("dit.x_embed")))
    hooks.append(tr.noise_refiner[0].register_forward_pre_hook(in_hook("dit.noise_refiner_in")))
    for i, layer in enumerate(tr.noise_refiner):
        hooks.append(layer.register_forward_hook(out_hook(f"dit.noise_refiner.{i}")))
    hooks.append(tr.cap_embedder.register_forward_hook(out_hook("dit.cap_embed")))
    hooks.append(tr.context_refiner[0].register_forward_pre_hook(in_hook("dit.context_refiner_in")))
    for i, layer in enumerate(tr.context_refiner):
        hooks.append(layer.register_forward_hook(out_hook(f"dit.context_refiner.{i}")))
    hooks.append(tr.layers[0].register_forward_pre_hook(in_hook("dit.unified_in", with_freqs=True)))
    hooks.append(tr.layers[0].attention.register_forward_hook(out_hook("dit.layers.0.attention")))
    hooks.append(tr.layers[0].feed_forward.register_forward_hook(out_hook("dit.layers.0.feed_forward")))
    for i, layer in enumerate(tr.layers):
        hooks.append(layer.register_forward_hook(out_hook(f"dit.layers.{i}")))
    hooks.append(tr.all_final_layer["2-1"].register_forward_hook(out_hook("dit.final_layer")))
    try:
        out = tr([x], t, [cap], return_dict=False)[0][0]
    finally:
        for hk in hooks:
            hk.remove()
    assert torch.equal(out, rec["turbo.model_output.0"][0]), float((out - rec["turbo.model_output.0"][0]).abs().max())
    # Step 0 has t = 0 (sin = 0, cos = 1): also record the embedding at every turbo step.
    got["dit.t_emb_steps"] = torch.cat([tr.t_embedder(ti.reshape(1) * tr.t_scale) for ti in rec["turbo.dit_timestep"]])
    assert torch.equal(got["dit.t_emb_steps"][:1], got["dit.t_emb"])

    # Position ids exactly as the forward computes them (truncated to the padded lengths).
    (_, cap_out, _, x_pos, cap_pos, x_pad, cap_pad) = tr.patchify_and_embed([x], [cap], 2, 1)
    px, pc = len(x_pad[0]), len(cap_out[0])
    x_pos, cap_pos = x_pos[0][:px], cap_pos[0][:pc]
    freqs = got.pop("dit.unified_in.freqs")  # complex64 [1, U, 16]
    assert torch.equal(freqs[0], torch.cat([tr.rope_embedder(x_pos), tr.rope_embedder(cap_pos)]))
    assert got["dit.x_patches"].shape[0] == px and got["dit.cap_embed"].shape[0] == pc
    got["dit.unified_freqs"] = torch.view_as_real(freqs).contiguous()
    got["dit.x_pos_ids"] = x_pos.to(torch.int32)
    got["dit.cap_pos_ids"] = cap_pos.to(torch.int32)
    got["dit.x"] = x
    got["dit.t"] = t
    got["dit.cap_feats"] = cap
    got["dit.output"] = out
    info = dict(
        image_tokens=int((~x_pad[0]).sum()),
        image_tokens_padded=px,
        caption_tokens=int((~cap_pad[0]).sum()),
        caption_tokens_padded=pc,
        unified_tokens=px + pc,
        t=float(t[0]),
        t_embedder_input=float(t[0] * tr.t_scale),
        t_emb_steps_inputs=[float(ti * tr.t_scale) for ti in rec["turbo.dit_timestep"]],
    )
    return got, info


def vae_check(pipe):
    vae = pipe.vae
    z = torch.randn((1, 16, 3, 4), generator=torch.Generator().manual_seed(VAE_Z_SEED))
    got, hooks = {}, []

    def out_hook(key):
        def f(_m, _a, out):
            got[key] = out.clone()
        return f

    dec = vae.decoder
    hooks.append(dec.conv_in.register_forward_hook(out_hook("vae.conv_in")))
    hooks.append(dec.mid_block.register_forward_hook(out_hook("vae.mid_block")))
    for i, blk in enumerate(dec.up_blocks):
        hooks.append(blk.register_forward_hook(out_hook(f"vae.up_blocks.{i}")))
    hooks.append(dec.conv_norm_out.register_forward_hook(out_hook("vae.conv_norm_out")))
    try:
        decoded = vae.decode(z, return_dict=False)[0]
    finally:
        for hk in hooks:
            hk.remove()
    got["vae.z"] = z
    got["vae.decoded"] = decoded
    return got, dict(z_seed=VAE_Z_SEED, z_shape=list(z.shape))


# ---------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------


def compute_references(d: Path):
    pipe = load_pipeline(d)
    raw_tok = Tokenizer.from_file(str(d / "tokenizer" / "tokenizer.json"))
    assert pipe.tokenizer.padding_side == "right", pipe.tokenizer.padding_side
    assert pipe.vae_scale_factor == 8
    rec, cases, pngs = {}, {}, {}
    for case in CASES:
        r, info, images = run_case(pipe, case, raw_tok)
        rec.update(r)
        cases[case["name"]] = info
        pngs[case["name"]] = images
    r, dit_info = dit_check(pipe, rec)
    rec.update(r)
    r, vae_info = vae_check(pipe)
    rec.update(r)
    rec = {k: v.detach().clone().contiguous() for k, v in rec.items()}
    for k, v in rec.items():
        assert v.dtype in (torch.float32, torch.int64, torch.int32, torch.uint8), (k, v.dtype)
        if v.dtype == torch.float32:
            assert torch.isfinite(v).all(), k
    expected = {
        "versions": {"diffusers": diffusers.__version__, "transformers": transformers.__version__,
                     "torch": torch.__version__.split("+")[0]},
        "scheduler_config": dict(pipe.scheduler.config),
        "vae": {"scaling_factor": pipe.vae.config.scaling_factor, "shift_factor": pipe.vae.config.shift_factor,
                "vae_scale_factor": pipe.vae_scale_factor},
        "cases": cases,
        "dit": dit_info,
        "vae_check": vae_info,
        "tensors": {k: [str(v.dtype).replace("torch.", ""), list(v.shape)] for k, v in sorted(rec.items())},
    }
    expected["scheduler_config"] = {k: v for k, v in sorted(expected["scheduler_config"].items())
                                    if not k.startswith("_")}
    return rec, expected, pngs


def write_fixture() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    write_pipeline(OUT)
    rec, expected, pngs = compute_references(OUT)
    save_file(rec, OUT / "reference.safetensors")
    (OUT / "expected.json").write_text(json.dumps(expected, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    pngs["turbo"][0].save(OUT / "turbo.png")


def verify() -> None:
    rec, expected, _ = compute_references(OUT)
    ref = load_file(OUT / "reference.safetensors")
    want = json.loads((OUT / "expected.json").read_text(encoding="utf-8"))
    assert sorted(ref) == sorted(rec), set(ref) ^ set(rec)
    worst = 0.0
    for k in sorted(ref):
        a, b = rec[k], ref[k]
        assert a.dtype == b.dtype and a.shape == b.shape, (k, a.dtype, b.dtype, a.shape, b.shape)
        if a.dtype == torch.float32:
            err = float((a - b).abs().max()) / max(1.0, float(b.abs().max()))
            worst = max(worst, err)
            assert err <= 1e-5, (k, err)
        elif a.dtype == torch.uint8:
            assert int((a.int() - b.int()).abs().max()) <= 1, k
        else:
            assert torch.equal(a, b), k
    for c in want["cases"]:
        for key in ("templated_prompt", "templated_negative_prompt", "prompt_ids", "negative_prompt_ids",
                    "cfg_applied", "renorm_applied", "caption_tokens", "image_tokens"):
            assert want["cases"][c][key] == expected["cases"][c][key], (c, key)
    print(f"verify: {len(ref)} tensors, worst relative error {worst:.2e}")


def bf16_references() -> None:
    """The DiT in bfloat16 on the committed inputs: reference_bf16.safetensors."""
    ref = load_file(OUT / "reference.safetensors")
    pipe = load_pipeline(OUT)
    tr = pipe.transformer.to(torch.bfloat16)
    bf = lambda t: t.to(torch.bfloat16)  # noqa: E731
    with torch.no_grad():
        out = tr([bf(ref["dit.x"])], ref["dit.t"], [bf(ref["dit.cap_feats"])], return_dict=False)[0][0]
        noise = ref["cfg.noise"]  # [B, 16, h, w]
        b = noise.shape[0]
        xs = [bf(noise[i].unsqueeze(1)) for i in range(b)] * 2
        caps = [bf(ref["cfg.prompt_embeds"])] * b + [bf(ref["cfg.negative_prompt_embeds"])] * b
        t = ref["cfg.dit_timestep"][:1].repeat(2 * b)
        cfg_out = tr(xs, t, caps, return_dict=False)[0]
    rec = {
        "dit.output_bf16": out.float().contiguous(),
        "cfg.model_output_bf16.0": torch.stack([o.squeeze(1) for o in cfg_out]).float().contiguous(),
    }
    for k, v in rec.items():
        f32 = ref["dit.output"] if k == "dit.output_bf16" else ref["cfg.model_output.0"]
        err = float((v.reshape(-1) - f32.reshape(-1)).norm() / f32.norm())
        print(f"{k}: {list(v.shape)}, relative L2 to f32 {err:.3e}")
    save_file(rec, OUT / "reference_bf16.safetensors")


def summary() -> None:
    total = 0
    for p in sorted(OUT.rglob("*")):
        if p.is_file():
            total += p.stat().st_size
            print(f"  {p.relative_to(OUT)}  {p.stat().st_size / 1024:.1f} KiB")
    print(f"total {total / 1024:.1f} KiB")
    digest = hashlib.sha256()
    for p in sorted(OUT.rglob("*")):
        if p.is_file():
            digest.update(str(p.relative_to(OUT)).encode() + b"\0" + p.read_bytes())
    print(f"fixture digest: {digest.hexdigest()}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--verify", action="store_true", help="only verify the committed fixture")
    ap.add_argument("--bf16", action="store_true", help="only (re)write reference_bf16.safetensors")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    hf_logging.set_verbosity_error()
    diffusers.utils.logging.set_verbosity_error()
    if args.bf16:
        bf16_references()
        return
    if not args.verify:
        write_fixture()
    verify()
    summary()


if __name__ == "__main__":
    main()
