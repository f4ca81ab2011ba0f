#!/usr/bin/env python3
"""Build a tiny random-weight diffusers Qwen-Image DiT and record reference outputs.

Rerun (from the repository root, with the packages in scripts/requirements.txt, diffusers incl.):

    OMP_NUM_THREADS=1 python3 scripts/make_qwenimage_fixture.py            # (re)write the fixture
    OMP_NUM_THREADS=1 python3 scripts/make_qwenimage_fixture.py --verify   # re-check the committed one

No network access; weights and inputs are drawn from fixed seeds, so reruns are byte-identical
(CPU, one thread). Generation writes the transformer in bf16, reloads it in float32 and records
everything from the reloaded model, so the references belong to the files (an f32
implementation that upcasts the same bf16 values can match to ~1e-6). --verify recomputes every
tensor and compares (|a-b| <= 1e-5 * max(1, max|b|)).

Directory tests/fixtures/qwen-image/:

    transformer/{config.json,diffusion_pytorch_model.safetensors}   QwenImageTransformer2DModel, bf16
    reference.safetensors   the tensors below, f32 (the bf16 run's output widened to f32)
    expected.json           versions, the cases' settings, the tensors' shapes

The transformer (see TRANSFORMER_CONFIG): 2 double-stream blocks, 2 heads of 16 (inner dim
32), joint_attention_dim 48 (the text features' width, != 32), in_channels 64 = 16 latent
channels x 2x2 patch, out_channels 16 (proj_out to 2*2*16 = 64), axes_dims_rope [4, 6, 6]
(sum = head_dim; the real [16, 56, 56] for 128). RoPE theta 10000 and scale_rope are fixed in
diffusers. Weights (init_weights): Linear weights N(0, 1/fan_in) (the modulation linears
img_mod / txt_mod / norm_out.linear at gain 0.5), biases 0.1 N(0,1), RMSNorm weights
(txt_norm, the per-head q/k norms) 1 + 0.1 N(0,1). Nothing is zero.

Layouts. Packed latents are what QwenImagePipeline._pack_latents makes of [B, 16, h, w]
latents (h, w = image pixels / 8, even): [B, (h/2)(w/2), 64], token (row, col) row-major, its
64 features in (channel, patch row, patch col) order, patch col fastest. The DiT's output has
the same layout; _unpack_latents turns it into [B, 16, 1, h, w].

Case "batch": two samples in one forward, as the pipeline runs them with a mask, on a
non-square image: 48 x 80 pixels -> latents [2, 16, 6, 10] -> 3 x 5 tokens (odd counts, so the
centred positions are asymmetric: rows -2..0, columns -3..1). Texts of 7 and 12 valid tokens,
padded to 12; the pad rows of sample 0 hold random values (x3) that the mask must hide (the
pipeline pads with zeros). Timesteps (sigma = the pipeline's timestep / 1000) 0.9 and 0.35.

    batch.latents_unpacked  f32 [2, 16, 6, 10]  the latents before packing
    batch.hidden_states     f32 [2, 15, 64]     packed latents, the DiT's input
    batch.encoder_hidden_states f32 [2, 12, 48] text features (sample 0: 7 valid rows, then pads)
    batch.encoder_hidden_states_mask int64 [2, 12]  1 for valid rows
    batch.timestep          f32 [2]
    batch.temb              f32 [2, 32]   time_text_embed output
    batch.img_in            f32 [2, 15, 32]  img_in output
    batch.txt_in            f32 [2, 12, 32]  txt_in(txt_norm(text)) (pad rows included)
    batch.img_freqs         f32 [15, 8, 2]   RoPE (cos, sin) of each image token and complex pair
                                             (pairs 0-1 frame axis, 2-4 rows, 5-7 columns)
    batch.txt_freqs         f32 [12, 8, 2]   the same for text positions 0..11
    batch.blocks.0.attn.img f32 [2, 15, 32]  block 0's attention outputs (after to_out / to_add_out,
    batch.blocks.0.attn.txt f32 [2, 12, 32]  before the gates)
    batch.blocks.{i}.img    f32 [2, 15, 32]  block i's outputs (i = 0, 1)
    batch.blocks.{i}.txt    f32 [2, 12, 32]
    batch.norm_out          f32 [2, 15, 32]  norm_out output
    batch.output            f32 [2, 15, 64]  the DiT's output (packed)
    batch.output_unpacked   f32 [2, 16, 1, 6, 10]  _unpack_latents(output, 48, 80, 8)
    batch.output_bf16       f32 [2, 15, 64]  the same forward in bfloat16 (weights, inputs and
                                             activations), the yardstick for a bf16 backend
    alone.output            f32 [1, 15, 64]  sample 0 alone: its 7 valid rows, no mask

Case "square": one sample, no mask, 64 x 64 pixels -> 4 x 4 tokens, 5 text tokens, sigma 0.6.

    square.hidden_states f32 [1, 16, 64], square.encoder_hidden_states f32 [1, 5, 48],
    square.timestep f32 [1], square.output f32 [1, 16, 64]

The VAE (see VAE_CONFIG), in tests/fixtures/qwen-image/:

    vae/{config.json,diffusion_pytorch_model.safetensors}   AutoencoderKLQwenImage, bf16, encoder
                            included (as in the real checkpoint; ferry's decoder ignores it)
    vae_reference.safetensors   the tensors below
    vae_expected.json           versions, config, the tensors' shapes

AutoencoderKLQwenImage (the Wan 2.1 VAE) at base_dim 8, dim_mult [1, 2, 2, 1], num_res_blocks 1:
the decoder runs conv_in (16 -> 8), the mid block (resnet, attention, resnet at 8 channels),
up blocks 8 -> 8, 4 -> 16, 8 -> 16, 8 -> 8 (the upsamplers' convs halve the channels, so
blocks 1 and 2 change channels and have shortcut convs), upsample3d in blocks 0 and 1 (their
time_conv unused on one frame), upsample2d in block 2, then norm_out, SiLU, conv_out (8 -> 3).
Weights (init_vae_weights): conv weights N(0, 1 / fan_in) with one frame's fan_in (in x kh x kw:
a single frame sees only the last temporal slice of a 3x3x3 filter; every slice is random, so a
wrong single-frame reduction fails), decoder.conv_out at gain VAE_OUT_GAIN, biases 0.1 N(0,1),
RMS norm gammas 1 + 0.1 N(0,1).
latents_mean / latents_std are drawn from the seed too (rounded to 4 decimals), not the real
checkpoint's, so that an implementation must read them from config.json.

Case "pipeline": what QwenImagePipeline does after the last step, on two samples of 48 x 80
pixels: latents [2, 16, 6, 10] (as the DiT leaves them, unpacked) -> z = latents / (1 /
latents_std) + latents_mean -> vae.decode(z[:, :, None])[0][:, :, 0] (clamped to [-1, 1]) ->
image_processor.postprocess(output_type="pil").

    pipeline.latents  f32 [2, 16, 6, 10]    the denoised latents
    pipeline.z        f32 [2, 16, 6, 10]    after denormalization, the decoder's input
    pipeline.decoded  f32 [2, 3, 48, 80]    vae.decode's frame 0
    pipeline.rgb8     u8  [2, 48, 80, 3]    the PIL images' pixels

Case "odd": one latent of odd size [1, 16, 3, 5] (no denormalization), each decoder stage:

    odd.z f32 [1, 16, 3, 5], odd.decoded f32 [1, 3, 24, 40]
    odd.post_quant_conv, odd.conv_in, odd.mid_block, odd.up_blocks.{0..3}, odd.norm_out
                      f32 [1, C, H, W]   the stages' outputs (frame 0; norm_out before SiLU)
    odd.decoded_bf16  f32 [1, 3, 24, 40]  the same decode in bfloat16 (weights and
                                          activations), the yardstick for a bf16 backend
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

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel  # noqa: E402
from diffusers.image_processor import VaeImageProcessor  # noqa: E402
from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageRMS_norm  # noqa: E402
from diffusers.models.normalization import RMSNorm  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "qwen-image"

SEED_WEIGHTS = 4001
SEED_INPUTS = 4002
SEED_VAE = 4003
SEED_VAE_INPUTS = 4004

TRANSFORMER_CONFIG = dict(
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=48,
    guidance_embeds=False,
    axes_dims_rope=(4, 6, 6),
)

LINEAR_GAIN = 1.0
MOD_GAIN = 0.5  # shift / scale / gate: 1 + ~0.5 and gates of ~0.5
BIAS_STD = 0.1
VAE_SCALE = 8  # QwenImagePipeline.vae_scale_factor (2 ** len(temperal_downsample))


def vae_config() -> dict:
    """VAE_CONFIG with its latent statistics drawn from SEED_VAE (see the module docstring)."""
    g = torch.Generator().manual_seed(SEED_VAE)
    mean = (0.5 * torch.randn(16, generator=g)).tolist()
    std = (1.0 + torch.rand(16, generator=g) * 2.0).tolist()
    return dict(
        base_dim=8,
        z_dim=16,
        dim_mult=[1, 2, 2, 1],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, True, True],
        dropout=0.0,
        latents_mean=[round(v, 4) for v in mean],
        latents_std=[round(v, 4) for v in std],
    )


VAE_OUT_GAIN = 1.0


def init_weights(model: torch.nn.Module, seed: int) -> None:
    """Redraw every parameter from `seed`, in sorted-name order (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    owner = {}
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            owner[f"{mname}.{pname}" if mname else pname] = module
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            module, kind = owner[name], name.rsplit(".", 1)[-1]
            if isinstance(module, RMSNorm) and kind == "weight":
                v = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
            elif kind == "bias":
                v = BIAS_STD * torch.randn(p.shape, generator=g)
            elif isinstance(module, torch.nn.Linear):
                modulation = any(s in name for s in ("img_mod", "txt_mod", "norm_out.linear"))
                gain = MOD_GAIN if modulation else LINEAR_GAIN
                v = gain / p.shape[1] ** 0.5 * torch.randn(p.shape, generator=g)
            else:
                raise AssertionError(f"no init rule for {name} ({type(module).__name__})")
            p.copy_(v.to(p.dtype))


def init_vae_weights(vae: torch.nn.Module, seed: int) -> None:
    """Redraw every VAE parameter from `seed`, in sorted-name order (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    owner = {}
    for mname, module in vae.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            owner[f"{mname}.{pname}" if mname else pname] = module
    with torch.no_grad():
        for name, p in sorted(vae.named_parameters(), key=lambda kv: kv[0]):
            module, kind = owner[name], name.rsplit(".", 1)[-1]
            if isinstance(module, QwenImageRMS_norm) and kind == "gamma":
                v = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
            elif kind == "bias":
                v = BIAS_STD * torch.randn(p.shape, generator=g)
            elif isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)) and kind == "weight":
                # One frame's fan-in: a 3-D filter's inputs in one temporal slice.
                fan_in = p[0].numel() // (p.shape[2] if p.dim() == 5 else 1)
                gain = VAE_OUT_GAIN if name == "decoder.conv_out.weight" else 1.0
                v = gain / fan_in**0.5 * torch.randn(p.shape, generator=g)
            else:
                raise AssertionError(f"no init rule for {name} ({type(module).__name__})")
            p.copy_(v.to(p.dtype))


def write_vae(out: Path) -> None:
    torch.manual_seed(SEED_VAE)
    vae = AutoencoderKLQwenImage(**vae_config()).eval()
    init_vae_weights(vae, SEED_VAE)
    vae.to(torch.bfloat16).save_pretrained(out / "vae", safe_serialization=True)


def load_vae(d: Path, dtype=torch.float32) -> AutoencoderKLQwenImage:
    vae = AutoencoderKLQwenImage.from_pretrained(d / "vae", torch_dtype=dtype).eval()
    assert {p.dtype for p in vae.parameters()} == {dtype}
    return vae


def compute_vae_references(d: Path) -> dict:
    vae = load_vae(d)
    cfg = vae.config
    g = torch.Generator().manual_seed(SEED_VAE_INPUTS)
    latents = torch.randn((2, 16, 6, 10), generator=g)
    odd = torch.randn((1, 16, 3, 5), generator=g)
    got = {"pipeline.latents": latents, "odd.z": odd}
    processor = VaeImageProcessor(vae_scale_factor=VAE_SCALE * 2)
    with torch.no_grad():
        # QwenImagePipeline.__call__ after the denoising loop (latents already unpacked).
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1)
        std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1)
        z = latents[:, :, None] / std + mean
        got["pipeline.z"] = z[:, :, 0]
        image = vae.decode(z, return_dict=False)[0][:, :, 0]
        got["pipeline.decoded"] = image
        pil = processor.postprocess(image, output_type="pil")
        got["pipeline.rgb8"] = torch.stack([torch.from_numpy(np.array(p)) for p in pil])

        hooks = []

        def out_hook(key):
            def f(_m, _a, out):
                got[key] = out.detach()[:, :, 0].clone()

            return f

        dec = vae.decoder
        hooks.append(vae.post_quant_conv.register_forward_hook(out_hook("odd.post_quant_conv")))
        hooks.append(dec.conv_in.register_forward_hook(out_hook("odd.conv_in")))
        hooks.append(dec.mid_block.register_forward_hook(out_hook("odd.mid_block")))
        for i, up in enumerate(dec.up_blocks):
            hooks.append(up.register_forward_hook(out_hook(f"odd.up_blocks.{i}")))
        hooks.append(dec.norm_out.register_forward_hook(out_hook("odd.norm_out")))
        got["odd.decoded"] = vae.decode(odd[:, :, None], return_dict=False)[0][:, :, 0]
        for h in hooks:
            h.remove()
        bf = load_vae(d, torch.bfloat16)
        got["odd.decoded_bf16"] = bf.decode(odd[:, :, None].bfloat16(), return_dict=False)[0][:, :, 0].float()
    return {k: v.contiguous() for k, v in sorted(got.items())}


def vae_expected(refs: dict) -> dict:
    return {
        "versions": {"diffusers": diffusers.__version__, "torch": torch.__version__},
        "vae_config": vae_config(),
        "cases": {
            "pipeline": {"width": 80, "height": 48, "latent": [6, 10], "batch": 2},
            "odd": {"width": 40, "height": 24, "latent": [3, 5], "batch": 1},
        },
        "tensors": {k: [str(v.dtype).replace("torch.", ""), list(v.shape)] for k, v in refs.items()},
    }


def write_transformer(out: Path) -> None:
    torch.manual_seed(SEED_WEIGHTS)
    tr = QwenImageTransformer2DModel(**TRANSFORMER_CONFIG).eval()
    init_weights(tr, SEED_WEIGHTS)
    tr.to(torch.bfloat16).save_pretrained(out / "transformer", safe_serialization=True)


def load_transformer(d: Path, dtype=torch.float32) -> QwenImageTransformer2DModel:
    tr = QwenImageTransformer2DModel.from_pretrained(d / "transformer", torch_dtype=dtype).eval()
    assert {p.dtype for p in tr.parameters()} == {dtype}
    return tr


def inputs() -> dict:
    g = torch.Generator().manual_seed(SEED_INPUTS)
    c = TRANSFORMER_CONFIG["out_channels"]
    lat = torch.randn((2, c, 6, 10), generator=g)
    text = torch.randn((2, 12, 48), generator=g)
    text[0, 7:] = 3.0 * torch.randn((5, 48), generator=g)  # pads the mask must hide
    mask = torch.ones((2, 12), dtype=torch.int64)
    mask[0, 7:] = 0
    sq_lat = torch.randn((1, c, 8, 8), generator=g)
    sq_text = torch.randn((1, 5, 48), generator=g)
    pack = QwenImagePipeline._pack_latents
    return {
        "batch.latents_unpacked": lat,
        "batch.hidden_states": pack(lat, 2, c, 6, 10),
        "batch.encoder_hidden_states": text,
        "batch.encoder_hidden_states_mask": mask,
        "batch.timestep": torch.tensor([0.9, 0.35], dtype=torch.float32),
        "square.hidden_states": pack(sq_lat, 1, c, 8, 8),
        "square.encoder_hidden_states": sq_text,
        "square.timestep": torch.tensor([0.6], dtype=torch.float32),
    }


def forward(tr, x, text, mask, t, shape):
    return tr(
        hidden_states=x,
        encoder_hidden_states=text,
        encoder_hidden_states_mask=mask,
        timestep=t,
        img_shapes=[[shape]] * x.shape[0],
        return_dict=False,
    )[0]


def compute_references(d: Path) -> dict:
    tr = load_transformer(d)
    inp = inputs()
    got = dict(inp)
    hooks = []

    def out_hook(key):
        def f(_m, _a, out):
            got[key] = out.detach().clone()

        return f

    def rope_hook(_m, _a, out):
        got["batch.img_freqs"] = torch.view_as_real(out[0]).contiguous()
        got["batch.txt_freqs"] = torch.view_as_real(out[1]).contiguous()

    def pair_hook(key, names):
        def f(_m, _a, out):
            for n, o in zip(names, out):
                got[f"{key}.{n}"] = o.detach().clone()

        return f

    hooks.append(tr.time_text_embed.register_forward_hook(out_hook("batch.temb")))
    hooks.append(tr.img_in.register_forward_hook(out_hook("batch.img_in")))
    hooks.append(tr.txt_in.register_forward_hook(out_hook("batch.txt_in")))
    hooks.append(tr.pos_embed.register_forward_hook(rope_hook))
    hooks.append(tr.transformer_blocks[0].attn.register_forward_hook(pair_hook("batch.blocks.0.attn", ["img", "txt"])))
    for i, b in enumerate(tr.transformer_blocks):
        hooks.append(b.register_forward_hook(pair_hook(f"batch.blocks.{i}", ["txt", "img"])))
    hooks.append(tr.norm_out.register_forward_hook(out_hook("batch.norm_out")))
    shape = (1, 3, 5)
    with torch.no_grad():
        out = forward(
            tr,
            inp["batch.hidden_states"],
            inp["batch.encoder_hidden_states"],
            inp["batch.encoder_hidden_states_mask"],
            inp["batch.timestep"],
            shape,
        )
        for h in hooks:
            h.remove()
        got["batch.output"] = out
        got["batch.output_unpacked"] = QwenImagePipeline._unpack_latents(out, 48, 80, VAE_SCALE)
        got["alone.output"] = forward(
            tr,
            inp["batch.hidden_states"][:1],
            inp["batch.encoder_hidden_states"][:1, :7],
            None,
            inp["batch.timestep"][:1],
            shape,
        )
        got["square.output"] = forward(
            tr, inp["square.hidden_states"], inp["square.encoder_hidden_states"], None, inp["square.timestep"], (1, 4, 4)
        )
        bf = load_transformer(d, torch.bfloat16)
        got["batch.output_bf16"] = forward(
            bf,
            inp["batch.hidden_states"].bfloat16(),
            inp["batch.encoder_hidden_states"].bfloat16(),
            inp["batch.encoder_hidden_states_mask"],
            inp["batch.timestep"].bfloat16(),
            shape,
        ).float()
    # The pads of sample 0 must not matter: the mask hides them.
    assert torch.allclose(got["alone.output"], got["batch.output"][:1], atol=1e-5), "mask"
    return {k: v.contiguous() for k, v in sorted(got.items())}


def expected(refs: dict) -> dict:
    return {
        "versions": {"diffusers": diffusers.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
        "transformer_config": TRANSFORMER_CONFIG,
        "cases": {
            "batch": {"width": 80, "height": 48, "latent": [6, 10], "tokens": [3, 5], "text_tokens": [7, 12], "text_padded": 12},
            "alone": {"sample": 0, "text_tokens": 7, "mask": None},
            "square": {"width": 64, "height": 64, "latent": [8, 8], "tokens": [4, 4], "text_tokens": 5, "mask": None},
        },
        "tensors": {k: [str(v.dtype).replace("torch.", ""), list(v.shape)] for k, v in refs.items()},
    }


def write_fixture() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    write_transformer(OUT)
    refs = compute_references(OUT)
    save_file(refs, str(OUT / "reference.safetensors"))
    (OUT / "expected.json").write_text(json.dumps(expected(refs), indent=2, sort_keys=True) + "\n")
    write_vae(OUT)
    vae_refs = compute_vae_references(OUT)
    save_file(vae_refs, str(OUT / "vae_reference.safetensors"))
    (OUT / "vae_expected.json").write_text(json.dumps(vae_expected(vae_refs), indent=2, sort_keys=True) + "\n")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({total} bytes)")


def verify() -> None:
    with tempfile.TemporaryDirectory() as t:
        write_transformer(Path(t))
        write_vae(Path(t))
        for c in ("transformer", "vae"):
            for f in ("config.json", "diffusion_pytorch_model.safetensors"):
                a = (Path(t) / c / f).read_bytes()
                b = (OUT / c / f).read_bytes()
                assert a == b, f"{c}/{f} differs from a fresh build"
    compare(compute_references(OUT), OUT / "reference.safetensors")
    compare(compute_vae_references(OUT), OUT / "vae_reference.safetensors")


def compare(refs: dict, path: Path) -> None:
    committed = load_file(str(path))
    assert sorted(refs) == sorted(committed), "tensor names differ"
    for k, v in refs.items():
        c = committed[k]
        assert v.shape == c.shape and v.dtype == c.dtype, k
        if v.is_floating_point():
            tol = 1e-5 * max(1.0, c.abs().max().item())
            err = (v - c).abs().max().item()
            assert err <= tol, f"{k}: max |diff| {err} > {tol}"
        else:
            assert torch.equal(v, c), k
    print(f"verified {len(refs)} tensors of {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--verify", action="store_true", help="re-check the committed fixture")
    args = ap.parse_args()
    torch.set_num_threads(1)
    verify() if args.verify else write_fixture()


if __name__ == "__main__":
    main()
