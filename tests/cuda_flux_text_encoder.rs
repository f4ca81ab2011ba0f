//! Flux.1's text encoders on the GPU (bf16) against transformers on the tiny models of
//! tests/fixtures/flux-text: T5's hidden states and CLIP's pooled output are at least as close
//! to transformers' f32 as transformers' own bf16 run is; each new op against the CPU; T5
//! streamed at several budgets gives the resident result bit for bit, within the budget.
//! Without a usable GPU each test prints "SKIPPED: no usable CUDA device: <why>" and passes.

mod common;

use std::path::Path;

use ferry::backend::cpu::Cpu;
use ferry::backend::cuda::streaming::HostMemory;
use ferry::backend::cuda::{CUBLAS_WORKSPACE, DRIVER_RESERVE};
use ferry::backend::dit::DitOps;
use ferry::backend::encoder::EncoderOps;
use ferry::backend::Backend;
use ferry::checkpoint::Component;
use ferry::diffuse::pipeline::gaussian_noise;
use ferry::model::clip::ClipText;
use ferry::model::t5::T5Encoder;
use ferry::model::{Architecture, PassShape, ResidentWeights};
use ferry::runtime::{stream_weights, StreamSetup};
use ferry::synth::random_component;

use common::{gpu, read_reference, rel_l2};

fn fixture(name: &str) -> Component {
    Component::open(name, &common::fixture("flux-text").join(name), true).unwrap()
}

fn ids(v: &[f32]) -> Vec<u32> {
    v.iter().map(|&x| x as u32).collect()
}

/// `ours` (ferry bf16 vs f32) within 1.25 × `theirs` (transformers bf16 vs f32).
fn as_close(what: &str, got: &[f32], want: &[f32], bf16: &[f32]) {
    let (ours, theirs) = (rel_l2(got, want), rel_l2(bf16, want));
    eprintln!("{what}: ferry CUDA bf16 vs f32 {ours:.3e}; transformers bf16 vs f32 {theirs:.3e}");
    assert!(
        ours <= 1.25 * theirs,
        "{what}: CUDA bf16 {ours:.3e} from f32, transformers bf16 {theirs:.3e}"
    );
}

#[test]
fn encoders_in_bf16_are_as_close_to_f32_as_transformers_bf16() {
    let test = "encoders_in_bf16_are_as_close_to_f32_as_transformers_bf16";
    let Some(gpu) = gpu(test, None) else { return };
    gpu.prepare_encoder().unwrap();
    let r = read_reference(&common::fixture("flux-text").join("reference.safetensors"));

    let c = fixture("text_encoder_2");
    let t5 = T5Encoder::open(&c).unwrap();
    let mut w = ResidentWeights::load(&c, t5.groups(), |t| gpu.weight(t)).unwrap();
    let prompts = [ids(&r["t5.0.ids"]), ids(&r["t5.1.ids"])];
    let p: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let got = t5.forward(&gpu, &mut w, &p).unwrap();
    let d = 32;
    let (a, b) = got.split_at(512 * d);
    as_close("t5 prompt 0", a, &r["t5.0.hidden"], &r["t5.0.hidden_bf16"]);
    as_close("t5 prompt 1", b, &r["t5.1.hidden"], &r["t5.1.hidden_bf16"]);

    let c = fixture("text_encoder");
    let clip = ClipText::open(&c).unwrap();
    let mut w = ResidentWeights::load(&c, clip.groups(), |t| gpu.weight(t)).unwrap();
    let prompts = [ids(&r["clip.0.ids"]), ids(&r["clip.1.ids"])];
    let p: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let pooled = clip.pooled(&gpu, &mut w, &p).unwrap();
    for (i, got) in pooled.iter().enumerate() {
        as_close(
            &format!("clip pooled {i}"),
            got,
            &r[&format!("clip.{i}.pooled")],
            &r[&format!("clip.{i}.pooled_bf16")],
        );
    }
}

