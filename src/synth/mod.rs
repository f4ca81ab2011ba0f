//! Synthetic checkpoints: random weights with the shapes and config of real models, for
//! benchmarks and tests without downloads. Written to disk as a Hugging Face directory
//! ([`write_checkpoint`], `ferry synth`) or built straight into host memory
//! ([`synthetic_checkpoint`], for models larger than the disk).
//!
//! Weights are deterministic for a seed and scaled like a trained model's: linear weights,
//! biases and embeddings ~ N(0, 0.02²), norm weights ~ N(1, 0.02²), so activations stay finite
//! through every block in bf16. The same seed gives the same bytes on disk and in memory.

mod presets;
mod random;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use indicatif::ProgressBar;
use serde_json::{json, Value};

pub use presets::Preset;

use crate::checkpoint::{
    Checkpoint, DType, Format, GenerationDefaults, HostTensor, Storage, Stored, TokenizerSource,
};
use crate::error::{Error, Result};
use crate::model::Arch;
use random::{tensor_key, Table};

/// How `write_checkpoint` writes.
#[derive(Clone, Debug)]
pub struct WriteOptions {
    pub seed: u64,
    /// bf16 or f32.
    pub dtype: DType,
    /// Most bytes of tensor data per safetensors shard.
    pub shard_bytes: usize,
    /// Draw a progress bar on stderr (when it is a terminal).
    pub progress: bool,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            seed: 0,
            dtype: DType::BF16,
            shard_bytes: 4 << 30,
            progress: false,
        }
    }
}

/// What `write_checkpoint` wrote.
#[derive(Clone, Debug)]
pub struct WriteReport {
    pub shards: Vec<PathBuf>,
    /// Tensor data bytes.
    pub bytes: usize,
    pub seconds: f64,
}

/// One tensor to synthesize: name, shape, and the distribution of its values.
struct Spec {
    name: String,
    shape: Vec<usize>,
    dist: Dist,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dist {
    /// N(0, 0.02²): linear weights, biases, embeddings.
    Small,
    /// N(1, 0.02²): RMSNorm weights.
    NearOne,
}

impl Spec {
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

fn specs(preset: &Preset) -> Vec<Spec> {
    preset
        .tensors()
        .into_iter()
        .map(|(name, shape)| {
            let dist = if name.ends_with("norm.weight") {
                Dist::NearOne
            } else {
                Dist::Small
            };
            Spec { name, shape, dist }
        })
        .collect()
}

/// The value tables, built once per call.
struct Tables {
    small: Table,
    near_one: Table,
}

impl Tables {
    fn new() -> Tables {
        Tables {
            small: Table::normal(0.0, 0.02),
            near_one: Table::normal(1.0, 0.02),
        }
    }

    fn fill(&self, spec: &Spec, seed: u64, dtype: DType, first: usize, out: &mut [u8]) {
        let table = match spec.dist {
            Dist::Small => &self.small,
            Dist::NearOne => &self.near_one,
        };
        table.fill(dtype, tensor_key(seed, &spec.name), first, out);
    }
}

fn check_dtype(dtype: DType) -> Result<()> {
    match dtype {
        DType::BF16 | DType::F32 => Ok(()),
        DType::F16 => Err(Error::Flag {
            flag: "--dtype",
            message: "synthetic checkpoints are bf16 or f32".into(),
        }),
    }
}

/// Parse `--dtype`: `bf16` or `f32`.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "bf16" => Ok(DType::BF16),
        "f32" => Ok(DType::F32),
        other => Err(Error::Flag {
            flag: "--dtype",
            message: format!("unknown dtype {other:?}; expected bf16 or f32"),
        }),
    }
}

/// Parse `--arch`: a Llama-family model_type.
pub fn parse_arch(s: &str) -> Result<Arch> {
    Arch::from_model_type(s).ok_or_else(|| Error::Flag {
        flag: "--arch",
        message: format!(
            "unknown architecture {s:?}; expected one of {}",
            Arch::SUPPORTED
        ),
    })
}

