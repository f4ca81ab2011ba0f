//! The double-stream (MMDiT) block that Flux.1 (`FluxTransformerBlock`) and Qwen-Image
//! (`QwenImageTransformerBlock`) share, and the pieces around it: the image and the text
//! keep streams of their own (their own modulation, LayerNorms, q/k/v, output projections
//! and MLPs) and meet only in diffusers' joint attention over each sample's `[text, image]`.
//!
//! Per stream, with the six vectors of the stream's modulation linear on `silu(temb)`:
//! ```text
//! shift1, scale1, gate1, shift2, scale2, gate2 = linear(silu(temb))     // [batch, dim] each
//! h = LayerNorm(x) · (1 + scale1) + shift1
//! q, k, v = linear(h) (bias), RMSNorm per head on q and k, RoPE on q and k
//! a = joint attention over [text, image] of each sample, then the stream's output linear
//! x = x + gate1 · a
//! x = x + gate2 · MLP(LayerNorm(x) · (1 + scale2) + shift2)        // GELU-tanh, 4·dim hidden
//! ```
//! What differs between the two models stays in their files: the names of the modulation
//! linear and the MLP ([`StreamNames`]), the RoPE table each stream is given ([`Stream`]),
//! the embedders, Flux's single-stream blocks (which reuse [`QkvWeights`]) and the final
//! layer.

use std::ops::Range;

use super::{Bound, TensorSpec};
use crate::backend::dit::{DitOps, Pointwise};
use crate::error::{Error, Result};

/// Width of the sinusoidal timestep features.
pub(super) const T_FREQ_DIM: usize = 256;
/// The sinusoid's longest period.
pub(super) const T_MAX_PERIOD: f64 = 10000.0;

/// Where a pass's modulation vectors come from. They depend on the conditioning alone (the
/// timestep and, for Flux, the guidance and pooled embeddings: the embedders, every block's
/// modulation linears and `norm_out.linear`, about a third of the weights), so for a known
/// schedule they can be computed once before the steps and those weights never stream
/// during them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Modulation {
    /// Each pass computes them; its groups hold those weights.
    InSteps,
    /// Each pass takes them from a modulation table; its groups leave those weights out.
    Precomputed,
}

/// `x @ weightᵀ + bias`.
pub(super) struct Linear<'a, W> {
    pub weight: &'a W,
    pub bias: &'a W,
}

impl<'a, W> Linear<'a, W> {
    /// The linear `name` (`.weight`, `.bias`) of `w`.
    pub fn bind(w: &Bound<'a, W>, name: &str) -> Linear<'a, W> {
        Linear {
            weight: w.get(&format!("{name}.weight")),
            bias: w.get(&format!("{name}.bias")),
        }
    }

    pub fn forward<B: DitOps<Weight = W>>(
        &self,
        backend: &B,
        x: &B::Activation,
    ) -> Result<B::Activation> {
        backend.linear(x, self.weight, Some(self.bias))
    }
}

/// A linear's weight `[rows, cols]` and bias `[rows]` specs under `name`.
pub(super) fn linear_specs(out: &mut Vec<TensorSpec>, name: String, rows: usize, cols: usize) {
    out.push(TensorSpec::new(format!("{name}.weight"), &[rows, cols]));
    out.push(TensorSpec::new(format!("{name}.bias"), &[rows]));
}

/// What a block needs of its model's config.
#[derive(Clone, Copy, Debug)]
pub(super) struct Heads {
    pub heads: usize,
    pub head_dim: usize,
    /// Epsilon of the LayerNorms and the q/k RMSNorms.
    pub eps: f32,
}

/// The token grid and each sample's text length.
pub(super) struct Layout {
    /// Image tokens per side and per sample.
    pub rows: usize,
    pub cols: usize,
    pub image_tokens: usize,
    pub text_tokens: Vec<usize>,
}

impl Layout {
    /// Check a pass's packed latents `[batch, (height/patch)·(width/patch), in_channels]` and
    /// texts (one per sample, `[tokens, text_dim]` each; the caller checked there is one per
    /// sample) and lay out their rows.
    pub fn check(
        latents: &[f32],
        (height, width, patch): (usize, usize, usize),
        texts: &[&[f32]],
        (in_channels, text_dim): (usize, usize),
    ) -> Result<Layout> {
        let batch = texts.len();
        let (h, w) = (height, width);
        if h == 0 || w == 0 || h % patch != 0 || w % patch != 0 {
            return Err(Error::Flag {
                flag: "latent size",
                message: format!(
                    "{h}×{w} latent pixels ({}×{} image pixels); expected positive multiples of {patch} (images in multiples of {})",
                    8 * h,
                    8 * w,
                    8 * patch
                ),
            });
        }
        let (rows, cols) = (h / patch, w / patch);
        let n = rows * cols;
        if latents.len() != batch * n * in_channels {
            return Err(Error::Shape {
                tensor: "packed latents".into(),
                expected: vec![batch, n, in_channels],
                found: vec![latents.len()],
            });
        }
        let mut text_tokens = Vec::with_capacity(batch);
        for t in texts {
            if t.is_empty() || t.len() % text_dim != 0 {
                return Err(Error::Shape {
                    tensor: "text features".into(),
                    expected: vec![0, text_dim],
                    found: vec![t.len()],
                });
            }
            text_tokens.push(t.len() / text_dim);
        }
        Ok(Layout {
            rows,
            cols,
            image_tokens: n,
            text_tokens,
        })
    }

