//! The CPU reference backend: f32 math, threads from rayon. Weights stay where the checkpoint
//! put them (f32 or bf16 read in place from the mapping); f16 is widened to f32 once.

use std::ops::Range;
use std::sync::Arc;

use half::bf16;
use rayon::prelude::*;

pub(super) use super::cpu_dot::dot;
use super::cpu_dot::{dot_block, Elem, BLOCK_ROWS, BLOCK_TOKENS};
use super::{AttentionShape, Backend, KvCache};
use crate::checkpoint::{DType, HostTensor};
use crate::error::Result;

pub struct Cpu;

/// A weight `[rows, cols]` (a vector is one row).
pub struct CpuWeight {
    rows: usize,
    cols: usize,
    data: WeightData,
}

enum WeightData {
    /// Read in place from the checkpoint (aligned f32 or bf16).
    Mapped(HostTensor),
    /// Converted once at load (f16, or unaligned data).
    Owned(Arc<Vec<f32>>),
}

enum Row<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
}

/// Tokens in a pass from which [`Cpu::linear`] widens bf16 rows once per task.
const WIDEN_FROM_TOKENS: usize = 8;

/// `dst[i * t + j] = w row (first + i) · token j` for the rows of one task, `w` row-major
/// with `cols` columns.
fn linear_task<E: Elem>(w: &[E], cols: usize, first: usize, tokens: &[&[f32]], dst: &mut [f32]) {
    let t = tokens.len();
    let rows_here = dst.len() / t.max(1);
    let row = |i: usize| &w[(first + i) * cols..(first + i + 1) * cols];
    for j0 in (0..t).step_by(BLOCK_TOKENS) {
        let m = BLOCK_TOKENS.min(t - j0);
        for pair in (0..rows_here).step_by(BLOCK_ROWS) {
            let n = BLOCK_ROWS.min(rows_here - pair);
            let rows: [&[E]; BLOCK_ROWS] =
                std::array::from_fn(|k| row((pair + k).min(rows_here - 1)));
            let mut out = [[0f32; BLOCK_TOKENS]; BLOCK_ROWS];
            dot_block(&rows[..n], &tokens[j0..j0 + m], &mut out);
            for (k, o) in out.iter().enumerate().take(n) {
                let at = (pair + k) * t + j0;
                dst[at..at + m].copy_from_slice(&o[..m]);
            }
        }
    }
}

impl CpuWeight {
    /// Every row, row-major.
    fn matrix(&self) -> Row<'_> {
        match &self.data {
            WeightData::Owned(v) => Row::F32(v),
            WeightData::Mapped(t) => match (t.as_f32(), t.as_bf16()) {
                (Some(f), _) => Row::F32(f),
                (_, Some(b)) => Row::Bf16(b),
                _ => unreachable!("CpuWeight::Mapped holds aligned f32 or bf16"),
            },
        }
    }

    fn row(&self, r: usize) -> Row<'_> {
        let span = r * self.cols..(r + 1) * self.cols;
        match &self.data {
            WeightData::Owned(v) => Row::F32(&v[span]),
            WeightData::Mapped(t) => match (t.as_f32(), t.as_bf16()) {
                (Some(f), _) => Row::F32(&f[span]),
                (_, Some(b)) => Row::Bf16(&b[span]),
                _ => unreachable!("CpuWeight::Mapped holds aligned f32 or bf16"),
            },
        }
    }

    /// Row `r` widened into `buf`.
    fn row_f32<'a>(&'a self, r: usize, buf: &'a mut Vec<f32>) -> &'a [f32] {
        match self.row(r) {
            Row::F32(f) => f,
            Row::Bf16(b) => {
                buf.clear();
                buf.extend(b.iter().map(|v| v.to_f32()));
                buf
            }
        }
    }

    /// The whole weight as f32 (small vectors: norms, biases).
    pub(super) fn vector(&self) -> Vec<f32> {
        let mut buf = Vec::new();
        (0..self.rows)
            .flat_map(|r| self.row_f32(r, &mut buf).to_vec())
            .collect()
    }
}

/// An activation `[rows, cols]`, f32 row-major.
#[derive(Clone, Debug)]
pub struct CpuTensor {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

/// Keys and values per layer, `[positions, kv_heads*head_dim]` each, grown as tokens come.
pub struct CpuKvCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: usize,
    capacity: usize,
}

impl KvCache for CpuKvCache {
    fn len(&self) -> usize {
        self.len
    }
    fn capacity(&self) -> usize {
        self.capacity
    }
    fn advance(&mut self, n: usize) {
        self.len += n;
    }
}

impl Backend for Cpu {
    type Weight = CpuWeight;
    type Activation = CpuTensor;
    type KvCache = CpuKvCache;

