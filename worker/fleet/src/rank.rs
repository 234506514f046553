//! An attention rank: a [`StepBackend`] (the CPU or the CUDA model, without the routed experts
//! other ranks own), the samplers of its sequences and its counters. The same type serves
//! in-process (`serve`) and behind gRPC (`attention`), on any device.

use crate::sampling_spec::{from_spec, grammar_of};
use anyhow::Result;
use dsv3_engine::{
    speculative_step, Acceptance, Chunk, Drafting, ExpertCounts, ExpertExecutor, MemoryUse, ModelConfig, Outputs,
    PickedToken, Sampler, SpecChunk, StepBackend, TokenPick,
};
use dsv3_engine::{OutputGrammar, TokenMask};
use dsv3_grammar::{Constraint, Grammars};
use dsv3_proto::{
    AttentionInfo, LayerLoad, MaskedRoutes, PrefixReuse, Sampled, SequenceFailure, StepItem, StepReply, StepRequest,
    TokenLogprob,
};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

/// What the router needs from an attention rank, wherever it runs.
pub trait AttentionRank: Send + Sync {
    fn step(&self, request: StepRequest) -> Result<StepReply>;
    fn release(&self, seqs: &[u64]) -> Result<()>;
    fn info(&self) -> Result<AttentionInfo>;
    /// The rank's figures for its own metrics scrape: as [`AttentionRank::info`], but the
    /// expert load counts stay for the router's probe (`expert_load` comes back empty).
    fn figures(&self) -> Result<AttentionInfo>;
}

/// Routed experts as this rank reaches them, with a readiness probe.
pub trait ExpertBackend: ExpertExecutor + Send + Sync {
    /// `Ok(())` when every expert is reachable; otherwise what is missing.
    fn ready(&self) -> Result<(), String>;
    /// While ready: what is lost but covered (a shard down whose experts have other copies).
    fn degraded(&self) -> Option<String> {
        None
    }
    fn placement_version(&self) -> String;
    /// Time and bytes spent reaching the experts so far (zero in process).
    fn transport(&self) -> TransportTotals {
        TransportTotals::default()
    }
    /// The rows computed without an expert they were routed to since the last call (an expert
    /// with no live copy), for the rank to fail their sequences alone.
    fn take_unserved(&self) -> Vec<UnservedRows> {
        Vec::new()
    }
    /// A step starts (`true`) or has ended (`false`): for a backend that watches how long the
    /// device waits on the experts.
    fn stepping(&self, _running: bool) {}
}

/// What an attention rank does with the tokens routed to an expert that has no live copy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UnavailableExperts {
    /// The whole call fails (for callers that cannot end sequences one by one).
    #[default]
    FailCall,
    /// The sequences routed to it end with an error naming it; the others go on untouched.
    EndSequences,
    /// It is masked out of those tokens' routes and their other experts' weights are scaled
    /// to the same total; the sequences go on and report how many routes were masked.
    Mask,
}

/// Token rows of one MoE layer's call computed without experts that had no live copy.
#[derive(Clone, Debug, PartialEq)]
pub struct UnservedRows {
    pub layer: usize,
    /// Rows in the call: a step's tokens, chunk after chunk.
    pub rows: usize,
    /// The rows that lack an expert, ascending.
    pub lost: Vec<usize>,
    /// Which experts and why, for the errors of the sequences they end.
    pub reason: String,
    /// Masked ([`UnavailableExperts::Mask`]): the rows' weights were renormalised and their
    /// sequences go on.
    pub masked: bool,
}

/// Cumulative dispatch/combine figures of a rank.
#[derive(Clone, Copy, Debug, Default)]
pub struct TransportTotals {
    pub seconds: f64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub calls: u64,
    /// MoE layers exchanged (each one dispatch/combine over every shard it needs).
    pub layers: u64,
}

