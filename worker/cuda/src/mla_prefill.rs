//! Causal attention of a sequence's new rows in the naive MLA form (prefill), flash style: per
//! block one head and a tile of query rows over key tiles up to the diagonal with an online
//! softmax, so no score matrix is kept and memory grows linearly with the prompt. Two kernels:
//! `mla_prefill_wgmma` (Hopper, DeepSeek-V3's head sizes, tiles by TMA, products on wgmma) and
//! `mla_prefill_flash` (mma.sync, any head sizes up to its register arrays).

use crate::gpu::{tensor_map, Gpu};
use crate::kernels;
use crate::launch::{int, ptr, TensorMap};
use crate::switches;
use crate::tiles::{FL_K, FL_Q, FL_QK, FL_V, PF_K, PF_Q, PF_THREADS};
use anyhow::{bail, ensure, Result};
use cudarc::driver::sys as drv;

/// Which kernel computes the prefill attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefillKernel {
    /// wgmma (sm_90a): DeepSeek-V3's heads only (query/key 128 + 64 rotary, value 128); each
    /// warpgroup's softmax overlaps its own products.
    Wgmma,
    /// The same kernel waiting for each product in turn: the kernel before, kept to measure
    /// against (`DSV3_PREFILL_PIPELINE=0`).
    WgmmaSerial,
    /// mma.sync: heads of at most `FL_QK` / `FL_V` in multiples of 16.
    Mma,
}

/// Shared memory of `mla_prefill_wgmma`: Q (192 channels of `PF_Q` rows), two stages of a K tile
/// (192 channels) and a V tile (128) of `PF_K` keys, nine barriers, and room to start Q on a
/// 1024-byte boundary (the swizzle's period).
const WGMMA_SHARED_BYTES: usize = PF_Q * 192 * 2 + 2 * PF_K * (192 + 128) * 2 + 9 * 8 + 1024;

/// The prefill kernels the environment allows: `DSV3_PREFILL_WGMMA=0` passes over wgmma,
/// `DSV3_PREFILL_PIPELINE=0` over its pipelined form (read when a model loads, so a bad value
/// stops the load, not a step).
#[derive(Clone, Copy, Debug)]
pub struct PrefillSwitches {
    pub wgmma: bool,
    pub pipelined: bool,
}

impl PrefillSwitches {
    pub fn from_env() -> Result<Self> {
        Ok(PrefillSwitches {
            wgmma: switches::flag("DSV3_PREFILL_WGMMA", true)?,
            pipelined: switches::flag("DSV3_PREFILL_PIPELINE", true)?,
        })
    }
}

impl PrefillKernel {
    /// Every kernel, fastest first.
    pub const ALL: [PrefillKernel; 3] = [PrefillKernel::Wgmma, PrefillKernel::WgmmaSerial, PrefillKernel::Mma];

    /// The fastest kernel that takes `shape` on `g` among those `allowed`.
    pub fn best(g: &Gpu, shape: &PrefillShape, allowed: PrefillSwitches) -> Option<Self> {
        Self::ALL.into_iter().find(|&k| {
            k.takes(g, shape)
                && match k {
                    PrefillKernel::Wgmma => allowed.wgmma && allowed.pipelined,
                    PrefillKernel::WgmmaSerial => allowed.wgmma,
                    PrefillKernel::Mma => true,
                }
        })
    }

    /// [`PrefillKernel::best`], or an error naming the head sizes no kernel takes.
    pub fn for_shape(g: &Gpu, shape: &PrefillShape, allowed: PrefillSwitches) -> Result<Self> {
        Self::best(g, shape, allowed).ok_or_else(|| {
            anyhow::anyhow!(
                "no prefill attention kernel takes heads of {} (query/key) and {} (value): at most {FL_QK} and {FL_V} in multiples of 16",
                shape.qk(),
                shape.vdim
            )
        })
    }

    /// Whether this kernel can write its output quantised ([`PrefillOutput::Codes`]).
    pub fn writes_codes(self) -> bool {
        self != PrefillKernel::Mma
    }

    /// Whether this kernel takes `shape` on `g`.
    pub fn takes(self, g: &Gpu, shape: &PrefillShape) -> bool {
        match self {
            PrefillKernel::Wgmma | PrefillKernel::WgmmaSerial => {
                g.hopper
                    && shape.nope == 128
                    && shape.rope == 64
                    && shape.vdim == 128
                    && WGMMA_SHARED_BYTES <= g.max_shared_per_block
            }
            PrefillKernel::Mma => {
                shape.qk().is_multiple_of(16)
                    && shape.qk() <= FL_QK
                    && shape.vdim.is_multiple_of(16)
                    && shape.vdim <= FL_V
                    && shared_bytes(shape) <= g.max_shared_per_block
            }
        }
    }
}

/// Head sizes of the naive form: a query/key head is `nope` channels without rotary and `rope`
/// with it, a value head `vdim`.
#[derive(Clone, Copy, Debug)]
pub struct PrefillShape {
    pub heads: usize,
    pub nope: usize,
    pub rope: usize,
    pub vdim: usize,
}

impl PrefillShape {
    /// Channels of a query/key head.
    pub fn qk(&self) -> usize {
        self.nope + self.rope
    }
}

