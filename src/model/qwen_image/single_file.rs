//! Qwen-Image as ComfyUI's split files (Comfy-Org/Qwen-Image_ComfyUI `split_files/`): the DiT
//! (`diffusion_models/qwen_image_bf16.safetensors`) and the VAE (`vae/qwen_image_vae.safetensors`)
//! each as one file with no config; the text encoder's file is read by
//! [`QwenImageTextEncoder::open_file`](crate::diffuse::qwen_text_encoder::QwenImageTextEncoder::open_file).
//!
//! The DiT's names are diffusers' own (ComfyUI's module tree is the same), behind an optional
//! `model.diffusion_model.` prefix. Its widths and block count come from the shapes; the
//! RoPE axes are Qwen-Image's (16, 56, 56) of a 128 head, in proportion for other head sizes.
//!
//! The VAE comes in the original Wan 2.1 layout (the redistributed file) or diffusers'
//! (exported from the Qwen-Image repository). Original → diffusers, the decoder's names:
//!
//! | original | diffusers |
//! |---|---|
//! | `conv2` | `post_quant_conv` (`conv1`: `quant_conv`) |
//! | `decoder.conv1` | `decoder.conv_in` |
//! | `decoder.middle.{0,2}` | `decoder.mid_block.resnets.{0,1}` |
//! | `decoder.middle.1` | `decoder.mid_block.attentions.0` |
//! | `decoder.upsamples.{k}` | level by level, `num_res_blocks + 1` residual blocks then an upsampler: `decoder.up_blocks.{i}.resnets.{j}`, `decoder.up_blocks.{i}.upsamplers.0` |
//! | `decoder.head.{0,2}` | `decoder.norm_out`, `decoder.conv_out` |
//! | a residual block's `residual.{0,2,3,6}`, `shortcut` | `norm1`, `conv1`, `norm2`, `conv2`, `conv_shortcut` |
//!
//! and the encoder's alike (`encoder.downsamples.{k}` → `encoder.down_blocks.{k}`, which
//! diffusers keeps flat). The file carries no config either: channels, levels and residual
//! blocks come from the decoder's shapes, which upsamplers are temporal from their `time_conv`s,
//! and the latent statistics are Qwen-Image's.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::json;

use super::vae::{QwenVaeConfig, QwenVaeWeights};
use super::{QwenImageConfig, CLASS_NAME};
use crate::checkpoint::{safetensors, Component, HostTensor};
use crate::error::{Error, Result};

/// A tensor only Qwen-Image's DiT has (after the prefix): it tells the file's model.
pub const DIT_ANCHOR: &str = "txt_norm.weight";
/// Names that tell the VAE's layouts apart.
const WAN_ANCHOR: &str = "decoder.middle.0.residual.0.gamma";
const DIFFUSERS_ANCHOR: &str = "decoder.conv_in.weight";

/// Whether the safetensors header `tensors` holds a Qwen-Image DiT.
pub fn is_dit<T>(tensors: &BTreeMap<String, T>) -> bool {
    safetensors::prefix_before(tensors, DIT_ANCHOR)
        .is_some_and(|p| tensors.contains_key(&format!("{p}img_in.weight")))
}

/// Open a single-file Qwen-Image DiT: its config inferred from the shapes, its tensors under
/// diffusers' names (views of the file's bytes).
pub fn open_dit_file(path: &Path) -> Result<(QwenImageConfig, Component)> {
    let stored = safetensors::read_map(path)?;
    let prefix = safetensors::prefix_before(&stored, DIT_ANCHOR).ok_or_else(|| {
        Error::checkpoint(
            path,
            format!("unknown layout: expected tensor {DIT_ANCHOR} (a Qwen-Image diffusion model's text norm)"),
        )
    })?;
    let tensors: BTreeMap<String, HostTensor> = stored
        .iter()
        .filter_map(|(name, t)| {
            let name = name.strip_prefix(&prefix)?;
            Some((name.to_string(), t.renamed(name)))
        })
        .collect();
    let config = infer_dit_config(path, &safetensors::shapes(&tensors))?;
    Ok((config, Component::from_file("transformer", path, tensors)))
}

