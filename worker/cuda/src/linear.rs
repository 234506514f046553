//! Products with a weight matrix, routed to the kernel that suits the batch size.

use crate::fp8_gemm::{quantize_rows_bf16, quantize_rows_f32, Fp8Gemm, QuantizedRows};
use crate::gpu::{DeviceBuf, Gpu};
use crate::kernels;
use crate::launch::{int, ptr};
use crate::weights::{DeviceMatrix, Format};
use anyhow::{ensure, Result};

/// Rows up to this use the weight-streaming GEMV kernels (when the tensor-core kernel does not apply).
pub const GEMV_MAX_ROWS: usize = 16;
/// Token rows the FP8 tensor-core kernel takes (above: cuBLAS; the GEMV covers shapes it does not take).
pub const TC_MIN_ROWS: usize = 1;
pub const TC_MAX_ROWS: usize = 512;

pub fn mma_fits(rows: usize, cols: usize) -> bool {
    rows.is_multiple_of(16) && cols.is_multiple_of(128)
}

/// k chunks (128 bytes of each of a warp's 16 weight rows) each warp of the split-k FP8 product
/// of up to 8 tokens (`fp8x8_mma_n1`, the dense gate + up) keeps in flight in registers: on one
/// H200 the dense gate + up took 78.0 / 75.9 / 104.3 / 97.2 µs at batch 1 with 1 / 2 / 3 / 4
/// (its occupancy falls as the ring's registers grow). `fp8x8_mma_k_over_warps` keeps one: two
/// left o_proj level (38.9 → 39.1 µs) and made q_b slower (14.8 → 17.5), whose blocks then fit
/// fewer to an SM.
pub const FP8_AHEAD: usize = 2;

/// [`FP8_AHEAD`], or `DSV3_FP8_AHEAD` (1 to 8): the switch is there to measure it. Compiled into
/// the kernels (the kernel cache keeps each value's build apart).
pub fn fp8_ahead() -> Result<usize> {
    static AHEAD: std::sync::OnceLock<Result<usize, String>> = std::sync::OnceLock::new();
    let ahead = crate::switches::positive_count_once(&AHEAD, "DSV3_FP8_AHEAD", FP8_AHEAD)?;
    ensure!(ahead <= 8, "DSV3_FP8_AHEAD={ahead}: expected 1 to 8 chunks");
    Ok(ahead)
}

/// Which kernels take a product's small batches (below cuBLASLt's threshold).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SmallBatch {
    /// The CUDA-core GEMV kernels, at every batch (DSV3_LINEAR_SIMT=1).
    CudaCores,
    /// FP8 weights widened to bf16 on the tensor cores, against bf16 activations
    /// (DSV3_FP8_MMA=bf16; products without quantised activations, and GPUs before Hopper).
    Bf16Mma,
    /// With quantised activations on Hopper, e4m3 against e4m3 on the tensor cores: one unpack
    /// instruction per pair of values instead of four, half the activation bytes (the default:
    /// 3–12% faster than `Bf16Mma` at batch 1, 10–30% at 8–16, BENCHMARKS.md); otherwise as
    /// `Bf16Mma`.
    E4m3Mma,
}

impl SmallBatch {
    /// The choice the environment makes: DSV3_LINEAR_SIMT=1, or DSV3_FP8_MMA=bf16|e4m3.
    pub fn from_env() -> Result<Self> {
        if crate::switches::flag("DSV3_LINEAR_SIMT", false)? {
            return Ok(SmallBatch::CudaCores);
        }
        match std::env::var("DSV3_FP8_MMA").as_deref() {
            Ok("bf16") => Ok(SmallBatch::Bf16Mma),
            Err(_) | Ok("e4m3") => Ok(SmallBatch::E4m3Mma),
            Ok(other) => anyhow::bail!("DSV3_FP8_MMA={other}: expected bf16 or e4m3"),
        }
    }
}