    pub fn batch(&self) -> usize {
        self.text_tokens.len()
    }

    /// Each sample's rows in the image stream.
    pub fn image(&self) -> Vec<Range<usize>> {
        let n = self.image_tokens;
        (0..self.batch()).map(|s| s * n..(s + 1) * n).collect()
    }

    /// Each sample's rows in the text stream.
    pub fn text(&self) -> Vec<Range<usize>> {
        let mut start = 0;
        self.text_tokens
            .iter()
            .map(|&l| {
                start += l;
                start - l..start
            })
            .collect()
    }

    /// Each sample's rows in the joint sequence: its text, then its image.
    pub fn joint(&self) -> Vec<Range<usize>> {
        let mut start = 0;
        self.text_tokens
            .iter()
            .map(|&l| {
                start += l + self.image_tokens;
                start - l - self.image_tokens..start
            })
            .collect()
    }
}

/// One stream's activations in a pass: `x` `[rows, dim]`, the rows of each sample, and its
/// RoPE table `[rows, head_dim]` (the model's positions for these tokens).
pub(super) struct Stream<A, R> {
    pub x: A,
    pub rows: Vec<Range<usize>>,
    pub rope: R,
}

/// q, k, v after norms and RoPE, `[rows, dim]` each.
pub(super) struct Qkv<A> {
    pub q: A,
    pub k: A,
    pub v: A,
}

/// A stream's modulation for one block: `[batch, dim]` each.
pub(super) struct ModVectors<A> {
    pub shift1: A,
    pub scale1: A,
    pub gate1: A,
    pub shift2: A,
    pub scale2: A,
    pub gate2: A,
}

impl<A> ModVectors<A> {
    /// The six vectors of `linear(silu(temb))` `[batch, 6·dim]`, in diffusers' chunk order.
    pub fn split<B: DitOps<Activation = A>>(backend: &B, m: &A) -> Result<ModVectors<A>> {
        let mut m = backend.split_cols(m, 6)?.into_iter();
        let mut next = || m.next().expect("six chunks");
        Ok(ModVectors {
            shift1: next(),
            scale1: next(),
            gate1: next(),
            shift2: next(),
            scale2: next(),
            gate2: next(),
        })
    }
}

/// The tensor names of one stream's attention projections, relative to the block.
pub(super) struct AttnNames {
    pub q: &'static str,
    pub k: &'static str,
    pub v: &'static str,
    pub norm_q: &'static str,
    pub norm_k: &'static str,
    pub out: &'static str,
}

/// diffusers' `Attention` names the image stream's projections `to_q`, `norm_q`, `to_out.0`.
pub(super) const IMAGE_ATTN: AttnNames = AttnNames {
    q: "attn.to_q",
    k: "attn.to_k",
    v: "attn.to_v",
    norm_q: "attn.norm_q",
    norm_k: "attn.norm_k",
    out: "attn.to_out.0",
};

/// … and the text stream's (its `added_kv_proj_dim`) `add_q_proj`, `norm_added_q`,
/// `to_add_out`.
pub(super) const TEXT_ATTN: AttnNames = AttnNames {
    q: "attn.add_q_proj",
    k: "attn.add_k_proj",
    v: "attn.add_v_proj",
    norm_q: "attn.norm_added_q",
    norm_k: "attn.norm_added_k",
    out: "attn.to_add_out",
};

/// The tensor names of one stream in a double block, relative to `transformer_blocks.N.`.
pub(super) struct StreamNames {
    /// `silu(temb)` → the six vectors.
    pub modulation: &'static str,
    pub attn: AttnNames,
    /// The MLP (diffusers' `FeedForward`: `{mlp}.net.0.proj`, `{mlp}.net.2`).
    pub mlp: &'static str,
}

/// One stream's attention inputs: q, k, v (bias) and the per-head RMSNorms of q and k.
pub(super) struct QkvWeights<'a, W> {
    to_q: Linear<'a, W>,
    to_k: Linear<'a, W>,
    to_v: Linear<'a, W>,
    norm_q: &'a W,
    norm_k: &'a W,
}

