//! Batched generation: many sequences per pass give exactly what one sequence at a time gives
//! (on the CPU the arithmetic of each row does not depend on its neighbours), with sequences
//! of different lengths that end at different times and make room for waiting ones.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

use common::{fixture, ARCHS};
use ferry::backend::cpu::Cpu;
use ferry::backend::Backend;
use ferry::generate::{Finish, Generator, Progress, Request, SamplingConfig};
use ferry::model::Checkpoint;
use ferry::model::{Architecture, Llama, Logits, ResidentWeights, Segment, MLP_CHUNK_ROWS};

fn request(prompt: Vec<u32>, max_tokens: usize, sampling: SamplingConfig) -> Request {
    Request {
        prompt,
        max_tokens,
        sampling,
        stop_strings: vec![],
        ignore_eos: false,
    }
}

/// Prompts of different lengths, token budgets that end sequences at different passes, and
/// one sampled sequence among greedy ones.
fn requests(vocab: u32) -> Vec<Request> {
    let ids = |n: u32, salt: u32| {
        (0..n)
            .map(|i| (i * 31 + salt * 7 + 3) % vocab)
            .collect::<Vec<_>>()
    };
    let sampled = SamplingConfig {
        temperature: 0.8,
        top_p: Some(0.9),
        seed: 11,
        ..Default::default()
    };
    vec![
        request(ids(5, 1), 12, SamplingConfig::default()),
        request(ids(1, 2), 3, SamplingConfig::default()),
        request(ids(9, 3), 7, sampled),
        request(ids(3, 4), 10, SamplingConfig::default()),
        request(ids(7, 5), 1, SamplingConfig::default()),
        request(ids(2, 6), 0, SamplingConfig::default()),
    ]
}

#[test]
fn batches_equal_one_sequence_at_a_time() {
    for arch in ARCHS {
        let ckpt = Checkpoint::open(fixture(arch).to_str().unwrap()).unwrap();
        let mut gen = Generator::new(&ckpt, Cpu, None).unwrap();
        let reqs = requests(ckpt.config.vocab_size as u32);
        let alone: Vec<_> = reqs
            .iter()
            .map(|r| gen.generate(r, &mut |_| {}).unwrap())
            .collect();
        for batch in [1, 2, 4, 16] {
            let mut streamed = vec![String::new(); reqs.len()];
            let (outs, stats) = gen
                .generate_batch(&reqs, batch, &mut |i, piece| streamed[i].push_str(piece))
                .unwrap();
            for (i, (a, b)) in alone.iter().zip(&outs).enumerate() {
                assert_eq!(a.tokens, b.tokens, "{arch}, batch {batch}, request {i}");
                assert_eq!(a.finish, b.finish, "{arch}, batch {batch}, request {i}");
                assert_eq!(a.text, b.text);
                assert_eq!(streamed[i], b.text, "text handed out as it came adds up");
            }
            let generated: usize = outs.iter().map(|o| o.tokens.len()).sum();
            assert_eq!(stats.tokens_out, generated);
            // The longest sequence needs 12 passes; batching all at once takes no more.
            if batch >= reqs.len() {
                assert_eq!(
                    stats.passes, 12,
                    "{arch}: passes with everything in one batch"
                );
            }
            if batch == 1 {
                assert_eq!(stats.passes, generated, "{arch}: one pass per token alone");
            }
        }
        assert_eq!(alone[5].finish, Finish::MaxTokens);
        assert!(alone[5].tokens.is_empty());
    }
}

#[test]
fn progress_after_every_pass_ends_at_every_request() {
    let ckpt = Checkpoint::open(fixture("llama").to_str().unwrap()).unwrap();
    let mut gen = Generator::new(&ckpt, Cpu, None).unwrap();
    let reqs = requests(ckpt.config.vocab_size as u32);
    let mut seen: Vec<Progress> = Vec::new();
    let (outs, stats) = gen
        .generate_batch_with_progress(&reqs, 2, &mut |_, _| {}, &mut |_, _| {}, &mut |p| {
            seen.push(p)
        })
        .unwrap();
    assert_eq!(seen.len(), stats.passes, "one report a pass");
    let generated: usize = outs.iter().map(|o| o.tokens.len()).sum();
    assert_eq!(
        seen.last(),
        Some(&Progress {
            finished: reqs.len(),
            requests: reqs.len(),
            tokens_out: generated,
        })
    );
    for w in seen.windows(2) {
        assert!(w[0].finished <= w[1].finished, "{w:?}");
        assert!(
            w[0].tokens_out < w[1].tokens_out,
            "every pass generates: {w:?}"
        );
    }
    // With 2 sequences a pass, no pass generates more than 2 tokens.
    assert!(seen[0].tokens_out <= 2 && seen.iter().all(|p| p.requests == reqs.len()));
    assert!(seen[..seen.len() - 1]
        .iter()
        .all(|p| p.finished < reqs.len()));
}

