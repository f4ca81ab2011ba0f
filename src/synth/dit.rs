//! Diffusion transformers of real shapes on their own, for DiT benchmarks: Qwen-Image's DiT
//! (the whole pipeline is `qwen-image-pipeline`, which reuses these presets) and Flux.1's.
//! Written as a
//! diffusers directory that holds only the transformer (`model_index.json` lists it alone,
//! and `transformer/` has its config.json and safetensors shards), which `ferry bench
//! --model` times; or made in memory (`ferry bench --synthetic qwen-image`).

use std::path::Path;
use std::time::Instant;

use indicatif::ProgressBar;
use serde_json::{json, Value};

use super::diffusers::DIFFUSERS_VERSION;
use super::shards::{write_json, write_sharded, Spec};
use super::{check_options, WriteOptions, WriteReport};
use crate::checkpoint::DType;
use crate::error::{Error, Result};
use crate::model::flux::{self, Flux, FluxConfig};
use crate::model::qwen_image::{QwenImage, QwenImageConfig, CLASS_NAME};
use crate::model::{Architecture, WeightGroup};

/// A DiT preset: its transformer config.json.
#[derive(Clone, Debug, PartialEq)]
pub struct DitPreset {
    pub name: &'static str,
    /// What it is shaped like, for `ferry synth --list`.
    pub about: &'static str,
    /// The pipeline class model_index.json names.
    pub pipeline_class: &'static str,
    /// The transformer's class and config.json.
    pub class_name: &'static str,
    config: Value,
}

impl DitPreset {
    /// Every DiT preset, smallest first.
    pub fn list() -> Vec<DitPreset> {
        vec![qwen_image_tiny(), flux_tiny(), flux_dev(), qwen_image()]
    }

    /// The names `by_name` accepts, comma-separated.
    pub fn names() -> String {
        let names: Vec<&str> = DitPreset::list().iter().map(|p| p.name).collect();
        names.join(", ")
    }

    pub fn by_name(name: &str) -> Option<DitPreset> {
        DitPreset::list().into_iter().find(|p| p.name == name)
    }

    /// This preset with transformer/config.json's `key` set to `value` (other shapes, for
    /// tests).
    pub fn with(mut self, key: &str, value: Value) -> DitPreset {
        self.config[key] = value;
        self
    }

    /// transformer/config.json; `_ferry_synthetic` says what wrote it.
    pub fn config(&self) -> Value {
        let mut c = self.config.clone();
        c["_class_name"] = json!(self.class_name);
        c["_diffusers_version"] = json!(DIFFUSERS_VERSION);
        c["_ferry_synthetic"] = json!({"preset": self.name});
        c
    }

    /// The architecture's family, for `ferry synth --list`.
    pub fn family(&self) -> &'static str {
        match self.class_name {
            flux::CLASS_NAME => "flux",
            _ => "qwen-image",
        }
    }

    /// The weight groups of this preset's model (computing its modulation in the steps:
    /// every tensor of the checkpoint).
    pub fn groups(&self) -> Vec<WeightGroup> {
        let path = Path::new(self.name).join("transformer/config.json");
        let json = self.config();
        let valid = "a preset's transformer config is valid";
        match self.class_name {
            flux::CLASS_NAME => Flux::new(FluxConfig::from_json(&path, &json).expect(valid))
                .groups()
                .to_vec(),
            _ => QwenImage::new(QwenImageConfig::from_json(&path, &json).expect(valid))
                .groups()
                .to_vec(),
        }
    }

    /// The transformer's tensors in pass order, with their shapes.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        self.groups()
            .iter()
            .flat_map(|g| &g.tensors)
            .map(|t| (t.name.clone(), t.shape.clone()))
            .collect()
    }

    pub fn parameters(&self) -> usize {
        self.tensors()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// model_index.json: the pipeline with its transformer alone.
    pub fn model_index(&self, opts: &WriteOptions) -> Value {
        let dtype = match opts.dtype {
            DType::F32 => "float32",
            _ => "bfloat16",
        };
        json!({
            "_class_name": self.pipeline_class,
            "_diffusers_version": DIFFUSERS_VERSION,
            "_ferry_synthetic": {
                "preset": self.name, "seed": opts.seed, "dtype": dtype,
                "about": format!(
                    "random weights of the transformer of {} (its text encoder and VAE are not written)",
                    self.about
                ),
            },
            "transformer": ["diffusers", self.class_name],
        })
    }
}

