#!/usr/bin/env bash
# Device call 9 (stop 34): copies queued into slots freed early, against the schedule before
# (FERRY_NO_EARLY=1); each coded piece copied as one packed host image (default; FERRY_PACK=0
# off); the DiT at 3 GiB; every GPU check; the 7B compressed if time allows.
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
dit() { timeout 100 .gpu/ferry bench --synthetic z-image-turbo --device cuda --batch 1 --runs 5 --json "$@"; }
FERRY_NO_EARLY=1 FERRY_PACK=0 dit --vram 3GiB --compress on > $L/dit_base_1.json 2> $L/dit_base_1.log
FERRY_PACK=0 dit --vram 3GiB --compress on --timeline $OUT/dit_early_1.svg > $L/dit_early_1.json 2> $L/dit_early_1.log
dit --vram 3GiB --compress on --timeline $OUT/dit_pack_1.svg > $L/dit_pack_1.json 2> $L/dit_pack_1.log
summary $L/dit_base_1.json $L/dit_early_1.json $L/dit_pack_1.json
dit --vram 3GiB --compress on > $L/dit_pack_2.json 2> $L/dit_pack_2.log
summary $L/dit_pack_2.json
grep -h "budget  \|prediction\|resident  " $L/dit_pack_1.log | cut -c1-300
echo "elapsed $((SECONDS - T0)) s"
SKIP_DIT=1 SKIP_7B=1 timeout 150 bash scripts/gpu_checks.sh $L/checks > $L/checks.txt 2>&1
echo "checks rc=$?" >> $L/checks.txt
echo "== checks"; grep -E "test result|FAILED|panicked|rc=|gpu_checks" $L/checks.txt | tail -14
echo "elapsed $((SECONDS - T0)) s"
tar czf $OUT/logs.tgz -C $OUT logs
S=/tmp/ferry-qwen2.5-7b
if [ $((SECONDS - T0)) -lt 0 ]; then
  timeout 130 .gpu/ferry synth --arch qwen2 --preset qwen2.5-7b --out $S > $L/synth7b.log 2>&1
  for c in early pack; do
    [ $((SECONDS - T0)) -lt 300 ] || break
    P=0; [ $c = pack ] && P=1
    FERRY_PACK=$P timeout 100 .gpu/ferry bench --model $S --device cuda --vram 2.6GiB --prompt-tokens 4096 --batch 1 \
        --decode-tokens 32 --runs 3 --compress on --json > $L/b7_$c.json 2> $L/b7_$c.log
    summary $L/b7_$c.json
  done
  tar czf $OUT/logs.tgz -C $OUT logs
fi
echo "elapsed $((SECONDS - T0)) s"
rm -rf $L
