//! `ferry bench` on an image model: the time of one denoising step (one DiT forward over
//! every sample of a batch) at an image size and caption length, on any device, whole or
//! streamed within a VRAM budget: medians of several steps after a warm-up, with the PCIe
//! bound and the overlap efficiency beside each streamed figure, as a table or JSON;
//! `--timeline` draws one streamed step.
//!
//! The model is the `transformer/` of a diffusers Z-Image, Qwen-Image or Flux directory
//! (`--model`), or a real shape with random weights made in memory (`--synthetic
//! z-image-turbo`, `--synthetic qwen-image`, `--synthetic flux.1-dev`, or any image or DiT
//! preset of `ferry synth --list`). Inputs are random latents and caption features (and
//! Flux's pooled embedding): the step's cost does not depend on them.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use ferry::backend::cpu::Cpu;
use ferry::backend::cuda::streaming::PassStats;
use ferry::backend::cuda::Cuda;
use ferry::backend::dit::DitOps;
use ferry::backend::Backend;
use ferry::checkpoint::{resolve_model_path, Component, DType, Pipeline};
use ferry::diffuse::pipeline::gaussian_noise;
use ferry::model::flux::{self, Flux, FluxConfig};
use ferry::model::qwen_image::{self, ModulationTable, QwenImage, QwenImageConfig};
use ferry::model::z_image::{padded, DitInput, ZImage, ZImageConfig};
use ferry::model::{Architecture, PassShape, ResidentWeights, WeightGroup, Weights};
use ferry::runtime::{open_device, stream_weights, StreamSetup};
use ferry::stream::timeline::{write_svg, TimelineCapture};
use ferry::stream::Vram;
use ferry::synth::{random_component, DitPreset, PipelineComponent, PipelinePreset};
use ferry::{Error, Result};

use super::bench::BenchArgs;
use super::{median, median_group_compute};

/// Whether `args` name an image model: a diffusers pipeline or transformer directory, or an
/// image preset.
pub fn is_image_model(args: &BenchArgs) -> bool {
    if let Some(p) = &args.synthetic {
        return PipelinePreset::by_name(p).is_some() || DitPreset::by_name(p).is_some();
    }
    args.model
        .as_deref()
        .and_then(|m| resolve_model_path(m).ok())
        .is_some_and(|d| Pipeline::is_pipeline(&d) || is_dit_dir(&d))
}

fn is_dit_dir(dir: &std::path::Path) -> bool {
    std::fs::read_to_string(dir.join("config.json")).is_ok_and(|s| {
        s.contains("\"ZImageTransformer2DModel\"")
            || s.contains(&format!("\"{}\"", qwen_image::CLASS_NAME))
            || s.contains(&format!("\"{}\"", flux::CLASS_NAME))
    })
}

/// `--modulation`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ModulationArg {
    Precomputed,
    InSteps,
}

/// The diffusion transformers `ferry bench` times; a Qwen-Image or a Flux with the table of
/// its precomputed modulation once made.
enum Dit {
    ZImage(ZImage),
    QwenImage(QwenImage, Option<ModulationTable>),
    Flux(Flux, Option<flux::ModulationTable>),
}

/// σ of every timed step.
const SIGMA: f32 = 0.5;
/// Flux.1-dev's guidance scale (the pipeline's default) for a Flux that embeds one.
const GUIDANCE: f32 = 3.5;

impl Dit {
    /// The DiT a transformer config.json describes, by its `_class_name`.
    fn from_json(
        path: &std::path::Path,
        json: &serde_json::Value,
        modulation: Option<ModulationArg>,
    ) -> Result<Dit> {
        match json.get("_class_name").and_then(|c| c.as_str()) {
            Some(qwen_image::CLASS_NAME) => {
                let config = QwenImageConfig::from_json(path, json)?;
                Ok(Dit::QwenImage(
                    match modulation.unwrap_or(ModulationArg::Precomputed) {
                        ModulationArg::Precomputed => QwenImage::precomputed(config),
                        ModulationArg::InSteps => QwenImage::new(config),
                    },
                    None,
                ))
            }
            Some(flux::CLASS_NAME) => {
                let config = FluxConfig::from_json(path, json)?;
                Ok(Dit::Flux(
                    match modulation.unwrap_or(ModulationArg::Precomputed) {
                        ModulationArg::Precomputed => Flux::precomputed(config),
                        ModulationArg::InSteps => Flux::new(config),
                    },
                    None,
                ))
            }
            _ if modulation.is_some() => Err(Error::Flag {
                flag: "--modulation",
                message:
                    "applies to Qwen-Image and Flux; this DiT computes its (small) modulation in every step"
                        .into(),
            }),
            _ => Ok(Dit::ZImage(ZImage::new(ZImageConfig::from_json(
                path, json,
            )?))),
        }
    }

