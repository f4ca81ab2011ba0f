//! The transformer component's config.json as diffusers writes it for
//! `QwenImageTransformer2DModel`.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::{Error, Result};

#[derive(Clone, Debug, PartialEq)]
pub struct QwenImageConfig {
    /// Features of one packed token: latent channels × 2 × 2 (64).
    pub in_channels: usize,
    /// Latent channels of the output (16); proj_out gives `patch² · out_channels` per token.
    pub out_channels: usize,
    /// Double-stream blocks (60).
    pub num_layers: usize,
    pub attention_head_dim: usize,
    pub num_attention_heads: usize,
    /// Width of the text features (the text encoder's hidden size, 3584).
    pub joint_attention_dim: usize,
    /// Head dims rotated by each RoPE axis: (frame, row, column).
    pub axes_dims_rope: Vec<usize>,
}

/// The class this config must name.
pub const CLASS_NAME: &str = "QwenImageTransformer2DModel";

/// The spatial patch the pipeline packs (`_pack_latents` is written for 2×2).
pub const PATCH: usize = 2;

impl QwenImageConfig {
    /// Parse `json` (read from `path`, which errors name), refusing what ferry does not run.
    pub fn from_json(path: &Path, json: &Value) -> Result<QwenImageConfig> {
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
        // Fields of the variants ferry does not run: absent, false or null all mean off.
        let off = |name: &str| -> Result<()> {
            match field::<Option<bool>>(path, json, name)? {
                Some(true) => Err(bad(
                    name,
                    "is true (a Qwen-Image variant: editing, layered or guidance-distilled); \
                     ferry runs the text-to-image model (expected false)"
                        .into(),
                )),
                _ => Ok(()),
            }
        };
        for name in [
            "guidance_embeds",
            "zero_cond_t",
            "use_additional_t_cond",
            "use_layer3d_rope",
        ] {
            off(name)?;
        }
        let patch = f("patch_size")?;
        let in_channels = f("in_channels")?;
        // diffusers: `out_channels or in_channels`.
        let out_channels =
            field::<Option<usize>>(path, json, "out_channels")?.unwrap_or(in_channels);
        let c = QwenImageConfig {
            in_channels,
            out_channels,
            num_layers: f("num_layers")?,
            attention_head_dim: f("attention_head_dim")?,
            num_attention_heads: f("num_attention_heads")?,
            joint_attention_dim: f("joint_attention_dim")?,
            axes_dims_rope: field(path, json, "axes_dims_rope")?,
        };
        if patch != PATCH {
            return Err(bad(
                "patch_size",
                format!("{patch}: expected {PATCH} (the pipeline packs 2×2 latent patches)"),
            ));
        }
        for (field, v) in [
            ("in_channels", c.in_channels),
            ("out_channels", c.out_channels),
            ("attention_head_dim", c.attention_head_dim),
            ("num_attention_heads", c.num_attention_heads),
            ("joint_attention_dim", c.joint_attention_dim),
        ] {
            if v == 0 {
                return Err(bad(field, "is 0; expected a positive size".into()));
            }
        }
        if c.in_channels != PATCH * PATCH * c.out_channels {
            return Err(bad(
                "in_channels",
                format!(
                    "{}: expected {} (out_channels {} in 2×2 patches: the DiT's input and output are the same packed latents)",
                    c.in_channels,
                    PATCH * PATCH * c.out_channels,
                    c.out_channels
                ),
            ));
        }
        let head_dim = c.attention_head_dim;
        if c.axes_dims_rope.len() != 3
            || c.axes_dims_rope.iter().any(|d| d % 2 != 0)
            || c.axes_dims_rope.iter().sum::<usize>() != head_dim
        {
            return Err(bad(
                "axes_dims_rope",
                format!(
                    "{:?}: expected three even sizes that add up to attention_head_dim {head_dim}",
                    c.axes_dims_rope
                ),
            ));
        }
        Ok(c)
    }

    /// Model width: heads × head dim (3072).
    pub fn dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn head_dim(&self) -> usize {
        self.attention_head_dim
    }

    /// Output features of one token: `patch² · out_channels` (= `in_channels`).
    pub fn patch_features(&self) -> usize {
        PATCH * PATCH * self.out_channels
    }

    /// The feed-forward's hidden width: diffusers' `FeedForward` with `mult = 4`.
    pub fn ffn_dim(&self) -> usize {
        4 * self.dim()
    }
}
