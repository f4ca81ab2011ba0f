//! The VAE decoder of Flux.1 and Z-Image: diffusers' `AutoencoderKL` decoder (vae.py
//! `Decoder`), latents `[batch, 16, h, w]` → images `[batch, 3, 8h, 8w]` in about [-1, 1].
//!
//! ```text
//! z → conv_in → mid_block (resnet, attention, resnet)
//!   → up_blocks[0..n] (layers_per_block + 1 resnets, then nearest 2× + conv, except the last)
//!   → conv_norm_out (GroupNorm) → SiLU → conv_out
//! ```
//!
//! Weights are bound by their diffusers names (`decoder.up_blocks.0.resnets.1.conv1.weight`);
//! BFL / ComfyUI single files (`ae.safetensors`) are read through [`bfl_name`]. Every image
//! of a batch is decoded on its own; large ones in overlapping tiles ([`Tiling`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::backend::conv::{ImageMemory, ImageOps, ImageShape};
use crate::checkpoint::{safetensors, HostTensor};
use crate::error::{Error, Result};

/// diffusers' `AutoencoderKL` config.json, the fields the decoder reads (defaults as in
/// `AutoencoderKL.__init__`). Encoder-only fields (`down_block_types`, `use_quant_conv`, …)
/// are ignored.
#[derive(Clone, Debug, Deserialize)]
pub struct VaeConfig {
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    #[serde(default = "default_channels")]
    pub out_channels: usize,
    #[serde(default = "default_latent_channels")]
    pub latent_channels: usize,
    #[serde(default = "default_block_out_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_layers_per_block")]
    pub layers_per_block: usize,
    #[serde(default = "default_norm_num_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_act_fn")]
    pub act_fn: String,
    #[serde(default = "default_up_block_types")]
    pub up_block_types: Vec<String>,
    /// decode divides latents by this …
    #[serde(default = "default_scaling_factor")]
    pub scaling_factor: f32,
    /// … then adds this (null: 0).
    #[serde(default)]
    pub shift_factor: Option<f32>,
    /// Per-channel latent statistics some pipelines apply instead; not supported (must be
    /// null).
    #[serde(default)]
    pub latents_mean: Option<serde_json::Value>,
    #[serde(default)]
    pub latents_std: Option<serde_json::Value>,
    /// diffusers runs the VAE in f32 when set; ferry's decoder is f32 anyway.
    #[serde(default = "yes")]
    pub force_upcast: bool,
    /// A 1×1 conv on the latents before the decoder (SD's VAEs; Flux has none).
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
}

fn default_channels() -> usize {
    3
}
fn default_latent_channels() -> usize {
    4
}
fn default_block_out_channels() -> Vec<usize> {
    vec![64]
}
fn default_layers_per_block() -> usize {
    1
}
fn default_norm_num_groups() -> usize {
    32
}
fn default_act_fn() -> String {
    "silu".into()
}
fn default_up_block_types() -> Vec<String> {
    vec![UP_BLOCK.into()]
}
fn default_scaling_factor() -> f32 {
    0.18215
}
fn yes() -> bool {
    true
}

const UP_BLOCK: &str = "UpDecoderBlock2D";
/// diffusers hard-codes this eps for every norm of the decoder (vae.py `resnet_eps=1e-6`).
const NORM_EPS: f32 = 1e-6;

