//! Text to image, every phase in turn on one device: the text encoder embeds the prompt (and
//! the negative prompt when guiding), the DiT denoises the latents step by step, the VAE
//! decodes them, and the images come out as 8-bit RGB. [`ImagePipeline`] opens a diffusers
//! directory of any model ferry runs (Z-Image, [`ZImagePipeline`] here; Qwen-Image,
//! [`QwenImagePipeline`]; Flux.1, [`FluxPipeline`]) by its `model_index.json` class; the types around a generation
//! (request, compute, images, streaming reports) are shared.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::backend::cpu::{Cpu, CpuWeight};
use crate::backend::cuda::streaming::PassStats;
use crate::backend::cuda::{Cuda, CudaWeight};
use crate::backend::cuda::{DRIVER_RESERVE, IMAGE_MEMORY};
use crate::backend::dit::DitOps;
use crate::backend::Backend;
use crate::checkpoint::{Component, Pipeline};
use crate::diffuse::flux_pipeline::FluxPipeline;
use crate::diffuse::guidance::{Guidance, TrueCfg};
use crate::diffuse::qwen_image_pipeline::QwenImagePipeline;
use crate::diffuse::scheduler::{z_image_sigmas, FlowMatchConfig};
use crate::diffuse::text_encoder::TextEncoder;
use crate::diffuse::z_image::{denoise, Denoise};
use crate::error::{Error, Result};
use crate::generate::TextCodec;
use crate::model::vae::{
    choose_tiling_by, open_flux_vae_file, open_vae, to_rgb8, Tiling, Vae, VaeWeights, MIN_TILE,
};
use crate::model::z_image::{open_dit_file, padded, ZImage, ZImageConfig};
use crate::model::{Architecture, PassShape, ResidentWeights, Weights};
use crate::runtime::{stream_weights, StreamOptions, StreamSetup};
use crate::stream::human_bytes;

/// Latent pixels per image pixel along each side (the VAE's 8) times the DiT's patch (2):
/// sizes must be multiples of this.
pub const SIZE_MULTIPLE: usize = 16;

/// One generation's settings.
#[derive(Clone, Debug)]
pub struct ImageRequest {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub batch: usize,
    /// The pipeline's guidance scale: Z-Image's `guidance_scale` (guides when > 0),
    /// Qwen-Image's `true_cfg_scale` (guides when > 1 and a negative prompt is given).
    pub guidance: f32,
    /// Initial latents in the pipeline's layout ([`ImagePipeline::noise_shape`]), f32,
    /// row-major.
    pub noise: Vec<f32>,
}

/// Seconds each phase took.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct PhaseTimes {
    pub load: f64,
    pub text_encoder: f64,
    pub denoise: f64,
    pub vae: f64,
}

/// The images of a generation, `[batch][height · width · 3]` 8-bit RGB.
pub struct Images {
    pub rgb: Vec<Vec<u8>>,
    pub times: PhaseTimes,
    /// Caption tokens of the prompt (and of the negative prompt).
    pub prompt_tokens: usize,
    pub negative_tokens: usize,
    /// What streaming did in each phase that streamed (`--vram`).
    pub streamed: Vec<PhaseStream>,
    pub vae: VaeDecode,
}

/// How the VAE decoded: where, whole or in tiles, and on the GPU the memory it was planned
/// with.
#[derive(Clone, Copy, Debug)]
pub struct VaeDecode {
    /// "cpu" or "cuda".
    pub device: &'static str,
    pub tiling: Tiling,
    /// On the GPU: the decoder's weights, and the estimated peak of activations of the whole
    /// image or of one tile ([`VaeConfig::decode_peak_bytes`](crate::model::vae::VaeConfig::decode_peak_bytes)), bytes.
    pub weight_bytes: Option<usize>,
    pub activation_bytes: Option<usize>,
}

impl VaeDecode {
    pub(crate) const CPU: VaeDecode = VaeDecode {
        device: "cpu",
        tiling: Tiling::Whole,
        weight_bytes: None,
        activation_bytes: None,
    };
}

