//! The planner: which weight groups stay resident, how many slots stream the others, and how
//! long a pass will take.
//!
//! A pass computes the groups in order. A resident group is on the device all along. The
//! others stream: their bytes are copied from host memory into a ring of `slots` equal
//! slots, in pass order, on one copy engine; group i's compute waits for its copy, and a slot
//! is free again when the compute that reads it ends. Copies run ahead into the next pass
//! (the next token or denoising step) as soon as slots free up, so in steady state a pass
//! costs about `max(compute, streamed bytes / h2d bandwidth)`; [`simulate`] plays this
//! cyclic schedule out to predict the time, stalls included.
//!
//! A group larger than a slot (the head of a 152k-token vocabulary is 1.1 GB, a block of
//! Qwen2.5-7B 0.47 GB) streams in pieces, so no single group dictates the slot size. The
//! embedding table stays in host memory (`host_gather`): only the rows of the pass's tokens
//! go to the device (read by the embedding kernel from page-locked host memory, or gathered
//! by the host), as activations, so it is neither resident nor streamed (nor counted in the
//! prediction: tokens × hidden bytes, well under 1 % of a pass).

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use super::compress::Compressed;
use super::size::human_bytes;
use crate::error::{Error, Result};

/// One weight group as the planner sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Group {
    pub label: String,
    pub bytes: usize,
    /// Compute time of the group in one pass, ms: measured on the card, or from the cost
    /// model (FLOPs / TFLOP/s).
    pub compute_ms: f64,
    /// When the group streams in pieces, piece boundaries fall on multiples of this many
    /// bytes (one row of the head's weight, say), so that each piece is computable alone;
    /// the group's bytes when it cannot split.
    pub granule: usize,
    /// Gathered row by row on the host (the embedding): never resident, never streamed.
    pub host_gather: bool,
}

/// How big a streaming slot is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotSize {
    /// The largest group that is not an outlier (over twice the median group size): the
    /// typical block. Outliers stream in pieces.
    Auto,
    Bytes(usize),
}

/// Everything the planner needs. Sizes in bytes.
#[derive(Clone, Debug)]
pub struct PlanRequest {
    /// In pass order.
    pub groups: Vec<Group>,
    /// The VRAM budget: a hard cap on everything allocated on the device.
    pub budget: usize,
    pub kv_cache: usize,
    /// Activations of one pass.
    pub workspace: usize,
    pub cublas_workspace: usize,
    /// Device memory the plan leaves free for what the driver holds beyond the ledger
    /// (kernel modules, cuBLASLt internals, the pool's granularity); 0 where none.
    pub reserve: usize,
    /// Host-to-device bandwidth, GB/s = 1e9 bytes/s.
    pub h2d_gbps: f64,
    pub slot_size: SlotSize,
    /// The groups' tensors encoded for streaming (`--compress`): a streamed piece then
    /// copies its encoded bytes and is decoded on the device before it computes.
    pub compressed: Option<Arc<Compressed>>,
}

/// Where a group lives during a pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    HostGather,
    Resident,
    /// Streamed as `Plan::pieces[range]`.
    Streamed(Range<usize>),
}

/// A contiguous byte range of a streamed group that is copied into one slot and computed on
/// its own. Offsets are into the group's bytes: its tensors concatenated in group order.
#[derive(Clone, Debug, PartialEq)]
pub struct Piece {
    pub group: usize,
    /// Index of this piece within its group.
    pub index: usize,
    pub offset: usize,
    pub bytes: usize,
    /// Its share of the group's compute, ms.
    pub compute_ms: f64,
    /// Bytes its copy moves: `bytes`, or fewer where its tensors come encoded.
    pub copy_bytes: usize,
    /// Time the device takes to decode it, ms (0 when nothing in it is encoded).
    pub decode_ms: f64,
    /// Every share of it is decoded: its compute reads the decode buffer only, so its slot
    /// is free once the decoding has run.
    pub decoded_whole: bool,
}

