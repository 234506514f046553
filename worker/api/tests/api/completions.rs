//! `/v1/completions` (non-streamed), `/v1/models`, `/health`, `/ready`.

use std::sync::Arc;

use axum::http::StatusCode;
use dsv3_api::ApiConfig;
use dsv3_engine::FinishReason;
use serde_json::{json, Value};

use crate::common::*;

#[tokio::test]
async fn models_lists_the_served_model() {
    let router = app(Arc::new(Fake::new(vec![], Ending::Finish(FinishReason::Stop))));
    let (status, body) = get(&router, "/v1/models").await;
    assert_eq!(status, StatusCode::OK);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["object"], "list");
    assert_eq!(body["data"][0]["id"], MODEL);
    assert_eq!(body["data"][0]["object"], "model");

    let (status, body) = get(&router, "/v1/models/tiny").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = get(&router, "/v1/models/other").await;
    let body: Value = serde_json::from_str(&body).unwrap();
    let error = assert_error(status, &body, StatusCode::NOT_FOUND);
    assert_eq!(error["code"], "model_not_found");
}

#[tokio::test]
async fn health_and_ready() {
    let router = app(Arc::new(Fake::new(vec![], Ending::Finish(FinishReason::Stop))));
    assert_eq!(get(&router, "/health").await.0, StatusCode::OK);
    let (status, body) = get(&router, "/ready").await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let fake =
        Fake::new(vec![], Ending::Finish(FinishReason::Stop)).with_mode(Mode::NotReady("loading experts".into()));
    let router = app(Arc::new(fake));
    assert_eq!(get(&router, "/health").await.0, StatusCode::OK);
    let (status, body) = get(&router, "/ready").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("loading experts"), "{body}");
}

