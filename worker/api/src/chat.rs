//! `POST /v1/chat/completions`: messages through the model's chat template.

use std::time::Instant;

use async_openai::types::chat::{
    ChatChoice, ChatChoiceStream, ChatCompletionResponseMessage, ChatCompletionStreamResponseDelta, CompletionUsage,
    CreateChatCompletionRequest, CreateChatCompletionResponse, CreateChatCompletionStreamResponse, FinishReason, Role,
};
use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use dsv3_text::Tokenizer;
use serde_json::{Map, Value};

use crate::access::RequestId;
use crate::backend::GenerationRequest;
use crate::error::ApiError;
use crate::generation::{choice_count, start_choices, Finish, TokenOutput};
use crate::logprobs::chat_logprobs;
use crate::params::{check_prompt, prepare, SamplingInput};
use crate::reasoning::{prompt_opens_think, ReasoningSplitter, Split};
use crate::request::{parse_request, read_body, Parsed};
use crate::server::{off_runtime, unix_now, AppState};
use crate::streaming::{respond, ChunkFormat};
use crate::structured::grammar_of;
use crate::tools::{self, CallForm, ToolCallParser, ToolChoice, ToolEvent};
use crate::unsupported::refuse_unsupported;
use dsv3_engine::OutputGrammar;

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
        request: req,
        extensions,
        raw,
    } = parse_request::<CreateChatCompletionRequest>(&bytes, &state.config.served_model_name)?;
    state.check_model(&req.model)?;
    refuse_unsupported(&raw)?;
    if req.messages.is_empty() {
        return Err(ApiError::invalid("messages", "`messages` is empty"));
    }
    let n = choice_count(req.n)?;
    let logprobs = chat_logprobs_request(req.logprobs, req.top_logprobs, state.config.max_logprobs)?;
    let tool_choice = ToolChoice::of_request(&raw)?;
    let grammar = grammar_of(&raw)?;
    if grammar.is_some() && !matches!(tool_choice, ToolChoice::None | ToolChoice::Auto) {
        return Err(ApiError::invalid(
            "response_format",
            "`response_format` and a `required` or named `tool_choice` cannot both shape the answer",
        ));
    }
    let tokenizer = state.tokenizer.as_ref().ok_or_else(|| {
        ApiError::bad_request(
            "this model has no tokenizer, so chat completions are not available: use /v1/completions with token ids",
        )
    })?;
    let raw_bias = raw.get("logit_bias").cloned();
    let ChatPrompt {
        ids: prompt,
        opens_think,
        forced_opening,
        forced_grammar,
    } = {
        let (tokenizer, kwargs, choice) = (
            tokenizer.clone(),
            extensions.chat_template_kwargs.clone(),
            tool_choice.clone(),
        );
        let end = PromptEnd::of_request(&raw, extensions.continue_final_message.unwrap_or(false))?;
        off_runtime(move || render_prompt(&tokenizer, &raw, end, kwargs.as_ref(), &choice)).await?
    };

    let config = state.backend.config();
    check_prompt(&prompt, config, "messages")?;
    let field = if grammar.is_some() { "response_format" } else { "tools" };
    let grammar = grammar.or(forced_grammar);
    if let Some(g) = &grammar {
        let (grammars, tokenizer, config) = (state.clone(), tokenizer.clone(), config.clone());
        let g = g.clone();
        off_runtime(move || grammars.grammars.check(&g, Some(&tokenizer), &config, field)).await?;
    }
    let (max_tokens, seed) = deprecated_fields(&req);
    let prepared = prepare(
        &SamplingInput {
            max_tokens,
            default_max_tokens: None,
            temperature: req.temperature,
            top_p: req.top_p,
            seed,
            stop: req.stop.as_ref(),
            presence_penalty: req.presence_penalty,
            frequency_penalty: req.frequency_penalty,
            logit_bias: raw_bias.as_ref(),
            extensions: &extensions,
            defaults: &state.config.sampling_defaults,
            grammar,
        },
        prompt.len(),
        config,
        true,
    )?;

    let choices = start_choices(
        state.backend.as_ref(),
        Some(tokenizer),
        &state.metrics,
        GenerationRequest {
            prompt,
            params: prepared.params,
            logprobs,
        },
        &prepared.stops,
        n,
        arrived,
    )?;
    let (id, created) = (format!("chatcmpl-{}", id.0), unix_now());
    let format = |index: usize| ChatChunks {
        index: index as u32,
        id: id.clone(),
        created,
        model: req.model.clone(),
        tokenizer: tokenizer.clone(),
        logprobs: logprobs.is_some(),
        reasoning: state
            .config
            .split_reasoning
            .then(|| ReasoningSplitter::new(opens_think)),
        tools: ToolParsing::new(&tool_choice, forced_opening.as_deref()),
    };
    respond(choices, format, req.stream == Some(true), req.stream_options.as_ref()).await
}

