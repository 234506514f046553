//! Incremental detokenization for streaming responses.

use crate::error::Result;
use crate::tokenizer::Tokenizer;

const REPLACEMENT: char = '\u{FFFD}';

/// Turns generated token ids into text as they arrive, emitting only complete text.
///
/// The method of vLLM and text-generation-inference: keep a window of ids starting at
/// `prefix_offset`; the ids before `read_offset` have been emitted. On each new id, decode the
/// window with and without the unread ids; if the longer text extends the shorter one and does
/// not end in U+FFFD (a UTF-8 sequence still missing bytes, e.g. half of an emoji spread over
/// byte-level tokens), emit the new suffix and move the window forward. Decoding a window that
/// starts a few tokens back (rather than only the new ids) keeps decoders that treat the first
/// token specially (SentencePiece-style leading spaces) correct.
///
/// The concatenation of everything returned by [`push`](Self::push) and
/// [`finish`](Self::finish) equals `decode(all_ids)`.
#[derive(Debug)]
pub struct StreamDecoder {
    tokenizer: Tokenizer,
    skip_special_tokens: bool,
    /// Ids from `prefix_offset` on (earlier ones are no longer needed).
    ids: Vec<u32>,
    /// Ids in `ids` already turned into emitted text (`ids[..read]`).
    read: usize,
    /// `decode(ids[..read])`, cached.
    prefix_text: String,
}

impl StreamDecoder {
    pub fn new(tokenizer: Tokenizer, skip_special_tokens: bool) -> Self {
        StreamDecoder {
            tokenizer,
            skip_special_tokens,
            ids: Vec::new(),
            read: 0,
            prefix_text: String::new(),
        }
    }

    /// Adds one id; returns the text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids, self.skip_special_tokens)?;
        if text.len() <= self.prefix_text.len() || text.ends_with(REPLACEMENT) {
            return Ok(None);
        }
        let new = match text.strip_prefix(self.prefix_text.as_str()) {
            Some(suffix) => suffix.to_string(),
            // A decoder that rewrote earlier text: emit what follows the common prefix.
            None => text[common_prefix_len(&self.prefix_text, &text)..].to_string(),
        };
        // Slide the window: what was unread becomes the new prefix.
        self.ids.drain(..self.read);
        self.read = self.ids.len();
        self.prefix_text = if self.read == 0 {
            String::new()
        } else {
            self.tokenizer.decode(&self.ids, self.skip_special_tokens)?
        };
        Ok(Some(new))
    }

    /// Adds several ids; returns the text they complete (possibly empty).
    pub fn push_all(&mut self, ids: &[u32]) -> Result<String> {
        let mut out = String::new();
        for &id in ids {
            if let Some(s) = self.push(id)? {
                out.push_str(&s);
            }
        }
        Ok(out)
    }

    /// Ends the stream: returns whatever text is still held back (an incomplete UTF-8 sequence at
    /// the very end comes out as U+FFFD, as in `decode`). The decoder is then empty and can be
    /// reused.
    pub fn finish(&mut self) -> Result<String> {
        let out = if self.ids.len() > self.read {
            let text = self.tokenizer.decode(&self.ids, self.skip_special_tokens)?;
            match text.strip_prefix(self.prefix_text.as_str()) {
                Some(suffix) => suffix.to_string(),
                None => text[common_prefix_len(&self.prefix_text, &text)..].to_string(),
            }
        } else {
            String::new()
        };
        self.ids.clear();
        self.read = 0;
        self.prefix_text.clear();
        Ok(out)
    }

    /// Whether text is held back waiting for more ids.
    pub fn has_pending(&self) -> bool {
        self.ids.len() > self.read
    }
}

/// Length in bytes of the longest common prefix of `a` and `b`, on a char boundary.
fn common_prefix_len(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, ca), cb)| ca != cb)
        .map_or_else(|| a.len().min(b.len()), |((i, _), _)| i)
}
