//! Prompt attention, v1 against v2 (the kernels of attention_prefill.cu), at the shapes that
//! matter: a DiT step's full attention (Z-Image: 4224 rows, 30 heads of 128; Flux: 4608, 24)
//! and causal prompt passes (Qwen2.5-7B: 28/4 heads of 128, 4096 and 512 tokens). Prints a
//! table, then one JSON line.
//!
//!     cargo run --release --example attention_bench [-- --runs 15]
//!
//! Each sample times `reps` launches between two device synchronizations (wall clock), so the
//! host's wait is spread over several kernels; the figure is the median of `--runs` samples
//! per launch. TFLOP/s counts the products only: 4·t²·d·heads non-causal, half that causal.
//! A causal launch also copies the chunk's K and V into the cache (0.2% of the 4096-token
//! kernel's bytes moved, about 2% of the 512-token one's time), as every prompt pass does.

use std::time::Instant;

use ferry::backend::cuda::{AttentionKernel, Cuda};
use ferry::backend::dit::DitOps;
use ferry::backend::{AttentionShape, Backend};

struct Case {
    name: &'static str,
    causal: bool,
    t: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

const CASES: [Case; 6] = [
    Case {
        name: "z-image full",
        causal: false,
        t: 4224,
        heads: 30,
        kv_heads: 30,
        head_dim: 128,
    },
    Case {
        name: "flux full",
        causal: false,
        t: 4608,
        heads: 24,
        kv_heads: 24,
        head_dim: 128,
    },
    Case {
        name: "small image full",
        causal: false,
        t: 1024,
        heads: 30,
        kv_heads: 30,
        head_dim: 128,
    },
    Case {
        name: "7B prefill causal",
        causal: true,
        t: 4096,
        heads: 28,
        kv_heads: 4,
        head_dim: 128,
    },
    Case {
        name: "7B short causal",
        causal: true,
        t: 512,
        heads: 28,
        kv_heads: 4,
        head_dim: 128,
    },
    Case {
        name: "smollm2 causal",
        causal: true,
        t: 4096,
        heads: 9,
        kv_heads: 3,
        head_dim: 64,
    },
];

fn random(n: usize, scale: f32, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median seconds per launch of `case` with `kernel`.
fn time(cuda: &Cuda, case: &Case, kernel: AttentionKernel, runs: usize) -> ferry::Result<f64> {
    let (t, hd) = (case.t, case.head_dim);
    let (width, kv_width) = (case.heads * hd, case.kv_heads * hd);
    let q = DitOps::upload(cuda, &random(t * width, 2.0, 1), t, width)?;
    let k = DitOps::upload(cuda, &random(t * kv_width, 2.0, 2), t, kv_width)?;
    let v = DitOps::upload(cuda, &random(t * kv_width, 1.0, 3), t, kv_width)?;
    let shape = AttentionShape {
        num_heads: case.heads,
        num_kv_heads: case.kv_heads,
        head_dim: hd,
        sliding_window: None,
    };
    let mut cache = cuda.kv_cache(1, shape, t)?;
    let mut out = cuda.activation(t, width)?;
    cuda.set_attention_kernel(kernel);
    let mut once = || -> ferry::Result<()> {
        if case.causal {
            cuda.attention(&q, &k, &v, 0..t, &mut cache, 0, 0, shape, &mut out)
        } else {
            cuda.attention_within(&q, &k, &v, std::slice::from_ref(&(0..t)), case.heads, hd)
                .map(drop)
        }
    };
    // Warm: compiles (or loads) the kernel, settles clocks.
    for _ in 0..3 {
        once()?;
    }
    cuda.synchronize()?;
    let reps = if t <= 1024 { 40 } else { 5 };
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        for _ in 0..reps {
            once()?;
        }
        cuda.synchronize()?;
        samples.push(start.elapsed().as_secs_f64() / reps as f64);
    }
    Ok(median(samples))
}

fn main() -> ferry::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let runs = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(15usize)
        .max(1);
    let cuda = Cuda::new(0)?;
    let sms = cuda.info().multiprocessors;
    println!("{} ({sms} SMs), median of {runs} samples", cuda.info());
    println!();
    println!(
        "| shape | t | heads | d | v1 ms | v1 TFLOP/s | v2 ms | v2 TFLOP/s | v2/v1 | auto runs |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut json = Vec::new();
    for case in &CASES {
        let products = 4.0 * (case.t * case.t * case.head_dim * case.heads) as f64;
        let flops = if case.causal {
            products / 2.0
        } else {
            products
        };
        let v1 = time(&cuda, case, AttentionKernel::V1, runs)?;
        let v2 = time(&cuda, case, AttentionKernel::V2, runs)?;
        let tf = |s: f64| flops / s / 1e12;
        cuda.set_attention_kernel(AttentionKernel::Auto);
        let auto = cuda.attention_kernel_name(case.causal, case.t, case.heads, case.head_dim);
        let auto = auto.rsplit('_').next().unwrap_or(auto);
        let heads = if case.causal {
            format!("{}/{}", case.heads, case.kv_heads)
        } else {
            case.heads.to_string()
        };
        println!(
            "| {} | {} | {heads} | {} | {:.3} | {:.0} | {:.3} | {:.0} | {:.2}× | {auto} |",
            case.name,
            case.t,
            case.head_dim,
            v1 * 1e3,
            tf(v1),
            v2 * 1e3,
            tf(v2),
            v1 / v2
        );
        json.push(format!(
            "{{\"shape\":\"{}\",\"causal\":{},\"t\":{},\"heads\":{},\"kv_heads\":{},\"head_dim\":{},\"v1_ms\":{:.4},\"v2_ms\":{:.4},\"v1_tflops\":{:.1},\"v2_tflops\":{:.1},\"speedup\":{:.3},\"auto\":\"{auto}\"}}",
            case.name, case.causal, case.t, case.heads, case.kv_heads, case.head_dim,
            v1 * 1e3, v2 * 1e3, tf(v1), tf(v2), v1 / v2
        ));
    }
    println!();
    println!(
        "{{\"device\":\"{}\",\"runs\":{runs},\"cases\":[{}]}}",
        cuda.info(),
        json.join(",")
    );
    Ok(())
}
