//! `/v1/chat/completions` (non-streamed): templating, tools, token budget, logprobs.

use std::sync::Arc;

use axum::http::StatusCode;
use dsv3_api::ApiConfig;
use dsv3_engine::FinishReason;
use dsv3_text::Tokenizer;
use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn chat_renders_the_template() {
    let fake = Arc::new(Fake::text("I am fine.", Ending::Finish(FinishReason::Stop)));
    let router = app(fake.clone());
    let messages = json!([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "How are you?"}]}
    ]);
    let (status, body) = post(
        &router,
        "/v1/chat/completions",
        &json!({"model": MODEL, "messages": messages, "max_completion_tokens": 20, "temperature": 0.7, "seed": 1}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(body["choices"][0]["message"]["content"], "I am fine.");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");

    let expected = tokenizer()
        .encode_chat(messages.as_array().unwrap(), None, true)
        .unwrap();
    let request = fake.last_request();
    assert_eq!(request.prompt, expected);
    assert_eq!(request.params.max_tokens, 20);
    assert_eq!(request.params.temperature, 0.7);
    assert_eq!(request.params.seed, Some(1));
    assert_eq!(body["usage"]["prompt_tokens"], expected.len() as u64);
    assert_eq!(body["usage"]["completion_tokens"], fake.script.len() as u64);
}

#[tokio::test]
async fn chat_max_tokens_defaults_to_the_rest_of_the_context() {
    let fake = Arc::new(Fake::text("ok", Ending::Finish(FinishReason::Stop)));
    let router = app(fake.clone());
    let (status, _) = post(
        &router,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Hi"}]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let request = fake.last_request();
    let context = model_config().max_position_embeddings;
    assert_eq!(request.params.max_tokens, context - request.prompt.len());

    // `max_tokens` (deprecated) still works; `max_completion_tokens` wins over it.
    post(
        &router,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 9}),
    )
    .await;
    assert_eq!(fake.last_request().params.max_tokens, 9);
    post(
        &router,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 9, "max_completion_tokens": 5}),
    )
    .await;
    assert_eq!(fake.last_request().params.max_tokens, 5);
}

#[tokio::test]
async fn chat_developer_role_is_a_system_message() {
    let fake = Arc::new(Fake::text("ok", Ending::Finish(FinishReason::Stop)));
    let router = app(fake.clone());
    let (status, body) = post(
        &router,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "developer", "content": "Rules."}, {"role": "user", "content": "Hi"}]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let expected = tokenizer()
        .encode_chat(
            &[
                json!({"role": "system", "content": "Rules."}),
                json!({"role": "user", "content": "Hi"}),
            ],
            None,
            true,
        )
        .unwrap();
    assert_eq!(fake.last_request().prompt, expected);
}

/// A copy of the tiny tokenizer whose chat template prints the tool names.
fn tool_printing_tokenizer() -> Tokenizer {
    let dir = std::env::temp_dir().join(format!("dsv3-api-tools-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tiny_dir().join(f), dir.join(f)).unwrap();
    }
    std::fs::write(
        dir.join("chat_template.jinja"),
        "{% for t in tools %}[{{ t.function.name }}]{% endfor %}{% for m in messages %}{{ m.content }}{% endfor %}",
    )
    .unwrap();
    let tok = Tokenizer::from_model_dir(&dir).unwrap().unwrap();
    std::fs::remove_dir_all(&dir).ok();
    tok
}

#[tokio::test]
async fn chat_tools_reach_the_template() {
    let fake = Arc::new(Fake::text("ok", Ending::Finish(FinishReason::Stop)));
    let tok = tool_printing_tokenizer();
    let router = app_with(fake.clone(), Some(tok.clone()), ApiConfig::new(MODEL));
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]);
    let (status, body) = post(
        &router,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Weather?"}], "tools": tools, "tool_choice": "auto"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        fake.last_request().prompt,
        tok.encode("[get_weather]Weather?", false).unwrap()
    );
}

