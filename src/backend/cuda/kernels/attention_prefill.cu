// Attention for a prompt (attn_prefill_*, causal) or a DiT's sequence (attn_full_*,
// non-causal), flash style: scores are never written to memory. Each block takes a tile of
// query rows of one head, walks the keys in tiles of BN = 64 and keeps a running max and sum
// per row (online softmax). Matrix products run on the tensor cores through
// mma.sync m16n8k16 (bf16 in, f32 accumulate); tiles come through shared memory with cp.async,
// two stages deep, so the next K/V tile loads while this one is used.
//
// Two variants with bit-identical outputs (attention.rs picks one, FERRY_ATTENTION):
//   v1: BM = 64 rows a block, 16 a warp, Q's fragments held in registers;
//   v2: BM2 = 128 rows a block, 32 a warp (see its header below), HEAD_DIM <= 128.
//
// HEAD_DIM (a multiple of 16) is defined at compile time.
// q [t, heads*HEAD_DIM] holds positions pos0..pos0+t; kc/vc [capacity, kv_heads*HEAD_DIM]
// hold keys/values for positions 0..pos0+t; out [t, heads*HEAD_DIM].
// Row r (position p = pos0 + r) attends keys max(0, p+1-window)..=p (window 0: no window).
//
// v1 grid: (ceil(t / 64), heads), block: 128 (4 warps × 16 rows),
// dynamic shared memory: (BM + 4·BN) · STRIDE · 2 bytes (Q, two stages of K and V).

#define BM 64
#define BN 64
#define STRIDE (HEAD_DIM + 8)  // row pitch in bf16: +16 bytes so ldmatrix rows hit distinct banks
#define CHUNKS (HEAD_DIM / 8)  // 16-byte pieces per row

