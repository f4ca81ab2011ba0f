//! Weights for the model from a [`Plan`], over any [`SlotEngine`]: resident and host-kept
//! groups as the backend made them, streamed groups as views into the slot their copy went
//! to. This is the loop that ships on the GPU and the one the CPU tests run: the model asks
//! for its groups in pass order, and each streamed piece is acquired from the [`Streamer`]
//! when asked for and released when the next is (or when the pass ends).

use super::plan::{Piece, Placement, Plan, Unit};
use super::schedule::{CopyEngine, Streamer};
use crate::checkpoint::{HostTensor, Tensors};
use crate::error::{Error, Result};
use crate::model::{Architecture, Weights};

/// An architecture's weight groups resolved against a checkpoint: what a backend's engine
/// needs of the model (the tensors of each group, in pass order, and whether the group may
/// stream in pieces), so that backends know no model.
#[derive(Clone)]
pub struct GroupTensors {
    /// Per group, its tensors in the group's order.
    pub groups: Vec<Vec<HostTensor>>,
    /// Per group, whether its last tensor may be computed in blocks of rows.
    pub splits: Vec<bool>,
}

impl GroupTensors {
    /// The tensors of every group of `arch` in `tensors`, or an error naming one missing.
    pub fn of(tensors: &dyn Tensors, arch: &dyn Architecture) -> Result<GroupTensors> {
        let groups = arch
            .groups()
            .iter()
            .map(|g| {
                g.tensors
                    .iter()
                    .map(|s| tensors.tensor(&s.name).cloned())
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        let splits = arch.groups().iter().map(|g| g.splits()).collect();
        Ok(GroupTensors { groups, splits })
    }
}

/// A copy engine whose slots the model computes on.
pub trait SlotEngine: CopyEngine {
    /// A weight as the backend's kernels read it.
    type Weight;

    /// The weights of `piece` in `slot` (acquired: its copy is waited for), one per tensor of
    /// its group, `None` for a tensor that lies in another piece; the last tensor present is
    /// the block of its rows in this piece.
    fn views(&self, slot: usize, piece: &Piece) -> Result<Vec<Option<Self::Weight>>>;

    /// Step `unit` of the pass is asked for (`ready` false) or past its wait for a copy
    /// (`ready` true), in the compute queue's order: the clock of the pass's stats.
    fn mark(&mut self, unit: usize, ready: bool) -> Result<()> {
        let _ = (unit, ready);
        Ok(())
    }

    /// Pass `pass` (counting from 0) has queued all its work.
    fn pass_end(&mut self, plan: &Plan, pass: u64) -> Result<()> {
        let _ = (plan, pass);
        Ok(())
    }
}

/// Where in a slot a tensor's share of a piece goes: bytes `src..src + len` of the tensor, at
/// `dst` in the slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotSpan {
    /// Index of the tensor in its group.
    pub tensor: usize,
    pub src: usize,
    pub len: usize,
    pub dst: usize,
}

/// How the bytes `offset..offset + bytes` of a group (its tensors concatenated, of
/// `tensor_bytes` each) lie in a slot: each tensor's share starts at a multiple of `align`.
pub fn slot_spans(
    tensor_bytes: impl IntoIterator<Item = usize>,
    offset: usize,
    bytes: usize,
    align: usize,
) -> Vec<SlotSpan> {
    let (mut at, mut dst) = (0, 0);
    let mut out = Vec::new();
    for (i, len) in tensor_bytes.into_iter().enumerate() {
        let (lo, hi) = (at.max(offset), (at + len).min(offset + bytes));
        if lo < hi {
            out.push(SlotSpan {
                tensor: i,
                src: lo - at,
                len: hi - lo,
                dst,
            });
            dst = (dst + hi - lo).div_ceil(align) * align;
        }
        at += len;
    }
    out
}

/// The model's weights, streamed by the plan over engine `E`.
pub struct StreamedWeights<E: SlotEngine> {
    plan: Plan,
    units: Vec<Unit>,
    /// Per group: its weights when resident or kept in host memory; empty when streamed.
    resident: Vec<Vec<E::Weight>>,
    streamer: Streamer<E>,
    /// Views into the slot of the piece acquired, one per tensor of its group.
    current: Vec<Option<E::Weight>>,
    /// `current`, whole (for [`Weights::group`]).
    current_whole: Vec<E::Weight>,
    held: bool,
    /// The next unit of the pass.
    cursor: usize,
    passes: u64,
}

impl<E: SlotEngine> StreamedWeights<E> {
    /// Start streaming `plan` for a model whose groups may split as `splits` says:
    /// `resident` holds, per group, the backend's weights for the groups the plan keeps
    /// (resident or in host memory) and nothing for those it streams. Queues the first
    /// copies.
    pub fn start(
        engine: E,
        plan: Plan,
        splits: &[bool],
        resident: Vec<Vec<E::Weight>>,
    ) -> Result<StreamedWeights<E>> {
        assert_eq!(resident.len(), plan.groups.len(), "weights for every group");
        for (g, place) in plan.placement.iter().enumerate() {
            if let Placement::Streamed(r) = place {
                // The model computes pieces only as row blocks of a group's last tensor.
                if r.len() > 1 && !splits[g] {
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
        let streamer = Streamer::new(engine, &plan)?;
        Ok(StreamedWeights {
            units: plan.units(),
            plan,
            resident,
            streamer,
            current: Vec::new(),
            current_whole: Vec::new(),
            held: false,
            cursor: 0,
            passes: 0,
        })
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The pass's steps in order.
    pub fn units(&self) -> &[Unit] {
        &self.units
    }

    /// Passes finished so far.
    pub fn passes(&self) -> u64 {
        self.passes
    }

    pub fn engine(&self) -> &E {
        self.streamer.engine()
    }

    pub fn engine_mut(&mut self) -> &mut E {
        self.streamer.engine_mut()
    }

    /// Release the piece in use, if any (its compute is queued): its views go first, since
    /// the slot may be written again as soon as it is released.
    fn release(&mut self) -> Result<()> {
        if self.held {
            self.current.clear();
            self.current_whole.clear();
            self.streamer.release()?;
            self.held = false;
        }
        Ok(())
    }

    /// Release the piece in use (its compute is queued) and go to the next unit, which must
    /// be part `part` of `group`.
    fn step(&mut self, group: usize, part: usize) -> Result<Unit> {
        self.release()?;
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
        self.streamer.engine_mut().mark(u, false)?;
        if let Unit::Piece(_) = unit {
            let acquired = self.streamer.acquire()?;
            self.held = true;
            let piece = &self.plan.pieces[acquired.piece];
            self.current = self.streamer.engine().views(acquired.slot, piece)?;
        }
        self.streamer.engine_mut().mark(u, true)?;
        self.cursor += 1;
        Ok(unit)
    }
}

impl<E: SlotEngine> Weights<E::Weight> for StreamedWeights<E> {
    fn group(&mut self, index: usize) -> Result<&[E::Weight]> {
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
                    .map(|w| w.expect("a whole group's piece holds every tensor"))
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

    fn part(&mut self, index: usize, part: usize) -> Result<Vec<Option<&E::Weight>>> {
        match self.step(index, part)? {
            Unit::Group(g) => Ok(self.resident[g].iter().map(Some).collect()),
            Unit::Piece(_) => Ok(self.current.iter().map(Option::as_ref).collect()),
        }
    }

    fn finish_pass(&mut self) -> Result<()> {
        self.release()?;
        if self.cursor != self.units.len() {
            return Err(Error::Device(format!(
                "streaming: pass ended after {} of {} steps",
                self.cursor,
                self.units.len()
            )));
        }
        self.cursor = 0;
        let pass = self.passes;
        self.passes += 1;
        self.streamer.engine_mut().pass_end(&self.plan, pass)
    }
}

impl<E: SlotEngine> Drop for StreamedWeights<E> {
    fn drop(&mut self) {
        // Copies still queued (the next pass's prefetch) read host memory and write the
        // slots: let them finish before either goes.
        let _ = self.streamer.engine_mut().synchronize();
    }
}
