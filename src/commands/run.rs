//! `ferry run`: generate text from a prompt.

use std::io::{IsTerminal, Read, Write};

use clap::Args;

use ferry::backend::cpu::Cpu;
use ferry::backend::cuda::Cuda;
use ferry::backend::{Backend, Device};
use ferry::checkpoint::Checkpoint;
use ferry::generate::{Generator, Message, Request, SamplingConfig};
use ferry::{Error, Result};

use super::ModelArg;

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// The prompt. Read from standard input when omitted.
    #[arg(long, short)]
    prompt: Option<String>,
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
}

pub fn run(mut args: RunArgs) -> Result<()> {
    check_sampling(&args)?;
    let prompt = match args.prompt.take() {
        Some(p) => p,
        None => {
            if std::io::stdin().is_terminal() {
                eprintln!("(reading the prompt from standard input; end it with Ctrl-D)");
            }
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .map_err(|e| Error::io("<stdin>", e))?;
            s
        }
    };

    if prompt.trim().is_empty() {
        return Err(Error::Flag {
            flag: "--prompt",
            message: "the prompt is empty; give some text (or pipe it on standard input)".into(),
        });
    }

    let ckpt = Checkpoint::open(&args.model.model)?;
    let cuda = match args.device {
        Device::Cpu => None,
        Device::Cuda(n) => Some(Cuda::new(n)?),
        Device::Auto => Cuda::new(0).ok(),
    };
    match cuda {
        Some(gpu) => {
            gpu.prepare(ckpt.config.head_dim)?;
            let device = gpu.info().to_string();
            generate_on(gpu, &device, &ckpt, args, prompt)
        }
        None => generate_on(Cpu, "cpu", &ckpt, args, prompt),
    }
}

fn generate_on<B: Backend>(
    backend: B,
    device: &str,
    ckpt: &Checkpoint,
    args: RunArgs,
    prompt: String,
) -> Result<()> {
    let mut gen = Generator::new(ckpt, backend, args.context)?;
    let ids = if args.chat {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(Message::new("system", system));
        }
        messages.push(Message::new("user", &prompt));
        gen.encode_chat(&messages)?
    } else {
        gen.encode(&prompt)?
    };
    if ids.len() >= gen.context {
        return Err(Error::PromptTooLong {
            tokens: ids.len(),
            context: gen.context,
        });
    }
    let request = Request {
        prompt: ids,
        max_tokens: args.max_tokens,
        sampling: SamplingConfig {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            repetition_penalty: args.repetition_penalty,
            seed: args.seed,
        },
        stop_strings: args.stop,
        ignore_eos: args.ignore_eos,
    };
    let mut stdout = std::io::stdout();
    let out = gen.generate(&request, &mut |piece| {
        let _ = stdout.write_all(piece.as_bytes());
        let _ = stdout.flush();
    })?;
    println!();
    if !args.quiet {
        let n = out.tokens.len();
        eprintln!(
            "[{} prompt tokens in {:.2} s ({:.1} tok/s); {n} tokens in {:.2} s ({:.1} tok/s); stopped: {:?}; on {device}]",
            request.prompt.len(),
            out.prompt_secs,
            request.prompt.len() as f64 / out.prompt_secs.max(1e-9),
            out.decode_secs,
            n.saturating_sub(1) as f64 / out.decode_secs.max(1e-9),
            out.finish,
        );
    }
    Ok(())
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
