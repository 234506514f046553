//! Block bookkeeping of a paged KV cache, apart from where the cache lives: which pool blocks
//! each sequence owns and how many positions it has cached. The CPU cache and the GPU cache
//! both keep their rows by this table.
//!
//! **Prefix caching**: a full block written from known tokens is registered under the hash of
//! its tokens and of every token before them. A new sequence whose prompt starts with
//! registered blocks takes them by reference instead of computing them again
//! ([`BlockTable::reuse_prefix`]); a block goes back to the pool only when no sequence holds it,
//! and then stays reusable until the pool needs it (least recently used first). Shared blocks
//! are full and never written again.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

pub type SeqId = u64;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CacheError {
    #[error("KV cache is full: {needed} more blocks needed, {free} free")]
    Full { needed: usize, free: usize },
    #[error("sequence {0} is not in the KV cache")]
    UnknownSequence(SeqId),
    #[error("sequence {seq}: chunk starts at position {start} but only {len} positions are cached")]
    Gap { seq: SeqId, start: usize, len: usize },
    #[error("sequence {seq}: position {position} is beyond the model's context of {max}")]
    TooLong { seq: SeqId, position: usize, max: usize },
    #[error("sequence {seq}: position {position} lies in a block other sequences share")]
    Shared { seq: SeqId, position: usize },
}

#[derive(Default, Debug)]
struct SeqBlocks {
    blocks: Vec<u32>,
    /// Positions written by the main stack.
    len: usize,
    /// The tokens of positions `0..tokens.len()`, while they are known (chunks given with their
    /// tokens); their full blocks are registered for reuse.
    tokens: Vec<u32>,
    /// Chain hash of each full block of `tokens`.
    hashes: Vec<u64>,
    /// False once a chunk came without its tokens: nothing more is registered.
    tracked: bool,
}

pub struct BlockTable {
    block_size: usize,
    num_blocks: usize,
    max_positions: usize,
    /// Blocks holding nothing reusable.
    free: Vec<u32>,
    seqs: HashMap<SeqId, SeqBlocks>,
    /// Sequences holding each block.
    refs: Vec<u32>,
    /// The registered hash of each block.
    block_hash: Vec<Option<u64>>,
    /// Registered blocks by hash.
    registered: HashMap<u64, u32>,
    /// Registered blocks no sequence holds, by last use (oldest first): reusable, and taken
    /// for new rows when `free` is empty.
    idle: BTreeMap<u64, u32>,
    idle_since: Vec<u64>,
    clock: u64,
}

