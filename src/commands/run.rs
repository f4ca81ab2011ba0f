//! `ferry run`: generate text from a prompt.

use std::io::{IsTerminal, Read, Write};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use ferry::backend::cpu::Cpu;
use std::sync::{Arc, Mutex};

use ferry::backend::cuda::streaming::PassStats;
use ferry::backend::{Backend, Device};
use ferry::checkpoint::Checkpoint;
use ferry::generate::{Generator, Message, Progress, Request, SamplingConfig, TextCodec};
use ferry::model::{Llama, PassShape, Weights};
use ferry::runtime::{open_device, stream_weights, StreamSetup};
use ferry::stream::{human_bytes, Vram};
use ferry::{Error, Result};

use super::{HostMemoryArg, ModelArg};

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// The prompt. Read from standard input when omitted.
    #[arg(long, short, conflicts_with = "prompts")]
    prompt: Option<String>,
    /// Many prompts, one per line (in a .jsonl file: one JSON string or {"prompt": ...} per
    /// line). They are generated together, --batch sequences per pass over the weights.
    #[arg(long, value_name = "FILE")]
    prompts: Option<std::path::PathBuf>,
    /// Most sequences per pass with --prompts: one pass over the weights serves them all.
    #[arg(long, default_value_t = 16, value_name = "N")]
    batch: usize,
    /// With --prompts: print one JSON object per prompt instead of text blocks.
    #[arg(long, requires = "prompts")]
    json: bool,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    chat: bool,
    /// A system message for --chat.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Sampling temperature; 0 picks the most likely token every time (greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Sample only among the K most likely tokens.
    #[arg(long, value_name = "K")]
    top_k: Option<usize>,
    /// Sample only among the most likely tokens whose probabilities add up to P.
    #[arg(long, value_name = "P")]
    top_p: Option<f32>,
    /// Penalize tokens already in the text (1.0: off; 1.1 is a common choice).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Seed for sampling; the same seed gives the same text.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when this text appears (may be given several times).
    #[arg(long = "stop", value_name = "TEXT")]
    stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Context length: most tokens (prompt + generated). Default: the model's maximum.
    #[arg(long)]
    context: Option<usize>,
    /// Print only the generated text, no statistics.
    #[arg(long, short)]
    quiet: bool,
    /// Where to compute: auto (the GPU when one is usable, else the CPU), cpu, or cuda[:N].
    #[arg(long, default_value = "auto", value_name = "auto|cpu|cuda[:N]")]
    device: Device,
    /// GPU memory budget: a size (6GiB, 2.5GB) or auto (free memory minus 512 MiB). Weights
    /// that do not fit stream from host memory during each pass. Default: all resident.
    #[arg(long, value_name = "SIZE|auto")]
    vram: Option<String>,
    /// With --vram: print per-pass streaming stats (bytes streamed, GB/s, compute, stall,
    /// overlap efficiency, device memory).
    #[arg(long, requires = "vram")]
    stats: bool,
    #[command(flatten)]
    host_memory: HostMemoryArg,
}

