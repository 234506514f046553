//! Next-token choice: greedy, temperature, top-k, top-p, seeded, after the sequence's
//! [`LogitRules`].

use crate::backend::TokenPick;
use crate::logit_rules::{apply_edits, LogitRules, LogitState};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means no top-k cut.
    pub top_k: usize,
    /// 1 means no nucleus cut.
    pub top_p: f32,
    /// Same seed, same tokens. None draws a seed from the OS.
    pub seed: Option<u64>,
    pub max_tokens: usize,
    pub stop_token_ids: Vec<u32>,
    /// Keep going past the model's end-of-sequence tokens.
    pub ignore_eos: bool,
    /// Penalties, bias and `min_tokens`, applied to the logits first.
    pub rules: LogitRules,
    /// What the output must match (structured output); applied where a grammar engine is
    /// (the attention rank).
    pub grammar: Option<OutputGrammar>,
}

/// A grammar a sequence's output must match.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutputGrammar {
    /// A JSON schema, as text (`{"type": "object"}` for any JSON object).
    JsonSchema(String),
    /// A grammar in llguidance's Lark dialect (JSON schemas inline with `%json`).
    Lark(String),
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: None,
            max_tokens: 16,
            stop_token_ids: vec![],
            ignore_eos: false,
            rules: LogitRules::default(),
            grammar: None,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!(
                "temperature must be a finite number >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        Ok(())
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// Logits of ids at or above this are never chosen (embedding rows the tokenizer lacks).
    vocab_limit: Option<usize>,
    /// What the rules need of the sequence's tokens; `None` when no rule is active.
    logit_state: Option<LogitState>,
}

impl Sampler {
    pub fn new(params: SamplingParams, vocab_limit: Option<usize>) -> Self {
        let rng = match params.seed {
            Some(seed) => ChaCha8Rng::seed_from_u64(seed),
            // std's hasher keys are drawn from the OS: a seed without another dependency.
            None => ChaCha8Rng::seed_from_u64(std::hash::BuildHasher::hash_one(
                &std::collections::hash_map::RandomState::new(),
                0u8,
            )),
        };
        Sampler {
            params,
            rng,
            vocab_limit,
            logit_state: None,
        }
    }

