//! Random weights at disk speed. Element `j` of a tensor is a pure function of (seed, tensor
//! name, j): 16 bits of a splitmix64 hash of the element's counter pick a value from a
//! 65536-entry table of normal quantiles. No generator state is carried between elements, so
//! any range of a tensor is filled independently (in parallel, in any order) with the same
//! result.

use half::bf16;
use rayon::prelude::*;

use crate::checkpoint::DType;

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// The splitmix64 finalizer: a bijective mix of 64 bits.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The stream of values of one tensor: a key from the seed and the tensor's name.
pub fn tensor_key(seed: u64, name: &str) -> u64 {
    // FNV-1a of the name, then mixed with the seed.
    let h = name.bytes().fold(0xCBF2_9CE4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3)
    });
    mix(mix(seed ^ GOLDEN) ^ h)
}

/// Whether the tensor `name` of `shape` is a norm's scale, drawn near one: a one-dimensional
/// `….weight` in every model synth writes (Llama's RMSNorms and q/k norms, the DiTs'
/// RMSNorms, the Flux VAE's GroupNorms), and the `….gamma` of the Qwen-Image VAE's RMS norms
/// (`[c, 1, 1, 1]` or `[c, 1, 1]`). Every other tensor is centred on 0.
pub fn is_norm_scale(name: &str, shape: &[usize]) -> bool {
    shape.len() == 1 && name.ends_with(".weight") || name.ends_with(".gamma")
}

/// Values of a normal distribution `mean + std·z`, quantized to 65536 equally likely values
/// (the quantiles at (i + ½)/65536), rounded to bf16; `f32` holds the same values widened, so
/// an f32 checkpoint computes exactly what its bf16 twin does.
pub struct Table {
    bf16: Vec<u16>, // bits
    f32: Vec<f32>,
}

impl Table {
    pub fn normal(mean: f32, std: f32) -> Table {
        let bf16: Vec<u16> = (0..1usize << 16)
            .map(|i| {
                let z = normal_quantile((i as f64 + 0.5) / 65536.0);
                bf16::from_f64(mean as f64 + std as f64 * z).to_bits()
            })
            .collect();
        let f32 = bf16.iter().map(|&b| bf16::from_bits(b).to_f32()).collect();
        Table { bf16, f32 }
    }

    /// Fill `out` (the bytes of elements `first..` of a tensor of `dtype`) from the stream
    /// `key`. `first` must be a multiple of 4 and `out` aligned for `dtype`.
    pub fn fill(&self, dtype: DType, key: u64, first: usize, out: &mut [u8]) {
        // Elements per parallel task; a multiple of 4 (one hash gives 4 elements).
        const TASK: usize = 1 << 16;
        assert_eq!(first % 4, 0, "fills start at a multiple of 4 elements");
        match dtype {
            DType::BF16 => {
                let out: &mut [u16] = bytemuck::cast_slice_mut(out);
                out.par_chunks_mut(TASK)
                    .enumerate()
                    .for_each(|(i, o)| fill_from(&self.bf16, key, first + i * TASK, o));
            }
            DType::F32 => {
                let out: &mut [f32] = bytemuck::cast_slice_mut(out);
                out.par_chunks_mut(TASK)
                    .enumerate()
                    .for_each(|(i, o)| fill_from(&self.f32, key, first + i * TASK, o));
            }
            DType::F16 | DType::Ggml(_) => unreachable!("synth writes bf16 or f32"),
        }
    }
}

fn fill_from<T: Copy>(table: &[T], key: u64, first: usize, out: &mut [T]) {
    let word0 = (first / 4) as u64;
    for (w, quad) in out.chunks_mut(4).enumerate() {
        let bits = mix(key.wrapping_add((word0 + w as u64).wrapping_mul(GOLDEN)));
        for (lane, v) in quad.iter_mut().enumerate() {
            *v = table[(bits >> (16 * lane)) as u16 as usize];
        }
    }
}

/// The standard normal quantile Φ⁻¹(p) for 0 < p < 1, by Acklam's rational approximation
/// (relative error below 1.2e-9, far finer than bf16).
fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969683028665376e1,
        2.209460984245205e2,
        -2.759285104469687e2,
        1.38357751867269e2,
        -3.066479806614716e1,
        2.506628277459239e0,
    ];
    const B: [f64; 5] = [
        -5.447609879822406e1,
        1.615858368580409e2,
        -1.556989798598866e2,
        6.680131188771972e1,
        -1.328068155288572e1,
    ];
    const C: [f64; 6] = [
        -7.784894002430293e-3,
        -3.223964580411365e-1,
        -2.400758277161838e0,
        -2.549732539343734e0,
        4.374664141464968e0,
        2.938163982698783e0,
    ];
    const D: [f64; 4] = [
        7.784695709041462e-3,
        3.224671290700398e-1,
        2.445134137142996e0,
        3.754408661907416e0,
    ];
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    const P_LOW: f64 = 0.02425;
    if p < P_LOW {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - P_LOW {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_normal() {
        let t = Table::normal(0.0, 1.0);
        let n = t.f32.len() as f64;
        let mean = t.f32.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = t
            .f32
            .iter()
            .map(|&x| (x as f64 - mean).powi(2))
            .sum::<f64>()
            / n;
        assert!(mean.abs() < 1e-3, "mean {mean}");
        assert!((var.sqrt() - 1.0).abs() < 0.01, "std {}", var.sqrt());
        assert!((normal_quantile(0.975) - 1.959964).abs() < 1e-5);
    }

    #[test]
    fn ranges_fill_independently() {
        let t = Table::normal(0.0, 0.02);
        let key = tensor_key(7, "w");
        let mut whole = vec![0u16; 1000];
        t.fill(DType::BF16, key, 0, bytemuck::cast_slice_mut(&mut whole));
        let mut tail = vec![0u16; 600];
        t.fill(DType::BF16, key, 400, bytemuck::cast_slice_mut(&mut tail));
        assert_eq!(&whole[400..], &tail[..]);
        assert_ne!(tensor_key(7, "w"), tensor_key(8, "w"));
    }
}
