#!/usr/bin/env bash
# Device call 4 (stop 39; NOT RUN: the device lent no machine for the rest of the session's time).
# For the next session:
#   git revert 447ffed     # brings back 81d9257: FERRY_ENCODINGS_PINNED=1 (measuring, off by default)
#   scripts/gpu_checks.sh --build; run with carry [".gpu"] (the whole .gpu fits: ~48 MB + the tree).
# What it measures: 1. memkind_probe.py: under GEMMs + HBM traffic (the card at its power cap, as
# in a coded pass), one copy or 15 a piece from cudaHostAlloc, registered anonymous 4 KiB pages or
# a registered file mapping (ferry's uncompressed pass reads the file's pages at 54.7 GB/s, its
# coded pass its anonymous encoding mappings at 51.4-52.4); 2. streamed = resident bit for bit
# with the encodings in cuMemHostAlloc'd memory (stream and Z-Image GPU tests); 3. the DiT at
# 3 GiB compressed, main against FERRY_ENCODINGS_PINNED=1, three runs each, interleaved.
# About 3 minutes.
set -u
export LD_LIBRARY_PATH=/usr/local/cuda/lib64
T0=$SECONDS
L=$OUT/logs; mkdir -p $L
D=bench/results/stream-2026-12-08-h100-stop39
nvidia-smi --query-gpu=name,pci.bus_id --format=csv,noheader | tee $L/device.txt
source bench/device_lib.sh
timeout 150 python3 $D/memkind_probe.py 2>&1 | grep -v -i warn | tee $L/memkind_probe.log
tar czf $OUT/logs.tgz -C $OUT logs
echo "elapsed $((SECONDS - T0)) s"
link_fixtures
export FERRY_BIN=.gpu/ferry
FERRY_ENCODINGS_PINNED=1 timeout 90 .gpu/cuda-stream-tests --test-threads 1 > $L/pinned_stream_tests.log 2>&1; echo "stream: $(grep -E 'test result' $L/pinned_stream_tests.log | tail -1)"
FERRY_ENCODINGS_PINNED=1 timeout 120 .gpu/cuda-z-image-tests --test-threads 1 > $L/pinned_z_tests.log 2>&1; echo "z-image: $(grep -E 'test result' $L/pinned_z_tests.log | tail -1)"
dit=(timeout 60 .gpu/ferry bench --synthetic z-image-turbo --device cuda --batch 1 --runs 5 --json --vram 3GiB --compress on)
for i in 1 2 3; do
  "${dit[@]}" > $L/dit_main_$i.json 2> $L/dit_main_$i.log
  FERRY_ENCODINGS_PINNED=1 "${dit[@]}" > $L/dit_pinned_$i.json 2> $L/dit_pinned_$i.log
done
summary $L/dit_main_*.json $L/dit_pinned_*.json | tee $L/summary.txt
tar czf $OUT/logs.tgz -C $OUT logs
rm -rf $L
echo "elapsed $((SECONDS - T0)) s"
