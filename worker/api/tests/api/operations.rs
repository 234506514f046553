//! What operators rely on around the API: request ids, `Retry-After`, tokenization endpoints, CORS.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use dsv3_engine::FinishReason;
use serde_json::{json, Value};
use tower::ServiceExt;

use crate::common::*;

/// POSTs JSON with extra headers; the status, the headers and the JSON body.
async fn post_with(
    router: &axum::Router,
    path: &str,
    headers: &[(&str, &str)],
    body: &Value,
) -> (StatusCode, HeaderMap, Value) {
    let mut request = Request::post(path).header("content-type", "application/json");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = router
        .clone()
        .oneshot(request.body(Body::from(body.to_string())).expect("request"))
        .await
        .expect("infallible");
    let (status, headers) = (response.status(), response.headers().clone());
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("body");
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, headers, json)
}

fn fake() -> Arc<Fake> {
    Arc::new(Fake::text("ok", Ending::Finish(FinishReason::Stop)))
}

#[tokio::test]
async fn request_ids_are_taken_or_made_and_name_the_completion() {
    let router = app(fake());
    let body = json!({"prompt": "x", "max_tokens": 2});
    let given = "3b241101-e2bb-4255-8caf-4136c566a962";
    let (status, headers, json) = post_with(&router, "/v1/completions", &[("x-request-id", given)], &body).await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(headers["x-request-id"], given);
    assert_eq!(json["id"], format!("cmpl-{given}"));

    let chat = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
    let (_, headers, json) = post_with(&router, "/v1/chat/completions", &[], &chat).await;
    let made = headers["x-request-id"].to_str().expect("ascii");
    assert!(
        made.len() == 16 && made.bytes().all(|b| b.is_ascii_hexdigit()),
        "{made}"
    );
    assert_eq!(json["id"], format!("chatcmpl-{made}"));
    let (_, again, _) = post_with(&router, "/v1/chat/completions", &[], &chat).await;
    assert_ne!(
        again["x-request-id"], headers["x-request-id"],
        "each request gets its own id"
    );

    // Errors carry the id too; a malformed id is refused by name.
    let (status, headers, _) = post_with(&router, "/v1/nowhere", &[("x-request-id", "abc")], &body).await;
    assert_eq!(
        (status, &headers["x-request-id"]),
        (StatusCode::NOT_FOUND, &"abc".parse().expect("value"))
    );
    for bad in ["has space", &"x".repeat(129)] {
        let (status, _, json) = post_with(&router, "/v1/completions", &[("x-request-id", bad)], &body).await;
        let error = assert_error(status, &json, StatusCode::BAD_REQUEST);
        assert!(
            error["message"].as_str().is_some_and(|m| m.contains("X-Request-Id")),
            "{json}"
        );
    }
}

#[tokio::test]
async fn a_full_queue_says_when_to_retry() {
    let full = Arc::new(Fake::text("ok", Ending::Finish(FinishReason::Stop)).with_mode(Mode::Full));
    let router = app(full);
    let (status, headers, json) = post_with(&router, "/v1/completions", &[], &json!({"prompt": "x"})).await;
    assert_error(status, &json, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers["retry-after"], "1");
    // Other errors do not.
    let (status, headers, _) = post_with(&app(fake()), "/v1/completions", &[], &json!({"prompt": ""})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(headers.get("retry-after").is_none());
}
