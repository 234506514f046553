//! Every request's id (`X-Request-Id`: the client's, or made here), returned on the response and
//! used in the completion's `id`, and one JSON access-log line per request on stderr.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use serde_json::json;

use crate::server::AppState;

pub(crate) static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest client request id taken (vLLM and proxies send UUIDs, 36 characters).
const MAX_ID_LEN: usize = 128;

/// The id of one HTTP request, in the request's extensions for the handlers.
#[derive(Clone, Debug)]
pub(crate) struct RequestId(pub String);

/// A client id: 1 to [`MAX_ID_LEN`] visible ASCII characters (it is echoed in a header and logged).
fn client_id(value: &HeaderValue) -> Option<String> {
    let text = value.to_str().ok()?;
    let ok = !text.is_empty() && text.len() <= MAX_ID_LEN && text.bytes().all(|b| b.is_ascii_graphic());
    ok.then(|| text.to_string())
}

/// 16 random hex digits.
pub(crate) fn random_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS per process and advanced per instance.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    format!("{:016x}", h.finish())
}

/// Gives the request its id, answers with it in `X-Request-Id`, and logs the request when its
/// response (for a stream, its head) is ready. A client id that is not 1–128 visible ASCII
/// characters is replaced by a made one (the response says which), so no proxy's id scheme can
/// fail a request or a probe.
pub(crate) async fn track(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().to_string();
    let path = request.uri().path().to_string();
    let id = request
        .headers()
        .get(&REQUEST_ID)
        .and_then(client_id)
        .unwrap_or_else(random_id);
    request.extensions_mut().insert(RequestId(id.clone()));
    let mut response = next.run(request).await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID.clone(), value);
    }
    if state.config.access_log {
        let line = json!({
            "time_ms": SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
            "request_id": id,
            "method": method,
            "path": path,
            "status": response.status().as_u16(),
            "latency_ms": (started.elapsed().as_secs_f64() * 1e3 * 1000.0).round() / 1000.0,
        });
        eprintln!("{line}");
    }
    response
}
