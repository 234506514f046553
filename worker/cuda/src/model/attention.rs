//! Multi-head latent attention of one layer: projections, YaRN RoPE, the latent cache write,
//! then the naive form for prefill steps or the weight-absorbed form over the paged cache.

use super::layers::Layer;
use super::{CudaModel, Span, StepLayout};
use crate::absorb;
use crate::fp8_gemm::QuantizedRows;
use crate::gpu::{DeviceBuf, Gpu};
use crate::kernels;
use crate::kernels::TokenTiles;
use crate::launch::{int, ptr, Args, Kernel};
use crate::mla_decode::{
    mla_decode, mla_decode_unmerged, DecodeBuffers, DecodeKernel, DecodeOutput, DecodeQuery, LatentShape, PagedRows,
    Splits,
};
use crate::mla_prefill::{prefill_with, PrefillBuffers, PrefillKernel, PrefillOutput, PrefillShape};
use crate::tiles::{ABSORB_MERGED_LORA, ABSORB_MERGED_ROWS, ABSORB_MERGED_VDIM};
use crate::weights::Format;
use anyhow::{ensure, Result};
use dsv3_engine::rope::softmax_scale;

pub(super) const LATENT_NORM_EPS: f32 = 1e-6;
/// Decode steps of at least this many rows absorb on Hopper's wgmma kernels by default: at 32
/// rows they measured level with the mma.sync kernels (slice5 decode, one H100), at 64 1–2%
/// faster, at 256 3%.
pub const ABSORB_WGMMA_MIN_ROWS: usize = 64;
/// Steps whose chunks all have at least this many rows (prefill) use the naive MLA form.
pub const NAIVE_MIN_ROWS: usize = 64;

/// MLA sizes: heads, the query/key parts without and with rotary position, value width and
/// latent rank; `qk` = nope + rope per head.
struct MlaDims {
    heads: usize,
    nope: usize,
    rope: usize,
    vdim: usize,
    lora: usize,
    qk: usize,
}

impl MlaDims {
    fn of(c: &dsv3_engine::ModelConfig) -> Self {
        let (nope, rope, lora) = (c.qk_nope_head_dim, c.qk_rope_head_dim, c.kv_lora_rank);
        MlaDims {
            heads: c.num_attention_heads,
            nope,
            rope,
            vdim: c.v_head_dim,
            lora,
            qk: nope + rope,
        }
    }
}

/// A prefill's attention output, all the step's rows: f32, or quantised for o_proj (codes, and
/// whether its scales are powers of two).
enum AttentionRows {
    F32(DeviceBuf, usize),
    Quantised(QuantizedRows, bool),
}

impl AttentionRows {
    /// Where the attention of the rows from `first` on goes, in a step of `rows` rows.
    fn starting_at(&self, first: usize, rows: usize) -> PrefillOutput {
        match self {
            AttentionRows::F32(buf, width) => PrefillOutput::F32 {
                out: buf.at(first * width * 4),
                ld: *width,
            },
            AttentionRows::Quantised(q, ue8m0) => PrefillOutput::Codes {
                codes: q.data.at(first * q.k),
                ld: q.k,
                scales: q.scales.at(first * 4),
                ld_scales: rows,
                ue8m0: *ue8m0,
            },
        }
    }
}

