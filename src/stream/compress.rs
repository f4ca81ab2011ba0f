//! Lossless compression of bf16 weights for streaming: fewer bytes cross the link, and the
//! device turns them back into the exact bf16 bits before the group computes.
//!
//! Why this code: a bf16 weight is sign (1 bit), exponent (8), mantissa (7). Sign and mantissa
//! are close to uniform noise; the exponent of trained or normally drawn weights carries about
//! 2.6 bits of information (DFloat11, 2025). So each weight keeps its sign and mantissa as one
//! raw byte, and its exponent is Huffman coded with a code made for its tensor: about 10.8
//! bits instead of 16 (0.67–0.68 of bf16 on normal weights). Codes are limited to
//! [`MAX_CODE_BITS`] bits so that one table lookup decodes a symbol. A fixed-length code
//! (3 bits for the seven commonest exponents plus an escape) was the alternative: simpler to
//! decode but about 0.71 of bf16 with the escapes, against 0.68 here; decoding is far from
//! the bottleneck either way (see bench/NOTES.md).
//!
//! Layout, for decoding in parallel: a tensor is a sequence of *segments* (one row when the
//! tensor may stream in blocks of rows, else the whole tensor), each cut into *blocks* of up
//! to `LANES × LANE_ELEMENTS` elements. Lane `k` of a block owns the block's elements `k`,
//! `k + 32`, `k + 64`, …, and has its own bit stream, whose start is stored: on the GPU a
//! block is one warp, each lane decodes its stream sequentially, and at each step the warp
//! reads 32 consecutive sign-mantissa bytes and writes 32 consecutive bf16 values.
//!
//! An encoded tensor lives in one page-aligned anonymous mapping (so that it can be
//! registered with the driver like a checkpoint's file):
//! `[lookup table: 2^MAX_CODE_BITS × u16][lane starts: u32 per lane][sign-mantissa: u8 per
//! element][exponent bits: u32 words, most significant bit first, two words of padding]`.

use std::ops::Range;
use std::sync::Arc;

use half::bf16;
use rayon::prelude::*;

use super::blocks::{BlockDecode, BlockTensor};
use crate::checkpoint::{DType, HostTensor, Storage};
use crate::error::{Error, Result};

/// Longest exponent code, bits: the lookup table has `2^MAX_CODE_BITS` entries.
pub const MAX_CODE_BITS: u32 = 12;
/// Lanes of a block (a warp).
pub const LANES: usize = 32;
/// Most elements a lane decodes in one block.
pub const LANE_ELEMENTS: usize = 256;
/// Most elements of a block.
pub const BLOCK: usize = LANES * LANE_ELEMENTS;
/// Bytes of the lookup table: one u16 per `MAX_CODE_BITS`-bit prefix, `symbol | length << 8`.
pub const LUT_BYTES: usize = 2 << MAX_CODE_BITS;
/// Words read past a lane's last code by the decoder's two-word window.
pub const PAD_WORDS: usize = 2;

/// A canonical prefix code for the 256 exponent values, no code longer than
/// [`MAX_CODE_BITS`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExponentCode {
    /// Bits of each symbol's code; 0 for a symbol that does not occur.
    pub lengths: [u8; 256],
    /// Each symbol's code, in its low `lengths[s]` bits.
    pub codes: [u16; 256],
}

impl ExponentCode {
    /// The length-limited Huffman code for `counts` (occurrences of each exponent). Where the
    /// optimal code is longer than [`MAX_CODE_BITS`], the counts are flattened (halved, kept
    /// non-zero) until it is not: rare exponents get slightly longer codes than optimal.
    pub fn for_counts(counts: &[u64; 256]) -> ExponentCode {
        let mut scaled = *counts;
        let lengths = loop {
            let lengths = huffman_lengths(&scaled);
            if lengths.iter().all(|&l| u32::from(l) <= MAX_CODE_BITS) {
                break lengths;
            }
            for c in scaled.iter_mut().filter(|c| **c > 0) {
                *c = (*c >> 1) | 1;
            }
        };
        ExponentCode::canonical(lengths)
    }

    /// Canonical codes from code lengths: symbols ordered by (length, value) take
    /// consecutive codes.
    fn canonical(lengths: [u8; 256]) -> ExponentCode {
        let mut order: Vec<usize> = (0..256).filter(|&s| lengths[s] > 0).collect();
        order.sort_by_key(|&s| (lengths[s], s));
        let mut codes = [0u16; 256];
        let (mut code, mut len) = (0u32, 0u8);
        for (i, &s) in order.iter().enumerate() {
            if i > 0 {
                code += 1;
            }
            code <<= lengths[s] - len;
            len = lengths[s];
            codes[s] = code as u16;
        }
        ExponentCode { lengths, codes }
    }

    /// The decoder's table: entry `p` (a `MAX_CODE_BITS`-bit prefix of the stream) is the
    /// symbol whose code begins `p`, and that code's length in bits 8..12.
    pub fn lookup_table(&self) -> Vec<u16> {
        let mut lut = vec![0u16; 1 << MAX_CODE_BITS];
        for s in 0..256 {
            let len = u32::from(self.lengths[s]);
            if len == 0 {
                continue;
            }
            let first = (u32::from(self.codes[s]) << (MAX_CODE_BITS - len)) as usize;
            let entry = s as u16 | (len as u16) << 8;
            lut[first..first + (1 << (MAX_CODE_BITS - len))].fill(entry);
        }
        lut
    }
}