struct RankState {
    backend: Box<dyn StepBackend>,
    samplers: HashMap<u64, Sampler>,
    /// The tokens of sequences still prefilling (no sampler yet): what a sampler's logit rules
    /// start from.
    prefilling: HashMap<u64, Vec<u32>>,
    /// The grammars of sequences with structured output (an error when the grammar could not
    /// be built: such a sequence may only end).
    constraints: HashMap<u64, Arc<Mutex<Result<Constraint, String>>>>,
    /// Speculative decoding: each sequence's drafts and MTP input, and acceptance so far.
    drafting: HashMap<u64, Drafting>,
    acceptance: Acceptance,
    steps: u64,
    step_seconds: f64,
    /// When the expert counters were last taken (reading them waits on the device).
    counts_taken: Option<std::time::Instant>,
}

/// How often a step's reply carries the expert counters; the probe takes the rest.
const COUNTS_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);

/// An attention rank over any [`StepBackend`] (CPU or GPU), its samplers and counters.
pub struct LocalAttention {
    rank: u32,
    config: ModelConfig,
    /// The routed experts the backend reaches, for readiness and transport figures; `None` when
    /// the backend holds every routed expert itself.
    experts: Option<Arc<dyn ExpertBackend>>,
    /// The grammar engine for structured output (needs the model's tokenizer).
    grammars: Option<Arc<Grammars>>,
    /// Whether cached prefix blocks are reused (on unless turned off).
    prefix_caching: bool,
    /// Drafts the MTP module proposes per decode step (0: no speculative decoding).
    speculative_tokens: usize,
    /// Stopping: the router sends no new sequences, the ones held run to their end.
    draining: std::sync::atomic::AtomicBool,
    state: Mutex<RankState>,
}

impl LocalAttention {
    pub fn new(rank: u32, backend: Box<dyn StepBackend>, experts: Option<Arc<dyn ExpertBackend>>) -> Self {
        LocalAttention {
            rank,
            config: backend.config().clone(),
            experts,
            grammars: None,
            prefix_caching: true,
            speculative_tokens: 0,
            draining: std::sync::atomic::AtomicBool::new(false),
            state: Mutex::new(RankState {
                backend,
                samplers: HashMap::new(),
                prefilling: HashMap::new(),
                constraints: HashMap::new(),
                drafting: HashMap::new(),
                acceptance: Acceptance::default(),
                steps: 0,
                step_seconds: 0.0,
                counts_taken: None,
            }),
        }
    }

