//! Batched passes on the GPU: several sequences of different lengths in one pass, each over
//! its own KV cache, against the CPU reference doing the same batch. Skips visibly where no
//! GPU is usable.

mod common;

use std::io::Write;

use common::{fixture, rel_l2, ARCHS};
use ferry::backend::cpu::Cpu;
use ferry::backend::cuda::Cuda;
use ferry::backend::Backend;
use ferry::generate::{Generator, Request, SamplingConfig};
use ferry::model::Checkpoint;
use ferry::model::{Architecture, Llama, Logits, ResidentWeights, Segment};

fn gpu(test: &str) -> Option<Cuda> {
    match Cuda::new(0) {
        Ok(c) => Some(c),
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "{test}: SKIPPED: {e}");
            None
        }
    }
}

/// Logits of a prompt pass for three sequences, then one decode pass, on `backend`.
fn two_passes<B: Backend>(ckpt: &Checkpoint, backend: &B) -> Vec<f32> {
    let model = Llama::new(ckpt.config.clone());
    let mut weights = ResidentWeights::load(ckpt, model.groups(), |t| backend.weight(t)).unwrap();
    let (layers, shape) = (ckpt.config.num_layers, model.attention_shape());
    let prompts: [&[u32]; 3] = [
        &[5, 9, 200, 17, 3, 3, 80],
        &[3],
        &[44, 45, 46, 47, 48, 49, 50, 51, 52, 53],
    ];
    let mut caches: Vec<_> = (0..3)
        .map(|_| backend.kv_cache(layers, shape, 32).unwrap())
        .collect();
    let mut out = Vec::new();
    for pass in [&prompts[..], &[&[1u32][..], &[2], &[3]][..]] {
        let mut segments: Vec<Segment<'_, _>> = pass
            .iter()
            .zip(caches.iter_mut())
            .map(|(tokens, cache)| Segment { tokens, cache })
            .collect();
        let logits = model
            .forward_batch(backend, &mut weights, &mut segments, Logits::All)
            .unwrap();
        out.extend(backend.to_host(&logits).unwrap());
    }
    out
}

#[test]
fn batched_passes_match_the_cpu() {
    let Some(cuda) = gpu("batched_passes_match_the_cpu") else {
        return;
    };
    for arch in ARCHS {
        let ckpt = Checkpoint::open(fixture(arch).to_str().unwrap()).unwrap();
        cuda.prepare(ckpt.config.head_dim).unwrap();
        let err = rel_l2(&two_passes(&ckpt, &cuda), &two_passes(&ckpt, &Cpu));
        eprintln!("{arch}: batched CUDA vs CPU relative L2 {err:.2e}");
        assert!(err <= 2e-2, "{arch}: {err:e}");
    }
}

#[test]
fn batched_generation_runs_every_sequence_to_its_end() {
    let Some(cuda) = gpu("batched_generation_runs_every_sequence_to_its_end") else {
        return;
    };
    let ckpt = Checkpoint::open(fixture("qwen2").to_str().unwrap()).unwrap();
    cuda.prepare(ckpt.config.head_dim).unwrap();
    let mut gen = Generator::new(&ckpt, cuda, None).unwrap();
    let requests: Vec<Request> = (0..10u32)
        .map(|i| Request {
            prompt: (0..1 + i).map(|t| (t * 13 + i) % 400).collect(),
            max_tokens: 3 + i as usize,
            sampling: SamplingConfig::default(),
            stop_strings: vec![],
            ignore_eos: true,
        })
        .collect();
    let (outs, stats) = gen.generate_batch(&requests, 4, &mut |_, _| {}).unwrap();
    for (r, o) in requests.iter().zip(&outs) {
        assert_eq!(o.tokens.len(), r.max_tokens);
    }
    assert!(stats.passes < outs.iter().map(|o| o.tokens.len()).sum::<usize>());
}
