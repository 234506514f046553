use std::path::Path;
use std::sync::Arc;

use serde_json::Value as Json;

use crate::chat::{ChatTemplate, SpecialTokens};
use crate::error::{Error, Result};
use crate::stream::StreamDecoder;

/// File names inside a Hugging Face model directory.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
/// Newer transformers versions save the chat template next to the config; it then wins over the
/// `chat_template` field of `tokenizer_config.json` (as in transformers).
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";

/// How `encode(text, add_special_tokens = true)` adds special tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SpecialTokenMode {
    /// transformers' Llama-family fast tokenizers (DeepSeek-V3 declares `LlamaTokenizerFast`)
    /// replace the post-processor of tokenizer.json by `[bos] text [eos]`, with `add_bos_token`
    /// (default true) and `add_eos_token` (default false) from tokenizer_config.json.
    BosEos { bos: Option<u32>, eos: Option<u32> },
    /// Whatever the `post_processor` of tokenizer.json does (generic fast tokenizer).
    PostProcessor,
}

/// A tokenizer loaded from a model directory: byte-level BPE (or any model the `tokenizers`
/// crate reads) plus the special tokens and chat template of `tokenizer_config.json`.
///
/// Cheap to clone (shared inside); `Send + Sync`.
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<Inner>,
}

#[derive(Clone)]
struct Inner {
    tk: tokenizers::Tokenizer,
    /// Where it came from, for error messages.
    source: String,
    special: SpecialTokens,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    pad_id: Option<u32>,
    mode: SpecialTokenMode,
    vocab_size: usize,
    chat_template: Option<ChatTemplate>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.inner.source)
            .field("vocab_size", &self.inner.vocab_size)
            .field("bos_token_id", &self.inner.bos_id)
            .field("eos_token_id", &self.inner.eos_id)
            .field("has_chat_template", &self.inner.chat_template.is_some())
            .finish()
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

impl Tokenizer {
    /// Loads `tokenizer.json`, `tokenizer_config.json` (optional) and `chat_template.jinja`
    /// (optional) from a model directory. `Ok(None)` when the directory has no tokenizer.json.
    pub fn from_model_dir(dir: &Path) -> Result<Option<Tokenizer>> {
        let tokenizer_json = dir.join(TOKENIZER_FILE);
        if !tokenizer_json.is_file() {
            return Ok(None);
        }
        let config = dir.join(TOKENIZER_CONFIG_FILE);
        let config = config.is_file().then_some(config);
        let template_file = dir.join(CHAT_TEMPLATE_FILE);
        let template = if template_file.is_file() {
            let bytes = read_file(&template_file)?;
            let source = String::from_utf8(bytes).map_err(|e| Error::File {
                file: template_file.display().to_string(),
                message: format!("not UTF-8: {e}"),
            })?;
            Some((source, template_file.display().to_string()))
        } else {
            None
        };
        let json = read_file(&tokenizer_json)?;
        let config = match config {
            Some(p) => Some((read_file(&p)?, p.display().to_string())),
            None => None,
        };
        let tok = Self::build(
            &json,
            tokenizer_json.display().to_string(),
            config.as_ref().map(|(b, name)| (b.as_slice(), name.as_str())),
            template,
        )?;
        Ok(Some(tok))
    }

    /// Loads a tokenizer from `tokenizer.json` and, optionally, `tokenizer_config.json`.
    pub fn from_files(tokenizer_json: &Path, tokenizer_config_json: Option<&Path>) -> Result<Self> {
        let json = read_file(tokenizer_json)?;
        let config = match tokenizer_config_json {
            Some(p) => Some((read_file(p)?, p.display().to_string())),
            None => None,
        };
        Self::build(
            &json,
            tokenizer_json.display().to_string(),
            config.as_ref().map(|(b, name)| (b.as_slice(), name.as_str())),
            None,
        )
    }

    /// Loads a tokenizer from in-memory copies of `tokenizer.json` and `tokenizer_config.json`
    /// (for a model embedded in the binary).
    pub fn from_bytes(tokenizer_json: &[u8], tokenizer_config_json: Option<&[u8]>) -> Result<Self> {
        Self::build(
            tokenizer_json,
            "<embedded tokenizer.json>".to_string(),
            tokenizer_config_json.map(|b| (b, "<embedded tokenizer_config.json>")),
            None,
        )
    }

