//! What sets the speed of a host→device copy: the host memory it reads (page-locked by
//! `cuMemHostAlloc`, or an anonymous or file mapping registered with `cuMemHostRegister`,
//! read-only or not, with or without transparent huge pages), the size of each copy, and a
//! kernel streaming device memory beside it (as the exponent decoder does during a streamed
//! pass), and one copy stream against two (each copy split in halves, one on each stream: two
//! copy engines). Prints a table, then one JSON line.
//!
//!     cargo run --release --example link_probe [-- --gib 1 --runs 5]
//!
//! Each sample copies the whole source (`--gib`) into a 256 MiB device buffer (wrapping), in
//! copies of the size named, between two events on the copy stream; the figure is the median
//! of `--runs` samples, GB/s = 1e9 bytes/s.

use std::sync::Arc;

use cudarc::driver::sys as cu;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use memmap2::{Advice, Mmap, MmapMut};

const DEVICE_BYTES: usize = 256 << 20;

/// A kernel that reads one device buffer and writes another, over and over: HBM traffic of
/// the kind the exponent decoder makes (it reads bytes and writes bf16), beside the copies.
const HOG: &str = r#"
extern "C" __global__ void hog(const uint4* a, uint4* b, unsigned long long n, int reps) {
    for (int r = 0; r < reps; r++) {
        for (unsigned long long i = blockIdx.x * blockDim.x + threadIdx.x; i < n;
             i += (unsigned long long)gridDim.x * blockDim.x) {
            uint4 v = a[i];
            v.x += r;
            b[i] = v;
        }
    }
}
"#;

enum Host {
    Pinned(*mut u8),
    Anon(MmapMut),
    File(Mmap),
}

struct Source {
    name: String,
    host: Host,
    len: usize,
    registered: bool,
}

impl Source {
    fn ptr(&self) -> *const u8 {
        match &self.host {
            Host::Pinned(p) => *p,
            Host::Anon(m) => m.as_ptr(),
            Host::File(m) => m.as_ptr(),
        }
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        // SAFETY: registered or allocated by `sources` below; no copy is in flight (each
        // sample synchronizes).
        unsafe {
            if self.registered {
                cu::cuMemHostUnregister(self.ptr() as *mut std::ffi::c_void);
            }
            if let Host::Pinned(p) = self.host {
                cu::cuMemFreeHost(p as *mut std::ffi::c_void);
            }
        }
    }
}

fn register(ptr: *const u8, len: usize, flags: u32, what: &str) {
    // SAFETY: `ptr..ptr+len` is a live mapping owned by the caller's `Source`.
    let r = unsafe { cu::cuMemHostRegister_v2(ptr as *mut std::ffi::c_void, len, flags) };
    assert_eq!(r, cu::CUresult::CUDA_SUCCESS, "registering {what}");
}

fn anon(len: usize, huge: bool) -> MmapMut {
    let mut m = MmapMut::map_anon(len).expect("anonymous mapping");
    if huge {
        m.advise(Advice::HugePage).expect("madvise(MADV_HUGEPAGE)");
    }
    for (i, b) in m.iter_mut().enumerate() {
        *b = (i * 31 % 251) as u8;
    }
    m
}

fn sources(len: usize) -> Vec<Source> {
    let mut out = Vec::new();
    let mut p: *mut std::ffi::c_void = std::ptr::null_mut();
    // SAFETY: `p` receives a fresh allocation of `len` bytes, written before use.
    let r = unsafe { cu::cuMemHostAlloc(&mut p, len, 0) };
    assert_eq!(r, cu::CUresult::CUDA_SUCCESS, "cuMemHostAlloc");
    // SAFETY: `len` writable bytes just allocated.
    unsafe { std::ptr::write_bytes(p as *mut u8, 7, len) };
    out.push(Source {
        name: "cuMemHostAlloc".into(),
        host: Host::Pinned(p as *mut u8),
        len,
        registered: false,
    });
    for (huge, flags, label) in [
        (false, 0, "anon 4K, registered"),
        (
            false,
            cu::CU_MEMHOSTREGISTER_READ_ONLY,
            "anon 4K, registered read-only",
        ),
        (true, 0, "anon THP, registered"),
        (
            true,
            cu::CU_MEMHOSTREGISTER_READ_ONLY,
            "anon THP, registered read-only",
        ),
    ] {
        let m = anon(len, huge);
        register(m.as_ptr(), len, flags, label);
        out.push(Source {
            name: label.into(),
            host: Host::Anon(m),
            len,
            registered: true,
        });
    }
    let path = std::env::temp_dir().join("ferry-link-probe.bin");
    std::fs::write(&path, vec![5u8; len]).expect("writing the probe file");
    let file = std::fs::File::open(&path).expect("opening the probe file");
    // SAFETY: the file is ours and not changed while mapped.
    let m = unsafe { Mmap::map(&file) }.expect("mapping the probe file");
    let _ = std::fs::remove_file(&path);
    for b in m.chunks(4096) {
        std::hint::black_box(b[0]);
    }
    register(
        m.as_ptr(),
        len,
        cu::CU_MEMHOSTREGISTER_READ_ONLY,
        "file mapping",
    );
    out.push(Source {
        name: "file mapping, registered read-only".into(),
        host: Host::File(m),
        len,
        registered: true,
    });
    out
}

/// The HBM kernel and its buffers, on a stream of its own.
struct Hog<'a> {
    stream: &'a Arc<CudaStream>,
    f: &'a cudarc::driver::CudaFunction,
    x: &'a CudaSlice<u8>,
    y: &'a mut CudaSlice<u8>,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[allow(clippy::too_many_arguments)]
