//! Decode attention in the weight-absorbed MLA form over the paged latent cache: for every row of
//! a step and every head, `o_lat[h] = softmax_j(scale · (q_lat[h] · c_j + q_pe[h] · kpe_j)) · c_j`
//! over the row's cached positions `j`. Three kernels ([`DecodeKernel`]): on Hopper and
//! DeepSeek-V3's latent shape `mla_decode_wgmma` (its cache tiles fed by TMA in 128-byte
//! swizzled rows, where the cache's blocks suit TMA boxes), otherwise `mla_decode_mma`
//! (mma.sync) — both split each row's positions across blocks, and `mla_combine` merges the
//! splits — and the CUDA-core `mla_attend` (f32 throughout) where neither fits, or on request.

use crate::gpu::{tensor_map, DeviceBuf, Gpu};
use crate::kernels;
use crate::launch::{int, ptr, Extend, TensorMap};
use crate::switches;
use crate::tiles::{DEC_HEADS, DEC_PAD, DEC_STAGES, DEC_THREADS, DEC_TILE, MLA_HEAD_GROUP, MLA_THREADS, MLA_TILE};
use anyhow::{bail, ensure, Context, Result};
use cudarc::driver::sys as drv;

/// Fewest positions one block of the split tensor-core kernel takes, unless
/// `DSV3_MLA_MIN_SPLIT=n` says otherwise (the kernel rounds a split up to whole tiles).
const MIN_SPLIT: usize = 128;

/// [`MIN_SPLIT`], or `DSV3_MLA_MIN_SPLIT`: at batch 1 a split of one tile puts more SMs to
/// reading the cache, and more partial outputs to merge; the switch is there to measure that.
fn min_split() -> Result<usize> {
    static MIN: std::sync::OnceLock<Result<usize, String>> = std::sync::OnceLock::new();
    switches::positive_count_once(&MIN, "DSV3_MLA_MIN_SPLIT", MIN_SPLIT)
}

/// Splits per row for `groups` blocks of full rows on `sms` SMs (one block fits on an SM at a
/// time), at most `most`: the fewest that reach the least time, counted in waves of blocks each
/// doing 1/splits of a row. More splits than that only add partial results to merge: at batch 64
/// (128 groups on 132 SMs) one wave of whole rows takes as long as two waves of halves.
fn decode_splits(groups: usize, sms: usize, most: usize) -> usize {
    let cost = |s: usize| (groups * s).div_ceil(sms.max(1)) as f64 / s as f64;
    let cap = most.clamp(1, (2 * sms).div_ceil(groups.max(1)).max(1));
    (1..=cap).fold(1, |best, s| if cost(s) < cost(best) - 1e-9 { s } else { best })
}

/// Most splits of a row's positions (`DSV3_MLA_SPLITS=n`; unset: no cap). At small batches every
/// split writes a partial output of `lora` floats per head, which can outweigh the cache the
/// split reads: the cap is there to measure that.
fn split_cap() -> Result<usize> {
    static CAP: std::sync::OnceLock<Result<usize, String>> = std::sync::OnceLock::new();
    switches::positive_count_once(&CAP, "DSV3_MLA_SPLITS", usize::MAX)
}

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
    /// wgmma (sm_90a): DeepSeek-V3's latent (512 + 64) only, each 64-position tile copied by TMA
    /// as boxes of 128-byte swizzled rows (cache blocks of a multiple of 8 positions that divide
    /// 64 or that 64 divides).
    Wgmma,
    /// mma.sync: any latent rank that is a multiple of 64 up to 512.
    Mma,
    /// f32 on the CUDA cores.
    CudaCores,
}

/// Threads of `mla_decode_wgmma`: two warpgroups.
const WGMMA_THREADS: usize = 256;
/// Shared memory of `mla_decode_wgmma`: Q and two 64-position tiles (576 bf16 channels each), the
/// slots where the two warpgroups hand each other P (a 64 x 64 bf16 fragment) and row maxima (two
/// f32 a thread), the four half-tile TMA barriers and Q's, and room to start Q on a 1024-byte
/// boundary (the swizzle's period).
const WGMMA_SHARED_BYTES: usize = 3 * 64 * 576 * 2 + 128 * (16 * 4 + 8) + 5 * 8 + 1024;
/// Cached positions per tile of `mla_decode_wgmma`.
const WGMMA_TILE: usize = 64;

