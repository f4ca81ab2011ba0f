//! `ferry image` on Qwen-Image's split files as ComfyUI ships them (`--dit`,
//! `--text-encoder`, `--vae`, `--tokenizer`): a synthetic diffusers pipeline rewritten here
//! into the three files (the DiT under `model.diffusion_model.`, the Qwen2.5-VL text model
//! under `model.` beside a vision tower to ignore, the VAE in the original Wan 2.1 names, the
//! inverse of diffusers' `convert_wan_vae_to_diffusers`) gives the pixels of the directory it
//! came from, bit for bit; and the split files' mistakes are refused naming the file.
//!
//! The pipeline is `ferry synth`'s qwen-image-pipeline-tiny reshaped to what a file without
//! a config can be read as: heads of 32 in the DiT (Qwen-Image's RoPE axes scale from its
//! 128), heads of 128 in the text model (every Qwen2.5-VL's), and a VAE of Qwen-Image's
//! structure (dim_mult [1, 2, 4, 4], two residual blocks a level) at base_dim 4.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::read_png;
use ferry::checkpoint::{safetensors, DType, HostTensor};
use ferry::model::qwen_image::vae::QwenVaeConfig;
use ferry::synth::{write_pipeline, PipelineModels, PipelinePreset, WriteOptions};
use serde_json::json;

fn ferry(args: &[&str], hf_home: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .env("HF_HOME", hf_home)
        .output()
        .expect("ferry runs")
}

type Entry = (String, DType, Vec<usize>, Vec<u8>);

fn entry(name: impl Into<String>, t: &HostTensor) -> Entry {
    (name.into(), t.dtype, t.shape.clone(), t.bytes().to_vec())
}

/// Residual blocks per VAE level of the pipeline below.
const RES_BLOCKS: usize = 2;

/// The synthetic pipeline, in `dir`.
fn pipeline(dir: &Path) -> PathBuf {
    let mut preset = PipelinePreset::by_name("qwen-image-pipeline-tiny").unwrap();
    let PipelineModels::QwenImage(q) = &mut preset.models else {
        panic!("a Qwen-Image pipeline");
    };
    let te = &mut q.text_encoder.config;
    (te.hidden_size, te.num_heads, te.num_kv_heads, te.head_dim) = (128, 1, 1, 128);
    q.mrope_section = [16, 24, 24];
    q.transformer = q
        .transformer
        .clone()
        .with("attention_head_dim", json!(32))
        .with("axes_dims_rope", json!([4, 14, 14]))
        .with("joint_attention_dim", json!(128));
    q.vae = QwenVaeConfig {
        base_dim: 4,
        dim_mult: vec![1, 2, 4, 4],
        num_res_blocks: RES_BLOCKS,
        ..q.vae.clone()
    };
    let pipe = dir.join("pipe");
    let opts = WriteOptions {
        seed: 5,
        ..WriteOptions::default()
    };
    write_pipeline(&preset, &pipe, &preset.components(), &opts).unwrap();
    pipe
}

/// Every tensor of a component folder's safetensors files (one or shards).
fn component_tensors(dir: &Path) -> Vec<HostTensor> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            out.extend(safetensors::read(&p).unwrap());
        }
    }
    out
}

/// The DiT as ComfyUI's qwen_image_bf16.safetensors: diffusers' names under
/// `model.diffusion_model.`.
fn write_dit(pipe: &Path, out: &Path) {
    let entries: Vec<Entry> = component_tensors(&pipe.join("transformer"))
        .iter()
        .map(|t| entry(format!("model.diffusion_model.{}", t.name), t))
        .collect();
    safetensors::write(out, &entries).unwrap();
}

/// The text encoder as ComfyUI's qwen_2.5_vl_7b.safetensors: the checkpoint's names, and a
/// vision tower tensor that must be ignored.
fn write_text_encoder(pipe: &Path, out: &Path) {
    let tensors = component_tensors(&pipe.join("text_encoder"));
    let mut entries: Vec<Entry> = tensors.iter().map(|t| entry(t.name.clone(), t)).collect();
    let any = &tensors[0];
    entries.push(entry("visual.blocks.0.attn.qkv.weight", any));
    safetensors::write(out, &entries).unwrap();
}

/// A residual block's diffusers name (after its block's prefix) in Wan's.
fn wan_residual(rest: &str) -> String {
    for (from, to) in [
        ("norm1.", "residual.0."),
        ("conv1.", "residual.2."),
        ("norm2.", "residual.3."),
        ("conv2.", "residual.6."),
        ("conv_shortcut.", "shortcut."),
    ] {
        if let Some(tail) = rest.strip_prefix(from) {
            return format!("{to}{tail}");
        }
    }
    rest.to_string()
}

