//! Z-Image's diffusion transformer (diffusers `ZImageTransformer2DModel`): a single-stream DiT
//! over [image tokens, caption tokens], after a modulated refiner on the image tokens and an
//! unmodulated one on the caption.
//!
//! One pass is one denoising step for every sample of a batch: each group's weights are asked
//! for once and serve all samples (the conditional and unconditional branches of guidance
//! are two samples). Samples never attend to each other, so each runs over its own sequence.
//!
//! This is the f32 CPU reference. The projections go through [`Backend`] ops; modulation, the
//! 3-axis RoPE, LayerNorm and the non-causal attention are host f32 here, to become backend
//! ops when the CUDA path comes.

mod config;

pub use config::ZImageConfig;

use crate::backend::cpu::{Cpu, CpuTensor, CpuWeight};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::{Architecture, Bound, PassCost, PassShape, TensorSpec, WeightGroup, Weights};

/// Image and caption sequences are padded to a multiple of this many tokens (learned pad
/// tokens, attended like the others).
pub const SEQ_MULTIPLE: usize = 32;
/// Width of the timestep embedding that modulates every block (at most the model width).
const ADALN_DIM: usize = 256;
/// Width of the timestep embedder's hidden layer.
const T_MID: usize = 1024;
/// Width of the sinusoidal timestep features.
const T_FREQ: usize = 256;

/// One sample of a pass.
pub struct Sample<'a> {
    /// `[in_channels, height, width]` f32: the latent being denoised.
    pub latents: &'a [f32],
    /// `[tokens, cap_feat_dim]` f32: the text encoder's embedding of the prompt.
    pub caption: &'a [f32],
    /// The model's time `1 − σ` in [0, 1] (the pipeline's `(1000 − t) / 1000`).
    pub t: f32,
}

pub struct ZImage {
    pub config: ZImageConfig,
    groups: Vec<WeightGroup>,
}

/// Where each part sits among the groups: embedders, noise refiners, context refiners,
/// blocks, final layer.
impl ZImage {
    pub fn new(config: ZImageConfig) -> ZImage {
        let groups = weight_groups(&config);
        ZImage { config, groups }
    }

    fn noise_refiner(&self, i: usize) -> usize {
        1 + i
    }
    fn context_refiner(&self, i: usize) -> usize {
        1 + self.config.n_refiner_layers + i
    }
    fn block(&self, i: usize) -> usize {
        1 + 2 * self.config.n_refiner_layers + i
    }
    fn final_layer(&self) -> usize {
        self.groups.len() - 1
    }

    /// Image tokens of a `height × width` latent (patches of `patch × patch`).
    pub fn image_tokens(&self, height: usize, width: usize) -> usize {
        (height / self.config.patch) * (width / self.config.patch)
    }

