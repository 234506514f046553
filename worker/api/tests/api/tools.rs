//! Function calling: DeepSeek's tool-call markers in the answer become `tool_calls` (whole and
//! streamed), `tool_choice` is honoured or refused by name, and the shipped tool-aware templates
//! render conversations as the official template does while describing the tools.

use std::sync::Arc;

use axum::http::StatusCode;
use dsv3_api::ApiConfig;
use dsv3_engine::FinishReason;
use dsv3_text::Tokenizer;
use serde_json::{json, Value};

use crate::common::*;

const CHAT: &str = "/v1/chat/completions";

const V3_ANSWER: &str = "Let me check.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Paris\"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n{\"tz\": \"CET\"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
const V31_ANSWER: &str = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{\"city\": \"Paris\"}<｜tool▁call▁end｜><｜tool▁call▁begin｜>get_time<｜tool▁sep｜>{\"tz\": \"CET\"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>";

fn tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
        {"type": "function", "function": {"name": "get_time", "description": "Time in a zone",
         "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}}
    ])
}

/// Tools with no description or schema: short enough for the tiny model's context when a
/// template describes them.
fn bare_tools() -> Value {
    json!([{"type": "function", "function": {"name": "get_weather"}},
           {"type": "function", "function": {"name": "get_time"}}])
}

fn request(extra: Value) -> Value {
    let mut body = json!({"messages": [{"role": "user", "content": "Weather and time in Paris?"}],
                          "tools": bare_tools()});
    for (k, v) in extra.as_object().expect("object") {
        body[k] = v.clone();
    }
    body
}

fn template(file: &str) -> Tokenizer {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../templates")
        .join(file);
    let source = std::fs::read_to_string(&path).expect("template");
    tokenizer().with_chat_template(&source, file).expect("compile")
}

fn expected_calls() -> Value {
    json!([
        ["get_weather", "{\"city\": \"Paris\"}"],
        ["get_time", "{\"tz\": \"CET\"}"]
    ])
}

#[tokio::test]
async fn calls_in_both_forms_become_tool_calls() {
    for (answer, content) in [(V3_ANSWER, json!("Let me check.")), (V31_ANSWER, Value::Null)] {
        let fake = Arc::new(Fake::text(answer, Ending::Finish(FinishReason::Stop)));
        let router = app(fake);
        let (status, body) = post(&router, CHAT, &request(json!({}))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let choice = &body["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls", "{body}");
        assert_eq!(choice["message"]["content"], content, "{body}");
        let calls = choice["message"]["tool_calls"].as_array().expect("tool_calls");
        let got: Vec<Value> = calls
            .iter()
            .map(|c| {
                assert_eq!(c["type"], "function");
                assert!(c["id"].as_str().is_some_and(|id| id.starts_with("call_")), "{c}");
                json!([c["function"]["name"], c["function"]["arguments"]])
            })
            .collect();
        assert_eq!(Value::Array(got), expected_calls(), "{answer}");
        assert_ne!(calls[0]["id"], calls[1]["id"]);

        // Streamed: the same calls, their arguments in pieces, each call's name once.
        let (status, events) = post_stream(&router, CHAT, &request(json!({"stream": true}))).await;
        assert_eq!(status, StatusCode::OK);
        let (mut text, mut calls, mut finish, mut argument_chunks) =
            (String::new(), Vec::<(String, String)>::new(), None, 0);
        for event in events.iter().filter(|e| *e != "[DONE]") {
            let chunk: Value = serde_json::from_str(event).expect("chunk");
            let choice = &chunk["choices"][0];
            let delta = &choice["delta"];
            text.push_str(delta["content"].as_str().unwrap_or(""));
            assert!(
                !delta["content"].as_str().unwrap_or("").contains('｜'),
                "a marker leaked: {event}"
            );
            for call in delta["tool_calls"].as_array().into_iter().flatten() {
                let index = call["index"].as_u64().expect("index") as usize;
                if let Some(name) = call["function"]["name"].as_str() {
                    assert_eq!(index, calls.len(), "a call's name comes once, in order");
                    calls.push((name.to_string(), String::new()));
                }
                let arguments = call["function"]["arguments"].as_str().unwrap_or("");
                argument_chunks += usize::from(!arguments.is_empty());
                calls[index].1.push_str(arguments);
            }
            if !choice["finish_reason"].is_null() {
                finish = Some(choice["finish_reason"].clone());
            }
        }
        assert_eq!(text, content.as_str().unwrap_or(""));
        assert_eq!(json!(calls), expected_calls(), "streamed {answer}");
        assert!(
            argument_chunks >= 4,
            "arguments should stream in pieces: {argument_chunks}"
        );
        assert_eq!(finish, Some(json!("tool_calls")));
    }
}

#[tokio::test]
async fn tool_choice_none_leaves_the_text_and_bad_choices_are_named() {
    let fake = Arc::new(Fake::text(V31_ANSWER, Ending::Finish(FinishReason::Stop)));
    let router = app(fake.clone());
    let (status, body) = post(&router, CHAT, &request(json!({"tool_choice": "none"}))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], V31_ANSWER);
    assert!(body["choices"][0]["message"]["tool_calls"].is_null());
    assert_eq!(body["choices"][0]["finish_reason"], "stop");

    let before = fake.submissions();
    for choice in [
        json!({"type": "function", "function": {"name": "launch_rocket"}}),
        json!("sometimes"),
        json!({"type": "function"}),
    ] {
        let (status, body) = post(&router, CHAT, &request(json!({"tool_choice": choice}))).await;
        let e = assert_error(status, &body, StatusCode::BAD_REQUEST);
        assert_eq!(e["param"], "tool_choice", "{body}");
    }
    let no_tools = json!({"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"});
    let (status, body) = post(&router, CHAT, &no_tools).await;
    assert_eq!(
        assert_error(status, &body, StatusCode::BAD_REQUEST)["param"],
        "tool_choice"
    );
    assert_eq!(fake.submissions(), before);
}

