//! Decode attention in the weight-absorbed MLA form over the paged latent cache: for every row of
//! a step and every head, `o_lat[h] = softmax_j(scale · (q_lat[h] · c_j + q_pe[h] · kpe_j)) · c_j`
//! over the row's cached positions `j`. Three kernels ([`DecodeKernel`]): on Hopper and
//! DeepSeek-V3's latent shape `mla_decode_wgmma`, on other shapes and GPUs `mla_decode_mma`
//! (mma.sync) — both split each row's positions across blocks, and `mla_combine` merges the
//! splits — and the CUDA-core `mla_attend` (f32 throughout) where neither fits, or on request.

use crate::gpu::{float, int, ptr, Gpu};
use crate::tiles::{DEC_HEADS, DEC_PAD, DEC_STAGES, DEC_THREADS, DEC_TILE, MLA_HEAD_GROUP, MLA_THREADS, MLA_TILE};
use anyhow::{ensure, Result};

/// Fewest positions one block of the split tensor-core kernel takes.
const MIN_SPLIT: usize = 128;

/// One layer's latent attention sizes.
#[derive(Clone, Copy, Debug)]
pub struct LatentShape {
    pub heads: usize,
    /// Latent rank: the width of `q_lat`, of `o_lat` and of the cached `c_kv`.
    pub lora: usize,
    /// Rotary part of the query and of the cached key.
    pub rope: usize,
    /// Query row stride per head (`nope + rope`); the rotary part starts at `nope`.
    pub qk: usize,
    pub nope: usize,
}

impl LatentShape {
    /// bf16 elements per cached position.
    pub fn width(&self) -> usize {
        self.lora + self.rope
    }
}

/// Which kernel computes the decode attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeKernel {
    /// wgmma (sm_90a): DeepSeek-V3's latent (512 + 64) only.
    Wgmma,
    /// mma.sync: any latent rank that is a multiple of 64 up to 512.
    Mma,
    /// f32 on the CUDA cores.
    CudaCores,
}

/// Threads of `mla_decode_wgmma`: two warpgroups.
const WGMMA_THREADS: usize = 256;
/// Shared memory of `mla_decode_wgmma`: Q and two 64-position tiles (576 bf16 channels each), the
/// two halves of P, and the row maxima and sums.
const WGMMA_SHARED_BYTES: usize = 3 * 64 * 576 * 2 + 2 * 64 * 32 * 2 + 5 * 64 * 4;

impl DecodeKernel {
    /// The fastest kernel that takes `shape` on `g` (`DSV3_MLA_WGMMA=0` passes over wgmma).
    pub fn best(g: &Gpu, shape: &LatentShape) -> Self {
        let wgmma_allowed = std::env::var_os("DSV3_MLA_WGMMA").is_none_or(|v| v != "0");
        [DecodeKernel::Wgmma, DecodeKernel::Mma]
            .into_iter()
            .find(|k| k.takes(g, shape) && (*k != DecodeKernel::Wgmma || wgmma_allowed))
            .unwrap_or(DecodeKernel::CudaCores)
    }

    /// Whether this kernel takes `shape` on `g`.
    pub fn takes(self, g: &Gpu, shape: &LatentShape) -> bool {
        let heads_fit = shape.heads % shape.heads.min(DEC_HEADS) == 0 && shape.nope % 2 == 0;
        match self {
            DecodeKernel::Wgmma => {
                g.hopper
                    && heads_fit
                    && shape.lora == 512
                    && shape.rope == 64
                    && WGMMA_SHARED_BYTES <= g.max_shared_per_block
            }
            DecodeKernel::Mma => {
                heads_fit
                    && shape.width() % 16 == 0
                    && shape.lora % 64 == 0
                    && shape.lora <= 512
                    && mma_shared_bytes(shape.width()) <= g.max_shared_per_block
            }
            DecodeKernel::CudaCores => {
                shape.heads % shape.heads.min(MLA_HEAD_GROUP) == 0
                    && shape.lora <= 2 * MLA_THREADS
                    && cuda_core_shared_bytes(shape) <= g.max_shared_per_block
            }
        }
    }
}

/// Where a step's rows find their cached positions: row `r` attends over positions
/// `0..lens[r]`, position `p` living in slot `tables[table_off[r] + p / block] * block + p % block`.
#[derive(Clone, Copy, Debug)]
pub struct PagedRows {
    pub rows: usize,
    /// The longest length any row may have (sizes the split of positions across blocks).
    pub max_len: usize,
    pub tables: u64,
    pub table_off: u64,
    pub lens: u64,
    pub block: usize,
}

