//! The scheduler with a real attention rank (the CPU engine on the tiny model): seeded, sampled
//! requests preempted for cache room and prefilled again give the tokens an undisturbed run gives,
//! so the rank honours `generated_before` in the sampling spec the scheduler sends it.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dsv3_api::{Backend, GenerationEvent, GenerationRequest};
use dsv3_engine::{Checkpoint, CpuBackend, LocalExperts, Model, ModelConfig, ModelFiles, SamplingParams};
use dsv3_fleet::{AttentionRank, Fleet, LocalAttention, SchedulerConfig};

fn tiny() -> ModelFiles {
    ModelFiles::Dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden/tiny-fp8"))
}

fn tiny_rank(cache_tokens: usize) -> Arc<dyn AttentionRank> {
    let files = tiny();
    let model = Model::load(&files, |_| {}).expect("model");
    let ckpt = Checkpoint::open(&files).expect("checkpoint");
    let experts = LocalExperts::load(&ckpt, &model.config, &Default::default(), |_| {}).expect("experts");
    let bytes = experts.weight_bytes();
    let backend = CpuBackend::new(model, Arc::new(experts), bytes, cache_tokens, 16);
    Arc::new(LocalAttention::new(0, Box::new(backend), None))
}

fn fleet(cache_tokens: usize) -> Arc<Fleet> {
    let rank = tiny_rank(cache_tokens);
    let config = SchedulerConfig {
        max_waiting: 16,
        max_step_tokens: 256,
        probe_interval: Duration::from_millis(20),
    };
    let model_config = ModelConfig::from_model_files(&tiny()).expect("config");
    let fleet = Fleet::start(model_config, vec![rank], config);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !fleet.health().ready {
        assert!(Instant::now() < deadline, "the fleet did not become ready");
        std::thread::sleep(Duration::from_millis(5));
    }
    fleet
}

/// Sampled tokens of three seeded requests submitted together.
fn run(fleet: &Fleet) -> Vec<Vec<u32>> {
    let receivers: Vec<_> = (0..3u32)
        .map(|i| {
            let request = GenerationRequest {
                prompt: (0..20).map(|t| 2 + (t * 37 + i * 101) % 900).collect(),
                params: SamplingParams {
                    temperature: 1.0,
                    top_p: 0.9,
                    seed: Some(7 + i as u64),
                    max_tokens: 40,
                    ignore_eos: true,
                    ..SamplingParams::default()
                },
                logprobs: None,
            };
            fleet.submit(request).expect("submit")
        })
        .collect();
    receivers
        .into_iter()
        .map(|mut rx| {
            let mut tokens = Vec::new();
            while let Some(event) = rx.blocking_recv() {
                match event {
                    GenerationEvent::Token { id, .. } => tokens.push(id),
                    GenerationEvent::Failed { message } => panic!("failed: {message}"),
                    GenerationEvent::Scheduled | GenerationEvent::Finished { .. } => {}
                }
            }
            tokens
        })
        .collect()
}

#[test]
fn preempted_seeded_requests_keep_their_tokens() {
    let undisturbed = run(&fleet(4096));
    assert!(undisturbed.iter().all(|t| t.len() == 40));
    // 96 positions: the three sequences (20 + 40 each) cannot all grow at once.
    let small = fleet(96);
    let preempted = run(&small);
    let preemptions = small.stats().scheduler.preemptions;
    assert!(preemptions > 0, "the small cache should have forced preemptions");
    assert_eq!(preempted, undisturbed, "after {preemptions} preemptions");
}