#[tokio::test]
async fn a_named_tool_choice_opens_that_call_in_the_prompt() {
    for (file, form_opening, rest) in [
        (
            "deepseek-v3-tools.jinja",
            "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n",
            "{\"city\": \"Paris\"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
        ),
        (
            "deepseek-v31-tools.jinja",
            "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>",
            "{\"city\": \"Paris\"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
        ),
    ] {
        let fake = Arc::new(Fake::text(rest, Ending::Finish(FinishReason::Stop)).with_context(4096));
        let tokenizer = template(file);
        let router = app_with(fake.clone(), Some(tokenizer.clone()), ApiConfig::new(MODEL));
        let named = json!({"type": "function", "function": {"name": "get_weather"}});
        for stream in [false, true] {
            let body = request(json!({"tool_choice": named, "stream": stream}));
            let (status, text) = post_raw(&router, CHAT, body.to_string()).await;
            assert_eq!(status, StatusCode::OK, "{text}");
            let prompt = tokenizer.decode(&fake.last_request().prompt, false).expect("decode");
            assert!(prompt.ends_with(form_opening), "{file}: {prompt:?}");
            // The arguments are held to the tool's schema (any object: it gives none).
            assert_eq!(
                fake.last_request().params.grammar,
                Some(dsv3_engine::OutputGrammar::JsonSchema(r#"{"type":"object"}"#.into()))
            );
            assert!(
                prompt.contains("get_time"),
                "{file}: the tools are described: {prompt:?}"
            );
            if !stream {
                let body: Value = serde_json::from_str(&text).expect("json");
                let call = &body["choices"][0]["message"]["tool_calls"][0];
                assert_eq!(call["function"]["name"], "get_weather", "{body}");
                assert_eq!(call["function"]["arguments"], "{\"city\": \"Paris\"}", "{body}");
                // A named function stops as `stop`, as in OpenAI's API.
                assert_eq!(body["choices"][0]["finish_reason"], "stop");
            } else {
                // The forced call's name reaches the client in the stream.
                assert!(text.contains("\"name\":\"get_weather\""), "{text}");
            }
        }
        // A thinking prompt (V3.1 with `thinking`) has its think block closed before the call:
        // the call is the answer, not reasoning.
        if file == "deepseek-v31-tools.jinja" {
            let body = request(json!({"tool_choice": named, "chat_template_kwargs": {"thinking": true}}));
            let (status, body) = post(&router, CHAT, &body).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            let prompt = tokenizer.decode(&fake.last_request().prompt, false).expect("decode");
            assert!(prompt.contains("<think></think>"), "{prompt:?}");
            let message = &body["choices"][0]["message"];
            assert_eq!(
                message["tool_calls"][0]["function"]["arguments"], "{\"city\": \"Paris\"}",
                "{body}"
            );
            assert!(message["reasoning_content"].is_null(), "{body}");
        }
        // required: the prompt opens some call; the model names it.
        let (status, _) = post(&router, CHAT, &request(json!({"tool_choice": "required"}))).await;
        assert_eq!(status, StatusCode::OK);
        let prompt = tokenizer.decode(&fake.last_request().prompt, false).expect("decode");
        assert!(
            prompt.ends_with("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>"),
            "{prompt:?}"
        );
    }
    // A template that cannot write calls cannot force one.
    let plain = tokenizer()
        .with_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}", "plain.jinja")
        .expect("compile");
    let fake = Arc::new(Fake::text("x", Ending::Finish(FinishReason::Stop)));
    let router = app_with(fake, Some(plain), ApiConfig::new(MODEL));
    let (status, body) = post(&router, CHAT, &request(json!({"tool_choice": "required"}))).await;
    let e = assert_error(status, &body, StatusCode::BAD_REQUEST);
    assert!(e["message"].as_str().unwrap_or("").contains("--chat-template"), "{e}");
}

/// Without tools, the V3 tool template renders a tool-using conversation exactly as the
/// official DeepSeek-V3 template does (an independent reference: the model's own file).
#[test]
fn the_v3_tool_template_renders_conversations_as_the_official_one() {
    let official = tokenizer();
    let ours = template("deepseek-v3-tools.jinja");
    let conversation = [
        json!({"role": "system", "content": "Be brief."}),
        json!({"role": "user", "content": "Weather and time in Paris?"}),
        json!({"role": "assistant", "content": null, "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
            {"id": "b", "type": "function", "function": {"name": "get_time", "arguments": "{\"tz\": \"CET\"}"}}]}),
        json!({"role": "tool", "tool_call_id": "a", "content": "18 C"}),
        json!({"role": "tool", "tool_call_id": "b", "content": "12:00"}),
        json!({"role": "assistant", "content": "18 C at noon."}),
        json!({"role": "user", "content": "Thanks"}),
    ];
    let render = |t: &Tokenizer, tools: Option<&Value>| {
        t.chat_template()
            .expect("template")
            .render(&conversation, tools, true)
            .expect("render")
    };
    assert_eq!(render(&ours, None), render(&official, None));
    let with_tools = render(&ours, Some(&tools()));
    assert!(
        with_tools.contains("## Tools") && with_tools.contains("`get_weather`"),
        "{with_tools}"
    );
    assert!(
        with_tools.contains("\"required\": [\"city\"]"),
        "the schema as JSON: {with_tools}"
    );
    // The official template ignores tools.
    assert_eq!(render(&official, Some(&tools())), render(&official, None));
}

#[test]
fn the_v31_tool_template_describes_tools_and_switches_thinking() {
    let ours = template("deepseek-v31-tools.jinja");
    let t = ours.chat_template().expect("template");
    let messages = [json!({"role": "user", "content": "hi"})];
    let plain = t.render(&messages, Some(&tools()), true).expect("render");
    assert!(plain.ends_with("<｜User｜>hi<｜Assistant｜></think>"), "{plain}");
    assert!(
        plain.contains("### get_weather\nDescription: Weather of a city"),
        "{plain}"
    );
    let mut kwargs = serde_json::Map::new();
    kwargs.insert("thinking".into(), json!(true));
    let thinking = t
        .render_with_kwargs(&messages, None, true, Some(&kwargs))
        .expect("render");
    assert!(thinking.ends_with("<｜Assistant｜><think>"), "{thinking}");
}
