//! The batching core every driver shares: what makes a request acceptable, what each running
//! sequence feeds the next step under a token budget, how much cache a request may need, and
//! the generation loop over any [`StepBackend`] (`generate` on CPU or GPU). The fleet scheduler
//! builds its steps from the same pieces.

use crate::backend::StepBackend;
use crate::config::ModelConfig;
use crate::engine::{finish_reason, FinishReason, GenerateOutput, GenerateRequest};
use crate::model::{Chunk, Outputs};
use crate::sampling::{Sampler, SamplingParams};
use crate::speculative::{speculative_step, Acceptance, Drafting, SpecChunk};
use anyhow::{bail, Result};
use std::collections::VecDeque;

/// Checks a request before it is queued: a non-empty prompt of ids inside the vocabulary,
/// valid sampling parameters, and room in the context for the prompt and `max_tokens`.
pub fn check_request(config: &ModelConfig, prompt: &[u32], params: &SamplingParams) -> Result<(), String> {
    if prompt.is_empty() {
        return Err("the prompt is empty".into());
    }
    if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= config.vocab_size) {
        return Err(format!(
            "token id {bad} is outside the vocabulary (size {})",
            config.vocab_size
        ));
    }
    params.validate()?;
    params.rules.validate(config.vocab_size)?;
    if prompt.len() + params.max_tokens > config.max_position_embeddings {
        return Err(format!(
            "prompt ({} tokens) + max_tokens ({}) exceeds the context of {} tokens",
            prompt.len(),
            params.max_tokens,
            config.max_position_embeddings
        ));
    }
    Ok(())
}

/// Cache blocks a request may need at worst (prompt and every allowed token).
pub fn worst_case_blocks(prompt_len: usize, max_tokens: usize, block_size: usize) -> usize {
    (prompt_len + max_tokens).div_ceil(block_size.max(1))
}

/// What a running sequence feeds the next step with at most `budget` tokens: its next prefill
/// chunk, or its last sampled token; and whether the step samples after it. `None` when the
/// budget is spent or the sequence has nothing to feed yet.
pub fn next_tokens<'a>(
    prompt: &'a [u32],
    cached: usize,
    last_token: Option<&'a u32>,
    budget: usize,
) -> Option<(&'a [u32], bool)> {
    if budget == 0 {
        return None;
    }
    if cached < prompt.len() {
        let n = (prompt.len() - cached).min(budget);
        Some((&prompt[cached..cached + n], cached + n == prompt.len()))
    } else {
        last_token.map(|t| (std::slice::from_ref(t), true))
    }
}

/// Step size and sampling limit of [`generate`].
#[derive(Clone, Debug)]
pub struct BatchOptions {
    /// Most tokens one step processes (prefill is chunked to fit).
    pub max_step_tokens: usize,
    /// Ids the tokenizer defines; logits beyond are never sampled.
    pub vocab_limit: Option<usize>,
    /// Draft tokens the MTP module proposes per decode step (0: no speculative decoding).
    pub speculative_tokens: usize,
}

struct Active {
    index: usize,
    seq: u64,
    prompt: Vec<u32>,
    sampler: Sampler,
    generated: Vec<u32>,
    cached: usize,
    prompt_last_logits: Vec<f32>,
    finish: Option<FinishReason>,
    drafting: Drafting,
}

/// Generates for every request on `backend`, batching them in each step: prompts are prefilled
/// in chunks that fit the step budget, beside the decode tokens of running sequences. Requests
/// wait while the cache cannot hold their worst case.
pub fn generate(
    backend: &mut dyn StepBackend,
    requests: &[GenerateRequest],
    options: &BatchOptions,
) -> Result<Vec<Option<GenerateOutput>>> {
    Ok(generate_counting(backend, requests, options)?.0)
}

