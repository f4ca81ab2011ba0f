//! Bad input gets a one-line error naming the file, tensor or flag and what was expected, a
//! non-zero exit, and no panic. Each case breaks a copy of a fixture and runs the binary.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::fixture;
use ferry::model::Checkpoint;

/// A scratch copy of the `llama` fixture.
fn copy_fixture() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    std::fs::create_dir(&dir).unwrap();
    for e in std::fs::read_dir(fixture("llama")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    (tmp, dir)
}

/// Run `ferry ARGS`; assert failure without a panic; return stderr.
fn fails(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "ferry {args:?} should fail; stderr: {stderr}"
    );
    assert!(
        !stderr.contains("panicked"),
        "ferry {args:?} panicked: {stderr}"
    );
    assert!(stderr.starts_with("error: "), "ferry {args:?}: {stderr}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "one line expected: {stderr}"
    );
    stderr
}

fn run_on(dir: &Path) -> String {
    fails(&[
        "run",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "hello",
        "--max-tokens",
        "2",
    ])
}

/// Rewrite `model.safetensors` with `edit` applied to its (name, dtype, shape, bytes) list.
fn rewrite_tensors(dir: &Path, edit: impl FnOnce(&mut Vec<(String, String, Vec<usize>, Vec<u8>)>)) {
    let path = dir.join("model.safetensors");
    let ckpt = Checkpoint::open(dir.to_str().unwrap()).unwrap();
    let mut tensors: Vec<_> = ckpt
        .tensors
        .values()
        .map(|t| {
            (
                t.name.clone(),
                t.dtype.name().to_uppercase(),
                t.shape.clone(),
                t.bytes().to_vec(),
            )
        })
        .collect();
    drop(ckpt);
    edit(&mut tensors);
    let mut header = serde_json::Map::new();
    let mut offset = 0;
    for (name, dtype, shape, bytes) in &tensors {
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes.len()]}),
        );
        offset += bytes.len();
    }
    let json = serde_json::to_vec(&header).unwrap();
    let mut file = (json.len() as u64).to_le_bytes().to_vec();
    file.extend(json);
    for (_, _, _, bytes) in &tensors {
        file.extend(bytes);
    }
    std::fs::write(path, file).unwrap();
}

#[test]
fn missing_directory() {
    let err = fails(&["info", "--model", "/nonexistent/model-dir"]);
    assert!(
        err.contains("/nonexistent/model-dir") && err.contains("not found"),
        "{err}"
    );
}

#[test]
fn missing_repo_in_hf_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["info", "--model", "SomeOrg/NoSuchModel"])
        .env("HF_HOME", tmp.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("SomeOrg/NoSuchModel") && err.contains("Hugging Face cache"),
        "{err}"
    );
}

#[test]
fn resolves_org_name_in_hf_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("hub/models--tiny--llama");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
    let snap = repo.join("snapshots/abc123");
    std::fs::create_dir_all(&snap).unwrap();
    for e in std::fs::read_dir(fixture("llama")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), snap.join(e.file_name())).unwrap();
    }
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["info", "--model", "tiny/llama"])
        .env("HF_HOME", tmp.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("snapshots/abc123") && stdout.contains("llama"),
        "{stdout}"
    );
}

#[test]
fn missing_config() {
    let (_t, dir) = copy_fixture();
    std::fs::remove_file(dir.join("config.json")).unwrap();
    let err = run_on(&dir);
    assert!(err.contains("config.json"), "{err}");
}

#[test]
fn missing_weights_file() {
    let (_t, dir) = copy_fixture();
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let err = run_on(&dir);
    assert!(
        err.contains("model.safetensors") && err.contains("not found"),
        "{err}"
    );
}

#[test]
fn missing_shard() {
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(fixture("mistral")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), tmp.path().join(e.file_name())).unwrap();
    }
    std::fs::remove_file(tmp.path().join("model-00002-of-00002.safetensors")).unwrap();
    let err = run_on(tmp.path());
    assert!(err.contains("model-00002-of-00002.safetensors"), "{err}");
}

#[test]
fn missing_tokenizer() {
    let (_t, dir) = copy_fixture();
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    let err = run_on(&dir);
    assert!(err.contains("tokenizer.json"), "{err}");
}

#[test]
fn malformed_config_json() {
    let (_t, dir) = copy_fixture();
    std::fs::write(dir.join("config.json"), "{\"model_type\": \"llama\", ").unwrap();
    let err = run_on(&dir);
    assert!(
        err.contains("config.json") && err.contains("malformed JSON"),
        "{err}"
    );
}

#[test]
fn config_missing_a_field() {
    let (_t, dir) = copy_fixture();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().remove("hidden_size");
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let err = run_on(&dir);
    assert!(
        err.contains("config.json") && err.contains("hidden_size"),
        "{err}"
    );
}

