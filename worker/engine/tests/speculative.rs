//! Speculative decoding with the MTP module: drafts come from the MTP module over the whole
//! prompt (checked against transformers' MTP logits), and output with drafts is token for token
//! the output without them, whether drafts are accepted or rolled back.

mod common;

use common::{golden_dir, Reference};
use dsv3_engine::{
    speculative_step, CpuBackend, Drafting, Engine, EngineOptions, GenerateRequest, LocalExperts, LogitRules,
    ModelFiles, SamplingParams, SpecChunk, StepBackend, TokenChoice, TokenPick,
};

fn engine(dir: &str, speculative_tokens: usize, max_step_tokens: usize) -> Engine {
    let options = EngineOptions {
        cache_tokens: 1024,
        max_step_tokens,
        speculative_tokens,
        ..EngineOptions::default()
    };
    Engine::load(&ModelFiles::Dir(golden_dir().join(dir)), options, &mut |_| {}).expect("load")
}

fn greedy(n: usize) -> Vec<TokenPick> {
    vec![TokenPick::plain(TokenChoice::GREEDY); n]
}

#[test]
fn drafts_come_from_the_mtp_module_over_the_whole_prompt() {
    for (dir, refs) in [
        ("tiny-bf16", "tiny-bf16.ref.safetensors"),
        ("tiny-fp8", "tiny-fp8.ref.safetensors"),
    ] {
        let reference = Reference::load(refs);
        let (ids, mtp_logits) = (reference.ids("prompt_ids"), reference.f("mtp_logits"));
        let vocab = 1024;
        let mut engine = engine(dir, 1, 64);
        let backend: &mut CpuBackend<LocalExperts> = &mut engine.backend;
        // Prompt ids[..11] in chunks of 4, 4 and 3 (the MTP module's input at a chunk's last
        // position waits for the next chunk); the pick is forced to ids[11], so the MTP module
        // sees exactly transformers' inputs and its last row is `mtp_logits[10]`.
        let prompt = &ids[..11];
        let mut drafting = Drafting::default();
        let mut start = 0;
        for len in [4, 4, 3] {
            let last = start + len == prompt.len();
            let picks = last.then(|| {
                let mut forced = greedy(1);
                forced[0].edits = vec![dsv3_engine::LogitEdit {
                    token: ids[11],
                    bias: 100.0,
                    repetition: 1.0,
                    add: 0.0,
                }];
                forced
            });
            let chunk = SpecChunk {
                seq: 1,
                start,
                tokens: &prompt[start..start + len],
                drafts: vec![],
                picks,
                draft_depth: 1,
                logits: false,
            };
            let out = speculative_step(backend, &[chunk], &mut [&mut drafting], None).expect("step");
            if last {
                let outcome = out[0].as_ref().expect("sampled");
                assert_eq!(outcome.tokens[0].token, ids[11]);
            }
            start += len;
        }
        let expected = dsv3_engine::sampling::argmax(&mtp_logits[10 * vocab..11 * vocab]);
        assert_eq!(drafting.drafts_for(11, &[ids[11]], 4), [expected], "{dir}");
        // Drafts are only for the step they were made for.
        assert!(drafting.drafts_for(11, &[ids[10]], 4).is_empty());
        assert!(drafting.drafts_for(12, &[ids[11]], 4).is_empty());
    }
}

fn requests() -> Vec<GenerateRequest> {
    let prompts: [&[u32]; 3] = [
        &[683, 13, 615, 533, 2, 222, 561, 256, 453, 312, 692, 298],
        &[41, 74, 989],
        &[
            5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26,
        ],
    ];
    let mut requests = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        requests.push(GenerateRequest {
            prompt: p.to_vec(),
            params: SamplingParams {
                max_tokens: 20,
                ignore_eos: true,
                ..SamplingParams::default()
            },
        });
        requests.push(GenerateRequest {
            prompt: p.to_vec(),
            params: SamplingParams {
                temperature: 0.9,
                top_p: 0.95,
                top_k: 50,
                seed: Some(7 + i as u64),
                max_tokens: 20,
                rules: LogitRules {
                    frequency_penalty: 0.5,
                    repetition_penalty: 1.2,
                    ..LogitRules::default()
                },
                ..SamplingParams::default()
            },
        });
    }
    requests
}

