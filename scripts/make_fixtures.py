#!/usr/bin/env python3
"""Generate tiny random-weight test fixtures for ferry.

Rerun (from the repository root, with the packages in scripts/requirements.txt):

    python3 scripts/make_fixtures.py            # (re)write every fixture
    python3 scripts/make_fixtures.py --verify   # only re-check the committed fixtures

No network access is needed: the tokenizer is trained here on an embedded corpus and
the weights are drawn from fixed seeds. Reruns produce byte-identical files (CPU,
single thread, fixed seeds, deterministic BPE training).

For each NAME in {llama, llama3, mistral, qwen2, qwen3} it writes tests/fixtures/NAME/:

    config.json                       as written by save_pretrained (llama/llama3: rope keys
                                      rewritten to the legacy rope_theta/rope_scaling form)
    generation_config.json            bos_token_id / eos_token_id
    model.safetensors                 weights (mistral instead: model-0000{1,2}-of-00002.safetensors
                                      + model.safetensors.index.json)
    tokenizer.json                    byte-level BPE tokenizer (HF `tokenizers` format)
    tokenizer_config.json             incl. chat_template (ChatML), bos/eos tokens
    expected.json                     reference outputs computed with transformers in float32

expected.json schema:

    {
      "prompts": [
        {"text": str,
         "ids": [int],            # tokenizer(text, add_special_tokens=True).input_ids
         "logits": [[float]],     # len(ids) rows x vocab_size, float32 forward, 7 sig. digits
         "greedy": [int]}         # 16 ids: argmax of last position, full forward each step,
      ],                          #          never stops at EOS
      "chat": {
        "messages": [{"role": str, "content": str}],
        "add_generation_prompt": true,
        "text": str,              # tokenizer.apply_chat_template(..., tokenize=False)
        "ids": [int]              # tokenizer(text, add_special_tokens=False).input_ids
      }                           #   (== apply_chat_template(..., tokenize=True))
    }

Fixture variations (see FIXTURES below). All: hidden 64, 4 heads, 2 KV heads (GQA),
intermediate 172, silu, tokenizer of 420 tokens (ids 0..2 = <|endoftext|>, <|im_start|>,
<|im_end|>) but vocab_size 448, so ids 420..447 have no token. RMSNorm weights ~ 1 + 0.1*N(0,1).
    llama   Llama-2 style, 2 layers, eps 1e-5, f32, untied, BOS (<|endoftext|>, id 0) prepended
            by tokenizer.json's TemplateProcessing post-processor; chat template starts with
            {{ bos_token }}. config.json uses the legacy top-level keys rope_theta=10000 and
            rope_scaling=null (as Hub Llama checkpoints do)
    llama3  3 layers, eps 1e-5, llama3 rope scaling, legacy keys rope_theta=500000 +
            rope_scaling{...}; head_dim 16 and original_max_position_embeddings 64 make one
            frequency pass through, one get smoothed and six get divided by 8. Tied, bf16
            weights, no BOS from the tokenizer (but {{ bos_token }} in the chat template),
            eos_token_id [0, 2] (a list)
    mistral 2 layers, eps 1e-6, f32, sliding_window null, weights sharded into 2 files + index;
            `rope_parameters` (transformers-5 style) in config.json
    qwen2   2 layers, eps 1e-6, random q/k/v biases, tied, f16 weights, rope_parameters,
            Qwen-style tokenizer.json (NFC normalizer + Qwen split regex: digits one by one),
            Qwen-style chat template (whitespace control, default system prompt), eos <|endoftext|>
    qwen3   2 layers, eps 1e-6, q_norm/k_norm, head_dim 32 != hidden/heads (16), f32,
            rope_parameters, Qwen-style tokenizer.json
Every prompt's 16 greedy steps have a top-1/top-2 logit gap of at least MIN_GREEDY_GAP.
"""

import argparse
import contextlib
import copy
import hashlib
import io
import json
import math
import os
import shutil
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from tokenizers import (  # noqa: E402
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.utils import logging as hf_logging  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures"

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
TOKENIZER_TRAIN_VOCAB = 420  # 256 bytes + 3 specials + merges; model vocab rounds up to 448
GREEDY_STEPS = 16
MIN_GREEDY_GAP = 5e-3

CHAT_MESSAGES = [
    {"role": "system", "content": "You are brief."},
    {"role": "user", "content": "hello there"},
]

# SmolLM2-style ChatML.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Same, but the template itself emits the BOS token (as Llama-3 templates do).
CHATML_BOS_TEMPLATE = "{{ bos_token }}" + CHATML_TEMPLATE
# Qwen2-style: whitespace control, attribute access, default system prompt.
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}\n"
    "    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# ---------------------------------------------------------------------------------------
