#!/usr/bin/env python3
"""The slow (vocab.json + merges.txt) form of the Qwen-Image pipeline fixture's tokenizer, and
transformers' token ids for it.

Qwen/Qwen-Image ships its tokenizer/ folder as a slow Qwen2Tokenizer saves it: vocab.json,
merges.txt, tokenizer_config.json (with added_tokens_decoder), special_tokens_map.json, and no
tokenizer.json. ferry's `TextCodec::from_tokenizer_dir` builds the tokenizer from those files
when tokenizer.json is absent; tests/slow_tokenizer.rs checks it against what this script
records. Rerun from the repository root (transformers and tokenizers as in
scripts/requirements.txt; torch is not needed):

    python3 scripts/make_slow_tokenizer_fixture.py            # (re)write
    python3 scripts/make_slow_tokenizer_fixture.py --verify   # re-check what is committed

Input: tests/fixtures/qwen-image-pipeline/tokenizer/ (tokenizer.json: a byte-level BPE of 420
tokens, <|endoftext|>=0, <|im_start|>=1, <|im_end|>=2, class Qwen2Tokenizer).

Output, tests/fixtures/qwen-image-pipeline/tokenizer-slow/, written as transformers 4's slow
Qwen2Tokenizer.save_pretrained writes these files (transformers 5 has no slow class, so the
files are written here from tokenizer.json's model.vocab, model.merges and added_tokens):

    vocab.json               token -> id, every token of model.vocab (the three special tokens
                             included, as they are in the fast vocabulary; so no
                             added_tokens.json, which holds only ids past the vocabulary)
    merges.txt               "#version: 0.2", then one "left right" merge a line, by rank
    tokenizer_config.json    the fast folder's config, with added_tokens_decoder (each added
                             token's content and flags, by id) and additional_special_tokens
    special_tokens_map.json  eos/pad tokens and additional_special_tokens
    expected.json            versions, and for every test string: the ids transformers gives
                             (no special tokens added: Qwen2Tokenizer has no BOS/EOS to add)
                             and its decoding of them, with and without the special tokens

The ids are taken from transformers loading the slow folder (AutoTokenizer -> Qwen2Tokenizer
built from vocab.json + merges.txt), and the script fails unless they equal the ids of the fast
folder (tokenizer.json) for every string.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import tokenizers
import transformers
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
FAST = ROOT / "tests" / "fixtures" / "qwen-image-pipeline" / "tokenizer"
SLOW = ROOT / "tests" / "fixtures" / "qwen-image-pipeline" / "tokenizer-slow"

# src/diffuse/qwen_text_encoder.rs, PROMPT_TEMPLATE.
TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
    "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
    "<|im_end|>\n<|im_start|>assistant\n"
)

TEXTS = [
    TEMPLATE.format("A cat"),
    "12345 and 3.14",
    "I'm sure they'll say it's fine; we'd've said DON'T, YOU'RE",
    "e\u0301 and caf\u00e9 vs cafe\u0301",  # NFC composes e + U+0301 into é
    "\u4f60\u597d\uff0c\u4e16\u754c",  # 你好，世界
    "emoji \U0001f431\U0001f3a8!",
    "two  spaces   and\n\nnewlines\r\n end  ",
    "\ttab, trailing spaces   ",
    "<|im_start|>user\nhi<|im_end|><|endoftext|>",
    "half<|im_start|tag, <|im_end|> in the middle",
    "",
]


def slow_files(fast_dir: Path) -> dict[str, str]:
    """The slow tokenizer's files, name -> text, from the fast folder."""
    fast = json.loads((fast_dir / "tokenizer.json").read_text())
    config = json.loads((fast_dir / "tokenizer_config.json").read_text())
    model = fast["model"]
    assert model["type"] == "BPE", model["type"]

    vocab = dict(sorted(model["vocab"].items(), key=lambda kv: kv[1]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    decoder = {
        str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
        for t in fast["added_tokens"]
    }
    extra = [t["content"] for t in fast["added_tokens"] if t["special"] and t["content"] not in (
        config.get("eos_token"), config.get("pad_token"), config.get("bos_token"), config.get("unk_token"))]

    config = dict(config)
    config["added_tokens_decoder"] = decoder
    config["additional_special_tokens"] = extra
    config["tokenizer_class"] = "Qwen2Tokenizer"

    def named(content):
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}

    special_map = {"additional_special_tokens": extra}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        if config.get(key) is not None:
            special_map[key] = named(config[key])

    return {
        "vocab.json": json.dumps(vocab, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
        "merges.txt": "#version: 0.2\n" + "".join(m + "\n" for m in merges),
        "tokenizer_config.json": json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
        "special_tokens_map.json": json.dumps(special_map, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
    }


def answers(slow_dir: Path) -> dict:
    """transformers' ids for TEXTS from the slow folder, checked against the fast folder's."""
    slow = AutoTokenizer.from_pretrained(slow_dir)
    fast = AutoTokenizer.from_pretrained(FAST)
    assert type(slow).__name__ == "Qwen2Tokenizer", type(slow).__name__
    assert not (slow_dir / "tokenizer.json").exists()
    cases = []
    for text in TEXTS:
        ids = slow(text).input_ids
        fast_ids = fast(text).input_ids
        if ids != fast_ids:
            sys.exit(f"{text!r}: slow {ids} != fast {fast_ids}")
        if ids != slow(text, add_special_tokens=False).input_ids:
            sys.exit(f"{text!r}: Qwen2Tokenizer added special tokens")
        cases.append({
            "text": text,
            "ids": ids,
            "decoded": slow.decode(ids, skip_special_tokens=False),
            "decoded_skip_special": slow.decode(ids, skip_special_tokens=True),
        })
    return {
        "generator": "scripts/make_slow_tokenizer_fixture.py",
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "cases": cases,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--verify", action="store_true", help="re-check the committed files, write nothing")
    args = parser.parse_args()

    files = slow_files(FAST)
    if args.verify:
        for name, text in files.items():
            if (SLOW / name).read_text() != text:
                sys.exit(f"{SLOW / name} differs from what the fast folder gives")
        expected = json.loads((SLOW / "expected.json").read_text())
        got = answers(SLOW)
        if got["cases"] != expected["cases"]:
            sys.exit(f"{SLOW / 'expected.json'}: transformers {transformers.__version__} now answers otherwise")
        print(f"{SLOW}: files and {len(got['cases'])} cases agree")
        return

    # Written to a scratch folder first, so that a failed check leaves the fixture as it was.
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for name, text in files.items():
            (scratch / name).write_text(text)
        expected = answers(scratch)
    SLOW.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (SLOW / name).write_text(text)
    (SLOW / "expected.json").write_text(json.dumps(expected, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {SLOW} ({len(expected['cases'])} cases)")


if __name__ == "__main__":
    main()
