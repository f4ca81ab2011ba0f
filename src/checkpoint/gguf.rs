//! GGUF files (llama.cpp's format), versions 2 and 3, little-endian.
//!
//! Layout: magic `GGUF`, version u32, tensor count u64, metadata count u64; metadata
//! key/value pairs (key: u64 length + UTF-8; value: u32 type + payload, arrays nest); tensor
//! infos (name, u32 dims count, u64 dims innermost first, u32 ggml type, u64 offset into the
//! data section); padding to `general.alignment` (default 32); the data section.
//!
//! Opening maps the file, checks every length and offset against its size before using it,
//! turns the metadata into a [`LlamaConfig`], and dequantizes every tensor (in parallel) into
//! one owned buffer of the requested dtype under its Hugging Face name and `[out, in]` shape.
//! llama.cpp stores the rows of Q and K of the `llama` architecture permuted for its
//! interleaved rotary layout; they are put back in the Hugging Face order here.

use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal, Read};
use std::path::Path;
use std::sync::Arc;

use half::{bf16, f16};
use rayon::prelude::*;

use super::{
    Checkpoint, DType, Format, GenerationDefaults, GgufTokenizerSpec, HostTensor, Storage, Stored,
    TokenizerSource,
};
use crate::error::{Error, Result};
use crate::model::{Arch, Architecture, Llama, Llama3RopeScaling, LlamaConfig};

pub use super::quant::{GgmlType, SUPPORTED_TYPES};

const MAGIC: &[u8; 4] = b"GGUF";
/// Data section alignment when `general.alignment` is absent (bytes).
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most 4 dimensions.
const MAX_DIMS: u32 = 4;
/// Arrays of arrays deeper than this are refused (keeps the parser's recursion bounded).
const MAX_NESTING: usize = 8;
/// Architectures this reader turns into a [`LlamaConfig`].
const SUPPORTED_ARCHS: &str = "llama (incl. mistral converted as llama), qwen2, qwen3";
/// Output bytes above which a progress bar is shown (when stderr is a terminal).
const PROGRESS_BYTES: usize = 256 << 20;
/// Elements dequantized per parallel task.
const TASK_ELEMENTS: usize = 1 << 18;

// ---------------------------------------------------------------------------------------
// Header and metadata
// ---------------------------------------------------------------------------------------

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    /// Invalid UTF-8 is replaced by U+FFFD (GGUF strings are specified as UTF-8).
    String(String),
    Array(Vec<Value>),
}

/// A value as a message shows it: `0`, `"llama"`, `[3 uint32s]` (with its type where the
/// message needs it: [`Value::type_name`]).
impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::U8(v) => write!(f, "{v}"),
            Value::I8(v) => write!(f, "{v}"),
            Value::U16(v) => write!(f, "{v}"),
            Value::I16(v) => write!(f, "{v}"),
            Value::U32(v) => write!(f, "{v}"),
            Value::I32(v) => write!(f, "{v}"),
            Value::U64(v) => write!(f, "{v}"),
            Value::I64(v) => write!(f, "{v}"),
            Value::F32(v) => write!(f, "{v}"),
            Value::F64(v) => write!(f, "{v}"),
            Value::Bool(v) => write!(f, "{v}"),
            Value::String(s) if s.chars().count() > 40 => {
                write!(f, "{:?}...", s.chars().take(37).collect::<String>())
            }
            Value::String(s) => write!(f, "{s:?}"),
            Value::Array(a) => match a.first() {
                None => f.write_str("[]"),
                Some(first) => write!(f, "[{} {}s]", a.len(), first.type_name()),
            },
        }
    }
}

impl Value {
    /// The GGUF type name, for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "uint8",
            Value::I8(_) => "int8",
            Value::U16(_) => "uint16",
            Value::I16(_) => "int16",
            Value::U32(_) => "uint32",
            Value::I32(_) => "int32",
            Value::U64(_) => "uint64",
            Value::I64(_) => "int64",
            Value::F32(_) => "float32",
            Value::F64(_) => "float64",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
        }
    }

    /// Any integer that is not negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// A float.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One tensor as the file describes it.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// GGUF order: innermost (contiguous) dimension first.
    pub dims: Vec<usize>,
    pub ty: GgmlType,
    /// Start of the data, from the start of the file (bytes).
    pub start: usize,
    /// Size of the data (bytes).
    pub len: usize,
}

impl TensorInfo {
    /// Row-major shape, outermost first (`[out_features, in_features]` for a linear weight).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().copied().collect()
    }

    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }

    /// Elements per row (the innermost dimension); 1 for a scalar.
    fn row_len(&self) -> usize {
        self.dims.first().copied().unwrap_or(1)
    }
}

/// Everything before the tensor data, checked against the file size.
#[derive(Clone, Debug)]
pub struct Header {
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    /// In file order.
    pub tensors: Vec<TensorInfo>,
    /// Alignment of the data section and of every tensor in it (bytes).
    pub alignment: usize,
    /// Start of the data section (bytes from the start of the file).
    pub data_offset: usize,
}

/// What is wrong with a GGUF header, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderError {
    /// Byte offset in the file where the problem was found.
    pub offset: usize,
    pub message: String,
}

impl std::fmt::Display for HeaderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (at byte {})", self.message, self.offset)
    }
}

impl std::error::Error for HeaderError {}

