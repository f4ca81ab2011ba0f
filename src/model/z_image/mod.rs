//! Z-Image's diffusion transformer (diffusers `ZImageTransformer2DModel`, 6.15 B parameters in
//! Z-Image-Turbo): a single-stream DiT over each sample's `[image tokens, caption tokens]`,
//! after a timestep-modulated refiner over the image tokens alone and an unmodulated one over
//! the caption alone.
//!
//! One pass is one denoising step for every sample of a batch (several images; the two
//! branches of guidance are two samples): each group's weights are asked for once and serve
//! all samples. Samples are stacked row-wise without padding between them and never attend
//! to each other (diffusers pads the batch to its longest sample and masks those keys, which
//! is the same).
//!
//! Token rules (diffusers' `patchify_and_embed`):
//! - image: 2×2 latent patches, row-major over (row, column); a patch's features in
//!   (patch row, patch column, channel) order, channel fastest. `n` tokens are padded to
//!   `Px`, a multiple of [`SEQ_MULTIPLE`], with the learned `x_pad_token`;
//! - caption: the `L` text-encoder features, padded to `Pc` with `cap_pad_token`;
//! - RoPE positions (caption index, row, column): caption token `k` (pads included) at
//!   `(1 + k, 0, 0)`; image token `(row, col)` at `(Pc + 1, row, col)`; image pads at `(0, 0, 0)`.
//!
//! Pad tokens are attended like the others; only positions beyond a sample do not exist.

mod config;
mod cost;
mod rope;
pub mod single_file;

pub use config::ZImageConfig;
pub use rope::AxesRope;
pub use single_file::open_dit_file;

use std::ops::Range;

use super::{Architecture, Bound, PassCost, PassShape, TensorSpec, WeightGroup, Weights};
use crate::backend::dit::{DitOps, Pointwise};
use crate::error::{Error, Result};

/// Image and caption sequences are padded to a multiple of this many tokens.
pub const SEQ_MULTIPLE: usize = 32;
/// Width of the sinusoidal timestep features.
const T_FREQ_DIM: usize = 256;
/// Width of the timestep embedder's hidden layer (fixed in diffusers).
const T_MID_DIM: usize = 1024;
/// The sinusoid's longest period.
const T_MAX_PERIOD: f64 = 10000.0;
/// Epsilon of the per-head q/k RMSNorm (fixed in diffusers' `Attention`).
const QK_NORM_EPS: f32 = 1e-5;
/// Epsilon of the final LayerNorm (fixed in diffusers' `FinalLayer`).
const FINAL_NORM_EPS: f32 = 1e-6;

/// `n` rounded up to a multiple of [`SEQ_MULTIPLE`].
pub fn padded(n: usize) -> usize {
    n.div_ceil(SEQ_MULTIPLE) * SEQ_MULTIPLE
}

/// The inputs of one pass.
pub struct DitInput<'a> {
    /// `[batch, in_channels, height, width]` f32, row-major: the latents being denoised.
    pub latents: &'a [f32],
    /// Latent pixels (the image's pixels / 8); multiples of the patch size.
    pub height: usize,
    pub width: usize,
    /// `[batch]`: the model's time of each sample, `1 − σ` in [0, 1] (the pipeline's
    /// `(1000 − timestep) / 1000`, 0 at the first step).
    pub t: &'a [f32],
    /// One per sample, `[tokens, cap_feat_dim]` f32: the text encoder's features of the
    /// caption's valid tokens (the lengths may differ).
    pub captions: &'a [&'a [f32]],
}

pub struct ZImage {
    pub config: ZImageConfig,
    groups: Vec<WeightGroup>,
    rope: AxesRope,
}

/// Where each part sits among the groups, in pass order.
const EMBEDDERS: usize = 0;

/// One transformer block, named as in the checkpoint (`layers.N.…`, `noise_refiner.N.…`,
/// `context_refiner.N.…`).
struct Block<'a, W> {
    attention: Attention<'a, W>,
    feed_forward: FeedForward<'a, W>,
    attention_norm1: &'a W,
    attention_norm2: &'a W,
    ffn_norm1: &'a W,
    ffn_norm2: &'a W,
    /// `adaLN_modulation.0` (weight, bias): `t_emb → [scale_msa, gate_msa, scale_mlp,
    /// gate_mlp]`; none in the context refiner.
    adaln_modulation: Option<(&'a W, &'a W)>,
}

struct Attention<'a, W> {
    to_q: &'a W,
    to_k: &'a W,
    to_v: &'a W,
    to_out: &'a W,
    /// norm_q, norm_k (`qk_norm`).
    qk_norm: Option<(&'a W, &'a W)>,
}

