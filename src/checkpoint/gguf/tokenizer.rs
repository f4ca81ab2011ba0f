//! Tokenizers described by GGUF metadata, rebuilt as `tokenizers::Tokenizer`s.
//!
//! A GGUF file carries no `tokenizer.json`, only the vocabulary, merges, scores and token types
//! under `tokenizer.ggml.*`. The reference for what those mean is transformers
//! (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`, integrations/gguf/
//! gguf_tokenizer_mapping.py in transformers 5.24): ferry must encode and decode exactly as it
//! does, so the pieces below follow its choices, including the odd ones, each noted where made.
//! `scripts/make_tokenizer_vectors.py` records transformers' answers; tests/gguf_tokenizer.rs
//! compares.
//!
//! Two vocabulary kinds (`tokenizer.ggml.model`):
//! - "gpt2": byte-level BPE. Text is split by a regex chosen by `tokenizer.ggml.pre`, every
//!   byte spelled as one printable character (GPT-2's byte alphabet), then merged.
//! - "llama": SentencePiece-style BPE. Spaces become `▁`, one `▁` is put before the text,
//!   bytes missing from the vocabulary fall back to `<0xAB>` tokens, and the merges (which the
//!   file does not list) are recovered from the token scores.

use std::collections::{HashMap, HashSet};

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::replace::Replace;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

use super::Meta;
use crate::checkpoint::byte_bpe::{
    self, byte_alphabet, merge_pair, BadMerge, ByteLevelBpe, QWEN2_SPLIT,
};
use crate::checkpoint::{GenerationDefaults, GgufTokenizerSpec, TokenizerSource};

/// `tokenizer.ggml.token_type` values that matter here (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// SentencePiece's stand-in for a space.
const SPACE_MARK: char = '\u{2581}';

/// The tokenizer models `build` knows, for error messages.
const SUPPORTED_MODELS: &str = "\"gpt2\" (byte-level BPE) and \"llama\" (SentencePiece-style BPE)";

/// Build the tokenizer `spec` describes; the error says what in the metadata is wrong.
///
/// `spec.add_bos` is taken as given. For a "llama" vocabulary whose file has no
/// `tokenizer.ggml.add_bos_token`, llama.cpp and transformers both add BOS, so the reader
/// should fill in `true` there. When `add_bos` (`add_eos`) is set but there is no BOS (EOS) id,
/// nothing is added, as in transformers.
///
/// Not rebuilt as transformers would: vocabularies whose builder transformers picks by model
/// architecture (Gemma's and Phi-3's SentencePiece variants), which the spec does not name;
/// they get the plain "llama" treatment.
pub fn build(spec: &GgufTokenizerSpec) -> Result<Tokenizer, String> {
    let vocabulary = match spec.model.as_str() {
        "gpt2" => byte_level,
        "llama" => sentencepiece,
        other => {
            return Err(format!(
                "tokenizer.ggml.model {other:?} is not supported; supported: {SUPPORTED_MODELS}"
            ))
        }
    };
    check(spec)?;
    let mut tokenizer = vocabulary(spec)?;
    add_special_tokens(&mut tokenizer, spec)?;
    let template = bos_eos_template(&tokenizer, spec)?;
    tokenizer.with_post_processor(Some(template));
    Ok(tokenizer)
}

/// Consistency of the metadata arrays and ids, so that nothing later can index out of range.
fn check(spec: &GgufTokenizerSpec) -> Result<(), String> {
    let n = spec.tokens.len();
    if n == 0 {
        return Err("tokenizer.ggml.tokens is empty".into());
    }
    if u32::try_from(n).is_err() {
        return Err(format!(
            "tokenizer.ggml.tokens has {n} entries, more than a u32 id can name"
        ));
    }
    if !spec.scores.is_empty() && spec.scores.len() != n {
        return Err(format!(
            "tokenizer.ggml.scores has {} entries but tokenizer.ggml.tokens has {n}",
            spec.scores.len()
        ));
    }
    if let Some(i) = spec.scores.iter().position(|s| s.is_nan()) {
        return Err(format!(
            "tokenizer.ggml.scores[{i}] (token {:?}) is NaN",
            spec.tokens[i]
        ));
    }
    if !spec.token_types.is_empty() && spec.token_types.len() != n {
        return Err(format!(
            "tokenizer.ggml.token_type has {} entries but tokenizer.ggml.tokens has {n}",
            spec.token_types.len()
        ));
    }
    for (key, id) in [
        ("bos_token_id", spec.bos_id),
        ("eos_token_id", spec.eos_id),
        ("unknown_token_id", spec.unknown_id),
        ("padding_token_id", spec.padding_id),
    ] {
        if let Some(id) = id {
            if id as usize >= n {
                return Err(format!(
                    "tokenizer.ggml.{key} is {id}, but there are only {n} tokens (ids 0..{})",
                    n - 1
                ));
            }
        }
    }
    Ok(())
}

