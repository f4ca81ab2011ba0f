//! [`ImageOps`] on the CPU in f32. Convolution is im2col + a register-blocked matrix product,
//! with rayon over blocks of output positions; attention runs over blocks of queries so that
//! no `[hw, hw]` score matrix is ever whole.

use std::sync::{Arc, LazyLock};

use rayon::prelude::*;

use super::conv::{ImageOps, ImageShape};
use super::cpu::Cpu;
use crate::checkpoint::{DType, HostTensor};
use crate::error::Result;

/// An image weight as f32: viewed in place when the checkpoint stores aligned f32, else
/// widened once.
pub struct CpuImageWeight {
    /// As stored, with a `[out, in]` linear weight read as `[out, in, 1, 1]`.
    shape: Vec<usize>,
    data: ImageWeightData,
}

enum ImageWeightData {
    Mapped(HostTensor),
    Owned(Arc<Vec<f32>>),
}

impl CpuImageWeight {
    fn data(&self) -> &[f32] {
        match &self.data {
            ImageWeightData::Owned(v) => v,
            ImageWeightData::Mapped(t) => t.as_f32().expect("mapped image weights are aligned f32"),
        }
    }
}

/// One image's activations `[channels, height, width]`, f32 row-major.
#[derive(Clone, Debug)]
pub struct CpuImage {
    pub shape: ImageShape,
    pub data: Vec<f32>,
}

impl ImageOps for Cpu {
    type ImageWeight = CpuImageWeight;
    type Image = CpuImage;

    fn image_weight(&self, t: &HostTensor) -> Result<CpuImageWeight> {
        let shape = match t.shape[..] {
            [o, i] => vec![o, i, 1, 1],
            _ => t.shape.clone(),
        };
        let data = if t.dtype == DType::F32 && t.as_f32().is_some() {
            ImageWeightData::Mapped(t.clone())
        } else {
            ImageWeightData::Owned(Arc::new(t.to_f32()))
        };
        Ok(CpuImageWeight { shape, data })
    }

    fn image(&self, shape: ImageShape, data: &[f32]) -> Result<CpuImage> {
        assert_eq!(data.len(), shape.numel(), "image: data length vs {shape:?}");
        Ok(CpuImage {
            shape,
            data: data.to_vec(),
        })
    }

    fn image_to_host(&self, x: &CpuImage) -> Result<Vec<f32>> {
        Ok(x.data.clone())
    }

    fn image_shape(&self, x: &CpuImage) -> ImageShape {
        x.shape
    }

    fn conv2d(&self, x: &CpuImage, w: &CpuImageWeight, bias: &CpuImageWeight) -> Result<CpuImage> {
        let &[co, ci, kh, kw] = &w.shape[..] else {
            panic!("conv2d: filter shape {:?} is not [out, in, k, k]", w.shape)
        };
        let ImageShape {
            channels,
            height,
            width,
        } = x.shape;
        assert!(
            ci == channels && kh == kw && kh % 2 == 1 && bias.data().len() == co,
            "conv2d: filter {:?}, bias {}, input {:?}",
            w.shape,
            bias.data().len(),
            x.shape
        );
        let n = height * width;
        let depth = ci * kh * kw; // the matrix product's inner dimension
        let mut out = vec![0f32; co * n];

        // Each task computes out[:, j0..j0+nb] = W [co, depth] · P [depth, nb], P being the
        // im2col patch of positions j0..j0+nb (or x itself for a 1×1 filter). nb keeps the
        // patch near 256 KiB so that it stays in L2 while every row block of W passes over it.
        let nb = ((256 * 1024 / 4 / depth.max(1)) / NR * NR).clamp(NR, 256);
        let dst = SharedOut(out.as_mut_ptr(), out.len());
        let filter = w.data();
        (0..n.div_ceil(nb)).into_par_iter().for_each_init(
            || (Vec::new(), Vec::new()),
            |(patch, tile), chunk| {
                let j0 = chunk * nb;
                let cols = nb.min(n - j0);
                let (b, ldb) = if kh == 1 {
                    (&x.data[j0..], n)
                } else {
                    im2col(x, kh, j0, cols, patch);
                    (&patch[..], cols)
                };
                tile.clear();
                tile.resize(co * cols, 0.0);
                matmul(co, cols, depth, filter, b, ldb, tile);
                for (o, row) in tile.chunks_exact(cols).enumerate() {
                    // SAFETY: this task alone writes columns j0..j0+cols of each output row
                    // (chunks are disjoint), and `out` outlives the parallel loop.
                    unsafe { dst.write(o * n + j0, row) };
                }
            },
        );
        let bias = bias.data();
        out.par_chunks_mut(n.max(1))
            .zip(bias)
            .for_each(|(row, &b)| row.iter_mut().for_each(|v| *v += b));
        Ok(CpuImage {
            shape: ImageShape::new(co, height, width),
            data: out,
        })
    }

