//! The router's scheduler: continuous batching over one or more attention ranks.
//!
//! Requests queue (bounded: a full queue is refused with 429), are admitted to the attention
//! rank with the most free KV cache when their prompt fits (cache is taken as sequences grow, not
//! reserved for `max_tokens`), and join the running batch between steps. Every step gives each
//! running sequence either its next prefill chunk (under a per-rank token budget) or its last
//! sampled token. When a rank's cache cannot hold the next step, its newest sequences are
//! preempted: their cache is freed and they wait at the head of the queue, to be prefilled again
//! from prompt + output so far (their clients see only a pause). A prompt no rank's cache can hold
//! is refused at submission (400). Ranks step in parallel. A rank that fails ends the requests it
//! carried with an error and is probed until it answers again; its sequences are released so its
//! cache is clean when it comes back.

use crate::rank::AttentionRank;
use crate::sampling_spec::to_spec;
use dsv3_api::backend::{
    Backend, BackendStats, GenerationEvent, GenerationRequest, Health, RankStats, SchedulerTime, SubmitError,
    TokenLogprob,
};
use dsv3_engine::batch::next_tokens;
use dsv3_engine::{finish_reason, FinishReason, ModelConfig};
use dsv3_proto::{SamplingSpec, StepItem, StepRequest};
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Requests that may wait for admission before new ones are refused.
    pub max_waiting: usize,
    /// Tokens one rank processes in one step (prefill is chunked to fit).
    pub max_step_tokens: usize,
    /// Sequences one rank runs at once; more wait for admission.
    pub max_running_per_rank: usize,
    /// How often a failed rank is probed.
    pub probe_interval: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_waiting: 256,
            max_step_tokens: 512,
            max_running_per_rank: 256,
            probe_interval: Duration::from_millis(500),
        }
    }
}

struct Pending {
    request: GenerationRequest,
    events: UnboundedSender<GenerationEvent>,
    /// A preempted sequence: its id and the tokens it had generated (prefilled again after the
    /// prompt when it is admitted again).
    resume: Option<(u64, Vec<u32>)>,
}

struct Running {
    seq: u64,
    rank: usize,
    /// What the rank prefills: the request's prompt, then, after a preemption, the output so far.
    prompt: Vec<u32>,
    request: GenerationRequest,
    events: UnboundedSender<GenerationEvent>,
    /// Positions already in the rank's cache.
    cached: usize,
    /// Tokens generated so far (kept to recompute them after a preemption).
    output: Vec<u32>,
    last_token: Option<u32>,
    /// Admitted again after a preemption or a migration: its prompt was counted the first time.
    resumed: bool,
}

impl Running {
    /// Cache blocks the sequence holds once its prompt is in and its next token is written: what
    /// the rank must keep for it through the next step (drafts only take room left over).
    fn committed_blocks(&self, block: usize) -> usize {
        (self.prompt.len().max(self.cached) + 1).div_ceil(block)
    }

    /// The most drafts (up to `most`) a sequence feeding `fed` tokens can take in a step with
    /// `spare` blocks left on its rank — fed after its token when `decoding`, and drafted for the
    /// next step — and the blocks they take: the positions drafts may need
    /// ([`dsv3_engine::speculative::positions_needed`]) beyond those committed.
    fn drafts_with_room(&self, block: usize, fed: usize, decoding: bool, most: usize, spare: usize) -> (usize, usize) {
        let committed = self.committed_blocks(block);
        (0..=most)
            .rev()
            .map(|d| {
                let fed_drafts = if decoding { d } else { 0 };
                let positions = dsv3_engine::speculative::positions_needed(self.cached, fed, fed_drafts, d);
                (d, positions.div_ceil(block).saturating_sub(committed))
            })
            .find(|&(_, extra)| extra <= spare)
            .unwrap_or((0, 0))
    }
}

/// Blocks of a rank's cache admission leaves free, so running sequences can grow a little before
/// anyone is preempted.
fn watermark(total_blocks: usize) -> usize {
    (total_blocks / 64).max(1)
}

