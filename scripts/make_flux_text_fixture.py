#!/usr/bin/env python3
"""Build Flux.1's two text encoders as tiny random-weight models (and small tokenizers) in the
diffusers FluxPipeline layout, and record transformers' outputs for them.

Rerun (from the repository root, with the packages in scripts/requirements.txt):

    OMP_NUM_THREADS=1 python3 scripts/make_flux_text_fixture.py            # (re)write
    OMP_NUM_THREADS=1 python3 scripts/make_flux_text_fixture.py --verify   # re-check

No network access; weights come from fixed seeds (CPU, one thread), f32. The tokenizers are
trained here on a small corpus: a CLIP byte-level BPE with the `</w>` suffix (vocab.json +
merges.txt, no tokenizer.json, as black-forest-labs/FLUX.1-dev ships tokenizer/) and a T5
Unigram with Metaspace (tokenizer.json, as FLUX.1-dev ships tokenizer_2/).

Directory tests/fixtures/flux-text/:

    text_encoder/{config.json,model.safetensors}     CLIPTextModel: hidden 32, 2 layers, 2 heads,
                            intermediate 48, max_position 77, quick_gelu, eos_token_id 2 (legacy,
                            as Flux.1-dev's config), vocab = the CLIP tokenizer's
    text_encoder_2/{config.json,model.safetensors}   T5EncoderModel: d_model 32, 2 layers, 4 heads
                            of d_kv 8, d_ff 48, gated-gelu, 32 buckets, max distance 128
    tokenizer/{vocab.json,merges.txt,tokenizer_config.json,special_tokens_map.json}   CLIPTokenizer
                            (pad <|endoftext|>, model_max_length 77)
    tokenizer-fast/{tokenizer.json,tokenizer_config.json}   the same CLIP tokenizer as transformers 5
                            saves it (with a tokenizer.json), for the path that reads one
    tokenizer_2/{tokenizer.json,tokenizer_config.json,special_tokens_map.json}   T5TokenizerFast
                            (<pad> 0, </s> 1, <unk> 2)
    reference.safetensors   the tensors below, f32 (ids i64)
    expected.json           versions, prompts, token ids of every tokenizer case

Token cases (expected.json "clip" and "t5"): the pipeline's tokenizer calls,
padding="max_length", truncation=True (CLIP max_length 77; T5 at the max_length given).
transformers 5 rebuilds a T5 tokenizer.json (models/t5/tokenization_t5.py): its Unigram
vocabulary, only a Precompiled normalizer (none here: the NFKC of this file is dropped),
WhitespaceSplit + Metaspace, "$A </s>".

Model cases (reference.safetensors):
    t5.buckets            i64 [1023]  T5's bucket of relative positions -511..511 for 32 buckets,
                          max distance 128 (Flux.1-dev's config)
    t5.{i}.ids            i64 [L]     prompt i's ids (t5 case 0 at 512, case 1 at 16: truncated)
    t5.{i}.embeds         f32 [L, 32] the token embedding
    t5.{i}.block0         f32 [L, 32] block 0's output
    t5.{i}.hidden         f32 [L, 32] last_hidden_state
    t5.{i}.hidden_bf16    f32 [L, 32] the same model run in bf16 (for GPU tolerances)
    clip.{i}.ids          i64 [77]
    clip.{i}.embeds, clip.{i}.layer0   f32 [77, 32]
    clip.{i}.hidden       f32 [77, 32] last_hidden_state
    clip.{i}.pooled       f32 [32]     pooler_output
    clip.{i}.pooled_bf16  f32 [32]     the same model run in bf16
"""

import argparse
import collections
import json
import os
import re
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import tokenizers  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests/fixtures/flux-text"

CORPUS = """
a photo of a cat sitting on a red chair in the garden
a painting of a dog running through a field of flowers at sunset
the quick brown fox jumps over the lazy dog
an astronaut riding a horse on the moon, digital art, highly detailed
a bowl of fruit on a wooden table, still life, oil painting
portrait of a woman with blue eyes and long hair, soft light
a city street at night with neon signs and rain
mountains and a lake under a starry sky
it's a sunny day and we're going to the beach, aren't we?
there are 3 apples and 12 oranges in the basket
a little house in the forest, watercolor
photograph of a vintage car parked beside the road
""".strip().splitlines()

# Tokenizer cases: unicode, apostrophes, numbers, spaces, punctuation, long prompts that
# truncate, the empty prompt.
PROMPTS = [
    "a photo of a cat",
    "",
    "A Photo   of a CAT!!",
    "it's the dog's toy, isn't it? we'll see",
    "there are 3 apples and 1234 oranges",
    "café naïve résumé — “quoted” ‘text’",
    "日本語のテキスト and emoji 🐱🚀",
    "tabs\tand\nnewlines  and   spaces ",
    "<|startoftext|>special<|endoftext|> tokens",
    "x" * 300,
    " ".join(CORPUS),
    # NFKC would change these; transformers 5's T5Tokenizer keeps only a Precompiled normalizer.
    "ﬁne ＡＢＣ ① ½ café",
    "a painting of a dog running through a field of flowers at sunset " * 8,
]
T5_MAX_LENGTHS = [512, 77, 16]