impl CudaModel {
    /// The attention block of `layer` added into `h`, from the normed rows `x` (quantised already
    /// where `xq` has them).
    pub(super) fn attention(
        &self,
        layer: &Layer,
        x: &DeviceBuf,
        xq: Option<&QuantizedRows>,
        h: &DeviceBuf,
        step: &StepLayout,
    ) -> Result<()> {
        let g = &self.gpu;
        let c = &self.config;
        let a = &layer.attn;
        let m = step.rows;
        let MlaDims {
            heads,
            rope,
            vdim,
            lora,
            qk,
            ..
        } = MlaDims::of(c);
        // One product for q_a and kv_a: [m, q_lora + lora + rope], the latent kv at column q_lora.
        let down_w = a.x_down.rows;
        let down = g.alloc(m * down_w * 4)?;
        self.linear_from(down.addr, down_w, x.addr, xq, m, &a.x_down, false)?;
        // q_b's input: the normed query latent, or x where the model has none.
        let q_latent;
        let (q_in, q_in_quantised, q_lora) = match &a.q_lora {
            Some((r, q_norm)) => {
                let ca = g.alloc(m * r * 4)?;
                let caq = self.norm_for_products(ca.addr, down.addr, down_w, q_norm, *r, m, LATENT_NORM_EPS)?;
                q_latent = (ca, caq);
                (q_latent.0.addr, q_latent.1.as_ref(), *r)
            }
            None => (x.addr, xq, 0),
        };
        // The latent: normed, rotated and written into the cache by one kernel, queued before q_b
        // so that it runs while q_b's blocks pull their first weights into L2 (programmatic
        // dependent launch), rather than as a latency of its own after q_b.
        let kv = down.addr + (q_lora * 4) as u64;
        let cache = self.cache.layer_addr(layer.index);
        kernels::kv_latent.launch(
            g,
            (m as u32, 1, 1),
            self.norm_threads(lora, m) as u32,
            0,
            (
                ptr(kv),
                int(down_w),
                ptr(a.kv_norm.addr),
                int(lora),
                int(rope),
                LATENT_NORM_EPS,
                ptr(step.rope_cos),
                ptr(step.rope_sin),
                ptr(step.lens),
                ptr(cache),
                ptr(step.slots),
            ),
        )?;
        // A prefill's attention reads its queries only as bf16, which q_b's product writes.
        let prefill = step.spans.iter().all(|sp| sp.rows >= NAIVE_MIN_ROWS);
        let q = if prefill {
            self.linear_from_to_bf16(q_in, q_in_quantised, m, &a.q_b)?
        } else {
            let q = g.alloc(m * heads * qk * 4)?;
            self.linear_from(q.addr, heads * qk, q_in, q_in_quantised, m, &a.q_b, false)?;
            q
        };
        if prefill {
            self.rotate_bf16_queries(&q, step)?;
            let kernel = PrefillKernel::for_shape(g, &self.prefill_shape(), self.prefill_attention)?;
            let width = heads * vdim;
            // Quantised where made when o_proj reads nothing else: 4 bytes a value fewer written,
            // and no pass to quantise them.
            let quantised =
                crate::linear::reads_quantised_only(g, self.kernels.small_batch, self.kernels.input_quant, m, &a.o)?
                    .filter(|_| kernel.writes_codes() && width == a.o.cols);
            let out = match quantised {
                Some(ue8m0) => AttentionRows::Quantised(QuantizedRows::alloc(g, m, width)?, ue8m0),
                None => AttentionRows::F32(g.alloc(m * width * 4)?, width),
            };
            for sp in &step.spans {
                self.attend_naive(layer, kernel, &q, out.starting_at(sp.first_row, m), step, sp)?;
            }
            return match &out {
                AttentionRows::Quantised(rows, _) => {
                    self.linear_from(h.addr, c.hidden_size, 0, Some(rows), m, &a.o, true)
                }
                AttentionRows::F32(rows, _) => self.linear(h.addr, c.hidden_size, rows.addr, m, &a.o, true),
            };
        }
        let attn = g.alloc(m * heads * vdim * 4)?;
        let quantised = self.attend_absorbed(layer, &q, &attn, step)?;
        self.linear_from(h.addr, c.hidden_size, attn.addr, quantised.as_ref(), m, &a.o, true)
    }

