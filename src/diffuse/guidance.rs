//! Classifier-free guidance as the Z-Image pipeline applies it: both branches run as samples
//! of one DiT pass (`[positive × B, negative × B]`), then `pos + scale · (pos − neg)` per
//! image, optionally capped in norm, and dropped late in the schedule (`cfg_truncation`).

/// The pipeline's guidance settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Guidance {
    /// `guidance_scale`; guidance runs iff it is > 0 (Z-Image-Turbo uses 0).
    pub scale: f32,
    /// `cfg_normalization`: when > 0, each guided image's L2 norm is capped at this many times
    /// its positive branch's.
    pub normalization: f32,
    /// `cfg_truncation`: no guidance at steps whose model time `1 − σ` exceeds it (≤ 1; 1
    /// never truncates).
    pub truncation: f32,
}

impl Guidance {
    /// No guidance (one branch per image).
    pub const NONE: Guidance = Guidance {
        scale: 0.0,
        normalization: 0.0,
        truncation: 1.0,
    };

    /// Whether the step at model time `t_norm` (`(1000 − timestep) / 1000`) runs both
    /// branches.
    pub fn applies(&self, t_norm: f32) -> bool {
        let truncated = self.truncation <= 1.0 && t_norm > self.truncation;
        self.scale > 0.0 && !truncated
    }

    /// The guided output of each image from the pass's outputs `[2B, …]` (positive images
    /// first), `[B, …]`. Each image is `image_len` values.
    pub fn combine(&self, outputs: &[f32], image_len: usize) -> Vec<f32> {
        assert_eq!(outputs.len() % (2 * image_len), 0, "[2B, image] outputs");
        let half = outputs.len() / 2;
        let (pos, neg) = outputs.split_at(half);
        let mut out = Vec::with_capacity(half);
        for (p, n) in pos.chunks(image_len).zip(neg.chunks(image_len)) {
            let mut pred: Vec<f32> = p
                .iter()
                .zip(n)
                .map(|(&p, &n)| p + self.scale * (p - n))
                .collect();
            if self.normalization > 0.0 {
                let (pos_norm, new_norm) = (l2(p), l2(&pred));
                let max_norm = pos_norm * self.normalization;
                if new_norm > max_norm {
                    let k = max_norm / new_norm;
                    pred.iter_mut().for_each(|v| *v *= k);
                }
            }
            out.extend(pred);
        }
        out
    }
}

/// ‖x‖₂, accumulated in f64 and rounded to f32.
fn l2(x: &[f32]) -> f32 {
    x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt() as f32
}

/// Qwen-Image's true classifier-free guidance: both branches as samples of one DiT pass
/// (`[conditional × B, unconditional × B]`), then per token `comb = neg + scale · (cond − neg)`
/// rescaled to the conditional prediction's norm, `comb · (‖cond‖ / ‖comb‖)`, the norms over a
/// token's features (diffusers' `torch.norm(…, dim=-1)`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrueCfg {
    /// `true_cfg_scale`; guidance runs iff it is > 1 and a negative prompt is given.
    pub scale: f32,
}

impl TrueCfg {
    /// Whether a pipeline with this scale guides when `negative` says whether it has a
    /// negative prompt.
    pub fn applies(&self, negative: bool) -> bool {
        self.scale > 1.0 && negative
    }

    /// The guided prediction of each image from the pass's outputs `[2B, tokens, features]`
    /// (conditional images first), `[B, tokens, features]`.
    pub fn combine(&self, outputs: &[f32], features: usize) -> Vec<f32> {
        assert_eq!(
            outputs.len() % (2 * features),
            0,
            "[2B, tokens, features] outputs"
        );
        let (cond, neg) = outputs.split_at(outputs.len() / 2);
        let mut out = Vec::with_capacity(cond.len());
        for (c, n) in cond.chunks(features).zip(neg.chunks(features)) {
            let comb: Vec<f32> = c
                .iter()
                .zip(n)
                .map(|(&c, &n)| n + self.scale * (c - n))
                .collect();
            let k = l2(c) / l2(&comb);
            out.extend(comb.iter().map(|v| v * k));
        }
        out
    }
}
