//! Reading checkpoints: Hugging Face directories (safetensors, one file or sharded), diffusers
//! pipelines of components, and GGUF files. Everything is memory-mapped; opening copies no
//! weights. The result is named tensor views over the mapped bytes with the metadata as
//! stored (config JSON, GGUF key/values): what it means is each model's to read, so nothing
//! here knows a model.

mod byte_bpe;
mod clip_tokenizer;
mod component;
pub mod gguf;
mod hf;
mod quant;
pub mod safetensors;
mod slow_tokenizer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::{bf16, f16};
use memmap2::Mmap;
use rayon::prelude::*;

use crate::error::{Error, Result};

pub use clip_tokenizer::{open_clip_tokenizer, CLIP_ENDOFTEXT, CLIP_STARTOFTEXT};
pub use component::{Component, Pipeline};
pub(crate) use hf::read_json;
pub use hf::{generation_defaults, open_dir, resolve_model_path, HfDir};
pub use quant::{dequantize, GgmlType};
pub use slow_tokenizer::open_qwen2_slow;

/// Element type of a stored tensor, as ferry keeps it in host memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
    /// ggml's quantized blocks, as a GGUF file stores them (a block type: Q8_0, Q4_K, …):
    /// rows are whole blocks, dequantized where they are used.
    Ggml(GgmlType),
}

impl DType {
    /// Bytes per element of an element type. Block types have none: [`DType::bytes`].
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Ggml(t) => panic!("{t} stores blocks, not elements of a size"),
        }
    }

    /// Bytes of `numel` elements (whole blocks for a block type).
    pub fn bytes(self, numel: usize) -> usize {
        match self {
            DType::Ggml(t) => numel / t.block_size() * t.type_size(),
            d => numel * d.size(),
        }
    }

    /// Whether rows of `len` elements are whole units of this type.
    pub fn fits_row(self, len: usize) -> bool {
        match self {
            DType::Ggml(t) => len % t.block_size() == 0,
            _ => true,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::Ggml(t) => t.name(),
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Host memory that tensors point into: a file mapping, or an owned buffer (GGUF weights
/// dequantized at load). Owned buffers are 8-byte aligned so any element type can be viewed.
pub enum Storage {
    Mapped(Mmap),
    Owned { words: Vec<u64>, len: usize },
}

/// Whether `path` is there as a regular file (symlinks followed, as in the HF cache):
/// `Ok(false)` when nothing is there, and an error naming it when something else is (a
/// directory, a device, a pipe), which is then neither "not found" nor read as a file.
pub(crate) fn is_regular_file(path: &Path) -> Result<bool> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(true),
        Ok(m) => Err(Error::checkpoint(
            path,
            format!(
                "is {}; expected a regular file",
                if m.is_dir() {
                    "a directory"
                } else {
                    "a special file (a device, pipe or socket)"
                }
            ),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// `path` as a regular file, or an error: [`Error::NotFound`] with `expected` when nothing is
/// there, [`is_regular_file`]'s when something else is.
pub(crate) fn require_file(path: &Path, expected: &str) -> Result<()> {
    if is_regular_file(path)? {
        return Ok(());
    }
    Err(Error::NotFound {
        path: path.to_path_buf(),
        expected: expected.into(),
    })
}

impl Storage {
    pub fn map(path: &Path) -> Result<Storage> {
        // Checked first: opening a pipe would wait for a writer, and a directory maps as an
        // error about devices.
        require_file(path, "a file to map")?;
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the mapping is read-only. ferry never writes the file; another process
        // truncating it while we run is outside what any mmap-based reader can guard against.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Ok(Storage::Mapped(map))
    }

    /// `len` bytes of an open file from `offset` (a multiple of the page size), mapped
    /// read-only on their own.
    pub fn map_range(file: &std::fs::File, offset: u64, len: usize) -> std::io::Result<Storage> {
        // SAFETY: the mapping is read-only. ferry never writes a mapped file in place (the
        // encodings cache renames a new file over an old one, which leaves this mapping
        // whole); another process truncating it is outside what any mmap-based reader can
        // guard against, as for `map`.
        let map = unsafe {
            memmap2::MmapOptions::new()
                .offset(offset)
                .len(len)
                .map(file)
        }?;
        Ok(Storage::Mapped(map))
    }

    pub fn owned(bytes_len: usize) -> Storage {
        Storage::Owned {
            words: vec![0u64; bytes_len.div_ceil(8)],
            len: bytes_len,
        }
    }

    pub fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mapped(m) => m,
            Storage::Owned { words, len } => &bytemuck::cast_slice(words)[..*len],
        }
    }

    /// Mutable bytes of an owned buffer (to fill it); None for a mapping.
    pub fn bytes_mut(&mut self) -> Option<&mut [u8]> {
        match self {
            Storage::Mapped(_) => None,
            Storage::Owned { words, len } => Some(&mut bytemuck::cast_slice_mut(words)[..*len]),
        }
    }
}

/// A named tensor: a view into shared host storage.
#[derive(Clone)]
pub struct HostTensor {
    pub name: String,
    pub dtype: DType,
    /// Row-major, outermost first (`[out_features, in_features]` for a linear weight).
    pub shape: Vec<usize>,
    storage: Arc<Storage>,
    offset: usize,
    len: usize,
}

impl std::fmt::Debug for HostTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}{:?}", self.name, self.dtype, self.shape)
    }
}

