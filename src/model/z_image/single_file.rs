//! Z-Image's DiT as one `.safetensors` file, as ComfyUI loads it
//! (`split_files/diffusion_models/z_image_turbo_bf16.safetensors`): the original Tongyi-MAI
//! names, which diffusers' `convert_z_image_transformer_checkpoint_to_diffusers` maps to its
//! own, or a diffusers state dict saved as one file. The file carries no config: the shapes
//! give the sizes, and Z-Image's constants (ComfyUI's `model_detection.py` for dim 3840, the
//! diffusers config of Tongyi-MAI/Z-Image-Turbo) the rest.
//!
//! Original → diffusers, behind an optional `model.diffusion_model.` prefix:
//!
//! | original | diffusers |
//! |---|---|
//! | `x_embedder.*` | `all_x_embedder.2-1.*` |
//! | `final_layer.*` | `all_final_layer.2-1.*` |
//! | `….attention.qkv.weight` `[3·dim, dim]` | `to_q`, `to_k`, `to_v` (its row thirds, in order) |
//! | `….attention.out.weight` | `….attention.to_out.0.weight` |
//! | `….attention.q_norm.weight`, `k_norm` | `norm_q`, `norm_k` |
//! | `norm_final.weight` | (unused; dropped, as diffusers does) |
//!
//! Every other name (`cap_embedder.*`, `t_embedder.mlp.*`, the pad tokens, the blocks'
//! norms, feed-forwards and adaLN) is the same in both.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::json;

use super::config::CLASS_NAME;
use super::ZImageConfig;
use crate::checkpoint::{safetensors, Component, HostTensor};
use crate::error::{Error, Result};

/// Z-Image's patch: a token is 2×2 latent pixels (ComfyUI fixes it too).
const PATCH: usize = 2;
/// Names that tell the layouts apart (after the prefix).
const ANCHOR: &str = "cap_embedder.1.weight";
const ORIGINAL_QKV: &str = "layers.0.attention.qkv.weight";
const DIFFUSERS_Q: &str = "layers.0.attention.to_q.weight";

/// Whether the safetensors header `tensors` holds a Z-Image DiT.
pub fn is_dit<T>(tensors: &BTreeMap<String, T>) -> bool {
    safetensors::prefix_before(tensors, ANCHOR).is_some()
}

/// Open a single-file Z-Image DiT: its config inferred from the shapes, and its tensors
/// under diffusers' names (views of the file's bytes; the fused qkv split by rows).
pub fn open_dit_file(path: &Path) -> Result<(ZImageConfig, Component)> {
    let stored = safetensors::read_map(path)?;
    let prefix = safetensors::prefix_before(&stored, ANCHOR).ok_or_else(|| {
        Error::checkpoint(
            path,
            format!("unknown layout: expected tensor {ANCHOR} (a Z-Image diffusion model's caption embedder)"),
        )
    })?;
    let original = stored.contains_key(&format!("{prefix}{ORIGINAL_QKV}"));
    if !original && !stored.contains_key(&format!("{prefix}{DIFFUSERS_Q}")) {
        return Err(Error::checkpoint(
            path,
            format!(
                "unknown layout: expected tensor {prefix}{ORIGINAL_QKV} (ComfyUI / Tongyi-MAI names) or {prefix}{DIFFUSERS_Q} (diffusers names)"
            ),
        ));
    }
    let mut tensors = BTreeMap::new();
    for (name, t) in &stored {
        let Some(name) = name.strip_prefix(&prefix) else {
            continue; // another model's tensors in the same file
        };
        if !original {
            tensors.insert(name.to_string(), t.renamed(name));
            continue;
        }
        for t in diffusers_tensors(path, name, t)? {
            tensors.insert(t.name.clone(), t);
        }
    }
    let config = infer_config(path, &safetensors::shapes(&tensors))?;
    Ok((config, Component::from_file("transformer", path, tensors)))
}

