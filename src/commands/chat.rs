//! `ferry chat`: a conversation with a model, turn by turn, in its chat template. The
//! history is kept (each turn's prompt is the whole conversation so far), `/reset` starts
//! over, and Ctrl-C stops the answer being written, not the program.

use std::io::{BufRead, IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};

use clap::Args;

use ferry::backend::Backend;
use ferry::generate::{context_length, Finish, Generator, Message, Request, TextCodec};
use ferry::model::PassShape;
use ferry::{Error, Result};

use super::generation::{
    open_compute, open_model, rate, with_generator, ComputeArgs, GeneratorTask, SamplingArgs,
    StopArgs,
};
use super::{plural, ModelArg};

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// A system message at the start of the conversation (kept by /reset).
    #[arg(long, allow_hyphen_values = true)]
    system: Option<String>,
    #[command(flatten)]
    stop: StopArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Print only the answers: no banner, prompt or statistics.
    #[arg(long, short)]
    quiet: bool,
    #[command(flatten)]
    compute: ComputeArgs,
}

const HELP: &str = "/reset: start the conversation over; /exit (or Ctrl-D): leave; Ctrl-C: stop the answer being written";

pub fn chat(args: ChatArgs) -> Result<()> {
    args.sampling.check()?;
    args.stop.check()?;
    args.compute.start()?;
    let gpu = open_compute(&args.compute)?;
    let ckpt = open_model(&args.model.model, &gpu)?;
    let text = TextCodec::open(&ckpt)?;
    if text.defaults.chat_template.is_none() {
        return Err(Error::checkpoint(
            &ckpt.path,
            "has no chat template (tokenizer_config.json \"chat_template\" or GGUF tokenizer.chat_template), which ferry chat needs; ferry run takes plain text",
        ));
    }
    let context = context_length(args.stop.context, ckpt.config.max_position_embeddings)?;
    // With --vram: planned for the longest turn, a conversation that fills the context.
    let shape = PassShape {
        tokens: context,
        batch: 1,
        past: 0,
    };
    let model = args.model.model.clone();
    let quiet = args.quiet;
    let compute = &args.compute;
    let conversation = Conversation {
        model,
        args: &args,
        context,
    };
    with_generator(
        &ckpt,
        gpu,
        text,
        context,
        compute,
        quiet,
        shape.into(),
        conversation,
    )
}

struct Conversation<'a> {
    model: String,
    args: &'a ChatArgs,
    context: usize,
}

impl GeneratorTask for Conversation<'_> {
    fn run<B: Backend>(self, mut gen: Generator<B>, device: &str) -> Result<()>
    where
        B::Weight: 'static,
    {
        let args = self.args;
        let stdin = std::io::stdin();
        let terminal = stdin.is_terminal();
        let talk = !args.quiet;
        stop_answers_on_ctrl_c();
        gen.interrupt = Some(&INTERRUPT);
        let seed = args.sampling.seed();
        if talk {
            let seed = seed.map(|s| format!(", seed {s}")).unwrap_or_default();
            eprintln!("[ferry chat: {} on {device}{seed}. {HELP}]", self.model);
        }
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(Message::new("system", system));
        }
        let kept = messages.len();
        let mut line = String::new();
        for turn in 0u64.. {
            if talk && terminal {
                eprint!("> ");
                let _ = std::io::stderr().flush();
            }
            line.clear();
            let read = stdin
                .lock()
                .read_line(&mut line)
                .map_err(|e| Error::io("<stdin>", e))?;
            if read == 0 {
                if talk && terminal {
                    eprintln!();
                }
                return Ok(());
            }
            let said = line.trim();
            match said {
                "" => continue,
                "/exit" | "/quit" => return Ok(()),
                "/reset" => {
                    messages.truncate(kept);
                    if talk {
                        eprintln!("[the conversation starts over]");
                    }
                    continue;
                }
                s if s.starts_with('/') => {
                    eprintln!("[{s}: no such command. {HELP}]");
                    continue;
                }
                _ => {}
            }
            messages.push(Message::new("user", said));
            let prompt = gen.text.encode_chat(&messages)?;
            if prompt.len() >= self.context {
                messages.pop();
                eprintln!(
                    "[the conversation is {} tokens, and the context holds {}: /reset to start over, or give a larger --context]",
                    prompt.len(),
                    self.context
                );
                continue;
            }
            let request = Request {
                prompt,
                max_tokens: args.stop.max_tokens,
                // Each turn its own stream of random numbers, repeatable from the seed.
                sampling: args.sampling.config(seed.map(|s| s.wrapping_add(turn))),
                stop_strings: args.stop.stop.clone(),
                ignore_eos: args.stop.ignore_eos,
            };
            let mut stdout = std::io::stdout();
            ANSWERING.store(true, Ordering::SeqCst);
            let out = gen.generate(&request, &mut |piece| {
                let _ = stdout.write_all(piece.as_bytes());
                let _ = stdout.flush();
            });
            ANSWERING.store(false, Ordering::SeqCst);
            let out = out?;
            println!();
            if talk {
                let n = out.tokens.len();
                eprintln!(
                    "[{} in {:.2} s ({}); {} ({}); stopped: {}]",
                    plural(request.prompt.len(), "prompt token"),
                    out.prompt_secs,
                    rate(request.prompt.len(), out.prompt_secs),
                    plural(n, "token"),
                    rate(n.saturating_sub(1), out.decode_secs),
                    out.finish,
                );
            } else if out.finish == Finish::Interrupted {
                eprintln!("[stopped]");
            }
            messages.push(Message::new("assistant", &out.text));
        }
        Ok(())
    }
}

/// Raised by Ctrl-C while an answer is written: the generator ends it after the pass in
/// flight (see [`Generator::interrupt`]).
static INTERRUPT: AtomicBool = AtomicBool::new(false);
/// Whether an answer is being written: Ctrl-C at the prompt ends the program, as usual.
static ANSWERING: AtomicBool = AtomicBool::new(false);

/// Make Ctrl-C (SIGINT) stop the answer being written instead of the program; at the
/// prompt it still ends the program (exit status 130, as a shell reports it).
fn stop_answers_on_ctrl_c() {
    #[cfg(unix)]
    {
        extern "C" {
            fn signal(signum: i32, handler: usize) -> usize;
            fn _exit(status: i32) -> !;
        }
        const SIGINT: i32 = 2;
        extern "C" fn on_sigint(_: i32) {
            if ANSWERING.load(Ordering::SeqCst) {
                INTERRUPT.store(true, Ordering::SeqCst);
            } else {
                // SAFETY: _exit(2) is async-signal-safe; nothing is left to flush at the
                // prompt (each answer was flushed as it was written).
                unsafe { _exit(130) }
            }
        }
        // SAFETY: the handler only touches atomics and calls _exit, both async-signal-safe;
        // signal(2) installs it for SIGINT (glibc's BSD semantics: it stays installed).
        unsafe {
            signal(SIGINT, on_sigint as extern "C" fn(i32) as usize);
        }
    }
}
