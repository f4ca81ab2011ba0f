//! Qwen-Image's diffusion transformer (diffusers `QwenImageTransformer2DModel`, 20.4 B
//! parameters): a double-stream MMDiT. The image and the text keep streams of their own
//! through every block (their own modulation, LayerNorms, q/k/v, output projections and
//! MLPs) and meet only in attention, which runs over each sample's `[text, image]` tokens.
//!
//! One pass is one denoising step for every sample of a batch (several images; the two
//! branches of guidance are two samples): each group's weights are asked for once and serve
//! all samples. Samples are stacked row-wise in each stream with no padding between them and
//! never attend to each other. A sample's text is its valid tokens only: diffusers pads the
//! batch's texts to the longest and masks the pads as keys, which gives the valid tokens and
//! the image the same values (pads sit after the valid tokens, as the pipeline lays them out,
//! so the valid tokens keep their RoPE positions).
//!
//! Inputs and output are the pipeline's packed latents (`_pack_latents`): `[batch,
//! (h/2)·(w/2), 4·C]` for `[batch, C, h, w]` latents, token (row, col) row-major, features in
//! (channel, patch row, patch col) order; see [`pack_latents`]. RoPE positions: see [`rope`].
//!
//! A block, per stream (diffusers' `QwenImageTransformerBlock`):
//! ```text
//! shift1, scale1, gate1, shift2, scale2, gate2 = linear(silu(temb))     // [batch, dim] each
//! h = LayerNorm(x) · (1 + scale1) + shift1
//! q, k, v = linear(h) (bias), RMSNorm per head on q and k, RoPE on q and k
//! a = joint attention over [text, image] of each sample, then the stream's output linear
//! x = x + gate1 · a
//! x = x + gate2 · MLP(LayerNorm(x) · (1 + scale2) + shift2)        // GELU-tanh, 4·dim hidden
//! ```
//! The block is written once for Qwen-Image and Flux.1, in `model/mmdit.rs`.

mod config;
mod cost;
mod modulation;
pub mod rope;
pub mod single_file;
pub mod vae;

pub use config::{QwenImageConfig, CLASS_NAME, PATCH};
pub use modulation::{ModulationTable, QwenImageModulation};
pub use rope::QwenRope;

pub use super::mmdit::Modulation;

use super::mmdit::{
    self, linear_specs, per_sample, Block, FinalLayer, Heads, Layout, Linear, Source, Stream,
    StreamNames, T_FREQ_DIM, T_MAX_PERIOD,
};
use super::z_image::Trace;
use super::{Architecture, Bound, PassCost, PassShape, TensorSpec, WeightGroup, Weights};
use crate::backend::dit::{DitOps, Pointwise};
use crate::error::{Error, Result};

/// The timestep projection's `scale` (diffusers' `Timesteps(…, scale=1000)`).
const T_SCALE: f32 = 1000.0;
/// Epsilon of every norm: the blocks' LayerNorms and q/k RMSNorms (the block's `eps=1e-6`),
/// `txt_norm`, `norm_out`.
const EPS: f32 = 1e-6;

/// The inputs of one pass.
pub struct DitInput<'a> {
    /// `[batch, (height/2)·(width/2), in_channels]` f32: the packed latents being denoised
    /// (see [`pack_latents`]).
    pub latents: &'a [f32],
    /// Latent pixels (the image's pixels / 8); even.
    pub height: usize,
    pub width: usize,
    /// `[batch]`: each sample's σ, the pipeline's `timestep / 1000` (1 at the first step).
    pub timestep: &'a [f32],
    /// One per sample, `[tokens, joint_attention_dim]` f32: the text encoder's features of the
    /// prompt's valid tokens (the lengths may differ).
    pub texts: &'a [&'a [f32]],
}

pub struct QwenImage {
    pub config: QwenImageConfig,
    /// Whether a pass computes the modulation from the timestep or takes it from a
    /// [`ModulationTable`] (then its groups leave those weights out).
    pub modulation: Modulation,
    groups: Vec<WeightGroup>,
    rope: QwenRope,
}

/// Where each part sits among the groups, in pass order.
const EMBEDDERS: usize = 0;

