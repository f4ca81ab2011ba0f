//! `ferry image`: text to image with a diffusers Z-Image or Qwen-Image pipeline.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use ferry::backend::Device;
use ferry::checkpoint::{resolve_model_path, safetensors, DType};
use ferry::diffuse::pipeline::{
    gaussian_noise, Compute, ImagePipeline, ImageRequest, SplitFiles, SplitModel, VaeDecode,
    VaeDevice, SIZE_MULTIPLE,
};
use ferry::diffuse::png::{self, Parameters};
use ferry::model::vae::Tiling;
use ferry::runtime::open_device;
use ferry::stream::{human_bytes, Vram};
use ferry::{Error, Result};

use super::HostMemoryArg;

#[derive(Args)]
pub struct ImageArgs {
    /// A diffusers Z-Image, Qwen-Image or Flux.1 directory (model_index.json, transformer/,
    /// text_encoder/, tokenizer/, vae/, scheduler/; Flux.1 also text_encoder_2/ and
    /// tokenizer_2/) or ORG/NAME in the Hugging Face cache.
    #[arg(long, short, required_unless_present = "dit", conflicts_with_all = ["dit", "text_encoder", "text_encoder_2", "vae", "tokenizer"])]
    model: Option<String>,
    /// Instead of --model, ComfyUI's split files: the diffusion model (Z-Image's,
    /// Qwen-Image's or Flux.1's, ComfyUI's names or diffusers'), with --text-encoder and
    /// --vae (and for Flux.1 --text-encoder-2).
    #[arg(long, value_name = "FILE.safetensors", requires_all = ["text_encoder", "vae"])]
    dit: Option<PathBuf>,
    /// The text encoder file of the split files (Z-Image: qwen_3_4b.safetensors; Qwen-Image:
    /// qwen_2.5_vl_7b.safetensors; Flux.1: CLIP's clip_l.safetensors).
    #[arg(long, value_name = "FILE.safetensors", requires = "dit")]
    text_encoder: Option<PathBuf>,
    /// Flux.1's second text encoder file of the split files: T5's t5xxl_fp16.safetensors.
    #[arg(long, value_name = "FILE.safetensors", requires = "dit")]
    text_encoder_2: Option<PathBuf>,
    /// The VAE file of the split files (Z-Image and Flux.1: Flux's ae.safetensors;
    /// Qwen-Image: qwen_image_vae.safetensors).
    #[arg(long, value_name = "FILE.safetensors", requires = "dit")]
    vae: Option<PathBuf>,
    /// The tokenizer for split files: a tokenizer.json, or a folder with one (the model's
    /// pipeline's tokenizer/ or the pipeline itself; Qwen-Image's may be its vocab.json and
    /// merges.txt; Flux.1's is a pipeline folder with tokenizer/ and tokenizer_2/). Default:
    /// Tongyi-MAI/Z-Image-Turbo's, Qwen/Qwen-Image's or black-forest-labs/FLUX.1-dev's in the
    /// Hugging Face cache.
    #[arg(long, value_name = "DIR|tokenizer.json", requires = "dit")]
    tokenizer: Option<PathBuf>,
    #[arg(long, short)]
    prompt: String,
    /// What the image should not show (with --guidance > 0).
    #[arg(long)]
    negative_prompt: Option<String>,
    /// WIDTHxHEIGHT, multiples of 16.
    #[arg(long, default_value = "1024x1024", conflicts_with_all = ["width", "height"])]
    size: String,
    #[arg(long)]
    width: Option<usize>,
    #[arg(long)]
    height: Option<usize>,
    /// Denoising steps. Default: 8 for Z-Image (Turbo is made for 8-9), 50 for Qwen-Image,
    /// 28 for Flux.1 (their pipelines' defaults).
    #[arg(long)]
    steps: Option<usize>,
    /// Seed of the initial noise; random (and printed) when not given.
    #[arg(long)]
    seed: Option<u64>,
    /// Classifier-free guidance scale as the model's pipeline applies it: Z-Image's
    /// guidance_scale (default 0, Turbo's choice: off; guides when > 0), Qwen-Image's
    /// true_cfg_scale (default 4; guides when > 1 and --negative-prompt is given). Both
    /// branches go through one pass per step. Flux.1's guidance_scale (default 3.5), which
    /// the guidance-distilled DiT embeds: one branch, no negative prompt.
    #[arg(long, allow_negative_numbers = true)]
    guidance: Option<f32>,
    /// Images from one prompt, denoised together (one pass over the weights per step).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Initial latents instead of seeded noise: a safetensors file with a tensor `noise` in
    /// the layout of the pipeline's `latents=` (f32): Z-Image [batch, 16, height/8, width/8],
    /// Qwen-Image and Flux.1 packed [batch, (height/16)·(width/16), 64].
    #[arg(long, value_name = "FILE.safetensors")]
    noise: Option<PathBuf>,
    /// Where to write the PNG; with --batch N, NAME-0.png … NAME-(N-1).png.
    #[arg(long, short, default_value = "image.png")]
    out: PathBuf,
    /// Where to compute: auto (the GPU when one is usable, else the CPU), cpu (f32), or
    /// cuda[:N] (bf16; every phase on the GPU).
    #[arg(long, default_value = "auto", value_name = "auto|cpu|cuda[:N]")]
    device: Device,
    /// GPU memory budget for every phase: a size (3GiB) or auto. Weights that do not fit
    /// stream from host memory during each pass (each denoising step is one pass over the
    /// DiT). Default: each phase's weights uploaded whole.
    #[arg(long, value_name = "SIZE|auto")]
    vram: Option<String>,
    /// Where the VAE decodes: auto (where the other phases run), cpu (f32, leaving the GPU's
    /// memory to the DiT), or cuda (the GPU the other phases use). On the GPU it decodes whole
    /// when the image's activations fit what the budget leaves, else in tiles.
    #[arg(long, value_enum, default_value_t = VaeDeviceFlag::Auto)]
    vae_device: VaeDeviceFlag,
    #[command(flatten)]
    host_memory: HostMemoryArg,
    /// Print each phase's time, and with --vram each streamed phase's plan and passes.
    #[arg(long)]
    stats: bool,
    /// Print a JSON summary on standard output.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum VaeDeviceFlag {
    Auto,
    Cpu,
    Cuda,
}