    /// A Qwen-Image with precomputed modulation: its table for the timed steps' σ, made by
    /// the modulation model on `gpu` (streamed with `vram`) or the CPU, and the seconds it
    /// took; else nothing.
    fn precompute(
        &mut self,
        gpu: Option<&Cuda>,
        streamed: bool,
        component: &Component,
        args: &BenchArgs,
    ) -> Result<Option<f64>> {
        if let Dit::Flux(d, table) = self {
            if d.modulation != flux::Modulation::Precomputed {
                return Ok(None);
            }
            let model = d.modulation_model();
            let pooled = gaussian_noise(3, d.config.pooled_projection_dim);
            let guidance = d.config.guidance_embeds.then_some(GUIDANCE);
            let start = Instant::now();
            let made = match gpu {
                None => {
                    let mut w =
                        ResidentWeights::load(component, model.groups(), |t| Cpu.weight(t))?;
                    model.table(&Cpu, &mut w, &[SIGMA], guidance, &[&pooled])?
                }
                Some(gpu) if !streamed => {
                    let mut w =
                        ResidentWeights::load(component, model.groups(), |t| gpu.weight(t))?;
                    model.table(gpu, &mut w, &[SIGMA], guidance, &[&pooled])?
                }
                Some(gpu) => {
                    let shape = PassShape {
                        tokens: 1,
                        batch: 1,
                        past: 0,
                    };
                    let setup = StreamSetup::new(shape, args.host_memory.options());
                    let mut w = stream_weights(gpu, component, &model, setup)?;
                    model.table(gpu, &mut w, &[SIGMA], guidance, &[&pooled])?
                }
            };
            let secs = start.elapsed().as_secs_f64();
            eprintln!(
                "[modulation precomputed for σ = {SIGMA} in {secs:.2} s: {:.2} GB of weights the steps leave out]",
                d.modulation_params() as f64 * 2e-9
            );
            *table = Some(made);
            return Ok(Some(secs));
        }
        let Dit::QwenImage(d, table) = self else {
            return Ok(None);
        };
        if d.modulation != qwen_image::Modulation::Precomputed {
            return Ok(None);
        }
        let model = d.modulation_model();
        let start = Instant::now();
        let made = match gpu {
            None => {
                let mut w = ResidentWeights::load(component, model.groups(), |t| Cpu.weight(t))?;
                model.table(&Cpu, &mut w, &[SIGMA])?
            }
            Some(gpu) if !streamed => {
                let mut w = ResidentWeights::load(component, model.groups(), |t| gpu.weight(t))?;
                model.table(gpu, &mut w, &[SIGMA])?
            }
            Some(gpu) => {
                let shape = PassShape {
                    tokens: 1,
                    batch: 1,
                    past: 0,
                };
                let setup = StreamSetup::new(shape, args.host_memory.options());
                let mut w = stream_weights(gpu, component, &model, setup)?;
                model.table(gpu, &mut w, &[SIGMA])?
            }
        };
        let secs = start.elapsed().as_secs_f64();
        eprintln!(
            "[modulation precomputed for σ = {SIGMA} in {secs:.2} s: {:.2} GB of weights the steps leave out]",
            d.modulation_params() as f64 * 2e-9
        );
        *table = Some(made);
        Ok(Some(secs))
    }

    fn arch(&self) -> &dyn Architecture {
        match self {
            Dit::ZImage(d) => d,
            Dit::QwenImage(d, _) => d,
            Dit::Flux(d, _) => d,
        }
    }

