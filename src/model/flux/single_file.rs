//! Flux.1's DiT as one `.safetensors` file, as ComfyUI loads it
//! (`diffusion_models/flux1-dev.safetensors`): Black Forest Labs' original names, which
//! diffusers' `convert_flux_transformer_checkpoint_to_diffusers` maps to its own, or a
//! diffusers state dict saved as one file; either behind an optional `model.diffusion_model.`
//! prefix. The file carries no config: the shapes give the sizes, the RoPE axes are Flux.1's
//! (16, 56, 56) of a 128 head (in proportion for other head sizes that are multiples of 32).
//!
//! BFL → diffusers:
//!
//! | BFL | diffusers |
//! |---|---|
//! | `img_in`, `txt_in` | `x_embedder`, `context_embedder` |
//! | `time_in.{in,out}_layer` | `time_text_embed.timestep_embedder.linear_{1,2}` |
//! | `vector_in.{in,out}_layer` | `time_text_embed.text_embedder.linear_{1,2}` |
//! | `guidance_in.{in,out}_layer` (dev only) | `time_text_embed.guidance_embedder.linear_{1,2}` |
//! | `double_blocks.N.img_mod.lin`, `txt_mod.lin` | `transformer_blocks.N.norm1.linear`, `norm1_context.linear` |
//! | `….img_attn.qkv` `[3·dim, …]` | `attn.to_q`, `to_k`, `to_v` (its row thirds) |
//! | `….txt_attn.qkv` | `attn.add_q_proj`, `add_k_proj`, `add_v_proj` |
//! | `….img_attn.norm.{query,key}_norm.scale` | `attn.norm_q`, `norm_k` `.weight` |
//! | `….txt_attn.norm.{query,key}_norm.scale` | `attn.norm_added_q`, `norm_added_k` `.weight` |
//! | `….img_attn.proj`, `txt_attn.proj` | `attn.to_out.0`, `attn.to_add_out` |
//! | `….img_mlp.{0,2}`, `txt_mlp.{0,2}` | `ff.net.0.proj`, `ff.net.2`; `ff_context.…` |
//! | `single_blocks.N.linear1` `[3·dim + mlp, …]` | `single_transformer_blocks.N.attn.to_q`, `to_k`, `to_v`, `proj_mlp` (row views) |
//! | `….linear2`, `….modulation.lin` | `proj_out`, `norm.linear` |
//! | `….norm.{query,key}_norm.scale` | `attn.norm_q`, `norm_k` `.weight` |
//! | `final_layer.linear` | `proj_out` |
//! | `final_layer.adaLN_modulation.1` | `norm_out.linear`, its row halves swapped (BFL: shift, scale; diffusers: scale, shift) — a copy |

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde_json::json;

use super::{FluxConfig, CLASS_NAME};
use crate::checkpoint::{safetensors, Component, HostTensor, Storage};
use crate::error::{Error, Result};

/// Names that tell the layouts apart (after the prefix): BFL's and diffusers'.
const BFL_ANCHOR: &str = "double_blocks.0.img_attn.qkv.weight";
const DIFFUSERS_ANCHOR: &str = "single_transformer_blocks.0.proj_mlp.weight";
/// BFL's image embedder: the model width is its rows.
const BFL_IMG_IN: &str = "img_in.weight";

/// Whether the safetensors header `tensors` holds a Flux.1 DiT (either layout).
pub fn is_dit<T>(tensors: &BTreeMap<String, T>) -> bool {
    safetensors::prefix_before(tensors, BFL_ANCHOR).is_some()
        || safetensors::prefix_before(tensors, DIFFUSERS_ANCHOR).is_some()
}