/// A diffusers AutoencoderKLQwenImage name in the original Wan 2.1 layout.
fn wan_name(name: &str) -> String {
    for (from, to) in [("quant_conv.", "conv1."), ("post_quant_conv.", "conv2.")] {
        if let Some(tail) = name.strip_prefix(from) {
            return format!("{to}{tail}");
        }
    }
    let (coder, rest) = name.split_once('.').unwrap();
    for (from, to) in [
        ("conv_in.", "conv1."),
        ("norm_out.", "head.0."),
        ("conv_out.", "head.2."),
        ("mid_block.attentions.0.", "middle.1."),
    ] {
        if let Some(tail) = rest.strip_prefix(from) {
            return format!("{coder}.{to}{tail}");
        }
    }
    for (i, k) in [(0, 0), (1, 2)] {
        if let Some(tail) = rest.strip_prefix(&format!("mid_block.resnets.{i}.")) {
            return format!("{coder}.middle.{k}.{}", wan_residual(tail));
        }
    }
    if let Some(down) = rest.strip_prefix("down_blocks.") {
        let (k, tail) = down.split_once('.').unwrap();
        return format!("{coder}.downsamples.{k}.{}", wan_residual(tail));
    }
    if let Some(up) = rest.strip_prefix("up_blocks.") {
        let (i, tail) = up.split_once('.').unwrap();
        let level: usize = i.parse().unwrap();
        let first = level * (RES_BLOCKS + 2);
        if let Some(tail) = tail.strip_prefix("upsamplers.0.") {
            return format!("{coder}.upsamples.{}.{tail}", first + RES_BLOCKS + 1);
        }
        let tail = tail.strip_prefix("resnets.").unwrap();
        let (j, tail) = tail.split_once('.').unwrap();
        let j: usize = j.parse().unwrap();
        return format!("{coder}.upsamples.{}.{}", first + j, wan_residual(tail));
    }
    panic!("no Wan name for {name}");
}

/// The VAE as ComfyUI's qwen_image_vae.safetensors: Wan 2.1's names.
fn write_vae(pipe: &Path, out: &Path) {
    let entries: Vec<Entry> = component_tensors(&pipe.join("vae"))
        .iter()
        .map(|t| entry(wan_name(&t.name), t))
        .collect();
    safetensors::write(out, &entries).unwrap();
}

struct Split {
    _tmp: tempfile::TempDir,
    hf_home: PathBuf,
    pipe: PathBuf,
    dit: PathBuf,
    te: PathBuf,
    vae: PathBuf,
}

