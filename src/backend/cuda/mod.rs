//! The CUDA backend: the Llama family on an NVIDIA GPU, bf16 activations and weights, f32
//! accumulation; norms, softmax and RoPE in f32.
//!
//! Nothing CUDA is needed to build ferry: the driver, cuBLASLt and NVRTC are found at run time
//! ([`loader`]), kernels are compiled by NVRTC for the card at first use and cached on disk
//! ([`compile`]), and matrix products go through cuBLASLt ([`gemm`]). All work is queued on one
//! stream; the host waits only when it reads a result (logits, the next token).

mod attention;
mod compile;
mod dit;
mod encoder;
mod gemm;
mod host_tier;
mod image;
pub use image::IMAGE_MEMORY;
pub mod loader;
pub mod streaming;

use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use cudarc::driver::sys as cu;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DriverError,
    LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::Ptx;
use half::bf16;

use super::{AttentionShape, Backend, KvCache};
use crate::checkpoint::HostTensor;
use crate::error::{Error, Result};
use crate::stream::{Allocation, BudgetAllocator, DeviceMemory, Purpose, Vram};

pub use attention::AttentionKernel;
pub use compile::nvrtc_version;

/// cuBLASLt's scratch, allocated once per device (its recommended workspace on Hopper).
pub const CUBLAS_WORKSPACE: usize = gemm::WORKSPACE_BYTES;

/// Device memory a CUDA plan leaves aside: small allocations outside its accounting (RoPE
/// frequencies, argmax results), the alignment padding in slots, and what the driver holds
/// beyond the ledger (kernel modules, cuBLASLt internals, the stream-ordered pool's
/// granularity). Measured on an H100, 2026-11-26: the driver's peak was 110-155 MiB above
/// the ledger's over prompt passes of 512-16384 tokens at budgets of 2.6-12 GiB.
pub const DRIVER_RESERVE: usize = 160 << 20;

/// What [`DRIVER_RESERVE`] grows by when streamed bytes go through the pinned staging ring
/// (its thread's stream and events, the pinned buffers' mappings): the driver's peak was
/// 70 MiB higher than with registered host memory on the same pass.
pub const STAGING_RESERVE: usize = 64 << 20;

/// Device memory counted against the budget until dropped.
type DevBuf = Allocation<CudaSlice<u8>>;

/// Raw device memory for the [`BudgetAllocator`]: stream-ordered `cuMemAllocAsync` from the
/// device's pool (freed memory stays pooled, see `keep_freed_memory_pooled`).
pub struct CudaMemory {
    stream: Arc<CudaStream>,
    device: String,
}

impl DeviceMemory for CudaMemory {
    type Buffer = CudaSlice<u8>;
    fn alloc(&self, bytes: usize) -> Result<CudaSlice<u8>> {
        // SAFETY: every user writes the buffer (kernel, copy or GEMM) before reading it.
        unsafe { self.stream.alloc::<u8>(bytes.max(1)) }.map_err(|e| {
            if e.0 == cu::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
                Error::Device(format!(
                    "out of memory on {}: allocating {:.1} MiB (a smaller --vram, --context or model needs less)",
                    self.device,
                    bytes as f64 / (1u64 << 20) as f64
                ))
            } else {
                Error::Device(format!("{}: allocating device memory: {}", self.device, driver_msg(e)))
            }
        })
    }
}

/// The device address of a buffer (event tracking is off: the address is all we need).
trait DevAddr {
    fn addr(&self, stream: &CudaStream) -> u64;
}

impl<T> DevAddr for CudaSlice<T> {
    fn addr(&self, stream: &CudaStream) -> u64 {
        let (p, _sync) = self.device_ptr(stream);
        p
    }
}

impl DevAddr for DevBuf {
    fn addr(&self, stream: &CudaStream) -> u64 {
        (**self).addr(stream)
    }
}

/// What the backend runs on.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    /// (major, minor): (9, 0) for an H100.
    pub compute_capability: (i32, i32),
    /// Device memory, bytes.
    pub memory_bytes: usize,
    pub multiprocessors: u32,
    /// `cuDriverGetVersion`: 13000 for CUDA 13.0.
    pub driver_version: i32,
    /// Where the libraries were found.
    pub libraries: &'static loader::Found,
}

impl std::fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (major, minor) = self.compute_capability;
        write!(
            f,
            "cuda:{} {} (sm_{major}{minor}, {:.1} GiB, driver {}.{})",
            self.ordinal,
            self.name,
            self.memory_bytes as f64 / (1u64 << 30) as f64,
            self.driver_version / 1000,
            self.driver_version % 1000 / 10
        )
    }
}

/// A weight `[rows, cols]`, bf16 (a vector is one row): on the device (owned, or a view into
/// a streaming slot), or on the host (an embedding table gathered row by row).
pub struct CudaWeight {
    /// Device address of element [0, 0]; 0 for a host weight.
    ptr: u64,
    rows: usize,
    cols: usize,
    storage: WeightStorage,
}

