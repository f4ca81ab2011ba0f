//! Flux.1 pipelines with random weights (`FluxPipeline`), the models that
//! [`PipelinePreset`](super::PipelinePreset) writes for them: the DiT of a [`DitPreset`], CLIP-L's
//! text model (`text_encoder`, `CLIPTextModel`, its tensors under `text_model.` as
//! FLUX.1-dev has them), T5-XXL v1.1's encoder (`text_encoder_2`, `T5EncoderModel`), Flux's
//! `AutoencoderKL`, FLUX.1-dev's scheduler, and the two small synthetic tokenizers
//! ([`ClipBpe`], [`T5Unigram`]) in the files FLUX.1-dev ships.

use serde_json::{json, Value};

use super::diffusers::{flux_vae, tiny_flux_vae, PipelineModels, PipelinePreset, VaeShape};
use super::dit::DitPreset;
use super::tokenizer::{ClipBpe, T5Unigram};
use crate::checkpoint::DType;
use crate::model::clip::{ClipText, ClipTextConfig, PREFIXES};
use crate::model::t5::{T5Config, T5Encoder, EMBED_NAMES};
use crate::model::Architecture;

/// The transformers version whose config layout the text encoders' config.json files have.
const TRANSFORMERS_VERSION: &str = "5.24.0";

/// A Flux.1 pipeline's models.
#[derive(Clone, Debug, PartialEq)]
pub struct FluxModels {
    /// The DiT; its `joint_attention_dim` is T5's d_model, its `pooled_projection_dim`
    /// CLIP's hidden size.
    pub transformer: DitPreset,
    /// `text_encoder`: CLIP's text model, `eos_token_id` 2 (the legacy id: the pooled row is
    /// the largest id's, the tokenizer's `<|endoftext|>`).
    pub clip: ClipTextConfig,
    /// `text_encoder_2`: T5's encoder.
    pub t5: T5Config,
    pub vae: VaeShape,
}

impl FluxModels {
    /// text_encoder/config.json as FLUX.1-dev's (openai/clip-vit-large-patch14's text
    /// config): bos 0, eos 2, pad 1, the legacy ids.
    pub fn clip_config(&self, preset: &str, dtype: DType) -> Value {
        let c = &self.clip;
        json!({
            "architectures": ["CLIPTextModel"],
            "attention_dropout": 0.0,
            "bos_token_id": 0,
            "dropout": 0.0,
            "dtype": dtype_name(dtype),
            "eos_token_id": c.eos_token_id,
            "ferry_synthetic": {"preset": preset},
            "hidden_act": "quick_gelu",
            "hidden_size": c.hidden_size,
            "initializer_factor": 1.0,
            "initializer_range": 0.02,
            "intermediate_size": c.intermediate_size,
            "layer_norm_eps": c.layer_norm_eps,
            "max_position_embeddings": c.max_position_embeddings,
            "model_type": "clip_text_model",
            "num_attention_heads": c.num_attention_heads,
            "num_hidden_layers": c.num_hidden_layers,
            "pad_token_id": 1,
            "projection_dim": c.hidden_size,
            "transformers_version": TRANSFORMERS_VERSION,
            "vocab_size": c.vocab_size,
        })
    }

    /// text_encoder_2/config.json as FLUX.1-dev's (google/t5-v1_1-xxl's encoder).
    pub fn t5_config(&self, preset: &str, dtype: DType) -> Value {
        let c = &self.t5;
        json!({
            "architectures": ["T5EncoderModel"],
            "classifier_dropout": 0.0,
            "d_ff": c.d_ff,
            "d_kv": c.d_kv,
            "d_model": c.d_model,
            "decoder_start_token_id": 0,
            "dense_act_fn": "gelu_new",
            "dropout_rate": 0.1,
            "dtype": dtype_name(dtype),
            "eos_token_id": 1,
            "feed_forward_proj": "gated-gelu",
            "ferry_synthetic": {"preset": preset},
            "initializer_factor": 1.0,
            "is_encoder_decoder": true,
            "is_gated_act": true,
            "layer_norm_epsilon": c.layer_norm_epsilon,
            "model_type": "t5",
            "num_decoder_layers": c.num_layers,
            "num_heads": c.num_heads,
            "num_layers": c.num_layers,
            "pad_token_id": 0,
            "relative_attention_max_distance": c.relative_attention_max_distance,
            "relative_attention_num_buckets": c.relative_attention_num_buckets,
            "tie_word_embeddings": false,
            "transformers_version": TRANSFORMERS_VERSION,
            "use_cache": true,
            "vocab_size": c.vocab_size,
        })
    }

    /// scheduler/scheduler_config.json: FLUX.1-dev's (a shift that grows with the image,
    /// from 0.5 at 256 tokens to 1.15 at 4096).
    pub fn scheduler_config(&self) -> Value {
        json!({
            "_class_name": "FlowMatchEulerDiscreteScheduler",
            "_diffusers_version": super::DIFFUSERS_VERSION,
            "base_image_seq_len": 256,
            "base_shift": 0.5,
            "max_image_seq_len": 4096,
            "max_shift": 1.15,
            "num_train_timesteps": 1000,
            "shift": 3.0,
            "use_dynamic_shifting": true,
        })
    }

