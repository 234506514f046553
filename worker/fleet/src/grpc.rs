//! The fleet's gRPC services and clients: an attention rank and an expert shard behind tonic,
//! and the clients that make remote ones look local (`AttentionRank`, `ExpertExecutor`).

use crate::data_plane::{serve_pair, EventStream, PairHost};
use crate::placement::PlacementPlan;
use crate::rank::{memory_report, AttentionRank, ExpertBackend, TransportTotals, UnavailableExperts, UnservedRows};
use crate::rank_metrics::{attention_registry, metrics_route, shard_registry, ShardCounters};
use crate::transport::Transport;
use anyhow::{bail, ensure, Context, Result};
use dsv3_engine::moe::NO_EXPERT;
use dsv3_engine::{ExpertExecutor, MemoryUse, TokenRoutes};
use dsv3_proto::attention_client::AttentionClient;
use dsv3_proto::attention_server::{Attention, AttentionServer};
use dsv3_proto::expert_client::ExpertClient;
use dsv3_proto::expert_server::{Expert, ExpertServer};
pub use dsv3_proto::Dtype;
use dsv3_proto::{
    AttentionInfo, DataPlaneMessage, ExpertInfo, ExpertReply, ExpertRequest, InfoRequest, ReleaseReply, ReleaseRequest,
    StepReply, StepRequest, Tensor, OTHER_SHARD,
};
use std::sync::Arc;
use std::time::Duration;
use tokio::runtime::Handle;
use tonic::service::Routes;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Request, Response, Status};

/// Activations of a whole batch fit easily; the default 4 MiB does not for long prompts.
const MAX_MESSAGE_BYTES: usize = 1 << 30;
/// HTTP/2 flow-control windows. The 64 KiB default makes a multi-megabyte activation message
/// wait a round trip per window; a layer's dispatch is up to tens of megabytes.
const STREAM_WINDOW_BYTES: u32 = 32 << 20;
const CONNECTION_WINDOW_BYTES: u32 = 64 << 20;

fn internal(e: anyhow::Error) -> Status {
    Status::internal(format!("{e:#}"))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("worker task failed: {e}")))?
        .map_err(internal)
}

// ---------------------------------------------------------------- attention rank service

pub struct AttentionService {
    rank: Arc<dyn AttentionRank>,
}

#[tonic::async_trait]
impl Attention for AttentionService {
    async fn step(&self, request: Request<StepRequest>) -> Result<Response<StepReply>, Status> {
        let rank = self.rank.clone();
        let request = request.into_inner();
        Ok(Response::new(blocking(move || rank.step(request)).await?))
    }

    async fn release(&self, request: Request<ReleaseRequest>) -> Result<Response<ReleaseReply>, Status> {
        let rank = self.rank.clone();
        let seqs = request.into_inner().seqs;
        blocking(move || rank.release(&seqs)).await?;
        Ok(Response::new(ReleaseReply {}))
    }

    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<AttentionInfo>, Status> {
        let rank = self.rank.clone();
        Ok(Response::new(blocking(move || rank.info()).await?))
    }
}

pub fn attention_server(rank: Arc<dyn AttentionRank>) -> AttentionServer<AttentionService> {
    AttentionServer::new(AttentionService { rank })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// A remote attention rank, called from the scheduler's (non-async) thread.
pub struct RemoteAttention {
    address: String,
    client: AttentionClient<Channel>,
    handle: Handle,
    step_timeout: Duration,
}

/// A lazily connecting channel to `address` (`host:port`, or a URI), over `transport`; with TLS
/// the server's certificate must name the host dialled.
pub(crate) fn channel(address: &str, transport: &Transport) -> Result<Channel> {
    channel_to(address, transport, None)
}

/// As [`channel`], the server's certificate naming `server_name` when given.
fn channel_to(address: &str, transport: &Transport, server_name: Option<&str>) -> Result<Channel> {
    let uri = if address.contains("://") {
        address.to_string()
    } else {
        format!("{}://{address}", transport.scheme())
    };
    let mut endpoint = Endpoint::from_shared(uri.clone())
        .with_context(|| format!("`{address}` is not a valid peer address"))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES);
    let host = endpoint.uri().host().unwrap_or_default().to_string();
    if let Some(tls) = transport.client(server_name.unwrap_or(&host)) {
        endpoint = endpoint
            .tls_config(tls)
            .with_context(|| format!("TLS settings for the peer `{address}`"))?;
    }
    Ok(endpoint.connect_lazy())
}

