//! Generation: prompt → tokens → model passes → sampled tokens → text, printed as it comes.

pub mod chat;
mod sample;

use std::time::Instant;

use tokenizers::Tokenizer;

pub use chat::Message;
pub use sample::{argmax, Sampler, SamplingConfig};

use crate::backend::{Backend, KvCache};
use crate::checkpoint::{Checkpoint, GenerationDefaults, TokenizerSource};
use crate::error::{Error, Result};
use crate::model::{Llama, Logits, ResidentWeights};

/// What to generate from one prompt.
#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingConfig,
    /// Stop when the text contains one of these (it is not included in the output).
    pub stop_strings: Vec<String>,
    /// Keep going past end-of-sequence tokens.
    pub ignore_eos: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// An end-of-sequence token was generated.
    Eos,
    /// A stop string appeared.
    StopString,
    /// `max_tokens` were generated.
    MaxTokens,
    /// The context is full.
    Context,
}

#[derive(Clone, Debug)]
pub struct Output {
    /// Generated token ids (without the prompt; with the EOS token if one ended it).
    pub tokens: Vec<u32>,
    /// Generated text (without a stop string or EOS).
    pub text: String,
    pub finish: Finish,
    /// Seconds for the prompt pass, and for the tokens after it.
    pub prompt_secs: f64,
    pub decode_secs: f64,
}

/// A model ready to generate: weights on a backend, tokenizer, and generation defaults.
pub struct Generator<B: Backend> {
    pub model: Llama,
    backend: B,
    weights: ResidentWeights<B::Weight>,
    /// None where the checkpoint has none (synthetic benchmarks feed token ids).
    tokenizer: Option<Tokenizer>,
    pub defaults: GenerationDefaults,
    /// Most positions (prompt + generated) a sequence may hold.
    pub context: usize,
    /// Named in the error when text must be encoded without a tokenizer.
    missing_tokenizer: std::path::PathBuf,
}

impl<B: Backend> Generator<B> {
    /// Load `ckpt` onto `backend`. `context` defaults to the model's max_position_embeddings.
    pub fn new(ckpt: &Checkpoint, backend: B, context: Option<usize>) -> Result<Self> {
        let model = Llama::new(ckpt.config.clone());
        let weights = ResidentWeights::load(ckpt, model.groups(), |t| backend.weight(t))?;
        let max = ckpt.config.max_position_embeddings;
        let context = match context {
            Some(0) => {
                return Err(Error::Flag {
                    flag: "--context",
                    message: "must be at least 1".into(),
                })
            }
            Some(c) if c > max => {
                return Err(Error::Flag {
                    flag: "--context",
                    message: format!("{c} exceeds the model's max_position_embeddings {max}"),
                })
            }
            Some(c) => c,
            None => max,
        };
        Ok(Generator {
            model,
            backend,
            weights,
            tokenizer: match ckpt.tokenizer {
                TokenizerSource::Missing => None,
                _ => Some(ckpt.tokenizer()?),
            },
            missing_tokenizer: ckpt.path.join("tokenizer.json"),
            defaults: ckpt.generation.clone(),
            context,
        })
    }