/// The groups kept on the device, in pass order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResidentSet {
    groups: Vec<usize>,
    bytes: usize,
}

impl ResidentSet {
    pub fn groups(&self) -> &[usize] {
        &self.groups
    }
    pub fn contains(&self, group: usize) -> bool {
        self.groups.binary_search(&group).is_ok()
    }
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    pub fn len(&self) -> usize {
        self.groups.len()
    }
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }
}

/// The predicted timing of a pass, ms.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Prediction {
    /// A pass in steady state: its first pieces were prefetched during the previous pass.
    pub pass_ms: f64,
    /// A first pass, from empty slots.
    pub cold_pass_ms: f64,
    /// Sum of compute over the pass.
    pub compute_ms: f64,
    /// Streamed bytes / h2d bandwidth: the PCIe bound.
    pub copy_ms: f64,
    /// Time compute waits for copies (and their decoding) in a steady pass.
    pub stall_ms: f64,
    /// Decoding of the pass's encoded pieces, on its own lane.
    pub decode_ms: f64,
}

impl Prediction {
    /// The physical bound: max(compute, copy, decode), each lane's work alone.
    pub fn bound_ms(&self) -> f64 {
        self.compute_ms.max(self.copy_ms).max(self.decode_ms)
    }
    /// bound / predicted (1.0 = at the bound).
    pub fn efficiency(&self) -> f64 {
        if self.pass_ms > 0.0 {
            self.bound_ms() / self.pass_ms
        } else {
            1.0
        }
    }
}

/// The outcome of planning.
#[derive(Clone, Debug)]
pub struct Plan {
    pub groups: Vec<Group>,
    /// One per group.
    pub placement: Vec<Placement>,
    pub resident: ResidentSet,
    /// Streamed pieces in pass order.
    pub pieces: Vec<Piece>,
    pub slots: usize,
    /// The most bf16 bytes of a piece.
    pub slot_bytes: usize,
    /// Device bytes of each slot: `slot_bytes`, or the largest encoded piece's layout when
    /// compressed.
    pub slot_device_bytes: usize,
    /// Device bytes of each buffer encoded pieces are decoded into (0 when none are).
    pub decode_bytes: usize,
    /// Decode buffers, used in turn: with two, a piece decodes while the one before it
    /// computes; with one, after it (0 when nothing is encoded).
    pub decode_buffers: usize,
    pub budget: usize,
    pub kv_cache: usize,
    pub workspace: usize,
    pub cublas_workspace: usize,
    pub reserve: usize,
    pub h2d_gbps: f64,
    pub prediction: Prediction,
}

/// One step of a pass, in order: compute of a resident (or host-gathered) group, or a
/// streamed piece.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    Group(usize),
    Piece(usize),
}

impl Plan {
    /// Bytes copied host → device per pass (weights; the gathered embedding rows are
    /// activations and not counted).
    pub fn streamed_bytes(&self) -> usize {
        self.pieces.iter().map(|p| p.copy_bytes).sum()
    }

    /// bf16 bytes of the streamed pieces (as computed on; more than cross the link when
    /// compressed).
    pub fn streamed_bf16_bytes(&self) -> usize {
        self.pieces.iter().map(|p| p.bytes).sum()
    }

    /// Whether any streamed piece comes encoded.
    pub fn compressed(&self) -> bool {
        self.decode_bytes > 0
    }

    /// Everything the plan allocates on the device; never more than `budget`.
    pub fn device_bytes(&self) -> usize {
        self.resident.bytes()
            + self.slots * self.slot_device_bytes
            + self.decode_buffers * self.decode_bytes
            + self.fixed_bytes()
    }

    fn fixed_bytes(&self) -> usize {
        self.kv_cache + self.workspace + self.cublas_workspace + self.reserve
    }

