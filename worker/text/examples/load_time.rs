//! Measures how long loading a tokenizer takes, plus encode/decode speed.
//!
//! `cargo run --release -p dsv3-text --example load_time [MODEL_DIR]`
//! (default: the real DeepSeek-V3 tokenizer in tests/golden/tokenizer/deepseek-v3).

use std::path::PathBuf;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden/tokenizer/deepseek-v3"));
    let mut times = Vec::new();
    let mut tok = None;
    for _ in 0..5 {
        let t = Instant::now();
        tok = dsv3_text::Tokenizer::from_model_dir(&dir)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let tok = tok.ok_or("no tokenizer.json in the directory")?;
    times.sort_by(f64::total_cmp);
    println!(
        "load {} (vocab {}): min {:.1} ms, median {:.1} ms, max {:.1} ms over {} loads",
        dir.display(),
        tok.vocab_size(),
        times[0],
        times[times.len() / 2],
        times[times.len() - 1],
        times.len()
    );

    let text = "The quick brown fox jumps over the lazy dog. 深度求索发布了新模型。🦀 fn main() {}\n".repeat(2000);
    let t = Instant::now();
    let ids = tok.encode(&text, true)?;
    let enc = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let back = tok.decode(&ids, true)?;
    let dec = t.elapsed().as_secs_f64();
    assert_eq!(back, text);
    let t = Instant::now();
    let mut stream = tok.stream_decoder(true);
    let streamed = stream.push_all(&ids)? + &stream.finish()?;
    let st = t.elapsed().as_secs_f64();
    assert_eq!(streamed, text);
    println!(
        "encode {} bytes -> {} ids: {:.1} ms ({:.2} MB/s); decode {:.1} ms; stream decode {:.2} µs/token",
        text.len(),
        ids.len(),
        enc * 1e3,
        text.len() as f64 / enc / 1e6,
        dec * 1e3,
        st * 1e6 / ids.len() as f64
    );
    Ok(())
}
