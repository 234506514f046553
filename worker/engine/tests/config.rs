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
