//! `ferry image` on ComfyUI's split files (`--dit`, `--text-encoder`, `--vae`, `--tokenizer`):
//! a diffusers pipeline rewritten here into the three files in ComfyUI's layouts (the inverse
//! of ferry's name mapping: Z-Image's original names with q/k/v fused, transformers' names
//! under `model.`, BFL's VAE names with 1×1-conv attention) gives the same pixels as the
//! directory it came from; and files of an unknown layout are refused naming the file and a
//! tensor each layout has.
//!
//! The DiT, text encoder, tokenizer and scheduler are tests/fixtures/z-image's. Its VAE has 4
//! GroupNorm groups, which a split file cannot say (the count is not in the shapes; Flux's
//! VAE and ComfyUI use 32), so the pipeline gets a random VAE of 32 groups from `ferry synth`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::read_png;
use ferry::checkpoint::{safetensors, DType, HostTensor};
use ferry::model::vae::bfl_name;
use ferry::synth::{
    write_pipeline, PipelineComponent, PipelineModels, PipelinePreset, WriteOptions,
};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/z-image")
}

fn ferry(args: &[&str], hf_home: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .env("HF_HOME", hf_home)
        .output()
        .expect("ferry runs")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

type Entry = (String, DType, Vec<usize>, Vec<u8>);

fn entry(name: impl Into<String>, t: &HostTensor, shape: Vec<usize>) -> Entry {
    (name.into(), t.dtype, shape, t.bytes().to_vec())
}

/// The fixture's pipeline with a 32-group VAE, in `dir`.
fn pipeline(dir: &Path) -> PathBuf {
    let pipe = dir.join("pipe");
    for c in ["transformer", "text_encoder", "tokenizer", "scheduler"] {
        copy_dir(&fixture().join(c), &pipe.join(c));
    }
    std::fs::copy(
        fixture().join("model_index.json"),
        pipe.join("model_index.json"),
    )
    .unwrap();
    let mut preset = PipelinePreset::by_name("z-image-tiny").unwrap();
    let PipelineModels::ZImage(z) = &mut preset.models else {
        panic!("z-image-tiny is a Z-Image pipeline");
    };
    z.vae.block_out_channels = vec![32, 32, 32, 32];
    z.vae.norm_num_groups = 32;
    let synth = dir.join("synth");
    let opts = WriteOptions {
        seed: 11,
        ..WriteOptions::default()
    };
    write_pipeline(&preset, &synth, &[PipelineComponent::Vae], &opts).unwrap();
    copy_dir(&synth.join("vae"), &pipe.join("vae"));
    pipe
}

/// Every tensor of a component folder's safetensors files (one or shards).
fn component_tensors(dir: &Path) -> Vec<HostTensor> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    files
        .iter()
        .flat_map(|f| safetensors::read(f).unwrap())
        .collect()
}

/// The DiT in Z-Image's original names behind `model.diffusion_model.` (as diffusers'
/// converter reads them): q, k, v fused by rows into `qkv`, `out`, `q_norm`/`k_norm`, the
/// unprefixed embedder and final layer, and the unused `norm_final`.
fn write_dit(pipe: &Path, out: &Path) {
    let tensors = component_tensors(&pipe.join("transformer"));
    let by_name = |n: &str| tensors.iter().find(|t| t.name == n).unwrap();
    let mut entries: Vec<Entry> = Vec::new();
    let prefix = "model.diffusion_model.";
    for t in &tensors {
        let n = t.name.as_str();
        if n.contains(".attention.to_k.") || n.contains(".attention.to_v.") {
            continue; // fused into qkv with to_q
        }
        if let Some(block) = n.strip_suffix(".attention.to_q.weight") {
            let mut bytes = Vec::new();
            for p in ["to_q", "to_k", "to_v"] {
                bytes.extend_from_slice(by_name(&format!("{block}.attention.{p}.weight")).bytes());
            }
            let shape = vec![3 * t.shape[0], t.shape[1]];
            entries.push((
                format!("{prefix}{block}.attention.qkv.weight"),
                t.dtype,
                shape,
                bytes,
            ));
            continue;
        }
        let original = n
            .replace("all_x_embedder.2-1.", "x_embedder.")
            .replace("all_final_layer.2-1.", "final_layer.")
            .replace(".attention.to_out.0.", ".attention.out.")
            .replace(".attention.norm_q.", ".attention.q_norm.")
            .replace(".attention.norm_k.", ".attention.k_norm.");
        entries.push(entry(format!("{prefix}{original}"), t, t.shape.clone()));
    }
    let dim = by_name("cap_embedder.1.weight").shape[0];
    let ones: Vec<u8> = (0..dim).flat_map(|_| 1f32.to_le_bytes()).collect();
    entries.push((
        format!("{prefix}norm_final.weight"),
        DType::F32,
        vec![dim],
        ones,
    ));
    safetensors::write(out, &entries).unwrap();
}

