//! Hugging Face model directories and the hub cache layout.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{
    is_regular_file, require_file, Component, GenerationDefaults, Stored, TokenizerSource,
};
use crate::error::{Error, Result};

/// Turn `--model` into a path: an existing file or directory as given, else `ORG/NAME` looked
/// up in the Hugging Face cache (`$HF_HOME/hub`, default `~/.cache/huggingface/hub`).
pub fn resolve_model_path(model: &str) -> Result<PathBuf> {
    if model.trim().is_empty() {
        return Err(Error::Flag {
            flag: "--model",
            message: "the path is empty; expected a model directory, a .gguf file, or ORG/NAME in the Hugging Face cache".into(),
        });
    }
    let given = PathBuf::from(model);
    if given.exists() {
        return Ok(given);
    }
    let parts: Vec<&str> = model.split('/').collect();
    let looks_like_repo = parts.len() == 2
        && parts
            .iter()
            .all(|p| !p.is_empty() && *p != "." && *p != "..");
    if !looks_like_repo {
        return Err(Error::NotFound {
            path: given,
            expected: "a model directory, a .gguf file, or ORG/NAME in the Hugging Face cache"
                .into(),
        });
    }
    let hub = hf_home().join("hub");
    let repo = hub.join(format!("models--{}--{}", parts[0], parts[1]));
    let snapshots = repo.join("snapshots");
    // Prefer the revision `refs/main` points at; else the only (or newest) snapshot.
    if let Ok(rev) = std::fs::read_to_string(repo.join("refs").join("main")) {
        let dir = snapshots.join(rev.trim());
        if dir.is_dir() {
            return Ok(dir);
        }
    }
    let newest = std::fs::read_dir(&snapshots).ok().and_then(|entries| {
        entries
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
            .map(|e| e.path())
    });
    newest.ok_or_else(|| Error::NotFound {
        path: given,
        expected: format!(
            "no such path, and no snapshot of {model} in the Hugging Face cache ({}); ferry does not download models",
            snapshots.display()
        ),
    })
}

fn hf_home() -> PathBuf {
    if let Some(h) = std::env::var_os("HF_HOME") {
        return PathBuf::from(h);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(".cache").join("huggingface")
}

pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_slice(&text).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// A Hugging Face model directory as read: its tensors and config.json (one component), its
/// tokenizer and generation defaults, and how the files store the weights.
pub struct HfDir {
    pub component: Component,
    pub tokenizer: TokenizerSource,
    pub generation: GenerationDefaults,
    pub stored: Stored,
}

/// Open a Hugging Face model directory.
pub fn open_dir(dir: &Path) -> Result<HfDir> {
    require_file(
        &dir.join("config.json"),
        "a Hugging Face model directory holds config.json",
    )?;
    let component = Component::open("model", dir, true)?;

    let tokenizer_path = dir.join("tokenizer.json");
    let tokenizer = if is_regular_file(&tokenizer_path)? {
        TokenizerSource::HfJson(tokenizer_path)
    } else {
        TokenizerSource::Missing
    };

    let mut stored = Stored {
        file_bytes: component.file_bytes,
        files: component.files.clone(),
        ..Stored::default()
    };
    for t in component.tensors.values() {
        *stored
            .dtypes
            .entry(t.dtype.name().to_uppercase())
            .or_default() += 1;
    }
    Ok(HfDir {
        component,
        tokenizer,
        generation: generation_defaults(dir)?,
        stored,
    })
}

/// A token given in tokenizer_config.json (`path`) under `key` as a string or as
/// `{"content": ...}`; None when absent or null.
fn token_string(path: &Path, json: &Value, key: &str) -> Result<Option<String>> {
    match json.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v @ Value::Object(o)) => match o.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(wrong_type(
                path,
                key,
                v,
                "a token string or {\"content\": string}",
            )),
        },
        Some(v) => Err(wrong_type(
            path,
            key,
            v,
            "a token string or {\"content\": string}",
        )),
    }
}

/// The token ids in `json[key]` (a config or generation_config, `path`): one id or a list;
/// empty when absent or null. Anything else is an error: an EOS id that is silently dropped
/// is a generation that never stops.
fn token_ids(path: &Path, json: &Value, key: &str) -> Result<Vec<u32>> {
    let id = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
    let expected = "a token id (a whole number ≥ 0) or a list of them";
    match json.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(v @ Value::Array(a)) => a
            .iter()
            .map(|x| id(x).ok_or_else(|| wrong_type(path, key, v, expected)))
            .collect(),
        Some(v) => id(v)
            .map(|n| vec![n])
            .ok_or_else(|| wrong_type(path, key, v, expected)),
    }
}

fn wrong_type(path: &Path, key: &str, found: &Value, expected: &str) -> Error {
    let mut found = found.to_string();
    if found.chars().count() > 60 {
        found = found.chars().take(57).collect::<String>() + "...";
    }
    Error::checkpoint(path, format!("{key:?} is {found}; expected {expected}"))
}

/// What generation needs from a directory's generation_config.json, config.json and
/// tokenizer_config.json (each optional).
pub fn generation_defaults(dir: &Path) -> Result<GenerationDefaults> {
    let mut g = GenerationDefaults::default();
    // generation_config.json first, config.json where it says nothing.
    for name in ["generation_config.json", "config.json"] {
        let path = dir.join(name);
        if !is_regular_file(&path)? {
            continue;
        }
        let json = read_json(&path)?;
        if g.eos_token_ids.is_empty() {
            g.eos_token_ids = token_ids(&path, &json, "eos_token_id")?;
        }
        if g.bos_token_id.is_none() {
            g.bos_token_id = token_ids(&path, &json, "bos_token_id")?.first().copied();
        }
    }
    let tc_path = dir.join("tokenizer_config.json");
    if is_regular_file(&tc_path)? {
        let tc = read_json(&tc_path)?;
        g.bos_token = token_string(&tc_path, &tc, "bos_token")?;
        g.eos_token = token_string(&tc_path, &tc, "eos_token")?;
        let expected = "a template string, or a list of {\"name\", \"template\"}";
        g.chat_template = match tc.get("chat_template") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: take "default" (none: as transformers, no template
            // to use unless named).
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
            Some(v) => return Err(wrong_type(&tc_path, "chat_template", v, expected)),
        };
    }
    // transformers 4.43+ may keep the template in its own file.
    let jinja = dir.join("chat_template.jinja");
    if g.chat_template.is_none() && is_regular_file(&jinja)? {
        g.chat_template = Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?);
    }
    Ok(g)
}
