//! Finding the CUDA libraries at run time. cudarc's dynamic loading asks the system loader for
//! library *names* only (`libcublasLt.so.13`, …) and panics when none is found. So ferry looks
//! first, in the places a CUDA installation usually is, opens each library by its full path,
//! and keeps it open: the loader then answers cudarc's later request by name with the library
//! already loaded (glibc matches a requested name against the sonames of loaded objects).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libloading::Library;

/// The libraries the backend needs, where they were found.
#[derive(Debug)]
pub struct Found {
    pub driver: String,
    pub cublaslt: String,
    pub nvrtc: String,
}

struct Loaded {
    found: Found,
    /// Kept open for the life of the process.
    _libs: Vec<Library>,
}

/// One library to look for: file names in order of preference.
struct Wanted {
    what: &'static str,
    names: &'static [&'static str],
}

const DRIVER: Wanted = Wanted {
    what: "the CUDA driver",
    names: &["libcuda.so.1", "libcuda.so"],
};
const CUBLASLT: Wanted = Wanted {
    what: "cuBLASLt",
    names: &["libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"],
};
const NVRTC: Wanted = Wanted {
    what: "NVRTC",
    names: &["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"],
};

/// Load the driver, cuBLASLt and NVRTC once per process; the error says what was looked for
/// and where.
pub fn load() -> Result<&'static Found, String> {
    static LOADED: OnceLock<Result<Loaded, String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            let dirs = search_dirs();
            let mut libs = Vec::new();
            let driver = open(&DRIVER, &dirs, &mut libs)?;
            let cublaslt = open(&CUBLASLT, &dirs, &mut libs)?;
            let nvrtc = load_nvrtc()?.to_string();
            Ok(Loaded {
                found: Found {
                    driver,
                    cublaslt,
                    nvrtc,
                },
                _libs: libs,
            })
        })
        .as_ref()
        .map(|l| &l.found)
        .map_err(Clone::clone)
}

/// Load NVRTC alone (compiling kernels needs no GPU); returns where it was found.
pub fn load_nvrtc() -> Result<&'static str, String> {
    static LOADED: OnceLock<Result<(String, Vec<Library>), String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            let mut libs = Vec::new();
            let nvrtc = open(&NVRTC, &search_dirs(), &mut libs)?;
            // NVRTC opens its builtins library by name when compiling; load the one beside it.
            let path = nvrtc.trim_end_matches(" (loader path)");
            if let Some(dir) = Path::new(path).parent() {
                for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                    if e.file_name()
                        .to_string_lossy()
                        .starts_with("libnvrtc-builtins.so")
                    {
                        // SAFETY: loading a vendor library runs its initializers; it is the
                        // builtins library that NVRTC itself would load.
                        if let Ok(lib) = unsafe { Library::new(e.path()) } {
                            libs.push(lib);
                        }
                    }
                }
            }
            Ok((nvrtc, libs))
        })
        .as_ref()
        .map(|(found, _)| found.as_str())
        .map_err(Clone::clone)
}

/// Open the first of `w.names` found: through the loader path, then in `dirs`.
fn open(w: &Wanted, dirs: &[PathBuf], libs: &mut Vec<Library>) -> Result<String, String> {
    for name in w.names {
        // SAFETY: loading a vendor library runs its initializers; these are the CUDA
        // libraries the backend is about to call.
        if let Ok(lib) = unsafe { Library::new(*name) } {
            libs.push(lib);
            return Ok(format!("{name} (loader path)"));
        }
    }
    for dir in dirs {
        for name in w.names {
            let path = dir.join(name);
            if !path.is_file() {
                continue;
            }
            // SAFETY: as above.
            if let Ok(lib) = unsafe { Library::new(&path) } {
                libs.push(lib);
                return Ok(path.display().to_string());
            }
        }
    }
    let shown: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    Err(format!(
        "{} ({}) not found in the loader path (LD_LIBRARY_PATH, ldconfig) nor in {}",
        w.what,
        w.names.join(", "),
        if shown.is_empty() {
            "any CUDA folder".to_string()
        } else {
            shown.join(", ")
        }
    ))
}

/// Folders that may hold CUDA libraries, most specific first: `CUDA_HOME`/`CUDA_PATH`,
/// `/usr/local/cuda`, the driver's usual folders, and pip's `nvidia-*` packages in every
/// Python environment we can see (virtualenv/conda prefixes, interpreters on PATH, user and
/// system site-packages). Only folders that exist are listed.
pub fn search_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    for var in ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"] {
        if let Some(root) = env(var) {
            let root = PathBuf::from(root);
            dirs.push(root.join("lib64"));
            dirs.push(root.join("lib"));
            dirs.push(root.join("targets/x86_64-linux/lib"));
        }
    }
    for root in ["/usr/local/cuda", "/opt/cuda"] {
        dirs.push(Path::new(root).join("lib64"));
        dirs.push(Path::new(root).join("targets/x86_64-linux/lib"));
    }
    for d in [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib64",
        "/usr/local/nvidia/lib64",
        "/usr/lib/wsl/lib",
    ] {
        dirs.push(PathBuf::from(d));
    }
    for site in site_packages() {
        // pip's CUDA 13 wheels share nvidia/cu13/lib; CUDA 12 wheels have one folder each
        // (nvidia/cublas/lib, nvidia/cuda_nvrtc/lib).
        let nvidia = site.join("nvidia");
        if let Ok(entries) = std::fs::read_dir(&nvidia) {
            let mut libs: Vec<PathBuf> = entries
                .flatten()
                .map(|e| e.path().join("lib"))
                .filter(|p| p.is_dir())
                .collect();
            libs.sort();
            // Newest CUDA first (cu13 before cu12 and the per-package folders).
            libs.sort_by_key(|p| !p.to_string_lossy().contains("/cu13/"));
            dirs.extend(libs);
        }
    }
    let mut seen = std::collections::HashSet::new();
    dirs.retain(|d| d.is_dir() && seen.insert(d.clone()));
    dirs
}

/// `site-packages` folders of the Python environments visible from here.
fn site_packages() -> Vec<PathBuf> {
    let mut prefixes: Vec<PathBuf> = Vec::new();
    for var in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
        if let Some(p) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            prefixes.push(PathBuf::from(p));
        }
    }
    // Each PATH entry `X/bin` holding a python3 is the prefix `X` of an environment.
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("python3").exists() {
                if let Some(prefix) = dir.parent() {
                    prefixes.push(prefix.to_path_buf());
                }
            }
        }
    }
    if let Some(home) = std::env::var_os("HOME") {
        prefixes.push(PathBuf::from(home).join(".local"));
    }
    prefixes.push(PathBuf::from("/usr/local"));
    prefixes.push(PathBuf::from("/usr"));

    let mut sites = Vec::new();
    if let Some(pp) = std::env::var_os("PYTHONPATH") {
        sites.extend(std::env::split_paths(&pp));
    }
    for prefix in prefixes {
        for lib in ["lib", "lib64"] {
            let Ok(entries) = std::fs::read_dir(prefix.join(lib)) else {
                continue;
            };
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with("python3") {
                    sites.push(e.path().join("site-packages"));
                    sites.push(e.path().join("dist-packages"));
                }
            }
        }
    }
    sites.retain(|s| s.is_dir());
    sites
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_dirs_exist_and_are_unique() {
        let dirs = search_dirs();
        let set: std::collections::HashSet<_> = dirs.iter().collect();
        assert_eq!(set.len(), dirs.len());
        assert!(dirs.iter().all(|d| d.is_dir()));
    }
}
