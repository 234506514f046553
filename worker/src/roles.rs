//! The fleet roles: `serve` (all in one process), `router`, `attention`, `expert`, and `fleet`
//! (a local multi-process fleet on loopback).

use crate::device::{load_backend, load_cuda, load_shard, DeviceArg, Fp8ActivationsArg};
use crate::model_source;
use crate::nccl_plane::NcclShards;
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use dsv3_engine::{ExpertSelection, ModelConfig, ModelFiles, StepBackend};
use dsv3_fleet::grpc::{self, Dtype, RemoteAttention, RemoteExperts};
use dsv3_fleet::{
    AttentionRank, ExpertBackend, Fleet, LocalAttention, MutualTls, PlacementPlan, SchedulerConfig, Transport,
    UnavailableExperts,
};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Args, Clone)]
pub struct ModelArgs {
    /// Model directory (config.json, safetensors, tokenizer). Default: the embedded tiny model.
    #[arg(long)]
    pub model: Option<PathBuf>,
}

#[derive(Args, Clone)]
pub struct ListenArgs {
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long)]
    pub port: u16,
}

#[derive(Args, Clone)]
pub struct HttpArgs {
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// The model name clients send; default: the model directory's name.
    #[arg(long, env = "DSV3_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// Requests that may queue before new ones get 429.
    #[arg(long, default_value_t = 256)]
    pub max_waiting: usize,
    /// Require `Authorization: Bearer <key>` on the OpenAI routes.
    #[arg(long, env = "DSV3_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Tokens per attention rank per step (prefill is chunked to fit).
    #[arg(long, default_value_t = 512, env = "DSV3_MAX_BATCH_TOKENS")]
    pub max_step_tokens: usize,
    /// Sequences an attention rank runs at once; more requests wait (and queue up to
    /// --max-waiting).
    #[arg(long, default_value_t = 256, env = "DSV3_MAX_NUM_SEQS", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_num_seqs: u64,
    /// Longest prompt plus completion served (a longer request is a 400); default and upper
    /// bound: the model's context (a larger value is lowered to it, with a log line).
    #[arg(long, env = "DSV3_MAX_MODEL_LEN", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_model_len: Option<u64>,
    /// No JSON access-log line per request on stderr.
    #[arg(long)]
    pub disable_access_log: bool,
    /// Origins browsers may call the API from (CORS), comma-separated, `*` for any. Default: none.
    #[arg(long, value_delimiter = ',', env = "DSV3_ALLOWED_ORIGINS")]
    pub allowed_origins: Vec<String>,
    /// Chat answers' thinking (up to `</think>`, where the chat template or the answer opens a
    /// think block: R1, V3.1 with `thinking`) in `reasoning_content` (auto), or left in `content`.
    #[arg(long, value_enum, default_value_t = ReasoningContent::Auto)]
    pub reasoning_content: ReasoningContent,
    /// A Jinja chat template that replaces the model's (e.g. `templates/deepseek-v3-tools.jinja`:
    /// the official V3 template ignores `tools`).
    #[arg(long, env = "DSV3_CHAT_TEMPLATE")]
    pub chat_template: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ReasoningContent {
    Auto,
    Off,
}

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    http: HttpArgs,
    /// KV cache positions.
    #[arg(long, default_value_t = 16384)]
    cache_tokens: usize,
    /// Where the model runs: CUDA when a GPU is present (auto), or as named.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
    /// What the FP8 products do with their activations: quantised per token per 128 channels
    /// (auto on a GPU, as DeepSeek's FP8 inference) or unquantised (auto on the CPU).
    #[arg(long, value_enum, default_value_t = Fp8ActivationsArg::Auto, env = "DSV3_FP8_ACTIVATIONS")]
    fp8_activations: Fp8ActivationsArg,
    /// Compute every prompt in full: no reuse of cached prefix blocks (for comparison and
    /// debugging; on by default, as in vLLM).
    #[arg(long)]
    no_prefix_caching: bool,
    /// Draft tokens the checkpoint's MTP module proposes per decode step, all verified in one
    /// step (speculative decoding: the output is unchanged, decoding faster when drafts are
    /// accepted). 0 = off. An error when the checkpoint has no MTP module.
    #[arg(long, default_value_t = 0, env = "DSV3_SPECULATIVE_TOKENS")]
    speculative_tokens: usize,
}

