//! Text to image with Flux.1 as diffusers' `FluxPipeline` runs it, every phase in turn on one
//! device: CLIP's pooled embedding and T5's token embeddings of the prompt (each encoder's
//! weights placed, used once and freed), the modulation of every step made once from the
//! schedule, the guidance scale and the pooled embedding (those weights, a quarter of the
//! DiT's, then never move during the steps), the DiT denoising the packed latents, and the
//! VAE (Flux's AutoencoderKL) decoding them to 8-bit RGB.
//!
//! Flux.1 is guidance-distilled: `--guidance` is the scale the DiT embeds (`guidance_scale`,
//! 3.5 by default for dev; schnell embeds none), one branch a step, and a negative prompt is
//! not used.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::backend::cpu::Cpu;
use crate::backend::encoder::EncoderOps;
use crate::checkpoint::{Component, Pipeline};
use crate::diffuse::flux::{denoise, Denoise};
use crate::diffuse::flux_text::FluxTextEncoders;
use crate::diffuse::packed::{self, VAE_SCALE};
use crate::diffuse::pipeline::{
    decode_kl_on_cpu, decode_kl_on_gpu, place_on_cpu, place_on_gpu, Compute, ImageRequest, Images,
    PhaseTimes, Place, SplitFiles, StreamLog, VaeDecode, VaeDevice,
};
use crate::diffuse::scheduler::FlowMatchConfig;
use crate::error::{Error, Result};
use crate::model::flux::{single_file, unpack_latents, Flux, FluxConfig};
use crate::model::vae::{open_flux_vae_file, open_vae, to_rgb8, VaeWeights};
use crate::model::{Architecture, PassShape};

/// The `_class_name` of model_index.json.
pub const PIPELINE_CLASS: &str = "FluxPipeline";

/// The pipeline's default `num_inference_steps`.
pub const DEFAULT_STEPS: usize = 28;

/// The pipeline's default `guidance_scale`.
pub const DEFAULT_GUIDANCE: f32 = 3.5;

/// The pipeline's default `max_sequence_length`: T5's tokens per prompt, padded.
pub const MAX_SEQUENCE_LENGTH: usize = 512;

/// An opened Flux.1 pipeline: every component checked; each phase's weights are placed per
/// generation, one phase at a time, on the device the phase runs on.
pub struct FluxPipeline {
    /// `text_encoder` (CLIP) and `text_encoder_2` (T5).
    clip_weights: Component,
    t5_weights: Component,
    transformer: Component,
    encoders: FluxTextEncoders,
    /// The DiT of the steps, its modulation taken from a table made once per generation.
    dit: Flux,
    vae_weights: VaeWeights,
    scheduler: FlowMatchConfig,
    pub load_seconds: f64,
}

/// A pipeline's parts as opened, before they are checked against each other.
struct Parts {
    clip_weights: Component,
    t5_weights: Component,
    transformer: Component,
    encoders: FluxTextEncoders,
    config: FluxConfig,
    /// The DiT's config (or file), the VAE's, for errors.
    dit_source: PathBuf,
    vae_weights: VaeWeights,
    vae_source: PathBuf,
    scheduler: FlowMatchConfig,
}

impl FluxPipeline {
    /// The components of an opened diffusers pipeline directory of class
    /// [`PIPELINE_CLASS`], checked against each other (widths, latent channels) and their
    /// tensors.
    pub fn from_pipeline(mut pipeline: Pipeline, start: Instant) -> Result<FluxPipeline> {
        let encoders = FluxTextEncoders::open(&pipeline)?;
        let (config, dit_source) = {
            let tr = pipeline.component("transformer")?;
            let (path, json) = tr.config()?;
            (FluxConfig::from_json(path, json)?, path.to_path_buf())
        };
        let vae_dir = pipeline.component("vae")?.dir.clone();
        let vae_weights = open_vae(&vae_dir)?;
        let sc = pipeline.component("scheduler")?;
        let (path, json) = sc.config()?;
        let scheduler = FlowMatchConfig::from_json(path, json)?;
        let parts = Parts {
            clip_weights: pipeline.take("text_encoder")?,
            t5_weights: pipeline.take("text_encoder_2")?,
            transformer: pipeline.take("transformer")?,
            encoders,
            config,
            dit_source,
            vae_weights,
            vae_source: vae_dir.join("config.json"),
            scheduler,
        };
        Self::assemble(parts, start)
    }

