//! `ferry run`: generate text from a prompt, or from many prompts together.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use ferry::backend::Backend;
use ferry::generate::{
    context_length, Generator, Message, Output, Progress, Request, TextCodec, UNTIL_CONTEXT_FULL,
};
use ferry::model::PassShape;
use ferry::{Error, Result};

use super::generation::{
    open_compute, open_model, rate, with_generator, ComputeArgs, GeneratorTask, SamplingArgs,
    StopArgs,
};
use super::{at_least, plural, ModelArg};

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// The prompt. Read from standard input when neither it nor --prompt-file is given.
    #[arg(long, short, conflicts_with_all = ["prompts", "prompt_file"], allow_hyphen_values = true)]
    prompt: Option<String>,
    /// The prompt: the whole of this file (as --prompt, for text too long for a command line).
    #[arg(long, value_name = "FILE", conflicts_with = "prompts")]
    prompt_file: Option<PathBuf>,
    /// Many prompts, one per line (in a .jsonl file: one JSON string, or an object
    /// {"prompt": "...", "max_tokens": N} per line). They are generated together, --batch
    /// sequences per pass over the weights, and each answer is printed as soon as it and
    /// those before it are done.
    #[arg(long, value_name = "FILE")]
    prompts: Option<PathBuf>,
    /// With --prompts: most sequences per pass (one pass over the weights serves them all).
    /// Default: 16.
    #[arg(long, value_name = "N", value_parser = at_least(1), allow_negative_numbers = true)]
    batch: Option<usize>,
    /// With --prompts: print one JSON object per prompt instead of text blocks.
    #[arg(long)]
    json: bool,
    /// Wrap the prompt in the model's chat template as a user message (for a conversation:
    /// ferry chat).
    #[arg(long)]
    chat: bool,
    /// A system message for --chat.
    #[arg(long, requires = "chat", allow_hyphen_values = true)]
    system: Option<String>,
    #[command(flatten)]
    stop: StopArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Print only the generated text, no statistics.
    #[arg(long, short)]
    quiet: bool,
    #[command(flatten)]
    compute: ComputeArgs,
}

/// Sequences per pass with --prompts when --batch is not given.
const DEFAULT_BATCH: usize = 16;

/// One prompt of `--prompts`, with what its line of a .jsonl file asks beyond the text.
struct PromptLine {
    text: String,
    /// `"max_tokens"` of a .jsonl line: this prompt's own --max-tokens.
    max_tokens: Option<usize>,
}

pub fn run(args: RunArgs) -> Result<()> {
    check_flags(&args)?;
    args.compute.start()?;
    let prompts = match (&args.prompt, &args.prompt_file, &args.prompts) {
        (_, _, Some(file)) => read_prompts(file)?,
        (Some(p), _, None) => vec![PromptLine::new(p.clone())],
        (None, Some(file), None) => {
            let text = std::fs::read_to_string(file).map_err(|e| Error::io(file, e))?;
            vec![PromptLine::new(text)]
        }
        (None, None, None) => {
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
            flag: if args.prompt_file.is_some() {
                "--prompt-file"
            } else {
                "--prompt"
            },
            message: "the prompt is empty; give some text (or pipe it on standard input)".into(),
        });
    }

    let gpu = open_compute(&args.compute)?;
    let ckpt = open_model(&args.model.model, &gpu)?;
    let text = TextCodec::open(&ckpt)?;
    let context = context_length(args.stop.context, ckpt.config.max_position_embeddings)?;
    // A seed only where something is sampled; random (and printed) when not given.
    let seed = args.sampling.seed();
    let requests = requests(&text, &args, &prompts, context, seed)?;
    // Plan (with --vram) for the largest pass these prompts make: the longest prompt in each
    // of a full batch of sequences, with room for what they generate.
    let batch = args.batch.unwrap_or(DEFAULT_BATCH);
    let tokens = requests.iter().map(|r| r.prompt.len()).max().unwrap_or(1);
    let generated = requests.iter().map(|r| r.max_tokens).max().unwrap_or(0);
    let shape = PassShape {
        tokens,
        batch: batch.min(requests.len()),
        past: generated.min(context - tokens),
    };
    let job = Job {
        texts: prompts.into_iter().map(|p| p.text).collect(),
        requests,
        batch,
        seed,
        many: args.prompts.is_some(),
        json: args.json,
        quiet: args.quiet,
    };
    with_generator(
        &ckpt,
        gpu,
        text,
        context,
        &args.compute,
        args.quiet,
        shape.into(),
        job,
    )
}