/// Where the VAE decodes when the other phases run on the GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VaeDevice {
    /// On the GPU too, within what the budget leaves: whole, or in tiles when the whole
    /// image's activations would not fit.
    Gpu,
    /// On the CPU (f32), leaving the GPU's memory to the other phases.
    Cpu,
}

/// One streamed phase: its plan, and every pass's statistics (a denoising step is a pass).
pub struct PhaseStream {
    pub phase: &'static str,
    pub plan: String,
    pub passes: Vec<PassStats>,
}

/// Where a generation computes.
pub enum Compute<'a> {
    /// f32 on the CPU, every weight resident.
    Cpu,
    /// bf16 on a GPU. With `stream` (a `--vram` budget), each phase's weights are planned
    /// within the budget and what does not fit streams from host memory; the text encoder's
    /// are freed before the DiT's are placed. Without, each phase is uploaded whole.
    Cuda {
        gpu: &'a Cuda,
        stream: Option<StreamOptions>,
        vae: VaeDevice,
    },
}

impl Compute<'_> {
    pub fn name(&self) -> String {
        match self {
            Compute::Cpu => "cpu".into(),
            Compute::Cuda { gpu, .. } => gpu.info().to_string(),
        }
    }
}

/// An opened image pipeline of any model ferry runs.
pub enum ImagePipeline {
    ZImage(Box<ZImagePipeline>),
    QwenImage(Box<QwenImagePipeline>),
    Flux(Box<FluxPipeline>),
}

/// The pipeline classes [`ImagePipeline::open`] takes.
const PIPELINE_CLASSES: &str = "\"ZImagePipeline\", \"QwenImagePipeline\" or \"FluxPipeline\"";

/// What a generation uses when the request does not say: the pipeline's own defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ImageDefaults {
    pub steps: usize,
    /// [`ImageRequest::guidance`].
    pub guidance: f32,
}

impl ImagePipeline {
    /// Open a diffusers pipeline directory by its `model_index.json` class.
    pub fn open(dir: &Path) -> Result<ImagePipeline> {
        let start = Instant::now();
        if !Pipeline::is_pipeline(dir) {
            return Err(Error::NotFound {
                path: dir.join("model_index.json"),
                expected: format!("a diffusers pipeline directory ({PIPELINE_CLASSES}: model_index.json with transformer/, text_encoder/, tokenizer/, vae/, scheduler/)"),
            });
        }
        let pipeline = Pipeline::open(dir)?;
        match pipeline.class_name.as_str() {
            "ZImagePipeline" => {
                ZImagePipeline::open(dir).map(|p| ImagePipeline::ZImage(Box::new(p)))
            }
            crate::diffuse::qwen_image_pipeline::PIPELINE_CLASS => {
                QwenImagePipeline::from_pipeline(pipeline, start)
                    .map(|p| ImagePipeline::QwenImage(Box::new(p)))
            }
            crate::diffuse::flux_pipeline::PIPELINE_CLASS => {
                FluxPipeline::from_pipeline(pipeline, start)
                    .map(|p| ImagePipeline::Flux(Box::new(p)))
            }
            other => Err(Error::checkpoint(
                dir.join("model_index.json"),
                format!("pipeline class {other:?} is not supported; expected {PIPELINE_CLASSES}"),
            )),
        }
    }

