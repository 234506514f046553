//! The one interface a role drives a model through, whatever device runs it: a step over
//! prefill chunks and decode tokens, freeing sequences, cache capacity, expert load and memory.
//! The routed experts sit behind [`ExpertExecutor`] on every backend, so the same attention
//! rank reaches experts in this process or on remote shards without knowing which.

use crate::config::ModelConfig;
use crate::kv_cache::{KvCache, SeqId};
use crate::logit_rules::{apply_edits, apply_mask, LogitEdit, TokenMask};
use crate::mla::MlaForm;
use crate::model::{Chunk, ChunkOutput, Model, StepOptions};
use crate::moe::{ExpertExecutor, TokenRoutes};
use crate::sampling::{choose, logprobs_of, TokenChoice};
use anyhow::Result;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// The paged cache as the scheduler sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheCapacity {
    pub block_size: usize,
    pub total_blocks: usize,
    pub free_blocks: usize,
}

/// Device (or host) memory a backend holds, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryUse {
    /// Weights, the routed experts this process holds included.
    pub weights: u64,
    pub kv_cache: u64,
    /// Scratch kept between steps (dequantisation buffers, recorded graphs' buffers, ...).
    pub workspace: u64,
}

/// Tokens routed to each expert, per MoE layer.
pub type ExpertCounts = BTreeMap<usize, Vec<u64>>;

/// How one chunk's next token is picked, and how many log-probabilities come back with it.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenPick {
    pub choice: TokenChoice,
    /// `Some(n)`: the token's log-probability and the `n` most likely alternatives (of the
    /// edited logits: the distribution the token is drawn from, before temperature).
    pub logprobs: Option<usize>,
    /// The sequence's logit rules for this token, applied before anything else.
    pub edits: Vec<LogitEdit>,
    /// The tokens its grammar allows (structured output), applied after the edits.
    pub allowed: Option<TokenMask>,
}

impl TokenPick {
    /// A plain pick: no edits, no log-probabilities.
    pub fn plain(choice: TokenChoice) -> Self {
        TokenPick {
            choice,
            logprobs: None,
            edits: Vec::new(),
            allowed: None,
        }
    }
}

