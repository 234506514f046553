//! `dsv3-worker bench-fleet`: the same load against `serve` (one process) and `fleet` (router,
//! attention ranks and expert shards as processes on loopback; then again with the attention
//! ranks holding one share of the experts): tokens/s, per-step latency, activation bytes per MoE
//! layer per step, and how step time splits into compute and transport.

use crate::server_process::ServerProcess;
use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct BenchFleetArgs {
    /// Concurrent clients.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Requests per client.
    #[arg(long, default_value_t = 2)]
    requests: usize,
    #[arg(long, default_value_t = 32)]
    prompt_len: usize,
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    #[arg(long, default_value_t = 2)]
    attention: usize,
    #[arg(long, default_value_t = 3)]
    experts: usize,
    /// Also write the table (markdown) to this file.
    #[arg(long)]
    output: Option<std::path::PathBuf>,
    #[command(flatten)]
    model: crate::roles::ModelArgs,
    /// Where `serve` and the fleet's ranks run.
    #[arg(long, value_enum, default_value_t = crate::device::DeviceArg::Cpu)]
    device: crate::device::DeviceArg,
}

struct Running {
    server: ServerProcess,
    attention: Vec<String>,
}

/// What runs the load: `serve`, or the fleet with or without experts on its attention ranks.
#[derive(Clone, Copy, PartialEq)]
enum Setup {
    Serve,
    Fleet { attention_holds_experts: bool },
}

fn start(setup: Setup, args: &BenchFleetArgs) -> Result<Running> {
    let mode = match setup {
        Setup::Serve => "serve",
        Setup::Fleet { .. } => "fleet",
    };
    let device = if args.device.use_cuda()? { "cuda" } else { "cpu" };
    let mut server = ServerProcess::start(mode, |cmd| {
        cmd.args(["--device", device])
            .stderr(Stdio::null())
            .stdout(Stdio::piped());
        if let Some(dir) = &args.model.model {
            cmd.arg("--model").arg(dir);
        }
        if mode == "fleet" {
            cmd.args([
                "--attention",
                &args.attention.to_string(),
                "--experts",
                &args.experts.to_string(),
            ]);
        }
        if setup
            == (Setup::Fleet {
                attention_holds_experts: true,
            })
        {
            cmd.arg("--attention-holds-experts");
        }
    })?;
    let mut attention = Vec::new();
    if mode == "fleet" {
        let stdout = server.child.stdout.take().context("fleet stdout")?;
        for line in BufReader::new(stdout).lines().take(args.attention + args.experts + 1) {
            let v: Value = serde_json::from_str(&line?)?;
            if v["role"] == "attention" {
                attention.push(v["address"].as_str().unwrap_or_default().to_string());
            }
        }
    }
    server.wait_ready(Duration::from_secs(120))?;
    Ok(Running { server, attention })
}

/// One completion; a refused one is an error carrying the server's message.
fn complete(base: &str, body: Value) -> Result<Value> {
    match ureq::post(&format!("{base}/v1/completions")).send_json(body) {
        Ok(r) => Ok(r.into_json()?),
        Err(ureq::Error::Status(code, r)) => {
            bail!("{base}: status {code}: {}", r.into_string().unwrap_or_default())
        }
        Err(e) => Err(e.into()),
    }
}

/// A metric's value from the server's `/metrics` (0 when absent).
pub(crate) fn metric_sum(base: &str, name: &str) -> Result<f64> {
    let text = ureq::get(&format!("{base}/metrics")).call()?.into_string()?;
    Ok(sample(&text, name).unwrap_or(0.0))
}

/// The value of the first sample of series `name` (whatever its labels) in a Prometheus text.
pub(crate) fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?;
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            return None;
        }
        rest.rsplit(' ').next()?.parse().ok()
    })
}

struct Row {
    mode: String,
    tokens_per_s: f64,
    step_ms: f64,
    /// Per MoE layer exchange (dispatch and combine over every shard a layer needs): activation
    /// bytes both ways and wall milliseconds.
    per_layer: Option<(f64, f64)>,
    transport_share: Option<f64>,
}