    /// The queries' rotary part rotated in place (one thread a pair), and with `bf16` the rotated
    /// queries also returned in bf16 (the same launch).
    fn rotate_queries(&self, q: &DeviceBuf, step: &StepLayout, bf16: bool) -> Result<Option<DeviceBuf>> {
        let g = &self.gpu;
        let m = step.rows;
        let MlaDims {
            heads, nope, rope, qk, ..
        } = MlaDims::of(&self.config);
        let ld = heads * qk;
        let (cos, sin, lens) = (ptr(step.rope_cos), ptr(step.rope_sin), ptr(step.lens));
        if !bf16 {
            let blocks = (heads * rope / 2).div_ceil(256).max(1) as u32;
            let args = (
                ptr(q.addr),
                int(ld),
                int(heads),
                int(qk),
                int(nope),
                int(rope),
                cos,
                sin,
                lens,
            );
            kernels::rope_interleaved.launch(g, (m as u32, blocks, 1), 256, 0, args)?;
            return Ok(None);
        }
        let qb = g.alloc(m * ld * 2)?;
        // Four pairs a thread where rows are whole 8-value groups (the kernel's rule), else one.
        let per_thread = if ld.is_multiple_of(8) { 8 } else { 2 };
        let blocks = (ld / per_thread).div_ceil(256).max(1) as u32;
        let args = (
            ptr(q.addr),
            ptr(qb.addr),
            int(ld),
            int(qk),
            int(nope),
            int(rope),
            cos,
            sin,
            lens,
        );
        kernels::rope_interleaved_bf16.launch(g, (m as u32, blocks, 1), 256, 0, args)?;
        Ok(Some(qb))
    }

    /// The rotary part of bf16 queries `q` (`[m, heads, qk]`, a prefill's) rotated in place.
    fn rotate_bf16_queries(&self, q: &DeviceBuf, step: &StepLayout) -> Result<()> {
        let MlaDims {
            heads, nope, rope, qk, ..
        } = MlaDims::of(&self.config);
        let ld = heads * qk;
        // Four pairs a thread where the kernel's rule allows, else one.
        let per_thread = if [ld, qk, nope, rope].iter().all(|v| v.is_multiple_of(8)) {
            4
        } else {
            1
        };
        let blocks = (heads * rope / 2 / per_thread).div_ceil(256).max(1) as u32;
        let args = (
            ptr(q.addr),
            int(ld),
            int(heads),
            int(qk),
            int(nope),
            int(rope),
            ptr(step.rope_cos),
            ptr(step.rope_sin),
            ptr(step.lens),
        );
        kernels::rope_interleaved_bf16_in_place.launch(&self.gpu, (step.rows as u32, blocks, 1), 256, 0, args)
    }

    /// Weight-absorbed attention over the latent cache for every row of the step (decode), into
    /// `attn`; also quantised for o_proj where the absorption that wrote it quantised it.
    fn attend_absorbed(
        &self,
        layer: &Layer,
        q: &DeviceBuf,
        attn: &DeviceBuf,
        step: &StepLayout,
    ) -> Result<Option<QuantizedRows>> {
        let g = &self.gpu;
        let c = &self.config;
        let m = step.rows;
        let MlaDims {
            heads,
            nope,
            rope,
            lora,
            qk,
            ..
        } = MlaDims::of(c);
        let cache = self.cache.layer_addr(layer.index);
        let shape = LatentShape {
            heads,
            lora,
            rope,
            qk,
            nope,
        };
        let kernel = if self.simt_attention {
            DecodeKernel::CudaCores
        } else {
            DecodeKernel::best(g, &shape, self.cache.block_size(), self.wgmma_attention)
        };
        // The queries absorbed into the latent space, as the kernel reads them: the wgmma kernel
        // copies them by TMA as bf16, its rotary part from q's bf16 copy, which the tensor-core
        // absorption reads too.
        let bf16_query = kernel.reads_bf16_query();
        let q_lat = g.alloc(m * heads * lora * if bf16_query { 2 } else { 4 })?;
        let mma_absorb = layer.attn.uk_t.is_some() && !self.kernels.simt_linear();
        let qb = self.rotate_queries(q, step, mma_absorb || bf16_query)?;
        self.absorb_q(layer, q, qb.as_ref(), &q_lat, m, bf16_query)?;
        let query = match &qb {
            Some(qb) if bf16_query => DecodeQuery::Bf16 {
                q_lat: q_lat.addr,
                q: qb.addr,
            },
            _ => DecodeQuery::F32 {
                q_lat: q_lat.addr,
                q: q.addr,
            },
        };
        // The output as the absorption of W_UV reads it: bf16 for the tensor-core one, written so by
        // the decode kernel itself where it can.
        let bf16_out = self.absorbs_out_on_tensor_cores(layer) && kernel.writes_bf16();
        let o_lat = g.alloc(m * heads * lora * if bf16_out { 2 } else { 4 })?;
        let rows = PagedRows {
            rows: m,
            max_len: step.max_len,
            tables: step.tables,
            table_off: step.table_off,
            lens: step.lens,
            block: self.cache.block_size(),
        };
        let bufs = DecodeBuffers {
            query,
            cache,
            cache_slots: self.cache.num_blocks() * self.cache.block_size(),
            o_lat: if bf16_out {
                DecodeOutput::Bf16(o_lat.addr)
            } else {
                DecodeOutput::F32(o_lat.addr)
            },
        };
        if bf16_out && self.merges_in_absorption(m) {
            if let Some(splits) = mla_decode_unmerged(g, &shape, &rows, &bufs, softmax_scale(c), kernel)? {
                return self.absorb_out_merging(layer, &splits, attn, m);
            }
        } else {
            mla_decode(g, &shape, &rows, &bufs, softmax_scale(c), kernel)?;
        }
        self.absorb_out(layer, &o_lat, bf16_out, attn, m)?;
        Ok(None)
    }

