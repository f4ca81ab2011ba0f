//! SmolLM2-135M-Instruct (the real GGUF) on the GPU against the CPU reference: 32 greedy
//! tokens for each of three prompts must be the same, or, where bf16 rounding flips a near
//! tie, the first divergence is shown with the CPU's logit margin between the two tokens and
//! that margin must be small. Skips visibly without a GPU or without the model file
//! (FERRY_SMOLLM2=path, else scripts/fetch_smollm2.sh's cache).

mod common;

use std::io::Write;
use std::path::PathBuf;

use ferry::backend::cpu::Cpu;
use ferry::backend::cuda::Cuda;
use ferry::generate::{Generator, Request, SamplingConfig};
use ferry::model::Checkpoint;

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
    let ckpt = Checkpoint::open(path.to_str().unwrap()).unwrap();
    gpu.prepare(ckpt.config.head_dim).unwrap();
    let mut cpu = Generator::new(&ckpt, Cpu, Some(256)).unwrap();
    let mut cuda = Generator::new(&ckpt, gpu, Some(256)).unwrap();
    let mut identical = 0;
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
}
