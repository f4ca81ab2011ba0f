//! [`DitOps`] on the GPU: the kernels of `kernels/dit.cu`, and non-causal flash attention of
//! each sample (`attn_full_v1`/`_v2` in `kernels/attention_prefill.cu`).

use std::ops::Range;
use std::rc::Rc;

use half::bf16;

use cudarc::driver::{LaunchArgs, PushKernelArg};

use super::{attention, cfg, compile, prefill_supported, Cuda, CudaTensor, DevBuf, Purpose};
use crate::backend::dit::{DitOps, Pointwise};
use crate::error::{Error, Result};

/// RoPE tables kept on the device, most recent first (see [`DitOps::rope_table`]): the
/// three of a Z-Image or Flux step and one more.
pub(super) const ROPE_KEPT: usize = 4;

/// The largest table kept, bytes: 16 MiB is 32k tokens at head dim 128; a larger table is
/// a larger image than these models make, uploaded for its pass alone.
const ROPE_KEPT_BYTES: usize = 16 << 20;

/// A RoPE table `[rows, cols]` of f32 on the device (shared with the backend's kept tables).
pub struct CudaRopeTable {
    buf: Rc<DevBuf>,
    rows: usize,
    cols: usize,
}

/// A shape mismatch between the model's tensors: a bug in the model, reported as a device error
/// rather than a panic in the middle of a pass.
fn mismatch(op: &str, message: String) -> Error {
    Error::Device(format!("{op}: {message}"))
}

impl Cuda {
    /// Check that `samples` lie inside `x`'s rows and that `table` has one row per sample of
    /// `x`'s width.
    fn check_per_sample(
        op: &str,
        x: &CudaTensor,
        samples: &[Range<usize>],
        table: &CudaTensor,
    ) -> Result<()> {
        if table.rows != samples.len() || table.cols != x.cols {
            return Err(mismatch(
                op,
                format!(
                    "table [{}, {}] for {} samples of width {}",
                    table.rows,
                    table.cols,
                    samples.len(),
                    x.cols
                ),
            ));
        }
        if samples.iter().any(|r| r.start > r.end || r.end > x.rows) {
            return Err(mismatch(
                op,
                format!("sample rows {samples:?} outside {} rows", x.rows),
            ));
        }
        Ok(())
    }

    /// Launch `f` (a grid-stride kernel of `dit.cu`) over `items` with arguments `b`.
    fn launch_stride(&self, name: &str, mut b: LaunchArgs<'_>, items: usize) -> Result<()> {
        // SAFETY: every caller pushes the arguments of `name` in dit.cu, with buffers sized for
        // `items` (checked by the caller).
        unsafe { b.launch(cfg((self.grid_for(items), 1, 1), 256, 0)) }
            .map_err(|e| Error::Device(format!("{name}: {}", super::driver_msg(e))))?;
        Ok(())
    }
}

impl DitOps for Cuda {
    type RopeTable = CudaRopeTable;

    /// The device copy of a table made before when its values are among the last
    /// [`ROPE_KEPT`] uploaded (a denoising loop asks for the same tables every step), else
    /// uploaded and kept. An upload inside a streamed pass waits in the copy engine's queue
    /// behind the weight copies: on the Z-Image timeline context refiner 1, whose span held
    /// the joint table's upload, took 7.6–9.5 ms against 0.4 for context refiner 0 (the same
    /// work); with the tables kept it takes 0.39 ms (H100, stop 37). The step did not
    /// shorten (0.155 / 0.152 s against 0.155 / 0.153 uploaded, the copies setting it).
    fn rope_table(&self, data: &[f32], rows: usize, cols: usize) -> Result<CudaRopeTable> {
        assert_eq!(data.len(), rows * cols, "rope_table: {rows}×{cols}");
        let mut kept = self.rope_kept.borrow_mut();
        // Bit for bit: f32 equality would take a table's −0.0 for another's +0.0.
        let bits: &[u32] = bytemuck::cast_slice(data);
        let entry = match kept.iter().position(|(host, _)| host.as_slice() == bits) {
            Some(i) => kept.remove(i),
            // Too large to keep, or `FERRY_ROPE_UPLOAD=1` (a measurement toggle): uploaded
            // for this pass alone.
            None if std::mem::size_of_val(data) > ROPE_KEPT_BYTES || self.rope_upload => {
                return Ok(CudaRopeTable {
                    buf: Rc::new(self.upload(data, Purpose::Workspace)?),
                    rows,
                    cols,
                });
            }
            None => (
                bits.to_vec(),
                Rc::new(self.upload(data, Purpose::Other("RoPE tables kept".into()))?),
            ),
        };
        let buf = entry.1.clone();
        kept.insert(0, entry);
        kept.truncate(ROPE_KEPT);
        Ok(CudaRopeTable { buf, rows, cols })
    }

    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Result<CudaTensor> {
        assert_eq!(data.len(), rows * cols, "upload: {rows}×{cols}");
        let host: Vec<bf16> = data.iter().map(|&v| bf16::from_f32(v)).collect();
        Ok(CudaTensor {
            buf: Cuda::upload(self, &host, Purpose::Workspace)?,
            rows,
            cols,
        })
    }

