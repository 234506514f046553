//! `POST /v1/completions`.

use std::time::Instant;

use async_openai::types::chat::{Choice, CompletionFinishReason, CompletionUsage, Prompt};
use async_openai::types::completions::{CreateCompletionRequest, CreateCompletionResponse};
use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use dsv3_text::Tokenizer;

use crate::access::RequestId;
use crate::backend::GenerationRequest;
use crate::error::ApiError;
use crate::generation::{Finish, Generation, TokenOutput};
use crate::logprobs::completion_logprobs;
use crate::params::{check_prompt, prepare, SamplingInput};
use crate::request::{parse_request, read_body, Parsed};
use crate::server::{off_runtime, unix_now, AppState};
use crate::streaming::{sse_response, to_json_with_token_ids, usage_of, ChunkFormat};

pub(crate) async fn create(State(state): State<AppState>, Extension(id): Extension<RequestId>, body: Body) -> Response {
    match handle(state, id, body).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn handle(state: AppState, id: RequestId, body: Body) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let bytes = read_body(body, state.config.max_body_bytes).await?;
    let Parsed {
        request: mut req,
        extensions,
        ..
    } = parse_request::<CreateCompletionRequest>(&bytes, &state.config.served_model_name)?;
    state.check_model(&req.model)?;
    if req.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("n", "only `n` = 1 is supported"));
    }
    if req.best_of.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("best_of", "only `best_of` = 1 is supported"));
    }
    if req.echo == Some(true) {
        return Err(ApiError::invalid("echo", "`echo` is not supported"));
    }
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid("suffix", "`suffix` is not supported"));
    }
    let logprobs = req.logprobs.map(usize::from);
    if let Some(n) = logprobs {
        if n > state.config.max_logprobs {
            return Err(ApiError::invalid(
                "logprobs",
                format!("`logprobs` must be at most {}, got {n}", state.config.max_logprobs),
            ));
        }
    }

    let config = state.backend.config();
    let tokenizer = state.tokenizer.as_ref();
    let prompt = {
        // Taken out of the request (nothing reads it after this) to move into the blocking pool.
        let text = std::mem::replace(&mut req.prompt, Prompt::IntegerArray(vec![]));
        let tokenizer = tokenizer.cloned();
        off_runtime(move || prompt_ids(&text, tokenizer.as_ref())).await?
    };
    check_prompt(&prompt, config, "prompt")?;
    let prepared = prepare(
        &SamplingInput {
            max_tokens: req.max_tokens.map(|n| (n, "max_tokens")),
            default_max_tokens: Some(state.config.default_completion_max_tokens),
            temperature: req.temperature,
            top_p: req.top_p,
            seed: req.seed,
            stop: req.stop.as_ref(),
            presence_penalty: req.presence_penalty,
            frequency_penalty: req.frequency_penalty,
            has_logit_bias: req.logit_bias.as_ref().is_some_and(|b| !b.is_empty()),
            extensions: &extensions,
            defaults: &state.config.sampling_defaults,
        },
        prompt.len(),
        config,
        tokenizer.is_some(),
    )?;

    let mut generation = Generation::start(
        state.backend.as_ref(),
        tokenizer,
        state.metrics.clone(),
        GenerationRequest {
            prompt,
            params: prepared.params,
            logprobs,
        },
        prepared.stops,
        arrived,
    )?;
    let format = CompletionChunks {
        id: format!("cmpl-{}", id.0),
        created: unix_now(),
        model: req.model,
        tokenizer: state.tokenizer.clone(),
        logprobs: logprobs.is_some(),
        token_ids: extensions.return_token_ids.unwrap_or(false) || tokenizer.is_none(),
    };
    if req.stream == Some(true) {
        let include_usage = req
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        return Ok(sse_response(generation, format, include_usage));
    }
    let out = generation.collect().await?;
    let body = format.response(out.text, &out.tokens, out.finish, usage_of(&generation));
    Ok(Json(body).into_response())
}