#[test]
fn each_output_is_handed_out_as_its_sequence_ends() {
    let ckpt = Checkpoint::open(fixture("llama").to_str().unwrap()).unwrap();
    let mut gen = Generator::new(&ckpt, Cpu, None).unwrap();
    let reqs: Vec<Request> = requests(ckpt.config.vocab_size as u32)
        .into_iter()
        .map(|r| Request {
            ignore_eos: true,
            ..r
        })
        .collect();
    // (passes reported before it, request, its output's tokens)
    let passes = std::cell::Cell::new(0);
    let mut done = Vec::new();
    let (outs, _) = gen
        .generate_batch_with_progress(
            &reqs,
            16,
            &mut |_, _| {},
            &mut |i, out| done.push((passes.get(), i, out.tokens.clone())),
            &mut |_| passes.set(passes.get() + 1),
        )
        .unwrap();
    assert_eq!(done.len(), reqs.len(), "each request once");
    for (before, i, tokens) in &done {
        // All start at pass 1: a sequence of k tokens ends in pass k, before that pass's
        // report (none: before any pass).
        assert_eq!(
            *before,
            reqs[*i].max_tokens.saturating_sub(1),
            "request {i}"
        );
        assert_eq!(tokens, &outs[*i].tokens, "request {i}");
    }
    let order: Vec<usize> = done.iter().map(|d| d.1).collect();
    assert_eq!(order, [5, 4, 1, 2, 3, 0], "in the order they end");
}

#[test]
fn an_interrupt_ends_every_sequence_after_the_pass_in_flight() {
    static STOP: AtomicBool = AtomicBool::new(false);
    let ckpt = Checkpoint::open(fixture("qwen2").to_str().unwrap()).unwrap();
    let mut gen = Generator::new(&ckpt, Cpu, None).unwrap();
    gen.interrupt = Some(&STOP);
    let long = |salt| Request {
        ignore_eos: true,
        ..request(vec![3, 5, salt], 50, SamplingConfig::default())
    };
    let reqs = [long(1), long(2), long(3)];
    let mut passes = 0;
    let (outs, stats) = gen
        .generate_batch_with_progress(&reqs, 2, &mut |_, _| {}, &mut |_, _| {}, &mut |_| {
            passes += 1;
            if passes == 3 {
                STOP.store(true, Ordering::SeqCst);
            }
        })
        .unwrap();
    assert_eq!(stats.passes, 4, "the pass in flight, then no more");
    for out in &outs[..2] {
        assert_eq!(out.finish, Finish::Interrupted);
        assert_eq!(out.tokens.len(), 4);
    }
    assert_eq!(
        outs[2].finish,
        Finish::Interrupted,
        "a waiting sequence never starts"
    );
    assert!(outs[2].tokens.is_empty());
    // Lowered as the generation returns: the next one runs in full.
    assert!(!STOP.load(Ordering::SeqCst));
    let out = gen.generate(&long(1), &mut |_| {}).unwrap();
    assert_eq!((out.finish, out.tokens.len()), (Finish::MaxTokens, 50));
}

