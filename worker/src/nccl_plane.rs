//! `--data-plane nccl`: the attention rank's and the expert shard's sides of the NCCL data plane
//! (`dsv3_cuda::data_plane` moves the rows; `dsv3_fleet::data_plane` is its control stream).
//!
//! The attention rank keeps one pair per expert shard it needs, joined in the background: at
//! start (shards may come up later than the rank) and again after a shard has gone, so the rank
//! is ready whenever every pair is joined. A pair that ends mid-step (the shard is gone, its
//! stream closed) is aborted at once, so the step's transfers stop waiting; the step's sequences
//! end with an error naming the shard, and the rank is not ready until the pair is joined again.

use anyhow::{bail, Context, Result};
use dsv3_cuda::data_plane::{LayerExchange, NcclExperts, ShardLink, ATTENTION_SIDE};
use dsv3_cuda::experts::PairStream;
use dsv3_cuda::nccl::{self, RankComm};
use dsv3_cuda::CudaExperts;
use dsv3_engine::{ExpertExecutor, TokenRoutes};
use dsv3_fleet::data_plane::{expert_client, open_pair, PairControl, PairHost, PairLink};
use dsv3_fleet::rank::TransportTotals;
use dsv3_fleet::{ExpertBackend, PlacementPlan, Transport, UnservedRows};
use dsv3_proto::DataPlaneJoin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::runtime::Handle;

/// How long either side of a pair waits for the other to join.
const JOIN_DEADLINE: Duration = Duration::from_secs(60);
/// How often pairs that are not joined are tried again, and a stuck step is looked for.
const REJOIN_EVERY: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------- expert shard side

/// An expert shard's experts on its GPU, making pairs for `Expert.DataPlane`.
pub struct ShardPairs {
    pub experts: Arc<CudaExperts>,
    pub hidden: usize,
}

struct ShardPair {
    experts: Arc<CudaExperts>,
    /// Used by the pair's worker thread; `abort` takes it between two exchanges (queuing one
    /// takes microseconds).
    stream: Mutex<PairStream>,
}

impl PairHost for ShardPairs {
    fn hidden(&self) -> usize {
        self.hidden
    }

    fn join(&self, id: &[u8]) -> Result<Arc<dyn PairLink>> {
        let id = nccl::id_from_bytes(id)?;
        let stream = self.experts.join_pair(&id, JOIN_DEADLINE)?;
        Ok(Arc::new(ShardPair {
            experts: self.experts.clone(),
            stream: Mutex::new(stream),
        }))
    }
}

impl PairLink for ShardPair {
    fn exchange(&self, layer: usize, rows: usize, k: usize) -> Result<()> {
        let stream = self.stream.lock().map_err(|_| anyhow::anyhow!("pair poisoned"))?;
        self.experts.serve_exchange(&stream, LayerExchange { layer, rows, k })
    }

    fn abort(&self) {
        if let Ok(stream) = self.stream.lock() {
            stream.comm.abort();
        }
    }
}

// ---------------------------------------------------------------- attention rank side

enum PairState {
    /// Not joined yet, or joined and ended: why, for readiness and errors.
    Apart(String),
    Joined {
        comm: Arc<RankComm>,
        control: PairControl,
        /// Which join made it: a late end of an earlier pair must not end this one.
        generation: u64,
    },
}

struct Pair {
    address: String,
    state: Mutex<PairState>,
    /// Joins tried so far.
    joins: AtomicU64,
}

/// The expert shards of an attention rank over NCCL: the pairs, their readiness and figures.
pub struct NcclShards {
    rank: u32,
    plan: PlacementPlan,
    hidden: usize,
    pairs: Vec<Pair>,
    /// Shards that compute some expert for this rank (the others are never joined).
    in_use: Vec<usize>,
    /// A pair ended since the last step's check: that step's transfers were cut short.
    ended_in_step: AtomicBool,
    /// The exchanges queued since the last step's check (layer, rows).
    announced: Mutex<Vec<(usize, usize)>>,
    /// When the step running now started: a step past `step_deadline` has a shard that does
    /// not answer, and its pairs are ended so the step's transfers stop waiting.
    step_started: Mutex<Option<Instant>>,
    step_deadline: Duration,
    totals: Mutex<TransportTotals>,
}

/// One shard as the model reaches it.
struct Link {
    shards: Arc<NcclShards>,
    shard: usize,
}

impl ShardLink for Link {
    fn announce(&self, exchange: LayerExchange) -> Result<Arc<RankComm>> {
        let pair = &self.shards.pairs[self.shard];
        let announced = {
            let state = pair.state.lock().map_err(|_| anyhow::anyhow!("pair state poisoned"))?;
            match &*state {
                PairState::Joined { comm, control, .. } => control
                    .announce(exchange.layer, exchange.rows, exchange.k)
                    .map(|()| comm.clone()),
                PairState::Apart(why) => bail!(
                    "expert shard {} at {} is not on the NCCL data plane: {why}",
                    self.shard,
                    pair.address
                ),
            }
        };
        match announced {
            Ok(comm) => {
                self.shards.count(exchange);
                Ok(comm)
            }
            Err(e) => {
                self.failed(&format!("{e:#}"));
                Err(e)
            }
        }
    }