/// SwiGLU: `w2(silu(w1 x) · w3 x)`.
struct FeedForward<'a, W> {
    w1: &'a W,
    w2: &'a W,
    w3: &'a W,
}

/// The embedders' group.
struct Embedders<'a, W> {
    /// `all_x_embedder.2-1`: patch features → dim.
    x_embedder: (&'a W, &'a W),
    /// `cap_embedder.0` (RMSNorm over the caption features), `cap_embedder.1` (linear).
    cap_norm: &'a W,
    cap_linear: (&'a W, &'a W),
    /// `t_embedder.mlp.0`, `t_embedder.mlp.2` (SiLU between them).
    t_mlp0: (&'a W, &'a W),
    t_mlp2: (&'a W, &'a W),
    x_pad_token: &'a W,
    cap_pad_token: &'a W,
}

/// `all_final_layer.2-1`: LayerNorm without affine, scaled by `1 + adaLN(silu(t_emb))`, then
/// a linear to the patch features.
struct FinalLayer<'a, W> {
    adaln_modulation: (&'a W, &'a W),
    linear: (&'a W, &'a W),
}

/// A receiver of intermediates by name, `[rows, cols]` f32 row-major (see
/// [`ZImage::forward_traced`]).
pub type Trace<'t> = dyn FnMut(&str, Vec<f32>) + 't;

/// The rows of each sample in one sequence of a pass, and its RoPE table `[rows, head_dim]`.
struct Sequence<'a, A> {
    rows: &'a [Range<usize>],
    rope: &'a A,
}

/// The rows of each sample in the three sequences of a pass.
struct Layout {
    /// Real image tokens per sample (before padding) and the padded count.
    image_tokens: usize,
    image_padded: usize,
    /// Valid and padded caption tokens of each sample.
    caption_tokens: Vec<usize>,
    caption_padded: Vec<usize>,
    image: Vec<Range<usize>>,
    caption: Vec<Range<usize>>,
    unified: Vec<Range<usize>>,
}

impl Layout {
    fn new(image_tokens: usize, caption_tokens: Vec<usize>) -> Layout {
        let image_padded = padded(image_tokens);
        let caption_padded: Vec<usize> = caption_tokens.iter().map(|&n| padded(n)).collect();
        let ranges = |lens: &mut dyn Iterator<Item = usize>| {
            let mut start = 0;
            lens.map(|n| {
                start += n;
                start - n..start
            })
            .collect::<Vec<_>>()
        };
        let batch = caption_tokens.len();
        Layout {
            image: ranges(&mut std::iter::repeat_n(image_padded, batch)),
            caption: ranges(&mut caption_padded.iter().copied()),
            unified: ranges(&mut caption_padded.iter().map(|c| image_padded + c)),
            image_tokens,
            image_padded,
            caption_tokens,
            caption_padded,
        }
    }
}

impl ZImage {
    pub fn new(config: ZImageConfig) -> ZImage {
        let groups = weight_groups(&config);
        let rope = AxesRope::new(config.rope_theta, &config.axes_dims);
        ZImage {
            config,
            groups,
            rope,
        }
    }

    fn noise_refiner(&self, i: usize) -> usize {
        1 + i
    }
    fn context_refiner(&self, i: usize) -> usize {
        1 + self.config.n_refiner_layers + i
    }
    fn layer(&self, i: usize) -> usize {
        1 + 2 * self.config.n_refiner_layers + i
    }
    fn final_layer(&self) -> usize {
        self.layer(self.config.n_layers)
    }

    /// Image tokens of a `height × width` latent.
    pub fn image_tokens(&self, height: usize, width: usize) -> usize {
        let p = self.config.patch();
        (height / p) * (width / p)
    }

    /// One denoising step for every sample: the transformer's output, `[batch, in_channels,
    /// height, width]` f32 in sample order, as diffusers' transformer returns it. The
    /// pipeline's velocity (what the Euler step takes, `dx/dσ`) is its negation.
    pub fn forward<B: DitOps>(
        &self,
        backend: &B,
        weights: &mut impl Weights<B::Weight>,
        input: &DitInput<'_>,
    ) -> Result<Vec<f32>> {
        self.forward_traced(backend, weights, input, None)
    }

