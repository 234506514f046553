//! `dsv3-worker bench-data-plane`: one MoE layer's dispatch and combine at DeepSeek-V3's width,
//! per decode batch, over the NCCL data plane between two GPUs (GPU 0 the attention rank, GPU 1
//! the shard) next to the same layer over the gRPC data plane on loopback (bf16 both ways, one
//! shard answering at once) and next to the link's rated rate. Only the transfers are timed: the
//! shard computes nothing.

use crate::bench_projection::{transfer, HIDDEN, TOP_K};
use anyhow::{bail, Context, Result};
use clap::Args;
use dsv3_cuda::data_plane::{ExchangeBytes, LayerExchange};
use dsv3_cuda::gpu::{DeviceBuf, Gpu};
use dsv3_cuda::nccl::{self, RankComm};
use std::time::Duration;

#[derive(Args)]
pub struct BenchDataPlaneArgs {
    /// Token rows per MoE layer (a decode batch).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32,64,128,256")]
    batches: Vec<usize>,
    /// Exchanges timed per batch (after as many to warm up).
    #[arg(long, default_value_t = 50)]
    reps: usize,
    /// The link's rated rate each way, GB/s, for the table (NVLink 4 on an H200: 450).
    #[arg(long, default_value_t = 450.0)]
    rated_gbps: f64,
    /// Also write the table (markdown) here.
    #[arg(long)]
    output: Option<std::path::PathBuf>,
}

/// A layer's four transfers' buffers (rows, ids, weights, sums), zeroed.
fn buffers(gpu: &Gpu, b: ExchangeBytes) -> Result<[DeviceBuf; 4]> {
    let make = |bytes: usize| -> Result<DeviceBuf> {
        let buf = gpu.alloc(bytes)?;
        gpu.zero(buf.addr, bytes)?;
        Ok(buf)
    };
    Ok([make(b.rows)?, make(b.ids)?, make(b.weights)?, make(b.sums)?])
}

/// Seconds of one exchange per batch, timed on the attention side by GPU events.
fn nccl_times(batches: &[usize], reps: usize) -> Result<Vec<f64>> {
    let id = nccl::unique_id()?;
    let schedule: Vec<LayerExchange> = batches
        .iter()
        .map(|&rows| LayerExchange {
            layer: 3,
            rows,
            k: TOP_K,
        })
        .collect();
    let shard_schedule = schedule.clone();
    // The shard: receives rows, routes and weights, sends sums back, as often as the attention side.
    let shard = std::thread::spawn(move || -> Result<()> {
        let gpu = Gpu::open(1)?;
        let comm = RankComm::join(&gpu, &id, 1, 2, Duration::from_secs(60))?;
        for e in &shard_schedule {
            let b = e.bytes(HIDDEN);
            let [rows, ids, weights, sums] = buffers(&gpu, b)?;
            for _ in 0..2 * reps {
                comm.exchange(
                    &gpu,
                    &[],
                    &[
                        (0, rows.addr, b.rows),
                        (0, ids.addr, b.ids),
                        (0, weights.addr, b.weights),
                    ],
                )?;
                comm.exchange(&gpu, &[(0, sums.addr, b.sums)], &[])?;
            }
            gpu.sync()?;
        }
        Ok(())
    });
    let gpu = Gpu::open(0)?;
    let comm = RankComm::join(&gpu, &id, 0, 2, Duration::from_secs(60))?;
    let mut times = Vec::new();
    for e in &schedule {
        let b = e.bytes(HIDDEN);
        let [rows, ids, weights, sums] = buffers(&gpu, b)?;
        let layer = || {
            comm.exchange(
                &gpu,
                &[
                    (1, rows.addr, b.rows),
                    (1, ids.addr, b.ids),
                    (1, weights.addr, b.weights),
                ],
                &[(1, sums.addr, b.sums)],
            )
        };
        for _ in 0..reps {
            layer()?;
        }
        gpu.sync()?;
        let start = gpu.mark()?;
        for _ in 0..reps {
            layer()?;
        }
        times.push(gpu.seconds_since(&start)? / reps as f64);
    }
    shard
        .join()
        .map_err(|_| anyhow::anyhow!("the shard thread panicked"))??;
    Ok(times)
}

pub fn run(args: BenchDataPlaneArgs) -> Result<()> {
    let gpus = dsv3_cuda::device_status().map_err(anyhow::Error::msg)?;
    if gpus < 2 {
        bail!("bench-data-plane needs two GPUs; {gpus} visible");
    }
    if !nccl::available() {
        bail!("bench-data-plane needs NCCL (libnccl.so.2)");
    }
    eprintln!("NCCL between GPU 0 and GPU 1 ...");
    let over_nccl = nccl_times(&args.batches, args.reps).context("timing the NCCL data plane")?;
    let rt = tokio::runtime::Runtime::new()?;
    let mut table = String::from(
        "| batch | bytes each way | NCCL µs | NCCL GB/s each way | rated GB/s | gRPC loopback µs | NCCL faster |\n|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for (&batch, &nccl_s) in args.batches.iter().zip(&over_nccl) {
        eprintln!("gRPC on loopback, batch {batch} ...");
        let (grpc_s, _) = transfer(&rt, 1, batch, args.reps.min(20))?;
        let b = LayerExchange {
            layer: 3,
            rows: batch,
            k: TOP_K,
        }
        .bytes(HIDDEN);
        let out = b.rows + b.ids + b.weights;
        table.push_str(&format!(
            "| {batch} | {out} | {:.1} | {:.1} | {:.0} | {:.1} | {:.1}× |\n",
            nccl_s * 1e6,
            out.max(b.sums) as f64 / nccl_s / 1e9,
            args.rated_gbps,
            grpc_s * 1e6,
            grpc_s / nccl_s
        ));
    }
    println!("{table}");
    if let Some(path) = &args.output {
        std::fs::write(path, &table).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
