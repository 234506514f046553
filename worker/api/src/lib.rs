//! dsv3-api: the OpenAI-compatible HTTP front end of the dsv3 router.
//!
//! It turns HTTP requests into token-level [`backend::GenerationRequest`]s and the backend's
//! [`backend::GenerationEvent`]s back into OpenAI responses, independent of how tokens are
//! produced (the fleet's scheduler, an in-process engine, a test double).
//!
//! - [`router`]: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (JSON or
//!   server-sent events), `GET /health`, `GET /ready`, `GET /metrics`.
//! - [`serve`]: serves a router with graceful shutdown on ctrl-c / SIGTERM.
//! - Errors use OpenAI's body `{"error": {"message", "type", "param", "code"}}`: 400 bad
//!   request, 404 unknown model, 413 body too large, 429 queue full, 503 not ready, 500 backend
//!   failure (inside a stream: an error event, then `[DONE]`).
//!
//! Extensions beyond OpenAI's fields (vLLM's names): `top_k`, `ignore_eos`, `stop_token_ids`,
//! `return_token_ids` (generated ids in each choice's `token_ids`), `chat_template_kwargs`.

mod access;
pub mod backend;
mod chat;
mod completions;
pub mod config;
pub mod error;
mod generation;
mod logprobs;
mod metrics;
mod params;
mod reasoning;
mod request;
mod server;
mod stop;
mod streaming;
mod structured;
mod tokenize;
mod tokens;
mod tools;
mod unsupported;

pub use backend::{Backend, BackendStats, GenerationEvent, GenerationRequest, Health, SubmitError, TokenLogprob};
pub use config::{ApiConfig, SamplingDefaults};
pub use error::ApiError;
pub use server::{bind, router, serve, serve_with_shutdown, shutdown_signal};
