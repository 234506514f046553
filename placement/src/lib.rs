//! The expert placement plan: which expert shard holds which routed experts (the same set in
//! every MoE layer), with redundant copies of hot experts, and which experts each attention rank
//! runs itself for its own tokens. The operator computes it ([`balanced::plan`]) and writes it
//! into the fleet's ConfigMap; the workers read that JSON (`--placement FILE`) or, on one
//! machine, deal it round-robin ([`PlacementPlan::round_robin`]). One type, one version hash:
//! attention ranks and expert shards check they agree by it, and the operator names the
//! ConfigMap and labels the pods with it.

pub mod balanced;
mod round_robin;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::Path;

/// How the primary copies are dealt over the expert shards.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "kebab-case")]
pub enum PlacementStrategy {
    /// Expert e goes to pod e mod P: neighbouring (often co-activated) experts spread out.
    #[default]
    RoundRobin,
    /// Pod p holds a contiguous range of expert ids.
    Contiguous,
}

impl PlacementStrategy {
    pub fn as_str(self) -> &'static str {
        match self {
            PlacementStrategy::RoundRobin => "round-robin",
            PlacementStrategy::Contiguous => "contiguous",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlacementPlan {
    /// The content hash ([`PlacementPlan::content_hash`]); made when absent.
    #[serde(default)]
    pub version: String,
    pub num_experts: u32,
    /// MoE layers the plan covers (the same experts in each; 0: not stated).
    #[serde(default)]
    pub num_moe_layers: u32,
    /// How it was dealt (empty: not stated).
    #[serde(default)]
    pub strategy: String,
    #[serde(default)]
    pub redundant_experts: u32,
    /// `shards[r]` = expert ids held by expert shard `r` (an id may appear in several shards).
    #[serde(rename = "slots", alias = "shards")]
    pub shards: Vec<Vec<u32>>,
    /// `attention[a]` = expert ids attention rank `a` runs itself, for its own tokens only (they
    /// never cross to a shard). An expert no shard holds must be held by every attention rank.
    #[serde(rename = "attentionSlots", default, skip_serializing_if = "Vec::is_empty")]
    pub attention: Vec<Vec<u32>>,
}

/// A plan that cannot be used, or a plan file that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("placement: {0}")]
    Invalid(String),
    #[error("cannot read placement plan {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path} is not a placement plan: {source}")]
    Parse { path: String, source: serde_json::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: String, source: std::io::Error },
}

impl PlacementPlan {
    /// 16 hex digits of SHA-256 over the canonical content: stable across processes, releases
    /// and the two sides of the fleet.
    pub fn content_hash(&self) -> String {
        // The input is the first operator's, byte for byte, with the attention section appended
        // only when there is one: fleets running before it keep their version across an operator
        // upgrade (a changed version would drain and restart every worker).
        let mut h = Sha256::new();
        h.update(format!(
            "dsv3-placement/v1;experts={};layers={};strategy={};redundant={};",
            self.num_experts, self.num_moe_layers, self.strategy, self.redundant_experts
        ));
        let holders = |h: &mut Sha256, held_by: &[Vec<u32>]| {
            for (i, held) in held_by.iter().enumerate() {
                h.update(format!("{i}:"));
                for e in held {
                    h.update(format!("{e},"));
                }
                h.update(";");
            }
        };
        holders(&mut h, &self.shards);
        if !self.attention.is_empty() {
            h.update("attention;");
            holders(&mut h, &self.attention);
        }
        h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect()
    }

