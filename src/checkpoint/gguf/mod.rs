//! GGUF files (llama.cpp's format), versions 2 and 3, little-endian, read without knowing
//! any model: the header ([`header`]), typed metadata access ([`Meta`]), dequantization of
//! chosen tensors under chosen names ([`dequantize_all`]), and the tokenizer the metadata
//! describes ([`tokenizer`]). What a model's metadata means and what its tensors are called
//! is the model's: `model::llama::gguf` turns a Llama-family file into a checkpoint.
//!
//! Layout: magic `GGUF`, version u32, tensor count u64, metadata count u64; metadata
//! key/value pairs (key: u64 length + UTF-8; value: u32 type + payload, arrays nest); tensor
//! infos (name, u32 dims count, u64 dims innermost first, u32 ggml type, u64 offset into the
//! data section); padding to `general.alignment` (default 32); the data section.

mod header;
pub mod tokenizer;
pub mod writer;

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read};
use std::path::Path;
use std::sync::Arc;

use half::{bf16, f16};
use rayon::prelude::*;

pub use super::quant::{dequantize, quantize, quantize_into, GgmlType, SUPPORTED_TYPES};
use super::{DType, HostTensor, Storage, Stored};
use crate::error::{Error, Result};
use header::MAGIC;
pub use header::{parse_header, Header, HeaderError, TensorInfo, Value};
pub use writer::{GgufWriter, TensorDesc};

/// Output bytes above which a progress bar is shown (when stderr is a terminal).
const PROGRESS_BYTES: usize = 256 << 20;
/// Elements dequantized per parallel task.
const TASK_ELEMENTS: usize = 1 << 18;

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

/// A small tensor's values as f32 (a vector of factors, say).
pub fn read_f32(t: &TensorInfo, bytes: &[u8]) -> Vec<f32> {
    let mut f = vec![0f32; t.numel()];
    super::quant::dequantize(t.ty, &bytes[t.start..t.start + t.len], &mut f);
    f
}

/// How the file stores the tensors that `plan` loads, and its size: for `ferry info`.
pub fn stored(file_bytes: usize, plan: &[Load]) -> Stored {
    let mut stored = Stored {
        file_bytes,
        ..Stored::default()
    };
    for p in plan {
        *stored
            .dtypes
            .entry(p.info.ty.name().to_string())
            .or_default() += 1;
    }
    stored
}

/// Typed access to metadata, with errors that name the key.
pub struct Meta<'a> {
    pub path: &'a Path,
    pub map: &'a BTreeMap<String, Value>,
}

impl Meta<'_> {
    pub fn bad(&self, message: String) -> Error {
        Error::checkpoint(self.path, format!("GGUF metadata: {message}"))
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key)
    }

    pub fn require(&self, key: &str) -> Result<&Value> {
        self.get(key)
            .ok_or_else(|| self.bad(format!("{key} is missing")))
    }

    pub fn usize_value(&self, key: &str, v: &Value) -> Result<usize> {
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

    pub fn usize(&self, key: &str) -> Result<usize> {
        self.usize_value(key, self.require(key)?)
    }

    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        self.get(key).map(|v| self.usize_value(key, v)).transpose()
    }

    pub fn opt_u32(&self, key: &str) -> Result<Option<u32>> {
        self.opt_usize(key)?
            .map(|n| {
                u32::try_from(n)
                    .map_err(|_| self.bad(format!("{key} is {n}, too large for a token id")))
            })
            .transpose()
    }

    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
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

    pub fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        self.get(key)
            .map(|v| {
                v.as_str().ok_or_else(|| {
                    self.bad(format!("{key} is a {}, expected a string", v.type_name()))
                })
            })
            .transpose()
    }

    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.bad(format!("{key} is a {}, expected a bool", v.type_name()))),
        }
    }

    /// An array whose every element `f` accepts.
    pub fn opt_array<T>(
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

/// One tensor to produce from the file: where its data is, the name it goes under, and
/// how to reorder its rows.
pub struct Load<'a> {
    pub info: &'a TensorInfo,
    pub name: String,
    /// Undo llama.cpp's rotary permutation over heads of this many rows (Q: heads, K: kv
    /// heads).
    pub unpermute_heads: Option<usize>,
}

/// Row `r` of a Hugging Face Q/K weight comes from this row of llama.cpp's permuted one.
/// Per head of `head_dim` rows, HF keeps the two rotary halves apart (rows `i·half + j`,
/// i ∈ {0, 1}); llama.cpp interleaves them (rows `2j + i`).
pub fn permuted_source(r: usize, head_dim: usize) -> usize {
    let half = head_dim / 2;
    let (head, within) = (r / head_dim, r % head_dim);
    let (i, j) = (within / half, within % half);
    head * head_dim + 2 * j + i
}