/// The diffusers tensors that the original tensor `name` becomes (none for `norm_final`).
fn diffusers_tensors(path: &Path, name: &str, t: &HostTensor) -> Result<Vec<HostTensor>> {
    let key = format!("{PATCH}-1");
    if let Some(rest) = name.strip_prefix("x_embedder.") {
        return Ok(vec![t.renamed(format!("all_x_embedder.{key}.{rest}"))]);
    }
    if let Some(rest) = name.strip_prefix("final_layer.") {
        return Ok(vec![t.renamed(format!("all_final_layer.{key}.{rest}"))]);
    }
    if name == "norm_final.weight" {
        return Ok(Vec::new());
    }
    if let Some(block) = name.strip_suffix(".attention.qkv.weight") {
        let rows = t.shape.first().copied().unwrap_or(0);
        if t.shape.len() != 2 || rows % 3 != 0 {
            return Err(Error::checkpoint(
                path,
                format!(
                    "tensor {name:?} is {:?}; expected [3·dim, dim] (q, k and v stacked)",
                    t.shape
                ),
            ));
        }
        let third = rows / 3;
        return Ok(["to_q", "to_k", "to_v"]
            .iter()
            .enumerate()
            .map(|(i, p)| t.rows(format!("{block}.attention.{p}.weight"), i * third, third))
            .collect());
    }
    for (from, to) in [
        (".attention.out.", ".attention.to_out.0."),
        (".attention.q_norm.", ".attention.norm_q."),
        (".attention.k_norm.", ".attention.norm_k."),
    ] {
        if let Some((block, rest)) = name.split_once(from) {
            return Ok(vec![t.renamed(format!("{block}{to}{rest}"))]);
        }
    }
    Ok(vec![t.renamed(name)])
}

