//! Hugging Face model directories and the hub cache layout.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{Checkpoint, Component, Format, GenerationDefaults, TokenizerSource};
use crate::error::{Error, Result};
use crate::model::{Architecture, LlamaConfig};

/// Turn `--model` into a path: an existing file or directory as given, else `ORG/NAME` looked
/// up in the Hugging Face cache (`$HF_HOME/hub`, default `~/.cache/huggingface/hub`).
pub fn resolve_model_path(model: &str) -> Result<PathBuf> {
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

pub(super) fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_slice(&text).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Open a Hugging Face model directory.
pub fn open_dir(dir: &Path) -> Result<Checkpoint> {
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        return Err(Error::NotFound {
            path: config_path,
            expected: "a Hugging Face model directory holds config.json".into(),
        });
    }
    let component = Component::open("model", dir, true)?;
    let (path, json) = component.config()?;
    let config = LlamaConfig::from_hf(path, json)?;
    let tensors = component.tensors;

    let tokenizer_path = dir.join("tokenizer.json");
    let tokenizer = if tokenizer_path.is_file() {
        TokenizerSource::HfJson(tokenizer_path)
    } else {
        TokenizerSource::Missing
    };

    let ckpt = Checkpoint {
        path: dir.to_path_buf(),
        format: Format::Safetensors,
        config,
        tensors,
        tokenizer,
        generation: generation_defaults(dir)?,
    };
    crate::model::Llama::new(ckpt.config.clone()).check_tensors(&ckpt)?;
    Ok(ckpt)
}

/// A token given in tokenizer_config.json as a string or as `{"content": ...}`.
fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|n| n as u32)
            .collect(),
        _ => Vec::new(),
    }
}

/// What generation needs from a directory's generation_config.json, config.json and
/// tokenizer_config.json (each optional).
pub fn generation_defaults(dir: &Path) -> Result<GenerationDefaults> {
    let mut g = GenerationDefaults::default();
    let gen_path = dir.join("generation_config.json");
    if gen_path.is_file() {
        let gen = read_json(&gen_path)?;
        g.eos_token_ids = token_ids(gen.get("eos_token_id"));
        g.bos_token_id = token_ids(gen.get("bos_token_id")).first().copied();
    }
    let config_path = dir.join("config.json");
    if config_path.is_file() {
        let config = read_json(&config_path)?;
        if g.eos_token_ids.is_empty() {
            g.eos_token_ids = token_ids(config.get("eos_token_id"));
        }
        if g.bos_token_id.is_none() {
            g.bos_token_id = token_ids(config.get("bos_token_id")).first().copied();
        }
    }
    let tc_path = dir.join("tokenizer_config.json");
    if tc_path.is_file() {
        let tc = read_json(&tc_path)?;
        g.bos_token = token_string(tc.get("bos_token"));
        g.eos_token = token_string(tc.get("eos_token"));
        g.chat_template = match tc.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: take "default".
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
            _ => None,
        };
    }
    // transformers 4.43+ may keep the template in its own file.
    let jinja = dir.join("chat_template.jinja");
    if g.chat_template.is_none() && jinja.is_file() {
        g.chat_template = Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?);
    }
    Ok(g)
}
