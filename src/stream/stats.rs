//! What one streamed pass did, as the engine measured it: for `--stats`, `--json` and the
//! benchmarks.

/// What one pass did, from the device's clock (ms) and its memory figures.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PassStats {
    /// From the first group's start to the end of the head, on the compute stream.
    pub pass_ms: f64,
    /// Time the compute stream waited for copies.
    pub stall_ms: f64,
    /// pass − stall (decoding included; `group_compute_ms` leaves it out).
    pub compute_ms: f64,
    /// Time the compute stream spent decoding compressed pieces.
    pub decode_ms: f64,
    /// Time the copy stream spent copying this pass's pieces.
    pub copy_ms: f64,
    pub streamed_bytes: usize,
    /// streamed bytes / copy time.
    pub achieved_gbps: f64,
    /// max(compute, streamed bytes / measured H2D GB/s).
    pub bound_ms: f64,
    /// bound / pass.
    pub efficiency: f64,
    /// Device memory ferry holds per the driver (cuMemGetInfo; pooled, so the peak so far).
    pub device_bytes: usize,
    /// Most bytes the budget's ledger saw allocated at once.
    pub allocated_peak: usize,
    /// Compute time of each group of the pass, ms (pieces of a group summed).
    pub group_compute_ms: Vec<f64>,
}
