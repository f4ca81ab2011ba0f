//! The Flux DiT on the CPU against diffusers f32 (the tiny transformer in tests/fixtures/flux,
//! written by scripts/make_flux_fixture.py): one batched forward of two samples with
//! different σ, guidance, pooled embeddings and texts on a non-square image with its
//! intermediates, a sample alone, the packed latent layout, weights handed over fresh per pass
//! and streamed, the modulation computed once for a schedule, groups and costs, and bad input.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use ferry::backend::cpu::{Cpu, CpuWeight};
use ferry::backend::Backend;
use ferry::checkpoint::{Component, HostTensor, Storage};
use ferry::model::flux::{pack_latents, DitInput, Flux, FluxConfig};
use ferry::model::{Architecture, ResidentWeights, Weights};
use ferry::Error;

use common::{read_reference, rel_l2};

/// Head dim, joint_attention_dim, image tokens (3 × 5), text tokens per sample, packed
/// features.
const HEAD_DIM: usize = 16;
const TEXT_DIM: usize = 40;
const N: usize = 15;
const TEXT: usize = 6;
const FEATURES: usize = 16;

struct Fixture {
    transformer: Component,
    reference: BTreeMap<String, Vec<f32>>,
}

fn fixture() -> Fixture {
    let dir = common::fixture("flux");
    Fixture {
        transformer: Component::open("transformer", &dir.join("transformer"), true)
            .expect("the tiny Flux transformer"),
        reference: read_reference(&dir.join("reference.safetensors")),
    }
}

impl Fixture {
    fn config(&self) -> FluxConfig {
        let (path, json) = self.transformer.config().unwrap();
        FluxConfig::from_json(path, json).unwrap()
    }
    fn model(&self) -> Flux {
        let dit = Flux::new(self.config());
        dit.check_tensors(&self.transformer).unwrap();
        dit
    }
    fn resident(&self, dit: &Flux) -> ResidentWeights<CpuWeight> {
        ResidentWeights::load(&self.transformer, dit.groups(), |t| Cpu.weight(t)).unwrap()
    }
    fn r(&self, name: &str) -> &[f32] {
        self.reference
            .get(name)
            .unwrap_or_else(|| panic!("reference tensor {name}"))
    }
    /// Sample `s`'s rows of a reference `[2, rows, width]` tensor.
    fn sample(&self, name: &str, s: usize) -> &[f32] {
        let v = self.r(name);
        let half = v.len() / 2;
        &v[s * half..(s + 1) * half]
    }
    fn texts(&self) -> [&[f32]; 2] {
        [0, 1].map(|s| self.sample("batch.encoder_hidden_states", s))
    }
    fn pooled(&self) -> [&[f32]; 2] {
        [0, 1].map(|s| self.sample("batch.pooled_projections", s))
    }
    /// Each sample's text then its image of a block's outputs: how ferry holds the joint
    /// stream.
    fn joint(&self, block: &str) -> Vec<f32> {
        (0..2)
            .flat_map(|s| {
                [
                    self.sample(&format!("batch.{block}.txt"), s),
                    self.sample(&format!("batch.{block}.img"), s),
                ]
                .concat()
            })
            .collect()
    }
}

