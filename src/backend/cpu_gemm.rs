//! The CPU backend's matrix product: weights repacked once at load into panels of
//! [`PANEL`] rows stored column by column (`[k][PANEL]`), so that one 16-wide load gives
//! column `k` of sixteen rows; a token's `x[k]` is broadcast and multiplied into all sixteen
//! at once. Each output `(row, token)` is one chain of fused multiply-adds over `k` in order,
//! starting from zero — the same chain whether the pass has one token or hundreds, and
//! whichever block of tokens or rows computes it — so a token's result does not depend on the
//! batch around it (tests/batch.rs checks it bit for bit).
//!
//! The micro-kernel keeps 1 panel × up to 6 tokens (12 accumulators) or 2 panels × up to 2
//! tokens in the sixteen AVX2 registers: per `k`, 2 weight loads and 6 broadcasts feed 12
//! FMAs, so it is bound by the FMA units rather than by loads, as a GEMM kernel should be.
//! Without AVX2 and FMA a portable loop does a multiply and an add per step (the same order,
//! rounded twice), used by every product on that machine.

use rayon::prelude::*;

use super::cpu_dot::{Elem, HAS_AVX2_FMA};

/// Rows per panel: two 8-wide registers.
pub const PANEL: usize = 16;

/// Most tokens one micro-kernel call computes (12 accumulators for one panel).
pub const TOKENS: usize = 6;

/// Multiply-adds a rayon task should have at least (smaller tasks cost more to hand out than
/// they compute).
const MIN_TASK_FMAS: usize = 1 << 17;

/// A weight `[rows, cols]` as panels: panel `p` holds rows `16p..16p + 16` as
/// `[cols][16]`; the last panel is padded with zero rows.
pub struct Panels<E> {
    pub rows: usize,
    pub cols: usize,
    data: Vec<E>, // [rows.div_ceil(16)][cols][16]
}

impl<E: Elem + Default> Panels<E> {
    /// Repack a row-major `[rows, cols]` matrix.
    pub fn pack(rows: usize, cols: usize, row_major: &[E]) -> Panels<E> {
        assert_eq!(
            row_major.len(),
            rows * cols,
            "Panels::pack: [{rows}, {cols}]"
        );
        let mut data = vec![E::default(); rows.div_ceil(PANEL) * cols * PANEL];
        if cols > 0 {
            data.par_chunks_mut(cols * PANEL)
                .enumerate()
                .for_each(|(p, panel)| {
                    for lane in 0..PANEL.min(rows - p * PANEL) {
                        let row = &row_major[(p * PANEL + lane) * cols..][..cols];
                        for (k, &v) in row.iter().enumerate() {
                            panel[k * PANEL + lane] = v;
                        }
                    }
                });
        }
        Panels { rows, cols, data }
    }
}

