//! The paged latent cache in GPU memory: `[layers][blocks * block_size][kv_lora + rope]` bf16.
//! Block bookkeeping lives on the host; kernels get each row's block table and length.

use crate::gpu::{DeviceBuf, Gpu};
use anyhow::{bail, Result};
use dsv3_engine::SeqId;
use std::collections::HashMap;

pub struct DeviceCache {
    pub block_size: usize,
    pub num_blocks: usize,
    pub width: usize,
    pub layers: usize,
    pub data: DeviceBuf,
    free: Vec<u32>,
    seqs: HashMap<SeqId, Sequence>,
}

#[derive(Default)]
struct Sequence {
    blocks: Vec<u32>,
    len: usize,
}

impl DeviceCache {
    pub fn new(gpu: &Gpu, layers: usize, width: usize, block_size: usize, num_blocks: usize) -> Result<Self> {
        let data = gpu.alloc(layers * num_blocks * block_size * width * 2)?;
        Ok(DeviceCache {
            block_size,
            num_blocks,
            width,
            layers,
            data,
            free: (0..num_blocks as u32).rev().collect(),
            seqs: HashMap::new(),
        })
    }

    /// Address of layer `layer`'s slots.
    pub fn layer_addr(&self, layer: usize) -> u64 {
        self.data.at(layer * self.num_blocks * self.block_size * self.width * 2)
    }

    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    pub fn seq_len(&self, seq: SeqId) -> Option<usize> {
        self.seqs.get(&seq).map(|s| s.len)
    }

    /// Extends `seq` to hold positions `start..start+len`; `start` must equal its current length.
    pub fn begin_chunk(&mut self, seq: SeqId, start: usize, len: usize) -> Result<()> {
        let current = self.seqs.get(&seq).map_or(0, |s| s.len);
        if start != current {
            bail!("sequence {seq}: chunk starts at {start} but {current} positions are cached");
        }
        let needed = (start + len).div_ceil(self.block_size);
        let have = self.seqs.get(&seq).map_or(0, |s| s.blocks.len());
        if needed > have && needed - have > self.free.len() {
            bail!(
                "KV cache full: sequence {seq} needs {} more blocks, {} free",
                needed - have,
                self.free.len()
            );
        }
        let entry = self.seqs.entry(seq).or_default();
        while entry.blocks.len() < needed {
            entry.blocks.push(self.free.pop().expect("checked above"));
        }
        entry.len = start + len;
        Ok(())
    }

    pub fn blocks(&self, seq: SeqId) -> &[u32] {
        self.seqs.get(&seq).map_or(&[], |s| &s.blocks)
    }

    /// Slot index of `position` in `seq` (the sequence must cover it).
    pub fn slot(&self, seq: SeqId, position: usize) -> usize {
        let blocks = self.blocks(seq);
        blocks[position / self.block_size] as usize * self.block_size + position % self.block_size
    }

    /// Forgets positions from `len` on (their blocks stay with the sequence).
    pub fn truncate(&mut self, seq: SeqId, len: usize) {
        if let Some(s) = self.seqs.get_mut(&seq) {
            s.len = s.len.min(len);
        }
    }

    pub fn free_sequence(&mut self, seq: SeqId) {
        if let Some(s) = self.seqs.remove(&seq) {
            self.free.extend(s.blocks);
        }
    }
}
