//! Qwen-Image's VAE decoder on the GPU (bf16, channels-last; the channel RMS norm is the row
//! RMSNorm kernel) against the CPU's f32 decode and diffusers, on the tiny random VAE of
//! tests/fixtures/qwen-image/vae. Without a usable GPU each test prints
//! "SKIPPED: no usable CUDA device: <why>" and passes.

mod common;

use std::path::PathBuf;

use common::{fixture, gpu, read_reference, rel_l2};
use ferry::backend::cpu::Cpu;
use ferry::diffuse::pipeline::gaussian_noise;
use ferry::model::qwen_image::vae::{open_qwen_vae, QwenVae};
use ferry::model::vae::{to_rgb8, Tiling};

fn dir() -> PathBuf {
    fixture("qwen-image")
}

/// The odd-sized latent within bf16 noise of diffusers' f32 decode (no further from it than
/// diffusers' own bf16 run, with a margin of 2× for a different order of bf16 roundings), the
/// pipeline's batch within the same of the CPU's f32 decode with pixels mostly equal, and a
/// 512×512 decode (convolutions in several blocks of rows) within 2e-2 of the CPU's.
#[test]
fn qwen_vae_decodes_on_the_gpu_within_bf16_noise() {
    let test = "qwen_vae_decodes_on_the_gpu_within_bf16_noise";
    let Some(gpu) = gpu(test, None) else { return };
    let refs = read_reference(&dir().join("vae_reference.safetensors"));
    let weights = open_qwen_vae(&dir().join("vae")).unwrap();
    let on_gpu = QwenVae::load(&gpu, &weights).unwrap();
    let on_cpu = QwenVae::load(&Cpu, &weights).unwrap();

    let want = &refs["odd.decoded"];
    let bf16_err = rel_l2(&refs["odd.decoded_bf16"], want);
    let got = on_gpu
        .decode_unscaled(&gpu, &refs["odd.z"], [1, 16, 3, 5], Tiling::Whole)
        .unwrap();
    let err = rel_l2(&got, want);
    eprintln!("odd: CUDA vs diffusers f32 rel L2 {err:.3e} (diffusers bf16: {bf16_err:.3e})");
    assert!(err <= 2.0 * bf16_err.max(1e-3), "odd: rel L2 {err:.3e}");

    let latents = &refs["pipeline.latents"];
    let shape = [2, 16, 6, 10];
    let cpu = on_cpu.decode(&Cpu, latents, shape, Tiling::Whole).unwrap();
    let got = on_gpu.decode(&gpu, latents, shape, Tiling::Whole).unwrap();
    let err = rel_l2(&got, &cpu);
    eprintln!("pipeline: CUDA vs CPU f32 rel L2 {err:.3e}");
    assert!(
        err <= 2.0 * bf16_err.max(1e-3),
        "pipeline: rel L2 {err:.3e}"
    );
    let (a, b) = (to_rgb8(&got, [2, 3, 48, 80]), to_rgb8(&cpu, [2, 3, 48, 80]));
    let mean = a
        .iter()
        .zip(&b)
        .map(|(x, y)| x.abs_diff(*y) as f64)
        .sum::<f64>()
        / a.len() as f64;
    eprintln!("pipeline: CUDA vs CPU mean |Δ| {mean:.3} of 255");
    assert!(mean < 1.0, "mean pixel difference {mean}");

    let (h, w) = (64, 64);
    let z = gaussian_noise(12, 16 * h * w);
    let cpu = on_cpu
        .decode_unscaled(&Cpu, &z, [1, 16, h, w], Tiling::Whole)
        .unwrap();
    let got = on_gpu
        .decode_unscaled(&gpu, &z, [1, 16, h, w], Tiling::Whole)
        .unwrap();
    let err = rel_l2(&got, &cpu);
    eprintln!("512x512 decode: CUDA bf16 vs CPU f32 rel L2 {err:.3e}");
    assert!(err <= 2e-2, "512x512 decode: rel L2 {err:.3e}");
}

/// The decoder's memory on the GPU as `QwenVaeConfig::decode_peak_bytes` estimates it: no
/// less than the ledger's peak over a whole 512×512 decode, and not far above; its weights
/// on the GPU as `decoder_bytes` counts them.
#[test]
fn qwen_vae_peak_is_estimated_within_ten_percent() {
    use ferry::backend::cuda::IMAGE_MEMORY;
    let test = "qwen_vae_peak_is_estimated_within_ten_percent";
    let Some(gpu) = gpu(test, None) else { return };
    let weights = open_qwen_vae(&dir().join("vae")).unwrap();
    let (h, w) = (64, 64);
    let z = gaussian_noise(21, 16 * h * w);
    let fixed = gpu.memory().in_use();
    let on_gpu = QwenVae::load(&gpu, &weights).unwrap();
    let loaded = gpu.memory().in_use();
    assert_eq!(loaded - fixed, weights.decoder_bytes(2).unwrap());
    on_gpu
        .decode(&gpu, &z, [1, 16, h, w], Tiling::Whole)
        .unwrap();
    let measured = gpu.memory().peak() - loaded;
    let estimate = weights.config.decode_peak_bytes(h, w, IMAGE_MEMORY);
    eprintln!("whole {h}×{w} decode: ledger peak {measured} B, estimated {estimate} B");
    assert!(
        measured <= estimate,
        "estimate {estimate} below the peak {measured}"
    );
    assert!(
        estimate <= measured + measured / 10,
        "estimate {estimate} far above the peak {measured}"
    );
}
