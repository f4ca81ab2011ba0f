#!/usr/bin/env python3
"""Check a Flux.1 pipeline written by `ferry synth --preset flux-pipeline-tiny` (or the real
`flux.1-dev-pipeline`) with diffusers and transformers: the transformer, the VAE and both text
encoders load with no missing, unexpected or mismatched key; transformers' CLIPTokenizer and
T5TokenizerFast give the ids of tests/data/flux_synth_tokens.json, which tests/synth_flux.rs
checks ferry's tokenizers against (so ferry and transformers agree); FluxPipeline.from_pretrained
loads the whole directory and draws an image whose pixels are finite.

Not run in CI (it needs diffusers, transformers and torch: scripts/requirements.txt).

Usage: OMP_NUM_THREADS=1 scripts/check_synth_flux_with_diffusers.py [--dir DIR] [--ferry BIN]
           (without --dir, the tiny preset is written to a temporary directory; the token ids
           are checked only for the tiny preset's tokenizers, whatever --dir holds)
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel  # noqa: E402
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENS = os.path.join(ROOT, "tests", "data", "flux_synth_tokens.json")


def loading_info(cls, directory):
    """cls.from_pretrained(directory)'s missing, unexpected and mismatched keys."""
    _, info = cls.from_pretrained(directory, output_loading_info=True)
    return {k: sorted(map(str, info.get(k, []))) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}


def default_ferry():
    for profile in ("release", "debug"):
        path = os.path.join(ROOT, "target", profile, "ferry")
        if os.path.exists(path):
            return path
    return "ferry"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", help="a directory ferry synth wrote (default: write the tiny preset)")
    parser.add_argument("--ferry", default=default_ferry(), help="the ferry binary")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--height", type=int, default=48)
    args = parser.parse_args()
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        tiny = os.path.join(tmp, "flux-tiny")
        cmd = [args.ferry, "synth", "--preset", "flux-pipeline-tiny", "--out", tiny, "--seed", "1"]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        directory = args.dir or tiny

        for name, cls in [
            ("transformer", FluxTransformer2DModel),
            ("vae", AutoencoderKL),
            ("text_encoder", CLIPTextModel),
            ("text_encoder_2", T5EncoderModel),
        ]:
            info = loading_info(cls, os.path.join(directory, name))
            bad = {k: v for k, v in info.items() if v}
            print(f"{name}: {'every key loaded' if not bad else bad}")
            if bad:
                failed.append(name)

        cases = json.load(open(TOKENS, encoding="utf-8"))
        clip = CLIPTokenizer.from_pretrained(os.path.join(tiny, "tokenizer"))
        t5 = T5TokenizerFast.from_pretrained(os.path.join(tiny, "tokenizer_2"))
        differ = 0
        for c in cases["clip"]:
            ids = clip(c["prompt"], padding="max_length", max_length=77, truncation=True)["input_ids"]
            if ids != c["ids"]:
                differ += 1
                print(f"clip {c['prompt']!r}:\n  transformers {ids}\n  ferry        {c['ids']}")
        for c in cases["t5"]:
            ids = t5(c["prompt"], padding="max_length", max_length=c["max_length"], truncation=True,
                     add_special_tokens=True)["input_ids"]
            if ids != c["ids"]:
                differ += 1
                print(f"t5 {c['prompt']!r} at {c['max_length']}:\n  transformers {ids}\n  ferry        {c['ids']}")
        total = len(cases["clip"]) + len(cases["t5"])
        print(f"tokenizers: {total - differ} of {total} cases give ferry's ids "
              f"({type(clip).__name__}, {type(t5).__name__})")
        if differ:
            failed.append("tokenizers")

        pipe = FluxPipeline.from_pretrained(directory, dtype=torch.float32)
        image = pipe(
            "a red fox in the snow",
            height=args.height,
            width=args.width,
            num_inference_steps=2,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        ).images[0]
        finite = bool(np.isfinite(image).all())
        print(f"pipeline: image {list(image.shape)}, values {image.min():.3f}..{image.max():.3f}, finite: {finite}")
        if not finite or image.shape != (args.height, args.width, 3):
            failed.append("pipeline")
    if failed:
        print("FAILED:", ", ".join(failed), file=sys.stderr)
        sys.exit(1)
    print("ok")


if __name__ == "__main__":
    main()
