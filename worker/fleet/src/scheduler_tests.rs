//! The scheduler against a fake attention rank whose next token is a fixed function of the
//! sequence and position, so the tokens each request must get are known in advance.

use super::*;
use dsv3_engine::{FinishReason, SamplingParams};
use dsv3_proto::{AttentionInfo, Sampled, StepReply};
use std::collections::HashMap;
use std::sync::atomic::AtomicBool;

const BLOCK: usize = 16;

/// The token the fake samples after `position` positions of a sequence whose prompt starts with
/// `first`: independent of batching, so any schedule must produce the same tokens.
fn expected_token(first: u32, position: usize) -> u32 {
    (first * 13 + position as u32 * 7) % 60 + 2
}

#[derive(Default)]
struct Fake {
    /// Positions cached per sequence, and the first prompt token (the sequence's identity).
    cached: Mutex<HashMap<u64, (usize, u32)>>,
    /// Tokens fed per step, as the scheduler built it.
    step_tokens: Mutex<Vec<usize>>,
    /// Sequences per step.
    step_items: Mutex<Vec<usize>>,
    released: Mutex<Vec<u64>>,
    failing: AtomicBool,
    /// Reports itself stopping (finishing what it holds, taking nothing new).
    draining: AtomicBool,
    /// How long each step takes.
    step_time: Duration,
    total_blocks: usize,
}

impl AttentionRank for Fake {
    fn step(&self, request: StepRequest) -> anyhow::Result<StepReply> {
        if self.failing.load(Ordering::SeqCst) {
            anyhow::bail!("the fake rank is down");
        }
        std::thread::sleep(self.step_time);
        let mut cached = self.cached.lock().expect("lock");
        let mut reply = StepReply::default();
        let mut fed = 0;
        for item in &request.items {
            let entry = cached.entry(item.seq).or_insert((0, item.tokens[0]));
            anyhow::ensure!(
                item.start as usize == entry.0,
                "sequence {} continues at {} but {} are cached",
                item.seq,
                item.start,
                entry.0
            );
            entry.0 += item.tokens.len();
            fed += item.tokens.len();
        }
        // Blocks are taken as positions are written, as the real ranks' block tables do.
        let used: usize = cached.values().map(|(n, _)| n.div_ceil(BLOCK)).sum();
        anyhow::ensure!(
            used <= self.total_blocks,
            "KV cache is full: {used} blocks needed, {} exist",
            self.total_blocks
        );
        for item in &request.items {
            let entry = cached[&item.seq];
            if item.sample.is_some() {
                reply.sampled.push(Sampled {
                    seq: item.seq,
                    token: expected_token(entry.1, entry.0),
                    logprob: None,
                    top_logprobs: vec![],
                });
            }
        }
        self.step_tokens.lock().expect("lock").push(fed);
        self.step_items.lock().expect("lock").push(request.items.len());
        Ok(reply)
    }

    fn release(&self, seqs: &[u64]) -> anyhow::Result<()> {
        let mut cached = self.cached.lock().expect("lock");
        for s in seqs {
            cached.remove(s);
        }
        self.released.lock().expect("lock").extend_from_slice(seqs);
        Ok(())
    }

    fn info(&self) -> anyhow::Result<AttentionInfo> {
        if self.failing.load(Ordering::SeqCst) {
            anyhow::bail!("the fake rank is down");
        }
        Ok(AttentionInfo {
            block_size: BLOCK as u32,
            total_blocks: self.total_blocks as u32,
            free_blocks: self.total_blocks as u32,
            experts_ready: true,
            draining: self.draining.load(Ordering::SeqCst),
            ..AttentionInfo::default()
        })
    }

    fn figures(&self) -> anyhow::Result<AttentionInfo> {
        self.info()
    }
}

fn config() -> ModelConfig {
    ModelConfig::from_json_str(
        r#"{"vocab_size":64,"hidden_size":8,"intermediate_size":8,"moe_intermediate_size":4,
        "num_hidden_layers":2,"num_attention_heads":1,"n_routed_experts":0,"num_experts_per_tok":1,
        "kv_lora_rank":2,"qk_nope_head_dim":2,"qk_rope_head_dim":2,"v_head_dim":2,
        "max_position_embeddings":2048,"eos_token_id":1}"#,
    )
    .expect("config")
}

fn start(fake: Arc<Fake>, max_step_tokens: usize) -> Arc<Fleet> {
    start_with(
        fake,
        SchedulerConfig {
            max_waiting: 8,
            max_step_tokens,
            probe_interval: Duration::from_millis(20),
            ..SchedulerConfig::default()
        },
    )
}

