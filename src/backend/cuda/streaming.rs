//! The CUDA half of the streaming engine: [`CudaCopyEngine`], a [`SlotEngine`] over one copy
//! stream and a ring of slots, fed from the host tier ([`super::host_tier`]), which also keeps
//! each pass's clock (events on the compute stream) for its stats and timeline. The loop that
//! hands the model its weights is [`crate::stream::streamed`]'s, shared with the CPU engine;
//! here it is [`StreamedWeights`] over this engine.
//!
//! Nothing here blocks the host on the device inside a pass: the compute stream waits for a
//! slot's copy event, the copy stream waits for the slot's release event, both queue-to-queue
//! (the contract is in [`crate::stream::schedule`]). With the staging ring, the compute thread
//! may wait for the ring's thread to have *queued* a copy (the fill of a staging buffer: host
//! work), never for a copy to complete (see [`crate::stream::staging`]).

use std::sync::{Arc, Mutex};

use cudarc::driver::sys as cu;
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaStream, LaunchConfig, PushKernelArg,
};

use super::host_tier::PinnedBuffer;
pub use super::host_tier::SLOT_ALIGN;
pub use super::host_tier::{measure_h2d, HostMemory, HostMode, HostTier};
use super::{Cuda, CudaWeight, DevBuf, WeightStorage};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::stream::budget::BudgetTracker;
use crate::stream::compress::{piece_layout, Compressed, Decode, Encoding, PieceLayout, Share};
use crate::stream::plan::{Piece, Placement, Plan, Prediction, Unit};
use crate::stream::schedule::CopyEngine;
use crate::stream::staging::{
    Readers, Span, StagedCopy, StagingDevice, StagingRing, STAGING_BUFFERS,
};
pub use crate::stream::stats::PassStats;
use crate::stream::streamed::{GroupTensors, SlotEngine};
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
/// tier directly. It owns the host tier, which it drops last.
pub struct CudaCopyEngine {
    copy: Arc<CudaStream>,
    compute: Arc<CudaStream>,
    /// Device addresses of the slots (kept allocated by `_slots`).
    slot_addr: Vec<u64>,
    events: Arc<EngineEvents>,
    /// First index in the plan's pieces of each group's pieces.
    piece_base: Vec<usize>,
    /// Per piece, copies queued so far.
    copies_of: Vec<u64>,
    /// Staged host mode: the ring every copy goes through. Stopped (dropped) before the
    /// slots are freed.
    ring: Option<StagingRing>,
    clock: PassClock,
    /// Per group, per piece: how it lies in a slot (encoded shares decoded before use).
    layouts: Vec<Vec<PieceLayout>>,
    /// The encodings the copies read; `None` when nothing streams compressed.
    compressed: Option<Arc<Compressed>>,
    /// Where and how encoded pieces are decoded; `None` when nothing is encoded.
    decoding: Option<Decoding>,
    /// Per piece of the plan with encoded shares: events around its decoding (on the
    /// decode stream, once a pass), for the stats and the timeline; decoding `n` of piece `k`
    /// is timed by `decode_times[n % 2][k]`, since the next pass's first pieces may decode
    /// before this pass's figures are read.
    decode_times: [Vec<Option<(CudaEvent, CudaEvent)>>; 2],
    /// Per piece, decodings queued so far.
    decodes_of: Vec<u64>,
    /// Per slot: its release was recorded after the decoding of the piece in it (nothing
    /// reads the slot after that), so `release` has nothing left to record.
    released_early: Vec<bool>,
    /// Per slot: the decode buffer the piece in it was decoded into, freed when the piece's
    /// compute has been queued.
    slot_buffer: Vec<Option<usize>>,
    _slots: Vec<DevBuf>,
    /// Dropped last: the copies above read it.
    tier: HostTier,
}

