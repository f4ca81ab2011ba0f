//! The streamer's schedule, written against a small copy-engine interface so that it runs the
//! same over CUDA and over the CPU backend's engine (`backend::cpu_stream`: a thread that
//! copies with a delay), on which tests check it without a GPU.
//!
//! The schedule: streamed pieces go through a ring of `slots` slots in pass order. Sequence
//! number `j` (counting over passes) is piece `j mod pieces` in slot `j mod slots`. At the
//! start, copies `0..slots` are queued (prefetch). Computing piece `j` waits for copy `j`;
//! when its compute has been queued, the slot is released and copy `j + slots` — the next
//! piece, wrapping into the next pass — is queued into it at once. An engine may free a slot
//! sooner (CUDA: a piece decoded whole into a decode buffer is not read from its slot after
//! its decoding); then copy `j + slots` is queued as soon as the engine says so, before piece
//! `j` is computed, so that the copies do not stop where the host is late (between passes).
//! The host never waits for the device inside a pass: every wait is queue-to-queue.

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
    /// Whether the latest copy into `slot` has freed the slot already: `released[slot]` is
    /// recorded for it on some queue (nothing reads the slot's bytes for that piece after
    /// work queued so far), so the next copy into the slot may be queued before the piece is
    /// computed and released. `wait_copied` and `release` are still called for the piece, in
    /// order: with a slot freed early they refer to the oldest piece copied into it and not
    /// yet released, not to the latest copy. Engines that never free early keep the default.
    fn freed_early(&self, _slot: usize) -> bool {
        false
    }
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
    /// Sequence number of the next copy to queue: `next + slots` once piece `next - 1` is
    /// released, more where the engine freed slots early.
    queued: u64,
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
    pub fn new(engine: E, plan: &Plan) -> Result<Self> {
        Self::over(engine, plan.pieces.clone(), plan.slots)
    }

    /// Start streaming `pieces` (in pass order) through `slots` slots.
    fn over(mut engine: E, pieces: Vec<Piece>, slots: usize) -> Result<Self> {
        if !pieces.is_empty() {
            assert!(slots > 0, "a plan that streams has slots");
            for j in 0..slots {
                engine.copy(j, &pieces[j % pieces.len()])?;
            }
        }
        let mut streamer = Streamer {
            engine,
            slots,
            queued: if pieces.is_empty() { 0 } else { slots as u64 },
            pieces,
            next: 0,
            held: None,
        };
        streamer.copy_ahead()?;
        Ok(streamer)
    }

    /// Queue every copy whose slot is free: the piece before it in the slot released, or
    /// freed early by the engine. At most `slots` copies beyond those a release allows, so
    /// that copies run at most one ring ahead of what the schedule alone would queue.
    fn copy_ahead(&mut self) -> Result<()> {
        if self.pieces.is_empty() {
            return Ok(());
        }
        let slots = self.slots as u64;
        while self.queued < self.next + 2 * slots {
            let slot = (self.queued % slots) as usize;
            // The slot's occupant is copy `queued - slots`: released once `next` is past it.
            let released = self.queued - slots < self.next;
            if !released && !self.engine.freed_early(slot) {
                return Ok(());
            }
            let piece = &self.pieces[(self.queued % self.pieces.len() as u64) as usize];
            self.engine.copy(slot, piece)?;
            self.queued += 1;
        }
        Ok(())
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
    /// the copy of the piece `slots` ahead (wrapping into the next pass) into it, unless the
    /// engine freed the slot early and that copy is queued already.
    pub fn release(&mut self) -> Result<()> {
        let seq = self.held.take().expect("release without acquire");
        let slot = (seq % self.slots as u64) as usize;
        self.engine.release(slot)?;
        self.next = seq + 1;
        self.copy_ahead()
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

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    /// An engine that logs the schedule's calls and checks its contract, and frees a slot
    /// early the way CUDA's decoding does: a copy "decodes" (frees its slot) once fewer than
    /// `buffers` decoded pieces are unreleased.
    struct Mock {
        buffers: Option<u64>,
        /// Per slot, the pieces copied into it and not released, oldest first, and whether each
        /// freed the slot.
        slots: Vec<VecDeque<(usize, bool)>>,
        decoded: u64,
        released: u64,
        log: Vec<String>,
    }

    impl Mock {
        fn new(slots: usize, buffers: Option<u64>) -> Mock {
            Mock {
                buffers,
                slots: vec![VecDeque::new(); slots],
                decoded: 0,
                released: 0,
                log: Vec::new(),
            }
        }

        /// Decode (free early) every copied piece the buffers allow, in copy order.
        fn decode(&mut self) {
            let Some(b) = self.buffers else { return };
            // Copies in order over slots: the undecoded ones are the slots' last entries.
            let mut undecoded: Vec<(usize, usize)> = Vec::new();
            for (s, q) in self.slots.iter().enumerate() {
                for (i, &(_, freed)) in q.iter().enumerate() {
                    if !freed {
                        undecoded.push((s, i));
                    }
                }
            }
            for (s, i) in undecoded {
                if self.decoded < self.released + b {
                    self.slots[s][i].1 = true;
                    self.decoded += 1;
                }
            }
        }
    }

    impl CopyEngine for Mock {
        fn copy(&mut self, slot: usize, piece: &Piece) -> Result<()> {
            let q = &self.slots[slot];
            assert!(
                q.iter().all(|&(_, freed)| freed),
                "copy into slot {slot} while a piece in it still reads it"
            );
            self.slots[slot].push_back((piece.index, false));
            self.log.push(format!("copy {} to {slot}", piece.index));
            self.decode();
            Ok(())
        }
        fn wait_copied(&mut self, slot: usize) -> Result<()> {
            let (piece, _) = *self.slots[slot].front().expect("a copy before its wait");
            self.log.push(format!("wait {piece} in {slot}"));
            Ok(())
        }
        fn release(&mut self, slot: usize) -> Result<()> {
            let (piece, freed) = self.slots[slot].pop_front().expect("release after copy");
            if freed && self.buffers.is_some() {
                self.released += 1;
            }
            self.log.push(format!("release {piece} from {slot}"));
            self.decode();
            Ok(())
        }
        fn freed_early(&self, slot: usize) -> bool {
            self.slots[slot].back().is_some_and(|&(_, freed)| freed)
        }
        fn synchronize(&mut self) -> Result<()> {
            Ok(())
        }
    }

    fn pieces(n: usize) -> Vec<Piece> {
        (0..n)
            .map(|index| Piece {
                group: index,
                index,
                offset: 0,
                bytes: 1,
                compute_ms: 1.0,
                copy_bytes: 1,
                decode_ms: 0.0,
                decoded_whole: true,
            })
            .collect()
    }

    /// Two passes of `n` pieces: the log, and the piece each acquire got.
    fn run(n: usize, slots: usize, buffers: Option<u64>) -> (Vec<String>, Vec<usize>) {
        let mut s = Streamer::over(Mock::new(slots, buffers), pieces(n), slots).unwrap();
        let mut got = Vec::new();
        for _ in 0..2 * n {
            let a = s.acquire().unwrap();
            got.push(a.piece);
            s.release().unwrap();
        }
        (s.finish().unwrap().log, got)
    }

    #[test]
    fn without_early_frees_each_release_queues_the_copy_a_ring_ahead() {
        let (log, got) = run(5, 2, None);
        assert_eq!(got, [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]);
        let head: Vec<&str> = log.iter().take(6).map(|s| s.as_str()).collect();
        assert_eq!(
            head,
            [
                "copy 0 to 0",
                "copy 1 to 1",
                "wait 0 in 0",
                "release 0 from 0",
                "copy 2 to 0",
                "wait 1 in 1"
            ]
        );
    }

    #[test]
    fn slots_freed_early_are_refilled_before_their_pieces_compute() {
        let (log, got) = run(5, 2, Some(2));
        assert_eq!(got, [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]);
        // Pieces 0 and 1 decode as they are copied, so 2 and 3 are copied before 0 computes;
        // 4 waits for a decode buffer (a release), and never more than a ring ahead.
        let before_first_wait: Vec<&str> = log
            .iter()
            .take_while(|s| !s.starts_with("wait"))
            .map(|s| s.as_str())
            .collect();
        assert_eq!(
            before_first_wait,
            ["copy 0 to 0", "copy 1 to 1", "copy 2 to 0", "copy 3 to 1"]
        );
        // Each wait names the piece the schedule expects (the oldest in the slot).
        let waits: Vec<&String> = log.iter().filter(|s| s.starts_with("wait")).collect();
        for (i, w) in waits.iter().enumerate() {
            assert_eq!(**w, format!("wait {} in {}", i % 5, i % 2));
        }
        // Every copy of the two passes and the next pass's prefetch was queued.
        let copies = log.iter().filter(|s| s.starts_with("copy")).count();
        assert!((12..=14).contains(&copies), "{copies} copies: {log:?}");
    }
}
