//! Which device runs a role, and the one place each role's model is loaded on it: an attention
//! rank's [`StepBackend`] (the CPU or the CUDA model, its routed experts local, on expert shards,
//! or split between them) and an expert shard's experts.

use crate::progress;
use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use dsv3_engine::{
    Checkpoint, CpuBackend, EngineOptions, ExpertExecutor, ExpertSelection, Fp8Activations, LocalExperts, MemoryUse,
    Model, ModelConfig, ModelFiles, StepBackend,
};
use dsv3_fleet::data_plane::PairHost;
use dsv3_fleet::grpc::ShardExperts;
use dsv3_fleet::{ExpertBackend, PlacedExperts};
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

/// What the FP8 products do with their activations (`--fp8-activations`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Fp8ActivationsArg {
    /// Quantised on a GPU (as the checkpoint's `activation_scheme: dynamic` declares, and as
    /// DeepSeek's own FP8 inference runs), unquantised on the CPU (the reference that matches
    /// transformers' dequantised forward pass).
    Auto,
    /// Per token per 128 channels to e4m3, multiplied on the FP8 tensor cores.
    Quantised,
    /// At the backend's width (f32 on the CPU, bf16 on a GPU) against the exact FP8 weights.
    Unquantised,
}

impl Fp8ActivationsArg {
    pub fn resolve(self, on_gpu: bool) -> Fp8Activations {
        match self {
            Fp8ActivationsArg::Quantised => Fp8Activations::Quantised,
            Fp8ActivationsArg::Unquantised => Fp8Activations::Unquantised,
            Fp8ActivationsArg::Auto if on_gpu => Fp8Activations::Quantised,
            Fp8ActivationsArg::Auto => Fp8Activations::Unquantised,
        }
    }

    /// The flag's value, as a child process is given it.
    pub fn name(self) -> &'static str {
        match self {
            Fp8ActivationsArg::Auto => "auto",
            Fp8ActivationsArg::Quantised => "quantised",
            Fp8ActivationsArg::Unquantised => "unquantised",
        }
    }
}

/// The GPU a process runs on: the first it sees (`CUDA_VISIBLE_DEVICES` picks it; the fleet
/// launcher and Kubernetes set that).
pub(crate) const GPU: usize = 0;

/// An attention rank's model on `device` with a cache of `cache_tokens` positions, holding the
/// routed experts `held` (all of them for the whole model in one process) and reaching every
/// other one through `remote` (expert shards). Only the experts held are read.
pub fn load_backend(
    files: &ModelFiles,
    device: DeviceArg,
    held: ExpertSelection,
    remote: Option<Arc<dyn ExpertBackend>>,
    cache_tokens: usize,
    activations: Fp8ActivationsArg,
) -> Result<Box<dyn StepBackend>> {
    let on_gpu = device.use_cuda()?;
    let activations = activations.resolve(on_gpu);
    let config = ModelConfig::from_model_files(files)?.with_fp8_activations(activations);
    let backend: Box<dyn StepBackend> = if on_gpu {
        let experts = dsv3_cuda::ModelExperts {
            held,
            remote: remote.map(|e| e as dsv3_cuda::HostExperts),
            nccl: None,
        };
        return load_cuda(files, &config, experts, cache_tokens, activations);
    } else {
        let expert_layers = match held {
            ExpertSelection::None => 0,
            _ => config.routed_expert_layers().len(),
        };
        let mut report = progress::layer_reporter(files.describe(), config.num_cache_layers() + expert_layers);
        let block = EngineOptions::default().block_size;
        let ckpt = Checkpoint::open(files)?;
        let local = match held {
            ExpertSelection::None => None,
            ref selection => Some(LocalExperts::load(&ckpt, &config, selection, &mut report)?),
        };
        let model =
            Model::from_checkpoint(config.clone(), &ckpt, &mut report).context("loading the attention model")?;
        let bytes = local.as_ref().map_or(0, LocalExperts::weight_bytes);
        let experts: Arc<dyn ExpertExecutor + Send> = match (held, local, remote) {
            (ExpertSelection::All, Some(local), None) => Arc::new(local),
            (ExpertSelection::None, None, Some(remote)) => remote,
            (ExpertSelection::Only(ids), Some(local), Some(remote)) => Arc::new(PlacedExperts::new(
                Arc::new(local),
                &ids,
                config.n_routed_experts,
                remote,
            )?),
            _ => bail!("some routed experts are neither loaded here nor reachable on expert shards"),
        };
        Box::new(CpuBackend::new(model, experts, bytes, cache_tokens, block))
    };
    eprintln!("{}", memory_line("model", &backend.device(), backend.memory()));
    Ok(backend)
}

/// An attention rank's model on the GPU, its routed experts as `experts` says.
pub fn load_cuda(
    files: &ModelFiles,
    config: &ModelConfig,
    experts: dsv3_cuda::ModelExperts,
    cache_tokens: usize,
    activations: Fp8Activations,
) -> Result<Box<dyn StepBackend>> {
    let mut report = progress::layer_reporter(files.describe(), config.num_hidden_layers);
    let backend = Box::new(dsv3_cuda::CudaModel::load(
        files,
        GPU,
        cache_tokens,
        experts,
        activations,
        &mut |done, _| report(done),
    )?);
    eprintln!("{}", memory_line("model", &backend.device(), backend.memory()));
    Ok(backend)
}

/// An expert shard's experts, loaded.
pub struct LoadedShard {
    pub experts: ShardExperts,
    /// Its side of the NCCL data plane, when asked for.
    pub pairs: Option<Arc<dyn PairHost>>,
    /// Where they run ("cpu", "NVIDIA H200 (cuda:0)").
    pub device: String,
    pub memory: MemoryUse,
}

/// An expert shard's experts `held` (of every MoE layer) on `device`, with their side of the
/// NCCL data plane when `nccl`.
pub fn load_shard(
    files: &ModelFiles,
    device: DeviceArg,
    held: &[u32],
    activations: Fp8ActivationsArg,
    nccl: bool,
) -> Result<LoadedShard> {
    let on_gpu = device.use_cuda()?;
    if nccl && !on_gpu {
        bail!("--data-plane nccl needs the experts on a GPU; this shard runs on the CPU (use --device cuda, or --data-plane grpc)");
    }
    let activations = activations.resolve(on_gpu);
    let config = ModelConfig::from_model_files(files)?.with_fp8_activations(activations);
    let layers = config.routed_expert_layers().len();
    let mut report = progress::layer_reporter(files.describe(), layers);
    let (experts, pairs, name, memory): (ShardExperts, Option<Arc<dyn PairHost>>, String, MemoryUse) = if on_gpu {
        let shard = dsv3_cuda::CudaExperts::load(files, GPU, held, activations, &mut |done, _| report(done))?;
        let (name, memory) = (shard.device(), shard.memory());
        let shard = Arc::new(shard);
        let pairs = nccl.then(|| {
            Arc::new(crate::nccl_plane::ShardPairs {
                experts: shard.clone(),
                hidden: config.hidden_size,
            }) as Arc<dyn PairHost>
        });
        (shard, pairs, name, memory)
    } else {
        let ckpt = Checkpoint::open(files)?;
        let local = LocalExperts::load(&ckpt, &config, &ExpertSelection::Only(held.to_vec()), &mut report)?;
        let memory = MemoryUse {
            weights: local.weight_bytes() as u64,
            ..MemoryUse::default()
        };
        (Arc::new(local), None, "cpu".into(), memory)
    };
    eprintln!("{}", memory_line("experts", &name, memory));
    Ok(LoadedShard {
        experts,
        pairs,
        device: name,
        memory,
    })
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