/// The timestep embedder: `time_text_embed.timestep_embedder.linear_1`, `.linear_2` (SiLU
/// between them).
struct TimestepEmbedder<'a, W> {
    linear_1: Linear<'a, W>,
    linear_2: Linear<'a, W>,
}

/// The embedders' group.
struct Embedders<'a, W> {
    /// With [`Modulation::InSteps`] only.
    timestep: Option<TimestepEmbedder<'a, W>>,
    /// RMSNorm over the text features, before `txt_in`.
    txt_norm: &'a W,
    img_in: Linear<'a, W>,
    txt_in: Linear<'a, W>,
}

/// One stream's tensor names in a block, relative to `transformer_blocks.N.`: the image's
/// (`img_mod.1`, `attn.to_q`, `attn.norm_q`, `attn.to_out.0`, `img_mlp.net.0.proj`,
/// `img_mlp.net.2`) and the text's (`txt_mod.1`, `attn.add_q_proj`, `attn.norm_added_q`,
/// `attn.to_add_out`, `txt_mlp.…`).
const IMAGE_NAMES: StreamNames = StreamNames {
    modulation: "img_mod.1",
    attn: mmdit::IMAGE_ATTN,
    mlp: "img_mlp",
};

const TEXT_NAMES: StreamNames = StreamNames {
    modulation: "txt_mod.1",
    attn: mmdit::TEXT_ATTN,
    mlp: "txt_mlp",
};

impl QwenImage {
    /// Passes that compute their modulation ([`Modulation::InSteps`]).
    pub fn new(config: QwenImageConfig) -> QwenImage {
        Self::with(config, Modulation::InSteps)
    }

    /// Passes that take their modulation from a [`ModulationTable`]
    /// ([`Modulation::Precomputed`]): [`modulation_model`](Self::modulation_model) makes it.
    pub fn precomputed(config: QwenImageConfig) -> QwenImage {
        Self::with(config, Modulation::Precomputed)
    }

    fn with(config: QwenImageConfig, modulation: Modulation) -> QwenImage {
        let groups = weight_groups(&config, modulation);
        let rope = QwenRope::new(&config.axes_dims_rope);
        QwenImage {
            config,
            modulation,
            groups,
            rope,
        }
    }

    /// The model of the weights this one's passes leave out with
    /// [`Modulation::Precomputed`]: it makes their [`ModulationTable`].
    pub fn modulation_model(&self) -> QwenImageModulation {
        QwenImageModulation::new(self.config.clone())
    }

    fn block_group(&self, i: usize) -> usize {
        1 + i
    }
    fn final_group(&self) -> usize {
        1 + self.config.num_layers
    }

    /// Image tokens of a `height × width` latent.
    pub fn image_tokens(&self, height: usize, width: usize) -> usize {
        (height / PATCH) * (width / PATCH)
    }

    /// One denoising step for every sample: the transformer's output, `[batch, tokens,
    /// patch features]` f32 packed as its input, in sample order, as diffusers' transformer
    /// returns it (the velocity the pipeline's scheduler steps along).
    pub fn forward<B: DitOps>(
        &self,
        backend: &B,
        weights: &mut impl Weights<B::Weight>,
        input: &DitInput<'_>,
    ) -> Result<Vec<f32>> {
        self.pass(backend, weights, input, None, None)
    }

    /// [`forward`](Self::forward) with every sample's modulation from `table` (which must
    /// hold each sample's σ): the same bits as computing it in the pass.
    pub fn forward_with<B: DitOps>(
        &self,
        backend: &B,
        weights: &mut impl Weights<B::Weight>,
        input: &DitInput<'_>,
        table: &ModulationTable,
    ) -> Result<Vec<f32>> {
        self.pass(backend, weights, input, Some(table), None)
    }

    /// [`forward`](Self::forward), handing `trace` the intermediates on the host (for tests
    /// against diffusers' hooks): `temb` `[batch, dim]`; `img_in` `[batch·n, dim]`; `txt_in`
    /// `[Σ L, dim]` (valid tokens only); `img_freqs` `[batch·n, head_dim]` and `txt_freqs`
    /// `[Σ L, head_dim]` (the RoPE tables); per block `blocks.{i}.attn.img`,
    /// `blocks.{i}.attn.txt` (attention after the output linears, before the gates),
    /// `blocks.{i}.img`, `blocks.{i}.txt` (the block's outputs); `norm_out` `[batch·n, dim]`.
    pub fn forward_traced<B: DitOps>(
        &self,
        backend: &B,
        weights: &mut impl Weights<B::Weight>,
        input: &DitInput<'_>,
        trace: Option<&mut Trace<'_>>,
    ) -> Result<Vec<f32>> {
        self.pass(backend, weights, input, None, trace)
    }