/// Optimal prefix-code lengths for `counts` (Huffman); a lone symbol gets one bit.
fn huffman_lengths(counts: &[u64; 256]) -> [u8; 256] {
    let mut lengths = [0u8; 256];
    let used: Vec<usize> = (0..256).filter(|&s| counts[s] > 0).collect();
    if used.len() == 1 {
        lengths[used[0]] = 1;
        return lengths;
    }
    // Nodes: leaves 0..n, then merged nodes; parent links give each leaf's depth.
    let mut weight: Vec<u64> = used.iter().map(|&s| counts[s]).collect();
    let mut parent: Vec<usize> = vec![usize::MAX; used.len()];
    let mut live: Vec<usize> = (0..used.len()).collect();
    while live.len() > 1 {
        // Two lightest (ties by index, so the code is deterministic).
        live.sort_by_key(|&n| (std::cmp::Reverse(weight[n]), std::cmp::Reverse(n)));
        let (a, b) = (
            live.pop().expect("two nodes"),
            live.pop().expect("two nodes"),
        );
        let node = weight.len();
        weight.push(weight[a] + weight[b]);
        parent.push(usize::MAX);
        parent[a] = node;
        parent[b] = node;
        live.push(node);
    }
    for (leaf, &s) in used.iter().enumerate() {
        let (mut depth, mut n) = (0u32, leaf);
        while parent[n] != usize::MAX {
            n = parent[n];
            depth += 1;
        }
        lengths[s] = depth.min(255) as u8;
    }
    lengths
}

/// bf16 bits → (sign and mantissa byte, exponent).
fn split_bits(v: u16) -> (u8, u8) {
    (((v >> 8) & 0x80) as u8 | (v & 0x7f) as u8, (v >> 7) as u8)
}

/// (sign and mantissa byte, exponent) → bf16 bits.
fn join_bits(sm: u8, exp: u8) -> u16 {
    (u16::from(sm & 0x80) << 8) | (u16::from(exp) << 7) | u16::from(sm & 0x7f)
}

/// How a tensor's elements are cut into segments and blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub numel: usize,
    /// Elements per segment (a row, or the whole tensor); segments never share a block.
    pub segment: usize,
}

impl Geometry {
    fn blocks_per_segment(&self) -> usize {
        self.segment.div_ceil(BLOCK).max(1)
    }

    fn segments(&self) -> usize {
        self.numel.checked_div(self.segment).unwrap_or(0)
    }

    pub fn blocks(&self) -> usize {
        self.segments() * self.blocks_per_segment()
    }

    /// The elements of block `b`.
    pub fn block(&self, b: usize) -> Range<usize> {
        let per = self.blocks_per_segment();
        let start = (b / per) * self.segment + (b % per) * BLOCK;
        let end = ((b / per) * self.segment + self.segment).min(start + BLOCK);
        start..end
    }
}

/// A tensor's bf16 values, encoded (layout in the module's doc).
#[derive(Clone)]
pub struct EncodedTensor {
    pub name: String,
    pub geometry: Geometry,
    /// The mapping holding the table, lane starts, sign-mantissa bytes and exponent bits.
    pub storage: Arc<Storage>,
    starts_at: usize,
    sm_at: usize,
    words_at: usize,
    /// Bits of the exponent stream.
    pub bits: u64,
}

/// One range of bytes to copy into a slot: `len` bytes at `src` of the encoded tensor's
/// storage, to `dst` in the slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartCopy {
    pub src: usize,
    pub len: usize,
    pub dst: usize,
}

/// What a decoder needs to turn an exponent-coded share, laid out in a slot, back into bf16:
/// byte offsets into the slot of each part, and the elements' geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExponentDecode {
    pub lut: usize,
    /// One u32 bit offset per lane of each block, counted from `words`'s first bit.
    pub starts: usize,
    pub sm: usize,
    pub words: usize,
    /// Elements of the share (whole segments).
    pub numel: usize,
    pub segment: usize,
    /// Subtracted from every lane start: the bit offset, in the tensor's stream, of the
    /// share's first word.
    pub base_bit: u32,
}

impl ExponentDecode {
    /// Blocks of the share.
    pub fn blocks(&self) -> usize {
        self.geometry().blocks()
    }

    pub fn geometry(&self) -> Geometry {
        Geometry {
            numel: self.numel,
            segment: self.segment,
        }
    }
}

/// A share of an encoded tensor (whole segments) placed in a slot: the copies that put it
/// there and how to decode it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlacedShare {
    pub copies: Vec<PartCopy>,
    pub decode: Decode,
    /// First byte past the share in the slot.
    pub end: usize,
}

/// How a share is decoded on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decode {
    /// Exponent-coded bf16 (this module's codec).
    Exponents(ExponentDecode),
    /// ggml blocks ([`super::blocks`]).
    Blocks(BlockDecode),
}

impl Decode {
    /// Elements it writes.
    pub fn numel(&self) -> usize {
        match self {
            Decode::Exponents(d) => d.numel,
            Decode::Blocks(d) => d.numel,
        }
    }
}

/// A tensor as it crosses the link when not as the device holds it.
#[derive(Clone)]
pub enum Encoding {
    /// bf16 with its exponents coded ([`EncodedTensor`]).
    Exponents(EncodedTensor),
    /// ggml blocks as the file stores them.
    Blocks(BlockTensor),
}

impl Encoding {
    pub fn name(&self) -> &str {
        match self {
            Encoding::Exponents(e) => &e.name,
            Encoding::Blocks(b) => &b.name,
        }
    }

    pub fn numel(&self) -> usize {
        match self {
            Encoding::Exponents(e) => e.geometry.numel,
            Encoding::Blocks(b) => b.numel,
        }
    }

