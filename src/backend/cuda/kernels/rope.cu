// Rotary position embedding, rotate-half layout, in place on q [t, q_heads*head_dim] and
// k [t, k_heads*head_dim]: for each head, (a, b) = (x[i], x[i + half]) becomes
// (a·cos − b·sin, b·cos + a·sin) with angle (pos0 + row) · inv_freq[i]. The angle is the same
// f32 product the reference computes; cos/sin in f32 (accurate sincosf, not the fast one).
// grid: (t), block: 256; threads walk the (head, i) pairs of both tensors.
extern "C" __global__ void rope(bf16* __restrict__ q, bf16* __restrict__ k,
                                const float* __restrict__ inv_freq, u32 q_heads, u32 k_heads,
                                u32 head_dim, u32 pos0) {
    const u32 row = blockIdx.x, half = head_dim / 2;
    const float pos = (float)(pos0 + row);
    const u32 total = (q_heads + k_heads) * half;
    for (u32 j = threadIdx.x; j < total; j += blockDim.x) {
        u32 h = j / half, i = j % half;
        bf16* p = h < q_heads ? q + ((size_t)row * q_heads + h) * head_dim
                              : k + ((size_t)row * k_heads + (h - q_heads)) * head_dim;
        float s, c;
        sincosf(pos * inv_freq[i], &s, &c);
        float a = bf2f(p[i]), b = bf2f(p[i + half]);
        p[i] = f2bf(a * c - b * s);
        p[i + half] = f2bf(b * c + a * s);
    }
}
