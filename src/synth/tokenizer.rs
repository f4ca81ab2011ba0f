//! The tokenizers synth writes beside its random weights: one token per id for a language
//! model ([`tokenizer_json`]), a small trained BPE for an image pipeline's text encoder
//! ([`ChatTokenizer`]), and Flux's two: a CLIP BPE ([`ClipBpe`]) and a T5 Unigram
//! ([`T5Unigram`]).

use std::collections::BTreeMap;

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

/// The vocabulary of [`tokenizer_json`]: one token per id of the model's vocabulary, the
/// special tokens at the preset's bos/eos ids, the 256 bytes (in GPT-2's byte alphabet) at
/// the lowest free ids, and placeholder tokens `<|synth_ID|>` for the rest.
pub(super) struct Vocabulary {
    /// By id.
    pub tokens: Vec<String>,
    /// (id, text) of each special token (an id outside the vocabulary has no token).
    pub specials: Vec<(u32, &'static str)>,
}

/// The placeholder token of `id`.
pub(super) fn placeholder(id: usize) -> String {
    format!("<|synth_{id}|>")
}

pub(super) fn vocabulary(preset: &Preset) -> Vocabulary {
    let vocab_size = preset.config.vocab_size;
    let mut specials: Vec<(u32, &'static str)> = Vec::new();
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
    let tokens = tokens
        .into_iter()
        .enumerate()
        .map(|(id, t)| t.unwrap_or_else(|| placeholder(id)))
        .collect();
    Vocabulary { tokens, specials }
}

/// A byte-level BPE tokenizer over [`vocabulary`] (placeholders decode to their text; no
/// merges, so encoding makes one token per byte). Returns (tokenizer.json,
/// tokenizer_config.json).
pub(super) fn tokenizer_json(preset: &Preset) -> (Value, Value) {
    let Vocabulary { tokens, specials } = vocabulary(preset);
    let tokens_len = tokens.len();
    let vocab: serde_json::Map<String, Value> = tokens
        .into_iter()
        .enumerate()
        .map(|(id, t)| (t, json!(id)))
        .collect();
    let added: Vec<Value> = specials
        .iter()
        .filter(|(id, _)| (*id as usize) < tokens_len)
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

/// Qwen's special tokens that a Qwen3 text encoder's chat template and padding use, given the
/// ids right after the BPE vocabulary, in this order.
const CHAT_SPECIALS: [&str; 5] = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<think>",
    "</think>",
];

/// Merges learned from [`CORPUS`]: with the 256 bytes and the specials, 421 ids.
const MERGES: usize = 160;

/// The text the merges are learned from: image prompts, the kind of text the pipeline reads.
const CORPUS: &str = "\
a photo of a red fox sitting in the snow at sunset, soft light, high detail. \
a portrait of an old man with a grey beard, studio lighting, sharp focus. \
a watercolor painting of a quiet harbor with small boats and a lighthouse. \
a cat sleeping on a wooden chair beside a window, morning light, warm colors. \
the city at night in the rain, neon signs reflected on the wet street, cinematic. \
a bowl of fresh fruit on a kitchen table, natural light, still life photograph. \
a mountain lake with pine trees and a clear blue sky, wide angle, landscape photo. \
an astronaut riding a horse on the moon, digital art, highly detailed. \
a small house in the forest covered with moss, fantasy illustration, soft colors. \
a close up of a flower with drops of water on the petals, macro photography. \
a street market in the morning with people selling bread and flowers, film photo. \
a robot reading a book in a library, warm light, detailed illustration. \
the ocean at dawn with waves breaking on the rocks, long exposure photograph. \
a girl in a yellow coat walking a dog in the park, autumn leaves, soft focus. \
an old castle on a hill above the sea, dramatic clouds, oil painting. \
a cup of coffee on a table in a quiet cafe, shallow depth of field. \
a train crossing a bridge over a river in the mountains, winter, snow. \
a bird sitting on a branch in the garden, spring, bright colors, photo. \
a poster with the words hello world in bold letters on a white background. \
a children's drawing of a house, a tree and the sun, crayon on paper.";

/// Qwen2's pre-tokenizer: letters with at most one leading non-letter, single digits,
/// punctuation runs, newlines, spaces.
const QWEN_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen3's chat template, reduced to what a text encoder's prompt needs: each message in
/// `<|im_start|>role … <|im_end|>`, the assistant's turn opened, and the empty thinking block
/// only when thinking is off (Z-Image renders with `enable_thinking=True`: no block).
const CHAT_TEMPLATE: &str = "\
{%- for message in messages %}
    {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
";

/// Where a [`ChatTokenizer`] puts its special tokens ([`CHAT_SPECIALS`], in order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SpecialIds {
    /// Right after the learned vocabulary (ids 416–420): the smallest tokenizer.
    AfterMerges,
    /// From this id on, as in Qwen's own vocabulary (`<|endoftext|>` is 151643): the ids
    /// between the learned vocabulary and it are placeholder tokens `<|synth_ID|>` that no
    /// text encodes to, so that every id below the last special has a token.
    From(usize),
}

/// A small byte-level BPE tokenizer in the form of Qwen's (Qwen's NFC normalizer and split,
/// byte-level alphabet, its chat special tokens), made because the real 151k-token Qwen
/// vocabulary is not to be had offline: the 256 bytes at ids 0–255, [`MERGES`] merges learned
/// from [`CORPUS`], then the specials where [`SpecialIds`] says. Every text encodes (bytes
/// are always in the vocabulary), to ids below [`ChatTokenizer::len`].
pub(super) struct ChatTokenizer {
    /// tokenizer.json
    pub tokenizer: Value,
    /// tokenizer_config.json
    pub config: Value,
    /// Ids in use: 0..len.
    pub len: usize,
    /// Ids of learned tokens (bytes and merges): 0..learned.
    pub learned: usize,
    /// `<|endoftext|>` (Qwen's BOS and padding) and `<|im_end|>` (its EOS).
    pub endoftext: u32,
    pub im_end: u32,
}

impl ChatTokenizer {
    pub fn new(model_max_length: usize, specials: SpecialIds) -> ChatTokenizer {
        let symbols = |word: &str| -> Vec<String> {
            word.bytes().map(|b| byte_char(b).to_string()).collect()
        };
        let mut words: BTreeMap<Vec<String>, usize> = BTreeMap::new();
        for word in pre_tokens(CORPUS) {
            *words.entry(symbols(&word)).or_default() += 1;
        }
        let merges = learn_merges(words, MERGES);

        let mut vocab: Vec<String> = (0..=255u8).map(|b| byte_char(b).to_string()).collect();
        for (a, b) in &merges {
            let token = format!("{a}{b}");
            // Two pairs can spell the same token ("ab"+"c", "a"+"bc"): it has one id.
            if !vocab.contains(&token) {
                vocab.push(token);
            }
        }
        let learned = vocab.len();
        let first_special = match specials {
            SpecialIds::AfterMerges => learned,
            SpecialIds::From(id) => {
                assert!(
                    id >= learned,
                    "the specials come after the {learned} learned ids"
                );
                id
            }
        };
        // Added tokens take the ids after the model's vocabulary when the tokenizer is read
        // (whatever ids its file gives them), so the gap is filled.
        vocab.extend((learned..first_special).map(placeholder));
        let added: Vec<Value> = CHAT_SPECIALS
            .iter()
            .enumerate()
            .map(|(k, text)| {
                json!({"id": first_special + k, "content": text, "single_word": false,
                       "lstrip": false, "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        let vocab_map: serde_json::Map<String, Value> = vocab
            .iter()
            .enumerate()
            .map(|(id, t)| (t.clone(), json!(id)))
            .collect();
        let merges: Vec<Value> = merges.iter().map(|(a, b)| json!([a, b])).collect();
        let tokenizer = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": {"type": "NFC"},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN_SPLIT}, "behavior": "Isolated",
                 "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                 "use_regex": false},
            ]},
            "post_processor": {"type": "ByteLevel", "add_prefix_space": false,
                               "trim_offsets": false, "use_regex": true},
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                        "use_regex": true},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab_map, "merges": merges,
            },
        });
        let config = json!({
            "tokenizer_class": "Qwen2Tokenizer",
            "bos_token": null,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "unk_token": null,
            "add_prefix_space": false,
            "clean_up_tokenization_spaces": false,
            "split_special_tokens": false,
            "errors": "replace",
            "model_max_length": model_max_length,
            "chat_template": CHAT_TEMPLATE,
        });
        let id = |text: &str| {
            let k = CHAT_SPECIALS.iter().position(|s| *s == text);
            (first_special + k.expect("a special token")) as u32
        };
        ChatTokenizer {
            tokenizer,
            config,
            len: first_special + CHAT_SPECIALS.len(),
            learned,
            endoftext: id("<|endoftext|>"),
            im_end: id("<|im_end|>"),
        }
    }
}