/// `max_tokens` and `seed`, which OpenAI marks deprecated but clients still send; the token
/// budget comes from `max_completion_tokens` first.
#[allow(deprecated)]
fn deprecated_fields(req: &CreateChatCompletionRequest) -> (Option<(u32, &'static str)>, Option<i64>) {
    let max_tokens = match (req.max_completion_tokens, req.max_tokens) {
        (Some(n), _) => Some((n, "max_completion_tokens")),
        (None, Some(n)) => Some((n, "max_tokens")),
        (None, None) => None,
    };
    (max_tokens, req.seed)
}

/// The backend's logprobs request from `logprobs` and `top_logprobs`.
fn chat_logprobs_request(
    logprobs: Option<bool>,
    top_logprobs: Option<u8>,
    max: usize,
) -> Result<Option<usize>, ApiError> {
    let top = top_logprobs.map(usize::from);
    if let Some(n) = top {
        if n > max {
            return Err(ApiError::invalid(
                "top_logprobs",
                format!("`top_logprobs` must be at most {max}, got {n}"),
            ));
        }
    }
    match (logprobs.unwrap_or(false), top) {
        (true, top) => Ok(Some(top.unwrap_or(0))),
        (false, Some(n)) if n > 0 => Err(ApiError::invalid(
            "top_logprobs",
            "`top_logprobs` needs `logprobs` set to true",
        )),
        (false, _) => Ok(None),
    }
}

/// A chat request's prompt: its token ids, whether the template left a think block open, and
/// the start of a tool call the prompt ends with (a forced `tool_choice`).
pub(crate) struct ChatPrompt {
    pub ids: Vec<u32>,
    pub opens_think: bool,
    pub forced_opening: Option<String>,
    /// What holds a forced call's arguments to the tools' JSON schemas.
    pub forced_grammar: Option<OutputGrammar>,
}

/// How a rendered chat prompt ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PromptEnd {
    /// The template's generation prompt: the model answers anew.
    GenerationPrompt,
    /// The last message as the template closes it (`/tokenize` without a generation prompt).
    Closed,
    /// The last (assistant) message left open: the model continues it (DeepSeek's `prefix: true`,
    /// vLLM's `continue_final_message`).
    ContinueFinal,
}

impl PromptEnd {
    /// Whether the request continues its last message: DeepSeek's `prefix: true` on it, or
    /// `continue_final_message`; either on anything but a final assistant message is a 400.
    pub(crate) fn of_request(raw: &Value, continue_final_message: bool) -> Result<PromptEnd, ApiError> {
        let messages = raw
            .get("messages")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let last = messages.len().saturating_sub(1);
        for (i, m) in messages.iter().enumerate() {
            if m.get("prefix").and_then(Value::as_bool) == Some(true) && i != last {
                return Err(ApiError::invalid(
                    format!("messages[{i}].prefix"),
                    "`prefix` may only be set on the last message",
                ));
            }
        }
        let prefix = messages.last().and_then(|m| m.get("prefix")).and_then(Value::as_bool) == Some(true);
        if !(prefix || continue_final_message) {
            return Ok(PromptEnd::GenerationPrompt);
        }
        let role = messages.last().and_then(|m| m.get("role")).and_then(Value::as_str);
        if role != Some("assistant") {
            return Err(ApiError::invalid(
                format!("messages[{last}]"),
                "continuing a message (`prefix: true`, `continue_final_message`) needs an assistant message last",
            ));
        }
        Ok(PromptEnd::ContinueFinal)
    }
}

