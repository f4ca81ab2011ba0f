//! Streaming on the GPU (`--vram`): logits and greedy tokens of streamed runs at several
//! budgets are bit-identical to a fully resident run, the budget is never exceeded (ledger
//! and driver), a budget below the minimum is refused with the minimum, and host memory
//! copied through the pinned staging ring gives the same bits as registered host memory. Without a usable
//! GPU each test prints "SKIPPED: no usable CUDA device: <why>" and passes.
//!
//! `FERRY_STREAM_7B=1` adds a Qwen2.5-7B-shaped model made in memory (15 GB of host RAM), or
//! `FERRY_STREAM_7B=DIR` one written by `ferry synth --preset qwen2.5-7b`.

mod common;

use common::{fixture, gpu, ARCHS};
use ferry::backend::cuda::streaming::{HostMemory, HostMode, StreamedWeights};
use ferry::backend::cuda::Cuda;
use ferry::backend::cuda::{CUBLAS_WORKSPACE, DRIVER_RESERVE, STAGING_RESERVE};
use ferry::backend::{Backend, KvCache};
use ferry::checkpoint::DType;
use ferry::model::Checkpoint;
use ferry::model::{Architecture, Llama, Logits, PassShape, ResidentWeights, Weights};
use ferry::runtime::{plan_request, stream_weights, StreamSetup, ASSUMED_COMPUTE};
use ferry::stream::compress::Compress;
use ferry::stream::cost::{group_bytes, CostModel};
use ferry::stream::Placement;
use ferry::stream::PlanRequest;
use ferry::synth::{random_token_ids, synthetic_checkpoint, Preset};

/// Logits of every position of the prompt, then `decode` greedy tokens with each step's
/// logits: everything a run produces, to compare bit for bit.
fn run(
    gpu: &Cuda,
    model: &Llama,
    weights: &mut impl Weights<ferry::backend::cuda::CudaWeight>,
    prompt: &[u32],
    decode: usize,
    all: bool,
) -> (Vec<u32>, Vec<Vec<f32>>) {
    let c = &model.config;
    let mut cache = gpu
        .kv_cache(c.num_layers, model.attention_shape(), prompt.len() + decode)
        .expect("kv cache");
    let want = if all { Logits::All } else { Logits::Last };
    let first = model
        .forward(gpu, weights, prompt, &mut cache, want)
        .expect("prompt pass");
    let mut logits = vec![first];
    let mut tokens = Vec::new();
    for _ in 0..decode {
        let last = logits.last().expect("logits");
        let row = &last[last.len() - c.vocab_size..];
        let next = (0..row.len()).fold(0, |b, i| if row[i] > row[b] { i } else { b }) as u32;
        tokens.push(next);
        if cache.len() == cache.capacity() {
            break;
        }
        logits.push(
            model
                .forward(gpu, weights, &[next], &mut cache, Logits::Last)
                .expect("decode pass"),
        );
    }
    (tokens, logits)
}

fn bits(v: &[Vec<f32>]) -> Vec<u32> {
    v.iter().flatten().map(|x| x.to_bits()).collect()
}

/// Streaming every test here sets up: passes of `shape` with `workspace` bytes of
/// activations (every position's logits), compute from the assumed figures.
fn setup(shape: PassShape, workspace: usize, host: HostMemory) -> StreamSetup<'static> {
    StreamSetup {
        shape,
        workspace: Some(workspace),
        measured_ms: None,
        host,
        compress: Compress::Off,
        encoding_cache: ferry::stream::encoding_cache::CacheMode::On,
        siblings: &[],
    }
}

/// A bf16 Llama whose tensors are large enough to compress (hidden 256, 8 blocks; the head
/// small enough to stream whole: split in pieces at hidden 256, cuBLASLt's choice for the
/// head's row blocks rounds differently from the whole head's, bench/NOTES.md).
fn wide_bf16() -> Checkpoint {
    let mut p = Preset::by_name("tiny").expect("preset");
    p.config.hidden_size = 256;
    p.config.intermediate_size = 768;
    p.config.num_layers = 8;
    p.config.head_dim = 64;
    p.config.vocab_size = 2048;
    synthetic_checkpoint(&p, 3, DType::BF16).expect("synthetic model")
}