    /// A sampler for a sequence whose prompt is `prompt` and which has generated `output`;
    /// `end_ids` would end it (banned until `min_tokens`). The seeded stream starts past
    /// `output`'s draws.
    pub fn with_history(
        params: SamplingParams,
        vocab_limit: Option<usize>,
        prompt: &[u32],
        output: &[u32],
        end_ids: Vec<u32>,
    ) -> Self {
        let logit_state = params
            .rules
            .is_active()
            .then(|| LogitState::new(params.rules.clone(), prompt, output, end_ids));
        let mut sampler = Sampler::new(params, vocab_limit);
        sampler.logit_state = logit_state;
        sampler.skip_choices(output.len());
        sampler
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Moves the generator past the draws of `tokens` earlier choices (a request resumed after a
    /// preemption continues its seeded stream where it was).
    pub fn skip_choices(&mut self, tokens: usize) {
        if self.params.temperature > 0.0 {
            for _ in 0..tokens {
                let _: f64 = self.rng.random();
            }
        }
    }

    /// The choice for this sequence's next token: its parameters and a fresh draw from its
    /// generator (drawn only when the choice is random, so greedy sequences consume nothing).
    pub fn next_choice(&mut self) -> TokenChoice {
        let p = &self.params;
        TokenChoice {
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            uniform: if p.temperature > 0.0 { self.rng.random() } else { 0.0 },
        }
    }

    /// How the next token is picked: the rules' edits, the choice with its draw, and `logprobs`.
    pub fn next_pick(&mut self, logprobs: Option<usize>) -> TokenPick {
        TokenPick {
            choice: self.next_choice(),
            logprobs,
            edits: self.logit_state.as_ref().map(LogitState::edits).unwrap_or_default(),
            allowed: None,
        }
    }

    /// How the next token and the `drafts` proposed after it are picked (speculative decoding):
    /// pick `j` is the one the token after `drafts[..j]` would get were those accepted — its
    /// rules count them and its draw is the generator's `j`-th next. Nothing is drawn here:
    /// [`Sampler::accept`] moves the generator on by the tokens kept, so a sequence draws once
    /// per token it outputs, speculating or not, and its seeded stream is the same.
    pub fn picks_with_drafts(&self, drafts: &[u32], logprobs: Option<usize>) -> Vec<TokenPick> {
        let mut ahead = Sampler {
            params: self.params.clone(),
            rng: self.rng.clone(),
            vocab_limit: self.vocab_limit,
            logit_state: self.logit_state.clone(),
        };
        let mut picks = Vec::with_capacity(drafts.len() + 1);
        for &draft in drafts {
            picks.push(ahead.next_pick(logprobs));
            ahead.record(draft);
        }
        picks.push(ahead.next_pick(logprobs));
        picks
    }

    /// Notes tokens output after [`Sampler::picks_with_drafts`]: one draw and one record each.
    pub fn accept(&mut self, tokens: &[u32]) {
        for &t in tokens {
            self.skip_choices(1);
            self.record(t);
        }
    }

    /// Notes the token this sequence generated (the rules count it).
    pub fn record(&mut self, token: u32) {
        if let Some(state) = self.logit_state.as_mut() {
            state.record(token);
        }
    }

    /// Picks from logits on the host and records the token.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let limit = self.vocab_limit.unwrap_or(logits.len()).min(logits.len());
        let pick = self.next_pick(None);
        let token = if pick.edits.is_empty() {
            choose(&logits[..limit], &pick.choice)
        } else {
            let mut row = logits[..limit].to_vec();
            apply_edits(&mut row, &pick.edits);
            choose(&row, &pick.choice)
        };
        self.record(token);
        token
    }
}

/// How one next token is chosen, the random draw already made: what a backend needs to pick it
/// wherever the logits are (the host's [`choose`] and the GPU's kernel follow the same rule).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenChoice {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means no top-k cut.
    pub top_k: usize,
    pub top_p: f32,
    /// Uniform in [0, 1), from the sequence's seeded generator.
    pub uniform: f64,
}

impl TokenChoice {
    pub const GREEDY: TokenChoice = TokenChoice {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        uniform: 0.0,
    };
}

/// The token `choice` takes from `logits` — the reference rule. Greedy: the largest logit (ties
/// to the lower id). Otherwise candidates in descending order of logit/temperature (ties to the
/// lower id), each with mass exp(logit/temperature − max); the first `top_k`; of those, the
/// shortest prefix whose running mass reaches `top_p` of theirs; the first token at which that
/// prefix's running mass exceeds `uniform` of its total.
pub fn choose(logits: &[f32], choice: &TokenChoice) -> u32 {
    if choice.temperature == 0.0 {
        return argmax(logits);
    }
    let inv_t = 1.0 / choice.temperature;
    let mut candidates: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l * inv_t)).collect();
    candidates.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if choice.top_k > 0 {
        candidates.truncate(choice.top_k);
    }
    let max = candidates[0].1;
    let mass: Vec<f64> = candidates.iter().map(|&(_, l)| ((l - max) as f64).exp()).collect();
    let (mut kept, mut kept_mass) = (mass.len(), mass.iter().sum::<f64>());
    if choice.top_p < 1.0 {
        let target = choice.top_p as f64 * kept_mass;
        let mut running = 0.0;
        for (i, m) in mass.iter().enumerate() {
            running += m;
            if running >= target {
                (kept, kept_mass) = (i + 1, running);
                break;
            }
        }
    }
    let target = choice.uniform * kept_mass;
    let mut running = 0.0;
    for (i, m) in mass[..kept].iter().enumerate() {
        running += m;
        if running > target {
            return candidates[i].0;
        }
    }
    candidates[kept - 1].0
}

