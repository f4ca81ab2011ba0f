//! Z-Image's denoising loop as diffusers' `ZImagePipeline` runs it: flow-match Euler over the
//! scheduler's sigmas, the DiT given `t = (1000 − timestep) / 1000`, its output negated into
//! the velocity, and classifier-free guidance with both branches in one pass.

use crate::backend::dit::DitOps;
use crate::diffuse::guidance::Guidance;
use crate::diffuse::scheduler::Schedule;
use crate::error::Result;
use crate::model::z_image::{DitInput, ZImage};
use crate::model::Weights;

/// What to denoise: `[batch, 16, height, width]` latents, the caption embedding of every
/// image, and with guidance the negative embedding of every image.
pub struct Denoise<'a> {
    pub latents: Vec<f32>,
    pub batch: usize,
    pub prompt: &'a [f32],
    pub negative: Option<&'a [f32]>,
    pub height: usize,
    pub width: usize,
    pub guidance: Guidance,
}

/// The model's time at step `i`: `1 − σ`, as the pipeline computes it from the timestep.
pub fn model_time(schedule: &Schedule, i: usize) -> f32 {
    (1000.0 - schedule.timesteps[i]) / 1000.0
}

/// Run every step of `schedule` and return the final latents; `on_step(i, latents)` sees
/// the latents after each step.
pub fn denoise<B: DitOps>(
    backend: &B,
    dit: &ZImage,
    weights: &mut impl Weights<B::Weight>,
    schedule: &Schedule,
    mut job: Denoise<'_>,
    mut on_step: impl FnMut(usize, &[f32]),
) -> Result<Vec<f32>> {
    let n = job.batch;
    let image_len = job.latents.len() / n.max(1);
    for i in 0..schedule.steps() {
        let t = model_time(schedule, i);
        let guided = job.guidance.applies(t) && job.negative.is_some();
        // One pass: the conditional samples, then (when guiding) the unconditional ones on
        // the same latents.
        let mut captions: Vec<&[f32]> = vec![job.prompt; n];
        let mut latents = job.latents.clone();
        if let (true, Some(neg)) = (guided, job.negative) {
            captions.extend(std::iter::repeat_n(neg, n));
            latents.extend_from_slice(&job.latents);
        }
        let ts = vec![t; captions.len()];
        let out = dit.forward(
            backend,
            weights,
            &DitInput {
                latents: &latents,
                height: job.height,
                width: job.width,
                t: &ts,
                captions: &captions,
            },
        )?;
        let mut pred = match guided {
            true => job.guidance.combine(&out, image_len),
            false => out,
        };
        // The model predicts (x0 − noise); the scheduler steps along its negation.
        pred.iter_mut().for_each(|p| *p = -*p);
        schedule.step(i, &mut job.latents, &pred);
        on_step(i, &job.latents);
    }
    Ok(job.latents)
}
