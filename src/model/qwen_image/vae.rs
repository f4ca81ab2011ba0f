//! Qwen-Image's VAE decoder for single images: diffusers' `AutoencoderKLQwenImage` (the Wan
//! 2.1 video VAE, fine-tuned), latents `[batch, 16, h, w]` → images `[batch, 3, 8h, 8w]` in
//! [-1, 1].
//!
//! The model is a video VAE: every convolution is a causal 3-D one (`QwenImageCausalConv3d`,
//! zero padding of `k - 1` frames on the past side only) and the decoder runs frame by frame
//! with a cache of the frames before. An image is one frame with nothing before it, so each
//! `[out, in, k, k, k]` filter sees zeros in all its temporal taps but the last, and is the
//! 2-D convolution by its last temporal slice `[:, :, k-1]`. The upsamplers' temporal convs
//! (`time_conv`, which double the frame count) are skipped on the first frame (diffusers
//! marks the cache "Rep" and leaves the frame as it is), so they are never bound.
//!
//! ```text
//! z → post_quant_conv (1×1)
//!   → conv_in → mid_block (residual, attention, residual)
//!   → up_blocks[0..n] (num_res_blocks + 1 residual blocks, then nearest 2× + 3×3 conv to half
//!     the channels, except the last)
//!   → norm_out (channel RMS norm) → SiLU → conv_out → clamp to [-1, 1]
//! ```
//!
//! A residual block: `shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))`, the shortcut a
//! 1×1 conv where the channel count changes. Norms are RMS norms over the channels of each
//! position (`QwenImageRMS_norm`: L2-normalized, times √C and a per-channel gamma). The
//! attention block: RMS norm, one 1×1 conv to q, k, v, single-head attention over the
//! frame's positions, a 1×1 output conv, the residual added. Weights are bound by their
//! diffusers names (`decoder.up_blocks.1.resnets.0.conv_shortcut.weight`); the encoder's are
//! ignored.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::backend::conv::{ImageMemory, ImageOps, ImageShape};
use crate::checkpoint::{safetensors, DType, HostTensor, Storage};
use crate::error::{Error, Result};
use crate::model::vae::{component_files, decode_in_tiles, Conv, Replay, Tiling};

/// The `_class_name` of the config this decoder reads.
pub const VAE_CLASS_NAME: &str = "AutoencoderKLQwenImage";

/// diffusers' `AutoencoderKLQwenImage` config.json, the fields the decoder reads (defaults as
/// in `AutoencoderKLQwenImage.__init__`, which are Qwen-Image's own). `dropout` is ignored
/// (inference); `attn_scales` places attention in the encoder only (the decoder's one
/// attention is its mid block's), so it is read and checked but not used.
#[derive(Clone, Debug, PartialEq)]
pub struct QwenVaeConfig {
    /// Channels of the first level; level i has `base_dim · dim_mult[i]`.
    pub base_dim: usize,
    /// Latent channels.
    pub z_dim: usize,
    pub dim_mult: Vec<usize>,
    /// Residual blocks per encoder level; the decoder's up blocks have one more.
    pub num_res_blocks: usize,
    pub attn_scales: Vec<f64>,
    /// One entry per down level (`dim_mult.len() - 1`); the decoder's temporal upsampling is
    /// its reverse, unused on a single frame.
    pub temperal_downsample: Vec<bool>,
    /// Image channels (3).
    pub input_channels: usize,
    /// Per-channel latent statistics: the pipeline decodes `latents · std + mean`
    /// ([`QwenVaeConfig::denormalize`]).
    pub latents_mean: Vec<f32>,
    pub latents_std: Vec<f32>,
}

/// Qwen-Image's latent statistics (diffusers' defaults, the released checkpoint's values).
const LATENTS_MEAN: [f32; 16] = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517,
    -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
];
const LATENTS_STD: [f32; 16] = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579,
    1.6382, 1.1253, 2.8251, 1.9160,
];

