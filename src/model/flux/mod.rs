//! Flux.1's diffusion transformer (diffusers `FluxTransformer2DModel`, 11.9 B parameters):
//! double-stream MMDiT blocks, then single-stream blocks over the joined `[text, image]`
//! tokens of each sample.
//!
//! One pass is one denoising step for every sample of a batch: each group's weights are
//! asked for once and serve all samples. Samples are stacked row-wise with no padding between
//! them and never attend to each other. The pipeline feeds all 512 tokens of T5's padded
//! prompt with no mask; a sample's text may have any length here (every text token sits at
//! RoPE position 0).
//!
//! Inputs and output are the pipeline's packed latents (`_pack_latents`, the same layout as
//! Qwen-Image's): `[batch, (h/2)·(w/2), 4·C]`; see [`pack_latents`]. RoPE: see [`rope`].
//!
//! The conditioning (`temb`, `[batch, dim]`) embeds the timestep, the guidance scale (Flux.1
//! -dev) and CLIP's pooled prompt embedding:
//! ```text
//! temb = MLP_t(sinusoids(σ·1000)) + MLP_g(sinusoids(guidance·1000)) + MLP_p(pooled)
//! ```
//! A double block, per stream (diffusers' `FluxTransformerBlock`):
//! ```text
//! shift1, scale1, gate1, shift2, scale2, gate2 = norm1.linear(silu(temb))  // norm1_context for text
//! h = LayerNorm(x) · (1 + scale1) + shift1
//! q, k, v = linear(h), RMSNorm per head on q and k, RoPE on q and k
//! a = joint attention over [text, image] of each sample, then the stream's output linear
//! x = x + gate1 · a
//! x = x + gate2 · MLP(LayerNorm(x) · (1 + scale2) + shift2)       // GELU-tanh, 4·dim hidden
//! ```
//! This double block is Qwen-Image's too: both run the one in `model/mmdit.rs`.
//! A single block over `x = [text, image]` (`FluxSingleTransformerBlock`):
//! ```text
//! shift, scale, gate = norm.linear(silu(temb))
//! h = LayerNorm(x) · (1 + scale) + shift
//! a = attention(h) (q, k, v, RMSNorm on q and k, RoPE; no output linear)
//! x = x + gate · proj_out([a, gelu_tanh(proj_mlp(h))])
//! ```
//! Then `norm_out` (`LayerNorm(x) · (1 + scale) + shift`, scale first) and `proj_out` on the
//! image tokens.

mod config;
mod cost;
mod modulation;
pub mod rope;
pub mod single_file;

pub use super::mmdit::Modulation;
pub use super::qwen_image::{pack_latents, unpack_latents};
pub use config::{FluxConfig, CLASS_NAME};
pub use modulation::{FluxModulation, ModulationTable};
pub use rope::FluxRope;

use super::mmdit::{
    self, linear_specs, per_sample, qkv_specs, Block, FinalLayer, Heads, Layout, Linear,
    QkvWeights, Source, Stream, StreamNames, T_FREQ_DIM, T_MAX_PERIOD,
};
use super::z_image::Trace;
use super::{Architecture, Bound, PassCost, PassShape, TensorSpec, WeightGroup, Weights};
use crate::backend::dit::{DitOps, Pointwise};
use crate::error::{Error, Result};

/// The patch the pipeline packs.
pub const PATCH: usize = 2;
/// diffusers multiplies the σ and the guidance scale it is given by 1000 before the
/// sinusoids.
const T_SCALE: f32 = 1000.0;
/// Epsilon of every norm: the LayerNorms, the q/k RMSNorms, `norm_out`.
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
    /// `[batch]`: each sample's guidance scale as the pipeline gives it (3.5), for a model
    /// with `guidance_embeds`; `None` for one without (Flux.1-schnell).
    pub guidance: Option<&'a [f32]>,
    /// One per sample, `[pooled_projection_dim]` f32: CLIP's pooled prompt embedding.
    pub pooled: &'a [&'a [f32]],
    /// One per sample, `[tokens, joint_attention_dim]` f32: T5's features of the prompt (the
    /// pipeline's 512 padded tokens).
    pub texts: &'a [&'a [f32]],
}

