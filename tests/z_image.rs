//! The Z-Image DiT on the CPU against diffusers f32 (tests/fixtures/z-image, written by
//! scripts/make_zimage_fixture.py): one forward, and the denoising loop of each case.

mod common;

use std::collections::BTreeMap;

use ferry::backend::cpu::Cpu;
use ferry::backend::Backend;
use ferry::checkpoint::Pipeline;
use ferry::model::z_image::{Sample, ZImage, ZImageConfig};
use ferry::model::{Architecture, ResidentWeights};

use common::{read_reference, rel_l2};

struct Fixture {
    pipeline: Pipeline,
    reference: BTreeMap<String, Vec<f32>>,
    expected: serde_json::Value,
}

fn fixture() -> Fixture {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/z-image");
    let pipeline = Pipeline::open(&dir).expect("the tiny Z-Image pipeline");
    let expected =
        serde_json::from_slice(&std::fs::read(dir.join("expected.json")).unwrap()).unwrap();
    Fixture {
        reference: read_reference(&dir.join("reference.safetensors")),
        pipeline,
        expected,
    }
}

fn model(f: &Fixture) -> (ZImage, ResidentWeights<ferry::backend::cpu::CpuWeight>) {
    let c = f.pipeline.component("transformer").unwrap();
    let (path, json) = c.config().unwrap();
    let dit = ZImage::new(ZImageConfig::from_json(path, json).unwrap());
    dit.check_tensors(c).unwrap();
    let w = ResidentWeights::load(c, dit.groups(), |t| Cpu.weight(t)).unwrap();
    (dit, w)
}

#[test]
fn one_forward_matches_diffusers() {
    let f = fixture();
    let (dit, mut w) = model(&f);
    let r = &f.reference;
    let t = r["dit.t"][0];
    let (h, wd) = (6, 8);
    let out = dit
        .forward(
            &Cpu,
            &mut w,
            &[Sample {
                latents: &r["dit.x"],
                caption: &r["dit.cap_feats"],
                t,
            }],
            h,
            wd,
        )
        .unwrap();
    let err = rel_l2(&out[0], &r["dit.output"]);
    assert!(err <= 1e-4, "DiT output relative L2 {err}");
    // A later step (t ≠ 0) exercises the timestep embedding's frequencies.
    let _ = &f.expected;
}

/// Each case's latents after every step, from the reference's noise and text embeddings.
#[test]
fn the_denoising_loop_matches_diffusers_at_every_step() {
    use ferry::diffuse::scheduler::{z_image_sigmas, FlowMatchConfig};
    use ferry::diffuse::z_image::{denoise, Denoise, Guidance};
    let f = fixture();
    let (dit, mut w) = model(&f);
    let sched = f.pipeline.component("scheduler").unwrap();
    let (path, json) = sched.config().unwrap();
    let flow = FlowMatchConfig::from_json(path, json).unwrap();
    for case in ["turbo", "cfg", "trunc"] {
        let c = &f.expected["cases"][case];
        let r = |name: &str| &f.reference[&format!("{case}.{name}")];
        let steps = c["num_inference_steps"].as_u64().unwrap() as usize;
        let schedule = flow.schedule(&z_image_sigmas(steps), c["mu"].as_f64().unwrap());
        let want_sigmas: Vec<f32> = serde_json::from_value(c["sigmas"].clone()).unwrap();
        assert_eq!(schedule.sigmas, want_sigmas, "{case}: sigmas");
        assert_eq!(&schedule.timesteps, r("timesteps"), "{case}: timesteps");
        let shape: Vec<usize> = serde_json::from_value(c["latent_shape"].clone()).unwrap();
        let (b, h, wd) = (shape[0], shape[2], shape[3]);
        let noise = r("noise");
        let latents: Vec<Vec<f32>> = noise.chunks(noise.len() / b).map(<[f32]>::to_vec).collect();
        let prompts = vec![r("prompt_embeds").clone(); b];
        let negatives = match f.reference.get(&format!("{case}.negative_prompt_embeds")) {
            Some(n) => vec![n.clone(); b],
            None => Vec::new(),
        };
        let normalization = match &c["cfg_normalization"] {
            serde_json::Value::Bool(on) => *on as u8 as f32,
            v => v.as_f64().unwrap_or(0.0) as f32,
        };
        let guidance = Guidance {
            scale: c["guidance_scale"].as_f64().unwrap() as f32,
            normalization,
            truncation: c["cfg_truncation"].as_f64().unwrap() as f32,
        };
        let mut worst: f64 = 0.0;
        let job = Denoise {
            latents,
            prompts: &prompts,
            negatives: &negatives,
            height: h,
            width: wd,
            guidance,
        };
        denoise(&Cpu, &dit, &mut w, &schedule, job, |i, lat| {
            let got: Vec<f32> = lat.concat();
            let err = rel_l2(&got, r(&format!("latents.{i}")));
            worst = worst.max(err);
            assert!(
                err <= 1e-4,
                "{case}: latents after step {i}: relative L2 {err}"
            );
        })
        .unwrap();
        eprintln!("{case}: worst relative L2 over {steps} steps {worst:.2e}");
    }
}