/// The decoding of encoded pieces: a stream of its own, so that a piece decodes while the
/// one before it computes, into decode buffers used in turn. Per buffer two events, made
/// once: `decoded[b]`, recorded on the decode stream after a piece's decoding into `b` (the
/// compute stream waits for it), and `free[b]`, recorded on the compute stream after the
/// compute that read `b` (the next decoding into `b` waits for it). With one buffer a piece
/// decodes only once the one before has computed, as if on the compute stream.
///
/// A piece's decoding is queued as soon as its copy is queued and the buffer's last reader
/// has been released (its compute queued, so that `free[b]` stands for it): not when the
/// model asks for the piece. Between two passes the host waits for the first pass's output,
/// and the next pass's first pieces, copied during the last one, would otherwise hold their
/// slots undecoded until the host asks for them, leaving the copies idle.
struct Decoding {
    stream: Arc<CudaStream>,
    kernels: Decoders,
    /// The buffers and their device addresses.
    buffers: Vec<(DevBuf, u64)>,
    decoded: Vec<CudaEvent>,
    free: Vec<CudaEvent>,
    /// Decodings queued so far: the next goes into buffer `queued % buffers`.
    queued: u64,
    /// Decoded pieces released so far (their compute queued), in decoding order: decoding
    /// `n` may be queued once `n < released + buffers`.
    released: u64,
    /// Copies queued whose decoding is not: (slot, group, piece index in the group).
    pending: std::collections::VecDeque<(usize, usize, usize)>,
}

