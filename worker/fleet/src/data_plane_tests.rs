//! The NCCL data plane's control stream (`Expert.DataPlane`) over real gRPC in this process, with
//! a stand-in for the GPU side: a pair is made only when the shard accepts the join; announced
//! exchanges reach the shard's pair in the order announced; the attention rank closing its side
//! aborts the shard's pair and ends the stream; an exchange the shard cannot run ends the pair on
//! both sides, the attention rank told why; a shard started without the data plane, or routing
//! with another placement or model width, refuses the pair by name.

use crate::data_plane::{expert_client, open_pair, PairControl, PairHost, PairLink};
use crate::failover_tests::{free_port, runtime};
use crate::grpc::{expert_server_with, serve_expert};
use crate::placement::PlacementPlan;
use crate::transport::Transport;
use dsv3_engine::{ExpertExecutor, MemoryUse, TokenRoutes};
use dsv3_proto::DataPlaneJoin;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

const HIDDEN: usize = 16;

#[derive(Clone, Debug, PartialEq)]
enum Seen {
    Joined(Vec<u8>),
    Exchange(usize, usize, usize),
    Aborted,
}

/// The shard's GPU side, recording what it is asked to do; exchanges of `refused_layer` fail.
struct Recorder {
    seen: Arc<Mutex<Vec<Seen>>>,
    refused_layer: Option<usize>,
}

impl PairHost for Recorder {
    fn hidden(&self) -> usize {
        HIDDEN
    }

    fn join(&self, id: &[u8]) -> anyhow::Result<Arc<dyn PairLink>> {
        self.seen.lock().unwrap().push(Seen::Joined(id.to_vec()));
        Ok(Arc::new(RecordedPair {
            seen: self.seen.clone(),
            refused_layer: self.refused_layer,
        }))
    }
}

struct RecordedPair {
    seen: Arc<Mutex<Vec<Seen>>>,
    refused_layer: Option<usize>,
}

impl PairLink for RecordedPair {
    fn exchange(&self, layer: usize, rows: usize, k: usize) -> anyhow::Result<()> {
        anyhow::ensure!(
            Some(layer) != self.refused_layer,
            "no experts of layer {layer} on this GPU"
        );
        self.seen.lock().unwrap().push(Seen::Exchange(layer, rows, k));
        Ok(())
    }

    fn abort(&self) {
        self.seen.lock().unwrap().push(Seen::Aborted);
    }
}

/// Activations over gRPC are not what these tests exercise.
struct NoCompute;

impl ExpertExecutor for NoCompute {
    fn routed_experts(&self, layer: usize, _: &[f32], _: &TokenRoutes) -> anyhow::Result<Vec<f32>> {
        anyhow::bail!("layer {layer}: not over gRPC")
    }
}

struct Shard {
    address: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    _stop: oneshot::Sender<()>,
}

fn plan() -> PlacementPlan {
    PlacementPlan::round_robin(8, 1, 0, &[]).expect("plan")
}

fn start(rt: &tokio::runtime::Runtime, with_data_plane: bool, refused_layer: Option<usize>) -> Shard {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let host = with_data_plane.then(|| {
        Arc::new(Recorder {
            seen: seen.clone(),
            refused_layer,
        }) as Arc<dyn PairHost>
    });
    let server = expert_server_with(
        0,
        Arc::new(NoCompute),
        host,
        &plan(),
        "test".into(),
        MemoryUse::default(),
    )
    .expect("shard");
    let port = free_port();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(("127.0.0.1", port)))
        .expect("bind");
    let (stop, stopped) = oneshot::channel::<()>();
    rt.spawn(async move {
        let _ = serve_expert(listener, server, Transport::Plain, async {
            let _ = stopped.await;
        })
        .await;
    });
    Shard {
        address: format!("127.0.0.1:{port}"),
        seen,
        _stop: stop,
    }
}

fn join_message(version: &str, hidden: usize) -> DataPlaneJoin {
    DataPlaneJoin {
        nccl_id: (0..128u8).collect(),
        attention_rank: 3,
        placement_version: version.into(),
        hidden: hidden as u32,
    }
}