/// Resident, then streamed at budgets from the least that plans up to everything resident:
/// identical tokens and logits, budgets respected.
fn check_budgets(
    test: &str,
    ckpt: &Checkpoint,
    prompt_len: usize,
    decode: usize,
    all: bool,
) -> bool {
    let c = &ckpt.config;
    let model = Llama::new(c.clone());
    let prompt = random_token_ids(prompt_len, c.vocab_size, 7);
    let Some(resident_gpu) = gpu(test, None) else {
        return false;
    };
    resident_gpu.prepare(c.head_dim).expect("kernels");
    let mut resident =
        ResidentWeights::load(ckpt, model.groups(), |t| resident_gpu.weight(t)).expect("upload");
    let (want_tokens, want_logits) =
        run(&resident_gpu, &model, &mut resident, &prompt, decode, all);
    drop(resident);
    drop(resident_gpu);

    let shape = PassShape {
        tokens: prompt_len + decode,
        batch: 1,
        past: 0,
    };
    let workspace = model.workspace_all_logits(shape);
    // The planner's budget is this minus the cuBLAS workspace and its reserve.
    let weights: usize = ckpt.bytes();
    let fixed = CUBLAS_WORKSPACE + DRIVER_RESERVE + model.pass_cost(shape).cache + workspace;
    let mut streamed_some = false;
    let mut compressed_some = false;
    let cases = [0.2, 0.35, 0.5, 0.65, 0.8, 1.5]
        .into_iter()
        .flat_map(|f| [(f, Compress::Off), (f, Compress::On)]);
    for (fraction, compress) in cases {
        let budget = fixed + (weights as f64 * fraction) as usize;
        let gpu = gpu(test, Some(budget)).expect("the GPU was there a moment ago");
        gpu.prepare(c.head_dim).expect("kernels");
        let mut w: StreamedWeights = match stream_weights(
            &gpu,
            ckpt,
            &model,
            StreamSetup {
                compress,
                ..setup(shape, workspace, HostMemory::Auto)
            },
        ) {
            Ok(w) => w,
            Err(e) if e.to_string().contains("below the minimum") => continue,
            Err(e) => panic!("{test}: budget {budget}: {e}"),
        };
        let plan = w.plan().clone();
        if compress == Compress::On {
            compressed_some |= plan.compressed();
            let (tokens, logits) = run(&gpu, &model, &mut w, &prompt, decode, all);
            eprintln!(
                "{test}: budget {budget} B, compressed: {} of {} bf16 bytes cross the link per pass",
                plan.streamed_bytes(),
                plan.streamed_bf16_bytes()
            );
            assert_eq!(tokens, want_tokens, "{test}: compressed, budget {budget}");
            assert!(
                bits(&logits) == bits(&want_logits),
                "{test}: compressed streaming changed the logits at budget {budget}"
            );
            assert!(gpu.memory().peak() <= budget, "{test}: ledger over budget");
            continue;
        }
        // `ferry plan` with the figures this run measured plans the same pass.
        let cost = CostModel {
            h2d_gbps: w.h2d_gbps(),
            ..ASSUMED_COMPUTE
        };
        let staged = matches!(w.host_mode(), HostMode::Staged { .. });
        let request = PlanRequest {
            workspace,
            ..plan_request(
                &model,
                &group_bytes(&model, DType::BF16),
                budget,
                shape,
                &cost,
                staged,
            )
        };
        let offline = ferry::stream::plan(&request).expect("the offline plan");
        assert_eq!(
            (&offline.placement, offline.slots, offline.slot_bytes),
            (&plan.placement, plan.slots, plan.slot_bytes),
            "{test}: budget {budget}: ferry plan and the CUDA run plan differently"
        );
        let head_pieces = match &plan.placement[plan.placement.len() - 1] {
            Placement::Streamed(r) => r.len(),
            _ => 0,
        };
        streamed_some |= plan.slots > 0;
        let (tokens, logits) = run(&gpu, &model, &mut w, &prompt, decode, all);
        let stats = w.pass_stats().expect("stats");
        eprintln!(
            "{test}: budget {budget} B: {} of {} groups resident, {} slots, head in {head_pieces} pieces; ledger peak {} B, driver {} B",
            plan.resident.len(),
            plan.groups.len(),
            plan.slots,
            gpu.memory().peak(),
            stats.device_bytes
        );
        assert_eq!(
            tokens, want_tokens,
            "{test}: greedy tokens at budget {budget}"
        );
        assert!(
            bits(&logits) == bits(&want_logits),
            "{test}: logits differ from the resident run at budget {budget} ({} resident groups, {} slots)",
            plan.resident.len(),
            plan.slots
        );
        assert!(gpu.memory().peak() <= budget, "{test}: ledger over budget");
        drop(w);
    }
    assert!(streamed_some, "{test}: no budget streamed anything");
    if compress_expected(ckpt) {
        assert!(
            compressed_some,
            "{test}: no budget streamed compressed weights"
        );
    }
    true
}

