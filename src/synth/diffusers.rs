//! Image pipelines with random weights, written as diffusers directories: `model_index.json`
//! and one folder per component (transformer/, text_encoder/, tokenizer/, vae/, scheduler/),
//! each of the real model's shape, as `ZImagePipeline.save_pretrained` (or
//! `QwenImagePipeline`'s) lays them out.
//!
//! A pipeline preset is several models, so it is its own kind beside the language-model
//! [`Preset`]: its DiT and VAE are shaped by their diffusers configs, one family's
//! ([`PipelineModels`]: Z-Image here, Qwen-Image in `qwen_image.rs`), its text encoder is a
//! language-model preset (Qwen3 or Qwen2.5) whose special token ids are those of a small
//! synthetic tokenizer ([`ChatTokenizer`]: the real Qwen vocabulary is not to be had offline).

use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::ProgressBar;
use serde_json::{json, Value};

use super::presets::{qwen3, Preset};
use super::qwen_image::{qwen_vae_tensors, QwenImageModels};
use super::shards::{write_json, write_sharded, Spec};
use super::tokenizer::{ChatTokenizer, SpecialIds};
use super::{check_options, config_json, generation_json, WriteOptions, WriteReport};
use crate::checkpoint::DType;
use crate::error::{Error, Result};
use crate::model::z_image::{ZImage, ZImageConfig};
use crate::model::Architecture;

/// The diffusers version whose layout and config fields are written (`_diffusers_version`).
pub const DIFFUSERS_VERSION: &str = "0.42.1";

/// One component of a pipeline: its folder in the directory and its entry in model_index.json.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PipelineComponent {
    Transformer,
    TextEncoder,
    Tokenizer,
    Vae,
    Scheduler,
}

impl PipelineComponent {
    /// Every component, in the order they are written.
    pub const ALL: [PipelineComponent; 5] = [
        PipelineComponent::Transformer,
        PipelineComponent::TextEncoder,
        PipelineComponent::Tokenizer,
        PipelineComponent::Vae,
        PipelineComponent::Scheduler,
    ];

    /// The folder and model_index.json key.
    pub fn name(self) -> &'static str {
        match self {
            PipelineComponent::Transformer => "transformer",
            PipelineComponent::TextEncoder => "text_encoder",
            PipelineComponent::Tokenizer => "tokenizer",
            PipelineComponent::Vae => "vae",
            PipelineComponent::Scheduler => "scheduler",
        }
    }

    /// Parse `--only`: comma-separated component names, returned in [`ALL`](Self::ALL)'s
    /// order without repeats.
    pub fn parse_list(s: &str) -> Result<Vec<PipelineComponent>> {
        let names = || {
            PipelineComponent::ALL
                .iter()
                .map(|c| c.name())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut out = Vec::new();
        for word in s.split(',').map(str::trim) {
            let c = PipelineComponent::ALL
                .into_iter()
                .find(|c| c.name() == word)
                .ok_or_else(|| Error::Flag {
                    flag: "--only",
                    message: format!("unknown component {word:?}; expected some of {}", names()),
                })?;
            out.push(c);
        }
        out.sort();
        out.dedup();
        Ok(out)
    }
}

/// The shape of a `ZImageTransformer2DModel`: its config.json's fields.
#[derive(Clone, Debug, PartialEq)]
pub struct DitShape {
    pub dim: usize,
    pub n_layers: usize,
    pub n_refiner_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    /// The text encoder's hidden size.
    pub cap_feat_dim: usize,
    /// The VAE's latent channels.
    pub in_channels: usize,
    /// Head dims per RoPE axis (caption/frame, row, column) and each axis's positions.
    pub axes_dims: [usize; 3],
    pub axes_lens: [usize; 3],
    pub rope_theta: f64,
    pub t_scale: f64,
    pub qk_norm: bool,
    pub norm_eps: f64,
}

/// The shape of an `AutoencoderKL` with `DownEncoderBlock2D` / `UpDecoderBlock2D` blocks and
/// no quant convs (Flux's VAE): its config.json's fields.
#[derive(Clone, Debug, PartialEq)]
pub struct VaeShape {
    pub in_channels: usize,
    pub out_channels: usize,
    pub latent_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub norm_num_groups: usize,
    pub sample_size: usize,
    pub scaling_factor: f64,
    pub shift_factor: f64,
}

