//! Per-sequence edits to the logits before a token is chosen: repetition, frequency and presence
//! penalties, `logit_bias`, and `min_tokens` (the end tokens banned until enough output exists).
//!
//! Each rule touches few tokens (those seen, biased or banned), so a step's adjustment is a short
//! list of [`LogitEdit`]s per row that any backend applies where the logits are — the host's
//! [`apply_edits`] and the GPU's `apply_logit_edits` follow the same rule. The order is vLLM's:
//! the bias is added, the repetition penalty scales the result, the frequency and presence
//! penalties are subtracted, and a banned token is `-inf`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Condvar, Mutex};

/// What a request asks to change in its logits; the default changes nothing.
#[derive(Clone, Debug, PartialEq)]
pub struct LogitRules {
    /// Subtracted once from every token already in the output.
    pub presence_penalty: f32,
    /// Subtracted from each token once per time it occurs in the output.
    pub frequency_penalty: f32,
    /// Above 1 makes tokens of the prompt or output less likely: a positive logit is divided by it,
    /// a negative one multiplied. 1 is off.
    pub repetition_penalty: f32,
    /// Added to the logit of each token (sorted by id, one entry per id).
    pub logit_bias: Vec<(u32, f32)>,
    /// End tokens cannot be chosen before this many tokens are generated.
    pub min_tokens: usize,
}

impl Default for LogitRules {
    fn default() -> Self {
        LogitRules {
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
            min_tokens: 0,
        }
    }
}

impl LogitRules {
    /// Whether any rule changes a logit.
    pub fn is_active(&self) -> bool {
        self != &LogitRules::default()
    }

    pub fn validate(&self, vocab_size: usize) -> Result<(), String> {
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(format!("{name} must be between -2 and 2, got {v}"));
            }
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty <= 2.0) {
            return Err(format!(
                "repetition_penalty must be in (0, 2], got {}",
                self.repetition_penalty
            ));
        }
        for &(id, bias) in &self.logit_bias {
            if id as usize >= vocab_size {
                return Err(format!(
                    "logit_bias names token id {id}, outside the vocabulary of {vocab_size} ids"
                ));
            }
            if !(-100.0..=100.0).contains(&bias) {
                return Err(format!(
                    "logit_bias for token {id} must be between -100 and 100, got {bias}"
                ));
            }
        }
        Ok(())
    }
}

/// One token's change in one row: `logit = repeat(logit + bias) + add`, where `repeat` divides
/// a positive value by `repetition` and multiplies a negative one (1: unchanged). `add` is
/// `-inf` for a banned token.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LogitEdit {
    pub token: u32,
    pub bias: f32,
    pub repetition: f32,
    pub add: f32,
}

impl LogitEdit {
    fn new(token: u32) -> Self {
        LogitEdit {
            token,
            bias: 0.0,
            repetition: 1.0,
            add: 0.0,
        }
    }

    pub fn apply(&self, logit: f32) -> f32 {
        let biased = logit + self.bias;
        let scaled = if self.repetition == 1.0 {
            biased
        } else if biased > 0.0 {
            biased / self.repetition
        } else {
            biased * self.repetition
        };
        scaled + self.add
    }
}

/// Applies `edits` to one row of logits (ids outside the row are ignored).
pub fn apply_edits(row: &mut [f32], edits: &[LogitEdit]) {
    for e in edits {
        if let Some(l) = row.get_mut(e.token as usize) {
            *l = e.apply(*l);
        }
    }
}

/// The tokens a grammar allows next: a bitset over the vocabulary (bit `i % 32` of word
/// `i / 32` set when token `i` is allowed; ids past the words are not allowed), made while the
/// step's forward pass runs and waited for only when the token is picked.
#[derive(Clone)]
pub struct TokenMask(Arc<MaskSlot>);

#[derive(Default)]
struct MaskSlot {
    words: Mutex<Option<Result<Arc<Vec<u32>>, String>>>,
    made: Condvar,
}

