# Under the load that slows copies (bf16 GEMMs and an HBM-streaming kernel on two more streams,
# the card at its power cap as in a coded pass), does the host memory's kind or the copy
# pattern set the rate? Four 242 MiB pieces copied in turn into two device slots from
# cudaHostAlloc (torch's pinned memory), registered anonymous 4 KiB pages, or a registered
# read-only file mapping; each piece as one copy or as a DiT block's 15 encodings (contiguous
# chunks of the same buffer). Median GB/s over ~2.5 s each. (stop 39; torch only for the probe.)
import mmap, os, statistics as st, tempfile, time, torch, numpy as np
dev = torch.device('cuda'); cudart = torch.cuda.cudart(); MB = 1 << 20; N = 242 * MB
enc = lambda n: int(n * 2 * 0.67) // 4 * 4
sizes = [30720, enc(15360 * 256), 256, 256] + [enc(3840 * 3840)] * 4 + [7680, 7680] + [enc(10240 * 3840)] * 3 + [7680, 7680]
sizes[-5] += N - sum(sizes)  # the last large encoding takes the rest: 242 MB a piece
offs = [sum(sizes[:i]) for i in range(len(sizes))]
slots = [torch.empty(N, dtype=torch.uint8, device=dev) for _ in range(2)]
keep = []
def registered(buf, flags=0):
    arr = np.frombuffer(buf, dtype=np.uint8)[:N]
    assert int(cudart.cudaHostRegister(arr.ctypes.data, N, flags)) == 0
    keep.append(buf); return torch.from_numpy(arr)
def anon():
    m = mmap.mmap(-1, N, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_NOHUGEPAGE); m.write(os.urandom(MB) * (N // MB)); return registered(m)
fd, path = tempfile.mkstemp(dir='/tmp'); os.write(fd, os.urandom(MB) * (4 * N // MB)); os.fsync(fd)
def filemap(i):
    m = mmap.mmap(fd, N, prot=mmap.PROT_READ, offset=i * N); return registered(m, 8)  # cudaHostRegisterReadOnly
kinds = {'cudaHostAlloc': lambda i: torch.empty(N, dtype=torch.uint8, pin_memory=True).fill_(i),
         'registered 4K': lambda i: anon(), 'registered file': filemap}
copy_stream = torch.cuda.Stream(); s1 = torch.cuda.Stream(); s2 = torch.cuda.Stream()
a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16); b = torch.randn_like(a)
x = torch.randn(256 * MB, device=dev, dtype=torch.bfloat16); y = torch.empty_like(x)
def run(pieces, pattern, loaded):
    rates = []; t0 = time.time()
    while time.time() - t0 < 2.5:
        if loaded:
            with torch.cuda.stream(s1):
                for _ in range(12): a @ b
            with torch.cuda.stream(s2):
                for _ in range(20): torch.mul(x, 1.0, out=y)
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(5)]
        with torch.cuda.stream(copy_stream):
            ev[0].record()
            for i, p in enumerate(pieces):
                s = slots[i % 2]
                if pattern == 'one copy': s.copy_(p, non_blocking=True)
                else:
                    for o, n in zip(offs, sizes): s[o:o + n].copy_(p[o:o + n], non_blocking=True)
                ev[i + 1].record()
        torch.cuda.synchronize()
        rates += [N / (ev[i].elapsed_time(ev[i + 1]) * 1e6) for i in range(4)]
    return st.median(rates), min(rates), max(rates), len(rates)
for kind, make in kinds.items():
    pieces = [make(i) for i in range(4)]
    for pattern in ['one copy', '15 copies']:
        for loaded in [False, True]:
            m = run(pieces, pattern, loaded)
            print('%-16s %-10s %-18s %.1f GB/s (%.1f-%.1f, n %d)' % (kind, pattern, 'GEMMs + HBM' if loaded else 'alone', *m), flush=True)
os.unlink(path)