impl DecodeKernel {
    /// Every kernel, fastest first.
    pub const ALL: [DecodeKernel; 3] = [DecodeKernel::Wgmma, DecodeKernel::Mma, DecodeKernel::CudaCores];

    /// The fastest kernel that takes `shape` over cache blocks of `block` positions on `g`,
    /// passing over wgmma unless `wgmma` (what [`wgmma_allowed`] read).
    pub fn best(g: &Gpu, shape: &LatentShape, block: usize, wgmma: bool) -> Self {
        DecodeKernel::ALL
            .into_iter()
            .find(|&k| k.takes(g, shape, block) && (k != DecodeKernel::Wgmma || wgmma))
            .unwrap_or(DecodeKernel::CudaCores)
    }

    /// Whether this is `mla_decode_wgmma`, the kernel the `DSV3_MLA_PROBE` switches build
    /// differently.
    pub fn on_wgmma(self) -> bool {
        self == DecodeKernel::Wgmma
    }

    /// Whether this kernel reads its queries as bf16 ([`DecodeQuery::Bf16`]), else as f32.
    pub fn reads_bf16_query(self) -> bool {
        self == DecodeKernel::Wgmma
    }

    /// Whether this kernel can write its output as bf16 ([`DecodeOutput::Bf16`]); the CUDA-core
    /// one writes f32 only.
    pub fn writes_bf16(self) -> bool {
        self != DecodeKernel::CudaCores
    }

