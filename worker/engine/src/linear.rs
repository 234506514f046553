//! Weight matrices kept in their checkpoint format (F32, BF16, or FP8 E4M3 with block scales)
//! and the matrix products over them. Weights are decoded to f32 one row or one panel at a time,
//! never copied whole.

use crate::checkpoint::{Checkpoint, TensorRef};
use crate::config::{Fp8Activations, Fp8Quantization};
use anyhow::{bail, Result};
use rayon::prelude::*;
use safetensors::Dtype;

#[derive(Clone)]
enum Format {
    F32,
    Bf16,
    Fp8 {
        scales: Vec<f32>,
        scale_cols: usize,
        block_rows: usize,
        block_cols: usize,
        /// Products quantise their input per row per `block_cols` channels first
        /// ([`Fp8Activations::Quantised`]); `Some(ue8m0)`, with power-of-two scales when true.
        input_quant: Option<bool>,
    },
}

/// A `[rows, cols]` weight (PyTorch `[out, in]` convention): `y = x · Wᵀ`.
#[derive(Clone)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    tensor: TensorRef,
    format: Format,
}

/// Batches up to this many rows use the row-at-a-time kernel (memory-bound decode);
/// larger ones decode panels and run the GEMM crate.
const SMALL_BATCH: usize = 4;

impl Matrix {
    /// Loads `name` with shape `[rows, cols]`. FP8 weights need their `name_scale_inv` companion
    /// with shape `[ceil(rows/br), ceil(cols/bc)]`.
    pub fn load(
        ckpt: &Checkpoint,
        name: &str,
        rows: usize,
        cols: usize,
        quant: Option<&Fp8Quantization>,
    ) -> Result<Self> {
        let tensor = ckpt.get(name)?;
        tensor.expect(&[Dtype::F32, Dtype::BF16, Dtype::F8_E4M3], &[rows, cols])?;
        let format = match tensor.dtype {
            Dtype::F32 => Format::F32,
            Dtype::BF16 => Format::Bf16,
            Dtype::F8_E4M3 => {
                let (block_rows, block_cols) = quant.map(|q| (q.block_rows, q.block_cols)).unwrap_or((128, 128));
                let input_quant = quant
                    .filter(|q| q.activations == Fp8Activations::Quantised)
                    .map(|q| q.ue8m0_scales);
                let scale_name = format!("{name}_scale_inv");
                let scale = ckpt
                    .get(&scale_name)
                    .map_err(|e| anyhow::anyhow!("FP8 tensor `{name}` in {} needs its scale: {e}", tensor.file))?;
                let scale_rows = rows.div_ceil(block_rows);
                let scale_cols = cols.div_ceil(block_cols);
                scale.expect(&[Dtype::F32, Dtype::BF16], &[scale_rows, scale_cols])?;
                let scales = scale.to_f32_vec()?;
                if let Some(bad) = scales.iter().position(|s| !s.is_finite()) {
                    bail!(
                        "tensor `{scale_name}` in {} has a non-finite scale at index {bad}",
                        scale.file
                    );
                }
                Format::Fp8 {
                    scales,
                    scale_cols,
                    block_rows,
                    block_cols,
                    input_quant,
                }
            }
            _ => unreachable!("dtype checked above"),
        };
        Ok(Matrix {
            rows,
            cols,
            tensor,
            format,
        })
    }

    /// Bytes of weight data (and scales) read by one full product.
    pub fn weight_bytes(&self) -> usize {
        self.tensor.byte_len()
            + match &self.format {
                Format::Fp8 { scales, .. } => scales.len() * 4,
                _ => 0,
            }
    }

    pub fn dtype(&self) -> Dtype {
        self.tensor.dtype
    }