    /// Whether a step of `m` rows has the absorption of W_UV merge the decode's splits
    /// ([`Self::absorb_out_merging`]), where it runs on mma.sync with bf16 `o_lat`.
    fn merges_in_absorption(&self, m: usize) -> bool {
        let MlaDims { lora, vdim, .. } = MlaDims::of(&self.config);
        self.merge_in_absorption
            && m <= ABSORB_MERGED_ROWS
            && lora <= ABSORB_MERGED_LORA
            && vdim <= ABSORB_MERGED_VDIM
            && !self.absorbs_on_wgmma(m)
    }

    /// [`Self::absorb_out`] on the tensor cores from a decode's unmerged splits, its rows also
    /// quantised for o_proj where [`CudaModel::quantised_where_made`] says so
    /// (`mla_absorb_out_merged_mma`): the bits of `mla_combine` into bf16, `mla_absorb_out_mma_n1`
    /// and `quantize_rows_fp8`, in one launch.
    fn absorb_out_merging(
        &self,
        layer: &Layer,
        splits: &Splits,
        attn: &DeviceBuf,
        m: usize,
    ) -> Result<Option<QuantizedRows>> {
        let g = &self.gpu;
        let MlaDims {
            heads,
            nope,
            vdim,
            lora,
            ..
        } = MlaDims::of(&self.config);
        let width = heads * vdim;
        let quantised = match self.quantised_where_made(width) {
            Some(ue8m0) => Some((QuantizedRows::alloc(g, m, width)?, ue8m0)),
            None => None,
        };
        let (codes, scales, ue8m0) = match &quantised {
            Some((rows, ue8m0)) => (rows.data.addr, rows.scales.addr, *ue8m0),
            None => (0, 0, false),
        };
        let kvb = &layer.attn.kv_b;
        kernels::mla_absorb_out_merged_mma.launch(
            g,
            (1, heads as u32, 1),
            (vdim / 16 * 32) as u32,
            (2 * splits.count * 4) as u32,
            (
                ptr(attn.addr),
                ptr(codes),
                ptr(scales),
                int(ue8m0 as usize),
                ptr(splits.o_part.addr),
                ptr(splits.ml_part.addr),
                int(splits.count),
                int(m),
                int(heads),
                int(nope),
                int(vdim),
                int(lora),
                ptr(kvb.data.addr),
                ptr(kvb.scale_addr()),
            ),
        )?;
        Ok(quantised.map(|(rows, _)| rows))
    }