fn run_load(setup: Setup, args: &BenchFleetArgs) -> Result<Row> {
    let running = start(setup, args)?;
    let body = |i: usize| {
        let prompt: Vec<u32> = (0..args.prompt_len as u32)
            .map(|t| (t * 37 + i as u32 * 11) % 980 + 2)
            .collect();
        json!({"prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": true})
    };
    complete(&running.server.base, body(0))?; // warm-up
    let (itl_sum0, itl_n0) = (
        metric_sum(&running.server.base, "dsv3_inter_token_latency_seconds_sum")?,
        metric_sum(&running.server.base, "dsv3_inter_token_latency_seconds_count")?,
    );
    let infos_before = attention_infos(&running.attention)?;
    let started = Instant::now();
    let generated: usize = std::thread::scope(|s| {
        let handles: Vec<_> = (0..args.clients)
            .map(|c| {
                let base = running.server.base.clone();
                let body = &body;
                s.spawn(move || -> Result<usize> {
                    let mut n = 0;
                    for r in 0..args.requests {
                        let v = complete(&base, body(c * 100 + r + 1))?;
                        n += v["usage"]["completion_tokens"].as_u64().unwrap_or(0) as usize;
                    }
                    Ok(n)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow::anyhow!("client panicked"))?)
            .sum::<Result<usize>>()
    })?;
    let wall = started.elapsed().as_secs_f64();
    let itl_sum = metric_sum(&running.server.base, "dsv3_inter_token_latency_seconds_sum")? - itl_sum0;
    let itl_n = metric_sum(&running.server.base, "dsv3_inter_token_latency_seconds_count")? - itl_n0;
    let infos_after = attention_infos(&running.attention)?;
    let (mut bytes, mut layers, mut step_s, mut expert_s) = (0u64, 0u64, 0f64, 0f64);
    for (a, b) in infos_after.iter().zip(&infos_before) {
        bytes += (a.expert_bytes_sent + a.expert_bytes_received) - (b.expert_bytes_sent + b.expert_bytes_received);
        layers += a.expert_layers - b.expert_layers;
        step_s += a.step_seconds - b.step_seconds;
        expert_s += a.expert_seconds - b.expert_seconds;
    }
    let remote = !running.attention.is_empty() && layers > 0;
    Ok(Row {
        mode: match setup {
            Setup::Serve => "serve".into(),
            Setup::Fleet {
                attention_holds_experts: false,
            } => format!("fleet ({} attention, {} expert shards)", args.attention, args.experts),
            Setup::Fleet {
                attention_holds_experts: true,
            } => format!(
                "fleet ({} attention holding 1/{} of the experts{}, {} expert shards)",
                args.attention,
                args.experts + 1,
                if args.attention > 1 { " each" } else { "" },
                args.experts
            ),
        },
        tokens_per_s: generated as f64 / wall,
        step_ms: if itl_n > 0.0 { itl_sum / itl_n * 1e3 } else { 0.0 },
        per_layer: remote.then(|| (bytes as f64 / layers as f64, expert_s / layers as f64 * 1e3)),
        transport_share: remote.then(|| expert_s / step_s),
    })
}

fn attention_infos(addresses: &[String]) -> Result<Vec<dsv3_proto::AttentionInfo>> {
    if addresses.is_empty() {
        return Ok(Vec::new());
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let mut out = Vec::new();
        for a in addresses {
            let mut client = dsv3_proto::attention_client::AttentionClient::connect(format!("http://{a}")).await?;
            out.push(client.info(dsv3_proto::InfoRequest {}).await?.into_inner());
        }
        Ok(out)
    })
}

pub fn run(args: BenchFleetArgs) -> Result<()> {
    let files = crate::model_source::resolve(args.model.model.clone());
    let rows = [
        Setup::Serve,
        Setup::Fleet {
            attention_holds_experts: false,
        },
        Setup::Fleet {
            attention_holds_experts: true,
        },
    ]
    .into_iter()
    .map(|setup| run_load(setup, &args))
    .collect::<Result<Vec<_>>>()?;
    let mut table = format!(
        "{} on {}, {} concurrent clients × {} requests, prompt {} tokens, {} generated tokens each (greedy); \
         transport over gRPC on loopback.\n\n\
         | mode | generated tok/s | mean step (inter-token) ms | activation bytes per MoE layer exchange | ms per MoE layer exchange | step time waiting on expert shards |\n\
         |---|---:|---:|---:|---:|---:|\n",
        files.describe(),
        if args.device.use_cuda()? { "the GPU" } else { "the CPU" },
        args.clients,
        args.requests,
        args.prompt_len,
        args.max_tokens
    );
    for r in &rows {
        let (bytes, ms) = match r.per_layer {
            Some((b, ms)) => (format!("{:.1} KB", b / 1e3), format!("{ms:.3}")),
            None => ("0 (in process)".into(), "–".into()),
        };
        table += &format!(
            "| {} | {:.1} | {:.2} | {bytes} | {ms} | {} |\n",
            r.mode,
            r.tokens_per_s,
            r.step_ms,
            r.transport_share.map_or("–".into(), |s| format!("{:.0}%", s * 100.0)),
        );
    }
    println!("{table}");
    if let Some(path) = &args.output {
        std::fs::write(path, &table)?;
    }
    Ok(())
}
