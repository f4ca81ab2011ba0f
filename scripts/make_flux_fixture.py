#!/usr/bin/env python3
"""Build a tiny random-weight diffusers Flux DiT and record reference outputs.

Rerun (from the repository root, with the packages in scripts/requirements.txt, diffusers incl.):

    OMP_NUM_THREADS=1 python3 scripts/make_flux_fixture.py            # (re)write the fixture
    OMP_NUM_THREADS=1 python3 scripts/make_flux_fixture.py --verify   # re-check the committed one

No network access; weights and inputs are drawn from fixed seeds, so reruns are byte-identical
(CPU, one thread). Generation writes the transformer in bf16, reloads it in float32 and records
everything from the reloaded model, so the references belong to the files (an f32
implementation that upcasts the same bf16 values can match to ~1e-6, and a bf16 backend gets
the very weights diffusers' bf16 run had). --verify recomputes every tensor and compares
(|a-b| <= 1e-5 * max(1, max|b|)).

Directory tests/fixtures/flux/:

    transformer/{config.json,diffusion_pytorch_model.safetensors}   FluxTransformer2DModel, bf16
    reference.safetensors   the tensors below, f32 (the bf16 run's output widened to f32)
    expected.json           versions, the cases' settings, the tensors' shapes

The transformer (see TRANSFORMER_CONFIG): 2 double-stream and 2 single-stream blocks, 2 heads of
16 (inner dim 32), in_channels 16 = 4 latent channels x 2x2 patch (out_channels = in_channels),
joint_attention_dim 40 and pooled_projection_dim 24 (both != 32), guidance_embeds True,
axes_dims_rope [4, 6, 6] (sum = head_dim; the real [16, 56, 56] for 128). RoPE theta 10000 is
fixed in diffusers. Weights (init_weights): Linear weights N(0, 1/fan_in) (the modulation
linears norm1.linear / norm1_context.linear / norm.linear / norm_out.linear at gain 0.5),
biases 0.1 N(0,1), RMSNorm weights (the per-head q/k norms) 1 + 0.1 N(0,1). Nothing is zero.

Layouts. Packed latents are what FluxPipeline._pack_latents makes of [B, 4, h, w] latents
(h, w = image pixels / 8, even): [B, (h/2)(w/2), 16], token (row, col) row-major, its 16
features in (channel, patch row, patch col) order. The DiT's output has the same layout.
Positions as the pipeline makes them: txt_ids zeros [L, 3], img_ids (0, row, col).

Case "batch": two samples in one forward on a non-square image: 48 x 80 pixels -> latents
[2, 4, 6, 10] -> 3 x 5 tokens; texts of 6 tokens each (the pipeline feeds all its padded
tokens, no mask); sigma (= the pipeline's timestep / 1000) 0.9 and 0.35; guidance 3.5 and 5.0
(the pipeline passes one scale for all samples; two here, so that a mix-up shows); different
pooled embeddings.

    batch.latents_unpacked      f32 [2, 4, 6, 10]  the latents before packing
    batch.hidden_states         f32 [2, 15, 16]    packed latents, the DiT's input
    batch.encoder_hidden_states f32 [2, 6, 40]     T5's features
    batch.pooled_projections    f32 [2, 24]        CLIP's pooled embedding
    batch.timestep              f32 [2]
    batch.guidance              f32 [2]
    batch.temb                  f32 [2, 32]        time_text_embed output
    batch.x_embedder            f32 [2, 15, 32]
    batch.context_embedder      f32 [2, 6, 32]
    batch.rope_cos, rope_sin    f32 [21, 16]       pos_embed over cat(txt_ids, img_ids)
    batch.double.{i}.img / .txt f32 [2, 15, 32] / [2, 6, 32]   double block i's outputs
    batch.single.{i}.img / .txt f32 [2, 15, 32] / [2, 6, 32]   single block i's outputs
    batch.norm_out              f32 [2, 15, 32]
    batch.output                f32 [2, 15, 16]    the DiT's output (packed)
    batch.output_bf16           f32 [2, 15, 16]    the same forward in bfloat16 (weights, inputs
                                                   and activations), the yardstick for a bf16
                                                   backend
    alone.output                f32 [1, 15, 16]    sample 1 alone

Case "schnell": the same shapes without guidance_embeds (Flux.1-schnell's
CombinedTimestepTextProjEmbeddings), its own weights (transformer-schnell/, SEED_SCHNELL), on
the batch's inputs without guidance:

    schnell.temb    f32 [2, 32]
    schnell.output  f32 [2, 15, 16]
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

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import diffusers  # noqa: E402
from diffusers import FluxPipeline, FluxTransformer2DModel  # noqa: E402
from diffusers.models.normalization import RMSNorm  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "flux"

SEED_WEIGHTS = 5001
SEED_INPUTS = 5002
SEED_SCHNELL = 5003

TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=16,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=40,
    pooled_projection_dim=24,
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)

LINEAR_GAIN = 1.0
MOD_GAIN = 0.5  # shift / scale / gate: 1 + ~0.5 and gates of ~0.5
BIAS_STD = 0.1
MODULATION = ("norm1.linear", "norm1_context.linear", "norm.linear", "norm_out.linear")


def init_weights(model: torch.nn.Module, seed: int) -> None:
    """Redraw every parameter from `seed`, in sorted-name order (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    owner = {}
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            owner[f"{mname}.{pname}" if mname else pname] = (mname, module)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            (mname, module), kind = owner[name], name.rsplit(".", 1)[-1]
            if isinstance(module, (RMSNorm, torch.nn.RMSNorm)) and kind == "weight":
                v = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
            elif kind == "bias":
                v = BIAS_STD * torch.randn(p.shape, generator=g)
            elif isinstance(module, torch.nn.Linear):
                gain = MOD_GAIN if mname.endswith(MODULATION) else LINEAR_GAIN
                v = gain / p.shape[1] ** 0.5 * torch.randn(p.shape, generator=g)
            else:
                raise AssertionError(f"no init rule for {name} ({type(module).__name__})")
            p.copy_(v.to(p.dtype))


SCHNELL_CONFIG = dict(TRANSFORMER_CONFIG, guidance_embeds=False)
VARIANTS = {"transformer": (TRANSFORMER_CONFIG, SEED_WEIGHTS),
            "transformer-schnell": (SCHNELL_CONFIG, SEED_SCHNELL)}


def write_transformer(out: Path) -> None:
    for name, (config, seed) in VARIANTS.items():
        torch.manual_seed(seed)
        tr = FluxTransformer2DModel(**config).eval()
        init_weights(tr, seed)
        tr.to(torch.bfloat16).save_pretrained(out / name, safe_serialization=True)


def load_transformer(d: Path, dtype=torch.float32, name="transformer") -> FluxTransformer2DModel:
    tr = FluxTransformer2DModel.from_pretrained(d / name, torch_dtype=dtype).eval()
    assert {p.dtype for p in tr.parameters()} == {dtype}
    return tr


def inputs() -> dict:
    g = torch.Generator().manual_seed(SEED_INPUTS)
    c = TRANSFORMER_CONFIG["in_channels"] // 4
    lat = torch.randn((2, c, 6, 10), generator=g)
    return {
        "batch.latents_unpacked": lat,
        "batch.hidden_states": FluxPipeline._pack_latents(lat, 2, c, 6, 10),
        "batch.encoder_hidden_states": torch.randn((2, 6, 40), generator=g),
        "batch.pooled_projections": torch.randn((2, 24), generator=g),
        "batch.timestep": torch.tensor([0.9, 0.35], dtype=torch.float32),
        "batch.guidance": torch.tensor([3.5, 5.0], dtype=torch.float32),
    }


def forward(tr, x, text, pooled, t, guidance):
    dtype = x.dtype
    txt_ids = torch.zeros(text.shape[1], 3, dtype=dtype)
    img_ids = FluxPipeline._prepare_latent_image_ids(x.shape[0], 3, 5, "cpu", dtype)
    return tr(
        hidden_states=x,
        encoder_hidden_states=text,
        pooled_projections=pooled,
        timestep=t,
        img_ids=img_ids,
        txt_ids=txt_ids,
        guidance=guidance,
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
        got["batch.rope_cos"] = out[0].detach().clone()
        got["batch.rope_sin"] = out[1].detach().clone()

    def pair_hook(key):
        # The blocks return (encoder_hidden_states, hidden_states).
        def f(_m, _a, out):
            got[f"{key}.txt"] = out[0].detach().clone()
            got[f"{key}.img"] = out[1].detach().clone()

        return f

    hooks.append(tr.time_text_embed.register_forward_hook(out_hook("batch.temb")))
    hooks.append(tr.x_embedder.register_forward_hook(out_hook("batch.x_embedder")))
    hooks.append(tr.context_embedder.register_forward_hook(out_hook("batch.context_embedder")))
    hooks.append(tr.pos_embed.register_forward_hook(rope_hook))
    for i, b in enumerate(tr.transformer_blocks):
        hooks.append(b.register_forward_hook(pair_hook(f"batch.double.{i}")))
    for i, b in enumerate(tr.single_transformer_blocks):
        hooks.append(b.register_forward_hook(pair_hook(f"batch.single.{i}")))
    hooks.append(tr.norm_out.register_forward_hook(out_hook("batch.norm_out")))
    args = [inp[f"batch.{k}"] for k in ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance")]
    with torch.no_grad():
        got["batch.output"] = forward(tr, *args)
        for h in hooks:
            h.remove()
        got["alone.output"] = forward(tr, *[a[1:] for a in args])
        bf = load_transformer(d, torch.bfloat16)
        got["batch.output_bf16"] = forward(bf, *[a.bfloat16() for a in args]).float()
        schnell = load_transformer(d, name="transformer-schnell")
        hook = schnell.time_text_embed.register_forward_hook(out_hook("schnell.temb"))
        got["schnell.output"] = forward(schnell, *args[:4], None)
        hook.remove()
    return {k: v.contiguous() for k, v in sorted(got.items())}


def expected(refs: dict) -> dict:
    return {
        "versions": {"diffusers": diffusers.__version__, "torch": torch.__version__},
        "transformer_config": TRANSFORMER_CONFIG,
        "schnell_config": SCHNELL_CONFIG,
        "cases": {
            "batch": {"width": 80, "height": 48, "latent": [6, 10], "tokens": [3, 5], "text_tokens": 6},
            "alone": {"sample": 1},
            "schnell": {"transformer": "transformer-schnell", "inputs": "batch's, no guidance"},
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
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({total} bytes)")


def verify() -> None:
    with tempfile.TemporaryDirectory() as t:
        write_transformer(Path(t))
        for name in VARIANTS:
            for f in ("config.json", "diffusion_pytorch_model.safetensors"):
                a = (Path(t) / name / f).read_bytes()
                b = (OUT / name / f).read_bytes()
                assert a == b, f"{name}/{f} differs from a fresh build"
    compare(compute_references(OUT), OUT / "reference.safetensors")


def compare(refs: dict, path: Path) -> None:
    committed = load_file(str(path))
    assert sorted(refs) == sorted(committed), "tensor names differ"
    for k, v in refs.items():
        c = committed[k]
        assert v.shape == c.shape and v.dtype == c.dtype, k
        tol = 1e-5 * max(1.0, c.abs().max().item())
        err = (v - c).abs().max().item()
        assert err <= tol, f"{k}: max |diff| {err} > {tol}"
    print(f"verified {len(refs)} tensors of {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--verify", action="store_true", help="re-check the committed fixture")
    args = ap.parse_args()
    torch.set_num_threads(1)
    verify() if args.verify else write_fixture()


if __name__ == "__main__":
    main()