fn sample(
    ctx: &Arc<CudaContext>,
    copy: &Arc<CudaStream>,
    dst: &CudaSlice<u8>,
    src: &Source,
    chunk: usize,
    runs: usize,
    mut hog: Option<Hog>,
    second: Option<&Arc<CudaStream>>,
) -> f64 {
    let timing = Some(cu::CUevent_flags::CU_EVENT_DEFAULT);
    let (a, b) = (
        ctx.new_event(timing).unwrap(),
        ctx.new_event(timing).unwrap(),
    );
    let (dptr, _guard) = cudarc::driver::DevicePtr::device_ptr(dst, copy);
    let mut gbps = Vec::new();
    for _ in 0..runs {
        if let Some(h) = hog.as_mut() {
            // About 80 GB of traffic at ~3 TB/s: longer than any sample's copies.
            let n = (h.x.len() / 16) as u64;
            let reps = 40i32;
            let mut l = h.stream.launch_builder(h.f);
            l.arg(h.x).arg(&mut *h.y).arg(&n).arg(&reps);
            // SAFETY: the kernel reads `n` uint4 of `x` and writes `n` of `y`.
            unsafe {
                l.launch(LaunchConfig {
                    grid_dim: (264, 1, 1),
                    block_dim: (512, 1, 1),
                    shared_mem_bytes: 0,
                })
            }
            .unwrap();
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        a.record(copy).unwrap();
        if let Some(second) = second {
            second.wait(&a).unwrap();
        }
        let mut off = 0;
        let mut at = 0;
        while off < src.len {
            let n = chunk.min(src.len - off).min(DEVICE_BYTES - at);
            // With a second stream, each copy is split in halves, one on each stream.
            let parts = match second {
                Some(second) => vec![(copy, 0, n / 2), (second, n / 2, n - n / 2)],
                None => vec![(copy, 0, n)],
            };
            for (stream, part, len) in parts {
                // SAFETY: `src.ptr() + off + part .. + len` lies in the source,
                // `dptr + at + part .. + len` in `dst`.
                let r = unsafe {
                    cu::cuMemcpyHtoDAsync_v2(
                        dptr + (at + part) as u64,
                        src.ptr().add(off + part) as *const std::ffi::c_void,
                        len,
                        stream.cu_stream(),
                    )
                };
                assert_eq!(r, cu::CUresult::CUDA_SUCCESS, "cuMemcpyHtoDAsync");
            }
            off += n;
            at = (at + n) % DEVICE_BYTES;
        }
        if let Some(second) = second {
            let done = ctx.new_event(None).unwrap();
            done.record(second).unwrap();
            copy.wait(&done).unwrap();
        }
        b.record(copy).unwrap();
        b.synchronize().unwrap();
        let ms = a.elapsed_ms(&b).unwrap() as f64;
        gbps.push(src.len as f64 / (ms * 1e6));
        if let Some(h) = hog.as_ref() {
            h.stream.synchronize().unwrap();
        }
    }
    median(&mut gbps)
}

fn main() {
    let mut gib = 1.0f64;
    let mut runs = 5usize;
    let args: Vec<String> = std::env::args().skip(1).collect();
    for w in args.windows(2) {
        match w[0].as_str() {
            "--gib" => gib = w[1].parse().expect("--gib takes a number"),
            "--runs" => runs = w[1].parse().expect("--runs takes a count"),
            _ => {}
        }
    }
    let len = ((gib * (1u64 << 30) as f64) as usize).max(DEVICE_BYTES);
    let ctx = CudaContext::new(0).expect("a CUDA device");
    let copy = ctx.new_stream().unwrap();
    let other = ctx.new_stream().unwrap();
    let dst = copy.alloc_zeros::<u8>(DEVICE_BYTES).unwrap();
    let ptx = cudarc::nvrtc::compile_ptx(HOG).expect("compiling the hog kernel");
    let module = ctx.load_module(ptx).unwrap();
    let f = module.load_function("hog").unwrap();
    let x = other.alloc_zeros::<u8>(1 << 30).unwrap();
    let mut y = other.alloc_zeros::<u8>(1 << 30).unwrap();
    other.synchronize().unwrap();
    let srcs = sources(len);
    let chunks = [256usize << 20, 16 << 20, 4 << 20, 1 << 20];
    let mut rows = Vec::new();
    let second = ctx.new_stream().unwrap();
    println!(
        "| host memory | copy size | alone GB/s | beside HBM kernel GB/s | two streams alone | two streams beside |"
    );
    println!("|---|---|---|---|---|---|");
    for s in &srcs {
        for &c in &chunks {
            let mut figures = [0.0; 4];
            for (i, figure) in figures.iter_mut().enumerate() {
                let hog = (i % 2 == 1).then_some(Hog {
                    stream: &other,
                    f: &f,
                    x: &x,
                    y: &mut y,
                });
                let two = (i >= 2).then_some(&second);
                *figure = sample(&ctx, &copy, &dst, s, c, runs, hog, two);
            }
            let [alone, beside, two_alone, two_beside] = figures;
            println!(
                "| {} | {} MiB | {alone:.2} | {beside:.2} | {two_alone:.2} | {two_beside:.2} |",
                s.name,
                c >> 20,
            );
            rows.push(serde_json::json!({
                "host": s.name, "copy_mib": c >> 20, "alone_gbps": alone, "beside_hbm_gbps": beside,
                "two_streams_alone_gbps": two_alone, "two_streams_beside_hbm_gbps": two_beside,
            }));
        }
    }
    println!(
        "{}",
        serde_json::json!({ "bytes": len, "runs": runs, "rows": rows })
    );
}
