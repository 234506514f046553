//! Self-consistency of the forward pass on a synthetic checkpoint: cache vs full forward,
//! absorbed vs naive MLA, batched vs alone, chunked prefill, and loader errors.

mod common;

use common::*;
use dsv3_engine::{Chunk, ExpertExecutor, KvCache, MlaForm, Outputs, StepOptions, TokenRoutes};

fn prompt(len: usize, salt: u32) -> Vec<u32> {
    (0..len as u32).map(|i| (i * 37 + salt * 101 + 5) % 1000 + 2).collect()
}

fn opts(mla: MlaForm) -> StepOptions {
    StepOptions { mla, trace: false }
}

#[test]
fn decode_through_cache_equals_full_forward_in_both_mla_forms() {
    let dir = tempfile::tempdir().expect("tmp");
    let (model, experts) = synthetic_model(dir.path(), false, 1);
    let tokens = prompt(12, 0);
    let mut cache = KvCache::with_capacity(&model.config, 64);
    let (full, _) = model
        .forward(
            &[Chunk::new(1, 0, &tokens, Outputs::All)],
            &mut cache,
            &experts,
            &opts(MlaForm::Naive),
        )
        .expect("full forward");
    for form in [MlaForm::Absorbed, MlaForm::Naive] {
        let mut cache = KvCache::with_capacity(&model.config, 64);
        // 5-token prefix, then one token at a time.
        let (prefix, _) = model
            .forward(
                &[Chunk::new(2, 0, &tokens[..5], Outputs::All)],
                &mut cache,
                &experts,
                &opts(form),
            )
            .expect("prefix");
        let mut logits = prefix[0].logits.clone();
        for p in 5..12 {
            let (step, _) = model
                .forward(
                    &[Chunk::new(2, p, &tokens[p..p + 1], Outputs::Last)],
                    &mut cache,
                    &experts,
                    &opts(form),
                )
                .expect("decode");
            logits.extend(&step[0].logits);
        }
        let diff = max_abs_diff(&full[0].logits, &logits);
        assert!(
            diff < 1e-4,
            "{form:?}: cached decode differs from the full forward by {diff}"
        );
    }
}

#[test]
fn a_batch_of_three_equals_each_alone() {
    let dir = tempfile::tempdir().expect("tmp");
    let (model, experts) = synthetic_model(dir.path(), true, 2);
    let prompts = [prompt(3, 1), prompt(9, 2), prompt(6, 3)];
    let mut alone = Vec::new();
    for p in &prompts {
        let mut cache = KvCache::with_capacity(&model.config, 64);
        let (out, _) = model
            .forward(
                &[Chunk::new(1, 0, p, Outputs::All)],
                &mut cache,
                &experts,
                &opts(MlaForm::Auto),
            )
            .expect("alone");
        alone.push(out[0].logits.clone());
    }
    let mut cache = KvCache::with_capacity(&model.config, 64);
    let chunks: Vec<Chunk> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| Chunk::new(i as u64 + 10, 0, p, Outputs::All))
        .collect();
    let (batched, _) = model
        .forward(&chunks, &mut cache, &experts, &opts(MlaForm::Auto))
        .expect("batch");
    for (i, (a, b)) in alone.iter().zip(&batched).enumerate() {
        let diff = max_abs_diff(a, &b.logits);
        assert!(diff < 1e-4, "sequence {i}: batched logits differ by {diff}");
    }
    // Mixed step: sequence 10 decodes while a new sequence prefills.
    let next = [7u32];
    let fresh = prompt(4, 9);
    let mixed = [
        Chunk::new(10, 3, &next, Outputs::Last),
        Chunk::new(20, 0, &fresh, Outputs::Last),
    ];
    let (out, _) = model
        .forward(&mixed, &mut cache, &experts, &opts(MlaForm::Auto))
        .expect("mixed");
    let mut solo_cache = KvCache::with_capacity(&model.config, 64);
    let mut seq = prompts[0].clone();
    seq.push(7);
    let (solo, _) = model
        .forward(
            &[Chunk::new(1, 0, &seq, Outputs::Last)],
            &mut solo_cache,
            &experts,
            &opts(MlaForm::Auto),
        )
        .expect("solo");
    assert!(max_abs_diff(&out[0].logits, &solo[0].logits) < 1e-4);
}

