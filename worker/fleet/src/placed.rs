//! An attention rank's routed experts when the placement plan gives it some of its own (CPU
//! ranks; the CUDA model splits the same way on the GPU): those run in this process on the
//! rank's own tokens while the rest go to the expert shards, and the two partial sums are added.

use crate::rank::{ExpertBackend, TransportTotals, UnservedRows};
use anyhow::{ensure, Context, Result};
use dsv3_engine::{ExpertExecutor, TokenRoutes};
use std::sync::Arc;

pub struct PlacedExperts {
    local: Arc<dyn ExpertExecutor + Send>,
    /// Per global expert id: whether `local` runs it.
    held: Vec<bool>,
    remote: Arc<dyn ExpertBackend>,
}

impl PlacedExperts {
    /// `local` runs experts `held` (of `num_experts`); `remote` every other one.
    pub fn new(
        local: Arc<dyn ExpertExecutor + Send>,
        held: &[u32],
        num_experts: usize,
        remote: Arc<dyn ExpertBackend>,
    ) -> Result<Self> {
        let mut mask = vec![false; num_experts];
        for &e in held {
            *mask
                .get_mut(e as usize)
                .with_context(|| format!("expert {e} is outside the model's {num_experts} experts"))? = true;
        }
        Ok(PlacedExperts {
            local,
            held: mask,
            remote,
        })
    }

    fn holds(&self, expert: u32) -> bool {
        self.held.get(expert as usize).copied().unwrap_or(false)
    }
}

impl ExpertExecutor for PlacedExperts {
    fn routed_experts(&self, layer: usize, x: &[f32], routes: &TokenRoutes) -> Result<Vec<f32>> {
        let here = routes.only(|e| self.holds(e));
        let there = routes.only(|e| !self.holds(e));
        // The local experts compute while this thread waits on the shards.
        let (local, remote) = std::thread::scope(|s| {
            let local = s.spawn(|| self.local.routed_experts(layer, x, &here));
            let remote = self.remote.routed_experts(layer, x, &there);
            (local.join(), remote)
        });
        let mut sum = local.map_err(|_| anyhow::anyhow!("the local experts of layer {layer} panicked"))??;
        let remote = remote?;
        ensure!(
            sum.len() == x.len() && remote.len() == x.len(),
            "routed experts of layer {layer}: {} local and {} remote values for {} inputs",
            sum.len(),
            remote.len(),
            x.len()
        );
        for (s, r) in sum.iter_mut().zip(&remote) {
            *s += r;
        }
        Ok(sum)
    }
}

impl ExpertBackend for PlacedExperts {
    fn ready(&self) -> Result<(), String> {
        self.remote.ready()
    }

    fn degraded(&self) -> Option<String> {
        self.remote.degraded()
    }

    fn placement_version(&self) -> String {
        self.remote.placement_version()
    }

    fn transport(&self) -> TransportTotals {
        self.remote.transport()
    }

    fn take_unserved(&self) -> Vec<UnservedRows> {
        self.remote.take_unserved()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dsv3_engine::moe::NO_EXPERT;
    use std::sync::Mutex;

    /// Expert e multiplies a row by e + 1; records the routes it was given.
    struct Scale {
        seen: Mutex<Vec<u32>>,
    }

    impl ExpertExecutor for Scale {
        fn routed_experts(&self, _layer: usize, x: &[f32], routes: &TokenRoutes) -> Result<Vec<f32>> {
            self.seen.lock().expect("lock").extend(&routes.experts);
            let width = x.len() / routes.tokens();
            let mut out = vec![0.0; x.len()];
            for t in 0..routes.tokens() {
                for j in 0..routes.k {
                    let (e, w) = (routes.experts[t * routes.k + j], routes.weights[t * routes.k + j]);
                    if e != NO_EXPERT {
                        for c in 0..width {
                            out[t * width + c] += w * (e + 1) as f32 * x[t * width + c];
                        }
                    }
                }
            }
            Ok(out)
        }
    }

    impl ExpertBackend for Scale {
        fn ready(&self) -> Result<(), String> {
            Ok(())
        }
        fn placement_version(&self) -> String {
            "v".into()
        }
    }

    #[test]
    fn held_experts_run_here_and_only_the_rest_reach_the_shards() {
        let local = Arc::new(Scale { seen: Mutex::default() });
        let remote = Arc::new(Scale { seen: Mutex::default() });
        let placed = PlacedExperts::new(local.clone(), &[1, 3], 4, remote.clone()).expect("placed");
        let routes = TokenRoutes {
            k: 2,
            experts: vec![0, 1, 2, 3],
            weights: vec![0.5, 0.25, 1.0, 2.0],
        };
        let x = [1.0, 2.0, 3.0, 4.0];
        let y = placed.routed_experts(7, &x, &routes).expect("experts");
        // Token 0: 0.5·1 + 0.25·2 = 1 ×x; token 1: 1·3 + 2·4 = 11 ×x.
        assert_eq!(y, vec![1.0, 2.0, 33.0, 44.0]);
        let (here, there) = (local.seen.lock().expect("lock"), remote.seen.lock().expect("lock"));
        assert!(here.iter().all(|&e| e == 1 || e == 3 || e == NO_EXPERT), "{here:?}");
        assert!(there.iter().all(|&e| e == 0 || e == 2 || e == NO_EXPERT), "{there:?}");
        assert!(PlacedExperts::new(local.clone(), &[4], 4, remote.clone()).is_err());
    }
}
