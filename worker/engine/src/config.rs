//! `config.json` of a DeepSeek-V3-architecture checkpoint, in both dialects: the hub's
//! (`rope_theta` + `rope_scaling`) and the one re-saved by transformers >= 5 (`rope_parameters`).

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};
use std::path::Path;

/// YaRN context extension (spec §4).
#[derive(Clone, Debug, PartialEq)]
pub struct Yarn {
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub mscale: Option<f64>,
    pub mscale_all_dim: Option<f64>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    pub yarn: Option<Yarn>,
}

/// FP8 block quantisation as declared by `quantization_config`, and how this process applies it.
#[derive(Clone, Debug, PartialEq)]
pub struct Fp8Quantization {
    pub block_rows: usize,
    pub block_cols: usize,
    /// V3.1 `scale_fmt: "ue8m0"`: activation scales are powers of two.
    pub ue8m0_scales: bool,
    /// What the FP8 products do with their activations. Not read from config.json, whose
    /// `activation_scheme` must be `dynamic` (scales computed per token at run time, which
    /// [`Fp8Activations::Quantised`] implements): the process chooses (`--fp8-activations`).
    pub activations: Fp8Activations,
}

/// How an FP8 weight meets its activations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Fp8Activations {
    /// Kept at the backend's width (f32 on the CPU, bf16 on the tensor cores) against the
    /// weights' exact values: the dequantised forward pass that transformers computes.
    #[default]
    Unquantised,
    /// Quantised to e4m3 per token per 128 channels with a scale of amax / 448 (a power of two
    /// under `scale_fmt: ue8m0`), multiplied in blocks of 128 with both scales applied to each
    /// block's sum: DeepSeek's own FP8 inference, and what the checkpoint was trained for.
    Quantised,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_nextn_predict_layers: usize,
    pub num_attention_heads: usize,
    pub n_shared_experts: usize,
    pub n_routed_experts: usize,
    pub num_experts_per_tok: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub routed_scaling_factor: f32,
    pub norm_topk_prob: bool,
    pub first_k_dense_replace: usize,
    pub moe_layer_freq: usize,
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub rms_norm_eps: f32,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub rope: RopeConfig,
    pub quantization: Option<Fp8Quantization>,
}

struct Keys<'a> {
    map: &'a Map<String, Value>,
}

impl<'a> Keys<'a> {
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn usize(&self, key: &str) -> Result<usize> {
        let value = self
            .get(key)
            .with_context(|| format!("config.json: required key `{key}` is missing"))?;
        value
            .as_u64()
            .map(|v| v as usize)
            .with_context(|| format!("config.json: `{key}` must be a non-negative integer, got {value}"))
    }

    fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        if self.get(key).is_some() {
            self.usize(key)
        } else {
            Ok(default)
        }
    }

    fn f64(&self, key: &str) -> Result<f64> {
        let value = self
            .get(key)
            .with_context(|| format!("config.json: required key `{key}` is missing"))?;
        value
            .as_f64()
            .with_context(|| format!("config.json: `{key}` must be a number, got {value}"))
    }

    fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        if self.get(key).is_some() {
            self.f64(key)
        } else {
            Ok(default)
        }
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key).map(|_| self.f64(key)).transpose()
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .with_context(|| format!("config.json: `{key}` must be true or false, got {v}")),
        }
    }

    fn str(&self, key: &str) -> Option<&'a str> {
        self.get(key).and_then(Value::as_str)
    }
}

impl ModelConfig {
    /// This config with its FP8 products applying `activations` (unquantised checkpoints have none).
    pub fn with_fp8_activations(mut self, activations: Fp8Activations) -> Self {
        if let Some(q) = &mut self.quantization {
            q.activations = activations;
        }
        self
    }

    /// What the FP8 products do with their activations ([`Fp8Activations::Unquantised`] for a
    /// checkpoint without FP8 weights).
    pub fn fp8_activations(&self) -> Fp8Activations {
        self.quantization
            .as_ref()
            .map_or(Fp8Activations::Unquantised, |q| q.activations)
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read model config {}", path.display()))?;
        Self::from_json_str(&text).with_context(|| format!("in {}", path.display()))
    }