/// Renders the messages as sent (all their fields reach the template) with the tools, and
/// tokenizes the result. `developer` messages are given to the template as `system`. A
/// `required` or named `tool_choice` ends the prompt with the start of a call in the form the
/// template writes calls, so the answer is a call (of that tool).
pub(crate) fn render_prompt(
    tokenizer: &Tokenizer,
    raw: &Value,
    end: PromptEnd,
    kwargs: Option<&Map<String, Value>>,
    tool_choice: &ToolChoice,
) -> Result<ChatPrompt, ApiError> {
    let template = tokenizer.chat_template().ok_or_else(|| {
        ApiError::bad_request("the model's tokenizer has no chat template, so chat completions are not available")
    })?;
    let messages: Vec<Value> = raw
        .get("messages")
        .and_then(Value::as_array)
        .map(|list| list.iter().map(developer_as_system).collect())
        .unwrap_or_default();
    let tools = raw.get("tools").filter(|t| !t.is_null());
    let mut text = match end {
        PromptEnd::ContinueFinal => continue_final(template, messages, tools, kwargs)?,
        _ => template
            .render_with_kwargs(&messages, tools, end == PromptEnd::GenerationPrompt, kwargs)
            .map_err(template_error)?,
    };
    let forced_name = match tool_choice {
        ToolChoice::Required => Some(None),
        ToolChoice::Named(name) => Some(Some(name.as_str())),
        ToolChoice::None | ToolChoice::Auto => None,
    };
    let (forced_opening, forced_grammar) = match forced_name {
        None => (None, None),
        Some(_) if end != PromptEnd::GenerationPrompt => {
            return Err(ApiError::invalid(
                "tool_choice",
                "a `required` or named `tool_choice` cannot continue a final message",
            ))
        }
        Some(name) => {
            // The call is the answer: a think block the template opened is closed first.
            if prompt_opens_think(&text) {
                text.push_str("</think>\n\n");
            }
            let form = call_form(template, kwargs).ok_or_else(|| {
                ApiError::invalid(
                    "tool_choice",
                    "the chat template does not write tool calls, so a call cannot be required; start the server \
                     with a tool-aware `--chat-template` (templates/ in the dsv3 repository)",
                )
            })?;
            let opening = form.forced_opening(name);
            text.push_str(&opening);
            (Some(opening), Some(tools::call_grammar(form, name, raw.get("tools"))?))
        }
    };
    let opens_think = prompt_opens_think(&text);
    let ids = tokenizer
        .encode(&text, false)
        .map_err(|e| ApiError::internal(format!("cannot tokenize the chat prompt: {e}")))?;
    Ok(ChatPrompt {
        ids,
        opens_think,
        forced_opening,
        forced_grammar,
    })
}

/// How the template writes an assistant's tool call, seen by rendering one.
fn call_form(template: &dsv3_text::ChatTemplate, kwargs: Option<&Map<String, Value>>) -> Option<CallForm> {
    const PROBE: &str = "dsv3_probe_function";
    let messages = [
        serde_json::json!({"role": "user", "content": "?"}),
        serde_json::json!({"role": "assistant", "content": null, "tool_calls": [
            {"id": "call_0", "type": "function", "function": {"name": PROBE, "arguments": "{}"}}]}),
    ];
    let text = template.render_with_kwargs(&messages, None, false, kwargs).ok()?;
    CallForm::detect(&text, PROBE)
}

/// The conversation rendered up to the last (assistant) message's text, left open for the model
/// to continue. The template closes that message (V3: `<｜end▁of▁sentence｜>`), so it is rendered
/// with a placeholder for the text, cut at the placeholder, and the text put back: searching for
/// the text itself could match inside the closing marker.
fn continue_final(
    template: &dsv3_text::ChatTemplate,
    mut messages: Vec<Value>,
    tools: Option<&Value>,
    kwargs: Option<&Map<String, Value>>,
) -> Result<String, ApiError> {
    const PLACEHOLDER: &str = "\u{E000}dsv3 continues here\u{E001}";
    let last = messages.len().saturating_sub(1);
    let content = messages.last().map(message_text).unwrap_or_default();
    if content.is_empty() {
        return Err(ApiError::invalid(
            format!("messages[{last}].content"),
            "the message to continue has no text",
        ));
    }
    if let Some(message) = messages.last_mut().and_then(Value::as_object_mut) {
        message.insert("content".into(), Value::String(PLACEHOLDER.into()));
    }
    let text = template
        .render_with_kwargs(&messages, tools, false, kwargs)
        .map_err(template_error)?;
    let at = text.rfind(PLACEHOLDER).ok_or_else(|| {
        ApiError::invalid(
            format!("messages[{last}].content"),
            "the chat template does not write the message to continue as sent",
        )
    })?;
    Ok(format!("{}{content}", &text[..at]))
}