/// Where a tensor-core product writes. Its k chunks are split so its blocks fill the GPU's
/// resident slots in whole waves ([`wave_filling_splits`]); with more than one split, each
/// writes its own slab of a workspace and [`SplitK::finish`] adds the slabs into y in split
/// order — the same bits on every run, where atomic adds would depend on timing.
pub(crate) struct SplitK {
    pub(crate) splits: usize,
    /// The kernel's `y`, `ldy`, `mode` and `split_stride` arguments.
    pub(crate) out: u64,
    pub(crate) ldo: usize,
    pub(crate) mode: usize,
    pub(crate) stride: u64,
    slabs: Option<DeviceBuf>,
    y: u64,
    ldy: usize,
    m: usize,
    n: usize,
    accumulate: bool,
}

impl SplitK {
    /// `y[m, n]` (row stride `ldy`, added to when `accumulate`) from a product of `blocks` blocks
    /// over `chunks` k chunks, `resident` of its blocks fitting on an SM at once (the kernel's
    /// occupancy); `max_splits` caps the split (1: never split).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        g: &Gpu,
        blocks: usize,
        resident: usize,
        chunks: usize,
        max_splits: usize,
        y: u64,
        ldy: usize,
        m: usize,
        n: usize,
        accumulate: bool,
    ) -> Result<Self> {
        let splits = wave_filling_splits(blocks, resident.max(1) * g.sm_count, chunks.min(max_splits));
        let mut target = SplitK {
            splits,
            out: y,
            ldo: ldy,
            mode: accumulate as usize,
            stride: 0,
            slabs: None,
            y,
            ldy,
            m,
            n,
            accumulate,
        };
        if splits > 1 {
            let slabs = g.alloc(splits * m * n * 4)?;
            target.out = slabs.addr;
            target.ldo = n;
            target.mode = 2;
            target.stride = (m * n) as u64;
            target.slabs = Some(slabs);
        }
        Ok(target)
    }

    /// Adds the slabs into y (nothing to do for one split).
    pub(crate) fn finish(self, g: &Gpu) -> Result<()> {
        let Some(slabs) = &self.slabs else {
            return Ok(());
        };
        kernels::split_k_reduce.launch_1d(
            g,
            self.m * self.n,
            (
                ptr(self.y),
                int(self.ldy),
                ptr(slabs.addr),
                int(self.m),
                int(self.n),
                int(self.splits),
                int(self.accumulate as usize),
            ),
        )
    }
}

/// How many ways to split k so that `blocks` blocks, each split that many ways, fill `slots`
/// resident blocks best (at most `most` ways). Blocks run in waves of `slots`; a wave left part
/// empty streams with fewer bytes in flight, so the choice is the split whose blocks fill their
/// waves most, over at most two waves (ties, within 2%, to fewer splits: each split adds a slab
/// to write and add up). A product with blocks for a wave or more is not split: its many blocks
/// keep the GPU full as they come and go.
pub fn wave_filling_splits(blocks: usize, slots: usize, most: usize) -> usize {
    let (blocks, slots) = (blocks.max(1), slots.max(1));
    if blocks >= slots {
        return 1;
    }
    let fill = |s: usize| (blocks * s) as f64 / ((blocks * s).div_ceil(slots) * slots) as f64;
    let mut best = 1;
    for s in 2..=most.min(2 * slots / blocks) {
        if fill(s) > fill(best) + 0.02 {
            best = s;
        }
    }
    best
}

/// How many warps a block of `fp8x8_mma_k_over_warps` (one 16-row tile a block) splits its
/// `chunks` k chunks over, for a product of `tiles` tiles: the most of 8, 4 and 2 (no more than the
/// chunks) at which all its blocks are resident at once, `resident(warps)` an SM on `sms` SMs.
/// None where no width keeps every tile in one wave: such a product has blocks enough to fill
/// the GPU as they come and go, and keeps fp8x8_mma's split k.
fn warps_over_k(
    tiles: usize,
    chunks: usize,
    sms: usize,
    resident: impl Fn(usize) -> Result<usize>,
) -> Result<Option<usize>> {
    for warps in [8, 4, 2] {
        if warps <= chunks && tiles <= resident(warps)? * sms {
            return Ok(Some(warps));
        }
    }
    Ok(None)
}