impl VaeConfig {
    /// Read and check `config.json` of a diffusers `vae` component.
    pub fn from_file(path: &Path) -> Result<VaeConfig> {
        let text = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let config: VaeConfig = serde_json::from_slice(&text).map_err(|e| Error::Json {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        config.check(path)?;
        Ok(config)
    }

    /// The Flux.1 VAE (black-forest-labs/FLUX.1-dev `vae/config.json`), for single files that
    /// carry no config.
    pub fn flux() -> VaeConfig {
        VaeConfig {
            class_name: Some("AutoencoderKL".into()),
            out_channels: 3,
            latent_channels: 16,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            norm_num_groups: 32,
            act_fn: "silu".into(),
            up_block_types: vec![UP_BLOCK.into(); 4],
            scaling_factor: 0.3611,
            shift_factor: Some(0.1159),
            latents_mean: None,
            latents_std: None,
            force_upcast: true,
            use_post_quant_conv: false,
            mid_block_add_attention: true,
        }
    }

    /// Reject what the decoder does not implement; `path` names the file in the error.
    pub fn check(&self, path: &Path) -> Result<()> {
        let bad =
            |field: &str, message: String| Error::checkpoint(path, format!("{field}: {message}"));
        if let Some(class) = &self.class_name {
            if class != "AutoencoderKL" {
                return Err(bad(
                    "_class_name",
                    format!("{class:?} is not supported; expected \"AutoencoderKL\""),
                ));
            }
        }
        if self.act_fn != "silu" {
            return Err(bad(
                "act_fn",
                format!("{:?} is not supported; expected \"silu\"", self.act_fn),
            ));
        }
        let levels = self.block_out_channels.len();
        if levels == 0 || self.block_out_channels.contains(&0) {
            return Err(bad(
                "block_out_channels",
                format!(
                    "{:?}; expected one or more positive channel counts",
                    self.block_out_channels
                ),
            ));
        }
        if let Some(t) = self.up_block_types.iter().find(|t| *t != UP_BLOCK) {
            return Err(bad(
                "up_block_types",
                format!("{t:?} is not supported; expected \"{UP_BLOCK}\""),
            ));
        }
        if self.up_block_types.len() != levels {
            return Err(bad(
                "up_block_types",
                format!(
                    "{} entries; expected one per block_out_channels ({levels})",
                    self.up_block_types.len()
                ),
            ));
        }
        let groups = self.norm_num_groups;
        if groups == 0 || self.block_out_channels.iter().any(|c| c % groups != 0) {
            return Err(bad(
                "norm_num_groups",
                format!(
                    "{groups} does not divide every entry of block_out_channels {:?}",
                    self.block_out_channels
                ),
            ));
        }
        for (field, n) in [
            ("latent_channels", self.latent_channels),
            ("out_channels", self.out_channels),
        ] {
            if n == 0 {
                return Err(bad(field, "0; expected a positive channel count".into()));
            }
        }
        if !self.scaling_factor.is_finite() || self.scaling_factor == 0.0 {
            return Err(bad(
                "scaling_factor",
                format!("{}; expected a finite non-zero number", self.scaling_factor),
            ));
        }
        for (field, v) in [
            ("latents_mean", &self.latents_mean),
            ("latents_std", &self.latents_std),
        ] {
            if v.as_ref().is_some_and(|v| !v.is_null()) {
                return Err(bad(
                    field,
                    "per-channel latent statistics are not supported; expected null".into(),
                ));
            }
        }
        Ok(())
    }

    /// Pixels per latent pixel along each axis: 2^(up blocks − 1) (8 for Flux).
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

/// How tensor names are spelled in the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Naming {
    /// diffusers' `AutoencoderKL` state dict: `decoder.up_blocks.0.resnets.1.conv1.weight`.
    Diffusers,
    /// BFL's / ComfyUI's `ae.safetensors` ([`bfl_name`]), each name behind `prefix` (empty,
    /// or e.g. `first_stage_model.` in a full checkpoint).
    Bfl { prefix: String },
}

/// The BFL / ComfyUI name of a diffusers decoder tensor, for a decoder with `up_blocks` up
/// blocks. BFL numbers its up blocks by resolution (`up.0` is the last one applied), diffusers
/// by order of use, so `up_blocks.i` is `up.{up_blocks-1-i}`. Names it does not know pass
/// unchanged (`decoder.conv_in.*`, `decoder.conv_out.*`, `post_quant_conv.*` are the same).
pub fn bfl_name(name: &str, up_blocks: usize) -> String {
    let parts: Vec<&str> = name.split('.').collect();
    let resnet = |rest: &[&str]| {
        rest.iter()
            .map(|p| {
                if *p == "conv_shortcut" {
                    "nin_shortcut"
                } else {
                    p
                }
            })
            .collect::<Vec<_>>()
            .join(".")
    };
    let up = |i: &str| {
        i.parse::<usize>()
            .ok()
            .filter(|&i| i < up_blocks)
            .map(|i| up_blocks - 1 - i)
    };
    match parts[..] {
        ["decoder", "conv_norm_out", p] => format!("decoder.norm_out.{p}"),
        ["decoder", "mid_block", "resnets", i, ref rest @ ..] => match i.parse::<usize>() {
            Ok(i) => format!("decoder.mid.block_{}.{}", i + 1, resnet(rest)),
            Err(_) => name.to_string(),
        },
        ["decoder", "mid_block", "attentions", "0", module, p] => {
            let bfl = match module {
                "group_norm" => "norm",
                "to_q" => "q",
                "to_k" => "k",
                "to_v" => "v",
                _ => return name.to_string(),
            };
            format!("decoder.mid.attn_1.{bfl}.{p}")
        }
        ["decoder", "mid_block", "attentions", "0", "to_out", "0", p] => {
            format!("decoder.mid.attn_1.proj_out.{p}")
        }
        ["decoder", "up_blocks", i, "resnets", j, ref rest @ ..] => match up(i) {
            Some(b) => format!("decoder.up.{b}.block.{j}.{}", resnet(rest)),
            None => name.to_string(),
        },
        ["decoder", "up_blocks", i, "upsamplers", "0", "conv", p] => match up(i) {
            Some(b) => format!("decoder.up.{b}.upsample.conv.{p}"),
            None => name.to_string(),
        },
        _ => name.to_string(),
    }
}

/// A VAE's files, opened: config, tensors (views into the mapped files), naming. Thin on
/// purpose: the checkpoint layer's named components will yield the same.
pub struct VaeWeights {
    /// The directory or file, for errors.
    pub path: PathBuf,
    pub config: VaeConfig,
    pub tensors: BTreeMap<String, HostTensor>,
    pub naming: Naming,
}

/// Open a diffusers `vae` component directory: `config.json` and
/// `diffusion_pytorch_model.safetensors` (or its shards, listed by
/// `diffusion_pytorch_model.safetensors.index.json`).
pub fn open_vae(dir: &Path) -> Result<VaeWeights> {
    let config = VaeConfig::from_file(&dir.join("config.json"))?;
    let mut tensors = BTreeMap::new();
    for file in component_files(dir)? {
        for t in safetensors::read(&file)? {
            tensors.insert(t.name.clone(), t);
        }
    }
    Ok(VaeWeights {
        path: dir.to_path_buf(),
        config,
        tensors,
        naming: Naming::Diffusers,
    })
}

/// Open a BFL / ComfyUI single-file VAE (`ae.safetensors`), which carries no config: give
/// the one it was trained with ([`VaeConfig::flux`] for Flux.1's). Weights are bound by
/// [`bfl_name`], behind whatever prefix comes before `decoder.conv_in.weight` in the file.
pub fn open_vae_file(path: &Path, config: VaeConfig) -> Result<VaeWeights> {
    config.check(path)?;
    let tensors: BTreeMap<String, HostTensor> = safetensors::read(path)?
        .into_iter()
        .map(|t| (t.name.clone(), t))
        .collect();
    const ANCHOR: &str = "decoder.conv_in.weight";
    let prefix = tensors
        .keys()
        .find_map(|k| k.strip_suffix(ANCHOR))
        .ok_or_else(|| Error::MissingTensor {
            path: path.to_path_buf(),
            tensor: ANCHOR.into(),
        })?
        .to_string();
    Ok(VaeWeights {
        path: path.to_path_buf(),
        config,
        tensors,
        naming: Naming::Bfl { prefix },
    })
}

/// Open a single-file VAE of Flux's kind, as ComfyUI loads one (`split_files/vae/
/// ae.safetensors`: BFL's names, [`bfl_name`]; or diffusers' names in one file), whose config
/// is not in the file: the channel counts, levels and resnets per level come from the
/// decoder's shapes; the GroupNorm's 32 groups, the latent scale and shift are Flux's
/// ([`VaeConfig::flux`], as ComfyUI fixes them too). An unknown layout is refused naming a
/// tensor each layout has.
pub fn open_flux_vae_file(path: &Path) -> Result<VaeWeights> {
    let tensors = safetensors::read_map(path)?;
    let (prefix, naming, config) = flux_vae_layout(path, &safetensors::shapes(&tensors))?;
    // diffusers names are bound as they are: drop a wrapper's prefix.
    let tensors = match naming {
        Naming::Diffusers if !prefix.is_empty() => tensors
            .into_iter()
            .filter_map(|(k, t)| Some((k.strip_prefix(&prefix)?.to_string(), t)))
            .collect(),
        _ => tensors,
    };
    Ok(VaeWeights {
        path: path.to_path_buf(),
        config,
        tensors,
        naming,
    })
}

/// The prefix, naming and config of a single-file VAE whose tensors have the shapes
/// `tensors` (see [`open_flux_vae_file`]).
fn flux_vae_layout(
    path: &Path,
    tensors: &BTreeMap<String, Vec<usize>>,
) -> Result<(String, Naming, VaeConfig)> {
    const ANCHOR: &str = "decoder.conv_in.weight";
    let prefix = safetensors::prefix_before(tensors, ANCHOR).ok_or_else(|| {
        Error::checkpoint(
            path,
            format!("unknown layout: expected tensor {ANCHOR} (a VAE decoder)"),
        )
    })?;
    let has = |name: &str| tensors.contains_key(&format!("{prefix}{name}"));
    let count = |stem: &dyn Fn(usize) -> String| (0..).take_while(|&i| has(&stem(i))).count();
    let (naming, levels) = if has("decoder.mid.block_1.conv1.weight") {
        let levels = count(&|i| format!("decoder.up.{i}.block.0.conv1.weight"));
        (
            Naming::Bfl {
                prefix: prefix.clone(),
            },
            levels,
        )
    } else if has("decoder.mid_block.resnets.0.conv1.weight") {
        let levels = count(&|i| format!("decoder.up_blocks.{i}.resnets.0.conv1.weight"));
        (Naming::Diffusers, levels)
    } else {
        return Err(Error::checkpoint(
            path,
            format!("unknown layout: expected tensor {prefix}decoder.mid.block_1.conv1.weight (BFL / ComfyUI names) or {prefix}decoder.mid_block.resnets.0.conv1.weight (diffusers names)"),
        ));
    };
    // The stored name of a diffusers decoder tensor.
    let stored = |name: &str| match &naming {
        Naming::Diffusers => format!("{prefix}{name}"),
        Naming::Bfl { .. } => format!("{prefix}{}", bfl_name(name, levels)),
    };
    let dims = |name: &str| -> Result<Vec<usize>> {
        let name = stored(name);
        let shape = tensors.get(&name).ok_or_else(|| Error::MissingTensor {
            path: path.to_path_buf(),
            tensor: name.clone(),
        })?;
        match shape.len() == 4 && !shape.contains(&0) {
            true => Ok(shape.clone()),
            false => Err(Error::checkpoint(
                path,
                format!("tensor {name:?} is {shape:?}; expected a conv weight [out, in, k, k]"),
            )),
        }
    };
    if levels == 0 {
        return Err(Error::MissingTensor {
            path: path.to_path_buf(),
            tensor: stored("decoder.up_blocks.0.resnets.0.conv1.weight"),
        });
    }
    // diffusers' up block i runs at level levels-1-i; its resnets' out channels are that
    // level's block_out_channels.
    let mut block_out_channels = vec![0; levels];
    for (i, c) in block_out_channels.iter_mut().rev().enumerate() {
        *c = dims(&format!("decoder.up_blocks.{i}.resnets.0.conv1.weight"))?[0];
    }
    let resnets = (0..)
        .take_while(|j| {
            tensors.contains_key(&stored(&format!(
                "decoder.up_blocks.0.resnets.{j}.conv1.weight"
            )))
        })
        .count();
    let config = VaeConfig {
        latent_channels: dims("decoder.conv_in.weight")?[1],
        out_channels: dims("decoder.conv_out.weight")?[0],
        block_out_channels,
        layers_per_block: resnets - 1, // the encoder's count; the decoder has one more
        up_block_types: vec![UP_BLOCK.into(); levels],
        use_post_quant_conv: tensors.contains_key(&format!("{prefix}post_quant_conv.weight")),
        mid_block_add_attention: tensors
            .contains_key(&stored("decoder.mid_block.attentions.0.to_q.weight")),
        ..VaeConfig::flux()
    };
    config.check(path)?;
    Ok((prefix, naming, config))
}

/// `diffusion_pytorch_model.safetensors`, or the shards its index names.
pub(crate) fn component_files(dir: &Path) -> Result<Vec<PathBuf>> {
    const SINGLE: &str = "diffusion_pytorch_model.safetensors";
    let index_path = dir.join(format!("{SINGLE}.index.json"));
    if index_path.is_file() {
        let text = std::fs::read(&index_path).map_err(|e| Error::io(&index_path, e))?;
        #[derive(Deserialize)]
        struct Index {
            weight_map: BTreeMap<String, String>,
        }
        let index: Index = serde_json::from_slice(&text).map_err(|e| Error::Json {
            path: index_path.clone(),
            message: e.to_string(),
        })?;
        let mut files: Vec<PathBuf> = index.weight_map.values().map(|f| dir.join(f)).collect();
        files.sort();
        files.dedup();
        if let Some(f) = files.iter().find(|f| !f.is_file()) {
            return Err(Error::NotFound {
                path: f.clone(),
                expected: format!("shard listed in {}", index_path.display()),
            });
        }
        return Ok(files);
    }
    let single = dir.join(SINGLE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(Error::NotFound {
        path: single,
        expected: format!("a diffusers VAE holds {SINGLE} or {SINGLE}.index.json"),
    })
}

/// Finds the tensors of a [`VaeWeights`] by their diffusers names, checking shapes, and
/// makes them weights `W` with `make` (a backend's image weights; `()` to check only).
struct Binder<'a, W> {
    make: &'a dyn Fn(&HostTensor) -> Result<W>,
    weights: &'a VaeWeights,
}

impl<W> Binder<'_, W> {
    fn stored_name(&self, name: &str) -> String {
        match &self.weights.naming {
            Naming::Diffusers => name.to_string(),
            Naming::Bfl { prefix } => {
                let up_blocks = self.weights.config.block_out_channels.len();
                format!("{prefix}{}", bfl_name(name, up_blocks))
            }
        }
    }

    /// Tensor `name` (diffusers spelling) with one of the `shapes` (the first is the one
    /// named in the error).
    fn tensor(&self, name: &str, shapes: &[&[usize]]) -> Result<W> {
        let stored = self.stored_name(name);
        let t = self
            .weights
            .tensors
            .get(&stored)
            .ok_or_else(|| Error::MissingTensor {
                path: self.weights.path.clone(),
                tensor: stored.clone(),
            })?;
        if !shapes.iter().any(|s| t.shape == *s) {
            return Err(Error::Shape {
                tensor: stored,
                expected: shapes[0].to_vec(),
                found: t.shape.clone(),
            });
        }
        (self.make)(t)
    }

    /// A conv `prefix.{weight,bias}`: `[out, in, k, k]`, `[out]`.
    fn conv(&self, prefix: &str, cin: usize, cout: usize, k: usize) -> Result<Conv<W>> {
        Ok(Conv {
            weight: self.tensor(&format!("{prefix}.weight"), &[&[cout, cin, k, k]])?,
            bias: self.tensor(&format!("{prefix}.bias"), &[&[cout]])?,
        })
    }

    /// An attention projection: a linear `[c, c]` in diffusers, a 1×1 conv `[c, c, 1, 1]` in
    /// BFL files; either is accepted (same bytes).
    fn projection(&self, prefix: &str, c: usize) -> Result<Conv<W>> {
        let (linear, conv): (&[usize], &[usize]) = (&[c, c], &[c, c, 1, 1]);
        let shapes = match self.weights.naming {
            Naming::Diffusers => [linear, conv],
            Naming::Bfl { .. } => [conv, linear],
        };
        Ok(Conv {
            weight: self.tensor(&format!("{prefix}.weight"), &shapes)?,
            bias: self.tensor(&format!("{prefix}.bias"), &[&[c]])?,
        })
    }

    fn norm(&self, prefix: &str, c: usize) -> Result<GroupNorm<W>> {
        Ok(GroupNorm {
            weight: self.tensor(&format!("{prefix}.weight"), &[&[c]])?,
            bias: self.tensor(&format!("{prefix}.bias"), &[&[c]])?,
            groups: self.weights.config.norm_num_groups,
        })
    }
}

/// A convolution's filter `[out, in, k, k]` and bias `[out]`.
pub(crate) struct Conv<W> {
    pub(crate) weight: W,
    pub(crate) bias: W,
}

impl<W> Conv<W> {
    pub(crate) fn forward<B: ImageOps<ImageWeight = W>>(
        &self,
        b: &B,
        x: &B::Image,
    ) -> Result<B::Image> {
        b.conv2d(x, &self.weight, &self.bias)
    }
}

struct GroupNorm<W> {
    weight: W,
    bias: W,
    groups: usize,
}

impl<W> GroupNorm<W> {
    fn forward<B: ImageOps<ImageWeight = W>>(&self, b: &B, x: &B::Image) -> Result<B::Image> {
        b.group_norm(x, self.groups, NORM_EPS, &self.weight, &self.bias)
    }
}

/// diffusers' `ResnetBlock2D` without a time embedding.
struct ResnetBlock<W> {
    norm1: GroupNorm<W>,
    conv1: Conv<W>,
    norm2: GroupNorm<W>,
    conv2: Conv<W>,
    /// 1×1 conv when the block changes the channel count.
    conv_shortcut: Option<Conv<W>>,
}

impl<W> ResnetBlock<W> {
    fn bind(w: &Binder<W>, prefix: &str, cin: usize, cout: usize) -> Result<Self> {
        Ok(ResnetBlock {
            norm1: w.norm(&format!("{prefix}.norm1"), cin)?,
            conv1: w.conv(&format!("{prefix}.conv1"), cin, cout, 3)?,
            norm2: w.norm(&format!("{prefix}.norm2"), cout)?,
            conv2: w.conv(&format!("{prefix}.conv2"), cout, cout, 3)?,
            conv_shortcut: match cin != cout {
                true => Some(w.conv(&format!("{prefix}.conv_shortcut"), cin, cout, 1)?),
                false => None,
            },
        })
    }