def bytes_to_unicode():
    """GPT-2's byte alphabet: printable Latin-1 bytes stand for themselves, the others get
    U+0100 on, in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clip_bpe(corpus, merges_wanted=300):
    """A CLIP vocabulary: the 256 byte symbols, the same with </w>, merges learnt from `corpus`
    (lower-cased, split by CLIP's regex), <|startoftext|>, <|endoftext|> (the largest id)."""
    b2u = bytes_to_unicode()
    alphabet = list(b2u.values())
    pat = re.compile(
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+""",
        re.IGNORECASE,
    )
    words = collections.Counter()
    for line in corpus:
        for w in pat.findall(line.lower()):
            sym = "".join(b2u[b] for b in w.encode("utf-8"))
            words[tuple(sym[:-1]) + (sym[-1] + "</w>",)] += 1
    merges = []
    for _ in range(merges_wanted):
        pairs = collections.Counter()
        for w, n in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] += n
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        merged = collections.Counter()
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    vocab = alphabet + [a + "</w>" for a in alphabet]
    for a, b in merges:
        vocab.append(a + b)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(vocab)}, merges


def write_clip_tokenizer(d):
    d.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_bpe(CORPUS)
    (d / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (d / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    sot, eot = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    special = lambda c: {  # noqa: E731
        "content": c, "lstrip": False, "normalized": True, "rstrip": False,
        "single_word": False, "special": True,
    }
    # As FLUX.1-dev's tokenizer/tokenizer_config.json (transformers 4 wrote it).
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(sot): special("<|startoftext|>"), str(eot): special("<|endoftext|>")},
        "bos_token": "<|startoftext|>",
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": "<|endoftext|>",
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": "<|endoftext|>",
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": "<|endoftext|>",
    }
    (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    tok = lambda c: {"content": c, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}  # noqa: E731
    (d / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": tok("<|startoftext|>"), "eos_token": tok("<|endoftext|>"),
        "pad_token": "<|endoftext|>", "unk_token": tok("<|endoftext|>"),
    }, indent=2) + "\n")
    return len(vocab)


def write_t5_tokenizer(d):
    """A Unigram trained on the corpus, with T5's pipeline: Metaspace (prepend always), "$A </s>"."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    d.mkdir(parents=True, exist_ok=True)
    tk = Tokenizer(models.Unigram())
    tk.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(tokenizers.Regex(" {2,}"), " ")])
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
    ])
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.UnigramTrainer(
        vocab_size=200, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
        initial_alphabet=list("abcdefghijklmnopqrstuvwxyz0123456789'.,!?"), show_progress=False,
    )
    tk.train_from_iterator(CORPUS, trainer=trainer)
    tk.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    assert [tk.token_to_id(t) for t in ["<pad>", "</s>", "<unk>"]] == [0, 1, 2]
    tk.save(str(d / "tokenizer.json"))
    config = {
        "add_prefix_space": True, "clean_up_tokenization_spaces": True, "eos_token": "</s>",
        "extra_ids": 0, "legacy": True, "model_max_length": 512, "pad_token": "<pad>",
        "tokenizer_class": "T5Tokenizer", "unk_token": "<unk>",
    }
    (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (d / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}, indent=2) + "\n")
    return tk.get_vocab_size()


def write_models(out, clip_vocab, t5_vocab):
    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=clip_vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
        layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, pad_token_id=1, projection_dim=32,
    )).eval()
    # Larger than init's: every part of the model matters to the output.
    with torch.no_grad():
        for n, p in clip.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.2 * torch.randn_like(p)) if n.endswith("weight") else p.copy_(0.1 * torch.randn_like(p))
            elif "embedding" in n:
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5 if p.dim() == 2 else 0.1 * torch.randn_like(p))
    clip.save_pretrained(out / "text_encoder", safe_serialization=True)
    # transformers 5 saves CLIPTextModel's tensors without the "text_model." prefix that
    # transformers 4 wrote and FLUX.1-dev's text_encoder/ has; write them as FLUX.1-dev has them
    # (transformers 5 loads both).
    f = out / "text_encoder" / "model.safetensors"
    save_file({f"text_model.{k}": v for k, v in load_file(str(f)).items()}, str(f), metadata={"format": "pt"})
    torch.manual_seed(1)
    t5 = T5EncoderModel(T5Config(
        vocab_size=t5_vocab, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0,
        is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False,
    )).eval()
    with torch.no_grad():
        for n, p in t5.named_parameters():
            if "layer_norm" in n:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "relative_attention_bias" in n:
                p.copy_(torch.randn_like(p))
            elif n in ("shared.weight", "encoder.embed_tokens.weight"):
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    t5.save_pretrained(out / "text_encoder_2", safe_serialization=True)


