//! The MoE block of one layer: routing on the GPU, tokens grouped by expert, the routed experts
//! on the tensor cores (grouped mma.sync kernels; for the large steps of a prefill, on Hopper one
//! FP8 wgmma launch per matrix kind, elsewhere cuBLAS(Lt) for the large groups) — or, on an attention rank
//! whose experts live on other ranks, sent through an [`ExpertExecutor`] — and the shared expert.
//! [`run_bank`] is the routed-expert computation alone, shared with the GPU expert shard.

use super::layers::{Mlp, Moe};
use super::CudaModel;
use crate::expert_wgmma::{self, ExpertTiles, RowFormat};
use crate::fp8_gemm::{quantize_rows_bf16, quantize_rows_f32, Fp8Gemm, QuantizedRows, ALIGN};
use crate::gpu::{DeviceBuf, Forked, Gpu};
use crate::kernels;
use crate::launch::{int, ptr, Extend};
use crate::linear::{mma_fits, SmallBatch, SplitK, SplitSums};
use crate::switches;
use crate::tiles::{COMBINE_THREADS, GX_TOKENS, ROUTE_LANE_EXPERTS, ROUTE_PLAN_THREADS};
use crate::weights::{ExpertBank, Stacked};
use anyhow::{ensure, Context, Result};
use dsv3_engine::backend::count_routes;
use dsv3_engine::moe::Gate;
use dsv3_engine::{ExpertExecutor, Fp8Activations, ModelConfig, TokenRoutes};
use std::collections::BTreeMap;

/// Steps up to this many rows keep every expert group in the grouped kernels, so they never wait
/// for the host (and can be captured as CUDA graphs).
pub(super) const DEVICE_ONLY_MAX_ROWS: usize = 256;
/// Side streams the cuBLAS experts of a prefill step are spread over.
const EXPERT_LANES: usize = 8;
/// In larger steps (prefill), experts with more routed rows than this use cuBLAS instead
/// (default; DSV3_EXPERT_CUBLAS_ROWS sets it).
pub(super) const GROUPED_MAX_ROWS: usize = 64;

/// How the FP8 products run: what they do with their activations, and which kernels compute them.
#[derive(Clone, Copy, Debug)]
pub struct ExpertKernels {
    /// `Some(ue8m0)`: activations quantised per token per 128 channels
    /// ([`Fp8Activations::Quantised`], power-of-two scales when ue8m0); `None`: bf16 activations.
    pub input_quant: Option<bool>,
    /// The kernels of the dense products' small batches ([`SmallBatch::from_env`]).
    pub small_batch: SmallBatch,
    /// Routed rows above which an expert of a large step runs through cuBLAS(Lt).
    pub cublas_rows: usize,
    /// With quantised activations, steps of at least this many rows run the routed experts on
    /// Hopper's FP8 wgmma kernel where it takes the bank (DSV3_EXPERT_WGMMA_ROWS; default 1,
    /// every step; 0 never): the same values and scales as the grouped mma.sync kernels.
    pub wgmma_rows: usize,
    /// What Hopper's FP8 wgmma kernel writes the routed experts' rows in (bf16;
    /// DSV3_EXPERT_BF16_ROWS=0: f32).
    pub wgmma_out: RowFormat,
    /// Steps of up to this many rows whose routed experts all run here on the wgmma kernel route,
    /// plan and list their tiles in one launch (`route_plan`: a warp routes a row and a thread
    /// places a (row, choice) pair, where `route_topk`, `moe_plan` and `expert_tiles` each take a
    /// block's barriers and scans; DSV3_ROUTE_PLAN_ROWS, default 8, 0 never).
    pub route_plan_rows: usize,
}

impl ExpertKernels {
    /// The CUDA-core GEMV kernels at every batch, for every FP8 product (DSV3_LINEAR_SIMT=1).
    pub fn simt_linear(&self) -> bool {
        self.small_batch == SmallBatch::CudaCores
    }

    /// The products of `config`'s model, with the kernel switches the environment sets.
    pub fn new(config: &ModelConfig) -> Result<Self> {
        let input_quant = (config.fp8_activations() == Fp8Activations::Quantised)
            .then(|| config.quantization.as_ref().is_some_and(|q| q.ue8m0_scales));
        Ok(ExpertKernels {
            input_quant,
            small_batch: SmallBatch::from_env()?,
            cublas_rows: switches::count("DSV3_EXPERT_CUBLAS_ROWS")?.unwrap_or(GROUPED_MAX_ROWS),
            wgmma_rows: match switches::count("DSV3_EXPERT_WGMMA_ROWS")? {
                Some(0) => usize::MAX,
                Some(rows) => rows,
                None => 1,
            },
            wgmma_out: if switches::flag("DSV3_EXPERT_BF16_ROWS", true)? {
                RowFormat::Bf16
            } else {
                RowFormat::F32
            },
            route_plan_rows: switches::count("DSV3_ROUTE_PLAN_ROWS")?.unwrap_or(ROUTE_PLAN_ROWS),
        })
    }

    /// `Some(ue8m0)` where a step of `m` rows runs `bank` on Hopper's FP8 wgmma kernel, its
    /// activations quantised with power-of-two scales when ue8m0.
    fn wgmma_takes(&self, g: &Gpu, bank: &ExpertBank, m: usize) -> Result<Option<bool>> {
        let Some(ue8m0) = self.input_quant else {
            return Ok(None);
        };
        let width = bank.gate.cols;
        ensure!(
            width.is_multiple_of(128) && bank.gate.rows.is_multiple_of(128),
            "FP8 activations are quantised in blocks of 128 channels; experts of {width}→{} have a partial block (run with --fp8-activations unquantised)",
            bank.gate.rows
        );
        let takes = m >= self.wgmma_rows && !self.simt_linear() && expert_wgmma::takes(g, bank);
        Ok(takes.then_some(ue8m0))
    }
}

/// Counters `moe_plan` adds to for one bank: tokens per expert of the layer, experts touched.
pub(crate) struct BankCounters {
    pub(crate) counts: u64,
    pub(crate) touched: u64,
}

