//! The CPU backend's dot product in f32 over sixteen partial sums ([`dot`]: the encoder's
//! and the DiT's attention scores; linear and the decoder's attention go through
//! `cpu_gemm`), and the [`Elem`] loads both use. Every dot is summed the same way — sixteen
//! lanes, lane `i` taking elements `i mod 16` in order, then the lanes added in order, then
//! the elements past the last whole sixteen — so a result does not depend on the batch
//! around it.
//!
//! With AVX2 and FMA each lane is a fused multiply-add; without them a portable loop does a
//! multiply and an add (the same order, rounded twice), used by every dot on that machine.

use std::sync::LazyLock;

use half::bf16;

/// Partial sums per dot.
const LANES: usize = 16;

/// Whether this CPU has AVX2 and FMA (the products of `cpu_gemm` ask too).
pub(super) static HAS_AVX2_FMA: LazyLock<bool> = LazyLock::new(|| {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
});

/// A weight element: f32, or bf16 widened as it is read (exactly: a bf16 is the high half of
/// an f32).
pub trait Elem: Copy + Send + Sync {
    fn to_f32(self) -> f32;
    /// Eight elements from `p`, as f32.
    ///
    /// # Safety
    /// AVX2 is available and `p..p + 8` is readable.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl Elem for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller's contract.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }
}

impl Elem for bf16 {
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const bf16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract; 8 bf16 are one 128-bit load.
        unsafe {
            let half = _mm_loadu_si128(p as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16))
        }
    }
}

/// Σ a·b over the shorter of the two.
pub fn dot<E: Elem>(a: &[E], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let mut out = [[0f32; 1]; 1];
    block::<E, 1, 1, 1>(&[&a[..n]], &[&b[..n]], &mut out);
    out[0][0]
}

/// The dots of `R` rows and `T` tokens, all of one length, into the first `R` × `T` of `out`.
fn block<E: Elem, const R: usize, const T: usize, const TO: usize>(
    rows: &[&[E]],
    tokens: &[&[f32]],
    out: &mut [[f32; TO]],
) {
    let n = rows[0].len();
    assert!(
        rows.len() == R
            && tokens.len() == T
            && rows.iter().all(|v| v.len() == n)
            && tokens.iter().all(|v| v.len() == n),
        "dot_block: every row and token of one length"
    );
    let w: [&[E]; R] = std::array::from_fn(|r| rows[r]);
    let x: [&[f32]; T] = std::array::from_fn(|j| tokens[j]);
    #[cfg(target_arch = "x86_64")]
    if *HAS_AVX2_FMA {
        // SAFETY: the CPU supports AVX2 and FMA (checked above); every slice holds n elements
        // (checked above).
        let lanes = unsafe { lanes_avx2::<E, R, T>(w, x, n) };
        finish(&lanes, w, x, n, out);
        return;
    }
    finish(&lanes_portable::<E, R, T>(w, x, n), w, x, n, out);
}

/// Each dot's lanes added in order, then its elements past the last whole sixteen.
#[allow(clippy::needless_range_loop)]
fn finish<E: Elem, const R: usize, const T: usize, const TO: usize>(
    lanes: &[[[f32; LANES]; T]; R],
    w: [&[E]; R],
    x: [&[f32]; T],
    n: usize,
    out: &mut [[f32; TO]],
) {
    let whole = n / LANES * LANES;
    for r in 0..R {
        for j in 0..T {
            let tail: f32 = w[r][whole..n]
                .iter()
                .zip(&x[j][whole..n])
                .map(|(a, b)| a.to_f32() * b)
                .sum();
            out[r][j] = lanes[r][j].iter().sum::<f32>() + tail;
        }
    }
}

#[allow(clippy::needless_range_loop)]
fn lanes_portable<E: Elem, const R: usize, const T: usize>(
    w: [&[E]; R],
    x: [&[f32]; T],
    n: usize,
) -> [[[f32; LANES]; T]; R] {
    let mut acc = [[[0f32; LANES]; T]; R];
    for c in 0..n / LANES {
        let at = c * LANES;
        for r in 0..R {
            for j in 0..T {
                for i in 0..LANES {
                    acc[r][j][i] += w[r][at + i].to_f32() * x[j][at + i];
                }
            }
        }
    }
    acc
}

/// The sixteen lanes of every dot of the block: two 8-wide registers per dot, each weight
/// and token vector loaded once per sixteen elements for all the dots that use it.
///
/// # Safety
/// The CPU supports AVX2 and FMA; every slice holds at least `n` elements.
// Indices run over the weights, tokens and accumulators together.
#[allow(clippy::needless_range_loop)]
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn lanes_avx2<E: Elem, const R: usize, const T: usize>(
    w: [&[E]; R],
    x: [&[f32]; T],
    n: usize,
) -> [[[f32; LANES]; T]; R] {
    use std::arch::x86_64::*;
    let mut acc = [[[_mm256_setzero_ps(); 2]; T]; R];
    for c in 0..n / LANES {
        let at = c * LANES;
        for h in 0..2 {
            let wv: [__m256; R] = std::array::from_fn(|r| {
                // SAFETY: at + 8h + 8 ≤ n ≤ w[r].len().
                unsafe { E::load8(w[r].as_ptr().add(at + 8 * h)) }
            });
            for j in 0..T {
                // SAFETY: as above, for x[j].
                let xv = unsafe { _mm256_loadu_ps(x[j].as_ptr().add(at + 8 * h)) };
                for r in 0..R {
                    acc[r][j][h] = _mm256_fmadd_ps(wv[r], xv, acc[r][j][h]);
                }
            }
        }
    }
    let mut lanes = [[[0f32; LANES]; T]; R];
    for r in 0..R {
        for j in 0..T {
            // SAFETY: each store writes 8 floats inside a 16-float array.
            unsafe {
                _mm256_storeu_ps(lanes[r][j].as_mut_ptr(), acc[r][j][0]);
                _mm256_storeu_ps(lanes[r][j].as_mut_ptr().add(8), acc[r][j][1]);
            }
        }
    }
    lanes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vector(n: usize, salt: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + salt * 104_729) % 2003) as f32 - 1001.0) / 997.0)
            .collect()
    }

    #[test]
    fn bf16_dots_equal_dots_of_the_widened_row() {
        for n in [3, 16, 40, 576] {
            let a: Vec<bf16> = vector(n, 1).into_iter().map(bf16::from_f32).collect();
            let b = vector(n, 2);
            let wide: Vec<f32> = a.iter().map(|v| v.to_f32()).collect();
            assert_eq!(dot(&a, &b).to_bits(), dot(&wide, &b).to_bits(), "n {n}");
        }
    }
}