pub fn image(args: ImageArgs) -> Result<()> {
    let (width, height) = size(&args)?;
    if args.steps == Some(0) {
        return Err(Error::Flag {
            flag: "--steps",
            message: "expected at least 1 denoising step".into(),
        });
    }
    if args.batch == 0 {
        return Err(Error::Flag {
            flag: "--batch",
            message: "expected at least 1 image".into(),
        });
    }
    if let Some(g) = args.guidance.filter(|g| !(g.is_finite() && *g >= 0.0)) {
        return Err(Error::Flag {
            flag: "--guidance",
            message: format!("{g} is not a guidance scale; expected ≥ 0"),
        });
    }
    if args.prompt.trim().is_empty() {
        return Err(Error::Flag {
            flag: "--prompt",
            message: "the prompt is empty".into(),
        });
    }
    check_writable(&args.out)?;
    let vram = args.vram.as_deref().map(Vram::parse).transpose()?;
    let (pipe, model) = open_pipeline(&ImageSource::of(&args)?)?;
    let gpu = open_device(args.device, vram)?;
    let compute = match (&gpu, args.vae_device) {
        (None, VaeDeviceFlag::Cuda) => {
            return Err(Error::Flag {
                flag: "--vae-device",
                message: "cuda: the other phases run on the CPU; expected --device cuda with it"
                    .into(),
            })
        }
        (None, _) => Compute::Cpu,
        (Some(gpu), flag) => Compute::Cuda {
            gpu,
            stream: vram.map(|_| args.host_memory.options()),
            vae: match flag {
                VaeDeviceFlag::Cpu => VaeDevice::Cpu,
                VaeDeviceFlag::Auto | VaeDeviceFlag::Cuda => VaeDevice::Gpu,
            },
        },
    };
    let device = compute.name();
    let defaults = pipe.defaults();
    let steps = args.steps.unwrap_or(defaults.steps);
    let guidance = args.guidance.unwrap_or(defaults.guidance);
    if args.negative_prompt.is_some() && !pipe.guides(guidance, true) {
        eprintln!(
            "[note: --negative-prompt has no effect: {} does not guide at --guidance {guidance}]",
            pipe.model_name()
        );
    }
    let shape = pipe.noise_shape(args.batch, height, width);
    let seed = args.seed.unwrap_or_else(random_seed);
    let noise = match &args.noise {
        Some(file) => read_noise(file, &shape)?,
        None => {
            eprintln!("[seed {seed}]");
            gaussian_noise(seed, shape.iter().product())
        }
    };
    let request = ImageRequest {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        width,
        height,
        steps,
        batch: args.batch,
        guidance,
        noise,
    };
    let bar = match std::io::stderr().is_terminal() {
        true => ProgressBar::new(steps as u64).with_style(
            ProgressStyle::with_template("{bar:30} step {pos}/{len} {elapsed_precise} ({per_sec})")
                .expect("a valid template"),
        ),
        false => ProgressBar::hidden(),
    };
    let images = pipe.generate(&compute, &request, |_| bar.inc(1))?;
    bar.finish_and_clear();

    let params = Parameters {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        steps,
        seed,
        width,
        height,
        guidance,
        model,
    };
    let mut written = Vec::new();
    for (i, rgb) in images.rgb.iter().enumerate() {
        let path = png::numbered(&args.out, i, args.batch);
        // Each file appears whole or not at all (png::write renames a finished file); a
        // batch appears whole or not at all too.
        if let Err(e) = png::write(&path, rgb, width, height, &params) {
            written.iter().for_each(|p| drop(std::fs::remove_file(p)));
            return Err(e);
        }
        written.push(path);
    }
    let t = images.times;
    if args.stats {
        let total = t.load + t.text_encoder + t.denoise + t.vae;
        let share = |x: f64| 100.0 * x / total.max(1e-9);
        eprintln!(
            "[load {:.2} s ({:.0} %), text encoder {:.2} s ({:.0} %, {} tokens), {} steps {:.2} s ({:.0} %, {:.3} s a step), VAE decode {:.2} s ({:.0} %); {device}]",
            t.load, share(t.load), t.text_encoder, share(t.text_encoder), images.prompt_tokens,
            steps, t.denoise, share(t.denoise), t.denoise / steps as f64, t.vae, share(t.vae)
        );
        eprintln!("[VAE decode: {}]", vae_summary(&images.vae));
        for s in &images.streamed {
            eprintln!("[{}: {}]", s.phase, s.plan.trim_end().replace('\n', "\n  "));
            for (i, p) in s.passes.iter().enumerate() {
                eprintln!(
                    "[{} pass {i}: {:.1} ms, {:.2} GB streamed at {:.1} GB/s, stall {:.1} ms, {:.2} of the bound, peak {:.2} GiB]",
                    s.phase,
                    p.pass_ms,
                    p.streamed_bytes as f64 / 1e9,
                    p.achieved_gbps,
                    p.stall_ms,
                    p.efficiency,
                    p.allocated_peak as f64 / (1u64 << 30) as f64
                );
            }
        }
    }
    if args.json {
        let summary = serde_json::json!({
            "images": written.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
            "prompt": args.prompt,
            "negative_prompt": args.negative_prompt,
            "seed": if args.noise.is_some() { None } else { Some(seed) },
            "noise_file": args.noise.as_ref().map(|p| p.display().to_string()),
            "width": width, "height": height, "steps": steps, "batch": args.batch,
            "guidance": guidance, "model": pipe.model_name(), "device": device,
            "prompt_tokens": images.prompt_tokens, "negative_tokens": images.negative_tokens,
            "seconds": {"load": t.load, "text_encoder": t.text_encoder, "denoise": t.denoise, "vae": t.vae},
            "vae": vae_json(&images.vae),
            "streamed": images.streamed.iter().map(|s| serde_json::json!({
                "phase": s.phase, "plan": s.plan, "passes": s.passes,
            })).collect::<Vec<_>>(),
        });
        println!("{summary}");
    }
    for p in &written {
        eprintln!("[wrote {}]", p.display());
    }
    Ok(())
}

