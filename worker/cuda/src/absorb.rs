//! The absorptions of MLA decode on Hopper's wgmma (`mla_absorb_q_wgmma`,
//! `mla_absorb_out_wgmma`): per head, the step's rows times one head's block of kv_b, W_UK (as
//! its per-head transpose) for the query, W_UV for the output; FP8 weights converted exactly to
//! bf16 in shared memory, bf16 rows, f32 sums scaled per 128-wide k chunk as the mma.sync
//! absorptions do, but each weight tile converted once per 64 rows, where those convert it again
//! in every block of 8 to 64 rows.

use crate::gpu::Gpu;
use crate::kernels;
use crate::launch::{int, ptr, Args, Kernel};
use crate::tiles::{ABSORB_COLS, ABSORB_ROWS, ABSORB_SHARED};
use anyhow::{ensure, Result};

/// One attention layer's head sizes, as the absorptions read them.
#[derive(Clone, Copy, Debug)]
pub struct HeadDims {
    pub heads: usize,
    /// Query/key channels without rotary: the k of the query's absorption.
    pub nope: usize,
    /// Query row stride per head (`nope + rope`).
    pub qk: usize,
    pub vdim: usize,
    /// Latent rank: the query absorption's columns, the output absorption's k.
    pub lora: usize,
}

/// Whether `g` runs the wgmma absorptions for heads of `dims`: a Hopper GPU, head blocks of whole
/// 128 × 128 scale blocks, the query's without rotary exactly one (DeepSeek-V3's 128: its
/// absorption sums one k chunk), query rows in 16-byte units.
pub fn takes(g: &Gpu, dims: &HeadDims) -> bool {
    let aligned = dims.nope == 128 && dims.vdim.is_multiple_of(128) && dims.lora.is_multiple_of(128);
    g.hopper && aligned && dims.qk.is_multiple_of(8) && ABSORB_SHARED <= g.max_shared_per_block
}

/// `q_lat[t, h, c] = q[t, h, :nope] · W_UK[h][:, c]` for `m` rows: `qb` the queries as bf16
/// `[m, heads, qk]`, `uk_t` / `uk_t_scale` W_UK transposed per head (`[heads * lora, nope]`, its
/// 128 × 128 scales likewise), `q_lat` `[m, heads, lora]`, f32 or (`bf16_out`) bf16.
pub fn absorb_q(
    g: &Gpu,
    dims: &HeadDims,
    m: usize,
    (q_lat, bf16_out): (u64, bool),
    qb: u64,
    (uk_t, uk_t_scale): (u64, u64),
) -> Result<()> {
    let HeadDims {
        heads, nope, qk, lora, ..
    } = *dims;
    let kernel = if bf16_out {
        kernels::mla_absorb_q_wgmma_bf16
    } else {
        kernels::mla_absorb_q_wgmma
    };
    let args = (
        ptr(q_lat),
        int(heads * lora),
        int(lora),
        ptr(qb),
        int(heads * qk),
        int(qk),
        int(m),
        ptr(uk_t),
        (lora * nope) as u64,
        ptr(uk_t_scale),
        ((lora / 128) * (nope / 128)) as u64,
        int(nope),
    );
    launch(g, dims, kernel, lora, m, args)
}

/// `attn[t, h * vdim + j] = o_lat[t, h] · W_UV[h][j]` for `m` rows: `o_lat` bf16 `[m, heads,
/// lora]`, `kv_b` / `kv_b_scale` the layer's kv_b as stored (`[heads * (nope + vdim), lora]`, head
/// h's value rows after its nope key rows), `attn` f32 `[m, heads * vdim]`.
pub fn absorb_out(
    g: &Gpu,
    dims: &HeadDims,
    m: usize,
    attn: u64,
    o_lat: u64,
    (kv_b, kv_b_scale): (u64, u64),
) -> Result<()> {
    let HeadDims {
        heads,
        nope,
        vdim,
        lora,
        ..
    } = *dims;
    let per_head = nope + vdim;
    let args = (
        ptr(attn),
        int(heads * vdim),
        int(vdim),
        ptr(o_lat),
        int(heads * lora),
        int(lora),
        int(m),
        ptr(kv_b + (nope * lora) as u64),
        (per_head * lora) as u64,
        ptr(kv_b_scale + ((nope / 128) * (lora / 128) * 4) as u64),
        ((per_head / 128) * (lora / 128)) as u64,
        int(lora),
    );
    launch(g, dims, kernels::mla_absorb_out_wgmma, vdim, m, args)
}

/// One block per 64 rows, 128 output columns and head, for heads the kernels take ([`takes`]).
fn launch<A: Args>(g: &Gpu, dims: &HeadDims, kernel: Kernel<A>, cols: usize, m: usize, args: A) -> Result<()> {
    ensure!(
        takes(g, dims),
        "the wgmma absorptions do not take heads of {dims:?} on this GPU"
    );
    let grid = (
        (cols / ABSORB_COLS) as u32,
        m.div_ceil(ABSORB_ROWS) as u32,
        dims.heads as u32,
    );
    kernel.launch(g, grid, 128, ABSORB_SHARED as u32, args)
}
