// The elementwise and per-row ops of a diffusion transformer (DitOps): activations, column
// slices, LayerNorm without affine, per-sample modulation and gated residuals, RoPE on
// interleaved pairs. Values are bf16, math in f32, one rounding per result.
// Grid-stride loops: enough blocks of 256 threads to cover the items (capped by the caller).

__device__ __forceinline__ float act(float v, u32 op) {
    if (op == 0) return v / (1.f + __expf(-v));
    if (op == 1) return tanhf(v);
    // GELU, tanh approximation: 0.5 v (1 + tanh(sqrt(2/pi) (v + 0.044715 v^3))).
    return 0.5f * v * (1.f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
}

// x = f(x) over n values; op 0: SiLU, 1: tanh, 2: GELU (tanh approximation).
extern "C" __global__ void pointwise(bf16* __restrict__ x, u64 n, u32 op) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        x[i] = f2bf(act(bf2f(x[i]), op));
}

// dst [rows, width] = src[:, col0..col0+width] of src [rows, src_cols].
extern "C" __global__ void copy_cols(const bf16* __restrict__ src, bf16* __restrict__ dst, u32 rows,
                                     u32 src_cols, u32 col0, u32 width) {
    const u64 n = (u64)rows * width;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const u64 r = i / width, c = i % width;
        dst[i] = src[r * src_cols + col0 + c];
    }
}

// out = (x − mean) / sqrt(var + eps) per row of `width` (biased variance, as torch), two passes
// over the row in f32. grid: ceil(rows / 4), block: 128 (one warp per row).
extern "C" __global__ void layer_norm(const bf16* __restrict__ x, bf16* __restrict__ out, u32 rows,
                                      u32 width, float eps) {
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
    for (u32 i = lane; i < width; i += 32) ys[i] = f2bf((bf2f(xs[i]) - mean) * inv);
}

// x [n / cols, cols] = x · (1 + scale) + shift, scale and shift one row [cols] (shift may be
// null): adaptive modulation of one sample's rows.
extern "C" __global__ void modulate(bf16* __restrict__ x, const bf16* __restrict__ scale,
                                    const bf16* __restrict__ shift, u64 n, u32 cols) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const u32 c = i % cols;
        const float b = shift ? bf2f(shift[c]) : 0.f;
        x[i] = f2bf(bf2f(x[i]) * (1.f + bf2f(scale[c])) + b);
    }
}

// x [n / cols, cols] += gate · y, gate one row [cols]: a gated residual of one sample's rows.
extern "C" __global__ void add_gated(bf16* __restrict__ x, const bf16* __restrict__ gate,
                                     const bf16* __restrict__ y, u64 n, u32 cols) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        x[i] = f2bf(bf2f(x[i]) + bf2f(gate[i % cols]) * bf2f(y[i]));
}

// Rotate x [rows, cols] in place, every head of head_dim: pair (x[2i], x[2i+1]) of a head times
// (cos + i·sin) = (table[row, 2i], table[row, 2i+1]); table [rows, head_dim] f32.
extern "C" __global__ void rope_interleaved(bf16* __restrict__ x, const float* __restrict__ table,
                                            u32 rows, u32 cols, u32 head_dim) {
    const u64 pairs = (u64)rows * (cols / 2);
    const u32 row_pairs = cols / 2, head_pairs = head_dim / 2;
    u32* xp = (u32*)x;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < pairs; i += (u64)gridDim.x * blockDim.x) {
        const u64 row = i / row_pairs;
        const u32 j = (u32)(i % row_pairs) % head_pairs;
        const float c = table[row * head_dim + 2 * j], s = table[row * head_dim + 2 * j + 1];
        const u32 v = xp[i];
        const float a = bf_lo(v), b = bf_hi(v);
        xp[i] = pack_bf16x2(a * c - b * s, a * s + b * c);
    }
}
