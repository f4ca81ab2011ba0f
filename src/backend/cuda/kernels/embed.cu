// Token embedding: out[t, :] = table[ids[t], :].
// grid: (tokens), block: 256; each thread copies pairs of bf16 (hidden is even).
extern "C" __global__ void embed(const bf16* __restrict__ table, const u32* __restrict__ ids,
                                 bf16* __restrict__ out, u32 hidden) {
    const u32 row = blockIdx.x;
    const u32* src = (const u32*)(table + (size_t)ids[row] * hidden);
    u32* dst = (u32*)(out + (size_t)row * hidden);
    for (u32 i = threadIdx.x; i < hidden / 2; i += blockDim.x) dst[i] = src[i];
}
