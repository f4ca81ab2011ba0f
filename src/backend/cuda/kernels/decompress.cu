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
// grid: ceil(blocks / 8) blocks of 256 threads (8 warps); shared: the 8 KiB table.
//
// A lane's position is a word pointer and a 5-bit offset, its 12-bit window one funnel shift,
// and a round has no bounds checks where the lane has a whole round left: 7–22 % faster than
// the kernel before (64-bit positions, a check an element) on an H100; bench/NOTES.md also has
// the variants tried and dropped (16 bytes a round; the next round's bytes loaded ahead).

#define LUT_BITS 12
#define BLOCK_ELEMENTS (32 * 256)
// Sign-mantissa bytes a lane loads before decoding them: the loads of one round are in flight
// together, so a warp waits on memory once a round rather than once an element (a tensor of a
// few thousand blocks leaves too few warps on each SM to hide one DRAM latency per element).
// Measured against copying the block's bytes into shared memory first (4 warps a thread
// block): 1053 against 677 GB/s of bf16 out for a whole tensor (bench/NOTES.md).
#define ROUND 8

// The table, copied to shared memory by the whole thread block.
__device__ __forceinline__ void load_lut(unsigned short* lut, const unsigned short* __restrict__ lut_g) {
    for (int i = threadIdx.x; i < (1 << LUT_BITS) / 8; i += blockDim.x)
        ((uint4*)lut)[i] = ((const uint4*)lut_g)[i];
    __syncthreads();
}

// One lane's bit stream: `wp` points at the word holding the next code, `off` (0..31) is the
// code's first bit in it; `hi`, `lo` are that word and the one after, `next` the one after
// those, loaded one move ahead.
struct Bits {
    const u32* wp;
    u32 off, hi, lo, next;
};

// Decode one exponent, move past its code, and return the bf16 of sign-mantissa byte `s`.
__device__ __forceinline__ bf16 take(Bits& b, const unsigned short* lut, u32 s) {
    const u32 top = __funnelshift_l(b.lo, b.hi, b.off);
    const u32 entry = lut[top >> (32 - LUT_BITS)];
    b.off += entry >> 8;
    if (b.off >= 32) {
        b.off -= 32;
        b.hi = b.lo;
        b.lo = b.next;
        b.wp++;
        b.next = b.wp[2];
    }
    return (bf16)(((s & 0x80u) << 8) | ((entry & 0xffu) << 7) | (s & 0x7fu));
}

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
    __shared__ __align__(16) unsigned short lut[1 << LUT_BITS];
    load_lut(lut, lut_g);

    const u64 blk = (u64)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (blk >= blocks) return;
    const u32 lane = threadIdx.x & 31;
    const u64 per = segment > BLOCK_ELEMENTS ? (segment + BLOCK_ELEMENTS - 1) / BLOCK_ELEMENTS : 1;
    const u64 seg_start = (blk / per) * segment;
    const u64 start = seg_start + (blk % per) * BLOCK_ELEMENTS;
    const u32 len = (u32)(min(seg_start + segment, start + BLOCK_ELEMENTS) - start);
    // Elements this lane owns: lane, lane + 32, … below len.
    const u32 mine = lane < len ? (len - lane + 31) / 32 : 0;

    // Starts are 32-bit bit offsets from the share's first word (the encoder keeps a share's
    // bits below 2^32), so the position fits a word index and an offset.
    const u32 pos = starts[blk * 32 + lane] - base_bit;
    Bits b;
    b.wp = words + (pos >> 5);
    b.off = pos & 31;
    b.hi = b.wp[0];
    b.lo = b.wp[1];
    b.next = b.wp[2];
    const unsigned char* sp = sm + start + lane;
    bf16* op = out + start + lane;
    u32 i = 0;
    for (; i + ROUND <= mine; i += ROUND, sp += 32 * ROUND, op += 32 * ROUND) {
        u32 s[ROUND];
#pragma unroll
        for (int r = 0; r < ROUND; r++) s[r] = sp[32 * r];
#pragma unroll
        for (int r = 0; r < ROUND; r++) op[32 * r] = take(b, lut, s[r]);
    }
    for (; i < mine; i++, sp += 32, op += 32) *op = take(b, lut, *sp);
    (void)numel;
}
