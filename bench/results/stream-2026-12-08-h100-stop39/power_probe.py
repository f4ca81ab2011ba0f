# One load kind beside a copy stream for ~4 s (stop 39): 242 MiB pieces from pinned host memory
# copied in turn into two device slots while `kind` runs on other streams; prints the copies'
# median GB/s. The shell samples nvidia-smi (power, clocks, throttle reasons) around it, to see
# whether what slows the copies beside GEMMs and HBM traffic is the card's power or clocks.
import statistics as st, sys, time, torch
kind = sys.argv[1]; dev = torch.device('cuda'); MB = 1 << 20
piece = 242 * MB
host = [torch.empty(piece, dtype=torch.uint8, pin_memory=True).fill_(i) for i in range(4)]
slots = [torch.empty(piece, dtype=torch.uint8, device=dev) for _ in range(2)]
copy_stream = torch.cuda.Stream(); s1 = torch.cuda.Stream(); s2 = torch.cuda.Stream()
a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16); b = torch.randn_like(a)
x = torch.randn(256 * MB, device=dev, dtype=torch.bfloat16); y = torch.empty_like(x)
rates = []; t0 = time.time()
while time.time() - t0 < 4:
    if 'GEMMs' in kind:
        with torch.cuda.stream(s1):
            for _ in range(12): a @ b
    if 'HBM' in kind:
        with torch.cuda.stream(s2):
            for _ in range(20): torch.mul(x, 1.0, out=y)
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(5)]
    with torch.cuda.stream(copy_stream):
        ev[0].record()
        for i in range(4):
            slots[i % 2].copy_(host[i], non_blocking=True); ev[i + 1].record()
    torch.cuda.synchronize()
    rates += [piece / (ev[i].elapsed_time(ev[i + 1]) * 1e6) for i in range(4)]
print('%-20s copies %.1f GB/s (median of %d, %.1f-%.1f)' % (kind, st.median(rates), len(rates), min(rates), max(rates)), flush=True)