#[test]
fn batched_logits_are_bit_identical_to_single_passes() {
    let ckpt = Checkpoint::open(fixture("qwen3").to_str().unwrap()).unwrap();
    let model = Llama::new(ckpt.config.clone());
    let mut weights = ResidentWeights::load(&ckpt, model.groups(), |t| Cpu.weight(t)).unwrap();
    let shape = model.attention_shape();
    let layers = ckpt.config.num_layers;
    let prompts: [&[u32]; 3] = [&[5, 9, 200, 17], &[3], &[44, 45, 46, 47, 48, 49, 50]];

    let single: Vec<Vec<f32>> = prompts
        .iter()
        .map(|p| {
            let mut cache = Cpu.kv_cache(layers, shape, 16).unwrap();
            model
                .forward(&Cpu, &mut weights, p, &mut cache, Logits::All)
                .unwrap()
        })
        .collect();

    let mut caches: Vec<_> = (0..3)
        .map(|_| Cpu.kv_cache(layers, shape, 16).unwrap())
        .collect();
    let mut segments: Vec<Segment<'_, _>> = prompts
        .iter()
        .zip(caches.iter_mut())
        .map(|(tokens, cache)| Segment { tokens, cache })
        .collect();
    let all = model
        .forward_batch(&Cpu, &mut weights, &mut segments, Logits::All)
        .unwrap();
    assert_eq!(all.data, single.concat());

    // A second pass, one token each, continues every sequence from its own cache.
    let next: [&[u32]; 3] = [&[1], &[2], &[3]];
    let mut segments: Vec<Segment<'_, _>> = next
        .iter()
        .zip(caches.iter_mut())
        .map(|(tokens, cache)| Segment { tokens, cache })
        .collect();
    let last = model
        .forward_batch(&Cpu, &mut weights, &mut segments, Logits::Last)
        .unwrap();
    let vocab = ckpt.config.vocab_size;
    for (i, (p, n)) in prompts.iter().zip(next).enumerate() {
        let mut cache = Cpu.kv_cache(layers, shape, 16).unwrap();
        let whole: Vec<u32> = p.iter().chain(n).copied().collect();
        let alone = model
            .forward(&Cpu, &mut weights, &whole, &mut cache, Logits::Last)
            .unwrap();
        let row = &last.data[i * vocab..(i + 1) * vocab];
        let err = common::rel_l2(row, &alone);
        // Cached and uncached attention sum in the same order: equal to rounding.
        assert!(err < 1e-6, "sequence {i}: {err:e}");
    }
}

#[test]
fn run_with_a_prompts_file() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("prompts.txt");
    std::fs::write(&file, "hello there\n\nFlat is better than nested.\nabc\n").unwrap();
    let model = fixture("llama");
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "run",
            "--model",
            model.to_str().unwrap(),
            "--device",
            "cpu",
            "--max-tokens",
            "5",
        ])
        .args([
            "--batch",
            "2",
            "--ignore-eos",
            "--json",
            "--prompts",
            file.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[1]["prompt"], "Flat is better than nested.");
    assert!(lines.iter().all(|l| l["tokens"] == 5));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("3 sequences, 2 per pass"), "{stderr}");

    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "\"ok\"\n{\"text\": 1}\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "run",
            "--model",
            model.to_str().unwrap(),
            "--device",
            "cpu",
            "--prompts",
            bad.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("bad.jsonl") && stderr.contains("line 2"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"));
}

