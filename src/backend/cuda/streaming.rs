//! The CUDA half of the streaming engine: the host tier (the checkpoint's memory page-locked
//! with the driver), a [`CopyEngine`] over one copy stream and a ring of slots, and
//! [`StreamedWeights`], which hands the model its weights group by group — resident groups as
//! they are, streamed ones as views into the slot their copy went to — with per-pass stats.
//!
//! Nothing here blocks the host inside a pass: the compute stream waits for a slot's copy
//! event, the copy stream waits for the slot's release event, both queue-to-queue (the
//! contract is in [`crate::stream::schedule`]).

use std::sync::{Arc, Mutex};

use cudarc::driver::sys as cu;
use cudarc::driver::{CudaContext, CudaEvent, CudaStream};
use half::bf16;

use super::{Cuda, CudaWeight, DevBuf, WeightStorage};
use crate::backend::Backend;
use crate::checkpoint::{Checkpoint, DType, HostTensor, Storage};
use crate::error::{Error, Result};
use crate::model::{Llama, Weights};
use crate::stream::budget::BudgetTracker;
use crate::stream::cost::{llama_groups, CostModel, PassShape, CUBLAS_WORKSPACE};
use crate::stream::plan::{
    simulate, Piece, Placement, Plan, PlanRequest, Prediction, SimUnit, SlotSize, Unit,
};
use crate::stream::schedule::{CopyEngine, Streamer};
use crate::stream::timeline::{Lane, TimelineCapture, TimelineEvent};
use crate::stream::Purpose;

/// Where in a slot each tensor's share of a piece starts: a multiple of this many bytes, so
/// that a weight in a slot is as aligned as one in its own allocation (cuBLASLt picks the
/// same algorithm for both, and results stay bit-identical).
const SLOT_ALIGN: usize = 256;

/// Bytes the planner leaves aside: small device allocations outside its accounting (RoPE
/// frequencies, argmax results), the alignment padding in slots, and what the driver holds
/// beyond the ledger (kernel modules, cuBLASLt internals, the pool's granularity: 40 MB more
/// than the ledger's peak was measured at a 12 GiB budget on an H100).
const RESERVE: usize = 96 << 20;

/// How streamed bytes reach the copy engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostMode {
    /// Page-locked with `cuMemHostRegister` (the mmap read-only): DMA at full PCIe speed, no
    /// second copy in RAM.
    Registered { bytes: usize },
    /// Registration failed; copies read pageable memory (slow: the driver stages them).
    Pageable { why: String },
}

impl std::fmt::Display for HostMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostMode::Registered { bytes } => write!(
                f,
                "registered host memory ({:.2} GB page-locked with cuMemHostRegister, mmap read-only)",
                *bytes as f64 / 1e9
            ),
            HostMode::Pageable { why } => write!(
                f,
                "pageable host memory (cuMemHostRegister failed: {why}; the pinned staging ring is not written yet)"
            ),
        }
    }
}

/// One tensor as the copy engine reads it: bf16 bytes in host memory that the tier keeps
/// alive.
#[derive(Clone)]
struct TensorSrc {
    /// Address of the first byte; valid while `keep` lives.
    addr: usize,
    bytes: usize,
    cols: usize,
    name: String,
}

/// The host side: every tensor's bf16 bytes (in the checkpoint's storage, or converted into
/// an owned arena), registered with the driver when it can be.
pub struct HostTier {
    /// Per group (pass order), its tensors in group order.
    groups: Vec<Vec<TensorSrc>>,
    /// Storages read in place, kept alive for the raw addresses above.
    _storages: Vec<Arc<Storage>>,
    /// Tensors that were not bf16, converted: an anonymous mapping, so that registering its
    /// pages pins no one else's memory (a heap buffer's rounded-out pages would, and a later
    /// copy from a buffer half inside a registered range fails with CUDA_ERROR_INVALID_VALUE).
    _arena: Option<memmap2::MmapMut>,
    /// Page-aligned starts of the registered ranges (unregistered on drop).
    registered: Vec<usize>,
    pub mode: HostMode,
}

// SAFETY: the raw addresses point into memory owned by this struct (Arc<Storage>, the arena),
// which is immutable once built.
unsafe impl Send for HostTier {}

fn page_size() -> usize {
    4096
}

