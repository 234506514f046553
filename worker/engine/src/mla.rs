//! Multi-head Latent Attention (spec §3.1, §5) over the paged latent cache.
//!
//! Two equivalent forms: the naive one expands keys and values of every cached position with
//! `kv_b_proj` (cheaper per key for long prompts), the absorbed one folds `W_UK` into the query
//! and `W_UV` after the weighted sum, attending directly over the 576-wide latent rows (decode).

use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::kv_cache::{KvCache, SeqId};
use crate::linear::{gemm_strided, Matrix};
use crate::ops::{rms_norm, softmax_prefix};
use crate::rope::{softmax_scale, Rope};
use anyhow::Result;
use rayon::prelude::*;
use safetensors::Dtype;

/// Which MLA form a chunk uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MlaForm {
    /// Naive for multi-token chunks, absorbed for single-token (decode) chunks.
    #[default]
    Auto,
    Naive,
    Absorbed,
}

// One per layer: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum QueryProj {
    LowRank { a: Matrix, norm: Vec<f32>, b: Matrix },
    Full(Matrix),
}

pub struct Mla {
    query: QueryProj,
    kv_a: Matrix,
    kv_norm: Vec<f32>,
    kv_b: Matrix,
    o: Matrix,
    heads: usize,
    nope: usize,
    rope: usize,
    v: usize,
    lora: usize,
    scale: f32,
}

/// Where each token of a step goes: its sequence, position, and its chunk.
pub struct ChunkSpan {
    pub seq: SeqId,
    pub start: usize,
    /// Rows of the step's token matrix that belong to this chunk.
    pub rows: std::ops::Range<usize>,
}

/// Latent norms ignore `rms_norm_eps` in both reference codes.
const LATENT_NORM_EPS: f32 = 1e-6;

fn load_norm(ckpt: &Checkpoint, name: &str, len: usize) -> Result<Vec<f32>> {
    let t = ckpt.get(name)?;
    t.expect(&[Dtype::F32, Dtype::BF16, Dtype::F16], &[len])?;
    t.to_f32_vec()
}

impl Mla {
    pub fn load(ckpt: &Checkpoint, prefix: &str, config: &ModelConfig) -> Result<Self> {
        let q = config.quantization.as_ref();
        let h = config.hidden_size;
        let heads = config.num_attention_heads;
        let qk = config.qk_head_dim();
        let lora = config.kv_lora_rank;
        let query = match config.q_lora_rank {
            Some(rank) => QueryProj::LowRank {
                a: Matrix::load(ckpt, &format!("{prefix}.q_a_proj.weight"), rank, h, q)?,
                norm: load_norm(ckpt, &format!("{prefix}.q_a_layernorm.weight"), rank)?,
                b: Matrix::load(ckpt, &format!("{prefix}.q_b_proj.weight"), heads * qk, rank, q)?,
            },
            None => QueryProj::Full(Matrix::load(
                ckpt,
                &format!("{prefix}.q_proj.weight"),
                heads * qk,
                h,
                q,
            )?),
        };
        Ok(Mla {
            query,
            kv_a: Matrix::load(
                ckpt,
                &format!("{prefix}.kv_a_proj_with_mqa.weight"),
                lora + config.qk_rope_head_dim,
                h,
                q,
            )?,
            kv_norm: load_norm(ckpt, &format!("{prefix}.kv_a_layernorm.weight"), lora)?,
            kv_b: Matrix::load(
                ckpt,
                &format!("{prefix}.kv_b_proj.weight"),
                heads * (config.qk_nope_head_dim + config.v_head_dim),
                lora,
                q,
            )?,
            o: Matrix::load(
                ckpt,
                &format!("{prefix}.o_proj.weight"),
                h,
                heads * config.v_head_dim,
                q,
            )?,
            heads,
            nope: config.qk_nope_head_dim,
            rope: config.qk_rope_head_dim,
            v: config.v_head_dim,
            lora,
            scale: softmax_scale(config),
        })
    }

    pub fn weight_bytes(&self) -> usize {
        let q = match &self.query {
            QueryProj::LowRank { a, b, .. } => a.weight_bytes() + b.weight_bytes(),
            QueryProj::Full(m) => m.weight_bytes(),
        };
        q + self.kv_a.weight_bytes() + self.kv_b.weight_bytes() + self.o.weight_bytes()
    }

