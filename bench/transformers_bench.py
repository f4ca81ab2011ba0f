"""Time transformers (bf16, eager attention, the whole model on one GPU) on a checkpoint
directory, the same measurements `ferry bench-cuda` makes: one prompt pass of N tokens
(full logits, as a plain forward returns them, and last position only), and greedy decoding of
one token a pass at a context. Medians of --runs after one warm-up. Also writes the last
position's logits of a fixed prompt (--reference FILE) so that ferry can be checked against
transformers on the same weights.

    python3 bench/transformers_bench.py /tmp/qwen2.5-7b --reference /tmp/ref.json
"""

import argparse
import datetime
import json
import statistics
import time

import torch
from transformers import AutoModelForCausalLM


def timed(fn, runs):
    fn()  # warm-up
    out = []
    for _ in range(runs):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return statistics.median(out), out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prompt-tokens", type=int, default=4096)
    ap.add_argument("--past", "--context", dest="context", type=int, default=1024,
                    help="positions in the KV cache when decoding is timed (ferry bench-cuda --past)")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--reference", help="write last-position logits of a fixed prompt here")
    a = ap.parse_args()

    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        a.model, dtype=torch.bfloat16, attn_implementation="eager", device_map="cuda"
    ).eval()
    load_s = time.perf_counter() - t
    vocab = model.config.vocab_size
    g = torch.Generator(device="cuda").manual_seed(0)
    result = {
        "card": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "model": a.model,
        "load_seconds": load_s,
    }
    with torch.inference_mode():
        if a.reference:
            ref_ids = torch.randint(0, vocab, (1, 64), device="cuda", generator=g)
            ref_logits = model(ref_ids, use_cache=False).logits[0, -1].float().cpu()

        ids = torch.randint(0, vocab, (1, a.prompt_tokens), device="cuda", generator=g)
        med, all_ = timed(lambda: model(ids, use_cache=False), a.runs)
        result["prompt_tokens"] = a.prompt_tokens
        result["prompt_seconds_median_full_logits"] = med
        result["prompt_seconds_all_full_logits"] = all_
        med, all_ = timed(lambda: model(ids, use_cache=False, logits_to_keep=1), a.runs)
        result["prompt_seconds_median_last_logits"] = med
        result["prompt_seconds_all_last_logits"] = all_
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated()

        ctx = torch.randint(0, vocab, (1, a.context), device="cuda", generator=g)

        def decode():
            out = model(ctx, use_cache=True, logits_to_keep=1)
            pkv, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(a.decode_tokens):
                out = model(nxt, past_key_values=pkv, use_cache=True)
                pkv, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            nxt.item()
            return (time.perf_counter() - t) / a.decode_tokens

        decode()
        per_token = sorted(decode() for _ in range(a.runs))
        result["decode_context"] = a.context
        result["decode_seconds_per_token_median"] = statistics.median(per_token)
        result["decode_tokens_per_second"] = 1 / statistics.median(per_token)

        if a.reference:
            # The same weights widened to f32: how far bf16 itself moves the logits.
            model.float()
            f32_logits = model(ref_ids, use_cache=False).logits[0, -1].cpu()
            with open(a.reference, "w") as f:
                json.dump(
                    {
                        "model": a.model,
                        "ids": ref_ids[0].tolist(),
                        "logits": ref_logits.tolist(),
                        "logits_f32": f32_logits.tolist(),
                    },
                    f,
                )

    print(
        f"transformers {result['transformers']} eager bf16 on {result['card']}: "
        f"prompt {a.prompt_tokens} tokens {result['prompt_seconds_median_full_logits']:.4f} s "
        f"(last logits only {result['prompt_seconds_median_last_logits']:.4f} s); "
        f"decode at {a.context}: {result['decode_tokens_per_second']:.1f} tok/s"
    )
    print("JSON: " + json.dumps(result))


if __name__ == "__main__":
    main()
