//! The Z-Image DiT and its denoising loop on the CPU against diffusers f32 (the tiny pipeline
//! in tests/fixtures/z-image, written by scripts/make_zimage_fixture.py): one forward with its
//! intermediates, the scheduler's sigmas and timesteps, the latents after every step of the
//! turbo, cfg and trunc cases (guidance as two samples of one pass), weights handed over
//! fresh per pass, and bad input.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use ferry::backend::cpu::{Cpu, CpuWeight};
use ferry::backend::Backend;
use ferry::checkpoint::{Component, HostTensor, Pipeline, Storage};
use ferry::diffuse::guidance::Guidance;
use ferry::diffuse::scheduler::{z_image_sigmas, FlowMatchConfig};
use ferry::model::z_image::{DitInput, ZImage, ZImageConfig};
use ferry::model::{Architecture, ResidentWeights, Weights};
use ferry::Error;

use common::{read_reference, rel_l2};

struct Fixture {
    pipeline: Pipeline,
    reference: BTreeMap<String, Vec<f32>>,
    expected: serde_json::Value,
}

fn fixture() -> Fixture {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/z-image");
    let pipeline = Pipeline::open(&dir).expect("the tiny Z-Image pipeline");
    let expected = serde_json::from_slice(&std::fs::read(dir.join("expected.json")).unwrap())
        .expect("expected.json");
    Fixture {
        reference: read_reference(&dir.join("reference.safetensors")),
        pipeline,
        expected,
    }
}

impl Fixture {
    fn transformer(&self) -> &Component {
        self.pipeline.component("transformer").unwrap()
    }
    fn model(&self) -> ZImage {
        let (path, json) = self.transformer().config().unwrap();
        let dit = ZImage::new(ZImageConfig::from_json(path, json).unwrap());
        dit.check_tensors(self.transformer()).unwrap();
        dit
    }
    fn resident(&self, dit: &ZImage) -> ResidentWeights<CpuWeight> {
        ResidentWeights::load(self.transformer(), dit.groups(), |t| Cpu.weight(t)).unwrap()
    }
    fn r(&self, name: &str) -> &[f32] {
        self.reference
            .get(name)
            .unwrap_or_else(|| panic!("reference tensor {name}"))
    }
}

fn close(what: &str, got: &[f32], want: &[f32]) {
    let err = rel_l2(got, want);
    eprintln!("{what}: relative L2 {err:.2e}");
    assert!(err <= 1e-4, "{what}: relative L2 {err:.3e} > 1e-4");
}

#[test]
fn one_forward_and_its_intermediates_match_diffusers() {
    let f = fixture();
    let dit = f.model();
    let mut w = f.resident(&dit);
    let (dim, n, pf) = (32, 12, 64); // width, image tokens, patch features
    let mut trace = BTreeMap::new();
    let mut record = |name: &str, v: Vec<f32>| {
        trace.insert(name.to_string(), v);
    };
    let input = DitInput {
        latents: f.r("dit.x"),
        height: 6,
        width: 8,
        t: f.r("dit.t"),
        captions: &[f.r("dit.cap_feats")],
    };
    let out = dit
        .forward_traced(&Cpu, &mut w, &input, Some(&mut record))
        .unwrap();
    close("output", &out, f.r("dit.output"));
    close("t_emb", &trace["t_emb"], f.r("dit.t_emb"));
    close("x_embed", &trace["x_embed"], &f.r("dit.x_embed")[..n * dim]);
    close(
        "cap_embed",
        &trace["cap_embed"],
        &f.r("dit.cap_embed")[..31 * dim],
    );
    for name in [
        "noise_refiner_in",
        "noise_refiner.0",
        "context_refiner_in",
        "context_refiner.0",
        "unified_in",
        "unified_freqs",
        "layers.0.attention",
        "layers.0.feed_forward",
        "layers.0",
        "layers.1",
    ] {
        close(name, &trace[name], f.r(&format!("dit.{name}")));
    }
    close(
        "final_layer",
        &trace["final_layer"],
        &f.r("dit.final_layer")[..n * pf],
    );
}

