//! The pinned staging ring: how streamed bytes reach the device when the host tier cannot be
//! page-locked in place (`cuMemHostRegister` refused: a low memlock limit, a driver or file
//! system that will not pin a file-backed mapping). A few page-locked buffers, each as large
//! as the largest piece, are filled from the checkpoint by reader threads and copied from
//! there into the device slot; the device reads page-locked memory at full PCIe speed, and
//! the fill of the next piece overlaps the copy of the one before.
//!
//! Written against [`StagingDevice`] so that its ordering is tested on the CPU. For copy
//! number `n` handed in by [`StagingRing::submit`] (into some slot), the ring's thread:
//! 1. takes buffer `n mod buffers` and waits (on the host) until the device copy that last
//!    read it has completed — a buffer is never refilled under a copy;
//! 2. has the reader threads copy the piece's spans into it, each at its offset in the slot
//!    (the buffer is laid out like the slot, so the same bytes land in the same places);
//! 3. queues on the device: wait for the slot's release, copy buffer → slot, record the
//!    slot's copy event, record the buffer's free event;
//! 4. counts the copy as queued for its slot and wakes [`StagingRing::wait_queued`].
//!
//! Why the compute thread waits for step 4: a queue's wait for an event refers to the
//! event's most recent recording *when the wait is queued* (`cuStreamWaitEvent`). The compute
//! queue's wait for a slot's copy event must come after step 3 recorded it, or it would refer
//! to the previous copy into that slot, and kernels would read the slot while it is being
//! overwritten. So the compute thread waits for the ring to have *queued* the copy (host
//! work: the fill), never for the copy to complete.
//!
//! The wait in step 3 for the slot's release refers to the right recording too, though it is
//! queued later than [`crate::stream::schedule::CopyEngine::copy`] is called: the slot is
//! released again only after the piece now being copied into it has been acquired, which
//! waits for this copy to be queued.

use std::ops::DerefMut;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use rayon::prelude::*;

use crate::error::{Error, Result};

/// Staging buffers in the ring: one being filled while one or two are copied.
pub const STAGING_BUFFERS: usize = 3;

/// Most reader threads filling a buffer. Four filled pinned memory from the page cache at
/// 24 GB/s on the H100 machine (16 cores), under half of PCIe Gen5: memcpy streams from the
/// page cache scale with cores, so up to eight, never more than half the machine's cores.
pub const MAX_READER_THREADS: usize = 8;

/// Reader threads for this machine: half its cores, at least one, at most
/// [`MAX_READER_THREADS`].
pub fn reader_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get() / 2)
        .unwrap_or(1)
        .clamp(1, MAX_READER_THREADS)
}

/// Smallest share of a fill given to one reader thread, bytes (smaller spans go whole).
const MIN_CHUNK: usize = 1 << 20;

/// Host memory the ring reads: numbered byte ranges (a model's tensors) that stay readable
/// and unchanged while anything holds the source. The backend provides it over the memory
/// it streams from.
pub trait HostBytes: Send + Sync + 'static {
    /// The bytes of range `index`.
    fn bytes(&self, index: usize) -> &[u8];
}

/// `len` bytes from offset `src` of the source's range `range`, to go to offset `dst` of a
/// slot (and of the staging buffer, which is laid out like the slot).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub range: usize,
    pub src: usize,
    pub len: usize,
    pub dst: usize,
}

/// One piece to copy into a slot through the ring.
#[derive(Clone, Debug)]
pub struct StagedCopy {
    pub slot: usize,
    /// Sorted by `dst`, disjoint.
    pub spans: Vec<Span>,
    /// What the device needs to name this copy beyond its slot (CUDA: its timing events).
    pub tag: usize,
}

impl StagedCopy {
    /// Bytes from the start of the buffer (and of the slot) to the end of the last span.
    pub fn extent(&self) -> usize {
        self.spans.iter().map(|s| s.dst + s.len).max().unwrap_or(0)
    }
}

/// The device side of the ring. Both methods run on the ring's thread, never on the compute
/// thread.
pub trait StagingDevice: Send + 'static {
    /// A page-locked host buffer the device copies from.
    type Buffer: DerefMut<Target = [u8]> + Send + 'static;
    /// Block until the device copy that last read buffer `buffer` has completed (at once if
    /// none has been queued).
    fn wait_buffer_free(&mut self, buffer: usize) -> Result<()>;
    /// Queue on the copy queue: wait for the release of `copy.slot`, copy `staged` (the
    /// first `copy.extent()` bytes of buffer `buffer`) to the start of the slot, record the
    /// slot's copy event and then buffer `buffer`'s free event. Must not block on the device.
    fn queue_copy(&mut self, buffer: usize, staged: &[u8], copy: &StagedCopy) -> Result<()>;
}

