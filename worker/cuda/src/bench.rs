//! Full-width benchmarks on one GPU with random FP8 weights (ARCHITECTURE §9): one MoE layer
//! (decode at several batches over a long cached context, and a long prefill) and a 5-layer
//! slice (3 dense + 2 MoE, embedding and head, greedy sampling on the GPU). Each figure is set
//! next to its floor (bytes over the measured copy bandwidth, FLOPs over the FP8 matrix peak)
//! and next to transformers on the same shapes when its results file is given.

use crate::gpu::Gpu;
use crate::kernels;
use crate::launch::ptr;
use crate::model::CudaModel;
use anyhow::{Context, Result};
use dsv3_engine::{Chunk, Fp8Activations, ModelConfig, Outputs, TokenChoice, TokenPick};
use std::path::PathBuf;

pub struct BenchOptions {
    pub batches: Vec<usize>,
    pub context: usize,
    pub prefill: usize,
    pub reps: usize,
    /// FP8 dense matrix peak in TFLOP/s (measured once on the card with torch._scaled_mm).
    pub fp8_tflops: f64,
    /// Results of worker/bench/hf_gpu_peer.py from the same run.
    pub peer: Option<PathBuf>,
    pub out: Option<PathBuf>,
    pub configs: Vec<String>,
    /// What the FP8 products do with their activations.
    pub fp8_activations: Fp8Activations,
}

/// DeepSeek-V3's shapes with `layers` layers of which the first `dense` are dense.
pub fn v3_config(layers: usize, dense: usize) -> Result<ModelConfig> {
    ModelConfig::from_json_str(&v3_config_json(layers, dense).to_string())
}

/// [`v3_config`] as its `config.json`.
pub fn v3_config_json(layers: usize, dense: usize) -> serde_json::Value {
    serde_json::json!({
        "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
        "moe_intermediate_size": 2048, "num_hidden_layers": layers, "first_k_dense_replace": dense,
        "moe_layer_freq": 1, "num_attention_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 256,
        "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8, "n_shared_experts": 1,
        "routed_scaling_factor": 2.5, "norm_topk_prob": true, "rope_theta": 10000.0,
        "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "eos_token_id": 1, "num_nextn_predict_layers": 0,
        "rope_scaling": {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
            "weight_block_size": [128, 128]}
    })
}

#[derive(Clone, Debug)]
struct Row {
    config: &'static str,
    phase: &'static str,
    batch: usize,
    ctx: usize,
    tokens: usize,
    seconds: f64,
    bytes: f64,
    flops: f64,
}