    /// [`forward`](Self::forward), handing `trace` the intermediates on the host (for tests
    /// against diffusers' hooks): `t_emb` `[batch, adaln_dim]`; `x_embed`, `cap_embed` (valid
    /// tokens only); `noise_refiner_in`, `noise_refiner.{i}` `[batch·Px, dim]`;
    /// `context_refiner_in`, `context_refiner.{i}` `[Σ Pc, dim]`; `unified_in`,
    /// `layers.{i}`, `layers.{i}.attention` (before attention_norm2 and the gate),
    /// `layers.{i}.feed_forward` (before ffn_norm2) `[Σ (Px + Pc), dim]`; `unified_freqs`
    /// (the RoPE table) `[Σ (Px + Pc), head_dim]`; `final_layer` (real image tokens)
    /// `[batch·n, patch features]`.
    pub fn forward_traced<B: DitOps>(
        &self,
        backend: &B,
        weights: &mut impl Weights<B::Weight>,
        input: &DitInput<'_>,
        mut trace: Option<&mut Trace<'_>>,
    ) -> Result<Vec<f32>> {
        let c = &self.config;
        let layout = self.check_input(input)?;
        let batch = input.t.len();
        let head_dim = c.head_dim();
        let eps = c.norm_eps as f32;
        let p = c.patch();
        let (rows_t, cols_t) = (input.height / p, input.width / p);

        // RoPE positions of the three sequences, and the single stream's table (host f32).
        let image_pos = image_positions(&layout, rows_t, cols_t);
        let caption_pos: Vec<[u32; 3]> = layout
            .caption_padded
            .iter()
            .flat_map(|&pc| (0..pc).map(|k| [1 + k as u32, 0, 0]))
            .collect();
        let unified_pos: Vec<[u32; 3]> = (0..batch)
            .flat_map(|s| {
                let img = &image_pos[layout.image[s].clone()];
                let cap = &caption_pos[layout.caption[s].clone()];
                img.iter().chain(cap).copied()
            })
            .collect();
        let unified_table = self.rope.table(&unified_pos);
        if let Some(t) = trace.as_deref_mut() {
            t("unified_freqs", unified_table.to_vec());
        }
        let mut tap = |name: &str, x: &B::Activation| -> Result<()> {
            if let Some(t) = trace.as_deref_mut() {
                t(name, backend.to_host(x)?);
            }
            Ok(())
        };

        // The embedders: timestep, image patches, caption features.
        let (t_emb, mut x, mut cap) = {
            let w = self.embedders(weights.group(EMBEDDERS)?);
            // [batch, adaln_dim]: t_embedder(t · t_scale)
            let freqs = backend.upload(
                &timestep_features(input.t, c.t_scale as f32),
                batch,
                T_FREQ_DIM,
            )?;
            let mut h = backend.linear(&freqs, w.t_mlp0.0, Some(w.t_mlp0.1))?; // [batch, 1024]
            backend.pointwise(&mut h, Pointwise::Silu)?;
            let t_emb = backend.linear(&h, w.t_mlp2.0, Some(w.t_mlp2.1))?;
            tap("t_emb", &t_emb)?;

            // [batch·n, patch features] → [batch·n, dim], then each sample's pads.
            let n = layout.image_tokens;
            let patches = backend.upload(
                &patchify(
                    input.latents,
                    batch,
                    c.in_channels,
                    input.height,
                    input.width,
                    p,
                ),
                batch * n,
                c.patch_features(),
            )?;
            let x_real = backend.linear(&patches, w.x_embedder.0, Some(w.x_embedder.1))?;
            tap("x_embed", &x_real)?;
            let pads = layout.image_padded - n;
            let mut parts = Vec::with_capacity(2 * batch);
            for s in 0..batch {
                parts.push(backend.rows(&x_real, s * n, n)?);
                if pads > 0 {
                    parts.push(backend.embed(w.x_pad_token, &vec![0; pads])?);
                }
            }
            let x = backend.concat_rows(&parts)?; // [batch·Px, dim]

            // [Σ L, cap_feat_dim] → RMSNorm → linear → [Σ L, dim], then each sample's pads.
            let feats: Vec<f32> = input.captions.concat();
            let total: usize = layout.caption_tokens.iter().sum();
            let feats = backend.upload(&feats, total, c.cap_feat_dim)?;
            let normed = backend.rms_norm(&feats, w.cap_norm, eps)?;
            let cap_real = backend.linear(&normed, w.cap_linear.0, Some(w.cap_linear.1))?;
            tap("cap_embed", &cap_real)?;
            let mut parts = Vec::with_capacity(2 * batch);
            let mut start = 0;
            for (&l, &pc) in layout.caption_tokens.iter().zip(&layout.caption_padded) {
                parts.push(backend.rows(&cap_real, start, l)?);
                if pc > l {
                    parts.push(backend.embed(w.cap_pad_token, &vec![0; pc - l])?);
                }
                start += l;
            }
            let cap = backend.concat_rows(&parts)?; // [Σ Pc, dim]
            (t_emb, x, cap)
        };

        // RoPE tables [rows, head_dim] for the three sequences.
        let table =
            |pos: &[[u32; 3]]| backend.rope_table(&self.rope.table(pos), pos.len(), head_dim);
        let image_rope = table(&image_pos)?;
        let caption_rope = table(&caption_pos)?;

        tap("noise_refiner_in", &x)?;

        for i in 0..c.n_refiner_layers {
            let g = self.noise_refiner(i);
            let name = format!("noise_refiner.{i}");
            let w = self.block(g, &name, true, weights.group(g)?);
            let seq = Sequence {
                rows: &layout.image,
                rope: &image_rope,
            };
            self.block_forward(backend, &w, &mut x, &seq, Some(&t_emb), &name, &mut tap)?;
        }
        drop(image_rope);
        tap("context_refiner_in", &cap)?;
        for i in 0..c.n_refiner_layers {
            let g = self.context_refiner(i);
            let name = format!("context_refiner.{i}");
            let w = self.block(g, &name, false, weights.group(g)?);
            let seq = Sequence {
                rows: &layout.caption,
                rope: &caption_rope,
            };
            self.block_forward(backend, &w, &mut cap, &seq, None, &name, &mut tap)?;
        }
        drop(caption_rope);

        // Each sample's [image, caption].
        let mut parts = Vec::with_capacity(2 * batch);
        for s in 0..batch {
            parts.push(backend.rows(&x, layout.image[s].start, layout.image_padded)?);
            let r = &layout.caption[s];
            parts.push(backend.rows(&cap, r.start, r.len())?);
        }
        drop((x, cap));
        let mut u = backend.concat_rows(&parts)?; // [Σ (Px + Pc), dim]
        drop(parts);
        let unified_rope = backend.rope_table(&unified_table, unified_pos.len(), head_dim)?;
        tap("unified_in", &u)?;
        for i in 0..c.n_layers {
            let g = self.layer(i);
            let name = format!("layers.{i}");
            let w = self.block(g, &name, true, weights.group(g)?);
            let seq = Sequence {
                rows: &layout.unified,
                rope: &unified_rope,
            };
            self.block_forward(backend, &w, &mut u, &seq, Some(&t_emb), &name, &mut tap)?;
        }
        drop(unified_rope);

        // The final layer over each sample's real image tokens: [batch·n, patch features].
        let out = {
            let g = self.final_layer();
            let w = self.final_weights(weights.group(g)?);
            let n = layout.image_tokens;
            let image: Vec<_> = layout
                .unified
                .iter()
                .map(|r| backend.rows(&u, r.start, n))
                .collect::<Result<_>>()?;
            let image = backend.concat_rows(&image)?;
            let mut h = backend.layer_norm(&image, FINAL_NORM_EPS)?;
            let mut silu_t = backend.rows(&t_emb, 0, batch)?;
            backend.pointwise(&mut silu_t, Pointwise::Silu)?;
            let scale =
                backend.linear(&silu_t, w.adaln_modulation.0, Some(w.adaln_modulation.1))?;
            let rows: Vec<Range<usize>> = (0..batch).map(|s| s * n..(s + 1) * n).collect();
            backend.modulate(&mut h, &rows, &scale, None)?;
            let out = backend.linear(&h, w.linear.0, Some(w.linear.1))?;
            tap("final_layer", &out)?;
            backend.to_host(&out)?
        };
        weights.finish_pass()?;
        Ok(unpatchify(
            &out,
            batch,
            c.in_channels,
            input.height,
            input.width,
            p,
        ))
    }

