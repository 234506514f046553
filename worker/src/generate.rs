//! `dsv3-worker generate`: one prompt, printed as JSON (`token_ids`, `prompt_last_logits`) or text.

use crate::device::{load_backend, DeviceArg, Fp8ActivationsArg};
use crate::{model_source, progress};
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use dsv3_engine::{BatchOptions, Engine, EngineOptions, ExpertSelection, GenerateRequest, MlaForm, SamplingParams};

/// Prompt positions per step on the GPU (its prefill is efficient in large chunks).
const GPU_STEP_TOKENS: usize = 2048;
use std::path::PathBuf;

#[derive(Clone, Copy, ValueEnum)]
pub enum MlaArg {
    Auto,
    Naive,
    Absorbed,
}

#[derive(Args)]
pub struct GenerateArgs {
    /// Model directory (config.json, safetensors shards, tokenizer). Default: the embedded tiny model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Prompt as comma-separated token ids, e.g. 0,5,77.
    #[arg(long, value_delimiter = ',', conflicts_with = "prompt")]
    prompt_token_ids: Option<Vec<u32>>,
    /// Prompt as text (needs tokenizer.json in the model directory).
    #[arg(long)]
    prompt: Option<String>,
    /// Wrap --prompt as a user message with the model's chat template.
    #[arg(long, requires = "prompt")]
    chat: bool,
    /// System message for --chat.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    #[arg(long, default_value_t = 16)]
    max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    top_p: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long)]
    seed: Option<u64>,
    /// Do not stop at the model's end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    /// Above 1 makes tokens of the prompt or output less likely (1 = off).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Subtracted from the logit of every token already generated.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    presence_penalty: f32,
    /// Subtracted from a token's logit once per time it was generated.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    frequency_penalty: f32,
    /// Draft tokens the checkpoint's MTP module proposes per decode step, verified in one step
    /// (speculative decoding; the output is the same). 0 = off.
    #[arg(long, default_value_t = 0)]
    speculative_tokens: usize,
    /// Print one JSON object: {"token_ids": [...], "prompt_last_logits": [...], ...}.
    #[arg(long)]
    json: bool,
    /// MLA form: naive for prefill and absorbed for decode (auto), or one of them everywhere
    /// (the CPU backend only).
    #[arg(long, value_enum, default_value_t = MlaArg::Auto)]
    mla: MlaArg,
    /// Where the model runs.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
    /// What the FP8 products do with their activations: quantised per token per 128 channels
    /// (auto on a GPU, as DeepSeek's FP8 inference) or unquantised (auto on the CPU).
    #[arg(long, value_enum, default_value_t = Fp8ActivationsArg::Auto, env = "DSV3_FP8_ACTIVATIONS")]
    fp8_activations: Fp8ActivationsArg,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let files = model_source::resolve(args.model.clone());
    let tokenizer = model_source::tokenizer(&files)?;
    let prompt: Vec<u32> = match (&args.prompt_token_ids, &args.prompt) {
        (Some(ids), _) => ids.clone(),
        (None, Some(text)) => {
            let tok = tokenizer
                .as_ref()
                .with_context(|| format!("--prompt needs tokenizer.json in {}", files.describe()))?;
            if args.chat {
                let mut messages = Vec::new();
                if let Some(system) = &args.system {
                    messages.push(serde_json::json!({"role": "system", "content": system}));
                }
                messages.push(serde_json::json!({"role": "user", "content": text}));
                tok.encode_chat(&messages, None, true)?
            } else {
                tok.encode(text, true)?
            }
        }
        (None, None) => bail!("give the prompt with --prompt-token-ids or --prompt"),
    };
    let params = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
        max_tokens: args.max_tokens,
        stop_token_ids: vec![],
        ignore_eos: args.ignore_eos,
        rules: dsv3_engine::LogitRules {
            repetition_penalty: args.repetition_penalty,
            presence_penalty: args.presence_penalty,
            frequency_penalty: args.frequency_penalty,
            ..Default::default()
        },
        grammar: None,
    };
    let request = GenerateRequest { prompt, params };
    // Drafts take positions past the output: those verified and those the MTP module writes ahead.
    let cache_tokens = (request.prompt.len() + args.max_tokens + 2 * args.speculative_tokens).max(16);
    let (outputs, acceptance) = if args.device.use_cuda()? {
        if !matches!(args.mla, MlaArg::Auto) {
            bail!("--mla applies to the CPU backend; the CUDA backend always runs MLA in both forms (auto)");
        }
        let mut backend = load_backend(
            &files,
            DeviceArg::Cuda,
            ExpertSelection::All,
            None,
            cache_tokens,
            args.fp8_activations,
        )?;
        let options = BatchOptions {
            max_step_tokens: GPU_STEP_TOKENS,
            vocab_limit: None,
            speculative_tokens: args.speculative_tokens,
        };
        dsv3_engine::batch::generate_counting(backend.as_mut(), &[request], &options)?
    } else {
        let options = EngineOptions {
            cache_tokens,
            mla: match args.mla {
                MlaArg::Auto => MlaForm::Auto,
                MlaArg::Naive => MlaForm::Naive,
                MlaArg::Absorbed => MlaForm::Absorbed,
            },
            fp8_activations: args.fp8_activations.resolve(false),
            ..EngineOptions::default()
        };
        let mut engine = Engine::load(&files, options, &mut progress::reporter(files.describe()))?;
        let options = BatchOptions {
            max_step_tokens: engine.options.max_step_tokens,
            vocab_limit: engine.vocab_limit,
            speculative_tokens: args.speculative_tokens,
        };
        dsv3_engine::batch::generate_counting(&mut engine.backend, &[request], &options)?
    };
    let output = outputs
        .into_iter()
        .next()
        .flatten()
        .context("the engine returned no output")?;
    for (j, (drafted, accepted)) in acceptance.drafted.iter().zip(&acceptance.accepted).enumerate() {
        eprintln!(
            "draft position {}: {accepted} of {drafted} accepted ({:.0}%)",
            j + 1,
            100.0 * *accepted as f64 / (*drafted).max(1) as f64
        );
    }
    if args.json {
        let finish = format!("{:?}", output.finish).to_lowercase();
        let json = serde_json::json!({
            "token_ids": output.tokens,
            "prompt_last_logits": output.prompt_last_logits,
            "finish_reason": finish,
            "drafts": {"drafted": acceptance.drafted, "accepted": acceptance.accepted},
        });
        println!("{json}");
    } else if let Some(tok) = &tokenizer {
        println!("{}", tok.decode(&output.tokens, true)?);
    } else {
        let ids: Vec<String> = output.tokens.iter().map(u32::to_string).collect();
        println!("{}", ids.join(","));
    }
    Ok(())
}
