//! What a Llama-family pass costs, for the planner when nothing was measured: bytes per group,
//! FLOPs per group for a number of tokens × batch, KV cache and activation workspace sizes,
//! and compute time from stated TFLOP/s.

use super::plan::Group;
use crate::checkpoint::DType;
use crate::model::{GroupKind, Llama, LlamaConfig, MLP_CHUNK_ROWS};

/// Throughput figures of a card, stated or measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CostModel {
    /// Host-to-device copy bandwidth, GB/s (1e9 bytes/s).
    pub h2d_gbps: f64,
    /// Dense bf16 matrix throughput with f32 accumulation, TFLOP/s (1e12 FLOP/s).
    pub tflops: f64,
    /// Device memory bandwidth, GB/s: a group's compute cannot take less than reading its
    /// weights once.
    pub hbm_gbps: f64,
}

impl CostModel {
    /// A PCIe 4 x16 consumer card, for when nothing is stated.
    pub const ASSUMED: CostModel = CostModel {
        h2d_gbps: 25.0,
        tflops: 80.0,
        hbm_gbps: 1000.0,
    };

    /// Compute time of `flops` that read `bytes` of weights, ms.
    pub fn compute_ms(&self, flops: f64, bytes: usize) -> f64 {
        let math = flops / (self.tflops * 1e9);
        let memory = bytes as f64 / (self.hbm_gbps * 1e6);
        math.max(memory)
    }
}

/// The shape of one pass: `tokens` new positions in each of `batch` sequences that already
/// hold `past` positions (0 for a prompt pass; the context so far for decode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PassShape {
    pub tokens: usize,
    pub batch: usize,
    pub past: usize,
}

impl PassShape {
    /// Rows of every activation: tokens × batch.
    pub fn rows(&self) -> usize {
        self.tokens * self.batch
    }
}

/// cuBLASLt's recommended workspace on Hopper.
pub const CUBLAS_WORKSPACE: usize = 32 << 20;

/// Device memory a CUDA plan leaves aside: small allocations outside its accounting (RoPE
/// frequencies, argmax results), the alignment padding in slots, and what the driver holds
/// beyond the ledger (kernel modules, cuBLASLt internals, the stream-ordered pool's
/// granularity). Measured on an H100, 2026-11-26: the driver's peak was 110-155 MiB above
/// the ledger's over prompt passes of 512-16384 tokens at budgets of 2.6-12 GiB.
pub const DRIVER_RESERVE: usize = 160 << 20;

/// What [`DRIVER_RESERVE`] grows by when streamed bytes go through the pinned staging ring
/// (its thread's stream and events, the pinned buffers' mappings): the driver's peak was
/// 70 MiB higher than with registered host memory on the same pass.
pub const STAGING_RESERVE: usize = 64 << 20;

/// Bytes of each group (pass order) when every weight is stored as `dtype`.
pub fn group_bytes(config: &LlamaConfig, dtype: DType) -> Vec<usize> {
    Llama::new(config.clone())
        .groups()
        .iter()
        .map(|g| {
            g.tensors
                .iter()
                .map(|t| t.shape.iter().product::<usize>() * dtype.size())
                .sum()
        })
        .collect()
}

