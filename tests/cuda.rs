//! The CUDA backend against the CPU reference: every fixture (logits of every position,
//! chunked prompts, token-by-token decoding over the KV cache), attention at the head sizes
//! of real models, a SmolLM2-shaped model, and bad input. Where no GPU is usable each test
//! prints "SKIPPED: no usable CUDA device: <why>" and passes, so CI without a GPU stays green.

mod common;

use std::io::Write;
use std::sync::Arc;

use common::{fixture, rel_l2, ARCHS};
use ferry::backend::cpu::Cpu;
use ferry::backend::cuda::Cuda;
use ferry::backend::dit::DitOps;
use ferry::backend::{AttentionShape, Backend};
use ferry::checkpoint::{DType, HostTensor, Storage};
use ferry::model::Checkpoint;
use ferry::model::{Architecture, Llama, Logits, ResidentWeights};
use ferry::synth::{random_token_ids, synthetic_checkpoint, Preset};
use half::bf16;

/// The GPU, or None after saying why not on the real stderr (not captured by the harness).
fn gpu(test: &str) -> Option<Cuda> {
    match Cuda::new(0) {
        Ok(c) => Some(c),
        Err(e) => {
            let e = e.to_string();
            let why = e.trim_start_matches("no usable CUDA device: ");
            let _ = writeln!(
                std::io::stderr(),
                "{test}: SKIPPED: no usable CUDA device: {why}"
            );
            None
        }
    }
}

/// A model loaded on one backend.
struct Loaded<B: Backend> {
    model: Llama,
    backend: B,
    weights: ResidentWeights<B::Weight>,
}

impl<B: Backend> Loaded<B> {
    fn new(ckpt: &Checkpoint, backend: B) -> Self {
        let model = Llama::new(ckpt.config.clone());
        let weights =
            ResidentWeights::load(ckpt, model.groups(), |t| backend.weight(t)).expect("load");
        Loaded {
            model,
            backend,
            weights,
        }
    }

    fn cache(&self, capacity: usize) -> B::KvCache {
        let c = &self.model.config;
        self.backend
            .kv_cache(c.num_layers, self.model.attention_shape(), capacity)
            .expect("kv cache")
    }

    /// Logits of every position of `ids`, fed in chunks of the given sizes.
    fn chunked(&mut self, ids: &[u32], chunks: &[usize]) -> Vec<f32> {
        let mut cache = self.cache(ids.len());
        let mut out = Vec::new();
        let mut at = 0;
        for &n in chunks {
            let part = &ids[at..at + n];
            out.extend(
                self.model
                    .forward(
                        &self.backend,
                        &mut self.weights,
                        part,
                        &mut cache,
                        Logits::All,
                    )
                    .expect("forward"),
            );
            at += n;
        }
        assert_eq!(at, ids.len());
        out
    }

    /// Logits of positions `prompt..ids.len()`: the prompt in one pass, then one token a pass
    /// (the decode path), the last position's logits each time.
    fn decode(&mut self, ids: &[u32], prompt: usize) -> Vec<f32> {
        let mut cache = self.cache(ids.len());
        let mut out = Vec::new();
        let mut feed = |tokens: &[u32], out: &mut Vec<f32>| {
            out.extend(
                self.model
                    .forward(
                        &self.backend,
                        &mut self.weights,
                        tokens,
                        &mut cache,
                        Logits::Last,
                    )
                    .expect("forward"),
            )
        };
        feed(&ids[..prompt], &mut out);
        for i in prompt..ids.len() {
            feed(&ids[i..i + 1], &mut out);
        }
        out
    }
}

fn argmax(r: &[f32]) -> usize {
    r.iter()
        .enumerate()
        .fold(0, |best, (i, &v)| if v > r[best] { i } else { best })
}

/// Share of rows whose largest value sits at the same index.
fn argmax_agreement(a: &[f32], b: &[f32], cols: usize) -> f64 {
    let rows = a.len() / cols;
    let same = a
        .chunks(cols)
        .zip(b.chunks(cols))
        .filter(|(x, y)| argmax(x) == argmax(y))
        .count();
    same as f64 / rows as f64
}

