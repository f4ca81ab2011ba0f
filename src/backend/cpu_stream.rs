//! Streaming on the CPU: [`CpuCopyEngine`], a [`SlotEngine`] whose "device" is host memory
//! counted against a budget, so that the streaming loop that ships on the GPU runs in
//! `cargo test` on any machine. The slots are owned buffers; the copy queue is a thread that
//! copies each piece into its slot (taking `bytes / h2d_gbps` when given a speed); the
//! compute queue is the calling thread, and the model computes on views of the slots' own
//! memory. A copy that finds a view of its slot still alive is a broken schedule: it is
//! logged as [`EngineEvent::Overwrite`] (and not made), so tests can assert there were none.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::cpu::{Cpu, CpuWeight};
use super::Backend;
use crate::checkpoint::{DType, HostTensor, Storage};
use crate::error::Error;
use crate::error::Result;
use crate::stream::blocks;
use crate::stream::budget::{Allocation, BudgetAllocator, DeviceMemory, Purpose};
use crate::stream::compress::{self, piece_layout, Compressed, Decode, PieceLayout, Share};
use crate::stream::plan::{Piece, Placement, Plan};
use crate::stream::schedule::CopyEngine;
use crate::stream::streamed::{slot_spans, GroupTensors, SlotEngine, SlotSpan, StreamedWeights};

/// Where in a slot each tensor's share starts: a multiple of this many bytes (f32 and bf16
/// views need 4; tensors of whole 16-byte rows then lie back to back, with no padding
/// beyond what the plan counted).
pub const SLOT_ALIGN: usize = 16;

/// Host memory standing in for device memory: owned, 8-byte aligned buffers that weights can
/// view in place.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostStorage;

impl DeviceMemory for HostStorage {
    type Buffer = Arc<Storage>;
    fn alloc(&self, bytes: usize) -> Result<Arc<Storage>> {
        Ok(Arc::new(Storage::owned(bytes)))
    }
}

/// What the CPU engine did, with the time it happened; for tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineEvent {
    /// A copy of piece `index` of `group` into `slot` began (the copy queue had passed its
    /// wait).
    CopyBegin {
        slot: usize,
        group: usize,
        index: usize,
    },
    CopyEnd {
        slot: usize,
        group: usize,
        index: usize,
    },
    /// The compute queue passed `wait_copied(slot)`: the slot is in use.
    UseBegin { slot: usize },
    /// `release(slot)`: the slot's compute has finished.
    UseEnd { slot: usize },
    /// A copy into `slot` found a view of the slot still held by the compute side, and was
    /// not made: the schedule broke its contract.
    Overwrite { slot: usize },
}

impl EngineEvent {
    pub fn slot(&self) -> usize {
        match *self {
            EngineEvent::CopyBegin { slot, .. }
            | EngineEvent::CopyEnd { slot, .. }
            | EngineEvent::UseBegin { slot }
            | EngineEvent::UseEnd { slot }
            | EngineEvent::Overwrite { slot } => slot,
        }
    }
}

#[derive(Default)]
struct EngineState {
    /// Per slot: recordings of `copied` queued, and completed.
    copied_recorded: Vec<u64>,
    copied_done: Vec<u64>,
    /// Per slot: recordings of `released` (complete when recorded: the host is the compute
    /// queue).
    released: Vec<u64>,
    /// Per slot: between `wait_copied` and `release`.
    in_use: Vec<bool>,
    copies_queued: u64,
    copies_done: u64,
    log: Vec<(Instant, EngineEvent)>,
}