pub fn run(mut args: RunArgs) -> Result<()> {
    check_sampling(&args)?;
    let prompts = match (args.prompt.take(), &args.prompts) {
        (_, Some(file)) => read_prompts(file)?,
        (Some(p), None) => vec![p],
        (None, None) => {
            if std::io::stdin().is_terminal() {
                eprintln!("(reading the prompt from standard input; end it with Ctrl-D)");
            }
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .map_err(|e| Error::io("<stdin>", e))?;
            vec![s]
        }
    };
    if args.prompts.is_none() && prompts[0].trim().is_empty() {
        return Err(Error::Flag {
            flag: "--prompt",
            message: "the prompt is empty; give some text (or pipe it on standard input)".into(),
        });
    }
    if args.batch == 0 {
        return Err(Error::Flag {
            flag: "--batch",
            message: "expected at least 1 sequence per pass".into(),
        });
    }

    let ckpt = Checkpoint::open(&args.model.model)?;
    let text = TextCodec::open(&ckpt)?;
    let requests = requests(&text, &args, &prompts, &ckpt)?;
    let vram = args.vram.as_deref().map(Vram::parse).transpose()?;
    match open_device(args.device, vram)? {
        Some(gpu) => {
            gpu.prepare(ckpt.config.head_dim)?;
            let device = gpu.info().to_string();
            if vram.is_none() {
                return generate_on(gpu, &device, &ckpt, text, requests, args, prompts, None);
            }
            let model = Llama::new(ckpt.config.clone());
            // Plan for the largest pass these prompts make: the longest prompt in each of a
            // full batch of sequences, with room for what they generate.
            let shape = PassShape {
                tokens: requests.iter().map(|r| r.prompt.len()).max().unwrap_or(1),
                batch: args.batch.min(requests.len()),
                past: args.max_tokens,
            };
            let setup = StreamSetup::new(shape, args.host_memory.host_memory.into());
            let mut weights = stream_weights(&gpu, &ckpt, &model, setup)?;
            if !args.quiet {
                eprintln!("[host tier: {}]", weights.host_mode());
                eprint!("{}", weights.plan());
            }
            let log = Arc::new(Mutex::new(Vec::new()));
            if args.stats {
                weights.log_stats(log.clone());
            }
            let stats = args.stats;
            generate_on(
                gpu,
                &device,
                &ckpt,
                text,
                requests,
                args,
                prompts,
                Some(Box::new(weights)),
            )?;
            if stats {
                print_stats(&log.lock().expect("stats log"));
            }
            Ok(())
        }
        None => generate_on(Cpu, "cpu", &ckpt, text, requests, args, prompts, None),
    }
}

