//! Function calling: `tool_choice` as a request asks for it, and the tool-call markers of
//! DeepSeek's output parsed into OpenAI `tool_calls`, as the text streams.
//!
//! DeepSeek writes calls between `<｜tool▁calls▁begin｜>` and `<｜tool▁calls▁end｜>`, each between
//! `<｜tool▁call▁begin｜>` and `<｜tool▁call▁end｜>`, in one of two forms (the markers are ordinary
//! added tokens, so they arrive as text):
//! - V3, R1: `function<｜tool▁sep｜>NAME` + "\n```json\n" + ARGUMENTS + "\n```"
//! - V3.1: `NAME<｜tool▁sep｜>ARGUMENTS`
//!
//! The parser tells them apart by what follows the separator, so one parser serves both.

use dsv3_engine::OutputGrammar;
use serde_json::{json, Value};

use crate::error::ApiError;

pub const CALLS_BEGIN: &str = "<｜tool▁calls▁begin｜>";
pub const CALLS_END: &str = "<｜tool▁calls▁end｜>";
pub const CALL_BEGIN: &str = "<｜tool▁call▁begin｜>";
pub const CALL_END: &str = "<｜tool▁call▁end｜>";
pub const SEP: &str = "<｜tool▁sep｜>";
/// The V3 form's argument fence.
const FENCE_OPEN: &str = "```json";
const FENCE_CLOSE: &str = "```";

/// What a request's `tool_choice` (with its `tools`) asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolChoice {
    /// No tools, or `none`: the output is text; markers are left as they are.
    None,
    /// The model decides; calls it writes are parsed.
    Auto,
    /// The model must call some tool.
    Required,
    /// The model must call this tool.
    Named(String),
}

impl ToolChoice {
    /// From the request as sent: `tools` and `tool_choice` (`auto` when tools are given and the
    /// choice is not). A named tool must be among `tools`; a choice without tools is a 400.
    pub fn of_request(raw: &Value) -> Result<ToolChoice, ApiError> {
        let names: Vec<&str> = match raw.get("tools") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(tools)) => tools
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    t.pointer("/function/name")
                        .and_then(Value::as_str)
                        .ok_or_else(|| ApiError::invalid(format!("tools[{i}]"), "each tool needs `function.name`"))
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(ApiError::invalid("tools", "`tools` must be a list")),
        };
        let choice = match raw.get("tool_choice") {
            None | Some(Value::Null) => {
                return Ok(if names.is_empty() {
                    ToolChoice::None
                } else {
                    ToolChoice::Auto
                });
            }
            Some(Value::String(mode)) => match mode.as_str() {
                "none" => return Ok(ToolChoice::None),
                "auto" => ToolChoice::Auto,
                "required" => ToolChoice::Required,
                other => {
                    return Err(ApiError::invalid(
                        "tool_choice",
                        format!("`tool_choice` must be none, auto, required or a named function, got {other:?}"),
                    ))
                }
            },
            Some(named) => {
                let name = named
                    .pointer("/function/name")
                    .and_then(Value::as_str)
                    .filter(|_| named.get("type").and_then(Value::as_str) == Some("function"))
                    .ok_or_else(|| {
                        ApiError::invalid(
                            "tool_choice",
                            "a named `tool_choice` must be {\"type\": \"function\", \"function\": {\"name\": ...}}",
                        )
                    })?;
                if !names.contains(&name) {
                    return Err(ApiError::invalid(
                        "tool_choice",
                        format!("`tool_choice` names the function {name:?}, which is not in `tools`"),
                    ));
                }
                ToolChoice::Named(name.to_string())
            }
        };
        if names.is_empty() {
            return Err(ApiError::invalid("tool_choice", "`tool_choice` needs `tools`"));
        }
        Ok(choice)
    }
}

/// How the model's chat template writes a call (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallForm {
    V3,
    V31,
}

impl CallForm {
    /// The form a rendered conversation shows for a call of `probe_name`, if it shows one.
    pub fn detect(rendered: &str, probe_name: &str) -> Option<CallForm> {
        if rendered.contains(&format!("{SEP}{probe_name}")) {
            Some(CallForm::V3)
        } else if rendered.contains(&format!("{probe_name}{SEP}")) {
            Some(CallForm::V31)
        } else {
            None
        }
    }

