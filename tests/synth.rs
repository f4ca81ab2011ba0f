//! Synthetic checkpoints: `ferry synth` writes what the loader accepts, deterministically, and
//! the model runs on it.

use std::path::Path;
use std::process::Command;

use ferry::backend::cpu::Cpu;
use ferry::checkpoint::DType;
use ferry::generate::Generator;
use ferry::model::Checkpoint;
use ferry::model::{Arch, LlamaConfig};
use ferry::synth::{synthetic_checkpoint, write_checkpoint, Preset, WriteOptions};

fn ferry(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .output()
        .unwrap()
}

/// Every file of `dir`, by name, with its bytes.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().to_string(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

fn write(preset: &Preset, dir: &Path, seed: u64, shard_bytes: usize) {
    let opts = WriteOptions {
        seed,
        shard_bytes,
        ..WriteOptions::default()
    };
    write_checkpoint(preset, dir, &opts).unwrap();
}

#[test]
fn tiny_opens_runs_and_counts_its_parameters() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny");
    let out = ferry(&[
        "synth",
        "--preset",
        "tiny",
        "--out",
        dir.to_str().unwrap(),
        "--shard-size",
        "64KiB",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let preset = Preset::by_name("tiny").unwrap();
    let ckpt = Checkpoint::open(dir.to_str().unwrap()).unwrap();
    assert_eq!(ckpt.config, preset.config, "config.json round-trips");
    assert!(dir.join("model.safetensors.index.json").is_file());
    let shards = files(&dir)
        .into_iter()
        .filter(|(name, _)| name.ends_with(".safetensors"))
        .count();
    // 64 KiB each: embedding, block 0, block 1, final norm, head.
    assert_eq!(shards, 5);
    // tiny: embed 512×64 + head 512×64 + norm 64 + 2 × (2×64 + 64×64 + 2×32×64 + 64×64 + 3×64×128)
    let expected = 2 * 512 * 64 + 64 + 2 * (2 * 64 + 2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128);
    assert_eq!(preset.parameters(), expected);
    assert_eq!(ckpt.parameters(), expected);
    assert_eq!(ckpt.bytes(), expected * 2);

    let info = ferry(&["info", "--model", dir.to_str().unwrap()]);
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(
        info.contains(&format!("parameters     {expected} ")),
        "{info}"
    );

    // Scale like a trained model: linear weights ~ N(0, 0.02²), norms ≈ 1.
    let q = ckpt
        .tensor("model.layers.0.self_attn.q_proj.weight")
        .unwrap()
        .to_f32();
    let std = (q.iter().map(|x| x * x).sum::<f32>() / q.len() as f32).sqrt();
    assert!((std - 0.02).abs() < 0.002, "std {std}");
    let norm = ckpt.tensor("model.norm.weight").unwrap().to_f32();
    assert!(norm.iter().all(|&x| (x - 1.0).abs() < 0.1));

    // Finite logits through the CPU reference, from a prompt through the written tokenizer.
    let mut gen = Generator::new(&ckpt, Cpu, None).unwrap();
    let ids = gen.text.encode("hello world").unwrap();
    assert_eq!(ids.len(), "hello world".len(), "one token per byte");
    assert_eq!(gen.text.decode(&ids).unwrap(), "hello world");
    let logits = gen.score(&ids).unwrap();
    assert_eq!(logits.len(), ids.len() * 512);
    assert!(logits.iter().all(|x| x.is_finite()));
    let spread = logits.iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(spread > 0.01, "logits are not all zero");

    let run = ferry(&[
        "run",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "hello",
        "--max-tokens",
        "3",
        "--ignore-eos",
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
}

#[test]
fn same_seed_same_bytes_other_seed_other_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let preset = Preset::by_name("tiny").unwrap();
    let (a, b, c) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    write(&preset, &a, 1, 4 << 30);
    write(&preset, &b, 1, 4 << 30);
    write(&preset, &c, 2, 4 << 30);
    assert_eq!(files(&a), files(&b));
    let shard = "model-00001-of-00001.safetensors";
    let read = |d: &Path| std::fs::read(d.join(shard)).unwrap();
    assert_ne!(read(&a), read(&c));

    // In memory: the same tensors, byte for byte.
    let mem = synthetic_checkpoint(&preset, 1, DType::BF16).unwrap();
    let disk = Checkpoint::open(a.to_str().unwrap()).unwrap();
    assert_eq!(mem.config, disk.config);
    assert_eq!(mem.tensors.len(), disk.tensors.len());
    for (name, t) in &disk.tensors {
        assert_eq!(mem.tensor(name).unwrap().bytes(), t.bytes(), "{name}");
    }
}

#[test]
fn f32_holds_the_bf16_values_widened() {
    let preset = Preset::by_name("tiny").unwrap();
    let b = synthetic_checkpoint(&preset, 3, DType::BF16).unwrap();
    let f = synthetic_checkpoint(&preset, 3, DType::F32).unwrap();
    for (name, t) in &b.tensors {
        let tf = f.tensor(name).unwrap();
        assert_eq!(tf.dtype, DType::F32);
        assert_eq!(tf.to_f32(), t.to_f32(), "{name}");
    }
}

#[test]
fn every_arch_loads_and_runs() {
    let tmp = tempfile::tempdir().unwrap();
    for arch in [Arch::Llama, Arch::Qwen2, Arch::Qwen3, Arch::Mistral] {
        let preset = Preset::by_name("tiny").unwrap().with_arch(arch);
        let dir = tmp.path().join(arch.name());
        write(&preset, &dir, 0, 4 << 30);
        let ckpt = Checkpoint::open(dir.to_str().unwrap()).unwrap();
        assert_eq!(ckpt.config, preset.config, "{}", arch.name());
        assert_eq!(ckpt.config.qkv_bias, arch == Arch::Qwen2);
        assert_eq!(ckpt.config.qk_norm, arch == Arch::Qwen3);
        let mut gen = Generator::new(&ckpt, Cpu, Some(16)).unwrap();
        let logits = gen.score(&[1, 2, 3, 400]).unwrap();
        assert!(logits.iter().all(|x| x.is_finite()), "{}", arch.name());
    }
}

#[test]
fn presets_have_the_real_shapes() {
    let p = Preset::by_name("qwen2.5-7b").unwrap();
    let c: &LlamaConfig = &p.config;
    assert_eq!(
        (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads),
        (3584, 28, 28, 4)
    );
    assert_eq!((c.intermediate_size, c.vocab_size), (18944, 152064));
    assert!(c.qkv_bias && !c.tie_word_embeddings);
    // Qwen2.5-7B has 7.62B parameters (15.23 GB in bf16, DESIGN.md).
    assert_eq!(p.parameters(), 7_615_616_512);
    let approx = |name: &str| Preset::by_name(name).unwrap().parameters() as f64 / 1e9;
    assert!((approx("qwen2.5-14b") - 14.77).abs() < 0.01);
    assert!((approx("qwen2.5-32b") - 32.76).abs() < 0.01);
    assert!((approx("llama-3.1-8b") - 8.03).abs() < 0.01);
    assert!((approx("llama-3.1-70b") - 70.55).abs() < 0.01);
    let layers = p.clone().with_layers(2).unwrap();
    assert_eq!(layers.config.num_layers, 2);
    assert!(p.with_layers(0).is_err());
}

#[test]
fn bad_flags_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x");
    let out = out.to_str().unwrap();
    for (args, needle) in [
        (
            vec!["--preset", "gpt-5", "--out", out],
            "unknown preset \"gpt-5\"; expected one of tiny, qwen2.5-7b",
        ),
        (
            vec!["--preset", "tiny", "--arch", "gpt2", "--out", out],
            "unknown architecture \"gpt2\"; expected one of llama, mistral, qwen2, qwen3",
        ),
        (
            vec!["--preset", "tiny", "--dtype", "f8", "--out", out],
            "expected bf16 or f32",
        ),
        (
            vec!["--preset", "tiny", "--shard-size", "lots", "--out", out],
            "--shard-size",
        ),
        (
            vec!["--preset", "tiny", "--layers", "0", "--out", out],
            "--layers",
        ),
    ] {
        let mut all = vec!["synth"];
        all.extend(args.iter());
        let o = ferry(&all);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{all:?}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(stderr.contains(needle), "{all:?}: {stderr}");
    }
    // A non-empty directory is not overwritten without --force.
    std::fs::create_dir_all(tmp.path().join("full")).unwrap();
    std::fs::write(tmp.path().join("full/keep"), b"x").unwrap();
    let full = tmp.path().join("full");
    let o = ferry(&["synth", "--preset", "tiny", "--out", full.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--force"));
}

// ---------------------------------------------------------------------------------------
// GGUF (`ferry synth --gguf`)
// ---------------------------------------------------------------------------------------

use ferry::checkpoint::gguf::{parse_header, GgmlType};
use ferry::model::llama::gguf::gguf_name;
use ferry::synth::{write_gguf, GgufFileType, GgufOptions};

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let err: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let norm: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (err / norm).sqrt()
}

/// `tiny` widened so that every row is a multiple of 256 (Q4_K's block): hidden 256, ffn 512,
/// 4 heads of 64, 2 kv heads.
fn tiny_256(arch: Arch) -> Preset {
    let mut p = Preset::by_name("tiny").unwrap().with_arch(arch);
    let c = &mut p.config;
    (c.hidden_size, c.intermediate_size, c.head_dim) = (256, 512, 64);
    p
}

/// Open the GGUF file `path` and compare it with the safetensors weights of `preset` and
/// `seed`: the config (float fields as f32), and every tensor within a relative L2 error that
/// fits the type it is stored as. Returns the worst error per type.
fn check_gguf(path: &Path, preset: &Preset, seed: u64) -> Vec<(GgmlType, f64)> {
    let gguf = Checkpoint::open_as(
        path.to_str().unwrap(),
        ferry::checkpoint::gguf::Weights::Dequantized(DType::F32),
    )
    .unwrap();
    let want = synthetic_checkpoint(preset, seed, DType::F32).unwrap();
    let mut expected = preset.config.clone();
    if expected.arch == Arch::Mistral {
        expected.arch = Arch::Llama; // llama.cpp writes Mistral as llama
    }
    expected.rms_norm_eps = expected.rms_norm_eps as f32 as f64;
    let mut got = gguf.config.clone();
    if let (Some(g), Some(e)) = (&got.rope_scaling, &expected.rope_scaling) {
        // Recovered from the frequency factors: close, not bit for bit.
        assert_eq!(g.factor, e.factor);
        assert!(
            (g.low_freq_factor - e.low_freq_factor).abs() < 1e-3,
            "{g:?}"
        );
        assert!(
            (g.high_freq_factor - e.high_freq_factor).abs() < 1e-3,
            "{g:?}"
        );
        got.rope_scaling = expected.rope_scaling.clone();
    }
    assert_eq!(got, expected, "{}", path.display());
    assert_eq!(gguf.tensors.len(), want.tensors.len());

    let bytes = std::fs::read(path).unwrap();
    let header = parse_header(&bytes).unwrap();
    let stored = |hf: &str| {
        let name = gguf_name(hf);
        header.tensors.iter().find(|t| t.name == name).unwrap().ty
    };
    let mut worst: Vec<(GgmlType, f64)> = Vec::new();
    for (name, t) in &want.tensors {
        let (got, want) = (gguf.tensor(name).unwrap().to_f32(), t.to_f32());
        let ty = stored(name);
        let err = rel_l2(&got, &want);
        // A Q/K permutation left in place would give ~1.4 (two independent draws).
        let bound = match ty {
            GgmlType::F32 => 0.0,
            GgmlType::Q8_0 => 0.01,
            GgmlType::Q6_K => 0.03,
            GgmlType::Q4_K => 0.11,
            other => panic!("{name}: unexpected type {other}"),
        };
        assert!(err <= bound, "{name} ({ty}): relative L2 error {err}");
        match worst.iter_mut().find(|(t, _)| *t == ty) {
            Some(w) => w.1 = w.1.max(err),
            None => worst.push((ty, err)),
        }
    }
    worst
}

#[test]
fn gguf_q4_k_m_holds_the_synthetic_weights_of_every_arch() {
    let tmp = tempfile::tempdir().unwrap();
    let mut llama3 = tiny_256(Arch::Llama);
    llama3.config.rope_scaling = Some(ferry::model::Llama3RopeScaling {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 64,
    });
    let mut tied = tiny_256(Arch::Qwen3);
    tied.config.tie_word_embeddings = true;
    let presets = [
        tiny_256(Arch::Qwen2),
        tiny_256(Arch::Llama),
        tiny_256(Arch::Mistral),
        llama3,
        tied,
    ];
    for (k, preset) in presets.iter().enumerate() {
        let path = tmp.path().join(format!("{k}.gguf"));
        let opts = GgufOptions {
            seed: 5,
            file_type: GgufFileType::Q4_K_M,
            progress: false,
        };
        let report = write_gguf(preset, &path, &opts).unwrap();
        assert_eq!(
            report.file_bytes as u64,
            std::fs::metadata(&path).unwrap().len()
        );
        let worst = check_gguf(&path, preset, 5);
        eprintln!(
            "{} {:?}: worst relative L2 error {worst:?}",
            k, preset.config.arch
        );

        // llama.cpp's mix over 2 layers: layer 1 (≥ 7/8 of 2) gets Q6_K for V and down, as
        // does the head (the embedding, when tied); everything else 2-D is Q4_K.
        let bytes = std::fs::read(&path).unwrap();
        let header = parse_header(&bytes).unwrap();
        let ty = |name: &str| header.tensors.iter().find(|t| t.name == name).unwrap().ty;
        assert_eq!(ty("blk.0.attn_v.weight"), GgmlType::Q4_K);
        assert_eq!(ty("blk.1.attn_v.weight"), GgmlType::Q6_K);
        assert_eq!(ty("blk.0.ffn_down.weight"), GgmlType::Q4_K);
        assert_eq!(ty("blk.1.ffn_down.weight"), GgmlType::Q6_K);
        assert_eq!(ty("blk.1.attn_q.weight"), GgmlType::Q4_K);
        assert_eq!(ty("blk.1.attn_norm.weight"), GgmlType::F32);
        match preset.config.tie_word_embeddings {
            true => assert_eq!(ty("token_embd.weight"), GgmlType::Q6_K),
            false => {
                assert_eq!(ty("token_embd.weight"), GgmlType::Q4_K);
                assert_eq!(ty("output.weight"), GgmlType::Q6_K);
            }
        }
    }
}

#[test]
fn gguf_tiny_from_the_cli_runs_and_tokenizes_as_the_directory_does() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("tiny.gguf");
    let p = path.to_str().unwrap();
    let synth = |extra: &[&str]| {
        let mut args = vec![
            "synth", "--preset", "tiny", "--seed", "3", "--gguf", "Q4_K_M",
        ];
        args.extend(["--out", p]);
        args.extend(extra);
        ferry(&args)
    };
    let out = synth(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("bytes/weight"), "{stderr}");
    // tiny's rows (64, 128) are not multiples of 256: every matrix falls back to Q8_0.
    let worst = check_gguf(&path, &Preset::by_name("tiny").unwrap(), 3);
    assert!(worst
        .iter()
        .all(|(ty, _)| matches!(ty, GgmlType::Q8_0 | GgmlType::F32)));

    // An existing file is kept without --force, replaced with it.
    let again = synth(&[]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    assert!(synth(&["--force"]).status.success());
    let bad = ferry(&["synth", "--preset", "tiny", "--gguf", "Q3_K", "--out", p]);
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && !stderr.contains("panicked"));
    assert!(
        stderr.contains("--gguf: unknown GGUF type \"Q3_K\"; expected one of Q4_K_M"),
        "{stderr}"
    );

    // The GGUF tokenizer encodes and decodes as the directory's tokenizer.json.
    let dir = tmp.path().join("dir");
    write(&Preset::by_name("tiny").unwrap(), &dir, 3, 4 << 30);
    let from_dir = Checkpoint::open(dir.to_str().unwrap()).unwrap();
    let from_gguf =
        Checkpoint::open_as(p, ferry::checkpoint::gguf::Weights::Dequantized(DType::F32)).unwrap();
    let dir_gen = Generator::new(&from_dir, Cpu, None).unwrap();
    let mut gguf_gen = Generator::new(&from_gguf, Cpu, None).unwrap();
    let text = "hello, world <|endoftext|> 42";
    let ids = gguf_gen.text.encode(text).unwrap();
    assert_eq!(ids, dir_gen.text.encode(text).unwrap());
    let decoded = gguf_gen.text.decode(&ids).unwrap();
    assert_eq!(decoded, dir_gen.text.decode(&ids).unwrap());
    assert_eq!(decoded, "hello, world  42", "special tokens are skipped");
    assert!(ids.contains(&256), "the special token is one token");
    let logits = gguf_gen.score(&ids).unwrap();
    assert!(logits.iter().all(|x| x.is_finite()));

    let run = ferry(&[
        "run",
        "--model",
        p,
        "--prompt",
        "hello",
        "--max-tokens",
        "3",
        "--ignore-eos",
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
}