    /// Bytes of the whole encoding.
    pub fn encoded_bytes(&self) -> usize {
        match self {
            Encoding::Exponents(e) => e.encoded_bytes(),
            Encoding::Blocks(b) => b.encoded_bytes(),
        }
    }

    /// The host memory the encoding lies in.
    pub fn storage(&self) -> &Arc<Storage> {
        match self {
            Encoding::Exponents(e) => &e.storage,
            Encoding::Blocks(b) => &b.storage,
        }
    }

    /// Lay the elements `elements` out in a slot from byte `dst`, each part at a multiple of
    /// `align`; `None` when the codec cannot cut the tensor there.
    pub fn place(&self, elements: Range<usize>, dst: usize, align: usize) -> Option<PlacedShare> {
        match self {
            Encoding::Exponents(e) => e.place(elements, dst, align),
            Encoding::Blocks(b) => {
                b.place(elements, dst, align)
                    .map(|(copy, decode, end)| PlacedShare {
                        copies: vec![copy],
                        decode: Decode::Blocks(decode),
                        end,
                    })
            }
        }
    }
}

pub(super) fn align_up(x: usize, align: usize) -> usize {
    x.div_ceil(align) * align
}

impl EncodedTensor {
    /// Encode `values` (bf16 bits), cut into segments of `segment` elements (a divisor of
    /// their number).
    pub fn encode(name: &str, values: &[u16], segment: usize) -> Result<EncodedTensor> {
        let geometry = Geometry {
            numel: values.len(),
            segment: if values.is_empty() { 0 } else { segment.max(1) },
        };
        assert!(
            geometry.segment == 0 || values.len() % geometry.segment == 0,
            "segments of {segment} elements tile {}",
            values.len()
        );
        let mut counts = [0u64; 256];
        for &v in values {
            counts[split_bits(v).1 as usize] += 1;
        }
        let code = ExponentCode::for_counts(&counts);
        let bits: u64 = (0..256)
            .map(|s| counts[s] * u64::from(code.lengths[s]))
            .sum();
        let blocks = geometry.blocks();
        let Parts {
            starts_at,
            sm_at,
            words_at,
            total,
        } = Parts::of(geometry, bits);
        let mut mem = memmap2::MmapMut::map_anon(total).map_err(|e| {
            Error::Device(format!(
                "mapping {total} bytes for the compressed {name}: {e}"
            ))
        })?;
        {
            let (head, rest) = mem.split_at_mut(sm_at);
            let (sm, words_bytes) = rest.split_at_mut(words_at - sm_at);
            let lut = code.lookup_table();
            head[..LUT_BYTES].copy_from_slice(bytemuck::cast_slice(&lut));
            let starts: &mut [u32] = bytemuck::cast_slice_mut(&mut head[starts_at..]);
            let words: &mut [u32] = bytemuck::cast_slice_mut(words_bytes);
            let mut writer = BitWriter::new(words);
            for b in 0..blocks {
                let range = geometry.block(b);
                for lane in 0..LANES {
                    starts[b * LANES + lane] = u32::try_from(writer.bit).map_err(|_| {
                        Error::Device(format!(
                            "{name}: its exponent stream exceeds 2^32 bits; too large to compress"
                        ))
                    })?;
                    for e in (range.start + lane..range.end).step_by(LANES) {
                        let (s, x) = split_bits(values[e]);
                        sm[e] = s;
                        let x = x as usize;
                        writer.put(code.codes[x], code.lengths[x]);
                    }
                }
            }
            writer.flush();
            debug_assert_eq!(writer.bit, bits);
        }
        let storage = mem
            .make_read_only()
            .map_err(|e| Error::Device(format!("protecting the compressed {name}: {e}")))?;
        Ok(EncodedTensor {
            name: name.to_string(),
            geometry,
            storage: Arc::new(Storage::Mapped(storage)),
            starts_at,
            sm_at,
            words_at,
            bits,
        })
    }

    /// An encoding made before (by [`EncodedTensor::encode`], kept in a file): `storage`
    /// holds exactly the parts that `geometry` and `bits` lay out; `None` when its length
    /// says otherwise.
    pub fn from_parts(
        name: &str,
        geometry: Geometry,
        storage: Arc<Storage>,
        bits: u64,
    ) -> Option<EncodedTensor> {
        let parts = Parts::of(geometry, bits);
        if storage.bytes().len() != parts.total {
            return None;
        }
        Some(EncodedTensor {
            name: name.to_string(),
            geometry,
            storage,
            starts_at: parts.starts_at,
            sm_at: parts.sm_at,
            words_at: parts.words_at,
            bits,
        })
    }

    /// Bytes of the whole encoding.
    pub fn encoded_bytes(&self) -> usize {
        self.storage.bytes().len()
    }

    fn starts(&self) -> &[u32] {
        let end = self.starts_at + 4 * self.geometry.blocks() * LANES;
        bytemuck::cast_slice(&self.storage.bytes()[self.starts_at..end])
    }