/// A tensor's shape of the given rank with no zero dimension, or an error naming it.
fn dims(
    path: &Path,
    tensors: &BTreeMap<String, Vec<usize>>,
    name: &str,
    rank: usize,
) -> Result<Vec<usize>> {
    let shape = tensors.get(name).ok_or_else(|| Error::MissingTensor {
        path: path.to_path_buf(),
        tensor: name.to_string(),
    })?;
    match shape.len() == rank && !shape.contains(&0) {
        true => Ok(shape.clone()),
        false => Err(Error::checkpoint(
            path,
            format!("tensor {name:?} is {shape:?}; expected {rank} positive dimensions"),
        )),
    }
}

/// The config of a Qwen-Image DiT whose tensors (diffusers names) have the shapes `tensors`.
fn infer_dit_config(
    path: &Path,
    tensors: &BTreeMap<String, Vec<usize>>,
) -> Result<QwenImageConfig> {
    let dims = |name: &str, rank: usize| dims(path, tensors, name, rank);
    let img_in = dims("img_in.weight", 2)?; // [dim, in_channels]
    let txt_in = dims("txt_in.weight", 2)?; // [dim, joint_attention_dim]
    let proj_out = dims("proj_out.weight", 2)?; // [4·out_channels, dim]
    let head_dim = dims("transformer_blocks.0.attn.norm_q.weight", 1)?[0];
    let dim = img_in[0];
    if dim % head_dim != 0 || head_dim % 32 != 0 {
        return Err(Error::checkpoint(
            path,
            format!(
                "the q norm's head size {head_dim} does not divide dim {dim} into heads of a multiple of 32 (the file carries no config, and Qwen-Image's RoPE axes (16, 56, 56) of a 128 head scale only to those)"
            ),
        ));
    }
    let layers = (0..)
        .take_while(|i| tensors.contains_key(&format!("transformer_blocks.{i}.img_mod.1.weight")))
        .count();
    let json = json!({
        "_class_name": CLASS_NAME,
        "patch_size": super::PATCH,
        "in_channels": img_in[1],
        "out_channels": proj_out[0] / (super::PATCH * super::PATCH),
        "num_layers": layers,
        "attention_head_dim": head_dim,
        "num_attention_heads": dim / head_dim,
        "joint_attention_dim": txt_in[1],
        "axes_dims_rope": [head_dim / 8, 7 * head_dim / 16, 7 * head_dim / 16],
    });
    QwenImageConfig::from_json(path, &json)
}

/// Open a single-file Qwen-Image VAE (original Wan 2.1 names or diffusers'): its config
/// inferred from the decoder's shapes, its tensors under diffusers' names.
pub fn open_vae_file(path: &Path) -> Result<QwenVaeWeights> {
    let stored = safetensors::read_map(path)?;
    let wan = stored.contains_key(WAN_ANCHOR);
    if !wan && !stored.contains_key(DIFFUSERS_ANCHOR) {
        return Err(Error::checkpoint(
            path,
            format!("unknown layout: expected tensor {WAN_ANCHOR} (a Wan 2.1 / Qwen-Image VAE, original names) or {DIFFUSERS_ANCHOR} (diffusers names)"),
        ));
    }
    let per_level = match wan {
        true => wan_level_size(path, &stored)?,
        false => 0,
    };
    let tensors: BTreeMap<String, HostTensor> = stored
        .values()
        .map(|t| {
            let name = match wan {
                true => wan_to_diffusers(&t.name, per_level),
                false => t.name.clone(),
            };
            (name.clone(), t.renamed(name))
        })
        .collect();
    let config = infer_vae_config(path, &safetensors::shapes(&tensors))?;
    Ok(QwenVaeWeights {
        path: path.to_path_buf(),
        config,
        tensors,
    })
}