/// Open a single-file Flux.1 DiT: its config inferred from the shapes, its tensors under
/// diffusers' names (views of the file's bytes; the fused projections split by rows; the
/// final modulation's halves swapped in a copy).
pub fn open_dit_file(path: &Path) -> Result<(FluxConfig, Component)> {
    let stored = safetensors::read_map(path)?;
    let (prefix, bfl) = match safetensors::prefix_before(&stored, BFL_ANCHOR) {
        Some(p) => (p, true),
        None => match safetensors::prefix_before(&stored, DIFFUSERS_ANCHOR) {
            Some(p) => (p, false),
            None => {
                return Err(Error::checkpoint(
                    path,
                    format!("unknown layout: expected tensor {BFL_ANCHOR} (a Flux.1 diffusion model, Black Forest Labs' names) or {DIFFUSERS_ANCHOR} (diffusers names)"),
                ))
            }
        },
    };
    let dim = match bfl {
        true => {
            let img_in = stored
                .get(&format!("{prefix}{BFL_IMG_IN}"))
                .ok_or_else(|| Error::MissingTensor {
                    path: path.to_path_buf(),
                    tensor: format!("{prefix}{BFL_IMG_IN}"),
                })?;
            match img_in.shape[..] {
                [dim, _] if dim > 0 => dim,
                _ => {
                    return Err(Error::checkpoint(
                        path,
                        format!(
                            "tensor {BFL_IMG_IN:?} is {:?}; expected [dim, in_channels]",
                            img_in.shape
                        ),
                    ))
                }
            }
        }
        false => 0,
    };
    let mut tensors = BTreeMap::new();
    for (name, t) in &stored {
        let Some(name) = name.strip_prefix(&prefix) else {
            continue; // another model's tensors in the same file
        };
        let mapped = match bfl {
            true => diffusers_tensors(path, name, t, dim)?,
            false => vec![t.renamed(name)],
        };
        for t in mapped {
            tensors.insert(t.name.clone(), t);
        }
    }
    let config = infer_config(path, &safetensors::shapes(&tensors))?;
    Ok((config, Component::from_file("transformer", path, tensors)))
}

/// Where a BFL tensor goes among diffusers' names.
#[derive(Debug, PartialEq)]
pub(crate) enum Target {
    /// The same bytes, renamed.
    One(String),
    /// Row thirds: q, k, v.
    Thirds([String; 3]),
    /// A single block's `linear1`: `dim` rows each of q, k, v, then the MLP's rows.
    Linear1([String; 4]),
    /// Its two row halves swapped (shift, scale → scale, shift).
    Swapped(String),
}