    /// One denoising step for every sample: the model's output for each, `[in_channels,
    /// height, width]` f32, in sample order (the pipeline's velocity is its negation).
    pub fn forward(
        &self,
        cpu: &Cpu,
        weights: &mut impl Weights<CpuWeight>,
        samples: &[Sample<'_>],
        height: usize,
        width: usize,
    ) -> Result<Vec<Vec<f32>>> {
        let c = &self.config;
        let p = c.patch;
        if height % p != 0 || width % p != 0 || height == 0 || width == 0 {
            return Err(Error::Shape {
                tensor: "latents".into(),
                expected: vec![c.in_channels, height.div_ceil(p) * p, width.div_ceil(p) * p],
                found: vec![c.in_channels, height, width],
            });
        }
        for s in samples {
            if s.latents.len() != c.in_channels * height * width {
                return Err(Error::Shape {
                    tensor: "latents".into(),
                    expected: vec![c.in_channels, height, width],
                    found: vec![s.latents.len()],
                });
            }
            if s.caption.is_empty() || s.caption.len() % c.cap_feat_dim != 0 {
                return Err(Error::Shape {
                    tensor: "caption embedding".into(),
                    expected: vec![s.caption.len() / c.cap_feat_dim.max(1), c.cap_feat_dim],
                    found: vec![s.caption.len()],
                });
            }
        }
        let rope = Rope::new(c);
        let eps = c.norm_eps as f32;

        // Embedders: timestep → adaLN input; patches and caption → tokens, padded.
        let w = Bound::new(&self.groups[0], weights.group(0)?);
        let e = |s: &str| w.get(s);
        let mut states: Vec<State> = Vec::with_capacity(samples.len());
        for s in samples {
            let freq = CpuTensor {
                rows: 1,
                cols: T_FREQ,
                data: timestep_features(s.t * c.t_scale as f32),
            };
            let mut h = cpu.linear(
                &freq,
                e("t_embedder.mlp.0.weight"),
                Some(e("t_embedder.mlp.0.bias")),
            )?;
            silu(&mut h.data);
            let adaln = cpu.linear(
                &h,
                e("t_embedder.mlp.2.weight"),
                Some(e("t_embedder.mlp.2.bias")),
            )?;

            let cap_len = s.caption.len() / c.cap_feat_dim;
            let cap_padded = cap_len.next_multiple_of(SEQ_MULTIPLE);
            let caption = CpuTensor {
                rows: cap_len,
                cols: c.cap_feat_dim,
                data: s.caption.to_vec(),
            };
            let caption = cpu.rms_norm(&caption, e("cap_embedder.0.weight"), eps)?;
            let caption = cpu.linear(
                &caption,
                e("cap_embedder.1.weight"),
                Some(e("cap_embedder.1.bias")),
            )?;
            let cap = pad_rows(cpu, caption, cap_padded, e("cap_pad_token"))?;
            // Caption token k at (1 + k, 0, 0), pad tokens too.
            let cap_pos: Vec<[usize; 3]> = (0..cap_padded).map(|k| [1 + k, 0, 0]).collect();

            let (ht, wt) = (height / p, width / p);
            let img_len = ht * wt;
            let img_padded = img_len.next_multiple_of(SEQ_MULTIPLE);
            let patches = patchify(s.latents, c.in_channels, height, width, p);
            let x = cpu.linear(
                &patches,
                e(&format!("{}.weight", c.x_embedder())),
                Some(e(&format!("{}.bias", c.x_embedder()))),
            )?;
            let x = pad_rows(cpu, x, img_padded, e("x_pad_token"))?;
            // Image token (h, w) at (padded caption + 1, h, w); pad tokens at the origin.
            let mut img_pos: Vec<[usize; 3]> = (0..img_len)
                .map(|i| [cap_padded + 1, i / wt, i % wt])
                .collect();
            img_pos.resize(img_padded, [0, 0, 0]);
            states.push(State {
                adaln,
                x,
                cap,
                img_len,
                x_rope: rope.angles(&img_pos),
                cap_rope: rope.angles(&cap_pos),
            });
        }

        for i in 0..c.n_refiner_layers {
            let gi = self.noise_refiner(i);
            let g = &self.groups[gi];
            let w = Bound::new(g, weights.group(gi)?);
            let blk = BlockWeights::bind(&w, &format!("noise_refiner.{i}."), true);
            for s in &mut states {
                let m = blk.modulation(cpu, &s.adaln)?;
                blk.forward(cpu, c, &mut s.x, &s.x_rope, m.as_ref())?;
            }
        }
        for i in 0..c.n_refiner_layers {
            let gi = self.context_refiner(i);
            let g = &self.groups[gi];
            let w = Bound::new(g, weights.group(gi)?);
            let blk = BlockWeights::bind(&w, &format!("context_refiner.{i}."), false);
            for s in &mut states {
                blk.forward(cpu, c, &mut s.cap, &s.cap_rope, None)?;
            }
        }
        // The single stream: [image, caption] with their rotations.
        let mut unified: Vec<(CpuTensor, Vec<f32>)> = states
            .iter()
            .map(|s| {
                let mut data = s.x.data.clone();
                data.extend_from_slice(&s.cap.data);
                let mut angles = s.x_rope.clone();
                angles.extend_from_slice(&s.cap_rope);
                (
                    CpuTensor {
                        rows: s.x.rows + s.cap.rows,
                        cols: c.dim,
                        data,
                    },
                    angles,
                )
            })
            .collect();
        for i in 0..c.n_layers {
            let gi = self.block(i);
            let g = &self.groups[gi];
            let w = Bound::new(g, weights.group(gi)?);
            let blk = BlockWeights::bind(&w, &format!("layers.{i}."), true);
            for (s, (x, angles)) in states.iter().zip(&mut unified) {
                let m = blk.modulation(cpu, &s.adaln)?;
                blk.forward(cpu, c, x, angles, m.as_ref())?;
            }
        }

        // Final layer: LayerNorm (no affine) × (1 + scale(t)), linear to patches, unpatchify.
        let gi = self.final_layer();
        let g = &self.groups[gi];
        let w = Bound::new(g, weights.group(gi)?);
        let f = c.final_layer();
        let mut out = Vec::with_capacity(samples.len());
        for (s, (x, _)) in states.iter().zip(&unified) {
            let mut a = s.adaln.clone();
            silu(&mut a.data);
            let scale = cpu.linear(
                &a,
                w.get(&format!("{f}.adaLN_modulation.1.weight")),
                Some(w.get(&format!("{f}.adaLN_modulation.1.bias"))),
            )?;
            let image = cpu.rows(x, 0, s.img_len)?;
            let mut h = image;
            for row in h.data.chunks_mut(c.dim) {
                layer_norm(row, 1e-6);
                for (v, sc) in row.iter_mut().zip(&scale.data) {
                    *v *= 1.0 + sc;
                }
            }
            let y = cpu.linear(
                &h,
                w.get(&format!("{f}.linear.weight")),
                Some(w.get(&format!("{f}.linear.bias"))),
            )?;
            out.push(unpatchify(&y.data, c.in_channels, height, width, p));
        }
        weights.finish_pass()?;
        Ok(out)
    }
}

/// What one sample carries between groups.
struct State {
    /// `[1, adaln]`: the timestep embedding.
    adaln: CpuTensor,
    /// `[image tokens padded, dim]`
    x: CpuTensor,
    /// `[caption tokens padded, dim]`
    cap: CpuTensor,
    /// Image tokens before padding.
    img_len: usize,
    /// Rotation angles `[tokens, head_dim / 2]` of the image and caption tokens.
    x_rope: Vec<f32>,
    cap_rope: Vec<f32>,
}

/// A block's four modulations: `(1 + scale, tanh(gate))` for attention and for the FFN.
struct Modulation {
    scale_msa: Vec<f32>,
    gate_msa: Vec<f32>,
    scale_mlp: Vec<f32>,
    gate_mlp: Vec<f32>,
}

/// One transformer block's weights, bound by name (`layers.N.…`).
struct BlockWeights<'a> {
    to_q: &'a CpuWeight,
    to_k: &'a CpuWeight,
    to_v: &'a CpuWeight,
    to_out: &'a CpuWeight,
    norm_q: Option<&'a CpuWeight>,
    norm_k: Option<&'a CpuWeight>,
    attention_norm1: &'a CpuWeight,
    attention_norm2: &'a CpuWeight,
    ffn_norm1: &'a CpuWeight,
    ffn_norm2: &'a CpuWeight,
    w1: &'a CpuWeight,
    w2: &'a CpuWeight,
    w3: &'a CpuWeight,
    /// `adaLN_modulation.0` weight and bias (modulated blocks).
    ada: Option<(&'a CpuWeight, &'a CpuWeight)>,
}

