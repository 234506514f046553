//! Speculative decoding with the checkpoint's multi-token-prediction (MTP) module.
//!
//! A decoding sequence feeds its last token followed by the drafts the MTP module proposed for
//! the positions after it, and one main-model step scores them all. Tokens are then picked row by
//! row with the sequence's own picks ([`crate::Sampler::picks_with_drafts`]): a draft is accepted
//! while it equals the token picked at its row; the first token that differs is output in its
//! place; after every draft is accepted the last row gives one more. Drafts are the MTP module's
//! most likely tokens, so this is rejection sampling against a one-hot draft distribution: every
//! output token is drawn from the target model's own distribution, and output is identical token
//! for token to decoding without drafts — seeded sampling too, since each output token takes one
//! draw. (Bit for bit on the CPU; on a GPU the verify step is a batch of another shape, whose
//! last-bit differences can flip a near tie as any change of batch can.) The cache positions of
//! rejected drafts are dropped.
//!
//! The MTP module then runs over every position whose post-norm hidden state and next token are
//! both known (prefill chunks included, so its own cache layer is complete), and its logits at a
//! sequence's last position give the first draft. Further drafts (N > 1) reuse the one MTP layer,
//! fed its own hidden state in place of the main model's. That, and MTP cache entries that arrive
//! with a block taken from the prefix cache, only change how good drafts are, never the output.

use crate::backend::{pick_rows_on_host, PickedToken, RowPicks, StepBackend, TokenPick};
use crate::kv_cache::SeqId;
use crate::model::{Chunk, Outputs};
use crate::sampling::argmax;
use anyhow::{ensure, Result};

/// One sequence's drafting state, kept between steps by whoever drives its backend.
#[derive(Clone, Debug, Default)]
pub struct Drafting {
    drafts: Vec<u32>,
    /// The step the drafts were made for: the position and token it feeds.
    after: Option<(usize, u32)>,
    /// The last computed position whose next token the MTP module has not seen, with its
    /// post-norm hidden state.
    pending: Option<(usize, Vec<f32>)>,
}

impl Drafting {
    /// The drafts to append to a chunk feeding `tokens` at `start`, at most `max`: those made
    /// for exactly that decode step, none otherwise.
    pub fn drafts_for(&self, start: usize, tokens: &[u32], max: usize) -> &[u32] {
        match (self.after, tokens) {
            (Some((at, token)), [fed]) if at == start && token == *fed => &self.drafts[..self.drafts.len().min(max)],
            _ => &[],
        }
    }

    /// Replaces the drafts for the step feeding `token` at `start` (tests that draft by oracle).
    pub fn set_drafts(&mut self, start: usize, token: u32, drafts: Vec<u32>) {
        self.after = Some((start, token));
        self.drafts = drafts;
    }
}

/// One sequence's part of a speculative step.
#[derive(Clone, Debug)]
pub struct SpecChunk<'a> {
    pub seq: SeqId,
    pub start: usize,
    /// The tokens fed: a prefill chunk, or the last output token.
    pub tokens: &'a [u32],
    /// Drafts after them ([`Drafting::drafts_for`]); only with picks.
    pub drafts: Vec<u32>,
    /// When the chunk samples: the picks of its last position and of each draft's
    /// (`1 + drafts.len()`, from [`crate::Sampler::picks_with_drafts`]).
    pub picks: Option<Vec<TokenPick>>,
    /// Drafts the MTP module makes after this chunk's output for the next step (0 where drafts
    /// cannot help, e.g. a sequence held to a grammar). Its cache layer is written up to
    /// `draft_depth - 1` positions past those kept: see [`positions_needed`].
    pub draft_depth: usize,
    /// Whether the logits of the picked rows come back ([`SpecOutcome::logits`]).
    pub logits: bool,
}

/// What a speculative step gave one sequence.
#[derive(Clone, Debug, Default)]
pub struct SpecOutcome {
    /// The tokens output, in order: accepted drafts, then the token picked after them.
    pub tokens: Vec<PickedToken>,
    /// Drafts scored and accepted.
    pub drafted: usize,
    pub accepted: usize,
    /// The logits of the rows picked from, `[1 + drafts, vocab]`, when the chunk asked.
    pub logits: Vec<f32>,
}