#[derive(Args)]
pub struct RouterArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    http: HttpArgs,
    /// Attention ranks, host:port, comma-separated, in rank order.
    #[arg(long, value_delimiter = ',', required = true)]
    attention_peers: Vec<String>,
    /// Seconds a step may take before its rank counts as failed.
    #[arg(long, default_value_t = 120)]
    step_timeout: u64,
    #[command(flatten)]
    // Taken so every member can share one argument list; the router sends no activations.
    #[allow(dead_code)]
    data_plane: DataPlaneArgs,
    #[command(flatten)]
    tls: TlsArgs,
}

/// Mutual TLS on the fleet's gRPC (all three or none): PEM files as in a Kubernetes TLS Secret
/// that cert-manager writes (`tls.crt`, `tls.key`, `ca.crt`). Every rank then accepts only peers
/// whose certificate the CA signed, and checks that a peer's certificate names the host dialled.
#[derive(Args, Clone, Default)]
pub struct TlsArgs {
    /// This process's certificate (chain) for the fleet's gRPC, with --tls-key and --tls-ca.
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert.
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// The CA certificate that signs every member's certificate.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
}

impl TlsArgs {
    /// Plain gRPC without the flags, mutual TLS with all three (their files read and checked).
    pub fn transport(&self) -> Result<Transport> {
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (None, None, None) => Ok(Transport::Plain),
            (Some(cert), Some(key), Some(ca)) => Ok(Transport::MutualTls(Arc::new(MutualTls::load(cert, key, ca)?))),
            (cert, key, ca) => {
                let missing: Vec<&str> = [("--tls-cert", cert), ("--tls-key", key), ("--tls-ca", ca)]
                    .iter()
                    .filter(|(_, v)| v.is_none())
                    .map(|(flag, _)| *flag)
                    .collect();
                anyhow::bail!(
                    "mutual TLS needs --tls-cert, --tls-key and --tls-ca together; {} missing",
                    missing.join(" and ")
                )
            }
        }
    }

    /// The flags again, for a process started with the same settings.
    pub fn to_args(&self) -> Vec<String> {
        [
            ("--tls-cert", &self.tls_cert),
            ("--tls-key", &self.tls_key),
            ("--tls-ca", &self.tls_ca),
        ]
        .iter()
        .filter_map(|(flag, path)| path.as_ref().map(|p| [flag.to_string(), p.display().to_string()]))
        .flatten()
        .collect()
    }
}

#[derive(Args)]
pub struct DataPlaneArgs {
    /// Transport for activations between attention ranks and expert shards: gRPC (portable, on
    /// CPUs and GPUs) or NCCL (GPU ranks, one GPU each: every routed expert on the expert shards,
    /// bf16 rows over NVLink or the network). The router takes the flag so every worker can
    /// share one argument list; it sends no activations itself.
    #[arg(long, default_value = "grpc", value_parser = ["grpc", "nccl"], env = "DSV3_DATA_PLANE")]
    data_plane: String,
}

impl DataPlaneArgs {
    pub fn nccl(&self) -> bool {
        self.data_plane == "nccl"
    }

    /// The flag again, for a process started with the same setting.
    pub fn to_args(&self) -> Vec<String> {
        vec!["--data-plane".into(), self.data_plane.clone()]
    }

    /// Over NCCL, libnccl must load here: its absence is named before anything loads.
    fn ensure_loadable(&self) -> Result<()> {
        if self.nccl() && !dsv3_cuda::nccl::available() {
            anyhow::bail!(
                "--data-plane nccl: NCCL (libnccl.so.2) was not found; install it or put its directory on LD_LIBRARY_PATH, or use --data-plane grpc"
            );
        }
        Ok(())
    }
}

