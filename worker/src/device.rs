//! Which device runs a role, and the one place each role's model is loaded on it: an attention
//! rank's [`StepBackend`] (the CPU or the CUDA model, every routed expert local or reached on
//! expert shards) and an expert shard's experts.

use crate::progress;
use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use dsv3_engine::{
    Checkpoint, CpuBackend, EngineOptions, ExpertSelection, LocalExperts, MemoryUse, Model, ModelConfig, ModelFiles,
    StepBackend,
};
use dsv3_fleet::grpc::ShardExperts;
use dsv3_fleet::ExpertBackend;
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    /// CUDA when a driver and a GPU are present, else the CPU.
    Auto,
    Cpu,
    Cuda,
}

impl DeviceArg {
    /// Resolves `auto`: whether to run on the GPU. `cuda` without a usable GPU is an error.
    pub fn use_cuda(self) -> Result<bool> {
        match self {
            DeviceArg::Cpu => Ok(false),
            DeviceArg::Auto => Ok(dsv3_cuda::device_status().is_ok()),
            DeviceArg::Cuda => match dsv3_cuda::device_status() {
                Ok(_) => Ok(true),
                Err(why) => bail!("--device cuda: {why}"),
            },
        }
    }
}

/// The GPU a process runs on: the first it sees (`CUDA_VISIBLE_DEVICES` picks it; the fleet
/// launcher and Kubernetes set that).
const GPU: usize = 0;

/// An attention rank's model on `device` with a cache of `cache_tokens` positions. With
/// `experts`, the routed experts are reached through them and not loaded here; without, every
/// routed expert is loaded (the whole model in one process).
pub fn load_backend(
    files: &ModelFiles,
    device: DeviceArg,
    experts: Option<Arc<dyn ExpertBackend>>,
    cache_tokens: usize,
) -> Result<Box<dyn StepBackend>> {
    let config = ModelConfig::from_model_files(files)?;
    let backend: Box<dyn StepBackend> = if device.use_cuda()? {
        let mut report = progress::layer_reporter(files.describe(), config.num_hidden_layers);
        let host = experts.map(|e| e as dsv3_cuda::HostExperts);
        Box::new(dsv3_cuda::CudaModel::load(
            files,
            GPU,
            cache_tokens,
            host,
            &mut |done, _| report(done),
        )?)
    } else {
        let expert_layers = if experts.is_some() {
            0
        } else {
            config.routed_expert_layers().len()
        };
        let mut report = progress::layer_reporter(files.describe(), config.num_cache_layers() + expert_layers);
        let block = EngineOptions::default().block_size;
        match experts {
            Some(remote) => {
                let model = Model::load(files, &mut report).context("loading the attention model")?;
                Box::new(CpuBackend::new(model, remote, 0, cache_tokens, block))
            }
            None => {
                let ckpt = Checkpoint::open(files)?;
                let local = LocalExperts::load(&ckpt, &config, &ExpertSelection::All, &mut report)?;
                let bytes = local.weight_bytes();
                let model = Model::load(files, &mut report)?;
                Box::new(CpuBackend::new(model, Arc::new(local), bytes, cache_tokens, block))
            }
        }
    };
    eprintln!("{}", memory_line("model", &backend.device(), backend.memory()));
    Ok(backend)
}

/// An expert shard's experts `held` (of every MoE layer) on `device`, with the device's name and
/// the memory they hold.
pub fn load_shard(files: &ModelFiles, device: DeviceArg, held: &[u32]) -> Result<(ShardExperts, String, MemoryUse)> {
    let config = ModelConfig::from_model_files(files)?;
    let layers = config.routed_expert_layers().len();
    let mut report = progress::layer_reporter(files.describe(), layers);
    let (experts, name, memory): (ShardExperts, String, MemoryUse) = if device.use_cuda()? {
        let shard = dsv3_cuda::CudaExperts::load(files, GPU, held, &mut |done, _| report(done))?;
        let (name, memory) = (shard.device(), shard.memory());
        (Arc::new(shard), name, memory)
    } else {
        let ckpt = Checkpoint::open(files)?;
        let local = LocalExperts::load(&ckpt, &config, &ExpertSelection::Only(held.to_vec()), &mut report)?;
        let memory = MemoryUse {
            weights: local.weight_bytes() as u64,
            ..MemoryUse::default()
        };
        (Arc::new(local), "cpu".into(), memory)
    };
    eprintln!("{}", memory_line("experts", &name, memory));
    Ok((experts, name, memory))
}

/// `memory on DEVICE: weights 1.23 GB, KV cache …, workspace …` for start-up logs.
pub fn memory_line(what: &str, device: &str, m: MemoryUse) -> String {
    let gb = |b: u64| b as f64 / 1e9;
    format!(
        "{what} memory on {device}: weights {:.3} GB, KV cache {:.3} GB, workspace {:.3} GB",
        gb(m.weights),
        gb(m.kv_cache),
        gb(m.workspace)
    )
}
