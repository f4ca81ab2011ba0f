//! Qwen-Image pipelines with random weights (`QwenImagePipeline`), the models beside the text
//! encoder's decoder that [`PipelinePreset`](super::PipelinePreset) writes for them: the DiT of
//! a [`DitPreset`], the `AutoencoderKLQwenImage` VAE (every tensor of diffusers' state dict,
//! the encoder's included), Qwen/Qwen-Image's scheduler, and the config.json of the text
//! encoder, Qwen2.5-VL as transformers 5 saves it.
//!
//! The text encoder is a `Qwen2_5_VLForConditionalGeneration` checkpoint without its vision
//! tower (`visual.*`, 0.68 B parameters in Qwen2.5-VL-7B): the pipeline reads the text model
//! alone for a prompt, and so does ferry, so the tower would only cost disk. Its config is
//! still in `vision_config`, as the real one is.

use serde_json::{json, Value};

use std::path::Path;

use super::diffusers::{with_chat_ids, PipelineModels, PipelinePreset, DIFFUSERS_VERSION};
use super::dit::DitPreset;
use super::presets::qwen25;
use super::tokenizer::SpecialIds;
use super::Preset;
use crate::checkpoint::DType;
use crate::model::qwen_image::vae::{QwenVaeConfig, VAE_CLASS_NAME};

/// The transformers version whose `Qwen2_5_VLConfig` layout the text encoder's config.json
/// has (`transformers_version`).
const TRANSFORMERS_VERSION: &str = "5.25.0";

/// A Qwen-Image pipeline's models other than the text encoder's decoder.
#[derive(Clone, Debug, PartialEq)]
pub struct QwenImageModels {
    /// Qwen2.5-VL's text model, read for its hidden states; its BOS/EOS ids are the
    /// synthetic tokenizer's `<|endoftext|>` and `<|im_end|>`.
    pub text_encoder: Preset,
    /// Where the synthetic tokenizer's special tokens sit.
    pub(super) specials: SpecialIds,
    /// The DiT; its `joint_attention_dim` is the text encoder's hidden size.
    pub transformer: DitPreset,
    pub vae: QwenVaeConfig,
    /// The text model's multimodal RoPE sections (time, height, width), half a head in all.
    pub mrope_section: [usize; 3],
    /// `vision_config` of text_encoder/config.json: the vision tower that is not written.
    pub vision_config: Value,
}

impl QwenImageModels {
    /// text_encoder/config.json as transformers 5 writes `Qwen2_5_VLConfig`: the text model's
    /// fields in `text_config` (its RoPE in `rope_parameters`: type mrope with
    /// [`mrope_section`](Self::mrope_section)), the vision tower's in `vision_config`, the
    /// ids of the image and video placeholder tokens at the top (Qwen's, as transformers'
    /// defaults are).
    pub fn text_encoder_config(&self, te: &Preset, dtype: DType) -> Value {
        let c = &te.config;
        let text_config = json!({
            "attention_dropout": 0.0,
            "bos_token_id": te.bos_token_id,
            "eos_token_id": te.eos_token_id,
            "hidden_act": "silu",
            "hidden_size": c.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": c.intermediate_size,
            "layer_types": vec!["full_attention"; c.num_layers],
            "max_position_embeddings": c.max_position_embeddings,
            "max_window_layers": c.num_layers,
            "model_type": "qwen2_5_vl_text",
            "num_attention_heads": c.num_heads,
            "num_hidden_layers": c.num_layers,
            "num_key_value_heads": c.num_kv_heads,
            "pad_token_id": null,
            "rms_norm_eps": c.rms_norm_eps,
            "rope_parameters": {
                "mrope_section": self.mrope_section,
                "rope_theta": c.rope_theta,
                "rope_type": "default",
                "type": "mrope",
            },
            "sliding_window": null,
            "tie_word_embeddings": c.tie_word_embeddings,
            "use_cache": true,
            "use_sliding_window": false,
            "vocab_size": c.vocab_size,
        });
        json!({
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "dtype": if dtype == DType::BF16 { "bfloat16" } else { "float32" },
            "ferry_synthetic": {
                "preset": te.name,
                "about": "the text model alone: the vision tower (visual.*) is not written",
            },
            "image_token_id": 151655,
            "model_type": "qwen2_5_vl",
            "text_config": text_config,
            "tie_word_embeddings": c.tie_word_embeddings,
            "transformers_version": TRANSFORMERS_VERSION,
            "video_token_id": 151656,
            "vision_config": self.vision_config,
            "vision_end_token_id": 151653,
            "vision_start_token_id": 151652,
        })
    }