/// The config of a Z-Image DiT whose tensors (diffusers names) have the shapes `tensors`: widths and
/// block counts from the shapes; RoPE, timestep scale and norm epsilon are Z-Image's.
fn infer_config(path: &Path, tensors: &BTreeMap<String, Vec<usize>>) -> Result<ZImageConfig> {
    let shape = |name: &str| -> Result<&[usize]> {
        tensors
            .get(name)
            .map(Vec::as_slice)
            .ok_or_else(|| Error::MissingTensor {
                path: path.to_path_buf(),
                tensor: name.to_string(),
            })
    };
    let dims = |name: &str, rank: usize| -> Result<Vec<usize>> {
        let s = shape(name)?;
        match s.len() == rank && !s.contains(&0) {
            true => Ok(s.to_vec()),
            false => Err(Error::checkpoint(
                path,
                format!("tensor {name:?} is {s:?}; expected {rank} positive dimensions"),
            )),
        }
    };
    let cap = dims(ANCHOR, 2)?; // [dim, cap_feat_dim]
    let (dim, cap_feat_dim) = (cap[0], cap[1]);
    let x = dims(&format!("all_x_embedder.{PATCH}-1.weight"), 2)?; // [dim, p²·in]
    let in_channels = x[1] / (PATCH * PATCH);
    let head_dim = dims("layers.0.attention.norm_q.weight", 1)?[0];
    if dim % head_dim != 0 || head_dim % 16 != 0 {
        return Err(Error::checkpoint(
            path,
            format!(
                "the q norm's head size {head_dim} does not divide dim {dim} into heads of a multiple of 16"
            ),
        ));
    }
    let count = |stem: &str| {
        (0..)
            .take_while(|i| tensors.contains_key(&format!("{stem}.{i}.attention_norm1.weight")))
            .count()
    };
    // Z-Image splits a head of 128 as (32, 48, 48) between the caption, row and column axes
    // (ComfyUI's model_detection.py); other head sizes keep the proportions.
    let axes_dims = [head_dim / 4, 3 * head_dim / 8, 3 * head_dim / 8];
    let json = json!({
        "_class_name": CLASS_NAME,
        "all_f_patch_size": [1],
        "all_patch_size": [PATCH],
        "axes_dims": axes_dims,
        "axes_lens": [1536, 512, 512],
        "cap_feat_dim": cap_feat_dim,
        "dim": dim,
        "in_channels": in_channels,
        "n_heads": dim / head_dim,
        "n_kv_heads": dim / head_dim,
        "n_layers": count("layers"),
        "n_refiner_layers": count("noise_refiner"),
        "norm_eps": 1e-5,
        "qk_norm": true,
        "rope_theta": 256.0,
        "siglip_feat_dim": null,
        "t_scale": 1000.0,
    });
    ZImageConfig::from_json(path, &json)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{DType, Storage};
    use std::sync::Arc;

    fn tensor(name: &str, shape: &[usize]) -> HostTensor {
        let n: usize = shape.iter().product();
        let storage = Arc::new(Storage::owned(4 * n));
        HostTensor::new(name.into(), DType::F32, shape.to_vec(), storage, 0, 4 * n)
    }

    #[test]
    fn original_names_map_to_diffusers() {
        let p = Path::new("dit.safetensors");
        let one = |name: &str| {
            let out = diffusers_tensors(p, name, &tensor(name, &[4, 2])).unwrap();
            out.iter().map(|t| t.name.clone()).collect::<Vec<_>>()
        };
        assert_eq!(one("x_embedder.bias"), ["all_x_embedder.2-1.bias"]);
        assert_eq!(
            one("final_layer.adaLN_modulation.1.weight"),
            ["all_final_layer.2-1.adaLN_modulation.1.weight"]
        );
        assert_eq!(
            one("layers.3.attention.out.weight"),
            ["layers.3.attention.to_out.0.weight"]
        );
        assert_eq!(
            one("noise_refiner.0.attention.k_norm.weight"),
            ["noise_refiner.0.attention.norm_k.weight"]
        );
        assert_eq!(one("cap_embedder.0.weight"), ["cap_embedder.0.weight"]);
        assert_eq!(one("t_embedder.mlp.2.bias"), ["t_embedder.mlp.2.bias"]);
        assert_eq!(
            one("context_refiner.1.feed_forward.w2.weight"),
            ["context_refiner.1.feed_forward.w2.weight"]
        );
        assert!(one("norm_final.weight").is_empty());
    }

    /// Z-Image-Turbo's shapes (as `ferry synth` writes them, which diffusers loads) give
    /// its config.json.
    #[test]
    fn turbo_shapes_give_turbo_config() {
        use crate::synth::{PipelineComponent, PipelinePreset};
        let turbo = PipelinePreset::by_name("z-image-turbo").unwrap();
        let shapes = turbo
            .tensors(PipelineComponent::Transformer)
            .into_iter()
            .collect();
        let p = Path::new("dit.safetensors");
        let json = turbo.config(PipelineComponent::Transformer, DType::BF16);
        let want = ZImageConfig::from_json(p, &json).unwrap();
        assert_eq!(infer_config(p, &shapes).unwrap(), want);
    }

    #[test]
    fn fused_qkv_splits_into_row_thirds() {
        let n = 6 * 2;
        let mut storage = Storage::owned(4 * n);
        let bytes = storage.bytes_mut().unwrap();
        for i in 0..n {
            bytes[4 * i..4 * i + 4].copy_from_slice(&(i as f32).to_le_bytes());
        }
        let name = "layers.0.attention.qkv.weight";
        let t = HostTensor::new(
            name.into(),
            DType::F32,
            vec![6, 2],
            Arc::new(storage),
            0,
            4 * n,
        );
        let out = diffusers_tensors(Path::new("x"), name, &t).unwrap();
        let got: Vec<(String, Vec<usize>, Vec<f32>)> = out
            .iter()
            .map(|t| (t.name.clone(), t.shape.clone(), t.to_f32()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "layers.0.attention.to_q.weight".into(),
                    vec![2, 2],
                    vec![0., 1., 2., 3.]
                ),
                (
                    "layers.0.attention.to_k.weight".into(),
                    vec![2, 2],
                    vec![4., 5., 6., 7.]
                ),
                (
                    "layers.0.attention.to_v.weight".into(),
                    vec![2, 2],
                    vec![8., 9., 10., 11.]
                ),
            ]
        );
        let bad = tensor(name, &[5, 2]);
        let e = diffusers_tensors(Path::new("dit.safetensors"), name, &bad).unwrap_err();
        assert!(e.to_string().contains("[3·dim, dim]"), "{e}");
    }
}
