//! Flux.1's two text encoders as diffusers' `FluxPipeline` runs them (`encode_prompt`): the
//! prompt through T5 (`text_encoder_2`, `tokenizer_2`) gives `prompt_embeds` `[512, 4096]`
//! for Flux.1-dev, every row (pads included: the pipeline masks nothing); through CLIP
//! (`text_encoder`, `tokenizer`) it gives `pooled_prompt_embeds` `[768]`.
//!
//! The models are [`T5Encoder`](crate::model::t5::T5Encoder) and
//! [`ClipText`](crate::model::clip::ClipText); here are the tokenizer calls of the pipeline
//! (`padding="max_length"`, `truncation=True`) and the encodes of a batch of prompts.
//! Weights are placed by the caller, per model, as `qwen_image_pipeline` places them
//! (`place(&component, &model, &[], shape, &mut log)`; [`FluxTextEncoders::t5_shape`] and
//! [`clip_shape`](FluxTextEncoders::clip_shape) give the pass shapes). On a GPU,
//! `Cuda::prepare_encoder` and `Cuda::prepare(clip.attention_shape().head_dim)` build the
//! kernels up front.

use std::path::Path;

use serde_json::Value;
use tokenizers::Tokenizer;

use crate::backend::encoder::EncoderOps;
use crate::checkpoint::{
    is_regular_file, open_clip_tokenizer, Component, Pipeline, CLIP_ENDOFTEXT, CLIP_STARTOFTEXT,
};
use crate::error::{Error, Result};
use crate::model::clip::ClipText;
use crate::model::t5::T5Encoder;
use crate::model::{PassShape, Weights};

/// The pipeline's default `max_sequence_length` (Flux.1-dev's; Flux.1-schnell uses 256), and
/// the largest it accepts.
pub const T5_MAX_SEQUENCE_LENGTH: usize = 512;

/// `tokenizer_max_length` when the CLIP tokenizer's config gives no `model_max_length`.
pub const CLIP_MAX_LENGTH: usize = 77;

/// A T5 tokenizer (T5TokenizerFast's tokenizer.json) with its end and pad tokens.
pub struct T5Tokenizer {
    pub tokenizer: Tokenizer,
    pub eos: u32,
    pub pad: u32,
}

/// A CLIP tokenizer with its start, end and pad tokens and its length.
pub struct ClipTokenizer {
    pub tokenizer: Tokenizer,
    pub bos: u32,
    pub eos: u32,
    pub pad: u32,
    /// `model_max_length`: every prompt is padded or cut to this many tokens.
    pub max_length: usize,
}

/// A special token that `tokenizer_config.json` or `special_tokens_map.json` of `dir` names
/// for `key` (a string or `{"content": …}`), else `default`.
fn special_token(dir: &Path, key: &str, default: &str) -> Result<String> {
    for file in ["tokenizer_config.json", "special_tokens_map.json"] {
        let path = dir.join(file);
        if !is_regular_file(&path)? {
            continue;
        }
        let json = crate::checkpoint::read_json(&path)?;
        match json.get(key) {
            None | Some(Value::Null) => continue,
            Some(Value::String(s)) => return Ok(s.clone()),
            Some(v) => match v.get("content").and_then(Value::as_str) {
                Some(s) => return Ok(s.to_string()),
                None => {
                    return Err(Error::Tokenizer {
                        path,
                        message: format!(
                            "{key} is {v}; expected a token string or {{\"content\": string}}"
                        ),
                    })
                }
            },
        }
    }
    Ok(default.to_string())
}

/// The id of `token` (the `key` special token) in `tokenizer` of `dir`.
fn special_id(tokenizer: &Tokenizer, dir: &Path, key: &str, token: &str) -> Result<u32> {
    tokenizer
        .token_to_id(token)
        .ok_or_else(|| Error::Tokenizer {
            path: dir.to_path_buf(),
            message: format!("{key} {token:?} is not in the vocabulary"),
        })
}

/// Drop a tokenizer.json's own truncation and padding: the calls here do the pipeline's.
fn plain(mut t: Tokenizer) -> Tokenizer {
    t.with_truncation(None).expect("no truncation is valid");
    t.with_padding(None);
    t
}