/// Byte-level BPE ("gpt2"), as transformers' GPT2Tokenizer plus the GGUF split regex.
fn byte_level(spec: &GgufTokenizerSpec) -> Result<Tokenizer, String> {
    if spec.merges.is_empty() {
        return Err("tokenizer.ggml.model is \"gpt2\" but tokenizer.ggml.merges is missing or empty; a byte-level BPE vocabulary needs its merges".into());
    }
    // Tokens are normally stored in the byte alphabet already ("Ġthe" for " the"). A token using
    // any other character is stored raw (" the", "你好"): respell it from its UTF-8 bytes so that
    // it can be reached and decoded. A later duplicate wins, as in a Python dict.
    let alphabet = byte_alphabet();
    let in_alphabet: HashSet<char> = alphabet.into_iter().collect();
    let vocab: Vocab = spec
        .tokens
        .iter()
        .enumerate()
        .map(|(id, token)| {
            let spelled = if token.chars().all(|c| in_alphabet.contains(&c)) {
                token.clone()
            } else {
                token
                    .bytes()
                    .map(|b| alphabet[b as usize])
                    .collect::<String>()
            };
            (spelled, id as u32)
        })
        .collect();
    let merges = listed_merges(spec, &vocab)?;
    byte_bpe::build(ByteLevelBpe {
        vocab,
        merges,
        split: split_regex(spec.pre.as_deref()),
        nfc: false,
        add_prefix_space: false,
    })
    .map_err(|e| {
        format!(
            "{e} (from tokenizer.ggml.tokens, merges and pre {:?})",
            spec.pre
        )
    })
}

/// The regex that splits text before byte-level BPE, by `tokenizer.ggml.pre`; None means
/// GPT-2's regex. The table is transformers' `GGUF_PRE_TOKENIZER_SPLITS`: every value it does
/// not list ("default", "gpt2", "smollm", "starcoder", …, and values unknown to both) gets
/// GPT-2's regex, as there.
fn split_regex(pre: Option<&str>) -> Option<&'static str> {
    const LLAMA3: &str = concat!(
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}",
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    );
    // Qwen2's, with combining marks kept in words.
    const QWEN35: &str = concat!(
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}",
        r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    );
    // Case-aware words, single digits.
    const TEKKEN: &str = concat!(
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+",
        r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*",
        r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    );
    // Case-aware words with contractions attached, up to 3 digits.
    const GPT4O: &str = concat!(
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    );
    Some(match pre? {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" | "dbrx" | "smaug-bpe" => LLAMA3,
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => QWEN2_SPLIT,
        "qwen35" => QWEN35,
        "tekken" => TEKKEN,
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => GPT4O,
        _ => return None,
    })
}

/// `tokenizer.ggml.merges` ("left right") as pairs, each side checked against the vocabulary.
fn listed_merges(spec: &GgufTokenizerSpec, vocab: &Vocab) -> Result<Vec<(String, String)>, String> {
    spec.merges
        .iter()
        .enumerate()
        .map(|(i, merge)| match merge_pair(merge, vocab) {
            Ok((left, right)) => Ok((left.to_string(), right.to_string())),
            Err(BadMerge::NotAPair) => Err(format!(
                "tokenizer.ggml.merges[{i}] is {merge:?}; expected two tokens separated by one space"
            )),
            Err(BadMerge::NotInVocab(side)) => Err(format!(
                "tokenizer.ggml.merges[{i}] ({merge:?}) names {side:?}, which is not in tokenizer.ggml.tokens"
            )),
        })
        .collect()
}

