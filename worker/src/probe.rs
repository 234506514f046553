//! `dsv3-worker probe`: the standard gRPC health check of an attention rank or expert shard, for
//! Kubernetes exec probes where the fleet speaks mutual TLS (the kubelet's own gRPC probe has no
//! TLS). Exits 0 when the rank reports SERVING, 1 with the reason otherwise.

use crate::roles::TlsArgs;
use anyhow::{Context, Result};
use clap::Args;
use dsv3_fleet::Transport;
use std::time::Duration;

#[derive(Args)]
pub struct ProbeArgs {
    /// The rank's gRPC address, host:port.
    #[arg(long)]
    address: String,
    /// The name the rank's certificate must carry (default: the host of --address), e.g. the
    /// pod's DNS name when --address is 127.0.0.1.
    #[arg(long)]
    tls_server_name: Option<String>,
    /// Seconds to wait for the answer.
    #[arg(long, default_value_t = 5)]
    timeout: u64,
    #[command(flatten)]
    tls: TlsArgs,
}

pub fn run(args: ProbeArgs) -> Result<()> {
    let transport = args.tls.transport()?;
    if args.tls_server_name.is_some() && matches!(transport, Transport::Plain) {
        anyhow::bail!("--tls-server-name is for mutual TLS: give --tls-cert, --tls-key and --tls-ca too");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(dsv3_fleet::grpc::check_health(
        &args.address,
        &transport,
        args.tls_server_name.as_deref(),
        Duration::from_secs(args.timeout),
    ))?;
    println!("{}: serving", args.address);
    Ok(())
}
