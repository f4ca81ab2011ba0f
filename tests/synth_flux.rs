//! `ferry synth` for Flux.1 pipelines: the tiny preset is a diffusers `FluxPipeline`
//! directory that ferry opens and draws with on the CPU, its tensors those diffusers and
//! transformers wrote for tests/fixtures/flux-pipeline; its tokenizers give the ids of
//! tests/data/flux_synth_tokens.json (which scripts/check_synth_flux_with_diffusers.py checks
//! against transformers' CLIPTokenizer and T5TokenizerFast); the real preset has
//! FLUX.1-dev's shapes, checked without writing its 33 GB.

mod common;

use std::path::{Path, PathBuf};

use common::{ferry, stdout_of as ok};

use ferry::checkpoint::safetensors;
use ferry::diffuse::flux_text::{ClipTokenizer, T5Tokenizer};
use ferry::diffuse::pipeline::ImagePipeline;
use ferry::synth::{PipelineComponent, PipelinePreset};

use PipelineComponent::{TextEncoder, TextEncoder2, Transformer, Vae};

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
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

fn synth_tiny(dir: &Path) {
    let d = dir.to_str().unwrap();
    ok(&ferry(&[
        "synth",
        "--preset",
        "flux-pipeline-tiny",
        "--out",
        d,
        "--seed",
        "1",
    ]));
}

#[test]
fn tiny_pipeline_opens_and_draws_an_image() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("flux");
    synth_tiny(&dir);
    let index = read_json(&dir.join("model_index.json"));
    let fixture = read_json(&root().join("tests/fixtures/flux-pipeline/model_index.json"));
    assert_eq!(index["_class_name"], "FluxPipeline");
    for (c, class) in [
        ("scheduler", "FlowMatchEulerDiscreteScheduler"),
        ("text_encoder", "CLIPTextModel"),
        ("text_encoder_2", "T5EncoderModel"),
        ("tokenizer", "CLIPTokenizer"),
        ("tokenizer_2", "T5TokenizerFast"),
        ("transformer", "FluxTransformer2DModel"),
        ("vae", "AutoencoderKL"),
    ] {
        assert_eq!(index[c][1], class, "{c}");
        assert_eq!(index[c][0], fixture[c][0], "{c}");
    }
    for file in [
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json",
        "tokenizer_2/tokenizer.json",
        "tokenizer_2/special_tokens_map.json",
        "text_encoder_2/model.safetensors.index.json",
    ] {
        assert!(dir.join(file).is_file(), "{file}");
    }
    assert!(!dir.join("tokenizer/tokenizer.json").exists());
    let scheduler = read_json(&dir.join("scheduler/scheduler_config.json"));
    assert_eq!(scheduler["max_shift"], 1.15);
    assert_eq!(scheduler["use_dynamic_shifting"], true);

    let pipeline = ImagePipeline::open(&dir).unwrap();
    assert!(matches!(pipeline, ImagePipeline::Flux(_)));

    let png = tmp.path().join("f.png");
    ok(&ferry(&[
        "image",
        "--device",
        "cpu",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "a red fox in the snow",
        "--size",
        "64x48",
        "--steps",
        "2",
        "--seed",
        "1",
        "--out",
        png.to_str().unwrap(),
    ]));
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&png).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
    let frame = reader.next_frame(&mut pixels).unwrap();
    assert_eq!((frame.width, frame.height), (64, 48));
    pixels.truncate(frame.buffer_size());
    let distinct: std::collections::BTreeSet<u8> = pixels.iter().copied().collect();
    assert!(distinct.len() > 16, "not flat: {distinct:?}");
}

/// diffusers and transformers wrote the fixture's components; the tiny preset has their
/// shapes (the text encoders' vocabularies aside: the fixture's are its own tokenizers'
/// sizes), so its tensors must be those.
#[test]
fn tiny_tensors_are_the_fixtures() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("flux");
    synth_tiny(&dir);
    let fixture = root().join("tests/fixtures/flux-pipeline");
    for c in ["transformer", "vae"] {
        assert_eq!(
            stored_tensors(&dir.join(c)),
            stored_tensors(&fixture.join(c)),
            "{c}"
        );
    }
    let embeddings = [
        "text_model.embeddings.token_embedding.weight",
        "shared.weight",
    ];
    for c in ["text_encoder", "text_encoder_2"] {
        let ours = stored_tensors(&dir.join(c));
        let theirs = stored_tensors(&fixture.join(c));
        assert_eq!(ours.len(), theirs.len(), "{c}");
        for ((a, sa), (b, sb)) in ours.iter().zip(&theirs) {
            assert_eq!(a, b, "{c}");
            if !embeddings.contains(&a.as_str()) {
                assert_eq!(sa, sb, "{a}");
            }
        }
    }
}

