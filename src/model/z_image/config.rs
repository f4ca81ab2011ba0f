//! The transformer component's config.json as diffusers writes it for
//! `ZImageTransformer2DModel`.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::{Error, Result};

#[derive(Clone, Debug, PartialEq)]
pub struct ZImageConfig {
    /// Latent channels (16).
    pub in_channels: usize,
    /// Model width (3840 in Z-Image-Turbo).
    pub dim: usize,
    pub n_heads: usize,
    /// Stored by diffusers but unused: attention has `n_heads` key/value heads.
    pub n_kv_heads: Option<usize>,
    /// Main single-stream blocks.
    pub n_layers: usize,
    /// Blocks of the noise refiner and of the context refiner, each.
    pub n_refiner_layers: usize,
    pub norm_eps: f64,
    /// RMSNorm over each head of q and k.
    pub qk_norm: bool,
    /// Width of the caption features (the text encoder's hidden size).
    pub cap_feat_dim: usize,
    pub rope_theta: f64,
    /// The timestep embedder sees `t · t_scale`.
    pub t_scale: f64,
    /// Head dims rotated by each RoPE axis: (caption index / frame, row, column).
    pub axes_dims: Vec<usize>,
    /// Positions each axis's table covers.
    pub axes_lens: Vec<usize>,
    /// Spatial patch sizes; ferry supports one.
    pub all_patch_size: Vec<usize>,
    /// Temporal patch sizes; images have 1.
    pub all_f_patch_size: Vec<usize>,
    /// Set for Z-Image Omni (image conditioning through SigLIP), which ferry does not run.
    pub siglip_feat_dim: Option<usize>,
}

/// The class this config must name.
pub const CLASS_NAME: &str = "ZImageTransformer2DModel";

impl ZImageConfig {
    /// Parse `json` (read from `path`, which errors name), refusing what ferry does not run.
    pub fn from_json(path: &Path, json: &Value) -> Result<ZImageConfig> {
        let bad =
            |field: &str, message: String| Error::checkpoint(path, format!("{field}: {message}"));
        match json.get("_class_name").and_then(Value::as_str) {
            Some(CLASS_NAME) | None => {}
            Some(other) => {
                return Err(bad(
                    "_class_name",
                    format!("{other:?} is not supported; expected {CLASS_NAME:?}"),
                ))
            }
        }
        // Each field parsed alone, so that an error names it.
        fn field<T: DeserializeOwned>(path: &Path, json: &Value, name: &str) -> Result<T> {
            let v = json.get(name).cloned().unwrap_or(Value::Null);
            serde_json::from_value(v).map_err(|e| Error::Json {
                path: path.to_path_buf(),
                message: format!("{CLASS_NAME} config field {name:?}: {e}"),
            })
        }
        let f = |name: &str| field::<usize>(path, json, name);
        let g = |name: &str| field::<f64>(path, json, name);
        let v = |name: &str| field::<Vec<usize>>(path, json, name);
        let c = ZImageConfig {
            in_channels: f("in_channels")?,
            dim: f("dim")?,
            n_heads: f("n_heads")?,
            n_kv_heads: field(path, json, "n_kv_heads")?,
            n_layers: f("n_layers")?,
            n_refiner_layers: f("n_refiner_layers")?,
            norm_eps: g("norm_eps")?,
            qk_norm: field(path, json, "qk_norm")?,
            cap_feat_dim: f("cap_feat_dim")?,
            rope_theta: g("rope_theta")?,
            t_scale: g("t_scale")?,
            axes_dims: v("axes_dims")?,
            axes_lens: v("axes_lens")?,
            all_patch_size: v("all_patch_size")?,
            all_f_patch_size: v("all_f_patch_size")?,
            siglip_feat_dim: field(path, json, "siglip_feat_dim")?,
        };
        if c.siglip_feat_dim.is_some() {
            return Err(bad(
                "siglip_feat_dim",
                "is set (Z-Image Omni); ferry runs the text-to-image model only (expected null)"
                    .into(),
            ));
        }
        if c.all_patch_size.len() != 1 || c.all_patch_size[0] == 0 {
            return Err(bad(
                "all_patch_size",
                format!(
                    "{:?}: expected one patch size, such as [2]",
                    c.all_patch_size
                ),
            ));
        }
        if c.all_f_patch_size != [1] {
            return Err(bad(
                "all_f_patch_size",
                format!("{:?}: expected [1] (images)", c.all_f_patch_size),
            ));
        }
        for (field, v) in [
            ("in_channels", c.in_channels),
            ("dim", c.dim),
            ("n_heads", c.n_heads),
            ("cap_feat_dim", c.cap_feat_dim),
        ] {
            if v == 0 {
                return Err(bad(field, "is 0; expected a positive size".into()));
            }
        }
        if c.dim % c.n_heads != 0 {
            return Err(bad(
                "n_heads",
                format!("{} does not divide dim {}", c.n_heads, c.dim),
            ));
        }
        let head_dim = c.dim / c.n_heads;
        if c.axes_dims.len() != 3
            || c.axes_dims.iter().any(|d| d % 2 != 0)
            || c.axes_dims.iter().sum::<usize>() != head_dim
        {
            return Err(bad(
                "axes_dims",
                format!(
                    "{:?}: expected three even sizes that add up to the head size {head_dim}",
                    c.axes_dims
                ),
            ));
        }
        if c.axes_lens.len() != 3 || c.axes_lens.contains(&0) {
            return Err(bad(
                "axes_lens",
                format!("{:?}: expected three positive lengths", c.axes_lens),
            ));
        }
        for (field, v) in [
            ("norm_eps", c.norm_eps),
            ("rope_theta", c.rope_theta),
            ("t_scale", c.t_scale),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(bad(field, format!("{v}: expected a positive number")));
            }
        }
        Ok(c)
    }

    pub fn head_dim(&self) -> usize {
        self.dim / self.n_heads
    }

    /// The spatial patch size (2: a token is 2×2 latent pixels).
    pub fn patch(&self) -> usize {
        self.all_patch_size[0]
    }

    /// Features of one patch: `patch² · in_channels`.
    pub fn patch_features(&self) -> usize {
        self.patch() * self.patch() * self.in_channels
    }

    /// The SwiGLU hidden width, `int(dim / 3 · 8)` as diffusers computes it.
    pub fn ffn_dim(&self) -> usize {
        (self.dim as f64 / 3.0 * 8.0) as usize
    }

    /// Width of the timestep embedding that modulates the blocks: `min(dim, 256)`.
    pub fn adaln_dim(&self) -> usize {
        self.dim.min(ADALN_EMBED_DIM)
    }

    /// The key of the patch embedder and final layer (`all_x_embedder.2-1.…`).
    pub fn patch_key(&self) -> String {
        format!("{}-1", self.patch())
    }
}

/// Upper bound of the timestep embedding's width.
const ADALN_EMBED_DIM: usize = 256;
