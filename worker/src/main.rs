//! `dsv3-worker`: one binary for every role of a dsv3 fleet, plus `generate` and `bench`.

mod bench;
mod bench_cuda;
mod bench_data_plane;
mod bench_fleet;
mod bench_projection;
mod bench_serve;
#[cfg(test)]
mod contract_tests;
mod device;
mod download;
mod generate;
mod local_fleet;
mod model_source;
mod nccl_plane;
mod probe;
mod progress;
mod roles;
mod server_process;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "dsv3-worker", version, about = "Serve DeepSeek-V3-architecture models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one prompt through the model and print the generated tokens.
    Generate(generate::GenerateArgs),
    /// Measure prefill and decode speed on the tiny model and on synthetic configs.
    Bench(bench::BenchArgs),
    /// Full-width GPU benchmarks: one MoE layer and a 5-layer slice with random FP8 weights.
    BenchCuda(bench_cuda::BenchCudaArgs),
    /// Serving through the OpenAI API against the engine's step: TTFT, time between tokens, tok/s.
    BenchServe(bench_serve::BenchServeArgs),
    /// The same load against `serve` and a local multi-process fleet: tokens/s, step latency, transport.
    BenchFleet(bench_fleet::BenchFleetArgs),
    /// One MoE layer's dispatch and combine over NCCL between two GPUs, beside gRPC on loopback.
    BenchDataPlane(bench_data_plane::BenchDataPlaneArgs),
    /// DeepSeek-V3 decode tok/s per GPU of an attention/expert GPU fleet, projected from measured parts.
    BenchProjection(bench_projection::BenchProjectionArgs),
    /// The whole fleet in one process: OpenAI-compatible HTTP API over an in-process engine.
    Serve(roles::ServeArgs),
    /// The HTTP front end and scheduler, driving remote attention ranks.
    Router(roles::RouterArgs),
    /// An attention rank: everything but the routed experts, reached on expert shards.
    Attention(roles::AttentionArgs),
    /// An expert shard: the routed experts the placement plan gives this rank.
    Expert(roles::ExpertArgs),
    /// Fetch a checkpoint (or one role's files of it) from a Hugging Face hub repository.
    Download(download::DownloadArgs),
    /// A local multi-process fleet on loopback: router, attention ranks, expert shards.
    Fleet(local_fleet::FleetArgs),
    /// The gRPC health check of an attention rank or expert shard (an exec probe for mutual TLS).
    Probe(probe::ProbeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Bench(args) => bench::run(args),
        Command::BenchCuda(args) => bench_cuda::run(args),
        Command::BenchFleet(args) => bench_fleet::run(args),
        Command::BenchServe(args) => bench_serve::run(args),
        Command::BenchProjection(args) => bench_projection::run(args),
        Command::BenchDataPlane(args) => bench_data_plane::run(args),
        Command::Serve(args) => roles::serve(args),
        Command::Router(args) => roles::router(args),
        Command::Attention(args) => roles::attention(args),
        Command::Expert(args) => roles::expert(args),
        Command::Fleet(args) => local_fleet::run(args),
        Command::Probe(args) => probe::run(args),
        Command::Download(args) => download::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
