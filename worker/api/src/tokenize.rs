//! `POST /tokenize` and `POST /detokenize` in vLLM's shapes: a prompt or chat messages (through
//! the chat template, as a chat completion would see them) to token ids, and ids back to text.

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use dsv3_text::Tokenizer;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::chat::{render_prompt, PromptEnd};
use crate::error::ApiError;
use crate::request::{parse_object, read_body, typed};
use crate::server::{off_runtime, AppState};
use crate::tools::ToolChoice;

/// vLLM's `TokenizeCompletionRequest` and `TokenizeChatRequest` in one: `prompt` or `messages`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenizeRequest {
    model: Option<String>,
    prompt: Option<String>,
    messages: Option<Vec<Value>>,
    /// Default: true for a prompt, false for messages (the template writes the BOS).
    add_special_tokens: Option<bool>,
    /// Messages only (default true).
    add_generation_prompt: Option<bool>,
    /// Messages only: continue the last (assistant) message, as DeepSeek's `prefix: true` on it.
    continue_final_message: Option<bool>,
    tools: Option<Value>,
    chat_template_kwargs: Option<Map<String, Value>>,
    #[serde(default)]
    return_token_strs: bool,
}

#[derive(Serialize)]
struct TokenizeResponse {
    count: usize,
    max_model_len: usize,
    tokens: Vec<u32>,
    token_strs: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DetokenizeRequest {
    model: Option<String>,
    tokens: Vec<u32>,
}

#[derive(Serialize)]
struct DetokenizeResponse {
    prompt: String,
}

pub(crate) async fn tokenize(State(state): State<AppState>, body: Body) -> Response {
    match handle_tokenize(state, body).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

pub(crate) async fn detokenize(State(state): State<AppState>, body: Body) -> Response {
    match handle_detokenize(state, body).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

/// The body as `T`, its `model` (when given) checked, and the model's tokenizer.
async fn read<T: DeserializeOwned>(
    state: &AppState,
    body: Body,
    model: impl Fn(&T) -> Option<&str>,
) -> Result<(T, Tokenizer), ApiError> {
    let bytes = read_body(body, state.config.max_body_bytes).await?;
    let req: T = typed(&parse_object(&bytes)?)?;
    if let Some(name) = model(&req) {
        state.check_model(name)?;
    }
    let tokenizer = state
        .tokenizer
        .clone()
        .ok_or_else(|| ApiError::bad_request("this model has no tokenizer"))?;
    Ok((req, tokenizer))
}

async fn handle_tokenize(state: AppState, body: Body) -> Result<Response, ApiError> {
    let (req, tokenizer) = read::<TokenizeRequest>(&state, body, |r| r.model.as_deref()).await?;
    let max_model_len = state.backend.config().max_position_embeddings;
    let response = off_runtime(move || {
        let tokens = match (req.prompt, req.messages) {
            (Some(prompt), None) => {
                if req.add_generation_prompt.is_some()
                    || req.continue_final_message.is_some()
                    || req.tools.is_some()
                    || req.chat_template_kwargs.is_some()
                {
                    return Err(ApiError::bad_request(
                        "`add_generation_prompt`, `continue_final_message`, `tools` and `chat_template_kwargs` apply to `messages`, not to `prompt`",
                    ));
                }
                tokenizer
                    .encode(&prompt, req.add_special_tokens.unwrap_or(true))
                    .map_err(|e| ApiError::internal(format!("cannot tokenize the prompt: {e}")))?
            }
            (None, Some(messages)) => {
                let raw = serde_json::json!({"messages": messages, "tools": req.tools});
                // As a chat completion would render it: continued when the last message says so.
                let end = match (
                    PromptEnd::of_request(&raw, req.continue_final_message.unwrap_or(false))?,
                    req.add_generation_prompt,
                ) {
                    (PromptEnd::ContinueFinal, Some(true)) => {
                        return Err(ApiError::invalid(
                            "add_generation_prompt",
                            "a continued last message takes no generation prompt",
                        ))
                    }
                    (PromptEnd::ContinueFinal, _) => PromptEnd::ContinueFinal,
                    (_, Some(false)) => PromptEnd::Closed,
                    _ => PromptEnd::GenerationPrompt,
                };
                let mut tokens = render_prompt(&tokenizer, &raw, end, req.chat_template_kwargs.as_ref(), &ToolChoice::of_request(&raw)?)?.ids;
                if req.add_special_tokens == Some(true) {
                    if let Some(bos) = tokenizer.bos_token_id() {
                        tokens.insert(0, bos);
                    }
                }
                tokens
            }
            _ => return Err(ApiError::bad_request("give exactly one of `prompt` and `messages`")),
        };
        let token_strs = req
            .return_token_strs
            .then(|| tokens.iter().map(|&t| tokenizer.id_to_token(t).unwrap_or_default()).collect());
        Ok(TokenizeResponse {
            count: tokens.len(),
            max_model_len,
            tokens,
            token_strs,
        })
    })
    .await?;
    Ok(Json(response).into_response())
}

async fn handle_detokenize(state: AppState, body: Body) -> Result<Response, ApiError> {
    let (req, tokenizer) = read::<DetokenizeRequest>(&state, body, |r| r.model.as_deref()).await?;
    let vocab = tokenizer.vocab_size();
    if let Some(bad) = req.tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::invalid(
            "tokens",
            format!("token id {bad} is outside the vocabulary ({vocab} ids)"),
        ));
    }
    let prompt = off_runtime(move || {
        tokenizer
            .decode(&req.tokens, false)
            .map_err(|e| ApiError::internal(format!("cannot detokenize: {e}")))
    })
    .await?;
    Ok(Json(DetokenizeResponse { prompt }).into_response())
}