/// With DSV3_CUDA_PROFILE=1: where the steps of one measurement went, per step.
pub(crate) fn print_profile(model: &CudaModel, label: &str, steps: usize) -> Result<()> {
    let rows = model.gpu.take_profile()?;
    if rows.is_empty() {
        return Ok(());
    }
    let (idle, rows): (Vec<_>, Vec<_>) = rows.into_iter().partition(|r| r.0.starts_with(crate::gpu::IDLE_BEFORE));
    let total: f64 = rows.iter().map(|r| r.2).sum();
    eprintln!(
        "profile {label}: {:.3} ms per step in kernels and copies",
        total * 1e3 / steps as f64
    );
    for (name, calls, secs) in rows.iter().take(16) {
        eprintln!(
            "  {name:<22} {:>6} calls/step {:>9.3} ms/step {:>5.1}%",
            calls / steps,
            secs * 1e3 / steps as f64,
            100.0 * secs / total
        );
    }
    // Where the GPU waited for the host between launches (a sync, or launches slower than the
    // kernels), largest first.
    let waited: f64 = idle.iter().map(|r| r.2).sum();
    eprintln!(
        "profile {label}: {:.3} ms per step idle between launches",
        waited * 1e3 / steps as f64
    );
    for (name, calls, secs) in idle.iter().take(6) {
        eprintln!(
            "  {name:<34} {:>6} times/step {:>9.3} ms/step",
            calls / steps,
            secs * 1e3 / steps as f64
        );
    }
    Ok(())
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The GPU time of one call of `f(i)`, as a graphed decode step sees it: `runs` calls (i = 0 ..
/// runs) recorded into one CUDA graph, so the host's cost of launching stays out of the GPU's
/// time (timed one by one, a kernel of a few µs measures the host instead); the graph run once to
/// warm up, then `reps` times; the median, per call. With every launch timed
/// (DSV3_CUDA_PROFILE), which records no graphs, the calls run directly.
pub(crate) fn graphed_seconds(
    g: &Gpu,
    runs: usize,
    reps: usize,
    mut f: impl FnMut(usize) -> Result<()>,
) -> Result<f64> {
    let runs = runs.max(1);
    if g.profiling() {
        let mut run = || (0..runs).try_for_each(&mut f);
        run()?;
        let times: Vec<f64> = (0..reps.max(1)).map(|_| g.time(&mut run)).collect::<Result<_>>()?;
        return Ok(median(times) / runs as f64);
    }
    let graph = g.capture(|| (0..runs).try_for_each(&mut f))?;
    let launch = || graph.launch().context("launching the timed graph");
    launch()?;
    let times: Vec<f64> = (0..reps.max(1)).map(|_| g.time(launch)).collect::<Result<_>>()?;
    Ok(median(times) / runs as f64)
}

/// Device-to-device copy rate, counting bytes read plus bytes written.
fn copy_bandwidth(model: &CudaModel) -> Result<f64> {
    let g = &model.gpu;
    let bytes = 2usize << 30;
    let (a, b) = (g.alloc(bytes)?, g.alloc(bytes)?);
    kernels::random_f32.launch_1d(g, bytes / 4, (ptr(a.addr), (bytes / 4) as u64, 3, -1.0, 1.0))?;
    let copy = || -> Result<()> {
        // SAFETY: both buffers hold `bytes` bytes.
        unsafe { cudarc::driver::result::memcpy_dtod_async(b.addr, a.addr, bytes, g.stream.cu_stream())? };
        Ok(())
    };
    copy()?;
    let mut times = Vec::new();
    for _ in 0..10 {
        times.push(g.time(copy)?);
    }
    Ok(2.0 * bytes as f64 / median(times))
}

struct Shapes {
    heads: f64,
    lora: f64,
    rope: f64,
    nope: f64,
    v: f64,
    latent_bytes: f64,
}

impl Shapes {
    fn of(c: &ModelConfig) -> Self {
        Shapes {
            heads: c.num_attention_heads as f64,
            lora: c.kv_lora_rank as f64,
            rope: c.qk_rope_head_dim as f64,
            nope: c.qk_nope_head_dim as f64,
            v: c.v_head_dim as f64,
            latent_bytes: (c.kv_cache_width() * 2) as f64,
        }
    }
}

/// Times decode steps of `batch` sequences at context `ctx`; returns (seconds, bytes, flops).
pub(crate) fn decode(
    model: &mut CudaModel,
    batch: usize,
    ctx: usize,
    reps: usize,
    with_head: bool,
) -> Result<(f64, f64, f64)> {
    let seqs: Vec<u64> = (0..batch as u64).collect();
    model.fill_cache_random(&seqs, ctx, 17)?;
    let tokens: Vec<[u32; 1]> = (0..batch).map(|i| [(i * 7919 % 120000 + 2) as u32]).collect();
    let chunks: Vec<Chunk> = seqs
        .iter()
        .zip(&tokens)
        .map(|(&s, t)| Chunk::new(s, ctx, t, Outputs::Last))
        .collect();
    let greedy = vec![Some(TokenPick::plain(TokenChoice::GREEDY)); chunks.len()];
    let mut times = Vec::new();
    let mut touched = 0;
    for rep in 0..reps + 2 {
        let start = model.gpu.mark()?;
        if with_head {
            model.step_pick(&chunks, &greedy)?;
        } else {
            model.forward_hidden(&chunks, false)?;
        }
        let t = model.gpu.seconds_since(&start)?;
        touched = model.experts_touched()?;
        for &s in &seqs {
            model.truncate(s, ctx);
        }
        if rep >= 2 {
            times.push(t);
        } else {
            // The profile covers the timed steps only (not the warm-up's one-off costs).
            model.gpu.take_profile()?;
        }
    }
    print_profile(model, &format!("decode batch {batch}"), reps)?;
    for &s in &seqs {
        model.free_sequence(s);
    }
    let c = model.config.clone();
    let sh = Shapes::of(&c);
    let layers = c.num_hidden_layers as f64;
    let b = batch as f64;
    let head_bytes = if with_head {
        0.0
    } else {
        (c.vocab_size * c.hidden_size * 2) as f64
    };
    let bytes = model.dense_step_bytes() as f64 - head_bytes
        + (touched * model.expert_bytes()) as f64
        + layers * b * (ctx as f64 + 1.0) * sh.latent_bytes;
    let head_elems = if with_head {
        0.0
    } else {
        (c.vocab_size * c.hidden_size) as f64
    };
    let weights = model.dense_elements_per_token() as f64 - head_elems
        + (model.moe_layers() * c.num_experts_per_tok * model.expert_elements()) as f64;
    // absorbed attention: scores over lora+rope, output over lora, per head and cached position
    let attn = layers * sh.heads * (ctx as f64 + 1.0) * (2.0 * sh.lora + sh.rope);
    let flops = 2.0 * b * (weights + attn);
    Ok((median(times), bytes, flops))
}

/// Times a prefill of `n` tokens from an empty cache; FLOPs counted for the naive MLA form.
fn prefill(model: &mut CudaModel, n: usize, reps: usize) -> Result<(f64, f64, f64)> {
    let tokens: Vec<u32> = (0..n).map(|i| (i * 7919 % 120000 + 2) as u32).collect();
    let mut times = Vec::new();
    let mut touched = 0;
    for rep in 0..reps + 1 {
        let chunk = [Chunk::new(9_999, 0, &tokens, Outputs::None)];
        let start = model.gpu.mark()?;
        model.forward_hidden(&chunk, false)?;
        let t = model.gpu.seconds_since(&start)?;
        touched = model.experts_touched()?;
        model.free_sequence(9_999);
        if rep >= 1 {
            times.push(t);
        } else {
            model.gpu.take_profile()?;
        }
    }
    print_profile(model, &format!("prefill {n}"), reps)?;
    let c = model.config.clone();
    let sh = Shapes::of(&c);
    let layers = c.num_hidden_layers as f64;
    let head_elems = (c.vocab_size * c.hidden_size) as f64;
    let nf = n as f64;
    let kv_b = sh.heads * (sh.nope + sh.v) * sh.lora;
    let weights = model.dense_elements_per_token() as f64 - head_elems - layers * kv_b
        + (model.moe_layers() * c.num_experts_per_tok * model.expert_elements()) as f64;
    // naive form: K/V expanded once per position, then causal QKᵀ and PV per head
    let attn = layers * (nf * kv_b + sh.heads * nf * (nf + 1.0) / 2.0 * (sh.nope + sh.rope + sh.v));
    let flops = 2.0 * (nf * weights + attn);
    let bytes = (model.dense_step_bytes() - c.vocab_size * c.hidden_size * 2) as f64
        + (touched * model.expert_bytes()) as f64
        + layers * nf * sh.latent_bytes;
    Ok((median(times), bytes, flops))
}

/// The peer's results file, or none.
fn read_peer(opts: &BenchOptions) -> Result<Vec<serde_json::Value>> {
    Ok(match &opts.peer {
        Some(p) => {
            serde_json::from_str(&std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?)
                .with_context(|| format!("parsing {}", p.display()))?
        }
        None => vec![],
    })
}

fn peer_ms(peer: &[serde_json::Value], config: &str, phase: &str, batch: usize) -> Option<(f64, u64)> {
    peer.iter().find_map(|r| {
        let ok = r["config"] == config && r["phase"] == phase && r["batch"].as_u64() == Some(batch as u64);
        if ok {
            Some((r["ms"].as_f64()?, r["ctx"].as_u64().unwrap_or(0)))
        } else {
            None
        }
    })
}

pub fn run(opts: &BenchOptions) -> Result<()> {
    let max_batch = opts.batches.iter().copied().max().unwrap_or(1);
    let cache_tokens = max_batch * (opts.context + 128) + opts.prefill + 128;
    let mut rows = Vec::new();
    let mut bandwidth = None;
    for config in &opts.configs {
        if config == "mla" {
            let gpu = crate::Gpu::open(0)?;
            println!(
                "{}",
                crate::bench_attention::run(&gpu, &opts.batches, opts.context, opts.reps)?
            );
            continue;
        }
        if config == "mla_prefill" {
            let gpu = crate::Gpu::open(0)?;
            let peer = read_peer(opts)?;
            let peer = peer
                .iter()
                .find(|r| r["config"] == "mla_prefill" && r["tokens"].as_u64() == Some(opts.prefill as u64));
            println!(
                "{}",
                crate::bench_attention::run_prefill(&gpu, opts.prefill, opts.reps, peer)?
            );
            continue;
        }
        if config == "dense" {
            let gpu = crate::Gpu::open(0)?;
            // DeepSeek-V3's activation scales (V3.1's are powers of two).
            println!("{}", crate::bench_linear::run(&gpu, &opts.batches, opts.reps, false)?);
            continue;
        }
        if config == "speculative" {
            let table = crate::bench_speculative::run(
                &opts.batches,
                opts.context,
                opts.reps,
                opts.fp8_activations,
                &[0.85, 0.9],
            )?;
            println!("{table}");
            continue;
        }
        let (layers, dense, name): (usize, usize, &'static str) = match config.as_str() {
            "moe_layer" => (1, 0, "moe_layer"),
            "slice5" => (5, 3, "slice5"),
            other => {
                anyhow::bail!(
                    "unknown benchmark config `{other}` (moe_layer, slice5, mla, mla_prefill, dense, speculative)"
                )
            }
        };
        eprintln!("{name}: making random FP8 weights on the GPU...");
        let mut model = CudaModel::random(
            v3_config(layers, dense)?.with_fp8_activations(opts.fp8_activations),
            0,
            cache_tokens,
            42,
        )
        .with_context(|| format!("building the {name} model"))?;
        if bandwidth.is_none() {
            let bw = copy_bandwidth(&model)?;
            eprintln!("{}: device-to-device copy {:.0} GB/s", model.gpu.name, bw / 1e9);
            bandwidth = Some(bw);
        }
        let with_head = name == "slice5";
        for &b in &opts.batches {
            let (s, bytes, flops) = decode(&mut model, b, opts.context, opts.reps, with_head)?;
            eprintln!("{name} decode batch {b}: {:.3} ms", s * 1e3);
            rows.push(Row {
                config: name,
                phase: "decode",
                batch: b,
                ctx: opts.context,
                tokens: b,
                seconds: s,
                bytes,
                flops,
            });
        }
        if name == "moe_layer" && opts.prefill > 0 {
            let (s, bytes, flops) = prefill(&mut model, opts.prefill, opts.reps.min(3))?;
            eprintln!("{name} prefill {}: {:.3} ms", opts.prefill, s * 1e3);
            rows.push(Row {
                config: name,
                phase: "prefill",
                batch: 1,
                ctx: 0,
                tokens: opts.prefill,
                seconds: s,
                bytes,
                flops,
            });
        }
    }
    if rows.is_empty() {
        return Ok(()); // only kernel tables (mla, mla_prefill, dense, speculative) were asked for
    }
    let bw = bandwidth.unwrap_or(4.2e12);
    let peer = read_peer(opts)?;
    println!(
        "| config | phase | batch | ctx | dsv3 ms | tok/s | GB/s | HBM floor ms | TFLOP/s | FP8 floor ms | vs floor | transformers ms (ctx) | speed-up |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut json = Vec::new();
    for r in &rows {
        let mem_floor = r.bytes / bw;
        let flop_floor = r.flops / (opts.fp8_tflops * 1e12);
        let floor = mem_floor.max(flop_floor);
        let peer = peer_ms(&peer, r.config, r.phase, r.batch);
        let (peer_txt, speedup) = match peer {
            Some((ms, ctx)) => (format!("{ms:.2} ({ctx})"), format!("{:.1}×", ms / (r.seconds * 1e3))),
            None => ("–".into(), "–".into()),
        };
        println!(
            "| {} | {} | {} | {} | {:.3} | {:.0} | {:.0} | {:.3} | {:.1} | {:.3} | {:.2}× | {} | {} |",
            r.config,
            r.phase,
            r.batch,
            r.ctx,
            r.seconds * 1e3,
            r.tokens as f64 / r.seconds,
            r.bytes / r.seconds / 1e9,
            mem_floor * 1e3,
            r.flops / r.seconds / 1e12,
            flop_floor * 1e3,
            r.seconds / floor,
            peer_txt,
            speedup
        );
        json.push(serde_json::json!({
            "config": r.config, "phase": r.phase, "batch": r.batch, "ctx": r.ctx, "ms": r.seconds * 1e3,
            "bytes": r.bytes, "flops": r.flops, "hbm_floor_ms": mem_floor * 1e3, "fp8_floor_ms": flop_floor * 1e3,
            "peer_ms": peer.map(|p| p.0),
        }));
    }
    println!(
        "\ncopy bandwidth {:.0} GB/s (read + write), FP8 peak {} TFLOP/s",
        bw / 1e9,
        opts.fp8_tflops
    );
    if let Some(out) = &opts.out {
        std::fs::write(out, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}
