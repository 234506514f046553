//! The control plane of the NCCL data plane (`Expert.DataPlane`, see `fleet.proto`): the stream
//! that makes an (attention rank, expert shard) pair and then announces each MoE layer's
//! transfers. The transfers themselves, and the communicators, belong to the device
//! ([`PairHost`] and [`PairLink`] on the shard; the attention rank's side is given as closures),
//! so this crate needs no GPU.

use anyhow::{anyhow, Result};
use dsv3_proto::expert_client::ExpertClient;
use dsv3_proto::{
    data_plane_event, data_plane_message, DataPlaneEvent, DataPlaneJoin, DataPlaneJoined, DataPlaneMessage,
    LayerExchange,
};
use futures::Stream;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tonic::{Status, Streaming};

/// An expert shard's side of the data plane: joins pairs on its GPU.
pub trait PairHost: Send + Sync {
    /// The model's hidden size (every row exchanged is this wide).
    fn hidden(&self) -> usize;
    /// Joins the pair's communicator `id` as the shard side; blocks until the attention rank
    /// has joined too, and fails past the host's deadline.
    fn join(&self, id: &[u8]) -> Result<Arc<dyn PairLink>>;
}

/// One joined pair, on the shard.
pub trait PairLink: Send + Sync {
    /// Queues an announced exchange on the shard's GPU (does not wait for it).
    fn exchange(&self, layer: usize, rows: usize, k: usize) -> Result<()>;
    /// Ends the pair now: transfers waiting on the attention rank stop (it is gone).
    fn abort(&self);
}

pub type EventStream = Pin<Box<dyn Stream<Item = Result<DataPlaneEvent, Status>> + Send>>;

fn events(rx: mpsc::Receiver<Result<DataPlaneEvent, Status>>) -> EventStream {
    Box::pin(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|event| (event, rx))
    }))
}

/// The shard's side of one `DataPlane` stream: checks the `join`, joins the pair, answers
/// `joined`, then queues each announced exchange in order on a thread of the pair's own. The
/// stream ending, or an exchange the shard cannot run, aborts the pair.
pub(crate) async fn serve_pair(
    host: Arc<dyn PairHost>,
    placement_version: String,
    mut incoming: Streaming<DataPlaneMessage>,
) -> Result<EventStream, Status> {
    let first = incoming
        .message()
        .await?
        .ok_or_else(|| Status::invalid_argument("the data plane stream ended before its `join`"))?;
    let join = match first.kind {
        Some(data_plane_message::Kind::Join(join)) => join,
        _ => {
            return Err(Status::invalid_argument(
                "the data plane's first message must be `join`",
            ))
        }
    };
    if join.placement_version != placement_version {
        return Err(Status::failed_precondition(format!(
            "attention rank {} routes with placement {:?}, this shard with {:?}",
            join.attention_rank, join.placement_version, placement_version
        )));
    }
    if join.hidden as usize != host.hidden() {
        return Err(Status::invalid_argument(format!(
            "attention rank {} exchanges rows of {} values, this shard's model has {}",
            join.attention_rank,
            join.hidden,
            host.hidden()
        )));
    }
    let rank = join.attention_rank;
    let joining = host.clone();
    let link = tokio::task::spawn_blocking(move || joining.join(&join.nccl_id))
        .await
        .map_err(|e| Status::internal(format!("joining the pair failed: {e}")))?
        .map_err(|e| Status::unavailable(format!("{e:#}")))?;
    eprintln!("attention rank {rank} joined this shard over NCCL");
    let (events_tx, events_rx) = mpsc::channel(4);
    let _ = events_tx
        .send(Ok(DataPlaneEvent {
            kind: Some(data_plane_event::Kind::Joined(DataPlaneJoined {})),
        }))
        .await;
    // Exchanges are queued on a thread of the pair's own, in the order announced (queuing may
    // wait on the GPU's lock or, the first time, on NCCL connecting the pair).
    let (work_tx, work_rx) = std::sync::mpsc::channel::<LayerExchange>();
    let worker_link = link.clone();
    let worker_events = events_tx.clone();
    std::thread::spawn(move || {
        for e in work_rx {
            if let Err(err) = worker_link.exchange(e.layer as usize, e.rows as usize, e.k as usize) {
                worker_link.abort();
                let _ = worker_events.blocking_send(Err(Status::internal(format!(
                    "layer {}: {err:#}; the pair is ended",
                    e.layer
                ))));
                return;
            }
        }
    });
    tokio::spawn(async move {
        let why = loop {
            match incoming.message().await {
                Ok(Some(DataPlaneMessage {
                    kind: Some(data_plane_message::Kind::Exchange(e)),
                })) => {
                    if work_tx.send(e).is_err() {
                        break "its exchange failed".to_string();
                    }
                }
                Ok(Some(_)) => break "it sent a second `join`".to_string(),
                Ok(None) => break "it closed the data plane".to_string(),
                Err(status) => break format!("its stream failed: {}", status.message()),
            }
        };
        eprintln!("attention rank {rank}: {why}; its NCCL pair is ended");
        link.abort();
        drop(events_tx);
    });
    Ok(events(events_rx))
}

