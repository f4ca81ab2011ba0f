//! ggml tensor types and their dequantization to f32, block by block, matching ggml's
//! `dequantize_row_*` bit for bit (f32 arithmetic in the same order, no fused multiply-add);
//! and quantization from f32 into the same blocks ([`quantize`]).
//!
//! A quantized row is a run of blocks; each block stores `block_size` elements in
//! `type_size` bytes. Scales are little-endian f16. The layouts, per block:
//!
//! | type | elements | bytes | layout |
//! |---|---|---|---|
//! | Q8_0 | 32 | 34 | d: f16, qs: [i8; 32] |
//! | Q4_0 | 32 | 18 | d: f16, qs: [u8; 16] (low nibbles = elements 0..16, high = 16..32) |
//! | Q4_1 | 32 | 20 | d: f16, m: f16, qs: [u8; 16] |
//! | Q5_0 | 32 | 22 | d: f16, qh: u32 (bit i = 5th bit of element i), qs: [u8; 16] |
//! | Q5_1 | 32 | 24 | d: f16, m: f16, qh: u32, qs: [u8; 16] |
//! | Q4_K | 256 | 144 | d: f16, dmin: f16, scales: [u8; 12] (8 × 6-bit scale + 6-bit min), qs: [u8; 128] |
//! | Q5_K | 256 | 176 | d: f16, dmin: f16, scales: [u8; 12], qh: [u8; 32], qs: [u8; 128] |
//! | Q6_K | 256 | 210 | ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16 |

use half::{bf16, f16};

/// The ggml tensor types ferry can read, named as ggml names them.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4_K,
    Q5_K,
    Q6_K,
}

/// The types ferry reads, for error messages.
pub const SUPPORTED_TYPES: &str = "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K";

impl GgmlType {
    /// The type with ggml id `id`; `Err` carries the name of a known but unsupported type
    /// (`Some`) or says the id is unknown (`None`).
    pub fn from_id(id: u32) -> Result<GgmlType, Option<&'static str>> {
        Ok(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4_K,
            13 => GgmlType::Q5_K,
            14 => GgmlType::Q6_K,
            30 => GgmlType::BF16,
            other => return Err(unsupported_name(other)),
        })
    }

    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4_K => 12,
            GgmlType::Q5_K => 13,
            GgmlType::Q6_K => 14,
            GgmlType::BF16 => 30,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::BF16 => "BF16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4_K => "Q4_K",
            GgmlType::Q5_K => "Q5_K",
            GgmlType::Q6_K => "Q6_K",
        }
    }

    /// Elements per block.
    pub fn block_size(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => {
                32
            }
            GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => 256,
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q8_0 => 34,
            GgmlType::Q4_K => 144,
            GgmlType::Q5_K => 176,
            GgmlType::Q6_K => 210,
        }
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Names of the ggml types ferry does not read, for a precise error.
fn unsupported_name(id: u32) -> Option<&'static str> {
    Some(match id {
        4 => "Q4_2 (removed from ggml)",
        5 => "Q4_3 (removed from ggml)",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => return None,
    })
}

