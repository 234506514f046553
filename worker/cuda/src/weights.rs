//! Weights on the GPU in their checkpoint format: FP8 bytes with 128×128 f32 scales, bf16 or f32.

use crate::gpu::{DeviceBuf, Gpu};
use crate::kernels;
use crate::launch::{int, ptr};
use anyhow::{bail, Context, Result};
use dsv3_engine::Checkpoint;
use safetensors::Dtype;

pub const QBLOCK: usize = 128;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    F32 = 0,
    Bf16 = 1,
    Fp8 = 2,
}

impl Format {
    pub fn element_bytes(self) -> usize {
        match self {
            Format::F32 => 4,
            Format::Bf16 => 2,
            Format::Fp8 => 1,
        }
    }

    /// Columns one GEMV lane reads per 16-byte load.
    fn lane_width(self) -> usize {
        16 / self.element_bytes()
    }
}

/// `[rows, cols]` row-major weight.
pub struct DeviceMatrix {
    pub rows: usize,
    pub cols: usize,
    pub format: Format,
    pub data: DeviceBuf,
    /// FP8 only: `[ceil(rows/128), ceil(cols/128)]`.
    pub scales: Option<DeviceBuf>,
}

pub fn scale_shape(rows: usize, cols: usize) -> (usize, usize) {
    (rows.div_ceil(QBLOCK), cols.div_ceil(QBLOCK))
}

fn check_cols(name: &str, cols: usize, format: Format) -> Result<()> {
    if !cols.is_multiple_of(format.lane_width()) {
        bail!(
            "tensor `{name}`: {cols} columns is not a multiple of {} as the CUDA kernels need",
            format.lane_width()
        );
    }
    Ok(())
}

impl DeviceMatrix {
    /// Uploads `name` (shape `[rows, cols]`) and, for FP8, its `_scale_inv` companion.
    pub fn load(gpu: &Gpu, ckpt: &Checkpoint, name: &str, rows: usize, cols: usize) -> Result<Self> {
        Self::load_stacked(gpu, ckpt, &[(name, rows)], cols)
    }

    /// Matrices `(name, rows)` of `cols` columns stacked into one (their rows one after another),
    /// so one product computes them all from the same input. They must share a format, and for
    /// FP8 every part but the last must be whole 128-row scale blocks.
    pub fn load_stacked(gpu: &Gpu, ckpt: &Checkpoint, parts: &[(&str, usize)], cols: usize) -> Result<Self> {
        let mut format = None;
        let (mut tensors, mut scales, mut rows) = (Vec::new(), Vec::new(), 0);
        for (i, &(name, part_rows)) in parts.iter().enumerate() {
            let t = ckpt.get(name)?;
            t.expect(&[Dtype::F32, Dtype::BF16, Dtype::F8_E4M3], &[part_rows, cols])?;
            let part_format = match t.dtype {
                Dtype::F32 => Format::F32,
                Dtype::BF16 => Format::Bf16,
                _ => Format::Fp8,
            };
            check_cols(name, cols, part_format)?;
            let first = *format.get_or_insert(part_format);
            if first != part_format {
                bail!(
                    "`{name}` is {part_format:?} but `{}` is {first:?}: they cannot be stacked",
                    parts[0].0
                );
            }
            if part_format == Format::Fp8 {
                if i + 1 < parts.len() && part_rows % QBLOCK != 0 {
                    bail!("`{name}` has {part_rows} rows, not whole {QBLOCK}-row scale blocks, so the matrices after it cannot share its FP8 scales");
                }
                let s = ckpt.get(&format!("{name}_scale_inv"))?;
                let (sr, sc) = scale_shape(part_rows, cols);
                s.expect(&[Dtype::F32, Dtype::BF16], &[sr, sc])?;
                let values = s.to_f32_vec()?;
                if let Some(bad) = values.iter().position(|v| !v.is_finite()) {
                    bail!(
                        "tensor `{name}_scale_inv` in {} has a non-finite scale at index {bad}",
                        s.file
                    );
                }
                scales.extend(values);
            }
            tensors.push(t);
            rows += part_rows;
        }
        let format = format.context("no matrix to load")?;
        // One part goes up straight from the mapped file; stacked ones through one host copy.
        let data = match tensors.as_slice() {
            [one] => gpu.upload(one.data())?,
            many => gpu.upload(&many.iter().flat_map(|t| t.data().iter().copied()).collect::<Vec<u8>>())?,
        };
        Ok(DeviceMatrix {
            rows,
            cols,
            format,
            data,
            scales: (format == Format::Fp8).then(|| gpu.upload(&scales)).transpose()?,
        })
    }

