//! `dsv3-worker bench-serve`: serving through the OpenAI API against the engine's own step.
//!
//! On a GPU it writes a full-width checkpoint of a few layers in the official format (random FP8
//! weights, DeepSeek-V3's shapes); on the CPU it uses the given or the embedded model. It times
//! the backend's decode step (`StepBackend::step_pick`, the same picks) at each batch in this
//! process, then starts `serve` on the checkpoint and drives N concurrent streams over HTTP:
//! time to first token, time between tokens and decode tok/s, beside the step.

use crate::bench_fleet::metric_sum;
use crate::device::{load_backend, DeviceArg, Fp8ActivationsArg};
use crate::server_process::ServerProcess;
use anyhow::{bail, Context, Result};
use clap::Args;
use dsv3_engine::{Chunk, ExpertSelection, ModelFiles, Outputs, StepBackend, TokenChoice, TokenPick};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct BenchServeArgs {
    /// Serve this model instead of the default (a written full-width checkpoint on a GPU, the
    /// embedded model on the CPU).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Layers of the written full-width checkpoint, of which the first `--dense-layers` are dense.
    #[arg(long, default_value_t = 5)]
    layers: usize,
    #[arg(long, default_value_t = 3)]
    dense_layers: usize,
    /// Where the full-width checkpoint is written, or read if already there; default: a temporary
    /// directory removed afterwards.
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    /// Concurrent streams, one measurement each.
    #[arg(long, value_delimiter = ',', default_value = "1,64,256")]
    batches: Vec<usize>,
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    /// Tokens each stream decodes (long enough that every stream decodes together for a while).
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Sampling of every stream (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
    /// Also write the table (markdown) to this file.
    #[arg(long)]
    output: Option<PathBuf>,
}

pub fn run(args: BenchServeArgs) -> Result<()> {
    if args.batches.is_empty() || args.batches.contains(&0) || args.max_tokens < 4 || args.prompt_len == 0 {
        bail!("--batches must be positive, --max-tokens at least 4 and --prompt-len at least 1");
    }
    let cuda = args.device.use_cuda()?;
    let mut temporary = None;
    let files = match (&args.model, cuda) {
        (Some(dir), _) => ModelFiles::Dir(dir.clone()),
        (None, false) => crate::model_source::resolve(None),
        (None, true) => {
            let dir = match &args.checkpoint_dir {
                Some(dir) => dir.clone(),
                None => temporary.insert(tempfile::tempdir()?).path().join("full-width"),
            };
            full_width_checkpoint(&dir, args.layers, args.dense_layers)?;
            ModelFiles::Dir(dir)
        }
    };
    let largest = args.batches.iter().copied().max().unwrap_or(1);
    // Every stream's whole context, with a block of slack per stream.
    let cache_tokens = largest * (args.prompt_len + args.max_tokens + 64);
    let config = dsv3_engine::ModelConfig::from_model_files(&files)?;
    if args.prompt_len + args.max_tokens > config.max_position_embeddings {
        bail!("--prompt-len + --max-tokens exceeds the model's context");
    }

    eprintln!("engine step: the backend's decode step in this process");
    let mut steps = Vec::new();
    {
        let mut backend = load_backend(
            &files,
            args.device,
            ExpertSelection::All,
            None,
            cache_tokens,
            Fp8ActivationsArg::Auto,
        )?;
        for &batch in &args.batches {
            let s = engine_step(backend.as_mut(), batch, &args)?;
            eprintln!("  batch {batch}: {:.3} ms", s * 1e3);
            steps.push(s);
        }
    }

    let device = if cuda { "cuda" } else { "cpu" };
    let server = Server::start(&files, device, cache_tokens, largest)?;
    let mut rows = Vec::new();
    for (&batch, &step) in args.batches.iter().zip(&steps) {
        let before = server.scheduler_time()?;
        let streams = drive(&server, batch, &args, config.vocab_size)?;
        let after = server.scheduler_time()?;
        let scheduler_share = 1.0 - (after.0 - before.0) / (after.1 - before.1).max(1e-9);
        let row = Row::of(batch, step, scheduler_share, &streams)?;
        eprintln!("  {}", row.markdown());
        rows.push(row);
    }
    drop(server);

    let mut table = format!(
        "Serving `{}` on {device}: {} streams of {} prompt + {} decoded tokens, temperature {}, top_p {}.\n\n",
        files.describe(),
        args.batches.iter().map(|b| b.to_string()).collect::<Vec<_>>().join("/"),
        args.prompt_len,
        args.max_tokens,
        args.temperature,
        args.top_p
    );
    table.push_str(Row::HEADER);
    for r in &rows {
        table.push_str(&r.markdown());
        table.push('\n');
    }
    print!("{table}");
    if let Some(path) = &args.output {
        std::fs::write(path, &table).with_context(|| format!("writing {}", path.display()))?;
    }
    drop(temporary);
    Ok(())
}

/// Writes DeepSeek-V3's shapes with `layers` layers (random FP8 weights) into `dir` unless a
/// checkpoint of that config is already there.
fn full_width_checkpoint(dir: &std::path::Path, layers: usize, dense: usize) -> Result<()> {
    let config = dsv3_cuda::bench::v3_config_json(layers, dense);
    let existing = std::fs::read_to_string(dir.join("config.json")).ok();
    let same = existing
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .is_some_and(|c| {
            c["num_hidden_layers"] == config["num_hidden_layers"]
                && c["first_k_dense_replace"] == config["first_k_dense_replace"]
        });
    if same {
        eprintln!("checkpoint: reusing {}", dir.display());
        return Ok(());
    }
    let started = Instant::now();
    eprintln!(
        "checkpoint: writing {layers} full-width layers ({dense} dense) to {}",
        dir.display()
    );
    dsv3_engine::synthetic::write_checkpoint(dir, &config, true, 8, 1)?;
    eprintln!("checkpoint: written in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// The pick every stream's request asks for, with a fixed draw.
fn pick(args: &BenchServeArgs) -> TokenPick {
    TokenPick {
        choice: TokenChoice {
            temperature: args.temperature,
            top_k: 0,
            top_p: args.top_p,
            uniform: 0.5,
        },
        logprobs: None,
        edits: Vec::new(),
        allowed: None,
    }
}

/// Median seconds of the backend's decode step at `batch` over the streams' decode (prefilled
/// prompts, then `max_tokens` steps; the first two, which may record graphs, not counted).
fn engine_step(backend: &mut dyn StepBackend, batch: usize, args: &BenchServeArgs) -> Result<f64> {
    let vocab = backend.config().vocab_size;
    let seqs: Vec<u64> = (1..=batch as u64).collect();
    let prompts: Vec<Vec<u32>> = (0..batch).map(|s| prompt(s, args.prompt_len, vocab)).collect();
    // Prefill, several prompts per step.
    let budget = 4096;
    let mut done = vec![0usize; batch];
    while done.iter().zip(&prompts).any(|(d, p)| *d < p.len()) {
        let mut left = budget;
        let mut chunks = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            if done[i] == p.len() || left == 0 {
                continue;
            }
            let n = (p.len() - done[i]).min(left);
            chunks.push(Chunk::new(seqs[i], done[i], &p[done[i]..done[i] + n], Outputs::None));
            left -= n;
        }
        backend.step(&chunks)?;
        for c in &chunks {
            done[(c.seq - 1) as usize] += c.tokens.len();
        }
    }
    let picks = vec![Some(pick(args)); batch];
    let mut last: Vec<u32> = prompts.iter().map(|p| p[p.len() - 1]).collect();
    let mut times = Vec::new();
    for step in 0..args.max_tokens {
        let chunks: Vec<Chunk> = seqs
            .iter()
            .zip(&last)
            .map(|(&s, t)| Chunk::new(s, args.prompt_len + step, std::slice::from_ref(t), Outputs::Last))
            .collect();
        let started = Instant::now();
        let picked = backend.step_pick(&chunks, &picks)?;
        times.push(started.elapsed().as_secs_f64());
        last = picked.into_iter().map(|p| p.map_or(0, |p| p.token)).collect();
    }
    for &s in &seqs {
        backend.free_sequence(s);
    }
    Ok(percentile(&mut times[2..], 0.5))
}

/// A prompt of `len` token ids, different for every stream.
fn prompt(stream: usize, len: usize, vocab: usize) -> Vec<u32> {
    (0..len)
        .map(|j| ((stream * 7919 + j * 104_729 + 3) % vocab) as u32)
        .collect()
}

/// The value at fraction `p` of the sorted values (nearest rank; NaN when there are none).
fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// `serve` on the benchmark's model, and the model name it answers to.
struct Server {
    process: ServerProcess,
    model: String,
}

impl Server {
    fn start(files: &ModelFiles, device: &str, cache_tokens: usize, streams: usize) -> Result<Server> {
        let mut process = ServerProcess::start("serve", |cmd| {
            cmd.args(["--device", device])
                .args(["--cache-tokens", &cache_tokens.to_string()])
                .args(["--max-waiting", &(streams + 16).to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::inherit());
            if let ModelFiles::Dir(dir) = files {
                cmd.arg("--model").arg(dir);
            }
        })?;
        process.wait_ready(Duration::from_secs(600))?;
        let models: Value = ureq::get(&format!("{}/v1/models", process.base)).call()?.into_json()?;
        let model = models["data"][0]["id"].as_str().unwrap_or_default().to_string();
        Ok(Server { process, model })
    }

    /// Seconds the scheduler has waited on steps and has been busy, since start.
    fn scheduler_time(&self) -> Result<(f64, f64)> {
        let base = &self.process.base;
        Ok((
            metric_sum(base, "dsv3_scheduler_step_seconds_total")?,
            metric_sum(base, "dsv3_scheduler_busy_seconds_total")?,
        ))
    }
}

/// When each token of one stream arrived, in seconds from the common start.
struct Stream {
    arrivals: Vec<f64>,
}

/// `batch` concurrent streaming completions, released together.
fn drive(server: &Server, batch: usize, args: &BenchServeArgs, vocab: usize) -> Result<Vec<Stream>> {
    let barrier = Arc::new(Barrier::new(batch + 1));
    let url = format!("{}/v1/completions", server.process.base);
    let handles: Vec<_> = (0..batch)
        .map(|i| {
            let body = json!({
                "model": server.model, "prompt": prompt(i + 1000, args.prompt_len, vocab),
                "max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
                "ignore_eos": true, "stream": true, "return_token_ids": true, "seed": i,
            });
            let (barrier, url) = (barrier.clone(), url.clone());
            std::thread::spawn(move || -> Result<Vec<Instant>> {
                barrier.wait();
                let response = ureq::post(&url).send_json(body).context("streaming completion")?;
                let mut arrivals = Vec::new();
                for line in BufReader::new(response.into_reader()).lines() {
                    let line = line?;
                    let Some(data) = line.strip_prefix("data: ") else {
                        continue;
                    };
                    if data == "[DONE]" {
                        break;
                    }
                    let chunk: Value = serde_json::from_str(data)?;
                    if let Some(e) = chunk.get("error") {
                        bail!("stream error: {e}");
                    }
                    let now = Instant::now();
                    let n = chunk["choices"][0]["token_ids"].as_array().map_or(0, Vec::len);
                    arrivals.extend(std::iter::repeat_n(now, n));
                }
                Ok(arrivals)
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    let mut streams = Vec::new();
    for h in handles {
        let arrivals = h.join().map_err(|_| anyhow::anyhow!("a client thread panicked"))??;
        if arrivals.len() != args.max_tokens {
            bail!("a stream got {} tokens, not {}", arrivals.len(), args.max_tokens);
        }
        streams.push(Stream {
            arrivals: arrivals
                .iter()
                .map(|t| t.saturating_duration_since(start).as_secs_f64())
                .collect(),
        });
    }
    Ok(streams)
}

struct Row {
    batch: usize,
    ttft_p50: f64,
    ttft_max: f64,
    tbt_p50: f64,
    tbt_p99: f64,
    /// Decode tokens per second while every stream was decoding.
    tok_s: f64,
    step: f64,
    /// The share of the scheduler's busy time spent outside the steps.
    scheduler_share: f64,
}

impl Row {
    const HEADER: &'static str = "| streams | TTFT p50 (ms) | TTFT max (ms) | TBT p50 (ms) | TBT p99 (ms) | API decode tok/s | engine step (ms) | engine tok/s | API / engine | scheduler outside steps |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";

    /// The steady window runs from the last stream's first token to the first stream's last one.
    fn of(batch: usize, step: f64, scheduler_share: f64, streams: &[Stream]) -> Result<Row> {
        let mut ttft: Vec<f64> = streams.iter().map(|s| s.arrivals[0]).collect();
        let from = ttft.iter().copied().fold(0.0, f64::max);
        let to = streams
            .iter()
            .map(|s| s.arrivals[s.arrivals.len() - 1])
            .fold(f64::INFINITY, f64::min);
        let (mut gaps, mut tokens) = (Vec::new(), 0usize);
        for s in streams {
            for w in s.arrivals.windows(2) {
                if w[0] >= from && w[1] <= to {
                    gaps.push(w[1] - w[0]);
                    tokens += 1;
                }
            }
        }
        if tokens == 0 || to <= from {
            bail!("no steady decode window at {batch} streams: raise --max-tokens");
        }
        Ok(Row {
            batch,
            ttft_p50: percentile(&mut ttft, 0.5),
            ttft_max: from,
            tbt_p50: percentile(&mut gaps, 0.5),
            tbt_p99: percentile(&mut gaps, 0.99),
            tok_s: tokens as f64 / (to - from),
            step,
            scheduler_share,
        })
    }

    fn markdown(&self) -> String {
        let engine = self.batch as f64 / self.step;
        format!(
            "| {} | {:.1} | {:.1} | {:.2} | {:.2} | {:.0} | {:.2} | {:.0} | {:.0}% | {:.1}% |",
            self.batch,
            self.ttft_p50 * 1e3,
            self.ttft_max * 1e3,
            self.tbt_p50 * 1e3,
            self.tbt_p99 * 1e3,
            self.tok_s,
            self.step * 1e3,
            engine,
            100.0 * self.tok_s / engine,
            100.0 * self.scheduler_share
        )
    }
}
