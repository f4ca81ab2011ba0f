//! A tokenizer folder with no tokenizer.json, as a slow Qwen2Tokenizer saves it (vocab.json,
//! merges.txt, tokenizer_config.json; how Qwen/Qwen-Image ships its tokenizer), against
//! transformers and against the same tokenizer's tokenizer.json
//! (tests/fixtures/qwen-image-pipeline/tokenizer-slow, scripts/make_slow_tokenizer_fixture.py).

use std::path::{Path, PathBuf};

use ferry::generate::TextCodec;
use ferry::Error;
use serde_json::{json, Value};

const ENDOFTEXT: u32 = 0;
const IM_START: u32 = 1;
const IM_END: u32 = 2;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/qwen-image-pipeline")
        .join(name)
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// (text, transformers' ids, its decoding with and without the special tokens).
fn cases() -> Vec<(String, Vec<u32>, String, String)> {
    let expected = read_json(&fixture("tokenizer-slow/expected.json"));
    let cases = expected["cases"].as_array().unwrap();
    assert!(cases.len() >= 10, "expected.json has {} cases", cases.len());
    cases
        .iter()
        .map(|c| {
            let s = |k: &str| c[k].as_str().unwrap().to_string();
            let ids = serde_json::from_value(c["ids"].clone()).unwrap();
            (s("text"), ids, s("decoded"), s("decoded_skip_special"))
        })
        .collect()
}

fn open(dir: &Path) -> TextCodec {
    TextCodec::from_tokenizer_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

fn open_err(dir: &Path) -> Error {
    match TextCodec::from_tokenizer_dir(dir) {
        Ok(_) => panic!("{} opened; expected an error", dir.display()),
        Err(e) => e,
    }
}

#[test]
fn slow_folder_gives_transformers_ids_and_the_tokenizer_json_ones() {
    let slow_dir = fixture("tokenizer-slow");
    assert!(!slow_dir.join("tokenizer.json").exists());
    let slow = open(&slow_dir);
    let fast = open(&fixture("tokenizer"));
    for (text, ids, decoded, decoded_skip_special) in cases() {
        assert_eq!(
            slow.encode(&text).unwrap(),
            ids,
            "{text:?}: slow vs transformers"
        );
        assert_eq!(fast.encode(&text).unwrap(), ids, "{text:?}: tokenizer.json");
        let tokenizer = slow.tokenizer().unwrap();
        assert_eq!(tokenizer.decode(&ids, false).unwrap(), decoded, "{text:?}");
        assert_eq!(slow.decode(&ids).unwrap(), decoded_skip_special, "{text:?}");
    }

    // What the ids above mean, without expected.json: special tokens whole, no BOS added,
    // digits one at a time, text composed to NFC first.
    let template = slow.encode(&cases()[0].0).unwrap();
    assert_eq!(template[0], IM_START);
    assert_eq!(template.iter().filter(|&&t| t == IM_START).count(), 3);
    assert_eq!(template.iter().filter(|&&t| t == IM_END).count(), 2);
    let specials = slow.encode("<|im_start|>a<|im_end|><|endoftext|>").unwrap();
    assert_eq!(specials[0], IM_START);
    assert_eq!(specials[specials.len() - 2..], [IM_END, ENDOFTEXT]);
    assert_eq!(slow.encode("12345").unwrap().len(), 5);
    assert_eq!(
        slow.encode("cafe\u{301}").unwrap(),
        slow.encode("caf\u{e9}").unwrap()
    );
    assert_eq!(slow.encode("").unwrap(), Vec::<u32>::new());
    // The same generation defaults as beside tokenizer.json: EOS <|im_end|>, no BOS.
    assert_eq!(slow.defaults.eos_token.as_deref(), Some("<|im_end|>"));
    assert_eq!(slow.defaults.bos_token, None);
}

/// The fixture's files with a vocabulary as Qwen's real one is laid out: the ordinary tokens
/// first (ids 0..417), the special tokens after them (417, 418, 419) and only in the added
/// tokens. `legacy`: added_tokens.json and special_tokens_map.json instead of
/// tokenizer_config.json's added_tokens_decoder. Returns the folder and the fixture id → id.
fn specials_after_vocabulary(legacy: bool) -> (tempfile::TempDir, impl Fn(u32) -> u32) {
    let slow = fixture("tokenizer-slow");
    let dir = tempfile::tempdir().unwrap();
    let remap = |id: u32| if id < 3 { id + 417 } else { id - 3 };
    let vocab = read_json(&slow.join("vocab.json"));
    let vocab: serde_json::Map<String, Value> = vocab
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, id)| id.as_u64().unwrap() >= 3)
        .map(|(t, id)| (t.clone(), json!(remap(id.as_u64().unwrap() as u32))))
        .collect();
    std::fs::write(
        dir.path().join("vocab.json"),
        Value::from(vocab).to_string(),
    )
    .unwrap();
    std::fs::copy(slow.join("merges.txt"), dir.path().join("merges.txt")).unwrap();

    let mut config = read_json(&slow.join("tokenizer_config.json"));
    let decoder = config["added_tokens_decoder"].as_object().unwrap().clone();
    let moved: serde_json::Map<String, Value> = decoder
        .iter()
        .map(|(id, t)| (remap(id.parse().unwrap()).to_string(), t.clone()))
        .collect();
    if legacy {
        let obj = config.as_object_mut().unwrap();
        obj.remove("added_tokens_decoder");
        obj.remove("additional_special_tokens");
        let added: serde_json::Map<String, Value> = moved
            .iter()
            .map(|(id, t)| {
                (
                    t["content"].as_str().unwrap().to_string(),
                    json!(id.parse::<u32>().unwrap()),
                )
            })
            .collect();
        std::fs::write(
            dir.path().join("added_tokens.json"),
            Value::from(added).to_string(),
        )
        .unwrap();
        std::fs::copy(
            slow.join("special_tokens_map.json"),
            dir.path().join("special_tokens_map.json"),
        )
        .unwrap();
    } else {
        config["added_tokens_decoder"] = Value::from(moved);
    }
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    (dir, remap)
}

