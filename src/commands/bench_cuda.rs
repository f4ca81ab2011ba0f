//! `ferry bench-cuda`: time the CUDA backend with the whole model resident on the GPU: one
//! prompt pass, and decoding one token at a time at a given context. Prints a table and a
//! JSON line (medians of several runs after a warm-up, the card and the date).

use std::time::Instant;

use clap::Args;

use super::{median, median_group_compute};
use serde_json::json;

use ferry::backend::cuda::streaming::{PassStats, StreamedWeights};
use ferry::backend::{Backend, Device, KvCache};
use ferry::model::Checkpoint;
use ferry::model::{Architecture, Llama, LlamaConfig, Logits, PassShape, ResidentWeights};
use ferry::runtime::{open_checkpoint, open_gpu, stream_weights, StreamSetup};
use ferry::stream::timeline::{write_svg, PassInfo};
use ferry::stream::{human_bytes, Vram};
use ferry::synth::random_token_ids;
use ferry::{Error, Result};

use super::{at_least, HostMemoryArg, JsonArg};

/// `println!` where the table is shown: not when `--json` prints JSON in its place.
macro_rules! table {
    ($show:expr) => {
        if $show {
            println!();
        }
    };
    ($show:expr, $($arg:tt)*) => {
        if $show {
            println!($($arg)*);
        }
    };
}

#[derive(Args)]
pub struct BenchCudaArgs {
    /// A checkpoint (directory, .gguf or ORG/NAME); or use --synthetic.
    #[arg(
        long,
        short,
        required_unless_present = "synthetic",
        conflicts_with = "synthetic"
    )]
    model: Option<String>,
    /// Random weights of a preset's shape, made in memory (see `ferry synth --list`).
    #[arg(long, value_name = "PRESET", alias = "preset")]
    synthetic: Option<String>,
    /// Tokens in the timed prompt pass.
    #[arg(long, default_value = "4096", value_parser = at_least(1), allow_negative_numbers = true)]
    prompt_tokens: usize,
    /// Positions already in the KV cache when decoding is timed (as `ferry plan --past`).
    #[arg(long, default_value = "1024", value_parser = at_least(0), allow_negative_numbers = true, conflicts_with = "vram")]
    past: usize,
    /// Tokens decoded (one per pass) in each timed decode run.
    #[arg(long, default_value = "32", value_parser = at_least(1), allow_negative_numbers = true, conflicts_with = "vram")]
    decode_tokens: usize,
    /// Timed runs of each measurement (after one warm-up run); the median is reported.
    #[arg(long, default_value = "5", value_parser = at_least(1), allow_negative_numbers = true)]
    runs: usize,
    /// cuda or cuda:N.
    #[arg(long, default_value = "cuda", value_name = "cuda[:N]")]
    device: Device,
    #[command(flatten)]
    json: JsonArg,
    /// GPU memory budget (6GiB, 2.6GiB, auto): time the prompt pass with the weights that do
    /// not fit streamed from host memory, with per-pass streaming stats (decode is not
    /// timed: --past and --decode-tokens are refused).
    #[arg(long, value_name = "SIZE|auto", allow_negative_numbers = true)]
    vram: Option<String>,
    /// With --vram: draw one streamed pass (copy and compute of each weight group on two
    /// lanes) as an SVG picture in this file.
    #[arg(long, value_name = "FILE.svg", requires = "vram")]
    timeline: Option<std::path::PathBuf>,
    #[command(flatten)]
    host_memory: HostMemoryArg,
}