impl<'a, W> QkvWeights<'a, W> {
    /// `names`' projections and norms under `prefix` (`transformer_blocks.3`).
    pub fn bind(w: &Bound<'a, W>, prefix: &str, names: &AttnNames) -> QkvWeights<'a, W> {
        let p = |s: &str| format!("{prefix}.{s}");
        QkvWeights {
            to_q: Linear::bind(w, &p(names.q)),
            to_k: Linear::bind(w, &p(names.k)),
            to_v: Linear::bind(w, &p(names.v)),
            norm_q: w.get(&p(&format!("{}.weight", names.norm_q))),
            norm_k: w.get(&p(&format!("{}.weight", names.norm_k))),
        }
    }

    /// q, k, v of the modulated `h` `[rows, dim]`, RMSNorm per head on q and k, RoPE on q
    /// and k (`h` is freed before the rotations).
    pub fn forward<B: DitOps<Weight = W>>(
        &self,
        backend: &B,
        h: B::Activation,
        rope: &B::RopeTable,
        shape: Heads,
    ) -> Result<Qkv<B::Activation>> {
        let normed = |proj: &Linear<'_, W>, norm| -> Result<B::Activation> {
            backend.rms_norm(&proj.forward(backend, &h)?, norm, shape.eps)
        };
        let mut q = normed(&self.to_q, self.norm_q)?;
        let mut k = normed(&self.to_k, self.norm_k)?;
        let v = self.to_v.forward(backend, &h)?;
        drop(h);
        backend.rope_interleaved(&mut q, rope, shape.head_dim)?;
        backend.rope_interleaved(&mut k, rope, shape.head_dim)?;
        Ok(Qkv { q, k, v })
    }
}

/// `names`' q, k, v `[dim, dim]` and q/k norm `[head_dim]` specs under `prefix`.
pub(super) fn qkv_specs(
    out: &mut Vec<TensorSpec>,
    prefix: &str,
    names: &AttnNames,
    (dim, head_dim): (usize, usize),
) {
    let p = |s: &str| format!("{prefix}.{s}");
    for proj in [names.q, names.k, names.v] {
        linear_specs(out, p(proj), dim, dim);
    }
    out.push(TensorSpec::new(
        p(&format!("{}.weight", names.norm_q)),
        &[head_dim],
    ));
    out.push(TensorSpec::new(
        p(&format!("{}.weight", names.norm_k)),
        &[head_dim],
    ));
}

/// diffusers' `FeedForward(dim, dim, activation_fn="gelu-approximate")`:
/// `net.2(gelu_tanh(net.0.proj(h)))`.
struct FeedForward<'a, W> {
    proj: Linear<'a, W>,
    out: Linear<'a, W>,
}

impl<W> FeedForward<'_, W> {
    /// `h` `[rows, dim]` (freed after the first linear) → `[rows, dim]`.
    fn forward<B: DitOps<Weight = W>>(
        &self,
        backend: &B,
        h: B::Activation,
    ) -> Result<B::Activation> {
        let mut hidden = self.proj.forward(backend, &h)?; // [rows, 4·dim]
        drop(h);
        backend.pointwise(&mut hidden, Pointwise::GeluTanh)?;
        self.out.forward(backend, &hidden)
    }
}