#[test]
fn chunked_prefill_equals_one_chunk() {
    let dir = tempfile::tempdir().expect("tmp");
    let (model, experts) = synthetic_model(dir.path(), false, 1);
    let tokens = prompt(20, 4);
    let mut cache = KvCache::with_capacity(&model.config, 64);
    let (whole, _) = model
        .forward(
            &[Chunk::new(1, 0, &tokens, Outputs::Last)],
            &mut cache,
            &experts,
            &opts(MlaForm::Auto),
        )
        .expect("whole");
    let mut cache = KvCache::with_capacity(&model.config, 64);
    let mut last = Vec::new();
    for (start, piece) in [(0, 7), (7, 14), (14, 20)] {
        let (out, _) = model
            .forward(
                &[Chunk::new(1, start, &tokens[start..piece], Outputs::Last)],
                &mut cache,
                &experts,
                &opts(MlaForm::Auto),
            )
            .expect("chunk");
        last = out[0].logits.clone();
    }
    assert!(max_abs_diff(&whole[0].logits, &last) < 1e-4);
}

#[test]
fn bad_steps_are_errors_not_panics() {
    let dir = tempfile::tempdir().expect("tmp");
    let (model, experts) = synthetic_model(dir.path(), false, 1);
    let mut cache = KvCache::with_capacity(&model.config, 32);
    let err = |chunks: &[Chunk], cache: &mut KvCache| {
        model
            .forward(chunks, cache, &experts, &StepOptions::default())
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default()
    };
    assert!(err(&[Chunk::new(1, 0, &[5000], Outputs::Last)], &mut cache).contains("token id 5000"));
    assert!(err(&[Chunk::new(1, 3, &[5], Outputs::Last)], &mut cache).contains("position 3"));
    assert!(err(&[Chunk::new(1, 250, &[5; 10], Outputs::Last)], &mut cache).contains("context"));
    assert!(err(&[Chunk::new(1, 0, &[5; 40], Outputs::Last)], &mut cache).contains("KV cache is full"));
    assert!(err(&[Chunk::new(1, 0, &[], Outputs::Last)], &mut cache).contains("empty"));
}

/// Experts that fail every call: a step that dies at its first MoE layer, after the dense
/// layers wrote their rows of the cache.
struct Unreachable;

impl ExpertExecutor for Unreachable {
    fn routed_experts(&self, layer: usize, _: &[f32], _: &TokenRoutes) -> anyhow::Result<Vec<f32>> {
        anyhow::bail!("the experts of layer {layer} do not answer")
    }
}

#[test]
fn a_step_that_fails_part_way_leaves_nothing_in_the_prefix_cache() {
    let dir = tempfile::tempdir().expect("tmp");
    let (model, experts) = synthetic_model(dir.path(), false, 1);
    let mut cache = KvCache::with_capacity(&model.config, 128);
    let block = cache.block_size();
    let tokens = prompt(2 * block + 3, 4);
    let step = |seq, experts: &dyn ExpertExecutor, cache: &mut KvCache| {
        model.forward(
            &[Chunk::new(seq, 0, &tokens, Outputs::Last)],
            cache,
            experts,
            &StepOptions::default(),
        )
    };
    let err = step(1, &Unreachable, &mut cache).expect_err("the experts fail");
    assert!(format!("{err:#}").contains("do not answer"), "{err:#}");
    assert_eq!(cache.seq_len(1), Some(0), "nothing of the failed step is kept");
    assert_eq!(
        cache.reuse_prefix(2, 0, &tokens, true),
        0,
        "nor offered to a later prompt"
    );
    cache.free_sequence(2);
    // The same prompt computed whole is offered, and the failed sequence can run again.
    let (whole, _) = step(1, experts_ref(&experts), &mut cache).expect("step");
    cache.free_sequence(1);
    assert_eq!(cache.reuse_prefix(3, 0, &tokens, true), 2 * block);
    assert_eq!(whole[0].logits.len(), model.config.vocab_size);
}