/// How a GGUF's tensors are held in host memory once opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Weights {
    /// Every tensor dequantized at load into owned memory of this dtype.
    Dequantized(DType),
    /// Quantized matrices kept as the file's blocks ([`DType::Ggml`]): views of the mapping,
    /// or, where Q/K rows must be put back in order, the same blocks with their rows
    /// reordered; the other tensors (norms, biases, float matrices) dequantized to bf16.
    Blocks,
}

/// The planned tensors as `weights` says, from `storage` (the mapped file).
pub fn load_all(
    path: &Path,
    storage: &Arc<Storage>,
    plan: &[Load],
    weights: Weights,
) -> Result<BTreeMap<String, HostTensor>> {
    let bytes = storage.bytes();
    let target = match weights {
        Weights::Dequantized(d) => return Ok(dequantize_all(path, bytes, plan, d)),
        Weights::Blocks => DType::BF16,
    };
    let kept = |p: &Load| p.info.ty.block_size() > 1 && p.info.dims.len() == 2;
    let (blocks, rest): (Vec<&Load>, Vec<&Load>) = plan.iter().partition(|p| kept(p));
    let rest: Vec<Load> = rest
        .into_iter()
        .map(|p| Load {
            info: p.info,
            name: p.name.clone(),
            unpermute_heads: p.unpermute_heads,
        })
        .collect();
    let mut out = dequantize_all(path, bytes, &rest, target);
    // Q/K rows put back in order go into one anonymous mapping: page-aligned memory of its
    // own, which the driver can page-lock without touching anyone else's pages.
    let permuted: Vec<&Load> = blocks
        .iter()
        .copied()
        .filter(|p| p.unpermute_heads.is_some())
        .collect();
    let total: usize = permuted.iter().map(|p| p.info.len).sum();
    let reordered = match total {
        0 => None,
        n => {
            let mut map = memmap2::MmapMut::map_anon(n).map_err(|e| Error::io(path, e))?;
            let mut rest: &mut [u8] = &mut map;
            let mut jobs = Vec::with_capacity(permuted.len());
            for p in &permuted {
                let (mine, r) = std::mem::take(&mut rest).split_at_mut(p.info.len);
                rest = r;
                jobs.push((*p, mine));
            }
            jobs.into_par_iter()
                .for_each(|(p, out)| unpermute_blocks(p, bytes, out));
            let map = map.make_read_only().map_err(|e| Error::io(path, e))?;
            Some(Arc::new(Storage::Mapped(map)))
        }
    };
    let mut at = 0;
    for p in &blocks {
        let (info, dtype) = (p.info, DType::Ggml(p.info.ty));
        let (storage, start) = match (&reordered, p.unpermute_heads) {
            (Some(r), Some(_)) => {
                at += info.len;
                (r.clone(), at - info.len)
            }
            _ => (storage.clone(), info.start),
        };
        let t = HostTensor::new(
            p.name.clone(),
            dtype,
            info.shape(),
            storage,
            start,
            info.len,
        );
        out.insert(p.name.clone(), t);
    }
    Ok(out)
}

/// A Q/K matrix's blocks into `out` with llama.cpp's rotary permutation of its rows undone.
fn unpermute_blocks(p: &Load, bytes: &[u8], out: &mut [u8]) {
    let info = p.info;
    let heads = p.unpermute_heads.expect("a permuted tensor");
    let rows = info.dims[1];
    let row_bytes = info.len / rows.max(1);
    let data = &bytes[info.start..info.start + info.len];
    for (r, row) in out.chunks_exact_mut(row_bytes).enumerate() {
        let src = permuted_source(r, rows / heads);
        row.copy_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
    }
}

/// The inverse of [`permuted_source`]: row `g` of llama.cpp's permuted Q/K weight holds this
/// row of the Hugging Face one (what a writer of the `llama` architecture stores there).
pub fn permuted_row(g: usize, head_dim: usize) -> usize {
    let half = head_dim / 2;
    let (head, within) = (g / head_dim, g % head_dim);
    let (j, i) = (within / 2, within % 2);
    head * head_dim + i * half + j
}

/// Dequantize every planned tensor into one owned buffer of `target` dtype.
pub fn dequantize_all(
    path: &Path,
    bytes: &[u8],
    plan: &[Load],
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
        planned: &'p Load<'p>,
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
                p.name.clone(),
                target,
                p.info.shape(),
                storage.clone(),
                offset,
                p.info.numel() * target.size(),
            );
            (p.name.clone(), t)
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
        DType::Ggml(t) => unreachable!("dequantizing to {t} blocks"),
    }
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
            assert_eq!(permuted_row(g, head_dim), r);
        }
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