/// Whether the model's blocks are large enough to compress.
fn compress_expected(ckpt: &Checkpoint) -> bool {
    ckpt.config.hidden_size >= 256
}

#[test]
fn compressed_streaming_is_bit_identical_to_resident() {
    check_budgets("wide bf16 llama", &wide_bf16(), 24, 6, true);
}

#[test]
fn streamed_fixtures_are_bit_identical_to_resident() {
    for arch in ARCHS {
        let ckpt = Checkpoint::open(fixture(arch).to_str().expect("utf-8 path")).expect("fixture");
        if !check_budgets(&format!("fixture {arch}"), &ckpt, 24, 6, true) {
            return;
        }
    }
}

#[test]
fn a_too_small_budget_states_the_minimum() {
    let ckpt = Checkpoint::open(fixture("qwen2").to_str().expect("utf-8 path")).expect("fixture");
    let Some(gpu) = gpu(
        "a_too_small_budget_states_the_minimum",
        Some(CUBLAS_WORKSPACE + (5 << 20)),
    ) else {
        return;
    };
    let model = Llama::new(ckpt.config.clone());
    let shape = PassShape {
        tokens: 4096,
        batch: 1,
        past: 0,
    };
    let e = stream_weights(
        &gpu,
        &ckpt,
        &model,
        setup(shape, 64 << 20, HostMemory::Auto),
    )
    .err()
    .expect("a 37 MiB budget for a 4096-token pass is too small")
    .to_string();
    assert!(
        e.contains("--vram") && e.contains("below the minimum"),
        "{e}"
    );
}