enum WeightStorage {
    /// Its own device memory.
    Device(#[allow(dead_code)] DevBuf),
    /// Rows of a streaming slot, owned by the streamer. The streamer hands out such views only
    /// between the compute stream's wait for the slot's copy and its release, and keeps the
    /// slot allocated for as long as it lives.
    Slot,
    /// Host memory, for `embed` only (`Placement::HostGather`).
    Host(HostTensor),
    /// Host memory page-locked by the streaming tier and read by kernels over PCIe (`ptr` is
    /// its device address), for `embed` only: the rows of a pass's tokens, no more.
    Mapped,
}

impl CudaWeight {
    /// The device address, or an error for a host-gathered table used as a matrix.
    fn dev(&self) -> Result<u64> {
        match self.storage {
            WeightStorage::Host(ref t) => Err(Error::Device(format!(
                "{} is gathered on the host; only the embedding can be",
                t.name
            ))),
            _ => Ok(self.ptr),
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
}

/// An activation `[rows, cols]` on the device, bf16 row-major.
pub struct CudaTensor {
    buf: DevBuf,
    rows: usize,
    cols: usize,
}

impl CudaTensor {
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
}

/// Keys and values of every layer on the device: `[capacity, kv_heads*head_dim]` bf16 each,
/// allocated in full up front.
pub struct CudaKvCache {
    k: Vec<DevBuf>,
    v: Vec<DevBuf>,
    len: usize,
    capacity: usize,
}

impl KvCache for CudaKvCache {
    fn len(&self) -> usize {
        self.len
    }
    fn capacity(&self) -> usize {
        self.capacity
    }
    fn advance(&mut self, n: usize) {
        self.len += n;
    }
}

/// Query rows at or below which attention uses the split-sequence decode kernel; above, the
/// tensor-core prompt kernel (which works on 64 rows at a time).
const DECODE_MAX_ROWS: usize = 8;

pub struct Cuda {
    info: DeviceInfo,
    target: compile::Target,
    gemm: gemm::Gemm,
    /// cuBLASLt scratch, [`gemm::WORKSPACE_BYTES`].
    workspace: DevBuf,
    /// Every device allocation goes through this: the `--vram` budget as a hard cap.
    memory: BudgetAllocator<CudaMemory>,
    /// Whether a budget was given (else the cap is the device).
    budgeted: bool,
    /// Device memory in use (total − free) when the context was made, before ferry allocated
    /// anything: subtracted from what the driver reports.
    baseline_used: usize,
    modules: RefCell<HashMap<(&'static str, usize), Arc<CudaModule>>>,
    functions: RefCell<HashMap<(&'static str, usize), CudaFunction>>,
    /// Single-token products through cuBLASLt instead of `gemv` (FERRY_CUDA_NO_GEMV=1, for
    /// comparing the two).
    no_gemv: bool,
    /// The prompt-attention kernel (`FERRY_ATTENTION=v1|v2|auto`, see [`AttentionKernel`]).
    attention_kernel: Cell<AttentionKernel>,
    /// The RoPE frequencies last used, and their device copy.
    inv_freq: RefCell<Option<(Vec<f32>, DevBuf)>>,
    /// The DiT RoPE tables uploaded last, with their host values' bits (see
    /// [`DitOps::rope_table`](crate::backend::dit::DitOps::rope_table)).
    rope_kept: RefCell<Vec<(Vec<u32>, std::rc::Rc<DevBuf>)>>,
    /// Every RoPE table uploaded for its pass, none kept (`FERRY_ROPE_UPLOAD=1`, measuring).
    rope_upload: bool,
    /// Device-to-device copies by `cuMemcpyDtoDAsync` only (`FERRY_DTOD_MEMCPY=1`, for
    /// measuring against the kernel, see [`copy_dtod`](Self::copy_dtod)).
    dtod_memcpy: bool,
    /// The priority a streaming engine's decode stream is made with (see [`StreamPriority`]).
    decode_priority: i32,
    // Dropped last: everything above lives in this context and is freed on this stream.
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
}

/// Which stream's kernels the GPU schedules first where the compute stream and a streaming
/// engine's decode stream both have blocks waiting for a multiprocessor: the model's kernels
/// by default, the decodings in their gaps, since the model's kernels are a streamed pass's
/// critical path once its copies are ahead. Measured on the Z-Image DiT streamed compressed
/// (H100, stop 36) the three choices give the same step within noise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamPriority {
    /// The compute stream at the device's greatest priority, decodings in its gaps.
    Compute,
    /// The decode stream at the greatest priority.
    Decode,
    /// Both at the default (the scheduling before priorities).
    Same,
}

impl StreamPriority {
    /// `FERRY_STREAM_PRIORITY`: `compute`, `decode` or `same` (unset or empty: compute).
    pub fn from_env() -> Result<StreamPriority> {
        let value = std::env::var("FERRY_STREAM_PRIORITY").unwrap_or_default();
        match value.as_str() {
            "" | "compute" => Ok(StreamPriority::Compute),
            "decode" => Ok(StreamPriority::Decode),
            "same" => Ok(StreamPriority::Same),
            other => Err(Error::Flag {
                flag: "FERRY_STREAM_PRIORITY",
                message: format!("{other:?}: expected compute, decode or same"),
            }),
        }
    }
}

impl Cuda {
    /// Open device `ordinal`. Fails with a one-line reason where no usable CUDA device is
    /// there: libraries missing (saying where they were looked for), no device, a device
    /// index that does not exist, or a card too old for bf16 tensor cores.
    pub fn new(ordinal: usize) -> Result<Cuda> {
        Self::with_vram(ordinal, None)
    }

    /// [`new`](Self::new) with a VRAM budget (`--vram`): every device allocation counts
    /// against it and none may take the total past it.
    pub fn with_vram(ordinal: usize, vram: Option<Vram>) -> Result<Cuda> {
        let libraries =
            loader::load().map_err(|e| Error::Device(format!("no usable CUDA device: {e}")))?;
        // cudarc panics where the driver lacks a function it binds (a driver older than its
        // bindings); none may reach the user as a panic.
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Self::open(ordinal, libraries, vram)
        })) {
            Ok(r) => r,
            Err(panic) => {
                let why = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "the CUDA libraries failed to load".into());
                Err(Error::Device(format!("no usable CUDA device: {why}")))
            }
        }
    }