    fn group_norm(
        &self,
        x: &CpuImage,
        groups: usize,
        eps: f32,
        scale: &CpuImageWeight,
        shift: &CpuImageWeight,
    ) -> Result<CpuImage> {
        let c = x.shape.channels;
        let (scale, shift) = (scale.data(), shift.data());
        assert!(
            groups > 0 && c % groups == 0 && scale.len() == c && shift.len() == c,
            "group_norm: {c} channels, {groups} groups, scale {}, shift {}",
            scale.len(),
            shift.len()
        );
        let n = x.shape.positions();
        // A group is a contiguous run of channels·positions in [c, h, w]. Two passes in f64:
        // the mean, then the mean squared deviation (torch's biased variance).
        let group_len = c / groups * n;
        let stats: Vec<(f32, f32)> = x
            .data
            .par_chunks(group_len.max(1))
            .map(|g| {
                let len = g.len() as f64;
                let mean = g.iter().map(|&v| v as f64).sum::<f64>() / len;
                let var = g.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / len;
                (mean as f32, (1.0 / (var + eps as f64).sqrt()) as f32)
            })
            .collect();
        let mut out = vec![0f32; x.data.len()];
        let per_group = c / groups;
        out.par_chunks_mut(n.max(1))
            .zip(x.data.par_chunks(n.max(1)))
            .enumerate()
            .for_each(|(ch, (dst, src))| {
                let (mean, inv_std) = stats[ch / per_group];
                for (d, &s) in dst.iter_mut().zip(src) {
                    *d = (s - mean) * inv_std * scale[ch] + shift[ch];
                }
            });
        Ok(CpuImage {
            shape: x.shape,
            data: out,
        })
    }

    fn rms_norm_channels(
        &self,
        x: &CpuImage,
        eps: f32,
        scale: &CpuImageWeight,
    ) -> Result<CpuImage> {
        let (c, n) = (x.shape.channels, x.shape.positions());
        let scale = scale.data();
        assert_eq!(scale.len(), c, "rms_norm_channels: scale vs {c} channels");
        // 1 / rms of each position, summed in f64 over the channel rows, a block of
        // positions a task (channel rows are contiguous, so each task streams c short runs).
        const POSITIONS: usize = 1024;
        let mut inv_rms = vec![0f32; n];
        inv_rms
            .par_chunks_mut(POSITIONS)
            .enumerate()
            .for_each(|(block, dst)| {
                let j0 = block * POSITIONS;
                let mut sums = vec![0f64; dst.len()];
                for ch in 0..c {
                    let row = &x.data[ch * n + j0..][..dst.len()];
                    for (s, &v) in sums.iter_mut().zip(row) {
                        *s += v as f64 * v as f64;
                    }
                }
                for (d, s) in dst.iter_mut().zip(sums) {
                    *d = (1.0 / (s / c as f64 + eps as f64).sqrt()) as f32;
                }
            });
        let mut out = vec![0f32; x.data.len()];
        out.par_chunks_mut(n.max(1))
            .zip(x.data.par_chunks(n.max(1)))
            .enumerate()
            .for_each(|(ch, (dst, src))| {
                for ((d, &s), &r) in dst.iter_mut().zip(src).zip(&inv_rms) {
                    *d = s * r * scale[ch];
                }
            });
        Ok(CpuImage {
            shape: x.shape,
            data: out,
        })
    }