/// Each fixture streamed at the same budget with `--host-memory registered` and `staged`:
/// the tier is in the mode asked for, and logits and greedy tokens are identical bit for bit.
#[test]
fn staged_host_memory_is_bit_identical_to_registered() {
    let test = "staged_host_memory_is_bit_identical_to_registered";
    for arch in ARCHS {
        let ckpt = Checkpoint::open(fixture(arch).to_str().expect("utf-8 path")).expect("fixture");
        let c = &ckpt.config;
        let model = Llama::new(c.clone());
        let (prompt_len, decode) = (24, 6);
        let prompt = random_token_ids(prompt_len, c.vocab_size, 7);
        let shape = PassShape {
            tokens: prompt_len + decode,
            batch: 1,
            past: 0,
        };
        let workspace = model.workspace_all_logits(shape);
        let fixed = CUBLAS_WORKSPACE + model.pass_cost(shape).cache + workspace;
        let mut runs = Vec::new();
        // The first budget that plans, streaming part of the weights (prefetch wraps passes).
        'budgets: for fraction in [0.5, 0.35, 0.65, 0.8] {
            runs.clear();
            for host in [HostMemory::Registered, HostMemory::Staged] {
                // The same room for weights in both modes: the staging ring's reserve on top.
                let reserve = match host {
                    HostMemory::Staged => DRIVER_RESERVE + STAGING_RESERVE,
                    _ => DRIVER_RESERVE,
                };
                let budget = fixed + reserve + (ckpt.bytes() as f64 * fraction) as usize;
                let Some(gpu) = gpu(test, Some(budget)) else {
                    return;
                };
                gpu.prepare(c.head_dim).expect("kernels");
                let mut w = match stream_weights(&gpu, &ckpt, &model, setup(shape, workspace, host))
                {
                    Ok(w) => w,
                    Err(e) if e.to_string().contains("below the minimum") => continue 'budgets,
                    Err(e) => panic!("{test}: {arch}, {host:?}, budget {budget}: {e}"),
                };
                if w.plan().slots == 0 {
                    continue 'budgets;
                }
                eprintln!("{test}: {arch}, budget {budget} B: {}", w.host_mode());
                match (host, w.host_mode()) {
                    (HostMemory::Registered, HostMode::Registered { bytes }) => {
                        assert!(*bytes > 0, "{test}: {arch}: nothing registered")
                    }
                    (
                        HostMemory::Staged,
                        HostMode::Staged {
                            buffers,
                            bytes_each,
                            threads,
                            why,
                        },
                    ) => {
                        assert!(*buffers >= 2 && *bytes_each > 0 && *threads > 0);
                        assert!(why.contains("--host-memory staged"), "{why}");
                    }
                    (h, m) => panic!("{test}: {arch}: asked for {h:?}, got {m}"),
                }
                runs.push(run(&gpu, &model, &mut w, &prompt, decode, true));
            }
            break;
        }
        assert_eq!(
            runs.len(),
            2,
            "{test}: {arch}: no budget streamed in both modes"
        );
        assert_eq!(runs[0].0, runs[1].0, "{test}: {arch}: greedy tokens");
        assert!(
            bits(&runs[0].1) == bits(&runs[1].1),
            "{test}: {arch}: staged logits differ from registered"
        );
    }
}

#[test]
fn qwen7b_shaped_streamed_is_bit_identical() {
    let Some(source) = std::env::var_os("FERRY_STREAM_7B") else {
        eprintln!("qwen7b_shaped_streamed_is_bit_identical: SKIPPED: set FERRY_STREAM_7B=1 (made in memory, 15 GB of RAM) or to a `ferry synth --preset qwen2.5-7b` directory");
        return;
    };
    let ckpt = if source == "1" {
        let preset = Preset::by_name("qwen2.5-7b").expect("preset");
        synthetic_checkpoint(&preset, 0, DType::BF16).expect("synthetic model")
    } else {
        Checkpoint::open(source.to_str().expect("utf-8 path")).expect("checkpoint")
    };
    check_budgets("qwen2.5-7b-shaped", &ckpt, 64, 4, false);
}

