//! The real DeepSeek-V3 tokenizer against references written by Python transformers
//! (tests/golden/tokenizer/make_refs.py -> refs.json).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use dsv3_text::{ChatTemplate, Error, StreamDecoder, Tokenizer};
use serde_json::{json, Value};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden")
}

fn model_dir() -> PathBuf {
    golden_dir().join("tokenizer/deepseek-v3")
}

fn tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        Tokenizer::from_model_dir(&model_dir())
            .expect("load tokenizer")
            .expect("tokenizer.json present")
    })
}

fn refs() -> &'static Value {
    static REFS: OnceLock<Value> = OnceLock::new();
    REFS.get_or_init(|| {
        let path = golden_dir().join("tokenizer/refs.json");
        let text = std::fs::read_to_string(&path).expect("read refs.json");
        serde_json::from_str(&text).expect("parse refs.json")
    })
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("id list")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

fn cases(section: &str) -> &'static Vec<Value> {
    refs()[section].as_array().expect("section")
}

#[test]
fn loads_real_tokenizer() {
    let tok = tokenizer();
    let r = refs();
    assert_eq!(r["tokenizer_class"], "LlamaTokenizerFast");
    assert_eq!(tok.vocab_size(), r["vocab_size"].as_u64().unwrap() as usize);
    assert_eq!(tok.vocab_size(), 128_815);
    assert_eq!(tok.bos_token_id(), Some(r["bos_token_id"].as_u64().unwrap() as u32));
    assert_eq!(tok.eos_token_id(), Some(r["eos_token_id"].as_u64().unwrap() as u32));
    assert_eq!(tok.pad_token_id(), Some(1));
    for (token, id) in r["special_ids"].as_object().unwrap() {
        assert_eq!(tok.token_to_id(token), Some(id.as_u64().unwrap() as u32), "{token}");
        assert_eq!(
            tok.id_to_token(id.as_u64().unwrap() as u32).as_deref(),
            Some(token.as_str())
        );
    }
    assert_eq!(tok.id_to_token(128_815), None);
    assert!(tok.is_special_id(0) && tok.is_special_id(1));
    assert!(!tok.is_special_id(128_803), "<｜User｜> is an added token, not special");
    assert!(tok.chat_template().is_some());
    assert_eq!(
        tok.special_tokens().bos_token.as_deref(),
        Some("<｜begin▁of▁sentence｜>")
    );
}

#[test]
fn encode_matches_python() {
    let tok = tokenizer();
    for case in cases("text") {
        let name = case["name"].as_str().unwrap();
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text, true).unwrap(),
            ids(&case["ids_add_special"]),
            "{name}: add_special_tokens=True"
        );
        assert_eq!(
            tok.encode(text, false).unwrap(),
            ids(&case["ids_no_special"]),
            "{name}: add_special_tokens=False"
        );
    }
}

#[test]
fn decode_matches_python() {
    let tok = tokenizer();
    for case in cases("text") {
        let name = case["name"].as_str().unwrap();
        for (ids_key, skip, want) in [
            ("ids_add_special", false, "decode_add_special_keep"),
            ("ids_add_special", true, "decode_add_special_skip"),
            ("ids_no_special", false, "decode_no_special_keep"),
            ("ids_no_special", true, "decode_no_special_skip"),
        ] {
            assert_eq!(
                tok.decode(&ids(&case[ids_key]), skip).unwrap(),
                case[want].as_str().unwrap(),
                "{name}: {want}"
            );
        }
    }
    for case in cases("decode") {
        let name = case["name"].as_str().unwrap();
        let ids = ids(&case["ids"]);
        assert_eq!(tok.decode(&ids, false).unwrap(), case["decode_keep"], "{name}");
        assert_eq!(tok.decode(&ids, true).unwrap(), case["decode_skip"], "{name}");
    }
}

fn messages(case: &Value) -> Vec<Value> {
    case["messages"].as_array().unwrap().clone()
}

fn tools(case: &Value) -> Option<&Value> {
    Some(&case["tools"]).filter(|t| !t.is_null())
}