/// `text` split roughly as [`QWEN_SPLIT`] splits it: a run of letters with the one
/// character before it unless that is a letter, digit or newline; anything else alone.
fn pre_tokens(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let start = i;
        let lead = !chars[i].is_alphanumeric() && chars[i] != '\n';
        if lead && chars.get(i + 1).is_some_and(|c| c.is_alphabetic()) {
            i += 1;
        }
        if chars[i].is_alphabetic() {
            while i < chars.len() && chars[i].is_alphabetic() {
                i += 1;
            }
        } else {
            i += 1;
        }
        out.push(chars[start..i].iter().collect());
    }
    out
}

/// Byte-pair encoding's training loop: `n` times, merge the most frequent adjacent pair of
/// symbols over all words (`words`: symbols → count; ties go to the pair first in order).
/// Stops early when no pair occurs twice.
fn learn_merges(mut words: BTreeMap<Vec<String>, usize>, n: usize) -> Vec<(String, String)> {
    let mut merges = Vec::with_capacity(n);
    while merges.len() < n {
        let mut pairs: BTreeMap<(&str, &str), usize> = BTreeMap::new();
        for (word, count) in &words {
            for p in word.windows(2) {
                *pairs.entry((p[0].as_str(), p[1].as_str())).or_default() += count;
            }
        }
        let best = pairs
            .iter()
            .max_by(|x, y| x.1.cmp(y.1).then(y.0.cmp(x.0)))
            .filter(|(_, &count)| count >= 2);
        let Some(((a, b), _)) = best else { break };
        let (a, b) = (a.to_string(), b.to_string());
        words = words
            .into_iter()
            .map(|(word, count)| (merge(word, &a, &b), count))
            .fold(BTreeMap::new(), |mut m, (w, c)| {
                *m.entry(w).or_default() += c;
                m
            });
        merges.push((a, b));
    }
    merges
}