    /// The steps of one pass in order.
    pub fn units(&self) -> Vec<Unit> {
        let mut units = Vec::new();
        for (g, place) in self.placement.iter().enumerate() {
            match place {
                Placement::HostGather | Placement::Resident => units.push(Unit::Group(g)),
                Placement::Streamed(range) => units.extend(range.clone().map(Unit::Piece)),
            }
        }
        units
    }

    /// Copy time of `bytes` at the plan's bandwidth, ms.
    pub fn copy_ms(&self, bytes: usize) -> f64 {
        copy_ms(bytes, self.h2d_gbps)
    }

    /// The pass this plan makes, simulated with `group_compute_ms` (per group; a streamed
    /// group's pieces share it by bytes) and copies at `h2d_gbps`: the planner's prediction,
    /// or, from measured compute and bandwidth, the one to hold a measurement against.
    pub fn predict(&self, group_compute_ms: &[f64], h2d_gbps: f64) -> Prediction {
        let units: Vec<SimUnit> = self
            .units()
            .into_iter()
            .map(|u| match u {
                Unit::Group(g) => SimUnit {
                    compute_ms: group_compute_ms[g],
                    copy_ms: None,
                    decode_ms: 0.0,
                    decoded_whole: false,
                },
                Unit::Piece(k) => {
                    let p = &self.pieces[k];
                    let group = self.groups[p.group].bytes;
                    let share = match group {
                        0 => 1.0,
                        _ => p.bytes as f64 / group as f64,
                    };
                    SimUnit {
                        compute_ms: group_compute_ms[p.group] * share
                            + DECODE_CONTENTION * p.decode_ms,
                        copy_ms: Some(copy_ms(p.copy_bytes, h2d_gbps)),
                        decode_ms: p.decode_ms,
                        decoded_whole: p.decoded_whole,
                    }
                }
            })
            .collect();
        let ends = simulate(&units, self.slots, self.decode_buffers, SIM_PASSES);
        let (last, stall) = ends[SIM_PASSES - 1];
        Prediction {
            pass_ms: last - ends[SIM_PASSES - 2].0,
            cold_pass_ms: ends[0].0,
            compute_ms: group_compute_ms.iter().sum(),
            copy_ms: copy_ms(self.streamed_bytes(), h2d_gbps),
            stall_ms: stall,
            decode_ms: self.pieces.iter().map(|p| p.decode_ms).sum(),
        }
    }
}

/// What a piece's decoding adds to the compute beside it, per ms of decoding: the decoder
/// reads and writes device memory at near its bandwidth on the SMs the GEMMs use, so on its
/// own stream it hides its latency but not its work (H200, Z-Image DiT at 3 GiB: 16 ms of
/// decoding a step made the compute 18 ms longer, bench/NOTES.md).
pub const DECODE_CONTENTION: f64 = 1.0;

fn copy_ms(bytes: usize, h2d_gbps: f64) -> f64 {
    bytes as f64 / (h2d_gbps * 1e6)
}

/// One step for [`simulate`]: compute time, and copy time if it streams through a slot, and
/// decode time if it comes encoded.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SimUnit {
    pub compute_ms: f64,
    pub copy_ms: Option<f64>,
    /// 0 when nothing in it is encoded.
    pub decode_ms: f64,
    /// Its slot is free when its decoding ends (else when its compute ends).
    pub decoded_whole: bool,
}

