#!/usr/bin/env bash
# Device call 2 (stop 38): ferry's copy pattern (a block's 15 encodings, one copy each, from
# mappings of their own) against one copy of the same bytes, alone and beside GEMMs, a
# memory-bound kernel, D2D memcpys and memsets (copy_pattern_probe.py); then the DiT at 3 GiB
# compressed with a timeline, for each piece's copy rate on this machine.
set -u
export LD_LIBRARY_PATH=/usr/local/cuda/lib64
T0=$SECONDS
L=$OUT/logs; mkdir -p $L
P=bench/results/stream-2026-12-07-h100-stop38
nvidia-smi --query-gpu=name,pci.bus_id --format=csv,noheader | tee $L/device.txt
timeout 90 python3 $P/copy_pattern_probe.py 2>&1 | grep -v -i warn | tee $L/pattern_probe.log
tar czf $OUT/logs.tgz -C $OUT logs
dit=(timeout 45 .gpu/ferry bench --synthetic z-image-turbo --device cuda --batch 1 --runs 5 --json --vram 3GiB --compress on)
"${dit[@]}" --timeline $L/dit_timeline.svg > $L/dit_timeline.json 2> $L/dit_timeline.log
python3 - $L/dit_timeline.svg <<'PY'
import re,sys
t=re.findall(r'<title>([^<]*)</title>', open(sys.argv[1]).read())
c=[float(m.group(1)) for x in t for m in [re.match(r'block \d+: copy .*\(([0-9.]+) ms\)',x)] if m]
c.sort(); print('block copies: n %d min %.3f median %.3f max %.3f ms -> %.1f / %.1f / %.1f GB/s at 242.4 MB'%(len(c),c[0],c[len(c)//2],c[-1],242.4/c[0],242.4/c[len(c)//2],242.4/c[-1]))
PY
tar czf $OUT/logs.tgz -C $OUT logs
echo "elapsed $((SECONDS - T0)) s"
summary() { python3 - "$@" <<'PY'
import json,sys,os
for f in sys.argv[1:]:
    try:
        r=json.load(open(f))['results'][0]; s=r['streamed']
        print('%-22s step %.4f copy %.4f gbps %.2f gb %.3f bound %.4f ratio %.3f'%(os.path.basename(f),r['step_s'],s['copy_s'],s['achieved_gbps'],s['streamed_gb'],s['bound_s'],r['step_s']/s['bound_s']), flush=True)
    except Exception as e: print(f, 'error', e, flush=True)
PY
}
# Each piece packed as one host image, one copy a piece (e02f10a, reverted in stop 37 after a
# slow-link machine; FERRY_PACK=0 is its copy a tensor), beside main's binary.
pack=(timeout 45 .gpu/ferry-pack bench --synthetic z-image-turbo --device cuda --batch 1 --runs 5 --json --vram 3GiB --compress on)
for i in 1 2; do
  "${pack[@]}" > $L/dit_pack_$i.json 2> $L/dit_pack_$i.log
  FERRY_PACK=0 "${pack[@]}" > $L/dit_pack0_$i.json 2> $L/dit_pack0_$i.log
  "${dit[@]}" > $L/dit_main_$i.json 2> $L/dit_main_$i.log
done
summary $L/dit_timeline.json $L/dit_pack_*.json $L/dit_pack0_*.json $L/dit_main_*.json
grep -h prediction $L/dit*.log | sed 's/ per pass.*PCIe bound/ bound/' | sort | uniq -c
tar czf $OUT/logs.tgz -C $OUT logs
echo "elapsed $((SECONDS - T0)) s"
rm -rf $L