#[test]
fn special_tokens_after_the_vocabulary_keep_their_ids() {
    for legacy in [false, true] {
        let (dir, remap) = specials_after_vocabulary(legacy);
        let codec = open(dir.path());
        for (text, ids, decoded, _) in cases() {
            let want: Vec<u32> = ids.iter().map(|&i| remap(i)).collect();
            assert_eq!(
                codec.encode(&text).unwrap(),
                want,
                "{text:?} (legacy {legacy})"
            );
            let tokenizer = codec.tokenizer().unwrap();
            assert_eq!(tokenizer.decode(&want, false).unwrap(), decoded);
        }
        let ids = codec.encode("<|im_start|>user<|im_end|>").unwrap();
        assert_eq!((ids[0], ids[ids.len() - 1]), (418, 419), "legacy {legacy}");
        // Special, so skipped when decoding.
        assert_eq!(codec.decode(&ids).unwrap(), "user", "legacy {legacy}");
    }
}

/// A copy of the slow fixture in a temporary folder, with `name` written as `text` (or removed
/// when None).
fn with_file(name: &str, text: Option<&str>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture("tokenizer-slow")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    let path = dir.path().join(name);
    match text {
        Some(text) => std::fs::write(path, text).unwrap(),
        None => std::fs::remove_file(path).unwrap(),
    }
    dir
}

fn assert_tokenizer_error(e: Error, file: &str, parts: &[&str]) {
    match &e {
        Error::Tokenizer { path, message } => {
            assert!(path.ends_with(file), "{e} names {path:?}, not {file}");
            for part in parts {
                assert!(message.contains(part), "{e:?} does not mention {part:?}");
            }
        }
        other => panic!("{other:?}: expected Error::Tokenizer for {file}"),
    }
}

#[test]
fn missing_and_malformed_files_are_named() {
    let empty = tempfile::tempdir().unwrap();
    match open_err(empty.path()) {
        Error::NotFound { path, expected } => {
            assert_eq!(path, empty.path().join("tokenizer.json"));
            assert!(expected.contains("vocab.json + merges.txt"), "{expected}");
        }
        other => panic!("{other:?}: expected NotFound"),
    }
    match open_err(with_file("merges.txt", None).path()) {
        Error::NotFound { path, .. } => assert!(path.ends_with("merges.txt"), "{path:?}"),
        other => panic!("{other:?}: expected NotFound for merges.txt"),
    }

    let e = open_err(with_file("vocab.json", Some("{\"a\": 0,")).path());
    assert_tokenizer_error(e, "vocab.json", &["expected a JSON object of token → id"]);
    let e = open_err(with_file("vocab.json", Some("{\"a\": -1}")).path());
    assert_tokenizer_error(e, "vocab.json", &["-1"]);
    let e = open_err(with_file("vocab.json", Some("{\"a\": 0, \"b\": 0}")).path());
    assert_tokenizer_error(e, "vocab.json", &["id 0", "\"a\"", "\"b\""]);

    let merges = std::fs::read_to_string(fixture("tokenizer-slow/merges.txt")).unwrap();
    let mut lines: Vec<&str> = merges.lines().collect();
    lines[2] = "Ġ a b";
    let e = open_err(with_file("merges.txt", Some(&lines.join("\n"))).path());
    assert_tokenizer_error(e, "merges.txt", &["line 3", "\"Ġ a b\"", "two tokens"]);
    lines[2] = "Ġ ☃";
    let e = open_err(with_file("merges.txt", Some(&lines.join("\n"))).path());
    assert_tokenizer_error(e, "merges.txt", &["line 3", "\"☃\"", "not in vocab.json"]);
    // Both sides known, the merged token not.
    lines[2] = "z z";
    let e = open_err(with_file("merges.txt", Some(&lines.join("\n"))).path());
    assert_tokenizer_error(e, "merges.txt", &["line 3", "\"zz\""]);
    // Without the #version header the merges are the same.
    let codec = open(
        with_file(
            "merges.txt",
            Some(&merges.lines().skip(1).collect::<Vec<_>>().join("\n")),
        )
        .path(),
    );
    assert_eq!(codec.encode(&cases()[0].0).unwrap(), cases()[0].1);

    let config = std::fs::read_to_string(fixture("tokenizer-slow/tokenizer_config.json")).unwrap();
    let e = open_err(
        with_file(
            "tokenizer_config.json",
            Some(&config.replace("Qwen2Tokenizer", "GPT2Tokenizer")),
        )
        .path(),
    );
    assert_tokenizer_error(
        e,
        "tokenizer_config.json",
        &["\"GPT2Tokenizer\"", "Qwen2Tokenizer"],
    );
    // <|im_start|> declared with the id vocab.json gives to "!".
    let e = open_err(
        with_file(
            "tokenizer_config.json",
            Some(&config.replace("\"1\": {", "\"3\": {")),
        )
        .path(),
    );
    assert_tokenizer_error(
        e,
        "tokenizer_config.json",
        &["<|im_start|>", "id 3", "id 1"],
    );
    let e = open_err(
        with_file(
            "tokenizer_config.json",
            Some(&config.replace("\"special\": true", "\"special\": 1")),
        )
        .path(),
    );
    assert_tokenizer_error(
        e,
        "tokenizer_config.json",
        &["added_tokens_decoder[\"0\"]", "special"],
    );
}