/// The prompt's token ids: text is tokenized with special tokens (BOS), ids are taken as given.
fn prompt_ids(prompt: &Prompt, tokenizer: Option<&Tokenizer>) -> Result<Vec<u32>, ApiError> {
    let one = "only one prompt per request is supported";
    match prompt {
        Prompt::String(text) => encode(text, tokenizer),
        Prompt::StringArray(texts) => match texts.as_slice() {
            [] => Err(ApiError::invalid("prompt", "`prompt` is empty")),
            [text] => encode(text, tokenizer),
            _ => Err(ApiError::invalid("prompt", one)),
        },
        Prompt::IntegerArray(ids) => Ok(ids.clone()),
        Prompt::ArrayOfIntegerArray(lists) => match lists.as_slice() {
            [] => Err(ApiError::invalid("prompt", "`prompt` is empty")),
            [ids] => Ok(ids.clone()),
            _ => Err(ApiError::invalid("prompt", one)),
        },
    }
}

fn encode(text: &str, tokenizer: Option<&Tokenizer>) -> Result<Vec<u32>, ApiError> {
    if text.is_empty() {
        return Err(ApiError::invalid("prompt", "`prompt` is empty"));
    }
    let tokenizer = tokenizer.ok_or_else(|| {
        ApiError::invalid(
            "prompt",
            "this model has no tokenizer, so text prompts cannot be used: send `prompt` as a list of token ids",
        )
    })?;
    tokenizer
        .encode(text, true)
        .map_err(|e| ApiError::internal(format!("cannot tokenize the prompt: {e}")))
}

fn finish_reason(finish: Finish) -> CompletionFinishReason {
    match finish {
        Finish::Stop => CompletionFinishReason::Stop,
        Finish::Length => CompletionFinishReason::Length,
    }
}

/// Chunks and responses of one completion request.
struct CompletionChunks {
    id: String,
    created: u32,
    model: String,
    tokenizer: Option<Tokenizer>,
    logprobs: bool,
    /// Add `token_ids` to each choice (requested, or no tokenizer).
    token_ids: bool,
}

impl CompletionChunks {
    fn envelope(&self, choices: Vec<Choice>, usage: Option<CompletionUsage>) -> CreateCompletionResponse {
        CreateCompletionResponse {
            id: self.id.clone(),
            choices,
            created: self.created,
            model: self.model.clone(),
            system_fingerprint: None,
            object: "text_completion".into(),
            usage,
        }
    }

    fn choice(&self, text: String, tokens: &[TokenOutput], finish: Option<Finish>) -> Choice {
        Choice {
            text,
            index: 0,
            logprobs: self
                .logprobs
                .then(|| completion_logprobs(self.tokenizer.as_ref(), tokens)),
            finish_reason: finish.map(finish_reason),
        }
    }

    fn ids(&self, tokens: &[TokenOutput]) -> Option<Vec<u32>> {
        self.token_ids.then(|| tokens.iter().map(|t| t.id).collect())
    }

    fn response(
        &self,
        text: String,
        tokens: &[TokenOutput],
        finish: Finish,
        usage: CompletionUsage,
    ) -> serde_json::Value {
        let body = self.envelope(vec![self.choice(text, tokens, Some(finish))], Some(usage));
        to_json_with_token_ids(&body, self.ids(tokens))
    }
}

impl ChunkFormat for CompletionChunks {
    fn opening(&mut self) -> Vec<String> {
        Vec::new()
    }

    fn chunk(&mut self, text: String, tokens: &[TokenOutput], finish: Option<Finish>) -> String {
        let body = self.envelope(vec![self.choice(text, tokens, finish)], None);
        let ids = if finish.is_some() { None } else { self.ids(tokens) };
        to_json_with_token_ids(&body, ids).to_string()
    }

    fn usage(&mut self, usage: CompletionUsage) -> String {
        let body = self.envelope(Vec::new(), Some(usage));
        serde_json::to_string(&body).unwrap_or_default()
    }
}
