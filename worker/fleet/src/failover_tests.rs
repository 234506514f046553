//! Expert failover over real gRPC shards in this process: a shard that dies mid-run has its
//! tokens answered by the other copies of its experts in the same call, with the same sums; an
//! expert left with no live copy fails the call by name; a shard that comes back takes its
//! share again after the next readiness probe; with unserved rows recorded, only the rows
//! routed to an expert with no live copy go without it, and are named; masked, their other
//! experts' weights are scaled to the same total; a last copy that missed a call is tried
//! again by a step once its hold-down has passed.

use crate::grpc::{expert_server, serve_expert, Dtype, RemoteExperts};
use crate::placement::PlacementPlan;
use crate::rank::{ExpertBackend, UnavailableExperts};
use crate::transport::Transport;
use dsv3_engine::moe::NO_EXPERT;
use dsv3_engine::{ExpertExecutor, MemoryUse, TokenRoutes};
use dsv3_proto::OTHER_SHARD;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

pub(crate) const WIDTH: usize = 4;
pub(crate) const EXPERTS: u32 = 6;
/// A layer every shard refuses: a failing request, not a failing shard.
const REFUSED_LAYER: usize = 99;

/// Expert `e` maps a row x to (e + 1) · x + e; counts the rows it is handed.
struct Affine {
    rows: Arc<AtomicUsize>,
}

fn affine(e: u32, x: &[f32]) -> impl Iterator<Item = f32> + '_ {
    x.iter().map(move |v| (e as f32 + 1.0) * v + e as f32)
}

impl ExpertExecutor for Affine {
    fn routed_experts(&self, layer: usize, x: &[f32], routes: &TokenRoutes) -> anyhow::Result<Vec<f32>> {
        anyhow::ensure!(layer != REFUSED_LAYER, "layer {layer} is refused");
        let mut out = vec![0.0; x.len()];
        for t in 0..routes.tokens() {
            self.rows.fetch_add(1, Ordering::Relaxed);
            let row = &x[t * WIDTH..(t + 1) * WIDTH];
            for j in 0..routes.k {
                let (e, w) = (routes.experts[t * routes.k + j], routes.weights[t * routes.k + j]);
                if e == OTHER_SHARD {
                    continue;
                }
                for (o, y) in out[t * WIDTH..(t + 1) * WIDTH].iter_mut().zip(affine(e, row)) {
                    *o += w * y;
                }
            }
        }
        Ok(out)
    }
}

pub(crate) struct RunningShard {
    stop: oneshot::Sender<()>,
    done: tokio::task::JoinHandle<()>,
    rows: Arc<AtomicUsize>,
}

pub(crate) fn start(rt: &tokio::runtime::Runtime, plan: &PlacementPlan, rank: u32, port: u16) -> RunningShard {
    start_over(rt, plan, rank, port, &Transport::Plain)
}

/// Shard `rank` of `plan` serving on `port` over `transport`.
pub(crate) fn start_over(
    rt: &tokio::runtime::Runtime,
    plan: &PlacementPlan,
    rank: u32,
    port: u16,
    transport: &Transport,
) -> RunningShard {
    let rows = Arc::new(AtomicUsize::new(0));
    let shard = expert_server(
        rank,
        Arc::new(Affine { rows: rows.clone() }),
        plan,
        "cpu".into(),
        MemoryUse::default(),
    )
    .expect("shard");
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(("127.0.0.1", port)))
        .expect("bind");
    let (stop, stopped) = oneshot::channel::<()>();
    let transport = transport.clone();
    let done = rt.spawn(async move {
        let _ = serve_expert(listener, shard, transport, async {
            let _ = stopped.await;
        })
        .await;
    });
    RunningShard { stop, done, rows }
}

pub(crate) fn stop(rt: &tokio::runtime::Runtime, shard: RunningShard) {
    let _ = shard.stop.send(());
    rt.block_on(shard.done).expect("shard task");
}

/// The runtime the in-process servers and clients of these tests run on.
pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port")
}

/// Every token's weighted sum over its slots, computed here.
pub(crate) fn reference(x: &[f32], routes: &TokenRoutes) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    for t in 0..routes.tokens() {
        for j in 0..routes.k {
            let (e, w) = (routes.experts[t * routes.k + j], routes.weights[t * routes.k + j]);
            let row = &x[t * WIDTH..(t + 1) * WIDTH];
            for (o, y) in out[t * WIDTH..(t + 1) * WIDTH].iter_mut().zip(affine(e, row)) {
                *o += w * y;
            }
        }
    }
    out
}