/// The text encoder in transformers' `Qwen3ForCausalLM` names (`model.` before each).
fn write_text_encoder(pipe: &Path, out: &Path) {
    let entries: Vec<Entry> = component_tensors(&pipe.join("text_encoder"))
        .iter()
        .map(|t| entry(format!("model.{}", t.name), t, t.shape.clone()))
        .collect();
    safetensors::write(out, &entries).unwrap();
}

/// The VAE in BFL's names (`decoder.up.{3 - i}` for diffusers' `up_blocks.{i}`), its mid
/// attention's projections as 1×1 convs; the encoder's tensors as they are (not read).
fn write_vae(pipe: &Path, out: &Path) {
    let entries: Vec<Entry> = component_tensors(&pipe.join("vae"))
        .iter()
        .map(|t| {
            let name = bfl_name(&t.name, 4);
            let mut shape = t.shape.clone();
            if name.starts_with("decoder.mid.attn_1.") && shape.len() == 2 {
                shape.extend([1, 1]);
            }
            entry(name, t, shape)
        })
        .collect();
    safetensors::write(out, &entries).unwrap();
}

#[test]
fn split_files_give_the_pixels_of_their_pipeline() {
    let tmp = tempfile::tempdir().unwrap();
    let hf_home = tmp.path().join("no-hf-cache");
    let pipe = pipeline(tmp.path());
    let (dit, te, vae) = (
        tmp.path().join("z_image_turbo_bf16.safetensors"),
        tmp.path().join("qwen_3_4b.safetensors"),
        tmp.path().join("ae.safetensors"),
    );
    write_dit(&pipe, &dit);
    write_text_encoder(&pipe, &te);
    write_vae(&pipe, &vae);
    // A tokenizer.json alone (no tokenizer_config.json): Qwen3's template is built in.
    let lone = tmp.path().join("lone");
    std::fs::create_dir(&lone).unwrap();
    std::fs::copy(
        pipe.join("tokenizer/tokenizer.json"),
        lone.join("tokenizer.json"),
    )
    .unwrap();

    let common = [
        "image",
        "--device",
        "cpu",
        "--prompt",
        "a red fox in the snow, photo",
        "--size",
        "64x48",
        "--steps",
        "3",
        "--seed",
        "7",
    ];
    let run = |source: &[&str], out: &Path| {
        let mut args = common.to_vec();
        args.extend_from_slice(source);
        args.extend(["--out", out.to_str().unwrap()]);
        let o = ferry(&args, &hf_home);
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        read_png(out)
    };
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (whole, whole_params) = run(&["--model", &s(&pipe)], &tmp.path().join("dir.png"));
    let split_args = |tokenizer: &Path| {
        vec![
            "--dit".to_string(),
            s(&dit),
            "--text-encoder".into(),
            s(&te),
            "--vae".into(),
            s(&vae),
            "--tokenizer".into(),
            s(tokenizer),
        ]
    };
    for (i, tokenizer) in [pipe.join("tokenizer"), lone.join("tokenizer.json")]
        .iter()
        .enumerate()
    {
        let args = split_args(tokenizer);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (split, params) = run(&args, &tmp.path().join(format!("split-{i}.png")));
        assert_eq!(split.len(), 64 * 48 * 3);
        assert!(
            split == whole,
            "split files ({tokenizer:?}) differ from the directory"
        );
        // The same parameters but the model's name (the directory's, the DiT file's).
        assert_eq!(
            params.replace("z_image_turbo_bf16.safetensors", "pipe"),
            whole_params,
            "{params}"
        );
    }
    // A real image, not a flat one.
    let (lo, hi) = (whole.iter().min().unwrap(), whole.iter().max().unwrap());
    assert!(hi - lo > 16, "pixel range {lo}..{hi}");
}