pub struct Flux {
    pub config: FluxConfig,
    /// Whether a pass computes the modulation from the conditioning or takes it from a
    /// [`ModulationTable`] (then its groups leave those weights out).
    pub modulation: Modulation,
    groups: Vec<WeightGroup>,
    rope: FluxRope,
}

/// Where each part sits among the groups, in pass order.
const EMBEDDERS: usize = 0;

/// A two-layer MLP with SiLU between (`TimestepEmbedding`, `PixArtAlphaTextProjection`):
/// `linear_2(silu(linear_1(x)))`.
struct Mlp<'a, W> {
    linear_1: Linear<'a, W>,
    linear_2: Linear<'a, W>,
}

impl<W> Mlp<'_, W> {
    fn forward<B: DitOps<Weight = W>>(
        &self,
        backend: &B,
        x: &B::Activation,
    ) -> Result<B::Activation> {
        let mut h = self.linear_1.forward(backend, x)?;
        backend.pointwise(&mut h, Pointwise::Silu)?;
        self.linear_2.forward(backend, &h)
    }
}

/// `time_text_embed` (`CombinedTimestepGuidanceTextProjEmbeddings`, or
/// `CombinedTimestepTextProjEmbeddings` without guidance).
struct TimeTextEmbed<'a, W> {
    timestep: Mlp<'a, W>,
    guidance: Option<Mlp<'a, W>>,
    text: Mlp<'a, W>,
}

/// The embedders' group.
struct Embedders<'a, W> {
    /// With [`Modulation::InSteps`] only.
    time_text: Option<TimeTextEmbed<'a, W>>,
    x_embedder: Linear<'a, W>,
    context_embedder: Linear<'a, W>,
}

/// One single-stream block (`single_transformer_blocks.N`).
struct SingleBlock<'a, W> {
    /// `norm.linear`: `silu(temb)` → shift, scale, gate; with [`Modulation::InSteps`] only.
    modulation: Option<Linear<'a, W>>,
    /// `attn.to_q`, `attn.norm_q`, …: the image stream's names of a double block.
    attn: QkvWeights<'a, W>,
    proj_mlp: Linear<'a, W>,
    /// `[dim, dim + ffn]`: over the attention's columns, then the MLP's.
    proj_out: Linear<'a, W>,
}

/// One stream's tensor names in a double block, relative to `transformer_blocks.N.`: the
/// image's (`norm1.linear`, `attn.to_q`, `attn.norm_q`, `attn.to_out.0`, `ff.net.0.proj`,
/// `ff.net.2`) and the text's (`norm1_context.linear`, `attn.add_q_proj`,
/// `attn.norm_added_q`, `attn.to_add_out`, `ff_context.…`).
const IMAGE_NAMES: StreamNames = StreamNames {
    modulation: "norm1.linear",
    attn: mmdit::IMAGE_ATTN,
    mlp: "ff",
};

const TEXT_NAMES: StreamNames = StreamNames {
    modulation: "norm1_context.linear",
    attn: mmdit::TEXT_ATTN,
    mlp: "ff_context",
};

const TIMESTEP_EMBEDDER: &str = "time_text_embed.timestep_embedder";
const GUIDANCE_EMBEDDER: &str = "time_text_embed.guidance_embedder";
const TEXT_EMBEDDER: &str = "time_text_embed.text_embedder";

/// What a sample's modulation depends on.
#[derive(Clone, Copy, Debug)]
pub(super) struct Condition<'a> {
    pub sigma: f32,
    pub guidance: Option<f32>,
    pub pooled: &'a [f32],
}

impl Condition<'_> {
    /// The same bits: the same modulation.
    pub fn same(&self, other: &Condition<'_>) -> bool {
        let same = |a: f32, b: f32| a.to_bits() == b.to_bits();
        same(self.sigma, other.sigma)
            && self.guidance.map(f32::to_bits) == other.guidance.map(f32::to_bits)
            && self.pooled.len() == other.pooled.len()
            && self
                .pooled
                .iter()
                .zip(other.pooled)
                .all(|(&a, &b)| same(a, b))
    }
}