/// The device buffers of one call: `q_lat` f32 `[rows, heads, lora]`, `q` f32
/// `[rows, heads, qk]` (its rotary part is read), `cache` bf16 `[slots, lora + rope]`, and the
/// output `o_lat` f32 `[rows, heads, lora]`.
#[derive(Clone, Copy, Debug)]
pub struct DecodeBuffers {
    pub q_lat: u64,
    pub q: u64,
    pub cache: u64,
    pub o_lat: u64,
}

fn cuda_core_shared_bytes(shape: &LatentShape) -> usize {
    let (hg, width) = (shape.heads.min(MLA_HEAD_GROUP), shape.width());
    (hg * width + hg * MLA_TILE + 3 * hg) * 4 + MLA_TILE * (width + 2) * 2
}

fn mma_shared_bytes(width: usize) -> usize {
    // Q and the tiles (bf16, swizzled rows), P (padded rows), then row maxima, row sums and final
    // maxima (f32).
    (DEC_HEADS + DEC_STAGES * DEC_TILE) * width * 2 + DEC_HEADS * (DEC_TILE + DEC_PAD) * 2 + 5 * DEC_HEADS * 4
}

/// Launches the decode attention of every row of `rows` on the GPU's current stream.
pub fn mla_decode(
    g: &Gpu,
    shape: &LatentShape,
    rows: &PagedRows,
    bufs: &DecodeBuffers,
    scale: f32,
    kernel: DecodeKernel,
) -> Result<()> {
    let LatentShape {
        heads,
        lora,
        rope,
        qk,
        nope,
    } = *shape;
    ensure!(
        kernel.takes(g, shape),
        "the {kernel:?} MLA decode kernel does not take {shape:?}"
    );
    let m = rows.rows;
    let width = shape.width();
    let hg = match kernel {
        DecodeKernel::CudaCores => heads.min(MLA_HEAD_GROUP),
        _ => heads.min(DEC_HEADS),
    };
    let args_tail = [
        ptr(bufs.q_lat),
        ptr(bufs.q),
        int(qk),
        int(nope),
        int(heads),
        int(hg),
        int(lora),
        int(rope),
        ptr(bufs.cache),
        ptr(rows.tables),
        ptr(rows.table_off),
        ptr(rows.lens),
        int(rows.block),
        float(scale),
    ];
    if kernel == DecodeKernel::CudaCores {
        let smem = cuda_core_shared_bytes(shape);
        let mut args = vec![ptr(bufs.o_lat)];
        args.extend_from_slice(&args_tail);
        return g.launch(
            "mla_attend",
            ((heads / hg) as u32, m as u32, 1),
            MLA_THREADS as u32,
            smem as u32,
            &args,
        );
    }
    // Split the positions so the grid fills the GPU (flash-decoding): about two blocks per SM in
    // all (one fits at a time), rounded down so a batch does not start a nearly empty wave; each
    // row divides its own length on the GPU, at least MIN_SPLIT positions per split.
    let groups = m * heads / hg;
    let splits = (2 * g.sm_count / groups).min(rows.max_len.div_ceil(MIN_SPLIT)).max(1);
    // One split per row: the kernel writes the normalised output itself and nothing is merged.
    let parts = if splits > 1 {
        Some((
            g.alloc(m * heads * splits * lora * 4)?,
            g.alloc(m * heads * splits * 2 * 4)?,
        ))
    } else {
        None
    };
    let (o_part, ml_part) = match &parts {
        Some((o, ml)) => (o.addr, ml.addr),
        None => (bufs.o_lat, 0),
    };
    let (name, threads, smem) = match kernel {
        DecodeKernel::Wgmma => ("mla_decode_wgmma", WGMMA_THREADS, WGMMA_SHARED_BYTES),
        _ => ("mla_decode_mma", DEC_THREADS, mma_shared_bytes(width)),
    };
    let mut args = vec![ptr(o_part), ptr(ml_part)];
    args.extend_from_slice(&args_tail);
    args.push(int(MIN_SPLIT));
    g.launch(
        name,
        ((heads / hg) as u32, m as u32, splits as u32),
        threads as u32,
        smem as u32,
        &args,
    )?;
    if splits == 1 {
        return Ok(());
    }
    g.launch(
        "mla_combine",
        (heads as u32, m as u32, 1),
        128,
        (2 * splits * 4) as u32,
        &[
            ptr(bufs.o_lat),
            ptr(o_part),
            ptr(ml_part),
            int(heads),
            int(splits),
            int(lora),
        ],
    )
}