impl HostTier {
    /// Gather the model's tensors and register their memory. Must run after the CUDA context
    /// exists (`cuMemHostRegister` needs it current: `gpu` proves that).
    pub fn new(gpu: &Cuda, ckpt: &Checkpoint, model: &Llama) -> Result<HostTier> {
        gpu.ctx
            .bind_to_thread()
            .map_err(gpu.err("binding the context"))?;
        // Tensors not stored as aligned bf16 are converted into one arena.
        let convert = |t: &HostTensor| t.dtype != DType::BF16 || t.as_bf16().is_none();
        let mut arena_len = 0;
        for g in model.groups() {
            for spec in &g.tensors {
                let t = ckpt.tensor(&spec.name)?;
                if convert(t) {
                    arena_len += t.numel().div_ceil(SLOT_ALIGN) * SLOT_ALIGN;
                }
            }
        }
        let mut arena = match arena_len {
            0 => None,
            n => Some(memmap2::MmapMut::map_anon(n * 2).map_err(|e| {
                Error::Device(format!(
                    "mapping {} bytes for converted weights: {e}",
                    n * 2
                ))
            })?),
        };
        let mut arena_used = 0; // elements
        let mut placed: Vec<(String, usize)> = Vec::new(); // name → element offset in arena
        let mut storages: Vec<Arc<Storage>> = Vec::new();
        for g in model.groups() {
            for spec in &g.tensors {
                let t = ckpt.tensor(&spec.name)?;
                if convert(t) {
                    if !placed.iter().any(|(n, _)| *n == t.name) {
                        let words: &mut [bf16] =
                            bytemuck::cast_slice_mut(arena.as_mut().expect("sized above"));
                        let values = t.to_f32();
                        for (w, v) in words[arena_used..].iter_mut().zip(&values) {
                            *w = bf16::from_f32(*v);
                        }
                        placed.push((t.name.clone(), arena_used));
                        arena_used += values.len().div_ceil(SLOT_ALIGN) * SLOT_ALIGN;
                    }
                } else if !storages.iter().any(|s| Arc::ptr_eq(s, t.storage())) {
                    storages.push(t.storage().clone());
                }
            }
        }
        let groups = model
            .groups()
            .iter()
            .map(|g| {
                g.tensors
                    .iter()
                    .map(|spec| {
                        let t = ckpt.tensor(&spec.name)?;
                        let cols = *t.shape.last().unwrap_or(&1);
                        let addr = match placed.iter().find(|(n, _)| *n == t.name) {
                            Some(&(_, at)) => {
                                arena.as_ref().expect("placed in the arena").as_ptr() as usize
                                    + at * 2
                            }
                            None => t.bytes().as_ptr() as usize,
                        };
                        Ok(TensorSrc {
                            addr,
                            bytes: t.numel() * 2,
                            cols: if t.shape.len() == 1 { t.numel() } else { cols },
                            name: t.name.clone(),
                        })
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;

        // Register each storage's pages (read-only: the mmap is), and the arena.
        let mut ranges: Vec<(usize, usize, u32)> = storages
            .iter()
            .map(|s| {
                let b = s.bytes();
                let flags = match **s {
                    Storage::Mapped(_) => cu::CU_MEMHOSTREGISTER_READ_ONLY,
                    Storage::Owned { .. } => 0,
                };
                (b.as_ptr() as usize, b.len(), flags)
            })
            .collect();
        if let Some(a) = &arena {
            ranges.push((a.as_ptr() as usize, a.len(), 0));
        }
        let mut registered = Vec::new();
        let mut total = 0;
        let mut failure = None;
        for (addr, len, flags) in ranges {
            let start = addr / page_size() * page_size();
            let end = (addr + len).div_ceil(page_size()) * page_size();
            // SAFETY: the range covers memory this tier keeps alive and never moves (a mapping,
            // a Vec not resized after this point); it is unregistered before it is freed.
            let r = unsafe {
                cu::cuMemHostRegister_v2(start as *mut std::ffi::c_void, end - start, flags)
            };
            match r {
                cu::CUresult::CUDA_SUCCESS => {
                    registered.push(start);
                    total += end - start;
                }
                e => {
                    failure
                        .get_or_insert_with(|| super::driver_msg(cudarc::driver::DriverError(e)));
                }
            }
        }
        let mode = match failure {
            None => HostMode::Registered { bytes: total },
            Some(why) => HostMode::Pageable { why },
        };
        Ok(HostTier {
            groups,
            _storages: storages,
            _arena: arena,
            registered,
            mode,
        })
    }

    /// Bytes of group `g` as streamed (bf16).
    pub fn group_bytes(&self, g: usize) -> usize {
        self.groups[g].iter().map(|t| t.bytes).sum()
    }

    fn max_tensors(&self) -> usize {
        self.groups.iter().map(Vec::len).max().unwrap_or(0)
    }
}

impl Drop for HostTier {
    fn drop(&mut self) {
        for &start in &self.registered {
            // SAFETY: registered by `new`; every copy reading it has completed (the engine
            // synchronizes its stream before the tier is dropped).
            let _ = unsafe { cu::cuMemHostUnregister(start as *mut std::ffi::c_void) };
        }
    }
}

/// A tensor's share of a piece: bytes `src..src + len` of the tensor, at `dst` in the slot.
#[derive(Clone, Copy, Debug)]
struct Segment {
    tensor: usize,
    src: usize,
    len: usize,
    dst: usize,
}

/// Where the bytes `offset..offset + bytes` of a group (its tensors concatenated) go in a
/// slot: each tensor's share at an aligned offset.
fn segments(tensors: &[TensorSrc], offset: usize, bytes: usize) -> Vec<Segment> {
    let (mut at, mut dst) = (0, 0);
    let mut out = Vec::new();
    for (i, t) in tensors.iter().enumerate() {
        let (lo, hi) = (at.max(offset), (at + t.bytes).min(offset + bytes));
        if lo < hi {
            out.push(Segment {
                tensor: i,
                src: lo - at,
                len: hi - lo,
                dst,
            });
            dst = (dst + hi - lo).div_ceil(SLOT_ALIGN) * SLOT_ALIGN;
        }
        at += t.bytes;
    }
    out
}

/// Measure host→device bandwidth from the tier's memory: the best of 3 copies of up to
/// 256 MiB into a scratch buffer (allocated within the budget, freed after). GB/s.
pub fn measure_h2d(gpu: &Cuda, tier: &HostTier) -> Result<f64> {
    let src = tier
        .groups
        .iter()
        .flatten()
        .max_by_key(|t| t.bytes)
        .ok_or_else(|| Error::Device("no tensors to stream".into()))?;
    let room = gpu.memory.budget().saturating_sub(gpu.memory.in_use()) / 4;
    let bytes = src.bytes.min(256 << 20).min(room).max(1);
    let buf = gpu.alloc(bytes, Purpose::Other("H2D measurement".into()))?;
    let timing = Some(cu::CUevent_flags::CU_EVENT_DEFAULT);
    let (a, b) = (
        gpu.ctx
            .new_event(timing)
            .map_err(gpu.err("cuEventCreate"))?,
        gpu.ctx
            .new_event(timing)
            .map_err(gpu.err("cuEventCreate"))?,
    );
    let mut best = f64::MAX;
    for _ in 0..3 {
        a.record(&gpu.stream).map_err(gpu.err("cuEventRecord"))?;
        // SAFETY: `buf` holds `bytes`; the source lies inside memory the tier keeps alive.
        unsafe {
            cu::cuMemcpyHtoDAsync_v2(
                gpu.ptr(&buf),
                src.addr as *const std::ffi::c_void,
                bytes,
                gpu.stream.cu_stream(),
            )
        }
        .result()
        .map_err(gpu.err("measuring host→device copies"))?;
        b.record(&gpu.stream).map_err(gpu.err("cuEventRecord"))?;
        let ms = a.elapsed_ms(&b).map_err(gpu.err("cuEventElapsedTime"))? as f64;
        best = best.min(ms);
    }
    Ok(bytes as f64 / (best.max(1e-6) * 1e6))
}

/// The planner's request for streaming `model` on `gpu` within its budget, for passes of
/// `shape` (`workspace`: activation bytes of one pass), with compute times from `cost` or,
/// where given, measured per group (ms).
#[allow(clippy::too_many_arguments)]
pub fn plan_request(
    gpu: &Cuda,
    ckpt: &Checkpoint,
    model: &Llama,
    tier: &HostTier,
    shape: PassShape,
    workspace: usize,
    cost: &CostModel,
    measured_ms: Option<&[f64]>,
) -> PlanRequest {
    let c = &ckpt.config;
    let bytes: Vec<usize> = (0..model.groups().len())
        .map(|g| tier.group_bytes(g))
        .collect();
    let mut groups = llama_groups(c, &bytes, DType::BF16, shape, cost);
    if let Some(ms) = measured_ms {
        for (g, &m) in groups.iter_mut().zip(ms) {
            g.compute_ms = m;
        }
    }
    let in_use = gpu.memory.in_use(); // the cuBLAS workspace, already allocated
    PlanRequest {
        groups,
        budget: gpu
            .memory
            .budget()
            .saturating_sub(in_use.saturating_sub(CUBLAS_WORKSPACE)),
        kv_cache: crate::stream::cost::kv_cache_bytes(c, shape.past + shape.tokens, shape.batch),
        workspace,
        cublas_workspace: CUBLAS_WORKSPACE,
        reserve: RESERVE,
        h2d_gbps: cost.h2d_gbps,
        slot_size: SlotSize::Auto,
    }
}

/// The copy engine on CUDA: a stream used only for host→device copies into a ring of slots,
/// two events per slot made once (see [`CopyEngine`]), and timing events per piece.
pub struct CudaCopyEngine {
    copy: Arc<CudaStream>,
    compute: Arc<CudaStream>,
    /// Device addresses of the slots (kept allocated by `_slots`).
    slot_addr: Vec<u64>,
    _slots: Vec<DevBuf>,
    copied: Vec<CudaEvent>,
    released: Vec<CudaEvent>,
    tensors: Arc<Vec<Vec<TensorSrc>>>,
    /// First index in the plan's pieces of each group's pieces.
    piece_base: Vec<usize>,
    /// Per piece, copies queued so far; its copy `n` is timed by `copy_times[n % 2][piece]`.
    copies_of: Vec<u64>,
    copy_times: [Vec<(CudaEvent, CudaEvent)>; 2],
}

impl CudaCopyEngine {
    fn new(gpu: &Cuda, plan: &Plan, tier: &HostTier) -> Result<CudaCopyEngine> {
        let slot_bytes = plan.slot_bytes + SLOT_ALIGN * tier.max_tensors();
        let slots = (0..plan.slots)
            .map(|s| gpu.alloc(slot_bytes, Purpose::Slot(s)))
            .collect::<Result<Vec<_>>>()?;
        let copy = gpu
            .ctx
            .new_stream()
            .map_err(gpu.err("creating the copy stream"))?;
        let event = |flags| gpu.ctx.new_event(flags).map_err(gpu.err("cuEventCreate"));
        let sync_events = || {
            (0..plan.slots)
                .map(|_| event(None))
                .collect::<Result<Vec<_>>>()
        };
        let timing = Some(cu::CUevent_flags::CU_EVENT_DEFAULT);
        let timed = || {
            (0..plan.pieces.len())
                .map(|_| Ok((event(timing)?, event(timing)?)))
                .collect::<Result<Vec<_>>>()
        };
        let mut piece_base = vec![0; plan.groups.len()];
        for (g, place) in plan.placement.iter().enumerate() {
            if let Placement::Streamed(r) = place {
                piece_base[g] = r.start;
            }
        }
        // The slots were allocated in stream order on the compute stream; the copy stream
        // may only use them once that allocation has happened.
        gpu.synchronize()?;
        Ok(CudaCopyEngine {
            slot_addr: slots.iter().map(|s| gpu.ptr(s)).collect(),
            _slots: slots,
            copied: sync_events()?,
            released: sync_events()?,
            copy,
            compute: gpu.stream.clone(),
            tensors: Arc::new(tier.groups.clone()),
            piece_base,
            copies_of: vec![0; plan.pieces.len()],
            copy_times: [timed()?, timed()?],
        })
    }

    fn err(e: cudarc::driver::DriverError, what: &str) -> Error {
        Error::Device(format!("streaming: {what}: {}", super::driver_msg(e)))
    }

    /// Views of the tensors of `piece` in `slot`: one entry per tensor of its group, None
    /// for those not in it.
    fn views(&self, slot: usize, piece: &Piece) -> Vec<Option<CudaWeight>> {
        let tensors = &self.tensors[piece.group];
        let mut out: Vec<Option<CudaWeight>> = (0..tensors.len()).map(|_| None).collect();
        for s in segments(tensors, piece.offset, piece.bytes) {
            let t = &tensors[s.tensor];
            out[s.tensor] = Some(CudaWeight {
                ptr: self.slot_addr[slot] + s.dst as u64,
                rows: s.len / (t.cols * 2),
                cols: t.cols,
                storage: WeightStorage::Slot,
            });
        }
        out
    }

    /// The begin and end events of copy number `n` of piece `k` (in the plan's pieces).
    fn copy_events(&self, n: u64, k: usize) -> &(CudaEvent, CudaEvent) {
        &self.copy_times[(n % 2) as usize][k]
    }

    /// (copy time ms, bytes) of copy number `n` of every piece (all complete by now).
    fn copy_ms(&self, n: u64) -> Result<f64> {
        let mut ms = 0.0;
        for (b, e) in &self.copy_times[(n % 2) as usize] {
            ms += b.elapsed_ms(e).map_err(|e| Self::err(e, "copy timing"))? as f64;
        }
        Ok(ms)
    }
}

impl CopyEngine for CudaCopyEngine {
    fn copy(&mut self, slot: usize, piece: &Piece) -> Result<()> {
        let k = self.piece_base[piece.group] + piece.index;
        let (begin, end) = &self.copy_times[(self.copies_of[k] % 2) as usize][k];
        self.copies_of[k] += 1;
        self.copy
            .wait(&self.released[slot])
            .map_err(|e| Self::err(e, "waiting for a slot's release"))?;
        begin
            .record(&self.copy)
            .map_err(|e| Self::err(e, "cuEventRecord"))?;
        for s in segments(&self.tensors[piece.group], piece.offset, piece.bytes) {
            let t = &self.tensors[piece.group][s.tensor];
            // SAFETY: the slot holds the piece's bytes plus alignment padding (segments stay
            // inside it); the source lies in host memory the tier keeps alive until the engine
            // has synchronized; the copy stream waited above for the slot's last reader.
            unsafe {
                cu::cuMemcpyHtoDAsync_v2(
                    self.slot_addr[slot] + s.dst as u64,
                    (t.addr + s.src) as *const std::ffi::c_void,
                    s.len,
                    self.copy.cu_stream(),
                )
            }
            .result()
            .map_err(|e| Self::err(e, &format!("copying {}", t.name)))?;
        }
        self.copied[slot]
            .record(&self.copy)
            .map_err(|e| Self::err(e, "cuEventRecord"))?;
        end.record(&self.copy)
            .map_err(|e| Self::err(e, "cuEventRecord"))
    }

    fn wait_copied(&mut self, slot: usize) -> Result<()> {
        self.compute
            .wait(&self.copied[slot])
            .map_err(|e| Self::err(e, "waiting for a copy"))
    }

    fn release(&mut self, slot: usize) -> Result<()> {
        self.released[slot]
            .record(&self.compute)
            .map_err(|e| Self::err(e, "cuEventRecord"))
    }

    fn synchronize(&mut self) -> Result<()> {
        self.copy
            .synchronize()
            .map_err(|e| Self::err(e, "synchronizing the copy stream"))
    }
}

/// What one pass did, from device events (ms) and the driver.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PassStats {
    /// From the first group's start to the end of the head, on the compute stream.
    pub pass_ms: f64,
    /// Time the compute stream waited for copies.
    pub stall_ms: f64,
    /// pass − stall.
    pub compute_ms: f64,
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

/// Weights for the model from a [`Plan`]: resident groups uploaded once, the embedding
/// gathered on the host, every other group streamed through the slots.
pub struct StreamedWeights {
    plan: Plan,
    units: Vec<Unit>,
    /// Per group: its weights when resident or gathered on the host; empty when streamed.
    resident: Vec<Vec<CudaWeight>>,
    streamer: Streamer<CudaCopyEngine>,
    /// Views into the slot of the piece acquired, one per tensor of its group.
    current: Vec<Option<CudaWeight>>,
    /// `current`, whole (for `group`).
    current_whole: Vec<CudaWeight>,
    held: bool,
    /// The next unit of the pass.
    cursor: usize,
    passes: u64,
    /// Per unit: recorded when it is asked for, and after its wait for the copy.
    unit_events: Vec<(CudaEvent, CudaEvent)>,
    pass_end: CudaEvent,
    compute: Arc<CudaStream>,
    /// Measured host→device GB/s, for the bound.
    h2d_gbps: f64,
    /// For the device memory in use (cuMemGetInfo) and the ledger's peak.
    ctx: Arc<CudaContext>,
    baseline_used: usize,
    tracker: BudgetTracker,
    /// When set, every pass's stats are appended here (the host waits for each pass's end).
    log: Option<Arc<Mutex<Vec<PassStats>>>>,
    /// When set and armed, the next pass's timeline is read into it as the pass ends.
    timeline: Option<TimelineCapture>,
    /// Dropped last: the copies above read it.
    tier: HostTier,
}

impl StreamedWeights {
    /// Upload the resident groups, allocate the slots and queue the first copies.
    pub fn new(
        gpu: &Cuda,
        ckpt: &Checkpoint,
        model: &Llama,
        plan: Plan,
        tier: HostTier,
        h2d_gbps: f64,
    ) -> Result<StreamedWeights> {
        for (g, place) in plan.placement.iter().enumerate() {
            if let Placement::Streamed(r) = place {
                // A group other than the head must fit one slot: the model computes pieces
                // only as row blocks of a group's last tensor.
                if r.len() > 1 && g != model.groups().len() - 1 {
                    return Err(Error::Flag {
                        flag: "--vram",
                        message: format!(
                            "{} would stream in {} pieces; only the head can (slot of {} bytes)",
                            plan.groups[g].label,
                            r.len(),
                            plan.slot_bytes
                        ),
                    });
                }
            }
        }
        let mut resident = Vec::with_capacity(plan.groups.len());
        for (g, place) in plan.placement.iter().enumerate() {
            let specs = &model.groups()[g].tensors;
            resident.push(match place {
                Placement::Resident => specs
                    .iter()
                    .map(|s| gpu.weight(ckpt.tensor(&s.name)?))
                    .collect::<Result<Vec<_>>>()?,
                Placement::HostGather => specs
                    .iter()
                    .map(|s| {
                        let t = ckpt.tensor(&s.name)?;
                        Ok(CudaWeight {
                            ptr: 0,
                            rows: t.shape[0],
                            cols: t.numel() / t.shape[0].max(1),
                            storage: WeightStorage::Host(t.clone()),
                        })
                    })
                    .collect::<Result<Vec<_>>>()?,
                Placement::Streamed(_) => Vec::new(),
            });
        }
        let engine = CudaCopyEngine::new(gpu, &plan, &tier)?;
        let units = plan.units();
        let timing = Some(cu::CUevent_flags::CU_EVENT_DEFAULT);
        let event = || gpu.ctx.new_event(timing).map_err(gpu.err("cuEventCreate"));
        let unit_events = units
            .iter()
            .map(|_| Ok((event()?, event()?)))
            .collect::<Result<Vec<_>>>()?;
        let pass_end = event()?;
        let streamer = Streamer::new(engine, &plan)?;
        Ok(StreamedWeights {
            units,
            resident,
            streamer,
            current: Vec::new(),
            current_whole: Vec::new(),
            held: false,
            cursor: 0,
            passes: 0,
            unit_events,
            pass_end,
            compute: gpu.stream.clone(),
            h2d_gbps,
            ctx: gpu.ctx.clone(),
            baseline_used: gpu.baseline_used,
            tracker: gpu.memory.tracker(),
            log: None,
            timeline: None,
            plan,
            tier,
        })
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Append every pass's stats to `log` from now on (`--stats`).
    pub fn log_stats(&mut self, log: Arc<Mutex<Vec<PassStats>>>) {
        self.log = Some(log);
    }

    /// Hand the timeline of each pass that ends while `capture` is armed to `capture`
    /// (`ferry bench --timeline`: the Generator owns these weights, so the pass is read here).
    pub fn capture_timeline(&mut self, capture: TimelineCapture) {
        self.timeline = Some(capture);
    }

    pub fn host_mode(&self) -> &HostMode {
        &self.tier.mode
    }

    fn record(&self, e: &CudaEvent) -> Result<()> {
        e.record(&self.compute)
            .map_err(|e| CudaCopyEngine::err(e, "cuEventRecord"))
    }

    /// Release the piece in use (its compute is queued) and go to the next unit, which must
    /// be `expect`.
    fn step(&mut self, group: usize, part: usize) -> Result<Unit> {
        if self.held {
            self.streamer.release()?;
            self.held = false;
        }
        let u = self.cursor;
        let unit = *self.units.get(u).ok_or_else(|| {
            Error::Device(format!(
                "streaming: group {group} asked for after the pass ended"
            ))
        })?;
        let matches = match unit {
            Unit::Group(g) => g == group && part == 0,
            Unit::Piece(k) => {
                let p = &self.plan.pieces[k];
                p.group == group && p.index == part
            }
        };
        if !matches {
            return Err(Error::Device(format!(
                "streaming: group {group} part {part} asked for out of pass order (expected {unit:?})"
            )));
        }
        self.record(&self.unit_events[u].0)?;
        if let Unit::Piece(_) = unit {
            let acquired = self.streamer.acquire()?;
            self.held = true;
            let piece = self.plan.pieces[acquired.piece].clone();
            self.current = self.streamer.engine().views(acquired.slot, &piece);
        }
        self.record(&self.unit_events[u].1)?;
        self.cursor += 1;
        Ok(unit)
    }

    /// The copy and compute intervals of the pass that just finished, ms from its start, for
    /// a timeline picture (waits for the pass to end). Copies that start before 0 were
    /// queued during the pass before (prefetch). Call after a pass, before the next begins.
    pub fn pass_timeline(&self) -> Result<Vec<TimelineEvent>> {
        let err = |e| CudaCopyEngine::err(e, "reading pass timings");
        self.pass_end.synchronize().map_err(err)?;
        let first = &self.unit_events[0].0;
        let since = |e: &CudaEvent| -> Result<f64> {
            // cuEventElapsedTime is signed: a prefetch copy may begin before the pass.
            Ok(first.elapsed_ms(e).map_err(err)? as f64)
        };
        let label = |unit: &Unit| match *unit {
            Unit::Group(g) => self.plan.groups[g].label.clone(),
            Unit::Piece(k) => {
                let p = &self.plan.pieces[k];
                match &self.plan.placement[p.group] {
                    Placement::Streamed(r) if r.len() > 1 => {
                        format!(
                            "{} {}/{}",
                            self.plan.groups[p.group].label,
                            p.index + 1,
                            r.len()
                        )
                    }
                    _ => self.plan.groups[p.group].label.clone(),
                }
            }
        };
        let n = self.units.len();
        let mut events = Vec::with_capacity(2 * n);
        let pass = self.passes.saturating_sub(1);
        for (u, unit) in self.units.iter().enumerate() {
            let (_, after) = &self.unit_events[u];
            let end = if u + 1 < n {
                &self.unit_events[u + 1].0
            } else {
                &self.pass_end
            };
            if let Unit::Piece(k) = *unit {
                let (b, e) = self.streamer.engine().copy_events(pass, k);
                events.push(TimelineEvent {
                    group: label(unit),
                    lane: Lane::Copy,
                    start_ms: since(b)?,
                    end_ms: since(e)?,
                });
            }
            events.push(TimelineEvent {
                group: label(unit),
                lane: Lane::Compute,
                start_ms: since(after)?,
                end_ms: since(end)?,
            });
        }
        Ok(events)
    }

    /// Stats of the pass that just finished (waits for it to end on the device). Call after
    /// each pass, before the next begins.
    pub fn pass_stats(&self) -> Result<PassStats> {
        let err = |e| CudaCopyEngine::err(e, "reading pass timings");
        self.pass_end.synchronize().map_err(err)?;
        let n = self.units.len();
        let at = |i: usize| -> &CudaEvent {
            if i < n {
                &self.unit_events[i].0
            } else {
                &self.pass_end
            }
        };
        let first = &self.unit_events[0].0;
        let pass_ms = first.elapsed_ms(&self.pass_end).map_err(err)? as f64;
        let mut stall_ms = 0.0;
        let mut group_compute_ms = vec![0.0; self.plan.groups.len()];
        for (u, unit) in self.units.iter().enumerate() {
            let (before, after) = &self.unit_events[u];
            stall_ms += before.elapsed_ms(after).map_err(err)? as f64;
            let compute = after.elapsed_ms(at(u + 1)).map_err(err)? as f64;
            let g = match *unit {
                Unit::Group(g) => g,
                Unit::Piece(k) => self.plan.pieces[k].group,
            };
            group_compute_ms[g] += compute;
        }
        let streamed_bytes = self.plan.streamed_bytes();
        let copy_ms = if streamed_bytes > 0 {
            self.streamer
                .engine()
                .copy_ms(self.passes.saturating_sub(1))?
        } else {
            0.0
        };
        let compute_ms = pass_ms - stall_ms;
        // The PCIe bound at the measured bandwidth, or at this pass's if it did better.
        let gbps = if copy_ms > 0.0 {
            self.h2d_gbps.max(streamed_bytes as f64 / (copy_ms * 1e6))
        } else {
            self.h2d_gbps
        };
        let bound_ms = compute_ms.max(streamed_bytes as f64 / (gbps * 1e6));
        Ok(PassStats {
            pass_ms,
            stall_ms,
            compute_ms,
            copy_ms,
            streamed_bytes,
            achieved_gbps: if copy_ms > 0.0 {
                streamed_bytes as f64 / (copy_ms * 1e6)
            } else {
                0.0
            },
            bound_ms,
            efficiency: bound_ms / pass_ms.max(1e-9),
            device_bytes: {
                let (free, total) = self.ctx.mem_get_info().map_err(err)?;
                (total - free).saturating_sub(self.baseline_used)
            },
            allocated_peak: self.tracker.peak(),
            group_compute_ms,
        })
    }

    /// The plan's schedule simulated with measured compute times per group and the measured
    /// H2D bandwidth: the prediction to hold the measurement against.
    pub fn predict_measured(&self, group_compute_ms: &[f64]) -> Prediction {
        let units: Vec<SimUnit> = self
            .units
            .iter()
            .map(|u| match *u {
                Unit::Group(g) => SimUnit {
                    compute_ms: group_compute_ms[g],
                    copy_ms: None,
                },
                Unit::Piece(k) => {
                    let p = &self.plan.pieces[k];
                    let share = p.bytes as f64 / self.plan.groups[p.group].bytes.max(1) as f64;
                    SimUnit {
                        compute_ms: group_compute_ms[p.group] * share,
                        copy_ms: Some(p.bytes as f64 / (self.h2d_gbps * 1e6)),
                    }
                }
            })
            .collect();
        let ends = simulate(&units, self.plan.slots, 8);
        let compute_ms: f64 = units.iter().map(|u| u.compute_ms).sum();
        Prediction {
            pass_ms: ends[7].0 - ends[6].0,
            cold_pass_ms: ends[0].0,
            compute_ms,
            copy_ms: self.plan.streamed_bytes() as f64 / (self.h2d_gbps * 1e6),
            stall_ms: ends[7].1,
        }
    }
}

impl Weights<CudaWeight> for StreamedWeights {
    fn group(&mut self, index: usize) -> Result<&[CudaWeight]> {
        match self.step(index, 0)? {
            Unit::Group(g) => Ok(&self.resident[g]),
            Unit::Piece(k) => {
                let piece = &self.plan.pieces[k];
                let whole = matches!(&self.plan.placement[piece.group], Placement::Streamed(r) if r.len() == 1);
                if !whole {
                    return Err(Error::Device(format!(
                        "streaming: {} comes in pieces; ask for its parts",
                        self.plan.groups[index].label
                    )));
                }
                self.current_whole = self
                    .current
                    .drain(..)
                    .map(|w| w.expect("a whole group"))
                    .collect();
                Ok(&self.current_whole)
            }
        }
    }

    fn parts(&mut self, index: usize) -> Result<usize> {
        Ok(match &self.plan.placement[index] {
            Placement::Streamed(r) => r.len(),
            _ => 1,
        })
    }

    fn part(&mut self, index: usize, part: usize) -> Result<Vec<Option<&CudaWeight>>> {
        match self.step(index, part)? {
            Unit::Group(g) => Ok(self.resident[g].iter().map(Some).collect()),
            Unit::Piece(_) => Ok(self.current.iter().map(Option::as_ref).collect()),
        }
    }

    fn finish_pass(&mut self) -> Result<()> {
        if self.held {
            self.streamer.release()?;
            self.held = false;
        }
        if self.cursor != self.units.len() {
            return Err(Error::Device(format!(
                "streaming: pass ended after {} of {} steps",
                self.cursor,
                self.units.len()
            )));
        }
        self.record(&self.pass_end)?;
        self.cursor = 0;
        self.passes += 1;
        if let Some(log) = &self.log {
            let stats = self.pass_stats()?;
            log.lock().expect("stats log").push(stats);
        }
        if let Some(capture) = self.timeline.as_ref().filter(|c| c.armed()) {
            capture.fill(self.pass_timeline()?);
        }
        Ok(())
    }
}

impl Drop for StreamedWeights {
    fn drop(&mut self) {
        // Copies still queued (the next pass's prefetch) read the host tier and write the
        // slots: let them finish before either goes.
        let _ = self.streamer.engine().copy.synchronize();
        let _ = self.compute.synchronize();
    }
}

/// Compute figures the first plan assumes before a pass has been measured: an H100-class
/// card (DESIGN.md). The prediction printed after a measured pass uses measured times.
pub const ASSUMED_COMPUTE: CostModel = CostModel {
    h2d_gbps: 55.0,
    tflops: 600.0,
    hbm_gbps: 3000.0,
};

/// Everything `--vram` needs: register the host tier, measure H2D, plan passes of `shape`
/// within the budget, upload the residents and start the streamer. `measured_ms` (per group)
/// replaces the cost model's compute times when given.
pub fn stream_weights(
    gpu: &Cuda,
    ckpt: &Checkpoint,
    model: &Llama,
    shape: PassShape,
    workspace: usize,
    measured_ms: Option<&[f64]>,
) -> Result<StreamedWeights> {
    let tier = HostTier::new(gpu, ckpt, model)?;
    let h2d_gbps = measure_h2d(gpu, &tier)?;
    let cost = CostModel {
        h2d_gbps,
        ..ASSUMED_COMPUTE
    };
    let request = plan_request(
        gpu,
        ckpt,
        model,
        &tier,
        shape,
        workspace,
        &cost,
        measured_ms,
    );
    let plan = crate::stream::plan(&request)?;
    StreamedWeights::new(gpu, ckpt, model, plan, tier, h2d_gbps)
}

impl StreamedWeights {
    /// Measured host→device bandwidth, GB/s.
    pub fn h2d_gbps(&self) -> f64 {
        self.h2d_gbps
    }
}
