//! The HTTP API on a hostile body: the first byte picks the endpoint, the rest is the body.
//! Every answer must be a success or a client error (4xx) naming the problem — never a panic,
//! never a 500 for bad input. The backend answers each accepted request with a few tokens of
//! the tiny model's vocabulary, so streaming, stop strings, tool-call and reasoning parsing and
//! the chat template all run on what the fuzzer sends.
#![no_main]

use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::Request;
use dsv3_api::{ApiConfig, Backend, BackendStats, GenerationEvent, GenerationRequest, Health, SubmitError};
use dsv3_engine::{FinishReason, ModelConfig};
use dsv3_text::Tokenizer;
use libfuzzer_sys::fuzz_target;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tower::ServiceExt;

const ENDPOINTS: [&str; 4] = ["/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"];

struct Echo {
    config: ModelConfig,
}

impl Backend for Echo {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn submit(&self, request: GenerationRequest) -> Result<UnboundedReceiver<GenerationEvent>, SubmitError> {
        let (tx, rx) = unbounded_channel();
        let _ = tx.send(GenerationEvent::Scheduled);
        // The prompt's own tokens come back: text the fuzzer chose, through every output parser.
        for &id in request.prompt.iter().rev().take(request.params.max_tokens.min(24)) {
            let _ = tx.send(GenerationEvent::Token {
                id,
                logprob: request.logprobs.map(|_| -0.5),
                top_logprobs: Vec::new(),
            });
        }
        let _ = tx.send(GenerationEvent::Finished {
            reason: FinishReason::Length,
        });
        Ok(rx)
    }

    fn health(&self) -> Health {
        Health {
            ready: true,
            detail: String::new(),
        }
    }

    fn stats(&self) -> BackendStats {
        BackendStats::default()
    }
}

struct World {
    runtime: tokio::runtime::Runtime,
    app: axum::Router,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/golden/tiny-fp8");
        let config = ModelConfig::from_json_str(include_str!("../../tests/golden/tiny-fp8/config.json"))
            .expect("the tiny config");
        let tokenizer = Tokenizer::from_model_dir(std::path::Path::new(dir))
            .expect("the tiny tokenizer")
            .expect("the tiny model has a tokenizer");
        let api = ApiConfig {
            access_log: false,
            ..ApiConfig::new("tiny")
        };
        let app = dsv3_api::router(Arc::new(Echo { config }), Some(tokenizer), api);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        World { runtime, app }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let path = ENDPOINTS[pick as usize % ENDPOINTS.len()];
    let world = world();
    let request = Request::post(path)
        .header("content-type", "application/json")
        .body(Body::from(body.to_vec()))
        .expect("request");
    let status = world.runtime.block_on(async {
        let response = world.app.clone().oneshot(request).await.expect("infallible");
        let status = response.status();
        // Streams run to their end.
        let _ = axum::body::to_bytes(response.into_body(), 64 << 20).await;
        status
    });
    // 404 is a client error too: a request naming another model.
    assert!(
        status.is_success() || status.is_client_error(),
        "{path} answered {status} to {:?}",
        String::from_utf8_lossy(body)
    );
});
