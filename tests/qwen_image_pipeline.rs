//! Qwen-Image's text encoder and denoising loop on the CPU against diffusers f32, on the tiny
//! pipeline in tests/fixtures/qwen-image-pipeline (scripts/make_qwenimage_pipeline_fixture.py):
//! prompts through the template to `hidden_states[-1]` (two prompts of different lengths in
//! one pass, one cut by max_sequence_length), the scheduler's sigmas bit for bit, guidance in
//! one pass bit for bit against two passes, whole loops with and without true CFG on
//! non-square images, and bad input.

mod common;

use std::collections::BTreeMap;

use ferry::backend::cpu::{Cpu, CpuWeight};
use ferry::backend::Backend;
use ferry::checkpoint::{Component, Pipeline};
use ferry::diffuse::guidance::TrueCfg;
use ferry::diffuse::qwen_image::{self, check_noise, denoise, Denoise};
use ferry::diffuse::qwen_text_encoder::{PromptEmbeds, QwenImageTextEncoder, TEMPLATE_START};
use ferry::diffuse::scheduler::FlowMatchConfig;
use ferry::model::qwen_image::{DitInput, QwenImage, QwenImageConfig};
use ferry::model::{Architecture, ResidentWeights};

use common::{read_reference, rel_l2};

struct Fixture {
    pipeline: Pipeline,
    expected: serde_json::Value,
    reference: BTreeMap<String, Vec<f32>>,
}

fn fixture() -> Fixture {
    let dir = common::fixture("qwen-image-pipeline");
    let expected = std::fs::read(dir.join("expected.json")).expect("expected.json");
    Fixture {
        pipeline: Pipeline::open(&dir).expect("the tiny Qwen-Image pipeline"),
        expected: serde_json::from_slice(&expected).expect("JSON"),
        reference: read_reference(&dir.join("reference.safetensors")),
    }
}

impl Fixture {
    fn r(&self, name: &str) -> &[f32] {
        self.reference
            .get(name)
            .unwrap_or_else(|| panic!("reference tensor {name}"))
    }
    fn encoder(&self) -> (QwenImageTextEncoder, ResidentWeights<CpuWeight>) {
        let te = QwenImageTextEncoder::open(&self.pipeline).expect("text encoder");
        let c = self.pipeline.component("text_encoder").unwrap();
        let w = ResidentWeights::load(c, te.model.groups(), |t| Cpu.weight(t)).unwrap();
        (te, w)
    }
    fn dit(&self) -> (QwenImage, ResidentWeights<CpuWeight>) {
        let c = self.pipeline.component("transformer").unwrap();
        let (path, json) = c.config().unwrap();
        let dit = QwenImage::new(QwenImageConfig::from_json(path, json).unwrap());
        dit.check_tensors(c).unwrap();
        let w = ResidentWeights::load(c, dit.groups(), |t| Cpu.weight(t)).unwrap();
        (dit, w)
    }
    fn scheduler(&self) -> FlowMatchConfig {
        let (path, json) = self
            .pipeline
            .component("scheduler")
            .unwrap()
            .config()
            .unwrap();
        FlowMatchConfig::from_json(path, json).unwrap()
    }
    fn strings(v: &serde_json::Value) -> Vec<String> {
        serde_json::from_value(v.clone()).unwrap()
    }
}

