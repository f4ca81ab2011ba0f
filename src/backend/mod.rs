//! Compute backends. The model is written once against [`Backend`]; `cpu` is the f32
//! reference used by tests everywhere, `cuda` runs on an NVIDIA GPU in bf16.

pub mod conv;
pub mod cpu;
pub mod cpu_conv;
pub mod cpu_dit;
mod cpu_dot;
mod cpu_encoder;
mod cpu_exp;
mod cpu_gemm;
pub mod cpu_stream;
pub mod cuda;
pub mod dit;
pub mod encoder;

use std::ops::Range;

use crate::checkpoint::HostTensor;
use crate::error::Result;

/// Where to compute (`--device`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// The first GPU when one is usable, else the CPU.
    Auto,
    Cpu,
    /// The CUDA device with this index.
    Cuda(usize),
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Device, String> {
        match s {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| format!("expected auto, cpu, cuda or cuda:N, found {s:?}")),
        }
    }
}

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
/// `[tokens, features]`. Every operation can fail (a GPU can run out of memory or lose its
/// context); the CPU backend never does.
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
    fn rms_norm(
        &self,
        x: &Self::Activation,
        w: &Self::Weight,
        eps: f32,
    ) -> Result<Self::Activation>;
    /// [`rms_norm`](Self::rms_norm) of rows `start..start+len` of `x`.
    fn rms_norm_rows(
        &self,
        x: &Self::Activation,
        start: usize,
        len: usize,
        w: &Self::Weight,
        eps: f32,
    ) -> Result<Self::Activation> {
        self.rms_norm(&self.rows(x, start, len)?, w, eps)
    }
    /// `x @ wᵀ + bias`: x `[t, in]`, w `[out, in]`, bias `[out]` → `[t, out]`.
    fn linear(
        &self,
        x: &Self::Activation,
        w: &Self::Weight,
        bias: Option<&Self::Weight>,
    ) -> Result<Self::Activation>;
    /// `x[start..start+t] += h @ wᵀ + bias` for h `[t, in]`: the residual connection after
    /// a projection, on all of `x` or on a block of its rows (a GPU fuses the add into the
    /// matrix product).
    fn linear_add(
        &self,
        x: &mut Self::Activation,
        start: usize,
        h: &Self::Activation,
        w: &Self::Weight,
        bias: Option<&Self::Weight>,
    ) -> Result<()> {
        let y = self.linear(h, w, bias)?;
        self.add_assign(x, start, &y)
    }
    /// Rotate rows `rows` of q `[t, heads*head_dim]` and k `[t, kv_heads*head_dim]` in place
    /// (rotate-half layout) for positions `pos0..pos0+rows.len()`; other rows are left as
    /// they are (each sequence of a batch at its own positions).
    fn rope(
        &self,
        q: &mut Self::Activation,
        k: &mut Self::Activation,
        rows: Range<usize>,
        pos0: usize,
        inv_freq: &[f32],
        shape: AttentionShape,
    ) -> Result<()>;
    /// Append rows `rows` of k, v at positions `pos0..` of `layer` in `cache`, then causal
    /// attention of those rows of q over the cache, written into the same rows of `out`
    /// `[q's rows, heads*head_dim]` (each sequence of a batch over its own cache, with no
    /// rows copied out or back).
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        q: &Self::Activation,
        k: &Self::Activation,
        v: &Self::Activation,
        rows: Range<usize>,
        cache: &mut Self::KvCache,
        layer: usize,
        pos0: usize,
        shape: AttentionShape,
        out: &mut Self::Activation,
    ) -> Result<()>;
    /// An activation `[rows, cols]` to be written (its contents are unspecified until then).
    fn activation(&self, rows: usize, cols: usize) -> Result<Self::Activation>;
    /// `gate = silu(gate) * up`, elementwise, in place.
    fn silu_mul(&self, gate: &mut Self::Activation, up: &Self::Activation) -> Result<()>;
    /// `x[start..start+t] += y` for y `[t, cols]`, elementwise.
    fn add_assign(
        &self,
        x: &mut Self::Activation,
        start: usize,
        y: &Self::Activation,
    ) -> Result<()>;
    /// Rows `start..start+len` of `x`, copied.
    fn rows(&self, x: &Self::Activation, start: usize, len: usize) -> Result<Self::Activation>;
    /// `parts` stacked row-wise (they share a width).
    fn concat_rows(&self, parts: &[Self::Activation]) -> Result<Self::Activation>;
    /// `parts` side by side (they share a row count): the logits of a head computed in
    /// blocks of vocabulary rows. One part is returned as it is.
    fn concat_cols(&self, parts: Vec<Self::Activation>) -> Result<Self::Activation>;
    /// Copy to host f32, row-major.
    fn to_host(&self, x: &Self::Activation) -> Result<Vec<f32>>;
    /// The index of the largest value of each row of `x` `[rows, cols]` (the first one on
    /// ties), for greedy decoding without copying logits to the host.
    fn argmax_rows(&self, x: &Self::Activation) -> Result<Vec<u32>> {
        let data = self.to_host(x)?;
        Ok(data
            .chunks_exact(self.cols(x).max(1))
            .map(crate::generate::argmax)
            .collect())
    }
    /// Columns of an activation (features per row).
    fn cols(&self, x: &Self::Activation) -> usize;
}