impl T5Tokenizer {
    /// The tokenizer.json of `dir` (and the special tokens its configs name), rebuilt as
    /// transformers 5's `T5Tokenizer` rebuilds it (models/t5/tokenization_t5.py and
    /// `TokenizersBackend.convert_to_native_format`): the file's Unigram vocabulary and added
    /// tokens, only a `Precompiled` normalizer of the file's (none when it has none),
    /// `WhitespaceSplit` then `Metaspace` ("▁", prepended always, split), the Metaspace
    /// decoder. The file's other normalizers and pre-tokenizers are dropped, as there.
    pub fn open(dir: &Path) -> Result<T5Tokenizer> {
        let path = dir.join("tokenizer.json");
        if !is_regular_file(&path)? {
            return Err(Error::NotFound {
                path,
                expected: "the T5 tokenizer (tokenizer.json, as T5TokenizerFast saves it)".into(),
            });
        }
        let bad = |message: String| Error::Tokenizer {
            path: path.clone(),
            message,
        };
        let json = crate::checkpoint::read_json(&path)?;
        if json.pointer("/model/type").and_then(Value::as_str) != Some("Unigram") {
            return Err(bad(format!(
                "model.type is {}; expected \"Unigram\" (a T5 tokenizer's SentencePiece vocabulary)",
                json.pointer("/model/type").unwrap_or(&Value::Null)
            )));
        }
        let precompiled = match json.get("normalizer") {
            Some(n) if n.get("type").and_then(Value::as_str) == Some("Sequence") => n
                .get("normalizers")
                .and_then(Value::as_array)
                .and_then(|list| {
                    list.iter()
                        .find(|n| n.get("type").and_then(Value::as_str) == Some("Precompiled"))
                })
                .cloned(),
            Some(n) if n.get("type").and_then(Value::as_str) == Some("Precompiled") => {
                Some(n.clone())
            }
            _ => None,
        };
        let metaspace = serde_json::json!({
            "type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "always", "split": true,
        });
        let rebuilt = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": json.get("added_tokens").cloned().unwrap_or(Value::Array(vec![])),
            "normalizer": precompiled,
            "pre_tokenizer": {
                "type": "Sequence",
                "pretokenizers": [{"type": "WhitespaceSplit"}, metaspace.clone()],
            },
            "post_processor": null,
            "decoder": metaspace,
            "model": json["model"].clone(),
        });
        let tokenizer: Tokenizer = rebuilt
            .to_string()
            .parse()
            .map_err(|e| bad(format!("{e}; expected a T5TokenizerFast tokenizer.json")))?;
        let eos = special_token(dir, "eos_token", "</s>")?;
        let pad = special_token(dir, "pad_token", "<pad>")?;
        Ok(T5Tokenizer {
            eos: special_id(&tokenizer, &path, "eos_token", &eos)?,
            pad: special_id(&tokenizer, &path, "pad_token", &pad)?,
            tokenizer,
        })
    }

    /// `prompt` as `tokenizer_2(prompt, padding="max_length", max_length=max_len,
    /// truncation=True)` gives it: the text's tokens cut to `max_len − 1`, `</s>`, pads to
    /// `max_len`.
    pub fn tokens(&self, prompt: &str, max_len: usize) -> Result<Vec<u32>> {
        let mut ids = encode(&self.tokenizer, prompt)?;
        ids.truncate(max_len.saturating_sub(1));
        ids.push(self.eos);
        ids.resize(max_len.max(1), self.pad);
        Ok(ids)
    }
}

