//! `ferry synth`: write a checkpoint with random weights and a real model's shape, or a
//! diffusers image pipeline of several.

use std::path::{Path, PathBuf};

use clap::Args;

use ferry::stream::{human_bytes, parse_size};
use ferry::synth::{
    check_destination, parse_arch, parse_dtype, write_checkpoint, write_dit, write_gguf,
    write_pipeline, DitPreset, GgufFileType, GgufOptions, PipelineComponent, PipelineModels,
    PipelinePreset, Preset, SynthPreset, WriteOptions,
};
use ferry::{Error, Result};

use super::{at_least, human_count, plural};

#[derive(Args)]
pub struct SynthArgs {
    /// The model shape (see --list), e.g. qwen2.5-7b, llama-3.1-8b, tiny, or an image
    /// pipeline: z-image-turbo, z-image-tiny, qwen-image-pipeline, qwen-image-pipeline-tiny,
    /// flux.1-dev-pipeline, flux-pipeline-tiny; or a diffusion transformer alone:
    /// qwen-image, qwen-image-tiny, flux.1-dev, flux-tiny.
    #[arg(long, required_unless_present = "list")]
    preset: Option<String>,
    /// Output directory (created; must be empty or missing unless --force); with --gguf, the
    /// file (must not exist unless --force).
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
    /// Image pipelines: only these components, comma-separated (transformer, text_encoder,
    /// tokenizer, vae, scheduler; Flux also text_encoder_2, tokenizer_2), e.g. --only transformer for a DiT benchmark. More can be
    /// added to the same --out later with the same seed.
    #[arg(long, value_name = "COMPONENTS")]
    only: Option<String>,
    /// Most bytes per safetensors shard.
    #[arg(long, default_value = "4GiB", allow_negative_numbers = true)]
    shard_size: String,
    /// Language models: write one GGUF file of this type instead of a directory: Q4_K_M
    /// (llama.cpp's mix of Q4_K and Q6_K), Q8_0, Q4_0, F16 or BF16.
    #[arg(long, value_name = "TYPE")]
    gguf: Option<String>,
    /// Write into a non-empty directory, replacing what is there (or over an existing file).
    #[arg(long)]
    force: bool,
    /// List the presets and exit.
    #[arg(long)]
    list: bool,
}

pub fn synth(args: SynthArgs) -> Result<()> {
    if args.list {
        list();
        return Ok(());
    }
    let (Some(name), Some(out)) = (&args.preset, &args.out) else {
        unreachable!("clap requires --preset and --out without --list");
    };
    let opts = WriteOptions {
        seed: args.seed,
        dtype: parse_dtype(&args.dtype)?,
        shard_bytes: parse_size(&args.shard_size, "--shard-size")?,
        progress: true,
    };
    match SynthPreset::by_name(name)? {
        SynthPreset::Llm(preset) => language_model(&args, preset, out, &opts),
        SynthPreset::Pipeline(preset) => pipeline(&args, &preset, out, &opts),
        SynthPreset::Dit(preset) => dit(&args, &preset, out, &opts),
    }
}

fn list() {
    println!("language models:");
    for p in Preset::list() {
        let n = p.parameters();
        println!(
            "  {:<24} {:<10} {:>7} params {:>10} bf16  {}",
            p.name,
            p.config.arch.name(),
            human_count(n),
            human_bytes(n * 2),
            p.about
        );
    }
    println!("image pipelines (diffusers directories; --only picks components):");
    for p in PipelinePreset::list() {
        let total: usize = p.components().iter().map(|&c| p.parameters(c)).sum();
        println!(
            "  {:<24} {:<10} {:>7} params {:>10} bf16  {}",
            p.name,
            p.family(),
            human_count(total),
            human_bytes(total * 2),
            p.about
        );
        for c in p.components() {
            let n = p.parameters(c);
            if n > 0 {
                let name = format!("  {}", c.name());
                println!(
                    "  {name:<35} {:>7} params {:>10}",
                    human_count(n),
                    human_bytes(n * 2)
                );
            }
        }
    }
    println!("diffusion transformers alone (a diffusers directory with transformer/ only):");
    for p in DitPreset::list() {
        let n = p.parameters();
        println!(
            "  {:<24} {:<10} {:>7} params {:>10} bf16  {}",
            p.name,
            p.family(),
            human_count(n),
            human_bytes(n * 2),
            p.about
        );
    }
}