#[derive(Args)]
pub struct AttentionArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    listen: ListenArgs,
    #[arg(long, default_value_t = 0)]
    rank: u32,
    /// Expert shards, host:port, comma-separated, in shard order.
    #[arg(long, value_delimiter = ',', required = true)]
    expert_peers: Vec<String>,
    /// Placement plan (JSON); default: experts round-robin over the expert peers.
    #[arg(long)]
    placement: Option<PathBuf>,
    #[command(flatten)]
    data_plane: DataPlaneArgs,
    #[command(flatten)]
    tls: TlsArgs,
    #[arg(long, default_value_t = 16384)]
    cache_tokens: usize,
    /// Seconds an expert shard may take for one layer (over NCCL: for one step's layers).
    #[arg(long, default_value_t = 60)]
    expert_timeout: u64,
    /// What tokens routed to an expert with no live copy (every shard holding it down) get.
    #[arg(long, value_enum, default_value_t = UnavailableExpertsArg::End, env = "DSV3_UNAVAILABLE_EXPERTS")]
    unavailable_experts: UnavailableExpertsArg,
    /// Where the model runs (the GPU is the first one the process sees: CUDA_VISIBLE_DEVICES).
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
    /// What activations travel to the expert shards as: bf16 on a GPU, f32 on the CPU (auto).
    #[arg(long, value_enum, default_value_t = ActivationDtype::Auto)]
    activation_dtype: ActivationDtype,
    /// What the FP8 products do with their activations: quantised per token per 128 channels
    /// (auto on a GPU, as DeepSeek's FP8 inference) or unquantised (auto on the CPU).
    #[arg(long, value_enum, default_value_t = Fp8ActivationsArg::Auto, env = "DSV3_FP8_ACTIVATIONS")]
    fp8_activations: Fp8ActivationsArg,
    /// Compute every prompt in full: no reuse of cached prefix blocks (for comparison and
    /// debugging; on by default, as in vLLM).
    #[arg(long)]
    no_prefix_caching: bool,
    /// Draft tokens the checkpoint's MTP module proposes per decode step, all verified in one
    /// step (speculative decoding: the output is unchanged, decoding faster when drafts are
    /// accepted). 0 = off. An error when the checkpoint has no MTP module.
    #[arg(long, default_value_t = 0, env = "DSV3_SPECULATIVE_TOKENS")]
    speculative_tokens: usize,
    /// On SIGTERM or ctrl-c: seconds to keep serving the sequences the rank holds (the router
    /// sends it no new ones meanwhile) before it stops.
    #[arg(long, default_value_t = 60)]
    drain_seconds: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum UnavailableExpertsArg {
    /// The sequences routed to it end with an error naming it; the others go on untouched.
    End,
    /// It is left out of those tokens' routes, their other experts' weights scaled to the same
    /// total: no request fails, the output departs from the full model's, and each response
    /// reports `usage.masked_expert_routes` (`/ready` stays 200, degraded).
    Mask,
}