    /// Lay the elements `elements` (whole segments) out in a slot from byte `dst`, each part
    /// starting at a multiple of `align` (≥ 16, the decoder reads the table in 16-byte
    /// loads), or, for the whole tensor, the storage as it is from such a multiple (its parts
    /// keep their offsets: the table at 0, the others 4-aligned): the copies and the decoder's
    /// arguments. `None` when `elements` does not cover whole segments.
    pub fn place(&self, elements: Range<usize>, dst: usize, align: usize) -> Option<PlacedShare> {
        let g = self.geometry;
        let seg = g.segment.max(1);
        if elements.start % seg != 0 || elements.end % seg != 0 || elements.end > g.numel {
            return None;
        }
        if elements.len() == g.numel {
            // The whole tensor: its storage as it is (which is exactly its parts), in one copy
            // rather than one a part; small copies cost the link more than their bytes.
            let at = align_up(dst, align);
            let total = self.storage.bytes().len();
            return Some(PlacedShare {
                copies: vec![PartCopy {
                    src: 0,
                    len: total,
                    dst: at,
                }],
                decode: Decode::Exponents(ExponentDecode {
                    lut: at,
                    starts: at + self.starts_at,
                    sm: at + self.sm_at,
                    words: at + self.words_at,
                    numel: g.numel,
                    segment: g.segment,
                    base_bit: 0,
                }),
                end: align_up(at + total, align),
            });
        }
        let per = g.blocks_per_segment();
        let (b0, b1) = (elements.start / seg * per, elements.end / seg * per);
        let starts = self.starts();
        let first_bit = starts.get(b0 * LANES).map_or(self.bits, |&s| u64::from(s));
        let end_bit = starts.get(b1 * LANES).map_or(self.bits, |&s| u64::from(s));
        let (w0, w1) = (
            (first_bit / 32) as usize,
            (end_bit as usize).div_ceil(32) + PAD_WORDS,
        );
        let mut copies = Vec::with_capacity(4);
        let mut at = align_up(dst, align);
        let mut put = |src: usize, len: usize| {
            let here = at;
            copies.push(PartCopy {
                src,
                len,
                dst: here,
            });
            at = align_up(here + len, align);
            here
        };
        let lut = put(0, LUT_BYTES);
        let starts_dst = put(self.starts_at + 4 * b0 * LANES, 4 * (b1 - b0) * LANES);
        let sm = put(self.sm_at + elements.start, elements.len());
        let words = put(self.words_at + 4 * w0, 4 * (w1 - w0));
        Some(PlacedShare {
            copies,
            decode: Decode::Exponents(ExponentDecode {
                lut,
                starts: starts_dst,
                sm,
                words,
                numel: elements.len(),
                segment: g.segment,
                base_bit: (w0 * 32) as u32,
            }),
            end: at,
        })
    }
}

/// Where the parts of an encoding lie in its storage, bytes: the lookup table at 0, then the
/// lane starts, the sign-mantissa bytes and the exponent words (the module's doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parts {
    pub starts_at: usize,
    pub sm_at: usize,
    pub words_at: usize,
    /// Bytes of the whole encoding.
    pub total: usize,
}

impl Parts {
    /// The layout of `geometry`'s elements with an exponent stream of `bits` bits.
    pub fn of(geometry: Geometry, bits: u64) -> Parts {
        let starts_at = LUT_BYTES;
        let sm_at = starts_at + 4 * geometry.blocks() * LANES;
        let words_at = align_up(sm_at + geometry.numel, 4);
        let words = (bits as usize).div_ceil(32) + PAD_WORDS;
        Parts {
            starts_at,
            sm_at,
            words_at,
            total: words_at + 4 * words,
        }
    }
}

/// Bits appended most significant first into u32 words.
struct BitWriter<'a> {
    words: &'a mut [u32],
    acc: u64,
    held: u32,
    next: usize,
    bit: u64,
}

impl<'a> BitWriter<'a> {
    fn new(words: &'a mut [u32]) -> Self {
        BitWriter {
            words,
            acc: 0,
            held: 0,
            next: 0,
            bit: 0,
        }
    }

    fn put(&mut self, code: u16, len: u8) {
        self.acc = (self.acc << len) | u64::from(code);
        self.held += u32::from(len);
        self.bit += u64::from(len);
        if self.held >= 32 {
            self.held -= 32;
            self.words[self.next] = (self.acc >> self.held) as u32;
            self.next += 1;
        }
    }

    fn flush(&mut self) {
        if self.held > 0 {
            self.words[self.next] = (self.acc << (32 - self.held)) as u32;
            self.next += 1;
            self.held = 0;
        }
    }
}

/// Decode a share laid out in `slot` (as [`EncodedTensor::place`] put it) into `out` (bf16
/// bits, `decode.numel` of them): the CPU's decoder, the same steps as the GPU kernel's
/// (`backend/cuda/kernels/decompress.cu`).
pub fn decode(slot: &[u8], d: &ExponentDecode, out: &mut [u16]) {
    let lut: &[u16] = bytemuck::cast_slice(&slot[d.lut..d.lut + LUT_BYTES]);
    let g = d.geometry();
    let starts: &[u32] = bytemuck::cast_slice(&slot[d.starts..d.starts + 4 * g.blocks() * LANES]);
    let sm = &slot[d.sm..d.sm + d.numel];
    let words_bytes = &slot[d.words..];
    let word = |i: usize| -> u64 {
        let b = &words_bytes[4 * i..4 * i + 4];
        u64::from(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    };
    for b in 0..g.blocks() {
        let range = g.block(b);
        for lane in 0..LANES {
            let mut pos = u64::from(starts[b * LANES + lane] - d.base_bit);
            for e in (range.start + lane..range.end).step_by(LANES) {
                let w = (pos / 32) as usize;
                let window = (word(w) << 32 | word(w + 1)) << (pos % 32);
                let entry = lut[(window >> (64 - MAX_CODE_BITS)) as usize];
                out[e] = join_bits(sm[e], entry as u8);
                pos += u64::from(entry >> 8);
            }
        }
    }
}

/// A tensor's values as bf16 bits, as the device holds them: in place when stored as
/// aligned bf16, else converted (as the host tier converts them).
pub fn bf16_bits(t: &HostTensor) -> Vec<u16> {
    match t.as_bf16() {
        Some(v) => bytemuck::cast_slice(v).to_vec(),
        None => t
            .to_f32()
            .iter()
            .map(|&x| bf16::from_f32(x).to_bits())
            .collect(),
    }
}

/// A tensor to exponent-code: where it is among the groups, and its segment (elements).
#[derive(Clone, Copy, Debug)]
pub struct ExponentJob<'a> {
    pub group: usize,
    pub index: usize,
    pub tensor: &'a HostTensor,
    pub segment: usize,
}