    /// The groups of every tensor of the checkpoint: the timed pass's and, where it leaves
    /// the modulation out, the modulation model's.
    fn checkpoint_groups(&self) -> Vec<WeightGroup> {
        let mut groups = self.arch().groups().to_vec();
        match self {
            Dit::QwenImage(d, _) if d.modulation == qwen_image::Modulation::Precomputed => {
                groups.extend_from_slice(d.modulation_model().groups());
            }
            Dit::Flux(d, _) if d.modulation == flux::Modulation::Precomputed => {
                groups.extend_from_slice(d.modulation_model().groups());
            }
            _ => {}
        }
        groups
    }

    fn class_name(&self) -> &'static str {
        match self {
            Dit::ZImage(_) => "ZImageTransformer2DModel",
            Dit::QwenImage(..) => qwen_image::CLASS_NAME,
            Dit::Flux(..) => flux::CLASS_NAME,
        }
    }

    fn head_dim(&self) -> usize {
        match self {
            Dit::ZImage(d) => d.config.head_dim(),
            Dit::QwenImage(d, _) => d.config.head_dim(),
            Dit::Flux(d, _) => d.config.head_dim(),
        }
    }

    /// Tokens of one sample's pass over an `h × w` latent with `caption` caption tokens (Z-Image
    /// pads both to its sequence multiple).
    fn tokens(&self, h: usize, w: usize, caption: usize) -> usize {
        match self {
            Dit::ZImage(d) => padded(d.image_tokens(h, w)) + padded(caption),
            Dit::QwenImage(d, _) => d.image_tokens(h, w) + caption,
            Dit::Flux(d, _) => d.image_tokens(h, w) + caption,
        }
    }

    /// Random latents of `batch` samples of an `h × w` latent (Z-Image's `[batch, C, h, w]`,
    /// Qwen-Image's packed `[batch, tokens, 4·C]`: the same count) and one caption's
    /// features.
    fn inputs(&self, batch: usize, h: usize, w: usize, caption: usize) -> (Vec<f32>, Vec<f32>) {
        let (channels, width) = match self {
            Dit::ZImage(d) => (d.config.in_channels, d.config.cap_feat_dim),
            Dit::QwenImage(d, _) => (d.config.out_channels, d.config.joint_attention_dim),
            Dit::Flux(d, _) => (d.config.latent_channels(), d.config.joint_attention_dim),
        };
        (
            gaussian_noise(1, batch * channels * h * w),
            gaussian_noise(2, caption * width),
        )
    }

    /// One step over `batch` samples at t = 0.5, each with `caption`.
    #[allow(clippy::too_many_arguments)]
    fn forward<B: DitOps>(
        &self,
        backend: &B,
        weights: &mut impl Weights<B::Weight>,
        latents: &[f32],
        caption: &[f32],
        batch: usize,
        h: usize,
        w: usize,
    ) -> Result<()> {
        let captions = vec![caption; batch];
        let t = vec![SIGMA; batch];
        match self {
            Dit::ZImage(d) => d.forward(
                backend,
                weights,
                &DitInput {
                    latents,
                    height: h,
                    width: w,
                    t: &t,
                    captions: &captions,
                },
            )?,
            Dit::QwenImage(d, table) => {
                let input = qwen_image::DitInput {
                    latents,
                    height: h,
                    width: w,
                    timestep: &t,
                    texts: &captions,
                };
                match table {
                    Some(table) => d.forward_with(backend, weights, &input, table)?,
                    None => d.forward(backend, weights, &input)?,
                }
            }
            Dit::Flux(d, table) => {
                // The same pooled embedding as the table was made for.
                let pooled = gaussian_noise(3, d.config.pooled_projection_dim);
                let pooled = vec![pooled.as_slice(); batch];
                let guidance = vec![GUIDANCE; batch];
                let input = flux::DitInput {
                    latents,
                    height: h,
                    width: w,
                    timestep: &t,
                    guidance: d.config.guidance_embeds.then_some(guidance.as_slice()),
                    pooled: &pooled,
                    texts: &captions,
                };
                match table {
                    Some(table) => d.forward_with(backend, weights, &input, table)?,
                    None => d.forward(backend, weights, &input)?,
                }
            }
        };
        Ok(())
    }
}