impl RemoteAttention {
    pub fn new(address: &str, transport: &Transport, handle: Handle, step_timeout: Duration) -> Result<Self> {
        let _runtime = handle.enter(); // lazy channels spawn their connection task on it
        let client = AttentionClient::new(channel(address, transport)?)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(RemoteAttention {
            address: address.to_string(),
            client,
            handle,
            step_timeout,
        })
    }

    fn call<T>(
        &self,
        timeout: Duration,
        f: impl std::future::Future<Output = Result<Response<T>, Status>>,
    ) -> Result<T> {
        let result = self.handle.block_on(async { tokio::time::timeout(timeout, f).await });
        match result {
            Err(_) => bail!("attention rank at {} did not answer within {timeout:?}", self.address),
            Ok(Err(status)) => bail!("attention rank at {}: {}", self.address, status.message()),
            Ok(Ok(reply)) => Ok(reply.into_inner()),
        }
    }
}

impl AttentionRank for RemoteAttention {
    fn step(&self, request: StepRequest) -> Result<StepReply> {
        let mut client = self.client.clone();
        self.call(self.step_timeout, async move { client.step(request).await })
    }

    fn release(&self, seqs: &[u64]) -> Result<()> {
        let mut client = self.client.clone();
        let request = ReleaseRequest { seqs: seqs.to_vec() };
        self.call(Duration::from_secs(5), async move { client.release(request).await })
            .map(|_| ())
    }

    fn info(&self) -> Result<AttentionInfo> {
        let mut client = self.client.clone();
        self.call(Duration::from_secs(2), async move { client.info(InfoRequest {}).await })
    }

    fn figures(&self) -> Result<AttentionInfo> {
        bail!("the attention rank at {} serves its own metrics", self.address)
    }
}

// ---------------------------------------------------------------- expert shard service

/// The routed experts an expert shard runs, on whatever device holds them.
pub type ShardExperts = Arc<dyn ExpertExecutor + Send>;

pub struct ExpertService {
    rank: u32,
    experts: ShardExperts,
    /// The NCCL data plane's side of this shard (`--data-plane nccl`).
    data_plane: Option<Arc<dyn PairHost>>,
    held: Vec<u32>,
    placement_version: String,
    device: String,
    memory: MemoryUse,
    served: Arc<ShardCounters>,
}

#[tonic::async_trait]
impl Expert for ExpertService {
    async fn compute(&self, request: Request<ExpertRequest>) -> Result<Response<ExpertReply>, Status> {
        let request = request.into_inner();
        let hidden = request
            .hidden
            .ok_or_else(|| Status::invalid_argument("ExpertRequest.hidden is missing"))?;
        let dtype = hidden.element_type().map_err(Status::invalid_argument)?;
        let x = hidden.to_f32().map_err(Status::invalid_argument)?;
        let (tokens, width) = match hidden.shape[..] {
            [t, w] => (t as usize, w as usize),
            _ => {
                return Err(Status::invalid_argument(format!(
                    "hidden must be 2-D, got shape {:?}",
                    hidden.shape
                )))
            }
        };
        let k = request.k as usize;
        if request.experts.len() != tokens * k || request.weights.len() != tokens * k {
            return Err(Status::invalid_argument(format!(
                "{tokens} tokens × k={k} need {} experts and weights, got {} and {}",
                tokens * k,
                request.experts.len(),
                request.weights.len()
            )));
        }
        let routes = TokenRoutes {
            k,
            experts: request.experts,
            weights: request.weights,
        };
        let experts = self.experts.clone();
        let layer = request.layer as usize;
        let started = std::time::Instant::now();
        let y = blocking(move || experts.routed_experts(layer, &x, &routes)).await?;
        self.served.record(tokens, started.elapsed());
        Ok(Response::new(ExpertReply {
            output: Some(Tensor::from_f32_as(&[tokens, width], &y, dtype)),
        }))
    }

