//! The `ferry` command line.

mod commands;

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use commands::{
    bench_cuda::bench_cuda, info::info, plan::plan_command, run::run, synth::synth, ModelArg,
};

/// Run transformer models larger than your GPU's memory, at full precision.
///
/// ferry reads Hugging Face checkpoints (a directory with config.json and *.safetensors, or
/// ORG/NAME from the Hugging Face cache) and GGUF files, and generates text.
#[derive(Parser)]
#[command(name = "ferry", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt.
    ///
    /// Example: ferry run --model ./SmolLM2-135M-Instruct.Q4_1.gguf --chat --prompt "What is the capital of France?"
    Run(commands::run::RunArgs),
    /// Talk with a model: one turn a line, the conversation kept in its chat template.
    ///
    /// /reset starts over, /exit (or Ctrl-D) leaves, and Ctrl-C stops the answer being
    /// written. Lines piped on standard input are turns too.
    ///
    /// Example: ferry chat --model ./SmolLM2-135M-Instruct.Q4_1.gguf --system "You are brief."
    Chat(commands::chat::ChatArgs),
    /// Describe a checkpoint: architecture, parameters, bytes, dtype, and bytes per weight group.
    Info(ModelArg),
    /// Write a checkpoint with random weights and a real model's shape (for benchmarks).
    ///
    /// Example: ferry synth --preset qwen2.5-7b --out /tmp/qwen2.5-7b-synth
    Synth(commands::synth::SynthArgs),
    /// Plan streaming for a VRAM budget: resident groups, slots, bytes per pass, predicted time.
    ///
    /// Works without a GPU from stated figures. Example:
    /// ferry plan --synthetic qwen2.5-7b --vram 2.6GiB --tokens 4096 --h2d-gbps 55 --tflops 850
    Plan(commands::plan::PlanArgs),
    /// Time prompt passes and decoding on any device, whole or streamed (--vram), at several
    /// prompt lengths and batch sizes: medians of several runs, as a table or JSON.
    ///
    /// Example: ferry bench --model ./SmolLM2-135M-Instruct.Q4_1.gguf --prompt-tokens 16,128 --decode-tokens 64
    Bench(commands::bench::BenchArgs),
    /// Time the GPU's raw passes in detail: a prompt pass (TFLOP/s) and decoding after --past
    /// positions (GB/s) with the whole model resident, or with --vram one streamed prompt pass
    /// against the PCIe bound and the planner's prediction.
    ///
    /// Its flags are bench's where they mean the same (--model/--synthetic, --prompt-tokens,
    /// --decode-tokens, --runs, --vram, --json [FILE], --timeline).
    ///
    /// Example: ferry bench-cuda --synthetic qwen2.5-7b --prompt-tokens 4096 --past 1024
    BenchCuda(commands::bench_cuda::BenchCudaArgs),
    /// Serve the model over HTTP with OpenAI's API (chat completions, completions, models),
    /// every waiting request batched into each pass; /health and /metrics too.
    ///
    /// Example: ferry serve --model ./SmolLM2-135M-Instruct.Q4_1.gguf --port 8080
    Serve(commands::serve::ServeArgs),
    /// Generate images from a prompt with a diffusers Z-Image, Qwen-Image or Flux.1 pipeline
    /// (or ComfyUI's split files), on the GPU streamed within --vram or on the CPU.
    ///
    /// Example: ferry image --model ./FLUX.1-dev --prompt "a red fox in the snow" --size 1024x1024 --vram 12GiB --seed 42 --out fox.png
    Image(commands::image::ImageArgs),
}

fn main() -> ExitCode {
    quiet_on_closed_pipe();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Chat(args) => commands::chat::chat(args),
        Command::Info(args) => info(args),
        Command::Synth(args) => synth(args),
        Command::Plan(args) => plan_command(args),
        Command::Bench(args) => commands::bench::bench(args),
        Command::BenchCuda(args) => bench_cuda(args),
        Command::Serve(args) => commands::serve::serve(args),
        Command::Image(args) => commands::image::image(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = std::io::stdout().flush();
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A flag's value that its parser refused (`--batch -1`, `--device gpu`) gets one line naming
/// the flag, as every other error of ferry's; other usage errors (an unknown flag, help) are
/// clap's, with its hints.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    use std::error::Error as _;
    if e.kind() == ErrorKind::ValueValidation {
        if let (Some(ContextValue::String(arg)), Some(ContextValue::String(value))) = (
            e.get(ContextKind::InvalidArg),
            e.get(ContextKind::InvalidValue),
        ) {
            let flag = arg.split(' ').next().unwrap_or(arg);
            let why = e.source().map(|s| s.to_string()).unwrap_or_default();
            if why.contains(value.as_str()) {
                eprintln!("error: {flag}: {why}");
            } else {
                eprintln!("error: {flag}: {why} (found {value:?})");
            }
            return ExitCode::from(2);
        }
    }
    e.exit()
}

/// `ferry info | head` should end quietly when `head` closes the pipe, as Unix tools do,
/// instead of panicking in `println!`: restore the default SIGPIPE action that Rust ignores.
fn quiet_on_closed_pipe() {
    #[cfg(unix)]
    {
        extern "C" {
            fn signal(signum: i32, handler: usize) -> usize;
        }
        const SIGPIPE: i32 = 13;
        const SIG_DFL: usize = 0;
        // SAFETY: signal(2) with SIG_DFL installs no Rust code as a handler; it only restores
        // the default action, before any thread is started.
        unsafe {
            signal(SIGPIPE, SIG_DFL);
        }
    }
}
