//! Text to image with Qwen-Image as diffusers' `QwenImagePipeline` runs it, every phase in
//! turn on one device: the Qwen2.5-VL text encoder embeds the prompt (and the negative
//! prompt when guiding) in one pass, the modulation of every step is made once from the
//! schedule (those weights, a third of the DiT's, then never move during the steps), the DiT
//! denoises the packed latents with both guidance branches in each pass, and the VAE decodes
//! them to 8-bit RGB.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::backend::cpu::Cpu;
use crate::backend::cuda::{Cuda, IMAGE_MEMORY};
use crate::backend::dit::DitOps;
use crate::checkpoint::{Component, Pipeline};
use crate::diffuse::guidance::TrueCfg;
use crate::diffuse::pipeline::{
    gpu_vae_plan, place_on_cpu, place_on_gpu, Compute, ImageRequest, Images, PhaseTimes, Place,
    SplitFiles, StreamLog, VaeDecode, VaeDevice,
};
use crate::diffuse::qwen_image::{self as steps, Denoise, VAE_SCALE};
use crate::diffuse::qwen_text_encoder::{QwenImageTextEncoder, MAX_SEQUENCE_LENGTH};
use crate::diffuse::scheduler::FlowMatchConfig;
use crate::error::{Error, Result};
use crate::generate::TextCodec;
use crate::model::qwen_image::single_file;
use crate::model::qwen_image::vae::{open_qwen_vae, QwenVae, QwenVaeWeights};
use crate::model::qwen_image::{unpack_latents, QwenImage, QwenImageConfig};
use crate::model::vae::{to_rgb8, Tiling};
use crate::model::{Architecture, PassShape};

/// The `_class_name` of model_index.json.
pub const PIPELINE_CLASS: &str = "QwenImagePipeline";

/// The pipeline's default `true_cfg_scale` (guidance runs only with a negative prompt).
pub const DEFAULT_TRUE_CFG: f32 = 4.0;

/// The pipeline's default `num_inference_steps`.
pub const DEFAULT_STEPS: usize = 50;

/// An opened Qwen-Image pipeline: every component checked; each phase's weights are placed
/// per generation, one phase at a time, on the device the phase runs on.
pub struct QwenImagePipeline {
    text_encoder: Component,
    transformer: Component,
    encoder: QwenImageTextEncoder,
    /// The DiT of the steps, its modulation taken from a table made once per generation.
    dit: QwenImage,
    vae_weights: QwenVaeWeights,
    scheduler: FlowMatchConfig,
    pub load_seconds: f64,
}

/// A pipeline's parts as opened, before they are checked against each other.
struct Parts {
    text_encoder: Component,
    encoder: QwenImageTextEncoder,
    transformer: Component,
    config: QwenImageConfig,
    /// The DiT's config (or file), the VAE's, for errors.
    dit_source: PathBuf,
    vae_weights: QwenVaeWeights,
    vae_source: PathBuf,
    scheduler: FlowMatchConfig,
}

impl QwenImagePipeline {
    /// The components of an opened diffusers pipeline directory of class
    /// [`PIPELINE_CLASS`], checked against each other (widths, latent channels) and their
    /// tensors.
    pub fn from_pipeline(mut pipeline: Pipeline, start: Instant) -> Result<QwenImagePipeline> {
        let encoder = QwenImageTextEncoder::open(&pipeline)?;
        let (config, dit_source) = {
            let tr = pipeline.component("transformer")?;
            let (path, json) = tr.config()?;
            (QwenImageConfig::from_json(path, json)?, path.to_path_buf())
        };
        let vae_dir = pipeline.component("vae")?.dir.clone();
        let vae_weights = open_qwen_vae(&vae_dir)?;
        let sc = pipeline.component("scheduler")?;
        let (path, json) = sc.config()?;
        let scheduler = FlowMatchConfig::from_json(path, json)?;
        let parts = Parts {
            text_encoder: pipeline.take("text_encoder")?,
            encoder,
            transformer: pipeline.take("transformer")?,
            config,
            dit_source,
            vae_weights,
            vae_source: vae_dir.join("config.json"),
            scheduler,
        };
        Self::assemble(parts, start)
    }

