//! Qwen-Image's RoPE positions (diffusers `QwenEmbedRope` with `scale_rope=True`, as the
//! transformer builds it) and their per-token table.
//!
//! Each head's pairs are split among three axes (frame, row, column; `axes_dims_rope`
//! dims each, axis 0's pairs first), and pair `j` of axis `a` turns by `pos[a] ·
//! theta^(−2j / dims[a])`, theta 10000. For an image of `rows × cols` tokens:
//! - image token (y, x) sits at `(0, y − ⌈rows/2⌉, x − ⌈cols/2⌉)`: centred, the negative
//!   half one longer when the count is odd (diffusers joins `neg_freqs[-(h − h//2):]` and
//!   `pos_freqs[:h//2]`);
//! - text token k sits at `m + k` on all three axes, `m = max(rows/2, cols/2)` (floors);
//!   pads after a sample's valid tokens take later positions and never matter (masked).
//!
//! diffusers computes angles in f32 (`torch.outer` of the integer positions and the f32
//! inverse frequencies), then `torch.polar` in f32; so does this.

use std::sync::Arc;

use crate::model::rope_memo::TableMemo;

/// RoPE's theta, fixed in diffusers' `QwenImageTransformer2DModel`.
const THETA: f32 = 10000.0;
/// Rows of diffusers' precomputed tables: positions −4096..4095 exist.
pub const MAX_POSITIONS: usize = 4096;

pub struct QwenRope {
    /// `[axes][pairs of that axis]` inverse frequencies, f32 as diffusers computes them.
    inv_freq: Vec<Vec<f32>>,
    memo: TableMemo<[i32; 3]>,
}

impl QwenRope {
    /// `dims[a]` (even) head dims rotated by axis `a`.
    pub fn new(dims: &[usize]) -> QwenRope {
        let inv_freq = dims
            .iter()
            .map(|&d| {
                (0..d / 2)
                    .map(|j| 1.0 / THETA.powf((2 * j) as f32 / d as f32))
                    .collect()
            })
            .collect();
        QwenRope {
            inv_freq,
            memo: TableMemo::default(),
        }
    }

    /// Head dims covered: twice the pairs of every axis.
    pub fn head_dim(&self) -> usize {
        2 * self.inv_freq.iter().map(Vec::len).sum::<usize>()
    }

    /// The table `[positions, head_dim]` of `(cos, sin)` per pair, as
    /// [`DitOps::rope_interleaved`](crate::backend::dit::DitOps) takes it; made once for the
    /// positions of a step and kept for the steps after ([`TableMemo`]).
    pub fn table(&self, positions: &[[i32; 3]]) -> Arc<Vec<f32>> {
        self.memo.get(positions, || self.make(positions))
    }

    fn make(&self, positions: &[[i32; 3]]) -> Vec<f32> {
        assert_eq!(self.inv_freq.len(), 3, "three axes");
        let mut out = Vec::with_capacity(positions.len() * self.head_dim());
        for pos in positions {
            for (axis, freqs) in self.inv_freq.iter().enumerate() {
                for &f in freqs {
                    let angle = pos[axis] as f32 * f;
                    out.push(angle.cos());
                    out.push(angle.sin());
                }
            }
        }
        out
    }
}

/// Positions of an image of `rows × cols` tokens, row-major.
pub fn image_positions(rows: usize, cols: usize) -> Vec<[i32; 3]> {
    let (y0, x0) = (rows.div_ceil(2) as i32, cols.div_ceil(2) as i32);
    (0..rows as i32)
        .flat_map(|y| (0..cols as i32).map(move |x| [0, y - y0, x - x0]))
        .collect()
}

/// Positions of `tokens` text tokens beside an image of `rows × cols` tokens.
pub fn text_positions(rows: usize, cols: usize, tokens: usize) -> Vec<[i32; 3]> {
    let m = text_start(rows, cols);
    (0..tokens as i32).map(|k| [m + k; 3]).collect()
}

/// The first text position: `max(rows/2, cols/2)`.
pub fn text_start(rows: usize, cols: usize) -> i32 {
    (rows / 2).max(cols / 2) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_sizes_centre_with_the_longer_half_negative() {
        let p = image_positions(3, 5);
        assert_eq!(p[0], [0, -2, -3]);
        assert_eq!(p[4], [0, -2, 1]);
        assert_eq!(p[14], [0, 0, 1]);
        let p = image_positions(4, 4);
        assert_eq!((p[0], p[15]), ([0, -2, -2], [0, 1, 1]));
        assert_eq!(text_positions(3, 5, 2), vec![[2; 3], [3; 3]]);
        assert_eq!(text_start(4, 4), 2);
    }
}
