//! Block-scaled FP8 products through cuBLASLt on Hopper: e4m3 activations with one f32 scale per
//! row per 128 columns (`quantize_rows_fp8`), e4m3 weights with the checkpoint's 128×128 block
//! scales as stored, f32 out. The weights are read as they are: no dequantisation to bf16 and
//! twice the bf16 tensor-core rate. cuBLASLt has no grouped form, so an expert group is one call.

use crate::gpu::{DeviceBuf, Gpu};
use crate::kernels;
use crate::launch::{int, ptr, Ptr};
use crate::linear::SplitSums;
use crate::switches;
use crate::tiles::QUANT_SPAN;
use anyhow::{anyhow, bail, Context, Result};
use cudarc::cublaslt::{result as lt, sys};
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;

/// cuBLASLt workspace per stream.
const WORKSPACE_BYTES: usize = 32 << 20;
/// The alignment every operand and scale pointer must have (16 bytes, one vector load).
pub const ALIGN: usize = 16;

/// Whether cuBLASLt can be loaded (cudarc panics on first use otherwise).
pub fn cublaslt_present() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { sys::is_culib_present() }
}

/// Token rows from which dense products with quantised activations go to cuBLASLt (below: our
/// tensor-core kernel on the same e4m3 values and scales). cuBLASLt is the faster from here
/// (slice5 decode on the H200: batch 64 12.1 -> 9.2 ms, batch 256 31.1 -> 17.3 ms).
const DENSE_MIN_ROWS: usize = 17;

/// (m, n, k, ldy, output type) of a product.
type ProductShape = (usize, usize, usize, usize, u32);

pub struct Fp8Gemm {
    /// Token rows from which [`crate::linear::linear`] uses these products for quantised
    /// activations (DSV3_FP8_CUBLASLT_ROWS; default [`DENSE_MIN_ROWS`]).
    pub dense_min_rows: usize,
    handle: sys::cublasLtHandle_t,
    desc: sys::cublasLtMatmulDesc_t,
    pref: sys::cublasLtMatmulPreference_t,
    /// The heuristic's algorithm per product shape: asking costs tens of microseconds.
    algos: RefCell<HashMap<ProductShape, sys::cublasLtMatmulAlgo_t>>,
    /// One workspace per stream (index 0 the main stream, i a side lane): concurrent products
    /// must not share one.
    workspaces: RefCell<Vec<DeviceBuf>>,
}

// SAFETY: the handle and descriptors are used only through `&Gpu`, which one thread at a time
// holds (the Gpu is Send, not Sync); cuBLASLt handles may move between threads.
unsafe impl Send for Fp8Gemm {}

fn attr<T>(desc: sys::cublasLtMatmulDesc_t, which: sys::cublasLtMatmulDescAttributes_t, value: &T) -> Result<()> {
    // SAFETY: `desc` is live; the value is read for its size during the call.
    unsafe { lt::set_matmul_desc_attribute(desc, which, value as *const T as *const c_void, size_of::<T>()) }
        .map_err(|e| anyhow!("cuBLASLt: setting {which:?}: {e:?}"))
}