impl QwenVaeConfig {
    /// Read and check `config.json` of a diffusers `vae` component.
    pub fn from_file(path: &Path) -> Result<QwenVaeConfig> {
        let text = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let json: Value = serde_json::from_slice(&text).map_err(|e| Error::Json {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        QwenVaeConfig::from_json(path, &json)
    }

    /// Parse and check a config already read from `path` (named in errors). A key of the
    /// wrong type is an error naming it; a missing or null key takes diffusers' default.
    pub fn from_json(path: &Path, json: &Value) -> Result<QwenVaeConfig> {
        let obj = json
            .as_object()
            .ok_or_else(|| Error::checkpoint(path, "expected a JSON object"))?;
        if let Some(class) = obj.get("_class_name").filter(|v| !v.is_null()) {
            if class.as_str() != Some(VAE_CLASS_NAME) {
                return Err(Error::checkpoint(
                    path,
                    format!("_class_name: {class} is not supported; expected \"{VAE_CLASS_NAME}\""),
                ));
            }
        }
        let config = QwenVaeConfig {
            base_dim: field(path, obj, "base_dim", 96)?,
            z_dim: field(path, obj, "z_dim", 16)?,
            dim_mult: field(path, obj, "dim_mult", vec![1, 2, 4, 4])?,
            num_res_blocks: field(path, obj, "num_res_blocks", 2)?,
            attn_scales: field(path, obj, "attn_scales", vec![])?,
            temperal_downsample: field(path, obj, "temperal_downsample", vec![false, true, true])?,
            input_channels: field(path, obj, "input_channels", 3)?,
            latents_mean: field(path, obj, "latents_mean", LATENTS_MEAN.to_vec())?,
            latents_std: field(path, obj, "latents_std", LATENTS_STD.to_vec())?,
        };
        config.check(path)?;
        Ok(config)
    }

    /// Reject what the decoder cannot run; `path` names the file in the error.
    pub fn check(&self, path: &Path) -> Result<()> {
        let bad = |key: &str, message: String| Error::checkpoint(path, format!("{key}: {message}"));
        for (key, n) in [
            ("base_dim", self.base_dim),
            ("z_dim", self.z_dim),
            ("input_channels", self.input_channels),
        ] {
            if n == 0 {
                return Err(bad(key, "0; expected a positive count".into()));
            }
        }
        if self.dim_mult.is_empty() || self.dim_mult.contains(&0) {
            return Err(bad(
                "dim_mult",
                format!(
                    "{:?}; expected one or more positive multipliers",
                    self.dim_mult
                ),
            ));
        }
        // The upsamplers halve the channels: each level below the top needs at least 2.
        if let Some(m) = self.dim_mult[..self.dim_mult.len() - 1]
            .iter()
            .find(|&&m| self.base_dim * m < 2)
        {
            return Err(bad(
                "dim_mult",
                format!(
                    "level of {} channels (base_dim {} × {m}); an upsampler halves it to 0",
                    self.base_dim * m,
                    self.base_dim
                ),
            ));
        }
        if self.temperal_downsample.len() + 1 != self.dim_mult.len() {
            return Err(bad(
                "temperal_downsample",
                format!(
                    "{} entries; expected one per down level, dim_mult's length − 1 = {}",
                    self.temperal_downsample.len(),
                    self.dim_mult.len() - 1
                ),
            ));
        }
        for (key, v) in [
            ("latents_mean", &self.latents_mean),
            ("latents_std", &self.latents_std),
        ] {
            if v.len() != self.z_dim {
                return Err(bad(
                    key,
                    format!(
                        "{} values; expected one per latent channel (z_dim {})",
                        v.len(),
                        self.z_dim
                    ),
                ));
            }
            if let Some(x) = v
                .iter()
                .find(|x| !x.is_finite() || (key == "latents_std" && **x == 0.0))
            {
                return Err(bad(
                    key,
                    format!("{x}; expected finite values (non-zero for a std)"),
                ));
            }
        }
        Ok(())
    }

    /// Pixels per latent pixel along each axis: 2^(up blocks − 1) (8 for Qwen-Image).
    pub fn scale_factor(&self) -> usize {
        1 << (self.dim_mult.len() - 1)
    }

    /// Latent channels (`z_dim`).
    pub fn latent_channels(&self) -> usize {
        self.z_dim
    }

    /// Image channels (`input_channels`).
    pub fn out_channels(&self) -> usize {
        self.input_channels
    }

    /// Channels of the decoder's levels as diffusers' `QwenImageDecoder3d` lays them out:
    /// `base_dim ·` (`dim_mult`'s last, then `dim_mult` reversed). Up block i goes from
    /// `dims[i]` (halved by the upsampler before it, for i > 0) to `dims[i + 1]`.
    fn decoder_dims(&self) -> Vec<usize> {
        let last = *self
            .dim_mult
            .last()
            .expect("checked: dim_mult is not empty");
        std::iter::once(last)
            .chain(self.dim_mult.iter().rev().copied())
            .map(|m| self.base_dim * m)
            .collect()
    }

    /// What QwenImagePipeline does to the denoised latents before `vae.decode`:
    /// `latents / (1 / latents_std) + latents_mean` per channel (in that order, in f32, as
    /// the pipeline computes it). `latents` `[batch, z_dim, h, w]` (`shape`).
    pub fn denormalize(&self, latents: &[f32], shape: [usize; 4]) -> Result<Vec<f32>> {
        check_latents(self.z_dim, latents, shape)?;
        let plane = shape[2] * shape[3];
        let mut out = latents.to_vec();
        for (i, chunk) in out.chunks_exact_mut(plane).enumerate() {
            let c = i % self.z_dim;
            let (inv_std, mean) = (1.0 / self.latents_std[c], self.latents_mean[c]);
            chunk.iter_mut().for_each(|v| *v = *v / inv_std + mean);
        }
        Ok(out)
    }
}

/// Key `name` of a config object read from `path`: diffusers' `default` when missing or null,
/// an error naming the key when it does not parse as a `T`.
fn field<T: DeserializeOwned>(
    path: &Path,
    obj: &serde_json::Map<String, Value>,
    name: &str,
    default: T,
) -> Result<T> {
    match obj.get(name).filter(|v| !v.is_null()) {
        None => Ok(default),
        Some(v) => serde_json::from_value(v.clone())
            .map_err(|e| Error::checkpoint(path, format!("{name}: {v} is malformed ({e})"))),
    }
}

/// `z` must be `[batch, channels, h, w]` as `shape` says, with `channels` latent channels.
fn check_latents(channels: usize, z: &[f32], shape: [usize; 4]) -> Result<()> {
    let [batch, c, h, w] = shape;
    if c != channels || h == 0 || w == 0 || z.len() != batch * c * h * w {
        return Err(Error::Shape {
            tensor: "latents".into(),
            expected: vec![batch, channels, h.max(1), w.max(1)],
            found: if z.len() == batch * c * h * w {
                shape.to_vec()
            } else {
                vec![z.len()]
            },
        });
    }
    Ok(())
}

/// A Qwen-Image VAE's files, opened: config and tensors (views into the mapped files).
pub struct QwenVaeWeights {
    /// The directory, for errors.
    pub path: PathBuf,
    pub config: QwenVaeConfig,
    pub tensors: BTreeMap<String, HostTensor>,
}

/// Open a diffusers `vae` component directory of Qwen-Image: `config.json` and
/// `diffusion_pytorch_model.safetensors` (or its shards, listed by
/// `diffusion_pytorch_model.safetensors.index.json`).
pub fn open_qwen_vae(dir: &Path) -> Result<QwenVaeWeights> {
    if !dir.is_dir() {
        return Err(Error::NotFound {
            path: dir.to_path_buf(),
            expected: "a diffusers vae directory (config.json and safetensors)".into(),
        });
    }
    let config = QwenVaeConfig::from_file(&dir.join("config.json"))?;
    let mut tensors = BTreeMap::new();
    for file in component_files(dir)? {
        for t in safetensors::read(&file)? {
            tensors.insert(t.name.clone(), t);
        }
    }
    Ok(QwenVaeWeights {
        path: dir.to_path_buf(),
        config,
        tensors,
    })
}

impl QwenVaeWeights {
    /// Check every tensor the decoder binds, as [`QwenVae::load`] would (the first missing
    /// one or wrong shape is an error naming it), without converting any.
    pub fn check(&self) -> Result<()> {
        let binder = Binder {
            make: &|_| Ok(()),
            weights: self,
        };
        bind(&binder).map(drop)
    }

    /// Bytes of the weights [`QwenVae::load`] binds (each causal conv's last temporal slice,
    /// q, k, v split from `to_qkv`) at `element_bytes` each, as a backend holds them.
    pub fn decoder_bytes(&self, element_bytes: usize) -> Result<usize> {
        let total = std::cell::Cell::new(0);
        let binder = Binder {
            make: &|t| {
                total.set(total.get() + t.numel() * element_bytes);
                Ok(())
            },
            weights: self,
        };
        bind(&binder)?;
        Ok(total.get())
    }
}

impl QwenVaeConfig {
    /// Bytes of activations alive at once, at most, while one `h × w` latent is decoded whole
    /// by a backend whose image ops spend memory as `m` says: [`QwenVae`]'s allocations and
    /// frees replayed in the order of its forward pass (what each op returns, the im2col and
    /// score blocks while an op runs, the images each block keeps alive until it returns).
    /// The weights are not included.
    pub fn decode_peak_bytes(&self, h: usize, w: usize, m: ImageMemory) -> usize {
        let dims = self.decoder_dims();
        let mut r = Replay::new(m, 0);
        let mut n = h * w;
        // The uploaded latent and the post-quant conv's output live to the end.
        r.alloc(self.z_dim * n);
        r.alloc(self.z_dim * n);
        let top = dims[0];
        let conv_in = r.conv3(self.z_dim, top, n);
        // The mid block, its input (conv_in) alive until it returns.
        let a = residual(&mut r, top, top, n);
        let b = attention(&mut r, top, n);
        r.free(a);
        let mut x = residual(&mut r, top, top, n);
        r.free(b + conv_in);
        let levels = self.dim_mult.len();
        for i in 0..levels {
            let cin = if i == 0 { dims[0] } else { dims[i] / 2 };
            let cout = dims[i + 1];
            // The block's input stays alive until it returns.
            let mut h = residual(&mut r, cin, cout, n);
            for _ in 0..self.num_res_blocks {
                let next = residual(&mut r, cout, cout, n);
                r.free(h);
                h = next;
            }
            if i + 1 < levels {
                let up = r.alloc(cout * 4 * n);
                r.free(h);
                n *= 4;
                h = r.conv3(cout, cout / 2, n);
                r.free(up);
            }
            r.free(x);
            x = h;
        }
        let last = dims[levels];
        let normed = r.norm(last, n);
        r.free(x);
        r.conv3(last, self.input_channels, n);
        r.free(normed);
        r.peak()
    }
}

/// [`ResidualBlock::forward`] replayed, its input alive outside: each intermediate freed once
/// the next is made, the 1×1 shortcut (a GEMM) made and added at the end.
fn residual(r: &mut Replay, cin: usize, cout: usize, n: usize) -> usize {
    let h1 = r.norm(cin, n);
    let h2 = r.conv3(cin, cout, n);
    r.free(h1);
    let h3 = r.norm(cout, n);
    r.free(h2);
    let h4 = r.conv3(cout, cout, n);
    r.free(h3);
    if cin != cout {
        let shortcut = r.alloc(cout * n);
        r.free(shortcut);
    }
    h4
}

/// [`AttentionBlock::forward`] replayed, its input alive outside: the norm, q, k, v, then the
/// attention's own buffers ([`Replay::spatial_attention`]) and the output conv.
fn attention(r: &mut Replay, c: usize, n: usize) -> usize {
    let normed = r.norm(c, n);
    let qkv = r.alloc(3 * c * n);
    r.free(normed);
    let a = r.spatial_attention(c, n);
    r.free(qkv);
    let out = r.alloc(c * n);
    r.free(a);
    out
}

/// Finds the tensors of a [`QwenVaeWeights`] by name, checking shapes, and makes them weights
/// `W` with `make` (a backend's image weights; `()` to check only).
struct Binder<'a, W> {
    make: &'a dyn Fn(&HostTensor) -> Result<W>,
    weights: &'a QwenVaeWeights,
}

impl<W> Binder<'_, W> {
    /// Tensor `name`, which must have shape `shape`.
    fn get(&self, name: &str, shape: &[usize]) -> Result<&HostTensor> {
        let t = self
            .weights
            .tensors
            .get(name)
            .ok_or_else(|| Error::MissingTensor {
                path: self.weights.path.clone(),
                tensor: name.into(),
            })?;
        if t.shape != shape {
            return Err(Error::Shape {
                tensor: name.into(),
                expected: shape.to_vec(),
                found: t.shape.clone(),
            });
        }
        Ok(t)
    }