/// `y[m, w.rows] (+)= x[m, w.cols] · wᵀ` (x contiguous, y with row stride `ldy`), by batch size.
/// With `input_quant` (`Some(ue8m0)`: [`dsv3_engine::Fp8Activations::Quantised`]) an FP8 weight
/// meets x quantised per row per 128 channels: from [`Fp8Gemm::dense_min_rows`] rows cuBLASLt's
/// block-scaled FP8 product where the GPU has it, below our tensor-core kernel on the same e4m3
/// values and scales. Without, FP8 weights meet bf16 activations on our tensor-core kernel (up to
/// 512 rows). Large bf16 weights take the bf16 tensor-core kernel up to 16 rows; else cuBLAS on
/// bf16 (FP8 weights dequantised into `dequant`); the weight-streaming GEMV for f32 weights and
/// shapes the tensor-core kernels do not take. `small` picks the kernels of small batches.
#[allow(clippy::too_many_arguments)]
pub fn linear(
    g: &Gpu,
    dequant: &DeviceBuf,
    small: SmallBatch,
    input_quant: Option<bool>,
    y: u64,
    ldy: usize,
    x: u64,
    m: usize,
    w: &DeviceMatrix,
    accumulate: bool,
) -> Result<()> {
    linear_from(g, dequant, small, input_quant, y, ldy, x, None, m, w, accumulate)
}

/// [`linear`] with x's m rows possibly quantised already (`x_quantised`: as
/// [`QuantizedRows::new`] makes them with `input_quant`'s scales, one group, e.g. by the norm
/// that made x): the products that read quantised rows take them instead of quantising x again.
#[allow(clippy::too_many_arguments)]
pub fn linear_from(
    g: &Gpu,
    dequant: &DeviceBuf,
    small: SmallBatch,
    input_quant: Option<bool>,
    y: u64,
    ldy: usize,
    x: u64,
    x_quantised: Option<&QuantizedRows>,
    m: usize,
    w: &DeviceMatrix,
    accumulate: bool,
) -> Result<()> {
    product(g, dequant, small, input_quant, y, ldy, x, x_quantised, m, w, accumulate)?.finish(g)
}

/// [`linear_from`] into a new `y[m, w.rows]` (contiguous, not accumulated) whose split-k slabs,
/// where the product is split, are left for its reader to add up ([`Unsummed::sums`]): the kernel
/// that reads y then takes the slabs in its place, one launch where there were two.
#[allow(clippy::too_many_arguments)]
pub fn linear_unsummed(
    g: &Gpu,
    dequant: &DeviceBuf,
    small: SmallBatch,
    input_quant: Option<bool>,
    y: u64,
    x: u64,
    x_quantised: Option<&QuantizedRows>,
    m: usize,
    w: &DeviceMatrix,
) -> Result<Unsummed> {
    product(g, dequant, small, input_quant, y, w.rows, x, x_quantised, m, w, false)
}

/// A product's output as its reader finds it: the rows themselves (`splits` 1), or the split-k
/// slabs of a [`linear_unsummed`] product, `stride` floats apart, to add in split order from zero
/// (`split_k_reduce`'s order, so the reader gets its bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitSums {
    pub addr: u64,
    pub splits: usize,
    pub stride: u64,
}

impl SplitSums {
    /// Rows already added up.
    pub fn whole(addr: u64) -> Self {
        SplitSums {
            addr,
            splits: 1,
            stride: 0,
        }
    }
}

/// A product that may still owe its split-k sum ([`linear_unsummed`]); its slabs live as long
/// as it does, so it is dropped after the launch of the kernel that reads them.
pub struct Unsummed {
    y: u64,
    split: Option<SplitK>,
}

impl Unsummed {
    fn written(y: u64) -> Self {
        Unsummed { y, split: None }
    }

