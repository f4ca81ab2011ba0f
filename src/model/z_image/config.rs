//! The Z-Image transformer's config.json (diffusers `ZImageTransformer2DModel`).

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};

#[derive(Clone, Debug, PartialEq)]
pub struct ZImageConfig {
    pub in_channels: usize,
    pub dim: usize,
    pub n_heads: usize,
    pub n_layers: usize,
    pub n_refiner_layers: usize,
    pub norm_eps: f64,
    pub qk_norm: bool,
    pub cap_feat_dim: usize,
    pub rope_theta: f64,
    pub t_scale: f64,
    /// Per RoPE axis (caption/frame index, row, column), the head dims it rotates.
    pub axes_dims: Vec<usize>,
    /// Spatial patch size (2: 2×2 latent pixels per token).
    pub patch: usize,
}

#[derive(Deserialize)]
struct Raw {
    #[serde(rename = "_class_name")]
    class_name: Option<String>,
    in_channels: usize,
    dim: usize,
    n_heads: usize,
    n_layers: usize,
    n_refiner_layers: usize,
    norm_eps: f64,
    qk_norm: bool,
    cap_feat_dim: usize,
    rope_theta: f64,
    t_scale: f64,
    axes_dims: Vec<usize>,
    all_patch_size: Vec<usize>,
    all_f_patch_size: Vec<usize>,
    siglip_feat_dim: Option<usize>,
}

impl ZImageConfig {
    /// Parse the transformer component's config.json, `path` named in errors.
    pub fn from_json(path: &Path, json: &Value) -> Result<ZImageConfig> {
        let r: Raw = serde_json::from_value(json.clone()).map_err(|e| Error::Json {
            path: path.to_path_buf(),
            message: format!("Z-Image transformer config: {e}"),
        })?;
        let bad = |m: String| Error::checkpoint(path, m);
        if let Some(class) = r
            .class_name
            .as_deref()
            .filter(|c| *c != "ZImageTransformer2DModel")
        {
            return Err(bad(format!(
                "transformer class {class:?} is not supported; expected \"ZImageTransformer2DModel\""
            )));
        }
        if r.siglip_feat_dim.is_some() {
            return Err(bad(
                "siglip_feat_dim is set (Z-Image Omni); only the text-to-image model is supported"
                    .into(),
            ));
        }
        if r.all_patch_size != [2] || r.all_f_patch_size != [1] {
            return Err(bad(format!(
                "all_patch_size {:?} / all_f_patch_size {:?}: expected [2] and [1]",
                r.all_patch_size, r.all_f_patch_size
            )));
        }
        if r.n_heads == 0 || r.dim % r.n_heads != 0 || (r.dim / r.n_heads) % 2 != 0 {
            return Err(bad(format!(
                "dim {} must split into n_heads {} heads of an even size",
                r.dim, r.n_heads
            )));
        }
        if r.axes_dims.len() != 3
            || r.axes_dims.iter().sum::<usize>() != r.dim / r.n_heads
            || r.axes_dims.iter().any(|d| d % 2 != 0)
        {
            return Err(bad(format!(
                "axes_dims {:?} must be three even sizes adding up to the head size {}",
                r.axes_dims,
                r.dim / r.n_heads
            )));
        }
        for (name, v) in [
            ("in_channels", r.in_channels),
            ("cap_feat_dim", r.cap_feat_dim),
            ("n_layers", r.n_layers),
        ] {
            if v == 0 {
                return Err(bad(format!("{name} is 0; expected a positive size")));
            }
        }
        Ok(ZImageConfig {
            in_channels: r.in_channels,
            dim: r.dim,
            n_heads: r.n_heads,
            n_layers: r.n_layers,
            n_refiner_layers: r.n_refiner_layers,
            norm_eps: r.norm_eps,
            qk_norm: r.qk_norm,
            cap_feat_dim: r.cap_feat_dim,
            rope_theta: r.rope_theta,
            t_scale: r.t_scale,
            axes_dims: r.axes_dims,
            patch: 2,
        })
    }

    /// The SwiGLU hidden width: `int(dim / 3 · 8)`.
    pub fn ffn_dim(&self) -> usize {
        (self.dim as f64 / 3.0 * 8.0) as usize
    }

    /// The names of the patch embedder and final layer for this patch size.
    pub fn x_embedder(&self) -> String {
        format!("all_x_embedder.{}-1", self.patch)
    }
    pub fn final_layer(&self) -> String {
        format!("all_final_layer.{}-1", self.patch)
    }
}