    /// vae/config.json: every field of diffusers' `AutoencoderKLQwenImage` config.
    pub fn vae_config(&self, preset: &str) -> Value {
        let v = &self.vae;
        // The shortest decimal of each f32 (-0.7571, not -0.7570999860763550).
        let decimals = |xs: &[f32]| -> Vec<f64> {
            xs.iter()
                .map(|x| x.to_string().parse().expect("an f32 prints as a number"))
                .collect()
        };
        json!({
            "_class_name": VAE_CLASS_NAME,
            "_diffusers_version": DIFFUSERS_VERSION,
            "_ferry_synthetic": {"preset": preset},
            "attn_scales": v.attn_scales,
            "base_dim": v.base_dim,
            "dim_mult": v.dim_mult,
            "dropout": 0.0,
            "input_channels": v.input_channels,
            "latents_mean": decimals(&v.latents_mean),
            "latents_std": decimals(&v.latents_std),
            "num_res_blocks": v.num_res_blocks,
            "temperal_downsample": v.temperal_downsample,
            "z_dim": v.z_dim,
        })
    }

    /// scheduler/scheduler_config.json: Qwen/Qwen-Image's (a shift that grows with the image,
    /// exponential, from 0.5 at 256 tokens to 0.9 at 8192, ending at σ 0.02).
    pub fn scheduler_config(&self) -> Value {
        json!({
            "_class_name": "FlowMatchEulerDiscreteScheduler",
            "_diffusers_version": DIFFUSERS_VERSION,
            "base_image_seq_len": 256,
            "base_shift": 0.5,
            "invert_sigmas": false,
            "max_image_seq_len": 8192,
            "max_shift": 0.9,
            "num_train_timesteps": 1000,
            "shift": 1.0,
            "shift_terminal": 0.02,
            "stochastic_sampling": false,
            "time_shift_type": "exponential",
            "use_beta_sigmas": false,
            "use_dynamic_shifting": true,
            "use_exponential_sigmas": false,
            "use_karras_sigmas": false,
        })
    }
}

/// Every tensor of diffusers' `AutoencoderKLQwenImage` of config `c`, with its shape, in the
/// order of its state dict: the encoder, `quant_conv`, `post_quant_conv`, the decoder.
pub fn qwen_vae_tensors(c: &QwenVaeConfig) -> Vec<(String, Vec<usize>)> {
    let mut t = VaeTensors(Vec::new());
    let levels = c.dim_mult.len();
    let z = c.z_dim;

    // Encoder: image → levels of residual blocks, each level but the last ending in a
    // stride-2 downsampler (also halving the frames where temperal_downsample says) → mid
    // block → mean and log-variance.
    let dims: Vec<usize> = std::iter::once(1)
        .chain(c.dim_mult.iter().copied())
        .map(|m| c.base_dim * m)
        .collect();
    t.causal_conv("encoder.conv_in", c.input_channels, dims[0], [3, 3, 3]);
    // The encoder's blocks are one list, numbered through the levels.
    let mut k = 0;
    let mut scale = 1.0;
    for i in 0..levels {
        let (mut cin, cout) = (dims[i], dims[i + 1]);
        for _ in 0..c.num_res_blocks {
            t.residual(&format!("encoder.down_blocks.{k}"), cin, cout);
            k += 1;
            if c.attn_scales.contains(&scale) {
                t.attention(&format!("encoder.down_blocks.{k}"), cout);
                k += 1;
            }
            cin = cout;
        }
        if i + 1 < levels {
            let p = format!("encoder.down_blocks.{k}");
            t.conv2d(&format!("{p}.resample.1"), cout, cout, 3);
            if c.temperal_downsample[i] {
                t.causal_conv(&format!("{p}.time_conv"), cout, cout, [3, 1, 1]);
            }
            k += 1;
            scale /= 2.0;
        }
    }
    let top = dims[levels];
    t.mid_block("encoder.mid_block", top);
    t.rms_norm("encoder.norm_out", top, false);
    t.causal_conv("encoder.conv_out", top, 2 * z, [3, 3, 3]);

    t.causal_conv("quant_conv", 2 * z, 2 * z, [1, 1, 1]);
    t.causal_conv("post_quant_conv", z, z, [1, 1, 1]);

    // Decoder: latents → mid block → up blocks from the deepest level (one residual block
    // more than the encoder's; each but the last ending in a nearest 2× upsampler whose conv
    // halves the channels, and a time_conv doubling the frames where the reversed
    // temperal_downsample says) → image.
    let dims: Vec<usize> = std::iter::once(c.dim_mult[levels - 1])
        .chain(c.dim_mult.iter().rev().copied())
        .map(|m| c.base_dim * m)
        .collect();
    t.causal_conv("decoder.conv_in", z, dims[0], [3, 3, 3]);
    t.mid_block("decoder.mid_block", dims[0]);
    for i in 0..levels {
        let p = format!("decoder.up_blocks.{i}");
        let cout = dims[i + 1];
        // The upsampler before this block halved its input.
        let mut cin = if i == 0 { dims[0] } else { dims[i] / 2 };
        for j in 0..=c.num_res_blocks {
            t.residual(&format!("{p}.resnets.{j}"), cin, cout);
            cin = cout;
        }
        if i + 1 < levels {
            t.conv2d(&format!("{p}.upsamplers.0.resample.1"), cout, cout / 2, 3);
            if c.temperal_downsample[levels - 2 - i] {
                t.causal_conv(
                    &format!("{p}.upsamplers.0.time_conv"),
                    cout,
                    2 * cout,
                    [3, 1, 1],
                );
            }
        }
    }
    let last = dims[levels];
    t.rms_norm("decoder.norm_out", last, false);
    t.causal_conv("decoder.conv_out", last, c.input_channels, [3, 3, 3]);
    t.0
}

