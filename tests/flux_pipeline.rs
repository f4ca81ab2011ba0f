//! Flux.1's pipeline on the CPU against diffusers f32, on the tiny pipeline in
//! tests/fixtures/flux-pipeline (scripts/make_flux_pipeline_fixture.py): T5's and CLIP's
//! prompt embeddings, the scheduler's sigmas bit for bit (dynamic shift from the image's
//! tokens), whole denoising loops (embedded guidance, non-square images, two prompts in one
//! batch, T5 cut short), the modulation made once = made every step bit for bit, `ferry image`
//! to pixels within one level, and bad input.

mod common;

use std::collections::BTreeMap;

use ferry::backend::cpu::{Cpu, CpuWeight};
use ferry::backend::Backend;
use ferry::checkpoint::Pipeline;
use ferry::diffuse::flux::{denoise, Denoise};
use ferry::diffuse::flux_text::FluxTextEncoders;
use ferry::diffuse::packed;
use ferry::diffuse::scheduler::FlowMatchConfig;
use ferry::model::flux::{Flux, FluxConfig};
use ferry::model::{Architecture, ResidentWeights};

use common::{ferry, fixture, read_png, read_reference, rel_l2, write_noise};

struct Fixture {
    pipeline: Pipeline,
    expected: serde_json::Value,
    reference: BTreeMap<String, Vec<f32>>,
}

fn open() -> Fixture {
    let dir = fixture("flux-pipeline");
    let expected = std::fs::read(dir.join("expected.json")).expect("expected.json");
    Fixture {
        pipeline: Pipeline::open(&dir).expect("the tiny Flux pipeline"),
        expected: serde_json::from_slice(&expected).expect("JSON"),
        reference: read_reference(&dir.join("reference.safetensors")),
    }
}

type Weights = ResidentWeights<CpuWeight>;

impl Fixture {
    fn r(&self, name: &str) -> &[f32] {
        self.reference
            .get(name)
            .unwrap_or_else(|| panic!("reference tensor {name}"))
    }
    fn weights(&self, component: &str, arch: &dyn Architecture) -> Weights {
        let c = self.pipeline.component(component).unwrap();
        ResidentWeights::load(c, arch.groups(), |t| Cpu.weight(t)).unwrap()
    }
    fn config(&self) -> FluxConfig {
        let c = self.pipeline.component("transformer").unwrap();
        let (path, json) = c.config().unwrap();
        FluxConfig::from_json(path, json).unwrap()
    }
    fn scheduler(&self) -> FlowMatchConfig {
        let c = self.pipeline.component("scheduler").unwrap();
        let (path, json) = c.config().unwrap();
        FlowMatchConfig::from_json(path, json).unwrap()
    }
    /// T5's embedding (at `max_len` tokens) and CLIP's pooled embedding of each prompt.
    fn embeds(&self, prompts: &[String], max_len: usize) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
        let e = FluxTextEncoders::open(&self.pipeline).unwrap();
        let t5_ids: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| e.t5_tokens(p, max_len).unwrap())
            .collect();
        let clip_ids: Vec<Vec<u32>> = prompts.iter().map(|p| e.clip_tokens(p).unwrap()).collect();
        let mut w = self.weights("text_encoder_2", &e.t5);
        let t5 = e.encode_t5(&Cpu, &mut w, &t5_ids).unwrap();
        let mut w = self.weights("text_encoder", &e.clip);
        let pooled = e.encode_clip_pooled(&Cpu, &mut w, &clip_ids).unwrap();
        (t5, pooled)
    }
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn prompt_embeddings_match_diffusers() {
    let f = open();
    for name in ["pair", "cut"] {
        let case = &f.expected["text_encoder"][name];
        let prompts = strings(&case["prompts"]);
        let n = case["max_sequence_length"].as_u64().unwrap() as usize;
        let (t5, pooled) = f.embeds(&prompts, n);
        let t5: Vec<f32> = t5.concat();
        let err = rel_l2(&t5, f.r(&format!("te.{name}.t5")));
        assert!(err <= 1e-4, "{name}: T5 relative L2 {err}");
        let err = rel_l2(&pooled.concat(), f.r(&format!("te.{name}.pooled")));
        assert!(err <= 1e-4, "{name}: pooled relative L2 {err}");
    }
}