#[test]
fn unsupported_model_type() {
    let (_t, dir) = copy_fixture();
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        cfg.replace("\"llama\"", "\"gpt_neox\""),
    )
    .unwrap();
    let err = run_on(&dir);
    assert!(
        err.contains("gpt_neox") && err.contains("llama, mistral, qwen2, qwen3"),
        "{err}"
    );
}

#[test]
fn missing_tensor() {
    let (_t, dir) = copy_fixture();
    rewrite_tensors(&dir, |ts| {
        ts.retain(|t| t.0 != "model.layers.1.mlp.up_proj.weight")
    });
    let err = run_on(&dir);
    assert!(
        err.contains("model.layers.1.mlp.up_proj.weight") && err.contains("missing"),
        "{err}"
    );
}

#[test]
fn wrong_shape() {
    let (_t, dir) = copy_fixture();
    rewrite_tensors(&dir, |ts| {
        let t = ts
            .iter_mut()
            .find(|t| t.0 == "model.layers.0.self_attn.k_proj.weight")
            .unwrap();
        // [32, 64] stored as [64, 32]: same bytes, wrong shape.
        t.2.reverse();
    });
    let err = run_on(&dir);
    assert!(
        err.contains("model.layers.0.self_attn.k_proj.weight")
            && err.contains("expected shape [32, 64]"),
        "{err}"
    );
}

#[test]
fn wrong_dtype() {
    let (_t, dir) = copy_fixture();
    rewrite_tensors(&dir, |ts| {
        let t = ts.iter_mut().find(|t| t.0 == "model.norm.weight").unwrap();
        t.1 = "I32".into();
    });
    let err = run_on(&dir);
    assert!(
        err.contains("model.norm.weight") && err.contains("I32") && err.contains("BF16"),
        "{err}"
    );
}

#[test]
fn truncated_safetensors() {
    let (_t, dir) = copy_fixture();
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 1000]).unwrap();
    let err = run_on(&dir);
    assert!(
        err.contains("model.safetensors") && err.contains("truncated"),
        "{err}"
    );

    std::fs::write(&path, &bytes[..100]).unwrap();
    let err = run_on(&dir);
    assert!(
        err.contains("model.safetensors") && err.contains("header length"),
        "{err}"
    );

    std::fs::write(&path, &bytes[..3]).unwrap();
    let err = run_on(&dir);
    assert!(err.contains("too short"), "{err}");
}

#[test]
fn prompt_longer_than_context() {
    let model = fixture("llama");
    let long = "word ".repeat(200);
    let err = fails(&[
        "run",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        &long,
        "--context",
        "64",
    ]);
    assert!(
        err.contains("prompt is") && err.contains("context holds 64"),
        "{err}"
    );
    let err = fails(&[
        "run",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "hi",
        "--context",
        "100000",
    ]);
    assert!(
        err.contains("--context") && err.contains("max_position_embeddings"),
        "{err}"
    );
}

#[test]
fn bad_sampling_flags() {
    let model = fixture("llama");
    let m = model.to_str().unwrap();
    let err = fails(&["run", "--model", m, "--prompt", "hi", "--top-p", "1.5"]);
    assert!(err.contains("--top-p"), "{err}");
    let err = fails(&["run", "--model", m, "--prompt", "hi", "--temperature=-1"]);
    assert!(err.contains("--temperature"), "{err}");
    let err = fails(&["run", "--model", m, "--prompt", "", "--max-tokens", "2"]);
    assert!(err.contains("--prompt"), "{err}");
}

#[test]
fn runs_a_fixture() {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "run",
            "--model",
            fixture("qwen3").to_str().unwrap(),
            "--prompt",
            "hello",
            "--max-tokens",
            "8",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("8 tokens"), "{stderr}");
}

/// Rewrite `dir/model.safetensors`'s JSON header with `edit`, keeping its data bytes.
fn edit_header(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let json = serde_json::to_vec(&header).unwrap();
    let mut file = (json.len() as u64).to_le_bytes().to_vec();
    file.extend(json);
    file.extend(&bytes[8 + n..]);
    std::fs::write(path, file).unwrap();
}

#[test]
fn safetensors_tensors_that_share_bytes() {
    let (_t, dir) = copy_fixture();
    // Two norms of the same size: the second one's range moved onto (then half over) the first's.
    let [a, b] = [
        "model.layers.0.input_layernorm.weight",
        "model.layers.1.input_layernorm.weight",
    ];
    for shift in [0, 8] {
        let (_t2, d) = copy_fixture();
        edit_header(&d, |h| {
            let r = h[a]["data_offsets"].clone();
            let (begin, end) = (
                r[0].as_u64().unwrap() + shift,
                r[1].as_u64().unwrap() + shift,
            );
            h[b]["data_offsets"] = serde_json::json!([begin, end]);
        });
        let err = run_on(&d);
        assert!(
            err.contains("model.safetensors")
                && err.contains("overlap")
                && err.contains(a)
                && err.contains(b),
            "{err}"
        );
    }
    // Tensors that only touch are fine (the file as written).
    let _ = Checkpoint::open(dir.to_str().unwrap()).unwrap();
}

