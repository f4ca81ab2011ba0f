//! The Flux DiT on the GPU (bf16) against diffusers on the tiny transformer of
//! tests/fixtures/flux: the batch (two samples of different σ, guidance and pooled
//! embeddings on a 3×5-token image) is at least as close to diffusers' f32 output as
//! diffusers' own bf16 run is (`batch.output_bf16`); the DiT streamed at several budgets gives
//! the resident result bit for bit, within the budget; the modulation precomputed on the GPU
//! gives the bits of computing it. Without a usable GPU each test prints "SKIPPED: no usable
//! CUDA device: <why>" and passes.

mod common;

use std::path::Path;

use ferry::backend::cuda::streaming::HostMemory;
use ferry::backend::cuda::{Cuda, CudaWeight, CUBLAS_WORKSPACE, DRIVER_RESERVE};
use ferry::backend::Backend;
use ferry::checkpoint::Component;
use ferry::diffuse::pipeline::gaussian_noise;
use ferry::model::flux::{DitInput, Flux, FluxConfig, ModulationTable};
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
    guidance: Vec<f32>,
    pooled: Vec<Vec<f32>>,
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

fn run(
    dit: &Flux,
    gpu: &Cuda,
    w: &mut impl Weights<CudaWeight>,
    pass: &Pass,
    table: Option<&ModulationTable>,
) -> Vec<f32> {
    let texts: Vec<&[f32]> = pass.texts.iter().map(Vec::as_slice).collect();
    let pooled: Vec<&[f32]> = pass.pooled.iter().map(Vec::as_slice).collect();
    let input = DitInput {
        latents: &pass.latents,
        height: pass.height,
        width: pass.width,
        timestep: &pass.timestep,
        guidance: Some(&pass.guidance),
        pooled: &pooled,
        texts: &texts,
    };
    match table {
        Some(t) => dit.forward_with(gpu, w, &input, t),
        None => dit.forward(gpu, w, &input),
    }
    .expect("a DiT pass on the GPU")
}

#[test]
fn dit_in_bf16_is_as_close_to_f32_as_diffusers_bf16() {
    let test = "dit_in_bf16_is_as_close_to_f32_as_diffusers_bf16";
    let Some(gpu) = gpu(test, None) else { return };
    let dir = common::fixture("flux");
    let tr = Component::open("transformer", &dir.join("transformer"), true).unwrap();
    let (path, json) = tr.config().unwrap();
    let dit = Flux::new(FluxConfig::from_json(path, json).unwrap());
    let r = read_reference(&dir.join("reference.safetensors"));
    gpu.prepare_dit(dit.config.head_dim()).unwrap();
    let mut w = ResidentWeights::load(&tr, dit.groups(), |t| gpu.weight(t)).unwrap();
    let halves = |name: &str| {
        let v = &r[name];
        vec![v[..v.len() / 2].to_vec(), v[v.len() / 2..].to_vec()]
    };
    let pass = Pass {
        latents: r["batch.hidden_states"].clone(),
        height: 6,
        width: 10,
        timestep: r["batch.timestep"].clone(),
        guidance: r["batch.guidance"].clone(),
        pooled: halves("batch.pooled_projections"),
        texts: halves("batch.encoder_hidden_states"),
    };
    let got = run(&dit, &gpu, &mut w, &pass, None);
    let (want, theirs) = (&r["batch.output"], &r["batch.output_bf16"]);
    let ours = rel_l2(&got, want);
    let diffusers = rel_l2(theirs, want);
    eprintln!(
        "batch: ferry CUDA bf16 vs f32 {ours:.3e}; diffusers bf16 vs f32 {diffusers:.3e}; ferry vs diffusers bf16 {:.3e}",
        rel_l2(&got, theirs)
    );
    assert!(
        ours <= 1.25 * diffusers,
        "CUDA bf16 is {ours:.3e} from f32, diffusers bf16 {diffusers:.3e}"
    );
}

