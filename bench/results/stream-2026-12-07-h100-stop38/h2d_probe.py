# Host→device copy rate of one 242 MB piece (the DiT's streamed piece size) from host memory of
# several kinds, alone and beside bf16 GEMMs on another stream: does the kind or the NUMA node
# of the host pages set the rate a pass's copies reach? (stop 38; torch only for the probe.)
import mmap, os, statistics as st, sys, json, torch
N = 242 << 20
dev = torch.device('cuda')
dst = torch.empty(N, dtype=torch.uint8, device=dev)
cudart = torch.cuda.cudart()
a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16); b = torch.randn_like(a)
side = torch.cuda.Stream()

def rate(src, beside, trials=10):
    out = []
    for i in range(trials + 2):
        if beside:
            with torch.cuda.stream(side):
                for _ in range(8): a @ b
        e0 = torch.cuda.Event(enable_timing=True); e1 = torch.cuda.Event(enable_timing=True)
        e0.record(); dst.copy_(src, non_blocking=True); e1.record()
        torch.cuda.synchronize()
        out.append(N / (e0.elapsed_time(e1) * 1e6))
    out = out[2:]
    return st.median(out), min(out), max(out)

def anon(huge):
    m = mmap.mmap(-1, N, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_HUGEPAGE if huge else mmap.MADV_NOHUGEPAGE)
    m.write(os.urandom(1 << 20) * (N >> 20))
    return m

def registered(m, flags=0):
    import numpy as np
    arr = np.frombuffer(m, dtype=np.uint8)
    rc = cudart.cudaHostRegister(arr.ctypes.data, N, flags)
    assert int(rc) == 0, rc
    return torch.from_numpy(arr)

def nodes_of(m):
    import numpy as np
    at = np.frombuffer(m, dtype=np.uint8).ctypes.data
    last = ''
    for line in open('/proc/self/numa_maps'):
        if int(line.split()[0], 16) > at: break
        last = line
    return ' '.join(w for w in last.split() if w.startswith('N') or w.startswith('kernelpagesize'))

tag = sys.argv[1] if len(sys.argv) > 1 else 'free'
kinds = {}
def add(name, make):
    try: kinds[name] = make()
    except Exception as e: print(tag, name, 'failed:', e, flush=True)
add('cudaHostAlloc', lambda: (torch.empty(N, dtype=torch.uint8).pin_memory(), ''))
maps = []
def reg_anon(huge):
    m = anon(huge); maps.append(m); return registered(m), nodes_of(m)
add('registered anon 4K', lambda: reg_anon(False))
add('registered anon THP', lambda: reg_anon(True))
def reg_file():
    path = '/tmp/h2d_probe.bin'
    with open(path, 'wb') as f: f.write(os.urandom(1 << 20) * (N >> 20))
    fd = os.open(path, os.O_RDONLY)
    m = mmap.mmap(fd, N, access=mmap.ACCESS_READ); maps.append(m)
    return registered(m, 8), nodes_of(m)
add('registered file read-only', reg_file)
rows = []
for name, (src, where) in kinds.items():
    alone = rate(src, False); beside = rate(src, True)
    rows.append(dict(tag=tag, kind=name, nodes=where, alone=alone, beside=beside))
    print('%-5s %-32s alone %5.1f (%5.1f-%5.1f)  beside GEMMs %5.1f (%5.1f-%5.1f) GB/s  %s' % (tag, name, *alone, *beside, where), flush=True)
print('JSON', json.dumps(rows))
