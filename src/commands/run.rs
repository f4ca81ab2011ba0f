//! `ferry run`: generate text from a prompt.

use std::io::{IsTerminal, Read, Write};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use ferry::backend::cpu::Cpu;
use std::sync::{Arc, Mutex};

use ferry::backend::cuda::streaming::PassStats;
use ferry::backend::{Backend, Device};
use ferry::checkpoint::Checkpoint;
use ferry::generate::{
    context_length, Generator, Message, Progress, Request, SamplingConfig, TextCodec,
    UNTIL_CONTEXT_FULL,
};
use ferry::model::{Llama, PassShape, Weights};
use ferry::runtime::{open_device, stream_weights, StreamSetup};
use ferry::stream::{human_bytes, Vram};
use ferry::{Error, Result};

use super::{at_least, plural, random_seed, HostMemoryArg, ModelArg};

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// The prompt. Read from standard input when omitted.
    #[arg(long, short, conflicts_with = "prompts", allow_hyphen_values = true)]
    prompt: Option<String>,
    /// Many prompts, one per line (in a .jsonl file: one JSON string, or an object
    /// {"prompt": "...", "max_tokens": N} per line). They are generated together, --batch
    /// sequences per pass over the weights.
    #[arg(long, value_name = "FILE")]
    prompts: Option<std::path::PathBuf>,
    /// With --prompts: most sequences per pass (one pass over the weights serves them all).
    /// Default: 16.
    #[arg(long, value_name = "N", value_parser = at_least(1), allow_negative_numbers = true)]
    batch: Option<usize>,
    /// With --prompts: print one JSON object per prompt instead of text blocks.
    #[arg(long)]
    json: bool,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    chat: bool,
    /// A system message for --chat.
    #[arg(long, requires = "chat", allow_hyphen_values = true)]
    system: Option<String>,
    /// Most tokens to generate; -1: until the context is full (or an end of sequence).
    #[arg(long, default_value = "256", value_name = "N", value_parser = max_tokens, allow_negative_numbers = true)]
    max_tokens: usize,
    /// Sampling temperature; 0 picks the most likely token every time (greedy).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f32,
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
    /// Stop when this text appears (may be given several times).
    #[arg(long = "stop", value_name = "TEXT", allow_hyphen_values = true)]
    stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Context length: most tokens (prompt + generated). Default: the model's maximum.
    #[arg(long, value_parser = at_least(1), allow_negative_numbers = true)]
    context: Option<usize>,
    /// Print only the generated text, no statistics.
    #[arg(long, short)]
    quiet: bool,
    /// Where to compute: auto (the GPU when one is usable, else the CPU), cpu, or cuda[:N].
    #[arg(long, default_value = "auto", value_name = "auto|cpu|cuda[:N]")]
    device: Device,
    /// GPU memory budget: a size (6GiB, 2.5GB) or auto (free memory minus 512 MiB). Weights
    /// that do not fit stream from host memory during each pass. Default: all resident.
    #[arg(long, value_name = "SIZE|auto", allow_negative_numbers = true)]
    vram: Option<String>,
    /// With --vram: print per-pass streaming stats (bytes streamed, GB/s, compute, stall,
    /// overlap efficiency, device memory).
    #[arg(long, requires = "vram")]
    stats: bool,
    #[command(flatten)]
    host_memory: HostMemoryArg,
}

/// Sequences per pass with --prompts when --batch is not given.
const DEFAULT_BATCH: usize = 16;