    /// `template_file`: (source, file name) of a chat_template.jinja that overrides the config's.
    fn build(
        json: &[u8],
        source: String,
        config: Option<(&[u8], &str)>,
        template_file: Option<(String, String)>,
    ) -> Result<Self> {
        let tk = tokenizers::Tokenizer::from_bytes(json).map_err(|e| Error::File {
            file: source.clone(),
            message: format!("not a valid tokenizer: {e}"),
        })?;
        let vocab_size = defined_id_count(&tk);

        let (config, config_name) = match config {
            Some((bytes, name)) => {
                let v: Json = serde_json::from_slice(bytes).map_err(|e| Error::File {
                    file: name.to_string(),
                    message: format!("not valid JSON: {e}"),
                })?;
                if !v.is_object() {
                    return Err(Error::File {
                        file: name.to_string(),
                        message: "expected a JSON object".into(),
                    });
                }
                (v, name.to_string())
            }
            None => (Json::Object(Default::default()), String::new()),
        };

        let special = SpecialTokens {
            bos_token: special_token_field(&config, &config_name, "bos_token")?,
            eos_token: special_token_field(&config, &config_name, "eos_token")?,
            unk_token: special_token_field(&config, &config_name, "unk_token")?,
            pad_token: special_token_field(&config, &config_name, "pad_token")?,
            additional_special_tokens: additional_special_tokens(&config, &config_name)?,
        };
        let lookup = |field: &str, token: &Option<String>| -> Result<Option<u32>> {
            match token {
                None => Ok(None),
                Some(t) => tk.token_to_id(t).map(Some).ok_or_else(|| Error::Field {
                    file: config_name.clone(),
                    field: field.to_string(),
                    message: format!("token {t:?} is not in the vocabulary of {source}"),
                }),
            }
        };
        let bos_id = lookup("bos_token", &special.bos_token)?;
        let eos_id = lookup("eos_token", &special.eos_token)?;
        let pad_id = lookup("pad_token", &special.pad_token)?;

        let class = config.get("tokenizer_class").and_then(Json::as_str).unwrap_or("");
        let class = class.strip_suffix("Fast").unwrap_or(class);
        let llama_like = matches!(class, "LlamaTokenizer" | "CodeLlamaTokenizer" | "GemmaTokenizer");
        let explicit = config.get("add_bos_token").is_some() || config.get("add_eos_token").is_some();
        let mode = if llama_like || explicit {
            let add_bos = bool_field(&config, &config_name, "add_bos_token", llama_like)?;
            let add_eos = bool_field(&config, &config_name, "add_eos_token", false)?;
            let need = |add: bool, field: &str, id: Option<u32>| -> Result<Option<u32>> {
                match (add, id) {
                    (false, _) => Ok(None),
                    (true, Some(id)) => Ok(Some(id)),
                    (true, None) => Err(Error::Field {
                        file: config_name.clone(),
                        field: field.to_string(),
                        message: format!("is true but the config defines no {}", &field[4..]),
                    }),
                }
            };
            SpecialTokenMode::BosEos {
                bos: need(add_bos, "add_bos_token", bos_id)?,
                eos: need(add_eos, "add_eos_token", eos_id)?,
            }
        } else {
            SpecialTokenMode::PostProcessor
        };

        let chat_template = if let Some((src, file)) = template_file {
            Some(ChatTemplate::new(&src, special.clone()).map_err(|e| Error::File {
                file,
                message: e.to_string(),
            })?)
        } else {
            match config.get("chat_template") {
                None | Some(Json::Null) => None,
                Some(value) => {
                    let src = chat_template_source(value).ok_or_else(|| Error::Field {
                        file: config_name.clone(),
                        field: "chat_template".into(),
                        message: "expected a string or a list of {name, template} with a \"default\" entry".into(),
                    })?;
                    Some(ChatTemplate::new(src, special.clone()).map_err(|e| Error::Field {
                        file: config_name.clone(),
                        field: "chat_template".into(),
                        message: e.to_string(),
                    })?)
                }
            }
        };

        Ok(Tokenizer {
            inner: Arc::new(Inner {
                tk,
                source,
                special,
                bos_id,
                eos_id,
                pad_id,
                mode,
                vocab_size,
                chat_template,
            }),
        })
    }