/// Rows where `got` picks another index than `want` although `want` prefers its own pick by
/// more than 3× the row's RMS difference: flips that bf16 noise does not explain.
fn decisive_flips(got: &[f32], want: &[f32], cols: usize) -> usize {
    got.chunks(cols)
        .zip(want.chunks(cols))
        .filter(|(g, w)| {
            let (a, b) = (argmax(g), argmax(w));
            let sq: f32 = g.iter().zip(*w).map(|(x, y)| (x - y).powi(2)).sum();
            a != b && w[b] - w[a] > 3.0 * (sq / cols as f32).sqrt()
        })
        .count()
}

/// Relative L2 ≤ 2e-2 and the same argmax on ≥ 99 % of rows, not counting near-ties (rows
/// where the reference's top choice beats the other backend's by less than 3× the row's RMS
/// difference: a random tiny model has many, and bf16 rounding flips some). The raw
/// agreement is printed too.
fn assert_close(what: &str, gpu: &[f32], cpu: &[f32], cols: usize) {
    assert_close_with(what, gpu, cpu, cols, 0.99)
}

fn assert_close_with(what: &str, gpu: &[f32], cpu: &[f32], cols: usize, min_agree: f64) {
    let err = rel_l2(gpu, cpu);
    let rows = cpu.len() / cols;
    let agree = argmax_agreement(gpu, cpu, cols);
    let flips = decisive_flips(gpu, cpu, cols);
    let beyond_noise = 1.0 - flips as f64 / rows as f64;
    let _ = writeln!(
        std::io::stderr(),
        "{what}: relative L2 {err:.2e}, argmax agreement {:.1} % of {rows} rows ({flips} flips beyond noise)",
        agree * 100.0,
    );
    assert!(
        err.is_finite() && err <= 2e-2,
        "{what}: relative L2 {err:e} > 2e-2"
    );
    assert!(
        beyond_noise >= min_agree,
        "{what}: argmax differs beyond noise on {flips} of {rows} rows"
    );
}

#[derive(serde::Deserialize)]
struct Expected {
    prompts: Vec<Prompt>,
}

#[derive(serde::Deserialize)]
struct Prompt {
    ids: Vec<u32>,
    greedy: Vec<u32>,
}

/// Every fixture: each prompt with its greedy continuation in one pass and token by token
/// (the decode path), then 200 random tokens in one pass and in chunks that start
/// mid-sequence (the tensor-core prompt kernel: several 64-row blocks and key tiles). Each
/// comparison: relative L2 ≤ 2e-2; the argmax agrees on ≥ 99 % of all positions of the
/// fixture (near-ties excepted, see `assert_close`).
#[test]
fn every_fixture_matches_the_cpu() {
    if gpu("every_fixture_matches_the_cpu").is_none() {
        return;
    }
    for name in ARCHS {
        let dir = fixture(name);
        let ckpt = Checkpoint::open(dir.to_str().unwrap()).unwrap();
        let expected: Expected =
            serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap())
                .unwrap();
        let vocab = ckpt.config.vocab_size;
        let mut cpu = Loaded::new(&ckpt, Cpu);
        let mut gpu = Loaded::new(&ckpt, Cuda::new(0).unwrap());
        let (mut all_got, mut all_want) = (Vec::new(), Vec::new());
        let mut check = |what: String, got: Vec<f32>, want: &[f32]| {
            assert_close_with(&what, &got, want, vocab, 0.0);
            all_got.extend(got);
            all_want.extend_from_slice(want);
        };

        for (i, p) in expected.prompts.iter().enumerate() {
            let ids: Vec<u32> = p.ids.iter().chain(&p.greedy).copied().collect();
            let want = cpu.chunked(&ids, &[ids.len()]);
            let got = gpu.chunked(&ids, &[ids.len()]);
            check(format!("{name} prompt {i}: one pass"), got, &want);
            let got = gpu.decode(&ids, p.ids.len());
            let from = (p.ids.len() - 1) * vocab;
            check(
                format!("{name} prompt {i}: token by token"),
                got,
                &want[from..],
            );
        }

        let n = ckpt.config.max_position_embeddings.min(200);
        let ids = random_token_ids(n, vocab, 7);
        let want = cpu.chunked(&ids, &[n]);
        let got = gpu.chunked(&ids, &[n]);
        check(format!("{name} {n} random tokens"), got, &want);
        let got = gpu.chunked(&ids, &[70, 3, n - 73]);
        check(format!("{name} {n} tokens in chunks 70+3+rest"), got, &want);
        assert_close(
            &format!("{name}: all positions"),
            &all_got,
            &all_want,
            vocab,
        );
    }
}