/// Each distinct condition of a pass, and the index among them of each sample's.
pub(super) struct Conditions<'a> {
    pub values: Vec<Condition<'a>>,
    pub of_sample: Vec<usize>,
}

impl<'a> Conditions<'a> {
    /// `conditions`' distinct values (by their bits) in order of first appearance.
    pub fn of(conditions: impl IntoIterator<Item = Condition<'a>>) -> Conditions<'a> {
        let mut values: Vec<Condition<'a>> = Vec::new();
        let of_sample = conditions
            .into_iter()
            .map(|c| match values.iter().position(|v| v.same(&c)) {
                Some(k) => k,
                None => {
                    values.push(c);
                    values.len() - 1
                }
            })
            .collect();
        Conditions { values, of_sample }
    }
}

impl Flux {
    /// Passes that compute their modulation ([`Modulation::InSteps`]).
    pub fn new(config: FluxConfig) -> Flux {
        Self::with(config, Modulation::InSteps)
    }

    /// Passes that take their modulation from a [`ModulationTable`]
    /// ([`Modulation::Precomputed`]): [`modulation_model`](Self::modulation_model) makes it.
    pub fn precomputed(config: FluxConfig) -> Flux {
        Self::with(config, Modulation::Precomputed)
    }

    fn with(config: FluxConfig, modulation: Modulation) -> Flux {
        let groups = weight_groups(&config, modulation);
        let rope = FluxRope::new(&config.axes_dims_rope);
        Flux {
            config,
            modulation,
            groups,
            rope,
        }
    }

    /// The model of the weights this one's passes leave out with
    /// [`Modulation::Precomputed`]: it makes their [`ModulationTable`].
    pub fn modulation_model(&self) -> FluxModulation {
        FluxModulation::new(self.config.clone())
    }

    fn double_group(&self, i: usize) -> usize {
        1 + i
    }
    fn single_group(&self, i: usize) -> usize {
        1 + self.config.num_layers + i
    }
    fn final_group(&self) -> usize {
        1 + self.config.num_layers + self.config.num_single_layers
    }

    /// Image tokens of a `height × width` latent.
    pub fn image_tokens(&self, height: usize, width: usize) -> usize {
        (height / PATCH) * (width / PATCH)
    }

    /// One denoising step for every sample: the transformer's output, `[batch, tokens,
    /// in_channels]` f32 packed as its input, in sample order, as diffusers' transformer
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
    /// hold each sample's σ, guidance and pooled embedding): the same bits as computing it
    /// in the pass.
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
    /// against diffusers' hooks): `temb` `[batch, dim]`; `x_embedder` `[batch·n, dim]`;
    /// `context_embedder` `[Σ L, dim]`; `img_freqs` `[n, head_dim]` (one sample's RoPE
    /// table); per double block `double.{i}.img`, `double.{i}.txt` (its outputs); per single
    /// block `single.{i}` `[Σ (L + n), dim]` (each sample's text, then its image);
    /// `norm_out` `[batch·n, dim]`.
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
        let conditions = Conditions::of((0..batch).map(|s| Condition {
            sigma: input.timestep[s],
            guidance: input.guidance.map(|g| g[s]),
            pooled: input.pooled[s],
        }));
        let table = match (table, self.modulation) {
            (Some(t), _) => Some(t.entries(c, &conditions)?),
            (None, Modulation::InSteps) => None,
            (None, Modulation::Precomputed) => {
                return Err(Error::Flag {
                    flag: "DiT input",
                    message: "this Flux DiT leaves its modulation weights out; expected a modulation table (forward_with)".into(),
                })
            }
        };
        let head_dim = c.head_dim();
        // RoPE tables (host f32): every sample's image at the same positions, every text
        // token at the origin.
        let image_table = self
            .rope
            .table(&rope::image_positions(layout.rows, layout.cols));
        let total_text: usize = layout.text_tokens.iter().sum();
        if let Some(t) = trace.as_deref_mut() {
            t("img_freqs", image_table.to_vec());
        }
        let mut tap = |name: &str, x: &B::Activation| -> Result<()> {
            if let Some(t) = trace.as_deref_mut() {
                t(name, backend.to_host(x)?);
            }
            Ok(())
        };

