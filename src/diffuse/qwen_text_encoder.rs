//! Qwen-Image's text encoder as diffusers' `QwenImagePipeline` runs it: the text model of
//! Qwen2.5-VL (a Qwen2 decoder: q/k/v bias, RMSNorm, SwiGLU) on the prompt inside the
//! pipeline's template, returning the final norm's output (`hidden_states[-1]`) with the
//! template's first [`TEMPLATE_START`] rows dropped.
//!
//! Qwen2.5-VL's multimodal RoPE (`mrope_section`) rotates each section of a head by one of
//! three position ids (time, height, width). For text alone the three are equal, so it is the
//! ordinary 1-D RoPE of a Qwen2 model; the vision tower (`visual.*`) is never used.

use std::path::Path;

use serde_json::{Map, Value};

use crate::backend::Backend;
use crate::checkpoint::{safetensors, Component, Pipeline};
use crate::error::{Error, Result};
use crate::generate::TextCodec;
use crate::model::llama::Segment;
use crate::model::{Architecture, Llama, LlamaConfig, Weights};

/// The pipeline's `prompt_template_encode`; the prompt replaces `{}`.
pub const PROMPT_TEMPLATE: &str = "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n";

/// `prompt_template_encode_start_idx`: the template's leading tokens (the system message with
/// Qwen's tokenizer) whose rows the pipeline drops.
pub const TEMPLATE_START: usize = 34;

/// The pipeline's default `max_sequence_length`: most rows kept per prompt.
pub const MAX_SEQUENCE_LENGTH: usize = 512;

/// The largest `max_sequence_length` the pipeline accepts (its `tokenizer_max_length`).
pub const MAX_SEQUENCE_LENGTH_LIMIT: usize = 1024;

/// The `model_type` of a Qwen2.5-VL checkpoint's config.json.
const MODEL_TYPE: &str = "qwen2_5_vl";

/// The prompts' embeddings: the valid rows of every prompt, stacked.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptEmbeds {
    /// `[Σ lengths, hidden]` f32, row-major, prompt after prompt.
    pub data: Vec<f32>,
    /// Rows of each prompt (the pipeline's mask sums).
    pub lengths: Vec<usize>,
    /// Width of a row (the text model's hidden size, the DiT's `joint_attention_dim`).
    pub hidden: usize,
}

impl PromptEmbeds {
    /// Prompt `i`'s rows, `[lengths[i], hidden]`.
    pub fn prompt(&self, i: usize) -> &[f32] {
        let start: usize = self.lengths[..i].iter().sum();
        &self.data[start * self.hidden..(start + self.lengths[i]) * self.hidden]
    }

    /// Every prompt's rows, in order.
    pub fn prompts(&self) -> Vec<&[f32]> {
        (0..self.lengths.len()).map(|i| self.prompt(i)).collect()
    }
}

pub struct QwenImageTextEncoder {
    pub model: Llama,
    pub text: TextCodec,
}

impl QwenImageTextEncoder {
    /// The `text_encoder` (a `Qwen2_5_VLForConditionalGeneration` checkpoint) and `tokenizer`
    /// components of `pipeline`.
    pub fn open(pipeline: &Pipeline) -> Result<QwenImageTextEncoder> {
        let component = pipeline.component("text_encoder")?;
        let tokenizer = pipeline.component("tokenizer")?;
        let model = Self::model(component)?;
        Ok(QwenImageTextEncoder {
            model,
            text: TextCodec::from_tokenizer_dir(&tokenizer.dir)?,
        })
    }

    /// A single-file Qwen2.5-VL text encoder (ComfyUI's `qwen_2.5_vl_7b.safetensors`:
    /// transformers' names, the text model under `model.` and the vision tower's `visual.*`
    /// unused) and the tokenizer `text`. The file has no config: the widths and counts come
    /// from the shapes, the rest is Qwen2.5-VL's (heads of 128, `rope_theta` 1e6,
    /// `rms_norm_eps` 1e-6).
    pub fn open_file(path: &Path, text: TextCodec) -> Result<(QwenImageTextEncoder, Component)> {
        let tensors = safetensors::read_map(path)?;
        let config = qwen25_text_config(path, &safetensors::shapes(&tensors))?;
        let component = Component::from_file("text_encoder", path, tensors);
        let model = Self::model_with(&component, path, &config)?;
        Ok((QwenImageTextEncoder { model, text }, component))
    }

    /// The text model of `component`, its tensors checked (the vision tower's and the head's
    /// are not part of it).
    pub fn model(component: &Component) -> Result<Llama> {
        let (path, json) = component.config()?;
        Self::model_with(component, path, &text_config(path, json)?)
    }

