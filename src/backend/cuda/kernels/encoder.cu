// The ops of the text encoders (EncoderOps): LayerNorm with weight and bias, quick-GELU, GELU
// (tanh approximation) on gated pairs, and T5's attention: unscaled scores plus a per-head
// bias by relative position. Values are bf16, math in f32, one rounding per result.

// out = (x − mean) / sqrt(var + eps) · w + b per row of `width` (biased variance, as torch), two
// passes over the row in f32. grid: ceil(rows / 4), block: 128 (one warp per row).
extern "C" __global__ void layer_norm_affine(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                             const bf16* __restrict__ b, bf16* __restrict__ out,
                                             u32 rows, u32 width, float eps) {
    const u32 row = blockIdx.x * 4 + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    const bf16* xs = x + (size_t)row * width;
    bf16* ys = out + (size_t)row * width;
    float sum = 0.f;
    for (u32 i = lane; i < width; i += 32) sum += bf2f(xs[i]);
    const float mean = warp_sum(sum) / (float)width;
    float ss = 0.f;
    for (u32 i = lane; i < width; i += 32) {
        const float d = bf2f(xs[i]) - mean;
        ss += d * d;
    }
    const float inv = rsqrtf(warp_sum(ss) / (float)width + eps);
    for (u32 i = lane; i < width; i += 32)
        ys[i] = f2bf((bf2f(xs[i]) - mean) * inv * bf2f(w[i]) + bf2f(b[i]));
}

// x = x · sigmoid(1.702 x) over n values. Grid-stride, 256 threads a block.
extern "C" __global__ void quick_gelu(bf16* __restrict__ x, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const float v = bf2f(x[i]);
        x[i] = f2bf(v / (1.f + expf(-1.702f * v)));
    }
}

// gate = gelu_tanh(gate) · up over n values. Grid-stride, 256 threads a block.
extern "C" __global__ void gelu_tanh_mul(bf16* __restrict__ gate, const bf16* __restrict__ up, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const float v = bf2f(gate[i]);
        const float g = 0.5f * v * (1.f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
        gate[i] = f2bf(g * bf2f(up[i]));
    }
}

// Most head dims a lane holds in registers: head_dim ≤ 32 · MAX_PER_LANE.
#define MAX_PER_LANE 8

// T5 attention of one sample: out[i, h] = softmax_j(q_i · k_j + bias[j − i + span − 1, h]) · v_j
// over the sample's `rows` rows (q, k, v, out point at its first row; bias [2·span − 1, heads] at
// its start), no scaling, an online softmax in f32. One warp per (query row, head), each lane
// holding head dims lane, lane + 32, …
// grid: (ceil(rows / 4), heads), block: 128.
extern "C" __global__ void attn_biased(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                       const bf16* __restrict__ v, const bf16* __restrict__ bias,
                                       bf16* __restrict__ out, u32 rows, u32 heads, u32 head_dim,
                                       u32 span) {
    const u32 i = blockIdx.x * 4 + threadIdx.x / 32, lane = threadIdx.x % 32, h = blockIdx.y;
    if (i >= rows) return;
    const size_t width = (size_t)heads * head_dim;
    const size_t col = (size_t)h * head_dim;
    float qr[MAX_PER_LANE], acc[MAX_PER_LANE];
#pragma unroll
    for (u32 e = 0; e < MAX_PER_LANE; e++) {
        const u32 d = lane + 32 * e;
        qr[e] = d < head_dim ? bf2f(q[i * width + col + d]) : 0.f;
        acc[e] = 0.f;
    }
    float m = NEG_INF, l = 0.f;
    for (u32 j = 0; j < rows; j++) {
        const bf16* kj = k + j * width + col;
        float s = 0.f;
#pragma unroll
        for (u32 e = 0; e < MAX_PER_LANE; e++) {
            const u32 d = lane + 32 * e;
            if (d < head_dim) s += qr[e] * bf2f(kj[d]);
        }
        s = warp_sum(s) + bf2f(bias[(size_t)(j + span - 1 - i) * heads + h]);
        const float m2 = fmaxf(m, s);
        const float c = expf(m - m2), p = expf(s - m2);
        l = l * c + p;
        const bf16* vj = v + j * width + col;
#pragma unroll
        for (u32 e = 0; e < MAX_PER_LANE; e++) {
            const u32 d = lane + 32 * e;
            if (d < head_dim) acc[e] = acc[e] * c + p * bf2f(vj[d]);
        }
        m = m2;
    }
    const float inv = 1.f / l;
#pragma unroll
    for (u32 e = 0; e < MAX_PER_LANE; e++) {
        const u32 d = lane + 32 * e;
        if (d < head_dim) out[i * width + col + d] = f2bf(acc[e] * inv);
    }
}