# Tokenizer corpus: the Zen of Python plus a few paragraphs of plain English.
# ---------------------------------------------------------------------------------------

CORPUS_EXTRA = """\
The quick brown fox jumps over the lazy dog. A small model can still be a useful test,
as long as every number it produces is checked against a trusted reference.

Once upon a time there was a little village by the sea. Every morning the fishermen went
out in their boats, and every evening they came back with nets full of silver fish. The
children played on the sand, and the old men sat in the shade and told stories about the
storms of long ago.

Hello there! How are you today? I am fine, thank you. What would you like to talk about?
We could talk about the weather, the news, or the book you are reading. The weather is
nice and warm, and the sky is clear and blue.

To make a cup of tea, first boil some water. Put the tea leaves in the pot, pour the hot
water over them, and wait for three or four minutes. Then pour the tea into a cup and add
milk or sugar if you like.

The numbers one, two, three, four, five, six, seven, eight, nine and ten are written as
1, 2, 3, 4, 5, 6, 7, 8, 9 and 10. There are 365 days in a year and 24 hours in a day.

A language model reads a sequence of tokens and predicts the next one. It is trained on a
large amount of text, and it learns which words tend to follow which other words. When you
ask it a question, it writes the answer one token at a time.
"""


def zen_of_python() -> str:
    with contextlib.redirect_stdout(io.StringIO()):
        import this  # noqa: F401  (prints the Zen on first import)
    return "".join(this.d.get(c, c) for c in this.s)


