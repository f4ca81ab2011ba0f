//! The text encoder of an image pipeline: a Llama-family model (Qwen3 for Z-Image) that
//! returns the hidden state of a layer for the prompt in the tokenizer's chat template.

use crate::backend::Backend;
use crate::checkpoint::{Component, Pipeline};
use crate::error::{Error, Result};
use crate::generate::{Message, TextCodec};
use crate::model::{Architecture, Llama, LlamaConfig, Weights};

/// Most prompt tokens, as the pipelines truncate (`max_sequence_length`).
pub const MAX_SEQUENCE_LENGTH: usize = 512;

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

    /// The encoder model of `component`, its tensors checked.
    pub fn model(component: &Component) -> Result<Llama> {
        let (path, json) = component.config()?;
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