pub(crate) fn assert_close(a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "value {i}: {x} vs {y}");
    }
}

struct Setup {
    rt: tokio::runtime::Runtime,
    plan: PlacementPlan,
    ports: Vec<u16>,
    shards: Vec<RunningShard>,
    remote: RemoteExperts,
}

/// Three shards serving, every expert on two of them, and an attention rank's view of them.
fn three_shards_every_expert_twice() -> Setup {
    let rt = runtime();
    let hot: Vec<u32> = (0..EXPERTS).collect();
    let plan = PlacementPlan::round_robin(EXPERTS, 3, EXPERTS as usize, &hot).expect("plan");
    assert_eq!(plan.fewest_copies(), 2, "{:?}", plan.shards);
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let shards = ports
        .iter()
        .enumerate()
        .map(|(r, &p)| start(&rt, &plan, r as u32, p))
        .collect();
    let remote = RemoteExperts::new(
        plan.clone(),
        ports.iter().map(|p| format!("127.0.0.1:{p}")).collect(),
        &Transport::Plain,
        rt.handle().clone(),
        Duration::from_secs(5),
        Dtype::F32,
    )
    .expect("remote experts");
    Setup {
        rt,
        plan,
        ports,
        shards,
        remote,
    }
}

#[test]
fn a_dead_shards_experts_are_answered_by_their_copies_and_it_rejoins() {
    let Setup {
        rt,
        plan,
        ports,
        shards,
        remote,
    } = three_shards_every_expert_twice();
    let mut shards: Vec<Option<RunningShard>> = shards.into_iter().map(Some).collect();
    assert_eq!(remote.ready(), Ok(()));

    let tokens = 12;
    let x: Vec<f32> = (0..tokens * WIDTH)
        .map(|i| ((i * 37 % 11) as f32 - 5.0) / 7.0)
        .collect();
    let routes = TokenRoutes {
        k: 2,
        experts: (0..tokens as u32)
            .flat_map(|t| [t % EXPERTS, (t + 2) % EXPERTS])
            .collect(),
        weights: (0..tokens).flat_map(|t| [0.25 + t as f32 / 50.0, 0.5]).collect(),
    };
    let expected = reference(&x, &routes);
    assert_close(
        &remote.routed_experts(0, &x, &routes).expect("all shards up"),
        &expected,
    );
    assert_eq!(remote.degraded(), None);
    // A request the shards refuse fails the call; it moves nothing and marks no shard down.
    let refused = remote
        .routed_experts(REFUSED_LAYER, &x, &routes)
        .expect_err("refused")
        .to_string();
    assert!(refused.contains("is refused"), "{refused}");
    assert_eq!(remote.degraded(), None, "a refusal is not an outage");

    // Shard 1 dies: the same call is answered by the other copies, with the same sums.
    stop(&rt, shards[1].take().expect("shard 1"));
    assert_close(&remote.routed_experts(1, &x, &routes).expect("failed over"), &expected);
    let degraded = remote.degraded().expect("degraded");
    assert!(degraded.contains("expert shard 1"), "{degraded}");
    assert_eq!(remote.ready(), Ok(()), "every expert still has a live copy");
    // The next calls skip it at once.
    assert_close(&remote.routed_experts(2, &x, &routes).expect("degraded"), &expected);

    // Shard 0 dies too: the experts held only by shards 0 and 1 have no live copy.
    stop(&rt, shards[0].take().expect("shard 0"));
    let orphans: Vec<u32> = (0..EXPERTS)
        .filter(|&e| plan.owners(e).iter().all(|&s| s != 2))
        .collect();
    assert!(!orphans.is_empty(), "{:?}", plan.shards);
    let err = remote
        .routed_experts(3, &x, &routes)
        .expect_err("no live copy")
        .to_string();
    assert!(err.contains("no live copy"), "{err}");
    let not_ready = remote.ready().expect_err("not ready");
    assert!(
        not_ready.contains(&format!("experts {}", orphans[0])) && not_ready.contains("no live copy"),
        "{not_ready}"
    );

    // Shard 1 comes back: the next probe brings it into use.
    let back = start(&rt, &plan, 1, ports[1]);
    let rows_before = back.rows.load(Ordering::Relaxed);
    shards[1] = Some(back);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while remote.ready().is_err() {
        assert!(std::time::Instant::now() < deadline, "shard 1 never rejoined");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_close(&remote.routed_experts(4, &x, &routes).expect("shard 1 back"), &expected);
    let served = shards[1].as_ref().map(|s| s.rows.load(Ordering::Relaxed)).unwrap_or(0);
    assert!(served > rows_before, "the rejoined shard takes its share again");
    let still = remote.degraded().expect("shard 0 still down");
    assert!(
        still.contains("expert shard 0") && !still.contains("expert shard 1"),
        "{still}"
    );
    for shard in shards.into_iter().flatten() {
        stop(&rt, shard);
    }
}

#[test]
fn with_unserved_rows_recorded_an_expert_with_no_copy_costs_only_the_rows_routed_to_it() {
    let Setup {
        rt,
        plan,
        mut shards,
        remote,
        ..
    } = three_shards_every_expert_twice();
    let remote = remote.on_unavailable_experts(UnavailableExperts::EndSequences);
    let tokens = 12;
    let x: Vec<f32> = (0..tokens * WIDTH)
        .map(|i| ((i * 29 % 13) as f32 - 6.0) / 5.0)
        .collect();
    let routes = TokenRoutes {
        k: 2,
        experts: (0..tokens as u32)
            .flat_map(|t| [t % EXPERTS, (t + 3) % EXPERTS])
            .collect(),
        weights: (0..tokens).flat_map(|t| [0.3 + t as f32 / 40.0, 0.45]).collect(),
    };
    assert_close(
        &remote.routed_experts(0, &x, &routes).expect("all up"),
        &reference(&x, &routes),
    );
    assert_eq!(
        remote.take_unserved(),
        Vec::new(),
        "nothing lost while every shard answers"
    );

    let last = shards.pop().expect("shard 2");
    for shard in shards {
        stop(&rt, shard);
    }
    let orphan = |e: u32| plan.owners(e).iter().all(|&s| s != 2);
    let orphans: Vec<u32> = (0..EXPERTS).filter(|&e| orphan(e)).collect();
    assert!(!orphans.is_empty(), "{:?}", plan.shards);
    // Every row gets the sums of its experts that have a copy left; only the rows routed to
    // an orphan are recorded, with the experts named.
    let got = remote
        .routed_experts(1, &x, &routes)
        .expect("answered without the orphans");
    assert_close(&got, &reference(&x, &routes.only(|e| !orphan(e))));
    let expected_rows: Vec<usize> = (0..tokens)
        .filter(|&t| routes.experts[t * 2..t * 2 + 2].iter().any(|&e| orphan(e)))
        .collect();
    assert!(!expected_rows.is_empty() && expected_rows.len() < tokens);
    let unserved = remote.take_unserved();
    assert_eq!(unserved.len(), 1, "{unserved:?}");
    assert_eq!((unserved[0].layer, unserved[0].rows), (1, tokens));
    assert_eq!(unserved[0].lost, expected_rows);
    let named: Vec<String> = orphans.iter().map(u32::to_string).collect();
    assert!(
        unserved[0].reason.contains(&format!("{} of layer 1", named.join(", ")))
            && unserved[0].reason.contains("no live copy"),
        "{}",
        unserved[0].reason
    );
    assert_eq!(remote.take_unserved(), Vec::new(), "taken once");
    // Rows routed only to experts with a copy are not recorded at all.
    let safe = TokenRoutes {
        k: 1,
        experts: (0..tokens as u32)
            .map(|t| (0..EXPERTS).filter(|&e| !orphan(e)).nth(t as usize % 2).unwrap_or(0))
            .collect(),
        weights: vec![1.0; tokens],
    };
    assert_close(
        &remote.routed_experts(2, &x, &safe).expect("safe"),
        &reference(&x, &safe),
    );
    assert_eq!(remote.take_unserved(), Vec::new());
    stop(&rt, last);
}

#[test]
fn masked_an_expert_with_no_copy_leaves_each_route_its_other_experts_at_the_same_total_weight() {
    let Setup {
        rt,
        plan,
        mut shards,
        remote,
        ..
    } = three_shards_every_expert_twice();
    let remote = remote.on_unavailable_experts(UnavailableExperts::Mask);
    let tokens = 9;
    let x: Vec<f32> = (0..tokens * WIDTH).map(|i| ((i * 17 % 7) as f32 - 3.0) / 4.0).collect();
    let k = 3;
    let routes = TokenRoutes {
        k,
        experts: (0..tokens as u32)
            .flat_map(|t| [t % EXPERTS, (t + 1) % EXPERTS, (t + 4) % EXPERTS])
            .collect(),
        weights: (0..tokens).flat_map(|t| [0.5, 0.2 + t as f32 / 30.0, 0.3]).collect(),
    };
    let last = shards.pop().expect("shard 2");
    for shard in shards {
        stop(&rt, shard);
    }
    let orphan = |e: u32| plan.owners(e).iter().all(|&s| s != 2);
    // Each token's kept weights scaled by total / kept (a token with none keeps nothing).
    let mut renormalised = routes.clone();
    for t in 0..tokens {
        let slots = t * k..(t + 1) * k;
        let total: f32 = routes.weights[slots.clone()].iter().sum();
        let kept: f32 = slots
            .clone()
            .filter(|&i| !orphan(routes.experts[i]))
            .map(|i| routes.weights[i])
            .sum();
        for i in slots {
            renormalised.weights[i] = if orphan(routes.experts[i]) || kept == 0.0 {
                0.0
            } else {
                routes.weights[i] * total / kept
            };
        }
    }
    assert!(renormalised.weights.iter().zip(&routes.weights).any(|(a, b)| a > b));
    let got = remote.routed_experts(0, &x, &routes).expect("masked, not failed");
    assert_close(&got, &reference(&x, &renormalised));
    let unserved = remote.take_unserved();
    assert_eq!(unserved.len(), 1);
    assert!(unserved[0].masked);
    assert_eq!(remote.ready(), Ok(()), "masked: still ready");
    let degraded = remote.degraded().expect("degraded");
    assert!(degraded.contains("masked out of routing"), "{degraded}");

    // Experts the attention rank runs itself (NO_EXPERT slots) are summed apart: a route
    // holding one cannot be renormalised here, so the call fails rather than mis-scale it.
    let mut mixed = routes.clone();
    for t in 0..tokens {
        mixed.experts[t * k + 2] = NO_EXPERT;
    }
    let err = remote
        .routed_experts(1, &x, &mixed)
        .expect_err("cannot mask")
        .to_string();
    assert!(err.contains("cannot be masked"), "{err}");

    // The last shard gone: nothing is left to mask towards; not ready and the call fails.
    stop(&rt, last);
    let err = remote.routed_experts(2, &x, &routes).expect_err("no shard").to_string();
    assert!(err.contains("no expert shard answers"), "{err}");
    let not_ready = remote.ready().expect_err("no shard left");
    assert!(not_ready.contains("no live copy"), "{not_ready}");
}

#[test]
fn a_last_copy_that_missed_a_call_is_tried_again_by_the_next_step_after_its_hold_down() {
    let Setup {
        rt,
        plan,
        ports,
        mut shards,
        remote,
    } = three_shards_every_expert_twice();
    let remote = remote.on_unavailable_experts(UnavailableExperts::EndSequences);
    let tokens = 12;
    let x: Vec<f32> = (0..tokens * WIDTH).map(|i| ((i * 23 % 9) as f32 - 4.0) / 3.0).collect();
    let routes = TokenRoutes {
        k: 2,
        experts: (0..tokens as u32)
            .flat_map(|t| [t % EXPERTS, (t + 3) % EXPERTS])
            .collect(),
        weights: (0..tokens).flat_map(|t| [0.4 + t as f32 / 60.0, 0.35]).collect(),
    };
    // Shards 0 and 1 miss a call: the experts only they hold go without a copy.
    let last = shards.pop().expect("shard 2");
    for shard in shards {
        stop(&rt, shard);
    }
    assert!(
        (0..EXPERTS).any(|e| plan.owners(e).iter().all(|&s| s != 2)),
        "{:?}",
        plan.shards
    );
    remote
        .routed_experts(0, &x, &routes)
        .expect("answered without the orphans");
    assert_eq!(remote.take_unserved().len(), 1);
    // Shard 0 answers again; no readiness probe runs. Once its hold-down (half a second after
    // one failure) has passed, the next step tries it rather than going without its experts.
    let back = start(&rt, &plan, 0, ports[0]);
    std::thread::sleep(Duration::from_millis(700));
    // Every expert has a copy on shard 0 or 2: the full sums, nothing unserved.
    let got = remote.routed_experts(1, &x, &routes).expect("shard 0 tried again");
    assert_close(&got, &reference(&x, &routes));
    assert_eq!(remote.take_unserved(), Vec::new());
    assert!(back.rows.load(Ordering::Relaxed) > 0, "shard 0 served the step");
    let degraded = remote.degraded().expect("shard 1 still down");
    assert!(
        degraded.contains("expert shard 1") && !degraded.contains("expert shard 0"),
        "{degraded}"
    );
    stop(&rt, back);
    stop(&rt, last);
}
