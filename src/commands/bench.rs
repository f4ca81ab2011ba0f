//! `ferry bench`: prompt-pass and decode speed on any device, whole or streamed within a VRAM
//! budget, at given prompt lengths and batch sizes: medians of several runs after a warm-up,
//! as a table for people and JSON for programs, with the PCIe bound and the overlap
//! efficiency beside each streamed figure; `--timeline` draws one streamed prompt pass.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use clap::Args;

use super::median;
use indicatif::{ProgressBar, ProgressStyle};

use ferry::backend::cpu::Cpu;
use ferry::backend::cuda::streaming::PassStats;
use ferry::backend::{Backend, Device};
use ferry::generate::{Generator, Request, SamplingConfig, TextCodec};
use ferry::model::{Llama, PassShape};
use ferry::runtime::{open_checkpoint, open_device, stream_weights, StreamSetup};
use ferry::stream::timeline::{write_svg, TimelineCapture, TimelineEvent};
use ferry::stream::Vram;
use ferry::synth::random_token_ids;
use ferry::{Error, Result};

use super::{at_least, HostMemoryArg, JsonArg};

#[derive(Args)]
pub struct BenchArgs {
    /// A model directory, a .gguf file, or ORG/NAME from the Hugging Face cache; a diffusers
    /// Z-Image or Qwen-Image directory (or its transformer/) times denoising steps of the DiT
    /// instead.
    #[arg(
        long,
        short,
        required_unless_present = "synthetic",
        conflicts_with = "synthetic"
    )]
    pub(super) model: Option<String>,
    /// Random weights of a preset's shape, made in memory (see `ferry synth --list`;
    /// z-image-turbo: the Z-Image-Turbo DiT; qwen-image: the Qwen-Image DiT).
    #[arg(long, value_name = "PRESET")]
    pub(super) synthetic: Option<String>,
    /// Image models: the image's WIDTHxHEIGHT.
    #[arg(long, default_value = "1024x1024")]
    pub(super) size: String,
    /// Image models: caption tokens per image. Default: 512 for Flux.1 (its pipeline pads
    /// T5's tokens to 512), else 100.
    #[arg(long)]
    pub(super) caption_tokens: Option<usize>,
    /// Qwen-Image: the timestep-only modulation computed once before the steps (precomputed,
    /// the default: those weights, a third of the model, do not stream during the steps), or
    /// by every step (in-steps).
    #[arg(long, value_enum, value_name = "precomputed|in-steps")]
    pub(super) modulation: Option<super::bench_dit::ModulationArg>,
    /// Prompt lengths to time, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "128", value_parser = at_least(1), allow_negative_numbers = true)]
    pub(super) prompt_tokens: Vec<usize>,
    /// Sequences per pass (images per step for image models), comma-separated: each batch
    /// size is timed at each prompt length.
    #[arg(long, value_delimiter = ',', default_value = "1", value_parser = at_least(1), allow_negative_numbers = true)]
    pub(super) batch: Vec<usize>,
    /// Tokens to decode after each prompt (0: prompt pass only).
    #[arg(long, default_value = "32", value_parser = at_least(0), allow_negative_numbers = true)]
    pub(super) decode_tokens: usize,
    /// Timed runs per figure (the median is reported).
    #[arg(long, default_value = "5", value_parser = at_least(1), allow_negative_numbers = true)]
    pub(super) runs: usize,
    /// Untimed runs first.
    #[arg(long, default_value = "1", value_parser = at_least(0), allow_negative_numbers = true)]
    pub(super) warmup: usize,
    /// Where to compute: auto, cpu, or cuda[:N].
    #[arg(long, default_value = "auto", value_name = "auto|cpu|cuda[:N]")]
    pub(super) device: Device,
    /// With --device cpu: threads of the CPU backend. Default: one per core.
    #[arg(long, value_name = "N", value_parser = at_least(1), allow_negative_numbers = true)]
    pub(super) threads: Option<usize>,
    /// GPU memory budget (6GiB, 2.6GiB, auto): stream what does not fit. The plan is made
    /// for the largest pass (longest prompt × largest batch).
    #[arg(long, value_name = "SIZE|auto", allow_negative_numbers = true)]
    pub(super) vram: Option<String>,
    #[command(flatten)]
    pub(super) host_memory: HostMemoryArg,
    #[command(flatten)]
    pub(super) json: JsonArg,
    /// With --vram on a GPU: draw one streamed pass (copy and compute of each weight group on
    /// two lanes) as an SVG picture in this file: the prompt pass of the last timed run at
    /// the longest prompt × the largest batch.
    #[arg(long, value_name = "FILE.svg")]
    pub(super) timeline: Option<PathBuf>,
}

