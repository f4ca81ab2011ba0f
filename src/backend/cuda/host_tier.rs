//! The host side of streaming on CUDA: every tensor's bf16 bytes in host memory (the
//! checkpoint's mmap read in place, or converted into an anonymous arena), page-locked with
//! the driver (`cuMemHostRegister`), or copied through a ring of pinned staging buffers when
//! it will not be (`--host-memory`); where each tensor's share of a piece lands in a slot;
//! and the host-to-device bandwidth as measured from it.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::sys as cu;
use cudarc::driver::{CudaContext, DriverError};
use half::bf16;
use indicatif::ProgressBar;

use super::Cuda;
use crate::checkpoint::{DType, HostTensor, Storage};
use crate::error::{Error, Result};
use crate::stream::compress::Compressed;
use crate::stream::plan::Piece;
use crate::stream::staging::{self, HostBytes, Readers, Span};
use crate::stream::streamed::{slot_spans, GroupTensors, SlotSpan};
use crate::stream::{human_bytes, Purpose};

/// Where in a slot each tensor's share of a piece starts: a multiple of this many bytes, so
/// that a weight in a slot is as aligned as one in its own allocation (cuBLASLt picks the
/// same algorithm for both, and results stay bit-identical).
pub const SLOT_ALIGN: usize = 256;

/// How the host tier should make streamed bytes readable by the copy engine
/// (`--host-memory`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HostMemory {
    /// Page-lock the checkpoint's memory in place; if the driver refuses, use the staging
    /// ring.
    #[default]
    Auto,
    /// Page-lock in place, or fail saying why.
    Registered,
    /// Always copy through the pinned staging ring.
    Staged,
}

/// How streamed bytes reach the copy engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostMode {
    /// Page-locked with `cuMemHostRegister` (the mmap read-only): DMA at full PCIe speed, no
    /// second copy in RAM.
    Registered { bytes: usize },
    /// Copied through a ring of page-locked staging buffers (`cuMemHostAlloc`, host memory
    /// outside the VRAM budget) that `threads` reader threads fill from the checkpoint.
    /// `buffers` is 0 until the ring is made, and stays 0 when nothing streams.
    Staged {
        buffers: usize,
        /// Bytes of each buffer: the largest piece as laid out in a slot.
        bytes_each: usize,
        threads: usize,
        /// Why not registered: the flag, or the driver's refusal.
        why: String,
    },
}

impl std::fmt::Display for HostMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostMode::Registered { bytes } => write!(
                f,
                "registered host memory ({:.2} GB page-locked with cuMemHostRegister, mmap read-only)",
                *bytes as f64 / 1e9
            ),
            HostMode::Staged {
                buffers: 0, why, ..
            } => write!(f, "pinned staging ring (not allocated: nothing streams; {why})"),
            HostMode::Staged {
                buffers,
                bytes_each,
                threads,
                why,
            } => write!(
                f,
                "pinned staging ring ({buffers} × {} = {} of pinned host memory, {threads} reader threads; {why})",
                human_bytes(*bytes_each),
                human_bytes(buffers * bytes_each)
            ),
        }
    }
}

/// Above this many bytes to page-lock, registration shows a progress bar (pages not in the
/// page cache are read from disk first: tens of seconds for a large model).
const REGISTER_PROGRESS_BYTES: usize = 2_000_000_000;

/// One tensor as the copy engine reads it: bf16 bytes in host memory that the tier keeps
/// alive.
#[derive(Clone)]
pub(super) struct TensorSrc {
    /// Address of the first byte; valid while `keep` lives.
    pub(super) addr: usize,
    pub(super) bytes: usize,
    pub(super) cols: usize,
    pub(super) name: String,
}