fn close(what: &str, got: &[f32], want: &[f32]) -> f64 {
    let err = rel_l2(got, want);
    eprintln!("{what}: relative L2 {err:.2e}");
    assert!(err <= 1e-4, "{what}: relative L2 {err:.3e} > 1e-4");
    err
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn a_batch_and_its_intermediates_match_diffusers() {
    let f = fixture();
    let dit = f.model();
    let mut w = f.resident(&dit);
    let (texts, pooled) = (f.texts(), f.pooled());
    let mut trace = BTreeMap::new();
    let mut record = |name: &str, v: Vec<f32>| {
        trace.insert(name.to_string(), v);
    };
    let input = DitInput {
        latents: f.r("batch.hidden_states"),
        height: 6,
        width: 10,
        timestep: f.r("batch.timestep"),
        guidance: Some(f.r("batch.guidance")),
        pooled: &pooled,
        texts: &texts,
    };
    let out = dit
        .forward_traced(&Cpu, &mut w, &input, Some(&mut record))
        .unwrap();
    close("output", &out, f.r("batch.output"));
    close("temb", &trace["temb"], f.r("batch.temb"));
    close("x_embedder", &trace["x_embedder"], f.r("batch.x_embedder"));
    close(
        "context_embedder",
        &trace["context_embedder"],
        f.r("batch.context_embedder"),
    );
    // RoPE of the image tokens: diffusers' rows after the 6 text tokens, each pair's value
    // repeated (repeat_interleave_real).
    let (cos, sin) = (f.r("batch.rope_cos"), f.r("batch.rope_sin"));
    let want: Vec<f32> = (TEXT * HEAD_DIM..cos.len())
        .step_by(2)
        .flat_map(|i| [cos[i], sin[i]])
        .collect();
    close("img_freqs", &trace["img_freqs"], &want);
    assert!(
        cos[..TEXT * HEAD_DIM].iter().all(|&c| c == 1.0),
        "text at 0"
    );
    for i in 0..2 {
        let img = format!("double.{i}.img");
        close(&img, &trace[&img], f.r(&format!("batch.{img}")));
        let txt = format!("double.{i}.txt");
        close(&txt, &trace[&txt], f.r(&format!("batch.{txt}")));
        let single = format!("single.{i}");
        close(&single, &trace[&single], &f.joint(&single));
    }
    close("norm_out", &trace["norm_out"], f.r("batch.norm_out"));
}

/// Flux.1-schnell's shape (no guidance embedder) on the batch's inputs, against diffusers.
#[test]
fn a_model_without_guidance_matches_diffusers() {
    let f = fixture();
    let dir = common::fixture("flux/transformer-schnell");
    let tr = Component::open("transformer", &dir, true).unwrap();
    let (path, json) = tr.config().unwrap();
    let dit = Flux::new(FluxConfig::from_json(path, json).unwrap());
    assert!(!dit.config.guidance_embeds);
    dit.check_tensors(&tr).unwrap();
    // The guidance embedder is not among its tensors (nor asked for).
    assert!(!dit
        .groups()
        .iter()
        .flat_map(|g| &g.tensors)
        .any(|t| t.name.contains("guidance")));
    let mut w = ResidentWeights::load(&tr, dit.groups(), |t| Cpu.weight(t)).unwrap();
    let (texts, pooled) = (f.texts(), f.pooled());
    let mut trace = BTreeMap::new();
    let mut record = |name: &str, v: Vec<f32>| {
        trace.insert(name.to_string(), v);
    };
    let input = DitInput {
        latents: f.r("batch.hidden_states"),
        height: 6,
        width: 10,
        timestep: f.r("batch.timestep"),
        guidance: None,
        pooled: &pooled,
        texts: &texts,
    };
    let out = dit
        .forward_traced(&Cpu, &mut w, &input, Some(&mut record))
        .unwrap();
    close("schnell temb", &trace["temb"], f.r("schnell.temb"));
    close("schnell output", &out, f.r("schnell.output"));
    // Its table takes no guidance.
    let steps = Flux::precomputed(dit.config.clone());
    let m = steps.modulation_model();
    let mut mw = ResidentWeights::load(&tr, m.groups(), |t| Cpu.weight(t)).unwrap();
    let table = m
        .table(&Cpu, &mut mw, f.r("batch.timestep"), None, &pooled)
        .unwrap();
    let mut sw = ResidentWeights::load(&tr, steps.groups(), |t| Cpu.weight(t)).unwrap();
    let taken = steps.forward_with(&Cpu, &mut sw, &input, &table).unwrap();
    assert_eq!(bits(&taken), bits(&out));
    let e = m
        .table(&Cpu, &mut mw, &[0.5], Some(3.5), &pooled)
        .unwrap_err()
        .to_string();
    assert!(e.contains("without guidance_embeds"), "{e}");
}

/// Each sample alone equals its row of the batch bit for bit, and sample 1 is diffusers'
/// lone forward; a sample's text may be shorter than its neighbour's.
#[test]
fn samples_alone_equal_the_batch_bit_for_bit() {
    let f = fixture();
    let dit = f.model();
    let mut w = f.resident(&dit);
    let x = f.r("batch.hidden_states");
    let (t, g) = (f.r("batch.timestep"), f.r("batch.guidance"));
    let (pooled, full) = (f.pooled(), f.texts());
    let one = N * FEATURES;
    // As diffusers has them, then with sample 0's text cut to 4 tokens (ferry only).
    let short = [&full[0][..4 * TEXT_DIM], full[1]];
    for texts in [full, short] {
        let batch = dit
            .forward(
                &Cpu,
                &mut w,
                &DitInput {
                    latents: x,
                    height: 6,
                    width: 10,
                    timestep: t,
                    guidance: Some(g),
                    pooled: &pooled,
                    texts: &texts,
                },
            )
            .unwrap();
        for s in 0..2 {
            let alone = dit
                .forward(
                    &Cpu,
                    &mut w,
                    &DitInput {
                        latents: &x[s * one..(s + 1) * one],
                        height: 6,
                        width: 10,
                        timestep: &t[s..s + 1],
                        guidance: Some(&g[s..s + 1]),
                        pooled: &pooled[s..s + 1],
                        texts: &texts[s..s + 1],
                    },
                )
                .unwrap();
            assert_eq!(
                bits(&alone),
                bits(&batch[s * one..(s + 1) * one]),
                "sample {s} alone differs from its row of the batch"
            );
            if s == 1 {
                close("sample 1 alone vs diffusers", &alone, f.r("alone.output"));
            }
        }
    }
}

#[test]
fn packing_is_the_pipelines() {
    let f = fixture();
    let packed = pack_latents(f.r("batch.latents_unpacked"), 2, 4, 6, 10);
    assert_eq!(packed, f.r("batch.hidden_states"));
}

/// Hands out a fresh copy of each group's weights when asked (as a streaming engine does)
/// and records the order.
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
            .map(|spec| Cpu.weight(&copy(self.component.tensor(&spec.name)?)))
            .collect::<ferry::Result<_>>()?;
        Ok(&self.current)
    }
    fn finish_pass(&mut self) -> ferry::Result<()> {
        self.finished += 1;
        Ok(())
    }
}

