//! The expert placement plan: which expert shard holds which routed experts (the same set in
//! every MoE layer), with room for redundant copies of hot experts, and which experts each
//! attention rank runs itself for its own tokens. Versioned so attention ranks and expert shards
//! can check they agree. The JSON format is the one the operator writes into the fleet's
//! ConfigMap (`version`, `numExperts`, `slots`, optional `attentionSlots`; other keys are ignored).

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
    /// `attention[a]` = expert ids attention rank `a` runs itself, for its own tokens only (they
    /// never cross to a shard). An expert no shard holds must be held by every attention rank.
    #[serde(rename = "attentionSlots", default, skip_serializing_if = "Vec::is_empty")]
    pub attention: Vec<Vec<u32>>,
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
            attention: Vec::new(),
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

    /// [`PlacementPlan::round_robin`] over `shards` + 1 holders, where the last holder is every
    /// one of `attention_ranks`: each attention rank runs that share of the experts itself and
    /// sends only the rest of its tokens' routes to the shards.
    pub fn round_robin_with_attention(
        num_experts: u32,
        shards: usize,
        attention_ranks: usize,
        redundant: usize,
        hot: &[u32],
    ) -> Result<Self> {
        if attention_ranks == 0 {
            bail!("attention ranks holding experts: there must be at least one attention rank");
        }
        let mut plan = Self::round_robin(num_experts, shards + 1, redundant, hot)?;
        let held = plan.shards.pop().unwrap_or_default();
        plan.attention = vec![held; attention_ranks];
        plan.version.clear();
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
        // Attention holders after a distinct marker; plans without them hash as before.
        for held in &self.attention {
            feed(u64::MAX - 1);
            for &e in held {
                feed(e as u64);
            }
        }
        format!("{h:016x}")
    }

    fn finish(mut self) -> Result<Self> {
        for held in self.shards.iter_mut().chain(&mut self.attention) {
            held.sort_unstable();
            held.dedup();
        }
        if self.version.is_empty() {
            self.version = self.content_hash();
        }
        self.validate()?;
        Ok(self)
    }

    pub fn validate(&self) -> Result<()> {
        let n = self.num_experts as usize;
        let holders = self.shards.iter().map(|s| ("shard", s)).enumerate();
        let attention = self.attention.iter().map(|s| ("attention rank", s)).enumerate();
        // Per expert: held by a shard; held by how many attention ranks.
        let mut on_shard = vec![false; n];
        let mut on_attention = vec![0usize; n];
        for (r, (kind, held)) in holders.chain(attention) {
            for &e in held {
                if e as usize >= n {
                    bail!("placement: {kind} {r} lists expert {e}, but there are {n}");
                }
                if kind == "shard" {
                    on_shard[e as usize] = true;
                } else {
                    on_attention[e as usize] += 1;
                }
            }
        }
        for e in 0..n {
            if on_shard[e] {
                continue;
            }
            match on_attention[e] {
                0 => bail!("placement: expert {e} is held by no shard"),
                a if a < self.attention.len() => bail!(
                    "placement: expert {e} is held by no shard and by only {a} of {} attention ranks, so the others cannot reach it",
                    self.attention.len()
                ),
                _ => {}
            }
        }
        Ok(())
    }

    /// The experts attention rank `rank` runs itself. A plan that names attention holders must
    /// name this rank (the others could not reach experts held only by attention ranks).
    pub fn attention_experts(&self, rank: u32) -> Result<Vec<u32>> {
        if self.attention.is_empty() {
            return Ok(Vec::new());
        }
        self.attention.get(rank as usize).cloned().with_context(|| {
            format!(
                "attention rank {rank} is outside the placement plan's attentionSlots ({} attention ranks)",
                self.attention.len()
            )
        })
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
    fn attention_ranks_hold_one_share_and_every_expert_stays_reachable() {
        let plan = PlacementPlan::round_robin_with_attention(16, 3, 2, 0, &[]).expect("plan");
        assert_eq!(plan.shards.len(), 3);
        assert_eq!(plan.attention_experts(0).expect("rank 0"), vec![3, 7, 11, 15]);
        assert_eq!(plan.attention_experts(1).expect("rank 1"), vec![3, 7, 11, 15]);
        assert!(plan.owners(3).is_empty(), "no shard holds the attention share");
        assert_eq!(plan.owners(2), vec![2]);
        let err = plan.attention_experts(2).unwrap_err().to_string();
        assert!(err.contains("attention rank 2 is outside"), "{err}");
        // A different plan, a different version; the plain plan's version is unchanged.
        let plain = PlacementPlan::round_robin(16, 3, 0, &[]).expect("plain");
        assert_ne!(plan.version, plain.version);
        assert_eq!(plain.attention_experts(5).expect("no holders"), Vec::<u32>::new());
        // An expert only one of two attention ranks holds is unreachable from the other.
        let mut broken = plan.clone();
        broken.attention[1].retain(|&e| e != 7);
        let err = broken.validate().unwrap_err().to_string();
        assert!(err.contains("expert 7 is held by no shard and by only 1 of 2"), "{err}");
        // The JSON round trip keeps the attention holders.
        let back: PlacementPlan = serde_json::from_str(&serde_json::to_string(&plan).expect("json")).expect("parse");
        assert_eq!(back.finish().expect("valid"), plan);
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
