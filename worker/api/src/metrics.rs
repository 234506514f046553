//! Prometheus metrics (prometheus-client, Prometheus text format 0.0.4).
//!
//! Request-side metrics are recorded by the handlers; load figures (running, waiting, KV cache,
//! expert load) are read from [`Backend::stats`] on each scrape. Every series carries
//! `model_name`, and the serving metrics are named as vLLM names them with `dsv3_` for `vllm:`
//! (`dsv3_num_requests_waiting` is `vllm:num_requests_waiting`; the table is in the README), so a
//! vLLM dashboard or autoscaler reads them by swapping the prefix. Label cardinality is bounded:
//! finish reasons, HTTP statuses the server produces, and MoE layers (≤ 61); never one series
//! per expert.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::backend::Backend;

/// Why a request ended, as counted in `dsv3_request_success_total{finished_reason}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// End of sequence, stop token or stop string.
    Stop,
    /// max_tokens or the context.
    Length,
    /// The backend failed mid-request.
    Error,
    /// The client went away before the end.
    Abort,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Stop => "stop",
            Outcome::Length => "length",
            Outcome::Error => "error",
            Outcome::Abort => "abort",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FinishLabels {
    finished_reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: u16,
}

/// The metrics of one front end.
pub struct Metrics {
    registry: Registry,
    ttft: Histogram,
    itl: Histogram,
    e2e: Histogram,
    queue: Histogram,
    prefill: Histogram,
    decode: Histogram,
    prompt_tokens: Counter,
    prefix_cache_hits: Counter,
    masked_expert_routes: Counter,
    generation_tokens: Counter,
    finished: Family<FinishLabels, Counter>,
    http_errors: Family<StatusLabels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// The metrics of a front end serving `model_name` from `backend`.
    pub fn new(backend: Arc<dyn Backend>, model_name: &str) -> Self {
        let labels = [(Cow::Borrowed("model_name"), Cow::Owned(model_name.to_string()))];
        let mut registry = Registry::with_labels(labels.into_iter());
        // 1 ms .. ~65 s
        let ttft = Histogram::new(exponential_buckets(0.001, 2.0, 17));
        // 0.5 ms .. ~16 s
        let itl = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        // 10 ms .. ~22 min
        let e2e = Histogram::new(exponential_buckets(0.01, 2.0, 18));
        // 0.1 ms .. ~14 min: a queue is empty or long
        let queue = Histogram::new(exponential_buckets(0.0001, 2.0, 24));
        let prefill = Histogram::new(exponential_buckets(0.001, 2.0, 17));
        let decode = Histogram::new(exponential_buckets(0.01, 2.0, 18));
        let prompt_tokens = Counter::default();
        let prefix_cache_hits = Counter::default();
        let masked_expert_routes = Counter::default();
        let generation_tokens = Counter::default();
        let finished = Family::<FinishLabels, Counter>::default();
        let http_errors = Family::<StatusLabels, Counter>::default();
        for (name, help, histogram) in [
            (
                "dsv3_time_to_first_token_seconds",
                "Time from receiving a request to its first generated token",
                &ttft,
            ),
            (
                "dsv3_inter_token_latency_seconds",
                "Time between consecutive generated tokens of a request",
                &itl,
            ),
            (
                "dsv3_e2e_request_latency_seconds",
                "Time from receiving a request to its end",
                &e2e,
            ),
            (
                "dsv3_request_queue_time_seconds",
                "Time from receiving a request to its first step (waiting for admission)",
                &queue,
            ),
            (
                "dsv3_request_prefill_time_seconds",
                "Time from a request's first step to its first token (prefill)",
                &prefill,
            ),
            (
                "dsv3_request_decode_time_seconds",
                "Time from a request's first token to its end (decode)",
                &decode,
            ),
        ] {
            registry.register(name, help, histogram.clone());
        }
        registry.register(
            "dsv3_prompt_tokens",
            "Prompt tokens of admitted requests",
            prompt_tokens.clone(),
        );
        registry.register(
            "dsv3_prefix_cache_hits",
            "Prompt tokens taken from the prefix cache instead of computed (the hit rate is this over \
             dsv3_prompt_tokens)",
            prefix_cache_hits.clone(),
        );
        registry.register(
            "dsv3_masked_expert_routes",
            "Token rows computed with an expert masked out of their routes because it had no live copy \
             (counted once per MoE layer; 0 unless the attention ranks run with --unavailable-experts mask)",
            masked_expert_routes.clone(),
        );
        registry.register("dsv3_generation_tokens", "Generated tokens", generation_tokens.clone());
        registry.register(
            "dsv3_request_success",
            "Generation requests by how they ended (stop, length, abort, error)",
            finished.clone(),
        );
        registry.register(
            "dsv3_http_errors",
            "Error responses by HTTP status",
            http_errors.clone(),
        );
        registry.register_collector(Box::new(BackendCollector { backend }));
        Metrics {
            registry,
            ttft,
            itl,
            e2e,
            queue,
            prefill,
            decode,
            prompt_tokens,
            prefix_cache_hits,
            masked_expert_routes,
            generation_tokens,
            finished,
            http_errors,
        }
    }