/// Four samples of one pass at the four timesteps of the turbo case: each sample's timestep
/// embedding is diffusers' (t = 0 alone hides frequency bugs), and sample 0 is the forward
/// above.
#[test]
fn batched_timesteps_match_diffusers() {
    let f = fixture();
    let dit = f.model();
    let mut w = f.resident(&dit);
    let x = f.r("dit.x");
    let latents = x.repeat(4);
    let cap = f.r("dit.cap_feats");
    let mut trace = BTreeMap::new();
    let mut record = |name: &str, v: Vec<f32>| {
        trace.insert(name.to_string(), v);
    };
    let input = DitInput {
        latents: &latents,
        height: 6,
        width: 8,
        t: f.r("turbo.dit_timestep"),
        captions: &[cap, cap, cap, cap],
    };
    let out = dit
        .forward_traced(&Cpu, &mut w, &input, Some(&mut record))
        .unwrap();
    close("t_emb_steps", &trace["t_emb"], f.r("dit.t_emb_steps"));
    // Samples do not see each other: sample 0 is the lone forward's output.
    close("batch sample 0", &out[..x.len()], f.r("dit.output"));
    let alone = dit
        .forward(
            &Cpu,
            &mut w,
            &DitInput {
                latents: x,
                t: &input.t[..1],
                captions: &[cap],
                ..input
            },
        )
        .unwrap();
    close("batch sample 0 vs alone", &out[..x.len()], &alone);
}

#[test]
fn scheduler_matches_diffusers() {
    let f = fixture();
    let sched = f.pipeline.component("scheduler").unwrap();
    let (path, json) = sched.config().unwrap();
    let config = FlowMatchConfig::from_json(path, json).unwrap();
    for case in ["turbo", "cfg", "trunc"] {
        let c = &f.expected["cases"][case];
        let steps = c["num_inference_steps"].as_u64().unwrap() as usize;
        let s = config.schedule(&z_image_sigmas(steps), c["mu"].as_f64().unwrap());
        assert_eq!(s.sigmas, f.r(&format!("{case}.sigmas")), "{case}: sigmas");
        assert_eq!(
            s.timesteps,
            f.r(&format!("{case}.timesteps")),
            "{case}: timesteps"
        );
        let t: Vec<f32> = s.timesteps.iter().map(|&t| model_time(t)).collect();
        assert_eq!(
            t,
            f.r(&format!("{case}.dit_timestep")),
            "{case}: the DiT's t"
        );
    }
}

/// The pipeline's `(1000 − timestep) / 1000` in f32.
fn model_time(timestep: f32) -> f32 {
    (1000.0 - timestep) / 1000.0
}

/// Run case `case` of the fixture from its noise and text embeddings, one DiT pass per step
/// (both guidance branches in it), checking the DiT's outputs and the latents after every
/// step.
fn denoise(case: &str) {
    let f = fixture();
    let dit = f.model();
    let mut w = f.resident(&dit);
    let c = &f.expected["cases"][case];
    let shape: Vec<usize> = serde_json::from_value(c["latent_shape"].clone()).unwrap();
    let (b, h, wd) = (shape[0], shape[2], shape[3]);
    let guidance = Guidance {
        scale: c["guidance_scale"].as_f64().unwrap() as f32,
        normalization: if c["cfg_normalization"].as_bool().unwrap() {
            1.0
        } else {
            0.0
        },
        truncation: c["cfg_truncation"].as_f64().unwrap() as f32,
    };
    let sched = f.pipeline.component("scheduler").unwrap();
    let (path, json) = sched.config().unwrap();
    let steps = c["num_inference_steps"].as_u64().unwrap() as usize;
    let schedule = FlowMatchConfig::from_json(path, json)
        .unwrap()
        .schedule(&z_image_sigmas(steps), c["mu"].as_f64().unwrap());
    let pos = f.r(&format!("{case}.prompt_embeds"));
    let neg = f.reference.get(&format!("{case}.negative_prompt_embeds"));
    let image_len = 16 * h * wd;

    let mut latents = f.r(&format!("{case}.noise")).to_vec();
    for i in 0..steps {
        let t = model_time(schedule.timesteps[i]);
        let cfg = guidance.applies(t);
        assert_eq!(
            cfg,
            c["cfg_applied"][i].as_bool().unwrap(),
            "{case} step {i}: CFG"
        );
        // [pos × B, neg × B] on the same latents when guided.
        let mut captions: Vec<&[f32]> = vec![pos; b];
        let mut input_latents = latents.clone();
        if cfg {
            captions.extend(std::iter::repeat_n(neg.unwrap().as_slice(), b));
            input_latents.extend_from_slice(&latents);
        }
        let ts = vec![t; captions.len()];
        let out = dit
            .forward(
                &Cpu,
                &mut w,
                &DitInput {
                    latents: &input_latents,
                    height: h,
                    width: wd,
                    t: &ts,
                    captions: &captions,
                },
            )
            .unwrap();
        close(
            &format!("{case} step {i} model output"),
            &out,
            f.r(&format!("{case}.model_output.{i}")),
        );
        let guided = if cfg {
            guidance.combine(&out, image_len)
        } else {
            out
        };
        let velocity: Vec<f32> = guided.iter().map(|v| -v).collect();
        close(
            &format!("{case} step {i} noise_pred"),
            &velocity,
            f.r(&format!("{case}.noise_pred.{i}")),
        );
        schedule.step(i, &mut latents, &velocity);
        close(
            &format!("{case} step {i} latents"),
            &latents,
            f.r(&format!("{case}.latents.{i}")),
        );
    }
}

