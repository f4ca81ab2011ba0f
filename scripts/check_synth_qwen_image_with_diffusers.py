#!/usr/bin/env python3
"""Check a Qwen-Image pipeline written by `ferry synth --preset qwen-image-pipeline-tiny` (or
the real `qwen-image-pipeline`) with diffusers and transformers: the VAE and the DiT load
with no missing, unexpected or mismatched key; the text encoder loads with only the vision
tower (`visual.*`, not written) missing; QwenImagePipeline.from_pretrained loads the whole
directory and draws an image whose pixels are finite.

Not run in CI (it needs diffusers, transformers and torch: scripts/requirements.txt).

Usage: OMP_NUM_THREADS=1 scripts/check_synth_qwen_image_with_diffusers.py [--dir DIR]
           [--size 64]   (without --dir, the tiny preset is written to a temporary directory)
"""

import argparse
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
from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel  # noqa: E402
from transformers import Qwen2_5_VLForConditionalGeneration  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def loading_info(cls, directory):
    """cls.from_pretrained(directory)'s missing, unexpected and mismatched keys."""
    _, info = cls.from_pretrained(directory, output_loading_info=True)
    return {k: sorted(map(str, info.get(k, []))) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", help="a directory ferry synth wrote (default: write the tiny preset)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.dir
        if directory is None:
            directory = os.path.join(tmp, "qwen-image")
            ferry = os.path.join(ROOT, "target", "release", "ferry")
            cmd = [ferry, "synth", "--preset", "qwen-image-pipeline-tiny", "--out", directory]
            print("+", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
        failed = []
        for name, cls in [("vae", AutoencoderKLQwenImage), ("transformer", QwenImageTransformer2DModel)]:
            info = loading_info(cls, os.path.join(directory, name))
            bad = {k: v for k, v in info.items() if v}
            print(f"{name}: {'every key loaded' if not bad else bad}")
            if bad:
                failed.append(name)
        info = loading_info(Qwen2_5_VLForConditionalGeneration, os.path.join(directory, "text_encoder"))
        not_visual = [k for k in info["missing_keys"] if ".visual." not in k and not k.startswith("visual.")]
        others = info["unexpected_keys"] + info["mismatched_keys"]
        print(f"text_encoder: {len(info['missing_keys'])} keys missing, all of the vision tower: {not not_visual}")
        if not_visual or others:
            print(f"text_encoder: missing {not_visual}, unexpected or mismatched {others}")
            failed.append("text_encoder")

        pipe = QwenImagePipeline.from_pretrained(directory, dtype=torch.float32)
        image = pipe(
            "a red fox in the snow",
            height=args.size,
            width=args.size,
            num_inference_steps=2,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        ).images[0]
        finite = bool(np.isfinite(image).all())
        print(f"pipeline: image {list(image.shape)}, values {image.min():.3f}..{image.max():.3f}, finite: {finite}")
        if not finite or image.shape != (args.size, args.size, 3):
            failed.append("pipeline")
    if failed:
        print("FAILED:", ", ".join(failed), file=sys.stderr)
        sys.exit(1)
    print("ok")


if __name__ == "__main__":
    main()
