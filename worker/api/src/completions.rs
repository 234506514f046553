//! `POST /v1/completions`.

use std::time::Instant;

use async_openai::types::chat::{Choice, CompletionFinishReason, CompletionUsage, Prompt};
use async_openai::types::completions::{CreateCompletionRequest, CreateCompletionResponse};
use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use dsv3_text::Tokenizer;

use crate::access::RequestId;
use crate::backend::GenerationRequest;
use crate::error::ApiError;
use crate::generation::{choice_count, start_choices, Finish, TokenOutput};
use crate::logprobs::completion_logprobs;
use crate::params::{check_prompt, prepare, SamplingInput};
use crate::request::{parse_request, read_body, Parsed};
use crate::server::{off_runtime, unix_now, AppState};
use crate::streaming::{respond, to_json_with_token_ids, ChunkFormat};
use crate::structured::grammar_of;
use crate::unsupported::refuse_unsupported;

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
        raw,
    } = parse_request::<CreateCompletionRequest>(&bytes, &state.config.served_model_name)?;
    state.check_model(&req.model)?;
    refuse_unsupported(&raw)?;
    let n = choice_count(req.n)?;
    if req.best_of.is_some_and(|b| usize::from(b) != n) {
        return Err(ApiError::invalid(
            "best_of",
            "`best_of` (drawing more choices than are returned, ranked by likelihood) is not supported; leave it \
             out or equal to `n`",
        ));
    }
    let echo = req.echo == Some(true);
    let suffix = req.suffix.take().filter(|s| !s.is_empty());
    let logprobs = req.logprobs.map(usize::from);
    if echo && logprobs.is_some() {
        return Err(ApiError::invalid(
            "echo",
            "`echo` with `logprobs` would need the prompt's log-probabilities, which this server does not compute",
        ));
    }
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
    let (prompt, echoed) = {
        // Taken out of the request (nothing reads it after this) to move into the blocking pool.
        let text = std::mem::replace(&mut req.prompt, Prompt::IntegerArray(vec![]));
        let tokenizer = tokenizer.cloned();
        off_runtime(move || {
            let ids = match &suffix {
                None => prompt_ids(&text, tokenizer.as_ref())?,
                Some(suffix) => fill_in_the_middle(&text, suffix, tokenizer.as_ref())?,
            };
            let echoed = echo.then(|| echo_text(&text, &ids, tokenizer.as_ref())).transpose()?;
            Ok((ids, echoed))
        })
        .await?
    };
    check_prompt(&prompt, config, "prompt")?;
    let grammar = grammar_of(&raw)?;
    if let Some(g) = &grammar {
        let (shared, tokenizer, config, g) = (state.clone(), tokenizer.cloned(), config.clone(), g.clone());
        off_runtime(move || {
            shared
                .grammars
                .check(&g, tokenizer.as_ref(), &config, "response_format")
        })
        .await?;
    }
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
            logit_bias: raw.get("logit_bias"),
            extensions: &extensions,
            defaults: &state.config.sampling_defaults,
            grammar,
        },
        prompt.len(),
        config,
        tokenizer.is_some(),
    )?;

    let choices = start_choices(
        state.backend.as_ref(),
        tokenizer,
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
    let (id, created) = (format!("cmpl-{}", id.0), unix_now());
    let format = |index: usize| CompletionChunks {
        index: index as u32,
        id: id.clone(),
        created,
        model: req.model.clone(),
        tokenizer: state.tokenizer.clone(),
        logprobs: logprobs.is_some(),
        token_ids: extensions.return_token_ids.unwrap_or(false) || tokenizer.is_none(),
        echo: echoed.clone(),
    };
    respond(choices, format, req.stream == Some(true), req.stream_options.as_ref()).await
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

/// The prompt of a fill-in-the-middle request (`suffix`), in DeepSeek's format: the model writes
/// what goes between `prompt` and `suffix`.
fn fill_in_the_middle(prompt: &Prompt, suffix: &str, tokenizer: Option<&Tokenizer>) -> Result<Vec<u32>, ApiError> {
    let text = match prompt {
        Prompt::String(text) => text,
        Prompt::StringArray(texts) if texts.len() == 1 => &texts[0],
        _ => return Err(ApiError::invalid("suffix", "`suffix` needs `prompt` as one string")),
    };
    let tokenizer = tokenizer.ok_or_else(|| ApiError::invalid("suffix", "`suffix` needs the model's tokenizer"))?;
    let [begin, hole, end] = [FIM_BEGIN, FIM_HOLE, FIM_END];
    if [begin, hole, end].iter().any(|t| tokenizer.token_to_id(t).is_none()) {
        return Err(ApiError::invalid(
            "suffix",
            "this model's tokenizer has no fill-in-the-middle tokens",
        ));
    }
    tokenizer
        .encode(&format!("{begin}{text}{hole}{suffix}{end}"), true)
        .map_err(|e| ApiError::internal(format!("cannot tokenize the prompt: {e}")))
}

/// DeepSeek's fill-in-the-middle markers (in V3's and its predecessors' vocabularies).
const FIM_BEGIN: &str = "<｜fim▁begin｜>";
const FIM_HOLE: &str = "<｜fim▁hole｜>";
const FIM_END: &str = "<｜fim▁end｜>";

/// The prompt as `echo` returns it: text as sent, token ids as text.
fn echo_text(prompt: &Prompt, ids: &[u32], tokenizer: Option<&Tokenizer>) -> Result<String, ApiError> {
    match prompt {
        Prompt::String(text) => Ok(text.clone()),
        Prompt::StringArray(texts) if texts.len() == 1 => Ok(texts[0].clone()),
        _ => tokenizer
            .ok_or_else(|| ApiError::invalid("echo", "`echo` of token ids needs the model's tokenizer"))?
            .decode(ids, false)
            .map_err(|e| ApiError::internal(format!("cannot detokenize the prompt: {e}"))),
    }
}

fn finish_reason(finish: Finish) -> CompletionFinishReason {
    match finish {
        Finish::Stop => CompletionFinishReason::Stop,
        Finish::Length => CompletionFinishReason::Length,
    }
}

/// Chunks and responses of one choice of a completion request.
struct CompletionChunks {
    /// The choice's index.
    index: u32,
    id: String,
    created: u32,
    model: String,
    tokenizer: Option<Tokenizer>,
    logprobs: bool,
    /// Add `token_ids` to each choice (requested, or no tokenizer).
    token_ids: bool,
    /// `echo`: the prompt's text, before the completion.
    echo: Option<String>,
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
            index: self.index,
            logprobs: self
                .logprobs
                .then(|| completion_logprobs(self.tokenizer.as_ref(), tokens)),
            finish_reason: finish.map(finish_reason),
        }
    }

    fn ids(&self, tokens: &[TokenOutput]) -> Option<Vec<u32>> {
        self.token_ids.then(|| tokens.iter().map(|t| t.id).collect())
    }
}

impl ChunkFormat for CompletionChunks {
    fn response(
        &mut self,
        text: String,
        tokens: &[TokenOutput],
        finish: Finish,
        usage: CompletionUsage,
    ) -> serde_json::Value {
        let text = match &self.echo {
            Some(prompt) => format!("{prompt}{text}"),
            None => text,
        };
        let body = self.envelope(vec![self.choice(text, tokens, Some(finish))], Some(usage));
        to_json_with_token_ids(&body, self.ids(tokens))
    }

    fn opening(&mut self) -> Vec<String> {
        match self.echo.take() {
            Some(prompt) => {
                let body = self.envelope(vec![self.choice(prompt, &[], None)], None);
                vec![serde_json::to_string(&body).unwrap_or_default()]
            }
            None => Vec::new(),
        }
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
