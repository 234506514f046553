//! One running generation seen from the HTTP side: backend events in, client-ready text out.
//!
//! [`Generation`] owns the backend's receiver, detokenizes with dsv3_text's `StreamDecoder`
//! (never splitting a UTF-8 character), applies text-level stop strings, counts tokens, and
//! records the timing metrics. It drops the receiver (which cancels the request in the backend)
//! as soon as a stop string matches, and when it is itself dropped (client gone).

use std::sync::Arc;
use std::time::Instant;

use dsv3_engine::FinishReason;
use dsv3_text::{StreamDecoder, Tokenizer};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::backend::{Backend, GenerationEvent, GenerationRequest, TokenLogprob};
use crate::error::ApiError;
use crate::metrics::{Metrics, Outcome};
use crate::stop::{StopMatcher, StopScan};

/// A generated token with what the response formats need about it.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenOutput {
    pub id: u32,
    pub logprob: Option<f32>,
    pub top_logprobs: Vec<TokenLogprob>,
    /// Characters of generated text before this token's text.
    pub text_offset: usize,
}

/// How a generation ended, in OpenAI's terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// End of sequence, stop token, or stop string.
    Stop,
    /// max_tokens or the model's context.
    Length,
}

/// What [`Generation::next`] yields.
#[derive(Debug, PartialEq)]
pub enum Step {
    /// New text and the tokens it came with. Without a tokenizer the text is empty and there is
    /// one step per token.
    Delta { text: String, tokens: Vec<TokenOutput> },
    /// The end: the last text and tokens, and why.
    Done {
        text: String,
        tokens: Vec<TokenOutput>,
        finish: Finish,
    },
    /// The backend failed; no more steps.
    Failed { message: String },
}

/// The whole output of a non-streamed generation.
pub struct Collected {
    pub text: String,
    pub tokens: Vec<TokenOutput>,
    pub finish: Finish,
}

/// A running generation.
pub struct Generation {
    rx: Option<UnboundedReceiver<GenerationEvent>>,
    decoder: Option<StreamDecoder>,
    stop: StopMatcher,
    metrics: Arc<Metrics>,
    arrived: Instant,
    /// When the scheduler first put the request into a step.
    scheduled: Option<Instant>,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    prompt_tokens: usize,
    /// Of the prompt, tokens taken from the prefix cache.
    cached_tokens: usize,
    /// Token rows computed with an expert masked out.
    masked_routes: usize,
    completion_tokens: usize,
    decoded_chars: usize,
    pending: Vec<TokenOutput>,
    ended: bool,
}

/// Most choices one request may ask for (`n`), as OpenAI allows.
pub const MAX_CHOICES: u8 = 128;

/// Checks `n` (1 when left out).
pub fn choice_count(n: Option<u8>) -> Result<usize, ApiError> {
    match n.unwrap_or(1) {
        0 => Err(ApiError::invalid("n", "`n` must be at least 1")),
        n if n > MAX_CHOICES => Err(ApiError::invalid(
            "n",
            format!("`n` must be at most {MAX_CHOICES}, got {n}"),
        )),
        n => Ok(usize::from(n)),
    }
}

/// Starts `n` generations of one request (its choices). With a seed, choice `i` draws from
/// seed + i, so the choices differ and each is reproducible. A refused submission cancels the
/// choices already started (they are dropped).
pub fn start_choices(
    backend: &dyn Backend,
    tokenizer: Option<&Tokenizer>,
    metrics: &Arc<Metrics>,
    request: GenerationRequest,
    stops: &[String],
    n: usize,
    arrived: Instant,
) -> Result<Vec<Generation>, ApiError> {
    (0..n)
        .map(|i| {
            let mut request = request.clone();
            request.params.seed = request.params.seed.map(|s| s.wrapping_add(i as u64));
            Generation::start(backend, tokenizer, metrics.clone(), request, stops.to_vec(), arrived)
        })
        .collect()
}

/// Runs every choice to its end, concurrently.
pub async fn collect_choices(choices: &mut [Generation]) -> Result<Vec<Collected>, ApiError> {
    futures_util::future::try_join_all(choices.iter_mut().map(Generation::collect)).await
}

impl Generation {
    /// Submits `request` to the backend. `arrived`: when the HTTP request came in (for TTFT).
    pub fn start(
        backend: &dyn Backend,
        tokenizer: Option<&Tokenizer>,
        metrics: Arc<Metrics>,
        request: GenerationRequest,
        stops: Vec<String>,
        arrived: Instant,
    ) -> Result<Self, ApiError> {
        let prompt_tokens = request.prompt.len();
        let rx = backend.submit(request)?;
        metrics.request_admitted(prompt_tokens);
        Ok(Generation {
            rx: Some(rx),
            decoder: tokenizer.map(|t| t.stream_decoder(true)),
            stop: StopMatcher::new(stops),
            metrics,
            arrived,
            scheduled: None,
            first_token: None,
            last_token: None,
            prompt_tokens,
            cached_tokens: 0,
            masked_routes: 0,
            completion_tokens: 0,
            decoded_chars: 0,
            pending: Vec::new(),
            ended: false,
        })
    }

    pub fn prompt_tokens(&self) -> usize {
        self.prompt_tokens
    }

    /// Prompt tokens taken from the prefix cache so far.
    pub fn cached_tokens(&self) -> usize {
        self.cached_tokens
    }

