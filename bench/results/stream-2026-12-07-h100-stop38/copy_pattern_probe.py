# A Z-Image DiT block's streamed piece (242 MB: 15 tensors' encodings, each in a registered
# mapping of its own, copied one copy a tensor into a slot) against one contiguous copy of the
# same bytes; on a copy stream of its own, alone and beside GEMMs, a memory-bound kernel, a
# device-to-device memcpy (a copy engine's work) and memsets. Which of these costs ferry's
# in-pass copies their 6 % below the link? (stop 38; torch only for the probe.)
import mmap, os, statistics as st, sys, json, torch
dev = torch.device('cuda')
cudart = torch.cuda.cudart()
MB = 1 << 20
enc = lambda n: int(n * 2 * 0.67) // 4 * 4
sizes = [30720, enc(15360 * 256)] + [256, 256] + [enc(3840 * 3840)] * 4 + [7680, 7680] + [enc(10240 * 3840)] * 3 + [7680, 7680]
total = sum(sizes)
ALIGN = 256
offs = []; at = 0
for s in sizes:
    at = (at + ALIGN - 1) // ALIGN * ALIGN; offs.append(at); at += s
slot_bytes = at + ALIGN
slots = [torch.empty(slot_bytes, dtype=torch.uint8, device=dev) for _ in range(2)]
maps = []
def registered(n):
    import numpy as np
    m = mmap.mmap(-1, max(n, 4096), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.write(os.urandom(min(n, MB)) * (max(n, 4096) // min(n, MB)) + b'\0' * (max(n, 4096) % min(n, MB)))
    maps.append(m)
    arr = np.frombuffer(m, dtype=np.uint8)[:n]
    assert int(cudart.cudaHostRegister(arr.ctypes.data, max(n, 4096), 0)) == 0
    return torch.from_numpy(arr)
pieces = [[registered(s) for s in sizes] for _ in range(4)]
whole = registered(total)
copy_stream = torch.cuda.Stream(); side = torch.cuda.Stream(); side2 = torch.cuda.Stream()
a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16); b = torch.randn_like(a)
x = torch.randn(256 * MB, device=dev, dtype=torch.bfloat16); y = torch.empty_like(x)
def load(kind):
    if kind == 'GEMMs':
        with torch.cuda.stream(side):
            for _ in range(10): a @ b
    elif kind == 'memory-bound kernel':
        with torch.cuda.stream(side):
            for _ in range(30): torch.mul(x, 1.0, out=y)
    elif kind == 'D2D memcpy':
        with torch.cuda.stream(side2):
            for _ in range(30): y.copy_(x)
    elif kind == 'memsets':
        with torch.cuda.stream(side):
            for _ in range(40): y.zero_()
def run(pattern, kind, trials=12):
    rates = []
    for i in range(trials + 2):
        load(kind)
        e0 = torch.cuda.Event(enable_timing=True); e1 = torch.cuda.Event(enable_timing=True)
        slot = slots[i % 2]
        with torch.cuda.stream(copy_stream):
            e0.record()
            if pattern == 'one copy':
                slot[:total].copy_(whole, non_blocking=True)
            else:
                for t, o in zip(pieces[i % 4], offs):
                    slot[o:o + t.numel()].copy_(t, non_blocking=True)
            e1.record()
        torch.cuda.synchronize()
        rates.append(total / (e0.elapsed_time(e1) * 1e6))
    r = rates[2:]
    return st.median(r), min(r), max(r)
rows = []
for kind in ['alone', 'GEMMs', 'memory-bound kernel', 'D2D memcpy', 'memsets']:
    for pattern in ['one copy', '15 copies, 15 mappings']:
        m = run(pattern, kind)
        rows.append(dict(pattern=pattern, beside=kind, gbps=m))
        print('%-24s beside %-20s %5.1f (%5.1f-%5.1f) GB/s' % (pattern, kind, *m), flush=True)
print('piece', total, 'bytes;', len(sizes), 'copies')
print('JSON', json.dumps(rows))