/// The host side: every tensor's bf16 bytes (in the checkpoint's storage, or converted into
/// an owned arena), registered with the driver, or to be copied through the staging ring.
pub struct HostTier {
    /// Per group (pass order), its tensors in group order.
    pub(super) groups: Vec<Vec<TensorSrc>>,
    /// Storages read in place, kept alive for the raw addresses above.
    _storages: Vec<Arc<Storage>>,
    /// Tensors that were not bf16, converted: an anonymous mapping, so that registering its
    /// pages pins no one else's memory (a heap buffer's rounded-out pages would, and a later
    /// copy from a buffer half inside a registered range fails with CUDA_ERROR_INVALID_VALUE).
    _arena: Option<Arc<memmap2::MmapMut>>,
    /// The same memory as the staging ring reads it.
    bytes: Arc<TierBytes>,
    /// Per group, the number of its first tensor over all groups (the ring's range index).
    group_base: Vec<usize>,
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
    /// Gather the model's tensors and, unless `host` says staged, register their memory. Must
    /// run after the CUDA context exists (`cuMemHostRegister` needs it current: `gpu` proves
    /// that).
    pub fn new(gpu: &Cuda, model: &GroupTensors, host: HostMemory) -> Result<HostTier> {
        gpu.ctx
            .bind_to_thread()
            .map_err(gpu.err("binding the context"))?;
        // Tensors not stored as aligned bf16 are converted into one arena; ggml blocks are
        // not here at all: they stream from their encodings (`register_compressed`), and
        // the host gathers a table's rows from them.
        let blocks = |t: &HostTensor| matches!(t.dtype, DType::Ggml(_));
        let convert =
            |t: &HostTensor| !blocks(t) && (t.dtype != DType::BF16 || t.as_bf16().is_none());
        let mut arena_len = 0;
        for t in model.groups.iter().flatten() {
            {
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
        for t in model.groups.iter().flatten() {
            {
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
                } else if !blocks(t) && !storages.iter().any(|s| Arc::ptr_eq(s, t.storage())) {
                    storages.push(t.storage().clone());
                }
            }
        }
        let groups = model
            .groups
            .iter()
            .map(|g| {
                g.iter()
                    .map(|t| {
                        let cols = *t.shape.last().unwrap_or(&1);
                        let addr = match placed.iter().find(|(n, _)| *n == t.name) {
                            None if blocks(t) => 0,
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

        // Register each storage's pages (read-only: the mmap is), and the arena; each named
        // by a tensor in it, for errors.
        let mut ranges: Vec<(usize, usize, u32, String)> = storages
            .iter()
            .map(|s| {
                let b = s.bytes();
                let flags = match **s {
                    Storage::Mapped(_) => cu::CU_MEMHOSTREGISTER_READ_ONLY,
                    Storage::Owned { .. } => 0,
                };
                let holder = groups
                    .iter()
                    .flatten()
                    .find(|t| {
                        (b.as_ptr() as usize..b.as_ptr() as usize + b.len()).contains(&t.addr)
                    })
                    .map_or_else(String::new, |t| t.name.clone());
                let what = match **s {
                    Storage::Mapped(_) => format!("the mapped file holding {holder}"),
                    Storage::Owned { .. } => format!("the buffer holding {holder}"),
                };
                (b.as_ptr() as usize, b.len(), flags, what)
            })
            .collect();
        if let Some(a) = &arena {
            ranges.push((
                a.as_ptr() as usize,
                a.len(),
                0,
                "the converted weights".into(),
            ));
        }
        let why_staged = match host {
            HostMemory::Staged => Some("--host-memory staged".to_string()),
            HostMemory::Auto | HostMemory::Registered => None,
        };
        let (registered, mode) = match why_staged {
            Some(why) => (Vec::new(), HostTier::staged(why)),
            None => match register(&ranges) {
                Ok(registered) => {
                    let bytes = registered.iter().map(|&(_, len)| len).sum();
                    (registered, HostMode::Registered { bytes })
                }
                Err(why) if host == HostMemory::Registered => {
                    return Err(Error::Flag {
                        flag: "--host-memory",
                        message: format!(
                            "registered: {why} (--host-memory staged copies through pinned staging buffers instead)"
                        ),
                    })
                }
                Err(why) => (Vec::new(), HostTier::staged(why)),
            },
        };
        let arena = arena.map(Arc::new);
        let bytes = Arc::new(TierBytes {
            ranges: groups
                .iter()
                .flatten()
                .map(|t| (t.addr, if t.addr == 0 { 0 } else { t.bytes }))
                .collect(),
            _storages: storages.clone(),
            _arena: arena.clone(),
        });
        let group_base = groups
            .iter()
            .scan(0, |n, g| {
                let base = *n;
                *n += g.len();
                Some(base)
            })
            .collect();
        Ok(HostTier {
            groups,
            _storages: storages,
            _arena: arena,
            bytes,
            group_base,
            registered: registered.into_iter().map(|(start, _)| start).collect(),
            mode,
        })
    }

    fn staged(why: String) -> HostMode {
        HostMode::Staged {
            buffers: 0,
            bytes_each: 0,
            threads: staging::reader_threads(),
            why,
        }
    }

    /// Whether streamed bytes go through the pinned staging ring.
    pub fn is_staged(&self) -> bool {
        matches!(self.mode, HostMode::Staged { .. })
    }

    /// Bytes of group `g` as streamed (bf16).
    pub fn group_bytes(&self, g: usize) -> usize {
        self.groups[g].iter().map(|t| t.bytes).sum()
    }

    /// The device's address of tensor `i` of group `g` (bf16), when its memory is registered
    /// and mapped for the device (kernels read it over PCIe); `None` otherwise.
    pub fn device_address(&self, g: usize, i: usize) -> Option<u64> {
        if !matches!(self.mode, HostMode::Registered { .. }) {
            return None;
        }
        let t = &self.groups[g][i];
        if t.addr == 0 {
            return None; // ggml blocks
        }
        let mut dptr: cu::CUdeviceptr = 0;
        // SAFETY: `t.addr` lies in a range registered by `new` and alive as long as `self`.
        let r = unsafe {
            cu::cuMemHostGetDevicePointer_v2(&mut dptr, t.addr as *mut std::ffi::c_void, 0)
        };
        (r == cu::CUresult::CUDA_SUCCESS && dptr != 0).then_some(dptr)
    }

    /// Where the tensors' shares of `piece` lie in a slot.
    pub(super) fn spans(&self, piece: &Piece) -> Vec<SlotSpan> {
        let tensors = &self.groups[piece.group];
        slot_spans(
            tensors.iter().map(|t| t.bytes),
            piece.offset,
            piece.bytes,
            SLOT_ALIGN,
        )
    }

    /// What the staging ring reads.
    pub(super) fn source(&self) -> Arc<TierBytes> {
        self.bytes.clone()
    }

    /// The staging ring's number for tensor `i` of group `g`.
    pub(super) fn range(&self, g: usize, i: usize) -> usize {
        self.group_base[g] + i
    }

    pub(super) fn max_tensors(&self) -> usize {
        self.groups.iter().map(Vec::len).max().unwrap_or(0)
    }

    /// Page-lock the mappings holding the compressed weights, which the copy engine reads
    /// directly (registered mode only: the staging ring reads the tensors themselves).
    pub fn register_compressed(&mut self, compressed: &Compressed) -> Result<()> {
        if !matches!(self.mode, HostMode::Registered { .. }) {
            return Err(Error::Flag {
                flag: "--compress",
                message: format!("compressed streaming reads page-locked host memory, and this run copies through the staging ring ({}); use --compress off", self.mode),
            });
        }
        // Each storage once: one the tier registered already (a file holding blocks and
        // tensors read in place) is not registered again.
        let storages: Vec<Arc<Storage>> = compressed
            .storages()
            .into_iter()
            .filter(|s| !self._storages.iter().any(|t| Arc::ptr_eq(s, t)))
            .collect();
        let ranges: Vec<_> = storages
            .iter()
            .map(|s| {
                let b = s.bytes();
                (
                    b.as_ptr() as usize,
                    b.len(),
                    cu::CU_MEMHOSTREGISTER_READ_ONLY,
                    "the compressed weights".to_string(),
                )
            })
            .collect();
        let done = register(&ranges).map_err(Error::Device)?;
        self.registered.extend(done.iter().map(|&(start, _)| start));
        if let HostMode::Registered { bytes } = &mut self.mode {
            *bytes += done.iter().map(|&(_, len)| len).sum::<usize>();
        }
        self._storages.extend(storages);
        Ok(())
    }
}

/// The tier's memory as the staging ring reads it: every tensor, numbered over all groups in
/// pass order, with the storages and the arena that hold them kept alive.
pub(super) struct TierBytes {
    /// (address, bytes) of each tensor.
    ranges: Vec<(usize, usize)>,
    _storages: Vec<Arc<Storage>>,
    _arena: Option<Arc<memmap2::MmapMut>>,
}

// SAFETY: the addresses point into memory this struct keeps alive (the storages, the arena),
// which nothing writes once the tier is built; reading it from any thread is sound.
unsafe impl Send for TierBytes {}
unsafe impl Sync for TierBytes {}

impl HostBytes for TierBytes {
    fn bytes(&self, index: usize) -> &[u8] {
        let (addr, len) = self.ranges[index];
        if addr == 0 {
            return &[]; // ggml blocks: never read through the tier
        }
        // SAFETY: `addr..addr + len` lies inside a storage or the arena held by `self`, both
        // immutable from here on (see the Send/Sync note above).
        unsafe { std::slice::from_raw_parts(addr as *const u8, len) }
    }
}

/// Page-lock every range `(address, bytes, cuMemHostRegister flags, what it is)` with the
/// driver, with a progress bar when there is much to lock: the page-aligned
/// `(start, bytes)` of each, or why one failed (those done before it are unlocked again).
fn register(
    ranges: &[(usize, usize, u32, String)],
) -> std::result::Result<Vec<(usize, usize)>, String> {
    let aligned = |addr: usize, len: usize| {
        let start = addr / page_size() * page_size();
        (
            start,
            (addr + len).div_ceil(page_size()) * page_size() - start,
        )
    };
    let total: usize = ranges.iter().map(|&(a, l, ..)| aligned(a, l).1).sum();
    let bar = if total > REGISTER_PROGRESS_BYTES && std::io::stderr().is_terminal() {
        let bar = crate::progress::bytes_bar(total, "");
        // One call per shard: tick so that the time keeps moving during a long one.
        bar.enable_steady_tick(Duration::from_millis(250));
        bar
    } else {
        ProgressBar::hidden()
    };
    let mut done: Vec<(usize, usize)> = Vec::new();
    for (i, (addr, len, flags, what)) in ranges.iter().enumerate() {
        bar.set_message(format!(
            "page-locking host memory {}/{}",
            i + 1,
            ranges.len()
        ));
        let (start, bytes) = aligned(*addr, *len);
        // SAFETY: the range covers memory the tier keeps alive and never moves (a mapping, a
        // buffer not resized after this point); it is unregistered before it is freed.
        let r = unsafe { cu::cuMemHostRegister_v2(start as *mut std::ffi::c_void, bytes, *flags) };
        if r != cu::CUresult::CUDA_SUCCESS {
            bar.finish_and_clear();
            for &(start, _) in &done {
                // SAFETY: registered just above; nothing has copied from it yet.
                let _ = unsafe { cu::cuMemHostUnregister(start as *mut std::ffi::c_void) };
            }
            return Err(format!(
                "cuMemHostRegister failed for {what} ({:.2} GB): {}",
                bytes as f64 / 1e9,
                super::driver_msg(cudarc::driver::DriverError(r))
            ));
        }
        done.push((start, bytes));
        bar.inc(bytes as u64);
    }
    bar.finish_and_clear();
    Ok(done)
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

/// Measure host→device bandwidth from the tier's memory: the best of 3 copies of up to
/// 256 MiB into a scratch buffer (allocated within the budget, freed after). With the
/// staging ring, the copies go from a pinned buffer, and the figure is the lower of that and
/// the reader threads' fill rate (the two overlap, so the slower one sets the pace). GB/s.
pub fn measure_h2d(gpu: &Cuda, tier: &HostTier) -> Result<f64> {
    // The largest tensor the tier holds (ggml blocks it does not: address 0).
    let (index, src) = tier
        .groups
        .iter()
        .flatten()
        .enumerate()
        .filter(|(_, t)| t.addr != 0)
        .max_by_key(|(_, t)| t.bytes)
        .ok_or_else(|| Error::Device("no tensors to stream".into()))?;
    let room = gpu.memory.budget().saturating_sub(gpu.memory.in_use()) / 4;
    let wanted = (256usize << 20).min(room).max(1);
    let bytes = src.bytes.min(wanted);
    let (staging, fill_gbps) = match tier.mode {
        // Too small a tensor to time the link by (a model whose matrices are all blocks):
        // a pinned buffer of the size wanted is as fast as registered memory.
        HostMode::Registered { .. } if bytes < wanted.min(64 << 20) => {
            let pinned = PinnedBuffer::new(&gpu.ctx, wanted)
                .map_err(gpu.err("cuMemHostAlloc (a buffer to measure the link)"))?;
            (Some(pinned), f64::INFINITY)
        }
        HostMode::Registered { .. } => (None, f64::INFINITY),
        HostMode::Staged { threads, .. } => {
            let mut pinned = PinnedBuffer::new(&gpu.ctx, bytes)
                .map_err(gpu.err("cuMemHostAlloc (a buffer to measure the staging ring)"))?;
            let readers = Readers::new(threads)?;
            let span = [Span {
                range: index,
                src: 0,
                len: bytes.min(src.bytes),
                dst: 0,
            }];
            let mut best = f64::MAX;
            for _ in 0..3 {
                let t = Instant::now();
                readers.fill(&mut pinned, &span, &*tier.bytes);
                best = best.min(t.elapsed().as_secs_f64());
            }
            (Some(pinned), bytes as f64 / (best.max(1e-9) * 1e9))
        }
    };
    let bytes = staging.as_ref().map_or(bytes, |p| p.len.min(wanted)).max(1);
    let buf = gpu.alloc(bytes, Purpose::Other("H2D measurement".into()))?;
    let host_src = staging.as_ref().map_or(src.addr, |p| p.as_ptr() as usize);
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
        // SAFETY: `buf` holds `bytes`; the source lies inside memory the tier keeps alive, or
        // in the pinned buffer, which outlives the copy (synchronized below).
        unsafe {
            cu::cuMemcpyHtoDAsync_v2(
                gpu.ptr(&buf),
                host_src as *const std::ffi::c_void,
                bytes,
                gpu.stream.cu_stream(),
            )
        }
        .result()
        .map_err(gpu.err("measuring host→device copies"))?;
        b.record(&gpu.stream).map_err(gpu.err("cuEventRecord"))?;
        b.synchronize().map_err(gpu.err("cuEventSynchronize"))?;
        let ms = a.elapsed_ms(&b).map_err(gpu.err("cuEventElapsedTime"))? as f64;
        best = best.min(ms);
    }
    drop(staging);
    Ok((bytes as f64 / (best.max(1e-6) * 1e6)).min(fill_gbps))
}

/// Page-locked host memory from `cuMemHostAlloc` (host memory: outside the VRAM budget),
/// zeroed once, freed on drop.
pub struct PinnedBuffer {
    ptr: *mut u8,
    len: usize,
    ctx: Arc<CudaContext>,
}

// SAFETY: the buffer is plain memory owned by this value; the driver calls on it are
// thread-safe.
unsafe impl Send for PinnedBuffer {}

impl PinnedBuffer {
    pub(super) fn new(
        ctx: &Arc<CudaContext>,
        len: usize,
    ) -> std::result::Result<PinnedBuffer, DriverError> {
        ctx.bind_to_thread()?;
        let mut p: *mut std::ffi::c_void = std::ptr::null_mut();
        // SAFETY: `p` receives a fresh allocation of `len` bytes (at least 1), or an error.
        unsafe { cu::cuMemHostAlloc(&mut p, len.max(1), 0) }.result()?;
        // SAFETY: `p` points to `len` writable bytes; zeroed so the slice below is initialized.
        unsafe { std::ptr::write_bytes(p as *mut u8, 0, len) };
        Ok(PinnedBuffer {
            ptr: p as *mut u8,
            len,
            ctx: ctx.clone(),
        })
    }
}

impl std::ops::Deref for PinnedBuffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `len` initialized bytes owned by this value.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl std::ops::DerefMut for PinnedBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, borrowed uniquely.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: allocated by cuMemHostAlloc; its owner waited for the copies reading it
        // (the staging ring drains its buffers; measure_h2d synchronizes).
        let _ = unsafe { cu::cuMemFreeHost(self.ptr as *mut std::ffi::c_void) };
    }
}