fn start_with(fake: Arc<Fake>, options: SchedulerConfig) -> Arc<Fleet> {
    let fleet = Fleet::start(config(), vec![fake as Arc<dyn AttentionRank>], options);
    wait_for(|| fleet.health().ready, "the fleet to become ready");
    fleet
}

/// Polls `done` for up to five seconds; fails naming `what` it waited for.
fn wait_for(mut done: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "waited 5 s for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn request(prompt: Vec<u32>, max_tokens: usize) -> GenerationRequest {
    GenerationRequest {
        prompt,
        params: SamplingParams {
            max_tokens,
            ignore_eos: true,
            ..SamplingParams::default()
        },
        logprobs: None,
    }
}

/// Every event of a request, in order, until it ends.
fn events(mut rx: tokio::sync::mpsc::UnboundedReceiver<GenerationEvent>) -> Vec<GenerationEvent> {
    let mut out = Vec::new();
    while let Some(e) = rx.blocking_recv() {
        out.push(e);
    }
    out
}

fn tokens(events: &[GenerationEvent]) -> Vec<u32> {
    events
        .iter()
        .filter_map(|e| match e {
            GenerationEvent::Token { id, .. } => Some(*id),
            _ => None,
        })
        .collect()
}

#[test]
fn requests_batch_under_the_token_budget_and_get_their_own_tokens() {
    let fake = Arc::new(Fake {
        total_blocks: 1000,
        ..Fake::default()
    });
    let fleet = start(fake.clone(), 64);
    let prompts = [vec![5; 10], vec![6; 3], vec![7; 300]];
    let receivers: Vec<_> = prompts
        .iter()
        .map(|p| fleet.submit(request(p.clone(), 6)).expect("submit"))
        .collect();
    for (prompt, rx) in prompts.iter().zip(receivers) {
        let got = events(rx);
        let want: Vec<u32> = (0..6).map(|i| expected_token(prompt[0], prompt.len() + i)).collect();
        assert_eq!(tokens(&got), want, "prompt of {}", prompt.len());
        assert_eq!(
            got.last(),
            Some(&GenerationEvent::Finished {
                reason: FinishReason::Length
            })
        );
    }
    let steps = fake.step_tokens.lock().expect("lock").clone();
    assert!(steps.iter().all(|&n| n <= 64), "a step went over the budget: {steps:?}");
    // The long prompt is prefilled in chunks beside the others' decode steps, each chunk that
    // leaves some of it for later ending on a cache block's edge (blocks of 16).
    assert!(steps.iter().filter(|&&n| n >= 48).count() >= 4, "{steps:?}");
    // Released right after the last event is sent.
    let released = || {
        let mut seqs = fake.released.lock().expect("lock").clone();
        seqs.sort_unstable();
        seqs
    };
    wait_for(|| released() == [1, 2, 3], "every finished sequence to be released");
}

#[test]
fn stop_tokens_and_end_of_sequence_end_a_request() {
    let fake = Arc::new(Fake {
        total_blocks: 1000,
        ..Fake::default()
    });
    let fleet = start(fake, 512);
    let prompt = vec![9; 4];
    let third = expected_token(9, prompt.len() + 2);
    let mut r = request(prompt.clone(), 10);
    r.params.stop_token_ids = vec![third];
    let got = events(fleet.submit(r).expect("submit"));
    assert_eq!(tokens(&got).len(), 3, "stops at the stop token, which is emitted");
    assert_eq!(
        got.last(),
        Some(&GenerationEvent::Finished {
            reason: FinishReason::Stop
        })
    );
    // A prompt + max_tokens past the context is refused before it is queued.
    let err = fleet.submit(request(vec![3; 2000], 100)).expect_err("too long");
    assert!(matches!(err, SubmitError::Invalid(m) if m.contains("exceeds the context")));
}

#[test]
fn requests_wait_for_cache_and_never_exceed_it() {
    // 4 blocks of 16, one kept free at admission: one prompt of 40 (3 blocks with its first
    // token) at a time.
    let fake = Arc::new(Fake {
        total_blocks: 4,
        ..Fake::default()
    });
    let fleet = start(fake.clone(), 512);
    let receivers: Vec<_> = (0..3)
        .map(|i| fleet.submit(request(vec![10 + i; 40], 8)).expect("submit"))
        .collect();
    for (i, rx) in receivers.into_iter().enumerate() {
        let want: Vec<u32> = (0..8).map(|k| expected_token(10 + i as u32, 40 + k)).collect();
        assert_eq!(tokens(&events(rx)), want);
    }
    // One at a time: no step ever carried two sequences' prompts (each step ≤ 40 tokens).
    let steps = fake.step_tokens.lock().expect("lock").clone();
    assert!(steps.iter().all(|&n| n <= 40), "{steps:?}");
    // A prompt no rank's cache can hold is refused at submission (HTTP 400), never queued.
    let err = fleet
        .submit(request(vec![3; 64], 1))
        .expect_err("longer than the cache");
    assert!(
        matches!(&err, SubmitError::Invalid(m) if m.contains("holds 64 positions")),
        "{err}"
    );
}

