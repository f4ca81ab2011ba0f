//! A synthetic language model as one GGUF file (`ferry synth --gguf TYPE`): the weights
//! [`write_checkpoint`](super::write_checkpoint) writes for the preset and seed, each tensor
//! quantized to the type llama.cpp's `llama-quantize` would give it, under llama.cpp's tensor
//! names and metadata keys (those `model::llama::gguf` reads), with the synthetic tokenizer in
//! `tokenizer.ggml.*` form. For the `llama` architecture the Q/K rows are permuted as
//! llama.cpp's converter permutes them, so that a reader gets Hugging Face order back.
//!
//! Written streaming: the values of a batch of row ranges are generated and quantized on the
//! rayon pool while a writer thread writes the previous batch; nothing holds the model.

use std::collections::BTreeMap;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::ProgressBar;
use rayon::prelude::*;

use super::shards::{Spec, Tables};
use super::tokenizer::{placeholder, vocabulary};
use super::Preset;
use crate::checkpoint::gguf::{
    permuted_row, quantize_into, GgmlType, GgufWriter, TensorDesc, Value,
};
use crate::checkpoint::DType;
use crate::error::{Error, Result};
use crate::model::llama::gguf::gguf_name;
use crate::model::Arch;

/// What `--gguf` names: a file type, as llama.cpp names its quantization presets.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgufFileType {
    /// Every matrix Q4_K, except the output head and the V and down projections of some
    /// layers, Q6_K (llama.cpp's Q4_K_M).
    Q4_K_M,
    Q8_0,
    Q4_0,
    F16,
    BF16,
}

impl GgufFileType {
    /// The names `parse` accepts, for messages.
    pub const ACCEPTED: &'static str = "Q4_K_M, Q8_0, Q4_0, F16, BF16";