/// Opens a pair with `shard` whose attention side's join is `join_here`: what that returned,
/// the pair's control, and the reasons it ends with as they come.
fn open_with<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    shard: &Shard,
    join: DataPlaneJoin,
    join_here: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<(T, PairControl, mpsc::Receiver<String>)> {
    let client = {
        let _runtime = rt.enter(); // the lazy channel spawns its connection on it
        expert_client(&shard.address, &Transport::Plain)?
    };
    let (ended_tx, ended) = mpsc::channel();
    let (mine, control) = rt.block_on(open_pair(client, join, join_here, move |why| {
        let _ = ended_tx.send(why);
    }))?;
    Ok((mine, control, ended))
}

/// Waits up to 5 s for `check` to hold on what the shard saw.
fn until(seen: &Mutex<Vec<Seen>>, check: impl Fn(&[Seen]) -> bool) -> Vec<Seen> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = seen.lock().unwrap().clone();
        if check(&now) || Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn announced_exchanges_reach_the_shard_in_order_and_closing_the_pair_aborts_it() {
    let rt = runtime();
    let shard = start(&rt, true, None);
    let (mine, control, ended) = open_with(&rt, &shard, join_message(&plan().version, HIDDEN), || {
        Ok("this side joined")
    })
    .expect("pair");
    assert_eq!(mine, "this side joined");
    assert_eq!(
        shard.seen.lock().unwrap().first(),
        Some(&Seen::Joined((0..128u8).collect())),
        "the shard joins with the id it was sent"
    );
    for (layer, rows) in [(3, 5), (4, 5), (61, 1)] {
        control.announce(layer, rows, 8).expect("announce");
    }
    let seen = until(&shard.seen, |s| s.len() >= 4);
    assert_eq!(
        seen[1..],
        [
            Seen::Exchange(3, 5, 8),
            Seen::Exchange(4, 5, 8),
            Seen::Exchange(61, 1, 8)
        ]
    );
    drop(control);
    let seen = until(&shard.seen, |s| s.contains(&Seen::Aborted));
    assert_eq!(
        seen.last(),
        Some(&Seen::Aborted),
        "closing the stream aborts the shard's pair"
    );
    let why = ended
        .recv_timeout(Duration::from_secs(5))
        .expect("the attention side hears the end");
    assert!(why.contains("ended"), "{why}");
}

#[test]
fn an_exchange_the_shard_cannot_run_ends_the_pair_on_both_sides() {
    let rt = runtime();
    let shard = start(&rt, true, Some(4));
    let (_, control, ended) = open_with(&rt, &shard, join_message(&plan().version, HIDDEN), || Ok(())).expect("pair");
    control.announce(3, 2, 8).expect("announce");
    control.announce(4, 2, 8).expect("announce");
    let why = ended
        .recv_timeout(Duration::from_secs(5))
        .expect("the attention side hears the failure");
    assert!(
        why.contains("layer 4") && why.contains("no experts of layer 4"),
        "{why}"
    );
    let seen = until(&shard.seen, |s| s.contains(&Seen::Aborted));
    assert_eq!(seen[1..], [Seen::Exchange(3, 2, 8), Seen::Aborted]);
}

#[test]
fn a_shard_refuses_a_pair_it_cannot_serve_by_name() {
    let rt = runtime();
    let refused = |shard: &Shard, join: DataPlaneJoin| -> String {
        let e = open_with(&rt, shard, join, || Ok(())).map(|_| ()).expect_err("refused");
        format!("{e:#}")
    };
    let grpc_only = start(&rt, false, None);
    let e = refused(&grpc_only, join_message(&plan().version, HIDDEN));
    assert!(e.contains("--data-plane grpc"), "{e}");

    let shard = start(&rt, true, None);
    let e = refused(&shard, join_message("another-plan", HIDDEN));
    assert!(e.contains("placement") && e.contains("another-plan"), "{e}");
    let e = refused(&shard, join_message(&plan().version, HIDDEN * 2));
    assert!(e.contains("32") && e.contains("16"), "{e}");
    assert!(shard.seen.lock().unwrap().is_empty(), "no pair was joined");
}
