//! The CUDA half of the streaming engine: a [`CopyEngine`] over one copy stream and a ring of
//! slots, fed from the host tier ([`super::host_tier`]), and
//! [`StreamedWeights`], which hands the model its weights group by group — resident groups as
//! they are, streamed ones as views into the slot their copy went to — with per-pass stats.
//!
//! Nothing here blocks the host on the device inside a pass: the compute stream waits for a
//! slot's copy event, the copy stream waits for the slot's release event, both queue-to-queue
//! (the contract is in [`crate::stream::schedule`]). With the staging ring, the compute thread
//! may wait for the ring's thread to have *queued* a copy (the fill of a staging buffer: host
//! work), never for a copy to complete (see [`crate::stream::staging`]).

use std::sync::{Arc, Mutex};

use cudarc::driver::sys as cu;
use cudarc::driver::{CudaContext, CudaEvent, CudaStream};

pub use super::host_tier::{measure_h2d, HostMemory, HostMode, HostTier};
use super::host_tier::{slot_spans, PinnedBuffer, TensorSrc, SLOT_ALIGN};
use super::{Cuda, CudaWeight, DevBuf, WeightStorage};
use crate::backend::Backend;
use crate::checkpoint::Tensors;
use crate::error::{Error, Result};
use crate::model::{Architecture, Weights};
use crate::stream::budget::BudgetTracker;
use crate::stream::plan::{Piece, Placement, Plan, Prediction, Unit};
use crate::stream::schedule::{CopyEngine, Streamer};
use crate::stream::staging::{
    Readers, Span, StagedCopy, StagingDevice, StagingRing, STAGING_BUFFERS,
};
use crate::stream::timeline::{Lane, TimelineCapture, TimelineEvent};
use crate::stream::{human_bytes, Purpose};

/// The events of the copy engine, made once: per slot its copy and release events (see
/// [`CopyEngine`]), and begin/end timing events per piece for two copies in flight (copy `n`
/// of piece `k` is timed by `copy_times[n % 2][k]`). Shared with the staging ring's thread,
/// which records them in staged mode.
struct EngineEvents {
    copied: Vec<CudaEvent>,
    released: Vec<CudaEvent>,
    copy_times: [Vec<(CudaEvent, CudaEvent)>; 2],
}

impl EngineEvents {
    /// Timing events of a copy, by the tag given to the staging ring: `2 k + n % 2`.
    fn timing(&self, tag: usize) -> &(CudaEvent, CudaEvent) {
        &self.copy_times[tag % 2][tag / 2]
    }
}

/// The copy engine on CUDA: a stream used only for host→device copies into a ring of slots,
/// two events per slot made once (see [`CopyEngine`]), and timing events per piece. In
/// staged host mode every copy goes through a [`StagingRing`] instead of reading the host
/// tier directly.
pub struct CudaCopyEngine {
    copy: Arc<CudaStream>,
    compute: Arc<CudaStream>,
    /// Device addresses of the slots (kept allocated by `_slots`).
    slot_addr: Vec<u64>,
    events: Arc<EngineEvents>,
    tensors: Arc<Vec<Vec<TensorSrc>>>,
    /// First index in the plan's pieces of each group's pieces.
    piece_base: Vec<usize>,
    /// Per piece, copies queued so far.
    copies_of: Vec<u64>,
    /// Staged host mode: the ring every copy goes through. Stopped (dropped) before the
    /// slots are freed.
    ring: Option<StagingRing>,
    /// (buffers, bytes each) of the ring; (0, 0) without one.
    staging: (usize, usize),
    _slots: Vec<DevBuf>,
}

/// The staging ring's device side on CUDA: copies from a pinned buffer on the copy stream,
/// and per buffer an event recorded after the copy that reads it.
struct CudaStaging {
    ctx: Arc<CudaContext>,
    copy: Arc<CudaStream>,
    slot_addr: Vec<u64>,
    events: Arc<EngineEvents>,
    /// Blocking-sync events: the ring's thread sleeps on them instead of spinning.
    buffer_free: Vec<CudaEvent>,
}

impl StagingDevice for CudaStaging {
    type Buffer = PinnedBuffer;

    fn wait_buffer_free(&mut self, buffer: usize) -> Result<()> {
        // An event never recorded counts as complete: the first use of a buffer does not wait.
        self.buffer_free[buffer]
            .synchronize()
            .map_err(|e| CudaCopyEngine::err(e, "waiting for a staging buffer's copy"))
    }