impl<'a> BlockWeights<'a> {
    fn bind(w: &Bound<'a, CpuWeight>, prefix: &str, modulated: bool) -> BlockWeights<'a> {
        let p = |s: &str| w.get(&format!("{prefix}{s}"));
        let o = |s: &str| w.opt(&format!("{prefix}{s}"));
        BlockWeights {
            to_q: p("attention.to_q.weight"),
            to_k: p("attention.to_k.weight"),
            to_v: p("attention.to_v.weight"),
            to_out: p("attention.to_out.0.weight"),
            norm_q: o("attention.norm_q.weight"),
            norm_k: o("attention.norm_k.weight"),
            attention_norm1: p("attention_norm1.weight"),
            attention_norm2: p("attention_norm2.weight"),
            ffn_norm1: p("ffn_norm1.weight"),
            ffn_norm2: p("ffn_norm2.weight"),
            w1: p("feed_forward.w1.weight"),
            w2: p("feed_forward.w2.weight"),
            w3: p("feed_forward.w3.weight"),
            ada: modulated.then(|| (p("adaLN_modulation.0.weight"), p("adaLN_modulation.0.bias"))),
        }
    }

    fn modulation(&self, cpu: &Cpu, adaln: &CpuTensor) -> Result<Option<Modulation>> {
        let Some((w, b)) = self.ada else {
            return Ok(None);
        };
        let m = cpu.linear(adaln, w, Some(b))?.data; // [4 · dim], no SiLU before it
        let dim = m.len() / 4;
        let chunk = |k: usize| m[k * dim..(k + 1) * dim].to_vec();
        Ok(Some(Modulation {
            scale_msa: chunk(0).iter().map(|v| 1.0 + v).collect(),
            gate_msa: chunk(1).iter().map(|v| v.tanh()).collect(),
            scale_mlp: chunk(2).iter().map(|v| 1.0 + v).collect(),
            gate_mlp: chunk(3).iter().map(|v| v.tanh()).collect(),
        }))
    }

    /// `x += gate · norm2(attn(norm1(x) · scale))`, then the same with the SwiGLU FFN
    /// (sandwich norms; without modulation scale is 1 and gate 1).
    fn forward(
        &self,
        cpu: &Cpu,
        c: &ZImageConfig,
        x: &mut CpuTensor,
        angles: &[f32],
        m: Option<&Modulation>,
    ) -> Result<()> {
        let eps = c.norm_eps as f32;
        let mut h = cpu.rms_norm(x, self.attention_norm1, eps)?;
        if let Some(m) = m {
            scale_rows(&mut h, &m.scale_msa);
        }
        let mut q = cpu.linear(&h, self.to_q, None)?;
        let mut k = cpu.linear(&h, self.to_k, None)?;
        let v = cpu.linear(&h, self.to_v, None)?;
        if let (Some(nq), Some(nk)) = (self.norm_q, self.norm_k) {
            q = cpu.rms_norm(&q, nq, 1e-5)?; // per head
            k = cpu.rms_norm(&k, nk, 1e-5)?;
        }
        let hd = c.dim / c.n_heads;
        rotate(&mut q.data, angles, hd);
        rotate(&mut k.data, angles, hd);
        let a = attention(&q, &k, &v, c.n_heads);
        let a = cpu.linear(&a, self.to_out, None)?;
        let mut a = cpu.rms_norm(&a, self.attention_norm2, eps)?;
        if let Some(m) = m {
            scale_rows(&mut a, &m.gate_msa);
        }
        cpu.add_assign(x, 0, &a)?;

        let mut h = cpu.rms_norm(x, self.ffn_norm1, eps)?;
        if let Some(m) = m {
            scale_rows(&mut h, &m.scale_mlp);
        }
        let mut gate = cpu.linear(&h, self.w1, None)?;
        let up = cpu.linear(&h, self.w3, None)?;
        cpu.silu_mul(&mut gate, &up)?;
        let f = cpu.linear(&gate, self.w2, None)?;
        let mut f = cpu.rms_norm(&f, self.ffn_norm2, eps)?;
        if let Some(m) = m {
            scale_rows(&mut f, &m.gate_mlp);
        }
        cpu.add_assign(x, 0, &f)
    }
}

/// Every row of `x` times `s` elementwise.
fn scale_rows(x: &mut CpuTensor, s: &[f32]) {
    for row in x.data.chunks_mut(x.cols) {
        for (v, f) in row.iter_mut().zip(s) {
            *v *= f;
        }
    }
}

fn silu(x: &mut [f32]) {
    for v in x {
        *v /= 1.0 + (-*v).exp();
    }
}

/// LayerNorm without affine, in place, as torch computes it (biased variance).
fn layer_norm(row: &mut [f32], eps: f32) {
    let n = row.len() as f32;
    let mean = row.iter().sum::<f32>() / n;
    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    let inv = 1.0 / (var + eps).sqrt();
    for v in row {
        *v = (*v - mean) * inv;
    }
}

/// `cat[cos(t·f), sin(t·f)]`, `f_j = exp(−ln(10000) · j / 128)`, in f32 as torch computes it.
fn timestep_features(t: f32) -> Vec<f32> {
    let half = T_FREQ / 2;
    let ln = (10000f64).ln() as f32;
    let args: Vec<f32> = (0..half)
        .map(|j| t * (-ln * j as f32 / half as f32).exp())
        .collect();
    args.iter()
        .map(|a| a.cos())
        .chain(args.iter().map(|a| a.sin()))
        .collect()
}

/// Rows `rows` of `x`, then copies of `pad` up to `total` rows (the learned pad token).
fn pad_rows(cpu: &Cpu, mut x: CpuTensor, total: usize, pad: &CpuWeight) -> Result<CpuTensor> {
    let token = cpu.embed(pad, &[0])?.data; // [1, dim] → its one row
    while x.rows < total {
        x.data.extend_from_slice(&token);
        x.rows += 1;
    }
    Ok(x)
}

/// `[c, h, w]` → `[(h/p)·(w/p), p·p·c]`: tokens row-major over the patch grid, features
/// `(ph, pw, c)` with the channel fastest.
fn patchify(x: &[f32], c: usize, h: usize, w: usize, p: usize) -> CpuTensor {
    let (ht, wt) = (h / p, w / p);
    let cols = p * p * c;
    let mut data = vec![0.0; ht * wt * cols];
    for ty in 0..ht {
        for tx in 0..wt {
            let row = &mut data[(ty * wt + tx) * cols..][..cols];
            for py in 0..p {
                for px in 0..p {
                    for ch in 0..c {
                        row[(py * p + px) * c + ch] =
                            x[ch * h * w + (ty * p + py) * w + tx * p + px];
                    }
                }
            }
        }
    }
    CpuTensor {
        rows: ht * wt,
        cols,
        data,
    }
}

/// The inverse of [`patchify`] for the first `(h/p)·(w/p)` rows of `y`.
fn unpatchify(y: &[f32], c: usize, h: usize, w: usize, p: usize) -> Vec<f32> {
    let (ht, wt) = (h / p, w / p);
    let cols = p * p * c;
    let mut out = vec![0.0; c * h * w];
    for ty in 0..ht {
        for tx in 0..wt {
            let row = &y[(ty * wt + tx) * cols..][..cols];
            for py in 0..p {
                for px in 0..p {
                    for ch in 0..c {
                        out[ch * h * w + (ty * p + py) * w + tx * p + px] =
                            row[(py * p + px) * c + ch];
                    }
                }
            }
        }
    }
    out
}

/// The 3-axis rotary embedding: per axis of `d` dims, `d/2` frequencies `θ^(−2j/d)`; a
/// token's angles are its position on each axis times that axis's frequencies, concatenated.
struct Rope {
    /// Per axis, its frequencies (f64, as computed before the product is rounded to f32).
    axes: Vec<Vec<f64>>,
}

impl Rope {
    fn new(c: &ZImageConfig) -> Rope {
        let axes = c
            .axes_dims
            .iter()
            .map(|&d| {
                (0..d / 2)
                    .map(|j| 1.0 / c.rope_theta.powf((2 * j) as f64 / d as f64))
                    .collect()
            })
            .collect();
        Rope { axes }
    }

