//! CLIP's tokenizer rebuilt from a folder without tokenizer.json (vocab.json, merges.txt,
//! tokenizer_config.json, special_tokens_map.json), as black-forest-labs/FLUX.1-dev ships
//! its tokenizer/.
//!
//! The reference is transformers 5's `CLIPTokenizer` (models/clip/tokenization_clip.py):
//! text composed to NFC, runs of whitespace made one space, lower-cased; split by CLIP's
//! regex (the special tokens, contractions, letter runs, single digits, other non-space
//! runs; whitespace dropped), each piece mapped to GPT-2's byte alphabet (with GPT-2's own
//! split as well, as `ByteLevel(add_prefix_space=False)` does); BPE with `</w>` ending each
//! word and `<|endoftext|>` for unknown symbols; the added tokens of
//! tokenizer_config.json, then the named special tokens. BOS/EOS, truncation and padding are
//! the caller's (the pipeline's tokenizer call).

use std::path::Path;

use serde_json::Value;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use super::hf::read_json;
use super::is_regular_file;
use super::slow_tokenizer::{added_tokens, keep_declared_id, read_merges, read_vocab};
use crate::error::{Error, Result};

/// CLIP's split regex (`pre_tokenizers.Split(…, behavior="removed", invert=True)`).
const CLIP_SPLIT: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// CLIPTokenizer's unknown token (and its default EOS and pad).
pub const CLIP_ENDOFTEXT: &str = "<|endoftext|>";

/// CLIPTokenizer's default BOS.
pub const CLIP_STARTOFTEXT: &str = "<|startoftext|>";

/// The CLIP tokenizer in `dir`: its tokenizer.json when there is one, else rebuilt from
/// vocab.json and merges.txt.
pub fn open_clip_tokenizer(dir: &Path) -> Result<Tokenizer> {
    let json = dir.join("tokenizer.json");
    if is_regular_file(&json)? {
        return Tokenizer::from_file(&json).map_err(|e| Error::Tokenizer {
            path: json,
            message: e.to_string(),
        });
    }
    let vocab_path = dir.join("vocab.json");
    let merges_path = dir.join("merges.txt");
    if !is_regular_file(&vocab_path)? {
        return Err(Error::NotFound {
            path: vocab_path,
            expected: "the CLIP tokenizer: tokenizer.json, or vocab.json + merges.txt as \
                       CLIPTokenizer saves them"
                .into(),
        });
    }
    if !is_regular_file(&merges_path)? {
        return Err(Error::NotFound {
            path: merges_path,
            expected: "the BPE merges that go with vocab.json (or a tokenizer.json instead)".into(),
        });
    }
    let config_path = dir.join("tokenizer_config.json");
    let config = if is_regular_file(&config_path)? {
        read_json(&config_path)?
    } else {
        Value::Object(Default::default())
    };
    if let Some(class) = config.get("tokenizer_class").and_then(Value::as_str) {
        if !class.starts_with("CLIPTokenizer") {
            return Err(Error::Tokenizer {
                path: config_path,
                message: format!(
                    "tokenizer_class is {class:?}; expected \"CLIPTokenizer\" (a CLIP text encoder's)"
                ),
            });
        }
    }
    let mut vocab = read_vocab(&vocab_path)?;
    let merges = read_merges(&merges_path, &vocab)?;
    let bad_vocab = |message: String| Error::Tokenizer {
        path: vocab_path.clone(),
        message,
    };
    if !vocab.contains_key(CLIP_ENDOFTEXT) {
        return Err(bad_vocab(format!(
            "no {CLIP_ENDOFTEXT:?}; expected CLIP's vocabulary (its unknown, end and pad token)"
        )));
    }
    let (declared, specials) = added_tokens(dir, &config_path, &config)?;
    for d in &declared {
        keep_declared_id(&mut vocab, d.id, &d.token.content).map_err(|message| {
            Error::Tokenizer {
                path: d.file.clone(),
                message,
            }
        })?;
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix("</w>".into())
        .unk_token(CLIP_ENDOFTEXT.into())
        .fuse_unk(false)
        .build()
        .map_err(|e| bad_vocab(format!("CLIP BPE: {e}")))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let whitespace = Replace::new(
        tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
        " ",
    )
    .map_err(|e| bad_vocab(format!("whitespace normalizer: {e}")))?;
    tokenizer
        .with_normalizer(Some(NormalizerSequence::new(vec![
            NFC.into(),
            whitespace.into(),
            Lowercase.into(),
        ])))
        .map_err(|e| bad_vocab(format!("normalizer: {e}")))?;
    let split = Split::new(
        SplitPattern::Regex(CLIP_SPLIT.into()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(|e| bad_vocab(format!("split regex: {e}")))?;
    tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
        split.into(),
        ByteLevel::new(false, true, true).into(),
    ])));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    let register = |tokenizer: &mut Tokenizer, tokens: Vec<AddedToken>| {
        tokenizer.add_tokens(tokens).map_err(|e| Error::Tokenizer {
            path: config_path.clone(),
            message: format!("added tokens: {e}"),
        })
    };
    register(
        &mut tokenizer,
        declared.into_iter().map(|d| d.token).collect(),
    )?;
    // CLIPTokenizer's BOS is <|startoftext|> when the config names none.
    let bos =
        (tokenizer.token_to_id(CLIP_STARTOFTEXT).is_some()).then(|| CLIP_STARTOFTEXT.to_string());
    register(
        &mut tokenizer,
        specials
            .into_iter()
            .chain(bos)
            .map(|content| AddedToken::from(content, true))
            .collect(),
    )?;
    Ok(tokenizer)
}