/// A Z-Image pipeline's models other than the text encoder's decoder (`ZImagePipeline`).
#[derive(Clone, Debug, PartialEq)]
pub struct ZImageModels {
    pub transformer: DitShape,
    pub vae: VaeShape,
    /// `FlowMatchEulerDiscreteScheduler`'s static `shift`.
    pub shift: f64,
}

/// The models of a pipeline beside its text encoder's decoder, by family.
#[derive(Clone, Debug, PartialEq)]
pub enum PipelineModels {
    ZImage(ZImageModels),
    QwenImage(QwenImageModels),
}

/// An image pipeline's shapes.
#[derive(Clone, Debug, PartialEq)]
pub struct PipelinePreset {
    pub name: &'static str,
    /// What it is shaped like, for `ferry synth --list`.
    pub about: &'static str,
    /// The language model read for its hidden states (Qwen3 for Z-Image, Qwen2.5-VL's text
    /// model for Qwen-Image); its BOS/EOS ids are the synthetic tokenizer's `<|endoftext|>`
    /// and `<|im_end|>`.
    pub text_encoder: Preset,
    /// Where the synthetic tokenizer's special tokens sit.
    pub(super) specials: SpecialIds,
    pub models: PipelineModels,
}

impl PipelinePreset {
    /// Every pipeline preset, smallest first within a family.
    pub fn list() -> Vec<PipelinePreset> {
        vec![
            z_image_tiny(),
            z_image_turbo(),
            super::qwen_image::qwen_image_pipeline_tiny(),
            super::qwen_image::qwen_image_pipeline(),
        ]
    }