/// Entries of the original decoder's flat `upsamples` list per level: its residual blocks
/// and the upsampler (`resample`) that ends every level but the last; from where the first
/// upsampler sits.
fn wan_level_size(path: &Path, stored: &BTreeMap<String, HostTensor>) -> Result<usize> {
    let first_resample = stored
        .keys()
        .filter_map(|k| k.strip_prefix("decoder.upsamples.")?.split_once(".resample."))
        .filter_map(|(k, _)| k.parse::<usize>().ok())
        .min()
        .ok_or_else(|| {
            Error::checkpoint(
                path,
                "unknown layout: expected decoder.upsamples.N.resample.1.weight (the decoder's first upsampler)",
            )
        })?;
    Ok(first_resample + 1)
}

/// The diffusers name of the original Wan 2.1 VAE tensor `name`; `per_level` entries of the
/// decoder's `upsamples` make a level ([`wan_level_size`]).
fn wan_to_diffusers(name: &str, per_level: usize) -> String {
    let residual = |rest: &str| -> String {
        for (from, to) in [
            ("residual.0.", "norm1."),
            ("residual.2.", "conv1."),
            ("residual.3.", "norm2."),
            ("residual.6.", "conv2."),
            ("shortcut.", "conv_shortcut."),
        ] {
            if let Some(tail) = rest.strip_prefix(from) {
                return format!("{to}{tail}");
            }
        }
        rest.to_string()
    };
    for (from, to) in [("conv1.", "quant_conv."), ("conv2.", "post_quant_conv.")] {
        if let Some(tail) = name.strip_prefix(from) {
            return format!("{to}{tail}");
        }
    }
    let Some((coder, rest)) = name.split_once('.') else {
        return name.to_string();
    };
    if !matches!(coder, "encoder" | "decoder") {
        return name.to_string();
    }
    if let Some(tail) = rest.strip_prefix("conv1.") {
        return format!("{coder}.conv_in.{tail}");
    }
    for (from, to) in [("head.0.", "norm_out."), ("head.2.", "conv_out.")] {
        if let Some(tail) = rest.strip_prefix(from) {
            return format!("{coder}.{to}{tail}");
        }
    }
    if let Some(mid) = rest.strip_prefix("middle.") {
        return match mid.split_once('.') {
            Some(("0", tail)) => format!("{coder}.mid_block.resnets.0.{}", residual(tail)),
            Some(("2", tail)) => format!("{coder}.mid_block.resnets.1.{}", residual(tail)),
            Some(("1", tail)) => format!("{coder}.mid_block.attentions.0.{tail}"),
            _ => name.to_string(),
        };
    }
    if let Some(down) = rest.strip_prefix("downsamples.") {
        if let Some((k, tail)) = down.split_once('.') {
            return format!("{coder}.down_blocks.{k}.{}", residual(tail));
        }
    }
    if let Some(up) = rest.strip_prefix("upsamples.") {
        let Some((k, tail)) = up.split_once('.') else {
            return name.to_string();
        };
        let Ok(k) = k.parse::<usize>() else {
            return name.to_string();
        };
        let (level, j) = (k / per_level, k % per_level);
        return match tail.starts_with("resample.") || tail.starts_with("time_conv.") {
            true => format!("{coder}.up_blocks.{level}.upsamplers.0.{tail}"),
            false => format!("{coder}.up_blocks.{level}.resnets.{j}.{}", residual(tail)),
        };
    }
    name.to_string()
}

