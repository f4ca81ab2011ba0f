//! What a Z-Image pass costs: FLOPs per group and the activation workspace, from the shapes
//! [`ZImage::forward`](super::ZImage::forward) keeps alive.

use super::{padded, ZImageConfig, T_FREQ_DIM, T_MID_DIM};
use crate::model::PassCost;

/// Caption tokens per sample assumed by [`Architecture::pass_cost`](crate::model::Architecture),
/// which is given only the total: a prompt of about 100 tokens, padded (the benchmarks'
/// one DiT forward at 1024×1024 with 100 caption tokens).
pub const ASSUMED_CAPTION_TOKENS: usize = 128;

/// FLOPs and workspace of a pass over `batch` samples of `image` image tokens and `caption`
/// caption tokens each (before padding). 2 FLOPs per multiply-add.
///
/// - embedders: the patch and caption linears per token, the timestep MLP per sample;
/// - a block over sequences of `n` rows: q, k, v, out (4·dim²) and the SwiGLU (3·dim·ffn) per
///   row, full attention (QKᵀ and AV, 2·n²·dim) per sample, its adaLN per sample;
/// - the final layer: its linear over the real image tokens, its adaLN per sample.
///
/// Elementwise work (norms, RoPE, modulation) is not counted.
pub fn pass_cost(c: &ZImageConfig, image: usize, caption: usize, batch: usize) -> PassCost {
    let (dim, ffn, adaln, pf) = (
        c.dim as f64,
        c.ffn_dim() as f64,
        c.adaln_dim() as f64,
        c.patch_features() as f64,
    );
    let (px, pc) = (padded(image), padded(caption));
    let b = batch as f64;
    let per_row = 2.0 * (4.0 * dim * dim + 3.0 * dim * ffn);
    let block = |n: usize, modulated: bool| {
        let n = n as f64;
        let adaln_flops = if modulated {
            2.0 * adaln * 4.0 * dim
        } else {
            0.0
        };
        b * (per_row * n + 4.0 * n * n * dim + adaln_flops)
    };
    let embedders = b
        * (2.0 * pf * dim * image as f64
            + 2.0 * c.cap_feat_dim as f64 * dim * caption as f64
            + 2.0 * (T_FREQ_DIM * T_MID_DIM) as f64
            + 2.0 * T_MID_DIM as f64 * adaln);
    let final_layer = b * (2.0 * dim * pf * image as f64 + 2.0 * adaln * dim);
    let mut flops = vec![embedders];
    flops.extend(std::iter::repeat_n(block(px, true), c.n_refiner_layers));
    flops.extend(std::iter::repeat_n(block(pc, false), c.n_refiner_layers));
    flops.extend(std::iter::repeat_n(block(px + pc, true), c.n_layers));
    flops.push(final_layer);
    PassCost {
        flops,
        workspace: workspace_bytes(c, px * batch, pc * batch),
        cache: 0,
    }
}

/// Activation memory of a pass on a GPU backend, bytes: bf16 activations, attention in tiles
/// (no score matrix), the RoPE tables in f32. The largest of what is alive at once in a block
/// over `rows` rows beside the sequences it does not touch:
/// - attention half: the residual, the normed input, q, k, v, then the residual, q, k, v and
///   the attention output (5 · rows · dim either way);
/// - feed-forward half: the residual, the normed input, w1's and w3's outputs
///   (rows · (2·dim + 2·ffn)).
///
/// During the noise refiner the caption is not yet embedded; during the context refiner the
/// refined image sequence waits; the main blocks hold the unified sequence alone. Plus each
/// phase's RoPE table, and 1 MiB for the timestep embedding, modulation vectors and the like.
pub fn workspace_bytes(c: &ZImageConfig, image_rows: usize, caption_rows: usize) -> usize {
    let (dim, ffn, hd) = (c.dim, c.ffn_dim(), c.head_dim());
    let block = |rows: usize| rows * (5 * dim).max(2 * dim + 2 * ffn) * 2 + rows * hd * 4;
    let noise = block(image_rows);
    let context = image_rows * dim * 2 + block(caption_rows);
    let unified = block(image_rows + caption_rows);
    noise.max(context).max(unified) + (1 << 20)
}