    fn forward<B: ImageOps<ImageWeight = W>>(&self, b: &B, x: &B::Image) -> Result<B::Image> {
        let mut h = self.norm1.forward(b, x)?;
        b.silu(&mut h)?;
        let h = self.conv1.forward(b, &h)?;
        let mut h = self.norm2.forward(b, &h)?;
        b.silu(&mut h)?;
        let mut h = self.conv2.forward(b, &h)?; // (dropout: identity at inference)
        match &self.conv_shortcut {
            Some(shortcut) => {
                let mut s = shortcut.forward(b, x)?;
                b.add_image(&mut s, &h)?;
                Ok(s)
            }
            None => {
                b.add_image(&mut h, x)?;
                Ok(h)
            }
        }
    }
}

/// The mid block's attention (diffusers `Attention` with `_from_deprecated_attn_block`):
/// one head over all positions, channels as features, residual added.
struct Attention<W> {
    group_norm: GroupNorm<W>,
    to_q: Conv<W>,
    to_k: Conv<W>,
    to_v: Conv<W>,
    to_out: Conv<W>,
}

impl<W> Attention<W> {
    fn bind(w: &Binder<W>, prefix: &str, c: usize) -> Result<Self> {
        Ok(Attention {
            group_norm: w.norm(&format!("{prefix}.group_norm"), c)?,
            to_q: w.projection(&format!("{prefix}.to_q"), c)?,
            to_k: w.projection(&format!("{prefix}.to_k"), c)?,
            to_v: w.projection(&format!("{prefix}.to_v"), c)?,
            to_out: w.projection(&format!("{prefix}.to_out.0"), c)?,
        })
    }

