//! The text encoder of an image pipeline: a Llama-family model (Qwen3 for Z-Image) that
//! returns the hidden state of a layer for the prompt in the tokenizer's chat template.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};

use crate::backend::Backend;
use crate::checkpoint::{safetensors, Component, Pipeline};
use crate::error::{Error, Result};
use crate::generate::{Message, TextCodec};
use crate::model::{Architecture, Llama, LlamaConfig, Weights};

/// Most prompt tokens, as the pipelines truncate (`max_sequence_length`).
pub const MAX_SEQUENCE_LENGTH: usize = 512;

/// The part of Qwen3's chat template that a one-message prompt uses: the message, the
/// assistant's turn, and an empty thinking block only when thinking is off.
const QWEN3_TEMPLATE: &str = "{%- for message in messages %}\
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}\
{%- endfor %}\
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}\
{%- if enable_thinking is defined and enable_thinking is false %}\
{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}";

pub struct TextEncoder {
    pub model: Llama,
    pub text: TextCodec,
}

impl TextEncoder {
    /// The `text_encoder` and `tokenizer` components of `pipeline`, returning the input of
    /// the last block (`hidden_states[-2]`, no final norm), as Z-Image's pipeline takes it.
    pub fn open(pipeline: &Pipeline) -> Result<TextEncoder> {
        let component = pipeline.component("text_encoder")?;
        let tokenizer = pipeline.component("tokenizer")?;
        let model = Self::model(component)?;
        Ok(TextEncoder {
            model,
            text: TextCodec::from_tokenizer_dir(&tokenizer.dir)?,
        })
    }

    /// A single-file Qwen3 text encoder (ComfyUI's `qwen_3_4b.safetensors`: transformers'
    /// names, with or without `model.` before them) and the tokenizer `text`. The file has no
    /// config: the widths and counts come from the shapes, the rest is Qwen3-4B's
    /// (`rope_theta` 1e6, `rms_norm_eps` 1e-6, 40960 positions).
    pub fn open_file(path: &Path, mut text: TextCodec) -> Result<(TextEncoder, Component)> {
        // A tokenizer.json alone: Qwen3's chat template, as the pipeline renders it.
        let defaults = &mut text.defaults;
        defaults.chat_template = defaults
            .chat_template
            .take()
            .or(Some(QWEN3_TEMPLATE.into()));
        let tensors = safetensors::read_map(path)?;
        let config = qwen3_config(path, &safetensors::shapes(&tensors))?;
        let component = Component::from_file("text_encoder", path, tensors);
        let model = Self::model_with(&component, path, &config)?;
        Ok((TextEncoder { model, text }, component))
    }

    /// The encoder model of `component`, its tensors checked.
    pub fn model(component: &Component) -> Result<Llama> {
        let (path, json) = component.config()?;
        Self::model_with(component, path, json)
    }

    /// The encoder model of `component` as `json` (a config.json read from `path`) says.
    fn model_with(component: &Component, path: &Path, json: &Value) -> Result<Llama> {
        let config = LlamaConfig::from_hf(path, json)?;
        // `Qwen3Model` saves its tensors unprefixed; a `…ForCausalLM` under "model.".
        let prefix = if component.tensors.contains_key("model.embed_tokens.weight") {
            "model."
        } else {
            ""
        };
        let layers = config.num_layers.checked_sub(1).filter(|&l| l > 0).ok_or_else(|| {
            Error::checkpoint(
                path,
                "num_hidden_layers must be at least 2: the prompt's embedding is the input of the last block",
            )
        })?;
        let model = Llama::encoder(config, layers, prefix);
        model.check_tensors(component)?;
        Ok(model)
    }

    /// Token ids of `prompt` as the pipeline feeds them: one user message in the chat
    /// template with thinking enabled, truncated to [`MAX_SEQUENCE_LENGTH`] (padding is
    /// dropped again after the encoder, so none is added).
    pub fn tokens(&self, prompt: &str) -> Result<Vec<u32>> {
        let mut ids = self
            .text
            .encode_chat_thinking(&[Message::new("user", prompt)], true)?;
        ids.truncate(MAX_SEQUENCE_LENGTH);
        Ok(ids)
    }

