#!/usr/bin/env python3
"""Check a GGUF file written by `ferry synth --gguf` with gguf-py, llama.cpp's own Python
reader: GGUFReader opens it, and for the Q4_K and Q6_K tensors (and the F32 norms) gguf-py's
`gguf.quants.dequantize` gives bit for bit what ferry dequantizes (examples/gguf_tensor.rs)
and is close to the synthetic weights (the safetensors directory of the same preset and seed),
with the Q/K rows permuted as llama.cpp's converter permutes them for the llama architecture.

Not run in CI (it needs `pip install gguf numpy` and writes ~1.3 GB under the work directory).

Usage: scripts/check_gguf_with_gguf_py.py [--preset mistral-7b] [--layers 1] [--work DIR]
"""

import argparse
import importlib.metadata
import json
import os
import struct
import subprocess
import sys
import tempfile

import numpy as np
import gguf


def run(cmd):
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def read_safetensors(directory):
    """name -> float32 array, from every *.safetensors file of `directory` (bf16 or f32)."""
    out = {}
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".safetensors"):
            continue
        with open(os.path.join(directory, name), "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
            data = f.read()
        for key, t in header.items():
            if key == "__metadata__":
                continue
            a, b = t["data_offsets"]
            raw = np.frombuffer(data[a:b], dtype=np.uint16 if t["dtype"] == "BF16" else np.float32)
            if t["dtype"] == "BF16":
                raw = (raw.astype(np.uint32) << 16).view(np.float32)
            out[key] = raw.reshape(t["shape"])
    return out


def llama_cpp_permute(w, heads):
    """convert_hf_to_gguf.py's LlamaModel.permute: interleave each head's two rotary halves."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(name):
    top = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    if name in top:
        return top[name]
    pairs = [
        ("blk.", "model.layers."),
        (".attn_norm", ".input_layernorm"),
        (".attn_q_norm", ".self_attn.q_norm"),
        (".attn_k_norm", ".self_attn.k_norm"),
        (".attn_q", ".self_attn.q_proj"),
        (".attn_k", ".self_attn.k_proj"),
        (".attn_v", ".self_attn.v_proj"),
        (".attn_output", ".self_attn.o_proj"),
        (".ffn_norm", ".post_attention_layernorm"),
        (".ffn_gate", ".mlp.gate_proj"),
        (".ffn_up", ".mlp.up_proj"),
        (".ffn_down", ".mlp.down_proj"),
    ]
    for a, b in pairs:
        name = name.replace(a, b)
    return name


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="mistral-7b")
    p.add_argument("--layers", default="1")
    p.add_argument("--seed", default="7")
    p.add_argument("--work", default=None, help="directory for the files (default: a temporary one)")
    args = p.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(root, "target"))
    work = args.work or tempfile.mkdtemp(prefix="ferry-gguf-py-")
    os.makedirs(work, exist_ok=True)
    gguf_path = os.path.join(work, "model.gguf")
    hf_dir = os.path.join(work, "hf")

    run(["cargo", "build", "--release", "--bin", "ferry", "--example", "gguf_tensor"])
    ferry = os.path.join(target, "release", "ferry")
    dump = os.path.join(target, "release", "examples", "gguf_tensor")
    common = ["--preset", args.preset, "--layers", args.layers, "--seed", args.seed, "--force"]
    run([ferry, "synth", *common, "--gguf", "Q4_K_M", "--out", gguf_path])
    run([ferry, "synth", *common, "--out", hf_dir])

    reader = gguf.GGUFReader(gguf_path)
    field = lambda key: reader.fields[key]
    arch = bytes(field("general.architecture").parts[-1]).decode()
    heads = int(field(f"{arch}.attention.head_count").parts[-1][0])
    kv_heads = int(field(f"{arch}.attention.head_count_kv").parts[-1][0])
    print(f"gguf-py {importlib.metadata.version('gguf')}: {len(reader.tensors)} tensors, {len(reader.fields)} fields, "
          f"architecture {arch}, heads {heads}/{kv_heads}")
    weights = read_safetensors(hf_dir)

    Q = gguf.GGMLQuantizationType
    failures = 0
    print(f"{'tensor':<28} {'type':<5} {'shape':<16} {'= ferry':<8} {'rel L2 vs weights':>18}")
    for t in reader.tensors:
        if t.tensor_type not in (Q.Q4_K, Q.Q6_K, Q.F32, Q.Q8_0):
            continue
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = tuple(int(d) for d in reversed(t.shape))  # outermost first
        values = values.reshape(shape)

        out = os.path.join(work, "tensor.f32")
        subprocess.run([dump, gguf_path, t.name, out], check=True, stderr=subprocess.DEVNULL)
        ours = np.fromfile(out, dtype=np.float32).reshape(shape)
        same = np.array_equal(values.view(np.uint32), ours.view(np.uint32))

        want = weights[hf_name(t.name)]
        if arch == "llama" and t.name.endswith("attn_q.weight"):
            want = llama_cpp_permute(want, heads)
        if arch == "llama" and t.name.endswith("attn_k.weight"):
            want = llama_cpp_permute(want, kv_heads)
        err = float(np.linalg.norm(values - want) / np.linalg.norm(want))
        bound = {Q.F32: 0.0, Q.Q8_0: 0.01, Q.Q6_K: 0.03, Q.Q4_K: 0.11}[t.tensor_type]
        ok = same and err <= bound
        failures += not ok
        print(f"{t.name:<28} {t.tensor_type.name:<5} {str(list(shape)):<16} {str(same):<8} "
              f"{err:>18.5f}{'' if ok else '  FAIL'}")
    print("all tensors agree" if failures == 0 else f"{failures} tensors FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
