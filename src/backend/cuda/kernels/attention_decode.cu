// Attention for a few query rows over the KV cache (decode), split over the sequence.
// HEAD_DIM is defined at compile time.
//
// q [t, heads*HEAD_DIM] holds positions pos0..pos0+t; the caches kc/vc [capacity,
// kv_heads*HEAD_DIM] hold keys/values for positions 0..pos0+t. Query row r (position
// pos0 + r) attends to keys max(0, pos+1-window)..=pos (window 0: no window); head h reads
// kv head h / (heads / kv_heads).
//
// attn_decode: grid (heads, t, splits), block 128 (4 warps). Block (h, r, s) covers keys
// [s*chunk, (s+1)*chunk); its warps take every 4th key; lane l holds dims l, l+32, …
// Scores are in the log2 domain (q is pre-scaled by scale·log2 e). With one split the block
// writes the output; otherwise it writes its partial (max, sum, unnormalized output) and
// attn_decode_combine merges the splits.

#define EPL ((HEAD_DIM + 31) / 32)  // dims per lane

extern "C" __global__ void __launch_bounds__(128)
attn_decode(const bf16* __restrict__ q, const bf16* __restrict__ kc, const bf16* __restrict__ vc,
            bf16* __restrict__ out, float* __restrict__ part_o, float* __restrict__ part_ml,
            u32 heads, u32 kv_heads, u32 pos0, u32 chunk, u32 window, float scale_log2) {
    const u32 h = blockIdx.x, r = blockIdx.y, s = blockIdx.z, splits = gridDim.z;
    const u32 warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const u32 pos = pos0 + r;
    const u32 first = (window != 0 && pos + 1 > window) ? pos + 1 - window : 0;
    const u32 lo = max(s * chunk, first), hi = min(s * chunk + chunk, pos + 1);
    const u32 kv_width = kv_heads * HEAD_DIM;
    const u32 kvh = h / (heads / kv_heads);

    float qr[EPL], acc[EPL];
    const bf16* qh = q + ((size_t)r * heads + h) * HEAD_DIM;
#pragma unroll
    for (int e = 0; e < EPL; ++e) {
        u32 d = lane + 32 * e;
        qr[e] = d < HEAD_DIM ? bf2f(qh[d]) * scale_log2 : 0.f;
        acc[e] = 0.f;
    }
    float m = NEG_INF, l = 0.f;
    for (u32 j = lo + warp; j < hi; j += 4) {
        const bf16* kr = kc + (size_t)j * kv_width + kvh * HEAD_DIM;
        const bf16* vr = vc + (size_t)j * kv_width + kvh * HEAD_DIM;
        float sc = 0.f;
#pragma unroll
        for (int e = 0; e < EPL; ++e) {
            u32 d = lane + 32 * e;
            if (d < HEAD_DIM) sc += qr[e] * bf2f(kr[d]);
        }
        sc = warp_sum(sc);
        float m_new = fmaxf(m, sc);
        float alpha = exp2f(m - m_new);  // 0 on the first key (m = -inf)
        float p = exp2f(sc - m_new);
        l = l * alpha + p;
#pragma unroll
        for (int e = 0; e < EPL; ++e) {
            u32 d = lane + 32 * e;
            float v = d < HEAD_DIM ? bf2f(vr[d]) : 0.f;
            acc[e] = acc[e] * alpha + p * v;
        }
        m = m_new;
    }

    // Merge the 4 warps.
    __shared__ float sm_m[4], sm_l[4];
    __shared__ float sm_acc[4][EPL * 32];
    if (lane == 0) { sm_m[warp] = m; sm_l[warp] = l; }
#pragma unroll
    for (int e = 0; e < EPL; ++e) sm_acc[warp][lane + 32 * e] = acc[e];
    __syncthreads();
    if (warp != 0) return;
    float M = fmaxf(fmaxf(sm_m[0], sm_m[1]), fmaxf(sm_m[2], sm_m[3]));
    float w[4], L = 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        w[i] = M == NEG_INF ? 0.f : exp2f(sm_m[i] - M);
        L += sm_l[i] * w[i];
    }
    const size_t part = ((size_t)r * heads + h) * splits + s;
#pragma unroll
    for (int e = 0; e < EPL; ++e) {
        u32 d = lane + 32 * e;
        if (d >= HEAD_DIM) continue;
        float a = 0.f;
#pragma unroll
        for (int i = 0; i < 4; ++i) a += sm_acc[i][d] * w[i];
        if (splits == 1)
            out[((size_t)r * heads + h) * HEAD_DIM + d] = f2bf(L > 0.f ? a / L : 0.f);
        else
            part_o[part * HEAD_DIM + d] = a;
    }
    if (splits > 1 && lane == 0) {
        part_ml[part * 2] = M;
        part_ml[part * 2 + 1] = L;
    }
}

// Merge the splits of attn_decode. grid (heads, t), block 128.
extern "C" __global__ void __launch_bounds__(128)
attn_decode_combine(const float* __restrict__ part_o, const float* __restrict__ part_ml,
                    bf16* __restrict__ out, u32 heads, u32 splits) {
    const u32 h = blockIdx.x, r = blockIdx.y;
    const size_t base = ((size_t)r * heads + h) * splits;
    float M = NEG_INF;
    for (u32 s = 0; s < splits; ++s) M = fmaxf(M, part_ml[(base + s) * 2]);
    float L = 0.f;
    for (u32 s = 0; s < splits; ++s) {
        float ms = part_ml[(base + s) * 2];
        if (ms != NEG_INF) L += part_ml[(base + s) * 2 + 1] * exp2f(ms - M);
    }
    for (u32 d = threadIdx.x; d < HEAD_DIM; d += blockDim.x) {
        float a = 0.f;
        for (u32 s = 0; s < splits; ++s) {
            float ms = part_ml[(base + s) * 2];
            if (ms != NEG_INF) a += part_o[(base + s) * HEAD_DIM + d] * exp2f(ms - M);
        }
        out[((size_t)r * heads + h) * HEAD_DIM + d] = f2bf(L > 0.f ? a / L : 0.f);
    }
}