        // The embedders: the conditioning, image tokens, text features.
        let (source, img, txt) = {
            let w = self.embedders(weights.group(EMBEDDERS)?);
            let source = match (table, &w.time_text) {
                (Some(rows), _) => Source::Table(rows),
                (None, Some(te)) => {
                    // Each distinct condition once, one row a pass ([1, dim]), as the table
                    // makes them.
                    let mut silu = Vec::with_capacity(conditions.values.len());
                    let mut temb = Vec::with_capacity(conditions.values.len());
                    for cond in &conditions.values {
                        let (t, s) = te.embed(backend, cond)?;
                        temb.push(t);
                        silu.push(s);
                    }
                    tap("temb", &per_sample(backend, &temb, &conditions.of_sample)?)?;
                    Source::Computed(silu)
                }
                (None, None) => {
                    unreachable!("a Flux without modulation weights asks for a table")
                }
            };
            // [batch·n, in_channels] → [batch·n, dim]
            let latents =
                backend.upload(input.latents, batch * layout.image_tokens, c.in_channels)?;
            let img = w.x_embedder.forward(backend, &latents)?;
            drop(latents);
            tap("x_embedder", &img)?;
            // [Σ L, joint_attention_dim] → [Σ L, dim]
            let feats = backend.upload(&input.texts.concat(), total_text, c.joint_attention_dim)?;
            let txt = w.context_embedder.forward(backend, &feats)?;
            drop(feats);
            tap("context_embedder", &txt)?;
            (source, img, txt)
        };

        let mut img = Stream {
            x: img,
            rows: layout.image(),
            rope: backend.rope_table(
                &image_table.repeat(batch),
                batch * layout.image_tokens,
                head_dim,
            )?,
        };
        let mut txt = Stream {
            x: txt,
            rows: layout.text(),
            rope: backend.rope_table(&self.rope.text_table(total_text), total_text, head_dim)?,
        };
        let joint = layout.joint();

        // The modulation linear's vectors for every sample, `[batch, cols]`.
        let vectors =
            |w: Option<&Linear<'_, B::Weight>>,
             pick: &dyn for<'e> Fn(&'e modulation::Entry<'_>) -> &'e [f32]| {
                source.per_sample(backend, w, pick, &conditions.of_sample)
            };

        for i in 0..c.num_layers {
            let g = self.double_group(i);
            let w = self.double_block(g, i, weights.group(g)?);
            let mods = w.modulation(backend, |m, s| vectors(m, &|e| e.double(i, s)))?;
            w.forward(
                backend,
                &mut img,
                &mut txt,
                &joint,
                &mods,
                self.heads(),
                &mut |_, _| Ok(()), // its attention outputs are not among Flux's intermediates
            )?;
            tap(&format!("double.{i}.img"), &img.x)?;
            tap(&format!("double.{i}.txt"), &txt.x)?;
        }

        // The streams join: each sample's text, then its image.
        let mut x = {
            let x = mmdit::interleave(backend, (&txt.x, &txt.rows), (&img.x, &img.rows))?;
            let rows = total_text + batch * layout.image_tokens;
            // Each sample's text table (at the origin), then the image's: one copy of each.
            let mut table = Vec::with_capacity(rows * head_dim);
            for &l in &layout.text_tokens {
                table.extend_from_slice(&self.rope.text_table(l));
                table.extend_from_slice(&image_table);
            }
            Stream {
                x,
                rows: joint.clone(),
                rope: backend.rope_table(&table, rows, head_dim)?,
            }
        };
        drop((img, txt, image_table));

        for i in 0..c.num_single_layers {
            let g = self.single_group(i);
            let w = self.single_block(g, i, weights.group(g)?);
            let m = vectors(w.modulation.as_ref(), &|e| e.single(i))?;
            let m = backend.split_cols(&m, 3)?; // shift, scale, gate
            self.single_forward(backend, &w, &mut x, (&m[0], &m[1], &m[2]))?;
            tap(&format!("single.{i}"), &x.x)?;
        }

