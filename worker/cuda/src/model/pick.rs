//! The next token of each sequence, picked on the GPU (`pick.cu`) by the host's reference rule
//! ([`dsv3_engine::choose`]): the logits stay on the device and only ids and the requested
//! log-probabilities come back, in one small download per step.

use super::CudaModel;
use crate::gpu::Gpu;
use crate::kernels;
use crate::launch::{int, ptr};
use crate::tiles::PICK_THREADS;
use anyhow::{ensure, Result};
use dsv3_engine::{Chunk, PickedRows, PickedToken, RowPicks, TokenPick};

/// A pick as `pick.cu`'s `TokenPick` lays it out: 24 bytes, the draw's f64 last.
fn pick_words(p: &TokenPick) -> [u32; 6] {
    let u = p.choice.uniform.to_bits();
    [
        p.choice.temperature.to_bits(),
        p.choice.top_k.min(i32::MAX as usize) as u32,
        p.choice.top_p.to_bits(),
        p.logprobs.map_or(-1, |n| n.min(i32::MAX as usize) as i32) as u32,
        u as u32,
        (u >> 32) as u32,
    ]
}

/// The picks' logit edits as `apply_logit_edits` reads them: [row, token, bias, repetition, add].
fn edit_words(picks: &[TokenPick]) -> Vec<u32> {
    picks
        .iter()
        .enumerate()
        .flat_map(|(row, p)| {
            p.edits.iter().flat_map(move |e| {
                [
                    row as u32,
                    e.token,
                    e.bias.to_bits(),
                    e.repetition.to_bits(),
                    e.add.to_bits(),
                ]
            })
        })
        .collect()
}

/// Applies the picks' grammar masks to their rows (waiting for masks still being made); the
/// buffer to keep until the stream has run, if any.
fn apply_masks(g: &Gpu, logits: u64, vocab: usize, picks: &[TokenPick]) -> Result<Option<crate::gpu::DeviceBuf>> {
    if picks.iter().all(|p| p.allowed.is_none()) {
        return Ok(None);
    }
    let per_row = vocab.div_ceil(32);
    let mut words = vec![u32::MAX; picks.len() * per_row];
    for (row, p) in picks.iter().enumerate() {
        if let Some(mask) = &p.allowed {
            let mask = mask.wait().map_err(anyhow::Error::msg)?;
            let dst = &mut words[row * per_row..(row + 1) * per_row];
            dst.fill(0);
            let n = mask.len().min(per_row);
            dst[..n].copy_from_slice(&mask[..n]);
        }
    }
    let buf = g.upload(&words)?;
    kernels::apply_token_masks.launch(
        g,
        (vocab.div_ceil(256) as u32, picks.len() as u32, 1),
        256,
        0,
        (ptr(logits), int(vocab), ptr(buf.addr), int(per_row)),
    )?;
    Ok(Some(buf))
}

/// Picks one token per row of the `[picks.len(), vocab]` f32 logits at device address `logits`,
/// after applying the picks' logit edits to those rows in place.
pub fn pick_tokens(g: &Gpu, logits: u64, vocab: usize, picks: &[TokenPick]) -> Result<Vec<PickedToken>> {
    if picks.is_empty() {
        return Ok(Vec::new());
    }
    let edits = edit_words(picks);
    // Kept alive until the pick's download has synchronised the stream.
    let _edits = if edits.is_empty() {
        None
    } else {
        let n = edits.len() / 5;
        let buf = g.upload(&edits)?;
        kernels::apply_logit_edits.launch(
            g,
            (n.div_ceil(256) as u32, 1, 1),
            256,
            0,
            (ptr(logits), int(vocab), ptr(buf.addr), int(n)),
        )?;
        Some(buf)
    };
    let _masks = apply_masks(g, logits, vocab, picks)?;
    let max_top = picks.iter().filter_map(|p| p.logprobs).max().unwrap_or(0).min(vocab);
    let stride = 2 + 2 * max_top;
    let words: Vec<u32> = picks.iter().flat_map(pick_words).collect();
    let plan = g.upload(&words)?;
    let out = g.alloc(picks.len() * stride * 4)?;
    kernels::pick_tokens.launch(
        g,
        (picks.len() as u32, 1, 1),
        PICK_THREADS as u32,
        0,
        (ptr(out.addr), ptr(logits), int(vocab), ptr(plan.addr), int(max_top)),
    )?;
    let raw = g.download::<u32>(out.addr, picks.len() * stride)?;
    Ok(picks
        .iter()
        .zip(raw.chunks(stride))
        .map(|(p, row)| PickedToken {
            token: row[0],
            logprob: p.logprobs.map(|_| f32::from_bits(row[1])),
            top_logprobs: (0..p.logprobs.unwrap_or(0).min(max_top))
                .map(|i| (row[2 + 2 * i], f32::from_bits(row[3 + 2 * i])))
                .collect(),
        })
        .collect())
}