/// `h[t] += Σ_j weights[t,j] · Expert_{ids[t,j]}(x_t)` over the experts of `bank`, for `m` rows
/// of which the first `*valid` are real. `ids` index the bank (`-1` or out of range: a slot
/// handled elsewhere); `x` is f32 `[m, hidden]`, `xq` its rows quantised already where the norm
/// that made them quantised them (the routed slots' FP8 rows are then gathered from those). From
/// `kernels.wgmma_rows` rows on Hopper, [`wgmma_bank`]. Otherwise every expert group up to
/// `kernels.cublas_rows` rows runs in the grouped tensor-core kernels, weights streamed once per
/// group; in steps above [`DEVICE_ONLY_MAX_ROWS`] larger groups go to cuBLAS (one copy of the
/// group sizes to the host).
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_bank(
    g: &Gpu,
    kernels: ExpertKernels,
    bank: &ExpertBank,
    x: &DeviceBuf,
    xq: Option<&QuantizedRows>,
    h: &DeviceBuf,
    m: usize,
    k: usize,
    ids: u64,
    weights: u64,
    valid: u64,
    counters: &BankCounters,
    shared: Option<SharedExpert<'_>>,
) -> Result<()> {
    let e = bank.experts;
    let width = bank.gate.cols;
    let input_quant = kernels.input_quant;
    if let Some(ue8m0) = kernels.wgmma_takes(g, bank, m)? {
        let plan = DevicePlan::new(g, e, k, ids, valid, m, counters, 1)?;
        let tiles = ExpertTiles::new(g, plan.offsets, plan.groups, plan.capacity)?;
        return wgmma_bank(
            g,
            bank,
            &plan,
            &tiles,
            (x, xq),
            h,
            m,
            k,
            weights,
            ue8m0,
            kernels.wgmma_out,
            shared,
        );
    }
    // Large steps run their large groups through cuBLASLt's FP8 products (quantised activations,
    // where the GPU has them; those read each group's per-row scales in rows of 4, so groups
    // start on a multiple of 4) or through cuBLAS on bf16.
    let fp8 = match input_quant {
        Some(ue8m0) if m > DEVICE_ONLY_MAX_ROWS && fp8_fits(bank) => g.fp8_gemm()?.map(|f| (f, ue8m0)),
        _ => None,
    };
    let plan = DevicePlan::new(g, e, k, ids, valid, m, counters, if fp8.is_some() { 4 } else { 1 })?;
    let (large, max_rows) = if m > DEVICE_ONLY_MAX_ROWS {
        let large = g.profiled("moe_plan_sync", || plan.large_groups(g, e, kernels.cublas_rows))?;
        (large, kernels.cublas_rows)
    } else {
        (vec![], i32::MAX as usize)
    };
    let slots = plan.capacity;
    let inter = bank.gate.rows;
    let gu = g.alloc(slots * 2 * inter * 4)?;
    let act = g.alloc(slots * inter * 4)?;
    let y = g.alloc(slots * width * 4)?;
    let tensor_cores = !kernels.simt_linear() && mma_fits(inter, width) && mma_fits(width, inter);
    let mma = match slots.div_ceil(e.max(1)) {
        0..=2 => kernels::grouped_fp8_mma_n1,
        3..=6 => kernels::grouped_fp8_mma_n2,
        7..=16 => kernels::grouped_fp8_mma_n4,
        _ => kernels::grouped_fp8_mma_n8,
    };
    // Every group up to max_rows in one launch, weights streamed once per group. Small decode
    // steps split each expert's k chunks so the few groups still fill the GPU (each split into
    // its own slab, added up in order afterwards).
    let grouped = |out: u64, ldy: usize, input: &GroupedInput, rows: u64, s: &Stacked| -> Result<()> {
        let max_splits = if !tensor_cores || m > DEVICE_ONLY_MAX_ROWS {
            1
        } else {
            usize::MAX
        };
        let blocks = s.rows.div_ceil(64) * plan.groups;
        let resident = mma.resident_blocks(g, 128, 0)?;
        let t = SplitK::new(
            g,
            blocks,
            resident,
            s.cols / 128,
            max_splits,
            out,
            ldy,
            slots,
            s.rows,
            false,
        )?;
        // The GEMV's arguments; the tensor-core kernel takes three more (split k, scales).
        let gemv = (
            ptr(t.out),
            int(t.ldo),
            ptr(input.values),
            int(s.cols),
            ptr(rows),
            ptr(s.data.addr),
            ptr(s.scales.addr),
            s.stride() as u64,
            s.scale_stride() as u64,
            ptr(plan.group_expert),
            ptr(plan.offsets),
            int(s.rows),
            int(s.cols),
            int(max_rows),
        );
        if tensor_cores {
            let grid = (s.rows.div_ceil(64) as u32, plan.groups as u32, t.splits as u32);
            let args = gemv.then(int(t.mode)).then(t.stride).then(ptr(input.scales));
            mma.launch(g, grid, 128, 0, args)?;
        } else {
            let grid = (s.rows.div_ceil(8) as u32, plan.groups as u32, 1);
            kernels::grouped_gemv_fp8.launch(g, grid, 256, 0, gemv)?;
        }
        t.finish(g)
    };
    // The f32 (quantised) rows feed only cuBLAS groups on bf16 (no cuBLASLt) and the GEMV.
    let needs_wide = !large.is_empty() && fp8.is_none();
    let xin = GroupedInput::new(g, x.addr, (m, width), tensor_cores, needs_wide, input_quant)?;
    let shared = shared.map(SharedExpert::start).transpose()?;
    let up_out = gu.addr + (inter * 4) as u64;
    grouped(gu.addr, 2 * inter, &xin, plan.x_rows, &bank.gate)?;
    grouped(up_out, 2 * inter, &xin, plan.x_rows, &bank.up)?;
    // Large groups (prefill): cuBLASLt's block-scaled FP8 products on the slots' rows quantised
    // per 128 channels, else cuBLAS on the rows gathered as bf16.
    let fp8 = fp8.filter(|_| !large.is_empty());
    let groups = Some((plan.offsets, plan.groups));
    if let Some((fp8, ue8m0)) = fp8 {
        let xq = quantize_routed_rows(g, (x, xq), m, width, &plan, slots, groups, ue8m0)?;
        fp8_groups(g, fp8, &large, &bank.gate, &xq, gu.addr, 2 * inter)?;
        fp8_groups(g, fp8, &large, &bank.up, &xq, up_out, 2 * inter)?;
    } else if !large.is_empty() {
        let xg = g.alloc(slots * width * 2)?;
        kernels::gather_rows_bf16.launch(
            g,
            (slots as u32, 1, 1),
            256,
            0,
            (ptr(xg.addr), ptr(xin.wide), int(width), ptr(plan.x_rows), int(width)),
        )?;
        cublas_groups(g, &large, &bank.gate, xg.addr, width, gu.addr, 2 * inter)?;
        cublas_groups(g, &large, &bank.up, xg.addr, width, up_out, 2 * inter)?;
    }
    kernels::swiglu.launch_1d(g, slots * inter, (ptr(act.addr), ptr(gu.addr), int(slots), int(inter)))?;
    let ain = GroupedInput::new(g, act.addr, (slots, inter), tensor_cores, needs_wide, input_quant)?;
    grouped(y.addr, width, &ain, 0, &bank.down)?;
    if let Some((fp8, ue8m0)) = fp8 {
        let aq = QuantizedRows::new(g, act.addr, inter, None, slots, inter, groups, ue8m0)?;
        fp8_groups(g, fp8, &large, &bank.down, &aq, y.addr, width)?;
    } else if !large.is_empty() {
        let ab = g.to_bf16(ain.wide, slots * inter)?;
        cublas_groups(g, &large, &bank.down, ab.addr, inter, y.addr, width)?;
    }
    combine(g, h, &y, RowFormat::F32, width, &plan, weights, m, k, shared)
}

