#!/usr/bin/env bash
# Device call 3 (stop 39): the raw tensors a coded piece moves into its decode buffer (the DiT's
# norm weights and a bias, 7 a piece) moved by a kernel on the decode stream rather than by
# cuMemcpyDtoDAsync, which takes a copy engine from the weight copies (FERRY_DTOD_MEMCPY=1: by
# memcpy, as before). Every GPU check with the new default; the DiT at 3 GiB, both ways, with
# nvidia-smi sampled every 50 ms (power, clocks, throttle reasons; samples ≥ 50 % busy);
# uncompressed; then torch's loads beside copies with the same sampling (power_probe.py).
set -u
export LD_LIBRARY_PATH=/usr/local/cuda/lib64
T0=$SECONDS
L=$OUT/logs; mkdir -p $L
D=bench/results/stream-2026-12-08-h100-stop39
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm,clocks.max.mem,pci.bus_id --format=csv,noheader | tee $L/device.txt
source bench/device_lib.sh
Q=timestamp,power.draw,clocks.sm,clocks.mem,utilization.gpu,utilization.memory,temperature.gpu,clocks_event_reasons.active
sampled() { local name=$1; shift; nvidia-smi --query-gpu=$Q --format=csv,noheader,nounits -lms 50 > $L/smi_$name.csv 2>&1 & local p=$!; "$@"; kill $p; wait $p 2>/dev/null; }
dit=(timeout 90 .gpu/ferry bench --synthetic z-image-turbo --device cuda --batch 1 --runs 5 --json --vram 3GiB)
"${dit[@]}" --compress on --timeline $L/dit_kernel.svg > $L/dit_kernel_t.json 2> $L/dit_kernel_t.log
FERRY_DTOD_MEMCPY=1 "${dit[@]}" --compress on > $L/dit_memcpy_1.json 2> $L/dit_memcpy_1.log
"${dit[@]}" --compress on > $L/dit_kernel_1.json 2> $L/dit_kernel_1.log
summary $L/dit_kernel_t.json $L/dit_memcpy_1.json $L/dit_kernel_1.json
block_copies $L/dit_kernel.svg
tar czf $OUT/logs.tgz -C $OUT logs
echo "elapsed $((SECONDS - T0)) s"
SKIP_DIT=1 SKIP_7B=1 timeout 200 bash scripts/gpu_checks.sh $L/checks > $L/gpu_checks.log 2>&1; echo "gpu_checks rc $?"
grep -E "test result|FAILED|panicked|gpu_checks:" $L/gpu_checks.log | tail -12
tar czf $OUT/logs.tgz -C $OUT logs
echo "elapsed $((SECONDS - T0)) s"
long=(timeout 90 .gpu/ferry bench --synthetic z-image-turbo --device cuda --batch 1 --runs 30 --json --vram 3GiB)
sampled kernel "${long[@]}" --compress on > $L/dit_kernel_2.json 2> $L/dit_kernel_2.log
sampled memcpy env FERRY_DTOD_MEMCPY=1 "${long[@]}" --compress on > $L/dit_memcpy_2.json 2> $L/dit_memcpy_2.log
sampled off "${long[@]}" --compress off > $L/dit_off.json 2> $L/dit_off.log
"${dit[@]}" --compress on > $L/dit_kernel_3.json 2> $L/dit_kernel_3.log
FERRY_DTOD_MEMCPY=1 "${dit[@]}" --compress on > $L/dit_memcpy_3.json 2> $L/dit_memcpy_3.log
summary $L/dit_kernel_*.json $L/dit_memcpy_*.json $L/dit_off.json | tee $L/summary.txt
tar czf $OUT/logs.tgz -C $OUT logs
echo "elapsed $((SECONDS - T0)) s"
if [ $((SECONDS - T0)) -lt 420 ]; then
  for k in alone GEMMs HBM "GEMMs+HBM"; do sampled "probe_$k" timeout 40 python3 $D/power_probe.py "$k" 2>&1 | grep -v -i warn | tee -a $L/summary.txt; done
fi
python3 - $L/smi_*.csv <<'PY' | tee -a $L/summary.txt
import sys, statistics as st, os
for f in sys.argv[1:]:
    rows = [[c.strip() for c in l.split(',')] for l in open(f) if l.count(',') >= 7]
    busy = [r for r in rows if r[4].isdigit() and int(r[4]) >= 50]
    if not busy: print(os.path.basename(f), 'no busy samples of', len(rows)); continue
    med = lambda i: st.median(float(r[i]) for r in busy)
    reasons = {}
    for r in busy: reasons[r[7]] = reasons.get(r[7], 0) + 1
    print('%-22s n %3d power %.0f W sm %.0f MHz mem %.0f MHz util %.0f %% memutil %.0f %% temp %.0f reasons %s' % (os.path.basename(f), len(busy), med(1), med(2), med(3), med(4), med(5), med(6), dict(sorted(reasons.items(), key=lambda kv: -kv[1])[:3])))
PY
tar czf $OUT/logs.tgz -C $OUT logs
rm -rf $L
echo "elapsed $((SECONDS - T0)) s"
