//! A model directory from hostile files: the input is `config.json`, a shard index and one
//! safetensors shard, split at the first two 0xFF bytes. Opening it must end in a checkpoint or
//! an error naming the problem — never a panic, never a read past the data (libFuzzer's 2 GB
//! resident-memory limit catches allocations sized by a header field and then filled).
#![no_main]

use dsv3_engine::{Checkpoint, ModelConfig, ModelFiles};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |&b| b == 0xFF);
    let (Some(config), Some(index), Some(shard)) = (parts.next(), parts.next(), parts.next()) else {
        return;
    };
    let Ok(dir) = tempdir() else { return };
    let write = |name: &str, bytes: &[u8]| std::fs::write(dir.join(name), bytes);
    if write("config.json", config).is_err()
        || write(dsv3_engine::INDEX_FILE, index).is_err()
        || write("model-00001-of-00001.safetensors", shard).is_err()
    {
        return;
    }
    let files = ModelFiles::Dir(dir.clone());
    let _ = ModelConfig::from_model_files(&files);
    if let Ok(checkpoint) = Checkpoint::open(&files) {
        let names: Vec<String> = checkpoint.tensor_names().take(64).cloned().collect();
        for name in names {
            if let Ok(tensor) = checkpoint.get(&name) {
                // Converting reads exactly the bytes the header claims: never past the data.
                if tensor.elements() <= 1 << 20 {
                    let _ = tensor.to_f32_vec();
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
});

fn tempdir() -> std::io::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("dsv3-fuzz-checkpoint-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