/// Write `preset` into `out` (missing or empty unless `force`): model_index.json and
/// transformer/ with config.json and `diffusion_pytorch_model-0000K-of-0000N.safetensors`
/// shards and their index.
pub fn write_dit(
    preset: &DitPreset,
    out: &Path,
    opts: &WriteOptions,
    force: bool,
) -> Result<WriteReport> {
    check_options(opts)?;
    let occupied = std::fs::read_dir(out)
        .map(|mut d| d.next().is_some())
        .unwrap_or(false);
    if out.exists() && !out.is_dir() || occupied && !force {
        return Err(Error::Flag {
            flag: "--out",
            message: format!(
                "{} is not an empty directory; choose a new one or pass --force to overwrite",
                out.display()
            ),
        });
    }
    let start = Instant::now();
    let dir = out.join("transformer");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    write_json(&out.join("model_index.json"), &preset.model_index(opts))?;
    write_json(&dir.join("config.json"), &preset.config())?;
    let specs: Vec<Spec> = preset
        .tensors()
        .into_iter()
        .map(|(n, s)| Spec::new(n, s))
        .collect();
    let bytes = preset.parameters() * opts.dtype.size();
    let bar = match opts.progress {
        true => crate::progress::bytes_bar(bytes, format!("synth {}", preset.name)),
        false => ProgressBar::hidden(),
    };
    let shards = write_sharded(&dir, "diffusion_pytorch_model", &specs, opts, &bar)?;
    bar.finish_and_clear();
    Ok(WriteReport {
        shards,
        bytes,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Qwen/Qwen-Image's transformer/config.json: 60 double-stream blocks of 24 heads × 128,
/// text features of Qwen2.5-VL-7B (3584), 16 latent channels packed 2×2.
fn qwen_image() -> DitPreset {
    DitPreset {
        name: "qwen-image",
        about: "Qwen/Qwen-Image",
        pipeline_class: "QwenImagePipeline",
        class_name: CLASS_NAME,
        config: json!({
            "attention_head_dim": 128,
            "axes_dims_rope": [16, 56, 56],
            "guidance_embeds": false,
            "in_channels": 64,
            "joint_attention_dim": 3584,
            "num_attention_heads": 24,
            "num_layers": 60,
            "out_channels": 16,
            "patch_size": 2,
            "pooled_projection_dim": 768,
        }),
    }
}

/// The shape of tests/fixtures/qwen-image (2 blocks, 2 heads of 16), small enough to run on
/// the CPU in tests.
fn qwen_image_tiny() -> DitPreset {
    DitPreset {
        name: "qwen-image-tiny",
        about: "the shapes of tests/fixtures/qwen-image (tests)",
        pipeline_class: "QwenImagePipeline",
        class_name: CLASS_NAME,
        config: json!({
            "attention_head_dim": 16,
            "axes_dims_rope": [4, 6, 6],
            "guidance_embeds": false,
            "in_channels": 64,
            "joint_attention_dim": 48,
            "num_attention_heads": 2,
            "num_layers": 2,
            "out_channels": 16,
            "patch_size": 2,
        }),
    }
}

/// black-forest-labs/FLUX.1-dev's transformer/config.json: 19 double-stream and 38
/// single-stream blocks of 24 heads × 128, T5-XXL's text features (4096), CLIP-L's pooled
/// embedding (768), the guidance scale embedded; `axes_dims_rope` and `out_channels` as
/// diffusers fills them in.
fn flux_dev() -> DitPreset {
    DitPreset {
        name: "flux.1-dev",
        about: "black-forest-labs/FLUX.1-dev",
        pipeline_class: "FluxPipeline",
        class_name: flux::CLASS_NAME,
        config: json!({
            "attention_head_dim": 128,
            "axes_dims_rope": [16, 56, 56],
            "guidance_embeds": true,
            "in_channels": 64,
            "joint_attention_dim": 4096,
            "num_attention_heads": 24,
            "num_layers": 19,
            "num_single_layers": 38,
            "out_channels": null,
            "patch_size": 1,
            "pooled_projection_dim": 768,
        }),
    }
}

/// The shape of tests/fixtures/flux (2 double and 2 single blocks, 2 heads of 16), small
/// enough to run on the CPU in tests.
fn flux_tiny() -> DitPreset {
    DitPreset {
        name: "flux-tiny",
        about: "the shapes of tests/fixtures/flux (tests)",
        pipeline_class: "FluxPipeline",
        class_name: flux::CLASS_NAME,
        config: json!({
            "attention_head_dim": 16,
            "axes_dims_rope": [4, 6, 6],
            "guidance_embeds": true,
            "in_channels": 16,
            "joint_attention_dim": 40,
            "num_attention_heads": 2,
            "num_layers": 2,
            "num_single_layers": 2,
            "out_channels": null,
            "patch_size": 1,
            "pooled_projection_dim": 24,
        }),
    }
}

/// The transformer of tests/fixtures/flux-pipeline (1 double and 2 single blocks, 2 heads of
/// 16, text features of width 32, 16 latent channels packed 2×2), for the pipeline `name`;
/// not a preset of its own (its name is the pipeline's).
pub(super) fn flux_pipeline_tiny_dit(name: &'static str) -> DitPreset {
    DitPreset {
        name,
        about: "the transformer of tests/fixtures/flux-pipeline (tests)",
        pipeline_class: "FluxPipeline",
        class_name: flux::CLASS_NAME,
        config: json!({
            "attention_head_dim": 16,
            "axes_dims_rope": [4, 6, 6],
            "guidance_embeds": true,
            "in_channels": 64,
            "joint_attention_dim": 32,
            "num_attention_heads": 2,
            "num_layers": 1,
            "num_single_layers": 2,
            "out_channels": null,
            "patch_size": 1,
            "pooled_projection_dim": 32,
        }),
    }
}
