//! The operations a diffusion transformer needs beyond [`Backend`]'s: adaptive modulation by
//! per-sample vectors, gated residuals, LayerNorm without affine, elementwise activations,
//! RoPE over interleaved pairs with a per-token table, and non-causal attention within each
//! sample.
//!
//! A pass holds several samples (images of a batch, the two branches of guidance) stacked
//! row-wise: sample `s` owns the rows `samples[s]` of every activation, and row `s` of a
//! per-sample table (`[samples, width]`: the timestep's modulation vectors) applies to them.
//! Samples never attend to each other.

use std::ops::Range;

use super::Backend;
use crate::error::Result;

/// An elementwise function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pointwise {
    /// `x · sigmoid(x)`
    Silu,
    Tanh,
    /// GELU with the tanh approximation (torch's `gelu(approximate="tanh")`):
    /// `0.5 · x · (1 + tanh(√(2/π) · (x + 0.044715 · x³)))`.
    GeluTanh,
}

/// √(2/π), as torch spells it (`M_SQRT2 · M_2_SQRTPI · 0.5`).
const GELU_SQRT_2_OVER_PI: f32 = std::f32::consts::SQRT_2 * std::f32::consts::FRAC_2_SQRT_PI * 0.5;

impl Pointwise {
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Pointwise::Silu => x / (1.0 + (-x).exp()),
            Pointwise::Tanh => x.tanh(),
            Pointwise::GeluTanh => {
                let inner = GELU_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x);
                0.5 * x * (1.0 + inner.tanh())
            }
        }
    }
}

pub trait DitOps: Backend {
    /// A RoPE table `[rows, head_dim]` of `(cos, sin)` pairs, kept in f32 on every backend
    /// (rounding angles' cosines to bf16 would cost more accuracy than the reference's bf16
    /// run loses).
    type RopeTable;

    /// A RoPE table from host f32 `[rows, cols]`, row-major.
    fn rope_table(&self, data: &[f32], rows: usize, cols: usize) -> Result<Self::RopeTable>;

    /// An activation `[rows, cols]` from host f32, row-major (patches, caption features,
    /// timestep features, RoPE tables).
    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Result<Self::Activation>;

    /// `f(x)` elementwise, in place.
    fn pointwise(&self, x: &mut Self::Activation, f: Pointwise) -> Result<()>;

    /// `x` `[rows, parts·w]` as `parts` activations `[rows, w]`, left to right (the chunks
    /// of a modulation vector).
    fn split_cols(&self, x: &Self::Activation, parts: usize) -> Result<Vec<Self::Activation>>;

    /// LayerNorm over each row without affine parameters: `(x − mean) / sqrt(var + eps)`.
    fn layer_norm(&self, x: &Self::Activation, eps: f32) -> Result<Self::Activation>;

    /// Adaptive modulation in place: the rows of sample `s` become `x · (1 + scale[s])`, plus
    /// `shift[s]` when given. `scale` and `shift` are `[samples.len(), cols]`.
    fn modulate(
        &self,
        x: &mut Self::Activation,
        samples: &[Range<usize>],
        scale: &Self::Activation,
        shift: Option<&Self::Activation>,
    ) -> Result<()>;

    /// Gated residual: the rows of sample `s` become `x + gate[s] · y`. `gate` is
    /// `[samples.len(), cols]`, `y` has `x`'s shape.
    fn add_gated(
        &self,
        x: &mut Self::Activation,
        samples: &[Range<usize>],
        gate: &Self::Activation,
        y: &Self::Activation,
    ) -> Result<()>;

    /// Rotate every head of `x` `[rows, heads·head_dim]` in place, as complex numbers over
    /// interleaved pairs `(x[2i], x[2i+1])`: pair `i` of row `r` is multiplied by
    /// `cos + i·sin` with `(cos, sin) = table[r, 2i], table[r, 2i+1]`. `table` is
    /// `[rows, head_dim]`: each token's angles, the same for every head (the model computes
    /// them from its position rules).
    fn rope_interleaved(
        &self,
        x: &mut Self::Activation,
        table: &Self::RopeTable,
        head_dim: usize,
    ) -> Result<()>;

    /// Non-causal multi-head attention of each sample over its own rows: the queries of rows
    /// `samples[s]` attend to the keys and values of the same rows only. q, k, v are
    /// `[rows, heads·head_dim]`; the result has q's shape. Scale `1/sqrt(head_dim)`.
    fn attention_within(
        &self,
        q: &Self::Activation,
        k: &Self::Activation,
        v: &Self::Activation,
        samples: &[Range<usize>],
        heads: usize,
        head_dim: usize,
    ) -> Result<Self::Activation>;
}
