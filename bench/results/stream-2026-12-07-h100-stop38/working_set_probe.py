# Does the size of the host memory a pass streams from (7.27 GB for the Z-Image DiT at 3 GiB,
# 30 pieces of 15 encodings, each in a registered mapping of its own) slow its copies beside
# compute, where 4 pieces' worth (~1 GB, copy_pattern_probe.py) copies at 53.7-54.7 GB/s? Host
# memory: registered anonymous 4 KiB pages and cudaHostAlloc (huge pages made no difference in
# h2d_probe.py); beside nothing, GEMMs, and GEMMs with a memory-bound kernel (decoding's
# stand-in) on two more streams. (stop 38; torch only for the probe.)
import mmap, os, statistics as st, sys, json, torch
dev = torch.device('cuda'); cudart = torch.cuda.cudart(); MB = 1 << 20
enc = lambda n: int(n * 2 * 0.67) // 4 * 4
sizes = [30720, enc(15360 * 256)] + [256, 256] + [enc(3840 * 3840)] * 4 + [7680, 7680] + [enc(10240 * 3840)] * 3 + [7680, 7680]
total = sum(sizes); ALIGN = 256
offs = []; at = 0
for s in sizes:
    at = (at + ALIGN - 1) // ALIGN * ALIGN; offs.append(at); at += s
slots = [torch.empty(at + ALIGN, dtype=torch.uint8, device=dev) for _ in range(2)]
fill = os.urandom(MB)
maps = []
def registered(n):
    import numpy as np
    size = max(n, 4096)
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_NOHUGEPAGE)
    for o in range(0, size, MB): m[o:min(size, o + MB)] = fill[:min(MB, size - o)]
    maps.append(m)
    arr = np.frombuffer(m, dtype=np.uint8)[:n]
    assert int(cudart.cudaHostRegister(arr.ctypes.data, size, 0)) == 0
    return torch.from_numpy(arr)
def pinned(n):
    t = torch.empty(n, dtype=torch.uint8, pin_memory=True); t.fill_(7); return t
copy_stream = torch.cuda.Stream(); s1 = torch.cuda.Stream(); s2 = torch.cuda.Stream()
a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16); b = torch.randn_like(a)
x = torch.randn(256 * MB, device=dev, dtype=torch.bfloat16); y = torch.empty_like(x)
def load(kind, n):
    if kind in ('GEMMs', 'GEMMs + HBM kernel'):
        with torch.cuda.stream(s1):
            for _ in range(3 * n): a @ b
    if kind == 'GEMMs + HBM kernel':
        with torch.cuda.stream(s2):
            for _ in range(5 * n): torch.mul(x, 1.0, out=y)
def run(pieces, kind, passes=2):
    rates = []
    for p in range(passes + 1):
        load(kind, len(pieces))
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(len(pieces) + 1)]
        with torch.cuda.stream(copy_stream):
            ev[0].record()
            for i, piece in enumerate(pieces):
                slot = slots[i % 2]
                for t, o in zip(piece, offs): slot[o:o + t.numel()].copy_(t, non_blocking=True)
                ev[i + 1].record()
        torch.cuda.synchronize()
        if p: rates += [total / (ev[i].elapsed_time(ev[i + 1]) * 1e6) for i in range(len(pieces))]
    return st.median(rates), min(rates), max(rates)
rows = []
for mem in ['registered 4K', 'cudaHostAlloc']:
    make = {'registered 4K': registered, 'cudaHostAlloc': pinned}[mem]
    pieces = [[make(s) for s in sizes] for _ in range(30)]
    for kind in ['alone', 'GEMMs', 'GEMMs + HBM kernel']:
        for n in (4, 30):
            m = run(pieces[:n], kind)
            rows.append(dict(memory=mem, pieces=n, beside=kind, gbps=m))
            print('%-15s %2d pieces (%.2f GB) beside %-19s %5.1f (%5.1f-%5.1f) GB/s' % (mem, n, n * total / 1e9, kind, *m), flush=True)
    del pieces  # the registered mappings stay until exit (7.3 GB of the host's 128 GiB)
print('JSON', json.dumps(rows))
