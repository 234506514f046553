//! The text of single tokens, for logprobs: exact bytes (a token may hold part of a UTF-8
//! character) and a display string.

use dsv3_text::Tokenizer;

/// The bytes a token stands for.
///
/// Byte-level BPE vocabularies (DeepSeek-V3's) spell bytes with GPT-2's printable alphabet
/// (`Ġ` for a space); their token strings map back to exact bytes, also for tokens that hold
/// part of a UTF-8 character. Special tokens and tokens from other vocabularies fall back to
/// the UTF-8 of their decoded text.
pub fn token_bytes(tokenizer: &Tokenizer, id: u32) -> Vec<u8> {
    if !tokenizer.is_special_id(id) {
        if let Some(token) = tokenizer.id_to_token(id) {
            if let Some(bytes) = token.chars().map(byte_of_char).collect::<Option<Vec<u8>>>() {
                return bytes;
            }
        }
    }
    tokenizer
        .decode(&[id], false)
        .map(String::into_bytes)
        .unwrap_or_default()
}

/// A token's text for `token` fields: the text when its bytes are valid UTF-8, else
/// `bytes:\xe2\x80` (the form OpenAI uses for partial characters).
pub fn token_display(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_string(),
        Err(_) => {
            let mut s = String::from("bytes:");
            for b in bytes {
                s.push_str(&format!("\\x{b:02x}"));
            }
            s
        }
    }
}

/// GPT-2's `bytes_to_unicode`, inverted: printable Latin-1 bytes stand for themselves, the other
/// 68 bytes (in order) are spelled U+0100 onwards.
fn byte_of_char(c: char) -> Option<u8> {
    fn printable(b: u32) -> bool {
        (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    }
    let c = c as u32;
    if c < 256 {
        return printable(c).then_some(c as u8);
    }
    let n = usize::try_from(c - 256).ok()?;
    (0u8..=255).filter(|&b| !printable(u32::from(b))).nth(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_alphabet_inverts() {
        assert_eq!(byte_of_char('a'), Some(b'a'));
        assert_eq!(byte_of_char('Ġ'), Some(b' '));
        assert_eq!(byte_of_char('Ċ'), Some(b'\n'));
        assert_eq!(byte_of_char('Ā'), Some(0));
        assert_eq!(byte_of_char('ł'), Some(0xA0));
        assert_eq!(byte_of_char('Ń'), Some(0xAD));
        assert_eq!(byte_of_char('ń'), None);
        assert_eq!(byte_of_char(' '), None);
    }

    #[test]
    fn display_escapes_partial_utf8() {
        assert_eq!(token_display("hé".as_bytes()), "hé");
        assert_eq!(token_display(&[0xe2, 0x80]), "bytes:\\xe2\\x80");
    }
}