#[tokio::test]
async fn chat_logprobs_format() {
    let fake = Arc::new(Fake::text("Hi there", Ending::Finish(FinishReason::Stop)));
    let router = app(fake.clone());
    let (status, body) = post(
        &router,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Hi"}], "logprobs": true, "top_logprobs": 2}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(fake.last_request().logprobs, Some(2));
    let content = body["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), fake.script.len());
    let mut text = String::new();
    for entry in content {
        let token = entry["token"].as_str().unwrap();
        text.push_str(token);
        assert_eq!(entry["logprob"], -0.25);
        let bytes: Vec<u8> = entry["bytes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap() as u8)
            .collect();
        assert_eq!(bytes, token.as_bytes());
        let top = entry["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 2);
        for alt in top {
            assert!(alt["token"].is_string() && alt["logprob"].is_number() && alt.get("bytes").is_some());
        }
    }
    assert_eq!(text, "Hi there");

    // logprobs alone: the chosen token's only.
    let (_, body) = post(
        &router,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Hi"}], "logprobs": true}),
    )
    .await;
    assert_eq!(fake.last_request().logprobs, Some(0));
    assert_eq!(body["choices"][0]["logprobs"]["content"][0]["top_logprobs"], json!([]));
    // No logprobs unless asked.
    let (_, body) = post(
        &router,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Hi"}]}),
    )
    .await;
    assert_eq!(fake.last_request().logprobs, None);
    assert!(body["choices"][0].get("logprobs").is_none_or(|l| l.is_null()));
}

#[tokio::test]
async fn chat_stop_string() {
    let fake = Arc::new(Fake::text("Sure. END more text", Ending::Hang));
    let router = app(fake.clone());
    let (status, body) = post(
        &router,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Hi"}], "stop": [" END"]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "Sure.");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert!(fake.wait_cancelled().await);
}

/// DeepSeek's prefix completion: the last assistant message, marked `prefix: true` (or the request
/// `continue_final_message`), is continued rather than answered.
#[tokio::test]
async fn chat_continues_a_final_assistant_prefix() {
    let tok = tokenizer(); // the tiny model's: DeepSeek-V3's chat template
    let fake = Arc::new(Fake::text("print(1)", Ending::Finish(FinishReason::Stop)));
    let router = app_with(fake.clone(), Some(tok.clone()), ApiConfig::new(MODEL));
    let user = json!({"role": "user", "content": "Write code"});
    // V3's template ends a user turn's generation prompt with `<｜Assistant｜>`; the prefix follows.
    let opened = tok
        .chat_template()
        .unwrap()
        .render(std::slice::from_ref(&user), None, true)
        .unwrap();
    // "end" also occurs in the template's closing `<｜end▁of▁sentence｜>`.
    for prefix in ["```python\n", "end"] {
        let want = tok.encode(&format!("{opened}{prefix}"), false).unwrap();
        for body in [
            json!({"messages": [user, {"role": "assistant", "content": prefix, "prefix": true}]}),
            json!({"messages": [user, {"role": "assistant", "content": prefix}], "continue_final_message": true}),
        ] {
            let (status, json) = post(&router, "/v1/chat/completions", &body).await;
            assert_eq!(status, StatusCode::OK, "{json}");
            assert_eq!(fake.last_request().prompt, want, "{body}");
            assert_eq!(json["choices"][0]["message"]["content"], "print(1)");
            // /tokenize counts what the chat endpoint runs.
            let (status, json) = post(&router, "/tokenize", &body).await;
            assert_eq!(status, StatusCode::OK, "{json}");
            assert_eq!(json["count"], want.len(), "{body}");
        }
    }
    // Only the last message may be a prefix, and only an assistant's.
    for (body, param) in [
        (
            json!({"messages": [{"role": "assistant", "content": "a", "prefix": true}, user]}),
            "messages[0].prefix",
        ),
        (
            json!({"messages": [user], "continue_final_message": true}),
            "messages[0]",
        ),
    ] {
        let (status, json) = post(&router, "/v1/chat/completions", &body).await;
        assert_eq!(assert_error(status, &json, StatusCode::BAD_REQUEST)["param"], param);
    }
}