    /// One block over `x` `[rows, dim]` in place, each sample over its own rows; modulated by
    /// `t_emb` `[samples, adaln_dim]` when the block has an adaLN (noise refiner, main
    /// layers), sandwich-normed around attention and the feed-forward in both cases. `tap`
    /// gets the block's output as `name` and its two branches (see
    /// [`forward_traced`](Self::forward_traced)).
    #[allow(clippy::too_many_arguments)]
    fn block_forward<B: DitOps>(
        &self,
        backend: &B,
        w: &Block<'_, B::Weight>,
        x: &mut B::Activation,
        seq: &Sequence<'_, B::RopeTable>,
        t_emb: Option<&B::Activation>,
        name: &str,
        tap: &mut dyn FnMut(&str, &B::Activation) -> Result<()>,
    ) -> Result<()> {
        let eps = self.config.norm_eps as f32;
        let (samples, rope) = (seq.rows, seq.rope);
        // [samples, dim] each: scale_msa, tanh(gate_msa), scale_mlp, tanh(gate_mlp).
        let modulation = match (w.adaln_modulation, t_emb) {
            (Some((weight, bias)), Some(t_emb)) => {
                let m = backend.linear(t_emb, weight, Some(bias))?; // [samples, 4·dim]
                let mut m = backend.split_cols(&m, 4)?;
                backend.pointwise(&mut m[1], Pointwise::Tanh)?;
                backend.pointwise(&mut m[3], Pointwise::Tanh)?;
                Some(m)
            }
            (None, None) => None,
            _ => unreachable!("a block is modulated iff it has adaLN weights"),
        };

        // x = x + gate_msa · norm2(attention(norm1(x) · (1 + scale_msa)))
        let mut h = backend.rms_norm(x, w.attention_norm1, eps)?;
        if let Some(m) = &modulation {
            backend.modulate(&mut h, samples, &m[0], None)?;
        }
        let a = self.attention(backend, &w.attention, &h, samples, rope)?;
        drop(h);
        tap(&format!("{name}.attention"), &a)?;
        let a = backend.rms_norm(&a, w.attention_norm2, eps)?;
        match &modulation {
            Some(m) => backend.add_gated(x, samples, &m[1], &a)?,
            None => backend.add_assign(x, 0, &a)?,
        }
        drop(a);

        // x = x + gate_mlp · norm2(ffn(norm1(x) · (1 + scale_mlp)))
        let mut h = backend.rms_norm(x, w.ffn_norm1, eps)?;
        if let Some(m) = &modulation {
            backend.modulate(&mut h, samples, &m[2], None)?;
        }
        let f = &w.feed_forward;
        let mut gate = backend.linear(&h, f.w1, None)?; // [rows, ffn]
        let up = backend.linear(&h, f.w3, None)?; // [rows, ffn]
        drop(h);
        backend.silu_mul(&mut gate, &up)?;
        drop(up);
        let y = backend.linear(&gate, f.w2, None)?; // [rows, dim]
        drop(gate);
        tap(&format!("{name}.feed_forward"), &y)?;
        let y = backend.rms_norm(&y, w.ffn_norm2, eps)?;
        match &modulation {
            Some(m) => backend.add_gated(x, samples, &m[3], &y)?,
            None => backend.add_assign(x, 0, &y)?,
        }
        tap(name, x)
    }