    /// `config.json` of a model directory (or the embedded model).
    /// The config of a checkpoint. A checkpoint whose config announces the MTP module but that
    /// carries none of its weights (transformers' `save_pretrained` drops them: most fine-tunes)
    /// is served without it, as vLLM, SGLang and transformers do.
    pub fn from_model_files(files: &crate::checkpoint::ModelFiles) -> Result<Self> {
        let text = files
            .read_string("config.json")?
            .with_context(|| format!("{} has no config.json", files.describe()))?;
        let mut config = Self::from_json_str(&text).with_context(|| format!("in {}/config.json", files.describe()))?;
        if config.num_nextn_predict_layers > 0 {
            let probe = format!("model.layers.{}.eh_proj.weight", config.num_hidden_layers);
            // No weights to look in (the router's view): the ranks report what they loaded.
            if crate::checkpoint::holds_tensor(files, &probe)? == Some(false) {
                static SAID: std::sync::Once = std::sync::Once::new();
                SAID.call_once(|| {
                    eprintln!(
                        "{}: config.json sets num_nextn_predict_layers {} but the checkpoint has no MTP weights \
                         (saved by transformers' save_pretrained?): serving without the MTP module",
                        files.describe(),
                        config.num_nextn_predict_layers
                    )
                });
                config.num_nextn_predict_layers = 0;
            }
        }
        Ok(config)
    }