    fn queue_copy(&mut self, buffer: usize, staged: &[u8], copy: &StagedCopy) -> Result<()> {
        let err = CudaCopyEngine::err;
        self.ctx
            .bind_to_thread()
            .map_err(|e| err(e, "binding the context to the staging thread"))?;
        let (begin, end) = self.events.timing(copy.tag);
        // Bound to the slot's latest release: see the staging module's doc for why that is
        // the release of the piece that was in it.
        self.copy
            .wait(&self.events.released[copy.slot])
            .map_err(|e| err(e, "waiting for a slot's release"))?;
        begin
            .record(&self.copy)
            .map_err(|e| err(e, "cuEventRecord"))?;
        // SAFETY: `staged` is the first `copy.extent()` bytes of a pinned buffer that the ring
        // leaves untouched until `buffer_free[buffer]` (recorded below) has completed; the
        // slot holds at least that many bytes (the buffer is as large as the largest piece in
        // a slot); the copy stream waited above for the slot's last reader.
        unsafe {
            cu::cuMemcpyHtoDAsync_v2(
                self.slot_addr[copy.slot],
                staged.as_ptr() as *const std::ffi::c_void,
                staged.len(),
                self.copy.cu_stream(),
            )
        }
        .result()
        .map_err(|e| err(e, "copying a staging buffer to a slot"))?;
        end.record(&self.copy)
            .map_err(|e| err(e, "cuEventRecord"))?;
        self.events.copied[copy.slot]
            .record(&self.copy)
            .map_err(|e| err(e, "cuEventRecord"))?;
        self.buffer_free[buffer]
            .record(&self.copy)
            .map_err(|e| err(e, "cuEventRecord"))
    }
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
        let events = Arc::new(EngineEvents {
            copied: sync_events()?,
            released: sync_events()?,
            copy_times: [timed()?, timed()?],
        });
        let slot_addr: Vec<u64> = slots.iter().map(|s| gpu.ptr(s)).collect();
        let (ring, staging) = match &tier.mode {
            HostMode::Staged { threads, .. } if !plan.pieces.is_empty() => {
                // Each buffer holds the largest piece laid out as in a slot.
                let bytes_each = plan
                    .pieces
                    .iter()
                    .filter_map(|p| {
                        slot_spans(&tier.groups[p.group], p.offset, p.bytes)
                            .last()
                            .map(|s| s.dst + s.len)
                    })
                    .max()
                    .unwrap_or(0);
                let buffers = (0..STAGING_BUFFERS)
                    .map(|_| PinnedBuffer::new(&gpu.ctx, bytes_each))
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(|e| {
                        Error::Device(format!(
                            "allocating the pinned staging ring ({STAGING_BUFFERS} × {} of host memory, cuMemHostAlloc): {}",
                            human_bytes(bytes_each),
                            super::driver_msg(e)
                        ))
                    })?;
                let device = CudaStaging {
                    ctx: gpu.ctx.clone(),
                    copy: copy.clone(),
                    slot_addr: slot_addr.clone(),
                    events: events.clone(),
                    buffer_free: (0..STAGING_BUFFERS)
                        .map(|_| event(Some(cu::CUevent_flags::CU_EVENT_BLOCKING_SYNC)))
                        .collect::<Result<Vec<_>>>()?,
                };
                let ring = StagingRing::new(device, buffers, plan.slots, Readers::new(*threads)?)?;
                (Some(ring), (STAGING_BUFFERS, bytes_each))
            }
            _ => (None, (0, 0)),
        };
        // The slots were allocated in stream order on the compute stream; the copy stream
        // may only use them once that allocation has happened.
        gpu.synchronize()?;
        Ok(CudaCopyEngine {
            slot_addr,
            _slots: slots,
            events,
            copy,
            compute: gpu.stream.clone(),
            tensors: Arc::new(tier.groups.clone()),
            piece_base,
            copies_of: vec![0; plan.pieces.len()],
            ring,
            staging,
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
        for s in slot_spans(tensors, piece.offset, piece.bytes) {
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
        &self.events.copy_times[(n % 2) as usize][k]
    }

    /// (copy time ms, bytes) of copy number `n` of every piece (all complete by now).
    fn copy_ms(&self, n: u64) -> Result<f64> {
        let mut ms = 0.0;
        for (b, e) in &self.events.copy_times[(n % 2) as usize] {
            ms += b.elapsed_ms(e).map_err(|e| Self::err(e, "copy timing"))? as f64;
        }
        Ok(ms)
    }
}

impl CopyEngine for CudaCopyEngine {
    fn copy(&mut self, slot: usize, piece: &Piece) -> Result<()> {
        let k = self.piece_base[piece.group] + piece.index;
        let tag = 2 * k + (self.copies_of[k] % 2) as usize;
        self.copies_of[k] += 1;
        let tensors = &self.tensors[piece.group];
        let placed = slot_spans(tensors, piece.offset, piece.bytes);
        if let Some(ring) = &self.ring {
            let spans = placed
                .iter()
                .map(|s| Span {
                    src: tensors[s.tensor].addr + s.src,
                    len: s.len,
                    dst: s.dst,
                })
                .collect();
            // SAFETY: the spans lie in host memory the tier keeps alive and unchanged until
            // after the engine, and with it the ring, is dropped (StreamedWeights drops its
            // tier last).
            unsafe { ring.submit(StagedCopy { slot, spans, tag }) };
            return Ok(());
        }
        let (begin, end) = self.events.timing(tag);
        self.copy
            .wait(&self.events.released[slot])
            .map_err(|e| Self::err(e, "waiting for a slot's release"))?;
        begin
            .record(&self.copy)
            .map_err(|e| Self::err(e, "cuEventRecord"))?;
        for s in placed {
            let t = &tensors[s.tensor];
            // SAFETY: the slot holds the piece's bytes plus alignment padding (slot_spans stay
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
        // The end of the timing before the copy event: once the compute stream is past the
        // copy, its timing can be read.
        end.record(&self.copy)
            .map_err(|e| Self::err(e, "cuEventRecord"))?;
        self.events.copied[slot]
            .record(&self.copy)
            .map_err(|e| Self::err(e, "cuEventRecord"))
    }

    fn wait_copied(&mut self, slot: usize) -> Result<()> {
        if let Some(ring) = &self.ring {
            // The copy into `slot` may still be in the ring (being filled): the wait below
            // must come after its copy event is recorded. This waits for host work only.
            ring.wait_queued(slot)?;
        }
        self.compute
            .wait(&self.events.copied[slot])
            .map_err(|e| Self::err(e, "waiting for a copy"))
    }

    fn release(&mut self, slot: usize) -> Result<()> {
        self.events.released[slot]
            .record(&self.compute)
            .map_err(|e| Self::err(e, "cuEventRecord"))
    }

    fn synchronize(&mut self) -> Result<()> {
        if let Some(ring) = &self.ring {
            ring.wait_all_queued()?;
        }
        self.copy
            .synchronize()
            .map_err(|e| Self::err(e, "synchronizing the copy stream"))
    }
}

impl Drop for CudaCopyEngine {
    fn drop(&mut self) {
        // Stop the ring first (it skips what it has not started and waits for the copies from
        // its buffers), then let every queued copy finish before the slots are freed.
        self.ring.take();
        let _ = self.copy.synchronize();
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
/// read from host memory (by the kernel where it is registered, else gathered by the host),
/// every other group streamed through the slots.
pub struct StreamedWeights {
    plan: Plan,
    units: Vec<Unit>,
    /// Per group: its weights when resident or kept in host memory; empty when streamed.
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
        tensors: &dyn Tensors,
        model: &dyn Architecture,
        plan: Plan,
        tier: HostTier,
        h2d_gbps: f64,
    ) -> Result<StreamedWeights> {
        for (g, place) in plan.placement.iter().enumerate() {
            if let Placement::Streamed(r) = place {
                // The model computes pieces only as row blocks of a group's last tensor.
                if r.len() > 1 && !model.groups()[g].splits() {
                    return Err(Error::Flag {
                        flag: "--vram",
                        message: format!(
                            "{} would stream in {} pieces, but it cannot split (slot of {} bytes)",
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
                    .map(|s| gpu.weight(tensors.tensor(&s.name)?))
                    .collect::<Result<Vec<_>>>()?,
                Placement::HostGather => specs
                    .iter()
                    .enumerate()
                    .map(|(i, s)| {
                        let t = tensors.tensor(&s.name)?;
                        let (rows, cols) = (t.shape[0], t.numel() / t.shape[0].max(1));
                        // Registered: the embedding kernel reads the rows it needs straight
                        // from host memory. Otherwise the host gathers them.
                        Ok(match tier.device_address(g, i) {
                            Some(ptr) => CudaWeight {
                                ptr,
                                rows,
                                cols,
                                storage: WeightStorage::Mapped,
                            },
                            None => CudaWeight {
                                ptr: 0,
                                rows,
                                cols,
                                storage: WeightStorage::Host(t.clone()),
                            },
                        })
                    })
                    .collect::<Result<Vec<_>>>()?,
                Placement::Streamed(_) => Vec::new(),
            });
        }
        let engine = CudaCopyEngine::new(gpu, &plan, &tier)?;
        let mut tier = tier;
        if let HostMode::Staged {
            buffers,
            bytes_each,
            ..
        } = &mut tier.mode
        {
            (*buffers, *bytes_each) = engine.staging;
        }
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
        self.plan.predict(group_compute_ms, self.h2d_gbps)
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

impl StreamedWeights {
    /// Measured host→device bandwidth, GB/s.
    pub fn h2d_gbps(&self) -> f64 {
        self.h2d_gbps
    }
}