/// Reads little-endian values from the file, never past its end.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn error(&self, message: String) -> HeaderError {
        HeaderError {
            offset: self.pos,
            message,
        }
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8], HeaderError> {
        if n > self.remaining() {
            return Err(self.error(format!(
                "file is truncated: {} needs {n} bytes but only {} remain of {}",
                what(),
                self.remaining(),
                self.bytes.len()
            )));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N], HeaderError> {
        Ok(self.take(N, what)?.try_into().expect("N bytes"))
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, HeaderError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64, HeaderError> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A u64 count of items of at least `min_size` bytes each, checked against what is left.
    fn count(&mut self, min_size: usize, what: &dyn Fn() -> String) -> Result<usize, HeaderError> {
        let n = self.u64(what)?;
        let fits = usize::try_from(n).ok().filter(|&n| {
            n.checked_mul(min_size)
                .is_some_and(|b| b <= self.remaining())
        });
        fits.ok_or_else(|| {
            self.error(format!(
                "{} is {n}, impossible: at {min_size} bytes each that needs more than the {} bytes left in the file (truncated or corrupt)",
                what(),
                self.remaining()
            ))
        })
    }

    fn bytes_string(&mut self, what: &dyn Fn() -> String) -> Result<&'a [u8], HeaderError> {
        let len = self.count(1, &|| format!("length of {}", what()))?;
        self.take(len, what)
    }

    /// A string that must be valid UTF-8 (keys, names).
    fn strict_string(&mut self, what: &dyn Fn() -> String) -> Result<String, HeaderError> {
        let at = self.pos;
        let b = self.bytes_string(what)?;
        String::from_utf8(b.to_vec()).map_err(|_| HeaderError {
            offset: at,
            message: format!("{} is not valid UTF-8", what()),
        })
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<Value, HeaderError> {
        let what = || format!("the value of metadata key {key:?}");
        Ok(match ty {
            0 => Value::U8(self.array::<1>(&what)?[0]),
            1 => Value::I8(self.array::<1>(&what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(&what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(&what)?)),
            4 => Value::U32(u32::from_le_bytes(self.array(&what)?)),
            5 => Value::I32(i32::from_le_bytes(self.array(&what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(&what)?)),
            7 => match self.array::<1>(&what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => {
                    self.pos -= 1;
                    return Err(self.error(format!(
                        "metadata key {key:?}: bool byte is {b}, expected 0 or 1"
                    )));
                }
            },
            8 => Value::String(String::from_utf8_lossy(self.bytes_string(&what)?).into_owned()),
            9 => {
                if depth >= MAX_NESTING {
                    return Err(self.error(format!(
                        "metadata key {key:?}: arrays nested more than {MAX_NESTING} deep"
                    )));
                }
                let elem =
                    self.u32(&|| format!("the array element type of metadata key {key:?}"))?;
                let min = min_value_size(elem).ok_or_else(|| {
                    self.pos -= 4;
                    self.error(format!(
                        "metadata key {key:?}: unknown array element type {elem} (expected 0..=12)"
                    ))
                })?;
                let n = self.count(min, &|| format!("the array length of metadata key {key:?}"))?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem, key, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(u64::from_le_bytes(self.array(&what)?)),
            11 => Value::I64(i64::from_le_bytes(self.array(&what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(&what)?)),
            other => {
                self.pos -= 4;
                return Err(self.error(format!(
                    "metadata key {key:?}: unknown value type {other} (expected 0..=12)"
                )));
            }
        })
    }
}

/// The fewest bytes a value of GGUF type `ty` takes; None for an unknown type.
fn min_value_size(ty: u32) -> Option<usize> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 12, // element type + count
        _ => return None,
    })
}

/// Parse and check the header of a GGUF file held in `bytes` (the whole file): magic,
/// version, metadata, tensor infos, alignment, and that every tensor's data lies inside the
/// file without overlapping another. Does no I/O and never panics on bad input.
pub fn parse_header(bytes: &[u8]) -> Result<Header, HeaderError> {
    let mut r = Reader { bytes, pos: 0 };
    let magic = r.array::<4>(&|| "the magic number".into())?;
    if &magic != MAGIC {
        return Err(HeaderError {
            offset: 0,
            message: format!(
                "not a GGUF file: magic bytes are {magic:02x?}, expected \"GGUF\" (47 47 55 46)"
            ),
        });
    }
    let version = r.u32(&|| "the version".into())?;
    if version != 2 && version != 3 {
        let hint = if version.swap_bytes() == 2 || version.swap_bytes() == 3 {
            " (this looks like a big-endian GGUF file; ferry reads little-endian ones)"
        } else if version == 1 {
            " (GGUF v1 is obsolete; re-convert the model with a current llama.cpp)"
        } else {
            ""
        };
        return Err(HeaderError {
            offset: 4,
            message: format!(
                "unsupported GGUF version {version}; ferry reads versions 2 and 3{hint}"
            ),
        });
    }
    // Smallest tensor info: empty name (8), dims count (4), type (4), offset (8).
    let n_tensors = r.count(24, &|| "the tensor count".into())?;
    // Smallest key/value: empty key (8), type (4), one byte.
    let n_kv = r.count(13, &|| "the metadata count".into())?;

    let mut metadata = BTreeMap::new();
    for i in 0..n_kv {
        let key_at = r.pos;
        let key = r.strict_string(&|| format!("metadata key {i}"))?;
        let ty = r.u32(&|| format!("the type of metadata key {key:?}"))?;
        let value = r.value(ty, &key, 0)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(HeaderError {
                offset: key_at,
                message: format!("metadata key {key:?} appears twice"),
            });
        }
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(Value::U32(a)) if a.is_power_of_two() => u64::from(*a),
        Some(v) => {
            return Err(HeaderError {
                offset: r.pos,
                message: format!(
                    "general.alignment is {v} ({}), expected a uint32 power of two",
                    v.type_name()
                ),
            })
        }
    };

    struct Raw {
        name: String,
        dims: Vec<u64>,
        ty: GgmlType,
        offset: u64,
        at: usize,
    }
    let mut raw = Vec::with_capacity(n_tensors);
    for i in 0..n_tensors {
        let at = r.pos;
        let name = r.strict_string(&|| format!("the name of tensor {i}"))?;
        let what = |field: &str| format!("the {field} of tensor {name:?}");
        let n_dims = r.u32(&|| what("dimension count"))?;
        if n_dims > MAX_DIMS {
            r.pos -= 4;
            return Err(r.error(format!(
                "tensor {name:?} has {n_dims} dimensions; ggml tensors have at most {MAX_DIMS}"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(r.u64(&|| what("dimensions"))?);
        }
        let type_id = r.u32(&|| what("type"))?;
        let ty = GgmlType::from_id(type_id).map_err(|known| {
            let message = match known {
                Some(t) => format!(
                    "tensor {name:?} has type {t} (id {type_id}), which ferry does not read; supported: {SUPPORTED_TYPES}"
                ),
                None => format!(
                    "tensor {name:?} has unknown ggml type id {type_id}; supported: {SUPPORTED_TYPES}"
                ),
            };
            HeaderError {
                offset: r.pos - 4,
                message,
            }
        })?;
        let offset = r.u64(&|| what("data offset"))?;
        raw.push(Raw {
            name,
            dims,
            ty,
            offset,
            at,
        });
    }

    let data_offset = (r.pos as u64).next_multiple_of(alignment);
    let file_len = bytes.len() as u64;
    let mut tensors = Vec::with_capacity(raw.len());
    let mut seen = HashMap::with_capacity(raw.len());
    for t in raw {
        let bad = |message: String| HeaderError {
            offset: t.at,
            message: format!("tensor {:?}: {message}", t.name),
        };
        if seen.insert(t.name.clone(), ()).is_some() {
            return Err(bad("name appears twice".into()));
        }
        let numel = t
            .dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n <= file_len.saturating_mul(8))
            .filter(|_| t.dims.iter().all(|&d| d <= file_len.saturating_mul(8)))
            .ok_or_else(|| {
                bad(format!(
                    "dimensions {:?} are absurd for a {file_len}-byte file",
                    t.dims
                ))
            })?;
        let row = t.dims.first().copied().unwrap_or(1);
        let block = t.ty.block_size() as u64;
        if row % block != 0 {
            return Err(bad(format!(
                "row length {row} is not a multiple of the {} block size {block}",
                t.ty
            )));
        }
        // numel ≤ 8 × file size, so neither product can overflow a u64.
        let len = numel / block * t.ty.type_size() as u64;
        if t.offset % alignment != 0 {
            return Err(bad(format!(
                "data offset {} is not a multiple of the alignment {alignment}",
                t.offset
            )));
        }
        let start = data_offset.checked_add(t.offset);
        let end = start.and_then(|s| s.checked_add(len));
        match (start, end) {
            (Some(start), Some(end)) if end <= file_len => tensors.push(TensorInfo {
                name: t.name,
                dims: t.dims.iter().map(|&d| d as usize).collect(),
                ty: t.ty,
                start: start as usize,
                len: len as usize,
            }),
            _ => {
                return Err(bad(format!(
                    "data ({len} bytes of {} at offset {} of the data section, which starts at byte {data_offset}) extends beyond the end of the file ({file_len} bytes); the file is truncated",
                    t.ty, t.offset
                )))
            }
        }
    }

    // Tensors must not share bytes: it never happens in a real file, and it bounds the
    // dequantized size by a multiple of the file size.
    let mut by_start: Vec<&TensorInfo> = tensors.iter().filter(|t| t.len > 0).collect();
    by_start.sort_by_key(|t| t.start);
    for w in by_start.windows(2) {
        if w[0].start + w[0].len > w[1].start {
            return Err(HeaderError {
                offset: w[1].start,
                message: format!(
                    "the data of tensors {:?} and {:?} overlap",
                    w[0].name, w[1].name
                ),
            });
        }
    }

    Ok(Header {
        version,
        metadata,
        tensors,
        alignment: alignment as usize,
        data_offset: data_offset as usize,
    })
}

// ---------------------------------------------------------------------------------------
// Opening
// ---------------------------------------------------------------------------------------

/// True if `path` is a file that starts with the GGUF magic, or is named `*.gguf`.
pub fn is_gguf(path: &Path) -> bool {
    if !path.is_file() {
        return false;
    }
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        return true;
    }
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok_and(|()| &magic == MAGIC)
}

/// Open a GGUF file: map it, read its config and tokenizer, and dequantize every tensor into
/// one owned buffer of `target` dtype under Hugging Face names and shapes.
pub fn open(path: &Path, target: DType) -> Result<Checkpoint> {
    let map = Storage::map(path)?;
    from_bytes(path, map.bytes(), target)
}

/// [`open`] on a file already in memory; `path` is only named in messages.
pub fn from_bytes(path: &Path, bytes: &[u8], target: DType) -> Result<Checkpoint> {
    let header = parse_header(bytes).map_err(|e| Error::checkpoint(path, format!("GGUF: {e}")))?;
    let meta = Meta {
        path,
        map: &header.metadata,
    };

    let (config, permute_qk) = llama_config(&meta, &header, bytes)?;
    let plan = plan_tensors(path, &header, &config, permute_qk)?;
    let (tokenizer, generation) = tokenizer_and_generation(&meta, config.vocab_size)?;

    let mut stored = Stored {
        file_bytes: bytes.len(),
        ..Stored::default()
    };
    for p in &plan {
        *stored
            .dtypes
            .entry(p.info.ty.name().to_string())
            .or_default() += 1;
    }
    let tensors = dequantize_all(path, bytes, &plan, target);
    let ckpt = Checkpoint {
        path: path.to_path_buf(),
        format: Format::Gguf,
        config,
        tensors,
        tokenizer,
        generation,
        stored,
    };
    crate::model::Llama::new(ckpt.config.clone()).check_tensors(&ckpt)?;
    Ok(ckpt)
}

/// Typed access to metadata, with errors that name the key.
struct Meta<'a> {
    path: &'a Path,
    map: &'a BTreeMap<String, Value>,
}

impl Meta<'_> {
    fn bad(&self, message: String) -> Error {
        Error::checkpoint(self.path, format!("GGUF metadata: {message}"))
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key)
    }

    fn require(&self, key: &str) -> Result<&Value> {
        self.get(key)
            .ok_or_else(|| self.bad(format!("{key} is missing")))
    }

    fn usize_value(&self, key: &str, v: &Value) -> Result<usize> {
        if let Value::Array(_) = v {
            return Err(self.bad(format!(
                "{key} is an array (a value per layer); ferry supports one value for all layers"
            )));
        }
        v.as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| {
                self.bad(format!(
                    "{key} is {v} ({}), expected a non-negative integer",
                    v.type_name()
                ))
            })
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.usize_value(key, self.require(key)?)
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        self.get(key).map(|v| self.usize_value(key, v)).transpose()
    }

    fn opt_u32(&self, key: &str) -> Result<Option<u32>> {
        self.opt_usize(key)?
            .map(|n| {
                u32::try_from(n)
                    .map_err(|_| self.bad(format!("{key} is {n}, too large for a token id")))
            })
            .transpose()
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key)
            .map(|v| {
                v.as_f64().ok_or_else(|| {
                    self.bad(format!(
                        "{key} is {v} ({}), expected a float",
                        v.type_name()
                    ))
                })
            })
            .transpose()
    }

    fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        self.get(key)
            .map(|v| {
                v.as_str().ok_or_else(|| {
                    self.bad(format!("{key} is a {}, expected a string", v.type_name()))
                })
            })
            .transpose()
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.bad(format!("{key} is a {}, expected a bool", v.type_name()))),
        }
    }

    /// An array whose every element `f` accepts.
    fn opt_array<T>(
        &self,
        key: &str,
        expected: &str,
        f: impl Fn(&Value) -> Option<T>,
    ) -> Result<Option<Vec<T>>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let items = v.as_array().ok_or_else(|| {
            self.bad(format!(
                "{key} is a {}, expected an array of {expected}",
                v.type_name()
            ))
        })?;
        items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                f(item).ok_or_else(|| {
                    self.bad(format!(
                        "{key}[{i}] is {item} ({}), expected {expected}",
                        item.type_name()
                    ))
                })
            })
            .collect::<Result<Vec<T>>>()
            .map(Some)
    }
}

