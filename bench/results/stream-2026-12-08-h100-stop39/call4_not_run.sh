#!/usr/bin/env bash
# Device call 4 (stop 39; NOT RUN: the device lent no machine for the rest of the session's time):
# memkind_probe.py, the host memory's kind and the copy pattern under GEMMs + HBM load. ~1 min.
set -u
export LD_LIBRARY_PATH=/usr/local/cuda/lib64
nvidia-smi --query-gpu=name,pci.bus_id --format=csv,noheader
timeout 150 python3 bench/results/stream-2026-12-08-h100-stop39/memkind_probe.py 2>&1 | grep -v -i warn