/// The DiT to time and its tensors, with a label for reports.
fn open_dit(args: &BenchArgs) -> Result<(Dit, Component, String)> {
    if let Some(p) = &args.synthetic {
        let json = match (PipelinePreset::by_name(p), DitPreset::by_name(p)) {
            (Some(preset), _) => preset.config(PipelineComponent::Transformer, DType::BF16),
            (None, Some(preset)) => preset.config(),
            (None, None) => unreachable!("is_image_model checked the name"),
        };
        let path = std::path::PathBuf::from(format!("synthetic:{p}/config.json"));
        let dit = Dit::from_json(&path, &json, args.modulation)?;
        let component = random_component(
            "transformer",
            dit.class_name(),
            json,
            &dit.checkpoint_groups(),
            0,
        );
        return Ok((
            dit,
            component,
            format!("synthetic {p} DiT (random bf16 weights)"),
        ));
    }
    let m = args
        .model
        .as_deref()
        .expect("clap requires --model or --synthetic");
    let dir = resolve_model_path(m)?;
    let component = if Pipeline::is_pipeline(&dir) {
        let mut pipeline = Pipeline::open(&dir)?;
        pipeline.component("transformer")?;
        pipeline
            .components
            .remove("transformer")
            .expect("checked just above")
    } else {
        Component::open("transformer", &dir, true)?
    };
    let (path, json) = component.config()?;
    let dit = Dit::from_json(path, json, args.modulation)?;
    dit.arch().check_tensors(&component)?;
    Ok((dit, component, format!("{m} (transformer)")))
}

/// One row: a batch size and its medians.
#[derive(serde::Serialize)]
struct Row {
    batch: usize,
    /// One step over the batch, seconds (wall clock, host work included).
    step_s: f64,
    per_image_s: f64,
    streamed: Option<Streamed>,
}

#[derive(serde::Serialize)]
struct Streamed {
    /// The same step from device events: first group to the last.
    pass_s: f64,
    bound_s: f64,
    efficiency: f64,
    stall_s: f64,
    /// Device time decoding compressed weights in the pass (its own stream), and copying.
    decode_s: f64,
    copy_s: f64,
    streamed_gb: f64,
    achieved_gbps: f64,
    peak_device_bytes: usize,
    ledger_peak_bytes: usize,
}

pub fn bench_dit(args: &BenchArgs) -> Result<()> {
    let (width, height) = super::image::parse_size(&args.size, "--size")?;
    let (mut dit, component, label) = open_dit(args)?;
    let caption_tokens = caption_tokens(args, &dit);
    if caption_tokens == 0 {
        return Err(Error::Flag {
            flag: "--caption-tokens",
            message: "expected at least 1".into(),
        });
    }
    let (h, w) = (height / 8, width / 8);
    let vram = args.vram.as_deref().map(Vram::parse).transpose()?;
    let gpu = open_device(args.device, vram)?;
    let largest = args.batch.iter().max().copied().unwrap_or(1);
    let shape = PassShape {
        tokens: dit.tokens(h, w, caption_tokens),
        batch: largest,
        past: 0,
    };
    if let Some(gpu) = &gpu {
        gpu.prepare_dit(dit.head_dim())?;
    }
    let modulation_s = dit.precompute(gpu.as_ref(), vram.is_some(), &component, args)?;
    let (device, rows) = match &gpu {
        None => {
            let device = format!("CPU ({} threads)", rayon::current_num_threads());
            let mut weights =
                ResidentWeights::load(&component, dit.arch().groups(), |t| Cpu.weight(t))?;
            (
                device,
                time_all(&Cpu, &dit, &mut weights, args, h, w, None)?,
            )
        }
        Some(gpu) => {
            let device = gpu.info().to_string();
            match vram {
                None => {
                    let mut weights =
                        ResidentWeights::load(&component, dit.arch().groups(), |t| gpu.weight(t))?;
                    (device, time_all(gpu, &dit, &mut weights, args, h, w, None)?)
                }
                Some(_) => {
                    // A first plan from the cost model; its warm steps measure each group's
                    // compute, and the step is planned again from those (what is timed), as
                    // bench-cuda does: the cost model's DiT compute is a guess (94 ms
                    // against 130 ms measured for Z-Image at 1024² on the H200).
                    let setup = StreamSetup::new(shape, args.host_memory.options());
                    let mut weights = stream_weights(gpu, &component, dit.arch(), setup)?;
                    let assumed_ms = weights.plan().prediction.compute_ms;
                    let log = Arc::new(Mutex::new(Vec::new()));
                    weights.log_stats(log.clone());
                    let (latents, caption) = dit.inputs(largest, h, w, caption_tokens);
                    let mut warm = Vec::new();
                    for run in 0..4 {
                        log.lock().expect("stats log").clear();
                        dit.forward(gpu, &mut weights, &latents, &caption, largest, h, w)?;
                        // The first step also builds the GEMM plans.
                        if run > 0 {
                            let passes = log.lock().expect("stats log");
                            warm.extend(passes.iter().map(|p| p.group_compute_ms.clone()));
                        }
                    }
                    drop(weights);
                    let measured = median_group_compute(&warm);
                    eprintln!(
                        "[planned with each group's measured compute: {:.1} ms a step (the cost model assumed {assumed_ms:.1} ms)]",
                        measured.iter().sum::<f64>()
                    );
                    let setup = StreamSetup {
                        measured_ms: Some(&measured),
                        ..setup
                    };
                    let mut weights = stream_weights(gpu, &component, dit.arch(), setup)?;
                    eprintln!("[host tier: {}]", weights.host_mode());
                    eprint!("{}", weights.plan());
                    let log = Arc::new(Mutex::new(Vec::new()));
                    weights.log_stats(log.clone());
                    let capture = TimelineCapture::new();
                    if args.timeline.is_some() {
                        weights.capture_timeline(capture.clone());
                    }
                    let rows =
                        time_all(gpu, &dit, &mut weights, args, h, w, Some((&log, &capture)))?;
                    if let Some(path) = &args.timeline {
                        draw(
                            args,
                            caption_tokens,
                            path,
                            gpu,
                            &component,
                            &label,
                            &device,
                            &log,
                            &capture,
                        )?;
                    }
                    (device, rows)
                }
            }
        }
    };
    let modulation = match &dit {
        Dit::QwenImage(_, Some(_)) | Dit::Flux(_, Some(_)) => "precomputed",
        _ => "in steps",
    };
    report(
        args,
        &label,
        &device,
        (width, height, caption_tokens),
        (modulation, modulation_s),
        &rows,
    )
}

