//! The NCCL data plane between an attention rank and its expert shards, one GPU each.
//!
//! Each (attention rank, expert shard) pair has a communicator of its own (the attention rank is
//! NCCL rank 0, the shard rank 1), so a shard that fails takes down only its pairs, and a shard
//! serves any number of attention ranks, each at its own pace.
//!
//! Per MoE layer the attention rank queues, on its stream and with no wait on the host, for each
//! shard: the layer's token rows (bf16, `[rows, hidden]`), the routes that shard computes (global
//! expert ids, -1 for the others, `[rows, k]` i32) and their weights (`[rows, k]` f32); then it
//! receives the shard's partial sums (bf16, `[rows, hidden]`) and adds them into the residual.
//! The sizes travel first, on the control plane ([`LayerExchange`]): the shard's host queues the
//! matching receives, its experts and the send back on its own stream.

use crate::nccl::RankComm;
use anyhow::Result;
use std::sync::Arc;

/// One MoE layer's exchange as the control plane announces it to a shard: what the shard
/// receives next from that attention rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerExchange {
    pub layer: usize,
    pub rows: usize,
    /// Routed slots per row.
    pub k: usize,
}

impl LayerExchange {
    /// Bytes of each transfer, in the order both sides queue them: rows, expert ids, weights
    /// (to the shard), then the partial sums (back).
    pub fn bytes(&self, hidden: usize) -> ExchangeBytes {
        ExchangeBytes {
            rows: self.rows * hidden * 2,
            ids: self.rows * self.k * 4,
            weights: self.rows * self.k * 4,
            sums: self.rows * hidden * 2,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExchangeBytes {
    pub rows: usize,
    pub ids: usize,
    pub weights: usize,
    pub sums: usize,
}

/// NCCL rank of the attention side and of the shard in a pair's communicator.
pub const ATTENTION_SIDE: usize = 0;
pub const SHARD_SIDE: usize = 1;

/// A shard as an attention rank reaches it over NCCL.
pub trait ShardLink: Send + Sync {
    /// Tells the shard's host what comes next (on the control plane, without waiting for the
    /// shard) and returns the pair's communicator to queue it on; an error while the pair is
    /// not joined or has failed.
    fn announce(&self, exchange: LayerExchange) -> Result<Arc<RankComm>>;
    /// Queuing an announced exchange failed: the pair is broken (the shard waits for transfers
    /// that will not come) and must be ended.
    fn failed(&self, why: &str);
}

/// Routed experts on other GPUs, reached over NCCL: what an attention rank's model holds
/// instead of expert weights.
pub struct NcclExperts {
    pub shards: Vec<Arc<dyn ShardLink>>,
    /// The shard that computes each expert (index into `shards`), for every routed expert.
    pub owner: Vec<i32>,
}

impl NcclExperts {
    /// Shards that compute at least one expert (the others are sent nothing).
    pub fn shards_in_use(&self) -> Vec<usize> {
        (0..self.shards.len())
            .filter(|&s| self.owner.contains(&(s as i32)))
            .collect()
    }
}