    pub fn request_admitted(&self, prompt_tokens: usize) {
        self.prompt_tokens.inc_by(prompt_tokens as u64);
    }

    /// Prompt tokens a request took from the prefix cache.
    pub fn prefix_cache_hit(&self, tokens: usize) {
        self.prefix_cache_hits.inc_by(tokens as u64);
    }

    /// Token rows of a request computed with an expert masked out.
    pub fn experts_masked(&self, routes: usize) {
        self.masked_expert_routes.inc_by(routes as u64);
    }

    /// The request's first step: it waited `since_arrival` in the queue.
    pub fn scheduled(&self, since_arrival: Duration) {
        self.queue.observe(since_arrival.as_secs_f64());
    }

    /// The first token, `since_arrival` after the request came in and `since_scheduled` after
    /// its first step (when the backend tells).
    pub fn first_token(&self, since_arrival: Duration, since_scheduled: Option<Duration>) {
        self.ttft.observe(since_arrival.as_secs_f64());
        if let Some(prefill) = since_scheduled {
            self.prefill.observe(prefill.as_secs_f64());
        }
        self.generation_tokens.inc();
    }

    /// A request that ended normally decoded for `since_first_token`.
    pub fn decoded(&self, since_first_token: Duration) {
        self.decode.observe(since_first_token.as_secs_f64());
    }

    pub fn next_token(&self, since_previous: Duration) {
        self.itl.observe(since_previous.as_secs_f64());
        self.generation_tokens.inc();
    }

    pub fn request_finished(&self, outcome: Outcome, since_arrival: Duration) {
        self.finished
            .get_or_create(&FinishLabels {
                finished_reason: outcome.label(),
            })
            .inc();
        if matches!(outcome, Outcome::Stop | Outcome::Length) {
            self.e2e.observe(since_arrival.as_secs_f64());
        }
    }

    pub fn http_error(&self, status: u16) {
        self.http_errors.get_or_create(&StatusLabels { status }).inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// `Content-Type` of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Load figures read from the backend at scrape time.
struct BackendCollector {
    backend: Arc<dyn Backend>,
}

impl std::fmt::Debug for BackendCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendCollector").finish_non_exhaustive()
    }
}