#[test]
fn schedules_are_the_schedulers_bit_for_bit() {
    let f = open();
    let config = f.scheduler();
    for (steps, n) in [(3, 12), (28, 4096), (50, 1024), (4, 6889)] {
        let s = config.schedule(&ferry::diffuse::scheduler::flow_sigmas(steps), config.mu(n));
        let key = format!("schedule.{steps}x{n}");
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&s.sigmas),
            bits(f.r(&format!("{key}.sigmas"))),
            "{key}"
        );
        assert_eq!(
            bits(&s.timesteps),
            bits(f.r(&format!("{key}.timesteps"))),
            "{key}"
        );
    }
}

#[test]
fn denoising_matches_the_pipeline() {
    let f = open();
    let config = f.config();
    let scheduler = f.scheduler();
    let dit = Flux::new(config.clone());
    let mut weights = f.weights("transformer", &dit);
    for name in ["plain", "short", "batch"] {
        let case = &f.expected["denoise"][name];
        let u = |k: &str| case[k].as_u64().unwrap() as usize;
        let (height, width, steps) = (u("height"), u("width"), u("steps"));
        let prompts = strings(&case["prompt"]);
        let batch = prompts.len();
        let guidance = case["guidance_scale"].as_f64().unwrap() as f32;
        let (t5, pooled) = f.embeds(&prompts, u("max_sequence_length"));
        let texts: Vec<&[f32]> = t5.iter().map(Vec::as_slice).collect();
        let pooled: Vec<&[f32]> = pooled.iter().map(Vec::as_slice).collect();
        let schedule = packed::schedule(&scheduler, steps, height, width).unwrap();
        let job = |modulation| Denoise {
            latents: f.r(&format!("{name}.noise")).to_vec(),
            batch,
            height,
            width,
            texts: &texts,
            pooled: &pooled,
            guidance: Some(guidance),
            modulation,
        };
        let mut seen = Vec::new();
        let latents = denoise(&Cpu, &dit, &mut weights, &schedule, job(None), |i, x| {
            seen.push((i, x.to_vec()))
        })
        .unwrap();
        assert_eq!(seen.len(), steps, "{name}: one callback per step");
        for (i, x) in &seen {
            let err = rel_l2(x, f.r(&format!("{name}.step{i}")));
            assert!(err <= 1e-4, "{name}: step {i} relative L2 {err}");
        }
        let err = rel_l2(&latents, f.r(&format!("{name}.latents")));
        eprintln!("denoise {name}: final latents relative L2 {err:.2e}");
        assert!(err <= 1e-4, "{name}: relative L2 {err}");
        assert!(rel_l2(&latents, f.r(&format!("{name}.noise"))) > 0.05);

        // The modulation made once for the schedule, the steps without those weights: the
        // same bits.
        let steps_dit = Flux::precomputed(config.clone());
        let m = steps_dit.modulation_model();
        let mut mw = f.weights("transformer", &m);
        let table = m
            .table(
                &Cpu,
                &mut mw,
                &packed::model_times(&schedule),
                Some(guidance),
                &pooled,
            )
            .unwrap();
        let mut sw = f.weights("transformer", &steps_dit);
        let once = denoise(
            &Cpu,
            &steps_dit,
            &mut sw,
            &schedule,
            job(Some(&table)),
            |_, _| {},
        )
        .unwrap();
        assert!(
            once.iter()
                .map(|v| v.to_bits())
                .eq(latents.iter().map(|v| v.to_bits())),
            "{name}: precomputed modulation changed the latents"
        );
    }
}

/// `ferry image` on the fixture with `args` after the model.
fn image(args: &[&str]) -> std::process::Output {
    let model = fixture("flux-pipeline");
    let mut all = vec![
        "image",
        "--device",
        "cpu",
        "--model",
        model.to_str().unwrap(),
    ];
    all.extend_from_slice(args);
    ferry(&all)
}