#[test]
fn decompression_on_the_gpu_is_exact() {
    use ferry::backend::cuda::streaming::decode_on_gpu;
    use ferry::stream::compress::{EncodedTensor, Encoding};
    let Some(gpu) = gpu("decompression_on_the_gpu_is_exact", None) else {
        return;
    };
    // Normal weights (Box-Muller over a xorshift), 128 Mi values (256 MiB of bf16), as one
    // tensor and as rows; then every bf16 bit pattern (NaNs, ±Inf, subnormals, ±0).
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    let mut uniform = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let normal: Vec<u16> = (0..(128usize << 20))
        .map(|_| {
            let (u, v) = (uniform(), uniform());
            let x = (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos() * 0.02;
            half::bf16::from_f64(x).to_bits()
        })
        .collect();
    let patterns: Vec<u16> = (0..=u16::MAX).collect();
    // A segment whose length is not a multiple of 32 leaves lanes of one block with one
    // element fewer than the others, and its last round short.
    for (name, values, segment) in [
        ("normal, whole", &normal, normal.len()),
        (
            "normal, a DiT linear of 3840 × 3840",
            &normal[..3840 * 3840].to_vec(),
            3840 * 3840,
        ),
        (
            "normal, rows of 3584",
            &normal[..3584 * 4096].to_vec(),
            3584,
        ),
        ("normal, rows of 1000", &normal[..1000 * 777].to_vec(), 1000),
        ("every pattern", &patterns, 1024),
    ] {
        let enc = EncodedTensor::encode(name, values, segment).expect("encode");
        let enc = Encoding::Exponents(enc);
        let (out, gbps) = decode_on_gpu(&gpu, &enc, 5).expect("decode on the GPU");
        eprintln!(
            "decompression ({name}): {:.4} of bf16, {gbps:.0} GB/s of bf16 out on the GPU",
            enc.encoded_bytes() as f64 / (2 * values.len()) as f64
        );
        assert!(out == *values, "{name}: the GPU's decoding changed bits");
    }
}

/// Random bytes as ggml blocks of `ty`, each block's f16 scales replaced by finite values
/// (random bits would make some NaN or Inf, which no quantizer writes).
fn random_blocks(ty: ferry::checkpoint::GgmlType, blocks: usize, seed: u64) -> Vec<u8> {
    use ferry::checkpoint::GgmlType as T;
    let mut s = seed | 1;
    let mut bytes: Vec<u8> = (0..blocks * ty.type_size())
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 24) as u8
        })
        .collect();
    // Where each type keeps its f16 scales.
    let halves: &[usize] = match ty {
        T::Q8_0 | T::Q4_0 | T::Q5_0 => &[0],
        T::Q4_1 | T::Q5_1 | T::Q4_K | T::Q5_K => &[0, 2],
        T::Q6_K => &[208],
        _ => &[],
    };
    for (k, block) in bytes.chunks_exact_mut(ty.type_size()).enumerate() {
        for (j, &at) in halves.iter().enumerate() {
            // Scales from 2^-12 to about 2^-3, either sign, varying by block.
            let v = half::f16::from_f32(
                (if (k + j) % 3 == 0 { -1.0 } else { 1.0 }) * (1.0 + (k % 7) as f32 / 7.0)
                    / (1u32 << (3 + (k + j) % 10)) as f32,
            );
            block[at..at + 2].copy_from_slice(&v.to_le_bytes());
        }
    }
    bytes
}

#[test]
fn dequantization_on_the_gpu_is_exact() {
    use ferry::backend::cuda::streaming::decode_on_gpu;
    use ferry::checkpoint::{dequantize, DType, GgmlType, HostTensor, Storage};
    use ferry::stream::blocks::BlockTensor;
    use ferry::stream::compress::Encoding;
    let Some(gpu) = gpu("dequantization_on_the_gpu_is_exact", None) else {
        return;
    };
    // Every block type: random blocks (finite scales), 64 Mi elements of the K types (the
    // size of a 7B's largest matrices) and 1 Mi of the others, against the CPU's ggml
    // dequantization rounded to bf16.
    for ty in [
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ] {
        let numel: usize = if ty.block_size() == 256 {
            64 << 20
        } else {
            1 << 20
        };
        let row = 4096;
        let blocks = random_blocks(ty, numel / ty.block_size(), ty.id() as u64 * 7919);
        let mut values = vec![0f32; numel];
        dequantize(ty, &blocks, &mut values);
        let want: Vec<u16> = values
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_bits())
            .collect();
        let mut storage = Storage::owned(blocks.len());
        storage.bytes_mut().unwrap().copy_from_slice(&blocks);
        let t = HostTensor::new(
            format!("{ty} blocks"),
            DType::Ggml(ty),
            vec![numel / row, row],
            std::sync::Arc::new(storage),
            0,
            blocks.len(),
        );
        let enc = Encoding::Blocks(BlockTensor::of(&t).expect("blocks"));
        let (out, gbps) = decode_on_gpu(&gpu, &enc, 5).expect("dequantize on the GPU");
        eprintln!(
            "dequantization ({ty}): {:.3} of bf16, {gbps:.0} GB/s of bf16 out on the GPU",
            blocks.len() as f64 / (2 * numel) as f64
        );
        let wrong = out.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert!(
            wrong == 0,
            "{ty}: {wrong} of {numel} values differ from the CPU's (first at {:?})",
            out.iter().zip(&want).position(|(a, b)| a != b)
        );
    }
}