/// A picked token; what crosses from the device to the host per sequence and step.
#[derive(Clone, Debug, PartialEq)]
pub struct PickedToken {
    pub token: u32,
    pub logprob: Option<f32>,
    /// Best first.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// A model on one device with its KV cache: what an attention rank and `generate` drive.
pub trait StepBackend: Send {
    fn config(&self) -> &ModelConfig;
    /// Where it runs, for logs and `/metrics` (`cpu`, `NVIDIA H200 (cuda:0)`).
    fn device(&self) -> String;
    /// One forward step over `chunks` (each continues its sequence in the cache); logits and
    /// post-norm hidden states at the positions each chunk asks for.
    fn step(&mut self, chunks: &[Chunk]) -> Result<Vec<ChunkOutput>>;
    /// One step that picks the next token of each chunk given a pick (at its last position) and
    /// returns only the picks: a backend whose logits live on a device picks there.
    fn step_pick(&mut self, chunks: &[Chunk], picks: &[Option<TokenPick>]) -> Result<Vec<Option<PickedToken>>> {
        let outputs = self.step(chunks)?;
        pick_on_host(&outputs, picks, self.config().vocab_size)
    }
    /// A step that picks at several positions of a chunk (speculative verification): `picks[i]`
    /// for the last positions of chunk `i` (which must ask for their logits), made where the
    /// logits are; with each chunk's post-norm hidden states as it asked for them.
    fn step_pick_rows(&mut self, chunks: &[Chunk], picks: &[Option<RowPicks>]) -> Result<Vec<PickedRows>> {
        let outputs = self.step(chunks)?;
        pick_rows_on_host(outputs, picks, self.config().vocab_size, None)
    }
    fn free_sequence(&mut self, seq: SeqId);
    /// Forgets a sequence's positions from `len` on (rejected draft tokens).
    fn truncate(&mut self, seq: SeqId, len: usize);
    /// Forgets a sequence's positions from `len` on because their contents are wrong (an expert
    /// they were routed to had no live copy): none of their blocks stays in the prefix cache.
    fn discard_from(&mut self, seq: SeqId, len: usize);
    /// Keeps a sequence's positions from `from` on but offers none of them, nor what it writes
    /// later, to the prefix cache (an expert was masked out of their routes).
    fn withhold_from(&mut self, seq: SeqId, from: usize);
    /// Whether the checkpoint's multi-token-prediction module is loaded.
    fn has_mtp(&self) -> bool {
        false
    }
    /// One step of the MTP module (see [`Model::mtp_forward`]): each chunk's `prev_hidden` are
    /// the main model's post-norm hidden states at its positions, its tokens the ones after them.
    fn mtp_step(&mut self, _chunks: &[Chunk]) -> Result<Vec<ChunkOutput>> {
        anyhow::bail!("this backend has no MTP module")
    }
    /// Prefix caching: takes the cached blocks that begin a chunk (`tokens` at `start`) by
    /// reference instead of computing them; the positions reused. With `keep_last` (the chunk
    /// gives logits) at least one token is left to compute. See [`crate::BlockTable`].
    fn reuse_prefix(&mut self, seq: SeqId, start: usize, tokens: &[u32], keep_last: bool) -> usize;
    fn capacity(&self) -> CacheCapacity;
    /// Tokens per routed expert and MoE layer since the last call.
    fn take_expert_counts(&mut self) -> Result<ExpertCounts>;
    fn memory(&self) -> MemoryUse;
}

/// The picks for a chunk's last positions, one per position, and whether their logits come
/// back with the tokens.
#[derive(Clone, Debug, Default)]
pub struct RowPicks {
    pub picks: Vec<TokenPick>,
    pub logits: bool,
}

/// What [`StepBackend::step_pick_rows`] gives one chunk.
#[derive(Clone, Debug, Default)]
pub struct PickedRows {
    /// One per pick, in position order.
    pub tokens: Vec<PickedToken>,
    /// `[picks, vocab]` when asked for.
    pub logits: Vec<f32>,
    /// Every position's post-norm hidden state when the chunk asked for `all_hidden` (what the
    /// MTP module drafts from); otherwise not to be relied on.
    pub hidden: Vec<f32>,
}

/// [`StepBackend::step_pick_rows`] over logits on the host; ids at or above `limit` are never
/// picked.
pub fn pick_rows_on_host(
    outputs: Vec<ChunkOutput>,
    picks: &[Option<RowPicks>],
    vocab: usize,
    limit: Option<usize>,
) -> Result<Vec<PickedRows>> {
    anyhow::ensure!(
        outputs.len() == picks.len(),
        "{} picks for {} chunks",
        picks.len(),
        outputs.len()
    );
    let limit = limit.unwrap_or(vocab).min(vocab);
    outputs
        .into_iter()
        .zip(picks)
        .map(|(out, p)| {
            let Some(p) = p else {
                return Ok(PickedRows {
                    hidden: out.hidden,
                    ..PickedRows::default()
                });
            };
            let rows = out.logits.len() / vocab;
            let first = rows
                .checked_sub(p.picks.len())
                .ok_or_else(|| anyhow::anyhow!("{} picks for a chunk with {rows} rows of logits", p.picks.len()))?;
            let tokens = p
                .picks
                .iter()
                .enumerate()
                .map(|(j, pick)| pick_row(&out.logits[(first + j) * vocab..(first + j) * vocab + limit], pick))
                .collect::<Result<Vec<_>>>()?;
            Ok(PickedRows {
                tokens,
                logits: if p.logits {
                    out.logits[first * vocab..].to_vec()
                } else {
                    Vec::new()
                },
                hidden: out.hidden,
            })
        })
        .collect()
}

/// The picks of a step whose logits are on the host (each picking chunk's last row).
pub fn pick_on_host(
    outputs: &[ChunkOutput],
    picks: &[Option<TokenPick>],
    vocab: usize,
) -> Result<Vec<Option<PickedToken>>> {
    anyhow::ensure!(
        outputs.len() == picks.len(),
        "{} picks for {} chunks",
        picks.len(),
        outputs.len()
    );
    outputs
        .iter()
        .zip(picks)
        .map(|(output, pick)| {
            let Some(pick) = pick else { return Ok(None) };
            let start = output.logits.len().checked_sub(vocab).ok_or_else(|| {
                anyhow::anyhow!("a chunk given a token pick has no logits (it must ask for its last position)")
            })?;
            pick_row(&output.logits[start..], pick).map(Some)
        })
        .collect()
}

/// The token `pick` takes from one row of logits (edited and masked first, as the pick says).
pub fn pick_row(row: &[f32], pick: &TokenPick) -> Result<PickedToken> {
    let edited;
    let logits = if pick.edits.is_empty() && pick.allowed.is_none() {
        row
    } else {
        let mut copy = row.to_vec();
        apply_edits(&mut copy, &pick.edits);
        if let Some(mask) = &pick.allowed {
            apply_mask(&mut copy, &mask.wait().map_err(anyhow::Error::msg)?);
        }
        edited = copy;
        &edited[..]
    };
    let token = choose(logits, &pick.choice);
    let (logprob, top_logprobs) = match pick.logprobs {
        Some(n) => {
            let (logprob, top) = logprobs_of(logits, token, n);
            (Some(logprob), top)
        }
        None => (None, Vec::new()),
    };
    Ok(PickedToken {
        token,
        logprob,
        top_logprobs,
    })
}

/// Adds each routed slot to per-layer expert counters while delegating to the real experts.
pub struct CountingExperts<'a, E: ?Sized> {
    inner: &'a E,
    n_experts: usize,
    counts: &'a Mutex<ExpertCounts>,
}

