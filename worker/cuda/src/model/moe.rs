//! The MoE block of one layer: routing on the GPU, tokens grouped by expert, the routed experts
//! on the tensor cores (or dequantised into cuBLAS for large groups), the shared expert.

use super::layers::Moe;
use super::CudaModel;
use crate::gpu::{float, int, ptr, u64_arg, DeviceBuf};
use crate::linear::mma_fits;
use anyhow::{ensure, Result};

/// Experts with more routed rows than this in a step use cuBLAS instead of the grouped kernels.
const GROUPED_MAX_ROWS: usize = 64;

impl CudaModel {
    /// Routed and shared experts, added into `h`. Returns the chosen experts `[m, top_k]`.
    pub(super) fn moe(&self, moe: &Moe, x: &DeviceBuf, h: &DeviceBuf, m: usize) -> Result<Vec<u32>> {
        let g = &self.gpu;
        let c = &self.config;
        let (e, k, width) = (c.n_routed_experts, c.num_experts_per_tok, c.hidden_size);
        let logits = g.alloc(m * e * 4)?;
        self.linear(logits.addr, e, x.addr, m, &moe.router, false)?;
        let ids = g.alloc(m * k * 4)?;
        let weights = g.alloc(m * k * 4)?;
        let smem = (2 * e + c.n_group + k) * 4;
        g.launch(
            "route_topk",
            (m as u32, 1, 1),
            e.next_multiple_of(32) as u32,
            smem as u32,
            &[
                ptr(ids.addr),
                ptr(weights.addr),
                ptr(logits.addr),
                ptr(moe.bias.addr),
                int(e),
                int(c.n_group),
                int(c.topk_group),
                int(k),
                int(c.norm_topk_prob as usize),
                float(c.routed_scaling_factor),
            ],
        )?;
        let (chosen, plan) = g.profiled("route_sync_permute", || {
            let chosen: Vec<i32> = g.download(ids.addr, m * k)?;
            let plan = Permutation::new(&chosen, m, k, e)?;
            Ok((chosen, plan))
        })?;
        self.experts_touched
            .set(self.experts_touched.get() + plan.group_expert.len());
        let slots = plan.x_rows.len();
        let bank = &moe.experts;
        let inter = bank.gate.rows;
        let gu = g.alloc(slots * 2 * inter * 4)?;
        let act = g.alloc(slots * inter * 4)?;
        let y = g.alloc(slots * width * 4)?;
        let w = |v: &[i32]| v.iter().map(|&x| x as u32).collect::<Vec<u32>>();
        let (_plan_buf, pa) = g.upload_words(&[
            &w(&plan.x_rows),
            &w(&plan.group_expert),
            &w(&plan.offsets),
            &w(&plan.slot_of),
        ])?;
        let (x_rows, group_expert, offsets, slot_of) = (pa[0], pa[1], pa[2], pa[3]);
        let small = plan.small_groups(GROUPED_MAX_ROWS);
        let tensor_cores = !self.simt_linear && mma_fits(inter, width) && mma_fits(width, inter);
        let largest_small = plan.offsets[..=small]
            .windows(2)
            .map(|w| (w[1] - w[0]) as usize)
            .max()
            .unwrap_or(0);
        // Small groups: one launch for all of them, weights streamed once per group.
        let grouped = |out: u64, ldy: usize, input: u64, ldx: usize, rows: u64, s: &crate::weights::Stacked| {
            let common = [
                ptr(out),
                int(ldy),
                ptr(input),
                int(ldx),
                ptr(rows),
                ptr(s.data.addr),
                ptr(s.scales.addr),
                u64_arg(s.stride() as u64),
                u64_arg(s.scale_stride() as u64),
                ptr(group_expert),
                ptr(offsets),
                int(s.rows),
                int(s.cols),
            ];
            if tensor_cores {
                let name = match largest_small {
                    0..=8 => "grouped_fp8_mma_n1",
                    9..=16 => "grouped_fp8_mma_n2",
                    17..=32 => "grouped_fp8_mma_n4",
                    _ => "grouped_fp8_mma_n8",
                };
                g.launch(name, (s.rows.div_ceil(64) as u32, small as u32, 1), 128, 0, &common)
            } else {
                g.launch(
                    "grouped_gemv_fp8",
                    (s.rows.div_ceil(8) as u32, small as u32, 1),
                    256,
                    0,
                    &common,
                )
            }
        };
        // The tensor-core path reads bf16 activations.
        let to_bf16 = |src: u64, n: usize| -> Result<Option<DeviceBuf>> {
            if !tensor_cores || small == 0 {
                return Ok(None);
            }
            let b = g.alloc(n * 2)?;
            g.launch_1d("f32_to_bf16_rows", n, &[ptr(b.addr), ptr(src), u64_arg(n as u64)])?;
            Ok(Some(b))
        };
        if small > 0 {
            let xb = to_bf16(x.addr, m * width)?;
            let input = xb.as_ref().map_or(x.addr, |b| b.addr);
            grouped(gu.addr, 2 * inter, input, width, x_rows, &bank.gate)?;
            grouped(gu.addr + (inter * 4) as u64, 2 * inter, input, width, x_rows, &bank.up)?;
        }
        // Large groups (prefill): dequantise the expert and use the tensor cores.
        let large: Vec<usize> = (small..plan.group_expert.len()).collect();
        let xb = if large.is_empty() {
            None
        } else {
            Some(g.alloc(slots * width * 2)?)
        };
        if let Some(xb) = &xb {
            let first = plan.offsets[small] as usize;
            let n = slots - first;
            g.launch(
                "gather_rows_bf16",
                (n as u32, 1, 1),
                256,
                0,
                &[
                    ptr(xb.at(first * width * 2)),
                    ptr(x.addr),
                    int(width),
                    ptr(x_rows + (first * 4) as u64),
                    int(width),
                ],
            )?;
            for &gi in &large {
                let (s0, s1) = (plan.offsets[gi] as usize, plan.offsets[gi + 1] as usize);
                let ex = plan.group_expert[gi] as usize;
                for (s, col) in [(&bank.gate, 0), (&bank.up, inter)] {
                    self.dequant_expert(s, ex)?;
                    g.gemm_bf16(
                        gu.at((s0 * 2 * inter + col) * 4),
                        2 * inter,
                        xb.at(s0 * width * 2),
                        self.dequant.addr,
                        s1 - s0,
                        s.rows,
                        s.cols,
                        false,
                    )?;
                }
            }
        }
        g.launch_1d(
            "swiglu",
            slots * inter,
            &[ptr(act.addr), ptr(gu.addr), int(slots), int(inter)],
        )?;
        if small > 0 {
            let ab = to_bf16(act.addr, slots * inter)?;
            grouped(
                y.addr,
                width,
                ab.as_ref().map_or(act.addr, |b| b.addr),
                inter,
                0,
                &bank.down,
            )?;
        }
        if !large.is_empty() {
            let first = plan.offsets[small] as usize;
            let n = slots - first;
            let ab = g.alloc(n * inter * 2)?;
            g.launch_1d(
                "f32_to_bf16_rows",
                n * inter,
                &[
                    ptr(ab.addr),
                    ptr(act.at(first * inter * 4)),
                    u64_arg((n * inter) as u64),
                ],
            )?;
            for &gi in &large {
                let (s0, s1) = (plan.offsets[gi] as usize, plan.offsets[gi + 1] as usize);
                self.dequant_expert(&bank.down, plan.group_expert[gi] as usize)?;
                g.gemm_bf16(
                    y.at(s0 * width * 4),
                    width,
                    ab.at((s0 - first) * inter * 2),
                    self.dequant.addr,
                    s1 - s0,
                    width,
                    inter,
                    false,
                )?;
            }
        }
        g.launch(
            "combine_experts",
            (m as u32, 1, 1),
            256,
            0,
            &[
                ptr(h.addr),
                ptr(y.addr),
                ptr(slot_of),
                ptr(weights.addr),
                int(k),
                int(width),
            ],
        )?;
        if let Some(shared) = &moe.shared {
            self.mlp(shared, x, h.addr, m)?;
        }
        Ok(chosen.iter().map(|&v| v as u32).collect())
    }