    /// Whether this kernel takes `shape` over cache blocks of `block` positions on `g`.
    pub fn takes(self, g: &Gpu, shape: &LatentShape, block: usize) -> bool {
        let heads_fit = shape.heads.is_multiple_of(shape.heads.min(DEC_HEADS)) && shape.nope.is_multiple_of(2);
        match self {
            DecodeKernel::Wgmma => {
                g.hopper
                    && heads_fit
                    && shape.lora == 512
                    && shape.rope == 64
                    // the queries' rows by TMA: 16-byte multiples
                    && shape.qk.is_multiple_of(8)
                    && tma_box_rows(block).is_some()
                    && WGMMA_SHARED_BYTES <= g.max_shared_per_block
            }
            DecodeKernel::Mma => {
                heads_fit
                    && shape.width().is_multiple_of(16)
                    && shape.lora.is_multiple_of(64)
                    && shape.lora <= 512
                    && mma_shared_bytes(shape.width()) <= g.max_shared_per_block
            }
            DecodeKernel::CudaCores => {
                shape.heads.is_multiple_of(shape.heads.min(MLA_HEAD_GROUP))
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

/// The queries of one call as its kernel reads them: `q_lat` `[rows, heads, lora]` and `q`
/// `[rows, heads, qk]`, of which the rotary part is read.
#[derive(Clone, Copy, Debug)]
pub enum DecodeQuery {
    /// f32, what the mma.sync and CUDA-core kernels read.
    F32 { q_lat: u64, q: u64 },
    /// bf16, what the wgmma kernel copies by TMA as it is ([`DecodeKernel::reads_bf16_query`]).
    Bf16 { q_lat: u64, q: u64 },
}

/// Where a call writes `o_lat` `[rows, heads, lora]`, and as what.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeOutput {
    F32(u64),
    /// bf16, rounded to nearest even from the f32 result (what the tensor-core absorption of
    /// W_UV reads, so no conversion runs between them): the split kernels only
    /// ([`DecodeKernel::writes_bf16`]).
    Bf16(u64),
}

/// The device buffers of one call: the queries, `cache` bf16 `[slots, lora + rope]`, and the
/// output.
#[derive(Clone, Copy, Debug)]
pub struct DecodeBuffers {
    pub query: DecodeQuery,
    pub cache: u64,
    /// Cached positions `cache` holds (the layer's blocks times the block size).
    pub cache_slots: usize,
    pub o_lat: DecodeOutput,
}

fn cuda_core_shared_bytes(shape: &LatentShape) -> usize {
    let (hg, width) = (shape.heads.min(MLA_HEAD_GROUP), shape.width());
    (hg * width + hg * MLA_TILE + 3 * hg) * 4 + MLA_TILE * (width + 2) * 2
}

/// Cached positions per TMA box of the wgmma kernel's tiles over cache blocks of `block`
/// positions: whole blocks, or 64-position parts of them; boxes are whole groups of 8 positions.
fn tma_box_rows(block: usize) -> Option<usize> {
    let rows = block.min(WGMMA_TILE);
    (rows.is_multiple_of(8) && (WGMMA_TILE.is_multiple_of(block) || block.is_multiple_of(WGMMA_TILE))).then_some(rows)
}

/// The TMA view of one layer's latent cache (`slots` positions of 576 bf16 channels) that lands
/// a box of 64 channels by `box_rows` positions in the wgmma kernel's swizzled layout: the plain
/// 2-D view, 128-byte swizzle.
fn swizzled_cache_map(cache: u64, slots: usize, box_rows: usize) -> Result<TensorMap> {
    ensure!(cache.is_multiple_of(16), "TMA needs a 16-byte aligned latent cache");
    tensor_map(
        cache,
        drv::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT16,
        &[576, slots as u64],
        &[576 * 2],
        &[64, box_rows as u32],
        drv::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
        &format!("a latent cache of {slots} slots"),
    )
}

/// The TMA views of the bf16 queries of `rows` rows that land 64 heads by 64 channels in the
/// wgmma kernel's swizzled layout: the latent part `q_lat`, and `q`, of which the kernel reads the
/// rotary block at `nope`.
fn swizzled_query_maps(shape: &LatentShape, q_lat: u64, q: u64, rows: usize) -> Result<(TensorMap, TensorMap)> {
    ensure!(
        q_lat.is_multiple_of(16) && q.is_multiple_of(16) && (shape.qk * 2).is_multiple_of(16),
        "TMA needs 16-byte aligned query rows"
    );
    let heads = (rows * shape.heads) as u64;
    let map = |addr: u64, width: usize, what: &str| {
        tensor_map(
            addr,
            drv::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT16,
            &[width as u64, heads],
            &[width as u64 * 2],
            &[64, 64],
            drv::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            what,
        )
    };
    Ok((
        map(q_lat, shape.lora, "the latent queries")?,
        map(q, shape.qk, "the queries")?,
    ))
}

/// What the environment says of the wgmma decode kernel: `DSV3_MLA_WGMMA` unset or 1 allows it, 0
/// passes over it; any other value, and the switches of its feed that no longer exist, are errors
/// (read when a model loads, so a bad value stops the load, not a step).
pub fn wgmma_allowed() -> Result<bool> {
    for retired in ["DSV3_MLA_TMA", "DSV3_MLA_SWIZZLE"] {
        ensure!(
            std::env::var_os(retired).is_none(),
            "{retired} is no longer read: the wgmma decode kernel always takes its tiles by TMA in \
             128-byte swizzled rows (DSV3_MLA_WGMMA=0 selects the mma.sync kernel instead)"
        );
    }
    switches::flag("DSV3_MLA_WGMMA", true)
}

fn mma_shared_bytes(width: usize) -> usize {
    // Q and the tiles (bf16, swizzled rows), P (padded rows), then row maxima, row sums and final
    // maxima (f32).
    (DEC_HEADS + DEC_STAGES * DEC_TILE) * width * 2 + DEC_HEADS * (DEC_TILE + DEC_PAD) * 2 + 5 * DEC_HEADS * 4
}

/// A decode whose rows were split across blocks, left unmerged for its reader
/// ([`mla_decode_unmerged`]): split `s` of row `r`, head `h` wrote its unnormalised output (`lora`
/// floats) at `o_part[((r · heads + h) · count + s) · lora]` and its maximum and sum at
/// `ml_part[((r · heads + h) · count + s) · 2]`, as `mla_combine` reads them.
pub struct Splits {
    pub o_part: DeviceBuf,
    pub ml_part: DeviceBuf,
    pub count: usize,
}

/// Launches the decode attention of every row of `rows` on the GPU's current stream, into
/// `bufs.o_lat`.
pub fn mla_decode(
    g: &Gpu,
    shape: &LatentShape,
    rows: &PagedRows,
    bufs: &DecodeBuffers,
    scale: f32,
    kernel: DecodeKernel,
) -> Result<()> {
    match mla_decode_unmerged(g, shape, rows, bufs, scale, kernel)? {
        Some(splits) => merge(g, shape, rows.rows, &splits, bufs.o_lat),
        None => Ok(()),
    }
}

/// [`mla_decode`], but where its rows were split, their splits are left for the reader to merge
/// (`bufs.o_lat` is then not written): the absorption of W_UV merges them as it reads them at
/// small batches, where the merge's own launch was a tenth of the attention's chain.
pub fn mla_decode_unmerged(
    g: &Gpu,
    shape: &LatentShape,
    rows: &PagedRows,
    bufs: &DecodeBuffers,
    scale: f32,
    kernel: DecodeKernel,
) -> Result<Option<Splits>> {
    let LatentShape {
        heads,
        lora,
        rope,
        qk,
        nope,
    } = *shape;
    ensure!(
        kernel.takes(g, shape, rows.block),
        "the {kernel:?} MLA decode kernel does not take {shape:?}"
    );
    let m = rows.rows;
    let width = shape.width();
    let (q_lat, q) = match (kernel.reads_bf16_query(), bufs.query) {
        (false, DecodeQuery::F32 { q_lat, q }) | (true, DecodeQuery::Bf16 { q_lat, q }) => (q_lat, q),
        (_, query) => bail!("the {kernel:?} MLA decode kernel does not read {query:?}"),
    };
    let (o_lat, bf16_out) = match bufs.o_lat {
        DecodeOutput::F32(o) => (o, false),
        DecodeOutput::Bf16(o) if kernel.writes_bf16() => (o, true),
        DecodeOutput::Bf16(_) => bail!("the {kernel:?} MLA decode kernel writes f32 only"),
    };
    let hg = match kernel {
        DecodeKernel::CudaCores => heads.min(MLA_HEAD_GROUP),
        _ => heads.min(DEC_HEADS),
    };
    // The queries, the cache and the rows' tables: the arguments every decode kernel takes,
    // after its outputs.
    let common = (
        ptr(q_lat),
        ptr(q),
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
        scale,
    );
    if kernel == DecodeKernel::CudaCores {
        let smem = cuda_core_shared_bytes(shape);
        kernels::mla_attend.launch(
            g,
            ((heads / hg) as u32, m as u32, 1),
            MLA_THREADS as u32,
            smem as u32,
            common.after(ptr(o_lat)),
        )?;
        return Ok(None);
    }
    // Split the positions so the grid fills the GPU (flash-decoding); each row divides its own
    // length on the GPU, at least min_split() positions per split.
    let groups = m * heads / hg;
    let min_split = min_split()?;
    let most = rows.max_len.div_ceil(min_split).min(split_cap()?);
    let splits = decode_splits(groups, g.sm_count, most);
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
        None => (o_lat, 0),
    };
    let grid = ((heads / hg) as u32, m as u32, splits as u32);
    let split = common
        .after(ptr(ml_part))
        .after(ptr(o_part))
        .then(int(min_split))
        .then(int(bf16_out as usize));
    match kernel {
        DecodeKernel::Wgmma => {
            // Q and the tiles by TMA: the cache's view and its box rows, the queries' views.
            let box_rows = tma_box_rows(rows.block)
                .with_context(|| format!("TMA boxes do not fit cache blocks of {}", rows.block))?;
            let map = swizzled_cache_map(bufs.cache, bufs.cache_slots, box_rows)?;
            let (q_lat_map, q_map) = swizzled_query_maps(shape, q_lat, q, m)?;
            let args = (
                ptr(o_part),
                ptr(ml_part),
                int(heads),
                int(hg),
                ptr(rows.tables),
                ptr(rows.table_off),
                ptr(rows.lens),
                int(rows.block),
                scale,
                int(min_split),
                map,
                int(box_rows),
                q_lat_map,
                q_map,
                int(nope),
                int(bf16_out as usize),
            );
            kernels::mla_decode_wgmma.launch(g, grid, WGMMA_THREADS as u32, WGMMA_SHARED_BYTES as u32, args)?;
        }
        // (the CUDA-core kernel returned above)
        DecodeKernel::Mma | DecodeKernel::CudaCores => {
            let smem = mma_shared_bytes(width) as u32;
            kernels::mla_decode_mma.launch(g, grid, DEC_THREADS as u32, smem, split)?
        }
    }
    Ok(parts.map(|(o_part, ml_part)| Splits {
        o_part,
        ml_part,
        count: splits,
    }))
}

/// `mla_combine`: the splits of `rows` rows merged into `o_lat`.
fn merge(g: &Gpu, shape: &LatentShape, rows: usize, splits: &Splits, o_lat: DecodeOutput) -> Result<()> {
    let (o_lat, bf16_out) = match o_lat {
        DecodeOutput::F32(o) => (o, false),
        DecodeOutput::Bf16(o) => (o, true),
    };
    kernels::mla_combine.launch(
        g,
        (shape.heads as u32, rows as u32, 1),
        128,
        (2 * splits.count * 4) as u32,
        (
            ptr(o_lat),
            ptr(splits.o_part.addr),
            ptr(splits.ml_part.addr),
            int(shape.heads),
            int(splits.count),
            int(shape.lora),
            int(bf16_out as usize),
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::{decode_splits, wgmma_allowed};

    #[test]
    fn the_wgmma_switch_takes_0_or_1_and_the_retired_feed_switches_are_refused_by_name() {
        // The only test of this binary that touches these variables.
        let clear = || {
            for var in ["DSV3_MLA_WGMMA", "DSV3_MLA_TMA", "DSV3_MLA_SWIZZLE"] {
                std::env::remove_var(var);
            }
        };
        clear();
        assert!(wgmma_allowed().unwrap());
        std::env::set_var("DSV3_MLA_WGMMA", "0");
        assert!(!wgmma_allowed().unwrap());
        std::env::set_var("DSV3_MLA_WGMMA", "1");
        assert!(wgmma_allowed().unwrap());
        std::env::set_var("DSV3_MLA_WGMMA", "off");
        let err = wgmma_allowed().unwrap_err().to_string();
        assert!(err.contains("DSV3_MLA_WGMMA=off") && err.contains("0 or 1"), "{err}");
        clear();
        for retired in ["DSV3_MLA_TMA", "DSV3_MLA_SWIZZLE"] {
            std::env::set_var(retired, "0");
            let err = wgmma_allowed().unwrap_err().to_string();
            assert!(err.contains(retired) && err.contains("no longer read"), "{err}");
            std::env::remove_var(retired);
        }
        clear();
    }

    #[test]
    fn rows_split_only_as_far_as_it_saves_waves() {
        // H200: 132 SMs; 64-head blocks, so two blocks per row of 128 heads.
        assert_eq!(
            decode_splits(2, 132, 32),
            32,
            "batch 1: as many splits as the length allows"
        );
        assert_eq!(
            decode_splits(16, 132, 32),
            8,
            "batch 8: one wave of eighths, not two of sixteenths"
        );
        assert_eq!(decode_splits(128, 132, 32), 1, "batch 64: one wave of whole rows");
        assert_eq!(decode_splits(512, 132, 32), 1, "batch 256: already four waves");
        assert_eq!(decode_splits(40, 132, 32), 3, "three thirds fill 120 of 132");
        assert_eq!(decode_splits(2, 132, 1), 1, "a short row is not split");
        assert_eq!(decode_splits(0, 132, 4), 1);
    }
}