def train_tokenizer() -> Tokenizer:
    corpus = zen_of_python() + "\n\n" + CORPUS_EXTRA
    lines = [line for line in corpus.splitlines(keepends=True)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_TRAIN_VOCAB,
        min_frequency=1,
        show_progress=False,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(lines, trainer=trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    return tok


def wrap_tokenizer(raw: Tokenizer, fx: dict) -> PreTrainedTokenizerFast:
    raw = Tokenizer.from_str(raw.to_str())  # private copy
    if fx.get("qwen_pretokenizer"):
        # What real Qwen2/Qwen3 tokenizer.json files carry (and what transformers 5's
        # Qwen2Tokenizer forces for model_type qwen2 regardless of tokenizer.json):
        # NFC normalizer, Qwen split regex (digits one by one), then byte-level mapping.
        raw.normalizer = normalizers.NFC()
        raw.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    kwargs = dict(
        tokenizer_object=raw,
        bos_token=fx["bos_token"],
        eos_token=fx["eos_token"],
        chat_template=fx["chat_template"],
        clean_up_tokenization_spaces=False,
        model_max_length=fx["max_position_embeddings"],
    )
    if fx["add_bos"]:
        # Makes transformers install TemplateProcessing("<bos> $A") as tokenizer.json's
        # post_processor; it is also what from_pretrained re-installs from tokenizer_config.
        kwargs["add_bos_token"] = True
    else:
        raw.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=True)
    return PreTrainedTokenizerFast(**kwargs)


# ---------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------

COMMON = dict(
    hidden_size=64,
    intermediate_size=172,
    num_attention_heads=4,
    num_key_value_heads=2,
    hidden_act="silu",
    initializer_range=0.02,  # only recorded in config.json; we re-draw all weights below
)

FIXTURES = {
    "llama": dict(
        cls=(LlamaConfig, LlamaForCausalLM),
        seed=1001,
        num_hidden_layers=2,
        rms_norm_eps=1e-5,
        max_position_embeddings=256,
        rope_theta=10000.0,
        rope_scaling=None,
        legacy_rope=True,
        tie_word_embeddings=False,
        dtype=torch.float32,
        add_bos=True,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        eos_token_id=2,
        chat_template=CHATML_BOS_TEMPLATE,
        prompts=[
            "Flat is better than nested.",
            "Hello there!",
            "the old men sat",
        ],
    ),
    "llama3": dict(
        cls=(LlamaConfig, LlamaForCausalLM),
        seed=1002,
        num_hidden_layers=3,
        rms_norm_eps=1e-5,
        max_position_embeddings=512,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        legacy_rope=True,
        tie_word_embeddings=True,
        weight_std=0.12,
        dtype=torch.bfloat16,
        add_bos=False,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        eos_token_id=[0, 2],
        chat_template=CHATML_BOS_TEMPLATE,
        prompts=[
            "Once upon a time",
            "1, 2, 3, 4",
            "café ☕",  # multi-byte UTF-8 -> byte-level tokens
        ],
    ),
    "mistral": dict(
        cls=(MistralConfig, MistralForCausalLM),
        seed=1003,
        num_hidden_layers=2,
        rms_norm_eps=1e-6,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        rope_scaling=None,
        sliding_window=None,
        tie_word_embeddings=False,
        dtype=torch.float32,
        shard="400KB",
        add_bos=False,
        bos_token=None,
        eos_token="<|im_end|>",
        eos_token_id=2,
        chat_template=CHATML_TEMPLATE,
        prompts=[
            "<|im_start|>user\nHi<|im_end|>",  # special tokens inside the text
            "Simple is better than complex.",
            "the weather is nice",
        ],
    ),
    "qwen2": dict(
        cls=(Qwen2Config, Qwen2ForCausalLM),
        seed=1004,
        num_hidden_layers=2,
        rms_norm_eps=1e-6,
        max_position_embeddings=1024,
        rope_theta=1000000.0,
        rope_scaling=None,
        tie_word_embeddings=True,
        weight_std=0.12,
        dtype=torch.float16,
        qwen_pretokenizer=True,
        add_bos=False,
        bos_token=None,
        eos_token="<|endoftext|>",
        eos_token_id=0,
        chat_template=QWEN_TEMPLATE,
        prompts=[
            "Version 3.14 is out",  # Qwen regex: digits split one by one
            "  indented\tcode",
            "I'll be there",
        ],
    ),
    "qwen3": dict(
        cls=(Qwen3Config, Qwen3ForCausalLM),
        seed=1005,
        num_hidden_layers=2,
        rms_norm_eps=1e-6,
        max_position_embeddings=1024,
        rope_theta=1000000.0,
        rope_scaling=None,
        head_dim=32,
        qwen_pretokenizer=True,
        tie_word_embeddings=False,
        dtype=torch.float32,
        add_bos=False,
        bos_token=None,
        eos_token="<|im_end|>",
        eos_token_id=2,
        chat_template=QWEN_TEMPLATE,
        prompts=[
            "cafe\u0301 au lait",  # NFC normalizer: e + combining acute -> é
            "Call 911 now",
            "The sky is blue.",
        ],
    ),
}

WEIGHT_STD = 0.08  # linear layers; tied-embedding fixtures use more (else greedy just repeats)
EMBED_STD = 0.1
BIAS_STD = 0.2


def init_weights(model: torch.nn.Module, seed: int, weight_std: float) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith("norm.weight"):  # all RMSNorms incl. q_norm / k_norm
                v = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
            elif name.endswith(".bias"):
                v = BIAS_STD * torch.randn(p.shape, generator=g)
            elif "embed_tokens" in name:
                v = EMBED_STD * torch.randn(p.shape, generator=g)
            else:
                v = weight_std * torch.randn(p.shape, generator=g)
            p.copy_(v.to(p.dtype))


def build_config(fx: dict, vocab_size: int):
    config_cls = fx["cls"][0]
    kw = dict(COMMON)
    kw.update(
        vocab_size=vocab_size,
        num_hidden_layers=fx["num_hidden_layers"],
        rms_norm_eps=fx["rms_norm_eps"],
        max_position_embeddings=fx["max_position_embeddings"],
        rope_theta=fx["rope_theta"],
        tie_word_embeddings=fx["tie_word_embeddings"],
        bos_token_id=0,
        eos_token_id=fx["eos_token_id"],
        pad_token_id=None,
    )
    if fx["rope_scaling"] is not None:
        kw["rope_scaling"] = dict(fx["rope_scaling"])
    if "sliding_window" in fx:
        kw["sliding_window"] = fx["sliding_window"]
    if "head_dim" in fx:
        kw["head_dim"] = fx["head_dim"]
    if config_cls is LlamaConfig:
        kw.update(attention_bias=False, mlp_bias=False)
    return config_cls(**kw)


def write_legacy_rope(path: Path, fx: dict) -> None:
    """Rewrite transformers-5 `rope_parameters` as the pre-v5 top-level `rope_theta` +
    `rope_scaling` keys that most checkpoints on the Hub (e.g. Llama 2 / 3.x) still carry."""
    cfg = json.loads(path.read_text())
    rp = cfg.pop("rope_parameters")
    assert rp["rope_theta"] == fx["rope_theta"], rp
    cfg["rope_theta"] = fx["rope_theta"]
    cfg["rope_scaling"] = fx["rope_scaling"]
    if fx["rope_scaling"] is None:
        assert rp == {"rope_type": "default", "rope_theta": fx["rope_theta"]}, rp
    else:
        assert rp == dict(fx["rope_scaling"], rope_theta=fx["rope_theta"]), rp
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def round7(x: float) -> float:
    return float(f"{x:.7g}")


@torch.no_grad()
def forward_logits(model, ids):
    out = model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False)
    return out.logits[0].float()


