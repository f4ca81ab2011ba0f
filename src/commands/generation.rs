//! What `ferry run` and `ferry chat` share: how tokens are picked, when generation stops,
//! where it computes, and a generator set up on that device.

use std::sync::{Arc, Mutex};

use clap::Args;

use ferry::backend::cpu::Cpu;
use ferry::backend::cuda::streaming::PassStats;
use ferry::backend::cuda::Cuda;
use ferry::backend::{Backend, Device};
use ferry::checkpoint::gguf::Weights;
use ferry::checkpoint::DType;
use ferry::generate::{Generator, SamplingConfig, TextCodec, UNTIL_CONTEXT_FULL};
use ferry::model::Checkpoint;
use ferry::model::{Llama, PassShape};
use ferry::runtime::{open_device, stream_weights, StreamSetup};
use ferry::stream::{human_bytes, Vram};
use ferry::{Error, Result};

use super::{at_least, random_seed, HostMemoryArg};

/// How the next token is picked.
#[derive(Args)]
pub struct SamplingArgs {
    /// Sampling temperature; 0 picks the most likely token every time (greedy).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f32,
    /// With --temperature > 0: sample only among the K most likely tokens (0: all of them).
    #[arg(long, value_name = "K", value_parser = at_least(0), allow_negative_numbers = true)]
    top_k: Option<usize>,
    /// With --temperature > 0: sample only among the most likely tokens whose probabilities
    /// add up to P.
    #[arg(long, value_name = "P", allow_negative_numbers = true)]
    top_p: Option<f32>,
    /// Penalize tokens already in the text (1.0: off; 1.1 is a common choice).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    repetition_penalty: f32,
    /// With --temperature > 0: seed for sampling; the same seed gives the same text.
    /// Default: a random seed, printed with the statistics.
    #[arg(long, value_parser = seed, allow_negative_numbers = true)]
    seed: Option<u64>,
}

/// When generation stops.
#[derive(Args)]
pub struct StopArgs {
    /// Most tokens to generate; -1: until the context is full (or an end of sequence).
    #[arg(long, default_value = "256", value_name = "N", value_parser = max_tokens, allow_negative_numbers = true)]
    pub max_tokens: usize,
    /// Stop when this text appears (may be given several times).
    #[arg(long = "stop", value_name = "TEXT", allow_hyphen_values = true)]
    pub stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Context length: most tokens (prompt + generated). Default: the model's maximum.
    #[arg(long, value_parser = at_least(1), allow_negative_numbers = true)]
    pub context: Option<usize>,
}

/// Where the model computes, and how much of the GPU it may use.
#[derive(Args)]
pub struct ComputeArgs {
    /// Where to compute: auto (the GPU when one is usable, else the CPU), cpu, or cuda[:N].
    #[arg(long, default_value = "auto", value_name = "auto|cpu|cuda[:N]")]
    pub device: Device,
    /// Threads of the CPU backend. Default: one per core.
    #[arg(long, value_name = "N", value_parser = at_least(1), allow_negative_numbers = true)]
    threads: Option<usize>,
    /// GPU memory budget: a size (6GiB, 2.5GB) or auto (free memory minus 512 MiB). Weights
    /// that do not fit stream from host memory during each pass. Default: all resident.
    #[arg(long, value_name = "SIZE|auto", allow_negative_numbers = true)]
    pub vram: Option<String>,
    /// With --vram: print per-pass streaming stats (bytes streamed, GB/s, compute, stall,
    /// overlap efficiency, device memory).
    #[arg(long, requires = "vram")]
    stats: bool,
    #[command(flatten)]
    host_memory: HostMemoryArg,
}

/// `--max-tokens`: a count, or -1 for "until the context is full".
pub fn max_tokens(s: &str) -> Result<usize, String> {
    match s.trim().parse::<i128>() {
        Ok(-1) => Ok(UNTIL_CONTEXT_FULL),
        Ok(n) if (0..usize::MAX as i128).contains(&n) => Ok(n as usize),
        _ => Err(format!(
            "expected a number of tokens ≥ 0, or -1 for until the context is full; found {s:?}"
        )),
    }
}

/// `--seed`: a whole number ≥ 0.
fn seed(s: &str) -> Result<u64, String> {
    s.trim().parse::<u64>().map_err(|_| {
        format!("expected a whole number ≥ 0 (leave --seed out for a random one); found {s:?}")
    })
}