    /// A `QwenImageCausalConv3d` `prefix.{weight,bias}` (`[out, in, k, k, k]`, `[out]`) as it
    /// acts on a first frame: the 2-D conv by the filter's last temporal slice.
    fn causal_conv(&self, prefix: &str, cin: usize, cout: usize, k: usize) -> Result<Conv<W>> {
        let name = format!("{prefix}.weight");
        let w = self.get(&name, &[cout, cin, k, k, k])?;
        let slice = last_frame_filter(w)?;
        Ok(Conv {
            weight: (self.make)(&slice)?,
            bias: (self.make)(self.get(&format!("{prefix}.bias"), &[cout])?)?,
        })
    }

    /// An `nn.Conv2d` `prefix.{weight,bias}`: `[out, in, k, k]`, `[out]`.
    fn conv2d(&self, prefix: &str, cin: usize, cout: usize, k: usize) -> Result<Conv<W>> {
        Ok(Conv {
            weight: (self.make)(self.get(&format!("{prefix}.weight"), &[cout, cin, k, k])?)?,
            bias: (self.make)(self.get(&format!("{prefix}.bias"), &[cout])?)?,
        })
    }

    /// A `QwenImageRMS_norm` `prefix.gamma`, `[c, 1, 1, 1]` (`images=False`, in residual
    /// blocks and the head) or `[c, 1, 1]` (`images=True`, in attention), as a vector `[c]`.
    fn rms_norm(&self, prefix: &str, c: usize, image: bool) -> Result<RmsNorm<W>> {
        let shape: &[usize] = if image { &[c, 1, 1] } else { &[c, 1, 1, 1] };
        let gamma = self.get(&format!("{prefix}.gamma"), shape)?;
        let vector = owned(gamma.name.clone(), gamma.dtype, vec![c], gamma.bytes());
        Ok(RmsNorm {
            gamma: (self.make)(&vector)?,
            // F.normalize's floor of 1e-12 on the L2 norm, as a floor on the mean square.
            eps: 1e-24 / c as f32,
        })
    }
}