    /// The family's name, for `ferry synth --list`.
    pub fn family(&self) -> &'static str {
        match self.models {
            PipelineModels::ZImage(_) => "z-image",
            PipelineModels::QwenImage(_) => "qwen-image",
        }
    }

    /// `_class_name` of model_index.json.
    pub fn class_name(&self) -> &'static str {
        match self.models {
            PipelineModels::ZImage(_) => "ZImagePipeline",
            PipelineModels::QwenImage(_) => "QwenImagePipeline",
        }
    }

    /// `[library, class]` of `component` in model_index.json, as the real pipeline's says.
    fn class(&self, component: PipelineComponent) -> [&'static str; 2] {
        use PipelineComponent::*;
        let qwen = matches!(self.models, PipelineModels::QwenImage(_));
        match (component, qwen) {
            (Transformer, false) => ["diffusers", "ZImageTransformer2DModel"],
            (Transformer, true) => ["diffusers", crate::model::qwen_image::CLASS_NAME],
            (TextEncoder, false) => ["transformers", "Qwen3Model"],
            (TextEncoder, true) => ["transformers", "Qwen2_5_VLForConditionalGeneration"],
            (Tokenizer, _) => ["transformers", "Qwen2Tokenizer"],
            (Vae, false) => ["diffusers", "AutoencoderKL"],
            (Vae, true) => ["diffusers", crate::model::qwen_image::vae::VAE_CLASS_NAME],
            (Scheduler, _) => ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        }
    }

    /// The names `by_name` accepts, comma-separated.
    pub fn names() -> String {
        let names: Vec<&str> = PipelinePreset::list().iter().map(|p| p.name).collect();
        names.join(", ")
    }

    /// The preset called `name`, if there is one.
    pub fn by_name(name: &str) -> Option<PipelinePreset> {
        PipelinePreset::list().into_iter().find(|p| p.name == name)
    }

    /// model_index.json; `_ferry_synthetic` (a private key, which diffusers and ferry skip)
    /// says what wrote it.
    pub fn model_index(&self, opts: &WriteOptions) -> Value {
        let left_out = match self.models {
            PipelineModels::ZImage(_) => "",
            PipelineModels::QwenImage(_) => {
                "; the text encoder is Qwen2.5-VL's text model alone (its vision tower, \
                 visual.*, is not written: the pipeline and ferry read the text model only)"
            }
        };
        let mut index = json!({
            "_class_name": self.class_name(),
            "_diffusers_version": DIFFUSERS_VERSION,
            "_ferry_synthetic": {
                "preset": self.name, "seed": opts.seed, "dtype": dtype_name(opts.dtype),
                "about": format!("random weights of {}'s shapes{left_out}", self.about),
            },
        });
        for c in PipelineComponent::ALL {
            index[c.name()] = json!(self.class(c));
        }
        index
    }

    /// The config file of `component` (config.json, or scheduler_config.json for the
    /// scheduler, tokenizer_config.json for the tokenizer).
    pub fn config(&self, component: PipelineComponent, dtype: DType) -> Value {
        let z = match &self.models {
            PipelineModels::ZImage(z) => z,
            PipelineModels::QwenImage(q) => {
                return match component {
                    PipelineComponent::Transformer => q.transformer.config(),
                    PipelineComponent::TextEncoder => {
                        q.text_encoder_config(&self.text_encoder, dtype)
                    }
                    PipelineComponent::Tokenizer => self.tokenizer().config,
                    PipelineComponent::Vae => q.vae_config(self.name),
                    PipelineComponent::Scheduler => q.scheduler_config(),
                }
            }
        };
        let synthetic = json!({"preset": self.name});
        match component {
            PipelineComponent::Transformer => {
                let d = &z.transformer;
                json!({
                    "_class_name": "ZImageTransformer2DModel",
                    "_diffusers_version": DIFFUSERS_VERSION,
                    "_ferry_synthetic": synthetic,
                    "all_f_patch_size": [1],
                    "all_patch_size": [2],
                    "axes_dims": d.axes_dims,
                    "axes_lens": d.axes_lens,
                    "cap_feat_dim": d.cap_feat_dim,
                    "dim": d.dim,
                    "in_channels": d.in_channels,
                    "n_heads": d.n_heads,
                    "n_kv_heads": d.n_kv_heads,
                    "n_layers": d.n_layers,
                    "n_refiner_layers": d.n_refiner_layers,
                    "norm_eps": d.norm_eps,
                    "qk_norm": d.qk_norm,
                    "rope_theta": d.rope_theta,
                    "t_scale": d.t_scale,
                })
            }
            PipelineComponent::TextEncoder => config_json(&self.text_encoder, dtype),
            PipelineComponent::Tokenizer => self.tokenizer().config,
            PipelineComponent::Vae => {
                let v = &z.vae;
                let blocks = v.block_out_channels.len();
                json!({
                    "_class_name": "AutoencoderKL",
                    "_diffusers_version": DIFFUSERS_VERSION,
                    "_ferry_synthetic": synthetic,
                    "act_fn": "silu",
                    "block_out_channels": v.block_out_channels,
                    "down_block_types": vec!["DownEncoderBlock2D"; blocks],
                    "force_upcast": true,
                    "in_channels": v.in_channels,
                    "latent_channels": v.latent_channels,
                    "latents_mean": null,
                    "latents_std": null,
                    "layers_per_block": v.layers_per_block,
                    "mid_block_add_attention": true,
                    "norm_num_groups": v.norm_num_groups,
                    "out_channels": v.out_channels,
                    "sample_size": v.sample_size,
                    "scaling_factor": v.scaling_factor,
                    "shift_factor": v.shift_factor,
                    "up_block_types": vec!["UpDecoderBlock2D"; blocks],
                    "use_post_quant_conv": false,
                    "use_quant_conv": false,
                })
            }
            PipelineComponent::Scheduler => json!({
                "_class_name": "FlowMatchEulerDiscreteScheduler",
                "_diffusers_version": DIFFUSERS_VERSION,
                "num_train_timesteps": 1000,
                "shift": z.shift,
                "use_dynamic_shifting": false,
            }),
        }
    }

    /// The tensors of `component` in the order they are written (pass order for the DiT and
    /// the text encoder), with their shapes; none for the tokenizer and the scheduler.
    pub fn tensors(&self, component: PipelineComponent) -> Vec<(String, Vec<usize>)> {
        use PipelineComponent as C;
        use PipelineModels as M;
        match (component, &self.models) {
            (C::Transformer, M::ZImage(_)) => {
                let config = self.config(component, DType::BF16);
                let path = Path::new(self.name).join("transformer/config.json");
                let config = ZImageConfig::from_json(&path, &config)
                    .expect("a preset's transformer config is valid");
                let dit = ZImage::new(config);
                dit.groups()
                    .iter()
                    .flat_map(|g| &g.tensors)
                    .map(|t| (t.name.clone(), t.shape.clone()))
                    .collect()
            }
            (C::Transformer, M::QwenImage(q)) => q.transformer.tensors(),
            (C::TextEncoder, _) => self.text_encoder.tensors(),
            (C::Vae, M::ZImage(z)) => vae_tensors(&z.vae),
            (C::Vae, M::QwenImage(q)) => qwen_vae_tensors(&q.vae),
            (C::Tokenizer | C::Scheduler, _) => Vec::new(),
        }
    }

    /// Number of parameters of `component`.
    pub fn parameters(&self, component: PipelineComponent) -> usize {
        self.tensors(component)
            .iter()
            .map(|(_, shape)| shape.iter().product::<usize>())
            .sum()
    }

    /// The synthetic tokenizer, its config saying what it is.
    fn tokenizer(&self) -> ChatTokenizer {
        let te = &self.text_encoder.config;
        let mut t = ChatTokenizer::new(te.max_position_embeddings, self.specials);
        let then = match self.specials {
            SpecialIds::AfterMerges => "then".to_string(),
            SpecialIds::From(id) => format!(
                "placeholder tokens <|synth_ID|> for ids {} to {}, then at Qwen's own ids",
                t.learned,
                id - 1
            ),
        };
        let description = format!(
            "Not Qwen's tokenizer, which cannot be had offline: a small byte-level BPE \
             tokenizer made by ferry synth, of Qwen's form (NFC, Qwen2's split, the byte-level \
             alphabet, its chat special tokens and a reduced Qwen3 chat template): the 256 \
             bytes, merges learned from a few image prompts, {then} <|endoftext|>, \
             <|im_start|>, <|im_end|>, <think>, </think>; {} ids, all below the text \
             encoder's vocab_size {}.",
            t.len, te.vocab_size
        );
        t.config["ferry_synthetic"] = json!({"preset": self.name, "description": description});
        t
    }
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bfloat16",
        DType::F32 => "float32",
        DType::F16 => "float16",
        DType::Ggml(t) => t.name(),
    }
}

