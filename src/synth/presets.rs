//! Model shapes worth benchmarking, copied from the real models' config.json files, plus
//! `tiny` for tests.

use crate::error::{Error, Result};
use crate::model::{Arch, Architecture, Llama, Llama3RopeScaling, LlamaConfig};

/// A named model shape: the config of a real model (or `tiny`), and its special token ids.
#[derive(Clone, Debug, PartialEq)]
pub struct Preset {
    pub name: &'static str,
    /// What it is shaped like, for `ferry synth --list`.
    pub about: &'static str,
    pub config: LlamaConfig,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: u32,
}

impl Preset {
    /// Every preset, smallest first.
    pub fn list() -> Vec<Preset> {
        vec![
            tiny(),
            qwen25(
                "qwen2.5-7b",
                "Qwen/Qwen2.5-7B",
                (3584, 18944, 28, 28, 4),
                1e-6,
            ),
            qwen25(
                "qwen2.5-14b",
                "Qwen/Qwen2.5-14B",
                (5120, 13824, 48, 40, 8),
                1e-5,
            ),
            qwen25(
                "qwen2.5-32b",
                "Qwen/Qwen2.5-32B",
                (5120, 27648, 64, 40, 8),
                1e-5,
            ),
            qwen3("qwen3-8b", "Qwen/Qwen3-8B", (4096, 12288, 36, 32, 8)),
            qwen3("qwen3-32b", "Qwen/Qwen3-32B", (5120, 25600, 64, 64, 8)),
            llama31(
                "llama-3.1-8b",
                "meta-llama/Llama-3.1-8B",
                (4096, 14336, 32, 32, 8),
            ),
            llama31(
                "llama-3.1-70b",
                "meta-llama/Llama-3.1-70B",
                (8192, 28672, 80, 64, 8),
            ),
            mistral7b(),
        ]
    }

    /// The names `by_name` accepts, comma-separated.
    pub fn names() -> String {
        Preset::list()
            .iter()
            .map(|p| p.name)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The preset called `name`, or an error listing the valid names.
    pub fn by_name(name: &str) -> Result<Preset> {
        Preset::list()
            .into_iter()
            .find(|p| p.name == name)
            .ok_or_else(|| Error::Flag {
                flag: "--preset",
                message: format!(
                    "unknown preset {name:?}; expected one of {}",
                    Preset::names()
                ),
            })
    }

    /// The same shape as another member of the Llama family: qwen2 gets q/k/v biases, qwen3
    /// q/k norms, mistral keeps a sliding window if the preset has one, llama none of these.
    /// ("Llama architecture shaped like Qwen2.5-7B" is `qwen2.5-7b` with `Arch::Llama`.)
    pub fn with_arch(mut self, arch: Arch) -> Preset {
        let c = &mut self.config;
        c.arch = arch;
        c.qkv_bias = arch == Arch::Qwen2;
        c.o_bias = false;
        c.qk_norm = arch == Arch::Qwen3;
        if arch != Arch::Mistral {
            c.sliding_window = None;
        }
        self
    }

    /// The same shape with `layers` decoder blocks.
    pub fn with_layers(mut self, layers: usize) -> Result<Preset> {
        // The largest real models have under 200 blocks; far more only makes a write that
        // never ends.
        const MAX_LAYERS: usize = 1024;
        if layers == 0 || layers > MAX_LAYERS {
            return Err(Error::Flag {
                flag: "--layers",
                message: format!("{layers} is not a layer count; expected 1 to {MAX_LAYERS}"),
            });
        }
        self.config.num_layers = layers;
        Ok(self)
    }

    /// Distinct tensors in checkpoint order (pass order; a tied head is not repeated), with
    /// their shapes.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let model = Llama::new(self.config.clone());
        let mut out: Vec<(String, Vec<usize>)> = Vec::new();
        for group in model.groups() {
            for t in &group.tensors {
                if !out.iter().any(|(name, _)| *name == t.name) {
                    out.push((t.name.clone(), t.shape.clone()));
                }
            }
        }
        out
    }

