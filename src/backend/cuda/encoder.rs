//! [`EncoderOps`] on the GPU: the kernels of `kernels/encoder.cu`.

use std::ops::Range;

use cudarc::driver::PushKernelArg;

use super::{cfg, compile, Cuda, CudaTensor, CudaWeight};
use crate::backend::encoder::EncoderOps;
use crate::error::{Error, Result};

/// Most head dims `attn_biased` takes (32 lanes × `MAX_PER_LANE` in encoder.cu).
const MAX_HEAD_DIM: usize = 256;

fn mismatch(op: &str, message: String) -> Error {
    Error::Device(format!("{op}: {message}"))
}

impl EncoderOps for Cuda {
    fn layer_norm_affine(
        &self,
        x: &CudaTensor,
        w: &CudaWeight,
        b: &CudaWeight,
        eps: f32,
    ) -> Result<CudaTensor> {
        if w.rows * w.cols != x.cols || b.rows * b.cols != x.cols {
            return Err(mismatch(
                "layer_norm_affine",
                format!(
                    "weight of {} and bias of {} for rows of {}",
                    w.rows * w.cols,
                    b.rows * b.cols,
                    x.cols
                ),
            ));
        }
        let out = self.tensor(x.rows, x.cols)?;
        let f = self.function(&compile::ENCODER, "layer_norm_affine", 0)?;
        let (xp, wp, bp, op) = (self.ptr(&x.buf), w.dev()?, b.dev()?, self.ptr(&out.buf));
        let (rows, width) = (x.rows as u32, x.cols as u32);
        let mut l = self.stream.launch_builder(&f);
        l.arg(&xp)
            .arg(&wp)
            .arg(&bp)
            .arg(&op)
            .arg(&rows)
            .arg(&width)
            .arg(&eps);
        // SAFETY: arguments match `layer_norm_affine`; out has x's shape, w and b a row's width.
        unsafe { l.launch(cfg((x.rows.div_ceil(4) as u32, 1, 1), 128, 0)) }
            .map_err(self.err("layer_norm_affine"))?;
        Ok(out)
    }

    fn quick_gelu(&self, x: &mut CudaTensor) -> Result<()> {
        let n = x.rows * x.cols;
        let f = self.function(&compile::ENCODER, "quick_gelu", 0)?;
        let (xp, n_u) = (self.ptr(&x.buf), n as u64);
        let mut l = self.stream.launch_builder(&f);
        l.arg(&xp).arg(&n_u);
        // SAFETY: arguments match `quick_gelu`; x holds n values.
        unsafe { l.launch(cfg((self.grid_for(n), 1, 1), 256, 0)) }
            .map_err(self.err("quick_gelu"))?;
        Ok(())
    }

    fn gelu_tanh_mul(&self, gate: &mut CudaTensor, up: &CudaTensor) -> Result<()> {
        if (gate.rows, gate.cols) != (up.rows, up.cols) {
            return Err(mismatch(
                "gelu_tanh_mul",
                "gate and up differ in shape".into(),
            ));
        }
        let n = gate.rows * gate.cols;
        let f = self.function(&compile::ENCODER, "gelu_tanh_mul", 0)?;
        let (gp, upp, n_u) = (self.ptr(&gate.buf), self.ptr(&up.buf), n as u64);
        let mut l = self.stream.launch_builder(&f);
        l.arg(&gp).arg(&upp).arg(&n_u);
        // SAFETY: arguments match `gelu_tanh_mul`; both buffers hold n values.
        unsafe { l.launch(cfg((self.grid_for(n), 1, 1), 256, 0)) }
            .map_err(self.err("gelu_tanh_mul"))?;
        Ok(())
    }

    fn attention_biased(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        bias: &CudaTensor,
        samples: &[Range<usize>],
        heads: usize,
        head_dim: usize,
    ) -> Result<CudaTensor> {
        let width = heads * head_dim;
        if [q, k, v]
            .iter()
            .any(|t| t.cols != width || t.rows != q.rows)
        {
            return Err(mismatch(
                "attention_biased",
                format!("q, k, v must be [{}, {width}]", q.rows),
            ));
        }
        let span = bias.rows.div_ceil(2);
        if bias.cols != heads || bias.rows % 2 != 1 {
            return Err(mismatch(
                "attention_biased",
                format!("bias [{}, {}] for {heads} heads", bias.rows, bias.cols),
            ));
        }
        if samples
            .iter()
            .any(|r| r.start > r.end || r.end > q.rows || r.len() > span)
        {
            return Err(mismatch(
                "attention_biased",
                format!(
                    "sample rows {samples:?} outside {} rows or longer than {span}",
                    q.rows
                ),
            ));
        }
        if head_dim > MAX_HEAD_DIM {
            return Err(Error::Device(format!(
                "T5 attention over a head dim of {head_dim} is not supported (at most {MAX_HEAD_DIM})"
            )));
        }
        let out = self.tensor(q.rows, width)?;
        let f = self.function(&compile::ENCODER, "attn_biased", 0)?;
        let row_bytes = (width * 2) as u64;
        let bp = self.ptr(&bias.buf);
        for rows in samples.iter().filter(|r| !r.is_empty()) {
            let at = rows.start as u64 * row_bytes;
            let (qp, kp, vp, op) = (
                self.ptr(&q.buf) + at,
                self.ptr(&k.buf) + at,
                self.ptr(&v.buf) + at,
                self.ptr(&out.buf) + at,
            );
            let (n, h, d, s) = (
                rows.len() as u32,
                heads as u32,
                head_dim as u32,
                span as u32,
            );
            let mut l = self.stream.launch_builder(&f);
            l.arg(&qp)
                .arg(&kp)
                .arg(&vp)
                .arg(&bp)
                .arg(&op)
                .arg(&n)
                .arg(&h)
                .arg(&d)
                .arg(&s);
            let grid = (rows.len().div_ceil(4) as u32, heads as u32, 1);
            // SAFETY: arguments match `attn_biased`; q, k, v and out hold the sample's rows at
            // `at`, and the bias covers every relative position of a sample (checked above).
            unsafe { l.launch(cfg(grid, 128, 0)) }.map_err(self.err("attn_biased"))?;
        }
        Ok(out)
    }
}

impl Cuda {
    /// Build the text encoders' kernels now (see [`Cuda::prepare`]).
    pub fn prepare_encoder(&self) -> Result<()> {
        for name in [
            "layer_norm_affine",
            "quick_gelu",
            "gelu_tanh_mul",
            "attn_biased",
        ] {
            self.function(&compile::ENCODER, name, 0)?;
        }
        Ok(())
    }
}
