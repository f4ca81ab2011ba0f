//! A tokenizer folder saved by a slow Qwen2Tokenizer (vocab.json, merges.txt,
//! tokenizer_config.json, maybe added_tokens.json and special_tokens_map.json, no
//! tokenizer.json), rebuilt as a `tokenizers::Tokenizer`. Qwen/Qwen-Image ships its
//! tokenizer/ folder so.
//!
//! The reference is transformers 5 loading such a folder (models/qwen2/tokenization_qwen2.py,
//! tokenization_utils_base.py and tokenization_utils_tokenizers.py):
//! - byte-level BPE from vocab.json and merges.txt (no continuing-subword prefix, no
//!   end-of-word suffix, no unknown token), text composed to NFC, split by Qwen2's regex, bytes
//!   mapped with no prefix space unless `add_prefix_space`, the ByteLevel decoder; no BOS or
//!   EOS is added (Qwen2Tokenizer has none to add);
//! - the added tokens of tokenizer_config.json's `added_tokens_decoder`, in id order, with
//!   their flags; only where the config has no `added_tokens_decoder` (older saves),
//!   added_tokens.json's, each special when it is one of the named special tokens (then also
//!   read from special_tokens_map.json), matched after normalization when not;
//! - then every named special token (bos/eos/unk/sep/pad/cls/mask_token, where Qwen2Tokenizer
//!   makes unk, eos and pad `<|endoftext|>` unless the config says otherwise, and
//!   `additional_special_tokens`), registered again as special with default flags;
//! - `split_special_tokens` to match special tokens as plain text.
//!
//! One choice differs: transformers gives each added token the next free id, whatever id the
//! file declares; ferry keeps the declared id (as transformers 4's slow tokenizer did), and
//! refuses ids that contradict vocab.json. The two agree whenever the added tokens follow the
//! vocabulary or are in it under their ids, as in every Qwen release.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::models::bpe::Vocab;
use tokenizers::{AddedToken, Tokenizer};

use super::byte_bpe::{self, merge_pair, BadMerge, ByteLevelBpe, QWEN2_SPLIT};
use super::hf::read_json;
use super::is_regular_file;
use crate::error::{Error, Result};

/// The `tokenizer_class` values built here.
const QWEN2_CLASSES: [&str; 2] = ["Qwen2Tokenizer", "Qwen2TokenizerFast"];

/// Named special tokens, in transformers' order (`SPECIAL_TOKENS_ATTRIBUTES`).
const NAMED_SPECIAL: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// Lists of further special tokens (the second is transformers 5's name for the first).
const EXTRA_SPECIAL: [&str; 2] = ["additional_special_tokens", "extra_special_tokens"];

/// Qwen2Tokenizer's default for unk, eos and pad.
const ENDOFTEXT: &str = "<|endoftext|>";

