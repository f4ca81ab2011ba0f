//! Flux.1's denoising loop as diffusers' `FluxPipeline` runs it: flow-match Euler over
//! `np.linspace(1, 1/steps, steps)` shifted by the image's token count (Flux.1-dev's scheduler
//! shifts dynamically; schnell's does not), the DiT given `timestep / 1000`, the guidance scale
//! (for a model with `guidance_embeds`) and CLIP's pooled prompt embedding, and stepped along
//! its output. Flux.1 is guidance-distilled: one branch a step, the scale embedded.
//!
//! Latents stay packed throughout ([`crate::diffuse::packed`]): `[batch, (H/16)·(W/16), 64]`,
//! the layout of `--noise` and of diffusers' `latents=`.

use crate::backend::dit::DitOps;
use crate::diffuse::packed::{check_noise, model_time, VAE_SCALE};
use crate::diffuse::scheduler::Schedule;
use crate::error::{Error, Result};
use crate::model::flux::{DitInput, Flux, ModulationTable};
use crate::model::Weights;

/// What to denoise.
pub struct Denoise<'a> {
    /// `[batch, (height/16)·(width/16), in_channels]` f32: the packed noise.
    pub latents: Vec<f32>,
    pub batch: usize,
    /// Image pixels, multiples of 16.
    pub height: usize,
    pub width: usize,
    /// One per image, `[tokens, joint_attention_dim]` f32: T5's embedding of the prompt.
    pub texts: &'a [&'a [f32]],
    /// One per image, `[pooled_projection_dim]` f32: CLIP's pooled embedding of the prompt.
    pub pooled: &'a [&'a [f32]],
    /// The guidance scale, for a DiT with `guidance_embeds` (`None` without).
    pub guidance: Option<f32>,
    /// Every step's modulation, made once for the schedule's times, this guidance and these
    /// pooled embeddings; needed by a [`Flux::precomputed`] DiT, which leaves those weights
    /// out.
    pub modulation: Option<&'a ModulationTable>,
}

/// Run every step of `schedule` and return the final packed latents `[batch, tokens,
/// in_channels]`; `on_step(i, latents)` sees the latents after each step.
pub fn denoise<B: DitOps>(
    backend: &B,
    dit: &Flux,
    weights: &mut impl Weights<B::Weight>,
    schedule: &Schedule,
    mut job: Denoise<'_>,
    mut on_step: impl FnMut(usize, &[f32]),
) -> Result<Vec<f32>> {
    let n = job.batch;
    check_noise(
        &job.latents,
        n,
        job.height,
        job.width,
        dit.config.in_channels,
    )?;
    for (what, count) in [
        ("prompt", job.texts.len()),
        ("pooled prompt", job.pooled.len()),
    ] {
        if count != n {
            return Err(Error::Flag {
                flag: what,
                message: format!("{count} embeddings for {n} images; expected one per image"),
            });
        }
    }
    let guidance = job.guidance.map(|g| vec![g; n]);
    let (h, w) = (job.height / VAE_SCALE, job.width / VAE_SCALE);
    for i in 0..schedule.steps() {
        let t = vec![model_time(schedule, i); n];
        let input = DitInput {
            latents: &job.latents,
            height: h,
            width: w,
            timestep: &t,
            guidance: guidance.as_deref(),
            pooled: job.pooled,
            texts: job.texts,
        };
        let velocity = match job.modulation {
            Some(table) => dit.forward_with(backend, weights, &input, table)?,
            None => dit.forward(backend, weights, &input)?,
        };
        schedule.step(i, &mut job.latents, &velocity);
        on_step(i, &job.latents);
    }
    Ok(job.latents)
}