    fn silu(&self, x: &mut CpuImage) -> Result<()> {
        x.data
            .par_chunks_mut(4096)
            .for_each(|c| c.iter_mut().for_each(|v| *v /= 1.0 + (-*v).exp()));
        Ok(())
    }

    fn upsample_nearest2x(&self, x: &CpuImage) -> Result<CpuImage> {
        let ImageShape {
            channels,
            height,
            width,
        } = x.shape;
        let (h2, w2) = (2 * height, 2 * width);
        let mut out = vec![0f32; channels * h2 * w2];
        out.par_chunks_mut(w2.max(1))
            .enumerate()
            .for_each(|(row, dst)| {
                // row = c·2h + y; it repeats source row y/2 of channel c, each pixel twice.
                let (c, y) = (row / h2, row % h2);
                let src = &x.data[(c * height + y / 2) * width..][..width];
                for (pair, &v) in dst.chunks_exact_mut(2).zip(src) {
                    pair[0] = v;
                    pair[1] = v;
                }
            });
        Ok(CpuImage {
            shape: ImageShape::new(channels, h2, w2),
            data: out,
        })
    }

    fn add_image(&self, x: &mut CpuImage, y: &CpuImage) -> Result<()> {
        assert_eq!(x.shape, y.shape, "add_image: shapes differ");
        x.data
            .par_chunks_mut(4096)
            .zip(y.data.par_chunks(4096))
            .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += b));
        Ok(())
    }

    fn spatial_attention(&self, q: &CpuImage, k: &CpuImage, v: &CpuImage) -> Result<CpuImage> {
        assert!(
            q.shape == k.shape && k.shape == v.shape,
            "spatial_attention: q {:?}, k {:?}, v {:?}",
            q.shape,
            k.shape,
            v.shape
        );
        let (c, n) = (q.shape.channels, q.shape.positions());
        let scale = 1.0 / (c as f32).sqrt();
        // qᵀ [n, c] pre-scaled, vᵀ [n, c]; k stays [c, n]: scores = qᵀ·k, out = p·vᵀ.
        let q_t = transpose(&q.data, c, n, scale);
        let v_t = transpose(&v.data, c, n, 1.0);
        const QUERIES: usize = 32; // per task; its scores are [32, n]
        let mut out_t = vec![0f32; n * c]; // [n, c]
        out_t.par_chunks_mut(QUERIES * c).enumerate().for_each_init(
            Vec::new,
            |scores, (block, dst)| {
                let rows = dst.len() / c;
                let i0 = block * QUERIES;
                scores.clear();
                scores.resize(rows * n, 0.0);
                matmul(rows, n, c, &q_t[i0 * c..], &k.data, n, scores);
                for row in scores.chunks_exact_mut(n) {
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0f32;
                    for s in row.iter_mut() {
                        *s = (*s - max).exp();
                        sum += *s;
                    }
                    let inv = 1.0 / sum;
                    row.iter_mut().for_each(|s| *s *= inv);
                }
                matmul(rows, c, n, scores, &v_t, c, dst);
            },
        );
        Ok(CpuImage {
            shape: q.shape,
            data: transpose(&out_t, n, c, 1.0),
        })
    }
}

/// `a` `[rows, cols]` → `aᵀ · scale` `[cols, rows]`.
fn transpose(a: &[f32], rows: usize, cols: usize, scale: f32) -> Vec<f32> {
    let mut t = vec![0f32; rows * cols];
    t.par_chunks_mut(rows.max(1))
        .enumerate()
        .for_each(|(j, dst)| {
            for (i, d) in dst.iter_mut().enumerate() {
                *d = a[i * cols + j] * scale;
            }
        });
    t
}

