//! Z-Image's denoising loop as diffusers' `ZImagePipeline` runs it: flow-match Euler over the
//! scheduler's sigmas, the DiT given `t = (1000 − timestep) / 1000`, its output negated into
//! the velocity, and classifier-free guidance with both branches in one pass.

use crate::backend::cpu::{Cpu, CpuWeight};
use crate::diffuse::scheduler::Schedule;
use crate::error::Result;
use crate::model::z_image::{Sample, ZImage};
use crate::model::Weights;

/// Classifier-free guidance as Z-Image's pipeline applies it: `pos + scale · (pos − neg)`
/// while `scale > 0` (so 0 is off and 1 already guides), with the guided prediction's norm
/// capped at `normalization × ‖pos‖` when `normalization > 0`, and no guidance at steps whose
/// time `1 − σ` exceeds `truncation`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Guidance {
    pub scale: f32,
    pub normalization: f32,
    pub truncation: f32,
}

impl Guidance {
    pub const OFF: Guidance = Guidance {
        scale: 0.0,
        normalization: 0.0,
        truncation: 1.0,
    };

    pub fn enabled(&self) -> bool {
        self.scale > 0.0
    }

    /// Whether step `i` of `schedule` guides.
    pub fn applies(&self, schedule: &Schedule, i: usize) -> bool {
        let t = (1000.0 - schedule.timesteps[i]) / 1000.0;
        self.enabled() && !(self.truncation <= 1.0 && t > self.truncation)
    }
}

/// What to denoise: `batch` latents `[16, height, width]` each, one caption embedding per
/// image, and with guidance one negative embedding per image.
pub struct Denoise<'a> {
    pub latents: Vec<Vec<f32>>,
    pub prompts: &'a [Vec<f32>],
    pub negatives: &'a [Vec<f32>],
    pub height: usize,
    pub width: usize,
    pub guidance: Guidance,
}

/// Run every step of `schedule` and return the final latents; `on_step(i, latents)` sees
/// the latents after each step.
pub fn denoise(
    cpu: &Cpu,
    dit: &ZImage,
    weights: &mut impl Weights<CpuWeight>,
    schedule: &Schedule,
    mut job: Denoise<'_>,
    mut on_step: impl FnMut(usize, &[Vec<f32>]),
) -> Result<Vec<Vec<f32>>> {
    let n = job.latents.len();
    for i in 0..schedule.steps() {
        let t = (1000.0 - schedule.timesteps[i]) / 1000.0;
        let guided = job.guidance.applies(schedule, i);
        // One pass: the conditional samples, then (when guiding) the unconditional ones.
        let mut samples: Vec<Sample> = (0..n)
            .map(|b| Sample {
                latents: &job.latents[b],
                caption: &job.prompts[b],
                t,
            })
            .collect();
        if guided {
            samples.extend((0..n).map(|b| Sample {
                latents: &job.latents[b],
                caption: &job.negatives[b],
                t,
            }));
        }
        let out = dit.forward(cpu, weights, &samples, job.height, job.width)?;
        for b in 0..n {
            let mut pred = out[b].clone();
            if guided {
                let g = job.guidance;
                let pos_norm = norm(&out[b]);
                for (p, (&pos, &neg)) in pred.iter_mut().zip(out[b].iter().zip(&out[n + b])) {
                    *p = pos + g.scale * (pos - neg);
                }
                if g.normalization > 0.0 {
                    let (new, max) = (norm(&pred), pos_norm * g.normalization);
                    if new > max {
                        let k = max / new;
                        pred.iter_mut().for_each(|p| *p *= k);
                    }
                }
            }
            // The model predicts (x0 − noise); the scheduler steps along its negation.
            pred.iter_mut().for_each(|p| *p = -*p);
            schedule.step(i, &mut job.latents[b], &pred);
        }
        on_step(i, &job.latents);
    }
    Ok(job.latents)
}

/// ‖x‖₂, accumulated in f64.
fn norm(x: &[f32]) -> f32 {
    x.iter()
        .map(|&v| (v as f64) * (v as f64))
        .sum::<f64>()
        .sqrt() as f32
}
