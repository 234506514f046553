//! Text layer of dsv3: the tokenizer of a DeepSeek-V3 model directory (`tokenizer.json` +
//! `tokenizer_config.json`), its chat template, and streaming detokenization.
//!
//! - [`Tokenizer`]: load from a model directory, files or embedded bytes; `encode` / `decode`
//!   exactly as Hugging Face transformers' fast tokenizer does.
//! - [`ChatTemplate`]: the Jinja `chat_template`, rendered as transformers'
//!   `apply_chat_template(..., tokenize=False)` renders it.
//! - [`StreamDecoder`]: ids in, complete UTF-8 text out.

mod chat;
mod error;
mod pyfmt;
mod stream;
mod tokenizer;

pub use chat::{normalize_messages, ChatTemplate, SpecialTokens, ROLES};
pub use error::{Error, Result};
pub use pyfmt::{json_dumps, DumpOptions};
pub use stream::StreamDecoder;
pub use tokenizer::{Tokenizer, CHAT_TEMPLATE_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE};

// The router shares one tokenizer between request tasks and moves stream decoders across them.
const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Tokenizer>();
    send_sync::<ChatTemplate>();
    send_sync::<StreamDecoder>();
};