impl<'a, E: ExpertExecutor + ?Sized> CountingExperts<'a, E> {
    pub fn new(inner: &'a E, n_experts: usize, counts: &'a Mutex<ExpertCounts>) -> Self {
        CountingExperts {
            inner,
            n_experts,
            counts,
        }
    }
}

/// Adds `routes`' slots of MoE layer `layer` to `counts`.
pub fn count_routes(counts: &mut ExpertCounts, layer: usize, n_experts: usize, routes: &TokenRoutes) {
    let layer_counts = counts.entry(layer).or_insert_with(|| vec![0; n_experts]);
    for &e in &routes.experts {
        if let Some(c) = layer_counts.get_mut(e as usize) {
            *c += 1;
        }
    }
}

impl<E: ExpertExecutor + ?Sized> ExpertExecutor for CountingExperts<'_, E> {
    fn routed_experts(&self, layer: usize, x: &[f32], routes: &TokenRoutes) -> Result<Vec<f32>> {
        if let Ok(mut counts) = self.counts.lock() {
            count_routes(&mut counts, layer, self.n_experts, routes);
        }
        self.inner.routed_experts(layer, x, routes)
    }
}

/// The CPU reference model with its host-memory cache, the routed experts behind `E`
/// (in-process [`crate::LocalExperts`], or remote shards).
pub struct CpuBackend<E: ExpertExecutor + Send + ?Sized> {
    pub model: Model,
    pub cache: KvCache,
    pub experts: Arc<E>,
    pub mla: MlaForm,
    counts: Mutex<ExpertCounts>,
    /// Bytes of the routed experts held in this process.
    expert_bytes: usize,
}

impl<E: ExpertExecutor + Send + ?Sized> CpuBackend<E> {
    /// `cache_tokens` positions in blocks of `block_size`.
    pub fn new(model: Model, experts: Arc<E>, expert_bytes: usize, cache_tokens: usize, block_size: usize) -> Self {
        let cache = KvCache::new(&model.config, block_size, cache_tokens.div_ceil(block_size).max(1));
        CpuBackend {
            model,
            cache,
            experts,
            mla: MlaForm::Auto,
            counts: Mutex::new(BTreeMap::new()),
            expert_bytes,
        }
    }

    pub fn step_options(&self) -> StepOptions {
        StepOptions {
            mla: self.mla,
            trace: false,
        }
    }
}

