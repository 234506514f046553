//! The in-process engine: model + local experts + KV cache, and a continuous-batching
//! generation loop over many requests.

use crate::checkpoint::{Checkpoint, ModelFiles};
use crate::config::ModelConfig;
use crate::kv_cache::{KvCache, SeqId};
use crate::mla::MlaForm;
use crate::model::{Chunk, Model, Outputs, StepOptions};
use crate::moe::{ExpertSelection, LocalExperts};
use crate::sampling::{Sampler, SamplingParams};
use anyhow::{bail, Result};
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Positions the KV cache holds across all sequences.
    pub cache_tokens: usize,
    pub block_size: usize,
    /// Most tokens one step processes (prefill is chunked to fit).
    pub max_step_tokens: usize,
    pub mla: MlaForm,
    pub experts: ExpertSelection,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            cache_tokens: 8192,
            block_size: 16,
            max_step_tokens: 512,
            mla: MlaForm::Auto,
            experts: ExpertSelection::All,
        }
    }
}

/// A load step finished: `done` of `total` layers (main layers, MTP, then expert layers).
#[derive(Clone, Debug)]
pub struct LoadProgress {
    pub stage: &'static str,
    pub done: usize,
    pub total: usize,
    pub elapsed_s: f64,
}

/// Why a sequence stops after sampling `token` as its `generated`-th token with `cached`
/// positions in the cache, if it does: a stop id, end of sequence (unless ignored), the token
/// budget, or the model's context.
pub fn finish_reason(
    params: &SamplingParams,
    config: &ModelConfig,
    token: u32,
    generated: usize,
    cached: usize,
) -> Option<FinishReason> {
    if params.stop_token_ids.contains(&token) || (!params.ignore_eos && config.eos_token_ids.contains(&token)) {
        Some(FinishReason::Stop)
    } else if generated >= params.max_tokens {
        Some(FinishReason::Length)
    } else if cached + 1 > config.max_position_embeddings {
        Some(FinishReason::ContextFull)
    } else {
        None
    }
}

#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// Reached `max_tokens`.
    Length,
    /// Produced an end-of-sequence or stop token.
    Stop,
    /// Reached the model's context length.
    ContextFull,
}

#[derive(Clone, Debug)]
pub struct GenerateOutput {
    pub tokens: Vec<u32>,
    /// Full-vocabulary logits at the last prompt position.
    pub prompt_last_logits: Vec<f32>,
    pub finish: FinishReason,
}

pub struct Engine {
    pub model: Model,
    pub experts: LocalExperts,
    pub cache: KvCache,
    pub options: EngineOptions,
    /// Ids the tokenizer defines; logits beyond are never sampled.
    pub vocab_limit: Option<usize>,
    next_seq: SeqId,
}

struct Active {
    index: usize,
    seq: SeqId,
    prompt: Vec<u32>,
    sampler: Sampler,
    generated: Vec<u32>,
    cached: usize,
    prompt_last_logits: Vec<f32>,
    finish: Option<FinishReason>,
}