/// The activation operand of the grouped kernels, `n` rows of `k`: for the tensor cores bf16
/// values (with `scales` when quantised: e4m3 values and their per-128 scales), for the GEMV f32;
/// `wide` is f32 for the cuBLAS groups (the quantised values when quantised), made only when
/// `needs_wide` (cuBLAS groups in the step, or the GEMV).
struct GroupedInput {
    values: u64,
    scales: u64,
    wide: u64,
    _held: Vec<DeviceBuf>,
}

impl GroupedInput {
    fn new(
        g: &Gpu,
        x: u64,
        (n, k): (usize, usize),
        tensor_cores: bool,
        needs_wide: bool,
        input_quant: Option<bool>,
    ) -> Result<Self> {
        let wide = match input_quant {
            Some(ue8m0) if needs_wide || !tensor_cores => Some(quantize_rows_f32(g, x, n, k, ue8m0)?),
            _ => None,
        };
        let wide_addr = wide.as_ref().map_or(x, |b| b.addr);
        let mut held: Vec<DeviceBuf> = wide.into_iter().collect();
        let (values, scales) = match (tensor_cores, input_quant) {
            (true, Some(ue8m0)) => {
                let (v, s) = quantize_rows_bf16(g, x, n, k, ue8m0)?;
                let addrs = (v.addr, s.addr);
                held.extend([v, s]);
                addrs
            }
            (true, None) => {
                let b = g.to_bf16(x, n * k)?;
                let addr = b.addr;
                held.push(b);
                (addr, 0)
            }
            (false, _) => (wide_addr, 0),
        };
        Ok(GroupedInput {
            values,
            scales,
            wide: wide_addr,
            _held: held,
        })
    }
}

/// Steps of at least this many tokens quantise their rows once and gather the FP8 bytes for the
/// experts' slots; smaller ones (decode) quantise the gathered rows in one launch.
const QUANTISE_ONCE_MIN_ROWS: usize = 512;

/// The routed slots' input rows (token `x_rows[s]` of the `m` rows of `x`) quantised per 128
/// channels, their scales laid out per expert group: gathered from the rows the norm quantised
/// where it did (`xq`; the same codes and scales).
#[allow(clippy::too_many_arguments)]
fn quantize_routed_rows(
    g: &Gpu,
    (x, xq): (&DeviceBuf, Option<&QuantizedRows>),
    m: usize,
    width: usize,
    plan: &DevicePlan,
    slots: usize,
    groups: Option<(u64, usize)>,
    ue8m0: bool,
) -> Result<QuantizedRows> {
    match xq {
        Some(xq) if xq.k == width => xq.gather(g, m, plan.x_rows, slots, groups),
        _ if m >= QUANTISE_ONCE_MIN_ROWS => {
            QuantizedRows::gathered(g, x.addr, width, m, plan.x_rows, slots, width, groups, ue8m0)
        }
        _ => QuantizedRows::new(g, x.addr, width, Some(plan.x_rows), slots, width, groups, ue8m0),
    }
}

/// [`run_bank`] on Hopper: each matrix kind in one launch of the FP8 wgmma kernel over every
/// group, the tiles listed on the device (no host round trip, at any step size), their rows
/// written in `rows`.
#[allow(clippy::too_many_arguments)]
fn wgmma_bank(
    g: &Gpu,
    bank: &ExpertBank,
    plan: &DevicePlan,
    tiles: &ExpertTiles,
    x: (&DeviceBuf, Option<&QuantizedRows>),
    h: &DeviceBuf,
    m: usize,
    k: usize,
    weights: u64,
    ue8m0: bool,
    rows: RowFormat,
    shared: Option<SharedExpert<'_>>,
) -> Result<()> {
    let (e, slots, width, inter) = (bank.experts, plan.capacity, bank.gate.cols, bank.gate.rows);
    let groups = Some((plan.offsets, plan.groups));
    let product = |s: &Stacked, input: &QuantizedRows, out: u64, ldy: usize| {
        expert_wgmma::grouped_fp8(
            g,
            tiles,
            plan.group_expert,
            plan.offsets,
            s,
            e,
            input,
            slots,
            out,
            rows,
            ldy,
        )
    };
    let xq = quantize_routed_rows(g, x, m, width, plan, slots, groups, ue8m0)?;
    let gu = g.alloc(slots * 2 * inter * rows.bytes())?;
    let shared = shared.map(SharedExpert::start).transpose()?;
    product(&bank.gate, &xq, gu.addr, 2 * inter)?;
    product(&bank.up, &xq, gu.addr + (inter * rows.bytes()) as u64, 2 * inter)?;
    // The activations quantised where SwiGLU makes them (no f32 pass through memory).
    let aq = match rows {
        RowFormat::F32 => QuantizedRows::swiglu(g, SplitSums::whole(gu.addr), slots, inter, groups, ue8m0, None)?,
        RowFormat::Bf16 => QuantizedRows::swiglu_bf16(g, gu.addr, slots, inter, groups, ue8m0)?,
    };
    let y = g.alloc(slots * width * rows.bytes())?;
    product(&bank.down, &aq, y.addr, width)?;
    combine(g, h, &y, rows, width, plan, weights, m, k, shared)
}