/// How the VAE decoded, for `--stats`: `cuda, 3×3 tiles …` or `cpu, whole`.
fn vae_summary(v: &VaeDecode) -> String {
    let how = match v.tiling {
        Tiling::Whole => "whole".to_string(),
        Tiling::Tiles(t) => format!(
            "tiles of {0}×{0} latent pixels overlapping by {1}",
            t.tile(),
            t.overlap()
        ),
    };
    match (v.weight_bytes, v.activation_bytes) {
        (Some(w), Some(a)) => format!(
            "{}, {how}; {} of weights, {} of activations (estimated peak{})",
            v.device,
            human_bytes(w),
            human_bytes(a),
            if v.tiling == Tiling::Whole {
                ""
            } else {
                " a tile"
            }
        ),
        _ => format!("{}, {how}", v.device),
    }
}

fn vae_json(v: &VaeDecode) -> serde_json::Value {
    let tiling = match v.tiling {
        Tiling::Whole => serde_json::json!("whole"),
        Tiling::Tiles(t) => serde_json::json!({"tile": t.tile(), "overlap": t.overlap()}),
    };
    serde_json::json!({
        "device": v.device, "tiling": tiling,
        "weight_bytes": v.weight_bytes, "activation_bytes": v.activation_bytes,
    })
}