/// One stream's weights in a double block.
pub(super) struct StreamWeights<'a, W> {
    /// `silu(temb)` → `[shift1, scale1, gate1, shift2, scale2, gate2]`; with
    /// [`Modulation::InSteps`] only.
    pub modulation: Option<Linear<'a, W>>,
    attn: QkvWeights<'a, W>,
    to_out: Linear<'a, W>,
    mlp: FeedForward<'a, W>,
}

/// One double-stream block (`transformer_blocks.N`).
pub(super) struct Block<'a, W> {
    pub img: StreamWeights<'a, W>,
    pub txt: StreamWeights<'a, W>,
}

impl<'a, W> Block<'a, W> {
    /// Block `index`'s weights, the image's under `names[0]`, the text's under `names[1]`.
    pub fn bind(
        w: &Bound<'a, W>,
        index: usize,
        [img, txt]: [&StreamNames; 2],
        modulation: Modulation,
    ) -> Block<'a, W> {
        let prefix = format!("transformer_blocks.{index}");
        let linear = |s: &str| Linear::bind(w, &format!("{prefix}.{s}"));
        let stream = |n: &StreamNames| StreamWeights {
            modulation: (modulation == Modulation::InSteps).then(|| linear(n.modulation)),
            attn: QkvWeights::bind(w, &prefix, &n.attn),
            to_out: linear(n.attn.out),
            mlp: FeedForward {
                proj: linear(&format!("{}.net.0.proj", n.mlp)),
                out: linear(&format!("{}.net.2", n.mlp)),
            },
        };
        Block {
            img: stream(img),
            txt: stream(txt),
        }
    }

    /// Both streams' modulation for every sample, the image's first: the six vectors of
    /// `vectors(stream's modulation linear, stream)` (`[batch, 6·dim]`; stream 0 the image, 1
    /// the text).
    pub fn modulation<A>(
        &self,
        backend: &impl DitOps<Weight = W, Activation = A>,
        vectors: impl Fn(Option<&Linear<'_, W>>, usize) -> Result<A>,
    ) -> Result<[ModVectors<A>; 2]> {
        let img = ModVectors::split(backend, &vectors(self.img.modulation.as_ref(), 0)?)?;
        let txt = ModVectors::split(backend, &vectors(self.txt.modulation.as_ref(), 1)?)?;
        Ok([img, txt])
    }

    /// The block over both streams in place; `tap` is handed the attention of each stream
    /// after its output linear, before the gate (`attn.img`, `attn.txt`).
    #[allow(clippy::too_many_arguments)]
    pub fn forward<B: DitOps<Weight = W>>(
        &self,
        backend: &B,
        img: &mut Stream<B::Activation, B::RopeTable>,
        txt: &mut Stream<B::Activation, B::RopeTable>,
        joint: &[Range<usize>],
        [img_mod, txt_mod]: &[ModVectors<B::Activation>; 2],
        shape: Heads,
        tap: &mut dyn FnMut(&str, &B::Activation) -> Result<()>,
    ) -> Result<()> {
        // Attention: each stream's q, k, v, then each sample's [text, image] together.
        let qkv = |sw: &StreamWeights<'_, W>,
                   s: &Stream<B::Activation, B::RopeTable>,
                   m: &ModVectors<B::Activation>| {
            let mut h = backend.layer_norm(&s.x, shape.eps)?;
            backend.modulate(&mut h, &s.rows, &m.scale1, Some(&m.shift1))?;
            sw.attn.forward(backend, h, &s.rope, shape)
        };
        let img_qkv = qkv(&self.img, img, img_mod)?;
        let txt_qkv = qkv(&self.txt, txt, txt_mod)?;
        let joined = |t: &B::Activation, i: &B::Activation| {
            interleave(backend, (t, &txt.rows), (i, &img.rows))
        };
        let q = joined(&txt_qkv.q, &img_qkv.q)?;
        let k = joined(&txt_qkv.k, &img_qkv.k)?;
        let v = joined(&txt_qkv.v, &img_qkv.v)?;
        drop((img_qkv, txt_qkv));
        let a = backend.attention_within(&q, &k, &v, joint, shape.heads, shape.head_dim)?;
        drop((q, k, v));
        // Back to the streams: each sample's first rows are its text.
        let (mut img_a, mut txt_a) = (Vec::new(), Vec::new());
        for ((j, tr), ir) in joint.iter().zip(&txt.rows).zip(&img.rows) {
            txt_a.push(backend.rows(&a, j.start, tr.len())?);
            img_a.push(backend.rows(&a, j.start + tr.len(), ir.len())?);
        }
        drop(a);
        let img_a = self
            .img
            .to_out
            .forward(backend, &backend.concat_rows(&img_a)?)?;
        let txt_a = self
            .txt
            .to_out
            .forward(backend, &backend.concat_rows(&txt_a)?)?;
        tap("attn.img", &img_a)?;
        tap("attn.txt", &txt_a)?;
        backend.add_gated(&mut img.x, &img.rows, &img_mod.gate1, &img_a)?;
        backend.add_gated(&mut txt.x, &txt.rows, &txt_mod.gate1, &txt_a)?;
        drop((img_a, txt_a));

        // Each stream's MLP.
        for (s, sw, m) in [
            (&mut *img, &self.img, img_mod),
            (&mut *txt, &self.txt, txt_mod),
        ] {
            let mut h = backend.layer_norm(&s.x, shape.eps)?;
            backend.modulate(&mut h, &s.rows, &m.scale2, Some(&m.shift2))?;
            let y = sw.mlp.forward(backend, h)?;
            backend.add_gated(&mut s.x, &s.rows, &m.gate2, &y)?;
        }
        Ok(())
    }
}