fn owned(t: &HostTensor) -> Storage {
    let mut s = Storage::owned(t.bytes().len());
    s.bytes_mut().unwrap().copy_from_slice(t.bytes());
    s
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
    let (texts, pooled) = (f.texts(), f.pooled());
    let input = DitInput {
        latents: f.r("batch.hidden_states"),
        height: 6,
        width: 10,
        timestep: f.r("batch.timestep"),
        guidance: Some(f.r("batch.guidance")),
        pooled: &pooled,
        texts: &texts,
    };
    let want = dit.forward(&Cpu, &mut f.resident(&dit), &input).unwrap();
    let mut fresh = FreshCopies {
        component: &f.transformer,
        groups: dit.groups(),
        current: Vec::new(),
        asked: Vec::new(),
        finished: 0,
    };
    let got = dit.forward(&Cpu, &mut fresh, &input).unwrap();
    assert_eq!(bits(&got), bits(&want), "fresh copies differ from resident");
    assert_eq!(fresh.asked, (0..dit.groups().len()).collect::<Vec<_>>());
    assert_eq!(fresh.finished, 1);
}

/// The real black-forest-labs/FLUX.1-dev transformer/config.json.
fn real_config() -> serde_json::Value {
    serde_json::json!({
        "_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.30.0.dev0",
        "attention_head_dim": 128, "guidance_embeds": true, "in_channels": 64,
        "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19,
        "num_single_layers": 38, "patch_size": 1, "pooled_projection_dim": 768
    })
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
            "double block 0",
            "double block 1",
            "single block 0",
            "single block 1",
            "final layer"
        ]
    );
    assert_eq!(
        dit.groups()[1].tensors[0].name,
        "transformer_blocks.0.norm1.linear.weight"
    );
    assert_eq!(
        dit.groups()[3].tensors[0].name,
        "single_transformer_blocks.0.norm.linear.weight"
    );
    // Every tensor of the checkpoint is in exactly one group.
    let mut names: Vec<&str> = dit
        .groups()
        .iter()
        .flat_map(|g| g.tensors.iter().map(|t| t.name.as_str()))
        .collect();
    names.sort();
    let all: Vec<&str> = f.transformer.tensors.keys().map(String::as_str).collect();
    assert_eq!(names, all);

    // The real Flux.1-dev: 11.9 B parameters; the defaults diffusers fills in.
    let config = FluxConfig::from_json(Path::new("config.json"), &real_config()).unwrap();
    assert_eq!(config.axes_dims_rope, [16, 56, 56]);
    assert_eq!(config.out_channels, 64);
    let real = Flux::new(config.clone());
    let params: usize = real
        .groups()
        .iter()
        .flat_map(|g| &g.tensors)
        .map(|t| t.numel())
        .sum();
    assert!((11.90e9..11.91e9).contains(&(params as f64)), "{params}");
    // A 1024² step: 64 × 64 tokens beside 512 text tokens.
    let cost = real.step_cost(4096, 512, 1);
    assert_eq!(cost.flops.len(), real.groups().len());
    assert_eq!(cost.cache, 0);
    let (d, rows) = (3072.0, 4608.0);
    let double = 2.0 * (4.0 * d * d + 8.0 * d * d) * rows + 4.0 * rows * rows * d + 24.0 * d * d;
    assert_eq!(cost.flops[1], double);
    let total: f64 = cost.flops.iter().sum();
    // 57 blocks × (24·dim² per row + attention) ≈ 74 T.
    assert!(
        (73.0..76.0).contains(&(total / 1e12)),
        "{} TFLOP",
        total / 1e12
    );
    assert!(cost.workspace > 11 * 4608 * 3072 * 2);
    assert!(cost.workspace < 512 << 20, "{}", cost.workspace);
    let two = real.step_cost(4096, 512, 2);
    assert!(two.workspace > cost.workspace && two.flops[1] == 2.0 * double);
    // Precomputed, the blocks' modulation FLOPs leave the pass.
    let steps = Flux::precomputed(config).step_cost(4096, 512, 1);
    assert_eq!(steps.flops[1], double - 24.0 * d * d);
}

