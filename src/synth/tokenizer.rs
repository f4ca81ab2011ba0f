//! The tokenizers synth writes beside its random weights.

use serde_json::{json, Value};

use super::Preset;

/// The byte-level unicode alphabet of GPT-2 style tokenizers: byte → the char that stands for
/// it in vocabularies.
fn byte_char(b: u8) -> char {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(b) {
        return b as char;
    }
    let rank = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + rank).expect("a valid char")
}

/// A byte-level BPE tokenizer with one token per id of the model's vocabulary: the special
/// tokens at the preset's bos/eos ids, the 256 bytes at the lowest free ids, and placeholder
/// tokens `<|synth_ID|>` for the rest (they decode to that text; no merges, so encoding makes
/// one token per byte). Returns (tokenizer.json, tokenizer_config.json).
pub(super) fn tokenizer_json(preset: &Preset) -> (Value, Value) {
    let vocab_size = preset.config.vocab_size;
    let mut specials: Vec<(u32, &str)> = Vec::new();
    match preset.bos_token_id {
        Some(bos) if bos == preset.eos_token_id => specials.push((bos, "<|endoftext|>")),
        Some(bos) => {
            specials.push((bos, "<|begin_of_text|>"));
            specials.push((preset.eos_token_id, "<|end_of_text|>"));
        }
        None => specials.push((preset.eos_token_id, "<|endoftext|>")),
    }
    let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
    for &(id, text) in &specials {
        if let Some(t) = tokens.get_mut(id as usize) {
            *t = Some(text.to_string());
        }
    }
    let mut free = (0..vocab_size).filter(|&i| tokens[i].is_none());
    let byte_ids: Vec<usize> = (0..=255u8).map_while(|_| free.next()).collect();
    for (b, &id) in byte_ids.iter().enumerate() {
        tokens[id] = Some(byte_char(b as u8).to_string());
    }
    let vocab: serde_json::Map<String, Value> = tokens
        .into_iter()
        .enumerate()
        .map(|(id, t)| (t.unwrap_or_else(|| format!("<|synth_{id}|>")), json!(id)))
        .collect();
    let added: Vec<Value> = specials
        .iter()
        .filter(|(id, _)| (*id as usize) < vocab_size)
        .map(|(id, text)| {
            json!({"id": id, "content": text, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false,
                            "trim_offsets": true, "use_regex": true});
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": null,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": [],
        },
    });
    let name = |id: Option<u32>| {
        id.and_then(|id| specials.iter().find(|s| s.0 == id))
            .map(|s| json!(s.1))
            .unwrap_or(Value::Null)
    };
    let tokenizer_config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name(preset.bos_token_id),
        "eos_token": name(Some(preset.eos_token_id)),
        "add_bos_token": false,
        "clean_up_tokenization_spaces": false,
        "model_max_length": preset.config.max_position_embeddings,
    });
    (tokenizer, tokenizer_config)
}
