//! The expert placement plan: which expert shard holds which routed experts (the same set in
//! every MoE layer), with room for redundant copies of hot experts. Versioned so attention
//! ranks and expert shards can check they agree. The JSON format is the one the operator writes
//! into the fleet's ConfigMap (`version`, `numExperts`, `slots`; other keys are ignored).

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlacementPlan {
    /// An opaque version (the operator's content hash); when absent, a content hash is made.
    #[serde(default)]
    pub version: String,
    pub num_experts: u32,
    /// `shards[r]` = expert ids held by expert shard `r` (an id may appear in several shards).
    #[serde(rename = "slots", alias = "shards")]
    pub shards: Vec<Vec<u32>>,
}

impl PlacementPlan {
    /// Experts dealt round-robin over `shards`; then `redundant` extra copies of the experts in
    /// `hot` (most loaded first), each on a shard that does not hold it yet.
    pub fn round_robin(num_experts: u32, shards: usize, redundant: usize, hot: &[u32]) -> Result<Self> {
        if shards == 0 {
            bail!("a placement needs at least one expert shard");
        }
        let mut plan = PlacementPlan {
            version: String::new(),
            num_experts,
            shards: vec![Vec::new(); shards],
        };
        for e in 0..num_experts {
            plan.shards[e as usize % shards].push(e);
        }
        for (i, &e) in hot
            .iter()
            .cycle()
            .take(redundant.min(hot.len() * shards.saturating_sub(1)))
            .enumerate()
        {
            let target = (0..shards)
                .map(|k| (e as usize + 1 + i + k) % shards)
                .find(|&s| !plan.shards[s].contains(&e));
            if let Some(s) = target {
                plan.shards[s].push(e);
            }
        }
        plan.finish()
    }

    fn content_hash(&self) -> String {
        // FNV-1a over the canonical content: stable across processes and releases.
        let mut h: u64 = 0xcbf29ce484222325;
        let mut feed = |v: u64| {
            for b in v.to_le_bytes() {
                h ^= b as u64;
                h = h.wrapping_mul(0x100000001b3);
            }
        };
        feed(self.num_experts as u64);
        for shard in &self.shards {
            feed(u64::MAX);
            for &e in shard {
                feed(e as u64);
            }
        }
        format!("{h:016x}")
    }

    fn finish(mut self) -> Result<Self> {
        for shard in &mut self.shards {
            shard.sort_unstable();
        }
        if self.version.is_empty() {
            self.version = self.content_hash();
        }
        self.validate()?;
        Ok(self)
    }

    pub fn validate(&self) -> Result<()> {
        let mut held = vec![false; self.num_experts as usize];
        for (r, shard) in self.shards.iter().enumerate() {
            for &e in shard {
                let slot = held.get_mut(e as usize).with_context(|| {
                    format!(
                        "placement: shard {r} lists expert {e}, but there are {}",
                        self.num_experts
                    )
                })?;
                *slot = true;
            }
        }
        if let Some(missing) = held.iter().position(|h| !h) {
            bail!("placement: expert {missing} is held by no shard");
        }
        Ok(())
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read placement plan {}", path.display()))?;
        let plan: PlacementPlan =
            serde_json::from_str(&text).with_context(|| format!("{} is not a placement plan", path.display()))?;
        plan.finish().with_context(|| format!("in {}", path.display()))
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        std::fs::write(path, serde_json::to_string_pretty(self)?)
            .with_context(|| format!("cannot write {}", path.display()))
    }

    /// Shards holding `expert`.
    pub fn owners(&self, expert: u32) -> Vec<usize> {
        (0..self.shards.len())
            .filter(|&r| self.shards[r].binary_search(&expert).is_ok())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_covers_every_expert_and_spreads_copies() {
        let plan = PlacementPlan::round_robin(16, 3, 2, &[5, 9]).expect("plan");
        assert_eq!(plan.shards.iter().map(Vec::len).sum::<usize>(), 18);
        assert_eq!(plan.owners(5).len(), 2);
        assert_eq!(plan.owners(9).len(), 2);
        assert_eq!(plan.owners(0), vec![0]);
        plan.validate().expect("valid");
        let mut broken = plan.clone();
        broken.shards[0].retain(|&e| e != 0);
        assert!(broken
            .validate()
            .unwrap_err()
            .to_string()
            .contains("expert 0 is held by no shard"));
    }

    #[test]
    fn reads_the_operators_format() {
        let json = r#"{"version":"3a92955d538f9496","numExperts":4,"numMoeLayers":2,"strategy":"round-robin",
            "redundantExperts":0,"slots":[[0,2],[1,3]]}"#;
        let plan: PlacementPlan = serde_json::from_str(json).expect("operator plan");
        let plan = plan.finish().expect("valid");
        assert_eq!(plan.version, "3a92955d538f9496");
        assert_eq!(plan.owners(3), vec![1]);
    }
}