    fn failed(&self, why: &str) {
        self.shards.end(self.shard, None, why.to_string());
    }
}

impl NcclShards {
    /// The shards of `plan` at `addresses`, none joined yet; `hidden` is the model's width, and
    /// a step whose exchanges take longer than `step_deadline` ends every pair it uses.
    pub fn new(
        rank: u32,
        plan: PlacementPlan,
        addresses: Vec<String>,
        hidden: usize,
        step_deadline: Duration,
    ) -> Result<Arc<Self>> {
        if addresses.len() != plan.shards.len() {
            bail!(
                "{} expert peers given, the placement plan has {} shards",
                addresses.len(),
                plan.shards.len()
            );
        }
        let owner = Self::owners(&plan, rank)?;
        let in_use = (0..addresses.len()).filter(|&s| owner.contains(&(s as i32))).collect();
        Ok(Arc::new(NcclShards {
            rank,
            hidden,
            pairs: addresses
                .into_iter()
                .map(|address| Pair {
                    address,
                    state: Mutex::new(PairState::Apart("not joined yet".into())),
                    joins: AtomicU64::new(0),
                })
                .collect(),
            plan,
            in_use,
            ended_in_step: AtomicBool::new(false),
            announced: Mutex::new(Vec::new()),
            step_started: Mutex::new(None),
            step_deadline,
            totals: Mutex::new(TransportTotals::default()),
        }))
    }

    /// The shard that computes each expert for attention rank `rank`: of an expert's copies,
    /// ranks take them in turn, so redundant copies share the load.
    fn owners(plan: &PlacementPlan, rank: u32) -> Result<Vec<i32>> {
        (0..plan.num_experts)
            .map(|e| {
                let owners = plan.owners(e);
                if owners.is_empty() {
                    bail!(
                        "expert {e} has no expert shard in the placement plan; over --data-plane nccl every routed \
                         expert runs on the shards"
                    );
                }
                Ok(owners[rank as usize % owners.len()] as i32)
            })
            .collect()
    }

    /// What the model holds: every routed expert on the shards, over these pairs.
    pub fn model_experts(self: &Arc<Self>) -> Result<NcclExperts> {
        Ok(NcclExperts {
            shards: (0..self.pairs.len())
                .map(|shard| {
                    Arc::new(Link {
                        shards: self.clone(),
                        shard,
                    }) as Arc<dyn ShardLink>
                })
                .collect(),
            owner: Self::owners(&self.plan, self.rank)?,
        })
    }

    fn count(&self, e: LayerExchange) {
        let b = e.bytes(self.hidden);
        if let Ok(mut t) = self.totals.lock() {
            t.bytes_sent += (b.rows + b.ids + b.weights) as u64;
            t.bytes_received += b.sums as u64;
            t.calls += 1;
        }
        if let Ok(mut a) = self.announced.lock() {
            if a.last().is_none_or(|&(layer, _)| layer != e.layer) {
                a.push((e.layer, e.rows));
                if let Ok(mut t) = self.totals.lock() {
                    t.layers += 1;
                }
            }
        }
    }

    /// Ends pair `shard` — the one join `generation` made, or whichever is joined (`None`) —
    /// when its shard is gone or an exchange with it failed: its transfers stop waiting.
    fn end(&self, shard: usize, generation: Option<u64>, why: String) {
        let pair = &self.pairs[shard];
        let Ok(mut state) = pair.state.lock() else { return };
        match &*state {
            PairState::Joined {
                comm, generation: g, ..
            } if generation.is_none_or(|want| want == *g) => {
                comm.abort();
                self.ended_in_step.store(true, Ordering::SeqCst);
                eprintln!(
                    "expert shard {shard} at {} left the NCCL data plane: {why}; this rank is not ready until it joins again",
                    pair.address
                );
                *state = PairState::Apart(why);
            }
            // An earlier pair's end, after a new one joined; or a pair not joined.
            _ => {}
        }
    }

    /// Joins every pair in use that is not joined, now and every second from now on, on
    /// `handle`'s runtime; and ends the pairs of a step stuck past its deadline.
    pub fn keep_joined(self: &Arc<Self>, handle: &Handle, transport: Transport) {
        // The watch for a stuck step on a thread of its own: a join can take its whole deadline,
        // and ending pairs calls into NCCL, which may wait on the device.
        let watched = Arc::downgrade(self);
        std::thread::spawn(move || {
            while let Some(shards) = watched.upgrade() {
                shards.end_a_stuck_step();
                drop(shards);
                std::thread::sleep(REJOIN_EVERY);
            }
        });
        let shards = self.clone();
        handle.spawn(async move {
            loop {
                for &s in &shards.in_use {
                    let apart = matches!(shards.pairs[s].state.lock().as_deref(), Ok(PairState::Apart(_)));
                    if apart {
                        if let Err(e) = shards.join(s, &transport).await {
                            shards.set_apart(s, format!("{e:#}"));
                        }
                    }
                }
                tokio::time::sleep(REJOIN_EVERY).await;
            }
        });
    }