impl TokenMask {
    /// A mask computed on its own thread by `make` (an error ends the sequence).
    pub fn in_background(make: impl FnOnce() -> Result<Vec<u32>, String> + Send + 'static) -> Self {
        let mask = TokenMask(Arc::default());
        let slot = mask.0.clone();
        std::thread::spawn(move || {
            let words = make().map(Arc::new);
            if let Ok(mut w) = slot.words.lock() {
                *w = Some(words);
            }
            slot.made.notify_all();
        });
        mask
    }

    /// A mask known now.
    pub fn ready(words: Vec<u32>) -> Self {
        let mask = TokenMask(Arc::default());
        if let Ok(mut w) = mask.0.words.lock() {
            *w = Some(Ok(Arc::new(words)));
        }
        mask
    }

    /// The words, once made.
    pub fn wait(&self) -> Result<Arc<Vec<u32>>, String> {
        let mut guard = self
            .0
            .words
            .lock()
            .map_err(|_| "a token mask's maker panicked".to_string())?;
        loop {
            if let Some(words) = guard.as_ref() {
                return words.clone();
            }
            guard = self
                .0
                .made
                .wait(guard)
                .map_err(|_| "a token mask's maker panicked".to_string())?;
        }
    }

    pub fn allows(words: &[u32], token: usize) -> bool {
        words.get(token / 32).is_some_and(|w| w >> (token % 32) & 1 == 1)
    }
}

impl std::fmt::Debug for TokenMask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenMask")
    }
}

impl PartialEq for TokenMask {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// Sets every token `words` does not allow to `-inf`.
pub fn apply_mask(row: &mut [f32], words: &[u32]) {
    for (id, l) in row.iter_mut().enumerate() {
        if !TokenMask::allows(words, id) {
            *l = f32::NEG_INFINITY;
        }
    }
}

/// One sequence's rules and what they need to know of its tokens so far.
#[derive(Clone, Debug)]
pub struct LogitState {
    rules: LogitRules,
    /// Distinct prompt tokens (kept only for the repetition penalty).
    prompt: BTreeSet<u32>,
    /// Output tokens and how often each occurred.
    output: BTreeMap<u32, u32>,
    generated: usize,
    /// Banned while `generated < min_tokens`.
    end_ids: Vec<u32>,
}

impl LogitState {
    /// The state of a sequence whose prompt is `prompt` and which has generated `output`;
    /// `end_ids` are the tokens that would end it (banned until `min_tokens`).
    pub fn new(rules: LogitRules, prompt: &[u32], output: &[u32], end_ids: Vec<u32>) -> Self {
        let prompt = if rules.repetition_penalty != 1.0 {
            prompt.iter().copied().collect()
        } else {
            BTreeSet::new()
        };
        let mut state = LogitState {
            rules,
            prompt,
            output: BTreeMap::new(),
            generated: 0,
            end_ids,
        };
        for &t in output {
            state.record(t);
        }
        state
    }

    /// Notes a token the sequence generated.
    pub fn record(&mut self, token: u32) {
        *self.output.entry(token).or_insert(0) += 1;
        self.generated += 1;
    }

