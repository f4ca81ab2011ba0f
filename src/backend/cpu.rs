//! The CPU reference backend: f32 math, threads from rayon. Matrices are repacked once at
//! load into the panels `cpu_gemm` multiplies (f32, or bf16 as stored; f16 and quantized
//! blocks widened to f32), replacing the row-major data; vectors (norms, biases) are read in
//! place from the mapping where aligned.

use std::ops::Range;

use half::bf16;
use rayon::prelude::*;

pub(super) use super::cpu_dot::dot;
use super::cpu_exp;
use super::cpu_gemm::{block, Panels, Store, PANEL, TOKENS};
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
    /// A vector read in place from the checkpoint (aligned f32 or bf16).
    Mapped(HostTensor),
    /// A vector converted once at load (f16, quantized, or unaligned data).
    Owned(Vec<f32>),
    /// A matrix, repacked once at load into the panels [`Cpu::linear`] reads (f32; f16 and
    /// quantized data are widened to it).
    F32(Panels<f32>),
    /// A bf16 matrix, repacked as it is (widened in registers).
    Bf16(Panels<bf16>),
}

impl CpuWeight {
    /// Row `r` widened into `buf`.
    fn row_f32<'a>(&'a self, r: usize, buf: &'a mut Vec<f32>) -> &'a [f32] {
        let span = r * self.cols..(r + 1) * self.cols;
        let mut widen = |row: &mut dyn Iterator<Item = f32>| {
            buf.clear();
            buf.extend(row);
        };
        match &self.data {
            WeightData::Owned(v) => return &v[span],
            WeightData::Mapped(t) => match (t.as_f32(), t.as_bf16()) {
                (Some(f), _) => return &f[span],
                (_, Some(b)) => widen(&mut b[span].iter().map(|v| v.to_f32())),
                _ => unreachable!("CpuWeight::Mapped holds aligned f32 or bf16"),
            },
            WeightData::F32(p) => widen(&mut p.row(r)),
            WeightData::Bf16(p) => widen(&mut p.row(r)),
        }
        buf
    }