/// [`generate`], also giving how many drafts were accepted at each draft position.
pub fn generate_counting(
    backend: &mut dyn StepBackend,
    requests: &[GenerateRequest],
    options: &BatchOptions,
) -> Result<(Vec<Option<GenerateOutput>>, Acceptance)> {
    let cfg = backend.config().clone();
    for (i, r) in requests.iter().enumerate() {
        if let Err(e) = check_request(&cfg, &r.prompt, &r.params) {
            bail!("request {i}: {e}");
        }
    }
    if options.speculative_tokens > 0 && !backend.has_mtp() {
        bail!("--speculative-tokens needs the checkpoint's MTP module, and this one has none");
    }
    let mut outputs: Vec<Option<GenerateOutput>> = vec![None; requests.len()];
    let mut waiting: VecDeque<usize> = (0..requests.len()).collect();
    let mut active: Vec<Active> = Vec::new();
    let mut next_seq = 1;
    let mut acceptance = Acceptance::default();
    while !waiting.is_empty() || !active.is_empty() {
        admit(backend, requests, options, &mut waiting, &mut active, &mut next_seq)?;
        if options.speculative_tokens > 0 {
            speculative_generation_step(backend, options, &mut active, &mut acceptance)?;
        } else {
            generation_step(backend, options, &mut active)?;
        }
        let (finished, running): (Vec<Active>, Vec<Active>) = active.into_iter().partition(|a| a.finish.is_some());
        for a in finished {
            backend.free_sequence(a.seq);
            outputs[a.index] = Some(GenerateOutput {
                tokens: a.generated,
                prompt_last_logits: a.prompt_last_logits,
                finish: a.finish.expect("partitioned on finish"),
            });
        }
        active = running;
    }
    Ok((outputs, acceptance))
}