/// The fixture's transformer config with `edit` applied, parsed.
fn config_with(edit: impl FnOnce(&mut serde_json::Value)) -> Result<FluxConfig, Error> {
    let f = fixture();
    let mut json = f.transformer.config().unwrap().1.clone();
    edit(&mut json);
    FluxConfig::from_json(Path::new("f/transformer/config.json"), &json)
}

#[test]
fn unsupported_config_values_are_named() {
    use serde_json::json;
    let cases = [
        ("_class_name", json!("QwenImageTransformer2DModel")),
        ("patch_size", json!(2)),
        ("in_channels", json!(18)),
        ("out_channels", json!(4)),
        ("axes_dims_rope", json!([4, 6, 8])),
        ("num_attention_heads", json!("two")),
        ("num_single_layers", json!(-1)),
        ("pooled_projection_dim", json!(0)),
        ("guidance_embeds", json!("yes")),
    ];
    for (field, value) in cases {
        let e = config_with(|j| j[field] = value).unwrap_err().to_string();
        assert!(
            e.contains(field) && e.contains("f/transformer/config.json"),
            "{field}: {e}"
        );
    }
    let e = config_with(|j| {
        j.as_object_mut().unwrap().remove("joint_attention_dim");
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("joint_attention_dim"), "{e}");
    assert!(config_with(|_| {}).is_ok());
    // Absent: the defaults (patch 1, out_channels = in_channels, no guidance).
    let c = config_with(|j| {
        let o = j.as_object_mut().unwrap();
        for k in ["patch_size", "out_channels", "guidance_embeds"] {
            o.remove(k);
        }
    })
    .unwrap();
    assert!(!c.guidance_embeds && c.out_channels == 16);
}

#[test]
fn missing_or_misshapen_tensors_are_named() {
    let f = fixture();
    let dit = f.model();
    let dir = common::fixture("flux/transformer");
    for name in [
        "single_transformer_blocks.1.proj_out.weight",
        "time_text_embed.guidance_embedder.linear_2.bias",
        "transformer_blocks.0.ff_context.net.2.weight",
    ] {
        let mut broken = Component::open("transformer", &dir, true).unwrap();
        broken.tensors.remove(name);
        let e = dit.check_tensors(&broken).unwrap_err().to_string();
        assert!(e.contains(name) && e.contains("transformer"), "{e}");
    }

    let mut broken = Component::open("transformer", &dir, true).unwrap();
    let name = "single_transformer_blocks.0.proj_out.weight";
    let t = broken.tensors[name].clone();
    let len = t.bytes().len();
    // The same bytes as [160, 32]: proj_out transposed.
    let wrong = HostTensor::new(
        t.name.clone(),
        t.dtype,
        vec![160, 32],
        Arc::new(owned(&t)),
        0,
        len,
    );
    broken.tensors.insert(name.into(), wrong);
    let e = dit.check_tensors(&broken).unwrap_err().to_string();
    assert!(
        e.contains(name) && e.contains("[32, 160]") && e.contains("[160, 32]"),
        "{e}"
    );
}

#[test]
fn bad_inputs_are_typed_errors() {
    let f = fixture();
    let dit = f.model();
    let mut w = f.resident(&dit);
    let x = &f.r("batch.hidden_states")[..N * FEATURES];
    let text = f.texts()[0];
    let pooled = f.pooled()[0];
    let mut run = |latents: &[f32],
                   height,
                   timestep: &[f32],
                   guidance: Option<&[f32]>,
                   pooled: &[&[f32]],
                   texts: &[&[f32]]| {
        let input = DitInput {
            latents,
            height,
            width: 10,
            timestep,
            guidance,
            pooled,
            texts,
        };
        dit.forward(&Cpu, &mut w, &input).unwrap_err().to_string()
    };
    let g: &[f32] = &[3.5];
    let e = run(&x[1..], 6, &[0.5], Some(g), &[pooled], &[text]);
    assert!(
        e.contains("packed latents") && e.contains("[1, 15, 16]"),
        "{e}"
    );
    let e = run(x, 5, &[0.5], Some(g), &[pooled], &[text]);
    assert!(e.contains("5×10") && e.contains("multiples of 16"), "{e}");
    let e = run(x, 6, &[0.5], Some(g), &[pooled], &[&text[1..]]);
    assert!(e.contains("text features") && e.contains("40"), "{e}");
    let e = run(x, 6, &[0.5], Some(g), &[&pooled[1..]], &[text]);
    assert!(e.contains("pooled") && e.contains("[24]"), "{e}");
    let e = run(x, 6, &[0.5, 0.5], Some(g), &[pooled], &[text]);
    assert!(e.contains("2 timesteps, 1 texts"), "{e}");
    let e = run(x, 6, &[0.5], None, &[pooled], &[text]);
    assert!(
        e.contains("guidance") && e.contains("guidance_embeds"),
        "{e}"
    );
    let e = run(x, 6, &[0.5], Some(&[3.5, 3.5]), &[pooled], &[text]);
    assert!(e.contains("guidance") && e.contains("2 values"), "{e}");
    // A model without guidance given one.
    let schnell = Flux::new(FluxConfig {
        guidance_embeds: false,
        ..f.config()
    });
    let mut sw = f.resident(&schnell);
    let input = DitInput {
        latents: x,
        height: 6,
        width: 10,
        timestep: &[0.5],
        guidance: Some(g),
        pooled: &[pooled],
        texts: &[text],
    };
    let e = schnell
        .forward(&Cpu, &mut sw, &input)
        .unwrap_err()
        .to_string();
    assert!(e.contains("guidance") && e.contains("expected none"), "{e}");
}

#[test]
fn the_dit_streamed_on_the_cpu_equals_resident_bit_for_bit() {
    use ferry::backend::cpu_stream::{cpu_streamed_weights, HostStorage};
    use ferry::diffuse::pipeline::gaussian_noise;
    use ferry::model::PassShape;
    use ferry::stream::{plan, BudgetAllocator, GroupTensors, Purpose};

    // Blocks larger than the embedders (width 128), random bf16 weights: the streaming loop
    // that ships on the GPU, over the CPU copy engine.
    let json = serde_json::json!({
        "_class_name": "FluxTransformer2DModel", "attention_head_dim": 32,
        "axes_dims_rope": [8, 12, 12], "in_channels": 64, "joint_attention_dim": 40,
        "num_attention_heads": 4, "num_layers": 2, "num_single_layers": 3, "patch_size": 1,
        "pooled_projection_dim": 24, "guidance_embeds": true,
    });
    let dit = Flux::new(FluxConfig::from_json(Path::new("test/config.json"), &json).unwrap());
    let tr = ferry::synth::random_component(
        "transformer",
        "FluxTransformer2DModel",
        json,
        dit.groups(),
        9,
    );
    // Two samples with texts of different lengths, 8×6 latents (4×3 tokens).
    let (h, w) = (8, 6);
    let latents = gaussian_noise(5, 2 * 12 * 64);
    let texts = [gaussian_noise(6, 20 * 40), gaussian_noise(7, 45 * 40)];
    let texts: Vec<&[f32]> = texts.iter().map(Vec::as_slice).collect();
    let pooled = [gaussian_noise(8, 24), gaussian_noise(9, 24)];
    let pooled: Vec<&[f32]> = pooled.iter().map(Vec::as_slice).collect();
    let input = DitInput {
        latents: &latents,
        height: h,
        width: w,
        timestep: &[0.25, 0.75],
        guidance: Some(&[3.5, 3.5]),
        pooled: &pooled,
        texts: &texts,
    };
    let mut rw = ResidentWeights::load(&tr, dit.groups(), |t| Cpu.weight(t)).unwrap();
    let want = dit.forward(&Cpu, &mut rw, &input).unwrap();

    let shape = PassShape {
        tokens: 12 + 45,
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
        for step in 0..2 {
            let got = dit.forward(&Cpu, &mut weights, &input).unwrap();
            assert_eq!(
                bits(&got),
                bits(&want),
                "{share} of the way from the least budget, step {step}: streamed differs"
            );
        }
        assert!(alloc.peak() <= alloc.budget(), "over the budget");
    }
    assert!(streamed >= 2, "only {streamed} budgets streamed");
}

/// The modulation computed once for a schedule: the steps of a DiT that leaves those weights
/// out give the bits of steps that compute it, for samples of different σ, guidance and
/// pooled embeddings; the two models' groups split the checkpoint; a condition the table
/// lacks is a named error.
#[test]
fn precomputed_modulation_gives_the_bits_of_computing_it() {
    let f = fixture();
    let dit = f.model();
    let config = f.config();
    let steps = Flux::precomputed(config.clone());
    let modulation = steps.modulation_model();
    steps.check_tensors(&f.transformer).unwrap();
    modulation.check_tensors(&f.transformer).unwrap();
    let mut names: Vec<&str> = steps
        .groups()
        .iter()
        .chain(modulation.groups())
        .flat_map(|g| g.tensors.iter().map(|t| t.name.as_str()))
        .collect();
    names.sort();
    let all: Vec<&str> = f.transformer.tensors.keys().map(String::as_str).collect();
    assert_eq!(names, all, "each tensor in exactly one of the two models");

    let mut w = f.resident(&dit);
    let mut steps_w =
        ResidentWeights::load(&f.transformer, steps.groups(), |t| Cpu.weight(t)).unwrap();
    let mut mod_w =
        ResidentWeights::load(&f.transformer, modulation.groups(), |t| Cpu.weight(t)).unwrap();
    let (t, g) = (f.r("batch.timestep"), f.r("batch.guidance"));
    let (pooled, texts) = (f.pooled(), f.texts());
    let x = f.r("batch.hidden_states");
    // A schedule of three σ (one given twice) for both samples at each sample's guidance.
    let schedule = [t[0], t[1], 0.5, t[0]];
    let tables = [0, 1].map(|s| {
        modulation
            .table(&Cpu, &mut mod_w, &schedule, Some(g[s]), &pooled)
            .unwrap()
    });
    assert_eq!(tables[0].len(), 6, "3 distinct σ × 2 pooled embeddings");
    assert!(tables[0].bytes() > 0);
    for sigma in [t[0], 0.5] {
        for s in 0..2 {
            let input = DitInput {
                latents: x,
                height: 6,
                width: 10,
                timestep: &[sigma, sigma],
                guidance: Some(&[g[s], g[s]]),
                pooled: &pooled,
                texts: &texts,
            };
            let computed = dit.forward(&Cpu, &mut w, &input).unwrap();
            let taken = steps
                .forward_with(&Cpu, &mut steps_w, &input, &tables[s])
                .unwrap();
            assert_eq!(
                bits(&taken),
                bits(&computed),
                "σ {sigma}, guidance {}",
                g[s]
            );
            // The full model given the table takes it too.
            let full = dit.forward_with(&Cpu, &mut w, &input, &tables[s]).unwrap();
            assert_eq!(bits(&full), bits(&computed), "σ {sigma}, full model");
        }
    }
    // Diffusers' batch (each sample its own σ and guidance) from a table per sample: each
    // sample alone, its rows of diffusers' output.
    let one = N * FEATURES;
    for s in 0..2 {
        let got = steps
            .forward_with(
                &Cpu,
                &mut steps_w,
                &DitInput {
                    latents: &x[s * one..(s + 1) * one],
                    height: 6,
                    width: 10,
                    timestep: &t[s..s + 1],
                    guidance: Some(&g[s..s + 1]),
                    pooled: &pooled[s..s + 1],
                    texts: &texts[s..s + 1],
                },
                &tables[s],
            )
            .unwrap();
        close(
            "precomputed vs diffusers",
            &got,
            &f.r("batch.output")[s * one..(s + 1) * one],
        );
    }

    // A σ, a guidance or a pooled embedding the table lacks, no table, another model's
    // table, bad table arguments: named errors.
    let mut fails = |timestep: &[f32], guidance: &[f32], pooled: &[&[f32]]| {
        let input = DitInput {
            latents: &x[..one],
            height: 6,
            width: 10,
            timestep,
            guidance: Some(guidance),
            pooled,
            texts: &texts[..1],
        };
        steps
            .forward_with(&Cpu, &mut steps_w, &input, &tables[0])
            .unwrap_err()
            .to_string()
    };
    let e = fails(&[0.25], &[g[0]], &pooled[..1]);
    assert!(
        e.contains("σ = 0.25") && e.contains("modulation table"),
        "{e}"
    );
    let e = fails(&[0.5], &[7.0], &pooled[..1]);
    assert!(e.contains("guidance 7"), "{e}");
    let other: Vec<f32> = pooled[0].iter().map(|v| v + 1.0).collect();
    let e = fails(&[0.5], &[g[0]], &[&other]);
    assert!(e.contains("pooled text embedding"), "{e}");
    let input = DitInput {
        latents: &x[..one],
        height: 6,
        width: 10,
        timestep: &[0.5],
        guidance: Some(&g[..1]),
        pooled: &pooled[..1],
        texts: &texts[..1],
    };
    let e = steps
        .forward(&Cpu, &mut steps_w, &input)
        .unwrap_err()
        .to_string();
    assert!(e.contains("expected a modulation table"), "{e}");
    let one_block = Flux::precomputed(FluxConfig {
        num_single_layers: 1,
        ..config.clone()
    });
    let mut one_w =
        ResidentWeights::load(&f.transformer, one_block.groups(), |t| Cpu.weight(t)).unwrap();
    let e = one_block
        .forward_with(&Cpu, &mut one_w, &input, &tables[0])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("2 single") && e.contains("expected 2 and 1"),
        "{e}"
    );
    let e = modulation
        .table(&Cpu, &mut mod_w, &[], Some(3.5), &pooled)
        .unwrap_err()
        .to_string();
    assert!(e.contains("0 σ"), "{e}");
    let e = modulation
        .table(&Cpu, &mut mod_w, &[0.5], None, &pooled)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no guidance given"), "{e}");
    let e = modulation
        .table(&Cpu, &mut mod_w, &[0.5], Some(3.5), &[&pooled[0][1..]])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("pooled text embedding") && e.contains("[24]"),
        "{e}"
    );

    // The real Flux.1-dev: the steps leave 28 % of its parameters out.
    let real =
        Flux::precomputed(FluxConfig::from_json(Path::new("config.json"), &real_config()).unwrap());
    let left: usize = real
        .groups()
        .iter()
        .flat_map(|g| &g.tensors)
        .map(|t| t.numel())
        .sum();
    let out = real.modulation_params();
    let share = out as f64 / (left + out) as f64;
    eprintln!(
        "Flux.1-dev: modulation {out} of {} parameters ({share:.3})",
        left + out
    );
    assert!((0.27..0.28).contains(&share), "{share}");
}