#[test]
fn chat_template_matches_python() {
    let tok = tokenizer();
    for case in cases("chat") {
        let name = case["name"].as_str().unwrap();
        let msgs = messages(case);
        let add_gen = case["add_generation_prompt"].as_bool().unwrap();
        let kwargs = case["kwargs"].as_object().unwrap();
        let want_text = case["rendered"].as_str().unwrap();
        let want_ids = ids(&case["ids"]);
        if let Some(src) = case.get("template") {
            let template = ChatTemplate::new(src.as_str().unwrap(), tok.special_tokens().clone()).unwrap();
            let text = template
                .render_with_kwargs(&msgs, tools(case), add_gen, Some(kwargs))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(text, want_text, "{name}");
            assert_eq!(tok.encode(&text, false).unwrap(), want_ids, "{name}: ids");
        } else {
            assert!(kwargs.is_empty());
            let template = tok.chat_template().unwrap();
            let text = template
                .render(&msgs, tools(case), add_gen)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(text, want_text, "{name}");
            assert_eq!(
                tok.encode_chat(&msgs, tools(case), add_gen).unwrap(),
                want_ids,
                "{name}: ids"
            );
        }
    }
}

#[test]
fn chat_raise_exception_gives_template_message() {
    let tok = tokenizer();
    for case in cases("chat_errors") {
        let template = ChatTemplate::new(case["template"].as_str().unwrap(), tok.special_tokens().clone()).unwrap();
        let err = template.render(&messages(case), None, true).unwrap_err();
        let want = case["error"].as_str().unwrap();
        assert!(matches!(err, Error::Template(_)), "{err:?}");
        assert!(err.to_string().contains(want), "{err} does not contain {want}");
    }
}

#[test]
fn chat_rejects_bad_requests() {
    let tok = tokenizer();
    let t = tok.chat_template().unwrap();
    let check = |msgs: Vec<Value>, tools: Option<Value>, needle: &str| {
        let err = t.render(&msgs, tools.as_ref(), true).unwrap_err();
        assert!(matches!(err, Error::Chat(_)), "{err:?}");
        assert!(err.to_string().contains(needle), "`{err}` lacks `{needle}`");
        // encode_chat reports the same problem.
        assert!(tok.encode_chat(&msgs, tools.as_ref(), true).is_err());
    };
    check(vec![], None, "`messages` is empty");
    check(
        vec![
            json!({"role": "user", "content": "hi"}),
            json!({"role": "wizard", "content": "x"}),
        ],
        None,
        "messages[1]: unsupported role \"wizard\"",
    );
    check(vec![json!({"content": "x"})], None, "messages[0]: missing `role`");
    check(vec![json!("hello")], None, "messages[0]: expected an object");
    check(vec![json!({"role": "user"})], None, "a user message needs `content`");
    check(
        vec![json!({"role": "user", "content": 5})],
        None,
        "`content` must be a string",
    );
    check(
        vec![json!({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]})],
        None,
        "content[0]: unsupported content part type \"image_url\"",
    );
    check(
        vec![json!({"role": "assistant", "content": null})],
        None,
        "needs `content` or `tool_calls`",
    );
    check(
        vec![json!({"role": "assistant", "content": null, "tool_calls": [{"type": "function"}]})],
        None,
        "tool_calls[0]: missing `function` object",
    );
    check(
        vec![json!({"role": "user", "content": "x"})],
        Some(json!({"type": "function"})),
        "`tools` must be a list",
    );
}

