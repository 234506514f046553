//! Random checkpoints in the official layout, for benchmarks and loader tests: every tensor a
//! real DeepSeek-V3 checkpoint has, with weights at real scale (N(0, 1/fan_in)), optionally FP8
//! block-quantised with `weight_scale_inv` exactly as the published files.

use crate::config::ModelConfig;
use crate::fp8::{encode_e4m3, E4M3_TO_F32};
use anyhow::{Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::{Dtype, View};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;

struct Tensor {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &Tensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

struct Writer {
    rng: ChaCha8Rng,
    fp8: bool,
    tensors: BTreeMap<String, Tensor>,
}

/// Values drawn per generator: each chunk of a tensor has its own, so chunks fill in parallel
/// and the checkpoint is the same on any number of threads.
const CHUNK: usize = 1 << 20;

/// Runs `fill(chunk index, chunk)` over `out` in chunks of `chunk` on every core.
fn par_chunks<T: Send>(out: &mut [T], chunk: usize, fill: impl Fn(usize, &mut [T]) + Sync) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunks: Vec<(usize, &mut [T])> = out.chunks_mut(chunk.max(1)).enumerate().collect();
    let queue = std::sync::Mutex::new(chunks);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let next = queue.lock().map(|mut q| q.pop());
                let Ok(Some((i, c))) = next else { break };
                fill(i, c);
            });
        }
    });
}

/// N(0, std²) values (Box-Muller), chunk `index` of a tensor drawn with generator seed `seed`.
fn fill_normal(seed: u64, index: usize, std: f32, out: &mut [f32]) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    for pair in out.chunks_mut(2) {
        let u1: f32 = rng.random::<f32>().max(1e-12);
        let u2: f32 = rng.random();
        let r = std * (-2.0 * u1.ln()).sqrt();
        let (sin, cos) = (std::f32::consts::TAU * u2).sin_cos();
        pair[0] = r * cos;
        if let Some(v) = pair.get_mut(1) {
            *v = r * sin;
        }
    }
}

impl Writer {
    fn normal(&mut self, n: usize, std: f32) -> Vec<f32> {
        let seed = self.rng.random();
        let mut out = vec![0.0f32; n];
        par_chunks(&mut out, CHUNK, |i, c| fill_normal(seed, i, std, c));
        out
    }

    fn bf16(&mut self, name: String, shape: Vec<usize>, values: &[f32]) {
        let data = values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_bits().to_le_bytes())
            .collect();
        self.tensors.insert(
            name,
            Tensor {
                dtype: Dtype::BF16,
                shape,
                data,
            },
        );
    }

    fn f32(&mut self, name: String, shape: Vec<usize>, values: &[f32]) {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.tensors.insert(
            name,
            Tensor {
                dtype: Dtype::F32,
                shape,
                data,
            },
        );
    }

    fn norm(&mut self, name: String, len: usize) {
        let values: Vec<f32> = self.normal(len, 0.1).iter().map(|v| 1.0 + v).collect();
        self.bf16(name, vec![len], &values);
    }

    /// A projection weight `[rows, cols]`: FP8 with block scales in an FP8 checkpoint.
    fn projection(&mut self, name: String, rows: usize, cols: usize) {
        let std = 1.0 / (cols as f32).sqrt();
        if !self.fp8 {
            let w = self.normal(rows * cols, std);
            self.bf16(name, vec![rows, cols], &w);
            return;
        }
        // Stripes of 128 rows (one row of scale blocks) are drawn and quantised in parallel.
        let seed = self.rng.random();
        let (sr, sc) = (rows.div_ceil(128), cols.div_ceil(128));
        let mut q = vec![0u8; rows * cols];
        let mut scales = vec![0.0f32; sr * sc];
        let mut stripes: Vec<(&mut [u8], &mut [f32])> = q.chunks_mut(128 * cols).zip(scales.chunks_mut(sc)).collect();
        par_chunks(&mut stripes, 1, |stripe, pair| {
            let (q, scales) = &mut pair[0];
            let mut w = vec![0.0f32; q.len()];
            fill_normal(seed, stripe, std, &mut w);
            let stripe_rows = w.len() / cols;
            for (bc, s) in scales.iter_mut().enumerate() {
                let mut amax = 0.0f32;
                for r in 0..stripe_rows {
                    for c in bc * 128..((bc + 1) * 128).min(cols) {
                        amax = amax.max(w[r * cols + c].abs());
                    }
                }
                *s = amax.max(1e-12) / 448.0;
            }
            for (i, (b, v)) in q.iter_mut().zip(&w).enumerate() {
                *b = encode_e4m3(v / scales[(i % cols) / 128]);
            }
        });
        drop(stripes);
        debug_assert!(q.iter().all(|&b| E4M3_TO_F32[b as usize].is_finite()));
        self.tensors.insert(
            name.clone(),
            Tensor {
                dtype: Dtype::F8_E4M3,
                shape: vec![rows, cols],
                data: q,
            },
        );
        self.f32(format!("{name}_scale_inv"), vec![sr, sc], &scales);
    }

    fn mlp(&mut self, prefix: &str, hidden: usize, width: usize) {
        self.projection(format!("{prefix}.gate_proj.weight"), width, hidden);
        self.projection(format!("{prefix}.up_proj.weight"), width, hidden);
        self.projection(format!("{prefix}.down_proj.weight"), hidden, width);
    }

    fn block(&mut self, cfg: &ModelConfig, layer: usize) {
        let p = format!("model.layers.{layer}");
        let h = cfg.hidden_size;
        let heads = cfg.num_attention_heads;
        self.norm(format!("{p}.input_layernorm.weight"), h);
        self.norm(format!("{p}.post_attention_layernorm.weight"), h);
        let a = format!("{p}.self_attn");
        match cfg.q_lora_rank {
            Some(rank) => {
                self.projection(format!("{a}.q_a_proj.weight"), rank, h);
                self.norm(format!("{a}.q_a_layernorm.weight"), rank);
                self.projection(format!("{a}.q_b_proj.weight"), heads * cfg.qk_head_dim(), rank);
            }
            None => self.projection(format!("{a}.q_proj.weight"), heads * cfg.qk_head_dim(), h),
        }
        self.projection(format!("{a}.kv_a_proj_with_mqa.weight"), cfg.kv_cache_width(), h);
        self.norm(format!("{a}.kv_a_layernorm.weight"), cfg.kv_lora_rank);
        self.projection(
            format!("{a}.kv_b_proj.weight"),
            heads * (cfg.qk_nope_head_dim + cfg.v_head_dim),
            cfg.kv_lora_rank,
        );
        self.projection(format!("{a}.o_proj.weight"), h, heads * cfg.v_head_dim);
        if cfg.is_moe_layer(layer) || layer >= cfg.num_hidden_layers {
            let e = cfg.n_routed_experts;
            let gate = self.normal(e * h, 1.0 / (h as f32).sqrt());
            self.bf16(format!("{p}.mlp.gate.weight"), vec![e, h], &gate);
            let bias = self.normal(e, 0.1);
            self.f32(format!("{p}.mlp.gate.e_score_correction_bias"), vec![e], &bias);
            for j in 0..e {
                self.mlp(&format!("{p}.mlp.experts.{j}"), h, cfg.moe_intermediate_size);
            }
            if cfg.n_shared_experts > 0 {
                self.mlp(
                    &format!("{p}.mlp.shared_experts"),
                    h,
                    cfg.moe_intermediate_size * cfg.n_shared_experts,
                );
            }
        } else {
            self.mlp(&format!("{p}.mlp"), h, cfg.intermediate_size);
        }
    }
}