impl<E: Elem> Panels<E> {
    /// Row `r`, widened to f32.
    pub fn row(&self, r: usize) -> impl Iterator<Item = f32> + '_ {
        let panel = &self.data[r / PANEL * self.cols * PANEL..][..self.cols * PANEL];
        panel[r % PANEL..]
            .iter()
            .step_by(PANEL)
            .take(self.cols)
            .map(|v| v.to_f32())
    }

    fn panels(&self) -> usize {
        self.rows.div_ceil(PANEL)
    }

    /// `out[j * rows + r] = row r · tokens[j]` (`tokens` row-major `[t, cols]`).
    #[cfg(test)]
    pub fn product(&self, tokens: &[f32]) -> Vec<f32> {
        let t = tokens.len().checked_div(self.cols).unwrap_or(0);
        let mut out = vec![0f32; t * self.rows];
        self.product_into(tokens, &mut out, Store::Write);
        out
    }

    /// Row `r` · `tokens[j]` stored by `store` into `out[j * rows + r]` (`tokens` row-major
    /// `[t, cols]`, `out` `[t, rows]`).
    pub fn product_into(&self, tokens: &[f32], out: &mut [f32], store: Store) {
        let (k, rows) = (self.cols, self.rows);
        let t = tokens.len().checked_div(k).unwrap_or(0);
        assert!(
            tokens.len() == t * k && out.len() == t * rows,
            "Panels::product_into: {} tokens of {k} into {} outputs of {rows}",
            tokens.len(),
            out.len()
        );
        if t == 0 || rows == 0 {
            return;
        }
        if let Store::Bias(b) = store {
            assert_eq!(b.len(), rows, "Panels::product_into: bias of {rows}");
        }
        let lanes = |p: usize| PANEL.min(rows - p * PANEL);
        let threads = rayon::current_num_threads();
        if t >= 2 * TOKENS * threads {
            // A prompt: each task takes a block of tokens — whole rows of `out` — through
            // every panel, so the block stays in L2 while the panels stream past; blocks of
            // [`TASK_TOKENS`] share the panels out evenly enough between the threads.
            out.par_chunks_mut(TASK_TOKENS * rows)
                .zip(tokens.par_chunks(TASK_TOKENS * k))
                .for_each(|(out, x)| {
                    task_product(&self.data, k, x, |p, j, y| {
                        let o = &mut out[j * rows + p * PANEL..][..lanes(p)];
                        store.apply(o, p * PANEL, &y[..lanes(p)]);
                    });
                });
            return;
        }
        // Decode: too few tokens to share out, so each task owns whole panels, into
        // [panel][t][16], stored into [t, rows] below.
        let per_panel = t * PANEL;
        let mut by_panel = vec![0f32; self.panels() * per_panel];
        let panels_per_task = MIN_TASK_FMAS.div_ceil(per_panel * k.max(1)).max(1);
        by_panel
            .par_chunks_mut(panels_per_task * per_panel)
            .enumerate()
            .for_each(|(task, dst)| {
                let first = task * panels_per_task;
                let panels = dst.len() / per_panel;
                let w = &self.data[first * k * PANEL..(first + panels) * k * PANEL];
                task_product(w, k, tokens, |p, j, y| {
                    dst[(p * t + j) * PANEL..][..PANEL].copy_from_slice(y);
                });
            });
        for (p, block) in by_panel.chunks(per_panel).enumerate() {
            for (j, y) in block.chunks(PANEL).enumerate() {
                let o = &mut out[j * rows + p * PANEL..][..lanes(p)];
                store.apply(o, p * PANEL, &y[..lanes(p)]);
            }
        }
    }
}

/// Tokens per task of a prompt's product: four micro-kernel calls per panel.
const TASK_TOKENS: usize = 4 * TOKENS;

/// What a product does with each finished output `y` (its whole chain over K, rounded as
/// it ends): a bias or a residual is one addition after it, as if added by a second pass.
#[derive(Clone, Copy)]
pub enum Store<'a> {
    /// `out = y`.
    Write,
    /// `out = y + bias[r]`.
    Bias(&'a [f32]),
    /// `out = out + y` (a residual).
    Add,
}

impl Store<'_> {
    /// One token's outputs of rows `r0..r0 + y.len()`.
    fn apply(self, out: &mut [f32], r0: usize, y: &[f32]) {
        match self {
            Store::Write => out.copy_from_slice(y),
            Store::Bias(b) => {
                for ((o, y), b) in out.iter_mut().zip(y).zip(&b[r0..]) {
                    *o = y + b;
                }
            }
            Store::Add => {
                for (o, y) in out.iter_mut().zip(y) {
                    *o += y;
                }
            }
        }
    }
}

/// The panels `w` (`[panels][k][16]`) times every token of `tokens` (`[t][k]`), each result
/// handed to `emit(panel, token, outputs)`.
fn task_product<E: Elem>(
    w: &[E],
    k: usize,
    tokens: &[f32],
    mut emit: impl FnMut(usize, usize, &[f32; PANEL]),
) {
    let panels = w.len() / (k * PANEL).max(1);
    let t = tokens.len() / k.max(1);
    let panel = |p: usize| &w[p * k * PANEL..][..k * PANEL];
    let token = |j: usize| &tokens[j * k..][..k];
    let mut p = 0;
    while p < panels {
        // Decode-sized passes (one or two tokens) take two panels at a time, so that four
        // chains of FMAs are in flight; longer ones one panel and up to six tokens.
        let two = t <= 2 && p + 1 < panels;
        let mut j = 0;
        while j < t {
            let m = if two { t - j } else { TOKENS.min(t - j) };
            let x: [&[f32]; TOKENS] = std::array::from_fn(|i| token((j + i).min(t - 1)));
            let mut out = [[[0f32; PANEL]; TOKENS]; 2];
            let w2 = [panel(p), panel((p + 1).min(panels - 1))];
            block(&w2[..if two { 2 } else { 1 }], PANEL, k, &x[..m], &mut out);
            for (q, o) in out.iter().enumerate().take(if two { 2 } else { 1 }) {
                for (i, v) in o.iter().enumerate().take(m) {
                    emit(p + q, j + i, v);
                }
            }
            j += m;
        }
        p += if two { 2 } else { 1 };
    }
}

