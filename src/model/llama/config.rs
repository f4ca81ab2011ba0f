//! The Llama-family config: one struct for llama, mistral, qwen2 and qwen3, whose differences
//! are named fields.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
}

impl Arch {
    pub const SUPPORTED: &'static str = "llama, mistral, qwen2, qwen3";

    pub fn from_model_type(s: &str) -> Option<Arch> {
        Some(match s {
            "llama" => Arch::Llama,
            "mistral" => Arch::Mistral,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
        }
    }
}

/// Llama 3's frequency-dependent RoPE scaling (`rope_type: "llama3"`).
#[derive(Clone, Debug, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub arch: Arch,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on the q, k and v projections (qwen2; llama/qwen3 with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (llama/qwen3 with `attention_bias`).
    pub o_bias: bool,
    /// RMSNorm over each head of q and k before RoPE (qwen3).
    pub qk_norm: bool,
    /// Attend to at most this many previous positions (mistral).
    pub sliding_window: Option<usize>,
}

/// config.json as Hugging Face writes it, the fields the Llama family uses.
#[derive(Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    /// transformers 5 folds rope_theta and rope_scaling into this.
    rope_parameters: Option<Value>,
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    hidden_act: Option<String>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
}

impl LlamaConfig {
    /// Parse a config.json already read as JSON; `path` is named in errors.
    pub fn from_hf(path: &Path, json: &Value) -> Result<LlamaConfig> {
        let bad = |message: String| Error::checkpoint(path, message);
        let model_type = json
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("config.json has no \"model_type\"; expected one of llama, mistral, qwen2, qwen3".into()))?;
        let arch =
            Arch::from_model_type(model_type).ok_or_else(|| Error::UnsupportedArchitecture {
                path: path.to_path_buf(),
                found: model_type.to_string(),
                supported: Arch::SUPPORTED,
            })?;
        let hf: HfConfig = serde_json::from_value(json.clone()).map_err(|e| Error::Json {
            path: path.to_path_buf(),
            message: format!("config.json for {model_type}: {e}"),
        })?;
        debug_assert_eq!(hf.model_type.as_deref(), Some(model_type));

        if let Some(act) = hf.hidden_act.as_deref() {
            if act != "silu" {
                return Err(bad(format!(
                    "hidden_act {act:?} is not supported; expected \"silu\""
                )));
            }
        }
        if hf.mlp_bias {
            return Err(bad(
                "mlp_bias = true is not supported; expected false".into()
            ));
        }

        let (rope_theta, rope_scaling) = rope(&hf, path)?;
        let sliding_window = match arch {
            Arch::Mistral => hf.sliding_window,
            Arch::Qwen2 | Arch::Qwen3 if hf.use_sliding_window == Some(true) => {
                return Err(bad(
                    "use_sliding_window = true is not supported; expected false".into(),
                ))
            }
            _ => None,
        };

        let num_kv_heads = hf.num_key_value_heads.unwrap_or(hf.num_attention_heads);
        if hf.num_attention_heads == 0
            || num_kv_heads == 0
            || hf.num_attention_heads % num_kv_heads != 0
        {
            return Err(bad(format!(
                "num_attention_heads {} must be a positive multiple of num_key_value_heads {num_kv_heads}",
                hf.num_attention_heads
            )));
        }
        let head_dim = match hf.head_dim {
            Some(d) => d,
            None if hf.hidden_size % hf.num_attention_heads == 0 => hf.hidden_size / hf.num_attention_heads,
            None => {
                return Err(bad(format!(
                    "hidden_size {} is not divisible by num_attention_heads {} and head_dim is not given",
                    hf.hidden_size, hf.num_attention_heads
                )))
            }
        };
        if head_dim % 2 != 0 {
            return Err(bad(format!(
                "head_dim {head_dim} must be even for rotary embeddings"
            )));
        }
        for (name, v) in [
            ("hidden_size", hf.hidden_size),
            ("intermediate_size", hf.intermediate_size),
            ("num_hidden_layers", hf.num_hidden_layers),
            ("vocab_size", hf.vocab_size),
            ("max_position_embeddings", hf.max_position_embeddings),
        ] {
            if v == 0 {
                return Err(bad(format!("{name} is 0; expected a positive size")));
            }
        }

