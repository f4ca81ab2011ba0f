//! The Qwen-Image DiT on the GPU (bf16) against diffusers on the tiny transformer of
//! tests/fixtures/qwen-image: the masked batch (two texts of 7 and 12 tokens, a 3×5-token
//! image) is at least as close to diffusers' f32 output as diffusers' own bf16 run is
//! (`batch.output_bf16`); the DiT streamed at several budgets gives the resident result bit
//! for bit, within the budget. Without a usable GPU each test prints
//! "SKIPPED: no usable CUDA device: <why>" and passes.

mod common;

use std::path::Path;

use ferry::backend::cuda::streaming::HostMemory;
use ferry::backend::cuda::{Cuda, CudaWeight, CUBLAS_WORKSPACE, DRIVER_RESERVE};
use ferry::backend::Backend;
use ferry::checkpoint::Component;
use ferry::diffuse::pipeline::gaussian_noise;
use ferry::model::qwen_image::{DitInput, QwenImage, QwenImageConfig};
use ferry::model::{Architecture, PassShape, ResidentWeights, Weights};
use ferry::runtime::{stream_weights, StreamSetup};
use ferry::synth::random_component;

use common::{gpu, read_reference, rel_l2};

/// A pass's inputs, owned.
struct Pass {
    latents: Vec<f32>,
    height: usize,
    width: usize,
    timestep: Vec<f32>,
    texts: Vec<Vec<f32>>,
}

/// Two slots of `arch`'s largest group beyond the fixed reserves: about the least budget that
/// plans.
fn least_budget(arch: &dyn Architecture, tr: &Component, shape: PassShape) -> usize {
    let largest = arch
        .groups()
        .iter()
        .map(|g| {
            g.tensors
                .iter()
                .map(|t| tr.tensor(&t.name).unwrap().bytes().len())
                .sum::<usize>()
        })
        .max()
        .unwrap();
    CUBLAS_WORKSPACE + DRIVER_RESERVE + arch.pass_cost(shape).workspace + 2 * largest + (512 << 10)
}

fn run(dit: &QwenImage, gpu: &Cuda, w: &mut impl Weights<CudaWeight>, pass: &Pass) -> Vec<f32> {
    let texts: Vec<&[f32]> = pass.texts.iter().map(Vec::as_slice).collect();
    dit.forward(
        gpu,
        w,
        &DitInput {
            latents: &pass.latents,
            height: pass.height,
            width: pass.width,
            timestep: &pass.timestep,
            texts: &texts,
        },
    )
    .expect("a DiT pass on the GPU")
}

#[test]
fn dit_in_bf16_is_as_close_to_f32_as_diffusers_bf16() {
    let test = "dit_in_bf16_is_as_close_to_f32_as_diffusers_bf16";
    let Some(gpu) = gpu(test, None) else { return };
    let dir = common::fixture("qwen-image");
    let tr = Component::open("transformer", &dir.join("transformer"), true).unwrap();
    let (path, json) = tr.config().unwrap();
    let dit = QwenImage::new(QwenImageConfig::from_json(path, json).unwrap());
    let r = read_reference(&dir.join("reference.safetensors"));
    gpu.prepare_dit(dit.config.head_dim()).unwrap();
    let mut w = ResidentWeights::load(&tr, dit.groups(), |t| gpu.weight(t)).unwrap();
    // Each sample's valid text rows of the padded [2, 12, 48] features.
    let text = &r["batch.encoder_hidden_states"];
    let pass = Pass {
        latents: r["batch.hidden_states"].clone(),
        height: 6,
        width: 10,
        timestep: r["batch.timestep"].clone(),
        texts: vec![text[..7 * 48].to_vec(), text[12 * 48..].to_vec()],
    };
    let got = run(&dit, &gpu, &mut w, &pass);
    let (want, theirs) = (&r["batch.output"], &r["batch.output_bf16"]);
    let ours = rel_l2(&got, want);
    let diffusers = rel_l2(theirs, want);
    eprintln!(
        "masked batch: ferry CUDA bf16 vs f32 {ours:.3e}; diffusers bf16 vs f32 {diffusers:.3e}; ferry vs diffusers bf16 {:.3e}",
        rel_l2(&got, theirs)
    );
    assert!(
        ours <= 1.25 * diffusers,
        "CUDA bf16 is {ours:.3e} from f32, diffusers bf16 {diffusers:.3e}"
    );
}

