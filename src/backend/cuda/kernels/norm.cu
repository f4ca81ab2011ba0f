// RMSNorm: y = x / sqrt(mean(x²) + eps) * w over each segment of `width` elements. A row of
// the hidden state is one segment; for q/k norm each head of a row is one (width = head_dim).
// Sums in f32; the result is rounded to bf16 once.
// grid: ceil(segments / 4), block: 128 (one warp per segment); width is even.
extern "C" __global__ void rms_norm(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                    bf16* __restrict__ out, u32 segments, u32 width, float eps) {
    const u32 seg = blockIdx.x * 4 + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (seg >= segments) return;
    const u32* xs = (const u32*)(x + (size_t)seg * width);
    const u32* ws = (const u32*)w;
    u32* ys = (u32*)(out + (size_t)seg * width);
    const u32 pairs = width / 2;
    float ss = 0.f;
    for (u32 i = lane; i < pairs; i += 32) {
        u32 v = xs[i];
        float a = bf_lo(v), b = bf_hi(v);
        ss += a * a + b * b;
    }
    ss = warp_sum(ss);
    const float scale = rsqrtf(ss / (float)width + eps);
    for (u32 i = lane; i < pairs; i += 32) {
        u32 v = xs[i], g = ws[i];
        ys[i] = pack_bf16x2(bf_lo(v) * scale * bf_lo(g), bf_hi(v) * scale * bf_hi(g));
    }
}
