//! What a Llama-family pass costs: FLOPs per group, KV cache and activation workspace, from
//! the shapes [`Llama::forward_batch`](super::Llama::forward_batch) keeps alive.

use super::{LlamaConfig, MLP_CHUNK_ROWS};
use crate::model::PassShape;

/// FLOPs of each group (pass order) for one pass of `shape`. A block: 2 per weight of its
/// seven projections per row, plus causal attention (QKᵀ and AV, 2 FLOPs per multiply-add,
/// over the visible positions). The head: the last position of each sequence (generation).
/// The embedding: none (a gather).
pub fn group_flops(c: &LlamaConfig, shape: PassShape) -> Vec<f64> {
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
    let block = 2.0 * projections * rows + attention;
    let head = 2.0 * h * c.vocab_size as f64 * shape.batch as f64;
    std::iter::once(0.0)
        .chain(std::iter::repeat_n(block, c.num_layers))
        .chain(std::iter::once(head))
        .collect()
}

/// The KV cache for `positions` per sequence × `batch` sequences: keys and values of every
/// layer, bf16.
pub fn kv_cache_bytes(c: &LlamaConfig, positions: usize, batch: usize) -> usize {
    c.num_layers * 2 * c.num_kv_heads * c.head_dim * positions * batch * 2
}

/// Activation memory of one pass on the CUDA backend, bytes (bf16 activations; attention in
/// tiles, no `[heads, tokens, positions]` score matrix). The largest of what is alive at once
/// in `forward_batch`: in the attention half, the residual with the normed input, q, k and v,
/// then the residual with q, k, v and the attention output; in the MLP half, the residual
/// with one block of [`MLP_CHUNK_ROWS`] rows' normed input, gate and up (their product
/// overwrites gate); plus the last position's logits of each sequence (in vocabulary blocks
/// and concatenated, when the head streams in pieces) and 1 MiB for token ids, attention
/// partials and the like.
pub fn workspace_bytes(c: &LlamaConfig, shape: PassShape) -> usize {
    rows_workspace_bytes(c, shape.rows(), shape.batch)
}

/// [`workspace_bytes`] of a pass of `rows` token rows in all, over `sequences` sequences
/// (a logits row each): a server's mixed pass, each decoding sequence's one token beside
/// newcomers' prompt pieces.
pub fn rows_workspace_bytes(c: &LlamaConfig, rows: usize, sequences: usize) -> usize {
    let (h, q, kv, ffn) = (
        c.hidden_size,
        c.num_heads * c.head_dim,
        c.num_kv_heads * c.head_dim,
        c.intermediate_size,
    );
    let attention = rows * (2 * h + q + 2 * kv).max(h + 2 * q + 2 * kv) * 2;
    let mlp = (rows * h + rows.min(MLP_CHUNK_ROWS) * (h + 2 * ffn)) * 2;
    let logits = sequences * c.vocab_size * 2 * 2;
    attention.max(mlp) + logits + (1 << 20)
}

/// [`workspace_bytes`] when every position's logits are wanted (`Logits::All`: tests,
/// scoring): the head's `[rows, vocab]` blocks and their concatenation, next to the residual
/// and its norm.
pub fn workspace_bytes_all_logits(c: &LlamaConfig, shape: PassShape) -> usize {
    let rows = shape.rows();
    let head = rows * (2 * c.hidden_size + 2 * c.vocab_size) * 2;
    workspace_bytes(c, shape).max(head + (1 << 20))
}
