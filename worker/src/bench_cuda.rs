//! `dsv3-worker bench-cuda`: full-width GPU benchmarks (random FP8 weights), one table.

use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct BenchCudaArgs {
    /// Decode batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64,256")]
    batches: Vec<usize>,
    /// Cached tokens per sequence for the decode steps.
    #[arg(long, default_value_t = 4096)]
    context: usize,
    /// Prompt tokens for the MoE-layer prefill (0 = skip).
    #[arg(long, default_value_t = 4096)]
    prefill: usize,
    /// Timed repetitions (the median is reported) after two warm-up runs.
    #[arg(long, default_value_t = 10)]
    reps: usize,
    /// FP8 matrix peak of the card in TFLOP/s, for the compute floor.
    #[arg(long, default_value_t = 1420.0)]
    fp8_tflops: f64,
    /// Which benchmarks: moe_layer, slice5, mla (the MLA decode kernel alone), mla_prefill (the
    /// prefill attention alone, over --prefill tokens), dense (each dense FP8 product alone, beside
    /// cuBLASLt), speculative (the verify and draft steps of speculative decoding against a plain
    /// decode step).
    #[arg(long, value_delimiter = ',', default_value = "moe_layer,slice5")]
    configs: Vec<String>,
    /// transformers results (worker/bench/hf_gpu_peer.py --out) to set beside ours.
    #[arg(long)]
    peer: Option<PathBuf>,
    /// Also write the rows as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// What the FP8 products do with their activations (auto: quantised, as a GPU serves).
    #[arg(long, value_enum, default_value_t = crate::device::Fp8ActivationsArg::Auto)]
    fp8_activations: crate::device::Fp8ActivationsArg,
}

pub fn run(args: BenchCudaArgs) -> Result<()> {
    if let Err(why) = dsv3_cuda::device_status() {
        bail!("bench-cuda needs a GPU: {why}");
    }
    dsv3_cuda::bench::run(&dsv3_cuda::bench::BenchOptions {
        batches: args.batches,
        context: args.context,
        prefill: args.prefill,
        reps: args.reps.max(1),
        fp8_tflops: args.fp8_tflops,
        peer: args.peer,
        out: args.out,
        configs: args.configs,
        fp8_activations: args.fp8_activations.resolve(true),
    })
}