@torch.no_grad()
def greedy(model, ids, steps=GREEDY_STEPS):
    seq = list(ids)
    new, gaps = [], []
    for _ in range(steps):
        last = forward_logits(model, seq)[-1]
        top2 = torch.topk(last, 2).values
        gaps.append(float(top2[0] - top2[1]))
        nxt = int(torch.argmax(last))
        new.append(nxt)
        seq.append(nxt)
    return new, min(gaps)


def dump_expected(path: Path, data: dict) -> None:
    """JSON with one line per logits row (readable, diff-friendly, deterministic)."""
    c = lambda o: json.dumps(o, ensure_ascii=False, separators=(", ", ": "))  # noqa: E731
    lines = ["{", '  "prompts": [']
    for pi, p in enumerate(data["prompts"]):
        lines.append("    {")
        lines.append(f'      "text": {c(p["text"])},')
        lines.append(f'      "ids": {c(p["ids"])},')
        lines.append('      "logits": [')
        rows = [f"        {json.dumps(r, separators=(',', ':'))}" for r in p["logits"]]
        lines.append(",\n".join(rows))
        lines.append("      ],")
        lines.append(f'      "greedy": {c(p["greedy"])}')
        lines.append("    }" + ("," if pi + 1 < len(data["prompts"]) else ""))
    lines.append("  ],")
    lines.append(f'  "chat": {c(data["chat"])}')
    lines.append("}")
    text = "\n".join(lines) + "\n"
    assert json.loads(text) == data
    path.write_text(text, encoding="utf-8")


def file_digest(d: Path) -> dict:
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


def make_fixture(name: str, fx: dict, raw_tok: Tokenizer) -> None:
    d = OUT / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)

    tok = wrap_tokenizer(raw_tok, fx)
    tok_vocab = len(tok)  # incl. added special tokens
    vocab_size = 64 * math.ceil(tok_vocab / 64)
    assert vocab_size > tok_vocab

    config = build_config(fx, vocab_size)
    torch.manual_seed(fx["seed"])
    model = fx["cls"][1](config)
    model.eval()
    init_weights(model, fx["seed"], fx.get("weight_std", WEIGHT_STD))
    model = model.to(fx["dtype"])
    save_kw = {}
    if "shard" in fx:
        save_kw["max_shard_size"] = fx["shard"]
    model.save_pretrained(d, safe_serialization=True, **save_kw)
    if fx.get("legacy_rope"):
        write_legacy_rope(d / "config.json", fx)
    tok.save_pretrained(d, save_jinja_files=False)
    gen = GenerationConfig(bos_token_id=0, eos_token_id=fx["eos_token_id"])
    gen.save_pretrained(d)
    del model

    # Reference outputs: reload exactly what was written, upcast to float32.
    model = load_model(d)
    tok = AutoTokenizer.from_pretrained(d)
    prompts = []
    for text in fx["prompts"]:
        ids = tok(text, add_special_tokens=True)["input_ids"]
        assert 5 <= len(ids) <= 12, (name, text, len(ids), ids)
        if fx["add_bos"]:
            assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1, ids
        else:
            assert tok(text, add_special_tokens=False)["input_ids"] == ids
        logits = forward_logits(model, ids)
        g, gap = greedy(model, ids)
        assert gap >= MIN_GREEDY_GAP, (name, text, gap)  # keep argmax robust to fp noise
        print(f"  {name}: prompt {text!r}: {len(ids)} ids, greedy min top1-top2 gap {gap:.2e}")
        prompts.append(
            {
                "text": text,
                "ids": ids,
                "logits": [[round7(x) for x in row] for row in logits.tolist()],
                "greedy": g,
            }
        )
    chat_text = tok.apply_chat_template(CHAT_MESSAGES, add_generation_prompt=True, tokenize=False)
    chat_ids = tok(chat_text, add_special_tokens=False)["input_ids"]
    via_template = tok.apply_chat_template(CHAT_MESSAGES, add_generation_prompt=True, tokenize=True)
    if isinstance(via_template, dict) or hasattr(via_template, "keys"):
        via_template = via_template["input_ids"]
    assert list(via_template) == chat_ids, (via_template, chat_ids)
    expected = {
        "prompts": prompts,
        "chat": {
            "messages": CHAT_MESSAGES,
            "add_generation_prompt": True,
            "text": chat_text,
            "ids": chat_ids,
        },
    }
    dump_expected(d / "expected.json", expected)