/// The shared expert's output rows, made on a side lane beside the routed experts
/// ([`Gpu::fork`]): [`combine`] waits for the lane and adds them after the routed experts' sum.
pub(crate) struct SharedRows<'g> {
    forked: Forked<'g>,
    rows: DeviceBuf,
}

/// The shared expert of a MoE layer over the normed rows `x` (quantised already where `xq` has
/// them), not yet queued: the routed experts' path starts it on a side lane where their first
/// product is queued.
pub(crate) struct SharedExpert<'a> {
    model: &'a CudaModel,
    mlp: &'a Mlp,
    x: &'a DeviceBuf,
    xq: Option<&'a QuantizedRows>,
    m: usize,
}

impl<'a> SharedExpert<'a> {
    /// Queued on side lane 0, into rows of its own.
    fn start(self) -> Result<SharedRows<'a>> {
        let g = &self.model.gpu;
        if let Some(fp8) = g.fp8_gemm()? {
            fp8.reserve(g, 1)?;
        }
        // Made on the main stream before the fork, so it outlives the lane's work.
        let rows = g.alloc(self.m * self.model.config.hidden_size * 4)?;
        let (forked, ()) = g.fork(0, || {
            self.model.mlp(self.mlp, self.x, self.xq, rows.addr, self.m, false)
        })?;
        Ok(SharedRows { forked, rows })
    }

    /// Run on the main stream, added into `h` (where the routed experts ran elsewhere).
    fn add_into(self, h: u64) -> Result<()> {
        self.model.mlp(self.mlp, self.x, self.xq, h, self.m, true)
    }
}

/// `h[t] += Σ_j weights[t, j] · y[slot of (t, j)]`: the experts' rows (in `y_format`) back to
/// their tokens; then `h[t] += shared[t]` where the shared expert's rows were made beside the
/// routing.
#[allow(clippy::too_many_arguments)]
fn combine(
    g: &Gpu,
    h: &DeviceBuf,
    y: &DeviceBuf,
    y_format: RowFormat,
    width: usize,
    plan: &DevicePlan,
    weights: u64,
    m: usize,
    k: usize,
    shared: Option<SharedRows<'_>>,
) -> Result<()> {
    // The main stream waits for the shared expert's lane here; its rows are freed after the
    // combine, in stream order, when `shared` drops at the end.
    let mut shared = shared;
    if let Some(s) = shared.as_mut() {
        s.forked.join()?;
    }
    let kernel = match y_format {
        RowFormat::F32 => kernels::combine_experts,
        RowFormat::Bf16 => kernels::combine_experts_bf16,
    };
    kernel.launch(
        g,
        (m as u32, width.div_ceil(4 * COMBINE_THREADS) as u32, 1),
        COMBINE_THREADS as u32,
        0,
        (
            ptr(h.addr),
            ptr(y.addr),
            ptr(plan.slot_of),
            ptr(weights),
            int(k),
            int(width),
            ptr(shared.as_ref().map_or(0, |s| s.rows.addr)),
        ),
    )
}

/// Whether cuBLASLt's block-scaled products take this bank: every expert's weights and scales
/// start 16-byte aligned (not so for models narrower than 512, whose experts have 2 or 3 scale
/// blocks) and the shapes are whole 128-wide blocks.
fn fp8_fits(bank: &ExpertBank) -> bool {
    [&bank.gate, &bank.up, &bank.down].iter().all(|s| {
        Fp8Gemm::takes_weight(s.rows, s.cols) && s.stride() % ALIGN == 0 && (s.scale_stride() * 4) % ALIGN == 0
    })
}

/// `out[slots] = input[slots] · W_eᵀ` through cuBLASLt's block-scaled FP8 product for each large
/// group (expert e), the weights read as stored; spread over side streams like [`cublas_groups`].
fn fp8_groups(
    g: &Gpu,
    fp8: &Fp8Gemm,
    large: &[HostGroup],
    s: &Stacked,
    input: &QuantizedRows,
    out: u64,
    ldy: usize,
) -> Result<()> {
    let lanes = EXPERT_LANES.min(large.len());
    fp8.reserve(g, lanes)?;
    let k = input.k;
    g.fan_out(lanes, |lane| {
        for grp in large.iter().skip(lane).step_by(lanes) {
            fp8.gemm(
                g,
                out + (grp.first * ldy * 4) as u64,
                ldy,
                input.data.at(grp.first * k),
                input.scales.at(grp.first * (k / 128) * 4),
                s.data.at(grp.expert * s.stride()),
                s.scales.at(grp.expert * s.scale_stride() * 4),
                grp.rows(),
                s.rows,
                k,
                false,
            )?;
        }
        Ok(())
    })
}

/// `out[slots] = input[slots] · W_eᵀ` through cuBLAS for each large group (expert e), the
/// expert dequantised to bf16 first. One expert's GEMM of ~128 rows fills a few SMs, so the
/// groups are spread over side streams, each with its own scratch. Rows are slots: `input`
/// bf16 with row stride `ldx`, `out` f32 with row stride `ldy`.
fn cublas_groups(
    g: &Gpu,
    large: &[HostGroup],
    s: &Stacked,
    input: u64,
    ldx: usize,
    out: u64,
    ldy: usize,
) -> Result<()> {
    if large.is_empty() {
        return Ok(());
    }
    let lanes = EXPERT_LANES.min(large.len());
    let scratch = g.alloc(lanes * s.stride() * 2)?;
    g.fan_out(lanes, |lane| {
        let w = scratch.at(lane * s.stride() * 2);
        for grp in large.iter().skip(lane).step_by(lanes) {
            crate::weights::dequant_fp8(
                g,
                w,
                s.data.at(grp.expert * s.stride()),
                s.scales.at(grp.expert * s.scale_stride() * 4),
                s.rows,
                s.cols,
            )?;
            g.gemm_bf16(
                out + (grp.first * ldy * 4) as u64,
                ldy,
                input + (grp.first * ldx * 2) as u64,
                w,
                grp.rows(),
                s.rows,
                s.cols,
                false,
            )?;
        }
        Ok(())
    })
}

