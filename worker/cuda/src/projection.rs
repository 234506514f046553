//! The measured parts of the full-model projection (`dsv3-worker bench-projection`), on one GPU
//! with full-width random FP8 weights: an attention rank's decode step without its routed experts
//! (per layer kind, at a long cached context), and an expert shard's time for one MoE layer of the
//! tokens it receives.

use crate::bench::{decode, v3_config};
use crate::gpu::Gpu;
use crate::kernels;
use crate::launch::ptr;
use crate::model::{run_bank, BankCounters, CudaModel, ExpertKernels, MoeStats};
use crate::weights::ExpertBank;
use anyhow::Result;
use dsv3_engine::{ExpertExecutor, Fp8Activations, TokenRoutes};
use std::sync::Arc;

/// Routed experts that answer zeros at once: what is left to time is the attention side of a MoE
/// layer (gate, shared expert, the rows to and from the host), or the transport to such shards.
pub struct NoExperts;

impl ExpertExecutor for NoExperts {
    fn routed_experts(&self, _layer: usize, x: &[f32], _routes: &TokenRoutes) -> Result<Vec<f32>> {
        Ok(vec![0.0; x.len()])
    }
}

/// Top-`k` routes of `tokens` tokens over `experts` experts, uniform and distinct per token (in
/// ascending order), from a fixed seed.
pub fn uniform_routes(tokens: usize, experts: u32, k: usize, seed: u64) -> TokenRoutes {
    let mut state = seed | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut routes = TokenRoutes {
        k,
        ..TokenRoutes::default()
    };
    for _ in 0..tokens {
        let mut chosen: Vec<u32> = Vec::new();
        while chosen.len() < k {
            let e = (next() % experts as u64) as u32;
            if !chosen.contains(&e) {
                chosen.push(e);
            }
        }
        chosen.sort_unstable();
        routes.experts.extend(&chosen);
        routes.weights.extend(std::iter::repeat_n(0.3f32, k));
    }
    routes
}

/// An attention rank's decode step at one batch, in seconds.
#[derive(Clone, Copy, Debug)]
pub struct AttentionStep {
    pub batch: usize,
    /// Embedding, one dense layer, one MoE layer and the head (greedy token on the GPU).
    pub ends: f64,
    /// One more dense layer (MLA + dense MLP).
    pub dense: f64,
    /// One more MoE layer without its routed experts (MLA, gate, shared expert, host round trip).
    pub moe: f64,
}

impl AttentionStep {
    /// The step of a model of `dense` dense and `moe` MoE layers (both at least one).
    pub fn model(&self, dense: usize, moe: usize) -> f64 {
        self.ends + (dense - 1) as f64 * self.dense + (moe - 1) as f64 * self.moe
    }
}

/// Decode steps of `batches` sequences of `context` cached tokens each, on models of DeepSeek-V3's
/// width whose routed experts live elsewhere; the per-layer times are differences of two models.
pub fn attention_steps(batches: &[usize], context: usize, reps: usize) -> Result<Vec<AttentionStep>> {
    let max = batches.iter().copied().max().unwrap_or(1);
    // Whole blocks of 64 per sequence, one more for the decoded token.
    let cache = max * (context / 64 + 2) * 64;
    let host = || crate::ModelExperts::remote(Arc::new(NoExperts));
    let mut two = CudaModel::random_with(
        v3_config(2, 1)?.with_fp8_activations(Fp8Activations::Quantised),
        0,
        cache,
        42,
        host(),
    )?;
    let mut one = CudaModel::random_with(
        v3_config(1, 0)?.with_fp8_activations(Fp8Activations::Quantised),
        0,
        cache,
        43,
        host(),
    )?;
    let mut out = Vec::new();
    for &b in batches {
        let ends = decode(&mut two, b, context, reps, true)?.0;
        let both = decode(&mut two, b, context, reps, false)?.0;
        let moe = decode(&mut one, b, context, reps, false)?.0;
        eprintln!(
            "attention batch {b}: ends {:.3} ms, dense layer {:.3} ms, MoE layer {:.3} ms",
            ends * 1e3,
            (both - moe) * 1e3,
            moe * 1e3
        );
        out.push(AttentionStep {
            batch: b,
            ends,
            dense: (both - moe).max(0.0),
            moe,
        });
    }
    Ok(out)
}

/// A shard of `held` experts (of 256, DeepSeek-V3's experts of 2048) on the GPU.
pub struct ShardBench {
    gpu: Gpu,
    bank: ExpertBank,
    stats: MoeStats,
    hidden: usize,
}

impl ShardBench {
    pub fn new(held: usize) -> Result<Self> {
        let c = v3_config(1, 0)?;
        let gpu = Gpu::open(0)?;
        let bank = ExpertBank::random(&gpu, held, c.hidden_size, c.moe_intermediate_size, 7)?;
        let stats = MoeStats::new(&gpu, 1, held)?;
        gpu.sync()?;
        Ok(ShardBench {
            gpu,
            bank,
            stats,
            hidden: c.hidden_size,
        })
    }

    /// Seconds for one MoE layer of the tokens of `routes` (global expert ids) that this shard,
    /// holding experts `0..held`, receives: those with at least one of its experts. Returns the
    /// seconds and the rows received.
    pub fn layer_seconds(&self, routes: &TokenRoutes, reps: usize) -> Result<(f64, usize)> {
        let k = routes.k;
        let held = |e: u32| (e as usize) < self.bank.experts;
        let (mut ids, mut weights) = (Vec::new(), Vec::new());
        for (experts, w) in routes.experts.chunks_exact(k).zip(routes.weights.chunks_exact(k)) {
            if experts.iter().any(|&e| held(e)) {
                ids.extend(experts.iter().map(|&e| if held(e) { e as i32 } else { -1 }));
                weights.extend_from_slice(w);
            }
        }
        let m = ids.len() / k;
        if m == 0 {
            return Ok((0.0, 0));
        }
        let g = &self.gpu;
        let x = g.alloc(m * self.hidden * 4)?;
        kernels::random_f32.launch_1d(
            g,
            m * self.hidden,
            (ptr(x.addr), (m * self.hidden) as u64, 5, -1.0, 1.0),
        )?;
        let (idd, wd, valid) = (g.upload(&ids)?, g.upload(&weights)?, g.upload(&[m as i32])?);
        let h = g.alloc(m * self.hidden * 4)?;
        let counters = BankCounters {
            counts: self.stats.counts_addr(0),
            touched: self.stats.touched_addr(),
        };
        let kernels = ExpertKernels::new(&v3_config(1, 0)?.with_fp8_activations(Fp8Activations::Quantised))?;
        let mut run = || {
            run_bank(
                g, kernels, &self.bank, &x, None, &h, m, k, idd.addr, wd.addr, valid.addr, &counters, None,
            )
        };
        run()?;
        let mut times = Vec::new();
        for _ in 0..reps.max(1) {
            times.push(g.time(&mut run)?);
        }
        times.sort_by(f64::total_cmp);
        Ok((times[times.len() / 2], m))
    }
}
