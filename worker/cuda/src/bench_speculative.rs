//! What speculative decoding costs and gives on the GPU, at full width with random FP8 weights:
//! per batch size, a plain decode step of the 5-layer slice (replayed as a CUDA graph, as served,
//! and launch by launch), the verify step that scores 1 + N tokens per sequence (replayed as a
//! CUDA graph, every row picked on the GPU, hidden states to the host, as `speculative_step` runs
//! it; timed on the host, so with its transfers), and the MTP module's draft step
//! (one MoE layer and the head, launch by launch). From those, decode tokens per second with
//! drafts at a given acceptance against plain decoding on the same slice.

use crate::bench::{decode, median, v3_config};
use crate::model::CudaModel;
use anyhow::Result;
use dsv3_engine::{Chunk, Fp8Activations, Outputs, RowPicks, TokenChoice, TokenPick};

/// Seconds of a step of `batch` sequences feeding `1 + drafts` tokens each after `ctx` cached
/// positions: a greedy pick at every fed position, every post-norm hidden state to the host.
fn verify(model: &mut CudaModel, batch: usize, ctx: usize, drafts: usize, reps: usize) -> Result<f64> {
    let seqs: Vec<u64> = (0..batch as u64).map(|s| 1000 + s).collect();
    model.fill_cache_random(&seqs, ctx, 23)?;
    let tokens: Vec<Vec<u32>> = (0..batch)
        .map(|i| {
            (0..=drafts)
                .map(|k| ((i * 7919 + k * 31) % 120000 + 2) as u32)
                .collect()
        })
        .collect();
    let chunks: Vec<Chunk> = seqs
        .iter()
        .zip(&tokens)
        .map(|(&s, t)| {
            let mut c = Chunk::new(s, ctx, t, if drafts > 0 { Outputs::All } else { Outputs::Last });
            c.all_hidden = true;
            c
        })
        .collect();
    let picks = vec![
        Some(RowPicks {
            picks: vec![TokenPick::plain(TokenChoice::GREEDY); drafts + 1],
            logits: false,
        });
        batch
    ];
    let mut times = Vec::new();
    for rep in 0..reps + 2 {
        let start = std::time::Instant::now();
        model.step_pick_rows(&chunks, &picks)?;
        let t = start.elapsed().as_secs_f64();
        for &s in &seqs {
            model.truncate(s, ctx);
        }
        if rep >= 2 {
            times.push(t);
        } else {
            model.gpu.take_profile()?;
        }
    }
    crate::bench::print_profile(model, &format!("verify batch {batch}, {drafts} drafts"), reps)?;
    for &s in &seqs {
        model.free_sequence(s);
    }
    Ok(median(times))
}

/// The table, with projected speed-ups at the acceptances in `acceptance` (of the first draft).
pub fn run(
    batches: &[usize],
    ctx: usize,
    reps: usize,
    activations: Fp8Activations,
    acceptance: &[f64],
) -> Result<String> {
    let max_batch = batches.iter().copied().max().unwrap_or(1);
    let cache = max_batch * (ctx + 8) * 2 + 256;
    let mut slice = CudaModel::random(v3_config(5, 3)?.with_fp8_activations(activations), 0, cache, 42)?;
    // The MTP module's cost: one MoE layer and the head over each sequence's one new position.
    let mut mtp = CudaModel::random(v3_config(1, 0)?.with_fp8_activations(activations), 0, cache, 43)?;
    mtp.set_graphs(false);
    let mut out = String::from(
        "| batch | plain, graphed ms | plain, launched ms | verify 1 draft ms | verify 2 drafts ms | MTP draft step ms |",
    );
    for a in acceptance {
        out += &format!(" tok/s gain at {:.0}% (1 draft) |", a * 100.0);
    }
    out += "\n|---:|---:|---:|---:|---:|---:|";
    out += &"---:|".repeat(acceptance.len());
    out += "\n";
    for &b in batches {
        slice.set_graphs(true);
        let (graphed, _, _) = decode(&mut slice, b, ctx, reps, true)?;
        slice.set_graphs(false);
        let (launched, _, _) = decode(&mut slice, b, ctx, reps, true)?;
        slice.set_graphs(true);
        let v1 = verify(&mut slice, b, ctx, 1, reps)?;
        let v2 = verify(&mut slice, b, ctx, 2, reps)?;
        let (draft, _, _) = decode(&mut mtp, b, ctx, reps, true)?;
        eprintln!(
            "batch {b}: plain {:.3}/{:.3} ms, verify {:.3}/{:.3} ms, draft {:.3} ms",
            graphed * 1e3,
            launched * 1e3,
            v1 * 1e3,
            v2 * 1e3,
            draft * 1e3
        );
        out += &format!(
            "| {b} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |",
            graphed * 1e3,
            launched * 1e3,
            v1 * 1e3,
            v2 * 1e3,
            draft * 1e3
        );
        for a in acceptance {
            // 1 + a tokens per sequence per verify + draft, against 1 per graphed plain step.
            out += &format!(" {:.2}× |", (1.0 + a) / (v1 + draft) * graphed);
        }
        out += "\n";
    }
    Ok(out)
}