/// A tensor of its own (copied bytes) called `name`.
fn owned(name: String, dtype: DType, shape: Vec<usize>, bytes: &[u8]) -> HostTensor {
    let mut storage = Storage::owned(bytes.len());
    storage
        .bytes_mut()
        .expect("owned storage is writable")
        .copy_from_slice(bytes);
    HostTensor::new(name, dtype, shape, Arc::new(storage), 0, bytes.len())
}

/// Filter `[out, in, kt, kh, kw]` → its last temporal slice `[out, in, kh, kw]` (what a
/// causal conv applies to the first frame), same dtype, named `{name}[:, :, -1]`.
fn last_frame_filter(t: &HostTensor) -> Result<HostTensor> {
    let &[o, i, kt, kh, kw] = &t.shape[..] else {
        unreachable!("the binder checked a 5-d shape")
    };
    let size = match t.dtype {
        DType::F32 | DType::BF16 | DType::F16 => t.dtype.size(),
        other => {
            return Err(Error::DType {
                tensor: t.name.clone(),
                found: other.to_string(),
                expected: "f32, bf16 or f16",
            })
        }
    };
    let tap = kh * kw * size; // bytes of one temporal slice of one (out, in) pair
    let src = t.bytes();
    let mut bytes = Vec::with_capacity(o * i * tap);
    for pair in src.chunks_exact(kt * tap) {
        bytes.extend_from_slice(&pair[(kt - 1) * tap..]);
    }
    Ok(owned(
        format!("{}[:, :, -1]", t.name),
        t.dtype,
        vec![o, i, kh, kw],
        &bytes,
    ))
}