/// The diffusers target of the BFL tensor `name` (after the prefix); a name not in the
/// table is kept as it is.
pub(crate) fn diffusers_target(name: &str) -> Target {
    let one = |s: String| Target::One(s);
    // (weight or bias, or a norm's scale), and what comes before it.
    let Some((stem, leaf)) = name.rsplit_once('.') else {
        return one(name.to_string());
    };
    for (from, to) in [
        ("img_in", "x_embedder"),
        ("txt_in", "context_embedder"),
        (
            "time_in.in_layer",
            "time_text_embed.timestep_embedder.linear_1",
        ),
        (
            "time_in.out_layer",
            "time_text_embed.timestep_embedder.linear_2",
        ),
        (
            "vector_in.in_layer",
            "time_text_embed.text_embedder.linear_1",
        ),
        (
            "vector_in.out_layer",
            "time_text_embed.text_embedder.linear_2",
        ),
        (
            "guidance_in.in_layer",
            "time_text_embed.guidance_embedder.linear_1",
        ),
        (
            "guidance_in.out_layer",
            "time_text_embed.guidance_embedder.linear_2",
        ),
        ("final_layer.linear", "proj_out"),
    ] {
        if stem == from {
            return one(format!("{to}.{leaf}"));
        }
    }
    if stem == "final_layer.adaLN_modulation.1" {
        return Target::Swapped(format!("norm_out.linear.{leaf}"));
    }
    if let Some(rest) = name.strip_prefix("double_blocks.") {
        let Some((i, rest)) = rest.split_once('.') else {
            return one(name.to_string());
        };
        let b = format!("transformer_blocks.{i}");
        let (stem, leaf) = rest.rsplit_once('.').unwrap_or((rest, ""));
        let to = match stem {
            "img_mod.lin" => "norm1.linear",
            "txt_mod.lin" => "norm1_context.linear",
            "img_attn.qkv" => {
                return Target::Thirds(
                    ["to_q", "to_k", "to_v"].map(|p| format!("{b}.attn.{p}.{leaf}")),
                )
            }
            "txt_attn.qkv" => {
                return Target::Thirds(
                    ["add_q_proj", "add_k_proj", "add_v_proj"]
                        .map(|p| format!("{b}.attn.{p}.{leaf}")),
                )
            }
            "img_attn.norm.query_norm" => return one(format!("{b}.attn.norm_q.weight")),
            "img_attn.norm.key_norm" => return one(format!("{b}.attn.norm_k.weight")),
            "txt_attn.norm.query_norm" => return one(format!("{b}.attn.norm_added_q.weight")),
            "txt_attn.norm.key_norm" => return one(format!("{b}.attn.norm_added_k.weight")),
            "img_attn.proj" => "attn.to_out.0",
            "txt_attn.proj" => "attn.to_add_out",
            "img_mlp.0" => "ff.net.0.proj",
            "img_mlp.2" => "ff.net.2",
            "txt_mlp.0" => "ff_context.net.0.proj",
            "txt_mlp.2" => "ff_context.net.2",
            _ => return one(name.to_string()),
        };
        return one(format!("{b}.{to}.{leaf}"));
    }
    if let Some(rest) = name.strip_prefix("single_blocks.") {
        let Some((i, rest)) = rest.split_once('.') else {
            return one(name.to_string());
        };
        let b = format!("single_transformer_blocks.{i}");
        let (stem, leaf) = rest.rsplit_once('.').unwrap_or((rest, ""));
        let to = match stem {
            "linear1" => {
                return Target::Linear1(
                    ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]
                        .map(|p| format!("{b}.{p}.{leaf}")),
                )
            }
            "linear2" => "proj_out",
            "modulation.lin" => "norm.linear",
            "norm.query_norm" => return one(format!("{b}.attn.norm_q.weight")),
            "norm.key_norm" => return one(format!("{b}.attn.norm_k.weight")),
            _ => return one(name.to_string()),
        };
        return one(format!("{b}.{to}.{leaf}"));
    }
    one(name.to_string())
}

/// The diffusers tensors that the BFL tensor `name` (`t`) becomes; `dim` is the model
/// width (`img_in`'s rows).
fn diffusers_tensors(
    path: &Path,
    name: &str,
    t: &HostTensor,
    dim: usize,
) -> Result<Vec<HostTensor>> {
    let rows = t.shape.first().copied().unwrap_or(0);
    let fused = |expected: &str| {
        Error::checkpoint(
            path,
            format!("tensor {name:?} is {:?}; expected {expected}", t.shape),
        )
    };
    Ok(match diffusers_target(name) {
        Target::One(to) => vec![t.renamed(to)],
        Target::Thirds(to) => {
            if t.shape.is_empty() || rows % 3 != 0 {
                return Err(fused("[3·dim, …] (q, k and v stacked)"));
            }
            let third = rows / 3;
            to.into_iter()
                .enumerate()
                .map(|(i, n)| t.rows(n, i * third, third))
                .collect()
        }
        Target::Linear1(to) => {
            if t.shape.is_empty() || rows <= 3 * dim {
                return Err(fused(&format!(
                    "[3·{dim} + mlp, …] (q, k, v and the MLP's input stacked)"
                )));
            }
            let [q, k, v, mlp] = to;
            vec![
                t.rows(q, 0, dim),
                t.rows(k, dim, dim),
                t.rows(v, 2 * dim, dim),
                t.rows(mlp, 3 * dim, rows - 3 * dim),
            ]
        }
        Target::Swapped(to) => {
            if t.shape.is_empty() || rows % 2 != 0 {
                return Err(fused("[2·dim, …] (shift and scale stacked)"));
            }
            vec![swap_halves(t, to)]
        }
    })
}

