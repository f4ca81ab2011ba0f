//! Flux's RoPE positions (diffusers `FluxPosEmbed` over the pipeline's `txt_ids` and
//! `img_ids`) and their per-token table.
//!
//! Each head's pairs are split among three axes (`axes_dims_rope` dims each, axis 0's pairs
//! first), and pair `j` of axis `a` turns by `pos[a] · theta^(−2j / dims[a])`, theta 10000,
//! over interleaved pairs (`repeat_interleave_real`: the pair is `(x[2i], x[2i+1])`). The
//! pipeline's ids:
//! - image token (y, x) of the `(h/2) × (w/2)` grid sits at `(0, y, x)`;
//! - every text token sits at `(0, 0, 0)`: its rotation is the identity.
//!
//! diffusers computes the angles and their cosines in f64 (`freqs_dtype = float64` on CUDA
//! and the CPU) and rounds the table to f32; so does this.

use std::sync::Arc;

use crate::model::rope_memo::TableMemo;

/// RoPE's theta, fixed in diffusers' `FluxTransformer2DModel`.
const THETA: f64 = 10000.0;

pub struct FluxRope {
    /// `[axes][pairs of that axis]` inverse frequencies, f64 as diffusers computes them.
    inv_freq: Vec<Vec<f64>>,
    memo: TableMemo<[u32; 3]>,
}

impl FluxRope {
    /// `dims[a]` (even) head dims rotated by axis `a`.
    pub fn new(dims: &[usize]) -> FluxRope {
        let inv_freq = dims
            .iter()
            .map(|&d| {
                (0..d / 2)
                    .map(|j| 1.0 / THETA.powf((2 * j) as f64 / d as f64))
                    .collect()
            })
            .collect();
        FluxRope {
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
    pub fn table(&self, positions: &[[u32; 3]]) -> Arc<Vec<f32>> {
        self.memo.get(positions, || self.make(positions))
    }

    fn make(&self, positions: &[[u32; 3]]) -> Vec<f32> {
        assert_eq!(self.inv_freq.len(), 3, "three axes");
        let mut out = Vec::with_capacity(positions.len() * self.head_dim());
        for pos in positions {
            for (axis, freqs) in self.inv_freq.iter().enumerate() {
                for &f in freqs {
                    let angle = pos[axis] as f64 * f;
                    out.push(angle.cos() as f32);
                    out.push(angle.sin() as f32);
                }
            }
        }
        out
    }

    /// The table of `tokens` text tokens: all at the origin, `(1, 0)` for every pair.
    pub fn text_table(&self, tokens: usize) -> Arc<Vec<f32>> {
        self.table(&vec![[0; 3]; tokens])
    }
}

/// Positions of an image of `rows × cols` tokens, row-major: `(0, row, col)`.
pub fn image_positions(rows: usize, cols: usize) -> Vec<[u32; 3]> {
    (0..rows as u32)
        .flat_map(|y| (0..cols as u32).map(move |x| [0, y, x]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_tokens_sit_at_their_row_and_column_and_text_at_the_origin() {
        let p = image_positions(2, 3);
        assert_eq!(
            p,
            vec![
                [0, 0, 0],
                [0, 0, 1],
                [0, 0, 2],
                [0, 1, 0],
                [0, 1, 1],
                [0, 1, 2]
            ]
        );
        let rope = FluxRope::new(&[2, 4, 2]);
        assert_eq!(rope.head_dim(), 8);
        assert_eq!(
            *rope.text_table(1),
            vec![1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
        );
        // Token (1, 2): the row axis's first pair turns by 1 radian, the column's by 2.
        let t = rope.table(&[[0, 1, 2]]);
        assert_eq!((t[2], t[3]), (1f64.cos() as f32, 1f64.sin() as f32));
        assert_eq!((t[6], t[7]), (2f64.cos() as f32, 2f64.sin() as f32));
    }
}