__device__ __forceinline__ void cp_async16(u32 dst, const void* src, u32 src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldmatrix_x4(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}
// c += a · b for one 16×8 tile (a: 16×16 row-major fragment, b: 16×8 column fragment).
__device__ __forceinline__ void mma_bf16(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Copy `rows` rows (row stride `ld` elements) starting at src into a BN- or BM-row smem tile;
// rows at or past `valid` are zero-filled.
__device__ __forceinline__ void load_tile(bf16* tile, const bf16* src, u32 ld, u32 valid, u32 rows) {
    for (u32 c = threadIdx.x; c < rows * CHUNKS; c += 128) {
        u32 r = c / CHUNKS, col = (c % CHUNKS) * 8;
        bool ok = r < valid;
        const bf16* g = ok ? src + (size_t)r * ld + col : src;
        cp_async16(smem_addr(tile + r * STRIDE + col), g, ok ? 16 : 0);
    }
}

// The body of both kernels. CAUSAL: row r (position pos0 + r) attends the cached keys up to
// its own position within `window`; otherwise every row attends keys 0..n_keys.
template <bool CAUSAL>
__device__ __forceinline__ void attn_body(const bf16* __restrict__ q, const bf16* __restrict__ kc,
                                          const bf16* __restrict__ vc, bf16* __restrict__ out,
                                          u32 t, u32 heads, u32 kv_heads, u32 pos0, u32 window,
                                          u32 n_keys, float scale_log2) {
    extern __shared__ uint4 smem_raw[];
    bf16* sQ = (bf16*)smem_raw;
    bf16* sK = sQ + BM * STRIDE;       // 2 stages of BN rows
    bf16* sV = sK + 2 * BN * STRIDE;   // 2 stages of BN rows

    const u32 warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    // Causal: the heaviest blocks (last rows, most keys) start first.
    const u32 m0 = (CAUSAL ? gridDim.x - 1 - blockIdx.x : blockIdx.x) * BM;
    const u32 h = blockIdx.y, kvh = h / (heads / kv_heads);
    const u32 q_ld = heads * HEAD_DIM, kv_ld = kv_heads * HEAD_DIM;
    const u32 rows = min((u32)BM, t - m0);

    // Keys this block needs: causal, up to its last row's position from its first row's
    // window start; else all of them.
    const u32 p_first = pos0 + m0, p_last = pos0 + m0 + rows - 1;
    u32 k_begin = (CAUSAL && window != 0 && p_first + 1 > window) ? p_first + 1 - window : 0;
    k_begin = k_begin / BN * BN;
    const u32 k_end = CAUSAL ? p_last + 1 : n_keys;
    const u32 n_tiles = (k_end - k_begin + BN - 1) / BN;

    load_tile(sQ, q + (size_t)m0 * q_ld + h * HEAD_DIM, q_ld, rows, BM);
    cp_async_commit();
    const bf16* kbase = kc + (size_t)kvh * HEAD_DIM;
    const bf16* vbase = vc + (size_t)kvh * HEAD_DIM;
    load_tile(sK, kbase + (size_t)k_begin * kv_ld, kv_ld, k_end - k_begin, BN);
    load_tile(sV, vbase + (size_t)k_begin * kv_ld, kv_ld, k_end - k_begin, BN);
    cp_async_commit();
    cp_async_wait<1>();  // Q has landed
    __syncthreads();

    // This warp's 16 query rows as A fragments, one per 16 dims.
    u32 qf[HEAD_DIM / 16][4];
#pragma unroll
    for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
        u32 row = warp * 16 + (lane % 8) + 8 * ((lane / 8) % 2), col = kk * 16 + 8 * (lane / 16);
        ldmatrix_x4(smem_addr(sQ + row * STRIDE + col), qf[kk][0], qf[kk][1], qf[kk][2], qf[kk][3]);
    }

    float o[HEAD_DIM / 8][4];
#pragma unroll
    for (int i = 0; i < HEAD_DIM / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float row_m[2] = {NEG_INF, NEG_INF}, row_l[2] = {0.f, 0.f};
    // Positions of the two rows this thread holds (fragment rows g and g + 8).
    const u32 g = lane / 4, tq = lane % 4;
    const u32 pos_r[2] = {pos0 + m0 + warp * 16 + g, pos0 + m0 + warp * 16 + g + 8};

    for (u32 tile = 0; tile < n_tiles; ++tile) {
        const u32 stage = tile & 1;
        if (tile + 1 < n_tiles) {
            const u32 next = k_begin + (tile + 1) * BN;
            load_tile(sK + (stage ^ 1) * BN * STRIDE, kbase + (size_t)next * kv_ld, kv_ld, k_end - next, BN);
            load_tile(sV + (stage ^ 1) * BN * STRIDE, vbase + (size_t)next * kv_ld, kv_ld, k_end - next, BN);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const bf16* tK = sK + stage * BN * STRIDE;
        const bf16* tV = sV + stage * BN * STRIDE;
        const u32 key0 = k_begin + tile * BN;

        // S = Q Kᵀ for 16 rows × 64 keys: 8 tiles of 16×8.
        float s[BN / 8][4];
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
#pragma unroll
            for (int nn = 0; nn < BN / 16; ++nn) {
                u32 b0, b1, b2, b3;
                u32 row = nn * 16 + (lane % 8) + 8 * (lane / 16), col = kk * 16 + 8 * ((lane / 8) % 2);
                ldmatrix_x4(smem_addr(tK + row * STRIDE + col), b0, b1, b2, b3);
                mma_bf16(s[2 * nn], qf[kk], b0, b1);
                mma_bf16(s[2 * nn + 1], qf[kk], b2, b3);
            }
        }

        // Scale into the log2 domain; mask keys after the row (causal), outside its window,
        // or past the last key. Only tiles that touch a boundary need the test.
        const bool edge = CAUSAL ? key0 + BN - 1 > p_first || key0 + BN > k_end ||
                                       (window != 0 && key0 + window <= p_last)
                                 : key0 + BN > k_end;
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float v = s[j][e] * scale_log2;
                if (edge) {
                    u32 key = key0 + j * 8 + 2 * tq + (e & 1), p = pos_r[e >> 1];
                    if (CAUSAL ? key > p || (window != 0 && key + window <= p) : key >= k_end)
                        v = NEG_INF;
                }
                s[j][e] = v;
            }
        }

        // Online softmax for the thread's two rows; the 4 threads of a row share via shuffles.
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mx = NEG_INF;
#pragma unroll
            for (int j = 0; j < BN / 8; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * r], s[j][2 * r + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float m_new = fmaxf(row_m[r], mx);
            const float m_use = m_new == NEG_INF ? 0.f : m_new;  // a row with no key yet
            const float alpha = exp2f(row_m[r] - m_use);
            float sum = 0.f;
#pragma unroll
            for (int j = 0; j < BN / 8; ++j) {
                s[j][2 * r] = exp2f(s[j][2 * r] - m_use);
                s[j][2 * r + 1] = exp2f(s[j][2 * r + 1] - m_use);
                sum += s[j][2 * r] + s[j][2 * r + 1];
            }
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            row_l[r] = row_l[r] * alpha + sum;
            row_m[r] = m_new;
#pragma unroll
            for (int i = 0; i < HEAD_DIM / 8; ++i) {
                o[i][2 * r] *= alpha;
                o[i][2 * r + 1] *= alpha;
            }
        }

        // O += P V: the score tiles, rounded to bf16, are already A fragments.
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            u32 a[4];
            a[0] = pack_bf16x2(s[2 * kk][0], s[2 * kk][1]);
            a[1] = pack_bf16x2(s[2 * kk][2], s[2 * kk][3]);
            a[2] = pack_bf16x2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            a[3] = pack_bf16x2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int dd = 0; dd < HEAD_DIM / 16; ++dd) {
                u32 b0, b1, b2, b3;
                u32 row = kk * 16 + (lane % 8) + 8 * ((lane / 8) % 2), col = dd * 16 + 8 * (lane / 16);
                ldmatrix_x4_trans(smem_addr(tV + row * STRIDE + col), b0, b1, b2, b3);
                mma_bf16(o[2 * dd], a, b0, b1);
                mma_bf16(o[2 * dd + 1], a, b2, b3);
            }
        }
        __syncthreads();  // this stage is refilled two tiles from now
    }

    // out = O / l, two bf16 per store.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const u32 row = m0 + warp * 16 + g + 8 * r;
        if (row >= t) continue;
        const float inv = row_l[r] > 0.f ? 1.f / row_l[r] : 0.f;
        u32* dst = (u32*)(out + (size_t)row * q_ld + h * HEAD_DIM);
