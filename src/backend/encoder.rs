//! The operations the text encoders of image pipelines (T5, CLIP) need beyond
//! [`DitOps`]'s: LayerNorm with weight and bias, quick-GELU, GELU-tanh on gated pairs, and
//! attention with an additive per-head bias by relative position and no scaling (T5's).
//!
//! Everything else they use is already there: RMSNorm without an offset (T5's LayerNorm is
//! [`Backend::rms_norm`](super::Backend::rms_norm)), linears with bias, and causal attention
//! scaled by `1/√head_dim` (CLIP's is [`Backend::attention`](super::Backend::attention)
//! without RoPE).

use std::ops::Range;

use super::dit::DitOps;
use crate::error::Result;

/// `x · sigmoid(1.702 · x)`: CLIP's `quick_gelu`.
pub fn quick_gelu(x: f32) -> f32 {
    x / (1.0 + (-1.702 * x).exp())
}

pub trait EncoderOps: DitOps {
    /// LayerNorm over each row with affine parameters: `(x − mean) / sqrt(var + eps) · w + b`
    /// (biased variance, as torch). `w` and `b` are `[cols]`.
    fn layer_norm_affine(
        &self,
        x: &Self::Activation,
        w: &Self::Weight,
        b: &Self::Weight,
        eps: f32,
    ) -> Result<Self::Activation>;

    /// [`quick_gelu`] elementwise, in place.
    fn quick_gelu(&self, x: &mut Self::Activation) -> Result<()>;

    /// `gate = gelu_tanh(gate) · up` elementwise, in place (T5's gated-gelu feed-forward:
    /// `gelu_new(wi_0(x)) · wi_1(x)`).
    fn gelu_tanh_mul(&self, gate: &mut Self::Activation, up: &Self::Activation) -> Result<()>;

    /// Non-causal multi-head attention of each sample over its own rows, without scaling the
    /// scores and with a bias added to them by relative position (T5's):
    /// `softmax_j(q_i · k_j + bias[j − i + span − 1, h]) · v_j` for rows `i, j` of a sample,
    /// head `h`. `bias` is `[2·span − 1, heads]`; every sample has at most `span` rows. q, k,
    /// v are `[rows, heads·head_dim]`; the result has q's shape (rows outside every sample
    /// unspecified).
    #[allow(clippy::too_many_arguments)]
    fn attention_biased(
        &self,
        q: &Self::Activation,
        k: &Self::Activation,
        v: &Self::Activation,
        bias: &Self::Activation,
        samples: &[Range<usize>],
        heads: usize,
        head_dim: usize,
    ) -> Result<Self::Activation>;
}