/// Write `preset` with random weights into the directory `out` (created if missing) as a
/// Hugging Face checkpoint: `model-0000K-of-0000N.safetensors` shards with
/// `model.safetensors.index.json`, config.json, generation_config.json, and a byte-level
/// tokenizer (tokenizer.json, tokenizer_config.json) whose vocabulary has one token per id.
pub fn write_checkpoint(preset: &Preset, out: &Path, opts: &WriteOptions) -> Result<WriteReport> {
    check_dtype(opts.dtype)?;
    if opts.shard_bytes == 0 {
        return Err(Error::Flag {
            flag: "--shard-size",
            message: "expected a positive size".into(),
        });
    }
    let start = Instant::now();
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let specs = specs(preset);
    let esize = opts.dtype.size();

    // Tensors in pass order, a new shard whenever the next tensor would overflow this one.
    let mut shards: Vec<Vec<&Spec>> = vec![Vec::new()];
    let mut in_shard = 0usize;
    for s in &specs {
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

    let bar = if opts.progress {
        let bar = crate::progress::bytes_bar(total, format!("synth {}", preset.name));
        bar
    } else {
        ProgressBar::hidden()
    };

    let tables = Tables::new();
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut paths = Vec::new();
    for (k, shard) in shards.iter().enumerate() {
        let file_name = format!("model-{:05}-of-{n:05}.safetensors", k + 1);
        let path = out.join(&file_name);
        write_shard(&path, shard, &tables, opts, &bar)?;
        for s in shard {
            weight_map.insert(s.name.clone(), Value::String(file_name.clone()));
        }
        paths.push(path);
    }
    bar.finish_and_clear();

    let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    write_json(&out.join("model.safetensors.index.json"), &index)?;
    write_json(&out.join("config.json"), &config_json(preset, opts.dtype))?;
    let mut generation = json!({"eos_token_id": preset.eos_token_id});
    if let Some(bos) = preset.bos_token_id {
        generation["bos_token_id"] = json!(bos);
    }
    write_json(&out.join("generation_config.json"), &generation)?;
    let (tokenizer, tokenizer_config) = tokenizer_json(preset);
    write_json(&out.join("tokenizer.json"), &tokenizer)?;
    write_json(&out.join("tokenizer_config.json"), &tokenizer_config)?;

    Ok(WriteReport {
        shards: paths,
        bytes: total,
        seconds: start.elapsed().as_secs_f64(),
    })
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

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("JSON serializes");
    std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))
}

/// config.json as transformers writes it for this architecture.
fn config_json(preset: &Preset, dtype: DType) -> Value {
    let c = &preset.config;
    let class = match c.arch {
        Arch::Llama => "LlamaForCausalLM",
        Arch::Mistral => "MistralForCausalLM",
        Arch::Qwen2 => "Qwen2ForCausalLM",
        Arch::Qwen3 => "Qwen3ForCausalLM",
    };
    let rope_scaling = match &c.rope_scaling {
        None => Value::Null,
        Some(s) => json!({
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        }),
    };
    let mut v = json!({
        "architectures": [class],
        "model_type": c.arch.name(),
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings,
        "hidden_act": "silu",
        "mlp_bias": false,
        "initializer_range": 0.02,
        "eos_token_id": preset.eos_token_id,
        "torch_dtype": if dtype == DType::BF16 { "bfloat16" } else { "float32" },
        "ferry_synthetic": {"preset": preset.name},
    });
    if let Some(bos) = preset.bos_token_id {
        v["bos_token_id"] = json!(bos);
    }
    match c.arch {
        // qwen2 always has q/k/v biases and never an o bias.
        Arch::Qwen2 => {
            v["use_sliding_window"] = json!(false);
        }
        Arch::Mistral => {
            v["sliding_window"] = json!(c.sliding_window);
        }
        // attention_bias puts biases on q, k, v and o together.
        Arch::Llama | Arch::Qwen3 => {
            v["attention_bias"] = json!(c.qkv_bias && c.o_bias);
        }
    }
    v
}

/// The byte-level unicode alphabet of GPT-2 style tokenizers: byte → the char that stands for
/// it in vocabularies.
fn byte_char(b: u8) -> char {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(b) {
        return b as char;
    }
    let rank = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + rank).expect("a valid char")
}