    /// Where the reader takes the product from.
    pub fn sums(&self) -> SplitSums {
        match &self.split {
            Some(SplitK {
                slabs: Some(slabs),
                splits,
                stride,
                ..
            }) => SplitSums {
                addr: slabs.addr,
                splits: *splits,
                stride: *stride,
            },
            _ => SplitSums::whole(self.y),
        }
    }

    /// Adds the slabs into y (nothing to do for a product written whole).
    pub fn finish(self, g: &Gpu) -> Result<()> {
        self.split.map_or(Ok(()), |target| target.finish(g))
    }
}

/// The product of [`linear_from`], its split-k sum not yet made.
#[allow(clippy::too_many_arguments)]
fn product(
    g: &Gpu,
    dequant: &DeviceBuf,
    small: SmallBatch,
    input_quant: Option<bool>,
    y: u64,
    ldy: usize,
    x: u64,
    x_quantised: Option<&QuantizedRows>,
    m: usize,
    w: &DeviceMatrix,
    accumulate: bool,
) -> Result<Unsummed> {
    let written = || Unsummed::written(y);
    let quantised_rows = |rows: usize, ue8m0: bool| Quantised::of(g, x, x_quantised, rows, m, w.cols, ue8m0);
    let simt = small == SmallBatch::CudaCores;
    let input_quant = input_quant.filter(|_| w.format == Format::Fp8);
    if input_quant.is_some() {
        ensure!(
            w.cols.is_multiple_of(128),
            "FP8 activations are quantised in blocks of 128 channels; a {}×{} weight has a partial block (run with --fp8-activations unquantised)",
            w.rows,
            w.cols
        );
    }
    if bf16_tensor_cores(simt, m, w) {
        let xb = g.to_bf16(x, m * w.cols)?;
        let blocks = w.rows.div_ceil(64);
        let kernel = if m <= 8 {
            kernels::bf16_mma_n1
        } else {
            kernels::bf16_mma_n2
        };
        let resident = kernel.resident_blocks(g, 128, 0)?;
        let target = SplitK::new(
            g,
            blocks,
            resident,
            w.cols / 64,
            usize::MAX,
            y,
            ldy,
            m,
            w.rows,
            accumulate,
        )?;
        kernel.launch(
            g,
            (blocks as u32, 1, target.splits as u32),
            128,
            0,
            (
                ptr(target.out),
                int(target.ldo),
                ptr(xb.addr),
                int(w.cols),
                int(m),
                ptr(w.data.addr),
                int(w.rows),
                int(w.cols),
                int(target.mode),
                target.stride,
            ),
        )?;
        return Ok(Unsummed { y, split: Some(target) });
    }
    // Larger steps: cuBLASLt's block-scaled FP8 product, the weights read as stored; the last
    // m % 4 rows (it takes multiples of 4) as below.
    if let Some((fp8, ue8m0)) = block_scaled_fp8(g, simt, input_quant, m, w)? {
        let body = m / 4 * 4;
        let q = quantised_rows(body, ue8m0)?;
        let q = q.rows();
        fp8.reserve(g, 0)?;
        fp8.gemm(
            g,
            y,
            ldy,
            q.data.addr,
            q.scales.addr,
            w.data.addr,
            w.scale_addr(),
            body,
            w.rows,
            w.cols,
            accumulate,
        )?;
        if body == m {
            return Ok(written());
        }
        let (y_tail, x_tail) = (y + (body * ldy * 4) as u64, x + (body * w.cols * 4) as u64);
        linear(
            g,
            dequant,
            small,
            input_quant,
            y_tail,
            ldy,
            x_tail,
            m - body,
            w,
            accumulate,
        )?;
        return Ok(written());
    }
    if fp8_tensor_cores(simt, m, w) {
        let blocks = w.rows.div_ceil(64);
        let e4m3 = input_quant.is_some() && small == SmallBatch::E4m3Mma && g.hopper;
        if let Some(ue8m0) = input_quant.filter(|_| e4m3 && m <= 8) {
            let resident = |warps: usize| kernels::fp8x8_mma_k_over_warps.resident_blocks(g, 32 * warps as u32, 0);
            if let Some(warps) = warps_over_k(w.rows / 16, w.cols / 128, g.sm_count, resident)? {
                let q = quantised_rows(m, ue8m0)?;
                let q = q.rows();
                kernels::fp8x8_mma_k_over_warps.launch(
                    g,
                    ((w.rows / 16) as u32, 1, 1),
                    32 * warps as u32,
                    0,
                    (
                        ptr(y),
                        int(ldy),
                        ptr(q.data.addr),
                        ptr(q.scales.addr),
                        int(m),
                        ptr(w.data.addr),
                        ptr(w.scale_addr()),
                        int(w.rows),
                        int(w.cols),
                        int(accumulate as usize),
                    ),
                )?;
                return Ok(written());
            }
        }
        let resident = if e4m3 {
            kernels::FP8X8_MMA.for_rows(m).0.resident_blocks(g, 128, 0)?
        } else {
            kernels::FP8_MMA.for_rows(m).0.resident_blocks(g, 128, 0)?
        };
        let target = SplitK::new(
            g,
            blocks * m.div_ceil(64),
            resident,
            w.cols / 128,
            usize::MAX,
            y,
            ldy,
            m,
            w.rows,
            accumulate,
        )?;
        let grid = (blocks as u32, m.div_ceil(64) as u32, target.splits as u32);
        // The output and the weights, the same arguments of both kernels around the activations.
        let (out, ldo) = (ptr(target.out), int(target.ldo));
        let (wd, ws, n, k) = (ptr(w.data.addr), ptr(w.scale_addr()), int(w.rows), int(w.cols));
        let (mode, stride) = (int(target.mode), target.stride);
        match input_quant {
            Some(ue8m0) if e4m3 => {
                let q = quantised_rows(m, ue8m0)?;
                let q = q.rows();
                let (xq, xs) = (ptr(q.data.addr), ptr(q.scales.addr));
                let args = (out, ldo, xq, xs, int(m), wd, ws, n, k, mode, stride);
                kernels::FP8X8_MMA.for_rows(m).0.launch(g, grid, 128, 0, args)?;
            }
            _ => {
                let (xb, x_scale) = match input_quant {
                    Some(ue8m0) => {
                        let (values, scales) = quantize_rows_bf16(g, x, m, w.cols, ue8m0)?;
                        (values, Some(scales))
                    }
                    None => (g.to_bf16(x, m * w.cols)?, None),
                };
                let xs = ptr(x_scale.as_ref().map_or(0, |s| s.addr));
                let args = (
                    out,
                    ldo,
                    ptr(xb.addr),
                    int(w.cols),
                    xs,
                    int(m),
                    wd,
                    ws,
                    n,
                    k,
                    mode,
                    stride,
                );
                kernels::FP8_MMA.for_rows(m).0.launch(g, grid, 128, 0, args)?;
            }
        }
        return Ok(Unsummed { y, split: Some(target) });
    }
    // The kernels below read f32 (or bf16) activations: quantised ones as the values the FP8
    // product would see (through cuBLAS's bf16 they are rounded once more).
    let quantised = input_quant
        .map(|ue8m0| quantize_rows_f32(g, x, m, w.cols, ue8m0))
        .transpose()?;
    let x = quantised.as_ref().map_or(x, |q| q.addr);
    if m <= GEMV_MAX_ROWS {
        let kernel = match w.format {
            Format::Fp8 => kernels::gemv_fp8,
            Format::Bf16 => kernels::gemv_bf16,
            Format::F32 => kernels::gemv_f32,
        };
        let parts = gemv_parts(w.rows, g.sm_count);
        kernel.launch(
            g,
            (w.rows.div_ceil(8 / parts) as u32, 1, 1),
            256,
            0,
            (
                ptr(y),
                int(ldy),
                ptr(x),
                int(w.cols),
                int(m),
                ptr(w.data.addr),
                ptr(w.scale_addr()),
                int(w.rows),
                int(w.cols),
                int(accumulate as usize),
                int(parts),
            ),
        )?;
        return Ok(written());
    }
    let w_bf16 = weight_bf16(g, dequant, w)?;
    let xb = g.to_bf16(x, m * w.cols)?;
    g.gemm_bf16(y, ldy, xb.addr, w_bf16, m, w.rows, w.cols, accumulate)?;
    Ok(written())
}

