//! `dsv3-worker fleet`: a router, A attention ranks and E expert shards as separate processes
//! on loopback — the disaggregated fleet on one machine, for users and tests.

use crate::device::{DeviceArg, Fp8ActivationsArg};
use crate::roles::{ActivationDtype, DataPlaneArgs, ModelArgs, TlsArgs, UnavailableExpertsArg};
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use dsv3_fleet::PlacementPlan;
use std::process::{Child, Command};

#[derive(Args)]
pub struct FleetArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Attention ranks.
    #[arg(long, default_value_t = 2)]
    attention: usize,
    /// Expert shards.
    #[arg(long, default_value_t = 3)]
    experts: usize,
    /// Extra copies of experts 0.. (a stand-in for measured hot experts) on other shards.
    #[arg(long, default_value_t = 0)]
    redundant_experts: usize,
    /// The attention ranks also hold one share of the experts (as much as one expert shard),
    /// each running it itself for its own tokens; only the rest of the routes cross to the shards.
    #[arg(long)]
    attention_holds_experts: bool,
    /// Router HTTP port.
    #[arg(long, default_value_t = 8000)]
    port: u16,
    #[arg(long)]
    served_model_name: Option<String>,
    /// Where the attention ranks and expert shards run. On CUDA they are spread over the GPUs
    /// this process sees, in start order (expert shards, then attention ranks; several may share one GPU).
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
    /// What activations travel to the expert shards as (passed to the attention ranks).
    #[arg(long, value_enum, default_value_t = ActivationDtype::Auto)]
    activation_dtype: ActivationDtype,
    /// KV cache positions of each attention rank.
    #[arg(long, default_value_t = 16384)]
    cache_tokens: usize,
    /// What the FP8 products do with their activations (passed to the attention ranks and the
    /// expert shards): quantised per token per 128 channels (auto on GPUs) or unquantised (auto on
    /// the CPU).
    #[arg(long, value_enum, default_value_t = Fp8ActivationsArg::Auto, env = "DSV3_FP8_ACTIVATIONS")]
    fp8_activations: Fp8ActivationsArg,
    /// Passed to the attention ranks: compute every prompt in full.
    #[arg(long)]
    no_prefix_caching: bool,
    /// Passed to the attention ranks: draft tokens the MTP module proposes per decode step.
    #[arg(long, default_value_t = 0)]
    speculative_tokens: usize,
    /// Passed to the attention ranks: what tokens routed to an expert with no live copy get.
    #[arg(long, value_enum, default_value_t = UnavailableExpertsArg::End)]
    unavailable_experts: UnavailableExpertsArg,
    /// Passed to the ranks: how activations travel between them. Over NCCL each rank gets a GPU
    /// of its own, so the GPUs seen must number at least the ranks.
    #[command(flatten)]
    data_plane: DataPlaneArgs,
    /// Passed to every member: mutual TLS between them (the certificate must name 127.0.0.1,
    /// the address members dial each other at).
    #[command(flatten)]
    tls: TlsArgs,
}

