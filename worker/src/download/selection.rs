//! Which files of a checkpoint a role reads: the router only the config and tokenizer, a rank
//! the shards that hold its tensors (found through the shard index).

use anyhow::{Context, Result};
use clap::ValueEnum;
use dsv3_engine::INDEX_FILE;
use std::collections::{BTreeMap, BTreeSet};

/// The small files every role reads: what the router needs and nothing more (the shard index
/// tells whether the checkpoint carries the MTP module, which the scheduler plans for).
pub const ROUTER_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    INDEX_FILE,
    dsv3_text::TOKENIZER_FILE,
    dsv3_text::TOKENIZER_CONFIG_FILE,
    dsv3_text::CHAT_TEMPLATE_FILE,
];

pub use dsv3_engine::SINGLE_FILE;

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilesFor {
    /// Every file any role reads.
    All,
    /// The config, generation config, shard index, tokenizer and chat template.
    Router,
    /// An attention rank: every tensor but the routed experts, plus the experts the placement
    /// plan has the rank run itself.
    Attention,
    /// An expert shard: the routed experts the placement plan gives it.
    Expert,
}

/// Whether the worker reads `name` at all (the repository's other files, code and figures and
/// the like, are not fetched).
pub fn is_model_file(name: &str) -> bool {
    ROUTER_FILES.contains(&name) || (name.ends_with(".safetensors") && !name.contains('/') && !name.starts_with('.'))
}

/// The expert id of a routed expert's tensor (`model.layers.L.mlp.experts.E.…`).
pub fn routed_expert_of(tensor: &str) -> Option<u32> {
    let rest = tensor.strip_prefix("model.layers.")?;
    let (_layer, rest) = rest.split_once('.')?;
    let rest = rest.strip_prefix("mlp.experts.")?;
    let (expert, _) = rest.split_once('.')?;
    expert.parse().ok()
}

/// The tensors a rank loads: everything but the routed experts it does not run.
pub struct RankTensors {
    /// Whether it loads the non-expert tensors (attention, dense layers, gate, embedding).
    pub dense: bool,
    /// The routed experts it runs (the same ids in every MoE layer).
    pub experts: BTreeSet<u32>,
}

impl RankTensors {
    fn wants(&self, tensor: &str) -> bool {
        match routed_expert_of(tensor) {
            Some(expert) => self.experts.contains(&expert),
            None => self.dense,
        }
    }
}

/// The shard files holding the tensors a rank loads, by the index's weight map.
pub fn shards_for(weight_map: &BTreeMap<String, String>, rank: &RankTensors) -> BTreeSet<String> {
    weight_map
        .iter()
        .filter(|(tensor, _)| rank.wants(tensor))
        .map(|(_, file)| file.clone())
        .collect()
}

/// `n_routed_experts` of a config.json, for the placement plan of a shard.
pub fn routed_experts(config_json: &str) -> Result<u32> {
    let value: serde_json::Value = serde_json::from_str(config_json).context("config.json is not valid JSON")?;
    let n = value
        .get("n_routed_experts")
        .and_then(serde_json::Value::as_u64)
        .context("config.json has no `n_routed_experts` count")?;
    u32::try_from(n).context("config.json: `n_routed_experts` is out of range")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(entries: &[(&str, &str)]) -> BTreeMap<String, String> {
        entries.iter().map(|(t, f)| (t.to_string(), f.to_string())).collect()
    }

    #[test]
    fn expert_ids_are_read_from_routed_expert_tensor_names_only() {
        assert_eq!(
            routed_expert_of("model.layers.3.mlp.experts.17.down_proj.weight"),
            Some(17)
        );
        assert_eq!(
            routed_expert_of("model.layers.61.mlp.experts.0.gate_proj.weight_scale_inv"),
            Some(0)
        );
        assert_eq!(
            routed_expert_of("model.layers.3.mlp.shared_experts.down_proj.weight"),
            None
        );
        assert_eq!(routed_expert_of("model.layers.3.mlp.gate.weight"), None);
        assert_eq!(routed_expert_of("model.embed_tokens.weight"), None);
        assert_eq!(routed_expert_of("model.layers.3.mlp.experts.x.down_proj.weight"), None);
    }

    #[test]
    fn a_rank_gets_the_shards_that_hold_its_tensors() {
        let weights = map(&[
            ("model.embed_tokens.weight", "a.safetensors"),
            ("model.layers.1.self_attn.kv_a_proj_with_mqa.weight", "b.safetensors"),
            ("model.layers.1.mlp.experts.0.up_proj.weight", "b.safetensors"),
            ("model.layers.1.mlp.experts.1.up_proj.weight", "c.safetensors"),
            ("model.layers.2.mlp.experts.1.up_proj.weight", "d.safetensors"),
            ("model.layers.2.mlp.experts.2.up_proj.weight", "e.safetensors"),
        ]);
        let names = |set: BTreeSet<String>| set.into_iter().collect::<Vec<_>>().join(" ");
        let expert_1 = RankTensors {
            dense: false,
            experts: [1].into(),
        };
        assert_eq!(names(shards_for(&weights, &expert_1)), "c.safetensors d.safetensors");
        let attention = RankTensors {
            dense: true,
            experts: BTreeSet::new(),
        };
        assert_eq!(names(shards_for(&weights, &attention)), "a.safetensors b.safetensors");
    }

    #[test]
    fn only_the_files_the_worker_reads_are_model_files() {
        for name in [
            "config.json",
            "tokenizer.json",
            INDEX_FILE,
            "model-00001-of-00163.safetensors",
        ] {
            assert!(is_model_file(name), "{name}");
        }
        for name in [
            "README.md",
            "inference/model.py",
            "figures/x.png",
            "sub/x.safetensors",
            ".gitattributes",
        ] {
            assert!(!is_model_file(name), "{name}");
        }
    }
}
