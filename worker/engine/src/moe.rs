//! Feed-forward blocks: the SwiGLU MLP (dense layers, routed and shared experts), the
//! sigmoid group-limited router (spec §6), and the routed experts behind a trait so they can
//! run in this process or on expert workers.

use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::linear::Matrix;
use crate::ops::{sigmoid, silu};
use anyhow::{Context, Result};
use rayon::prelude::*;
use safetensors::Dtype;
use std::collections::BTreeMap;

/// `down( silu(gate(x)) ⊙ up(x) )`.
#[derive(Clone)]
pub struct Mlp {
    gate: Matrix,
    up: Matrix,
    down: Matrix,
}

impl Mlp {
    pub fn load(ckpt: &Checkpoint, prefix: &str, config: &ModelConfig, width: usize) -> Result<Self> {
        let q = config.quantization.as_ref();
        let h = config.hidden_size;
        Ok(Mlp {
            gate: Matrix::load(ckpt, &format!("{prefix}.gate_proj.weight"), width, h, q)?,
            up: Matrix::load(ckpt, &format!("{prefix}.up_proj.weight"), width, h, q)?,
            down: Matrix::load(ckpt, &format!("{prefix}.down_proj.weight"), h, width, q)?,
        })
    }

    pub fn forward(&self, x: &[f32], m: usize) -> Vec<f32> {
        let mut g = self.gate.forward(x, m);
        let u = self.up.forward(x, m);
        for (g, u) in g.iter_mut().zip(&u) {
            *g = silu(*g) * u;
        }
        self.down.forward(&g, m)
    }

    pub fn weight_bytes(&self) -> usize {
        self.gate.weight_bytes() + self.up.weight_bytes() + self.down.weight_bytes()
    }
}

/// Top-k routes of a batch: `experts[i*k + j]` with weight `weights[i*k + j]`, experts of a token
/// in ascending order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TokenRoutes {
    pub k: usize,
    pub experts: Vec<u32>,
    pub weights: Vec<f32>,
}

impl TokenRoutes {
    pub fn tokens(&self) -> usize {
        self.experts.len().checked_div(self.k).unwrap_or(0)
    }

    /// The same routes with every slot whose expert is not `kept` marked [`NO_EXPERT`] (weight
    /// 0): the part of a layer one holder of experts computes.
    pub fn only(&self, kept: impl Fn(u32) -> bool) -> TokenRoutes {
        let (experts, weights) = self
            .experts
            .iter()
            .zip(&self.weights)
            .map(|(&e, &w)| {
                if e != NO_EXPERT && kept(e) {
                    (e, w)
                } else {
                    (NO_EXPERT, 0.0)
                }
            })
            .unzip();
        TokenRoutes {
            k: self.k,
            experts,
            weights,
        }
    }
}

/// The MoE gate of one layer.
#[derive(Clone)]
pub struct Router {
    weight: Matrix,
    bias: Vec<f32>,
    n_experts: usize,
    gate: Gate,
}

/// How a token's router logits choose its experts (DeepSeek-V3's group-limited top-k).
#[derive(Clone, Copy, Debug)]
pub struct Gate {
    pub n_group: usize,
    pub topk_group: usize,
    pub top_k: usize,
    pub normalize: bool,
    pub scaling: f32,
}

impl Gate {
    pub fn of(config: &ModelConfig) -> Self {
        Gate {
            n_group: config.n_group,
            topk_group: config.topk_group,
            top_k: config.num_experts_per_tok,
            normalize: config.norm_topk_prob,
            scaling: config.routed_scaling_factor,
        }
    }

    /// One token's experts (ascending) and weights from its pre-sigmoid `logits`, one per
    /// expert, and the selection bias: sigmoid scores, biased for selection only; the best
    /// `topk_group` groups by the sum of their two best biased scores; top-k inside them;
    /// weights from the unbiased scores. Ties go to the lower index.
    pub fn route_token(&self, logits: &[f32], bias: &[f32]) -> (Vec<u32>, Vec<f32>) {
        let n_experts = logits.len();
        let scores: Vec<f32> = logits.iter().map(|&u| sigmoid(u)).collect();
        let biased: Vec<f32> = scores.iter().zip(bias).map(|(s, b)| s + b).collect();
        let per_group = n_experts / self.n_group;
        let group_score = |g: usize| {
            let members = &biased[g * per_group..(g + 1) * per_group];
            let mut best = [f32::NEG_INFINITY; 2];
            for &v in members {
                if v > best[0] {
                    best[1] = best[0];
                    best[0] = v;
                } else if v > best[1] {
                    best[1] = v;
                }
            }
            if per_group == 1 {
                best[0]
            } else {
                best[0] + best[1]
            }
        };
        let group_scores: Vec<f32> = (0..self.n_group).map(group_score).collect();
        let groups = top_indices(&group_scores, self.topk_group);
        let mut allowed = vec![false; n_experts];
        for g in groups {
            allowed[g * per_group..(g + 1) * per_group].fill(true);
        }
        let masked: Vec<f32> = biased
            .iter()
            .zip(&allowed)
            .map(|(&v, &ok)| if ok { v } else { f32::NEG_INFINITY })
            .collect();
        let mut chosen = top_indices(&masked, self.top_k);
        chosen.sort_unstable();
        let mut weights: Vec<f32> = chosen.iter().map(|&e| scores[e]).collect();
        if self.normalize {
            let sum: f32 = weights.iter().sum::<f32>() + 1e-20;
            weights.iter_mut().for_each(|w| *w /= sum);
        }
        weights.iter_mut().for_each(|w| *w *= self.scaling);
        (chosen.into_iter().map(|e| e as u32).collect(), weights)
    }
}