    fn open(ordinal: usize, libraries: &'static loader::Found, vram: Option<Vram>) -> Result<Cuda> {
        let nodev = |what: &str, e: DriverError| {
            Error::Device(format!("no usable CUDA device: {what}: {}", driver_msg(e)))
        };
        cudarc::driver::result::init().map_err(|e| nodev("cuInit", e))?;
        let count = cudarc::driver::result::device::get_count()
            .map_err(|e| nodev("cuDeviceGetCount", e))? as usize;
        if count == 0 {
            return Err(Error::Device(
                "no usable CUDA device: the driver reports no device".into(),
            ));
        }
        if ordinal >= count {
            return Err(Error::Device(format!(
                "cuda:{ordinal}: no such device; this machine has {count} CUDA device{} (cuda:0{})",
                if count == 1 { "" } else { "s" },
                if count > 1 {
                    format!("..cuda:{}", count - 1)
                } else {
                    String::new()
                }
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| nodev("creating a context", e))?;
        // SAFETY: the backend uses one stream, so cudarc's cross-stream events are not needed.
        unsafe { ctx.disable_event_tracking() };
        let priority = StreamPriority::from_env()?;
        let (least, greatest) = cudarc::driver::result::stream::get_priority_range()
            .map_err(|e| nodev("stream priorities", e))?;
        let ranks = |first| if first { greatest } else { least };
        let stream = ctx
            .new_stream_with_priority(ranks(priority == StreamPriority::Compute))
            .map_err(|e| nodev("creating a stream", e))?;

        let compute_capability = ctx
            .compute_capability()
            .map_err(|e| nodev("compute capability", e))?;
        let name = ctx.name().unwrap_or_else(|_| "CUDA device".into());
        if compute_capability < (8, 0) {
            return Err(Error::Device(format!(
                "cuda:{ordinal} {name}: compute capability {}.{}; ferry needs 8.0 (Ampere) or newer for bf16",
                compute_capability.0, compute_capability.1
            )));
        }
        let memory_bytes = ctx.total_mem().map_err(|e| nodev("memory size", e))?;
        let multiprocessors = ctx
            .attribute(cu::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| nodev("multiprocessor count", e))? as u32;
        let mut driver_version = 0;
        // SAFETY: the driver is initialized; the pointer is valid for a write.
        unsafe { cu::cuDriverGetVersion(&mut driver_version) }
            .result()
            .map_err(|e| nodev("driver version", e))?;
        keep_freed_memory_pooled(&ctx);

        let info = DeviceInfo {
            ordinal,
            name,
            compute_capability,
            memory_bytes,
            multiprocessors,
            driver_version,
            libraries,
        };
        let gemm = gemm::Gemm::new().map_err(|e| Error::Device(format!("{info}: {e}")))?;
        let (free, total) = ctx.mem_get_info().map_err(|e| nodev("cuMemGetInfo", e))?;
        let budget = match vram {
            Some(v) => v.resolve(Some(free))?,
            None => free,
        };
        let memory = BudgetAllocator::new(
            CudaMemory {
                stream: stream.clone(),
                device: info.to_string(),
            },
            budget,
        );
        let workspace = memory.alloc(Purpose::CublasWorkspace, gemm::WORKSPACE_BYTES)?;
        Ok(Cuda {
            memory,
            budgeted: vram.is_some(),
            baseline_used: total - free,
            target: compile::Target {
                arch: compute_capability,
                driver_version,
            },
            info,
            gemm,
            workspace,
            modules: RefCell::new(HashMap::new()),
            functions: RefCell::new(HashMap::new()),
            inv_freq: RefCell::new(None),
            rope_kept: RefCell::new(Vec::new()),
            rope_upload: std::env::var("FERRY_ROPE_UPLOAD").is_ok_and(|v| v == "1"),
            no_gemv: std::env::var_os("FERRY_CUDA_NO_GEMV").is_some(),
            attention_kernel: Cell::new(AttentionKernel::from_env()?),
            dtod_memcpy: std::env::var("FERRY_DTOD_MEMCPY").is_ok_and(|v| v == "1"),
            decode_priority: ranks(priority == StreamPriority::Decode),
            stream,
            ctx,
        })
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// The prompt-attention kernel that runs from now on (tests and benchmarks compare them;
    /// `FERRY_ATTENTION` sets the first).
    pub fn set_attention_kernel(&self, kernel: AttentionKernel) {
        self.attention_kernel.set(kernel);
    }

    /// The kernel that runs, with the kernel set now, attention over `t` query rows of `heads`
    /// heads of `head_dim` (causal: a prompt; else a DiT sample): `attn_prefill_v1`, ….
    pub fn attention_kernel_name(
        &self,
        causal: bool,
        t: usize,
        heads: usize,
        head_dim: usize,
    ) -> &'static str {
        self.prefill_launch(causal, t, heads, head_dim).name
    }

    /// Wait until the device has run everything queued (for timing).
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(self.err("synchronize"))
    }

    /// Compile (or fetch from the disk cache) and load every kernel the model will use for
    /// `head_dim`, so that the first pass is not slowed by compilation and a kernel that does
    /// not build is reported before any work.
    pub fn prepare(&self, head_dim: usize) -> Result<()> {
        for (src, name, hd) in [
            (&compile::EMBED, "embed", 0),
            (&compile::NORM, "rms_norm", 0),
            (&compile::ROPE, "rope", 0),
            (&compile::ELEMENTWISE, "silu_mul", 0),
            (&compile::ARGMAX, "argmax_rows", 0),
            (&compile::GEMV, "gemv", 0),
            (&compile::ATTENTION_DECODE, "attn_decode", head_dim),
        ] {
            self.function(src, name, hd)?;
        }
        if prefill_supported(head_dim) {
            for name in attention::kernels(true, head_dim) {
                self.function(&compile::ATTENTION_PREFILL, name, head_dim)?;
            }
        }
        Ok(())
    }

    /// Bytes of device memory free now.
    pub fn free_memory(&self) -> Result<usize> {
        self.ctx
            .mem_get_info()
            .map(|(free, _)| free)
            .map_err(self.err("cuMemGetInfo"))
    }

    /// The accounting allocator (budget, bytes in use, peak, breakdown).
    pub fn memory(&self) -> &BudgetAllocator<CudaMemory> {
        &self.memory
    }

    /// Whether `--vram` set the budget.
    pub fn budgeted(&self) -> bool {
        self.budgeted
    }

    /// Device memory ferry holds now as the driver sees it (cuMemGetInfo: used now − used
    /// when the context was made). Freed memory stays in the pool, so this is also the peak
    /// so far.
    pub fn device_used(&self) -> Result<usize> {
        let (free, total) = self.ctx.mem_get_info().map_err(self.err("cuMemGetInfo"))?;
        Ok((total - free).saturating_sub(self.baseline_used))
    }

    fn err(&self, what: &'static str) -> impl Fn(DriverError) -> Error + '_ {
        move |e| Error::Device(format!("{}: {what}: {}", self.info, driver_msg(e)))
    }

    /// `bytes` of uninitialized device memory for `purpose`, within the budget. Every caller
    /// writes the buffer (kernel, copy or GEMM) before reading it.
    fn alloc(&self, bytes: usize, purpose: Purpose) -> Result<DevBuf> {
        if !self.budgeted && bytes > self.memory.budget() - self.memory.in_use() {
            // No --vram: the cap is the device's free memory, and running out is the device's.
            return Err(Error::Device(format!(
                "out of memory on {}: allocating {:.1} MiB for {purpose} (a smaller --context or model needs less)",
                self.info,
                bytes as f64 / (1u64 << 20) as f64
            )));
        }
        self.memory.alloc(purpose, bytes)
    }

    /// `data` copied to new device memory for `purpose`.
    fn upload<T: bytemuck::Pod>(&self, data: &[T], purpose: Purpose) -> Result<DevBuf> {
        let buf = self.alloc(std::mem::size_of_val(data), purpose)?;
        // SAFETY: the buffer holds `data`'s bytes; a copy from pageable memory has read the
        // source when it returns, so `data` may go.
        unsafe {
            cudarc::driver::result::memcpy_htod_async(self.ptr(&buf), data, self.stream.cu_stream())
        }
        .map_err(self.err("copying to the device"))?;
        Ok(buf)
    }

    /// Copy `bytes` from device address `src` to `dst` on the compute stream: by a kernel
    /// where both addresses and the length are multiples of 16 bytes (rows of a tensor, a
    /// KV-cache append), else by `cuMemcpyDtoDAsync`. A device-to-device memcpy runs on a
    /// copy engine, which streaming keeps busy with weight copies; the kernel needs none.
    /// Measured on the Z-Image DiT streamed (H100, stop 36) the step is the same within
    /// noise either way. (`FERRY_DTOD_MEMCPY=1` copies every one by memcpy, a measurement
    /// toggle.)
    fn copy_dtod(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        if (dst | src | bytes as u64) % 16 == 0 && !self.dtod_memcpy {
            let f = self.function(&compile::ELEMENTWISE, "copy_x16", 0)?;
            let words = (bytes / 16) as u64;
            let mut b = self.stream.launch_builder(&f);
            b.arg(&src).arg(&dst).arg(&words);
            // SAFETY: the callers pass addresses of live buffers with `bytes` in range, both
            // 16-byte aligned (checked above).
            return unsafe { b.launch(cfg((self.grid_for(bytes / 16), 1, 1), 256, 0)) }
                .map(|_| ())
                .map_err(self.err("copy_x16"));
        }
        // SAFETY: the callers pass addresses of live buffers with `bytes` in range.
        unsafe {
            cudarc::driver::result::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream())
        }
        .map_err(self.err("copying on the device"))
    }

    /// `n` values of type `T` at device address `src`, read back (waits for the stream).
    fn download<T: bytemuck::Pod>(&self, src: u64, n: usize) -> Result<Vec<T>> {
        let mut host = vec![T::zeroed(); n];
        // SAFETY: `src` holds n values of T; the host buffer outlives the copy, which the
        // synchronize below waits for.
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(&mut host, src, self.stream.cu_stream())
        }
        .map_err(self.err("copying to the host"))?;
        self.synchronize()?;
        Ok(host)
    }

    fn ptr(&self, s: &impl DevAddr) -> u64 {
        s.addr(&self.stream)
    }

    /// The prompt-attention kernel for `t` query rows of `heads` heads (causal: a prompt over
    /// its cache; else a DiT sample), and its grid, block and shared memory.
    fn prefill_launch(
        &self,
        causal: bool,
        t: usize,
        heads: usize,
        head_dim: usize,
    ) -> attention::Launch {
        attention::launch(
            self.attention_kernel.get(),
            causal,
            t,
            heads,
            head_dim,
            self.info.multiprocessors,
        )
    }

    /// Kernel `name` of family `src`, built for `head_dim` (0: not a parameter).
    fn function(
        &self,
        src: &'static compile::Source,
        name: &'static str,
        head_dim: usize,
    ) -> Result<CudaFunction> {
        if let Some(f) = self.functions.borrow().get(&(name, head_dim)) {
            return Ok(f.clone());
        }
        let module = self.module(src, head_dim)?;
        let f = module.load_function(name).map_err(self.err(name))?;
        // Every kernel of the prompt-attention family takes its tiles in dynamic shared memory.
        if src.name == compile::ATTENTION_PREFILL.name {
            let bytes = attention::smem_bytes(name, head_dim) as i32;
            f.set_attribute(
                cu::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes,
            )
            .map_err(self.err(name))?;
        }
        self.functions
            .borrow_mut()
            .insert((name, head_dim), f.clone());
        Ok(f)
    }

    fn module(&self, src: &'static compile::Source, head_dim: usize) -> Result<Arc<CudaModule>> {
        if let Some(m) = self.modules.borrow().get(&(src.name, head_dim)) {
            return Ok(m.clone());
        }
        let defines = if head_dim > 0 {
            vec![("HEAD_DIM", head_dim.to_string())]
        } else {
            vec![]
        };
        let cubin = compile::cubin(src, &defines, self.target)
            .map_err(|e| Error::Device(format!("{}: {e}", self.info)))?;
        let module = self
            .ctx
            .load_module(Ptx::from_binary(cubin))
            .map_err(self.err("loading a kernel module"))?;
        self.modules
            .borrow_mut()
            .insert((src.name, head_dim), module.clone());
        Ok(module)
    }

    /// Blocks for a grid-stride loop over `n` items, 256 threads each.
    fn grid_for(&self, n: usize) -> u32 {
        (n.div_ceil(256).max(1) as u64).min(self.info.multiprocessors as u64 * 16) as u32
    }

    fn tensor(&self, rows: usize, cols: usize) -> Result<CudaTensor> {
        Ok(CudaTensor {
            buf: self.alloc(rows * cols * 2, Purpose::Workspace)?,
            rows,
            cols,
        })
    }

    fn gemm(&self, shape: gemm::Shape, ops: gemm::Operands) -> Result<()> {
        if shape.n == 1 && shape.k % 8 == 0 && !self.no_gemv {
            return self.gemv(shape, ops);
        }
        // SAFETY: the callers size y, x, w and bias from `shape`; all live on this stream.
        unsafe {
            self.gemm.matmul(
                shape,
                &ops,
                self.ptr(&self.workspace),
                self.stream.cu_stream() as *mut std::ffi::c_void,
            )
        }
        .map_err(|e| Error::Device(format!("{}: {e}", self.info)))
    }

    /// One token: a bandwidth-bound matrix-vector product by our own kernel (cuBLASLt's
    /// choice for n = 1 reads the weight at about half the speed of memory).
    fn gemv(&self, shape: gemm::Shape, ops: gemm::Operands) -> Result<()> {
        let f = self.function(&compile::GEMV, "gemv", 0)?;
        let (m, k, acc) = (shape.m as u32, shape.k as u32, shape.accumulate as u32);
        let bias = ops.bias.unwrap_or(0);
        let mut b = self.stream.launch_builder(&f);
        b.arg(&ops.w)
            .arg(&ops.x)
            .arg(&bias)
            .arg(&ops.y)
            .arg(&m)
            .arg(&k)
            .arg(&acc);
        // SAFETY: arguments match `gemv` in gemv.cu; the callers size w [m, k], x [k], y [m].
        unsafe { b.launch(cfg((m.div_ceil(8), 1, 1), 256, 0)) }.map_err(self.err("gemv"))?;
        Ok(())
    }

    fn linear_shape(
        x: &CudaTensor,
        w: &CudaWeight,
        bias: Option<&CudaWeight>,
    ) -> Result<gemm::Shape> {
        if x.cols != w.cols {
            return Err(Error::Device(format!(
                "linear: input has {} features, weight expects {}",
                x.cols, w.cols
            )));
        }
        Ok(gemm::Shape {
            m: w.rows as u64,
            n: x.rows as u64,
            k: w.cols as u64,
            bias: bias.is_some(),
            accumulate: false,
        })
    }

    fn upload_inv_freq(&self, inv_freq: &[f32]) -> Result<u64> {
        let mut cached = self.inv_freq.borrow_mut();
        if cached
            .as_ref()
            .is_none_or(|(host, _)| host.as_slice() != inv_freq)
        {
            let dev = self.upload(inv_freq, Purpose::Other("RoPE frequencies".into()))?;
            *cached = Some((inv_freq.to_vec(), dev));
        }
        Ok(self.ptr(&cached.as_ref().expect("just filled").1))
    }
}

fn prefill_supported(head_dim: usize) -> bool {
    head_dim % 16 == 0 && head_dim <= 256
}

/// Freed memory stays in the driver's pool for the next allocation instead of going back to
/// the system at every synchronization (activations are allocated and freed every layer).
fn keep_freed_memory_pooled(ctx: &CudaContext) {
    let mut pool: cu::CUmemoryPool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // SAFETY: the device handle is live; both pointers are valid for the calls. Failure only
    // costs speed, so it is ignored.
    unsafe {
        if cu::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device())
            .result()
            .is_ok()
        {
            let _ = cu::cuMemPoolSetAttribute(
                pool,
                cu::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut threshold as *mut u64 as *mut std::ffi::c_void,
            );
        }
    }
}