/// A bf16 tensor `[rows, cols]` of values drawn uniformly from [-scale, scale].
fn random_tensor(rows: usize, cols: usize, scale: f32, seed: u64) -> HostTensor {
    let mut storage = Storage::owned(rows * cols * 2);
    let bytes = storage.bytes_mut().unwrap();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for c in bytes.chunks_exact_mut(2) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        let u = (s >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
        c.copy_from_slice(&bf16::from_f32((2.0 * u - 1.0) * scale).to_le_bytes());
    }
    HostTensor::new(
        "random".into(),
        DType::BF16,
        vec![rows, cols],
        Arc::new(storage),
        0,
        rows * cols * 2,
    )
}

/// Attention alone at the head sizes of real models (SmolLM2: 9/3 heads of 64; Qwen2.5-7B:
/// 28/4 of 128), with a sliding window, and at a head size the tensor-core kernel does not
/// take (80): a long prompt, a chunk that starts mid-sequence, then single tokens.
#[test]
fn attention_matches_the_cpu_at_real_head_sizes() {
    let Some(cuda) = gpu("attention_matches_the_cpu_at_real_head_sizes") else {
        return;
    };
    let cases = [
        (9, 3, 64, None),
        (28, 4, 128, None),
        (8, 8, 128, Some(100)),
        (4, 2, 80, None),
        (4, 1, 256, None),
    ];
    for (seed, (heads, kv_heads, hd, window)) in cases.into_iter().enumerate() {
        let shape = AttentionShape {
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim: hd,
            sliding_window: window,
        };
        let total = 400;
        // q, k, v for every position, as embedding tables fetched row by row.
        let tq = random_tensor(total, heads * hd, 2.0, seed as u64 * 3 + 1);
        let tk = random_tensor(total, kv_heads * hd, 2.0, seed as u64 * 3 + 2);
        let tv = random_tensor(total, kv_heads * hd, 1.0, seed as u64 * 3 + 3);
        let (cq, ck, cv) = (
            Cpu.weight(&tq).unwrap(),
            Cpu.weight(&tk).unwrap(),
            Cpu.weight(&tv).unwrap(),
        );
        let (gq, gk, gv) = (
            cuda.weight(&tq).unwrap(),
            cuda.weight(&tk).unwrap(),
            cuda.weight(&tv).unwrap(),
        );
        let mut c_cache = Cpu.kv_cache(1, shape, total).unwrap();
        let mut g_cache = cuda.kv_cache(1, shape, total).unwrap();
        let mut at = 0;
        for n in [300, 37, 1, 1, 61] {
            // The rows attended to lie between rows of other sequences (`pad` before, one
            // after), as in a batch: only rows pad..pad + n are read and written.
            let pad = 3;
            let ids: Vec<u32> = (0..pad)
                .map(|i| (total - 1 - i) as u32)
                .chain(at as u32..(at + n) as u32)
                .chain([0])
                .collect();
            let rows = pad..pad + n;
            let width = heads * hd;
            let mut want = Cpu.activation(ids.len(), width).unwrap();
            Cpu.attention(
                &Cpu.embed(&cq, &ids).unwrap(),
                &Cpu.embed(&ck, &ids).unwrap(),
                &Cpu.embed(&cv, &ids).unwrap(),
                rows.clone(),
                &mut c_cache,
                0,
                at,
                shape,
                &mut want,
            )
            .unwrap();
            let mut got = cuda.activation(ids.len(), width).unwrap();
            cuda.attention(
                &cuda.embed(&gq, &ids).unwrap(),
                &cuda.embed(&gk, &ids).unwrap(),
                &cuda.embed(&gv, &ids).unwrap(),
                rows.clone(),
                &mut g_cache,
                0,
                at,
                shape,
                &mut got,
            )
            .unwrap();
            let want = &want.data[rows.start * width..rows.end * width];
            let got = cuda.to_host(&got).unwrap();
            let got = &got[rows.start * width..rows.end * width];
            let err = rel_l2(got, want);
            let what = format!(
                "attention {heads}/{kv_heads} heads × {hd}, window {window:?}, rows {at}..{}",
                at + n
            );
            let _ = writeln!(std::io::stderr(), "{what}: relative L2 {err:.2e}");
            assert!(
                err.is_finite() && err <= 1e-2,
                "{what}: relative L2 {err:e}"
            );
            at += n;
        }
    }
}

