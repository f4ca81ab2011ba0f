//! The streamer's schedule, written against a small copy-engine interface so that it runs the
//! same over CUDA and over [`CpuCopyEngine`] (a thread that copies with a delay), on which
//! tests check it without a GPU.
//!
//! The schedule: streamed pieces go through a ring of `slots` slots in pass order. Sequence
//! number `j` (counting over passes) is piece `j mod pieces` in slot `j mod slots`. At the
//! start, copies `0..slots` are queued (prefetch). Computing piece `j` waits for copy `j`;
//! when its compute has been queued, the slot is released and copy `j + slots` — the next
//! piece, wrapping into the next pass — is queued into it at once. The host never waits for
//! the device inside a pass: every wait is queue-to-queue.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::budget::{Allocation, BudgetAllocator, HeapMemory, Purpose};
use super::plan::{Piece, Plan, Unit};
use crate::error::Result;

/// The device side of streaming: a copy queue and a ring of slots.
///
/// Two queues execute in order, each on its own: the **copy queue** (CUDA: a stream used only
/// for host→device copies) and the **compute queue** (the stream the model's kernels run on).
/// Each slot `s` has two events, made once when the engine is made and re-recorded at every
/// use (never created inside a pass):
/// - `copied[s]`, recorded on the copy queue after a copy into `s`;
/// - `released[s]`, recorded on the compute queue after the last kernel that reads `s`.
///
/// "Wait for an event" means: the waiting queue does not run past this point until the
/// event's most recent recording *as of the moment the wait is queued* has completed
/// (`cuStreamWaitEvent`); waiting for an event never recorded does not wait. So the order of
/// calls on the host is the contract: [`Streamer`] calls `release(s)` before it queues the
/// next `copy(s, ..)`, and `copy(s, ..)` before `wait_copied(s)`.
///
/// No method may block the host on device work except [`CopyEngine::synchronize`]. (The CPU
/// engine is the exception that proves the rule: its compute queue *is* the host, so its
/// `wait_copied` blocks the host.)
pub trait CopyEngine {
    /// Queue on the copy queue: wait for `released[slot]`, copy the bytes of `piece` (its
    /// group's bytes `offset..offset + bytes`, the group's tensors concatenated in group
    /// order) from host memory to the start of `slot`, record `copied[slot]`.
    fn copy(&mut self, slot: usize, piece: &Piece) -> Result<()>;
    /// Queue on the compute queue: wait for `copied[slot]`. Kernels queued after this may
    /// read the slot.
    fn wait_copied(&mut self, slot: usize) -> Result<()>;
    /// Queue on the compute queue: record `released[slot]`. Every kernel that reads the slot
    /// for the piece in it must have been queued before this call.
    fn release(&mut self, slot: usize) -> Result<()>;
    /// Block the host until every queued copy has completed (before slots are freed or the
    /// host memory they read is unmapped).
    fn synchronize(&mut self) -> Result<()>;
}

/// Runs the ring of slots over a [`CopyEngine`] for a plan's streamed pieces, pass after
/// pass.
pub struct Streamer<E: CopyEngine> {
    engine: E,
    pieces: Vec<Piece>,
    slots: usize,
    /// Sequence number of the next piece to compute.
    next: u64,
    /// The sequence number acquired and not yet released.
    held: Option<u64>,
}

/// A streamed piece ready in a slot (once the compute queue has passed the wait).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Acquired {
    /// Index into `Plan::pieces`.
    pub piece: usize,
    pub slot: usize,
    /// Sequence number over all passes.
    pub seq: u64,
}

impl<E: CopyEngine> Streamer<E> {
    /// Start streaming `plan`: queue the first `slots` copies (prefetch).
    pub fn new(mut engine: E, plan: &Plan) -> Result<Self> {
        let pieces = plan.pieces.clone();
        if !pieces.is_empty() {
            assert!(plan.slots > 0, "a plan that streams has slots");
            for j in 0..plan.slots {
                engine.copy(j, &pieces[j % pieces.len()])?;
            }
        }
        Ok(Streamer {
            engine,
            pieces,
            slots: plan.slots,
            next: 0,
            held: None,
        })
    }

    /// The next piece in pass order: make the compute queue wait for its copy, and say which
    /// slot holds it.
    pub fn acquire(&mut self) -> Result<Acquired> {
        assert!(self.held.is_none(), "acquire after acquire without release");
        assert!(
            !self.pieces.is_empty(),
            "acquire on a plan that streams nothing"
        );
        let seq = self.next;
        let slot = (seq % self.slots as u64) as usize;
        self.engine.wait_copied(slot)?;
        self.held = Some(seq);
        Ok(Acquired {
            piece: (seq % self.pieces.len() as u64) as usize,
            slot,
            seq,
        })
    }