/// The tensors of a VAE as its modules add them.
struct VaeTensors(Vec<(String, Vec<usize>)>);

impl VaeTensors {
    fn push(&mut self, name: String, shape: Vec<usize>) {
        self.0.push((name, shape));
    }

    /// `QwenImageCausalConv3d`: `[out, in, kt, kh, kw]` and a bias.
    fn causal_conv(&mut self, p: &str, cin: usize, cout: usize, [kt, kh, kw]: [usize; 3]) {
        self.push(format!("{p}.weight"), vec![cout, cin, kt, kh, kw]);
        self.push(format!("{p}.bias"), vec![cout]);
    }

    /// `nn.Conv2d`: `[out, in, k, k]` and a bias.
    fn conv2d(&mut self, p: &str, cin: usize, cout: usize, k: usize) {
        self.push(format!("{p}.weight"), vec![cout, cin, k, k]);
        self.push(format!("{p}.bias"), vec![cout]);
    }

    /// `QwenImageRMS_norm`: a `gamma` of `[c, 1, 1]` over images (`images=True`), `[c, 1, 1,
    /// 1]` over videos; no bias.
    fn rms_norm(&mut self, p: &str, c: usize, image: bool) {
        let shape = match image {
            true => vec![c, 1, 1],
            false => vec![c, 1, 1, 1],
        };
        self.push(format!("{p}.gamma"), shape);
    }

    /// `QwenImageResidualBlock`: norm1, conv1, norm2, conv2, and a 1×1×1 shortcut where the
    /// channels change.
    fn residual(&mut self, p: &str, cin: usize, cout: usize) {
        self.rms_norm(&format!("{p}.norm1"), cin, false);
        self.causal_conv(&format!("{p}.conv1"), cin, cout, [3, 3, 3]);
        self.rms_norm(&format!("{p}.norm2"), cout, false);
        self.causal_conv(&format!("{p}.conv2"), cout, cout, [3, 3, 3]);
        if cin != cout {
            self.causal_conv(&format!("{p}.conv_shortcut"), cin, cout, [1, 1, 1]);
        }
    }

    /// `QwenImageAttentionBlock`: a norm, q, k and v in one 1×1 conv, the output 1×1 conv.
    fn attention(&mut self, p: &str, c: usize) {
        self.rms_norm(&format!("{p}.norm"), c, true);
        self.conv2d(&format!("{p}.to_qkv"), c, 3 * c, 1);
        self.conv2d(&format!("{p}.proj"), c, c, 1);
    }