impl Engine {
    pub fn load(files: &ModelFiles, options: EngineOptions, progress: &mut dyn FnMut(LoadProgress)) -> Result<Self> {
        let started = Instant::now();
        let config = ModelConfig::from_model_files(files)?;
        let ckpt = Checkpoint::open(files)?;
        let moe_layers = (0..config.num_cache_layers())
            .filter(|&l| config.is_moe_layer(l) || l >= config.num_hidden_layers)
            .count();
        let total = config.num_cache_layers() + moe_layers;
        let mut done = 0;
        let mut tick = |stage: &'static str| {
            done += 1;
            progress(LoadProgress {
                stage,
                done,
                total,
                elapsed_s: started.elapsed().as_secs_f64(),
            });
        };
        let model = Model::from_checkpoint(config.clone(), &ckpt, &mut |_| tick("layers"))?;
        let experts = LocalExperts::load(&ckpt, &config, &options.experts, |_| tick("experts"))?;
        let cache = KvCache::new(
            &config,
            options.block_size,
            options.cache_tokens.div_ceil(options.block_size).max(1),
        );
        Ok(Engine {
            model,
            experts,
            cache,
            options,
            vocab_limit: None,
            next_seq: 1,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.model.config
    }

    pub fn step_options(&self) -> StepOptions {
        StepOptions {
            mla: self.options.mla,
            trace: false,
        }
    }

    /// Bytes of weights a step reads: everything but the routed experts, plus each routed expert
    /// that `routes` (per MoE layer) touched once.
    pub fn step_weight_bytes(&self, routes: &std::collections::BTreeMap<usize, crate::moe::TokenRoutes>) -> usize {
        let experts: usize = routes
            .iter()
            .map(|(&layer, r)| {
                let distinct: std::collections::BTreeSet<u32> = r.experts.iter().copied().collect();
                distinct
                    .iter()
                    .filter_map(|&e| self.experts.expert(layer, e))
                    .map(|m| m.weight_bytes())
                    .sum::<usize>()
            })
            .sum();
        self.model.weight_bytes() + experts
    }

    fn new_seq(&mut self) -> SeqId {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    /// Generates for every request, batching them in each step: prompts are prefilled in chunks
    /// that fit the step budget, alongside the decode tokens of running sequences. Requests wait
    /// when the cache cannot hold their worst case yet.
    pub fn generate(&mut self, requests: &[GenerateRequest]) -> Result<Vec<Option<GenerateOutput>>> {
        let cfg = self.config().clone();
        for (i, r) in requests.iter().enumerate() {
            if r.prompt.is_empty() {
                bail!("request {i}: the prompt is empty");
            }
            if let Err(e) = r.params.validate() {
                bail!("request {i}: {e}");
            }
            if r.prompt.len() > cfg.max_position_embeddings {
                bail!(
                    "request {i}: prompt of {} tokens exceeds the context of {}",
                    r.prompt.len(),
                    cfg.max_position_embeddings
                );
            }
            if let Some(&bad) = r.prompt.iter().find(|&&t| t as usize >= cfg.vocab_size) {
                bail!(
                    "request {i}: token id {bad} is outside the vocabulary (size {})",
                    cfg.vocab_size
                );
            }
        }
        let mut outputs: Vec<Option<GenerateOutput>> = vec![None; requests.len()];
        let mut waiting: std::collections::VecDeque<usize> = (0..requests.len()).collect();
        let mut active: Vec<Active> = Vec::new();
        let opts = self.step_options();
        while !waiting.is_empty() || !active.is_empty() {
            self.admit(requests, &mut waiting, &mut active)?;
            if active.is_empty() {
                bail!(
                    "the KV cache ({} positions) cannot hold request {}",
                    self.options.cache_tokens,
                    waiting[0]
                );
            }
            let mut budget = self.options.max_step_tokens.max(1);
            let mut chunk_tokens: Vec<(usize, Vec<u32>, usize, Outputs)> = Vec::new();
            for (a_index, a) in active.iter().enumerate() {
                if budget == 0 {
                    break;
                }
                if a.cached < a.prompt.len() {
                    let n = (a.prompt.len() - a.cached).min(budget);
                    let outputs = if a.cached + n == a.prompt.len() {
                        Outputs::Last
                    } else {
                        Outputs::None
                    };
                    chunk_tokens.push((a_index, a.prompt[a.cached..a.cached + n].to_vec(), a.cached, outputs));
                    budget -= n;
                } else {
                    let last = *a.generated.last().expect("decoding sequences have a token");
                    chunk_tokens.push((a_index, vec![last], a.cached, Outputs::Last));
                    budget -= 1;
                }
            }
            let chunks: Vec<Chunk> = chunk_tokens
                .iter()
                .map(|(i, toks, start, out)| Chunk::new(active[*i].seq, *start, toks, *out))
                .collect();
            let (results, _) = self.model.forward(&chunks, &mut self.cache, &self.experts, &opts)?;
            for ((a_index, toks, _, _), result) in chunk_tokens.iter().zip(results) {
                let a = &mut active[*a_index];
                a.cached += toks.len();
                if result.logits.is_empty() {
                    continue;
                }
                if a.generated.is_empty() {
                    a.prompt_last_logits = result.logits.clone();
                }
                if a.sampler.params().max_tokens == 0 {
                    a.finish = Some(FinishReason::Length);
                    continue;
                }
                let token = a.sampler.sample(&result.logits);
                a.generated.push(token);
                a.finish = finish_reason(a.sampler.params(), &cfg, token, a.generated.len(), a.cached);
            }
            let (finished, running): (Vec<Active>, Vec<Active>) = active.into_iter().partition(|a| a.finish.is_some());
            for a in finished {
                self.cache.free_sequence(a.seq);
                outputs[a.index] = Some(GenerateOutput {
                    tokens: a.generated,
                    prompt_last_logits: a.prompt_last_logits,
                    finish: a.finish.expect("partitioned on finish"),
                });
            }
            active = running;
        }
        Ok(outputs)
    }

    fn admit(
        &mut self,
        requests: &[GenerateRequest],
        waiting: &mut std::collections::VecDeque<usize>,
        active: &mut Vec<Active>,
    ) -> Result<()> {
        let block = self.cache.block_size();
        let mut reserved: usize = active
            .iter()
            .map(|a| (a.prompt.len() + a.sampler.params().max_tokens).div_ceil(block))
            .sum();
        while let Some(&next) = waiting.front() {
            let r = &requests[next];
            let worst = (r.prompt.len() + r.params.max_tokens).min(self.config().max_position_embeddings);
            let need = worst.div_ceil(block);
            if reserved + need > self.cache.total_blocks() && !active.is_empty() {
                break;
            }
            if need > self.cache.total_blocks() {
                bail!(
                    "request {next} needs {worst} cache positions, the cache holds {}",
                    self.cache.total_blocks() * block
                );
            }
            waiting.pop_front();
            reserved += need;
            let seq = self.new_seq();
            active.push(Active {
                index: next,
                seq,
                prompt: r.prompt.clone(),
                sampler: Sampler::new(r.params.clone(), self.vocab_limit),
                generated: Vec::new(),
                cached: 0,
                prompt_last_logits: Vec::new(),
                finish: None,
            });
        }
        Ok(())
    }
}
