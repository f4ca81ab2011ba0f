// ggml blocks to bf16, on the device (the layouts are in src/checkpoint/quant.rs, whose
// dequantizers are ggml's; src/stream/blocks.rs streams the blocks). Each value is computed in
// f32 exactly as the CPU computes it — the same operations in the same order, each rounded
// (the _rn intrinsics: never contracted into a fused multiply-add) — then rounded to bf16 to
// nearest even, so the device holds bit for bit what the host would have converted.
//
// One thread writes 8 consecutive elements, all in one block (blocks hold 32 or 256), as one
// 16-byte store. grid: ceil(numel / 8 / 256) blocks of 256 threads.

#define Q8_0 8
#define Q4_0 2
#define Q4_1 3
#define Q5_0 6
#define Q5_1 7
#define Q4_K 12
#define Q5_K 13
#define Q6_K 14

__device__ __forceinline__ float h2f(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// Little-endian f16 at byte `at` of a block (blocks are only 2-byte aligned at best).
__device__ __forceinline__ float half_at(const unsigned char* b, int at) {
    return h2f((unsigned short)(b[at] | (b[at + 1] << 8)));
}

__device__ __forceinline__ u32 u32_at(const unsigned char* b, int at) {
    return (u32)b[at] | ((u32)b[at + 1] << 8) | ((u32)b[at + 2] << 16) | ((u32)b[at + 3] << 24);
}

// Scale and min of sub-block j (0..8) of a Q4_K/Q5_K block's 12 packed bytes `s`.
__device__ __forceinline__ void k_scale_min(int j, const unsigned char* s, float* sc, float* m) {
    if (j < 4) {
        *sc = (float)(s[j] & 63);
        *m = (float)(s[j + 4] & 63);
    } else {
        *sc = (float)((s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4));
        *m = (float)((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
    }
}

// Element e (0..block size) of block b of type `ty`.
__device__ __forceinline__ float element(u32 ty, const unsigned char* b, int e) {
    switch (ty) {
    case Q8_0:
        return __fmul_rn((float)(signed char)b[2 + e], half_at(b, 0));
    case Q4_0: {
        const int q = e < 16 ? (b[2 + e] & 0x0F) : (b[2 + e - 16] >> 4);
        return __fmul_rn((float)(q - 8), half_at(b, 0));
    }
    case Q4_1: {
        const int q = e < 16 ? (b[4 + e] & 0x0F) : (b[4 + e - 16] >> 4);
        return __fadd_rn(__fmul_rn((float)q, half_at(b, 0)), half_at(b, 2));
    }
    case Q5_0: {
        const u32 qh = u32_at(b, 2);
        const int q = (e < 16 ? (b[6 + e] & 0x0F) : (b[6 + e - 16] >> 4)) | (((qh >> e) & 1) << 4);
        return __fmul_rn((float)(q - 16), half_at(b, 0));
    }
    case Q5_1: {
        const u32 qh = u32_at(b, 4);
        const int q = (e < 16 ? (b[8 + e] & 0x0F) : (b[8 + e - 16] >> 4)) | (((qh >> e) & 1) << 4);
        return __fadd_rn(__fmul_rn((float)q, half_at(b, 0)), half_at(b, 2));
    }
    case Q4_K:
    case Q5_K: {
        // 4 chunks of 64: 32 bytes of qs each, low nibbles then high nibbles.
        const int chunk = e / 64, w = e % 64, l = w % 32, high = w >= 32;
        const unsigned char* qs = b + (ty == Q4_K ? 16 : 48) + 32 * chunk;
        int q = high ? (qs[l] >> 4) : (qs[l] & 0x0F);
        if (ty == Q5_K && (b[16 + l] & ((high ? 2 : 1) << (2 * chunk)))) q += 16;
        float sc, m;
        k_scale_min(2 * chunk + high, b + 4, &sc, &m);
        const float d = __fmul_rn(half_at(b, 0), sc), dm = __fmul_rn(half_at(b, 2), m);
        return __fsub_rn(__fmul_rn(d, (float)q), dm);
    }
    case Q6_K: {
        // Two halves of 128: 64 bytes of ql, 32 of qh, 8 scales each.
        const int n = e / 128, w = e % 128, l = w % 32, which = w / 32;
        const unsigned char* ql = b + 64 * n;
        const unsigned char qh = b[128 + 32 * n + l];
        const signed char* sc = (const signed char*)(b + 192 + 8 * n);
        const int lo = (which & 1) ? ql[l + 32] : ql[l];
        const int q = ((which < 2 ? lo & 0x0F : lo >> 4) | (((qh >> (2 * which)) & 3) << 4)) - 32;
        const float scale = __fmul_rn(half_at(b, 208), (float)sc[l / 16 + 2 * which]);
        return __fmul_rn(scale, (float)q);
    }
    }
    return 0.0f;
}

extern "C" __global__ void dequantize_bf16(
    const unsigned char* __restrict__ blocks,
    bf16* __restrict__ out,
    u64 numel,
    u32 ty,
    u32 block_elements,
    u32 block_bytes)
{
    const u64 first = ((u64)blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (first >= numel) return;
    const u64 blk = first / block_elements;
    const int e0 = (int)(first % block_elements);
    const unsigned char* b = blocks + blk * block_bytes;
    u32 packed[4];
#pragma unroll
    for (int k = 0; k < 4; k++) {
        const float lo = element(ty, b, e0 + 2 * k), hi = element(ty, b, e0 + 2 * k + 1);
        packed[k] = (u32)f2bf(lo) | ((u32)f2bf(hi) << 16);
    }
    uint4 v;
    v.x = packed[0];
    v.y = packed[1];
    v.z = packed[2];
    v.w = packed[3];
    *(uint4*)(out + first) = v;
}