    /// This tokenizer with `source` as its chat template instead of the model's (`file` names
    /// it in errors): a tool-aware template, or a fix for a model's own.
    pub fn with_chat_template(&self, source: &str, file: &str) -> Result<Tokenizer> {
        let template = ChatTemplate::new(source, self.inner.special.clone()).map_err(|e| Error::File {
            file: file.to_string(),
            message: e.to_string(),
        })?;
        let mut inner = (*self.inner).clone();
        inner.chat_template = Some(template);
        Ok(Tokenizer { inner: Arc::new(inner) })
    }

    fn tok_err(&self, e: impl std::fmt::Display) -> Error {
        Error::Tokenizer {
            file: self.inner.source.clone(),
            message: e.to_string(),
        }
    }

    /// Tokenizes plain text. `add_special_tokens` is transformers' flag of the same name: for
    /// DeepSeek-V3 (`add_bos_token: true`) it prepends the BOS id. Special-token strings in the
    /// text (e.g. `<｜User｜>`) are recognised as their ids, as in transformers.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let inner = &*self.inner;
        match inner.mode {
            SpecialTokenMode::PostProcessor => {
                let enc = inner
                    .tk
                    .encode_fast(text, add_special_tokens)
                    .map_err(|e| self.tok_err(e))?;
                Ok(enc.get_ids().to_vec())
            }
            SpecialTokenMode::BosEos { bos, eos } => {
                let enc = inner.tk.encode_fast(text, false).map_err(|e| self.tok_err(e))?;
                let body = enc.get_ids();
                let mut ids = Vec::with_capacity(body.len() + 2);
                if add_special_tokens {
                    ids.extend(bos);
                }
                ids.extend_from_slice(body);
                if add_special_tokens {
                    ids.extend(eos);
                }
                Ok(ids)
            }
        }
    }

    /// Turns ids back into text (as transformers' `decode`, with
    /// `clean_up_tokenization_spaces=False`). Ids the tokenizer does not define are skipped,
    /// as in Python.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .tk
            .decode(ids, skip_special_tokens)
            .map_err(|e| self.tok_err(e))
    }

    /// Renders the chat template (see [`ChatTemplate::render`]) and tokenizes the result without
    /// adding special tokens: the template writes the BOS text itself.
    pub fn encode_chat(
        &self,
        messages: &[Json],
        tools: Option<&Json>,
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        let template = self
            .chat_template()
            .ok_or_else(|| Error::NoChatTemplate(self.inner.source.clone()))?;
        let text = template.render(messages, tools, add_generation_prompt)?;
        self.encode(&text, false)
    }

    /// A streaming detokenizer over this tokenizer.
    pub fn stream_decoder(&self, skip_special_tokens: bool) -> StreamDecoder {
        StreamDecoder::new(self.clone(), skip_special_tokens)
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.inner.bos_id
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.inner.eos_id
    }

    pub fn pad_token_id(&self) -> Option<u32> {
        self.inner.pad_id
    }

    /// The special token strings of tokenizer_config.json (the variables the chat template sees).
    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.inner.special
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.tk.token_to_id(token)
    }

    /// The bytes each id stands for, ids `0..count` (what a grammar engine matches tokens by):
    /// byte-level pieces mapped back to their bytes, added tokens as their text, special ones
    /// behind a 0xFF byte (so no text matches them), ids the tokenizer lacks empty.
    pub fn token_bytes(&self, count: usize) -> Vec<Vec<u8>> {
        let added = self.inner.tk.get_added_tokens_decoder();
        let byte_of = byte_level_decoder();
        (0..count as u32)
            .map(|id| {
                if let Some(t) = added.get(&id) {
                    let mut bytes = if t.special { vec![0xFF] } else { Vec::new() };
                    bytes.extend(t.content.as_bytes());
                    return bytes;
                }
                let Some(piece) = self.inner.tk.id_to_token(id) else {
                    return Vec::new();
                };
                // Byte-level BPE (DeepSeek's): every char stands for one byte.
                let mapped: Option<Vec<u8>> = piece.chars().map(|c| byte_of.get(&c).copied()).collect();
                mapped.unwrap_or_else(|| self.decode(&[id], false).map(String::into_bytes).unwrap_or_default())
            })
            .collect()
    }

    /// The token string of an id (byte-level form, e.g. `Ġworld`), `None` for undefined ids.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.tk.id_to_token(id)
    }

    /// Whether `id` is an added token marked special (skipped by `skip_special_tokens`).
    pub fn is_special_id(&self, id: u32) -> bool {
        self.inner
            .tk
            .id_to_token(id)
            .is_some_and(|t| self.inner.tk.get_added_vocabulary().is_special_token(&t))
    }

    /// Number of ids the tokenizer defines (largest id + 1, added tokens included). The model's
    /// embedding may have more rows (DeepSeek-V3: 128,815 ids, 129,280 rows).
    pub fn vocab_size(&self) -> usize {
        self.inner.vocab_size
    }

    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.inner.chat_template.as_ref()
    }

    /// Where the tokenizer was loaded from (a path, or `<embedded tokenizer.json>`).
    pub fn source(&self) -> &str {
        &self.inner.source
    }
}

