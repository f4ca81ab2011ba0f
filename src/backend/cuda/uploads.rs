//! Small uploads made inside a pass (a step's latents and caption features, RoPE tables, token
//! ids, gathered embedding rows), read from page-locked host memory by a kernel instead of
//! copied by a copy engine.
//!
//! Why: while weights stream, the copy engine is busy with one piece's copy after another
//! (~5 ms each for a coded DiT block), and a host→device copy on the compute stream queues
//! behind the copies submitted before it — the compute stream then waits for whole piece
//! copies before it can use a 2 MB table (measured: a step's embedders 7.6 ms instead of 1.4,
//! its unified RoPE table ~6 ms; bench/NOTES.md). A kernel reading mapped host memory is
//! served by the link beside the copy engine, and takes microseconds for these sizes.
//!
//! The host writes an upload into one of [`BUFFERS`] page-locked buffers, used in turn; the
//! kernel that reads it is queued on the compute stream, and an event after it tells the host
//! when the buffer may be written again (in a pass this is long done: the buffers go round
//! once every [`BUFFERS`] uploads).

use std::sync::Arc;

use cudarc::driver::sys as cu;
use cudarc::driver::{CudaContext, CudaEvent, DriverError};

/// Page-locked buffers used in turn.
pub const BUFFERS: usize = 16;
/// Larger uploads are copied by the copy engine as before (a kernel reads host memory more
/// slowly than a copy engine, and none this large is made inside a pass of today's models).
pub const MAX_BYTES: usize = 64 << 20;
/// Smallest buffer, bytes; a buffer grows to the next power of two of what it must hold.
const MIN_BYTES: usize = 64 << 10;

/// One page-locked buffer mapped for the device, and the event after its last reader.
struct Mapped {
    host: *mut u8,
    device: u64,
    len: usize,
    read: CudaEvent,
    ctx: Arc<CudaContext>,
}

impl Mapped {
    fn new(ctx: &Arc<CudaContext>, len: usize) -> Result<Mapped, DriverError> {
        ctx.bind_to_thread()?;
        let read = ctx.new_event(None)?;
        let mut p: *mut std::ffi::c_void = std::ptr::null_mut();
        // SAFETY: `p` receives a fresh allocation of `len` bytes, mapped for the device.
        unsafe { cu::cuMemHostAlloc(&mut p, len, cu::CU_MEMHOSTALLOC_DEVICEMAP) }.result()?;
        let mut device: cu::CUdeviceptr = 0;
        // SAFETY: `p` was allocated above with DEVICEMAP.
        let mapped = unsafe { cu::cuMemHostGetDevicePointer_v2(&mut device, p, 0) }.result();
        if let Err(e) = mapped {
            // SAFETY: `p` came from cuMemHostAlloc and is used nowhere else.
            unsafe { cu::cuMemFreeHost(p) };
            return Err(e);
        }
        Ok(Mapped {
            host: p as *mut u8,
            device,
            len,
            read,
            ctx: ctx.clone(),
        })
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // The kernel that read the buffer last must have run before it is freed.
        let _ = self.read.synchronize();
        // SAFETY: `host` came from cuMemHostAlloc; nothing reads it after the wait above.
        unsafe { cu::cuMemFreeHost(self.host as *mut std::ffi::c_void) };
    }
}

/// The ring of page-locked buffers.
#[derive(Default)]
pub struct Uploads {
    buffers: Vec<Option<Mapped>>,
    next: usize,
}

/// Where an upload's bytes are for the kernel that reads them: a device address of mapped
/// host memory, and the event to record after that kernel.
pub struct Staged<'a> {
    pub src: u64,
    pub read: &'a CudaEvent,
}

impl Uploads {
    /// Put `bytes` into the next buffer (grown if too small, after its last reader has run)
    /// and say where the device reads them.
    pub fn stage(
        &mut self,
        ctx: &Arc<CudaContext>,
        bytes: &[u8],
    ) -> Result<Staged<'_>, DriverError> {
        if self.buffers.is_empty() {
            self.buffers = (0..BUFFERS).map(|_| None).collect();
        }
        let i = self.next;
        self.next = (i + 1) % BUFFERS;
        let fits = self.buffers[i]
            .as_ref()
            .is_some_and(|m| m.len >= bytes.len());
        if !fits {
            // Dropping the old buffer waits for its last reader.
            self.buffers[i] = None;
            let len = bytes.len().max(MIN_BYTES).next_power_of_two();
            self.buffers[i] = Some(Mapped::new(ctx, len)?);
        }
        let m = self.buffers[i].as_ref().expect("filled above");
        // Its last reader has run (in a pass, long ago: the ring went round since).
        m.read.synchronize()?;
        // SAFETY: `m.host` holds `m.len >= bytes.len()` bytes, and no kernel reads it now.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), m.host, bytes.len()) };
        Ok(Staged {
            src: m.device,
            read: &m.read,
        })
    }
}