    /// `q_lat[t, h] = q_nope[t, h] · W_UK[h]`, f32 or (`bf16_out`) bf16: on the tensor cores over
    /// W_UK's transpose where the layer has it, from `qb` (q as bf16), else the CUDA-core kernel.
    fn absorb_q(
        &self,
        layer: &Layer,
        q: &DeviceBuf,
        qb: Option<&DeviceBuf>,
        q_lat: &DeviceBuf,
        m: usize,
        bf16_out: bool,
    ) -> Result<()> {
        let g = &self.gpu;
        let MlaDims {
            heads,
            nope,
            vdim,
            lora,
            qk,
            ..
        } = MlaDims::of(&self.config);
        let kvb = &layer.attn.kv_b;
        if let (Some(uk_t), false, Some(qb)) = (&layer.attn.uk_t, self.kernels.simt_linear(), qb) {
            if self.absorbs_on_wgmma(m) {
                let uk_t = (uk_t.data.addr, uk_t.scale_addr());
                return absorb::absorb_q(g, &self.head_dims(), m, (q_lat.addr, bf16_out), qb.addr, uk_t);
            }
            return absorb_mma(
                g,
                if bf16_out {
                    kernels::MLA_ABSORB_Q_MMA_BF16
                } else {
                    kernels::MLA_ABSORB_Q_MMA
                },
                lora,
                m,
                heads,
                (
                    ptr(q_lat.addr),
                    ptr(qb.addr),
                    int(m),
                    int(heads),
                    int(qk),
                    int(nope),
                    int(lora),
                    ptr(uk_t.data.addr),
                    ptr(uk_t.scale_addr()),
                ),
            );
        }
        kernels::mla_absorb_q.launch(
            g,
            (heads as u32, m.div_ceil(8) as u32, 1),
            lora.next_multiple_of(32) as u32,
            0,
            (
                ptr(q_lat.addr),
                ptr(q.addr),
                int(m),
                int(heads),
                int(qk),
                int(nope),
                int(vdim),
                int(lora),
                int(kvb.format as usize),
                ptr(kvb.data.addr),
                ptr(kvb.scale_addr()),
                int(bf16_out as usize),
            ),
        )
    }

    /// Whether [`Self::absorb_out`] runs on the tensor cores (reading `o_lat` as bf16): when kv_b
    /// is FP8 with 128-aligned heads.
    fn absorbs_out_on_tensor_cores(&self, layer: &Layer) -> bool {
        let MlaDims { nope, vdim, lora, .. } = MlaDims::of(&self.config);
        let aligned = nope % 128 == 0 && vdim % 128 == 0 && lora % 128 == 0;
        layer.attn.kv_b.format == Format::Fp8 && aligned && !self.kernels.simt_linear()
    }

    /// Whether a step of `m` rows absorbs on Hopper's wgmma kernel (`mla_absorb_*_wgmma`), where the
    /// tensor-core absorptions run at all.
    fn absorbs_on_wgmma(&self, m: usize) -> bool {
        m >= self.absorb_wgmma_rows && absorb::takes(&self.gpu, &self.head_dims())
    }

    fn head_dims(&self) -> absorb::HeadDims {
        let d = MlaDims::of(&self.config);
        absorb::HeadDims {
            heads: d.heads,
            nope: d.nope,
            qk: d.qk,
            vdim: d.vdim,
            lora: d.lora,
        }
    }