impl ClipTokenizer {
    /// The tokenizer of `dir`: tokenizer.json, or vocab.json + merges.txt.
    pub fn open(dir: &Path) -> Result<ClipTokenizer> {
        let tokenizer = plain(open_clip_tokenizer(dir)?);
        let bos = special_token(dir, "bos_token", CLIP_STARTOFTEXT)?;
        let eos = special_token(dir, "eos_token", CLIP_ENDOFTEXT)?;
        let pad = special_token(dir, "pad_token", CLIP_ENDOFTEXT)?;
        let config = dir.join("tokenizer_config.json");
        let max_length = if is_regular_file(&config)? {
            let json = crate::checkpoint::read_json(&config)?;
            match json.get("model_max_length") {
                None | Some(Value::Null) => CLIP_MAX_LENGTH,
                Some(v) => v
                    .as_u64()
                    .filter(|&n| n >= 2)
                    .ok_or_else(|| Error::Tokenizer {
                        path: config.clone(),
                        message: format!(
                            "model_max_length is {v}; expected a whole number ≥ 2 (77 for CLIP)"
                        ),
                    })? as usize,
            }
        } else {
            CLIP_MAX_LENGTH
        };
        Ok(ClipTokenizer {
            bos: special_id(&tokenizer, dir, "bos_token", &bos)?,
            eos: special_id(&tokenizer, dir, "eos_token", &eos)?,
            pad: special_id(&tokenizer, dir, "pad_token", &pad)?,
            tokenizer,
            max_length,
        })
    }

    /// `prompt` as `tokenizer(prompt, padding="max_length", max_length=model_max_length,
    /// truncation=True)` gives it: `<|startoftext|>`, the text's tokens cut to
    /// `max_length − 2`, `<|endoftext|>`, pads to `max_length`.
    pub fn tokens(&self, prompt: &str) -> Result<Vec<u32>> {
        let text = encode(&self.tokenizer, prompt)?;
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos);
        ids.extend(text.iter().take(self.max_length - 2));
        ids.push(self.eos);
        ids.resize(self.max_length, self.pad);
        Ok(ids)
    }
}

/// The ids of `prompt` without special tokens added.
fn encode(tokenizer: &Tokenizer, prompt: &str) -> Result<Vec<u32>> {
    let enc = tokenizer.encode(prompt, false).map_err(|e| Error::Flag {
        flag: "prompt",
        message: format!("cannot tokenize {prompt:?}: {e}"),
    })?;
    Ok(enc.get_ids().to_vec())
}

/// Flux.1's text encoders and their tokenizers, opened and checked.
pub struct FluxTextEncoders {
    /// `text_encoder_2`.
    pub t5: T5Encoder,
    /// `text_encoder`.
    pub clip: ClipText,
    /// `tokenizer_2`.
    pub t5_tokenizer: T5Tokenizer,
    /// `tokenizer`.
    pub clip_tokenizer: ClipTokenizer,
}

impl FluxTextEncoders {
    /// The `text_encoder` (CLIP), `tokenizer`, `text_encoder_2` (T5) and `tokenizer_2`
    /// components of `pipeline`, every tensor checked, the tokenizers against the models.
    pub fn open(pipeline: &Pipeline) -> Result<FluxTextEncoders> {
        let clip = ClipText::open(pipeline.component("text_encoder")?)?;
        let t5 = T5Encoder::open(pipeline.component("text_encoder_2")?)?;
        let clip_dir = &pipeline.component("tokenizer")?.dir;
        let t5_dir = &pipeline.component("tokenizer_2")?.dir;
        Self::with_tokenizers(clip, t5, clip_dir, t5_dir)
    }

    /// ComfyUI's split text encoders: CLIP's file (`clip_l.safetensors`), T5's
    /// (`t5xxl_fp16.safetensors`), and a Flux.1 pipeline folder `tokenizers` holding
    /// `tokenizer/` and `tokenizer_2/`; every tensor checked, the tokenizers against the
    /// models. Also the two files' components (CLIP's, T5's).
    pub fn open_files(
        clip_file: &Path,
        t5_file: &Path,
        tokenizers: &Path,
    ) -> Result<(FluxTextEncoders, Component, Component)> {
        let (clip, clip_weights) = ClipText::open_file(clip_file)?;
        let (t5, t5_weights) = T5Encoder::open_file(t5_file)?;
        let encoders = Self::with_tokenizers(
            clip,
            t5,
            &tokenizers.join("tokenizer"),
            &tokenizers.join("tokenizer_2"),
        )?;
        Ok((encoders, clip_weights, t5_weights))
    }