/// `QwenImageRMS_norm` over channels (no bias: the checkpoint has none).
struct RmsNorm<W> {
    gamma: W,
    eps: f32,
}

impl<W> RmsNorm<W> {
    fn forward<B: ImageOps<ImageWeight = W>>(&self, b: &B, x: &B::Image) -> Result<B::Image> {
        b.rms_norm_channels(x, self.eps, &self.gamma)
    }
}

/// diffusers' `QwenImageResidualBlock` on one frame.
struct ResidualBlock<W> {
    norm1: RmsNorm<W>,
    conv1: Conv<W>,
    norm2: RmsNorm<W>,
    conv2: Conv<W>,
    /// 1×1 conv when the block changes the channel count.
    conv_shortcut: Option<Conv<W>>,
}

impl<W> ResidualBlock<W> {
    fn bind(w: &Binder<W>, prefix: &str, cin: usize, cout: usize) -> Result<Self> {
        Ok(ResidualBlock {
            norm1: w.rms_norm(&format!("{prefix}.norm1"), cin, false)?,
            conv1: w.causal_conv(&format!("{prefix}.conv1"), cin, cout, 3)?,
            norm2: w.rms_norm(&format!("{prefix}.norm2"), cout, false)?,
            conv2: w.causal_conv(&format!("{prefix}.conv2"), cout, cout, 3)?,
            conv_shortcut: match cin != cout {
                true => Some(w.causal_conv(&format!("{prefix}.conv_shortcut"), cin, cout, 1)?),
                false => None,
            },
        })
    }