    /// Parse `--gguf`, in any case.
    pub fn parse(s: &str) -> Result<GgufFileType> {
        Ok(match s.to_ascii_uppercase().as_str() {
            "Q4_K_M" => GgufFileType::Q4_K_M,
            "Q8_0" => GgufFileType::Q8_0,
            "Q4_0" => GgufFileType::Q4_0,
            "F16" => GgufFileType::F16,
            "BF16" => GgufFileType::BF16,
            _ => {
                return Err(Error::Flag {
                    flag: "--gguf",
                    message: format!(
                        "unknown GGUF type {s:?}; expected one of {}",
                        GgufFileType::ACCEPTED
                    ),
                })
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            GgufFileType::Q4_K_M => "Q4_K_M",
            GgufFileType::Q8_0 => "Q8_0",
            GgufFileType::Q4_0 => "Q4_0",
            GgufFileType::F16 => "F16",
            GgufFileType::BF16 => "BF16",
        }
    }

    /// llama.cpp's `llama_ftype`, written as `general.file_type`.
    fn ftype(self) -> u32 {
        match self {
            GgufFileType::F16 => 1,
            GgufFileType::Q4_0 => 2,
            GgufFileType::Q8_0 => 7,
            GgufFileType::Q4_K_M => 15,
            GgufFileType::BF16 => 32,
        }
    }

    /// The type of tensor `name` (its GGUF name) of `shape` in a model of `layers` blocks,
    /// as llama.cpp's `llama_tensor_get_type` chooses it: 1-D tensors (norms, biases) stay
    /// f32; for Q4_K_M the output head (the embedding when it is tied) and, in the layers
    /// where [`use_more_bits`] holds, the V and down projections get Q6_K. A row the chosen
    /// type's blocks do not divide falls back to Q8_0, or f16 when 32 does not divide it either.
    pub fn tensor_type(self, name: &str, shape: &[usize], layers: usize, tied: bool) -> GgmlType {
        if shape.len() < 2 {
            return GgmlType::F32;
        }
        let layer = name
            .strip_prefix("blk.")
            .and_then(|rest| rest.split_once('.'))
            .and_then(|(i, rest)| Some((i.parse::<usize>().ok()?, rest)));
        let ty = match self {
            GgufFileType::Q4_K_M => {
                let head = name == "output.weight" || (tied && name == "token_embd.weight");
                let more_bits = matches!(layer, Some((i, "attn_v.weight" | "ffn_down.weight"))
                    if use_more_bits(i, layers));
                match head || more_bits {
                    true => GgmlType::Q6_K,
                    false => GgmlType::Q4_K,
                }
            }
            GgufFileType::Q8_0 => GgmlType::Q8_0,
            GgufFileType::Q4_0 => GgmlType::Q4_0,
            GgufFileType::F16 => GgmlType::F16,
            GgufFileType::BF16 => GgmlType::BF16,
        };
        let row = shape[shape.len() - 1];
        match row % ty.block_size() {
            0 => ty,
            _ if row % GgmlType::Q8_0.block_size() == 0 => GgmlType::Q8_0,
            _ => GgmlType::F16,
        }
    }
}

/// llama.cpp's `use_more_bits(i_layer, n_layers)`: the first and last eighth of the layers
/// and every third one between get more bits in the K-quant mixes.
pub fn use_more_bits(i: usize, n: usize) -> bool {
    // The last test runs only when i ≥ n/8: no underflow.
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// How [`write_gguf`] writes.
#[derive(Clone, Debug)]
pub struct GgufOptions {
    pub seed: u64,
    pub file_type: GgufFileType,
    /// Draw a progress bar on stderr (when it is a terminal).
    pub progress: bool,
}

/// What [`write_gguf`] wrote.
#[derive(Clone, Debug)]
pub struct GgufReport {
    pub path: PathBuf,
    /// Size of the file (bytes).
    pub file_bytes: usize,
    /// Weights written (rope frequency factors not counted).
    pub parameters: usize,
    /// Number of tensors of each ggml type.
    pub types: BTreeMap<&'static str, usize>,
    pub seconds: f64,
}

/// One tensor of the file: where its values come from and how they are stored.
struct Planned {
    desc: TensorDesc,
    source: Source,
}

enum Source {
    /// The synthetic weight of this spec (Hugging Face name), its rows (elements, for a 1-D
    /// tensor) permuted per head of this many when `Some`.
    Weight { spec: Spec, permute: Option<usize> },
    /// Values given (rope frequency factors).
    Values(Vec<f32>),
}

/// Elements generated and quantized per parallel task.
const TASK_ELEMENTS: usize = 1 << 20;
/// Tasks per batch handed to the writer thread (≤ 32 M elements: ≤ 64 MiB written).
const BATCH_TASKS: usize = 32;

/// Write `preset` with the random weights of `opts.seed` into the GGUF file `path`
/// (created, or truncated).
pub fn write_gguf(preset: &Preset, path: &Path, opts: &GgufOptions) -> Result<GgufReport> {
    let start = Instant::now();
    let c = &preset.config;
    let flag = |message: String| Error::Flag {
        flag: "--gguf",
        message,
    };
    // llama.cpp writes Mistral as the llama architecture, which records no sliding window.
    let arch = match c.arch {
        Arch::Llama | Arch::Mistral => "llama",
        Arch::Qwen2 => "qwen2",
        Arch::Qwen3 => "qwen3",
    };
    if c.sliding_window.is_some() {
        return Err(flag(format!(
            "{} has a sliding window, which GGUF's {arch} architecture does not record",
            preset.name
        )));
    }
    if c.rope_scaling.is_some() && arch != "llama" {
        return Err(flag(format!(
            "{} has llama3 rope scaling, which a GGUF file records only for the llama architecture (not {arch})",
            preset.name
        )));
    }
    let metadata = metadata(preset, arch, opts)?;
    let plan = plan(preset, arch == "llama", opts.file_type);

    let mut types: BTreeMap<&'static str, usize> = BTreeMap::new();
    for p in &plan {
        *types.entry(p.desc.ty.name()).or_default() += 1;
    }
    let descs: Vec<TensorDesc> = plan.iter().map(|p| p.desc.clone()).collect();
    let data_bytes = GgufWriter::<std::fs::File>::data_bytes(&descs);
    let file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let out = BufWriter::with_capacity(8 << 20, file);
    let mut writer = GgufWriter::new(out, &metadata, descs).map_err(|e| Error::io(path, e))?;

    let bar = match opts.progress {
        true => crate::progress::bytes_bar(
            data_bytes,
            format!("synth {} {}", preset.name, opts.file_type.name()),
        ),
        false => ProgressBar::hidden(),
    };
    let tasks = tasks(&plan);
    let tables = Tables::new();
    std::thread::scope(|scope| -> Result<()> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Vec<u8>>>(1);
        let bar = &bar;
        let write = scope.spawn(move || -> std::io::Result<()> {
            for batch in rx {
                for piece in batch {
                    writer.write(&piece)?;
                    bar.inc(piece.len() as u64);
                }
            }
            writer.finish().map(drop)
        });
        for batch in tasks.chunks(BATCH_TASKS) {
            let pieces: Vec<Vec<u8>> = batch
                .par_iter()
                .map(|t| t.run(&plan[t.tensor], &tables, opts.seed))
                .collect();
            // A closed channel means the writer failed; its error is reported below.
            if tx.send(pieces).is_err() {
                break;
            }
        }
        drop(tx);
        write
            .join()
            .expect("the writer thread does not panic")
            .map_err(|e| Error::io(path, e))
    })?;
    bar.finish_and_clear();

    let file_bytes = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len() as usize;
    Ok(GgufReport {
        path: path.to_path_buf(),
        file_bytes,
        parameters: preset.parameters(),
        types,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// The tensors in file order: llama.cpp's names, the types `file_type` gives them, the
/// rope frequency factors first when the model has llama3 scaling.
fn plan(preset: &Preset, permute_qk: bool, file_type: GgufFileType) -> Vec<Planned> {
    let c = &preset.config;
    let mut plan = Vec::new();
    if c.rope_scaling.is_some() {
        plan.push(Planned {
            desc: TensorDesc {
                name: "rope_freqs.weight".into(),
                shape: vec![c.head_dim / 2],
                ty: GgmlType::F32,
            },
            source: Source::Values(rope_factors(preset)),
        });
    }
    let tensors = preset.tensors();
    let tied = !tensors.iter().any(|(name, _)| name == "lm_head.weight");
    for (hf, shape) in tensors {
        let name = gguf_name(&hf);
        let ty = file_type.tensor_type(&name, &shape, c.num_layers, tied);
        let permute = match hf.rsplit('.').nth(1) {
            Some("q_proj") if permute_qk => Some(c.num_heads),
            Some("k_proj") if permute_qk => Some(c.num_kv_heads),
            _ => None,
        };
        plan.push(Planned {
            desc: TensorDesc {
                name,
                shape: shape.clone(),
                ty,
            },
            source: Source::Weight {
                spec: Spec::new(hf, shape),
                permute,
            },
        });
    }
    plan
}

/// llama.cpp's `rope_freqs.weight` for llama3 scaling: per rotary frequency, the divisor
/// that scaling applies to it (1 for high frequencies, `factor` for low ones).
fn rope_factors(preset: &Preset) -> Vec<f32> {
    let scaled = preset.config.rope_inv_freq();
    let mut plain = preset.config.clone();
    plain.rope_scaling = None;
    plain
        .rope_inv_freq()
        .iter()
        .zip(&scaled)
        .map(|(f, s)| f / s)
        .collect()
}

/// A range of rows of one tensor, generated, permuted and quantized as one piece of data.
struct Task {
    tensor: usize,
    /// Rows (GGUF order) `first_row..end_row`; a 1-D tensor is one row.
    first_row: usize,
    end_row: usize,
}

fn tasks(plan: &[Planned]) -> Vec<Task> {
    let mut tasks = Vec::new();
    for (k, p) in plan.iter().enumerate() {
        let shape = &p.desc.shape;
        let (rows, row_len) = match shape.len() {
            1 => (1, shape[0]),
            _ => (shape[0], shape[1..].iter().product()),
        };
        if rows * row_len == 0 {
            continue;
        }
        // Whole heads (a permutation stays inside one), and a multiple of 4 elements (where
        // the random values of a range may start).
        let group = match &p.source {
            Source::Weight {
                permute: Some(heads),
                ..
            } if shape.len() == 2 => 4 * (rows / heads),
            _ => 4,
        };
        let per_task = (TASK_ELEMENTS / row_len).max(1).next_multiple_of(group);
        for first_row in (0..rows).step_by(per_task) {
            tasks.push(Task {
                tensor: k,
                first_row,
                end_row: (first_row + per_task).min(rows),
            });
        }
    }
    tasks
}

impl Task {
    /// This range's data as the file stores it.
    fn run(&self, p: &Planned, tables: &Tables, seed: u64) -> Vec<u8> {
        let shape = &p.desc.shape;
        let row_len: usize = match shape.len() {
            1 => shape[0],
            _ => shape[1..].iter().product(),
        };
        let rows = self.end_row - self.first_row;
        let mut values = vec![0f32; rows * row_len];
        match &p.source {
            Source::Values(v) => values.copy_from_slice(v),
            Source::Weight { spec, permute } => {
                let first = self.first_row * row_len;
                tables.fill(
                    spec,
                    seed,
                    DType::F32,
                    first,
                    bytemuck::cast_slice_mut(&mut values),
                );
                if let Some(heads) = permute {
                    // Row g of the file holds row `permuted_row(g)` of the Hugging Face
                    // weight; a 1-D bias is permuted by elements the same way.
                    let (unit, head_dim, first) = match shape.len() {
                        1 => (1, row_len / heads, 0),
                        _ => (row_len, shape[0] / heads, self.first_row),
                    };
                    let hf = values.clone();
                    for (k, out) in values.chunks_exact_mut(unit).enumerate() {
                        let src = permuted_row(first + k, head_dim) - first;
                        out.copy_from_slice(&hf[src * unit..(src + 1) * unit]);
                    }
                }
            }
        }
        let ty = p.desc.ty;
        let mut out = vec![0u8; values.len() / ty.block_size() * ty.type_size()];
        quantize_into(ty, &values, &mut out);
        out
    }
}

/// The metadata llama.cpp writes for this model and `model::llama::gguf` reads back.
fn metadata(preset: &Preset, arch: &str, opts: &GgufOptions) -> Result<Vec<(String, Value)>> {
    let c = &preset.config;
    let u32_of = |n: usize| Value::U32(u32::try_from(n).expect("model sizes fit a u32"));
    let mut m: Vec<(String, Value)> = Vec::new();
    let mut put = |key: &str, v: Value| m.push((key.to_string(), v));
    put("general.architecture", Value::String(arch.into()));
    put(
        "general.name",
        Value::String(format!("ferry synthetic {}", preset.name)),
    );
    put("general.file_type", Value::U32(opts.file_type.ftype()));
    put("general.quantization_version", Value::U32(2));
    put("ferry.synthetic.preset", Value::String(preset.name.into()));
    put("ferry.synthetic.seed", Value::U64(opts.seed));
    let key = |k: &str| format!("{arch}.{k}");
    put(&key("vocab_size"), u32_of(c.vocab_size));
    put(&key("context_length"), u32_of(c.max_position_embeddings));
    put(&key("embedding_length"), u32_of(c.hidden_size));
    put(&key("block_count"), u32_of(c.num_layers));
    put(&key("feed_forward_length"), u32_of(c.intermediate_size));
    put(&key("attention.head_count"), u32_of(c.num_heads));
    put(&key("attention.head_count_kv"), u32_of(c.num_kv_heads));
    put(&key("attention.key_length"), u32_of(c.head_dim));
    put(&key("attention.value_length"), u32_of(c.head_dim));
    put(&key("rope.dimension_count"), u32_of(c.head_dim));
    // f32, as llama.cpp writes (and its loader requires) them.
    put(
        &key("attention.layer_norm_rms_epsilon"),
        Value::F32(c.rms_norm_eps as f32),
    );
    put(&key("rope.freq_base"), Value::F32(c.rope_theta as f32));
    if let Some(s) = &c.rope_scaling {
        put(
            &key("rope.scaling.original_context_length"),
            u32_of(s.original_max_position_embeddings),
        );
    }
    for (k, v) in tokenizer_metadata(preset)? {
        put(&k, v);
    }
    Ok(m)
}

/// The synthetic byte-level tokenizer as llama.cpp's "gpt2" vocabulary. A "gpt2" vocabulary
/// must list merges (llama.cpp and ferry refuse one without), and the synthetic tokenizer has
/// none; so the last placeholder token is respelled as the two before it joined, and that one
/// merge is listed. It can never apply (a placeholder is only made by merges), so the file
/// encodes and decodes as tokenizer.json does, except for that one respelled token.
fn tokenizer_metadata(preset: &Preset) -> Result<Vec<(String, Value)>> {
    const NORMAL: i32 = 1;
    const CONTROL: i32 = 3;
    let vocab = vocabulary(preset);
    let mut tokens = vocab.tokens;
    let placeholders: Vec<usize> = (0..tokens.len())
        .filter(|&id| tokens[id] == placeholder(id))
        .collect();
    let [.., a, b, joined] = placeholders[..] else {
        return Err(Error::Flag {
            flag: "--gguf",
            message: format!(
                "{}: a vocabulary of {} tokens is too small for a GGUF tokenizer (ferry's needs 3 beyond the 256 bytes and the specials)",
                preset.name,
                tokens.len()
            ),
        });
    };
    tokens[joined] = format!("{}{}", tokens[a], tokens[b]);
    let merge = format!("{} {}", tokens[a], tokens[b]);
    let mut types = vec![NORMAL; tokens.len()];
    for &(id, _) in &vocab.specials {
        if let Some(t) = types.get_mut(id as usize) {
            *t = CONTROL;
        }
    }
    let strings = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
    let mut m = vec![
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("gpt2".into()),
        ),
        // GPT-2's split regex, as the ByteLevel pre-tokenizer of tokenizer.json.
        (
            "tokenizer.ggml.pre".to_string(),
            Value::String("default".into()),
        ),
        ("tokenizer.ggml.tokens".to_string(), strings(tokens)),
        (
            "tokenizer.ggml.token_type".to_string(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.merges".to_string(), strings(vec![merge])),
    ];
    if let Some(bos) = preset.bos_token_id {
        m.push(("tokenizer.ggml.bos_token_id".to_string(), Value::U32(bos)));
    }
    m.push((
        "tokenizer.ggml.eos_token_id".to_string(),
        Value::U32(preset.eos_token_id),
    ));
    m.push((
        "tokenizer.ggml.add_bos_token".to_string(),
        Value::Bool(false),
    ));
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_cpp_gives_more_bits_to_these_layers() {
        // Qwen2.5-7B's 28 layers: 0..3, 25..28 and every third from 3 + 2.
        let more: Vec<usize> = (0..28).filter(|&i| use_more_bits(i, 28)).collect();
        assert_eq!(more, [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 24, 25, 26, 27]);
        let ty =
            |name: &str, shape: &[usize]| GgufFileType::Q4_K_M.tensor_type(name, shape, 28, false);
        assert_eq!(ty("blk.5.attn_v.weight", &[512, 3584]), GgmlType::Q6_K);
        assert_eq!(ty("blk.6.attn_v.weight", &[512, 3584]), GgmlType::Q4_K);
        assert_eq!(ty("blk.8.ffn_down.weight", &[3584, 18944]), GgmlType::Q6_K);
        assert_eq!(ty("blk.8.ffn_up.weight", &[18944, 3584]), GgmlType::Q4_K);
        assert_eq!(ty("output.weight", &[152064, 3584]), GgmlType::Q6_K);
        assert_eq!(ty("token_embd.weight", &[152064, 3584]), GgmlType::Q4_K);
        assert_eq!(ty("blk.0.attn_norm.weight", &[3584]), GgmlType::F32);
        assert_eq!(
            ty("blk.0.attn_q.weight", &[64, 64]),
            GgmlType::Q8_0,
            "rows of 64"
        );
        assert_eq!(
            ty("blk.0.attn_q.weight", &[64, 48]),
            GgmlType::F16,
            "rows of 48"
        );
        let tied = GgufFileType::Q4_K_M.tensor_type("token_embd.weight", &[512, 256], 2, true);
        assert_eq!(tied, GgmlType::Q6_K, "a tied embedding is the head");
        assert_eq!(
            GgufFileType::Q4_0.tensor_type("blk.0.attn_q.weight", &[64, 64], 2, false),
            GgmlType::Q4_0
        );
        assert!(GgufFileType::parse("q4_k_m").is_ok());
        let e = GgufFileType::parse("Q3_K").unwrap_err().to_string();
        assert!(e.contains("--gguf") && e.contains("Q4_K_M, Q8_0"), "{e}");
    }
}