    type DataPlaneStream = EventStream;

    async fn data_plane(
        &self,
        request: Request<tonic::Streaming<DataPlaneMessage>>,
    ) -> Result<Response<EventStream>, Status> {
        let host = self.data_plane.clone().ok_or_else(|| {
            Status::failed_precondition(format!(
                "expert shard {} was started with --data-plane grpc: it takes activations over Expert.Compute, not NCCL",
                self.rank
            ))
        })?;
        let events = serve_pair(host, self.placement_version.clone(), request.into_inner()).await?;
        Ok(Response::new(events))
    }

    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<ExpertInfo>, Status> {
        Ok(Response::new(ExpertInfo {
            rank: self.rank,
            experts: self.held.clone(),
            placement_version: self.placement_version.clone(),
            device: self.device.clone(),
            memory: Some(memory_report(self.memory)),
        }))
    }
}

/// An expert shard's gRPC service and the registry of its `/metrics`.
pub struct Shard {
    pub grpc: ExpertServer<ExpertService>,
    pub metrics: prometheus_client::registry::Registry,
}

/// An expert shard: `experts` (on `device`, holding `memory`) answer for `rank` of `plan`.
pub fn expert_server(
    rank: u32,
    experts: ShardExperts,
    plan: &PlacementPlan,
    device: String,
    memory: MemoryUse,
) -> Result<Shard> {
    expert_server_with(rank, experts, None, plan, device, memory)
}