/// A byte-level BPE tokenizer with one token per id of the model's vocabulary: the special
/// tokens at the preset's bos/eos ids, the 256 bytes at the lowest free ids, and placeholder
/// tokens `<|synth_ID|>` for the rest (they decode to that text; no merges, so encoding makes
/// one token per byte). Returns (tokenizer.json, tokenizer_config.json).
fn tokenizer_json(preset: &Preset) -> (Value, Value) {
    let vocab_size = preset.config.vocab_size;
    let mut specials: Vec<(u32, &str)> = Vec::new();
    match preset.bos_token_id {
        Some(bos) if bos == preset.eos_token_id => specials.push((bos, "<|endoftext|>")),
        Some(bos) => {
            specials.push((bos, "<|begin_of_text|>"));
            specials.push((preset.eos_token_id, "<|end_of_text|>"));
        }
        None => specials.push((preset.eos_token_id, "<|endoftext|>")),
    }
    let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
    for &(id, text) in &specials {
        if let Some(t) = tokens.get_mut(id as usize) {
            *t = Some(text.to_string());
        }
    }
    let mut free = (0..vocab_size).filter(|&i| tokens[i].is_none());
    let byte_ids: Vec<usize> = (0..=255u8).map_while(|_| free.next()).collect();
    for (b, &id) in byte_ids.iter().enumerate() {
        tokens[id] = Some(byte_char(b as u8).to_string());
    }
    let vocab: serde_json::Map<String, Value> = tokens
        .into_iter()
        .enumerate()
        .map(|(id, t)| (t.unwrap_or_else(|| format!("<|synth_{id}|>")), json!(id)))
        .collect();
    let added: Vec<Value> = specials
        .iter()
        .filter(|(id, _)| (*id as usize) < vocab_size)
        .map(|(id, text)| {
            json!({"id": id, "content": text, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false,
                            "trim_offsets": true, "use_regex": true});
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": null,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": [],
        },
    });
    let name = |id: Option<u32>| {
        id.and_then(|id| specials.iter().find(|s| s.0 == id))
            .map(|s| json!(s.1))
            .unwrap_or(Value::Null)
    };
    let tokenizer_config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name(preset.bos_token_id),
        "eos_token": name(Some(preset.eos_token_id)),
        "add_bos_token": false,
        "clean_up_tokenization_spaces": false,
        "model_max_length": preset.config.max_position_embeddings,
    });
    (tokenizer, tokenizer_config)
}

/// The same weights `write_checkpoint` writes for `seed` and `dtype`, built in host memory
/// (one owned buffer; no files). The checkpoint has no tokenizer: feed it token ids.
pub fn synthetic_checkpoint(preset: &Preset, seed: u64, dtype: DType) -> Result<Checkpoint> {
    check_dtype(dtype)?;
    let specs = specs(preset);
    let specs_len = specs.len();
    let esize = dtype.size();
    let total: usize = specs.iter().map(|s| s.numel() * esize).sum();
    let mut storage = Storage::owned(total);
    let tables = Tables::new();
    {
        let bytes = storage.bytes_mut().expect("an owned buffer");
        let mut offset = 0;
        for s in &specs {
            let len = s.numel() * esize;
            tables.fill(s, seed, dtype, 0, &mut bytes[offset..offset + len]);
            offset += len;
        }
    }
    let storage = Arc::new(storage);
    let mut tensors = BTreeMap::new();
    let mut offset = 0;
    for s in specs {
        let len = s.numel() * esize;
        let t = HostTensor::new(s.name.clone(), dtype, s.shape, storage.clone(), offset, len);
        tensors.insert(s.name, t);
        offset += len;
    }
    Ok(Checkpoint {
        path: PathBuf::from(format!("synthetic:{}", preset.name)),
        format: Format::Safetensors,
        config: preset.config.clone(),
        tensors,
        tokenizer: TokenizerSource::Missing,
        generation: GenerationDefaults {
            eos_token_ids: vec![preset.eos_token_id],
            bos_token_id: preset.bos_token_id,
            ..GenerationDefaults::default()
        },
        stored: Stored {
            file_bytes: 0,
            dtypes: [(dtype.name().to_uppercase(), specs_len)].into(),
        },
    })
}

/// `n` token ids below `vocab`, the same for the same seed: synthetic prompts for benchmarks
/// and GPU checks (a 64-bit LCG, high bits).
pub fn random_token_ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) % vocab as u64) as u32
        })
        .collect()
}
