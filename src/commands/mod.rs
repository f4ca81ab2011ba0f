//! The `ferry` subcommands, one module each.

pub mod bench;
pub mod bench_cuda;
pub mod bench_dit;
pub mod image;
pub mod info;
pub mod plan;
pub mod run;
pub mod synth;

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
