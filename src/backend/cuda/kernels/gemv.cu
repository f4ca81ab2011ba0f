// One token through a linear layer (decode): y[m] = Σ_k w[m, k]·x[k] (+ bias[m]) (+ y[m] when
// accumulating the residual). Reading the weight once is all the work, so each warp streams
// whole rows with 16-byte loads, several in flight, and reduces with shuffles; x (a few KB)
// stays in L1/L2. Needs k % 8 == 0.
// grid: ceil(m / 8), block: 256 (8 warps, one row each).
extern "C" __global__ void __launch_bounds__(256)
gemv(const bf16* __restrict__ w, const bf16* __restrict__ x, const bf16* __restrict__ bias,
     bf16* __restrict__ y, u32 m, u32 k, u32 accumulate) {
    const u32 row = blockIdx.x * 8 + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= m) return;
    const uint4* wr = (const uint4*)(w + (size_t)row * k);
    const uint4* xv = (const uint4*)x;
    const u32 n = k / 8;
    float acc = 0.f;
    u32 i = lane;
    // Four 16-byte loads of w in flight per lane.
    for (; i + 96 < n; i += 128) {
        uint4 a0 = wr[i], a1 = wr[i + 32], a2 = wr[i + 64], a3 = wr[i + 96];
        uint4 b0 = xv[i], b1 = xv[i + 32], b2 = xv[i + 64], b3 = xv[i + 96];
#define DOT8(a, b)                                                                   \
    acc += bf_lo(a.x) * bf_lo(b.x) + bf_hi(a.x) * bf_hi(b.x) + bf_lo(a.y) * bf_lo(b.y) + \
           bf_hi(a.y) * bf_hi(b.y) + bf_lo(a.z) * bf_lo(b.z) + bf_hi(a.z) * bf_hi(b.z) + \
           bf_lo(a.w) * bf_lo(b.w) + bf_hi(a.w) * bf_hi(b.w);
        DOT8(a0, b0) DOT8(a1, b1) DOT8(a2, b2) DOT8(a3, b3)
    }
    for (; i < n; i += 32) {
        uint4 a = wr[i], b = xv[i];
        DOT8(a, b)
    }
    acc = warp_sum(acc);
    if (lane == 0) {
        if (bias) acc += bf2f(bias[row]);
        if (accumulate) acc += bf2f(y[row]);
        y[row] = f2bf(acc);
    }
}