    /// Number of parameters.
    pub fn parameters(&self) -> usize {
        self.tensors()
            .iter()
            .map(|(_, shape)| shape.iter().product::<usize>())
            .sum()
    }
}

fn base(arch: Arch) -> LlamaConfig {
    LlamaConfig {
        arch,
        hidden_size: 0,
        intermediate_size: 0,
        num_layers: 0,
        num_heads: 0,
        num_kv_heads: 0,
        head_dim: 0,
        vocab_size: 0,
        rms_norm_eps: 1e-6,
        rope_theta: 1_000_000.0,
        rope_scaling: None,
        max_position_embeddings: 131072,
        tie_word_embeddings: false,
        qkv_bias: arch == Arch::Qwen2,
        o_bias: false,
        qk_norm: arch == Arch::Qwen3,
        sliding_window: None,
    }
}

/// (hidden, ffn, layers, heads, kv heads)
pub(super) type Shape = (usize, usize, usize, usize, usize);

fn shaped(mut c: LlamaConfig, (hidden, ffn, layers, heads, kv_heads): Shape) -> LlamaConfig {
    c.hidden_size = hidden;
    c.intermediate_size = ffn;
    c.num_layers = layers;
    c.num_heads = heads;
    c.num_kv_heads = kv_heads;
    c.head_dim = hidden / heads;
    c
}

/// Small enough for tests on the CPU: 2 blocks, hidden 64, vocab 512.
fn tiny() -> Preset {
    let mut c = shaped(base(Arch::Llama), (64, 128, 2, 4, 2));
    c.vocab_size = 512;
    c.max_position_embeddings = 256;
    c.rope_theta = 10000.0;
    Preset {
        name: "tiny",
        about: "2 llama blocks, hidden 64, vocab 512 (tests)",
        config: c,
        bos_token_id: None,
        eos_token_id: 256,
    }
}

/// A Qwen2.5 model (also the text model of Qwen-Image's Qwen2.5-VL text encoder): q/k/v
/// biases, Qwen's vocabulary and its `<|endoftext|>` id.
pub(super) fn qwen25(name: &'static str, about: &'static str, shape: Shape, eps: f64) -> Preset {
    let mut c = shaped(base(Arch::Qwen2), shape);
    c.vocab_size = 152064;
    c.rms_norm_eps = eps;
    Preset {
        name,
        about,
        config: c,
        bos_token_id: Some(151643),
        eos_token_id: 151643,
    }
}

/// A Qwen3 model (also the text encoder of the image pipelines): head_dim 128, Qwen's
/// vocabulary and special token ids.
pub(super) fn qwen3(name: &'static str, about: &'static str, shape: Shape) -> Preset {
    let mut c = shaped(base(Arch::Qwen3), shape);
    c.head_dim = 128; // Qwen3-32B: 64 heads × 128 ≠ hidden 5120
    c.vocab_size = 151936;
    c.max_position_embeddings = 40960;
    Preset {
        name,
        about,
        config: c,
        bos_token_id: Some(151643),
        eos_token_id: 151645,
    }
}

fn llama31(name: &'static str, about: &'static str, shape: Shape) -> Preset {
    let mut c = shaped(base(Arch::Llama), shape);
    c.vocab_size = 128256;
    c.rms_norm_eps = 1e-5;
    c.rope_theta = 500000.0;
    c.rope_scaling = Some(Llama3RopeScaling {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192,
    });
    Preset {
        name,
        about,
        config: c,
        bos_token_id: Some(128000),
        eos_token_id: 128001,
    }
}

fn mistral7b() -> Preset {
    let mut c = shaped(base(Arch::Mistral), (4096, 14336, 32, 32, 8));
    c.vocab_size = 32768;
    c.rms_norm_eps = 1e-5;
    c.max_position_embeddings = 32768;
    Preset {
        name: "mistral-7b",
        about: "mistralai/Mistral-7B-v0.3",
        config: c,
        bos_token_id: Some(1),
        eos_token_id: 2,
    }
}