/// The model config from the metadata, checked against the tensor shapes; and whether Q and
/// K rows are stored permuted (llama.cpp's `llama` architecture).
fn llama_config(meta: &Meta, header: &Header, bytes: &[u8]) -> Result<(LlamaConfig, bool)> {
    let path = meta.path;
    let arch_name = meta
        .opt_str("general.architecture")?
        .ok_or_else(|| meta.bad("general.architecture is missing".into()))?;
    // llama.cpp's converter permutes Q/K rows for the architectures whose rotary embedding is
    // the interleaved (GPT-J) kind: llama, and mistral which it writes as llama. qwen2 and
    // qwen3 use the NeoX (rotate-half) layout, the same as Hugging Face: no permutation.
    let (arch, permute_qk) = match arch_name {
        "llama" => (Arch::Llama, true),
        "qwen2" => (Arch::Qwen2, false),
        "qwen3" => (Arch::Qwen3, false),
        other => {
            return Err(Error::UnsupportedArchitecture {
                path: path.to_path_buf(),
                found: other.to_string(),
                supported: SUPPORTED_ARCHS,
            })
        }
    };
    let key = |k: &str| format!("{arch_name}.{k}");
    let tensor = |name: &str| header.tensors.iter().find(|t| t.name == name);

    let hidden_size = meta.usize(&key("embedding_length"))?;
    let num_layers = meta.usize(&key("block_count"))?;
    let intermediate_size = meta.usize(&key("feed_forward_length"))?;
    let num_heads = meta.usize(&key("attention.head_count"))?;
    let num_kv_heads = meta
        .opt_usize(&key("attention.head_count_kv"))?
        .unwrap_or(num_heads);
    let max_position_embeddings = meta.usize(&key("context_length"))?;
    let rms_norm_eps = meta
        .opt_f64(&key("attention.layer_norm_rms_epsilon"))?
        .ok_or_else(|| {
            meta.bad(format!(
                "{} is missing",
                key("attention.layer_norm_rms_epsilon")
            ))
        })?;
    let rope_theta = meta.opt_f64(&key("rope.freq_base"))?.unwrap_or(10000.0);

    for (k, v) in [
        ("embedding_length", hidden_size),
        ("block_count", num_layers),
        ("feed_forward_length", intermediate_size),
        ("context_length", max_position_embeddings),
    ] {
        if v == 0 {
            return Err(meta.bad(format!("{} is 0; expected a positive size", key(k))));
        }
    }
    for (k, v) in [
        ("attention.layer_norm_rms_epsilon", rms_norm_eps),
        ("rope.freq_base", rope_theta),
    ] {
        if !(v.is_finite() && v > 0.0) {
            return Err(meta.bad(format!("{} is {v}; expected a positive number", key(k))));
        }
    }
    // Every block has at least 9 tensors; a larger count would only make the model describe
    // tensors that cannot be there (and allocate for them).
    if num_layers > header.tensors.len() / 9 {
        return Err(meta.bad(format!(
            "{} is {num_layers} but the file has only {} tensors (each block has at least 9)",
            key("block_count"),
            header.tensors.len()
        )));
    }
    // Shapes the metadata implies for the embedding, checked here so that the message can
    // name the metadata; every other tensor is checked in `plan_tensors`.
    let embd = tensor("token_embd.weight").ok_or_else(|| Error::MissingTensor {
        path: path.to_path_buf(),
        tensor: "token_embd.weight".into(),
    })?;
    if embd.dims.len() != 2 || embd.dims[0] != hidden_size {
        return Err(Error::checkpoint(
            path,
            format!(
                "GGUF metadata contradicts the tensors: {} is {hidden_size} but token_embd.weight has shape {:?}, expected [vocab, {hidden_size}]",
                key("embedding_length"),
                embd.shape()
            ),
        ));
    }
    let vocab_size = embd.dims[1];
    if vocab_size == 0 {
        return Err(Error::checkpoint(
            path,
            "GGUF: token_embd.weight has 0 rows",
        ));
    }
    if let Some(n) = meta.opt_usize(&key("vocab_size"))? {
        if n != vocab_size {
            return Err(Error::checkpoint(
                path,
                format!(
                    "GGUF metadata contradicts the tensors: {} is {n} but token_embd.weight has {vocab_size} rows",
                    key("vocab_size")
                ),
            ));
        }
    }

    if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
        return Err(meta.bad(format!(
            "{} ({num_heads}) must be a positive multiple of {} ({num_kv_heads})",
            key("attention.head_count"),
            key("attention.head_count_kv")
        )));
    }
    let head_dim = match meta.opt_usize(&key("attention.key_length"))? {
        Some(d) => d,
        None if hidden_size % num_heads == 0 => hidden_size / num_heads,
        None => {
            return Err(meta.bad(format!(
                "{} ({hidden_size}) is not divisible by {} ({num_heads}) and {} is not given",
                key("embedding_length"),
                key("attention.head_count"),
                key("attention.key_length")
            )))
        }
    };
    // No tensor dimension can exceed twice the file size (the densest type stores 32
    // elements in 18 bytes), so larger head sizes contradict the file.
    let limit = bytes.len().saturating_mul(2);
    for (what, n) in [
        (
            "query width (heads × head dimension)",
            num_heads.checked_mul(head_dim),
        ),
        ("feed-forward width", Some(intermediate_size)),
    ] {
        if n.is_none_or(|n| n > limit) {
            return Err(meta.bad(format!(
                "the {what} implied by the metadata is larger than anything a {}-byte file can hold",
                bytes.len()
            )));
        }
    }
    if head_dim == 0 || head_dim % 2 != 0 {
        return Err(meta.bad(format!(
            "head dimension {head_dim} must be positive and even for rotary embeddings"
        )));
    }
    if let Some(v) = meta.opt_usize(&key("attention.value_length"))? {
        if v != head_dim {
            return Err(meta.bad(format!(
                "{} ({v}) differs from the key length ({head_dim}); ferry needs them equal",
                key("attention.value_length")
            )));
        }
    }
    if let Some(d) = meta.opt_usize(&key("rope.dimension_count"))? {
        if d != head_dim {
            return Err(meta.bad(format!(
                "{} is {d} but the head dimension is {head_dim}; partial rotary embeddings are not supported",
                key("rope.dimension_count")
            )));
        }
    }
    if let Some(kind) = meta.opt_str(&key("rope.scaling.type"))? {
        let factor = meta.opt_f64(&key("rope.scaling.factor"))?.unwrap_or(1.0);
        if kind != "none" && !(kind == "linear" && factor == 1.0) {
            return Err(meta.bad(format!(
                "{} is {kind:?} (factor {factor}); ferry supports none, or llama3 scaling given as rope_freqs.weight",
                key("rope.scaling.type")
            )));
        }
    }

    let has = |suffix: &str| tensor(&format!("blk.0.{suffix}")).is_some();
    let rope_scaling = match tensor("rope_freqs.weight") {
        Some(t) if arch == Arch::Llama => {
            llama3_scaling_from_factors(meta, t, bytes, rope_theta, head_dim)?
        }
        _ => None,
    };
    let config = LlamaConfig {
        arch,
        hidden_size,
        intermediate_size,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        vocab_size,
        rms_norm_eps,
        rope_theta,
        rope_scaling,
        max_position_embeddings,
        tie_word_embeddings: tensor("output.weight").is_none(),
        qkv_bias: arch == Arch::Qwen2 || has("attn_q.bias"),
        o_bias: has("attn_output.bias"),
        qk_norm: arch == Arch::Qwen3,
        // llama.cpp does not record mistral's sliding window for the llama architecture.
        sliding_window: None,
    };
    Ok((config, permute_qk))
}

