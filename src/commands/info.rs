//! `ferry info`: what a checkpoint holds.

use ferry::checkpoint::Checkpoint;
use ferry::model::{Architecture, Llama};
use ferry::Result;

use super::ModelArg;
use ferry::stream::human_bytes;

pub fn info(args: ModelArg) -> Result<()> {
    let ckpt = Checkpoint::open(&args.model)?;
    let c = &ckpt.config;
    let mut dtypes: Vec<String> = ckpt.tensors.values().map(|t| t.dtype.to_string()).collect();
    dtypes.sort();
    dtypes.dedup();
    println!("model          {}", ckpt.path.display());
    println!("format         {:?}", ckpt.format);
    println!("architecture   {}", c.arch.name());
    println!(
        "shape          hidden {}, {} layers, {}/{} heads × {}, ffn {}, vocab {}",
        c.hidden_size,
        c.num_layers,
        c.num_heads,
        c.num_kv_heads,
        c.head_dim,
        c.intermediate_size,
        c.vocab_size
    );
    println!("context        {}", c.max_position_embeddings);
    println!(
        "parameters     {} ({})",
        ckpt.parameters(),
        human_count(ckpt.parameters())
    );
    println!(
        "bytes          {} ({})",
        ckpt.bytes(),
        human_bytes(ckpt.bytes())
    );
    println!("dtype          {}", dtypes.join(", "));
    println!("weight groups (pass order):");
    let model = Llama::new(c.clone());
    for g in model.groups() {
        let bytes = g.bytes(&ckpt);
        println!("  {:<12} {:>12}  {}", g.label, bytes, human_bytes(bytes));
    }
    Ok(())
}

fn human_count(n: usize) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2}B", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.1}M", n / 1e6)
    } else {
        format!("{:.1}K", n / 1e3)
    }
}
