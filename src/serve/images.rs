//! The image worker: one thread owns the Z-Image pipeline and generates one request's images
//! at a time (a request's `n` images denoised together as one batch), beside the text
//! engine's thread, so that an image job never holds up a text pass. Requests wait in a
//! bounded queue (the HTTP side answers 429 when it is full); each answer goes back as PNG
//! files, encoded here, off the HTTP thread.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::time::Instant;

use tokio::sync::oneshot;

use crate::diffuse::pipeline::{gaussian_noise, Compute, ImagePipeline, ImageRequest};
use crate::diffuse::png::{self, Parameters};
use crate::serve::api::{ApiError, ImageAsk};
use crate::serve::engine::Metrics;

/// A checked image request (its seed drawn), with the channel its answer goes back on.
pub struct ImageJob {
    pub ask: ImageAsk,
    pub seed: u64,
    /// The images, or why not: a request the model cannot serve as asked (400) or a failed
    /// generation (500).
    pub reply: oneshot::Sender<Result<Generated, ApiError>>,
}

/// A request's images and what went into them.
pub struct Generated {
    /// One PNG file each, the bytes `ferry image` writes for the same settings.
    pub pngs: Vec<Vec<u8>>,
    /// Caption tokens of the prompt and of the negative prompt.
    pub text_tokens: usize,
    /// Latent patches the DiT denoised, all images together.
    pub image_tokens: usize,
}

/// Generate every job from `jobs` in turn on `compute`, until `jobs` is closed. `model` is
/// the name the PNGs' parameters carry (as `ferry image` writes it). A job whose client has
/// gone is skipped.
pub fn run(
    pipe: &ImagePipeline,
    compute: &Compute<'_>,
    model: &str,
    jobs: Receiver<ImageJob>,
    metrics: &Metrics,
) {
    for job in jobs {
        metrics.image_queued.fetch_sub(1, Ordering::SeqCst);
        if job.reply.is_closed() {
            continue;
        }
        metrics.image_running.store(1, Ordering::SeqCst);
        let start = Instant::now();
        // A panic is a bug; it fails this request, and the worker goes on with the next.
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
            generate(pipe, compute, model, &job.ask, job.seed)
        }))
        .unwrap_or_else(|_| {
            Err(ApiError::new(
                500,
                "server_error",
                "the image generation failed on a bug in ferry (a panic; see the server's log)",
            ))
        });
        if let Ok(g) = &result {
            metrics.image_jobs.fetch_add(1, Ordering::Relaxed);
            metrics
                .images_generated
                .fetch_add(g.pngs.len() as u64, Ordering::Relaxed);
            metrics
                .image_us
                .fetch_add(start.elapsed().as_micros() as u64, Ordering::Relaxed);
        }
        metrics.image_running.store(0, Ordering::SeqCst);
        let _ = job.reply.send(result);
    }
}

/// What `ferry image --seed SEED` does for the same settings, into memory.
fn generate(
    pipe: &ImagePipeline,
    compute: &Compute<'_>,
    model: &str,
    ask: &ImageAsk,
    seed: u64,
) -> Result<Generated, ApiError> {
    let (w, h) = (ask.width, ask.height);
    let defaults = pipe.defaults();
    let steps = ask.steps.unwrap_or(defaults.steps);
    let guidance = ask.guidance.unwrap_or(defaults.guidance);
    if ask.negative_prompt.is_some() && !pipe.guides(guidance, true) {
        return Err(ApiError::field(
            "negative_prompt",
            format!(
                "acts only with guidance (classifier-free guidance), and {} does not guide at guidance {guidance}; give a larger \"guidance\"",
                pipe.model_name()
            ),
        ));
    }
    let shape = pipe.noise_shape(ask.n, h, w);
    let request = ImageRequest {
        prompt: ask.prompt.clone(),
        negative_prompt: ask.negative_prompt.clone(),
        width: w,
        height: h,
        steps,
        batch: ask.n,
        guidance,
        noise: gaussian_noise(seed, shape.iter().product()),
    };
    let images = pipe
        .generate(compute, &request, |_| {})
        .map_err(|e| ApiError::new(500, "server_error", e.to_string()))?;
    let params = Parameters {
        prompt: ask.prompt.clone(),
        negative_prompt: ask.negative_prompt.clone(),
        steps,
        seed,
        width: w,
        height: h,
        guidance,
        model: model.to_string(),
    };
    Ok(Generated {
        pngs: images
            .rgb
            .iter()
            .map(|rgb| png::encode(rgb, w, h, &params))
            .collect(),
        text_tokens: images.prompt_tokens + images.negative_tokens,
        // The DiT's 2×2 patches of the latents (8× smaller than the image).
        image_tokens: ask.n * (h / 16) * (w / 16),
    })
}

/// `bytes` in standard base64 with padding (RFC 4648 §4), as OpenAI's `b64_json`.
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        // Three bytes are four 6-bit digits; a short last chunk is padded with '='.
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let v = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(v >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::base64;

    #[test]
    fn base64_matches_rfc_4648_test_vectors() {
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, coded) in cases {
            assert_eq!(base64(plain.as_bytes()), coded, "{plain:?}");
        }
        assert_eq!(base64(&[0xff, 0xfe, 0x00, 0x3f]), "//4APw==");
    }
}