/// The im2col patch of a `k×k` filter for output positions `j0..j0+cols` of `x` (row-major
/// over h·w): `patch[(c·k + dy)·k + dx][j] = x[c, y+dy-k/2, x+dx-k/2]`, zero outside the image.
/// Its rows follow the filter's `[in, k, k]` order, so `W [out, in·k·k] · patch` is the conv.
fn im2col(x: &CpuImage, k: usize, j0: usize, cols: usize, patch: &mut Vec<f32>) {
    let ImageShape {
        channels,
        height,
        width,
    } = x.shape;
    let pad = (k / 2) as isize;
    patch.clear();
    patch.resize(channels * k * k * cols, 0.0);
    for (r, dst) in patch.chunks_exact_mut(cols).enumerate() {
        let (c, dy, dx) = (r / (k * k), (r / k) % k, r % k);
        let plane = &x.data[c * height * width..][..height * width];
        for (j, d) in dst.iter_mut().enumerate() {
            let pos = j0 + j;
            let sy = (pos / width) as isize + dy as isize - pad;
            let sx = (pos % width) as isize + dx as isize - pad;
            if sy >= 0 && sx >= 0 && (sy as usize) < height && (sx as usize) < width {
                *d = plane[sy as usize * width + sx as usize];
            }
        }
    }
}

/// Copies a task's results into its own part of a buffer that rayon tasks share.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32, usize);

// SAFETY: tasks write disjoint ranges only (see `write`'s callers).
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// # Safety
    /// No other thread may touch `start..start+src.len()` meanwhile; the buffer is alive.
    unsafe fn write(&self, start: usize, src: &[f32]) {
        assert!(
            start + src.len() <= self.1,
            "SharedOut::write out of bounds"
        );
        std::ptr::copy_nonoverlapping(src.as_ptr(), self.0.add(start), src.len());
    }
}

static HAS_AVX2_FMA: LazyLock<bool> = LazyLock::new(|| {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
});

/// Rows and columns of the register block of [`matmul`]: 4×16 accumulators (8 AVX vectors).
const MR: usize = 4;
const NR: usize = 16;

