#!/usr/bin/env bash
# Device call 15 (stop 37; never run, superseded by stop 38's call1.sh, which ran its NUMA part on a
# one-node host; FERRY_PACK no longer exists on main): does the host memory's NUMA node set the copies' rate in a pass?
set -u
export LD_LIBRARY_PATH=/usr/local/cuda/lib64
T0=$SECONDS
L=$OUT/logs; mkdir -p $L
nvidia-smi --query-gpu=name,pci.bus_id --format=csv,noheader | tee $L/device.txt
nvidia-smi topo -m > $L/topo.txt 2>&1; tail -8 $L/topo.txt
ls -d /sys/devices/system/node/node* | tee $L/nodes.txt
for n in /sys/devices/system/node/node*; do echo "$n cpus $(cat $n/cpulist) $(grep MemTotal $n/meminfo)"; done | tee -a $L/nodes.txt
bus=$(nvidia-smi --query-gpu=pci.bus_id --format=csv,noheader | tr 'A-Z' 'a-z' | sed 's/^0000//; s/^\(....\):/0000:\1:/' )
cat /sys/bus/pci/devices/*/numa_node 2>/dev/null | sort | uniq -c | tee -a $L/nodes.txt
for d in /sys/bus/pci/devices/*; do [ "$(cat $d/vendor)" = 0x10de ] && echo "gpu $d numa_node $(cat $d/numa_node)"; done | tee -a $L/nodes.txt
which numactl; lscpu | grep -i -E "numa|socket|model name" | tee -a $L/nodes.txt
summary() { python3 - "$@" <<'PY'
import json,sys,os
for f in sys.argv[1:]:
    try:
        r=json.load(open(f))['results'][0]; s=r['streamed']
        print('%-22s step %.4f copy %.4f gbps %.2f gb %.3f bound %.4f ratio %.3f'%(os.path.basename(f),r['step_s'],s['copy_s'],s['achieved_gbps'],s['streamed_gb'],s['bound_s'],r['step_s']/s['bound_s']), flush=True)
    except Exception as e: print(f, 'error', e, flush=True)
PY
}
# Run ferry with its memory bound to node $1 (set_mempolicy MPOL_BIND) and its threads on that node's CPUs.
bound() { node=$1; shift; python3 - "$node" "$@" <<'PY'
import ctypes,os,sys
node=int(sys.argv[1]); argv=sys.argv[2:]
cpus=open('/sys/devices/system/node/node%d/cpulist'%node).read().strip()
s=set()
for part in cpus.split(','):
    a,_,b=part.partition('-'); s.update(range(int(a),int(b or a)+1))
os.sched_setaffinity(0,s)
mask=ctypes.c_ulong(1<<node)
libc=ctypes.CDLL(None,use_errno=True)
if libc.syscall(238,2,ctypes.byref(mask),ctypes.c_ulong(64))!=0: sys.exit('set_mempolicy: errno %d'%ctypes.get_errno())
os.execv(argv[0],argv)
PY
}
dit=(timeout 60 .gpu/ferry bench --synthetic z-image-turbo --device cuda --batch 1 --runs 5 --json --vram 3GiB --compress on)
"${dit[@]}" > $L/dit_free_1.json 2> $L/dit_free_1.log
for n in $(ls -d /sys/devices/system/node/node* | sed 's/.*node//'); do
  bound $n "${dit[@]}" --timeline $OUT/dit_node$n.svg > $L/dit_node${n}_1.json 2> $L/dit_node${n}_1.log
done
summary $L/dit_free_1.json $L/dit_node*_1.json
tar czf $OUT/logs.tgz -C $OUT logs
for n in $(ls -d /sys/devices/system/node/node* | sed 's/.*node//'); do
  FERRY_PACK=0 bound $n "${dit[@]}" > $L/dit_node${n}_nopack.json 2> $L/dit_node${n}_nopack.log
done
summary $L/dit_node*_nopack.json
grep -h prediction $L/*.log | sed 's/ per pass.*PCIe bound/ bound/' 
tar czf $OUT/logs.tgz -C $OUT logs
echo "elapsed $((SECONDS - T0)) s"
