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

    // Errors carry the id too; a malformed one is replaced by a made one, and probes never fail on it.
    let (status, headers, _) = post_with(&router, "/v1/nowhere", &[("x-request-id", "abc")], &body).await;
    assert_eq!(
        (status, &headers["x-request-id"]),
        (StatusCode::NOT_FOUND, &"abc".parse().expect("value"))
    );
    for bad in ["has space", &"x".repeat(129)] {
        let (status, headers, json) = post_with(&router, "/v1/completions", &[("x-request-id", bad)], &body).await;
        assert_eq!(status, StatusCode::OK, "{json}");
        let made = headers["x-request-id"].to_str().expect("ascii");
        assert!(made.len() == 16 && made != bad, "{made}");
        assert_eq!(json["id"], format!("cmpl-{made}"));
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

/// The DeepSeek-V3 tokenizer and its Python references (tests/golden/tokenizer/make_refs.py).
fn deepseek_tokenizer() -> (dsv3_text::Tokenizer, Value) {
    let dir = tiny_dir().join("../tokenizer");
    let tokenizer = dsv3_text::Tokenizer::from_model_dir(&dir.join("deepseek-v3"))
        .expect("load")
        .expect("tokenizer.json");
    let refs = serde_json::from_str(&std::fs::read_to_string(dir.join("refs.json")).expect("refs")).expect("json");
    (tokenizer, refs)
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("ids")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

#[tokio::test]
async fn tokenize_and_detokenize_match_the_python_tokenizer() {
    let (tokenizer, refs) = deepseek_tokenizer();
    let router = app_with(fake(), Some(tokenizer), dsv3_api::ApiConfig::new(MODEL));
    let max_model_len = model_config().max_position_embeddings;
    for case in refs["text"].as_array().expect("text cases") {
        let (name, text) = (&case["name"], &case["text"]);
        if text == "" {
            continue;
        }
        for (special, key) in [(true, "ids_add_special"), (false, "ids_no_special")] {
            let body =
                json!({"model": MODEL, "prompt": text, "add_special_tokens": special, "return_token_strs": true});
            let (status, json) = post(&router, "/tokenize", &body).await;
            assert_eq!(status, StatusCode::OK, "{name}: {json}");
            assert_eq!(ids(&json["tokens"]), ids(&case[key]), "{name}: {key}");
            assert_eq!(json["count"], case[key].as_array().expect("ids").len(), "{name}");
            assert_eq!(json["max_model_len"], max_model_len, "{name}");
            assert_eq!(
                json["token_strs"].as_array().map(Vec::len),
                Some(ids(&case[key]).len()),
                "{name}"
            );
        }
        let (status, json) = post(&router, "/detokenize", &json!({"tokens": case["ids_add_special"]})).await;
        assert_eq!(status, StatusCode::OK, "{name}: {json}");
        assert_eq!(json["prompt"], case["decode_add_special_keep"], "{name}: detokenize");
    }
    let mut chats = 0;
    for case in refs["chat"].as_array().expect("chat cases") {
        if case.get("template").is_some() || case["kwargs"].as_object().is_some_and(|k| !k.is_empty()) {
            continue; // cases for another template, or template arguments the endpoint passes alike
        }
        let body = json!({
            "messages": case["messages"],
            "tools": case["tools"],
            "add_generation_prompt": case["add_generation_prompt"],
        });
        let (status, json) = post(&router, "/tokenize", &body).await;
        assert_eq!(status, StatusCode::OK, "{}: {json}", case["name"]);
        assert_eq!(ids(&json["tokens"]), ids(&case["ids"]), "{}", case["name"]);
        assert_eq!(json["token_strs"], Value::Null);
        chats += 1;
    }
    assert!(chats >= 10, "only {chats} chat cases compared");
}

#[tokio::test]
async fn tokenize_refuses_what_it_cannot_honour() {
    let router = app(fake());
    let cases = [
        (
            json!({"prompt": "x", "messages": []}),
            StatusCode::BAD_REQUEST,
            "exactly one of",
        ),
        (json!({}), StatusCode::BAD_REQUEST, "exactly one of"),
        (
            json!({"prompt": "x", "continue_final_message": true}),
            StatusCode::BAD_REQUEST,
            "continue_final_message",
        ),
        (
            json!({"prompt": "x", "add_generation_prompt": true}),
            StatusCode::BAD_REQUEST,
            "apply to `messages`",
        ),
        (json!({"prompt": "x", "model": "other"}), StatusCode::NOT_FOUND, "other"),
        (json!({"prompt": 5}), StatusCode::BAD_REQUEST, "prompt"),
    ];
    for (body, expected, words) in cases {
        let (status, json) = post(&router, "/tokenize", &body).await;
        let error = assert_error(status, &json, expected);
        assert!(
            error["message"].as_str().is_some_and(|m| m.contains(words)),
            "{body}: {json}"
        );
    }
    let vocab = tokenizer().vocab_size();
    let (status, json) = post(&router, "/detokenize", &json!({"tokens": [1, vocab]})).await;
    let error = assert_error(status, &json, StatusCode::BAD_REQUEST);
    assert_eq!(error["param"], "tokens");
    let bare = app_with(fake(), None, dsv3_api::ApiConfig::new(MODEL));
    let (status, json) = post(&bare, "/tokenize", &json!({"prompt": "x"})).await;
    assert_error(status, &json, StatusCode::BAD_REQUEST);
    // With an API key the endpoints need it, as /v1/ does.
    let mut config = dsv3_api::ApiConfig::new(MODEL);
    config.api_key = Some("k".into());
    let guarded = app_with(fake(), Some(tokenizer()), config);
    let (status, _) = post(&guarded, "/tokenize", &json!({"prompt": "x"})).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

/// Tokenizing runs on the blocking pool: on this single-threaded runtime, `/health` answers while
/// four prompts of 3.5 MB are still being tokenized.
#[tokio::test]
async fn large_prompts_do_not_stall_the_probes() {
    let mut config = dsv3_api::ApiConfig::new(MODEL);
    config.max_body_bytes = 8 << 20;
    let router = app_with(fake(), Some(tokenizer()), config);
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let prompt = "The quick brown fox jumps over the lazy dog. ".repeat(3_500_000 / 45);
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (router, done, body) = (router.clone(), done.clone(), json!({"prompt": prompt}));
        tasks.push(tokio::spawn(async move {
            let (status, json) = post(&router, "/tokenize", &body).await;
            assert_eq!(status, StatusCode::OK);
            done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            json["count"].as_u64().expect("count")
        }));
    }
    // Let every tokenize request reach the blocking pool first.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    let (status, _) = get(&router, "/health").await;
    assert_eq!(status, StatusCode::OK);
    let finished = done.load(std::sync::atomic::Ordering::SeqCst);
    assert!(finished < 4, "/health waited for all {finished} tokenizations");
    for task in tasks {
        assert!(task.await.expect("task") > 500_000);
    }
}

async fn request_with(router: &axum::Router, request: Request<Body>) -> (StatusCode, HeaderMap) {
    let response = router.clone().oneshot(request).await.expect("infallible");
    (response.status(), response.headers().clone())
}

#[tokio::test]
async fn cors_answers_the_configured_origins_only() {
    let preflight = |origin: &str| {
        Request::options("/v1/chat/completions")
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization,content-type,x-stainless-os",
            )
            .body(Body::empty())
            .expect("request")
    };
    let mut config = dsv3_api::ApiConfig::new(MODEL);
    config.api_key = Some("k".into());
    config.cors_origins = vec!["https://app.example".parse().expect("origin")];
    let router = app_with(fake(), Some(tokenizer()), config.clone());
    // The preflight is answered before the API key is asked for.
    let (status, headers) = request_with(&router, preflight("https://app.example")).await;
    assert!(status.is_success(), "{status}");
    assert_eq!(headers["access-control-allow-origin"], "https://app.example");
    let methods = headers["access-control-allow-methods"]
        .to_str()
        .expect("ascii")
        .to_lowercase();
    assert!(methods.contains("post"), "{methods}");
    let allowed = headers["access-control-allow-headers"]
        .to_str()
        .expect("ascii")
        .to_lowercase();
    assert!(
        allowed.contains("authorization") && allowed.contains("content-type"),
        "{allowed}"
    );
    // Another origin gets no grant.
    let (_, headers) = request_with(&router, preflight("https://evil.example")).await;
    assert!(headers.get("access-control-allow-origin").is_none());
    // The real request carries the grant and exposes the request id.
    let request = Request::get("/v1/models")
        .header("origin", "https://app.example")
        .header("authorization", "Bearer k")
        .body(Body::empty())
        .expect("request");
    let (status, headers) = request_with(&router, request).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["access-control-allow-origin"], "https://app.example");
    let exposed = headers["access-control-expose-headers"]
        .to_str()
        .expect("ascii")
        .to_lowercase();
    assert!(
        exposed.contains("x-request-id") && exposed.contains("retry-after"),
        "{exposed}"
    );

    config.cors_origins = vec!["*".parse().expect("origin")];
    let any = app_with(fake(), Some(tokenizer()), config);
    let (_, headers) = request_with(&any, preflight("https://anywhere.example")).await;
    assert_eq!(headers["access-control-allow-origin"], "*");

    // Without configured origins: no CORS headers, and OPTIONS is not a method of the API.
    let (status, headers) = request_with(&app(fake()), preflight("https://app.example")).await;
    assert!(headers.get("access-control-allow-origin").is_none());
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
}

/// The listener `bind` makes queues a burst of connections bigger than Tokio's default backlog
/// (1,024) before the server accepts any: none is dropped or reset while every core is busy.
#[tokio::test]
async fn the_listener_queues_fifteen_hundred_connections_before_the_first_accept() {
    const BURST: usize = 1500;
    let cap: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if cap < BURST {
        eprintln!("skipped: net.core.somaxconn is {cap}, below the burst");
        return;
    }
    let listener = dsv3_api::bind("127.0.0.1", 0).await.expect("bind");
    let address = listener.local_addr().expect("address");
    let mut clients = Vec::with_capacity(BURST);
    for i in 0..BURST {
        let connect = tokio::net::TcpStream::connect(address);
        let stream = tokio::time::timeout(std::time::Duration::from_secs(2), connect)
            .await
            .unwrap_or_else(|_| panic!("connection {i} was not queued"))
            .expect("connect");
        clients.push(stream);
    }
    for _ in 0..BURST {
        listener.accept().await.expect("accept");
    }
}