    /// Each intermediate is dropped as soon as the next is made, so that at most the input,
    /// the shortcut and two images of the block are alive at once.
    fn forward<B: ImageOps<ImageWeight = W>>(&self, b: &B, x: &B::Image) -> Result<B::Image> {
        let mut h = self.norm1.forward(b, x)?;
        b.silu(&mut h)?;
        h = self.conv1.forward(b, &h)?;
        h = self.norm2.forward(b, &h)?;
        b.silu(&mut h)?;
        h = self.conv2.forward(b, &h)?; // (dropout: identity at inference)
        match &self.conv_shortcut {
            Some(shortcut) => b.add_image(&mut h, &shortcut.forward(b, x)?)?,
            None => b.add_image(&mut h, x)?,
        }
        Ok(h)
    }
}

/// diffusers' `QwenImageAttentionBlock`: single-head attention over the frame's positions.
struct AttentionBlock<W> {
    norm: RmsNorm<W>,
    /// `to_qkv`, a 1×1 conv to 3c channels, split by output rows into q, k, v.
    to_q: Conv<W>,
    to_k: Conv<W>,
    to_v: Conv<W>,
    proj: Conv<W>,
}

impl<W> AttentionBlock<W> {
    fn bind(w: &Binder<W>, prefix: &str, c: usize) -> Result<Self> {
        let norm = w.rms_norm(&format!("{prefix}.norm"), c, true)?;
        let weight = w.get(&format!("{prefix}.to_qkv.weight"), &[3 * c, c, 1, 1])?;
        let bias = w.get(&format!("{prefix}.to_qkv.bias"), &[3 * c])?;
        // q, k, v are channels 0..c, c..2c, 2c..3c of to_qkv's output (diffusers chunks
        // the channel axis in three).
        let part = |i: usize, n: &str| -> Result<Conv<W>> {
            Ok(Conv {
                weight: (w.make)(&weight.rows(format!("{}[{n}]", weight.name), i * c, c))?,
                bias: (w.make)(&bias.rows(format!("{}[{n}]", bias.name), i * c, c))?,
            })
        };
        Ok(AttentionBlock {
            norm,
            to_q: part(0, "q")?,
            to_k: part(1, "k")?,
            to_v: part(2, "v")?,
            proj: w.conv2d(&format!("{prefix}.proj"), c, c, 1)?,
        })
    }

    fn forward<B: ImageOps<ImageWeight = W>>(&self, b: &B, x: &B::Image) -> Result<B::Image> {
        let h = self.norm.forward(b, x)?;
        let q = self.to_q.forward(b, &h)?;
        let k = self.to_k.forward(b, &h)?;
        let v = self.to_v.forward(b, &h)?;
        drop(h);
        let a = b.spatial_attention(&q, &k, &v)?;
        drop((q, k, v));
        let mut out = self.proj.forward(b, &a)?;
        b.add_image(&mut out, x)?;
        Ok(out)
    }
}

/// diffusers' `QwenImageMidBlock` (`num_layers=1`): residual, attention, residual.
struct MidBlock<W> {
    resnets: [ResidualBlock<W>; 2],
    attention: AttentionBlock<W>,
}

impl<W> MidBlock<W> {
    fn forward<B: ImageOps<ImageWeight = W>>(&self, b: &B, x: &B::Image) -> Result<B::Image> {
        let mut h = self.resnets[0].forward(b, x)?;
        h = self.attention.forward(b, &h)?;
        self.resnets[1].forward(b, &h)
    }
}

/// diffusers' `QwenImageUpBlock`: residual blocks, then `QwenImageResample` (`upsample2d`
/// or `upsample3d`, the same on one frame): nearest-exact 2× (nearest at an integer factor)
/// and a 3×3 conv from `dim` to `dim / 2` channels.
struct UpBlock<W> {
    resnets: Vec<ResidualBlock<W>>,
    upsampler: Option<Conv<W>>,
}