impl ExponentJob<'_> {
    /// The tensor's encoding; `None` where it is no smaller than the tensor (short rows: each
    /// lane's start costs 4 bytes), which then streams as it is.
    pub fn encode(&self) -> Result<Option<EncodedTensor>> {
        let t = self.tensor;
        let e = EncodedTensor::encode(&t.name, &bf16_bits(t), self.segment)?;
        Ok((e.encoded_bytes() < t.numel() * 2).then_some(e))
    }
}

/// [`ExponentJob::encode`] of every job, on every core.
pub fn encode_jobs(jobs: &[ExponentJob<'_>]) -> Result<Vec<Option<EncodedTensor>>> {
    jobs.par_iter().map(ExponentJob::encode).collect()
}

/// Whether a tensor may be exponent-coded: bf16 on the device (any element dtype where the
/// device `converts` every weight to bf16, else only weights stored as bf16; blocks stream
/// as blocks), and large enough for its table (8 KiB) to be a small part of it.
pub fn compressible(t: &HostTensor, converts: bool) -> bool {
    let on_device_bf16 = match t.dtype {
        DType::Ggml(_) => false,
        DType::BF16 => true,
        _ => converts,
    };
    on_device_bf16 && t.numel() >= 2 * BLOCK
}

/// Bytes of `t` as the device holds it: bf16 where the device `converts` every weight; else
/// as stored, blocks dequantized to f32.
pub fn device_bytes(t: &HostTensor, converts: bool) -> usize {
    match t.dtype {
        _ if converts => t.numel() * 2,
        DType::Ggml(_) => t.numel() * 4,
        _ => t.bytes().len(),
    }
}

/// `--compress`: whether streamed weights cross the link compressed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compress {
    /// Compress what streams where the engine can (not what stays resident).
    #[default]
    Auto,
    /// Compress what streams, or fail saying why not.
    On,
    Off,
}

impl std::str::FromStr for Compress {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Compress::Auto),
            "on" => Ok(Compress::On),
            "off" => Ok(Compress::Off),
            _ => Err(format!("expected auto, on or off, got {s:?}")),
        }
    }
}

/// The encoded tensors of a model's groups, and how a piece of a group lies in a slot when
/// its tensors come encoded.
#[derive(Clone)]
pub struct Compressed {
    /// Per group, per tensor: its encoding, or `None` where it streams as it is.
    pub groups: Vec<Vec<Option<Encoding>>>,
    /// Per group, per tensor: its bytes as the device holds them.
    tensor_bytes: Vec<Vec<usize>>,
    /// Where each tensor's share starts in a slot: a multiple of this.
    pub align: usize,
    /// Decoding speeds assumed by the planner, GB/s of the device's dtype written.
    pub speeds: DecodeSpeeds,
}

/// How fast the device decodes each encoding, GB/s written (the planner's assumption).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DecodeSpeeds {
    pub exponents_gbps: f64,
    pub blocks_gbps: f64,
}

/// One copy of a piece into its slot: `len` bytes from `src` of tensor `tensor` of the group
/// (its bytes, or its encoding's when `encoded`), to `dst` in the slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotCopy {
    pub tensor: usize,
    pub encoded: bool,
    pub src: usize,
    pub len: usize,
    pub dst: usize,
}

/// Where a tensor's share of a piece is for the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Share {
    /// As it is, `len` bytes at `dst` in the slot.
    Raw { dst: usize, len: usize },
    /// Encoded in the slot; decoded into the decode buffer at `dst` (`len` bf16 bytes).
    Encoded {
        decode: Decode,
        dst: usize,
        len: usize,
    },
    /// As it is, `len` bytes at `src` in the slot, moved with the piece's decoding into the
    /// decode buffer at `dst` (a norm's weight beside encoded matrices, say): the piece then
    /// reads the decode buffer only, and its slot is free once decoding has run.
    Moved { src: usize, dst: usize, len: usize },
}

/// How a piece lies in a slot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PieceLayout {
    pub copies: Vec<SlotCopy>,
    /// Per tensor of the group; `None` for those in other pieces.
    pub shares: Vec<Option<Share>>,
    /// Bytes of the slot the piece takes.
    pub extent: usize,
    /// Bytes of the decode buffer the piece takes (0 when nothing in it is encoded).
    pub decoded: usize,
}

impl PieceLayout {
    /// Bytes that cross the link.
    pub fn copy_bytes(&self) -> usize {
        self.copies.iter().map(|c| c.len).sum()
    }

    /// Bytes the device decodes.
    pub fn decoded_bytes(&self) -> usize {
        self.shares
            .iter()
            .map(|s| match s {
                Some(Share::Encoded { len, .. }) => *len,
                _ => 0,
            })
            .sum()
    }

    /// Every share is decoded or moved (and one is decoded): the piece's compute reads the
    /// decode buffer only, never the slot.
    pub fn decoded_whole(&self) -> bool {
        self.decoded > 0
            && self
                .shares
                .iter()
                .flatten()
                .all(|s| !matches!(s, Share::Raw { .. }))
    }