fn split() -> Split {
    let tmp = tempfile::tempdir().unwrap();
    let pipe = pipeline(tmp.path());
    let dit = tmp.path().join("qwen_image_bf16.safetensors");
    let te = tmp.path().join("qwen_2.5_vl_7b.safetensors");
    let vae = tmp.path().join("qwen_image_vae.safetensors");
    write_dit(&pipe, &dit);
    write_text_encoder(&pipe, &te);
    write_vae(&pipe, &vae);
    Split {
        hf_home: tmp.path().join("no-hf-cache"),
        _tmp: tmp,
        pipe,
        dit,
        te,
        vae,
    }
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

#[test]
fn split_files_give_the_pixels_of_their_pipeline() {
    let f = split();
    let out = f.pipe.parent().unwrap();
    let common = [
        "image",
        "--device",
        "cpu",
        "--prompt",
        "a lighthouse on a cliff at night",
        "--negative-prompt",
        "blurry",
        "--size",
        "64x96",
        "--steps",
        "2",
        "--seed",
        "3",
    ];
    let run = |source: &[String], png: &Path| {
        let mut args: Vec<String> = common.iter().map(|a| a.to_string()).collect();
        args.extend_from_slice(source);
        args.extend(["--out".into(), s(png)]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = ferry(&args, &f.hf_home);
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        read_png(png)
    };
    let (whole, whole_params) = run(&["--model".into(), s(&f.pipe)], &out.join("dir.png"));
    // The tokenizer as the pipeline's folder, its tokenizer/ folder, its tokenizer.json.
    let tok = f.pipe.join("tokenizer");
    for (i, tokenizer) in [f.pipe.clone(), tok.clone(), tok.join("tokenizer.json")]
        .iter()
        .enumerate()
    {
        let args = [
            "--dit".to_string(),
            s(&f.dit),
            "--text-encoder".into(),
            s(&f.te),
            "--vae".into(),
            s(&f.vae),
            "--tokenizer".into(),
            s(tokenizer),
        ];
        let (split, params) = run(&args, &out.join(format!("split-{i}.png")));
        assert_eq!(split.len(), 64 * 96 * 3);
        assert!(
            split == whole,
            "split files ({tokenizer:?}) differ from the directory"
        );
        assert_eq!(
            params.replace("qwen_image_bf16.safetensors", "pipe"),
            whole_params,
            "{params}"
        );
    }
    let (lo, hi) = (whole.iter().min().unwrap(), whole.iter().max().unwrap());
    assert!(hi - lo > 16, "pixel range {lo}..{hi}");
}

#[test]
fn split_files_open_with_the_directorys_configs() {
    use ferry::model::qwen_image::single_file::{open_dit_file, open_vae_file};
    use ferry::model::qwen_image::QwenImageConfig;
    let f = split();
    let (config, component) = open_dit_file(&f.dit).unwrap();
    let path = f.pipe.join("transformer/config.json");
    let json = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(config, QwenImageConfig::from_json(&path, &json).unwrap());
    assert!(component.tensors.contains_key("txt_norm.weight"));
    let vae = open_vae_file(&f.vae).unwrap();
    let want = QwenVaeConfig::from_file(&f.pipe.join("vae/config.json")).unwrap();
    // The file cannot say which encoder levels attend (the decoder never does).
    assert_eq!(
        vae.config,
        QwenVaeConfig {
            attn_scales: vec![],
            ..want
        }
    );
    let dir = ferry::model::qwen_image::vae::open_qwen_vae(&f.pipe.join("vae")).unwrap();
    let names =
        |t: &std::collections::BTreeMap<String, HostTensor>| t.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(&vae.tensors), names(&dir.tensors));
}

#[test]
fn split_file_mistakes_are_named() {
    let f = split();
    let png = f.pipe.parent().unwrap().join("x.png");
    let fail = |dit: &Path, te: &Path, vae: &Path, tok: Option<&Path>, expect: &[&str]| {
        let mut args: Vec<String> = ["image", "--device", "cpu", "--prompt", "a fox"]
            .map(String::from)
            .to_vec();
        args.extend(["--size".into(), "64x64".into(), "--out".into(), s(&png)]);
        args.extend(["--dit".into(), s(dit), "--text-encoder".into(), s(te)]);
        args.extend(["--vae".into(), s(vae)]);
        if let Some(t) = tok {
            args.extend(["--tokenizer".into(), s(t)]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = ferry(&args, &f.hf_home);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        for e in expect {
            assert!(err.contains(e), "{args:?}: expected {e:?} in {err}");
        }
        assert!(!err.contains("panicked"), "{err}");
        assert!(!png.exists(), "no PNG after an error");
    };
    let tok = f.pipe.join("tokenizer");
    // The text encoder as the DiT: neither model's DiT.
    fail(
        &f.te,
        &f.te,
        &f.vae,
        Some(&tok),
        &[
            "qwen_2.5_vl_7b.safetensors",
            "txt_norm.weight",
            "cap_embedder.1.weight",
        ],
    );
    // The DiT as the text encoder, the DiT as the VAE.
    fail(
        &f.dit,
        &f.dit,
        &f.vae,
        Some(&tok),
        &["qwen_image_bf16.safetensors", "model.embed_tokens.weight"],
    );
    fail(
        &f.dit,
        &f.te,
        &f.dit,
        Some(&tok),
        &[
            "qwen_image_bf16.safetensors",
            "decoder.middle.0.residual.0.gamma",
        ],
    );
    // No tokenizer given and none in the (empty) Hugging Face cache.
    fail(
        &f.dit,
        &f.te,
        &f.vae,
        None,
        &["--tokenizer", "Qwen/Qwen-Image"],
    );
    // A DiT whose heads Qwen-Image's RoPE cannot be scaled to: the q norm of 16.
    let odd = f.pipe.parent().unwrap().join("odd.safetensors");
    let mut entries: Vec<Entry> = component_tensors(&f.pipe.join("transformer"))
        .iter()
        .filter(|t| !t.name.contains("norm_q") && !t.name.contains("norm_k"))
        .map(|t| entry(t.name.clone(), t))
        .collect();
    let bytes: Vec<u8> = (0..16).flat_map(|_| 1f32.to_le_bytes()).collect();
    entries.push((
        "transformer_blocks.0.attn.norm_q.weight".into(),
        DType::F32,
        vec![16],
        bytes,
    ));
    safetensors::write(&odd, &entries).unwrap();
    fail(
        &odd,
        &f.te,
        &f.vae,
        Some(&tok),
        &["odd.safetensors", "head size 16", "multiple of 32"],
    );
}