pub fn bench_cuda(args: BenchCudaArgs) -> Result<()> {
    if args.device == Device::Cpu {
        return Err(Error::Flag {
            flag: "--device",
            message: "bench-cuda times a CUDA device; give cuda or cuda:N".into(),
        });
    }
    let start = Instant::now();
    let t = Instant::now();
    let (ckpt, source) = open_checkpoint(
        args.model.as_deref(),
        args.synthetic.as_deref(),
        ferry::checkpoint::gguf::Weights::Blocks,
    )?;
    let open_secs = t.elapsed().as_secs_f64();

    if let Some(v) = &args.vram {
        let vram = Vram::parse(v)?;
        return bench_streamed(&args, vram, &ckpt, &source, start, open_secs);
    }
    let gpu = open_gpu(args.device, None)?;
    let c = ckpt.config.clone();
    let t = Instant::now();
    gpu.prepare(c.head_dim)?;
    let kernel_secs = t.elapsed().as_secs_f64();
    let model = Llama::new(c.clone());
    let t = Instant::now();
    let mut weights = ResidentWeights::load(&ckpt, model.groups(), |t| gpu.weight(t))?;
    gpu.synchronize()?;
    let upload_secs = t.elapsed().as_secs_f64();
    let weight_bytes = ckpt.bytes(); // each tensor once (a tied head is the embedding)
    eprintln!(
        "[{}: {source}; {:.2} GB of weights uploaded in {upload_secs:.1} s; kernels ready in {kernel_secs:.2} s]",
        gpu.info(),
        weight_bytes as f64 / 1e9
    );

    let vocab = c.vocab_size;
    let ids = |n: usize, seed: u64| random_token_ids(n, vocab, seed);
    let shape = model.attention_shape();

    // Prompt pass: one forward over the prompt from an empty cache, last position's logits,
    // next token picked on the device (which waits for the pass to finish).
    let p = args.prompt_tokens;
    let mut prompt_secs = Vec::new();
    for run in 0..=args.runs {
        let mut cache = gpu.kv_cache(c.num_layers, shape, p)?;
        let tokens = ids(p, run as u64);
        gpu.synchronize()?;
        let t = Instant::now();
        let logits = model.forward_logits(&gpu, &mut weights, &tokens, &mut cache, Logits::Last)?;
        gpu.argmax_rows(&logits)?;
        if run > 0 {
            prompt_secs.push(t.elapsed().as_secs_f64());
        }
    }

    // Decode: fill the context (untimed), then one token a pass.
    let ctx = args.past;
    let n = args.decode_tokens;
    let mut token_secs = Vec::new();
    for run in 0..=args.runs {
        let mut cache = gpu.kv_cache(c.num_layers, shape, ctx + n + 1)?;
        if ctx > 0 {
            let l = model.forward_logits(
                &gpu,
                &mut weights,
                &ids(ctx, 100 + run as u64),
                &mut cache,
                Logits::Last,
            )?;
            gpu.argmax_rows(&l)?;
        }
        let mut next = 1u32;
        let t = Instant::now();
        for _ in 0..n {
            let l = model.forward_logits(&gpu, &mut weights, &[next], &mut cache, Logits::Last)?;
            next = gpu.argmax_rows(&l)?[0];
        }
        debug_assert_eq!(cache.len(), ctx + n);
        if run > 0 {
            token_secs.push(t.elapsed().as_secs_f64() / n as f64);
        }
    }

    let prompt_s = median(&mut prompt_secs);
    let token_s = median(&mut token_secs);
    let prompt_flop = prompt_flops(&c, p);
    // Bytes a decode step reads: every weight except the embedding table (one row of it),
    // plus the keys and values of the context (mid-run context: ctx + n/2).
    let embed_bytes = vocab * c.hidden_size * 2;
    let head_shares_embedding = c.tie_word_embeddings;
    let kv_bytes = 2 * c.num_layers * (ctx + n / 2) * c.num_kv_heads * c.head_dim * 2;
    let decode_bytes = weight_bytes
        - if head_shares_embedding {
            0
        } else {
            embed_bytes
        }
        + kv_bytes;
    let date = ferry::date::today_utc();
    let show = !args.json.replaces_table();
    let card = gpu.info().to_string();

    table!(show);
    table!(show, "ferry bench-cuda — {card}, {date}");
    table!(
        show,
        "model: {source} ({:.2} GB)",
        weight_bytes as f64 / 1e9
    );
    table!(show, "| measurement | median of {} | rate |", args.runs);
    table!(show, "|---|---|---|");
    table!(
        show,
        "| prompt pass, {p} tokens | {:.4} s ({:.0} tok/s) | {:.0} TFLOP/s |",
        prompt_s,
        p as f64 / prompt_s,
        prompt_flop / prompt_s / 1e12
    );
    table!(
        show,
        "| decode, batch 1, context {ctx} | {:.2} ms/token ({:.1} tok/s) | {:.0} GB/s |",
        token_s * 1e3,
        1.0 / token_s,
        decode_bytes as f64 / token_s / 1e9
    );
    let result = json!({
        "card": card,
        "date": date,
        "model": source,
        "weight_bytes": weight_bytes,
        "runs": args.runs,
        "prompt_tokens": p,
        "prompt_seconds_median": prompt_s,
        "prompt_seconds_all": prompt_secs,
        "prompt_tflops": prompt_flop / prompt_s / 1e12,
        "decode_context": ctx,
        "decode_tokens_per_run": n,
        "decode_seconds_per_token_median": token_s,
        "decode_seconds_per_token_all": token_secs,
        "decode_tokens_per_second": 1.0 / token_s,
        "decode_gbps": decode_bytes as f64 / token_s / 1e9,
        "open_seconds": open_secs,
        "upload_seconds": upload_secs,
    });
    args.json.emit(&result)
}

