//! Server-sent events for a generation: the endpoint's chunks in order, then `data: [DONE]`.
//!
//! The SSE stream owns the [`Generation`]: when the client disconnects, axum drops the stream,
//! which drops the backend's receiver and so cancels the request.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use async_openai::types::chat::CompletionUsage;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::Value;

use crate::error::ApiError;
use crate::generation::{Finish, Generation, Step, TokenOutput};

/// How one endpoint writes its chunks (each a JSON text).
pub trait ChunkFormat: Send + 'static {
    /// Chunks before any output (chat: the assistant role).
    fn opening(&mut self) -> Vec<String>;
    /// New text with its tokens (`finish` None), or the last chunk carrying the finish reason.
    fn chunk(&mut self, text: String, tokens: &[TokenOutput], finish: Option<Finish>) -> String;
    /// The chunk with usage and no choices (`stream_options.include_usage`).
    fn usage(&mut self, usage: CompletionUsage) -> String;
}

/// Token counts of a generation.
pub fn usage_of(generation: &Generation) -> CompletionUsage {
    let prompt = u32::try_from(generation.prompt_tokens()).unwrap_or(u32::MAX);
    let completion = u32::try_from(generation.completion_tokens()).unwrap_or(u32::MAX);
    CompletionUsage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: prompt.saturating_add(completion),
        prompt_tokens_details: None,
        completion_tokens_details: None,
    }
}

/// Serializes `value`, adding `token_ids` to its first choice when given (an extension field
/// the async-openai types do not have).
pub fn to_json_with_token_ids<T: Serialize>(value: &T, token_ids: Option<Vec<u32>>) -> Value {
    let mut json = serde_json::to_value(value).unwrap_or(Value::Null);
    if let Some(ids) = token_ids {
        if let Some(choice) = json
            .get_mut("choices")
            .and_then(Value::as_array_mut)
            .and_then(|c| c.first_mut())
            .and_then(Value::as_object_mut)
        {
            choice.insert("token_ids".into(), Value::from(ids));
        }
    }
    json
}

struct State<F> {
    generation: Generation,
    format: F,
    include_usage: bool,
    queue: VecDeque<String>,
    finished: bool,
}

impl<F: ChunkFormat> State<F> {
    /// Turns the next step of the generation into queued chunks.
    async fn advance(&mut self) {
        match self.generation.next().await {
            Some(Step::Delta { text, tokens }) => {
                let chunk = self.format.chunk(text, &tokens, None);
                self.queue.push_back(chunk);
            }
            Some(Step::Done { text, tokens, finish }) => {
                if !text.is_empty() || !tokens.is_empty() {
                    let chunk = self.format.chunk(text, &tokens, None);
                    self.queue.push_back(chunk);
                }
                let last = self.format.chunk(String::new(), &[], Some(finish));
                self.queue.push_back(last);
                if self.include_usage {
                    let usage = self.format.usage(usage_of(&self.generation));
                    self.queue.push_back(usage);
                }
                self.end();
            }
            Some(Step::Failed { message }) => {
                let error = ApiError::internal(format!("generation failed: {message}"));
                self.queue.push_back(error.body_json());
                self.end();
            }
            None => self.end(),
        }
    }

    fn end(&mut self) {
        self.queue.push_back("[DONE]".into());
        self.finished = true;
    }
}

/// The SSE response for `generation`.
pub fn sse_response<F: ChunkFormat>(generation: Generation, mut format: F, include_usage: bool) -> Response {
    let queue: VecDeque<String> = format.opening().into();
    let state = State {
        generation,
        format,
        include_usage,
        queue,
        finished: false,
    };
    let stream = futures_util::stream::unfold(state, |mut state| async move {
        loop {
            if let Some(data) = state.queue.pop_front() {
                return Some((Ok::<_, Infallible>(Event::default().data(data)), state));
            }
            if state.finished {
                return None;
            }
            state.advance().await;
        }
    });
    // Comment lines keep proxies from timing the stream out while the request waits in a queue,
    // and let the server notice a client that left even when no tokens flow.
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}