/// Play the cyclic schedule for `passes` passes and return the end time of each pass and the
/// stall of each, ms.
///
/// Streamed units are copied in order, wrapping into the next pass, into `slots` slots used
/// round robin: copy `j` starts when copy `j-1` has ended and the slot's previous user
/// (streamed unit `j - slots`) has released it — when its compute ended, or its decoding
/// if it was decoded whole. Encoded units decode in order on a lane of their own into
/// `decode_buffers` buffers used round robin: decoding starts when the unit's copy, the
/// decoding before and the compute of the buffer's previous user have ended. The compute of
/// a streamed unit starts when the previous compute has ended and its copy (or decoding)
/// has; the difference is stall. The next pass's compute follows the last of this one
/// directly.
pub fn simulate(
    units: &[SimUnit],
    slots: usize,
    decode_buffers: usize,
    passes: usize,
) -> Vec<(f64, f64)> {
    let streamed: Vec<&SimUnit> = units.iter().filter(|u| u.copy_ms.is_some()).collect();
    assert!(
        streamed.is_empty() || slots > 0,
        "streamed units need at least one slot"
    );
    let decoding = streamed.iter().any(|u| u.decode_ms > 0.0);
    assert!(
        !decoding || decode_buffers > 0,
        "decoded units need at least one decode buffer"
    );
    let mut copy_end: Vec<f64> = Vec::new();
    // Per streamed unit j: when its slot is free again.
    let mut release: Vec<f64> = Vec::new();
    // Per decoded unit, in order: the compute end of the unit that read its buffer.
    let mut buffer_users: Vec<f64> = Vec::new();
    let mut decode_lane = 0.0f64;
    let mut t = 0.0;
    let mut out = Vec::with_capacity(passes);
    for _ in 0..passes {
        let mut stall = 0.0;
        for u in units {
            let Some(_) = u.copy_ms else {
                t += u.compute_ms;
                continue;
            };
            let j = release.len();
            while copy_end.len() <= j {
                let c = copy_end.len();
                let slot_free = if c >= slots { release[c - slots] } else { 0.0 };
                let engine_free = copy_end.last().copied().unwrap_or(0.0);
                let ms = streamed[c % streamed.len()].copy_ms.unwrap_or(0.0);
                copy_end.push(engine_free.max(slot_free) + ms);
            }
            let mut ready = copy_end[j];
            let mut decoded_at = None;
            if u.decode_ms > 0.0 {
                let k = buffer_users.len();
                let buffer_free = if k >= decode_buffers {
                    buffer_users[k - decode_buffers]
                } else {
                    0.0
                };
                decode_lane = ready.max(decode_lane).max(buffer_free) + u.decode_ms;
                ready = decode_lane;
                decoded_at = Some(decode_lane);
            }
            let start = t.max(ready);
            stall += start - t;
            t = start + u.compute_ms;
            if decoded_at.is_some() {
                buffer_users.push(t);
            }
            release.push(match decoded_at {
                Some(d) if u.decoded_whole => d,
                _ => t,
            });
        }
        out.push((t, stall));
    }
    out
}

/// Passes simulated to reach steady state; the last one is reported.
const SIM_PASSES: usize = 8;
/// Most slots tried.
const MAX_SLOTS: usize = 8;

/// The typical group size: the largest group not over twice the median.
fn auto_slot_bytes(sizes: &[usize]) -> usize {
    let mut sorted = sizes.to_vec();
    sorted.sort_unstable();
    let median = sorted[sorted.len() / 2];
    sorted
        .into_iter()
        .filter(|&b| b <= median.saturating_mul(2))
        .max()
        .unwrap_or(median)
}

/// Split `group` into pieces of at most `slot_bytes`, boundaries on its granule.
fn split(g: usize, group: &Group, slot_bytes: usize) -> Result<Vec<Piece>> {
    let granule = group.granule.max(1);
    if granule > slot_bytes {
        return Err(Error::Flag {
            flag: "--slot-size",
            message: format!(
                "{} is smaller than the smallest piece of {} ({}); slots must hold at least that",
                human_bytes(slot_bytes),
                group.label,
                human_bytes(granule)
            ),
        });
    }
    let mut count = group.bytes.div_ceil(slot_bytes).max(1);
    let piece = loop {
        let piece = group.bytes.div_ceil(count).div_ceil(granule) * granule;
        if piece <= slot_bytes {
            break piece;
        }
        count += 1;
    };
    let mut pieces = Vec::new();
    let mut offset = 0;
    while offset < group.bytes || pieces.is_empty() {
        let bytes = piece.min(group.bytes - offset);
        pieces.push(Piece {
            group: g,
            index: pieces.len(),
            offset,
            bytes,
            compute_ms: if group.bytes == 0 {
                group.compute_ms
            } else {
                group.compute_ms * bytes as f64 / group.bytes as f64
            },
            copy_bytes: bytes,
            decode_ms: 0.0,
            decoded_whole: false,
        });
        offset += bytes;
    }
    Ok(pieces)
}

