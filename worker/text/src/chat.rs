//! Chat templates: the Jinja `chat_template` of tokenizer_config.json rendered with minijinja,
//! set up to behave as transformers' `apply_chat_template` (Python Jinja2).

use std::collections::BTreeMap;

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Serde, Value};
use minijinja::{AutoEscape, Environment, ErrorKind};
use serde_json::{Map, Value as Json};

use crate::error::{Error, Result};
use crate::pyfmt;

const TEMPLATE_NAME: &str = "chat_template";

/// Roles a chat message may have.
pub const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// Variables the template may not be given through extra keyword arguments (transformers passes
/// them itself; Python would fail with a duplicate keyword argument).
const RESERVED_KWARGS: [&str; 4] = ["messages", "tools", "documents", "add_generation_prompt"];

/// Special token strings from tokenizer_config.json. transformers passes the ones that are set to
/// the template as variables (`bos_token`, `eos_token`, ...).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub unk_token: Option<String>,
    pub pad_token: Option<String>,
    pub additional_special_tokens: Vec<String>,
}

/// A compiled chat template.
///
/// Rendering follows transformers: Jinja with `trim_blocks` and `lstrip_blocks`, the globals
/// `raise_exception` and `strftime_now`, a `tojson` filter that writes like Python's
/// `json.dumps(ensure_ascii=False)`, Python string/dict/list methods (`.strip()`, `.items()`,
/// ...), and values printed as Python prints them (`None`, `True`, `['a']`).
/// Variables: `messages`, `tools` (none when not given), `documents` (none),
/// `add_generation_prompt`, the special tokens, and any extra keyword arguments.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    special: SpecialTokens,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("special", &self.special)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles a template; `special` gives the `bos_token`, `eos_token`, ... variables.
    pub fn new(source: &str, special: SpecialTokens) -> Result<Self> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(false)
            .build()
            .map_err(|e| Error::Template(describe(&e)))?;
        env.set_syntax(syntax);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(|out, _state, value| {
            out.write_str(&pyfmt::py_str(value))
                .map_err(|e| minijinja::Error::new(ErrorKind::WriteFailure, e.to_string()))
        });
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| Error::Template(describe(&e)))?;
        Ok(ChatTemplate { env, special })
    }

    /// Renders OpenAI-format messages (see [`normalize_messages`]) with optional tools (a JSON
    /// list, passed to the template as is).
    pub fn render(&self, messages: &[Json], tools: Option<&Json>, add_generation_prompt: bool) -> Result<String> {
        self.render_with_kwargs(messages, tools, add_generation_prompt, None)
    }

    /// As [`render`](Self::render), with extra template variables (vLLM's `chat_template_kwargs`,
    /// e.g. `{"thinking": true}`); they override the special-token variables, as in transformers.
    pub fn render_with_kwargs(
        &self,
        messages: &[Json],
        tools: Option<&Json>,
        add_generation_prompt: bool,
        kwargs: Option<&Map<String, Json>>,
    ) -> Result<String> {
        let messages = normalize_messages(messages)?;
        let tools = match tools {
            None | Some(Json::Null) => Value::from(()),
            Some(t @ Json::Array(_)) => Value::from(Serde(t)),
            Some(_) => return Err(Error::Chat("`tools` must be a list".into())),
        };
        let mut ctx: BTreeMap<String, Value> = BTreeMap::new();
        let sp = &self.special;
        for (name, tok) in [
            ("bos_token", &sp.bos_token),
            ("eos_token", &sp.eos_token),
            ("unk_token", &sp.unk_token),
            ("pad_token", &sp.pad_token),
        ] {
            if let Some(t) = tok {
                ctx.insert(name.into(), Value::from(t.as_str()));
            }
        }
        if !sp.additional_special_tokens.is_empty() {
            ctx.insert(
                "additional_special_tokens".into(),
                Value::from(Serde(&sp.additional_special_tokens)),
            );
        }
        if let Some(kwargs) = kwargs {
            for (k, v) in kwargs {
                if RESERVED_KWARGS.contains(&k.as_str()) {
                    return Err(Error::Chat(format!("template argument `{k}` cannot be overridden")));
                }
                ctx.insert(k.clone(), Value::from(Serde(v)));
            }
        }
        ctx.insert("messages".into(), Value::from(Serde(&messages)));
        ctx.insert("tools".into(), tools);
        ctx.insert("documents".into(), Value::from(()));
        ctx.insert("add_generation_prompt".into(), Value::from(add_generation_prompt));
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| Error::Template(describe(&e)))?;
        template
            .render(Value::from_pairs(ctx))
            .map_err(|e| Error::Template(describe(&e)))
    }

    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }
}

/// The error and its causes on one line (the `debug` feature's source dump is left out).
fn describe(e: &minijinja::Error) -> String {
    let mut s = match (e.kind(), e.detail()) {
        (ErrorKind::InvalidOperation, Some(d)) if d.starts_with("raise_exception: ") => {
            // A message the template author wrote: give it verbatim.
            return d.to_string();
        }
        _ => e.to_string(),
    };
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(
        ErrorKind::InvalidOperation,
        format!("raise_exception: {message}"),
    ))
}