/// llama.cpp writes Llama 3's rope scaling as `rope_freqs.weight`: one divisor per rotary
/// frequency (1 for high frequencies, `factor` for low ones, a smooth ramp between).
/// Recover the parameters from the ramp; `original_max_position_embeddings` only scales
/// all of them together, so it is taken from the metadata or set to Llama 3's 8192.
fn llama3_scaling_from_factors(
    meta: &Meta,
    t: &TensorInfo,
    bytes: &[u8],
    rope_theta: f64,
    head_dim: usize,
) -> Result<Option<Llama3RopeScaling>> {
    let bad = |message: String| {
        Error::checkpoint(meta.path, format!("GGUF: rope_freqs.weight: {message}"))
    };
    let n = head_dim / 2;
    if t.dims != [n] {
        return Err(bad(format!(
            "shape {:?}, expected [{n}] (half the head dimension)",
            t.shape()
        )));
    }
    let mut f = vec![0f32; n];
    super::quant::dequantize(t.ty, &bytes[t.start..t.start + t.len], &mut f);
    if f.iter().all(|&x| (x - 1.0).abs() < 1e-6) {
        return Ok(None);
    }
    if f.iter().any(|&x| !(x.is_finite() && x >= 1.0 - 1e-6)) {
        return Err(bad(format!(
            "factors {f:?} are not all ≥ 1, as llama3 rope scaling writes them"
        )));
    }
    let factor = f.iter().copied().fold(1f32, f32::max) as f64;
    let old = meta
        .opt_usize("llama.rope.scaling.original_context_length")?
        .unwrap_or(8192) as f64;
    // 1 / wavelength of each frequency, as transformers computes the frequencies.
    let x: Vec<f64> = (0..n)
        .map(|i| {
            let inv = (1.0 / rope_theta.powf((2 * i) as f64 / head_dim as f64)) as f32 as f64;
            inv / (2.0 * std::f64::consts::PI)
        })
        .collect();
    let ramp: Vec<usize> = (0..n)
        .filter(|&i| f[i] as f64 > 1.0 + 1e-6 && (f[i] as f64) < factor * (1.0 - 1e-6))
        .collect();
    let (low_freq_factor, high_freq_factor) = match ramp.as_slice() {
        // No frequency on the ramp: put its ends in the gap between the last unscaled and the
        // first fully scaled frequency (x decreases with i).
        [] => {
            let last_one = (0..n).rev().find(|&i| (f[i] - 1.0).abs() < 1e-6);
            let first_full = (0..n).find(|&i| f[i] as f64 >= factor * (1.0 - 1e-6));
            match (last_one, first_full) {
                (Some(a), Some(b)) if a < b => {
                    let (hi, lo) = (x[a], x[b]);
                    (old * (lo + (hi - lo) / 3.0), old * (lo + 2.0 * (hi - lo) / 3.0))
                }
                _ => return Err(bad(format!("factors {f:?} do not follow llama3 rope scaling"))),
            }
        }
        [_] => {
            return Err(bad(format!(
                "factors {f:?}: only one frequency lies on the llama3 ramp, too few to recover its parameters"
            )))
        }
        [a, .., b] => {
            // On the ramp 1/f = (1 - s)/factor + s, with s = (old·x - low)/(high - low).
            let s = |i: usize| (1.0 / f[i] as f64 - 1.0 / factor) / (1.0 - 1.0 / factor);
            let slope = (s(*b) - s(*a)) / (x[*b] - x[*a]);
            let intercept = s(*a) - slope * x[*a];
            let low = -intercept * old / slope;
            (low, low + old / slope)
        }
    };
    let scaling = Llama3RopeScaling {
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max_position_embeddings: old as usize,
    };
    // Check the recovered parameters reproduce every factor.
    let probe = LlamaConfig {
        arch: Arch::Llama,
        hidden_size: head_dim,
        intermediate_size: 1,
        num_layers: 1,
        num_heads: 1,
        num_kv_heads: 1,
        head_dim,
        vocab_size: 1,
        rms_norm_eps: 1e-5,
        rope_theta,
        rope_scaling: Some(scaling.clone()),
        max_position_embeddings: 1,
        tie_word_embeddings: true,
        qkv_bias: false,
        o_bias: false,
        qk_norm: false,
        sliding_window: None,
    };
    for (i, got) in probe.rope_inv_freq().into_iter().enumerate() {
        let want = x[i] * 2.0 * std::f64::consts::PI / f[i] as f64;
        let rel = ((got as f64 - want) / want).abs();
        if rel.is_nan() || rel > 1e-4 {
            return Err(bad(format!(
                "factors {f:?} do not follow llama3 rope scaling (frequency {i}: recovered {got}, file implies {want})"
            )));
        }
    }
    Ok(Some(scaling))
}

