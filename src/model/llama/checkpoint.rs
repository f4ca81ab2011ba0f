//! A language model's checkpoint as a Llama-family model reads it: the files' tensors,
//! tokenizer and generation defaults, with the config parsed from the metadata they carry
//! (config.json or GGUF key/values) and every tensor checked against the model's groups.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::{gguf, Llama, LlamaConfig};
pub use crate::checkpoint::gguf::Weights;
use crate::checkpoint::{
    open_dir, require_file, resolve_model_path, DType, Format, GenerationDefaults, HostTensor,
    Stored, Tensors, TokenizerSource,
};
use crate::error::{Error, Result};
use crate::model::Architecture;

/// An opened checkpoint: config, tensors (views into mapped or owned host memory), and what
/// generation needs.
pub struct Checkpoint {
    /// The directory or file it was opened from.
    pub path: PathBuf,
    pub format: Format,
    pub config: LlamaConfig,
    pub tensors: BTreeMap<String, HostTensor>,
    pub tokenizer: TokenizerSource,
    pub generation: GenerationDefaults,
    pub stored: Stored,
}

impl Checkpoint {
    /// Open a model given as a directory, a `.gguf` file, or `ORG/NAME` in the Hugging Face
    /// cache; a GGUF's tensors dequantized to bf16 (what the GPU computes with).
    pub fn open(model: &str) -> Result<Checkpoint> {
        Checkpoint::open_as(model, Weights::Dequantized(DType::BF16))
    }

    /// [`Checkpoint::open`], a GGUF's quantized tensors held as `gguf` says: dequantized to
    /// f32 for the CPU, which computes in f32 (exactly the values the file's blocks encode,
    /// where bf16 would round them), or kept as blocks for the GPU, which streams them as
    /// stored and dequantizes them on the device.
    pub fn open_as(model: &str, gguf: Weights) -> Result<Checkpoint> {
        let path = resolve_model_path(model)?;
        if path.is_dir() {
            let dir = open_dir(&path)?;
            let (config_path, json) = dir.component.config()?;
            let config = LlamaConfig::from_hf(config_path, json)?;
            let ckpt = Checkpoint {
                path: path.clone(),
                format: Format::Safetensors,
                config,
                tensors: dir.component.tensors,
                tokenizer: dir.tokenizer,
                generation: dir.generation,
                stored: dir.stored,
            };
            Llama::new(ckpt.config.clone()).check_tensors(&ckpt)?;
            return Ok(ckpt);
        }
        // A device or a pipe is neither: said so, before reading it waits on a pipe.
        require_file(&path, "a model directory or a .gguf file")?;
        if crate::checkpoint::gguf::is_gguf(&path) {
            gguf::open(&path, gguf)
        } else {
            Err(Error::checkpoint(
                &path,
                "expected a model directory (config.json + *.safetensors) or a .gguf file",
            ))
        }
    }

    /// The tensor called `name`, or an error naming it.
    pub fn tensor(&self, name: &str) -> Result<&HostTensor> {
        self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            tensor: name.to_string(),
        })
    }

    /// The tokenizer that comes with this checkpoint.
    pub fn tokenizer(&self) -> Result<tokenizers::Tokenizer> {
        self.tokenizer.open(&self.path)
    }

    /// Total bytes of all tensors.
    pub fn bytes(&self) -> usize {
        self.tensors.values().map(|t| t.bytes().len()).sum()
    }

    /// Total number of parameters.
    pub fn parameters(&self) -> usize {
        self.tensors.values().map(|t| t.numel()).sum()
    }
}

impl Tensors for Checkpoint {
    fn tensor(&self, name: &str) -> Result<&HostTensor> {
        Checkpoint::tensor(self, name)
    }

    fn files(&self) -> &[PathBuf] {
        &self.stored.files
    }
}