/// What to generate, settled from the flags.
struct Job {
    /// Each prompt's text as given, and its request (encoded, with its sampling settings).
    texts: Vec<String>,
    requests: Vec<Request>,
    /// Most sequences per pass.
    batch: usize,
    /// The sampling seed (prompt i samples with seed + i); None when greedy.
    seed: Option<u64>,
    /// `--prompts`: many prompts, printed as blocks (or JSON lines).
    many: bool,
    json: bool,
    quiet: bool,
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
                max_tokens: prompt.max_tokens.unwrap_or(args.stop.max_tokens),
                // Each prompt its own stream of random numbers.
                sampling: args.sampling.config(seed.map(|s| s.wrapping_add(i as u64))),
                stop_strings: args.stop.stop.clone(),
                ignore_eos: args.stop.ignore_eos,
            })
        })
        .collect()
}

impl GeneratorTask for Job {
    fn run<B: Backend>(self, mut gen: Generator<B>, device: &str) -> Result<()>
    where
        B::Weight: 'static,
    {
        let seed = self.seed.map(|s| format!("seed {s}; ")).unwrap_or_default();
        if !self.many {
            let request = &self.requests[0];
            let mut stdout = std::io::stdout();
            let out = gen.generate(request, &mut |piece| {
                let _ = stdout.write_all(piece.as_bytes());
                let _ = stdout.flush();
            })?;
            println!();
            if !self.quiet {
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
        self.many(gen, device, &seed)
    }
}

impl Job {
    /// Every prompt through one generation, up to `batch` sequences a pass. Each answer is
    /// printed once it and all before it are done (in the file's order), the progress bar
    /// (on a terminal) kept below them.
    fn many<B: Backend>(self, mut gen: Generator<B>, device: &str, seed: &str) -> Result<()>
    where
        B::Weight: 'static,
    {
        let bar = if !self.quiet && std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(self.requests.len() as u64);
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
        // Answers that are done but wait for an earlier one.
        let mut done: BTreeMap<usize, String> = BTreeMap::new();
        let mut next = 0;
        let result = gen.generate_batch_with_progress(
            &self.requests,
            self.batch,
            &mut |_, _| {},
            &mut |i, out| {
                done.insert(i, self.render(i, out));
                while let Some(block) = done.remove(&next) {
                    bar.suspend(|| {
                        let mut stdout = std::io::stdout();
                        let _ = writeln!(stdout, "{block}");
                        let _ = stdout.flush();
                    });
                    next += 1;
                }
            },
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
        let (_, stats) = result?;
        if !self.quiet {
            let n = self.requests.len();
            eprintln!(
                "[{}, {} per pass: {} in {:.2} s (first {:.3} s); {} tokens in, {} generated ({:.1} tok/s; {:.1} tok/s after the first pass); {seed}on {device}]",
                plural(n, "sequence"),
                self.batch.min(n),
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

    /// Prompt `i`'s answer as printed: a text block `--- N ---`, or a JSON line (numbered
    /// from 1 in both).
    fn render(&self, i: usize, out: &Output) -> String {
        if !self.json {
            return format!("--- {} ---\n{}", i + 1, out.text);
        }
        let mut line = serde_json::json!({
            "number": i + 1, "prompt": self.texts[i], "text": out.text,
            "tokens": out.tokens.len(), "finish": out.finish.as_str(),
        });
        if self.seed.is_some() {
            line["seed"] = self.requests[i].sampling.seed.into();
        }
        line.to_string()
    }
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
    if args.prompts.is_none() {
        for (flag, given) in [("--batch", args.batch.is_some()), ("--json", args.json)] {
            if given {
                return Err(Error::Flag {
                    flag,
                    message:
                        "acts only with --prompts FILE (many prompts); one prompt is one sequence"
                            .into(),
                });
            }
        }
    }
    args.sampling.check()?;
    args.stop.check()
}