/// cuBLASLt's block-scaled FP8 product and the activations' scale encoding, where [`product`]
/// takes it for `m` rows of `w`.
fn block_scaled_fp8<'g>(
    g: &'g Gpu,
    simt: bool,
    input_quant: Option<bool>,
    m: usize,
    w: &DeviceMatrix,
) -> Result<Option<(&'g Fp8Gemm, bool)>> {
    let Some(ue8m0) = input_quant.filter(|_| !simt && w.format == Format::Fp8) else {
        return Ok(None);
    };
    if !Fp8Gemm::takes_weight(w.rows, w.cols) {
        return Ok(None);
    }
    Ok(g.fp8_gemm()?.filter(|f| m >= f.dense_min_rows).map(|f| (f, ue8m0)))
}

/// The scale encoding (`ue8m0`) of quantised rows from which [`linear_from`] computes all `m`
/// rows of its product with `w`, never reading the unquantised rows: where it runs cuBLASLt's
/// block-scaled FP8 product over every row (m a multiple of 4). `None` where it would read them,
/// so their maker must write them.
pub fn reads_quantised_only(
    g: &Gpu,
    small: SmallBatch,
    input_quant: Option<bool>,
    m: usize,
    w: &DeviceMatrix,
) -> Result<Option<bool>> {
    Ok(block_scaled_fp8_whole(g, small, input_quant, m, w)?.map(|(_, ue8m0)| ue8m0))
}

