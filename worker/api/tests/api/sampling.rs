//! Sampling options reach the backend as sent (penalties, `logit_bias`, `min_tokens`, the
//! model's defaults), out-of-range values are a 400 naming the field, and `n` choices come back
//! as `n` indexed choices, streamed or not, with the usage counting the prompt once.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::http::StatusCode;
use dsv3_engine::{FinishReason, LogitRules};
use serde_json::{json, Value};

use crate::common::*;

const CHAT: &str = "/v1/chat/completions";
const COMPLETIONS: &str = "/v1/completions";

fn user() -> Value {
    json!([{"role": "user", "content": "hi"}])
}

#[tokio::test]
async fn penalties_bias_and_min_tokens_reach_the_backend() {
    let fake = Arc::new(Fake::text("ok", Ending::Finish(FinishReason::Stop)));
    let router = app(fake.clone());
    for (path, mut body) in [
        (COMPLETIONS, json!({"prompt": "x"})),
        (CHAT, json!({"messages": user()})),
    ] {
        let fields = json!({
            "max_tokens": 20, "presence_penalty": 0.5, "frequency_penalty": -1.25,
            "repetition_penalty": 1.1, "min_tokens": 3, "logit_bias": {"17": -100, "5": 2}
        });
        for (k, v) in fields.as_object().expect("object") {
            body[k] = v.clone();
        }
        let (status, answer) = post(&router, path, &body).await;
        assert_eq!(status, StatusCode::OK, "{path}: {answer}");
        assert_eq!(
            fake.last_request().params.rules,
            LogitRules {
                presence_penalty: 0.5,
                frequency_penalty: -1.25,
                repetition_penalty: 1.1,
                logit_bias: vec![(5, 2.0), (17, -100.0)],
                min_tokens: 3,
            },
            "{path}"
        );
    }
    // Left out: nothing changes the logits.
    post(&router, COMPLETIONS, &json!({"prompt": "x"})).await;
    assert!(!fake.last_request().params.rules.is_active());
}

#[tokio::test]
async fn out_of_range_sampling_options_are_named() {
    let fake = Arc::new(Fake::text("ok", Ending::Finish(FinishReason::Stop)));
    let router = app(fake.clone());
    let vocab = model_config().vocab_size;
    for (field, extra) in [
        ("presence_penalty", json!({"presence_penalty": 2.5})),
        ("frequency_penalty", json!({"frequency_penalty": -3})),
        ("repetition_penalty", json!({"repetition_penalty": 0})),
        ("logit_bias", json!({"logit_bias": {"abc": 1}})),
        ("logit_bias", json!({"logit_bias": {"5": 101}})),
        ("logit_bias", json!({"logit_bias": {(vocab + 1).to_string(): 1}})),
        ("logit_bias", json!({"logit_bias": {"5": "up"}})),
        ("logit_bias", json!({"logit_bias": [1, 2]})),
        ("min_tokens", json!({"min_tokens": 9, "max_tokens": 4})),
        // A complete output allows only the end, which min_tokens would ban.
        (
            "min_tokens",
            json!({"min_tokens": 3, "response_format": {"type": "json_object"}}),
        ),
        ("n", json!({"n": 0})),
        ("n", json!({"n": 200})),
        ("best_of", json!({"best_of": 3})),
        // Known options this server does not honour: refused by name, never ignored.
        ("min_p", json!({"min_p": 0.1})),
        ("guided_json", json!({"guided_json": {"type": "object"}})),
        ("use_beam_search", json!({"use_beam_search": true})),
    ] {
        let mut body = json!({"prompt": "x"});
        for (k, v) in extra.as_object().expect("object") {
            body[k] = v.clone();
        }
        let (status, answer) = post(&router, COMPLETIONS, &body).await;
        let e = assert_error(status, &answer, StatusCode::BAD_REQUEST);
        assert_eq!(e["param"], field, "{extra}: {e}");
    }
    assert_eq!(fake.submissions(), 0);
}

#[tokio::test]
async fn n_choices_come_back_indexed_with_their_own_seeds() {
    let fake = Arc::new(Fake::text("Hello world", Ending::Finish(FinishReason::Length)));
    let router = app(fake.clone());
    for (path, body, text_of) in [
        (
            COMPLETIONS,
            json!({"prompt": [5, 6, 7], "n": 3, "seed": 10, "max_tokens": 8}),
            "/text",
        ),
        (
            CHAT,
            json!({"messages": user(), "n": 3, "seed": 10, "max_tokens": 8}),
            "/message/content",
        ),
    ] {
        let before = fake.submissions();
        let (status, answer) = post(&router, path, &body).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        let choices = answer["choices"].as_array().expect("choices");
        assert_eq!(choices.len(), 3, "{answer}");
        for (i, c) in choices.iter().enumerate() {
            assert_eq!(c["index"], i, "{answer}");
            assert_eq!(c.pointer(text_of), Some(&json!("Hello world")), "{answer}");
        }
        let submitted: Vec<_> = fake.submitted.lock().expect("lock")[before..].to_vec();
        let seeds: BTreeSet<_> = submitted.iter().map(|r| r.params.seed).collect();
        assert_eq!(seeds, BTreeSet::from([Some(10), Some(11), Some(12)]));
        let completion = 3 * fake.script.len() as u64;
        assert_eq!(answer["usage"]["completion_tokens"], completion);
        let prompt = answer["usage"]["prompt_tokens"].as_u64().expect("prompt tokens");
        assert_eq!(prompt, submitted[0].prompt.len() as u64, "the prompt counted once");
        assert_eq!(answer["usage"]["total_tokens"], prompt + completion);
    }
}