struct Shared {
    state: Mutex<EngineState>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, EngineState> {
        // A panic while holding the lock is a test's assertion; the state is still readable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct CopyCommand {
    slot: usize,
    piece: Piece,
    /// Wait until `released[slot]` has reached this recording.
    after_released: u64,
}

type Slot = Mutex<Allocation<Arc<Storage>>>;

/// A [`CopyEngine`] on the CPU: slots of host memory allocated through the budget, a copy
/// queue that is a thread, and the calling thread as the compute queue.
pub struct CpuCopyEngine {
    shared: Arc<Shared>,
    slots: Arc<Vec<Slot>>,
    /// Per group (pass order), its tensors in group order: what the copies read.
    host: Arc<Vec<Vec<HostTensor>>>,
    /// Per group, per piece: how it lies in a slot.
    layouts: Arc<Vec<Vec<PieceLayout>>>,
    /// Where encoded pieces are decoded (none when nothing streams encoded).
    decoded: Option<Slot>,
    queue: Option<Sender<CopyCommand>>,
    thread: Option<JoinHandle<()>>,
    stall: Duration,
}

impl CpuCopyEngine {
    /// The slots of `plan` from `allocator`, each as large as its largest piece laid out in
    /// it; copies read `host[group]` (each group's tensors, concatenated in order), or their
    /// encodings in `compressed`, at `h2d_gbps` GB/s, or as fast as memory allows.
    pub fn new(
        allocator: &BudgetAllocator<HostStorage>,
        plan: &Plan,
        host: Vec<Vec<HostTensor>>,
        compressed: Option<Arc<Compressed>>,
        h2d_gbps: Option<f64>,
    ) -> Result<Self> {
        let mut layouts: Vec<Vec<PieceLayout>> = vec![Vec::new(); host.len()];
        for p in &plan.pieces {
            let bytes: Vec<usize> = host[p.group]
                .iter()
                .map(|t| compress::device_bytes(t, false))
                .collect();
            let encoded = compressed.as_ref().map(|c| &c.groups[p.group][..]);
            layouts[p.group].push(piece_layout(&bytes, encoded, p.offset, p.bytes, SLOT_ALIGN));
        }
        let slot_bytes = layouts
            .iter()
            .flatten()
            .map(|l| l.extent)
            .max()
            .unwrap_or(0);
        let decoded = match layouts.iter().flatten().map(|l| l.decoded).max() {
            Some(n) if n > 0 => Some(Mutex::new(
                allocator.alloc(Purpose::Other("decode buffer".into()), n)?,
            )),
            _ => None,
        };
        let layouts = Arc::new(layouts);
        let slots = plan.slots;
        let buffers = (0..slots)
            .map(|s| {
                allocator
                    .alloc(Purpose::Slot(s), slot_bytes)
                    .map(Mutex::new)
            })
            .collect::<Result<Vec<_>>>()?;
        let slots_mem = Arc::new(buffers);
        let host = Arc::new(host);
        let shared = Arc::new(Shared {
            state: Mutex::new(EngineState {
                copied_recorded: vec![0; slots],
                copied_done: vec![0; slots],
                released: vec![0; slots],
                in_use: vec![false; slots],
                ..EngineState::default()
            }),
            changed: Condvar::new(),
        });
        let (tx, rx) = channel();
        let thread = {
            let source = Source {
                host: host.clone(),
                compressed,
                layouts: layouts.clone(),
            };
            let (shared, slots_mem) = (shared.clone(), slots_mem.clone());
            std::thread::spawn(move || copy_queue(rx, &shared, &slots_mem, &source, h2d_gbps))
        };
        Ok(CpuCopyEngine {
            shared,
            slots: slots_mem,
            host,
            layouts,
            decoded,
            queue: Some(tx),
            thread: Some(thread),
            stall: Duration::ZERO,
        })
    }

    /// The memory of `slot` (hold only while computing on an acquired piece).
    pub fn slot(&self, slot: usize) -> MutexGuard<'_, Allocation<Arc<Storage>>> {
        self.slots[slot].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Everything the engine did so far, in order.
    pub fn log(&self) -> Vec<(Instant, EngineEvent)> {
        self.shared.lock().log.clone()
    }