    /// Self-attention of each sample over its rows: q/k RMSNorm per head, RoPE, softmax
    /// attention, output projection. `h` `[rows, dim]` → `[rows, dim]`.
    fn attention<B: DitOps>(
        &self,
        backend: &B,
        w: &Attention<'_, B::Weight>,
        h: &B::Activation,
        samples: &[Range<usize>],
        rope: &B::RopeTable,
    ) -> Result<B::Activation> {
        let (heads, head_dim) = (self.config.n_heads, self.config.head_dim());
        let mut q = backend.linear(h, w.to_q, None)?; // [rows, heads·head_dim]
        let mut k = backend.linear(h, w.to_k, None)?;
        let v = backend.linear(h, w.to_v, None)?;
        if let Some((norm_q, norm_k)) = w.qk_norm {
            q = backend.rms_norm(&q, norm_q, QK_NORM_EPS)?;
            k = backend.rms_norm(&k, norm_k, QK_NORM_EPS)?;
        }
        backend.rope_interleaved(&mut q, rope, head_dim)?;
        backend.rope_interleaved(&mut k, rope, head_dim)?;
        let a = backend.attention_within(&q, &k, &v, samples, heads, head_dim)?;
        drop((q, k, v));
        backend.linear(&a, w.to_out, None)
    }