        // The image tokens of each sample.
        let img_rows = layout.image();
        let img = {
            let parts = joint
                .iter()
                .zip(&layout.text_tokens)
                .map(|(j, &l)| backend.rows(&x.x, j.start + l, layout.image_tokens))
                .collect::<Result<Vec<_>>>()?;
            backend.concat_rows(&parts)?
        };
        drop(x);

        // norm_out: LayerNorm · (1 + scale) + shift (chunk order scale, shift), then proj_out.
        let out = {
            let w = self.final_weights(weights.group(self.final_group())?);
            // emb [batch, 2·dim]; out [batch·n, out_channels]
            let emb = vectors(w.norm_out.as_ref(), &|e| e.norm_out())?;
            let out = w.forward(backend, &img, &img_rows, &emb, EPS, &mut tap)?;
            backend.to_host(&out)?
        };
        weights.finish_pass()?;
        Ok(out)
    }

    /// A single block over the joint stream in place: attention and MLP side by side from
    /// the same modulated input.
    fn single_forward<B: DitOps>(
        &self,
        backend: &B,
        w: &SingleBlock<'_, B::Weight>,
        x: &mut Stream<B::Activation, B::RopeTable>,
        (shift, scale, gate): (&B::Activation, &B::Activation, &B::Activation),
    ) -> Result<()> {
        let shape = self.heads();
        let mut h = backend.layer_norm(&x.x, EPS)?;
        backend.modulate(&mut h, &x.rows, scale, Some(shift))?;
        let mut mlp = w.proj_mlp.forward(backend, &h)?; // [rows, 4·dim]
        backend.pointwise(&mut mlp, Pointwise::GeluTanh)?;
        let qkv = w.attn.forward(backend, h, &x.rope, shape)?;
        let a = backend.attention_within(
            &qkv.q,
            &qkv.k,
            &qkv.v,
            &x.rows,
            shape.heads,
            shape.head_dim,
        )?;
        drop(qkv);
        let joined = backend.concat_cols(vec![a, mlp])?; // [rows, dim + 4·dim]
        let y = w.proj_out.forward(backend, &joined)?;
        drop(joined);
        backend.add_gated(&mut x.x, &x.rows, gate, &y)
    }

    /// Check a pass's inputs and lay out its rows.
    fn check_input(&self, input: &DitInput<'_>) -> Result<Layout> {
        let c = &self.config;
        let batch = input.timestep.len();
        let bad = |flag: &'static str, message: String| Error::Flag { flag, message };
        if batch == 0 || input.texts.len() != batch || input.pooled.len() != batch {
            return Err(bad(
                "DiT input",
                format!(
                    "{batch} timesteps, {} texts and {} pooled embeddings; expected one of each per sample, at least one sample",
                    input.texts.len(),
                    input.pooled.len()
                ),
            ));
        }
        match (c.guidance_embeds, input.guidance) {
            (true, Some(g)) if g.len() == batch => {}
            (true, Some(g)) => {
                return Err(bad(
                    "guidance",
                    format!(
                        "{} values for {batch} samples; expected one per sample",
                        g.len()
                    ),
                ))
            }
            (true, None) => {
                return Err(bad(
                    "guidance",
                    "none given; this Flux DiT embeds the guidance scale (guidance_embeds), expected one per sample".into(),
                ))
            }
            (false, Some(_)) => {
                return Err(bad(
                    "guidance",
                    "given to a Flux DiT without guidance_embeds (schnell-like); expected none"
                        .into(),
                ))
            }
            (false, None) => {}
        }
        let layout = Layout::check(
            input.latents,
            (input.height, input.width, PATCH),
            input.texts,
            (c.in_channels, c.joint_attention_dim),
        )?;
        for p in input.pooled {
            if p.len() != c.pooled_projection_dim {
                return Err(Error::Shape {
                    tensor: "pooled text embedding".into(),
                    expected: vec![c.pooled_projection_dim],
                    found: vec![p.len()],
                });
            }
        }
        Ok(layout)
    }

