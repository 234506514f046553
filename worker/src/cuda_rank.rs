//! An attention rank on the GPU: the CUDA model (all routed experts local) behind the same
//! `AttentionRank` interface the scheduler drives, so `serve --device cuda` is the whole fleet
//! on one GPU.

use anyhow::Result;
use dsv3_cuda::CudaModel;
use dsv3_engine::Sampler;
use dsv3_fleet::rank::{expert_load, sample_outputs, step_chunks, AttentionRank};
use dsv3_proto::{AttentionInfo, StepReply, StepRequest};
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

struct State {
    model: CudaModel,
    samplers: HashMap<u64, Sampler>,
    steps: u64,
    step_seconds: f64,
}

pub struct CudaAttention {
    state: Mutex<State>,
}

impl CudaAttention {
    pub fn new(model: CudaModel) -> Self {
        CudaAttention {
            state: Mutex::new(State {
                model,
                samplers: HashMap::new(),
                steps: 0,
                step_seconds: 0.0,
            }),
        }
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>> {
        self.state
            .lock()
            .map_err(|_| anyhow::anyhow!("the GPU attention rank is poisoned by an earlier panic"))
    }
}

impl AttentionRank for CudaAttention {
    fn step(&self, request: StepRequest) -> Result<StepReply> {
        let started = std::time::Instant::now();
        let mut guard = self.lock()?;
        let state = &mut *guard;
        let chunks = step_chunks(&request.items);
        let (outputs, _) = state.model.forward(&chunks, false)?;
        let reply = StepReply {
            sampled: sample_outputs(&mut state.samplers, &request.items, outputs),
            expert_load: expert_load(state.model.take_expert_counts()?),
        };
        state.steps += 1;
        state.step_seconds += started.elapsed().as_secs_f64();
        Ok(reply)
    }

    fn release(&self, seqs: &[u64]) -> Result<()> {
        let mut state = self.lock()?;
        for &seq in seqs {
            state.model.free_sequence(seq);
            state.samplers.remove(&seq);
        }
        Ok(())
    }

    fn info(&self) -> Result<AttentionInfo> {
        let state = self.lock()?;
        let cache = &state.model.cache;
        Ok(AttentionInfo {
            steps: state.steps,
            step_seconds: state.step_seconds,
            rank: 0,
            block_size: cache.block_size as u32,
            total_blocks: cache.num_blocks as u32,
            free_blocks: cache.free_blocks() as u32,
            placement_version: "local".into(),
            experts_ready: true,
            ..AttentionInfo::default()
        })
    }
}