/// CLIP's start and end tokens; the end is also CLIP's pad and unknown token.
const CLIP_SPECIALS: [&str; 2] = ["<|startoftext|>", "<|endoftext|>"];

/// Merges of [`ClipBpe`], learned from [`CORPUS`].
const CLIP_MERGES: usize = 300;

/// A small CLIP BPE tokenizer as black-forest-labs/FLUX.1-dev ships its tokenizer/ (no
/// tokenizer.json): the 256 bytes in GPT-2's alphabet, the same with `</w>` (a word's last
/// symbol), [`CLIP_MERGES`] merges learned from [`CORPUS`] lower-cased and split as CLIP
/// splits it, then `<|startoftext|>` and `<|endoftext|>`, the largest id (where a legacy
/// CLIP config, `eos_token_id` 2, pools).
pub(super) struct ClipBpe {
    /// vocab.json: token → id.
    pub vocab: Value,
    /// merges.txt.
    pub merges: String,
    pub config: Value,
    pub special_tokens_map: Value,
    /// Ids in use: 0..len.
    pub len: usize,
}

impl ClipBpe {
    pub fn new(model_max_length: usize) -> ClipBpe {
        let mut words: BTreeMap<Vec<String>, usize> = BTreeMap::new();
        for word in clip_pre_tokens(&CORPUS.to_lowercase()) {
            let mut symbols: Vec<String> = word.bytes().map(|b| byte_char(b).to_string()).collect();
            let last = symbols.last_mut().expect("a word has a byte");
            last.push_str("</w>");
            *words.entry(symbols).or_default() += 1;
        }
        let merges = learn_merges(words, CLIP_MERGES);
        let bytes = (0..=255u8).map(|b| byte_char(b).to_string());
        let mut tokens: Vec<String> = bytes.clone().chain(bytes.map(|c| c + "</w>")).collect();
        for (a, b) in &merges {
            let token = format!("{a}{b}");
            if !tokens.contains(&token) {
                tokens.push(token);
            }
        }
        tokens.extend(CLIP_SPECIALS.map(String::from));
        let len = tokens.len();
        let vocab: serde_json::Map<String, Value> = tokens
            .iter()
            .enumerate()
            .map(|(id, t)| (t.clone(), json!(id)))
            .collect();
        let mut text = String::from("#version: 0.2\n");
        for (a, b) in &merges {
            text += &format!("{a} {b}\n");
        }
        let special = |content: &str| {
            json!({"content": content, "lstrip": false, "normalized": true, "rstrip": false,
                   "single_word": false})
        };
        let mut decoder = serde_json::Map::new();
        for (k, content) in CLIP_SPECIALS.iter().enumerate() {
            let mut token = special(content);
            token["special"] = json!(true);
            decoder.insert((len - 2 + k).to_string(), token);
        }
        // As FLUX.1-dev's tokenizer_config.json (transformers 4 wrote it).
        let config = json!({
            "add_prefix_space": false,
            "added_tokens_decoder": decoder,
            "bos_token": CLIP_SPECIALS[0],
            "clean_up_tokenization_spaces": true,
            "do_lower_case": true,
            "eos_token": CLIP_SPECIALS[1],
            "errors": "replace",
            "model_max_length": model_max_length,
            "pad_token": CLIP_SPECIALS[1],
            "tokenizer_class": "CLIPTokenizer",
            "unk_token": CLIP_SPECIALS[1],
        });
        let special_tokens_map = json!({
            "bos_token": special(CLIP_SPECIALS[0]),
            "eos_token": special(CLIP_SPECIALS[1]),
            "pad_token": CLIP_SPECIALS[1],
            "unk_token": special(CLIP_SPECIALS[1]),
        });
        ClipBpe {
            vocab: Value::Object(vocab),
            merges: text,
            config,
            special_tokens_map,
            len,
        }
    }
}