/// FLOPs of each group (pass order) for one pass of `shape`. A block: 2 per weight of its
/// seven projections per row, plus causal attention (QKᵀ and AV, 2 FLOPs per multiply-add,
/// over the visible positions). The head: the last position of each sequence (generation).
/// The embedding: none (a gather).
pub fn group_flops(config: &LlamaConfig, shape: PassShape) -> Vec<f64> {
    let c = config;
    let (h, q, kv, ffn) = (
        c.hidden_size as f64,
        (c.num_heads * c.head_dim) as f64,
        (c.num_kv_heads * c.head_dim) as f64,
        c.intermediate_size as f64,
    );
    let rows = shape.rows() as f64;
    let projections = h * q * 2.0 + h * kv * 2.0 + 3.0 * h * ffn;
    let (t, past) = (shape.tokens as f64, shape.past as f64);
    // Query-key pairs per sequence: each new token sees the past and the new tokens up to it.
    let pairs = t * past + t * (t + 1.0) / 2.0;
    let attention = 4.0 * q * pairs * shape.batch as f64;
    Llama::new(config.clone())
        .groups()
        .iter()
        .map(|g| match g.kind {
            GroupKind::Embedding => 0.0,
            GroupKind::Block(_) => 2.0 * projections * rows + attention,
            GroupKind::Head => 2.0 * h * c.vocab_size as f64 * shape.batch as f64,
        })
        .collect()
}

/// The planner's groups for a Llama-family model: bytes as given (from the checkpoint, or
/// [`group_bytes`]), compute from `cost`, the embedding kept in host memory, the head split
/// on its rows.
pub fn llama_groups(
    config: &LlamaConfig,
    bytes: &[usize],
    dtype: DType,
    shape: PassShape,
    cost: &CostModel,
) -> Vec<Group> {
    let model = Llama::new(config.clone());
    let flops = group_flops(config, shape);
    model
        .groups()
        .iter()
        .zip(bytes)
        .zip(flops)
        .map(|((g, &bytes), flops)| Group {
            label: g.label(),
            bytes,
            compute_ms: cost.compute_ms(flops, bytes),
            granule: match g.kind {
                // One row of lm_head (the final norm, also `hidden` long, is one more).
                GroupKind::Head => config.hidden_size * dtype.size(),
                _ => dtype.size(),
            },
            host_gather: g.kind == GroupKind::Embedding,
        })
        .collect()
}

/// The KV cache for `positions` per sequence × `batch` sequences: keys and values of every
/// layer, bf16.
pub fn kv_cache_bytes(config: &LlamaConfig, positions: usize, batch: usize) -> usize {
    config.num_layers * 2 * config.num_kv_heads * config.head_dim * positions * batch * 2
}

/// Activation memory of one pass on the CUDA backend, bytes (bf16 activations; attention in
/// tiles, no `[heads, tokens, positions]` score matrix). The largest of what is alive at once
/// in [`Llama::forward_batch`](crate::model::Llama::forward_batch): in the attention half,
/// the residual with the normed input, q, k and v, then the residual with q, k, v and the
/// attention output; in the MLP half, the residual with one block of [`MLP_CHUNK_ROWS`]
/// rows' normed input, gate and up (their product overwrites gate); plus the last position's
/// logits of each sequence (in vocabulary blocks and concatenated, when the head streams in
/// pieces) and 1 MiB for token ids, attention partials and the like.
pub fn workspace_bytes(config: &LlamaConfig, shape: PassShape) -> usize {
    let c = config;
    let rows = shape.rows();
    let (h, q, kv, ffn) = (
        c.hidden_size,
        c.num_heads * c.head_dim,
        c.num_kv_heads * c.head_dim,
        c.intermediate_size,
    );
    let attention = rows * (2 * h + q + 2 * kv).max(h + 2 * q + 2 * kv) * 2;
    let mlp = (rows * h + rows.min(MLP_CHUNK_ROWS) * (h + 2 * ffn)) * 2;
    let logits = shape.batch * c.vocab_size * 2 * 2;
    attention.max(mlp) + logits + (1 << 20)
}

/// [`workspace_bytes`] when every position's logits are wanted (`Logits::All`: tests,
/// scoring): the head's `[rows, vocab]` blocks and their concatenation, next to the residual
/// and its norm.
pub fn workspace_bytes_all_logits(config: &LlamaConfig, shape: PassShape) -> usize {
    let rows = shape.rows();
    let head = rows * (2 * config.hidden_size + 2 * config.vocab_size) * 2;
    workspace_bytes(config, shape).max(head + (1 << 20))
}