/// Where an image pipeline comes from: a diffusers directory (or ORG/NAME in the Hugging
/// Face cache), or ComfyUI's split files.
pub enum ImageSource<'a> {
    Dir(&'a str),
    Split {
        dit: &'a Path,
        text_encoder: &'a Path,
        /// Flux.1's T5.
        text_encoder_2: Option<&'a Path>,
        vae: &'a Path,
        /// Default: the model's in the Hugging Face cache.
        tokenizer: Option<&'a Path>,
    },
}

impl ImageSource<'_> {
    /// `--model`, or the split files `--dit`, `--text-encoder`, `--vae` (clap makes sure that
    /// one or the other is given whole).
    fn of(args: &ImageArgs) -> Result<ImageSource<'_>> {
        if let Some(model) = &args.model {
            return Ok(ImageSource::Dir(model));
        }
        let (Some(dit), Some(text_encoder), Some(vae)) = (&args.dit, &args.text_encoder, &args.vae)
        else {
            return Err(Error::Flag {
                flag: "--dit",
                message: "expected --model DIR, or --dit, --text-encoder and --vae together".into(),
            });
        };
        Ok(ImageSource::Split {
            dit,
            text_encoder,
            text_encoder_2: args.text_encoder_2.as_deref(),
            vae,
            tokenizer: args.tokenizer.as_deref(),
        })
    }
}

/// The pipeline `source` names, and the model's name for the PNG (the directory's or the
/// DiT file's name).
pub fn open_pipeline(source: &ImageSource<'_>) -> Result<(ImagePipeline, String)> {
    let name = |p: &Path, fallback: &str| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| fallback.to_string())
    };
    match *source {
        ImageSource::Dir(model) => {
            let dir = resolve_model_path(model)?;
            Ok((ImagePipeline::open(&dir)?, name(&dir, model)))
        }
        ImageSource::Split {
            dit,
            text_encoder,
            text_encoder_2,
            vae,
            tokenizer,
        } => {
            let model = SplitModel::of_dit(dit)?;
            if let (Some(t5), false) = (text_encoder_2, model == SplitModel::Flux) {
                return Err(Error::Flag {
                    flag: "--text-encoder-2",
                    message: format!(
                        "{}: only Flux.1 has a second text encoder, and {} is not Flux.1's diffusion model",
                        t5.display(),
                        dit.display()
                    ),
                });
            }
            let tokenizer = tokenizer_path(model, tokenizer)?;
            let files = SplitFiles {
                dit,
                text_encoder,
                text_encoder_2,
                vae,
                tokenizer: &tokenizer,
            };
            Ok((ImagePipeline::open_split(model, &files)?, name(dit, "dit")))
        }
    }
}

/// The tokenizer of `--tokenizer` for split files of `model`: a tokenizer.json, a folder
/// holding one (or, for Qwen-Image, its slow tokenizer's vocab.json and merges.txt), or a
/// pipeline's folder holding tokenizer/; by default the model's in the Hugging Face cache.
fn tokenizer_path(model: SplitModel, given: Option<&Path>) -> Result<PathBuf> {
    const FILE: &str = "tokenizer.json";
    let repo = model.tokenizer_repo();
    if model == SplitModel::Flux {
        return flux_tokenizers(repo, given);
    }
    let slow = |d: &Path| model == SplitModel::QwenImage && d.join("vocab.json").is_file();
    // A folder's tokenizer.json, else (Qwen-Image's) the folder of the slow files.
    let pick = |d: PathBuf| match d.join(FILE).is_file() {
        true => Some(d.join(FILE)),
        false => slow(&d).then_some(d),
    };
    let Some(given) = given else {
        let cached = resolve_model_path(repo)
            .ok()
            .and_then(|dir| pick(dir.join("tokenizer")));
        return cached.ok_or_else(|| Error::Flag {
            flag: "--tokenizer",
            message: format!("split files carry no tokenizer; give --tokenizer DIR|tokenizer.json ({repo}'s tokenizer/ folder); {repo} is not in the Hugging Face cache"),
        });
    };
    if !given.is_dir() {
        return Ok(given.to_path_buf());
    }
    [given.to_path_buf(), given.join("tokenizer")]
        .into_iter()
        .find_map(pick)
        .ok_or_else(|| Error::NotFound {
            path: given.join(FILE),
            expected: "--tokenizer: a tokenizer.json, or a folder with one (or with tokenizer/tokenizer.json)".into(),
        })
}

