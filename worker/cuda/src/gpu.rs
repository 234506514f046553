//! One GPU: context, stream, the NVRTC-compiled kernel module and a cuBLAS handle. Kernels are
//! launched through their typed launchers ([`crate::kernels`]) with raw device addresses, so
//! buffers can be sliced freely; every launch checks its return code.

use crate::kernels;
use crate::launch::{ptr, Arg, TensorMap};
use crate::switches;
use anyhow::{anyhow, bail, ensure, Context, Result};
use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{
    result as drv, sys as drv_sys, CudaContext, CudaFunction, CudaGraph, CudaSlice, CudaStream, DevicePtr,
    PinnedHostSlice,
};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;

/// `(name, source)` of the kernel family in `kernels/NAME.cu`, after the shared header.
macro_rules! family {
    ($name:literal) => {
        (
            $name,
            concat!(
                include_str!("kernels/common.cuh"),
                include_str!(concat!("kernels/", $name, ".cu"))
            ),
        )
    };
}

/// The kernel families, each compiled by NVRTC as the shared header followed by its own file,
/// into a module of its own (on a first start the families compile in parallel).
pub const KERNEL_FAMILIES: &[(&str, &str)] = &[
    family!("elementwise"),
    family!("gemv"),
    family!("moe"),
    family!("moe_wgmma"),
    family!("mla"),
    family!("mla_prefill"),
    family!("mma"),
    family!("pick"),
];

/// Whether the CUDA driver library can be loaded (cudarc panics on first use otherwise).
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { drv_sys::is_culib_present() }
}

/// Whether NVRTC can be loaded.
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// `make` for every kernel family `(name, source)` at once, one thread each (NVRTC compiles one
/// program per thread).
fn per_family<T: Send>(make: impl Fn(&str, &str) -> Result<T> + Sync) -> Result<Vec<T>> {
    std::thread::scope(|scope| {
        let running: Vec<_> = KERNEL_FAMILIES
            .iter()
            .map(|&(name, source)| {
                let make = &make;
                scope.spawn(move || make(name, source).with_context(|| format!("kernel family `{name}`")))
            })
            .collect();
        running
            .into_iter()
            .map(|t| t.join().map_err(|_| anyhow!("compiling a kernel family panicked"))?)
            .collect()
    })
}

/// Compiles every kernel family to PTX for `arch` (e.g. "compute_90"). Used for GPUs of other
/// architectures and by CI, which has NVRTC but no GPU.
pub fn compile_kernels(arch: &'static str) -> Result<Vec<Ptx>> {
    if !nvrtc_present() {
        bail!("NVRTC (libnvrtc) was not found: put the CUDA toolkit's lib directory on LD_LIBRARY_PATH");
    }
    per_family(|_, source| compile_family(source, arch))
}

/// One kernel family's source (its definitions may come first) as PTX for `arch`, with the
/// options of every compile.
pub fn compile_family(source: &str, arch: &'static str) -> Result<Ptx> {
    let opts = CompileOptions {
        arch: Some(arch),
        options: crate::kernel_cache::base_options()?,
        ..Default::default()
    };
    compile_ptx_with_opts(source, opts).map_err(|e| anyhow!("compiling the CUDA kernels failed: {e}"))
}