/// `text` split roughly as CLIP's regex splits it: letter runs, single digits, runs of other
/// non-space characters; whitespace dropped.
fn clip_pre_tokens(text: &str) -> Vec<String> {
    let kind = |c: char| match c {
        _ if c.is_alphabetic() => 0,
        _ if c.is_numeric() => 1,
        _ => 2,
    };
    let mut out: Vec<String> = Vec::new();
    let mut last: Option<u8> = None;
    for c in text.chars() {
        if c.is_whitespace() {
            last = None;
            continue;
        }
        let k = kind(c);
        match out.last_mut() {
            Some(word) if last == Some(k) && k != 1 => word.push(c),
            _ => out.push(c.to_string()),
        }
        last = Some(k);
    }
    out
}

/// T5's special tokens at their ids 0, 1, 2.
const T5_SPECIALS: [&str; 3] = ["<pad>", "</s>", "<unk>"];

/// SentencePiece's word-start mark.
const METASPACE: char = '\u{2581}';

/// A small T5 Unigram tokenizer in the form of T5TokenizerFast's tokenizer.json (as
/// black-forest-labs/FLUX.1-dev's tokenizer_2/ has it, without its spiece.model): `<pad>` 0,
/// `</s>` 1, `<unk>` 2, then `▁`, every printable ASCII character alone and after `▁`, and
/// each word of [`CORPUS`] after `▁`, scored by its frequency so that a known word is one
/// piece; other characters are `<unk>`. Its normalizer is none (transformers 5 keeps only a
/// `Precompiled` one, which this has not), its pre-tokenizer WhitespaceSplit then Metaspace.
pub(super) struct T5Unigram {
    pub tokenizer: Value,
    pub config: Value,
    pub special_tokens_map: Value,
    /// Ids in use: 0..len.
    pub len: usize,
}

