#!/usr/bin/env bash
# Device call 3 (stop 38; NOT RUN: the session's device time ran out). Superseded: stop 39 ran it,
# with packing added and FERRY_BIN set for the Z-Image tests, as
# bench/results/stream-2026-12-08-h100-stop39/call1.sh. As written for the next session:
#   git revert 173a66c     # brings back c594c82: FERRY_EARLY_COPIES=1 and FERRY_SKIP_DECODE=1
#   scripts/gpu_checks.sh --build; move .gpu/ binaries other than ferry, cuda-stream-tests and
#   cuda-z-image-tests aside (the tree and carry must stay under 64 MiB); run with carry [".gpu"].
# What it measures: 1. streamed = resident bit for bit with early copies (the stream and Z-Image
# GPU tests under FERRY_EARLY_COPIES=1); 2. the DiT at 3 GiB compressed: as on main, with early
# copies (stop 34/35 measured them only before the RoPE tables were kept, when refiner 1's table
# upload waited behind the weight copies), without decode kernels (FERRY_SKIP_DECODE=1, wrong
# outputs, copies' rate without decodings beside them), uncompressed; 3. working_set_probe.py:
# the host working set's size (1 GB against 7.27 GB) against the copies' rate beside compute.
set -u
export LD_LIBRARY_PATH=/usr/local/cuda/lib64
T0=$SECONDS
L=$OUT/logs; mkdir -p $L
P=bench/results/stream-2026-12-07-h100-stop38
nvidia-smi --query-gpu=name,pci.bus_id --format=csv,noheader | tee $L/device.txt
source bench/device_lib.sh
dit=(timeout 45 .gpu/ferry bench --synthetic z-image-turbo --device cuda --batch 1 --runs 5 --json --vram 3GiB)
b=$(cat .gpu/built_in); [ -d "$b/tests/fixtures" ] || { mkdir -p "$(dirname "$b")"; ln -sfn "$PWD" "$b"; }
FERRY_EARLY_COPIES=1 timeout 60 .gpu/cuda-stream-tests > $L/early_stream_tests.log 2>&1; grep -E "test result|FAILED|panicked" $L/early_stream_tests.log | tail -3
FERRY_EARLY_COPIES=1 timeout 60 .gpu/cuda-z-image-tests --test-threads 1 > $L/early_z_image_tests.log 2>&1; grep -E "test result|FAILED|panicked" $L/early_z_image_tests.log | tail -3
"${dit[@]}" --compress on > $L/dit_on_1.json 2> $L/dit_on_1.log
FERRY_EARLY_COPIES=1 "${dit[@]}" --compress on --timeline $L/dit_early.svg > $L/dit_early_1.json 2> $L/dit_early_1.log
FERRY_SKIP_DECODE=1 "${dit[@]}" --compress on --timeline $L/dit_skip.svg > $L/dit_skip_1.json 2> $L/dit_skip_1.log
"${dit[@]}" --compress off > $L/dit_off_1.json 2> $L/dit_off_1.log
summary $L/dit_on_1.json $L/dit_early_1.json $L/dit_skip_1.json $L/dit_off_1.json
tar czf $OUT/logs.tgz -C $OUT logs
echo "elapsed $((SECONDS - T0)) s"
timeout 100 python3 $P/working_set_probe.py 2>&1 | grep -v -i warn | tee $L/working_set_probe.log
tar czf $OUT/logs.tgz -C $OUT logs
"${dit[@]}" --compress on > $L/dit_on_2.json 2> $L/dit_on_2.log
FERRY_SKIP_DECODE=1 "${dit[@]}" --compress on > $L/dit_skip_2.json 2> $L/dit_skip_2.log
FERRY_EARLY_COPIES=1 "${dit[@]}" --compress on > $L/dit_early_2.json 2> $L/dit_early_2.log
summary $L/dit_on_*.json $L/dit_early_*.json $L/dit_skip_*.json $L/dit_off_1.json
block_copies $L/dit_skip.svg
block_copies $L/dit_early.svg
tar czf $OUT/logs.tgz -C $OUT logs
rm -rf $L
echo "elapsed $((SECONDS - T0)) s"