    /// Time the compute queue (the host) waited for copies.
    pub fn stall(&self) -> Duration {
        self.stall
    }
}

/// Where the tensors' shares of `piece` lie in a slot.
fn spans(host: &[Vec<HostTensor>], piece: &Piece) -> Vec<SlotSpan> {
    slot_spans(
        host[piece.group].iter().map(|t| t.bytes().len()),
        piece.offset,
        piece.bytes,
        SLOT_ALIGN,
    )
}

/// Bytes a piece laid out in a slot takes.
fn extent(spans: &[SlotSpan]) -> usize {
    spans.last().map_or(0, |s| s.dst + s.len)
}

/// What the copy queue reads: the tensors, their encodings, and where each piece goes.
struct Source {
    host: Arc<Vec<Vec<HostTensor>>>,
    compressed: Option<Arc<Compressed>>,
    layouts: Arc<Vec<Vec<PieceLayout>>>,
}

impl Source {
    /// The bytes a copy reads.
    fn bytes(&self, group: usize, c: &compress::SlotCopy) -> &[u8] {
        let all = if c.encoded {
            let encoded = self
                .compressed
                .as_ref()
                .expect("encoded copies have encodings");
            encoded.groups[group][c.tensor]
                .as_ref()
                .expect("an encoded share's tensor is encoded")
                .storage()
                .bytes()
        } else {
            self.host[group][c.tensor].bytes()
        };
        &all[c.src..c.src + c.len]
    }
}

/// The copy queue's thread: run copies in order, each after its wait.
fn copy_queue(
    rx: Receiver<CopyCommand>,
    shared: &Shared,
    slots: &[Slot],
    source: &Source,
    h2d_gbps: Option<f64>,
) {
    for cmd in rx {
        {
            let mut st = shared.lock();
            while st.released[cmd.slot] < cmd.after_released {
                st = shared.changed.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        }
        let p = &cmd.piece;
        let (slot, group, index) = (cmd.slot, p.group, p.index);
        let layout = &source.layouts[group][index];
        let duration =
            h2d_gbps.map(|g| Duration::from_secs_f64(layout.copy_bytes() as f64 / (g * 1e9)));
        let mut mem = slots[slot].lock().unwrap_or_else(|e| e.into_inner());
        let begin = Instant::now();
        // Only the compute side's views share the slot's memory, and they must be gone
        // once the slot is released.
        let Some(bytes) = Arc::get_mut(&mut mem).and_then(Storage::bytes_mut) else {
            shared
                .lock()
                .log
                .push((begin, EngineEvent::Overwrite { slot }));
            drop(mem);
            finish_copy(shared, slot);
            continue;
        };
        shared
            .lock()
            .log
            .push((begin, EngineEvent::CopyBegin { slot, group, index }));
        for c in &layout.copies {
            bytes[c.dst..c.dst + c.len].copy_from_slice(source.bytes(group, c));
        }
        if let Some(d) = duration {
            sleep_until(begin + d);
        }
        drop(mem);
        shared
            .lock()
            .log
            .push((Instant::now(), EngineEvent::CopyEnd { slot, group, index }));
        finish_copy(shared, slot);
    }
}

fn finish_copy(shared: &Shared, slot: usize) {
    let mut st = shared.lock();
    st.copied_done[slot] += 1;
    st.copies_done += 1;
    shared.changed.notify_all();
}

fn sleep_until(deadline: Instant) {
    let now = Instant::now();
    if deadline > now {
        std::thread::sleep(deadline - now);
    }
}

impl CopyEngine for CpuCopyEngine {
    fn copy(&mut self, slot: usize, piece: &Piece) -> Result<()> {
        let after_released = {
            let mut st = self.shared.lock();
            // The contract, checked: on a GPU this copy's wait would refer to the slot's
            // previous release, and the copy could overwrite it under running kernels.
            assert!(
                !st.in_use[slot],
                "copy queued into slot {slot} while it is in use (acquired, not released)"
            );
            st.copied_recorded[slot] += 1;
            st.copies_queued += 1;
            st.released[slot]
        };
        self.queue
            .as_ref()
            .expect("queue open until drop")
            .send(CopyCommand {
                slot,
                piece: piece.clone(),
                after_released,
            })
            .expect("the copy thread runs until drop");
        Ok(())
    }

    fn wait_copied(&mut self, slot: usize) -> Result<()> {
        let start = Instant::now();
        let mut st = self.shared.lock();
        let target = st.copied_recorded[slot];
        assert!(
            target > 0,
            "slot {slot} used before any copy into it was queued"
        );
        while st.copied_done[slot] < target {
            st = self
                .shared
                .changed
                .wait(st)
                .unwrap_or_else(|e| e.into_inner());
        }
        st.in_use[slot] = true;
        st.log
            .push((Instant::now(), EngineEvent::UseBegin { slot }));
        drop(st);
        self.stall += start.elapsed();
        Ok(())
    }

    fn release(&mut self, slot: usize) -> Result<()> {
        let mut st = self.shared.lock();
        st.released[slot] += 1;
        st.in_use[slot] = false;
        st.log.push((Instant::now(), EngineEvent::UseEnd { slot }));
        self.shared.changed.notify_all();
        Ok(())
    }

    fn synchronize(&mut self) -> Result<()> {
        let mut st = self.shared.lock();
        while st.copies_done < st.copies_queued {
            st = self
                .shared
                .changed
                .wait(st)
                .unwrap_or_else(|e| e.into_inner());
        }
        Ok(())
    }
}

impl SlotEngine for CpuCopyEngine {
    type Weight = CpuWeight;

    /// Views of the slot's memory: the weights the model computes on are the bytes the copy
    /// put there, or, for encoded shares, what they decode to in the decode buffer.
    fn views(&self, slot: usize, piece: &Piece) -> Result<Vec<Option<CpuWeight>>> {
        let tensors = &self.host[piece.group];
        let layout = &self.layouts[piece.group][piece.index];
        let storage = Arc::clone(&self.slot(slot));
        let decoded = self.decode(&storage, layout)?;
        let mut out: Vec<Option<CpuWeight>> = (0..tensors.len()).map(|_| None).collect();
        for (i, share) in layout.shares.iter().enumerate() {
            let t = &tensors[i];
            let (memory, dst, len, dtype) = match *share {
                None => continue,
                Some(Share::Raw { dst, len }) => (&storage, dst, len, t.dtype),
                Some(Share::Moved { dst, len, .. }) => {
                    (decoded.as_ref().expect("decoded above"), dst, len, t.dtype)
                }
                Some(Share::Encoded { decode, dst, len }) => {
                    let dtype = match decode {
                        Decode::Exponents(_) => t.dtype,
                        Decode::Blocks(_) => DType::F32,
                    };
                    (decoded.as_ref().expect("decoded above"), dst, len, dtype)
                }
            };
            let view = HostTensor::new(
                t.name.clone(),
                dtype,
                block_shape(t, len, dtype),
                memory.clone(),
                dst,
                len,
            );
            out[i] = Some(Cpu.weight(&view)?);
        }
        Ok(out)
    }
}

impl CpuCopyEngine {
    /// Decode the encoded shares of `layout` from `slot` into the decode buffer, and hand it
    /// out for views (`None` when nothing in the piece is encoded).
    fn decode(&self, slot: &Storage, layout: &PieceLayout) -> Result<Option<Arc<Storage>>> {
        if layout.decoded == 0 {
            return Ok(None);
        }
        let mut buffer = self
            .decoded
            .as_ref()
            .expect("a decode buffer where pieces are encoded")
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let out = Arc::get_mut(&mut buffer)
            .and_then(Storage::bytes_mut)
            .ok_or_else(|| {
                Error::Device(
                    "streaming: the decode buffer is still viewed by the piece before".into(),
                )
            })?;
        for share in layout.shares.iter().flatten() {
            match *share {
                Share::Encoded { decode, dst, len } => {
                    let out = &mut out[dst..dst + len];
                    match decode {
                        Decode::Exponents(d) => {
                            compress::decode(slot.bytes(), &d, bytemuck::cast_slice_mut(out))
                        }
                        Decode::Blocks(d) => {
                            blocks::decode_f32(slot.bytes(), &d, bytemuck::cast_slice_mut(out))
                        }
                    }
                }
                Share::Moved { src, dst, len } => {
                    out[dst..dst + len].copy_from_slice(&slot.bytes()[src..src + len])
                }
                Share::Raw { .. } => {}
            }
        }
        Ok(Some(Arc::clone(&buffer)))
    }
}

/// The shape of `len` bytes of `t`, held as `dtype`, taken as whole rows.
fn block_shape(t: &HostTensor, len: usize, dtype: DType) -> Vec<usize> {
    let row = dtype.bytes(t.shape[1..].iter().product::<usize>());
    if t.shape.len() < 2 || len == dtype.bytes(t.numel()) {
        return t.shape.clone();
    }
    let mut shape = t.shape.clone();
    shape[0] = len / row;
    shape
}

impl Drop for CpuCopyEngine {
    fn drop(&mut self) {
        // Closing the queue ends the thread once it has run what is queued. Copies waiting
        // for a release that will never come are dropped unrun: release every slot first.
        {
            let mut st = self.shared.lock();
            for r in st.released.iter_mut() {
                *r = u64::MAX;
            }
            self.shared.changed.notify_all();
        }
        self.queue.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Resident groups' memory on the CPU "device": kept alive beside the weights that view it.
pub type ResidentMemory = Vec<Allocation<Arc<Storage>>>;

/// The model's weights for the CPU backend as `plan` streams them: resident groups copied
/// into memory from `allocator` (so that the ledger sees everything a device would hold),
/// host-gathered groups read in place, the rest through [`CpuCopyEngine`]'s slots (encoded
/// where `compressed` holds encodings).
pub fn cpu_streamed_weights(
    model: &GroupTensors,
    plan: Plan,
    allocator: &BudgetAllocator<HostStorage>,
    compressed: Option<Arc<Compressed>>,
    h2d_gbps: Option<f64>,
) -> Result<(StreamedWeights<CpuCopyEngine>, ResidentMemory)> {
    let host = model.groups.clone();
    let mut allocations = Vec::new();
    let mut resident = Vec::with_capacity(host.len());
    for (g, place) in plan.placement.iter().enumerate() {
        resident.push(match place {
            Placement::HostGather => host[g]
                .iter()
                .map(|t| Cpu.weight(t))
                .collect::<Result<Vec<_>>>()?,
            Placement::Resident => {
                let bytes = host[g].iter().map(|t| t.bytes().len()).sum();
                let all = Piece {
                    group: g,
                    index: 0,
                    offset: 0,
                    bytes,
                    compute_ms: 0.0,
                    copy_bytes: bytes,
                    decode_ms: 0.0,
                    decoded_whole: false,
                };
                let placed = spans(&host, &all);
                let label = plan.groups[g].label.clone();
                let mut mem = allocator.alloc(Purpose::Resident(label), extent(&placed))?;
                let bytes = Arc::get_mut(&mut mem)
                    .and_then(Storage::bytes_mut)
                    .expect("a new owned buffer");
                for s in &placed {
                    bytes[s.dst..s.dst + s.len].copy_from_slice(host[g][s.tensor].bytes());
                }
                let weights = host[g]
                    .iter()
                    .enumerate()
                    .map(|(i, t)| match placed.iter().find(|s| s.tensor == i) {
                        Some(s) => Cpu.weight(&HostTensor::new(
                            t.name.clone(),
                            t.dtype,
                            t.shape.clone(),
                            Arc::clone(&mem),
                            s.dst,
                            s.len,
                        )),
                        None => Cpu.weight(t), // no bytes
                    })
                    .collect::<Result<Vec<_>>>()?;
                allocations.push(mem);
                weights
            }
            Placement::Streamed(_) => Vec::new(),
        });
    }
    let engine = CpuCopyEngine::new(allocator, &plan, host, compressed, h2d_gbps)?;
    let weights = StreamedWeights::start(engine, plan, &model.splits, resident)?;
    Ok((weights, allocations))
}