    /// Open ComfyUI's split files of Qwen-Image (see [`single_file`]): the DiT, the
    /// Qwen2.5-VL text encoder and the VAE, each file's layout found from its tensor names,
    /// with a tokenizer from elsewhere (a `tokenizer.json`, or a folder with Qwen/Qwen-Image's
    /// `tokenizer/` files, or the pipeline folder holding it); the scheduler is Qwen-Image's
    /// ([`FlowMatchConfig::qwen_image`]).
    pub fn open_split(files: &SplitFiles<'_>) -> Result<QwenImagePipeline> {
        let start = Instant::now();
        let t = files.tokenizer;
        let text = match t.is_dir() {
            true if t.join("tokenizer").is_dir() => {
                TextCodec::from_tokenizer_dir(&t.join("tokenizer"))?
            }
            true => TextCodec::from_tokenizer_dir(t)?,
            false => TextCodec::from_tokenizer_file(t)?,
        };
        let (encoder, text_encoder) = QwenImageTextEncoder::open_file(files.text_encoder, text)?;
        let (config, transformer) = single_file::open_dit_file(files.dit)?;
        let parts = Parts {
            text_encoder,
            encoder,
            transformer,
            config,
            dit_source: files.dit.to_path_buf(),
            vae_weights: single_file::open_vae_file(files.vae)?,
            vae_source: files.vae.to_path_buf(),
            scheduler: FlowMatchConfig::qwen_image(),
        };
        Self::assemble(parts, start)
    }

    /// Check the parts against each other (widths, latent channels) and their tensors.
    fn assemble(p: Parts, start: Instant) -> Result<QwenImagePipeline> {
        let dit = QwenImage::precomputed(p.config);
        let hidden = p.encoder.model.config.hidden_size;
        if dit.config.joint_attention_dim != hidden {
            return Err(Error::checkpoint(
                &p.dit_source,
                format!(
                    "joint_attention_dim {} does not match the text encoder's hidden_size {hidden}",
                    dit.config.joint_attention_dim
                ),
            ));
        }
        dit.check_tensors(&p.transformer)?;
        dit.modulation_model().check_tensors(&p.transformer)?;
        p.vae_weights.check()?;
        // The DiT's tokens are 2×2 patches of the latent's channels.
        let z = p.vae_weights.config.latent_channels();
        if dit.config.in_channels != 4 * z {
            return Err(Error::checkpoint(
                &p.vae_source,
                format!(
                    "z_dim {z} does not match the transformer's in_channels {} (4 · z_dim: 2×2 patches)",
                    dit.config.in_channels
                ),
            ));
        }
        Ok(QwenImagePipeline {
            text_encoder: p.text_encoder,
            transformer: p.transformer,
            encoder: p.encoder,
            dit,
            vae_weights: p.vae_weights,
            scheduler: p.scheduler,
            load_seconds: start.elapsed().as_secs_f64(),
        })
    }

    /// Open a diffusers Qwen-Image directory.
    pub fn open(dir: &Path) -> Result<QwenImagePipeline> {
        let start = Instant::now();
        QwenImagePipeline::from_pipeline(Pipeline::open(dir)?, start)
    }