/// The chosen token's log-probability and the `n` most likely tokens' (best first, ties to the
/// lower id), from the row's natural-log softmax.
pub fn logprobs_of(logits: &[f32], token: u32, n: usize) -> (f32, Vec<(u32, f32)>) {
    let logprobs = log_softmax(logits);
    let best_first = |a: &u32, b: &u32| logprobs[*b as usize].total_cmp(&logprobs[*a as usize]).then(a.cmp(b));
    let mut order: Vec<u32> = (0..logprobs.len() as u32).collect();
    let n = n.min(order.len());
    if n > 0 && n < order.len() {
        order.select_nth_unstable_by(n - 1, best_first);
    }
    order.truncate(n);
    order.sort_by(best_first);
    let top = order.iter().map(|&id| (id, logprobs[id as usize])).collect();
    (logprobs.get(token as usize).copied().unwrap_or(f32::NEG_INFINITY), top)
}

/// Index of the largest value; ties to the lower index.
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// Natural-log softmax of one row (for logprobs).
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = logits.iter().map(|&l| ((l - max) as f64).exp()).sum::<f64>().ln() as f32 + max;
    logits.iter().map(|&l| l - lse).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            seed: Some(seed),
            ..Default::default()
        }
    }

    #[test]
    fn a_resumed_sampler_continues_its_seeded_stream() {
        let mut whole = Sampler::new(params(0.8, 0, 1.0, 42), None);
        let draws: Vec<f64> = (0..6).map(|_| whole.next_choice().uniform).collect();
        let mut resumed = Sampler::new(params(0.8, 0, 1.0, 42), None);
        resumed.skip_choices(4);
        assert_eq!(resumed.next_choice().uniform, draws[4]);
        assert_ne!(draws[4], draws[0]);
        // Greedy choices draw nothing, so there is nothing to skip.
        let mut greedy = Sampler::new(params(0.0, 0, 1.0, 42), None);
        greedy.skip_choices(4);
        assert_eq!(greedy.next_choice(), TokenChoice::GREEDY);
    }

    #[test]
    fn greedy_takes_the_max_and_respects_the_vocab_limit() {
        let mut s = Sampler::new(params(0.0, 0, 1.0, 1), None);
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0]), 1);
        let mut s = Sampler::new(params(0.0, 0, 1.0, 1), Some(2));
        assert_eq!(s.sample(&[0.1, 0.2, 9.0]), 1);
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let draw = |seed| {
            let mut s = Sampler::new(params(1.0, 0, 1.0, seed), None);
            (0..20).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let logits = [5.0f32, 4.9, 0.0, -1.0, -2.0];
        let mut s = Sampler::new(params(1.0, 2, 1.0, 3), None);
        for _ in 0..200 {
            assert!(s.sample(&logits) < 2);
        }
        // p(0) ≈ 0.51, p(1) ≈ 0.46: top_p 0.5 keeps only id 0.
        let mut s = Sampler::new(params(1.0, 0, 0.5, 3), None);
        for _ in 0..200 {
            assert_eq!(s.sample(&logits), 0);
        }
        // Temperature 1 over two near-equal logits draws both.
        let mut s = Sampler::new(params(1.0, 0, 1.0, 3), None);
        let draws: std::collections::HashSet<u32> = (0..200).map(|_| s.sample(&logits)).collect();
        assert!(draws.contains(&0) && draws.contains(&1));
    }

    #[test]
    fn invalid_params_are_named() {
        assert!(params(-1.0, 0, 1.0, 0).validate().unwrap_err().contains("temperature"));
        assert!(params(1.0, 0, 0.0, 0).validate().unwrap_err().contains("top_p"));
        assert!(params(1.0, 0, 1.5, 0).validate().unwrap_err().contains("top_p"));
    }
}