#[test]
fn chat_accepts_openai_shapes() {
    // Missing `content` next to tool_calls and a missing tool-call `type` are filled in.
    let t = tokenizer().chat_template().unwrap();
    let with_nulls = t
        .render(
            &[
                json!({"role": "user", "content": "w?"}),
                json!({"role": "assistant", "content": null, "tool_calls": [
                    {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}),
            ],
            None,
            false,
        )
        .unwrap();
    let without = t
        .render(
            &[
                json!({"role": "user", "content": "w?"}),
                json!({"role": "assistant", "tool_calls": [
                    {"id": "1", "function": {"name": "f", "arguments": "{}"}}]}),
            ],
            None,
            false,
        )
        .unwrap();
    assert_eq!(with_nulls, without);
    assert!(with_nulls.contains("<｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{}\n```"));
}

/// Feeds ids one at a time; checks every chunk and the total against Python's decode.
fn check_stream(tok: &Tokenizer, name: &str, ids: &[u32], skip: bool, want: &str) {
    let mut dec = StreamDecoder::new(tok.clone(), skip);
    let mut chunks: Vec<String> = Vec::new();
    for &id in ids {
        if let Some(chunk) = dec.push(id).unwrap() {
            assert!(!chunk.is_empty(), "{name}: empty chunk");
            chunks.push(chunk);
        }
    }
    let tail = dec.finish().unwrap();
    let total: String = chunks.concat() + &tail;
    assert_eq!(total, want, "{name} (skip_special_tokens={skip})");
    let genuine = want.matches('\u{FFFD}').count();
    if genuine == 0 {
        for c in &chunks {
            assert!(!c.contains('\u{FFFD}'), "{name}: chunk {c:?} has U+FFFD");
        }
        assert!(!tail.contains('\u{FFFD}'), "{name}: tail has U+FFFD");
    } else {
        // Invalid bytes in the ids: the replacement characters come out, but none is emitted
        // early for a sequence that was still incomplete (no chunk ends in one).
        for c in &chunks {
            assert!(!c.ends_with('\u{FFFD}'), "{name}: chunk {c:?} ends in U+FFFD");
        }
    }
    assert!(!dec.has_pending());
}

#[test]
fn stream_decoder_matches_python_decode() {
    let tok = tokenizer();
    for case in cases("text") {
        let name = case["name"].as_str().unwrap();
        let all = ids(&case["ids_add_special"]);
        check_stream(
            tok,
            name,
            &all,
            false,
            case["decode_add_special_keep"].as_str().unwrap(),
        );
        check_stream(tok, name, &all, true, case["decode_add_special_skip"].as_str().unwrap());
    }
    for case in cases("decode") {
        let name = case["name"].as_str().unwrap();
        let all = ids(&case["ids"]);
        check_stream(tok, name, &all, false, case["decode_keep"].as_str().unwrap());
        check_stream(tok, name, &all, true, case["decode_skip"].as_str().unwrap());
    }
    for case in cases("chat") {
        let name = case["name"].as_str().unwrap();
        let all = ids(&case["ids"]);
        let want = tok.decode(&all, false).unwrap();
        assert_eq!(want, case["rendered"].as_str().unwrap(), "{name}: chat round trip");
        check_stream(tok, name, &all, false, &want);
    }
}

#[test]
fn stream_decoder_emits_multi_token_characters_whole() {
    let tok = tokenizer();
    let case = cases("decode")
        .iter()
        .find(|c| c["name"] == "emoji_bytes_one_by_one")
        .unwrap();
    let all = ids(&case["ids"]);
    // [bos, f0, 9f, a6, 80, " ok"]: nothing while the crab is incomplete, then all of it at once.
    let mut dec = tok.stream_decoder(true);
    let out: Vec<Option<String>> = all.iter().map(|&id| dec.push(id).unwrap()).collect();
    assert_eq!(
        out,
        vec![None, None, None, None, Some("🦀".to_string()), Some(" ok".to_string())]
    );
    assert_eq!(dec.finish().unwrap(), "");

    // An incomplete sequence at the very end is flushed by finish() as decode() shows it.
    let mut dec = tok.stream_decoder(false);
    let mut text = dec.push_all(&all[..3]).unwrap();
    assert_eq!(text, "<｜begin▁of▁sentence｜>");
    text += &dec.finish().unwrap();
    assert_eq!(text, tok.decode(&all[..3], false).unwrap());
    // The decoder can be reused after finish().
    assert_eq!(dec.push_all(&all).unwrap(), "<｜begin▁of▁sentence｜>🦀 ok");
}

#[test]
fn from_bytes_equals_from_files() {
    let dir = model_dir();
    let json = std::fs::read(dir.join("tokenizer.json")).unwrap();
    let config = std::fs::read(dir.join("tokenizer_config.json")).unwrap();
    let a = Tokenizer::from_bytes(&json, Some(&config)).unwrap();
    let b = Tokenizer::from_files(&dir.join("tokenizer.json"), Some(&dir.join("tokenizer_config.json"))).unwrap();
    let text = "Hello 世界 🦀 <｜User｜>";
    assert_eq!(a.encode(text, true).unwrap(), b.encode(text, true).unwrap());
    assert_eq!(a.encode(text, true).unwrap(), tokenizer().encode(text, true).unwrap());
    assert_eq!(a.source(), "<embedded tokenizer.json>");

    // Without tokenizer_config.json: no BOS rule, no chat template, tokenizer.json's own
    // post-processor (ByteLevel: adds nothing).
    let bare = Tokenizer::from_bytes(&json, None).unwrap();
    assert_eq!(bare.bos_token_id(), None);
    assert!(bare.chat_template().is_none());
    assert_eq!(bare.encode(text, true).unwrap(), a.encode(text, false).unwrap());
    let err = bare
        .encode_chat(&[json!({"role": "user", "content": "x"})], None, true)
        .unwrap_err();
    assert!(matches!(err, Error::NoChatTemplate(_)), "{err:?}");
}

#[test]
fn load_errors_name_the_file_and_field() {
    let tmp = std::env::temp_dir().join(format!("dsv3-text-test-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    // No tokenizer.json: not an error, just no tokenizer.
    assert!(Tokenizer::from_model_dir(&tmp).unwrap().is_none());

    let json = std::fs::read(model_dir().join("tokenizer.json")).unwrap();
    let err = Tokenizer::from_bytes(b"{not json", None).unwrap_err().to_string();
    assert!(err.contains("<embedded tokenizer.json>"), "{err}");

    let err = Tokenizer::from_bytes(&json, Some(b"[1]")).unwrap_err().to_string();
    assert!(
        err.contains("tokenizer_config.json") && err.contains("JSON object"),
        "{err}"
    );

    let bad_bos = br#"{"bos_token": "<no-such-token>", "add_bos_token": true}"#;
    let err = Tokenizer::from_bytes(&json, Some(bad_bos)).unwrap_err().to_string();
    assert!(err.contains("`bos_token`") && err.contains("<no-such-token>"), "{err}");

    let bad_flag = br#"{"add_bos_token": "yes"}"#;
    let err = Tokenizer::from_bytes(&json, Some(bad_flag)).unwrap_err().to_string();
    assert!(err.contains("`add_bos_token`"), "{err}");

    let bad_template = br#"{"chat_template": "{% for m in messages %}"}"#;
    let err = Tokenizer::from_bytes(&json, Some(bad_template))
        .unwrap_err()
        .to_string();
    assert!(err.contains("`chat_template`"), "{err}");

    let missing = tmp.join("nope.json");
    let err = Tokenizer::from_files(&missing, None).unwrap_err().to_string();
    assert!(err.contains("nope.json"), "{err}");

    // A directory whose tokenizer.json is corrupt names that file.
    std::fs::write(tmp.join("tokenizer.json"), b"{}").unwrap();
    let err = Tokenizer::from_model_dir(&tmp).unwrap_err().to_string();
    assert!(err.contains("tokenizer.json"), "{err}");

    // chat_template.jinja next to the config wins over the config's template.
    std::fs::write(tmp.join("tokenizer.json"), &json).unwrap();
    std::fs::copy(
        model_dir().join("tokenizer_config.json"),
        tmp.join("tokenizer_config.json"),
    )
    .unwrap();
    std::fs::write(
        tmp.join("chat_template.jinja"),
        "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}",
    )
    .unwrap();
    let tok = Tokenizer::from_model_dir(&tmp).unwrap().unwrap();
    let text = tok
        .chat_template()
        .unwrap()
        .render(&[json!({"role": "user", "content": "hi"})], None, true)
        .unwrap();
    assert_eq!(text, "<｜begin▁of▁sentence｜>[user]hi");
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn chat_template_list_form_uses_default() {
    let json = std::fs::read(model_dir().join("tokenizer.json")).unwrap();
    let config = r#"{"bos_token": "<｜begin▁of▁sentence｜>", "chat_template": [
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": "{{ bos_token }}D{{ messages | length }}"}]}"#;
    let tok = Tokenizer::from_bytes(&json, Some(config.as_bytes())).unwrap();
    let out = tok
        .chat_template()
        .unwrap()
        .render(&[json!({"role": "user", "content": "x"})], None, true)
        .unwrap();
    assert_eq!(out, "<｜begin▁of▁sentence｜>D1");
    // add_bos_token absent and no Llama class: tokenizer.json's post-processor decides (no BOS).
    assert_eq!(tok.encode("x", true).unwrap(), tok.encode("x", false).unwrap());
}