    /// The embedding of `tokens`: `[tokens, hidden]` f32, row-major. With right padding and
    /// causal attention, a padded batch gives the valid tokens these same rows.
    pub fn encode<B: Backend>(
        &self,
        backend: &B,
        weights: &mut impl Weights<B::Weight>,
        tokens: &[u32],
    ) -> Result<Vec<f32>> {
        let shape = self.model.attention_shape();
        let mut cache = backend.kv_cache(self.model.layers(), shape, tokens.len())?;
        let hidden = self.model.forward_logits(
            backend,
            weights,
            tokens,
            &mut cache,
            crate::model::Logits::All,
        )?;
        backend.to_host(&hidden)
    }
}

/// The config.json of a Qwen3 text encoder whose tensors (transformers' names, with or
/// without `model.`) have the shapes `tensors`: the widths and counts from the shapes, the
/// rest Qwen3-4B's.
fn qwen3_config(path: &Path, tensors: &BTreeMap<String, Vec<usize>>) -> Result<Value> {
    const EMBED: &str = "embed_tokens.weight";
    let prefix = safetensors::prefix_before(tensors, EMBED).ok_or_else(|| {
        Error::checkpoint(
            path,
            format!("unknown layout: expected tensor model.{EMBED} (a Qwen3 text encoder's token embedding)"),
        )
    })?;
    let q_norm = format!("{prefix}layers.0.self_attn.q_norm.weight");
    let dims = |name: &str, rank: usize| -> Result<Vec<usize>> {
        let shape = tensors.get(name).ok_or_else(|| {
            Error::checkpoint(
                path,
                format!("unknown layout: expected tensor {name} (a Qwen3 text encoder)"),
            )
        })?;
        match shape.len() == rank && !shape.contains(&0) {
            true => Ok(shape.clone()),
            false => Err(Error::checkpoint(
                path,
                format!("tensor {name:?} is {shape:?}; expected {rank} positive dimensions"),
            )),
        }
    };
    let layer = |s: &str| format!("{prefix}layers.0.{s}");
    let embed = dims(&format!("{prefix}{EMBED}"), 2)?; // [vocab, hidden]
    let head_dim = dims(&q_norm, 1)?[0];
    let q = dims(&layer("self_attn.q_proj.weight"), 2)?[0]; // [heads·head_dim, hidden]
    let kv = dims(&layer("self_attn.k_proj.weight"), 2)?[0];
    let mlp = dims(&layer("mlp.gate_proj.weight"), 2)?[0]; // [intermediate, hidden]
    let layers = (0..)
        .take_while(|i| tensors.contains_key(&format!("{prefix}layers.{i}.input_layernorm.weight")))
        .count();
    Ok(json!({
        "model_type": "qwen3",
        "hidden_act": "silu",
        "vocab_size": embed[0],
        "hidden_size": embed[1],
        "intermediate_size": mlp,
        "num_hidden_layers": layers,
        "head_dim": head_dim,
        "num_attention_heads": q / head_dim,
        "num_key_value_heads": kv / head_dim,
        "attention_bias": tensors.contains_key(&layer("self_attn.q_proj.bias")),
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0,
        "tie_word_embeddings": !tensors.contains_key("lm_head.weight"),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Qwen3-4B's shapes (Z-Image-Turbo's text encoder as `ferry synth` writes it) give its
    /// config.
    #[test]
    fn qwen3_4b_shapes_give_its_config() {
        use crate::checkpoint::DType;
        use crate::synth::{PipelineComponent, PipelinePreset};
        let turbo = PipelinePreset::by_name("z-image-turbo").unwrap();
        let c = PipelineComponent::TextEncoder;
        let shapes: BTreeMap<String, Vec<usize>> = turbo
            .tensors(c)
            .into_iter()
            .map(|(n, s)| (format!("model.{n}"), s))
            .collect();
        let p = Path::new("qwen_3_4b.safetensors");
        let got = LlamaConfig::from_hf(p, &qwen3_config(p, &shapes).unwrap()).unwrap();
        let want = LlamaConfig::from_hf(p, &turbo.config(c, DType::BF16)).unwrap();
        assert_eq!(got, want);
    }
}