/// SentencePiece-style BPE ("llama"), as transformers' LlamaTokenizer built from a GGUF.
fn sentencepiece(spec: &GgufTokenizerSpec) -> Result<Tokenizer, String> {
    // Tokens as stored; a later duplicate wins, as in a Python dict.
    let vocab: Vocab = spec
        .tokens
        .iter()
        .enumerate()
        .map(|(id, token)| (token.clone(), id as u32))
        .collect();
    let merges = if !spec.merges.is_empty() {
        listed_merges(spec, &vocab)?
    } else if !spec.scores.is_empty() {
        merges_from_scores(&spec.tokens, &spec.scores, &vocab)
    } else {
        return Err("tokenizer.ggml.model is \"llama\" but the file has neither tokenizer.ggml.scores nor tokenizer.ggml.merges to derive the merges from".into());
    };
    // No unknown token in the model, as in transformers: a byte missing from the vocabulary
    // (no `<0xAB>` token) is dropped rather than encoded as `<unk>`.
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .fuse_unk(true)
        .byte_fallback(true)
        .build()
        .map_err(|e| format!("SentencePiece BPE from tokenizer.ggml.tokens/scores: {e}"))?;

    let mut tokenizer = Tokenizer::new(bpe);
    // "▁" for every space and one before the text, but not again after a special token.
    tokenizer.with_pre_tokenizer(Some(Metaspace::new(
        SPACE_MARK,
        PrependScheme::First,
        false,
    )));
    let replace = Replace::new(SPACE_MARK.to_string(), " ").map_err(|e| e.to_string())?;
    tokenizer.with_decoder(Some(DecoderSequence::new(vec![
        replace.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
        // The space that stood for the "▁" put before the text.
        Strip::new(' ', 1, 0).into(),
    ])));
    Ok(tokenizer)
}

/// BPE merges implied by a SentencePiece vocabulary, the way transformers recovers them
/// (`generate_merges` with scores): every split of every token into two vocabulary tokens is a
/// merge ranked by the whole token's score, best first; ties go to the longer left part, then
/// the longer right part, then to the order found: tokens in file order, the splits of one
/// token by (left id, right id). Lengths count characters, not bytes.
fn merges_from_scores(tokens: &[String], scores: &[f32], vocab: &Vocab) -> Vec<(String, String)> {
    // A token listed twice keeps its first position and its last score (a Python dict).
    let mut score_of: HashMap<&str, f32> = HashMap::new();
    let mut order: Vec<&str> = Vec::new();
    for (token, &score) in tokens.iter().zip(scores) {
        if score_of.insert(token, score).is_none() {
            order.push(token);
        }
    }

    struct Merge<'a> {
        left: &'a str,
        right: &'a str,
        score: f32,
        left_chars: usize,
        right_chars: usize,
    }
    let mut merges: Vec<Merge> = Vec::new();
    for token in order {
        // -0.0 and 0.0 compare equal in Python; total_cmp would order them.
        let score = score_of[token] + 0.0;
        let start = merges.len();
        let chars = token.chars().count();
        for (left_chars, (at, _)) in token.char_indices().enumerate().skip(1) {
            let (left, right) = token.split_at(at);
            if vocab.contains_key(left) && vocab.contains_key(right) {
                merges.push(Merge {
                    left,
                    right,
                    score,
                    left_chars,
                    right_chars: chars - left_chars,
                });
            }
        }
        merges[start..].sort_by_key(|m| (vocab[m.left], vocab[m.right]));
    }
    // Stable, so equal keys keep the order above.
    merges.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then(b.left_chars.cmp(&a.left_chars))
            .then(b.right_chars.cmp(&a.right_chars))
    });
    merges
        .into_iter()
        .map(|m| (m.left.to_string(), m.right.to_string()))
        .collect()
}