/// One step without drafts: each sequence's next prefill chunk or last token, one pick each.
fn generation_step(backend: &mut dyn StepBackend, options: &BatchOptions, active: &mut [Active]) -> Result<()> {
    let cfg = backend.config().clone();
    let mut budget = options.max_step_tokens.max(1);
    let mut chunks: Vec<Chunk> = Vec::new();
    let mut fed: Vec<(usize, usize)> = Vec::new(); // (active index, tokens fed)
    for (i, a) in active.iter().enumerate() {
        let Some((tokens, samples)) = next_tokens(&a.prompt, a.cached, a.generated.last(), budget) else {
            continue;
        };
        budget -= tokens.len();
        let outputs = if samples { Outputs::Last } else { Outputs::None };
        chunks.push(Chunk::new(a.seq, a.cached, tokens, outputs));
        fed.push((i, tokens.len()));
    }
    let results = backend.step(&chunks)?;
    drop(chunks);
    for ((i, n), result) in fed.into_iter().zip(results) {
        let a = &mut active[i];
        a.cached += n;
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
    Ok(())
}

/// One step with drafts ([`speculative_step`]): decoding sequences feed their last token and
/// the MTP module's drafts, and output every token the verification keeps.
fn speculative_generation_step(
    backend: &mut dyn StepBackend,
    options: &BatchOptions,
    active: &mut [Active],
    acceptance: &mut Acceptance,
) -> Result<()> {
    let cfg = backend.config().clone();
    let mut budget = options.max_step_tokens.max(1);
    // (active index, tokens fed, drafts, picks)
    let mut plan = Vec::new();
    for (i, a) in active.iter().enumerate() {
        let Some((tokens, samples)) = next_tokens(&a.prompt, a.cached, a.generated.last(), budget) else {
            continue;
        };
        let drafts = if samples {
            a.drafting
                .drafts_for(a.cached, tokens, options.speculative_tokens.min(budget - tokens.len()))
                .to_vec()
        } else {
            Vec::new()
        };
        budget -= tokens.len() + drafts.len();
        let picks = samples.then(|| a.sampler.picks_with_drafts(&drafts, None));
        plan.push((i, tokens.to_vec(), drafts, picks));
    }
    let chunks: Vec<SpecChunk> = plan
        .iter()
        .map(|(i, tokens, drafts, picks)| SpecChunk {
            seq: active[*i].seq,
            start: active[*i].cached,
            tokens,
            drafts: drafts.clone(),
            picks: picks.clone(),
            draft_depth: options.speculative_tokens,
            logits: active[*i].generated.is_empty(),
        })
        .collect();
    let fed: Vec<(usize, usize)> = plan.iter().map(|(i, tokens, _, _)| (*i, tokens.len())).collect();
    let mut drafting: Vec<Drafting> = fed
        .iter()
        .map(|&(i, _)| std::mem::take(&mut active[i].drafting))
        .collect();
    let mut refs: Vec<&mut Drafting> = drafting.iter_mut().collect();
    let outcomes = speculative_step(backend, &chunks, &mut refs, options.vocab_limit)?;
    drop(chunks);
    for (((i, n), outcome), d) in fed.into_iter().zip(outcomes).zip(drafting) {
        let a = &mut active[i];
        a.drafting = d;
        a.cached += n;
        let Some(outcome) = outcome else { continue };
        acceptance.add(outcome.drafted, outcome.accepted);
        if a.generated.is_empty() {
            a.prompt_last_logits = outcome.logits[..cfg.vocab_size].to_vec();
        }
        if a.sampler.params().max_tokens == 0 {
            a.finish = Some(FinishReason::Length);
            continue;
        }
        for (k, p) in outcome.tokens.iter().enumerate() {
            if k > 0 {
                a.cached += 1; // the token before it was a draft, now in the cache
            }
            a.sampler.accept(&[p.token]);
            a.generated.push(p.token);
            a.finish = finish_reason(a.sampler.params(), &cfg, p.token, a.generated.len(), a.cached);
            if a.finish.is_some() {
                break;
            }
        }
    }
    Ok(())
}

fn admit(
    backend: &dyn StepBackend,
    requests: &[GenerateRequest],
    options: &BatchOptions,
    waiting: &mut VecDeque<usize>,
    active: &mut Vec<Active>,
    next_seq: &mut u64,
) -> Result<()> {
    let capacity = backend.capacity();
    let block = capacity.block_size;
    let mut reserved: usize = active
        .iter()
        .map(|a| {
            worst_case_blocks(
                a.prompt.len(),
                a.sampler.params().max_tokens + 2 * options.speculative_tokens,
                block,
            )
        })
        .sum();
    while let Some(&next) = waiting.front() {
        let r = &requests[next];
        // Drafts take cache positions beyond the output: those verified and those the MTP
        // module writes ahead (`speculative::positions_needed`).
        let need = worst_case_blocks(
            r.prompt.len(),
            r.params.max_tokens + 2 * options.speculative_tokens,
            block,
        );
        if need > capacity.total_blocks {
            bail!(
                "request {next} needs {} cache positions, the cache holds {}",
                r.prompt.len() + r.params.max_tokens + 2 * options.speculative_tokens,
                capacity.total_blocks * block
            );
        }
        if reserved + need > capacity.total_blocks {
            break;
        }
        waiting.pop_front();
        reserved += need;
        active.push(Active {
            index: next,
            seq: *next_seq,
            prompt: r.prompt.clone(),
            sampler: Sampler::with_history(
                r.params.clone(),
                options.vocab_limit,
                &r.prompt,
                &[],
                crate::engine::end_ids(&r.params, backend.config()),
            ),
            generated: Vec::new(),
            cached: 0,
            prompt_last_logits: Vec::new(),
            finish: None,
            drafting: Drafting::default(),
        });
        *next_seq += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_tokens_chunks_prompts_under_the_budget_then_decodes() {
        let prompt = [1, 2, 3, 4, 5];
        assert_eq!(next_tokens(&prompt, 0, None, 3), Some((&prompt[..3], false)));
        assert_eq!(next_tokens(&prompt, 3, None, 3), Some((&prompt[3..], true)));
        assert_eq!(next_tokens(&prompt, 3, None, 0), None);
        assert_eq!(next_tokens(&prompt, 5, None, 4), None);
        assert_eq!(next_tokens(&prompt, 5, Some(&9), 4), Some((&[9][..], true)));
    }

    #[test]
    fn requests_are_checked_by_one_rule() {
        let cfg = crate::config::ModelConfig::from_json_str(
            r#"{"vocab_size":16,"hidden_size":8,"intermediate_size":8,"moe_intermediate_size":4,
            "num_hidden_layers":2,"num_attention_heads":1,"n_routed_experts":0,"num_experts_per_tok":1,
            "kv_lora_rank":2,"qk_nope_head_dim":2,"qk_rope_head_dim":2,"v_head_dim":2,
            "max_position_embeddings":8}"#,
        )
        .expect("config");
        let params = |max_tokens| SamplingParams {
            max_tokens,
            ..SamplingParams::default()
        };
        assert!(check_request(&cfg, &[1, 2], &params(6)).is_ok());
        assert!(check_request(&cfg, &[], &params(1)).unwrap_err().contains("empty"));
        assert!(check_request(&cfg, &[16], &params(1))
            .unwrap_err()
            .contains("vocabulary"));
        assert!(check_request(&cfg, &[1, 2], &params(7))
            .unwrap_err()
            .contains("context of 8"));
        assert_eq!(worst_case_blocks(5, 4, 4), 3);
    }
}