/// `out[q][j][lane] = Σ_{kk < k} w[q][kk · stride + lane] · x[j][kk]` for up to 2 panels
/// and [`TOKENS`] tokens (2 × 2 at most for two panels), each output one chain over `kk` in
/// order from zero. A panel is 16 columns of `k` rows `stride` apart: a weight panel's
/// `[k][16]` (stride 16), or 16 columns of a row-major matrix.
pub fn block<E: Elem>(
    w: &[&[E]],
    stride: usize,
    k: usize,
    x: &[&[f32]],
    out: &mut [[[f32; PANEL]; TOKENS]; 2],
) {
    assert!(
        stride >= PANEL
            && w.iter()
                .all(|p| k == 0 || p.len() >= (k - 1) * stride + PANEL)
            && x.iter().all(|v| v.len() >= k),
        "cpu_gemm::block: panels of {k} × {stride}, tokens of {k}"
    );
    match (w.len(), x.len()) {
        (1, 1) => kernel::<E, 1, 1>(w, stride, k, x, out),
        (1, 2) => kernel::<E, 1, 2>(w, stride, k, x, out),
        (1, 3) => kernel::<E, 1, 3>(w, stride, k, x, out),
        (1, 4) => kernel::<E, 1, 4>(w, stride, k, x, out),
        (1, 5) => kernel::<E, 1, 5>(w, stride, k, x, out),
        (1, 6) => kernel::<E, 1, 6>(w, stride, k, x, out),
        (2, 1) => kernel::<E, 2, 1>(w, stride, k, x, out),
        (2, 2) => kernel::<E, 2, 2>(w, stride, k, x, out),
        (p, t) => panic!("cpu_gemm::block: {p} panels × {t} tokens"),
    }
}

/// [`block`] for `P` panels and `T` tokens (checked by the caller).
fn kernel<E: Elem, const P: usize, const T: usize>(
    w: &[&[E]],
    stride: usize,
    k: usize,
    x: &[&[f32]],
    out: &mut [[[f32; PANEL]; TOKENS]; 2],
) {
    let w: [&[E]; P] = std::array::from_fn(|q| w[q]);
    let x: [&[f32]; T] = std::array::from_fn(|j| x[j]);
    #[cfg(target_arch = "x86_64")]
    if *HAS_AVX2_FMA {
        // SAFETY: the CPU supports AVX2 and FMA (checked above); [`block`] checked that every
        // panel holds (k - 1) × stride + 16 elements and every token k.
        unsafe { kernel_avx2::<E, P, T>(w, stride, k, x, out) };
        return;
    }
    kernel_portable::<E, P, T>(w, stride, k, x, out);
}

#[allow(clippy::needless_range_loop)]
fn kernel_portable<E: Elem, const P: usize, const T: usize>(
    w: [&[E]; P],
    stride: usize,
    k: usize,
    x: [&[f32]; T],
    out: &mut [[[f32; PANEL]; TOKENS]; 2],
) {
    for q in 0..P {
        for j in 0..T {
            let mut acc = [0f32; PANEL];
            for kk in 0..k {
                let wk = &w[q][kk * stride..][..PANEL];
                for lane in 0..PANEL {
                    acc[lane] += wk[lane].to_f32() * x[j][kk];
                }
            }
            out[q][j] = acc;
        }
    }
}