impl HostTensor {
    /// `offset..offset+len` must lie inside `storage` and `len` must equal
    /// `dtype.bytes(numel)` (rows of whole blocks for a block type); readers check this
    /// against the file before calling.
    pub fn new(
        name: String,
        dtype: DType,
        shape: Vec<usize>,
        storage: Arc<Storage>,
        offset: usize,
        len: usize,
    ) -> HostTensor {
        assert!(
            offset + len <= storage.bytes().len(),
            "tensor {name} outside its storage"
        );
        let numel: usize = shape.iter().product();
        assert!(
            dtype.fits_row(*shape.last().unwrap_or(&1)),
            "tensor {name}: rows of {dtype} blocks"
        );
        assert_eq!(len, dtype.bytes(numel), "tensor {name} size");
        HostTensor {
            name,
            dtype,
            shape,
            storage,
            offset,
            len,
        }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The host memory this tensor lies in (shared with the checkpoint's other tensors).
    pub fn storage(&self) -> &Arc<Storage> {
        &self.storage
    }

    /// The same bytes under another name (no copy).
    pub fn renamed(&self, name: impl Into<String>) -> HostTensor {
        HostTensor {
            name: name.into(),
            ..self.clone()
        }
    }

    /// Rows `start..start + count` of the outermost dimension, as a tensor called `name`
    /// viewing the same bytes (no copy): how a fused projection (`qkv`) is split. The range
    /// must lie within the tensor.
    pub fn rows(&self, name: impl Into<String>, start: usize, count: usize) -> HostTensor {
        let outer = self.shape.first().copied().unwrap_or(1);
        assert!(
            start + count <= outer,
            "rows {start}..{} of {} {:?}",
            start + count,
            self.name,
            self.shape
        );
        let row_bytes = self.len / outer.max(1);
        let mut shape = self.shape.clone();
        if let Some(first) = shape.first_mut() {
            *first = count;
        }
        HostTensor {
            name: name.into(),
            dtype: self.dtype,
            shape,
            storage: self.storage.clone(),
            offset: self.offset + start * row_bytes,
            len: count * row_bytes,
        }
    }

    /// The raw little-endian bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.storage.bytes()[self.offset..self.offset + self.len]
    }

    /// The elements converted to f32 (exact for every supported dtype; blocks dequantized as
    /// ggml does, on every core for a large tensor).
    pub fn to_f32(&self) -> Vec<f32> {
        let b = self.bytes();
        match self.dtype {
            DType::Ggml(t) => {
                let mut out = vec![0f32; self.numel()];
                let per_task = t.block_size() * 1024;
                out.par_chunks_mut(per_task)
                    .zip(b.par_chunks(per_task / t.block_size() * t.type_size()))
                    .for_each(|(y, x)| quant::dequantize(t, x, y));
                out
            }
            DType::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            DType::BF16 => b
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            DType::F16 => b
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        }
    }

    /// The elements as bf16 if they are stored so and suitably aligned (no copy).
    pub fn as_bf16(&self) -> Option<&[bf16]> {
        match self.dtype {
            DType::BF16 => bytemuck::try_cast_slice(self.bytes()).ok(),
            _ => None,
        }
    }

    /// The elements as f32 if they are stored so and suitably aligned (no copy).
    pub fn as_f32(&self) -> Option<&[f32]> {
        match self.dtype {
            DType::F32 => bytemuck::try_cast_slice(self.bytes()).ok(),
            _ => None,
        }
    }

    /// Check the shape against what the model expects.
    pub fn expect_shape(&self, expected: &[usize]) -> Result<()> {
        if self.shape != expected {
            return Err(Error::Shape {
                tensor: self.name.clone(),
                expected: expected.to_vec(),
                found: self.shape.clone(),
            });
        }
        Ok(())
    }
}

/// Named tensors: a checkpoint's, or one component's.
pub trait Tensors {
    /// The tensor called `name`, or an error naming it and where it was looked for.
    fn tensor(&self, name: &str) -> Result<&HostTensor>;

