//! `ferry synth`, `ferry info` and `ferry bench` for Qwen-Image: the DiT alone (the tiny
//! preset writes the tensors diffusers wrote for the fixture, in a directory that `ferry info`
//! describes and `ferry bench` times; the qwen-image preset has the real shapes, checked
//! without writing its 41 GB), and the whole pipeline (the tiny one opens with every reader
//! ferry has and runs on the CPU; its VAE is the state dict diffusers makes; the real one
//! has Qwen-Image's shapes, checked without writing its 56 GB); bad input is a one-line
//! error.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::{ferry, stdout_of as ok};

use ferry::backend::cpu::Cpu;
use ferry::backend::Backend;
use ferry::checkpoint::{safetensors, DType, Pipeline};
use ferry::diffuse::qwen_text_encoder::{
    text_config, QwenImageTextEncoder, PROMPT_TEMPLATE, TEMPLATE_START,
};
use ferry::diffuse::scheduler::FlowMatchConfig;
use ferry::generate::TextCodec;
use ferry::model::qwen_image::vae::{open_qwen_vae, QwenVae, QwenVaeConfig};
use ferry::model::qwen_image::{
    pack_latents, unpack_latents, DitInput, QwenImage, QwenImageConfig,
};
use ferry::model::vae::Tiling;
use ferry::model::{Architecture, LlamaConfig, ResidentWeights};
use ferry::synth::{
    qwen_vae_tensors, DitPreset, PipelineComponent, PipelineModels, PipelinePreset, Preset,
    SynthPreset,
};

use PipelineComponent::{Scheduler, TextEncoder, Tokenizer, Transformer, Vae};