#pragma unroll
        for (int i = 0; i < HEAD_DIM / 8; ++i)
            dst[(i * 8 + 2 * tq) / 2] = pack_bf16x2(o[i][2 * r] * inv, o[i][2 * r + 1] * inv);
    }
}

extern "C" __global__ void __launch_bounds__(128)
attn_prefill_v1(const bf16* __restrict__ q, const bf16* __restrict__ kc, const bf16* __restrict__ vc,
                bf16* __restrict__ out, u32 t, u32 heads, u32 kv_heads, u32 pos0, u32 window,
                float scale_log2) {
    attn_body<true>(q, kc, vc, out, t, heads, kv_heads, pos0, window, 0, scale_log2);
}

// Non-causal attention of one sequence (a diffusion transformer's sample): q, k, v, out
// [t, heads*HEAD_DIM]; every row attends all t keys. Same grid, block and shared memory.
extern "C" __global__ void __launch_bounds__(128)
attn_full_v1(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
             bf16* __restrict__ out, u32 t, u32 heads, float scale_log2) {
    attn_body<false>(q, k, v, out, t, heads, heads, 0, 0, t, scale_log2);
}

// ---- v2: 128 query rows per block, 32 per warp ----------------------------------------------
//
// Each warp owns two m16 tiles of query rows, so every K or V fragment read from shared memory
// feeds two mma instead of one (shared-memory reads per mma: 0.31 ldmatrix.x4 against v1's
// 0.5), and each K/V tile comes from L2 once per 128 rows instead of once per 64. The output
// accumulator of 32 rows then takes 2 · HEAD_DIM / 2 registers a thread (128 at HEAD_DIM 128),
// so Q stays in shared memory and its fragments are read again at each 16-dim step instead of
// living in registers; HEAD_DIM 256 would not fit and keeps v1.
//
// Per row the arithmetic is v1's, so the outputs are bit-identical: the same key tiles of BN
// (tiles start at multiples of BN in both), in the same order, the same mma sequence into each
// accumulator, the same softmax expressions. A tile that lies wholly after a warp's rows or
// before all their windows is skipped by that warp; in v1 such a tile is an exact no-op (every
// score masked: alpha = 1 or the row still empty, p = 0). Likewise o *= alpha is skipped when
// every alpha of the warp is 1. One __syncthreads per tile: the next tile is loaded into the
// stage freed by the tile before, after the barrier that says every warp is done with it.
//
// grid: (ceil(t / 128), heads), block: 128 (4 warps × 32 rows),
// dynamic shared memory: (BM2 + 4·BN) · STRIDE · 2 bytes (Q, two stages of K and V);
// 104448 bytes at HEAD_DIM 128, two blocks to an SM.

