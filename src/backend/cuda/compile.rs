//! Kernels: CUDA C++ sources compiled with NVRTC for the card at first use, and the machine
//! code (cubin) cached on disk under `~/.cache/ferry/kernels/` (or `$FERRY_CACHE_DIR`), keyed
//! by a hash of the source, the defines, the architecture and the NVRTC and driver versions.

use std::ffi::{c_char, c_int, CString};
use std::path::PathBuf;

use cudarc::nvrtc::sys as nvrtc;

/// Helpers every kernel file uses (bf16 conversions, warp reductions, PTX wrappers).
const PRELUDE: &str = include_str!("kernels/prelude.cuh");

/// One kernel family: a `.cu` file and the functions it defines.
#[derive(Clone, Copy, Debug)]
pub struct Source {
    pub name: &'static str,
    pub code: &'static str,
}

macro_rules! kernel_source {
    ($name:literal) => {
        Source {
            name: $name,
            code: include_str!(concat!("kernels/", $name, ".cu")),
        }
    };
}

pub const EMBED: Source = kernel_source!("embed");
pub const NORM: Source = kernel_source!("norm");
pub const ROPE: Source = kernel_source!("rope");
pub const ELEMENTWISE: Source = kernel_source!("elementwise");
pub const ARGMAX: Source = kernel_source!("argmax");
pub const GEMV: Source = kernel_source!("gemv");
pub const ATTENTION_DECODE: Source = kernel_source!("attention_decode");
pub const ATTENTION_PREFILL: Source = kernel_source!("attention_prefill");
pub const DIT: Source = kernel_source!("dit");
pub const ENCODER: Source = kernel_source!("encoder");
pub const IMAGE: Source = kernel_source!("image");
pub const DECOMPRESS: Source = kernel_source!("decompress");
pub const DEQUANTIZE: Source = kernel_source!("dequantize");

/// Every kernel family.
#[cfg(test)]
pub const ALL: [Source; 13] = [
    EMBED,
    GEMV,
    NORM,
    ROPE,
    ELEMENTWISE,
    ARGMAX,
    ATTENTION_DECODE,
    ATTENTION_PREFILL,
    DIT,
    ENCODER,
    IMAGE,
    DECOMPRESS,
    DEQUANTIZE,
];

/// What the machine code is built for.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    /// Compute capability (9, 0) for an H100.
    pub arch: (i32, i32),
    /// `cuDriverGetVersion` (13000 for CUDA 13.0); part of the cache key.
    pub driver_version: i32,
}

/// The cubin for `src` with `defines` (`-DNAME=VALUE`), from the disk cache or compiled now.
pub fn cubin(src: &Source, defines: &[(&str, String)], target: Target) -> Result<Vec<u8>, String> {
    let (major, minor) = target.arch;
    let nvrtc_version = nvrtc_version()?;
    let mut options = vec![
        format!("--gpu-architecture=sm_{major}{minor}"),
        "--std=c++17".to_string(),
    ];
    options.extend(defines.iter().map(|(k, v)| format!("-D{k}={v}")));
    // FERRY_PTXAS_VERBOSE=1 prints registers, shared memory and spills of each kernel built.
    let verbose = std::env::var_os("FERRY_PTXAS_VERBOSE").is_some();
    if verbose {
        options.push("--ptxas-options=-v".into());
    }

    let mut key = Fnv::new();
    for part in [PRELUDE, src.code] {
        key.write(part.as_bytes());
    }
    for o in &options {
        key.write(o.as_bytes());
    }
    key.write(&nvrtc_version.0.to_le_bytes());
    key.write(&nvrtc_version.1.to_le_bytes());
    key.write(&target.driver_version.to_le_bytes());
    let file = cache_dir().map(|d| {
        d.join(format!(
            "{}-sm{major}{minor}-{:016x}.cubin",
            src.name,
            key.finish()
        ))
    });

    if let Some(bytes) = file
        .as_ref()
        .filter(|_| !verbose)
        .and_then(|f| std::fs::read(f).ok())
    {
        return Ok(bytes);
    }
    let code = format!("{PRELUDE}\n#line 1 \"{}.cu\"\n{}", src.name, src.code);
    let bytes = compile(src.name, &code, &options)?;
    if let Some(file) = file {
        // A cache that cannot be written only costs a compile next time.
        let _ = write_atomically(&file, &bytes);
    }
    Ok(bytes)
}

/// The NVRTC version (major, minor).
pub fn nvrtc_version() -> Result<(i32, i32), String> {
    super::loader::load_nvrtc()?;
    let (mut major, mut minor): (c_int, c_int) = (0, 0);
    // SAFETY: NVRTC is loaded; both pointers are valid for writes.
    let rc = unsafe { nvrtc::nvrtcVersion(&mut major, &mut minor) };
    check(rc, "nvrtcVersion")?;
    Ok((major, minor))
}

