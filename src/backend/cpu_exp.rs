//! e^x for the CPU backend's attention softmax and the MLP's SiLU, written once as plain
//! f32 steps without branches, which the compiler turns into eight lanes at a time where the
//! CPU has AVX2 and FMA. Each element's result depends only on its input — the same steps
//! whether it sits in a vector or in a row's last few — so a token's softmax and SiLU do
//! not depend on the batch around it; the softmax's sum has a fixed order given the row's
//! length ([`softmax`]).
//!
//! e^x = 2^n · e^r with n = round(x · log2 e) and r = x − n · ln 2 (ln 2 in two parts, each
//! step one FMA), |r| ≤ ln 2 / 2; e^r = 1 + r + r² · p(r), p of degree 5 (the minimax
//! coefficients of Cephes' expf). Within 2 ulp of the exact value over the range; below
//! [`LO`] the result is 0, above [`HI`] infinity, NaN stays NaN.

use super::cpu_dot::HAS_AVX2_FMA;

const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// ln 2 = LN2_HI + LN2_LO, LN2_HI with few enough bits that n · LN2_HI is exact.
const LN2_HI: f32 = 0.693_359_4; // 0.693359375 exactly
const LN2_LO: f32 = -2.121_944_4e-4;
/// p(r), highest power first.
const P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];
/// ln 2^-126: below it e^x is under the smallest normal f32 and taken as 0.
const LO: f32 = -87.336_55;
/// Above it n would pass 127; e^x is taken as infinity (e^88 ≈ 1.7e38, f32's max 3.4e38).
const HI: f32 = 88.0;

/// e^x (see the module's header).
#[inline(always)]
fn exp(x: f32) -> f32 {
    let c = x.clamp(LO, HI); // NaN stays NaN
    let n = (c * LOG2_E).round_ties_even();
    let r = (-n).mul_add(LN2_HI, c);
    let r = (-n).mul_add(LN2_LO, r);
    let p = P[1..].iter().fold(P[0], |p, &k| p.mul_add(r, k));
    let e_r = p.mul_add(r * r, r) + 1.0;
    // 2^n from its exponent bits; n in -126..=127.
    let two_n = f32::from_bits(((n as i32 + 127) as u32) << 23);
    let y = e_r * two_n;
    if x < LO {
        0.0
    } else if x > HI {
        f32::INFINITY
    } else {
        y
    }
}

/// Lanes of the softmax's sum.
const LANES: usize = 8;

/// `row = e^(row − max) / Σ e^(row − max)`; Σ over [`LANES`] partial sums (element `i` into
/// lane `i mod 8`, in order), then the lanes added in order.
pub fn softmax(row: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if *HAS_AVX2_FMA {
        // SAFETY: the CPU supports AVX2 and FMA (checked above).
        unsafe { softmax_avx2(row) };
        return;
    }
    softmax_portable(row);
}

/// `gate = silu(gate) · up = gate / (1 + e^−gate) · up`, element by element.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(
        gate.len(),
        up.len(),
        "silu_mul: {} vs {}",
        gate.len(),
        up.len()
    );
    #[cfg(target_arch = "x86_64")]
    if *HAS_AVX2_FMA {
        // SAFETY: the CPU supports AVX2 and FMA (checked above).
        unsafe { silu_mul_avx2(gate, up) };
        return;
    }
    silu_mul_portable(gate, up);
}

#[inline(always)]
fn softmax_portable(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut lanes = [0f32; LANES];
    for chunk in row.chunks_mut(LANES) {
        for (s, lane) in chunk.iter_mut().zip(&mut lanes) {
            *s = exp(*s - max);
            *lane += *s;
        }
    }
    let sum: f32 = lanes.iter().sum();
    for s in row.iter_mut() {
        *s /= sum;
    }
}

#[inline(always)]
fn silu_mul_portable(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + exp(-*g)) * u;
    }
}

/// [`softmax_portable`] compiled for AVX2 and FMA (the same steps, eight lanes at a time).
///
/// # Safety
/// The CPU supports AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_avx2(row: &mut [f32]) {
    softmax_portable(row);
}

/// [`silu_mul_portable`] compiled for AVX2 and FMA.
///
/// # Safety
/// The CPU supports AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_avx2(gate: &mut [f32], up: &[f32]) {
    silu_mul_portable(gate, up);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_f64() {
        let mut worst = 0i64;
        for i in 0..200_000 {
            let x = LO + (HI - LO) * i as f32 / 200_000.0;
            let want = (x as f64).exp() as f32;
            worst = worst.max((exp(x).to_bits() as i64 - want.to_bits() as i64).abs());
        }
        assert!(worst <= 2, "{worst} ulp");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn each_element_is_the_same_wherever_it_sits_in_a_row() {
        let xs: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin() * 9.0).collect();
        let (mut whole, mut up) = (xs.clone(), vec![1.5f32; 37]);
        up[3] = -2.0;
        silu_mul(&mut whole, &up);
        for (i, &x) in xs.iter().enumerate() {
            let mut one = [x];
            silu_mul(&mut one, &up[i..i + 1]);
            assert_eq!(one[0].to_bits(), whole[i].to_bits(), "element {i}");
            assert_eq!(whole[i].to_bits(), (x / (1.0 + exp(-x)) * up[i]).to_bits());
        }
    }

    #[test]
    fn softmax_sums_to_one_in_lanes() {
        let mut row: Vec<f32> = (0..21).map(|i| (i as f32 * 0.7).cos() * 5.0).collect();
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = row.iter().map(|&x| exp(x - max)).collect();
        let mut lanes = [0f32; LANES];
        for (i, v) in e.iter().enumerate() {
            lanes[i % LANES] += v;
        }
        let sum: f32 = lanes.iter().sum();
        softmax(&mut row);
        for (p, e) in row.iter().zip(&e) {
            assert_eq!(p.to_bits(), (e / sum).to_bits());
        }
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }
}
