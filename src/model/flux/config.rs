//! The transformer component's config.json as diffusers writes it for
//! `FluxTransformer2DModel`.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::{Error, Result};

#[derive(Clone, Debug, PartialEq)]
pub struct FluxConfig {
    /// Features of one packed token: latent channels × 2 × 2 (64).
    pub in_channels: usize,
    /// Features of one output token (`out_channels or in_channels`, 64): proj_out's rows.
    pub out_channels: usize,
    /// Double-stream blocks (19).
    pub num_layers: usize,
    /// Single-stream blocks (38).
    pub num_single_layers: usize,
    pub attention_head_dim: usize,
    pub num_attention_heads: usize,
    /// Width of the text features (T5's hidden size, 4096).
    pub joint_attention_dim: usize,
    /// Width of the pooled text embedding (CLIP's projection, 768).
    pub pooled_projection_dim: usize,
    /// Flux.1-dev embeds the guidance scale beside the timestep (guidance distillation);
    /// Flux.1-schnell does not.
    pub guidance_embeds: bool,
    /// Head dims rotated by each RoPE axis: (unused, row, column).
    pub axes_dims_rope: Vec<usize>,
}

/// The class this config must name.
pub const CLASS_NAME: &str = "FluxTransformer2DModel";

/// diffusers' default `axes_dims_rope`, absent from the Flux.1 checkpoints' config.json.
const DEFAULT_AXES_DIMS_ROPE: [usize; 3] = [16, 56, 56];

impl FluxConfig {
    /// Parse `json` (read from `path`, which errors name), refusing what ferry does not run.
    pub fn from_json(path: &Path, json: &Value) -> Result<FluxConfig> {
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
        // diffusers' defaults for the fields the Flux.1 checkpoints leave out.
        let patch = field::<Option<usize>>(path, json, "patch_size")?.unwrap_or(1);
        let in_channels = f("in_channels")?;
        let out_channels =
            field::<Option<usize>>(path, json, "out_channels")?.unwrap_or(in_channels);
        let c = FluxConfig {
            in_channels,
            out_channels,
            num_layers: f("num_layers")?,
            num_single_layers: f("num_single_layers")?,
            attention_head_dim: f("attention_head_dim")?,
            num_attention_heads: f("num_attention_heads")?,
            joint_attention_dim: f("joint_attention_dim")?,
            pooled_projection_dim: f("pooled_projection_dim")?,
            guidance_embeds: field::<Option<bool>>(path, json, "guidance_embeds")?.unwrap_or(false),
            axes_dims_rope: field::<Option<Vec<usize>>>(path, json, "axes_dims_rope")?
                .unwrap_or_else(|| DEFAULT_AXES_DIMS_ROPE.to_vec()),
        };
        if patch != 1 {
            return Err(bad(
                "patch_size",
                format!("{patch}: expected 1 (the pipeline packs the 2×2 latent patches itself)"),
            ));
        }
        for (field, v) in [
            ("in_channels", c.in_channels),
            ("attention_head_dim", c.attention_head_dim),
            ("num_attention_heads", c.num_attention_heads),
            ("joint_attention_dim", c.joint_attention_dim),
            ("pooled_projection_dim", c.pooled_projection_dim),
        ] {
            if v == 0 {
                return Err(bad(field, "is 0; expected a positive size".into()));
            }
        }
        if c.in_channels % 4 != 0 {
            return Err(bad(
                "in_channels",
                format!(
                    "{}: expected a multiple of 4 (latent channels in 2×2 patches)",
                    c.in_channels
                ),
            ));
        }
        if c.out_channels != c.in_channels {
            return Err(bad(
                "out_channels",
                format!(
                    "{}: expected in_channels {} (a Flux variant with extra input channels, \
                     Fill or Depth, is not supported; the text-to-image DiT's input and output \
                     are the same packed latents)",
                    c.out_channels, c.in_channels
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

    /// Latent channels the pipeline packs (`in_channels / 4`, 16).
    pub fn latent_channels(&self) -> usize {
        self.in_channels / 4
    }

    /// The MLP's hidden width in both block kinds: `mlp_ratio = 4` (fixed in diffusers).
    pub fn ffn_dim(&self) -> usize {
        4 * self.dim()
    }
}
