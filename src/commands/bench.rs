//! `ferry bench`: prompt-pass and decode speed, medians of several runs after a warm-up,
//! as a table for people and JSON for programs.

use clap::Args;

use ferry::backend::cpu::Cpu;
use ferry::backend::Backend;
use ferry::checkpoint::Checkpoint;
use ferry::generate::{Generator, Request, SamplingConfig};
use ferry::synth::{synthetic_checkpoint, Preset};
use ferry::{Error, Result};

#[derive(Args)]
pub struct BenchArgs {
    /// A model directory, a .gguf file, or ORG/NAME from the Hugging Face cache.
    #[arg(
        long,
        short,
        required_unless_present = "synthetic",
        conflicts_with = "synthetic"
    )]
    model: Option<String>,
    /// Random weights of a preset's shape, made in memory (see `ferry synth --list`).
    #[arg(long, value_name = "PRESET")]
    synthetic: Option<String>,
    /// Prompt lengths to time, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "128")]
    prompt_tokens: Vec<usize>,
    /// Tokens to decode after each prompt (0: prompt pass only).
    #[arg(long, default_value_t = 32)]
    decode_tokens: usize,
    /// Timed runs per figure (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Untimed runs first.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Print JSON instead of the table.
    #[arg(long)]
    json: bool,
}

/// One row of the result: a prompt length and its medians.
struct Row {
    prompt_tokens: usize,
    prompt_s: f64,
    decode_tokens: usize,
    decode_tok_s: f64,
}

pub fn bench(args: BenchArgs) -> Result<()> {
    if args.runs == 0 {
        return Err(Error::Flag {
            flag: "--runs",
            message: "expected at least 1".into(),
        });
    }
    let (ckpt, label) = match (&args.model, &args.synthetic) {
        (Some(m), _) => (Checkpoint::open(m)?, m.clone()),
        (None, Some(p)) => {
            let preset = Preset::by_name(p)?;
            (
                synthetic_checkpoint(&preset, 0, ferry::checkpoint::DType::BF16)?,
                format!("synthetic {p}"),
            )
        }
        (None, None) => unreachable!("clap requires --model or --synthetic"),
    };
    let longest = args.prompt_tokens.iter().max().copied().unwrap_or(0) + args.decode_tokens;
    let mut gen = Generator::new(
        &ckpt,
        Cpu,
        Some(longest.min(ckpt.config.max_position_embeddings)),
    )?;
    let device = cpu_name();
    let rows = args
        .prompt_tokens
        .iter()
        .map(|&n| time_prompt(&mut gen, n, &args))
        .collect::<Result<Vec<_>>>()?;

    let date = ferry::date::today_utc();
    if args.json {
        let rows: Vec<_> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "prompt_tokens": r.prompt_tokens, "prompt_s": r.prompt_s,
                    "prompt_tok_s": r.prompt_tokens as f64 / r.prompt_s,
                    "decode_tokens": r.decode_tokens, "decode_tok_s": r.decode_tok_s,
                })
            })
            .collect();
        let out = serde_json::json!({
            "model": label, "device": device, "threads": rayon::current_num_threads(),
            "date": date, "runs": args.runs, "warmup": args.warmup, "results": rows,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&out).expect("JSON serializes")
        );
    } else {
        println!("model   {label}");
        println!(
            "device  {device}, {} threads; {date}; median of {} runs after {} warm-up",
            rayon::current_num_threads(),
            args.runs,
            args.warmup
        );
        println!(
            "{:>13} {:>12} {:>14} {:>14}",
            "prompt tokens", "prompt s", "prompt tok/s", "decode tok/s"
        );
        for r in &rows {
            println!(
                "{:>13} {:>12.4} {:>14.1} {:>14.1}",
                r.prompt_tokens,
                r.prompt_s,
                r.prompt_tokens as f64 / r.prompt_s,
                r.decode_tok_s
            );
        }
    }
    Ok(())
}

fn time_prompt<B: Backend>(gen: &mut Generator<B>, n: usize, args: &BenchArgs) -> Result<Row> {
    // Token ids spread over the vocabulary, the same every run.
    let vocab = gen.model.config.vocab_size as u64;
    let prompt: Vec<u32> = (0..n as u64)
        .map(|i| ((i * 7919 + 13) % vocab) as u32)
        .collect();
    let request = Request {
        prompt,
        max_tokens: args.decode_tokens.max(1),
        sampling: SamplingConfig::default(),
        stop_strings: vec![],
        ignore_eos: true,
    };
    let mut prompt_s = Vec::new();
    let mut decode = Vec::new();
    for run in 0..args.warmup + args.runs {
        let out = gen.generate(&request, &mut |_| {})?;
        if run >= args.warmup {
            prompt_s.push(out.prompt_secs);
            // The first generated token comes from the prompt pass.
            let decoded = out.tokens.len().saturating_sub(1);
            if decoded > 0 {
                decode.push(decoded as f64 / out.decode_secs);
            }
        }
    }
    Ok(Row {
        prompt_tokens: n,
        prompt_s: median(&mut prompt_s),
        decode_tokens: args.decode_tokens,
        decode_tok_s: if decode.is_empty() {
            0.0
        } else {
            median(&mut decode)
        },
    })
}

fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
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