    fn forward<B: ImageOps<ImageWeight = W>>(&self, b: &B, x: &B::Image) -> Result<B::Image> {
        let h = self.group_norm.forward(b, x)?;
        // The linears act per position on the channel vector: 1×1 convs.
        let q = self.to_q.forward(b, &h)?;
        let k = self.to_k.forward(b, &h)?;
        let v = self.to_v.forward(b, &h)?;
        let a = b.spatial_attention(&q, &k, &v)?;
        let mut out = self.to_out.forward(b, &a)?;
        b.add_image(&mut out, x)?;
        Ok(out)
    }
}

/// diffusers' `UNetMidBlock2D`: resnet, then (attention, resnet).
struct MidBlock<W> {
    resnets: [ResnetBlock<W>; 2],
    /// None when `mid_block_add_attention` is false.
    attention: Option<Attention<W>>,
}

impl<W> MidBlock<W> {
    fn forward<B: ImageOps<ImageWeight = W>>(&self, b: &B, x: &B::Image) -> Result<B::Image> {
        let mut h = self.resnets[0].forward(b, x)?;
        if let Some(attention) = &self.attention {
            h = attention.forward(b, &h)?;
        }
        self.resnets[1].forward(b, &h)
    }
}

/// diffusers' `UpDecoderBlock2D`: resnets, then `Upsample2D` (nearest 2× + 3×3 conv).
struct UpBlock<W> {
    resnets: Vec<ResnetBlock<W>>,
    upsampler: Option<Conv<W>>,
}

impl<W> UpBlock<W> {
    fn forward<B: ImageOps<ImageWeight = W>>(&self, b: &B, x: &B::Image) -> Result<B::Image> {
        let mut h = self.resnets[0].forward(b, x)?;
        for r in &self.resnets[1..] {
            h = r.forward(b, &h)?;
        }
        if let Some(conv) = &self.upsampler {
            h = conv.forward(b, &b.upsample_nearest2x(&h)?)?;
        }
        Ok(h)
    }
}

/// diffusers' `Decoder`.
struct Decoder<W> {
    conv_in: Conv<W>,
    mid_block: MidBlock<W>,
    up_blocks: Vec<UpBlock<W>>,
    conv_norm_out: GroupNorm<W>,
    conv_out: Conv<W>,
}

impl<W> Decoder<W> {
    fn bind(w: &Binder<W>, c: &VaeConfig) -> Result<Self> {
        // Bound in the order of the forward pass, so the first bad tensor is reported.
        // Up blocks run from the deepest channel count to the first.
        let rev: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        let top = rev[0];
        let conv_in = w.conv("decoder.conv_in", c.latent_channels, top, 3)?;
        let mid =
            |i: usize| ResnetBlock::bind(w, &format!("decoder.mid_block.resnets.{i}"), top, top);
        let mid_block = MidBlock {
            resnets: [mid(0)?, mid(1)?],
            attention: match c.mid_block_add_attention {
                true => Some(Attention::bind(w, "decoder.mid_block.attentions.0", top)?),
                false => None,
            },
        };
        let mut up_blocks = Vec::with_capacity(rev.len());
        for (i, &cout) in rev.iter().enumerate() {
            let cin = if i == 0 { top } else { rev[i - 1] };
            let prefix = format!("decoder.up_blocks.{i}");
            let resnets = (0..=c.layers_per_block)
                .map(|j| {
                    let from = if j == 0 { cin } else { cout };
                    ResnetBlock::bind(w, &format!("{prefix}.resnets.{j}"), from, cout)
                })
                .collect::<Result<_>>()?;
            let upsampler = match i + 1 < rev.len() {
                true => Some(w.conv(&format!("{prefix}.upsamplers.0.conv"), cout, cout, 3)?),
                false => None,
            };
            up_blocks.push(UpBlock { resnets, upsampler });
        }
        let first = c.block_out_channels[0];
        Ok(Decoder {
            conv_in,
            mid_block,
            up_blocks,
            conv_norm_out: w.norm("decoder.conv_norm_out", first)?,
            conv_out: w.conv("decoder.conv_out", first, c.out_channels, 3)?,
        })
    }