    pub fn from_json_str(text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text).context("config.json is not valid JSON")?;
        let map = value.as_object().context("config.json must hold a JSON object")?;
        Self::from_map(map)
    }

    fn from_map(map: &Map<String, Value>) -> Result<Self> {
        let k = Keys { map };
        if let Some(model_type) = k.str("model_type") {
            if model_type != "deepseek_v3" {
                bail!("config.json: `model_type` is `{model_type}`, only `deepseek_v3` is supported");
            }
        }
        let scoring = k.str("scoring_func").unwrap_or("sigmoid");
        if scoring != "sigmoid" {
            bail!("config.json: `scoring_func` `{scoring}` is not supported (DeepSeek-V3 uses `sigmoid`)");
        }
        let topk_method = k.str("topk_method").unwrap_or("noaux_tc");
        if topk_method != "noaux_tc" {
            bail!("config.json: `topk_method` `{topk_method}` is not supported (DeepSeek-V3 uses `noaux_tc`)");
        }
        if let Some(act) = k.str("hidden_act") {
            if act != "silu" {
                bail!("config.json: `hidden_act` `{act}` is not supported (expected `silu`)");
            }
        }
        let q_lora_rank = match k.get("q_lora_rank") {
            None => None,
            Some(_) => Some(k.usize("q_lora_rank")?).filter(|&r| r > 0),
        };
        let eos_token_ids = match k.get("eos_token_id") {
            None => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_u64().map(|x| x as u32))
                .collect::<Option<Vec<_>>>()
                .context("config.json: `eos_token_id` must be an integer or a list of integers")?,
            Some(v) => vec![v
                .as_u64()
                .context("config.json: `eos_token_id` must be an integer or a list of integers")?
                as u32],
        };
        let config = ModelConfig {
            vocab_size: k.usize("vocab_size")?,
            hidden_size: k.usize("hidden_size")?,
            intermediate_size: k.usize("intermediate_size")?,
            moe_intermediate_size: k.usize("moe_intermediate_size")?,
            num_hidden_layers: k.usize("num_hidden_layers")?,
            num_nextn_predict_layers: k.usize_or("num_nextn_predict_layers", 0)?,
            num_attention_heads: k.usize("num_attention_heads")?,
            n_shared_experts: k.usize_or("n_shared_experts", 0)?,
            n_routed_experts: k.usize("n_routed_experts")?,
            num_experts_per_tok: k.usize("num_experts_per_tok")?,
            n_group: k.usize_or("n_group", 1)?,
            topk_group: k.usize_or("topk_group", 1)?,
            routed_scaling_factor: k.f64_or("routed_scaling_factor", 1.0)? as f32,
            norm_topk_prob: k.bool_or("norm_topk_prob", true)?,
            first_k_dense_replace: k.usize_or("first_k_dense_replace", 0)?,
            moe_layer_freq: k.usize_or("moe_layer_freq", 1)?,
            q_lora_rank,
            kv_lora_rank: k.usize("kv_lora_rank")?,
            qk_nope_head_dim: k.usize("qk_nope_head_dim")?,
            qk_rope_head_dim: k.usize("qk_rope_head_dim")?,
            v_head_dim: k.usize("v_head_dim")?,
            rms_norm_eps: k.f64_or("rms_norm_eps", 1e-6)? as f32,
            max_position_embeddings: k.usize("max_position_embeddings")?,
            tie_word_embeddings: k.bool_or("tie_word_embeddings", false)?,
            bos_token_id: k.get("bos_token_id").and_then(Value::as_u64).map(|v| v as u32),
            eos_token_ids,
            rope: parse_rope(&k)?,
            quantization: parse_quantization(&k)?,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("kv_lora_rank", self.kv_lora_rank),
            ("qk_nope_head_dim", self.qk_nope_head_dim),
            ("qk_rope_head_dim", self.qk_rope_head_dim),
            ("v_head_dim", self.v_head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
            ("n_group", self.n_group),
            ("moe_layer_freq", self.moe_layer_freq),
        ];
        for (key, value) in positive {
            if value == 0 {
                bail!("config.json: `{key}` must be positive");
            }
        }
        if !self.qk_rope_head_dim.is_multiple_of(2) {
            bail!(
                "config.json: `qk_rope_head_dim` must be even (rotary pairs), got {}",
                self.qk_rope_head_dim
            );
        }
        if self.n_routed_experts > 0 {
            if !self.n_routed_experts.is_multiple_of(self.n_group) {
                bail!(
                    "config.json: `n_routed_experts` ({}) must be a multiple of `n_group` ({})",
                    self.n_routed_experts,
                    self.n_group
                );
            }
            if self.topk_group == 0 || self.topk_group > self.n_group {
                bail!(
                    "config.json: `topk_group` ({}) must be in 1..=n_group ({})",
                    self.topk_group,
                    self.n_group
                );
            }
            let per_group = self.n_routed_experts / self.n_group;
            if self.num_experts_per_tok == 0 || self.num_experts_per_tok > self.topk_group * per_group {
                bail!(
                    "config.json: `num_experts_per_tok` ({}) must be in 1..={} (topk_group × experts per group)",
                    self.num_experts_per_tok,
                    self.topk_group * per_group
                );
            }
            if self.moe_intermediate_size == 0 {
                bail!("config.json: `moe_intermediate_size` must be positive");
            }
        }
        if let Some(yarn) = &self.rope.yarn {
            if yarn.factor <= 0.0 || yarn.original_max_position_embeddings == 0 {
                bail!("config.json: YaRN `factor` and `original_max_position_embeddings` must be positive");
            }
        }
        Ok(())
    }

    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Values cached per token per layer: the normalised KV latent and the rotated shared key.
    pub fn kv_cache_width(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }

    pub fn is_moe_layer(&self, layer: usize) -> bool {
        self.n_routed_experts > 0 && layer >= self.first_k_dense_replace && layer.is_multiple_of(self.moe_layer_freq)
    }

    /// Layers with routed experts: the MoE layers of the main stack, then the MTP modules'.
    pub fn routed_expert_layers(&self) -> Vec<usize> {
        (0..self.num_cache_layers())
            .filter(|&l| self.is_moe_layer(l) || l >= self.num_hidden_layers)
            .collect()
    }

    /// Layers that hold attention (and so a KV cache): the main stack plus the MTP modules.
    pub fn num_cache_layers(&self) -> usize {
        self.num_hidden_layers + self.num_nextn_predict_layers
    }

    pub fn experts_per_group(&self) -> usize {
        self.n_routed_experts / self.n_group
    }
}

