#!/usr/bin/env bash
# Device call 1 (stop 39), binaries of branch stop39-measure (main + c594c82's FERRY_EARLY_COPIES
# and FERRY_SKIP_DECODE + e02f10a's packing, on by default here; FERRY_PACK=0 is main's copy a
# tensor). 1. streamed = resident bit for bit with early copies, copy a tensor and packed (stream
# and Z-Image GPU tests); 2. the DiT at 3 GiB compressed, two rounds: main's path, early copies,
# packed, packed + early, and without decode kernels (wrong outputs; copies' rate alone);
# 3. scripts/gpu_checks.sh (SKIP_DIT, SKIP_7B) under packed + early copies; 4. working_set_probe.
set -u
export LD_LIBRARY_PATH=/usr/local/cuda/lib64
T0=$SECONDS
L=$OUT/logs; mkdir -p $L
P=bench/results/stream-2026-12-07-h100-stop38
nvidia-smi --query-gpu=name,pci.bus_id --format=csv,noheader | tee $L/device.txt
source bench/device_lib.sh
dit=(timeout 45 .gpu/ferry bench --synthetic z-image-turbo --device cuda --batch 1 --runs 5 --json --vram 3GiB --compress on)
b=$(cat .gpu/built_in); [ -d "$b/tests/fixtures" ] || { mkdir -p "$(dirname "$b")"; ln -sfn "$PWD" "$b"; }
for pack in 0 1; do
  FERRY_PACK=$pack FERRY_EARLY_COPIES=1 timeout 60 .gpu/cuda-stream-tests > $L/early_pack${pack}_stream_tests.log 2>&1; echo "pack $pack stream: $(grep -E 'test result|FAILED|panicked' $L/early_pack${pack}_stream_tests.log | tail -2)"
  FERRY_PACK=$pack FERRY_EARLY_COPIES=1 timeout 60 .gpu/cuda-z-image-tests --test-threads 1 > $L/early_pack${pack}_z_tests.log 2>&1; echo "pack $pack z-image: $(grep -E 'test result|FAILED|panicked' $L/early_pack${pack}_z_tests.log | tail -2)"
done
echo "elapsed $((SECONDS - T0)) s"
FERRY_PACK=1 FERRY_EARLY_COPIES=1 "${dit[@]}" --timeline $L/dit_packearly.svg > $L/dit_packearly_t.json 2> $L/dit_packearly_t.log
FERRY_PACK=0 FERRY_SKIP_DECODE=1 "${dit[@]}" --timeline $L/dit_skip.svg > $L/dit_skip_t.json 2> $L/dit_skip_t.log
echo "elapsed $((SECONDS - T0)) s"
for i in 1 2; do
  FERRY_PACK=0 "${dit[@]}" > $L/dit_main_$i.json 2> $L/dit_main_$i.log
  FERRY_PACK=0 FERRY_EARLY_COPIES=1 "${dit[@]}" > $L/dit_early_$i.json 2> $L/dit_early_$i.log
  FERRY_PACK=1 "${dit[@]}" > $L/dit_pack_$i.json 2> $L/dit_pack_$i.log
  FERRY_PACK=1 FERRY_EARLY_COPIES=1 "${dit[@]}" > $L/dit_packearly_$i.json 2> $L/dit_packearly_$i.log
  echo "round $i elapsed $((SECONDS - T0)) s"
done
FERRY_PACK=1 FERRY_SKIP_DECODE=1 "${dit[@]}" > $L/dit_skippack_1.json 2> $L/dit_skippack_1.log
summary $L/dit_main_*.json $L/dit_early_*.json $L/dit_pack_*.json $L/dit_packearly_*.json $L/dit_skip_t.json $L/dit_skippack_1.json $L/dit_packearly_t.json | tee $L/summary.txt
block_copies $L/dit_packearly.svg | tee -a $L/summary.txt
block_copies $L/dit_skip.svg | tee -a $L/summary.txt
tar czf $OUT/logs.tgz -C $OUT logs
echo "elapsed $((SECONDS - T0)) s"
if [ $((SECONDS - T0)) -lt 330 ]; then
  FERRY_EARLY_COPIES=1 SKIP_DIT=1 SKIP_7B=1 timeout 170 bash scripts/gpu_checks.sh $L/checks > $L/gpu_checks.log 2>&1; echo "gpu_checks (packed + early) rc $?"; tail -4 $L/gpu_checks.log
  tar czf $OUT/logs.tgz -C $OUT logs
fi
echo "elapsed $((SECONDS - T0)) s"
if [ $((SECONDS - T0)) -lt 480 ]; then
  timeout 90 python3 $P/working_set_probe.py 2>&1 | grep -v -i warn | tee $L/working_set_probe.log | tail -12
fi
tar czf $OUT/logs.tgz -C $OUT logs
rm -rf $L
cat $OUT/logs.tgz > /dev/null; echo "elapsed $((SECONDS - T0)) s"