fn language_model(args: &SynthArgs, preset: Preset, out: &Path, opts: &WriteOptions) -> Result<()> {
    if args.only.is_some() {
        return Err(Error::Flag {
            flag: "--only",
            message: format!(
                "{} is a language model, written whole; --only picks components of an image pipeline ({})",
                preset.name,
                PipelinePreset::names()
            ),
        });
    }
    let mut preset = preset;
    if let Some(arch) = &args.arch {
        preset = preset.with_arch(parse_arch(arch)?);
    }
    if let Some(layers) = args.layers {
        preset = preset.with_layers(layers)?;
    }
    if let Some(file_type) = &args.gguf {
        return gguf_file(args, &preset, out, GgufFileType::parse(file_type)?);
    }
    let occupied = std::fs::read_dir(out)
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
    let report = write_checkpoint(&preset, out, opts)?;
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

/// `--gguf`: the model as one GGUF file at `out`.
fn gguf_file(args: &SynthArgs, preset: &Preset, out: &Path, file_type: GgufFileType) -> Result<()> {
    if out.is_dir() {
        return Err(Error::Flag {
            flag: "--out",
            message: format!(
                "{} is a directory; with --gguf, --out names the file to write",
                out.display()
            ),
        });
    }
    if out.exists() && !args.force {
        return Err(Error::Flag {
            flag: "--out",
            message: format!(
                "{} exists; choose a new file or pass --force to overwrite it",
                out.display()
            ),
        });
    }
    let opts = GgufOptions {
        seed: args.seed,
        file_type,
        progress: true,
    };
    let report = write_gguf(preset, out, &opts)?;
    let types: Vec<String> = report
        .types
        .iter()
        .map(|(ty, n)| format!("{n} {ty}"))
        .collect();
    let per_weight = report.file_bytes as f64 / report.parameters as f64;
    eprintln!(
        "wrote {} ({} {} {}, {} params, tensors {}) in {:.1} s: {} ({} bytes), {per_weight:.4} bytes/weight ({:.2} bits)",
        out.display(),
        preset.name,
        preset.config.arch.name(),
        file_type.name(),
        preset.parameters(),
        types.join(", "),
        report.seconds,
        human_bytes(report.file_bytes),
        report.file_bytes,
        per_weight * 8.0,
    );
    Ok(())
}

/// A diffusion transformer alone: the transformer of a diffusers directory.
fn dit(args: &SynthArgs, preset: &DitPreset, out: &Path, opts: &WriteOptions) -> Result<()> {
    for (flag, given) in [
        ("--arch", args.arch.is_some()),
        ("--layers", args.layers.is_some()),
        ("--gguf", args.gguf.is_some()),
    ] {
        if given {
            return Err(Error::Flag {
                flag,
                message: format!(
                    "{} is a diffusion transformer of a fixed shape; {flag} applies to language-model presets",
                    preset.name
                ),
            });
        }
    }
    if let Some(list) = &args.only {
        let components = PipelineComponent::parse_list(list)?;
        if components != [PipelineComponent::Transformer] {
            // The pipeline preset whose transformer this is, if any.
            let whole = PipelinePreset::list()
                .into_iter()
                .find(|p| match &p.models {
                    PipelineModels::QwenImage(q) => q.transformer.name == preset.name,
                    PipelineModels::Flux(f) => f.transformer.name == preset.name,
                    PipelineModels::ZImage(_) => false,
                });
            let hint = whole
                .map(|p| format!("; the whole pipeline is {}", p.name))
                .unwrap_or_default();
            return Err(Error::Flag {
                flag: "--only",
                message: format!(
                    "{} is a transformer alone, so only the transformer can be written{hint}",
                    preset.name,
                ),
            });
        }
    }
    let r = write_dit(preset, out, opts, args.force)?;
    eprintln!(
        "wrote {} ({}: the transformer alone, {} params, {} in {} shards) in {:.1} s: {:.2} GB/s",
        out.display(),
        preset.name,
        preset.parameters(),
        human_bytes(r.bytes),
        r.shards.len(),
        r.seconds,
        r.bytes as f64 / r.seconds.max(1e-9) / 1e9,
    );
    Ok(())
}

fn pipeline(
    args: &SynthArgs,
    preset: &PipelinePreset,
    out: &Path,
    opts: &WriteOptions,
) -> Result<()> {
    for (flag, given) in [
        ("--arch", args.arch.is_some()),
        ("--layers", args.layers.is_some()),
        ("--gguf", args.gguf.is_some()),
    ] {
        if given {
            return Err(Error::Flag {
                flag,
                message: format!(
                    "{} is an image pipeline of fixed shapes; {flag} applies to language-model presets",
                    preset.name
                ),
            });
        }
    }
    let components = match &args.only {
        Some(list) => preset.parse_components(list)?,
        None => preset.components(),
    };
    if !args.force {
        check_destination(preset, out, &components, opts)?;
    }
    let reports = write_pipeline(preset, out, &components, opts)?;
    let (mut bytes, mut seconds) = (0, 0.0);
    for (c, r) in &reports {
        bytes += r.bytes;
        seconds += r.seconds;
        match r.shards.len() {
            0 => eprintln!("  {:<14} config", c.name()),
            n => eprintln!(
                "  {:<14} {} params, {} in {n} shards",
                c.name(),
                preset.parameters(*c),
                human_bytes(r.bytes)
            ),
        }
    }
    eprintln!(
        "wrote {} ({}, {}) in {:.1} s: {:.2} GB/s",
        out.display(),
        preset.name,
        human_bytes(bytes),
        seconds,
        bytes as f64 / seconds.max(1e-9) / 1e9,
    );
    Ok(())
}