    /// `z` `[latent_channels, h, w]` → `[out_channels, 8h, 8w]`; `observe` sees the output of
    /// each stage, named as in diffusers (`conv_in`, `mid_block`, `up_blocks.{i}`,
    /// `conv_norm_out` = the norm before SiLU).
    fn forward<B: ImageOps<ImageWeight = W>>(
        &self,
        b: &B,
        z: &B::Image,
        observe: &mut dyn FnMut(&str, &B::Image),
    ) -> Result<B::Image> {
        let h = self.conv_in.forward(b, z)?;
        observe("conv_in", &h);
        let mut h = self.mid_block.forward(b, &h)?;
        observe("mid_block", &h);
        for (i, up) in self.up_blocks.iter().enumerate() {
            h = up.forward(b, &h)?;
            observe(&format!("up_blocks.{i}"), &h);
        }
        let mut h = self.conv_norm_out.forward(b, &h)?;
        observe("conv_norm_out", &h);
        b.silu(&mut h)?;
        self.conv_out.forward(b, &h)
    }
}

/// Tiles for decoding a latent in pieces, in latent pixels. Tiles are `tile × tile` (smaller
/// only where the latent is), neighbours overlap by at least `overlap`, and the overlap is
/// blended with linear ramps (as diffusers' `tiled_decode`; its defaults are overlap = tile/4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TileConfig {
    tile: usize,
    overlap: usize,
}

impl TileConfig {
    /// `tile` ≥ 1, `overlap` < `tile`.
    pub fn new(tile: usize, overlap: usize) -> Result<TileConfig> {
        if tile == 0 || overlap >= tile {
            return Err(Error::Flag {
                flag: "VAE tile",
                message: format!(
                    "tile {tile}, overlap {overlap} latent pixels; expected tile >= 1 and overlap < tile"
                ),
            });
        }
        Ok(TileConfig { tile, overlap })
    }

    pub fn tile(&self) -> usize {
        self.tile
    }

    pub fn overlap(&self) -> usize {
        self.overlap
    }
}

impl Default for TileConfig {
    /// 64 latent pixels (512 px), a quarter of it overlapped.
    fn default() -> Self {
        TileConfig {
            tile: 64,
            overlap: 16,
        }
    }
}

/// Whether to decode a latent whole or in tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tiling {
    Whole,
    Tiles(TileConfig),
}

/// A loaded VAE decoder.
/// The post-quant conv (if the config has one) and the decoder of `weights`, each weight
/// made by `make`.
fn bind<W>(
    weights: &VaeWeights,
    make: &dyn Fn(&HostTensor) -> Result<W>,
) -> Result<(Option<Conv<W>>, Decoder<W>)> {
    let w = Binder { make, weights };
    let c = &weights.config;
    let lc = c.latent_channels;
    let post_quant_conv = match c.use_post_quant_conv {
        true => Some(w.conv("post_quant_conv", lc, lc, 1)?),
        false => None,
    };
    Ok((post_quant_conv, Decoder::bind(&w, c)?))
}

impl VaeWeights {
    /// Check every tensor the decoder binds, as [`Vae::load`] would (the first missing one or
    /// wrong shape is an error naming it), without converting any.
    pub fn check(&self) -> Result<()> {
        bind(self, &|_| Ok(())).map(drop)
    }
}

pub struct Vae<B: ImageOps> {
    config: VaeConfig,
    post_quant_conv: Option<Conv<B::ImageWeight>>,
    decoder: Decoder<B::ImageWeight>,
}

