//! Settings of the HTTP front end.

use axum::http::HeaderValue;

/// Settings of the HTTP front end.
#[derive(Clone, Debug, PartialEq)]
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
    /// Sampling defaults of the model (`generation_config.json`) for requests that leave a
    /// field out.
    pub sampling_defaults: SamplingDefaults,
}

/// Sampling fields a request may leave to the model's `generation_config.json` (R1 ships
/// temperature 0.6 and top_p 0.95), as transformers and vLLM read it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SamplingDefaults {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub repetition_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
}

impl SamplingDefaults {
    /// The defaults in a `generation_config.json`, and the sampling keys it sets that this server
    /// does not apply (for the start-up log). `do_sample: false` means greedy.
    pub fn from_generation_config(json: &str) -> Result<(Self, Vec<String>), String> {
        let value: serde_json::Value =
            serde_json::from_str(json).map_err(|e| format!("generation_config.json is not JSON: {e}"))?;
        let obj = value
            .as_object()
            .ok_or("generation_config.json must be a JSON object")?;
        let number = |key: &str| -> Result<Option<f64>, String> {
            match obj.get(key) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(v) => v
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| format!("generation_config.json: `{key}` must be a number, got {v}")),
            }
        };
        let greedy = obj.get("do_sample").and_then(serde_json::Value::as_bool) == Some(false);
        // The ranges a request's own fields must be in (params::prepare), checked here so a bad
        // file fails the start rather than every request that leaves the field out.
        let checked = |key: &str, ok: fn(f64) -> bool, range: &str| -> Result<Option<f64>, String> {
            match number(key)? {
                Some(v) if !ok(v) => Err(format!("generation_config.json: `{key}` must be {range}, got {v}")),
                v => Ok(v),
            }
        };
        checked("temperature", |t| (0.0..=2.0).contains(&t), "between 0 and 2")?;
        checked("top_p", |p| p > 0.0 && p <= 1.0, "in (0, 1]")?;
        checked("top_k", |k| k >= -1.0 && k.fract() == 0.0, "an integer, -1 or more")?;
        checked("repetition_penalty", |r| r > 0.0 && r <= 2.0, "in (0, 2]")?;
        checked("presence_penalty", |p| (-2.0..=2.0).contains(&p), "between -2 and 2")?;
        checked("frequency_penalty", |f| (-2.0..=2.0).contains(&f), "between -2 and 2")?;
        let defaults = SamplingDefaults {
            temperature: if greedy {
                Some(0.0)
            } else {
                number("temperature")?.map(|t| t as f32)
            },
            top_p: number("top_p")?.map(|p| p as f32),
            top_k: number("top_k")?.map(|k| k as i64),
            repetition_penalty: number("repetition_penalty")?.map(|r| r as f32),
            presence_penalty: number("presence_penalty")?.map(|p| p as f32),
            frequency_penalty: number("frequency_penalty")?.map(|f| f as f32),
        };
        let not_applied = ["min_p", "min_new_tokens", "max_new_tokens", "max_length", "num_beams"]
            .into_iter()
            .filter(|k| obj.get(*k).is_some_and(|v| !v.is_null()))
            .map(str::to_string)
            .collect();
        Ok((defaults, not_applied))
    }
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
            sampling_defaults: SamplingDefaults::default(),
        }
    }
}