    fn pointwise(&self, x: &mut CudaTensor, f: Pointwise) -> Result<()> {
        let n = x.rows * x.cols;
        let (xp, n_u, op) = (
            self.ptr(&x.buf),
            n as u64,
            match f {
                Pointwise::Silu => 0u32,
                Pointwise::Tanh => 1,
                Pointwise::GeluTanh => 2,
            },
        );
        let f = self.function(&compile::DIT, "pointwise", 0)?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(&xp).arg(&n_u).arg(&op);
        self.launch_stride("pointwise", b, n)
    }

    fn split_cols(&self, x: &CudaTensor, parts: usize) -> Result<Vec<CudaTensor>> {
        if parts == 0 || x.cols % parts != 0 {
            return Err(mismatch(
                "split_cols",
                format!("{} columns in {parts} parts", x.cols),
            ));
        }
        let width = x.cols / parts;
        (0..parts)
            .map(|p| {
                let out = self.tensor(x.rows, width)?;
                let (src, dst) = (self.ptr(&x.buf), self.ptr(&out.buf));
                let (rows, src_cols, col0, w) = (
                    x.rows as u32,
                    x.cols as u32,
                    (p * width) as u32,
                    width as u32,
                );
                let f = self.function(&compile::DIT, "copy_cols", 0)?;
                let mut b = self.stream.launch_builder(&f);
                b.arg(&src)
                    .arg(&dst)
                    .arg(&rows)
                    .arg(&src_cols)
                    .arg(&col0)
                    .arg(&w);
                self.launch_stride("copy_cols", b, x.rows * width)?;
                Ok(out)
            })
            .collect()
    }

    fn layer_norm(&self, x: &CudaTensor, eps: f32) -> Result<CudaTensor> {
        let out = self.tensor(x.rows, x.cols)?;
        let f = self.function(&compile::DIT, "layer_norm", 0)?;
        let (xp, op, rows, width) = (
            self.ptr(&x.buf),
            self.ptr(&out.buf),
            x.rows as u32,
            x.cols as u32,
        );
        let mut b = self.stream.launch_builder(&f);
        b.arg(&xp).arg(&op).arg(&rows).arg(&width).arg(&eps);
        // SAFETY: arguments match `layer_norm`; out has x's shape.
        unsafe { b.launch(cfg((x.rows.div_ceil(4) as u32, 1, 1), 128, 0)) }
            .map_err(self.err("layer_norm"))?;
        Ok(out)
    }

    fn modulate(
        &self,
        x: &mut CudaTensor,
        samples: &[Range<usize>],
        scale: &CudaTensor,
        shift: Option<&CudaTensor>,
    ) -> Result<()> {
        Cuda::check_per_sample("modulate", x, samples, scale)?;
        if let Some(shift) = shift {
            Cuda::check_per_sample("modulate", x, samples, shift)?;
        }
        let (cols, row_bytes) = (x.cols, (x.cols * 2) as u64);
        for (s, rows) in samples.iter().enumerate() {
            let n = rows.len() * cols;
            let xp = self.ptr(&x.buf) + rows.start as u64 * row_bytes;
            let sp = self.ptr(&scale.buf) + s as u64 * row_bytes;
            let hp = shift.map_or(0, |t| self.ptr(&t.buf) + s as u64 * row_bytes);
            let (n_u, cols_u) = (n as u64, cols as u32);
            let f = self.function(&compile::DIT, "modulate", 0)?;
            let mut b = self.stream.launch_builder(&f);
            b.arg(&xp).arg(&sp).arg(&hp).arg(&n_u).arg(&cols_u);
            self.launch_stride("modulate", b, n)?;
        }
        Ok(())
    }

