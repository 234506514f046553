//! The tiny test model's tokenizer (1000 ids, DeepSeek pre-tokenizer and special tokens).
//! Expected ids come from Python (tests/golden/make_fixtures.py; see tests/golden/README.md).

use std::path::Path;

use dsv3_text::Tokenizer;
use serde_json::json;

fn tiny() -> Option<Tokenizer> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden/tiny-bf16");
    Tokenizer::from_model_dir(&dir).expect("load tiny tokenizer")
}

#[test]
fn tiny_tokenizer_matches_python() {
    let Some(tok) = tiny() else {
        eprintln!("tests/golden/tiny-bf16/tokenizer.json not present; skipping");
        return;
    };
    assert_eq!(tok.vocab_size(), 1000);
    assert_eq!(tok.bos_token_id(), Some(0));
    assert_eq!(tok.eos_token_id(), Some(1));
    assert_eq!(tok.token_to_id("<｜User｜>"), Some(988));
    assert_eq!(tok.token_to_id("<｜Assistant｜>"), Some(989));

    let ids = tok.encode("Hello, 世界! 🎉", false).unwrap();
    assert_eq!(ids, [683, 13, 222, 692, 2, 402, 238, 233]);
    assert_eq!(tok.decode(&ids, false).unwrap(), "Hello, 世界! 🎉");
    // add_bos_token: true in its tokenizer_config.json (transformers 4 semantics).
    assert_eq!(
        tok.encode("Hello, 世界! 🎉", true).unwrap(),
        [0, 683, 13, 222, 692, 2, 402, 238, 233]
    );
    assert_eq!(
        tok.encode("Hello, world! 你好，世界。", false).unwrap(),
        [683, 13, 615, 533, 2, 222, 561, 256, 453, 312, 692, 298]
    );

    let messages = [
        json!({"role": "system", "content": "You are helpful"}),
        json!({"role": "user", "content": "Hi"}),
        json!({"role": "assistant", "content": "Hello"}),
        json!({"role": "user", "content": "How are you? 你好"}),
    ];
    let text = tok.chat_template().unwrap().render(&messages, None, true).unwrap();
    assert_eq!(
        text,
        "<｜begin▁of▁sentence｜>You are helpful<｜User｜>Hi<｜Assistant｜>Hello<｜end▁of▁sentence｜><｜User｜>How are you? 你好<｜Assistant｜>"
    );
    assert_eq!(
        tok.encode_chat(&messages, None, true).unwrap(),
        [
            0, 58, 291, 465, 222, 264, 837, 822, 988, 41, 74, 989, 683, 1, 988, 41, 435, 465, 462, 32, 222, 561, 256,
            453, 989
        ]
    );

    // Streaming over the whole id range of the small vocabulary, including byte tokens and
    // padding ids the tokenizer does not define (1002, 1007 occur in the fp8 reference run).
    let all: Vec<u32> = (0..1010).collect();
    let want = tok.decode(&all, false).unwrap();
    let mut dec = tok.stream_decoder(false);
    let got = dec.push_all(&all).unwrap() + &dec.finish().unwrap();
    assert_eq!(got, want);
}