/// # Safety
/// The CPU supports AVX2 and FMA; every panel holds at least `(k - 1) × stride + 16`
/// elements and every token `k`.
// Indices run over the panels, tokens and accumulators together.
#[allow(clippy::needless_range_loop)]
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel_avx2<E: Elem, const P: usize, const T: usize>(
    w: [&[E]; P],
    stride: usize,
    k: usize,
    x: [&[f32]; T],
    out: &mut [[[f32; PANEL]; TOKENS]; 2],
) {
    use std::arch::x86_64::*;
    let wp: [*const E; P] = std::array::from_fn(|q| w[q].as_ptr());
    let xp: [*const f32; T] = std::array::from_fn(|j| x[j].as_ptr());
    let mut acc = [[[_mm256_setzero_ps(); 2]; T]; P];
    for kk in 0..k {
        let wv: [[__m256; 2]; P] = std::array::from_fn(|q| {
            // SAFETY: kk · stride + 16 ≤ (k - 1) · stride + 16 ≤ the panel's length.
            unsafe {
                [
                    E::load8(wp[q].add(kk * stride)),
                    E::load8(wp[q].add(kk * stride + 8)),
                ]
            }
        });
        for j in 0..T {
            // SAFETY: kk < k ≤ the token's length.
            let xb = unsafe { _mm256_broadcast_ss(&*xp[j].add(kk)) };
            for q in 0..P {
                acc[q][j][0] = _mm256_fmadd_ps(wv[q][0], xb, acc[q][j][0]);
                acc[q][j][1] = _mm256_fmadd_ps(wv[q][1], xb, acc[q][j][1]);
            }
        }
    }
    for q in 0..P {
        for j in 0..T {
            // SAFETY: each store writes 8 floats inside a 16-float array.
            unsafe {
                _mm256_storeu_ps(out[q][j].as_mut_ptr(), acc[q][j][0]);
                _mm256_storeu_ps(out[q][j].as_mut_ptr().add(8), acc[q][j][1]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    fn vector(n: usize, salt: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + salt * 104_729) % 2003) as f32 - 1001.0) / 997.0)
            .collect()
    }

    /// Row r · token j as one chain of the kernel's steps.
    fn chain(w: &[f32], x: &[f32]) -> f32 {
        let fused = *HAS_AVX2_FMA;
        w.iter().zip(x).fold(0.0, |acc, (a, b)| {
            if fused {
                a.mul_add(*b, acc)
            } else {
                acc + a * b
            }
        })
    }

    #[test]
    fn every_token_count_gives_each_output_the_same_chain() {
        for (rows, k) in [(1, 5), (16, 16), (20, 37), (35, 64), (48, 576)] {
            let w = vector(rows * k, 1);
            let panels = Panels::pack(rows, k, &w);
            // Up to 13 tokens as decode passes do; 30 and 61 as prompts do, each task a block of
            // tokens when rayon has at most two threads.
            let tokens = vector(61 * k, 2);
            for r in [0, rows / 2, rows - 1] {
                let row: Vec<f32> = panels.row(r).collect();
                assert_eq!(row, w[r * k..(r + 1) * k], "row {r} of [{rows}, {k}]");
            }
            for t in (1..=13).chain([30, 61]) {
                let out = panels.product(&tokens[..t * k]);
                assert_eq!(out.len(), t * rows);
                for j in 0..t {
                    for r in 0..rows {
                        let want = chain(&w[r * k..][..k], &tokens[j * k..][..k]);
                        assert_eq!(
                            out[j * rows + r].to_bits(),
                            want.to_bits(),
                            "[{rows}, {k}], {t} tokens, ({j}, {r})"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_bias_or_a_residual_is_one_addition_after_the_product() {
        let (rows, k) = (37, 24);
        let panels = Panels::pack(rows, k, &vector(rows * k, 5));
        let bias = vector(rows, 6);
        for t in [3, 61] {
            let x = vector(t * k, 7);
            let y = panels.product(&x);
            let mut with_bias = vec![f32::NAN; t * rows];
            panels.product_into(&x, &mut with_bias, Store::Bias(&bias));
            let mut residual = vector(t * rows, 8);
            let before = residual.clone();
            panels.product_into(&x, &mut residual, Store::Add);
            for (i, y) in y.iter().enumerate() {
                assert_eq!(with_bias[i].to_bits(), (y + bias[i % rows]).to_bits());
                assert_eq!(residual[i].to_bits(), (before[i] + y).to_bits());
            }
        }
    }

    #[test]
    fn bf16_panels_equal_panels_of_the_widened_rows() {
        let (rows, k) = (33, 40);
        let w: Vec<bf16> = vector(rows * k, 3)
            .into_iter()
            .map(bf16::from_f32)
            .collect();
        let wide: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
        let x = vector(5 * k, 4);
        let a = Panels::pack(rows, k, &w).product(&x);
        let b = Panels::pack(rows, k, &wide).product(&x);
        assert_eq!(a, b);
    }
}