    /// The text model of `component` as the Qwen2 config `json` (from `path`) says.
    fn model_with(component: &Component, path: &Path, json: &Value) -> Result<Llama> {
        let config = LlamaConfig::from_hf(path, json)?;
        // transformers 4.5x–5 save the language model as `model.*` (the vision tower as
        // `visual.*`); the in-memory layout of transformers ≥ 4.52 is `model.language_model.*`.
        let prefix = text_prefix(&component.tensors).ok_or_else(|| {
            Error::checkpoint(
                &component.dir,
                format!("unknown layout: expected tensor model.{EMBED} (the token embedding of a Qwen2.5-VL text model)"),
            )
        })?;
        let model = Llama::last_hidden(config, &prefix);
        model.check_tensors(component)?;
        Ok(model)
    }

    /// Token ids of `prompt` in the template, as the pipeline's tokenizer call gives them,
    /// cut after the [`TEMPLATE_START`] rows that are dropped and `max_sequence_length` more:
    /// the rows after those do not reach the pipeline (the model is causal, so the rows kept
    /// are the same).
    pub fn tokens(&self, prompt: &str, max_sequence_length: usize) -> Result<Vec<u32>> {
        check_max_sequence_length(max_sequence_length)?;
        let (before, after) = PROMPT_TEMPLATE
            .split_once("{}")
            .expect("the template has {}");
        let mut ids = self.text.encode(&format!("{before}{prompt}{after}"))?;
        if ids.len() <= TEMPLATE_START {
            return Err(Error::Flag {
                flag: "prompt",
                message: format!(
                    "{prompt:?} gives {} tokens in the template, nothing after the {TEMPLATE_START} that the pipeline drops",
                    ids.len()
                ),
            });
        }
        ids.truncate(TEMPLATE_START + max_sequence_length);
        Ok(ids)
    }

    /// The embeddings of `prompts` in one pass (every prompt a sequence of its own, so the
    /// weights are read once): each prompt's rows after the template's first
    /// [`TEMPLATE_START`], at most `max_sequence_length` (1 ..= 1024) of them.
    pub fn encode<B: Backend>(
        &self,
        backend: &B,
        weights: &mut impl Weights<B::Weight>,
        prompts: &[&str],
        max_sequence_length: usize,
    ) -> Result<PromptEmbeds> {
        let ids: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| self.tokens(p, max_sequence_length))
            .collect::<Result<_>>()?;
        self.encode_tokens(backend, weights, &ids)
    }

    /// [`encode`](Self::encode) of token ids from [`tokens`](Self::tokens).
    pub fn encode_tokens<B: Backend>(
        &self,
        backend: &B,
        weights: &mut impl Weights<B::Weight>,
        ids: &[Vec<u32>],
    ) -> Result<PromptEmbeds> {
        let hidden = self.model.config.hidden_size;
        if ids.is_empty() {
            return Ok(PromptEmbeds {
                data: Vec::new(),
                lengths: Vec::new(),
                hidden,
            });
        }
        if let Some(short) = ids.iter().find(|t| t.len() <= TEMPLATE_START) {
            return Err(Error::Flag {
                flag: "prompt",
                message: format!(
                    "{} tokens; expected more than the template's {TEMPLATE_START} that the pipeline drops",
                    short.len()
                ),
            });
        }
        let shape = self.model.attention_shape();
        let mut caches: Vec<B::KvCache> = ids
            .iter()
            .map(|t| backend.kv_cache(self.model.layers(), shape, t.len()))
            .collect::<Result<_>>()?;
        let mut segments: Vec<Segment<'_, B::KvCache>> = ids
            .iter()
            .zip(caches.iter_mut())
            .map(|(tokens, cache)| Segment { tokens, cache })
            .collect();
        let x =
            self.model
                .forward_batch(backend, weights, &mut segments, crate::model::Logits::All)?;
        let all = backend.to_host(&x)?; // [Σ tokens, hidden]
        let mut data = Vec::with_capacity(all.len());
        let mut lengths = Vec::with_capacity(ids.len());
        let mut row = 0;
        for t in ids {
            data.extend_from_slice(&all[(row + TEMPLATE_START) * hidden..(row + t.len()) * hidden]);
            lengths.push(t.len() - TEMPLATE_START);
            row += t.len();
        }
        Ok(PromptEmbeds {
            data,
            lengths,
            hidden,
        })
    }
}

/// `max_sequence_length` as the pipeline accepts it: 1 ..= 1024.
pub fn check_max_sequence_length(n: usize) -> Result<()> {
    match (1..=MAX_SEQUENCE_LENGTH_LIMIT).contains(&n) {
        true => Ok(()),
        false => Err(Error::Flag {
            flag: "--max-sequence-length",
            message: format!("{n}; expected 1 ..= {MAX_SEQUENCE_LENGTH_LIMIT}"),
        }),
    }
}