    /// `QwenImageMidBlock` of one layer: run as residual, attention, residual; its state
    /// dict lists the attentions first (the module's attribute order).
    fn mid_block(&mut self, p: &str, c: usize) {
        self.attention(&format!("{p}.attentions.0"), c);
        self.residual(&format!("{p}.resnets.0"), c, c);
        self.residual(&format!("{p}.resnets.1"), c, c);
    }
}

/// Qwen/Qwen-Image: the 20.4 B DiT (transformer/config.json), Qwen2.5-VL-7B-Instruct's text
/// model as the text encoder (28 layers of 3584, 7.6 B parameters), the VAE of diffusers'
/// defaults (which are Qwen-Image's), and the dynamic-shift scheduler. The tokenizer's
/// special tokens are at Qwen's ids (`<|endoftext|>` 151643, `<|im_start|>`, `<|im_end|>`).
pub(super) fn qwen_image_pipeline() -> PipelinePreset {
    let name = "qwen-image-pipeline";
    let about = "Qwen/Qwen-Image";
    let mut te = qwen25(name, about, (3584, 18944, 28, 28, 4), 1e-6);
    te.config.max_position_embeddings = 128000;
    let specials = SpecialIds::From(151643);
    PipelinePreset {
        name,
        about,
        models: PipelineModels::QwenImage(QwenImageModels {
            text_encoder: with_chat_ids(te, specials),
            specials,
            transformer: dit("qwen-image"),
            vae: default_vae(),
            mrope_section: [16, 24, 24],
            // Qwen2.5-VL-7B's vision tower, as transformers 5 writes its config.
            vision_config: json!({
                "depth": 32,
                "fullatt_block_indexes": [7, 15, 23, 31],
                "hidden_act": "silu",
                "hidden_size": 1280,
                "in_channels": 3,
                "initializer_range": 0.02,
                "intermediate_size": 3420,
                "model_type": "qwen2_5_vl_vision",
                "num_heads": 16,
                "out_hidden_size": 3584,
                "patch_size": 14,
                "rope_parameters": {"rope_theta": 10000.0, "rope_type": "axial"},
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
                "tokens_per_second": 2,
                "window_size": 112,
            }),
        }),
    }
}

/// The shapes of tests/fixtures/qwen-image (the DiT of `qwen-image-tiny` and the VAE of base
/// dim 8) with the text model of tests/fixtures/qwen-image-pipeline (2 layers of 48 = the
/// DiT's joint_attention_dim, 3 heads of 16, 1 kv head), small enough to run on the CPU in
/// tests.
pub(super) fn qwen_image_pipeline_tiny() -> PipelinePreset {
    let name = "qwen-image-pipeline-tiny";
    let mut te = qwen25(name, "tests", (48, 96, 2, 3, 1), 1e-6);
    te.config.vocab_size = 448;
    te.config.max_position_embeddings = 2048;
    let specials = SpecialIds::AfterMerges;
    let vae = QwenVaeConfig {
        base_dim: 8,
        dim_mult: vec![1, 2, 2, 1],
        num_res_blocks: 1,
        ..default_vae()
    };
    PipelinePreset {
        name,
        about: "the shapes of tests/fixtures/qwen-image and qwen-image-pipeline (tests)",
        models: PipelineModels::QwenImage(QwenImageModels {
            text_encoder: with_chat_ids(te, specials),
            specials,
            transformer: dit("qwen-image-tiny"),
            vae,
            mrope_section: [2, 3, 3],
            vision_config: json!({
                "depth": 1,
                "fullatt_block_indexes": [0],
                "hidden_act": "silu",
                "hidden_size": 16,
                "in_channels": 3,
                "initializer_range": 0.02,
                "intermediate_size": 32,
                "model_type": "qwen2_5_vl_vision",
                "num_heads": 2,
                "out_hidden_size": 48,
                "patch_size": 2,
                "rope_parameters": {"rope_theta": 10000.0, "rope_type": "axial"},
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
                "tokens_per_second": 4,
                "window_size": 8,
            }),
        }),
    }
}

fn dit(name: &str) -> DitPreset {
    DitPreset::by_name(name).expect("a DiT preset")
}

/// `AutoencoderKLQwenImage()`'s config: Qwen-Image's VAE.
fn default_vae() -> QwenVaeConfig {
    QwenVaeConfig::from_json(Path::new("vae/config.json"), &json!({}))
        .expect("diffusers' defaults are a valid config")
}
