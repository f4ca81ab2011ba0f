// Elementwise ops over n bf16 values, math in f32. The `_x8` forms move 16 bytes per thread
// and need n % 8 == 0 and 16-byte aligned pointers (the allocator's are 256-byte aligned).
// grid: enough blocks of 256 threads to cover n (or n / 8), grid-stride loops beyond that.

__device__ __forceinline__ float silu(float g) { return g / (1.f + __expf(-g)); }

// gate = silu(gate) * up, in place.
extern "C" __global__ void silu_mul(bf16* __restrict__ gate, const bf16* __restrict__ up, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        gate[i] = f2bf(silu(bf2f(gate[i])) * bf2f(up[i]));
}

extern "C" __global__ void silu_mul_x8(uint4* __restrict__ gate, const uint4* __restrict__ up, u64 n8) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n8; i += (u64)gridDim.x * blockDim.x) {
        uint4 g = gate[i], u = up[i], o;
        o.x = pack_bf16x2(silu(bf_lo(g.x)) * bf_lo(u.x), silu(bf_hi(g.x)) * bf_hi(u.x));
        o.y = pack_bf16x2(silu(bf_lo(g.y)) * bf_lo(u.y), silu(bf_hi(g.y)) * bf_hi(u.y));
        o.z = pack_bf16x2(silu(bf_lo(g.z)) * bf_lo(u.z), silu(bf_hi(g.z)) * bf_hi(u.z));
        o.w = pack_bf16x2(silu(bf_lo(g.w)) * bf_lo(u.w), silu(bf_hi(g.w)) * bf_hi(u.w));
        gate[i] = o;
    }
}

extern "C" __global__ void add_assign(bf16* __restrict__ x, const bf16* __restrict__ y, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        x[i] = f2bf(bf2f(x[i]) + bf2f(y[i]));
}

extern "C" __global__ void add_assign_x8(uint4* __restrict__ x, const uint4* __restrict__ y, u64 n8) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n8; i += (u64)gridDim.x * blockDim.x) {
        uint4 a = x[i], b = y[i], o;
        o.x = pack_bf16x2(bf_lo(a.x) + bf_lo(b.x), bf_hi(a.x) + bf_hi(b.x));
        o.y = pack_bf16x2(bf_lo(a.y) + bf_lo(b.y), bf_hi(a.y) + bf_hi(b.y));
        o.z = pack_bf16x2(bf_lo(a.z) + bf_lo(b.z), bf_hi(a.z) + bf_hi(b.z));
        o.w = pack_bf16x2(bf_lo(a.w) + bf_lo(b.w), bf_hi(a.w) + bf_hi(b.w));
        x[i] = o;
    }
}

// f32 copy of bf16 values (logits to the host).
extern "C" __global__ void bf16_to_f32(const bf16* __restrict__ x, float* __restrict__ y, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        y[i] = bf2f(x[i]);
}

// n16 16-byte words from src to dst on the SMs (a device-to-device memcpy is a copy engine's
// work, and the copy engines also carry the streamed weights: see Cuda::copy_dtod).
extern "C" __global__ void copy_x16(const uint4* __restrict__ src, uint4* __restrict__ dst, u64 n16) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n16; i += (u64)gridDim.x * blockDim.x)
        dst[i] = src[i];
}