#[test]
fn prompt_embeddings_match_diffusers() {
    let f = fixture();
    let (te, mut weights) = f.encoder();
    // The vision tower and the head are in the checkpoint, not in the model.
    let component = f.pipeline.component("text_encoder").unwrap();
    assert!(component.tensors.keys().any(|k| k.starts_with("visual.")));
    assert!(te
        .model
        .groups()
        .iter()
        .flat_map(|g| &g.tensors)
        .all(|t| t.name.starts_with("model.") && !t.name.contains("visual")));
    for case in ["pair", "cut"] {
        let c = &f.expected["text_encoder"][case];
        let prompts = Fixture::strings(&c["prompts"]);
        let msl = c["max_sequence_length"].as_u64().unwrap() as usize;
        let want_ids: Vec<Vec<u32>> = serde_json::from_value(c["ids"].clone()).unwrap();
        let want_lengths: Vec<usize> = serde_json::from_value(c["lengths"].clone()).unwrap();
        for (p, want) in prompts.iter().zip(&want_ids) {
            let ids = te.tokens(p, msl).unwrap();
            let cut = want.len().min(TEMPLATE_START + msl);
            assert_eq!(ids, want[..cut], "{case}: token ids of {p:?}");
        }
        let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
        let got = te.encode(&Cpu, &mut weights, &refs, msl).unwrap();
        assert_eq!(got.lengths, want_lengths, "{case}: valid rows per prompt");
        assert_eq!(got.hidden, 48);
        for i in 0..prompts.len() {
            let want = f.r(&format!("te.{case}.{i}"));
            let err = rel_l2(got.prompt(i), want);
            eprintln!("text encoder {case}.{i}: relative L2 {err:.2e}");
            assert!(err <= 1e-4, "{case}.{i}: relative L2 {err}");
        }
    }
    // A prompt encoded alone gives the rows it gets beside another.
    let c = &f.expected["text_encoder"]["pair"];
    let p = Fixture::strings(&c["prompts"]);
    let alone = te.encode(&Cpu, &mut weights, &[&p[1]], 512).unwrap();
    let err = rel_l2(alone.prompt(0), f.r("te.pair.1"));
    assert!(err <= 1e-4, "alone: relative L2 {err}");
}

#[test]
fn schedules_are_the_schedulers_bit_for_bit() {
    let f = fixture();
    let config = f.scheduler();
    assert!(config.use_dynamic_shifting && config.shift_terminal == Some(0.02));
    // (steps, image tokens) as the fixture script ran set_timesteps; tokens are (H/16)(W/16).
    for (steps, tokens) in [(3, 24), (4, 16), (50, 4096), (30, 6889)] {
        let s = config.schedule(
            &ferry::diffuse::scheduler::flow_sigmas(steps),
            config.mu(tokens),
        );
        let key = format!("schedule.{steps}x{tokens}");
        assert_eq!(s.sigmas, f.r(&format!("{key}.sigmas")), "{key} sigmas");
        assert_eq!(
            s.timesteps,
            f.r(&format!("{key}.timesteps")),
            "{key} timesteps"
        );
    }
    // The pipeline's entry: 1024 × 1024 pixels are 4096 tokens.
    let s = qwen_image::schedule(&config, 50, 1024, 1024).unwrap();
    assert_eq!(s.sigmas, f.r("schedule.50x4096.sigmas"));
}

/// The embeddings the pipeline encodes for a denoising case: prompts, then negatives.
fn case_embeds(
    te: &QwenImageTextEncoder,
    weights: &mut ResidentWeights<CpuWeight>,
    case: &serde_json::Value,
) -> (PromptEmbeds, Option<PromptEmbeds>) {
    let prompts = Fixture::strings(&case["prompt"]);
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let cond = te.encode(&Cpu, weights, &refs, 512).unwrap();
    let neg = case["negative_prompt"].as_array().map(|_| {
        let n = Fixture::strings(&case["negative_prompt"]);
        let refs: Vec<&str> = n.iter().map(String::as_str).collect();
        te.encode(&Cpu, weights, &refs, 512).unwrap()
    });
    (cond, neg)
}

