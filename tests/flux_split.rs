//! `ferry image` on Flux.1's split files as ComfyUI users have them (`--dit`,
//! `--text-encoder`, `--text-encoder-2`, `--vae`, `--tokenizer`): a diffusers pipeline
//! rewritten here into the four files (the DiT in Black Forest Labs' names under
//! `model.diffusion_model.` with q/k/v and the single blocks' linear1 fused and the final
//! modulation's halves in BFL's order: the inverse of diffusers'
//! `convert_flux_transformer_checkpoint_to_diffusers`; CLIP under `text_model.`; T5 as
//! `T5EncoderModel` saves it; the VAE in BFL's names) gives the pixels of the directory it
//! came from; and the split files' mistakes are refused naming the file.
//!
//! The pipeline is tests/fixtures/flux-pipeline's tokenizers, T5 and scheduler, with what a
//! file without a config can be read as: a random DiT with heads of 32 (Flux.1's RoPE axes
//! scale from its 128), a random CLIP with heads of 64 (every CLIP text model's), and a
//! random VAE of 32 GroupNorm groups (Flux's; the count is not in the shapes).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::read_png;
use ferry::checkpoint::{safetensors, DType, HostTensor};
use ferry::model::clip::{ClipText, ClipTextConfig};
use ferry::model::vae::bfl_name;
use ferry::model::Architecture;
use ferry::synth::{
    random_component, write_dit, write_pipeline, DitPreset, PipelineComponent, PipelineModels,
    PipelinePreset, WriteOptions,
};
use serde_json::json;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/flux-pipeline")
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
        if entry.path().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

type Entry = (String, DType, Vec<usize>, Vec<u8>);

fn entry(name: impl Into<String>, t: &HostTensor) -> Entry {
    (name.into(), t.dtype, t.shape.clone(), t.bytes().to_vec())
}

/// Every tensor of a component folder's safetensors files (one or shards), by name.
fn component_tensors(dir: &Path) -> BTreeMap<String, HostTensor> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            out.extend(
                safetensors::read(&p)
                    .unwrap()
                    .into_iter()
                    .map(|t| (t.name.clone(), t)),
            );
        }
    }
    out
}

/// The CLIP of the pipeline: the fixture's vocabulary and positions, one head of 64.
const CLIP_HIDDEN: usize = 64;

/// The test pipeline, in `dir`.
fn pipeline(dir: &Path) -> PathBuf {
    let pipe = dir.join("pipe");
    for c in ["tokenizer", "tokenizer_2", "text_encoder_2", "scheduler"] {
        copy_dir(&fixture().join(c), &pipe.join(c));
    }
    std::fs::copy(
        fixture().join("model_index.json"),
        pipe.join("model_index.json"),
    )
    .unwrap();

    // The DiT: heads of 32, the fixture's T5 width, the CLIP's below.
    let preset = DitPreset::by_name("flux-tiny")
        .unwrap()
        .with("attention_head_dim", json!(32))
        .with("axes_dims_rope", json!([4, 14, 14]))
        .with("in_channels", json!(64))
        .with("joint_attention_dim", json!(32))
        .with("pooled_projection_dim", json!(CLIP_HIDDEN));
    let opts = WriteOptions {
        seed: 7,
        ..WriteOptions::default()
    };
    write_dit(&preset, &dir.join("dit"), &opts, false).unwrap();
    copy_dir(&dir.join("dit/transformer"), &pipe.join("transformer"));

    // CLIP: random weights, saved as transformers 5 saves CLIPTextModel (no prefix).
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture().join("text_encoder/config.json")).unwrap())
            .unwrap();
    let mut config = config;
    config["hidden_size"] = json!(CLIP_HIDDEN);
    config["projection_dim"] = json!(CLIP_HIDDEN);
    config["num_attention_heads"] = json!(1);
    config["intermediate_size"] = json!(96);
    let path = pipe.join("text_encoder/config.json");
    let clip = ClipText::new(ClipTextConfig::from_json(&path, &config).unwrap(), "");
    let c = random_component(
        "text_encoder",
        "CLIPTextModel",
        config.clone(),
        clip.groups(),
        9,
    );
    std::fs::create_dir_all(pipe.join("text_encoder")).unwrap();
    std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    let entries: Vec<Entry> = c
        .tensors
        .values()
        .map(|t| entry(t.name.clone(), t))
        .collect();
    safetensors::write(&pipe.join("text_encoder/model.safetensors"), &entries).unwrap();

    // The VAE: Flux's (z-image-tiny's) with 32 groups.
    let mut preset = PipelinePreset::by_name("z-image-tiny").unwrap();
    let PipelineModels::ZImage(z) = &mut preset.models else {
        panic!("z-image-tiny is a Z-Image pipeline");
    };
    z.vae.block_out_channels = vec![32, 32, 32, 32];
    z.vae.norm_num_groups = 32;
    let synth = dir.join("synth");
    write_pipeline(&preset, &synth, &[PipelineComponent::Vae], &opts).unwrap();
    copy_dir(&synth.join("vae"), &pipe.join("vae"));
    pipe
}