    fn embedders<'a, W>(&'a self, ws: &'a [W]) -> Embedders<'a, W> {
        let w = Bound::new(&self.groups[EMBEDDERS], ws);
        let linear = |s: &str| Linear::bind(&w, s);
        Embedders {
            time_text: (self.modulation == Modulation::InSteps)
                .then(|| time_text_embed(&w, self.config.guidance_embeds)),
            x_embedder: linear("x_embedder"),
            context_embedder: linear("context_embedder"),
        }
    }

    fn double_block<'a, W>(&'a self, g: usize, index: usize, ws: &'a [W]) -> Block<'a, W> {
        let w = Bound::new(&self.groups[g], ws);
        Block::bind(&w, index, [&IMAGE_NAMES, &TEXT_NAMES], self.modulation)
    }

    fn single_block<'a, W>(&'a self, g: usize, index: usize, ws: &'a [W]) -> SingleBlock<'a, W> {
        let w = Bound::new(&self.groups[g], ws);
        let p = |s: &str| format!("single_transformer_blocks.{index}.{s}");
        let linear = |s: &str| Linear::bind(&w, &p(s));
        SingleBlock {
            modulation: (self.modulation == Modulation::InSteps).then(|| linear("norm.linear")),
            attn: QkvWeights::bind(
                &w,
                &format!("single_transformer_blocks.{index}"),
                &mmdit::IMAGE_ATTN,
            ),
            proj_mlp: linear("proj_mlp"),
            proj_out: linear("proj_out"),
        }
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
        cost::pass_cost(
            &self.config,
            self.modulation,
            image_tokens,
            text_tokens,
            batch,
        )
    }
}

impl Architecture for Flux {
    /// Embedders, the double-stream blocks, the single-stream blocks, the final layer.
    fn groups(&self) -> &[WeightGroup] {
        &self.groups
    }

    /// `shape.tokens` is each sample's image + text tokens, of which the text is taken to be
    /// the pipeline's [`cost::TEXT_TOKENS`] (at most half); use
    /// [`step_cost`](Flux::step_cost) when the split is known.
    fn pass_cost(&self, shape: PassShape) -> PassCost {
        let text = cost::TEXT_TOKENS.min(shape.tokens / 2);
        self.step_cost(shape.tokens - text, text, shape.batch)
    }
}

impl<W> TimeTextEmbed<'_, W> {
    /// `temb = (timestep(σ) + guidance(g)) + text(pooled)` and `silu(temb)`, what every
    /// modulation linear takes, `[1, dim]` each: one row, whatever the batch, so that a
    /// table made for a schedule holds the same bits as a pass computes.
    fn embed<B: DitOps<Weight = W>>(
        &self,
        backend: &B,
        cond: &Condition<'_>,
    ) -> Result<(B::Activation, B::Activation)> {
        let sinusoid = |v: f32| backend.upload(&timestep_features(v), 1, T_FREQ_DIM);
        let mut temb = self.timestep.forward(backend, &sinusoid(cond.sigma)?)?;
        match (&self.guidance, cond.guidance) {
            (Some(mlp), Some(g)) => {
                let g = mlp.forward(backend, &sinusoid(g)?)?;
                backend.add_assign(&mut temb, 0, &g)?;
            }
            (None, None) => {}
            _ => unreachable!("the input's guidance was checked against guidance_embeds"),
        }
        let pooled = backend.upload(cond.pooled, 1, cond.pooled.len())?;
        let p = self.text.forward(backend, &pooled)?;
        backend.add_assign(&mut temb, 0, &p)?;
        let mut silu = backend.rows(&temb, 0, 1)?;
        backend.pointwise(&mut silu, Pointwise::Silu)?;
        Ok((temb, silu))
    }
}

/// `[1, 256]`: the sinusoidal features of `v · 1000`, cosines first, in f32 as diffusers
/// computes them: the transformer scales the value (`timestep * 1000`), then
/// `Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)` takes the angles
/// `t · exp(−ln(10000) · j / 128)`.
fn timestep_features(v: f32) -> Vec<f32> {
    let half = T_FREQ_DIM / 2;
    let neg_log = -(T_MAX_PERIOD.ln() as f32);
    let t = v * T_SCALE;
    let angles: Vec<f32> = (0..half)
        .map(|j| t * (neg_log * j as f32 / half as f32).exp())
        .collect();
    let mut out = Vec::with_capacity(T_FREQ_DIM);
    out.extend(angles.iter().map(|a| a.cos()));
    out.extend(angles.iter().map(|a| a.sin()));
    out
}

