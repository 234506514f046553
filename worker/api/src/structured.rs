//! Structured output: `response_format` (`json_object`, `json_schema`) as the grammar the
//! attention rank holds the answer to, checked here first so a bad schema is a 400.

use std::sync::{Arc, OnceLock};

use dsv3_engine::{ModelConfig, OutputGrammar};
use dsv3_grammar::Grammars;
use dsv3_text::Tokenizer;
use serde_json::Value;

use crate::error::ApiError;

/// The grammar of a request's `response_format`: none for `text` or when left out.
pub fn grammar_of(raw: &Value) -> Result<Option<OutputGrammar>, ApiError> {
    let field = "response_format";
    let Some(format) = raw.get(field).filter(|f| !f.is_null()) else {
        return Ok(None);
    };
    let kind = format.get("type").and_then(Value::as_str).ok_or_else(|| {
        ApiError::invalid(
            field,
            "`response_format` needs a `type`: text, json_object or json_schema",
        )
    })?;
    match kind {
        "text" => Ok(None),
        "json_object" => Ok(Some(OutputGrammar::JsonSchema(r#"{"type": "object"}"#.into()))),
        "json_schema" => {
            let schema = format
                .pointer("/json_schema/schema")
                .filter(|s| s.is_object() || s.is_boolean())
                .ok_or_else(|| {
                    ApiError::invalid(
                        "response_format.json_schema.schema",
                        "`response_format` `json_schema` needs `json_schema.schema`, a JSON schema object",
                    )
                })?;
            Ok(Some(OutputGrammar::JsonSchema(schema.to_string())))
        }
        other => Err(ApiError::invalid(
            field,
            format!("`response_format` type must be text, json_object or json_schema, got {other:?}"),
        )),
    }
}

/// The model's grammar engine, built on first use (it reads every token of the vocabulary).
#[derive(Default)]
pub struct GrammarCheck(OnceLock<Result<Arc<Grammars>, String>>);

impl GrammarCheck {
    /// Compiles `grammar` for the model; a schema the engine cannot use is a 400 naming `field`
    /// (`response_format`, or `tools` for a forced call's arguments) that says why.
    pub fn check(
        &self,
        grammar: &OutputGrammar,
        tokenizer: Option<&Tokenizer>,
        config: &ModelConfig,
        field: &'static str,
    ) -> Result<(), ApiError> {
        let grammars = self
            .0
            .get_or_init(|| {
                let tokenizer = tokenizer.ok_or("structured output needs the model's tokenizer")?;
                let eos = config
                    .eos_token_ids
                    .first()
                    .copied()
                    .ok_or("the model names no end-of-sequence token")?;
                Grammars::new(tokenizer, config.vocab_size, eos).map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|e| ApiError::invalid(field, e.clone()))?;
        grammars
            .constraint(grammar)
            .map(drop)
            .map_err(|e| ApiError::invalid(field, format!("`{field}`: the JSON schema cannot be used: {e}")))
    }
}