    /// Time the device takes to decode the piece at `speeds`, ms.
    pub fn decode_ms(&self, speeds: DecodeSpeeds) -> f64 {
        self.shares
            .iter()
            .map(|s| match s {
                Some(Share::Encoded { decode, len, .. }) => {
                    let gbps = match decode {
                        Decode::Exponents(_) => speeds.exponents_gbps,
                        Decode::Blocks(_) => speeds.blocks_gbps,
                    };
                    *len as f64 / (gbps * 1e6)
                }
                _ => 0.0,
            })
            .sum()
    }
}

/// How the bytes `offset..offset + bytes` of a group whose tensors hold `tensor_bytes` lie
/// in a slot, every share at a multiple of `align`: as they are, or, for a tensor in
/// `encoded` whose share is whole segments, encoded (its bf16 form then lies in the decode
/// buffer where it would have lain in the slot). Where any share is encoded, the others are
/// moved into the decode buffer beside them, also where they would have lain in the slot.
pub fn piece_layout(
    tensor_bytes: &[usize],
    encoded: Option<&[Option<Encoding>]>,
    offset: usize,
    bytes: usize,
    align: usize,
) -> PieceLayout {
    let raw = super::streamed::slot_spans(tensor_bytes.iter().copied(), offset, bytes, align);
    let mut out = PieceLayout {
        shares: vec![None; tensor_bytes.len()],
        ..PieceLayout::default()
    };
    let mut at = 0;
    // Shares copied as they are, with where they lie in an uncompressed slot.
    let mut unencoded = Vec::new();
    for s in raw {
        let enc = encoded.and_then(|e| e[s.tensor].as_ref());
        let placed = enc.and_then(|e| {
            // The device's bytes per element of this tensor.
            let size = tensor_bytes[s.tensor] / e.numel().max(1);
            e.place(s.src / size..(s.src + s.len) / size, at, align)
        });
        assert!(
            placed.is_some() || !matches!(enc, Some(Encoding::Blocks(_))),
            "{}: a share of blocks that is not whole rows",
            enc.map_or("", |e| e.name())
        );
        match placed {
            Some(p) => {
                out.copies.extend(p.copies.iter().map(|c| SlotCopy {
                    tensor: s.tensor,
                    encoded: true,
                    src: c.src,
                    len: c.len,
                    dst: c.dst,
                }));
                out.shares[s.tensor] = Some(Share::Encoded {
                    decode: p.decode,
                    dst: s.dst,
                    len: s.len,
                });
                out.decoded = out.decoded.max(s.dst + s.len);
                at = p.end;
            }
            None => {
                let dst = align_up(at, align);
                out.copies.push(SlotCopy {
                    tensor: s.tensor,
                    encoded: false,
                    src: s.src,
                    len: s.len,
                    dst,
                });
                out.shares[s.tensor] = Some(Share::Raw { dst, len: s.len });
                unencoded.push((s.tensor, s.dst));
                at = align_up(dst + s.len, align);
            }
        }
    }
    if out.decoded > 0 {
        for (tensor, slot_dst) in unencoded {
            if let Some(Share::Raw { dst, len }) = out.shares[tensor] {
                out.shares[tensor] = Some(Share::Moved {
                    src: dst,
                    dst: slot_dst,
                    len,
                });
                out.decoded = out.decoded.max(slot_dst + len);
            }
        }
    }
    out.extent = at;
    out
}

impl Compressed {
    /// The groups' tensors held as ggml blocks, each to stream as its blocks; nothing else
    /// encoded yet. `converts`: the device holds every weight as bf16 (CUDA), rather than as
    /// stored with blocks dequantized to f32 (the CPU).
    pub fn blocks(
        groups: &[Vec<HostTensor>],
        converts: bool,
        align: usize,
        speeds: DecodeSpeeds,
    ) -> Compressed {
        Compressed {
            groups: groups
                .iter()
                .map(|g| {
                    g.iter()
                        .map(|t| BlockTensor::of(t).map(Encoding::Blocks))
                        .collect()
                })
                .collect(),
            tensor_bytes: groups
                .iter()
                .map(|g| g.iter().map(|t| device_bytes(t, converts)).collect())
                .collect(),
            align,
            speeds,
        }
    }

    /// Whether anything is encoded.
    pub fn is_empty(&self) -> bool {
        self.groups.iter().flatten().all(Option::is_none)
    }

    /// Exponent-code the compressible tensors of `groups` (each group's tensors; those
    /// [`Compressed::blocks`] was made from) for which `keep` holds of their group, on every
    /// core ([`Compressed::exponent_jobs`], [`encode_jobs`], [`Compressed::put_exponents`]).
    pub fn encode_exponents(
        &mut self,
        groups: &[Vec<HostTensor>],
        splits: &[bool],
        keep: impl Fn(usize) -> bool,
        converts: bool,
    ) -> Result<()> {
        let jobs = self.exponent_jobs(groups, splits, keep, converts);
        let encoded = encode_jobs(&jobs)?;
        self.put_exponents(&jobs, encoded);
        Ok(())
    }

