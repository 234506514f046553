//! Paged latent KV cache: per token and layer one row of `kv_lora_rank + qk_rope_head_dim`
//! values (`[c_kv ; k_pe]`, 576 for V3). Sequences own lists of fixed-size blocks from one pool.

use crate::config::ModelConfig;
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

pub struct KvCache {
    layers: usize,
    width: usize,
    block_size: usize,
    num_blocks: usize,
    max_positions: usize,
    /// `[layer][block][slot][width]`.
    data: Vec<f32>,
    free: Vec<u32>,
    seqs: HashMap<SeqId, SeqBlocks>,
}

impl KvCache {
    pub fn new(config: &ModelConfig, block_size: usize, num_blocks: usize) -> Self {
        let layers = config.num_cache_layers();
        let width = config.kv_cache_width();
        KvCache {
            layers,
            width,
            block_size,
            num_blocks,
            max_positions: config.max_position_embeddings,
            data: vec![0.0; layers * num_blocks * block_size * width],
            free: (0..num_blocks as u32).rev().collect(),
            seqs: HashMap::new(),
        }
    }

    /// A cache holding `tokens` positions in blocks of 16.
    pub fn with_capacity(config: &ModelConfig, tokens: usize) -> Self {
        Self::new(config, 16, tokens.div_ceil(16).max(1))
    }

    pub fn layers(&self) -> usize {
        self.layers
    }

    pub fn width(&self) -> usize {
        self.width
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

    /// Checks that a main-stack chunk at `start` continues the sequence, and reserves its room.
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

    fn offset(&self, layer: usize, block: u32, slot: usize) -> usize {
        ((layer * self.num_blocks + block as usize) * self.block_size + slot) * self.width
    }

    pub fn write(&mut self, layer: usize, seq: SeqId, position: usize, row: &[f32]) -> Result<(), CacheError> {
        let entry = self.seqs.get(&seq).ok_or(CacheError::UnknownSequence(seq))?;
        let block = *entry.blocks.get(position / self.block_size).ok_or(CacheError::Gap {
            seq,
            start: position,
            len: entry.len,
        })?;
        let at = self.offset(layer, block, position % self.block_size);
        self.data[at..at + self.width].copy_from_slice(row);
        Ok(())
    }

    /// Copies positions `0..len` of one layer into `out` (`[len, width]`, contiguous).
    pub fn gather(&self, layer: usize, seq: SeqId, len: usize, out: &mut Vec<f32>) -> Result<(), CacheError> {
        let entry = self.seqs.get(&seq).ok_or(CacheError::UnknownSequence(seq))?;
        if len.div_ceil(self.block_size) > entry.blocks.len() {
            return Err(CacheError::Gap {
                seq,
                start: len,
                len: entry.len,
            });
        }
        out.clear();
        out.reserve(len * self.width);
        let mut remaining = len;
        for &block in &entry.blocks {
            if remaining == 0 {
                break;
            }
            let take = remaining.min(self.block_size);
            let at = self.offset(layer, block, 0);
            out.extend_from_slice(&self.data[at..at + take * self.width]);
            remaining -= take;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ModelConfig {
        ModelConfig::from_json_str(
            r#"{"vocab_size":16,"hidden_size":8,"intermediate_size":8,"moe_intermediate_size":4,
            "num_hidden_layers":2,"num_attention_heads":1,"n_routed_experts":0,"num_experts_per_tok":1,
            "kv_lora_rank":2,"qk_nope_head_dim":2,"qk_rope_head_dim":2,"v_head_dim":2,
            "max_position_embeddings":64}"#,
        )
        .expect("config")
    }

    #[test]
    fn blocks_come_from_the_pool_and_go_back() {
        let cfg = tiny();
        let mut cache = KvCache::new(&cfg, 4, 3);
        cache.begin_chunk(1, 0, 5).expect("fits");
        assert_eq!(cache.used_blocks(), 2);
        assert_eq!(cache.begin_chunk(2, 0, 5), Err(CacheError::Full { needed: 2, free: 1 }));
        for p in 0..5 {
            cache.write(1, 1, p, &[p as f32; 4]).expect("write");
        }
        let mut rows = Vec::new();
        cache.gather(1, 1, 5, &mut rows).expect("gather");
        assert_eq!(rows.len(), 20);
        assert_eq!(rows[16..], [4.0; 4]);
        assert_eq!(
            cache.begin_chunk(1, 7, 1),
            Err(CacheError::Gap {
                seq: 1,
                start: 7,
                len: 5
            })
        );
        cache.truncate(1, 3);
        assert_eq!(cache.used_blocks(), 1);
        cache.free_sequence(1);
        assert_eq!(cache.used_blocks(), 0);
        assert!(matches!(cache.reserve(3, 65), Err(CacheError::TooLong { .. })));
    }
}