    /// Stops taking new sequences (reported to the router in [`AttentionRank::info`]); the
    /// sequences held keep stepping until they end.
    pub fn start_draining(&self) {
        self.draining.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Sequences the rank holds (prefilling or decoding, until released); 0 when its state is
    /// poisoned by a failed step, since it can serve nothing more.
    pub fn held_sequences(&self) -> usize {
        self.state.lock().map_or(0, |s| s.held_sequences())
    }

    /// With `false`, every prompt is computed in full (no prefix cache reuse).
    pub fn with_prefix_caching(mut self, on: bool) -> Self {
        self.prefix_caching = on;
        self
    }

    /// Decodes speculatively with `tokens` drafts from the checkpoint's MTP module per step
    /// (0: off); an error when the checkpoint has none.
    pub fn with_speculative_tokens(mut self, tokens: usize) -> Result<Self> {
        if tokens > 0 {
            let has_mtp = self.lock()?.backend.has_mtp();
            anyhow::ensure!(
                has_mtp,
                "--speculative-tokens {tokens} needs the checkpoint's MTP module (model.layers.{}.*), and this \
                 checkpoint has none",
                self.config.num_hidden_layers
            );
        }
        self.speculative_tokens = tokens;
        Ok(self)
    }

    /// Serves structured output with `grammars` (built from the model's tokenizer).
    pub fn with_grammars(mut self, grammars: Arc<Grammars>) -> Self {
        self.grammars = Some(grammars);
        self
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The mask of a sequence's grammar for its next token, made on its own thread while the
    /// step's forward pass runs.
    fn next_mask(&self, constraint: &Arc<Mutex<Result<Constraint, String>>>) -> TokenMask {
        let constraint = constraint.clone();
        let (vocab, eos) = (self.config.vocab_size, self.config.eos_token_ids.clone());
        TokenMask::in_background(move || {
            let mut guard = constraint
                .lock()
                .map_err(|_| "a grammar's lock is poisoned".to_string())?;
            let failed = match guard.as_mut() {
                Ok(c) => match c.mask() {
                    Ok(words) => return Ok(words),
                    Err(e) => Some(e.to_string()),
                },
                Err(_) => None,
            };
            if let Some(message) = failed {
                *guard = Err(message);
            }
            // The grammar failed: the sequence may only end.
            Ok(end_only_mask(vocab, &eos))
        })
    }

    /// A new sequence's grammar, following the `output` it already generated.
    fn constraint_for(&self, grammar: &OutputGrammar, output: &[u32]) -> Arc<Mutex<Result<Constraint, String>>> {
        let made = match &self.grammars {
            None => {
                Err("this attention rank was started without the model's tokenizer, so it has no grammar engine".into())
            }
            Some(g) => g
                .constraint(grammar)
                .and_then(|mut c| c.consume_all(output).map(|()| c))
                .map_err(|e| e.to_string()),
        };
        Arc::new(Mutex::new(made))
    }

    /// How each item that samples picks its token, and the `drafts` after it (empty without
    /// speculative decoding): its sequence's sampler edits the logits by its rules and gives
    /// each row its draw, its grammar (if any) masks the first row; the backend picks where the
    /// logits are. Sampler and grammar are made on a sequence's first pick, from the tokens it
    /// was prefilled with (the last `generated_before` of them are output sampled before a
    /// preemption). Nothing is drawn until [`Sampler::accept`] takes the tokens output.
    fn token_picks(
        &self,
        state: &mut RankState,
        items: &[StepItem],
        drafts: &[Vec<u32>],
    ) -> Vec<Option<Vec<TokenPick>>> {
        let RankState {
            samplers,
            prefilling,
            constraints,
            ..
        } = state;
        items
            .iter()
            .zip(drafts)
            .map(|(item, drafts)| {
                if !samplers.contains_key(&item.seq) {
                    let tokens = prefilling.entry(item.seq).or_default();
                    tokens.truncate(item.start as usize);
                    tokens.extend(&item.tokens);
                }
                let spec = item.sample.as_ref()?;
                let sampler = samplers.entry(item.seq).or_insert_with(|| {
                    let tokens = prefilling.remove(&item.seq).unwrap_or_default();
                    let (prompt, output) = tokens.split_at(tokens.len().saturating_sub(spec.generated_before as usize));
                    if let Some(grammar) = grammar_of(spec) {
                        constraints.insert(item.seq, self.constraint_for(&grammar, output));
                    }
                    let (params, end_ids) = from_spec(spec);
                    Sampler::with_history(params, None, prompt, output, end_ids)
                });
                let mut picks = sampler.picks_with_drafts(drafts, spec.logprobs.map(|n| n as usize));
                picks[0].allowed = constraints.get(&item.seq).map(|c| self.next_mask(c));
                Some(picks)
            })
            .collect()
    }

    /// Drafts an item may feed and make (speculative decoding): what the router granted it, at
    /// most this rank's `--speculative-tokens`; none while a grammar holds the sequence (its mask
    /// is made for one position at a time).
    fn draft_allowance(&self, state: &RankState, item: &StepItem) -> usize {
        if state.constraints.contains_key(&item.seq) {
            0
        } else {
            self.speculative_tokens.min(item.max_drafts as usize)
        }
    }

    /// The plain step: each item's chunk (less what the prefix cache gave), one pick per item
    /// that samples, made where the logits are.
    fn plain_step(
        state: &mut RankState,
        items: &[StepItem],
        reused: &[usize],
        mut picks: Vec<Option<Vec<TokenPick>>>,
    ) -> Result<Vec<Vec<PickedToken>>> {
        let (chunks, computed) = step_chunks(items, reused);
        let computed_picks: Vec<Option<TokenPick>> = computed
            .iter()
            .map(|&i| picks[i].take().and_then(|p| p.into_iter().next()))
            .collect();
        let mut picked: Vec<Vec<PickedToken>> = vec![Vec::new(); items.len()];
        if !chunks.is_empty() {
            for (&i, p) in computed.iter().zip(state.backend.step_pick(&chunks, &computed_picks)?) {
                picked[i].extend(p);
            }
        }
        Ok(picked)
    }

    /// The speculative step: decoding items feed their drafts too, and output every token the
    /// verification keeps ([`speculative_step`]).
    fn speculative_step(
        &self,
        state: &mut RankState,
        items: &[StepItem],
        reused: &[usize],
        drafts: Vec<Vec<u32>>,
        picks: Vec<Option<Vec<TokenPick>>>,
    ) -> Result<Vec<Vec<PickedToken>>> {
        let mut chunks = Vec::new();
        let mut index = Vec::new();
        for (i, ((item, &r), (drafts, picks))) in
            items.iter().zip(reused).zip(drafts.into_iter().zip(picks)).enumerate()
        {
            if r >= item.tokens.len() {
                continue; // wholly reused: nothing to compute (it does not sample)
            }
            chunks.push(SpecChunk {
                seq: item.seq,
                start: item.start as usize + r,
                tokens: &item.tokens[r..],
                drafts,
                picks,
                draft_depth: self.draft_allowance(state, item),
                logits: false,
            });
            index.push(i);
        }
        let mut picked: Vec<Vec<PickedToken>> = vec![Vec::new(); items.len()];
        if chunks.is_empty() {
            return Ok(picked);
        }
        let mut drafting: Vec<Drafting> = chunks
            .iter()
            .map(|c| state.drafting.remove(&c.seq).unwrap_or_default())
            .collect();
        let mut refs: Vec<&mut Drafting> = drafting.iter_mut().collect();
        let outcomes = speculative_step(state.backend.as_mut(), &chunks, &mut refs, None);
        for (c, d) in chunks.iter().zip(drafting) {
            state.drafting.insert(c.seq, d);
        }
        for (i, outcome) in index.into_iter().zip(outcomes?) {
            if let Some(outcome) = outcome {
                state.acceptance.add(outcome.drafted, outcome.accepted);
                picked[i] = outcome.tokens;
            }
        }
        Ok(picked)
    }

    fn take_unserved(&self) -> Vec<UnservedRows> {
        self.experts.as_ref().map(|e| e.take_unserved()).unwrap_or_default()
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
        let mut guard = self.lock()?;
        let state = &mut *guard;
        // Prefix caching: the cached blocks that begin a chunk are taken, not computed.
        let reused: Vec<usize> = request
            .items
            .iter()
            .map(|item| {
                if !self.prefix_caching {
                    return 0;
                }
                state
                    .backend
                    .reuse_prefix(item.seq, item.start as usize, &item.tokens, item.sample.is_some())
            })
            .collect();
        // Drafts for decoding items whose drafts were made for this very step (none while a
        // grammar holds the sequence).
        let drafts: Vec<Vec<u32>> = request
            .items
            .iter()
            .zip(&reused)
            .map(|(item, &r)| match state.drafting.get(&item.seq) {
                Some(d) if item.sample.is_some() => d
                    .drafts_for(
                        item.start as usize + r,
                        &item.tokens[r..],
                        self.draft_allowance(state, item),
                    )
                    .to_vec(),
                _ => Vec::new(),
            })
            .collect();
        let picks = self.token_picks(state, &request.items, &drafts);
        // What an earlier, failed step left.
        self.take_unserved();
        if let Some(experts) = &self.experts {
            experts.stepping(true);
        }
        let stepped = if self.speculative_tokens > 0 {
            self.speculative_step(state, &request.items, &reused, drafts, picks)
        } else {
            Self::plain_step(state, &request.items, &reused, picks)
        };
        if let Some(experts) = &self.experts {
            experts.stepping(false);
        }
        let mut picked = stepped?;
        // Sequences computed without an expert they were routed to end here, their positions
        // of this step forgotten (never offered to the prefix cache); the others go on. Masked
        // sequences go on, but what they wrote from this step on is never offered to the
        // prefix cache. The rows are the plain step's chunks in order; a speculative step's
        // layout (drafts, the MTP module) is not mapped back, so all of its sequences count.
        let unserved = self.take_unserved();
        let rows_known = self.speculative_tokens == 0;
        let (masked, ended): (Vec<UnservedRows>, Vec<UnservedRows>) = unserved.into_iter().partition(|u| u.masked);
        let lost = items_without_an_expert(&request.items, &reused, &ended, rows_known);
        let masked = items_without_an_expert(&request.items, &reused, &masked, rows_known);
        for &i in lost.keys() {
            let item = &request.items[i];
            state.backend.discard_from(item.seq, item.start as usize + reused[i]);
            picked[i].clear();
        }
        for &i in masked.keys() {
            let item = &request.items[i];
            state.backend.withhold_from(item.seq, item.start as usize + reused[i]);
        }
        for (item, tokens) in request.items.iter().zip(&picked) {
            if tokens.is_empty() {
                continue;
            }
            if let Some(sampler) = state.samplers.get_mut(&item.seq) {
                sampler.accept(&tokens.iter().map(|p| p.token).collect::<Vec<_>>());
            }
            if let Some(constraint) = state.constraints.get(&item.seq) {
                if let Ok(mut guard) = constraint.lock() {
                    for p in tokens {
                        if let Ok(c) = guard.as_mut() {
                            if let Err(e) = c.consume(p.token) {
                                *guard = Err(e.to_string());
                            }
                        }
                    }
                }
            }
        }
        // Sequences whose grammar failed end with its error (their pick was held to the end).
        let failed = request
            .items
            .iter()
            .enumerate()
            .filter_map(|(i, item)| {
                if let Some((_, reason)) = lost.get(&i) {
                    return Some(SequenceFailure {
                        seq: item.seq,
                        message: format!("routed to an expert that is not available: {reason}"),
                    });
                }
                let guard = state.constraints.get(&item.seq)?.lock().ok()?;
                let message = guard.as_ref().err()?;
                Some(SequenceFailure {
                    seq: item.seq,
                    message: format!("structured output failed: {message}"),
                })
            })
            .collect();
        let counts_due = state.counts_taken.is_none_or(|t| t.elapsed() >= COUNTS_INTERVAL);
        let reply = StepReply {
            failed,
            masked: masked
                .iter()
                .filter(|(_, (rows, _))| *rows > 0)
                .map(|(&i, &(rows, _))| MaskedRoutes {
                    seq: request.items[i].seq,
                    routes: rows as u32,
                })
                .collect(),
            reused: request
                .items
                .iter()
                .zip(&reused)
                .filter(|(_, &r)| r > 0)
                .map(|(item, &r)| PrefixReuse {
                    seq: item.seq,
                    tokens: r as u32,
                })
                .collect(),
            sampled: sampled(&request.items, picked),
            expert_load: if counts_due {
                state.take_expert_load()?
            } else {
                Vec::new()
            },
        };
        state.steps += 1;
        state.step_seconds += started.elapsed().as_secs_f64();
        Ok(reply)
    }

    fn release(&self, seqs: &[u64]) -> Result<()> {
        let mut state = self.lock()?;
        for &seq in seqs {
            state.backend.free_sequence(seq);
            state.samplers.remove(&seq);
            state.prefilling.remove(&seq);
            state.constraints.remove(&seq);
            state.drafting.remove(&seq);
        }
        Ok(())
    }

    fn info(&self) -> Result<AttentionInfo> {
        self.report(true)
    }

    fn figures(&self) -> Result<AttentionInfo> {
        self.report(false)
    }
}

impl LocalAttention {
    /// What the rank reports, taking the expert load counts with it when `take_load`.
    fn report(&self, take_load: bool) -> Result<AttentionInfo> {
        let mut state = self.lock()?;
        let expert_load = if take_load {
            state.take_expert_load()?
        } else {
            Vec::new()
        };
        let ready = self.experts.as_ref().map_or(Ok(()), |e| e.ready());
        let transport = self.experts.as_ref().map(|e| e.transport()).unwrap_or_default();
        let capacity = state.backend.capacity();
        let memory = state.backend.memory();
        Ok(AttentionInfo {
            steps: state.steps,
            step_seconds: state.step_seconds,
            expert_seconds: transport.seconds,
            expert_bytes_sent: transport.bytes_sent,
            expert_bytes_received: transport.bytes_received,
            expert_calls: transport.calls,
            expert_layers: transport.layers,
            rank: self.rank,
            block_size: capacity.block_size as u32,
            total_blocks: capacity.total_blocks as u32,
            free_blocks: capacity.free_blocks as u32,
            placement_version: self
                .experts
                .as_ref()
                .map_or_else(|| "local".into(), |e| e.placement_version()),
            experts_ready: ready.is_ok(),
            detail: match ready {
                Err(missing) => missing,
                Ok(()) => self.experts.as_ref().and_then(|e| e.degraded()).unwrap_or_default(),
            },
            device: state.backend.device(),
            memory: Some(memory_report(memory)),
            expert_load,
            speculative_tokens: self.speculative_tokens as u32,
            drafts_scored: state.acceptance.drafted.clone(),
            drafts_accepted: state.acceptance.accepted.clone(),
            sequences: state.held_sequences() as u32,
            draining: self.draining.load(std::sync::atomic::Ordering::SeqCst),
        })
    }
}

impl RankState {
    /// Sequences held: prefilling (no sampler yet) or decoding, until released.
    fn held_sequences(&self) -> usize {
        self.samplers.len() + self.prefilling.len()
    }

    fn take_expert_load(&mut self) -> Result<Vec<LayerLoad>> {
        self.counts_taken = Some(std::time::Instant::now());
        Ok(expert_load(self.backend.take_expert_counts()?))
    }
}

/// A backend's memory as the contracts carry it.
pub fn memory_report(m: MemoryUse) -> dsv3_proto::MemoryReport {
    dsv3_proto::MemoryReport {
        weight_bytes: m.weights,
        kv_cache_bytes: m.kv_cache,
        workspace_bytes: m.workspace,
    }
}

/// The model chunks of a step's items, less the leading positions `reused` from the prefix
/// cache (an item wholly reused has no chunk): logits at the last position of the items that
/// sample. Also the index of each chunk's item.
fn step_chunks<'a>(items: &'a [StepItem], reused: &[usize]) -> (Vec<Chunk<'a>>, Vec<usize>) {
    items
        .iter()
        .zip(reused)
        .enumerate()
        .filter(|(_, (item, &r))| r < item.tokens.len())
        .map(|(i, (item, &r))| {
            let outputs = if item.sample.is_some() {
                Outputs::Last
            } else {
                Outputs::None
            };
            (
                Chunk::new(item.seq, item.start as usize + r, &item.tokens[r..], outputs),
                i,
            )
        })
        .unzip()
}

/// The items (by index) whose rows of this step were computed without an expert: how many of
/// their rows (summed over the calls) and why. With `rows_known`, a call's rows are the step's
/// chunks in order (the items' tokens less what was `reused`) and each lost row names its item;
/// a call of another shape (padding, drafts, the MTP module) names every item that computed
/// rows, each counted once for it.
fn items_without_an_expert(
    items: &[StepItem],
    reused: &[usize],
    unserved: &[UnservedRows],
    rows_known: bool,
) -> BTreeMap<usize, (usize, String)> {
    let computed: Vec<usize> = items
        .iter()
        .zip(reused)
        .map(|(item, &r)| item.tokens.len().saturating_sub(r))
        .collect();
    // The first row of each item (items computing nothing own no row).
    let starts: Vec<usize> = computed
        .iter()
        .scan(0, |row, &n| {
            let first = *row;
            *row += n;
            Some(first)
        })
        .collect();
    let total: usize = computed.iter().sum();
    let mut hit: BTreeMap<usize, (usize, String)> = BTreeMap::new();
    for record in unserved {
        if rows_known && record.rows == total {
            for &row in &record.lost {
                // The last item starting at or before the row; items computing nothing own none.
                let j = starts.partition_point(|&s| s <= row).saturating_sub(1);
                if (starts[j]..starts[j] + computed[j]).contains(&row) {
                    hit.entry(j).or_insert_with(|| (0, record.reason.clone())).0 += 1;
                }
            }
        } else {
            for (j, &n) in computed.iter().enumerate() {
                if n > 0 {
                    hit.entry(j).or_insert_with(|| (0, record.reason.clone())).0 += 1;
                }
            }
        }
    }
    hit
}

/// Per-layer token counts of the routed experts, as the reply reports them.
fn expert_load(counts: ExpertCounts) -> Vec<LayerLoad> {
    counts
        .into_iter()
        .map(|(layer, tokens_per_expert)| LayerLoad {
            layer: layer as u32,
            tokens_per_expert,
        })
        .collect()
}

/// The reply's tokens: those each item output, in order (one without drafts).
fn sampled(items: &[StepItem], picked: Vec<Vec<PickedToken>>) -> Vec<Sampled> {
    items
        .iter()
        .zip(picked)
        .flat_map(|(item, tokens)| {
            tokens.into_iter().map(move |p| Sampled {
                seq: item.seq,
                token: p.token,
                logprob: p.logprob,
                top_logprobs: p
                    .top_logprobs
                    .into_iter()
                    .map(|(id, logprob)| TokenLogprob { id, logprob })
                    .collect(),
            })
        })
        .collect()
}

/// A mask that allows only the model's end-of-sequence tokens.
fn end_only_mask(vocab: usize, eos_ids: &[u32]) -> Vec<u32> {
    let mut words = vec![0u32; vocab.div_ceil(32)];
    for &id in eos_ids {
        if let Some(w) = words.get_mut(id as usize / 32) {
            *w |= 1 << (id % 32);
        }
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(seq: u64, tokens: usize) -> StepItem {
        StepItem {
            seq,
            tokens: vec![1; tokens],
            ..StepItem::default()
        }
    }

    fn lost(rows: usize, lost: &[usize]) -> UnservedRows {
        UnservedRows {
            layer: 3,
            rows,
            lost: lost.to_vec(),
            reason: format!("rows {lost:?}"),
            masked: false,
        }
    }

    #[test]
    fn a_lost_row_names_the_item_that_computed_it() {
        // Items compute 4, 0 (wholly reused), 1 and 3 rows: 8 in all.
        let items = [item(10, 4), item(11, 16), item(12, 1), item(13, 5)];
        let reused = [0, 16, 0, 2];
        let got = items_without_an_expert(&items, &reused, &[lost(8, &[3, 4]), lost(8, &[7])], true);
        assert_eq!(got.keys().copied().collect::<Vec<_>>(), vec![0, 2, 3]);
        assert_eq!(got[&0], (1, "rows [3, 4]".to_string()));
        assert_eq!(got[&2], (1, "rows [3, 4]".to_string()));
        assert_eq!(got[&3], (1, "rows [7]".to_string()));
        // A call of another shape names every item that computed rows, counting it once.
        let got = items_without_an_expert(&items, &reused, &[lost(9, &[0]), lost(9, &[5])], true);
        assert_eq!(got.keys().copied().collect::<Vec<_>>(), vec![0, 2, 3]);
        assert!(got.values().all(|(rows, _)| *rows == 2), "{got:?}");
        let got = items_without_an_expert(&items, &reused, &[lost(8, &[0])], false);
        assert_eq!(got.keys().copied().collect::<Vec<_>>(), vec![0, 2, 3]);
        assert!(items_without_an_expert(&items, &reused, &[], true).is_empty());
    }
}
