//! The two prompt-attention kernels (`attn_*_v1`, `attn_*_v2` in attention_prefill.cu) give
//! the same bits: non-causal (a DiT's samples) at lengths around the tile sizes and at
//! Z-Image's, causal over a KV cache with a chunk that starts mid-sequence, GQA 28/4, a
//! sliding window, head dims 64 and 128. Where no GPU is usable each test prints "SKIPPED:
//! no usable CUDA device: <why>" and passes.

mod common;

use std::io::Write;
use std::ops::Range;

use ferry::backend::cuda::{AttentionKernel, Cuda, CudaTensor};
use ferry::backend::dit::DitOps;
use ferry::backend::{AttentionShape, Backend};

/// `n` values uniform in [-scale, scale) from a xorshift seeded by `seed`.
fn random(n: usize, scale: f32, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// `[rows, cols]` bf16 on the device from f32 (DitOps's upload; `Cuda` has a private one).
fn upload(cuda: &Cuda, data: &[f32], rows: usize, cols: usize) -> CudaTensor {
    DitOps::upload(cuda, data, rows, cols).unwrap()
}

/// Panic unless `v2` equals `v1` bit for bit, saying how many values differ and by how much.
fn assert_same_bits(what: &str, v1: &[f32], v2: &[f32]) {
    assert_eq!(v1.len(), v2.len(), "{what}: lengths");
    let differ: Vec<usize> = (0..v1.len())
        .filter(|&i| v1[i].to_bits() != v2[i].to_bits())
        .collect();
    let worst = differ
        .iter()
        .map(|&i| (v1[i] - v2[i]).abs())
        .fold(0f32, f32::max);
    let _ = writeln!(
        std::io::stderr(),
        "{what}: {} of {} values differ (largest by {worst:e})",
        differ.len(),
        v1.len()
    );
    assert!(
        differ.is_empty(),
        "{what}: v2 differs from v1 at {} of {} values, first at {} ({} vs {}), largest by {worst:e}",
        differ.len(),
        v1.len(),
        differ[0],
        v1[differ[0]],
        v2[differ[0]]
    );
    assert!(v1.iter().all(|x| x.is_finite()), "{what}: not finite");
}

/// Non-causal attention of `samples` (rows of one batch) with each kernel.
fn full(
    cuda: &Cuda,
    kernel: AttentionKernel,
    samples: &[Range<usize>],
    heads: usize,
    hd: usize,
) -> Vec<f32> {
    let rows = samples.last().map_or(0, |r| r.end);
    let width = heads * hd;
    let seed = (rows * 1000 + heads * 10 + hd) as u64;
    let q = upload(cuda, &random(rows * width, 2.0, seed), rows, width);
    let k = upload(cuda, &random(rows * width, 2.0, seed + 1), rows, width);
    let v = upload(cuda, &random(rows * width, 1.0, seed + 2), rows, width);
    cuda.set_attention_kernel(kernel);
    let out = cuda
        .attention_within(&q, &k, &v, samples, heads, hd)
        .unwrap();
    cuda.to_host(&out).unwrap()
}

#[test]
fn full_attention_v2_is_v1_bit_for_bit() {
    let Some(cuda) = common::gpu("full_attention_v2_is_v1_bit_for_bit", None) else {
        return;
    };
    let one = |t: usize| -> Vec<Range<usize>> { std::iter::once(0..t).collect() };
    let cases: Vec<(Vec<Range<usize>>, usize, usize)> = vec![
        (one(1), 30, 128),
        (one(63), 30, 128),
        (one(64), 30, 128),
        (one(65), 30, 128),
        (one(200), 30, 128),
        (one(4224), 30, 128),
        // Two samples of a batch, each attending to its own rows only.
        (vec![0..129, 129..329], 24, 128),
        (one(65), 8, 64),
        (one(300), 8, 64),
    ];
    for (samples, heads, hd) in cases {
        let what = format!("full attention {samples:?} × {heads} heads of {hd}");
        let v1 = full(&cuda, AttentionKernel::V1, &samples, heads, hd);
        let v2 = full(&cuda, AttentionKernel::V2, &samples, heads, hd);
        assert_same_bits(&what, &v1, &v2);
    }
}

/// Causal attention of prompt chunks `chunks` (lengths, one after the other over one cache)
/// with `kernel`: each chunk's output rows.
fn causal(
    cuda: &Cuda,
    kernel: AttentionKernel,
    shape: AttentionShape,
    chunks: &[usize],
) -> Vec<Vec<f32>> {
    let total: usize = chunks.iter().sum();
    let (hd, heads, kv_heads) = (shape.head_dim, shape.num_heads, shape.num_kv_heads);
    let seed = (total * 1000 + heads * 10 + kv_heads) as u64;
    cuda.set_attention_kernel(kernel);
    let mut cache = cuda.kv_cache(1, shape, total).unwrap();
    let mut outs = Vec::new();
    let mut pos0 = 0;
    for (i, &t) in chunks.iter().enumerate() {
        let s = seed + 10 * i as u64;
        let q = upload(cuda, &random(t * heads * hd, 2.0, s), t, heads * hd);
        let k = upload(
            cuda,
            &random(t * kv_heads * hd, 2.0, s + 1),
            t,
            kv_heads * hd,
        );
        let v = upload(
            cuda,
            &random(t * kv_heads * hd, 1.0, s + 2),
            t,
            kv_heads * hd,
        );
        let mut out = cuda.activation(t, heads * hd).unwrap();
        cuda.attention(&q, &k, &v, 0..t, &mut cache, 0, pos0, shape, &mut out)
            .unwrap();
        outs.push(cuda.to_host(&out).unwrap());
        pos0 += t;
    }
    outs
}

#[test]
fn causal_attention_v2_is_v1_bit_for_bit() {
    let Some(cuda) = common::gpu("causal_attention_v2_is_v1_bit_for_bit", None) else {
        return;
    };
    let shape = |heads, kv_heads, head_dim, sliding_window| AttentionShape {
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim,
        sliding_window,
    };
    // Chunks after the first start mid-sequence (pos0 > 0); 9 rows is the least that takes
    // the prompt kernel rather than decode's.
    let cases = [
        (shape(28, 4, 128, None), vec![300, 200]),
        (shape(28, 4, 128, None), vec![9, 64, 65, 127, 129]),
        (shape(28, 4, 128, None), vec![4096]),
        (shape(8, 8, 128, Some(100)), vec![300, 137]),
        (shape(8, 2, 128, Some(64)), vec![700]),
        (shape(9, 3, 64, None), vec![257, 70]),
        (shape(9, 3, 64, Some(50)), vec![400]),
    ];
    for (shape, chunks) in cases {
        let v1 = causal(&cuda, AttentionKernel::V1, shape, &chunks);
        let v2 = causal(&cuda, AttentionKernel::V2, shape, &chunks);
        let mut pos0 = 0;
        for (i, (a, b)) in v1.iter().zip(&v2).enumerate() {
            let what = format!(
                "causal {}/{} heads of {}, window {:?}, rows {pos0}..{}",
                shape.num_heads,
                shape.num_kv_heads,
                shape.head_dim,
                shape.sliding_window,
                pos0 + chunks[i]
            );
            assert_same_bits(&what, a, b);
            pos0 += chunks[i];
        }
    }
}