impl<W> UpBlock<W> {
    fn forward<B: ImageOps<ImageWeight = W>>(&self, b: &B, x: &B::Image) -> Result<B::Image> {
        let mut h = self.resnets[0].forward(b, x)?;
        for r in &self.resnets[1..] {
            h = r.forward(b, &h)?;
        }
        if let Some(conv) = &self.upsampler {
            h = b.upsample_nearest2x(&h)?;
            h = conv.forward(b, &h)?;
        }
        Ok(h)
    }
}

/// diffusers' `QwenImageDecoder3d` on one frame.
struct Decoder<W> {
    conv_in: Conv<W>,
    mid_block: MidBlock<W>,
    up_blocks: Vec<UpBlock<W>>,
    norm_out: RmsNorm<W>,
    conv_out: Conv<W>,
}

impl<W> Decoder<W> {
    fn bind(w: &Binder<W>, c: &QwenVaeConfig) -> Result<Self> {
        // Bound in the order of the forward pass, so the first bad tensor is reported.
        let dims = c.decoder_dims();
        let top = dims[0];
        let conv_in = w.causal_conv("decoder.conv_in", c.z_dim, top, 3)?;
        let mid =
            |i: usize| ResidualBlock::bind(w, &format!("decoder.mid_block.resnets.{i}"), top, top);
        let resnet0 = mid(0)?;
        let attention = AttentionBlock::bind(w, "decoder.mid_block.attentions.0", top)?;
        let mid_block = MidBlock {
            resnets: [resnet0, mid(1)?],
            attention,
        };
        let levels = c.dim_mult.len();
        let mut up_blocks = Vec::with_capacity(levels);
        for i in 0..levels {
            // The upsampler before this block halved its input's channels.
            let cin = if i == 0 { dims[0] } else { dims[i] / 2 };
            let cout = dims[i + 1];
            let prefix = format!("decoder.up_blocks.{i}");
            let resnets = (0..=c.num_res_blocks)
                .map(|j| {
                    let from = if j == 0 { cin } else { cout };
                    ResidualBlock::bind(w, &format!("{prefix}.resnets.{j}"), from, cout)
                })
                .collect::<Result<_>>()?;
            let upsampler = match i + 1 < levels {
                true => Some(w.conv2d(
                    &format!("{prefix}.upsamplers.0.resample.1"),
                    cout,
                    cout / 2,
                    3,
                )?),
                false => None,
            };
            up_blocks.push(UpBlock { resnets, upsampler });
        }
        let last = dims[levels];
        Ok(Decoder {
            conv_in,
            mid_block,
            up_blocks,
            norm_out: w.rms_norm("decoder.norm_out", last, false)?,
            conv_out: w.causal_conv("decoder.conv_out", last, c.input_channels, 3)?,
        })
    }

    /// `z` `[z_dim, h, w]` (after post_quant_conv) → `[input_channels, f·h, f·w]`, not yet
    /// clamped; `observe` sees each stage's output, named as in diffusers (`conv_in`,
    /// `mid_block`, `up_blocks.{i}`, `norm_out` = the norm before SiLU).
    fn forward<B: ImageOps<ImageWeight = W>>(
        &self,
        b: &B,
        z: &B::Image,
        observe: &mut dyn FnMut(&str, &B::Image),
    ) -> Result<B::Image> {
        let mut h = self.conv_in.forward(b, z)?;
        observe("conv_in", &h);
        h = self.mid_block.forward(b, &h)?;
        observe("mid_block", &h);
        for (i, up) in self.up_blocks.iter().enumerate() {
            h = up.forward(b, &h)?;
            observe(&format!("up_blocks.{i}"), &h);
        }
        h = self.norm_out.forward(b, &h)?;
        observe("norm_out", &h);
        b.silu(&mut h)?;
        self.conv_out.forward(b, &h)
    }
}

/// The post-quant conv and the decoder of `w`'s weights.
fn bind<W>(w: &Binder<W>) -> Result<(Conv<W>, Decoder<W>)> {
    let c = &w.weights.config;
    let post_quant_conv = w.causal_conv("post_quant_conv", c.z_dim, c.z_dim, 1)?;
    Ok((post_quant_conv, Decoder::bind(w, c)?))
}

/// A loaded Qwen-Image VAE decoder.
pub struct QwenVae<B: ImageOps> {
    config: QwenVaeConfig,
    post_quant_conv: Conv<B::ImageWeight>,
    decoder: Decoder<B::ImageWeight>,
}