    /// One pass, its modulation from `table` or, without one, computed.
    fn pass<B: DitOps>(
        &self,
        backend: &B,
        weights: &mut impl Weights<B::Weight>,
        input: &DitInput<'_>,
        table: Option<&ModulationTable>,
        mut trace: Option<&mut Trace<'_>>,
    ) -> Result<Vec<f32>> {
        let c = &self.config;
        let layout = self.check_input(input)?;
        let batch = layout.batch();
        let sigmas = Sigmas::of(input.timestep);
        let table = match (table, self.modulation) {
            (Some(t), _) => Some(t.entries(c, &sigmas)?),
            (None, Modulation::InSteps) => None,
            (None, Modulation::Precomputed) => {
                return Err(Error::Flag {
                    flag: "DiT input",
                    message: "this Qwen-Image DiT leaves its modulation weights out; expected a modulation table (forward_with)".into(),
                })
            }
        };
        let head_dim = c.head_dim();
        // RoPE tables (host f32, then the backend's): every sample's image at the same
        // positions, each sample's text from the same start.
        let image_pos = rope::image_positions(layout.rows, layout.cols);
        let image_table: Vec<f32> = self.rope.table(&image_pos).repeat(batch);
        let mut text_table = Vec::new();
        for &l in &layout.text_tokens {
            text_table.extend_from_slice(&self.rope.table(&rope::text_positions(
                layout.rows,
                layout.cols,
                l,
            )));
        }
        let total_text: usize = layout.text_tokens.iter().sum();
        if let Some(t) = trace.as_deref_mut() {
            t("img_freqs", image_table.clone());
            t("txt_freqs", text_table.clone());
        }
        let mut tap = |name: &str, x: &B::Activation| -> Result<()> {
            if let Some(t) = trace.as_deref_mut() {
                t(name, backend.to_host(x)?);
            }
            Ok(())
        };

        // The embedders: timestep, image tokens, text features.
        let (source, img, txt) = {
            let w = self.embedders(weights.group(EMBEDDERS)?);
            let source = match (table, &w.timestep) {
                (Some(rows), _) => Source::Table(rows),
                (None, Some(te)) => {
                    // Each distinct σ once, one row a pass ([1, dim]), as the table makes them.
                    let mut silu = Vec::with_capacity(sigmas.values.len());
                    let mut temb = Vec::with_capacity(sigmas.values.len());
                    for &sigma in &sigmas.values {
                        let (t, s) = te.embed(backend, sigma)?;
                        temb.push(t);
                        silu.push(s);
                    }
                    tap("temb", &per_sample(backend, &temb, &sigmas.of_sample)?)?;
                    Source::Computed(silu)
                }
                (None, None) => {
                    unreachable!("a Qwen-Image without modulation weights asks for a table")
                }
            };

            // [batch·n, in_channels] → [batch·n, dim]
            let latents =
                backend.upload(input.latents, batch * layout.image_tokens, c.in_channels)?;
            let img = w.img_in.forward(backend, &latents)?;
            drop(latents);
            tap("img_in", &img)?;

            // [Σ L, joint_attention_dim] → RMSNorm → [Σ L, dim]
            let feats = backend.upload(&input.texts.concat(), total_text, c.joint_attention_dim)?;
            let normed = backend.rms_norm(&feats, w.txt_norm, EPS)?;
            drop(feats);
            let txt = w.txt_in.forward(backend, &normed)?;
            tap("txt_in", &txt)?;
            (source, img, txt)
        };

        let mut img = Stream {
            x: img,
            rows: layout.image(),
            rope: backend.rope_table(&image_table, batch * layout.image_tokens, head_dim)?,
        };
        let mut txt = Stream {
            x: txt,
            rows: layout.text(),
            rope: backend.rope_table(&text_table, total_text, head_dim)?,
        };
        drop((image_table, text_table));
        let joint = layout.joint();

        // The modulation linear's vectors for every sample, `[batch, cols]`.
        let vectors =
            |w: Option<&Linear<'_, B::Weight>>,
             pick: &dyn for<'e> Fn(&'e modulation::Entry<'_>) -> &'e [f32]| {
                source.per_sample(backend, w, pick, &sigmas.of_sample)
            };

        for i in 0..c.num_layers {
            let g = self.block_group(i);
            let w = self.block(g, i, weights.group(g)?);
            let mods = w.modulation(backend, |m, s| vectors(m, &|e| e.stream(i, s)))?;
            w.forward(
                backend,
                &mut img,
                &mut txt,
                &joint,
                &mods,
                self.heads(),
                &mut |name, x| tap(&format!("blocks.{i}.{name}"), x),
            )?;
            tap(&format!("blocks.{i}.img"), &img.x)?;
            tap(&format!("blocks.{i}.txt"), &txt.x)?;
        }
        drop(txt);

        // norm_out: LayerNorm · (1 + scale) + shift (chunk order scale, shift), then proj_out.
        let out = {
            let w = self.final_weights(weights.group(self.final_group())?);
            // emb [batch, 2·dim]; out [batch·n, patch features]
            let emb = vectors(w.norm_out.as_ref(), &|e| e.norm_out())?;
            let out = w.forward(backend, &img.x, &img.rows, &emb, EPS, &mut tap)?;
            backend.to_host(&out)?
        };
        weights.finish_pass()?;
        Ok(out)
    }

