//! Decode attention in the weight-absorbed MLA form over the paged latent cache: for every row of
//! a step and every head, `o_lat[h] = softmax_j(scale · (q_lat[h] · c_j + q_pe[h] · kpe_j)) · c_j`
//! over the row's cached positions `j`. The tensor-core kernel (`mla_decode_mma`) splits each
//! row's positions across blocks and `mla_combine` merges the splits; the CUDA-core kernel
//! (`mla_attend`) takes the shapes the tensor cores do not, and `DSV3_MLA_SIMT=1`.

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

    /// Whether the tensor-core kernel takes this shape with `shared_bytes` of shared memory per block.
    pub fn fits_tensor_cores(&self, shared_bytes: usize) -> bool {
        let heads_per_block = self.heads.min(DEC_HEADS);
        self.width() % 16 == 0
            && self.lora % 64 == 0
            && self.lora <= 512
            && self.nope % 2 == 0
            && self.heads % heads_per_block == 0
            && tensor_core_shared_bytes(self.width()) <= shared_bytes
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

fn tensor_core_shared_bytes(width: usize) -> usize {
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
    cuda_cores: bool,
) -> Result<()> {
    let LatentShape {
        heads,
        lora,
        rope,
        qk,
        nope,
    } = *shape;
    let m = rows.rows;
    let width = shape.width();
    let tensor_cores = shape.fits_tensor_cores(g.max_shared_per_block) && !cuda_cores;
    let hg = if tensor_cores {
        heads.min(DEC_HEADS)
    } else {
        heads.min(MLA_HEAD_GROUP)
    };
    ensure!(heads % hg == 0, "{heads} heads do not split into groups of {hg}");
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
    if !tensor_cores {
        ensure!(
            lora <= 2 * MLA_THREADS,
            "latent rank {lora} is wider than the CUDA-core kernel takes"
        );
        let smem = (hg * width + hg * MLA_TILE + 3 * hg) * 4 + MLA_TILE * (width + 2) * 2;
        ensure!(
            smem <= g.max_shared_per_block,
            "latent width {width} needs more shared memory than a block has"
        );
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
    let o_part = g.alloc(m * heads * splits * lora * 4)?;
    let ml_part = g.alloc(m * heads * splits * 2 * 4)?;
    let mut args = vec![ptr(o_part.addr), ptr(ml_part.addr)];
    args.extend_from_slice(&args_tail);
    args.push(int(MIN_SPLIT));
    g.launch(
        "mla_decode_mma",
        ((heads / hg) as u32, m as u32, splits as u32),
        DEC_THREADS as u32,
        tensor_core_shared_bytes(width) as u32,
        &args,
    )?;
    g.launch(
        "mla_combine",
        (heads as u32, m as u32, 1),
        128,
        (2 * splits * 4) as u32,
        &[
            ptr(bufs.o_lat),
            ptr(o_part.addr),
            ptr(ml_part.addr),
            int(heads),
            int(splits),
            int(lora),
        ],
    )
}