    /// Ends every joined pair in use when the step running now has taken longer than the
    /// deadline: a shard that is there but does not answer would hold the step for ever.
    fn end_a_stuck_step(&self) {
        let started = self.step_started.lock().ok().and_then(|s| *s);
        if started.is_some_and(|t| t.elapsed() > self.step_deadline) {
            for &s in &self.in_use {
                self.end(
                    s,
                    None,
                    format!("a step waited on the shards for more than {:?}", self.step_deadline),
                );
            }
        }
    }

    fn set_apart(&self, shard: usize, why: String) {
        if let Ok(mut state) = self.pairs[shard].state.lock() {
            if let PairState::Apart(old) = &*state {
                if *old != why {
                    eprintln!("expert shard {shard} at {}: {why}", self.pairs[shard].address);
                }
            }
            *state = PairState::Apart(why);
        }
    }

    async fn join(self: &Arc<Self>, shard: usize, transport: &Transport) -> Result<()> {
        let address = self.pairs[shard].address.clone();
        let client = expert_client(&address, transport)?;
        let id = nccl::unique_id()?;
        let join = DataPlaneJoin {
            nccl_id: id.to_vec(),
            attention_rank: self.rank,
            placement_version: self.plan.version.clone(),
            hidden: self.hidden as u32,
        };
        let generation = self.pairs[shard].joins.fetch_add(1, Ordering::SeqCst) + 1;
        // The stream may end before the pair is stored as joined: then it is not stored.
        let ended_early: Arc<Mutex<Option<String>>> = Arc::default();
        let (ending, early) = (self.clone(), ended_early.clone());
        let (comm, control) = open_pair(
            client,
            join,
            move || RankComm::join_device(crate::device::GPU, &id, ATTENTION_SIDE, 2, JOIN_DEADLINE),
            move |why| {
                if let Ok(mut e) = early.lock() {
                    *e = Some(why.clone());
                }
                ending.end(shard, Some(generation), why);
            },
        )
        .await
        .with_context(|| format!("joining expert shard {shard} at {address} over NCCL"))?;
        let mut state = self.pairs[shard]
            .state
            .lock()
            .map_err(|_| anyhow::anyhow!("pair state poisoned"))?;
        if let Some(why) = ended_early.lock().ok().and_then(|mut e| e.take()) {
            comm.abort();
            bail!("expert shard {shard} at {address} ended the pair as it joined: {why}");
        }
        *state = PairState::Joined {
            comm: Arc::new(comm),
            control,
            generation,
        };
        eprintln!("expert shard {shard} at {address} joined over NCCL");
        Ok(())
    }
}

impl ExpertExecutor for NcclShards {
    fn routed_experts(&self, layer: usize, _x: &[f32], _routes: &TokenRoutes) -> Result<Vec<f32>> {
        bail!("layer {layer}: over --data-plane nccl the routed experts are reached from the GPU, not the host")
    }
}

impl ExpertBackend for NcclShards {
    fn ready(&self) -> Result<(), String> {
        let apart: Vec<String> = self
            .in_use
            .iter()
            .filter_map(|&s| match self.pairs[s].state.lock().as_deref() {
                Ok(PairState::Joined { .. }) => None,
                Ok(PairState::Apart(why)) => Some(format!("expert shard {s} at {}: {why}", self.pairs[s].address)),
                Err(_) => Some(format!("expert shard {s}: state poisoned")),
            })
            .collect();
        if apart.is_empty() {
            Ok(())
        } else {
            Err(format!("not on the NCCL data plane: {}", apart.join("; ")))
        }
    }

    fn placement_version(&self) -> String {
        self.plan.version.clone()
    }

    fn transport(&self) -> TransportTotals {
        self.totals.lock().map(|t| *t).unwrap_or_default()
    }

    fn stepping(&self, running: bool) {
        if let Ok(mut started) = self.step_started.lock() {
            *started = running.then(Instant::now);
        }
    }

    /// A pair that ended during the step cut its transfers short: every row of the step is
    /// lost (its sequences end with the reason), whatever its routes.
    fn take_unserved(&self) -> Vec<UnservedRows> {
        let announced = self
            .announced
            .lock()
            .map(|mut a| std::mem::take(&mut *a))
            .unwrap_or_default();
        if !self.ended_in_step.swap(false, Ordering::SeqCst) {
            return Vec::new();
        }
        let Some(&(layer, rows)) = announced.first() else {
            return Vec::new();
        };
        vec![UnservedRows {
            layer,
            rows,
            lost: (0..rows).collect(),
            reason: self
                .ready()
                .err()
                .unwrap_or_else(|| "an expert shard left the NCCL data plane".into()),
            masked: false,
        }]
    }
}