/// Block `index`'s specs: both streams' modulation linears first (with
/// [`Modulation::InSteps`] only: they act on the conditioning alone), then each stream's
/// attention, then each stream's MLP.
pub(super) fn block_specs(
    index: usize,
    names: [&StreamNames; 2],
    modulation: Modulation,
    (dim, head_dim, ffn): (usize, usize, usize),
) -> Vec<TensorSpec> {
    let prefix = format!("transformer_blocks.{index}");
    let p = |s: &str| format!("{prefix}.{s}");
    let mut t = Vec::new();
    if modulation == Modulation::InSteps {
        for n in names {
            linear_specs(&mut t, p(n.modulation), 6 * dim, dim);
        }
    }
    for n in names {
        qkv_specs(&mut t, &prefix, &n.attn, (dim, head_dim));
        linear_specs(&mut t, p(n.attn.out), dim, dim);
    }
    for n in names {
        linear_specs(&mut t, p(&format!("{}.net.0.proj", n.mlp)), ffn, dim);
        linear_specs(&mut t, p(&format!("{}.net.2", n.mlp)), dim, ffn);
    }
    t
}

/// `norm_out` (AdaLayerNormContinuous: `silu(temb)` → scale, shift) and `proj_out`.
pub(super) struct FinalLayer<'a, W> {
    /// With [`Modulation::InSteps`] only.
    pub norm_out: Option<Linear<'a, W>>,
    proj_out: Linear<'a, W>,
}