/// [`block_scaled_fp8`] where [`product`] takes it for all `m` rows (none left for the kernels
/// after it).
fn block_scaled_fp8_whole<'g>(
    g: &'g Gpu,
    small: SmallBatch,
    input_quant: Option<bool>,
    m: usize,
    w: &DeviceMatrix,
) -> Result<Option<(&'g Fp8Gemm, bool)>> {
    let simt = small == SmallBatch::CudaCores;
    if bf16_tensor_cores(simt, m, w) || !m.is_multiple_of(4) {
        return Ok(None);
    }
    block_scaled_fp8(g, simt, input_quant, m, w)
}

/// [`linear_from`] into new bf16 rows `[m, w.rows]` (not accumulated), for a reader that takes
/// bf16: where cuBLASLt's block-scaled FP8 product takes every row, it rounds its sums to bf16
/// itself (half the bytes written); elsewhere the f32 product is rounded.
#[allow(clippy::too_many_arguments)]
pub fn linear_from_to_bf16(
    g: &Gpu,
    dequant: &DeviceBuf,
    small: SmallBatch,
    input_quant: Option<bool>,
    x: u64,
    x_quantised: Option<&QuantizedRows>,
    m: usize,
    w: &DeviceMatrix,
) -> Result<DeviceBuf> {
    if let Some((fp8, ue8m0)) = block_scaled_fp8_whole(g, small, input_quant, m, w)? {
        let q = Quantised::of(g, x, x_quantised, m, m, w.cols, ue8m0)?;
        let q = q.rows();
        let y = g.alloc(m * w.rows * 2)?;
        fp8.reserve(g, 0)?;
        let (x, xs, wd, ws) = (q.data.addr, q.scales.addr, w.data.addr, w.scale_addr());
        fp8.gemm_to_bf16(g, y.addr, w.rows, x, xs, wd, ws, m, w.rows, w.cols)?;
        return Ok(y);
    }
    let y = g.alloc(m * w.rows * 4)?;
    linear_from(
        g,
        dequant,
        small,
        input_quant,
        y.addr,
        w.rows,
        x,
        x_quantised,
        m,
        w,
        false,
    )?;
    g.to_bf16(y.addr, m * w.rows)
}

