//! The engine loaded from the tiny model's weights under a hostile `config.json` (the input).
//! Loading must end in a model or an error naming the problem — never a panic, never an
//! allocation sized by a config field (libFuzzer's 2 GB resident-memory limit) — and a model that
//! loads must take a short greedy generation without panicking: the fields the weights cannot
//! check (top-k, groups, scaling, rope, token ids, context) are the ones a step trusts.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use dsv3_engine::{Engine, EngineOptions, GenerateRequest, ModelFiles, SamplingParams};
use libfuzzer_sys::fuzz_target;

const WEIGHTS: &str = "../tests/golden/tiny-fp8";

/// A directory with the tiny model's files, its config.json rewritten by each input.
fn model_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("dsv3-fuzz-model-load-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temporary model directory");
        let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(WEIGHTS);
        for entry in std::fs::read_dir(&source).expect("the tiny model") {
            let path = entry.expect("entry").path();
            let name = path.file_name().expect("file name").to_owned();
            if name != "config.json" {
                std::fs::copy(&path, dir.join(&name)).expect("copy");
            }
        }
        dir
    })
}

fuzz_target!(|config: &[u8]| {
    let dir = model_dir();
    if std::fs::write(dir.join("config.json"), config).is_err() {
        return;
    }
    let options = EngineOptions {
        cache_tokens: 256,
        ..EngineOptions::default()
    };
    let Ok(mut engine) = Engine::load(&ModelFiles::Dir(dir.clone()), options, &mut |_| {}) else {
        return;
    };
    let request = GenerateRequest {
        prompt: vec![0, 5, 77, 300, 12],
        params: SamplingParams {
            max_tokens: 3,
            seed: Some(1),
            ..SamplingParams::default()
        },
    };
    let _ = engine.generate(&[request]);
});