    /// The shape of the initial latents of `batch` images of `height × width` pixels, packed
    /// as diffusers' `latents=` takes them: `[batch, (height/16)·(width/16), 64]`.
    pub fn noise_shape(&self, batch: usize, height: usize, width: usize) -> Vec<usize> {
        vec![
            batch,
            steps::image_tokens(height, width),
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
                let vae = QwenVae::load(&Cpu, &self.vae_weights)?;
                Ok((vae.decode(&Cpu, z, shape, Tiling::Whole)?, VaeDecode::CPU))
            }),
            Compute::Cuda { gpu, stream, vae } => {
                gpu.prepare(self.encoder.model.config.head_dim)?;
                gpu.prepare_dit(self.dit.config.head_dim())?;
                let decode = |z: &[f32], shape| match vae {
                    VaeDevice::Gpu => self.decode_on_gpu(gpu, z, shape),
                    VaeDevice::Cpu => {
                        let vae = QwenVae::load(&Cpu, &self.vae_weights)?;
                        Ok((vae.decode(&Cpu, z, shape, Tiling::Whole)?, VaeDecode::CPU))
                    }
                };
                self.generate_on(gpu, request, on_step, place_on_gpu(gpu, stream), decode)
            }
        }
    }

    /// The phases in turn on `backend` (see [`ZImagePipeline`](super::pipeline::ZImagePipeline)'s
    /// for `place` and `decode`): text encoder, modulation table, steps, VAE.
    fn generate_on<B: DitOps>(
        &self,
        backend: &B,
        request: &ImageRequest,
        mut on_step: impl FnMut(usize),
        place: impl Place<B::Weight>,
        decode: impl FnOnce(&[f32], [usize; 4]) -> Result<(Vec<f32>, VaeDecode)>,
    ) -> Result<Images> {
        let r = request;
        let features = self.dit.config.in_channels;
        steps::check_noise(&r.noise, r.batch, r.height, r.width, features)?;
        let schedule = steps::schedule(&self.scheduler, r.steps, r.height, r.width)?;
        let guidance = TrueCfg { scale: r.guidance };
        let mut times = PhaseTimes {
            load: self.load_seconds,
            ..PhaseTimes::default()
        };
        let mut streamed = Vec::new();

        // Text encoder: the prompt and (when guiding) the negative prompt in one pass.
        let t = Instant::now();
        let negative = r
            .negative_prompt
            .as_deref()
            .filter(|_| guidance.applies(r.negative_prompt.is_some()));
        let mut ids = vec![self.encoder.tokens(&r.prompt, MAX_SEQUENCE_LENGTH)?];
        if let Some(n) = negative {
            ids.push(self.encoder.tokens(n, MAX_SEQUENCE_LENGTH)?);
        }
        let embeds = {
            let shape = PassShape {
                tokens: ids.iter().map(Vec::len).max().unwrap_or(0),
                batch: ids.len(),
                past: 0,
            };
            let mut log = StreamLog::default();
            let mut weights = place(
                &self.text_encoder,
                &self.encoder.model,
                &[],
                shape,
                &mut log,
            )?;
            let embeds = self.encoder.encode_tokens(backend, &mut weights, &ids)?;
            drop(weights);
            streamed.extend(log.finish("text encoder"));
            embeds
        };
        times.text_encoder = t.elapsed().as_secs_f64();

        let t = Instant::now();
        // Every step's modulation in one pass over those weights.
        let modulation = {
            let model = self.dit.modulation_model();
            let sigmas = steps::model_times(&schedule);
            let shape = PassShape {
                tokens: 1,
                batch: sigmas.len(),
                past: 0,
            };
            let mut log = StreamLog::default();
            let mut weights = place(&self.transformer, &model, &[&self.dit], shape, &mut log)?;
            let table = model.table(backend, &mut weights, &sigmas)?;
            drop(weights);
            streamed.extend(log.finish("modulation"));
            table
        };
        // Each image of the batch has the prompt's embedding (and the negative's).
        let prompts = vec![embeds.prompt(0); r.batch];
        let negatives = negative.map(|_| vec![embeds.prompt(1); r.batch]);
        let samples = r.batch * if negatives.is_some() { 2 } else { 1 };
        let image_tokens = steps::image_tokens(r.height, r.width);
        let longest_text = embeds.lengths.iter().copied().max().unwrap_or(0);
        let shape = PassShape {
            tokens: image_tokens + longest_text,
            batch: samples,
            past: 0,
        };
        let mut log = StreamLog::default();
        let mut weights = place(&self.transformer, &self.dit, &[], shape, &mut log)?;
        let job = Denoise {
            latents: r.noise.clone(),
            batch: r.batch,
            height: r.height,
            width: r.width,
            prompts: &prompts,
            negatives: negatives.as_deref(),
            guidance,
            modulation: Some(&modulation),
        };
        let packed = steps::denoise(backend, &self.dit, &mut weights, &schedule, job, |i, _| {
            on_step(i)
        })?;
        drop(weights);
        streamed.extend(log.finish("denoise"));
        times.denoise = t.elapsed().as_secs_f64();

        let t = Instant::now();
        let (h, w) = (r.height / VAE_SCALE, r.width / VAE_SCALE);
        let z = self.vae_weights.config.latent_channels();
        let latents = unpack_latents(&packed, r.batch, z, h, w);
        let (image, vae) = decode(&latents, [r.batch, z, h, w])?;
        let rgb = to_rgb8(&image, [r.batch, 3, r.height, r.width]);
        times.vae = t.elapsed().as_secs_f64();
        Ok(Images {
            rgb: rgb
                .chunks(r.height * r.width * 3)
                .map(<[u8]>::to_vec)
                .collect(),
            times,
            prompt_tokens: embeds.lengths[0],
            negative_tokens: embeds.lengths.get(1).copied().unwrap_or(0),
            streamed,
            vae,
        })
    }

    /// Decode on the GPU within what the budget leaves ([`gpu_vae_plan`]).
    fn decode_on_gpu(
        &self,
        gpu: &Cuda,
        latents: &[f32],
        shape: [usize; 4],
    ) -> Result<(Vec<f32>, VaeDecode)> {
        let [_, _, h, w] = shape;
        let m = IMAGE_MEMORY;
        let config = &self.vae_weights.config;
        let weights = self.vae_weights.decoder_bytes(m.element_bytes)?;
        let report = gpu_vae_plan(gpu, [h, w], config.scale_factor(), weights, |h, w| {
            config.decode_peak_bytes(h, w, m)
        })?;
        let vae = QwenVae::load(gpu, &self.vae_weights)?;
        Ok((vae.decode(gpu, latents, shape, report.tiling)?, report))
    }
}