def load_model(d: Path):
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    return model


def verify(name: str, fx: dict) -> dict:
    d = OUT / name
    exp = json.loads((d / "expected.json").read_text(encoding="utf-8"))
    model = load_model(d)
    tok = AutoTokenizer.from_pretrained(d)
    max_err = 0.0
    for p in exp["prompts"]:
        assert tok(p["text"], add_special_tokens=True)["input_ids"] == p["ids"], p["text"]
        logits = forward_logits(model, p["ids"])
        ref = torch.tensor(p["logits"], dtype=torch.float32)
        assert logits.shape == ref.shape, (logits.shape, ref.shape)
        err = float((logits - ref).abs().max())
        max_err = max(max_err, err)
        assert err < 1e-5, (name, p["text"], err)
        g, _ = greedy(model, p["ids"])
        assert g == p["greedy"], (name, p["text"], g, p["greedy"])
    # The Rust side reads tokenizer.json directly: the plain `tokenizers` library must agree.
    raw = Tokenizer.from_file(str(d / "tokenizer.json"))
    for p in exp["prompts"]:
        assert raw.encode(p["text"], add_special_tokens=True).ids == p["ids"], (name, p["text"])
    chat = exp["chat"]
    assert raw.encode(chat["text"], add_special_tokens=False).ids == chat["ids"], name
    text = tok.apply_chat_template(chat["messages"], add_generation_prompt=True, tokenize=False)
    assert text == chat["text"]
    assert tok(text, add_special_tokens=False)["input_ids"] == chat["ids"]

    want_rope = dict(fx["rope_scaling"] or {"rope_type": "default"}, rope_theta=fx["rope_theta"])
    assert dict(model.config.rope_parameters) == want_rope, (model.config.rope_parameters, want_rope)
    cfg = json.loads((d / "config.json").read_text())
    sizes = {p.name: p.stat().st_size for p in sorted(d.iterdir())}
    n_params = sum(p.numel() for p in model.parameters())
    saved_dtypes = set()
    from safetensors import safe_open

    for f in sorted(d.glob("*.safetensors")):
        with safe_open(f, "pt") as sf:
            for k in sf.keys():
                saved_dtypes.add(str(sf.get_slice(k).get_dtype()))
    return dict(name=name, params=n_params, dtypes=sorted(saved_dtypes), max_err=max_err,
                sizes=sizes, vocab=cfg["vocab_size"], tok_vocab=len(tok))


def llama3_scaling_matters() -> float:
    """Max |logit diff| between llama3-scaled and plain RoPE on the llama3 fixture."""
    d = OUT / "llama3"
    exp = json.loads((d / "expected.json").read_text(encoding="utf-8"))
    scaled = load_model(d)
    config = copy.deepcopy(scaled.config)
    config.rope_parameters = {"rope_type": "default", "rope_theta": config.rope_parameters["rope_theta"]}
    plain = LlamaForCausalLM(config).eval()
    plain.load_state_dict(scaled.state_dict())
    diff = 0.0
    for p in exp["prompts"]:
        a = forward_logits(plain, p["ids"])
        diff = max(diff, float((a - torch.tensor(p["logits"])).abs().max()))
    return diff


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--verify", action="store_true", help="only verify existing fixtures")
    ap.add_argument("--only", nargs="*", default=None, help="subset of fixture names")
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    names = args.only or list(FIXTURES)

    if not args.verify:
        raw_tok = train_tokenizer()
        print(f"tokenizer: {raw_tok.get_vocab_size()} tokens")
        for name in names:
            make_fixture(name, FIXTURES[name], raw_tok)

    print()
    print(f"{'name':8} {'params':>7} {'vocab':>5} {'tok':>4} {'dtype':14} {'max|err|':>9}  files")
    total = 0
    for name in names:
        s = verify(name, FIXTURES[name])
        total += sum(s["sizes"].values())
        files = ", ".join(f"{k} {v / 1024:.1f}K" for k, v in s["sizes"].items())
        print(f"{name:8} {s['params']:>7} {s['vocab']:>5} {s['tok_vocab']:>4} {','.join(s['dtypes']):14} "
              f"{s['max_err']:9.2e}  {files}")
    if "llama3" in names:
        print(f"llama3: max |logit diff| scaled vs unscaled rope = {llama3_scaling_matters():.4f}")
    print(f"total size of written fixtures: {total / 1024:.1f} KiB")
    digest = hashlib.sha256(
        json.dumps({n: file_digest(OUT / n) for n in names}, sort_keys=True).encode()
    ).hexdigest()
    print(f"fixture digest: {digest}")


if __name__ == "__main__":
    main()