    /// Check a pass's inputs and lay out its rows.
    fn check_input(&self, input: &DitInput<'_>) -> Result<Layout> {
        let c = &self.config;
        let batch = input.timestep.len();
        let bad = |flag: &'static str, message: String| Error::Flag { flag, message };
        if batch == 0 || input.texts.len() != batch {
            return Err(bad(
                "DiT input",
                format!(
                    "{batch} timesteps and {} texts; expected one of each per sample, at least one sample",
                    input.texts.len()
                ),
            ));
        }
        let layout = Layout::check(
            input.latents,
            (input.height, input.width, PATCH),
            input.texts,
            (c.in_channels, c.joint_attention_dim),
        )?;
        let (rows, cols) = (layout.rows, layout.cols);
        // diffusers' RoPE tables hold positions −4096..4095.
        let longest = layout.text_tokens.iter().max().copied().unwrap_or(0);
        let last_text = rope::text_start(rows, cols) as usize + longest;
        if last_text > rope::MAX_POSITIONS || rows.max(cols) > rope::MAX_POSITIONS {
            return Err(bad(
                "DiT input",
                format!(
                    "a text of {longest} tokens beside {rows}×{cols} image tokens needs RoPE positions up to {last_text}; the model has {}",
                    rope::MAX_POSITIONS
                ),
            ));
        }
        Ok(layout)
    }

    fn embedders<'a, W>(&'a self, ws: &'a [W]) -> Embedders<'a, W> {
        let w = Bound::new(&self.groups[EMBEDDERS], ws);
        let linear = |s: &str| Linear::bind(&w, s);
        Embedders {
            timestep: (self.modulation == Modulation::InSteps).then(|| timestep_embedder(&w)),
            txt_norm: w.get("txt_norm.weight"),
            img_in: linear("img_in"),
            txt_in: linear("txt_in"),
        }
    }

    fn block<'a, W>(&'a self, g: usize, index: usize, ws: &'a [W]) -> Block<'a, W> {
        let w = Bound::new(&self.groups[g], ws);
        Block::bind(&w, index, [&IMAGE_NAMES, &TEXT_NAMES], self.modulation)
    }

    /// The blocks' attention shape.
    fn heads(&self) -> Heads {
        Heads {
            heads: self.config.num_attention_heads,
            head_dim: self.config.head_dim(),
            eps: EPS,
        }
    }

    fn final_weights<'a, W>(&'a self, ws: &'a [W]) -> FinalLayer<'a, W> {
        let w = Bound::new(&self.groups[self.final_group()], ws);
        FinalLayer::bind(&w, self.modulation)
    }