/// ferry's ids of the prompts in tests/data/flux_synth_tokens.json for the tiny preset's
/// tokenizers, as the file has them (set FERRY_BLESS=1 to rewrite it).
#[test]
fn tokenizers_give_the_checked_in_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("flux");
    synth_tiny(&dir);
    let clip = ClipTokenizer::open(&dir.join("tokenizer")).unwrap();
    let t5 = T5Tokenizer::open(&dir.join("tokenizer_2")).unwrap();
    assert_eq!(
        (clip.eos, clip.pad, clip.max_length),
        (clip.bos + 1, clip.bos + 1, 77)
    );
    assert_eq!((t5.pad, t5.eos), (0, 1));
    let path = root().join("tests/data/flux_synth_tokens.json");
    let mut want = read_json(&path);
    let mut got = want.clone();
    for case in got["clip"].as_array_mut().unwrap() {
        let ids = clip.tokens(case["prompt"].as_str().unwrap()).unwrap();
        case["ids"] = serde_json::json!(ids);
    }
    for case in got["t5"].as_array_mut().unwrap() {
        let max_len = case["max_length"].as_u64().unwrap() as usize;
        let ids = t5
            .tokens(case["prompt"].as_str().unwrap(), max_len)
            .unwrap();
        case["ids"] = serde_json::json!(ids);
    }
    if std::env::var_os("FERRY_BLESS").is_some() {
        let text = serde_json::to_string_pretty(&got).unwrap() + "\n";
        std::fs::write(&path, text).unwrap();
        want = got.clone();
    }
    assert_eq!(got, want);
    // The pooled row is the end-of-text token's: the largest id of every prompt.
    for case in got["clip"].as_array().unwrap() {
        let ids: Vec<u64> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(ids.iter().max(), Some(&(clip.eos as u64)));
        assert_eq!(ids.len(), 77);
    }
    // Merges and whole words shorten the prompts.
    let fox = clip.tokens("a red fox in the snow").unwrap();
    assert!(
        fox.iter().position(|&i| i == clip.eos).unwrap() < 12,
        "{fox:?}"
    );
    let fox = t5.tokens("a red fox in the snow", 16).unwrap();
    assert!(
        fox.iter().position(|&i| i == t5.eos).unwrap() < 10,
        "{fox:?}"
    );
}

#[test]
fn real_preset_has_flux_dev_shapes_and_is_listed() {
    let p = PipelinePreset::by_name("flux.1-dev-pipeline").unwrap();
    let billions = |c| format!("{:.2}", p.parameters(c) as f64 / 1e9);
    assert_eq!(billions(Transformer), "11.90");
    assert_eq!(billions(TextEncoder2), "4.76");
    assert_eq!(billions(TextEncoder), "0.12");
    assert_eq!(billions(Vae), "0.08");
    assert_eq!(p.components().len(), 7);
    let names: Vec<String> = p.tensors(TextEncoder2).into_iter().map(|t| t.0).collect();
    assert_eq!(names[0], "shared.weight");
    assert_eq!(names.len(), 1 + 24 * 9 + 1 + 1);
    let clip = p.tensors(TextEncoder);
    assert_eq!(
        clip[0],
        (
            "text_model.embeddings.token_embedding.weight".to_string(),
            vec![49408, 768]
        )
    );

    let list = ok(&ferry(&["synth", "--list"]));
    for want in [
        "flux.1-dev-pipeline",
        "flux-pipeline-tiny",
        "11.90B",
        "4.76B",
        "123.1M",
        "text_encoder_2",
    ] {
        assert!(list.contains(want), "{want:?} in\n{list}");
    }
    let line = list
        .lines()
        .find(|l| l.trim_start().starts_with("flux.1-dev-pipeline"))
        .unwrap();
    assert!(line.contains("flux") && line.contains("16.87B"), "{line}");
}

#[test]
fn only_takes_flux_components() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("flux");
    let d = dir.to_str().unwrap();
    let args = ["synth", "--preset", "flux-pipeline-tiny", "--out", d];
    ok(&ferry(
        &[&args[..], &["--only", "tokenizer_2,text_encoder_2"]].concat(),
    ));
    assert!(dir.join("tokenizer_2/tokenizer.json").is_file());
    assert!(!dir.join("transformer").exists());
    // Z-Image has no second text encoder.
    let z = tmp.path().join("z");
    let out = ferry(&[
        "synth",
        "--preset",
        "z-image-tiny",
        "--out",
        z.to_str().unwrap(),
        "--only",
        "text_encoder_2",
    ]);
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("--only: unknown component \"text_encoder_2\"; expected some of transformer, text_encoder, tokenizer, vae, scheduler"),
        "{e}"
    );
}