    fn dequant_expert(&self, s: &crate::weights::Stacked, expert: usize) -> Result<()> {
        crate::weights::dequant_fp8(
            &self.gpu,
            self.dequant.addr,
            s.data.at(expert * s.stride()),
            s.scales.at(expert * s.scale_stride() * 4),
            s.rows,
            s.cols,
        )
    }
}

/// Token rows grouped by expert: slots `offsets[g]..offsets[g+1]` belong to expert
/// `group_expert[g]`, groups ordered by size so the small ones form a prefix.
struct Permutation {
    group_expert: Vec<i32>,
    offsets: Vec<i32>,
    /// Token row of each slot.
    x_rows: Vec<i32>,
    /// Slot of each (token, choice), `[m, top_k]`.
    slot_of: Vec<i32>,
}

impl Permutation {
    fn new(chosen: &[i32], m: usize, k: usize, experts: usize) -> Result<Self> {
        let mut rows_of: Vec<Vec<(usize, usize)>> = vec![Vec::new(); experts];
        for t in 0..m {
            for j in 0..k {
                let e = chosen[t * k + j];
                ensure!(
                    e >= 0 && (e as usize) < experts,
                    "routing produced expert {e} of {experts}"
                );
                rows_of[e as usize].push((t, j));
            }
        }
        let mut active: Vec<usize> = (0..experts).filter(|&e| !rows_of[e].is_empty()).collect();
        active.sort_by_key(|&e| (rows_of[e].len(), e));
        let mut plan = Permutation {
            group_expert: Vec::with_capacity(active.len()),
            offsets: vec![0],
            x_rows: Vec::with_capacity(m * k),
            slot_of: vec![-1; m * k],
        };
        for e in active {
            plan.group_expert.push(e as i32);
            for &(t, j) in &rows_of[e] {
                plan.slot_of[t * k + j] = plan.x_rows.len() as i32;
                plan.x_rows.push(t as i32);
            }
            plan.offsets.push(plan.x_rows.len() as i32);
        }
        Ok(plan)
    }