/// Flux.1's tokenizers for split files: a pipeline folder `given` holding `tokenizer/`
/// (CLIP's) and `tokenizer_2/` (T5's), by default `repo`'s in the Hugging Face cache.
fn flux_tokenizers(repo: &str, given: Option<&Path>) -> Result<PathBuf> {
    let both = |d: &Path| d.join("tokenizer").is_dir() && d.join("tokenizer_2").is_dir();
    let Some(given) = given else {
        return resolve_model_path(repo)
            .ok()
            .filter(|d| both(d))
            .ok_or_else(|| Error::Flag {
                flag: "--tokenizer",
                message: format!("split files carry no tokenizer; give --tokenizer DIR (a Flux.1 pipeline folder with tokenizer/ and tokenizer_2/, as {repo}'s); {repo} is not in the Hugging Face cache"),
            });
    };
    match both(given) {
        true => Ok(given.to_path_buf()),
        false => Err(Error::NotFound {
            path: given.join("tokenizer_2"),
            expected: "--tokenizer for Flux.1: a pipeline folder with tokenizer/ (CLIP's) and tokenizer_2/ (T5's)".into(),
        }),
    }
}

/// `--size WxH`, or `--width`/`--height` (each defaulting to 1024), multiples of 16.
fn size(args: &ImageArgs) -> Result<(usize, usize)> {
    if args.width.is_some() || args.height.is_some() {
        let (w, h) = (args.width.unwrap_or(1024), args.height.unwrap_or(1024));
        return check_size(w, h, "--width/--height");
    }
    parse_size(&args.size, "--size")
}

/// `WIDTHxHEIGHT` for `flag`, positive multiples of 16, at most 4096 on a side.
pub fn parse_size(s: &str, flag: &'static str) -> Result<(usize, usize)> {
    let parsed = s
        .split_once(['x', 'X'])
        .and_then(|(w, h)| Some((w.trim().parse().ok()?, h.trim().parse().ok()?)));
    let Some((w, h)) = parsed else {
        return Err(Error::Flag {
            flag,
            message: format!("{s:?} is not WIDTHxHEIGHT (e.g. 1024x768)"),
        });
    };
    check_size(w, h, flag)
}

fn check_size(w: usize, h: usize, flag: &'static str) -> Result<(usize, usize)> {
    if w == 0 || h == 0 || w % SIZE_MULTIPLE != 0 || h % SIZE_MULTIPLE != 0 {
        return Err(Error::Flag {
            flag,
            message: format!(
                "{w}x{h}: width and height must be positive multiples of {SIZE_MULTIPLE}"
            ),
        });
    }
    if w > 4096 || h > 4096 {
        return Err(Error::Flag {
            flag,
            message: format!("{w}x{h}: at most 4096 on a side"),
        });
    }
    Ok((w, h))
}

/// Fail before any work if `out` cannot be written (a missing folder, a directory).
fn check_writable(out: &std::path::Path) -> Result<()> {
    if out.is_dir() {
        return Err(Error::Flag {
            flag: "--out",
            message: format!(
                "{} is a directory; expected a file name like image.png",
                out.display()
            ),
        });
    }
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    if !parent.is_dir() {
        return Err(Error::NotFound {
            path: parent.to_path_buf(),
            expected: "the folder --out writes into".into(),
        });
    }
    Ok(())
}

/// The tensor `noise` of `file`, checked against `shape`.
fn read_noise(file: &std::path::Path, shape: &[usize]) -> Result<Vec<f32>> {
    let tensors = safetensors::read(file)?;
    let t = tensors
        .iter()
        .find(|t| t.name == "noise")
        .ok_or_else(|| Error::MissingTensor {
            path: file.to_path_buf(),
            tensor: "noise".into(),
        })?;
    if t.dtype != DType::F32 {
        return Err(Error::DType {
            tensor: "noise".into(),
            found: t.dtype.to_string(),
            expected: "f32",
        });
    }
    t.expect_shape(shape)?;
    Ok(t.to_f32())
}

/// A seed from the clock and the process id, for runs that give none.
fn random_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    (nanos ^ (std::process::id() as u64).rotate_left(32)) % 1_000_000_000
}
