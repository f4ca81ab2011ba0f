#!/usr/bin/env bash
# Device call 2 (stop 39): main's own binaries (code of fdae13b). Every GPU check (SKIP_DIT,
# SKIP_7B), then the goal's row of the Z-Image DiT at 3 GiB on this card: compressed (three
# runs), uncompressed, whole on the GPU (the goal's compute figure).
set -u
export LD_LIBRARY_PATH=/usr/local/cuda/lib64
T0=$SECONDS
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=name,memory.total,driver_version,pci.bus_id --format=csv,noheader | tee $L/device.txt
source bench/device_lib.sh
SKIP_DIT=1 SKIP_7B=1 timeout 200 bash scripts/gpu_checks.sh $L/checks > $L/gpu_checks.log 2>&1; echo "gpu_checks rc $?"
grep -E "test result|FAILED|panicked|gpu_checks:" $L/gpu_checks.log | tail -14
tar czf $OUT/logs.tgz -C $OUT logs
echo "elapsed $((SECONDS - T0)) s"
dit=(timeout 60 .gpu/ferry bench --synthetic z-image-turbo --device cuda --batch 1 --runs 5 --json)
for i in 1 2 3; do "${dit[@]}" --vram 3GiB --compress on > $L/dit_on_$i.json 2> $L/dit_on_$i.log; done
"${dit[@]}" --vram 3GiB --compress off > $L/dit_off_1.json 2> $L/dit_off_1.log
"${dit[@]}" --vram 40GiB > $L/dit_resident.json 2> $L/dit_resident.log
summary $L/dit_on_*.json $L/dit_off_1.json | tee $L/summary.txt
python3 -c "import json;r=json.load(open('$L/dit_resident.json'))['results'][0];print('resident step %.4f'%r['step_s'])" | tee -a $L/summary.txt
grep -h "prediction" $L/dit_on_1.log | cut -c1-200 | tee -a $L/summary.txt
tar czf $OUT/logs.tgz -C $OUT logs
rm -rf $L
echo "elapsed $((SECONDS - T0)) s"