/// Cache is taken as sequences grow: requests whose `max_tokens` together far exceed the cache
/// (as an omitted `max_tokens` does: the rest of the context) all run, the newest preempted and
/// prefilled again from prompt + output when the cache runs out, each getting exactly the tokens
/// an undisturbed run gives, and the rank's cache is never exceeded (the fake fails if it is).
#[test]
fn sequences_outgrowing_the_cache_are_preempted_and_resumed_with_the_same_tokens() {
    // 8 blocks of 16 = 128 positions; 5 requests of 20 + 60 positions each (5 blocks).
    let fake = Arc::new(Fake {
        total_blocks: 8,
        ..Fake::default()
    });
    let fleet = start(fake.clone(), 64);
    let receivers: Vec<_> = (0..5)
        .map(|i| fleet.submit(request(vec![20 + i; 20], 60)).expect("submit"))
        .collect();
    for (i, rx) in receivers.into_iter().enumerate() {
        let got = events(rx);
        let want: Vec<u32> = (0..60).map(|k| expected_token(20 + i as u32, 20 + k)).collect();
        assert_eq!(tokens(&got), want, "request {i}: {:?}", got.last());
        assert_eq!(
            got.last(),
            Some(&GenerationEvent::Finished {
                reason: FinishReason::Length
            })
        );
    }
    let stats = fleet.stats();
    assert!(stats.scheduler.preemptions > 0, "no sequence was preempted: {stats:?}");
    // A preempted sequence's cache went back to the rank before it resumed.
    assert!(fake.released.lock().expect("lock").len() as u64 >= stats.scheduler.preemptions);
    wait_for(|| fleet.stats().cache_used_blocks == 0, "every block to be free again");
}

/// A sequence alone on a rank that outgrows the whole cache ends with `length`, as at the end of
/// the context, after the tokens that fit.
#[test]
fn a_sequence_that_outgrows_the_whole_cache_ends_with_length() {
    // 4 blocks of 16 = 64 positions: a prompt of 10 leaves room for 55 tokens (the last one is
    // never written to the cache).
    let fake = Arc::new(Fake {
        total_blocks: 4,
        ..Fake::default()
    });
    let fleet = start(fake, 512);
    let got = events(fleet.submit(request(vec![30; 10], 500)).expect("submit"));
    let want: Vec<u32> = (0..55).map(|k| expected_token(30, 10 + k)).collect();
    assert_eq!(tokens(&got), want);
    assert_eq!(
        got.last(),
        Some(&GenerationEvent::Finished {
            reason: FinishReason::Length
        })
    );
}

#[test]
fn a_failed_rank_fails_its_requests_and_serves_again_when_back() {
    let fake = Arc::new(Fake {
        total_blocks: 1000,
        ..Fake::default()
    });
    let fleet = start(fake.clone(), 512);
    fake.failing.store(true, Ordering::SeqCst);
    let got = events(fleet.submit(request(vec![4; 5], 4)).expect("submit"));
    assert!(
        matches!(&got[..], [GenerationEvent::Scheduled, GenerationEvent::Failed { message }] if message.contains("fake rank is down")),
        "{got:?}"
    );
    wait_for(|| !fleet.health().ready, "the fleet to report its rank down");
    assert!(matches!(
        fleet.submit(request(vec![4; 5], 4)),
        Err(SubmitError::NotReady(_))
    ));
    fake.failing.store(false, Ordering::SeqCst);
    wait_for(|| fleet.health().ready, "the fleet to recover");
    let got = events(fleet.submit(request(vec![4; 5], 4)).expect("submit"));
    let want: Vec<u32> = (0..4).map(|k| expected_token(4, 5 + k)).collect();
    assert_eq!(tokens(&got), want);
}

