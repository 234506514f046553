//! Server-sent events for a generation: the endpoint's chunks in order, then `data: [DONE]`.
//!
//! The SSE stream owns the [`Generation`]s of the request's choices: when the client
//! disconnects, axum drops the stream, which drops the backends' receivers and so cancels them.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use async_openai::types::chat::{ChatCompletionStreamOptions, CompletionUsage, PromptTokensDetails};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{BoxStream, StreamExt};
use serde::Serialize;
use serde_json::Value;

use crate::error::ApiError;
use crate::generation::{collect_choices, Finish, Generation, Step, TokenOutput};

/// How one endpoint writes its chunks (each a JSON text).
pub trait ChunkFormat: Send + 'static {
    /// Chunks before any output (chat: the assistant role).
    fn opening(&mut self) -> Vec<String>;
    /// New text with its tokens (`finish` None), or the last chunk carrying the finish reason.
    fn chunk(&mut self, text: String, tokens: &[TokenOutput], finish: Option<Finish>) -> String;
    /// The chunk with usage and no choices (`stream_options.include_usage`).
    fn usage(&mut self, usage: CompletionUsage) -> String;
    /// The whole response of a non-streamed choice (one choice, with the request's usage).
    fn response(&mut self, text: String, tokens: &[TokenOutput], finish: Finish, usage: CompletionUsage) -> Value;
}

/// The answer to a request whose choices are running: server-sent events (with a usage chunk
/// when `stream_options.include_usage`), or (not streamed) one response with every choice once
/// all are done. `format(i)` writes choice `i`.
pub async fn respond<F: ChunkFormat>(
    mut choices: Vec<Generation>,
    format: impl Fn(usize) -> F,
    stream: bool,
    stream_options: Option<&ChatCompletionStreamOptions>,
) -> Result<Response, ApiError> {
    if stream {
        let include_usage = stream_options.and_then(|o| o.include_usage).unwrap_or(false);
        let usage = include_usage.then(|| format(0));
        let streams = choices.into_iter().enumerate().map(|(i, g)| (g, format(i))).collect();
        return Ok(sse_response(streams, usage));
    }
    let outputs = collect_choices(&mut choices).await?;
    let usage = usage_of(&choices);
    let bodies = outputs
        .into_iter()
        .enumerate()
        .map(|(i, out)| format(i).response(out.text, &out.tokens, out.finish, usage.clone()))
        .collect();
    let mut body = merge_choices(bodies);
    report_masked_routes(&mut body, choices.iter().map(Generation::masked_routes).sum());
    Ok(axum::Json(body).into_response())
}

/// With experts masked out of some of the request's routes (a degraded fleet), the response's
/// usage says how many token rows went without one: `usage.masked_expert_routes`.
fn report_masked_routes(body: &mut Value, routes: usize) {
    if routes == 0 {
        return;
    }
    if let Some(usage) = body.get_mut("usage").and_then(Value::as_object_mut) {
        usage.insert("masked_expert_routes".into(), routes.into());
    }
}

/// Token counts of a request's choices (the prompt counted once: the choices share it).
pub fn usage_of(choices: &[Generation]) -> CompletionUsage {
    let prompt = choices.first().map_or(0, Generation::prompt_tokens);
    // The choices' prompt is one: the most any of them found cached.
    let cached = choices.iter().map(Generation::cached_tokens).max().unwrap_or(0);
    usage(prompt, cached, choices.iter().map(Generation::completion_tokens).sum())
}

fn usage(prompt: usize, cached: usize, completion: usize) -> CompletionUsage {
    let prompt = u32::try_from(prompt).unwrap_or(u32::MAX);
    let completion = u32::try_from(completion).unwrap_or(u32::MAX);
    CompletionUsage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: prompt.saturating_add(completion),
        prompt_tokens_details: Some(PromptTokensDetails {
            cached_tokens: Some(u32::try_from(cached).unwrap_or(u32::MAX)),
            ..Default::default()
        }),
        completion_tokens_details: None,
    }
}

