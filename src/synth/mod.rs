//! Synthetic checkpoints: random weights with the shapes and config of real models, for
//! benchmarks and tests without downloads. Written to disk as a Hugging Face directory
//! ([`write_checkpoint`], `ferry synth`) or built straight into host memory
//! ([`synthetic_checkpoint`], for models larger than the disk); image pipelines as diffusers
//! directories ([`write_pipeline`], `ferry synth --preset z-image-turbo`,
//! `qwen-image-pipeline` or `flux.1-dev-pipeline`), a diffusion transformer alone ([`write_dit`], `ferry synth --preset
//! qwen-image`); a language model
//! also as one quantized GGUF file ([`write_gguf`], `ferry synth --gguf Q4_K_M`).
//!
//! Weights are deterministic for a seed and scaled like a trained model's: linear weights,
//! biases and embeddings ~ N(0, 0.02²), norm weights ~ N(1, 0.02²), so activations stay finite
//! through every block in bf16. The same seed gives the same bytes on disk and in memory.

mod component;
mod diffusers;
mod dit;
mod flux;
mod gguf;
mod presets;
mod qwen_image;
mod random;
mod shards;
mod tokenizer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use indicatif::ProgressBar;
use serde_json::{json, Value};

pub use component::random_component;
pub use diffusers::{
    check_destination, write_pipeline, DitShape, PipelineComponent, PipelineModels, PipelinePreset,
    VaeShape, ZImageModels, DIFFUSERS_VERSION,
};
pub use dit::{write_dit, DitPreset};
pub use flux::FluxModels;
pub use gguf::{use_more_bits, write_gguf, GgufFileType, GgufOptions, GgufReport};
pub use presets::Preset;
pub use qwen_image::{qwen_vae_tensors, QwenImageModels};

use crate::checkpoint::{
    DType, Format, GenerationDefaults, HostTensor, Storage, Stored, TokenizerSource,
};
use crate::error::{Error, Result};
use crate::model::Arch;
use crate::model::Checkpoint;
use shards::{write_json, write_sharded, Spec, Tables};
use tokenizer::tokenizer_json;

/// What `ferry synth --preset` names: a language model, or an image pipeline of several
/// models.
#[derive(Clone, Debug, PartialEq)]
pub enum SynthPreset {
    Llm(Preset),
    /// Boxed: a pipeline holds three models' shapes.
    Pipeline(Box<PipelinePreset>),
    /// A diffusion transformer alone (for DiT benchmarks).
    Dit(DitPreset),
}

impl SynthPreset {
    /// The preset called `name`, or an error listing both kinds.
    pub fn by_name(name: &str) -> Result<SynthPreset> {
        if let Some(p) = PipelinePreset::by_name(name) {
            return Ok(SynthPreset::Pipeline(Box::new(p)));
        }
        if let Some(p) = DitPreset::by_name(name) {
            return Ok(SynthPreset::Dit(p));
        }
        Preset::by_name(name).map(SynthPreset::Llm).map_err(|_| Error::Flag {
            flag: "--preset",
            message: format!(
                "unknown preset {name:?}; expected one of {} (language models), {} (image pipelines) or {} (diffusion transformers alone)",
                Preset::names(),
                PipelinePreset::names(),
                DitPreset::names()
            ),
        })
    }
}

/// How `write_checkpoint` and `write_pipeline` write.
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

fn specs(preset: &Preset) -> Vec<Spec> {
    preset
        .tensors()
        .into_iter()
        .map(|(name, shape)| Spec::new(name, shape))
        .collect()
}

fn check_dtype(dtype: DType) -> Result<()> {
    match dtype {
        DType::BF16 | DType::F32 => Ok(()),
        DType::F16 | DType::Ggml(_) => Err(Error::Flag {
            flag: "--dtype",
            message: "synthetic checkpoints are bf16 or f32".into(),
        }),
    }
}

fn check_options(opts: &WriteOptions) -> Result<()> {
    check_dtype(opts.dtype)?;
    if opts.shard_bytes == 0 {
        return Err(Error::Flag {
            flag: "--shard-size",
            message: "expected a positive size".into(),
        });
    }
    Ok(())
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
    check_options(opts)?;
    let start = Instant::now();
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let specs = specs(preset);
    let total: usize = specs.iter().map(|s| s.numel() * opts.dtype.size()).sum();
    let bar = match opts.progress {
        true => crate::progress::bytes_bar(total, format!("synth {}", preset.name)),
        false => ProgressBar::hidden(),
    };
    let shards = write_sharded(out, "model", &specs, opts, &bar)?;
    bar.finish_and_clear();
    write_json(&out.join("config.json"), &config_json(preset, opts.dtype))?;
    write_json(
        &out.join("generation_config.json"),
        &generation_json(preset),
    )?;
    let (tokenizer, tokenizer_config) = tokenizer_json(preset);
    write_json(&out.join("tokenizer.json"), &tokenizer)?;
    write_json(&out.join("tokenizer_config.json"), &tokenizer_config)?;

    Ok(WriteReport {
        shards,
        bytes: total,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// generation_config.json: the special token ids.
fn generation_json(preset: &Preset) -> Value {
    let mut generation = json!({"eos_token_id": preset.eos_token_id});
    if let Some(bos) = preset.bos_token_id {
        generation["bos_token_id"] = json!(bos);
    }
    generation
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
            files: Vec::new(),
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