/// `time_text_embed`'s MLPs, bound from `w`.
fn time_text_embed<'a, W>(w: &Bound<'a, W>, guidance: bool) -> TimeTextEmbed<'a, W> {
    let mlp = |name: &str| Mlp {
        linear_1: Linear::bind(w, &format!("{name}.linear_1")),
        linear_2: Linear::bind(w, &format!("{name}.linear_2")),
    };
    TimeTextEmbed {
        timestep: mlp(TIMESTEP_EMBEDDER),
        guidance: guidance.then(|| mlp(GUIDANCE_EMBEDDER)),
        text: mlp(TEXT_EMBEDDER),
    }
}

/// `time_text_embed`'s specs.
fn time_text_specs(out: &mut Vec<TensorSpec>, c: &FluxConfig) {
    let dim = c.dim();
    let mut mlp = |name: &str, input: usize| {
        linear_specs(out, format!("{name}.linear_1"), dim, input);
        linear_specs(out, format!("{name}.linear_2"), dim, dim);
    };
    mlp(TIMESTEP_EMBEDDER, T_FREQ_DIM);
    if c.guidance_embeds {
        mlp(GUIDANCE_EMBEDDER, T_FREQ_DIM);
    }
    mlp(TEXT_EMBEDDER, c.pooled_projection_dim);
}

/// The groups with the tensors (diffusers' names) and shapes each holds; with
/// [`Modulation::Precomputed`] without `time_text_embed` and the modulation linears. A
/// block's modulation linears come first: they act on the conditioning alone.
fn weight_groups(c: &FluxConfig, modulation: Modulation) -> Vec<WeightGroup> {
    let (dim, hd, ffn) = (c.dim(), c.head_dim(), c.ffn_dim());
    let in_steps = modulation == Modulation::InSteps;
    let linear = linear_specs;
    let mut embedders = Vec::new();
    if in_steps {
        time_text_specs(&mut embedders, c);
    }
    linear(&mut embedders, "x_embedder".into(), dim, c.in_channels);
    linear(
        &mut embedders,
        "context_embedder".into(),
        dim,
        c.joint_attention_dim,
    );
    let mut groups = vec![WeightGroup::new("embedders", embedders)];
    for i in 0..c.num_layers {
        let t = mmdit::block_specs(i, [&IMAGE_NAMES, &TEXT_NAMES], modulation, (dim, hd, ffn));
        groups.push(WeightGroup::new(format!("double block {i}"), t));
    }
    for i in 0..c.num_single_layers {
        let p = |s: &str| format!("single_transformer_blocks.{i}.{s}");
        let mut t = Vec::new();
        if in_steps {
            linear(&mut t, p("norm.linear"), 3 * dim, dim);
        }
        let prefix = format!("single_transformer_blocks.{i}");
        qkv_specs(&mut t, &prefix, &mmdit::IMAGE_ATTN, (dim, hd));
        linear(&mut t, p("proj_mlp"), ffn, dim);
        linear(&mut t, p("proj_out"), dim, dim + ffn);
        groups.push(WeightGroup::new(format!("single block {i}"), t));
    }
    let last = mmdit::final_specs(modulation, dim, c.out_channels);
    groups.push(WeightGroup::new("final layer", last));
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_conditions_are_computed_once() {
        let (a, b) = ([1.0f32, 2.0], [1.0f32, 3.0]);
        let c = |sigma, guidance, pooled| Condition {
            sigma,
            guidance,
            pooled,
        };
        let cs = Conditions::of([
            c(0.5, Some(3.5), &a[..]),
            c(0.5, Some(3.5), &a[..]),
            c(0.5, Some(3.5), &b[..]),
            c(0.5, Some(4.0), &a[..]),
            c(0.25, Some(3.5), &a[..]),
        ]);
        assert_eq!(cs.of_sample, vec![0, 0, 1, 2, 3]);
    }
}