/// Cache positions a sequence may need in a step that feeds `fed` tokens and `drafts` drafts
/// from position `start` and then drafts `depth` for the next step: all drafts accepted, the MTP
/// module writes `depth - 1` positions past the ones kept.
pub fn positions_needed(start: usize, fed: usize, drafts: usize, depth: usize) -> usize {
    start + fed + drafts + depth.saturating_sub(1)
}

/// One step with drafts: verifies each chunk's drafts against the main model, drops the cache
/// positions of rejected ones, runs the MTP module and leaves up to each chunk's `draft_depth`
/// new drafts in its `drafting`. Ids at or above `vocab_limit` are never picked or drafted.
pub fn speculative_step(
    backend: &mut dyn StepBackend,
    chunks: &[SpecChunk],
    drafting: &mut [&mut Drafting],
    vocab_limit: Option<usize>,
) -> Result<Vec<Option<SpecOutcome>>> {
    ensure!(
        backend.has_mtp(),
        "speculative decoding needs the checkpoint's MTP module"
    );
    ensure!(
        chunks.len() == drafting.len(),
        "{} chunks, {} drafting states",
        chunks.len(),
        drafting.len()
    );
    let config = backend.config();
    let (vocab, width, context) = (config.vocab_size, config.hidden_size, config.max_position_embeddings);
    let limit = vocab_limit.unwrap_or(vocab).min(vocab);
    let fed: Vec<Vec<u32>> = chunks.iter().map(|c| [c.tokens, &c.drafts].concat()).collect();
    let mut model_chunks = Vec::with_capacity(chunks.len());
    let mut row_picks = Vec::with_capacity(chunks.len());
    for (c, tokens) in chunks.iter().zip(&fed) {
        let outputs = match &c.picks {
            None => {
                ensure!(c.drafts.is_empty(), "sequence {}: drafts without picks", c.seq);
                Outputs::None
            }
            Some(picks) => {
                ensure!(
                    picks.len() == c.drafts.len() + 1,
                    "sequence {}: {} picks for {} drafts",
                    c.seq,
                    picks.len(),
                    c.drafts.len()
                );
                if c.drafts.is_empty() {
                    Outputs::Last
                } else {
                    Outputs::All
                }
            }
        };
        let mut chunk = Chunk::new(c.seq, c.start, tokens, outputs);
        chunk.all_hidden = true;
        model_chunks.push(chunk);
        row_picks.push(c.picks.clone().map(|picks| RowPicks {
            picks,
            logits: c.logits,
        }));
    }
    // Every row is picked where the logits are; the first that differs from its draft ends the
    // sequence's output (the picks after it are not used).
    let picked = if limit < vocab {
        let outputs = backend.step(&model_chunks)?;
        pick_rows_on_host(outputs, &row_picks, vocab, Some(limit))?
    } else {
        backend.step_pick_rows(&model_chunks, &row_picks)?
    };
    drop(model_chunks);

    let mut outcomes = Vec::with_capacity(chunks.len());
    let mut mtp_inputs: Vec<MtpInput> = Vec::new();
    for (i, ((c, out), d)) in chunks.iter().zip(picked).zip(drafting.iter_mut()).enumerate() {
        // Each draft is kept while it is the token picked at its row; the first token that
        // differs (or the one after the last draft) is output in its place.
        let mut emitted: Vec<PickedToken> = Vec::new();
        if c.picks.is_some() {
            for (j, picked) in out.tokens.into_iter().enumerate() {
                let token = picked.token;
                emitted.push(picked);
                if c.drafts.get(j) != Some(&token) {
                    break;
                }
            }
        }
        let accepted = emitted.len().saturating_sub(1);
        let last = emitted.last().map(|p| p.token);
        let kept = c.start + c.tokens.len() + accepted;
        if accepted < c.drafts.len() {
            backend.truncate(c.seq, kept);
        }
        // The tokens at positions `c.start..`, the one just output last: the MTP module's
        // input at position q is the hidden state there and the token at q + 1.
        let mut known = fed[i][..c.tokens.len() + accepted].to_vec();
        known.extend(last);
        let (mut first, mut hidden) = (c.start, Vec::new());
        if let Some((position, h)) = d.pending.take() {
            if position + 1 == c.start {
                (first, hidden) = (position, h);
            }
        }
        hidden.extend_from_slice(&out.hidden[..(c.tokens.len() + accepted) * width]);
        let rows = hidden.len() / width;
        let pairs = (0..rows).take_while(|&r| first + r + 1 - c.start < known.len()).count();
        if pairs < rows {
            d.pending = Some((first + pairs, hidden[pairs * width..(pairs + 1) * width].to_vec()));
        }
        hidden.truncate(pairs * width);
        let next = known[first + 1 - c.start..first + 1 - c.start + pairs].to_vec();
        d.drafts.clear();
        d.after = last.map(|token| (kept, token));
        // The next verify step feeds positions kept..=kept + drafts: all inside the context.
        let drafts = if last.is_some() && kept + 1 < context {
            (context - 1 - kept).min(c.draft_depth)
        } else {
            0
        };
        if pairs > 0 {
            mtp_inputs.push(MtpInput {
                index: i,
                seq: c.seq,
                start: first,
                tokens: next,
                hidden,
                drafts,
            });
        }
        outcomes.push(c.picks.is_some().then_some(SpecOutcome {
            tokens: emitted,
            drafted: c.drafts.len(),
            accepted,
            logits: out.logits,
        }));
    }

    // The MTP module over the new pairs, then over its own drafts (its one layer reused, fed
    // its own hidden state): each round's last row drafts the token after the one it was given.
    let mut round = mtp_inputs;
    while !round.is_empty() {
        let chunks_mtp: Vec<Chunk> = round.iter().map(MtpInput::chunk).collect();
        let out = backend.mtp_step(&chunks_mtp)?;
        drop(chunks_mtp);
        let mut next = Vec::new();
        for (m, o) in round.into_iter().zip(out) {
            if m.drafts == 0 {
                continue;
            }
            let draft = argmax(&o.logits[..limit]);
            drafting[m.index].drafts.push(draft);
            if m.drafts > 1 {
                next.push(MtpInput {
                    index: m.index,
                    seq: m.seq,
                    start: m.start + m.tokens.len(),
                    tokens: vec![draft],
                    hidden: o.hidden,
                    drafts: m.drafts - 1,
                });
            }
        }
        round = next;
    }
    Ok(outcomes)
}