/// A Qwen2 config.json for the text model of the Qwen2.5-VL config `json` (read from
/// `path`): the text fields from `text_config` (transformers 5) or the top level (transformers
/// 4, which writes both), multimodal RoPE checked and taken as the 1-D RoPE it is for text.
pub fn text_config(path: &Path, json: &Value) -> Result<Value> {
    let bad = |message: String| Error::checkpoint(path, message);
    let model_type = json.get("model_type").and_then(Value::as_str);
    if model_type != Some(MODEL_TYPE) {
        return Err(bad(format!(
            "model_type is {}; expected {MODEL_TYPE:?} (Qwen-Image's text encoder, Qwen2_5_VLForConditionalGeneration)",
            model_type.map_or("missing".into(), |t| format!("{t:?}"))
        )));
    }
    let top = json
        .as_object()
        .ok_or_else(|| bad("expected a JSON object".into()))?;
    let mut text: Map<String, Value> = top
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "text_config" | "vision_config"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    match top.get("text_config") {
        None | Some(Value::Null) => {}
        Some(Value::Object(inner)) => {
            text.extend(inner.iter().map(|(k, v)| (k.clone(), v.clone())))
        }
        Some(other) => {
            return Err(bad(format!(
                "\"text_config\" is {other}; expected an object"
            )))
        }
    }
    // RoPE: `rope_scaling` (transformers 4) or `rope_parameters` (5), of type "mrope" or
    // "default", with `mrope_section` splitting half a head.
    let theta = text
        .get("rope_theta")
        .or_else(|| text.get("rope_parameters")?.get("rope_theta"))
        .cloned()
        .unwrap_or(Value::from(10000.0));
    for key in ["rope_scaling", "rope_parameters"] {
        let Some(rope) = text.remove(key).filter(|v| !v.is_null()) else {
            continue;
        };
        let kind = ["rope_type", "type"]
            .iter()
            .filter_map(|k| rope.get(*k)?.as_str())
            .find(|&t| t != "default")
            .unwrap_or("default");
        if kind != "mrope" && kind != "default" {
            return Err(bad(format!(
                "{key:?} has rope type {kind:?}; expected \"mrope\" or \"default\" (Qwen2.5-VL's multimodal RoPE)"
            )));
        }
        if let Some(section) = rope.get("mrope_section") {
            let section: Vec<usize> = serde_json::from_value(section.clone()).map_err(|_| {
                bad(format!(
                    "{key:?}.mrope_section is {section}; expected a list of sizes"
                ))
            })?;
            let half = head_dim(&text).map(|d| d / 2);
            if half.is_some_and(|h| section.iter().sum::<usize>() != h) {
                return Err(bad(format!(
                    "{key:?}.mrope_section {section:?} sums to {}; expected half the head dimension, {}",
                    section.iter().sum::<usize>(),
                    half.unwrap_or(0)
                )));
            }
        }
    }
    text.insert("rope_theta".into(), theta);
    text.insert("model_type".into(), Value::from("qwen2"));
    Ok(Value::Object(text))
}

/// The token embedding's name after the text model's prefix.
const EMBED: &str = "embed_tokens.weight";

/// Heads of every Qwen2.5-VL text model (3B to 72B), which a file without a config cannot
/// tell from its shapes.
const QWEN25_HEAD_DIM: usize = 128;

/// What comes before the text model's names (`model.`, `model.language_model.`): the
/// shortest prefix of a token embedding.
fn text_prefix<T>(tensors: &std::collections::BTreeMap<String, T>) -> Option<String> {
    safetensors::prefix_before(tensors, EMBED)
}

/// A Qwen2 config.json for the text model whose tensors have the shapes `tensors` (a file
/// read from `path`).
fn qwen25_text_config(
    path: &Path,
    tensors: &std::collections::BTreeMap<String, Vec<usize>>,
) -> Result<Value> {
    let prefix = text_prefix(tensors).ok_or_else(|| {
        Error::checkpoint(
            path,
            format!("unknown layout: expected tensor model.{EMBED} (a Qwen2.5-VL text encoder's token embedding)"),
        )
    })?;
    let dims = |name: &str| -> Result<Vec<usize>> {
        let shape = tensors.get(name).ok_or_else(|| Error::MissingTensor {
            path: path.to_path_buf(),
            tensor: name.to_string(),
        })?;
        match shape.len() == 2 && !shape.contains(&0) {
            true => Ok(shape.clone()),
            false => Err(Error::checkpoint(
                path,
                format!("tensor {name:?} is {shape:?}; expected 2 positive dimensions"),
            )),
        }
    };
    let layer = |s: &str| format!("{prefix}layers.0.{s}");
    let embed = dims(&format!("{prefix}{EMBED}"))?; // [vocab, hidden]
    let q = dims(&layer("self_attn.q_proj.weight"))?[0]; // [heads·128, hidden]
    let kv = dims(&layer("self_attn.k_proj.weight"))?[0];
    let mlp = dims(&layer("mlp.gate_proj.weight"))?[0]; // [intermediate, hidden]
    if q % QWEN25_HEAD_DIM != 0 || kv % QWEN25_HEAD_DIM != 0 || kv == 0 {
        return Err(Error::checkpoint(
            path,
            format!(
                "q_proj has {q} rows and k_proj {kv}; expected multiples of {QWEN25_HEAD_DIM} (Qwen2.5-VL's heads; the file carries no config)"
            ),
        ));
    }
    let layers = (0..)
        .take_while(|i| tensors.contains_key(&format!("{prefix}layers.{i}.input_layernorm.weight")))
        .count();
    Ok(serde_json::json!({
        "model_type": "qwen2",
        "hidden_act": "silu",
        "vocab_size": embed[0],
        "hidden_size": embed[1],
        "intermediate_size": mlp,
        "num_hidden_layers": layers,
        "num_attention_heads": q / QWEN25_HEAD_DIM,
        "num_key_value_heads": kv / QWEN25_HEAD_DIM,
        "max_position_embeddings": 128000,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0,
        "tie_word_embeddings": false,
    }))
}