    /// The model's name ("Z-Image", "Qwen-Image", "Flux.1").
    pub fn model_name(&self) -> &'static str {
        match self {
            ImagePipeline::ZImage(_) => "Z-Image",
            ImagePipeline::QwenImage(_) => "Qwen-Image",
            ImagePipeline::Flux(_) => "Flux.1",
        }
    }

    /// Steps and guidance when not given: Z-Image-Turbo's 8 steps without guidance;
    /// Qwen-Image's pipeline defaults (50 steps, `true_cfg_scale` 4, which guides only with
    /// a negative prompt); Flux.1's (28 steps, the embedded `guidance_scale` 3.5).
    pub fn defaults(&self) -> ImageDefaults {
        match self {
            ImagePipeline::ZImage(_) => ImageDefaults {
                steps: 8,
                guidance: 0.0,
            },
            ImagePipeline::QwenImage(_) => ImageDefaults {
                steps: crate::diffuse::qwen_image_pipeline::DEFAULT_STEPS,
                guidance: crate::diffuse::qwen_image_pipeline::DEFAULT_TRUE_CFG,
            },
            ImagePipeline::Flux(_) => ImageDefaults {
                steps: crate::diffuse::flux_pipeline::DEFAULT_STEPS,
                guidance: crate::diffuse::flux_pipeline::DEFAULT_GUIDANCE,
            },
        }
    }

    /// Whether a request with guidance `scale` and `negative` (a negative prompt given or
    /// not) runs both branches (Flux.1, guidance-distilled, never does: it embeds the scale).
    pub fn guides(&self, scale: f32, negative: bool) -> bool {
        match self {
            ImagePipeline::ZImage(_) => scale > 0.0,
            ImagePipeline::QwenImage(_) => TrueCfg { scale }.applies(negative),
            ImagePipeline::Flux(_) => false,
        }
    }

    /// The shape of the initial latents of `batch` images of `height × width` pixels, the
    /// layout of `--noise` and of diffusers' `latents=` for this pipeline: Z-Image's
    /// `[batch, 16, height/8, width/8]`, Qwen-Image's and Flux.1's packed `[batch,
    /// (height/16)·(width/16), 64]`.
    pub fn noise_shape(&self, batch: usize, height: usize, width: usize) -> Vec<usize> {
        match self {
            ImagePipeline::ZImage(p) => vec![batch, p.latent_channels(), height / 8, width / 8],
            ImagePipeline::QwenImage(p) => p.noise_shape(batch, height, width),
            ImagePipeline::Flux(p) => p.noise_shape(batch, height, width),
        }
    }

    /// Generate `request.batch` images on `compute`; `on_step(i)` is called after each
    /// denoising step.
    pub fn generate(
        &self,
        compute: &Compute<'_>,
        request: &ImageRequest,
        on_step: impl FnMut(usize),
    ) -> Result<Images> {
        match self {
            ImagePipeline::ZImage(p) => p.generate(compute, request, on_step),
            ImagePipeline::QwenImage(p) => p.generate(compute, request, on_step),
            ImagePipeline::Flux(p) => p.generate(compute, request, on_step),
        }
    }
}

/// An opened Z-Image pipeline: every component checked; each phase's weights (the text
/// encoder's, the DiT's, the VAE decoder's) are placed per generation, one phase at a time,
/// on the device the phase runs on.
pub struct ZImagePipeline {
    text_encoder: Component,
    transformer: Component,
    encoder: TextEncoder,
    dit: ZImage,
    /// The VAE's tensors as stored (checked at open, loaded where it decodes).
    vae_weights: VaeWeights,
    scheduler: FlowMatchConfig,
    pub load_seconds: f64,
}

/// A model as ComfyUI's split files: one file each for the DiT, the text encoder and the VAE
/// (their names mapped to diffusers'), and a tokenizer from elsewhere.
pub struct SplitFiles<'a> {
    pub dit: &'a Path,
    pub text_encoder: &'a Path,
    /// Flux.1's second text encoder (T5); the other models have one.
    pub text_encoder_2: Option<&'a Path>,
    pub vae: &'a Path,
    /// A `tokenizer.json` (with its `tokenizer_config.json` beside it if there is one); for
    /// Qwen-Image also a folder of its slow tokenizer's files; for Flux.1 a pipeline folder
    /// holding `tokenizer/` and `tokenizer_2/`.
    pub tokenizer: &'a Path,
}

/// The models whose split files ferry opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SplitModel {
    ZImage,
    QwenImage,
    Flux,
}

