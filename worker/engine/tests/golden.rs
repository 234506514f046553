//! The engine against references computed by Hugging Face transformers in fp32
//! (tests/golden/make_fixtures.py): every position's logits, per-layer hidden states, routing,
//! greedy tokens, the FP8 copy and the MTP head.

mod common;

use common::*;
use dsv3_engine::{
    Chunk, Engine, EngineOptions, GenerateRequest, KvCache, MlaForm, ModelFiles, Outputs, SamplingParams, StepOptions,
};

/// Logits within this of the fp32 reference (issue requirement: 2e-3).
const LOGIT_TOLERANCE: f32 = 2e-3;

fn check_model(dir: &str, reference: &str) {
    let (model, experts) = load(&golden_dir().join(dir));
    let r = Reference::load(reference);
    let prompt = r.ids("prompt_ids");
    let t = prompt.len();
    let h = model.config.hidden_size;
    let v = model.config.vocab_size;

    for form in [MlaForm::Naive, MlaForm::Absorbed] {
        let mut cache = KvCache::with_capacity(&model.config, 64);
        let (out, trace) = model
            .forward(
                &[Chunk::new(1, 0, &prompt, Outputs::All)],
                &mut cache,
                &experts,
                &StepOptions { mla: form, trace: true },
            )
            .expect("forward");
        let diff = max_abs_diff(&out[0].logits, r.f("logits"));
        println!("{dir} {form:?}: max |Δlogit| over {t} positions = {diff:.3e}");
        assert!(
            diff < LOGIT_TOLERANCE,
            "{dir} {form:?}: logits differ from the reference by {diff}"
        );
        let trace = trace.expect("trace");
        let ref_hidden = r.f("hidden_states");
        // HF's hidden_states: index 0 = embeddings, 1..L-1 after each layer, L after the final norm.
        for (l, ours) in trace.hidden.iter().enumerate().take(model.config.num_hidden_layers) {
            let diff = max_abs_diff(ours, &ref_hidden[l * t * h..(l + 1) * t * h]);
            let scale = ours.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            assert!(
                diff <= 1e-4 * scale.max(1.0),
                "{dir}: hidden state {l} differs by {diff} (scale {scale})"
            );
        }
        let last = model.config.num_hidden_layers;
        assert!(max_abs_diff(&out[0].hidden, &ref_hidden[last * t * h..(last + 1) * t * h]) < 1e-4);
        for (&layer, routes) in &trace.routes {
            let expected = r.ids(&format!("topk_ids.{layer}"));
            assert_eq!(routes.experts, expected, "{dir}: experts chosen in layer {layer}");
            let logits = &trace.router_logits[&layer];
            assert!(max_abs_diff(logits, r.f(&format!("router_logits.{layer}"))) < 1e-4);
        }
    }
    assert_eq!(r.f("logits").len(), t * v);

    // Prefill 7 then decode the rest through the cache.
    let mut cache = KvCache::with_capacity(&model.config, 64);
    let (first, _) = model
        .forward(
            &[Chunk::new(1, 0, &prompt[..7], Outputs::All)],
            &mut cache,
            &experts,
            &StepOptions::default(),
        )
        .expect("prefix");
    let mut logits = first[0].logits.clone();
    for p in 7..t {
        let (step, _) = model
            .forward(
                &[Chunk::new(1, p, &prompt[p..p + 1], Outputs::Last)],
                &mut cache,
                &experts,
                &StepOptions::default(),
            )
            .expect("decode");
        logits.extend(&step[0].logits);
    }
    let diff = max_abs_diff(&logits, r.f("cached_logits"));
    println!("{dir}: cached decode vs reference = {diff:.3e}");
    assert!(diff < LOGIT_TOLERANCE);
}

#[test]
fn bf16_model_matches_transformers() {
    check_model("tiny-bf16", "tiny-bf16.ref.safetensors");
}

#[test]
fn fp8_copy_matches_its_dequantised_reference() {
    check_model("tiny-fp8", "tiny-fp8.ref.safetensors");
}

#[test]
fn greedy_tokens_equal_the_reference() {
    for (dir, reference) in [
        ("tiny-bf16", "tiny-bf16.ref.safetensors"),
        ("tiny-fp8", "tiny-fp8.ref.safetensors"),
    ] {
        let r = Reference::load(reference);
        let files = ModelFiles::Dir(golden_dir().join(dir));
        let mut engine = Engine::load(&files, EngineOptions::default(), &mut |_| {}).expect("engine");
        let expected = r.ids("greedy_ids");
        let params = SamplingParams {
            max_tokens: expected.len(),
            ignore_eos: true,
            seed: Some(0),
            ..Default::default()
        };
        let out = engine
            .generate(&[GenerateRequest {
                prompt: r.ids("prompt_ids"),
                params,
            }])
            .expect("generate")
            .pop()
            .flatten()
            .expect("output");
        assert_eq!(
            out.tokens,
            expected,
            "{dir}: greedy tokens (smallest margin {})",
            r.f("greedy_margins").iter().fold(f32::MAX, |a, &b| a.min(b))
        );
        let v = engine.config().vocab_size;
        let t = r.ids("prompt_ids").len();
        let diff = max_abs_diff(&out.prompt_last_logits, &r.f("logits")[(t - 1) * v..t * v]);
        assert!(diff < LOGIT_TOLERANCE, "{dir}: prompt_last_logits differ by {diff}");
    }
}

#[test]
fn mtp_head_matches_its_reference() {
    for (dir, reference) in [
        ("tiny-bf16", "tiny-bf16.ref.safetensors"),
        ("tiny-fp8", "tiny-fp8.ref.safetensors"),
    ] {
        let (model, experts) = load(&golden_dir().join(dir));
        assert!(model.has_mtp(), "{dir} has an MTP layer");
        let r = Reference::load(reference);
        let prompt = r.ids("prompt_ids");
        let t = prompt.len();
        let mut cache = KvCache::with_capacity(&model.config, 64);
        let (main, _) = model
            .forward(
                &[Chunk::new(1, 0, &prompt, Outputs::All)],
                &mut cache,
                &experts,
                &StepOptions::default(),
            )
            .expect("main");
        let h = model.config.hidden_size;
        let mut chunk = Chunk::new(1, 0, &prompt[1..], Outputs::All);
        chunk.prev_hidden = Some(&main[0].hidden[..(t - 1) * h]);
        let out = model
            .mtp_forward(&[chunk], &mut cache, &experts, &StepOptions::default())
            .expect("mtp");
        let diff = max_abs_diff(&out[0].logits, r.f("mtp_logits"));
        println!("{dir}: MTP max |Δlogit| = {diff:.3e}");
        assert!(diff < LOGIT_TOLERANCE, "{dir}: MTP logits differ by {diff}");
    }
}