impl Fp8Gemm {
    /// cuBLASLt's block-scaled FP8 products, where the GPU has them (compute capability 9.0 and
    /// a cuBLASLt that knows the scale modes); `None` otherwise.
    pub fn new(gpu: &Gpu) -> Result<Option<Self>> {
        if !cublaslt_present() || gpu.ctx.compute_capability()? != (9, 0) {
            return Ok(None);
        }
        let dense_min_rows = switches::count("DSV3_FP8_CUBLASLT_ROWS")?
            .unwrap_or(DENSE_MIN_ROWS)
            .max(4);
        let handle = lt::create_handle().map_err(|e| anyhow!("creating a cuBLASLt handle: {e:?}"))?;
        let desc = lt::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType::CUDA_R_32F,
        )
        .map_err(|e| anyhow!("cuBLASLt matmul descriptor: {e:?}"))?;
        let pref = lt::create_matmul_pref().map_err(|e| anyhow!("cuBLASLt preference: {e:?}"))?;
        let gemm = Fp8Gemm {
            dense_min_rows,
            handle,
            desc,
            pref,
            algos: RefCell::default(),
            workspaces: RefCell::default(),
        };
        use sys::cublasLtMatmulDescAttributes_t as A;
        use sys::cublasLtMatmulMatrixScale_t as S;
        attr(
            desc,
            A::CUBLASLT_MATMUL_DESC_TRANSA,
            &cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T,
        )?;
        attr(
            desc,
            A::CUBLASLT_MATMUL_DESC_TRANSB,
            &cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N,
        )?;
        attr(
            desc,
            A::CUBLASLT_MATMUL_DESC_A_SCALE_MODE,
            &S::CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F,
        )?;
        attr(
            desc,
            A::CUBLASLT_MATMUL_DESC_B_SCALE_MODE,
            &S::CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F,
        )?;
        use sys::cublasLtMatmulPreferenceAttributes_t as P;
        fn set_pref<T>(pref: sys::cublasLtMatmulPreference_t, which: P, value: T) -> Result<()> {
            // SAFETY: `pref` is live; the value (of the attribute's type) is read during the call.
            unsafe { lt::set_matmul_pref_attribute(pref, which, &value as *const T as *const c_void, size_of::<T>()) }
                .map_err(|e| anyhow!("cuBLASLt preference {which:?}: {e:?}"))
        }
        set_pref(
            pref,
            P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            WORKSPACE_BYTES as u64,
        )?;
        // Groups start anywhere in their buffers: ask for algorithms that take any 16-byte
        // aligned operand, so one found for a shape serves every group of that shape.
        for which in [
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
        ] {
            set_pref(pref, which, ALIGN as u32)?;
        }
        Ok(Some(gemm))
    }

    /// Workspaces for the main stream and `lanes` side lanes, made on the main stream (call
    /// before [`Gpu::fork`]: a lane's workspace must outlive its work).
    pub fn reserve(&self, gpu: &Gpu, lanes: usize) -> Result<()> {
        let mut have = self.workspaces.borrow_mut();
        while have.len() <= lanes {
            have.push(gpu.alloc(WORKSPACE_BYTES)?);
        }
        Ok(())
    }

    /// Whether a weight of `n` rows and `k` columns fits these products: whole 128-column blocks,
    /// rows in multiples of 16, and, past the first 128 rows, rows of block scales that start
    /// 16-byte aligned (k/128 a multiple of 4: with 2 or 3 blocks per row cuBLASLt reads every
    /// scale row after the first from the wrong place).
    pub fn takes_weight(n: usize, k: usize) -> bool {
        k.is_multiple_of(128) && n.is_multiple_of(16) && (n <= 128 || (k / 128).is_multiple_of(4))
    }

    /// Row-major `y[m, n] (+)= x[m, k] · w[n, k]ᵀ` on the stream `gpu` launches on: `x` e4m3 with
    /// scales `[k/128][m]`, `w` e4m3 with scales `[n/128][k/128]`, `y` f32 with row stride `ldy`;
    /// m a multiple of 4.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        gpu: &Gpu,
        y: u64,
        ldy: usize,
        x: u64,
        x_scales: u64,
        w: u64,
        w_scales: u64,
        m: usize,
        n: usize,
        k: usize,
        accumulate: bool,
    ) -> Result<()> {
        let out = (y, ldy, sys::cudaDataType::CUDA_R_32F);
        self.matmul(gpu, out, x, x_scales, w, w_scales, m, n, k, accumulate)
    }

    /// [`Fp8Gemm::gemm`] into bf16 rows (not accumulated): each f32 sum rounded to bf16 in the
    /// product's epilogue, for a reader that takes bf16 (half the bytes written and read back).
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_to_bf16(
        &self,
        gpu: &Gpu,
        y: u64,
        ldy: usize,
        x: u64,
        x_scales: u64,
        w: u64,
        w_scales: u64,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        let out = (y, ldy, sys::cudaDataType::CUDA_R_16BF);
        self.matmul(gpu, out, x, x_scales, w, w_scales, m, n, k, false)
    }

    /// The product into `out` (address, row stride in elements, element type).
    #[allow(clippy::too_many_arguments)]
    fn matmul(
        &self,
        gpu: &Gpu,
        out: (u64, usize, sys::cudaDataType),
        x: u64,
        x_scales: u64,
        w: u64,
        w_scales: u64,
        m: usize,
        n: usize,
        k: usize,
        accumulate: bool,
    ) -> Result<()> {
        use sys::cublasLtMatmulDescAttributes_t as A;
        let (y, ldy, out_type) = out;
        // cuBLASLt reads the activation scales in rows of 4 (16 bytes): it has no algorithm for
        // other m.
        if !Self::takes_weight(n, k) || !m.is_multiple_of(4) {
            bail!("block-scaled FP8 product of {m}×{k} by {n}×{k}: k must be a multiple of 128 (of 512 past 128 rows), n of 16 and m of 4");
        }
        if [y, x, x_scales, w, w_scales].iter().any(|p| p % ALIGN as u64 != 0) {
            bail!("block-scaled FP8 product of {m}×{k} by {n}×{k}: an operand is not {ALIGN}-byte aligned");
        }
        let workspace = {
            let spaces = self.workspaces.borrow();
            spaces
                .get(gpu.lane())
                .map(|w| w.addr)
                .context("cuBLASLt workspace not reserved for this stream")?
        };
        attr(self.desc, A::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &w_scales)?;
        attr(self.desc, A::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &x_scales)?;
        // Column-major view: yᵀ[n, m] = (w stored k×n)ᵀ · (x stored k×m).
        let e4m3 = sys::cudaDataType::CUDA_R_8F_E4M3;
        let layouts = Layouts::new([(e4m3, k, n, k), (e4m3, k, m, k), (out_type, n, m, ldy)])?;
        let [a, b, d] = layouts.0;
        let key = (m, n, k, ldy, out_type as u32);
        let cached = self.algos.borrow().get(&key).copied();
        let algo = match cached {
            Some(algo) => algo,
            None => {
                // SAFETY: every descriptor is live.
                let found = unsafe { lt::get_matmul_algo_heuristic(self.handle, self.desc, a, b, d, d, self.pref) }
                    .map_err(|e| anyhow!("cuBLASLt has no block-scaled FP8 algorithm for {m}×{n}×{k}: {e:?}"))?;
                self.algos.borrow_mut().insert(key, found.algo);
                found.algo
            }
        };
        let (alpha, beta) = (1.0f32, if accumulate { 1.0f32 } else { 0.0 });
        gpu.profiled("cublaslt_fp8", || {
            // SAFETY: the pointers cover the shapes above (callers allocate them so); the
            // workspace belongs to this stream.
            unsafe {
                lt::matmul(
                    self.handle,
                    self.desc,
                    &alpha as *const f32 as *const c_void,
                    &beta as *const f32 as *const c_void,
                    w as *const c_void,
                    a,
                    x as *const c_void,
                    b,
                    y as *const c_void,
                    d,
                    y as *mut c_void,
                    d,
                    &algo,
                    workspace as *mut c_void,
                    WORKSPACE_BYTES,
                    gpu.launch_stream() as sys::cudaStream_t,
                )
            }
            .map_err(|e| anyhow!("cuBLASLt block-scaled FP8 product {m}×{n}×{k}: {e:?}"))
        })
    }
}

