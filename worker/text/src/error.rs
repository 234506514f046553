use std::path::PathBuf;

/// Errors of the text layer. Every variant says which file, field, message or token is at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file (or embedded blob) that is not valid JSON or does not have the expected shape.
    #[error("{file}: {message}")]
    File { file: String, message: String },
    /// A field of a file that is missing or has an unusable value.
    #[error("{file}: field `{field}`: {message}")]
    Field {
        file: String,
        field: String,
        message: String,
    },
    /// The tokenizer library failed to encode or decode.
    #[error("tokenizer ({file}): {message}")]
    Tokenizer { file: String, message: String },
    /// The chat request (messages, tools, template arguments) is not acceptable.
    #[error("invalid chat request: {0}")]
    Chat(String),
    /// The model directory has no chat template.
    #[error("the tokenizer ({0}) has no chat template")]
    NoChatTemplate(String),
    /// The chat template failed to compile or render (including `raise_exception` calls).
    #[error("chat template: {0}")]
    Template(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