/// `--caption-tokens`, by default 512 for Flux.1 (its pipeline pads T5's tokens to 512) and
/// 100 for the others.
fn caption_tokens(args: &BenchArgs, dit: &Dit) -> usize {
    args.caption_tokens.unwrap_or(match dit {
        Dit::Flux(..) => ferry::diffuse::flux_pipeline::MAX_SEQUENCE_LENGTH,
        _ => 100,
    })
}

/// Every batch size: warm-up steps, then timed ones. With `streamed`, each step's pass
/// statistics are read from the log, and the last timed step of the largest batch is
/// captured for `--timeline`.
fn time_all<B: DitOps>(
    backend: &B,
    dit: &Dit,
    weights: &mut impl Weights<B::Weight>,
    args: &BenchArgs,
    h: usize,
    w: usize,
    streamed: Option<(&Arc<Mutex<Vec<PassStats>>>, &TimelineCapture)>,
) -> Result<Vec<Row>> {
    let largest = args.batch.iter().max().copied().unwrap_or(1);
    let mut rows = Vec::new();
    for &batch in &args.batch {
        let (latents, caption) = dit.inputs(batch, h, w, caption_tokens(args, dit));
        let (mut step_s, mut passes) = (Vec::new(), Vec::new());
        for run in 0..args.warmup + args.runs {
            let last = run + 1 == args.warmup + args.runs;
            if let Some((log, capture)) = streamed {
                log.lock().expect("stats log").clear();
                if last && batch == largest && args.timeline.is_some() {
                    capture.arm();
                }
            }
            let start = Instant::now();
            dit.forward(backend, weights, &latents, &caption, batch, h, w)?;
            let secs = start.elapsed().as_secs_f64();
            if run < args.warmup {
                continue;
            }
            step_s.push(secs);
            if let Some((log, _)) = streamed {
                passes.extend(log.lock().expect("stats log").iter().cloned());
            }
        }
        let step = median(&mut step_s);
        let streamed = (!passes.is_empty()).then(|| {
            passes.sort_by(|a, b| a.pass_ms.total_cmp(&b.pass_ms));
            let p = &passes[passes.len() / 2];
            Streamed {
                pass_s: p.pass_ms / 1e3,
                bound_s: p.bound_ms / 1e3,
                efficiency: p.efficiency,
                stall_s: p.stall_ms / 1e3,
                decode_s: p.decode_ms / 1e3,
                copy_s: p.copy_ms / 1e3,
                streamed_gb: p.streamed_bytes as f64 / 1e9,
                achieved_gbps: p.achieved_gbps,
                peak_device_bytes: p.device_bytes,
                ledger_peak_bytes: p.allocated_peak,
            }
        });
        rows.push(Row {
            batch,
            step_s: step,
            per_image_s: step / batch as f64,
            streamed,
        });
    }
    Ok(rows)
}