impl<E: ExpertExecutor + Send + ?Sized> StepBackend for CpuBackend<E> {
    fn config(&self) -> &ModelConfig {
        &self.model.config
    }

    fn device(&self) -> String {
        "cpu".into()
    }

    fn step(&mut self, chunks: &[Chunk]) -> Result<Vec<ChunkOutput>> {
        let counting = CountingExperts::new(self.experts.as_ref(), self.model.config.n_routed_experts, &self.counts);
        let opts = self.step_options();
        Ok(self.model.forward(chunks, &mut self.cache, &counting, &opts)?.0)
    }

    fn free_sequence(&mut self, seq: SeqId) {
        self.cache.free_sequence(seq);
    }

    fn truncate(&mut self, seq: SeqId, len: usize) {
        self.cache.truncate(seq, len);
    }

    fn discard_from(&mut self, seq: SeqId, len: usize) {
        self.cache.discard_from(seq, len);
    }

    fn withhold_from(&mut self, seq: SeqId, from: usize) {
        self.cache.withhold_from(seq, from);
    }

    fn has_mtp(&self) -> bool {
        self.model.has_mtp()
    }

    fn mtp_step(&mut self, chunks: &[Chunk]) -> Result<Vec<ChunkOutput>> {
        let counting = CountingExperts::new(self.experts.as_ref(), self.model.config.n_routed_experts, &self.counts);
        let opts = self.step_options();
        self.model.mtp_forward(chunks, &mut self.cache, &counting, &opts)
    }

    fn reuse_prefix(&mut self, seq: SeqId, start: usize, tokens: &[u32], keep_last: bool) -> usize {
        self.cache.reuse_prefix(seq, start, tokens, keep_last)
    }

    fn capacity(&self) -> CacheCapacity {
        CacheCapacity {
            block_size: self.cache.block_size(),
            total_blocks: self.cache.total_blocks(),
            free_blocks: self.cache.free_blocks(),
        }
    }

    fn take_expert_counts(&mut self) -> Result<ExpertCounts> {
        Ok(std::mem::take(&mut *self.counts.lock().map_err(|_| {
            anyhow::anyhow!("expert counters poisoned by an earlier panic")
        })?))
    }

    fn memory(&self) -> MemoryUse {
        MemoryUse {
            weights: (self.model.resident_bytes() + self.expert_bytes) as u64,
            kv_cache: self.cache.bytes() as u64,
            workspace: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(logits: Vec<f32>) -> ChunkOutput {
        ChunkOutput {
            positions: vec![0],
            logits,
            hidden: vec![],
        }
    }

    #[test]
    fn host_picks_take_each_chunks_last_row() {
        let vocab = 4;
        // Two positions of logits: only the last row counts.
        let outputs = [
            output(vec![9.0, 0.0, 0.0, 0.0, 0.0, 0.5, 3.0, 1.0]),
            output(vec![]),
            output(vec![1.0, 1.0, 0.0, 0.0]),
        ];
        let greedy = |logprobs| {
            Some(TokenPick {
                logprobs,
                ..TokenPick::plain(TokenChoice::GREEDY)
            })
        };
        let picked = pick_on_host(&outputs, &[greedy(None), None, greedy(Some(2))], vocab).expect("picks");
        assert_eq!(picked[0].as_ref().map(|p| p.token), Some(2));
        assert!(picked[1].is_none());
        let p = picked[2].as_ref().expect("third pick");
        // Ties go to the lower id; ln(e / (2e + 2)) for each of the two best.
        let lp = (1.0f64 / (2.0 + 2.0 / std::f64::consts::E)).ln() as f32;
        assert_eq!(p.token, 0);
        assert!((p.logprob.expect("logprob") - lp).abs() < 1e-6);
        assert_eq!(p.top_logprobs.iter().map(|t| t.0).collect::<Vec<_>>(), [0, 1]);
        let err = pick_on_host(&outputs[1..2], &[greedy(None)], vocab).unwrap_err();
        assert!(err.to_string().contains("no logits"), "{err}");
        assert!(pick_on_host(&outputs, &[None], vocab).is_err());
    }
}
