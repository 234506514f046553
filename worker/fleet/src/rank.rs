//! An attention rank: the model without its routed experts, its KV cache and the samplers of
//! its sequences. The same type serves in-process (`serve`) and behind gRPC (`attention`).

use anyhow::{Context, Result};
use dsv3_engine::sampling::log_softmax;
use dsv3_engine::{
    Chunk, ChunkOutput, ExpertExecutor, KvCache, MlaForm, Model, Outputs, Sampler, SamplingParams, StepOptions,
    TokenRoutes,
};
use dsv3_proto::{AttentionInfo, LayerLoad, Sampled, SamplingSpec, StepItem, StepReply, StepRequest, TokenLogprob};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

/// What the router needs from an attention rank, wherever it runs.
pub trait AttentionRank: Send + Sync {
    fn step(&self, request: StepRequest) -> Result<StepReply>;
    fn release(&self, seqs: &[u64]) -> Result<()>;
    fn info(&self) -> Result<AttentionInfo>;
}

/// Routed experts as this rank reaches them, with a readiness probe.
pub trait ExpertBackend: ExpertExecutor + Send + Sync {
    /// `Ok(())` when every expert is reachable; otherwise what is missing.
    fn ready(&self) -> Result<(), String>;
    fn placement_version(&self) -> String;
    /// Time and bytes spent reaching the experts so far (zero in process).
    fn transport(&self) -> TransportTotals {
        TransportTotals::default()
    }
}

/// Cumulative dispatch/combine figures of a rank.
#[derive(Clone, Copy, Debug, Default)]
pub struct TransportTotals {
    pub seconds: f64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub calls: u64,
}

impl ExpertBackend for dsv3_engine::LocalExperts {
    fn ready(&self) -> Result<(), String> {
        Ok(())
    }
    fn placement_version(&self) -> String {
        "local".into()
    }
}

struct RankState {
    cache: KvCache,
    samplers: HashMap<u64, Sampler>,
    steps: u64,
    step_seconds: f64,
}

pub struct LocalAttention {
    rank: u32,
    model: Model,
    experts: Arc<dyn ExpertBackend>,
    mla: MlaForm,
    state: Mutex<RankState>,
}

/// Counts the tokens each expert receives while delegating to the real experts.
struct CountingExperts<'a> {
    inner: &'a dyn ExpertBackend,
    n_experts: usize,
    counts: Mutex<BTreeMap<usize, Vec<u64>>>,
}

impl ExpertExecutor for CountingExperts<'_> {
    fn routed_experts(&self, layer: usize, x: &[f32], routes: &TokenRoutes) -> Result<Vec<f32>> {
        if let Ok(mut counts) = self.counts.lock() {
            let layer_counts = counts.entry(layer).or_insert_with(|| vec![0; self.n_experts]);
            for &e in &routes.experts {
                if let Some(c) = layer_counts.get_mut(e as usize) {
                    *c += 1;
                }
            }
        }
        self.inner.routed_experts(layer, x, routes)
    }
}

pub fn sampling_params(spec: &SamplingSpec) -> SamplingParams {
    SamplingParams {
        temperature: spec.temperature,
        top_k: spec.top_k as usize,
        top_p: spec.top_p,
        seed: spec.seed,
        ..SamplingParams::default()
    }
}

impl LocalAttention {
    pub fn new(rank: u32, model: Model, experts: Arc<dyn ExpertBackend>, cache_tokens: usize, mla: MlaForm) -> Self {
        let cache = KvCache::new(&model.config, 16, cache_tokens.div_ceil(16).max(1));
        LocalAttention {
            rank,
            model,
            experts,
            mla,
            state: Mutex::new(RankState {
                cache,
                samplers: HashMap::new(),
                steps: 0,
                step_seconds: 0.0,
            }),
        }
    }

    pub fn config(&self) -> &dsv3_engine::ModelConfig {
        &self.model.config
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, RankState>> {
        self.state
            .lock()
            .map_err(|_| anyhow::anyhow!("attention rank {} state is poisoned by an earlier panic", self.rank))
    }
}

impl AttentionRank for LocalAttention {
    fn step(&self, request: StepRequest) -> Result<StepReply> {
        let started = std::time::Instant::now();
        let mut state = self.lock()?;
        let chunks = step_chunks(&request.items);
        let counting = CountingExperts {
            inner: self.experts.as_ref(),
            n_experts: self.model.config.n_routed_experts,
            counts: Mutex::new(BTreeMap::new()),
        };
        let opts = StepOptions {
            mla: self.mla,
            trace: false,
        };
        let (outputs, _) = self.model.forward(&chunks, &mut state.cache, &counting, &opts)?;
        let mut reply = StepReply {
            sampled: sample_outputs(&mut state.samplers, &request.items, outputs),
            ..StepReply::default()
        };
        let counts = counting.counts.into_inner().unwrap_or_default();
        reply.expert_load = expert_load(counts);
        state.steps += 1;
        state.step_seconds += started.elapsed().as_secs_f64();
        Ok(reply)
    }

