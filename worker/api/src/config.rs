//! Settings of the HTTP front end.

use axum::http::HeaderValue;

/// Settings of the HTTP front end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiConfig {
    /// The model id clients name in `model` and `GET /v1/models` lists. A request naming another
    /// model gets 404 `model_not_found`; a request without `model` is served.
    pub served_model_name: String,
    /// Largest accepted request body; larger ones get 413.
    pub max_body_bytes: usize,
    /// Largest `logprobs` (completions) / `top_logprobs` (chat) accepted.
    pub max_logprobs: usize,
    /// `max_tokens` of `/v1/completions` when the request gives none (OpenAI: 16), lowered to
    /// what the context leaves. Chat completions default to the rest of the context.
    pub default_completion_max_tokens: usize,
    /// `owned_by` in `GET /v1/models`.
    pub owned_by: String,
    /// When set, every `/v1/` request must carry `Authorization: Bearer <key>` (401 otherwise);
    /// `/health`, `/ready` and `/metrics` stay open for probes and scrapers.
    pub api_key: Option<String>,
    /// One JSON line per request on stderr (request id, method, path, status, latency).
    pub access_log: bool,
    /// Origins a browser may call the API from (CORS), `*` for any; empty: no CORS headers, so
    /// browsers keep pages of other origins out.
    pub cors_origins: Vec<HeaderValue>,
    /// Chat answers of thinking models split at `</think>`: the thinking in `reasoning_content`,
    /// the answer alone in `content` (see `reasoning`).
    pub split_reasoning: bool,
}

impl ApiConfig {
    /// Defaults for a model served under `served_model_name`.
    pub fn new(served_model_name: impl Into<String>) -> Self {
        ApiConfig {
            served_model_name: served_model_name.into(),
            ..ApiConfig::default()
        }
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            served_model_name: "deepseek-v3".to_string(),
            max_body_bytes: 4 << 20,
            max_logprobs: 20,
            default_completion_max_tokens: 16,
            owned_by: "dsv3".to_string(),
            api_key: None,
            access_log: true,
            cors_origins: Vec::new(),
            split_reasoning: true,
        }
    }
}