    /// Attention for all tokens of a step. `x` is the normalised input `[T, hidden]`; `cos`/`sin`
    /// hold each token's rotary table (`[T, rope/2]`). Writes the step's latent rows into layer
    /// `layer` of the cache, then attends over positions `0..=pos` of each token's sequence.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        layer: usize,
        x: &[f32],
        spans: &[ChunkSpan],
        cos: &[f32],
        sin: &[f32],
        cache: &mut KvCache,
        form: MlaForm,
    ) -> Result<Vec<f32>> {
        let t = x.len() / self.kv_a.cols;
        let qk = self.nope + self.rope;
        let half = self.rope / 2;
        let mut q = match &self.query {
            QueryProj::LowRank { a, norm, b } => {
                let mut c = a.forward(x, t);
                rms_norm(&mut c, norm, LATENT_NORM_EPS);
                b.forward(&c, t)
            }
            QueryProj::Full(m) => m.forward(x, t),
        };
        let mut kv = self.kv_a.forward(x, t);
        let width = self.lora + self.rope;
        for i in 0..t {
            let (cs, sn) = (&cos[i * half..(i + 1) * half], &sin[i * half..(i + 1) * half]);
            let row = &mut kv[i * width..(i + 1) * width];
            rms_norm(&mut row[..self.lora], &self.kv_norm, LATENT_NORM_EPS);
            Rope::rotate(&mut row[self.lora..], cs, sn);
            for h in 0..self.heads {
                let at = i * self.heads * qk + h * qk + self.nope;
                Rope::rotate(&mut q[at..at + self.rope], cs, sn);
            }
        }
        for span in spans {
            for (k, i) in span.rows.clone().enumerate() {
                cache.write(layer, span.seq, span.start + k, &kv[i * width..(i + 1) * width])?;
            }
        }
        // kv_b decoded once per step: rows h*(nope+v) + [0, nope) are W_UK^h, the rest W_UV^h.
        let mut kv_b = vec![0.0f32; self.kv_b.rows * self.lora];
        self.kv_b.decode_rows(0, self.kv_b.rows, &mut kv_b);
        let parallel_inside = spans.len() == 1;
        let cache_ref = &*cache;
        let outputs: Vec<Result<Vec<f32>>> = spans
            .par_iter()
            .map(|span| {
                let n = span.rows.len();
                let total = span.start + n;
                let mut latents = Vec::new();
                cache_ref.gather(layer, span.seq, total, &mut latents)?;
                let q_chunk = &q[span.rows.start * self.heads * qk..span.rows.end * self.heads * qk];
                let use_naive = match form {
                    MlaForm::Naive => true,
                    MlaForm::Absorbed => false,
                    MlaForm::Auto => n > 1,
                };
                Ok(if use_naive {
                    self.attend_naive(q_chunk, n, span.start, &latents, total, &kv_b, parallel_inside)
                } else {
                    self.attend_absorbed(q_chunk, n, span.start, &latents, total, &kv_b, parallel_inside)
                })
            })
            .collect();
        let mut attn = Vec::with_capacity(t * self.heads * self.v);
        for o in outputs {
            attn.extend(o?);
        }
        Ok(self.o.forward(&attn, t))
    }

    /// Causal softmax over `scores` rows laid out `[n, heads, total]` (query i sits at `start+i`).
    fn causal_softmax(&self, scores: &mut [f32], n: usize, start: usize, total: usize) {
        for i in 0..n {
            for h in 0..self.heads {
                let row = &mut scores[(i * self.heads + h) * total..(i * self.heads + h + 1) * total];
                row.iter_mut().for_each(|s| *s *= self.scale);
                softmax_prefix(row, start + i + 1);
            }
        }
    }

    /// Expands K/V for every cached position, then ordinary attention per head.
    #[allow(clippy::too_many_arguments)]
    fn attend_naive(
        &self,
        q: &[f32],
        n: usize,
        start: usize,
        latents: &[f32],
        total: usize,
        kv_b: &[f32],
        par: bool,
    ) -> Vec<f32> {
        let (heads, nope, rope, v, lora) = (self.heads, self.nope, self.rope, self.v, self.lora);
        let qk = nope + rope;
        let width = lora + rope;
        let per_head = nope + v;
        // kvb[s, h*(nope+v) + j] = c_kv[s] · kv_b[h*(nope+v) + j]
        let mut kvb = vec![0.0f32; total * heads * per_head];
        gemm_strided(
            total,
            heads * per_head,
            lora,
            &mut kvb,
            (heads * per_head, 1),
            latents,
            (width, 1),
            kv_b,
            (1, lora),
            par,
        );
        let mut scores = vec![0.0f32; n * heads * total];
        for h in 0..heads {
            // scores[i, h, s] = q_nope_h[i] · k_nope_h[s] + q_pe_h[i] · k_pe[s]
            let out = &mut scores[h * total..];
            gemm_strided(
                n,
                total,
                nope,
                out,
                (heads * total, 1),
                &q[h * qk..],
                (heads * qk, 1),
                &kvb[h * per_head..],
                (1, heads * per_head),
                par,
            );
            let mut pe = vec![0.0f32; n * total];
            gemm_strided(
                n,
                total,
                rope,
                &mut pe,
                (total, 1),
                &q[h * qk + nope..],
                (heads * qk, 1),
                &latents[lora..],
                (1, width),
                par,
            );
            for i in 0..n {
                let row = &mut scores[(i * heads + h) * total..(i * heads + h + 1) * total];
                for (s, p) in row.iter_mut().zip(&pe[i * total..(i + 1) * total]) {
                    *s += p;
                }
            }
        }
        self.causal_softmax(&mut scores, n, start, total);
        let mut out = vec![0.0f32; n * heads * v];
        for h in 0..heads {
            gemm_strided(
                n,
                v,
                total,
                &mut out[h * v..],
                (heads * v, 1),
                &scores[h * total..],
                (heads * total, 1),
                &kvb[h * per_head + nope..],
                (heads * per_head, 1),
                par,
            );
        }
        out
    }

    /// Attends over the latent rows directly: MQA with one 576-wide key and 512-wide value.
    #[allow(clippy::too_many_arguments)]
    fn attend_absorbed(
        &self,
        q: &[f32],
        n: usize,
        start: usize,
        latents: &[f32],
        total: usize,
        kv_b: &[f32],
        par: bool,
    ) -> Vec<f32> {
        let (heads, nope, rope, v, lora) = (self.heads, self.nope, self.rope, self.v, self.lora);
        let qk = nope + rope;
        let width = lora + rope;
        let per_head = nope + v;
        // q_abs[i, h] = [W_UK^hᵀ q_nope_h[i] ; q_pe_h[i]]
        let mut q_abs = vec![0.0f32; n * heads * width];
        for h in 0..heads {
            gemm_strided(
                n,
                lora,
                nope,
                &mut q_abs[h * width..],
                (heads * width, 1),
                &q[h * qk..],
                (heads * qk, 1),
                &kv_b[h * per_head * lora..],
                (lora, 1),
                par,
            );
            for i in 0..n {
                let dst = (i * heads + h) * width + lora;
                let src = i * heads * qk + h * qk + nope;
                q_abs[dst..dst + rope].copy_from_slice(&q[src..src + rope]);
            }
        }
        let mut scores = vec![0.0f32; n * heads * total];
        gemm_strided(
            n * heads,
            total,
            width,
            &mut scores,
            (total, 1),
            &q_abs,
            (width, 1),
            latents,
            (1, width),
            par,
        );
        self.causal_softmax(&mut scores, n, start, total);
        // o_lat[i, h] = Σ_s P[i,h,s] c_kv[s]; o[i, h] = W_UV^h o_lat[i, h]
        let mut o_lat = vec![0.0f32; n * heads * lora];
        gemm_strided(
            n * heads,
            lora,
            total,
            &mut o_lat,
            (lora, 1),
            &scores,
            (total, 1),
            latents,
            (width, 1),
            par,
        );
        let mut out = vec![0.0f32; n * heads * v];
        for h in 0..heads {
            gemm_strided(
                n,
                v,
                lora,
                &mut out[h * v..],
                (heads * v, 1),
                &o_lat[h * lora..],
                (heads * lora, 1),
                &kv_b[(h * per_head + nope) * lora..],
                (1, lora),
                par,
            );
        }
        out
    }
}