    /// The models with the tokenizers of `clip_dir` and `t5_dir`, checked against them.
    fn with_tokenizers(
        clip: ClipText,
        t5: T5Encoder,
        clip_dir: &Path,
        t5_dir: &Path,
    ) -> Result<FluxTextEncoders> {
        let clip_tokenizer = ClipTokenizer::open(clip_dir)?;
        let t5_tokenizer = T5Tokenizer::open(t5_dir)?;
        if clip_tokenizer.max_length > clip.config.max_position_embeddings {
            return Err(Error::Tokenizer {
                path: clip_dir.join("tokenizer_config.json"),
                message: format!(
                    "model_max_length {} is more than the text encoder's max_position_embeddings {}",
                    clip_tokenizer.max_length, clip.config.max_position_embeddings
                ),
            });
        }
        for (dir, size, vocab) in [
            (
                clip_dir,
                clip_tokenizer.tokenizer.get_vocab_size(true),
                clip.config.vocab_size,
            ),
            (
                t5_dir,
                t5_tokenizer.tokenizer.get_vocab_size(true),
                t5.config.vocab_size,
            ),
        ] {
            if size > vocab {
                return Err(Error::Tokenizer {
                    path: dir.to_path_buf(),
                    message: format!(
                        "{size} tokens, more than the {vocab} rows of its text encoder's embedding"
                    ),
                });
            }
        }
        Ok(FluxTextEncoders {
            t5,
            clip,
            t5_tokenizer,
            clip_tokenizer,
        })
    }

    /// T5's ids of `prompt` at `max_len` (the pipeline's `max_sequence_length`, 1 ..= 512).
    pub fn t5_tokens(&self, prompt: &str, max_len: usize) -> Result<Vec<u32>> {
        if max_len == 0 || max_len > T5_MAX_SEQUENCE_LENGTH {
            return Err(Error::Flag {
                flag: "--max-sequence-length",
                message: format!(
                    "{max_len}; expected 1 ..= {T5_MAX_SEQUENCE_LENGTH} (the pipeline's limit)"
                ),
            });
        }
        self.t5_tokenizer.tokens(prompt, max_len)
    }

    /// CLIP's ids of `prompt` (77 of them for Flux.1).
    pub fn clip_tokens(&self, prompt: &str) -> Result<Vec<u32>> {
        self.clip_tokenizer.tokens(prompt)
    }

    /// The T5 pass of `prompts` prompts of `tokens` ids each, for placing its weights.
    pub fn t5_shape(tokens: usize, prompts: usize) -> PassShape {
        PassShape {
            tokens,
            batch: prompts,
            past: 0,
        }
    }

    /// The CLIP pass of `prompts` prompts, for placing its weights.
    pub fn clip_shape(&self, prompts: usize) -> PassShape {
        PassShape {
            tokens: self.clip_tokenizer.max_length,
            batch: prompts,
            past: 0,
        }
    }

    /// `prompt_embeds` of every prompt in one pass: `[len, d_model]` f32 each (`[512 · 4096]`
    /// for Flux.1-dev at 512 tokens).
    pub fn encode_t5<B: EncoderOps>(
        &self,
        backend: &B,
        weights: &mut impl Weights<B::Weight>,
        ids: &[Vec<u32>],
    ) -> Result<Vec<Vec<f32>>> {
        let prompts: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
        let hidden = self.t5.forward(backend, weights, &prompts)?;
        let d = self.t5.config.d_model;
        let mut rest = hidden.as_slice();
        Ok(prompts
            .iter()
            .map(|p| {
                let (mine, next) = rest.split_at(p.len() * d);
                rest = next;
                mine.to_vec()
            })
            .collect())
    }

    /// `pooled_prompt_embeds` of every prompt in one pass: `[hidden]` f32 each (`[768]` for
    /// Flux.1).
    pub fn encode_clip_pooled<B: EncoderOps>(
        &self,
        backend: &B,
        weights: &mut impl Weights<B::Weight>,
        ids: &[Vec<u32>],
    ) -> Result<Vec<Vec<f32>>> {
        let prompts: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
        self.clip.pooled(backend, weights, &prompts)
    }
}