    /// The start of the assistant's answer that commits it to a call of `name` (`None`: some
    /// call), in this form: the model continues with the arguments (or the name).
    pub fn forced_opening(self, name: Option<&str>) -> String {
        match (self, name) {
            (_, None) => format!("{CALLS_BEGIN}{CALL_BEGIN}"),
            (CallForm::V3, Some(name)) => format!("{CALLS_BEGIN}{CALL_BEGIN}function{SEP}{name}\n{FENCE_OPEN}\n"),
            (CallForm::V31, Some(name)) => format!("{CALLS_BEGIN}{CALL_BEGIN}{name}{SEP}"),
        }
    }
}

/// The grammar that holds a forced call to the tools' JSON schemas (`parameters`; any object
/// when a tool gives none), after its opening in the prompt: the arguments of `name`, or any
/// tool's name and then its arguments, in the template's form. The answer ends with the
/// arguments (the parser closes the call).
pub fn call_grammar(form: CallForm, name: Option<&str>, tools: Option<&Value>) -> Result<OutputGrammar, ApiError> {
    let tools: Vec<(&str, Value)> = tools
        .and_then(Value::as_array)
        .map(|list| {
            list.iter()
                .filter_map(|t| {
                    let name = t.pointer("/function/name")?.as_str()?;
                    let schema = t
                        .pointer("/function/parameters")
                        .filter(|p| p.is_object())
                        .cloned()
                        .unwrap_or_else(|| json!({"type": "object"}));
                    Some((name, schema))
                })
                .collect()
        })
        .unwrap_or_default();
    if let Some(name) = name {
        let schema = tools
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, s)| s.clone())
            .ok_or_else(|| ApiError::invalid("tool_choice", format!("no tool named {name:?}")))?;
        return Ok(OutputGrammar::JsonSchema(schema.to_string()));
    }
    let mut lark = String::from("start: ");
    lark.push_str(
        &(0..tools.len())
            .map(|i| format!("call_{i}"))
            .collect::<Vec<_>>()
            .join(" | "),
    );
    lark.push('\n');
    for (i, (name, schema)) in tools.iter().enumerate() {
        let header = match form {
            CallForm::V3 => format!("function{SEP}{name}\n{FENCE_OPEN}\n"),
            CallForm::V31 => format!("{name}{SEP}"),
        };
        // A JSON string literal is a Lark string literal.
        let header = Value::String(header).to_string();
        let schema = dsv3_grammar::compact_schema(schema.clone());
        lark.push_str(&format!("call_{i}: {header} args_{i}\nargs_{i}: %json {schema}\n"));
    }
    Ok(OutputGrammar::Lark(lark))
}

/// What the parser makes of new text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolEvent {
    Content(String),
    /// A call begins (its index among the answer's calls).
    Call {
        index: usize,
        name: String,
    },
    /// More of call `index`'s arguments.
    Arguments {
        index: usize,
        delta: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Answer text, until `CALLS_BEGIN`.
    Content,
    /// Between calls: a call's begin, or the end of the calls.
    Between,
    /// After `CALL_BEGIN`: the header up to the separator (and, in V3, the name's line).
    Header,
    /// A call's arguments, until `CALL_END`.
    Arguments,
    /// After `CALLS_END`: text again.
    After,
}

/// Parses streamed answer text into content and tool calls, holding back only what could be
/// the start of a marker.
#[derive(Clone, Debug)]
pub struct ToolCallParser {
    state: State,
    buffer: String,
    calls: usize,
    /// The V3 form: arguments sit inside a ```json fence.
    fenced: bool,
}