#[test]
fn output_with_drafts_is_the_output_without_them() {
    for dir in ["tiny-fp8", "tiny-bf16"] {
        let plain = engine(dir, 0, 16).generate(&requests()).expect("plain");
        for depth in [1, 3] {
            let mut spec = engine(dir, depth, 16);
            let out = spec.generate(&requests()).expect("speculative");
            for (i, (a, b)) in plain.iter().zip(&out).enumerate() {
                let (a, b) = (
                    a.as_ref().expect("plain output"),
                    b.as_ref().expect("speculative output"),
                );
                assert_eq!(a.tokens, b.tokens, "{dir}, {depth} drafts, request {i}");
                assert_eq!(a.finish, b.finish);
                // The same logits, up to the head's product order over a different row count.
                let diff = common::max_abs_diff(&a.prompt_last_logits, &b.prompt_last_logits);
                assert!(diff < 1e-4, "prompt logits differ by {diff}");
            }
            assert_eq!(
                spec.backend.cache.used_blocks(),
                0,
                "every block back after the requests"
            );
        }
    }
}

#[test]
fn accepted_drafts_advance_several_tokens_and_rejected_ones_are_rolled_back() {
    let prompt: Vec<u32> = vec![683, 13, 615, 533, 2, 222, 561, 256];
    let request = GenerateRequest {
        prompt: prompt.clone(),
        params: SamplingParams {
            max_tokens: 24,
            ignore_eos: true,
            ..SamplingParams::default()
        },
    };
    let expected = engine("tiny-fp8", 0, 64).generate(&[request]).expect("plain")[0]
        .clone()
        .expect("output")
        .tokens;
    // Drafts from an oracle that knows the output: all three right on even steps, the third
    // wrong on odd ones.
    let mut engine = engine("tiny-fp8", 3, 64);
    let backend = &mut engine.backend;
    let mut drafting = Drafting::default();
    let (mut output, mut steps, mut accepted) = (Vec::new(), 0, Vec::new());
    let mut cached = 0;
    while output.len() < expected.len() {
        let tokens: Vec<u32> = if output.is_empty() {
            prompt.clone()
        } else {
            vec![*output.last().expect("output")]
        };
        let drafts = if output.is_empty() {
            vec![]
        } else {
            let mut d: Vec<u32> = expected[output.len()..].iter().take(3).copied().collect();
            if steps % 2 == 1 && d.len() == 3 {
                d[2] = (d[2] + 1) % 1000;
            }
            drafting.set_drafts(cached, tokens[0], d.clone());
            drafting.drafts_for(cached, &tokens, 3).to_vec()
        };
        let chunk = SpecChunk {
            seq: 1,
            start: cached,
            tokens: &tokens,
            drafts: drafts.clone(),
            picks: Some(greedy(drafts.len() + 1)),
            draft_depth: 3,
            logits: false,
        };
        let out = speculative_step(backend, &[chunk], &mut [&mut drafting], None).expect("step");
        let outcome = out[0].clone().expect("sampled");
        cached += tokens.len() + outcome.accepted;
        assert_eq!(
            backend.cache.seq_len(1),
            Some(cached),
            "rejected drafts leave the cache"
        );
        accepted.push((outcome.drafted, outcome.accepted));
        output.extend(outcome.tokens.iter().map(|p| p.token));
        steps += 1;
    }
    output.truncate(expected.len());
    assert_eq!(output, expected);
    assert!(accepted.contains(&(3, 3)) && accepted.contains(&(3, 2)), "{accepted:?}");
    assert!(
        steps < expected.len() / 2,
        "{steps} steps for {} tokens",
        expected.len()
    );
}

#[test]
fn speculation_without_an_mtp_module_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    dsv3_engine::synthetic::write_checkpoint(dir.path(), &common::tiny_config(), false, 1, 3).expect("write");
    let options = EngineOptions {
        speculative_tokens: 2,
        ..EngineOptions::default()
    };
    let mut engine = Engine::load(&ModelFiles::Dir(dir.path().to_path_buf()), options, &mut |_| {}).expect("load");
    assert!(!engine.backend.has_mtp());
    let err = engine
        .generate(&[GenerateRequest {
            prompt: vec![1, 2, 3],
            params: SamplingParams::default(),
        }])
        .unwrap_err();
    assert!(err.to_string().contains("MTP"), "{err}");
}