fn driver_msg(e: DriverError) -> String {
    match (e.error_name(), e.error_string()) {
        (Ok(name), Ok(text)) => format!("{} ({})", name.to_string_lossy(), text.to_string_lossy()),
        _ => format!("{:?}", e.0),
    }
}

fn cfg(grid: (u32, u32, u32), block: u32, shared: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: (block, 1, 1),
        shared_mem_bytes: shared,
    }
}

impl Backend for Cuda {
    type Weight = CudaWeight;
    type Activation = CudaTensor;
    type KvCache = CudaKvCache;

    fn weight(&self, t: &HostTensor) -> Result<CudaWeight> {
        let (rows, cols) = match t.shape[..] {
            [n] => (1, n),
            [r, c] => (r, c),
            _ => (t.shape[0], t.numel() / t.shape[0].max(1)),
        };
        let host: Cow<[bf16]> = match t.as_bf16() {
            Some(b) => Cow::Borrowed(b),
            // Converted on every core: a GGUF's blocks held resident are a whole model's worth.
            None => Cow::Owned({
                use rayon::prelude::*;
                t.to_f32().into_par_iter().map(bf16::from_f32).collect()
            }),
        };
        let buf = self.upload(host.as_ref(), Purpose::Resident(t.name.clone()))?;
        Ok(CudaWeight {
            ptr: self.ptr(&buf),
            rows,
            cols,
            storage: WeightStorage::Device(buf),
        })
    }