/// One tensor to produce: where its data is, its HF name and shape, and how to reorder it.
struct Planned<'a> {
    info: &'a TensorInfo,
    hf_name: String,
    /// Undo llama.cpp's rotary permutation over heads of this many rows (Q: heads, K: kv heads).
    unpermute_heads: Option<usize>,
}

/// The Hugging Face name of a GGUF tensor, or None if ferry does not know it.
fn hf_name(name: &str, num_layers: usize) -> Option<String> {
    let top = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(n) = top {
        return Some(n.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    if layer.is_empty()
        || !layer.bytes().all(|b| b.is_ascii_digit())
        || (layer.len() > 1 && layer.starts_with('0'))
    {
        return None;
    }
    let layer: usize = layer.parse().ok()?;
    if layer >= num_layers {
        return None;
    }
    let (module, kind) = rest.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// Map every tensor to its HF name and check it against what the model needs: nothing
/// missing, nothing unknown or unused, every shape as the metadata implies.
fn plan_tensors<'a>(
    path: &Path,
    header: &'a Header,
    config: &LlamaConfig,
    permute_qk: bool,
) -> Result<Vec<Planned<'a>>> {
    let bad = |message: String| Error::checkpoint(path, format!("GGUF: {message}"));
    let mut by_hf: HashMap<String, Planned> = HashMap::new();
    for info in &header.tensors {
        if info.name == "rope_freqs.weight" && config.arch == Arch::Llama {
            continue; // folded into config.rope_scaling
        }
        let hf = hf_name(&info.name, config.num_layers).ok_or_else(|| {
            bad(format!(
                "tensor {:?} is not part of a {} model with {} layers as ferry knows it",
                info.name,
                config.arch.name(),
                config.num_layers
            ))
        })?;
        let unpermute_heads = match info.name.rsplit('.').nth(1) {
            Some("attn_q") if permute_qk => Some(config.num_heads),
            Some("attn_k") if permute_qk => Some(config.num_kv_heads),
            _ => None,
        };
        by_hf.insert(
            hf.clone(),
            Planned {
                info,
                hf_name: hf,
                unpermute_heads,
            },
        );
    }

    let model = Llama::new(config.clone());
    let summary = format!(
        "hidden {}, ffn {}, heads {}/{} kv, head_dim {}, vocab {}",
        config.hidden_size,
        config.intermediate_size,
        config.num_heads,
        config.num_kv_heads,
        config.head_dim,
        config.vocab_size
    );
    let mut plan = Vec::with_capacity(by_hf.len());
    let mut needed = std::collections::HashSet::new();
    for spec in model.groups().iter().flat_map(|g| &g.tensors) {
        if !needed.insert(spec.name.clone()) {
            continue; // tied embedding listed twice
        }
        let p = by_hf
            .remove(&spec.name)
            .ok_or_else(|| Error::MissingTensor {
                path: path.to_path_buf(),
                tensor: format!(
                    "{} (GGUF name of {})",
                    gguf_name_hint(&spec.name),
                    spec.name
                ),
            })?;
        if p.info.shape() != spec.shape {
            return Err(bad(format!(
                "metadata contradicts the tensors: {} ({}) has shape {:?}, but the metadata ({summary}) implies {:?}",
                p.info.name,
                spec.name,
                p.info.shape(),
                spec.shape
            )));
        }
        plan.push(p);
    }
    if let Some(extra) = by_hf.values().next() {
        return Err(bad(format!(
            "tensor {:?} ({}) is not used by a {} model with this metadata; refusing to ignore it",
            extra.info.name,
            extra.hf_name,
            config.arch.name()
        )));
    }
    Ok(plan)
}

/// The GGUF name for an HF name (for messages about missing tensors).
fn gguf_name_hint(hf: &str) -> String {
    let pairs = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
        ("model.layers.", "blk."),
        (".input_layernorm", ".attn_norm"),
        (".self_attn.q_proj", ".attn_q"),
        (".self_attn.k_proj", ".attn_k"),
        (".self_attn.v_proj", ".attn_v"),
        (".self_attn.o_proj", ".attn_output"),
        (".self_attn.q_norm", ".attn_q_norm"),
        (".self_attn.k_norm", ".attn_k_norm"),
        (".post_attention_layernorm", ".ffn_norm"),
        (".mlp.gate_proj", ".ffn_gate"),
        (".mlp.up_proj", ".ffn_up"),
        (".mlp.down_proj", ".ffn_down"),
    ];
    pairs
        .iter()
        .fold(hf.to_string(), |s, (from, to)| s.replace(from, to))
}

