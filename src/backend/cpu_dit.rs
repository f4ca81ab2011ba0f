//! [`DitOps`] on the CPU: f32, threads from rayon.

use std::ops::Range;

use rayon::prelude::*;

use super::cpu::{dot, Cpu, CpuTensor};
use super::dit::{DitOps, Pointwise};
use crate::error::Result;

/// Check that `samples` are in-bounds row ranges of `x` and that `table` has a row per sample
/// of `x`'s width (a mismatch is a bug in the model, not bad input).
fn check_per_sample(op: &str, x: &CpuTensor, samples: &[Range<usize>], table: &CpuTensor) {
    assert!(
        table.rows == samples.len() && table.cols == x.cols,
        "{op}: table [{}, {}] for {} samples of width {}",
        table.rows,
        table.cols,
        samples.len(),
        x.cols
    );
    assert!(
        samples.iter().all(|r| r.start <= r.end && r.end <= x.rows),
        "{op}: sample rows {samples:?} outside {} rows",
        x.rows
    );
}

impl DitOps for Cpu {
    type RopeTable = CpuTensor;

    fn rope_table(&self, data: &[f32], rows: usize, cols: usize) -> Result<CpuTensor> {
        self.upload(data, rows, cols)
    }

    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Result<CpuTensor> {
        assert_eq!(
            data.len(),
            rows * cols,
            "upload: {rows}×{cols} from {}",
            data.len()
        );
        Ok(CpuTensor {
            rows,
            cols,
            data: data.to_vec(),
        })
    }

    fn pointwise(&self, x: &mut CpuTensor, f: Pointwise) -> Result<()> {
        x.data.par_iter_mut().for_each(|v| *v = f.apply(*v));
        Ok(())
    }

    fn split_cols(&self, x: &CpuTensor, parts: usize) -> Result<Vec<CpuTensor>> {
        assert!(
            parts > 0 && x.cols % parts == 0,
            "split_cols: {} columns in {parts} parts",
            x.cols
        );
        let w = x.cols / parts;
        Ok((0..parts)
            .map(|p| CpuTensor {
                rows: x.rows,
                cols: w,
                data: x
                    .data
                    .chunks_exact(x.cols.max(1))
                    .flat_map(|row| &row[p * w..(p + 1) * w])
                    .copied()
                    .collect(),
            })
            .collect())
    }

    fn layer_norm(&self, x: &CpuTensor, eps: f32) -> Result<CpuTensor> {
        let mut out = x.clone();
        let n = x.cols as f32;
        out.data.par_chunks_mut(x.cols.max(1)).for_each(|row| {
            let mean = row.iter().sum::<f32>() / n;
            let var = row.iter().map(|a| (a - mean) * (a - mean)).sum::<f32>() / n;
            let inv = 1.0 / (var + eps).sqrt();
            for a in row.iter_mut() {
                *a = (*a - mean) * inv;
            }
        });
        Ok(out)
    }

    fn modulate(
        &self,
        x: &mut CpuTensor,
        samples: &[Range<usize>],
        scale: &CpuTensor,
        shift: Option<&CpuTensor>,
    ) -> Result<()> {
        check_per_sample("modulate", x, samples, scale);
        if let Some(shift) = shift {
            check_per_sample("modulate", x, samples, shift);
        }
        let cols = x.cols;
        for (s, rows) in samples.iter().enumerate() {
            let sc = &scale.data[s * cols..(s + 1) * cols];
            let sh = shift.map(|t| &t.data[s * cols..(s + 1) * cols]);
            x.data[rows.start * cols..rows.end * cols]
                .par_chunks_mut(cols)
                .for_each(|row| {
                    for (i, a) in row.iter_mut().enumerate() {
                        *a = *a * (1.0 + sc[i]) + sh.map_or(0.0, |sh| sh[i]);
                    }
                });
        }
        Ok(())
    }

    fn add_gated(
        &self,
        x: &mut CpuTensor,
        samples: &[Range<usize>],
        gate: &CpuTensor,
        y: &CpuTensor,
    ) -> Result<()> {
        check_per_sample("add_gated", x, samples, gate);
        assert!(
            x.rows == y.rows && x.cols == y.cols,
            "add_gated: y [{}, {}] vs x [{}, {}]",
            y.rows,
            y.cols,
            x.rows,
            x.cols
        );
        let cols = x.cols;
        for (s, rows) in samples.iter().enumerate() {
            let g = &gate.data[s * cols..(s + 1) * cols];
            let span = rows.start * cols..rows.end * cols;
            x.data[span.clone()]
                .par_chunks_mut(cols)
                .zip(y.data[span].par_chunks(cols))
                .for_each(|(row, yr)| {
                    for ((a, &b), &g) in row.iter_mut().zip(yr).zip(g) {
                        *a += g * b;
                    }
                });
        }
        Ok(())
    }