    /// Random weights made on the GPU (benchmarks): entries of size about 1/sqrt(cols).
    pub fn random(gpu: &Gpu, rows: usize, cols: usize, format: Format, seed: u64) -> Result<Self> {
        check_cols("random", cols, format)?;
        let n = rows * cols;
        let data = gpu.alloc(n * format.element_bytes())?;
        let std = 1.0 / (cols as f32).sqrt();
        let scales = match format {
            Format::Fp8 => {
                kernels::random_fp8.launch_1d(gpu, n, (ptr(data.addr), n as u64, seed))?;
                let (sr, sc) = scale_shape(rows, cols);
                let s = gpu.alloc(sr * sc * 4)?;
                // random_fp8 magnitudes have an RMS near 1.8
                let base = std / 1.8;
                kernels::random_f32.launch_1d(
                    gpu,
                    sr * sc,
                    (ptr(s.addr), (sr * sc) as u64, seed ^ 0x5ca1e, 0.5 * base, 1.5 * base),
                )?;
                Some(s)
            }
            Format::Bf16 => {
                let a = std * 3f32.sqrt();
                kernels::random_bf16.launch_1d(gpu, n, (ptr(data.addr), n as u64, seed, -a, a))?;
                None
            }
            Format::F32 => {
                let a = std * 3f32.sqrt();
                kernels::random_f32.launch_1d(gpu, n, (ptr(data.addr), n as u64, seed, -a, a))?;
                None
            }
        };
        Ok(DeviceMatrix {
            rows,
            cols,
            format,
            data,
            scales,
        })
    }

    pub fn scale_addr(&self) -> u64 {
        self.scales.as_ref().map_or(0, |s| s.addr)
    }

    /// Bytes one full product reads.
    pub fn bytes(&self) -> usize {
        self.data.bytes + self.scales.as_ref().map_or(0, |s| s.bytes)
    }

    /// Dequantises into `out` (bf16, at least rows*cols elements).
    pub fn dequant_into(&self, gpu: &Gpu, out: u64) -> Result<()> {
        let n = self.rows * self.cols;
        if self.format == Format::Fp8 && n < u32::MAX as usize {
            return dequant_fp8(gpu, out, self.data.addr, self.scale_addr(), self.rows, self.cols);
        }
        kernels::dequant_bf16.launch_1d(
            gpu,
            n,
            (
                ptr(out),
                int(self.format as usize),
                ptr(self.data.addr),
                ptr(self.scale_addr()),
                int(0),
                int(self.rows),
                int(self.cols),
            ),
        )
    }
}

/// FP8 `[rows, cols]` (cols % 16 == 0) with its scales to bf16 at `out`.
pub fn dequant_fp8(gpu: &Gpu, out: u64, data: u64, scales: u64, rows: usize, cols: usize) -> Result<()> {
    kernels::dequant_fp8_bf16.launch_1d(
        gpu,
        (rows * cols).div_ceil(16),
        (ptr(out), ptr(data), ptr(scales), int(rows), int(cols)),
    )
}

/// An f32 vector on the GPU (norm weights, biases).
pub fn load_vector(gpu: &Gpu, ckpt: &Checkpoint, name: &str, len: usize) -> Result<DeviceBuf> {
    let t = ckpt.get(name)?;
    t.expect(&[Dtype::F32, Dtype::BF16, Dtype::F16], &[len])?;
    gpu.upload(&t.to_f32_vec()?)
}

pub fn random_vector(gpu: &Gpu, len: usize, lo: f32, hi: f32, seed: u64) -> Result<DeviceBuf> {
    let b = gpu.alloc(len * 4)?;
    kernels::random_f32.launch_1d(gpu, len, (ptr(b.addr), len as u64, seed, lo, hi))?;
    Ok(b)
}

/// The routed experts of one layer, each matrix kind stacked `[experts, rows, cols]` (FP8).
pub struct ExpertBank {
    pub experts: usize,
    pub gate: Stacked,
    pub up: Stacked,
    pub down: Stacked,
}

pub struct Stacked {
    pub rows: usize,
    pub cols: usize,
    pub data: DeviceBuf,
    pub scales: DeviceBuf,
}

impl Stacked {
    pub fn stride(&self) -> usize {
        self.rows * self.cols
    }

    pub fn scale_stride(&self) -> usize {
        let (r, c) = scale_shape(self.rows, self.cols);
        r * c
    }

    fn alloc(gpu: &Gpu, experts: usize, rows: usize, cols: usize) -> Result<Self> {
        let (sr, sc) = scale_shape(rows, cols);
        Ok(Stacked {
            rows,
            cols,
            data: gpu.alloc(experts * rows * cols)?,
            scales: gpu.alloc(experts * sr * sc * 4)?,
        })
    }