fn bad(flag: &'static str, message: &str) -> Result<()> {
    Err(Error::Flag {
        flag,
        message: message.into(),
    })
}

impl SamplingArgs {
    /// The flags' ranges; and flags that would change nothing are refused, not ignored.
    pub fn check(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad("--temperature", "expected a number ≥ 0");
        }
        if self.temperature == 0.0 {
            // Greedy picks the most likely token: these would change nothing.
            for (flag, given) in [
                ("--top-k", self.top_k.is_some()),
                ("--top-p", self.top_p.is_some()),
                ("--seed", self.seed.is_some()),
            ] {
                if given {
                    return bad(
                        flag,
                        "acts only when sampling; give --temperature > 0 too (at 0 the most likely token is always picked)",
                    );
                }
            }
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return bad("--top-p", "expected a number in (0, 1]");
            }
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad("--repetition-penalty", "expected a number > 0");
        }
        Ok(())
    }

    /// The seed where something is sampled: `--seed`, or a random one (to be printed); None
    /// when greedy.
    pub fn seed(&self) -> Option<u64> {
        (self.temperature > 0.0).then(|| self.seed.unwrap_or_else(random_seed))
    }

    /// The sampling of a sequence drawn from `seed` (see [`seed`](Self::seed)).
    pub fn config(&self, seed: Option<u64>) -> SamplingConfig {
        SamplingConfig {
            temperature: self.temperature,
            // 0: off, every token a candidate.
            top_k: self.top_k.filter(|&k| k > 0),
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            seed: seed.unwrap_or(0),
        }
    }
}

impl StopArgs {
    pub fn check(&self) -> Result<()> {
        if self.stop.iter().any(String::is_empty) {
            return bad(
                "--stop",
                "the text is empty, and would stop generation at once; give the text to stop at",
            );
        }
        Ok(())
    }
}

impl ComputeArgs {
    /// Set up what must be set before anything computes: the CPU backend's threads.
    pub fn start(&self) -> Result<()> {
        if let Some(n) = self.threads {
            if matches!(self.device, Device::Cuda(_)) {
                return bad(
                    "--threads",
                    "sets the CPU backend's threads; with --device cuda the GPU computes",
                );
            }
            set_threads(n)?;
        }
        Ok(())
    }
}

/// `--threads N`: the CPU backend's threads (rayon's pool), set before anything computes.
pub fn set_threads(n: usize) -> Result<()> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .map_err(|e| Error::Flag {
            flag: "--threads",
            message: e.to_string(),
        })
}

/// Work to do with a generator, on whichever backend it was set up.
pub trait GeneratorTask {
    fn run<B: Backend>(self, gen: Generator<B>, device: &str) -> Result<()>
    where
        B::Weight: 'static;

    /// Where streamed weights log their passes for the task to read (`ferry serve`'s
    /// metrics); None: only with --stats.
    fn pass_log(&self) -> Option<Arc<Mutex<Vec<PassStats>>>> {
        None
    }
}

/// The GPU `compute` names (`None`: the CPU computes).
pub fn open_compute(compute: &ComputeArgs) -> Result<Option<Cuda>> {
    let vram = compute.vram.as_deref().map(Vram::parse).transpose()?;
    open_device(compute.device, vram)
}

/// The checkpoint `model` names, for computing on `gpu`: a GGUF's blocks kept as stored for
/// the GPU (streamed as they are, dequantized on the device), dequantized to f32 for the CPU
/// (the values the file encodes, which the CPU's f32 math then uses as they are).
pub fn open_model(model: &str, gpu: &Option<Cuda>) -> Result<Checkpoint> {
    Checkpoint::open_as(
        model,
        if gpu.is_some() {
            Weights::Blocks
        } else {
            Weights::Dequantized(DType::F32)
        },
    )
}

/// The pass a streamed generator is planned for: its shape, and its activation bytes where
/// they are not the shape's own (a server's pass mixes decoding tokens and prompt pieces).
pub struct PlannedPass {
    pub shape: PassShape,
    pub workspace: Option<usize>,
}

impl From<PassShape> for PlannedPass {
    fn from(shape: PassShape) -> PlannedPass {
        PlannedPass {
            shape,
            workspace: None,
        }
    }
}

