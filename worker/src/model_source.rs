//! Where the model comes from: a directory, or the small model built into the binary.

use anyhow::{Context, Result};
use dsv3_engine::ModelFiles;
use std::path::PathBuf;

/// The embedded default: the tiny FP8 DeepSeek-V3 checkpoint of the golden tests, in the
/// official format (sharded, with an index), with its tokenizer.
static EMBEDDED: &[(&str, &[u8])] = &[
    ("config.json", include_bytes!("../../tests/golden/tiny-fp8/config.json")),
    (
        "generation_config.json",
        include_bytes!("../../tests/golden/tiny-fp8/generation_config.json"),
    ),
    (
        "model.safetensors.index.json",
        include_bytes!("../../tests/golden/tiny-fp8/model.safetensors.index.json"),
    ),
    (
        "model-00001-of-00003.safetensors",
        include_bytes!("../../tests/golden/tiny-fp8/model-00001-of-00003.safetensors"),
    ),
    (
        "model-00002-of-00003.safetensors",
        include_bytes!("../../tests/golden/tiny-fp8/model-00002-of-00003.safetensors"),
    ),
    (
        "model-00003-of-00003.safetensors",
        include_bytes!("../../tests/golden/tiny-fp8/model-00003-of-00003.safetensors"),
    ),
    (
        "tokenizer.json",
        include_bytes!("../../tests/golden/tiny-fp8/tokenizer.json"),
    ),
    (
        "tokenizer_config.json",
        include_bytes!("../../tests/golden/tiny-fp8/tokenizer_config.json"),
    ),
];

/// The tokenizer of the model files, when they carry `tokenizer.json`.
pub fn tokenizer(files: &ModelFiles) -> Result<Option<dsv3_text::Tokenizer>> {
    let Some(json) = files.open(dsv3_text::TOKENIZER_FILE)? else {
        return Ok(None);
    };
    let config = files.open(dsv3_text::TOKENIZER_CONFIG_FILE)?;
    let tokenizer = dsv3_text::Tokenizer::from_bytes((*json).as_ref(), config.as_ref().map(|c| (**c).as_ref()))
        .with_context(|| format!("loading the tokenizer of {}", files.describe()))?;
    Ok(Some(tokenizer))
}

pub fn resolve(model: Option<PathBuf>) -> ModelFiles {
    match model {
        Some(dir) => ModelFiles::Dir(dir),
        None => ModelFiles::Embedded(EMBEDDED),
    }
}