    /// `[tokens, head_dim / 2]` angles.
    fn angles(&self, positions: &[[usize; 3]]) -> Vec<f32> {
        let mut out = Vec::new();
        for pos in positions {
            for (axis, freqs) in self.axes.iter().enumerate() {
                out.extend(freqs.iter().map(|f| (pos[axis] as f64 * f) as f32));
            }
        }
        out
    }
}

/// Rotate each head's adjacent pairs `(x₂ⱼ, x₂ⱼ₊₁)` of `x` `[tokens, heads · hd]` by the
/// token's angles (a complex product, in f32).
fn rotate(x: &mut [f32], angles: &[f32], hd: usize) {
    let half = hd / 2;
    let width = x.len() / (angles.len() / half);
    for (row, a) in x.chunks_mut(width).zip(angles.chunks(half)) {
        for head in row.chunks_mut(hd) {
            for (pair, &theta) in head.chunks_mut(2).zip(a) {
                let (cos, sin) = (theta.cos(), theta.sin());
                let (re, im) = (pair[0], pair[1]);
                pair[0] = re * cos - im * sin;
                pair[1] = re * sin + im * cos;
            }
        }
    }
}

/// Non-causal multi-head attention of one sequence: `softmax(q kᵀ / √hd) v` per head.
fn attention(q: &CpuTensor, k: &CpuTensor, v: &CpuTensor, heads: usize) -> CpuTensor {
    use rayon::prelude::*;
    let (n, width) = (q.rows, q.cols);
    let hd = width / heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut out = vec![0.0f32; n * width];
    out.par_chunks_mut(width).enumerate().for_each(|(i, orow)| {
        let mut scores = vec![0.0f32; n];
        for h in 0..heads {
            let qi = &q.data[i * width + h * hd..][..hd];
            let mut max = f32::NEG_INFINITY;
            for (j, s) in scores.iter_mut().enumerate() {
                let kj = &k.data[j * width + h * hd..][..hd];
                *s = qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() * scale;
                max = max.max(*s);
            }
            let mut sum = 0.0;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let o = &mut orow[h * hd..][..hd];
            for (j, &s) in scores.iter().enumerate() {
                let vj = &v.data[j * width + h * hd..][..hd];
                for (a, b) in o.iter_mut().zip(vj) {
                    *a += s / sum * b;
                }
            }
        }
    });
    CpuTensor {
        rows: n,
        cols: width,
        data: out,
    }
}

impl Architecture for ZImage {
    /// Embedders, noise refiners, context refiners, blocks, final layer.
    fn groups(&self) -> &[WeightGroup] {
        &self.groups
    }