/// `t` with its two row halves swapped, in a buffer of its own, called `name`.
fn swap_halves(t: &HostTensor, name: String) -> HostTensor {
    let bytes = t.bytes();
    let half = bytes.len() / 2;
    let mut storage = Storage::owned(bytes.len());
    let out = storage.bytes_mut().expect("owned storage is writable");
    out[..half].copy_from_slice(&bytes[half..]);
    out[half..].copy_from_slice(&bytes[..half]);
    let len = bytes.len();
    HostTensor::new(name, t.dtype, t.shape.clone(), Arc::new(storage), 0, len)
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

/// The config of a Flux DiT whose tensors (diffusers names) have the shapes `tensors`.
fn infer_config(path: &Path, tensors: &BTreeMap<String, Vec<usize>>) -> Result<FluxConfig> {
    let dims = |name: &str, rank: usize| dims(path, tensors, name, rank);
    let x_embedder = dims("x_embedder.weight", 2)?; // [dim, in_channels]
    let context = dims("context_embedder.weight", 2)?; // [dim, joint_attention_dim]
    let pooled = dims("time_text_embed.text_embedder.linear_1.weight", 2)?; // [dim, pooled]
    let proj_out = dims("proj_out.weight", 2)?; // [out_channels, dim]
    let head_dim = dims("transformer_blocks.0.attn.norm_q.weight", 1)?[0];
    let ff = dims("transformer_blocks.0.ff.net.0.proj.weight", 2)?; // [mlp, dim]
    let dim = x_embedder[0];
    if dim % head_dim != 0 || head_dim % 32 != 0 {
        return Err(Error::checkpoint(
            path,
            format!(
                "the q norm's head size {head_dim} does not divide dim {dim} into heads of a multiple of 32 (the file carries no config, and Flux.1's RoPE axes (16, 56, 56) of a 128 head scale only to those)"
            ),
        ));
    }
    if ff[0] != 4 * dim {
        return Err(Error::checkpoint(
            path,
            format!(
                "the MLP is {} wide for dim {dim}; expected 4·dim (Flux.1's mlp_ratio 4)",
                ff[0]
            ),
        ));
    }
    let count =
        |f: &dyn Fn(usize) -> String| (0..).take_while(|&i| tensors.contains_key(&f(i))).count();
    let json = json!({
        "_class_name": CLASS_NAME,
        "patch_size": 1,
        "in_channels": x_embedder[1],
        "out_channels": proj_out[0],
        "num_layers": count(&|i| format!("transformer_blocks.{i}.norm1.linear.weight")),
        "num_single_layers": count(&|i| format!("single_transformer_blocks.{i}.norm.linear.weight")),
        "attention_head_dim": head_dim,
        "num_attention_heads": dim / head_dim,
        "joint_attention_dim": context[1],
        "pooled_projection_dim": pooled[1],
        "guidance_embeds": tensors.contains_key("time_text_embed.guidance_embedder.linear_1.weight"),
        "axes_dims_rope": [head_dim / 8, 7 * head_dim / 16, 7 * head_dim / 16],
    });
    FluxConfig::from_json(path, &json)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// diffusers' `convert_flux_transformer_checkpoint_to_diffusers` (diffusers 0.42.1),
    /// transcribed: every BFL name of one double and one single block and the rest.
    #[test]
    fn bfl_names_map_as_diffusers_converts_them() {
        let one = |s: &str| Target::One(s.to_string());
        let cases = [
            (
                "time_in.in_layer.weight",
                one("time_text_embed.timestep_embedder.linear_1.weight"),
            ),
            (
                "time_in.in_layer.bias",
                one("time_text_embed.timestep_embedder.linear_1.bias"),
            ),
            (
                "time_in.out_layer.weight",
                one("time_text_embed.timestep_embedder.linear_2.weight"),
            ),
            (
                "time_in.out_layer.bias",
                one("time_text_embed.timestep_embedder.linear_2.bias"),
            ),
            (
                "vector_in.in_layer.weight",
                one("time_text_embed.text_embedder.linear_1.weight"),
            ),
            (
                "vector_in.in_layer.bias",
                one("time_text_embed.text_embedder.linear_1.bias"),
            ),
            (
                "vector_in.out_layer.weight",
                one("time_text_embed.text_embedder.linear_2.weight"),
            ),
            (
                "vector_in.out_layer.bias",
                one("time_text_embed.text_embedder.linear_2.bias"),
            ),
            (
                "guidance_in.in_layer.weight",
                one("time_text_embed.guidance_embedder.linear_1.weight"),
            ),
            (
                "guidance_in.in_layer.bias",
                one("time_text_embed.guidance_embedder.linear_1.bias"),
            ),
            (
                "guidance_in.out_layer.weight",
                one("time_text_embed.guidance_embedder.linear_2.weight"),
            ),
            (
                "guidance_in.out_layer.bias",
                one("time_text_embed.guidance_embedder.linear_2.bias"),
            ),
            ("txt_in.weight", one("context_embedder.weight")),
            ("txt_in.bias", one("context_embedder.bias")),
            ("img_in.weight", one("x_embedder.weight")),
            ("img_in.bias", one("x_embedder.bias")),
            (
                "double_blocks.3.img_mod.lin.weight",
                one("transformer_blocks.3.norm1.linear.weight"),
            ),
            (
                "double_blocks.3.img_mod.lin.bias",
                one("transformer_blocks.3.norm1.linear.bias"),
            ),
            (
                "double_blocks.3.txt_mod.lin.weight",
                one("transformer_blocks.3.norm1_context.linear.weight"),
            ),
            (
                "double_blocks.3.txt_mod.lin.bias",
                one("transformer_blocks.3.norm1_context.linear.bias"),
            ),
            (
                "double_blocks.3.img_attn.norm.query_norm.scale",
                one("transformer_blocks.3.attn.norm_q.weight"),
            ),
            (
                "double_blocks.3.img_attn.norm.key_norm.scale",
                one("transformer_blocks.3.attn.norm_k.weight"),
            ),
            (
                "double_blocks.3.txt_attn.norm.query_norm.scale",
                one("transformer_blocks.3.attn.norm_added_q.weight"),
            ),
            (
                "double_blocks.3.txt_attn.norm.key_norm.scale",
                one("transformer_blocks.3.attn.norm_added_k.weight"),
            ),
            (
                "double_blocks.3.img_mlp.0.weight",
                one("transformer_blocks.3.ff.net.0.proj.weight"),
            ),
            (
                "double_blocks.3.img_mlp.0.bias",
                one("transformer_blocks.3.ff.net.0.proj.bias"),
            ),
            (
                "double_blocks.3.img_mlp.2.weight",
                one("transformer_blocks.3.ff.net.2.weight"),
            ),
            (
                "double_blocks.3.img_mlp.2.bias",
                one("transformer_blocks.3.ff.net.2.bias"),
            ),
            (
                "double_blocks.3.txt_mlp.0.weight",
                one("transformer_blocks.3.ff_context.net.0.proj.weight"),
            ),
            (
                "double_blocks.3.txt_mlp.0.bias",
                one("transformer_blocks.3.ff_context.net.0.proj.bias"),
            ),
            (
                "double_blocks.3.txt_mlp.2.weight",
                one("transformer_blocks.3.ff_context.net.2.weight"),
            ),
            (
                "double_blocks.3.txt_mlp.2.bias",
                one("transformer_blocks.3.ff_context.net.2.bias"),
            ),
            (
                "double_blocks.3.img_attn.proj.weight",
                one("transformer_blocks.3.attn.to_out.0.weight"),
            ),
            (
                "double_blocks.3.img_attn.proj.bias",
                one("transformer_blocks.3.attn.to_out.0.bias"),
            ),
            (
                "double_blocks.3.txt_attn.proj.weight",
                one("transformer_blocks.3.attn.to_add_out.weight"),
            ),
            (
                "double_blocks.3.txt_attn.proj.bias",
                one("transformer_blocks.3.attn.to_add_out.bias"),
            ),
            (
                "single_blocks.7.modulation.lin.weight",
                one("single_transformer_blocks.7.norm.linear.weight"),
            ),
            (
                "single_blocks.7.modulation.lin.bias",
                one("single_transformer_blocks.7.norm.linear.bias"),
            ),
            (
                "single_blocks.7.norm.query_norm.scale",
                one("single_transformer_blocks.7.attn.norm_q.weight"),
            ),
            (
                "single_blocks.7.norm.key_norm.scale",
                one("single_transformer_blocks.7.attn.norm_k.weight"),
            ),
            (
                "single_blocks.7.linear2.weight",
                one("single_transformer_blocks.7.proj_out.weight"),
            ),
            (
                "single_blocks.7.linear2.bias",
                one("single_transformer_blocks.7.proj_out.bias"),
            ),
            ("final_layer.linear.weight", one("proj_out.weight")),
            ("final_layer.linear.bias", one("proj_out.bias")),
            (
                "final_layer.adaLN_modulation.1.weight",
                Target::Swapped("norm_out.linear.weight".into()),
            ),
            (
                "final_layer.adaLN_modulation.1.bias",
                Target::Swapped("norm_out.linear.bias".into()),
            ),
        ];
        for (from, to) in cases {
            assert_eq!(diffusers_target(from), to, "{from}");
        }
        let names = |p: &str, parts: &[&str], leaf: &str| -> Vec<String> {
            parts.iter().map(|s| format!("{p}{s}.{leaf}")).collect()
        };
        for leaf in ["weight", "bias"] {
            let b = "transformer_blocks.3.attn.";
            let Target::Thirds(img) =
                diffusers_target(&format!("double_blocks.3.img_attn.qkv.{leaf}"))
            else {
                panic!("img qkv splits in thirds");
            };
            assert_eq!(img.to_vec(), names(b, &["to_q", "to_k", "to_v"], leaf));
            let Target::Thirds(txt) =
                diffusers_target(&format!("double_blocks.3.txt_attn.qkv.{leaf}"))
            else {
                panic!("txt qkv splits in thirds");
            };
            assert_eq!(
                txt.to_vec(),
                names(b, &["add_q_proj", "add_k_proj", "add_v_proj"], leaf)
            );
            let Target::Linear1(single) =
                diffusers_target(&format!("single_blocks.7.linear1.{leaf}"))
            else {
                panic!("linear1 splits in four");
            };
            let s = "single_transformer_blocks.7.";
            assert_eq!(
                single.to_vec(),
                names(
                    s,
                    &["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
                    leaf
                )
            );
        }
    }

    #[test]
    fn the_final_modulation_swaps_its_halves() {
        let mut storage = Storage::owned(16);
        let values: Vec<u8> = [1f32, 2.0, 3.0, 4.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        storage.bytes_mut().unwrap().copy_from_slice(&values);
        let t = HostTensor::new(
            "b".into(),
            crate::checkpoint::DType::F32,
            vec![4],
            Arc::new(storage),
            0,
            16,
        );
        let path = Path::new("flux.safetensors");
        let out = diffusers_tensors(path, "final_layer.adaLN_modulation.1.bias", &t, 2).unwrap();
        assert_eq!(out[0].name, "norm_out.linear.bias");
        assert_eq!(out[0].to_f32(), [3.0, 4.0, 1.0, 2.0]);
        let split = diffusers_tensors(path, "single_blocks.0.linear1.bias", &t, 1).unwrap();
        let got: Vec<Vec<f32>> = split.iter().map(HostTensor::to_f32).collect();
        assert_eq!(got, [vec![1.0], vec![2.0], vec![3.0], vec![4.0]]);
    }
}