/// The config of a Qwen-Image VAE whose tensors (diffusers names) have the shapes `tensors`.
fn infer_vae_config(path: &Path, tensors: &BTreeMap<String, Vec<usize>>) -> Result<QwenVaeConfig> {
    let dims = |name: &str, rank: usize| dims(path, tensors, name, rank);
    let z_dim = dims("post_quant_conv.weight", 5)?[0]; // [z, z, 1, 1, 1]
    let conv_out = dims("decoder.conv_out.weight", 5)?; // [3, base_dim, 3, 3, 3]
    let (input_channels, base_dim) = (conv_out[0], conv_out[1]);
    let conv1 = |i: usize| format!("decoder.up_blocks.{i}.resnets.0.conv1.weight");
    let levels = (0..)
        .take_while(|&i| tensors.contains_key(&conv1(i)))
        .count();
    let mut dim_mult = Vec::with_capacity(levels);
    for i in (0..levels).rev() {
        let out = dims(&conv1(i), 5)?[0];
        if out % base_dim != 0 {
            return Err(Error::checkpoint(
                path,
                format!("tensor {:?} has {out} output channels; expected a multiple of the decoder's {base_dim}", conv1(i)),
            ));
        }
        dim_mult.push(out / base_dim);
    }
    let resnets = (0..)
        .take_while(|j| {
            tensors.contains_key(&format!("decoder.up_blocks.0.resnets.{j}.conv1.weight"))
        })
        .count();
    // The decoder's level i upsamples in time when encoder level `levels - 2 - i` downsampled.
    let temperal_downsample: Vec<bool> = (0..levels.saturating_sub(1))
        .rev()
        .map(|i| {
            tensors.contains_key(&format!(
                "decoder.up_blocks.{i}.upsamplers.0.time_conv.weight"
            ))
        })
        .collect();
    let json = json!({
        "base_dim": base_dim,
        "z_dim": z_dim,
        "dim_mult": dim_mult,
        "num_res_blocks": resnets.saturating_sub(1),
        "attn_scales": [],
        "temperal_downsample": temperal_downsample,
        "input_channels": input_channels,
    });
    QwenVaeConfig::from_json(path, &json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wan_decoder_names_map_to_diffusers() {
        // Qwen-Image's decoder: 2 residual blocks a level, so 3 + an upsampler = 4 entries.
        let cases = [
            ("conv2.weight", "post_quant_conv.weight"),
            ("conv1.bias", "quant_conv.bias"),
            ("decoder.conv1.weight", "decoder.conv_in.weight"),
            (
                "decoder.middle.0.residual.0.gamma",
                "decoder.mid_block.resnets.0.norm1.gamma",
            ),
            (
                "decoder.middle.2.residual.6.bias",
                "decoder.mid_block.resnets.1.conv2.bias",
            ),
            (
                "decoder.middle.1.to_qkv.weight",
                "decoder.mid_block.attentions.0.to_qkv.weight",
            ),
            (
                "decoder.upsamples.0.residual.2.weight",
                "decoder.up_blocks.0.resnets.0.conv1.weight",
            ),
            (
                "decoder.upsamples.3.resample.1.weight",
                "decoder.up_blocks.0.upsamplers.0.resample.1.weight",
            ),
            (
                "decoder.upsamples.3.time_conv.bias",
                "decoder.up_blocks.0.upsamplers.0.time_conv.bias",
            ),
            (
                "decoder.upsamples.4.shortcut.weight",
                "decoder.up_blocks.1.resnets.0.conv_shortcut.weight",
            ),
            (
                "decoder.upsamples.6.residual.3.gamma",
                "decoder.up_blocks.1.resnets.2.norm2.gamma",
            ),
            (
                "decoder.upsamples.14.residual.6.weight",
                "decoder.up_blocks.3.resnets.2.conv2.weight",
            ),
            ("decoder.head.0.gamma", "decoder.norm_out.gamma"),
            ("decoder.head.2.bias", "decoder.conv_out.bias"),
            (
                "encoder.downsamples.2.residual.0.gamma",
                "encoder.down_blocks.2.norm1.gamma",
            ),
            ("encoder.head.2.weight", "encoder.conv_out.weight"),
        ];
        for (from, to) in cases {
            assert_eq!(wan_to_diffusers(from, 4), to, "{from}");
        }
        // One residual block a level: 2 + an upsampler.
        assert_eq!(
            wan_to_diffusers("decoder.upsamples.4.residual.2.weight", 3),
            "decoder.up_blocks.1.resnets.1.conv1.weight"
        );
    }
}