#define BM2 128

#if HEAD_DIM <= 128
template <bool CAUSAL>
__device__ __forceinline__ void attn_body_v2(const bf16* __restrict__ q, const bf16* __restrict__ kc,
                                             const bf16* __restrict__ vc, bf16* __restrict__ out,
                                             u32 t, u32 heads, u32 kv_heads, u32 pos0, u32 window,
                                             u32 n_keys, float scale_log2) {
    extern __shared__ uint4 smem_raw[];
    bf16* sQ = (bf16*)smem_raw;
    bf16* sK = sQ + BM2 * STRIDE;      // 2 stages of BN rows
    bf16* sV = sK + 2 * BN * STRIDE;   // 2 stages of BN rows

    const u32 warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    // Causal: the heaviest blocks (last rows, most keys) start first.
    const u32 m0 = (CAUSAL ? gridDim.x - 1 - blockIdx.x : blockIdx.x) * BM2;
    const u32 h = blockIdx.y, kvh = h / (heads / kv_heads);
    const u32 q_ld = heads * HEAD_DIM, kv_ld = kv_heads * HEAD_DIM;
    const u32 rows = min((u32)BM2, t - m0);

    // Keys this block needs, as in v1.
    const u32 p_first = pos0 + m0, p_last = pos0 + m0 + rows - 1;
    u32 k_begin = (CAUSAL && window != 0 && p_first + 1 > window) ? p_first + 1 - window : 0;
    k_begin = k_begin / BN * BN;
    const u32 k_end = CAUSAL ? p_last + 1 : n_keys;
    const u32 n_tiles = (k_end - k_begin + BN - 1) / BN;

    // This warp's rows w_row0.. of the block, positions w_first..=w_last; idle when all of
    // them are past t (a short last block).
    const u32 w_row0 = warp * 32;
    const bool w_idle = w_row0 >= rows;
    const u32 w_first = p_first + w_row0, w_last = min(w_first + 31, p_last);

    load_tile(sQ, q + (size_t)m0 * q_ld + h * HEAD_DIM, q_ld, rows, BM2);
    const bf16* kbase = kc + (size_t)kvh * HEAD_DIM;
    const bf16* vbase = vc + (size_t)kvh * HEAD_DIM;
    load_tile(sK, kbase + (size_t)k_begin * kv_ld, kv_ld, k_end - k_begin, BN);
    load_tile(sV, vbase + (size_t)k_begin * kv_ld, kv_ld, k_end - k_begin, BN);
    cp_async_commit();

    // o[mt]: rows w_row0 + 16·mt .. +16 of the output, 16×8 tiles along HEAD_DIM.
    float o[2][HEAD_DIM / 8][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int i = 0; i < HEAD_DIM / 8; ++i) o[mt][i][0] = o[mt][i][1] = o[mt][i][2] = o[mt][i][3] = 0.f;
    float row_m[2][2] = {{NEG_INF, NEG_INF}, {NEG_INF, NEG_INF}};
    float row_l[2][2] = {{0.f, 0.f}, {0.f, 0.f}};
    // This thread holds rows g and g + 8 of each m16 tile.
    const u32 g = lane / 4, tq = lane % 4;

    for (u32 tile = 0; tile < n_tiles; ++tile) {
        const u32 stage = tile & 1;
        cp_async_wait<0>();  // this thread's copies of the tile (and of Q) have landed
        __syncthreads();     // everyone's have; every warp is done with the tile before
        if (tile + 1 < n_tiles) {
            const u32 next = k_begin + (tile + 1) * BN;
            load_tile(sK + (stage ^ 1) * BN * STRIDE, kbase + (size_t)next * kv_ld, kv_ld, k_end - next, BN);
            load_tile(sV + (stage ^ 1) * BN * STRIDE, vbase + (size_t)next * kv_ld, kv_ld, k_end - next, BN);
            cp_async_commit();
        }
        const bf16* tK = sK + stage * BN * STRIDE;
        const bf16* tV = sV + stage * BN * STRIDE;
        const u32 key0 = k_begin + tile * BN;
        if (w_idle) continue;
        // Every key after every row of the warp, or before all their windows: a no-op.
        if (CAUSAL && (key0 > w_last || (window != 0 && key0 + BN - 1 + window <= w_first))) continue;

        // S = Q Kᵀ for 32 rows × 64 keys: 2 × 8 tiles of 16×8. Each K fragment feeds both
        // row tiles; each accumulator sums over kk in v1's order.
        float s[2][BN / 8][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
            for (int j = 0; j < BN / 8; ++j) s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
            u32 qf[2][4];
#pragma unroll
            for (int mt = 0; mt < 2; ++mt) {
                u32 row = w_row0 + mt * 16 + (lane % 8) + 8 * ((lane / 8) % 2), col = kk * 16 + 8 * (lane / 16);
                ldmatrix_x4(smem_addr(sQ + row * STRIDE + col), qf[mt][0], qf[mt][1], qf[mt][2], qf[mt][3]);
            }
#pragma unroll
            for (int nn = 0; nn < BN / 16; ++nn) {
                u32 b0, b1, b2, b3;
                u32 row = nn * 16 + (lane % 8) + 8 * (lane / 16), col = kk * 16 + 8 * ((lane / 8) % 2);
                ldmatrix_x4(smem_addr(tK + row * STRIDE + col), b0, b1, b2, b3);
#pragma unroll
                for (int mt = 0; mt < 2; ++mt) {
                    mma_bf16(s[mt][2 * nn], qf[mt], b0, b1);
                    mma_bf16(s[mt][2 * nn + 1], qf[mt], b2, b3);
                }
            }
        }

        // Scale into the log2 domain and mask, as in v1; only tiles that touch a boundary of
        // this warp's rows need the test (the mask itself is per row, so the values are v1's).
        const bool edge = CAUSAL ? key0 + BN - 1 > w_first || (window != 0 && key0 + window <= w_last)
                                 : key0 + BN > k_end;
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
            for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    float v = s[mt][j][e] * scale_log2;
                    if (edge) {
                        u32 key = key0 + j * 8 + 2 * tq + (e & 1), p = w_first + mt * 16 + g + 8 * (e >> 1);
                        if (CAUSAL ? key > p || (window != 0 && key + window <= p) : key >= k_end)
                            v = NEG_INF;
                    }
                    s[mt][j][e] = v;
                }
            }
        }

        // Online softmax for the thread's four rows, v1's expressions.
        float alpha[2][2];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                float mx = NEG_INF;
