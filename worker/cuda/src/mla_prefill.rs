//! Causal attention of a sequence's new rows in the naive MLA form (prefill), flash style
//! (`mla_prefill_flash`): per block one head and 64 query rows over key tiles up to the diagonal
//! with an online softmax, so no score matrix is kept and memory grows linearly with the prompt.

use crate::gpu::{float, int, ptr, Gpu};
use crate::tiles::{FL_K, FL_Q, FL_QK, FL_V};
use anyhow::{ensure, Result};

/// Head sizes of the naive form: `qk` = nope + rope per query/key head, `vdim` per value head.
#[derive(Clone, Copy, Debug)]
pub struct PrefillShape {
    pub heads: usize,
    pub qk: usize,
    pub vdim: usize,
}

/// The device buffers of one call: `q` bf16 `[n, heads, qk]`, `k` bf16 `[start + n, heads, qk]`,
/// `v` bf16 `[start + n, heads, vdim]`; the output is f32, row `i` at `out + i * ld_out` floats,
/// head `h` at `h * vdim` in it.
#[derive(Clone, Copy, Debug)]
pub struct PrefillBuffers {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub out: u64,
    pub ld_out: usize,
}

/// Shared memory of one block: Q, two K tiles (padded rows of qk + 8) and two V tiles (vdim + 8).
pub fn shared_bytes(shape: &PrefillShape) -> usize {
    (FL_Q + 2 * FL_K) * (shape.qk + 8) * 2 + 2 * FL_K * (shape.vdim + 8) * 2
}

/// Launches the attention of `n` new rows at positions `start..start + n`, each seeing every
/// position up to its own.
pub fn flash_prefill(
    g: &Gpu,
    shape: &PrefillShape,
    bufs: &PrefillBuffers,
    n: usize,
    start: usize,
    scale: f32,
) -> Result<()> {
    let PrefillShape { heads, qk, vdim } = *shape;
    ensure!(
        qk % 16 == 0 && qk <= FL_QK && vdim % 16 == 0 && vdim <= FL_V,
        "the prefill attention takes heads of at most {FL_QK} (query/key) and {FL_V} (value) in multiples of 16, not {qk} and {vdim}"
    );
    let smem = shared_bytes(shape);
    ensure!(
        smem <= g.max_shared_per_block,
        "the prefill attention needs {smem} bytes of shared memory per block"
    );
    if n == 0 {
        return Ok(());
    }
    g.launch(
        "mla_prefill_flash",
        (n.div_ceil(FL_Q) as u32, heads as u32, 1),
        128,
        smem as u32,
        &[
            ptr(bufs.out),
            int(bufs.ld_out),
            ptr(bufs.q),
            ptr(bufs.k),
            ptr(bufs.v),
            int(n),
            int(start),
            int(heads),
            int(qk),
            int(vdim),
            float(scale),
        ],
    )
}