/// Every tensor of diffusers' `AutoencoderKL` (vae.py `Encoder` and `Decoder`, with
/// `double_z`, mid-block attention and no quant convs), encoder first.
fn vae_tensors(v: &VaeShape) -> Vec<(String, Vec<usize>)> {
    let mut out: Vec<(String, Vec<usize>)> = Vec::new();
    let conv = |out: &mut Vec<_>, p: &str, cin: usize, cout: usize, k: usize| {
        out.push((format!("{p}.weight"), vec![cout, cin, k, k]));
        out.push((format!("{p}.bias"), vec![cout]));
    };
    let norm = |out: &mut Vec<(String, Vec<usize>)>, p: &str, c: usize| {
        out.push((format!("{p}.weight"), vec![c]));
        out.push((format!("{p}.bias"), vec![c]));
    };
    let resnet = |out: &mut Vec<_>, p: &str, cin: usize, cout: usize| {
        norm(out, &format!("{p}.norm1"), cin);
        conv(out, &format!("{p}.conv1"), cin, cout, 3);
        norm(out, &format!("{p}.norm2"), cout);
        conv(out, &format!("{p}.conv2"), cout, cout, 3);
        if cin != cout {
            conv(out, &format!("{p}.conv_shortcut"), cin, cout, 1);
        }
    };
    let mid = |out: &mut Vec<_>, p: &str, c: usize| {
        resnet(out, &format!("{p}.resnets.0"), c, c);
        let a = format!("{p}.attentions.0");
        norm(out, &format!("{a}.group_norm"), c);
        for proj in ["to_q", "to_k", "to_v", "to_out.0"] {
            out.push((format!("{a}.{proj}.weight"), vec![c, c]));
            out.push((format!("{a}.{proj}.bias"), vec![c]));
        }
        resnet(out, &format!("{p}.resnets.1"), c, c);
    };
    let channels = &v.block_out_channels;
    let blocks = channels.len();
    let (first, top) = (channels[0], channels[blocks - 1]);

    // Encoder: image → down blocks (each halving but the last) → mid → mean and log-variance.
    conv(&mut out, "encoder.conv_in", v.in_channels, first, 3);
    for (i, &c) in channels.iter().enumerate() {
        let cin = if i == 0 { first } else { channels[i - 1] };
        for j in 0..v.layers_per_block {
            let from = if j == 0 { cin } else { c };
            resnet(
                &mut out,
                &format!("encoder.down_blocks.{i}.resnets.{j}"),
                from,
                c,
            );
        }
        if i + 1 < blocks {
            conv(
                &mut out,
                &format!("encoder.down_blocks.{i}.downsamplers.0.conv"),
                c,
                c,
                3,
            );
        }
    }
    mid(&mut out, "encoder.mid_block", top);
    norm(&mut out, "encoder.conv_norm_out", top);
    conv(&mut out, "encoder.conv_out", top, 2 * v.latent_channels, 3);

    // Decoder: latents → mid → up blocks from the deepest channels (each doubling but the
    // last, one resnet more than the encoder's) → image.
    conv(&mut out, "decoder.conv_in", v.latent_channels, top, 3);
    mid(&mut out, "decoder.mid_block", top);
    for (i, &c) in channels.iter().rev().enumerate() {
        let cin = if i == 0 { top } else { channels[blocks - i] };
        for j in 0..=v.layers_per_block {
            let from = if j == 0 { cin } else { c };
            resnet(
                &mut out,
                &format!("decoder.up_blocks.{i}.resnets.{j}"),
                from,
                c,
            );
        }
        if i + 1 < blocks {
            conv(
                &mut out,
                &format!("decoder.up_blocks.{i}.upsamplers.0.conv"),
                c,
                c,
                3,
            );
        }
    }
    norm(&mut out, "decoder.conv_norm_out", first);
    conv(&mut out, "decoder.conv_out", first, v.out_channels, 3);
    out
}