/// Quantised rows given by the caller or made for one product.
enum Quantised<'a> {
    Given(&'a QuantizedRows),
    Made(QuantizedRows),
}

impl<'a> Quantised<'a> {
    /// The first `rows` of x's `m` rows, `k` wide, quantised for a product: the caller's where
    /// they are all `m` rows at that width, else made now in the `ue8m0` encoding.
    fn of(
        g: &Gpu,
        x: u64,
        given: Option<&'a QuantizedRows>,
        rows: usize,
        m: usize,
        k: usize,
        ue8m0: bool,
    ) -> Result<Self> {
        Ok(match given.filter(|q| q.k == k) {
            Some(q) if rows == m => Quantised::Given(q),
            _ => Quantised::Made(QuantizedRows::new(g, x, k, None, rows, k, None, ue8m0)?),
        })
    }

    fn rows(&self) -> &QuantizedRows {
        match self {
            Quantised::Given(q) => q,
            Quantised::Made(q) => q,
        }
    }
}

/// Warps per output column of the GEMV (1, 2, 4 or 8 of its block's 8): a column a warp where
/// there are columns enough for two blocks an SM, else k shared by more warps, so a narrow
/// matrix (the router's 256 columns: 32 blocks of whole columns) still has its bytes requested
/// by every SM at once.
fn gemv_parts(columns: usize, sm_count: usize) -> usize {
    let mut parts = 1;
    while parts < 8 && columns.div_ceil(8 / parts) < 2 * sm_count {
        parts *= 2;
    }
    parts
}

/// Large bf16 matrices (the head) at a few rows go to the bf16 tensor-core kernel; the small router
/// keeps the f32-activation GEMV, since expert choice is sensitive to rounding.
fn bf16_tensor_cores(simt: bool, m: usize, w: &DeviceMatrix) -> bool {
    !simt
        && w.format == Format::Bf16
        && w.rows >= 4096
        && w.rows.is_multiple_of(16)
        && w.cols.is_multiple_of(64)
        && m <= 16
}

/// FP8 weights at up to `TC_MAX_ROWS` rows go to the FP8 tensor-core kernels.
fn fp8_tensor_cores(simt: bool, m: usize, w: &DeviceMatrix) -> bool {
    !simt && w.format == Format::Fp8 && mma_fits(w.rows, w.cols) && (TC_MIN_ROWS..=TC_MAX_ROWS).contains(&m)
}

/// `y = x · wᵀ` as [`linear`] computes it with unquantised activations, into a new bf16 `[m,
/// w.rows]`: where the product runs on cuBLAS it writes bf16 itself; elsewhere (fewer rows, whose
/// kernels read FP8 weights as stored) the f32 result is rounded.
pub fn linear_to_bf16(
    g: &Gpu,
    dequant: &DeviceBuf,
    simt: bool,
    x: u64,
    m: usize,
    w: &DeviceMatrix,
) -> Result<DeviceBuf> {
    let on_cublas = !bf16_tensor_cores(simt, m, w) && !fp8_tensor_cores(simt, m, w) && m > GEMV_MAX_ROWS;
    if on_cublas {
        let y = g.alloc(m * w.rows * 2)?;
        let w_bf16 = weight_bf16(g, dequant, w)?;
        let xb = g.to_bf16(x, m * w.cols)?;
        g.gemm_bf16_to_bf16(y.addr, w.rows, xb.addr, w_bf16, m, w.rows, w.cols)?;
        return Ok(y);
    }
    let y = g.alloc(m * w.rows * 4)?;
    let small = if simt {
        SmallBatch::CudaCores
    } else {
        SmallBatch::Bf16Mma
    };
    linear(g, dequant, small, None, y.addr, w.rows, x, m, w, false)?;
    g.to_bf16(y.addr, m * w.rows)
}