impl<'a, W> FinalLayer<'a, W> {
    pub fn bind(w: &Bound<'a, W>, modulation: Modulation) -> FinalLayer<'a, W> {
        FinalLayer {
            norm_out: (modulation == Modulation::InSteps)
                .then(|| Linear::bind(w, "norm_out.linear")),
            proj_out: Linear::bind(w, "proj_out"),
        }
    }

    /// `proj_out(LayerNorm(x) · (1 + scale) + shift)` of the image tokens `x` `[rows, dim]`,
    /// `emb` `[batch, 2·dim]` the output of `norm_out.linear` (chunk order scale, shift);
    /// `tap` is handed the normed `x` (`norm_out`).
    pub fn forward<B: DitOps<Weight = W>>(
        &self,
        backend: &B,
        x: &B::Activation,
        rows: &[Range<usize>],
        emb: &B::Activation,
        eps: f32,
        tap: &mut dyn FnMut(&str, &B::Activation) -> Result<()>,
    ) -> Result<B::Activation> {
        let m = backend.split_cols(emb, 2)?;
        let mut h = backend.layer_norm(x, eps)?;
        backend.modulate(&mut h, rows, &m[0], Some(&m[1]))?;
        tap("norm_out", &h)?;
        self.proj_out.forward(backend, &h)
    }
}

/// The final layer's specs (`norm_out.linear` with [`Modulation::InSteps`] only).
pub(super) fn final_specs(modulation: Modulation, dim: usize, out: usize) -> Vec<TensorSpec> {
    let mut t = Vec::new();
    if modulation == Modulation::InSteps {
        linear_specs(&mut t, "norm_out.linear".into(), 2 * dim, dim);
    }
    linear_specs(&mut t, "proj_out".into(), out, dim);
    t
}

/// Each sample's text rows of `t`, then its image rows of `i`, stacked: `[Σ (L + n), cols]`.
pub(super) fn interleave<B: DitOps>(
    backend: &B,
    (t, text_rows): (&B::Activation, &[Range<usize>]),
    (i, image_rows): (&B::Activation, &[Range<usize>]),
) -> Result<B::Activation> {
    let mut parts = Vec::with_capacity(2 * text_rows.len());
    for (tr, ir) in text_rows.iter().zip(image_rows) {
        parts.push(backend.rows(t, tr.start, tr.len())?);
        parts.push(backend.rows(i, ir.start, ir.len())?);
    }
    backend.concat_rows(&parts)
}

/// Where a pass's modulation vectors come from: `silu(temb)` of each distinct condition, or
/// a table's entries `E` for them.
pub(super) enum Source<A, E> {
    Computed(Vec<A>),
    Table(Vec<E>),
}

impl<A, E> Source<A, E> {
    /// One modulation linear's output for each sample, `[batch, cols]`: for each distinct
    /// condition computed by `w` or uploaded from the table's values that `pick` names
    /// (`[1, cols]` each), then each sample's row (`of_sample`: its condition's index).
    pub fn per_sample<B: DitOps<Activation = A>>(
        &self,
        backend: &B,
        w: Option<&Linear<'_, B::Weight>>,
        pick: &dyn for<'e> Fn(&'e E) -> &'e [f32],
        of_sample: &[usize],
    ) -> Result<A> {
        let per_condition = match self {
            Source::Computed(silu) => {
                let w = w.expect("a pass that computes its modulation holds its linears");
                silu.iter()
                    .map(|x| w.forward(backend, x))
                    .collect::<Result<Vec<_>>>()?
            }
            Source::Table(rows) => rows
                .iter()
                .map(|r| {
                    let values = pick(r);
                    backend.upload(values, 1, values.len())
                })
                .collect::<Result<Vec<_>>>()?,
        };
        per_sample(backend, &per_condition, of_sample)
    }
}

/// `[batch, cols]`: each sample's row of `per_condition` (`[1, cols]` for each distinct
/// condition).
pub(super) fn per_sample<B: DitOps>(
    backend: &B,
    per_condition: &[B::Activation],
    of_sample: &[usize],
) -> Result<B::Activation> {
    let rows = of_sample
        .iter()
        .map(|&k| backend.rows(&per_condition[k], 0, 1))
        .collect::<Result<Vec<_>>>()?;
    backend.concat_rows(&rows)
}

/// For a modulation table: the output of each linear `names` of `w` for every condition's
/// `silu(temb)` `[1, dim]`, appended to that condition's entry values.
pub(super) fn append_outputs<B: DitOps, K>(
    backend: &B,
    silu: &[B::Activation],
    w: &Bound<'_, B::Weight>,
    names: &[String],
    entries: &mut [(K, Vec<f32>)],
) -> Result<()> {
    for name in names {
        let linear = Linear::bind(w, name);
        let rows = silu
            .iter()
            .map(|x| linear.forward(backend, x))
            .collect::<Result<Vec<_>>>()?;
        let host = backend.to_host(&backend.concat_rows(&rows)?)?;
        let cols = host.len() / rows.len();
        for (k, (_, values)) in entries.iter_mut().enumerate() {
            values.extend_from_slice(&host[k * cols..(k + 1) * cols]);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joint_rows_put_each_text_before_its_image() {
        let l = Layout {
            rows: 3,
            cols: 5,
            image_tokens: 15,
            text_tokens: vec![7, 12],
        };
        assert_eq!(l.image(), vec![0..15, 15..30]);
        assert_eq!(l.text(), vec![0..7, 7..19]);
        assert_eq!(l.joint(), vec![0..22, 22..49]);
    }
}
