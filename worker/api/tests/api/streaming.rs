//! Server-sent events of both endpoints: chunk order, `[DONE]`, usage, UTF-8, stop strings,
//! failures mid-stream.

use std::sync::Arc;

use axum::http::StatusCode;
use dsv3_engine::FinishReason;
use serde_json::{json, Value};

use crate::common::*;

fn parse(events: &[String]) -> Vec<Value> {
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{events:?}");
    events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap_or_else(|err| panic!("{err}: {e}")))
        .collect()
}

#[tokio::test]
async fn completion_stream_chunks_then_done() {
    let fake = Arc::new(Fake::text("Hello world, again", Ending::Finish(FinishReason::Length)));
    let router = app(fake.clone());
    let (status, events) = post_stream(&router, "/v1/completions", &json!({"prompt": "x", "stream": true})).await;
    assert_eq!(status, StatusCode::OK);
    let chunks = parse(&events);
    assert!(chunks.len() >= 3, "{chunks:?}");
    let (last, content) = chunks.split_last().unwrap();
    let mut text = String::new();
    for c in content {
        assert_eq!(c["object"], "text_completion");
        assert_eq!(c["choices"][0]["index"], 0);
        assert!(c["choices"][0].get("finish_reason").is_none_or(Value::is_null), "{c}");
        text.push_str(c["choices"][0]["text"].as_str().unwrap());
    }
    assert_eq!(text, "Hello world, again");
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    assert_eq!(last["choices"][0]["text"], "");
    // Same id on every chunk; no usage without include_usage.
    assert!(chunks
        .iter()
        .all(|c| c["id"] == chunks[0]["id"] && c["usage"].is_null()));
}

#[tokio::test]
async fn completion_stream_usage_chunk() {
    let fake = Arc::new(Fake::text("Hello", Ending::Finish(FinishReason::Stop)));
    let router = app(fake.clone());
    let (_, events) = post_stream(
        &router,
        "/v1/completions",
        &json!({"prompt": [5, 6, 7], "stream": true, "stream_options": {"include_usage": true}}),
    )
    .await;
    let chunks = parse(&events);
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["prompt_tokens"], 3);
    assert_eq!(usage["usage"]["completion_tokens"], fake.script.len() as u64);
    assert_eq!(usage["usage"]["total_tokens"], 3 + fake.script.len() as u64);
    assert_eq!(chunks[chunks.len() - 2]["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn stream_never_splits_utf8_characters() {
    let text = "Hello, 世界! 🎉 café";
    let fake = Arc::new(Fake::text(text, Ending::Finish(FinishReason::Stop)));
    // The emoji and CJK characters span several byte-level tokens.
    assert!(fake.script.len() > text.split_whitespace().count() + 4);
    let router = app(fake.clone());
    let (_, events) = post_stream(&router, "/v1/completions", &json!({"prompt": "x", "stream": true})).await;
    let chunks = parse(&events);
    let pieces: Vec<String> = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap().to_string())
        .collect();
    assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
    assert_eq!(pieces.concat(), text);
}

#[tokio::test]
async fn stream_stop_string_ends_and_cancels() {
    let fake = Arc::new(Fake::text("Hello world, this is a test.", Ending::Hang));
    let router = app(fake.clone());
    let (status, events) = post_stream(
        &router,
        "/v1/completions",
        &json!({"prompt": "x", "stream": true, "stop": "ld, th", "max_tokens": 100}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let chunks = parse(&events);
    let text: String = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, "Hello wor");
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "stop");
    assert!(fake.wait_cancelled().await);
}

#[tokio::test]
async fn chat_stream_role_content_finish_usage_done() {
    let fake = Arc::new(Fake::text("Hi there!", Ending::Finish(FinishReason::Stop)));
    let router = app(fake.clone());
    let (status, events) = post_stream(
        &router,
        "/v1/chat/completions",
        &json!({
            "model": MODEL, "stream": true, "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": "Hello"}]
        }),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let chunks = parse(&events);
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
    assert!(chunks[0]["id"].as_str().unwrap().starts_with("chatcmpl-"));
    // Role first.
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(chunks[0]["choices"][0]["delta"]["content"], "");
    let n = chunks.len();
    // Usage last, with no choices.
    assert_eq!(chunks[n - 1]["choices"], json!([]));
    assert_eq!(chunks[n - 1]["usage"]["completion_tokens"], fake.script.len() as u64);
    // The finish chunk before it.
    assert_eq!(chunks[n - 2]["choices"][0]["finish_reason"], "stop");
    assert!(chunks[n - 2]["choices"][0]["delta"]["content"].is_null());
    let text: String = chunks[1..n - 2]
        .iter()
        .map(|c| {
            assert!(c["choices"][0].get("finish_reason").is_none_or(Value::is_null));
            c["choices"][0]["delta"]["content"].as_str().unwrap()
        })
        .collect();
    assert_eq!(text, "Hi there!");
}

#[tokio::test]
async fn chat_stream_logprobs() {
    let fake = Arc::new(Fake::text("Hi there", Ending::Finish(FinishReason::Stop)));
    let router = app(fake.clone());
    let (_, events) = post_stream(
        &router,
        "/v1/chat/completions",
        &json!({
            "stream": true, "logprobs": true, "top_logprobs": 3,
            "messages": [{"role": "user", "content": "Hello"}]
        }),
    )
    .await;
    let chunks = parse(&events);
    let entries: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array())
        .flatten()
        .collect();
    assert_eq!(entries.len(), fake.script.len());
    for e in entries {
        assert_eq!(e["top_logprobs"].as_array().unwrap().len(), 3);
    }
}

#[tokio::test]
async fn failure_mid_stream_is_an_error_event_then_done() {
    let fake = Arc::new(Fake::text("Hello world", Ending::Fail("expert worker 3 died".into())));
    let router = app(fake.clone());
    for (path, body) in [
        ("/v1/completions", json!({"prompt": "x", "stream": true})),
        (
            "/v1/chat/completions",
            json!({"stream": true, "messages": [{"role": "user", "content": "Hello"}]}),
        ),
    ] {
        let (status, events) = post_stream(&router, path, &body).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let error: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
        assert!(
            error["error"]["message"]
                .as_str()
                .unwrap()
                .contains("expert worker 3 died"),
            "{error}"
        );
        assert_eq!(error["error"]["type"], "server_error");
    }
}