#[test]
fn split_files_of_unknown_layout_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let hf_home = tmp.path().join("no-hf-cache");
    let pipe = fixture();
    let te = tmp.path().join("te.safetensors");
    write_text_encoder(&pipe, &te);
    // A DiT with the caption embedder but neither layout's attention.
    let odd = tmp.path().join("odd.safetensors");
    let cap = component_tensors(&pipe.join("transformer"))
        .into_iter()
        .find(|t| t.name == "cap_embedder.1.weight")
        .unwrap();
    safetensors::write(
        &odd,
        &[entry("cap_embedder.1.weight", &cap, cap.shape.clone())],
    )
    .unwrap();
    let out = tmp.path().join("x.png");
    let tok = pipe.join("tokenizer");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let fail = |dit: &Path, te_: &Path, vae: &Path, tokenizer: Option<&Path>, expect: &[&str]| {
        let mut args: Vec<String> = ["image", "--device", "cpu", "--prompt", "a fox", "--size"]
            .map(String::from)
            .to_vec();
        args.extend(["64x48".into(), "--out".into(), s(&out)]);
        args.extend(["--dit".into(), s(dit), "--text-encoder".into(), s(te_)]);
        args.extend(["--vae".into(), s(vae)]);
        if let Some(t) = tokenizer {
            args.extend(["--tokenizer".into(), s(t)]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = ferry(&args, &hf_home);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        for e in expect {
            assert!(err.contains(e), "{args:?}: expected {e:?} in {err}");
        }
        assert!(!err.contains("panicked"), "{err}");
        assert!(!out.exists(), "no PNG after an error");
    };
    // The text encoder given as the DiT, as the VAE; the DiT as the text encoder.
    fail(
        &te,
        &te,
        &te,
        Some(&tok),
        &["te.safetensors", "cap_embedder.1.weight"],
    );
    fail(
        &odd,
        &te,
        &te,
        Some(&tok),
        &[
            "odd.safetensors",
            "unknown layout",
            "attention.qkv.weight",
            "attention.to_q.weight",
        ],
    );
    fail(
        &odd,
        &odd,
        &te,
        Some(&tok),
        &["odd.safetensors", "model.embed_tokens.weight"],
    );
    let dit = tmp.path().join("dit.safetensors");
    write_dit(&pipe, &dit);
    fail(
        &dit,
        &te,
        &te,
        Some(&tok),
        &["te.safetensors", "decoder.conv_in.weight"],
    );
    // No tokenizer given and none in the (empty) Hugging Face cache.
    fail(
        &dit,
        &te,
        &te,
        None,
        &["--tokenizer", "Tongyi-MAI/Z-Image-Turbo"],
    );
    // Split files come whole, and not with --model.
    let dit_only = ["image", "--prompt", "a fox", "--dit", &s(&dit)];
    let o = ferry(&dit_only, &hf_home);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--vae"), "{err}");
    let both = [
        "image",
        "--prompt",
        "a fox",
        "--model",
        &s(&pipe),
        "--dit",
        &s(&dit),
    ];
    let o = ferry(&both, &hf_home);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--model"), "{err}");
}

/// A DiT saved by diffusers as one file (its own names) opens as it is, with the config its
/// directory has (but `axes_lens`, which the file cannot say: Z-Image's are taken).
#[test]
fn a_diffusers_dit_file_opens_as_it_is() {
    use ferry::model::z_image::{open_dit_file, ZImageConfig};
    let dir = fixture().join("transformer");
    let (config, component) =
        open_dit_file(&dir.join("diffusion_pytorch_model.safetensors")).unwrap();
    let path = dir.join("config.json");
    let json = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let mut want = ZImageConfig::from_json(&path, &json).unwrap();
    assert_eq!(config.axes_lens, [1536, 512, 512]);
    want.axes_lens = config.axes_lens.clone();
    assert_eq!(config, want);
    assert!(component
        .tensors
        .contains_key("layers.0.attention.to_q.weight"));
}