/// Writes `config.json` (with `quantization_config` when `fp8`) and random weights as
/// `shards` safetensors files (with an index when more than one) into `dir`.
pub fn write_checkpoint(dir: &Path, config: &serde_json::Value, fp8: bool, shards: usize, seed: u64) -> Result<()> {
    let mut config = config.clone();
    if fp8 {
        config["quantization_config"] = serde_json::json!({
            "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]
        });
    }
    let cfg = ModelConfig::from_json_str(&config.to_string()).context("synthetic config")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config)?)?;
    let mut w = Writer {
        rng: ChaCha8Rng::seed_from_u64(seed),
        fp8,
        tensors: BTreeMap::new(),
    };
    let (v, h) = (cfg.vocab_size, cfg.hidden_size);
    let embed = w.normal(v * h, 1.0);
    w.bf16("model.embed_tokens.weight".into(), vec![v, h], &embed);
    let head = w.normal(v * h, 1.0 / (h as f32).sqrt());
    w.bf16("lm_head.weight".into(), vec![v, h], &head);
    w.norm("model.norm.weight".into(), h);
    for layer in 0..cfg.num_hidden_layers {
        w.block(&cfg, layer);
    }
    let tensors = std::mem::take(&mut w.tensors);
    let shards = shards.max(1);
    let total: usize = tensors.values().map(|t| t.data.len()).sum();
    let per_shard = total.div_ceil(shards);
    let mut groups: Vec<Vec<(&String, &Tensor)>> = vec![Vec::new()];
    let mut size = 0;
    for (name, t) in &tensors {
        if size >= per_shard && groups.len() < shards {
            groups.push(Vec::new());
            size = 0;
        }
        groups.last_mut().expect("one group").push((name, t));
        size += t.data.len();
    }
    if groups.len() == 1 {
        safetensors::serialize_to_file(
            groups[0].iter().map(|(n, t)| (n.as_str(), *t)),
            None,
            &dir.join("model.safetensors"),
        )?;
        return Ok(());
    }
    let mut weight_map = serde_json::Map::new();
    for (i, group) in groups.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, groups.len());
        for (name, _) in group {
            weight_map.insert((*name).clone(), serde_json::Value::String(file.clone()));
        }
        safetensors::serialize_to_file(group.iter().map(|(n, t)| (n.as_str(), *t)), None, &dir.join(&file))?;
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index)?,
    )?;
    Ok(())
}