/// [`expert_server`] that also makes NCCL pairs through `data_plane` (`--data-plane nccl`).
pub fn expert_server_with(
    rank: u32,
    experts: ShardExperts,
    data_plane: Option<Arc<dyn PairHost>>,
    plan: &PlacementPlan,
    device: String,
    memory: MemoryUse,
) -> Result<Shard> {
    let held = plan.shards.get(rank as usize).cloned().with_context(|| {
        format!(
            "expert rank {rank} is outside the placement plan ({} shards)",
            plan.shards.len()
        )
    })?;
    let served = Arc::new(ShardCounters::default());
    let metrics = shard_registry(rank, held.len(), device.clone(), memory, served.clone());
    let grpc = ExpertServer::new(ExpertService {
        rank,
        experts,
        data_plane,
        held,
        placement_version: plan.version.clone(),
        device,
        memory,
        served,
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    Ok(Shard { grpc, metrics })
}

/// Routed experts on remote shards: each token goes only to the shards that own its top-k
/// experts (replicas spread by token), and the partial sums come back to be added up.
///
/// A shard that cannot be reached is marked down and its part of the step goes, in the same step,
/// to the other copies of its experts (the placement plan's redundant ones); the step fails
/// only when an expert it needs has no live copy. A down shard is probed with the rank's
/// readiness checks and takes its share again once it answers after a hold-down.
pub struct RemoteExperts {
    plan: PlacementPlan,
    addresses: Vec<String>,
    clients: Vec<ExpertClient<Channel>>,
    /// Per shard: whether it is marked down, and when a probe may bring it back.
    health: Vec<std::sync::Mutex<ShardHealth>>,
    handle: Handle,
    timeout: Duration,
    /// What the activations travel as, both ways.
    dtype: Dtype,
    totals: std::sync::Mutex<TransportTotals>,
    /// What tokens routed to an expert with no live copy get.
    unavailable: UnavailableExperts,
    /// The rows computed without such an expert, until the rank takes them.
    unserved: std::sync::Mutex<Vec<UnservedRows>>,
}

impl RemoteExperts {
    pub fn new(
        plan: PlacementPlan,
        addresses: Vec<String>,
        transport: &Transport,
        handle: Handle,
        timeout: Duration,
        dtype: Dtype,
    ) -> Result<Self> {
        if addresses.len() != plan.shards.len() {
            bail!(
                "{} expert peers given, the placement plan has {} shards",
                addresses.len(),
                plan.shards.len()
            );
        }
        let _runtime = handle.enter(); // lazy channels spawn their connection task on it
        let clients = addresses
            .iter()
            .map(|a| {
                Ok(ExpertClient::new(channel(a, transport)?)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES))
            })
            .collect::<Result<_>>()?;
        Ok(RemoteExperts {
            health: addresses.iter().map(|_| Default::default()).collect(),
            plan,
            addresses,
            clients,
            handle,
            timeout,
            dtype,
            totals: Default::default(),
            unavailable: UnavailableExperts::FailCall,
            unserved: Default::default(),
        })
    }

    /// Past [`UnavailableExperts::FailCall`], an expert with no live copy no longer fails the
    /// call: the rows routed to it get their other experts' sums (renormalised when masking)
    /// and are recorded ([`ExpertBackend::take_unserved`]) for the rank.
    pub fn on_unavailable_experts(mut self, mode: UnavailableExperts) -> Self {
        self.unavailable = mode;
        self
    }

    /// Experts every copy of which is marked down, as a list for messages.
    fn experts_without_a_live_copy(&self) -> Vec<String> {
        (0..self.plan.num_experts)
            .filter(|&e| {
                let owners = self.plan.owners(e);
                !owners.is_empty() && owners.iter().all(|&s| self.is_down(s))
            })
            .map(|e| e.to_string())
            .collect()
    }

    fn no_live_copy(&self, layer: usize, experts: &[u32]) -> String {
        let mut owners: Vec<usize> = experts.iter().flat_map(|&e| self.plan.owners(e)).collect();
        owners.sort_unstable();
        owners.dedup();
        let held_by: Vec<String> = owners.iter().map(|&s| format!("{s} ({})", self.addresses[s])).collect();
        let names: Vec<String> = experts.iter().map(u32::to_string).collect();
        format!(
            "expert{} {} of layer {layer} {} no live copy: shard{} {} failed",
            if experts.len() > 1 { "s" } else { "" },
            names.join(", "),
            if experts.len() > 1 { "have" } else { "has" },
            if owners.len() > 1 { "s" } else { "" },
            held_by.join(", ")
        )
    }

    fn is_down(&self, shard: usize) -> bool {
        self.health[shard].lock().map(|h| h.down).unwrap_or(true)
    }

    /// Down, with its hold-down passed: a step may try it again.
    fn due_for_retry(&self, shard: usize) -> bool {
        self.health[shard]
            .lock()
            .map(|h| h.down && h.retry_at.is_none_or(|t| std::time::Instant::now() >= t))
            .unwrap_or(false)
    }

    fn any_shard_live(&self) -> bool {
        (0..self.health.len()).any(|s| !self.is_down(s))
    }

    /// After a failed call or probe: down, and held down longer each time it fails again
    /// without a successful call in between (a shard whose probe answers but whose calls hang
    /// would otherwise be brought back at every probe). A retry that fails while it is down
    /// holds it down again for as long, not longer (steps retry a last copy; that alone must
    /// not keep the probe from bringing it back).
    fn mark_down(&self, shard: usize, why: &str) {
        let Ok(mut h) = self.health[shard].lock() else { return };
        if !h.down {
            eprintln!(
                "expert shard {shard} at {}: {why}; its experts go to their other copies until it answers again",
                self.addresses[shard]
            );
            h.down = true;
            h.failures = h.failures.saturating_add(1);
        }
        let hold = Duration::from_millis(500) * 2u32.saturating_pow(h.failures.saturating_sub(1).min(6));
        h.retry_at = Some(std::time::Instant::now() + hold);
    }

    /// After a probe answered: back in use once its hold-down has passed.
    fn probe_answered(&self, shard: usize) {
        let Ok(mut h) = self.health[shard].lock() else { return };
        if h.down && h.retry_at.is_none_or(|t| std::time::Instant::now() >= t) {
            h.down = false;
            eprintln!(
                "expert shard {shard} at {} answers again and takes its share",
                self.addresses[shard]
            );
        }
    }

    /// After a call answered: its failures are forgiven, and a shard tried while down is back.
    fn call_answered(&self, shard: usize) {
        if let Ok(mut h) = self.health[shard].lock() {
            h.failures = 0;
            if h.down {
                h.down = false;
                eprintln!(
                    "expert shard {shard} at {} answers again and takes its share",
                    self.addresses[shard]
                );
            }
        }
    }

    /// The shard that computes slot `j` of token `t` (`expert`), among the copies not marked
    /// down. With every copy down: all of them (one may be back before the probe says so) when
    /// the call would fail without them; otherwise those whose hold-down has passed, so a
    /// shard that missed one probe is tried again by the next step rather than costing its
    /// tokens until the probe brings it back, while a step does not wait on one that has just
    /// failed. `None`: no copy to use.
    fn pick(&self, layer: usize, t: usize, expert: u32, excluded: &[bool]) -> Result<Option<usize>> {
        let owners = self.plan.owners(expert);
        if owners.is_empty() {
            bail!("expert {expert} of layer {layer} has no shard in the placement plan");
        }
        let usable: Vec<usize> = owners.iter().copied().filter(|&s| !excluded[s]).collect();
        let live: Vec<usize> = usable.iter().copied().filter(|&s| !self.is_down(s)).collect();
        let choice = if !live.is_empty() {
            live
        } else if self.unavailable == UnavailableExperts::FailCall {
            usable
        } else {
            usable.into_iter().filter(|&s| self.due_for_retry(s)).collect()
        };
        Ok((!choice.is_empty()).then(|| choice[t % choice.len()]))
    }

    /// One round: the (token, slot) pairs in `pending` sent to their shards, the answers added
    /// into `out`. Returns the pairs of the shards that failed, which are marked down and
    /// `excluded` for the rest of the step. A pair whose expert has no copy left goes to
    /// `lost` when unserved rows are recorded, and fails the call otherwise.
    #[allow(clippy::too_many_arguments)]
    fn exchange(
        &self,
        layer: usize,
        x: &[f32],
        routes: &TokenRoutes,
        pending: &[(usize, usize)],
        excluded: &mut [bool],
        lost: &mut Vec<(usize, usize)>,
        out: &mut [f32],
    ) -> Result<Vec<(usize, usize)>> {
        let tokens = routes.tokens();
        let width = x.len() / tokens.max(1);
        let k = routes.k;
        let shards = self.plan.shards.len();
        // Per token: the shard of each of its pending slots.
        let mut assigned: Vec<Vec<Option<usize>>> = Vec::new();
        let mut token_of: Vec<usize> = Vec::new();
        for &(t, j) in pending {
            if token_of.last() != Some(&t) {
                token_of.push(t);
                assigned.push(vec![None; k]);
            }
            let expert = routes.experts[t * k + j];
            let Some(shard) = self.pick(layer, t, expert, excluded)? else {
                if self.unavailable == UnavailableExperts::FailCall {
                    bail!("{}", self.no_live_copy(layer, &[expert]));
                }
                lost.push((t, j));
                continue;
            };
            if let Some(a) = assigned.last_mut() {
                a[j] = Some(shard);
            }
        }
        // Per shard: the token rows it gets and their routing slots (other slots masked).
        let mut rows: Vec<Vec<usize>> = vec![Vec::new(); shards];
        let mut slots: Vec<(Vec<u32>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); shards];
        for (&t, mine) in token_of.iter().zip(&assigned) {
            for s in 0..shards {
                if !mine.contains(&Some(s)) {
                    continue;
                }
                rows[s].push(t);
                for (j, shard) in mine.iter().enumerate() {
                    let i = t * k + j;
                    let (e, w) = if *shard == Some(s) {
                        (routes.experts[i], routes.weights[i])
                    } else {
                        (OTHER_SHARD, 0.0)
                    };
                    slots[s].0.push(e);
                    slots[s].1.push(w);
                }
            }
        }
        let mut calls = Vec::new();
        for (s, (experts, weights)) in slots.into_iter().enumerate() {
            if rows[s].is_empty() {
                continue;
            }
            let mut hidden = Vec::with_capacity(rows[s].len() * width);
            for &t in &rows[s] {
                hidden.extend_from_slice(&x[t * width..(t + 1) * width]);
            }
            let request = ExpertRequest {
                layer: layer as u32,
                hidden: Some(Tensor::from_f32_as(&[rows[s].len(), width], &hidden, self.dtype)),
                k: k as u32,
                experts,
                weights,
            };
            let mut client = self.clients[s].clone();
            let timeout = self.timeout;
            calls.push((s, async move {
                tokio::time::timeout(timeout, client.compute(request)).await
            }));
        }
        let (order, futures): (Vec<usize>, Vec<_>) = calls.into_iter().unzip();
        let element = self.dtype.bytes() as usize;
        let sent: usize = order.iter().map(|&s| rows[s].len() * width * element).sum();
        let started = std::time::Instant::now();
        let replies = self.handle.block_on(futures::future::join_all(futures));
        if let Ok(mut totals) = self.totals.lock() {
            totals.seconds += started.elapsed().as_secs_f64();
            totals.bytes_sent += sent as u64;
            totals.bytes_received += sent as u64;
            totals.calls += order.len() as u64;
        }
        let mut failed = Vec::new();
        for (s, reply) in order.into_iter().zip(replies) {
            // Only the shard being unreachable moves its work to the copies; an answer that
            // refuses the request would be refused by them too, so it fails the step.
            let unreachable = match reply {
                Err(_) => format!("did not answer within {:?}", self.timeout),
                Ok(Err(status)) if is_unreachable(&status) => status.message().to_string(),
                Ok(Err(status)) => bail!("expert shard {s} at {}: {}", self.addresses[s], status.message()),
                Ok(Ok(r)) => {
                    let y = r
                        .into_inner()
                        .output
                        .context("expert reply without output")?
                        .to_f32()
                        .map_err(|e| anyhow::anyhow!("expert shard {s}: {e}"))?;
                    ensure!(
                        y.len() == rows[s].len() * width,
                        "expert shard {s} returned {} values for {} tokens",
                        y.len(),
                        rows[s].len()
                    );
                    for (row, &t) in y.chunks_exact(width).zip(&rows[s]) {
                        for (o, v) in out[t * width..(t + 1) * width].iter_mut().zip(row) {
                            *o += v;
                        }
                    }
                    self.call_answered(s);
                    continue;
                }
            };
            self.mark_down(s, &unreachable);
            excluded[s] = true;
            for (&t, mine) in token_of.iter().zip(&assigned) {
                failed.extend((0..k).filter(|&j| mine[j] == Some(s)).map(|j| (t, j)));
            }
        }
        failed.sort_unstable();
        Ok(failed)
    }
}

