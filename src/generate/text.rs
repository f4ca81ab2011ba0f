//! Text ↔ token ids for one checkpoint: its tokenizer (if any), chat template and BOS rules.
//! Usable before a model is loaded, so that a pass can be planned for the real prompts.

use std::path::PathBuf;

use tokenizers::Tokenizer;

use super::chat::{self, Message};
use crate::checkpoint::{GenerationDefaults, TokenizerSource};
use crate::error::{Error, Result};
use crate::model::Checkpoint;

pub struct TextCodec {
    /// None where the checkpoint has none (synthetic benchmarks feed token ids).
    tokenizer: Option<Tokenizer>,
    /// Named in the error when text must be encoded without a tokenizer.
    missing_tokenizer: PathBuf,
    pub defaults: GenerationDefaults,
}

impl TextCodec {
    pub fn open(ckpt: &Checkpoint) -> Result<TextCodec> {
        Ok(TextCodec {
            tokenizer: match ckpt.tokenizer {
                TokenizerSource::Missing => None,
                _ => Some(ckpt.tokenizer()?),
            },
            missing_tokenizer: ckpt.path.join("tokenizer.json"),
            defaults: ckpt.generation.clone(),
        })
    }

    /// The tokenizer component of a diffusers pipeline: `tokenizer.json` and
    /// `tokenizer_config.json` (chat template, BOS/EOS) in `dir`. Without a `tokenizer.json`,
    /// the files a slow Qwen2Tokenizer saves (vocab.json, merges.txt, tokenizer_config.json), as
    /// Qwen/Qwen-Image ships them; see [`crate::checkpoint::open_qwen2_slow`].
    pub fn from_tokenizer_dir(dir: &std::path::Path) -> Result<TextCodec> {
        let path = dir.join("tokenizer.json");
        if crate::checkpoint::is_regular_file(&path)? {
            return Self::from_tokenizer_file(&path);
        }
        Ok(TextCodec {
            tokenizer: Some(crate::checkpoint::open_qwen2_slow(dir)?),
            missing_tokenizer: path,
            defaults: crate::checkpoint::generation_defaults(dir)?,
        })
    }

    /// A `tokenizer.json` file, with `tokenizer_config.json` beside it if there is one.
    pub fn from_tokenizer_file(path: &std::path::Path) -> Result<TextCodec> {
        crate::checkpoint::require_file(path, "the pipeline's tokenizer (tokenizer.json)")?;
        let tokenizer = Tokenizer::from_file(path).map_err(|e| Error::Tokenizer {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let dir = path.parent().unwrap_or(std::path::Path::new("."));
        Ok(TextCodec {
            tokenizer: Some(tokenizer),
            missing_tokenizer: path.to_path_buf(),
            defaults: crate::checkpoint::generation_defaults(dir)?,
        })
    }

    /// Token ids for a conversation rendered with the chat template and `enable_thinking`
    /// (see [`chat::render_with`]).
    pub fn encode_chat_thinking(&self, messages: &[Message], thinking: bool) -> Result<Vec<u32>> {
        let d = &self.defaults;
        let template = d.chat_template.as_deref().ok_or_else(|| Error::NotFound {
            path: self
                .missing_tokenizer
                .with_file_name("tokenizer_config.json"),
            expected: "a chat template (\"chat_template\") to wrap the prompt in".into(),
        })?;
        let text = chat::render_with(
            template,
            messages,
            d.bos_token.as_deref().unwrap_or(""),
            d.eos_token.as_deref().unwrap_or(""),
            Some(thinking),
        )?;
        self.encode_with(&text, true)
    }

    /// Token ids for `text` as typed (the tokenizer adds BOS if the model wants one).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, true)
    }

    /// Token ids for a conversation rendered with the model's chat template.
    pub fn encode_chat(&self, messages: &[Message]) -> Result<Vec<u32>> {
        let d = &self.defaults;
        let template = d.chat_template.as_deref().ok_or_else(|| Error::Flag {
            flag: "--chat",
            message: "this model has no chat template (tokenizer_config.json \"chat_template\" or GGUF tokenizer.chat_template)".into(),
        })?;
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
}
