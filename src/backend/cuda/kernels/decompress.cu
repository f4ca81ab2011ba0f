// Lossless bf16 decompression (the codec is src/stream/compress.rs; its `decode` is the CPU
// twin of this kernel, step for step). A weight's sign and mantissa are one raw byte; its
// exponent is a prefix code of at most 12 bits, decoded by one lookup in a 4096-entry table
// (entry = symbol | length << 8).
//
// A share is cut into segments (rows, or the whole tensor), each into blocks of up to
// 32 × 256 elements. One warp decodes one block: lane k owns the block's elements k, k + 32,
// k + 64, … and reads its own bit stream from `starts[block * 32 + k] - base_bit`, so at each
// step the warp reads 32 consecutive sign-mantissa bytes and writes 32 consecutive bf16.
//
// The warp first copies its block's sign-mantissa bytes into shared memory in 16-byte loads,
// all in flight together, then decodes from there: the decoding waits on memory once a block
// rather than once an element (a tensor of a few thousand blocks leaves too few warps on each
// SM to hide one DRAM latency per element).
//
// grid: ceil(blocks / 4) blocks of 128 threads (4 warps); shared: the 8 KiB table and
// 4 × 8 KiB of sign-mantissa bytes.

#define LUT_BITS 12
#define BLOCK_ELEMENTS (32 * 256)
#define WARPS 4
// 16-byte loads a lane keeps in flight.
#define LOADS 16

extern "C" __global__ void decompress_bf16(
    const unsigned short* __restrict__ lut_g,
    const u32* __restrict__ starts,
    const unsigned char* __restrict__ sm,
    const u32* __restrict__ words,
    bf16* __restrict__ out,
    u64 numel,
    u64 segment,
    u32 base_bit,
    u64 blocks)
{
    // The table and the bytes are 16-byte aligned in the slot (shares are placed on 256-byte
    // boundaries).
    __shared__ __align__(16) unsigned short lut[1 << LUT_BITS];
    __shared__ __align__(16) unsigned char bytes[WARPS][BLOCK_ELEMENTS + 16];
    for (int i = threadIdx.x; i < (1 << LUT_BITS) / 8; i += blockDim.x)
        ((uint4*)lut)[i] = ((const uint4*)lut_g)[i];
    __syncthreads();

    const u32 warp = threadIdx.x / 32, lane = threadIdx.x & 31;
    const u64 b = (u64)blockIdx.x * WARPS + warp;
    if (b >= blocks) return;
    const u64 per = segment > BLOCK_ELEMENTS ? (segment + BLOCK_ELEMENTS - 1) / BLOCK_ELEMENTS : 1;
    const u64 seg_start = (b / per) * segment;
    const u64 start = seg_start + (b % per) * BLOCK_ELEMENTS;
    const u64 end = min(seg_start + segment, start + BLOCK_ELEMENTS);

    // The block's bytes, from the 16-byte boundary at or before its first (the slot holds
    // the share's later parts after these bytes, so reading on to the next boundary stays in
    // it).
    const u64 first = start & ~(u64)15;
    const u32 chunks = (u32)(((end + 15) & ~(u64)15) - first) / 16;
    const uint4* src = (const uint4*)(sm + first);
    uint4* dst = (uint4*)bytes[warp];
    for (u32 at = 0; at < chunks; at += 32 * LOADS) {
        uint4 v[LOADS];
#pragma unroll
        for (int k = 0; k < LOADS; k++) {
            const u32 i = at + lane + 32 * k;
            if (i < chunks) v[k] = src[i];
        }
#pragma unroll
        for (int k = 0; k < LOADS; k++) {
            const u32 i = at + lane + 32 * k;
            if (i < chunks) dst[i] = v[k];
        }
    }
    __syncwarp();
    const unsigned char* mine = bytes[warp] + (start - first);

    // A window of two words over the lane's bits and the word after them, loaded one move
    // ahead (codes are ≤ 12 bits: the window moves one word at most; the encoder pads two
    // words past every stream).
    u64 pos = starts[b * 32 + lane] - base_bit;
    u64 w = pos >> 5;
    u32 hi = words[w], lo = words[w + 1], next = words[w + 2];
    for (u64 e = start + lane; e < end; e += 32) {
        const u64 at = pos >> 5;
        if (at != w) {
            w = at;
            hi = lo;
            lo = next;
            next = words[w + 2];
        }
        const u64 window = (((u64)hi << 32) | lo) << (pos & 31);
        const unsigned short entry = lut[window >> (64 - LUT_BITS)];
        const u32 s = mine[e - start];
        out[e] = (bf16)(((s & 0x80u) << 8) | ((u32)(entry & 0xffu) << 7) | (s & 0x7fu));
        pos += entry >> 8;
    }
    (void)numel;
}
