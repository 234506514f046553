//! The rotary table on the GPU: cos and sin `[position][rope_dim / 2]`, with room for every
//! position a sequence can reach, so its address (which recorded graphs keep) never changes.
//! It is filled from [`Rope::cos_sin`] on the host as steps reach further, so a step uploads no
//! angles of its own: RoPE reads each row's from its position (its length minus one). (Computed
//! per token on the host, the angles had kept the GPU idle for 1.1 ms before a 4,096-token
//! prefill; copied per row from a host table, 0.44 ms.)

use crate::gpu::{DeviceBuf, Gpu};
use anyhow::{ensure, Result};
use dsv3_engine::rope::Rope;
use dsv3_engine::ModelConfig;

pub(super) struct DeviceRope {
    rope: Rope,
    pub(super) cos: DeviceBuf,
    pub(super) sin: DeviceBuf,
    half: usize,
    /// Positions the buffers have room for.
    capacity: usize,
    /// Positions written so far.
    filled: usize,
}

impl DeviceRope {
    /// Room for positions `0..capacity`, nothing written yet.
    pub(super) fn new(gpu: &Gpu, config: &ModelConfig, capacity: usize) -> Result<Self> {
        let half = config.qk_rope_head_dim / 2;
        let bytes = (capacity * half * 4).max(4);
        Ok(DeviceRope {
            rope: Rope::new(config),
            cos: gpu.alloc(bytes)?,
            sin: gpu.alloc(bytes)?,
            half,
            capacity,
            filled: 0,
        })
    }

    /// Makes every position below `end` readable on the GPU (growing at least twofold, so a
    /// conversation that grows token by token uploads a few rows now and then, not every step).
    pub(super) fn cover(&mut self, gpu: &Gpu, end: usize) -> Result<()> {
        ensure!(
            end <= self.capacity,
            "position {} is past the {} positions the model serves",
            end.saturating_sub(1),
            self.capacity
        );
        if end <= self.filled || self.half == 0 {
            return Ok(());
        }
        let to = end.max(2 * self.filled).min(self.capacity);
        let rows = (to - self.filled) * self.half;
        let (mut cos, mut sin) = (vec![0f32; rows], vec![0f32; rows]);
        for (i, p) in (self.filled..to).enumerate() {
            let row = i * self.half..(i + 1) * self.half;
            self.rope.cos_sin(p, &mut cos[row.clone()], &mut sin[row]);
        }
        let at = self.filled * self.half * 4;
        gpu.copy_to(&self.cos, at, &cos)?;
        gpu.copy_to(&self.sin, at, &sin)?;
        self.filled = to;
        Ok(())
    }
}