/// A message's text: its string content, or its text parts joined.
fn message_text(message: &Value) -> String {
    match message.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect(),
        _ => String::new(),
    }
}

fn developer_as_system(message: &Value) -> Value {
    let mut message = message.clone();
    if let Some(obj) = message.as_object_mut() {
        if obj.get("role").and_then(Value::as_str) == Some("developer") {
            obj.insert("role".into(), Value::String("system".into()));
        }
    }
    message
}

fn template_error(e: dsv3_text::Error) -> ApiError {
    match e {
        dsv3_text::Error::Chat(m) => ApiError::invalid("messages", m),
        dsv3_text::Error::Template(m) => {
            ApiError::invalid("messages", format!("the chat template refused the request: {m}"))
        }
        other => ApiError::internal(format!("cannot render the chat template: {other}")),
    }
}

fn finish_reason(finish: Finish) -> FinishReason {
    match finish {
        Finish::Stop => FinishReason::Stop,
        Finish::Length => FinishReason::Length,
    }
}

/// Chunks and responses of one choice of a chat request.
struct ChatChunks {
    /// The choice's index.
    index: u32,
    id: String,
    created: u32,
    model: String,
    tokenizer: Tokenizer,
    logprobs: bool,
    /// Splits the answer's thinking into `reasoning_content` (unless the server is told not to).
    reasoning: Option<ReasoningSplitter>,
    /// Parses the answer's tool calls (when the request offers tools).
    tools: Option<ToolParsing>,
}

/// The tool-call parser of one choice, and the events of a forced call's opening (in the
/// prompt, so the client learns the call's name from the first chunk).
struct ToolParsing {
    parser: ToolCallParser,
    pending: Vec<ToolEvent>,
    /// The request named the function to call.
    named: bool,
}

impl ToolParsing {
    fn new(choice: &ToolChoice, forced_opening: Option<&str>) -> Option<Self> {
        if *choice == ToolChoice::None {
            return None;
        }
        let (parser, pending) = match forced_opening {
            Some(opening) => ToolCallParser::after_opening(opening),
            None => (ToolCallParser::default(), Vec::new()),
        };
        Some(ToolParsing {
            parser,
            pending,
            named: matches!(choice, ToolChoice::Named(_)),
        })
    }
}

/// A piece of the answer: thinking, text, and tool-call events.
struct Answer {
    reasoning: String,
    content: String,
    calls: Vec<ToolEvent>,
}

/// Adds `reasoning_content` (not among async-openai's fields) and `tool_calls` (as JSON) to the
/// first choice's `key` (`message` or `delta`) when there are some.
fn with_extras(mut json: Value, key: &str, reasoning: &str, tool_calls: Option<Value>) -> Value {
    if let Some(target) = json
        .get_mut("choices")
        .and_then(|c| c.get_mut(0))
        .and_then(|c| c.get_mut(key))
        .and_then(Value::as_object_mut)
    {
        if !reasoning.is_empty() {
            target.insert("reasoning_content".into(), Value::from(reasoning));
        }
        if let Some(calls) = tool_calls {
            target.insert("tool_calls".into(), calls);
        }
    }
    json
}

impl ChatChunks {
    fn envelope(
        &self,
        choices: Vec<ChatChoiceStream>,
        usage: Option<CompletionUsage>,
        reasoning: &str,
        tool_calls: Option<Value>,
    ) -> String {
        let chunk = CreateChatCompletionStreamResponse {
            id: self.id.clone(),
            choices,
            created: self.created,
            model: self.model.clone(),
            object: "chat.completion.chunk".into(),
            usage,
            ..Default::default()
        };
        let json = serde_json::to_value(&chunk).unwrap_or(Value::Null);
        with_extras(json, "delta", reasoning, tool_calls).to_string()
    }