impl Router {
    pub fn load(ckpt: &Checkpoint, prefix: &str, config: &ModelConfig) -> Result<Self> {
        let e = config.n_routed_experts;
        let weight = Matrix::load(ckpt, &format!("{prefix}.weight"), e, config.hidden_size, None)?;
        let bias_name = format!("{prefix}.e_score_correction_bias");
        let bias = ckpt.get(&bias_name)?;
        bias.expect(&[Dtype::F32, Dtype::BF16], &[e])?;
        Ok(Router {
            weight,
            bias: bias.to_f32_vec()?,
            n_experts: e,
            gate: Gate::of(config),
        })
    }

    /// Pre-sigmoid router logits `[m, n_experts]`.
    pub fn logits(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.weight.forward(x, m)
    }

    pub fn route(&self, x: &[f32], m: usize) -> TokenRoutes {
        let logits = self.logits(x, m);
        let mut routes = TokenRoutes {
            k: self.gate.top_k,
            experts: Vec::with_capacity(m * self.gate.top_k),
            weights: Vec::new(),
        };
        for row in logits.chunks_exact(self.n_experts) {
            let (experts, weights) = self.gate.route_token(row, &self.bias);
            routes.experts.extend(experts);
            routes.weights.extend(weights);
        }
        routes
    }
}

/// Indices of the `k` largest values; ties to the lower index.
fn top_indices(values: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    order.truncate(k);
    order
}

/// A routing slot handled elsewhere (another expert shard): skipped.
pub const NO_EXPERT: u32 = u32::MAX;

/// Runs the routed experts of MoE layers for a batch of tokens.
pub trait ExpertExecutor: Sync {
    /// For each token i: `Σ_j weights[i,j] · Expert_{experts[i,j]}(x_i)` for MoE layer `layer`
    /// (`x` is `[tokens, hidden]`; the result has the same shape).
    fn routed_experts(&self, layer: usize, x: &[f32], routes: &TokenRoutes) -> Result<Vec<f32>>;

    /// [`ExpertExecutor::routed_experts`] written into `out` (same shape as `x`), so a caller can
    /// hand over memory the result should land in (page-locked memory on its way to a GPU).
    fn routed_experts_into(&self, layer: usize, x: &[f32], routes: &TokenRoutes, out: &mut [f32]) -> Result<()> {
        let y = self.routed_experts(layer, x, routes)?;
        anyhow::ensure!(
            y.len() == out.len(),
            "the experts of layer {layer} returned {} values for {} expected",
            y.len(),
            out.len()
        );
        out.copy_from_slice(&y);
        Ok(())
    }
}

/// Which routed experts a process holds.
#[derive(Clone, Debug, Default)]
pub enum ExpertSelection {
    #[default]
    All,
    None,
    /// Expert ids (the same for every MoE layer).
    Only(Vec<u32>),
}

impl ExpertSelection {
    pub fn holds(&self, expert: u32) -> bool {
        match self {
            ExpertSelection::All => true,
            ExpertSelection::None => false,
            ExpertSelection::Only(ids) => ids.contains(&expert),
        }
    }
}

/// Routed experts held in this process, per MoE layer.
#[derive(Default)]
pub struct LocalExperts {
    hidden: usize,
    layers: BTreeMap<usize, BTreeMap<u32, Mlp>>,
}

impl LocalExperts {
    pub fn load(
        ckpt: &Checkpoint,
        config: &ModelConfig,
        selection: &ExpertSelection,
        mut on_layer: impl FnMut(usize),
    ) -> Result<Self> {
        let mut layers = BTreeMap::new();
        for layer in config.routed_expert_layers() {
            let mut experts = BTreeMap::new();
            for e in 0..config.n_routed_experts as u32 {
                if selection.holds(e) {
                    let prefix = format!("model.layers.{layer}.mlp.experts.{e}");
                    let mlp = Mlp::load(ckpt, &prefix, config, config.moe_intermediate_size)
                        .with_context(|| format!("loading routed expert {e} of layer {layer}"))?;
                    experts.insert(e, mlp);
                }
            }
            layers.insert(layer, experts);
            on_layer(layer);
        }
        Ok(LocalExperts {
            hidden: config.hidden_size,
            layers,
        })
    }