/// Hash of a full block's tokens chained to the hash of the blocks before it.
fn chain_hash(parent: u64, tokens: &[u32]) -> u64 {
    // SipHash with fixed keys: the same on every rank and every run.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

impl BlockTable {
    /// `num_blocks` blocks of `block_size` positions; no sequence may pass `max_positions`.
    pub fn new(block_size: usize, num_blocks: usize, max_positions: usize) -> Self {
        BlockTable {
            block_size,
            num_blocks,
            max_positions,
            free: (0..num_blocks as u32).rev().collect(),
            seqs: HashMap::new(),
            refs: vec![0; num_blocks],
            block_hash: vec![None; num_blocks],
            registered: HashMap::new(),
            idle: BTreeMap::new(),
            idle_since: vec![0; num_blocks],
            clock: 0,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn total_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Blocks a sequence can take: empty ones and idle reusable ones.
    pub fn free_blocks(&self) -> usize {
        self.free.len() + self.idle.len()
    }

    /// Blocks some sequence holds.
    pub fn used_blocks(&self) -> usize {
        self.num_blocks - self.free_blocks()
    }

    /// A block for new rows: an empty one, else the least recently used idle one (forgotten).
    fn take_block(&mut self) -> Option<u32> {
        let block = match self.free.pop() {
            Some(b) => b,
            None => {
                let (_, b) = self.idle.pop_first()?;
                if let Some(h) = self.block_hash[b as usize].take() {
                    self.registered.remove(&h);
                }
                b
            }
        };
        self.refs[block as usize] = 1;
        Some(block)
    }

    /// One holder fewer: a block no sequence holds becomes idle (registered) or empty.
    fn drop_block(&mut self, block: u32) {
        let b = block as usize;
        self.refs[b] = self.refs[b].saturating_sub(1);
        if self.refs[b] == 0 {
            if self.block_hash[b].is_some() {
                self.clock += 1;
                self.idle_since[b] = self.clock;
                self.idle.insert(self.clock, block);
            } else {
                self.free.push(block);
            }
        }
    }

    /// Takes registered blocks by reference for a chunk about to be computed: `tokens` at
    /// `start`, where the sequence is new (`start` 0) or holds exactly `start` positions, all in
    /// whole registered blocks (it has reused everything so far). With `keep_last` (the chunk
    /// must give logits) at least one token is left to compute. Returns the positions of
    /// `tokens` reused (whole blocks).
    pub fn reuse_prefix(&mut self, seq: SeqId, start: usize, tokens: &[u32], keep_last: bool) -> usize {
        let block_size = self.block_size;
        let usable = tokens.len() - usize::from(keep_last && !tokens.is_empty());
        // Not one whole block to take (every decode step): nothing to look up.
        if usable < block_size {
            return 0;
        }
        let continues = match self.seqs.get(&seq) {
            None => start == 0,
            Some(e) => e.tracked && e.len == start && e.tokens.len() == start && e.hashes.len() * block_size == start,
        };
        if !continues {
            return 0;
        }
        let mut entry = self.seqs.remove(&seq).unwrap_or_else(|| SeqBlocks {
            tracked: true,
            ..SeqBlocks::default()
        });
        let mut parent = entry.hashes.last().copied().unwrap_or(0);
        for block_tokens in tokens[..usable].chunks_exact(block_size) {
            let h = chain_hash(parent, block_tokens);
            let Some(&block) = self.registered.get(&h) else { break };
            let b = block as usize;
            if self.refs[b] == 0 {
                self.idle.remove(&self.idle_since[b]);
            }
            self.refs[b] += 1;
            entry.blocks.push(block);
            entry.hashes.push(h);
            entry.tokens.extend_from_slice(block_tokens);
            parent = h;
        }
        let reused = entry.tokens.len() - start;
        entry.len = entry.tokens.len();
        self.seqs.insert(seq, entry);
        reused
    }

    /// Records the tokens of a chunk `begin_chunk` made room for, registering the blocks they
    /// fill; a chunk whose tokens do not follow the known ones stops the registration.
    pub fn note_tokens(&mut self, seq: SeqId, start: usize, tokens: &[u32]) {
        let block_size = self.block_size;
        let Some(entry) = self.seqs.get_mut(&seq) else { return };
        if !entry.tracked || start > entry.tokens.len() {
            entry.tracked = false;
            return;
        }
        entry.tokens.truncate(start);
        entry.tokens.extend_from_slice(tokens);
        entry.hashes.truncate(start / block_size);
        let mut newly = Vec::new();
        while (entry.hashes.len() + 1) * block_size <= entry.tokens.len() {
            let i = entry.hashes.len();
            let parent = if i == 0 { 0 } else { entry.hashes[i - 1] };
            let h = chain_hash(parent, &entry.tokens[i * block_size..(i + 1) * block_size]);
            entry.hashes.push(h);
            newly.push((entry.blocks[i], h));
        }
        for (block, h) in newly {
            let b = block as usize;
            if self.block_hash[b].is_none() && !self.registered.contains_key(&h) {
                self.block_hash[b] = Some(h);
                self.registered.insert(h, block);
            }
        }
    }

    pub fn contains(&self, seq: SeqId) -> bool {
        self.seqs.contains_key(&seq)
    }

    pub fn seq_len(&self, seq: SeqId) -> Option<usize> {
        self.seqs.get(&seq).map(|s| s.len)
    }

    /// The sequence's blocks in position order (empty for an unknown sequence).
    pub fn blocks(&self, seq: SeqId) -> &[u32] {
        self.seqs.get(&seq).map_or(&[], |s| &s.blocks)
    }

    /// Blocks needed for a sequence to hold `positions` positions, beyond those it has.
    pub fn blocks_needed(&self, seq: SeqId, positions: usize) -> usize {
        let have = self.seqs.get(&seq).map_or(0, |s| s.blocks.len());
        positions.div_ceil(self.block_size).saturating_sub(have)
    }

    /// Makes room for positions `0..positions` of `seq`, creating the sequence if new.
    pub fn reserve(&mut self, seq: SeqId, positions: usize) -> Result<(), CacheError> {
        if positions > self.max_positions {
            return Err(CacheError::TooLong {
                seq,
                position: positions - 1,
                max: self.max_positions,
            });
        }
        let needed = self.blocks_needed(seq, positions);
        let free = self.free_blocks();
        if needed > free {
            return Err(CacheError::Full { needed, free });
        }
        let mut taken = Vec::with_capacity(needed);
        for _ in 0..needed {
            taken.push(self.take_block().expect("checked free count"));
        }
        self.seqs
            .entry(seq)
            .or_insert_with(|| SeqBlocks {
                tracked: true,
                ..SeqBlocks::default()
            })
            .blocks
            .extend(taken);
        Ok(())
    }

    /// Checks that a main-stack chunk at `start` continues the sequence (or rewrites its tail),
    /// and reserves its room; the sequence then holds `start + len` positions.
    pub fn begin_chunk(&mut self, seq: SeqId, start: usize, len: usize) -> Result<(), CacheError> {
        let cached = self.seqs.get(&seq).map_or(0, |s| s.len);
        if start > cached {
            return Err(CacheError::Gap {
                seq,
                start,
                len: cached,
            });
        }
        // Rows are written from `start` on: blocks there must be this sequence's alone, and
        // what they held is no longer what their hash says.
        let first = start / self.block_size;
        if let Some(entry) = self.seqs.get(&seq) {
            for &block in entry.blocks.iter().skip(first) {
                let b = block as usize;
                if self.refs[b] > 1 {
                    return Err(CacheError::Shared { seq, position: start });
                }
                if let Some(h) = self.block_hash[b].take() {
                    self.registered.remove(&h);
                }
            }
        }
        self.reserve(seq, start + len)?;
        let entry = self.seqs.get_mut(&seq).expect("reserved above");
        entry.len = start + len;
        Ok(())
    }

    /// Forgets positions from `len` on (rejected speculative tokens); frees whole unused blocks.
    pub fn truncate(&mut self, seq: SeqId, len: usize) {
        let mut dropped = Vec::new();
        if let Some(entry) = self.seqs.get_mut(&seq) {
            entry.len = entry.len.min(len);
            entry.tokens.truncate(len);
            entry.hashes.truncate(len / self.block_size);
            let keep = len.div_ceil(self.block_size);
            while entry.blocks.len() > keep {
                dropped.push(entry.blocks.pop().expect("len checked"));
            }
            // The block now partly kept is written again from `len`: it no longer holds what
            // its hash says (a block filled by rejected drafts was registered).
            if !len.is_multiple_of(self.block_size) {
                if let Some(&block) = entry.blocks.get(len / self.block_size) {
                    if let Some(h) = self.block_hash[block as usize].take() {
                        self.registered.remove(&h);
                    }
                }
            }
        }
        for block in dropped {
            self.drop_block(block);
        }
    }

    /// Keeps positions from `from` on but never offers them, or anything the sequence writes
    /// after them, to the prefix cache: their contents are not what their tokens alone give
    /// (computed with an expert masked out of their routes).
    pub fn withhold_from(&mut self, seq: SeqId, from: usize) {
        self.unregister_from(seq, from);
        if let Some(entry) = self.seqs.get_mut(&seq) {
            entry.tracked = false;
        }
    }

    /// Takes the blocks holding positions `from` on out of the prefix cache's index.
    fn unregister_from(&mut self, seq: SeqId, from: usize) {
        let Some(entry) = self.seqs.get(&seq) else { return };
        for &block in entry.blocks.iter().skip(from / self.block_size) {
            if let Some(h) = self.block_hash[block as usize].take() {
                self.registered.remove(&h);
            }
        }
    }

    /// Forgets positions from `len` on whose contents are wrong (computed without an expert
    /// they were routed to, or by a step that failed part-way): unlike
    /// [`BlockTable::truncate`], no block that held them stays registered, so no later prompt
    /// takes them from the prefix cache. Written again, they are offered as usual.
    pub fn discard_from(&mut self, seq: SeqId, len: usize) {
        self.unregister_from(seq, len);
        self.truncate(seq, len);
    }

    /// Releases every block of the sequence (registered ones stay reusable until needed).
    pub fn free_sequence(&mut self, seq: SeqId) {
        if let Some(entry) = self.seqs.remove(&seq) {
            for block in entry.blocks {
                self.drop_block(block);
            }
        }
    }

    /// Block and offset inside it of `position` of `seq`.
    pub fn locate(&self, seq: SeqId, position: usize) -> Result<(u32, usize), CacheError> {
        let entry = self.seqs.get(&seq).ok_or(CacheError::UnknownSequence(seq))?;
        let block = *entry.blocks.get(position / self.block_size).ok_or(CacheError::Gap {
            seq,
            start: position,
            len: entry.len,
        })?;
        Ok((block, position % self.block_size))
    }

    /// Pool-wide slot index (`block * block_size + offset`) of `position` of `seq`.
    pub fn slot(&self, seq: SeqId, position: usize) -> Result<usize, CacheError> {
        let (block, offset) = self.locate(seq, position)?;
        Ok(block as usize * self.block_size + offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_come_from_the_pool_and_go_back() {
        let mut table = BlockTable::new(4, 3, 64);
        table.begin_chunk(1, 0, 5).expect("fits");
        assert_eq!(table.used_blocks(), 2);
        assert_eq!(table.begin_chunk(2, 0, 5), Err(CacheError::Full { needed: 2, free: 1 }));
        assert_eq!(
            table.begin_chunk(1, 7, 1),
            Err(CacheError::Gap {
                seq: 1,
                start: 7,
                len: 5
            })
        );
        let second = table.blocks(1)[1] as usize;
        assert_eq!(table.slot(1, 5), Ok(second * 4 + 1));
        assert!(table.slot(1, 9).is_err());
        // A chunk may rewrite the tail (speculative tokens), not skip ahead.
        table.begin_chunk(1, 3, 2).expect("rewrite");
        assert_eq!(table.seq_len(1), Some(5));
        table.truncate(1, 3);
        assert_eq!((table.used_blocks(), table.seq_len(1)), (1, Some(3)));
        table.free_sequence(1);
        assert_eq!(table.used_blocks(), 0);
        assert!(matches!(table.reserve(3, 65), Err(CacheError::TooLong { .. })));
    }

    fn prefill(table: &mut BlockTable, seq: SeqId, tokens: &[u32]) -> usize {
        let reused = table.reuse_prefix(seq, 0, tokens, true);
        table.begin_chunk(seq, reused, tokens.len() - reused).expect("room");
        table.note_tokens(seq, reused, &tokens[reused..]);
        reused
    }

    #[test]
    fn a_block_filled_by_rejected_drafts_is_not_offered_once_truncated() {
        let mut table = BlockTable::new(4, 10, 64);
        // Prompt of 3, then a verify chunk [last, d1, d2] fills the first block and spills over.
        prefill(&mut table, 1, &[1, 2, 3]);
        table.begin_chunk(1, 3, 3).expect("room");
        table.note_tokens(1, 3, &[4, 5, 6]);
        assert_eq!(
            table.reuse_prefix(2, 0, &[1, 2, 3, 4, 9], true),
            4,
            "registered while full"
        );
        table.free_sequence(2);
        // Both drafts rejected: position 3 is written again, so the block leaves the index.
        table.truncate(1, 3);
        assert_eq!(table.reuse_prefix(3, 0, &[1, 2, 3, 4, 9], true), 0);
        table.begin_chunk(1, 3, 1).expect("the block is this sequence's alone");
    }

    #[test]
    fn blocks_written_without_an_expert_are_never_offered_again() {
        let mut table = BlockTable::new(4, 10, 64);
        // Two chunks: positions 0..8 were right, the chunk of 8..14 lost an expert.
        let prompt: Vec<u32> = (0..14).collect();
        prefill(&mut table, 1, &prompt[..8]);
        table.begin_chunk(1, 8, 6).expect("room");
        table.note_tokens(1, 8, &prompt[8..]);
        table.discard_from(1, 8);
        assert_eq!(table.seq_len(1), Some(8));
        table.free_sequence(1);
        // The first two blocks stay offered; the third (registered while full) is gone.
        assert_eq!(table.reuse_prefix(2, 0, &prompt, true), 8);
        table.free_sequence(2);
        // Mid-block: the block that held position 5 on is no longer offered either.
        let other: Vec<u32> = (100..114).collect();
        prefill(&mut table, 3, &other[..9]);
        table.discard_from(3, 5);
        table.free_sequence(3);
        assert_eq!(table.reuse_prefix(4, 0, &other, true), 4);
        table.free_sequence(4);
        assert_eq!(table.used_blocks(), 0, "every discarded block went back to the pool");
    }

    #[test]
    fn blocks_written_with_an_expert_masked_and_all_after_them_are_never_offered() {
        let mut table = BlockTable::new(4, 10, 64);
        let tokens: Vec<u32> = (200..216).collect();
        // Positions 0..8 were right; the chunk of 8..10 had an expert masked out.
        prefill(&mut table, 1, &tokens[..8]);
        table.begin_chunk(1, 8, 2).expect("room");
        table.note_tokens(1, 8, &tokens[8..10]);
        table.withhold_from(1, 8);
        assert_eq!(table.seq_len(1), Some(10), "the positions are kept");
        // Decoding goes on and fills the third block: it is not registered.
        table.begin_chunk(1, 10, 2).expect("room");
        table.note_tokens(1, 10, &tokens[10..12]);
        table.free_sequence(1);
        assert_eq!(table.reuse_prefix(2, 0, &tokens, true), 8);
        table.free_sequence(2);
        // Mid-block: the block holding position 6 on leaves the index though it was full.
        let other: Vec<u32> = (300..316).collect();
        prefill(&mut table, 3, &other[..12]);
        table.withhold_from(3, 6);
        table.free_sequence(3);
        assert_eq!(table.reuse_prefix(4, 0, &other, true), 4);
        table.free_sequence(4);
    }

    #[test]
    fn a_shared_prefix_is_taken_by_reference_and_outlives_its_writer() {
        let mut table = BlockTable::new(4, 10, 64);
        let prompt: Vec<u32> = (0..10).collect();
        assert_eq!(prefill(&mut table, 1, &prompt), 0);
        // Two full blocks of the first prompt are registered; the partial third is not.
        let mut longer = prompt.clone();
        longer.extend([50, 51, 52]);
        assert_eq!(prefill(&mut table, 2, &longer), 8);
        assert_eq!(table.blocks(2)[..2], table.blocks(1)[..2]);
        assert_ne!(table.blocks(2)[2], table.blocks(1)[2]);
        assert_eq!(table.used_blocks(), 5, "two shared blocks counted once (3 + 2)");
        // At least one token is always left to compute: an 8-token prompt reuses one block.
        assert_eq!(prefill(&mut table, 3, &prompt[..8]), 4);
        // A different first token shares nothing (the hash chains every token before).
        let other: Vec<u32> = std::iter::once(99).chain(1..10).collect();
        table.free_sequence(3);
        assert_eq!(prefill(&mut table, 4, &other), 0);
        // The writer goes; its registered blocks stay reusable while the pool allows.
        table.free_sequence(1);
        table.free_sequence(2);
        table.free_sequence(4);
        assert_eq!(table.used_blocks(), 0);
        // (The second prompt registered its third block too: 12 of its 13 positions.)
        assert_eq!(prefill(&mut table, 5, &longer), 12);
        // Writing into a shared block is refused.
        assert_eq!(prefill(&mut table, 6, &longer), 12);
        assert_eq!(
            table.begin_chunk(6, 2, 1),
            Err(CacheError::Shared { seq: 6, position: 2 })
        );
    }

    #[test]
    fn a_prompt_in_chunks_goes_on_reusing_while_every_block_so_far_was_reused() {
        let mut table = BlockTable::new(4, 16, 64);
        let prompt: Vec<u32> = (0..20).collect();
        prefill(&mut table, 1, &prompt);
        // The same prompt in chunks of 8, as a step budget splits it.
        let mut at = 0;
        let mut reused = 0;
        for chunk in prompt.chunks(8) {
            let last = at + chunk.len() == prompt.len();
            let r = table.reuse_prefix(2, at, chunk, last);
            if r < chunk.len() {
                table.begin_chunk(2, at + r, chunk.len() - r).expect("room");
                table.note_tokens(2, at + r, &chunk[r..]);
            }
            reused += r;
            at += chunk.len();
        }
        // 8 + 8 from the first two chunks (wholly reused: nothing to compute), 0 from the last
        // (its one full block holds the token that must give logits): 16 of 20.
        assert_eq!(reused, 16);
        assert_eq!(table.blocks(2)[..4], table.blocks(1)[..4]);
    }

    #[test]
    fn idle_registered_blocks_are_taken_least_recently_used_first_when_the_pool_is_short() {
        let mut table = BlockTable::new(2, 4, 64);
        prefill(&mut table, 1, &[1, 2, 3, 4, 5]); // blocks for [1,2] [3,4] registered, [5]
        table.free_sequence(1);
        prefill(&mut table, 2, &[7, 8, 9]); // [7,8] registered
        table.free_sequence(2);
        assert_eq!(table.free_blocks(), 4);
        // Idle: [1,2], [3,4], [7,8] (oldest first) and one empty block. Six positions need three
        // blocks: the empty one, then the two oldest idle ones.
        prefill(&mut table, 3, &[20, 21, 22, 23, 24, 25]);
        assert_eq!(
            table.reuse_prefix(4, 0, &[7, 8, 9], true),
            2,
            "the newest idle block survives"
        );
        assert_eq!(
            table.reuse_prefix(5, 0, &[1, 2, 3, 4, 5], true),
            0,
            "the oldest were taken"
        );
    }
}