    /// The tensors [`Compressed::encode_exponents`] codes: the compressible tensors of
    /// `groups` for which `keep` holds of their group, not encoded yet. The last tensor of a
    /// group that may stream in blocks of rows (`splits`) is cut into rows. `converts`: the
    /// device holds every weight as bf16 (CUDA), rather than as stored (the CPU).
    pub fn exponent_jobs<'a>(
        &self,
        groups: &'a [Vec<HostTensor>],
        splits: &[bool],
        keep: impl Fn(usize) -> bool,
        converts: bool,
    ) -> Vec<ExponentJob<'a>> {
        let mut jobs = Vec::new();
        for (g, tensors) in groups.iter().enumerate() {
            if !keep(g) {
                continue;
            }
            for (i, t) in tensors.iter().enumerate() {
                if self.groups[g][i].is_some() || !compressible(t, converts) {
                    continue;
                }
                let rows = i + 1 == tensors.len() && splits[g] && t.shape.len() > 1;
                let segment = if rows {
                    t.numel() / t.shape[0]
                } else {
                    t.numel()
                };
                jobs.push(ExponentJob {
                    group: g,
                    index: i,
                    tensor: t,
                    segment,
                });
            }
        }
        jobs
    }

    /// Hold `encoded[k]` as the encoding of `jobs[k]`'s tensor (`None`: it streams as it
    /// is).
    pub fn put_exponents(&mut self, jobs: &[ExponentJob<'_>], encoded: Vec<Option<EncodedTensor>>) {
        for (job, e) in jobs.iter().zip(encoded) {
            self.groups[job.group][job.index] = e.map(Encoding::Exponents);
        }
    }

    /// [`Compressed::blocks`], then [`Compressed::encode_exponents`].
    pub fn encode(
        groups: &[Vec<HostTensor>],
        splits: &[bool],
        keep: impl Fn(usize) -> bool,
        converts: bool,
        align: usize,
        speeds: DecodeSpeeds,
    ) -> Result<Compressed> {
        let mut c = Compressed::blocks(groups, converts, align, speeds);
        c.encode_exponents(groups, splits, keep, converts)?;
        Ok(c)
    }

    /// Whether any tensor is exponent-coded.
    pub fn has_exponents(&self) -> bool {
        self.groups
            .iter()
            .flatten()
            .any(|e| matches!(e, Some(Encoding::Exponents(_))))
    }

    /// How `bytes` at `offset` of group `g` lie in a slot.
    pub fn layout(&self, g: usize, offset: usize, bytes: usize) -> PieceLayout {
        piece_layout(
            &self.tensor_bytes[g],
            Some(&self.groups[g]),
            offset,
            bytes,
            self.align,
        )
    }

    /// Drop the encodings of the groups `keep` refuses (those that will not stream).
    pub fn retain(&mut self, keep: impl Fn(usize) -> bool) {
        for (g, tensors) in self.groups.iter_mut().enumerate() {
            if !keep(g) {
                tensors.iter_mut().for_each(|t| *t = None);
            }
        }
    }

    /// Encoded and bf16 bytes of everything encoded.
    pub fn sizes(&self) -> (usize, usize) {
        let mut sizes = (0, 0);
        for (g, tensors) in self.groups.iter().enumerate() {
            for (i, t) in tensors.iter().enumerate() {
                if let Some(t) = t {
                    sizes.0 += t.encoded_bytes();
                    sizes.1 += self.tensor_bytes[g][i];
                }
            }
        }
        sizes
    }

    /// The memory holding the encodings, each once (to register with a driver).
    pub fn storages(&self) -> Vec<Arc<Storage>> {
        let mut out: Vec<Arc<Storage>> = Vec::new();
        for e in self.groups.iter().flatten().flatten() {
            if !out.iter().any(|s| Arc::ptr_eq(s, e.storage())) {
                out.push(e.storage().clone());
            }
        }
        out
    }
}

