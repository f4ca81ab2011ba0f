//! Image operations: what a convolutional model (the VAE decoder) needs beside the
//! transformer ops of [`Backend`]. An image is one picture's activations `[channels, height,
//! width]`, f32 on the CPU; a batch is a loop over images in the model (the VAE decodes each
//! latent on its own, and one image at a time is what bounds the memory).
//!
//! Ops take whole images and return new ones, as [`Backend`]'s do. Layout inside a backend is
//! its own business; [`image`](ImageOps::image) and [`image_to_host`](ImageOps::image_to_host)
//! move `[c, h, w]` row-major f32 in and out.

use super::Backend;
use crate::checkpoint::HostTensor;
use crate::error::Result;

/// The shape of one image's activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageShape {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

impl ImageShape {
    pub fn new(channels: usize, height: usize, width: usize) -> ImageShape {
        ImageShape {
            channels,
            height,
            width,
        }
    }

    /// Positions (pixels) per channel.
    pub fn positions(&self) -> usize {
        self.height * self.width
    }

    /// Elements in all.
    pub fn numel(&self) -> usize {
        self.channels * self.positions()
    }
}

/// How a backend's image ops spend device memory, for estimating a decode's peak before it
/// runs ([`crate::model::vae::VaeConfig::decode_peak_bytes`]): every op returns a new image
/// of `element_bytes` per value, a 3×3 convolution makes its im2col rows and attention its
/// scores in blocks of at most `block_bytes` (one row or query at least), freed when it
/// returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageMemory {
    pub element_bytes: usize,
    pub block_bytes: usize,
}

/// Convolutions, norms and attention over images. Shapes are checked by the model when it
/// binds its weights; a mismatch inside an op is a bug and panics.
pub trait ImageOps: Backend {
    /// A weight of an image model (conv filter `[out, in, k, k]`, linear `[out, in]` used as
    /// a 1×1 filter, a bias or a norm's scale `[c]`), in the layout this backend's image ops
    /// read.
    type ImageWeight;
    /// One image's activations `[channels, height, width]`.
    type Image;

    /// Make a host tensor usable as an image weight. A `[out, in]` linear weight is taken as
    /// the 1×1 filter `[out, in, 1, 1]` (same bytes).
    fn image_weight(&self, t: &HostTensor) -> Result<Self::ImageWeight>;
    /// An image from host f32 `[c, h, w]` row-major (`data.len() == shape.numel()`).
    fn image(&self, shape: ImageShape, data: &[f32]) -> Result<Self::Image>;
    /// Copy to host f32 `[c, h, w]` row-major.
    fn image_to_host(&self, x: &Self::Image) -> Result<Vec<f32>>;
    fn image_shape(&self, x: &Self::Image) -> ImageShape;

    /// 2-D convolution, stride 1, zero padding `k / 2` on every side (so the size is kept):
    /// x `[in, h, w]`, w `[out, in, k, k]` (k odd: 1 or 3 in the VAE), bias `[out]` →
    /// `[out, h, w]`.
    fn conv2d(
        &self,
        x: &Self::Image,
        w: &Self::ImageWeight,
        bias: &Self::ImageWeight,
    ) -> Result<Self::Image>;
    /// GroupNorm: channels split into `groups` consecutive groups; each group normalized by
    /// its mean and biased variance over its channels and all positions, then
    /// `y = x̂ · scale[c] + shift[c]`.
    fn group_norm(
        &self,
        x: &Self::Image,
        groups: usize,
        eps: f32,
        scale: &Self::ImageWeight,
        shift: &Self::ImageWeight,
    ) -> Result<Self::Image>;
    /// RMS norm over the channels of each position:
    /// `y[c, p] = x[c, p] / sqrt(mean_c(x[:, p]²) + eps) · scale[c]`. The Wan / Qwen-Image
    /// VAE's `RMS_norm`, `F.normalize` over channels times √C, is this with `eps = 1e-24 / C`
    /// (its 1e-12 floor on the L2 norm, squared and moved inside the mean).
    fn rms_norm_channels(
        &self,
        x: &Self::Image,
        eps: f32,
        scale: &Self::ImageWeight,
    ) -> Result<Self::Image>;
    /// `x = x · sigmoid(x)`, elementwise, in place.
    fn silu(&self, x: &mut Self::Image) -> Result<()>;
    /// Nearest-neighbour 2× upsampling: `[c, h, w]` → `[c, 2h, 2w]`, out[y, x] = in[y/2, x/2].
    fn upsample_nearest2x(&self, x: &Self::Image) -> Result<Self::Image>;
    /// `x += y`, elementwise (same shape).
    fn add_image(&self, x: &mut Self::Image, y: &Self::Image) -> Result<()>;
    /// Single-head attention over all `h·w` positions, channels as features: q, k, v
    /// `[c, h, w]` → out `[c, h, w]` with out[:, i] = Σⱼ softmaxⱼ(q[:, i]·k[:, j] / √c) v[:, j].
    /// The VAE's mid-block attention is group norm → q/k/v (1×1 convs) → this → output 1×1
    /// conv → residual add; the model composes those from the ops above, so a backend only
    /// has to supply this core (a GPU does it flash-style without the `[hw, hw]` scores).
    fn spatial_attention(
        &self,
        q: &Self::Image,
        k: &Self::Image,
        v: &Self::Image,
    ) -> Result<Self::Image>;
}
