//! The contract between the HTTP front end and whatever produces tokens (the scheduler of the
//! fleet, an in-process engine, a test double).
//!
//! The front end validates and tokenizes a request, hands a [`GenerationRequest`] to
//! [`Backend::submit`], and reads [`GenerationEvent`]s from the returned channel until
//! `Finished` or `Failed`.
//!
//! **Cancellation**: dropping the receiver cancels the request. The backend notices the failed
//! send (or polls `UnboundedSender::is_closed`) and frees the sequence's cache at once. The front
//! end drops the receiver when the client disconnects (axum drops the handler future or the SSE
//! stream) and when a stop string ends generation early.

use tokio::sync::mpsc::UnboundedReceiver;

/// One generation to run.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationRequest {
    /// Prompt token ids, already validated: non-empty, every id `< config().vocab_size`, and
    /// `prompt.len() + params.max_tokens <= config().max_position_embeddings`.
    pub prompt: Vec<u32>,
    /// Sampling: temperature, top_k, top_p, seed, max_tokens, stop_token_ids, ignore_eos.
    /// Already validated with [`dsv3_engine::SamplingParams::validate`].
    pub params: dsv3_engine::SamplingParams,
    /// `Some(n)`: every [`GenerationEvent::Token`] carries the chosen token's logprob and the
    /// `n` most likely alternatives (n may be 0: the chosen token's logprob only).
    pub logprobs: Option<usize>,
}

/// A token id with its log probability.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
}

/// What the backend reports about a running generation, in order: zero or more `Token`s, then
/// exactly one `Finished` or `Failed`, then the channel closes. A channel that closes without
/// either counts as `Failed`.
#[derive(Clone, Debug, PartialEq)]
pub enum GenerationEvent {
    /// The scheduler put the request into a step for the first time: its wait in the queue ends
    /// and its prefill begins (sent once, before any token; a preempted request is not
    /// scheduled again in this sense).
    Scheduled,
    /// This many more of the prompt's tokens were taken from the prefix cache rather than
    /// computed (sent during prefill; the request's total is the sum).
    Cached { tokens: usize },
    /// This many more of the request's token rows were computed with an expert masked out of
    /// their routes (it had no live copy; the fleet runs degraded), summed over MoE layers.
    ExpertsMasked { routes: usize },
    /// One generated token (also the end-of-sequence or stop token that ends generation).
    Token {
        id: u32,
        /// The chosen token's logprob, when the request asked for logprobs.
        logprob: Option<f32>,
        /// The most likely alternatives, best first, when the request asked for logprobs.
        top_logprobs: Vec<TokenLogprob>,
    },
    /// Generation ended normally: `Length` (max_tokens), `Stop` (eos or stop token id) or
    /// `ContextFull` (reached the model's context).
    Finished { reason: dsv3_engine::FinishReason },
    /// Generation failed and will produce no more tokens (e.g. a worker died mid-stream).
    Failed { message: String },
}

/// Why [`Backend::submit`] refused a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SubmitError {
    /// Admission control: too many requests queued. HTTP 429.
    QueueFull,
    /// The backend cannot serve now (loading, degraded); the text says why. HTTP 503.
    NotReady(String),
    /// The backend rejects this request (e.g. it can never fit in the KV cache). HTTP 400.
    Invalid(String),
}

impl std::fmt::Display for SubmitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SubmitError::QueueFull => {
                f.write_str("the server is at capacity: too many requests are queued; retry later")
            }
            SubmitError::NotReady(detail) => write!(f, "the server is not ready: {detail}"),
            SubmitError::Invalid(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for SubmitError {}

/// Readiness of the backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    /// Whether the backend accepts requests now (`GET /ready` answers 200).
    pub ready: bool,
    /// What is degraded or still loading; shown by `GET /ready`.
    pub detail: String,
}

/// Load figures, read on every `GET /metrics` scrape.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BackendStats {
    /// Sequences being generated.
    pub running: usize,
    /// Sequences admitted but waiting for a slot.
    pub waiting: usize,
    /// KV cache blocks in use, over all attention ranks.
    pub cache_used_blocks: usize,
    /// KV cache blocks in all, over all attention ranks.
    pub cache_total_blocks: usize,
    /// Per MoE layer (in layer order), per expert: tokens routed to it since start.
    pub expert_tokens: Vec<Vec<u64>>,
    /// Per attention rank, as it last answered a probe.
    pub ranks: Vec<RankStats>,
    /// How the scheduler spent its time since start.
    pub scheduler: SchedulerTime,
}

/// Steps run, seconds spent waiting on the ranks' steps, and seconds with sequences in flight
/// (steps plus the scheduler's own work between them: what the ranks' devices sit idle for).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SchedulerTime {
    pub steps: u64,
    pub step_seconds: f64,
    pub busy_seconds: f64,
    /// Sequences preempted (cache freed, prefilled again later) since start.
    pub preemptions: u64,
    /// Sequences moved off an attention rank that failed, resumed on another since start.
    pub migrations: u64,
}

/// One attention rank's device, memory and expert traffic.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RankStats {
    pub rank: usize,
    /// Where its model runs (`cpu`, `NVIDIA H200 (cuda:0)`).
    pub device: String,
    pub weight_bytes: u64,
    pub kv_cache_bytes: u64,
    pub workspace_bytes: u64,
    /// Dispatch/combine with the expert shards since start: wall seconds, activation bytes each
    /// way, and MoE layers exchanged.
    pub expert_seconds: f64,
    pub expert_bytes_sent: u64,
    pub expert_bytes_received: u64,
    pub expert_layers: u64,
    /// Speculative decoding since start, per draft position (first after the fed token
    /// first): drafts scored and drafts accepted.
    pub drafts_scored: Vec<u64>,
    pub drafts_accepted: Vec<u64>,
}

/// Produces tokens for the HTTP front end. Implementations must be cheap to call from request
/// handlers: none of these methods may block for long.
pub trait Backend: Send + Sync + 'static {
    /// The model's config: `vocab_size` (token ids are validated against it),
    /// `max_position_embeddings` (the context), `eos_token_ids`.
    fn config(&self) -> &dsv3_engine::ModelConfig;

    /// Starts a generation. The receiver yields its events; dropping it cancels the request.
    fn submit(&self, request: GenerationRequest) -> Result<UnboundedReceiver<GenerationEvent>, SubmitError>;

    /// Whether the backend is ready, and what is degraded.
    fn health(&self) -> Health;

    /// Current load, for metrics.
    fn stats(&self) -> BackendStats;
}
