#!/usr/bin/env python3
"""Expected outputs of SmolLM2-135M-Instruct (Q4_1 GGUF) from transformers, for tests/smollm2.rs.

transformers loads the GGUF (dequantized to f32, `gguf_file=...`) and, for each prompt, records
the prompt's token ids, a 32-token greedy continuation (full forward passes, never stopping at
EOS) and the last prompt position's logits (raw little-endian f32, one file per prompt).

    python3 scripts/make_smollm2_reference.py   # needs torch, transformers, gguf (scripts/requirements.txt)

Writes tests/reference/smollm2/expected.json and logits_<i>.f32.
"""
import json
import os
import subprocess
import sys

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "reference", "smollm2")
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "<|im_start|>user\nWhat is the boiling point of water?<|im_end|>\n<|im_start|>assistant\n",
]
NEW_TOKENS = 32


def main():
    gguf = subprocess.check_output([os.path.join(ROOT, "scripts", "fetch_smollm2.sh")], text=True).strip()
    folder, name = os.path.split(gguf)
    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    os.makedirs(OUT, exist_ok=True)
    cases = []
    for i, text in enumerate(PROMPTS):
        ids = tok(text, add_special_tokens=True)["input_ids"]
        seq = list(ids)
        with torch.no_grad():
            last = model(torch.tensor([seq])).logits[0, -1].float().numpy()
            last.astype("<f4").tofile(os.path.join(OUT, f"logits_{i}.f32"))
            for _ in range(NEW_TOKENS):
                logits = model(torch.tensor([seq])).logits[0, -1]
                seq.append(int(torch.argmax(logits)))
        top2 = np.sort(last)[-2:]
        cases.append({"text": text, "ids": ids, "greedy": seq[len(ids):], "logits": f"logits_{i}.f32",
                      "top2_margin": float(top2[1] - top2[0])})
        print(f"{i}: {len(ids)} prompt tokens -> {tok.decode(seq[len(ids):])!r}", file=sys.stderr)
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump({"gguf": name, "transformers": __import__("transformers").__version__,
                   "torch": torch.__version__, "prompts": cases}, f, indent=1)


if __name__ == "__main__":
    main()