    fn release(&self, seqs: &[u64]) -> Result<()> {
        let mut state = self.lock()?;
        for &seq in seqs {
            state.cache.free_sequence(seq);
            state.samplers.remove(&seq);
        }
        Ok(())
    }

    fn info(&self) -> Result<AttentionInfo> {
        let state = self.lock()?;
        let ready = self.experts.ready();
        let transport = self.experts.transport();
        Ok(AttentionInfo {
            steps: state.steps,
            step_seconds: state.step_seconds,
            expert_seconds: transport.seconds,
            expert_bytes_sent: transport.bytes_sent,
            expert_bytes_received: transport.bytes_received,
            expert_calls: transport.calls,
            rank: self.rank,
            block_size: state.cache.block_size() as u32,
            total_blocks: state.cache.total_blocks() as u32,
            free_blocks: state.cache.free_blocks() as u32,
            placement_version: self.experts.placement_version(),
            experts_ready: ready.is_ok(),
            detail: ready.err().unwrap_or_default(),
        })
    }
}

/// The model chunks of a step's items: logits at the last position of the items that sample.
pub fn step_chunks(items: &[StepItem]) -> Vec<Chunk<'_>> {
    items
        .iter()
        .map(|item| {
            let outputs = if item.sample.is_some() {
                Outputs::Last
            } else {
                Outputs::None
            };
            Chunk::new(item.seq, item.start as usize, &item.tokens, outputs)
        })
        .collect()
}

/// Per-layer token counts of the routed experts, as the reply reports them.
pub fn expert_load(counts: BTreeMap<usize, Vec<u64>>) -> Vec<LayerLoad> {
    counts
        .into_iter()
        .map(|(layer, tokens_per_expert)| LayerLoad {
            layer: layer as u32,
            tokens_per_expert,
        })
        .collect()
}

/// Samples the next token of every item that asks for one, from its output logits, with the
/// sequence's own sampler (created on first use), plus log-probabilities when asked.
pub fn sample_outputs(
    samplers: &mut HashMap<u64, Sampler>,
    items: &[StepItem],
    outputs: Vec<ChunkOutput>,
) -> Vec<Sampled> {
    let mut sampled_all = Vec::new();
    for (item, output) in items.iter().zip(outputs) {
        let Some(spec) = &item.sample else { continue };
        let sampler = samplers
            .entry(item.seq)
            .or_insert_with(|| Sampler::new(sampling_params(spec), None));
        let token = sampler.sample(&output.logits);
        let mut sampled = Sampled {
            seq: item.seq,
            token,
            logprob: None,
            top_logprobs: Vec::new(),
        };
        if let Some(n) = spec.logprobs {
            let logprobs = log_softmax(&output.logits);
            sampled.logprob = Some(logprobs[token as usize]);
            let best_first = |a: &u32, b: &u32| logprobs[*b as usize].total_cmp(&logprobs[*a as usize]).then(a.cmp(b));
            let mut order: Vec<u32> = (0..logprobs.len() as u32).collect();
            let n = (n as usize).min(order.len());
            if n > 0 && n < order.len() {
                order.select_nth_unstable_by(n - 1, best_first);
            }
            order.truncate(n);
            order.sort_by(best_first);
            sampled.top_logprobs = order
                .iter()
                .map(|&id| TokenLogprob {
                    id,
                    logprob: logprobs[id as usize],
                })
                .collect();
        }
        sampled_all.push(sampled);
    }
    sampled_all
}

/// Loads an attention rank whose routed experts are `experts`.
pub fn load_rank(
    files: &dsv3_engine::ModelFiles,
    rank: u32,
    experts: Arc<dyn ExpertBackend>,
    cache_tokens: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<LocalAttention> {
    let model = Model::load(files, progress).with_context(|| format!("loading attention rank {rank}"))?;
    Ok(LocalAttention::new(rank, model, experts, cache_tokens, MlaForm::Auto))
}