#[test]
fn turbo_loop_matches_diffusers() {
    denoise("turbo");
}

#[test]
fn cfg_loop_in_one_pass_per_step_matches_diffusers() {
    denoise("cfg");
}

#[test]
fn truncated_normalized_cfg_loop_matches_diffusers() {
    denoise("trunc");
}

/// The loop that ships (`diffuse::z_image::denoise`, used by `ferry image`) gives the same
/// latents as diffusers after every step of every case.
#[test]
fn the_shipped_denoising_loop_matches_diffusers_at_every_step() {
    use ferry::diffuse::z_image::{denoise, Denoise};
    let f = fixture();
    let dit = f.model();
    let mut w = f.resident(&dit);
    let sched = f.pipeline.component("scheduler").unwrap();
    let (path, json) = sched.config().unwrap();
    let flow = FlowMatchConfig::from_json(path, json).unwrap();
    for case in ["turbo", "cfg", "trunc"] {
        let c = &f.expected["cases"][case];
        let steps = c["num_inference_steps"].as_u64().unwrap() as usize;
        let schedule = flow.schedule(&z_image_sigmas(steps), c["mu"].as_f64().unwrap());
        let shape: Vec<usize> = serde_json::from_value(c["latent_shape"].clone()).unwrap();
        let guidance = Guidance {
            scale: c["guidance_scale"].as_f64().unwrap() as f32,
            normalization: c["cfg_normalization"].as_bool().unwrap() as u8 as f32,
            truncation: c["cfg_truncation"].as_f64().unwrap() as f32,
        };
        let job = Denoise {
            latents: f.r(&format!("{case}.noise")).to_vec(),
            batch: shape[0],
            prompt: f.r(&format!("{case}.prompt_embeds")),
            negative: f
                .reference
                .get(&format!("{case}.negative_prompt_embeds"))
                .map(Vec::as_slice),
            height: shape[2],
            width: shape[3],
            guidance,
        };
        let mut seen = 0;
        denoise(&Cpu, &dit, &mut w, &schedule, job, |i, latents| {
            close(
                &format!("{case}: latents after step {i}"),
                latents,
                f.r(&format!("{case}.latents.{i}")),
            );
            seen += 1;
        })
        .unwrap();
        assert_eq!(seen, steps, "{case}: every step reported");
    }
}

/// Hands out each group's weights copied afresh into new host memory on every call, as a
/// streaming engine hands out slots.
struct FreshCopies<'a> {
    component: &'a Component,
    groups: &'a [ferry::model::WeightGroup],
    current: Vec<CpuWeight>,
    asked: Vec<usize>,
    finished: usize,
}

impl Weights<CpuWeight> for FreshCopies<'_> {
    fn group(&mut self, index: usize) -> ferry::Result<&[CpuWeight]> {
        self.asked.push(index);
        self.current = self.groups[index]
            .tensors
            .iter()
            .map(|spec| {
                let t = self.component.tensor(&spec.name)?;
                Cpu.weight(&copy(t))
            })
            .collect::<ferry::Result<_>>()?;
        Ok(&self.current)
    }
    fn finish_pass(&mut self) -> ferry::Result<()> {
        self.finished += 1;
        Ok(())
    }
}