/// Threads that copy spans of host memory into a staging buffer together.
pub struct Readers {
    pool: rayon::ThreadPool,
    threads: usize,
}

impl Readers {
    pub fn new(threads: usize) -> Result<Readers> {
        let threads = threads.max(1);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("ferry-staging-reader-{i}"))
            .build()
            .map_err(|e| {
                Error::Device(format!("starting {threads} staging reader threads: {e}"))
            })?;
        Ok(Readers { pool, threads })
    }

    /// Copy every span's bytes from `source` into `buffer` at its `dst`, split across the
    /// reader threads. Bytes of `buffer` outside the spans are left as they are.
    pub fn fill(&self, buffer: &mut [u8], spans: &[Span], source: &dyn HostBytes) {
        let total: usize = spans.iter().map(|s| s.len).sum();
        let chunk = total.div_ceil(self.threads).max(MIN_CHUNK);
        // Disjoint pieces of `buffer`, each with the bytes it is copied from.
        let mut work: Vec<(&mut [u8], &[u8])> = Vec::new();
        let mut rest: &mut [u8] = buffer;
        let mut at = 0; // offset of rest[0] in buffer
        for s in spans {
            assert!(
                s.dst >= at && s.dst + s.len <= at + rest.len(),
                "staging spans are sorted, disjoint and inside the buffer"
            );
            let (_, tail) = std::mem::take(&mut rest).split_at_mut(s.dst - at);
            let (mut dst, tail) = tail.split_at_mut(s.len);
            rest = tail;
            at = s.dst + s.len;
            let mut src = &source.bytes(s.range)[s.src..s.src + s.len];
            while !dst.is_empty() {
                let n = chunk.min(dst.len());
                let (head, tail) = std::mem::take(&mut dst).split_at_mut(n);
                let (from, rest_src) = src.split_at(n);
                work.push((head, from));
                src = rest_src;
                dst = tail;
            }
        }
        self.pool.install(|| {
            work.into_par_iter()
                .for_each(|(dst, src)| dst.copy_from_slice(src))
        });
    }
}

struct RingState {
    /// Per slot: copies submitted, and copies queued on the device.
    submitted: Vec<u64>,
    queued: Vec<u64>,
    /// Why the ring's thread stopped early; every later wait returns it.
    failed: Option<String>,
}

struct Shared {
    state: Mutex<RingState>,
    changed: Condvar,
    /// Set on drop: skip the copies not yet started.
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, RingState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fail(&self, why: String) {
        self.lock().failed.get_or_insert(why);
        self.changed.notify_all();
    }
}

/// The ring: a thread that stages copies in the order submitted, through a few buffers.
pub struct StagingRing {
    shared: Arc<Shared>,
    jobs: Option<Sender<StagedCopy>>,
    thread: Option<JoinHandle<()>>,
}