impl CudaModel {
    /// Routed and shared experts, added into `h` (x's rows quantised already where `xq` has them,
    /// for the shared expert). `valid` points at the number of real rows (the rest pad a graphed
    /// step). Returns the chosen experts `[m, top_k]` when `want_routes`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn moe(
        &self,
        layer: usize,
        moe: &Moe,
        x: &DeviceBuf,
        xq: Option<&QuantizedRows>,
        h: &DeviceBuf,
        m: usize,
        valid: u64,
        want_routes: bool,
    ) -> Result<Option<Vec<u32>>> {
        let g = &self.gpu;
        let k = self.config.num_experts_per_tok;
        let e = self.config.n_routed_experts;
        let logits = g.alloc(m * e * 4)?;
        self.linear(logits.addr, e, x.addr, m, &moe.router, false)?;
        // The shared expert does not depend on the routing: where the routed experts run here, it
        // is queued on a side lane beside their first product, into rows of its own that the
        // routed combine adds after the routed sum (the same additions in the same order). Both
        // stream weights, so neither waits on the other's ramp and tail; queued earlier, beside
        // the router's chain of small kernels, it slowed that chain threefold.
        let mut shared = moe.shared.as_ref().map(|mlp| SharedExpert {
            model: self,
            mlp,
            x,
            xq,
            m,
        });
        let counters = BankCounters {
            counts: self.moe_stats.counts_addr(layer),
            touched: self.moe_stats.touched_addr(),
        };
        let gate = Gate::of(&self.config);
        // A small step whose routed experts all run here on the wgmma kernel routes, plans and
        // lists its tiles in one launch.
        if let (Some(bank), None, None) = (&moe.experts, &self.host_experts, &self.nccl_experts) {
            if m <= self.kernels.route_plan_rows && bank.experts == e && RoutedPlan::takes(e, &gate, m) {
                if let Some(ue8m0) = self.kernels.wgmma_takes(g, bank, m)? {
                    let routed = RoutedPlan::new(g, logits.addr, moe.bias.addr, m, e, &gate, valid, &counters)?;
                    wgmma_bank(
                        g,
                        bank,
                        &routed.plan,
                        &routed.tiles,
                        (x, xq),
                        h,
                        m,
                        k,
                        routed.weights.addr,
                        ue8m0,
                        self.kernels.wgmma_out,
                        shared.take(),
                    )?;
                    return match want_routes {
                        true => download_routes(g, &routed.ids, m * k).map(Some),
                        false => Ok(None),
                    };
                }
            }
        }
        let (ids, weights) = route_logits(g, logits.addr, moe.bias.addr, m, e, &gate)?;
        // The host path has the chosen experts on the host already; the device path reads them
        // back only when asked.
        let host_routes = match (&moe.experts, &self.host_experts) {
            _ if self.nccl_experts.is_some() => {
                self.nccl_routed_experts(layer, x, h, m, &ids, &weights, &counters)?;
                None
            }
            (Some(bank), None) => {
                run_bank(
                    g,
                    self.kernels,
                    bank,
                    x,
                    xq,
                    h,
                    m,
                    k,
                    ids.addr,
                    weights.addr,
                    valid,
                    &counters,
                    shared.take(),
                )?;
                None
            }
            (bank, Some(experts)) => {
                let local = bank.as_ref().map(|bank| (bank, &counters));
                Some(self.host_routed_experts(experts.as_ref(), local, layer, x, h, m, valid, &ids, &weights)?)
            }
            (None, None) => anyhow::bail!("layer {layer}: the routed experts are neither on this GPU nor reachable"),
        };
        let routes = match (want_routes, host_routes) {
            (false, _) => None,
            (true, Some(chosen)) => Some(chosen),
            (true, None) => Some(download_routes(g, &ids, m * k)?),
        };
        // Not taken by the routed experts' path (they ran elsewhere): after them, on this stream.
        if let Some(s) = shared {
            s.add_into(h.addr)?;
        }
        Ok(routes)
    }

    /// The routed experts through `experts` (remote shards): the normed rows, the chosen experts
    /// and their weights go to the host, the executor's sums come back (both ways through
    /// page-locked memory) and are added into `h`. With a `local` bank (some experts held here),
    /// those slots stay off the host's request and run on the GPU while the host waits on the
    /// shards. Returns every chosen expert, `[m, top_k]`.
    #[allow(clippy::too_many_arguments)]
    fn host_routed_experts(
        &self,
        experts: &(dyn ExpertExecutor + Send),
        local: Option<(&ExpertBank, &BankCounters)>,
        layer: usize,
        x: &DeviceBuf,
        h: &DeviceBuf,
        m: usize,
        valid: u64,
        ids: &DeviceBuf,
        weights: &DeviceBuf,
    ) -> Result<Vec<u32>> {
        let g = &self.gpu;
        let (k, width) = (self.config.num_experts_per_tok, self.config.hidden_size);
        let partial = self.partial_bank.as_ref();
        let parts = [
            (ids.addr, m * k * 4),
            (weights.addr, m * k * 4),
            (x.addr, m * width * 4),
        ];
        let y = g.alloc(m * width * 4)?;
        let bank_ids = match (local, partial) {
            (Some(_), Some(p)) => {
                let out = g.alloc(m * k * 4)?;
                kernels::bank_expert_ids.launch_1d(
                    g,
                    m * k,
                    (
                        ptr(out.addr),
                        ptr(ids.addr),
                        ptr(p.bank_of.addr),
                        int(self.config.n_routed_experts),
                        int(m * k),
                    ),
                )?;
                Some(out)
            }
            _ => None,
        };
        let run_local = || match local {
            Some((bank, counters)) => {
                let chosen = bank_ids.as_ref().map_or(ids.addr, |b| b.addr);
                run_bank(
                    g,
                    self.kernels,
                    bank,
                    x,
                    None,
                    h,
                    m,
                    k,
                    chosen,
                    weights.addr,
                    valid,
                    counters,
                    None,
                )
            }
            None => Ok(()),
        };
        let (routes, sent) = g.round_trip(&parts, Some((y.addr, m * width)), run_local, |staged, sums| {
            let routes = TokenRoutes {
                k,
                experts: staged.i32(0).iter().map(|&v| v as u32).collect(),
                weights: staged.f32(1).to_vec(),
            };
            // Slots of experts held here stay off the request (all of them with a full bank).
            let here = |e: u32| local.is_some() && partial.is_none_or(|p| p.held.get(e as usize) == Some(&true));
            let sent = experts.routed_experts_into(layer, staged.f32(2), &routes.only(|e| !here(e)), sums);
            (routes, sent)
        })?;
        if let Ok(mut counts) = self.host_counts.lock() {
            count_routes(&mut counts, layer, self.config.n_routed_experts, &routes);
        }
        sent.with_context(|| format!("routed experts of layer {layer}"))?;
        kernels::add_f32.launch_1d(g, m * width, (ptr(h.addr), ptr(y.addr), (m * width) as u64))?;
        Ok(routes.experts)
    }

    /// The routed experts on expert shards over NCCL ([`crate::data_plane`]): every shard that
    /// computes any expert gets the layer's rows, its share of the routes and their weights, and
    /// sends back its partial sums, which are added into `h`. All of it is queued on the stream;
    /// the host only announces each exchange to the shard.
    #[allow(clippy::too_many_arguments)]
    fn nccl_routed_experts(
        &self,
        layer: usize,
        x: &DeviceBuf,
        h: &DeviceBuf,
        m: usize,
        ids: &DeviceBuf,
        weights: &DeviceBuf,
        counters: &BankCounters,
    ) -> Result<()> {
        let Some((shards, owner)) = &self.nccl_experts else {
            anyhow::bail!("layer {layer}: no NCCL data plane");
        };
        let g = &self.gpu;
        let (k, width, e) = (
            self.config.num_experts_per_tok,
            self.config.hidden_size,
            self.config.n_routed_experts,
        );
        kernels::count_routes.launch_1d(g, m * k, (ptr(counters.counts), ptr(ids.addr), int(e), int(m * k)))?;
        let exchange = crate::data_plane::LayerExchange { layer, rows: m, k };
        let bytes = exchange.bytes(width);
        let rows = g.to_bf16(x.addr, m * width)?;
        let used = shards.shards_in_use();
        // Freed in stream order, after the transfers that read and write them.
        let sums = used
            .iter()
            .map(|_| Ok((g.alloc(bytes.ids)?, g.alloc(bytes.sums)?)))
            .collect::<Result<Vec<_>>>()?;
        let exchange_with = |i: usize| -> Result<()> {
            let s = used[i];
            let (their_ids, back) = &sums[i];
            kernels::peer_expert_ids.launch_1d(
                g,
                m * k,
                (
                    ptr(their_ids.addr),
                    ptr(ids.addr),
                    ptr(owner.addr),
                    int(s),
                    int(e),
                    int(m * k),
                ),
            )?;
            let comm = shards.shards[s]
                .announce(exchange)
                .with_context(|| format!("layer {layer}: expert shard {s}"))?;
            let peer = crate::data_plane::SHARD_SIDE;
            // Two groups, as the shard queues them: its receives, then (after its experts) its send.
            comm.exchange(
                g,
                &[
                    (peer, rows.addr, bytes.rows),
                    (peer, their_ids.addr, bytes.ids),
                    (peer, weights.addr, bytes.weights),
                ],
                &[],
            )
            .and_then(|()| comm.exchange(g, &[], &[(peer, back.addr, bytes.sums)]))
            .map_err(|e| {
                shards.shards[s].failed(&format!("{e:#}"));
                e
            })
            .with_context(|| format!("layer {layer}: exchange with expert shard {s}"))
        };
        // Each shard's exchange on a stream of its own: the shards compute at once, and a shard
        // busy with another attention rank's layer holds up only its own exchange (one stream
        // for all would wait on each shard in turn).
        match used.len() {
            1 => exchange_with(0)?,
            n => g.fan_out(n, exchange_with)?,
        }
        for (_, back) in &sums {
            kernels::add_bf16_f32.launch_1d(g, m * width, (ptr(h.addr), ptr(back.addr), (m * width) as u64))?;
        }
        Ok(())
    }
}

