//! ggml tensor types and their dequantization to f32, block by block, matching ggml's
//! `dequantize_row_*` bit for bit (f32 arithmetic in the same order, no fused multiply-add).
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
}