/// The GPUs the members are placed on, as `CUDA_VISIBLE_DEVICES` entries; empty on the CPU.
fn visible_gpus(device: DeviceArg) -> Result<Vec<String>> {
    if !device.use_cuda()? {
        return Ok(vec![]);
    }
    let count = dsv3_cuda::device_status().map_err(anyhow::Error::msg)?;
    Ok(match std::env::var("CUDA_VISIBLE_DEVICES") {
        Ok(list) if !list.trim().is_empty() => list.split(',').map(|s| s.trim().to_string()).collect(),
        _ => (0..count).map(|i| i.to_string()).collect(),
    })
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

struct Member {
    role: &'static str,
    rank: usize,
    address: String,
    args: Vec<String>,
    child: Child,
}

pub fn run(args: FleetArgs) -> Result<()> {
    args.tls.transport()?; // a bad certificate named here, not by every member
    let exe = std::env::current_exe().context("locating dsv3-worker")?;
    let model_flag: Vec<String> = match &args.model.model {
        Some(dir) => vec!["--model".into(), dir.display().to_string()],
        None => vec![],
    };
    let config = {
        let files = crate::model_source::resolve(args.model.model.clone());
        let text = files
            .read_string("config.json")?
            .context("the model has no config.json")?;
        dsv3_engine::ModelConfig::from_json_str(&text)?
    };
    let hot: Vec<u32> = (0..config.n_routed_experts as u32).collect();
    let plan = if args.attention_holds_experts {
        PlacementPlan::round_robin_with_attention(
            config.n_routed_experts as u32,
            args.experts,
            args.attention,
            args.redundant_experts,
            &hot,
        )?
    } else {
        PlacementPlan::round_robin(
            config.n_routed_experts as u32,
            args.experts,
            args.redundant_experts,
            &hot,
        )?
    };
    let dir = tempfile::tempdir().context("temporary directory for the placement plan")?;
    let placement = dir.path().join("placement.json");
    plan.save(&placement)?;
    let placement = placement.display().to_string();

    let gpus = visible_gpus(args.device)?;
    let device = if gpus.is_empty() { "cpu" } else { "cuda" };
    if args.data_plane.nccl() && gpus.len() < args.attention + args.experts {
        bail!(
            "--data-plane nccl runs each of the {} ranks on a GPU of its own; {} GPU(s) are visible",
            args.attention + args.experts,
            gpus.len()
        );
    }
    let mut placed = 0;
    let mut members: Vec<Member> = Vec::new();
    let mut spawn = |role: &'static str, rank: usize, port: u16, extra: Vec<String>| -> Result<()> {
        let mut a = vec![role.to_string()];
        a.extend(model_flag.iter().cloned());
        a.extend(["--port".into(), port.to_string()]);
        a.extend(extra);
        a.extend(args.tls.to_args());
        let mut command = Command::new(&exe);
        // The router holds no model; the ranks go round the GPUs.
        let gpu = (role != "router" && !gpus.is_empty()).then(|| {
            placed += 1;
            gpus[(placed - 1) % gpus.len()].clone()
        });
        if role != "router" {
            a.extend(["--device".into(), device.into()]);
            a.extend(["--fp8-activations".into(), args.fp8_activations.name().into()]);
            a.extend(args.data_plane.to_args());
        }
        if let Some(gpu) = &gpu {
            command.env("CUDA_VISIBLE_DEVICES", gpu);
        }
        let child = command
            .args(&a)
            .spawn()
            .with_context(|| format!("starting {role} {rank}"))?;
        let address = format!("127.0.0.1:{port}");
        // One machine-readable line per member: tests kill and restart members by these.
        println!(
            "{}",
            serde_json::json!({"role": role, "rank": rank, "pid": child.id(), "address": address, "args": a, "gpu": gpu})
        );
        members.push(Member {
            role,
            rank,
            address,
            args: a,
            child,
        });
        Ok(())
    };
    let mut expert_peers = Vec::new();
    for r in 0..args.experts {
        let port = free_port()?;
        expert_peers.push(format!("127.0.0.1:{port}"));
        spawn(
            "expert",
            r,
            port,
            vec!["--rank".into(), r.to_string(), "--placement".into(), placement.clone()],
        )?;
    }
    let mut attention_peers = Vec::new();
    for r in 0..args.attention {
        let port = free_port()?;
        attention_peers.push(format!("127.0.0.1:{port}"));
        spawn(
            "attention",
            r,
            port,
            vec![
                "--rank".into(),
                r.to_string(),
                "--placement".into(),
                placement.clone(),
                "--expert-peers".into(),
                expert_peers.join(","),
                "--activation-dtype".into(),
                args.activation_dtype
                    .to_possible_value()
                    .map_or("auto".into(), |v| v.get_name().to_string()),
                "--cache-tokens".into(),
                args.cache_tokens.to_string(),
                "--speculative-tokens".into(),
                args.speculative_tokens.to_string(),
                "--unavailable-experts".into(),
                args.unavailable_experts
                    .to_possible_value()
                    .map_or("end".into(), |v| v.get_name().to_string()),
            ]
            .into_iter()
            .chain(args.no_prefix_caching.then(|| "--no-prefix-caching".to_string()))
            .collect(),
        )?;
    }
    let mut router_args = vec!["--attention-peers".into(), attention_peers.join(",")];
    if let Some(name) = &args.served_model_name {
        router_args.extend(["--served-model-name".into(), name.clone()]);
    }
    spawn("router", 0, args.port, router_args)?;
    eprintln!(
        "fleet: router http://127.0.0.1:{} · {} attention ranks · {} expert shards (placement {})",
        args.port, args.attention, args.experts, plan.version
    );
    supervise(members)
}

/// Waits until ctrl-c / SIGTERM, reporting members that exit; then stops them all.
fn supervise(mut members: Vec<Member>) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
        let shutdown = dsv3_api::shutdown_signal();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tick.tick() => {
                    for m in &mut members {
                        if let Ok(Some(status)) = m.child.try_wait() {
                            eprintln!("fleet: {} {} at {} exited ({status}); restart it with: dsv3-worker {}", m.role, m.rank, m.address, m.args.join(" "));
                            // Keep reporting once only: replace with a finished dummy.
                            m.role = "exited";
                        }
                    }
                    members.retain(|m| m.role != "exited");
                }
            }
        }
    });
    for m in &mut members {
        let _ = m.child.kill();
        let _ = m.child.wait();
    }
    Ok(())
}