/// `head_dim` of a text config, or hidden_size / num_attention_heads.
fn head_dim(text: &Map<String, Value>) -> Option<usize> {
    let n = |k: &str| text.get(k)?.as_u64().map(|v| v as usize);
    n("head_dim").or_else(|| Some(n("hidden_size")? / n("num_attention_heads").filter(|&h| h > 0)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn text_fields() -> Value {
        json!({
            "hidden_act": "silu", "hidden_size": 3584, "intermediate_size": 18944,
            "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
            "max_position_embeddings": 128000, "rms_norm_eps": 1e-6, "vocab_size": 152064,
            "sliding_window": 32768, "use_sliding_window": false, "tie_word_embeddings": false,
        })
    }

    /// Qwen-Image's text_encoder/config.json as transformers 4.53 wrote it (text fields at the
    /// top and again in text_config, `rope_scaling` of type mrope) reads as Qwen2.5-VL-7B's
    /// text model.
    #[test]
    fn transformers_4_config_is_the_7b_text_model() {
        let mut j = text_fields();
        let rope = json!({"type": "mrope", "rope_type": "default", "mrope_section": [16, 24, 24]});
        j["model_type"] = json!("qwen2_5_vl");
        j["rope_theta"] = json!(1e6);
        j["rope_scaling"] = rope.clone();
        let mut inner = text_fields();
        inner["model_type"] = json!("qwen2_5_vl_text");
        inner["rope_theta"] = json!(1e6);
        inner["rope_scaling"] = rope;
        j["text_config"] = inner;
        j["vision_config"] = json!({"depth": 32, "hidden_size": 1280});
        let p = Path::new("text_encoder/config.json");
        let c = LlamaConfig::from_hf(p, &text_config(p, &j).unwrap()).unwrap();
        assert_eq!(
            (
                c.hidden_size,
                c.num_layers,
                c.num_heads,
                c.num_kv_heads,
                c.head_dim
            ),
            (3584, 28, 28, 4, 128)
        );
        assert!(c.qkv_bias && !c.o_bias && !c.qk_norm && c.sliding_window.is_none());
        assert_eq!((c.rope_theta, c.rope_scaling.clone()), (1e6, None));
        assert_eq!(c.vocab_size, 152064);
    }

    #[test]
    fn wrong_model_type_and_mrope_sections_are_named() {
        let p = Path::new("te/config.json");
        let mut j = text_fields();
        j["model_type"] = json!("qwen2");
        let e = text_config(p, &j).unwrap_err().to_string();
        assert!(
            e.contains("te/config.json") && e.contains("qwen2_5_vl"),
            "{e}"
        );
        j["model_type"] = json!("qwen2_5_vl");
        j["rope_parameters"] =
            json!({"rope_type": "default", "type": "mrope", "mrope_section": [16, 24, 16]});
        let e = text_config(p, &j).unwrap_err().to_string();
        assert!(e.contains("mrope_section") && e.contains("64"), "{e}");
        j["rope_parameters"] = json!({"rope_type": "yarn", "factor": 4.0});
        let e = text_config(p, &j).unwrap_err().to_string();
        assert!(e.contains("yarn"), "{e}");
    }

    #[test]
    fn max_sequence_length_is_bounded_as_the_pipeline_does() {
        assert!(check_max_sequence_length(1).is_ok() && check_max_sequence_length(1024).is_ok());
        for n in [0, 1025] {
            let e = check_max_sequence_length(n).unwrap_err().to_string();
            assert!(
                e.contains("--max-sequence-length") && e.contains("1024"),
                "{e}"
            );
        }
    }
}