#[test]
fn bench_reports_every_prompt_length_and_batch() {
    let model = fixture("llama");
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "bench",
            "--model",
            model.to_str().unwrap(),
            "--device",
            "cpu",
            "--json",
        ])
        .args([
            "--prompt-tokens",
            "4,9",
            "--batch",
            "1,3",
            "--decode-tokens",
            "3",
            "--runs",
            "2",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = json["results"].as_array().unwrap();
    let shape: Vec<(u64, u64)> = rows
        .iter()
        .map(|r| {
            (
                r["prompt_tokens"].as_u64().unwrap(),
                r["batch"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(shape, [(4, 1), (4, 3), (9, 1), (9, 3)]);
    for r in rows {
        assert!(r["prompt_s"].as_f64().unwrap() > 0.0);
        assert!(r["decode_tok_s"].as_f64().unwrap() > 0.0);
        assert!(r["streamed"].is_null(), "nothing streams on the CPU");
    }
    let err = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "bench",
            "--model",
            model.to_str().unwrap(),
            "--device",
            "cpu",
            "--vram",
            "1GiB",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&err.stderr);
    assert!(
        !err.status.success() && stderr.contains("--vram") && !stderr.contains("panicked"),
        "{stderr}"
    );
}

/// A pass longer than `MLP_CHUNK_ROWS` runs its MLPs in chunks of rows; every position's
/// logits equal those of the same tokens in two passes short enough for one chunk each.
#[test]
fn long_pass_mlp_in_chunks_matches_short_passes() {
    let ckpt = Checkpoint::open(fixture("qwen3").to_str().unwrap()).unwrap();
    let model = Llama::new(ckpt.config.clone());
    let mut weights = ResidentWeights::load(&ckpt, model.groups(), |t| Cpu.weight(t)).unwrap();
    let (shape, layers) = (model.attention_shape(), ckpt.config.num_layers);
    let n = MLP_CHUNK_ROWS + 37;
    let tokens = ferry::synth::random_token_ids(n, ckpt.config.vocab_size, 5);

    let mut cache = Cpu.kv_cache(layers, shape, n).unwrap();
    let whole = model
        .forward(&Cpu, &mut weights, &tokens, &mut cache, Logits::All)
        .unwrap();

    let mut cache = Cpu.kv_cache(layers, shape, n).unwrap();
    let split = 3000; // both passes below one chunk
    let mut parts = model
        .forward(
            &Cpu,
            &mut weights,
            &tokens[..split],
            &mut cache,
            Logits::All,
        )
        .unwrap();
    parts.extend(
        model
            .forward(
                &Cpu,
                &mut weights,
                &tokens[split..],
                &mut cache,
                Logits::All,
            )
            .unwrap(),
    );
    let vocab = ckpt.config.vocab_size;
    assert_eq!(whole.len(), n * vocab);
    // Rows on both sides of the chunk boundary, and the last.
    for row in [0, split, MLP_CHUNK_ROWS - 1, MLP_CHUNK_ROWS, n - 1] {
        let r = row * vocab..(row + 1) * vocab;
        let err = common::rel_l2(&whole[r.clone()], &parts[r]);
        assert!(err < 1e-6, "position {row}: {err:e}");
    }
}

#[test]
fn bench_timeline_needs_a_streamed_gpu_pass() {
    let model = fixture("llama");
    let bench = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["bench", "--model", model.to_str().unwrap(), "--runs", "1"])
            .args(extra)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success(), "{extra:?} should fail: {stderr}");
        assert!(
            stderr.starts_with("error: --timeline: ") && stderr.trim_end().lines().count() == 1,
            "{extra:?}: {stderr}"
        );
        stderr
    };
    let tmp = tempfile::tempdir().unwrap();
    let svg = tmp.path().join("pass.svg");
    let svg = svg.to_str().unwrap();
    let err = bench(&["--device", "cpu", "--timeline", svg]);
    assert!(err.contains("CPU"), "{err}");
    let err = bench(&["--device", "cpu", "--vram", "1GiB", "--timeline", svg]);
    assert!(
        err.contains("CPU"),
        "named before --vram's own error: {err}"
    );
    // Without --vram nothing streams, on any device (checked before a GPU is looked for).
    for device in ["auto", "cuda"] {
        let err = bench(&["--device", device, "--timeline", svg]);
        assert!(err.contains("--vram"), "{err}");
    }
    let err = bench(&["--vram", "1GiB", "--timeline", "pass.png"]);
    assert!(err.contains(".svg"), "{err}");
    assert!(!tmp.path().join("pass.svg").exists(), "nothing written");
}

/// A prompt taken in pieces (as `ferry serve` admits prompts, `--prompt-chunk`) leaves the
/// same cache and gives the same logits as the whole prompt in one pass, bit for bit.
#[test]
fn a_prompt_in_pieces_equals_the_whole_prompt_bit_for_bit() {
    for arch in ARCHS {
        let ckpt = Checkpoint::open(fixture(arch).to_str().unwrap()).unwrap();
        let model = Llama::new(ckpt.config.clone());
        let mut weights = ResidentWeights::load(&ckpt, model.groups(), |t| Cpu.weight(t)).unwrap();
        let vocab = ckpt.config.vocab_size as u32;
        let prompt: Vec<u32> = (0..23).map(|i| (i * 31 + 7) % vocab).collect();
        let cache = || {
            Cpu.kv_cache(ckpt.config.num_layers, model.attention_shape(), 32)
                .unwrap()
        };
        let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
        let mut whole = cache();
        let want = bits(
            model
                .forward(&Cpu, &mut weights, &prompt, &mut whole, Logits::Last)
                .unwrap(),
        );
        let next_whole = bits(
            model
                .forward(&Cpu, &mut weights, &[3], &mut whole, Logits::Last)
                .unwrap(),
        );
        for chunk in [1, 5, 8, 22] {
            let mut pieces = cache();
            let mut last = Vec::new();
            for part in prompt.chunks(chunk) {
                last = model
                    .forward(&Cpu, &mut weights, part, &mut pieces, Logits::Last)
                    .unwrap();
            }
            assert!(bits(last) == want, "{arch}: prompt in pieces of {chunk}");
            let next = model
                .forward(&Cpu, &mut weights, &[3], &mut pieces, Logits::Last)
                .unwrap();
            assert!(
                bits(next) == next_whole,
                "{arch}: the cache after pieces of {chunk} differs"
            );
        }
    }
}