/// The pass drawn for `--timeline`: its events and stats, and the point it belongs to.
struct DrawnPass {
    events: Vec<TimelineEvent>,
    stats: PassStats,
    prompt_tokens: usize,
    batch: usize,
}

/// What the streaming engine records during the runs: every pass's stats, and with
/// `--timeline` the pass to draw.
struct Recorders<'a> {
    log: &'a Arc<Mutex<Vec<PassStats>>>,
    /// Set with `--timeline`: armed for the prompt pass of the last timed run of the largest
    /// point.
    timeline: Option<&'a TimelineCapture>,
}

/// One row of the result: a prompt length, a batch size, and their medians.
#[derive(serde::Serialize)]
struct Row {
    prompt_tokens: usize,
    batch: usize,
    /// The pass over every sequence's prompt, seconds.
    prompt_s: f64,
    /// Generated tokens per second over the passes after the prompt pass (all sequences).
    decode_tok_s: f64,
    /// Streamed only: the prompt pass's and a decode pass's PCIe bound and efficiency.
    streamed: Option<StreamedFigures>,
}

#[derive(serde::Serialize)]
struct StreamedFigures {
    prompt_bound_s: f64,
    prompt_efficiency: f64,
    decode_pass_s: f64,
    decode_bound_s: f64,
    decode_efficiency: f64,
    streamed_gb_per_pass: f64,
    achieved_gbps: f64,
    peak_device_bytes: usize,
}

pub fn bench(args: BenchArgs) -> Result<()> {
    if super::bench_dit::is_image_model(&args) {
        check_timeline(&args)?;
        return super::bench_dit::bench_dit(&args);
    }
    check_timeline(&args)?;
    let threads_on_gpu = || Error::Flag {
        flag: "--threads",
        message: "sets the CPU backend's threads, and this bench is on a GPU; give --device cpu"
            .into(),
    };
    if let Some(n) = args.threads {
        if matches!(args.device, Device::Cuda(_)) {
            return Err(threads_on_gpu());
        }
        super::generation::set_threads(n)?;
    }
    // On the GPU a GGUF's blocks stream as stored; the CPU computes from f32.
    let gguf = match args.device {
        Device::Cuda(_) => ferry::checkpoint::gguf::Weights::Blocks,
        _ => ferry::checkpoint::gguf::Weights::Dequantized(ferry::checkpoint::DType::F32),
    };
    let (ckpt, label) = open_checkpoint(args.model.as_deref(), args.synthetic.as_deref(), gguf)?;
    let longest = args.prompt_tokens.iter().max().copied().unwrap_or(1) + args.decode_tokens + 1;
    let context = Some(longest.min(ckpt.config.max_position_embeddings));
    let vram = args.vram.as_deref().map(Vram::parse).transpose()?;
    let gpu = open_device(args.device, vram)?;
    if gpu.is_some() && args.threads.is_some() {
        return Err(threads_on_gpu());
    }
    let (device, rows) = match gpu {
        None => {
            let device = format!(
                "{} ({})",
                cpu_name(),
                super::plural(rayon::current_num_threads(), "thread")
            );
            let mut gen = Generator::new(&ckpt, Cpu, context)?;
            (device, time_all(&mut gen, &args, None)?.0)
        }
        Some(gpu) => {
            gpu.prepare(ckpt.config.head_dim)?;
            let device = gpu.info().to_string();
            if vram.is_none() {
                let mut gen = Generator::new(&ckpt, gpu, context)?;
                (device, time_all(&mut gen, &args, None)?.0)
            } else {
                let model = Llama::new(ckpt.config.clone());
                let shape = PassShape {
                    tokens: args.prompt_tokens.iter().max().copied().unwrap_or(1),
                    batch: args.batch.iter().max().copied().unwrap_or(1),
                    past: args.decode_tokens,
                };
                let setup = StreamSetup::new(shape, args.host_memory.options());
                let mut weights = stream_weights(&gpu, &ckpt, &model, setup)?;
                eprintln!("[host tier: {}]", weights.host_mode());
                eprint!("{}", weights.plan());
                let log = Arc::new(Mutex::new(Vec::new()));
                weights.log_stats(log.clone());
                let capture = TimelineCapture::new();
                if args.timeline.is_some() {
                    weights.capture_timeline(capture.clone());
                }
                let budget = gpu.memory().budget();
                let mut gen = Generator::with_weights(
                    &ckpt,
                    gpu,
                    Some(Box::new(weights)),
                    TextCodec::open(&ckpt)?,
                    context,
                )?;
                let recorders = Recorders {
                    log: &log,
                    timeline: args.timeline.is_some().then_some(&capture),
                };
                let (rows, drawn) = time_all(&mut gen, &args, Some(recorders))?;
                if let Some(path) = &args.timeline {
                    let d = drawn.ok_or_else(|| {
                        Error::Device("--timeline: the streamed prompt pass was not caught".into())
                    })?;
                    let info = super::bench_cuda::pass_info(
                        format!("{label} ({:.2} GB)", ckpt.bytes() as f64 / 1e9),
                        format!(
                            "prompt pass of {} × {} tokens, the last of {} timed runs",
                            d.batch, d.prompt_tokens, args.runs
                        ),
                        budget,
                        d.batch * d.prompt_tokens,
                        &device,
                        &d.stats,
                    );
                    write_svg(path, &d.events, &info)?;
                    eprintln!(
                        "[timeline of the prompt pass, {} × {} tokens, written to {}]",
                        d.batch,
                        d.prompt_tokens,
                        path.display()
                    );
                }
                (device, rows)
            }
        }
    };
    report(&args, &label, &device, vram.is_some(), &rows)
}