/// Largest defined id + 1. Cheap when the model's ids are contiguous (the usual case); otherwise
/// scans the whole vocabulary.
fn defined_id_count(tk: &tokenizers::Tokenizer) -> usize {
    use tokenizers::Model;
    let model = tk.get_model();
    let n = model.get_vocab_size();
    let model_end = if n == 0 {
        0
    } else if model.id_to_token(n as u32 - 1).is_some() && model.id_to_token(n as u32).is_none() {
        n
    } else {
        model.get_vocab().values().max().map_or(0, |&m| m as usize + 1)
    };
    let added_end = tk
        .get_added_tokens_decoder()
        .keys()
        .max()
        .map_or(0, |&m| m as usize + 1);
    model_end.max(added_end)
}

/// `bos_token` & co. are a string, an AddedToken object `{"content": ...}`, or null.
fn special_token_field(config: &Json, file: &str, field: &str) -> Result<Option<String>> {
    match config.get(field) {
        None | Some(Json::Null) => Ok(None),
        Some(v) => special_token_value(v).map(Some).ok_or_else(|| Error::Field {
            file: file.to_string(),
            field: field.to_string(),
            message: "expected a string or an object with a string `content`".into(),
        }),
    }
}

fn special_token_value(v: &Json) -> Option<String> {
    match v {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content").and_then(Json::as_str).map(str::to_string),
        _ => None,
    }
}

fn additional_special_tokens(config: &Json, file: &str) -> Result<Vec<String>> {
    match config.get("additional_special_tokens") {
        None | Some(Json::Null) => Ok(Vec::new()),
        Some(Json::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                special_token_value(v).ok_or_else(|| Error::Field {
                    file: file.to_string(),
                    field: format!("additional_special_tokens[{i}]"),
                    message: "expected a string or an object with a string `content`".into(),
                })
            })
            .collect(),
        Some(_) => Err(Error::Field {
            file: file.to_string(),
            field: "additional_special_tokens".into(),
            message: "expected a list".into(),
        }),
    }
}

fn bool_field(config: &Json, file: &str, field: &str, default: bool) -> Result<bool> {
    match config.get(field) {
        None | Some(Json::Null) => Ok(default),
        Some(Json::Bool(b)) => Ok(*b),
        Some(_) => Err(Error::Field {
            file: file.to_string(),
            field: field.to_string(),
            message: "expected true or false".into(),
        }),
    }
}

/// `chat_template` is a string, or a list of `{name, template}` of which "default" is used.
fn chat_template_source(v: &Json) -> Option<&str> {
    match v {
        Json::String(s) => Some(s),
        Json::Array(items) => items.iter().find_map(|item| {
            (item.get("name")?.as_str()? == "default")
                .then(|| item.get("template")?.as_str())
                .flatten()
        }),
        _ => None,
    }
}

/// GPT-2's byte-level alphabet read backwards: the char that stands for each byte → the byte.
fn byte_level_decoder() -> std::collections::HashMap<char, u8> {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    let mut next = 256u32;
    (0..=255u8)
        .map(|b| {
            let c = if printable(b) {
                char::from(b)
            } else {
                let c = char::from_u32(next).unwrap_or('\u{FFFD}');
                next += 1;
                c
            };
            (c, b)
        })
        .collect()
}