/// A model shaped like SmolLM2-135M (30 blocks, hidden 576, 9/3 heads of 64, ffn 1536, vocab
/// 49152, tied embeddings), random weights: logits of a 96-token prompt, then 32 greedy tokens
/// on each backend. Where bf16 rounding flips a near-tie, the first divergence is shown with
/// the CPU's margin between its top two logits.
#[test]
fn smollm2_shaped_model_matches_the_cpu() {
    let Some(cuda) = gpu("smollm2_shaped_model_matches_the_cpu") else {
        return;
    };
    let mut preset = Preset::by_name("tiny").unwrap();
    let c = &mut preset.config;
    c.hidden_size = 576;
    c.intermediate_size = 1536;
    c.num_layers = 30;
    c.num_heads = 9;
    c.num_kv_heads = 3;
    c.head_dim = 64;
    c.vocab_size = 49152;
    c.max_position_embeddings = 8192;
    c.rope_theta = 100000.0;
    c.tie_word_embeddings = true;
    let ckpt = synthetic_checkpoint(&preset, 1, DType::BF16).unwrap();
    let vocab = ckpt.config.vocab_size;
    let mut cpu = Loaded::new(&ckpt, Cpu);
    let mut gpu = Loaded::new(&ckpt, cuda);

    let prompt = random_token_ids(96, vocab, 11);
    let want = cpu.chunked(&prompt, &[prompt.len()]);
    let got = gpu.chunked(&prompt, &[prompt.len()]);
    assert_close("SmolLM2-shaped, 96-token prompt", &got, &want, vocab);

    let (cpu_tokens, cpu_logits) = greedy_cpu(&mut cpu, &prompt, 32);
    let gpu_tokens = greedy_on_device(&mut gpu, &prompt, 32);
    match cpu_tokens.iter().zip(&gpu_tokens).position(|(a, b)| a != b) {
        None => {
            let _ = writeln!(
                std::io::stderr(),
                "SmolLM2-shaped: 32 greedy tokens identical on CPU and CUDA"
            );
        }
        Some(i) => {
            let l = &cpu_logits[i];
            let mut sorted = l.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let _ = writeln!(
                std::io::stderr(),
                "SmolLM2-shaped: greedy tokens agree for {i} of 32; at {i} CPU picks {} and CUDA {} \
                 (CPU logits {:.4} vs {:.4}, top-2 margin {:.2e})",
                cpu_tokens[i],
                gpu_tokens[i],
                l[cpu_tokens[i] as usize],
                l[gpu_tokens[i] as usize],
                sorted[0] - sorted[1]
            );
            assert!(
                sorted[0] - sorted[1] < 0.05 * sorted[0].abs().max(1.0),
                "greedy tokens diverge at {i} where the CPU's choice is not a near-tie"
            );
        }
    }
}

fn greedy_cpu(m: &mut Loaded<Cpu>, prompt: &[u32], n: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut cache = m.cache(prompt.len() + n);
    let mut tokens = Vec::new();
    let mut all = Vec::new();
    let mut feed = prompt.to_vec();
    for _ in 0..n {
        let l = m
            .model
            .forward(&m.backend, &mut m.weights, &feed, &mut cache, Logits::Last)
            .unwrap();
        let next = ferry::generate::argmax(&l);
        tokens.push(next);
        all.push(l);
        feed = vec![next];
    }
    (tokens, all)
}

/// Greedy tokens picked on the device (no logits copied back).
fn greedy_on_device<B: Backend>(m: &mut Loaded<B>, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut cache = m.cache(prompt.len() + n);
    let mut tokens = Vec::new();
    let mut feed = prompt.to_vec();
    for _ in 0..n {
        let l = m
            .model
            .forward_logits(&m.backend, &mut m.weights, &feed, &mut cache, Logits::Last)
            .unwrap();
        let next = m.backend.argmax_rows(&l).unwrap()[0];
        tokens.push(next);
        feed = vec![next];
    }
    tokens
}

