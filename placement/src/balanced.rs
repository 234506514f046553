//! The operator's placement: every expert pod holds the same number of slots (routed experts
//! plus redundant copies), each redundant copy of a hot expert on a pod without the original.
//! Pure and deterministic. The same rules as the CRD's CEL rules are checked again, so a plan is
//! never built from a spec that slipped past admission (e.g. a CRD installed without its rules).

use crate::{PlacementPlan, PlacementStrategy};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("experts.replicas must be at least 1")]
    NoExpertPods,
    #[error("model.numRoutedExperts must be at least 1")]
    NoExperts,
    #[error(
        "{slots} expert slots (numRoutedExperts + redundantExperts) cannot be split evenly over {pods} expert pods"
    )]
    Uneven { slots: u32, pods: u32 },
    #[error("{redundant} redundant experts need at least 2 expert pods")]
    RedundantOnOnePod { redundant: u32 },
    #[error("{redundant} redundant experts exceed the {experts} routed experts")]
    TooManyRedundant { redundant: u32, experts: u32 },
    #[error("could not place every redundant copy on a pod without the original")]
    Unplaceable,
    #[error(
        "a partitioned rollout runs each generation on the first half of its expert pods, which must then hold every \
         expert: give every expert a copy (experts.redundantExperts = {experts}, not {redundant}) over an even number \
         of expert pods (experts.replicas {pods})"
    )]
    NoServingHalf { experts: u32, redundant: u32, pods: u32 },
}

/// Input of the placement computation.
#[derive(Clone, Debug)]
pub struct PlacementInput<'a> {
    pub num_experts: u32,
    pub num_moe_layers: u32,
    pub pods: u32,
    pub redundant: u32,
    pub strategy: PlacementStrategy,
    pub hot_experts: &'a [u32],
    /// Each copy goes to the other half of the pods from its original, where there is room:
    /// with a copy of every expert, the first half of the pods then holds every expert (and so
    /// does the second), so a fleet can serve from half its pods (a partitioned rollout).
    /// Checked: the first half must hold every expert.
    pub halves: bool,
}