impl<B: ImageOps> Vae<B> {
    /// Bind every decoder weight of `weights` (a missing tensor or a wrong shape is an error
    /// naming it, as the file spells it).
    pub fn load(backend: &B, weights: &VaeWeights) -> Result<Vae<B>> {
        let make = |t: &HostTensor| backend.image_weight(t);
        let (post_quant_conv, decoder) = bind(weights, &make)?;
        Ok(Vae {
            config: weights.config.clone(),
            post_quant_conv,
            decoder,
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Decode what the denoiser produced: `latents` `[batch, latent_channels, h, w]` f32
    /// (`shape` in that order) → images `[batch, out_channels, f·h, f·w]` (f =
    /// [`VaeConfig::scale_factor`]) in about [-1, 1]. First undoes the latent normalisation
    /// the pipelines apply, `z = latents / scaling_factor + shift_factor` (Flux, Z-Image), then
    /// [`decode_unscaled`](Self::decode_unscaled).
    pub fn decode(
        &self,
        b: &B,
        latents: &[f32],
        shape: [usize; 4],
        tiling: Tiling,
    ) -> Result<Vec<f32>> {
        self.check_latents(latents, shape)?;
        let (scale, shift) = (
            self.config.scaling_factor,
            self.config.shift_factor.unwrap_or(0.0),
        );
        let z: Vec<f32> = latents.iter().map(|&v| v / scale + shift).collect();
        self.decode_unscaled(b, &z, shape, tiling)
    }

    /// diffusers' `AutoencoderKL.decode`: `z` `[batch, latent_channels, h, w]` as the decoder
    /// takes it (no scaling) → `[batch, out_channels, f·h, f·w]`.
    pub fn decode_unscaled(
        &self,
        b: &B,
        z: &[f32],
        shape: [usize; 4],
        tiling: Tiling,
    ) -> Result<Vec<f32>> {
        self.check_latents(z, shape)?;
        let [batch, c, h, w] = shape;
        let f = self.config.scale_factor();
        let mut out = Vec::with_capacity(batch * self.config.out_channels * h * f * w * f);
        for one in z.chunks_exact(c * h * w) {
            let image = match tiling {
                Tiling::Whole => {
                    self.decode_one(b, one, ImageShape::new(c, h, w), &mut |_, _| ())?
                }
                Tiling::Tiles(t) => self.decode_tiled(b, one, ImageShape::new(c, h, w), t)?,
            };
            out.extend(image);
        }
        Ok(out)
    }

    /// One latent `[latent_channels, h, w]` (no scaling), whole, with each decoder stage
    /// shown to `observe` (see [`Decoder`]'s stage names): for tests against diffusers.
    pub fn decode_traced(
        &self,
        b: &B,
        z: &[f32],
        shape: ImageShape,
        observe: &mut dyn FnMut(&str, &B::Image),
    ) -> Result<Vec<f32>> {
        self.check_latents(z, [1, shape.channels, shape.height, shape.width])?;
        self.decode_one(b, z, shape, observe)
    }

    fn check_latents(&self, z: &[f32], shape: [usize; 4]) -> Result<()> {
        let [batch, c, h, w] = shape;
        if c != self.config.latent_channels || h == 0 || w == 0 || z.len() != batch * c * h * w {
            return Err(Error::Shape {
                tensor: "latents".into(),
                expected: vec![batch, self.config.latent_channels, h.max(1), w.max(1)],
                found: if z.len() == batch * c * h * w {
                    shape.to_vec()
                } else {
                    vec![z.len()]
                },
            });
        }
        Ok(())
    }

    fn decode_one(
        &self,
        b: &B,
        z: &[f32],
        shape: ImageShape,
        observe: &mut dyn FnMut(&str, &B::Image),
    ) -> Result<Vec<f32>> {
        let mut x = b.image(shape, z)?;
        if let Some(conv) = &self.post_quant_conv {
            x = conv.forward(b, &x)?;
        }
        let image = self.decoder.forward(b, &x, observe)?;
        b.image_to_host(&image)
    }

    /// Decode `z` `[c, h, w]` tile by tile and blend ([`decode_in_tiles`]).
    fn decode_tiled(&self, b: &B, z: &[f32], shape: ImageShape, t: TileConfig) -> Result<Vec<f32>> {
        let (f, oc) = (self.config.scale_factor(), self.config.out_channels);
        decode_in_tiles(z, shape, f, oc, t, |tile, s| {
            self.decode_one(b, tile, s, &mut |_, _| ())
        })
    }
}

/// Decode `z` `[c, h, w]` tile by tile with `decode` (a tile's latent `[c, th, tw]` → its
/// image `[oc, f·th, f·tw]`) and blend: each output pixel is the weighted mean of the tiles
/// covering it, a tile's weight ramping linearly from ~0 to 1 across each overlap with a
/// neighbour (so two tiles' weights sum to 1 there) and 1 elsewhere. Shared by the VAE
/// decoders (this one and Qwen-Image's).
pub(crate) fn decode_in_tiles(
    z: &[f32],
    shape: ImageShape,
    f: usize,
    oc: usize,
    t: TileConfig,
    mut decode: impl FnMut(&[f32], ImageShape) -> Result<Vec<f32>>,
) -> Result<Vec<f32>> {
    let ImageShape {
        channels: c,
        height: h,
        width: w,
    } = shape;
    let (th, tw) = (t.tile.min(h), t.tile.min(w));
    let (ys, xs) = (tile_origins(h, t), tile_origins(w, t));
    let (out_h, out_w) = (h * f, w * f);
    let mut sum = vec![0f32; oc * out_h * out_w]; // [oc, H, W] Σ weight · tile
    let mut weight = vec![0f32; out_h * out_w]; // [H, W] Σ weight
    let mut tile_z = Vec::with_capacity(c * th * tw);
    for (iy, &y0) in ys.iter().enumerate() {
        let wy = ramp_weights(&ys, iy, th, f);
        for (ix, &x0) in xs.iter().enumerate() {
            let wx = ramp_weights(&xs, ix, tw, f);
            tile_z.clear();
            for ch in 0..c {
                for y in y0..y0 + th {
                    tile_z.extend_from_slice(&z[(ch * h + y) * w + x0..][..tw]);
                }
            }
            let tile = decode(&tile_z, ImageShape::new(c, th, tw))?;
            let (ph, pw) = (th * f, tw * f);
            for (py, &a) in wy.iter().enumerate() {
                let row = (y0 * f + py) * out_w + x0 * f;
                for (px, &bw) in wx.iter().enumerate() {
                    weight[row + px] += a * bw;
                }
                for ch in 0..oc {
                    let src = &tile[(ch * ph + py) * pw..][..pw];
                    let dst = &mut sum[ch * out_h * out_w + row..][..pw];
                    for ((d, &s), &bw) in dst.iter_mut().zip(src).zip(&wx) {
                        *d += a * bw * s;
                    }
                }
            }
        }
    }
    for plane in sum.chunks_exact_mut(out_h * out_w) {
        for (v, &wt) in plane.iter_mut().zip(&weight) {
            *v /= wt;
        }
    }
    Ok(sum)
}

/// The smallest tile [`choose_tiling`] uses, in latent pixels (128 image pixels): smaller
/// tiles see too little of the image for the mid-block attention and the GroupNorms.
pub const MIN_TILE: usize = 16;

impl VaeConfig {
    /// Bytes of activations alive at once, at most, while one `h × w` latent is decoded whole
    /// by a backend whose image ops spend memory as `m` says: the decoder's allocations and
    /// frees replayed in the order of its forward pass (what each op returns, the im2col and
    /// score blocks while an op runs, the images a block keeps alive until it returns). The
    /// weights are not included.
    pub fn decode_peak_bytes(&self, h: usize, w: usize, m: ImageMemory) -> usize {
        let rev: Vec<usize> = self.block_out_channels.iter().rev().copied().collect();
        let (top, first) = (rev[0], self.block_out_channels[0]);
        let mut r = Replay::new(m, self.norm_num_groups);
        let mut n = h * w;
        let z = r.alloc(self.latent_channels * n);
        if self.use_post_quant_conv {
            r.alloc(self.latent_channels * n); // a 1×1 conv: a GEMM, no blocks
            r.free(z);
        }
        let _conv_in = r.conv3(self.latent_channels, top, n); // alive to the end
        let r0 = r.resnet(top, top, n);
        let h0 = match self.mid_block_add_attention {
            true => {
                let a = r.attention(top, n);
                r.free(r0);
                a
            }
            false => r0,
        };
        let mut h_in = r.resnet(top, top, n);
        r.free(h0);
        for (i, &cout) in rev.iter().enumerate() {
            let cin = if i == 0 { top } else { rev[i - 1] };
            let mut x = r.resnet(cin, cout, n); // the block's input stays alive
            for _ in 0..self.layers_per_block {
                let y = r.resnet(cout, cout, n);
                r.free(x);
                x = y;
            }
            if i + 1 < rev.len() {
                let up = r.alloc(cout * 4 * n);
                let y = r.conv3(cout, cout, 4 * n);
                r.free(x + up);
                x = y;
                n *= 4;
            }
            r.free(h_in);
            h_in = x;
        }
        let _norm = r.norm(first, n);
        let _out = r.conv3(first, self.out_channels, n);
        r.peak
    }
}

/// Allocations and frees in bytes, and the most alive at once (see
/// [`VaeConfig::decode_peak_bytes`]); each op returns the bytes of the image it made.
pub(crate) struct Replay {
    m: ImageMemory,
    groups: usize,
    live: usize,
    peak: usize,
}

impl Replay {
    /// Nothing alive yet; norms of `groups` groups (0 for a norm without group sums).
    pub(crate) fn new(m: ImageMemory, groups: usize) -> Replay {
        Replay {
            m,
            groups,
            live: 0,
            peak: 0,
        }
    }

    /// The most bytes alive at once so far.
    pub(crate) fn peak(&self) -> usize {
        self.peak
    }

    fn alloc_bytes(&mut self, bytes: usize) -> usize {
        self.live += bytes;
        self.peak = self.peak.max(self.live);
        bytes
    }

    pub(crate) fn alloc(&mut self, elements: usize) -> usize {
        self.alloc_bytes(elements * self.m.element_bytes)
    }

    pub(crate) fn free(&mut self, bytes: usize) {
        self.live -= bytes;
    }

    /// A 3×3 conv over `n` positions: its output, and im2col rows in blocks while it runs.
    pub(crate) fn conv3(&mut self, cin: usize, cout: usize, n: usize) -> usize {
        let out = self.alloc(cout * n);
        let row = 9 * cin * self.m.element_bytes;
        let cols = self.alloc_bytes((self.m.block_bytes / row).clamp(1, n) * row);
        self.free(cols);
        out
    }

    /// GroupNorm: its sums (two f64 a group) while it runs, then its output.
    pub(crate) fn norm(&mut self, c: usize, n: usize) -> usize {
        let sums = self.alloc_bytes(2 * self.groups * 8);
        let out = self.alloc(c * n);
        self.free(sums);
        out
    }

    /// [`ResnetBlock::forward`]: both norms and convs alive until it returns.
    fn resnet(&mut self, cin: usize, cout: usize, n: usize) -> usize {
        let h1n = self.norm(cin, n);
        let h1 = self.conv3(cin, cout, n);
        let h2n = self.norm(cout, n);
        let h2 = self.conv3(cout, cout, n);
        let out = match cin != cout {
            true => {
                let shortcut = self.alloc(cout * n);
                self.free(h2);
                shortcut
            }
            false => h2,
        };
        self.free(h1n + h1 + h2n);
        out
    }

    /// [`Attention::forward`]: the norm, q, k, v, the attention, the output.
    fn attention(&mut self, c: usize, n: usize) -> usize {
        let normed = self.norm(c, n);
        let qkv = self.alloc(3 * c * n);
        let a = self.spatial_attention(c, n);
        let out = self.alloc(c * n);
        self.free(normed + qkv + a);
        out
    }

    /// [`ImageOps::spatial_attention`] over `n` positions of `c` channels: vᵀ and a block of
    /// scores while it runs, then its output.
    pub(crate) fn spatial_attention(&mut self, c: usize, n: usize) -> usize {
        let vt = self.alloc(c * n);
        let a = self.alloc(c * n);
        let row = n * self.m.element_bytes;
        let scores = self.alloc_bytes((self.m.block_bytes / row).clamp(1, n) * row);
        self.free(scores + vt);
        a
    }
}

/// How to decode `h × w` latents with `available` bytes of device memory for activations
/// ([`VaeConfig::decode_peak_bytes`]): whole when that fits, else square tiles, the largest
/// that fit but at least [`MIN_TILE`], overlapping by a quarter. `Err(bytes)`: not even the
/// smallest tile fits; it needs `bytes`.
pub fn choose_tiling(
    config: &VaeConfig,
    h: usize,
    w: usize,
    available: usize,
    m: ImageMemory,
) -> std::result::Result<Tiling, usize> {
    choose_tiling_by(h, w, available, |h, w| config.decode_peak_bytes(h, w, m))
}

/// [`choose_tiling`] for any decoder whose peak of activations for an `h × w` latent is
/// `peak(h, w)`.
pub fn choose_tiling_by(
    h: usize,
    w: usize,
    available: usize,
    peak: impl Fn(usize, usize) -> usize,
) -> std::result::Result<Tiling, usize> {
    if peak(h, w) <= available {
        return Ok(Tiling::Whole);
    }
    let need = |t: usize| peak(t.min(h), t.min(w));
    let longest = h.max(w);
    let smallest = MIN_TILE.min(longest);
    (smallest..longest)
        .rev()
        .find(|&t| need(t) <= available)
        .map(|tile| {
            Tiling::Tiles(TileConfig {
                tile,
                overlap: tile / 4,
            })
        })
        .ok_or_else(|| need(smallest))
}

impl VaeWeights {
    /// Bytes of the decoder's weights (the tensors under `decoder.` and `post_quant_conv.`)
    /// at `element_bytes` each, as a backend holds them.
    pub fn decoder_bytes(&self, element_bytes: usize) -> usize {
        let prefix = match &self.naming {
            Naming::Diffusers => "",
            Naming::Bfl { prefix } => prefix.as_str(),
        };
        self.tensors
            .iter()
            .filter(|(k, _)| {
                k.strip_prefix(prefix)
                    .is_some_and(|k| k.starts_with("decoder.") || k.starts_with("post_quant_conv."))
            })
            .map(|(_, t)| t.numel() * element_bytes)
            .sum()
    }
}

/// First latent row (or column) of each tile along an axis of `len`: a step of
/// `tile - overlap`, the last tile moved back to end at `len` so that every tile is whole.
fn tile_origins(len: usize, t: TileConfig) -> Vec<usize> {
    if len <= t.tile {
        return vec![0];
    }
    let mut origins = vec![0];
    let mut o = 0;
    while o + t.tile < len {
        o = (o + t.tile - t.overlap).min(len - t.tile);
        origins.push(o);
    }
    origins
}

/// Blend weights along one axis of tile `k` of `origins` (tiles `extent` latent pixels long,
/// `f` pixels each): 1, ramping over the overlap with each neighbour, sampled at pixel
/// centres so that no weight is 0 and two overlapping tiles' weights sum to 1.
fn ramp_weights(origins: &[usize], k: usize, extent: usize, f: usize) -> Vec<f32> {
    let len = extent * f;
    let start = origins[k] * f;
    let mut w = vec![1f32; len];
    if k > 0 {
        let overlap = (origins[k - 1] + extent) * f - start;
        for (p, v) in w.iter_mut().enumerate().take(overlap) {
            *v = v.min((p as f32 + 0.5) / overlap as f32);
        }
    }
    if k + 1 < origins.len() {
        let overlap = start + len - origins[k + 1] * f;
        for (p, v) in w.iter_mut().enumerate().skip(len - overlap) {
            *v = v.min(((len - p) as f32 - 0.5) / overlap as f32);
        }
    }
    w
}

/// 8-bit RGB exactly as diffusers' `VaeImageProcessor.postprocess(output_type="pil")` makes
/// it: `(x * 0.5 + 0.5).clamp(0, 1)`, then numpy's `(v * 255).round().astype("uint8")` (f32,
/// round half to even). `image` `[batch, c, h, w]` → `[batch, h, w, c]` (PIL's layout).
pub fn to_rgb8(image: &[f32], shape: [usize; 4]) -> Vec<u8> {
    let [batch, c, h, w] = shape;
    assert_eq!(
        image.len(),
        batch * c * h * w,
        "to_rgb8: data vs shape {shape:?}"
    );
    let mut out = vec![0u8; image.len()];
    for (src, dst) in image
        .chunks_exact(c * h * w)
        .zip(out.chunks_exact_mut(c * h * w))
    {
        for (i, &x) in src.iter().enumerate() {
            let (ch, pos) = (i / (h * w), i % (h * w));
            let v = (x * 0.5 + 0.5).clamp(0.0, 1.0);
            // `as u8` saturates and sends NaN to 0, as numpy's cast does on x86.
            dst[pos * c + ch] = (v * 255.0).round_ties_even() as u8;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bfl_names() {
        let n = 4;
        for (diffusers, bfl) in [
            ("decoder.conv_in.weight", "decoder.conv_in.weight"),
            ("decoder.conv_out.bias", "decoder.conv_out.bias"),
            ("decoder.conv_norm_out.weight", "decoder.norm_out.weight"),
            (
                "decoder.mid_block.resnets.0.norm1.weight",
                "decoder.mid.block_1.norm1.weight",
            ),
            (
                "decoder.mid_block.resnets.1.conv2.bias",
                "decoder.mid.block_2.conv2.bias",
            ),
            (
                "decoder.mid_block.attentions.0.group_norm.bias",
                "decoder.mid.attn_1.norm.bias",
            ),
            (
                "decoder.mid_block.attentions.0.to_q.weight",
                "decoder.mid.attn_1.q.weight",
            ),
            (
                "decoder.mid_block.attentions.0.to_k.bias",
                "decoder.mid.attn_1.k.bias",
            ),
            (
                "decoder.mid_block.attentions.0.to_v.weight",
                "decoder.mid.attn_1.v.weight",
            ),
            (
                "decoder.mid_block.attentions.0.to_out.0.weight",
                "decoder.mid.attn_1.proj_out.weight",
            ),
            (
                "decoder.up_blocks.0.resnets.1.conv1.weight",
                "decoder.up.3.block.1.conv1.weight",
            ),
            (
                "decoder.up_blocks.3.resnets.0.conv1.weight",
                "decoder.up.0.block.0.conv1.weight",
            ),
            (
                "decoder.up_blocks.2.resnets.0.conv_shortcut.weight",
                "decoder.up.1.block.0.nin_shortcut.weight",
            ),
            (
                "decoder.up_blocks.1.upsamplers.0.conv.bias",
                "decoder.up.2.upsample.conv.bias",
            ),
            ("post_quant_conv.weight", "post_quant_conv.weight"),
        ] {
            assert_eq!(bfl_name(diffusers, n), bfl, "{diffusers}");
        }
    }

    /// Flux's VAE as `ferry synth` writes it (diffusers' names, which diffusers loads), and
    /// renamed as in BFL's ae.safetensors behind a prefix: both give Flux's config.
    #[test]
    fn flux_shapes_give_flux_config() {
        use crate::synth::{PipelineComponent, PipelinePreset};
        let turbo = PipelinePreset::by_name("z-image-turbo").unwrap();
        let diffusers: BTreeMap<String, Vec<usize>> =
            turbo.tensors(PipelineComponent::Vae).into_iter().collect();
        let bfl: BTreeMap<String, Vec<usize>> = diffusers
            .iter()
            .map(|(n, s)| {
                let name = bfl_name(n, 4);
                let mut s = s.clone();
                if name.starts_with("decoder.mid.attn_1.") && s.len() == 2 {
                    s.extend([1, 1]); // BFL's attention projections are 1×1 convs
                }
                (format!("vae.{name}"), s)
            })
            .collect();
        let p = Path::new("ae.safetensors");
        let flux = format!("{:?}", VaeConfig::flux());
        let (prefix, naming, config) = flux_vae_layout(p, &bfl).unwrap();
        assert_eq!(
            (prefix.as_str(), &naming),
            (
                "vae.",
                &Naming::Bfl {
                    prefix: "vae.".into()
                }
            )
        );
        assert_eq!(format!("{config:?}"), flux);
        let (prefix, naming, config) = flux_vae_layout(p, &diffusers).unwrap();
        assert_eq!((prefix.as_str(), naming), ("", Naming::Diffusers));
        assert_eq!(format!("{config:?}"), flux);
    }

    #[test]
    fn tiles_cover_the_axis() {
        let t = TileConfig::new(8, 2).unwrap();
        assert_eq!(tile_origins(8, t), [0]);
        assert_eq!(tile_origins(5, t), [0]);
        assert_eq!(tile_origins(14, t), [0, 6]);
        assert_eq!(tile_origins(15, t), [0, 6, 7]);
        assert_eq!(tile_origins(20, t), [0, 6, 12]);
        // Two overlapping tiles' weights sum to 1 on the overlap.
        let origins = [0, 6];
        let (a, b) = (
            ramp_weights(&origins, 0, 8, 2),
            ramp_weights(&origins, 1, 8, 2),
        );
        for p in 12..16 {
            assert!((a[p] + b[p - 12] - 1.0).abs() < 1e-6, "pixel {p}");
        }
        assert!(a[..12].iter().chain(&b[4..]).all(|&v| v == 1.0));
        assert!(TileConfig::new(4, 4).is_err() && TileConfig::new(0, 0).is_err());
    }

    #[test]
    fn rgb8_rounds_like_numpy() {
        // f32 inputs whose v·255 is exactly k + 0.5 (found with numpy): half to even.
        let xs = [0.054901946f32, -0.22745095, 0.17254902, 0.8549019];
        assert_eq!(to_rgb8(&xs, [1, 1, 1, 4]), [134, 98, 150, 236]);
        assert_eq!(to_rgb8(&[3.0, -7.0, f32::NAN], [1, 1, 1, 3]), [255, 0, 0]);
        // HWC order: channel fastest.
        let img = [-1.0, 1.0, -1.0, 1.0, 0.0, 0.0]; // [3, 1, 2]: R, G = (0, 255), B = 128
        assert_eq!(to_rgb8(&img, [1, 3, 1, 2]), [0, 0, 128, 255, 255, 128]);
    }
}
