//! `ferry synth`: write a checkpoint with random weights and a real model's shape.

use std::path::PathBuf;

use clap::Args;

use ferry::stream::{human_bytes, parse_size};
use ferry::synth::{parse_arch, parse_dtype, write_checkpoint, Preset, WriteOptions};
use ferry::{Error, Result};

use super::{at_least, human_count, plural};

#[derive(Args)]
pub struct SynthArgs {
    /// The model shape (see --list), e.g. qwen2.5-7b, llama-3.1-8b, tiny.
    #[arg(long, required_unless_present = "list")]
    preset: Option<String>,
    /// Output directory (created; must be empty or missing unless --force).
    #[arg(long, required_unless_present = "list")]
    out: Option<PathBuf>,
    /// Architecture, if not the preset's own: llama, qwen2, qwen3 or mistral.
    #[arg(long)]
    arch: Option<String>,
    /// Seed; the same seed writes the same bytes.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    seed: u64,
    /// Weight dtype: bf16 or f32.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Number of decoder blocks, if not the preset's.
    #[arg(long, value_parser = at_least(1), allow_negative_numbers = true)]
    layers: Option<usize>,
    /// Most bytes per safetensors shard.
    #[arg(long, default_value = "4GiB", allow_negative_numbers = true)]
    shard_size: String,
    /// Write into a non-empty directory, replacing what is there.
    #[arg(long)]
    force: bool,
    /// List the presets and exit.
    #[arg(long)]
    list: bool,
}

pub fn synth(args: SynthArgs) -> Result<()> {
    if args.list {
        for p in Preset::list() {
            println!(
                "{:<14} {:<6} {:>7} params  {:>10} bf16  {}",
                p.name,
                p.config.arch.name(),
                human_count(p.parameters()),
                human_bytes(p.parameters() * 2),
                p.about
            );
        }
        return Ok(());
    }
    let (Some(name), Some(out)) = (args.preset, args.out) else {
        unreachable!("clap requires --preset and --out without --list");
    };
    let mut preset = Preset::by_name(&name)?;
    if let Some(arch) = &args.arch {
        preset = preset.with_arch(parse_arch(arch)?);
    }
    if let Some(layers) = args.layers {
        preset = preset.with_layers(layers)?;
    }
    let opts = WriteOptions {
        seed: args.seed,
        dtype: parse_dtype(&args.dtype)?,
        shard_bytes: parse_size(&args.shard_size, "--shard-size")?,
        progress: true,
    };
    let occupied = std::fs::read_dir(&out)
        .map(|mut d| d.next().is_some())
        .unwrap_or(false);
    if occupied && !args.force {
        return Err(Error::Flag {
            flag: "--out",
            message: format!(
                "{} is not empty; choose a new directory or pass --force to overwrite",
                out.display()
            ),
        });
    }
    let report = write_checkpoint(&preset, &out, &opts)?;
    eprintln!(
        "wrote {} ({} {}, {} params, {} in {}) in {:.1} s: {:.2} GB/s",
        out.display(),
        preset.name,
        preset.config.arch.name(),
        preset.parameters(),
        human_bytes(report.bytes),
        plural(report.shards.len(), "shard"),
        report.seconds,
        report.bytes as f64 / report.seconds.max(1e-9) / 1e9,
    );
    Ok(())
}
