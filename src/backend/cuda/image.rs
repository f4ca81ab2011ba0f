//! [`ImageOps`] on the GPU for the VAE decoder: images channels-last (`[h·w, c]` bf16, so
//! that a convolution is a GEMM of im2col rows by the filter and a 1×1 convolution is a
//! linear), the kernels of `kernels/image.cu`, and attention over positions as two GEMMs per
//! block of queries with the softmax between them (the VAE's one head is 512 wide, beyond the
//! flash kernel's 256).

use half::bf16;

use super::{cfg, compile, gemm, Cuda, CudaTensor, CudaWeight, Purpose, WeightStorage};
use crate::backend::conv::{ImageMemory, ImageOps, ImageShape};
use crate::backend::Backend;
use crate::checkpoint::HostTensor;
use crate::error::{Error, Result};
use cudarc::driver::PushKernelArg;

/// Most bytes of im2col rows (or attention scores) made at once: a convolution at 1024² with
/// 128 channels would need 2.4 GB of rows in one piece.
const BLOCK_BYTES: usize = 64 << 20;

/// How these ops spend device memory: bf16 images, im2col and score blocks of
/// [`BLOCK_BYTES`].
pub const IMAGE_MEMORY: ImageMemory = ImageMemory {
    element_bytes: 2,
    block_bytes: BLOCK_BYTES,
};

/// One image's activations, `[h·w, c]` bf16 on the device.
pub struct CudaImage {
    t: CudaTensor,
    shape: ImageShape,
}

/// An image model's weight: a filter `[out, k·k·in]` (taps outer, channels inner, to match
/// im2col's rows), or a vector `[1, c]`.
pub struct CudaImageWeight {
    w: CudaWeight,
    /// Filter size (1 or 3; 0 for a vector).
    k: usize,
}

impl Cuda {
    /// Launch `b` (arguments of `name` in image.cu, pushed by the caller with buffers sized
    /// for `grid`) on the compute stream.
    fn launch_image(
        &self,
        name: &str,
        mut b: cudarc::driver::LaunchArgs<'_>,
        grid: (u32, u32, u32),
        block: u32,
    ) -> Result<()> {
        // SAFETY: see above; the shapes are checked by the caller.
        unsafe { b.launch(cfg(grid, block, 0)) }
            .map_err(|e| Error::Device(format!("{name}: {}", super::driver_msg(e))))?;
        Ok(())
    }

    fn image_of(&self, shape: ImageShape) -> Result<CudaImage> {
        Ok(CudaImage {
            t: self.tensor(shape.positions(), shape.channels)?,
            shape,
        })
    }
}

impl ImageOps for Cuda {
    type ImageWeight = CudaImageWeight;
    type Image = CudaImage;

    fn image_weight(&self, t: &HostTensor) -> Result<CudaImageWeight> {
        let values = t.to_f32();
        let (rows, k, data): (usize, usize, Vec<bf16>) = match t.shape[..] {
            [_] => (1, 0, values.iter().map(|&v| bf16::from_f32(v)).collect()),
            [o, _] => (o, 1, values.iter().map(|&v| bf16::from_f32(v)).collect()),
            [o, i, k, k2] if k == k2 => {
                // [out, in, ky, kx] → [out, ky, kx, in]
                let mut data = vec![bf16::ZERO; values.len()];
                for oc in 0..o {
                    for ic in 0..i {
                        for tap in 0..k * k {
                            data[(oc * k * k + tap) * i + ic] =
                                bf16::from_f32(values[(oc * i + ic) * k * k + tap]);
                        }
                    }
                }
                (o, k, data)
            }
            _ => {
                return Err(Error::Device(format!(
                    "{}: shape {:?} is not a filter, linear or vector",
                    t.name, t.shape
                )))
            }
        };
        let cols = data.len() / rows;
        let buf = self.upload(&data, Purpose::Resident(t.name.clone()))?;
        Ok(CudaImageWeight {
            w: CudaWeight {
                ptr: self.ptr(&buf),
                rows,
                cols,
                storage: WeightStorage::Device(buf),
            },
            k,
        })
    }

    fn image(&self, shape: ImageShape, data: &[f32]) -> Result<CudaImage> {
        assert_eq!(data.len(), shape.numel(), "image: data length vs {shape:?}");
        let (c, n) = (shape.channels, shape.positions());
        let mut host = vec![bf16::ZERO; data.len()];
        for ch in 0..c {
            for p in 0..n {
                host[p * c + ch] = bf16::from_f32(data[ch * n + p]);
            }
        }
        let buf = self.upload(&host, Purpose::Workspace)?;
        Ok(CudaImage {
            t: CudaTensor {
                buf,
                rows: n,
                cols: c,
            },
            shape,
        })
    }

