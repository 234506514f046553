//! Generation for one prompt on the GPU: chunked prefill, then decode with the engine's sampler
//! and stop rules.

use crate::model::CudaModel;
use anyhow::{bail, Result};
use dsv3_engine::{finish_reason, Chunk, GenerateOutput, Outputs, Sampler, SamplingParams};

/// Prompt positions per prefill step.
const PREFILL_CHUNK: usize = 2048;

pub fn generate(model: &mut CudaModel, prompt: &[u32], params: SamplingParams) -> Result<GenerateOutput> {
    let cfg = model.config.clone();
    if prompt.is_empty() {
        bail!("the prompt is empty");
    }
    params.validate().map_err(anyhow::Error::msg)?;
    if prompt.len() > cfg.max_position_embeddings {
        bail!(
            "prompt of {} tokens exceeds the context of {}",
            prompt.len(),
            cfg.max_position_embeddings
        );
    }
    let seq = 1;
    let mut sampler = Sampler::new(params, None);
    let mut logits = Vec::new();
    for start in (0..prompt.len()).step_by(PREFILL_CHUNK) {
        let end = (start + PREFILL_CHUNK).min(prompt.len());
        let outputs = if end == prompt.len() {
            Outputs::Last
        } else {
            Outputs::None
        };
        let (out, _) = model.forward(&[Chunk::new(seq, start, &prompt[start..end], outputs)], false)?;
        if end == prompt.len() {
            logits = out.into_iter().next().map(|o| o.logits).unwrap_or_default();
        }
    }
    let prompt_last_logits = logits.clone();
    let mut tokens = Vec::new();
    let mut cached = prompt.len();
    let finish = loop {
        if sampler.params().max_tokens == 0 {
            break dsv3_engine::FinishReason::Length;
        }
        let token = sampler.sample(&logits);
        tokens.push(token);
        if let Some(reason) = finish_reason(sampler.params(), &cfg, token, tokens.len(), cached) {
            break reason;
        }
        let (out, _) = model.forward(&[Chunk::new(seq, cached, &[token], Outputs::Last)], false)?;
        cached += 1;
        logits = out.into_iter().next().map(|o| o.logits).unwrap_or_default();
    };
    model.free_sequence(seq);
    Ok(GenerateOutput {
        tokens,
        prompt_last_logits,
        finish,
    })
}