/// `--timeline` draws a pass streamed to a GPU, as an SVG picture: say so before anything
/// is loaded when it cannot.
fn check_timeline(args: &BenchArgs) -> Result<()> {
    let Some(path) = &args.timeline else {
        return Ok(());
    };
    let why = if args.device == Device::Cpu {
        "draws a pass streamed to a GPU; nothing streams on the CPU (--device cpu)"
    } else if args.vram.is_none() {
        "draws a streamed pass; give --vram SIZE|auto too (without it every weight is resident and nothing streams)"
    } else if !path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("svg"))
    {
        "writes an SVG picture; give a path ending in .svg"
    } else {
        return Ok(());
    };
    Err(Error::Flag {
        flag: "--timeline",
        message: why.into(),
    })
}

/// Every prompt length × batch size, with a progress bar on a terminal's stderr (one step a
/// run). With `recorders` (streamed runs), also the pass drawn for `--timeline`, if any.
fn time_all<B: Backend>(
    gen: &mut Generator<B>,
    args: &BenchArgs,
    recorders: Option<Recorders<'_>>,
) -> Result<(Vec<Row>, Option<DrawnPass>)> {
    let points = args.prompt_tokens.len() * args.batch.len();
    let bar = if std::io::stderr().is_terminal() {
        let bar = ProgressBar::new((points * (args.warmup + args.runs)) as u64);
        bar.set_style(
            ProgressStyle::with_template("{msg} [{wide_bar}] {pos}/{len} runs, {elapsed}")
                .expect("a valid template")
                .progress_chars("=> "),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    // The largest point, which the planner planned for: the one drawn.
    let largest = (
        args.prompt_tokens.iter().max().copied().unwrap_or(1),
        args.batch.iter().max().copied().unwrap_or(1),
    );
    let mut rows = Vec::new();
    let mut drawn = None;
    for &n in &args.prompt_tokens {
        for &b in &args.batch {
            bar.set_message(format!("bench {n} tokens × batch {b}"));
            let here = recorders.as_ref().map(|s| Recorders {
                log: s.log,
                timeline: s.timeline.filter(|_| (n, b) == largest),
            });
            let (row, d) = time_one(gen, n, b, args, here, &bar)?;
            rows.push(row);
            drawn = drawn.or(d);
        }
    }
    bar.finish_and_clear();
    Ok((rows, drawn))
}

fn time_one<B: Backend>(
    gen: &mut Generator<B>,
    n: usize,
    batch: usize,
    args: &BenchArgs,
    recorders: Option<Recorders<'_>>,
    bar: &ProgressBar,
) -> Result<(Row, Option<DrawnPass>)> {
    let log = recorders.as_ref().map(|s| s.log);
    let timeline = recorders.as_ref().and_then(|s| s.timeline);
    let last = args.warmup + args.runs - 1;
    let vocab = gen.model.config.vocab_size;
    // Token ids spread over the vocabulary, different for each sequence, the same every run.
    let requests: Vec<Request> = (0..batch as u64)
        .map(|s| Request {
            prompt: random_token_ids(n, vocab, s),
            max_tokens: args.decode_tokens + 1,
            sampling: SamplingConfig::default(),
            stop_strings: vec![],
            ignore_eos: true,
        })
        .collect();
    let (mut prompt_s, mut decode, mut prompt_stats, mut decode_stats) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut drawn = None;
    for run in 0..args.warmup + args.runs {
        if let Some(log) = log {
            log.lock().expect("stats log").clear();
        }
        // Every sequence is admitted at once: the run's first pass is the prompt pass.
        let draw = timeline.filter(|_| run == last);
        if let Some(capture) = draw {
            capture.arm();
        }
        let (_, stats) = gen.generate_batch(&requests, batch, &mut |_, _| {})?;
        bar.inc(1);
        if run < args.warmup {
            continue;
        }
        prompt_s.push(stats.pass_secs[0]);
        if stats.passes > 1 {
            decode.push(stats.decode_tok_s());
        }
        if let Some(log) = log {
            let passes = log.lock().expect("stats log");
            if let Some((first, rest)) = passes.split_first() {
                if let Some(events) = draw.and_then(TimelineCapture::take) {
                    drawn = Some(DrawnPass {
                        events,
                        stats: first.clone(),
                        prompt_tokens: n,
                        batch,
                    });
                }
                prompt_stats.push(first.clone());
                if let Some(mid) = rest.get(rest.len() / 2) {
                    decode_stats.push(mid.clone());
                }
            }
        }
    }
    let streamed = match (prompt_stats.is_empty(), decode_stats.is_empty()) {
        (true, _) => None,
        (false, no_decode) => {
            let p = median_by(&mut prompt_stats, |s| s.pass_ms);
            let d = if no_decode {
                p.clone()
            } else {
                median_by(&mut decode_stats, |s| s.pass_ms)
            };
            Some(StreamedFigures {
                prompt_bound_s: p.bound_ms / 1e3,
                prompt_efficiency: p.efficiency,
                decode_pass_s: d.pass_ms / 1e3,
                decode_bound_s: d.bound_ms / 1e3,
                decode_efficiency: d.efficiency,
                streamed_gb_per_pass: p.streamed_bytes as f64 / 1e9,
                achieved_gbps: p.achieved_gbps,
                peak_device_bytes: p.device_bytes.max(d.device_bytes),
            })
        }
    };
    let row = Row {
        prompt_tokens: n,
        batch,
        prompt_s: median(&mut prompt_s),
        decode_tok_s: if decode.is_empty() {
            0.0
        } else {
            median(&mut decode)
        },
        streamed,
    };
    Ok((row, drawn))
}

fn report(args: &BenchArgs, label: &str, device: &str, streamed: bool, rows: &[Row]) -> Result<()> {
    let date = ferry::date::today_utc();
    args.json.emit(&serde_json::json!({
        "model": label, "device": device, "date": date, "vram": args.vram,
        "runs": args.runs, "warmup": args.warmup, "decode_tokens": args.decode_tokens,
        "results": rows,
    }))?;
    if args.json.replaces_table() {
        return Ok(());
    }
    println!("model   {label}");
    println!(
        "device  {device}; {date}; median of {} runs after {} warm-up{}",
        args.runs,
        args.warmup,
        args.vram
            .as_ref()
            .map(|v| format!("; --vram {v}"))
            .unwrap_or_default()
    );
    if streamed {
        println!(
            "{:>7} {:>6} {:>10} {:>9} {:>6} {:>13} {:>10} {:>9} {:>6}",
            "prompt",
            "batch",
            "prompt s",
            "bound s",
            "eff",
            "decode tok/s",
            "pass s",
            "bound s",
            "eff"
        );
    } else {
        println!(
            "{:>7} {:>6} {:>10} {:>13} {:>13}",
            "prompt", "batch", "prompt s", "prompt tok/s", "decode tok/s"
        );
    }
    for r in rows {
        match &r.streamed {
            Some(s) => println!(
                "{:>7} {:>6} {:>10.4} {:>9.4} {:>6.3} {:>13.1} {:>10.4} {:>9.4} {:>6.3}",
                r.prompt_tokens,
                r.batch,
                r.prompt_s,
                s.prompt_bound_s,
                s.prompt_efficiency,
                r.decode_tok_s,
                s.decode_pass_s,
                s.decode_bound_s,
                s.decode_efficiency
            ),
            None => println!(
                "{:>7} {:>6} {:>10.4} {:>13.1} {:>13.1}",
                r.prompt_tokens,
                r.batch,
                r.prompt_s,
                (r.prompt_tokens * r.batch) as f64 / r.prompt_s,
                r.decode_tok_s
            ),
        }
    }
    Ok(())
}

/// The element at the median of `key`.
fn median_by<T: Clone>(xs: &mut [T], key: impl Fn(&T) -> f64) -> T {
    xs.sort_by(|a, b| key(a).total_cmp(&key(b)));
    xs[xs.len() / 2].clone()
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "CPU".into())
}