/// The address of `w` as bf16 for a cuBLAS product: its own data, or its dequantisation into
/// the `dequant` scratch (FP8 and f32 weights; valid until the scratch's next use).
fn weight_bf16(g: &Gpu, dequant: &DeviceBuf, w: &DeviceMatrix) -> Result<u64> {
    if w.format == Format::Bf16 {
        return Ok(w.data.addr);
    }
    ensure!(w.rows * w.cols * 2 <= dequant.bytes, "dequantisation scratch too small");
    w.dequant_into(g, dequant.addr)?;
    Ok(dequant.addr)
}

#[cfg(test)]
mod tests {
    use super::{gemv_parts, warps_over_k, wave_filling_splits};

    #[test]
    fn k_splits_over_the_most_warps_that_keep_every_tile_in_one_wave() {
        // 132 SMs holding 3 blocks of 8 warps, 7 of 4 or 14 of 2 (the fewer warps, the more fit).
        let resident = |warps: usize| {
            Ok(match warps {
                8 => 3,
                4 => 7,
                _ => 14,
            })
        };
        let warps = |n: usize, k: usize| warps_over_k(n / 16, k / 128, 132, resident).unwrap();
        // q_a + kv_a (2,112 × 7,168): 132 tiles, one block of 8 warps an SM.
        assert_eq!(warps(2112, 7168), Some(8));
        // o_proj (7,168 × 16,384): 448 tiles fit 396 slots of 8 warps only as 4.
        assert_eq!(warps(7168, 16384), Some(4));
        // q_b (24,576 × 1,536): 1,536 tiles, in one wave only as blocks of 2 warps.
        assert_eq!(warps(24576, 1536), Some(2));
        // The dense gate + up (36,864 × 7,168): 2,304 tiles, more than any width holds at once.
        assert_eq!(warps(36864, 7168), None);
        // No more warps than k chunks; one chunk is not split.
        assert_eq!(warps(384, 512), Some(4));
        assert_eq!(warps(384, 128), None);
    }

    #[test]
    fn narrow_matrices_share_each_column_among_warps_until_every_sm_has_two_blocks() {
        // 132 SMs (an H200): the router's 256 columns take 8 warps a column (256 blocks), a
        // 2,048-wide product 2 (512 blocks), the hidden size's 7,168 one (896 blocks).
        assert_eq!(gemv_parts(256, 132), 8);
        assert_eq!(gemv_parts(2048, 132), 2);
        assert_eq!(gemv_parts(7168, 132), 1);
        // Never more than the block's 8 warps, however narrow.
        assert_eq!(gemv_parts(1, 132), 8);
    }

    #[test]
    fn splits_fill_whole_waves_of_resident_blocks() {
        // 7 blocks an SM on 132 SMs: 924 slots.
        let slots = 7 * 132;
        // o_proj (112 blocks of 64 rows, 128 chunks): 8 ways, 896 blocks in one wave (where
        // rounding 924 / 112 up gave 10 ways, 1,120 blocks: a second wave of 196).
        assert_eq!(wave_filling_splits(112, slots, 128), 8);
        // q_a + kv_a (33 blocks): 28 ways fill the wave exactly.
        assert_eq!(wave_filling_splits(33, slots, 56), 28);
        // q_b (384 blocks, 12 chunks): 2 ways, 768 blocks; 3 would spill into a second wave.
        assert_eq!(wave_filling_splits(384, slots, 12), 2);
        // The dense gate + up (576 blocks): 3 ways fill two waves to 94% (1 or 2 ways: 62%).
        assert_eq!(wave_filling_splits(576, slots, 56), 3);
        // At most `most` ways, and a wave's worth of blocks is not split.
        assert_eq!(wave_filling_splits(33, slots, 4), 4);
        assert_eq!(wave_filling_splits(2020, slots, 112), 1);
        assert_eq!(wave_filling_splits(924, slots, 56), 1);
    }
}