/// What the routing kernels take: experts and their groups.
struct RouteShape {
    experts: usize,
    groups: usize,
    top_k: usize,
}

impl RouteShape {
    fn new(experts: usize, gate: &Gate) -> Result<Self> {
        ensure!(
            experts <= 1024 && gate.n_group > 0 && experts.is_multiple_of(gate.n_group) && gate.top_k <= 32,
            "routing takes at most 1,024 experts in equal groups and a top-k of at most 32"
        );
        Ok(RouteShape {
            experts,
            groups: gate.n_group,
            top_k: gate.top_k,
        })
    }

    /// Shared memory one row's routing works in (`route_row`): scores and biased scores per
    /// expert, a score and a flag per group, the choices.
    fn shared_floats(&self) -> usize {
        2 * self.experts + 2 * self.groups + self.top_k
    }

    /// Shared memory one warp's routing of a row works in (`route_row_warp`): scores and biased
    /// scores per expert, a score per group, the choices.
    fn warp_floats(&self) -> usize {
        2 * self.experts + self.groups + self.top_k
    }
}

/// The `pairs` chosen experts at `ids`, to the host.
fn download_routes(g: &Gpu, ids: &DeviceBuf, pairs: usize) -> Result<Vec<u32>> {
    Ok(g.download::<i32>(ids.addr, pairs)?.iter().map(|&v| v as u32).collect())
}

/// The experts `m` tokens choose from their router logits (`[m, n_experts]` f32 at `logits`)
/// and the selection bias (`[n_experts]` f32 at `bias`), on the GPU as [`Gate::route_token`]
/// on the CPU: the chosen experts, ascending, and their weights, `[m, top_k]` each.
pub fn route_logits(
    g: &Gpu,
    logits: u64,
    bias: u64,
    m: usize,
    n_experts: usize,
    gate: &Gate,
) -> Result<(DeviceBuf, DeviceBuf)> {
    let routing = RouteShape::new(n_experts, gate)?;
    let k = gate.top_k;
    let ids = g.alloc(m * k * 4)?;
    let weights = g.alloc(m * k * 4)?;
    let smem = routing.shared_floats() * 4;
    kernels::route_topk.launch(
        g,
        (m as u32, 1, 1),
        n_experts.next_multiple_of(32) as u32,
        smem as u32,
        (
            ptr(ids.addr),
            ptr(weights.addr),
            ptr(logits),
            ptr(bias),
            int(n_experts),
            int(gate.n_group),
            int(gate.topk_group),
            int(k),
            int(gate.normalize as usize),
            gate.scaling,
        ),
    )?;
    Ok((ids, weights))
}