#pragma unroll
                for (int j = 0; j < BN / 8; ++j) mx = fmaxf(mx, fmaxf(s[mt][j][2 * r], s[mt][j][2 * r + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                const float m_new = fmaxf(row_m[mt][r], mx);
                const float m_use = m_new == NEG_INF ? 0.f : m_new;  // a row with no key yet
                alpha[mt][r] = exp2f(row_m[mt][r] - m_use);
                float sum = 0.f;
#pragma unroll
                for (int j = 0; j < BN / 8; ++j) {
                    s[mt][j][2 * r] = exp2f(s[mt][j][2 * r] - m_use);
                    s[mt][j][2 * r + 1] = exp2f(s[mt][j][2 * r + 1] - m_use);
                    sum += s[mt][j][2 * r] + s[mt][j][2 * r + 1];
                }
                sum += __shfl_xor_sync(0xffffffffu, sum, 1);
                sum += __shfl_xor_sync(0xffffffffu, sum, 2);
                row_l[mt][r] = row_l[mt][r] * alpha[mt][r] + sum;
                row_m[mt][r] = m_new;
            }
        }
        // Once the running maxima settle, most tiles leave every alpha at exactly 1.
        const bool rescale = alpha[0][0] != 1.f || alpha[0][1] != 1.f || alpha[1][0] != 1.f || alpha[1][1] != 1.f;
        if (__any_sync(0xffffffffu, rescale)) {
#pragma unroll
            for (int mt = 0; mt < 2; ++mt)
#pragma unroll
                for (int i = 0; i < HEAD_DIM / 8; ++i) {
                    o[mt][i][0] *= alpha[mt][0];
                    o[mt][i][1] *= alpha[mt][0];
                    o[mt][i][2] *= alpha[mt][1];
                    o[mt][i][3] *= alpha[mt][1];
                }
        }

        // O += P V; each V fragment feeds both row tiles.
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            u32 a[2][4];
#pragma unroll
            for (int mt = 0; mt < 2; ++mt) {
                a[mt][0] = pack_bf16x2(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                a[mt][1] = pack_bf16x2(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                a[mt][2] = pack_bf16x2(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                a[mt][3] = pack_bf16x2(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
            }
#pragma unroll
            for (int dd = 0; dd < HEAD_DIM / 16; ++dd) {
                u32 b0, b1, b2, b3;
                u32 row = kk * 16 + (lane % 8) + 8 * ((lane / 8) % 2), col = dd * 16 + 8 * (lane / 16);
                ldmatrix_x4_trans(smem_addr(tV + row * STRIDE + col), b0, b1, b2, b3);
#pragma unroll
                for (int mt = 0; mt < 2; ++mt) {
                    mma_bf16(o[mt][2 * dd], a[mt], b0, b1);
                    mma_bf16(o[mt][2 * dd + 1], a[mt], b2, b3);
                }
            }
        }
    }

    // out = O / l, two bf16 per store.
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const u32 row = m0 + w_row0 + mt * 16 + g + 8 * r;
            if (row >= t) continue;
            const float inv = row_l[mt][r] > 0.f ? 1.f / row_l[mt][r] : 0.f;
            u32* dst = (u32*)(out + (size_t)row * q_ld + h * HEAD_DIM);
#pragma unroll
            for (int i = 0; i < HEAD_DIM / 8; ++i)
                dst[(i * 8 + 2 * tq) / 2] = pack_bf16x2(o[mt][i][2 * r] * inv, o[mt][i][2 * r + 1] * inv);
        }
    }
}

// Two blocks to an SM: 104448 bytes of shared memory each at HEAD_DIM 128, and up to 255
// registers a thread.
extern "C" __global__ void __launch_bounds__(128, 2)
attn_prefill_v2(const bf16* __restrict__ q, const bf16* __restrict__ kc, const bf16* __restrict__ vc,
                bf16* __restrict__ out, u32 t, u32 heads, u32 kv_heads, u32 pos0, u32 window,
                float scale_log2) {
    attn_body_v2<true>(q, kc, vc, out, t, heads, kv_heads, pos0, window, 0, scale_log2);
}

extern "C" __global__ void __launch_bounds__(128, 2)
attn_full_v2(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
             bf16* __restrict__ out, u32 t, u32 heads, float scale_log2) {
    attn_body_v2<false>(q, k, v, out, t, heads, heads, 0, 0, t, scale_log2);
}
#endif