    fn add_gated(
        &self,
        x: &mut CudaTensor,
        samples: &[Range<usize>],
        gate: &CudaTensor,
        y: &CudaTensor,
    ) -> Result<()> {
        Cuda::check_per_sample("add_gated", x, samples, gate)?;
        if (x.rows, x.cols) != (y.rows, y.cols) {
            return Err(mismatch(
                "add_gated",
                format!("y [{}, {}] vs x [{}, {}]", y.rows, y.cols, x.rows, x.cols),
            ));
        }
        let (cols, row_bytes) = (x.cols, (x.cols * 2) as u64);
        for (s, rows) in samples.iter().enumerate() {
            let n = rows.len() * cols;
            let at = rows.start as u64 * row_bytes;
            let (xp, yp) = (self.ptr(&x.buf) + at, self.ptr(&y.buf) + at);
            let gp = self.ptr(&gate.buf) + s as u64 * row_bytes;
            let (n_u, cols_u) = (n as u64, cols as u32);
            let f = self.function(&compile::DIT, "add_gated", 0)?;
            let mut b = self.stream.launch_builder(&f);
            b.arg(&xp).arg(&gp).arg(&yp).arg(&n_u).arg(&cols_u);
            self.launch_stride("add_gated", b, n)?;
        }
        Ok(())
    }

    fn rope_interleaved(
        &self,
        x: &mut CudaTensor,
        table: &CudaRopeTable,
        head_dim: usize,
    ) -> Result<()> {
        if table.rows != x.rows || table.cols != head_dim || x.cols % head_dim != 0 {
            return Err(mismatch(
                "rope_interleaved",
                format!(
                    "table [{}, {}] for x [{}, {}] with head_dim {head_dim}",
                    table.rows, table.cols, x.rows, x.cols
                ),
            ));
        }
        let (xp, tp) = (self.ptr(&x.buf), self.ptr(&*table.buf));
        let (rows, cols, hd) = (x.rows as u32, x.cols as u32, head_dim as u32);
        let f = self.function(&compile::DIT, "rope_interleaved", 0)?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(&xp).arg(&tp).arg(&rows).arg(&cols).arg(&hd);
        self.launch_stride("rope_interleaved", b, x.rows * x.cols / 2)
    }

    fn attention_within(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
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
                "attention_within",
                format!("q, k, v must be [{}, {width}]", q.rows),
            ));
        }
        if samples.iter().any(|r| r.start > r.end || r.end > q.rows) {
            return Err(mismatch(
                "attention_within",
                format!("sample rows {samples:?} outside {} rows", q.rows),
            ));
        }
        if !prefill_supported(head_dim) {
            return Err(Error::Device(format!(
                "attention over a head dim of {head_dim} is not supported on {} (multiples of 16 up to 256)",
                self.info
            )));
        }
        let out = self.tensor(q.rows, width)?;
        let scale_log2 = std::f32::consts::LOG2_E / (head_dim as f32).sqrt();
        let row_bytes = (width * 2) as u64;
        for rows in samples.iter().filter(|r| !r.is_empty()) {
            let at = rows.start as u64 * row_bytes;
            let (qp, kp, vp, op) = (
                self.ptr(&q.buf) + at,
                self.ptr(&k.buf) + at,
                self.ptr(&v.buf) + at,
                self.ptr(&out.buf) + at,
            );
            let launch = self.prefill_launch(false, rows.len(), heads, head_dim);
            let f = self.function(&compile::ATTENTION_PREFILL, launch.name, head_dim)?;
            let (t, h) = (rows.len() as u32, heads as u32);
            let mut b = self.stream.launch_builder(&f);
            b.arg(&qp)
                .arg(&kp)
                .arg(&vp)
                .arg(&op)
                .arg(&t)
                .arg(&h)
                .arg(&scale_log2);
            // SAFETY: arguments match `attn_full_v1`/`_v2`; q, k, v and out hold the sample's
            // rows at `at` (checked above).
            unsafe { b.launch(cfg(launch.grid, launch.block, launch.smem_bytes)) }
                .map_err(self.err(launch.name))?;
        }
        Ok(out)
    }
}

impl Cuda {
    /// Build the DiT's kernels for `head_dim` now (see [`Cuda::prepare`]).
    pub fn prepare_dit(&self, head_dim: usize) -> Result<()> {
        for name in [
            "pointwise",
            "copy_cols",
            "layer_norm",
            "modulate",
            "add_gated",
            "rope_interleaved",
        ] {
            self.function(&compile::DIT, name, 0)?;
        }
        if prefill_supported(head_dim) {
            for name in attention::kernels(false, head_dim) {
                self.function(&compile::ATTENTION_PREFILL, name, head_dim)?;
            }
        }
        Ok(())
    }
}