impl SplitModel {
    /// The model of the DiT file `dit`, from its tensor names.
    pub fn of_dit(dit: &Path) -> Result<SplitModel> {
        let tensors = crate::checkpoint::safetensors::read_map(dit)?;
        if crate::model::z_image::single_file::is_dit(&tensors) {
            return Ok(SplitModel::ZImage);
        }
        if crate::model::qwen_image::single_file::is_dit(&tensors) {
            return Ok(SplitModel::QwenImage);
        }
        if crate::model::flux::single_file::is_dit(&tensors) {
            return Ok(SplitModel::Flux);
        }
        Err(Error::checkpoint(
            dit,
            "unknown diffusion model: expected Z-Image's (a tensor cap_embedder.1.weight), Qwen-Image's (txt_norm.weight and img_in.weight) or Flux.1's (double_blocks.0.img_attn.qkv.weight, or diffusers' single_transformer_blocks.0.proj_mlp.weight), with or without model.diffusion_model. before the names",
        ))
    }

    /// The Hugging Face repository whose `tokenizer/` (Flux.1: and `tokenizer_2/`) the
    /// model's split files use.
    pub fn tokenizer_repo(self) -> &'static str {
        match self {
            SplitModel::ZImage => "Tongyi-MAI/Z-Image-Turbo",
            SplitModel::QwenImage => "Qwen/Qwen-Image",
            SplitModel::Flux => "black-forest-labs/FLUX.1-dev",
        }
    }
}

impl ImagePipeline {
    /// Open split files of the model `model` ([`SplitModel::of_dit`]).
    pub fn open_split(model: SplitModel, files: &SplitFiles<'_>) -> Result<ImagePipeline> {
        Ok(match model {
            SplitModel::ZImage => {
                ImagePipeline::ZImage(Box::new(ZImagePipeline::open_split(files)?))
            }
            SplitModel::QwenImage => {
                ImagePipeline::QwenImage(Box::new(QwenImagePipeline::open_split(files)?))
            }
            SplitModel::Flux => ImagePipeline::Flux(Box::new(FluxPipeline::open_split(files)?)),
        })
    }
}

/// The parts of a pipeline before they are checked against each other.
struct Parts {
    text_encoder: Component,
    encoder: TextEncoder,
    transformer: Component,
    dit: ZImage,
    /// Named when the DiT disagrees with the text encoder or the VAE.
    dit_source: PathBuf,
    vae_weights: VaeWeights,
    /// Named when the VAE disagrees with the DiT.
    vae_source: PathBuf,
    scheduler: FlowMatchConfig,
}

impl ZImagePipeline {
    /// Open a diffusers Z-Image directory and check every component.
    pub fn open(dir: &Path) -> Result<ZImagePipeline> {
        let start = Instant::now();
        if !Pipeline::is_pipeline(dir) {
            return Err(Error::NotFound {
                path: dir.join("model_index.json"),
                expected: "a diffusers pipeline directory (model_index.json with transformer/, text_encoder/, tokenizer/, vae/, scheduler/)".into(),
            });
        }
        let mut pipeline = Pipeline::open(dir)?;
        if pipeline.class_name != "ZImagePipeline" {
            return Err(Error::checkpoint(
                dir.join("model_index.json"),
                format!(
                    "pipeline class {:?} is not supported; expected \"ZImagePipeline\"",
                    pipeline.class_name
                ),
            ));
        }
        let encoder = TextEncoder::open(&pipeline)?;
        let tr = pipeline.component("transformer")?;
        let (path, json) = tr.config()?;
        let dit = ZImage::new(ZImageConfig::from_json(path, json)?);
        let dit_source = path.to_path_buf();
        let vae_dir = pipeline.component("vae")?.dir.clone();
        let vae_weights = open_vae(&vae_dir)?;
        let sc = pipeline.component("scheduler")?;
        let (path, json) = sc.config()?;
        let scheduler = FlowMatchConfig::from_json(path, json)?;
        let parts = Parts {
            text_encoder: pipeline.take("text_encoder")?,
            encoder,
            transformer: pipeline.take("transformer")?,
            dit,
            dit_source,
            vae_weights,
            vae_source: vae_dir.join("config.json"),
            scheduler,
        };
        Self::assemble(parts, start)
    }

