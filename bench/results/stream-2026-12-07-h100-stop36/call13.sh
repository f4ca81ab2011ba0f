#!/usr/bin/env bash
# Device call 13 (stop 36): rows and concatenations copied by a kernel, not by a DtoD memcpy
# on a copy engine (FERRY_DTOD_MEMCPY=1: as before); the DiT at 3 GiB compressed; GPU checks.
set -u
export LD_LIBRARY_PATH=/usr/local/cuda/lib64
T0=$SECONDS
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $L/device.txt
summary() { python3 - "$@" <<'PY'
import json,sys,os
for f in sys.argv[1:]:
    try:
        d=json.load(open(f)); r=d['results'][0]; s=r.get('streamed') or {}
        print(os.path.basename(f), ' '.join('%s %.4f'%(k,r[k]) for k in ['step_s'] if k in r), ' '.join('%s %.4f'%(k,s[k]) for k in ['pass_s','stall_s','decode_s','copy_s','streamed_gb','achieved_gbps'] if k in s), flush=True)
    except Exception as e: print(f, 'error', e, flush=True)
PY
}
spans() { python3 - "$@" <<'PY'
import re,sys,os
for f in sys.argv[1:]:
    try:
        t=re.findall(r'<title>([^<]*)</title>', open(f).read())
        keep=[x for x in t if re.match(r'(embedders|context refiner|noise refiner 1: copy|block [0-1]:|final)', x)]
        print(os.path.basename(f)); [print('  ',x) for x in keep[:16]]
    except Exception as e: print(f,'error',e)
PY
}
dit() { timeout 60 .gpu/ferry bench --synthetic z-image-turbo --device cuda --batch 1 --runs 5 --json --vram 3GiB --compress on "$@"; }
dit --timeline $OUT/dit_kernel.svg > $L/dit_kernel_1.json 2> $L/dit_kernel_1.log
FERRY_DTOD_MEMCPY=1 dit > $L/dit_memcpy_1.json 2> $L/dit_memcpy_1.log
summary $L/dit_kernel_1.json $L/dit_memcpy_1.json
spans $OUT/dit_kernel.svg
tar czf $OUT/logs.tgz -C $OUT logs
echo "elapsed $((SECONDS - T0)) s"
SKIP_DIT=1 SKIP_7B=1 timeout 100 bash scripts/gpu_checks.sh $L/checks > $L/checks.txt 2>&1
echo "checks rc=$?" >> $L/checks.txt
grep -E "test result|FAILED|panicked|rc=|gpu_checks" $L/checks.txt | tail -12
tar czf $OUT/logs.tgz -C $OUT logs
echo "elapsed $((SECONDS - T0)) s"
dit > $L/dit_kernel_2.json 2> $L/dit_kernel_2.log
summary $L/dit_kernel_2.json
tar czf $OUT/logs.tgz -C $OUT logs
rm -rf $L
