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

    /// Makes every position below `end` readable on the GPU.
    pub(super) fn cover(&mut self, gpu: &Gpu, end: usize) -> Result<()> {
        let Some(rows) = rows_to_fill(self.filled, end, self.capacity)? else {
            return Ok(());
        };
        if self.half == 0 {
            return Ok(());
        }
        let words = rows.len() * self.half;
        let (mut cos, mut sin) = (vec![0f32; words], vec![0f32; words]);
        for (i, p) in rows.clone().enumerate() {
            let row = i * self.half..(i + 1) * self.half;
            self.rope.cos_sin(p, &mut cos[row.clone()], &mut sin[row]);
        }
        let at = rows.start * self.half * 4;
        gpu.copy_to(&self.cos, at, &cos)?;
        gpu.copy_to(&self.sin, at, &sin)?;
        self.filled = rows.end;
        Ok(())
    }
}

/// The positions to add to a table holding `0..filled`, with room for `capacity`, so that it
/// holds `0..end`: none if it does already; else at least as many as it holds (so a conversation
/// that grows token by token adds rows now and then, not every step), within its room.
fn rows_to_fill(filled: usize, end: usize, capacity: usize) -> Result<Option<std::ops::Range<usize>>> {
    ensure!(
        end <= capacity,
        "position {} is past the {capacity} positions the model serves",
        end.saturating_sub(1)
    );
    if end <= filled {
        return Ok(None);
    }
    Ok(Some(filled..end.max(2 * filled).min(capacity)))
}

#[cfg(test)]
mod tests {
    use super::rows_to_fill;

    #[test]
    fn the_table_grows_at_least_twofold_within_its_room() {
        assert_eq!(rows_to_fill(0, 1, 100).unwrap(), Some(0..1));
        assert_eq!(rows_to_fill(1, 2, 100).unwrap(), Some(1..2));
        assert_eq!(rows_to_fill(2, 3, 100).unwrap(), Some(2..4), "doubles");
        assert_eq!(rows_to_fill(4, 30, 100).unwrap(), Some(4..30), "or reaches the step");
        assert_eq!(rows_to_fill(60, 61, 100).unwrap(), Some(60..100), "never past its room");
        assert_eq!(rows_to_fill(30, 30, 100).unwrap(), None);
        assert_eq!(rows_to_fill(30, 7, 100).unwrap(), None);
        assert_eq!(rows_to_fill(100, 100, 100).unwrap(), None);
        let past = rows_to_fill(100, 101, 100).unwrap_err().to_string();
        assert!(
            past.contains("position 100") && past.contains("100 positions"),
            "{past}"
        );
    }
}
