//! The Qwen-Image DiT on the CPU against diffusers f32 (the tiny transformer in
//! tests/fixtures/qwen-image, written by scripts/make_qwenimage_fixture.py): one batched
//! forward of two texts of different lengths (diffusers masks the shorter one's pads) on a
//! non-square image with its intermediates, the samples alone, a square image, the packed
//! latent layout, weights handed over fresh per pass and streamed, groups and costs, and bad
//! input.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use ferry::backend::cpu::{Cpu, CpuWeight};
use ferry::backend::Backend;
use ferry::checkpoint::{Component, HostTensor, Storage};
use ferry::model::qwen_image::{
    pack_latents, unpack_latents, DitInput, QwenImage, QwenImageConfig,
};
use ferry::model::{Architecture, ResidentWeights, Weights};
use ferry::Error;

use common::{read_reference, rel_l2};

/// Inner dim, joint_attention_dim, tokens of the batch case's image (3 × 5), valid text
/// tokens of its two samples, their padded length, packed features.
const DIM: usize = 32;
const TEXT_DIM: usize = 48;
const N: usize = 15;
const TEXT: [usize; 2] = [7, 12];
const PADDED: usize = 12;
const FEATURES: usize = 64;

struct Fixture {
    transformer: Component,
    reference: BTreeMap<String, Vec<f32>>,
}

fn fixture() -> Fixture {
    let dir = common::fixture("qwen-image");
    Fixture {
        transformer: Component::open("transformer", &dir.join("transformer"), true)
            .expect("the tiny Qwen-Image transformer"),
        reference: read_reference(&dir.join("reference.safetensors")),
    }
}

impl Fixture {
    fn model(&self) -> QwenImage {
        let (path, json) = self.transformer.config().unwrap();
        let dit = QwenImage::new(QwenImageConfig::from_json(path, json).unwrap());
        dit.check_tensors(&self.transformer).unwrap();
        dit
    }
    fn resident(&self, dit: &QwenImage) -> ResidentWeights<CpuWeight> {
        ResidentWeights::load(&self.transformer, dit.groups(), |t| Cpu.weight(t)).unwrap()
    }
    fn r(&self, name: &str) -> &[f32] {
        self.reference
            .get(name)
            .unwrap_or_else(|| panic!("reference tensor {name}"))
    }
    /// Sample `s`'s valid text rows of a reference `[2, 12, width]` tensor.
    fn text_rows(&self, name: &str, s: usize, width: usize) -> &[f32] {
        &self.r(name)[s * PADDED * width..][..TEXT[s] * width]
    }
    /// Both samples' valid text rows, stacked (how ferry holds the text stream).
    fn valid_text(&self, name: &str, width: usize) -> Vec<f32> {
        [
            self.text_rows(name, 0, width),
            self.text_rows(name, 1, width),
        ]
        .concat()
    }
}

fn close(what: &str, got: &[f32], want: &[f32]) -> f64 {
    let err = rel_l2(got, want);
    eprintln!("{what}: relative L2 {err:.2e}");
    assert!(err <= 1e-4, "{what}: relative L2 {err:.3e} > 1e-4");
    err
}