/// Register the tokens that must be matched whole in text, in the order transformers adds
/// them (the order decides the id of a token that is not in the vocabulary, and which flags a
/// token added twice keeps):
/// 1. the defaults of the transformers class that builds the vocabulary: `<|endoftext|>`
///    (GPT2Tokenizer) or `<s>`, `</s>`, `<unk>` (LlamaTokenizer), special, even when the file
///    does not have them (they then get new ids after the vocabulary);
/// 2. control tokens (type 3) as special; for byte-level BPE only those spelled in the byte
///    alphabet (another spelling is a llama.cpp mislabel);
/// 3. user-defined tokens (type 4, like `<think>`) as plain, non-special added tokens, when the
///    vocabulary has them under that spelling; these replace an earlier registration;
/// 4. the BOS, EOS, unknown and padding tokens, special, unless already registered.
fn add_special_tokens(tokenizer: &mut Tokenizer, spec: &GgufTokenizerSpec) -> Result<(), String> {
    let whole = |content: &str, special: bool| {
        AddedToken::from(content.to_string(), special).normalized(false)
    };
    let defaults: &[&str] = match spec.model.as_str() {
        "gpt2" => &["<|endoftext|>"],
        _ => &["<s>", "</s>", "<unk>"],
    };
    tokenizer
        .add_special_tokens(defaults.iter().map(|t| whole(t, true)).collect::<Vec<_>>())
        .map_err(|e| e.to_string())?;

    let of_type = |wanted: i32| {
        spec.tokens
            .iter()
            .zip(&spec.token_types)
            .filter(move |(_, &t)| t == wanted)
            .map(|(token, _)| token.as_str())
    };
    let in_alphabet: HashSet<char> = byte_alphabet().into_iter().collect();
    let control: Vec<AddedToken> = of_type(TOKEN_TYPE_CONTROL)
        .filter(|t| spec.model != "gpt2" || t.chars().all(|c| in_alphabet.contains(&c)))
        .map(|t| whole(t, true))
        .collect();
    tokenizer
        .add_special_tokens(control)
        .map_err(|e| e.to_string())?;
    let user_defined: Vec<AddedToken> = of_type(TOKEN_TYPE_USER_DEFINED)
        .filter(|t| tokenizer.token_to_id(t).is_some())
        .map(|t| whole(t, false))
        .collect();
    tokenizer
        .add_tokens(user_defined)
        .map_err(|e| e.to_string())?;

    let mut named: Vec<AddedToken> = Vec::new();
    let mut seen: HashSet<&str> = HashSet::new();
    for id in [spec.bos_id, spec.eos_id, spec.unknown_id, spec.padding_id]
        .into_iter()
        .flatten()
    {
        let content = spec.tokens[id as usize].as_str();
        let registered = tokenizer
            .get_added_vocabulary()
            .get_vocab()
            .contains_key(content);
        if !registered && seen.insert(content) {
            named.push(whole(content, true));
        }
    }
    tokenizer
        .add_special_tokens(named)
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// `[BOS] $A [EOS]` with each part per `add_bos`/`add_eos`, as transformers'
/// `update_post_processor` writes it (pairs get `[BOS] $B [EOS]` again, type id 1). The ids are
/// looked up by the tokens' text, as there.
fn bos_eos_template(
    tokenizer: &Tokenizer,
    spec: &GgufTokenizerSpec,
) -> Result<TemplateProcessing, String> {
    let token = |id: Option<u32>, wanted: bool| -> Option<(String, u32)> {
        let id = id.filter(|_| wanted)?;
        let content = &spec.tokens[id as usize];
        Some((
            content.clone(),
            tokenizer.token_to_id(content).unwrap_or(id),
        ))
    };
    let bos = token(spec.bos_id, spec.add_bos);
    let eos = token(spec.eos_id, spec.add_eos);

    // Built as tokenizer.json spells it: a template string would break on tokens with ':' or
    // spaces in them.
    let part = |name: &str, type_id: u32| -> Vec<serde_json::Value> {
        let bos = bos
            .iter()
            .map(|(content, _)| special_piece(content, type_id));
        let eos = eos
            .iter()
            .map(|(content, _)| special_piece(content, type_id));
        bos.chain([sequence_piece(name, type_id)])
            .chain(eos)
            .collect()
    };
    let single = part("A", 0);
    let pair: Vec<_> = single.iter().cloned().chain(part("B", 1)).collect();
    let special_tokens: serde_json::Map<String, serde_json::Value> = bos
        .iter()
        .chain(eos.iter())
        .map(|(content, id)| {
            let entry = serde_json::json!({"id": content, "ids": [id], "tokens": [content]});
            (content.clone(), entry)
        })
        .collect();
    let template = serde_json::json!({
        "type": "TemplateProcessing",
        "single": single,
        "pair": pair,
        "special_tokens": special_tokens,
    });
    serde_json::from_value(template).map_err(|e| format!("BOS/EOS template: {e}"))
}

/// A template piece standing for sequence `name` ("A" or "B"), as tokenizer.json writes it.
fn sequence_piece(name: &str, type_id: u32) -> serde_json::Value {
    serde_json::json!({"Sequence": {"id": name, "type_id": type_id}})
}

/// A template piece standing for the special token `content`, as tokenizer.json writes it.
fn special_piece(content: &str, type_id: u32) -> serde_json::Value {
    serde_json::json!({"SpecialToken": {"id": content, "type_id": type_id}})
}

/// The tokenizer and generation defaults from a GGUF file's metadata (`tokenizer.ggml.*`).
pub fn tokenizer_and_generation(
    meta: &Meta,
    vocab_size: usize,
) -> crate::error::Result<(TokenizerSource, GenerationDefaults)> {
    let strings = |key: &str| meta.opt_array(key, "strings", |v| v.as_str().map(str::to_string));
    let tokens = strings("tokenizer.ggml.tokens")?.unwrap_or_default();
    let scores = meta
        .opt_array("tokenizer.ggml.scores", "float32 scores", |v| {
            v.as_f64().map(|x| x as f32)
        })?
        .unwrap_or_default();
    let token_types = meta
        .opt_array("tokenizer.ggml.token_type", "int32 token types", |v| {
            v.as_i64().and_then(|x| i32::try_from(x).ok())
        })?
        .unwrap_or_default();
    let merges = strings("tokenizer.ggml.merges")?.unwrap_or_default();
    let model = meta.opt_str("tokenizer.ggml.model")?.map(str::to_string);

    if !tokens.is_empty() && tokens.len() != vocab_size {
        return Err(meta.bad(format!(
            "tokenizer.ggml.tokens has {} entries but token_embd.weight has {vocab_size} rows",
            tokens.len()
        )));
    }
    for (key, n) in [
        ("tokenizer.ggml.scores", scores.len()),
        ("tokenizer.ggml.token_type", token_types.len()),
    ] {
        if n != 0 && n != tokens.len() {
            return Err(meta.bad(format!(
                "{key} has {n} entries but tokenizer.ggml.tokens has {}",
                tokens.len()
            )));
        }
    }

    // llama.cpp's defaults for SentencePiece vocabularies when the ids are not given.
    let spm = model.as_deref() == Some("llama");
    let id = |key: &str, spm_default: u32| -> crate::error::Result<Option<u32>> {
        let id = meta.opt_u32(key)?.or(spm.then_some(spm_default));
        match id {
            Some(i) if !tokens.is_empty() && i as usize >= tokens.len() => Err(meta.bad(format!(
                "{key} is {i}, outside the vocabulary of {} tokens",
                tokens.len()
            ))),
            _ => Ok(id),
        }
    };
    let bos_id = id("tokenizer.ggml.bos_token_id", 1)?;
    let eos_id = id("tokenizer.ggml.eos_token_id", 2)?;
    let unknown_id = id("tokenizer.ggml.unknown_token_id", 0)?;
    let padding_id = meta.opt_u32("tokenizer.ggml.padding_token_id")?;
    let eot_id = meta.opt_u32("tokenizer.ggml.eot_token_id")?;
    let eom_id = meta.opt_u32("tokenizer.ggml.eom_token_id")?;
    let add_bos = meta
        .opt_bool("tokenizer.ggml.add_bos_token")?
        .unwrap_or(spm);
    let add_eos = meta
        .opt_bool("tokenizer.ggml.add_eos_token")?
        .unwrap_or(false);

    let token = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize).cloned());
    let mut eos_token_ids = Vec::new();
    // eot (end of turn) and eom (end of message, Llama 3.1 tool calls) end generation too,
    // as they do in the models' generation_config.json.
    for id in [eos_id, eot_id, eom_id].into_iter().flatten() {
        if !eos_token_ids.contains(&id) {
            eos_token_ids.push(id);
        }
    }
    let generation = GenerationDefaults {
        bos_token: token(bos_id),
        eos_token: token(eos_id),
        eos_token_ids,
        chat_template: meta.opt_str("tokenizer.chat_template")?.map(str::to_string),
        add_bos_token: add_bos,
        bos_token_id: bos_id,
    };

    let tokenizer = match model {
        None => TokenizerSource::Missing,
        Some(model) => TokenizerSource::Gguf(Box::new(GgufTokenizerSpec {
            model,
            pre: meta.opt_str("tokenizer.ggml.pre")?.map(str::to_string),
            tokens,
            scores,
            token_types,
            merges,
            bos_id,
            eos_id,
            unknown_id,
            padding_id,
            add_bos,
            add_eos,
        })),
    };
    Ok((tokenizer, generation))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_from_scores_rank_by_score_then_lengths_then_order() {
        let tokens: Vec<String> = ["a", "b", "c", "ab", "bc", "abc", "ca"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let scores = [0.0, 0.0, 0.0, -1.0, -1.0, -2.0, -1.0];
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let merges = merges_from_scores(&tokens, &scores, &vocab);
        let merges: Vec<(&str, &str)> = merges
            .iter()
            .map(|(l, r)| (l.as_str(), r.as_str()))
            .collect();
        // Score -1 (file order ab, bc, ca), then abc's two splits: the longer left part first.
        assert_eq!(
            merges,
            [("a", "b"), ("b", "c"), ("c", "a"), ("ab", "c"), ("a", "bc")]
        );
    }
}
