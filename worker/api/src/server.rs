//! The router: shared state, routes, the small endpoints (models, health, ready, metrics), error
//! counting, and serving with graceful shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use async_openai::types::models::{ListModelResponse, Model};
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use dsv3_text::Tokenizer;
use serde_json::json;
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};

use crate::backend::Backend;
use crate::config::ApiConfig;
use crate::error::ApiError;
use crate::metrics::{self, Metrics};
use crate::{access, chat, completions, tokenize};

/// What every handler shares.
pub(crate) struct Shared {
    pub backend: Arc<dyn Backend>,
    pub tokenizer: Option<Tokenizer>,
    pub config: ApiConfig,
    pub metrics: Arc<Metrics>,
    /// When the server started (Unix seconds), shown as the model's `created`.
    pub started: u32,
    /// Compiles `response_format` schemas before they are sent to a rank.
    pub grammars: crate::structured::GrammarCheck,
}

pub(crate) type AppState = Arc<Shared>;

impl Shared {
    /// 404 unless `model` is the served model.
    pub fn check_model(&self, model: &str) -> Result<(), ApiError> {
        if model == self.config.served_model_name {
            Ok(())
        } else {
            Err(ApiError::model_not_found(model, &self.config.served_model_name))
        }
    }
}

/// The HTTP front end over `backend`.
///
/// `tokenizer`: the model directory's tokenizer; without one, text prompts and chat answer 400
/// and token-id prompts still work (generated ids come back in `token_ids`).
pub fn router(backend: Arc<dyn Backend>, tokenizer: Option<Tokenizer>, config: ApiConfig) -> Router {
    let metrics = Arc::new(Metrics::new(backend.clone(), &config.served_model_name));
    let state: AppState = Arc::new(Shared {
        backend,
        tokenizer,
        config,
        metrics,
        started: unix_now(),
        grammars: Default::default(),
    });
    let mut router = Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/models/{*model}", get(get_model))
        .route("/v1/completions", post(completions::create))
        .route("/v1/chat/completions", post(chat::create))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics_text))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), require_api_key))
        .layer(middleware::from_fn_with_state(state.clone(), count_errors));
    if !state.config.cors_origins.is_empty() {
        router = router.layer(cors(&state.config.cors_origins));
    }
    router
        .layer(middleware::from_fn_with_state(state.clone(), access::track))
        .with_state(state)
}

/// Cross-origin access for browsers: the configured origins may call every route (preflights
/// are answered here, before the API key is asked for) and read the request id and Retry-After.
fn cors(origins: &[HeaderValue]) -> CorsLayer {
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().cloned())
    };
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::GET, Method::POST])
        // Whatever the preflight asks for: browser SDKs add their own (the OpenAI one sends
        // `X-Stainless-*`), and the origin list is what guards the API.
        .allow_headers(AllowHeaders::mirror_request())
        .expose_headers([access::REQUEST_ID.clone(), header::RETRY_AFTER])
        .max_age(std::time::Duration::from_secs(3600))
}

/// Runs `work` (tokenization, template rendering: up to seconds for a prompt of megabytes) on
/// the blocking pool, so the runtime's threads go on serving other requests and the probes.
pub(crate) async fn off_runtime<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::internal(format!("tokenization did not finish: {e}")))?
}

/// With an API key configured, `/v1/`, `/tokenize` and `/detokenize` answer only requests
/// bearing it; the probes and the metrics stay open.
async fn require_api_key(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(key) = &state.config.api_key else {
        return next.run(request).await;
    };
    let path = request.uri().path();
    if !(path.starts_with("/v1/") || path == "/tokenize" || path == "/detokenize") {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Compare in constant time: the length is not secret, the content is.
    let matches = presented.is_some_and(|p| {
        p.len() == key.len() && p.bytes().zip(key.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    });
    if matches {
        next.run(request).await
    } else {
        ApiError::unauthorized().into_response()
    }
}

/// Connections the kernel holds for a listener before it accepts them. Tokio's 1,024 overflows
/// when a thousand clients connect at once while every core is busy (the kernel then drops their
/// handshakes and they retry, or on some systems are reset): uvicorn and vLLM take 2,048, the
/// kernel's own cap is `net.core.somaxconn` (4,096 by default).
const LISTEN_BACKLOG: u32 = 4096;

/// A listener on `host:port` (the first address `host` resolves to) with a deep accept queue.
pub async fn bind(host: &str, port: u16) -> std::io::Result<tokio::net::TcpListener> {
    let address = tokio::net::lookup_host((host, port))
        .await?
        .next()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, format!("`{host}` resolves to no address")))?;
    let socket = if address.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Serves `router` on `listener` until ctrl-c or SIGTERM, then lets running requests finish.
pub async fn serve(listener: tokio::net::TcpListener, router: Router) -> std::io::Result<()> {
    serve_with_shutdown(listener, router, shutdown_signal()).await
}

/// Serves `router` on `listener` until `shutdown` completes, then lets running requests finish.
pub async fn serve_with_shutdown(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await
}

/// Completes on ctrl-c or (on Unix) SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            // No handler could be installed: never complete from this branch.
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

pub(crate) fn unix_now() -> u32 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    u32::try_from(secs).unwrap_or(u32::MAX)
}

fn model_card(state: &Shared) -> Model {
    Model {
        id: state.config.served_model_name.clone(),
        object: "model".into(),
        created: state.started,
        owned_by: state.config.owned_by.clone(),
        shutdown_date: None,
    }
}

async fn list_models(State(state): State<AppState>) -> Json<ListModelResponse> {
    Json(ListModelResponse {
        object: "list".into(),
        data: vec![model_card(&state)],
    })
}

async fn get_model(State(state): State<AppState>, Path(model): Path<String>) -> Result<Json<Model>, ApiError> {
    state.check_model(&model)?;
    Ok(Json(model_card(&state)))
}

/// The process is alive.
async fn health() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// 200 when the backend accepts requests, else 503 with what is degraded.
async fn ready(State(state): State<AppState>) -> Response {
    let health = state.backend.health();
    let status = if health.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if health.ready { "ready" } else { "not_ready" },
        "detail": health.detail,
    });
    (status, Json(body)).into_response()
}

async fn metrics_text(State(state): State<AppState>) -> Response {
    match state.metrics.encode() {
        Ok(text) => ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response(),
        Err(_) => ApiError::internal("cannot encode metrics").into_response(),
    }
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::not_found(uri.path())
}

async fn method_not_allowed() -> ApiError {
    ApiError::method_not_allowed()
}

/// Counts error responses by status (`dsv3_http_errors_total`); readiness probes' 503s are not
/// errors of the API.
async fn count_errors(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let probe = request.uri().path() == "/ready";
    let response = next.run(request).await;
    let status = response.status();
    if !probe && (status.is_client_error() || status.is_server_error()) {
        state.metrics.http_error(status.as_u16());
    }
    response
}