    /// For `shape.tokens` = image + caption tokens per sample (padded) and `batch` samples:
    /// 2 FLOPs per weight per token for the projections (a refiner sees only its own
    /// tokens; counted over all, an overestimate of a few %), and 4 · dim per query-key
    /// pair for attention.
    fn pass_cost(&self, shape: PassShape) -> PassCost {
        let c = &self.config;
        let d = c.dim as f64;
        let ffn = c.ffn_dim() as f64;
        let rows = shape.rows() as f64;
        let block = 2.0 * (4.0 * d * d + 3.0 * d * ffn) * rows
            + 4.0 * d * (shape.tokens as f64).powi(2) * shape.batch as f64;
        let flops = self
            .groups
            .iter()
            .enumerate()
            .map(|(g, _)| {
                if g == 0 || g == self.final_layer() {
                    2.0 * d * (c.patch * c.patch * c.in_channels) as f64 * rows
                } else {
                    block
                }
            })
            .collect();
        // bf16 on a GPU: the residual, q, k, v and the attention output, or the residual
        // and the FFN's normed input, gate and up.
        let attention = 5 * shape.rows() * c.dim * 2;
        let mlp = shape.rows() * (2 * c.dim + 2 * c.ffn_dim()) * 2;
        PassCost {
            flops,
            workspace: attention.max(mlp) + (1 << 20),
            cache: 0,
        }
    }
}

fn weight_groups(c: &ZImageConfig) -> Vec<WeightGroup> {
    let t = |name: String, shape: &[usize]| TensorSpec::new(name, shape);
    let (d, ffn, hd) = (c.dim, c.ffn_dim(), c.dim / c.n_heads);
    let ada = c.dim.min(ADALN_DIM);
    let patch = c.patch * c.patch * c.in_channels;
    let x = c.x_embedder();
    let mut groups = vec![WeightGroup::new(
        "embedders",
        vec![
            t("t_embedder.mlp.0.weight".into(), &[T_MID, T_FREQ]),
            t("t_embedder.mlp.0.bias".into(), &[T_MID]),
            t("t_embedder.mlp.2.weight".into(), &[ada, T_MID]),
            t("t_embedder.mlp.2.bias".into(), &[ada]),
            t(format!("{x}.weight"), &[d, patch]),
            t(format!("{x}.bias"), &[d]),
            t("cap_embedder.0.weight".into(), &[c.cap_feat_dim]),
            t("cap_embedder.1.weight".into(), &[d, c.cap_feat_dim]),
            t("cap_embedder.1.bias".into(), &[d]),
            t("x_pad_token".into(), &[1, d]),
            t("cap_pad_token".into(), &[1, d]),
        ],
    )];
    let block = |prefix: String, modulated: bool| {
        let p = |s: &str| format!("{prefix}{s}");
        let mut ts = vec![
            t(p("attention.to_q.weight"), &[d, d]),
            t(p("attention.to_k.weight"), &[d, d]),
            t(p("attention.to_v.weight"), &[d, d]),
            t(p("attention.to_out.0.weight"), &[d, d]),
            t(p("attention_norm1.weight"), &[d]),
            t(p("attention_norm2.weight"), &[d]),
            t(p("ffn_norm1.weight"), &[d]),
            t(p("ffn_norm2.weight"), &[d]),
            t(p("feed_forward.w1.weight"), &[ffn, d]),
            t(p("feed_forward.w2.weight"), &[d, ffn]),
            t(p("feed_forward.w3.weight"), &[ffn, d]),
        ];
        if c.qk_norm {
            ts.push(t(p("attention.norm_q.weight"), &[hd]));
            ts.push(t(p("attention.norm_k.weight"), &[hd]));
        }
        if modulated {
            ts.push(t(p("adaLN_modulation.0.weight"), &[4 * d, ada]));
            ts.push(t(p("adaLN_modulation.0.bias"), &[4 * d]));
        }
        ts
    };
    for i in 0..c.n_refiner_layers {
        groups.push(WeightGroup::new(
            format!("noise refiner {i}"),
            block(format!("noise_refiner.{i}."), true),
        ));
    }
    for i in 0..c.n_refiner_layers {
        groups.push(WeightGroup::new(
            format!("context refiner {i}"),
            block(format!("context_refiner.{i}."), false),
        ));
    }
    for i in 0..c.n_layers {
        groups.push(WeightGroup::new(
            format!("block {i}"),
            block(format!("layers.{i}."), true),
        ));
    }
    let f = c.final_layer();
    groups.push(WeightGroup::new(
        "final layer",
        vec![
            t(format!("{f}.adaLN_modulation.1.weight"), &[d, ada]),
            t(format!("{f}.adaLN_modulation.1.bias"), &[d]),
            t(format!("{f}.linear.weight"), &[patch, d]),
            t(format!("{f}.linear.bias"), &[patch]),
        ],
    ));
    groups
}