/// `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`, written as
/// Python's `json.dumps` writes it.
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let indent: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => {
            if let Some(s) = v.as_str() {
                Some(s.to_string())
            } else if let Some(n) = v.as_i64() {
                Some(" ".repeat(n.max(0) as usize))
            } else {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an integer or a string",
                ));
            }
        }
    };
    let separators = match separators {
        None => None,
        Some(s) if s.len() == 2 => Some((s[0].clone(), s[1].clone())),
        Some(_) => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be a pair of strings",
            ))
        }
    };
    let json: Json = serde_json::to_value(&value).map_err(|e| {
        minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("tojson: value is not JSON serializable: {e}"),
        )
    })?;
    let opts = pyfmt::DumpOptions {
        ensure_ascii: ensure_ascii.unwrap_or(false),
        indent,
        separators,
        sort_keys: sort_keys.unwrap_or(false),
    };
    Ok(Value::from(pyfmt::json_dumps(&json, &opts)))
}

fn strftime_now(format: String) -> std::result::Result<Value, minijinja::Error> {
    Ok(Value::from(pyfmt::strftime_utc_now(&format)))
}

/// Checks OpenAI-format messages and brings them to the shape chat templates read:
///
/// - the list must not be empty; each message is an object with `role` one of [`ROLES`];
/// - `content` given as a list of `{"type": "text", "text": ...}` parts becomes one string, the
///   texts joined with `\n` (as vLLM does for string-content templates); other part types are
///   rejected;
/// - a missing `content` becomes null; null content is allowed only for assistant messages with
///   `tool_calls`;
/// - each tool call must have `function.name`; a missing `type` becomes `"function"`.
///
/// All other fields pass through unchanged.
pub fn normalize_messages(messages: &[Json]) -> Result<Vec<Json>> {
    if messages.is_empty() {
        return Err(Error::Chat("`messages` is empty".into()));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| normalize_message(i, m))
        .collect()
}

fn normalize_message(i: usize, message: &Json) -> Result<Json> {
    let err = |msg: String| Error::Chat(format!("messages[{i}]: {msg}"));
    let Json::Object(obj) = message else {
        return Err(err("expected an object".into()));
    };
    let mut obj = obj.clone();
    let role = match obj.get("role") {
        None => return Err(err("missing `role`".into())),
        Some(Json::String(r)) => r.clone(),
        Some(_) => return Err(err("`role` must be a string".into())),
    };
    if !ROLES.contains(&role.as_str()) {
        return Err(err(format!(
            "unsupported role {role:?} (expected one of: {})",
            ROLES.join(", ")
        )));
    }

    let has_tool_calls = match obj.get_mut("tool_calls") {
        None | Some(Json::Null) => false,
        Some(Json::Array(calls)) => {
            if role != "assistant" {
                return Err(err(format!("`tool_calls` on a {role} message")));
            }
            for (j, call) in calls.iter_mut().enumerate() {
                let cerr = |msg: &str| err(format!("tool_calls[{j}]: {msg}"));
                let Json::Object(call) = call else {
                    return Err(cerr("expected an object"));
                };
                let Some(Json::Object(function)) = call.get("function") else {
                    return Err(cerr("missing `function` object"));
                };
                if !matches!(function.get("name"), Some(Json::String(_))) {
                    return Err(cerr("`function.name` must be a string"));
                }
                if function.get("arguments").is_none() {
                    return Err(cerr("missing `function.arguments`"));
                }
                call.entry("type").or_insert_with(|| Json::String("function".into()));
            }
            !calls.is_empty()
        }
        Some(_) => return Err(err("`tool_calls` must be a list".into())),
    };

    let content = obj.get("content").cloned().unwrap_or(Json::Null);
    let content = match content {
        Json::String(s) => Json::String(s),
        Json::Null => {
            if role == "assistant" && has_tool_calls {
                Json::Null
            } else if role == "assistant" {
                return Err(err("an assistant message needs `content` or `tool_calls`".into()));
            } else {
                return Err(err(format!("a {role} message needs `content`")));
            }
        }
        Json::Array(parts) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (j, part) in parts.iter().enumerate() {
                let kind = part.get("type").and_then(Json::as_str);
                match (kind, part.get("text")) {
                    (Some("text"), Some(Json::String(t))) => texts.push(t.as_str()),
                    (Some("text"), _) => return Err(err(format!("content[{j}]: text part without a string `text`"))),
                    (Some(other), _) => {
                        return Err(err(format!(
                            "content[{j}]: unsupported content part type {other:?} (only text is supported)"
                        )))
                    }
                    (None, _) => return Err(err(format!("content[{j}]: missing `type`"))),
                }
            }
            Json::String(texts.join("\n"))
        }
        _ => return Err(err("`content` must be a string, a list of text parts, or null".into())),
    };
    obj.insert("content".into(), content);
    Ok(Json::Object(obj))
}