fn ferry(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .output()
        .expect("ferry runs");
    assert!(
        out.status.success(),
        "ferry {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ferry synth --preset flux-tiny` writes the fixture's tensors and config; `ferry info`
/// shows its groups; `ferry bench` times it from the directory and from memory, the
/// modulation precomputed by default; flux.1-dev is listed at its real size.
#[test]
fn tiny_preset_is_the_fixtures_shape_and_benches() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("flux-tiny");
    let d = dir.to_str().unwrap();
    ferry(&["synth", "--preset", "flux-tiny", "--out", d, "--seed", "3"]);
    let tr = Component::open("transformer", &dir.join("transformer"), true).unwrap();
    let fixture = fixture();
    let shapes = |c: &Component| -> Vec<(String, Vec<usize>)> {
        c.tensors
            .iter()
            .map(|(n, t)| (n.clone(), t.shape.clone()))
            .collect()
    };
    assert_eq!(shapes(&tr), shapes(&fixture.transformer));
    let (path, json) = tr.config().unwrap();
    assert_eq!(FluxConfig::from_json(path, json).unwrap(), fixture.config());

    let info = ferry(&["info", "--model", d]);
    assert!(
        info.contains("FluxPipeline")
            && info.contains("double block 1")
            && info.contains("single block 1")
            && info.contains("final layer"),
        "{info}"
    );
    for source in [vec!["--model", d], vec!["--synthetic", "flux-tiny"]] {
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
        let out: serde_json::Value = serde_json::from_str(&ferry(&args)).unwrap();
        let results = out["results"].as_array().unwrap();
        assert_eq!(results.len(), 2, "{out}");
        assert!(results.iter().all(|r| r["step_s"].as_f64().unwrap() > 0.0));
        assert_eq!(out["modulation"], "precomputed", "{out}");
    }
    let args = [
        "bench",
        "--device",
        "cpu",
        "--size",
        "32x32",
        "--model",
        d,
        "--modulation",
        "in-steps",
        "--runs",
        "1",
        "--json",
        "-",
    ];
    let out: serde_json::Value = serde_json::from_str(&ferry(&args)).unwrap();
    assert_eq!(out["modulation"], "in steps", "{out}");

    let list = ferry(&["synth", "--list"]);
    let line = list
        .lines()
        .find(|l| l.trim_start().starts_with("flux.1-dev "))
        .unwrap_or_else(|| panic!("flux.1-dev in\n{list}"));
    assert!(
        line.contains("11.90B params") && line.contains("flux"),
        "{line}"
    );
}