impl RemoteExperts {
    /// Records the rows whose (token, slot) pairs in `lost` had no live copy; when masking,
    /// scales each such row's sum so its remaining weights add up to the route's total.
    fn record_unserved(
        &self,
        layer: usize,
        routes: &TokenRoutes,
        lost: &[(usize, usize)],
        out: &mut [f32],
    ) -> Result<()> {
        let k = routes.k;
        let width = out.len() / routes.tokens().max(1);
        let masked = self.unavailable == UnavailableExperts::Mask;
        // Per token: the weight of its slots that went without an expert.
        let mut gone = vec![0.0f32; routes.tokens()];
        for &(t, j) in lost {
            gone[t] += routes.weights[t * k + j];
        }
        let mut rows: Vec<usize> = lost.iter().map(|&(t, _)| t).collect();
        rows.sort_unstable();
        rows.dedup();
        if masked {
            for &t in &rows {
                let slots = t * k..(t + 1) * k;
                // Experts the caller runs itself are summed apart from these rows: their
                // weights cannot be rescaled here.
                ensure!(
                    !routes.experts[slots.clone()].contains(&NO_EXPERT),
                    "layer {layer}: experts cannot be masked out of routes that keep some experts on the attention rank"
                );
                let total: f32 = routes.weights[slots].iter().sum();
                let kept = total - gone[t];
                // A token left with no expert keeps only its shared expert.
                let scale = if kept > f32::EPSILON * total.abs() {
                    total / kept
                } else {
                    0.0
                };
                for v in &mut out[t * width..(t + 1) * width] {
                    *v *= scale;
                }
            }
        }
        let mut experts: Vec<u32> = lost.iter().map(|&(t, j)| routes.experts[t * k + j]).collect();
        experts.sort_unstable();
        experts.dedup();
        let record = UnservedRows {
            layer,
            rows: routes.tokens(),
            lost: rows,
            reason: self.no_live_copy(layer, &experts),
            masked,
        };
        if let Ok(mut u) = self.unserved.lock() {
            u.push(record);
        }
        Ok(())
    }
}