#[test]
fn argmax_on_the_device_matches_the_host() {
    let Some(cuda) = gpu("argmax_on_the_device_matches_the_host") else {
        return;
    };
    let t = random_tensor(5, 49158, 3.0, 5);
    let w = cuda.weight(&t).unwrap();
    let x = cuda.embed(&w, &[0, 1, 2, 3, 4]).unwrap();
    let host = cuda.to_host(&x).unwrap();
    let want: Vec<u32> = host.chunks(49158).map(ferry::generate::argmax).collect();
    assert_eq!(cuda.argmax_rows(&x).unwrap(), want);
}

#[test]
fn a_missing_device_is_an_error_not_a_panic() {
    let err = match Cuda::new(999) {
        Ok(_) => panic!("cuda:999 opened"),
        Err(e) => e.to_string(),
    };
    let _ = writeln!(std::io::stderr(), "cuda:999 → {err}");
    assert!(
        err.contains("cuda:999: no such device") || err.contains("no usable CUDA device"),
        "{err}"
    );
    assert!(!err.contains('\n'), "one line: {err}");

    // The CLI says the same on one line and exits non-zero.
    // FERRY_BIN: the binary where the tests run on another machine than they were built on.
    let bin = std::env::var("FERRY_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_ferry").into());
    let out = std::process::Command::new(bin)
        .args([
            "run",
            "--device",
            "cuda:999",
            "--max-tokens",
            "1",
            "-p",
            "hi",
            "-m",
        ])
        .arg(fixture("llama"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn out_of_device_memory_is_an_error() {
    let Some(cuda) = gpu("out_of_device_memory_is_an_error") else {
        return;
    };
    let shape = AttentionShape {
        num_heads: 64,
        num_kv_heads: 64,
        head_dim: 1 << 10,
        sliding_window: None,
    };
    // 2 × 2^20 positions × 2^16 values × 2 bytes = 256 TiB.
    let err = match cuda.kv_cache(1, shape, 1 << 20) {
        Ok(_) => panic!("a 256 TiB cache was allocated"),
        Err(e) => e.to_string(),
    };
    let _ = writeln!(std::io::stderr(), "256 TiB KV cache → {err}");
    assert!(err.contains("out of memory"), "{err}");
    // The device still works afterwards.
    let t = random_tensor(2, 8, 1.0, 1);
    let w = cuda.weight(&t).unwrap();
    let x = cuda.embed(&w, &[1]).unwrap();
    assert_eq!(cuda.to_host(&x).unwrap().len(), 8);
}

/// CUDA against transformers (bf16) on the same checkpoint: the last position's logits of the
/// prompt that bench/transformers_bench.py wrote to $FERRY_TRANSFORMERS_REFERENCE. Runs where
/// that variable names such a file (scripts/gpu_checks.sh sets it after writing a 7B-shaped
/// checkpoint); relative L2 ≤ 1e-2.
#[test]
fn transformers_reference_matches() {
    let Some(path) = std::env::var_os("FERRY_TRANSFORMERS_REFERENCE") else {
        let _ = writeln!(
            std::io::stderr(),
            "transformers_reference_matches: SKIPPED: FERRY_TRANSFORMERS_REFERENCE is not set"
        );
        return;
    };
    let Some(cuda) = gpu("transformers_reference_matches") else {
        return;
    };
    #[derive(serde::Deserialize)]
    struct Reference {
        model: String,
        ids: Vec<u32>,
        /// transformers in bf16, and in f32 (the same weights widened).
        logits: Vec<f32>,
        logits_f32: Vec<f32>,
    }
    let r: Reference = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let ckpt = Checkpoint::open(&r.model).unwrap();
    fn last<B: Backend>(m: &mut Loaded<B>, ids: &[u32]) -> Vec<f32> {
        let mut cache = m.cache(ids.len());
        m.model
            .forward(&m.backend, &mut m.weights, ids, &mut cache, Logits::Last)
            .unwrap()
    }
    let got = last(&mut Loaded::new(&ckpt, cuda), &r.ids);
    let cpu = last(&mut Loaded::new(&ckpt, Cpu), &r.ids);
    let same = |a: &[f32], b: &[f32]| argmax_agreement(a, b, b.len()) == 1.0;
    let line = |what: &str, a: &[f32], b: &[f32]| {
        let _ = writeln!(
            std::io::stderr(),
            "{what}: relative L2 {:.2e}, same argmax: {}",
            rel_l2(a, b),
            same(a, b)
        );
    };
    let _ = writeln!(
        std::io::stderr(),
        "{}, last position of {} tokens:",
        r.model,
        r.ids.len()
    );
    line("  ferry CUDA bf16 vs transformers bf16", &got, &r.logits);
    line(
        "  ferry CUDA bf16 vs transformers f32 ",
        &got,
        &r.logits_f32,
    );
    line(
        "  transformers bf16 vs transformers f32",
        &r.logits,
        &r.logits_f32,
    );
    line(
        "  ferry CPU f32 vs transformers f32   ",
        &cpu,
        &r.logits_f32,
    );
    line("  ferry CUDA bf16 vs ferry CPU f32    ", &got, &cpu);
    // The same function: the f32 paths agree closely.
    assert!(
        rel_l2(&cpu, &r.logits_f32) <= 1e-3,
        "CPU f32 vs transformers f32"
    );
    // bf16 rounding: ferry's CUDA path is within 1e-2 of transformers bf16, or (where
    // transformers' own bf16 error is larger) no further from f32 than transformers bf16 is.
    let err = rel_l2(&got, &r.logits);
    let ours = rel_l2(&got, &r.logits_f32);
    let theirs = rel_l2(&r.logits, &r.logits_f32);
    assert!(
        err <= 1e-2 || ours <= theirs,
        "CUDA vs transformers bf16 {err:e}; vs f32 ours {ours:e}, theirs {theirs:e}"
    );
}

/// RoPE tables on the GPU are kept across passes by their values (a denoising loop asks for
/// the same ones every step): a table asked for again, among others and after one that
/// differs from it in a single value, rotates exactly as it did the first time, and every
/// table rotates as the CPU's copy of the same values does.
#[test]
fn rope_tables_asked_for_again_rotate_as_their_values_say() {
    let Some(gpu) = gpu("rope_tables_asked_for_again_rotate_as_their_values_say") else {
        return;
    };
    let (rows, heads, head_dim) = (6, 2, 8);
    let x = random_tensor(rows, heads * head_dim, 1.0, 11).to_f32();
    let table = |seed: u64| -> Vec<f32> {
        random_tensor(rows, head_dim, 1.0, seed)
            .to_f32()
            .chunks(2)
            .flat_map(|p| {
                let angle = 3.0 * p[0];
                [angle.cos(), angle.sin()]
            })
            .collect()
    };
    let (a, b) = (table(21), table(22));
    let mut b_changed = b.clone();
    b_changed[2 * head_dim + 3] = -b_changed[2 * head_dim + 3]; // one sine, row 2
    let on_gpu = |t: &[f32]| -> Vec<f32> {
        let mut h = DitOps::upload(&gpu, &x, rows, heads * head_dim).unwrap();
        let table = gpu.rope_table(t, rows, head_dim).unwrap();
        gpu.rope_interleaved(&mut h, &table, head_dim).unwrap();
        gpu.to_host(&h).unwrap()
    };
    let on_cpu = |t: &[f32]| -> Vec<f32> {
        let mut h = DitOps::upload(&Cpu, &x, rows, heads * head_dim).unwrap();
        let table = Cpu.rope_table(t, rows, head_dim).unwrap();
        Cpu.rope_interleaved(&mut h, &table, head_dim).unwrap();
        Cpu.to_host(&h).unwrap()
    };
    let order = [&a, &b, &a, &b_changed, &b, &a];
    let got: Vec<Vec<f32>> = order.iter().map(|t| on_gpu(t)).collect();
    for (i, (t, g)) in order.iter().zip(&got).enumerate() {
        let want = on_cpu(t);
        let err = rel_l2(g, &want);
        assert!(err < 1e-2, "table {i}: rel. L2 {err} against the CPU");
    }
    assert_eq!(got[0], got[2], "table a asked for again");
    assert_eq!(got[0], got[5], "table a after three others");
    assert_eq!(got[1], got[4], "table b after its one-value change");
    let row = |v: &[f32], r: usize| v[r * heads * head_dim..(r + 1) * heads * head_dim].to_vec();
    assert_ne!(
        row(&got[3], 2),
        row(&got[1], 2),
        "the changed table's row 2"
    );
}