    fn rope_interleaved(
        &self,
        x: &mut CpuTensor,
        table: &CpuTensor,
        head_dim: usize,
    ) -> Result<()> {
        assert!(
            table.rows == x.rows && table.cols == head_dim && x.cols % head_dim == 0,
            "rope_interleaved: table [{}, {}] for x [{}, {}] with head_dim {head_dim}",
            table.rows,
            table.cols,
            x.rows,
            x.cols
        );
        let cols = x.cols;
        x.data
            .par_chunks_mut(cols)
            .zip(table.data.par_chunks(head_dim))
            .for_each(|(row, angles)| {
                for head in row.chunks_exact_mut(head_dim) {
                    for (pair, cs) in head.chunks_exact_mut(2).zip(angles.chunks_exact(2)) {
                        let (a, b, cos, sin) = (pair[0], pair[1], cs[0], cs[1]);
                        pair[0] = a * cos - b * sin;
                        pair[1] = a * sin + b * cos;
                    }
                }
            });
        Ok(())
    }

    fn attention_within(
        &self,
        q: &CpuTensor,
        k: &CpuTensor,
        v: &CpuTensor,
        samples: &[Range<usize>],
        heads: usize,
        head_dim: usize,
    ) -> Result<CpuTensor> {
        let width = heads * head_dim;
        assert!(
            [q, k, v]
                .iter()
                .all(|t| t.cols == width && t.rows == q.rows),
            "attention_within: q, k, v must be [{}, {width}]",
            q.rows
        );
        assert!(
            samples.iter().all(|r| r.start <= r.end && r.end <= q.rows),
            "attention_within: sample rows {samples:?} outside {} rows",
            q.rows
        );
        // Keys and values head by head, [heads, rows, head_dim], so that a task reads one
        // head's keys contiguously.
        let by_head = |t: &CpuTensor| -> Vec<f32> {
            let mut out = Vec::with_capacity(t.data.len());
            for h in 0..heads {
                for row in t.data.chunks_exact(width) {
                    out.extend_from_slice(&row[h * head_dim..(h + 1) * head_dim]);
                }
            }
            out
        };
        let (kh, vh) = (by_head(k), by_head(v));
        // One task per (sample, head, block of queries): the block shares the head's keys
        // and values while they are in cache.
        const QUERIES_PER_TASK: usize = 16;
        let tasks: Vec<(Range<usize>, usize, Range<usize>)> = samples
            .iter()
            .flat_map(|keys| {
                (0..heads).flat_map(move |h| {
                    keys.clone()
                        .step_by(QUERIES_PER_TASK)
                        .map(move |q0| (keys.clone(), h, q0..(q0 + QUERIES_PER_TASK).min(keys.end)))
                })
            })
            .collect();
        let scale = 1.0 / (head_dim as f32).sqrt();
        let blocks: Vec<Vec<f32>> = tasks
            .par_iter()
            .map(|(keys, h, queries)| {
                let head_k = &kh[h * q.rows * head_dim..(h + 1) * q.rows * head_dim];
                let head_v = &vh[h * q.rows * head_dim..(h + 1) * q.rows * head_dim];
                let mut block = vec![0f32; queries.len() * head_dim];
                let mut scores = Vec::with_capacity(keys.len());
                for (row, o) in queries.clone().zip(block.chunks_exact_mut(head_dim)) {
                    let qh = &q.data[row * width + h * head_dim..][..head_dim];
                    scores.clear();
                    scores.extend(
                        keys.clone()
                            .map(|j| dot(qh, &head_k[j * head_dim..][..head_dim]) * scale),
                    );
                    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0.0;
                    for s in scores.iter_mut() {
                        *s = (*s - max).exp();
                        sum += *s;
                    }
                    for (s, j) in scores.iter().zip(keys.clone()) {
                        let p = s / sum;
                        for (a, b) in o.iter_mut().zip(&head_v[j * head_dim..][..head_dim]) {
                            *a += p * b;
                        }
                    }
                }
                block
            })
            .collect();
        // Rows outside every sample stay zero.
        let mut out = vec![0f32; q.rows * width];
        for ((_, h, queries), block) in tasks.iter().zip(&blocks) {
            for (row, o) in queries.clone().zip(block.chunks_exact(head_dim)) {
                out[row * width + h * head_dim..][..head_dim].copy_from_slice(o);
            }
        }
        Ok(CpuTensor {
            rows: q.rows,
            cols: width,
            data: out,
        })
    }
}