    /// Check a pass's inputs and lay out its rows.
    fn check_input(&self, input: &DitInput<'_>) -> Result<Layout> {
        let c = &self.config;
        let batch = input.t.len();
        let bad = |flag: &'static str, message: String| Error::Flag { flag, message };
        if batch == 0 || input.captions.len() != batch {
            return Err(bad(
                "DiT input",
                format!(
                    "{batch} timesteps and {} captions; expected one of each per sample, at least one sample",
                    input.captions.len()
                ),
            ));
        }
        let p = c.patch();
        let (h, w) = (input.height, input.width);
        if h == 0 || w == 0 || h % p != 0 || w % p != 0 {
            return Err(bad(
                "latent size",
                format!("{h}×{w} latent pixels; expected positive multiples of the patch size {p} (images in multiples of {})", 8 * p),
            ));
        }
        let want = batch * c.in_channels * h * w;
        if input.latents.len() != want {
            return Err(Error::Shape {
                tensor: "latents".into(),
                expected: vec![batch, c.in_channels, h, w],
                found: vec![input.latents.len()],
            });
        }
        let mut caption_tokens = Vec::with_capacity(batch);
        for cap in input.captions {
            if cap.is_empty() || cap.len() % c.cap_feat_dim != 0 {
                return Err(Error::Shape {
                    tensor: "caption features".into(),
                    expected: vec![0, c.cap_feat_dim],
                    found: vec![cap.len()],
                });
            }
            caption_tokens.push(cap.len() / c.cap_feat_dim);
        }
        let layout = Layout::new(self.image_tokens(h, w), caption_tokens);
        // The RoPE tables cover axes_lens positions per axis: the image sits after the caption
        // on axis 0, rows and columns on axes 1 and 2.
        let longest = layout.caption_padded.iter().max().copied().unwrap_or(0);
        if longest + 1 >= c.axes_lens[0] || h / p > c.axes_lens[1] || w / p > c.axes_lens[2] {
            return Err(bad(
                "DiT input",
                format!(
                    "a caption of {longest} padded tokens and {}×{} image tokens exceed the model's positions axes_lens {:?}",
                    h / p,
                    w / p,
                    c.axes_lens
                ),
            ));
        }
        Ok(layout)
    }

    fn embedders<'a, W>(&'a self, ws: &'a [W]) -> Embedders<'a, W> {
        let w = Bound::new(&self.groups[EMBEDDERS], ws);
        let key = self.config.patch_key();
        let pair = |s: &str| (w.get(&format!("{s}.weight")), w.get(&format!("{s}.bias")));
        Embedders {
            x_embedder: pair(&format!("all_x_embedder.{key}")),
            cap_norm: w.get("cap_embedder.0.weight"),
            cap_linear: pair("cap_embedder.1"),
            t_mlp0: pair("t_embedder.mlp.0"),
            t_mlp2: pair("t_embedder.mlp.2"),
            x_pad_token: w.get("x_pad_token"),
            cap_pad_token: w.get("cap_pad_token"),
        }
    }

    /// The block of group `g` whose names start with `prefix` (`layers.3`), with its adaLN
    /// when `modulated`.
    fn block<'a, W>(
        &'a self,
        g: usize,
        prefix: &str,
        modulated: bool,
        ws: &'a [W],
    ) -> Block<'a, W> {
        let w = Bound::new(&self.groups[g], ws);
        let p = |s: &str| w.get(&format!("{prefix}.{s}"));
        Block {
            attention: Attention {
                to_q: p("attention.to_q.weight"),
                to_k: p("attention.to_k.weight"),
                to_v: p("attention.to_v.weight"),
                to_out: p("attention.to_out.0.weight"),
                qk_norm: self
                    .config
                    .qk_norm
                    .then(|| (p("attention.norm_q.weight"), p("attention.norm_k.weight"))),
            },
            feed_forward: FeedForward {
                w1: p("feed_forward.w1.weight"),
                w2: p("feed_forward.w2.weight"),
                w3: p("feed_forward.w3.weight"),
            },
            attention_norm1: p("attention_norm1.weight"),
            attention_norm2: p("attention_norm2.weight"),
            ffn_norm1: p("ffn_norm1.weight"),
            ffn_norm2: p("ffn_norm2.weight"),
            adaln_modulation: modulated
                .then(|| (p("adaLN_modulation.0.weight"), p("adaLN_modulation.0.bias"))),
        }
    }

    fn final_weights<'a, W>(&'a self, ws: &'a [W]) -> FinalLayer<'a, W> {
        let w = Bound::new(&self.groups[self.final_layer()], ws);
        let prefix = format!("all_final_layer.{}", self.config.patch_key());
        let pair = |s: &str| {
            (
                w.get(&format!("{prefix}.{s}.weight")),
                w.get(&format!("{prefix}.{s}.bias")),
            )
        };
        FinalLayer {
            adaln_modulation: pair("adaLN_modulation.1"),
            linear: pair("linear"),
        }
    }

    /// [`Architecture::pass_cost`] for a pass whose samples each hold `image_tokens` image
    /// tokens and `caption_tokens` caption tokens (valid ones, before padding).
    pub fn step_cost(&self, image_tokens: usize, caption_tokens: usize, batch: usize) -> PassCost {
        cost::pass_cost(&self.config, image_tokens, caption_tokens, batch)
    }
}

