//! `ferry info`: what a checkpoint holds.

use ferry::checkpoint::{resolve_model_path, Format, Pipeline};
use ferry::model::flux::{self, Flux, FluxConfig};
use ferry::model::qwen_image::{self, QwenImage, QwenImageConfig};
use ferry::model::z_image::{ZImage, ZImageConfig};
use ferry::model::Checkpoint;
use ferry::model::{Architecture, Llama};
use ferry::Result;

use super::{human_count, plural, ModelArg};
use ferry::stream::human_bytes;

pub fn info(args: ModelArg) -> Result<()> {
    let path = resolve_model_path(&args.model)?;
    if Pipeline::is_pipeline(&path) {
        return pipeline_info(&Pipeline::open(&path)?);
    }
    let ckpt = Checkpoint::open(&args.model)?;
    let c = &ckpt.config;
    let mut dtypes: Vec<String> = ckpt.tensors.values().map(|t| t.dtype.to_string()).collect();
    dtypes.sort();
    dtypes.dedup();
    println!("model          {}", ckpt.path.display());
    println!("format         {}", ckpt.format);
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
    // As stored (a GGUF's quantized blocks), then as ferry holds the weights.
    let stored: Vec<String> = ckpt
        .stored
        .dtypes
        .iter()
        .map(|(dtype, n)| format!("{dtype} ({})", plural(*n, "tensor")))
        .collect();
    println!(
        "file           {} ({}); stored as {}",
        ckpt.stored.file_bytes,
        human_bytes(ckpt.stored.file_bytes),
        stored.join(", ")
    );
    println!(
        "bytes          {} ({}) in memory as {}{}",
        ckpt.bytes(),
        human_bytes(ckpt.bytes()),
        dtypes.join(", "),
        match ckpt.format {
            Format::Gguf => ", dequantized at load",
            Format::Safetensors => ", mapped from the files",
        }
    );
    println!("weight groups (pass order):");
    let model = Llama::new(c.clone());
    for g in model.groups() {
        let bytes = g.bytes(&ckpt);
        println!("  {:<12} {:>12}  {}", g.label, bytes, human_bytes(bytes));
    }
    Ok(())
}

/// A diffusers directory: its class, each component's class and bytes, and the DiT's
/// weight groups as the engine would stream them.
fn pipeline_info(p: &Pipeline) -> Result<()> {
    println!("pipeline       {} ({})", p.path.display(), p.class_name);
    for (name, c) in &p.components {
        let params: usize = c.tensors.values().map(|t| t.numel()).sum();
        let class = c.class_name.as_deref().unwrap_or("?");
        if c.tensors.is_empty() {
            println!("  {name:<13} {class}");
        } else {
            println!(
                "  {name:<13} {class}: {} parameters, {}",
                human_count(params),
                human_bytes(c.bytes())
            );
        }
    }
    if let Some(tr) = p.components.get("transformer") {
        let dit: Option<Box<dyn Architecture>> = match tr.class_name.as_deref() {
            Some("ZImageTransformer2DModel") => {
                let (path, json) = tr.config()?;
                Some(Box::new(ZImage::new(ZImageConfig::from_json(path, json)?)))
            }
            Some(qwen_image::CLASS_NAME) => {
                let (path, json) = tr.config()?;
                Some(Box::new(QwenImage::new(QwenImageConfig::from_json(
                    path, json,
                )?)))
            }
            Some(flux::CLASS_NAME) => {
                let (path, json) = tr.config()?;
                Some(Box::new(Flux::new(FluxConfig::from_json(path, json)?)))
            }
            _ => None,
        };
        if let Some(dit) = dit {
            println!("transformer weight groups (pass order):");
            for g in dit.groups() {
                let bytes = g
                    .tensors
                    .iter()
                    .filter_map(|t| tr.tensors.get(&t.name))
                    .map(|t| t.bytes().len())
                    .sum();
                println!("  {:<18} {:>12}  {}", g.label, bytes, human_bytes(bytes));
            }
        }
    }
    Ok(())
}