/// Most rows of a step that routes, plans and lists its tiles in one launch (`route_plan`) by
/// default: decode steps, where the three kernels it replaces are serial latency.
const ROUTE_PLAN_ROWS: usize = 8;

/// Threads of the expert plan's one block (`moe_plan`): a thread per expert; one chunk of the
/// pairs per warp, each counting its pairs per expert in shared memory.
const PLAN_THREADS: usize = 1024;

/// Shared memory of the plan's per-warp counts for `e` experts.
fn plan_shared_bytes(e: usize) -> usize {
    PLAN_THREADS / 32 * e * 4
}

/// A small step's routing, its expert plan and the wgmma kernel's tiles, made in one launch
/// (`route_plan`): the bits of [`route_logits`], [`DevicePlan::new`] (groups unaligned) and
/// [`ExpertTiles::new`], where those took three launches, each some µs of serial latency on a
/// decode step's critical path.
struct RoutedPlan {
    ids: DeviceBuf,
    weights: DeviceBuf,
    plan: DevicePlan,
    tiles: ExpertTiles,
}

impl RoutedPlan {
    /// Whether `route_plan` takes a step of `m` rows over a bank of all `e` experts: a warp's
    /// lanes hold a row's experts, a thread of its block each (row, choice) pair, and each
    /// expert's pairs are one tile of the wgmma kernel.
    fn takes(e: usize, gate: &Gate, m: usize) -> bool {
        (1..=GX_TOKENS).contains(&m)
            && e <= 32 * ROUTE_LANE_EXPERTS
            && gate.n_group <= 32
            && m * gate.top_k <= ROUTE_PLAN_THREADS
    }

    /// Routes `m` rows from their router `logits` (`[m, e]` f32) and the selection `bias`, and
    /// plans the first `*valid` rows' choices over a bank of all `e` experts; where
    /// [`Self::takes`] the step.
    #[allow(clippy::too_many_arguments)]
    fn new(
        g: &Gpu,
        logits: u64,
        bias: u64,
        m: usize,
        e: usize,
        gate: &Gate,
        valid: u64,
        counters: &BankCounters,
    ) -> Result<Self> {
        let routing = RouteShape::new(e, gate)?;
        ensure!(
            Self::takes(e, gate, m),
            "route_plan takes up to {} experts in up to 32 groups and {ROUTE_PLAN_THREADS} (row, choice) pairs, not {e} experts in {} groups and {m} rows of {}",
            32 * ROUTE_LANE_EXPERTS,
            gate.n_group,
            gate.top_k
        );
        let k = gate.top_k;
        let (ids, weights) = (g.alloc(m * k * 4)?, g.alloc(m * k * 4)?);
        let plan = DevicePlan::alloc(g, e, k, m, 1)?;
        let tiles = ExpertTiles::unlisted(g, plan.groups, plan.capacity)?;
        // The choices, then a routing slot per warp routing a row at a time.
        let warp_floats = routing.warp_floats();
        let routing_warps = m.min(ROUTE_PLAN_THREADS / 32);
        kernels::route_plan.launch(
            g,
            (1, 1, 1),
            ROUTE_PLAN_THREADS as u32,
            ((m * k + routing_warps * warp_floats) * 4) as u32,
            (
                ptr(ids.addr),
                ptr(weights.addr),
                ptr(logits),
                ptr(bias),
                int(e),
                int(gate.n_group),
                int(gate.topk_group),
                int(k),
                int(gate.normalize as usize),
                gate.scaling,
                int(warp_floats),
                ptr(plan.group_expert),
                ptr(plan.offsets),
                ptr(plan.x_rows),
                ptr(plan.slot_of),
                ptr(counters.counts),
                ptr(counters.touched),
                ptr(valid),
                int(m),
                int(plan.groups),
                int(plan.capacity),
                ptr(tiles.addr()),
                int(tiles.max()),
            ),
        )?;
        Ok(RoutedPlan {
            ids,
            weights,
            plan,
            tiles,
        })
    }
}

/// A step's routing and expert plan as the host sees them: what [`plan_routes`] downloads.
#[derive(Debug, PartialEq, Eq)]
pub struct PlannedRoutes {
    pub ids: Vec<i32>,
    /// The weights' bits.
    pub weights: Vec<u32>,
    pub group_expert: Vec<i32>,
    pub offsets: Vec<i32>,
    pub x_rows: Vec<i32>,
    pub slot_of: Vec<i32>,
    /// The wgmma kernel's tiles: (group, first slot, slots) each.
    pub tiles: Vec<i32>,
    /// What the plan added to the counters: tokens per expert, then experts touched.
    pub counts: Vec<u32>,
}

/// Routes `m` rows (`*valid` real) from their router logits over a bank of all `e` experts and
/// plans them for the wgmma kernel, in one launch (`route_plan`) or in the three it replaces,
/// and downloads it all: for the test that both give the same bits.
#[allow(clippy::too_many_arguments)]
pub fn plan_routes(
    g: &Gpu,
    logits: u64,
    bias: u64,
    m: usize,
    e: usize,
    gate: &Gate,
    valid: u64,
    one_launch: bool,
) -> Result<PlannedRoutes> {
    let counts = g.upload(&vec![0u32; e + 1])?;
    let counters = BankCounters {
        counts: counts.addr,
        touched: counts.at(e * 4),
    };
    let routed = if one_launch {
        RoutedPlan::new(g, logits, bias, m, e, gate, valid, &counters)?
    } else {
        let (ids, weights) = route_logits(g, logits, bias, m, e, gate)?;
        let plan = DevicePlan::new(g, e, gate.top_k, ids.addr, valid, m, &counters, 1)?;
        let tiles = ExpertTiles::new(g, plan.offsets, plan.groups, plan.capacity)?;
        RoutedPlan {
            ids,
            weights,
            plan,
            tiles,
        }
    };
    let (k, plan) = (gate.top_k, &routed.plan);
    Ok(PlannedRoutes {
        ids: g.download(routed.ids.addr, m * k)?,
        weights: g.download(routed.weights.addr, m * k)?,
        group_expert: g.download(plan.group_expert, plan.groups)?,
        offsets: g.download(plan.offsets, plan.groups + 1)?,
        x_rows: g.download(plan.x_rows, plan.capacity)?,
        slot_of: g.download(plan.slot_of, m * k)?,
        tiles: g.download(routed.tiles.addr(), 3 * routed.tiles.max())?,
        counts: g.download(counts.addr, e + 1)?,
    })
}