/// The DiT's diffusers tensors `d` in BFL's names (as flux1-dev.safetensors has them) behind
/// `prefix`: the inverse of diffusers' converter. Every tensor of `d` is used.
fn bfl_dit(d: &BTreeMap<String, HostTensor>, prefix: &str) -> Vec<Entry> {
    let mut used = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    let mut put = |bfl: String, parts: &[String], swap: bool| {
        if !d.contains_key(&parts[0]) {
            return;
        }
        let ts: Vec<&HostTensor> = parts.iter().map(|p| &d[p]).collect();
        used.extend(parts.iter().cloned());
        let mut shape = ts[0].shape.clone();
        shape[0] = ts.iter().map(|t| t.shape[0]).sum();
        let mut bytes: Vec<u8> = ts.iter().flat_map(|t| t.bytes().to_vec()).collect();
        if swap {
            // diffusers: scale, shift; BFL: shift, scale.
            let half = bytes.len() / 2;
            bytes.rotate_left(half);
        }
        out.push((format!("{prefix}{bfl}"), ts[0].dtype, shape, bytes));
    };
    let count = |f: &dyn Fn(usize) -> String| (0..).take_while(|&i| d.contains_key(&f(i))).count();
    let doubles = count(&|i| format!("transformer_blocks.{i}.norm1.linear.weight"));
    let singles = count(&|i| format!("single_transformer_blocks.{i}.norm.linear.weight"));
    for leaf in ["weight", "bias"] {
        for (bfl, diffusers) in [
            ("img_in", "x_embedder"),
            ("txt_in", "context_embedder"),
            (
                "time_in.in_layer",
                "time_text_embed.timestep_embedder.linear_1",
            ),
            (
                "time_in.out_layer",
                "time_text_embed.timestep_embedder.linear_2",
            ),
            (
                "vector_in.in_layer",
                "time_text_embed.text_embedder.linear_1",
            ),
            (
                "vector_in.out_layer",
                "time_text_embed.text_embedder.linear_2",
            ),
            (
                "guidance_in.in_layer",
                "time_text_embed.guidance_embedder.linear_1",
            ),
            (
                "guidance_in.out_layer",
                "time_text_embed.guidance_embedder.linear_2",
            ),
            ("final_layer.linear", "proj_out"),
        ] {
            put(
                format!("{bfl}.{leaf}"),
                &[format!("{diffusers}.{leaf}")],
                false,
            );
        }
        put(
            format!("final_layer.adaLN_modulation.1.{leaf}"),
            &[format!("norm_out.linear.{leaf}")],
            true,
        );
        for i in 0..doubles {
            let (b, t) = (
                format!("double_blocks.{i}."),
                format!("transformer_blocks.{i}."),
            );
            for (bfl, diffusers) in [
                ("img_mod.lin", "norm1.linear"),
                ("txt_mod.lin", "norm1_context.linear"),
                ("img_attn.proj", "attn.to_out.0"),
                ("txt_attn.proj", "attn.to_add_out"),
                ("img_mlp.0", "ff.net.0.proj"),
                ("img_mlp.2", "ff.net.2"),
                ("txt_mlp.0", "ff_context.net.0.proj"),
                ("txt_mlp.2", "ff_context.net.2"),
            ] {
                put(
                    format!("{b}{bfl}.{leaf}"),
                    &[format!("{t}{diffusers}.{leaf}")],
                    false,
                );
            }
            let qkv = |names: [&str; 3]| names.map(|n| format!("{t}attn.{n}.{leaf}"));
            put(
                format!("{b}img_attn.qkv.{leaf}"),
                &qkv(["to_q", "to_k", "to_v"]),
                false,
            );
            put(
                format!("{b}txt_attn.qkv.{leaf}"),
                &qkv(["add_q_proj", "add_k_proj", "add_v_proj"]),
                false,
            );
        }
        for i in 0..singles {
            let (b, t) = (
                format!("single_blocks.{i}."),
                format!("single_transformer_blocks.{i}."),
            );
            put(
                format!("{b}modulation.lin.{leaf}"),
                &[format!("{t}norm.linear.{leaf}")],
                false,
            );
            put(
                format!("{b}linear2.{leaf}"),
                &[format!("{t}proj_out.{leaf}")],
                false,
            );
            let parts = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"];
            put(
                format!("{b}linear1.{leaf}"),
                &parts.map(|p| format!("{t}{p}.{leaf}")),
                false,
            );
        }
    }
    for i in 0..doubles {
        let (b, t) = (
            format!("double_blocks.{i}."),
            format!("transformer_blocks.{i}.attn."),
        );
        for (bfl, diffusers) in [
            ("img_attn.norm.query_norm", "norm_q"),
            ("img_attn.norm.key_norm", "norm_k"),
            ("txt_attn.norm.query_norm", "norm_added_q"),
            ("txt_attn.norm.key_norm", "norm_added_k"),
        ] {
            put(
                format!("{b}{bfl}.scale"),
                &[format!("{t}{diffusers}.weight")],
                false,
            );
        }
    }
    for i in 0..singles {
        let (b, t) = (
            format!("single_blocks.{i}.norm."),
            format!("single_transformer_blocks.{i}.attn."),
        );
        put(
            format!("{b}query_norm.scale"),
            &[format!("{t}norm_q.weight")],
            false,
        );
        put(
            format!("{b}key_norm.scale"),
            &[format!("{t}norm_k.weight")],
            false,
        );
    }
    let unused: Vec<&String> = d.keys().filter(|k| !used.contains(*k)).collect();
    assert!(unused.is_empty(), "no BFL name for {unused:?}");
    out
}

