//! Next-token choice: greedy, temperature, top-k, top-p, seeded.

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
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let limit = self.vocab_limit.unwrap_or(logits.len()).min(logits.len());
        let logits = &logits[..limit];
        if self.params.temperature == 0.0 {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.params.temperature;
        let mut candidates: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l * inv_t)).collect();
        candidates.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if self.params.top_k > 0 {
            candidates.truncate(self.params.top_k);
        }
        let max = candidates[0].1;
        let mut probs: Vec<f64> = candidates.iter().map(|&(_, l)| ((l - max) as f64).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if self.params.top_p < 1.0 {
            let mut cumulative = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                cumulative += p;
                if cumulative >= self.params.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            let kept: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= kept);
        }
        let mut u: f64 = self.rng.random();
        for (i, p) in probs.iter().enumerate() {
            if u < *p {
                return candidates[i].0;
            }
            u -= p;
        }
        candidates[probs.len() - 1].0
    }
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