impl Collector for BackendCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = self.backend.stats();
        const_gauge(
            &mut encoder,
            "dsv3_num_requests_running",
            "Sequences being generated.",
            stats.running as f64,
        )?;
        const_gauge(
            &mut encoder,
            "dsv3_num_requests_waiting",
            "Sequences admitted and waiting for a slot.",
            stats.waiting as f64,
        )?;
        let usage = if stats.cache_total_blocks == 0 {
            0.0
        } else {
            stats.cache_used_blocks as f64 / stats.cache_total_blocks as f64
        };
        const_gauge(
            &mut encoder,
            "dsv3_kv_cache_usage_perc",
            "Fraction of KV cache blocks in use (0 to 1, as vLLM's).",
            usage,
        )?;
        const_gauge(
            &mut encoder,
            "dsv3_kv_cache_used_blocks",
            "KV cache blocks holding sequences.",
            stats.cache_used_blocks as f64,
        )?;
        const_gauge(
            &mut encoder,
            "dsv3_kv_cache_blocks",
            "KV cache blocks in all.",
            stats.cache_total_blocks as f64,
        )?;

        const_gauge(
            &mut encoder,
            "dsv3_ready",
            "1 when every worker of the fleet answers, 0 while degraded (see GET /ready for what is down).",
            if self.backend.health().ready { 1.0 } else { 0.0 },
        )?;

        let time = stats.scheduler;
        for (name, help, value) in [
            (
                "dsv3_scheduler_steps",
                "Steps the scheduler ran since start.",
                time.steps as f64,
            ),
            (
                "dsv3_scheduler_step_seconds",
                "Seconds the scheduler waited on the attention ranks' steps since start.",
                time.step_seconds,
            ),
            (
                "dsv3_scheduler_busy_seconds",
                "Seconds the scheduler had sequences in flight since start: steps and its own work between them.",
                time.busy_seconds,
            ),
            (
                "dsv3_num_preemptions",
                "Sequences preempted since start: their KV cache freed when a rank ran out, prefilled again later.",
                time.preemptions as f64,
            ),
            (
                "dsv3_num_migrations",
                "Sequences moved off an attention rank that failed since start: prefilled again on another (prompt and output so far), their streams unbroken.",
                time.migrations as f64,
            ),
        ] {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)?;
        }
        encode_ranks(&mut encoder, &stats.ranks)?;
        if stats.expert_tokens.is_empty() {
            return Ok(());
        }
        let layers = moe_layer_numbers(self.backend.config(), stats.expert_tokens.len());
        {
            let probe = ConstCounter::new(0u64);
            let mut family = encoder.encode_descriptor(
                "dsv3_expert_tokens",
                "Tokens routed to the experts of a MoE layer since start (each token counts once per chosen expert).",
                None,
                probe.metric_type(),
            )?;
            for (layer, experts) in layers.iter().zip(&stats.expert_tokens) {
                let total: u64 = experts.iter().sum();
                let labels = [("layer", layer.to_string())];
                ConstCounter::new(total).encode(family.encode_family(&labels)?)?;
            }
        }
        let probe = ConstGauge::new(0.0f64);
        let mut family = encoder.encode_descriptor(
            "dsv3_expert_load_imbalance",
            "Max over mean of tokens per expert in a MoE layer since start (1 = balanced).",
            None,
            probe.metric_type(),
        )?;
        for (layer, experts) in layers.iter().zip(&stats.expert_tokens) {
            let labels = [("layer", layer.to_string())];
            ConstGauge::new(imbalance(experts)).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// Speculative decoding per attention rank and draft position: drafts scored and accepted, and
/// the acceptance rate over every rank.
fn encode_speculation(
    encoder: &mut DescriptorEncoder<'_>,
    ranks: &[crate::backend::RankStats],
) -> Result<(), std::fmt::Error> {
    if ranks.iter().all(|r| r.drafts_scored.is_empty()) {
        return Ok(());
    }
    for (name, help, pick) in [
        (
            "dsv3_spec_decode_draft_tokens",
            "Draft tokens of the MTP module an attention rank verified since start, by draft position.",
            (|r: &crate::backend::RankStats| &r.drafts_scored) as fn(&crate::backend::RankStats) -> &Vec<u64>,
        ),
        (
            "dsv3_spec_decode_accepted_tokens",
            "Draft tokens of the MTP module an attention rank accepted since start, by draft position.",
            |r: &crate::backend::RankStats| &r.drafts_accepted,
        ),
    ] {
        let probe = ConstCounter::new(0u64);
        let mut family = encoder.encode_descriptor(name, help, None, probe.metric_type())?;
        for r in ranks {
            for (position, &count) in pick(r).iter().enumerate() {
                let labels = [("rank", r.rank.to_string()), ("position", (position + 1).to_string())];
                ConstCounter::new(count).encode(family.encode_family(&labels)?)?;
            }
        }
    }
    let positions = ranks.iter().map(|r| r.drafts_scored.len()).max().unwrap_or(0);
    let probe = ConstGauge::new(0.0f64);
    let mut family = encoder.encode_descriptor(
        "dsv3_spec_decode_acceptance_rate",
        "Share of draft tokens accepted since start, by draft position, over every attention rank.",
        None,
        probe.metric_type(),
    )?;
    for position in 0..positions {
        let sum = |pick: fn(&crate::backend::RankStats) -> &Vec<u64>| -> u64 {
            ranks.iter().map(|r| pick(r).get(position).copied().unwrap_or(0)).sum()
        };
        let scored = sum(|r| &r.drafts_scored);
        let accepted = sum(|r| &r.drafts_accepted);
        let labels = [("position", (position + 1).to_string())];
        let rate = if scored == 0 {
            0.0
        } else {
            accepted as f64 / scored as f64
        };
        ConstGauge::new(rate).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Per attention rank: memory held on its device, and its dispatch/combine traffic.
fn encode_ranks(
    encoder: &mut DescriptorEncoder<'_>,
    ranks: &[crate::backend::RankStats],
) -> Result<(), std::fmt::Error> {
    if ranks.is_empty() {
        return Ok(());
    }
    {
        let probe = ConstGauge::new(0.0f64);
        let mut family = encoder.encode_descriptor(
            "dsv3_rank_memory_bytes",
            "Memory an attention rank holds on its device, by kind (weights, kv_cache, workspace).",
            None,
            probe.metric_type(),
        )?;
        for r in ranks {
            for (kind, bytes) in [
                ("weights", r.weight_bytes),
                ("kv_cache", r.kv_cache_bytes),
                ("workspace", r.workspace_bytes),
            ] {
                let labels = [
                    ("rank", r.rank.to_string()),
                    ("device", r.device.clone()),
                    ("kind", kind.to_string()),
                ];
                ConstGauge::new(bytes as f64).encode(family.encode_family(&labels)?)?;
            }
        }
    }
    {
        let probe = ConstCounter::new(0u64);
        let mut family = encoder.encode_descriptor(
            "dsv3_expert_transfer_bytes",
            "Activation bytes an attention rank exchanged with the expert shards since start, by direction.",
            None,
            probe.metric_type(),
        )?;
        for r in ranks {
            for (direction, bytes) in [("sent", r.expert_bytes_sent), ("received", r.expert_bytes_received)] {
                let labels = [("rank", r.rank.to_string()), ("direction", direction.to_string())];
                ConstCounter::new(bytes).encode(family.encode_family(&labels)?)?;
            }
        }
    }
    {
        let probe = ConstCounter::new(0u64);
        let mut family = encoder.encode_descriptor(
            "dsv3_expert_layers",
            "MoE layers an attention rank exchanged with the expert shards since start.",
            None,
            probe.metric_type(),
        )?;
        for r in ranks {
            let labels = [("rank", r.rank.to_string())];
            ConstCounter::new(r.expert_layers).encode(family.encode_family(&labels)?)?;
        }
    }
    encode_speculation(encoder, ranks)?;
    let probe = ConstCounter::new(0.0f64);
    let mut family = encoder.encode_descriptor(
        "dsv3_expert_transfer_seconds",
        "Wall seconds an attention rank spent in dispatch/combine with the expert shards since start.",
        None,
        probe.metric_type(),
    )?;
    for r in ranks {
        let labels = [("rank", r.rank.to_string())];
        ConstCounter::new(r.expert_seconds).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

fn const_gauge(encoder: &mut DescriptorEncoder<'_>, name: &str, help: &str, value: f64) -> Result<(), std::fmt::Error> {
    let gauge = ConstGauge::new(value);
    let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
    gauge.encode(metric)
}

/// max / mean of the per-expert counts; 1 when nothing was routed yet.
pub fn imbalance(tokens_per_expert: &[u64]) -> f64 {
    let total: u64 = tokens_per_expert.iter().sum();
    if total == 0 || tokens_per_expert.is_empty() {
        return 1.0;
    }
    let mean = total as f64 / tokens_per_expert.len() as f64;
    let max = tokens_per_expert.iter().copied().max().unwrap_or(0) as f64;
    max / mean
}

/// The layer numbers of the first `count` MoE layers (main stack, then MTP modules); plain
/// ordinals when the config has fewer MoE layers than the stats report.
fn moe_layer_numbers(config: &dsv3_engine::ModelConfig, count: usize) -> Vec<usize> {
    let layers: Vec<usize> = (0..config.num_cache_layers())
        .filter(|&l| config.is_moe_layer(l))
        .take(count)
        .collect();
    if layers.len() == count {
        layers
    } else {
        (0..count).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::imbalance;

    #[test]
    fn imbalance_is_max_over_mean() {
        assert_eq!(imbalance(&[]), 1.0);
        assert_eq!(imbalance(&[0, 0]), 1.0);
        assert_eq!(imbalance(&[5, 5, 5, 5]), 1.0);
        assert_eq!(imbalance(&[4, 0, 0, 0]), 4.0);
    }
}
