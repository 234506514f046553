//! Test doubles and helpers: a scripted fake backend over the tiny model's config and tokenizer,
//! and one-shot HTTP helpers on the router.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use dsv3_api::{
    ApiConfig, Backend, BackendStats, GenerationEvent, GenerationRequest, Health, SubmitError, TokenLogprob,
};
use dsv3_engine::{FinishReason, ModelConfig};
use dsv3_text::Tokenizer;
use serde_json::Value;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tower::ServiceExt;

pub const MODEL: &str = "tiny";

pub fn tiny_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden/tiny-bf16")
}

pub fn tokenizer() -> Tokenizer {
    Tokenizer::from_model_dir(&tiny_dir())
        .expect("load the tiny tokenizer")
        .expect("the tiny model has a tokenizer")
}

pub fn model_config() -> ModelConfig {
    ModelConfig::from_file(&tiny_dir().join("config.json")).expect("load the tiny config")
}

/// How the fake ends a generation after its scripted tokens.
#[derive(Clone, Debug)]
pub enum Ending {
    Finish(FinishReason),
    Fail(String),
    /// Send nothing more and wait until the receiver is dropped (cancellation).
    Hang,
}

#[derive(Clone, Debug)]
pub enum Mode {
    Serve,
    Full,
    NotReady(String),
}

/// A backend that answers every request with the same scripted tokens.
pub struct Fake {
    config: ModelConfig,
    pub script: Vec<u32>,
    pub ending: Ending,
    pub mode: Mode,
    pub submitted: Mutex<Vec<GenerationRequest>>,
    /// Set when the fake sees its receiver dropped before it finished.
    pub cancelled: Arc<AtomicBool>,
    pub stats: BackendStats,
}

impl Fake {
    pub fn new(script: Vec<u32>, ending: Ending) -> Self {
        Fake {
            config: model_config(),
            script,
            ending,
            mode: Mode::Serve,
            submitted: Mutex::new(Vec::new()),
            cancelled: Arc::new(AtomicBool::new(false)),
            stats: BackendStats {
                running: 3,
                waiting: 2,
                cache_used_blocks: 25,
                cache_total_blocks: 100,
                expert_tokens: vec![vec![4, 0, 0, 0], vec![1, 1, 1, 1]],
                scheduler: dsv3_api::backend::SchedulerTime {
                    steps: 7,
                    step_seconds: 0.5,
                    busy_seconds: 0.75,
                    preemptions: 3,
                    migrations: 2,
                },
                ranks: vec![dsv3_api::backend::RankStats {
                    rank: 0,
                    device: "cpu".into(),
                    weight_bytes: 1000,
                    kv_cache_bytes: 200,
                    workspace_bytes: 30,
                    expert_seconds: 0.5,
                    expert_bytes_sent: 4096,
                    expert_bytes_received: 2048,
                    expert_layers: 6,
                    drafts_scored: vec![10, 8],
                    drafts_accepted: vec![7, 4],
                }],
            },
        }
    }

    /// Generates `text` (tokenized with the tiny tokenizer), then ends as `ending`.
    pub fn text(text: &str, ending: Ending) -> Self {
        Fake::new(tokenizer().encode(text, false).expect("encode"), ending)
    }

    /// A model with a longer context (prompts that describe tools).
    pub fn with_context(mut self, tokens: usize) -> Self {
        self.config.max_position_embeddings = tokens;
        self
    }

    pub fn with_mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    pub fn last_request(&self) -> GenerationRequest {
        self.submitted
            .lock()
            .expect("lock")
            .last()
            .cloned()
            .expect("a request was submitted")
    }

    pub fn submissions(&self) -> usize {
        self.submitted.lock().expect("lock").len()
    }

