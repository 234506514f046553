//! Streaming detokenisation of any id sequence, ids beyond the vocabulary included: text comes
//! out piece by piece or an error names the id — never a panic — and the pieces add up to the
//! whole sequence decoded at once.
#![no_main]

use std::sync::OnceLock;

use dsv3_text::{StreamDecoder, Tokenizer};
use libfuzzer_sys::fuzz_target;

fn tokenizer() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/golden/tiny-fp8");
        Tokenizer::from_model_dir(std::path::Path::new(dir))
            .expect("the tiny tokenizer")
            .expect("the tiny model has a tokenizer")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let skip_special = flags & 1 == 1;
    let ids: Vec<u32> = rest
        .chunks(2)
        .map(|c| u32::from(c[0]) | u32::from(*c.get(1).unwrap_or(&0)) << 8)
        .collect();
    let mut stream = StreamDecoder::new(tokenizer().clone(), skip_special);
    let mut text = String::new();
    for &id in &ids {
        match stream.push(id) {
            Ok(Some(piece)) => text.push_str(&piece),
            Ok(None) => {}
            Err(_) => return,
        }
    }
    let Ok(rest) = stream.finish() else { return };
    text.push_str(&rest);
    if let Ok(whole) = tokenizer().decode(&ids, skip_special) {
        assert_eq!(text, whole, "pieces of {ids:?}");
    }
});