/// `c[m, n] = a[m, depth] · b[depth, n]`: a row-major with row stride `depth`, b with row
/// stride `ldb`, c row-major `[m, n]` (overwritten). One thread; callers split the work.
fn matmul(m: usize, n: usize, depth: usize, a: &[f32], b: &[f32], ldb: usize, c: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if *HAS_AVX2_FMA {
        // SAFETY: the CPU supports AVX2 and FMA (checked above).
        return unsafe { matmul_avx2(m, n, depth, a, b, ldb, c) };
    }
    matmul_blocked::<false>(m, n, depth, a, b, ldb, c)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn matmul_avx2(
    m: usize,
    n: usize,
    depth: usize,
    a: &[f32],
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
) {
    matmul_blocked::<true>(m, n, depth, a, b, ldb, c)
}

/// `FMA`: use fused multiply-add (only where the CPU has it; elsewhere `mul_add` is a slow
/// library call).
#[inline(always)]
fn matmul_blocked<const FMA: bool>(
    m: usize,
    n: usize,
    depth: usize,
    a: &[f32],
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
) {
    let madd = |x: f32, y: f32, acc: f32| if FMA { x.mul_add(y, acc) } else { x * y + acc };
    let mut i = 0;
    while i < m {
        let rows = MR.min(m - i);
        let mut j = 0;
        while j < n {
            let cols = NR.min(n - j);
            if rows == MR && cols == NR {
                let mut acc = [[0f32; NR]; MR];
                let ar: [&[f32]; MR] = std::array::from_fn(|r| &a[(i + r) * depth..][..depth]);
                for p in 0..depth {
                    let bp: &[f32; NR] = b[p * ldb + j..][..NR].try_into().expect("NR values");
                    for r in 0..MR {
                        let av = ar[r][p];
                        for (acc, &bv) in acc[r].iter_mut().zip(bp) {
                            *acc = madd(av, bv, *acc);
                        }
                    }
                }
                for (r, acc) in acc.iter().enumerate() {
                    c[(i + r) * n + j..][..NR].copy_from_slice(acc);
                }
            } else {
                // Edge block: the same sums, one value at a time.
                for r in 0..rows {
                    let ar = &a[(i + r) * depth..][..depth];
                    for q in 0..cols {
                        let mut acc = 0f32;
                        for (p, &av) in ar.iter().enumerate() {
                            acc = madd(av, b[p * ldb + j + q], acc);
                        }
                        c[(i + r) * n + j + q] = acc;
                    }
                }
            }
            j += NR;
        }
        i += MR;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::Storage;

    /// Deterministic values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn weight(shape: &[usize], data: &[f32]) -> CpuImageWeight {
        let mut storage = Storage::owned(data.len() * 4);
        storage
            .bytes_mut()
            .expect("owned")
            .copy_from_slice(bytemuck::cast_slice(data));
        let t = HostTensor::new(
            "w".into(),
            DType::F32,
            shape.to_vec(),
            Arc::new(storage),
            0,
            data.len() * 4,
        );
        Cpu.image_weight(&t).expect("weight")
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// Direct convolution, the definition.
    fn conv_naive(x: &CpuImage, w: &[f32], co: usize, k: usize, bias: &[f32]) -> Vec<f32> {
        let ImageShape {
            channels: ci,
            height: h,
            width: wd,
        } = x.shape;
        let pad = (k / 2) as isize;
        let mut out = vec![0f32; co * h * wd];
        for o in 0..co {
            for y in 0..h {
                for xx in 0..wd {
                    let mut acc = bias[o];
                    for c in 0..ci {
                        for dy in 0..k {
                            for dx in 0..k {
                                let sy = y as isize + dy as isize - pad;
                                let sx = xx as isize + dx as isize - pad;
                                if sy < 0 || sx < 0 || sy >= h as isize || sx >= wd as isize {
                                    continue;
                                }
                                acc += w[((o * ci + c) * k + dy) * k + dx]
                                    * x.data[(c * h + sy as usize) * wd + sx as usize];
                            }
                        }
                    }
                    out[(o * h + y) * wd + xx] = acc;
                }
            }
        }
        out
    }

    #[test]
    fn conv2d_matches_the_definition() {
        // Odd sizes reach every edge path of the blocked product (m % 4, n % 16).
        for (ci, co, h, w, k) in [
            (5, 7, 9, 13, 3),
            (3, 4, 1, 1, 3),
            (6, 9, 7, 5, 1),
            (16, 8, 20, 24, 3),
        ] {
            let x = Cpu
                .image(ImageShape::new(ci, h, w), &values(ci * h * w, 1))
                .unwrap();
            let wv = values(co * ci * k * k, 2);
            let bv = values(co, 3);
            let got = Cpu
                .conv2d(&x, &weight(&[co, ci, k, k], &wv), &weight(&[co], &bv))
                .unwrap();
            assert_eq!(got.shape, ImageShape::new(co, h, w));
            let d = max_diff(&got.data, &conv_naive(&x, &wv, co, k, &bv));
            assert!(d < 1e-5, "conv {ci}->{co} {h}x{w} k{k}: max diff {d}");
        }
        // A linear [out, in] weight is a 1×1 filter.
        let x = Cpu.image(ImageShape::new(6, 3, 5), &values(90, 4)).unwrap();
        let wv = values(24, 5);
        let lin = Cpu
            .conv2d(&x, &weight(&[4, 6], &wv), &weight(&[4], &[0.0; 4]))
            .unwrap();
        assert!(max_diff(&lin.data, &conv_naive(&x, &wv, 4, 1, &[0.0; 4])) < 1e-5);
    }

    #[test]
    fn group_norm_matches_the_definition() {
        let (c, h, w, groups) = (6, 3, 5, 3);
        let xv: Vec<f32> = values(c * h * w, 6).iter().map(|v| 3.0 * v + 1.0).collect();
        let (sv, bv) = (values(c, 7), values(c, 8));
        let x = Cpu.image(ImageShape::new(c, h, w), &xv).unwrap();
        let got = Cpu
            .group_norm(&x, groups, 1e-6, &weight(&[c], &sv), &weight(&[c], &bv))
            .unwrap();
        let per = c / groups * h * w;
        for (i, &g) in got.data.iter().enumerate() {
            let grp = &xv[i / per * per..][..per];
            let mean = grp.iter().sum::<f32>() / per as f32;
            let var = grp.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / per as f32;
            let ch = i / (h * w);
            let want = (xv[i] - mean) / (var + 1e-6).sqrt() * sv[ch] + bv[ch];
            assert!((g - want).abs() < 1e-5, "element {i}: {g} vs {want}");
        }
    }

    #[test]
    fn rms_norm_channels_matches_the_definition() {
        let (c, h, w) = (5, 3, 700); // more positions than one task's block
        let xv: Vec<f32> = values(c * h * w, 9).iter().map(|v| 2.0 * v - 0.3).collect();
        let sv = values(c, 10);
        let x = Cpu.image(ImageShape::new(c, h, w), &xv).unwrap();
        let got = Cpu.rms_norm_channels(&x, 1e-6, &weight(&[c], &sv)).unwrap();
        let n = h * w;
        for (i, &g) in got.data.iter().enumerate() {
            let (ch, p) = (i / n, i % n);
            let ms = (0..c).map(|k| xv[k * n + p].powi(2)).sum::<f32>() / c as f32;
            let want = xv[i] / (ms + 1e-6).sqrt() * sv[ch];
            assert!((g - want).abs() < 1e-5, "element {i}: {g} vs {want}");
        }
    }

    #[test]
    fn attention_matches_the_definition() {
        // 37 positions: a partial query block and partial column blocks.
        let (c, h, w) = (5, 37, 1);
        let n = h * w;
        let img = |seed| {
            Cpu.image(ImageShape::new(c, h, w), &values(c * n, seed))
                .unwrap()
        };
        let (q, k, v) = (img(9), img(10), img(11));
        let got = Cpu.spatial_attention(&q, &k, &v).unwrap();
        for i in 0..n {
            let s: Vec<f32> = (0..n)
                .map(|j| {
                    (0..c)
                        .map(|ch| q.data[ch * n + i] * k.data[ch * n + j])
                        .sum::<f32>()
                        / (c as f32).sqrt()
                })
                .collect();
            let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = s.iter().map(|x| (x - max).exp()).collect();
            let sum: f32 = e.iter().sum();
            for ch in 0..c {
                let want: f32 = (0..n).map(|j| e[j] / sum * v.data[ch * n + j]).sum();
                let g = got.data[ch * n + i];
                assert!((g - want).abs() < 1e-5, "[{ch}, {i}]: {g} vs {want}");
            }
        }
    }

    #[test]
    fn upsample_repeats_pixels() {
        let x = Cpu
            .image(
                ImageShape::new(2, 2, 3),
                &(0..12).map(|v| v as f32).collect::<Vec<_>>(),
            )
            .unwrap();
        let up = Cpu.upsample_nearest2x(&x).unwrap();
        assert_eq!(up.shape, ImageShape::new(2, 4, 6));
        assert_eq!(
            &up.data[..12],
            &[0., 0., 1., 1., 2., 2., 0., 0., 1., 1., 2., 2.]
        );
        assert_eq!(&up.data[24..30], &[6., 6., 7., 7., 8., 8.]);
    }
}