    /// Sorts each holder's list, versions the plan if it has no version, and validates it.
    pub fn finish(mut self) -> Result<Self, PlanError> {
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

    pub fn validate(&self) -> Result<(), PlanError> {
        let invalid = |m: String| Err(PlanError::Invalid(m));
        let n = self.num_experts as usize;
        let holders = self.shards.iter().map(|s| ("shard", s)).enumerate();
        let attention = self.attention.iter().map(|s| ("attention rank", s)).enumerate();
        // Per expert: held by a shard; held by how many attention ranks.
        let mut on_shard = vec![false; n];
        let mut on_attention = vec![0usize; n];
        for (r, (kind, held)) in holders.chain(attention) {
            for &e in held {
                if e as usize >= n {
                    return invalid(format!("{kind} {r} lists expert {e}, but there are {n}"));
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
                0 => return invalid(format!("expert {e} is held by no shard")),
                a if a < self.attention.len() => {
                    return invalid(format!(
                        "expert {e} is held by no shard and by only {a} of {} attention ranks, so the others cannot reach it",
                        self.attention.len()
                    ))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The experts attention rank `rank` runs itself. A plan that names attention holders must
    /// name this rank (the others could not reach experts held only by attention ranks).
    pub fn attention_experts(&self, rank: u32) -> Result<Vec<u32>, PlanError> {
        if self.attention.is_empty() {
            return Ok(Vec::new());
        }
        self.attention.get(rank as usize).cloned().ok_or_else(|| {
            PlanError::Invalid(format!(
                "attention rank {rank} is outside the placement plan's attentionSlots ({} attention ranks)",
                self.attention.len()
            ))
        })
    }

    /// Shards holding `expert`.
    pub fn owners(&self, expert: u32) -> Vec<usize> {
        (0..self.shards.len())
            .filter(|&r| self.shards[r].binary_search(&expert).is_ok())
            .collect()
    }

    /// Copies of the expert held by the fewest shards (0 when an expert has no shard at all).
    pub fn fewest_copies(&self) -> u32 {
        let mut copies = vec![0u32; self.num_experts as usize];
        for shard in &self.shards {
            for &e in shard {
                if let Some(c) = copies.get_mut(e as usize) {
                    *c += 1;
                }
            }
        }
        copies.into_iter().min().unwrap_or(0)
    }

    /// How many expert shards, any of them, may be lost with every expert that shards hold
    /// still on a live one (its copies less one, for the expert with the fewest). Experts the
    /// attention ranks hold themselves do not count: no shard loss takes them.
    pub fn shard_losses_covered(&self) -> u32 {
        let mut copies = vec![0u32; self.num_experts as usize];
        for shard in &self.shards {
            for &e in shard {
                if let Some(c) = copies.get_mut(e as usize) {
                    *c += 1;
                }
            }
        }
        copies.into_iter().filter(|&c| c > 0).min().map_or(0, |c| c - 1)
    }

    /// The fewest leading shards (`0..c`) that hold every expert the attention ranks do not:
    /// what a fleet can serve from with the rest of its shards gone (a StatefulSet scaled down
    /// keeps its leading pods). `shards.len()` when only all of them do.
    pub fn covering_prefix(&self) -> usize {
        let mut first_holder = vec![None; self.num_experts as usize];
        for (s, held) in self.shards.iter().enumerate().rev() {
            for &e in held {
                if let Some(f) = first_holder.get_mut(e as usize) {
                    *f = Some(s);
                }
            }
        }
        let by_attention = |e: usize| self.attention.first().is_some_and(|a| a.contains(&(e as u32)));
        first_holder
            .iter()
            .enumerate()
            .filter(|&(e, _)| !by_attention(e))
            .map(|(_, f)| f.map_or(self.shards.len(), |s| s + 1))
            .max()
            .unwrap_or(0)
    }

    pub fn load(path: &Path) -> Result<Self, PlanError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| PlanError::Read {
            path: shown.clone(),
            source,
        })?;
        let plan: PlacementPlan = serde_json::from_str(&text).map_err(|source| PlanError::Parse {
            path: shown.clone(),
            source,
        })?;
        plan.finish()
            .map_err(|e| PlanError::Invalid(format!("{e} (in {shown})")))
    }

    pub fn save(&self, path: &Path) -> Result<(), PlanError> {
        let write = |source| PlanError::Write {
            path: path.display().to_string(),
            source,
        };
        let json = serde_json::to_string_pretty(self).map_err(|e| write(std::io::Error::other(e)))?;
        std::fs::write(path, json).map_err(write)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_covering_prefix_is_the_fewest_leading_shards_that_hold_every_expert() {
        let plan = |shards: Vec<Vec<u32>>, attention: Vec<Vec<u32>>| PlacementPlan {
            version: String::new(),
            num_experts: 4,
            num_moe_layers: 0,
            strategy: String::new(),
            redundant_experts: 0,
            shards,
            attention,
        };
        assert_eq!(
            plan(vec![vec![0, 1], vec![2, 3], vec![0, 1, 2, 3]], vec![]).covering_prefix(),
            2
        );
        assert_eq!(plan(vec![vec![0, 1, 2, 3], vec![2, 3]], vec![]).covering_prefix(), 1);
        assert_eq!(plan(vec![vec![0, 1], vec![2], vec![3]], vec![]).covering_prefix(), 3);
        // Experts the attention ranks hold need no shard.
        assert_eq!(plan(vec![vec![0, 1], vec![2]], vec![vec![3]]).covering_prefix(), 2);
        assert_eq!(plan(vec![vec![0, 1, 2], vec![2]], vec![vec![3]]).covering_prefix(), 1);
    }

    #[test]
    fn reads_the_operators_format_and_keeps_its_version() {
        let json = r#"{"version":"3a92955d538f9496","numExperts":4,"numMoeLayers":2,"strategy":"round-robin",
            "redundantExperts":0,"slots":[[0,2],[1,3]]}"#;
        let plan: PlacementPlan = serde_json::from_str(json).expect("operator plan");
        let plan = plan.finish().expect("valid");
        assert_eq!(plan.version, "3a92955d538f9496");
        assert_eq!(plan.owners(3), vec![1]);
    }

    #[test]
    fn the_version_is_the_first_operators_hash_and_covers_attention_holders() {
        // Pinned: SHA-256 of the canonical text, computed outside this crate
        // (hashlib.sha256(b"dsv3-placement/v1;experts=4;layers=3;strategy=round-robin;redundant=0;0:0,2,;1:1,3,;")).
        let mut plan = PlacementPlan {
            version: String::new(),
            num_experts: 4,
            num_moe_layers: 3,
            strategy: "round-robin".into(),
            redundant_experts: 0,
            shards: vec![vec![0, 2], vec![1, 3]],
            attention: Vec::new(),
        };
        assert_eq!(plan.content_hash(), "8091fd286cf809df");
        // ... + "attention;0:1,;"
        plan.attention = vec![vec![1]];
        assert_eq!(plan.content_hash(), "3fe351b5b2deed48");
    }

    #[test]
    fn shard_losses_covered_counts_the_copies_of_the_least_copied_shard_expert() {
        let single = PlacementPlan::round_robin(8, 4, 0, &[]).expect("plan");
        assert_eq!(single.shard_losses_covered(), 0);
        let hot: Vec<u32> = (0..8).collect();
        let doubled = PlacementPlan::round_robin(8, 4, 8, &hot).expect("plan");
        assert_eq!(doubled.shard_losses_covered(), 1);
        let partly = PlacementPlan::round_robin(8, 4, 4, &hot).expect("plan");
        assert_eq!(partly.shard_losses_covered(), 0, "experts 4..8 have one copy");
        // Experts the attention ranks hold are not lost with a shard.
        let mut with_attention = doubled.clone();
        with_attention.shards.iter_mut().for_each(|s| s.retain(|&e| e != 7));
        with_attention.attention = vec![vec![7]];
        assert_eq!(with_attention.shard_losses_covered(), 1);
    }

    #[test]
    fn the_version_covers_every_holder_and_a_file_round_trips() {
        let plan = PlacementPlan::round_robin_with_attention(16, 3, 2, 0, &[]).expect("plan");
        let mut other = plan.clone();
        other.attention[1].push(0);
        assert_ne!(plan.content_hash(), other.content_hash());
        let dir = std::env::temp_dir().join(format!("dsv3-placement-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("plan.json");
        plan.save(&path).expect("save");
        assert_eq!(PlacementPlan::load(&path).expect("load"), plan);
        std::fs::write(&path, "{").expect("write");
        let err = PlacementPlan::load(&path).unwrap_err().to_string();
        assert!(err.contains("is not a placement plan"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