impl Architecture for ZImage {
    /// Embedders, noise refiner blocks, context refiner blocks, main blocks, final layer.
    fn groups(&self) -> &[WeightGroup] {
        &self.groups
    }

    /// `shape.tokens` is each sample's image + caption tokens, of which the caption is taken
    /// to be [`cost::ASSUMED_CAPTION_TOKENS`] (at most half); use
    /// [`step_cost`](ZImage::step_cost) when the split is known.
    fn pass_cost(&self, shape: PassShape) -> PassCost {
        let caption = cost::ASSUMED_CAPTION_TOKENS.min(shape.tokens / 2);
        self.step_cost(shape.tokens - caption, caption, shape.batch)
    }
}

/// `[batch, 256]`: the sinusoidal features of `t · t_scale`, cosines first, in f32 as diffusers
/// computes them (`exp(−ln(10000) · j / 128)`).
fn timestep_features(t: &[f32], t_scale: f32) -> Vec<f32> {
    let half = T_FREQ_DIM / 2;
    let neg_log = -(T_MAX_PERIOD.ln() as f32);
    let freqs: Vec<f32> = (0..half)
        .map(|j| (neg_log * j as f32 / half as f32).exp())
        .collect();
    let mut out = Vec::with_capacity(t.len() * T_FREQ_DIM);
    for &t in t {
        let t = t * t_scale;
        out.extend(freqs.iter().map(|f| (t * f).cos()));
        out.extend(freqs.iter().map(|f| (t * f).sin()));
    }
    out
}

/// `[batch, c, h, w]` → `[batch · (h/p)·(w/p), p·p·c]`: token (row, col) row-major, features in
/// (patch row, patch column, channel) order, channel fastest.
fn patchify(x: &[f32], batch: usize, c: usize, h: usize, w: usize, p: usize) -> Vec<f32> {
    let (ht, wt) = (h / p, w / p);
    let mut out = Vec::with_capacity(x.len());
    for b in 0..batch {
        let img = &x[b * c * h * w..(b + 1) * c * h * w];
        for ty in 0..ht {
            for tx in 0..wt {
                for py in 0..p {
                    for px in 0..p {
                        let (y, xx) = (ty * p + py, tx * p + px);
                        out.extend((0..c).map(|ch| img[(ch * h + y) * w + xx]));
                    }
                }
            }
        }
    }
    out
}

/// The inverse of [`patchify`]: `[batch · tokens, p·p·c]` → `[batch, c, h, w]`.
fn unpatchify(x: &[f32], batch: usize, c: usize, h: usize, w: usize, p: usize) -> Vec<f32> {
    let (ht, wt) = (h / p, w / p);
    let features = p * p * c;
    let mut out = vec![0f32; batch * c * h * w];
    for b in 0..batch {
        for ty in 0..ht {
            for tx in 0..wt {
                let token = &x[((b * ht + ty) * wt + tx) * features..][..features];
                for py in 0..p {
                    for px in 0..p {
                        for ch in 0..c {
                            let (y, xx) = (ty * p + py, tx * p + px);
                            out[((b * c + ch) * h + y) * w + xx] = token[(py * p + px) * c + ch];
                        }
                    }
                }
            }
        }
    }
    out
}

/// RoPE positions of the image sequence: token (row, col) of sample `s` at `(Pc_s + 1, row,
/// col)`, pads at `(0, 0, 0)`.
fn image_positions(layout: &Layout, rows: usize, cols: usize) -> Vec<[u32; 3]> {
    let mut out = Vec::with_capacity(layout.image_padded * layout.caption_padded.len());
    for &pc in &layout.caption_padded {
        for y in 0..rows {
            for x in 0..cols {
                out.push([pc as u32 + 1, y as u32, x as u32]);
            }
        }
        out.extend(std::iter::repeat_n(
            [0, 0, 0],
            layout.image_padded - rows * cols,
        ));
    }
    out
}