impl std::fmt::Debug for Compressed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (enc, raw) = self.sizes();
        write!(f, "Compressed({enc} of {raw} bytes)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exponents(d: &Decode) -> &ExponentDecode {
        match d {
            Decode::Exponents(d) => d,
            Decode::Blocks(_) => panic!("an exponent-coded share"),
        }
    }

    /// A small deterministic generator (xorshift).
    fn rng(seed: u64) -> impl FnMut() -> u64 {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        }
    }

    fn normal_bf16(n: usize, scale: f32, seed: u64) -> Vec<u16> {
        let mut next = rng(seed);
        (0..n)
            .map(|_| {
                // Sum of uniforms: close enough to normal for exponent statistics.
                let u: f32 = (0..4)
                    .map(|_| (next() >> 40) as f32 / (1u64 << 24) as f32)
                    .sum();
                bf16::from_f32((u - 2.0) * scale * 1.7).to_bits()
            })
            .collect()
    }

    /// Encode, place in a slot at an odd offset, decode: every bit back.
    fn round_trip(values: &[u16], segment: usize) -> EncodedTensor {
        let enc = EncodedTensor::encode("t", values, segment).unwrap();
        let placed = enc.place(0..values.len(), 100, 16).unwrap();
        let mut slot = vec![0xAAu8; placed.end];
        for c in &placed.copies {
            slot[c.dst..c.dst + c.len].copy_from_slice(&enc.storage.bytes()[c.src..c.src + c.len]);
        }
        let mut out = vec![0u16; values.len()];
        decode(&slot, exponents(&placed.decode), &mut out);
        assert!(out == values, "round trip changed bits");
        enc
    }

    #[test]
    fn normal_weights_round_trip_at_two_thirds_of_bf16() {
        let values = normal_bf16(40 * BLOCK + 777, 0.02, 1);
        let enc = round_trip(&values, values.len());
        let ratio = enc.encoded_bytes() as f64 / (2 * values.len()) as f64;
        eprintln!("normal weights: {ratio:.4} of bf16");
        assert!(ratio < 0.70, "ratio {ratio}");
        assert!(ratio > 0.55, "ratio {ratio}: implausibly small");
    }

    #[test]
    fn every_bit_pattern_round_trips() {
        // All 65536 bf16 values: every exponent, NaNs, ±Inf, subnormals, ±0; shuffled.
        let mut values: Vec<u16> = (0..=u16::MAX).collect();
        let mut next = rng(7);
        for i in (1..values.len()).rev() {
            values.swap(i, (next() % (i as u64 + 1)) as usize);
        }
        round_trip(&values, values.len());
        // In rows, with a segment that does not fill a block.
        round_trip(&values, 1024);
    }

    #[test]
    fn skewed_and_degenerate_inputs_round_trip() {
        let mut next = rng(3);
        // One value only (a lone symbol), zeros, and exponents so skewed that the optimal code
        // is longer than the table allows.
        round_trip(&vec![0x3f80; 5000], 5000);
        round_trip(&vec![0; 4096], 64);
        let skewed: Vec<u16> = (0..200_000)
            .map(|i| {
                let exp = if i % 50_000 == 0 {
                    (next() % 256) as u16
                } else {
                    120 + (i % 3) as u16
                };
                (exp << 7) | (next() as u16 & 0x807f)
            })
            .collect();
        let enc = round_trip(&skewed, 1000);
        let code = ExponentCode::for_counts(&{
            let mut c = [0u64; 256];
            for &v in &skewed {
                c[split_bits(v).1 as usize] += 1;
            }
            c
        });
        assert!(code.lengths.iter().all(|&l| u32::from(l) <= MAX_CODE_BITS));
        assert!(enc.bits > 0);
        round_trip(&[], 1);
        round_trip(&[0x8001], 1);
    }

    #[test]
    fn shares_of_whole_rows_decode_alone() {
        let (rows, cols) = (40, 3 * 1024 + 96);
        let values = normal_bf16(rows * cols, 1.0, 5);
        let enc = EncodedTensor::encode("head", &values, cols).unwrap();
        for (r0, r1) in [(0, 1), (3, 17), (17, 40), (0, 40)] {
            let placed = enc.place(r0 * cols..r1 * cols, 8, 256).unwrap();
            let mut slot = vec![0u8; placed.end];
            for c in &placed.copies {
                assert_eq!(c.dst % 256, 0);
                slot[c.dst..c.dst + c.len]
                    .copy_from_slice(&enc.storage.bytes()[c.src..c.src + c.len]);
            }
            let mut out = vec![0u16; (r1 - r0) * cols];
            decode(&slot, exponents(&placed.decode), &mut out);
            assert!(out[..] == values[r0 * cols..r1 * cols], "rows {r0}..{r1}");
        }
        assert!(enc.place(1..cols, 0, 16).is_none(), "not whole rows");
    }

    #[test]
    fn beside_encoded_shares_the_others_move_into_the_decode_buffer() {
        // A group of a norm (1000 bf16, not encoded), a matrix (encoded) and a bias (100).
        let matrix = normal_bf16(64 * 1024, 0.02, 9);
        let enc = Encoding::Exponents(EncodedTensor::encode("w", &matrix, matrix.len()).unwrap());
        let bytes = [2000, 2 * matrix.len(), 200];
        let encoded = [None, Some(enc), None];
        let layout = piece_layout(&bytes, Some(&encoded), 0, bytes.iter().sum(), 256);
        // Where each share lies in an uncompressed slot of the same piece.
        let plain = piece_layout(&bytes, None, 0, bytes.iter().sum(), 256);
        let at = |l: &PieceLayout, i: usize| match l.shares[i] {
            Some(Share::Raw { dst, len }) => (dst, len),
            other => panic!("share {i}: {other:?}"),
        };
        for i in [0, 2] {
            let (slot_dst, len) = at(&plain, i);
            match layout.shares[i] {
                Some(Share::Moved { src, dst, len: n }) => {
                    assert_eq!(
                        (dst, n),
                        (slot_dst, len),
                        "share {i} moves where it would lie"
                    );
                    // Its bytes were copied as they are to `src` in the slot.
                    let copy = layout.copies.iter().find(|c| c.tensor == i).unwrap();
                    assert_eq!((copy.dst, copy.len, copy.encoded), (src, len, false));
                }
                other => panic!("share {i}: {other:?}"),
            }
        }
        match layout.shares[1] {
            Some(Share::Encoded { dst, len, .. }) => assert_eq!((dst, len), at(&plain, 1)),
            other => panic!("share 1: {other:?}"),
        }
        assert!(layout.decoded_whole());
        assert_eq!(layout.decoded, plain.extent.min(at(&plain, 2).0 + 200));
        assert!(layout.copy_bytes() < plain.copy_bytes());
        // Nothing encoded: nothing moves.
        assert!(!plain.decoded_whole());
        assert_eq!(plain.decoded, 0);
    }

    #[test]
    fn canonical_code_is_a_prefix_code_with_the_right_table() {
        let mut counts = [0u64; 256];
        for (s, c) in counts.iter_mut().enumerate().take(200) {
            *c = 1 + (s as u64 * 7919) % 1000;
        }
        let code = ExponentCode::for_counts(&counts);
        // Kraft: a complete code sums to exactly 1.
        let kraft: f64 = (0..256)
            .filter(|&s| code.lengths[s] > 0)
            .map(|s| 0.5f64.powi(i32::from(code.lengths[s])))
            .sum();
        assert!((kraft - 1.0).abs() < 1e-12, "kraft {kraft}");
        let lut = code.lookup_table();
        for s in (0..200).step_by(17) {
            let len = u32::from(code.lengths[s]);
            let p = (u32::from(code.codes[s]) << (MAX_CODE_BITS - len)) as usize;
            assert_eq!(lut[p], s as u16 | (len as u16) << 8);
        }
    }
}
