//! Both config.json dialects, derived constants, and errors that name the key.

mod common;

use common::golden_dir;
use dsv3_engine::rope::{softmax_scale, Rope};
use dsv3_engine::ModelConfig;

fn hub() -> ModelConfig {
    ModelConfig::from_file(&golden_dir().join("tiny-bf16/config.json")).expect("hub dialect")
}

#[test]
fn hub_and_transformers5_dialects_agree() {
    let hub = hub();
    let v5 =
        ModelConfig::from_file(&golden_dir().join("config-rope-parameters.json")).expect("rope_parameters dialect");
    assert_eq!(hub.rope, v5.rope);
    assert_eq!(hub, v5);
    let yarn = hub.rope.yarn.as_ref().expect("YaRN active");
    assert_eq!((yarn.factor, yarn.original_max_position_embeddings), (4.0, 64));
    assert_eq!(hub.q_lora_rank, Some(256));
    assert!(!hub.is_moe_layer(1) && hub.is_moe_layer(2) && hub.is_moe_layer(3));
    assert_eq!(hub.kv_cache_width(), 160);
}

#[test]
fn derived_constants_of_the_tiny_config() {
    // spec §11.1: softmax scale 96^-1/2 · (0.1 ln 4 + 1)², ramp low = 0, high = 5.
    let cfg = hub();
    assert!((softmax_scale(&cfg) as f64 - 0.13232112898211335).abs() < 1e-7);
    let rope = Rope::new(&cfg);
    let f = rope.inv_freq();
    assert_eq!(f.len(), 16);
    let base = |j: usize| 10000f64.powf(-(2.0 * j as f64) / 32.0);
    // j = 0 keeps its frequency, j >= 5 is divided by the factor, j = 2 blends with ramp 2/5.
    let expected = [
        (0, base(0)),
        (2, base(2) * (0.6 + 0.4 / 4.0)),
        (5, base(5) / 4.0),
        (15, base(15) / 4.0),
    ];
    for (j, want) in expected {
        assert!(
            (f[j] as f64 - want).abs() <= 1e-6 * want,
            "inv_freq[{j}] = {}, expected {want}",
            f[j]
        );
    }
}

#[test]
fn missing_and_invalid_keys_are_named() {
    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden_dir().join("tiny-bf16/config.json")).expect("read"))
            .expect("json");
    let err = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut v = base.clone();
        edit(&mut v);
        format!(
            "{:#}",
            ModelConfig::from_json_str(&v.to_string()).expect_err("must fail")
        )
    };
    assert!(err(&|v| {
        v.as_object_mut().expect("obj").remove("kv_lora_rank");
    })
    .contains("`kv_lora_rank` is missing"));
    assert!(err(&|v| v["hidden_size"] = "big".into()).contains("`hidden_size` must be a non-negative integer"));
    assert!(err(&|v| v["n_group"] = 3.into()).contains("`n_routed_experts` (16) must be a multiple of `n_group` (3)"));
    assert!(err(&|v| v["topk_group"] = 9.into()).contains("topk_group"));
    assert!(err(&|v| v["scoring_func"] = "softmax".into()).contains("scoring_func"));
    assert!(err(&|v| v["rope_scaling"]["type"] = "dynamic".into()).contains("rope_scaling"));
    assert!(err(&|v| {
        v["rope_scaling"].as_object_mut().expect("obj").remove("factor");
    })
    .contains("factor"));
    assert!(err(&|v| v["quantization_config"] = serde_json::json!({"quant_method": "awq"})).contains("quant_method"));
    // Static activation scales would need `input_scale` tensors; an unknown scale format would be
    // applied as amax / 448.
    assert!(
        err(&|v| v["quantization_config"]["activation_scheme"] = "static".into())
            .contains("`quantization_config.activation_scheme` `static` is not supported")
    );
    assert!(err(&|v| v["quantization_config"]["scale_fmt"] = "e8m0".into())
        .contains("`quantization_config.scale_fmt` `e8m0` is not supported"));
    assert!(ModelConfig::from_json_str("{not json").is_err());
}

/// A checkpoint whose config announces the MTP module but that carries none of its weights (as
/// transformers' `save_pretrained` writes fine-tunes) loads and generates what the full
/// checkpoint generates, without MTP.
#[test]
fn a_checkpoint_without_its_mtp_weights_is_served_without_mtp() {
    use dsv3_engine::{Engine, EngineOptions, GenerateRequest, ModelFiles, SamplingParams};
    let full = golden_dir().join("tiny-fp8");
    let dir = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(&full).expect("read dir") {
        let path = entry.expect("entry").path();
        let name = path.file_name().expect("name").to_owned();
        if name != "model.safetensors.index.json" {
            std::fs::copy(&path, dir.path().join(&name)).expect("copy");
        }
    }
    // The shards stay as they are; the index no longer names the MTP layer's tensors.
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(full.join("model.safetensors.index.json")).expect("index"))
            .expect("json");
    let mtp = format!("model.layers.{}.", hub().num_hidden_layers);
    let mut trimmed = index.clone();
    let map = trimmed["weight_map"].as_object_mut().expect("weight_map");
    let before = map.len();
    map.retain(|name, _| !name.starts_with(&mtp));
    assert!(map.len() < before, "the tiny checkpoint has MTP weights to drop");
    std::fs::write(dir.path().join("model.safetensors.index.json"), trimmed.to_string()).expect("write");

    let without = ModelFiles::Dir(dir.path().to_path_buf());
    let config = ModelConfig::from_model_files(&without).expect("config");
    assert_eq!(config.num_nextn_predict_layers, 0);
    let request = GenerateRequest {
        prompt: vec![0, 5, 77, 300, 12],
        params: SamplingParams {
            max_tokens: 8,
            ignore_eos: true,
            ..SamplingParams::default()
        },
    };
    let generate = |files: &ModelFiles| {
        let mut engine = Engine::load(files, EngineOptions::default(), &mut |_| {}).expect("load");
        engine.generate(std::slice::from_ref(&request)).expect("generate")[0]
            .as_ref()
            .expect("output")
            .tokens
            .clone()
    };
    assert_eq!(generate(&without), generate(&ModelFiles::Dir(full)));
}

#[test]
fn a_directory_without_weights_keeps_the_configs_mtp_module() {
    // The router's view of a single-file checkpoint: the config and tokenizer, no weights. There
    // is nothing to probe, so the config stands (the ranks report what they loaded).
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(
        golden_dir().join("tiny-fp8").join("config.json"),
        dir.path().join("config.json"),
    )
    .expect("copy");
    let config = ModelConfig::from_model_files(&dsv3_engine::ModelFiles::Dir(dir.path().to_path_buf()))
        .expect("a config without weights beside it");
    let written = ModelConfig::from_file(&dir.path().join("config.json")).expect("config");
    assert_eq!(config.num_nextn_predict_layers, written.num_nextn_predict_layers);
    assert!(
        config.num_nextn_predict_layers > 0,
        "the tiny config announces the MTP module"
    );
}