#[test]
fn denoising_matches_the_pipeline() {
    let f = fixture();
    let (te, mut te_weights) = f.encoder();
    let (dit, mut weights) = f.dit();
    let config = f.scheduler();
    for name in ["plain", "cfg", "batch"] {
        let case = &f.expected["denoise"][name];
        let u = |k: &str| case[k].as_u64().unwrap() as usize;
        let (height, width, steps) = (u("height"), u("width"), u("steps"));
        let batch = case["prompt"].as_array().unwrap().len();
        let (cond, neg) = case_embeds(&te, &mut te_weights, case);
        let (cond, neg) = (cond.prompts(), neg.as_ref().map(PromptEmbeds::prompts));
        let schedule = qwen_image::schedule(&config, steps, height, width).unwrap();
        let mut seen = Vec::new();
        let latents = denoise(
            &Cpu,
            &dit,
            &mut weights,
            &schedule,
            Denoise {
                latents: f.r(&format!("{name}.noise")).to_vec(),
                batch,
                height,
                width,
                prompts: &cond,
                negatives: neg.as_deref(),
                guidance: TrueCfg {
                    scale: case["true_cfg_scale"].as_f64().unwrap() as f32,
                },
                modulation: None,
            },
            |i, x| seen.push((i, x.to_vec())),
        )
        .unwrap();
        // The modulation made once for the schedule, the steps without those weights: the
        // same bits.
        let tr = f.pipeline.component("transformer").unwrap();
        let steps_dit = QwenImage::precomputed(dit.config.clone());
        let table = {
            let m = steps_dit.modulation_model();
            let mut w = ResidentWeights::load(tr, m.groups(), |t| Cpu.weight(t)).unwrap();
            m.table(&Cpu, &mut w, &qwen_image::model_times(&schedule))
                .unwrap()
        };
        let mut steps_w = ResidentWeights::load(tr, steps_dit.groups(), |t| Cpu.weight(t)).unwrap();
        let precomputed = denoise(
            &Cpu,
            &steps_dit,
            &mut steps_w,
            &schedule,
            Denoise {
                latents: f.r(&format!("{name}.noise")).to_vec(),
                batch,
                height,
                width,
                prompts: &cond,
                negatives: neg.as_deref(),
                guidance: TrueCfg {
                    scale: case["true_cfg_scale"].as_f64().unwrap() as f32,
                },
                modulation: Some(&table),
            },
            |_, _| {},
        )
        .unwrap();
        assert!(
            precomputed
                .iter()
                .map(|v| v.to_bits())
                .eq(latents.iter().map(|v| v.to_bits())),
            "{name}: precomputed modulation changed the latents"
        );
        assert_eq!(seen.len(), steps, "{name}: one callback per step");
        for (i, x) in &seen {
            let err = rel_l2(x, f.r(&format!("{name}.step{i}")));
            assert!(err <= 1e-4, "{name}: step {i} relative L2 {err}");
        }
        let want = f.r(&format!("{name}.latents"));
        let err = rel_l2(&latents, want);
        eprintln!("denoise {name}: final latents relative L2 {err:.2e}");
        assert!(err <= 1e-4, "{name}: relative L2 {err}");
        // The noise really moved (the test compares a result, not the input).
        assert!(rel_l2(&latents, f.r(&format!("{name}.noise"))) > 0.05);
    }
}

/// A guided step's one pass (conditional and unconditional texts of different lengths as
/// samples of one forward) gives each sample exactly what a forward of that sample alone
/// gives: guidance in one pass changes where the work happens, not the numbers.
#[test]
fn one_pass_guidance_equals_two_passes_bit_for_bit() {
    let f = fixture();
    let (te, mut te_weights) = f.encoder();
    let (dit, mut weights) = f.dit();
    let case = &f.expected["denoise"]["batch"];
    let (cond, neg) = case_embeds(&te, &mut te_weights, case);
    let neg = neg.expect("the batch case has negative prompts");
    let mut texts = cond.prompts();
    texts.extend(neg.prompts());
    assert!(texts.windows(2).any(|w| w[0].len() != w[1].len()));
    let noise = f.r("batch.noise");
    let (h, w) = (48 / 8, 80 / 8);
    let latents = [noise, noise].concat();
    let t = vec![0.75f32; 4];
    let one = dit
        .forward(
            &Cpu,
            &mut weights,
            &DitInput {
                latents: &latents,
                height: h,
                width: w,
                timestep: &t,
                texts: &texts,
            },
        )
        .unwrap();
    let per_image = noise.len() / 2;
    for (s, text) in texts.iter().enumerate() {
        let image = s % 2;
        let alone = dit
            .forward(
                &Cpu,
                &mut weights,
                &DitInput {
                    latents: &noise[image * per_image..(image + 1) * per_image],
                    height: h,
                    width: w,
                    timestep: &t[..1],
                    texts: &[text],
                },
            )
            .unwrap();
        let got = &one[s * per_image..(s + 1) * per_image];
        let same = got
            .iter()
            .zip(&alone)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(
            same,
            "sample {s}: one pass differs from its own pass (relative L2 {:.2e})",
            rel_l2(got, &alone)
        );
    }
}

