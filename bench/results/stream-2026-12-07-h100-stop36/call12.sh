#!/usr/bin/env bash
# Device call 12 (stop 36): stream priorities. FERRY_STREAM_PRIORITY=same (both streams at the
# default, main before), compute (the compute stream first: the new default), decode (the
# decode stream first); the Z-Image DiT at 3 GiB compressed, batch 1; then every GPU check
# with the default; then second runs.
set -u
export LD_LIBRARY_PATH=/usr/local/cuda/lib64
T0=$SECONDS
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $L/device.txt
summary() { python3 - "$@" <<'PY'
import json,sys,os
for f in sys.argv[1:]:
    try:
        d=json.load(open(f)); r=d['results'][0]; s=r.get('streamed') or {}
        print(os.path.basename(f), ' '.join('%s %.4f'%(k,r[k]) for k in ['step_s','prompt_s','decode_tok_s'] if k in r), ' '.join('%s %.4f'%(k,s[k]) for k in ['pass_s','bound_s','stall_s','decode_s','copy_s','streamed_gb','achieved_gbps','prompt_efficiency'] if k in s), flush=True)
    except Exception as e: print(f, 'error', e, flush=True)
PY
}
spans() { python3 - "$@" <<'PY'
import re,sys,os
for f in sys.argv[1:]:
    try:
        t=re.findall(r'<title>([^<]*)</title>', open(f).read())
        keep=[x for x in t if re.match(r'(embedders|context refiner|noise refiner|block [0-2] |final)', x)]
        print(os.path.basename(f)); [print('  ',x) for x in keep[:24]]
    except Exception as e: print(f,'error',e)
PY
}
dit() { timeout 100 .gpu/ferry bench --synthetic z-image-turbo --device cuda --batch 1 --runs 5 --json --vram 3GiB --compress on "$@"; }
FERRY_STREAM_PRIORITY=same dit --timeline $OUT/dit_same.svg > $L/dit_same_1.json 2> $L/dit_same_1.log
FERRY_STREAM_PRIORITY=compute dit --timeline $OUT/dit_compute.svg > $L/dit_compute_1.json 2> $L/dit_compute_1.log
summary $L/dit_same_1.json $L/dit_compute_1.json
grep -h "budget  \|prediction\|resident  " $L/dit_compute_1.log | cut -c1-300
echo "elapsed $((SECONDS - T0)) s"
tar czf $OUT/logs.tgz -C $OUT logs
SKIP_DIT=1 SKIP_7B=1 timeout 150 bash scripts/gpu_checks.sh $L/checks > $L/checks.txt 2>&1
echo "checks rc=$?" >> $L/checks.txt
echo "== checks"; grep -E "test result|FAILED|panicked|rc=|gpu_checks" $L/checks.txt | tail -14
echo "elapsed $((SECONDS - T0)) s"
tar czf $OUT/logs.tgz -C $OUT logs
FERRY_STREAM_PRIORITY=same dit > $L/dit_same_2.json 2> $L/dit_same_2.log
FERRY_STREAM_PRIORITY=compute dit > $L/dit_compute_2.json 2> $L/dit_compute_2.log
summary $L/dit_same_2.json $L/dit_compute_2.json
tar czf $OUT/logs.tgz -C $OUT logs
FERRY_STREAM_PRIORITY=decode dit --timeline $OUT/dit_decode.svg > $L/dit_decode_1.json 2> $L/dit_decode_1.log
summary $L/dit_decode_1.json
tar czf $OUT/logs.tgz -C $OUT logs
echo "elapsed $((SECONDS - T0)) s"
spans $OUT/dit_same.svg $OUT/dit_compute.svg $OUT/dit_decode.svg
rm -rf $L