impl ExpertExecutor for RemoteExperts {
    fn routed_experts(&self, layer: usize, x: &[f32], routes: &TokenRoutes) -> Result<Vec<f32>> {
        let mut out = vec![0.0f32; x.len()];
        self.routed_experts_into(layer, x, routes, &mut out)?;
        Ok(out)
    }

    /// Slots marked [`NO_EXPERT`] (experts the caller runs itself) go nowhere; a token with no
    /// other slot is not sent at all.
    fn routed_experts_into(&self, layer: usize, x: &[f32], routes: &TokenRoutes, out: &mut [f32]) -> Result<()> {
        ensure!(
            out.len() == x.len(),
            "routed experts of layer {layer}: {} output values for {} inputs",
            out.len(),
            x.len()
        );
        out.fill(0.0);
        let k = routes.k;
        let mut pending: Vec<(usize, usize)> = (0..routes.tokens())
            .flat_map(|t| (0..k).map(move |j| (t, j)))
            .filter(|&(t, j)| routes.experts[t * k + j] != NO_EXPERT)
            .collect();
        // Each round excludes at least one more shard, so this ends within `shards` rounds.
        let mut excluded = vec![false; self.plan.shards.len()];
        let mut lost = Vec::new();
        while !pending.is_empty() {
            pending = self.exchange(layer, x, routes, &pending, &mut excluded, &mut lost, out)?;
        }
        if !lost.is_empty() {
            // Masking every route of every token would leave only the shared expert.
            ensure!(
                self.any_shard_live(),
                "layer {layer}: no expert shard answers ({})",
                self.addresses.join(", ")
            );
            self.record_unserved(layer, routes, &lost, out)?;
        }
        if let Ok(mut totals) = self.totals.lock() {
            totals.layers += 1;
        }
        Ok(())
    }
}

