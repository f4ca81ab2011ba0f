//! GGUF's quantized blocks streamed as the file stores them: a tensor held as ggml blocks
//! ([`DType::Ggml`]) crosses the link as its blocks, whole rows at a time, and the device
//! dequantizes them (f32 arithmetic as ggml's, then rounded to the dtype the device computes
//! in) before the group computes. A Q4_K matrix moves 0.28 of its bf16 bytes.
//!
//! A row is whole blocks, so any run of rows is a contiguous run of blocks: a share of rows
//! is one copy, and its decoder needs only the type, where the blocks lie and how many
//! elements they hold.

use std::ops::Range;
use std::sync::Arc;

use half::bf16;
use rayon::prelude::*;

use super::compress::{align_up, PartCopy};
use crate::checkpoint::{dequantize, DType, GgmlType, HostTensor, Storage};

/// A tensor's ggml blocks, where they lie in host memory.
#[derive(Clone)]
pub struct BlockTensor {
    pub name: String,
    pub ty: GgmlType,
    pub numel: usize,
    /// Elements per row (whole blocks).
    pub row: usize,
    pub storage: Arc<Storage>,
    /// Offset of the first block in `storage`.
    at: usize,
}

/// What a dequantizer needs: the type, the slot offset of the share's first block, and its
/// number of elements (whole blocks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockDecode {
    pub ty: GgmlType,
    pub src: usize,
    pub numel: usize,
}

impl BlockDecode {
    /// Bytes of the share's blocks.
    pub fn bytes(&self) -> usize {
        DType::Ggml(self.ty).bytes(self.numel)
    }
}

impl BlockTensor {
    /// The blocks of `t`, if it is held as blocks.
    pub fn of(t: &HostTensor) -> Option<BlockTensor> {
        let DType::Ggml(ty) = t.dtype else {
            return None;
        };
        let bytes = t.bytes();
        let base = t.storage().bytes().as_ptr() as usize;
        Some(BlockTensor {
            name: t.name.clone(),
            ty,
            numel: t.numel(),
            row: *t.shape.last().unwrap_or(&1),
            storage: t.storage().clone(),
            at: bytes.as_ptr() as usize - base,
        })
    }

    /// Bytes of all its blocks.
    pub fn encoded_bytes(&self) -> usize {
        DType::Ggml(self.ty).bytes(self.numel)
    }

    /// Lay the elements `elements` (whole rows) out in a slot at the first multiple of
    /// `align` from `dst`: the copy and the decoder's arguments, and the first byte past
    /// them. `None` when `elements` is not whole rows.
    pub fn place(
        &self,
        elements: Range<usize>,
        dst: usize,
        align: usize,
    ) -> Option<(PartCopy, BlockDecode, usize)> {
        let row = self.row.max(1);
        if elements.start % row != 0 || elements.end % row != 0 || elements.end > self.numel {
            return None;
        }
        let dtype = DType::Ggml(self.ty);
        let (src, len) = (
            self.at + dtype.bytes(elements.start),
            dtype.bytes(elements.len()),
        );
        let dst = align_up(dst, align);
        let decode = BlockDecode {
            ty: self.ty,
            src: dst,
            numel: elements.len(),
        };
        Some((
            PartCopy { src, len, dst },
            decode,
            align_up(dst + len, align),
        ))
    }
}

/// Elements dequantized per parallel task on the host.
const TASK_BLOCKS: usize = 1024;

/// Dequantize a share laid out in `slot` into f32 `out` (the CPU's decoder: ggml's own
/// arithmetic, [`dequantize`]).
pub fn decode_f32(slot: &[u8], d: &BlockDecode, out: &mut [f32]) {
    let blocks = &slot[d.src..d.src + d.bytes()];
    let (per_block, block_bytes) = (d.ty.block_size(), d.ty.type_size());
    out[..d.numel]
        .par_chunks_mut(TASK_BLOCKS * per_block)
        .zip(blocks.par_chunks(TASK_BLOCKS * block_bytes))
        .for_each(|(y, x)| dequantize(d.ty, x, y));
}

/// Dequantize a share into bf16 bits, rounded to nearest even from ggml's f32 values: what the
/// GPU's dequantizer (`backend/cuda/kernels/dequantize.cu`) must write, bit for bit.
pub fn decode_bf16(slot: &[u8], d: &BlockDecode, out: &mut [u16]) {
    let mut values = vec![0f32; d.numel];
    decode_f32(slot, d, &mut values);
    for (o, v) in out.iter_mut().zip(values) {
        *o = bf16::from_f32(v).to_bits();
    }
}