    fn weight(&self, t: &HostTensor) -> Result<CpuWeight> {
        let (rows, cols) = match t.shape[..] {
            [n] => (1, n),
            [r, c] => (r, c),
            _ => (t.shape[0], t.numel() / t.shape[0].max(1)),
        };
        let in_place = match t.dtype {
            DType::F32 => t.as_f32().is_some(),
            DType::BF16 => t.as_bf16().is_some(),
            DType::F16 | DType::Ggml(_) => false,
        };
        let data = if in_place {
            WeightData::Mapped(t.clone())
        } else {
            WeightData::Owned(Arc::new(t.to_f32()))
        };
        Ok(CpuWeight { rows, cols, data })
    }

    fn kv_cache(
        &self,
        layers: usize,
        _shape: AttentionShape,
        capacity: usize,
    ) -> Result<CpuKvCache> {
        Ok(CpuKvCache {
            k: vec![Vec::new(); layers],
            v: vec![Vec::new(); layers],
            len: 0,
            capacity,
        })
    }

    fn embed(&self, table: &CpuWeight, ids: &[u32]) -> Result<CpuTensor> {
        let mut buf = Vec::new();
        let mut data = Vec::with_capacity(ids.len() * table.cols);
        for &id in ids {
            data.extend_from_slice(table.row_f32(id as usize, &mut buf));
        }
        Ok(CpuTensor {
            rows: ids.len(),
            cols: table.cols,
            data,
        })
    }

    fn rms_norm(&self, x: &CpuTensor, w: &CpuWeight, eps: f32) -> Result<CpuTensor> {
        let w = w.vector();
        let mut out = x.clone();
        out.data.par_chunks_mut(w.len()).for_each(|v| {
            let mean_sq = v.iter().map(|a| a * a).sum::<f32>() / v.len() as f32;
            let scale = 1.0 / (mean_sq + eps).sqrt();
            for (a, g) in v.iter_mut().zip(&w) {
                *a = g * (*a * scale);
            }
        });
        Ok(out)
    }

    fn linear(&self, x: &CpuTensor, w: &CpuWeight, bias: Option<&CpuWeight>) -> Result<CpuTensor> {
        assert_eq!(x.cols, w.cols, "linear: input width vs weight columns");
        let (t, out_features) = (x.rows, w.rows);
        // Work on [out, t] so that each thread owns whole weight rows, then transpose. Rows
        // go in pairs and tokens in threes through dot_block (bf16 widened in registers),
        // which sums each dot as a single-token pass does; the rows of a task stay in cache
        // while every block of tokens passes them.
        const ROWS_PER_TASK: usize = 16;
        let mut out_t = vec![0f32; out_features * t];
        let cols = x.cols;
        let tokens: Vec<&[f32]> = x.data.chunks_exact(cols.max(1)).take(t).collect();
        // A long pass widens a task's bf16 rows to f32 once, for every block of tokens to
        // read; a short one (decode) widens in registers and reads each weight once.
        let widen_once = t >= WIDEN_FROM_TOKENS;
        out_t
            .par_chunks_mut(ROWS_PER_TASK * t.max(1))
            .enumerate()
            .for_each_init(Vec::new, |wide, (chunk, dst)| {
                let first = chunk * ROWS_PER_TASK;
                match w.matrix() {
                    Row::F32(m) => linear_task(m, cols, first, &tokens, dst),
                    Row::Bf16(m) if widen_once => {
                        let rows = m[first * cols..(first + dst.len() / t) * cols].iter();
                        wide.clear();
                        wide.extend(rows.map(|v| v.to_f32()));
                        linear_task(wide, cols, 0, &tokens, dst);
                    }
                    Row::Bf16(m) => linear_task(m, cols, first, &tokens, dst),
                }
            });
        let bias = bias.map(CpuWeight::vector);
        let mut data = vec![0f32; t * out_features];
        for (r, col) in out_t.chunks(t.max(1)).enumerate() {
            let b = bias.as_ref().map_or(0.0, |b| b[r]);
            for (tok, &v) in col.iter().enumerate() {
                data[tok * out_features + r] = v + b;
            }
        }
        Ok(CpuTensor {
            rows: t,
            cols: out_features,
            data,
        })
    }

    fn rope(
        &self,
        q: &mut CpuTensor,
        k: &mut CpuTensor,
        rows: Range<usize>,
        pos0: usize,
        inv_freq: &[f32],
        shape: AttentionShape,
    ) -> Result<()> {
        let d = shape.head_dim;
        let half = d / 2;
        for x in [q, k] {
            let cols = x.cols;
            x.data[rows.start * cols..rows.end * cols]
                .par_chunks_mut(cols)
                .enumerate()
                .for_each(|(t, row)| {
                    let pos = (pos0 + t) as f32;
                    let (cos, sin): (Vec<f32>, Vec<f32>) = inv_freq
                        .iter()
                        .map(|f| {
                            let a = pos * f;
                            (a.cos(), a.sin())
                        })
                        .unzip();
                    for head in row.chunks_mut(d) {
                        for i in 0..half {
                            let (a, b) = (head[i], head[i + half]);
                            head[i] = a * cos[i] - b * sin[i];
                            head[i + half] = b * cos[i] + a * sin[i];
                        }
                    }
                });
        }
        Ok(())
    }

