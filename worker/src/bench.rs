//! `dsv3-worker bench`: prefill and decode throughput on CPU, and the decode step's weight
//! traffic against this machine's measured memory bandwidth.

use crate::model_source;
use anyhow::{Context, Result};
use clap::Args;
use dsv3_engine::{Chunk, Engine, EngineOptions, ModelFiles, Outputs};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub struct BenchArgs {
    /// Model directory to measure; default: the embedded tiny model and a synthetic "small" config.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Prompt length for the prefill measurement.
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    /// Decode steps measured per batch size.
    #[arg(long, default_value_t = 16)]
    decode_steps: usize,
    /// Batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    batches: Vec<usize>,
    /// Where to write the synthetic small model (reused when it is already there); default: a
    /// temporary directory.
    #[arg(long)]
    small_dir: Option<PathBuf>,
    /// Also write the table (markdown) to this file.
    #[arg(long)]
    output: Option<PathBuf>,
}

/// The "small" synthetic configuration: hidden 1024, 8 layers, 64 experts, top-6.
fn small_config() -> serde_json::Value {
    serde_json::json!({
        "model_type": "deepseek_v3", "vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 2816,
        "moe_intermediate_size": 512, "num_hidden_layers": 8, "first_k_dense_replace": 1, "moe_layer_freq": 1,
        "num_attention_heads": 16, "q_lora_rank": 384, "kv_lora_rank": 256, "qk_nope_head_dim": 64,
        "qk_rope_head_dim": 32, "v_head_dim": 64, "n_routed_experts": 64, "n_group": 8, "topk_group": 4,
        "num_experts_per_tok": 6, "n_shared_experts": 1, "routed_scaling_factor": 2.5, "norm_topk_prob": true,
        "rope_theta": 10000.0, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "eos_token_id": 1,
        "num_nextn_predict_layers": 0,
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
    })
}

struct Row {
    model: String,
    batch: usize,
    prefill_tps: f64,
    decode_tps: f64,
    step_ms: f64,
    step_bytes: usize,
    bandwidth_fraction: f64,
}