impl Drop for Fp8Gemm {
    fn drop(&mut self) {
        // SAFETY: made in `new`, destroyed once here.
        unsafe {
            let _ = lt::destroy_matmul_pref(self.pref);
            let _ = lt::destroy_matmul_desc(self.desc);
            let _ = lt::destroy_handle(self.handle);
        }
    }
}

/// Rows as e4m3 with one scale per row per 128 channels (`quantize_rows_fp8`; powers of two when
/// `ue8m0`), the activation operand of [`Fp8Gemm::gemm`] and of the Hopper expert kernel.
pub struct QuantizedRows {
    pub data: DeviceBuf,
    pub scales: DeviceBuf,
    /// Channels per row.
    pub k: usize,
}

impl QuantizedRows {
    /// Room for `n` rows of `k` channels (`k` a multiple of 128): the codes, and a scale per
    /// 128 channels of each row; for a kernel to write.
    pub fn alloc(g: &Gpu, n: usize, k: usize) -> Result<Self> {
        Ok(QuantizedRows {
            data: g.alloc(n * k)?,
            scales: g.alloc(n * (k / 128) * 4)?,
            k,
        })
    }

    /// `n` rows of `k` channels: row r is row `rows[r]` of `x` (row stride `ldx`), or row r. With
    /// `groups` (the device offsets of groups of rows, and their count), each group's scales are
    /// laid out `[k/128][group rows]` from its first row on, as its product reads them; without,
    /// the n rows are one group.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        g: &Gpu,
        x: u64,
        ldx: usize,
        rows: Option<u64>,
        n: usize,
        k: usize,
        groups: Option<(u64, usize)>,
        ue8m0: bool,
    ) -> Result<Self> {
        Self::launch(g, n, k, groups, ue8m0, |q| {
            kernels::quantize_rows_fp8.launch(
                g,
                q.grid,
                256,
                0,
                (
                    q.data,
                    q.scales,
                    ptr(x),
                    int(ldx),
                    ptr(rows.unwrap_or(0)),
                    int(n),
                    int(k),
                    q.offsets,
                    q.groups,
                    q.ue8m0,
                    q.span,
                ),
            )
        })
    }

    /// [`QuantizedRows::new`] of SwiGLU's `n` rows of `k` (SiLU(gate) · up), made from `gu`, the
    /// rows of the gate and up products side by side (`2k` wide; as split-k slabs the product has
    /// not added up, or whole): the activations are quantised where they are made, and written in
    /// f32 too only to `act` where given (for products that may read them unquantised). The same
    /// codes and scales (and activations) as adding the slabs (`split_k_reduce`), the `swiglu`
    /// kernel and quantising its output.
    pub fn swiglu(
        g: &Gpu,
        gu: SplitSums,
        n: usize,
        k: usize,
        groups: Option<(u64, usize)>,
        ue8m0: bool,
        act: Option<u64>,
    ) -> Result<Self> {
        Self::launch(g, n, k, groups, ue8m0, |q| {
            kernels::swiglu_quantize_fp8.launch(
                g,
                q.grid,
                256,
                0,
                (
                    q.data,
                    q.scales,
                    ptr(gu.addr),
                    int(n),
                    int(k),
                    q.offsets,
                    q.groups,
                    q.ue8m0,
                    q.span,
                    ptr(act.unwrap_or(0)),
                    int(gu.splits),
                    gu.stride,
                ),
            )
        })
    }

    /// [`QuantizedRows::swiglu`] of gate and up products written as bf16 (`n` rows of `2k`,
    /// whole): the codes and scales of those values widened to f32.
    pub fn swiglu_bf16(
        g: &Gpu,
        gu: u64,
        n: usize,
        k: usize,
        groups: Option<(u64, usize)>,
        ue8m0: bool,
    ) -> Result<Self> {
        Self::launch(g, n, k, groups, ue8m0, |q| {
            kernels::swiglu_quantize_fp8_bf16.launch(
                g,
                q.grid,
                256,
                0,
                (
                    q.data,
                    q.scales,
                    ptr(gu),
                    int(n),
                    int(k),
                    q.offsets,
                    q.groups,
                    q.ue8m0,
                    q.span,
                ),
            )
        })
    }

    /// [`QuantizedRows::new`] of RMSNorm's output, quantised where it is made: `rows` rows of
    /// `width` channels of `x` (row stride `ld_in`) normed with the weights at `w` into `out`
    /// (row stride `ld_out`, written too), one block of `threads` a row (the norm's sum follows
    /// the block size), one group of rows. The bits of `rms_norm` followed by
    /// [`QuantizedRows::new`]. `width` a multiple of 128.
    #[allow(clippy::too_many_arguments)]
    pub fn rms_norm(
        g: &Gpu,
        out: u64,
        ld_out: usize,
        x: u64,
        ld_in: usize,
        w: u64,
        width: usize,
        rows: usize,
        eps: f32,
        threads: usize,
        ue8m0: bool,
    ) -> Result<Self> {
        let q = Self::alloc(g, rows, width)?;
        let (_, kernel) = kernels::norm_kernels(width, threads);
        kernel.launch(
            g,
            (rows as u32, 1, 1),
            threads as u32,
            0,
            (
                ptr(out),
                int(ld_out),
                ptr(x),
                int(ld_in),
                ptr(w),
                int(width),
                eps,
                ptr(q.data.addr),
                ptr(q.scales.addr),
                int(ue8m0 as usize),
            ),
        )?;
        Ok(q)
    }

    /// Quantises n rows of k by `run`, a quantising kernel's launch given where its output goes
    /// and how its warps are laid out. A warp takes `span` blocks of 128 channels of a row (more
    /// loads in flight per warp) where the warps of QUANT_SPAN blocks still fill the GPU (64
    /// warps an SM), one block otherwise.
    fn launch(
        g: &Gpu,
        n: usize,
        k: usize,
        groups: Option<(u64, usize)>,
        ue8m0: bool,
        run: impl FnOnce(QuantLaunch) -> Result<()>,
    ) -> Result<Self> {
        let q = Self::alloc(g, n, k)?;
        let blocks = k / 128;
        let span = if n * blocks >= QUANT_SPAN * 64 * g.sm_count {
            QUANT_SPAN
        } else {
            1
        };
        let warps = n * blocks.div_ceil(span);
        let (offsets, count) = groups.unwrap_or((0, 0));
        run(QuantLaunch {
            grid: (warps.div_ceil(8) as u32, 1, 1),
            data: ptr(q.data.addr),
            scales: ptr(q.scales.addr),
            offsets: ptr(offsets),
            groups: int(count),
            ue8m0: int(ue8m0 as usize),
            span: int(span),
        })?;
        Ok(q)
    }

    /// [`QuantizedRows::new`] of `n` rows gathered by `rows` (device indices) from the `m` rows
    /// of `x`, for gathers that repeat rows (each token goes to several experts): the `m` rows
    /// are quantised once and their FP8 bytes gathered, so each f32 row is read once instead of
    /// once per copy. The same codes and scales as quantising the gathered rows.
    #[allow(clippy::too_many_arguments)]
    pub fn gathered(
        g: &Gpu,
        x: u64,
        ldx: usize,
        m: usize,
        rows: u64,
        n: usize,
        k: usize,
        groups: Option<(u64, usize)>,
        ue8m0: bool,
    ) -> Result<Self> {
        let once = QuantizedRows::new(g, x, ldx, None, m, k, None, ue8m0)?;
        once.gather(g, m, rows, n, groups)
    }

    /// `n` rows gathered by `rows` (device indices) from these `m` rows, quantised as one group
    /// (scales `[k/128][m]`, as a norm quantises its output), their scales laid out per group
    /// as [`QuantizedRows::new`] lays them out: the codes and scales of quantising the gathered
    /// rows.
    pub fn gather(&self, g: &Gpu, m: usize, rows: u64, n: usize, groups: Option<(u64, usize)>) -> Result<Self> {
        let (once, k) = (self, self.k);
        let q = Self::alloc(g, n, k)?;
        let (offsets, count) = groups.unwrap_or((0, 0));
        kernels::gather_quantized_rows.launch(
            g,
            (n as u32, 1, 1),
            256,
            0,
            (
                ptr(q.data.addr),
                ptr(q.scales.addr),
                ptr(once.data.addr),
                ptr(once.scales.addr),
                int(m),
                ptr(rows),
                int(k),
                ptr(offsets),
                int(count),
            ),
        )?;
        Ok(q)
    }
}

