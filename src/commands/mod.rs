//! The `ferry` subcommands, one module each.

pub mod bench;
pub mod bench_cuda;
pub mod info;
pub mod plan;
pub mod run;
pub mod synth;

use clap::Args;

#[derive(Args)]
pub struct ModelArg {
    /// A model directory, a .gguf file, or ORG/NAME from the Hugging Face cache
    /// ($HF_HOME/hub, default ~/.cache/huggingface/hub). Nothing is downloaded.
    #[arg(long, short)]
    pub model: String,
}

/// Bytes for people: KiB, MiB, GiB.
pub fn human_bytes(b: usize) -> String {
    let b = b as f64;
    const GIB: f64 = (1u64 << 30) as f64;
    const MIB: f64 = (1u64 << 20) as f64;
    if b >= GIB {
        format!("{:.2} GiB", b / GIB)
    } else if b >= MIB {
        format!("{:.1} MiB", b / MIB)
    } else {
        format!("{:.1} KiB", b / 1024.0)
    }
}