/// Row `r` of a Hugging Face Q/K weight comes from this row of llama.cpp's permuted one.
/// Per head of `head_dim` rows, HF keeps the two rotary halves apart (rows `i·half + j`,
/// i ∈ {0, 1}); llama.cpp interleaves them (rows `2j + i`).
fn permuted_source(r: usize, head_dim: usize) -> usize {
    let half = head_dim / 2;
    let (head, within) = (r / head_dim, r % head_dim);
    let (i, j) = (within / half, within % half);
    head * head_dim + 2 * j + i
}

/// Dequantize every planned tensor into one owned buffer of `target` dtype.
fn dequantize_all(
    path: &Path,
    bytes: &[u8],
    plan: &[Planned],
    target: DType,
) -> BTreeMap<String, HostTensor> {
    // Output layout: each tensor 64-byte aligned.
    let mut offsets = Vec::with_capacity(plan.len());
    let mut total = 0usize;
    for p in plan {
        total = total.next_multiple_of(64);
        offsets.push(total);
        total += p.info.numel() * target.size();
    }
    let mut storage = Storage::owned(total);
    let out = storage.bytes_mut().expect("owned storage is writable");

    let progress = (total > PROGRESS_BYTES && std::io::stderr().is_terminal()).then(|| {
        crate::progress::bytes_bar(
            total,
            format!(
                "dequantizing {} to {target}",
                path.file_name().unwrap_or_default().to_string_lossy()
            ),
        )
    });

    // Split the output into disjoint pieces, one per task of whole rows.
    struct Task<'p, 'o> {
        planned: &'p Planned<'p>,
        first_row: usize,
        out: &'o mut [u8],
    }
    let mut tasks = Vec::new();
    let mut rest = out;
    let mut at = 0;
    for (p, &offset) in plan.iter().zip(&offsets) {
        let len = p.info.numel() * target.size();
        let (_, r) = std::mem::take(&mut rest).split_at_mut(offset - at);
        let (mine, r) = r.split_at_mut(len);
        rest = r;
        at = offset + len;
        if len == 0 {
            continue;
        }
        let row_len = p.info.row_len();
        let rows_per_task = (TASK_ELEMENTS / row_len).max(1);
        for (k, chunk) in mine
            .chunks_mut(rows_per_task * row_len * target.size())
            .enumerate()
        {
            tasks.push(Task {
                planned: p,
                first_row: k * rows_per_task,
                out: chunk,
            });
        }
    }

    tasks.into_par_iter().for_each(|task| {
        let info = task.planned.info;
        let row_len = info.row_len();
        let row_bytes = row_len / info.ty.block_size() * info.ty.type_size();
        let data = &bytes[info.start..info.start + info.len];
        let mut row = vec![0f32; row_len];
        let mut reordered = Vec::new();
        let out_row_bytes = row_len * target.size();
        for (k, out) in task.out.chunks_exact_mut(out_row_bytes).enumerate() {
            let r = task.first_row + k;
            // A 2-D Q/K weight is permuted by rows; a 1-D bias by elements.
            let src = match task.planned.unpermute_heads {
                Some(heads) if info.dims.len() == 2 => permuted_source(r, info.dims[1] / heads),
                _ => r,
            };
            super::quant::dequantize(
                info.ty,
                &data[src * row_bytes..(src + 1) * row_bytes],
                &mut row,
            );
            let values = match task.planned.unpermute_heads {
                Some(heads) if info.dims.len() == 1 => {
                    let head_dim = row_len / heads;
                    reordered.clear();
                    reordered.extend((0..row_len).map(|e| row[permuted_source(e, head_dim)]));
                    &reordered
                }
                _ => &row,
            };
            write_as(target, values, out);
        }
        if let Some(bar) = &progress {
            bar.inc(task.out.len() as u64);
        }
    });
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }

    let storage = Arc::new(storage);
    plan.iter()
        .zip(offsets)
        .map(|(p, offset)| {
            let t = HostTensor::new(
                p.hf_name.clone(),
                target,
                p.info.shape(),
                storage.clone(),
                offset,
                p.info.numel() * target.size(),
            );
            (p.hf_name.clone(), t)
        })
        .collect()
}