/// Device bytes of one slot and of the decode buffer when pieces are at most `slot_bytes`:
/// `slot_bytes` and none uncompressed; compressed, the largest layout of any device group's
/// pieces (whichever end up streaming) and the largest bf16 piece decoded.
fn slot_memory(req: &PlanRequest, slot_bytes: usize) -> Result<(usize, usize)> {
    let Some(c) = &req.compressed else {
        return Ok((slot_bytes, 0));
    };
    let (mut slot, mut decode) = (0, 0);
    for (g, group) in req.groups.iter().enumerate() {
        if group.host_gather {
            continue;
        }
        for p in split(g, group, slot_bytes)? {
            let layout = c.layout(g, p.offset, p.bytes);
            slot = slot.max(layout.extent);
            decode = decode.max(layout.decoded);
        }
    }
    Ok((slot, decode))
}

/// `k` of the `m` positions `0..m`, spread evenly: one in the middle of each of `k` equal
/// stretches.
fn spread(m: usize, k: usize) -> Vec<usize> {
    (0..k).map(|j| ((2 * j + 1) * m) / (2 * k)).collect()
}

/// `a` before `b`: faster by more than 0.1 %, or as fast and streaming fewer bytes (then
/// fewer slots, then fewer decode buffers).
fn better(a: &Plan, b: &Plan) -> bool {
    let (c, o) = (a.prediction.pass_ms, b.prediction.pass_ms);
    if c < o * (1.0 - 1e-3) {
        true
    } else if c <= o * (1.0 + 1e-3) {
        let key = |p: &Plan| (p.streamed_bytes(), p.slots, p.decode_buffers);
        key(a) < key(b)
    } else {
        false
    }
}