    /// `x @ selfᵀ`, each output stored into `out` (`[x.rows, self.rows]`) by `store`.
    fn product_into(&self, x: &CpuTensor, out: &mut [f32], store: Store) {
        assert_eq!(x.cols, self.cols, "linear: input width vs weight columns");
        let tokens = &x.data[..x.rows * x.cols];
        // Each output one chain of FMAs over the columns, as in a one-token pass.
        match &self.data {
            WeightData::F32(p) => p.product_into(tokens, out, store),
            WeightData::Bf16(p) => p.product_into(tokens, out, store),
            WeightData::Mapped(_) | WeightData::Owned(_) => {
                let mut buf = Vec::new();
                let row = self.row_f32(0, &mut buf);
                Panels::pack(1, self.cols, row).product_into(tokens, out, store)
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

/// Keys and values per layer and key-value head, grown as tokens come: keys as panels of 16
/// positions `[positions / 16][head_dim][16]` (the weights' layout, so that scores are
/// [`block`]s of 16 positions), values `[positions][head_dim rounded up to 16]`.
pub struct CpuKvCache {
    k: Vec<Vec<Vec<f32>>>,
    v: Vec<Vec<Vec<f32>>>,
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
        // Matrices are repacked into panels, which replace the row-major data (a mapping is
        // no longer referenced from here; a conversion is dropped once packed).
        let data = match (rows, in_place) {
            (1, true) => WeightData::Mapped(t.clone()),
            (1, false) => WeightData::Owned(t.to_f32()),
            (_, true) => match (t.as_f32(), t.as_bf16()) {
                (Some(f), _) => WeightData::F32(Panels::pack(rows, cols, f)),
                (_, Some(b)) => WeightData::Bf16(Panels::pack(rows, cols, b)),
                _ => unreachable!("in place means aligned f32 or bf16"),
            },
            (_, false) => WeightData::F32(Panels::pack(rows, cols, &t.to_f32())),
        };
        Ok(CpuWeight { rows, cols, data })
    }

    fn kv_cache(
        &self,
        layers: usize,
        shape: AttentionShape,
        capacity: usize,
    ) -> Result<CpuKvCache> {
        let heads = vec![Vec::new(); shape.num_kv_heads];
        Ok(CpuKvCache {
            k: vec![heads.clone(); layers],
            v: vec![heads; layers],
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
        self.rms_norm_rows(x, 0, x.rows, w, eps)
    }

    /// Read from `x`'s rows in place, written straight into the new tensor.
    fn rms_norm_rows(
        &self,
        x: &CpuTensor,
        start: usize,
        len: usize,
        w: &CpuWeight,
        eps: f32,
    ) -> Result<CpuTensor> {
        let w = w.vector();
        let rows = &x.data[start * x.cols..(start + len) * x.cols];
        let mut out = CpuTensor {
            rows: len,
            cols: x.cols,
            data: vec![0.0; rows.len()],
        };
        // Each piece of w's width (a row, or a head of one) normalized on its own.
        out.data
            .par_chunks_mut(w.len())
            .zip(rows.par_chunks(w.len()))
            .for_each(|(o, v)| {
                let mean_sq = v.iter().map(|a| a * a).sum::<f32>() / v.len() as f32;
                let scale = 1.0 / (mean_sq + eps).sqrt();
                for ((o, a), g) in o.iter_mut().zip(v).zip(&w) {
                    *o = g * (*a * scale);
                }
            });
        Ok(out)
    }

    fn linear(&self, x: &CpuTensor, w: &CpuWeight, bias: Option<&CpuWeight>) -> Result<CpuTensor> {
        let mut out = CpuTensor {
            rows: x.rows,
            cols: w.rows,
            data: vec![0.0; x.rows * w.rows],
        };
        let bias = bias.map(CpuWeight::vector);
        let store = bias.as_deref().map_or(Store::Write, Store::Bias);
        w.product_into(x, &mut out.data, store);
        Ok(out)
    }

    /// The product added into `x` as it is stored, with no `[t, out]` in between (the same
    /// sums as the trait's linear then add_assign).
    fn linear_add(
        &self,
        x: &mut CpuTensor,
        start: usize,
        h: &CpuTensor,
        w: &CpuWeight,
        bias: Option<&CpuWeight>,
    ) -> Result<()> {
        assert!(
            x.cols == w.rows && start + h.rows <= x.rows,
            "linear_add: [{}, {}] at row {start} of [{}, {}]",
            h.rows,
            w.rows,
            x.rows,
            x.cols
        );
        let rows = &mut x.data[start * x.cols..(start + h.rows) * x.cols];
        match bias {
            None => w.product_into(h, rows, Store::Add),
            Some(b) => {
                let mut y = vec![0.0; rows.len()];
                w.product_into(h, &mut y, Store::Bias(&b.vector()));
                for (a, y) in rows.iter_mut().zip(&y) {
                    *a += y;
                }
            }
        }
        Ok(())
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
        let (d, kv_heads) = (shape.head_dim, shape.num_kv_heads);
        let padded = d.next_multiple_of(PANEL);
        assert!(
            cache.v[layer].iter().all(|v| v.len() == pos0 * padded),
            "cache of layer {layer} not at position {pos0}"
        );
        for (i, t) in rows.clone().enumerate() {
            let pos = pos0 + i;
            for g in 0..kv_heads {
                let keys = &mut cache.k[layer][g];
                if pos % PANEL == 0 {
                    keys.resize(keys.len() + d * PANEL, 0.0);
                }
                let panel = &mut keys[pos / PANEL * d * PANEL..][..d * PANEL];
                for (c, &x) in k.data[t * k.cols + g * d..][..d].iter().enumerate() {
                    panel[c * PANEL + pos % PANEL] = x;
                }
                let values = &mut cache.v[layer][g];
                values.extend_from_slice(&v.data[t * v.cols + g * d..][..d]);
                values.resize(values.len() + padded - d, 0.0);
            }
        }

        let group = shape.num_heads / kv_heads;
        let scale = 1.0 / (d as f32).sqrt();
        let width = shape.num_heads * d;
        assert!(
            out.cols == width && rows.end <= out.rows.min(q.rows),
            "attention: rows {rows:?} into [{}, {}]",
            out.rows,
            out.cols
        );
        let (keys, values) = (&cache.k[layer], &cache.v[layer]);
        let o_rows = &mut out.data[rows.start * width..rows.end * width];
        // One task per (token, key-value head): out[t, the group's heads]. Every score is one
        // chain over head_dim and every output one chain over the positions first..=pos in
        // order, whichever other tokens are in the pass.
        o_rows
            .par_chunks_mut(group * d)
            .enumerate()
            .for_each_init(Vec::new, |probs, (i, o)| {
                let (t, g) = (i / kv_heads, i % kv_heads);
                let pos = pos0 + t;
                let first = match shape.sliding_window {
                    Some(w) if pos + 1 > w => pos + 1 - w,
                    _ => 0,
                };
                let n = pos + 1 - first;
                let (keys, values) = (&keys[g], &values[g]);
                let q_row = &q.data[(rows.start + t) * q.cols..][..width];
                probs.clear();
                probs.resize(group * n, 0.0); // [group, n]
                for h0 in (0..group).step_by(TOKENS) {
                    let m = TOKENS.min(group - h0);
                    let qs: [&[f32]; TOKENS] =
                        std::array::from_fn(|h| &q_row[(g * group + h0 + h.min(m - 1)) * d..][..d]);
                    let qs = &qs[..m];
                    for p in first / PANEL..=pos / PANEL {
                        let mut s = [[[0f32; PANEL]; TOKENS]; 2];
                        block(&[&keys[p * d * PANEL..][..d * PANEL]], PANEL, d, qs, &mut s);
                        let lanes = first.max(p * PANEL)..(pos + 1).min((p + 1) * PANEL);
                        for (h, s) in s[0].iter().enumerate().take(m) {
                            for j in lanes.clone() {
                                probs[(h0 + h) * n + j - first] = s[j - p * PANEL] * scale;
                            }
                        }
                    }
                }
                probs.chunks_mut(n).for_each(cpu_exp::softmax);
                for h0 in (0..group).step_by(TOKENS) {
                    let m = TOKENS.min(group - h0);
                    let ps: [&[f32]; TOKENS] =
                        std::array::from_fn(|h| &probs[(h0 + h.min(m - 1)) * n..][..n]);
                    let ps = &ps[..m];
                    for c in (0..d).step_by(PANEL) {
                        let mut acc = [[[0f32; PANEL]; TOKENS]; 2];
                        block(&[&values[first * padded + c..]], padded, n, ps, &mut acc);
                        let lanes = PANEL.min(d - c);
                        for (h, a) in acc[0].iter().enumerate().take(m) {
                            o[(h0 + h) * d + c..][..lanes].copy_from_slice(&a[..lanes]);
                        }
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
        // Element by element, so any split between the threads gives the same values.
        let per_task = gate.cols.max(1) * 16;
        gate.data
            .par_chunks_mut(per_task)
            .zip(up.data.par_chunks(per_task))
            .for_each(|(g, u)| cpu_exp::silu_mul(g, u));
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
