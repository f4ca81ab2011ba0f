//! From an architecture's description to the planner's groups: bytes per group, compute time
//! from FLOPs at a card's stated or measured throughput, and where a group may split.

use super::plan::Group;
use crate::checkpoint::DType;
use crate::model::{Architecture, PassShape};

/// Throughput figures of a card, stated or measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CostModel {
    /// Host-to-device copy bandwidth, GB/s (1e9 bytes/s).
    pub h2d_gbps: f64,
    /// Dense bf16 matrix throughput with f32 accumulation, TFLOP/s (1e12 FLOP/s).
    pub tflops: f64,
    /// Device memory bandwidth, GB/s: a group's compute cannot take less than reading its
    /// weights once.
    pub hbm_gbps: f64,
}

impl CostModel {
    /// A PCIe 4 x16 consumer card, for when nothing is stated.
    pub const ASSUMED: CostModel = CostModel {
        h2d_gbps: 25.0,
        tflops: 80.0,
        hbm_gbps: 1000.0,
    };

    /// Compute time of `flops` that read `bytes` of weights, ms.
    pub fn compute_ms(&self, flops: f64, bytes: usize) -> f64 {
        let math = flops / (self.tflops * 1e9);
        let memory = bytes as f64 / (self.hbm_gbps * 1e6);
        math.max(memory)
    }
}

/// Bytes of each group (pass order) when every weight is stored as `dtype`.
pub fn group_bytes(arch: &dyn Architecture, dtype: DType) -> Vec<usize> {
    arch.groups()
        .iter()
        .map(|g| g.tensors.iter().map(|t| t.numel() * dtype.size()).sum())
        .collect()
}

/// The planner's groups for `arch`: bytes as given (from the checkpoint, or
/// [`group_bytes`]), compute of a pass of `shape` from `cost`; a group whose last tensor
/// splits by rows may stream in pieces of whole rows, any other only whole.
pub fn planner_groups(
    arch: &dyn Architecture,
    bytes: &[usize],
    dtype: DType,
    shape: PassShape,
    cost: &CostModel,
) -> Vec<Group> {
    let flops = arch.pass_cost(shape).flops;
    arch.groups()
        .iter()
        .zip(bytes)
        .zip(flops)
        .map(|((g, &bytes), flops)| Group {
            label: g.label.clone(),
            bytes,
            compute_ms: cost.compute_ms(flops, bytes),
            granule: match g.tensors.split_last() {
                // Pieces are blocks of the last tensor's rows, the tensors before it in the
                // first: boundaries fall on rows when those fill whole rows.
                Some((t, before)) if t.split_rows => {
                    let row = t.shape[1..].iter().product::<usize>() * dtype.size();
                    let before: usize = before.iter().map(|t| t.numel() * dtype.size()).sum();
                    if row > 0 && before % row == 0 {
                        row
                    } else {
                        bytes
                    }
                }
                _ => bytes,
            },
            host_gather: g.host_gather,
        })
        .collect()
}