pub fn run(args: BenchArgs) -> Result<()> {
    let threads = rayon::current_num_threads();
    eprintln!("measuring memory bandwidth ({threads} threads)...");
    let bandwidth = measure_read_bandwidth();
    eprintln!("memory read bandwidth: {:.2} GB/s", bandwidth / 1e9);
    let mut rows = Vec::new();
    let _synthetic_dir;
    let targets: Vec<(String, ModelFiles)> = match &args.model {
        Some(dir) => vec![(dir.display().to_string(), ModelFiles::Dir(dir.clone()))],
        None => {
            let path = match &args.small_dir {
                Some(path) => path.clone(),
                None => {
                    let dir = tempfile::tempdir().context("temporary directory for the synthetic model")?;
                    let path = dir.path().to_path_buf();
                    _synthetic_dir = dir;
                    path
                }
            };
            if !path.join("config.json").exists() {
                eprintln!("writing the synthetic small FP8 model to {}...", path.display());
                dsv3_engine::synthetic::write_checkpoint(&path, &small_config(), true, 4, 1)?;
            }
            let files = ModelFiles::Dir(path);
            vec![
                ("tiny (embedded, FP8)".to_string(), model_source::resolve(None)),
                ("small (synthetic, FP8)".to_string(), files),
            ]
        }
    };
    for (name, files) in targets {
        for &batch in &args.batches {
            rows.push(measure(&name, &files, batch, &args, bandwidth)?);
        }
    }
    let table = render(&rows, bandwidth, threads);
    println!("{table}");
    if let Some(path) = &args.output {
        std::fs::write(path, &table).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

fn measure(name: &str, files: &ModelFiles, batch: usize, args: &BenchArgs, bandwidth: f64) -> Result<Row> {
    // Every sequence rounds up to whole blocks of 16.
    let positions = batch * (args.prompt_len + args.decode_steps + 2).next_multiple_of(16);
    let options = EngineOptions {
        cache_tokens: positions + 64,
        max_step_tokens: usize::MAX,
        ..EngineOptions::default()
    };
    let mut engine = Engine::load(files, options, &mut |_| {})?;
    let vocab = engine.config().vocab_size as u32;
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|b| {
            (0..args.prompt_len as u32)
                .map(|i| (i * 31 + b as u32 * 977 + 3) % (vocab - 2) + 2)
                .collect()
        })
        .collect();
    let opts = engine.step_options();
    let chunks: Vec<Chunk> = prompts
        .iter()
        .enumerate()
        .map(|(b, p)| Chunk::new(b as u64, 0, p, Outputs::Last))
        .collect();
    let started = Instant::now();
    let b = &mut engine.backend;
    b.model.forward(&chunks, &mut b.cache, b.experts.as_ref(), &opts)?;
    let prefill_s = started.elapsed().as_secs_f64();
    let mut next: Vec<[u32; 1]> = (0..batch).map(|b| [(b as u32 * 13 + 7) % vocab]).collect();
    let mut step_times = Vec::with_capacity(args.decode_steps);
    for step in 0..args.decode_steps {
        let chunks: Vec<Chunk> = next
            .iter()
            .enumerate()
            .map(|(b, t)| Chunk::new(b as u64, args.prompt_len + step, t, Outputs::Last))
            .collect();
        let started = Instant::now();
        let b = &mut engine.backend;
        let (out, _) = b.model.forward(&chunks, &mut b.cache, b.experts.as_ref(), &opts)?;
        step_times.push(started.elapsed().as_secs_f64());
        for (n, o) in next.iter_mut().zip(&out) {
            n[0] = dsv3_engine::sampling::argmax(&o.logits);
        }
    }
    step_times.sort_by(f64::total_cmp);
    let step_s = step_times[step_times.len() / 2];
    // One more (untimed) step with tracing, to count the distinct experts a step reads.
    let chunks: Vec<Chunk> = next
        .iter()
        .enumerate()
        .map(|(b, t)| Chunk::new(b as u64, args.prompt_len + args.decode_steps, t, Outputs::Last))
        .collect();
    let traced = dsv3_engine::StepOptions { trace: true, ..opts };
    let b = &mut engine.backend;
    let (_, trace) = b.model.forward(&chunks, &mut b.cache, b.experts.as_ref(), &traced)?;
    let step_bytes = engine.step_weight_bytes(&trace.context("trace requested")?.routes);
    Ok(Row {
        model: name.to_string(),
        batch,
        prefill_tps: (batch * args.prompt_len) as f64 / prefill_s,
        decode_tps: batch as f64 / step_s,
        step_ms: step_s * 1e3,
        step_bytes,
        bandwidth_fraction: step_bytes as f64 / step_s / bandwidth,
    })
}

/// Multi-threaded sequential read of a buffer far larger than the caches.
fn measure_read_bandwidth() -> f64 {
    use rayon::prelude::*;
    let len = 256 << 20; // 1 GiB of f32
    let buf: Vec<f32> = (0..len).into_par_iter().map(|i| (i % 7) as f32).collect();
    let mut best = 0.0f64;
    for _ in 0..5 {
        let started = Instant::now();
        let sum: f32 = buf.par_chunks(1 << 16).map(|c| c.iter().sum::<f32>()).sum();
        let secs = started.elapsed().as_secs_f64();
        std::hint::black_box(sum);
        best = best.max((len * 4) as f64 / secs);
    }
    best
}

fn render(rows: &[Row], bandwidth: f64, threads: usize) -> String {
    let mut s = format!(
        "CPU: {threads} threads, memory read bandwidth {:.2} GB/s (measured in this run)\n\n\
         | model | batch | prefill tok/s | decode tok/s | decode step ms | weight bytes read per decode step (time at full bandwidth) | bytes/step ÷ bandwidth |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
        bandwidth / 1e9
    );
    for r in rows {
        s += &format!(
            "| {} | {} | {:.1} | {:.1} | {:.2} | {:.2} MB ({:.2} ms) | {:.0}% |\n",
            r.model,
            r.batch,
            r.prefill_tps,
            r.decode_tps,
            r.step_ms,
            r.step_bytes as f64 / 1e6,
            r.step_bytes as f64 / bandwidth * 1e3,
            r.bandwidth_fraction * 100.0
        );
    }
    s
}