/// Token rows grouped by expert on the GPU (kernel `moe_plan`): slots `offsets[g]..offsets[g+1]`
/// belong to expert `group_expert[g]`, active experts in index order, empty groups after them.
struct DevicePlan {
    _buf: DeviceBuf,
    group_expert: u64,
    offsets: u64,
    /// Token row of each slot.
    x_rows: u64,
    /// Slot of each (token, choice), `[m, top_k]`; -1 for padding rows.
    slot_of: u64,
    /// Groups the grouped kernels cover: at most one per expert and per routed pair.
    groups: usize,
    /// Slots the groups may span: the routed pairs, plus each group's rounding up.
    capacity: usize,
}

/// One expert's slots, read back on the host for the cuBLAS path.
struct HostGroup {
    expert: usize,
    first: usize,
    end: usize,
}

impl HostGroup {
    fn rows(&self) -> usize {
        self.end - self.first
    }
}

impl DevicePlan {
    /// Groups the `[m, k]` slots of `chosen` (bank indices) by expert, adding to `counters`; each
    /// group's slots start on a multiple of `align`.
    #[allow(clippy::too_many_arguments)]
    fn new(
        g: &Gpu,
        e: usize,
        k: usize,
        chosen: u64,
        valid: u64,
        m: usize,
        counters: &BankCounters,
        align: usize,
    ) -> Result<Self> {
        let plan = Self::alloc(g, e, k, m, align)?;
        kernels::moe_plan.launch(
            g,
            (1, 1, 1),
            PLAN_THREADS as u32,
            plan_shared_bytes(e) as u32,
            (
                ptr(plan.group_expert),
                ptr(plan.offsets),
                ptr(plan.x_rows),
                ptr(plan.slot_of),
                ptr(counters.counts),
                ptr(counters.touched),
                ptr(chosen),
                ptr(valid),
                int(m),
                int(k),
                int(e),
                int(plan.groups),
                int(align),
                int(plan.capacity),
            ),
        )?;
        Ok(plan)
    }

    /// The plan's buffers for `m` rows of `k` choices among `e` experts, not yet written.
    fn alloc(g: &Gpu, e: usize, k: usize, m: usize, align: usize) -> Result<Self> {
        ensure!(e <= 1024, "the expert plan takes at most 1024 experts a bank, not {e}");
        let groups = e.min(m * k);
        let capacity = m * k + (align - 1) * groups;
        let words = groups + (groups + 1) + capacity + m * k;
        let buf = g.alloc(words * 4)?;
        Ok(DevicePlan {
            group_expert: buf.addr,
            offsets: buf.at(groups * 4),
            x_rows: buf.at((2 * groups + 1) * 4),
            slot_of: buf.at((2 * groups + 1 + capacity) * 4),
            _buf: buf,
            groups,
            capacity,
        })
    }

    /// The groups with more than `limit` rows (one copy back to the host).
    fn large_groups(&self, g: &Gpu, n_experts: usize, limit: usize) -> Result<Vec<HostGroup>> {
        let experts: Vec<i32> = g.download(self.group_expert, self.groups)?;
        let offsets: Vec<i32> = g.download(self.offsets, self.groups + 1)?;
        let mut large = Vec::new();
        for (g, w) in offsets.windows(2).enumerate() {
            let (first, end) = (w[0] as usize, w[1] as usize);
            if end > first + limit {
                let expert = experts[g];
                ensure!(
                    expert >= 0 && (expert as usize) < n_experts,
                    "expert grouping produced expert {expert}"
                );
                large.push(HostGroup {
                    expert: expert as usize,
                    first,
                    end,
                });
            }
        }
        Ok(large)
    }
}

/// Expert counters kept on the GPU (`moe_plan` adds to them), so steps never wait to count:
/// tokens per routed expert and layer since the last take, and experts touched by the last step.
pub(crate) struct MoeStats {
    buf: DeviceBuf,
    layers: usize,
    experts: usize,
}

impl MoeStats {
    pub(crate) fn new(gpu: &Gpu, layers: usize, experts: usize) -> Result<Self> {
        let buf = gpu.alloc((layers * experts + 1) * 4)?;
        gpu.zero(buf.addr, buf.bytes)?;
        Ok(MoeStats { buf, layers, experts })
    }

    pub(crate) fn counts_addr(&self, layer: usize) -> u64 {
        self.buf.at(layer * self.experts * 4)
    }

    pub(crate) fn touched_addr(&self) -> u64 {
        self.buf.at(self.layers * self.experts * 4)
    }

    pub(super) fn reset_touched(&self, gpu: &Gpu) -> Result<()> {
        gpu.zero(self.touched_addr(), 4)
    }

    pub(super) fn touched(&self, gpu: &Gpu) -> Result<usize> {
        Ok(gpu.download::<u32>(self.touched_addr(), 1)?[0] as usize)
    }

    /// Counts of the given MoE layers since the last take; the counters restart from zero.
    pub(super) fn take_counts(&self, gpu: &Gpu, moe_layers: &[usize]) -> Result<BTreeMap<usize, Vec<u64>>> {
        let all: Vec<u32> = gpu.download(self.buf.addr, self.layers * self.experts)?;
        gpu.zero(self.buf.addr, self.layers * self.experts * 4)?;
        Ok(moe_layers
            .iter()
            .filter_map(|&l| {
                let counts = all.get(l * self.experts..(l + 1) * self.experts)?;
                Some((l, counts.iter().map(|&c| c as u64).collect()))
            })
            .collect())
    }
}
