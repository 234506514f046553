//! The CUDA kernels as a CUBIN for the GPU at hand, compiled by NVRTC once and then kept on disk:
//! a start with a warm cache loads machine code (no NVRTC, no driver PTX compile). The key covers
//! everything the code depends on — the source, the options, NVRTC's version, the architecture —
//! so a stale entry is never used; a file that fails to load is dropped and compiled again.

use anyhow::{anyhow, bail, Context, Result};
use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys};
use sha2::{Digest, Sha256};
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Options every compile gets (the tile definitions and the architecture come on top).
const OPTIONS: [&str; 2] = ["--std=c++17", "-default-device"];

/// Where a kernel image came from.
#[derive(Debug)]
pub enum Origin {
    /// Loaded from this cache file.
    Cache(PathBuf),
    /// Compiled now, in `seconds`, and stored at `cached` when the cache could take it.
    Compiled { seconds: f64, cached: Option<PathBuf> },
}

pub struct KernelImage {
    pub cubin: Vec<u8>,
    pub origin: Origin,
}

/// The cache directory: `DSV3_KERNEL_CACHE` (`off` or empty: no cache), else
/// `$XDG_CACHE_HOME/dsv3/kernels`, else `~/.cache/dsv3/kernels`.
pub fn default_cache_dir() -> Option<PathBuf> {
    match std::env::var_os("DSV3_KERNEL_CACHE") {
        Some(v) if v.is_empty() || v == "off" => None,
        Some(v) => Some(PathBuf::from(v)),
        None => std::env::var_os("XDG_CACHE_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .map(|base| base.join("dsv3").join("kernels")),
    }
}

fn nvrtc_version() -> Result<(i32, i32)> {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two out-parameters.
    unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| anyhow!("querying NVRTC's version: {e:?}"))?;
    Ok((major, minor))
}

/// The options of every compile but the architecture: the fixed ones, the tile definitions, the
/// small-batch products' depth ([`crate::linear::fp8_ahead`]), whether activations are rounded to
/// e4m3 by the hardware's conversion (`DSV3_E4M3_CVT`, on by default: the same codes) and the
/// kernels' probes when asked for ([`crate::probes`]).
pub(crate) fn base_options() -> Result<Vec<String>> {
    let mut options: Vec<String> = OPTIONS.iter().map(|o| o.to_string()).collect();
    options.extend(crate::tiles::defines());
    options.push(format!("-DFP8_AHEAD={}", crate::linear::fp8_ahead()?));
    options.push(format!(
        "-DE4M3_CVT={}",
        crate::switches::flag("DSV3_E4M3_CVT", true)? as u8
    ));
    options.extend(crate::probes::options()?.0);
    Ok(options)
}

/// The options of a compile for `arch`.
fn options(arch: &str) -> Result<Vec<String>> {
    let mut options = base_options()?;
    options.push(format!("--gpu-architecture={arch}"));
    Ok(options)
}

/// The cache file name for `source` built for `arch` (e.g. `sm_90`) by this NVRTC.
fn cache_key(source: &str, arch: &str) -> Result<String> {
    let (major, minor) = nvrtc_version()?;
    let mut h = Sha256::new();
    for part in [source, &options(arch)?.join(" "), &format!("nvrtc {major}.{minor}")] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    let digest = h.finalize();
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("{arch}-{hex}.cubin"))
}

/// Compiles `source` to a CUBIN for `arch` (a real architecture such as `sm_90`).
pub fn compile_cubin(source: &str, arch: &str) -> Result<Vec<u8>> {
    if !crate::gpu::nvrtc_present() {
        bail!("NVRTC (libnvrtc) was not found: put the CUDA toolkit's lib directory on LD_LIBRARY_PATH");
    }
    let src = CString::new(source).context("kernel source holds a NUL byte")?;
    let options = options(arch)?;
    let prog = nvrtc::create_program(&src, None).map_err(|e| anyhow!("NVRTC program: {e:?}"))?;
    // SAFETY: `prog` was made above and is destroyed once below, after its last use.
    let compiled = unsafe { nvrtc::compile_program(prog, &options) };
    let result = match compiled {
        Err(e) => {
            // SAFETY: as above.
            let log = unsafe { nvrtc::get_program_log(prog) }.unwrap_or_default();
            let log: String = log.iter().map(|&c| c as u8 as char).collect();
            Err(anyhow!("compiling the CUDA kernels for {arch} failed ({e:?}):\n{log}"))
        }
        Ok(()) => {
            let mut size = 0usize;
            // SAFETY: as above; the buffer has the size NVRTC reports.
            unsafe {
                nvrtc_sys::nvrtcGetCUBINSize(prog, &mut size)
                    .result()
                    .map_err(|e| anyhow!("NVRTC CUBIN size: {e:?}"))
                    .and_then(|()| {
                        let mut cubin = vec![0u8; size];
                        nvrtc_sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut std::ffi::c_char)
                            .result()
                            .map_err(|e| anyhow!("NVRTC CUBIN: {e:?}"))?;
                        Ok(cubin)
                    })
            }
        }
    };
    // SAFETY: made above, not used after.
    let _ = unsafe { nvrtc::destroy_program(prog) };
    result
}

/// `source` as a CUBIN for `arch`: from `cache` when an earlier start stored it, else compiled
/// now and stored there (a cache that cannot be written only costs the next start the compile).
pub fn kernel_image(source: &str, arch: &str, cache: Option<&Path>) -> Result<KernelImage> {
    let file = match cache {
        Some(dir) => Some(dir.join(cache_key(source, arch)?)),
        None => None,
    };
    if let Some(path) = &file {
        if let Ok(cubin) = std::fs::read(path) {
            return Ok(KernelImage {
                cubin,
                origin: Origin::Cache(path.clone()),
            });
        }
    }
    let started = Instant::now();
    let cubin = compile_cubin(source, arch)?;
    let seconds = started.elapsed().as_secs_f64();
    let cached = file.and_then(|path| match store(&path, &cubin) {
        Ok(()) => Some(path),
        Err(e) => {
            eprintln!("kernel cache: {e:#} (the next start compiles again)");
            None
        }
    });
    Ok(KernelImage {
        cubin,
        origin: Origin::Compiled { seconds, cached },
    })
}

/// Writes `bytes` to `path` through a temporary file, so a reader never sees half a CUBIN.
fn store(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().context("cache path without a directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot move the CUBIN into {}", path.display()))
}

/// Drops a cache file that the driver refused (truncated, or from another driver's world).
pub fn forget(origin: &Origin) {
    if let Origin::Cache(path) = origin {
        let _ = std::fs::remove_file(path);
    }
}