/// The VAE as ae.safetensors: BFL's names, the attention's linears as 1×1 convolutions.
fn bfl_vae(pipe: &Path, out: &Path) {
    let entries: Vec<Entry> = component_tensors(&pipe.join("vae"))
        .values()
        .map(|t| {
            let name = bfl_name(&t.name, 4);
            let mut e = entry(name.clone(), t);
            if name.starts_with("decoder.mid.attn_1.") && e.2.len() == 2 {
                e.2.extend([1, 1]);
            }
            e
        })
        .collect();
    safetensors::write(out, &entries).unwrap();
}

struct Split {
    tmp: tempfile::TempDir,
    hf_home: PathBuf,
    pipe: PathBuf,
    dit: PathBuf,
    clip: PathBuf,
    t5: PathBuf,
    vae: PathBuf,
}

fn split() -> Split {
    let tmp = tempfile::tempdir().unwrap();
    let pipe = pipeline(tmp.path());
    let file = |n: &str| tmp.path().join(n);
    let (dit, clip, t5, vae) = (
        file("flux1-dev.safetensors"),
        file("clip_l.safetensors"),
        file("t5xxl_fp16.safetensors"),
        file("ae.safetensors"),
    );
    let transformer = component_tensors(&pipe.join("transformer"));
    let mut entries = bfl_dit(&transformer, "model.diffusion_model.");
    // Another model's tensor in the same file is left alone.
    let any = transformer.values().next().unwrap();
    entries.push(entry("first_stage_model.decoder.conv_in.weight", any));
    safetensors::write(&dit, &entries).unwrap();
    let entries: Vec<Entry> = component_tensors(&pipe.join("text_encoder"))
        .values()
        .map(|t| entry(format!("text_model.{}", t.name), t))
        .collect();
    safetensors::write(&clip, &entries).unwrap();
    let entries: Vec<Entry> = component_tensors(&pipe.join("text_encoder_2"))
        .values()
        .map(|t| entry(t.name.clone(), t))
        .collect();
    safetensors::write(&t5, &entries).unwrap();
    bfl_vae(&pipe, &vae);
    Split {
        hf_home: tmp.path().join("no-hf-cache"),
        tmp,
        pipe,
        dit,
        clip,
        t5,
        vae,
    }
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

#[test]
fn split_files_give_the_pixels_of_their_pipeline() {
    let f = split();
    let out = f.tmp.path();
    let common = [
        "image",
        "--device",
        "cpu",
        "--prompt",
        "a lighthouse on a cliff at night",
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
    // The DiT also in diffusers' names, one file, no prefix.
    let diffusers_dit = out.join("flux1-dev-diffusers.safetensors");
    let entries: Vec<Entry> = component_tensors(&f.pipe.join("transformer"))
        .values()
        .map(|t| entry(t.name.clone(), t))
        .collect();
    safetensors::write(&diffusers_dit, &entries).unwrap();
    for dit in [&f.dit, &diffusers_dit] {
        let args = [
            "--dit",
            &s(dit),
            "--text-encoder",
            &s(&f.clip),
            "--text-encoder-2",
            &s(&f.t5),
            "--vae",
            &s(&f.vae),
            "--tokenizer",
            &s(&f.pipe),
        ]
        .map(String::from);
        let name = dit.file_name().unwrap().to_str().unwrap();
        let (split, params) = run(&args, &out.join(format!("{name}.png")));
        assert_eq!(split.len(), 64 * 96 * 3);
        assert!(
            split == whole,
            "split files ({name}) differ from the directory"
        );
        assert_eq!(params.replace(name, "pipe"), whole_params, "{params}");
    }
    let (lo, hi) = (whole.iter().min().unwrap(), whole.iter().max().unwrap());
    assert!(hi - lo > 16, "pixel range {lo}..{hi}");
}

#[test]
fn split_dit_opens_with_the_directorys_config() {
    use ferry::model::flux::single_file::open_dit_file;
    use ferry::model::flux::FluxConfig;
    let f = split();
    let (config, component) = open_dit_file(&f.dit).unwrap();
    let path = f.pipe.join("transformer/config.json");
    let json = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(config, FluxConfig::from_json(&path, &json).unwrap());
    // Every diffusers tensor, with the bytes of the directory's (norm_out's as converted).
    let dir = component_tensors(&f.pipe.join("transformer"));
    let names = |t: &BTreeMap<String, HostTensor>| t.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(&component.tensors), names(&dir));
    for (name, t) in &dir {
        assert!(component.tensors[name].bytes() == t.bytes(), "{name}");
    }
}

#[test]
fn split_file_mistakes_are_named() {
    let f = split();
    let png = f.tmp.path().join("x.png");
    let fail = |files: [Option<&Path>; 5], expect: &[&str]| {
        let mut args: Vec<String> = ["image", "--device", "cpu", "--prompt", "a fox"]
            .map(String::from)
            .to_vec();
        args.extend(["--size".into(), "64x64".into(), "--out".into(), s(&png)]);
        let flags = [
            "--dit",
            "--text-encoder",
            "--text-encoder-2",
            "--vae",
            "--tokenizer",
        ];
        for (flag, file) in flags.iter().zip(files) {
            if let Some(file) = file {
                args.extend([flag.to_string(), s(file)]);
            }
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
    let (dit, clip, t5, vae, tok) = (
        Some(f.dit.as_path()),
        Some(f.clip.as_path()),
        Some(f.t5.as_path()),
        Some(f.vae.as_path()),
        Some(f.pipe.as_path()),
    );
    // CLIP's file as the DiT: no model's DiT.
    fail(
        [clip, clip, t5, vae, tok],
        &[
            "clip_l.safetensors",
            "unknown diffusion model",
            "double_blocks.0.img_attn.qkv.weight",
        ],
    );
    // The DiT, or T5, as CLIP.
    fail(
        [dit, dit, t5, vae, tok],
        &[
            "flux1-dev.safetensors",
            "text_model.embeddings.token_embedding.weight",
        ],
    );
    fail(
        [dit, t5, t5, vae, tok],
        &[
            "t5xxl_fp16.safetensors",
            "text_model.embeddings.token_embedding.weight",
        ],
    );
    // CLIP as T5.
    fail(
        [dit, clip, clip, vae, tok],
        &["clip_l.safetensors", "shared.weight"],
    );
    // The DiT as the VAE.
    fail(
        [dit, clip, t5, dit, tok],
        &["flux1-dev.safetensors", "decoder"],
    );
    // No T5 for a Flux DiT.
    fail(
        [dit, clip, None, vae, tok],
        &["--text-encoder-2", "flux1-dev.safetensors", "t5xxl"],
    );
    // No tokenizer given, none in the (empty) cache; a folder without tokenizer_2/.
    fail(
        [dit, clip, t5, vae, None],
        &["--tokenizer", "black-forest-labs/FLUX.1-dev"],
    );
    let lone = f.pipe.join("tokenizer");
    fail(
        [dit, clip, t5, vae, Some(&lone)],
        &["tokenizer_2", "--tokenizer"],
    );
    // The fixture's own DiT in one file: heads of 16, which the RoPE rule cannot scale to.
    let odd = f.tmp.path().join("odd.safetensors");
    let entries: Vec<Entry> = component_tensors(&fixture().join("transformer"))
        .values()
        .map(|t| entry(t.name.clone(), t))
        .collect();
    safetensors::write(&odd, &entries).unwrap();
    fail(
        [Some(&odd), clip, t5, vae, tok],
        &["odd.safetensors", "head size 16", "multiple of 32"],
    );
}

#[test]
fn split_schedulers_are_flux_dev_and_schnell() {
    use ferry::diffuse::scheduler::FlowMatchConfig;
    let path = fixture().join("scheduler/scheduler_config.json");
    let dev = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(
        FlowMatchConfig::from_json(&path, &dev).unwrap(),
        FlowMatchConfig::flux_dev()
    );
    // black-forest-labs/FLUX.1-schnell's scheduler/scheduler_config.json.
    let schnell = json!({
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "base_image_seq_len": 256,
        "base_shift": 0.5,
        "max_image_seq_len": 4096,
        "max_shift": 1.15,
        "num_train_timesteps": 1000,
        "shift": 1.0,
        "use_dynamic_shifting": false,
    });
    assert_eq!(
        FlowMatchConfig::from_json(&path, &schnell).unwrap(),
        FlowMatchConfig::flux_schnell()
    );
}

#[test]
fn a_second_text_encoder_is_only_for_flux() {
    let f = split();
    // A Qwen-Image DiT as far as its names tell.
    let qwen = f.tmp.path().join("qwen_image_bf16.safetensors");
    let any = component_tensors(&f.pipe.join("transformer"))
        .into_values()
        .next()
        .unwrap();
    let entries = vec![entry("txt_norm.weight", &any), entry("img_in.weight", &any)];
    safetensors::write(&qwen, &entries).unwrap();
    let args = [
        "image",
        "--device",
        "cpu",
        "--prompt",
        "a fox",
        "--size",
        "64x64",
        "--out",
        &s(&f.tmp.path().join("x.png")),
        "--dit",
        &s(&qwen),
        "--text-encoder",
        &s(&f.clip),
        "--text-encoder-2",
        &s(&f.t5),
        "--vae",
        &s(&f.vae),
    ];
    let o = ferry(&args, &f.hf_home);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    for e in [
        "--text-encoder-2",
        "t5xxl_fp16.safetensors",
        "qwen_image_bf16.safetensors",
    ] {
        assert!(err.contains(e), "expected {e:?} in {err}");
    }
}