impl StagingRing {
    /// Start the ring's thread over `buffers` (at least one; each at least as large as the
    /// largest copy's extent) for `slots` slots, reading from `source`.
    pub fn new<D: StagingDevice>(
        device: D,
        buffers: Vec<D::Buffer>,
        slots: usize,
        readers: Readers,
        source: Arc<dyn HostBytes>,
    ) -> Result<StagingRing> {
        assert!(!buffers.is_empty(), "a staging ring has buffers");
        let shared = Arc::new(Shared {
            state: Mutex::new(RingState {
                submitted: vec![0; slots],
                queued: vec![0; slots],
                failed: None,
            }),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let (tx, rx) = channel();
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("ferry-staging".into())
                .spawn(move || stage(device, buffers, readers, &*source, rx, &shared))
                .map_err(|e| Error::Device(format!("starting the staging thread: {e}")))?
        };
        Ok(StagingRing {
            shared,
            jobs: Some(tx),
            thread: Some(thread),
        })
    }

    /// Hand a copy to the ring; returns at once.
    pub fn submit(&self, copy: StagedCopy) {
        self.shared.lock().submitted[copy.slot] += 1;
        // A send fails only when the thread has stopped, which it records in `failed`: the
        // next wait reports it.
        let _ = self.jobs.as_ref().expect("open until drop").send(copy);
    }

    /// Block until every copy submitted into `slot` so far has been queued on the device, so
    /// that a wait for the slot's copy event refers to the newest copy.
    pub fn wait_queued(&self, slot: usize) -> Result<()> {
        self.wait_until(|st| st.queued[slot] >= st.submitted[slot])
    }

    /// Block until every copy submitted so far has been queued on the device.
    pub fn wait_all_queued(&self) -> Result<()> {
        self.wait_until(|st| st.queued.iter().zip(&st.submitted).all(|(q, s)| q >= s))
    }

    fn wait_until(&self, done: impl Fn(&RingState) -> bool) -> Result<()> {
        let mut st = self.shared.lock();
        loop {
            if let Some(why) = &st.failed {
                return Err(Error::Device(format!("staging ring: {why}")));
            }
            if done(&st) {
                return Ok(());
            }
            st = self
                .shared
                .changed
                .wait(st)
                .unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl Drop for StagingRing {
    /// Skip the copies not yet started, and return once the thread has waited for the copies
    /// reading its buffers and freed them.
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The ring's thread: steps 1-4 of the module doc for each copy, in order.
fn stage<D: StagingDevice>(
    mut device: D,
    mut buffers: Vec<D::Buffer>,
    readers: Readers,
    source: &dyn HostBytes,
    jobs: Receiver<StagedCopy>,
    shared: &Shared,
) {
    /// Wakes the waiters with an error if the thread panics, instead of leaving them asleep.
    struct OnPanic<'a>(&'a Shared);
    impl Drop for OnPanic<'_> {
        fn drop(&mut self) {
            if std::thread::panicking() {
                self.0.fail("the staging thread panicked".into());
            }
        }
    }
    let _guard = OnPanic(shared);
    let mut run = || -> Result<()> {
        for (n, copy) in jobs.iter().enumerate() {
            if shared.stop.load(Ordering::Acquire) {
                break;
            }
            let b = n % buffers.len();
            let extent = copy.extent();
            let buffer = &mut buffers[b][..];
            if extent > buffer.len() {
                return Err(Error::Device(format!(
                    "a copy of {extent} bytes for slot {} does not fit a staging buffer of {} bytes",
                    copy.slot,
                    buffer.len()
                )));
            }
            device.wait_buffer_free(b)?;
            readers.fill(&mut buffer[..extent], &copy.spans, source);
            device.queue_copy(b, &buffer[..extent], &copy)?;
            shared.lock().queued[copy.slot] += 1;
            shared.changed.notify_all();
        }
        Ok(())
    };
    let result = run();
    // The buffers are freed when this thread returns: not before the copies reading them
    // have completed.
    let drained = (0..buffers.len()).try_for_each(|b| device.wait_buffer_free(b));
    if let Err(e) = result.and(drained) {
        shared.fail(e.to_string());
    }
    drop(buffers);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A lock that a failed assertion on another thread does not poison for the rest: the
    /// fake device keeps going, so a failing test fails instead of hanging.
    fn relock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ranges of host bytes, as a model's tensors.
    struct Pieces(Vec<Vec<u8>>);

    impl HostBytes for Pieces {
        fn bytes(&self, index: usize) -> &[u8] {
            &self.0[index]
        }
    }

    #[test]
    fn fill_puts_each_span_at_its_offset_and_leaves_the_rest() {
        let src: Vec<u8> = (0..5_000_000u32).map(|i| (i * 7 + 3) as u8).collect();
        let other: Vec<u8> = (0..1000u32).map(|i| (i * 13 + 1) as u8).collect();
        let source = Pieces(vec![other.clone(), src.clone()]);
        // Spans larger than a chunk (split across threads), small ones, padding between.
        let span = |range, src, len, dst| Span {
            range,
            src,
            len,
            dst,
        };
        let spans = [
            span(1, 10, 3_000_000, 0),
            span(0, 900, 17, 3_000_064),
            span(1, 100, 1_500_000, 3_000_256),
        ];
        let mut buffer = vec![0xAAu8; 4_600_000];
        let readers = Readers::new(3).expect("readers");
        readers.fill(&mut buffer, &spans, &source);
        for s in &spans {
            let from = &source.0[s.range][s.src..s.src + s.len];
            assert_eq!(&buffer[s.dst..s.dst + s.len], from);
        }
        assert!(buffer[3_000_000..3_000_064].iter().all(|&b| b == 0xAA));
        assert!(buffer[3_000_081..3_000_256].iter().all(|&b| b == 0xAA));
        assert!(buffer[4_500_256..].iter().all(|&b| b == 0xAA));
    }

    /// A device whose copy queue is a thread that takes a while per copy, and that checks
    /// what the ring promises: a buffer is queued again only once its last copy completed,
    /// and the bytes copied are the piece's (a refill under a copy would change them).
    #[derive(Default)]
    struct DeviceState {
        slots: Vec<Vec<u8>>,
        /// Per slot: copy events recorded (queued), and completed.
        recorded: Vec<u64>,
        completed: Vec<u64>,
        /// Per buffer: a copy reading it is queued and not complete.
        in_flight: Vec<bool>,
        fail_after: Option<usize>,
        queued_total: usize,
        /// What went wrong on the copy thread (asserted empty by the tests).
        violations: Vec<String>,
    }

    struct FakeDevice {
        state: Arc<(Mutex<DeviceState>, Condvar)>,
        queue: Sender<(usize, usize, usize, usize, Vec<u8>)>,
        source: Arc<Pieces>,
    }

    impl FakeDevice {
        fn new(
            slots: usize,
            slot_bytes: usize,
            buffers: usize,
            source: Arc<Pieces>,
        ) -> (FakeDevice, FakeHandle) {
            let state = Arc::new((
                Mutex::new(DeviceState {
                    slots: vec![vec![0; slot_bytes]; slots],
                    recorded: vec![0; slots],
                    completed: vec![0; slots],
                    in_flight: vec![false; buffers],
                    ..DeviceState::default()
                }),
                Condvar::new(),
            ));
            let (tx, rx) = channel::<(usize, usize, usize, usize, Vec<u8>)>();
            let thread = {
                let state = state.clone();
                std::thread::spawn(move || {
                    for (buffer, slot, addr, len, expected) in rx {
                        std::thread::sleep(Duration::from_millis(3));
                        // SAFETY: the ring keeps the buffer unwritten until `in_flight` clears
                        // (what this test checks), and alive until the thread drains it.
                        let staged = unsafe { std::slice::from_raw_parts(addr as *const u8, len) };
                        let (lock, cv) = &*state;
                        let mut st = relock(lock);
                        st.slots[slot][..len].copy_from_slice(staged);
                        if st.slots[slot][..len] != expected[..] {
                            st.violations
                                .push(format!("buffer {buffer} was refilled under its copy"));
                        }
                        st.completed[slot] += 1;
                        st.in_flight[buffer] = false;
                        cv.notify_all();
                    }
                })
            };
            (
                FakeDevice {
                    state: state.clone(),
                    queue: tx,
                    source,
                },
                FakeHandle {
                    state,
                    _thread: thread,
                },
            )
        }
    }

    struct FakeHandle {
        state: Arc<(Mutex<DeviceState>, Condvar)>,
        _thread: JoinHandle<()>,
    }

    impl StagingDevice for FakeDevice {
        type Buffer = Vec<u8>;
        fn wait_buffer_free(&mut self, buffer: usize) -> Result<()> {
            let (lock, cv) = &*self.state;
            let mut st = relock(lock);
            while st.in_flight[buffer] {
                st = cv.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            Ok(())
        }
        fn queue_copy(&mut self, buffer: usize, staged: &[u8], copy: &StagedCopy) -> Result<()> {
            let (lock, _) = &*self.state;
            let mut st = relock(lock);
            if st.fail_after == Some(st.queued_total) {
                return Err(Error::Device("the fake device failed".into()));
            }
            if st.in_flight[buffer] {
                // Not a panic while holding the lock: the copy thread must go on.
                let why = format!("buffer {buffer} queued again before its last copy completed");
                st.violations.push(why.clone());
                return Err(Error::Device(why));
            }
            st.in_flight[buffer] = true;
            st.recorded[copy.slot] += 1;
            st.queued_total += 1;
            // What the slot must hold after this copy: the spans' bytes, read now.
            let mut expected = staged.to_vec();
            for s in &copy.spans {
                let src = &self.source.bytes(s.range)[s.src..s.src + s.len];
                expected[s.dst..s.dst + s.len].copy_from_slice(src);
            }
            self.queue
                .send((
                    buffer,
                    copy.slot,
                    staged.as_ptr() as usize,
                    staged.len(),
                    expected,
                ))
                .unwrap();
            Ok(())
        }
    }

    fn pieces(n: usize, len: usize) -> Arc<Pieces> {
        Arc::new(Pieces(
            (0..n)
                .map(|p| (0..len).map(|i| (i * 31 + p * 101) as u8).collect())
                .collect(),
        ))
    }

    /// Range `piece` of `data` into `slot`.
    fn copy_of(data: &Pieces, piece: usize, slot: usize) -> StagedCopy {
        // Two spans with padding between, like two tensors of a group in a slot.
        let len = data.0[piece].len();
        let half = len / 2;
        StagedCopy {
            slot,
            spans: vec![
                Span {
                    range: piece,
                    src: 0,
                    len: half,
                    dst: 0,
                },
                Span {
                    range: piece,
                    src: half,
                    len: len - half,
                    dst: half.div_ceil(256) * 256,
                },
            ],
            tag: 0,
        }
    }

    /// The streamer's cycle over the ring: prefetch `slots` copies, then for each piece in
    /// order wait until its copy is queued, check that its copy event has been recorded (the
    /// compute queue's wait would refer to it), use it, and submit the copy `slots` ahead.
    /// With more slots than buffers, buffers are reused while copies are in flight.
    fn cycle(slots: usize, buffers: usize) {
        let (n, len) = (7, 300_000);
        let data = pieces(n, len);
        let slot_bytes = len + 256;
        let (device, handle) = FakeDevice::new(slots, slot_bytes, buffers, data.clone());
        let ring = StagingRing::new(
            device,
            vec![vec![0u8; slot_bytes]; buffers],
            slots,
            Readers::new(2).unwrap(),
            data.clone(),
        )
        .unwrap();
        let mut submitted = vec![0u64; slots];
        let submit = |seq: usize, submitted: &mut Vec<u64>| {
            let slot = seq % slots;
            submitted[slot] += 1;
            ring.submit(copy_of(&data, seq % n, slot));
        };
        for seq in 0..slots {
            submit(seq, &mut submitted);
        }
        for seq in 0..3 * n {
            let slot = seq % slots;
            ring.wait_queued(slot).unwrap();
            let (lock, cv) = &*handle.state;
            let mut st = relock(lock);
            assert_eq!(
                st.recorded[slot], submitted[slot],
                "copy {seq}: the compute thread would wait before its copy event was recorded"
            );
            // The compute queue's wait: for the copy to complete.
            while st.completed[slot] < st.recorded[slot] {
                st = cv.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            let piece = &data.0[seq % n];
            let half = len / 2;
            let at = half.div_ceil(256) * 256;
            assert_eq!(&st.slots[slot][..half], &piece[..half], "copy {seq}");
            assert_eq!(
                &st.slots[slot][at..at + len - half],
                &piece[half..],
                "copy {seq}"
            );
            drop(st);
            submit(seq + slots, &mut submitted);
        }
        ring.wait_all_queued().unwrap();
        drop(ring);
        let (lock, _) = &*handle.state;
        let st = relock(lock);
        assert_eq!(st.violations, Vec::<String>::new());
        assert!(
            st.in_flight.iter().all(|f| !f),
            "the ring returned before the copies reading its buffers completed"
        );
    }

    #[test]
    fn copies_are_queued_before_the_compute_thread_waits_and_land_intact() {
        cycle(2, STAGING_BUFFERS);
        cycle(4, STAGING_BUFFERS);
        cycle(5, 2);
        cycle(1, 1);
    }

    #[test]
    fn a_device_failure_reaches_the_waiting_thread() {
        let data = pieces(3, 512);
        let (device, handle) = FakeDevice::new(2, 1024, 2, data.clone());
        relock(&handle.state.0).fail_after = Some(1);
        let readers = Readers::new(1).unwrap();
        let ring =
            StagingRing::new(device, vec![vec![0; 1024]; 2], 2, readers, data.clone()).unwrap();
        for i in 0..data.0.len() {
            ring.submit(copy_of(&data, i, i % 2));
        }
        // Copy 0 (slot 0) is queued; copy 1 (slot 1) fails.
        let e = ring.wait_queued(1).unwrap_err().to_string();
        assert!(e.contains("the fake device failed"), "{e}");
        assert!(ring.wait_all_queued().is_err());
    }

    #[test]
    fn a_copy_larger_than_a_buffer_is_an_error_not_an_overrun() {
        let data = Arc::new(Pieces(vec![vec![1u8; 2048]]));
        let (device, _handle) = FakeDevice::new(1, 4096, 1, data.clone());
        let readers = Readers::new(1).unwrap();
        let ring = StagingRing::new(device, vec![vec![0; 1024]], 1, readers, data.clone()).unwrap();
        ring.submit(copy_of(&data, 0, 0));
        let e = ring.wait_queued(0).unwrap_err().to_string();
        assert!(e.contains("does not fit a staging buffer"), "{e}");
    }
}