    /// Token ids for `text` as typed (the tokenizer adds BOS if the model wants one).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, true)
    }

    /// Token ids for a conversation rendered with the model's chat template.
    pub fn encode_chat(&self, messages: &[Message]) -> Result<Vec<u32>> {
        let template = self.defaults.chat_template.as_deref().ok_or_else(|| Error::Flag {
            flag: "--chat",
            message: "this model has no chat template (tokenizer_config.json \"chat_template\" or GGUF tokenizer.chat_template)".into(),
        })?;
        let d = &self.defaults;
        let text = chat::render(
            template,
            messages,
            d.bos_token.as_deref().unwrap_or(""),
            d.eos_token.as_deref().unwrap_or(""),
        )?;
        // The template writes BOS itself where the model wants it.
        self.encode_with(&text, false)
    }

    /// The tokenizer, or an error naming the file that should have held it.
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| Error::NotFound {
            path: self.missing_tokenizer.clone(),
            expected: "a tokenizer to encode the prompt".into(),
        })
    }

    fn encode_with(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer()?
            .encode(text, special)
            .map_err(|e| Error::Tokenizer {
                path: "prompt".into(),
                message: e.to_string(),
            })?;
        let mut ids = enc.get_ids().to_vec();
        // GGUF and some HF tokenizers say "add BOS" outside the tokenizer's own processor.
        if special && self.defaults.add_bos_token {
            if let Some(bos) = self.defaults.bos_token_id {
                if ids.first() != Some(&bos) {
                    ids.insert(0, bos);
                }
            }
        }
        Ok(ids)
    }

    /// Text of `ids`; empty without a tokenizer (token ids in, token ids out).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let Some(tokenizer) = &self.tokenizer else {
            return Ok(String::new());
        };
        tokenizer.decode(ids, true).map_err(|e| Error::Tokenizer {
            path: "output".into(),
            message: e.to_string(),
        })
    }

    /// Logits `[tokens, vocab]` for every position of `tokens` from an empty cache.
    pub fn score(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let mut cache = self.new_cache(tokens.len())?;
        self.model.forward(
            &self.backend,
            &mut self.weights,
            tokens,
            &mut cache,
            Logits::All,
        )
    }

    fn new_cache(&self, positions: usize) -> Result<B::KvCache> {
        if positions > self.context {
            return Err(Error::PromptTooLong {
                tokens: positions,
                context: self.context,
            });
        }
        let c = &self.model.config;
        self.backend
            .kv_cache(c.num_layers, self.model.attention_shape(), self.context)
    }

    /// Generate from `req`, handing each new piece of text to `on_text` as soon as it is
    /// final (complete UTF-8, not part of a possible stop string).
    pub fn generate(&mut self, req: &Request, on_text: &mut dyn FnMut(&str)) -> Result<Output> {
        if req.prompt.is_empty() {
            return Err(Error::Flag {
                flag: "--prompt",
                message: "the prompt is empty; give some text".into(),
            });
        }
        let mut cache = self.new_cache(req.prompt.len())?;
        let mut sampler = Sampler::new(req.sampling.clone());
        let mut seen = req.prompt.clone();
        let mut tokens = Vec::new();
        let mut printed = 0; // bytes of `text` handed out
        let mut text = String::new();

        // Greedy decoding picks the next token where the logits are (on the GPU: no copy).
        let greedy = req.sampling.temperature <= 0.0 && req.sampling.repetition_penalty == 1.0;
        let mut pick = |backend: &B, logits: &B::Activation, seen: &[u32]| -> Result<u32> {
            Ok(if greedy {
                backend.argmax_rows(logits)?[0]
            } else {
                sampler.next(&mut backend.to_host(logits)?, seen)
            })
        };
        let start = Instant::now();
        let logits = self.model.forward_logits(
            &self.backend,
            &mut self.weights,
            &req.prompt,
            &mut cache,
            Logits::Last,
        )?;
        // Picking waits for the device, so the prompt pass is timed to its end.
        let mut next = pick(&self.backend, &logits, &seen)?;
        let prompt_secs = start.elapsed().as_secs_f64();
        let decode_start = Instant::now();

        let finish = loop {
            if tokens.len() >= req.max_tokens {
                break Finish::MaxTokens;
            }
            tokens.push(next);
            seen.push(next);
            if !req.ignore_eos && self.defaults.eos_token_ids.contains(&next) {
                break Finish::Eos;
            }
            text = self.decode(&tokens)?;
            if let Some(at) = req
                .stop_strings
                .iter()
                .filter_map(|s| text.find(s.as_str()))
                .min()
            {
                text.truncate(at);
                break Finish::StopString;
            }
            let ready = final_prefix(&text, &req.stop_strings);
            if ready > printed {
                on_text(&text[printed..ready]);
                printed = ready;
            }
            if cache.len() >= self.context {
                break Finish::Context;
            }
            let logits = self.model.forward_logits(
                &self.backend,
                &mut self.weights,
                &[next],
                &mut cache,
                Logits::Last,
            )?;
            next = pick(&self.backend, &logits, &seen)?;
        };
        if finish == Finish::Eos {
            text = self.decode(&tokens)?;
        }
        if text.len() > printed {
            on_text(&text[printed..]);
        }
        Ok(Output {
            tokens,
            text,
            finish,
            prompt_secs,
            decode_secs: decode_start.elapsed().as_secs_f64(),
        })
    }
}

/// How many bytes of `text` can be shown: not a trailing incomplete character (decoded as
/// U+FFFD) and not a tail that may grow into a stop string.
fn final_prefix(text: &str, stop_strings: &[String]) -> usize {
    let mut end = text.trim_end_matches('\u{FFFD}').len();
    for stop in stop_strings {
        for (i, _) in stop.char_indices().skip(1) {
            if text[..end].ends_with(&stop[..i]) {
                end = end.min(text.len() - i);
            }
        }
    }
    end
}

#[cfg(test)]
mod tests {
    use super::final_prefix;

    #[test]
    fn holds_back_partial_stop_strings_and_characters() {
        let stops = vec!["<END>".to_string()];
        assert_eq!(final_prefix("hello <EN", &stops), 6);
        assert_eq!(final_prefix("hello", &stops), 5);
        assert_eq!(final_prefix("caf\u{FFFD}", &[]), 3);
    }
}
