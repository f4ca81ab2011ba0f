//! The streamer's schedule, written against a small copy-engine interface so that it runs the
//! same over CUDA and over the CPU backend's engine (`backend::cpu_stream`: a thread that
//! copies with a delay), on which tests check it without a GPU.
//!
//! The schedule: streamed pieces go through a ring of `slots` slots in pass order. Sequence
//! number `j` (counting over passes) is piece `j mod pieces` in slot `j mod slots`. At the
//! start, copies `0..slots` are queued (prefetch). Computing piece `j` waits for copy `j`;
//! when its compute has been queued, the slot is released and copy `j + slots` — the next
//! piece, wrapping into the next pass — is queued into it at once. The host never waits for
//! the device inside a pass: every wait is queue-to-queue.

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

    pub fn engine_mut(&mut self) -> &mut E {
        &mut self.engine
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