    /// Open ComfyUI's split files of Z-Image, each file's layout found from its tensor
    /// names; the scheduler is Z-Image-Turbo's ([`FlowMatchConfig::z_image_turbo`]).
    pub fn open_split(files: &SplitFiles<'_>) -> Result<ZImagePipeline> {
        let start = Instant::now();
        let text = TextCodec::from_tokenizer_file(files.tokenizer)?;
        let (encoder, text_encoder) = TextEncoder::open_file(files.text_encoder, text)?;
        let (config, transformer) = open_dit_file(files.dit)?;
        let parts = Parts {
            text_encoder,
            encoder,
            transformer,
            dit: ZImage::new(config),
            dit_source: files.dit.to_path_buf(),
            vae_weights: open_flux_vae_file(files.vae)?,
            vae_source: files.vae.to_path_buf(),
            scheduler: FlowMatchConfig::z_image_turbo(),
        };
        Self::assemble(parts, start)
    }

    /// Check the parts against each other (widths, latent channels) and their tensors.
    fn assemble(p: Parts, start: Instant) -> Result<ZImagePipeline> {
        if p.dit.config.cap_feat_dim != p.encoder.model.config.hidden_size {
            return Err(Error::checkpoint(
                &p.dit_source,
                format!(
                    "cap_feat_dim {} does not match the text encoder's hidden_size {}",
                    p.dit.config.cap_feat_dim, p.encoder.model.config.hidden_size
                ),
            ));
        }
        p.dit.check_tensors(&p.transformer)?;
        p.vae_weights.check()?;
        let latent_channels = p.vae_weights.config.latent_channels;
        if latent_channels != p.dit.config.in_channels {
            return Err(Error::checkpoint(
                &p.vae_source,
                format!(
                    "latent_channels {latent_channels} does not match the transformer's in_channels {}",
                    p.dit.config.in_channels
                ),
            ));
        }
        Ok(ZImagePipeline {
            text_encoder: p.text_encoder,
            transformer: p.transformer,
            encoder: p.encoder,
            dit: p.dit,
            vae_weights: p.vae_weights,
            scheduler: p.scheduler,
            load_seconds: start.elapsed().as_secs_f64(),
        })
    }