/// The attention rank's side of one pair's control stream.
pub struct PairControl {
    notices: mpsc::UnboundedSender<DataPlaneMessage>,
}

impl PairControl {
    /// Announces one MoE layer's exchange to the shard (never waits).
    pub fn announce(&self, layer: usize, rows: usize, k: usize) -> Result<()> {
        self.notices
            .send(DataPlaneMessage {
                kind: Some(data_plane_message::Kind::Exchange(LayerExchange {
                    layer: layer as u32,
                    rows: rows as u32,
                    k: k as u32,
                })),
            })
            .map_err(|_| anyhow!("the shard's data plane stream is closed"))
    }
}

/// A client for the data plane of the shard at `address` (made inside a Tokio runtime: its
/// lazy channel connects on it).
pub fn expert_client(address: &str, transport: &crate::Transport) -> Result<ExpertClient<Channel>> {
    Ok(ExpertClient::new(crate::grpc::channel(address, transport)?))
}

/// Makes a pair with the shard behind `client`: sends `join`, runs `join_here` (this rank's
/// side of the communicator, blocking) meanwhile, and returns once both sides have joined.
/// Afterwards `on_end` is called once, with the reason, when the shard ends the stream or it
/// fails (the shard is gone or refused an exchange).
pub async fn open_pair<T: Send + 'static>(
    mut client: ExpertClient<Channel>,
    join: DataPlaneJoin,
    join_here: impl FnOnce() -> Result<T> + Send + 'static,
    on_end: impl FnOnce(String) + Send + 'static,
) -> Result<(T, PairControl)> {
    let (notices, rx) = mpsc::unbounded_channel();
    notices
        .send(DataPlaneMessage {
            kind: Some(data_plane_message::Kind::Join(join)),
        })
        .map_err(|_| anyhow!("data plane stream closed"))?;
    let outgoing = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let here = tokio::task::spawn_blocking(join_here);
    let answer = async {
        let mut events = client.data_plane(outgoing).await?.into_inner();
        match events.message().await? {
            Some(DataPlaneEvent {
                kind: Some(data_plane_event::Kind::Joined(_)),
            }) => Ok(events),
            _ => Err(Status::internal("the shard did not answer `joined`")),
        }
    };
    // A refusal by the shard comes first; this side's join then fails at its own deadline, which
    // is waited for so no join is left running.
    let (answer, here) = tokio::join!(answer, here);
    let mine = here
        .map_err(|e| anyhow!("joining the pair failed: {e}"))
        .and_then(|r| r);
    let mut events = match answer {
        Ok(events) => events,
        Err(status) => return Err(anyhow!("the shard refused the pair: {}", status.message())),
    };
    let mine = mine?;
    tokio::spawn(async move {
        let why = loop {
            match events.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => break "the shard ended the data plane".to_string(),
                Err(status) => break format!("the shard's data plane failed: {}", status.message()),
            }
        };
        on_end(why);
    });
    Ok((mine, PairControl { notices }))
}