    /// Loads expert `e`'s matrix `name`: FP8 with its block scales as stored, or bf16 quantised
    /// to FP8 128x128 blocks on the GPU as the official checkpoints are made (the routed-expert
    /// kernels multiply FP8 weights).
    fn load_one(&self, gpu: &Gpu, ckpt: &Checkpoint, name: &str, e: usize) -> Result<()> {
        let t = ckpt.get(name)?;
        check_cols(name, self.cols, Format::Fp8)?;
        if t.dtype == Dtype::BF16 {
            t.expect(&[Dtype::BF16], &[self.rows, self.cols])?;
            let staged = gpu.upload(t.data())?;
            let (sr, sc) = scale_shape(self.rows, self.cols);
            return kernels::quantize_weight_fp8.launch(
                gpu,
                (sc as u32, sr as u32, 1),
                256,
                0,
                (
                    ptr(self.data.addr + (e * self.stride()) as u64),
                    ptr(self.scales.addr + (e * self.scale_stride() * 4) as u64),
                    ptr(staged.addr),
                    int(self.rows),
                    int(self.cols),
                    int(sc),
                ),
            );
        }
        if t.dtype != Dtype::F8_E4M3 {
            bail!(
                "tensor `{name}` in {} is {:?}: routed experts on the CUDA backend are FP8 or bf16",
                t.file,
                t.dtype
            );
        }
        t.expect(&[Dtype::F8_E4M3], &[self.rows, self.cols])?;
        gpu.copy_to(&self.data, e * self.stride(), t.data())?;
        let s = ckpt.get(&format!("{name}_scale_inv"))?;
        let (sr, sc) = scale_shape(self.rows, self.cols);
        s.expect(&[Dtype::F32, Dtype::BF16], &[sr, sc])?;
        gpu.copy_to(&self.scales, e * self.scale_stride() * 4, &s.to_f32_vec()?)
    }

    fn randomize(&self, gpu: &Gpu, experts: usize, seed: u64) -> Result<()> {
        let n = experts * self.stride();
        kernels::random_fp8.launch_1d(gpu, n, (ptr(self.data.addr), n as u64, seed))?;
        let ns = experts * self.scale_stride();
        let base = 1.0 / (self.cols as f32).sqrt() / 1.8;
        kernels::random_f32.launch_1d(
            gpu,
            ns,
            (ptr(self.scales.addr), ns as u64, seed ^ 0x5ca1e, 0.5 * base, 1.5 * base),
        )
    }

    pub fn bytes_per_expert(&self) -> usize {
        self.stride() + self.scale_stride() * 4
    }
}

impl ExpertBank {
    /// Loads experts `ids` of the MoE block at `prefix`; expert `ids[i]` becomes bank index `i`.
    /// Only their tensors are read (the checkpoint is memory-mapped).
    pub fn load(gpu: &Gpu, ckpt: &Checkpoint, prefix: &str, ids: &[u32], hidden: usize, inter: usize) -> Result<Self> {
        let bank = Self::alloc(gpu, ids.len(), hidden, inter)?;
        for (i, e) in ids.iter().enumerate() {
            let p = format!("{prefix}.experts.{e}");
            bank.gate.load_one(gpu, ckpt, &format!("{p}.gate_proj.weight"), i)?;
            bank.up.load_one(gpu, ckpt, &format!("{p}.up_proj.weight"), i)?;
            bank.down.load_one(gpu, ckpt, &format!("{p}.down_proj.weight"), i)?;
        }
        Ok(bank)
    }

    pub fn random(gpu: &Gpu, experts: usize, hidden: usize, inter: usize, seed: u64) -> Result<Self> {
        let bank = Self::alloc(gpu, experts, hidden, inter)?;
        bank.gate.randomize(gpu, experts, seed)?;
        bank.up.randomize(gpu, experts, seed + 1)?;
        bank.down.randomize(gpu, experts, seed + 2)?;
        Ok(bank)
    }

    fn alloc(gpu: &Gpu, experts: usize, hidden: usize, inter: usize) -> Result<Self> {
        Ok(ExpertBank {
            experts,
            gate: Stacked::alloc(gpu, experts, inter, hidden)?,
            up: Stacked::alloc(gpu, experts, inter, hidden)?,
            down: Stacked::alloc(gpu, experts, hidden, inter)?,
        })
    }

    pub fn bytes_per_expert(&self) -> usize {
        self.gate.bytes_per_expert() + self.up.bytes_per_expert() + self.down.bytes_per_expert()
    }
}
