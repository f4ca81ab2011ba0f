//! SmolLM2-135M-Instruct (the real GGUF, Q4_1) on the GPU against the CPU reference. The CPU
//! dequantizes the blocks to f32 (what `ferry run` computes there); the GPU keeps them as
//! stored: resident, converted once to bf16, and streamed at a small budget, the blocks crossing
//! the link and dequantized on the device. Streamed = resident on the GPU, token for token; GPU
//! = CPU for 32 greedy tokens of each of three prompts, or, where bf16 rounding flips a near
//! tie, the first divergence is shown with the CPU's logit margin between the two tokens and
//! that margin must be small. Skips visibly without a GPU or without the model file
//! (FERRY_SMOLLM2=path, else scripts/fetch_smollm2.sh's cache).

mod common;

use std::io::Write;
use std::path::PathBuf;

use ferry::backend::cpu::Cpu;
use ferry::backend::cuda::streaming::HostMemory;
use ferry::backend::cuda::{Cuda, CUBLAS_WORKSPACE, DRIVER_RESERVE};
use ferry::checkpoint::gguf::Weights;
use ferry::checkpoint::DType;
use ferry::generate::{Generator, Request, SamplingConfig, TextCodec};
use ferry::model::{Checkpoint, Llama, PassShape};
use ferry::runtime::{stream_weights, StreamSetup};
use ferry::stream::Vram;

const PROMPTS: [&str; 3] = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "<|im_start|>user\nWhat is the boiling point of water?<|im_end|>\n<|im_start|>assistant\n",
];
/// Largest CPU logit margin (logit units) at which a divergence counts as a bf16 near-tie.
const NEAR_TIE: f32 = 0.25;

fn skip(why: &str) {
    let _ = writeln!(
        std::io::stderr(),
        "smollm2_on_the_gpu_matches_the_cpu: SKIPPED: {why}"
    );
}

fn model_path() -> Option<PathBuf> {
    let path = std::env::var_os("FERRY_SMOLLM2")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_default();
            let cache = std::env::var_os("FERRY_CACHE")
                .map(PathBuf::from)
                .unwrap_or(home.join(".cache/ferry"));
            cache.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    path.is_file().then_some(path)
}

fn greedy(req: &Request) -> Request {
    Request {
        sampling: SamplingConfig::default(),
        ..req.clone()
    }
}

#[test]
fn smollm2_on_the_gpu_matches_the_cpu() {
    let Some(path) = model_path() else {
        return skip("no SmolLM2 GGUF (set FERRY_SMOLLM2 or run scripts/fetch_smollm2.sh)");
    };
    let gpu = match Cuda::new(0) {
        Ok(g) => g,
        Err(e) => return skip(&e.to_string()),
    };
    let path = path.to_str().unwrap();
    let ckpt = Checkpoint::open_as(path, Weights::Dequantized(DType::F32)).unwrap();
    let blocks = Checkpoint::open_as(path, Weights::Blocks).unwrap();
    gpu.prepare(ckpt.config.head_dim).unwrap();
    let mut cpu = Generator::new(&ckpt, Cpu, Some(256)).unwrap();
    let mut cuda = Generator::new(&blocks, gpu, Some(256)).unwrap();
    let mut identical = 0;
    let mut gpu_tokens = Vec::new();
    for text in PROMPTS {
        let req = greedy(&Request {
            prompt: cpu.text.encode(text).unwrap(),
            max_tokens: 32,
            sampling: SamplingConfig::default(),
            stop_strings: vec![],
            ignore_eos: true,
        });
        let a = cpu.generate(&req, &mut |_| {}).unwrap().tokens;
        let b = cuda.generate(&req, &mut |_| {}).unwrap().tokens;
        gpu_tokens.push((req.clone(), b.clone()));
        match a.iter().zip(&b).position(|(x, y)| x != y) {
            None => {
                identical += 1;
                eprintln!("{text:?}: 32 greedy tokens identical on CPU and GPU");
            }
            Some(at) => {
                // The CPU's logits where they part: how far apart were the two choices?
                let mut seq = req.prompt.clone();
                seq.extend(&a[..at]);
                let all = cpu.score(&seq).unwrap();
                let vocab = ckpt.config.vocab_size;
                let last = &all[all.len() - vocab..];
                let margin = last[a[at] as usize] - last[b[at] as usize];
                eprintln!(
                    "{text:?}: first divergence at token {at}: CPU {} vs GPU {}, CPU logit margin {margin:.4}",
                    a[at], b[at]
                );
                assert!(
                    margin <= NEAR_TIE,
                    "{text:?}: diverged at {at} with margin {margin} > {NEAR_TIE}"
                );
            }
        }
    }
    assert!(identical >= 1, "no prompt gave identical greedy tokens");
    drop(cuda);

    // Streamed at budgets where most of the model streams: the blocks cross the link as
    // stored and are dequantized on the device into what resident converted on the host.
    let fixed = CUBLAS_WORKSPACE + DRIVER_RESERVE + (48 << 20);
    let shape = PassShape {
        tokens: 128,
        batch: 1,
        past: 0,
    };
    let arch = Llama::new(blocks.config.clone());
    let mut streamed_some = false;
    for fraction in [0.25, 0.5, 0.75] {
        let budget = fixed + (blocks.bytes() as f64 * fraction) as usize;
        let small = Cuda::with_vram(0, Some(Vram::Bytes(budget))).unwrap();
        small.prepare(ckpt.config.head_dim).unwrap();
        let setup = StreamSetup::new(shape, HostMemory::Auto);
        let weights = match stream_weights(&small, &blocks, &arch, setup) {
            Ok(w) => w,
            Err(e) if e.to_string().contains("below the minimum") => continue,
            Err(e) => panic!("streaming SmolLM2's blocks at {budget} B: {e}"),
        };
        let plan = weights.plan().clone();
        eprintln!("streamed at {budget} B:\n{plan}");
        streamed_some |= plan.slots > 0;
        let text = TextCodec::open(&blocks).unwrap();
        let mut streamed =
            Generator::with_weights(&blocks, small, Some(Box::new(weights)), text, Some(256))
                .unwrap();
        for (req, want) in &gpu_tokens {
            let got = streamed.generate(req, &mut |_| {}).unwrap().tokens;
            assert_eq!(
                &got, want,
                "streamed at {budget} B: other tokens than resident"
            );
        }
    }
    assert!(streamed_some, "no budget streamed SmolLM2's blocks");
}