/// `n` contiguous rows of `k` channels quantised per 128 channels, as the mma.sync FP8 kernels
/// read them: the e4m3 values in bf16 (exact) and the scales `[n][k/128]` (their `x_scale`).
pub fn quantize_rows_bf16(g: &Gpu, x: u64, n: usize, k: usize, ue8m0: bool) -> Result<(DeviceBuf, DeviceBuf)> {
    let values = g.alloc(n * k * 2)?;
    let scales = g.alloc(n * (k / 128) * 4)?;
    let warps = n * (k / 128);
    kernels::quantize_rows_bf16.launch(
        g,
        (warps.div_ceil(8) as u32, 1, 1),
        256,
        0,
        (
            ptr(values.addr),
            ptr(scales.addr),
            ptr(x),
            int(n),
            int(k),
            int(ue8m0 as usize),
        ),
    )?;
    Ok((values, scales))
}

/// `n` contiguous rows of `k` channels replaced by the values an FP8 product sees (e4m3 times
/// the block's scale), for the kernels that read f32 activations.
pub fn quantize_rows_f32(g: &Gpu, x: u64, n: usize, k: usize, ue8m0: bool) -> Result<DeviceBuf> {
    let out = g.alloc(n * k * 4)?;
    let warps = n * (k / 128);
    kernels::quantize_rows_f32.launch(
        g,
        (warps.div_ceil(8) as u32, 1, 1),
        256,
        0,
        (ptr(out.addr), ptr(x), int(n), int(k), int(ue8m0 as usize)),
    )?;
    Ok(out)
}