/// `--max-tokens`: a count, or -1 for "until the context is full".
fn max_tokens(s: &str) -> Result<usize, String> {
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

/// One prompt of `--prompts`, with what its line of a .jsonl file asks beyond the text.
struct PromptLine {
    text: String,
    /// `"max_tokens"` of a .jsonl line: this prompt's own --max-tokens.
    max_tokens: Option<usize>,
}

pub fn run(mut args: RunArgs) -> Result<()> {
    check_flags(&args)?;
    let prompts = match (args.prompt.take(), &args.prompts) {
        (_, Some(file)) => read_prompts(file)?,
        (Some(p), None) => vec![PromptLine::new(p)],
        (None, None) => {
            if std::io::stdin().is_terminal() {
                eprintln!("(reading the prompt from standard input; end it with Ctrl-D)");
            }
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .map_err(|e| Error::io("<stdin>", e))?;
            vec![PromptLine::new(s)]
        }
    };
    if args.prompts.is_none() && prompts[0].text.trim().is_empty() {
        return Err(Error::Flag {
            flag: "--prompt",
            message: "the prompt is empty; give some text (or pipe it on standard input)".into(),
        });
    }

    let ckpt = Checkpoint::open(&args.model.model)?;
    let text = TextCodec::open(&ckpt)?;
    let context = context_length(args.context, ckpt.config.max_position_embeddings)?;
    // A seed only where something is sampled; random (and printed) when not given.
    let seed = (args.temperature > 0.0).then(|| args.seed.unwrap_or_else(random_seed));
    let requests = requests(&text, &args, &prompts, context, seed)?;
    let job = Job {
        texts: prompts.into_iter().map(|p| p.text).collect(),
        requests,
        batch: args.batch.unwrap_or(DEFAULT_BATCH),
        context,
        seed,
        many: args.prompts.is_some(),
        json: args.json,
        quiet: args.quiet,
    };
    let vram = args.vram.as_deref().map(Vram::parse).transpose()?;
    match open_device(args.device, vram)? {
        Some(gpu) => {
            gpu.prepare(ckpt.config.head_dim)?;
            let device = gpu.info().to_string();
            if vram.is_none() {
                return generate_on(gpu, &device, &ckpt, text, job, None);
            }
            let model = Llama::new(ckpt.config.clone());
            // Plan for the largest pass these prompts make: the longest prompt in each of a
            // full batch of sequences, with room for what they generate.
            let tokens = job
                .requests
                .iter()
                .map(|r| r.prompt.len())
                .max()
                .unwrap_or(1);
            let generated = job.requests.iter().map(|r| r.max_tokens).max().unwrap_or(0);
            let shape = PassShape {
                tokens,
                batch: job.batch.min(job.requests.len()),
                past: generated.min(context - tokens),
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
            generate_on(gpu, &device, &ckpt, text, job, Some(Box::new(weights)))?;
            if args.stats {
                print_stats(&log.lock().expect("stats log"));
            }
            Ok(())
        }
        None => generate_on(Cpu, "cpu", &ckpt, text, job, None),
    }
}

/// What to generate, settled from the flags.
struct Job {
    /// Each prompt's text as given, and its request (encoded, with its sampling settings).
    texts: Vec<String>,
    requests: Vec<Request>,
    /// Most sequences per pass.
    batch: usize,
    /// Most positions of a sequence.
    context: usize,
    /// The sampling seed (prompt i samples with seed + i); None when greedy.
    seed: Option<u64>,
    /// `--prompts`: many prompts, printed as blocks (or JSON lines).
    many: bool,
    json: bool,
    quiet: bool,
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
    prompts: &[PromptLine],
    context: usize,
    seed: Option<u64>,
) -> Result<Vec<Request>> {
    prompts
        .iter()
        .enumerate()
        .map(|(i, prompt)| {
            let ids = if args.chat {
                let mut messages = Vec::new();
                if let Some(system) = &args.system {
                    messages.push(Message::new("system", system));
                }
                messages.push(Message::new("user", &prompt.text));
                text.encode_chat(&messages)?
            } else {
                text.encode(&prompt.text)?
            };
            if ids.len() >= context {
                return Err(Error::PromptTooLong {
                    tokens: ids.len(),
                    context,
                });
            }
            Ok(Request {
                prompt: ids,
                max_tokens: prompt.max_tokens.unwrap_or(args.max_tokens),
                sampling: SamplingConfig {
                    temperature: args.temperature,
                    // 0: off, every token a candidate.
                    top_k: args.top_k.filter(|&k| k > 0),
                    top_p: args.top_p,
                    repetition_penalty: args.repetition_penalty,
                    // Each prompt its own stream of random numbers.
                    seed: seed.unwrap_or(0).wrapping_add(i as u64),
                },
                stop_strings: args.stop.clone(),
                ignore_eos: args.ignore_eos,
            })
        })
        .collect()
}

fn generate_on<B: Backend>(
    backend: B,
    device: &str,
    ckpt: &Checkpoint,
    text: TextCodec,
    job: Job,
    weights: Option<Box<dyn Weights<B::Weight>>>,
) -> Result<()>
where
    B::Weight: 'static,
{
    let mut gen = Generator::with_weights(ckpt, backend, weights, text, Some(job.context))?;
    let seed = job.seed.map(|s| format!("seed {s}; ")).unwrap_or_default();

    if !job.many {
        let request = &job.requests[0];
        let mut stdout = std::io::stdout();
        let out = gen.generate(request, &mut |piece| {
            let _ = stdout.write_all(piece.as_bytes());
            let _ = stdout.flush();
        })?;
        println!();
        if !job.quiet {
            let n = out.tokens.len();
            eprintln!(
                "[{} in {:.2} s ({}); {} in {:.2} s ({}); stopped: {}; {seed}on {device}]",
                plural(request.prompt.len(), "prompt token"),
                out.prompt_secs,
                rate(request.prompt.len(), out.prompt_secs),
                plural(n, "token"),
                out.decode_secs,
                rate(n.saturating_sub(1), out.decode_secs),
                out.finish,
            );
        }
        return Ok(());
    }

    // Sequences done, tokens generated and tok/s on a terminal's stderr while they run; the
    // outputs are printed after, once the bar is gone.
    let bar = if !job.quiet && std::io::stderr().is_terminal() {
        let bar = ProgressBar::new(job.requests.len() as u64);
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
        &job.requests,
        job.batch,
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
    for (i, ((prompt, out), request)) in job
        .texts
        .iter()
        .zip(&outputs)
        .zip(&job.requests)
        .enumerate()
    {
        if job.json {
            let mut line = serde_json::json!({
                "number": i + 1, "prompt": prompt, "text": out.text,
                "tokens": out.tokens.len(), "finish": out.finish.as_str(),
            });
            if job.seed.is_some() {
                line["seed"] = request.sampling.seed.into();
            }
            println!("{line}");
        } else {
            println!("--- {} ---\n{}", i + 1, out.text);
        }
    }
    if !job.quiet {
        let n = job.requests.len();
        eprintln!(
            "[{}, {} per pass: {} in {:.2} s (first {:.3} s); {} tokens in, {} generated ({:.1} tok/s; {:.1} tok/s after the first pass); {seed}on {device}]",
            plural(n, "sequence"),
            job.batch.min(n),
            plural(stats.passes, "pass"),
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

impl PromptLine {
    fn new(text: String) -> PromptLine {
        PromptLine {
            text,
            max_tokens: None,
        }
    }
}

/// Prompts from `path`: one per non-empty line, or in a `.jsonl` file one JSON string or
/// object `{"prompt": "...", "max_tokens": N}` per line (any other key is refused, not
/// ignored).
fn read_prompts(path: &std::path::Path) -> Result<Vec<PromptLine>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let jsonl = path.extension().is_some_and(|e| e == "jsonl");
    let mut prompts = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        if !jsonl {
            prompts.push(PromptLine::new(line.to_string()));
            continue;
        }
        let bad = |what: String| Error::Input {
            path: path.to_path_buf(),
            message: format!("line {}: {what}", n + 1),
        };
        let value: serde_json::Value = serde_json::from_str(line).map_err(|e| Error::Json {
            path: path.to_path_buf(),
            message: format!("line {}: {e}", n + 1),
        })?;
        let prompt = match value {
            serde_json::Value::String(s) => PromptLine::new(s),
            serde_json::Value::Object(o) => {
                if let Some(key) = o
                    .keys()
                    .find(|k| !["prompt", "max_tokens"].contains(&k.as_str()))
                {
                    return Err(bad(format!(
                        "unknown key {key:?}; a prompt's object takes \"prompt\" and \"max_tokens\""
                    )));
                }
                let text = o
                    .get("prompt")
                    .and_then(|p| p.as_str())
                    .ok_or_else(|| bad("expected a \"prompt\" string".into()))?;
                let max_tokens = match o.get("max_tokens") {
                    None => None,
                    Some(v) => Some(match v.as_i64() {
                        Some(-1) => UNTIL_CONTEXT_FULL,
                        Some(n) if n >= 0 => n as usize,
                        _ => {
                            return Err(bad(format!(
                                "\"max_tokens\" is {v}; expected a number of tokens ≥ 0, or -1 for until the context is full"
                            )))
                        }
                    }),
                };
                PromptLine {
                    text: text.to_string(),
                    max_tokens,
                }
            }
            _ => {
                return Err(bad(
                    "expected a JSON string or an object with a \"prompt\" string".into(),
                ))
            }
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

/// Flags that would change nothing are refused, not ignored.
fn check_flags(args: &RunArgs) -> Result<()> {
    let bad = |flag, message: &str| {
        Err(Error::Flag {
            flag,
            message: message.into(),
        })
    };
    if args.prompts.is_none() {
        for (flag, given) in [("--batch", args.batch.is_some()), ("--json", args.json)] {
            if given {
                return bad(
                    flag,
                    "acts only with --prompts FILE (many prompts); one prompt is one sequence",
                );
            }
        }
    }
    if !(args.temperature >= 0.0 && args.temperature.is_finite()) {
        return bad("--temperature", "expected a number ≥ 0");
    }
    if args.temperature == 0.0 {
        // Greedy picks the most likely token: these would change nothing.
        for (flag, given) in [
            ("--top-k", args.top_k.is_some()),
            ("--top-p", args.top_p.is_some()),
            ("--seed", args.seed.is_some()),
        ] {
            if given {
                return bad(
                    flag,
                    "acts only when sampling; give --temperature > 0 too (at 0 the most likely token is always picked)",
                );
            }
        }
    }
    if let Some(p) = args.top_p {
        if !(p > 0.0 && p <= 1.0) {
            return bad("--top-p", "expected a number in (0, 1]");
        }
    }
    if !(args.repetition_penalty > 0.0 && args.repetition_penalty.is_finite()) {
        return bad("--repetition-penalty", "expected a number > 0");
    }
    if args.stop.iter().any(String::is_empty) {
        return bad(
            "--stop",
            "the text is empty, and would stop generation at once; give the text to stop at",
        );
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