/// On `gpu` (from [`open_compute`]; the CPU when `None`), a generator of `context` positions,
/// its weights resident or (with --vram) streamed and planned for passes of `pass`; hand it
/// to `task`. Prints the host tier and the plan unless `quiet`, and with --stats the
/// streaming stats after the task.
#[allow(clippy::too_many_arguments)]
pub fn with_generator(
    ckpt: &Checkpoint,
    gpu: Option<Cuda>,
    text: TextCodec,
    context: usize,
    compute: &ComputeArgs,
    quiet: bool,
    pass: PlannedPass,
    task: impl GeneratorTask,
) -> Result<()> {
    let vram = compute.vram.as_deref().map(Vram::parse).transpose()?;
    let Some(gpu) = gpu else {
        let gen = Generator::with_weights(ckpt, Cpu, None, text, Some(context))?;
        return task.run(gen, "cpu");
    };
    if compute.threads.is_some() {
        return bad(
            "--threads",
            "sets the CPU backend's threads, and this run is on the GPU (--device auto found one); give --device cpu to compute on the CPU",
        );
    }
    gpu.prepare(ckpt.config.head_dim)?;
    let device = gpu.info().to_string();
    if vram.is_none() {
        let gen = Generator::with_weights(ckpt, gpu, None, text, Some(context))?;
        return task.run(gen, &device);
    }
    let model = Llama::new(ckpt.config.clone());
    let setup = StreamSetup {
        workspace: pass.workspace,
        ..StreamSetup::new(pass.shape, compute.host_memory.options())
    };
    let mut weights = stream_weights(&gpu, ckpt, &model, setup)?;
    if !quiet {
        eprintln!("[host tier: {}]", weights.host_mode());
        eprint!("{}", weights.plan());
    }
    let log = task.pass_log();
    let log = log.unwrap_or_else(|| Arc::new(Mutex::new(Vec::new())));
    if compute.stats || task.pass_log().is_some() {
        weights.log_stats(log.clone());
    }
    let gen = Generator::with_weights(ckpt, gpu, Some(Box::new(weights)), text, Some(context))?;
    task.run(gen, &device)?;
    if compute.stats {
        print_stats(&log.lock().expect("stats log"));
    }
    Ok(())
}

/// Per-pass streaming stats: the first pass (the prompt), then the mean of the others.
fn print_stats(passes: &[PassStats]) {
    let line = |what: &str, s: &PassStats| {
        eprintln!(
            "[{what}: {:.1} ms; streamed {:.2} GB at {:.1} GB/s; compute {:.1} ms{}, stall {:.1} ms; bound {:.1} ms, overlap efficiency {:.3}; device memory {} (driver), {} peak allocated]",
            s.pass_ms,
            s.streamed_bytes as f64 / 1e9,
            s.achieved_gbps,
            s.compute_ms,
            match s.decode_ms {
                0.0 => String::new(),
                d => format!(" (decoding {d:.1} ms)"),
            },
            s.stall_ms,
            s.bound_ms,
            s.efficiency,
            human_bytes(s.device_bytes),
            human_bytes(s.allocated_peak),
        )
    };
    if let Some(first) = passes.first() {
        line("pass 1", first);
    }
    if passes.len() > 1 {
        let rest = &passes[1..];
        let n = rest.len() as f64;
        let mean = |f: fn(&PassStats) -> f64| rest.iter().map(f).sum::<f64>() / n;
        let last = rest.last().expect("one pass at least");
        let avg = PassStats {
            pass_ms: mean(|s| s.pass_ms),
            stall_ms: mean(|s| s.stall_ms),
            compute_ms: mean(|s| s.compute_ms),
            decode_ms: mean(|s| s.decode_ms),
            copy_ms: mean(|s| s.copy_ms),
            achieved_gbps: mean(|s| s.achieved_gbps),
            bound_ms: mean(|s| s.bound_ms),
            efficiency: mean(|s| s.efficiency),
            group_compute_ms: Vec::new(),
            ..last.clone()
        };
        line(&format!("passes 2-{} (mean)", passes.len()), &avg);
    }
}

/// `n` tokens over `secs` as "12.3 tok/s", or "no pass" when nothing ran (`--max-tokens 0`).
pub fn rate(n: usize, secs: f64) -> String {
    if secs > 0.0 {
        format!("{:.1} tok/s", n as f64 / secs)
    } else {
        "no pass".into()
    }
}