    fn image_to_host(&self, x: &CudaImage) -> Result<Vec<f32>> {
        let hwc = self.to_host(&x.t)?;
        let (c, n) = (x.shape.channels, x.shape.positions());
        let mut out = vec![0f32; hwc.len()];
        for p in 0..n {
            for ch in 0..c {
                out[ch * n + p] = hwc[p * c + ch];
            }
        }
        Ok(out)
    }

    fn image_shape(&self, x: &CudaImage) -> ImageShape {
        x.shape
    }

    fn conv2d(
        &self,
        x: &CudaImage,
        w: &CudaImageWeight,
        bias: &CudaImageWeight,
    ) -> Result<CudaImage> {
        let s = x.shape;
        let (cin, cout) = (s.channels, w.w.rows);
        assert_eq!(
            w.w.cols,
            w.k * w.k * cin,
            "conv2d: filter vs {cin} channels"
        );
        let out_shape = ImageShape::new(cout, s.height, s.width);
        if w.k == 1 {
            return Ok(CudaImage {
                t: self.linear(&x.t, &w.w, Some(&bias.w))?,
                shape: out_shape,
            });
        }
        assert_eq!(w.k, 3, "conv2d: 1×1 and 3×3 filters");
        let out = self.image_of(out_shape)?;
        let n = s.positions();
        let row_bytes = 9 * cin * 2;
        let block = (BLOCK_BYTES / row_bytes).clamp(1, n);
        let cols = self.alloc(block * row_bytes, Purpose::Workspace)?;
        let (xp, cp) = (self.ptr(&x.t.buf), self.ptr(&cols));
        for p0 in (0..n).step_by(block) {
            let rows = block.min(n - p0);
            let (h, wd, c, p0u, ru) = (
                s.height as u32,
                s.width as u32,
                cin as u32,
                p0 as u32,
                rows as u32,
            );
            let f = self.function(&compile::IMAGE, "im2col3x3", 0)?;
            let mut b = self.stream.launch_builder(&f);
            b.arg(&xp)
                .arg(&cp)
                .arg(&h)
                .arg(&wd)
                .arg(&c)
                .arg(&p0u)
                .arg(&ru);
            self.launch_image("im2col3x3", b, (self.grid_for(rows * 9 * cin), 1, 1), 256)?;
            self.gemm(
                gemm::Shape {
                    m: cout as u64,
                    n: rows as u64,
                    k: (9 * cin) as u64,
                    bias: true,
                    accumulate: false,
                },
                gemm::Operands {
                    y: self.ptr(&out.t.buf) + (p0 * cout * 2) as u64,
                    x: cp,
                    w: w.w.dev()?,
                    bias: Some(bias.w.dev()?),
                },
            )?;
        }
        Ok(out)
    }

    fn group_norm(
        &self,
        x: &CudaImage,
        groups: usize,
        eps: f32,
        scale: &CudaImageWeight,
        shift: &CudaImageWeight,
    ) -> Result<CudaImage> {
        let s = x.shape;
        assert!(
            groups > 0 && s.channels % groups == 0,
            "group_norm: {groups} groups"
        );
        let stats = self.alloc(2 * groups * 8, Purpose::Workspace)?;
        // SAFETY: `stats` holds 2·groups f64 on this stream; group_stats adds into zeros.
        unsafe {
            cudarc::driver::result::memset_d8_async(
                self.ptr(&stats),
                0,
                2 * groups * 8,
                self.stream.cu_stream(),
            )
        }
        .map_err(self.err("zeroing group sums"))?;
        let (xp, sp) = (self.ptr(&x.t.buf), self.ptr(&stats));
        let (n, c, g) = (s.positions() as u32, s.channels as u32, groups as u32);
        let blocks = ((s.numel() / groups).div_ceil(256 * 8) as u32).clamp(1, 1024);
        let f = self.function(&compile::IMAGE, "group_stats", 0)?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(&xp).arg(&sp).arg(&n).arg(&c).arg(&g);
        self.launch_image("group_stats", b, (blocks, g, 1), 256)?;
        let out = self.image_of(s)?;
        let (yp, scp, shp) = (self.ptr(&out.t.buf), scale.w.dev()?, shift.w.dev()?);
        let f = self.function(&compile::IMAGE, "group_apply", 0)?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(&xp)
            .arg(&yp)
            .arg(&sp)
            .arg(&scp)
            .arg(&shp)
            .arg(&n)
            .arg(&c)
            .arg(&g)
            .arg(&eps);
        self.launch_image("group_apply", b, (self.grid_for(s.numel()), 1, 1), 256)?;
        Ok(out)
    }

