//! DeepSeek-R1's and V3.1's thinking: the answer's text up to `</think>` is `reasoning_content`,
//! the rest `content`. The think block is open when the chat template ends the prompt with
//! `<think>` (R1, V3.1 with `chat_template_kwargs: {"thinking": true}`) or when the answer itself
//! begins with one (older R1 templates).

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";

/// Whether a rendered chat prompt leaves a think block open for the answer.
pub(crate) fn prompt_opens_think(prompt_text: &str) -> bool {
    prompt_text.trim_end().ends_with(OPEN)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Not known yet whether the answer opens a think block: text that could still become
    /// `<think>` is held.
    Start,
    Thinking,
    Answer,
}

/// Splits streamed answer text into reasoning and content, holding back text that might be
/// the start of a marker until the next piece decides it.
#[derive(Debug)]
pub(crate) struct ReasoningSplitter {
    phase: Phase,
    held: String,
}

/// One piece of answer text, split.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Split {
    pub reasoning: String,
    pub content: String,
}

/// The longest suffix of `text` that is a proper prefix of `marker` (to hold for the next piece).
fn partial_suffix(text: &str, marker: &str) -> usize {
    (1..marker.len().min(text.len() + 1))
        .rev()
        .find(|&n| text.is_char_boundary(text.len() - n) && marker.starts_with(&text[text.len() - n..]))
        .unwrap_or(0)
}

impl ReasoningSplitter {
    /// A splitter for an answer whose prompt did (`opened`) or did not open the think block.
    pub(crate) fn new(opened: bool) -> Self {
        ReasoningSplitter {
            phase: if opened { Phase::Thinking } else { Phase::Start },
            held: String::new(),
        }
    }

    /// Splits the next piece of text.
    pub(crate) fn push(&mut self, text: &str) -> Split {
        let mut out = Split::default();
        self.held.push_str(text);
        loop {
            match self.phase {
                Phase::Start => {
                    let trimmed = self.held.trim_start();
                    if let Some(rest) = trimmed.strip_prefix(OPEN) {
                        self.held = rest.to_string();
                        self.phase = Phase::Thinking;
                    } else if !trimmed.is_empty() && !OPEN.starts_with(trimmed) {
                        self.phase = Phase::Answer;
                    } else {
                        return out; // whitespace or a prefix of `<think>`: wait
                    }
                }
                Phase::Thinking => {
                    if let Some(at) = self.held.find(CLOSE) {
                        out.reasoning.push_str(&self.held[..at]);
                        self.held = self.held[at + CLOSE.len()..].to_string();
                        self.phase = Phase::Answer;
                    } else {
                        let keep = partial_suffix(&self.held, CLOSE);
                        let emit = self.held.len() - keep;
                        out.reasoning.push_str(&self.held[..emit]);
                        self.held.drain(..emit);
                        return out;
                    }
                }
                Phase::Answer => {
                    out.content.push_str(&self.held);
                    self.held.clear();
                    return out;
                }
            }
        }
    }

    /// The end of the answer: whatever is held, where it belongs (an unclosed think block is
    /// all reasoning).
    pub(crate) fn finish(&mut self) -> Split {
        let held = std::mem::take(&mut self.held);
        match self.phase {
            Phase::Thinking => Split {
                reasoning: held,
                content: String::new(),
            },
            Phase::Start | Phase::Answer => Split {
                reasoning: String::new(),
                content: held,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn streamed(opened: bool, pieces: &[&str]) -> Split {
        let mut s = ReasoningSplitter::new(opened);
        let mut all = Split::default();
        for p in pieces {
            let part = s.push(p);
            all.reasoning.push_str(&part.reasoning);
            all.content.push_str(&part.content);
        }
        let rest = s.finish();
        all.reasoning.push_str(&rest.reasoning);
        all.content.push_str(&rest.content);
        all
    }

    fn split(reasoning: &str, content: &str) -> Split {
        Split {
            reasoning: reasoning.into(),
            content: content.into(),
        }
    }

    #[test]
    fn splits_at_the_end_of_the_think_block_however_the_text_arrives() {
        let text = "Let me think.\nOK.</think>\n\nThe answer is 4.";
        let want = split("Let me think.\nOK.", "\n\nThe answer is 4.");
        assert_eq!(streamed(true, &[text]), want);
        // Every way of cutting the text into two and three pieces.
        for i in 0..=text.len() {
            for j in i..=text.len() {
                assert_eq!(
                    streamed(true, &[&text[..i], &text[i..j], &text[j..]]),
                    want,
                    "cut at {i}, {j}"
                );
            }
        }
    }

    #[test]
    fn an_answer_may_open_the_block_itself() {
        let want = split("hmm", "yes");
        assert_eq!(streamed(false, &["<th", "ink>hm", "m</th", "ink>yes"]), want);
        assert_eq!(streamed(false, &["\n<think>hmm</think>yes"]), want);
        // No block: all content, also when it starts like one.
        assert_eq!(streamed(false, &["<th", "is is plain"]), split("", "<this is plain"));
        assert_eq!(streamed(false, &["<", "b>bold</b>"]), split("", "<b>bold</b>"));
    }

    #[test]
    fn an_unclosed_block_is_all_reasoning() {
        assert_eq!(
            streamed(true, &["still thinking </thi"]),
            split("still thinking </thi", "")
        );
        assert_eq!(streamed(true, &[]), split("", ""));
    }

    #[test]
    fn multibyte_text_is_never_cut_inside_a_character() {
        assert_eq!(streamed(true, &["思考", "中</", "think>答"]), split("思考中", "答"));
    }

    #[test]
    fn think_prompts() {
        assert!(prompt_opens_think("<｜User｜>hi<｜Assistant｜><think>\n"));
        assert!(!prompt_opens_think("<｜User｜>hi<｜Assistant｜></think>"));
        assert!(!prompt_opens_think("<｜User｜>hi<｜Assistant｜>"));
    }
}