/// The device buffers of one call, over `total = start + n` keys: `q` bf16 `[n, heads, nope +
/// rope]`; `kv` kv_b's product, bf16 `[total, heads, nope + vdim]` (each head's key channels
/// without rotary, then its value); `k_pe` the keys' rotary channels shared by every head, bf16
/// `[total, rope]`; the output, row `i`'s head `h` at `h * vdim` in it.
#[derive(Clone, Copy, Debug)]
pub struct PrefillBuffers {
    pub q: u64,
    pub kv: u64,
    pub k_pe: u64,
    pub out: PrefillOutput,
}

/// Where a prefill's attention goes.
#[derive(Clone, Copy, Debug)]
pub enum PrefillOutput {
    /// f32, row `i` at `out + i * ld` floats.
    F32 { out: u64, ld: usize },
    /// Quantised for the product that reads it ([`PrefillKernel::writes_codes`]; a head's 128
    /// values one block): e4m3 codes, row `i` at `codes + i * ld` bytes, and row `i`'s head `h`
    /// scale at `scales + (h * ld_scales + i) * 4` (`ue8m0`: powers of two): the codes and scales
    /// `quantize_rows_fp8` makes of the f32 output, bit for bit.
    Codes {
        codes: u64,
        ld: usize,
        scales: u64,
        ld_scales: usize,
        ue8m0: bool,
    },
}

/// Shared memory of one `mla_prefill_flash` block: Q, two K tiles (padded rows of qk + 8) and two V tiles (vdim + 8).
pub fn shared_bytes(shape: &PrefillShape) -> usize {
    (FL_Q + 2 * FL_K) * (shape.qk() + 8) * 2 + 2 * FL_K * (shape.vdim + 8) * 2
}

/// Launches the attention of `n` new rows at positions `start..start + n`, each seeing every
/// position up to its own, on `kernel` ([`PrefillKernel::for_shape`]).
pub fn prefill_with(
    g: &Gpu,
    kernel: PrefillKernel,
    shape: &PrefillShape,
    bufs: &PrefillBuffers,
    n: usize,
    start: usize,
    scale: f32,
) -> Result<()> {
    ensure!(
        kernel.takes(g, shape),
        "the {kernel:?} prefill kernel does not take {shape:?} on this GPU"
    );
    if n == 0 {
        return Ok(());
    }
    let PrefillShape {
        heads,
        nope,
        rope,
        vdim,
    } = *shape;
    let (qk, total) = (shape.qk(), start + n);
    match kernel {
        PrefillKernel::Wgmma | PrefillKernel::WgmmaSerial => {
            let launcher = match kernel {
                PrefillKernel::Wgmma => kernels::mla_prefill_wgmma,
                _ => kernels::mla_prefill_wgmma_serial,
            };
            let (out, ld, codes, scales, ld_scales, ue8m0) = match bufs.out {
                PrefillOutput::F32 { out, ld } => (out, ld, 0, 0, 0, false),
                PrefillOutput::Codes {
                    codes,
                    ld,
                    scales,
                    ld_scales,
                    ue8m0,
                } => (0, ld, codes, scales, ld_scales, ue8m0),
            };
            launcher.launch(
                g,
                (n.div_ceil(PF_Q) as u32, heads as u32, 1),
                PF_THREADS as u32,
                WGMMA_SHARED_BYTES as u32,
                (
                    ptr(out),
                    int(ld),
                    ptr(codes),
                    ptr(scales),
                    int(ld_scales),
                    int(ue8m0 as usize),
                    head_map(bufs.q, n, heads, qk, PF_Q, "the prefill queries")?,
                    head_map(bufs.kv, total, heads, nope + vdim, PF_K, "kv_b's product")?,
                    head_map(bufs.k_pe, total, 1, rope, PF_K, "the keys' rotary part")?,
                    int(n),
                    int(start),
                    scale,
                ),
            )
        }
        PrefillKernel::Mma => {
            let PrefillOutput::F32 { out, ld } = bufs.out else {
                bail!("the mma.sync prefill kernel writes its output as f32 only");
            };
            // This kernel reads each head's K and V whole.
            let k = g.alloc(total * heads * qk * 2)?;
            let v = g.alloc(total * heads * vdim * 2)?;
            kernels::build_kv.launch(
                g,
                (total as u32, 1, 1),
                256,
                0,
                (
                    ptr(k.addr),
                    ptr(v.addr),
                    ptr(bufs.kv),
                    ptr(bufs.k_pe),
                    int(heads),
                    int(nope),
                    int(rope),
                    int(vdim),
                ),
            )?;
            kernels::mla_prefill_flash.launch(
                g,
                (n.div_ceil(FL_Q) as u32, heads as u32, 1),
                128,
                shared_bytes(shape) as u32,
                (
                    ptr(out),
                    int(ld),
                    ptr(bufs.q),
                    ptr(k.addr),
                    ptr(v.addr),
                    int(n),
                    int(start),
                    int(heads),
                    int(qk),
                    int(vdim),
                    scale,
                ),
            )
        }
    }
}

/// A TMA map of bf16 `[rows][heads][width]`, copied in boxes of 64 channels of one head by
/// `box_rows` rows, in the 128-byte swizzle wgmma reads; rows past the end read as zeros.
fn head_map(addr: u64, rows: usize, heads: usize, width: usize, box_rows: usize, what: &str) -> Result<TensorMap> {
    ensure!(addr.is_multiple_of(16), "TMA needs 16-byte aligned {what}");
    tensor_map(
        addr,
        drv::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        &[width as u64, heads as u64, rows as u64],
        &[(width * 2) as u64, (heads * width * 2) as u64],
        &[64, 1, box_rows as u32],
        drv::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
        what,
    )
}