    /// Number of leading groups with at most `limit` rows.
    fn small_groups(&self, limit: usize) -> usize {
        self.offsets
            .windows(2)
            .take_while(|w| (w[1] - w[0]) as usize <= limit)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::Permutation;

    #[test]
    fn permutation_groups_slots_by_expert_smallest_groups_first() {
        // 3 tokens, top-2: expert 5 gets 3 rows, expert 1 one row, expert 2 two rows
        let chosen = [5, 1, 5, 2, 2, 5];
        let p = Permutation::new(&chosen, 3, 2, 8).expect("valid routing");
        assert_eq!(p.group_expert, vec![1, 2, 5]);
        assert_eq!(p.offsets, vec![0, 1, 3, 6]);
        // slots of each group hold the token rows that chose the expert, in token order
        assert_eq!(p.x_rows, vec![0, 1, 2, 0, 1, 2]);
        // every (token, choice) maps to a slot of its expert
        for t in 0..3 {
            for j in 0..2 {
                let slot = p.slot_of[t * 2 + j] as usize;
                let g = p
                    .offsets
                    .windows(2)
                    .position(|w| (w[0] as usize..w[1] as usize).contains(&slot));
                assert_eq!(p.group_expert[g.expect("slot in a group")], chosen[t * 2 + j]);
                assert_eq!(p.x_rows[slot] as usize, t);
            }
        }
        assert_eq!(p.small_groups(1), 1);
        assert_eq!(p.small_groups(2), 2);
        assert_eq!(p.small_groups(64), 3);
    }

    #[test]
    fn permutation_rejects_experts_out_of_range() {
        assert!(Permutation::new(&[0, 8], 1, 2, 8).is_err());
        assert!(Permutation::new(&[-1, 0], 1, 2, 8).is_err());
    }
}