/// The one-line error of a failed run.
fn err(out: &Output) -> String {
    assert!(!out.status.success(), "expected a failure");
    let e = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(e.lines().count(), 1, "{e}");
    e
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// (name, shape) of every tensor in the safetensors files of `dir`, sorted by name.
fn stored_tensors(dir: &Path) -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            for t in safetensors::read(&path).unwrap() {
                out.push((t.name.clone(), t.shape.clone()));
            }
        }
    }
    out.sort();
    out
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferry-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn tiny_preset_is_the_fixtures_shape_and_benches() {
    let dir = scratch("qwen-image-tiny");
    let d = dir.to_str().unwrap();
    ok(&ferry(&[
        "synth",
        "--preset",
        "qwen-image-tiny",
        "--out",
        d,
        "--seed",
        "3",
    ]));
    let index = read_json(&dir.join("model_index.json"));
    assert_eq!(index["_class_name"], "QwenImagePipeline");
    assert_eq!(
        index["transformer"],
        serde_json::json!(["diffusers", "QwenImageTransformer2DModel"])
    );
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen-image");
    assert_eq!(
        stored_tensors(&dir.join("transformer")),
        stored_tensors(&fixture.join("transformer"))
    );
    // The config says what diffusers' does, field for field (plus what wrote it).
    let config = read_json(&dir.join("transformer/config.json"));
    let theirs = read_json(&fixture.join("transformer/config.json"));
    for (k, v) in theirs.as_object().unwrap() {
        if !["zero_cond_t", "use_additional_t_cond", "use_layer3d_rope"].contains(&k.as_str()) {
            assert_eq!(&config[k], v, "{k}");
        }
    }

    // Described with the DiT's groups.
    let info = ok(&ferry(&["info", "--model", d]));
    assert!(
        info.contains("QwenImagePipeline")
            && info.contains("embedders")
            && info.contains("block 1")
            && info.contains("final layer"),
        "{info}"
    );

    // Timed from the directory and from memory, on the CPU, at a non-square size.
    for source in [vec!["--model", d], vec!["--synthetic", "qwen-image-tiny"]] {
        let mut args = vec!["bench", "--device", "cpu", "--size", "80x48"];
        args.extend(&source);
        args.extend([
            "--caption-tokens",
            "7",
            "--batch",
            "1,2",
            "--runs",
            "1",
            "--warmup",
            "0",
            "--json",
            "-",
        ]);
        let out: serde_json::Value = serde_json::from_str(&ok(&ferry(&args))).unwrap();
        let results = out["results"].as_array().unwrap();
        assert_eq!(results.len(), 2, "{out}");
        assert!(results.iter().all(|r| r["step_s"].as_f64().unwrap() > 0.0));
        // The modulation made once before the steps, by default.
        assert_eq!(out["modulation"], "precomputed", "{out}");
        assert!(out["modulation_precompute_s"].as_f64().unwrap() > 0.0);
    }
    let mut args = vec!["bench", "--device", "cpu", "--size", "32x32", "--model", d];
    args.extend(["--modulation", "in-steps", "--runs", "1", "--json", "-"]);
    let out: serde_json::Value = serde_json::from_str(&ok(&ferry(&args))).unwrap();
    assert_eq!(out["modulation"], "in steps", "{out}");
    assert!(out["modulation_precompute_s"].is_null());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn qwen_image_preset_has_the_real_shapes() {
    let Ok(SynthPreset::Dit(p)) = SynthPreset::by_name("qwen-image") else {
        panic!("qwen-image is a DiT preset");
    };
    assert_eq!(p, DitPreset::by_name("qwen-image").unwrap());
    let config = p.config();
    let c = QwenImageConfig::from_json(Path::new("config.json"), &config).unwrap();
    assert_eq!(
        (
            c.num_layers,
            c.num_attention_heads,
            c.attention_head_dim,
            c.joint_attention_dim,
            c.in_channels,
            c.out_channels,
            c.axes_dims_rope.clone(),
        ),
        (60, 24, 128, 3584, 64, 16, vec![16, 56, 56])
    );
    assert_eq!(config["patch_size"], 2);
    let dit = QwenImage::new(c);
    assert_eq!(dit.groups().len(), 62);
    let n = p.parameters();
    assert!((20.42e9..20.44e9).contains(&(n as f64)), "{n}");
    // A block: two modulation linears (dim → 6·dim), eight attention linears, two norms per
    // stream, two MLPs of 4·dim, all with biases.
    let d = 3072;
    let block = 2 * (6 * d * d + 6 * d) + 8 * (d * d + d) + 4 * 128 + 2 * (8 * d * d + 5 * d);
    let first: usize = dit.groups()[1].tensors.iter().map(|t| t.numel()).sum();
    assert_eq!(first, block);
}

#[test]
fn bad_input_is_one_line_naming_the_flag() {
    let dir = scratch("qwen-image-bad");
    let d = dir.to_str().unwrap();
    let e = err(&ferry(&[
        "synth",
        "--preset",
        "qwen-image",
        "--only",
        "vae",
        "--out",
        d,
    ]));
    assert!(e.contains("--only") && e.contains("transformer"), "{e}");
    let e = err(&ferry(&[
        "synth",
        "--preset",
        "qwen-image",
        "--layers",
        "2",
        "--out",
        d,
    ]));
    assert!(e.contains("--layers"), "{e}");
    assert!(!dir.exists(), "nothing written");
    // 72 pixels wide: not a multiple of 16.
    let e = err(&ferry(&[
        "bench",
        "--synthetic",
        "qwen-image-tiny",
        "--device",
        "cpu",
        "--size",
        "72x64",
    ]));
    assert!(e.contains("--size") && e.contains("16"), "{e}");
    let e = err(&ferry(&[
        "bench",
        "--synthetic",
        "z-image-tiny",
        "--device",
        "cpu",
        "--modulation",
        "precomputed",
    ]));
    assert!(
        e.contains("--modulation") && e.contains("Qwen-Image"),
        "{e}"
    );
    let e = err(&ferry(&["synth", "--preset", "qwen-imag", "--out", d]));
    assert!(e.contains("qwen-image"), "{e}");
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn pipeline_preset(name: &str) -> PipelinePreset {
    match SynthPreset::by_name(name) {
        Ok(SynthPreset::Pipeline(p)) => *p,
        _ => panic!("{name} is a pipeline preset"),
    }
}

/// diffusers' `AutoencoderKLQwenImage` state dict for a config, as
/// scripts/make_qwenimage_vae_names.py recorded it: (config, parameters, [(name, shape)]).
fn diffusers_vae(case: &str) -> (serde_json::Value, usize, Vec<(String, Vec<usize>)>) {
    let j = read_json(&repo().join(format!("tests/data/qwen_image_vae/{case}.json")));
    let tensors = serde_json::from_value(j["tensors"].clone()).unwrap();
    (
        j["config"].clone(),
        j["parameters"].as_u64().unwrap() as usize,
        tensors,
    )
}

fn finite(xs: &[f32]) -> bool {
    xs.iter().all(|x| x.is_finite())
}

/// The tiny pipeline, written in two calls of `--only`, opens with ferry's readers, each
/// component holds what the preset says, and each runs on the CPU: the prompt through the
/// text encoder, one DiT step on its embeddings, the VAE's decode of the result.
#[test]
fn tiny_pipeline_opens_with_ferrys_readers_and_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("qwen-image");
    let d = dir.to_str().unwrap();
    let preset = pipeline_preset("qwen-image-pipeline-tiny");
    for only in ["transformer,vae", "text_encoder,tokenizer,scheduler"] {
        let args = ["synth", "--preset", preset.name, "--out", d, "--seed", "7"];
        ok(&ferry(&[&args[..], &["--only", only]].concat()));
    }
    let pipeline = Pipeline::open(&dir).unwrap();
    assert_eq!(pipeline.class_name, "QwenImagePipeline");
    let about = read_json(&dir.join("model_index.json"))["_ferry_synthetic"]["about"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(about.contains("visual.*"), "{about}");
    for (c, class) in [
        (Transformer, "QwenImageTransformer2DModel"),
        (TextEncoder, "Qwen2_5_VLForConditionalGeneration"),
        (Tokenizer, "Qwen2Tokenizer"),
        (Vae, "AutoencoderKLQwenImage"),
        (Scheduler, "FlowMatchEulerDiscreteScheduler"),
    ] {
        let component = pipeline.component(c.name()).unwrap();
        assert_eq!(component.class_name.as_deref(), Some(class));
        let mut stored: Vec<_> = component
            .tensors
            .values()
            .map(|t| (t.name.clone(), t.shape.clone()))
            .collect();
        stored.sort();
        let mut want = preset.tensors(c);
        want.sort();
        assert_eq!(stored, want, "{}", c.name());
        assert!(component.tensors.values().all(|t| t.dtype == DType::BF16));
    }
    let info = ok(&ferry(&["info", "--model", d]));
    assert!(
        info.contains("(QwenImagePipeline)")
            && info.contains("vae           AutoencoderKLQwenImage: 133.3K parameters"),
        "{info}"
    );

    // The text encoder: the prompt's rows after the template's first 34, 48 wide.
    let te = QwenImageTextEncoder::open(&pipeline).unwrap();
    let component = pipeline.component("text_encoder").unwrap();
    let mut te_weights =
        ResidentWeights::load(component, te.model.groups(), |t| Cpu.weight(t)).unwrap();
    let prompt = "a red fox in the snow";
    let ids = te.tokens(prompt, 512).unwrap();
    let embeds = te.encode(&Cpu, &mut te_weights, &[prompt], 512).unwrap();
    assert_eq!(embeds.hidden, 48);
    assert_eq!(embeds.lengths, [ids.len() - TEMPLATE_START]);
    assert!(
        embeds.lengths[0] > 5,
        "the prompt and the assistant turn are kept"
    );
    assert_eq!(embeds.data.len(), embeds.lengths[0] * 48);
    assert!(finite(&embeds.data));

    // One DiT step on a 64 × 48 image's latents: 8 × 6 latent pixels, 12 tokens of 64.
    let c = pipeline.component("transformer").unwrap();
    let (path, json) = c.config().unwrap();
    let config = QwenImageConfig::from_json(path, json).unwrap();
    assert_eq!(config.joint_attention_dim, embeds.hidden);
    let dit = QwenImage::new(config);
    dit.check_tensors(c).unwrap();
    let mut dit_weights = ResidentWeights::load(c, dit.groups(), |t| Cpu.weight(t)).unwrap();
    let (h, w) = (8, 6);
    let noise: Vec<f32> = (0..16 * h * w)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    let latents = pack_latents(&noise, 1, 16, h, w);
    let input = DitInput {
        latents: &latents,
        height: h,
        width: w,
        timestep: &[1.0],
        texts: &[embeds.prompt(0)],
    };
    let velocity = dit.forward(&Cpu, &mut dit_weights, &input).unwrap();
    assert_eq!(velocity.len(), 12 * 64);
    assert!(finite(&velocity) && velocity.iter().any(|&v| v != 0.0));

    // The VAE decodes the step's result to a 64 × 48 image in [-1, 1], not flat.
    let weights = open_qwen_vae(&dir.join("vae")).unwrap();
    weights.check().unwrap();
    let vae = QwenVae::load(&Cpu, &weights).unwrap();
    let x0: Vec<f32> = latents.iter().zip(&velocity).map(|(x, v)| x - v).collect();
    let z = unpack_latents(&x0, 1, 16, h, w);
    let image = vae.decode(&Cpu, &z, [1, 16, h, w], Tiling::Whole).unwrap();
    assert_eq!(image.len(), 3 * 64 * 48);
    assert!(finite(&image) && image.iter().all(|v| (-1.0..=1.0).contains(v)));
    let (lo, hi) = image
        .iter()
        .fold((f32::MAX, f32::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    assert!(hi - lo > 1e-3, "a flat image: {lo}..{hi}");

    // The scheduler is Qwen-Image's: the fixture's config, field for field.
    let (path, json) = pipeline.component("scheduler").unwrap().config().unwrap();
    let theirs = read_json(
        &repo().join("tests/fixtures/qwen-image-pipeline/scheduler/scheduler_config.json"),
    );
    assert_eq!(json, &theirs);
    assert!(
        FlowMatchConfig::from_json(path, json)
            .unwrap()
            .use_dynamic_shifting
    );
}

/// The VAE's tensors are the state dict diffusers makes for the same config, name for name,
/// shape for shape and in order, for the tiny config (tests/fixtures/qwen-image's VAE, which
/// diffusers wrote) and for diffusers' defaults (Qwen-Image's); the configs are those, with
/// Qwen-Image's latent statistics.
#[test]
fn vae_tensors_are_the_state_dict_diffusers_makes() {
    for (preset, case) in [
        ("qwen-image-pipeline-tiny", "tiny"),
        ("qwen-image-pipeline", "default"),
    ] {
        let p = pipeline_preset(preset);
        let (config, parameters, tensors) = diffusers_vae(case);
        assert_eq!(p.tensors(Vae), tensors, "{preset}");
        assert_eq!(p.parameters(Vae), parameters, "{preset}");
        let ours = p.config(Vae, DType::BF16);
        let (default, _, _) = diffusers_vae("default");
        for (k, v) in config.as_object().unwrap() {
            // Qwen-Image's latent statistics in both (the fixture drew its own).
            let v = match k.starts_with("latents_") {
                true => &default[k],
                false => v,
            };
            assert_eq!(&ours[k], v, "{preset}: {k}");
        }
        let path = Path::new("vae/config.json");
        let PipelineModels::QwenImage(models) = &p.models else {
            panic!("{preset} is a Qwen-Image pipeline");
        };
        assert_eq!(QwenVaeConfig::from_json(path, &ours).unwrap(), models.vae);
        assert_eq!(qwen_vae_tensors(&models.vae), tensors);
    }
    // The tiny one is also what the fixture's file holds.
    let fixture = repo().join("tests/fixtures/qwen-image/vae");
    let (_, _, mut tensors) = diffusers_vae("tiny");
    tensors.sort();
    assert_eq!(stored_tensors(&fixture), tensors);
    // Attention blocks where attn_scales says (in the encoder only).
    let (config, _, tensors) = diffusers_vae("tiny_attention");
    let config = QwenVaeConfig::from_json(Path::new("config.json"), &config).unwrap();
    assert_eq!(config.attn_scales, [1.0, 0.25]);
    assert_eq!(qwen_vae_tensors(&config), tensors);
}

/// The pipeline drops the first 34 rows of the prompt in its template, which are Qwen's
/// tokens of the system message; the synthetic tokenizers must give more than that before
/// the prompt, the same for every prompt, so that only template rows are dropped.
#[test]
fn template_is_longer_than_the_rows_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let (before, after) = PROMPT_TEMPLATE.split_once("{}").unwrap();
    for (preset, endoftext) in [
        ("qwen-image-pipeline-tiny", 416),
        ("qwen-image-pipeline", 151643),
    ] {
        let dir = tmp.path().join(preset);
        let d = dir.to_str().unwrap();
        let args = [
            "synth",
            "--preset",
            preset,
            "--only",
            "tokenizer",
            "--out",
            d,
        ];
        ok(&ferry(&args));
        let text = TextCodec::from_tokenizer_dir(&dir.join("tokenizer")).unwrap();
        let tokenizer = text.tokenizer().unwrap();
        let p = pipeline_preset(preset);
        let te = p.language_model().unwrap();
        assert_eq!(tokenizer.token_to_id("<|endoftext|>"), Some(endoftext));
        assert_eq!(tokenizer.token_to_id("<|im_start|>"), Some(endoftext + 1));
        assert_eq!(tokenizer.token_to_id("<|im_end|>"), Some(endoftext + 2));
        assert_eq!(
            (te.bos_token_id, te.eos_token_id),
            (Some(endoftext), endoftext + 2)
        );
        assert!(tokenizer.get_vocab_size(true) <= te.config.vocab_size);

        let head = text.encode(before).unwrap();
        assert!(
            head.len() > TEMPLATE_START,
            "{preset}: {} tokens",
            head.len()
        );
        for prompt in ["x", "a red fox in the snow", "Zürich 2026 — 東京, at night"] {
            let ids = text.encode(&format!("{before}{prompt}{after}")).unwrap();
            assert_eq!(ids[..head.len()], head[..], "{preset}: {prompt:?}");
            assert!(ids.iter().all(|&id| (id as usize) < te.config.vocab_size));
        }
    }
}

/// The real preset's shapes and configs, from the presets alone (nothing written): the DiT
/// of `qwen-image` (20.43 B, 40.9 GB in bf16), Qwen2.5-VL-7B's text model (7.62 B, 15.2
/// GB; the 0.68 B vision tower is not written), the 126.9 M VAE (0.25 GB).
#[test]
fn pipeline_preset_has_the_real_shapes() {
    let p = pipeline_preset("qwen-image-pipeline");
    let bf16 = DType::BF16;
    let dit = DitPreset::by_name("qwen-image").unwrap();
    assert_eq!(p.config(Transformer, bf16), dit.config());
    assert_eq!(p.tensors(Transformer), dit.tensors());
    let n = p.parameters(Transformer);
    assert!((20.42e9..20.44e9).contains(&(n as f64)), "{n}");
    assert!((40.8e9..40.9e9).contains(&(2.0 * n as f64)), "{n}");

    // Qwen2.5-VL-7B's text model, untied: embeddings, 28 layers (q/k/v biases, 4 kv heads of
    // 128), the final norm, the head.
    let (d, ffn, kv, vocab) = (3584, 18944, 512, 152064);
    let layer = (d * d + d) + 2 * (kv * d + kv) + d * d + 3 * d * ffn + 2 * d;
    let te_params = 2 * vocab * d + 28 * layer + d;
    assert_eq!(te_params, 7_615_616_512);
    assert_eq!(p.parameters(TextEncoder), te_params);
    assert_eq!(
        te_params,
        Preset::by_name("qwen2.5-7b").unwrap().parameters()
    );
    let names: Vec<String> = p.tensors(TextEncoder).into_iter().map(|t| t.0).collect();
    for n in [
        "model.embed_tokens.weight",
        "model.layers.27.self_attn.q_proj.bias",
        "model.norm.weight",
        "lm_head.weight",
    ] {
        assert!(names.iter().any(|x| x == n), "{n}");
    }
    assert!(!names.iter().any(|x| x.starts_with("visual.")));
    let json = p.config(TextEncoder, bf16);
    assert_eq!(
        json["architectures"],
        serde_json::json!(["Qwen2_5_VLForConditionalGeneration"])
    );
    assert_eq!(json["model_type"], "qwen2_5_vl");
    let t = &json["text_config"];
    for (key, value) in [
        ("hidden_size", serde_json::json!(3584)),
        ("num_hidden_layers", 28.into()),
        ("num_attention_heads", 28.into()),
        ("num_key_value_heads", 4.into()),
        ("intermediate_size", 18944.into()),
        ("vocab_size", 152064.into()),
        ("rms_norm_eps", 1e-6.into()),
        ("max_position_embeddings", 128000.into()),
        ("tie_word_embeddings", false.into()),
        ("hidden_act", "silu".into()),
    ] {
        assert_eq!(t[key], value, "{key}");
    }
    assert_eq!(t["rope_parameters"]["type"], "mrope");
    assert_eq!(
        t["rope_parameters"]["mrope_section"],
        serde_json::json!([16, 24, 24])
    );
    assert_eq!(t["rope_parameters"]["rope_theta"], 1e6);
    assert_eq!(json["vision_config"]["out_hidden_size"], 3584);
    let path = Path::new("text_encoder/config.json");
    let c = LlamaConfig::from_hf(path, &text_config(path, &json).unwrap()).unwrap();
    assert_eq!(c, p.language_model().unwrap().config);
    assert!(c.qkv_bias && !c.tie_word_embeddings && c.head_dim == 128);

    let (_, vae_params, _) = diffusers_vae("default");
    assert_eq!(p.parameters(Vae), vae_params);
    assert_eq!(vae_params, 126_892_531);
    assert!(p.tensors(Tokenizer).is_empty() && p.tensors(Scheduler).is_empty());

    let index = p.model_index(&ferry::synth::WriteOptions::default());
    assert_eq!(index["_class_name"], "QwenImagePipeline");
    assert_eq!(
        index["vae"],
        serde_json::json!(["diffusers", "AutoencoderKLQwenImage"])
    );
    assert_eq!(index["_ferry_synthetic"]["preset"], "qwen-image-pipeline");

    // --list names both, with their sizes.
    let list = ok(&ferry(&["synth", "--list"]));
    let line = |name: &str| {
        list.lines()
            .find(|l| l.trim_start().starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} in\n{list}"))
            .to_string()
    };
    assert!(
        line("qwen-image-pipeline").contains("28.17B params"),
        "{list}"
    );
    assert!(
        line("qwen-image-pipeline-tiny").contains("qwen-image"),
        "{list}"
    );
}