impl Default for ToolCallParser {
    fn default() -> Self {
        ToolCallParser {
            state: State::Content,
            buffer: String::new(),
            calls: 0,
            fenced: false,
        }
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of one of `markers`.
fn partial_suffix(text: &str, markers: &[&str]) -> usize {
    let mut best = 0;
    for m in markers {
        for (i, _) in m.char_indices().skip(1) {
            if i > best && text.ends_with(&m[..i]) {
                best = i;
            }
        }
    }
    best
}

impl ToolCallParser {
    /// A parser for an answer that begins with `opening` (a forced call's start, already in
    /// the prompt), put where that text leaves it, and the events of the opening itself (the
    /// forced call's name, for the client).
    pub fn after_opening(opening: &str) -> (Self, Vec<ToolEvent>) {
        let mut parser = ToolCallParser::default();
        let events = parser.push(opening);
        (parser, events)
    }

    /// Calls seen so far.
    pub fn calls(&self) -> usize {
        self.calls
    }

    pub fn push(&mut self, text: &str) -> Vec<ToolEvent> {
        self.buffer.push_str(text);
        let mut events = Vec::new();
        while self.step(&mut events, false) {}
        events
    }

    /// The end of the answer: what was held back, and the arguments of a call cut short.
    pub fn finish(&mut self) -> Vec<ToolEvent> {
        let mut events = Vec::new();
        while self.step(&mut events, true) {}
        let rest = std::mem::take(&mut self.buffer);
        if !rest.is_empty() {
            match self.state {
                State::Content | State::After | State::Between => events.push(ToolEvent::Content(rest)),
                State::Arguments => events.push(ToolEvent::Arguments {
                    index: self.calls - 1,
                    delta: rest,
                }),
                // A call cut off before its name: what arrived is shown as text.
                State::Header => events.push(ToolEvent::Content(format!("{CALL_BEGIN}{rest}"))),
            }
        }
        events
    }

    /// One move of the state machine; false when it needs more text.
    fn step(&mut self, events: &mut Vec<ToolEvent>, last: bool) -> bool {
        match self.state {
            State::Content | State::After => {
                let found = if self.state == State::Content {
                    self.buffer.find(CALLS_BEGIN).map(|at| (at, CALLS_BEGIN.len()))
                } else {
                    None
                };
                match found {
                    Some((at, len)) => {
                        self.emit_content(events, at);
                        self.buffer.drain(..len);
                        self.state = State::Between;
                        true
                    }
                    None => {
                        let hold = if self.state == State::Content && !last {
                            partial_suffix(&self.buffer, &[CALLS_BEGIN])
                        } else {
                            0
                        };
                        self.emit_content(events, self.buffer.len() - hold);
                        false
                    }
                }
            }
            State::Between => {
                let trimmed = self.buffer.trim_start();
                let skipped = self.buffer.len() - trimmed.len();
                if trimmed.starts_with(CALL_BEGIN) {
                    self.buffer.drain(..skipped + CALL_BEGIN.len());
                    self.state = State::Header;
                    true
                } else if trimmed.starts_with(CALLS_END) {
                    self.buffer.drain(..skipped + CALLS_END.len());
                    self.state = State::After;
                    true
                } else if !last
                    && (trimmed.is_empty() || partial_suffix(trimmed, &[CALL_BEGIN, CALLS_END]) == trimmed.len())
                {
                    false
                } else {
                    // Not a marker: the calls ended without their closing marker.
                    self.state = State::After;
                    true
                }
            }
            State::Header => {
                let Some(sep) = self.buffer.find(SEP) else { return false };
                let before = self.buffer[..sep].trim().to_string();
                let after = &self.buffer[sep + SEP.len()..];
                // V3: a type, then the name on its own line and the fenced arguments.
                let v3 = before == "function" && !after.starts_with('{');
                let name = if v3 {
                    let Some(newline) = after.find('\n') else {
                        return if last {
                            self.begin_call(events, after.trim().to_string(), sep + SEP.len() + after.len(), true)
                        } else {
                            false
                        };
                    };
                    let name = after[..newline].trim().to_string();
                    let rest = &after[newline + 1..];
                    // The fence's opening, when it is there (it may still be arriving).
                    let fence = if let Some(fence_line) = rest.strip_prefix(FENCE_OPEN) {
                        match fence_line.find('\n') {
                            Some(nl) => FENCE_OPEN.len() + nl + 1,
                            None if last => rest.len(),
                            None => return false,
                        }
                    } else if !last && FENCE_OPEN.starts_with(rest) {
                        return false;
                    } else {
                        0
                    };
                    let consumed = sep + SEP.len() + newline + 1 + fence;
                    return self.begin_call(events, name, consumed, true);
                } else {
                    before
                };
                self.begin_call(events, name, sep + SEP.len(), false)
            }
            State::Arguments => {
                let index = self.calls - 1;
                match self.buffer.find(CALL_END) {
                    Some(at) => {
                        let mut arguments = self.buffer[..at].to_string();
                        if self.fenced {
                            let end = arguments.trim_end().strip_suffix(FENCE_CLOSE).map(str::len);
                            if let Some(end) = end {
                                arguments.truncate(end);
                            }
                            arguments.truncate(arguments.trim_end().len());
                        }
                        if !arguments.is_empty() {
                            events.push(ToolEvent::Arguments {
                                index,
                                delta: arguments,
                            });
                        }
                        self.buffer.drain(..at + CALL_END.len());
                        self.state = State::Between;
                        true
                    }
                    None => {
                        if last {
                            return false;
                        }
                        // Hold back what may be the end: the marker's start, and in V3 the
                        // closing fence (or its start) with the whitespace before it.
                        let kept = &self.buffer[..self.buffer.len() - partial_suffix(&self.buffer, &[CALL_END])];
                        let body = if self.fenced {
                            let t = kept.trim_end();
                            let t = t
                                .strip_suffix(FENCE_CLOSE)
                                .unwrap_or(&t[..t.len() - partial_suffix(t, &[FENCE_CLOSE])]);
                            t.trim_end()
                        } else {
                            kept
                        };
                        let hold = self.buffer.len() - body.len();
                        let ready = self.buffer.len() - hold;
                        if ready > 0 {
                            let delta: String = self.buffer.drain(..ready).collect();
                            events.push(ToolEvent::Arguments { index, delta });
                        }
                        false
                    }
                }
            }
        }
    }

    fn begin_call(&mut self, events: &mut Vec<ToolEvent>, name: String, consumed: usize, fenced: bool) -> bool {
        self.buffer.drain(..consumed.min(self.buffer.len()));
        events.push(ToolEvent::Call {
            index: self.calls,
            name,
        });
        self.calls += 1;
        self.fenced = fenced;
        self.state = State::Arguments;
        true
    }

    fn emit_content(&mut self, events: &mut Vec<ToolEvent>, upto: usize) {
        if upto > 0 {
            let text: String = self.buffer.drain(..upto).collect();
            match events.last_mut() {
                Some(ToolEvent::Content(prev)) => prev.push_str(&text),
                _ => events.push(ToolEvent::Content(text)),
            }
        }
    }
}

/// A whole answer's content and calls (name, arguments), from all its events.
pub fn collect(events: impl IntoIterator<Item = ToolEvent>) -> (String, Vec<(String, String)>) {
    let (mut content, mut calls) = (String::new(), Vec::<(String, String)>::new());
    for e in events {
        match e {
            ToolEvent::Content(text) => content.push_str(&text),
            ToolEvent::Call { name, .. } => calls.push((name, String::new())),
            ToolEvent::Arguments { index, delta } => {
                if let Some(call) = calls.get_mut(index) {
                    call.1.push_str(&delta);
                }
            }
        }
    }
    (content, calls)
}

/// The id of call `index` of choice `choice` of a response (unique in the response).
pub fn call_id(response_id: &str, choice: u32, index: usize) -> String {
    format!("call_{}_{choice}_{index}", response_id.trim_start_matches("chatcmpl-"))
}

/// `tool_calls` of a message.
pub fn message_calls(response_id: &str, choice: u32, calls: &[(String, String)]) -> Value {
    Value::Array(
        calls
            .iter()
            .enumerate()
            .map(|(i, (name, arguments))| {
                json!({"id": call_id(response_id, choice, i), "type": "function",
                       "function": {"name": name, "arguments": arguments}})
            })
            .collect(),
    )
}

/// `tool_calls` of a streamed delta, one entry per call: a call's first chunk carries its id,
/// type and name, with whatever arguments came in the same chunk.
pub fn delta_calls(response_id: &str, choice: u32, events: &[ToolEvent]) -> Option<Value> {
    let mut calls: Vec<Value> = Vec::new();
    for e in events {
        match e {
            ToolEvent::Content(_) => {}
            ToolEvent::Call { index, name } => calls.push(json!({"index": index,
                "id": call_id(response_id, choice, *index), "type": "function",
                "function": {"name": name, "arguments": ""}})),
            ToolEvent::Arguments { index, delta } => {
                let same = calls.iter_mut().find(|c| c["index"] == json!(index));
                match same.and_then(|c| c.pointer_mut("/function/arguments")) {
                    Some(Value::String(arguments)) => arguments.push_str(delta),
                    _ => calls.push(json!({"index": index, "function": {"arguments": delta}})),
                }
            }
        }
    }
    (!calls.is_empty()).then_some(Value::Array(calls))
}

#[cfg(test)]
mod tests {
    use super::*;

    const V3: &str = "Let me check.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Paris\"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n{\"tz\": \"CET\"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
    const V31: &str = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{\"city\": \"Paris\"}<｜tool▁call▁end｜><｜tool▁call▁begin｜>get_time<｜tool▁sep｜>{\"tz\": \"CET\"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>";

    fn whole(text: &str) -> (String, Vec<(String, String)>) {
        let mut p = ToolCallParser::default();
        let mut events = p.push(text);
        events.extend(p.finish());
        collect(events)
    }

    /// Fed one character at a time, as the worst streaming split.
    fn by_chars(text: &str) -> (String, Vec<(String, String)>, usize) {
        let mut p = ToolCallParser::default();
        let mut events = Vec::new();
        let mut buf = [0u8; 4];
        for c in text.chars() {
            events.extend(p.push(c.encode_utf8(&mut buf)));
        }
        events.extend(p.finish());
        let argument_events = events
            .iter()
            .filter(|e| matches!(e, ToolEvent::Arguments { .. }))
            .count();
        let (content, calls) = collect(events);
        (content, calls, argument_events)
    }

    #[test]
    fn both_forms_parse_whole_and_streamed() {
        let want = vec![
            ("get_weather".to_string(), "{\"city\": \"Paris\"}".to_string()),
            ("get_time".to_string(), "{\"tz\": \"CET\"}".to_string()),
        ];
        for (text, content) in [(V3, "Let me check."), (V31, "")] {
            assert_eq!(whole(text), (content.to_string(), want.clone()), "{text}");
            let (c, calls, argument_events) = by_chars(text);
            assert_eq!((c.as_str(), &calls), (content, &want), "{text}");
            assert!(argument_events > 4, "arguments should stream: {argument_events}");
        }
    }

    #[test]
    fn text_without_markers_is_content_and_partial_markers_are_held() {
        assert_eq!(whole("plain answer"), ("plain answer".into(), vec![]));
        let mut p = ToolCallParser::default();
        assert_eq!(p.push("x <｜tool"), vec![ToolEvent::Content("x ".into())]);
        // Not a marker after all: released.
        assert_eq!(p.push(" hi"), vec![ToolEvent::Content("<｜tool hi".into())]);
    }

    #[test]
    fn a_forced_opening_leaves_the_parser_in_the_call() {
        for form in [CallForm::V3, CallForm::V31] {
            let opening = form.forced_opening(Some("get_weather"));
            let (mut p, mut events) = ToolCallParser::after_opening(&opening);
            assert_eq!(p.calls(), 1);
            events.extend(p.push("{\"city\": \"Rome\"}"));
            events.extend(p.push(if form == CallForm::V3 {
                "\n```<｜tool▁call▁end｜>"
            } else {
                "<｜tool▁call▁end｜>"
            }));
            events.extend(p.finish());
            let (_, calls) = collect(events);
            assert_eq!(
                calls,
                vec![("get_weather".to_string(), "{\"city\": \"Rome\"}".to_string())],
                "{form:?}"
            );
        }
    }

    #[test]
    fn one_delta_entry_per_call_and_ids_unique_per_choice() {
        let events = [
            ToolEvent::Call {
                index: 0,
                name: "f".into(),
            },
            ToolEvent::Arguments {
                index: 0,
                delta: "{\"a\"".into(),
            },
            ToolEvent::Arguments {
                index: 0,
                delta: ":1}".into(),
            },
        ];
        let delta = delta_calls("chatcmpl-x", 1, &events).expect("calls");
        assert_eq!(delta.as_array().map(Vec::len), Some(1), "{delta}");
        assert_eq!(delta[0]["function"]["arguments"], "{\"a\":1}");
        assert_ne!(call_id("chatcmpl-x", 0, 0), call_id("chatcmpl-x", 1, 0));
        // Cut off before the name: nothing is lost.
        let (content, calls) = whole("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_wea");
        assert!(calls.is_empty() && content.ends_with("get_wea"), "{content:?}");
    }

    #[test]
    fn a_call_cut_short_keeps_what_arrived() {
        let (_, calls) = whole("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>f<｜tool▁sep｜>{\"a\": 1");
        assert_eq!(calls, vec![("f".to_string(), "{\"a\": 1".to_string())]);
    }

    #[test]
    fn tool_choice_is_checked_against_tools() {
        let tools = json!([{"type": "function", "function": {"name": "get_weather"}}]);
        let choice = |c: Value| ToolChoice::of_request(&json!({"tools": tools, "tool_choice": c}));
        assert_eq!(
            ToolChoice::of_request(&json!({"tools": tools})).ok(),
            Some(ToolChoice::Auto)
        );
        assert_eq!(ToolChoice::of_request(&json!({})).ok(), Some(ToolChoice::None));
        assert_eq!(choice(json!("none")).ok(), Some(ToolChoice::None));
        assert_eq!(choice(json!("required")).ok(), Some(ToolChoice::Required));
        let named = json!({"type": "function", "function": {"name": "get_weather"}});
        assert_eq!(choice(named).ok(), Some(ToolChoice::Named("get_weather".into())));
        let missing = choice(json!({"type": "function", "function": {"name": "launch"}})).unwrap_err();
        assert!(missing.to_string().contains("launch"), "{missing}");
        assert!(choice(json!("sometimes")).is_err());
        assert!(ToolChoice::of_request(&json!({"tool_choice": "required"})).is_err());
    }
}
