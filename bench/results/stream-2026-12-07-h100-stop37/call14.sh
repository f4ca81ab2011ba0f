#!/usr/bin/env bash
# Device call 14 (stop 37; written in stop 36): RoPE tables kept on the device across steps (FERRY_ROPE_UPLOAD=1:
# uploaded every pass, as before); the DiT at 3 GiB compressed; the Z-Image GPU tests.
set -u
export LD_LIBRARY_PATH=/usr/local/cuda/lib64
T0=$SECONDS
L=$OUT/logs; mkdir -p $L
b=$(cat .gpu/built_in); [ -d "$b/tests/fixtures" ] || { mkdir -p "$(dirname "$b")"; ln -sfn "$PWD" "$b"; }
nvidia-smi --query-gpu=name --format=csv,noheader | tee $L/device.txt
summary() { python3 - "$@" <<'PY'
import json,sys,os
for f in sys.argv[1:]:
    try:
        d=json.load(open(f)); r=d['results'][0]; s=r.get('streamed') or {}
        print(os.path.basename(f), 'step %.4f'%r['step_s'], ' '.join('%s %.4f'%(k,s[k]) for k in ['pass_s','copy_s','achieved_gbps'] if k in s), flush=True)
    except Exception as e: print(f, 'error', e, flush=True)
PY
}
spans() { python3 - "$@" <<'PY'
import re,sys,os
for f in sys.argv[1:]:
    t=re.findall(r'<title>([^<]*)</title>', open(f).read())
    for x in t:
        if re.match(r'(embedders|context refiner|block 0: c|block 29: copy|final)', x): print('  ',x)
PY
}
dit() { timeout 40 .gpu/ferry bench --synthetic z-image-turbo --device cuda --batch 1 --runs 5 --json --vram 3GiB --compress on "$@"; }
dit --timeline $OUT/dit_kept.svg > $L/dit_kept_1.json 2> $L/dit_kept_1.log
FERRY_PACK=0 dit > $L/dit_nopack_1.json 2> $L/dit_nopack_1.log
FERRY_PACK=0 FERRY_ROPE_UPLOAD=1 dit --timeline $OUT/dit_upload.svg > $L/dit_upload_1.json 2> $L/dit_upload_1.log
summary $L/dit_kept_1.json $L/dit_nopack_1.json $L/dit_upload_1.json
spans $OUT/dit_kept.svg; echo upload:; spans $OUT/dit_upload.svg
tar czf $OUT/logs.tgz -C $OUT logs
echo "decode bits with a strided grid:"
FERRY_DECODE_CTAS=4 timeout 60 .gpu/cuda-stream-tests decompression_on_the_gpu_is_exact --nocapture > $L/decode_ctas4.log 2>&1; grep -E "GB/s|test result|FAILED|panicked" $L/decode_ctas4.log | tail -4
timeout 60 .gpu/cuda-stream-tests decompression_on_the_gpu_is_exact --nocapture > $L/decode_whole.log 2>&1; grep -E "GB/s|test result" $L/decode_whole.log | tail -3
for n in 132 66; do FERRY_DECODE_CTAS=$n dit > $L/dit_ctas${n}_1.json 2> $L/dit_ctas${n}_1.log; done
summary $L/dit_ctas132_1.json $L/dit_ctas66_1.json
tar czf $OUT/logs.tgz -C $OUT logs
echo "elapsed $((SECONDS - T0)) s"
timeout 40 .gpu/cuda-z-image-tests --test-threads 1 > $L/z_image_tests.log 2>&1
grep -E "test result|FAILED|panicked" $L/z_image_tests.log
tar czf $OUT/logs.tgz -C $OUT logs
dit > $L/dit_kept_2.json 2> $L/dit_kept_2.log
FERRY_PACK=0 dit > $L/dit_nopack_2.json 2> $L/dit_nopack_2.log
FERRY_PACK=0 FERRY_ROPE_UPLOAD=1 dit > $L/dit_upload_2.json 2> $L/dit_upload_2.log
FERRY_DECODE_CTAS=132 dit > $L/dit_ctas132_2.json 2> $L/dit_ctas132_2.log
summary $L/dit_kept_2.json $L/dit_nopack_2.json $L/dit_upload_2.json $L/dit_ctas132_2.json
tar czf $OUT/logs.tgz -C $OUT logs
echo "elapsed $((SECONDS - T0)) s"
SKIP_DIT=1 SKIP_7B=1 timeout 150 bash scripts/gpu_checks.sh $L/checks > $L/gpu_checks.log 2>&1; echo "gpu_checks rc $?"
grep -E "test result|FAILED|panicked|rc=|gpu_checks" $L/gpu_checks.log | tail -14
tar czf $OUT/logs.tgz -C $OUT logs
echo "elapsed $((SECONDS - T0)) s"