    /// The compute that reads the acquired piece has been queued: release its slot and queue
    /// the copy of the piece `slots` ahead (wrapping into the next pass) into it.
    pub fn release(&mut self) -> Result<()> {
        let seq = self.held.take().expect("release without acquire");
        let slot = (seq % self.slots as u64) as usize;
        self.engine.release(slot)?;
        let ahead = seq + self.slots as u64;
        let piece = &self.pieces[(ahead % self.pieces.len() as u64) as usize];
        self.engine.copy(slot, piece)?;
        self.next = seq + 1;
        Ok(())
    }

    pub fn engine(&self) -> &E {
        &self.engine
    }

    /// Stop: wait for the copies still queued (the prefetch of a pass that will not come)
    /// and hand the engine back.
    pub fn finish(mut self) -> Result<E> {
        assert!(self.held.is_none(), "finish while a piece is acquired");
        self.engine.synchronize()?;
        Ok(self.engine)
    }
}

/// One step of a pass for the compute callback of [`run_pass`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// A resident or host-gathered group, whole.
    Group(usize),
    /// A streamed piece, in `slot`.
    Piece(Acquired),
}

/// One pass of `plan`: every step in pass order, streamed pieces acquired from `streamer`
/// before `compute` and released after it. `compute` gets the engine too, to reach the slot.
pub fn run_pass<E: CopyEngine>(
    plan: &Plan,
    streamer: &mut Streamer<E>,
    mut compute: impl FnMut(Step, &E) -> Result<()>,
) -> Result<()> {
    for unit in plan.units() {
        match unit {
            Unit::Group(g) => compute(Step::Group(g), &streamer.engine)?,
            Unit::Piece(k) => {
                let acquired = streamer.acquire()?;
                assert_eq!(acquired.piece, k, "pieces are computed in pass order");
                compute(Step::Piece(acquired), &streamer.engine)?;
                streamer.release()?;
            }
        }
    }
    Ok(())
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

/// A [`CopyEngine`] on the CPU: slots are host buffers allocated through the budget, the copy
/// queue is a thread that copies each piece and takes `bytes / h2d_gbps` to do it, and the
/// compute queue is the calling thread.
pub struct CpuCopyEngine {
    shared: Arc<Shared>,
    slots: Arc<Vec<Mutex<Allocation<Vec<u8>>>>>,
    queue: Option<Sender<CopyCommand>>,
    thread: Option<JoinHandle<()>>,
    stall: Duration,
}

impl CpuCopyEngine {
    /// `slots` slots of `slot_bytes` from `allocator`; copies read `host[group]` (each group's
    /// bytes) at `h2d_gbps` GB/s.
    pub fn new(
        allocator: &BudgetAllocator<HeapMemory>,
        slots: usize,
        slot_bytes: usize,
        host: Arc<Vec<Vec<u8>>>,
        h2d_gbps: f64,
    ) -> Result<Self> {
        let buffers = (0..slots)
            .map(|s| {
                allocator
                    .alloc(Purpose::Slot(s), slot_bytes)
                    .map(Mutex::new)
            })
            .collect::<Result<Vec<_>>>()?;
        let slots_mem = Arc::new(buffers);
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
            let (shared, slots_mem) = (shared.clone(), slots_mem.clone());
            std::thread::spawn(move || copy_queue(rx, &shared, &slots_mem, &host, h2d_gbps))
        };
        Ok(CpuCopyEngine {
            shared,
            slots: slots_mem,
            queue: Some(tx),
            thread: Some(thread),
            stall: Duration::ZERO,
        })
    }

    /// The bytes of `slot` (hold only while computing on an acquired piece).
    pub fn slot(&self, slot: usize) -> MutexGuard<'_, Allocation<Vec<u8>>> {
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

/// The copy queue's thread: run copies in order, each after its wait.
fn copy_queue(
    rx: Receiver<CopyCommand>,
    shared: &Shared,
    slots: &[Mutex<Allocation<Vec<u8>>>],
    host: &[Vec<u8>],
    h2d_gbps: f64,
) {
    for cmd in rx {
        {
            let mut st = shared.lock();
            while st.released[cmd.slot] < cmd.after_released {
                st = shared.changed.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        }
        let p = &cmd.piece;
        let duration = Duration::from_secs_f64(p.bytes as f64 / (h2d_gbps * 1e9));
        let mut slot = slots[cmd.slot].lock().unwrap_or_else(|e| e.into_inner());
        let begin = Instant::now();
        shared.lock().log.push((
            begin,
            EngineEvent::CopyBegin {
                slot: cmd.slot,
                group: p.group,
                index: p.index,
            },
        ));
        slot[..p.bytes].copy_from_slice(&host[p.group][p.offset..p.offset + p.bytes]);
        sleep_until(begin + duration);
        drop(slot);
        let mut st = shared.lock();
        st.log.push((
            Instant::now(),
            EngineEvent::CopyEnd {
                slot: cmd.slot,
                group: p.group,
                index: p.index,
            },
        ));
        st.copied_done[cmd.slot] += 1;
        st.copies_done += 1;
        shared.changed.notify_all();
    }
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