impl ExpertBackend for RemoteExperts {
    /// Probes every shard (which also brings a shard marked down back into use): ready while
    /// every expert has a live copy.
    fn ready(&self) -> Result<(), String> {
        let probes: Vec<_> = self
            .clients
            .iter()
            .map(|c| {
                let mut c = c.clone();
                async move { tokio::time::timeout(Duration::from_secs(1), c.info(InfoRequest {})).await }
            })
            .collect();
        let answers = self.handle.block_on(futures::future::join_all(probes));
        let mut problems = Vec::new();
        for (s, answer) in answers.into_iter().enumerate() {
            let problem = match answer {
                Ok(Ok(info)) if info.get_ref().placement_version == self.plan.version => None,
                Ok(Ok(info)) => Some(format!(
                    "expert shard {s} runs placement {} but this rank uses {}",
                    info.get_ref().placement_version,
                    self.plan.version
                )),
                Ok(Err(status)) => Some(format!(
                    "expert shard {s} at {}: {}",
                    self.addresses[s],
                    status.message()
                )),
                Err(_) => Some(format!("expert shard {s} at {} does not answer", self.addresses[s])),
            };
            match &problem {
                None => self.probe_answered(s),
                Some(why) if !self.is_down(s) => self.mark_down(s, why),
                Some(_) => {}
            }
            problems.extend(problem);
        }
        let uncovered = self.experts_without_a_live_copy();
        let masking = self.unavailable == UnavailableExperts::Mask && self.any_shard_live();
        if uncovered.is_empty() || masking {
            Ok(())
        } else {
            Err(format!(
                "{}; experts {} have no live copy",
                problems.join("; "),
                uncovered.join(", ")
            ))
        }
    }

