//! The packed latents of the double-stream DiTs (Qwen-Image, Flux.1) as their diffusers
//! pipelines keep them (`_pack_latents`): `[batch, (H/16)·(W/16), 64]` for an `H × W` image
//! (16 latent channels × a 2×2 patch of the 8× smaller latent), the layout of `--noise` and
//! of diffusers' `latents=`; their sizes, and the schedule both pipelines build:
//! `np.linspace(1, 1/steps, steps)` shifted by the image's token count, the DiT given
//! `timestep / 1000`.

use crate::diffuse::scheduler::{flow_sigmas, FlowMatchConfig, Schedule};
use crate::error::{Error, Result};
use crate::model::qwen_image::PATCH;

/// Image pixels per latent pixel (the VAE's `vae_scale_factor`).
pub const VAE_SCALE: usize = 8;

/// Image sizes are multiples of this: a latent pixel is 8 image pixels and a DiT token 2×2
/// latent pixels.
pub const SIZE_MULTIPLE: usize = VAE_SCALE * PATCH;

/// The sigmas and timesteps of `steps` steps for an image of `height × width` pixels: the
/// pipeline's `np.linspace(1, 1/steps, steps)`, shifted by `mu` for its token count when the
/// scheduler shifts dynamically (Qwen-Image's and Flux.1-dev's do).
pub fn schedule(
    config: &FlowMatchConfig,
    steps: usize,
    height: usize,
    width: usize,
) -> Result<Schedule> {
    check_size(height, width)?;
    if steps == 0 {
        return Err(Error::Flag {
            flag: "--steps",
            message: "0; expected at least 1 denoising step".into(),
        });
    }
    let tokens = image_tokens(height, width);
    Ok(config.schedule(&flow_sigmas(steps), config.mu(tokens)))
}

/// DiT tokens of an image of `height × width` pixels (the packed latents' rows).
pub fn image_tokens(height: usize, width: usize) -> usize {
    (height / SIZE_MULTIPLE) * (width / SIZE_MULTIPLE)
}

/// An error unless `height × width` pixels are positive multiples of [`SIZE_MULTIPLE`].
pub fn check_size(height: usize, width: usize) -> Result<()> {
    for (flag, v) in [("--height", height), ("--width", width)] {
        if v == 0 || v % SIZE_MULTIPLE != 0 {
            return Err(Error::Flag {
                flag,
                message: format!(
                    "{v} pixels; expected a positive multiple of {SIZE_MULTIPLE} (the latents are 1/{VAE_SCALE} of the image, the DiT's tokens {PATCH}×{PATCH} latent pixels)"
                ),
            });
        }
    }
    Ok(())
}

/// An error naming `--noise` unless `noise` holds `[batch, (height/16)·(width/16),
/// channels]` values (`channels` = the DiT's `in_channels`, 64).
pub fn check_noise(
    noise: &[f32],
    batch: usize,
    height: usize,
    width: usize,
    channels: usize,
) -> Result<()> {
    check_size(height, width)?;
    let tokens = image_tokens(height, width);
    let want = batch * tokens * channels;
    if noise.len() != want || batch == 0 {
        return Err(Error::Flag {
            flag: "--noise",
            message: format!(
                "{} values; expected packed latents [{batch}, {tokens}, {channels}] = {want} values for {batch} image(s) of {height}×{width} (diffusers' latents= layout: [batch, (H/16)·(W/16), 64])",
                noise.len()
            ),
        });
    }
    Ok(())
}

/// The DiT's time at step `i`: the pipeline's `timestep / 1000` in f32.
pub fn model_time(schedule: &Schedule, i: usize) -> f32 {
    schedule.timesteps[i] / 1000.0
}

/// The DiT's time of every step, in order: what a [`ModulationTable`] is made for.
pub fn model_times(schedule: &Schedule) -> Vec<f32> {
    (0..schedule.steps())
        .map(|i| model_time(schedule, i))
        .collect()
}