    fn kv_cache(
        &self,
        layers: usize,
        shape: AttentionShape,
        capacity: usize,
    ) -> Result<CudaKvCache> {
        let width = shape.num_kv_heads * shape.head_dim;
        let mut k = Vec::with_capacity(layers);
        let mut v = Vec::with_capacity(layers);
        for _ in 0..layers {
            // Positions are written (by `attention`) before they are read.
            k.push(self.alloc(capacity * width * 2, Purpose::KvCache)?);
            v.push(self.alloc(capacity * width * 2, Purpose::KvCache)?);
        }
        Ok(CudaKvCache {
            k,
            v,
            len: 0,
            capacity,
        })
    }

    fn embed(&self, table: &CudaWeight, ids: &[u32]) -> Result<CudaTensor> {
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= table.rows) {
            return Err(Error::Device(format!(
                "token id {bad} is outside the embedding table of {} rows",
                table.rows
            )));
        }
        if table.cols % 2 != 0 {
            return Err(Error::Device(format!(
                "hidden size {} is odd; the CUDA backend needs it even",
                table.cols
            )));
        }
        if let WeightStorage::Host(host) = &table.storage {
            // Gathered on the host: only the rows of these tokens go to the device.
            let row_bytes = host.dtype.bytes(table.cols);
            let mut rows: Vec<bf16> = Vec::with_capacity(ids.len() * table.cols);
            let mut values = vec![0f32; table.cols];
            for &id in ids {
                let row = &host.bytes()[id as usize * row_bytes..(id as usize + 1) * row_bytes];
                match host.dtype {
                    crate::checkpoint::DType::BF16 => match bytemuck::try_cast_slice(row) {
                        Ok(words) => rows.extend_from_slice(words),
                        Err(_) => rows.extend(
                            row.chunks_exact(2)
                                .map(|c| bf16::from_le_bytes([c[0], c[1]])),
                        ),
                    },
                    crate::checkpoint::DType::F32 => rows.extend(
                        row.chunks_exact(4)
                            .map(|c| bf16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
                    ),
                    crate::checkpoint::DType::F16 => {
                        rows.extend(row.chunks_exact(2).map(|c| {
                            bf16::from_f32(half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                        }))
                    }
                    crate::checkpoint::DType::Ggml(ty) => {
                        crate::checkpoint::dequantize(ty, row, &mut values);
                        rows.extend(values.iter().map(|&v| bf16::from_f32(v)));
                    }
                }
            }
            return Ok(CudaTensor {
                buf: self.upload(&rows, Purpose::Workspace)?,
                rows: ids.len(),
                cols: table.cols,
            });
        }
        let out = self.tensor(ids.len(), table.cols)?;
        let ids_dev = self.upload(ids, Purpose::Workspace)?;
        let f = self.function(&compile::EMBED, "embed", 0)?;
        let (tp, ip, op, hidden) = (
            table.dev()?,
            self.ptr(&ids_dev),
            self.ptr(&out.buf),
            table.cols as u32,
        );
        let mut b = self.stream.launch_builder(&f);
        b.arg(&tp).arg(&ip).arg(&op).arg(&hidden);
        // SAFETY: arguments match `embed` in embed.cu; ids are checked against the table.
        unsafe { b.launch(cfg((ids.len() as u32, 1, 1), 256, 0)) }.map_err(self.err("embed"))?;
        Ok(out)
    }

    fn rms_norm(&self, x: &CudaTensor, w: &CudaWeight, eps: f32) -> Result<CudaTensor> {
        self.rms_norm_rows(x, 0, x.rows, w, eps)
    }

    fn rms_norm_rows(
        &self,
        x: &CudaTensor,
        start: usize,
        len: usize,
        w: &CudaWeight,
        eps: f32,
    ) -> Result<CudaTensor> {
        let width = w.rows * w.cols;
        if width == 0 || x.cols % width != 0 || width % 2 != 0 || start + len > x.rows {
            return Err(Error::Device(format!(
                "rms_norm: rows {start}..{} of [{}, {}] with a weight of {width}",
                start + len,
                x.rows,
                x.cols
            )));
        }
        let out = self.tensor(len, x.cols)?;
        let segments = (len * x.cols / width) as u32;
        let f = self.function(&compile::NORM, "rms_norm", 0)?;
        let xp = self.ptr(&x.buf) + (start * x.cols * 2) as u64;
        let (wp, op, width) = (w.dev()?, self.ptr(&out.buf), width as u32);
        let mut b = self.stream.launch_builder(&f);
        b.arg(&xp)
            .arg(&wp)
            .arg(&op)
            .arg(&segments)
            .arg(&width)
            .arg(&eps);
        // SAFETY: arguments match `rms_norm` in norm.cu; the rows read lie inside x (checked
        // above), out holds them.
        unsafe { b.launch(cfg((segments.div_ceil(4), 1, 1), 128, 0)) }
            .map_err(self.err("rms_norm"))?;
        Ok(out)
    }

    fn linear(
        &self,
        x: &CudaTensor,
        w: &CudaWeight,
        bias: Option<&CudaWeight>,
    ) -> Result<CudaTensor> {
        let shape = Self::linear_shape(x, w, bias)?;
        let out = self.tensor(x.rows, w.rows)?;
        self.gemm(
            shape,
            gemm::Operands {
                y: self.ptr(&out.buf),
                x: self.ptr(&x.buf),
                w: w.dev()?,
                bias: bias.map(CudaWeight::dev).transpose()?,
            },
        )?;
        Ok(out)
    }

    fn linear_add(
        &self,
        x: &mut CudaTensor,
        start: usize,
        h: &CudaTensor,
        w: &CudaWeight,
        bias: Option<&CudaWeight>,
    ) -> Result<()> {
        let mut shape = Self::linear_shape(h, w, bias)?;
        if start + h.rows > x.rows || x.cols != w.rows {
            return Err(Error::Device(format!(
                "linear_add: residual [{}, {}] vs product [{}, {}] at row {start}",
                x.rows, x.cols, h.rows, w.rows
            )));
        }
        shape.accumulate = true;
        self.gemm(
            shape,
            gemm::Operands {
                y: self.ptr(&x.buf) + (start * x.cols * 2) as u64,
                x: self.ptr(&h.buf),
                w: w.dev()?,
                bias: bias.map(CudaWeight::dev).transpose()?,
            },
        )
    }

    fn rope(
        &self,
        q: &mut CudaTensor,
        k: &mut CudaTensor,
        rows: Range<usize>,
        pos0: usize,
        inv_freq: &[f32],
        shape: AttentionShape,
    ) -> Result<()> {
        let d = shape.head_dim;
        if inv_freq.len() != d / 2
            || q.cols % d != 0
            || k.cols % d != 0
            || q.rows != k.rows
            || rows.end > q.rows
        {
            return Err(Error::Device(format!(
                "rope: head_dim {d} with {} frequencies, rows {rows:?} of q [{}, {}], k [{}, {}]",
                inv_freq.len(),
                q.rows,
                q.cols,
                k.rows,
                k.cols
            )));
        }
        if rows.is_empty() {
            return Ok(());
        }
        let fp = self.upload_inv_freq(inv_freq)?;
        let f = self.function(&compile::ROPE, "rope", 0)?;
        let qp = self.ptr(&q.buf) + (rows.start * q.cols * 2) as u64;
        let kp = self.ptr(&k.buf) + (rows.start * k.cols * 2) as u64;
        let (qh, kh, hd, p0) = (
            (q.cols / d) as u32,
            (k.cols / d) as u32,
            d as u32,
            pos0 as u32,
        );
        let mut b = self.stream.launch_builder(&f);
        b.arg(&qp)
            .arg(&kp)
            .arg(&fp)
            .arg(&qh)
            .arg(&kh)
            .arg(&hd)
            .arg(&p0);
        // SAFETY: arguments match `rope` in rope.cu; shapes and rows checked above.
        unsafe { b.launch(cfg((rows.len() as u32, 1, 1), 256, 0)) }.map_err(self.err("rope"))?;
        Ok(())
    }

    fn attention(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        rows: Range<usize>,
        cache: &mut CudaKvCache,
        layer: usize,
        pos0: usize,
        shape: AttentionShape,
        out: &mut CudaTensor,
    ) -> Result<()> {
        let (t, hd) = (rows.len(), shape.head_dim);
        let (heads, kv_heads) = (shape.num_heads, shape.num_kv_heads);
        let kv_width = kv_heads * hd;
        if pos0 + t > cache.capacity {
            return Err(Error::PromptTooLong {
                tokens: pos0 + t,
                context: cache.capacity,
            });
        }
        if q.cols != heads * hd
            || k.cols != kv_width
            || v.cols != kv_width
            || heads % kv_heads != 0
            || out.cols != heads * hd
            || rows.end > q.rows.min(k.rows).min(v.rows).min(out.rows)
        {
            return Err(Error::Device(format!(
                "attention: rows {rows:?} of q [{}, {}], k/v [{}, {}] into [{}, {}] for {heads}/{kv_heads} heads of {hd}",
                q.rows, q.cols, k.rows, k.cols, out.rows, out.cols
            )));
        }
        if t == 0 {
            return Ok(());
        }
        // Append this pass's keys and values at positions pos0..pos0+t.
        let (at, bytes) = (pos0 * kv_width * 2, t * kv_width * 2);
        let from = (rows.start * kv_width * 2) as u64;
        self.copy_dtod(
            self.ptr(&cache.k[layer]) + at as u64,
            self.ptr(&k.buf) + from,
            bytes,
        )?;
        self.copy_dtod(
            self.ptr(&cache.v[layer]) + at as u64,
            self.ptr(&v.buf) + from,
            bytes,
        )?;

        let row_bytes = (rows.start * heads * hd * 2) as u64;
        let (qp, kp, vp, op) = (
            self.ptr(&q.buf) + row_bytes,
            self.ptr(&cache.k[layer]),
            self.ptr(&cache.v[layer]),
            self.ptr(&out.buf) + row_bytes,
        );
        let window = shape.sliding_window.unwrap_or(0) as u32;
        let scale_log2 = std::f32::consts::LOG2_E / (hd as f32).sqrt();
        let (heads_u, kv_heads_u, p0) = (heads as u32, kv_heads as u32, pos0 as u32);

        if t > DECODE_MAX_ROWS && prefill_supported(hd) {
            let launch = self.prefill_launch(true, t, heads, hd);
            let f = self.function(&compile::ATTENTION_PREFILL, launch.name, hd)?;
            let t_u = t as u32;
            let mut b = self.stream.launch_builder(&f);
            b.arg(&qp)
                .arg(&kp)
                .arg(&vp)
                .arg(&op)
                .arg(&t_u)
                .arg(&heads_u)
                .arg(&kv_heads_u);
            b.arg(&p0).arg(&window).arg(&scale_log2);
            // SAFETY: arguments match `attn_prefill_v1`/`_v2`; the cache holds positions
            // 0..pos0+t.
            unsafe { b.launch(cfg(launch.grid, launch.block, launch.smem_bytes)) }
                .map_err(self.err(launch.name))?;
            return Ok(());
        }

        // Split the keys so that the grid covers the GPU about twice.
        let n_keys = pos0 + t;
        let target = 2 * self.info.multiprocessors as usize;
        let splits = n_keys
            .div_ceil(64)
            .min(target.div_ceil(heads * t))
            .clamp(1, 1024);
        let chunk = n_keys.div_ceil(splits) as u32;
        let parts = t * heads * splits;
        let part_o = self.alloc(
            if splits > 1 { parts * hd * 4 } else { 4 },
            Purpose::Workspace,
        )?;
        let part_ml = self.alloc(
            if splits > 1 { parts * 2 * 4 } else { 4 },
            Purpose::Workspace,
        )?;
        let (pop, pmp) = (self.ptr(&part_o), self.ptr(&part_ml));
        let f = self.function(&compile::ATTENTION_DECODE, "attn_decode", hd)?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(&qp)
            .arg(&kp)
            .arg(&vp)
            .arg(&op)
            .arg(&pop)
            .arg(&pmp)
            .arg(&heads_u);
        b.arg(&kv_heads_u)
            .arg(&p0)
            .arg(&chunk)
            .arg(&window)
            .arg(&scale_log2);
        // SAFETY: arguments match `attn_decode`; partial buffers hold t*heads*splits entries.
        unsafe { b.launch(cfg((heads as u32, t as u32, splits as u32), 128, 0)) }
            .map_err(self.err("attn_decode"))?;
        if splits > 1 {
            let f = self.function(&compile::ATTENTION_DECODE, "attn_decode_combine", hd)?;
            let splits_u = splits as u32;
            let mut b = self.stream.launch_builder(&f);
            b.arg(&pop).arg(&pmp).arg(&op).arg(&heads_u).arg(&splits_u);
            // SAFETY: arguments match `attn_decode_combine`.
            unsafe { b.launch(cfg((heads as u32, t as u32, 1), 128, 0)) }
                .map_err(self.err("attn_decode_combine"))?;
        }
        Ok(())
    }

    fn activation(&self, rows: usize, cols: usize) -> Result<CudaTensor> {
        self.tensor(rows, cols)
    }

    fn silu_mul(&self, gate: &mut CudaTensor, up: &CudaTensor) -> Result<()> {
        if (gate.rows, gate.cols) != (up.rows, up.cols) {
            return Err(Error::Device(
                "silu_mul: gate and up differ in shape".into(),
            ));
        }
        let n = gate.rows * gate.cols;
        let (name, items) = if n % 8 == 0 {
            ("silu_mul_x8", n / 8)
        } else {
            ("silu_mul", n)
        };
        let f = self.function(&compile::ELEMENTWISE, name, 0)?;
        let (gp, up_, items_u) = (self.ptr(&gate.buf), self.ptr(&up.buf), items as u64);
        let mut b = self.stream.launch_builder(&f);
        b.arg(&gp).arg(&up_).arg(&items_u);
        // SAFETY: arguments match the kernel; both buffers hold n values.
        unsafe { b.launch(cfg((self.grid_for(items), 1, 1), 256, 0)) }.map_err(self.err(name))?;
        Ok(())
    }

    fn add_assign(&self, x: &mut CudaTensor, start: usize, y: &CudaTensor) -> Result<()> {
        if x.cols != y.cols || start + y.rows > x.rows {
            return Err(Error::Device(format!(
                "add_assign: [{}, {}] at row {start} of [{}, {}]",
                y.rows, y.cols, x.rows, x.cols
            )));
        }
        let (n, offset) = (y.rows * y.cols, start * x.cols);
        let (name, items) = if n % 8 == 0 && offset % 8 == 0 {
            ("add_assign_x8", n / 8)
        } else {
            ("add_assign", n)
        };
        let f = self.function(&compile::ELEMENTWISE, name, 0)?;
        let xp = self.ptr(&x.buf) + (offset * 2) as u64;
        let (yp, items_u) = (self.ptr(&y.buf), items as u64);
        let mut b = self.stream.launch_builder(&f);
        b.arg(&xp).arg(&yp).arg(&items_u);
        // SAFETY: arguments match the kernel; the n values written lie inside x (checked
        // above), y holds n values.
        unsafe { b.launch(cfg((self.grid_for(items), 1, 1), 256, 0)) }.map_err(self.err(name))?;
        Ok(())
    }

    fn rows(&self, x: &CudaTensor, start: usize, len: usize) -> Result<CudaTensor> {
        assert!(start + len <= x.rows, "rows {start}+{len} of {}", x.rows);
        let out = self.tensor(len, x.cols)?;
        let src = self.ptr(&x.buf) + (start * x.cols * 2) as u64;
        self.copy_dtod(self.ptr(&out.buf), src, len * x.cols * 2)?;
        Ok(out)
    }

    fn concat_rows(&self, parts: &[CudaTensor]) -> Result<CudaTensor> {
        let cols = parts.first().map_or(0, |p| p.cols);
        assert!(
            parts.iter().all(|p| p.cols == cols),
            "concat_rows: widths differ"
        );
        let rows = parts.iter().map(|p| p.rows).sum();
        let out = self.tensor(rows, cols)?;
        let mut at = 0;
        for p in parts {
            let n = p.rows * cols * 2;
            self.copy_dtod(self.ptr(&out.buf) + at as u64, self.ptr(&p.buf), n)?;
            at += n;
        }
        Ok(out)
    }

    fn concat_cols(&self, mut parts: Vec<CudaTensor>) -> Result<CudaTensor> {
        if parts.len() == 1 {
            return Ok(parts.pop().expect("one part"));
        }
        let rows = parts.first().map_or(0, |p| p.rows);
        assert!(
            parts.iter().all(|p| p.rows == rows),
            "concat_cols: row counts differ"
        );
        let cols = parts.iter().map(|p| p.cols).sum();
        let out = self.tensor(rows, cols)?;
        let mut at = 0; // bytes into each output row
        for p in &parts {
            let copy = cu::CUDA_MEMCPY2D {
                srcXInBytes: 0,
                srcY: 0,
                srcMemoryType: cu::CUmemorytype::CU_MEMORYTYPE_DEVICE,
                srcHost: std::ptr::null(),
                srcDevice: self.ptr(&p.buf),
                srcArray: std::ptr::null_mut(),
                srcPitch: p.cols * 2,
                dstXInBytes: 0,
                dstY: 0,
                dstMemoryType: cu::CUmemorytype::CU_MEMORYTYPE_DEVICE,
                dstHost: std::ptr::null_mut(),
                dstDevice: self.ptr(&out.buf) + at as u64,
                dstArray: std::ptr::null_mut(),
                dstPitch: cols * 2,
                WidthInBytes: p.cols * 2,
                Height: rows,
            };
            // SAFETY: both buffers live; rows × width lie inside each (shapes checked above).
            unsafe { cu::cuMemcpy2DAsync_v2(&copy, self.stream.cu_stream()) }
                .result()
                .map_err(self.err("copying logits blocks"))?;
            at += p.cols * 2;
        }
        Ok(out)
    }

    fn to_host(&self, x: &CudaTensor) -> Result<Vec<f32>> {
        let host: Vec<bf16> = self.download(self.ptr(&x.buf), x.rows * x.cols)?;
        Ok(host.into_iter().map(bf16::to_f32).collect())
    }

    fn argmax_rows(&self, x: &CudaTensor) -> Result<Vec<u32>> {
        let out = self.alloc(x.rows * 4, Purpose::Workspace)?;
        let f = self.function(&compile::ARGMAX, "argmax_rows", 0)?;
        let (xp, op, cols) = (self.ptr(&x.buf), self.ptr(&out), x.cols as u32);
        let mut b = self.stream.launch_builder(&f);
        b.arg(&xp).arg(&op).arg(&cols);
        // SAFETY: arguments match `argmax_rows`; out holds one index per row.
        unsafe { b.launch(cfg((x.rows as u32, 1, 1), 1024, 0)) }
            .map_err(self.err("argmax_rows"))?;
        self.download(self.ptr(&out), x.rows)
    }

    fn cols(&self, x: &CudaTensor) -> usize {
        x.cols
    }
}