struct RankSlot {
    rank: Arc<dyn AttentionRank>,
    healthy: bool,
    /// Stopping: no new sequences go to it; those it holds run to their end.
    draining: bool,
    detail: String,
    block_size: usize,
    total_blocks: usize,
    /// Drafts it verifies per decoding sequence and step (speculative decoding; 0 = off).
    speculative_tokens: usize,
    last_probe: Option<Instant>,
    /// Device, memory and expert traffic from its last answer.
    stats: RankStats,
    /// The beginnings of the prompts it took most recently (newest last): its prefix cache
    /// probably still holds them.
    recent_prompts: std::collections::VecDeque<Vec<u32>>,
}

/// Prompts remembered per rank for prefix affinity, and how much of each.
const RECENT_PROMPTS: usize = 64;
const RECENT_PROMPT_TOKENS: usize = 1024;

/// Tokens `a` and `b` share from the start, in whole blocks of `block`.
fn shared_blocks(a: &[u32], b: &[u32], block: usize) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count() / block.max(1)
}

#[derive(Default)]
struct Shared {
    stats: BackendStats,
    health: Option<Health>,
    expert_tokens: BTreeMap<u32, Vec<u64>>,
    /// Positions the largest healthy rank's cache holds: the longest prompt that can be served.
    largest_cache: usize,
}

/// The scheduler as an HTTP [`Backend`]: `submit` queues, a dedicated thread runs the steps.
pub struct Fleet {
    config: ModelConfig,
    commands: Mutex<mpsc::Sender<Pending>>,
    waiting: Arc<AtomicUsize>,
    max_waiting: usize,
    shared: Arc<Mutex<Shared>>,
}

impl Fleet {
    pub fn start(config: ModelConfig, ranks: Vec<Arc<dyn AttentionRank>>, options: SchedulerConfig) -> Arc<Fleet> {
        let (tx, rx) = mpsc::channel();
        let waiting = Arc::new(AtomicUsize::new(0));
        let shared = Arc::new(Mutex::new(Shared::default()));
        let fleet = Arc::new(Fleet {
            config: config.clone(),
            commands: Mutex::new(tx),
            waiting: waiting.clone(),
            max_waiting: options.max_waiting,
            shared: shared.clone(),
        });
        let slots = ranks
            .into_iter()
            .map(|rank| RankSlot {
                rank,
                healthy: false,
                draining: false,
                detail: "not probed yet".into(),
                block_size: 16,
                recent_prompts: Default::default(),
                total_blocks: 0,
                speculative_tokens: 0,
                last_probe: None,
                stats: RankStats::default(),
            })
            .collect();
        let mut scheduler = Scheduler {
            config,
            options,
            inbox: rx,
            waiting_count: waiting,
            shared,
            ranks: slots,
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_seq: 1,
            time: SchedulerTime::default(),
        };
        std::thread::Builder::new()
            .name("dsv3-scheduler".into())
            .spawn(move || scheduler.run())
            .expect("spawning the scheduler thread");
        fleet
    }
}

impl Backend for Fleet {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn submit(
        &self,
        request: GenerationRequest,
    ) -> Result<tokio::sync::mpsc::UnboundedReceiver<GenerationEvent>, SubmitError> {
        dsv3_engine::check_request(&self.config, &request.prompt, &request.params).map_err(SubmitError::Invalid)?;
        let health = self.health();
        if !health.ready {
            return Err(SubmitError::NotReady(health.detail));
        }
        let largest = self.shared.lock().map(|s| s.largest_cache).unwrap_or(0);
        if request.prompt.len() + 1 > largest {
            return Err(SubmitError::Invalid(format!(
                "the prompt has {} tokens; the largest attention rank's KV cache holds {largest} positions \
                 (the prompt and at least one generated token must fit)",
                request.prompt.len()
            )));
        }
        if self.waiting.fetch_add(1, Ordering::SeqCst) >= self.max_waiting {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::QueueFull);
        }
        let (events, receiver) = tokio::sync::mpsc::unbounded_channel();
        let sent = self
            .commands
            .lock()
            .map(|tx| {
                tx.send(Pending {
                    request,
                    events,
                    resume: None,
                })
                .is_ok()
            })
            .unwrap_or(false);
        if !sent {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::NotReady("the scheduler has stopped".into()));
        }
        Ok(receiver)
    }

    fn health(&self) -> Health {
        self.shared
            .lock()
            .ok()
            .and_then(|s| s.health.clone())
            .unwrap_or(Health {
                ready: false,
                detail: "starting: attention ranks not probed yet".into(),
            })
    }

    fn stats(&self) -> BackendStats {
        self.shared.lock().map(|s| s.stats.clone()).unwrap_or_default()
    }
}

