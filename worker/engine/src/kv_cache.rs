//! Paged latent KV cache: per token and layer one row of `kv_lora_rank + qk_rope_head_dim`
//! values (`[c_kv ; k_pe]`, 576 for V3), in host memory. Which blocks a sequence owns is the
//! shared [`BlockTable`]'s business; this type keeps the rows.

use crate::block_table::BlockTable;
pub use crate::block_table::{CacheError, SeqId};
use crate::config::ModelConfig;

pub struct KvCache {
    layers: usize,
    width: usize,
    table: BlockTable,
    /// `[layer][block][slot][width]`.
    data: Vec<f32>,
}

impl KvCache {
    pub fn new(config: &ModelConfig, block_size: usize, num_blocks: usize) -> Self {
        let layers = config.num_cache_layers();
        let width = config.kv_cache_width();
        KvCache {
            layers,
            width,
            table: BlockTable::new(block_size, num_blocks, config.max_position_embeddings),
            data: vec![0.0; layers * num_blocks * block_size * width],
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

    /// The block bookkeeping (sizes, free blocks, sequence lengths).
    pub fn table(&self) -> &BlockTable {
        &self.table
    }

    pub fn table_mut(&mut self) -> &mut BlockTable {
        &mut self.table
    }

    pub fn block_size(&self) -> usize {
        self.table.block_size()
    }

    pub fn total_blocks(&self) -> usize {
        self.table.total_blocks()
    }

    pub fn free_blocks(&self) -> usize {
        self.table.free_blocks()
    }

    pub fn used_blocks(&self) -> usize {
        self.table.used_blocks()
    }

    /// Bytes the rows take.
    pub fn bytes(&self) -> usize {
        self.data.len() * 4
    }

    pub fn contains(&self, seq: SeqId) -> bool {
        self.table.contains(seq)
    }

    pub fn seq_len(&self, seq: SeqId) -> Option<usize> {
        self.table.seq_len(seq)
    }

    pub fn reserve(&mut self, seq: SeqId, positions: usize) -> Result<(), CacheError> {
        self.table.reserve(seq, positions)
    }

    pub fn begin_chunk(&mut self, seq: SeqId, start: usize, len: usize) -> Result<(), CacheError> {
        self.table.begin_chunk(seq, start, len)
    }

    /// See [`BlockTable::reuse_prefix`].
    pub fn reuse_prefix(&mut self, seq: SeqId, start: usize, tokens: &[u32], keep_last: bool) -> usize {
        self.table.reuse_prefix(seq, start, tokens, keep_last)
    }

    pub fn truncate(&mut self, seq: SeqId, len: usize) {
        self.table.truncate(seq, len)
    }

    /// See [`BlockTable::discard_from`].
    pub fn discard_from(&mut self, seq: SeqId, len: usize) {
        self.table.discard_from(seq, len)
    }

    /// See [`BlockTable::withhold_from`].
    pub fn withhold_from(&mut self, seq: SeqId, from: usize) {
        self.table.withhold_from(seq, from)
    }

    pub fn free_sequence(&mut self, seq: SeqId) {
        self.table.free_sequence(seq)
    }

    fn offset(&self, layer: usize, block: u32, slot: usize) -> usize {
        ((layer * self.table.total_blocks() + block as usize) * self.table.block_size() + slot) * self.width
    }

    pub fn write(&mut self, layer: usize, seq: SeqId, position: usize, row: &[f32]) -> Result<(), CacheError> {
        let (block, slot) = self.table.locate(seq, position)?;
        let at = self.offset(layer, block, slot);
        self.data[at..at + self.width].copy_from_slice(row);
        Ok(())
    }

    /// Copies positions `0..len` of one layer into `out` (`[len, width]`, contiguous).
    pub fn gather(&self, layer: usize, seq: SeqId, len: usize, out: &mut Vec<f32>) -> Result<(), CacheError> {
        if !self.table.contains(seq) {
            return Err(CacheError::UnknownSequence(seq));
        }
        let blocks = self.table.blocks(seq);
        let block_size = self.table.block_size();
        if len.div_ceil(block_size) > blocks.len() {
            return Err(CacheError::Gap {
                seq,
                start: len,
                len: self.table.seq_len(seq).unwrap_or(0),
            });
        }
        out.clear();
        out.reserve(len * self.width);
        let mut remaining = len;
        for &block in blocks {
            if remaining == 0 {
                break;
            }
            let take = remaining.min(block_size);
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