/// Compute the plan. The same rules as the CRD's CEL rules are checked again, so a plan is never
/// built from a spec that slipped past admission (e.g. a CRD installed without its rules).
pub fn plan(input: &PlacementInput<'_>) -> Result<PlacementPlan, LayoutError> {
    let n = input.num_experts;
    let p = input.pods;
    let r = input.redundant;
    if p == 0 {
        return Err(LayoutError::NoExpertPods);
    }
    if n == 0 {
        return Err(LayoutError::NoExperts);
    }
    if r > n {
        return Err(LayoutError::TooManyRedundant {
            redundant: r,
            experts: n,
        });
    }
    if r > 0 && p < 2 {
        return Err(LayoutError::RedundantOnOnePod { redundant: r });
    }
    if !(n + r).is_multiple_of(p) {
        return Err(LayoutError::Uneven { slots: n + r, pods: p });
    }
    let per_pod = ((n + r) / p) as usize;
    let pods = p as usize;

    // Primaries. Pod quotas differ by at most one: the first n % p pods get one more.
    let mut slots: Vec<Vec<u32>> = vec![Vec::with_capacity(per_pod); pods];
    match input.strategy {
        PlacementStrategy::RoundRobin => {
            for e in 0..n {
                slots[(e % p) as usize].push(e);
            }
        }
        PlacementStrategy::Contiguous => {
            let base = n / p;
            let extra = n % p;
            let mut e = 0;
            for (i, pod) in slots.iter_mut().enumerate() {
                let quota = base + u32::from((i as u32) < extra);
                for _ in 0..quota {
                    pod.push(e);
                    e += 1;
                }
            }
        }
    }

    // Which experts get a redundant copy: the hot ones first, then evenly spaced ids.
    let mut chosen: Vec<u32> = Vec::with_capacity(r as usize);
    let mut taken = vec![false; n as usize];
    for &e in input.hot_experts {
        if chosen.len() as u32 == r {
            break;
        }
        if e < n && !taken[e as usize] {
            taken[e as usize] = true;
            chosen.push(e);
        }
    }
    let mut j = 0u64;
    while (chosen.len() as u32) < r && j < u64::from(n) * 2 {
        // Evenly spaced candidates first, then any id left (j >= r walks 0..n).
        let e = if j < u64::from(r) {
            (j * u64::from(n) / u64::from(r)) as u32
        } else {
            ((j - u64::from(r)) % u64::from(n)) as u32
        };
        if !taken[e as usize] {
            taken[e as usize] = true;
            chosen.push(e);
        }
        j += 1;
    }

    // Place each copy on the pod with the most free slots that does not hold the expert yet
    // (with `halves`, one in the other half of the pods from the original, if any has room).
    let half = |i: usize| 2 * i >= pods;
    let mut home = vec![0usize; n as usize];
    for (i, pod) in slots.iter().enumerate() {
        for &e in pod {
            home[e as usize] = i;
        }
    }
    for e in chosen {
        let most_room = |across: bool| {
            (0..pods)
                .filter(|&i| slots[i].len() < per_pod && !slots[i].contains(&e))
                .filter(|&i| !across || half(i) != half(home[e as usize]))
                .max_by_key(|&i| (per_pod - slots[i].len(), std::cmp::Reverse(i)))
        };
        let best = if input.halves { most_room(true) } else { None }.or_else(|| most_room(false));
        match best {
            Some(i) => slots[i].push(e),
            None => {
                // Only the pod that already holds `e` has room. Move some expert x from another
                // (full) pod y into it, and put the copy of e on y. Such an x exists: y holds
                // per_pod distinct experts, the short pod fewer than per_pod.
                let Some(q) = (0..pods).find(|&i| slots[i].len() < per_pod) else {
                    break;
                };
                let Some(y) = (0..pods).find(|&i| i != q && !slots[i].contains(&e)) else {
                    break;
                };
                if let Some(k) = slots[y].iter().position(|x| !slots[q].contains(x)) {
                    let x = slots[y].remove(k);
                    slots[q].push(x);
                    slots[y].push(e);
                }
            }
        }
    }
    for pod in &mut slots {
        pod.sort_unstable();
    }
    if slots.iter().any(|pod| pod.len() != per_pod) {
        return Err(LayoutError::Unplaceable);
    }

    let plan = PlacementPlan {
        version: String::new(),
        num_experts: n,
        num_moe_layers: input.num_moe_layers,
        strategy: input.strategy.as_str().to_string(),
        redundant_experts: r,
        shards: slots,
        attention: Vec::new(),
    };
    if input.halves && (!pods.is_multiple_of(2) || plan.covering_prefix() > pods / 2) {
        return Err(LayoutError::NoServingHalf {
            experts: n,
            redundant: r,
            pods: p,
        });
    }
    Ok(PlacementPlan {
        version: plan.content_hash(),
        ..plan
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(n: u32, p: u32, r: u32, strategy: PlacementStrategy) -> PlacementInput<'static> {
        PlacementInput {
            num_experts: n,
            num_moe_layers: 58,
            pods: p,
            redundant: r,
            strategy,
            hot_experts: &[],
            halves: false,
        }
    }

    fn check_invariants(plan: &PlacementPlan, n: u32, p: u32, r: u32) {
        assert_eq!(plan.shards.len(), p as usize);
        let per = ((n + r) / p) as usize;
        let mut count = vec![0u32; n as usize];
        for pod in &plan.shards {
            assert_eq!(
                pod.len(),
                per,
                "every pod holds the same number of slots: {:?}",
                plan.shards
            );
            let mut d = pod.clone();
            d.dedup();
            assert_eq!(d.len(), pod.len(), "no pod holds two copies of one expert: {pod:?}");
            for &e in pod {
                count[e as usize] += 1;
            }
        }
        assert!(count.iter().all(|&c| c >= 1), "every expert is placed");
        assert_eq!(count.iter().sum::<u32>(), n + r);
        assert_eq!(count.iter().filter(|&&c| c == 2).count() as u32, r);
    }

    #[test]
    fn deepseek_v3_layouts() {
        for (p, r) in [(1, 0), (8, 0), (8, 32), (32, 32), (144, 32), (16, 16), (2, 256)] {
            for s in [PlacementStrategy::RoundRobin, PlacementStrategy::Contiguous] {
                let plan = plan(&input(256, p, r, s)).expect("valid layout");
                check_invariants(&plan, 256, p, r);
            }
        }
    }

    #[test]
    fn every_valid_small_layout_keeps_the_invariants() {
        let mut checked = 0;
        for n in 1..=24u32 {
            for p in 1..=10u32 {
                for r in 0..=n {
                    if !(n + r).is_multiple_of(p) || (r > 0 && p < 2) {
                        continue;
                    }
                    for s in [PlacementStrategy::RoundRobin, PlacementStrategy::Contiguous] {
                        // Hot experts chosen to collide with their owners' pods as often as possible.
                        let hot: Vec<u32> = (0..n).rev().collect();
                        let mut i = input(n, p, r, s);
                        i.hot_experts = &hot;
                        let plan = plan(&i).unwrap_or_else(|e| panic!("n={n} p={p} r={r} {s:?}: {e}"));
                        check_invariants(&plan, n, p, r);
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked > 500, "{checked}");
    }

    #[test]
    fn strategies_differ_and_are_as_named() {
        let rr = plan(&input(16, 4, 0, PlacementStrategy::RoundRobin)).expect("plan");
        assert_eq!(rr.shards[1], vec![1, 5, 9, 13]);
        let c = plan(&input(16, 4, 0, PlacementStrategy::Contiguous)).expect("plan");
        assert_eq!(c.shards[1], vec![4, 5, 6, 7]);
        assert_ne!(rr.version, c.version);
    }

    #[test]
    fn hot_experts_get_the_copies_on_other_pods() {
        let mut i = input(16, 4, 4, PlacementStrategy::Contiguous);
        let hot = [5, 6, 7, 4];
        i.hot_experts = &hot;
        let plan = plan(&i).expect("plan");
        check_invariants(&plan, 16, 4, 4);
        for e in hot {
            let holders: Vec<usize> = (0..4).filter(|&k| plan.shards[k].contains(&e)).collect();
            assert_eq!(holders.len(), 2, "expert {e} has two copies: {:?}", plan.shards);
        }
    }

    #[test]
    fn forced_swap_when_only_the_owner_has_room() {
        // 3 experts on 2 pods with 1 copy: pod 1 holds expert 2 and is the only one with room.
        let mut i = input(3, 2, 1, PlacementStrategy::Contiguous);
        let hot = [2];
        i.hot_experts = &hot;
        let plan = plan(&i).expect("plan");
        check_invariants(&plan, 3, 2, 1);
        assert!(plan.shards.iter().all(|s| s.contains(&2)));
    }

    #[test]
    fn version_is_a_stable_content_hash() {
        let a = plan(&input(256, 8, 32, PlacementStrategy::RoundRobin)).expect("plan");
        let b = plan(&input(256, 8, 32, PlacementStrategy::RoundRobin)).expect("plan");
        assert_eq!(a, b);
        assert_eq!(a.version.len(), 16);
        let c = plan(&input(256, 8, 40, PlacementStrategy::RoundRobin)).expect("plan");
        assert_ne!(a.version, c.version);
    }

    #[test]
    fn laid_out_in_halves_each_half_of_the_pods_holds_every_expert() {
        let holds_all = |pods: &[Vec<u32>], n: u32| (0..n).all(|e| pods.iter().any(|p| p.contains(&e)));
        let mut checked = 0;
        for n in 1..=24u32 {
            for p in (2..=10u32).step_by(2) {
                if !(2 * n).is_multiple_of(p) {
                    continue;
                }
                for s in [PlacementStrategy::RoundRobin, PlacementStrategy::Contiguous] {
                    let mut i = input(n, p, n, s);
                    i.halves = true;
                    let plan = plan(&i).unwrap_or_else(|e| panic!("n={n} p={p} {s:?}: {e}"));
                    check_invariants(&plan, n, p, n);
                    let (first, second) = plan.shards.split_at(p as usize / 2);
                    assert!(
                        holds_all(first, n) && holds_all(second, n),
                        "n={n} p={p}: {:?}",
                        plan.shards
                    );
                    assert_eq!(plan.covering_prefix(), p as usize / 2);
                    checked += 1;
                }
            }
        }
        assert!(checked > 40, "{checked}");
        // DeepSeek-V3's 256 experts twice over 8 pods: pods 0-3 serve alone.
        let mut i = input(256, 8, 256, PlacementStrategy::RoundRobin);
        i.halves = true;
        assert_eq!(plan(&i).expect("plan").covering_prefix(), 4);
        // Spread as usual, the copies leave no half that serves alone.
        let spread = plan(&input(256, 8, 256, PlacementStrategy::RoundRobin)).expect("plan");
        assert!(spread.covering_prefix() > 4, "{:?}", spread.shards);
    }

    #[test]
    fn halves_without_a_copy_of_every_expert_or_over_odd_pods_are_errors() {
        for (n, p, r) in [(256, 8, 32), (16, 3, 8), (16, 4, 0)] {
            let mut i = input(n, p, r, PlacementStrategy::RoundRobin);
            i.halves = true;
            assert_eq!(
                plan(&i),
                Err(LayoutError::NoServingHalf {
                    experts: n,
                    redundant: r,
                    pods: p
                })
            );
        }
    }

    #[test]
    fn impossible_layouts_are_errors() {
        assert_eq!(
            plan(&input(256, 3, 0, PlacementStrategy::RoundRobin)),
            Err(LayoutError::Uneven { slots: 256, pods: 3 })
        );
        assert_eq!(
            plan(&input(16, 1, 4, PlacementStrategy::RoundRobin)),
            Err(LayoutError::RedundantOnOnePod { redundant: 4 })
        );
        assert_eq!(
            plan(&input(16, 0, 0, PlacementStrategy::RoundRobin)),
            Err(LayoutError::NoExpertPods)
        );
        assert!(matches!(
            plan(&input(4, 8, 8, PlacementStrategy::RoundRobin)),
            Err(LayoutError::TooManyRedundant { .. })
        ));
    }
}
