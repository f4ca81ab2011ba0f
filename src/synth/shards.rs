//! Random tensors written as sharded safetensors: `STEM-0000K-of-0000N.safetensors` files of
//! at most a given size, and `STEM.safetensors.index.json` naming each tensor's file, as
//! transformers (`model`) and diffusers (`diffusion_pytorch_model`) save them.

use std::io::Write;
use std::path::{Path, PathBuf};

use indicatif::ProgressBar;
use serde_json::{json, Value};

use super::random::{is_norm_scale, tensor_key, Table};
use super::WriteOptions;
use crate::checkpoint::DType;
use crate::error::{Error, Result};

/// One tensor to synthesize: name, shape, and the distribution of its values.
pub(super) struct Spec {
    pub name: String,
    pub shape: Vec<usize>,
    dist: Dist,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dist {
    /// N(0, 0.02²): linear and conv weights, biases, embeddings, learned tokens.
    Small,
    /// N(1, 0.02²): the scales of RMSNorm and GroupNorm.
    NearOne,
}

impl Spec {
    /// Norm scales ([`is_norm_scale`]) near one, every other tensor centred on 0.
    pub fn new(name: String, shape: Vec<usize>) -> Spec {
        let dist = match is_norm_scale(&name, &shape) {
            true => Dist::NearOne,
            false => Dist::Small,
        };
        Spec { name, shape, dist }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The value tables, built once per call.
pub(super) struct Tables {
    small: Table,
    near_one: Table,
}

impl Tables {
    pub fn new() -> Tables {
        Tables {
            small: Table::normal(0.0, 0.02),
            near_one: Table::normal(1.0, 0.02),
        }
    }

    /// Fill `out`, the bytes of elements `first..` of `spec` in `dtype`.
    pub fn fill(&self, spec: &Spec, seed: u64, dtype: DType, first: usize, out: &mut [u8]) {
        let table = match spec.dist {
            Dist::Small => &self.small,
            Dist::NearOne => &self.near_one,
        };
        table.fill(dtype, tensor_key(seed, &spec.name), first, out);
    }
}

/// Write `specs` into `dir` as `STEM-0000K-of-0000N.safetensors` shards of at most
/// `opts.shard_bytes` each (a tensor larger than that gets a shard of its own), in the
/// order given, and `STEM.safetensors.index.json`. Returns the shard paths.
pub(super) fn write_sharded(
    dir: &Path,
    stem: &str,
    specs: &[Spec],
    opts: &WriteOptions,
    bar: &ProgressBar,
) -> Result<Vec<PathBuf>> {
    let esize = opts.dtype.size();
    // A new shard whenever the next tensor would overflow this one.
    let mut shards: Vec<Vec<&Spec>> = vec![Vec::new()];
    let mut in_shard = 0usize;
    for s in specs {
        let bytes = s.numel() * esize;
        let last = shards.last_mut().expect("one shard");
        if !last.is_empty() && in_shard + bytes > opts.shard_bytes {
            shards.push(vec![s]);
            in_shard = bytes;
        } else {
            last.push(s);
            in_shard += bytes;
        }
    }
    let total: usize = specs.iter().map(|s| s.numel() * esize).sum();

    let tables = Tables::new();
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut paths = Vec::new();
    for (k, shard) in shards.iter().enumerate() {
        let file_name = format!("{stem}-{:05}-of-{n:05}.safetensors", k + 1);
        let path = dir.join(&file_name);
        write_shard(&path, shard, &tables, opts, bar)?;
        for s in shard {
            weight_map.insert(s.name.clone(), Value::String(file_name.clone()));
        }
        paths.push(path);
    }
    let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    write_json(&dir.join(format!("{stem}.safetensors.index.json")), &index)?;
    Ok(paths)
}

/// Write one safetensors file: header, then each tensor's data generated in pieces on the
/// rayon pool while a writer thread writes the previous piece.
fn write_shard(
    path: &Path,
    specs: &[&Spec],
    tables: &Tables,
    opts: &WriteOptions,
    bar: &ProgressBar,
) -> Result<()> {
    // Bytes generated and written at a time.
    const PIECE: usize = 32 << 20;
    let esize = opts.dtype.size();
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for s in specs {
        let len = s.numel() * esize;
        let dtype = if opts.dtype == DType::BF16 {
            "BF16"
        } else {
            "F32"
        };
        header.insert(
            s.name.clone(),
            json!({"dtype": dtype, "shape": s.shape, "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut header = serde_json::to_vec(&header).expect("a JSON map serializes");
    // Pad so the data starts 8-byte aligned.
    while (8 + header.len()) % 8 != 0 {
        header.push(b' ');
    }

    let mut file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    file.write_all(&(header.len() as u64).to_le_bytes())
        .and_then(|()| file.write_all(&header))
        .map_err(|e| Error::io(path, e))?;

    std::thread::scope(|scope| {
        use std::sync::mpsc::{channel, sync_channel};
        let (full_tx, full_rx) = sync_channel::<(Vec<u64>, usize)>(1);
        let (empty_tx, empty_rx) = channel::<Vec<u64>>();
        for _ in 0..3 {
            empty_tx
                .send(vec![0u64; PIECE / 8])
                .expect("receiver alive");
        }
        let writer = scope.spawn(move || -> std::io::Result<()> {
            for (buf, len) in full_rx {
                file.write_all(&bytemuck::cast_slice(&buf)[..len])?;
                bar.inc(len as u64);
                // The generator may have stopped; then nobody needs the buffer back.
                let _ = empty_tx.send(buf);
            }
            file.flush()
        });
        'gen: for s in specs {
            let numel = s.numel();
            let per_piece = PIECE / esize;
            let mut first = 0;
            while first < numel {
                let count = per_piece.min(numel - first);
                // A closed channel means the writer failed; its error is reported below.
                let Ok(mut buf) = empty_rx.recv() else {
                    break 'gen;
                };
                let bytes = &mut bytemuck::cast_slice_mut(&mut buf)[..count * esize];
                tables.fill(s, opts.seed, opts.dtype, first, bytes);
                if full_tx.send((buf, count * esize)).is_err() {
                    break 'gen;
                }
                first += count;
            }
        }
        drop(full_tx);
        writer
            .join()
            .expect("the writer thread does not panic")
            .map_err(|e| Error::io(path, e))
    })
}

/// Write `value` as pretty JSON with a final newline.
pub(super) fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("JSON serializes");
    std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))
}