/// Per-pass streaming stats: the first pass (the prompt), then the mean of the others.
fn print_stats(passes: &[PassStats]) {
    let line = |what: &str, s: &PassStats| {
        eprintln!(
            "[{what}: {:.1} ms; streamed {:.2} GB at {:.1} GB/s; compute {:.1} ms, stall {:.1} ms; bound {:.1} ms, overlap efficiency {:.3}; device memory {} (driver), {} peak allocated]",
            s.pass_ms,
            s.streamed_bytes as f64 / 1e9,
            s.achieved_gbps,
            s.compute_ms,
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

/// One request per prompt: encoded (with the chat template under --chat) and checked
/// against the context.
fn requests(
    text: &TextCodec,
    args: &RunArgs,
    prompts: &[String],
    ckpt: &Checkpoint,
) -> Result<Vec<Request>> {
    let context = args.context.unwrap_or(ckpt.config.max_position_embeddings);
    prompts
        .iter()
        .enumerate()
        .map(|(i, prompt)| {
            let ids = if args.chat {
                let mut messages = Vec::new();
                if let Some(system) = &args.system {
                    messages.push(Message::new("system", system));
                }
                messages.push(Message::new("user", prompt));
                text.encode_chat(&messages)?
            } else {
                text.encode(prompt)?
            };
            if ids.len() >= context {
                return Err(Error::PromptTooLong {
                    tokens: ids.len(),
                    context,
                });
            }
            Ok(Request {
                prompt: ids,
                max_tokens: args.max_tokens,
                sampling: SamplingConfig {
                    temperature: args.temperature,
                    top_k: args.top_k,
                    top_p: args.top_p,
                    repetition_penalty: args.repetition_penalty,
                    // Each prompt its own stream of random numbers.
                    seed: args.seed.wrapping_add(i as u64),
                },
                stop_strings: args.stop.clone(),
                ignore_eos: args.ignore_eos,
            })
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn generate_on<B: Backend>(
    backend: B,
    device: &str,
    ckpt: &Checkpoint,
    text: TextCodec,
    requests: Vec<Request>,
    args: RunArgs,
    prompts: Vec<String>,
    weights: Option<Box<dyn Weights<B::Weight>>>,
) -> Result<()>
where
    B::Weight: 'static,
{
    let mut gen = Generator::with_weights(ckpt, backend, weights, text, args.context)?;

    if args.prompts.is_none() {
        let request = &requests[0];
        let mut stdout = std::io::stdout();
        let out = gen.generate(request, &mut |piece| {
            let _ = stdout.write_all(piece.as_bytes());
            let _ = stdout.flush();
        })?;
        println!();
        if !args.quiet {
            let n = out.tokens.len();
            eprintln!(
                "[{} prompt tokens in {:.2} s ({}); {n} tokens in {:.2} s ({}); stopped: {:?}; on {device}]",
                request.prompt.len(),
                out.prompt_secs,
                rate(request.prompt.len(), out.prompt_secs),
                out.decode_secs,
                rate(n.saturating_sub(1), out.decode_secs),
                out.finish,
            );
        }
        return Ok(());
    }

    // Sequences done, tokens generated and tok/s on a terminal's stderr while they run; the
    // outputs are printed after, once the bar is gone.
    let bar = if !args.quiet && std::io::stderr().is_terminal() {
        let bar = ProgressBar::new(requests.len() as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "generating [{wide_bar}] {pos}/{len} sequences, {msg}, {elapsed}",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    let result = gen.generate_batch_with_progress(
        &requests,
        args.batch,
        &mut |_, _| {},
        &mut |p: Progress| {
            bar.set_position(p.finished as u64);
            bar.set_message(format!(
                "{} tokens, {:.1} tok/s",
                p.tokens_out,
                p.tokens_out as f64 / bar.elapsed().as_secs_f64().max(1e-9)
            ));
        },
    );
    bar.finish_and_clear();
    let (outputs, stats) = result?;
    for (i, (prompt, out)) in prompts.iter().zip(&outputs).enumerate() {
        if args.json {
            let line = serde_json::json!({
                "index": i, "prompt": prompt, "text": out.text,
                "tokens": out.tokens.len(), "finish": format!("{:?}", out.finish),
            });
            println!("{line}");
        } else {
            println!("--- {} ---\n{}", i + 1, out.text);
        }
    }
    if !args.quiet {
        eprintln!(
            "[{} sequences, {} per pass: {} passes in {:.2} s (first {:.3} s); {} tokens in, {} generated ({:.1} tok/s; {:.1} tok/s after the first pass); on {device}]",
            requests.len(),
            args.batch.min(requests.len()),
            stats.passes,
            stats.seconds,
            stats.pass_secs.first().copied().unwrap_or(0.0),
            stats.tokens_in,
            stats.tokens_out,
            stats.tokens_out as f64 / stats.seconds.max(1e-9),
            stats.decode_tok_s(),
        );
    }
    Ok(())
}

/// Prompts from `path`: one per non-empty line, or in a `.jsonl` file one JSON string or
/// object with a "prompt" field per line.
fn read_prompts(path: &std::path::Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let jsonl = path.extension().is_some_and(|e| e == "jsonl");
    let mut prompts = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        if !jsonl {
            prompts.push(line.to_string());
            continue;
        }
        let bad = |what: String| Error::Json {
            path: path.to_path_buf(),
            message: format!("line {}: {what}", n + 1),
        };
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        let prompt = match &value {
            serde_json::Value::String(s) => s.clone(),
            v => v
                .get("prompt")
                .and_then(|p| p.as_str())
                .ok_or_else(|| {
                    bad("expected a JSON string or an object with a \"prompt\" string".into())
                })?
                .to_string(),
        };
        prompts.push(prompt);
    }
    if prompts.is_empty() {
        return Err(Error::Flag {
            flag: "--prompts",
            message: format!("{} holds no prompts", path.display()),
        });
    }
    Ok(prompts)
}

fn check_sampling(args: &RunArgs) -> Result<()> {
    let bad = |flag, message: &str| {
        Err(Error::Flag {
            flag,
            message: message.into(),
        })
    };
    if !(args.temperature >= 0.0 && args.temperature.is_finite()) {
        return bad("--temperature", "expected a number ≥ 0");
    }
    if args.top_k == Some(0) {
        return bad("--top-k", "expected at least 1");
    }
    if let Some(p) = args.top_p {
        if !(p > 0.0 && p <= 1.0) {
            return bad("--top-p", "expected a number in (0, 1]");
        }
    }
    if !(args.repetition_penalty > 0.0 && args.repetition_penalty.is_finite()) {
        return bad("--repetition-penalty", "expected a number > 0");
    }
    Ok(())
}

/// `n` tokens over `secs` as "12.3 tok/s", or "no pass" when nothing ran (`--max-tokens 0`).
fn rate(n: usize, secs: f64) -> String {
    if secs > 0.0 {
        format!("{:.1} tok/s", n as f64 / secs)
    } else {
        "no pass".into()
    }
}
