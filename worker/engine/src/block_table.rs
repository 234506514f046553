//! Block bookkeeping of a paged KV cache, apart from where the cache lives: which pool blocks
//! each sequence owns and how many positions it has cached. The CPU cache and the GPU cache
//! both keep their rows by this table.

use std::collections::HashMap;

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
}

#[derive(Default, Debug)]
struct SeqBlocks {
    blocks: Vec<u32>,
    /// Positions written by the main stack.
    len: usize,
}

pub struct BlockTable {
    block_size: usize,
    num_blocks: usize,
    max_positions: usize,
    free: Vec<u32>,
    seqs: HashMap<SeqId, SeqBlocks>,
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
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn total_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    pub fn used_blocks(&self) -> usize {
        self.num_blocks - self.free.len()
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
        if needed > self.free.len() {
            return Err(CacheError::Full {
                needed,
                free: self.free.len(),
            });
        }
        let entry = self.seqs.entry(seq).or_default();
        for _ in 0..needed {
            entry.blocks.push(self.free.pop().expect("checked free count"));
        }
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
        self.reserve(seq, start + len)?;
        let entry = self.seqs.get_mut(&seq).expect("reserved above");
        entry.len = start + len;
        Ok(())
    }

    /// Forgets positions from `len` on (rejected speculative tokens); frees whole unused blocks.
    pub fn truncate(&mut self, seq: SeqId, len: usize) {
        if let Some(entry) = self.seqs.get_mut(&seq) {
            entry.len = entry.len.min(len);
            let keep = len.div_ceil(self.block_size);
            while entry.blocks.len() > keep {
                let block = entry.blocks.pop().expect("len checked");
                self.free.push(block);
            }
        }
    }

    /// Releases every block of the sequence.
    pub fn free_sequence(&mut self, seq: SeqId) {
        if let Some(entry) = self.seqs.remove(&seq) {
            self.free.extend(entry.blocks);
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
}
