//! Qwen-Image's denoising loop as diffusers' `QwenImagePipeline` runs it: flow-match Euler
//! over `np.linspace(1, 1/steps, steps)` shifted by the image's token count, the DiT given
//! `timestep / 1000` and stepped along its output, and true classifier-free guidance
//! ([`TrueCfg`]) with both branches as samples of one DiT pass, so that a guided step reads
//! the weights once.
//!
//! Latents stay packed throughout, as the pipeline keeps them (`_pack_latents`): `[batch,
//! (H/16)·(W/16), 64]` for an `H × W` image (16 latent channels × a 2×2 patch of the 8×
//! smaller latent); this is the layout of `--noise` and of diffusers' `latents=` argument.

use crate::backend::dit::DitOps;
use crate::diffuse::guidance::TrueCfg;
pub use crate::diffuse::packed::{
    check_noise, check_size, image_tokens, model_time, model_times, schedule, SIZE_MULTIPLE,
    VAE_SCALE,
};
use crate::diffuse::scheduler::Schedule;
use crate::error::{Error, Result};
use crate::model::qwen_image::{DitInput, ModulationTable, QwenImage};
use crate::model::Weights;

/// What to denoise.
pub struct Denoise<'a> {
    /// `[batch, (height/16)·(width/16), in_channels]` f32: the packed noise (`--noise`, the
    /// pipeline's `latents=`).
    pub latents: Vec<f32>,
    pub batch: usize,
    /// Image pixels, multiples of [`SIZE_MULTIPLE`].
    pub height: usize,
    pub width: usize,
    /// One per image, `[tokens, joint_attention_dim]` f32: the prompt's embedding (its valid
    /// rows; the lengths may differ).
    pub prompts: &'a [&'a [f32]],
    /// One per image when a negative prompt is given: its embedding.
    pub negatives: Option<&'a [&'a [f32]]>,
    pub guidance: TrueCfg,
    /// Every step's modulation, made once ([`model_times`] of the schedule); needed by a
    /// [`QwenImage::precomputed`] DiT, which leaves those weights out.
    pub modulation: Option<&'a ModulationTable>,
}

/// Run every step of `schedule` and return the final packed latents `[batch, tokens,
/// in_channels]`; `on_step(i, latents)` sees the latents after each step.
pub fn denoise<B: DitOps>(
    backend: &B,
    dit: &QwenImage,
    weights: &mut impl Weights<B::Weight>,
    schedule: &Schedule,
    mut job: Denoise<'_>,
    mut on_step: impl FnMut(usize, &[f32]),
) -> Result<Vec<f32>> {
    let n = job.batch;
    let features = dit.config.in_channels;
    check_noise(&job.latents, n, job.height, job.width, features)?;
    let texts = |what: &'static str, t: &[&[f32]]| match t.len() == n {
        true => Ok(()),
        false => Err(Error::Flag {
            flag: what,
            message: format!(
                "{} embeddings for {n} images; expected one per image",
                t.len()
            ),
        }),
    };
    texts("prompt", job.prompts)?;
    if let Some(neg) = job.negatives {
        texts("negative prompt", neg)?;
    }
    let guided = job.guidance.applies(job.negatives.is_some());
    // The samples of every pass: the conditional ones, then (when guiding) the
    // unconditional ones on the same latents.
    let mut texts: Vec<&[f32]> = job.prompts.to_vec();
    if let (true, Some(neg)) = (guided, job.negatives) {
        texts.extend_from_slice(neg);
    }
    let (h, w) = (job.height / VAE_SCALE, job.width / VAE_SCALE);
    for i in 0..schedule.steps() {
        let t = vec![model_time(schedule, i); texts.len()];
        let mut latents = job.latents.clone();
        if guided {
            latents.extend_from_slice(&job.latents);
        }
        let input = DitInput {
            latents: &latents,
            height: h,
            width: w,
            timestep: &t,
            texts: &texts,
        };
        let out = match job.modulation {
            Some(table) => dit.forward_with(backend, weights, &input, table)?,
            None => dit.forward(backend, weights, &input)?,
        };
        let velocity = match guided {
            true => job.guidance.combine(&out, features),
            false => out,
        };
        schedule.step(i, &mut job.latents, &velocity);
        on_step(i, &job.latents);
    }
    Ok(job.latents)
}