/// The kernels as machine code for this GPU's architecture, one module per family, from the
/// kernel cache or compiled now (and cached); GPUs of other architectures get PTX for the driver.
/// Also the compute capability they were compiled for (e.g. 90).
fn load_kernels(ctx: &Arc<CudaContext>) -> Result<(Vec<Arc<cudarc::driver::CudaModule>>, i32)> {
    use crate::kernel_cache::{forget, kernel_image, Origin};
    let (major, minor) = ctx.compute_capability()?;
    let known = matches!((major, minor), (8, 0) | (8, 6) | (8, 9) | (9, 0) | (10, 0) | (12, 0));
    if !known {
        let modules = compile_kernels("compute_80")?
            .into_iter()
            .map(|ptx| ctx.load_module(ptx).context("loading the CUDA kernels"))
            .collect::<Result<_>>()?;
        return Ok((modules, 80));
    }
    // Hopper's kernels use wgmma, which exists only in the architecture-specific sm_90a.
    let arch = match (major, minor) {
        (9, 0) => "sm_90a".to_string(),
        _ => format!("sm_{major}{minor}"),
    };
    let (probes, asked) = crate::probes::options()?;
    if !probes.is_empty() {
        eprintln!(
            "CUDA kernels: {} built into them ({}): for timing only (a part switched off makes results wrong)",
            asked.join(", "),
            probes.join(" ")
        );
    }
    let cache = crate::kernel_cache::default_cache_dir();
    let images = per_family(|_, source| kernel_image(source, &arch, cache.as_deref()))?;
    // One line for the start: how many families were compiled (in parallel, so the slowest one
    // is the wait) and where they are kept.
    let compiled: Vec<(f64, bool)> = images
        .iter()
        .filter_map(|i| match &i.origin {
            Origin::Compiled { seconds, cached } => Some((*seconds, cached.is_some())),
            Origin::Cache(_) => None,
        })
        .collect();
    if !compiled.is_empty() {
        let seconds = compiled.iter().map(|c| c.0).fold(0.0, f64::max);
        let kept = match &cache {
            Some(dir) if compiled.iter().all(|c| c.1) => format!("cached in {}", dir.display()),
            _ => "not cached".into(),
        };
        eprintln!(
            "CUDA kernels: {} of {} families compiled for {arch} in {seconds:.1} s, {kept}",
            compiled.len(),
            KERNEL_FAMILIES.len()
        );
    }
    let modules = KERNEL_FAMILIES
        .iter()
        .zip(images)
        .map(
            |(&(name, source), image)| match ctx.load_module(Ptx::from_binary(image.cubin)) {
                Ok(module) => Ok(module),
                // A cached file the driver refuses is dropped and compiled again, once.
                Err(e) => {
                    forget(&image.origin);
                    if !matches!(image.origin, Origin::Cache(_)) {
                        return Err(e).with_context(|| format!("loading the CUDA kernels of `{name}`"));
                    }
                    let fresh = kernel_image(source, &arch, cache.as_deref())?;
                    ctx.load_module(Ptx::from_binary(fresh.cubin))
                        .with_context(|| format!("loading the CUDA kernels of `{name}`"))
                }
            },
        )
        .collect::<Result<_>>()?;
    Ok((modules, major * 10 + minor))
}

/// The device's default memory pool, where stream-ordered allocations come from.
fn default_pool(ctx: &CudaContext) -> Result<drv_sys::CUmemoryPool> {
    let mut pool: drv_sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: a plain driver call on the context's device with a valid out-pointer.
    unsafe { drv_sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }
        .result()
        .context("reading the default memory pool")?;
    Ok(pool)
}

/// Steps allocate their temporaries from the stream-ordered pool; by default the pool returns
/// memory to the driver at every synchronisation, so each step would map it again. Keep it.
fn keep_pool_memory(ctx: &CudaContext) -> Result<()> {
    let pool = default_pool(ctx)?;
    let mut threshold = u64::MAX;
    // SAFETY: a plain driver call on a valid pool with a valid in-pointer.
    unsafe {
        drv_sys::cuMemPoolSetAttribute(
            pool,
            drv_sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut threshold as *mut u64 as *mut c_void,
        )
        .result()
        .context("setting the memory pool's release threshold")?;
    }
    Ok(())
}

/// A TMA map (`CUtensorMap`) of the tensor at `addr`, passed to a kernel as its `TensorMap`:
/// `dims` innermost first, `strides` in bytes for every dimension but the innermost, one box of
/// `boxes` elements per copy; no interleave, 256-byte L2 promotion, out-of-range elements read as
/// zeros. `what` names the tensor in the error.
pub fn tensor_map(
    addr: u64,
    element: drv_sys::CUtensorMapDataType,
    dims: &[u64],
    strides: &[u64],
    boxes: &[u32],
    swizzle: drv_sys::CUtensorMapSwizzle,
    what: &str,
) -> Result<TensorMap> {
    let rank = dims.len();
    anyhow::ensure!(
        (1..=5).contains(&rank) && strides.len() + 1 == rank && boxes.len() == rank,
        "a TMA map of {what}: {rank} dimensions, {} strides, {} box sizes",
        strides.len(),
        boxes.len()
    );
    let steps = [1u32; 5];
    let mut map = std::mem::MaybeUninit::<drv_sys::CUtensorMap>::zeroed();
    // SAFETY: dims, boxes and steps have `rank` entries and strides `rank - 1` (checked above),
    // all outliving the call; the map is written in full on success.
    unsafe {
        drv_sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            element,
            rank as u32,
            addr as *mut c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            steps.as_ptr(),
            drv_sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            swizzle,
            drv_sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            drv_sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
        .result()
        .map_err(|e| anyhow!("encoding a TMA map of {what}: {e:?}"))?;
        Ok(TensorMap(map.assume_init()))
    }
}

/// Device memory with its address kept at hand.
pub struct DeviceBuf {
    _mem: CudaSlice<u8>,
    pub addr: u64,
    pub bytes: usize,
}

impl DeviceBuf {
    pub fn at(&self, offset_bytes: usize) -> u64 {
        self.addr + offset_bytes as u64
    }
}

pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    funcs: HashMap<&'static str, CudaFunction>,
    /// The kernel families' modules, for their `__device__` arrays ([`Gpu::global`]).
    modules: Vec<Arc<cudarc::driver::CudaModule>>,
    blas: CudaBlas,
    pub name: String,
    pub ordinal: usize,
    pub sm_count: usize,
    /// Compute capability 9.0 (H100, H200): the kernels were built for sm_90a, with wgmma.
    pub hopper: bool,
    /// Dynamic shared memory one block may use (the opt-in limit, e.g. 227 KiB on Hopper).
    pub max_shared_per_block: usize,
    /// Kernels are launched with programmatic dependent launch: each may be placed on the GPU
    /// while the one before it finishes, and waits for it in `await_previous_kernel` (kernels
    /// built for sm_90 or later; `DSV3_PDL=0` turns it off).
    dependent_launch: bool,
    /// Per-kernel GPU time (DSV3_CUDA_PROFILE=1): events around every launch, so the totals
    /// show where a step goes (the step itself gets slower).
    profile: Option<std::cell::RefCell<Vec<(String, cudarc::driver::CudaEvent, cudarc::driver::CudaEvent)>>>,
    /// Fill new allocations with 0xFF (NaN as f32 and bf16) so reads of unwritten memory show up.
    pub poison: bool,
    /// Side streams with their own cuBLAS handles for independent work inside a step ([`Gpu::fork`]).
    lanes: std::cell::RefCell<Vec<Lane>>,
    /// Where launches go: 0 = the main stream, i = side lane i - 1.
    current: std::cell::Cell<usize>,
    /// Page-locked host memory for a step's round trips through the host ([`Gpu::download_staged`]),
    /// grown as needed.
    staging: std::cell::RefCell<Option<PinnedHostSlice<u8>>>,
    /// cuBLASLt's block-scaled FP8 products, made on first use (`None`: not on this GPU, or
    /// turned off with DSV3_FP8_CUBLASLT=0).
    fp8_gemm: std::cell::OnceCell<Option<crate::fp8_gemm::Fp8Gemm>>,
}

/// The start of the profile's rows that are idle time before a launch, not a launch's own time.
pub const IDLE_BEFORE: &str = "idle before ";

/// Device data copied into page-locked host memory, part by part (see [`Gpu::download_staged`]).
pub struct Staged<'a> {
    parts: Vec<&'a [u8]>,
}

impl Staged<'_> {
    /// Part `i` as f32 values.
    pub fn f32(&self, i: usize) -> &[f32] {
        let b = self.parts[i];
        // SAFETY: parts start 64-byte aligned in page-aligned memory and hold whole 4-byte
        // values; every bit pattern is a valid f32.
        unsafe { std::slice::from_raw_parts(b.as_ptr() as *const f32, b.len() / 4) }
    }

    /// Part `i` as i32 values.
    pub fn i32(&self, i: usize) -> &[i32] {
        let b = self.parts[i];
        // SAFETY: as for `f32`.
        unsafe { std::slice::from_raw_parts(b.as_ptr() as *const i32, b.len() / 4) }
    }
}

struct Lane {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
}

/// Work [`Gpu::fork`] queued on a side lane that the main stream has not waited for yet.
#[must_use = "the main stream must wait for forked work (Forked::join) before using its results"]
pub struct Forked<'g> {
    gpu: &'g Gpu,
    lane: usize,
    joined: bool,
}

impl Forked<'_> {
    /// The main stream waits here for the forked work (once; later calls do nothing).
    pub fn join(&mut self) -> Result<()> {
        if !self.joined {
            self.joined = true;
            self.gpu.join_lane(self.lane)?;
        }
        Ok(())
    }
}

impl Drop for Forked<'_> {
    /// Joins work left unjoined (an error path): a lane never races the main stream, and a
    /// graph capture never ends with a stream not joined.
    fn drop(&mut self) {
        let _ = self.join();
    }
}