#[test]
fn a_masked_batch_and_its_intermediates_match_diffusers() {
    let f = fixture();
    let dit = f.model();
    let mut w = f.resident(&dit);
    let texts = [
        f.text_rows("batch.encoder_hidden_states", 0, TEXT_DIM),
        f.text_rows("batch.encoder_hidden_states", 1, TEXT_DIM),
    ];
    let mut trace = BTreeMap::new();
    let mut record = |name: &str, v: Vec<f32>| {
        trace.insert(name.to_string(), v);
    };
    let input = DitInput {
        latents: f.r("batch.hidden_states"),
        height: 6,
        width: 10,
        timestep: f.r("batch.timestep"),
        texts: &texts,
    };
    let out = dit
        .forward_traced(&Cpu, &mut w, &input, Some(&mut record))
        .unwrap();
    close("output", &out, f.r("batch.output"));
    close("temb", &trace["temb"], f.r("batch.temb"));
    close("img_in", &trace["img_in"], f.r("batch.img_in"));
    close(
        "txt_in",
        &trace["txt_in"],
        &f.valid_text("batch.txt_in", DIM),
    );
    // RoPE: every sample's image at the same positions; sample 1's 12 text tokens.
    let head_dim = 16;
    close(
        "img_freqs",
        &trace["img_freqs"][..N * head_dim],
        f.r("batch.img_freqs"),
    );
    close(
        "txt_freqs",
        &trace["txt_freqs"][TEXT[0] * head_dim..],
        f.r("batch.txt_freqs"),
    );
    close(
        "blocks.0.attn.img",
        &trace["blocks.0.attn.img"],
        f.r("batch.blocks.0.attn.img"),
    );
    close(
        "blocks.0.attn.txt",
        &trace["blocks.0.attn.txt"],
        &f.valid_text("batch.blocks.0.attn.txt", DIM),
    );
    for i in 0..2 {
        let img = format!("blocks.{i}.img");
        close(&img, &trace[&img], f.r(&format!("batch.{img}")));
        let txt = format!("blocks.{i}.txt");
        close(
            &txt,
            &trace[&txt],
            &f.valid_text(&format!("batch.{txt}"), DIM),
        );
    }
    close("norm_out", &trace["norm_out"], f.r("batch.norm_out"));
    // The pipeline's unpacking of the output.
    let unpacked = unpack_latents(&out, 2, 16, 6, 10);
    close("output unpacked", &unpacked, f.r("batch.output_unpacked"));
}

/// Each sample alone (no mask in diffusers) equals its row of the batch bit for bit, and
/// sample 0 is diffusers' lone forward.
#[test]
fn samples_alone_equal_the_batch_bit_for_bit() {
    let f = fixture();
    let dit = f.model();
    let mut w = f.resident(&dit);
    let x = f.r("batch.hidden_states");
    let texts = [
        f.text_rows("batch.encoder_hidden_states", 0, TEXT_DIM),
        f.text_rows("batch.encoder_hidden_states", 1, TEXT_DIM),
    ];
    let t = f.r("batch.timestep");
    let batch = dit
        .forward(
            &Cpu,
            &mut w,
            &DitInput {
                latents: x,
                height: 6,
                width: 10,
                timestep: t,
                texts: &texts,
            },
        )
        .unwrap();
    let one = N * FEATURES;
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
                    texts: &texts[s..s + 1],
                },
            )
            .unwrap();
        // Bit for bit: a pass of several samples (guidance's two branches) is the passes of
        // each alone.
        let part = &batch[s * one..(s + 1) * one];
        assert!(
            alone
                .iter()
                .map(|v| v.to_bits())
                .eq(part.iter().map(|v| v.to_bits())),
            "sample {s} alone differs from its row of the batch"
        );
        if s == 0 {
            close("sample 0 alone vs diffusers", &alone, f.r("alone.output"));
        }
    }
}

#[test]
fn a_square_image_matches_diffusers() {
    let f = fixture();
    let dit = f.model();
    let mut w = f.resident(&dit);
    let out = dit
        .forward(
            &Cpu,
            &mut w,
            &DitInput {
                latents: f.r("square.hidden_states"),
                height: 8,
                width: 8,
                timestep: f.r("square.timestep"),
                texts: &[f.r("square.encoder_hidden_states")],
            },
        )
        .unwrap();
    close("square output", &out, f.r("square.output"));
}