/// Plan a pass: choose resident groups and slots within the budget, predicting the time of
/// each candidate by simulation and keeping the fastest (then the one that streams fewer
/// bytes, then the one with fewer slots). A budget below the minimum is an error that states
/// the minimum.
pub fn plan(req: &PlanRequest) -> Result<Plan> {
    if !(req.h2d_gbps.is_finite() && req.h2d_gbps > 0.0) {
        return Err(Error::Flag {
            flag: "--h2d-gbps",
            message: format!("{} is not a bandwidth; expected GB/s > 0", req.h2d_gbps),
        });
    }
    if let Some(g) = req
        .groups
        .iter()
        .find(|g| !(g.compute_ms.is_finite() && g.compute_ms >= 0.0))
    {
        return Err(Error::Flag {
            flag: "--tflops",
            message: format!(
                "compute time of {} is {} ms; expected ≥ 0",
                g.label, g.compute_ms
            ),
        });
    }
    let fixed = req.kv_cache + req.workspace + req.cublas_workspace + req.reserve;
    let device: Vec<usize> = (0..req.groups.len())
        .filter(|&g| !req.groups[g].host_gather)
        .collect();
    let all_bytes: usize = device.iter().map(|&g| req.groups[g].bytes).sum();
    let base_placement = |resident: &ResidentSet| -> Vec<Placement> {
        (0..req.groups.len())
            .map(|g| {
                if req.groups[g].host_gather {
                    Placement::HostGather
                } else if resident.contains(g) {
                    Placement::Resident
                } else {
                    Placement::Streamed(0..0)
                }
            })
            .collect()
    };

    // `memory`: device bytes of a slot and of a decode buffer (`slot_memory`), the same for
    // every candidate of one slot size; `decode_buffers` of them when anything decodes.
    let make = |resident: ResidentSet,
                slots: usize,
                slot_bytes: usize,
                memory: (usize, usize),
                decode_buffers: usize|
     -> Result<Plan> {
        let mut placement = base_placement(&resident);
        let mut pieces = Vec::new();
        for (g, place) in placement.iter_mut().enumerate() {
            if let Placement::Streamed(range) = place {
                let first = pieces.len();
                pieces.extend(split(g, &req.groups[g], slot_bytes)?);
                *range = first..pieces.len();
            }
        }
        if let Some(c) = &req.compressed {
            for p in &mut pieces {
                let layout = c.layout(p.group, p.offset, p.bytes);
                p.copy_bytes = layout.copy_bytes();
                p.decode_ms = layout.decode_ms(c.speeds);
                p.decoded_whole = layout.decoded_whole();
            }
        }
        let (slot_device_bytes, decode_bytes) = if slots == 0 { (0, 0) } else { memory };
        let decode_buffers = if decode_bytes == 0 { 0 } else { decode_buffers };
        let mut plan = Plan {
            groups: req.groups.clone(),
            placement,
            resident,
            pieces,
            slots,
            slot_bytes: if slots == 0 { 0 } else { slot_bytes },
            slot_device_bytes,
            decode_bytes,
            decode_buffers,
            budget: req.budget,
            kv_cache: req.kv_cache,
            workspace: req.workspace,
            cublas_workspace: req.cublas_workspace,
            reserve: req.reserve,
            h2d_gbps: req.h2d_gbps,
            prediction: Prediction::default(),
        };
        let compute: Vec<f64> = req.groups.iter().map(|g| g.compute_ms).collect();
        plan.prediction = plan.predict(&compute, req.h2d_gbps);
        Ok(plan)
    };

    // Everything fits: nothing streams.
    if req.budget >= fixed + all_bytes {
        let resident = ResidentSet {
            groups: device.clone(),
            bytes: all_bytes,
        };
        return make(resident, 0, 0, (0, 0), 0);
    }

    let slot_bytes = match req.slot_size {
        SlotSize::Bytes(b) if b > 0 => b,
        SlotSize::Bytes(_) => {
            return Err(Error::Flag {
                flag: "--slot-size",
                message: "expected a positive size".into(),
            })
        }
        SlotSize::Auto => {
            let sizes: Vec<usize> = device.iter().map(|&g| req.groups[g].bytes).collect();
            // Groups that cannot split must fit a slot whole.
            let whole = device.iter().map(|&g| req.groups[g].granule).max();
            auto_slot_bytes(&sizes).max(whole.unwrap_or(0))
        }
    };
    let (slot_mem, decode) = slot_memory(req, slot_bytes)?;
    // Two slots, unless everything resident takes less (then that is the minimum).
    let minimum = (fixed + 2 * slot_mem + decode).min(fixed + all_bytes);
    if req.budget < minimum {
        return Err(Error::Flag {
            flag: "--vram",
            message: format!(
                "{} is below the minimum of {} for this model and pass: 2 slots × {}{} + KV cache {} + activation workspace {} + cuBLAS workspace {}{} (everything resident would need {})",
                human_bytes(req.budget),
                human_bytes(minimum),
                human_bytes(slot_mem),
                match decode {
                    0 => String::new(),
                    d => format!(" + decode buffer {}", human_bytes(d)),
                },
                human_bytes(req.kv_cache),
                human_bytes(req.workspace),
                human_bytes(req.cublas_workspace),
                reserve_note(req.reserve),
                human_bytes(fixed + all_bytes),
            ),
        });
    }
    let available = req.budget - fixed;

    // Groups larger than a slot may be made resident whole (every subset of the few there
    // are is tried); the regular ones are chosen evenly spread.
    let (outliers, regular): (Vec<usize>, Vec<usize>) = device
        .iter()
        .partition(|&&g| req.groups[g].bytes > slot_bytes);
    let outlier_sets: Vec<Vec<usize>> = if outliers.len() <= 4 {
        (0..1usize << outliers.len())
            .map(|mask| {
                (0..outliers.len())
                    .filter(|i| mask & (1 << i) != 0)
                    .map(|i| outliers[i])
                    .collect()
            })
            .collect()
    } else {
        vec![Vec::new()]
    };

    // A second decode buffer lets a piece decode while the one before computes; it costs
    // its bytes of residency, so both are tried.
    let buffer_counts: &[usize] = if decode > 0 { &[1, 2] } else { &[0] };
    let mut best: Option<Plan> = None;
    for (slots, &buffers) in (2..=MAX_SLOTS).flat_map(|s| buffer_counts.iter().map(move |b| (s, b)))
    {
        if slots * slot_mem + buffers * decode > available {
            continue;
        }
        let capacity = available - slots * slot_mem - buffers * decode;
        for chosen in &outlier_sets {
            let outlier_bytes: usize = chosen.iter().map(|&g| req.groups[g].bytes).sum();
            if outlier_bytes > capacity {
                continue;
            }
            let room = capacity - outlier_bytes;
            // The most regular groups that fit, evenly spread.
            let mut k = regular.len();
            let picked = loop {
                let picked: Vec<usize> = spread(regular.len(), k)
                    .into_iter()
                    .map(|i| regular[i])
                    .collect();
                let bytes: usize = picked.iter().map(|&g| req.groups[g].bytes).sum();
                if bytes <= room || k == 0 {
                    break picked;
                }
                k -= 1;
            };
            // Also with the smallest of the others added while they fit what is left (a
            // DiT's embedders and final layer: a few MB each, yet each a piece that holds a
            // slot, and the first one of a pass holds it across the gap between passes); both
            // sets are simulated and the faster kept, since more residents in a row can
            // leave the copies idle.
            let mut filled = picked.clone();
            let mut left = room - picked.iter().map(|&g| req.groups[g].bytes).sum::<usize>();
            let mut others: Vec<usize> = regular
                .iter()
                .copied()
                .filter(|g| !picked.contains(g))
                .collect();
            others.sort_by_key(|&g| req.groups[g].bytes);
            for g in others {
                let bytes = req.groups[g].bytes;
                if bytes > left {
                    break;
                }
                filled.push(g);
                left -= bytes;
            }
            let sets = if filled.len() > picked.len() {
                vec![picked, filled]
            } else {
                vec![picked]
            };
            for picked in sets {
                let mut groups: Vec<usize> = chosen.iter().chain(&picked).copied().collect();
                groups.sort_unstable();
                let bytes = groups.iter().map(|&g| req.groups[g].bytes).sum();
                let candidate = make(
                    ResidentSet { groups, bytes },
                    slots,
                    slot_bytes,
                    (slot_mem, decode),
                    buffers,
                )?;
                // More slots than pieces hold nothing.
                if slots > 2 && slots > candidate.pieces.len() {
                    continue;
                }
                if best.as_ref().is_none_or(|b| better(&candidate, b)) {
                    best = Some(candidate);
                }
            }
        }
    }
    Ok(best.expect("the minimum budget admits 2 slots"))
}