/// Dequantize `src`, whole blocks of type `ty`, into `dst` (`dst.len()` elements,
/// `src.len() == dst.len() / block_size * type_size`).
pub fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    assert_eq!(dst.len() % ty.block_size(), 0, "{ty}: partial block");
    assert_eq!(
        src.len(),
        dst.len() / ty.block_size() * ty.type_size(),
        "{ty}: source bytes"
    );
    match ty {
        GgmlType::F32 => {
            for (y, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *y = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (y, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *y = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (y, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *y = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        GgmlType::Q4_0 => blocks(src, dst, ty, q4_0),
        GgmlType::Q4_1 => blocks(src, dst, ty, q4_1),
        GgmlType::Q5_0 => blocks(src, dst, ty, q5_0),
        GgmlType::Q5_1 => blocks(src, dst, ty, q5_1),
        GgmlType::Q8_0 => blocks(src, dst, ty, q8_0),
        GgmlType::Q4_K => blocks(src, dst, ty, q4_k),
        GgmlType::Q5_K => blocks(src, dst, ty, q5_k),
        GgmlType::Q6_K => blocks(src, dst, ty, q6_k),
    }
}

fn blocks(src: &[u8], dst: &mut [f32], ty: GgmlType, one: fn(&[u8], &mut [f32])) {
    for (b, y) in src
        .chunks_exact(ty.type_size())
        .zip(dst.chunks_exact_mut(ty.block_size()))
    {
        one(b, y);
    }
}

fn half(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Q8_0: y = d * q.
pub fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = half(b, 0);
    for (y, &q) in y.iter_mut().zip(&b[2..34]) {
        *y = q as i8 as f32 * d;
    }
}

/// Q4_0: y = d * (q - 8).
pub fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = half(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        y[j] = ((qs[j] & 0x0F) as i32 - 8) as f32 * d;
        y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
    }
}

/// Q4_1: y = d * q + m.
pub fn q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (half(b, 0), half(b, 2));
    let qs = &b[4..20];
    for j in 0..16 {
        y[j] = (qs[j] & 0x0F) as f32 * d + m;
        y[j + 16] = (qs[j] >> 4) as f32 * d + m;
    }
}

/// The 5th bits of a Q5 block's 32 elements, bit i for element i.
fn q5_high(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Q5_0: y = d * (q - 16), q 5 bits.
pub fn q5_0(b: &[u8], y: &mut [f32]) {
    let d = half(b, 0);
    let qh = q5_high(b, 2);
    let qs = &b[6..22];
    for j in 0..16 {
        let lo = (qs[j] & 0x0F) as u32 | ((qh >> j) & 1) << 4;
        let hi = (qs[j] >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4;
        y[j] = (lo as i32 - 16) as f32 * d;
        y[j + 16] = (hi as i32 - 16) as f32 * d;
    }
}

/// Q5_1: y = d * q + m, q 5 bits.
pub fn q5_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (half(b, 0), half(b, 2));
    let qh = q5_high(b, 4);
    let qs = &b[8..24];
    for j in 0..16 {
        let lo = (qs[j] & 0x0F) as u32 | ((qh >> j) & 1) << 4;
        let hi = (qs[j] >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4;
        y[j] = lo as f32 * d + m;
        y[j + 16] = hi as f32 * d + m;
    }
}

/// Scale and min of sub-block `j` (0..8) of a Q4_K/Q5_K block, 6 bits each, packed in 12
/// bytes: sub-blocks 0..4 in the low 6 bits of bytes 0..4 (scale) and 4..8 (min); sub-blocks
/// 4..8 in the nibbles of bytes 8..12 plus the top 2 bits of bytes 0..8.
fn k_scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Q4_K: 8 sub-blocks of 32; y = (d * scale) * q - (dmin * min).
pub fn q4_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (half(b, 0), half(b, 2));
    let scales = &b[4..16];
    let qs = &b[16..144];
    // Each 32 bytes of qs hold two sub-blocks: low nibbles, then high nibbles.
    for (chunk, (q, y)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let (sc, m) = k_scale_min(2 * chunk, scales);
        let (d1, m1) = (d * sc as f32, dmin * m as f32);
        let (sc, m) = k_scale_min(2 * chunk + 1, scales);
        let (d2, m2) = (d * sc as f32, dmin * m as f32);
        for l in 0..32 {
            y[l] = d1 * (q[l] & 0x0F) as f32 - m1;
            y[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

/// Q5_K: as Q4_K with a 5th bit per element from qh (bit 2c for the low-nibble sub-block of
/// chunk c, bit 2c+1 for the high one).
pub fn q5_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (half(b, 0), half(b, 2));
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for (chunk, (q, y)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let (sc, m) = k_scale_min(2 * chunk, scales);
        let (d1, m1) = (d * sc as f32, dmin * m as f32);
        let (sc, m) = k_scale_min(2 * chunk + 1, scales);
        let (d2, m2) = (d * sc as f32, dmin * m as f32);
        let (u1, u2) = (1u8 << (2 * chunk), 2u8 << (2 * chunk));
        for l in 0..32 {
            let lo = (q[l] & 0x0F) + if qh[l] & u1 != 0 { 16 } else { 0 };
            let hi = (q[l] >> 4) + if qh[l] & u2 != 0 { 16 } else { 0 };
            y[l] = d1 * lo as f32 - m1;
            y[l + 32] = d2 * hi as f32 - m2;
        }
    }
}

/// Q6_K: 16 sub-blocks of 16 with an i8 scale each; y = (d * scale) * (q - 32), q 6 bits
/// (4 from ql, 2 from qh).
pub fn q6_k(b: &[u8], y: &mut [f32]) {
    let d = f16::from_le_bytes([b[208], b[209]]).to_f32();
    // Two halves of 128 elements; each uses 64 bytes of ql, 32 of qh and 8 scales.
    for n in 0..2 {
        let ql = &b[64 * n..64 * n + 64];
        let qh = &b[128 + 32 * n..128 + 32 * n + 32];
        let sc = &b[192 + 8 * n..192 + 8 * n + 8];
        let y = &mut y[128 * n..128 * n + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            let scale = |k: usize| d * sc[is + k] as i8 as f32;
            y[l] = scale(0) * q1 as f32;
            y[l + 32] = scale(2) * q2 as f32;
            y[l + 64] = scale(4) * q3 as f32;
            y[l + 96] = scale(6) * q4 as f32;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Quantization
// ---------------------------------------------------------------------------------------
//
// Not llama.cpp's search for the scales that minimise the squared error (`make_qkx2_quants`
// and friends): every block's grid is set from its min/max so that it covers all of the
// block's values, and each stored scale (f16, 6-bit or i8 sub-scale) is rounded *up*, so that
// the grid still covers them. Every element then comes back within half a step of its value,
// |x − y| ≤ step / 2, the step being the block's d (sub-block's d·scale) as stored.

/// Quantize `src`, whole blocks of `ty`, into `ty`'s blocks: `src.len() / block_size ×
/// type_size` bytes in the layout [`dequantize`] reads.
pub fn quantize(ty: GgmlType, src: &[f32]) -> Vec<u8> {
    let mut dst = vec![0u8; src.len() / ty.block_size() * ty.type_size()];
    quantize_into(ty, src, &mut dst);
    dst
}

/// [`quantize`] into `dst` (`src.len() / block_size × type_size` bytes).
pub fn quantize_into(ty: GgmlType, src: &[f32], dst: &mut [u8]) {
    assert_eq!(src.len() % ty.block_size(), 0, "{ty}: partial block");
    assert_eq!(
        dst.len(),
        src.len() / ty.block_size() * ty.type_size(),
        "{ty}: destination bytes"
    );
    match ty {
        GgmlType::F32 => {
            for (o, x) in dst.chunks_exact_mut(4).zip(src) {
                o.copy_from_slice(&x.to_le_bytes());
            }
        }
        GgmlType::F16 => {
            for (o, x) in dst.chunks_exact_mut(2).zip(src) {
                o.copy_from_slice(&f16::from_f32(*x).to_le_bytes());
            }
        }
        GgmlType::BF16 => {
            for (o, x) in dst.chunks_exact_mut(2).zip(src) {
                o.copy_from_slice(&bf16::from_f32(*x).to_le_bytes());
            }
        }
        GgmlType::Q4_0 => to_blocks(src, dst, ty, quantize_q4_0),
        GgmlType::Q4_1 => to_blocks(src, dst, ty, quantize_q4_1),
        GgmlType::Q5_0 => to_blocks(src, dst, ty, quantize_q5_0),
        GgmlType::Q5_1 => to_blocks(src, dst, ty, quantize_q5_1),
        GgmlType::Q8_0 => to_blocks(src, dst, ty, quantize_q8_0),
        GgmlType::Q4_K => to_blocks(src, dst, ty, quantize_q4_k),
        GgmlType::Q5_K => to_blocks(src, dst, ty, quantize_q5_k),
        GgmlType::Q6_K => to_blocks(src, dst, ty, quantize_q6_k),
    }
}

fn to_blocks(src: &[f32], dst: &mut [u8], ty: GgmlType, one: fn(&[f32], &mut [u8])) {
    for (x, b) in src
        .chunks_exact(ty.block_size())
        .zip(dst.chunks_exact_mut(ty.type_size()))
    {
        one(x, b);
    }
}

/// The least f16 at or above `v` (a scale, ≥ 0), at most f16::MAX: stored, it does not
/// shrink the grid it spans.
fn f16_up(v: f32) -> f16 {
    let h = f16::from_f32(v);
    let h = match h.to_f32() < v {
        true => f16::from_bits(h.to_bits() + 1),
        false => h,
    };
    h.min(f16::MAX)
}

/// The greatest f16 at or below `v` (a Q4_1/Q5_1 minimum, any sign), at least f16::MIN.
fn f16_down(v: f32) -> f16 {
    let h = f16::from_f32(v).max(f16::MIN);
    if h.to_f32() <= v {
        h
    } else if h.to_f32() > 0.0 {
        f16::from_bits(h.to_bits() - 1)
    } else if h.to_f32() == 0.0 {
        -f16::from_bits(1)
    } else {
        f16::from_bits(h.to_bits() + 1).max(f16::MIN)
    }
}

fn put_half(b: &mut [u8], at: usize, h: f16) {
    b[at..at + 2].copy_from_slice(&h.to_le_bytes());
}

/// 1 / step, or 0 for a zero step (an all-zero block: every q is then the zero point).
fn inverse(step: f32) -> f32 {
    if step > 0.0 {
        1.0 / step
    } else {
        0.0
    }
}

/// `v` rounded to the nearest integer (halves up) for `v` ≥ -½, which is all that is asked of
/// it: every level is offset to start at 0 and clamped after. Truncating `v + ½` is one
/// instruction, where `f32::round` is a library call on x86-64.
fn level(v: f32) -> i32 {
    (v + 0.5) as i32
}

fn abs_max(x: &[f32]) -> f32 {
    x.iter().fold(0f32, |m, v| m.max(v.abs()))
}

fn min_max(x: &[f32]) -> (f32, f32) {
    x.iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        })
}

/// Symmetric levels -zero..=zero-1 around `zero`: d = max|x| / (zero - ½), so that x / d lies
/// in [-(zero - ½), zero - ½] and rounds into the levels. Returns d and the levels 0..2·zero.
fn symmetric(x: &[f32], zero: i32, q: &mut [u8]) -> f16 {
    let d = f16_up(abs_max(x) / (zero as f32 - 0.5));
    let id = inverse(d.to_f32());
    for (q, &v) in q.iter_mut().zip(x) {
        *q = level(v * id + zero as f32).clamp(0, 2 * zero - 1) as u8;
    }
    d
}

/// Levels 0..=top from the block's minimum m: d = (max - m) / top. Returns d and m.
fn from_min(x: &[f32], top: i32, q: &mut [u8]) -> (f16, f16) {
    let (lo, hi) = min_max(x);
    let m = f16_down(lo);
    let d = f16_up((hi - m.to_f32()) / top as f32);
    let (id, m) = (inverse(d.to_f32()), m.to_f32());
    for (q, &v) in q.iter_mut().zip(x) {
        *q = level((v - m) * id).clamp(0, top) as u8;
    }
    (d, f16::from_f32(m))
}

/// Two 32-element halves' levels in nibbles: low = element j, high = element j + 16.
fn pack_nibbles(q: &[u8; 32], qs: &mut [u8]) {
    for j in 0..16 {
        qs[j] = (q[j] & 0x0F) | (q[j + 16] & 0x0F) << 4;
    }
}

/// The 5th bits of 32 levels, bit j for element j.
fn high_bits(q: &[u8; 32]) -> [u8; 4] {
    let h = (0..32).fold(0u32, |h, j| h | u32::from(q[j] >> 4) << j);
    h.to_le_bytes()
}

pub fn quantize_q8_0(x: &[f32], b: &mut [u8]) {
    let d = f16_up(abs_max(x) / 127.0);
    let id = inverse(d.to_f32());
    put_half(b, 0, d);
    for (q, &v) in b[2..34].iter_mut().zip(x) {
        *q = (level(v * id + 128.0) - 128).clamp(-127, 127) as i8 as u8;
    }
}

pub fn quantize_q4_0(x: &[f32], b: &mut [u8]) {
    let mut q = [0u8; 32];
    put_half(b, 0, symmetric(x, 8, &mut q));
    pack_nibbles(&q, &mut b[2..18]);
}

pub fn quantize_q4_1(x: &[f32], b: &mut [u8]) {
    let mut q = [0u8; 32];
    let (d, m) = from_min(x, 15, &mut q);
    put_half(b, 0, d);
    put_half(b, 2, m);
    pack_nibbles(&q, &mut b[4..20]);
}

pub fn quantize_q5_0(x: &[f32], b: &mut [u8]) {
    let mut q = [0u8; 32];
    put_half(b, 0, symmetric(x, 16, &mut q));
    b[2..6].copy_from_slice(&high_bits(&q));
    pack_nibbles(&q, &mut b[6..22]);
}

pub fn quantize_q5_1(x: &[f32], b: &mut [u8]) {
    let mut q = [0u8; 32];
    let (d, m) = from_min(x, 31, &mut q);
    put_half(b, 0, d);
    put_half(b, 2, m);
    b[4..8].copy_from_slice(&high_bits(&q));
    pack_nibbles(&q, &mut b[8..24]);
}

/// `v` / `unit` rounded up to a 6-bit (or `top`) multiple, 0 for a zero unit.
fn units_up(v: f32, unit: f32, top: u8) -> u8 {
    match unit > 0.0 {
        true => (v / unit).ceil().clamp(0.0, top as f32) as u8,
        false => 0,
    }
}

/// The super-block of Q4_K/Q5_K (levels 0..=top, 15 or 31): 8 sub-blocks of 32 with
/// y = d·sc·q − dmin·m. The offsets m come first, rounded up so that each sub-block's
/// minimum (or 0, whichever is lower) is on the grid; then the scales, rounded up so that
/// the grid reaches its maximum. Returns d, dmin, the 12 packed scale bytes and the levels.
fn k_quants(x: &[f32], top: u8, q: &mut [u8; 256]) -> (f16, f16, [u8; 12]) {
    let ranges: [(f32, f32); 8] = std::array::from_fn(|j| min_max(&x[32 * j..32 * j + 32]));
    let offsets = ranges.map(|(lo, _)| -lo.min(0.0));
    let dmin = f16_up(offsets.iter().fold(0f32, |a, &b| a.max(b)) / 63.0);
    let mins = offsets.map(|m| units_up(m, dmin.to_f32(), 63));
    let steps: [f32; 8] = std::array::from_fn(|j| {
        ((ranges[j].1 + dmin.to_f32() * mins[j] as f32) / top as f32).max(0.0)
    });
    let d = f16_up(steps.iter().fold(0f32, |a, &b| a.max(b)) / 63.0);
    let scales = steps.map(|s| units_up(s, d.to_f32(), 63));
    for j in 0..8 {
        let step = d.to_f32() * scales[j] as f32;
        let (id, offset) = (inverse(step), dmin.to_f32() * mins[j] as f32);
        for (q, &v) in q[32 * j..32 * j + 32].iter_mut().zip(&x[32 * j..]) {
            *q = level((v + offset) * id).clamp(0, top as i32) as u8;
        }
    }
    let mut packed = [0u8; 12];
    for j in 0..4 {
        // The inverse of `k_scale_min`.
        packed[j] = scales[j] | (scales[j + 4] >> 4) << 6;
        packed[j + 4] = mins[j] | (mins[j + 4] >> 4) << 6;
        packed[j + 8] = (scales[j + 4] & 0x0F) | (mins[j + 4] & 0x0F) << 4;
    }
    (d, dmin, packed)
}

pub fn quantize_q4_k(x: &[f32], b: &mut [u8]) {
    let mut q = [0u8; 256];
    let (d, dmin, scales) = k_quants(x, 15, &mut q);
    put_half(b, 0, d);
    put_half(b, 2, dmin);
    b[4..16].copy_from_slice(&scales);
    // Each 32 bytes of qs hold two sub-blocks: low nibbles, then high nibbles.
    for (chunk, qs) in b[16..144].chunks_exact_mut(32).enumerate() {
        for l in 0..32 {
            qs[l] = q[64 * chunk + l] | q[64 * chunk + 32 + l] << 4;
        }
    }
}

pub fn quantize_q5_k(x: &[f32], b: &mut [u8]) {
    let mut q = [0u8; 256];
    let (d, dmin, scales) = k_quants(x, 31, &mut q);
    put_half(b, 0, d);
    put_half(b, 2, dmin);
    b[4..16].copy_from_slice(&scales);
    let (qh, qs) = b[16..176].split_at_mut(32);
    qh.fill(0);
    for (chunk, qs) in qs.chunks_exact_mut(32).enumerate() {
        for l in 0..32 {
            let (lo, hi) = (q[64 * chunk + l], q[64 * chunk + 32 + l]);
            qs[l] = (lo & 0x0F) | (hi & 0x0F) << 4;
            qh[l] |= (lo >> 4) << (2 * chunk) | (hi >> 4) << (2 * chunk + 1);
        }
    }
}

/// Q6_K: 16 sub-blocks of 16, each with step d·sc (sc an i8, here ≥ 0) = max|x| / 31.5 rounded
/// up, levels q − 32 in -32..=31.
pub fn quantize_q6_k(x: &[f32], b: &mut [u8]) {
    let steps: [f32; 16] = std::array::from_fn(|j| abs_max(&x[16 * j..16 * j + 16]) / 31.5);
    let d = f16_up(steps.iter().fold(0f32, |a, &b| a.max(b)) / 127.0);
    let scales = steps.map(|s| units_up(s, d.to_f32(), 127));
    let mut q = [0u8; 256];
    for (j, &sc) in scales.iter().enumerate() {
        let id = inverse(d.to_f32() * sc as f32);
        for (q, &v) in q[16 * j..16 * j + 16].iter_mut().zip(&x[16 * j..]) {
            *q = level(v * id + 32.0).clamp(0, 63) as u8;
        }
    }
    // Two halves of 128 elements, each in 64 bytes of ql and 32 of qh (as `q6_k` reads them).
    for n in 0..2 {
        let q = &q[128 * n..128 * n + 128];
        for l in 0..32 {
            let (q1, q2, q3, q4) = (q[l], q[l + 32], q[l + 64], q[l + 96]);
            b[64 * n + l] = (q1 & 0x0F) | (q3 & 0x0F) << 4;
            b[64 * n + l + 32] = (q2 & 0x0F) | (q4 & 0x0F) << 4;
            b[128 + 32 * n + l] = q1 >> 4 | (q2 >> 4) << 2 | (q3 >> 4) << 4 | (q4 >> 4) << 6;
        }
    }
    b[192..208].copy_from_slice(&scales);
    put_half(b, 208, d);
}

#[cfg(test)]
mod tests {
    //! Vectors from gguf-py's `gguf.quants.dequantize` (scripts/make_quant_vectors.py):
    //! `tests/data/gguf/quant/<TYPE>.blocks` holds random blocks (finite f16 scales), and
    //! `<TYPE>.f32` the little-endian f32 values gguf-py decodes them to.

    use super::*;
    use std::path::PathBuf;

    fn check(ty: GgmlType) {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/gguf/quant");
        let blocks = std::fs::read(dir.join(format!("{}.blocks", ty.name()))).unwrap();
        let expected: Vec<f32> = std::fs::read(dir.join(format!("{}.f32", ty.name())))
            .unwrap()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(
            blocks.len() / ty.type_size() * ty.block_size(),
            expected.len()
        );
        assert!(expected.len() >= 1024, "too few vectors for {ty}");
        let mut got = vec![0f32; expected.len()];
        dequantize(ty, &blocks, &mut got);
        for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
            assert_eq!(g.to_bits(), e.to_bits(), "{ty} element {i}: {g} vs {e}");
        }
    }

    #[test]
    fn f16_matches_gguf_py() {
        check(GgmlType::F16);
    }

    #[test]
    fn bf16_matches_gguf_py() {
        check(GgmlType::BF16);
    }

    #[test]
    fn q8_0_matches_gguf_py() {
        check(GgmlType::Q8_0);
    }

    #[test]
    fn q4_0_matches_gguf_py() {
        check(GgmlType::Q4_0);
    }

    #[test]
    fn q4_1_matches_gguf_py() {
        check(GgmlType::Q4_1);
    }

    #[test]
    fn q5_0_matches_gguf_py() {
        check(GgmlType::Q5_0);
    }

    #[test]
    fn q5_1_matches_gguf_py() {
        check(GgmlType::Q5_1);
    }

    #[test]
    fn q4_k_matches_gguf_py() {
        check(GgmlType::Q4_K);
    }

    #[test]
    fn q5_k_matches_gguf_py() {
        check(GgmlType::Q5_K);
    }

    #[test]
    fn q6_k_matches_gguf_py() {
        check(GgmlType::Q6_K);
    }

    #[test]
    fn type_ids_round_trip() {
        for id in 0..64 {
            if let Ok(t) = GgmlType::from_id(id) {
                assert_eq!(t.id(), id);
            }
        }
        assert_eq!(GgmlType::from_id(10), Err(Some("Q2_K")));
        assert_eq!(GgmlType::from_id(999), Err(None));
    }

    // Quantization: round trips through `dequantize`.

    /// Normal values (Box-Muller over a 64-bit LCG), `std` × N(0, 1), with a few outliers.
    fn normal(n: usize, std: f32, seed: u64) -> Vec<f32> {
        let mut s = seed;
        let mut uniform = move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        (0..n)
            .map(|i| {
                let z = (-2.0 * uniform().ln()).sqrt() * (std::f64::consts::TAU * uniform()).cos();
                let outlier = if i % 997 == 3 { 8.0 } else { 1.0 };
                (z * std as f64 * outlier) as f32
            })
            .collect()
    }

    /// The step of the grid that element `i` (of the block `b`) was rounded to: d, or d·scale
    /// of its sub-block, as stored.
    fn step(ty: GgmlType, b: &[u8], i: usize) -> f32 {
        match ty {
            GgmlType::Q4_K | GgmlType::Q5_K => half(b, 0) * k_scale_min(i / 32, &b[4..16]).0 as f32,
            GgmlType::Q6_K => half(b, 208) * b[192 + i / 16] as i8 as f32,
            _ => half(b, 0),
        }
    }

    const QUANTIZED: [GgmlType; 8] = [
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ];

    /// Quantize and dequantize `x`; check every element is finite and within half its step
    /// (and a hair of f32 rounding); return the relative L2 error.
    fn round_trip(ty: GgmlType, x: &[f32]) -> f64 {
        let blocks = quantize(ty, x);
        assert_eq!(blocks.len(), x.len() / ty.block_size() * ty.type_size());
        let mut y = vec![0f32; x.len()];
        dequantize(ty, &blocks, &mut y);
        for (i, (&x, &y)) in x.iter().zip(&y).enumerate() {
            let block = &blocks[i / ty.block_size() * ty.type_size()..][..ty.type_size()];
            let step = step(ty, block, i % ty.block_size());
            assert!(y.is_finite() && step.is_finite(), "{ty} element {i}: {y}");
            let bound = step / 2.0 + 1e-6 * x.abs().max(step) + 1e-30;
            assert!(
                (x - y).abs() <= bound,
                "{ty} element {i}: {x} came back as {y}, step {step}"
            );
        }
        let err: f64 = x
            .iter()
            .zip(&y)
            .map(|(a, b)| (a - b) as f64 * (a - b) as f64)
            .sum();
        let norm: f64 = x.iter().map(|a| *a as f64 * *a as f64).sum();
        (err / norm).sqrt()
    }

    #[test]
    fn quantized_normal_values_are_within_half_a_step() {
        // Relative L2 error of N(0, σ²) data with an outlier of 8σ every 997 elements,
        // measured (the same for every σ): Q8_0 0.0059, Q6_K 0.021, Q5_1 0.039, Q5_K 0.040,
        // Q5_0 0.050, Q4_1 0.081, Q4_K 0.083, Q4_0 0.103. Bounds about 1.3× those.
        let bound = |ty: GgmlType| match ty {
            GgmlType::Q8_0 => 0.008,
            GgmlType::Q6_K => 0.028,
            GgmlType::Q5_1 | GgmlType::Q5_K => 0.055,
            GgmlType::Q5_0 => 0.065,
            GgmlType::Q4_1 | GgmlType::Q4_K => 0.11,
            _ => 0.135,
        };
        for std in [0.02, 1.0, 300.0] {
            let x = normal(256 * 64, std, 7);
            for ty in QUANTIZED {
                let rel = round_trip(ty, &x);
                assert!(rel < bound(ty), "{ty} σ {std}: relative L2 error {rel}");
            }
        }
    }

    #[test]
    fn zero_constant_and_one_signed_blocks_round_trip() {
        let zeros = vec![0f32; 512];
        for ty in QUANTIZED {
            let blocks = quantize(ty, &zeros);
            let mut y = vec![1f32; 512];
            dequantize(ty, &blocks, &mut y);
            assert!(
                y.iter().all(|&v| v == 0.0),
                "{ty}: zeros came back as {y:?}"
            );
            for c in [0.5f32, -0.25, 3.0, 1e-3] {
                round_trip(ty, &vec![c; 512]);
            }
            // All positive, all negative, one element nonzero, tiny values (f16 subnormal
            // scales): each within its bound.
            let ramp: Vec<f32> = (0..512).map(|i| 1.0 + i as f32 / 100.0).collect();
            round_trip(ty, &ramp);
            round_trip(ty, &ramp.iter().map(|v| -v).collect::<Vec<_>>());
            let mut spike = vec![0f32; 512];
            spike[300] = -2.5;
            round_trip(ty, &spike);
            round_trip(ty, &normal(512, 1e-6, 3));
        }
    }

    #[test]
    fn float_types_round_trip() {
        let x = normal(1024, 1.0, 5);
        let mut y = vec![0f32; x.len()];
        dequantize(GgmlType::F32, &quantize(GgmlType::F32, &x), &mut y);
        assert_eq!(x, y);
        for (ty, eps) in [(GgmlType::F16, 1e-3), (GgmlType::BF16, 8e-3)] {
            dequantize(ty, &quantize(ty, &x), &mut y);
            for (a, b) in x.iter().zip(&y) {
                assert!((a - b).abs() <= eps * a.abs() + 1e-4, "{ty}: {a} vs {b}");
            }
        }
    }
}