/// Each pass's clock and where its figures go: events on the compute stream per unit (when
/// it is asked for, and after its wait for the copy) and at the pass's end.
struct PassClock {
    units: Vec<(CudaEvent, CudaEvent)>,
    pass_end: CudaEvent,
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
    fn new(
        gpu: &Cuda,
        plan: &Plan,
        mut tier: HostTier,
        compressed: Option<Arc<Compressed>>,
        h2d_gbps: f64,
    ) -> Result<CudaCopyEngine> {
        let mut layouts: Vec<Vec<PieceLayout>> = vec![Vec::new(); plan.groups.len()];
        for p in &plan.pieces {
            let bytes: Vec<usize> = tier.groups[p.group].iter().map(|t| t.bytes).collect();
            let encoded = compressed.as_ref().map(|c| &c.groups[p.group][..]);
            layouts[p.group].push(piece_layout(&bytes, encoded, p.offset, p.bytes, SLOT_ALIGN));
        }
        // Compressed, the planner counted each slot as the largest layout; uncompressed, as
        // its bf16 bytes (the alignment padding is within the driver's reserve).
        let largest = layouts.iter().flatten().map(|l| l.extent).max();
        let slot_bytes = match &compressed {
            Some(_) => largest.unwrap_or(0),
            None => (plan.slot_bytes + SLOT_ALIGN * tier.max_tensors()).max(largest.unwrap_or(0)),
        };
        let event = |flags| gpu.ctx.new_event(flags).map_err(gpu.err("cuEventCreate"));
        let decoding = match layouts.iter().flatten().map(|l| l.decoded).max() {
            Some(n) if n > 0 => {
                // The planner sized the budget for `decode_buffers` buffers of its largest
                // decoded piece; the layouts here are the same.
                let count = plan.decode_buffers.max(1);
                let buffers = (0..count)
                    .map(|b| {
                        let buf = gpu.alloc(n, Purpose::Other(format!("decode buffer {b}")))?;
                        let ptr = gpu.ptr(&buf);
                        Ok((buf, ptr))
                    })
                    .collect::<Result<Vec<_>>>()?;
                let events = || (0..count).map(|_| event(None)).collect::<Result<Vec<_>>>();
                Some(Decoding {
                    stream: gpu
                        .ctx
                        .new_stream_with_priority(gpu.decode_priority)
                        .map_err(gpu.err("creating the decode stream"))?,
                    kernels: Decoders::load(gpu)?,
                    buffers,
                    decoded: events()?,
                    free: events()?,
                    queued: 0,
                    released: 0,
                    pending: Default::default(),
                })
            }
            _ => None,
        };
        let slots = (0..plan.slots)
            .map(|s| gpu.alloc(slot_bytes, Purpose::Slot(s)))
            .collect::<Result<Vec<_>>>()?;
        let copy = gpu
            .ctx
            .new_stream()
            .map_err(gpu.err("creating the copy stream"))?;
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
                    .filter_map(|p| tier.spans(p).last().map(|s| s.dst + s.len))
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
                let readers = Readers::new(*threads)?;
                let ring = StagingRing::new(device, buffers, plan.slots, readers, tier.source())?;
                (Some(ring), (STAGING_BUFFERS, bytes_each))
            }
            _ => (None, (0, 0)),
        };
        if let HostMode::Staged {
            buffers,
            bytes_each,
            ..
        } = &mut tier.mode
        {
            (*buffers, *bytes_each) = staging;
        }
        let clock = PassClock {
            units: plan
                .units()
                .iter()
                .map(|_| Ok((event(timing)?, event(timing)?)))
                .collect::<Result<Vec<_>>>()?,
            pass_end: event(timing)?,
            h2d_gbps,
            ctx: gpu.ctx.clone(),
            baseline_used: gpu.baseline_used,
            tracker: gpu.memory.tracker(),
            log: None,
            timeline: None,
        };
        let decode_timed = || {
            plan.pieces
                .iter()
                .map(|p| {
                    let decoded = layouts[p.group][p.index].decoded > 0;
                    decoded
                        .then(|| Ok((event(timing)?, event(timing)?)))
                        .transpose()
                })
                .collect::<Result<Vec<_>>>()
        };
        let decode_times = [decode_timed()?, decode_timed()?];
        // The slots were allocated in stream order on the compute stream; the copy stream
        // may only use them once that allocation has happened.
        gpu.synchronize()?;
        Ok(CudaCopyEngine {
            slot_addr,
            _slots: slots,
            events,
            copy,
            compute: gpu.stream.clone(),
            piece_base,
            copies_of: vec![0; plan.pieces.len()],
            ring,
            clock,
            layouts,
            compressed,
            decode_times,
            decodes_of: vec![0; plan.pieces.len()],
            decoding,
            released_early: vec![false; plan.slots],
            slot_buffer: vec![None; plan.slots],
            tier,
        })
    }

    fn err(e: cudarc::driver::DriverError, what: &str) -> Error {
        Error::Device(format!("streaming: {what}: {}", super::driver_msg(e)))
    }

    /// Queue the decodings whose copies are queued and whose buffers' last readers have been
    /// released, in order (see [`Decoding`]).
    fn queue_decodes(&mut self) -> Result<()> {
        loop {
            let Some(d) = self.decoding.as_mut() else {
                return Ok(());
            };
            let buffers = d.buffers.len() as u64;
            if d.queued >= d.released + buffers {
                return Ok(());
            }
            let Some((slot, group, index)) = d.pending.pop_front() else {
                return Ok(());
            };
            let b = (d.queued % buffers) as usize;
            d.queued += 1;
            self.decode(slot, group, index, b)?;
        }
    }

    /// Queue on the decode stream the decoding of piece `index` of `group`, copied into
    /// `slot`, into decode buffer `b`: once the copy is in and the buffer's last reader has
    /// computed. A piece all decoded releases its slot there.
    fn decode(&mut self, slot: usize, group: usize, index: usize, b: usize) -> Result<()> {
        let err = Self::err;
        let d = self
            .decoding
            .as_ref()
            .expect("decoding where pieces are encoded");
        let tensors = &self.tier.groups[group];
        let layout = &self.layouts[group][index];
        let base = self.slot_addr[slot];
        let k = self.piece_base[group] + index;
        let timed = &self.decode_times[(self.decodes_of[k] % 2) as usize][k];
        d.stream
            .wait(&self.events.copied[slot])
            .map_err(|e| err(e, "waiting for a copy to decode"))?;
        d.stream
            .wait(&d.free[b])
            .map_err(|e| err(e, "waiting for a decode buffer"))?;
        if let Some((begin, _)) = timed {
            begin
                .record(&d.stream)
                .map_err(|e| err(e, "cuEventRecord"))?;
        }
        let out = d.buffers[b].1;
        for (i, share) in layout.shares.iter().enumerate() {
            let name = &tensors[i].name;
            match *share {
                None | Some(Share::Raw { .. }) => {}
                // SAFETY: the parts lie in the slot as `place` laid them out (the copy put
                // them there and the decode stream waited for it); the decode buffer holds
                // `len` bytes at `dst` (sized from the largest layout), and its last reader
                // has computed (the decode stream waited for that too).
                Some(Share::Encoded { decode, dst, .. }) => {
                    unsafe { d.kernels.launch(&d.stream, base, &decode, out + dst as u64) }
                        .map_err(|e| err(e, &format!("decoding {name}")))?
                }
                // SAFETY: as for a decoding: `len` bytes at `src` in the slot, copied in
                // before this on the stream's order, to room in the decode buffer.
                Some(Share::Moved { src, dst, len }) => unsafe {
                    cu::cuMemcpyDtoDAsync_v2(
                        out + dst as u64,
                        base + src as u64,
                        len,
                        d.stream.cu_stream(),
                    )
                }
                .result()
                .map_err(|e| err(e, &format!("moving {name} into the decode buffer")))?,
            }
        }
        if let Some((_, end)) = timed {
            end.record(&d.stream).map_err(|e| err(e, "cuEventRecord"))?;
        }
        d.decoded[b]
            .record(&d.stream)
            .map_err(|e| err(e, "cuEventRecord"))?;
        // A piece all decoded is read from the decode buffer only: its slot is free for the
        // next copy once the decoding has run.
        if layout.decoded_whole() {
            self.events.released[slot]
                .record(&d.stream)
                .map_err(|e| err(e, "cuEventRecord"))?;
            self.released_early[slot] = true;
        }
        self.slot_buffer[slot] = Some(b);
        self.decodes_of[k] += 1;
        Ok(())
    }

    /// Views of the tensors of `piece` in `slot`: one entry per tensor of its group, None
    /// for those not in it. Encoded shares were decoded into the slot's decode buffer (queued
    /// with the copy, see [`Decoding`]); the compute stream waits for that, and their views
    /// point there.
    fn slot_views(&self, slot: usize, piece: &Piece) -> Result<Vec<Option<CudaWeight>>> {
        let tensors = &self.tier.groups[piece.group];
        let layout = &self.layouts[piece.group][piece.index];
        let base = self.slot_addr[slot];
        let buffer = match (&self.decoding, self.slot_buffer[slot]) {
            _ if layout.decoded == 0 => None,
            (Some(d), Some(b)) => Some((d, b)),
            _ => {
                return Err(Error::Device(format!(
                    "streaming: piece {} of the group holding {} asked for before its \
                     decoding was queued (an engine fault)",
                    piece.index,
                    tensors.first().map_or("no tensors", |t| t.name.as_str())
                )))
            }
        };
        let mut out: Vec<Option<CudaWeight>> = (0..tensors.len()).map(|_| None).collect();
        for (i, share) in layout.shares.iter().enumerate() {
            let t = &tensors[i];
            let (ptr, len) = match (*share, buffer) {
                (None, _) => continue,
                (Some(Share::Raw { dst, len }), _) => (base + dst as u64, len),
                (Some(Share::Encoded { dst, len, .. }), Some((d, b)))
                | (Some(Share::Moved { dst, len, .. }), Some((d, b))) => {
                    (d.buffers[b].1 + dst as u64, len)
                }
                (Some(_), None) => unreachable!("a decoded share in a piece with nothing decoded"),
            };
            out[i] = Some(CudaWeight {
                ptr,
                rows: len / (t.cols * 2),
                cols: t.cols,
                storage: WeightStorage::Slot,
            });
        }
        if let Some((d, b)) = buffer {
            self.compute
                .wait(&d.decoded[b])
                .map_err(|e| Self::err(e, "waiting for a decoding"))?;
        }
        Ok(out)
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
        let tensors = &self.tier.groups[piece.group];
        if let Some(ring) = &self.ring {
            let placed = self.tier.spans(piece);
            let spans = placed
                .iter()
                .map(|s| Span {
                    range: self.tier.range(piece.group, s.tensor),
                    src: s.src,
                    len: s.len,
                    dst: s.dst,
                })
                .collect();
            ring.submit(StagedCopy { slot, spans, tag });
            return Ok(());
        }
        let (begin, end) = self.events.timing(tag);
        self.copy
            .wait(&self.events.released[slot])
            .map_err(|e| Self::err(e, "waiting for a slot's release"))?;
        begin
            .record(&self.copy)
            .map_err(|e| Self::err(e, "cuEventRecord"))?;
        for c in &self.layouts[piece.group][piece.index].copies {
            let t = &tensors[c.tensor];
            let src = match (&self.compressed, c.encoded) {
                (Some(enc), true) => {
                    let e = enc.groups[piece.group][c.tensor]
                        .as_ref()
                        .expect("an encoded share's tensor is encoded");
                    e.storage().bytes().as_ptr() as usize + c.src
                }
                _ => t.addr + c.src,
            };
            // SAFETY: the slot holds the piece's layout (sized from the largest); the source
            // lies in host memory the tier keeps alive until the engine has synchronized (the
            // encodings are registered and held by the tier too); the copy stream waited above
            // for the slot's last reader.
            unsafe {
                cu::cuMemcpyHtoDAsync_v2(
                    self.slot_addr[slot] + c.dst as u64,
                    src as *const std::ffi::c_void,
                    c.len,
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
            .map_err(|e| Self::err(e, "cuEventRecord"))?;
        if let Some(d) = self.decoding.as_mut() {
            if self.layouts[piece.group][piece.index].decoded > 0 {
                d.pending.push_back((slot, piece.group, piece.index));
            }
        }
        self.queue_decodes()
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
        if let (Some(d), Some(b)) = (self.decoding.as_mut(), self.slot_buffer[slot].take()) {
            d.free[b]
                .record(&self.compute)
                .map_err(|e| Self::err(e, "cuEventRecord"))?;
            d.released += 1;
        }
        if !std::mem::replace(&mut self.released_early[slot], false) {
            self.events.released[slot]
                .record(&self.compute)
                .map_err(|e| Self::err(e, "cuEventRecord"))?;
        }
        self.queue_decodes()
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
        // Kernels still queued may read the slots and the decode buffers.
        if let Some(d) = &self.decoding {
            let _ = d.stream.synchronize();
        }
        let _ = self.compute.synchronize();
    }
}

impl SlotEngine for CudaCopyEngine {
    type Weight = CudaWeight;

    fn views(&self, slot: usize, piece: &Piece) -> Result<Vec<Option<CudaWeight>>> {
        self.slot_views(slot, piece)
    }

    fn mark(&mut self, unit: usize, ready: bool) -> Result<()> {
        let (asked, past_wait) = &self.clock.units[unit];
        let e = if ready { past_wait } else { asked };
        e.record(&self.compute)
            .map_err(|e| Self::err(e, "cuEventRecord"))
    }

    fn pass_end(&mut self, plan: &Plan, pass: u64) -> Result<()> {
        self.clock
            .pass_end
            .record(&self.compute)
            .map_err(|e| Self::err(e, "cuEventRecord"))?;
        if let Some(log) = &self.clock.log {
            let stats = self.pass_stats(plan, pass)?;
            log.lock().expect("stats log").push(stats);
        }
        if let Some(capture) = self.clock.timeline.as_ref().filter(|c| c.armed()) {
            capture.fill(self.pass_timeline(plan, pass)?);
        }
        Ok(())
    }
}

impl CudaCopyEngine {
    /// The copy and compute intervals of pass `pass` (which just finished), ms from its
    /// start (waits for it to end). Copies that start before 0 were queued during the pass
    /// before (prefetch).
    fn pass_timeline(&self, plan: &Plan, pass: u64) -> Result<Vec<TimelineEvent>> {
        let err = |e| Self::err(e, "reading pass timings");
        let clock = &self.clock;
        clock.pass_end.synchronize().map_err(err)?;
        let first = &clock.units[0].0;
        let since = |e: &CudaEvent| -> Result<f64> {
            // cuEventElapsedTime is signed: a prefetch copy may begin before the pass.
            Ok(first.elapsed_ms(e).map_err(err)? as f64)
        };
        let label = |unit: &Unit| match *unit {
            Unit::Group(g) => plan.groups[g].label.clone(),
            Unit::Piece(k) => {
                let p = &plan.pieces[k];
                match &plan.placement[p.group] {
                    Placement::Streamed(r) if r.len() > 1 => {
                        format!("{} {}/{}", plan.groups[p.group].label, p.index + 1, r.len())
                    }
                    _ => plan.groups[p.group].label.clone(),
                }
            }
        };
        let units = plan.units();
        let n = units.len();
        let mut events = Vec::with_capacity(2 * n);
        for (u, unit) in units.iter().enumerate() {
            let (_, after) = &clock.units[u];
            let end = if u + 1 < n {
                &clock.units[u + 1].0
            } else {
                &clock.pass_end
            };
            if let Unit::Piece(k) = *unit {
                let (b, e) = self.copy_events(pass, k);
                events.push(TimelineEvent {
                    group: label(unit),
                    lane: Lane::Copy,
                    start_ms: since(b)?,
                    end_ms: since(e)?,
                });
                if let Some((b, e)) = &self.decode_times[(pass % 2) as usize][k] {
                    events.push(TimelineEvent {
                        group: label(unit),
                        lane: Lane::Decode,
                        start_ms: since(b)?,
                        end_ms: since(e)?,
                    });
                }
            }
            // Compute starts past its wait for the copy and the decoding.
            events.push(TimelineEvent {
                group: label(unit),
                lane: Lane::Compute,
                start_ms: since(after)?,
                end_ms: since(end)?,
            });
        }
        Ok(events)
    }

    /// Stats of pass `pass` (which just finished; waits for it to end on the device).
    fn pass_stats(&self, plan: &Plan, pass: u64) -> Result<PassStats> {
        let err = |e| Self::err(e, "reading pass timings");
        let clock = &self.clock;
        clock.pass_end.synchronize().map_err(err)?;
        let units = plan.units();
        let n = units.len();
        let at = |i: usize| -> &CudaEvent {
            if i < n {
                &clock.units[i].0
            } else {
                &clock.pass_end
            }
        };
        let first = &clock.units[0].0;
        let pass_ms = first.elapsed_ms(&clock.pass_end).map_err(err)? as f64;
        let mut stall_ms = 0.0;
        let mut group_compute_ms = vec![0.0; plan.groups.len()];
        for (u, unit) in units.iter().enumerate() {
            let (before, after) = &clock.units[u];
            // Waiting for a copy or for its decoding (on its own stream) is stall.
            stall_ms += before.elapsed_ms(after).map_err(err)? as f64;
            let compute = after.elapsed_ms(at(u + 1)).map_err(err)? as f64;
            let g = match *unit {
                Unit::Group(g) => g,
                Unit::Piece(k) => plan.pieces[k].group,
            };
            group_compute_ms[g] += compute;
        }
        let streamed_bytes = plan.streamed_bytes();
        let copy_ms = if streamed_bytes > 0 {
            self.copy_ms(pass)?
        } else {
            0.0
        };
        let compute_ms = pass_ms - stall_ms;
        let mut decode_ms = 0.0;
        for (b, e) in self.decode_times[(pass % 2) as usize].iter().flatten() {
            decode_ms += b.elapsed_ms(e).map_err(err)? as f64;
        }
        // The PCIe bound at the measured bandwidth, or at this pass's if it did better.
        let gbps = if copy_ms > 0.0 {
            clock.h2d_gbps.max(streamed_bytes as f64 / (copy_ms * 1e6))
        } else {
            clock.h2d_gbps
        };
        let bound_ms = compute_ms.max(streamed_bytes as f64 / (gbps * 1e6));
        Ok(PassStats {
            pass_ms,
            stall_ms,
            compute_ms,
            decode_ms,
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
                let (free, total) = clock.ctx.mem_get_info().map_err(err)?;
                (total - free).saturating_sub(clock.baseline_used)
            },
            allocated_peak: clock.tracker.peak(),
            group_compute_ms,
        })
    }
}

/// The device's decoders: exponent-coded bf16 (`decompress.cu`) and ggml blocks
/// (`dequantize.cu`).
pub struct Decoders {
    exponents: CudaFunction,
    blocks: CudaFunction,
}

impl Decoders {
    pub fn load(gpu: &Cuda) -> Result<Decoders> {
        Ok(Decoders {
            exponents: gpu.function(&super::compile::DECOMPRESS, "decompress_bf16", 0)?,
            blocks: gpu.function(&super::compile::DEQUANTIZE, "dequantize_bf16", 0)?,
        })
    }

    /// Queue on `stream` the decoding of the share `d` laid out from device address `base`
    /// into bf16 at `out`.
    ///
    /// # Safety
    /// `base` must hold the share as [`crate::stream::compress::Encoding::place`] laid it
    /// out, `out` room for `d.numel()` bf16 values (16-byte aligned), both alive until the
    /// kernel has run.
    pub unsafe fn launch(
        &self,
        stream: &CudaStream,
        base: u64,
        d: &Decode,
        out: u64,
    ) -> std::result::Result<(), cudarc::driver::DriverError> {
        match d {
            Decode::Exponents(d) => {
                let (lut, starts, sm, words) = (
                    base + d.lut as u64,
                    base + d.starts as u64,
                    base + d.sm as u64,
                    base + d.words as u64,
                );
                let (numel, segment, blocks) =
                    (d.numel as u64, d.segment as u64, d.blocks() as u64);
                let mut b = stream.launch_builder(&self.exponents);
                b.arg(&lut)
                    .arg(&starts)
                    .arg(&sm)
                    .arg(&words)
                    .arg(&out)
                    .arg(&numel)
                    .arg(&segment)
                    .arg(&d.base_bit)
                    .arg(&blocks);
                // One warp per block of the share, 8 warps per thread block (decompress.cu).
                let cfg = LaunchConfig {
                    grid_dim: (blocks.div_ceil(8).max(1) as u32, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: the arguments match `decompress_bf16`; the caller vouches for the
                // memory.
                unsafe { b.launch(cfg) }.map(|_| ())
            }
            Decode::Blocks(d) => {
                let (src, numel) = (base + d.src as u64, d.numel as u64);
                let (ty, per, bytes) =
                    (d.ty.id(), d.ty.block_size() as u32, d.ty.type_size() as u32);
                let mut b = stream.launch_builder(&self.blocks);
                b.arg(&src)
                    .arg(&out)
                    .arg(&numel)
                    .arg(&ty)
                    .arg(&per)
                    .arg(&bytes);
                // 8 elements a thread, 256 threads a block (dequantize.cu).
                let cfg = LaunchConfig {
                    grid_dim: (numel.div_ceil(8 * 256).max(1) as u32, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: the arguments match `dequantize_bf16`; the caller vouches for the
                // memory.
                unsafe { b.launch(cfg) }.map(|_| ())
            }
        }
    }
}

/// Decode all of `encoded` on the GPU `runs` times: its bf16 bits as decoded, and the median
/// decoding speed, GB/s of bf16 written (for tests and bench notes).
pub fn decode_on_gpu(gpu: &Cuda, encoded: &Encoding, runs: usize) -> Result<(Vec<u16>, f64)> {
    let n = encoded.numel();
    let placed = encoded
        .place(0..n, 0, SLOT_ALIGN)
        .expect("a whole tensor is whole segments");
    let mut host = vec![0u8; placed.end];
    let source = encoded.storage().bytes();
    for c in &placed.copies {
        host[c.dst..c.dst + c.len].copy_from_slice(&source[c.src..c.src + c.len]);
    }
    let slot = gpu.upload(&host, Purpose::Other("decode test".into()))?;
    let out = gpu.alloc(2 * n, Purpose::Other("decode test".into()))?;
    let decoders = Decoders::load(gpu)?;
    let (base, out_ptr) = (gpu.ptr(&slot), gpu.ptr(&out));
    let timing = Some(cu::CUevent_flags::CU_EVENT_DEFAULT);
    let event = || gpu.ctx.new_event(timing).map_err(gpu.err("cuEventCreate"));
    let mut ms = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        let (b, e) = (event()?, event()?);
        b.record(&gpu.stream).map_err(gpu.err("cuEventRecord"))?;
        // SAFETY: `slot` holds the share as placed from address 0, `out` 2 n bytes.
        unsafe { decoders.launch(&gpu.stream, base, &placed.decode, out_ptr) }
            .map_err(gpu.err("decoding on the GPU"))?;
        e.record(&gpu.stream).map_err(gpu.err("cuEventRecord"))?;
        e.synchronize().map_err(gpu.err("decode timing"))?;
        ms.push(b.elapsed_ms(&e).map_err(gpu.err("decode timing"))? as f64);
    }
    ms.sort_by(f64::total_cmp);
    let gbps = 2.0 * n as f64 / (ms[ms.len() / 2] * 1e6);
    Ok((gpu.download::<u16>(out_ptr, n)?, gbps))
}

/// The model's weights on the GPU: resident groups uploaded once, the embedding read from
/// host memory (by the kernel where it is registered, else gathered by the host), every
/// other group streamed through the slots.
pub type StreamedWeights = crate::stream::StreamedWeights<CudaCopyEngine>;

impl StreamedWeights {
    /// Upload the resident groups, allocate the slots and queue the first copies.
    pub fn new(
        gpu: &Cuda,
        model: &GroupTensors,
        plan: Plan,
        tier: HostTier,
        compressed: Option<Arc<Compressed>>,
        h2d_gbps: f64,
    ) -> Result<StreamedWeights> {
        let mut resident = Vec::with_capacity(plan.groups.len());
        for (g, place) in plan.placement.iter().enumerate() {
            let tensors = &model.groups[g];
            resident.push(match place {
                Placement::Resident => tensors
                    .iter()
                    .map(|t| gpu.weight(t))
                    .collect::<Result<Vec<_>>>()?,
                Placement::HostGather => tensors
                    .iter()
                    .enumerate()
                    .map(|(i, t)| {
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
        let engine = CudaCopyEngine::new(gpu, &plan, tier, compressed, h2d_gbps)?;
        StreamedWeights::start(engine, plan, &model.splits, resident)
    }

    /// Append every pass's stats to `log` from now on (`--stats`).
    pub fn log_stats(&mut self, log: Arc<Mutex<Vec<PassStats>>>) {
        self.engine_mut().clock.log = Some(log);
    }

    /// Hand the timeline of each pass that ends while `capture` is armed to `capture`
    /// (`ferry bench --timeline`: the Generator owns these weights, so the pass is read here).
    pub fn capture_timeline(&mut self, capture: TimelineCapture) {
        self.engine_mut().clock.timeline = Some(capture);
    }

    pub fn host_mode(&self) -> &HostMode {
        &self.engine().tier.mode
    }

    /// Measured host→device bandwidth, GB/s.
    pub fn h2d_gbps(&self) -> f64 {
        self.engine().clock.h2d_gbps
    }

    /// The copy and compute intervals of the pass that just finished, ms from its start, for
    /// a timeline picture (waits for the pass to end). Call after a pass, before the next
    /// begins.
    pub fn pass_timeline(&self) -> Result<Vec<TimelineEvent>> {
        self.engine()
            .pass_timeline(self.plan(), self.passes().saturating_sub(1))
    }

    /// Stats of the pass that just finished (waits for it to end on the device). Call after
    /// each pass, before the next begins.
    pub fn pass_stats(&self) -> Result<PassStats> {
        self.engine()
            .pass_stats(self.plan(), self.passes().saturating_sub(1))
    }

    /// The plan's schedule simulated with measured compute times per group and the measured
    /// H2D bandwidth: the prediction to hold the measurement against.
    pub fn predict_measured(&self, group_compute_ms: &[f64]) -> Prediction {
        self.plan().predict(group_compute_ms, self.h2d_gbps())
    }
}