    fn take_unserved(&self) -> Vec<UnservedRows> {
        self.unserved
            .lock()
            .map(|mut u| std::mem::take(&mut *u))
            .unwrap_or_default()
    }

    fn degraded(&self) -> Option<String> {
        let down: Vec<String> = (0..self.addresses.len())
            .filter(|&s| self.is_down(s))
            .map(|s| format!("expert shard {s} at {}", self.addresses[s]))
            .collect();
        let masked = self.experts_without_a_live_copy();
        (!down.is_empty()).then(|| {
            if masked.is_empty() {
                format!("{} down; its experts run on their other copies", down.join(", "))
            } else {
                format!(
                    "{} down; experts {} have no live copy and are masked out of routing",
                    down.join(", "),
                    masked.join(", ")
                )
            }
        })
    }

    fn placement_version(&self) -> String {
        self.plan.version.clone()
    }

    fn transport(&self) -> TransportTotals {
        self.totals.lock().map(|t| *t).unwrap_or_default()
    }
}

/// Whether a call's status says the shard could not be reached (gone, restarting, cut off),
/// rather than that it refused the request.
fn is_unreachable(status: &Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
    )
}

#[derive(Default)]
struct ShardHealth {
    down: bool,
    /// Failures since its last answered call.
    failures: u32,
    /// Before this, an answered probe does not bring it back, nor does a step try it while it
    /// is an expert's last copy.
    retry_at: Option<std::time::Instant>,
}

/// Serves `routes` (a rank's gRPC services and its `/metrics`) on `listener` over `transport`
/// until `shutdown` resolves: gRPC over HTTP/2, and HTTP/1.1 too for Prometheus' scrapes.
async fn serve(
    listener: tokio::net::TcpListener,
    routes: Routes,
    transport: &Transport,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut server = Server::builder();
    if let Some(tls) = transport.server() {
        server = server
            .tls_config(tls)
            .context("the TLS certificate and key do not make a server identity")?;
    }
    server
        .accept_http1(true)
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}

/// One standard gRPC health check of the whole server at `address` over `transport`, as a
/// Kubernetes gRPC probe makes (which cannot speak TLS); with TLS the server's certificate must
/// name `server_name` (default: the host dialled).
pub async fn check_health(
    address: &str,
    transport: &Transport,
    server_name: Option<&str>,
    timeout: Duration,
) -> Result<()> {
    use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};
    let mut client = HealthClient::new(channel_to(address, transport, server_name)?);
    let reply = tokio::time::timeout(timeout, client.check(HealthCheckRequest { service: String::new() }))
        .await
        .map_err(|_| anyhow::anyhow!("{address}: no answer within {} s", timeout.as_secs_f64()))?
        .map_err(|status| anyhow::anyhow!("{address}: {}", status.message()))?;
    match reply.into_inner().status() {
        ServingStatus::Serving => Ok(()),
        other => bail!("{address} reports {}", other.as_str_name()),
    }
}

/// Serves attention rank `number` (plus the standard gRPC health service and `GET /metrics`)
/// until `shutdown` resolves.
pub async fn serve_attention(
    listener: tokio::net::TcpListener,
    number: u32,
    rank: Arc<dyn AttentionRank>,
    transport: Transport,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<AttentionServer<AttentionService>>().await;
    let routes = Routes::from(metrics_route(attention_registry(number, rank.clone())))
        .add_service(health)
        .add_service(attention_server(rank));
    serve(listener, routes, &transport, shutdown).await
}

/// Serves an expert shard (plus the standard gRPC health service and `GET /metrics`) until
/// `shutdown` resolves.
pub async fn serve_expert(
    listener: tokio::net::TcpListener,
    shard: Shard,
    transport: Transport,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<ExpertServer<ExpertService>>().await;
    let routes = Routes::from(metrics_route(shard.metrics))
        .add_service(health)
        .add_service(shard.grpc);
    serve(listener, routes, &transport, shutdown).await
}
