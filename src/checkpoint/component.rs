//! Checkpoints as named components: each a folder (or file) with its tensors and its raw
//! metadata, knowing no model. A Hugging Face LLM directory is one component; a diffusers
//! directory (`model_index.json` with one sub-directory per component: transformer/,
//! text_encoder/, tokenizer/, vae/, scheduler/) is several. Each model parses its own config
//! from its component's metadata.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{hf::read_json, is_regular_file, require_file, safetensors, HostTensor};
use crate::error::{Error, Result};

/// One component: its tensors (views into mapped files) and its config.
pub struct Component {
    /// Its name in the pipeline ("transformer", "vae"; "model" for a lone LLM directory).
    pub name: String,
    /// The folder it was read from.
    pub dir: PathBuf,
    /// The class the pipeline names for it (`["diffusers", "AutoencoderKL"]` → "AutoencoderKL"),
    /// when a model_index.json says.
    pub class_name: Option<String>,
    /// `config.json` (or `scheduler_config.json`) as read, and where from; `None` where the
    /// component has none (a tokenizer).
    pub config: Option<(PathBuf, Value)>,
    pub tensors: BTreeMap<String, HostTensor>,
    /// Bytes of the weight files read.
    pub file_bytes: usize,
    /// The weight files read, in order (none for weights made in memory).
    pub files: Vec<PathBuf>,
}

impl Component {
    /// Read the component in `dir`: its config file if any, and every tensor of its weights
    /// (`model.safetensors` or `diffusion_pytorch_model.safetensors`, one file or shards named
    /// by their `.index.json`). `weights` says whether weights must be there.
    pub fn open(name: &str, dir: &Path, weights: bool) -> Result<Component> {
        if !dir.is_dir() {
            return Err(Error::NotFound {
                path: dir.to_path_buf(),
                expected: format!("the {name} component's directory"),
            });
        }
        let mut config = None;
        for file in ["config.json", "scheduler_config.json"] {
            let path = dir.join(file);
            if is_regular_file(&path)? {
                config = Some((read_json(&path)?, path));
                break;
            }
        }
        let config = config.map(|(v, p)| (p, v));
        let mut tensors = BTreeMap::new();
        let mut file_bytes = 0;
        let mut files = Vec::new();
        if weights {
            files = safetensors_files(dir)?;
            // Which file each tensor came from: one name in two shards is refused, not
            // resolved by whichever was read last.
            let mut from: BTreeMap<String, usize> = BTreeMap::new();
            for (i, file) in files.iter().enumerate() {
                let read = safetensors::read(file)?;
                file_bytes += std::fs::metadata(file).map_or(0, |m| m.len() as usize);
                for t in read {
                    if let Some(&first) = from.get(&t.name) {
                        return Err(Error::checkpoint(
                            file,
                            format!(
                                "tensor {:?} is also in {}; each tensor must be in one file",
                                t.name,
                                files[first].display()
                            ),
                        ));
                    }
                    from.insert(t.name.clone(), i);
                    tensors.insert(t.name.clone(), t);
                }
            }
        }
        Ok(Component {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            class_name: None,
            config,
            tensors,
            file_bytes,
            files,
        })
    }

    /// A component read from one single file (a ComfyUI split file), its tensors already
    /// renamed to what the model binds; it has no config. Errors name `path`.
    pub fn from_file(name: &str, path: &Path, tensors: BTreeMap<String, HostTensor>) -> Component {
        Component {
            name: name.to_string(),
            dir: path.to_path_buf(),
            class_name: None,
            config: None,
            file_bytes: std::fs::metadata(path).map_or(0, |m| m.len() as usize),
            files: vec![path.to_path_buf()],
            tensors,
        }
    }

    /// The config, or an error saying which file is missing.
    pub fn config(&self) -> Result<(&Path, &Value)> {
        self.config
            .as_ref()
            .map(|(p, v)| (p.as_path(), v))
            .ok_or_else(|| Error::NotFound {
                path: self.dir.join("config.json"),
                expected: format!("the {} component's config", self.name),
            })
    }

    /// The tensor called `name`, or an error naming it and this component.
    pub fn tensor(&self, name: &str) -> Result<&HostTensor> {
        self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.dir.clone(),
            tensor: name.to_string(),
        })
    }

    /// Total bytes of its tensors.
    pub fn bytes(&self) -> usize {
        self.tensors.values().map(|t| t.bytes().len()).sum()
    }
}