    fn attention(
        &self,
        q: &CpuTensor,
        k: &CpuTensor,
        v: &CpuTensor,
        rows: Range<usize>,
        cache: &mut CpuKvCache,
        layer: usize,
        pos0: usize,
        shape: AttentionShape,
        out: &mut CpuTensor,
    ) -> Result<()> {
        let kv_width = shape.num_kv_heads * shape.head_dim;
        assert_eq!(
            cache.k[layer].len(),
            pos0 * kv_width,
            "cache of layer {layer} not at position {pos0}"
        );
        let kv_rows = rows.start * kv_width..rows.end * kv_width;
        cache.k[layer].extend_from_slice(&k.data[kv_rows.clone()]);
        cache.v[layer].extend_from_slice(&v.data[kv_rows]);
        let (keys, values) = (&cache.k[layer], &cache.v[layer]);

        let d = shape.head_dim;
        let group = shape.num_heads / shape.num_kv_heads;
        let scale = 1.0 / (d as f32).sqrt();
        let width = shape.num_heads * d;
        assert!(
            out.cols == width && rows.end <= out.rows.min(q.rows),
            "attention: rows {rows:?} into [{}, {}]",
            out.rows,
            out.cols
        );
        let o_rows = &mut out.data[rows.start * width..rows.end * width];
        o_rows.fill(0.0);
        // One task per (token, head): out[t, h*d..(h+1)*d].
        o_rows
            .par_chunks_mut(d)
            .enumerate()
            .for_each_init(Vec::new, |scores, (i, o)| {
                let (t, h) = (i / shape.num_heads, i % shape.num_heads);
                let pos = pos0 + t;
                let first = match shape.sliding_window {
                    Some(w) if pos + 1 > w => pos + 1 - w,
                    _ => 0,
                };
                let qh = &q.data[(rows.start + t) * q.cols + h * d..][..d];
                let kv_off = (h / group) * d;
                scores.clear();
                scores.extend(
                    (first..=pos).map(|j| dot(qh, &keys[j * kv_width + kv_off..][..d]) * scale),
                );
                let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0;
                for s in scores.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                for (s, j) in scores.iter().zip(first..=pos) {
                    let p = s / sum;
                    for (a, b) in o.iter_mut().zip(&values[j * kv_width + kv_off..][..d]) {
                        *a += p * b;
                    }
                }
            });
        Ok(())
    }

    fn activation(&self, rows: usize, cols: usize) -> Result<CpuTensor> {
        Ok(CpuTensor {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        })
    }

    fn silu_mul(&self, gate: &mut CpuTensor, up: &CpuTensor) -> Result<()> {
        assert_eq!(gate.data.len(), up.data.len(), "silu_mul: shapes differ");
        for (g, &u) in gate.data.iter_mut().zip(&up.data) {
            *g = *g / (1.0 + (-*g).exp()) * u;
        }
        Ok(())
    }

    fn add_assign(&self, x: &mut CpuTensor, start: usize, y: &CpuTensor) -> Result<()> {
        assert!(
            x.cols == y.cols && start + y.rows <= x.rows,
            "add_assign: [{}, {}] at row {start} of [{}, {}]",
            y.rows,
            y.cols,
            x.rows,
            x.cols
        );
        let rows = &mut x.data[start * x.cols..(start + y.rows) * x.cols];
        for (a, b) in rows.iter_mut().zip(&y.data) {
            *a += b;
        }
        Ok(())
    }

    fn rows(&self, x: &CpuTensor, start: usize, len: usize) -> Result<CpuTensor> {
        Ok(CpuTensor {
            rows: len,
            cols: x.cols,
            data: x.data[start * x.cols..(start + len) * x.cols].to_vec(),
        })
    }

    fn concat_rows(&self, parts: &[CpuTensor]) -> Result<CpuTensor> {
        let cols = parts.first().map_or(0, |p| p.cols);
        assert!(
            parts.iter().all(|p| p.cols == cols),
            "concat_rows: widths differ"
        );
        Ok(CpuTensor {
            rows: parts.iter().map(|p| p.rows).sum(),
            cols,
            data: parts.iter().flat_map(|p| p.data.iter().copied()).collect(),
        })
    }

    fn concat_cols(&self, mut parts: Vec<CpuTensor>) -> Result<CpuTensor> {
        if parts.len() == 1 {
            return Ok(parts.pop().expect("one part"));
        }
        let rows = parts.first().map_or(0, |p| p.rows);
        assert!(
            parts.iter().all(|p| p.rows == rows),
            "concat_cols: row counts differ"
        );
        let cols = parts.iter().map(|p| p.cols).sum();
        let mut data = Vec::with_capacity(rows * cols);
        for r in 0..rows {
            for p in &parts {
                data.extend_from_slice(&p.data[r * p.cols..(r + 1) * p.cols]);
            }
        }
        Ok(CpuTensor { rows, cols, data })
    }

    fn to_host(&self, x: &CpuTensor) -> Result<Vec<f32>> {
        Ok(x.data.clone())
    }

    fn cols(&self, x: &CpuTensor) -> usize {
        x.cols
    }
}
