//! The in-process engine: the CPU model, every routed expert and the KV cache as one
//! [`CpuBackend`], generating through the shared batching core.

use crate::backend::CpuBackend;
use crate::batch::BatchOptions;
use crate::checkpoint::{Checkpoint, ModelFiles};
use crate::config::{Fp8Activations, ModelConfig};
use crate::mla::MlaForm;
use crate::model::{Model, StepOptions};
use crate::moe::{ExpertSelection, LocalExperts};
use crate::sampling::SamplingParams;
use anyhow::Result;
use std::sync::Arc;
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
    /// What the FP8 products do with their activations.
    pub fp8_activations: Fp8Activations,
    /// Draft tokens the MTP module proposes per decode step (0: no speculative decoding).
    pub speculative_tokens: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            cache_tokens: 8192,
            block_size: 16,
            max_step_tokens: 512,
            mla: MlaForm::Auto,
            experts: ExpertSelection::All,
            fp8_activations: Fp8Activations::Unquantised,
            speculative_tokens: 0,
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
/// The tokens that end a sequence with `params`: its stop ids and, unless it ignores them, the
/// model's end-of-sequence ids.
pub fn end_ids(params: &SamplingParams, config: &ModelConfig) -> Vec<u32> {
    let mut ids = params.stop_token_ids.clone();
    if !params.ignore_eos {
        ids.extend(&config.eos_token_ids);
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

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
    /// The CPU model, its cache and every routed expert in this process.
    pub backend: CpuBackend<LocalExperts>,
    pub options: EngineOptions,
    /// Ids the tokenizer defines; logits beyond are never sampled.
    pub vocab_limit: Option<usize>,
}

impl Engine {
    pub fn load(files: &ModelFiles, options: EngineOptions, progress: &mut dyn FnMut(LoadProgress)) -> Result<Self> {
        let started = Instant::now();
        let config = ModelConfig::from_model_files(files)?.with_fp8_activations(options.fp8_activations);
        let ckpt = Checkpoint::open(files)?;
        let total = config.num_cache_layers() + config.routed_expert_layers().len();
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
        let expert_bytes = experts.weight_bytes();
        let mut backend = CpuBackend::new(
            model,
            Arc::new(experts),
            expert_bytes,
            options.cache_tokens,
            options.block_size,
        );
        backend.mla = options.mla;
        Ok(Engine {
            backend,
            options,
            vocab_limit: None,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.backend.model.config
    }

    pub fn step_options(&self) -> StepOptions {
        self.backend.step_options()
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
                    .filter_map(|&e| self.backend.experts.expert(layer, e))
                    .map(|m| m.weight_bytes())
                    .sum::<usize>()
            })
            .sum();
        self.backend.model.weight_bytes() + experts
    }

    /// Generates for every request through the shared batching core ([`crate::batch::generate`]).
    pub fn generate(&mut self, requests: &[GenerateRequest]) -> Result<Vec<Option<GenerateOutput>>> {
        let options = BatchOptions {
            max_step_tokens: self.options.max_step_tokens,
            vocab_limit: self.vocab_limit,
            speculative_tokens: self.options.speculative_tokens,
        };
        crate::batch::generate(&mut self.backend, requests, &options)
    }
}