/// The tokenizer saved in `dir` as a slow Qwen2Tokenizer. Without vocab.json the error names
/// `dir/tokenizer.json`, the file looked for first.
pub fn open_qwen2_slow(dir: &Path) -> Result<Tokenizer> {
    let vocab_path = dir.join("vocab.json");
    let merges_path = dir.join("merges.txt");
    if !is_regular_file(&vocab_path)? {
        return Err(Error::NotFound {
            path: dir.join("tokenizer.json"),
            expected: "the tokenizer (tokenizer.json; vocab.json + merges.txt, as a slow \
                       Qwen2Tokenizer saves them, would also do)"
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
    let bad_config = |message: String| Error::Tokenizer {
        path: config_path.clone(),
        message,
    };
    if let Some(class) = config.get("tokenizer_class").and_then(Value::as_str) {
        if !QWEN2_CLASSES.contains(&class) {
            return Err(bad_config(format!(
                "tokenizer_class is {class:?}; from vocab.json + merges.txt ferry builds only \
                 {QWEN2_CLASSES:?} (another tokenizer needs its tokenizer.json)"
            )));
        }
    }
    let add_prefix_space = flag(&config, "add_prefix_space", false).map_err(bad_config)?;
    let split_special_tokens = flag(&config, "split_special_tokens", false).map_err(bad_config)?;

    let mut vocab = read_vocab(&vocab_path)?;
    let merges = read_merges(&merges_path, &vocab)?;
    let (declared, specials) = added_tokens(dir, &config_path, &config)?;
    for d in &declared {
        keep_declared_id(&mut vocab, d.id, &d.token.content).map_err(|message| {
            Error::Tokenizer {
                path: d.file.clone(),
                message,
            }
        })?;
    }

    let mut tokenizer = byte_bpe::build(ByteLevelBpe {
        vocab,
        merges,
        split: Some(QWEN2_SPLIT),
        nfc: true,
        add_prefix_space,
    })
    .map_err(|message| Error::Tokenizer {
        path: vocab_path.clone(),
        message,
    })?;
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
    register(
        &mut tokenizer,
        specials
            .into_iter()
            .map(|content| AddedToken::from(content, true))
            .collect(),
    )?;
    tokenizer.set_encode_special_tokens(split_special_tokens);
    Ok(tokenizer)
}

/// vocab.json: a JSON object of token (in the byte alphabet) → id, no id given twice.
pub(super) fn read_vocab(path: &Path) -> Result<Vocab> {
    let bad = |message: String| Error::Tokenizer {
        path: path.to_path_buf(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let vocab: HashMap<String, u32> = serde_json::from_slice(&bytes).map_err(|e| {
        bad(format!(
            "{e}; expected a JSON object of token → id (a whole number ≥ 0)"
        ))
    })?;
    let mut by_id: HashMap<u32, &str> = HashMap::with_capacity(vocab.len());
    for (token, &id) in &vocab {
        if let Some(other) = by_id.insert(id, token) {
            let (a, b) = if other < token.as_str() {
                (other, token.as_str())
            } else {
                (token.as_str(), other)
            };
            return Err(bad(format!(
                "id {id} is given to both {a:?} and {b:?}; each token needs its own id"
            )));
        }
    }
    Ok(vocab.into_iter().collect())
}

/// merges.txt: one "left right" merge a line, by rank, after an optional `#version` line;
/// both sides and the merged token in `vocab`. The error names the line (counted from 1).
pub(super) fn read_merges(path: &Path, vocab: &Vocab) -> Result<Vec<(String, String)>> {
    let bad = |message: String| Error::Tokenizer {
        path: path.to_path_buf(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        bad(format!(
            "not UTF-8 text (byte {}); expected one merge a line",
            e.utf8_error().valid_up_to()
        ))
    })?;
    let mut merges = Vec::new();
    for (i, line) in text.lines().enumerate() {
        // The tokenizers library skips a `#version` line wherever it is; so does ferry.
        if line.starts_with("#version") {
            continue;
        }
        match merge_pair(line, vocab) {
            Ok((left, right)) => merges.push((left.to_string(), right.to_string())),
            Err(BadMerge::NotAPair) => {
                return Err(bad(format!(
                    "line {}: {line:?} is not a merge; expected two tokens separated by one space",
                    i + 1
                )))
            }
            Err(BadMerge::NotInVocab(side)) => {
                return Err(bad(format!(
                    "line {}: merge {line:?} names {side:?}, which is not in vocab.json",
                    i + 1
                )))
            }
        }
    }
    Ok(merges)
}

/// An added token with the id its file declares.
pub(super) struct Declared {
    pub id: u32,
    pub token: AddedToken,
    /// tokenizer_config.json or added_tokens.json, for errors.
    pub file: PathBuf,
}

/// The added tokens with declared ids (id order), and the named and extra special tokens to
/// register after them (transformers' order, each once).
pub(super) fn added_tokens(
    dir: &Path,
    config_path: &Path,
    config: &Value,
) -> Result<(Vec<Declared>, Vec<String>)> {
    let bad = |path: &Path, message: String| Error::Tokenizer {
        path: path.to_path_buf(),
        message,
    };
    let mut named = named_special_tokens(config).map_err(|m| bad(config_path, m))?;
    let mut declared: Vec<Declared> = Vec::new();
    match config.get("added_tokens_decoder") {
        Some(Value::Object(entries)) => {
            for (key, entry) in entries {
                let id = key.parse::<u32>().map_err(|_| {
                    bad(
                        config_path,
                        format!(
                            "added_tokens_decoder has the key {key:?}; expected token ids \
                             (whole numbers ≥ 0)"
                        ),
                    )
                })?;
                let token = added_token(entry)
                    .map_err(|m| bad(config_path, format!("added_tokens_decoder[{key:?}]: {m}")))?;
                declared.push(Declared {
                    id,
                    token,
                    file: config_path.to_path_buf(),
                });
            }
        }
        Some(Value::Null) | None => {
            // Legacy saves: special_tokens_map.json names the special tokens, added_tokens.json
            // lists the added ones without flags.
            let map_path = dir.join("special_tokens_map.json");
            if is_regular_file(&map_path)? {
                let map = read_json(&map_path)?;
                let from_map = named_special_tokens(&map).map_err(|m| bad(&map_path, m))?;
                named.named.extend(from_map.named);
                for token in from_map.extra {
                    if !named.extra.contains(&token) {
                        named.extra.push(token);
                    }
                }
            }
            let list_path = dir.join("added_tokens.json");
            if is_regular_file(&list_path)? {
                declared = legacy_added_tokens(&list_path, &named.all())?;
            }
        }
        Some(other) => {
            return Err(bad(
                config_path,
                format!(
                    "added_tokens_decoder is {}; expected an object of id → {{\"content\", …}}",
                    short(other)
                ),
            ))
        }
    }
    declared.sort_by_key(|d| d.id);
    Ok((declared, named.all()))
}

/// added_tokens.json: token → id, each special when it is one of `specials`.
fn legacy_added_tokens(path: &Path, specials: &[String]) -> Result<Vec<Declared>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let list: HashMap<String, u32> =
        serde_json::from_slice(&bytes).map_err(|e| Error::Tokenizer {
            path: path.to_path_buf(),
            message: format!("{e}; expected a JSON object of token → id (a whole number ≥ 0)"),
        })?;
    Ok(list
        .into_iter()
        .map(|(content, id)| {
            let special = specials.contains(&content);
            Declared {
                id,
                token: AddedToken::from(content, special),
                file: path.to_path_buf(),
            }
        })
        .collect())
}

/// One `added_tokens_decoder` entry: `content` and the flags, each optional with
/// transformers' default (`normalized`: not `special`; the others false).
fn added_token(entry: &Value) -> std::result::Result<AddedToken, String> {
    let content = entry
        .get("content")
        .and_then(Value::as_str)
        .filter(|c| !c.is_empty())
        .ok_or_else(|| {
            format!(
                "{} has no \"content\" string; expected {{\"content\": \"<|…|>\", \"special\": \
                 true, …}}",
                short(entry)
            )
        })?;
    let special = flag(entry, "special", false)?;
    Ok(AddedToken::from(content.to_string(), special)
        .lstrip(flag(entry, "lstrip", false)?)
        .rstrip(flag(entry, "rstrip", false)?)
        .single_word(flag(entry, "single_word", false)?)
        .normalized(flag(entry, "normalized", !special)?))
}

/// Put an added token in the vocabulary under its declared id, unless it is there already;
/// an error if vocab.json gives the token or the id otherwise.
pub(super) fn keep_declared_id(
    vocab: &mut Vocab,
    id: u32,
    content: &str,
) -> std::result::Result<(), String> {
    if let Some(&found) = vocab.get(content) {
        if found == id {
            return Ok(());
        }
        return Err(format!(
            "added token {content:?} is declared with id {id}, but vocab.json (or an earlier \
             added token) gives it id {found}"
        ));
    }
    if let Some((other, _)) = vocab.iter().find(|(_, &i)| i == id) {
        return Err(format!(
            "added token {content:?} is declared with id {id}, which vocab.json (or an earlier \
             added token) gives to {other:?}"
        ));
    }
    vocab.insert(content.to_string(), id);
    Ok(())
}

/// The special tokens a config (tokenizer_config.json or special_tokens_map.json) names.
struct SpecialTokens {
    /// `bos_token` … `mask_token` → token, None where the config says null.
    named: HashMap<&'static str, Option<String>>,
    /// `additional_special_tokens`.
    extra: Vec<String>,
}

impl SpecialTokens {
    /// Named ones first, with Qwen2Tokenizer's defaults where not given, then the extra ones;
    /// each once.
    fn all(&self) -> Vec<String> {
        let mut seen = HashSet::new();
        let named = NAMED_SPECIAL
            .iter()
            .filter_map(|key| match self.named.get(key) {
                Some(token) => token.clone(),
                None if matches!(*key, "unk_token" | "eos_token" | "pad_token") => {
                    Some(ENDOFTEXT.to_string())
                }
                None => None,
            });
        named
            .chain(self.extra.iter().cloned())
            .filter(|t| seen.insert(t.clone()))
            .collect()
    }
}

/// The named and extra special tokens of `config`; a token is a string or `{"content": …}`.
fn named_special_tokens(config: &Value) -> std::result::Result<SpecialTokens, String> {
    let token = |key: &str, v: &Value| -> std::result::Result<String, String> {
        match v {
            Value::String(s) => Ok(s.clone()),
            Value::Object(o) => match o.get("content") {
                Some(Value::String(s)) => Ok(s.clone()),
                _ => Err(format!(
                    "{key} is {}; expected a token string or {{\"content\": string}}",
                    short(v)
                )),
            },
            _ => Err(format!(
                "{key} is {}; expected a token string or {{\"content\": string}}",
                short(v)
            )),
        }
    };
    let mut named = HashMap::new();
    for key in NAMED_SPECIAL {
        match config.get(key) {
            None => {}
            Some(Value::Null) => {
                named.insert(key, None);
            }
            Some(v) => {
                named.insert(key, Some(token(key, v)?));
            }
        }
    }
    let mut extra = Vec::new();
    for key in EXTRA_SPECIAL {
        let values: Vec<&Value> = match config.get(key) {
            None | Some(Value::Null) => continue,
            Some(Value::Array(list)) => list.iter().collect(),
            // Model-specific special tokens by name (transformers 5).
            Some(Value::Object(by_name)) => by_name.values().collect(),
            Some(v) => {
                return Err(format!(
                    "{key} is {}; expected a list of token strings",
                    short(v)
                ))
            }
        };
        for v in values {
            let t = token(key, v)?;
            if !extra.contains(&t) {
                extra.push(t);
            }
        }
    }
    Ok(SpecialTokens { named, extra })
}

/// The boolean `key` of `json`, `default` where absent or null.
pub(super) fn flag(json: &Value, key: &str, default: bool) -> std::result::Result<bool, String> {
    match json.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(format!("{key} is {}; expected true or false", short(v))),
    }
}

/// A JSON value for an error message, cut to 60 characters.
fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 60 {
        s.chars().take(57).collect::<String>() + "..."
    } else {
        s
    }
}