/// The groups with the tensors (diffusers' names) and shapes each holds.
fn weight_groups(c: &ZImageConfig) -> Vec<WeightGroup> {
    let t = |name: String, shape: &[usize]| TensorSpec::new(name, shape);
    let (dim, hd, ffn, adaln, pf) = (
        c.dim,
        c.head_dim(),
        c.ffn_dim(),
        c.adaln_dim(),
        c.patch_features(),
    );
    let key = c.patch_key();
    let mut groups = vec![WeightGroup::new(
        "embedders",
        vec![
            t(format!("all_x_embedder.{key}.weight"), &[dim, pf]),
            t(format!("all_x_embedder.{key}.bias"), &[dim]),
            t("cap_embedder.0.weight".into(), &[c.cap_feat_dim]),
            t("cap_embedder.1.weight".into(), &[dim, c.cap_feat_dim]),
            t("cap_embedder.1.bias".into(), &[dim]),
            t("t_embedder.mlp.0.weight".into(), &[T_MID_DIM, T_FREQ_DIM]),
            t("t_embedder.mlp.0.bias".into(), &[T_MID_DIM]),
            t("t_embedder.mlp.2.weight".into(), &[adaln, T_MID_DIM]),
            t("t_embedder.mlp.2.bias".into(), &[adaln]),
            t("x_pad_token".into(), &[1, dim]),
            t("cap_pad_token".into(), &[1, dim]),
        ],
    )];
    let block = |prefix: String, modulated: bool| {
        let p = |s: &str| format!("{prefix}.{s}");
        let mut tensors = vec![
            t(p("attention.to_q.weight"), &[dim, dim]),
            t(p("attention.to_k.weight"), &[dim, dim]),
            t(p("attention.to_v.weight"), &[dim, dim]),
            t(p("attention.to_out.0.weight"), &[dim, dim]),
        ];
        if c.qk_norm {
            tensors.push(t(p("attention.norm_q.weight"), &[hd]));
            tensors.push(t(p("attention.norm_k.weight"), &[hd]));
        }
        tensors.extend([
            t(p("feed_forward.w1.weight"), &[ffn, dim]),
            t(p("feed_forward.w2.weight"), &[dim, ffn]),
            t(p("feed_forward.w3.weight"), &[ffn, dim]),
            t(p("attention_norm1.weight"), &[dim]),
            t(p("attention_norm2.weight"), &[dim]),
            t(p("ffn_norm1.weight"), &[dim]),
            t(p("ffn_norm2.weight"), &[dim]),
        ]);
        if modulated {
            tensors.push(t(p("adaLN_modulation.0.weight"), &[4 * dim, adaln]));
            tensors.push(t(p("adaLN_modulation.0.bias"), &[4 * dim]));
        }
        tensors
    };
    for i in 0..c.n_refiner_layers {
        groups.push(WeightGroup::new(
            format!("noise refiner {i}"),
            block(format!("noise_refiner.{i}"), true),
        ));
    }
    for i in 0..c.n_refiner_layers {
        groups.push(WeightGroup::new(
            format!("context refiner {i}"),
            block(format!("context_refiner.{i}"), false),
        ));
    }
    for i in 0..c.n_layers {
        groups.push(WeightGroup::new(
            format!("block {i}"),
            block(format!("layers.{i}"), true),
        ));
    }
    let f = |s: &str| format!("all_final_layer.{key}.{s}");
    groups.push(WeightGroup::new(
        "final layer",
        vec![
            t(f("adaLN_modulation.1.weight"), &[dim, adaln]),
            t(f("adaLN_modulation.1.bias"), &[dim]),
            t(f("linear.weight"), &[pf, dim]),
            t(f("linear.bias"), &[pf]),
        ],
    ));
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patchify_round_trips_in_channel_fastest_order() {
        let (b, c, h, w, p) = (2, 3, 4, 6, 2);
        let x: Vec<f32> = (0..b * c * h * w).map(|i| i as f32).collect();
        let t = patchify(&x, b, c, h, w, p);
        // Token (0, 1) of sample 0, patch pixel (1, 0), channel 2: x[0, 2, 1, 2].
        let (token, pixel, channel) = (1, p, 2); // pixel (1, 0) is index 1·p + 0
        assert_eq!(
            t[token * p * p * c + pixel * c + channel],
            x[(2 * h + 1) * w + 2]
        );
        assert_eq!(unpatchify(&t, b, c, h, w, p), x);
    }

    #[test]
    fn positions_follow_the_caption() {
        let layout = Layout::new(6, vec![31, 40]);
        assert_eq!(
            (layout.image_padded, layout.caption_padded.clone()),
            (32, vec![32, 64])
        );
        assert_eq!(layout.unified, vec![0..64, 64..160]);
        let pos = image_positions(&layout, 2, 3);
        assert_eq!(pos[0], [33, 0, 0]);
        assert_eq!(pos[5], [33, 1, 2]);
        assert_eq!(pos[6], [0, 0, 0]);
        assert_eq!(pos[32], [65, 0, 0]);
    }
}
