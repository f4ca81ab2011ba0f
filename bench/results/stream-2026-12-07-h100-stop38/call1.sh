#!/usr/bin/env bash
# Device call 1 (stop 38): does the host pages' kind or NUMA node set a pass's copy rate?
# 1. the host's NUMA nodes and the GPU's; 2. h2d_probe.py (one 242 MB copy from pinned,
# registered anon 4K / THP and registered file pages, alone and beside GEMMs), free and bound
# to each node; 3. the DiT at 3 GiB compressed: free, FERRY_HOST_NODE=gpu, FERRY_HUGE_PAGES=1
# (encodings on transparent huge pages), bound to each node;
# 4. scripts/gpu_checks.sh (SKIP_DIT, SKIP_7B) with this commit's binaries.
set -u
export LD_LIBRARY_PATH=/usr/local/cuda/lib64
T0=$SECONDS
L=$OUT/logs; mkdir -p $L
b=$(cat .gpu/built_in); [ -d "$b/tests/fixtures" ] || { mkdir -p "$(dirname "$b")"; ln -sfn "$PWD" "$b"; }
P=bench/results/stream-2026-12-07-h100-stop38
nvidia-smi --query-gpu=name,pci.bus_id --format=csv,noheader | tee $L/device.txt
nvidia-smi topo -m > $L/topo.txt 2>&1; tail -6 $L/topo.txt
for n in /sys/devices/system/node/node*; do echo "$n cpus $(cat $n/cpulist) $(grep MemTotal $n/meminfo)"; done | tee $L/nodes.txt
for d in /sys/bus/pci/devices/*; do [ "$(cat $d/vendor)" = 0x10de ] && echo "gpu $d numa_node $(cat $d/numa_node)"; done | tee -a $L/nodes.txt
lscpu | grep -i -E "numa|socket|model name" | tee -a $L/nodes.txt
cat /sys/kernel/mm/transparent_hugepage/enabled /proc/cmdline | tee -a $L/nodes.txt
nodes=$(ls -d /sys/devices/system/node/node* | sed 's/.*node//')
summary() { python3 - "$@" <<'PY'
import json,sys,os
for f in sys.argv[1:]:
    try:
        r=json.load(open(f))['results'][0]; s=r['streamed']
        print('%-22s step %.4f copy %.4f gbps %.2f gb %.3f bound %.4f ratio %.3f'%(os.path.basename(f),r['step_s'],s['copy_s'],s['achieved_gbps'],s['streamed_gb'],s['bound_s'],r['step_s']/s['bound_s']), flush=True)
    except Exception as e: print(f, 'error', e, flush=True)
PY
}
# Run a command with its memory bound to node $1 (set_mempolicy MPOL_BIND) and its threads on that node's CPUs.
bound() { node=$1; shift; python3 - "$node" "$@" <<'PY'
import ctypes,os,shutil,sys
node=int(sys.argv[1]); argv=sys.argv[2:]
cpus=open('/sys/devices/system/node/node%d/cpulist'%node).read().strip()
s=set()
for part in cpus.split(','):
    a,_,b=part.partition('-'); s.update(range(int(a),int(b or a)+1))
os.sched_setaffinity(0,s)
mask=ctypes.c_ulong(1<<node)
libc=ctypes.CDLL(None,use_errno=True)
if libc.syscall(238,2,ctypes.byref(mask),ctypes.c_ulong(64))!=0: sys.exit('set_mempolicy: errno %d'%ctypes.get_errno())
os.execv(shutil.which(argv[0]),argv)
PY
}
timeout 60 python3 $P/h2d_probe.py free 2>&1 | grep -v Warning | tee $L/probe_free.log
for n in $nodes; do [ "$nodes" = 0 ] && break; bound $n timeout 60 python3 $P/h2d_probe.py node$n 2>&1 | grep -v Warning | tee $L/probe_node$n.log; done
tar czf $OUT/logs.tgz -C $OUT logs
echo "elapsed $((SECONDS - T0)) s"
dit=(timeout 45 .gpu/ferry bench --synthetic z-image-turbo --device cuda --batch 1 --runs 5 --json --vram 3GiB --compress on)
"${dit[@]}" > $L/dit_free_1.json 2> $L/dit_free_1.log
FERRY_HOST_NODE=gpu "${dit[@]}" > $L/dit_hostnode_1.json 2> $L/dit_hostnode_1.log
grep -h FERRY_HOST_NODE $L/dit_hostnode_1.log
FERRY_HUGE_PAGES=1 "${dit[@]}" > $L/dit_huge_1.json 2> $L/dit_huge_1.log
for n in $nodes; do [ "$nodes" = 0 ] && break; bound $n "${dit[@]}" > $L/dit_node${n}_1.json 2> $L/dit_node${n}_1.log; done
summary $L/dit_free_1.json $L/dit_hostnode_1.json $L/dit_huge_1.json $L/dit_node*_1.json
tar czf $OUT/logs.tgz -C $OUT logs
echo "elapsed $((SECONDS - T0)) s"
SKIP_DIT=1 SKIP_7B=1 timeout 150 bash scripts/gpu_checks.sh $L/checks > $L/gpu_checks.log 2>&1; echo "gpu_checks rc $?"
grep -E "test result|FAILED|panicked|rc=|gpu_checks" $L/gpu_checks.log | tail -14
tar czf $OUT/logs.tgz -C $OUT logs
"${dit[@]}" > $L/dit_free_2.json 2> $L/dit_free_2.log
FERRY_HOST_NODE=gpu "${dit[@]}" > $L/dit_hostnode_2.json 2> $L/dit_hostnode_2.log
FERRY_HUGE_PAGES=1 "${dit[@]}" > $L/dit_huge_2.json 2> $L/dit_huge_2.log
summary $L/dit_free_2.json $L/dit_hostnode_2.json $L/dit_huge_2.json
grep -h prediction $L/dit*.log | sed 's/ per pass.*PCIe bound/ bound/'
tar czf $OUT/logs.tgz -C $OUT logs
echo "elapsed $((SECONDS - T0)) s"