    /// CLIP's tensors in pass order, named `text_model.…`.
    pub fn clip_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let model = ClipText::new(self.clip.clone(), PREFIXES[0]);
        specs(model.groups())
    }

    /// T5's tensors in pass order, its token embedding `shared.weight`.
    pub fn t5_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let model = T5Encoder::new(self.t5.clone(), EMBED_NAMES[0]);
        specs(model.groups())
    }

    /// tokenizer/: the CLIP BPE, its config saying what it is.
    pub(super) fn clip_tokenizer(&self, preset: &str) -> ClipBpe {
        let mut t = ClipBpe::new(self.clip.max_position_embeddings);
        let description = format!(
            "Not CLIP's tokenizer: a small CLIP BPE made by ferry synth (the 256 bytes with and \
             without </w>, merges learned from a few image prompts, <|startoftext|>, \
             <|endoftext|>); {} ids, all below the text encoder's vocab_size {}.",
            t.len, self.clip.vocab_size
        );
        t.config["ferry_synthetic"] = json!({"preset": preset, "description": description});
        t
    }

    /// tokenizer_2/: the T5 Unigram, its config saying what it is.
    pub(super) fn t5_tokenizer(&self, preset: &str) -> T5Unigram {
        let mut t = T5Unigram::new(crate::diffuse::flux_text::T5_MAX_SEQUENCE_LENGTH);
        let description = format!(
            "Not T5's tokenizer: a small Unigram made by ferry synth (<pad>, </s>, <unk>, the \
             printable ASCII characters, the words of a few image prompts); {} ids, all below \
             the text encoder's vocab_size {}.",
            t.len, self.t5.vocab_size
        );
        t.config["ferry_synthetic"] = json!({"preset": preset, "description": description});
        t
    }
}

fn specs(groups: &[crate::model::WeightGroup]) -> Vec<(String, Vec<usize>)> {
    groups
        .iter()
        .flat_map(|g| &g.tensors)
        .map(|t| (t.name.clone(), t.shape.clone()))
        .collect()
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "float32",
        _ => "bfloat16",
    }
}

/// black-forest-labs/FLUX.1-dev: the 11.9 B DiT (`flux.1-dev`), CLIP-L's text model (0.12 B),
/// T5-XXL v1.1's encoder (4.76 B), Flux's VAE, the dynamic-shift scheduler.
pub(super) fn flux_dev_pipeline() -> PipelinePreset {
    PipelinePreset {
        name: "flux.1-dev-pipeline",
        about: "black-forest-labs/FLUX.1-dev",
        models: PipelineModels::Flux(FluxModels {
            transformer: DitPreset::by_name("flux.1-dev").expect("a DiT preset"),
            clip: ClipTextConfig {
                vocab_size: 49408,
                hidden_size: 768,
                intermediate_size: 3072,
                num_hidden_layers: 12,
                num_attention_heads: 12,
                max_position_embeddings: 77,
                layer_norm_eps: 1e-5,
                eos_token_id: 2,
            },
            t5: T5Config {
                vocab_size: 32128,
                d_model: 4096,
                d_kv: 64,
                d_ff: 10240,
                num_layers: 24,
                num_heads: 64,
                relative_attention_num_buckets: 32,
                relative_attention_max_distance: 128,
                layer_norm_epsilon: 1e-6,
            },
            vae: flux_vae(),
        }),
    }
}

/// The shapes of tests/fixtures/flux-pipeline (CLIP and T5 of width 32, a DiT of 1 double and
/// 2 single blocks of 2 heads × 16, the VAE of 8–16 channels), small enough to run on the CPU
/// in tests.
pub(super) fn flux_pipeline_tiny() -> PipelinePreset {
    let name = "flux-pipeline-tiny";
    PipelinePreset {
        name,
        about: "the shapes of tests/fixtures/flux-pipeline (tests)",
        models: PipelineModels::Flux(FluxModels {
            transformer: super::dit::flux_pipeline_tiny_dit(name),
            clip: ClipTextConfig {
                vocab_size: 1024,
                hidden_size: 32,
                intermediate_size: 48,
                num_hidden_layers: 2,
                num_attention_heads: 2,
                max_position_embeddings: 77,
                layer_norm_eps: 1e-5,
                eos_token_id: 2,
            },
            t5: T5Config {
                vocab_size: 512,
                d_model: 32,
                d_kv: 8,
                d_ff: 48,
                num_layers: 2,
                num_heads: 4,
                relative_attention_num_buckets: 32,
                relative_attention_max_distance: 128,
                layer_norm_epsilon: 1e-6,
            },
            vae: tiny_flux_vae(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// The configs written parse back to the shapes, and the tokenizers fit the vocabularies.
    #[test]
    fn configs_round_trip_and_tokenizers_fit() {
        for p in [flux_pipeline_tiny(), flux_dev_pipeline()] {
            let PipelineModels::Flux(f) = &p.models else {
                unreachable!()
            };
            let path = Path::new("config.json");
            let clip = ClipTextConfig::from_json(path, &f.clip_config(p.name, DType::BF16));
            assert_eq!(clip.unwrap(), f.clip);
            let t5 = T5Config::from_json(path, &f.t5_config(p.name, DType::BF16));
            assert_eq!(t5.unwrap(), f.t5);
            assert!(f.clip_tokenizer(p.name).len <= f.clip.vocab_size);
            assert!(f.t5_tokenizer(p.name).len <= f.t5.vocab_size);
        }
    }
}