#[test]
fn packing_is_the_pipelines() {
    let f = fixture();
    let packed = pack_latents(f.r("batch.latents_unpacked"), 2, 16, 6, 10);
    assert_eq!(packed, f.r("batch.hidden_states"));
    assert_eq!(
        unpack_latents(&packed, 2, 16, 6, 10),
        f.r("batch.latents_unpacked")
    );
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
    let texts = [
        f.text_rows("batch.encoder_hidden_states", 0, TEXT_DIM),
        f.text_rows("batch.encoder_hidden_states", 1, TEXT_DIM),
    ];
    let input = DitInput {
        latents: f.r("batch.hidden_states"),
        height: 6,
        width: 10,
        timestep: f.r("batch.timestep"),
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
    assert!(
        got.iter()
            .map(|v| v.to_bits())
            .eq(want.iter().map(|v| v.to_bits())),
        "fresh copies differ from resident weights"
    );
    assert_eq!(fresh.asked, (0..dit.groups().len()).collect::<Vec<_>>());
    assert_eq!(fresh.finished, 1);
}

/// The real Qwen/Qwen-Image transformer/config.json.
fn real_config() -> serde_json::Value {
    serde_json::json!({
        "_class_name": "QwenImageTransformer2DModel", "_diffusers_version": "0.34.0.dev0",
        "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56], "guidance_embeds": false,
        "in_channels": 64, "joint_attention_dim": 3584, "num_attention_heads": 24,
        "num_layers": 60, "out_channels": 16, "patch_size": 2, "pooled_projection_dim": 768
    })
}

#[test]
fn groups_and_costs() {
    let f = fixture();
    let dit = f.model();
    let labels: Vec<&str> = dit.groups().iter().map(|g| g.label.as_str()).collect();
    assert_eq!(labels, ["embedders", "block 0", "block 1", "final layer"]);
    // Every tensor of the checkpoint is in exactly one group; a block's modulation first.
    let mut names: Vec<&str> = dit
        .groups()
        .iter()
        .flat_map(|g| g.tensors.iter().map(|t| t.name.as_str()))
        .collect();
    assert_eq!(
        dit.groups()[1].tensors[0].name,
        "transformer_blocks.0.img_mod.1.weight"
    );
    names.sort();
    let all: Vec<&str> = f.transformer.tensors.keys().map(String::as_str).collect();
    assert_eq!(names, all);

    // The real Qwen-Image: 20.4 B parameters, a third of them modulation.
    let real = QwenImage::new(
        QwenImageConfig::from_json(Path::new("config.json"), &real_config()).unwrap(),
    );
    let count = |pred: &dyn Fn(&str) -> bool| -> usize {
        real.groups()
            .iter()
            .flat_map(|g| &g.tensors)
            .filter(|t| pred(&t.name))
            .map(|t| t.numel())
            .sum()
    };
    let params = count(&|_| true);
    assert!((20.4e9..20.5e9).contains(&(params as f64)), "{params}");
    let modulation = count(&|n| n.contains("_mod."));
    assert!((0.33..0.34).contains(&(modulation as f64 / params as f64)));
    // A 1024² step (64 × 64 tokens) with 100 text tokens.
    let cost = real.step_cost(4096, 100, 1);
    assert_eq!(cost.flops.len(), real.groups().len());
    assert_eq!(cost.cache, 0);
    let (d, rows) = (3072.0, 4196.0);
    let block = 2.0 * (4.0 * d * d + 8.0 * d * d) * rows + 4.0 * rows * rows * d + 24.0 * d * d;
    assert_eq!(cost.flops[1], block);
    let total: f64 = cost.flops.iter().sum();
    // Each row meets only its own stream's weights: 60 × (24·dim² per row + attention) ≈ 70 T.
    assert!(
        (69.0..71.0).contains(&(total / 1e12)),
        "{} TFLOP",
        total / 1e12
    );
    assert!(cost.workspace > 9 * 4196 * 3072 * 2);
    assert!(cost.workspace < 400 << 20, "{}", cost.workspace);
    let cfg = real.step_cost(4096, 100, 2);
    assert!(cfg.workspace > cost.workspace && cfg.flops[1] == 2.0 * block);
}

/// The fixture's transformer config with `edit` applied, parsed.
fn config_with(edit: impl FnOnce(&mut serde_json::Value)) -> Result<QwenImageConfig, Error> {
    let f = fixture();
    let mut json = f.transformer.config().unwrap().1.clone();
    edit(&mut json);
    QwenImageConfig::from_json(Path::new("q/transformer/config.json"), &json)
}

#[test]
fn unsupported_config_values_are_named() {
    use serde_json::json;
    let cases = [
        ("_class_name", json!("FluxTransformer2DModel")),
        ("guidance_embeds", json!(true)),
        ("zero_cond_t", json!(true)),
        ("use_layer3d_rope", json!(true)),
        ("patch_size", json!(1)),
        ("in_channels", json!(16)),
        ("axes_dims_rope", json!([4, 6, 8])),
        ("num_attention_heads", json!("two")),
        ("num_layers", json!(-1)),
    ];
    for (field, value) in cases {
        let e = config_with(|j| j[field] = value).unwrap_err().to_string();
        assert!(
            e.contains(field) && e.contains("q/transformer/config.json"),
            "{field}: {e}"
        );
    }
    let e = config_with(|j| {
        j.as_object_mut().unwrap().remove("joint_attention_dim");
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("joint_attention_dim"), "{e}");
    // out_channels null: diffusers takes in_channels, which is not 4 × itself.
    let e = config_with(|j| j["out_channels"] = json!(null))
        .unwrap_err()
        .to_string();
    assert!(e.contains("in_channels"), "{e}");
    assert!(config_with(|_| {}).is_ok());
    assert!(config_with(|j| j["pooled_projection_dim"] = json!(768)).is_ok());
}

#[test]
fn missing_or_misshapen_tensors_are_named() {
    let f = fixture();
    let dit = f.model();
    let dir = common::fixture("qwen-image/transformer");
    let mut broken = Component::open("transformer", &dir, true).unwrap();
    broken
        .tensors
        .remove("transformer_blocks.1.txt_mlp.net.2.weight");
    let e = dit.check_tensors(&broken).unwrap_err().to_string();
    assert!(
        e.contains("transformer_blocks.1.txt_mlp.net.2.weight") && e.contains("transformer"),
        "{e}"
    );

    let mut broken = Component::open("transformer", &dir, true).unwrap();
    let name = "transformer_blocks.0.attn.norm_added_k.weight";
    let t = broken.tensors[name].clone();
    let len = t.bytes().len();
    let wrong = HostTensor::new(
        t.name.clone(),
        t.dtype,
        vec![4, 4],
        Arc::new(owned(&t)),
        0,
        len,
    );
    broken.tensors.insert(name.into(), wrong);
    let e = dit.check_tensors(&broken).unwrap_err().to_string();
    assert!(
        e.contains(name) && e.contains("[16]") && e.contains("[4, 4]"),
        "{e}"
    );
}

#[test]
fn bad_inputs_are_typed_errors() {
    let f = fixture();
    let dit = f.model();
    let mut w = f.resident(&dit);
    let x = &f.r("batch.hidden_states")[..N * FEATURES];
    let text = f.text_rows("batch.encoder_hidden_states", 0, TEXT_DIM);
    let mut run = |latents: &[f32], height, width, timestep: &[f32], texts: &[&[f32]]| {
        let input = DitInput {
            latents,
            height,
            width,
            timestep,
            texts,
        };
        dit.forward(&Cpu, &mut w, &input).unwrap_err().to_string()
    };
    let e = run(&x[1..], 6, 10, &[0.5], &[text]);
    assert!(
        e.contains("packed latents") && e.contains("[1, 15, 64]"),
        "{e}"
    );
    // 40 × 80 pixels: 5 latent rows, not a multiple of 16 pixels.
    let e = run(x, 5, 10, &[0.5], &[text]);
    assert!(e.contains("5×10") && e.contains("multiples of 16"), "{e}");
    let e = run(x, 6, 10, &[0.5], &[&text[1..]]);
    assert!(e.contains("text features") && e.contains("48"), "{e}");
    let e = run(x, 6, 10, &[0.5, 0.5], &[text]);
    assert!(e.contains("2 timesteps and 1 texts"), "{e}");
    let long = text.repeat(600); // 4200 tokens: beyond the 4096 RoPE positions
    let e = run(x, 6, 10, &[0.5], &[&long]);
    assert!(e.contains("RoPE positions") && e.contains("4096"), "{e}");
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
        "_class_name": "QwenImageTransformer2DModel", "attention_head_dim": 32,
        "axes_dims_rope": [8, 12, 12], "in_channels": 64, "joint_attention_dim": 40,
        "num_attention_heads": 4, "num_layers": 3, "out_channels": 16, "patch_size": 2,
    });
    let dit =
        QwenImage::new(QwenImageConfig::from_json(Path::new("test/config.json"), &json).unwrap());
    let tr = ferry::synth::random_component(
        "transformer",
        "QwenImageTransformer2DModel",
        json,
        dit.groups(),
        9,
    );
    // Two samples with texts of different lengths, 8×6 latents (4×3 tokens).
    let (h, w) = (8, 6);
    let latents = gaussian_noise(5, 2 * 12 * 64);
    let texts = [gaussian_noise(6, 20 * 40), gaussian_noise(7, 45 * 40)];
    let texts: Vec<&[f32]> = texts.iter().map(Vec::as_slice).collect();
    let input = DitInput {
        latents: &latents,
        height: h,
        width: w,
        timestep: &[0.25, 0.75],
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

/// The modulation computed once for a schedule's σ (issue 12, item 7): the steps of a DiT
/// that leaves those weights out give the bits of steps that compute it, for samples of
/// different σ and for guidance's two branches at one σ; the two models' groups split the
/// checkpoint.
#[test]
fn precomputed_modulation_gives_the_bits_of_computing_it() {
    let f = fixture();
    let dit = f.model();
    let (path, json) = f.transformer.config().unwrap();
    let config = QwenImageConfig::from_json(path, json).unwrap();
    let steps = QwenImage::precomputed(config.clone());
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
    let t = f.r("batch.timestep");
    let table = modulation
        .table(&Cpu, &mut mod_w, &[t[0], t[1], 0.5, t[0]])
        .unwrap();
    assert_eq!(
        table.sigmas().count(),
        3,
        "a σ given twice is computed once"
    );
    let x = f.r("batch.hidden_states");
    let texts = [
        f.text_rows("batch.encoder_hidden_states", 0, TEXT_DIM),
        f.text_rows("batch.encoder_hidden_states", 1, TEXT_DIM),
    ];
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for timestep in [vec![t[0], t[1]], vec![0.5, 0.5]] {
        let input = DitInput {
            latents: x,
            height: 6,
            width: 10,
            timestep: &timestep,
            texts: &texts,
        };
        let computed = dit.forward(&Cpu, &mut w, &input).unwrap();
        let taken = steps
            .forward_with(&Cpu, &mut steps_w, &input, &table)
            .unwrap();
        assert_eq!(bits(&taken), bits(&computed), "σ {timestep:?}");
        // The full model given the table takes it too.
        let full = dit.forward_with(&Cpu, &mut w, &input, &table).unwrap();
        assert_eq!(bits(&full), bits(&computed), "σ {timestep:?}, full model");
    }
    close(
        "precomputed vs diffusers",
        &steps
            .forward_with(
                &Cpu,
                &mut steps_w,
                &DitInput {
                    latents: x,
                    height: 6,
                    width: 10,
                    timestep: t,
                    texts: &texts,
                },
                &table,
            )
            .unwrap(),
        f.r("batch.output"),
    );

    // A σ the table lacks, no table, another model's table: named errors.
    let input = DitInput {
        latents: x,
        height: 6,
        width: 10,
        timestep: &[0.25, 0.25],
        texts: &texts,
    };
    let e = steps
        .forward_with(&Cpu, &mut steps_w, &input, &table)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("σ = 0.25") && e.contains("modulation table"),
        "{e}"
    );
    let e = steps
        .forward(&Cpu, &mut steps_w, &input)
        .unwrap_err()
        .to_string();
    assert!(e.contains("expected a modulation table"), "{e}");
    let one_block = QwenImage::precomputed(QwenImageConfig {
        num_layers: 1,
        ..config.clone()
    });
    let mut one_w =
        ResidentWeights::load(&f.transformer, one_block.groups(), |t| Cpu.weight(t)).unwrap();
    let e = one_block
        .forward_with(&Cpu, &mut one_w, &input, &table)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("made for 2 blocks") && e.contains("expected 1"),
        "{e}"
    );
    let e = modulation
        .table(&Cpu, &mut mod_w, &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("no σ given"), "{e}");

    // The real Qwen-Image: the steps leave a third of its parameters out.
    let real = QwenImage::precomputed(
        QwenImageConfig::from_json(Path::new("config.json"), &real_config()).unwrap(),
    );
    let left: usize = real
        .groups()
        .iter()
        .flat_map(|g| &g.tensors)
        .map(|t| t.numel())
        .sum();
    let out = real.modulation_params();
    let share = out as f64 / (left + out) as f64;
    assert!((0.33..0.35).contains(&share), "{share}");
}
