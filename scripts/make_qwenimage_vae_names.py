#!/usr/bin/env python3
"""Record the name and shape of every tensor of diffusers' AutoencoderKLQwenImage for two
configs, so that the synthetic Qwen-Image pipelines (`ferry synth --preset
qwen-image-pipeline`, `qwen-image-pipeline-tiny`) can be checked to write exactly that state
dict.

Rerun (from the repository root, with diffusers from scripts/requirements.txt):

    OMP_NUM_THREADS=1 python3 scripts/make_qwenimage_vae_names.py            # (re)write
    OMP_NUM_THREADS=1 python3 scripts/make_qwenimage_vae_names.py --verify   # re-check

No network access and no weights: the model is built with its constructor's random init and
only the state dict's keys and shapes are kept.

tests/data/qwen_image_vae/
    default.json   AutoencoderKLQwenImage() (diffusers' defaults: Qwen/Qwen-Image's VAE)
    tiny.json      the config of tests/fixtures/qwen-image/vae/config.json (base_dim 8)
    tiny_attention.json   the same with attn_scales [1.0, 0.25] (attention blocks in the
                   encoder's first and third levels)

Each file: {"diffusers": version, "config": the constructor's config,
            "parameters": total count, "tensors": [[name, shape], ...] in state-dict order}.
"""

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import diffusers  # noqa: E402
from diffusers import AutoencoderKLQwenImage  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "data" / "qwen_image_vae"
TINY_CONFIG = ROOT / "tests" / "fixtures" / "qwen-image" / "vae" / "config.json"


def names(config):
    """The state dict of AutoencoderKLQwenImage(**config) as [[name, shape], ...]."""
    model = AutoencoderKLQwenImage(**config)
    state = model.state_dict()
    return {
        "diffusers": diffusers.__version__,
        "config": {k: v for k, v in model.config.items() if not k.startswith("_")},
        "parameters": sum(v.numel() for v in state.values()),
        "tensors": [[k, list(v.shape)] for k, v in state.items()],
    }


def dumps(record):
    """The record as JSON, one tensor a line."""
    head = {k: v for k, v in record.items() if k != "tensors"}
    lines = [f"  {json.dumps(t)}" for t in record["tensors"]]
    text = json.dumps(head, indent=1)[:-2]
    return text + ',\n "tensors": [\n' + ",\n".join(lines) + "\n ]\n}\n"


def cases():
    tiny = json.loads(TINY_CONFIG.read_text())
    tiny = {k: v for k, v in tiny.items() if not k.startswith("_")}
    return {"default": {}, "tiny": tiny, "tiny_attention": dict(tiny, attn_scales=[1.0, 0.25])}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--verify", action="store_true", help="compare with the files instead of writing")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    failed = False
    for name, config in cases().items():
        path = OUT / f"{name}.json"
        got = names(config)
        if args.verify:
            want = json.loads(path.read_text())
            if got["tensors"] != want["tensors"] or got["parameters"] != want["parameters"]:
                print(f"{path}: differs", file=sys.stderr)
                failed = True
            else:
                print(f"{path}: {len(got['tensors'])} tensors, {got['parameters']} parameters, as recorded")
        else:
            path.write_text(dumps(got))
            print(f"wrote {path}: {len(got['tensors'])} tensors, {got['parameters']} parameters")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
