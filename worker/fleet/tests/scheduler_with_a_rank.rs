//! The scheduler with a real attention rank (the CPU engine on the tiny model):
//! - seeded, sampled requests preempted for cache room and prefilled again give the tokens an
//!   undisturbed run gives (the rank honours `generated_before`);
//! - the logit rules (penalties, bias, min_tokens) the rank applies give what the engine's own
//!   generation loop gives, preempted or not;
//! - structured output fits its schema, preempted or not, and a grammar the rank cannot hold
//!   fails its request visibly;
//! - a resent prefix is taken from the prefix cache and changes no token, and with several ranks
//!   a prompt goes to the rank that holds its prefix unless that rank has no room;
//! - speculative decoding with the MTP module changes no token, preempted or not, and the rank
//!   reports its drafts;
//! - an expert with no live copy ends (or, masked, degrades) only the sequences routed to it,
//!   and what they computed without it is never taken from the prefix cache.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dsv3_api::{Backend, GenerationEvent, GenerationRequest};
use dsv3_engine::batch::{generate, BatchOptions};
use dsv3_engine::{
    Checkpoint, CpuBackend, GenerateRequest, LocalExperts, LogitRules, Model, ModelConfig, ModelFiles, OutputGrammar,
    SamplingParams, StepBackend,
};
use dsv3_engine::{ExpertExecutor, TokenRoutes};
use dsv3_fleet::{AttentionRank, ExpertBackend, Fleet, LocalAttention, SchedulerConfig, UnservedRows};
use std::sync::Mutex;

fn tiny() -> ModelFiles {
    ModelFiles::Dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden/tiny-fp8"))
}

fn tiny_backend(cache_tokens: usize) -> CpuBackend<LocalExperts> {
    let files = tiny();
    let model = Model::load(&files, |_| {}).expect("model");
    let ckpt = Checkpoint::open(&files).expect("checkpoint");
    let experts = LocalExperts::load(&ckpt, &model.config, &Default::default(), |_| {}).expect("experts");
    let bytes = experts.weight_bytes();
    CpuBackend::new(model, Arc::new(experts), bytes, cache_tokens, 16)
}

fn tiny_tokenizer() -> dsv3_text::Tokenizer {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden/tiny-fp8");
    dsv3_text::Tokenizer::from_model_dir(&dir)
        .expect("tokenizer")
        .expect("the tiny model has a tokenizer")
}

fn tiny_rank(cache_tokens: usize, speculative_tokens: usize) -> Arc<LocalAttention> {
    let backend = tiny_backend(cache_tokens);
    let config = backend.config().clone();
    let grammars =
        dsv3_grammar::Grammars::new(&tiny_tokenizer(), config.vocab_size, config.eos_token_ids[0]).expect("grammars");
    Arc::new(
        LocalAttention::new(0, Box::new(backend), None)
            .with_grammars(grammars)
            .with_speculative_tokens(speculative_tokens)
            .expect("the tiny model has an MTP module"),
    )
}

fn fleet(cache_tokens: usize) -> Arc<Fleet> {
    fleet_stepping(cache_tokens, 256)
}

fn fleet_stepping(cache_tokens: usize, max_step_tokens: usize) -> Arc<Fleet> {
    fleet_with_rank(tiny_rank(cache_tokens, 0), max_step_tokens)
}

fn fleet_with_rank(rank: Arc<LocalAttention>, max_step_tokens: usize) -> Arc<Fleet> {
    fleet_with_ranks(vec![rank], max_step_tokens)
}

fn fleet_with_ranks(ranks: Vec<Arc<LocalAttention>>, max_step_tokens: usize) -> Arc<Fleet> {
    let ranks: Vec<Arc<dyn AttentionRank>> = ranks.into_iter().map(|r| r as Arc<dyn AttentionRank>).collect();
    let config = SchedulerConfig {
        max_waiting: 16,
        max_step_tokens,
        probe_interval: Duration::from_millis(20),
        ..SchedulerConfig::default()
    };
    let model_config = ModelConfig::from_model_files(&tiny()).expect("config");
    let fleet = Fleet::start(model_config, ranks, config);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !fleet.health().ready {
        assert!(Instant::now() < deadline, "the fleet did not become ready");
        std::thread::sleep(Duration::from_millis(5));
    }
    fleet
}