    /// Latent channels (16 for Z-Image).
    pub fn latent_channels(&self) -> usize {
        self.dit.config.in_channels
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
            Compute::Cpu => {
                self.generate_on(&Cpu, request, on_step, place_on_cpu, |latents, shape| {
                    self.decode_on_cpu(latents, shape)
                })
            }
            Compute::Cuda { gpu, stream, vae } => {
                gpu.prepare(self.encoder.model.config.head_dim)?;
                gpu.prepare_dit(self.dit.config.head_dim())?;
                let place = place_on_gpu(gpu, stream);
                let decode = |latents: &[f32], shape| match vae {
                    VaeDevice::Gpu => self.decode_on_gpu(gpu, latents, shape),
                    VaeDevice::Cpu => self.decode_on_cpu(latents, shape),
                };
                self.generate_on(gpu, request, on_step, place, decode)
            }
        }
    }

    /// The phases in turn on `backend`, each phase's weights placed by `place` (component,
    /// architecture, the pass it must serve, where its streaming statistics go) and dropped
    /// when the phase ends; `decode` is the VAE on the same device (latents, their shape).
    fn generate_on<B: DitOps>(
        &self,
        backend: &B,
        request: &ImageRequest,
        mut on_step: impl FnMut(usize),
        place: impl Place<B::Weight>,
        decode: impl FnOnce(&[f32], [usize; 4]) -> Result<(Vec<f32>, VaeDecode)>,
    ) -> Result<Images> {
        let r = request;
        let (h, w) = (r.height / 8, r.width / 8);
        let per_image = self.latent_channels() * h * w;
        assert_eq!(
            r.noise.len(),
            r.batch * per_image,
            "noise of [batch, channels, h/8, w/8]"
        );
        let mut times = PhaseTimes {
            load: self.load_seconds,
            ..PhaseTimes::default()
        };
        let mut streamed = Vec::new();

        let t = Instant::now();
        let ids = self.encoder.tokens(&r.prompt)?;
        // Guidance without a negative prompt contrasts with the empty prompt.
        let negative_ids = match r.guidance > 0.0 {
            true => Some(
                self.encoder
                    .tokens(r.negative_prompt.as_deref().unwrap_or(""))?,
            ),
            false => None,
        };
        let (prompt, negative) = {
            let longest = ids.len().max(negative_ids.as_ref().map_or(0, Vec::len));
            let shape = PassShape {
                tokens: longest,
                batch: 1,
                past: 0,
            };
            let mut log = StreamLog::default();
            let te = &self.text_encoder;
            let mut weights = place(te, &self.encoder.model, &[], shape, &mut log)?;
            let prompt = self.encoder.encode(backend, &mut weights, &ids)?;
            let negative = match &negative_ids {
                Some(n) => Some(self.encoder.encode(backend, &mut weights, n)?),
                None => None,
            };
            drop(weights);
            streamed.extend(log.finish("text encoder"));
            (prompt, negative)
        };
        times.text_encoder = t.elapsed().as_secs_f64();

        let t = Instant::now();
        let image_tokens = self.dit.image_tokens(h, w);
        let schedule = self
            .scheduler
            .schedule(&z_image_sigmas(r.steps), self.scheduler.mu(image_tokens));
        let cap_feat = self.dit.config.cap_feat_dim;
        let caption =
            (prompt.len() / cap_feat).max(negative.as_ref().map_or(0, |n| n.len() / cap_feat));
        let samples = r.batch * if negative.is_some() { 2 } else { 1 };
        let shape = PassShape {
            tokens: padded(image_tokens) + padded(caption),
            batch: samples,
            past: 0,
        };
        let mut log = StreamLog::default();
        let mut weights = place(&self.transformer, &self.dit, &[], shape, &mut log)?;
        let job = Denoise {
            latents: r.noise.clone(),
            batch: r.batch,
            prompt: &prompt,
            negative: negative.as_deref(),
            height: h,
            width: w,
            guidance: Guidance {
                scale: r.guidance,
                ..Guidance::NONE
            },
        };
        let latents = denoise(backend, &self.dit, &mut weights, &schedule, job, |i, _| {
            on_step(i)
        })?;
        drop(weights);
        streamed.extend(log.finish("denoise"));
        times.denoise = t.elapsed().as_secs_f64();

        let t = Instant::now();
        let shape = [r.batch, self.latent_channels(), h, w];
        let (image, vae) = decode(&latents, shape)?;
        let rgb = to_rgb8(&image, [r.batch, 3, r.height, r.width]);
        times.vae = t.elapsed().as_secs_f64();
        Ok(Images {
            rgb: rgb
                .chunks(r.height * r.width * 3)
                .map(<[u8]>::to_vec)
                .collect(),
            times,
            prompt_tokens: ids.len(),
            negative_tokens: negative_ids.map_or(0, |n| n.len()),
            streamed,
            vae,
        })
    }

    fn decode_on_cpu(&self, latents: &[f32], shape: [usize; 4]) -> Result<(Vec<f32>, VaeDecode)> {
        decode_kl_on_cpu(&self.vae_weights, latents, shape)
    }

    fn decode_on_gpu(
        &self,
        gpu: &Cuda,
        latents: &[f32],
        shape: [usize; 4],
    ) -> Result<(Vec<f32>, VaeDecode)> {
        decode_kl_on_gpu(gpu, &self.vae_weights, latents, shape)
    }
}