/// A diffusers directory: `model_index.json` and its components, opened.
pub struct Pipeline {
    pub path: PathBuf,
    /// `_class_name` of model_index.json ("ZImagePipeline").
    pub class_name: String,
    pub components: BTreeMap<String, Component>,
}

impl Pipeline {
    /// Whether `dir` is a diffusers directory.
    pub fn is_pipeline(dir: &Path) -> bool {
        dir.join("model_index.json").is_file()
    }

    /// Open every component that model_index.json lists with a library and class (entries
    /// of `[null, null]` are absent components). Tokenizers and schedulers have no weights.
    pub fn open(dir: &Path) -> Result<Pipeline> {
        let index_path = dir.join("model_index.json");
        let index = read_json(&index_path)?;
        let bad = |message: String| Error::Json {
            path: index_path.clone(),
            message,
        };
        let object = index
            .as_object()
            .ok_or_else(|| bad("expected an object of components".into()))?;
        let class_name = object
            .get("_class_name")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("expected \"_class_name\": the pipeline's class".into()))?
            .to_string();
        let mut components = BTreeMap::new();
        for (name, entry) in object.iter().filter(|(k, _)| !k.starts_with('_')) {
            let pair = entry.as_array().filter(|a| a.len() == 2);
            let Some([library, class]) = pair.map(|a| [&a[0], &a[1]]) else {
                // Pipeline options (booleans, numbers) sit beside the components.
                continue;
            };
            let (Some(library), Some(class)) = (library.as_str(), class.as_str()) else {
                continue; // [null, null]: the component is not used
            };
            let weights = !(class.contains("Tokenizer") || class.contains("Scheduler"));
            let _ = library;
            let mut c = Component::open(name, &dir.join(name), weights)?;
            c.class_name = Some(class.to_string());
            components.insert(name.clone(), c);
        }
        Ok(Pipeline {
            path: dir.to_path_buf(),
            class_name,
            components,
        })
    }

    /// The component called `name`, or an error naming the directory and what is there.
    /// The component `name`, taken out of the pipeline (its weights then belong to the
    /// caller); the same error as [`component`](Self::component) when it is not there.
    pub fn take(&mut self, name: &str) -> Result<Component> {
        self.component(name)?;
        Ok(self.components.remove(name).expect("just found"))
    }

    pub fn component(&self, name: &str) -> Result<&Component> {
        self.components.get(name).ok_or_else(|| Error::NotFound {
            path: self.path.join(name),
            expected: format!(
                "a {name} component in model_index.json (found: {})",
                self.components
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })
    }
}

/// The weight files of a component: `STEM.safetensors`, or the shards that
/// `STEM.safetensors.index.json` names, for the stems HF (`model`) and diffusers
/// (`diffusion_pytorch_model`) write.
pub(super) fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    const STEMS: [&str; 2] = ["model", "diffusion_pytorch_model"];
    for stem in STEMS {
        let index_path = dir.join(format!("{stem}.safetensors.index.json"));
        if is_regular_file(&index_path)? {
            return shards(dir, &index_path);
        }
        let single = dir.join(format!("{stem}.safetensors"));
        if is_regular_file(&single)? {
            return Ok(vec![single]);
        }
    }
    Err(Error::NotFound {
        path: dir.join("model.safetensors"),
        expected: "model.safetensors or diffusion_pytorch_model.safetensors, or an .index.json with its shards".into(),
    })
}

/// The shard files `index_path`'s weight_map names, each checked to exist.
fn shards(dir: &Path, index_path: &Path) -> Result<Vec<PathBuf>> {
    let index = read_json(index_path)?;
    let map = index
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::Json {
            path: index_path.to_path_buf(),
            message: "expected an object \"weight_map\": {tensor name: shard file}".into(),
        })?;
    let mut files: Vec<PathBuf> = Vec::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| Error::Json {
            path: index_path.to_path_buf(),
            message: format!("weight_map[{tensor:?}] should be a file name"),
        })?;
        let path = dir.join(file);
        if !files.contains(&path) {
            files.push(path);
        }
    }
    for f in &files {
        require_file(f, &format!("shard listed in {}", index_path.display()))?;
    }
    Ok(files)
}
