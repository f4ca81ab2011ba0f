//! What a Qwen-Image pass costs: FLOPs per group and the activation workspace, from the shapes
//! [`QwenImage::forward`](super::QwenImage::forward) keeps alive.

use super::{QwenImageConfig, T_FREQ_DIM};
use crate::model::PassCost;

/// Text tokens per sample assumed by [`Architecture::pass_cost`](crate::model::Architecture),
/// which is given only the total: a prompt of about 100 tokens, rounded up.
pub const ASSUMED_TEXT_TOKENS: usize = 128;

/// FLOPs and workspace of a pass over `batch` samples of `image` image tokens and `text` text
/// tokens each. 2 FLOPs per multiply-add.
///
/// - embedders: img_in per image token, txt_in per text token, the timestep MLP per sample;
/// - a block: q, k, v, out (4·dim²) and the MLP (2·dim·ffn) per row of either stream, joint
///   attention over `image + text` rows (QKᵀ and AV, 2·n²·dim) and the two modulation
///   linears (2 · dim · 6·dim) per sample;
/// - the final layer: proj_out per image token, norm_out's linear per sample.
///
/// Elementwise work (norms, RoPE, modulation) is not counted.
pub fn pass_cost(c: &QwenImageConfig, image: usize, text: usize, batch: usize) -> PassCost {
    let (dim, ffn) = (c.dim() as f64, c.ffn_dim() as f64);
    let (b, n) = (batch as f64, (image + text) as f64);
    let block = b
        * (2.0 * (4.0 * dim * dim + 2.0 * dim * ffn) * n
            + 4.0 * n * n * dim
            + 2.0 * 2.0 * dim * 6.0 * dim);
    let embedders = b
        * (2.0 * c.in_channels as f64 * dim * image as f64
            + 2.0 * c.joint_attention_dim as f64 * dim * text as f64
            + 2.0 * (T_FREQ_DIM as f64 * dim + dim * dim));
    let final_layer =
        b * (2.0 * dim * c.patch_features() as f64 * image as f64 + 2.0 * dim * 2.0 * dim);
    let mut flops = vec![embedders];
    flops.extend(std::iter::repeat_n(block, c.num_layers));
    flops.push(final_layer);
    PassCost {
        flops,
        workspace: workspace_bytes(c, batch * image, batch * text),
        cache: 0,
    }
}

/// Activation memory of a pass on a GPU backend, bytes: bf16 activations, attention in tiles
/// (no score matrix), the RoPE tables in f32. With `R = rows · dim` over both streams, the
/// most alive at once is in attention: the two residuals (R), the separate q, k, v (3R) and
/// their joint copies (3R), the joint output (R), the split outputs (R): 9R. The MLP of one
/// stream holds less (residuals, its normed input, its 4·dim hidden, its output). Plus the
/// text features as they come (`text_rows · joint_attention_dim`) and 1 MiB for the timestep
/// embedding, modulation vectors and the like.
pub fn workspace_bytes(c: &QwenImageConfig, image_rows: usize, text_rows: usize) -> usize {
    let rows = image_rows + text_rows;
    let (dim, hd) = (c.dim(), c.head_dim());
    let attention = 9 * rows * dim * 2;
    let mlp = (rows * dim + image_rows.max(text_rows) * (2 * dim + c.ffn_dim())) * 2;
    attention.max(mlp) + rows * hd * 4 + text_rows * c.joint_attention_dim * 4 + (1 << 20)
}