/// The arguments every quantising kernel shares ([`QuantizedRows::launch`]): its grid (8 warps a
/// block), its outputs, the groups of rows, the scale encoding and the span of a warp.
struct QuantLaunch {
    grid: (u32, u32, u32),
    data: Ptr,
    scales: Ptr,
    offsets: Ptr,
    groups: i32,
    ue8m0: i32,
    span: i32,
}

/// Matrix layouts of one call, destroyed with it.
struct Layouts([sys::cublasLtMatrixLayout_t; 3]);

impl Layouts {
    fn new(shapes: [(sys::cudaDataType, usize, usize, usize); 3]) -> Result<Self> {
        let mut made = Vec::with_capacity(3);
        for (dtype, rows, cols, ld) in shapes {
            match lt::create_matrix_layout(dtype, rows as u64, cols as u64, ld as i64) {
                Ok(layout) => made.push(layout),
                Err(e) => {
                    for layout in made {
                        // SAFETY: made just above.
                        let _ = unsafe { lt::destroy_matrix_layout(layout) };
                    }
                    bail!("cuBLASLt matrix layout {rows}×{cols}: {e:?}");
                }
            }
        }
        Ok(Layouts([made[0], made[1], made[2]]))
    }
}

impl Drop for Layouts {
    fn drop(&mut self) {
        for layout in self.0 {
            // SAFETY: made in `new`, destroyed once here.
            let _ = unsafe { lt::destroy_matrix_layout(layout) };
        }
    }
}