#[test]
fn a_failed_ranks_sequences_move_to_another_rank_with_their_output_so_far() {
    let ranks: Vec<Arc<Fake>> = (0..2)
        .map(|_| {
            Arc::new(Fake {
                total_blocks: 1000,
                step_time: Duration::from_millis(5),
                ..Fake::default()
            })
        })
        .collect();
    let fleet = Fleet::start(
        config(),
        ranks.iter().map(|r| r.clone() as Arc<dyn AttentionRank>).collect(),
        SchedulerConfig {
            max_waiting: 8,
            max_step_tokens: 512,
            probe_interval: Duration::from_millis(20),
            ..SchedulerConfig::default()
        },
    );
    wait_for(|| fleet.health().ready, "the fleet to become ready");
    let receivers: Vec<_> = (0..4)
        .map(|i| fleet.submit(request(vec![30 + i; 6], 40)).expect("submit"))
        .collect();
    // Both ranks hold sequences, then rank 0 fails under them.
    wait_for(
        || ranks.iter().all(|r| !r.cached.lock().expect("lock").is_empty()),
        "both ranks to hold sequences",
    );
    ranks[0].failing.store(true, Ordering::SeqCst);
    for (i, rx) in receivers.into_iter().enumerate() {
        let got = events(rx);
        assert!(
            !got.iter().any(|e| matches!(e, GenerationEvent::Failed { .. })),
            "request {i}: {got:?}"
        );
        let want: Vec<u32> = (0..40).map(|k| expected_token(30 + i as u32, 6 + k)).collect();
        assert_eq!(tokens(&got), want, "request {i}: every token once, in order");
    }
    let stats = fleet.stats();
    assert!(stats.scheduler.migrations >= 1, "{stats:?}");
    let health = fleet.health();
    assert!(
        health.ready && health.detail.contains("degraded: 1 of 2 attention ranks serving"),
        "{health:?}"
    );
}

#[test]
fn a_rank_runs_at_most_max_running_sequences_and_the_rest_wait() {
    let fake = Arc::new(Fake {
        total_blocks: 1000,
        ..Fake::default()
    });
    let options = SchedulerConfig {
        max_waiting: 8,
        max_step_tokens: 512,
        max_running_per_rank: 2,
        probe_interval: Duration::from_millis(20),
    };
    let fleet = start_with(fake.clone(), options);
    let receivers: Vec<_> = (0..5)
        .map(|i| fleet.submit(request(vec![20 + i; 4], 6)).expect("submit"))
        .collect();
    for (i, rx) in receivers.into_iter().enumerate() {
        let want: Vec<u32> = (0..6).map(|k| expected_token(20 + i as u32, 4 + k)).collect();
        assert_eq!(tokens(&events(rx)), want, "request {i}");
    }
    let items = fake.step_items.lock().expect("lock").clone();
    assert!(items.iter().all(|&n| n <= 2), "{items:?}");
    assert!(items.contains(&2), "two ran together: {items:?}");
}

#[test]
fn a_draining_rank_finishes_its_sequences_and_takes_no_new_ones() {
    let slow = || Fake {
        total_blocks: 1000,
        step_time: Duration::from_millis(2),
        ..Fake::default()
    };
    let (first, second) = (Arc::new(slow()), Arc::new(slow()));
    let options = SchedulerConfig {
        max_waiting: 8,
        max_step_tokens: 512,
        probe_interval: Duration::from_millis(20),
        ..SchedulerConfig::default()
    };
    let ranks = vec![
        first.clone() as Arc<dyn AttentionRank>,
        second.clone() as Arc<dyn AttentionRank>,
    ];
    let fleet = Fleet::start(config(), ranks, options);
    wait_for(|| fleet.health().ready, "the fleet to become ready");
    // A long request lands on one of them; that rank then starts to stop.
    let long = fleet.submit(request(vec![30; 4], 400)).expect("submit");
    wait_for(
        || first.cached.lock().map_or(0, |c| c.len()) + second.cached.lock().map_or(0, |c| c.len()) == 1,
        "the long request to start",
    );
    let (holder, other) = if first.cached.lock().expect("lock").is_empty() {
        (&second, &first)
    } else {
        (&first, &second)
    };
    holder.draining.store(true, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(300)); // several probes
    let short: Vec<_> = (0..4)
        .map(|i| fleet.submit(request(vec![40 + i; 4], 8)).expect("submit"))
        .collect();
    for (i, rx) in short.into_iter().enumerate() {
        let want: Vec<u32> = (0..8).map(|k| expected_token(40 + i as u32, 4 + k)).collect();
        assert_eq!(tokens(&events(rx)), want, "short request {i}");
    }
    let want: Vec<u32> = (0..400).map(|k| expected_token(30, 4 + k)).collect();
    assert_eq!(tokens(&events(long)), want, "the draining rank finished its sequence");
    // Sequences are released after their last event: wait for the releases, then count them.
    let released = |fake: &Fake| fake.released.lock().map_or(0, |r| r.len());
    wait_for(
        || released(holder) + released(other) == 5,
        "every sequence to be released",
    );
    assert_eq!(released(holder), 1, "only the long request was there");
    assert_eq!(released(other), 4, "every new request went to the other rank");
}
