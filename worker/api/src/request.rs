//! Request bodies: JSON text → the typed OpenAI request (async-openai's types) plus the
//! extension fields this server adds, with errors that name the field at fault.

use axum::body::Body;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use crate::error::ApiError;

/// Reads the whole body, refusing more than `limit` bytes (413).
pub async fn read_body(body: Body, limit: usize) -> Result<axum::body::Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        // `to_bytes` wraps the limit error; anything else is a broken connection.
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(s) = source {
            if s.is::<http_body_util::LengthLimitError>() {
                return ApiError::too_large(limit);
            }
            source = s.source();
        }
        ApiError::bad_request(format!("cannot read the request body: {e}"))
    })
}

/// Parses a body as a JSON object (400 when it is not JSON, or not an object).
pub fn parse_object(bytes: &[u8]) -> Result<Value, ApiError> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::bad_request("the request body must be a JSON object"));
    }
    Ok(value)
}

/// Deserializes `value` into `T`; a type error names the field (`messages[0].content`).
pub fn typed<T: DeserializeOwned>(value: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        let message = friendly_message(&path, &inner);
        if path == "." || path.is_empty() {
            ApiError::bad_request(message)
        } else {
            ApiError::invalid(path.clone(), format!("invalid `{path}`: {message}"))
        }
    })
}

/// serde's text for untagged enums ("data did not match any variant of untagged enum X") says
/// nothing useful; say what the field accepts instead.
fn friendly_message(path: &str, inner: &str) -> String {
    if !inner.contains("did not match any variant") {
        return inner.to_string();
    }
    let last = path.rsplit('.').next().unwrap_or(path);
    let expected = if last == "prompt" || inner.contains("enum Prompt") {
        "`prompt` must be a string, a list of one string, or a list of token ids (integers >= 0)"
    } else if last == "stop" || inner.contains("enum StopConfiguration") {
        "`stop` must be a string or a list of strings"
    } else if last == "content" || inner.contains("MessageContent") {
        "a message `content` must be a string or a list of content parts"
    } else {
        return inner.to_string();
    };
    expected.to_string()
}

/// Fields this server accepts beyond OpenAI's (vLLM's names). vLLM fields it does not honour
/// are refused by name (`unsupported`); other unknown fields are ignored.
#[derive(Debug, Default, Deserialize)]
pub struct Extensions {
    /// Keep only the k most likely tokens; 0 or -1 disables.
    pub top_k: Option<i64>,
    /// Keep generating past the end-of-sequence token.
    pub ignore_eos: Option<bool>,
    /// Token ids that end generation (counted as "stop").
    pub stop_token_ids: Option<Vec<u32>>,
    /// Also return the generated token ids (`token_ids` in each choice). Always on when the
    /// model has no tokenizer.
    pub return_token_ids: Option<bool>,
    /// Extra chat template variables (e.g. `{"thinking": true}` for DeepSeek-V3.1).
    pub chat_template_kwargs: Option<serde_json::Map<String, Value>>,
    /// Chat: continue the last (assistant) message instead of answering it (as DeepSeek's
    /// `prefix: true` on that message).
    pub continue_final_message: Option<bool>,
    /// Above 1 makes tokens of the prompt or output less likely (transformers' and vLLM's rule).
    pub repetition_penalty: Option<f32>,
    /// End-of-sequence and stop token ids cannot be chosen before this many tokens.
    pub min_tokens: Option<u32>,
}

/// A parsed request body: the OpenAI request, the extensions, and the JSON as sent.
pub struct Parsed<T> {
    pub request: T,
    pub extensions: Extensions,
    pub raw: Value,
}

/// Parses a request body of type `T`. A missing `model` is filled in with `default_model`.
pub fn parse_request<T: DeserializeOwned>(bytes: &[u8], default_model: &str) -> Result<Parsed<T>, ApiError> {
    let mut value = parse_object(bytes)?;
    if let Some(obj) = value.as_object_mut() {
        match obj.get("model") {
            None | Some(Value::Null) => {
                obj.insert("model".into(), Value::String(default_model.to_string()));
            }
            Some(_) => {}
        }
    }
    let extensions = typed::<Extensions>(&value)?;
    let request = typed::<T>(&value)?;
    Ok(Parsed {
        request,
        extensions,
        raw: value,
    })
}