/// Store f32 `values` as little-endian `target` elements (bf16/f16 rounded to nearest even).
fn write_as(target: DType, values: &[f32], out: &mut [u8]) {
    match target {
        DType::F32 => {
            for (o, v) in out.chunks_exact_mut(4).zip(values) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        DType::BF16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(values) {
                o.copy_from_slice(&bf16::from_f32(*v).to_le_bytes());
            }
        }
        DType::F16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(values) {
                o.copy_from_slice(&f16::from_f32(*v).to_le_bytes());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Tokenizer and generation defaults
// ---------------------------------------------------------------------------------------

fn tokenizer_and_generation(
    meta: &Meta,
    vocab_size: usize,
) -> Result<(TokenizerSource, GenerationDefaults)> {
    let strings = |key: &str| meta.opt_array(key, "strings", |v| v.as_str().map(str::to_string));
    let tokens = strings("tokenizer.ggml.tokens")?.unwrap_or_default();
    let scores = meta
        .opt_array("tokenizer.ggml.scores", "float32 scores", |v| {
            v.as_f64().map(|x| x as f32)
        })?
        .unwrap_or_default();
    let token_types = meta
        .opt_array("tokenizer.ggml.token_type", "int32 token types", |v| {
            v.as_i64().and_then(|x| i32::try_from(x).ok())
        })?
        .unwrap_or_default();
    let merges = strings("tokenizer.ggml.merges")?.unwrap_or_default();
    let model = meta.opt_str("tokenizer.ggml.model")?.map(str::to_string);

    if !tokens.is_empty() && tokens.len() != vocab_size {
        return Err(meta.bad(format!(
            "tokenizer.ggml.tokens has {} entries but token_embd.weight has {vocab_size} rows",
            tokens.len()
        )));
    }
    for (key, n) in [
        ("tokenizer.ggml.scores", scores.len()),
        ("tokenizer.ggml.token_type", token_types.len()),
    ] {
        if n != 0 && n != tokens.len() {
            return Err(meta.bad(format!(
                "{key} has {n} entries but tokenizer.ggml.tokens has {}",
                tokens.len()
            )));
        }
    }

    // llama.cpp's defaults for SentencePiece vocabularies when the ids are not given.
    let spm = model.as_deref() == Some("llama");
    let id = |key: &str, spm_default: u32| -> Result<Option<u32>> {
        let id = meta.opt_u32(key)?.or(spm.then_some(spm_default));
        match id {
            Some(i) if !tokens.is_empty() && i as usize >= tokens.len() => Err(meta.bad(format!(
                "{key} is {i}, outside the vocabulary of {} tokens",
                tokens.len()
            ))),
            _ => Ok(id),
        }
    };
    let bos_id = id("tokenizer.ggml.bos_token_id", 1)?;
    let eos_id = id("tokenizer.ggml.eos_token_id", 2)?;
    let unknown_id = id("tokenizer.ggml.unknown_token_id", 0)?;
    let padding_id = meta.opt_u32("tokenizer.ggml.padding_token_id")?;
    let eot_id = meta.opt_u32("tokenizer.ggml.eot_token_id")?;
    let eom_id = meta.opt_u32("tokenizer.ggml.eom_token_id")?;
    let add_bos = meta
        .opt_bool("tokenizer.ggml.add_bos_token")?
        .unwrap_or(spm);
    let add_eos = meta
        .opt_bool("tokenizer.ggml.add_eos_token")?
        .unwrap_or(false);

    let token = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize).cloned());
    let mut eos_token_ids = Vec::new();
    // eot (end of turn) and eom (end of message, Llama 3.1 tool calls) end generation too,
    // as they do in the models' generation_config.json.
    for id in [eos_id, eot_id, eom_id].into_iter().flatten() {
        if !eos_token_ids.contains(&id) {
            eos_token_ids.push(id);
        }
    }
    let generation = GenerationDefaults {
        bos_token: token(bos_id),
        eos_token: token(eos_id),
        eos_token_ids,
        chat_template: meta.opt_str("tokenizer.chat_template")?.map(str::to_string),
        add_bos_token: add_bos,
        bos_token_id: bos_id,
    };

    let tokenizer = match model {
        None => TokenizerSource::Missing,
        Some(model) => TokenizerSource::Gguf(Box::new(GgufTokenizerSpec {
            model,
            pre: meta.opt_str("tokenizer.ggml.pre")?.map(str::to_string),
            tokens,
            scores,
            token_types,
            merges,
            bos_id,
            eos_id,
            unknown_id,
            padding_id,
            add_bos,
            add_eos,
        })),
    };
    Ok((tokenizer, generation))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(heads, 2, half, ...).swapaxes(1, 2): GGUF row h·d + 2j + i
        // holds HF row h·d + i·half + j.
        let (heads, head_dim) = (3, 8);
        let half = head_dim / 2;
        let mut gguf_of_hf = vec![0; heads * head_dim];
        for h in 0..heads {
            for i in 0..2 {
                for j in 0..half {
                    gguf_of_hf[h * head_dim + i * half + j] = h * head_dim + 2 * j + i;
                }
            }
        }
        for (r, &g) in gguf_of_hf.iter().enumerate() {
            assert_eq!(permuted_source(r, head_dim), g);
        }
    }

    #[test]
    fn names_map_to_hugging_face() {
        assert_eq!(
            hf_name("blk.11.attn_q.bias", 12).as_deref(),
            Some("model.layers.11.self_attn.q_proj.bias")
        );
        assert_eq!(
            hf_name("blk.0.ffn_norm.weight", 1).as_deref(),
            Some("model.layers.0.post_attention_layernorm.weight")
        );
        assert_eq!(hf_name("blk.12.attn_q.weight", 12), None);
        assert_eq!(hf_name("blk.01.attn_q.weight", 12), None);
        assert_eq!(hf_name("blk.0.attn_qkv.weight", 12), None);
        assert_eq!(
            gguf_name_hint("model.layers.3.mlp.down_proj.weight"),
            "blk.3.ffn_down.weight"
        );
    }

    #[test]
    fn header_of_a_few_bytes_is_an_error() {
        for n in 0..24 {
            let mut b = b"GGUF\x03\0\0\0".to_vec();
            b.resize(n, 0);
            assert!(parse_header(&b).is_err(), "{n} bytes");
        }
    }
}