    /// [`Architecture::pass_cost`] for a pass whose samples each hold `image_tokens` image
    /// tokens and `text_tokens` text tokens.
    pub fn step_cost(&self, image_tokens: usize, text_tokens: usize, batch: usize) -> PassCost {
        cost::pass_cost(&self.config, image_tokens, text_tokens, batch)
    }
}

impl Architecture for QwenImage {
    /// Embedders, the double-stream blocks, the final layer.
    fn groups(&self) -> &[WeightGroup] {
        &self.groups
    }

    /// `shape.tokens` is each sample's image + text tokens, of which the text is taken to be
    /// [`cost::ASSUMED_TEXT_TOKENS`] (at most half); use [`step_cost`](QwenImage::step_cost)
    /// when the split is known.
    fn pass_cost(&self, shape: PassShape) -> PassCost {
        let text = cost::ASSUMED_TEXT_TOKENS.min(shape.tokens / 2);
        self.step_cost(shape.tokens - text, text, shape.batch)
    }
}

/// Each distinct σ of a pass, and the index among them of each sample's.
pub(super) struct Sigmas {
    pub values: Vec<f32>,
    pub of_sample: Vec<usize>,
}

impl Sigmas {
    /// `timestep`'s distinct values (by their bits) in order of first appearance.
    pub fn of(timestep: &[f32]) -> Sigmas {
        let mut values: Vec<f32> = Vec::new();
        let of_sample = timestep
            .iter()
            .map(
                |t| match values.iter().position(|v| v.to_bits() == t.to_bits()) {
                    Some(k) => k,
                    None => {
                        values.push(*t);
                        values.len() - 1
                    }
                },
            )
            .collect();
        Sigmas { values, of_sample }
    }
}

impl<W> TimestepEmbedder<'_, W> {
    /// `temb = linear_2(silu(linear_1(sinusoids(σ))))` and `silu(temb)`, what every
    /// modulation linear takes, `[1, dim]` each: one row, whatever the batch, so that a
    /// table made for a schedule holds the same bits as a pass computes.
    fn embed<B: DitOps<Weight = W>>(
        &self,
        backend: &B,
        sigma: f32,
    ) -> Result<(B::Activation, B::Activation)> {
        let freqs = backend.upload(&timestep_features(&[sigma]), 1, T_FREQ_DIM)?;
        let mut h = self.linear_1.forward(backend, &freqs)?;
        backend.pointwise(&mut h, Pointwise::Silu)?;
        let temb = self.linear_2.forward(backend, &h)?;
        let mut silu = backend.rows(&temb, 0, 1)?;
        backend.pointwise(&mut silu, Pointwise::Silu)?;
        Ok((temb, silu))
    }
}

/// `[batch, 256]`: the sinusoidal features of `σ · 1000`, cosines first, in f32 as diffusers'
/// `Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0, scale=1000)` computes them:
/// frequencies `exp(−ln(10000) · j / 128)`, the angle `1000 · (σ · freq)`.
fn timestep_features(sigma: &[f32]) -> Vec<f32> {
    let half = T_FREQ_DIM / 2;
    let neg_log = -(T_MAX_PERIOD.ln() as f32);
    let freqs: Vec<f32> = (0..half)
        .map(|j| (neg_log * j as f32 / half as f32).exp())
        .collect();
    let mut out = Vec::with_capacity(sigma.len() * T_FREQ_DIM);
    for &s in sigma {
        let angles: Vec<f32> = freqs.iter().map(|f| T_SCALE * (s * f)).collect();
        out.extend(angles.iter().map(|a| a.cos()));
        out.extend(angles.iter().map(|a| a.sin()));
    }
    out
}

/// The pipeline's `_pack_latents`: `[batch, c, h, w]` → `[batch, (h/2)·(w/2), 4·c]`, token
/// (row, col) row-major, features in (channel, patch row, patch col) order.
pub fn pack_latents(x: &[f32], batch: usize, c: usize, h: usize, w: usize) -> Vec<f32> {
    assert_eq!(
        x.len(),
        batch * c * h * w,
        "pack_latents: [{batch}, {c}, {h}, {w}]"
    );
    let (p, rows, cols) = (PATCH, h / PATCH, w / PATCH);
    let mut out = Vec::with_capacity(x.len());
    for b in 0..batch {
        let img = &x[b * c * h * w..(b + 1) * c * h * w];
        for ty in 0..rows {
            for tx in 0..cols {
                for ch in 0..c {
                    for py in 0..p {
                        for px in 0..p {
                            out.push(img[(ch * h + ty * p + py) * w + tx * p + px]);
                        }
                    }
                }
            }
        }
    }
    out
}