fn compile(name: &str, code: &str, options: &[String]) -> Result<Vec<u8>, String> {
    super::loader::load_nvrtc()?;
    let c_code = CString::new(code).map_err(|_| format!("{name}.cu: NUL byte in source"))?;
    let c_name = CString::new(format!("{name}.cu")).expect("kernel names have no NUL");
    let c_opts: Vec<CString> = options
        .iter()
        .map(|o| CString::new(o.as_str()).expect("options have no NUL"))
        .collect();
    let opt_ptrs: Vec<*const c_char> = c_opts.iter().map(|o| o.as_ptr()).collect();

    let mut prog: nvrtc::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; the program is destroyed below.
    unsafe {
        check(
            nvrtc::nvrtcCreateProgram(
                &mut prog,
                c_code.as_ptr(),
                c_name.as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
            ),
            "nvrtcCreateProgram",
        )?;
        let rc = nvrtc::nvrtcCompileProgram(prog, opt_ptrs.len() as c_int, opt_ptrs.as_ptr());
        if rc == nvrtc::nvrtcResult::NVRTC_SUCCESS
            && options.iter().any(|o| o.starts_with("--ptxas"))
        {
            eprintln!(
                "{name}.cu {}:\n{}",
                options.join(" "),
                program_log(prog).trim()
            );
        }
        let result = if rc == nvrtc::nvrtcResult::NVRTC_SUCCESS {
            let mut size = 0usize;
            check(
                nvrtc::nvrtcGetCUBINSize(prog, &mut size),
                "nvrtcGetCUBINSize",
            )
            .and_then(|()| {
                let mut bin = vec![0u8; size];
                check(
                    nvrtc::nvrtcGetCUBIN(prog, bin.as_mut_ptr() as *mut c_char),
                    "nvrtcGetCUBIN",
                )
                .map(|()| bin)
            })
        } else {
            Err(format!(
                "kernel {name}.cu failed to compile ({}): {}",
                options.join(" "),
                program_log(prog).trim()
            ))
        };
        let _ = nvrtc::nvrtcDestroyProgram(&mut prog);
        result
    }
}

/// The compiler's messages for `prog`.
///
/// SAFETY: `prog` is a live program.
unsafe fn program_log(prog: nvrtc::nvrtcProgram) -> String {
    let mut size = 0usize;
    if nvrtc::nvrtcGetProgramLogSize(prog, &mut size) != nvrtc::nvrtcResult::NVRTC_SUCCESS {
        return "(no log)".into();
    }
    let mut log = vec![0u8; size];
    if nvrtc::nvrtcGetProgramLog(prog, log.as_mut_ptr() as *mut c_char)
        != nvrtc::nvrtcResult::NVRTC_SUCCESS
    {
        return "(no log)".into();
    }
    String::from_utf8_lossy(&log)
        .trim_end_matches('\0')
        .to_string()
}

fn check(rc: nvrtc::nvrtcResult, what: &str) -> Result<(), String> {
    if rc == nvrtc::nvrtcResult::NVRTC_SUCCESS {
        Ok(())
    } else {
        Err(format!("NVRTC {what} failed: {rc:?}"))
    }
}

/// `$FERRY_CACHE_DIR/kernels`, `$XDG_CACHE_HOME/ferry/kernels` or `~/.cache/ferry/kernels`.
fn cache_dir() -> Option<PathBuf> {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let dir = if let Some(d) = env("FERRY_CACHE_DIR") {
        d.join("kernels")
    } else if let Some(d) = env("XDG_CACHE_HOME") {
        d.join("ferry/kernels")
    } else {
        env("HOME")?.join(".cache/ferry/kernels")
    };
    std::fs::create_dir_all(&dir).ok()?;
    Some(dir)
}

/// Write through a temporary file and rename, so a reader never sees half a cubin.
fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// 64-bit FNV-1a: a stable hash for cache keys (std's hasher may change between releases).
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // Separate parts so that ("ab", "c") and ("a", "bc") differ.
        self.0 ^= 0xff;
        self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel compiles with NVRTC for Hopper, for every head size the attention kernels
    /// are built for. Needs NVRTC only (no GPU); skipped visibly where it is missing.
    #[test]
    fn every_kernel_compiles() {
        if let Err(why) = super::super::loader::load_nvrtc() {
            eprintln!("SKIPPED: NVRTC not found: {why}");
            return;
        }
        std::env::set_var(
            "FERRY_CACHE_DIR",
            std::env::temp_dir().join(format!("ferry-nvrtc-test-{}", std::process::id())),
        );
        let target = Target {
            arch: (9, 0),
            driver_version: 0,
        };
        for src in ALL {
            let head_dims: &[usize] = if src.name.starts_with("attention") {
                &[16, 32, 64, 128, 256]
            } else {
                &[0]
            };
            for &d in head_dims {
                let defines = if d > 0 {
                    vec![("HEAD_DIM", d.to_string())]
                } else {
                    vec![]
                };
                let bin = cubin(&src, &defines, target)
                    .unwrap_or_else(|e| panic!("{} (head_dim {d}): {e}", src.name));
                assert!(
                    bin.starts_with(b"\x7fELF"),
                    "{}: not an ELF cubin",
                    src.name
                );
            }
        }
        let _ = std::fs::remove_dir_all(std::env::var_os("FERRY_CACHE_DIR").unwrap());
    }

    #[test]
    fn fnv_separates_parts() {
        let h = |parts: &[&str]| {
            let mut f = Fnv::new();
            for p in parts {
                f.write(p.as_bytes());
            }
            f.finish()
        };
        assert_ne!(h(&["ab", "c"]), h(&["a", "bc"]));
        assert_eq!(h(&["ab"]), h(&["ab"]));
    }
}