fn parse_rope(k: &Keys) -> Result<RopeConfig> {
    // transformers >= 5 writes everything into `rope_parameters`; the hub file uses a top-level
    // `rope_theta` and a `rope_scaling` object.
    let (params, dialect) = if let Some(p) = k.get("rope_parameters") {
        (Some(p), "rope_parameters")
    } else {
        (k.get("rope_scaling"), "rope_scaling")
    };
    let params = match params {
        None => None,
        Some(Value::Object(m)) => Some(m),
        Some(other) => bail!("config.json: `{dialect}` must be an object, got {other}"),
    };
    let theta = match params.and_then(|p| p.get("rope_theta")).filter(|v| !v.is_null()) {
        Some(v) => v
            .as_f64()
            .with_context(|| format!("config.json: `{dialect}.rope_theta` must be a number"))?,
        None => k.f64_or("rope_theta", 10000.0)?,
    };
    let Some(params) = params else {
        return Ok(RopeConfig { theta, yarn: None });
    };
    let p = Keys { map: params };
    let kind = p.str("rope_type").or_else(|| p.str("type")).unwrap_or("default");
    let yarn = match kind {
        "default" => None,
        "yarn" => {
            let named = |key: &str| format!("{dialect}.{key}");
            Some(Yarn {
                factor: p.f64("factor").with_context(|| named("factor"))?,
                original_max_position_embeddings: p
                    .usize("original_max_position_embeddings")
                    .with_context(|| named("original_max_position_embeddings"))?,
                beta_fast: p.f64_or("beta_fast", 32.0)?,
                beta_slow: p.f64_or("beta_slow", 1.0)?,
                mscale: p.opt_f64("mscale")?,
                mscale_all_dim: p.opt_f64("mscale_all_dim")?,
            })
        }
        other => bail!("config.json: `{dialect}` type `{other}` is not supported (expected `yarn` or `default`)"),
    };
    Ok(RopeConfig { theta, yarn })
}

fn parse_quantization(k: &Keys) -> Result<Option<Fp8Quantization>> {
    let Some(q) = k.get("quantization_config") else {
        return Ok(None);
    };
    let q = q
        .as_object()
        .context("config.json: `quantization_config` must be an object")?;
    let q = Keys { map: q };
    let method = q.str("quant_method").unwrap_or("fp8");
    if method != "fp8" {
        bail!("config.json: `quantization_config.quant_method` `{method}` is not supported (expected `fp8`)");
    }
    if let Some(fmt) = q.str("fmt") {
        if fmt != "e4m3" {
            bail!("config.json: `quantization_config.fmt` `{fmt}` is not supported (expected `e4m3`)");
        }
    }
    let block = match q.get("weight_block_size") {
        None => vec![128, 128],
        Some(v) => v
            .as_array()
            .and_then(|a| {
                a.iter()
                    .map(|x| x.as_u64().map(|x| x as usize))
                    .collect::<Option<Vec<_>>>()
            })
            .filter(|b| b.len() == 2 && b.iter().all(|&x| x > 0))
            .context("config.json: `quantization_config.weight_block_size` must be two positive integers")?,
    };
    if let Some(scheme) = q.str("activation_scheme") {
        if scheme != "dynamic" {
            bail!(
                "config.json: `quantization_config.activation_scheme` `{scheme}` is not supported (expected `dynamic`)"
            );
        }
    }
    let ue8m0_scales = match q.str("scale_fmt") {
        None => false,
        Some("ue8m0") => true,
        Some(other) => {
            bail!("config.json: `quantization_config.scale_fmt` `{other}` is not supported (expected `ue8m0`)")
        }
    };
    Ok(Some(Fp8Quantization {
        block_rows: block[0],
        block_cols: block[1],
        ue8m0_scales,
        activations: Fp8Activations::default(),
    }))
}