/// The inverse of [`pack_latents`] (the pipeline's `_unpack_latents`, without its frame
/// axis of 1): `[batch, (h/2)·(w/2), 4·c]` → `[batch, c, h, w]`.
pub fn unpack_latents(x: &[f32], batch: usize, c: usize, h: usize, w: usize) -> Vec<f32> {
    assert_eq!(
        x.len(),
        batch * c * h * w,
        "unpack_latents: [{batch}, {c}, {h}, {w}]"
    );
    let (p, rows, cols) = (PATCH, h / PATCH, w / PATCH);
    let mut out = vec![0f32; x.len()];
    let mut it = x.iter();
    for b in 0..batch {
        for ty in 0..rows {
            for tx in 0..cols {
                for ch in 0..c {
                    for py in 0..p {
                        for px in 0..p {
                            let v = *it.next().expect("sized above");
                            out[((b * c + ch) * h + ty * p + py) * w + tx * p + px] = v;
                        }
                    }
                }
            }
        }
    }
    out
}

/// The timestep embedder's linears, bound from `w`.
fn timestep_embedder<'a, W>(w: &Bound<'a, W>) -> TimestepEmbedder<'a, W> {
    let linear = |s: &str| Linear::bind(w, &format!("{TIMESTEP_EMBEDDER}.{s}"));
    TimestepEmbedder {
        linear_1: linear("linear_1"),
        linear_2: linear("linear_2"),
    }
}

/// The timestep embedder's name.
const TIMESTEP_EMBEDDER: &str = "time_text_embed.timestep_embedder";

/// The timestep embedder's specs.
fn timestep_specs(out: &mut Vec<TensorSpec>, dim: usize) {
    linear_specs(
        out,
        format!("{TIMESTEP_EMBEDDER}.linear_1"),
        dim,
        T_FREQ_DIM,
    );
    linear_specs(out, format!("{TIMESTEP_EMBEDDER}.linear_2"), dim, dim);
}

/// The groups with the tensors (diffusers' names) and shapes each holds; with
/// [`Modulation::Precomputed`] without the timestep embedder and the modulation linears. A
/// block's modulation linears come first: they act on the timestep alone.
fn weight_groups(c: &QwenImageConfig, modulation: Modulation) -> Vec<WeightGroup> {
    let (dim, hd, ffn) = (c.dim(), c.head_dim(), c.ffn_dim());
    let in_steps = modulation == Modulation::InSteps;
    let linear = linear_specs;
    let mut embedders = Vec::new();
    if in_steps {
        timestep_specs(&mut embedders, dim);
    }
    embedders.push(TensorSpec::new("txt_norm.weight", &[c.joint_attention_dim]));
    linear(&mut embedders, "img_in".into(), dim, c.in_channels);
    linear(&mut embedders, "txt_in".into(), dim, c.joint_attention_dim);
    let mut groups = vec![WeightGroup::new("embedders", embedders)];
    for i in 0..c.num_layers {
        let t = mmdit::block_specs(i, [&IMAGE_NAMES, &TEXT_NAMES], modulation, (dim, hd, ffn));
        groups.push(WeightGroup::new(format!("block {i}"), t));
    }
    let last = mmdit::final_specs(modulation, dim, c.patch_features());
    groups.push(WeightGroup::new("final layer", last));
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_round_trips_in_channel_then_patch_order() {
        let (b, c, h, w) = (2, 3, 4, 6);
        let x: Vec<f32> = (0..b * c * h * w).map(|i| i as f32).collect();
        let t = pack_latents(&x, b, c, h, w);
        // Token (1, 2) of sample 1, channel 2, patch pixel (1, 0): x[1, 2, 3, 4].
        let token = 6 + 3 + 2;
        assert_eq!(t[token * 4 * c + 2 * 4 + 2], x[((c + 2) * h + 3) * w + 4]);
        assert_eq!(unpack_latents(&t, b, c, h, w), x);
    }
}
