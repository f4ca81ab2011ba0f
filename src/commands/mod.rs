//! The `ferry` subcommands, one module each.

pub mod bench;
pub mod bench_cuda;
pub mod bench_dit;
pub mod chat;
pub mod generation;
pub mod image;
pub mod info;
pub mod plan;
pub mod run;
pub mod serve;
pub mod synth;

use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};

use ferry::backend::cuda::streaming::HostMemory;

#[derive(Args)]
pub struct ModelArg {
    /// A model directory, a .gguf file, or ORG/NAME from the Hugging Face cache
    /// ($HF_HOME/hub, default ~/.cache/huggingface/hub). Nothing is downloaded.
    #[arg(long, short)]
    pub model: String,
}

/// `--host-memory`: how streamed weights reach the GPU (only with --vram).
#[derive(Args)]
pub struct HostMemoryArg {
    /// With --vram: how weights stream from host memory. auto: page-lock the checkpoint's
    /// memory in place (cuMemHostRegister), and if the driver refuses, copy through a ring of
    /// pinned staging buffers; registered: page-lock in place or fail; staged: always use the
    /// staging ring (for a low memlock limit).
    #[arg(long, value_enum, default_value_t = HostMemoryFlag::Auto, requires = "vram")]
    pub host_memory: HostMemoryFlag,
    /// With --vram: send streamed weights over the link losslessly compressed (about 0.68 of
    /// their bf16 bytes) and decode them on the GPU; the output is bit for bit the same.
    /// auto: compress what streams (not what stays resident) where weights are page-locked;
    /// on: that, or fail saying why; off: stream bf16 as stored.
    #[arg(long, value_enum, default_value_t = CompressFlag::Auto, requires = "vram")]
    pub compress: CompressFlag,
    /// With --vram: keep the compressed weights' encodings in a file for the next load,
    /// which reads them instead of encoding again (about 300 MB/s of weights a core):
    /// beside the model in .ferry-encodings/, or where that folder cannot be written under
    /// $FERRY_CACHE/encodings (default ~/.cache/ferry). The file is checked against the
    /// weight files' sizes and times and its own checksums at every load, and rebuilt when
    /// stale or corrupt. off: encode at every load.
    #[arg(long, value_enum, default_value_t = EncodingCacheFlag::On, requires = "vram")]
    pub encoding_cache: EncodingCacheFlag,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum EncodingCacheFlag {
    On,
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CompressFlag {
    Auto,
    On,
    Off,
}

impl HostMemoryArg {
    /// The streaming options these flags ask for.
    pub fn options(&self) -> ferry::runtime::StreamOptions {
        ferry::runtime::StreamOptions {
            host: self.host_memory.into(),
            compress: match self.compress {
                CompressFlag::Auto => ferry::stream::compress::Compress::Auto,
                CompressFlag::On => ferry::stream::compress::Compress::On,
                CompressFlag::Off => ferry::stream::compress::Compress::Off,
            },
            encoding_cache: match self.encoding_cache {
                EncodingCacheFlag::On => ferry::stream::encoding_cache::CacheMode::On,
                EncodingCacheFlag::Off => ferry::stream::encoding_cache::CacheMode::Off,
            },
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum HostMemoryFlag {
    Auto,
    Registered,
    Staged,
}

impl From<HostMemoryFlag> for HostMemory {
    fn from(f: HostMemoryFlag) -> HostMemory {
        match f {
            HostMemoryFlag::Auto => HostMemory::Auto,
            HostMemoryFlag::Registered => HostMemory::Registered,
            HostMemoryFlag::Staged => HostMemory::Staged,
        }
    }
}

/// A value parser for counts (`--batch`, `--context`): a whole number of at least `min`. With
/// the argument's `allow_negative_numbers`, `--batch -1` reaches this check (and its message)
/// instead of being read as an unknown flag `-1`.
pub fn at_least(min: usize) -> impl Fn(&str) -> Result<usize, String> + Clone + Send + Sync {
    between(min, usize::MAX)
}

/// As [`at_least`], and at most `max` (a count that sizes memory, where a huge one would
/// overflow the arithmetic that plans it).
pub fn between(
    min: usize,
    max: usize,
) -> impl Fn(&str) -> Result<usize, String> + Clone + Send + Sync {
    move |s: &str| match s.trim().parse::<i128>() {
        Ok(n) if n >= min as i128 && n <= max as i128 => Ok(n as usize),
        _ if max == usize::MAX => Err(format!("expected a whole number ≥ {min}, found {s:?}")),
        _ => Err(format!(
            "expected a whole number from {min} to {max}, found {s:?}"
        )),
    }
}

/// A seed from the clock and the process id, for runs that give none (printed, so that the
/// run can be repeated with `--seed`).
pub fn random_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    (nanos ^ (std::process::id() as u64).rotate_left(32)) % 1_000_000_000
}

/// `"1 token"`, `"2 tokens"`, `"3 passes"`: a count and its noun, singular for one.
pub fn plural(n: usize, noun: &str) -> String {
    match (n, noun.ends_with('s')) {
        (1, _) => format!("{n} {noun}"),
        (_, true) => format!("{n} {noun}es"),
        (_, false) => format!("{n} {noun}s"),
    }
}

/// `--json [FILE]`, the same on every command that reports measurements: JSON on standard
/// output instead of the table, or with FILE the table as usual and the JSON in FILE too.
#[derive(Args)]
pub struct JsonArg {
    /// Print the result as JSON instead of the table; with FILE, print the table and write
    /// the JSON to FILE (on one line).
    #[arg(long, value_name = "FILE", num_args = 0..=1, default_missing_value = "-")]
    json: Option<PathBuf>,
}

impl JsonArg {
    /// Whether the JSON takes the table's place on standard output.
    pub fn replaces_table(&self) -> bool {
        self.json.as_deref() == Some(Path::new("-"))
    }

    /// Hand `value` out where `--json` says: indented on standard output, on one line in a
    /// file (so that results append into a JSON Lines file), or nowhere.
    pub fn emit(&self, value: &serde_json::Value) -> ferry::Result<()> {
        match self.json.as_deref() {
            None => Ok(()),
            Some(p) if p == Path::new("-") => {
                let text = serde_json::to_string_pretty(value).expect("JSON serializes");
                println!("{text}");
                Ok(())
            }
            Some(path) => std::fs::write(path, value.to_string() + "\n")
                .map_err(|e| ferry::Error::io(path, e)),
        }
    }
}

/// A count for people: `139.6K`, `134.5M`, `7.62B`.
pub fn human_count(n: usize) -> String {
    let x = n as f64;
    if x >= 1e9 {
        format!("{:.2}B", x / 1e9)
    } else if x >= 1e6 {
        format!("{:.1}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1}K", x / 1e3)
    } else {
        n.to_string()
    }
}

/// Each group's median compute time over several passes' `group_compute_ms`: what a plan
/// made from measurement (`StreamSetup::measured_ms`) takes as the groups' compute.
pub fn median_group_compute(passes: &[Vec<f64>]) -> Vec<f64> {
    let groups = passes.iter().map(Vec::len).min().unwrap_or(0);
    (0..groups)
        .map(|g| median(&mut passes.iter().map(|ms| ms[g]).collect::<Vec<_>>()))
        .collect()
}

/// The median of `xs` (sorted in place; the mean of the middle two for an even count).
pub fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}
