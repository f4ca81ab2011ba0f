// Image ops of a convolutional model (the VAE decoder) on channels-last activations: an image
// is [h·w, c] bf16, position-major. Convolutions are GEMMs over im2col rows; these kernels do
// the rest. Math in f32, one rounding per result. Grid-stride loops of 256-thread blocks
// unless a launch says otherwise.

// cols [rows, 9·c] for positions p0..p0+rows of x [h·w, c]: row r holds, for (ky, kx) in
// row-major order over the 3×3 window, the c channels of x at (y + ky − 1, x + kx − 1), zero
// outside the image (the filter is stored [out, ky, kx, in] to match).
extern "C" __global__ void im2col3x3(const bf16* __restrict__ x, bf16* __restrict__ cols, u32 h,
                                     u32 w, u32 c, u32 p0, u32 rows) {
    const u64 n = (u64)rows * 9 * c;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const u32 ch = i % c;
        const u32 tap = (i / c) % 9;
        const u32 p = p0 + (u32)(i / ((u64)9 * c));
        const int yy = (int)(p / w) + (int)(tap / 3) - 1, xx = (int)(p % w) + (int)(tap % 3) - 1;
        const bool in = yy >= 0 && yy < (int)h && xx >= 0 && xx < (int)w;
        cols[i] = in ? x[((u64)yy * w + xx) * c + ch] : (bf16)0;
    }
}

// Per-group sums for GroupNorm of x [n_pos, c] in `groups` groups of consecutive channels:
// stats[2g] += Σ x, stats[2g+1] += Σ x² over the group's channels and all positions (f64
// atomics; stats zeroed by the caller). grid: (blocks over positions, groups), block: 256.
extern "C" __global__ void group_stats(const bf16* __restrict__ x, double* __restrict__ stats,
                                       u32 n_pos, u32 c, u32 groups) {
    const u32 g = blockIdx.y, per = c / groups;
    const u64 n = (u64)n_pos * per;
    float s = 0.f, ss = 0.f;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const float v = bf2f(x[(i / per) * c + g * per + i % per]);
        s += v;
        ss += v * v;
    }
    s = warp_sum(s);
    ss = warp_sum(ss);
    if (threadIdx.x % 32 == 0) {
        atomicAdd(&stats[2 * g], (double)s);
        atomicAdd(&stats[2 * g + 1], (double)ss);
    }
}

// y = (x − mean_g) / sqrt(var_g + eps) · scale[c] + shift[c] from the sums of group_stats.
extern "C" __global__ void group_apply(const bf16* __restrict__ x, bf16* __restrict__ y,
                                       const double* __restrict__ stats,
                                       const bf16* __restrict__ scale, const bf16* __restrict__ shift,
                                       u32 n_pos, u32 c, u32 groups, float eps) {
    const u64 n = (u64)n_pos * c;
    const u32 per = c / groups;
    const double count = (double)n_pos * per;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const u32 ch = i % c, g = ch / per;
        const double mean = stats[2 * g] / count;
        const double var = fmax(stats[2 * g + 1] / count - mean * mean, 0.0);
        const float inv = rsqrtf((float)var + eps);
        y[i] = f2bf((bf2f(x[i]) - (float)mean) * inv * bf2f(scale[ch]) + bf2f(shift[ch]));
    }
}

// y [2h·2w, c] = x [h·w, c] repeated 2×2: y(Y, X) = x(Y/2, X/2).
extern "C" __global__ void upsample2x(const bf16* __restrict__ x, bf16* __restrict__ y, u32 h,
                                      u32 w, u32 c) {
    const u64 n = (u64)4 * h * w * c;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const u32 ch = i % c;
        const u64 p = i / c;
        const u32 Y = (u32)(p / (2 * w)), X = (u32)(p % (2 * w));
        y[i] = x[((u64)(Y / 2) * w + X / 2) * c + ch];
    }
}

// y [cols, rows] = xᵀ for x [rows, cols].
extern "C" __global__ void transpose(const bf16* __restrict__ x, bf16* __restrict__ y, u32 rows,
                                     u32 cols) {
    const u64 n = (u64)rows * cols;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const u64 r = i / cols, col = i % cols;
        y[col * rows + r] = x[i];
    }
}

// Softmax of each row of s [rows, n] scaled by `scale`, in place (f32 math).
// grid: rows, block: 256.
extern "C" __global__ void softmax_rows(bf16* __restrict__ s, u32 n, float scale) {
    bf16* row = s + (u64)blockIdx.x * n;
    __shared__ float red[8];
    float m = NEG_INF;
    for (u32 j = threadIdx.x; j < n; j += blockDim.x) m = fmaxf(m, bf2f(row[j]) * scale);
    m = warp_max(m);
    if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = m;
    __syncthreads();
    m = red[0];
    for (int k = 1; k < 8; ++k) m = fmaxf(m, red[k]);
    __syncthreads();
    float sum = 0.f;
    for (u32 j = threadIdx.x; j < n; j += blockDim.x) sum += __expf(bf2f(row[j]) * scale - m);
    sum = warp_sum(sum);
    if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = sum;
    __syncthreads();
    sum = 0.f;
    for (int k = 0; k < 8; ++k) sum += red[k];
    const float inv = 1.f / sum;
    for (u32 j = threadIdx.x; j < n; j += blockDim.x) row[j] = f2bf(__expf(bf2f(row[j]) * scale - m) * inv);
}