#[test]
fn a_tensor_in_two_shards() {
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(fixture("mistral")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), tmp.path().join(e.file_name())).unwrap();
    }
    use ferry::checkpoint::safetensors;
    let (one, two) = (
        tmp.path().join("model-00001-of-00002.safetensors"),
        tmp.path().join("model-00002-of-00002.safetensors"),
    );
    let first = safetensors::read(&one).unwrap();
    let mut second: Vec<_> = safetensors::read(&two)
        .unwrap()
        .iter()
        .chain(&first[..1])
        .map(|t| (t.name.clone(), t.dtype, t.shape.clone(), t.bytes().to_vec()))
        .collect();
    second.sort_by(|a, b| a.0.cmp(&b.0));
    drop(first);
    safetensors::write(&two, &second).unwrap();
    let err = run_on(tmp.path());
    assert!(
        err.contains("model-0000") && err.contains("also in") && err.contains("one file"),
        "{err}"
    );
}

/// Set `key` of `dir/FILE` (a JSON object) to `value`.
fn set_json(dir: &Path, file: &str, key: &str, value: serde_json::Value) {
    let path = dir.join(file);
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    json[key] = value;
    std::fs::write(path, serde_json::to_vec(&json).unwrap()).unwrap();
}

#[test]
fn rope_scaling_that_is_not_an_object() {
    for bad in [
        serde_json::json!("linear"),
        serde_json::json!([8.0]),
        serde_json::json!(2),
    ] {
        let (_t, dir) = copy_fixture();
        set_json(&dir, "config.json", "rope_scaling", bad);
        let err = run_on(&dir);
        assert!(
            err.contains("config.json") && err.contains("rope_scaling") && err.contains("object"),
            "{err}"
        );
    }
    let (_t, dir) = copy_fixture();
    set_json(
        &dir,
        "config.json",
        "rope_scaling",
        serde_json::json!({"rope_type": 3}),
    );
    let err = run_on(&dir);
    assert!(
        err.contains("config.json") && err.contains("rope_type"),
        "{err}"
    );
}

#[test]
fn token_ids_of_the_wrong_type() {
    // An EOS id that was silently dropped made generation never stop at end of sequence.
    for (file, key) in [
        ("generation_config.json", "eos_token_id"),
        ("generation_config.json", "bos_token_id"),
        ("config.json", "eos_token_id"),
    ] {
        for bad in [
            serde_json::json!("</s>"),
            serde_json::json!(-2),
            serde_json::json!([2, "x"]),
        ] {
            let (_t, dir) = copy_fixture();
            if file == "config.json" {
                std::fs::remove_file(dir.join("generation_config.json")).unwrap();
            }
            set_json(&dir, file, key, bad);
            let err = run_on(&dir);
            assert!(
                err.contains(file) && err.contains(key) && err.contains("token id"),
                "{file} {key}: {err}"
            );
        }
    }
    // Null is "not given", as transformers writes it.
    let (_t, dir) = copy_fixture();
    set_json(
        &dir,
        "generation_config.json",
        "eos_token_id",
        serde_json::Value::Null,
    );
    let _ = Checkpoint::open(dir.to_str().unwrap()).unwrap();
    let (_t, dir) = copy_fixture();
    set_json(
        &dir,
        "tokenizer_config.json",
        "chat_template",
        serde_json::json!(7),
    );
    let err = run_on(&dir);
    assert!(
        err.contains("tokenizer_config.json") && err.contains("chat_template"),
        "{err}"
    );
}

#[test]
fn an_empty_model_path() {
    for empty in ["", " "] {
        let err = fails(&["info", "--model", empty]);
        assert!(err.contains("--model") && err.contains("empty"), "{err}");
    }
}

#[test]
fn directories_and_special_files_are_not_said_to_be_missing() {
    for file in [
        "config.json",
        "tokenizer.json",
        "generation_config.json",
        "model.safetensors",
    ] {
        let (_t, dir) = copy_fixture();
        std::fs::remove_file(dir.join(file)).unwrap();
        std::fs::create_dir(dir.join(file)).unwrap();
        let err = run_on(&dir);
        assert!(
            err.contains(file) && err.contains("is a directory") && !err.contains("not found"),
            "{file}: {err}"
        );
    }
    let err = fails(&["info", "--model", "/dev/null"]);
    assert!(
        err.contains("/dev/null") && err.contains("special file"),
        "{err}"
    );
    // A pipe in place of the weights is refused at once, not waited on.
    let (_t, dir) = copy_fixture();
    let weights = dir.join("model.safetensors");
    std::fs::remove_file(&weights).unwrap();
    if Command::new("mkfifo")
        .arg(&weights)
        .status()
        .is_ok_and(|s| s.success())
    {
        let err = run_on(&dir);
        assert!(
            err.contains("model.safetensors") && err.contains("special file"),
            "{err}"
        );
    }
}
