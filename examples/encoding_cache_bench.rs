//! Load time of a model's exponent encodings, on the CPU, as a CUDA load makes them (every
//! weight held as bf16, every group that may stream encoded, as at the least budget): encoded
//! with no cache, then the first load with the cache (encode and write the file), then the
//! next loads (read it: map each entry and check its checksum). Prints a table and one JSON
//! line; the cache is the one `ferry --vram` uses (`.ferry-encodings/` beside the model),
//! removed first so that the first load starts from none.
//!
//! With `--reuse`, the cache is kept and every load reads it (to time a read from disk after
//! its pages are evicted, e.g. with `posix_fadvise(DONTNEED)` on the file).
//!
//! Usage: cargo run --release --example encoding_cache_bench -- MODEL_DIR [HITS] [--reuse]

use std::time::Instant;

use ferry::model::{Architecture, Checkpoint, Llama};
use ferry::runtime::ASSUMED_DECODE;
use ferry::stream::compress::{encode_jobs, Compressed};
use ferry::stream::encoding_cache::EncodingCache;
use ferry::stream::GroupTensors;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args: Vec<String> = std::env::args().collect();
    let reuse = args.iter().any(|a| a == "--reuse");
    args.retain(|a| a != "--reuse");
    let (model, hits) = match &args[..] {
        [_, m] => (m.clone(), 2),
        [_, m, n] => (m.clone(), n.parse()?),
        _ => return Err("usage: encoding_cache_bench MODEL_DIR [HITS] [--reuse]".into()),
    };
    let t = Instant::now();
    let ckpt = Checkpoint::open(&model)?;
    let open_s = t.elapsed().as_secs_f64();
    let arch = Llama::new(ckpt.config.clone());
    let tensors = GroupTensors::of(&ckpt, &arch)?;
    let gather: Vec<bool> = arch.groups().iter().map(|g| g.host_gather).collect();
    // As the CUDA runtime makes them: bf16 on the device, 256-byte slot alignment.
    let compressed = Compressed::blocks(&tensors.groups, true, 256, ASSUMED_DECODE);
    let jobs = compressed.exponent_jobs(&tensors.groups, &tensors.splits, |g| !gather[g], true);
    let bf16_bytes: usize = jobs.iter().map(|j| j.tensor.numel() * 2).sum();
    let cache = EncodingCache::for_files(ckpt.stored.files.as_slice())
        .ok_or("the model has no weight files")?;
    let mut rows: Vec<(String, f64)> = Vec::new();
    let mut encoded_bytes = 0;
    if !reuse {
        for p in cache.places() {
            let _ = std::fs::remove_file(p);
        }
        let t = Instant::now();
        let fresh = encode_jobs(&jobs)?;
        rows.push(("encode, no cache".into(), t.elapsed().as_secs_f64()));
        encoded_bytes = fresh.iter().flatten().map(|e| e.encoded_bytes()).sum();
    }
    for run in usize::from(reuse)..1 + hits {
        let t = Instant::now();
        let (encodings, used) = cache.encodings(&jobs)?;
        let s = t.elapsed().as_secs_f64();
        for line in used.messages() {
            eprintln!("{line}");
        }
        encoded_bytes = encodings.iter().flatten().map(|e| e.encoded_bytes()).sum();
        drop(encodings);
        let what = if run == 0 {
            "first load: encode + write".to_string()
        } else {
            assert!(used.is_hit(), "load {run} read the cache: {used:?}");
            format!("load {}: read the cache", run + 1)
        };
        rows.push((what, s));
    }

    println!(
        "{model}: {} tensors, {:.2} GB of bf16 encoded to {:.2} GB ({:.3}); opened in {open_s:.2} s; {} threads",
        jobs.len(),
        bf16_bytes as f64 / 1e9,
        encoded_bytes as f64 / 1e9,
        encoded_bytes as f64 / bf16_bytes as f64,
        rayon::current_num_threads()
    );
    println!("| load | s | GB/s of bf16 |");
    println!("|---|---|---|");
    for (what, s) in &rows {
        println!("| {what} | {s:.3} | {:.2} |", bf16_bytes as f64 / 1e9 / s);
    }
    let json = serde_json::json!({
        "model": model,
        "tensors": jobs.len(),
        "bf16_bytes": bf16_bytes,
        "encoded_bytes": encoded_bytes,
        "threads": rayon::current_num_threads(),
        "seconds": rows.iter().map(|(w, s)| serde_json::json!({"load": w, "s": s})).collect::<Vec<_>>(),
    });
    println!("{json}");
    Ok(())
}