    /// Open ComfyUI's split files of Flux.1 (see [`single_file`]): the DiT, CLIP's and T5's
    /// files (`files.text_encoder`, `text_encoder_2`), the VAE (Flux's `ae.safetensors`),
    /// each file's layout found from its tensor names, with the tokenizers of a Flux.1
    /// pipeline folder (`tokenizer/`, `tokenizer_2/`); the scheduler is FLUX.1-dev's
    /// ([`FlowMatchConfig::flux_dev`]) for a DiT that embeds the guidance scale, else
    /// FLUX.1-schnell's.
    pub fn open_split(files: &SplitFiles<'_>) -> Result<FluxPipeline> {
        let start = Instant::now();
        let t5_file = files.text_encoder_2.ok_or_else(|| Error::Flag {
            flag: "--text-encoder-2",
            message: format!(
                "{} is Flux.1's diffusion model, which needs T5's file too (t5xxl_fp16.safetensors) beside CLIP's --text-encoder",
                files.dit.display()
            ),
        })?;
        let (config, transformer) = single_file::open_dit_file(files.dit)?;
        let (encoders, clip_weights, t5_weights) =
            FluxTextEncoders::open_files(files.text_encoder, t5_file, files.tokenizer)?;
        let scheduler = match config.guidance_embeds {
            true => FlowMatchConfig::flux_dev(),
            false => FlowMatchConfig::flux_schnell(),
        };
        let parts = Parts {
            clip_weights,
            t5_weights,
            transformer,
            encoders,
            config,
            dit_source: files.dit.to_path_buf(),
            vae_weights: open_flux_vae_file(files.vae)?,
            vae_source: files.vae.to_path_buf(),
            scheduler,
        };
        Self::assemble(parts, start)
    }

    /// Check the parts against each other (widths, latent channels) and their tensors.
    fn assemble(p: Parts, start: Instant) -> Result<FluxPipeline> {
        let dit = Flux::precomputed(p.config);
        let c = &dit.config;
        let encoders = p.encoders;
        for (field, want, what, have) in [
            (
                "joint_attention_dim",
                c.joint_attention_dim,
                "T5's d_model",
                encoders.t5.config.d_model,
            ),
            (
                "pooled_projection_dim",
                c.pooled_projection_dim,
                "CLIP's hidden_size",
                encoders.clip.config.hidden_size,
            ),
        ] {
            if want != have {
                return Err(Error::checkpoint(
                    &p.dit_source,
                    format!("{field} {want} does not match the text encoder's {what} {have}"),
                ));
            }
        }
        dit.check_tensors(&p.transformer)?;
        dit.modulation_model().check_tensors(&p.transformer)?;
        p.vae_weights.check()?;
        // The DiT's tokens are 2×2 patches of the latent's channels.
        let z = p.vae_weights.config.latent_channels;
        if dit.config.in_channels != 4 * z {
            return Err(Error::checkpoint(
                &p.vae_source,
                format!(
                    "latent_channels {z} does not match the transformer's in_channels {} (4 · latent_channels: 2×2 patches)",
                    dit.config.in_channels
                ),
            ));
        }
        Ok(FluxPipeline {
            clip_weights: p.clip_weights,
            t5_weights: p.t5_weights,
            transformer: p.transformer,
            encoders,
            dit,
            vae_weights: p.vae_weights,
            scheduler: p.scheduler,
            load_seconds: start.elapsed().as_secs_f64(),
        })
    }

    /// Open a diffusers Flux.1 directory.
    pub fn open(dir: &Path) -> Result<FluxPipeline> {
        let start = Instant::now();
        FluxPipeline::from_pipeline(Pipeline::open(dir)?, start)
    }

    /// Whether the DiT embeds the guidance scale (Flux.1-dev does; schnell does not).
    pub fn embeds_guidance(&self) -> bool {
        self.dit.config.guidance_embeds
    }

    /// The shape of the initial latents of `batch` images of `height × width` pixels, packed
    /// as diffusers' `latents=` takes them: `[batch, (height/16)·(width/16), 64]`.
    pub fn noise_shape(&self, batch: usize, height: usize, width: usize) -> Vec<usize> {
        vec![
            batch,
            packed::image_tokens(height, width),
            self.dit.config.in_channels,
        ]
    }

    /// Generate `request.batch` images on `compute`; `on_step(i)` is called after each
    /// denoising step.
    pub fn generate(
        &self,
        compute: &Compute<'_>,
        request: &ImageRequest,
        on_step: impl FnMut(usize),
    ) -> Result<Images> {
        match *compute {
            Compute::Cpu => self.generate_on(&Cpu, request, on_step, place_on_cpu, |z, shape| {
                decode_kl_on_cpu(&self.vae_weights, z, shape)
            }),
            Compute::Cuda { gpu, stream, vae } => {
                gpu.prepare(self.encoders.clip.config.head_dim())?;
                gpu.prepare_dit(self.dit.config.head_dim())?;
                gpu.prepare_encoder()?;
                let decode = |z: &[f32], shape| match vae {
                    VaeDevice::Gpu => decode_kl_on_gpu(gpu, &self.vae_weights, z, shape),
                    VaeDevice::Cpu => decode_kl_on_cpu(&self.vae_weights, z, shape),
                };
                self.generate_on(gpu, request, on_step, place_on_gpu(gpu, stream), decode)
            }
        }
    }

