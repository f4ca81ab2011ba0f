//! RoPE over several position axes (Z-Image's caption index / row / column; Flux and
//! Qwen-Image use the same scheme): each head's pairs are split among the axes, and a token's
//! angle for pair `j` of axis `a` is `pos[a] · theta^(−2j / dims[a])`.

use std::sync::Arc;

use crate::model::rope_memo::TableMemo;

/// Per-token angles as [`DitOps::rope_interleaved`](crate::backend::dit::DitOps) takes them:
/// `[tokens, head_dim]` f32, `(cos, sin)` of each pair, axis 0's pairs first.
pub struct AxesRope {
    /// `[axes][pairs of that axis]` inverse frequencies, f64 as diffusers computes them.
    inv_freq: Vec<Vec<f64>>,
    memo: TableMemo<[u32; 3]>,
}

impl AxesRope {
    /// `dims[a]` (even) head dims rotated by axis `a`.
    pub fn new(theta: f64, dims: &[usize]) -> AxesRope {
        let inv_freq = dims
            .iter()
            .map(|&d| {
                (0..d / 2)
                    .map(|j| 1.0 / theta.powf((2 * j) as f64 / d as f64))
                    .collect()
            })
            .collect();
        AxesRope {
            inv_freq,
            memo: TableMemo::default(),
        }
    }

    /// Head dims covered: twice the pairs of every axis.
    pub fn head_dim(&self) -> usize {
        2 * self.inv_freq.iter().map(Vec::len).sum::<usize>()
    }

    /// The table for tokens at `positions` (one position per axis each): the angle is
    /// computed in f64 and rounded to f32, then cos and sin in f32 (diffusers' `torch.outer`
    /// in float64, `.float()`, `torch.polar`).
    /// Made once for the positions of a step and kept for the steps after
    /// ([`TableMemo`]).
    pub fn table(&self, positions: &[[u32; 3]]) -> Arc<Vec<f32>> {
        self.memo.get(positions, || self.make(positions))
    }

    fn make(&self, positions: &[[u32; 3]]) -> Vec<f32> {
        assert_eq!(self.inv_freq.len(), 3, "three axes");
        let mut out = Vec::with_capacity(positions.len() * self.head_dim());
        for pos in positions {
            for (axis, freqs) in self.inv_freq.iter().enumerate() {
                for &f in freqs {
                    let angle = (pos[axis] as f64 * f) as f32;
                    out.push(angle.cos());
                    out.push(angle.sin());
                }
            }
        }
        out
    }
}
