//! Shared helpers for the engine's integration tests.
#![allow(dead_code)]

use dsv3_engine::{ExpertExecutor, LocalExperts, Model, ModelFiles};
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The tiny test configuration of spec §11.1 (2 dense + 2 MoE layers, group routing, q_lora, YaRN).
pub fn tiny_config() -> serde_json::Value {
    serde_json::json!({
        "model_type": "deepseek_v3", "vocab_size": 1024, "hidden_size": 256, "intermediate_size": 384,
        "moe_intermediate_size": 128, "num_hidden_layers": 4, "first_k_dense_replace": 2, "moe_layer_freq": 1,
        "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 256, "kv_lora_rank": 128,
        "qk_nope_head_dim": 64, "qk_rope_head_dim": 32, "v_head_dim": 64, "n_routed_experts": 16, "n_group": 4,
        "topk_group": 2, "num_experts_per_tok": 4, "n_shared_experts": 1, "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": true, "rope_theta": 10000.0,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "tie_word_embeddings": false,
        "bos_token_id": 0, "eos_token_id": 1, "hidden_act": "silu", "num_nextn_predict_layers": 0,
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
    })
}

pub fn synthetic_model(dir: &Path, fp8: bool, shards: usize) -> (Model, LocalExperts) {
    dsv3_engine::synthetic::write_checkpoint(dir, &tiny_config(), fp8, shards, 7).expect("write checkpoint");
    load(dir)
}

pub fn load(dir: &Path) -> (Model, LocalExperts) {
    let files = ModelFiles::Dir(dir.to_path_buf());
    let model = Model::load(&files, |_| {}).expect("load model");
    let ckpt = dsv3_engine::Checkpoint::open(&files).expect("open");
    let experts = LocalExperts::load(&ckpt, &model.config, &Default::default(), |_| {}).expect("experts");
    (model, experts)
}

pub fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden")
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

pub fn experts_ref(e: &LocalExperts) -> &dyn ExpertExecutor {
    e
}

/// A golden reference file (`tests/golden/*.ref.safetensors`): its f32 and int64 tensors.
pub struct Reference {
    f32s: HashMap<String, Vec<f32>>,
    ints: HashMap<String, Vec<i64>>,
}

impl Reference {
    /// `name` under `tests/golden/`.
    pub fn load(name: &str) -> Self {
        let bytes = std::fs::read(golden_dir().join(name)).expect("reference file");
        let st = SafeTensors::deserialize(&bytes).expect("reference safetensors");
        let mut f32s = HashMap::new();
        let mut ints = HashMap::new();
        for (n, view) in st.tensors() {
            match view.dtype() {
                safetensors::Dtype::F32 => {
                    f32s.insert(
                        n,
                        view.data()
                            .chunks_exact(4)
                            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                            .collect(),
                    );
                }
                safetensors::Dtype::I64 => {
                    ints.insert(
                        n,
                        view.data()
                            .chunks_exact(8)
                            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                            .collect(),
                    );
                }
                other => panic!("unexpected dtype {other:?} for {n}"),
            }
        }
        Reference { f32s, ints }
    }
    pub fn f(&self, name: &str) -> &[f32] {
        self.f32s.get(name).unwrap_or_else(|| panic!("reference lacks {name}"))
    }
    pub fn ids(&self, name: &str) -> Vec<u32> {
        self.ints
            .get(name)
            .unwrap_or_else(|| panic!("reference lacks {name}"))
            .iter()
            .map(|&v| v as u32)
            .collect()
    }
}