#[tokio::test]
async fn n_streamed_choices_each_finish_then_one_usage_chunk() {
    let fake = Arc::new(Fake::text("Hello world", Ending::Finish(FinishReason::Stop)));
    let router = app(fake.clone());
    for (path, body, text_of) in [
        (
            COMPLETIONS,
            json!({"prompt": [5, 6], "n": 2, "stream": true, "stream_options": {"include_usage": true}}),
            "/text",
        ),
        (
            CHAT,
            json!({"messages": user(), "n": 2, "stream": true, "stream_options": {"include_usage": true}}),
            "/delta/content",
        ),
    ] {
        let (status, events) = post_stream(&router, path, &body).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{events:?}");
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).expect("chunk"))
            .collect();
        let (usage, chunks) = chunks.split_last().expect("chunks");
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["usage"]["completion_tokens"], 2 * fake.script.len() as u64);
        let mut texts = [String::new(), String::new()];
        let mut finished = [0, 0];
        for c in chunks {
            assert!(c["usage"].is_null(), "{c}");
            let choice = &c["choices"][0];
            let i = choice["index"].as_u64().expect("index") as usize;
            texts[i].push_str(choice.pointer(text_of).and_then(Value::as_str).unwrap_or(""));
            if !choice["finish_reason"].is_null() {
                assert_eq!(choice["finish_reason"], "stop");
                finished[i] += 1;
            }
        }
        assert_eq!(texts, ["Hello world", "Hello world"], "{path}");
        assert_eq!(finished, [1, 1], "{path}: each choice finishes once");
    }
}

/// The model's generation_config.json penalties apply when a request leaves them out.
#[tokio::test]
async fn generation_config_penalties_are_defaults() {
    let json = r#"{"repetition_penalty": 1.05, "presence_penalty": 0.25, "temperature": 0.6}"#;
    let (defaults, not_applied) = dsv3_api::SamplingDefaults::from_generation_config(json).expect("parse");
    assert!(not_applied.is_empty(), "{not_applied:?}");
    let fake = Arc::new(Fake::text("ok", Ending::Finish(FinishReason::Stop)));
    let mut config = dsv3_api::ApiConfig::new(MODEL);
    config.sampling_defaults = defaults;
    let router = app_with(fake.clone(), Some(tokenizer()), config);
    post(&router, COMPLETIONS, &json!({"prompt": "x"})).await;
    let rules = fake.last_request().params.rules;
    assert_eq!((rules.repetition_penalty, rules.presence_penalty), (1.05, 0.25));
    post(&router, COMPLETIONS, &json!({"prompt": "x", "repetition_penalty": 1.0})).await;
    assert_eq!(fake.last_request().params.rules.repetition_penalty, 1.0);
    let bad = dsv3_api::SamplingDefaults::from_generation_config(r#"{"repetition_penalty": 0}"#).expect_err("bad");
    assert!(bad.contains("repetition_penalty"), "{bad}");
}

#[tokio::test]
async fn response_format_becomes_the_outputs_grammar() {
    use dsv3_engine::OutputGrammar;
    let fake = Arc::new(Fake::text("{}", Ending::Finish(FinishReason::Stop)));
    let router = app(fake.clone());
    let schema = json!({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]});
    for (path, base) in [
        (CHAT, json!({"messages": user()})),
        (COMPLETIONS, json!({"prompt": "x"})),
    ] {
        let mut body = base.clone();
        body["response_format"] =
            json!({"type": "json_schema", "json_schema": {"name": "n", "schema": schema, "strict": true}});
        let (status, answer) = post(&router, path, &body).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(
            fake.last_request().params.grammar,
            Some(OutputGrammar::JsonSchema(schema.to_string()))
        );
        body["response_format"] = json!({"type": "json_object"});
        post(&router, path, &body).await;
        assert_eq!(
            fake.last_request().params.grammar,
            Some(OutputGrammar::JsonSchema(r#"{"type": "object"}"#.into()))
        );
        body["response_format"] = json!({"type": "text"});
        post(&router, path, &body).await;
        assert_eq!(fake.last_request().params.grammar, None);
    }
    let before = fake.submissions();
    for format in [
        json!({"type": "xml"}),
        json!({"type": "json_schema"}),
        json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}),
    ] {
        for (path, base) in [
            (CHAT, json!({"messages": user()})),
            (COMPLETIONS, json!({"prompt": "x"})),
        ] {
            let mut body = base.clone();
            body["response_format"] = format.clone();
            let (status, answer) = post(&router, path, &body).await;
            let e = assert_error(status, &answer, StatusCode::BAD_REQUEST);
            assert!(
                e["param"].as_str().is_some_and(|p| p.starts_with("response_format")),
                "{path} {format}: {e}"
            );
        }
    }
    assert_eq!(fake.submissions(), before);
}
