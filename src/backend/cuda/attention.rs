//! Which kernel of `kernels/attention_prefill.cu` runs a prompt's causal attention or a DiT
//! sample's full attention, and the geometry of its launch. v2 (128 query rows a block) is
//! 1.1–1.3× v1 where its grid fills the card (H200, bench/NOTES.md); v1 stays for head dims
//! over 128 and for grids too small for v2. `FERRY_ATTENTION=v1|v2|auto` (default auto) picks,
//! read once when the backend is made. Both give bit-identical outputs (see the kernel file),
//! so the choice is speed only.

use crate::error::{Error, Result};

/// Keys per tile (BN in the kernel), the same in both variants.
const KEY_TILE: usize = 64;

/// The prompt-attention kernel to run (`FERRY_ATTENTION`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionKernel {
    /// `attn_*_v1`: 64 query rows a block, 16 a warp (the kernel before v2).
    V1,
    /// `attn_*_v2`: 128 query rows a block, 32 a warp; head dims up to 128 (v1 beyond).
    V2,
    /// v2 where its grid fills the GPU once over (two blocks an SM), else v1: a short prompt
    /// gets twice as many blocks from v1.
    Auto,
}

impl AttentionKernel {
    /// `FERRY_ATTENTION`: `v1`, `v2` or `auto` (unset or empty: auto).
    pub fn from_env() -> Result<AttentionKernel> {
        let value = std::env::var("FERRY_ATTENTION").unwrap_or_default();
        match value.as_str() {
            "" | "auto" => Ok(AttentionKernel::Auto),
            "v1" => Ok(AttentionKernel::V1),
            "v2" => Ok(AttentionKernel::V2),
            other => Err(Error::Flag {
                flag: "FERRY_ATTENTION",
                message: format!("{other:?}: expected v1, v2 or auto"),
            }),
        }
    }
}

/// A variant as built: what the kernel names end with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    V1,
    V2,
}

impl Variant {
    /// The variant of kernel `name` (`attn_prefill_v1`, `attn_full_v2`, …).
    fn of(name: &str) -> Variant {
        if name.ends_with("_v2") {
            Variant::V2
        } else {
            Variant::V1
        }
    }

    /// Query rows a block (BM, BM2 in the kernel).
    fn rows(self) -> usize {
        match self {
            Variant::V1 => 64,
            Variant::V2 => 128,
        }
    }

    fn name(self, causal: bool) -> &'static str {
        match (self, causal) {
            (Variant::V1, true) => "attn_prefill_v1",
            (Variant::V1, false) => "attn_full_v1",
            (Variant::V2, true) => "attn_prefill_v2",
            (Variant::V2, false) => "attn_full_v2",
        }
    }
}

/// v2 is built for head dims up to 128 (its accumulator takes head_dim registers a thread).
fn v2_builds(head_dim: usize) -> bool {
    head_dim <= 128
}

/// Every kernel [`launch`] may pick at `head_dim` (to build ahead of the first pass).
pub(super) fn kernels(causal: bool, head_dim: usize) -> Vec<&'static str> {
    let mut names = vec![Variant::V1.name(causal)];
    if v2_builds(head_dim) {
        names.push(Variant::V2.name(causal));
    }
    names
}

/// Bytes of dynamic shared memory kernel `name` takes at `head_dim`: Q's rows and two stages
/// of K and V tiles, each row padded by 8 bf16. At 128: 87040 (v1), 104448 (v2).
pub(super) fn smem_bytes(name: &str, head_dim: usize) -> usize {
    (Variant::of(name).rows() + 4 * KEY_TILE) * (head_dim + 8) * 2
}

/// One launch of a prompt-attention kernel over `t` query rows of `heads` heads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Launch {
    pub name: &'static str,
    /// (blocks of query rows, heads, 1)
    pub grid: (u32, u32, u32),
    /// Threads a block: 4 warps in both variants.
    pub block: u32,
    pub smem_bytes: u32,
}

/// The kernel `choice` resolves to for this shape, and its geometry: grid (ceil(t / rows a
/// block), heads), 128 threads, [`smem_bytes`].
pub(super) fn launch(
    choice: AttentionKernel,
    causal: bool,
    t: usize,
    heads: usize,
    head_dim: usize,
    multiprocessors: u32,
) -> Launch {
    let fills_gpu = t.div_ceil(Variant::V2.rows()) * heads >= 2 * multiprocessors as usize;
    let variant = match choice {
        AttentionKernel::V2 if v2_builds(head_dim) => Variant::V2,
        AttentionKernel::Auto if v2_builds(head_dim) && fills_gpu => Variant::V2,
        _ => Variant::V1,
    };
    let name = variant.name(causal);
    Launch {
        name,
        grid: (t.div_ceil(variant.rows()) as u32, heads as u32, 1),
        block: 128,
        smem_bytes: smem_bytes(name, head_dim) as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An H100's or H200's multiprocessors.
    const SMS: u32 = 132;

    #[test]
    fn geometry_of_each_variant() {
        // Z-Image's attention: 4224 rows, 30 heads of 128.
        let v1 = launch(AttentionKernel::V1, false, 4224, 30, 128, SMS);
        assert_eq!(
            v1,
            Launch {
                name: "attn_full_v1",
                grid: (66, 30, 1),
                block: 128,
                smem_bytes: 87040,
            }
        );
        let v2 = launch(AttentionKernel::V2, false, 4224, 30, 128, SMS);
        assert_eq!(
            v2,
            Launch {
                name: "attn_full_v2",
                grid: (33, 30, 1),
                block: 128,
                smem_bytes: 104448,
            }
        );
        // Two v2 blocks fit an SM's 227 KiB of shared memory (less 1 KiB each the system keeps).
        assert!(2 * (v2.smem_bytes as usize + 1024) <= 227 * 1024);
        assert_eq!(launch(AttentionKernel::Auto, false, 4224, 30, 128, SMS), v2);
    }

    #[test]
    fn auto_keeps_v1_for_short_prompts_and_wide_heads() {
        // 7B prefill of 4096 tokens: 32 · 28 blocks of v2 fill 132 SMs; 512 tokens do not.
        let long = launch(AttentionKernel::Auto, true, 4096, 28, 128, SMS);
        assert_eq!((long.name, long.grid), ("attn_prefill_v2", (32, 28, 1)));
        let short = launch(AttentionKernel::Auto, true, 512, 28, 128, SMS);
        assert_eq!((short.name, short.grid), ("attn_prefill_v1", (8, 28, 1)));
        // Forced v2 holds where it is built; head dim 256 is v1 whatever is asked.
        assert_eq!(
            launch(AttentionKernel::V2, true, 512, 28, 128, SMS).name,
            "attn_prefill_v2"
        );
        for choice in [AttentionKernel::V2, AttentionKernel::Auto] {
            let wide = launch(choice, true, 8192, 32, 256, SMS);
            assert_eq!(wide.name, "attn_prefill_v1");
            assert_eq!(wide.smem_bytes as usize, (64 + 256) * 264 * 2);
        }
    }
}
