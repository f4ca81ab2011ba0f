//! Image pipelines with random weights, written as diffusers directories: `model_index.json`
//! and one folder per component (transformer/, text_encoder/, tokenizer/, vae/, scheduler/),
//! each of the real model's shape, as `ZImagePipeline.save_pretrained` (or
//! `QwenImagePipeline`'s) lays them out.
//!
//! A pipeline preset is several models, so it is its own kind beside the language-model
//! [`Preset`]: its models are one family's ([`PipelineModels`]: Z-Image here, Qwen-Image in
//! `qwen_image.rs`, Flux.1 in `flux.rs`), the DiT and VAE shaped by their diffusers configs.
//! Z-Image's and Qwen-Image's text encoder is a language-model preset (Qwen3 or Qwen2.5)
//! whose special token ids are those of a small synthetic tokenizer ([`ChatTokenizer`]: the
//! real Qwen vocabulary is not to be had offline); Flux's are CLIP and T5, with small CLIP
//! BPE and T5 Unigram tokenizers of their own.

use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::ProgressBar;
use serde_json::{json, Value};

use super::flux::FluxModels;
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
    /// Flux's second text encoder (T5).
    TextEncoder2,
    Tokenizer,
    /// Flux's second tokenizer (T5's).
    Tokenizer2,
    Vae,
    Scheduler,
}

impl PipelineComponent {
    /// Every component of any pipeline, in the order they are written.
    pub const ALL: [PipelineComponent; 7] = [
        PipelineComponent::Transformer,
        PipelineComponent::TextEncoder,
        PipelineComponent::TextEncoder2,
        PipelineComponent::Tokenizer,
        PipelineComponent::Tokenizer2,
        PipelineComponent::Vae,
        PipelineComponent::Scheduler,
    ];

