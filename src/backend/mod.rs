//! Compute backends. The model is written once against [`Backend`]; `cpu` is the f32
//! reference used by tests everywhere.

pub mod cpu;

use crate::checkpoint::HostTensor;
use crate::error::Result;

/// The shape of attention, shared by every layer.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Attend to at most this many previous positions (None: all).
    pub sliding_window: Option<usize>,
}

/// A per-sequence cache of keys and values for every layer.
pub trait KvCache {
    /// Positions already cached (the position of the next token).
    fn len(&self) -> usize;
    /// Most positions the cache can hold.
    fn capacity(&self) -> usize;
    /// Mark `n` more positions as written, after every layer has appended them.
    fn advance(&mut self, n: usize);
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The operations a Llama-family forward pass needs. Activations are row-major
/// `[tokens, features]`.
pub trait Backend {
    /// A weight where this backend reads it.
    type Weight;
    /// An activation `[rows, cols]`.
    type Activation;
    type KvCache: KvCache;

    /// Make a host tensor usable by this backend (a view on the CPU, an upload on a GPU).
    fn weight(&self, t: &HostTensor) -> Result<Self::Weight>;
    fn kv_cache(
        &self,
        layers: usize,
        shape: AttentionShape,
        capacity: usize,
    ) -> Result<Self::KvCache>;

    /// Rows `ids` of `table` `[vocab, hidden]`.
    fn embed(&self, table: &Self::Weight, ids: &[u32]) -> Result<Self::Activation>;
    /// RMSNorm over each row of width `w.len()`: `x / sqrt(mean(x²) + eps) * w`. Applied per
    /// head when `x`'s rows are wider than `w` (q/k norm).
    fn rms_norm(&self, x: &Self::Activation, w: &Self::Weight, eps: f32) -> Self::Activation;
    /// `x @ wᵀ + bias`: x `[t, in]`, w `[out, in]`, bias `[out]` → `[t, out]`.
    fn linear(
        &self,
        x: &Self::Activation,
        w: &Self::Weight,
        bias: Option<&Self::Weight>,
    ) -> Self::Activation;
    /// Rotate q `[t, heads*head_dim]` and k `[t, kv_heads*head_dim]` in place (rotate-half
    /// layout) for positions `pos0..pos0+t`.
    fn rope(
        &self,
        q: &mut Self::Activation,
        k: &mut Self::Activation,
        pos0: usize,
        inv_freq: &[f32],
        shape: AttentionShape,
    );
    /// Append k, v at positions `pos0..` of `layer` in `cache`, then causal attention of q over
    /// the cache → `[t, heads*head_dim]`.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        q: &Self::Activation,
        k: &Self::Activation,
        v: &Self::Activation,
        cache: &mut Self::KvCache,
        layer: usize,
        pos0: usize,
        shape: AttentionShape,
    ) -> Result<Self::Activation>;
    /// `silu(gate) * up`, elementwise.
    fn silu_mul(&self, gate: &Self::Activation, up: &Self::Activation) -> Self::Activation;
    /// `x += y`, elementwise.
    fn add_assign(&self, x: &mut Self::Activation, y: &Self::Activation);
    /// The last `rows` rows of `x` (rows of interest for the head).
    fn last_rows(&self, x: &Self::Activation, rows: usize) -> Self::Activation;
    /// Copy to host f32, row-major.
    fn to_host(&self, x: &Self::Activation) -> Result<Vec<f32>>;
}
