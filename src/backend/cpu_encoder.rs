//! [`EncoderOps`] on the CPU: f32, threads from rayon.

use std::ops::Range;

use rayon::prelude::*;

use super::cpu::{dot, Cpu, CpuTensor, CpuWeight};
use super::dit::Pointwise;
use super::encoder::{quick_gelu, EncoderOps};
use crate::error::Result;

impl EncoderOps for Cpu {
    fn layer_norm_affine(
        &self,
        x: &CpuTensor,
        w: &CpuWeight,
        b: &CpuWeight,
        eps: f32,
    ) -> Result<CpuTensor> {
        let (w, b) = (w.vector(), b.vector());
        assert!(
            w.len() == x.cols && b.len() == x.cols,
            "layer_norm_affine: weight [{}] and bias [{}] for rows of {}",
            w.len(),
            b.len(),
            x.cols
        );
        let mut out = x.clone();
        let n = x.cols as f32;
        out.data.par_chunks_mut(x.cols.max(1)).for_each(|row| {
            let mean = row.iter().sum::<f32>() / n;
            let var = row.iter().map(|a| (a - mean) * (a - mean)).sum::<f32>() / n;
            let inv = 1.0 / (var + eps).sqrt();
            for ((a, g), c) in row.iter_mut().zip(&w).zip(&b) {
                *a = (*a - mean) * inv * g + c;
            }
        });
        Ok(out)
    }

    fn quick_gelu(&self, x: &mut CpuTensor) -> Result<()> {
        x.data.par_iter_mut().for_each(|v| *v = quick_gelu(*v));
        Ok(())
    }

    fn gelu_tanh_mul(&self, gate: &mut CpuTensor, up: &CpuTensor) -> Result<()> {
        assert_eq!(
            gate.data.len(),
            up.data.len(),
            "gelu_tanh_mul: shapes differ"
        );
        gate.data
            .par_iter_mut()
            .zip(&up.data)
            .for_each(|(g, &u)| *g = Pointwise::GeluTanh.apply(*g) * u);
        Ok(())
    }