/// `--timeline`: the captured step as an SVG picture.
#[allow(clippy::too_many_arguments)]
fn draw(
    args: &BenchArgs,
    caption_tokens: usize,
    path: &std::path::Path,
    gpu: &Cuda,
    component: &Component,
    label: &str,
    device: &str,
    log: &Arc<Mutex<Vec<PassStats>>>,
    capture: &TimelineCapture,
) -> Result<()> {
    let events = capture
        .take()
        .ok_or_else(|| Error::Device("--timeline: the streamed step was not caught".into()))?;
    // The log holds the last step's statistics (cleared before each step).
    let stats = log.lock().expect("stats log").last().cloned();
    let Some(stats) = stats else {
        return Err(Error::Device(
            "--timeline: the streamed step's statistics were not kept".into(),
        ));
    };
    let batch = args.batch.iter().max().copied().unwrap_or(1);
    let info = super::bench_cuda::pass_info(
        format!("{label} ({:.2} GB)", component.bytes() as f64 / 1e9),
        format!(
            "one denoising step at {}, {batch} image(s), {} caption tokens",
            args.size, caption_tokens
        ),
        gpu.memory().budget(),
        batch,
        device,
        &stats,
    );
    write_svg(path, &events, &info)?;
    eprintln!("[timeline of one step written to {}]", path.display());
    Ok(())
}

fn report(
    args: &BenchArgs,
    label: &str,
    device: &str,
    (width, height, caption_tokens): (usize, usize, usize),
    (modulation, modulation_s): (&str, Option<f64>),
    rows: &[Row],
) -> Result<()> {
    let date = ferry::date::today_utc();
    let out = serde_json::json!({
        "model": label, "device": device, "date": date, "vram": args.vram,
        "width": width, "height": height, "caption_tokens": caption_tokens,
        "modulation": modulation, "modulation_precompute_s": modulation_s,
        "runs": args.runs, "warmup": args.warmup, "results": rows,
    });
    args.json.emit(&out)?;
    if args.json.replaces_table() {
        return Ok(());
    }
    println!("model   {label}");
    println!(
        "device  {device}; {date}; one denoising step at {width}x{height} with {} caption tokens, modulation {modulation}{}; median of {} steps after {} warm-up{}",
        caption_tokens,
        modulation_s
            .map(|s| format!(" (once, {s:.2} s)"))
            .unwrap_or_default(),
        args.runs,
        args.warmup,
        args.vram
            .as_ref()
            .map(|v| format!("; --vram {v}"))
            .unwrap_or_default()
    );
    match rows.iter().any(|r| r.streamed.is_some()) {
        true => println!(
            "{:>6} {:>9} {:>11} {:>9} {:>9} {:>6} {:>9} {:>9} {:>10}",
            "batch",
            "step s",
            "per image",
            "pass s",
            "bound s",
            "eff",
            "stall s",
            "GB/step",
            "peak GiB"
        ),
        false => println!("{:>6} {:>9} {:>11}", "batch", "step s", "per image"),
    }
    for r in rows {
        match &r.streamed {
            Some(s) => println!(
                "{:>6} {:>9.4} {:>11.4} {:>9.4} {:>9.4} {:>6.3} {:>9.4} {:>9.2} {:>10.2}",
                r.batch,
                r.step_s,
                r.per_image_s,
                s.pass_s,
                s.bound_s,
                s.efficiency,
                s.stall_s,
                s.streamed_gb,
                s.ledger_peak_bytes as f64 / (1u64 << 30) as f64
            ),
            None => println!("{:>6} {:>9.4} {:>11.4}", r.batch, r.step_s, r.per_image_s),
        }
    }
    Ok(())
}