impl fmt::Display for Plan {
    /// The plan for people: budget breakdown, resident groups, slots, streamed bytes, and
    /// the prediction against the bound.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Transfers in GB, to go with GB/s; small ones in binary units.
        let gb = |b: usize| {
            if b >= 100_000_000 {
                format!("{:.2} GB", b as f64 / 1e9)
            } else {
                human_bytes(b)
            }
        };
        let p = &self.prediction;
        let slots = if self.slots == 0 {
            "no slots".to_string()
        } else {
            format!(
                "{} slots × {}{}",
                self.slots,
                human_bytes(self.slot_device_bytes),
                match (self.decode_buffers, self.decode_bytes) {
                    (0, _) | (_, 0) => String::new(),
                    (1, d) => format!(" + decode buffer {}", human_bytes(d)),
                    (n, d) => format!(" + {n} decode buffers × {}", human_bytes(d)),
                }
            )
        };
        writeln!(
            f,
            "budget       {} = resident {} + {slots} + KV cache {} + activations {} + cuBLAS {}{} ({} unused)",
            human_bytes(self.budget),
            human_bytes(self.resident.bytes()),
            human_bytes(self.kv_cache),
            human_bytes(self.workspace),
            human_bytes(self.cublas_workspace),
            reserve_note(self.reserve),
            human_bytes(self.budget - self.device_bytes()),
        )?;
        let labels: Vec<&str> = self
            .resident
            .groups()
            .iter()
            .map(|&g| self.groups[g].label.as_str())
            .collect();
        // Counted out of every group, as the model's header line counts them: the host
        // group (the embedding) is neither resident nor streamed.
        writeln!(
            f,
            "resident     {} of {} groups ({}): {}",
            self.resident.len(),
            self.groups.len(),
            human_bytes(self.resident.bytes()),
            if labels.is_empty() {
                "none".to_string()
            } else {
                labels.join(", ")
            },
        )?;
        for (g, place) in self.placement.iter().enumerate() {
            if *place == Placement::HostGather {
                writeln!(
                    f,
                    "host         {}: stays in host memory, only the pass's rows go to the device",
                    self.groups[g].label
                )?;
            }
        }
        let streamed_groups = self
            .placement
            .iter()
            .filter(|p| matches!(p, Placement::Streamed(_)))
            .count();
        if streamed_groups == 0 {
            writeln!(f, "streamed     nothing")?;
        } else {
            writeln!(
                f,
                "streamed     {} in {}, {} per pass{}",
                count(streamed_groups, "group"),
                count(self.pieces.len(), "piece"),
                gb(self.streamed_bytes()),
                if self.compressed() {
                    format!(
                        " (compressed: {:.3} of its {} in bf16)",
                        self.streamed_bytes() as f64 / self.streamed_bf16_bytes().max(1) as f64,
                        gb(self.streamed_bf16_bytes())
                    )
                } else {
                    String::new()
                },
            )?;
        }
        for (g, place) in self.placement.iter().enumerate() {
            if let Placement::Streamed(range) = place {
                if range.len() > 1 {
                    writeln!(
                        f,
                        "             {} ({}) streams in {} pieces of ≤ {}",
                        self.groups[g].label,
                        gb(self.groups[g].bytes),
                        range.len(),
                        human_bytes(self.slot_bytes)
                    )?;
                }
            }
        }
        if streamed_groups == 0 {
            // No copies to wait for: a pass is its compute, and there is no PCIe bound.
            return writeln!(
                f,
                "prediction   {:.1} ms per pass ({:.1} ms cold): compute {:.1} ms, nothing to stream",
                p.pass_ms, p.cold_pass_ms, p.compute_ms,
            );
        }
        writeln!(
            f,
            "prediction   {:.1} ms per pass ({:.1} ms cold): compute {:.1} ms, PCIe bound {:.1} ms ({} at {} GB/s){}, stall {:.1} ms{}",
            p.pass_ms,
            p.cold_pass_ms,
            p.compute_ms,
            p.copy_ms,
            gb(self.streamed_bytes()),
            self.h2d_gbps,
            if p.decode_ms > 0.0 {
                format!(", decoding {:.1} ms", p.decode_ms)
            } else {
                String::new()
            },
            p.stall_ms,
            // A bound that rounds to 0 ms makes any share of it meaningless.
            if p.bound_ms() >= 0.05 {
                format!(", {:.0} % of the bound", 100.0 * p.efficiency())
            } else {
                String::new()
            },
        )
    }
}

/// `"1 group"`, `"3 groups"`.
fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("{n} {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// " + reserve X" where the plan keeps a reserve, else nothing.
fn reserve_note(reserve: usize) -> String {
    match reserve {
        0 => String::new(),
        r => format!(" + reserve {}", human_bytes(r)),
    }
}