/// Floating-point operations of a prompt pass over `t` tokens that returns the last
/// position's logits: every linear layer, causal attention (QKᵀ and PV over the keys each
/// row sees), and the head for one row.
fn prompt_flops(c: &LlamaConfig, t: usize) -> f64 {
    let (h, q, kv, ffn) = (
        c.hidden_size as f64,
        (c.num_heads * c.head_dim) as f64,
        (c.num_kv_heads * c.head_dim) as f64,
        c.intermediate_size as f64,
    );
    let t = t as f64;
    let linear = 2.0 * t * (h * (q + 2.0 * kv) + q * h + 3.0 * h * ffn);
    let seen = t * (t + 1.0) / 2.0; // keys summed over rows
    let attention = 4.0 * seen * q;
    c.num_layers as f64 * (linear + attention) + 2.0 * h * c.vocab_size as f64
}

/// `bench-cuda --vram`: prompt passes with weights streamed within the budget.
fn bench_streamed(
    args: &BenchCudaArgs,
    vram: Vram,
    ckpt: &Checkpoint,
    source: &str,
    start: Instant,
    open_secs: f64,
) -> Result<()> {
    let gpu = open_gpu(args.device, Some(vram))?;
    let c = ckpt.config.clone();
    gpu.prepare(c.head_dim)?;
    let model = Llama::new(c.clone());
    let p = args.prompt_tokens;
    let shape = PassShape {
        tokens: p,
        batch: 1,
        past: 0,
    };
    let attn = model.attention_shape();
    let vocab = c.vocab_size;
    let ids = |seed: u64| random_token_ids(p, vocab, seed);
    let pass = |weights: &mut StreamedWeights, seed: u64| -> Result<(f64, PassStats)> {
        let mut cache = gpu.kv_cache(c.num_layers, attn, p)?;
        let tokens = ids(seed);
        gpu.synchronize()?;
        let t = Instant::now();
        let logits = model.forward_logits(&gpu, weights, &tokens, &mut cache, Logits::Last)?;
        gpu.argmax_rows(&logits)?;
        let secs = t.elapsed().as_secs_f64();
        Ok((secs, weights.pass_stats()?))
    };

    // First plan from the measured H2D bandwidth and assumed compute; a warm pass measures
    // each group's compute, and the plan is made again from those (what is reported).
    let t = Instant::now();
    let host = args.host_memory.options();
    let setup = StreamSetup::new(shape, host);
    let mut weights = stream_weights(&gpu, ckpt, &model, setup)?;
    let setup_secs = t.elapsed().as_secs_f64();
    let start_to_first_pass = start.elapsed().as_secs_f64();
    let (first_secs, first) = pass(&mut weights, 0)?;
    // The first pass also builds cuBLASLt plans: measure compute on the next ones, each
    // group's median of three.
    let warm = (0..3)
        .map(|_| pass(&mut weights, 0).map(|(_, st)| st.group_compute_ms))
        .collect::<Result<Vec<_>>>()?;
    let measured = median_group_compute(&warm);
    drop(weights);
    let setup = StreamSetup {
        measured_ms: Some(&measured),
        ..setup
    };
    let mut weights = stream_weights(&gpu, ckpt, &model, setup)?;
    let plan = weights.plan().clone();
    eprintln!(
        "[{}: {source}; host tier: {}; H2D {:.1} GB/s measured; start to first streamed pass {:.2} s (open {:.2} s, register + plan + upload {:.2} s); first pass {:.3} s]",
        gpu.info(),
        weights.host_mode(),
        weights.h2d_gbps(),
        start_to_first_pass,
        open_secs,
        setup_secs,
        first_secs,
    );
    eprint!("{plan}");

    let mut secs = Vec::new();
    let mut stats = Vec::new();
    for run in 0..=args.runs {
        let (s, st) = pass(&mut weights, 1 + run as u64)?;
        if run > 0 {
            secs.push(s);
            stats.push(st);
        }
    }
    let mut sorted = secs.clone();
    let pass_s = median(&mut sorted);
    let mid = secs
        .iter()
        .position(|&s| s == sorted[sorted.len() / 2])
        .unwrap_or(0);
    let st = &stats[mid];
    let predicted = plan.prediction;
    let again = weights.predict_measured(&st.group_compute_ms);
    let peak_device = stats.iter().map(|s| s.device_bytes).max().unwrap_or(0);
    let rss = host_peak_rss();
    let date = ferry::date::today_utc();
    let show = !args.json.replaces_table();
    let card = gpu.info().to_string();
    let budget = gpu.memory().budget();
    table!(show);
    table!(
        show,
        "ferry bench-cuda --vram {} — {card}, {date}",
        human_bytes(budget)
    );
    table!(show,
        "model: {source} ({:.2} GB); {p}-token prompt pass; {} of {} groups resident, {} slots × {}",
        ckpt.bytes() as f64 / 1e9,
        plan.resident.len(),
        plan.groups.len(),
        plan.slots,
        human_bytes(plan.slot_bytes)
    );
    table!(show, "| measurement | value |");
    table!(show, "|---|---|");
    table!(
        show,
        "| pass, median of {} (host clock) | {:.4} s |",
        args.runs,
        pass_s
    );
    table!(
        show,
        "| pass on the device (events) | {:.1} ms |",
        st.pass_ms
    );
    table!(
        show,
        "| streamed | {:.2} GB at {:.1} GB/s (H2D measured {:.1} GB/s) |",
        st.streamed_bytes as f64 / 1e9,
        st.achieved_gbps,
        weights.h2d_gbps()
    );
    table!(
        show,
        "| compute (of which decoding) / stall | {:.1} ms ({:.1} ms) / {:.1} ms |",
        st.compute_ms,
        st.decode_ms,
        st.stall_ms
    );
    table!(
        show,
        "| bound max(compute, bytes/H2D) | {:.1} ms; overlap efficiency {:.3} |",
        st.bound_ms,
        st.efficiency
    );
    table!(show,
        "| planner's prediction | {:.1} ms ({:+.1} % vs measured); from this pass's compute: {:.1} ms |",
        predicted.pass_ms,
        100.0 * (predicted.pass_ms - st.pass_ms) / st.pass_ms,
        again.pass_ms
    );
    table!(
        show,
        "| device memory (driver) / budget | {} / {} (ledger peak {}) |",
        human_bytes(peak_device),
        human_bytes(budget),
        human_bytes(gpu.memory().peak())
    );
    table!(
        show,
        "| host peak RSS / model | {} / {} |",
        human_bytes(rss),
        human_bytes(ckpt.bytes())
    );
    table!(
        show,
        "| start to first streamed pass | {start_to_first_pass:.2} s |"
    );
    if let Some(path) = &args.timeline {
        // One more pass, drawn.
        let (_, drawn) = pass(&mut weights, 99)?;
        let events = weights.pass_timeline()?;
        let info = pass_info(
            format!("{source} ({:.2} GB)", ckpt.bytes() as f64 / 1e9),
            format!("a {p}-token prompt pass after the timed runs"),
            budget,
            p,
            &card,
            &drawn,
        );
        write_svg(path, &events, &info)?;
        eprintln!("[timeline of one pass written to {}]", path.display());
    }
    let result = json!({
        "card": card,
        "date": date,
        "model": source,
        "weight_bytes": ckpt.bytes(),
        "vram_budget_bytes": budget,
        "host_mode": weights.host_mode().to_string(),
        "prompt_tokens": p,
        "runs": args.runs,
        "pass_seconds_median": pass_s,
        "pass_seconds_all": secs,
        "stats_median_pass": st,
        "stats_all": stats,
        "h2d_gbps_measured": weights.h2d_gbps(),
        "predicted_pass_ms": predicted.pass_ms,
        "predicted_stall_ms": predicted.stall_ms,
        "predicted_from_this_pass_ms": again.pass_ms,
        "resident_groups": plan.resident.len(),
        "slots": plan.slots,
        "slot_bytes": plan.slot_bytes,
        "peak_device_bytes_driver": peak_device,
        "ledger_peak_bytes": gpu.memory().peak(),
        "host_peak_rss_bytes": rss,
        "start_to_first_pass_seconds": start_to_first_pass,
        "first_pass_seconds": first_secs,
        "first_pass_stats": first,
    });
    args.json.emit(&result)
}

/// The title and caption of a drawn pass: what it is (`pass`), of `tokens` new tokens, with
/// its measured time and bound from `stats`.
pub fn pass_info(
    model: String,
    pass: String,
    vram_budget: usize,
    tokens: usize,
    card: &str,
    stats: &PassStats,
) -> PassInfo {
    PassInfo {
        model,
        pass,
        vram_budget,
        tokens,
        card: card.to_string(),
        date: ferry::date::today_utc(),
        pass_ms: stats.pass_ms,
        bound_ms: stats.bound_ms,
        bound: if stats.bound_ms > stats.compute_ms {
            format!(
                "PCIe: {:.2} GB at {:.1} GB/s",
                stats.streamed_bytes as f64 / 1e9,
                stats.streamed_bytes as f64 / (stats.bound_ms * 1e6)
            )
        } else {
            "compute".into()
        },
    }
}

/// Peak resident set of this process (VmHWM), bytes; 0 where /proc is not there.
fn host_peak_rss() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<usize>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}