    pub fn weight_bytes(&self) -> usize {
        self.layers
            .values()
            .flat_map(|l| l.values())
            .map(Mlp::weight_bytes)
            .sum()
    }

    pub fn expert(&self, layer: usize, expert: u32) -> Option<&Mlp> {
        self.layers.get(&layer).and_then(|l| l.get(&expert))
    }
}

impl ExpertExecutor for LocalExperts {
    fn routed_experts(&self, layer: usize, x: &[f32], routes: &TokenRoutes) -> Result<Vec<f32>> {
        let h = self.hidden;
        let tokens = x.len() / h;
        anyhow::ensure!(
            routes.tokens() == tokens,
            "routes for {} tokens, activations for {tokens}",
            routes.tokens()
        );
        // Group (token, weight) pairs by expert.
        let mut by_expert: BTreeMap<u32, Vec<(usize, f32)>> = BTreeMap::new();
        for t in 0..tokens {
            for j in 0..routes.k {
                let i = t * routes.k + j;
                if routes.experts[i] != NO_EXPERT {
                    by_expert
                        .entry(routes.experts[i])
                        .or_default()
                        .push((t, routes.weights[i]));
                }
            }
        }
        let work: Vec<(u32, Vec<(usize, f32)>)> = by_expert.into_iter().collect();
        let results: Vec<Result<Vec<f32>>> = work
            .par_iter()
            .map(|(e, assigned)| {
                let mlp = self
                    .expert(layer, *e)
                    .with_context(|| format!("routed expert {e} of layer {layer} is not held by this process"))?;
                let mut rows = Vec::with_capacity(assigned.len() * h);
                for (t, _) in assigned {
                    rows.extend_from_slice(&x[t * h..(t + 1) * h]);
                }
                Ok(mlp.forward(&rows, assigned.len()))
            })
            .collect();
        // Accumulate in a fixed order (expert ascending) so batching does not change the sum order.
        let mut out = vec![0.0f32; tokens * h];
        for ((_, assigned), result) in work.iter().zip(results) {
            let y = result?;
            for (row, (t, w)) in y.chunks_exact(h).zip(assigned) {
                for (o, v) in out[t * h..(t + 1) * h].iter_mut().zip(row) {
                    *o += w * v;
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::Gate;

    fn logit(p: f32) -> f32 {
        (p / (1.0 - p)).ln()
    }

    #[test]
    fn the_gate_keeps_the_best_groups_then_the_best_experts_in_them() {
        // 8 experts in 4 groups of 2, 2 groups kept, 3 experts chosen.
        let gate = Gate {
            n_group: 4,
            topk_group: 2,
            top_k: 3,
            normalize: true,
            scaling: 2.0,
        };
        // Scores by group: (0.9, 0.1) sum 1.0, (0.6, 0.5) 1.1, (0.7, 0.2) 0.9, (0.3, 0.3) 0.6.
        let scores = [0.9, 0.1, 0.6, 0.5, 0.7, 0.2, 0.3, 0.3];
        let logits: Vec<f32> = scores.iter().map(|&p| logit(p)).collect();
        let (experts, weights) = gate.route_token(&logits, &[0.0; 8]);
        // Groups 1 and 0 kept; expert 4 (0.7) is in group 2, left out though it beats 2 and 3.
        assert_eq!(experts, [0, 2, 3]);
        let sum = 0.9 + 0.6 + 0.5;
        for (w, p) in weights.iter().zip([0.9, 0.6, 0.5]) {
            assert!((w - 2.0 * p / sum).abs() < 1e-6, "{weights:?}");
        }
        // The bias moves the choice (group 3 now sums 0.6 + 2 * 0.5), not the weights.
        let bias = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.5];
        let (experts, weights) = gate.route_token(&logits, &bias);
        assert_eq!(experts, [2, 6, 7]);
        let sum = 0.6 + 0.3 + 0.3;
        for (w, p) in weights.iter().zip([0.6, 0.3, 0.3]) {
            assert!((w - 2.0 * p / sum).abs() < 1e-6, "{weights:?}");
        }
    }

    #[test]
    fn gate_ties_go_to_the_lower_index() {
        let gate = Gate {
            n_group: 2,
            topk_group: 1,
            top_k: 2,
            normalize: false,
            scaling: 1.0,
        };
        // Both groups sum to the same: group 0 wins; inside it experts 1, 2 and 3 tie.
        let logits = [
            logit(0.2),
            logit(0.5),
            logit(0.5),
            logit(0.5),
            logit(0.5),
            logit(0.5),
            logit(0.2),
            logit(0.2),
        ];
        let (experts, weights) = gate.route_token(&logits, &[0.0; 8]);
        assert_eq!(experts, [1, 2]);
        assert!(weights.iter().all(|&w| (w - 0.5).abs() < 1e-6), "{weights:?}");
    }
}