    /// The folder and model_index.json key.
    pub fn name(self) -> &'static str {
        match self {
            PipelineComponent::Transformer => "transformer",
            PipelineComponent::TextEncoder => "text_encoder",
            PipelineComponent::TextEncoder2 => "text_encoder_2",
            PipelineComponent::Tokenizer => "tokenizer",
            PipelineComponent::Tokenizer2 => "tokenizer_2",
            PipelineComponent::Vae => "vae",
            PipelineComponent::Scheduler => "scheduler",
        }
    }

    /// Parse `--only`: comma-separated component names, returned in [`ALL`](Self::ALL)'s
    /// order without repeats.
    pub fn parse_list(s: &str) -> Result<Vec<PipelineComponent>> {
        PipelineComponent::parse_among(s, &PipelineComponent::ALL)
    }

    /// [`parse_list`](Self::parse_list) of names in `among` only (one pipeline's
    /// components); an error lists them.
    fn parse_among(s: &str, among: &[PipelineComponent]) -> Result<Vec<PipelineComponent>> {
        let names = || {
            among
                .iter()
                .map(|c| c.name())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut out = Vec::new();
        for word in s.split(',').map(str::trim) {
            let c = among
                .iter()
                .copied()
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

/// A Z-Image pipeline's models (`ZImagePipeline`).
#[derive(Clone, Debug, PartialEq)]
pub struct ZImageModels {
    /// Qwen3, read for its hidden states; its BOS/EOS ids are the synthetic tokenizer's
    /// `<|endoftext|>` and `<|im_end|>`.
    pub text_encoder: Preset,
    /// Where the synthetic tokenizer's special tokens sit.
    pub(super) specials: SpecialIds,
    pub transformer: DitShape,
    pub vae: VaeShape,
    /// `FlowMatchEulerDiscreteScheduler`'s static `shift`.
    pub shift: f64,
}

/// The models of a pipeline, by family.
#[derive(Clone, Debug, PartialEq)]
pub enum PipelineModels {
    ZImage(ZImageModels),
    QwenImage(QwenImageModels),
    Flux(FluxModels),
}

/// An image pipeline's shapes.
#[derive(Clone, Debug, PartialEq)]
pub struct PipelinePreset {
    pub name: &'static str,
    /// What it is shaped like, for `ferry synth --list`.
    pub about: &'static str,
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
            super::flux::flux_pipeline_tiny(),
            super::flux::flux_dev_pipeline(),
        ]
    }

    /// The family's name, for `ferry synth --list`.
    pub fn family(&self) -> &'static str {
        match self.models {
            PipelineModels::ZImage(_) => "z-image",
            PipelineModels::QwenImage(_) => "qwen-image",
            PipelineModels::Flux(_) => "flux",
        }
    }

    /// `_class_name` of model_index.json.
    pub fn class_name(&self) -> &'static str {
        match self.models {
            PipelineModels::ZImage(_) => "ZImagePipeline",
            PipelineModels::QwenImage(_) => "QwenImagePipeline",
            PipelineModels::Flux(_) => crate::diffuse::flux_pipeline::PIPELINE_CLASS,
        }
    }

    /// The components this pipeline has, in the order they are written: Flux's two text
    /// encoders and tokenizers, one of each for the others.
    pub fn components(&self) -> Vec<PipelineComponent> {
        use PipelineComponent::*;
        let flux = matches!(self.models, PipelineModels::Flux(_));
        PipelineComponent::ALL
            .into_iter()
            .filter(|c| flux || !matches!(c, TextEncoder2 | Tokenizer2))
            .collect()
    }

    /// Parse `--only` for this pipeline: names of its [`components`](Self::components).
    pub fn parse_components(&self, s: &str) -> Result<Vec<PipelineComponent>> {
        PipelineComponent::parse_among(s, &self.components())
    }

    /// The language model read for its hidden states (Qwen3 for Z-Image, Qwen2.5-VL's text
    /// model for Qwen-Image), and where its synthetic tokenizer's specials sit; none for
    /// Flux, whose text encoders are CLIP and T5.
    fn chat(&self) -> Option<(&Preset, SpecialIds)> {
        match &self.models {
            PipelineModels::ZImage(z) => Some((&z.text_encoder, z.specials)),
            PipelineModels::QwenImage(q) => Some((&q.text_encoder, q.specials)),
            PipelineModels::Flux(_) => None,
        }
    }

    /// The language-model text encoder of Z-Image and Qwen-Image pipelines (none for Flux).
    pub fn language_model(&self) -> Option<&Preset> {
        self.chat().map(|(te, _)| te)
    }

    /// `[library, class]` of `component` in model_index.json, as the real pipeline's says.
    fn class(&self, component: PipelineComponent) -> [&'static str; 2] {
        use PipelineComponent::*;
        use PipelineModels as M;
        match (component, &self.models) {
            (Transformer, M::ZImage(_)) => ["diffusers", "ZImageTransformer2DModel"],
            (Transformer, M::QwenImage(_)) => ["diffusers", crate::model::qwen_image::CLASS_NAME],
            (Transformer, M::Flux(_)) => ["diffusers", crate::model::flux::CLASS_NAME],
            (TextEncoder, M::ZImage(_)) => ["transformers", "Qwen3Model"],
            (TextEncoder, M::QwenImage(_)) => {
                ["transformers", "Qwen2_5_VLForConditionalGeneration"]
            }
            (TextEncoder, M::Flux(_)) => ["transformers", "CLIPTextModel"],
            (TextEncoder2, _) => ["transformers", "T5EncoderModel"],
            (Tokenizer, M::Flux(_)) => ["transformers", "CLIPTokenizer"],
            (Tokenizer, _) => ["transformers", "Qwen2Tokenizer"],
            (Tokenizer2, _) => ["transformers", "T5TokenizerFast"],
            (Vae, M::QwenImage(_)) => ["diffusers", crate::model::qwen_image::vae::VAE_CLASS_NAME],
            (Vae, _) => ["diffusers", "AutoencoderKL"],
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
            PipelineModels::ZImage(_) | PipelineModels::Flux(_) => "",
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
        for c in self.components() {
            index[c.name()] = json!(self.class(c));
        }
        index
    }

    /// The config file of `component` (config.json, or scheduler_config.json for the
    /// scheduler, tokenizer_config.json for a tokenizer).
    pub fn config(&self, component: PipelineComponent, dtype: DType) -> Value {
        use PipelineComponent as C;
        let z = match &self.models {
            PipelineModels::ZImage(z) => z,
            PipelineModels::QwenImage(q) => {
                return match component {
                    C::Transformer => q.transformer.config(),
                    C::TextEncoder => q.text_encoder_config(&q.text_encoder, dtype),
                    C::Tokenizer => self.chat_tokenizer().config,
                    C::Vae => q.vae_config(self.name),
                    C::Scheduler => q.scheduler_config(),
                    C::TextEncoder2 | C::Tokenizer2 => Value::Null,
                }
            }
            PipelineModels::Flux(f) => {
                return match component {
                    C::Transformer => f.transformer.config(),
                    C::TextEncoder => f.clip_config(self.name, dtype),
                    C::TextEncoder2 => f.t5_config(self.name, dtype),
                    C::Tokenizer => f.clip_tokenizer(self.name).config,
                    C::Tokenizer2 => f.t5_tokenizer(self.name).config,
                    C::Vae => vae_config(&f.vae, self.name),
                    C::Scheduler => f.scheduler_config(),
                }
            }
        };
        let synthetic = json!({"preset": self.name});
        match component {
            C::Transformer => {
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
            C::TextEncoder => config_json(&z.text_encoder, dtype),
            C::Tokenizer => self.chat_tokenizer().config,
            C::Vae => vae_config(&z.vae, self.name),
            C::Scheduler => json!({
                "_class_name": "FlowMatchEulerDiscreteScheduler",
                "_diffusers_version": DIFFUSERS_VERSION,
                "num_train_timesteps": 1000,
                "shift": z.shift,
                "use_dynamic_shifting": false,
            }),
            C::TextEncoder2 | C::Tokenizer2 => Value::Null,
        }
    }

    /// The tensors of `component` in the order they are written (pass order for the DiT and
    /// the text encoders), with their shapes; none for the tokenizers, the scheduler and a
    /// component the pipeline does not have.
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
            (C::Transformer, M::Flux(f)) => f.transformer.tensors(),
            (C::TextEncoder, M::ZImage(z)) => z.text_encoder.tensors(),
            (C::TextEncoder, M::QwenImage(q)) => q.text_encoder.tensors(),
            (C::TextEncoder, M::Flux(f)) => f.clip_tensors(),
            (C::TextEncoder2, M::Flux(f)) => f.t5_tensors(),
            (C::Vae, M::ZImage(z)) => vae_tensors(&z.vae),
            (C::Vae, M::QwenImage(q)) => qwen_vae_tensors(&q.vae),
            (C::Vae, M::Flux(f)) => vae_tensors(&f.vae),
            (C::TextEncoder2, _) | (C::Tokenizer | C::Tokenizer2 | C::Scheduler, _) => Vec::new(),
        }
    }

    /// Number of parameters of `component`.
    pub fn parameters(&self, component: PipelineComponent) -> usize {
        self.tensors(component)
            .iter()
            .map(|(_, shape)| shape.iter().product::<usize>())
            .sum()
    }

    /// The files of a tokenizer component (`Tokenizer` or `Tokenizer2`): name and text.
    fn tokenizer_files(&self, component: PipelineComponent) -> Vec<(&'static str, String)> {
        let text = |v: &Value| serde_json::to_string_pretty(v).expect("JSON serializes") + "\n";
        match (&self.models, component) {
            (PipelineModels::Flux(f), PipelineComponent::Tokenizer) => {
                let t = f.clip_tokenizer(self.name);
                vec![
                    ("vocab.json", text(&t.vocab)),
                    ("merges.txt", t.merges),
                    ("tokenizer_config.json", text(&t.config)),
                    ("special_tokens_map.json", text(&t.special_tokens_map)),
                ]
            }
            (PipelineModels::Flux(f), PipelineComponent::Tokenizer2) => {
                let t = f.t5_tokenizer(self.name);
                vec![
                    ("tokenizer.json", text(&t.tokenizer)),
                    ("tokenizer_config.json", text(&t.config)),
                    ("special_tokens_map.json", text(&t.special_tokens_map)),
                ]
            }
            _ => {
                let t = self.chat_tokenizer();
                vec![
                    ("tokenizer.json", text(&t.tokenizer)),
                    ("tokenizer_config.json", text(&t.config)),
                ]
            }
        }
    }

    /// The synthetic tokenizer of a Z-Image or Qwen-Image pipeline, its config saying what
    /// it is.
    fn chat_tokenizer(&self) -> ChatTokenizer {
        let (te, specials) = self
            .chat()
            .expect("a pipeline with a language-model text encoder");
        let te = &te.config;
        let mut t = ChatTokenizer::new(te.max_position_embeddings, specials);
        let then = match specials {
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

/// vae/config.json of an `AutoencoderKL` (Flux's VAE, which Z-Image uses too).
fn vae_config(v: &VaeShape, preset: &str) -> Value {
    let blocks = v.block_out_channels.len();
    json!({
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "_ferry_synthetic": {"preset": preset},
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
/// `model` for the text encoders), each component's config, the synthetic tokenizers. Every
/// component must be one of the preset's. Returns what each component took.
pub fn write_pipeline(
    preset: &PipelinePreset,
    out: &Path,
    components: &[PipelineComponent],
    opts: &WriteOptions,
) -> Result<Vec<(PipelineComponent, WriteReport)>> {
    check_options(opts)?;
    let ours = preset.components();
    if let Some(c) = components.iter().find(|c| !ours.contains(c)) {
        return Err(Error::Flag {
            flag: "--only",
            message: format!("{} has no {} component", preset.name, c.name()),
        });
    }
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
            PipelineComponent::TextEncoder | PipelineComponent::TextEncoder2 => {
                write_json(&dir.join("config.json"), &config)?;
                if let Some(te) = preset.language_model() {
                    write_json(&dir.join("generation_config.json"), &generation_json(te))?;
                }
                write_sharded(&dir, "model", &specs(c), opts, &bar)?
            }
            PipelineComponent::Tokenizer | PipelineComponent::Tokenizer2 => {
                for (name, text) in preset.tokenizer_files(c) {
                    let path = dir.join(name);
                    std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
                }
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
        models: PipelineModels::ZImage(ZImageModels {
            text_encoder: with_chat_ids(te, SpecialIds::AfterMerges),
            specials: SpecialIds::AfterMerges,
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
            vae: flux_vae(),
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
        models: PipelineModels::ZImage(ZImageModels {
            text_encoder: with_chat_ids(te, SpecialIds::AfterMerges),
            specials: SpecialIds::AfterMerges,
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
            vae: tiny_flux_vae(),
            shift: 3.0,
        }),
    }
}

/// Flux.1's VAE (black-forest-labs/FLUX.1-dev's vae/config.json), which Z-Image uses too.
pub(super) fn flux_vae() -> VaeShape {
    VaeShape {
        in_channels: 3,
        out_channels: 3,
        latent_channels: 16,
        block_out_channels: vec![128, 256, 512, 512],
        layers_per_block: 2,
        norm_num_groups: 32,
        sample_size: 1024,
        scaling_factor: 0.3611,
        shift_factor: 0.1159,
    }
}

/// Flux's VAE at 8–16 channels (tests/fixtures/z-image's and flux-pipeline's).
pub(super) fn tiny_flux_vae() -> VaeShape {
    VaeShape {
        block_out_channels: vec![8, 16, 16, 16],
        layers_per_block: 1,
        norm_num_groups: 4,
        sample_size: 64,
        ..flux_vae()
    }
}