/// `t` in new host memory of its own.
fn copy(t: &HostTensor) -> HostTensor {
    let len = t.bytes().len();
    HostTensor::new(
        t.name.clone(),
        t.dtype,
        t.shape.clone(),
        Arc::new(owned(t)),
        0,
        len,
    )
}

#[test]
fn fresh_weights_per_group_give_the_same_bits() {
    let f = fixture();
    let dit = f.model();
    let mut resident = f.resident(&dit);
    let cap = f.r("cfg.prompt_embeds");
    let neg = f.r("cfg.negative_prompt_embeds");
    let input = DitInput {
        latents: &f.r("cfg.noise").repeat(2),
        height: 8,
        width: 8,
        t: &[0.25, 0.25, 0.5, 0.5],
        captions: &[cap, cap, neg, neg],
    };
    let want = dit.forward(&Cpu, &mut resident, &input).unwrap();
    let mut fresh = FreshCopies {
        component: f.transformer(),
        groups: dit.groups(),
        current: Vec::new(),
        asked: Vec::new(),
        finished: 0,
    };
    let got = dit.forward(&Cpu, &mut fresh, &input).unwrap();
    assert!(
        got.iter()
            .zip(&want)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "fresh copies differ from resident weights"
    );
    // Every group once, in pass order, then the end of the pass.
    assert_eq!(fresh.asked, (0..dit.groups().len()).collect::<Vec<_>>());
    assert_eq!(fresh.finished, 1);
}

#[test]
fn groups_and_costs() {
    let f = fixture();
    let dit = f.model();
    let labels: Vec<&str> = dit.groups().iter().map(|g| g.label.as_str()).collect();
    assert_eq!(
        labels,
        [
            "embedders",
            "noise refiner 0",
            "context refiner 0",
            "block 0",
            "block 1",
            "final layer"
        ]
    );
    // Every tensor of the checkpoint is in exactly one group.
    let mut names: Vec<&str> = dit
        .groups()
        .iter()
        .flat_map(|g| g.tensors.iter().map(|t| t.name.as_str()))
        .collect();
    names.sort();
    let all: Vec<&str> = f.transformer().tensors.keys().map(String::as_str).collect();
    assert_eq!(names, all);

    // The real Z-Image-Turbo: 6.15 B parameters; a 1024² step with a 100-token caption.
    let real = ZImage::new(
        ZImageConfig::from_json(
            Path::new("config.json"),
            &serde_json::json!({
                "_class_name": "ZImageTransformer2DModel", "all_f_patch_size": [1],
                "all_patch_size": [2], "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512],
                "cap_feat_dim": 2560, "dim": 3840, "in_channels": 16, "n_heads": 30,
                "n_kv_heads": 30, "n_layers": 30, "n_refiner_layers": 2, "norm_eps": 1e-05,
                "qk_norm": true, "rope_theta": 256.0, "t_scale": 1000.0
            }),
        )
        .unwrap(),
    );
    let params: usize = real
        .groups()
        .iter()
        .flat_map(|g| &g.tensors)
        .map(|t| t.numel())
        .sum();
    assert!((6.14e9..6.16e9).contains(&(params as f64)), "{params}");
    let cost = real.step_cost(4096, 100, 1);
    assert_eq!(cost.flops.len(), real.groups().len());
    assert_eq!(cost.cache, 0);
    // A main block: 2 FLOPs per weight per row over 4096 + 128 rows, plus attention.
    let rows = 4096.0 + 128.0;
    let weights = 4.0 * 3840.0 * 3840.0 + 3.0 * 3840.0 * 10240.0;
    let block = 2.0 * weights * rows + 4.0 * rows * rows * 3840.0 + 2.0 * 256.0 * 4.0 * 3840.0;
    assert_eq!(cost.flops[5], block);
    let total: f64 = cost.flops.iter().sum();
    // 30 main blocks ≈ 53 T, the two noise refiners ≈ 3.4 T, the rest ≈ 0.1 T.
    assert!(
        (56.0..57.0).contains(&(total / 1e12)),
        "{} TFLOP",
        total / 1e12
    );
    // The feed-forward half of a main block dominates: [rows, 2·dim + 2·ffn] bf16.
    assert!(cost.workspace > (rows as usize) * (2 * 3840 + 2 * 10240) * 2);
    assert!(cost.workspace < 400 << 20, "{}", cost.workspace);
    let cfg = real.step_cost(4096, 100, 2);
    assert!(cfg.workspace > cost.workspace && cfg.flops[5] == 2.0 * block);
}