/// Blocks of width 512 (a double block 18.9 MB in bf16), random weights, so that blocks
/// stream; two samples with texts of different lengths on 8×6 latents (4×3 tokens).
fn streaming_case(seed: u64) -> (FluxConfig, Component, Pass) {
    let json = serde_json::json!({
        "_class_name": "FluxTransformer2DModel", "attention_head_dim": 128,
        "axes_dims_rope": [16, 56, 56], "in_channels": 64, "joint_attention_dim": 96,
        "num_attention_heads": 4, "num_layers": 2, "num_single_layers": 3, "patch_size": 1,
        "pooled_projection_dim": 48, "guidance_embeds": true,
    });
    let config = FluxConfig::from_json(Path::new("test/config.json"), &json).unwrap();
    let tr = random_component(
        "transformer",
        "FluxTransformer2DModel",
        json,
        Flux::new(config.clone()).groups(),
        seed,
    );
    let pass = Pass {
        latents: gaussian_noise(5, 2 * 12 * 64),
        height: 8,
        width: 6,
        timestep: vec![0.25, 0.75],
        guidance: vec![3.5, 3.5],
        pooled: vec![gaussian_noise(11, 48), gaussian_noise(12, 48)],
        texts: vec![gaussian_noise(6, 20 * 96), gaussian_noise(7, 45 * 96)],
    };
    (config, tr, pass)
}

#[test]
fn streamed_dit_equals_resident_bit_for_bit_within_the_budget() {
    let test = "streamed_dit_equals_resident_bit_for_bit_within_the_budget";
    let Some(resident_gpu) = gpu(test, None) else {
        return;
    };
    let (config, tr, pass) = streaming_case(3);
    let tr = &tr;
    let dit = Flux::new(config);
    resident_gpu.prepare_dit(128).unwrap();
    let mut rw = ResidentWeights::load(tr, dit.groups(), |t| resident_gpu.weight(t)).unwrap();
    let want = run(&dit, &resident_gpu, &mut rw, &pass, None);
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
            let got = run(&dit, &gpu, &mut w, &pass, None);
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

/// A table made by the streamed modulation model on the GPU, then steps of the DiT without
/// those weights, streamed, give the bits of the whole DiT computing its modulation in a
/// resident pass.
#[test]
fn precomputed_modulation_streamed_gives_the_bits_of_computing_it() {
    let test = "precomputed_modulation_streamed_gives_the_bits_of_computing_it";
    let Some(resident_gpu) = gpu(test, None) else {
        return;
    };
    let (config, tr, pass) = streaming_case(4);
    let dit = Flux::new(config.clone());
    resident_gpu.prepare_dit(128).unwrap();
    let mut rw = ResidentWeights::load(&tr, dit.groups(), |t| resident_gpu.weight(t)).unwrap();
    let want = run(&dit, &resident_gpu, &mut rw, &pass, None);
    drop(rw);
    drop(resident_gpu);

    let steps = Flux::precomputed(config);
    let modulation = steps.modulation_model();
    // Each model at about its least budget, so that both stream.
    let shape = PassShape {
        tokens: 1,
        batch: 4,
        past: 0,
    };
    let mod_gpu = gpu(test, Some(least_budget(&modulation, &tr, shape))).expect("the GPU");
    let setup = StreamSetup::new(shape, HostMemory::Auto);
    let mut mw =
        stream_weights(&mod_gpu, &tr, &modulation, setup).expect("the modulation model streams");
    let pooled: Vec<&[f32]> = pass.pooled.iter().map(Vec::as_slice).collect();
    let table = modulation
        .table(&mod_gpu, &mut mw, &[0.75, 0.25], Some(3.5), &pooled)
        .unwrap();
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
    for step in 0..2 {
        let got = run(&steps, &gpu, &mut sw, &pass, Some(&table));
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
