//! Checks shared by both generation endpoints: the prompt against the model, the sampling fields
//! against their ranges, and the token budget against the context.

use async_openai::types::chat::StopConfiguration;
use dsv3_engine::{LogitRules, ModelConfig, OutputGrammar, SamplingParams};
use serde_json::Value;

use crate::config::SamplingDefaults;
use crate::error::ApiError;
use crate::request::Extensions;

/// The sampling fields of a request, as sent.
pub struct SamplingInput<'a> {
    /// The token budget and the name of the field it came from (`max_tokens` or
    /// `max_completion_tokens`).
    pub max_tokens: Option<(u32, &'static str)>,
    /// Budget when none is given; `None`: the rest of the context. Lowered to what the context
    /// leaves.
    pub default_max_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub seed: Option<i64>,
    pub stop: Option<&'a StopConfiguration>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    /// `logit_bias` as sent: token id (a string) → bias.
    pub logit_bias: Option<&'a Value>,
    pub extensions: &'a Extensions,
    /// The model's defaults for the fields left out.
    pub defaults: &'a SamplingDefaults,
    /// What the output must match (`response_format`), already checked.
    pub grammar: Option<OutputGrammar>,
}

/// What the backend and the detokenizer need.
#[derive(Debug)]
pub struct Prepared {
    pub params: SamplingParams,
    /// Text-level stop strings (non-empty).
    pub stops: Vec<String>,
}

/// Checks prompt ids: non-empty, inside the vocabulary, shorter than the context.
pub fn check_prompt(ids: &[u32], config: &ModelConfig, param: &str) -> Result<(), ApiError> {
    if ids.is_empty() {
        return Err(ApiError::invalid(param, format!("`{param}` is empty")));
    }
    if let Some((i, &id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= config.vocab_size) {
        return Err(ApiError::invalid(
            param,
            format!(
                "token id {id} (at position {i} of `{param}`) is outside the vocabulary of {} ids",
                config.vocab_size
            ),
        ));
    }
    let context = config.max_position_embeddings;
    if ids.len() >= context {
        return Err(ApiError::invalid(
            param,
            format!(
                "the prompt has {} tokens, which leaves no room in the model's context of {context} tokens",
                ids.len()
            ),
        ));
    }
    Ok(())
}

/// Checks the sampling fields and works out the token budget for a prompt of `prompt_len`
/// tokens (already checked with [`check_prompt`]).
pub fn prepare(
    input: &SamplingInput<'_>,
    prompt_len: usize,
    config: &ModelConfig,
    has_tokenizer: bool,
) -> Result<Prepared, ApiError> {
    let temperature = input.temperature.or(input.defaults.temperature).unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            "temperature",
            format!("`temperature` must be between 0 and 2, got {temperature}"),
        ));
    }
    let top_p = input.top_p.or(input.defaults.top_p).unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            "top_p",
            format!("`top_p` must be in (0, 1], got {top_p}"),
        ));
    }
    let top_k = match input.extensions.top_k.or(input.defaults.top_k) {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => usize::try_from(k).unwrap_or(usize::MAX),
        Some(k) => {
            return Err(ApiError::invalid(
                "top_k",
                format!("`top_k` must be -1, 0 (no cut) or positive, got {k}"),
            ))
        }
    };
    let rules = logit_rules(input, config)?;

    let stop_token_ids = input.extensions.stop_token_ids.clone().unwrap_or_default();
    if let Some(&id) = stop_token_ids.iter().find(|&&id| id as usize >= config.vocab_size) {
        return Err(ApiError::invalid(
            "stop_token_ids",
            format!(
                "stop token id {id} is outside the vocabulary of {} ids",
                config.vocab_size
            ),
        ));
    }
    let stops: Vec<String> = match input.stop {
        None => Vec::new(),
        Some(StopConfiguration::String(s)) => vec![s.clone()],
        Some(StopConfiguration::StringArray(list)) => list.clone(),
    };
    let stops: Vec<String> = stops.into_iter().filter(|s| !s.is_empty()).collect();
    if !stops.is_empty() && !has_tokenizer {
        return Err(ApiError::invalid(
            "stop",
            "stop strings need a tokenizer, and this model has none; use `stop_token_ids`",
        ));
    }

    let context = config.max_position_embeddings;
    let room = context.saturating_sub(prompt_len);
    let max_tokens = match input.max_tokens {
        Some((0, name)) => return Err(ApiError::invalid(name, format!("`{name}` must be at least 1"))),
        Some((n, name)) => {
            let n = n as usize;
            if prompt_len + n > context {
                return Err(ApiError::invalid(
                    name,
                    format!(
                        "the prompt has {prompt_len} tokens and `{name}` is {n}: together {} tokens, more than \
                         the model's context of {context} tokens",
                        prompt_len + n
                    ),
                ));
            }
            n
        }
        None => input.default_max_tokens.map_or(room, |d| d.min(room)),
    };

    let params = SamplingParams {
        temperature,
        top_k,
        top_p,
        // Any integer is a seed; negative ones keep their bits.
        seed: input.seed.map(|s| s as u64),
        max_tokens,
        stop_token_ids,
        ignore_eos: input.extensions.ignore_eos.unwrap_or(false),
        rules,
        grammar: input.grammar.clone(),
    };
    params.validate().map_err(ApiError::bad_request)?;
    Ok(Prepared { params, stops })
}