    /// The edits for the next token, one per token they touch, by ascending id.
    pub fn edits(&self) -> Vec<LogitEdit> {
        let r = &self.rules;
        let mut edits: BTreeMap<u32, LogitEdit> = BTreeMap::new();
        fn edit(edits: &mut BTreeMap<u32, LogitEdit>, token: u32) -> &mut LogitEdit {
            edits.entry(token).or_insert(LogitEdit::new(token))
        }
        if r.repetition_penalty != 1.0 {
            for &t in self.prompt.iter().chain(self.output.keys()) {
                edit(&mut edits, t).repetition = r.repetition_penalty;
            }
        }
        if r.presence_penalty != 0.0 || r.frequency_penalty != 0.0 {
            for (&t, &count) in &self.output {
                edit(&mut edits, t).add -= r.frequency_penalty * count as f32 + r.presence_penalty;
            }
        }
        for &(t, bias) in &r.logit_bias {
            edit(&mut edits, t).bias = bias;
        }
        if self.generated < r.min_tokens {
            for &t in &self.end_ids {
                edit(&mut edits, t).add = f32::NEG_INFINITY;
            }
        }
        edits
            .into_values()
            .filter(|e| e.bias != 0.0 || e.repetition != 1.0 || e.add != 0.0)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rules written out over a whole row, independently of the sparse edits, in vLLM's
    /// order: the bias, `apply_penalties` (repetition, frequency, presence), the min-tokens ban.
    fn dense(row: &[f32], rules: &LogitRules, prompt: &[u32], output: &[u32], end_ids: &[u32]) -> Vec<f32> {
        row.iter()
            .enumerate()
            .map(|(id, &l)| {
                let id = id as u32;
                let count = output.iter().filter(|&&t| t == id).count() as f32;
                let seen = count > 0.0 || prompt.contains(&id);
                let l = l + rules.logit_bias.iter().filter(|b| b.0 == id).map(|b| b.1).sum::<f32>();
                let mut l = if seen && l > 0.0 {
                    l / rules.repetition_penalty
                } else if seen {
                    l * rules.repetition_penalty
                } else {
                    l
                };
                l -= rules.frequency_penalty * count;
                if count > 0.0 {
                    l -= rules.presence_penalty;
                }
                if output.len() < rules.min_tokens && end_ids.contains(&id) {
                    l = f32::NEG_INFINITY;
                }
                l
            })
            .collect()
    }

    #[test]
    fn sparse_edits_match_the_rules_over_the_whole_row() {
        let row: Vec<f32> = (0..40).map(|i| ((i as f32) * 0.77).sin() * 3.0).collect();
        let rules = LogitRules {
            presence_penalty: 0.5,
            frequency_penalty: 0.3,
            repetition_penalty: 1.3,
            logit_bias: vec![(2, 5.0), (7, -100.0), (30, 1.5)],
            min_tokens: 4,
        };
        let (prompt, output, end_ids) = ([1, 2, 3, 3, 9], [9, 9, 12, 30], [0, 39]);
        for generated in 0..=output.len() {
            let mut state = LogitState::new(rules.clone(), &prompt, &output[..generated.min(1)], end_ids.to_vec());
            for &t in &output[1.min(generated)..generated] {
                state.record(t);
            }
            let mut sparse = row.clone();
            apply_edits(&mut sparse, &state.edits());
            let want = dense(&row, &rules, &prompt, &output[..generated], &end_ids);
            for (id, (a, b)) in sparse.iter().zip(&want).enumerate() {
                assert!(
                    a == b || (a - b).abs() < 1e-6,
                    "token {id} after {generated} outputs: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn min_tokens_bans_the_end_ids_only_until_enough_output() {
        let rules = LogitRules {
            min_tokens: 2,
            ..Default::default()
        };
        let mut state = LogitState::new(rules, &[5], &[], vec![1]);
        assert_eq!(state.edits()[0].add, f32::NEG_INFINITY);
        state.record(3);
        assert_eq!(state.edits().len(), 1);
        state.record(4);
        assert!(state.edits().is_empty());
    }

    #[test]
    fn out_of_range_rules_are_named() {
        let bad = |r: LogitRules| r.validate(10).unwrap_err();
        assert!(bad(LogitRules {
            presence_penalty: 2.5,
            ..Default::default()
        })
        .contains("presence_penalty"));
        assert!(bad(LogitRules {
            repetition_penalty: 0.0,
            ..Default::default()
        })
        .contains("repetition_penalty"));
        assert!(bad(LogitRules {
            logit_bias: vec![(10, 1.0)],
            ..Default::default()
        })
        .contains("token id 10"));
        assert!(bad(LogitRules {
            logit_bias: vec![(1, 101.0)],
            ..Default::default()
        })
        .contains("-100 and 100"));
        assert!(!LogitRules::default().is_active());
    }
}
