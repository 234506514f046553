//! The paged latent cache in GPU memory: `[layers][blocks * block_size][kv_lora + rope]` bf16.
//! Block bookkeeping is the engine's [`BlockTable`] (the same as the CPU cache's); kernels get
//! each row's block table and length.

use crate::gpu::{DeviceBuf, Gpu};
use anyhow::Result;
use dsv3_engine::BlockTable;

pub struct DeviceCache {
    pub width: usize,
    pub layers: usize,
    pub data: DeviceBuf,
    pub table: BlockTable,
}

impl DeviceCache {
    pub fn new(
        gpu: &Gpu,
        layers: usize,
        width: usize,
        block_size: usize,
        num_blocks: usize,
        max_positions: usize,
    ) -> Result<Self> {
        let data = gpu.alloc(layers * num_blocks * block_size * width * 2)?;
        Ok(DeviceCache {
            width,
            layers,
            data,
            table: BlockTable::new(block_size, num_blocks, max_positions),
        })
    }

    pub fn block_size(&self) -> usize {
        self.table.block_size()
    }

    pub fn num_blocks(&self) -> usize {
        self.table.total_blocks()
    }

    /// Address of layer `layer`'s slots.
    pub fn layer_addr(&self, layer: usize) -> u64 {
        self.data
            .at(layer * self.num_blocks() * self.block_size() * self.width * 2)
    }
}
