//! Architecture variants that reuse DeepSeek-V3's modelling code, as transformers' `save_pretrained`
//! writes them (bf16, no MTP weights), against transformers' float32 logits
//! (`tests/golden/make_variants.py`): 64 routed experts in one group with 6 active, 384 in one
//! group with 8 active and 8 heads, no q LoRA with two leading dense layers and plain RoPE.

mod common;

use common::{golden_dir, load, max_abs_diff, Reference};
use dsv3_engine::{Chunk, KvCache, Outputs, StepOptions};

/// As for the golden tiny model (spec §11.4): float32 against float32.
const LOGIT_TOLERANCE: f32 = 1e-4;

#[test]
fn architecture_variants_match_transformers() {
    let dir = golden_dir().join("variants");
    let mut checked = Vec::new();
    for name in ["experts64-group1", "experts384-heads8", "no-q-lora-plain-rope"] {
        let (model, experts) = load(&dir.join(name));
        assert!(!model.has_mtp(), "{name}: save_pretrained writes no MTP weights");
        let reference = Reference::load(&format!("variants/{name}.ref.safetensors"));
        let (prompt, want) = (reference.ids("prompt_ids"), reference.f("logits"));
        let mut cache = KvCache::with_capacity(&model.config, 64);
        let (out, _) = model
            .forward(
                &[Chunk::new(1, 0, &prompt, Outputs::All)],
                &mut cache,
                &experts,
                &StepOptions::default(),
            )
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let diff = max_abs_diff(&out[0].logits, want);
        println!("{name}: max |Δlogit| = {diff:.3e}");
        assert!(diff < LOGIT_TOLERANCE, "{name}: logits differ by {diff}");
        checked.push((name, model.config.n_routed_experts, model.config.n_group));
    }
    assert_eq!(checked.len(), 3);
}
