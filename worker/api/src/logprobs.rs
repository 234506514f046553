//! Logprobs in OpenAI's two formats: the legacy completions one (parallel lists) and the chat
//! one (a list of token objects).

use async_openai::types::chat::{ChatChoiceLogprobs, ChatCompletionTokenLogprob, Logprobs, TopLogprobs};
use dsv3_text::Tokenizer;
use serde_json::{Map, Value};

use crate::generation::TokenOutput;
use crate::tokens::{token_bytes, token_display};

/// OpenAI's value for "unknown / not among the top": chat logprobs are plain numbers.
const UNKNOWN_LOGPROB: f32 = -9999.0;

/// A token's display string and bytes. Without a tokenizer: `token_id:<id>` (vLLM's form) and
/// no bytes.
fn describe(tokenizer: Option<&Tokenizer>, id: u32) -> (String, Option<Vec<u8>>) {
    match tokenizer {
        Some(t) => {
            let bytes = token_bytes(t, id);
            (token_display(&bytes), Some(bytes))
        }
        None => (format!("token_id:{id}"), None),
    }
}

fn finite_or_unknown(logprob: Option<f32>) -> f32 {
    logprob.filter(|l| l.is_finite()).unwrap_or(UNKNOWN_LOGPROB)
}

/// The legacy completions format: `tokens`, `token_logprobs`, `top_logprobs` (one object per
/// position: token → logprob, the chosen token included), `text_offset` (characters of
/// generated text before each token).
pub fn completion_logprobs(tokenizer: Option<&Tokenizer>, tokens: &[TokenOutput]) -> Logprobs {
    let mut out = Logprobs::default();
    for t in tokens {
        let (text, _) = describe(tokenizer, t.id);
        let mut top = Map::new();
        for alt in &t.top_logprobs {
            let (alt_text, _) = describe(tokenizer, alt.id);
            top.entry(alt_text)
                .or_insert_with(|| Value::from(f64::from(alt.logprob)));
        }
        if let Some(lp) = t.logprob {
            top.entry(text.clone()).or_insert_with(|| Value::from(f64::from(lp)));
        }
        out.tokens.push(text);
        out.token_logprobs.push(t.logprob.filter(|l| l.is_finite()));
        out.top_logprobs.push(Value::Object(top));
        out.text_offset.push(u32::try_from(t.text_offset).unwrap_or(u32::MAX));
    }
    out
}

/// The chat format: `{"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]}`.
pub fn chat_logprobs(tokenizer: Option<&Tokenizer>, tokens: &[TokenOutput]) -> ChatChoiceLogprobs {
    let content = tokens
        .iter()
        .map(|t| {
            let (token, bytes) = describe(tokenizer, t.id);
            let top_logprobs = t
                .top_logprobs
                .iter()
                .map(|alt| {
                    let (token, bytes) = describe(tokenizer, alt.id);
                    TopLogprobs {
                        token,
                        logprob: finite_or_unknown(Some(alt.logprob)),
                        bytes,
                    }
                })
                .collect();
            ChatCompletionTokenLogprob {
                token,
                logprob: finite_or_unknown(t.logprob),
                bytes,
                top_logprobs,
            }
        })
        .collect();
    ChatChoiceLogprobs {
        content: Some(content),
        refusal: None,
    }
}