impl From<UnavailableExpertsArg> for UnavailableExperts {
    fn from(arg: UnavailableExpertsArg) -> Self {
        match arg {
            UnavailableExpertsArg::End => UnavailableExperts::EndSequences,
            UnavailableExpertsArg::Mask => UnavailableExperts::Mask,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ActivationDtype {
    /// bf16 when the rank runs on a GPU (its kernels read bf16), f32 on the CPU.
    Auto,
    F32,
    Bf16,
}

impl ActivationDtype {
    fn resolve(self, on_gpu: bool) -> Dtype {
        match self {
            ActivationDtype::F32 => Dtype::F32,
            ActivationDtype::Bf16 => Dtype::Bf16,
            ActivationDtype::Auto if on_gpu => Dtype::Bf16,
            ActivationDtype::Auto => Dtype::F32,
        }
    }
}

#[derive(Args)]
pub struct ExpertArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    listen: ListenArgs,
    #[arg(long, default_value_t = 0)]
    rank: u32,
    /// Placement plan (JSON); default: round-robin over --expert-shards shards.
    #[arg(long)]
    placement: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    expert_shards: usize,
    /// The fleet's expert shards (accepted so every worker can share one argument list; without
    /// --placement their count is the number of shards).
    #[arg(long, value_delimiter = ',')]
    expert_peers: Vec<String>,
    #[command(flatten)]
    data_plane: DataPlaneArgs,
    #[command(flatten)]
    tls: TlsArgs,
    /// Where the experts run (the GPU is the first one the process sees: CUDA_VISIBLE_DEVICES).
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
    /// What the FP8 products do with their activations: quantised per token per 128 channels
    /// (auto on a GPU, as DeepSeek's FP8 inference) or unquantised (auto on the CPU).
    #[arg(long, value_enum, default_value_t = Fp8ActivationsArg::Auto, env = "DSV3_FP8_ACTIVATIONS")]
    fp8_activations: Fp8ActivationsArg,
}

impl RouterArgs {
    /// The options checked before anything loads (none yet: the router sends no activations, so
    /// either data plane is accepted).
    pub fn check(&self) -> Result<()> {
        Ok(())
    }
}

impl AttentionArgs {
    /// The options checked before anything loads.
    pub fn check(&self) -> Result<()> {
        if self.data_plane.nccl() {
            if self.device == DeviceArg::Cpu {
                bail!("--data-plane nccl needs the attention rank on a GPU; --device cpu was given (use --data-plane grpc)");
            }
            if self.activation_dtype == ActivationDtype::F32 {
                bail!("--activation-dtype f32: the NCCL data plane carries bf16 rows (use auto or bf16, or --data-plane grpc)");
            }
            if self.unavailable_experts == UnavailableExpertsArg::Mask {
                bail!(
                    "--unavailable-experts mask is not available over --data-plane nccl: a shard that leaves ends its \
                     sequences (use --unavailable-experts end, or --data-plane grpc)"
                );
            }
        }
        Ok(())
    }
}

impl ExpertArgs {
    /// The options checked before anything loads.
    pub fn check(&self) -> Result<()> {
        if self.data_plane.nccl() && self.device == DeviceArg::Cpu {
            bail!("--data-plane nccl needs the experts on a GPU; --device cpu was given (use --data-plane grpc)");
        }
        Ok(())
    }
}

fn served_name(model: &ModelArgs, http: &HttpArgs) -> String {
    http.served_model_name.clone().unwrap_or_else(|| match &model.model {
        Some(dir) => dir
            .canonicalize()
            .unwrap_or(dir.clone())
            .file_name()
            .map_or("model".into(), |n| n.to_string_lossy().into_owned()),
        None => "dsv3-tiny".into(),
    })
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

pub(crate) fn plan_for(placement: &Option<PathBuf>, num_experts: u32, shards: usize) -> Result<PlacementPlan> {
    match placement {
        Some(path) => Ok(PlacementPlan::load(path)?),
        None => Ok(PlacementPlan::round_robin(num_experts, shards, 0, &[])?),
    }
}

/// Runs the HTTP front end over a backend until ctrl-c / SIGTERM.
fn serve_http(
    rt: &tokio::runtime::Runtime,
    backend: Arc<Fleet>,
    files: &ModelFiles,
    name: String,
    http: &HttpArgs,
) -> Result<()> {
    let tokenizer = model_source::tokenizer(files)?;
    let tokenizer = match (&http.chat_template, tokenizer) {
        (None, tokenizer) => tokenizer,
        (Some(path), None) => anyhow::bail!(
            "--chat-template {}: the model has no tokenizer to render chats with",
            path.display()
        ),
        (Some(path), Some(tokenizer)) => {
            let source = std::fs::read_to_string(path)
                .with_context(|| format!("--chat-template: cannot read {}", path.display()))?;
            eprintln!("chat template: {}", path.display());
            Some(tokenizer.with_chat_template(&source, &path.display().to_string())?)
        }
    };
    let mut config = dsv3_api::ApiConfig::new(name.clone());
    if let Some(json) = files.read_string("generation_config.json")? {
        let (defaults, not_applied) = dsv3_api::SamplingDefaults::from_generation_config(&json)
            .map_err(|e| anyhow::anyhow!("{e} (in {})", files.describe()))?;
        eprintln!("sampling defaults from generation_config.json: {defaults:?}");
        if !not_applied.is_empty() {
            eprintln!(
                "generation_config.json also sets {}, which requests must give themselves",
                not_applied.join(", ")
            );
        }
        config.sampling_defaults = defaults;
    }
    config.api_key = http.api_key.clone().filter(|k| !k.is_empty());
    config.access_log = !http.disable_access_log;
    config.split_reasoning = http.reasoning_content == ReasoningContent::Auto;
    config.cors_origins = http
        .allowed_origins
        .iter()
        .map(|o| o.trim())
        .filter(|o| !o.is_empty())
        .map(|o| {
            o.parse()
                .with_context(|| format!("--allowed-origins: `{o}` is not a valid origin"))
        })
        .collect::<Result<_>>()?;
    let router = dsv3_api::router(backend, tokenizer, config);
    rt.block_on(async {
        let listener = dsv3_api::bind(&http.host, http.port)
            .await
            .with_context(|| format!("cannot listen on {}:{}", http.host, http.port))?;
        eprintln!("serving `{name}` on http://{}", listener.local_addr()?);
        dsv3_api::serve(listener, router).await.context("HTTP server")
    })
}

/// The rank with the grammar engine of the model's tokenizer (structured output), when the
/// model has one.
fn with_grammars(rank: LocalAttention, files: &ModelFiles) -> Result<LocalAttention> {
    let Some(tokenizer) = model_source::tokenizer(files)? else {
        return Ok(rank);
    };
    let config = rank.config();
    let Some(&eos) = config.eos_token_ids.first() else {
        return Ok(rank);
    };
    let grammars = dsv3_grammar::Grammars::new(&tokenizer, config.vocab_size, eos)
        .context("building the grammar engine for structured output")?;
    Ok(rank.with_grammars(grammars))
}

/// The model's config as the router serves it: its context cut to `--max-model-len`.
fn served_config(mut config: ModelConfig, http: &HttpArgs) -> ModelConfig {
    if let Some(len) = http.max_model_len {
        let len = len as usize;
        if len > config.max_position_embeddings {
            eprintln!(
                "--max-model-len {len} is longer than the model's context of {} tokens: serving {}",
                config.max_position_embeddings, config.max_position_embeddings
            );
        } else {
            config.max_position_embeddings = len;
        }
    }
    config
}

fn scheduler_config(http: &HttpArgs) -> SchedulerConfig {
    SchedulerConfig {
        max_waiting: http.max_waiting,
        max_step_tokens: http.max_step_tokens,
        max_running_per_rank: http.max_num_seqs as usize,
        ..SchedulerConfig::default()
    }
}

pub fn serve(args: ServeArgs) -> Result<()> {
    let files = model_source::resolve(args.model.model.clone());
    let backend = load_backend(
        &files,
        args.device,
        ExpertSelection::All,
        None,
        args.cache_tokens,
        args.fp8_activations,
    )?;
    let config = served_config(backend.config().clone(), &args.http);
    let rank = with_grammars(LocalAttention::new(0, backend, None), &files)?
        .with_prefix_caching(!args.no_prefix_caching)
        .with_speculative_tokens(args.speculative_tokens)?;
    let rank: Arc<dyn AttentionRank> = Arc::new(rank);
    let fleet = Fleet::start(config, vec![rank], scheduler_config(&args.http));
    serve_http(
        &runtime()?,
        fleet,
        &files,
        served_name(&args.model, &args.http),
        &args.http,
    )
}

pub fn router(args: RouterArgs) -> Result<()> {
    args.check()?;
    let files = model_source::resolve(args.model.model.clone());
    let config = served_config(ModelConfig::from_model_files(&files)?, &args.http);
    let transport = args.tls.transport()?;
    let rt = runtime()?;
    let ranks = args
        .attention_peers
        .iter()
        .map(|a| {
            Ok(Arc::new(RemoteAttention::new(
                a,
                &transport,
                rt.handle().clone(),
                Duration::from_secs(args.step_timeout),
            )?) as Arc<dyn AttentionRank>)
        })
        .collect::<Result<Vec<_>>>()?;
    let fleet = Fleet::start(config, ranks, scheduler_config(&args.http));
    serve_http(&rt, fleet, &files, served_name(&args.model, &args.http), &args.http)
}

pub fn attention(args: AttentionArgs) -> Result<()> {
    args.check()?;
    let transport = args.tls.transport()?;
    let files = model_source::resolve(args.model.model.clone());
    let config = ModelConfig::from_model_files(&files)?;
    let plan = plan_for(&args.placement, config.n_routed_experts as u32, args.expert_peers.len())?;
    // The experts the plan gives this rank run here, on its own tokens only.
    let own = plan.attention_experts(args.rank)?;
    // The weights of a masked route are renormalised where the shards' sums come back, which
    // the experts this rank runs itself never reach.
    if args.unavailable_experts == UnavailableExpertsArg::Mask && !own.is_empty() {
        bail!(
            "--unavailable-experts mask needs every routed expert on the expert shards; the placement gives \
             attention rank {} experts of its own",
            args.rank
        );
    }
    if !own.is_empty() {
        eprintln!(
            "attention rank {} runs {} routed experts per layer itself",
            args.rank,
            own.len()
        );
    }
    let rt = runtime()?;
    let on_gpu = args.device.use_cuda()?;
    if args.data_plane.nccl() {
        return attention_over_nccl(args, &files, plan, &own, rt, transport, on_gpu);
    }
    let experts: Arc<dyn ExpertBackend> = Arc::new(
        RemoteExperts::new(
            plan,
            args.expert_peers.clone(),
            &transport,
            rt.handle().clone(),
            Duration::from_secs(args.expert_timeout),
            args.activation_dtype.resolve(on_gpu),
        )?
        .on_unavailable_experts(args.unavailable_experts.into()),
    );
    let device = if on_gpu { DeviceArg::Cuda } else { DeviceArg::Cpu };
    let held = match own.as_slice() {
        [] => ExpertSelection::None,
        ids => ExpertSelection::Only(ids.to_vec()),
    };
    let backend = load_backend(
        &files,
        device,
        held,
        Some(experts.clone()),
        args.cache_tokens,
        args.fp8_activations,
    )
    .with_context(|| format!("loading attention rank {}", args.rank))?;
    serve_attention_rank(args, &files, backend, experts, rt, transport)
}

/// An attention rank whose routed experts all run on the expert shards, over NCCL: the model
/// loads, then pairs with the shards are joined in the background (the rank is ready once
/// every pair is).
fn attention_over_nccl(
    args: AttentionArgs,
    files: &ModelFiles,
    plan: PlacementPlan,
    own: &[u32],
    rt: tokio::runtime::Runtime,
    transport: Transport,
    on_gpu: bool,
) -> Result<()> {
    if !on_gpu {
        bail!("--data-plane nccl needs the attention rank on a GPU, and none is usable here");
    }
    args.data_plane.ensure_loadable()?;
    if !own.is_empty() {
        bail!(
            "--data-plane nccl needs every routed expert on the expert shards; the placement gives attention \
             rank {} {} experts of its own",
            args.rank,
            own.len()
        );
    }
    let activations = args.fp8_activations.resolve(true);
    let config = ModelConfig::from_model_files(files)?.with_fp8_activations(activations);
    // A step waits on the shards' MoE layers one after another: --expert-timeout is the most
    // it may wait in all before the shards count as failed.
    let shards = NcclShards::new(
        args.rank,
        plan,
        args.expert_peers.clone(),
        config.hidden_size,
        Duration::from_secs(args.expert_timeout),
    )?;
    let experts = dsv3_cuda::ModelExperts::nccl(Arc::new(shards.model_experts()?));
    let backend = load_cuda(files, &config, experts, args.cache_tokens, activations)
        .with_context(|| format!("loading attention rank {}", args.rank))?;
    shards.keep_joined(rt.handle(), transport.clone());
    serve_attention_rank(args, files, backend, shards, rt, transport)
}

/// Serves an attention rank over gRPC until SIGTERM or ctrl-c, then drains it.
fn serve_attention_rank(
    args: AttentionArgs,
    files: &ModelFiles,
    backend: Box<dyn StepBackend>,
    experts: Arc<dyn ExpertBackend>,
    rt: tokio::runtime::Runtime,
    transport: Transport,
) -> Result<()> {
    let rank = with_grammars(LocalAttention::new(args.rank, backend, Some(experts)), files)?
        .with_prefix_caching(!args.no_prefix_caching)
        .with_speculative_tokens(args.speculative_tokens)?;
    rt.block_on(async {
        let listener = dsv3_api::bind(&args.listen.host, args.listen.port)
            .await
            .with_context(|| format!("cannot listen on {}:{}", args.listen.host, args.listen.port))?;
        eprintln!("attention rank {} serving on {}", args.rank, listener.local_addr()?);
        let rank = Arc::new(rank);
        let stopping = rank.clone();
        let drain_for = std::time::Duration::from_secs(args.drain_seconds);
        let shutdown = async move {
            dsv3_api::shutdown_signal().await;
            drain(&stopping, drain_for).await;
        };
        grpc::serve_attention(listener, args.rank, rank, transport, shutdown).await
    })
}

/// Takes no new sequences and waits, up to `limit`, until the rank holds none, reporting what is
/// left every few seconds.
async fn drain(rank: &LocalAttention, limit: std::time::Duration) {
    rank.start_draining();
    let started = std::time::Instant::now();
    let mut next_report = started;
    loop {
        let held = rank.held_sequences();
        if held == 0 {
            eprintln!("drained in {:.1} s", started.elapsed().as_secs_f64());
            return;
        }
        if started.elapsed() >= limit {
            eprintln!(
                "stopping with {held} sequences still held: --drain-seconds {} passed",
                limit.as_secs()
            );
            return;
        }
        if std::time::Instant::now() >= next_report {
            eprintln!("draining: {held} sequences held, taking no new ones");
            next_report += std::time::Duration::from_secs(5);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

pub fn expert(args: ExpertArgs) -> Result<()> {
    args.check()?;
    args.data_plane.ensure_loadable()?;
    let transport = args.tls.transport()?;
    let files = model_source::resolve(args.model.model.clone());
    let config = ModelConfig::from_model_files(&files)?;
    let shards = if args.expert_peers.is_empty() {
        args.expert_shards
    } else {
        args.expert_peers.len()
    };
    let plan = plan_for(&args.placement, config.n_routed_experts as u32, shards)?;
    let held = plan
        .shards
        .get(args.rank as usize)
        .with_context(|| {
            format!(
                "--rank {} is outside the placement plan ({} shards)",
                args.rank,
                plan.shards.len()
            )
        })?
        .clone();
    let shard = load_shard(&files, args.device, &held, args.fp8_activations, args.data_plane.nccl())?;
    let server = grpc::expert_server_with(args.rank, shard.experts, shard.pairs, &plan, shard.device, shard.memory)?;
    runtime()?.block_on(async {
        let listener = dsv3_api::bind(&args.listen.host, args.listen.port)
            .await
            .with_context(|| format!("cannot listen on {}:{}", args.listen.host, args.listen.port))?;
        eprintln!(
            "expert shard {} ({} experts per layer) serving on {}",
            args.rank,
            held.len(),
            listener.local_addr()?
        );
        grpc::serve_expert(listener, server, transport, dsv3_api::shutdown_signal()).await
    })
}