    /// The weight files the tensors were read from, for what is cached beside them (and
    /// must know when they change); none for weights made or read in memory.
    fn files(&self) -> &[PathBuf] {
        &[]
    }
}

impl Tensors for Component {
    fn tensor(&self, name: &str) -> Result<&HostTensor> {
        Component::tensor(self, name)
    }

    fn files(&self) -> &[PathBuf] {
        &self.files
    }
}

/// Where the tokenizer of a checkpoint comes from.
pub enum TokenizerSource {
    /// A `tokenizer.json` file (Hugging Face tokenizers format).
    HfJson(PathBuf),
    /// Vocabulary and merges from GGUF metadata.
    Gguf(Box<GgufTokenizerSpec>),
    /// Missing: the checkpoint has no tokenizer; running it needs one.
    Missing,
}

impl TokenizerSource {
    /// The tokenizer, built; `checkpoint` (the model's path) is named in errors.
    pub fn open(&self, checkpoint: &Path) -> Result<tokenizers::Tokenizer> {
        match self {
            TokenizerSource::HfJson(path) => {
                tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Tokenizer {
                    path: path.clone(),
                    message: e.to_string(),
                })
            }
            TokenizerSource::Gguf(spec) => {
                gguf::tokenizer::build(spec).map_err(|message| Error::Tokenizer {
                    path: checkpoint.to_path_buf(),
                    message,
                })
            }
            TokenizerSource::Missing => Err(Error::NotFound {
                path: checkpoint.join("tokenizer.json"),
                expected: "a tokenizer to encode the prompt".into(),
            }),
        }
    }
}

/// A tokenizer as GGUF metadata describes it (`tokenizer.ggml.*`).
#[derive(Clone, Debug, Default)]
pub struct GgufTokenizerSpec {
    /// `tokenizer.ggml.model`: "gpt2" (byte-level BPE) or "llama" (SentencePiece-style).
    pub model: String,
    /// `tokenizer.ggml.pre`: the pre-tokenizer flavour of gpt2-style vocabularies.
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`, indexed by id.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.scores` (SentencePiece).
    pub scores: Vec<f32>,
    /// `tokenizer.ggml.token_type`: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused,
    /// 6 byte.
    pub token_types: Vec<i32>,
    /// `tokenizer.ggml.merges`, "left right" (BPE).
    pub merges: Vec<String>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub unknown_id: Option<u32>,
    pub padding_id: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
}

/// Generation settings that come with a checkpoint (generation_config.json,
/// tokenizer_config.json, or GGUF metadata).
#[derive(Clone, Debug, Default)]
pub struct GenerationDefaults {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub eos_token_ids: Vec<u32>,
    pub chat_template: Option<String>,
    /// Whether to prepend BOS when the tokenizer itself does not (GGUF `add_bos_token`).
    pub add_bos_token: bool,
    pub bos_token_id: Option<u32>,
}

/// The file format a checkpoint came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Safetensors,
    Gguf,
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Format::Safetensors => "safetensors",
            Format::Gguf => "GGUF",
        })
    }
}

/// How the files store the weights, before ferry converts them (GGUF's quantized blocks are
/// dequantized at load): for `ferry info`.
#[derive(Clone, Debug, Default)]
pub struct Stored {
    /// Bytes of the files read (0 for weights made in memory).
    pub file_bytes: usize,
    /// The weight files read (none for weights made or read in memory).
    pub files: Vec<PathBuf>,
    /// The stored element types ("Q4_1", "F32", "BF16"), each with its number of tensors.
    pub dtypes: BTreeMap<String, usize>,
}