#[test]
fn broken_checkpoints_name_the_tensor_and_file() {
    let dir = tempfile::tempdir().expect("tmp");
    dsv3_engine::synthetic::write_checkpoint(dir.path(), &tiny_config(), true, 2, 3).expect("write");
    let files = dsv3_engine::ModelFiles::Dir(dir.path().to_path_buf());
    let load_err = || {
        dsv3_engine::Model::load(&files, |_| {})
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default()
    };

    // The index places a tensor the model loads in a file that is missing, or in one that
    // does not hold it. (A missing file holding nothing the model loads is no error: a rank's
    // directory holds only its own shards.)
    let index_path = dir.path().join("model.safetensors.index.json");
    let index = std::fs::read_to_string(&index_path).expect("index");
    let mut value: serde_json::Value = serde_json::from_str(&index).expect("json");
    value["weight_map"]["model.layers.9.bogus.weight"] = "model-00003-of-00002.safetensors".into();
    std::fs::write(&index_path, value.to_string()).expect("write");
    assert_eq!(load_err(), "", "a shard no loaded tensor lives in is not opened");
    let norm_file = value["weight_map"]["model.norm.weight"].clone();
    value["weight_map"]["model.norm.weight"] = "model-00003-of-00002.safetensors".into();
    std::fs::write(&index_path, value.to_string()).expect("write");
    let e = load_err();
    assert!(
        e.contains("model-00003-of-00002.safetensors") && e.contains("missing"),
        "{e}"
    );
    let holder = value["weight_map"]["model.embed_tokens.weight"]
        .as_str()
        .expect("file")
        .to_string();
    let elsewhere = if holder.contains("00001") {
        "model-00002-of-00002.safetensors"
    } else {
        "model-00001-of-00002.safetensors"
    };
    value["weight_map"]["model.norm.weight"] = norm_file;
    value["weight_map"]["model.embed_tokens.weight"] = elsewhere.into();
    std::fs::write(&index_path, value.to_string()).expect("write");
    let e = load_err();
    assert!(
        e.contains("model.embed_tokens.weight") && e.contains(elsewhere) && e.contains("does not hold it"),
        "{e}"
    );
    std::fs::write(&index_path, &index).expect("restore");

    // A truncated shard.
    let shard = dir.path().join("model-00002-of-00002.safetensors");
    let bytes = std::fs::read(&shard).expect("shard");
    std::fs::write(&shard, &bytes[..bytes.len() - 100]).expect("truncate");
    let e = load_err();
    assert!(
        e.contains("model-00002-of-00002.safetensors") && e.contains("truncated"),
        "{e}"
    );
    std::fs::write(&shard, &bytes).expect("restore");

    // A config whose shapes disagree with the tensors.
    let mut cfg = tiny_config();
    cfg["kv_lora_rank"] = 96.into();
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).expect("config");
    let e = load_err();
    assert!(e.contains("kv_a_proj_with_mqa") && e.contains("shape"), "{e}");

    // A missing key in config.json.
    let mut cfg = tiny_config();
    cfg.as_object_mut().expect("object").remove("hidden_size");
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).expect("config");
    assert!(load_err().contains("`hidden_size`"));
}

#[test]
fn an_expert_shard_holds_only_its_experts() {
    let dir = tempfile::tempdir().expect("tmp");
    let (model, all) = synthetic_model(dir.path(), true, 2);
    let ckpt = dsv3_engine::Checkpoint::open(&dsv3_engine::ModelFiles::Dir(dir.path().to_path_buf())).expect("open");
    let shard = dsv3_engine::LocalExperts::load(
        &ckpt,
        &model.config,
        &dsv3_engine::ExpertSelection::Only(vec![0, 5]),
        |_| {},
    )
    .expect("shard");
    assert!(shard.expert(2, 0).is_some() && shard.expert(3, 5).is_some());
    assert!(shard.expert(2, 1).is_none());
    assert!(shard.weight_bytes() * 8 == all.weight_bytes(), "2 of 16 experts");
    let h = model.config.hidden_size;
    let x = vec![0.1f32; h];
    let routes = dsv3_engine::TokenRoutes {
        k: 2,
        experts: vec![0, 5],
        weights: vec![0.5, 0.5],
    };
    use dsv3_engine::ExpertExecutor;
    let y = shard.routed_experts(2, &x, &routes).expect("held experts");
    let y_all = all.routed_experts(2, &x, &routes).expect("all experts");
    assert_eq!(y, y_all);
    let missing = dsv3_engine::TokenRoutes {
        k: 2,
        experts: vec![0, 7],
        weights: vec![0.5, 0.5],
    };
    let e = format!(
        "{:#}",
        shard
            .routed_experts(2, &x, &missing)
            .expect_err("expert 7 is elsewhere")
    );
    assert!(e.contains("routed expert 7 of layer 2"), "{e}");
}