        Ok(LlamaConfig {
            arch,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_layers: hf.num_hidden_layers,
            num_heads: hf.num_attention_heads,
            num_kv_heads,
            head_dim,
            vocab_size: hf.vocab_size,
            rms_norm_eps: hf.rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: hf.max_position_embeddings,
            tie_word_embeddings: hf.tie_word_embeddings,
            qkv_bias: arch == Arch::Qwen2 || hf.attention_bias,
            o_bias: arch != Arch::Qwen2 && hf.attention_bias,
            qk_norm: arch == Arch::Qwen3,
            sliding_window,
        })
    }

    /// Inverse frequencies of the rotary embedding, one per pair of a head's dimensions,
    /// with llama3 scaling applied. Computed as transformers does, in f64 then rounded to f32.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        (0..d / 2)
            .map(|i| {
                let inv = 1.0 / self.rope_theta.powf((2 * i) as f64 / d as f64);
                let inv = inv as f32 as f64;
                match &self.rope_scaling {
                    None => inv as f32,
                    Some(s) => llama3_scale(inv, s) as f32,
                }
            })
            .collect()
    }
}

fn llama3_scale(inv_freq: f64, s: &Llama3RopeScaling) -> f64 {
    let old = s.original_max_position_embeddings as f64;
    let low_wavelen = old / s.low_freq_factor;
    let high_wavelen = old / s.high_freq_factor;
    let wavelen = 2.0 * std::f64::consts::PI / inv_freq;
    if wavelen > low_wavelen {
        inv_freq / s.factor
    } else if wavelen < high_wavelen {
        inv_freq
    } else {
        let smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        (1.0 - smooth) * inv_freq / s.factor + smooth * inv_freq
    }
}

/// rope_theta and llama3 scaling from either the transformers 4 fields (`rope_theta`,
/// `rope_scaling`) or the transformers 5 `rope_parameters`.
fn rope(hf: &HfConfig, path: &Path) -> Result<(f64, Option<Llama3RopeScaling>)> {
    for (key, v) in [
        ("rope_scaling", &hf.rope_scaling),
        ("rope_parameters", &hf.rope_parameters),
    ] {
        match v {
            None | Some(Value::Null | Value::Object(_)) => {}
            Some(other) => {
                return Err(Error::checkpoint(
                    path,
                    format!("{key:?} is {other}; expected an object (such as {{\"rope_type\": \"llama3\", \"factor\": 8.0, ...}}) or null"),
                ))
            }
        }
    }
    let params = hf
        .rope_scaling
        .as_ref()
        .filter(|v| !v.is_null())
        .or(hf.rope_parameters.as_ref());
    let theta = hf
        .rope_theta
        .or_else(|| hf.rope_parameters.as_ref()?.get("rope_theta")?.as_f64())
        .unwrap_or(10000.0);
    let Some(params) = params.filter(|v| !v.is_null()) else {
        return Ok((theta, None));
    };
    let kind = match params.get("rope_type").or_else(|| params.get("type")) {
        None | Some(Value::Null) => "default",
        Some(Value::String(s)) => s.as_str(),
        Some(other) => {
            return Err(Error::checkpoint(
                path,
                format!("the rope scaling's \"rope_type\" is {other}; expected a string such as \"default\" or \"llama3\""),
            ))
        }
    };
    match kind {
        "default" => Ok((theta, None)),
        "llama3" => {
            let num = |k: &str| {
                params.get(k).and_then(Value::as_f64).ok_or_else(|| {
                    Error::checkpoint(path, format!("rope scaling of type llama3 needs a number {k:?}"))
                })
            };
            Ok((
                theta,
                Some(Llama3RopeScaling {
                    factor: num("factor")?,
                    low_freq_factor: num("low_freq_factor")?,
                    high_freq_factor: num("high_freq_factor")?,
                    original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
                }),
            ))
        }
        other => Err(Error::checkpoint(
            path,
            format!("rope scaling type {other:?} is not supported; expected none, \"default\" or \"llama3\""),
        )),
    }
}