/// Refuse to write over anything unless `--force`: `out` must be missing, empty, or a
/// directory this preset was written into with the same seed and dtype (its
/// model_index.json the same) whose folders for `components` are missing or empty, so that
/// `--only` can add components one call at a time.
pub fn check_destination(
    preset: &PipelinePreset,
    out: &Path,
    components: &[PipelineComponent],
    opts: &WriteOptions,
) -> Result<()> {
    let occupied = |dir: &Path| {
        std::fs::read_dir(dir)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false)
    };
    let refuse = |what: String| Error::Flag {
        flag: "--out",
        message: format!("{what}; choose a new directory or pass --force to overwrite"),
    };
    if out.exists() && !out.is_dir() {
        return Err(refuse(format!("{} is not a directory", out.display())));
    }
    if !occupied(out) {
        return Ok(());
    }
    let index_path = out.join("model_index.json");
    let ours = preset.model_index(opts);
    let theirs: Option<Value> = std::fs::read(&index_path)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok());
    if theirs.as_ref() != Some(&ours) {
        return Err(refuse(format!(
            "{} is not empty and not a {} pipeline written with seed {} in {}",
            out.display(),
            preset.name,
            opts.seed,
            dtype_name(opts.dtype)
        )));
    }
    for c in components {
        let dir = out.join(c.name());
        if occupied(&dir) {
            return Err(refuse(format!("{} is not empty", dir.display())));
        }
    }
    Ok(())
}

/// Write `components` of `preset` with random weights into `out` (created if missing), with
/// model_index.json: weights as `STEM-0000K-of-0000N.safetensors` shards and
/// `STEM.safetensors.index.json` (STEM `diffusion_pytorch_model` for the DiT and the VAE,
/// `model` for the text encoder), each component's config, the synthetic tokenizer. Returns
/// what each component took.
pub fn write_pipeline(
    preset: &PipelinePreset,
    out: &Path,
    components: &[PipelineComponent],
    opts: &WriteOptions,
) -> Result<Vec<(PipelineComponent, WriteReport)>> {
    check_options(opts)?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    write_json(&out.join("model_index.json"), &preset.model_index(opts))?;
    let specs = |c: PipelineComponent| -> Vec<Spec> {
        let tensors = preset.tensors(c);
        tensors.into_iter().map(|(n, s)| Spec::new(n, s)).collect()
    };
    let total: usize = components
        .iter()
        .map(|&c| preset.parameters(c) * opts.dtype.size())
        .sum();
    let bar = match opts.progress {
        true => crate::progress::bytes_bar(total, format!("synth {}", preset.name)),
        false => ProgressBar::hidden(),
    };
    let mut reports = Vec::new();
    for &c in components {
        let start = Instant::now();
        let dir = out.join(c.name());
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let config = preset.config(c, opts.dtype);
        let shards: Vec<PathBuf> = match c {
            PipelineComponent::Transformer | PipelineComponent::Vae => {
                write_json(&dir.join("config.json"), &config)?;
                write_sharded(&dir, "diffusion_pytorch_model", &specs(c), opts, &bar)?
            }
            PipelineComponent::TextEncoder => {
                write_json(&dir.join("config.json"), &config)?;
                let generation = generation_json(&preset.text_encoder);
                write_json(&dir.join("generation_config.json"), &generation)?;
                write_sharded(&dir, "model", &specs(c), opts, &bar)?
            }
            PipelineComponent::Tokenizer => {
                write_json(&dir.join("tokenizer.json"), &preset.tokenizer().tokenizer)?;
                write_json(&dir.join("tokenizer_config.json"), &config)?;
                Vec::new()
            }
            PipelineComponent::Scheduler => {
                write_json(&dir.join("scheduler_config.json"), &config)?;
                Vec::new()
            }
        };
        reports.push((
            c,
            WriteReport {
                shards,
                bytes: preset.parameters(c) * opts.dtype.size(),
                seconds: start.elapsed().as_secs_f64(),
            },
        ));
    }
    bar.finish_and_clear();
    Ok(reports)
}