    /// Waits (up to 5 s) until the fake has seen its receiver dropped.
    pub async fn wait_cancelled(&self) -> bool {
        for _ in 0..500 {
            if self.cancelled.load(Ordering::SeqCst) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }
}

impl Backend for Fake {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn submit(&self, request: GenerationRequest) -> Result<UnboundedReceiver<GenerationEvent>, SubmitError> {
        match &self.mode {
            Mode::Full => return Err(SubmitError::QueueFull),
            Mode::NotReady(why) => return Err(SubmitError::NotReady(why.clone())),
            Mode::Serve => {}
        }
        let logprobs = request.logprobs;
        let max_tokens = request.params.max_tokens;
        self.submitted.lock().expect("lock").push(request);
        let (tx, rx) = unbounded_channel();
        let script = self.script.clone();
        let ending = self.ending.clone();
        let cancelled = self.cancelled.clone();
        tokio::spawn(async move {
            // As the fleet's scheduler: scheduled first, then the tokens.
            if tx.send(GenerationEvent::Scheduled).is_err() {
                cancelled.store(true, Ordering::SeqCst);
                return;
            }
            tokio::task::yield_now().await;
            for (i, &id) in script.iter().enumerate() {
                if i >= max_tokens {
                    break;
                }
                let (logprob, top_logprobs) = match logprobs {
                    None => (None, Vec::new()),
                    Some(n) => (
                        Some(-0.25),
                        (0..n as u32)
                            .map(|k| TokenLogprob {
                                id: (id + 1 + k) % 983,
                                logprob: -1.0 - k as f32,
                            })
                            .collect(),
                    ),
                };
                if tx
                    .send(GenerationEvent::Token {
                        id,
                        logprob,
                        top_logprobs,
                    })
                    .is_err()
                {
                    cancelled.store(true, Ordering::SeqCst);
                    return;
                }
                tokio::task::yield_now().await;
            }
            let last = match ending {
                Ending::Finish(reason) => GenerationEvent::Finished { reason },
                Ending::Fail(message) => GenerationEvent::Failed { message },
                Ending::Hang => {
                    tx.closed().await;
                    cancelled.store(true, Ordering::SeqCst);
                    return;
                }
            };
            let _ = tx.send(last);
        });
        Ok(rx)
    }

    fn health(&self) -> Health {
        match &self.mode {
            Mode::NotReady(why) => Health {
                ready: false,
                detail: why.clone(),
            },
            _ => Health {
                ready: true,
                detail: "all workers up".into(),
            },
        }
    }

    fn stats(&self) -> BackendStats {
        self.stats.clone()
    }
}

pub fn app(fake: Arc<Fake>) -> Router {
    dsv3_api::router(fake, Some(tokenizer()), ApiConfig::new(MODEL))
}

pub fn app_with(fake: Arc<Fake>, tokenizer: Option<Tokenizer>, config: ApiConfig) -> Router {
    dsv3_api::router(fake, tokenizer, config)
}

pub async fn send(router: &Router, request: Request<Body>) -> (StatusCode, String) {
    let response = router.clone().oneshot(request).await.expect("infallible");
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("body");
    (status, String::from_utf8(bytes.to_vec()).expect("utf-8 body"))
}

pub async fn get(router: &Router, path: &str) -> (StatusCode, String) {
    send(router, Request::get(path).body(Body::empty()).expect("request")).await
}

pub async fn post_raw(router: &Router, path: &str, body: impl Into<Body>) -> (StatusCode, String) {
    let request = Request::post(path)
        .header("content-type", "application/json")
        .body(body.into())
        .expect("request");
    send(router, request).await
}

/// POSTs JSON and parses the JSON answer.
pub async fn post(router: &Router, path: &str, body: &Value) -> (StatusCode, Value) {
    let (status, text) = post_raw(router, path, body.to_string()).await;
    let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, json)
}

/// POSTs a streaming request; returns the `data:` payloads in order.
pub async fn post_stream(router: &Router, path: &str, body: &Value) -> (StatusCode, Vec<String>) {
    let (status, text) = post_raw(router, path, body.to_string()).await;
    (status, sse_data(&text))
}

pub fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|event| {
            event
                .lines()
                .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect()
}

/// Asserts an OpenAI error body with `status`; returns the error object.
pub fn assert_error(status: StatusCode, body: &Value, expected: StatusCode) -> Value {
    assert_eq!(status, expected, "body: {body}");
    let error = body.get("error").unwrap_or_else(|| panic!("no `error` in {body}"));
    for key in ["message", "type", "param", "code"] {
        assert!(error.get(key).is_some(), "error body lacks `{key}`: {body}");
    }
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
    error.clone()
}