#[tokio::test]
async fn text_prompt_completes() {
    let fake = Arc::new(Fake::text("Hello world", Ending::Finish(FinishReason::Stop)));
    let router = app(fake.clone());
    let (status, body) = post(&router, "/v1/completions", &json!({"model": MODEL, "prompt": "Say hi"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["object"], "text_completion");
    assert!(body["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(body["model"], MODEL);
    assert_eq!(body["choices"][0]["text"], "Hello world");
    assert_eq!(body["choices"][0]["index"], 0);
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert!(body["choices"][0].get("token_ids").is_none());

    let prompt = tokenizer().encode("Say hi", true).unwrap();
    assert_eq!(prompt[0], 0, "BOS added to text prompts");
    let request = fake.last_request();
    assert_eq!(request.prompt, prompt);
    assert_eq!(request.params.max_tokens, 16, "OpenAI's default");
    assert_eq!(request.params.temperature, 1.0, "OpenAI's default");
    assert_eq!(request.params.top_p, 1.0);
    assert_eq!(request.logprobs, None);

    let generated = fake.script.len() as u64;
    assert_eq!(body["usage"]["prompt_tokens"], prompt.len() as u64);
    assert_eq!(body["usage"]["completion_tokens"], generated);
    assert_eq!(body["usage"]["total_tokens"], prompt.len() as u64 + generated);
}

#[tokio::test]
async fn prompt_forms() {
    let fake = Arc::new(Fake::text("ok", Ending::Finish(FinishReason::Stop)));
    let router = app(fake.clone());
    let text_ids = tokenizer().encode("Say hi", true).unwrap();
    for (prompt, expected) in [
        (json!(["Say hi"]), text_ids.clone()),
        (json!([5, 77, 3]), vec![5, 77, 3]),
        (json!([[5, 77]]), vec![5, 77]),
    ] {
        let (status, body) = post(&router, "/v1/completions", &json!({"prompt": prompt})).await;
        assert_eq!(status, StatusCode::OK, "{prompt}: {body}");
        assert_eq!(fake.last_request().prompt, expected, "{prompt}");
        assert_eq!(body["choices"][0]["text"], "ok");
    }
}

#[tokio::test]
async fn sampling_fields_reach_the_backend() {
    let fake = Arc::new(Fake::text("ok", Ending::Finish(FinishReason::Stop)));
    let router = app(fake.clone());
    let (status, body) = post(
        &router,
        "/v1/completions",
        &json!({
            "model": MODEL, "prompt": [5, 6], "max_tokens": 10, "temperature": 0.5, "top_p": 0.9,
            "top_k": 5, "seed": 42, "stop_token_ids": [7], "ignore_eos": true,
            "presence_penalty": 0, "user": "someone", "unknown_field": {"x": 1}
        }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let p = fake.last_request().params;
    assert_eq!(p.max_tokens, 10);
    assert_eq!(p.temperature, 0.5);
    assert_eq!(p.top_p, 0.9);
    assert_eq!(p.top_k, 5);
    assert_eq!(p.seed, Some(42));
    assert_eq!(p.stop_token_ids, vec![7]);
    assert!(p.ignore_eos);

    // top_k -1 means no cut; temperature 0 is greedy.
    let (status, _) = post(
        &router,
        "/v1/completions",
        &json!({"prompt": [5], "top_k": -1, "temperature": 0}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let p = fake.last_request().params;
    assert_eq!((p.top_k, p.temperature), (0, 0.0));
}

/// Fields a request leaves out come from the model's generation_config.json (as in transformers
/// and vLLM); fields it gives win.
#[tokio::test]
async fn the_models_generation_config_fills_in_sampling_defaults() {
    // DeepSeek-R1's generation_config.json.
    let r1 = r#"{"_from_model_config": true, "bos_token_id": 0, "eos_token_id": 1, "do_sample": true,
                 "temperature": 0.6, "top_p": 0.95, "transformers_version": "4.46.3"}"#;
    let (defaults, not_applied) = dsv3_api::SamplingDefaults::from_generation_config(r1).expect("parse");
    assert_eq!(
        (defaults.temperature, defaults.top_p, defaults.top_k),
        (Some(0.6), Some(0.95), None)
    );
    assert!(not_applied.is_empty());
    let fake = Arc::new(Fake::text("ok", Ending::Finish(FinishReason::Stop)));
    let mut config = ApiConfig::new(MODEL);
    config.sampling_defaults = defaults;
    let router = app_with(fake.clone(), Some(tokenizer()), config);
    for (path, body) in [
        ("/v1/completions", json!({"prompt": "x", "max_tokens": 2})),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}),
        ),
    ] {
        assert_eq!(post(&router, path, &body).await.0, StatusCode::OK, "{path}");
        let p = fake.last_request().params;
        assert_eq!((p.temperature, p.top_p), (0.6, 0.95), "{path}");
    }
    let body = json!({"prompt": "x", "max_tokens": 2, "temperature": 0, "top_p": 1});
    assert_eq!(post(&router, "/v1/completions", &body).await.0, StatusCode::OK);
    let p = fake.last_request().params;
    assert_eq!((p.temperature, p.top_p), (0.0, 1.0));

    // do_sample false: greedy unless asked; keys the server cannot apply are named.
    let greedy = r#"{"do_sample": false, "temperature": 0.7, "min_p": 0.1, "top_k": 20}"#;
    let (defaults, not_applied) = dsv3_api::SamplingDefaults::from_generation_config(greedy).expect("parse");
    assert_eq!((defaults.temperature, defaults.top_k), (Some(0.0), Some(20)));
    assert_eq!(not_applied, vec!["min_p".to_string()]);
    for (json, key) in [
        (r#"{"top_p": "high"}"#, "top_p"),
        (r#"{"top_p": 0}"#, "top_p"),
        (r#"{"temperature": 3.5}"#, "temperature"),
        (r#"{"top_k": 2.5}"#, "top_k"),
    ] {
        let bad = dsv3_api::SamplingDefaults::from_generation_config(json).expect_err(json);
        assert!(bad.contains(key), "{bad}");
    }
}

#[tokio::test]
async fn default_max_tokens_fits_the_context() {
    let fake = Arc::new(Fake::text("ok", Ending::Finish(FinishReason::Length)));
    let router = app(fake.clone());
    let context = model_config().max_position_embeddings;
    let prompt: Vec<u32> = vec![5; context - 4];
    let (status, body) = post(&router, "/v1/completions", &json!({"prompt": prompt})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(fake.last_request().params.max_tokens, 4);
}

#[tokio::test]
async fn length_and_context_full_finish_as_length() {
    for reason in [FinishReason::Length, FinishReason::ContextFull] {
        let router = app(Arc::new(Fake::text("abc", Ending::Finish(reason))));
        let (status, body) = post(&router, "/v1/completions", &json!({"prompt": "x"})).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["choices"][0]["finish_reason"], "length", "{reason:?}");
    }
}

#[tokio::test]
async fn eos_text_is_not_in_the_output() {
    let mut ids = tokenizer().encode("Hi there", false).unwrap();
    ids.push(1); // <｜end▁of▁sentence｜>
    let router = app(Arc::new(Fake::new(ids.clone(), Ending::Finish(FinishReason::Stop))));
    let (_, body) = post(&router, "/v1/completions", &json!({"prompt": "x"})).await;
    assert_eq!(body["choices"][0]["text"], "Hi there");
    assert_eq!(body["usage"]["completion_tokens"], ids.len() as u64);
}

#[tokio::test]
async fn stop_string_across_token_boundaries() {
    let fake = Arc::new(Fake::text("Hello world, this is a test.", Ending::Hang));
    let router = app(fake.clone());
    // "ld, th" spans several tokens; the fake would generate forever without the stop string.
    let (status, body) = post(
        &router,
        "/v1/completions",
        &json!({"prompt": "x", "stop": ["zzz", "ld, th"], "max_tokens": 100}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["choices"][0]["text"], "Hello wor");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert!(
        fake.wait_cancelled().await,
        "the stop string must cancel the backend request"
    );

    let (_, body) = post(&router, "/v1/completions", &json!({"prompt": "x", "stop": "is"})).await;
    assert_eq!(body["choices"][0]["text"], "Hello world, th");
}

#[tokio::test]
async fn completion_logprobs_legacy_format() {
    let fake = Arc::new(Fake::text("Hello world", Ending::Finish(FinishReason::Stop)));
    let router = app(fake.clone());
    let (status, body) = post(&router, "/v1/completions", &json!({"prompt": "x", "logprobs": 2})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(fake.last_request().logprobs, Some(2));
    let lp = &body["choices"][0]["logprobs"];
    let n = fake.script.len();
    let tokens: Vec<&str> = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(tokens.len(), n);
    assert_eq!(tokens.concat(), "Hello world");
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), n);
    assert_eq!(lp["token_logprobs"][0], -0.25);
    let tops = lp["top_logprobs"].as_array().unwrap();
    assert_eq!(tops.len(), n);
    for top in tops {
        let top = top.as_object().unwrap();
        // Two alternatives plus the chosen token.
        assert!((2..=3).contains(&top.len()), "{top:?}");
    }
    let offsets: Vec<u64> = lp["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap())
        .collect();
    assert_eq!(offsets.len(), n);
    assert_eq!(offsets[0], 0);
    let mut expected = 0;
    for (token, offset) in tokens.iter().zip(&offsets) {
        assert_eq!(*offset, expected);
        expected += token.chars().count() as u64;
    }
}

#[tokio::test]
async fn without_tokenizer_token_ids_come_back() {
    let fake = Arc::new(Fake::new(vec![10, 11, 12], Ending::Finish(FinishReason::Length)));
    let router = app_with(fake.clone(), None, ApiConfig::new(MODEL));
    let (status, body) = post(&router, "/v1/completions", &json!({"prompt": [5, 6], "logprobs": 1})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["choices"][0]["text"], "");
    assert_eq!(body["choices"][0]["token_ids"], json!([10, 11, 12]));
    assert_eq!(body["choices"][0]["logprobs"]["tokens"][0], "token_id:10");

    let (status, body) = post(&router, "/v1/completions", &json!({"prompt": "text"})).await;
    let error = assert_error(status, &body, StatusCode::BAD_REQUEST);
    assert!(error["message"].as_str().unwrap().contains("no tokenizer"), "{error}");
    let (status, body) = post(
        &router,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    let error = assert_error(status, &body, StatusCode::BAD_REQUEST);
    assert!(error["message"].as_str().unwrap().contains("no tokenizer"), "{error}");
    let (status, body) = post(&router, "/v1/completions", &json!({"prompt": [5], "stop": "x"})).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn return_token_ids_extension() {
    let fake = Arc::new(Fake::text("Hi", Ending::Finish(FinishReason::Stop)));
    let router = app(fake.clone());
    let (_, body) = post(
        &router,
        "/v1/completions",
        &json!({"prompt": "x", "return_token_ids": true}),
    )
    .await;
    assert_eq!(body["choices"][0]["token_ids"], json!(fake.script));
}

#[tokio::test]
async fn echo_returns_the_prompt_before_the_completion() {
    let fake = Arc::new(Fake::text(" world", Ending::Finish(FinishReason::Stop)));
    let router = app(fake.clone());
    let (status, body) = post(&router, "/v1/completions", &json!({"prompt": "Hello", "echo": true})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["choices"][0]["text"], "Hello world");
    // Streamed: the prompt first, then the completion.
    let (_, events) = post_stream(
        &router,
        "/v1/completions",
        &json!({"prompt": "Hello", "echo": true, "stream": true}),
    )
    .await;
    let texts: Vec<String> = events
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| {
            serde_json::from_str::<serde_json::Value>(e).expect("chunk")["choices"][0]["text"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert_eq!(texts[0], "Hello");
    assert_eq!(texts.concat(), "Hello world");
    // Token ids come back as their text.
    let ids = tokenizer().encode("Hi there", false).expect("encode");
    let (_, body) = post(&router, "/v1/completions", &json!({"prompt": ids, "echo": true})).await;
    assert_eq!(body["choices"][0]["text"], "Hi there world");
    // The prompt's log-probabilities are not computed: refused by name.
    let (status, body) = post(
        &router,
        "/v1/completions",
        &json!({"prompt": "x", "echo": true, "logprobs": 1}),
    )
    .await;
    assert_eq!(assert_error(status, &body, StatusCode::BAD_REQUEST)["param"], "echo");
}

#[tokio::test]
async fn suffix_asks_for_the_middle() {
    let fake = Arc::new(Fake::text("x", Ending::Finish(FinishReason::Stop)));
    let router = app(fake.clone());
    let body = json!({"prompt": "def f():\n", "suffix": "\n    return y\n", "max_tokens": 4});
    let (status, body) = post(&router, "/v1/completions", &body).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let tok = tokenizer();
    let id = |t: &str| tok.token_to_id(t).expect("FIM token");
    let mut want = vec![tok.bos_token_id().expect("bos"), id("<｜fim▁begin｜>")];
    want.extend(tok.encode("def f():\n", false).expect("encode"));
    want.push(id("<｜fim▁hole｜>"));
    want.extend(tok.encode("\n    return y\n", false).expect("encode"));
    want.push(id("<｜fim▁end｜>"));
    assert_eq!(fake.last_request().prompt, want);
    let (status, body) = post(&router, "/v1/completions", &json!({"prompt": [5, 6], "suffix": "x"})).await;
    assert_eq!(assert_error(status, &body, StatusCode::BAD_REQUEST)["param"], "suffix");
}
