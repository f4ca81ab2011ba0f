#!/usr/bin/env python3
"""N concurrent streaming clients against a running `ferry serve`: aggregate decode tok/s,
time to first token and inter-token latency percentiles (p50/p90/p99), as a table and JSON.

Standard library only (threads and http.client reading server-sent events), so that it runs
on the GPU machine as it is.

The H200 run (7B shape streamed through 2.6 GiB, 64 clients), and ferry's own batch bench
to compare it with:

    ferry synth --preset qwen2.5-7b --out /tmp/qwen2.5-7b-synth
    ferry synth --list                       # the presets
    ferry serve --model /tmp/qwen2.5-7b-synth --device cuda --vram 2.6GiB --max-batch 64 \\
        --context 256 --prompt-chunk 128 --port 8080 &
    python3 bench/serve_bench.py --url http://127.0.0.1:8080 --clients 64 \\
        --prompt-tokens 16 --max-tokens 128 --card H200 --json serve_h200.json
    kill %1                                  # SIGTERM: the server ends with status 0
    ferry bench --model /tmp/qwen2.5-7b-synth --device cuda --vram 2.6GiB \\
        --prompt-tokens 128 --batch 1,64 --decode-tokens 128

With --vram the server plans for --max-batch sequences of --context positions each (the KV
caches) and passes taking in --prompt-chunk prompt tokens, so keep --context small for the
benchmark (256 holds 16 words of prompt, which the synthetic tokenizer may split into many
tokens, plus 128 generated). The issue's target: decode tok/s ≥ 0.85 × 64 / (seconds of one
streamed pass), where `ferry bench --batch 64` gives the pass time (its decode tok/s at batch
64 is 64 / pass time).

A synthetic checkpoint has no tokenizer text worth reading, so prompts are sent to
/v1/completions as words; every client asks for exactly --max-tokens (the server cannot stop
early on random weights unless an EOS id comes up: the usage counts are reported as sent).
On the CPU, e.g. SmolLM2: ferry serve --model SmolLM2-135M-Instruct.Q4_1.gguf --device cpu
and --clients 8 --model-id SmolLM2-135M-Instruct.Q4_1.
"""

import argparse
import datetime
import http.client
import json
import threading
import time
import urllib.parse


def percentile(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def model_id(url):
    u = urllib.parse.urlparse(url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    c.request("GET", "/v1/models")
    return json.loads(c.getresponse().read())["data"][0]["id"]


def client(url, model, prompt, max_tokens, out):
    """One streamed completion: when it started, each piece's arrival time, the usage."""
    u = urllib.parse.urlparse(url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=3600)
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens,
                       "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    start = time.perf_counter()
    c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        out.update(error=f"HTTP {r.status}: {r.read()[:200]!r}")
        return
    times, usage = [], None
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            break
        event = json.loads(data)
        if event.get("usage"):
            usage = event["usage"]
        for choice in event.get("choices", []):
            if choice.get("text"):
                times.append(time.perf_counter())
    out.update(start=start, times=times, usage=usage, end=time.perf_counter())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=128,
                    help="about this many tokens of prompt (words)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--model-id", help="default: the first of /v1/models")
    ap.add_argument("--card", default="unknown", help="a label for the GPU (H200, ...)")
    ap.add_argument("--json", help="also write the JSON to this file")
    a = ap.parse_args()
    model = a.model_id or model_id(a.url)
    words = ["the", "river", "carries", "weights", "across", "the", "bridge", "every", "night"]
    results = [dict() for _ in range(a.clients)]
    threads = []
    for i in range(a.clients):
        prompt = " ".join(words[(i + k) % len(words)] for k in range(a.prompt_tokens))
        t = threading.Thread(target=client, args=(a.url, model, prompt, a.max_tokens, results[i]))
        threads.append(t)
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    failed = [r["error"] for r in results if "error" in r]
    ok = [r for r in results if "error" not in r and r["times"]]
    ttft = [r["times"][0] - r["start"] for r in ok]
    itl = [b - a for r in ok for a, b in zip(r["times"], r["times"][1:])]
    counts = [(r["usage"] or {}).get("completion_tokens", len(r["times"])) for r in ok]
    tokens = sum(counts)
    # Decode: tokens after each client's first (by the usage counts: a text event may carry
    # several tokens, or wait for a character's last byte), over the time from the first
    # first token to the last token.
    if ok:
        first = min(r["times"][0] for r in ok)
        last = max(r["times"][-1] for r in ok)
        decode_tok_s = sum(n - 1 for n in counts) / max(last - first, 1e-9)
    else:
        decode_tok_s = 0.0
    report = {
        "date": datetime.date.today().isoformat(), "card": a.card, "url": a.url, "model": model,
        "clients": a.clients, "prompt_words": a.prompt_tokens, "max_tokens": a.max_tokens,
        "completed": len(ok), "failed": len(failed), "errors": failed[:3],
        "wall_s": wall, "tokens": tokens, "aggregate_tok_s": tokens / wall,
        "decode_tok_s": decode_tok_s,
        "ttft_s": {p: percentile(ttft, int(p[1:])) for p in ("p50", "p90", "p99")},
        "itl_s": {p: percentile(itl, int(p[1:])) for p in ("p50", "p90", "p99")},
    }
    print(f"ferry serve bench, {report['date']}, card {a.card}, {model}")
    print(f"{a.clients} clients, ~{a.prompt_tokens} prompt words, {a.max_tokens} tokens each: "
          f"{len(ok)} completed, {len(failed)} failed, {wall:.2f} s")
    print(f"{'':24}{'p50':>10}{'p90':>10}{'p99':>10}")
    for name, key in (("time to first token, s", "ttft_s"), ("between text events, s", "itl_s")):
        v = report[key]
        print(f"{name:24}{v['p50']:>10.4f}{v['p90']:>10.4f}{v['p99']:>10.4f}")
    print(f"aggregate: {report['aggregate_tok_s']:.1f} tok/s (wall); "
          f"decode: {decode_tok_s:.1f} tok/s")
    text = json.dumps(report)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