impl CudaModel {
    /// One step whose picks are made on the GPU: see [`dsv3_engine::StepBackend::step_pick`].
    pub fn step_pick(&mut self, chunks: &[Chunk], picks: &[Option<TokenPick>]) -> Result<Vec<Option<PickedToken>>> {
        ensure!(
            picks.len() == chunks.len(),
            "{} picks for {} chunks",
            picks.len(),
            chunks.len()
        );
        // The last row of each picking chunk, which chunk it is, and its pick.
        let (mut rows, mut chunk_of, mut plan, mut row) = (Vec::new(), Vec::new(), Vec::new(), 0);
        for (i, (c, p)) in chunks.iter().zip(picks).enumerate() {
            row += c.tokens.len();
            if let Some(p) = p {
                rows.push(row as i32 - 1);
                chunk_of.push(i);
                plan.push(p.clone());
            }
        }
        let (head, _) = self.run_step(chunks, Some(&rows), false)?;
        let mut out = vec![None; chunks.len()];
        if let Some(head) = head {
            let picked = pick_tokens(&self.gpu, head.logits, self.config.vocab_size, &plan)?;
            for (i, p) in chunk_of.into_iter().zip(picked) {
                out[i] = Some(p);
            }
        }
        Ok(out)
    }
}

impl CudaModel {
    /// One step picking at several positions per chunk on the GPU: see
    /// [`dsv3_engine::StepBackend::step_pick_rows`]. Only the ids, the logits asked for and the
    /// hidden states come back.
    pub fn step_pick_rows(&mut self, chunks: &[Chunk], picks: &[Option<RowPicks>]) -> Result<Vec<PickedRows>> {
        ensure!(
            picks.len() == chunks.len(),
            "{} picks for {} chunks",
            picks.len(),
            chunks.len()
        );
        let (vocab, width) = (self.config.vocab_size, self.config.hidden_size);
        // The picked rows (each chunk's last ones), their picks, and where each chunk's start.
        let (mut rows, mut plan, mut first_pick, mut row) = (Vec::new(), Vec::new(), Vec::new(), 0);
        for (c, p) in chunks.iter().zip(picks) {
            first_pick.push(plan.len());
            if let Some(p) = p {
                ensure!(
                    p.picks.len() <= c.tokens.len(),
                    "sequence {}: {} picks for {} positions",
                    c.seq,
                    p.picks.len(),
                    c.tokens.len()
                );
                let end = row + c.tokens.len();
                rows.extend((end - p.picks.len()..end).map(|r| r as i32));
                plan.extend(p.picks.iter().cloned());
            }
            row += c.tokens.len();
        }
        // A chunk picked at every position (a decode token and its drafts) finds its hidden
        // states among the head's post-norm rows; only others need the whole residual stream
        // (which keeps the step off the CUDA graphs).
        let picks_all = |c: &Chunk, p: &Option<RowPicks>| p.as_ref().is_some_and(|p| p.picks.len() == c.tokens.len());
        let from_head = chunks.iter().zip(picks).any(|(c, p)| c.all_hidden && picks_all(c, p));
        let keep_residual = chunks.iter().zip(picks).any(|(c, p)| c.all_hidden && !picks_all(c, p));
        let (head, _, residual) = self.run_step_keeping(chunks, Some(&rows), false, keep_residual)?;
        let g = &self.gpu;
        // Logits asked for come back as the model gave them: the picks edit them in place.
        let mut asked = Vec::with_capacity(chunks.len());
        for (p, &at) in picks.iter().zip(&first_pick) {
            asked.push(match (&head, p) {
                (Some(head), Some(p)) if p.logits => {
                    g.download::<f32>(head.logits + (at * vocab * 4) as u64, p.picks.len() * vocab)?
                }
                _ => Vec::new(),
            });
        }
        let (picked, head_hidden) = match &head {
            Some(head) => (
                pick_tokens(g, head.logits, vocab, &plan)?,
                if from_head {
                    g.download::<f32>(head.normed, plan.len() * width)?
                } else {
                    Vec::new()
                },
            ),
            None => (Vec::new(), Vec::new()),
        };
        let every_row = self.normed_rows(residual.as_ref(), row)?;
        let mut out = Vec::with_capacity(chunks.len());
        let mut picked = picked.into_iter();
        let mut first_row = 0;
        for (((c, p), &at), logits) in chunks.iter().zip(picks).zip(&first_pick).zip(asked) {
            let n = c.tokens.len();
            let k = p.as_ref().map_or(0, |p| p.picks.len());
            out.push(PickedRows {
                tokens: picked.by_ref().take(k).collect(),
                logits,
                hidden: if !c.all_hidden {
                    Vec::new()
                } else if picks_all(c, p) {
                    head_hidden[at * width..(at + n) * width].to_vec()
                } else {
                    every_row[first_row * width..(first_row + n) * width].to_vec()
                },
            });
            first_row += n;
        }
        Ok(out)
    }
}