#[test]
fn streamed_dit_equals_resident_bit_for_bit_within_the_budget() {
    let test = "streamed_dit_equals_resident_bit_for_bit_within_the_budget";
    let Some(resident_gpu) = gpu(test, None) else {
        return;
    };
    // Blocks of width 512 (18.9 MB each in bf16, the embedders 0.5 MB), random weights, so that
    // blocks stream.
    let json = serde_json::json!({
        "_class_name": "QwenImageTransformer2DModel", "attention_head_dim": 128,
        "axes_dims_rope": [16, 56, 56], "in_channels": 64, "joint_attention_dim": 96,
        "num_attention_heads": 4, "num_layers": 4, "out_channels": 16, "patch_size": 2,
    });
    let dit =
        QwenImage::new(QwenImageConfig::from_json(Path::new("test/config.json"), &json).unwrap());
    let tr = random_component(
        "transformer",
        "QwenImageTransformer2DModel",
        json,
        dit.groups(),
        3,
    );
    let tr = &tr;
    // Two samples with texts of different lengths, 8×6 latents (4×3 tokens).
    let (h, w) = (8, 6);
    let pass = Pass {
        latents: gaussian_noise(5, 2 * 12 * 64),
        height: h,
        width: w,
        timestep: vec![0.25, 0.75],
        texts: vec![gaussian_noise(6, 20 * 96), gaussian_noise(7, 45 * 96)],
    };
    resident_gpu.prepare_dit(128).unwrap();
    let mut rw = ResidentWeights::load(tr, dit.groups(), |t| resident_gpu.weight(t)).unwrap();
    let want = run(&dit, &resident_gpu, &mut rw, &pass);
    drop(rw);
    drop(resident_gpu);

    let shape = PassShape {
        tokens: 12 + 45,
        batch: 2,
        past: 0,
    };
    let weights = tr.bytes();
    let fixed = least_budget(&dit, tr, shape);
    let mut streamed_some = false;
    for fraction in [0.0, 0.25, 0.5, 1.5] {
        let budget = fixed + (weights as f64 * fraction) as usize;
        let gpu = gpu(test, Some(budget)).expect("the GPU was there a moment ago");
        let mut w = match stream_weights(&gpu, tr, &dit, StreamSetup::new(shape, HostMemory::Auto))
        {
            Ok(w) => w,
            Err(e) => panic!("budget {budget}: {e}"),
        };
        let streamed = w.plan().streamed_bytes();
        // Two steps: the second pass starts from the prefetch that wrapped around.
        for step in 0..2 {
            let got = run(&dit, &gpu, &mut w, &pass);
            assert!(
                got.iter().map(|v| v.to_bits()).eq(want.iter().map(|v| v.to_bits())),
                "budget {budget} ({fraction} of the weights), step {step}: streamed differs from resident"
            );
        }
        let peak = gpu.memory().peak();
        assert!(peak <= budget, "budget {budget}: ledger peak {peak}");
        eprintln!("budget {budget}: {streamed} bytes streamed a pass, ledger peak {peak}");
        streamed_some |= streamed > 0;
    }
    assert!(streamed_some, "no budget streamed anything");
}

/// The modulation computed once on the GPU (issue 12, item 7): a table made by the streamed
/// modulation model, then steps of the DiT without those weights, streamed, give the bits of
/// the whole DiT computing its modulation in a resident pass.
#[test]
fn precomputed_modulation_streamed_gives_the_bits_of_computing_it() {
    let test = "precomputed_modulation_streamed_gives_the_bits_of_computing_it";
    let Some(resident_gpu) = gpu(test, None) else {
        return;
    };
    let json = serde_json::json!({
        "_class_name": "QwenImageTransformer2DModel", "attention_head_dim": 128,
        "axes_dims_rope": [16, 56, 56], "in_channels": 64, "joint_attention_dim": 96,
        "num_attention_heads": 4, "num_layers": 4, "out_channels": 16, "patch_size": 2,
    });
    let config = QwenImageConfig::from_json(Path::new("test/config.json"), &json).unwrap();
    let dit = QwenImage::new(config.clone());
    let tr = random_component(
        "transformer",
        "QwenImageTransformer2DModel",
        json,
        dit.groups(),
        4,
    );
    let pass = Pass {
        latents: gaussian_noise(8, 2 * 12 * 64),
        height: 8,
        width: 6,
        timestep: vec![0.25, 0.75],
        texts: vec![gaussian_noise(9, 20 * 96), gaussian_noise(10, 45 * 96)],
    };
    resident_gpu.prepare_dit(128).unwrap();
    let mut rw = ResidentWeights::load(&tr, dit.groups(), |t| resident_gpu.weight(t)).unwrap();
    let want = run(&dit, &resident_gpu, &mut rw, &pass);
    drop(rw);
    drop(resident_gpu);

    let steps = QwenImage::precomputed(config);
    let modulation = steps.modulation_model();
    // Each model at about its least budget, so that both stream.
    let shape = PassShape {
        tokens: 1,
        batch: 2,
        past: 0,
    };
    let mod_gpu = gpu(test, Some(least_budget(&modulation, &tr, shape))).expect("the GPU");
    let setup = StreamSetup::new(shape, HostMemory::Auto);
    let mut mw =
        stream_weights(&mod_gpu, &tr, &modulation, setup).expect("the modulation model streams");
    let table = modulation.table(&mod_gpu, &mut mw, &[0.75, 0.25]).unwrap();
    let mod_streamed = mw.plan().streamed_bytes();
    drop(mw);
    drop(mod_gpu);
    let shape = PassShape {
        tokens: 12 + 45,
        batch: 2,
        past: 0,
    };
    let gpu = gpu(test, Some(least_budget(&steps, &tr, shape))).expect("the GPU");
    gpu.prepare_dit(128).unwrap();
    let mut sw = stream_weights(&gpu, &tr, &steps, StreamSetup::new(shape, HostMemory::Auto))
        .expect("the steps stream");
    let texts: Vec<&[f32]> = pass.texts.iter().map(Vec::as_slice).collect();
    for step in 0..2 {
        let got = steps
            .forward_with(
                &gpu,
                &mut sw,
                &DitInput {
                    latents: &pass.latents,
                    height: pass.height,
                    width: pass.width,
                    timestep: &pass.timestep,
                    texts: &texts,
                },
                &table,
            )
            .unwrap();
        assert!(
            got.iter()
                .map(|v| v.to_bits())
                .eq(want.iter().map(|v| v.to_bits())),
            "step {step}: precomputed, streamed differs from computed, resident"
        );
    }
    eprintln!(
        "modulation model streamed {mod_streamed} bytes, steps {} bytes a pass",
        sw.plan().streamed_bytes()
    );
    assert!(
        mod_streamed > 0 && sw.plan().streamed_bytes() > 0,
        "both streamed"
    );
}