/// Penalties, bias and `min_tokens`, each checked against its range (400 naming the field).
fn logit_rules(input: &SamplingInput<'_>, config: &ModelConfig) -> Result<LogitRules, ApiError> {
    let d = input.defaults;
    let rules = LogitRules {
        presence_penalty: input.presence_penalty.or(d.presence_penalty).unwrap_or(0.0),
        frequency_penalty: input.frequency_penalty.or(d.frequency_penalty).unwrap_or(0.0),
        repetition_penalty: input
            .extensions
            .repetition_penalty
            .or(d.repetition_penalty)
            .unwrap_or(1.0),
        logit_bias: input.logit_bias.map(logit_bias).transpose()?.unwrap_or_default(),
        min_tokens: input.extensions.min_tokens.unwrap_or(0) as usize,
    };
    rules.validate(config.vocab_size).map_err(|message| {
        let field = [
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
            "logit_bias",
        ]
        .into_iter()
        .find(|f| message.starts_with(f))
        .unwrap_or("logit_bias");
        ApiError::invalid(field, format!("`{field}`{}", &message[field.len()..]))
    })?;
    if rules.min_tokens > 0 && input.grammar.is_some() {
        // The grammar may allow only the end when the output is complete: the two would leave
        // no token to choose.
        return Err(ApiError::invalid(
            "min_tokens",
            "`min_tokens` cannot be combined with `response_format` or a forced tool call",
        ));
    }
    if let Some((n, name)) = input.max_tokens {
        if rules.min_tokens > n as usize {
            return Err(ApiError::invalid(
                "min_tokens",
                format!("`min_tokens` ({}) is more than `{name}` ({n})", rules.min_tokens),
            ));
        }
    }
    Ok(rules)
}

/// `logit_bias`: an object from token ids (as strings, OpenAI's form) to numbers; sorted by id.
fn logit_bias(value: &Value) -> Result<Vec<(u32, f32)>, ApiError> {
    let field = "logit_bias";
    if value.is_null() {
        return Ok(Vec::new());
    }
    let map = value
        .as_object()
        .ok_or_else(|| ApiError::invalid(field, "`logit_bias` must be an object from token ids to numbers"))?;
    let mut bias = Vec::with_capacity(map.len());
    for (key, v) in map {
        let id: u32 = key.trim().parse().map_err(|_| {
            ApiError::invalid(
                field,
                format!("`logit_bias` keys must be token ids (non-negative integers), got {key:?}"),
            )
        })?;
        let b = v.as_f64().ok_or_else(|| {
            ApiError::invalid(field, format!("`logit_bias` for token {id} must be a number, got {v}"))
        })?;
        bias.push((id, b as f32));
    }
    bias.sort_by_key(|&(id, _)| id);
    if let Some(w) = bias.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(ApiError::invalid(
            field,
            format!("`logit_bias` names token {} twice", w[0].0),
        ));
    }
    Ok(bias)
}
