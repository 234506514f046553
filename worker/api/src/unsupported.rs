//! Request fields this server knows but does not honour: each is a 400 naming it (when set to
//! anything but its neutral value), never a silent default. Fields that only label a request
//! (`user`, `metadata`, `store`, `service_tier`, ...) change no output and are accepted.

use serde_json::Value;

use crate::error::ApiError;

/// (field, the value that asks for nothing, why it is refused). `None`: any value is refused.
const FIELDS: &[(&str, Option<&str>, &str)] = &[
    (
        "min_p",
        Some("0"),
        "min-p sampling is not offered; use `top_p` or `top_k`",
    ),
    ("use_beam_search", Some("false"), "beam search is not offered"),
    ("length_penalty", Some("1"), "beam search is not offered"),
    ("prompt_logprobs", None, "prompt log-probabilities are not computed"),
    ("bad_words", None, "use `logit_bias` with -100 for the words' tokens"),
    (
        "allowed_token_ids",
        None,
        "use `logit_bias`, or `response_format` for a grammar",
    ),
    ("guided_json", None, "use `response_format` with `json_schema`"),
    (
        "guided_regex",
        None,
        "regular-expression output is not offered; use `response_format` with `json_schema`",
    ),
    (
        "guided_choice",
        None,
        "use `response_format` with a `json_schema` whose `enum` lists the choices",
    ),
    ("guided_grammar", None, "use `response_format` with `json_schema`"),
    ("structured_outputs", None, "use `response_format` with `json_schema`"),
    (
        "truncate_prompt_tokens",
        None,
        "prompts are never truncated; a prompt too long is a 400",
    ),
    (
        "include_stop_str_in_output",
        Some("false"),
        "the stop string is always left out",
    ),
    (
        "skip_special_tokens",
        Some("true"),
        "special tokens are always left out of the text",
    ),
    ("spaces_between_special_tokens", Some("true"), "not configurable"),
    (
        "logits_processors",
        None,
        "use the built-in options (`logit_bias`, penalties, `response_format`)",
    ),
    ("functions", None, "legacy function calling: use `tools`"),
    ("function_call", None, "legacy function calling: use `tool_choice`"),
    (
        "parallel_tool_calls",
        Some("true"),
        "the model may always answer with several calls",
    ),
    ("audio", None, "audio output is not offered"),
    ("prediction", None, "predicted outputs are not offered"),
    ("web_search_options", None, "web search is not offered"),
];

/// 400 for the first field of `raw` this server would not honour.
pub fn refuse_unsupported(raw: &Value) -> Result<(), ApiError> {
    for &(field, neutral, why) in FIELDS {
        let Some(value) = raw.get(field).filter(|v| !v.is_null()) else {
            continue;
        };
        let neutral_value = neutral.and_then(|n| serde_json::from_str::<Value>(n).ok());
        let is_neutral = neutral_value.is_some_and(|n| match (value.as_f64(), n.as_f64()) {
            (Some(a), Some(b)) => a == b,
            _ => *value == n,
        });
        if !is_neutral {
            return Err(ApiError::invalid(field, format!("`{field}` is not supported: {why}")));
        }
    }
    if let Some(modalities) = raw.get("modalities").and_then(Value::as_array) {
        if modalities.iter().any(|m| m.as_str() != Some("text")) {
            return Err(ApiError::invalid(
                "modalities",
                "`modalities` other than `text` are not offered",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn set_fields_are_refused_by_name_and_neutral_values_pass() {
        let refused = |body: Value| refuse_unsupported(&body).unwrap_err().to_string();
        assert!(refused(json!({"min_p": 0.05})).contains("min_p"));
        assert!(refused(json!({"guided_json": {"type": "object"}})).contains("response_format"));
        assert!(refused(json!({"parallel_tool_calls": false})).contains("parallel_tool_calls"));
        assert!(refused(json!({"modalities": ["text", "audio"]})).contains("modalities"));
        for fine in [
            json!({"min_p": 0, "use_beam_search": false, "skip_special_tokens": true}),
            json!({"parallel_tool_calls": true, "modalities": ["text"], "user": "u", "metadata": {"a": "b"}}),
            json!({"min_p": null}),
        ] {
            assert!(refuse_unsupported(&fine).is_ok(), "{fine}");
        }
    }
}