    /// The phases in turn on `backend` (see [`ZImagePipeline`](super::pipeline::ZImagePipeline)'s
    /// for `place` and `decode`): CLIP, T5, modulation table, steps, VAE.
    fn generate_on<B: EncoderOps>(
        &self,
        backend: &B,
        request: &ImageRequest,
        mut on_step: impl FnMut(usize),
        place: impl Place<B::Weight>,
        decode: impl FnOnce(&[f32], [usize; 4]) -> Result<(Vec<f32>, VaeDecode)>,
    ) -> Result<Images> {
        let r = request;
        let features = self.dit.config.in_channels;
        packed::check_noise(&r.noise, r.batch, r.height, r.width, features)?;
        let schedule = packed::schedule(&self.scheduler, r.steps, r.height, r.width)?;
        let guidance = self.embeds_guidance().then_some(r.guidance);
        let mut times = PhaseTimes {
            load: self.load_seconds,
            ..PhaseTimes::default()
        };
        let mut streamed = Vec::new();

        // Text encoders: CLIP's pooled embedding, then T5's tokens, each phase's weights
        // freed before the next are placed.
        let t = Instant::now();
        let e = &self.encoders;
        let clip_ids = vec![e.clip_tokens(&r.prompt)?];
        let t5_ids = vec![e.t5_tokens(&r.prompt, MAX_SEQUENCE_LENGTH)?];
        let pooled = {
            let mut log = StreamLog::default();
            let shape = e.clip_shape(1);
            let mut weights = place(&self.clip_weights, &e.clip, &[], shape, &mut log)?;
            let pooled = e.encode_clip_pooled(backend, &mut weights, &clip_ids)?;
            drop(weights);
            streamed.extend(log.finish("text encoder (CLIP)"));
            pooled.into_iter().next().expect("one prompt")
        };
        let text = {
            let mut log = StreamLog::default();
            let shape = FluxTextEncoders::t5_shape(MAX_SEQUENCE_LENGTH, 1);
            let mut weights = place(&self.t5_weights, &e.t5, &[], shape, &mut log)?;
            let text = e.encode_t5(backend, &mut weights, &t5_ids)?;
            drop(weights);
            streamed.extend(log.finish("text encoder (T5)"));
            text.into_iter().next().expect("one prompt")
        };
        times.text_encoder = t.elapsed().as_secs_f64();

        let t = Instant::now();
        // Every step's modulation in one pass over those weights.
        let modulation = {
            let model = self.dit.modulation_model();
            let sigmas = packed::model_times(&schedule);
            let shape = PassShape {
                tokens: 1,
                batch: sigmas.len(),
                past: 0,
            };
            let mut log = StreamLog::default();
            let mut weights = place(&self.transformer, &model, &[&self.dit], shape, &mut log)?;
            let table = model.table(backend, &mut weights, &sigmas, guidance, &[&pooled])?;
            drop(weights);
            streamed.extend(log.finish("modulation"));
            table
        };
        let texts = vec![text.as_slice(); r.batch];
        let pooled_all = vec![pooled.as_slice(); r.batch];
        let shape = PassShape {
            tokens: packed::image_tokens(r.height, r.width) + MAX_SEQUENCE_LENGTH,
            batch: r.batch,
            past: 0,
        };
        let mut log = StreamLog::default();
        let mut weights = place(&self.transformer, &self.dit, &[], shape, &mut log)?;
        let job = Denoise {
            latents: r.noise.clone(),
            batch: r.batch,
            height: r.height,
            width: r.width,
            texts: &texts,
            pooled: &pooled_all,
            guidance,
            modulation: Some(&modulation),
        };
        let latents = denoise(backend, &self.dit, &mut weights, &schedule, job, |i, _| {
            on_step(i)
        })?;
        drop(weights);
        streamed.extend(log.finish("denoise"));
        times.denoise = t.elapsed().as_secs_f64();

        let t = Instant::now();
        let (h, w) = (r.height / VAE_SCALE, r.width / VAE_SCALE);
        let z = self.vae_weights.config.latent_channels;
        let latents = unpack_latents(&latents, r.batch, z, h, w);
        let (image, vae) = decode(&latents, [r.batch, z, h, w])?;
        let rgb = to_rgb8(&image, [r.batch, 3, r.height, r.width]);
        times.vae = t.elapsed().as_secs_f64();
        // The prompt's own T5 tokens, its end included (the rest are padding).
        let pad = e.t5_tokenizer.pad;
        Ok(Images {
            rgb: rgb
                .chunks(r.height * r.width * 3)
                .map(<[u8]>::to_vec)
                .collect(),
            times,
            prompt_tokens: t5_ids[0].iter().filter(|&&id| id != pad).count(),
            negative_tokens: 0,
            streamed,
            vae,
        })
    }
}
