//! Bad input and backend refusals: OpenAI error bodies with the right status, and the server keeps
//! serving afterwards.

use std::sync::Arc;

use axum::http::StatusCode;
use dsv3_api::ApiConfig;
use dsv3_engine::FinishReason;
use serde_json::{json, Value};

use crate::common::*;

const COMPLETIONS: &str = "/v1/completions";
const CHAT: &str = "/v1/chat/completions";

async fn expect(router: &axum::Router, path: &str, body: Value, status: StatusCode) -> Value {
    let (got, answer) = post(router, path, &body).await;
    assert_error(got, &answer, status)
}

fn message(error: &Value) -> &str {
    error["message"].as_str().unwrap()
}

#[tokio::test]
async fn bad_requests_get_openai_errors_and_the_server_keeps_serving() {
    let fake = Arc::new(Fake::text("ok", Ending::Finish(FinishReason::Stop)));
    let router = app(fake.clone());
    let user = json!([{"role": "user", "content": "Hi"}]);

    // Malformed JSON, and JSON that is not an object.
    for raw in ["{\"prompt\": ", "not json", "[1, 2]", ""] {
        let (status, text) = post_raw(&router, COMPLETIONS, raw).await;
        let body: Value = serde_json::from_str(&text).unwrap();
        assert_error(status, &body, StatusCode::BAD_REQUEST);
    }

    // Wrong types name the field.
    let e = expect(
        &router,
        COMPLETIONS,
        json!({"prompt": "x", "temperature": "hot"}),
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_eq!(e["param"], "temperature");
    assert!(message(&e).contains("temperature"), "{e}");
    let e = expect(&router, COMPLETIONS, json!({"prompt": 5}), StatusCode::BAD_REQUEST).await;
    assert_eq!(e["param"], "prompt");
    let e = expect(
        &router,
        COMPLETIONS,
        json!({"prompt": [1, -2]}),
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_eq!(e["param"], "prompt");
    let e = expect(
        &router,
        COMPLETIONS,
        json!({"prompt": "x", "max_tokens": "many"}),
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_eq!(e["param"], "max_tokens");
    let e = expect(
        &router,
        COMPLETIONS,
        json!({"prompt": "x", "top_k": "a"}),
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_eq!(e["param"], "top_k");
    let e = expect(
        &router,
        CHAT,
        json!({"messages": [{"role": "user", "content": 5}]}),
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert!(e["param"].as_str().unwrap().starts_with("messages[0]"), "{e}");
    let e = expect(&router, CHAT, json!({"messages": "hi"}), StatusCode::BAD_REQUEST).await;
    assert_eq!(e["param"], "messages");
    let e = expect(
        &router,
        CHAT,
        json!({"messages": [{"role": "robot", "content": "x"}]}),
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert!(e["param"].as_str().unwrap().starts_with("messages[0]"), "{e}");
    expect(
        &router,
        CHAT,
        json!({"messages": user, "stream": "yes"}),
        StatusCode::BAD_REQUEST,
    )
    .await;

    // Unknown model.
    let e = expect(
        &router,
        COMPLETIONS,
        json!({"model": "gpt-9", "prompt": "x"}),
        StatusCode::NOT_FOUND,
    )
    .await;
    assert_eq!(e["code"], "model_not_found");
    assert!(message(&e).contains("gpt-9"));
    let e = expect(
        &router,
        CHAT,
        json!({"model": "gpt-9", "messages": user}),
        StatusCode::NOT_FOUND,
    )
    .await;
    assert_eq!(e["code"], "model_not_found");

    // Empty messages, empty prompts.
    let e = expect(&router, CHAT, json!({"messages": []}), StatusCode::BAD_REQUEST).await;
    assert_eq!(e["param"], "messages");
    for prompt in [json!(""), json!([]), json!([""]), json!([[]])] {
        let e = expect(&router, COMPLETIONS, json!({"prompt": prompt}), StatusCode::BAD_REQUEST).await;
        assert_eq!(e["param"], "prompt", "{prompt}");
        assert!(message(&e).contains("empty"), "{e}");
    }
    // Several prompts, n, echo with logprobs, best_of.
    expect(
        &router,
        COMPLETIONS,
        json!({"prompt": ["a", "b"]}),
        StatusCode::BAD_REQUEST,
    )
    .await;
    let e = expect(
        &router,
        COMPLETIONS,
        json!({"prompt": "x", "n": 0}),
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_eq!(e["param"], "n");
    let e = expect(
        &router,
        CHAT,
        json!({"messages": user, "n": 129}),
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_eq!(e["param"], "n");
    let e = expect(
        &router,
        COMPLETIONS,
        json!({"prompt": "x", "echo": true, "logprobs": 2}),
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_eq!(e["param"], "echo");
    expect(
        &router,
        COMPLETIONS,
        json!({"prompt": "x", "best_of": 2}),
        StatusCode::BAD_REQUEST,
    )
    .await;

    // The context.
    let context = model_config().max_position_embeddings;
    let long: Vec<u32> = vec![5; context + 44];
    let e = expect(&router, COMPLETIONS, json!({"prompt": long}), StatusCode::BAD_REQUEST).await;
    assert!(
        message(&e).contains(&(context + 44).to_string()) && message(&e).contains(&context.to_string()),
        "{e}"
    );
    let long_text = "word ".repeat(context);
    let e = expect(
        &router,
        CHAT,
        json!({"messages": [{"role": "user", "content": long_text}]}),
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_eq!(e["param"], "messages");
    let e = expect(
        &router,
        COMPLETIONS,
        json!({"prompt": vec![5; 100], "max_tokens": context}),
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_eq!(e["param"], "max_tokens");
    assert!(
        message(&e).contains("100") && message(&e).contains(&context.to_string()),
        "{e}"
    );
    let e = expect(
        &router,
        CHAT,
        json!({"messages": user, "max_completion_tokens": context}),
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_eq!(e["param"], "max_completion_tokens");
    expect(
        &router,
        COMPLETIONS,
        json!({"prompt": "x", "max_tokens": 0}),
        StatusCode::BAD_REQUEST,
    )
    .await;

    // Sampling ranges.
    for t in [-0.1, 2.5] {
        let e = expect(
            &router,
            COMPLETIONS,
            json!({"prompt": "x", "temperature": t}),
            StatusCode::BAD_REQUEST,
        )
        .await;
        assert_eq!(e["param"], "temperature");
        let e = expect(
            &router,
            CHAT,
            json!({"messages": user, "temperature": t}),
            StatusCode::BAD_REQUEST,
        )
        .await;
        assert_eq!(e["param"], "temperature");
    }
    for p in [0.0, 1.5, -1.0] {
        let e = expect(
            &router,
            COMPLETIONS,
            json!({"prompt": "x", "top_p": p}),
            StatusCode::BAD_REQUEST,
        )
        .await;
        assert_eq!(e["param"], "top_p");
    }
    expect(
        &router,
        COMPLETIONS,
        json!({"prompt": "x", "top_k": -2}),
        StatusCode::BAD_REQUEST,
    )
    .await;
    expect(
        &router,
        COMPLETIONS,
        json!({"prompt": "x", "logprobs": 21}),
        StatusCode::BAD_REQUEST,
    )
    .await;
    expect(
        &router,
        CHAT,
        json!({"messages": user, "top_logprobs": 2}),
        StatusCode::BAD_REQUEST,
    )
    .await;
    expect(
        &router,
        CHAT,
        json!({"messages": user, "logprobs": true, "top_logprobs": 21}),
        StatusCode::BAD_REQUEST,
    )
    .await;
    expect(
        &router,
        CHAT,
        json!({"messages": user, "presence_penalty": 2.5}),
        StatusCode::BAD_REQUEST,
    )
    .await;
    expect(
        &router,
        CHAT,
        json!({"messages": user, "response_format": {"type": "yaml"}}),
        StatusCode::BAD_REQUEST,
    )
    .await;

    // Token ids outside the vocabulary.
    let vocab = model_config().vocab_size;
    let e = expect(
        &router,
        COMPLETIONS,
        json!({"prompt": [5, vocab + 7]}),
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert!(message(&e).contains(&(vocab + 7).to_string()), "{e}");
    let e = expect(
        &router,
        COMPLETIONS,
        json!({"prompt": [5], "stop_token_ids": [vocab]}),
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_eq!(e["param"], "stop_token_ids");

    // Image content parts are refused by the text layer.
    expect(
        &router,
        CHAT,
        json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}),
        StatusCode::BAD_REQUEST,
    )
    .await;

    // Unknown paths and methods.
    let (status, text) = get(&router, "/v2/nothing").await;
    assert_error(status, &serde_json::from_str(&text).unwrap(), StatusCode::NOT_FOUND);
    let (status, text) = get(&router, COMPLETIONS).await;
    assert_error(
        status,
        &serde_json::from_str(&text).unwrap(),
        StatusCode::METHOD_NOT_ALLOWED,
    );

    // None of that reached the backend, and the server still serves.
    assert_eq!(fake.submissions(), 0);
    let (status, body) = post(&router, COMPLETIONS, &json!({"prompt": "x"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = post(&router, CHAT, &json!({"messages": user})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn oversized_body_is_413() {
    let fake = Arc::new(Fake::text("ok", Ending::Finish(FinishReason::Stop)));
    let config = ApiConfig {
        max_body_bytes: 1000,
        ..ApiConfig::new(MODEL)
    };
    let router = app_with(fake.clone(), Some(tokenizer()), config);
    let big = json!({"prompt": "x".repeat(2000)});
    let (status, text) = post_raw(&router, COMPLETIONS, big.to_string()).await;
    let e = assert_error(
        status,
        &serde_json::from_str(&text).unwrap(),
        StatusCode::PAYLOAD_TOO_LARGE,
    );
    assert!(message(&e).contains("1000"), "{e}");
    let (status, _) = post(&router, COMPLETIONS, &json!({"prompt": "x"})).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn queue_full_is_429_and_not_ready_is_503() {
    let full = Arc::new(Fake::text("ok", Ending::Finish(FinishReason::Stop)).with_mode(Mode::Full));
    let router = app(full);
    let e = expect(
        &router,
        COMPLETIONS,
        json!({"prompt": "x"}),
        StatusCode::TOO_MANY_REQUESTS,
    )
    .await;
    assert_eq!(e["type"], "rate_limit_error");
    expect(
        &router,
        CHAT,
        json!({"messages": [{"role": "user", "content": "Hi"}], "stream": true}),
        StatusCode::TOO_MANY_REQUESTS,
    )
    .await;

    let down = Arc::new(
        Fake::text("ok", Ending::Finish(FinishReason::Stop)).with_mode(Mode::NotReady("expert shard 2 lost".into())),
    );
    let router = app(down);
    let e = expect(
        &router,
        COMPLETIONS,
        json!({"prompt": "x"}),
        StatusCode::SERVICE_UNAVAILABLE,
    )
    .await;
    assert!(message(&e).contains("expert shard 2 lost"), "{e}");
}

#[tokio::test]
async fn backend_failure_is_500_with_the_message() {
    let fake = Arc::new(Fake::text("Hello", Ending::Fail("attention rank 1 died".into())));
    let router = app(fake);
    let e = expect(
        &router,
        COMPLETIONS,
        json!({"prompt": "x"}),
        StatusCode::INTERNAL_SERVER_ERROR,
    )
    .await;
    assert!(message(&e).contains("attention rank 1 died"), "{e}");
    assert_eq!(e["type"], "server_error");
    let e = expect(
        &router,
        CHAT,
        json!({"messages": [{"role": "user", "content": "Hi"}]}),
        StatusCode::INTERNAL_SERVER_ERROR,
    )
    .await;
    assert!(message(&e).contains("attention rank 1 died"), "{e}");
}

#[tokio::test]
async fn an_api_key_guards_the_v1_routes_but_not_the_probes() {
    let fake = Arc::new(Fake::new(vec![5, 6], Ending::Finish(FinishReason::Length)));
    let mut config = ApiConfig::new(MODEL);
    config.api_key = Some("s3cret".into());
    let app = app_with(fake, Some(tokenizer()), config);
    let body = serde_json::json!({"prompt": "hi", "max_tokens": 2}).to_string();
    let call = |auth: Option<&'static str>| {
        let mut builder = axum::http::Request::post("/v1/completions").header("content-type", "application/json");
        if let Some(a) = auth {
            builder = builder.header("authorization", a);
        }
        builder.body(axum::body::Body::from(body.clone())).expect("request")
    };
    use tower::ServiceExt;
    let missing = app.clone().oneshot(call(None)).await.expect("response");
    assert_eq!(missing.status(), 401);
    let wrong = app.clone().oneshot(call(Some("Bearer nope"))).await.expect("response");
    assert_eq!(wrong.status(), 401);
    let right = app
        .clone()
        .oneshot(call(Some("Bearer s3cret")))
        .await
        .expect("response");
    assert_eq!(right.status(), 200);
    let health = app
        .clone()
        .oneshot(
            axum::http::Request::get("/health")
                .body(axum::body::Body::empty())
                .expect("req"),
        )
        .await
        .expect("response");
    assert_eq!(health.status(), 200);
}