    /// Token rows computed with an expert masked out (see [`GenerationEvent::ExpertsMasked`]).
    pub fn masked_routes(&self) -> usize {
        self.masked_routes
    }

    /// Tokens generated so far (including any a stop string cut off).
    pub fn completion_tokens(&self) -> usize {
        self.completion_tokens
    }

    /// The next piece of output; `None` after `Done` or `Failed`.
    pub async fn next(&mut self) -> Option<Step> {
        if self.ended {
            return None;
        }
        loop {
            let event = match self.rx.as_mut() {
                Some(rx) => rx.recv().await,
                None => None,
            };
            let step = match event {
                Some(GenerationEvent::Cached { tokens }) => {
                    self.cached_tokens += tokens;
                    self.metrics.prefix_cache_hit(tokens);
                    None
                }
                Some(GenerationEvent::ExpertsMasked { routes }) => {
                    self.masked_routes += routes;
                    self.metrics.experts_masked(routes);
                    None
                }
                Some(GenerationEvent::Scheduled) => {
                    let now = Instant::now();
                    self.metrics.scheduled(now - self.arrived);
                    self.scheduled = Some(now);
                    None
                }
                Some(GenerationEvent::Token {
                    id,
                    logprob,
                    top_logprobs,
                }) => self.on_token(id, logprob, top_logprobs),
                Some(GenerationEvent::Finished { reason }) => Some(self.on_finished(reason)),
                Some(GenerationEvent::Failed { message }) => Some(self.fail(message)),
                None => Some(self.fail("the backend ended the request without finishing it".into())),
            };
            if let Some(step) = step {
                return Some(step);
            }
        }
    }

    /// Runs the generation to its end.
    pub async fn collect(&mut self) -> Result<Collected, ApiError> {
        let mut text = String::new();
        let mut tokens = Vec::new();
        while let Some(step) = self.next().await {
            match step {
                Step::Delta { text: t, tokens: k } => {
                    text.push_str(&t);
                    tokens.extend(k);
                }
                Step::Done {
                    text: t,
                    tokens: k,
                    finish,
                } => {
                    text.push_str(&t);
                    tokens.extend(k);
                    return Ok(Collected { text, tokens, finish });
                }
                Step::Failed { message } => return Err(ApiError::internal(format!("generation failed: {message}"))),
            }
        }
        Err(ApiError::internal("generation ended without a result"))
    }

    fn on_token(&mut self, id: u32, logprob: Option<f32>, top_logprobs: Vec<TokenLogprob>) -> Option<Step> {
        let now = Instant::now();
        match self.last_token {
            None => {
                self.metrics
                    .first_token(now - self.arrived, self.scheduled.map(|s| now - s));
                self.first_token = Some(now);
            }
            Some(prev) => self.metrics.next_token(now - prev),
        }
        self.last_token = Some(now);
        self.completion_tokens += 1;
        self.pending.push(TokenOutput {
            id,
            logprob,
            top_logprobs,
            text_offset: self.decoded_chars,
        });
        let Some(decoder) = self.decoder.as_mut() else {
            return Some(Step::Delta {
                text: String::new(),
                tokens: std::mem::take(&mut self.pending),
            });
        };
        let piece = match decoder.push(id) {
            Ok(Some(piece)) => piece,
            // Part of a UTF-8 character: wait for the next token.
            Ok(None) => return None,
            Err(e) => return Some(self.fail(format!("detokenization failed: {e}"))),
        };
        self.decoded_chars += piece.chars().count();
        match self.stop.push(&piece) {
            StopScan::Continue(text) if text.is_empty() => None,
            StopScan::Continue(text) => Some(Step::Delta {
                text,
                tokens: std::mem::take(&mut self.pending),
            }),
            StopScan::Hit(text) => Some(self.done(text, Finish::Stop)),
        }
    }

    fn on_finished(&mut self, reason: FinishReason) -> Step {
        let finish = match reason {
            FinishReason::Stop => Finish::Stop,
            FinishReason::Length | FinishReason::ContextFull => Finish::Length,
        };
        let tail = match self.decoder.as_mut().map(StreamDecoder::finish) {
            None => String::new(),
            Some(Ok(tail)) => tail,
            Some(Err(e)) => return self.fail(format!("detokenization failed: {e}")),
        };
        match self.stop.push(&tail) {
            StopScan::Continue(mut text) => {
                text.push_str(&self.stop.flush());
                self.done(text, finish)
            }
            StopScan::Hit(text) => self.done(text, Finish::Stop),
        }
    }

    fn done(&mut self, text: String, finish: Finish) -> Step {
        // Cancels the backend's work if it is still generating (stop string).
        self.rx = None;
        self.ended = true;
        let outcome = match finish {
            Finish::Stop => Outcome::Stop,
            Finish::Length => Outcome::Length,
        };
        let now = Instant::now();
        self.metrics.request_finished(outcome, now - self.arrived);
        if let Some(first) = self.first_token {
            self.metrics.decoded(now - first);
        }
        Step::Done {
            text,
            tokens: std::mem::take(&mut self.pending),
            finish,
        }
    }

    fn fail(&mut self, message: String) -> Step {
        self.rx = None;
        self.ended = true;
        self.metrics.request_finished(Outcome::Error, self.arrived.elapsed());
        Step::Failed { message }
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        if !self.ended {
            // The client went away; dropping `rx` (a field) cancels the backend's work.
            self.metrics.request_finished(Outcome::Abort, self.arrived.elapsed());
        }
    }
}