    fn rms_norm_channels(
        &self,
        x: &CudaImage,
        eps: f32,
        scale: &CudaImageWeight,
    ) -> Result<CudaImage> {
        // Channels-last, a position's channels are one row: the transformer's row RMSNorm
        // (norm.cu, sums in f32; an even channel count).
        assert_eq!(scale.k, 0, "rms_norm_channels: the scale is a vector");
        Ok(CudaImage {
            t: Backend::rms_norm(self, &x.t, &scale.w, eps)?,
            shape: x.shape,
        })
    }

    fn silu(&self, x: &mut CudaImage) -> Result<()> {
        crate::backend::dit::DitOps::pointwise(self, &mut x.t, crate::backend::dit::Pointwise::Silu)
    }

    fn upsample_nearest2x(&self, x: &CudaImage) -> Result<CudaImage> {
        let s = x.shape;
        let out = self.image_of(ImageShape::new(s.channels, 2 * s.height, 2 * s.width))?;
        let (xp, yp) = (self.ptr(&x.t.buf), self.ptr(&out.t.buf));
        let (h, w, c) = (s.height as u32, s.width as u32, s.channels as u32);
        let f = self.function(&compile::IMAGE, "upsample2x", 0)?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(&xp).arg(&yp).arg(&h).arg(&w).arg(&c);
        self.launch_image("upsample2x", b, (self.grid_for(4 * s.numel()), 1, 1), 256)?;
        Ok(out)
    }

    fn add_image(&self, x: &mut CudaImage, y: &CudaImage) -> Result<()> {
        assert_eq!(x.shape, y.shape, "add_image: shapes");
        self.add_assign(&mut x.t, 0, &y.t)
    }

    fn spatial_attention(&self, q: &CudaImage, k: &CudaImage, v: &CudaImage) -> Result<CudaImage> {
        let s = q.shape;
        assert!(k.shape == s && v.shape == s, "spatial_attention: shapes");
        let (n, c) = (s.positions(), s.channels);
        // vᵀ [c, n]: the "weight" of out = P · v.
        let vt = self.tensor(c, n)?;
        let (vp, vtp, nu, cu_) = (self.ptr(&v.t.buf), self.ptr(&vt.buf), n as u32, c as u32);
        let f = self.function(&compile::IMAGE, "transpose", 0)?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(&vp).arg(&vtp).arg(&nu).arg(&cu_);
        self.launch_image("transpose", b, (self.grid_for(n * c), 1, 1), 256)?;
        let out = self.image_of(s)?;
        let block = (BLOCK_BYTES / (n * 2)).clamp(1, n);
        let scores = self.alloc(block * n * 2, Purpose::Workspace)?;
        let sp = self.ptr(&scores);
        let scale = 1.0 / (c as f32).sqrt();
        for q0 in (0..n).step_by(block) {
            let rows = block.min(n - q0);
            // scores [rows, n] = q[q0..] · kᵀ
            self.gemm(
                gemm::Shape {
                    m: n as u64,
                    n: rows as u64,
                    k: c as u64,
                    bias: false,
                    accumulate: false,
                },
                gemm::Operands {
                    y: sp,
                    x: self.ptr(&q.t.buf) + (q0 * c * 2) as u64,
                    w: self.ptr(&k.t.buf),
                    bias: None,
                },
            )?;
            let f = self.function(&compile::IMAGE, "softmax_rows", 0)?;
            let mut b = self.stream.launch_builder(&f);
            b.arg(&sp).arg(&nu).arg(&scale);
            self.launch_image("softmax_rows", b, (rows as u32, 1, 1), 256)?;
            // out[q0..] = P · v
            self.gemm(
                gemm::Shape {
                    m: c as u64,
                    n: rows as u64,
                    k: n as u64,
                    bias: false,
                    accumulate: false,
                },
                gemm::Operands {
                    y: self.ptr(&out.t.buf) + (q0 * c * 2) as u64,
                    x: sp,
                    w: vtp,
                    bias: None,
                },
            )?;
        }
        Ok(out)
    }
}