impl T5Unigram {
    pub fn new(model_max_length: usize) -> T5Unigram {
        let mut pieces: Vec<(String, f64)> =
            T5_SPECIALS.iter().map(|t| (t.to_string(), 0.0)).collect();
        pieces.push((METASPACE.to_string(), -8.0));
        for c in (b'!'..=b'~').map(char::from) {
            pieces.push((format!("{METASPACE}{c}"), -9.0));
            pieces.push((c.to_string(), -10.0));
        }
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for word in CORPUS.split(|c: char| !c.is_alphanumeric()) {
            if word.chars().count() > 1 {
                *counts.entry(word).or_default() += 1;
            }
        }
        let total: usize = counts.values().sum();
        let mut words: Vec<(&str, usize)> = counts.into_iter().collect();
        words.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        for (word, count) in words {
            let logp = (count as f64 / total as f64).ln();
            pieces.push((format!("{METASPACE}{word}"), logp));
        }
        let len = pieces.len();
        let vocab: Vec<Value> = pieces.iter().map(|(p, s)| json!([p, s])).collect();
        let added: Vec<Value> = T5_SPECIALS
            .iter()
            .enumerate()
            .map(|(id, content)| {
                json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        let metaspace = json!({"type": "Metaspace", "replacement": METASPACE.to_string(),
                               "prepend_scheme": "always", "split": true});
        let eos = |type_id: u32| json!({"SpecialToken": {"id": "</s>", "type_id": type_id}});
        let seq = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
        let tokenizer = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "WhitespaceSplit"}, metaspace.clone(),
            ]},
            "post_processor": {
                "type": "TemplateProcessing",
                "single": [seq("A", 0), eos(0)],
                "pair": [seq("A", 0), eos(0), seq("B", 1), eos(1)],
                "special_tokens": {"</s>": {"id": "</s>", "ids": [1], "tokens": ["</s>"]}},
            },
            "decoder": metaspace,
            "model": {"type": "Unigram", "unk_id": 2, "vocab": vocab, "byte_fallback": false},
        });
        let config = json!({
            "add_prefix_space": true,
            "clean_up_tokenization_spaces": true,
            "eos_token": "</s>",
            "extra_ids": 0,
            "legacy": true,
            "model_max_length": model_max_length,
            "pad_token": "<pad>",
            "tokenizer_class": "T5Tokenizer",
            "unk_token": "<unk>",
        });
        let special_tokens_map =
            json!({"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"});
        T5Unigram {
            tokenizer,
            config,
            special_tokens_map,
            len,
        }
    }
}