/// Three seeded requests: sampled, or greedy; with `rules`.
fn requests(temperature: f32, rules: &LogitRules) -> Vec<GenerateRequest> {
    (0..3u32)
        .map(|i| GenerateRequest {
            prompt: (0..20).map(|t| 2 + (t * 37 + i * 101) % 900).collect(),
            params: SamplingParams {
                temperature,
                top_p: 0.9,
                seed: Some(7 + i as u64),
                max_tokens: 40,
                ignore_eos: true,
                rules: rules.clone(),
                ..SamplingParams::default()
            },
        })
        .collect()
}

/// Sampled tokens of three seeded requests submitted together.
fn run(fleet: &Fleet) -> Vec<Vec<u32>> {
    run_requests(fleet, requests(1.0, &LogitRules::default()))
}

fn run_requests(fleet: &Fleet, requests: Vec<GenerateRequest>) -> Vec<Vec<u32>> {
    try_requests(fleet, requests)
        .into_iter()
        .map(|r| r.unwrap_or_else(|message| panic!("failed: {message}")))
        .collect()
}

/// The tokens of each request, submitted together: Ok, or the error that ended it.
fn try_requests(fleet: &Fleet, requests: Vec<GenerateRequest>) -> Vec<Result<Vec<u32>, String>> {
    let receivers: Vec<_> = requests
        .into_iter()
        .map(|r| {
            let request = GenerationRequest {
                prompt: r.prompt,
                params: r.params,
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
                    GenerationEvent::Failed { message } => return Err(message),
                    GenerationEvent::Scheduled
                    | GenerationEvent::Cached { .. }
                    | GenerationEvent::ExpertsMasked { .. }
                    | GenerationEvent::Finished { .. } => {}
                }
            }
            Ok(tokens)
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

/// Rules that change almost every pick of the tiny model: strong penalties, a bias that bans one
/// token and favours another, and `min_tokens` over a stop id the model would choose first.
fn strong_rules(stop_first: u32) -> LogitRules {
    LogitRules {
        presence_penalty: 1.5,
        frequency_penalty: 2.0,
        repetition_penalty: 1.8,
        logit_bias: vec![(5, 3.0), (stop_first, -100.0)],
        min_tokens: 12,
    }
}

#[test]
fn logit_rules_through_the_fleet_match_the_engine_loop() {
    let engine = |requests: &[GenerateRequest]| -> Vec<Vec<u32>> {
        let mut backend = tiny_backend(4096);
        let options = BatchOptions {
            max_step_tokens: 256,
            vocab_limit: None,
            speculative_tokens: 0,
        };
        generate(&mut backend, requests, &options)
            .expect("generate")
            .into_iter()
            .map(|o| o.expect("output").tokens)
            .collect()
    };
    for temperature in [0.0, 1.0] {
        let plain = engine(&requests(temperature, &LogitRules::default()));
        let rules = strong_rules(plain[0][0]);
        let mut with_rules = requests(temperature, &rules);
        // min_tokens bans the stop ids (the first request's first plain token) until 12 tokens.
        for r in &mut with_rules {
            r.params.stop_token_ids = vec![plain[0][1]];
        }
        let want = engine(&with_rules);
        assert_ne!(want, plain, "the rules should change the tokens");
        assert!(want.iter().all(|t| t.len() >= 12), "min_tokens: {want:?}");
        let distinct = |tokens: &[Vec<u32>]| {
            tokens
                .iter()
                .map(|t| t.iter().collect::<std::collections::HashSet<_>>().len())
                .sum::<usize>()
        };
        if temperature == 0.0 {
            assert!(
                distinct(&want) > distinct(&plain),
                "penalties should spread greedy output"
            );
        }
        let fleet_tokens = run_requests(&fleet(4096), with_rules.clone());
        assert_eq!(fleet_tokens, want, "through the fleet at temperature {temperature}");
        let small = fleet(96);
        let preempted = run_requests(&small, with_rules);
        assert!(small.stats().scheduler.preemptions > 0);
        assert_eq!(preempted, want, "preempted, at temperature {temperature}");
    }
}

#[test]
fn structured_output_fits_its_schema_preempted_or_not() {
    let schema = r#"{"type": "object", "properties": {"ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 999}, "tag": {"enum": ["red", "green", "blue"]}},
        "required": ["ok", "n", "tag"], "additionalProperties": false}"#;
    let constrained: Vec<GenerateRequest> = requests(1.0, &LogitRules::default())
        .into_iter()
        .map(|mut r| {
            r.params.grammar = Some(OutputGrammar::JsonSchema(schema.into()));
            r.params.ignore_eos = false;
            r
        })
        .collect();
    let tokenizer = tiny_tokenizer();
    let undisturbed = run_requests(&fleet(4096), constrained.clone());
    for tokens in &undisturbed {
        let text = tokenizer.decode(tokens, true).expect("decode");
        let value: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
        assert!(
            value["ok"].is_boolean() && value["n"].as_u64().is_some_and(|n| n <= 999),
            "{text}"
        );
        assert!(
            ["red", "green", "blue"].contains(&value["tag"].as_str().unwrap_or("")),
            "{text}"
        );
    }
    // Caches that hold every prompt but not every sequence grown (about 50 positions each):
    // which sequence is preempted when depends on timing, so several sizes are run.
    let mut preemptions = 0;
    for cache in [64, 80, 96, 112] {
        let small = fleet(cache);
        assert_eq!(
            run_requests(&small, constrained.clone()),
            undisturbed,
            "cache of {cache}"
        );
        preemptions += small.stats().scheduler.preemptions;
    }
    assert!(preemptions > 0, "the small caches should have forced preemptions");
}

/// A rank that cannot hold a sequence to its grammar ends that request with the reason, and
/// only that one: never a silent, unconstrained answer.
#[test]
fn a_grammar_the_rank_cannot_hold_fails_its_request_visibly() {
    let rank: Arc<dyn AttentionRank> = Arc::new(LocalAttention::new(0, Box::new(tiny_backend(4096)), None));
    let config = SchedulerConfig {
        max_waiting: 16,
        max_step_tokens: 256,
        probe_interval: Duration::from_millis(20),
        ..SchedulerConfig::default()
    };
    let fleet = Fleet::start(
        ModelConfig::from_model_files(&tiny()).expect("config"),
        vec![rank],
        config,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !fleet.health().ready {
        assert!(Instant::now() < deadline, "the fleet did not become ready");
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut reqs = requests(0.0, &LogitRules::default());
    reqs[0].params.grammar = Some(OutputGrammar::JsonSchema(r#"{"type": "object"}"#.into()));
    let outcomes: Vec<Result<usize, String>> = reqs
        .into_iter()
        .map(|r| {
            fleet
                .submit(GenerationRequest {
                    prompt: r.prompt,
                    params: r.params,
                    logprobs: None,
                })
                .expect("submit")
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|mut rx| {
            let mut tokens = 0;
            while let Some(event) = rx.blocking_recv() {
                match event {
                    GenerationEvent::Token { .. } => tokens += 1,
                    GenerationEvent::Failed { message } => return Err(message),
                    _ => {}
                }
            }
            Ok(tokens)
        })
        .collect();
    let error = outcomes[0].as_ref().expect_err("the constrained request fails");
    assert!(
        error.contains("structured output") && error.contains("tokenizer"),
        "{error}"
    );
    assert!(outcomes[1..].iter().all(|o| o == &Ok(40)), "{outcomes:?}");
}

/// Greedy tokens of one request and the prompt tokens it found in the prefix cache.
fn greedy_with_cache(fleet: &Fleet, prompt: Vec<u32>) -> (Vec<u32>, usize) {
    let params = SamplingParams {
        max_tokens: 12,
        ignore_eos: true,
        ..SamplingParams::default()
    };
    let rx = fleet
        .submit(GenerationRequest {
            prompt,
            params,
            logprobs: None,
        })
        .expect("submit");
    tokens_and_cached(rx)
}

/// The tokens of a generation and the prompt tokens it found in the prefix cache.
fn tokens_and_cached(mut rx: tokio::sync::mpsc::UnboundedReceiver<GenerationEvent>) -> (Vec<u32>, usize) {
    let (mut tokens, mut cached) = (Vec::new(), 0);
    while let Some(event) = rx.blocking_recv() {
        match event {
            GenerationEvent::Token { id, .. } => tokens.push(id),
            GenerationEvent::Cached { tokens } => cached += tokens,
            GenerationEvent::Failed { message } => panic!("failed: {message}"),
            _ => {}
        }
    }
    (tokens, cached)
}

/// Multi-turn chat resends its history: the second turn takes the first turn's prompt blocks
/// from the prefix cache (whole blocks of 16, also across chunked prefill) and answers exactly
/// as a cold server does.
#[test]
fn a_resent_prefix_is_taken_from_the_cache_and_changes_nothing() {
    let history: Vec<u32> = (0..70).map(|t| 2 + (t * 37) % 900).collect();
    let mut second_turn = history.clone();
    second_turn.extend([11, 12, 13, 14, 15]);
    for step_tokens in [256, 24] {
        let cold = greedy_with_cache(&fleet_stepping(4096, step_tokens), second_turn.clone());
        assert_eq!(cold.1, 0, "nothing cached on a fresh server");
        let warm_fleet = fleet_stepping(4096, step_tokens);
        let (_, first_cached) = greedy_with_cache(&warm_fleet, history.clone());
        assert_eq!(first_cached, 0);
        let (tokens, cached) = greedy_with_cache(&warm_fleet, second_turn.clone());
        // The history's 4 whole blocks (64 of its 70 tokens).
        assert_eq!(cached, 64, "steps of {step_tokens} tokens");
        assert_eq!(tokens, cold.0, "steps of {step_tokens} tokens");
    }
}

/// Requests sent together with one prompt (the `n` choices of a request) compute it once: the
/// later ones wait for the first one's prefill and take its blocks.
#[test]
fn requests_sent_together_with_one_prompt_compute_it_once() {
    let prompt: Vec<u32> = (0..70).map(|t| 2 + (t * 37) % 900).collect();
    let fleet = fleet(4096);
    let receivers: Vec<_> = (0..3)
        .map(|_| {
            let params = SamplingParams {
                max_tokens: 8,
                ignore_eos: true,
                ..SamplingParams::default()
            };
            fleet
                .submit(GenerationRequest {
                    prompt: prompt.clone(),
                    params,
                    logprobs: None,
                })
                .expect("submit")
        })
        .collect();
    let results: Vec<(Vec<u32>, usize)> = receivers.into_iter().map(tokens_and_cached).collect();
    let cached: Vec<usize> = results.iter().map(|r| r.1).collect();
    assert_eq!(cached, [0, 64, 64]);
    assert!(results.iter().all(|r| r.0 == results[0].0), "greedy answers agree");
}

#[test]
fn speculative_decoding_through_the_fleet_changes_no_token() {
    let rules = strong_rules(7);
    for (temperature, rules) in [(0.0, LogitRules::default()), (1.0, rules)] {
        let plain = run_requests(&fleet(4096), requests(temperature, &rules));
        for (cache_tokens, drafts) in [(4096, 1), (4096, 3), (96, 2)] {
            let rank = tiny_rank(cache_tokens, drafts);
            let fleet = fleet_with_rank(rank.clone(), 256);
            let out = run_requests(&fleet, requests(temperature, &rules));
            assert_eq!(
                out, plain,
                "temperature {temperature}, {drafts} drafts, cache {cache_tokens}"
            );
            if cache_tokens < 4096 {
                assert!(
                    fleet.stats().scheduler.preemptions > 0,
                    "the small cache should preempt"
                );
            }
            // Finished sequences are released just after their streams end.
            let deadline = Instant::now() + Duration::from_secs(5);
            let info = loop {
                let info = rank.info().expect("info");
                if info.free_blocks == info.total_blocks || Instant::now() > deadline {
                    break info;
                }
                std::thread::sleep(Duration::from_millis(5));
            };
            assert_eq!(info.speculative_tokens, drafts as u32);
            assert_eq!(info.drafts_scored.len(), drafts);
            assert!(info.drafts_scored[0] > 20, "{:?}", info.drafts_scored);
            assert!(info
                .drafts_accepted
                .iter()
                .zip(&info.drafts_scored)
                .all(|(a, s)| a <= s));
            assert_eq!(info.free_blocks, info.total_blocks, "every block back");
        }
    }
}

/// A lone sequence outgrowing its rank's cache ends where it would without drafts: drafts take
/// only the room left over, fewer of them near the end.
#[test]
fn drafts_near_a_full_cache_change_neither_tokens_nor_length() {
    let one = || vec![requests(0.0, &LogitRules::default()).remove(0)];
    let plain = run_requests(&fleet(48), one());
    assert!(
        plain[0].len() < 40,
        "the 48-position cache should end it early: {}",
        plain[0].len()
    );
    for drafts in [1, 3] {
        let fleet = fleet_with_rank(tiny_rank(48, drafts), 256);
        assert_eq!(run_requests(&fleet, one()), plain, "{drafts} drafts");
    }
}

#[test]
fn speculation_on_a_checkpoint_without_mtp_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden/tiny-bf16/config.json"),
        )
        .expect("config"),
    )
    .expect("json");
    config["num_nextn_predict_layers"] = 0.into();
    dsv3_engine::synthetic::write_checkpoint(dir.path(), &config, false, 1, 3).expect("checkpoint");
    let files = ModelFiles::Dir(dir.path().to_path_buf());
    let model = Model::load(&files, |_| {}).expect("model");
    let experts = LocalExperts::load(
        &Checkpoint::open(&files).expect("open"),
        &model.config,
        &Default::default(),
        |_| {},
    )
    .expect("experts");
    let backend = CpuBackend::new(model, Arc::new(experts), 0, 256, 16);
    let err = LocalAttention::new(0, Box::new(backend), None)
        .with_speculative_tokens(1)
        .err()
        .expect("refused");
    assert!(
        err.to_string()
            .contains("--speculative-tokens 1 needs the checkpoint's MTP module"),
        "{err}"
    );
}

/// With two ranks, a prompt sharing whole blocks with one a rank served goes to that rank even
/// when the other has more free cache; when that rank has no room for it, to the other.
#[test]
fn a_prompt_goes_to_the_rank_holding_its_prefix_while_it_has_room() {
    let prefix: Vec<u32> = (0..40).map(|t| 2 + (t * 53) % 900).collect();
    let mut longer = prefix.clone();
    longer.extend((0..10).map(|t| 500 + t));
    let mut filler = prefix.clone();
    filler.extend((0..20).map(|t| 3 + (t * 29) % 900));
    // (cache positions of each rank, cached tokens the longer prompt should find)
    for (cache, want_cached) in [(4096, 32), (128, 0)] {
        let fleet = fleet_with_ranks(vec![tiny_rank(cache, 0), tiny_rank(cache, 0)], 256);
        // Both ranks empty: the prefix goes to rank 0 (ties go to the lower rank) and registers
        // two whole blocks there.
        let (_, cached) = greedy_with_cache(&fleet, prefix.clone());
        assert_eq!(cached, 0);
        // A long request that also begins with the prefix follows it to rank 0 and keeps it
        // busy, so by free cache alone the next prompt would go to rank 1; with 128 positions
        // (8 blocks, one kept free) it leaves rank 0 too little room for the next prompt.
        let mut busy = fleet
            .submit(GenerationRequest {
                prompt: filler.clone(),
                params: SamplingParams {
                    max_tokens: 150,
                    ignore_eos: true,
                    ..SamplingParams::default()
                },
                logprobs: None,
            })
            .expect("submit");
        loop {
            match busy.blocking_recv() {
                Some(GenerationEvent::Token { .. }) => break,
                Some(GenerationEvent::Failed { message }) => panic!("failed: {message}"),
                Some(_) => {}
                None => panic!("the busy request ended before its first token"),
            }
        }
        let (_, cached) = greedy_with_cache(&fleet, longer.clone());
        assert_eq!(
            cached, want_cached,
            "ranks of {cache} positions: the longer prompt found {cached} cached tokens"
        );
        drop(busy);
    }
}

/// The tiny model's experts, less expert `lost` of layer `watched` while `lost` is set: the
/// rows routed to it get the other experts' sums and are recorded (as masked with `mask`), as
/// remote shards with no live copy of an expert do. Records which experts each call of that
/// layer chose.
struct LosingExperts {
    inner: LocalExperts,
    watched: usize,
    mask: bool,
    lost: Mutex<Option<u32>>,
    chosen: Mutex<std::collections::BTreeSet<u32>>,
    unserved: Mutex<Vec<UnservedRows>>,
}

impl ExpertExecutor for LosingExperts {
    fn routed_experts(&self, layer: usize, x: &[f32], routes: &TokenRoutes) -> anyhow::Result<Vec<f32>> {
        if layer != self.watched {
            return self.inner.routed_experts(layer, x, routes);
        }
        self.chosen.lock().expect("lock").extend(&routes.experts);
        let Some(lost) = *self.lost.lock().expect("lock") else {
            return self.inner.routed_experts(layer, x, routes);
        };
        let rows: Vec<usize> = (0..routes.tokens())
            .filter(|&t| routes.experts[t * routes.k..(t + 1) * routes.k].contains(&lost))
            .collect();
        if !rows.is_empty() {
            self.unserved.lock().expect("lock").push(UnservedRows {
                layer,
                rows: routes.tokens(),
                lost: rows,
                reason: format!("expert {lost} of layer {layer} has no live copy"),
                masked: self.mask,
            });
        }
        self.inner.routed_experts(layer, x, &routes.only(|e| e != lost))
    }
}

impl ExpertBackend for LosingExperts {
    fn ready(&self) -> Result<(), String> {
        Ok(())
    }
    fn placement_version(&self) -> String {
        "local".into()
    }
    fn take_unserved(&self) -> Vec<UnservedRows> {
        std::mem::take(&mut *self.unserved.lock().expect("lock"))
    }
}

/// What became of one request: its tokens or the error that ended it, the prompt tokens it
/// found in the prefix cache, and the routes reported masked.
#[derive(Debug)]
struct Outcome {
    tokens: Result<Vec<u32>, String>,
    cached: usize,
    masked: usize,
}

/// One greedy token for each prompt, the prompts submitted together.
fn first_tokens(fleet: &Fleet, prompts: &[Vec<u32>]) -> Vec<Outcome> {
    let receivers: Vec<_> = prompts
        .iter()
        .map(|p| {
            let params = SamplingParams {
                temperature: 0.0,
                max_tokens: 1,
                ignore_eos: true,
                ..SamplingParams::default()
            };
            let request = GenerationRequest {
                prompt: p.clone(),
                params,
                logprobs: None,
            };
            fleet.submit(request).expect("submit")
        })
        .collect();
    receivers
        .into_iter()
        .map(|mut rx| {
            let mut outcome = Outcome {
                tokens: Ok(Vec::new()),
                cached: 0,
                masked: 0,
            };
            while let Some(event) = rx.blocking_recv() {
                match event {
                    GenerationEvent::Token { id, .. } => {
                        if let Ok(t) = &mut outcome.tokens {
                            t.push(id);
                        }
                    }
                    GenerationEvent::Failed { message } => outcome.tokens = Err(message),
                    GenerationEvent::Cached { tokens } => outcome.cached += tokens,
                    GenerationEvent::ExpertsMasked { routes } => outcome.masked += routes,
                    GenerationEvent::Scheduled | GenerationEvent::Finished { .. } => {}
                }
            }
            outcome
        })
        .collect()
}

/// A fleet of one rank on the tiny model whose experts of the first MoE layer are `experts`.
fn losing_fleet(mask: bool) -> (Arc<Fleet>, Arc<LosingExperts>) {
    let files = tiny();
    let model = Model::load(&files, |_| {}).expect("model");
    let ckpt = Checkpoint::open(&files).expect("checkpoint");
    let inner = LocalExperts::load(&ckpt, &model.config, &Default::default(), |_| {}).expect("experts");
    // The first MoE layer: the cache rows of the layers after it depend on its sums.
    let watched = model.config.first_k_dense_replace;
    assert!(watched + 1 < model.config.num_hidden_layers);
    let experts = Arc::new(LosingExperts {
        inner,
        watched,
        mask,
        lost: Mutex::new(None),
        chosen: Mutex::default(),
        unserved: Mutex::default(),
    });
    let backend = CpuBackend::new(model, experts.clone(), 0, 4096, 16);
    let rank = Arc::new(LocalAttention::new(
        0,
        Box::new(backend),
        Some(experts.clone() as Arc<dyn ExpertBackend>),
    ));
    (fleet_with_rank(rank, 512), experts)
}

/// An expert of the first MoE layer loses its only copy while ten 20-token prompts prefill
/// together. Ended (or masked), exactly the prompts routed to it end (or report masked
/// routes); the others answer as undisturbed. With the expert back, every prompt answers as
/// undisturbed, and only the unaffected ones find their first block of 16 in the prefix cache:
/// nothing computed without the expert is taken from it.
#[test]
fn an_expert_with_no_copy_ends_or_masks_only_the_sequences_routed_to_it() {
    let prompts: Vec<Vec<u32>> = (0..10u32)
        .map(|i| (0..20u32).map(|t| 2 + (i * 83 + t * 41 + i * t * 7) % 900).collect())
        .collect();
    // Undisturbed, one request at a time on a fleet of its own: its token and the experts it
    // chose in the watched layer.
    let (reference, experts) = losing_fleet(false);
    let mut undisturbed = Vec::new();
    let mut chose = Vec::new();
    for p in &prompts {
        experts.chosen.lock().expect("lock").clear();
        let got = first_tokens(&reference, std::slice::from_ref(p)).remove(0);
        undisturbed.push(got.tokens.expect("undisturbed"));
        chose.push(experts.chosen.lock().expect("lock").clone());
    }
    // An expert some requests choose and others do not.
    let lost = (0..16u32)
        .filter(|e| {
            let hit = chose.iter().filter(|c| c.contains(e)).count();
            hit > 0 && hit < prompts.len()
        })
        .min_by_key(|e| chose.iter().filter(|c| c.contains(e)).count())
        .expect("an expert chosen by some requests only");
    let routed = |i: usize| chose[i].contains(&lost);
    for mask in [false, true] {
        let (fleet, experts) = losing_fleet(mask);
        *experts.lost.lock().expect("lock") = Some(lost);
        let watched = experts.watched;
        for (i, got) in first_tokens(&fleet, &prompts).into_iter().enumerate() {
            match (routed(i), mask) {
                (true, false) => {
                    let error = got.tokens.expect_err("routed to the lost expert: ended");
                    assert!(
                        error.contains(&format!("expert {lost} of layer {watched} has no live copy")),
                        "{error}"
                    );
                }
                (true, true) => {
                    assert!(got.tokens.is_ok(), "masked, request {i} goes on: {got:?}");
                    assert!(got.masked > 0, "request {i} reports its masked routes");
                }
                (false, _) => {
                    assert_eq!(got.tokens, Ok(undisturbed[i].clone()), "request {i} never chose it");
                    assert_eq!(got.masked, 0);
                }
            }
        }
        *experts.lost.lock().expect("lock") = None;
        for (i, got) in first_tokens(&fleet, &prompts).into_iter().enumerate() {
            assert_eq!(
                got.tokens,
                Ok(undisturbed[i].clone()),
                "request {i} with the expert back"
            );
            let cached = if routed(i) { 0 } else { 16 };
            assert_eq!(
                got.cached, cached,
                "request {i} (mask: {mask}): prompt tokens from the cache"
            );
        }
        // The scheduler frees a finished sequence's blocks after its last event is sent.
        let deadline = Instant::now() + Duration::from_secs(10);
        while fleet.stats().cache_used_blocks > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(fleet.stats().cache_used_blocks, 0, "every block free again");
    }
}