#[test]
fn images_match_diffusers_to_one_level_per_pixel() {
    let dir = tempfile::tempdir().unwrap();
    let f = open();
    let c = &f.expected["denoise"]["plain"];
    let shape: Vec<usize> =
        serde_json::from_value(f.expected["shapes"]["plain.noise"].clone()).unwrap();
    let noise = dir.path().join("noise.safetensors");
    write_noise(&noise, f.r("plain.noise"), &shape);
    let out = dir.path().join("plain.png");
    let size = format!("{}x{}", c["width"], c["height"]);
    let steps = c["steps"].to_string();
    let guidance = c["guidance_scale"].to_string();
    let run = image(&[
        "--prompt",
        c["prompt"][0].as_str().unwrap(),
        "--size",
        &size,
        "--steps",
        &steps,
        "--guidance",
        &guidance,
        "--noise",
        noise.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(summary["model"], "Flux.1", "{summary}");
    let want: Vec<f32> = f
        .r("plain.image")
        .iter()
        .map(|v| (v * 255.0).round())
        .collect();
    let (got, params) = read_png(&out);
    assert_eq!(got.len(), want.len(), "image size");
    let worst = got
        .iter()
        .zip(&want)
        .map(|(&g, &w)| (g as f32 - w).abs())
        .fold(0.0, f32::max);
    assert!(worst <= 1.0, "a pixel is {worst} levels off");
    assert!(params.contains(&format!("Steps: {steps},")), "{params}");
}

/// Without --steps and --guidance the pipeline's defaults apply (28 steps, guidance 3.5); a
/// negative prompt is said to have no effect (Flux.1 is guidance-distilled).
#[test]
fn the_pipelines_defaults_apply() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("d.png");
    let run = image(&[
        "--prompt",
        "a fox",
        "--negative-prompt",
        "blurry",
        "--size",
        "32x32",
        "--seed",
        "3",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let s: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(
        (s["steps"].as_u64(), s["guidance"].as_f64()),
        (Some(28), Some(3.5))
    );
    assert_eq!(s["negative_tokens"].as_u64(), Some(0), "{s}");
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("--negative-prompt has no effect"), "{err}");
}

#[test]
fn bad_input_is_named() {
    let dir = tempfile::tempdir().unwrap();
    // Noise of the wrong shape.
    let noise = dir.path().join("noise.safetensors");
    write_noise(&noise, &vec![0.0; 3 * 64], &[1, 3, 64]);
    let out = dir.path().join("x.png");
    let run = image(&[
        "--prompt",
        "a fox",
        "--size",
        "64x48",
        "--noise",
        noise.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success() && err.contains("noise"), "{err}");
    assert!(err.contains("[1, 12, 64]"), "{err}");
    assert!(!out.exists());

    // A pipeline without T5, and one whose DiT does not take T5's width.
    let copy = |to: &std::path::Path| {
        for e in walk(&fixture("flux-pipeline")) {
            let rel = e.strip_prefix(fixture("flux-pipeline")).unwrap();
            let dst = to.join(rel);
            std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
            std::fs::copy(&e, &dst).unwrap();
        }
    };
    let no_t5 = dir.path().join("no-t5");
    copy(&no_t5);
    std::fs::remove_dir_all(no_t5.join("text_encoder_2")).unwrap();
    let e = ferry::diffuse::pipeline::ImagePipeline::open(&no_t5)
        .err()
        .unwrap();
    assert!(e.to_string().contains("text_encoder_2"), "{e}");

    let wide = dir.path().join("wide");
    copy(&wide);
    let cfg = wide.join("transformer/config.json");
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cfg).unwrap()).unwrap();
    json["joint_attention_dim"] = serde_json::json!(48);
    std::fs::write(&cfg, serde_json::to_vec(&json).unwrap()).unwrap();
    let e = ferry::diffuse::pipeline::ImagePipeline::open(&wide)
        .err()
        .unwrap();
    let msg = e.to_string();
    assert!(
        msg.contains("joint_attention_dim 48") && msg.contains("d_model 32"),
        "{msg}"
    );
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