impl<B: ImageOps> QwenVae<B> {
    /// Bind every decoder weight of `weights` (a missing tensor or a wrong shape is an error
    /// naming it).
    pub fn load(backend: &B, weights: &QwenVaeWeights) -> Result<QwenVae<B>> {
        let make = |t: &HostTensor| backend.image_weight(t);
        let binder = Binder {
            make: &make,
            weights,
        };
        let (post_quant_conv, decoder) = bind(&binder)?;
        Ok(QwenVae {
            config: weights.config.clone(),
            post_quant_conv,
            decoder,
        })
    }

    pub fn config(&self) -> &QwenVaeConfig {
        &self.config
    }

    /// Decode what the denoiser produced (unpacked: [`super::unpack_latents`]): `latents`
    /// `[batch, z_dim, h, w]` f32 (`shape` in that order) → images `[batch, 3, f·h, f·w]`
    /// (f = [`QwenVaeConfig::scale_factor`]) in [-1, 1], ready for
    /// [`crate::model::vae::to_rgb8`]. [`QwenVaeConfig::denormalize`], then
    /// [`decode_unscaled`](Self::decode_unscaled).
    pub fn decode(
        &self,
        b: &B,
        latents: &[f32],
        shape: [usize; 4],
        tiling: Tiling,
    ) -> Result<Vec<f32>> {
        let z = self.config.denormalize(latents, shape)?;
        self.decode_unscaled(b, &z, shape, tiling)
    }

    /// diffusers' `AutoencoderKLQwenImage.decode` of one-frame latents, frame 0: `z`
    /// `[batch, z_dim, h, w]` as the VAE takes it (already denormalized) → `[batch, 3, f·h,
    /// f·w]`, clamped to [-1, 1]. Each image on its own; in tiles if `tiling` says so (blended
    /// as [`crate::model::vae`]'s; the norms here are per position, but the convolutions'
    /// reach and the mid-block attention make tiles differ from the whole at their edges).
    pub fn decode_unscaled(
        &self,
        b: &B,
        z: &[f32],
        shape: [usize; 4],
        tiling: Tiling,
    ) -> Result<Vec<f32>> {
        check_latents(self.config.z_dim, z, shape)?;
        let [batch, c, h, w] = shape;
        let (f, oc) = (self.config.scale_factor(), self.config.input_channels);
        let mut out = Vec::with_capacity(batch * oc * h * f * w * f);
        let mut one_image =
            |tile: &[f32], s: ImageShape| self.decode_one(b, tile, s, &mut |_, _| ());
        for one in z.chunks_exact(c * h * w) {
            let s = ImageShape::new(c, h, w);
            let mut image = match tiling {
                Tiling::Whole => one_image(one, s)?,
                Tiling::Tiles(t) => decode_in_tiles(one, s, f, oc, t, &mut one_image)?,
            };
            image.iter_mut().for_each(|v| *v = v.clamp(-1.0, 1.0));
            out.extend(image);
        }
        Ok(out)
    }

    /// One latent `[z_dim, h, w]` (denormalized), whole, each stage shown to `observe`
    /// (`post_quant_conv`, then [`Decoder`]'s stage names): for tests against diffusers. The
    /// result is clamped to [-1, 1] as [`decode_unscaled`](Self::decode_unscaled)'s.
    pub fn decode_traced(
        &self,
        b: &B,
        z: &[f32],
        shape: ImageShape,
        observe: &mut dyn FnMut(&str, &B::Image),
    ) -> Result<Vec<f32>> {
        check_latents(
            self.config.z_dim,
            z,
            [1, shape.channels, shape.height, shape.width],
        )?;
        let mut image = self.decode_one(b, z, shape, observe)?;
        image.iter_mut().for_each(|v| *v = v.clamp(-1.0, 1.0));
        Ok(image)
    }

    fn decode_one(
        &self,
        b: &B,
        z: &[f32],
        shape: ImageShape,
        observe: &mut dyn FnMut(&str, &B::Image),
    ) -> Result<Vec<f32>> {
        let x = b.image(shape, z)?;
        let x = self.post_quant_conv.forward(b, &x)?;
        observe("post_quant_conv", &x);
        let image = self.decoder.forward(b, &x, observe)?;
        b.image_to_host(&image)
    }
}