    /// `attn[t, h*v + j] = o_lat[t, h] · W_UV[h][j]`, `o_lat` f32 or (`bf16_lat`) bf16: on the
    /// tensor cores where [`Self::absorbs_out_on_tensor_cores`], else the CUDA-core kernel (f32
    /// only).
    fn absorb_out(&self, layer: &Layer, o_lat: &DeviceBuf, bf16_lat: bool, attn: &DeviceBuf, m: usize) -> Result<()> {
        let g = &self.gpu;
        let MlaDims {
            heads,
            nope,
            vdim,
            lora,
            ..
        } = MlaDims::of(&self.config);
        let kvb = &layer.attn.kv_b;
        if self.absorbs_out_on_tensor_cores(layer) {
            let converted = if bf16_lat {
                None
            } else {
                Some(g.to_bf16(o_lat.addr, m * heads * lora)?)
            };
            let ob = converted.as_ref().unwrap_or(o_lat);
            if self.absorbs_on_wgmma(m) {
                let kv_b = (kvb.data.addr, kvb.scale_addr());
                return absorb::absorb_out(g, &self.head_dims(), m, attn.addr, ob.addr, kv_b);
            }
            return absorb_mma(
                g,
                kernels::MLA_ABSORB_OUT_MMA,
                vdim,
                m,
                heads,
                (
                    ptr(attn.addr),
                    ptr(ob.addr),
                    int(m),
                    int(heads),
                    int(nope),
                    int(vdim),
                    int(lora),
                    ptr(kvb.data.addr),
                    ptr(kvb.scale_addr()),
                ),
            );
        }
        ensure!(!bf16_lat, "the CUDA-core absorption of W_UV reads o_lat as f32");
        kernels::mla_absorb_out.launch(
            g,
            (heads as u32, m.div_ceil(8) as u32, 1),
            256,
            0,
            (
                ptr(attn.addr),
                ptr(o_lat.addr),
                int(m),
                int(heads),
                int(nope),
                int(vdim),
                int(lora),
                int(kvb.format as usize),
                ptr(kvb.data.addr),
                ptr(kvb.scale_addr()),
            ),
        )
    }

    /// Naive-form attention for one prefill chunk: K and V expanded from every cached latent of
    /// the sequence, then causal QKᵀ and PV per head on the tensor cores, a group of heads at a time,
    /// on `kernel` into `out`. `qb`: the step's rotated queries in bf16.
    #[allow(clippy::too_many_arguments)]
    fn attend_naive(
        &self,
        layer: &Layer,
        kernel: PrefillKernel,
        qb: &DeviceBuf,
        out: PrefillOutput,
        step: &StepLayout,
        span: &Span,
    ) -> Result<()> {
        let g = &self.gpu;
        let c = &self.config;
        let MlaDims {
            heads, rope, lora, qk, ..
        } = MlaDims::of(c);
        let (n, total) = (span.rows, span.start + span.rows);
        let table = step.tables + (span.table_off * 4) as u64;
        let c_kv = g.alloc(total * lora * 4)?;
        let k_pe = g.alloc(total * rope * 2)?;
        kernels::gather_latents.launch(
            g,
            (total as u32, 1, 1),
            256,
            0,
            (
                ptr(c_kv.addr),
                ptr(k_pe.addr),
                ptr(self.cache.layer_addr(layer.index)),
                ptr(table),
                int(self.cache.block_size()),
                int(lora),
                int(rope),
            ),
        )?;
        // kv_b's product in bf16, which the attention reads in place. The latents meet kv_b
        // unquantised, whatever the model's FP8 activations: decode folds kv_b into the query and
        // the output (absorb_q, absorb_out) on bf16, and both forms must compute the same attention.
        let kv = crate::linear::linear_to_bf16(
            g,
            &self.dequant,
            self.kernels.simt_linear(),
            c_kv.addr,
            total,
            &layer.attn.kv_b,
        )?;
        let bufs = PrefillBuffers {
            q: qb.at(span.first_row * heads * qk * 2),
            kv: kv.addr,
            k_pe: k_pe.addr,
            out,
        };
        prefill_with(g, kernel, &self.prefill_shape(), &bufs, n, span.start, softmax_scale(c))
    }

    /// The naive form's head sizes.
    fn prefill_shape(&self) -> PrefillShape {
        let MlaDims {
            heads,
            nope,
            rope,
            vdim,
            ..
        } = MlaDims::of(&self.config);
        PrefillShape {
            heads,
            nope,
            rope,
            vdim,
        }
    }
}

/// Launches the variant of an absorption kernel that suits `m` rows, 64 of the `cols` output
/// columns per block, every head.
fn absorb_mma<A: Args>(
    g: &Gpu,
    variants: TokenTiles<Kernel<A>>,
    cols: usize,
    m: usize,
    heads: usize,
    args: A,
) -> Result<()> {
    let (variant, tile) = variants.for_rows(m);
    variant.launch(
        g,
        ((cols / 64) as u32, (heads * m.div_ceil(tile)) as u32, 1),
        128,
        0,
        args,
    )
}