/// One rank's step; a panic in it is that rank's error, not the scheduler's end.
fn step_rank(rank: &dyn AttentionRank, batch: StepRequest) -> anyhow::Result<dsv3_proto::StepReply> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rank.step(batch)))
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the step panicked on this rank")))
}

/// Adds a rank's reported expert counters to the fleet's totals.
fn add_expert_load(shared: &Mutex<Shared>, loads: Vec<dsv3_proto::LayerLoad>) {
    let Ok(mut shared) = shared.lock() else { return };
    for load in loads {
        let entry = shared.expert_tokens.entry(load.layer).or_default();
        entry.resize(entry.len().max(load.tokens_per_expert.len()), 0);
        for (e, n) in load.tokens_per_expert.iter().enumerate() {
            entry[e] += n;
        }
    }
}

/// What the metrics show of a rank's answer to a probe.
fn rank_stats(rank: usize, info: &dsv3_proto::AttentionInfo) -> RankStats {
    let memory = info.memory.unwrap_or_default();
    RankStats {
        rank,
        device: info.device.clone(),
        weight_bytes: memory.weight_bytes,
        kv_cache_bytes: memory.kv_cache_bytes,
        workspace_bytes: memory.workspace_bytes,
        expert_seconds: info.expert_seconds,
        expert_bytes_sent: info.expert_bytes_sent,
        expert_bytes_received: info.expert_bytes_received,
        expert_layers: info.expert_layers,
        drafts_scored: info.drafts_scored.clone(),
        drafts_accepted: info.drafts_accepted.clone(),
    }
}

struct Scheduler {
    config: ModelConfig,
    options: SchedulerConfig,
    inbox: mpsc::Receiver<Pending>,
    waiting_count: Arc<AtomicUsize>,
    shared: Arc<Mutex<Shared>>,
    ranks: Vec<RankSlot>,
    waiting: VecDeque<Pending>,
    running: Vec<Running>,
    next_seq: u64,
    time: SchedulerTime,
}

