//! What a Flux pass costs: FLOPs per group and the activation workspace, from the shapes
//! [`Flux::forward`](super::Flux::forward) keeps alive.

use super::{FluxConfig, Modulation, T_FREQ_DIM};
use crate::model::PassCost;

/// Text tokens per sample assumed by [`Architecture::pass_cost`](crate::model::Architecture),
/// which is given only the total: the pipeline pads T5's prompt to 512 tokens
/// (`max_sequence_length`).
pub const TEXT_TOKENS: usize = 512;

/// FLOPs and workspace of a pass over `batch` samples of `image` image tokens and `text` text
/// tokens each. 2 FLOPs per multiply-add.
///
/// - embedders: x_embedder per image token, context_embedder per text token and, when the
///   pass computes its modulation, the time, guidance and text MLPs per sample;
/// - a double block: q, k, v, out (4·dim²) and the MLP (2·dim·ffn) per row of either
///   stream, joint attention over `image + text` rows (QKᵀ and AV, 2·n²·dim) and the two
///   modulation linears (2 · dim · 6·dim) per sample;
/// - a single block: q, k, v (3·dim²), proj_mlp (dim·ffn) and proj_out ((dim + ffn)·dim)
///   per row, the same attention, its modulation linear (dim · 3·dim) per sample;
/// - the final layer: proj_out per image token, norm_out's linear per sample.
///
/// Elementwise work (norms, RoPE, modulation) is not counted; neither are the modulation
/// linears when the pass takes them from a table.
pub fn pass_cost(
    c: &FluxConfig,
    modulation: Modulation,
    image: usize,
    text: usize,
    batch: usize,
) -> PassCost {
    let (dim, ffn) = (c.dim() as f64, c.ffn_dim() as f64);
    let (b, n) = (batch as f64, (image + text) as f64);
    let m = (modulation == Modulation::InSteps) as u8 as f64;
    let attention = 4.0 * n * n * dim;
    let double = b * (2.0 * (4.0 * dim * dim + 2.0 * dim * ffn) * n + attention)
        + m * b * 2.0 * 2.0 * dim * 6.0 * dim;
    let single = b * (2.0 * (3.0 * dim * dim + dim * ffn + (dim + ffn) * dim) * n + attention)
        + m * b * 2.0 * dim * 3.0 * dim;
    let embedders = {
        let time = T_FREQ_DIM as f64 * dim + dim * dim;
        let mlps = (1.0 + c.guidance_embeds as u8 as f64) * time
            + c.pooled_projection_dim as f64 * dim
            + dim * dim;
        b * (2.0 * c.in_channels as f64 * dim * image as f64
            + 2.0 * c.joint_attention_dim as f64 * dim * text as f64
            + m * 2.0 * mlps)
    };
    let final_layer =
        b * (2.0 * dim * c.out_channels as f64 * image as f64 + m * 2.0 * dim * 2.0 * dim);
    let mut flops = vec![embedders];
    flops.extend(std::iter::repeat_n(double, c.num_layers));
    flops.extend(std::iter::repeat_n(single, c.num_single_layers));
    flops.push(final_layer);
    PassCost {
        flops,
        workspace: workspace_bytes(c, batch * image, batch * text),
        cache: 0,
    }
}

/// Activation memory of a pass on a GPU backend, bytes: bf16 activations, attention in tiles
/// (no score matrix), the RoPE tables in f32. With `R = rows · dim` over both streams, the
/// most alive at once is in a single block as its attention output and its MLP's hidden
/// (`4R`) join for proj_out: the residual (R), the attention output (R), the hidden (4R) and
/// their joined copy (5R): 11R. A double block holds less (9R in attention, as Qwen-Image's).
/// Plus the streams' and the joint RoPE tables (`2 · rows · head_dim`), the text features as
/// they come (`text_rows · joint_attention_dim`, f32 on the host side of the upload) and
/// 1 MiB for the conditioning, modulation vectors and the like.
pub fn workspace_bytes(c: &FluxConfig, image_rows: usize, text_rows: usize) -> usize {
    let rows = image_rows + text_rows;
    let (dim, hd) = (c.dim(), c.head_dim());
    let single = (2 * rows * dim + 2 * rows * c.ffn_dim()) * 2 + rows * dim * 2;
    let double = 9 * rows * dim * 2;
    single.max(double) + 2 * rows * hd * 4 + text_rows * c.joint_attention_dim * 4 + (1 << 20)
}
