//! `/metrics` of an attention rank and of an expert shard, served on the rank's gRPC port (as
//! HTTP/1.1 beside gRPC's HTTP/2, so a pod has one port): what a PodMonitor scrapes per pod and
//! what a per-pod autoscaling metric reads. The router's `/metrics` covers the fleet as a whole;
//! these say how each rank is doing. Every series carries the rank number.

use crate::rank::AttentionRank;
use dsv3_engine::MemoryUse;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// What an expert shard has served since start (updated by its gRPC service).
#[derive(Debug, Default)]
pub struct ShardCounters {
    /// MoE layers computed (one dispatch from one attention rank each).
    pub layers: AtomicU64,
    /// Token rows computed.
    pub tokens: AtomicU64,
    /// Nanoseconds spent computing them.
    pub busy_nanos: AtomicU64,
}

impl ShardCounters {
    pub fn record(&self, tokens: usize, elapsed: std::time::Duration) {
        self.layers.fetch_add(1, Ordering::Relaxed);
        self.tokens.fetch_add(tokens as u64, Ordering::Relaxed);
        self.busy_nanos
            .fetch_add(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }
}

/// An encoder writing every series with the same `rank` label.
struct RankEncoder<'a, 'b> {
    encoder: &'a mut DescriptorEncoder<'b>,
    rank: String,
}

impl RankEncoder<'_, '_> {
    fn gauge(&mut self, name: &str, help: &str, value: f64) -> Result<(), std::fmt::Error> {
        let gauge = ConstGauge::new(value);
        let mut family = self.encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
        gauge.encode(family.encode_family(&[("rank", self.rank.as_str())])?)
    }

    fn counter(&mut self, name: &str, help: &str, value: f64) -> Result<(), std::fmt::Error> {
        let counter = ConstCounter::new(value);
        let mut family = self
            .encoder
            .encode_descriptor(name, help, None, counter.metric_type())?;
        counter.encode(family.encode_family(&[("rank", self.rank.as_str())])?)
    }

    /// `dsv3_rank_memory_bytes{kind}`, as the router reports it for every attention rank.
    fn memory(&mut self, device: &str, m: MemoryUse) -> Result<(), std::fmt::Error> {
        let probe = ConstGauge::new(0.0f64);
        let mut family = self.encoder.encode_descriptor(
            "dsv3_rank_memory_bytes",
            "Memory this rank holds on its device, by kind (weights, kv_cache, workspace).",
            None,
            probe.metric_type(),
        )?;
        for (kind, bytes) in [
            ("weights", m.weights),
            ("kv_cache", m.kv_cache),
            ("workspace", m.workspace),
        ] {
            let labels = [("rank", self.rank.as_str()), ("device", device), ("kind", kind)];
            ConstGauge::new(bytes as f64).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

struct AttentionCollector {
    rank: Arc<dyn AttentionRank>,
    number: u32,
}

impl std::fmt::Debug for AttentionCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttentionCollector").finish_non_exhaustive()
    }
}

impl Collector for AttentionCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut out = RankEncoder {
            encoder: &mut encoder,
            rank: self.number.to_string(),
        };
        // A rank that cannot report (its state lock poisoned by a failed step) is not ready.
        let Ok(info) = self.rank.figures() else {
            return out.gauge("dsv3_rank_ready", READY_HELP, 0.0);
        };
        out.gauge(
            "dsv3_rank_ready",
            READY_HELP,
            if info.experts_ready { 1.0 } else { 0.0 },
        )?;
        out.gauge(
            "dsv3_rank_sequences",
            "Sequences this attention rank holds (prefilling or decoding): the per-pod load an autoscaler reads.",
            info.sequences as f64,
        )?;
        let usage = if info.total_blocks == 0 {
            0.0
        } else {
            f64::from(info.total_blocks - info.free_blocks.min(info.total_blocks)) / f64::from(info.total_blocks)
        };
        out.gauge(
            "dsv3_rank_kv_cache_usage_perc",
            "Fraction of this rank's KV cache blocks in use (0 to 1).",
            usage,
        )?;
        out.gauge(
            "dsv3_rank_kv_cache_blocks",
            "KV cache blocks this rank has in all.",
            f64::from(info.total_blocks),
        )?;
        out.counter("dsv3_rank_steps", "Steps this rank ran since start.", info.steps as f64)?;
        out.counter(
            "dsv3_rank_step_seconds",
            "Seconds this rank spent inside steps since start.",
            info.step_seconds,
        )?;
        out.counter(
            "dsv3_rank_expert_wait_seconds",
            "Seconds this rank's steps waited on remote expert shards since start.",
            info.expert_seconds,
        )?;
        let m = info.memory.unwrap_or_default();
        out.memory(
            &info.device,
            MemoryUse {
                weights: m.weight_bytes,
                kv_cache: m.kv_cache_bytes,
                workspace: m.workspace_bytes,
            },
        )
    }
}

const READY_HELP: &str = "1 when this rank can serve (an attention rank: every expert shard it needs answers).";

struct ShardCollector {
    number: u32,
    experts: usize,
    device: String,
    memory: MemoryUse,
    counters: Arc<ShardCounters>,
}

impl std::fmt::Debug for ShardCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardCollector").finish_non_exhaustive()
    }
}

impl Collector for ShardCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut out = RankEncoder {
            encoder: &mut encoder,
            rank: self.number.to_string(),
        };
        out.gauge("dsv3_rank_ready", READY_HELP, 1.0)?;
        out.gauge(
            "dsv3_shard_experts",
            "Routed experts this shard holds (over all MoE layers, counted per layer).",
            self.experts as f64,
        )?;
        let c = &self.counters;
        out.counter(
            "dsv3_shard_layers",
            "MoE layers this shard computed since start (one attention rank's dispatch each).",
            c.layers.load(Ordering::Relaxed) as f64,
        )?;
        out.counter(
            "dsv3_shard_tokens",
            "Token rows this shard computed since start.",
            c.tokens.load(Ordering::Relaxed) as f64,
        )?;
        out.counter(
            "dsv3_shard_busy_seconds",
            "Seconds this shard spent computing since start.",
            c.busy_nanos.load(Ordering::Relaxed) as f64 / 1e9,
        )?;
        out.memory(&self.device, self.memory)
    }
}

/// The registry of an attention rank's metrics.
pub fn attention_registry(number: u32, rank: Arc<dyn AttentionRank>) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(AttentionCollector { rank, number }));
    registry
}

/// The registry of an expert shard's metrics.
pub fn shard_registry(
    number: u32,
    experts: usize,
    device: String,
    memory: MemoryUse,
    counters: Arc<ShardCounters>,
) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(ShardCollector {
        number,
        experts,
        device,
        memory,
        counters,
    }));
    registry
}

/// `GET /metrics` over `registry`, in the Prometheus text format.
pub fn metrics_route(registry: Registry) -> axum::Router {
    use axum::http::{header, StatusCode};
    use axum::response::IntoResponse;
    let registry = Arc::new(registry);
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let registry = registry.clone();
            async move {
                // The collectors may wait on a step in progress: off the async workers.
                let text = tokio::task::spawn_blocking(move || {
                    let mut out = String::new();
                    prometheus_client::encoding::prometheus_text::encode(&mut out, &registry).map(|()| out)
                })
                .await;
                match text {
                    Ok(Ok(text)) => (
                        [(
                            header::CONTENT_TYPE,
                            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                        )],
                        text,
                    )
                        .into_response(),
                    _ => (StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics").into_response(),
                }
            }
        }),
    )
}