/// `word` with every `a` followed by `b` joined, left to right.
fn merge(word: Vec<String>, a: &str, b: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(word.len());
    let mut i = 0;
    while i < word.len() {
        if i + 1 < word.len() && word[i] == a && word[i + 1] == b {
            out.push(format!("{a}{b}"));
            i += 2;
        } else {
            out.push(word[i].clone());
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(t: &ChatTokenizer) -> tokenizers::Tokenizer {
        tokenizers::Tokenizer::from_bytes(t.tokenizer.to_string()).unwrap()
    }

    #[test]
    fn chat_bpe_encodes_with_merges_and_specials() {
        let t = ChatTokenizer::new(1024, SpecialIds::AfterMerges);
        let tok = load(&t);
        assert_eq!(tok.get_vocab_size(true), t.len);
        assert_eq!(
            t.len,
            256 + MERGES + CHAT_SPECIALS.len(),
            "every merge made a token"
        );
        assert_eq!((t.endoftext, t.im_end), (416, 418));

        let text = "<|im_start|>user\na photo of a red fox in the snow<|im_end|>\n";
        let enc = tok.encode(text, true).unwrap();
        let ids = enc.get_ids();
        assert_eq!(ids[0], 417, "<|im_start|> is one token");
        assert!(ids.contains(&t.im_end));
        assert!(ids.iter().all(|&id| (id as usize) < t.len));
        // Merges shorten the prompt well below one token per byte.
        assert!(ids.len() < text.len() / 2, "{} tokens", ids.len());
        assert_eq!(tok.decode(ids, false).unwrap(), text);
        // Text the corpus never saw still encodes, byte by byte at worst.
        let odd = "Zürich 2026 — 東京";
        let ids = tok.encode(odd, false).unwrap().get_ids().to_vec();
        assert_eq!(tok.decode(&ids, false).unwrap(), odd);
    }

    /// Qwen's ids for the specials: the learned tokens as before, placeholders up to 151643.
    #[test]
    fn specials_can_sit_at_qwens_ids() {
        let t = ChatTokenizer::new(1024, SpecialIds::From(151643));
        let tok = load(&t);
        assert_eq!(t.len, 151648);
        assert_eq!(tok.get_vocab_size(true), t.len);
        assert_eq!((t.learned, t.endoftext, t.im_end), (416, 151643, 151645));
        assert_eq!(tok.token_to_id("<|im_start|>"), Some(151644));
        assert_eq!(tok.id_to_token(416).as_deref(), Some("<|synth_416|>"));
        let text = "<|im_start|>user\na photo of a red fox<|im_end|>\n";
        let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
        let small = ChatTokenizer::new(1024, SpecialIds::AfterMerges);
        let small_ids = load(&small).encode(text, false).unwrap().get_ids().to_vec();
        // The same text, the same learned ids; only the specials moved.
        let moved: Vec<u32> = small_ids
            .iter()
            .map(|&id| match id as usize >= small.learned {
                true => id - small.learned as u32 + 151643,
                false => id,
            })
            .collect();
        assert_eq!(ids, moved);
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
        // A placeholder's text is not encoded to the placeholder.
        let ids = tok
            .encode("<|synth_416|>", false)
            .unwrap()
            .get_ids()
            .to_vec();
        assert!(ids.len() > 1 && ids.iter().all(|&id| id < 416), "{ids:?}");
    }

    #[test]
    fn merges_are_learned_greedily() {
        let words: BTreeMap<Vec<String>, usize> = [
            (vec!["a", "b", "c"], 3),
            (vec!["a", "b"], 2),
            (vec!["b", "c"], 1),
        ]
        .into_iter()
        .map(|(w, c)| (w.into_iter().map(String::from).collect(), c))
        .collect();
        let merges = learn_merges(words, 10);
        let pair = |a: &str, b: &str| (a.to_string(), b.to_string());
        // (a,b) 5 times, then (ab,c) 3 times; (b,c) once is no merge.
        assert_eq!(merges, vec![pair("a", "b"), pair("ab", "c")]);
        assert_eq!(
            pre_tokens("a red fox, 42"),
            ["a", " red", " fox", ",", " ", "4", "2"]
        );
    }
}
