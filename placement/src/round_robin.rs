//! Plans dealt round-robin, for fleets started without the operator (`dsv3-worker fleet`, and
//! the roles without `--placement`).

use crate::{PlacementPlan, PlacementStrategy, PlanError};

impl PlacementPlan {
    /// Experts dealt round-robin over `shards`; then `redundant` extra copies of the experts in
    /// `hot` (most loaded first), each on a shard that does not hold it yet.
    pub fn round_robin(num_experts: u32, shards: usize, redundant: usize, hot: &[u32]) -> Result<Self, PlanError> {
        if shards == 0 {
            return Err(PlanError::Invalid("a placement needs at least one expert shard".into()));
        }
        let mut plan = PlacementPlan {
            version: String::new(),
            num_experts,
            num_moe_layers: 0,
            strategy: PlacementStrategy::RoundRobin.as_str().into(),
            redundant_experts: redundant as u32,
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
    ) -> Result<Self, PlanError> {
        if attention_ranks == 0 {
            return Err(PlanError::Invalid(
                "attention ranks holding experts: there must be at least one attention rank".into(),
            ));
        }
        let mut plan = Self::round_robin(num_experts, shards + 1, redundant, hot)?;
        let held = plan.shards.pop().unwrap_or_default();
        plan.attention = vec![held; attention_ranks];
        plan.version.clear();
        plan.finish()
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
}