/// The fixture's transformer config with `edit` applied, parsed.
fn config_with(edit: impl FnOnce(&mut serde_json::Value)) -> Result<ZImageConfig, Error> {
    let f = fixture();
    let (_, json) = f.transformer().config().unwrap();
    let mut json = json.clone();
    edit(&mut json);
    ZImageConfig::from_json(Path::new("z/transformer/config.json"), &json)
}

#[test]
fn unsupported_config_values_are_named() {
    use serde_json::json;
    // (field, the value it is set to)
    let cases = [
        ("_class_name", json!("FluxTransformer2DModel")),
        ("siglip_feat_dim", json!(1152)),
        ("all_f_patch_size", json!([2])),
        ("all_patch_size", json!([2, 4])),
        ("axes_dims", json!([4, 6, 8])),
        ("n_heads", json!(3)),
        ("dim", json!("wide")),
    ];
    for (field, value) in cases {
        let e = config_with(|j| j[field] = value).unwrap_err().to_string();
        assert!(
            e.contains(field) && e.contains("z/transformer/config.json"),
            "{field}: {e}"
        );
    }
    let e = config_with(|j| {
        j.as_object_mut().unwrap().remove("cap_feat_dim");
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("cap_feat_dim"), "{e}");
    assert!(config_with(|_| {}).is_ok());
}

#[test]
fn missing_or_misshapen_tensors_are_named() {
    let f = fixture();
    let dit = f.model();
    let mut broken = Component::open("transformer", &f.transformer().dir, true).unwrap();
    broken.tensors.remove("layers.1.feed_forward.w2.weight");
    let e = dit.check_tensors(&broken).unwrap_err().to_string();
    assert!(
        e.contains("layers.1.feed_forward.w2.weight") && e.contains("transformer"),
        "{e}"
    );

    let mut broken = Component::open("transformer", &f.transformer().dir, true).unwrap();
    let t = broken.tensors["x_pad_token"].clone();
    let len = t.bytes().len();
    let wrong = HostTensor::new(
        t.name.clone(),
        t.dtype,
        vec![32],
        Arc::new(owned(&t)),
        0,
        len,
    );
    broken.tensors.insert("x_pad_token".into(), wrong);
    let e = dit.check_tensors(&broken).unwrap_err().to_string();
    assert!(e.contains("x_pad_token") && e.contains("[1, 32]"), "{e}");
}

fn owned(t: &HostTensor) -> Storage {
    let mut s = Storage::owned(t.bytes().len());
    s.bytes_mut().unwrap().copy_from_slice(t.bytes());
    s
}

#[test]
fn bad_inputs_are_typed_errors() {
    let f = fixture();
    let dit = f.model();
    let mut w = f.resident(&dit);
    let x = f.r("dit.x");
    let cap = f.r("dit.cap_feats");
    let run = |w: &mut ResidentWeights<CpuWeight>, input: DitInput<'_>| {
        dit.forward(&Cpu, w, &input).unwrap_err().to_string()
    };
    let e = run(
        &mut w,
        DitInput {
            latents: &x[1..],
            height: 6,
            width: 8,
            t: &[0.0],
            captions: &[cap],
        },
    );
    assert!(e.contains("latents") && e.contains("[1, 16, 6, 8]"), "{e}");
    let e = run(
        &mut w,
        DitInput {
            latents: &x[..16 * 5 * 8],
            height: 5,
            width: 8,
            t: &[0.0],
            captions: &[cap],
        },
    );
    assert!(e.contains("5×8") && e.contains("patch size 2"), "{e}");
    let e = run(
        &mut w,
        DitInput {
            latents: x,
            height: 6,
            width: 8,
            t: &[0.0],
            captions: &[&cap[1..]],
        },
    );
    assert!(e.contains("caption") && e.contains("64"), "{e}");
    let e = run(
        &mut w,
        DitInput {
            latents: x,
            height: 6,
            width: 8,
            t: &[0.0, 0.5],
            captions: &[cap],
        },
    );
    assert!(e.contains("2 timesteps and 1 captions"), "{e}");
    let long = cap.repeat(40); // 1240 tokens: beyond axes_lens[0] = 1024 positions
    let e = run(
        &mut w,
        DitInput {
            latents: x,
            height: 6,
            width: 8,
            t: &[0.0],
            captions: &[&long],
        },
    );
    assert!(e.contains("axes_lens"), "{e}");
}