    fn attention_biased(
        &self,
        q: &CpuTensor,
        k: &CpuTensor,
        v: &CpuTensor,
        bias: &CpuTensor,
        samples: &[Range<usize>],
        heads: usize,
        head_dim: usize,
    ) -> Result<CpuTensor> {
        let width = heads * head_dim;
        assert!(
            [q, k, v]
                .iter()
                .all(|t| t.cols == width && t.rows == q.rows),
            "attention_biased: q, k, v must be [{}, {width}]",
            q.rows
        );
        let span = bias.rows.div_ceil(2);
        assert!(
            bias.cols == heads && bias.rows % 2 == 1,
            "attention_biased: bias [{}, {}] for {heads} heads",
            bias.rows,
            bias.cols
        );
        assert!(
            samples
                .iter()
                .all(|r| r.start <= r.end && r.end <= q.rows && r.len() <= span),
            "attention_biased: sample rows {samples:?} outside {} rows or longer than {span}",
            q.rows
        );
        // One task per (query row, head): out[i, h·d..(h+1)·d].
        let tasks: Vec<(Range<usize>, usize)> = samples
            .iter()
            .flat_map(|s| s.clone().map(move |i| (s.clone(), i)))
            .collect();
        let rows: Vec<Vec<f32>> = tasks
            .par_iter()
            .map(|(keys, i)| {
                let mut out = vec![0f32; width];
                let mut scores = Vec::with_capacity(keys.len());
                for (h, o) in out.chunks_exact_mut(head_dim).enumerate() {
                    let qh = &q.data[i * width + h * head_dim..][..head_dim];
                    scores.clear();
                    scores.extend(keys.clone().map(|j| {
                        let rel = j + span - 1 - i; // (j − i) + span − 1
                        dot(qh, &k.data[j * width + h * head_dim..][..head_dim])
                            + bias.data[rel * heads + h]
                    }));
                    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0.0;
                    for s in scores.iter_mut() {
                        *s = (*s - max).exp();
                        sum += *s;
                    }
                    for (s, j) in scores.iter().zip(keys.clone()) {
                        let p = s / sum;
                        let vh = &v.data[j * width + h * head_dim..][..head_dim];
                        for (a, b) in o.iter_mut().zip(vh) {
                            *a += p * b;
                        }
                    }
                }
                out
            })
            .collect();
        let mut data = vec![0f32; q.rows * width];
        for ((_, i), row) in tasks.iter().zip(rows) {
            data[i * width..(i + 1) * width].copy_from_slice(&row);
        }
        Ok(CpuTensor {
            rows: q.rows,
            cols: width,
            data,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::dit::DitOps;
    use crate::backend::Backend;
    use crate::checkpoint::{DType, HostTensor, Storage};
    use std::sync::Arc;

    fn tensor(rows: usize, cols: usize, seed: u32) -> CpuTensor {
        // A small deterministic pattern in (−1, 1).
        let data = (0..rows * cols)
            .map(|i| {
                let x = (i as u32)
                    .wrapping_mul(2654435761)
                    .wrapping_add(seed * 40503);
                (x % 2001) as f32 / 1000.0 - 1.0
            })
            .collect();
        CpuTensor { rows, cols, data }
    }

    fn weight(values: &[f32]) -> CpuWeight {
        let mut storage = Storage::owned(values.len() * 4);
        storage
            .bytes_mut()
            .expect("owned")
            .copy_from_slice(bytemuck::cast_slice(values));
        let t = HostTensor::new(
            "w".into(),
            DType::F32,
            vec![values.len()],
            Arc::new(storage),
            0,
            values.len() * 4,
        );
        Cpu.weight(&t).unwrap()
    }

    #[test]
    fn layer_norm_affine_is_the_textbook_formula() {
        let x = tensor(3, 8, 1);
        let w: Vec<f32> = (0..8).map(|i| 0.5 + i as f32 * 0.1).collect();
        let b: Vec<f32> = (0..8).map(|i| i as f32 * -0.2).collect();
        let got = Cpu
            .layer_norm_affine(&x, &weight(&w), &weight(&b), 1e-5)
            .unwrap();
        for (r, row) in x.data.chunks(8).enumerate() {
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / 8.0;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / 8.0;
            for c in 0..8 {
                let want = (row[c] as f64 - mean) / (var + 1e-5).sqrt() * w[c] as f64 + b[c] as f64;
                assert!((got.data[r * 8 + c] as f64 - want).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn quick_gelu_and_gated_gelu_are_elementwise() {
        let mut x = tensor(2, 5, 2);
        let orig = x.clone();
        Cpu.quick_gelu(&mut x).unwrap();
        for (a, &b) in x.data.iter().zip(&orig.data) {
            let want = b as f64 / (1.0 + (-1.702 * b as f64).exp());
            assert!((*a as f64 - want).abs() < 1e-6);
        }
        let up = tensor(2, 5, 3);
        let mut g = orig.clone();
        Cpu.gelu_tanh_mul(&mut g, &up).unwrap();
        let mut gelu = orig.clone();
        Cpu.pointwise(&mut gelu, Pointwise::GeluTanh).unwrap();
        for ((a, b), u) in g.data.iter().zip(&gelu.data).zip(&up.data) {
            assert_eq!(*a, b * u);
        }
    }

    /// Against a naive loop in f64, for two samples of different lengths (one shorter than
    /// the bias's span).
    #[test]
    fn attention_biased_matches_a_naive_loop() {
        let (heads, d, span) = (3, 4, 6);
        let samples = [0..6, 6..10];
        let (q, k, v) = (tensor(10, 12, 4), tensor(10, 12, 5), tensor(10, 12, 6));
        let bias = tensor(2 * span - 1, heads, 7);
        let got = Cpu
            .attention_biased(&q, &k, &v, &bias, &samples, heads, d)
            .unwrap();
        for s in &samples {
            for i in s.clone() {
                for h in 0..heads {
                    let scores: Vec<f64> = s
                        .clone()
                        .map(|j| {
                            (0..d)
                                .map(|e| {
                                    q.data[i * 12 + h * d + e] as f64
                                        * k.data[j * 12 + h * d + e] as f64
                                })
                                .sum::<f64>()
                                + bias.data[(j + span - 1 - i) * heads + h] as f64
                        })
                        .collect();
                    let max = scores.iter().copied().fold(f64::MIN, f64::max);
                    let sum: f64 = scores.iter().map(|x| (x - max).exp()).sum();
                    for e in 0..d {
                        let want: f64 = s
                            .clone()
                            .zip(&scores)
                            .map(|(j, x)| (x - max).exp() / sum * v.data[j * 12 + h * d + e] as f64)
                            .sum();
                        let a = got.data[i * 12 + h * d + e] as f64;
                        assert!((a - want).abs() < 1e-5, "row {i} head {h}: {a} vs {want}");
                    }
                }
            }
        }
    }
}