    /// The next piece of the answer: the thinking split off, the rest through the tool-call
    /// parser.
    fn answer(&mut self, text: String, last: bool) -> Answer {
        let Split { reasoning, content } = self.split(text, last);
        let Some(tools) = self.tools.as_mut() else {
            return Answer {
                reasoning,
                content,
                calls: Vec::new(),
            };
        };
        let mut events = std::mem::take(&mut tools.pending);
        events.extend(tools.parser.push(&content));
        if last {
            events.extend(tools.parser.finish());
        }
        let (mut content, mut calls) = (String::new(), Vec::new());
        for e in events {
            match e {
                ToolEvent::Content(text) => content.push_str(&text),
                call => calls.push(call),
            }
        }
        Answer {
            reasoning,
            content,
            calls,
        }
    }

    /// `tool_calls` when the answer called a tool and stopped by itself; otherwise as it ended.
    /// `tool_calls` when the model chose to call (`auto`, `required`) and stopped by itself;
    /// a named `tool_choice` stops as `stop`, as OpenAI's API does.
    fn finish_reason(&self, finish: Finish) -> FinishReason {
        match finish {
            Finish::Stop if self.tools.as_ref().is_some_and(|t| !t.named && t.parser.calls() > 0) => {
                FinishReason::ToolCalls
            }
            other => finish_reason(other),
        }
    }

    /// The answer's text split into (reasoning, content), or all content.
    fn split(&mut self, text: String, last: bool) -> Split {
        match &mut self.reasoning {
            None => Split {
                reasoning: String::new(),
                content: text,
            },
            Some(splitter) => {
                let mut split = splitter.push(&text);
                if last {
                    let rest = splitter.finish();
                    split.reasoning.push_str(&rest.reasoning);
                    split.content.push_str(&rest.content);
                }
                split
            }
        }
    }
}

impl ChunkFormat for ChatChunks {
    fn response(&mut self, text: String, tokens: &[TokenOutput], finish: Finish, usage: CompletionUsage) -> Value {
        let Answer {
            reasoning,
            content,
            calls,
        } = self.answer(text, true);
        let (_, calls) = tools::collect(calls);
        let content = (calls.is_empty() || !content.trim().is_empty()).then_some(content);
        let body = CreateChatCompletionResponse {
            id: self.id.clone(),
            choices: vec![ChatChoice {
                index: self.index,
                message: ChatCompletionResponseMessage {
                    content,
                    role: Role::Assistant,
                    ..Default::default()
                },
                finish_reason: Some(self.finish_reason(finish)),
                logprobs: self.logprobs.then(|| chat_logprobs(Some(&self.tokenizer), tokens)),
            }],
            created: self.created,
            model: self.model.clone(),
            object: "chat.completion".into(),
            usage: Some(usage),
            ..Default::default()
        };
        let tool_calls = (!calls.is_empty()).then(|| tools::message_calls(&self.id, self.index, &calls));
        with_extras(
            serde_json::to_value(&body).unwrap_or(Value::Null),
            "message",
            &reasoning,
            tool_calls,
        )
    }

    fn opening(&mut self) -> Vec<String> {
        let delta = ChatCompletionStreamResponseDelta {
            role: Some(Role::Assistant),
            content: Some(String::new()),
            ..Default::default()
        };
        vec![self.envelope(
            vec![ChatChoiceStream {
                index: self.index,
                delta,
                finish_reason: None,
                logprobs: None,
            }],
            None,
            "",
            None,
        )]
    }

    fn chunk(&mut self, text: String, tokens: &[TokenOutput], finish: Option<Finish>) -> String {
        // The last chunk carries what the splitters still held (a marker's possible start).
        let Answer {
            reasoning,
            content,
            calls,
        } = self.answer(text, finish.is_some());
        let tool_calls = tools::delta_calls(&self.id, self.index, &calls);
        // A chunk carries what it has: reasoning, content, calls, or (before the end) an empty
        // content.
        let content = if content.is_empty() && (finish.is_some() || !reasoning.is_empty() || tool_calls.is_some()) {
            None
        } else {
            Some(content)
        };
        let delta = ChatCompletionStreamResponseDelta {
            content,
            ..Default::default()
        };
        let logprobs = (self.logprobs && finish.is_none()).then(|| chat_logprobs(Some(&self.tokenizer), tokens));
        self.envelope(
            vec![ChatChoiceStream {
                index: self.index,
                delta,
                finish_reason: finish.map(|f| self.finish_reason(f)),
                logprobs,
            }],
            None,
            &reasoning,
            tool_calls,
        )
    }

    fn usage(&mut self, usage: CompletionUsage) -> String {
        self.envelope(Vec::new(), Some(usage), "", None)
    }
}