#[test]
fn the_dit_streamed_on_the_cpu_equals_resident_bit_for_bit() {
    use ferry::backend::cpu_stream::{cpu_streamed_weights, HostStorage};
    use ferry::diffuse::pipeline::gaussian_noise;
    use ferry::model::z_image::padded;
    use ferry::model::PassShape;
    use ferry::stream::{plan, BudgetAllocator, GroupTensors, Purpose};

    // Blocks larger than the embedders (width 128), random bf16 weights: the streaming loop
    // that ships on the GPU, over the CPU copy engine.
    let json = serde_json::json!({
        "_class_name": "ZImageTransformer2DModel", "all_f_patch_size": [1], "all_patch_size": [2],
        "axes_dims": [8, 12, 12], "axes_lens": [1024, 512, 512], "cap_feat_dim": 32, "dim": 128,
        "in_channels": 16, "n_heads": 4, "n_kv_heads": 4, "n_layers": 3, "n_refiner_layers": 1,
        "norm_eps": 1e-5, "qk_norm": true, "rope_theta": 256.0, "t_scale": 1000.0,
    });
    let dit = ZImage::new(ZImageConfig::from_json(Path::new("test/config.json"), &json).unwrap());
    let tr = ferry::synth::random_component(
        "transformer",
        "ZImageTransformer2DModel",
        json,
        dit.groups(),
        9,
    );
    // Two samples with captions of different lengths, 8×8 latents.
    let (h, w) = (8, 8);
    let latents = gaussian_noise(5, 2 * 16 * h * w);
    let captions = [gaussian_noise(6, 20 * 32), gaussian_noise(7, 45 * 32)];
    let caps: Vec<&[f32]> = captions.iter().map(Vec::as_slice).collect();
    let input = DitInput {
        latents: &latents,
        height: h,
        width: w,
        t: &[0.25, 0.75],
        captions: &caps,
    };
    let mut rw = ResidentWeights::load(&tr, dit.groups(), |t| Cpu.weight(t)).unwrap();
    let want = dit.forward(&Cpu, &mut rw, &input).unwrap();

    let shape = PassShape {
        tokens: padded(16) + padded(45),
        batch: 2,
        past: 0,
    };
    let cost = dit.pass_cost(shape);
    let fixed = cost.cache + cost.workspace;
    let least = common::least_budget(&common::cpu_request(&dit, &tr, shape, fixed)).budget;
    let all = fixed + tr.bytes();
    let model = GroupTensors::of(&tr, &dit).unwrap();
    let mut streamed = 0;
    for share in [0.0, 0.3, 0.7, 1.0] {
        let budget = least + (share * (all - least) as f64) as usize;
        let p = plan(&common::cpu_request(&dit, &tr, shape, budget)).unwrap();
        streamed += !p.pieces.is_empty() as usize;
        let alloc = BudgetAllocator::new(HostStorage, p.budget);
        let _ws = alloc.alloc(Purpose::Workspace, p.workspace).unwrap();
        let (mut weights, _residents) =
            cpu_streamed_weights(&model, p, &alloc, None, Some(0.2)).unwrap();
        // Two steps: the second starts from the prefetch that wrapped around.
        for step in 0..2 {
            let got = dit.forward(&Cpu, &mut weights, &input).unwrap();
            assert!(
                got.iter()
                    .map(|v| v.to_bits())
                    .eq(want.iter().map(|v| v.to_bits())),
                "{share} of the way from the least budget, step {step}: streamed differs"
            );
        }
        assert!(alloc.peak() <= alloc.budget(), "over the budget");
    }
    assert!(streamed >= 2, "only {streamed} budgets streamed");
}