/// One response from the responses of each choice (each with its one choice, in index order).
pub fn merge_choices(bodies: Vec<Value>) -> Value {
    let mut bodies = bodies.into_iter();
    let Some(mut first) = bodies.next() else {
        return Value::Null;
    };
    let rest: Vec<Value> = bodies
        .flat_map(|mut b| match b.get_mut("choices").map(Value::take) {
            Some(Value::Array(choices)) => choices,
            _ => Vec::new(),
        })
        .collect();
    if let Some(choices) = first.get_mut("choices").and_then(Value::as_array_mut) {
        choices.extend(rest);
    }
    first
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

/// What one choice's stream yields.
enum ChoiceEvent {
    Chunk(String),
    /// The choice ended, with its prompt, cached prompt and completion tokens, and its rows
    /// computed with an expert masked out.
    Done {
        prompt: usize,
        cached: usize,
        completion: usize,
        masked: usize,
    },
    Failed(String),
}

/// One choice's chunks: its opening, a chunk per step, the finishing chunk, then `Done`.
fn choice_events<F: ChunkFormat>(generation: Generation, mut format: F) -> BoxStream<'static, ChoiceEvent> {
    let queue: VecDeque<ChoiceEvent> = format.opening().into_iter().map(ChoiceEvent::Chunk).collect();
    let state = (Some(generation), format, queue);
    futures_util::stream::unfold(state, |(mut generation, mut format, mut queue)| async move {
        loop {
            if let Some(event) = queue.pop_front() {
                return Some((event, (generation, format, queue)));
            }
            let g = generation.as_mut()?;
            match g.next().await {
                Some(Step::Delta { text, tokens }) => {
                    queue.push_back(ChoiceEvent::Chunk(format.chunk(text, &tokens, None)))
                }
                Some(Step::Done { text, tokens, finish }) => {
                    if !text.is_empty() || !tokens.is_empty() {
                        queue.push_back(ChoiceEvent::Chunk(format.chunk(text, &tokens, None)));
                    }
                    queue.push_back(ChoiceEvent::Chunk(format.chunk(String::new(), &[], Some(finish))));
                    queue.extend(generation.take().map(|g| ChoiceEvent::Done {
                        prompt: g.prompt_tokens(),
                        cached: g.cached_tokens(),
                        completion: g.completion_tokens(),
                        masked: g.masked_routes(),
                    }));
                }
                Some(Step::Failed { message }) => {
                    queue.push_back(ChoiceEvent::Failed(message));
                    generation = None;
                }
                None => generation = None,
            }
        }
    })
    .boxed()
}

/// The SSE response for a request's choices (each a generation and its format), their chunks
/// interleaved as they come; then, with `usage` (`stream_options.include_usage`), the usage
/// chunk over all choices; then `[DONE]`. A failed choice ends the stream with its error
/// (dropping the other choices cancels them).
pub fn sse_response<F: ChunkFormat>(choices: Vec<(Generation, F)>, usage: Option<F>) -> Response {
    let pending = choices.len();
    let merged = futures_util::stream::select_all(choices.into_iter().map(|(g, f)| choice_events(g, f)));
    let state = (
        Some(merged),
        usage,
        pending,
        // Prompt tokens, cached prompt tokens, completion tokens and masked routes of the
        // choices that ended.
        (0usize, 0usize, 0usize, 0usize),
        VecDeque::<String>::new(),
    );
    let stream = futures_util::stream::unfold(
        state,
        |(mut merged, mut usage, mut pending, mut done, mut queue)| async move {
            loop {
                if let Some(data) = queue.pop_front() {
                    let event = Ok::<_, Infallible>(Event::default().data(data));
                    return Some((event, (merged, usage, pending, done, queue)));
                }
                let events = merged.as_mut()?;
                match events.next().await {
                    Some(ChoiceEvent::Chunk(chunk)) => queue.push_back(chunk),
                    Some(ChoiceEvent::Done {
                        prompt,
                        cached,
                        completion,
                        masked,
                    }) => {
                        done = (prompt, done.1.max(cached), done.2 + completion, done.3 + masked);
                        pending -= 1;
                        if pending == 0 {
                            if let Some(format) = usage.as_mut() {
                                let chunk = format.usage(self::usage(done.0, done.1, done.2));
                                queue.push_back(match serde_json::from_str::<Value>(&chunk) {
                                    Ok(mut body) if done.3 > 0 => {
                                        report_masked_routes(&mut body, done.3);
                                        body.to_string()
                                    }
                                    _ => chunk,
                                });
                            }
                            queue.push_back("[DONE]".into());
                            merged = None;
                        }
                    }
                    Some(ChoiceEvent::Failed(message)) => {
                        queue.push_back(ApiError::internal(format!("generation failed: {message}")).body_json());
                        queue.push_back("[DONE]".into());
                        merged = None;
                    }
                    None => {
                        queue.push_back("[DONE]".into());
                        merged = None;
                    }
                }
            }
        },
    );
    // Comment lines keep proxies from timing the stream out while the request waits in a queue,
    // and let the server notice a client that left even when no tokens flow.
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}
