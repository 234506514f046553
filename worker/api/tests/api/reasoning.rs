//! Thinking models: the answer's think block in `reasoning_content`, the rest in `content`.

use std::sync::Arc;

use axum::http::StatusCode;
use dsv3_api::ApiConfig;
use dsv3_engine::FinishReason;
use dsv3_text::Tokenizer;
use serde_json::{json, Value};

use crate::common::*;

/// The tiny tokenizer with V3.1's switch: the generation prompt opens a think block when
/// `thinking` is set and closes it otherwise (R1's template always opens it).
fn thinking_tokenizer() -> Tokenizer {
    let dir = std::env::temp_dir().join(format!("dsv3-api-think-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tiny_dir().join(f), dir.join(f)).expect("copy");
    }
    std::fs::write(
        dir.join("chat_template.jinja"),
        "{% for m in messages %}{{ m.content }}{% endfor %}<|Assistant|>{% if thinking %}<think>\n{% else %}</think>{% endif %}",
    )
    .expect("template");
    let tok = Tokenizer::from_model_dir(&dir).expect("load").expect("tokenizer");
    std::fs::remove_dir_all(&dir).ok();
    tok
}

const ANSWER: &str = "Two and two.\nFour.</think>\n\nIt is 4.";

fn chat(thinking: bool, stream: bool) -> Value {
    json!({
        "messages": [{"role": "user", "content": "2+2?"}],
        "chat_template_kwargs": {"thinking": thinking},
        "max_tokens": 64,
        "stream": stream,
    })
}

fn thinking_app(config: ApiConfig) -> axum::Router {
    let fake = Arc::new(Fake::text(ANSWER, Ending::Finish(FinishReason::Stop)));
    app_with(fake, Some(thinking_tokenizer()), config)
}

#[tokio::test]
async fn thinking_goes_to_reasoning_content() {
    let router = thinking_app(ApiConfig::new(MODEL));
    let (status, body) = post(&router, "/v1/chat/completions", &chat(true, false)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let message = &body["choices"][0]["message"];
    assert_eq!(message["reasoning_content"], "Two and two.\nFour.");
    assert_eq!(message["content"], "\n\nIt is 4.");

    // Streamed: the same split, and no delta carries the marker.
    let (status, events) = post_stream(&router, "/v1/chat/completions", &chat(true, true)).await;
    assert_eq!(status, StatusCode::OK);
    let (mut reasoning, mut content) = (String::new(), String::new());
    for event in events.iter().filter(|e| *e != "[DONE]") {
        let chunk: Value = serde_json::from_str(event).expect("chunk");
        let delta = &chunk["choices"][0]["delta"];
        for (field, sink) in [("reasoning_content", &mut reasoning), ("content", &mut content)] {
            if let Some(text) = delta[field].as_str() {
                assert!(!text.contains("think>"), "{event}");
                sink.push_str(text);
            }
        }
    }
    assert_eq!(
        (reasoning.as_str(), content.as_str()),
        ("Two and two.\nFour.", "\n\nIt is 4.")
    );
}

#[tokio::test]
async fn without_an_open_block_the_answer_is_content() {
    // Not thinking (the template closed the block): the text is the answer as generated.
    let router = thinking_app(ApiConfig::new(MODEL));
    let (_, body) = post(&router, "/v1/chat/completions", &chat(false, false)).await;
    let message = &body["choices"][0]["message"];
    assert_eq!(message["content"], ANSWER);
    assert!(message.get("reasoning_content").is_none(), "{body}");

    // The server told not to split: raw text even when thinking.
    let mut config = ApiConfig::new(MODEL);
    config.split_reasoning = false;
    let (_, body) = post(&thinking_app(config), "/v1/chat/completions", &chat(true, false)).await;
    assert_eq!(body["choices"][0]["message"]["content"], ANSWER);
}