/// Decode `latents` (`shape` `[batch, channels, h, w]`, the pipeline's, before the VAE's
/// scaling and shift) with the AutoencoderKL `vae` on the CPU, whole.
pub(crate) fn decode_kl_on_cpu(
    vae: &VaeWeights,
    latents: &[f32],
    shape: [usize; 4],
) -> Result<(Vec<f32>, VaeDecode)> {
    let image = Vae::load(&Cpu, vae)?.decode(&Cpu, latents, shape, Tiling::Whole)?;
    Ok((image, VaeDecode::CPU))
}

/// [`decode_kl_on_cpu`] on `gpu`, within what the budget leaves once the decoder's weights
/// are uploaded (they stay for the phase): whole, or in the largest tiles that fit
/// ([`choose_tiling_by`]); a budget too small for the smallest tile is refused, naming the
/// least that would do.
pub(crate) fn decode_kl_on_gpu(
    gpu: &Cuda,
    vae: &VaeWeights,
    latents: &[f32],
    shape: [usize; 4],
) -> Result<(Vec<f32>, VaeDecode)> {
    let [_, _, h, w] = shape;
    let m = IMAGE_MEMORY;
    let config = &vae.config;
    let weights = vae.decoder_bytes(m.element_bytes);
    let report = gpu_vae_plan(gpu, [h, w], config.scale_factor(), weights, |h, w| {
        config.decode_peak_bytes(h, w, m)
    })?;
    let image = Vae::load(gpu, vae)?.decode(gpu, latents, shape, report.tiling)?;
    Ok((image, report))
}

/// How a VAE decodes an `h × w` latent (`latent`) on `gpu` within what the budget leaves
/// once its `weights` bytes are uploaded (they stay for the phase): whole, or in the largest
/// tiles that fit ([`choose_tiling_by`], `peak` its activations for a latent of a size); a
/// budget too small for the smallest tile is refused, naming the least that would do. `f`:
/// image pixels per latent pixel.
pub(crate) fn gpu_vae_plan(
    gpu: &Cuda,
    latent: [usize; 2],
    f: usize,
    weights: usize,
    peak: impl Fn(usize, usize) -> usize,
) -> Result<VaeDecode> {
    let [h, w] = latent;
    let memory = gpu.memory();
    // What the ledger holds now (the DiT is gone), and the driver's share that it does not
    // count, as the streaming planner leaves it aside.
    let held = memory.in_use() + DRIVER_RESERVE;
    let available = memory.budget().saturating_sub(held + weights);
    let tiling = choose_tiling_by(h, w, available, &peak).map_err(|tile| Error::Flag {
        flag: "--vram",
        message: format!(
            "{} is too small to decode a {}×{} image on the GPU: the VAE needs at least {} ({} held or reserved for the driver, {} of decoder weights, {} for a tile of {MIN_TILE}×{MIN_TILE} latent pixels); give more, or --vae-device cpu",
            match gpu.budgeted() {
                true => human_bytes(memory.budget()),
                false => format!("the device's free {}", human_bytes(memory.budget())),
            },
            w * f,
            h * f,
            human_bytes(held + weights + tile),
            human_bytes(held),
            human_bytes(weights),
            human_bytes(tile),
        ),
    })?;
    let activation = match tiling {
        Tiling::Whole => peak(h, w),
        Tiling::Tiles(t) => peak(t.tile().min(h), t.tile().min(w)),
    };
    Ok(VaeDecode {
        device: "cuda",
        tiling,
        weight_bytes: Some(weights),
        activation_bytes: Some(activation),
    })
}

/// How a pipeline puts a phase's weights where its backend computes: the phase's component,
/// its model, the models placed later from the same component (see [`place_on_gpu`]), the
/// pass to plan for, where streaming reports go.
pub(crate) trait Place<W>:
    Fn(
    &Component,
    &dyn Architecture,
    &[&dyn Architecture],
    PassShape,
    &mut StreamLog,
) -> Result<Box<dyn Weights<W>>>
{
}

