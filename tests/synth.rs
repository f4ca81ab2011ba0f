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