/// The synthetic tokenizer's special ids (placed as `specials` says), for the text encoder's
/// config.
pub(super) fn with_chat_ids(mut te: Preset, specials: SpecialIds) -> Preset {
    let t = ChatTokenizer::new(te.config.max_position_embeddings, specials);
    assert!(
        t.len <= te.config.vocab_size,
        "the tokenizer's {} ids fit the text encoder's vocabulary",
        t.len
    );
    te.bos_token_id = Some(t.endoftext);
    te.eos_token_id = t.im_end;
    te
}

/// Tongyi-MAI/Z-Image-Turbo: the 6.15 B DiT (transformer/config.json), Qwen3-4B as the text
/// encoder (tied embeddings, as its config says), Flux's VAE, and the static shift 3.
fn z_image_turbo() -> PipelinePreset {
    let mut te = qwen3("z-image-turbo", "Qwen/Qwen3-4B", (2560, 9728, 36, 32, 8));
    te.config.tie_word_embeddings = true;
    PipelinePreset {
        name: "z-image-turbo",
        about: "Tongyi-MAI/Z-Image-Turbo",
        text_encoder: with_chat_ids(te, SpecialIds::AfterMerges),
        specials: SpecialIds::AfterMerges,
        models: PipelineModels::ZImage(ZImageModels {
            transformer: DitShape {
                dim: 3840,
                n_layers: 30,
                n_refiner_layers: 2,
                n_heads: 30,
                n_kv_heads: 30,
                cap_feat_dim: 2560,
                in_channels: 16,
                axes_dims: [32, 48, 48],
                axes_lens: [1536, 512, 512],
                rope_theta: 256.0,
                t_scale: 1000.0,
                qk_norm: true,
                norm_eps: 1e-5,
            },
            vae: VaeShape {
                in_channels: 3,
                out_channels: 3,
                latent_channels: 16,
                block_out_channels: vec![128, 256, 512, 512],
                layers_per_block: 2,
                norm_num_groups: 32,
                sample_size: 1024,
                scaling_factor: 0.3611,
                shift_factor: 0.1159,
            },
            shift: 3.0,
        }),
    }
}

/// The shapes of tests/fixtures/z-image (a DiT of dim 32, a 3-layer Qwen3, a VAE of 8–16
/// channels), small enough to run on the CPU in tests.
fn z_image_tiny() -> PipelinePreset {
    let mut te = qwen3("z-image-tiny", "tests", (64, 128, 3, 4, 2));
    let c = &mut te.config;
    c.head_dim = 32;
    c.vocab_size = 448;
    c.max_position_embeddings = 1024;
    c.tie_word_embeddings = true;
    PipelinePreset {
        name: "z-image-tiny",
        about: "the shapes of tests/fixtures/z-image (tests)",
        text_encoder: with_chat_ids(te, SpecialIds::AfterMerges),
        specials: SpecialIds::AfterMerges,
        models: PipelineModels::ZImage(ZImageModels {
            transformer: DitShape {
                dim: 32,
                n_layers: 2,
                n_refiner_layers: 1,
                n_heads: 2,
                n_kv_heads: 2,
                cap_feat_dim: 64,
                in_channels: 16,
                axes_dims: [4, 6, 6],
                axes_lens: [1024, 512, 512],
                rope_theta: 256.0,
                t_scale: 1000.0,
                qk_norm: true,
                norm_eps: 1e-5,
            },
            vae: VaeShape {
                in_channels: 3,
                out_channels: 3,
                latent_channels: 16,
                block_out_channels: vec![8, 16, 16, 16],
                layers_per_block: 1,
                norm_num_groups: 4,
                sample_size: 64,
                scaling_factor: 0.3611,
                shift_factor: 0.1159,
            },
            shift: 3.0,
        }),
    }
}
