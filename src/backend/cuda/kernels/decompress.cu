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

#define LUT_BITS 12
#define BLOCK_ELEMENTS (32 * 256)
// Sign-mantissa bytes a lane loads before decoding them: the loads of one round are in flight
// together, so a warp waits on memory once a round rather than once an element (a tensor of a
// few thousand blocks leaves too few warps on each SM to hide one DRAM latency per element).
// Measured against copying the block's bytes into shared memory first (4 warps a thread
// block): 1053 against 677 GB/s of bf16 out for a whole tensor (bench/NOTES.md).
#define ROUND 8

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
    // The table is 16-byte aligned in the slot (shares are placed on 256-byte boundaries).
    __shared__ __align__(16) unsigned short lut[1 << LUT_BITS];
    for (int i = threadIdx.x; i < (1 << LUT_BITS) / 8; i += blockDim.x)
        ((uint4*)lut)[i] = ((const uint4*)lut_g)[i];
    __syncthreads();

    const u64 b = (u64)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (b >= blocks) return;
    const u32 lane = threadIdx.x & 31;
    const u64 per = segment > BLOCK_ELEMENTS ? (segment + BLOCK_ELEMENTS - 1) / BLOCK_ELEMENTS : 1;
    const u64 seg_start = (b / per) * segment;
    const u64 start = seg_start + (b % per) * BLOCK_ELEMENTS;
    const u64 end = min(seg_start + segment, start + BLOCK_ELEMENTS);

    // A window of two words over the lane's bits and the word after them, loaded one move
    // ahead (codes are ≤ 12 bits: the window moves one word at most; the encoder pads two
    // words past every stream).
    u64 pos = starts[b * 32 + lane] - base_bit;
    u64 w = pos >> 5;
    u32 hi = words[w], lo = words[w + 1], next = words[w + 2];
    for (u64 first = start + lane; first < end; first += 32 * ROUND) {
        u32 s[ROUND];
#pragma unroll
        for (int r = 0; r < ROUND; r++) {
            const u64 e = first + 32 * r;
            s[r] = e < end ? sm[e] : 0u;
        }
#pragma unroll
        for (int r = 0; r < ROUND; r++) {
            const u64 e = first + 32 * r;
            if (e >= end) break;
            const u64 at = pos >> 5;
            if (at != w) {
                w = at;
                hi = lo;
                lo = next;
                next = words[w + 2];
            }
            const u64 window = (((u64)hi << 32) | lo) << (pos & 31);
            const unsigned short entry = lut[window >> (64 - LUT_BITS)];
            out[e] = (bf16)(((s[r] & 0x80u) << 8) | ((u32)(entry & 0xffu) << 7) | (s[r] & 0x7fu));
            pos += entry >> 8;
        }
    }
    (void)numel;
}