/// One sequence's MTP chunk: the positions from `start` whose hidden state and next token are
/// both known (or, later in the chain, its last draft), and the drafts still to make from it.
struct MtpInput {
    index: usize,
    seq: SeqId,
    start: usize,
    tokens: Vec<u32>,
    hidden: Vec<f32>,
    drafts: usize,
}

impl MtpInput {
    fn chunk(&self) -> Chunk<'_> {
        let outputs = if self.drafts > 0 { Outputs::Last } else { Outputs::None };
        let mut chunk = Chunk::new(self.seq, self.start, &self.tokens, outputs);
        chunk.prev_hidden = Some(&self.hidden);
        chunk
    }
}

/// Acceptance counts per draft position (1 = the first draft after the fed token).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Acceptance {
    pub drafted: Vec<u64>,
    pub accepted: Vec<u64>,
}

impl Acceptance {
    /// Counts one verification: `drafted` drafts scored, the first `accepted` kept.
    pub fn add(&mut self, drafted: usize, accepted: usize) {
        if self.drafted.len() < drafted {
            self.drafted.resize(drafted, 0);
            self.accepted.resize(drafted, 0);
        }
        for j in 0..drafted {
            self.drafted[j] += 1;
            if j < accepted {
                self.accepted[j] += 1;
            }
        }
    }
}