/// Each op of `EncoderOps` on the GPU against the CPU's, on the same bf16-representable
/// inputs: within bf16 rounding of the result.
#[test]
fn encoder_ops_match_the_cpu() {
    let test = "encoder_ops_match_the_cpu";
    let Some(gpu) = gpu(test, None) else { return };
    let round = |v: Vec<f32>| -> Vec<f32> {
        v.into_iter()
            .map(|x| half::bf16::from_f32(x).to_f32())
            .collect()
    };
    let check = |what: &str, got: Vec<f32>, want: Vec<f32>| {
        let e = rel_l2(&got, &want);
        eprintln!("{what}: relative L2 {e:.2e}");
        assert!(e <= 8e-3, "{what}: relative L2 {e:.3e}");
    };
    let (rows, cols) = (37, 96);
    let x = round(gaussian_noise(1, rows * cols));
    let up = round(gaussian_noise(2, rows * cols));

    let (xc, xg) = (
        Cpu.upload(&x, rows, cols).unwrap(),
        gpu.upload(&x, rows, cols).unwrap(),
    );
    let mut g = gpu.upload(&x, rows, cols).unwrap();
    let mut c = xc.clone();
    gpu.quick_gelu(&mut g).unwrap();
    Cpu.quick_gelu(&mut c).unwrap();
    check("quick_gelu", gpu.to_host(&g).unwrap(), c.data.clone());
    let mut g = gpu.upload(&x, rows, cols).unwrap();
    let mut c = xc.clone();
    gpu.gelu_tanh_mul(&mut g, &gpu.upload(&up, rows, cols).unwrap())
        .unwrap();
    Cpu.gelu_tanh_mul(&mut c, &Cpu.upload(&up, rows, cols).unwrap())
        .unwrap();
    check("gelu_tanh_mul", gpu.to_host(&g).unwrap(), c.data);

    // LayerNorm's weight and bias from a tiny component.
    let json = serde_json::json!({"model_type": "clip_text_model", "hidden_size": cols, "intermediate_size": 8,
        "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 4, "max_position_embeddings": 4});
    let clip = ClipText::from_json(Path::new("test/config.json"), &json).unwrap();
    let comp = random_component("text_encoder", "CLIPTextModel", json, clip.groups(), 5);
    let (wn, bn) = (
        "text_model.final_layer_norm.weight",
        "text_model.final_layer_norm.bias",
    );
    let (wt, bt) = (comp.tensor(wn).unwrap(), comp.tensor(bn).unwrap());
    let got = gpu
        .layer_norm_affine(
            &xg,
            &gpu.weight(wt).unwrap(),
            &gpu.weight(bt).unwrap(),
            1e-5,
        )
        .unwrap();
    let want = Cpu
        .layer_norm_affine(
            &xc,
            &Cpu.weight(wt).unwrap(),
            &Cpu.weight(bt).unwrap(),
            1e-5,
        )
        .unwrap();
    check("layer_norm_affine", gpu.to_host(&got).unwrap(), want.data);

    // Two samples (30 and 7 rows), 3 heads of 32, a bias of span 30.
    let (heads, hd, span) = (3, 32, 30);
    let samples = [0..30, 30..37];
    let qkv: Vec<Vec<f32>> = (0..3)
        .map(|s| round(gaussian_noise(10 + s, rows * cols)))
        .collect();
    let bias = round(gaussian_noise(20, (2 * span - 1) * heads));
    let (qc, kc, vc) = (
        Cpu.upload(&qkv[0], rows, cols).unwrap(),
        Cpu.upload(&qkv[1], rows, cols).unwrap(),
        Cpu.upload(&qkv[2], rows, cols).unwrap(),
    );
    let (qg, kg, vg) = (
        gpu.upload(&qkv[0], rows, cols).unwrap(),
        gpu.upload(&qkv[1], rows, cols).unwrap(),
        gpu.upload(&qkv[2], rows, cols).unwrap(),
    );
    let bc = Cpu.upload(&bias, 2 * span - 1, heads).unwrap();
    let bg = gpu.upload(&bias, 2 * span - 1, heads).unwrap();
    let want = Cpu
        .attention_biased(&qc, &kc, &vc, &bc, &samples, heads, hd)
        .unwrap();
    let got = gpu
        .attention_biased(&qg, &kg, &vg, &bg, &samples, heads, hd)
        .unwrap();
    check("attention_biased", gpu.to_host(&got).unwrap(), want.data);
}

#[test]
fn streamed_t5_equals_resident_bit_for_bit_within_the_budget() {
    let test = "streamed_t5_equals_resident_bit_for_bit_within_the_budget";
    let Some(resident_gpu) = gpu(test, None) else {
        return;
    };
    // Blocks of 2.4 MB in bf16 (d_model 256, d_ff 1024), random weights, so that blocks stream.
    let json = serde_json::json!({
        "model_type": "t5", "d_model": 256, "d_kv": 64, "d_ff": 1024, "num_layers": 4,
        "num_heads": 4, "vocab_size": 320, "feed_forward_proj": "gated-gelu",
    });
    let t5 = T5Encoder::from_json(Path::new("test/config.json"), &json).unwrap();
    let c = random_component("text_encoder_2", "T5EncoderModel", json, t5.groups(), 7);
    let prompts: Vec<Vec<u32>> = vec![
        (0..64).map(|i| (i * 7 % 320) as u32).collect(),
        (0..20).collect(),
    ];
    let p: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    resident_gpu.prepare_encoder().unwrap();
    let mut rw = ResidentWeights::load(&c, t5.groups(), |t| resident_gpu.weight(t)).unwrap();
    let want = t5.forward(&resident_gpu, &mut rw, &p).unwrap();
    drop(rw);
    drop(resident_gpu);

    let shape = PassShape {
        tokens: 64,
        batch: 2,
        past: 0,
    };
    let largest = t5
        .groups()
        .iter()
        .map(|g| {
            g.tensors
                .iter()
                .map(|t| c.tensor(&t.name).unwrap().bytes().len())
                .sum::<usize>()
        })
        .max()
        .unwrap();
    let fixed = CUBLAS_WORKSPACE
        + DRIVER_RESERVE
        + t5.pass_cost(shape).workspace
        + 2 * largest
        + (512 << 10);
    let mut streamed_some = false;
    for fraction in [0.0, 0.3, 1.5] {
        let budget = fixed + (c.bytes() as f64 * fraction) as usize;
        let gpu = gpu(test, Some(budget)).expect("the GPU was there a moment ago");
        let mut w = stream_weights(&gpu, &c, &t5, StreamSetup::new(shape, HostMemory::Auto))
            .unwrap_or_else(|e| panic!("budget {budget}: {e}"));
        let streamed = w.plan().streamed_bytes();
        for pass in 0..2 {
            let got = t5.forward(&gpu, &mut w, &p).unwrap();
            assert!(
                got.iter()
                    .map(|v| v.to_bits())
                    .eq(want.iter().map(|v| v.to_bits())),
                "budget {budget}, pass {pass}: streamed differs from resident"
            );
        }
        let peak = gpu.memory().peak();
        assert!(peak <= budget, "budget {budget}: ledger peak {peak}");
        eprintln!("budget {budget}: {streamed} bytes streamed a pass, ledger peak {peak}");
        streamed_some |= streamed > 0;
    }
    assert!(streamed_some, "no budget streamed anything");
}
