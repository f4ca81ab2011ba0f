// Index of the largest value of each row of x [rows, cols] (bf16); the first one on ties,
// NaN never wins. grid: (rows), block: 1024.
extern "C" __global__ void argmax_rows(const bf16* __restrict__ x, u32* __restrict__ out, u32 cols) {
    const bf16* row = x + (size_t)blockIdx.x * cols;
    float best = NEG_INF;
    u32 idx = 0xffffffffu;
    for (u32 i = threadIdx.x; i < cols; i += blockDim.x) {
        float v = bf2f(row[i]);
        if (v > best) { best = v; idx = i; }  // i grows: the first maximum is kept
    }
    // Reduce (value, index): larger value wins; on equal values the smaller index.
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, best, o);
        u32 oi = __shfl_xor_sync(0xffffffffu, idx, o);
        if (ov > best || (ov == best && oi < idx)) { best = ov; idx = oi; }
    }
    __shared__ float sv[32];
    __shared__ u32 si[32];
    const u32 warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    if (lane == 0) { sv[warp] = best; si[warp] = idx; }
    __syncthreads();
    if (warp == 0) {
        best = lane < warps ? sv[lane] : NEG_INF;
        idx = lane < warps ? si[lane] : 0xffffffffu;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, best, o);
            u32 oi = __shfl_xor_sync(0xffffffffu, idx, o);
            if (ov > best || (ov == best && oi < idx)) { best = ov; idx = oi; }
        }
        if (lane == 0) out[blockIdx.x] = idx == 0xffffffffu ? 0 : idx;
    }
}