impl Scheduler {
    fn run(&mut self) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                self.publish();
                match self.inbox.recv_timeout(self.options.probe_interval) {
                    Ok(p) => self.waiting.push_back(p),
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
            let iteration = Instant::now();
            while let Ok(p) = self.inbox.try_recv() {
                self.waiting.push_back(p);
            }
            self.probe_ranks();
            self.drop_cancelled();
            self.admit();
            self.publish();
            let stepping = !self.running.is_empty();
            if stepping {
                self.step();
            } else if !self.waiting.is_empty() {
                // Nothing fits anywhere (all ranks down or full): wait for a probe to change that.
                std::thread::sleep(Duration::from_millis(20));
            }
            if stepping {
                self.time.busy_seconds += iteration.elapsed().as_secs_f64();
            }
        }
    }

    fn probe_ranks(&mut self) {
        for (index, slot) in self.ranks.iter_mut().enumerate() {
            let due = slot
                .last_probe
                .is_none_or(|t| t.elapsed() >= self.options.probe_interval);
            if !due {
                continue;
            }
            slot.last_probe = Some(Instant::now());
            match slot.rank.info() {
                Ok(mut info) => {
                    add_expert_load(&self.shared, std::mem::take(&mut info.expert_load));
                    slot.stats = rank_stats(index, &info);
                    slot.block_size = info.block_size.max(1) as usize;
                    slot.total_blocks = info.total_blocks as usize;
                    slot.speculative_tokens = info.speculative_tokens as usize;
                    slot.healthy = info.experts_ready;
                    slot.draining = info.draining;
                    // Unready: why; ready: empty, or what it serves without (degraded).
                    slot.detail = info.detail;
                }
                Err(e) => {
                    slot.healthy = false;
                    slot.detail = format!("{e:#}");
                }
            }
        }
    }

    fn publish(&self) {
        let Ok(mut shared) = self.shared.lock() else { return };
        // Not ready: why; ready: empty, or what it serves without.
        let notes: Vec<String> = self
            .ranks
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.detail.is_empty())
            .map(|(i, s)| format!("attention rank {i}: {}", s.detail))
            .collect();
        // Ranks that take new sequences: a draining one only finishes those it holds.
        let healthy = self.ranks.iter().filter(|s| s.healthy && !s.draining).count();
        shared.health = if self.ranks.iter().all(|s| s.last_probe.is_none()) {
            None
        } else if healthy == 0 {
            Some(Health {
                ready: false,
                detail: format!("no attention rank can serve: {}", notes.join("; ")),
            })
        } else if notes.is_empty() {
            Some(Health {
                ready: true,
                detail: format!("{} attention ranks ready", self.ranks.len()),
            })
        } else {
            // Serving on what is left: a lost rank's sequences moved to the others.
            Some(Health {
                ready: true,
                detail: format!(
                    "degraded: {healthy} of {} attention ranks serving; {}",
                    self.ranks.len(),
                    notes.join("; ")
                ),
            })
        };
        let expert_tokens = shared.expert_tokens.values().cloned().collect();
        shared.largest_cache = self
            .ranks
            .iter()
            .filter(|s| s.healthy)
            .map(|s| s.total_blocks * s.block_size)
            .max()
            .unwrap_or(0);
        shared.stats = BackendStats {
            running: self.running.len(),
            waiting: self.waiting.len(),
            cache_used_blocks: (0..self.ranks.len()).map(|i| self.committed_blocks(i)).sum(),
            cache_total_blocks: self.ranks.iter().map(|s| s.total_blocks).sum(),
            expert_tokens,
            ranks: self.ranks.iter().map(|s| s.stats.clone()).collect(),
            scheduler: self.time,
        };
    }

    fn drop_cancelled(&mut self) {
        let (cancelled, kept): (Vec<Running>, Vec<Running>) = std::mem::take(&mut self.running)
            .into_iter()
            .partition(|r| r.events.is_closed());
        self.running = kept;
        self.release(&cancelled);
        let before = self.waiting.len();
        self.waiting.retain(|p| !p.events.is_closed());
        self.waiting_count
            .fetch_sub(before - self.waiting.len(), Ordering::SeqCst);
    }

    /// Cache blocks the running sequences on `rank` hold through the next step.
    fn committed_blocks(&self, rank: usize) -> usize {
        let block = self.ranks[rank].block_size;
        self.running
            .iter()
            .filter(|r| r.rank == rank)
            .map(|r| r.committed_blocks(block))
            .sum()
    }

    /// Frees the ranks' cache for finished, cancelled or failed sequences.
    /// One release call per rank (a rank that does not answer costs one timeout, not one per
    /// sequence).
    fn release(&self, done: &[Running]) {
        let mut by_rank: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
        for r in done {
            by_rank.entry(r.rank).or_default().push(r.seq);
        }
        for (rank, seqs) in by_rank {
            // A rank that is down has lost its cache anyway.
            let _ = self.ranks[rank].rank.release(&seqs);
        }
    }

    fn admit(&mut self) {
        while let Some(pending) = self.waiting.front() {
            let prompt = &pending.request.prompt;
            // A request whose prompt begins with whole blocks another one has not computed yet
            // (the `n` choices of one request, agents sending the same tools) waits until they
            // are, then takes them instead of computing them twice. The wait ends with those
            // blocks, not with the other's whole prefill.
            let sibling_prefilling = pending.resume.is_none()
                && self.running.iter().any(|r| {
                    let block = self.ranks[r.rank].block_size;
                    r.cached < shared_blocks(prompt, &r.prompt, block) * block
                });
            if sibling_prefilling {
                break;
            }
            let resumed = pending.resume.as_ref().map_or(0, |(_, output)| output.len());
            let positions = pending.request.prompt.len() + resumed + 1;
            // Among the ranks with room: the one whose cache probably holds the longest prefix
            // of the prompt, then the one with the most free blocks.
            let choice = self
                .ranks
                .iter()
                .enumerate()
                .filter(|(i, s)| {
                    s.healthy
                        && !s.draining
                        && self.running.iter().filter(|r| r.rank == *i).count()
                            < self.options.max_running_per_rank.max(1)
                })
                .map(|(i, s)| {
                    let free = s
                        .total_blocks
                        .saturating_sub(self.committed_blocks(i) + watermark(s.total_blocks));
                    let affinity = s
                        .recent_prompts
                        .iter()
                        .map(|p| shared_blocks(prompt, p, s.block_size))
                        .max()
                        .unwrap_or(0);
                    (i, free, positions.div_ceil(s.block_size), affinity)
                })
                .filter(|&(_, free, need, _)| need <= free)
                .max_by_key(|&(i, free, _, affinity)| (affinity, free, std::cmp::Reverse(i)))
                .map(|(i, free, need, _)| (i, free, need));
            let Some((rank, _, _)) = choice else {
                let fits_somewhere = self
                    .ranks
                    .iter()
                    .any(|s| positions.div_ceil(s.block_size) <= s.total_blocks);
                if !fits_somewhere && self.ranks.iter().all(|s| s.healthy) {
                    let p = self.waiting.pop_front().expect("front exists");
                    self.waiting_count.fetch_sub(1, Ordering::SeqCst);
                    let event = if p.resume.is_some() {
                        // Preempted after its output grew past what any cache holds with the
                        // prompt: it ends as a lone sequence outgrowing its rank does.
                        GenerationEvent::Finished {
                            reason: FinishReason::Length,
                        }
                    } else {
                        GenerationEvent::Failed {
                            message: format!(
                                "the request needs {positions} cache positions; no attention rank holds that many"
                            ),
                        }
                    };
                    let _ = p.events.send(event);
                    continue;
                }
                break;
            };
            let p = self.waiting.pop_front().expect("front exists");
            self.waiting_count.fetch_sub(1, Ordering::SeqCst);
            let coming_back = p.resume.is_some();
            let (seq, output) = match p.resume {
                Some(resume) => resume,
                None => {
                    let _ = p.events.send(GenerationEvent::Scheduled);
                    self.next_seq += 1;
                    (self.next_seq - 1, Vec::new())
                }
            };
            let recent = &mut self.ranks[rank].recent_prompts;
            recent.push_back(p.request.prompt[..p.request.prompt.len().min(RECENT_PROMPT_TOKENS)].to_vec());
            if recent.len() > RECENT_PROMPTS {
                recent.pop_front();
            }
            let mut prompt = p.request.prompt.clone();
            prompt.extend_from_slice(&output);
            self.running.push(Running {
                seq,
                rank,
                prompt,
                request: p.request,
                events: p.events,
                cached: 0,
                output,
                last_token: None,
                resumed: coming_back,
            });
        }
    }

    /// Makes room on every rank for the next step: while the running sequences of a rank would
    /// hold more blocks than it has, its newest is preempted (cache freed, queued first to be
    /// prefilled again); a sequence alone on a rank that outgrows the whole cache ends with
    /// `length`, as at the end of the context.
    fn make_room(&mut self) {
        for rank in 0..self.ranks.len() {
            let slot = &self.ranks[rank];
            let (block, total) = (slot.block_size, slot.total_blocks);
            while self.committed_blocks(rank) > total {
                let newest = self
                    .running
                    .iter()
                    .rposition(|r| r.rank == rank)
                    .expect("blocks are committed only by running sequences");
                let r = self.running.remove(newest);
                let alone = !self.running.iter().any(|o| o.rank == rank);
                if alone && r.committed_blocks(block) > total {
                    let _ = r.events.send(GenerationEvent::Finished {
                        reason: FinishReason::Length,
                    });
                } else {
                    let _ = self.ranks[rank].rank.release(&[r.seq]);
                    self.time.preemptions += 1;
                    self.requeue_first(r);
                    continue;
                }
                self.release(&[r]);
            }
        }
    }

    /// The spec of `r`'s pick; `first`: its first since (re)admission, which carries the rules
    /// and grammar the rank keeps.
    fn sampling_spec(&self, r: &Running, first: bool) -> SamplingSpec {
        let params = &r.request.params;
        // The output already in the prompt: tokens sampled before a preemption.
        let generated_before = r.prompt.len() - r.request.prompt.len();
        let end_ids = if first && params.rules.min_tokens > 0 {
            dsv3_engine::end_ids(params, &self.config)
        } else {
            Vec::new()
        };
        to_spec(params, r.request.logprobs, generated_before, end_ids, first)
    }

    fn step(&mut self) {
        self.make_room();
        // Build one request per rank, in admission order, under each rank's token budget.
        let mut batches: Vec<StepRequest> = vec![StepRequest::default(); self.ranks.len()];
        let mut budget = vec![self.options.max_step_tokens.max(1); self.ranks.len()];
        // Blocks of each rank beyond what its running sequences hold through this step.
        let mut spare: Vec<usize> = (0..self.ranks.len())
            .map(|i| self.ranks[i].total_blocks.saturating_sub(self.committed_blocks(i)))
            .collect();
        let mut planned: Vec<(usize, usize)> = Vec::new(); // (running index, tokens this step)
        for (i, r) in self.running.iter().enumerate() {
            let b = &mut budget[r.rank];
            // A prefill chunk that does not finish its prompt ends on a cache block's edge, so
            // the prefix cache can go on reusing whole blocks in the next chunk.
            let block = self.ranks[r.rank].block_size.max(1);
            let prefilling = r.cached < r.prompt.len() && r.prompt.len() - r.cached > *b;
            let take = if prefilling && *b >= block {
                *b / block * block
            } else {
                *b
            };
            let decoding = r.cached >= r.prompt.len();
            let Some((tokens, samples)) = next_tokens(&r.prompt, r.cached, r.last_token.as_ref(), take) else {
                continue;
            };
            // Speculative decoding: drafts for the items that sample, where the step budget (a
            // decoding item feeds its drafts) and the rank's spare cache allow — fewer near the
            // limits, never at a plain token's expense.
            let most = match (samples, decoding) {
                (false, _) => 0,
                (true, true) => self.ranks[r.rank].speculative_tokens.min(b.saturating_sub(1)),
                (true, false) => self.ranks[r.rank].speculative_tokens,
            };
            let (max_drafts, extra_blocks) = r.drafts_with_room(block, tokens.len(), decoding, most, spare[r.rank]);
            spare[r.rank] -= extra_blocks;
            let fed_drafts = if decoding { max_drafts } else { 0 };
            let item = StepItem {
                seq: r.seq,
                start: r.cached as u32,
                tokens: tokens.to_vec(),
                sample: samples.then(|| self.sampling_spec(r, r.cached < r.prompt.len())),
                max_drafts: max_drafts as u32,
            };
            *b = b.saturating_sub(item.tokens.len() + fed_drafts);
            planned.push((i, item.tokens.len()));
            batches[r.rank].items.push(item);
        }
        let busy = batches.iter().filter(|b| !b.items.is_empty()).count();
        let stepping = Instant::now();
        let replies: Vec<Option<anyhow::Result<dsv3_proto::StepReply>>> = if busy <= 1 {
            // One rank (`serve`): step on this thread, no thread to start per step.
            batches
                .into_iter()
                .enumerate()
                .map(|(i, batch)| (!batch.items.is_empty()).then(|| step_rank(self.ranks[i].rank.as_ref(), batch)))
                .collect()
        } else {
            std::thread::scope(|scope| {
                let handles: Vec<_> = batches
                    .into_iter()
                    .enumerate()
                    .map(|(i, batch)| {
                        let rank = self.ranks[i].rank.clone();
                        (!batch.items.is_empty()).then(|| scope.spawn(move || step_rank(rank.as_ref(), batch)))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.map(|h| {
                            h.join()
                                .unwrap_or_else(|_| Err(anyhow::anyhow!("the step thread died")))
                        })
                    })
                    .collect()
            })
        };
        self.time.steps += 1;
        self.time.step_seconds += stepping.elapsed().as_secs_f64();
        let mut failed_ranks: BTreeMap<usize, String> = BTreeMap::new();
        let mut sampled: BTreeMap<u64, Vec<dsv3_proto::Sampled>> = BTreeMap::new();
        let mut failed_seqs: BTreeMap<u64, String> = BTreeMap::new();
        let mut reused: BTreeMap<u64, usize> = BTreeMap::new();
        let mut masked: BTreeMap<u64, usize> = BTreeMap::new();
        for (rank, reply) in replies.into_iter().enumerate() {
            match reply {
                None => {}
                Some(Ok(reply)) => {
                    add_expert_load(&self.shared, reply.expert_load);
                    for s in reply.sampled {
                        sampled.entry(s.seq).or_default().push(s);
                    }
                    for f in reply.failed {
                        failed_seqs.insert(f.seq, f.message);
                    }
                    for p in reply.reused {
                        reused.insert(p.seq, p.tokens as usize);
                    }
                    for m in reply.masked {
                        masked.insert(m.seq, m.routes as usize);
                    }
                }
                Some(Err(e)) => {
                    failed_ranks.insert(rank, format!("{e:#}"));
                }
            }
        }
        let mut finished: Vec<usize> = Vec::new();
        // Sequences of a failed rank move to the healthy ones when there are any (its cache is
        // gone; they are prefilled again from the prompt and their output so far).
        let survivors = (0..self.ranks.len())
            .any(|i| self.ranks[i].healthy && !self.ranks[i].draining && !failed_ranks.contains_key(&i));
        let mut migrating: Vec<usize> = Vec::new();
        for (i, n) in planned {
            let r = &mut self.running[i];
            if failed_ranks.contains_key(&r.rank) {
                continue; // below, with the failed rank's other sequences
            }
            if let Some(message) = failed_seqs.remove(&r.seq) {
                let _ = r.events.send(GenerationEvent::Failed { message });
                finished.push(i);
                continue;
            }
            // Prompt tokens taken from the prefix cache, counted at first admission (a resumed
            // sequence taking back its own blocks is not a hit).
            if let Some(&tokens) = reused.get(&r.seq) {
                if !r.resumed {
                    let _ = r.events.send(GenerationEvent::Cached { tokens });
                }
            }
            if let Some(&routes) = masked.get(&r.seq) {
                let _ = r.events.send(GenerationEvent::ExpertsMasked { routes });
            }
            r.cached += n;
            // One token, or with speculative decoding the accepted drafts (each now cached)
            // and the token after them.
            for (k, s) in sampled.remove(&r.seq).unwrap_or_default().into_iter().enumerate() {
                if k > 0 {
                    r.cached += 1;
                }
                r.output.push(s.token);
                r.last_token = Some(s.token);
                let event = GenerationEvent::Token {
                    id: s.token,
                    logprob: s.logprob,
                    top_logprobs: s
                        .top_logprobs
                        .iter()
                        .map(|t| TokenLogprob {
                            id: t.id,
                            logprob: t.logprob,
                        })
                        .collect(),
                };
                if r.events.send(event).is_err() {
                    finished.push(i); // the client went away
                    break;
                }
                if let Some(reason) = finish_reason(&r.request.params, &self.config, s.token, r.output.len(), r.cached)
                {
                    let _ = r.events.send(GenerationEvent::Finished { reason });
                    finished.push(i);
                    break;
                }
            }
        }
        for (&rank, message) in &failed_ranks {
            self.ranks[rank].healthy = false;
            self.ranks[rank].detail = message.clone();
            self.ranks[rank].last_probe = Some(Instant::now());
        }
        for (i, r) in self.running.iter().enumerate() {
            let Some(message) = failed_ranks.get(&r.rank) else {
                continue;
            };
            if finished.contains(&i) {
                continue;
            }
            if survivors {
                migrating.push(i);
            } else {
                let _ = r.events.send(GenerationEvent::Failed {
                    message: format!("attention rank {} failed: {message}", r.rank),
                });
                finished.push(i);
            }
        }
        finished.sort_unstable();
        migrating.sort_unstable();
        let (mut done, mut kept, mut moved) = (Vec::new(), Vec::new(), Vec::new());
        for (i, r) in std::mem::take(&mut self.running).into_iter().enumerate() {
            if finished.binary_search(&i).is_ok() {
                done.push(r);
            } else if migrating.binary_search(&i).is_ok() {
                moved.push(r);
            } else {
                kept.push(r);
            }
        }
        self.running = kept;
        self.release(&done);
        self.migrate(moved);
    }

    /// Queues the sequences of a failed rank first, in admission order, to be resumed on
    /// another: the same stream, prefilled again from the prompt and the output so far (as a
    /// preempted sequence is), so the client sees neither an error nor a repeated token.
    fn migrate(&mut self, moved: Vec<Running>) {
        // In case a failed rank is alive and still holds their cache.
        self.release(&moved);
        for r in moved.into_iter().rev() {
            self.time.migrations += 1;
            self.requeue_first(r);
        }
    }

    /// Queues `r` first (its cache already freed), to resume — same sequence, same stream —
    /// from its prompt and output so far wherever there is room.
    fn requeue_first(&mut self, r: Running) {
        self.waiting_count.fetch_add(1, Ordering::SeqCst);
        self.waiting.push_front(Pending {
            request: r.request,
            events: r.events,
            resume: Some((r.seq, r.output)),
        });
    }
}

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