impl<W, F> Place<W> for F where
    F: Fn(
        &Component,
        &dyn Architecture,
        &[&dyn Architecture],
        PassShape,
        &mut StreamLog,
    ) -> Result<Box<dyn Weights<W>>>
{
}

/// Places a phase's weights on the CPU: every weight resident, in f32.
pub(crate) fn place_on_cpu(
    c: &Component,
    arch: &dyn Architecture,
    _: &[&dyn Architecture],
    _: PassShape,
    _: &mut StreamLog,
) -> Result<Box<dyn Weights<CpuWeight>>> {
    Ok(Box::new(ResidentWeights::load(c, arch.groups(), |t| {
        Cpu.weight(t)
    })?))
}

/// Places a phase's weights on `gpu`: with `stream` (a `--vram` budget) planned within the
/// budget for the pass `shape`, what does not fit streaming from host memory (the plan and
/// every pass's statistics go to the phase's [`StreamLog`]); without, uploaded whole.
/// `siblings`: the models placed later from the same component (Flux's and Qwen-Image's
/// DiT after their modulation model), whose encodings a cache miss writes ahead too.
pub(crate) fn place_on_gpu(
    gpu: &Cuda,
    stream: Option<StreamOptions>,
) -> impl Place<CudaWeight> + '_ {
    move |c, arch, siblings, shape, log| {
        let Some(host) = stream else {
            return Ok(Box::new(ResidentWeights::load(c, arch.groups(), |t| {
                gpu.weight(t)
            })?));
        };
        let setup = StreamSetup {
            siblings,
            ..StreamSetup::new(shape, host)
        };
        let mut w = stream_weights(gpu, c, arch, setup)?;
        log.plan = Some(w.plan().to_string());
        w.log_stats(log.passes.clone());
        Ok(Box::new(w))
    }
}

/// Where a phase's streaming reports go while it runs.
#[derive(Default)]
pub struct StreamLog {
    /// The phase's plan, when it streamed.
    plan: Option<String>,
    passes: Arc<Mutex<Vec<PassStats>>>,
}

impl StreamLog {
    /// The phase's report, if it streamed.
    pub(crate) fn finish(self, phase: &'static str) -> Option<PhaseStream> {
        let passes = std::mem::take(&mut *self.passes.lock().expect("not poisoned"));
        self.plan.map(|plan| PhaseStream {
            phase,
            plan,
            passes,
        })
    }
}

/// Standard normal noise from `seed`: SplitMix64 (Steele, Lea & Flood 2014) for uniform
/// 53-bit doubles, two per pair of values through the Box–Muller transform, in f64 then
/// rounded to f32. Documented so that another tool can reproduce it; `--noise` takes any
/// tool's latents instead.
pub fn gaussian_noise(seed: u64, n: usize) -> Vec<f32> {
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // (0, 1]: never 0, so the logarithm is finite.
        ((z >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    };
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let (u1, u2) = (next(), next());
        let r = (-2.0 * u1.ln()).sqrt();
        let a = 2.0 * std::f64::consts::PI * u2;
        out.push((r * a.cos()) as f32);
        out.push((r * a.sin()) as f32);
    }
    out.truncate(n);
    out
}

#[cfg(test)]
mod tests {
    use super::gaussian_noise;

    #[test]
    fn seeded_noise_is_standard_normal_and_repeatable() {
        let a = gaussian_noise(42, 100_000);
        assert_eq!(a, gaussian_noise(42, 100_000));
        assert_ne!(a[..8], gaussian_noise(43, 8)[..]);
        let mean = a.iter().map(|&v| v as f64).sum::<f64>() / a.len() as f64;
        let var = a.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / a.len() as f64;
        assert!(
            mean.abs() < 0.01 && (var - 1.0).abs() < 0.02,
            "mean {mean}, variance {var}"
        );
    }
}