def tokenizer_cases(out):
    clip = CLIPTokenizer.from_pretrained(out / "tokenizer")
    t5 = T5TokenizerFast.from_pretrained(out / "tokenizer_2")
    cases = {"clip": [], "t5": []}
    for p in PROMPTS:
        ids = clip(p, padding="max_length", max_length=77, truncation=True)["input_ids"]
        cases["clip"].append({"prompt": p, "ids": ids})
        for m in T5_MAX_LENGTHS:
            ids = t5(p, padding="max_length", max_length=m, truncation=True, add_special_tokens=True)["input_ids"]
            cases["t5"].append({"prompt": p, "max_length": m, "ids": ids})
    return cases


def references(out, cases):
    refs = {}
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(-511, 512)
    refs["t5.buckets"] = T5Attention._relative_position_bucket(rel, bidirectional=True, num_buckets=32, max_distance=128)
    t5, info = T5EncoderModel.from_pretrained(out / "text_encoder_2", torch_dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    t5.eval()
    t5_bf16 = T5EncoderModel.from_pretrained(out / "text_encoder_2", torch_dtype=torch.bfloat16).eval()
    t5_ids = [cases["t5"][0]["ids"], [c for c in cases["t5"] if c["max_length"] == 16][-1]["ids"]]
    assert len(t5_ids[0]) == 512 and len(t5_ids[1]) == 16
    with torch.no_grad():
        for i, ids in enumerate(t5_ids):
            x = torch.tensor([ids])
            stages = {}
            h1 = t5.encoder.embed_tokens.register_forward_hook(lambda m, a, o: stages.__setitem__("embeds", o[0]))
            h2 = t5.encoder.block[0].register_forward_hook(lambda m, a, o: stages.__setitem__("block0", o[0][0]))
            hidden = t5(x).last_hidden_state[0]
            h1.remove()
            h2.remove()
            refs[f"t5.{i}.ids"] = x[0]
            refs[f"t5.{i}.embeds"] = stages["embeds"]
            refs[f"t5.{i}.block0"] = stages["block0"]
            refs[f"t5.{i}.hidden"] = hidden
            refs[f"t5.{i}.hidden_bf16"] = t5_bf16(x).last_hidden_state[0].float()
    clip, info = CLIPTextModel.from_pretrained(out / "text_encoder", torch_dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    clip.eval()
    clip_bf16 = CLIPTextModel.from_pretrained(out / "text_encoder", torch_dtype=torch.bfloat16).eval()
    with torch.no_grad():
        for i, c in enumerate([cases["clip"][0], cases["clip"][10]]):
            x = torch.tensor([c["ids"]])
            stages = {}
            h1 = clip.embeddings.register_forward_hook(lambda m, a, o: stages.__setitem__("embeds", o[0]))
            h2 = clip.encoder.layers[0].register_forward_hook(
                lambda m, a, o: stages.__setitem__("layer0", (o[0] if isinstance(o, tuple) else o)[0]))
            o = clip(x)
            h1.remove()
            h2.remove()
            refs[f"clip.{i}.ids"] = x[0]
            refs[f"clip.{i}.embeds"] = stages["embeds"]
            refs[f"clip.{i}.layer0"] = stages["layer0"]
            refs[f"clip.{i}.hidden"] = o.last_hidden_state[0]
            refs[f"clip.{i}.pooled"] = o.pooler_output[0]
            refs[f"clip.{i}.pooled_bf16"] = clip_bf16(x).pooler_output[0].float()
    return {k: v.contiguous() for k, v in refs.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--verify", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.verify:
        cases = tokenizer_cases(OUT)
        want = json.loads((OUT / "expected.json").read_text())
        assert cases["clip"] == want["clip"] and cases["t5"] == want["t5"], "token ids differ"
        got, ref = references(OUT, cases), load_file(str(OUT / "reference.safetensors"))
        for k, v in ref.items():
            d = (got[k].double() - v.double()).abs().max().item()
            assert d <= 1e-5 * max(1.0, v.double().abs().max().item()), f"{k}: {d}"
        print("fixture verified")
        return
    clip_vocab = write_clip_tokenizer(OUT / "tokenizer")
    t5_vocab = write_t5_tokenizer(OUT / "tokenizer_2")
    write_models(OUT, clip_vocab, t5_vocab)
    CLIPTokenizer.from_pretrained(OUT / "tokenizer").save_pretrained(OUT / "tokenizer-fast")
    cases = tokenizer_cases(OUT)
    save_file(references(OUT, cases), str(OUT / "reference.safetensors"))
    (OUT / "expected.json").write_text(json.dumps({
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
        "prompts": PROMPTS, "t5_max_lengths": T5_MAX_LENGTHS, **cases,
    }, ensure_ascii=False, indent=1) + "\n")
    size = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"wrote {OUT} ({size} bytes)")


if __name__ == "__main__":
    sys.exit(main())
