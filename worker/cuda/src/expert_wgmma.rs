//! The routed experts' FP8 products on Hopper, one launch per matrix kind over every expert group
//! (`grouped_fp8_wgmma`): tokens quantised per 128 channels, weights read as stored, block scales
//! applied per 128-wide k block in f32, operands fed by TMA. The tiles are listed on the device
//! (`expert_tiles`), so a step never waits for the host to learn the group sizes.

use crate::fp8_gemm::QuantizedRows;
use crate::gpu::{tensor_map, DeviceBuf, Gpu};
use crate::kernels;
use crate::launch::{int, ptr, TensorMap};
use crate::tiles::{GX_ROWS, GX_SHARED, GX_THREADS, GX_TOKENS};
use crate::weights::{ExpertBank, Stacked};
use anyhow::{ensure, Result};
use cudarc::driver::sys as drv;

/// Token rows per TMA copy of the token tile (`GX_BOX` in the kernel).
const TOKEN_BOX: usize = 16;
/// Bytes of one k block of a weight row or a token row (128 e4m3 values).
const K_BLOCK: usize = 128;

/// The precision an expert product writes its rows in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowFormat {
    F32,
    /// Rounded to nearest even: half the bytes to write and to read back (SwiGLU, the combine),
    /// where the next step rounds to e4m3 or adds eight rows weighted.
    Bf16,
}

impl RowFormat {
    pub fn bytes(self) -> usize {
        match self {
            RowFormat::F32 => 4,
            RowFormat::Bf16 => 2,
        }
    }
}

/// Whether `grouped_fp8_wgmma` runs this bank here: a Hopper GPU (the kernels are built for
/// sm_90a there), every matrix in whole 128 x 128 blocks, and room for the stages.
pub fn takes(g: &Gpu, bank: &ExpertBank) -> bool {
    g.hopper
        && GX_SHARED <= g.max_shared_per_block
        && [&bank.gate, &bank.up, &bank.down]
            .iter()
            .all(|s| s.rows % GX_ROWS == 0 && s.cols % K_BLOCK == 0)
}

/// The tiles of one step's groups: (group, first slot, slots) each, at most [`Self::max`].
pub struct ExpertTiles {
    buf: DeviceBuf,
    max: usize,
}

impl ExpertTiles {
    /// Lists the tiles of `groups` groups whose slots are `offsets[g]..offsets[g + 1]` (device),
    /// within `capacity` slots.
    pub fn new(g: &Gpu, offsets: u64, groups: usize, capacity: usize) -> Result<Self> {
        let tiles = Self::unlisted(g, groups, capacity)?;
        kernels::expert_tiles.launch(
            g,
            (1, 1, 1),
            256,
            0,
            (ptr(tiles.addr()), int(tiles.max), ptr(offsets), int(groups)),
        )?;
        Ok(tiles)
    }

    /// Room for the tiles of `groups` groups within `capacity` slots, for a kernel that lists
    /// them as `expert_tiles` does (`route_plan`).
    pub fn unlisted(g: &Gpu, groups: usize, capacity: usize) -> Result<Self> {
        let max = capacity.div_ceil(GX_TOKENS) + groups;
        Ok(ExpertTiles {
            buf: g.alloc(3 * max * 4)?,
            max,
        })
    }

    /// The list: (group, first slot, slots) per tile, group -1 past the last.
    pub fn addr(&self) -> u64 {
        self.buf.addr
    }

    /// Entries the list has room for.
    pub fn max(&self) -> usize {
        self.max
    }
}

/// A TMA map of a row-major byte matrix `[rows][cols]`, copied in boxes of `box_rows` x 128 bytes
/// in the 128-byte swizzle wgmma reads; rows past the end read as zeros.
fn byte_matrix_map(addr: u64, rows: usize, cols: usize, box_rows: usize) -> Result<TensorMap> {
    ensure!(
        addr.is_multiple_of(16) && cols.is_multiple_of(16),
        "TMA needs 16-byte aligned rows"
    );
    tensor_map(
        addr,
        drv::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT8,
        &[cols as u64, rows as u64],
        &[cols as u64],
        &[K_BLOCK as u32, box_rows as u32],
        drv::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
        &format!("{rows}x{cols} bytes"),
    )
}

/// `out[s] = x[s] · W_eᵀ` (in `format`, row stride `ldy` values) for every slot s of every group
/// (expert e = `group_expert[g]`, slots `offsets[g]..offsets[g + 1]`, as listed in `tiles`); `x`
/// the slots quantised with per-group scales ([`QuantizedRows`] with the same groups), `slots`
/// rows of it.
#[allow(clippy::too_many_arguments)]
pub fn grouped_fp8(
    g: &Gpu,
    tiles: &ExpertTiles,
    group_expert: u64,
    offsets: u64,
    s: &Stacked,
    experts: usize,
    x: &QuantizedRows,
    slots: usize,
    out: u64,
    format: RowFormat,
    ldy: usize,
) -> Result<()> {
    ensure!(
        x.k == s.cols,
        "expert product: {} channels in, {} expected",
        x.k,
        s.cols
    );
    // Each slot's sums leave as 16-byte pieces of its row.
    ensure!(
        out.is_multiple_of(16) && (ldy * format.bytes()).is_multiple_of(16),
        "expert product: output rows must start 16-byte aligned"
    );
    let x_map = byte_matrix_map(x.data.addr, slots, s.cols, TOKEN_BOX)?;
    let w_map = byte_matrix_map(s.data.addr, experts * s.rows, s.cols, GX_ROWS)?;
    kernels::grouped_fp8_wgmma.launch(
        g,
        ((s.rows / GX_ROWS) as u32, tiles.max as u32, 1),
        GX_THREADS as u32,
        GX_SHARED as u32,
        (
            ptr(out),
            int((format == RowFormat::Bf16) as usize),
            int(ldy),
            x_map,
            ptr(x.scales.addr),
            w_map,
            ptr(s.scales.addr),
            s.scale_stride() as u64,
            ptr(tiles.addr()),
            ptr(group_expert),
            ptr(offsets),
            int(s.rows),
            int(s.cols),
        ),
    )
}