impl Gpu {
    /// Opens GPU `ordinal`, compiles and loads the kernels.
    pub fn open(ordinal: usize) -> Result<Self> {
        if !driver_present() {
            bail!("no CUDA driver found (libcuda could not be loaded)");
        }
        let count = CudaContext::device_count().context("querying CUDA devices")?;
        if ordinal as i32 >= count {
            bail!("CUDA device {ordinal} requested but {count} found");
        }
        let ctx = CudaContext::new(ordinal).context("creating the CUDA context")?;
        // Work goes to the main stream, or to side lanes ordered against it by the events of
        // `fork` and its join; the per-buffer event tracking would only add waits.
        // SAFETY: every buffer is used on the stream it was made on, or after such a join.
        unsafe { ctx.disable_event_tracking() };
        let (modules, kernel_arch) = load_kernels(&ctx)?;
        let mut funcs = HashMap::new();
        for &(name, _) in crate::kernels::ALL {
            let f = modules
                .iter()
                .find_map(|m| m.load_function(name).ok())
                .with_context(|| format!("kernel `{name}` is in no kernel family"))?;
            funcs.insert(name, f);
        }
        keep_pool_memory(&ctx)?;
        // A stream of our own: the legacy default stream cannot be captured into a graph.
        let stream = ctx.new_stream().context("creating the CUDA stream")?;
        // SAFETY: only tries to dlopen the library (cudarc panics on first use when it is absent).
        if !unsafe { blas_sys::is_culib_present() } {
            bail!("cuBLAS (libcublas) was not found: put the CUDA toolkit's lib directory on LD_LIBRARY_PATH");
        }
        let blas = CudaBlas::new(stream.clone()).context("creating the cuBLAS handle")?;
        let name = ctx.name()?;
        let sm_count = ctx.attribute(drv_sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as usize;
        let hopper = ctx.compute_capability()? == (9, 0);
        let max_shared_per_block =
            ctx.attribute(drv_sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)? as usize;
        let gpu = Gpu {
            ctx,
            stream,
            funcs,
            modules,
            blas,
            name,
            ordinal,
            sm_count,
            max_shared_per_block,
            hopper,
            dependent_launch: kernel_arch >= 90 && switches::flag("DSV3_PDL", true)?,
            poison: switches::flag("DSV3_CUDA_POISON", false)?,
            profile: switches::flag("DSV3_CUDA_PROFILE", false)?.then(Default::default),
            lanes: Default::default(),
            current: Default::default(),
            staging: Default::default(),
            fp8_gemm: Default::default(),
        };
        // Every kernel may size its dynamic shared memory up to the opt-in limit less its static
        // shared memory (the launchers check their sizes against `max_shared_per_block`).
        for f in gpu.funcs.values() {
            let fixed = f.get_attribute(drv_sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)?;
            f.set_attribute(
                drv_sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                max_shared_per_block as i32 - fixed,
            )?;
        }
        Ok(gpu)
    }

    /// The address and size of the `__device__` array `name` of the kernel family that defines
    /// it (a probe's record), or None where none does.
    pub fn global(&self, name: &str) -> Result<Option<(u64, usize)>> {
        use cudarc::driver::DevicePtr;
        for module in &self.modules {
            match module.get_global(name, &self.stream) {
                Ok(view) => return Ok(Some((view.device_ptr(&self.stream).0, view.len()))),
                Err(e) if e.0 == drv_sys::CUresult::CUDA_ERROR_NOT_FOUND => continue,
                Err(e) => return Err(e).with_context(|| format!("looking up the kernels' global `{name}`")),
            }
        }
        Ok(None)
    }

    /// Bytes this process holds in the device's memory pool, where every [`Gpu::alloc`] comes
    /// from (freed buffers stay reserved for reuse).
    pub fn pool_reserved(&self) -> Result<u64> {
        let pool = default_pool(&self.ctx)?;
        let mut reserved = 0u64;
        // SAFETY: a plain driver call on a valid pool with a valid out-pointer.
        unsafe {
            drv_sys::cuMemPoolGetAttribute(
                pool,
                drv_sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT,
                &mut reserved as *mut u64 as *mut c_void,
            )
            .result()
            .context("reading the memory pool's size")?;
        }
        Ok(reserved)
    }

    /// `bytes` of device memory, ordered on the stream launches go to now (a side lane's inside
    /// [`Gpu::fork`]), and freed on that stream when dropped: stream-ordered, so the memory is
    /// not handed out again before the work queued there has used it.
    pub fn alloc(&self, bytes: usize) -> Result<DeviceBuf> {
        let stream = self.current_stream();
        // SAFETY: callers write before reading (tests poison buffers to check that).
        let mem = unsafe { stream.alloc::<u8>(bytes.max(1)) }
            .with_context(|| format!("allocating {bytes} bytes on the GPU"))?;
        let addr = {
            let (a, _guard) = mem.device_ptr(&stream);
            a
        };
        if self.poison {
            // SAFETY: the range is the allocation just made.
            unsafe { drv::memset_d8_async(addr, 0xff, bytes.max(1), stream.cu_stream())? };
        }
        Ok(DeviceBuf { _mem: mem, addr, bytes })
    }

    pub fn upload<T: Copy>(&self, data: &[T]) -> Result<DeviceBuf> {
        let bytes = std::mem::size_of_val(data);
        let buf = self.alloc(bytes)?;
        self.copy_to(&buf, 0, data)?;
        Ok(buf)
    }

    /// A bf16 copy of `n` f32 values at `x` (the tensor cores' activation format).
    pub fn to_bf16(&self, x: u64, n: usize) -> Result<DeviceBuf> {
        let out = self.alloc(n * 2)?;
        if n.is_multiple_of(8) && x.is_multiple_of(16) && out.addr.is_multiple_of(16) {
            let n8 = n / 8;
            kernels::f32_to_bf16_x8.launch_1d(self, n8, (ptr(out.addr), ptr(x), n8 as u64))?;
        } else {
            kernels::f32_to_bf16_rows.launch_1d(self, n, (ptr(out.addr), ptr(x), n as u64))?;
        }
        Ok(out)
    }

    pub fn copy_to<T: Copy>(&self, buf: &DeviceBuf, offset_bytes: usize, data: &[T]) -> Result<()> {
        let bytes = std::mem::size_of_val(data);
        if offset_bytes + bytes > buf.bytes {
            bail!(
                "upload of {bytes} bytes at {offset_bytes} overflows a {}-byte buffer",
                buf.bytes
            );
        }
        if bytes == 0 {
            return Ok(());
        }
        self.ctx.bind_to_thread()?;
        // SAFETY: bounds checked above; async copy ordered on our stream, host data copied
        // before return because the source is pageable memory.
        unsafe {
            drv::memcpy_htod_async(
                buf.at(offset_bytes),
                std::slice::from_raw_parts(data.as_ptr() as *const u8, bytes),
                self.stream.cu_stream(),
            )?;
        }
        Ok(())
    }

    pub fn download<T: Copy + Default>(&self, addr: u64, len: usize) -> Result<Vec<T>> {
        let mut out = vec![T::default(); len];
        let bytes = std::mem::size_of_val(out.as_slice());
        if bytes > 0 {
            self.ctx.bind_to_thread()?;
            // SAFETY: `out` has `bytes` bytes; the stream is synchronised before reading.
            unsafe {
                let dst = std::slice::from_raw_parts_mut(out.as_mut_ptr() as *mut u8, bytes);
                drv::memcpy_dtoh_async(dst, addr, self.stream.cu_stream())?;
            }
            self.sync()?;
        }
        Ok(out)
    }

    /// Copies each `(device address, bytes)` of `parts` into page-locked host memory, back to back
    /// with one wait for all of them, and hands `read` the host copies. Pageable copies go through
    /// the driver's bounce buffers at a fraction of the link's speed and wait once each.
    pub fn download_staged<R>(&self, parts: &[(u64, usize)], read: impl FnOnce(&Staged) -> R) -> Result<R> {
        self.round_trip(parts, None, || Ok(()), |staged, _| read(staged))
    }

    /// A round trip through the host in page-locked memory. `parts` are copied down; `meanwhile`
    /// queues more GPU work behind those copies; as soon as the copies (not that work) are done,
    /// `work` reads them and fills `back` — `(device address, f32 values)` — whose copy up is
    /// then queued on the stream (nothing waits for it: later work on the stream comes after).
    pub fn round_trip<R>(
        &self,
        parts: &[(u64, usize)],
        back: Option<(u64, usize)>,
        meanwhile: impl FnOnce() -> Result<()>,
        work: impl FnOnce(&Staged, &mut [f32]) -> R,
    ) -> Result<R> {
        let sizes: Vec<usize> = parts
            .iter()
            .map(|p| p.1)
            .chain(back.map(|(_, values)| values * 4))
            .collect();
        let offsets: Vec<usize> = sizes
            .iter()
            .scan(0usize, |at, &bytes| {
                let start = *at;
                *at = (start + bytes).next_multiple_of(64);
                Some(start)
            })
            .collect();
        let total = offsets.last().zip(sizes.last()).map_or(0, |(o, b)| o + b).max(1);
        let mut staging = self
            .staging
            .try_borrow_mut()
            .map_err(|_| anyhow!("the staging buffer is already in use"))?;
        if staging.as_ref().is_none_or(|s| s.len() < total) {
            // An upload queued by the last round trip may still read the old buffer.
            self.sync()?;
            *staging = None;
            // SAFETY: plain page-locked memory (no write-combining: the host reads it); every byte
            // read below is written by a copy, or by `work`, first.
            let fresh = unsafe { self.ctx.alloc_pinned_with_flags::<u8>(total.next_power_of_two(), 0) }
                .context("allocating page-locked staging memory")?;
            *staging = Some(fresh);
        }
        let buf = staging.as_mut().context("staging buffer")?;
        let base = buf.as_mut_ptr().context("staging buffer")?;
        self.ctx.bind_to_thread()?;
        for (&(addr, bytes), &at) in parts.iter().zip(&offsets) {
            if bytes == 0 {
                continue;
            }
            // SAFETY: `at + bytes <= total <= len`; the copies finish before the wait below returns.
            unsafe {
                let dst = std::slice::from_raw_parts_mut(base.add(at), bytes);
                drv::memcpy_dtoh_async(dst, addr, self.stream.cu_stream())?;
            }
        }
        let copied = self
            .ctx
            .new_event(Some(drv_sys::CUevent_flags::CU_EVENT_DISABLE_TIMING))?;
        copied.record(&self.stream)?;
        meanwhile()?;
        copied.synchronize().context("copying to the host")?;
        // SAFETY: the copies above wrote these ranges and have completed; the `back` range lies
        // after them, and the stream reads it only after the copy queued below.
        let views = parts
            .iter()
            .zip(&offsets)
            .map(|(&(_, bytes), &at)| unsafe { std::slice::from_raw_parts(base.add(at) as *const u8, bytes) })
            .collect();
        let (back_at, back_values) = (
            offsets.get(parts.len()).copied().unwrap_or(0),
            back.map_or(0, |(_, values)| values),
        );
        // SAFETY: `values * 4` bytes from a 64-byte-aligned offset inside the buffer (or an empty
        // slice), disjoint from the parts read above; any bit pattern is a valid f32.
        let back_slice = unsafe { std::slice::from_raw_parts_mut(base.add(back_at) as *mut f32, back_values) };
        let out = work(&Staged { parts: views }, back_slice);
        if let Some((dst, values)) = back.filter(|b| b.1 > 0) {
            // SAFETY: the source is the page-locked range `work` just filled, which stays allocated
            // until a later round trip syncs before freeing it.
            unsafe {
                let src = std::slice::from_raw_parts(base.add(back_at) as *const u8, values * 4);
                drv::memcpy_htod_async(dst, src, self.stream.cu_stream())?;
            }
        }
        Ok(out)
    }

    /// Zeroes `bytes` bytes at `addr` (stream-ordered).
    pub fn zero(&self, addr: u64, bytes: usize) -> Result<()> {
        self.ctx.bind_to_thread()?;
        // SAFETY: callers pass a range inside one of their allocations.
        unsafe { drv::memset_d8_async(addr, 0, bytes, self.launch_stream())? };
        Ok(())
    }

    /// Records the work `f` enqueues on the stream, without running it, as a CUDA graph. `f` must
    /// not wait for the GPU or copy from the host; its temporaries become the graph's own memory.
    pub fn capture(&self, f: impl FnOnce() -> Result<()>) -> Result<CudaGraph> {
        if self.profile.is_some() {
            bail!("CUDA graphs cannot be recorded while every launch is timed (DSV3_CUDA_PROFILE)");
        }
        self.stream
            .begin_capture(drv_sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .context("starting a CUDA graph capture")?;
        let recorded = f();
        let ended = self.stream.end_capture(drv_sys::CUgraphInstantiate_flags(0));
        recorded.context("recording a CUDA graph")?;
        ended
            .context("instantiating a CUDA graph")?
            .context("the CUDA graph capture recorded nothing")
    }

    pub fn sync(&self) -> Result<()> {
        self.stream.synchronize().context("CUDA stream failed")
    }

    /// Runs `f`, timing the GPU work it enqueues under `name` when profiling (events around it,
    /// read at [`Gpu::take_profile`]).
    pub fn profiled<T>(&self, name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let Some(profile) = &self.profile else {
            return f();
        };
        let start = self.mark()?;
        let out = f()?;
        let end = self.mark()?;
        profile.borrow_mut().push((name.to_string(), start, end));
        Ok(out)
    }

    /// Whether every launch is timed (DSV3_CUDA_PROFILE).
    pub fn profiling(&self) -> bool {
        self.profile.is_some()
    }

    /// GPU time per name since the last take (name, calls, seconds), largest first; and the time
    /// the GPU sat between one timed launch and the next, per the launch it waited for, named
    /// [`IDLE_BEFORE`] + that launch's name (where the host, not the GPU, held the step up).
    pub fn take_profile(&self) -> Result<Vec<(String, usize, f64)>> {
        let Some(profile) = &self.profile else {
            return Ok(vec![]);
        };
        self.sync()?;
        let mut totals: std::collections::BTreeMap<String, (usize, f64)> = Default::default();
        let mut previous_end: Option<cudarc::driver::CudaEvent> = None;
        for (name, start, end) in profile.borrow_mut().drain(..) {
            if let Some(before) = &previous_end {
                // Side lanes' launches overlap the main stream's: only a wait counts.
                let idle = f64::from(before.elapsed_ms(&start)?.max(0.0)) / 1e3;
                let e = totals.entry(format!("{IDLE_BEFORE}{name}")).or_default();
                e.0 += 1;
                e.1 += idle;
            }
            let e = totals.entry(name).or_default();
            e.0 += 1;
            e.1 += start.elapsed_ms(&end)? as f64 / 1e3;
            previous_end = Some(end);
        }
        let mut rows: Vec<_> = totals.into_iter().map(|(k, (n, t))| (k, n, t)).collect();
        rows.sort_by(|a, b| b.2.total_cmp(&a.2));
        Ok(rows)
    }

    /// Runs `work(lane)` for lanes `0..lanes`, each lane's launches, allocations and cuBLAS calls
    /// on a stream of its own ([`Gpu::fork`]): the lanes start after everything queued so far, run
    /// concurrently, and the main stream waits for all of them.
    pub fn fan_out(&self, lanes: usize, mut work: impl FnMut(usize) -> Result<()>) -> Result<()> {
        let mut forked = Vec::with_capacity(lanes);
        let mut result = Ok(());
        for lane in 0..lanes {
            match self.fork(lane, || work(lane)) {
                Ok((f, ())) => forked.push(f),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        // Join every lane, also after an error, so nothing queued is left racing the main stream.
        for mut f in forked {
            f.join()?;
        }
        result
    }

    /// Runs `work` with its launches, allocations and cuBLAS calls on side lane `lane`: they start
    /// after everything queued on the main stream so far and run beside what the main stream
    /// queues next, until [`Forked::join`] makes the main stream wait for them (dropping the
    /// handle joins too). Buffers the lane's work reads from the main stream must outlive the
    /// join.
    pub fn fork<T>(&self, lane: usize, work: impl FnOnce() -> Result<T>) -> Result<(Forked<'_>, T)> {
        ensure!(self.current.get() == 0, "a fork inside forked work");
        self.ensure_lanes(lane + 1)?;
        let start = self
            .ctx
            .new_event(Some(drv_sys::CUevent_flags::CU_EVENT_DISABLE_TIMING))?;
        start.record(&self.stream)?;
        self.lanes.borrow()[lane].stream.wait(&start)?;
        self.current.set(lane + 1);
        let out = work();
        self.current.set(0);
        let forked = Forked {
            gpu: self,
            lane,
            joined: false,
        };
        // On an error the handle drops here, joining what the work queued before it failed.
        out.map(|v| (forked, v))
    }

    /// The main stream waits for everything queued on side lane `lane` so far.
    fn join_lane(&self, lane: usize) -> Result<()> {
        let done = self
            .ctx
            .new_event(Some(drv_sys::CUevent_flags::CU_EVENT_DISABLE_TIMING))?;
        done.record(&self.lanes.borrow()[lane].stream)?;
        self.stream.wait(&done)?;
        Ok(())
    }

    /// The stream launches and allocations go to now ([`Gpu::lane`]).
    fn current_stream(&self) -> Arc<CudaStream> {
        match self.current.get() {
            0 => self.stream.clone(),
            i => self.lanes.borrow()[i - 1].stream.clone(),
        }
    }

    fn ensure_lanes(&self, lanes: usize) -> Result<()> {
        let mut have = self.lanes.borrow_mut();
        while have.len() < lanes {
            let stream = self.ctx.new_stream().context("creating a side stream")?;
            let blas = CudaBlas::new(stream.clone()).context("creating a cuBLAS handle")?;
            have.push(Lane { stream, blas });
        }
        Ok(())
    }

    /// cuBLASLt's block-scaled FP8 products, where this GPU has them and they are not turned off
    /// (DSV3_FP8_CUBLASLT=0).
    pub fn fp8_gemm(&self) -> Result<Option<&crate::fp8_gemm::Fp8Gemm>> {
        if self.fp8_gemm.get().is_none() {
            let wanted = switches::flag("DSV3_FP8_CUBLASLT", true)?;
            let made = if wanted {
                crate::fp8_gemm::Fp8Gemm::new(self)?
            } else {
                None
            };
            let _ = self.fp8_gemm.set(made);
        }
        Ok(self.fp8_gemm.get().and_then(Option::as_ref))
    }

    /// The stream launches go to: 0 the main stream, i side lane i - 1 (inside [`Gpu::fan_out`]).
    pub(crate) fn lane(&self) -> usize {
        self.current.get()
    }

    /// Makes this GPU's context the calling thread's current one (for libraries that use it).
    pub(crate) fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread()?;
        Ok(())
    }

    pub(crate) fn launch_stream(&self) -> drv_sys::CUstream {
        self.current_stream().cu_stream()
    }

    fn blas_handle(&self) -> blas_sys::cublasHandle_t {
        match self.current.get() {
            0 => *self.blas.handle(),
            i => *self.lanes.borrow()[i - 1].blas.handle(),
        }
    }

    /// Launches kernel `name` with `args` laid out for it (only through a typed
    /// [`crate::launch::Kernel`]); the return code is checked (asynchronous faults show at the
    /// next sync).
    pub(crate) fn launch_raw(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        args: &mut [Arg],
    ) -> Result<()> {
        self.profiled(name, || self.launch_now(name, grid, block, smem, args))
    }

    /// Blocks of kernel `name` an SM holds at once (see [`crate::launch::Kernel::resident_blocks`]).
    pub(crate) fn resident_blocks(&self, name: &str, block: u32, smem: usize) -> Result<usize> {
        let f = self
            .funcs
            .get(name)
            .with_context(|| format!("unknown kernel `{name}`"))?;
        self.ctx.bind_to_thread()?;
        Ok(f.occupancy_max_active_blocks_per_multiprocessor(block, smem, None)? as usize)
    }

    fn launch_now(&self, name: &str, grid: (u32, u32, u32), block: u32, smem: u32, args: &mut [Arg]) -> Result<()> {
        let f = self
            .funcs
            .get(name)
            .with_context(|| format!("unknown kernel `{name}`"))?;
        self.ctx.bind_to_thread()?;
        let mut params: Vec<*mut c_void> = args.iter_mut().map(Arg::payload).collect();
        // SAFETY: all-zero is a valid value of the attribute union (plain integers and structs).
        let mut value: drv_sys::CUlaunchAttributeValue = unsafe { std::mem::zeroed() };
        value.programmaticStreamSerializationAllowed = 1;
        let mut attrs = [drv_sys::CUlaunchAttribute {
            id: drv_sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: Default::default(),
            value,
        }];
        let config = drv_sys::CUlaunchConfig {
            gridDimX: grid.0,
            gridDimY: grid.1,
            gridDimZ: grid.2,
            blockDimX: block,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: smem,
            hStream: self.launch_stream(),
            attrs: attrs.as_mut_ptr(),
            numAttrs: u32::from(self.dependent_launch),
        };
        // SAFETY: argument count and kinds follow the kernel's signature (the typed launcher's
        // declaration, checked against the compiled kernel by tests/nvrtc.rs); the arguments,
        // the config and its attribute outlive the call.
        unsafe {
            drv_sys::cuLaunchKernelEx(&config, f.cu_function(), params.as_mut_ptr(), std::ptr::null_mut())
                .result()
                .with_context(|| format!("launching `{name}`"))?;
        }
        Ok(())
    }

    /// Row-major `y[m, n] (+)= x[m, k] · w[n, k]ᵀ` on the tensor cores: bf16 operands, f32 output.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_bf16(
        &self,
        y: u64,
        ldy: usize,
        x_bf16: u64,
        w_bf16: u64,
        m: usize,
        n: usize,
        k: usize,
        accumulate: bool,
    ) -> Result<()> {
        self.gemm_bf16_as(
            y,
            blas_sys::cudaDataType::CUDA_R_32F,
            ldy,
            x_bf16,
            w_bf16,
            m,
            n,
            k,
            accumulate,
        )
    }

    /// [`Gpu::gemm_bf16`] with a bf16 output (rounded once from the f32 accumulation).
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_bf16_to_bf16(
        &self,
        y: u64,
        ldy: usize,
        x_bf16: u64,
        w_bf16: u64,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        self.gemm_bf16_as(
            y,
            blas_sys::cudaDataType::CUDA_R_16BF,
            ldy,
            x_bf16,
            w_bf16,
            m,
            n,
            k,
            false,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn gemm_bf16_as(
        &self,
        y: u64,
        y_type: blas_sys::cudaDataType,
        ldy: usize,
        x_bf16: u64,
        w_bf16: u64,
        m: usize,
        n: usize,
        k: usize,
        accumulate: bool,
    ) -> Result<()> {
        let alpha = 1.0f32;
        let beta = if accumulate { 1.0f32 } else { 0.0f32 };
        // Column-major view: yᵀ[n, m] = w[n, k] · xᵀ[k, m].
        // SAFETY: pointers cover the given shapes (callers allocate them so).
        self.profiled("cublas_gemm", || unsafe {
            blas::gemm_ex(
                self.blas_handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                m as i32,
                k as i32,
                &alpha as *const f32 as *const c_void,
                w_bf16 as *const c_void,
                blas_sys::cudaDataType::CUDA_R_16BF,
                k as i32,
                x_bf16 as *const c_void,
                blas_sys::cudaDataType::CUDA_R_16BF,
                k as i32,
                &beta as *const f32 as *const c_void,
                y as *mut c_void,
                y_type,
                ldy as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
            .context("cuBLAS bf16 GEMM failed")
        })?;
        Ok(())
    }

    /// An event recorded now on the stream; pass it to [`Gpu::seconds_since`].
    pub fn mark(&self) -> Result<cudarc::driver::CudaEvent> {
        let e = self.ctx.new_event(Some(drv_sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        e.record(&self.current_stream())?;
        Ok(e)
    }

    /// Seconds of stream time since `start`, waiting for the work in between.
    pub fn seconds_since(&self, start: &cudarc::driver::CudaEvent) -> Result<f64> {
        let end = self.mark()?;
        end.synchronize()?;
        Ok(start.elapsed_ms(&end)? as f64 / 1e3)
    }

    /// Seconds between two recorded events after `f` runs on the stream.
    pub fn time<F: FnMut() -> Result<()>>(&self, mut f: F) -> Result<f64> {
        let start = self.ctx.new_event(Some(drv_sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        let end = self.ctx.new_event(Some(drv_sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        start.record(&self.stream)?;
        f()?;
        end.record(&self.stream)?;
        end.synchronize()?;
        Ok(start.elapsed_ms(&end)? as f64 / 1e3)
    }
}