#[test]
fn true_cfg_rescales_each_token_to_the_conditional_norm() {
    // Two tokens of 2 features, one image: [cond, neg].
    let out = [3.0f32, 4.0, 1.0, 0.0, 0.0, 4.0, 1.0, 2.0];
    let g = TrueCfg { scale: 3.0 };
    let comb = g.combine(&out, 2);
    // Token 0: comb = (0, 4) + 3·(3, 0) = (9, 4), rescaled to ‖(3, 4)‖ = 5.
    let k = 5.0 / (81.0f32 + 16.0).sqrt();
    assert_eq!(comb[..2], [9.0 * k, 4.0 * k]);
    // Token 1: comb = (1, 2) + 3·(0, −2) = (1, −4), rescaled to 1.
    let k = 1.0 / 17.0f32.sqrt();
    assert_eq!(comb[2..], [k, -4.0 * k]);
    assert!(g.applies(true) && !g.applies(false) && !TrueCfg { scale: 1.0 }.applies(true));
}

#[test]
fn bad_input_is_named() {
    let f = fixture();
    let (te, _) = f.encoder();
    let (dit, mut weights) = f.dit();
    let config = f.scheduler();
    // Noise of the wrong length: the flag and the expected packed shape.
    let e = check_noise(&vec![0.0; 100], 1, 64, 96, 64)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--noise") && e.contains("[1, 24, 64]"), "{e}");
    // Sizes that are not multiples of 16.
    let e = qwen_image::schedule(&config, 3, 64, 88)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--width") && e.contains("16"), "{e}");
    let e = check_noise(&[], 1, 0, 64, 64).unwrap_err().to_string();
    assert!(e.contains("--height"), "{e}");
    let e = qwen_image::schedule(&config, 0, 64, 64)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--steps"), "{e}");
    // The loop checks too, before any pass.
    let text = vec![0.0f32; 5 * 48];
    let schedule = qwen_image::schedule(&config, 2, 64, 64).unwrap();
    let job = |latents: Vec<f32>, prompts| Denoise {
        latents,
        batch: 1,
        height: 64,
        width: 64,
        prompts,
        negatives: None,
        guidance: TrueCfg { scale: 4.0 },
        modulation: None,
    };
    let texts: [&[f32]; 1] = [&text];
    let e = denoise(
        &Cpu,
        &dit,
        &mut weights,
        &schedule,
        job(vec![0.0; 7], &texts),
        |_, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("--noise") && e.contains("[1, 16, 64]"), "{e}");
    let e = denoise(
        &Cpu,
        &dit,
        &mut weights,
        &schedule,
        job(vec![0.0; 1024], &[]),
        |_, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("0 embeddings for 1 images"), "{e}");
    // max_sequence_length outside 1 ..= 1024.
    let e = te.tokens("a fox", 0).unwrap_err().to_string();
    assert!(e.contains("--max-sequence-length"), "{e}");
}

#[test]
fn a_prompt_with_nothing_after_the_template_start_is_refused() {
    let f = fixture();
    let (te, mut weights) = f.encoder();
    let e = te
        .encode_tokens(&Cpu, &mut weights, &[vec![5; TEMPLATE_START]])
        .unwrap_err()
        .to_string();
    assert!(e.contains("34"), "{e}");
}

#[test]
fn missing_components_and_wrong_configs_are_named() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("model_index.json"),
        r#"{"_class_name": "QwenImagePipeline", "vae": [null, null]}"#,
    )
    .unwrap();
    let p = Pipeline::open(dir.path()).unwrap();
    let e = QwenImageTextEncoder::open(&p)
        .err()
        .expect("no text encoder")
        .to_string();
    assert!(e.contains("text_encoder"), "{e}");

    // A text encoder whose config is Z-Image's Qwen3: the file and the expected model type.
    let zdir = common::fixture("z-image").join("text_encoder");
    let qwen3 = Component::open("text_encoder", &zdir, true).unwrap();
    let e = QwenImageTextEncoder::model(&qwen3)
        .err()
        .expect("qwen3")
        .to_string();
    assert!(e.contains("config.json") && e.contains("qwen2_5_vl"), "{e}");

    // The right config over tensors of another layout: the expected tensor is named.
    let te_dir = f.pipeline.path.join("text_encoder");
    let copy = tempfile::tempdir().unwrap();
    std::fs::copy(te_dir.join("config.json"), copy.path().join("config.json")).unwrap();
    std::fs::copy(
        zdir.join("model.safetensors"),
        copy.path().join("model.safetensors"),
    )
    .unwrap();
    let wrong = Component::open("text_encoder", copy.path(), true).unwrap();
    let e = QwenImageTextEncoder::model(&wrong)
        .err()
        .expect("layout")
        .to_string();
    assert!(e.contains("embed_tokens"), "{e}");
}