    /// Decodes row `r` into `out` (length `cols`).
    pub fn decode_row(&self, r: usize, out: &mut [f32]) {
        let cols = self.cols;
        let data = self.tensor.data();
        match &self.format {
            Format::F32 => {
                let bytes = &data[r * cols * 4..(r + 1) * cols * 4];
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            Format::Bf16 => crate::simd::bf16_to_f32(&data[r * cols * 2..(r + 1) * cols * 2], out),
            Format::Fp8 {
                scales,
                scale_cols,
                block_rows,
                block_cols,
                ..
            } => {
                let bytes = &data[r * cols..(r + 1) * cols];
                let scale_row = &scales[(r / block_rows) * scale_cols..(r / block_rows + 1) * scale_cols];
                for ((o, q), s) in out
                    .chunks_mut(*block_cols)
                    .zip(bytes.chunks(*block_cols))
                    .zip(scale_row)
                {
                    crate::simd::e4m3_to_f32(q, *s, o);
                }
            }
        }
    }

    /// Decodes rows `r0..r0+n` into `out` (row-major `[n, cols]`).
    pub fn decode_rows(&self, r0: usize, n: usize, out: &mut [f32]) {
        for (i, row) in out.chunks_exact_mut(self.cols).take(n).enumerate() {
            self.decode_row(r0 + i, row);
        }
    }

    /// `y[m, rows] = x[m, cols] · Wᵀ`.
    pub fn matmul(&self, x: &[f32], m: usize, y: &mut [f32]) {
        assert_eq!(x.len(), m * self.cols, "matmul input length");
        assert_eq!(y.len(), m * self.rows, "matmul output length");
        if m == 0 {
            return;
        }
        let quantised;
        let x = match &self.format {
            Format::Fp8 {
                input_quant: Some(ue8m0),
                block_cols,
                ..
            } => {
                quantised = quantize_rows(x, self.cols, *block_cols, *ue8m0);
                &quantised[..]
            }
            _ => x,
        };
        if m <= SMALL_BATCH {
            self.matmul_rows(x, m, y);
        } else {
            self.matmul_panels(x, m, y);
        }
    }

    pub fn forward(&self, x: &[f32], m: usize) -> Vec<f32> {
        let mut y = vec![0.0; m * self.rows];
        self.matmul(x, m, &mut y);
        y
    }

    /// Row at a time: decode a weight row once, dot it with every input row.
    fn matmul_rows(&self, x: &[f32], m: usize, y: &mut [f32]) {
        let rows = self.rows;
        let cols = self.cols;
        let chunk = rows.div_ceil(rayon::current_num_threads() * 8).max(16);
        let mut yt = vec![0.0f32; rows * m];
        yt.par_chunks_mut(chunk * m).enumerate().for_each(|(ci, out)| {
            let mut buf = vec![0.0f32; cols];
            let r0 = ci * chunk;
            for (i, out_row) in out.chunks_exact_mut(m).enumerate() {
                self.decode_row(r0 + i, &mut buf);
                crate::simd::dot_many(&buf, x, out_row);
            }
        });
        for r in 0..rows {
            for j in 0..m {
                y[j * rows + r] = yt[r * m + j];
            }
        }
    }

    /// Panels of rows decoded to f32, each multiplied by the whole input with the GEMM crate.
    fn matmul_panels(&self, x: &[f32], m: usize, y: &mut [f32]) {
        let rows = self.rows;
        let cols = self.cols;
        let threads = rayon::current_num_threads();
        let by_cache = (128 * 1024 / cols).clamp(16, 256);
        let by_threads = rows.div_ceil(threads * 2).next_multiple_of(16);
        let panel = by_cache.min(by_threads).max(16);
        let y_ptr = SyncPtr(y.as_mut_ptr());
        (0..rows.div_ceil(panel)).into_par_iter().for_each(|p| {
            let r0 = p * panel;
            let n = panel.min(rows - r0);
            let mut w = vec![0.0f32; n * cols];
            self.decode_rows(r0, n, &mut w);
            // SAFETY: every panel writes the disjoint column range r0..r0+n of y, which is
            // `m × rows` and outlives this parallel loop.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    cols,
                    y_ptr.get().add(r0),
                    1,
                    rows as isize,
                    false,
                    x.as_ptr(),
                    1,
                    cols as isize,
                    w.as_ptr(),
                    cols as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        });
    }
}

/// `x` (rows of `cols`) with every row quantised per `block` channels, as an FP8 product sees it.
fn quantize_rows(x: &[f32], cols: usize, block: usize, ue8m0: bool) -> Vec<f32> {
    let mut out = x.to_vec();
    for row in out.chunks_exact_mut(cols) {
        for chunk in row.chunks_mut(block) {
            crate::fp8::quantize_block_in_place(chunk, ue8m0);
        }
    }
    out
}

#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}
impl SyncPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `c[m, n] = a[m, k] · b[k, n]` for plain f32 data with explicit strides (row stride, column
/// stride), through the GEMM crate.
#[allow(clippy::too_many_arguments)]
pub fn gemm_strided(
    m: usize,
    n: usize,
    k: usize,
    c: &mut [f32],
    c_strides: (usize, usize),
    a: &[f32],
    a_strides: (usize, usize),
    b: &[f32],
    b_strides: (usize, usize),
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |rows: usize, cols: usize, (rs, cs): (usize, usize)| (rows - 1) * rs + (cols - 1) * cs;
    assert!(last(m, n, c_strides) < c.len(), "gemm output out of bounds");
    if k > 0 {
        assert!(last(m, k, a_strides) < a.len(), "gemm lhs out of bounds");
        assert!(last(k, n, b_strides) < b.len(), "gemm rhs out of bounds");
    }
    let parallelism = if parallel {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: bounds checked above; the slices do not alias (c is &mut).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            c_strides.1 as isize,
            c_strides.0 as isize,
            false,
            a.as_ptr(),
            a_strides.1 as isize,
            a_strides.0 as isize,
            b.as_ptr(),
            b_strides.1 as isize,
            b_strides.0 as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}
