//! The GGUF header: magic, version, metadata key/values and tensor infos, every length and
//! offset checked against the file's size before it is used.

use std::collections::{BTreeMap, HashMap};

pub use crate::checkpoint::quant::{GgmlType, SUPPORTED_TYPES};

pub(super) const MAGIC: &[u8; 4] = b"GGUF";
/// Data section alignment when `general.alignment` is absent (bytes).
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most 4 dimensions.
const MAX_DIMS: u32 = 4;
/// Arrays of arrays deeper than this are refused (keeps the parser's recursion bounded).
const MAX_NESTING: usize = 8;

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
    pub fn row_len(&self) -> usize {
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
