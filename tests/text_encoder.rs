//! A pipeline's text encoder against diffusers: the tiny Z-Image pipeline's Qwen3 encoder on
//! the CPU, prompt through the chat template to `hidden_states[-2]`
//! (tests/fixtures/z-image, scripts/make_zimage_fixture.py).

mod common;

use ferry::backend::cpu::Cpu;
use ferry::backend::Backend;
use ferry::checkpoint::Pipeline;
use ferry::diffuse::text_encoder::TextEncoder;
use ferry::model::{Architecture, ResidentWeights};

use common::{read_reference, rel_l2};

fn fixture() -> Pipeline {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/z-image");
    Pipeline::open(&dir).expect("the tiny Z-Image pipeline")
}

#[test]
fn prompt_embeddings_match_diffusers() {
    let pipeline = fixture();
    let expected: serde_json::Value = serde_json::from_slice(
        &std::fs::read(pipeline.path.join("expected.json")).expect("expected.json"),
    )
    .expect("JSON");
    let reference = read_reference(&pipeline.path.join("reference.safetensors"));
    let encoder = TextEncoder::open(&pipeline).expect("text encoder");
    let component = pipeline.component("text_encoder").unwrap();
    let mut weights =
        ResidentWeights::load(component, encoder.model.groups(), |t| Cpu.weight(t)).unwrap();
    for case in ["turbo", "cfg"] {
        let c = &expected["cases"][case];
        let prompt = c["prompt"].as_str().unwrap();
        let ids = encoder.tokens(prompt).unwrap();
        let want_ids: Vec<u32> = serde_json::from_value(c["prompt_ids"].clone()).unwrap();
        assert_eq!(ids, want_ids, "{case}: token ids of {prompt:?}");
        let got = encoder.encode(&Cpu, &mut weights, &ids).unwrap();
        let want = &reference[&format!("{case}.prompt_embeds")];
        assert_eq!(got.len(), want.len(), "{case}: [tokens, hidden]");
        let err = rel_l2(&got, want);
        assert!(err <= 1e-5, "{case}: relative L2 {err}");
        if let Some(neg) = c["negative_prompt"].as_str() {
            let ids = encoder.tokens(neg).unwrap();
            let want_ids: Vec<u32> =
                serde_json::from_value(c["negative_prompt_ids"].clone()).unwrap();
            assert_eq!(ids, want_ids, "{case}: negative prompt ids");
            let got = encoder.encode(&Cpu, &mut weights, &ids).unwrap();
            let err = rel_l2(&got, &reference[&format!("{case}.negative_prompt_embeds")]);
            assert!(err <= 1e-5, "{case}: negative prompt relative L2 {err}");
        }
    }
}

#[test]
fn a_missing_component_is_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("model_index.json"),
        r#"{"_class_name": "ZImagePipeline", "vae": ["diffusers", "AutoencoderKL"]}"#,
    )
    .unwrap();
    let e = Pipeline::open(dir.path())
        .err()
        .expect("no vae/ directory")
        .to_string();
    assert!(e.contains("vae") && e.contains("component"), "{e}");
    std::fs::write(
        dir.path().join("model_index.json"),
        r#"{"_class_name": "ZImagePipeline"}"#,
    )
    .unwrap();
    let p = Pipeline::open(dir.path()).unwrap();
    let e = TextEncoder::open(&p)
        .err()
        .expect("no text encoder")
        .to_string();
    assert!(e.contains("text_encoder"), "{e}");
}
